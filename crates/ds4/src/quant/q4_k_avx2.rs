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

/// SIMD twin of `q4_k::dequantize`: `(d·sc)·q − (dmin·m)` with the scalar products formed
/// in f32 exactly as the twin does (one multiply, then one subtract; no FMA), hence
/// bit-identical.
///
/// # Safety
/// Requires AVX2 and F16C; whole blocks (`src.len() / 144 == dst.len() / 256`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(256)) {
        // SAFETY: b has 144 bytes, out 256 floats.
        unsafe {
            let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            let dmin = f16_to_f32(u16::from_le_bytes([b[2], b[3]]));
            let scales = &b[4..16];
            let o = out.as_mut_ptr();
            let m15 = _mm256_set1_epi32(15);
            for c in 0..4 {
                let (s0, m0) = scale_min(scales, 2 * c);
                let (s1, m1) = scale_min(scales, 2 * c + 1);
                let dl0 = _mm256_set1_ps(d * s0 as f32);
                let ml0 = _mm256_set1_ps(dmin * m0 as f32);
                let dl1 = _mm256_set1_ps(d * s1 as f32);
                let ml1 = _mm256_set1_ps(dmin * m1 as f32);
                for k in 0..4 {
                    let q = _mm_loadl_epi64(b.as_ptr().add(16 + 32 * c + 8 * k) as *const __m128i);
                    let w = _mm256_cvtepu8_epi32(q);
                    let lo = _mm256_cvtepi32_ps(_mm256_and_si256(w, m15));
                    let hi = _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(w));
                    let ol = o.add(64 * c + 8 * k);
                    _mm256_storeu_ps(ol, _mm256_sub_ps(_mm256_mul_ps(dl0, lo), ml0));
                    _mm256_storeu_ps(ol.add(32), _mm256_sub_ps(_mm256_mul_ps(dl1, hi), ml1));
                }
            }
        }
    }
}

/// One Q4_K row against `T` tokens (`xs[t]`: `nb` Q8_K blocks each): nibbles and scales are
/// unpacked once per block; per token the integer sums and the f32 expression are those of
/// [`dot`], so each `out[t]` is bit-identical to `dot(row, token t)`.
///
/// # Safety
/// Requires AVX2 and F16C; `row.len() == 144·nb`, each `xs[t]` valid for `nb` blocks,
/// `out.len() >= T`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_multi_row<const T: usize>(row: &[u8], xs: &[*const BlockQ8K; T], out: &mut [f32]) {
    let nb = row.len() / BLOCK_BYTES;
    let mut acc = [0f32; T];
    let m4 = _mm256_set1_epi8(15);
    // SAFETY: per the preconditions.
    unsafe {
        for i in 0..nb {
            let b = &row[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES];
            let scales = &b[4..16];
            let mut sc = [0i16; 8];
            let mut mn = [0i32; 8];
            for s in 0..8 {
                let (c, m) = scale_min(scales, s);
                sc[s] = c as i16;
                mn[s] = m as i32;
            }
            let mut isum = [_mm256_setzero_si256(); T];
            for c in 0..4 {
                let q = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * c) as *const __m256i);
                let lo = _mm256_and_si256(q, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                let sl = _mm256_set1_epi16(sc[2 * c]);
                let sh = _mm256_set1_epi16(sc[2 * c + 1]);
                for t in 0..T {
                    let xp = (*xs[t].add(i)).qs.as_ptr();
                    let xl = _mm256_loadu_si256(xp.add(64 * c) as *const __m256i);
                    let xh = _mm256_loadu_si256(xp.add(64 * c + 32) as *const __m256i);
                    let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), sl);
                    let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), sh);
                    isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(pl, ph));
                }
            }
            let dw = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            let dm = f16_to_f32(u16::from_le_bytes([b[2], b[3]]));
            for t in 0..T {
                let x = &*xs[t].add(i);
                let mut summs = 0i32;
                for s in 0..8 {
                    summs += mn[s] * (x.bsums[2 * s] as i32 + x.bsums[2 * s + 1] as i32);
                }
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
