//! AVX2 twins of `q2_k::dot_scalar` and `q2_k::dequantize`.
//!
//! Dot: the integer sums are exact (2-bit codes are unsigned, so `maddubs(code, q8)`
//! cannot saturate: |3·128·2| < 2^15) and the per-block f32 combination is the scalar
//! expression, so the result is bit-identical to the twin. The four shifts are immediate
//! (fully unrolled), the 16 group scales are expanded once per block and broadcast per
//! pair of groups with one `pshufb`, and the min correction `Σ m_g·bsum_g` is one `madd`.

use super::fdot_avx2::{f16_to_f32, hsum_i32};
use super::q2_k::BLOCK_BYTES;
use super::q8_k::BlockQ8K;
use std::arch::x86_64::*;

/// `pshufb` pattern giving group `g`'s scale (byte g of the 16 scale bytes, zero-extended
/// to i16) in every word of the low half and group `g+1`'s in the high half.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn pair_pattern<const G: i8>() -> __m256i {
    let lo = (0x80u8 as i8 as i16) << 8 | G as i16;
    let hi = (0x80u8 as i8 as i16) << 8 | (G + 1) as i16;
    _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
}

/// Codes of 32-element rows `4·H + J` (shift `2J` of the H-th 32 code bytes) times q8,
/// scaled by their two group scales: 8 i32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn step<const H: usize, const J: i32, const G: i8>(
    q: __m256i,
    x: *const i8,
    sc: __m256i,
) -> __m256i {
    // SAFETY: x has 256 bytes; offset 128H + 32J + 32 ≤ 256.
    unsafe {
        let m3 = _mm256_set1_epi8(3);
        let q2 = _mm256_and_si256(
            match J {
                0 => q,
                1 => _mm256_srli_epi16::<2>(q),
                2 => _mm256_srli_epi16::<4>(q),
                _ => _mm256_srli_epi16::<6>(q),
            },
            m3,
        );
        let x8 = _mm256_loadu_si256(x.add(128 * H + 32 * J as usize) as *const __m256i);
        let p = _mm256_maddubs_epi16(q2, x8);
        _mm256_madd_epi16(p, _mm256_shuffle_epi8(sc, pair_pattern::<G>()))
    }
}

/// # Safety
/// Requires AVX2 and F16C (checked by the dispatcher); `row.len() == 84 · xq.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot(row: &[u8], xq: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(row.len(), BLOCK_BYTES * xq.len());
    let mut acc = 0.0f32;
    let m4 = _mm_set1_epi8(15);
    for (b, x) in row.chunks_exact(BLOCK_BYTES).zip(xq) {
        let bp = b.as_ptr();
        let xp = x.qs.as_ptr();
        // SAFETY: b has 84 bytes (scales 0..16, qs 16..80); x.qs 256 bytes, x.bsums 16 i16.
        let (isum, summs) = unsafe {
            let s16 = _mm_loadu_si128(bp as *const __m128i);
            let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(s16), m4));
            let bs = _mm256_loadu_si256(x.bsums.as_ptr() as *const __m256i);
            let summs = _mm256_madd_epi16(mins, bs);
            let sc128 = _mm_and_si128(s16, m4);
            let sc = _mm256_set_m128i(sc128, sc128);
            let q0 = _mm256_loadu_si256(bp.add(16) as *const __m256i);
            let q1 = _mm256_loadu_si256(bp.add(48) as *const __m256i);
            let a = _mm256_add_epi32(
                _mm256_add_epi32(step::<0, 0, 0>(q0, xp, sc), step::<0, 1, 2>(q0, xp, sc)),
                _mm256_add_epi32(step::<0, 2, 4>(q0, xp, sc), step::<0, 3, 6>(q0, xp, sc)),
            );
            let c = _mm256_add_epi32(
                _mm256_add_epi32(step::<1, 0, 8>(q1, xp, sc), step::<1, 1, 10>(q1, xp, sc)),
                _mm256_add_epi32(step::<1, 2, 12>(q1, xp, sc), step::<1, 3, 14>(q1, xp, sc)),
            );
            (hsum_i32(_mm256_add_epi32(a, c)), hsum_i32(summs))
        };
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

/// SIMD twin of `q2_k::dequantize`: `(d·sc)·q − (dmin·m)` per group of 16, the two
/// products formed in f32 exactly as the twin does (no FMA), hence bit-identical.
///
/// # Safety
/// Requires AVX2 and F16C; whole blocks (`src.len() / 84 == dst.len() / 256`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(256)) {
        // SAFETY: b has 84 bytes, out 256 floats.
        unsafe {
            let d = f16_to_f32(u16::from_le_bytes([b[80], b[81]]));
            let dmin = f16_to_f32(u16::from_le_bytes([b[82], b[83]]));
            let mut dl = [0f32; 16];
            let mut ml = [0f32; 16];
            for g in 0..16 {
                dl[g] = d * (b[g] & 15) as f32;
                ml[g] = dmin * (b[g] >> 4) as f32;
            }
            let o = out.as_mut_ptr();
            let m3 = _mm256_set1_epi32(3);
            for h in 0..2 {
                for k in 0..4 {
                    // Code bytes 32h+8k..+8 hold elements 128h + 32j + 8k + (0..8), j = 0..3.
                    let q = _mm_loadl_epi64(b.as_ptr().add(16 + 32 * h + 8 * k) as *const __m128i);
                    let w = _mm256_cvtepu8_epi32(q);
                    let codes = [
                        _mm256_and_si256(w, m3),
                        _mm256_and_si256(_mm256_srli_epi32::<2>(w), m3),
                        _mm256_and_si256(_mm256_srli_epi32::<4>(w), m3),
                        _mm256_srli_epi32::<6>(w),
                    ];
                    for (j, c) in codes.into_iter().enumerate() {
                        let e = 128 * h + 32 * j + 8 * k;
                        let g = e / 16;
                        let v = _mm256_sub_ps(
                            _mm256_mul_ps(_mm256_set1_ps(dl[g]), _mm256_cvtepi32_ps(c)),
                            _mm256_set1_ps(ml[g]),
                        );
                        _mm256_storeu_ps(o.add(e), v);
                    }
                }
            }
        }
    }
}

/// [`step`] for `T` tokens: the codes and the scale broadcast are formed once.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn step_multi<const H: usize, const J: i32, const G: i8, const T: usize>(
    q: __m256i,
    sc: __m256i,
    xs: &[*const i8; T],
    isum: &mut [__m256i; T],
) {
    // SAFETY: every xs[t] has 256 bytes; offset 128H + 32J + 32 ≤ 256.
    unsafe {
        let m3 = _mm256_set1_epi8(3);
        let q2 = _mm256_and_si256(
            match J {
                0 => q,
                1 => _mm256_srli_epi16::<2>(q),
                2 => _mm256_srli_epi16::<4>(q),
                _ => _mm256_srli_epi16::<6>(q),
            },
            m3,
        );
        let s = _mm256_shuffle_epi8(sc, pair_pattern::<G>());
        for t in 0..T {
            let x8 = _mm256_loadu_si256(xs[t].add(128 * H + 32 * J as usize) as *const __m256i);
            let p = _mm256_maddubs_epi16(q2, x8);
            isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p, s));
        }
    }
}

/// One Q2_K row against `T` tokens (`xs[t]`: `nb` Q8_K blocks each). Per token the integer
/// sums are the exact sums of [`dot`] and the per-block f32 expression is the same, so
/// each `out[t]` is bit-identical to `dot(row, token t)`.
///
/// # Safety
/// Requires AVX2 and F16C; `row.len() == 84·nb`, each `xs[t]` valid for `nb` blocks,
/// `out.len() >= T`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_multi_row<const T: usize>(row: &[u8], xs: &[*const BlockQ8K; T], out: &mut [f32]) {
    let nb = row.len() / BLOCK_BYTES;
    let mut acc = [0f32; T];
    let m4 = _mm_set1_epi8(15);
    // SAFETY: per the preconditions.
    unsafe {
        for i in 0..nb {
            let bp = row.as_ptr().add(i * BLOCK_BYTES);
            let s16 = _mm_loadu_si128(bp as *const __m128i);
            let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(s16), m4));
            let sc128 = _mm_and_si128(s16, m4);
            let sc = _mm256_set_m128i(sc128, sc128);
            let q0 = _mm256_loadu_si256(bp.add(16) as *const __m256i);
            let q1 = _mm256_loadu_si256(bp.add(48) as *const __m256i);
            let xq: [*const i8; T] = std::array::from_fn(|t| (*xs[t].add(i)).qs.as_ptr());
            let mut isum = [_mm256_setzero_si256(); T];
            step_multi::<0, 0, 0, T>(q0, sc, &xq, &mut isum);
            step_multi::<0, 1, 2, T>(q0, sc, &xq, &mut isum);
            step_multi::<0, 2, 4, T>(q0, sc, &xq, &mut isum);
            step_multi::<0, 3, 6, T>(q0, sc, &xq, &mut isum);
            step_multi::<1, 0, 8, T>(q1, sc, &xq, &mut isum);
            step_multi::<1, 1, 10, T>(q1, sc, &xq, &mut isum);
            step_multi::<1, 2, 12, T>(q1, sc, &xq, &mut isum);
            step_multi::<1, 3, 14, T>(q1, sc, &xq, &mut isum);
            let dw = f16_to_f32(u16::from_le_bytes([*bp.add(80), *bp.add(81)]));
            let dm = f16_to_f32(u16::from_le_bytes([*bp.add(82), *bp.add(83)]));
            for t in 0..T {
                let x = &*xs[t].add(i);
                let bs = _mm256_loadu_si256(x.bsums.as_ptr() as *const __m256i);
                let summs = hsum_i32(_mm256_madd_epi16(mins, bs));
                let isum = hsum_i32(isum[t]);
                let d = x.d * dw;
                let dmin = x.d * dm;
                acc[t] += d * isum as f32 - dmin * summs as f32;
            }
        }
    }
    out[..T].copy_from_slice(&acc);
}

/// [`dot_multi_row`] over consecutive rows of `rb` bytes in `rows`: `out[r·T + t]`.
///
/// # Safety
/// As [`dot_multi_row`] for every row; `rows.len()` a multiple of `rb`,
/// `out.len() >= T·rows`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_multi<const T: usize>(
    rows: &[u8],
    rb: usize,
    xs: [*const BlockQ8K; T],
    out: &mut [f32],
) {
    for (r, row) in rows.chunks_exact(rb).enumerate() {
        // SAFETY: forwarded preconditions.
        unsafe { dot_multi_row::<T>(row, &xs, &mut out[r * T..(r + 1) * T]) }
    }
}
