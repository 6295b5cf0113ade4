//! AVX2 twin of `q4_k::dot_scalar`: exact integer sums (`maddubs(nibble, q8)` ≤ 15·128·2),
//! same per-block f32 expression, hence bit-identical to the scalar twin.

use super::fdot_avx2::{f16_to_f32, hsum_i32};
use super::q4_k::{scale_min, BLOCK_BYTES};
use super::q8_k::BlockQ8K;
use std::arch::x86_64::*;

/// # Safety
/// Requires AVX2 and F16C (checked by the dispatcher).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot(row: &[u8], xq: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    let m4 = _mm256_set1_epi8(15);
    for (b, x) in row.chunks_exact(BLOCK_BYTES).zip(xq) {
        let scales = &b[4..16];
        let mut sc = [0i16; 8];
        let mut summs = 0i32;
        for s in 0..8 {
            let (c, m) = scale_min(scales, s);
            sc[s] = c as i16;
            summs += m as i32 * (x.bsums[2 * s] as i32 + x.bsums[2 * s + 1] as i32);
        }
        let mut isum = _mm256_setzero_si256();
        // SAFETY: qs = b[16..144] (four 32-byte loads); x.qs has 256 bytes.
        unsafe {
            for c in 0..4 {
                let q = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * c) as *const __m256i);
                let lo = _mm256_and_si256(q, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                let xl = _mm256_loadu_si256(x.qs.as_ptr().add(64 * c) as *const __m256i);
                let xh = _mm256_loadu_si256(x.qs.as_ptr().add(64 * c + 32) as *const __m256i);
                let pl =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_set1_epi16(sc[2 * c]));
                let ph = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(hi, xh),
                    _mm256_set1_epi16(sc[2 * c + 1]),
                );
                isum = _mm256_add_epi32(isum, _mm256_add_epi32(pl, ph));
            }
        }
        let isum = unsafe { hsum_i32(isum) };
        let (dw, dm) = unsafe {
            (
                f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
                f16_to_f32(u16::from_le_bytes([b[2], b[3]])),
            )
        };
        let d = x.d * dw;
        let dmin = x.d * dm;
        acc += d * isum as f32 - dmin * summs as f32;
    }
    acc
}
