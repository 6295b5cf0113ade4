//! AVX2 twin of `q2_k::dot_scalar`. The integer sums are exact (2-bit codes are unsigned,
//! so `maddubs(code, q8)` cannot saturate: |3·128·2| < 2^15) and the per-block f32
//! combination is the scalar expression, so the result is bit-identical to the twin.

use super::fdot_avx2::{f16_to_f32, hsum_i32};
use super::q2_k::BLOCK_BYTES;
use super::q8_k::BlockQ8K;
use std::arch::x86_64::*;

/// # Safety
/// Requires AVX2 and F16C (checked by the dispatcher).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot(row: &[u8], xq: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    let m3 = _mm256_set1_epi8(3);
    for (b, x) in row.chunks_exact(BLOCK_BYTES).zip(xq) {
        let mut summs = 0i32;
        for g in 0..16 {
            summs += (b[g] >> 4) as i32 * x.bsums[g] as i32;
        }
        let mut isum = _mm256_setzero_si256();
        // SAFETY: qs = b[16..80] (two 32-byte loads), x.qs has 256 bytes (8 loads).
        unsafe {
            for half in 0..2 {
                let q = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * half) as *const __m256i);
                for j in 0..4 {
                    let q2 =
                        _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * j as i32)), m3);
                    let x8 = _mm256_loadu_si256(
                        x.qs.as_ptr().add(128 * half + 32 * j) as *const __m256i
                    );
                    let p = _mm256_maddubs_epi16(q2, x8);
                    // Low 128 bits hold group g, high 128 bits group g+1.
                    let g = 8 * half + 2 * j;
                    let s = _mm256_set_m128i(
                        _mm_set1_epi16((b[g + 1] & 15) as i16),
                        _mm_set1_epi16((b[g] & 15) as i16),
                    );
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, s));
                }
            }
        }
        let isum = unsafe { hsum_i32(isum) };
        let (dw, dm) = unsafe {
            (
                f16_to_f32(u16::from_le_bytes([b[80], b[81]])),
                f16_to_f32(u16::from_le_bytes([b[82], b[83]])),
            )
        };
        let d = x.d * dw;
        let dmin = x.d * dm;
        acc += d * isum as f32 - dmin * summs as f32;
    }
    acc
}
