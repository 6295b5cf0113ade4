//! Q2_K: 256 elements in 84 bytes (model.md §5):
//! `[scales u8; 16][qs u8; 64][f16 d][f16 dmin]`; group g (16 elements) has 4-bit scale
//! `scales[g] & 15` and 4-bit min `scales[g] >> 4`; element e's 2-bit code sits in
//! `qs[32·(e/128) + e%32]` at bit `2·((e%128)/32)`.

use super::kfit;
use super::q8_k::{BlockQ8K, QK_K};
use half::f16;

pub(crate) const BLOCK_BYTES: usize = 84;

#[inline]
fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// `w = (d·sc)·q − (dmin·m)`: the products are formed in this order (as gguf-py does) so the
/// result is bit-exact against the fixtures.
pub(crate) fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(QK_K))
    {
        let d = f16_at(b, 80);
        let dmin = f16_at(b, 82);
        for (e, o) in out.iter_mut().enumerate() {
            let sc = b[e / 16];
            let q = (b[16 + 32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
            let dl = d * (sc & 15) as f32;
            let ml = dmin * (sc >> 4) as f32;
            *o = dl * q as f32 - ml;
        }
    }
}

/// Scalar Q2_K × Q8_K: `d_x·[d·Σ_g sc_g·Σ q2·q8 − dmin·Σ_g m_g·bsum_g]`.
pub(crate) fn dot_scalar(row: &[u8], xq: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    for (b, x) in row.chunks_exact(BLOCK_BYTES).zip(xq) {
        let mut summs = 0i32;
        let mut isum = 0i32;
        for g in 0..16 {
            let sc = b[g];
            summs += (sc >> 4) as i32 * x.bsums[g] as i32;
            let mut s = 0i32;
            for e in 16 * g..16 * g + 16 {
                let q = (b[16 + 32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
                s += q as i32 * x.qs[e] as i32;
            }
            isum += (sc & 15) as i32 * s;
        }
        let d = x.d * f16_at(b, 80);
        let dmin = x.d * f16_at(b, 82);
        acc += d * isum as f32 - dmin * summs as f32;
    }
    acc
}

/// Weight quantizer: per-group least-squares fit (see `kfit`), 4-bit scales and mins
/// relative to f16 super-scales, then codes re-assigned against the *stored* parameters so
/// the rounding of the scales is accounted for.
pub(crate) fn quantize(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        let mut scales = [0f32; 16];
        let mut offs = [0f32; 16];
        for g in 0..16 {
            (scales[g], offs[g]) = kfit::fit(&x[16 * g..16 * g + 16], 3);
        }
        let mut sc = [0u8; 16];
        let mut mn = [0u8; 16];
        let d = kfit::quantize_scales(&scales, 15, &mut sc);
        let dmin = kfit::quantize_scales(&offs, 15, &mut mn);
        b.fill(0);
        for g in 0..16 {
            b[g] = sc[g] | (mn[g] << 4);
        }
        b[80..82].copy_from_slice(&d.to_bits().to_le_bytes());
        b[82..84].copy_from_slice(&dmin.to_bits().to_le_bytes());
        let (d, dmin) = (d.to_f32(), dmin.to_f32());
        for (e, &v) in x.iter().enumerate() {
            let g = e / 16;
            let q = kfit::assign(v, d * sc[g] as f32, dmin * mn[g] as f32, 3.0);
            b[16 + 32 * (e / 128) + e % 32] |= q << (2 * ((e % 128) / 32));
        }
    }
}
