//! Q8_K: the activation-side block of the K/IQ dot products, 256 elements (model.md §5).
//! In memory (GGUF type 15) it is `[f32 d][i8 qs; 256][i16 bsums; 16]` = 292 bytes.

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;
pub(crate) const BLOCK_BYTES: usize = 292;

/// One quantized activation block.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8K {
    /// Scale `1/iscale` (0 for an all-zero block); element i ≈ `d·qs[i]`.
    pub d: f32,
    /// Quantized values.
    pub qs: [i8; QK_K],
    /// `bsums[g] = Σ qs[16g .. 16g+16]`, used to apply the weight minimums cheaply.
    pub bsums: [i16; QK_K / 16],
}

impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        }
    }
}

/// ds4's Q8_K rule (`ds4_quantize_row_q8_K`): `max` is the signed element with the largest
/// |x| (the first one on ties), `iscale = -127/max`, `q = clamp(rne(iscale·x), -128, 127)`,
/// `d = 1/iscale`. The sign flip means the largest element maps to exactly -127, which is
/// why `q` never reaches -128 for finite input.
#[inline(always)]
pub(crate) fn quantize_block(x: &[f32], out: &mut BlockQ8K) {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        // Strict `>` keeps the first element on ties, as the reference does.
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        *out = BlockQ8K::default();
        return;
    }
    // `(1/max)·(-127)` rather than `-127/max`: the fixture (torch's `-127.0 / t`, which
    // evaluates as `t.reciprocal() * -127`) rounds this way, and the two differ by one ulp
    // for some inputs. ds4's C divides directly; the difference is far below Q8 noise.
    let iscale = (1.0 / max) * -127.0;
    for (q, &v) in out.qs.iter_mut().zip(x) {
        *q = (iscale * v).round_ties_even().clamp(-128.0, 127.0) as i8;
    }
    for (s, g) in out.bsums.iter_mut().zip(out.qs.chunks_exact(16)) {
        *s = g.iter().map(|&q| q as i16).sum();
    }
    out.d = 1.0 / iscale;
}

/// Decodes serialized Q8_K blocks: `d·q`.
pub(crate) fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(QK_K))
    {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for (o, &q) in out.iter_mut().zip(&b[4..4 + QK_K]) {
            *o = d * (q as i8) as f32;
        }
    }
}

/// Serializes blocks in the GGUF layout (`d`, `qs`, `bsums`, little-endian).
pub(crate) fn quantize(src: &[f32], dst: &mut [u8]) {
    let mut blk = BlockQ8K::default();
    for (x, b) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        quantize_block(x, &mut blk);
        b[0..4].copy_from_slice(&blk.d.to_le_bytes());
        for (o, &q) in b[4..4 + QK_K].iter_mut().zip(&blk.qs) {
            *o = q as u8;
        }
        for (o, s) in b[4 + QK_K..].chunks_exact_mut(2).zip(&blk.bsums) {
            o.copy_from_slice(&s.to_le_bytes());
        }
    }
}
