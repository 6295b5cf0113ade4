//! AVX2 twin of `iq2_xxs::dot_scalar`. Signs are applied by splitting the grid into its
//! positive and negative parts and subtracting two `maddubs` results, rather than negating
//! q8 with `sign_epi8` (which maps -128 to -128): exact for every q8 value. Each part is
//! ≤ 43·128·2, the difference fits i16. Same f32 expression as the scalar twin, so the
//! results are bit-identical.

use super::fdot_avx2::{f16_to_f32, hsum_i32};
use super::iq2_tables::{IQ2XXS_GRID, KSIGNS_IQ2XS};
use super::iq2_xxs::{group_words, BLOCK_BYTES};
use super::q8_k::BlockQ8K;
use std::arch::x86_64::*;

/// # Safety
/// Requires AVX2 and F16C (checked by the dispatcher).
/// `KSIGNS_IQ2XS` expanded to byte masks (byte k = 0xFF when element k is negated), so
/// the kernel builds its negation mask with plain loads instead of multiply/compare.
const SIGN_MASKS: [u64; 128] = {
    let mut t = [0u64; 128];
    let mut i = 0;
    while i < 128 {
        let mut k = 0;
        while k < 8 {
            if KSIGNS_IQ2XS[i] & (1 << k) != 0 {
                t[i] |= 0xFF << (8 * k);
            }
            k += 1;
        }
        i += 1;
    }
    t
};

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot(row: &[u8], xq: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    for (b, x) in row.chunks_exact(BLOCK_BYTES).zip(xq) {
        let mut isum = _mm256_setzero_si256();
        for ib in 0..8 {
            let (a, w) = group_words(b, ib);
            let g = |l: u32| IQ2XXS_GRID[((a >> (8 * l)) & 255) as usize] as i64;
            let s = |l: u32| SIGN_MASKS[((w >> (7 * l)) & 127) as usize] as i64;
            let grid = _mm256_set_epi64x(g(3), g(2), g(1), g(0));
            let neg = _mm256_set_epi64x(s(3), s(2), s(1), s(0));
            // SAFETY: x.qs has 256 bytes; ib < 8.
            let x8 = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(32 * ib) as *const __m256i) };
            let pos = _mm256_maddubs_epi16(_mm256_andnot_si256(neg, grid), x8);
            let ngp = _mm256_maddubs_epi16(_mm256_and_si256(neg, grid), x8);
            let p = _mm256_sub_epi16(pos, ngp);
            let ls = (2 * (w >> 28) + 1) as i16;
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, _mm256_set1_epi16(ls)));
        }
        let total = unsafe { hsum_i32(isum) };
        let d = unsafe { f16_to_f32(u16::from_le_bytes([b[0], b[1]])) };
        acc += 0.125 * d * x.d * total as f32;
    }
    acc
}
