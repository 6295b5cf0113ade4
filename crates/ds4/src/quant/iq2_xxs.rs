//! IQ2_XXS: 256 elements in 66 bytes (model.md §5): `[f16 d]` then 8 groups of 8 bytes.
//! Group ib: u32 `a` = four grid indices, u32 `b` = four 7-bit sign indices (bits 7l..7l+7)
//! and a 4-bit scale `ls = b >> 28`; `db = d·(0.5 + ls)·0.25`.

use super::iq2_tables::{IQ2XXS_GRID, KSIGNS_IQ2XS};
use super::q8_k::{BlockQ8K, QK_K};
use half::f16;

pub(crate) const BLOCK_BYTES: usize = 66;

#[inline(always)]
pub(crate) fn group_words(b: &[u8], ib: usize) -> (u32, u32) {
    let o = 2 + 8 * ib;
    (
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]),
        u32::from_le_bytes([b[o + 4], b[o + 5], b[o + 6], b[o + 7]]),
    )
}

/// `w = ((d·(0.5+ls))·0.25 · grid) · ±1`, in gguf-py's operation order (bit-exact).
pub(crate) fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(QK_K))
    {
        let d = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        for ib in 0..8 {
            let (a, w) = group_words(b, ib);
            let db = d * (0.5 + (w >> 28) as f32) * 0.25;
            for l in 0..4 {
                let grid = IQ2XXS_GRID[((a >> (8 * l)) & 255) as usize].to_le_bytes();
                let signs = KSIGNS_IQ2XS[((w >> (7 * l)) & 127) as usize];
                for k in 0..8 {
                    let v = db * grid[k] as f32;
                    out[32 * ib + 8 * l + k] = if signs & (1 << k) != 0 { -v } else { v };
                }
            }
        }
    }
}

/// Scalar IQ2_XXS × Q8_K: `d_x·d·0.125·Σ_ib (2·ls+1)·Σ grid·sign·q8`.
pub(crate) fn dot_scalar(row: &[u8], xq: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    for (b, x) in row.chunks_exact(BLOCK_BYTES).zip(xq) {
        let d = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        let mut total = 0i32;
        for ib in 0..8 {
            let (a, w) = group_words(b, ib);
            let mut s = 0i32;
            for l in 0..4 {
                let grid = IQ2XXS_GRID[((a >> (8 * l)) & 255) as usize].to_le_bytes();
                let signs = KSIGNS_IQ2XS[((w >> (7 * l)) & 127) as usize];
                for k in 0..8 {
                    let p = grid[k] as i32 * x.qs[32 * ib + 8 * l + k] as i32;
                    s += if signs & (1 << k) != 0 { -p } else { p };
                }
            }
            total += (2 * (w >> 28) as i32 + 1) * s;
        }
        acc += 0.125 * d * x.d * total as f32;
    }
    acc
}
