//! Q8_0: 32 elements in 34 bytes, `[f16 d][i8 q; 32]`, `w = d·q` (model.md §5).
//!
//! Two quantizers live here on purpose: the GGML/gguf-py *weight* rule (d stored as f16,
//! round half away from zero) and ds4's *activation* rule (d kept in f32, round half to
//! even). They differ in the last bit and the fixtures pin each one separately.

use half::f16;

/// Elements per Q8_0 block.
pub const QK8_0: usize = 32;
pub(crate) const BLOCK_BYTES: usize = 34;

/// One block of a Q8_0-quantized activation vector (ds4's rule: `d` stays f32).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0Act {
    /// Scale, `amax / 127` in f32 (0 for an all-zero block).
    pub d: f32,
    /// Quantized values, `clamp(round_half_even(x / d), -128, 127)`.
    pub qs: [i8; QK8_0],
}

impl Default for BlockQ8_0Act {
    fn default() -> Self {
        BlockQ8_0Act {
            d: 0.0,
            qs: [0; QK8_0],
        }
    }
}

#[inline]
pub(crate) fn block_d(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// `dst[i] = d·q[i]`, one f32 multiply, matching gguf-py bit for bit.
pub(crate) fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(QK8_0))
    {
        let d = block_d(b);
        for (o, &q) in out.iter_mut().zip(&b[2..]) {
            *o = d * (q as i8) as f32;
        }
    }
}

/// GGML reference weight quantizer (gguf-py `Q8_0.quantize_blocks`): `d = amax/127` in f32,
/// `q = round_half_away(x·(1/d))`, d stored as f16. The reciprocal is multiplied (not
/// divided) because that is what the reference does and the fixture is bit-exact.
pub(crate) fn quantize(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src
        .chunks_exact(QK8_0)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        b[0..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (o, v) in b[2..].iter_mut().zip(x) {
            // `as i8` saturates (and maps NaN to 0), so hostile input cannot wrap.
            *o = ((v * id).round() as i8) as u8;
        }
    }
}

/// ds4's activation quantizer for one block (model.md §5, `quantize_q8_0_activation`).
#[inline(always)]
pub(crate) fn quantize_act_block(x: &[f32]) -> BlockQ8_0Act {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut qs = [0i8; QK8_0];
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round_ties_even().clamp(-128.0, 127.0) as i8;
    }
    BlockQ8_0Act { d, qs }
}

/// Scalar Q8_0 weights × Q8_0 activations: `Σ_b f16(d_w)·d_x·Σ q_w·q_x`.
pub(crate) fn dot_q8_0_scalar(row: &[u8], xq: &[BlockQ8_0Act]) -> f32 {
    let mut acc = 0.0f32;
    for (b, xb) in row.chunks_exact(BLOCK_BYTES).zip(xq) {
        let mut sumi = 0i32;
        for (&w, &x) in b[2..].iter().zip(&xb.qs) {
            sumi += (w as i8) as i32 * x as i32;
        }
        acc += block_d(b) * xb.d * sumi as f32;
    }
    acc
}
