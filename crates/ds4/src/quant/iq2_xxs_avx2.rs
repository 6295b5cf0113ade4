//! AVX2 twins of `iq2_xxs::dot_scalar` and `iq2_xxs::dequantize`.
//!
//! Dot, per super-block (8 groups of 32 elements):
//! * the 8 sign words `w` are gathered into one register; the 32 seven-bit sign indices
//!   are spread into bytes and completed with their parity bit in SIMD (this is exactly
//!   `KSIGNS_IQ2XS[i] = i | parity(i) << 7`, checked by a unit test), so no table lookups
//!   or scalar shifts are needed for signs; the 8 scales `2·ls+1` are likewise built once
//!   as i16 lanes and broadcast per group with one `pshufb`;
//! * per group the four grid rows are four u64 table loads combined into one register and
//!   the sign mask (0xFF where negated) turns them into signed bytes `gs` ∈ [-43, 43];
//! * the product uses `maddubs(|q8|, sign(gs, q8))`: `|q8|` read as unsigned is exact for
//!   every i8 including -128 (→ 128), and `sign(gs, q8)` carries the sign of q8 onto the
//!   (small) weight, so no value ever overflows i8; pairs are ≤ 2·128·43 < 2^15.
//!
//! The integer sums are exact and the f32 expression is the scalar one, so the result is
//! bit-identical to the scalar twin for every input (no reliance on q8 ≠ -128).

use super::fdot_avx2::{f16_to_f32, hsum_i32};
use super::iq2_tables::{IQ2XXS_GRID, KSIGNS_IQ2XS};
use super::iq2_xxs::{group_words, BLOCK_BYTES};
use super::q8_k::BlockQ8K;
use std::arch::x86_64::*;

/// Per super-block constants derived from the 8 sign words: `signs` holds, for group g,
/// the four KSIGNS bytes in dword g of each 128-bit half's view (see [`SignScale::new`]);
/// `scales` holds `2·ls+1` as i16 in both halves.
struct SignScale {
    /// Groups 0..3: dword g (both halves) = the 4 sign bytes of group g.
    signs_lo: __m256i,
    /// Groups 4..7, same layout.
    signs_hi: __m256i,
    /// Word `SCALE_POS[g]` of each half = `2·ls_g + 1`.
    scales: __m256i,
}

/// Word position of group g's scale inside each half of `SignScale::scales`.
const SCALE_POS: [usize; 8] = [0, 1, 4, 5, 2, 3, 6, 7];

impl SignScale {
    /// `b` points at the 66-byte block.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn new(b: *const u8) -> SignScale {
        // SAFETY: b..b+66 is readable (caller); loads are unaligned.
        unsafe {
            let g0 = _mm256_loadu_si256(b.add(2) as *const __m256i); // groups 0..3
            let g1 = _mm256_loadu_si256(b.add(34) as *const __m256i); // groups 4..7
                                                                      // Odd dwords are the sign words: [w0,w1,w4,w5 | w2,w3,w6,w7].
            let w = _mm256_castps_si256(_mm256_shuffle_ps::<0b11_01_11_01>(
                _mm256_castsi256_ps(g0),
                _mm256_castsi256_ps(g1),
            ));
            // Byte l of each dword = bits 7l..7l+6 of w.
            let m7 = _mm256_set1_epi32(0x7f);
            let t = _mm256_or_si256(
                _mm256_or_si256(
                    _mm256_and_si256(w, m7),
                    _mm256_and_si256(_mm256_slli_epi32::<1>(w), _mm256_set1_epi32(0x7f00)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_slli_epi32::<2>(w), _mm256_set1_epi32(0x7f_0000)),
                    _mm256_and_si256(_mm256_slli_epi32::<3>(w), _mm256_set1_epi32(0x7f00_0000)),
                ),
            );
            // Parity of each byte lands in its bit 0 (bits shifted in from the next byte
            // only reach bits ≥ 4, ≥ 2, ≥ 1 of the three steps and never bit 0).
            let mut p = _mm256_xor_si256(t, _mm256_srli_epi32::<4>(t));
            p = _mm256_xor_si256(p, _mm256_srli_epi32::<2>(p));
            p = _mm256_xor_si256(p, _mm256_srli_epi32::<1>(p));
            let par = _mm256_slli_epi32::<7>(_mm256_and_si256(p, _mm256_set1_epi8(1)));
            let s = _mm256_or_si256(t, par);
            // Qwords of s: (g0,g1), (g4,g5), (g2,g3), (g6,g7).
            let signs_lo = _mm256_permute4x64_epi64::<0b10_00_10_00>(s);
            let signs_hi = _mm256_permute4x64_epi64::<0b11_01_11_01>(s);
            // Scales 2·(w>>28)+1 as i16: pack gives halves [l0,l1,l4,l5,..] and
            // [l2,l3,l6,l7,..]; the permute puts [l0,l1,l4,l5,l2,l3,l6,l7] in both.
            let ls = _mm256_or_si256(
                _mm256_slli_epi32::<1>(_mm256_srli_epi32::<28>(w)),
                _mm256_set1_epi32(1),
            );
            let packed = _mm256_packus_epi32(ls, ls);
            let scales = _mm256_permute4x64_epi64::<0b10_00_10_00>(packed);
            SignScale {
                signs_lo,
                signs_hi,
                scales,
            }
        }
    }

    /// 0xFF where element k of group `g` is negated.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn neg_mask<const G: usize>(&self) -> __m256i {
        // Replicate sign byte l of dword G' to the 8 bytes of element row l.
        let s = if G < 4 { self.signs_lo } else { self.signs_hi };
        let o = 4 * (G % 4) as i8;
        let rep = _mm256_setr_epi8(
            o,
            o,
            o,
            o,
            o,
            o,
            o,
            o,
            o + 1,
            o + 1,
            o + 1,
            o + 1,
            o + 1,
            o + 1,
            o + 1,
            o + 1,
            o + 2,
            o + 2,
            o + 2,
            o + 2,
            o + 2,
            o + 2,
            o + 2,
            o + 2,
            o + 3,
            o + 3,
            o + 3,
            o + 3,
            o + 3,
            o + 3,
            o + 3,
            o + 3,
        );
        // pshufb indexes within each half; both halves hold the same four dwords.
        let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let b = _mm256_shuffle_epi8(s, rep);
        _mm256_cmpeq_epi8(_mm256_and_si256(b, bits), bits)
    }

    /// `2·ls+1` of group G broadcast to 16 i16 lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn scale<const G: usize>(&self) -> __m256i {
        let p = 2 * SCALE_POS[G] as i8;
        _mm256_shuffle_epi8(
            self.scales,
            _mm256_set1_epi16(((p + 1) as i16) << 8 | p as i16),
        )
    }
}

/// The 32 grid magnitudes of group `G` (bytes, element order): four broadcast loads
/// blended together (loads and blends, no shuffle-port inserts).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn grid<const G: usize>(b: *const u8) -> __m256i {
    // SAFETY: b..b+66 readable; the four index bytes of group G are b[2+8G..2+8G+4].
    unsafe {
        let q = b.add(2 + 8 * G);
        let g =
            |l: usize| _mm256_set1_epi64x(*IQ2XXS_GRID.get_unchecked(*q.add(l) as usize) as i64);
        let g01 = _mm256_blend_epi32::<0b0000_1100>(g(0), g(1));
        let g23 = _mm256_blend_epi32::<0b1100_0000>(g(2), g(3));
        _mm256_blend_epi32::<0b1111_0000>(g01, g23)
    }
}

/// Group G's contribution `(2·ls+1)·Σ grid·sign·q8` as 8 i32 lanes. `ANY_Q8`: the q8
/// values may include -128 (exact `|q8|`/`sign` form); otherwise they are known to lie in
/// [-127, 127] and the sign is applied to q8 directly (one instruction fewer).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn group<const G: usize, const ANY_Q8: bool>(
    b: *const u8,
    x: *const i8,
    ss: &SignScale,
) -> __m256i {
    // SAFETY: as in `grid`; x has 256 bytes.
    unsafe {
        let neg = ss.neg_mask::<G>();
        let g = grid::<G>(b);
        let x8 = _mm256_loadu_si256(x.add(32 * G) as *const __m256i);
        let p = if ANY_Q8 {
            let gs = _mm256_sub_epi8(_mm256_xor_si256(g, neg), neg);
            _mm256_maddubs_epi16(_mm256_abs_epi8(x8), _mm256_sign_epi8(gs, x8))
        } else {
            let s = _mm256_or_si256(neg, _mm256_set1_epi8(1));
            _mm256_maddubs_epi16(g, _mm256_sign_epi8(x8, s))
        };
        _mm256_madd_epi16(p, ss.scale::<G>())
    }
}

/// Any Q8_K input (q8 may be -128).
///
/// # Safety
/// Requires AVX2 and F16C (checked by the dispatcher); `row.len() == 66 · xq.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot(row: &[u8], xq: &[BlockQ8K]) -> f32 {
    unsafe { dot_impl::<true>(row, xq) }
}

/// Q8_K input whose q8 values are all in [-127, 127] (what `quantize_act_q8_k` produces).
///
/// # Safety
/// As [`dot`], plus the q8 range precondition (otherwise the result is wrong, not UB).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_no_m128(row: &[u8], xq: &[BlockQ8K]) -> f32 {
    unsafe { dot_impl::<false>(row, xq) }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_impl<const ANY_Q8: bool>(row: &[u8], xq: &[BlockQ8K]) -> f32 {
    debug_assert_eq!(row.len(), BLOCK_BYTES * xq.len());
    let mut acc = 0.0f32;
    for (b, x) in row.chunks_exact(BLOCK_BYTES).zip(xq) {
        let bp = b.as_ptr();
        let xp = x.qs.as_ptr();
        // SAFETY: bp has 66 bytes, xp 256.
        let total = unsafe {
            let ss = SignScale::new(bp);
            let s01 = _mm256_add_epi32(
                group::<0, ANY_Q8>(bp, xp, &ss),
                group::<1, ANY_Q8>(bp, xp, &ss),
            );
            let s23 = _mm256_add_epi32(
                group::<2, ANY_Q8>(bp, xp, &ss),
                group::<3, ANY_Q8>(bp, xp, &ss),
            );
            let s45 = _mm256_add_epi32(
                group::<4, ANY_Q8>(bp, xp, &ss),
                group::<5, ANY_Q8>(bp, xp, &ss),
            );
            let s67 = _mm256_add_epi32(
                group::<6, ANY_Q8>(bp, xp, &ss),
                group::<7, ANY_Q8>(bp, xp, &ss),
            );
            hsum_i32(_mm256_add_epi32(
                _mm256_add_epi32(s01, s23),
                _mm256_add_epi32(s45, s67),
            ))
        };
        let d = unsafe { f16_to_f32(u16::from_le_bytes([b[0], b[1]])) };
        acc += 0.125 * d * x.d * total as f32;
    }
    acc
}

/// SIMD twin of `iq2_xxs::dequantize`: `db·grid` in f32 with `db` formed exactly as the
/// scalar code does, then negation as a sign-bit flip (what scalar `-v` is, NaN
/// included), hence bit-identical.
///
/// # Safety
/// Requires AVX2 and F16C; whole blocks (`src.len() / 66 == dst.len() / 256`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequantize(src: &[u8], dst: &mut [f32]) {
    // Lane k shifted left by 31-k moves sign bit k to the f32 sign position.
    let shifts = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
    let sign = _mm256_set1_epi32(i32::MIN);
    for (b, out) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(256)) {
        // SAFETY: b has 66 bytes, out 256 floats.
        unsafe {
            let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            let o = out.as_mut_ptr();
            for ib in 0..8 {
                let (a, w) = group_words(b, ib);
                let db = _mm256_set1_ps(d * (0.5 + (w >> 28) as f32) * 0.25);
                for l in 0..4 {
                    let g = *IQ2XXS_GRID.get_unchecked(((a >> (8 * l)) & 255) as usize);
                    let s = *KSIGNS_IQ2XS.get_unchecked(((w >> (7 * l)) & 127) as usize);
                    let v = _mm256_mul_ps(
                        db,
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(g as i64))),
                    );
                    let m = _mm256_and_si256(
                        _mm256_sllv_epi32(_mm256_set1_epi32(s as i32), shifts),
                        sign,
                    );
                    _mm256_storeu_ps(
                        o.add(32 * ib + 8 * l),
                        _mm256_xor_ps(v, _mm256_castsi256_ps(m)),
                    );
                }
            }
        }
    }
}

/// [`group`] (no -128 form) for `T` tokens: grid, signs and scale are formed once.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn group_multi<const G: usize, const T: usize>(
    b: *const u8,
    xs: &[*const i8; T],
    ss: &SignScale,
    tot: &mut [__m256i; T],
) {
    // SAFETY: as in `grid`; every xs[t] has 256 bytes.
    unsafe {
        let neg = ss.neg_mask::<G>();
        let g = grid::<G>(b);
        let s = _mm256_or_si256(neg, _mm256_set1_epi8(1));
        let sc = ss.scale::<G>();
        for t in 0..T {
            let x8 = _mm256_loadu_si256(xs[t].add(32 * G) as *const __m256i);
            let p = _mm256_maddubs_epi16(g, _mm256_sign_epi8(x8, s));
            tot[t] = _mm256_add_epi32(tot[t], _mm256_madd_epi16(p, sc));
        }
    }
}

/// One IQ2_XXS row against `T` tokens whose q8 values all lie in [-127, 127] (`xs[t]`:
/// `nb` Q8_K blocks each). The block's grid rows, signs and scales are decoded once for
/// all tokens; per token the integer total is the exact sum of [`dot_no_m128`] and the f32
/// expression is the same, so each `out[t]` is bit-identical to it.
///
/// # Safety
/// Requires AVX2 and F16C; `row.len() == 66·nb`, each `xs[t]` valid for `nb` blocks,
/// `out.len() >= T`; the q8 range precondition of [`dot_no_m128`].
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_no_m128_multi_row<const T: usize>(
    row: &[u8],
    xs: &[*const BlockQ8K; T],
    out: &mut [f32],
) {
    let nb = row.len() / BLOCK_BYTES;
    let mut acc = [0f32; T];
    // SAFETY: per the preconditions.
    unsafe {
        for i in 0..nb {
            let bp = row.as_ptr().add(i * BLOCK_BYTES);
            let ss = SignScale::new(bp);
            let xq: [*const i8; T] = std::array::from_fn(|t| (*xs[t].add(i)).qs.as_ptr());
            let mut tot = [_mm256_setzero_si256(); T];
            group_multi::<0, T>(bp, &xq, &ss, &mut tot);
            group_multi::<1, T>(bp, &xq, &ss, &mut tot);
            group_multi::<2, T>(bp, &xq, &ss, &mut tot);
            group_multi::<3, T>(bp, &xq, &ss, &mut tot);
            group_multi::<4, T>(bp, &xq, &ss, &mut tot);
            group_multi::<5, T>(bp, &xq, &ss, &mut tot);
            group_multi::<6, T>(bp, &xq, &ss, &mut tot);
            group_multi::<7, T>(bp, &xq, &ss, &mut tot);
            let d = f16_to_f32(u16::from_le_bytes([*bp, *bp.add(1)]));
            for t in 0..T {
                let x = &*xs[t].add(i);
                acc[t] += 0.125 * d * x.d * hsum_i32(tot[t]) as f32;
            }
        }
    }
    out[..T].copy_from_slice(&acc);
}

/// [`dot_no_m128_multi_row`] over consecutive rows of `rb` bytes in `rows`: `out[r·T + t]`.
///
/// # Safety
/// As [`dot_no_m128_multi_row`] for every row; `rows.len()` a multiple of `rb`,
/// `out.len() >= T·rows`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_no_m128_multi<const T: usize>(
    rows: &[u8],
    rb: usize,
    xs: [*const BlockQ8K; T],
    out: &mut [f32],
) {
    for (r, row) in rows.chunks_exact(rb).enumerate() {
        // SAFETY: forwarded preconditions.
        unsafe { dot_no_m128_multi_row::<T>(row, &xs, &mut out[r * T..(r + 1) * T]) }
    }
}
