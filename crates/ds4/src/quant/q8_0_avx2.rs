//! AVX2 twin of `q8_0::dot_q8_0_scalar`.
//!
//! Both operands are signed and may hold -128, so the usual `maddubs` sign trick (which
//! wraps on -(-128)) is avoided: values are widened to i16 and multiplied with `madd`,
//! exact for every input. Per-block integer sums are exact; only the f32 accumulation
//! differs from the scalar twin (8 lanes + FMA instead of one running sum).

use super::fdot_avx2::{f16_to_f32, hsum_f32};
use super::q8_0::{BlockQ8_0Act, BLOCK_BYTES};
use std::arch::x86_64::*;

/// # Safety
/// Requires AVX2, FMA and F16C (checked by the dispatcher).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q8_0(row: &[u8], xq: &[BlockQ8_0Act]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (b, xb) in row.chunks_exact(BLOCK_BYTES).zip(xq) {
        // SAFETY: b has 34 bytes (2 + 32), xb.qs has 32.
        unsafe {
            let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]])) * xb.d;
            let w = _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i);
            let x = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            let wl = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w));
            let wh = _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(w));
            let xl = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(x));
            let xh = _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(x));
            let p = _mm256_add_epi32(_mm256_madd_epi16(wl, xl), _mm256_madd_epi16(wh, xh));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(p), acc);
        }
    }
    unsafe { hsum_f32(acc) }
}
