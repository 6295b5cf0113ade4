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

/// SIMD twin of `q8_0::dequantize`: `d·q` with the same single f32 multiply (F16C decodes
/// `d` exactly as the scalar code), hence bit-identical.
///
/// # Safety
/// Requires AVX2 and F16C; `src.len() == 34 · dst.len() / 32`, `dst.len() % 32 == 0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequantize(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() * 32, dst.len() * BLOCK_BYTES);
    for (b, out) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(32)) {
        // SAFETY: b has 34 bytes, out 32 floats.
        unsafe {
            let d = _mm256_set1_ps(f16_to_f32(u16::from_le_bytes([b[0], b[1]])));
            let o = out.as_mut_ptr();
            for k in 0..4 {
                let q = _mm_loadl_epi64(b.as_ptr().add(2 + 8 * k) as *const __m128i);
                let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                _mm256_storeu_ps(o.add(8 * k), _mm256_mul_ps(d, v));
            }
        }
    }
}

/// One Q8_0 row against `T` tokens whose activations were quantized by ds4's Q8_0 rule and
/// then widened to i16 (`x16[t]`: `32·nb` values) with their block scales (`xd[t]`: `nb`
/// values). Per token this performs exactly the operations of [`dot_q8_0`] (same i32 lane
/// sums, same `f16(d_w)·d_x` product, same FMA into the same 8 lanes, same final
/// reduction), so each `out[t]` is bit-identical to `dot_q8_0(row, token t)`; the weight
/// block is loaded and widened once for all `T` tokens.
///
/// # Safety
/// Requires AVX2, FMA and F16C; `row.len() == 34·nb`, every `x16[t]` valid for `32·nb`
/// reads and every `xd[t]` for `nb`; `out.len() >= T`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_i16_row<const T: usize>(
    row: &[u8],
    x16: &[*const i16; T],
    xd: &[*const f32; T],
    out: &mut [f32],
) {
    let nb = row.len() / BLOCK_BYTES;
    let rp = row.as_ptr();
    let mut acc = [_mm256_setzero_ps(); T];
    // SAFETY: offsets per the preconditions above.
    unsafe {
        for b in 0..nb {
            let bp = rp.add(b * BLOCK_BYTES);
            let dw = _mm256_set1_ps(f16_to_f32(u16::from_le_bytes([*bp, *bp.add(1)])));
            let wl = _mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(2) as *const __m128i));
            let wh = _mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(18) as *const __m128i));
            for t in 0..T {
                let xp = x16[t].add(32 * b);
                let p = _mm256_add_epi32(
                    _mm256_madd_epi16(wl, _mm256_loadu_si256(xp as *const __m256i)),
                    _mm256_madd_epi16(wh, _mm256_loadu_si256(xp.add(16) as *const __m256i)),
                );
                let d = _mm256_mul_ps(dw, _mm256_broadcast_ss(&*xd[t].add(b)));
                acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[t]);
            }
        }
        for t in 0..T {
            out[t] = hsum_f32(acc[t]);
        }
    }
}

/// [`dot_i16_row`] over consecutive rows of `rb` bytes in `rows` (one call per batch of
/// rows keeps the per-row overhead out of short rows): `out[r·T + t]`.
///
/// # Safety
/// As [`dot_i16_row`] for every row; `rows.len()` a multiple of `rb`, `out.len() >= T·rows`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_i16_multi<const T: usize>(
    rows: &[u8],
    rb: usize,
    x16: [*const i16; T],
    xd: [*const f32; T],
    out: &mut [f32],
) {
    for (r, row) in rows.chunks_exact(rb).enumerate() {
        // SAFETY: forwarded preconditions.
        unsafe { dot_i16_row::<T>(row, &x16, &xd, &mut out[r * T..(r + 1) * T]) }
    }
}
