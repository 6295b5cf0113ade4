//! AVX2/FMA twin of `fdot::feed_scalar` (same lane mapping, fused multiply-add), its
//! multi-token forms (one weight load for several tokens' accumulators), and the fused F16
//! forms (F16C conversion is exact, so they equal dequantize-then-feed).

use super::fdot::{Acc, LANES};
use std::arch::x86_64::*;

/// # Safety
/// Requires AVX2 and FMA (checked by the dispatcher).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn feed(acc: &mut Acc, w: &[f32], x: &[f32]) {
    debug_assert_eq!(w.len(), x.len());
    let n32 = w.len() / LANES * LANES;
    let a = acc.0.as_mut_ptr();
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    // SAFETY: all offsets are < n32 ≤ len of both slices; unaligned loads/stores.
    unsafe {
        let mut a0 = _mm256_loadu_ps(a);
        let mut a1 = _mm256_loadu_ps(a.add(8));
        let mut a2 = _mm256_loadu_ps(a.add(16));
        let mut a3 = _mm256_loadu_ps(a.add(24));
        let mut i = 0;
        while i < n32 {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(i)), _mm256_loadu_ps(xp.add(i)), a0);
            a1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(wp.add(i + 8)),
                _mm256_loadu_ps(xp.add(i + 8)),
                a1,
            );
            a2 = _mm256_fmadd_ps(
                _mm256_loadu_ps(wp.add(i + 16)),
                _mm256_loadu_ps(xp.add(i + 16)),
                a2,
            );
            a3 = _mm256_fmadd_ps(
                _mm256_loadu_ps(wp.add(i + 24)),
                _mm256_loadu_ps(xp.add(i + 24)),
                a3,
            );
            i += LANES;
        }
        _mm256_storeu_ps(a, a0);
        _mm256_storeu_ps(a.add(8), a1);
        _mm256_storeu_ps(a.add(16), a2);
        _mm256_storeu_ps(a.add(24), a3);
    }
    // Tail (last piece of a row only): same lanes as the scalar twin.
    for (l, (p, q)) in w[n32..].iter().zip(&x[n32..]).enumerate() {
        acc.0[l] += p * q;
    }
}

/// f16 → f32 of one value via F16C (faster than the software conversion in hot loops).
///
/// # Safety
/// Requires F16C.
#[target_feature(enable = "f16c")]
#[inline]
pub(crate) unsafe fn f16_to_f32(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Horizontal sum of 8 i32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Horizontal sum of 8 f32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn hsum_f32(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// [`feed`] of one weight row into `T` accumulators, one per token (`xs[t]`: `w.len()`
/// values): each weight vector is loaded once for all tokens. Per token the FMAs into each
/// lane happen in the same order as [`feed`] (and the tail uses the same separate multiply
/// and add), so every `accs[t]` ends bit-identical to feeding that token alone.
///
/// # Safety
/// Requires AVX2 and FMA; every `xs[t]` valid for `w.len()` reads.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn feed_multi<const T: usize>(accs: &mut [Acc], w: &[f32], xs: [*const f32; T]) {
    let n32 = w.len() / LANES * LANES;
    let wp = w.as_ptr();
    // SAFETY: offsets < w.len(); accs has ≥ T entries (checked by the slice indexing).
    unsafe {
        let mut a: [[__m256; 4]; T] = std::array::from_fn(|t| {
            std::array::from_fn(|k| _mm256_loadu_ps(accs[t].0.as_ptr().add(8 * k)))
        });
        let mut i = 0;
        while i < n32 {
            for k in 0..4 {
                let wv = _mm256_loadu_ps(wp.add(i + 8 * k));
                for t in 0..T {
                    a[t][k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[t].add(i + 8 * k)), a[t][k]);
                }
            }
            i += LANES;
        }
        for t in 0..T {
            for k in 0..4 {
                _mm256_storeu_ps(accs[t].0.as_mut_ptr().add(8 * k), a[t][k]);
            }
            for (l, i) in (n32..w.len()).enumerate() {
                accs[t].0[l] += w[i] * *xs[t].add(i);
            }
        }
    }
}

/// [`feed_multi`] straight from an F16 row (`row`: `2·n` bytes, `n` elements), widening
/// with F16C (exact), so it equals dequantizing the row and calling [`feed_multi`].
///
/// # Safety
/// Requires AVX2, FMA and F16C; `row.len() == 2·n`; every `xs[t]` valid for `n` reads.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn feed_f16_multi<const T: usize>(
    accs: &mut [Acc],
    row: &[u8],
    n: usize,
    xs: [*const f32; T],
) {
    debug_assert_eq!(row.len(), 2 * n);
    let n32 = n / LANES * LANES;
    let rp = row.as_ptr();
    // SAFETY: offsets < n (elements) / 2n (bytes).
    unsafe {
        let mut a: [[__m256; 4]; T] = std::array::from_fn(|t| {
            std::array::from_fn(|k| _mm256_loadu_ps(accs[t].0.as_ptr().add(8 * k)))
        });
        let mut i = 0;
        while i < n32 {
            for k in 0..4 {
                let h = _mm_loadu_si128(rp.add(2 * (i + 8 * k)) as *const __m128i);
                let wv = _mm256_cvtph_ps(h);
                for t in 0..T {
                    a[t][k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[t].add(i + 8 * k)), a[t][k]);
                }
            }
            i += LANES;
        }
        for t in 0..T {
            for k in 0..4 {
                _mm256_storeu_ps(accs[t].0.as_mut_ptr().add(8 * k), a[t][k]);
            }
            for (l, i) in (n32..n).enumerate() {
                let wv = f16_to_f32(u16::from_le_bytes([*rp.add(2 * i), *rp.add(2 * i + 1)]));
                accs[t].0[l] += wv * *xs[t].add(i);
            }
        }
    }
}

/// F16 → f32 of a whole row with F16C (the same conversion the `half` crate performs on
/// this CPU, so bit-identical to the scalar decoder).
///
/// # Safety
/// Requires AVX2 and F16C; `src.len() == 2·dst.len()`.
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), 2 * dst.len());
    let n8 = dst.len() / 8 * 8;
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: offsets < dst.len() elements / src.len() bytes.
    unsafe {
        let mut i = 0;
        while i < n8 {
            let h = _mm_loadu_si128(sp.add(2 * i) as *const __m128i);
            _mm256_storeu_ps(dp.add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        for i in n8..dst.len() {
            *dp.add(i) = f16_to_f32(u16::from_le_bytes([*sp.add(2 * i), *sp.add(2 * i + 1)]));
        }
    }
}
