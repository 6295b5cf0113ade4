//! Random but valid tensor bytes, generated directly in the stored format.
//!
//! Quantized tensors are never produced by quantizing floats: that would cost tens of
//! floating-point operations per weight and make an 80 GB Flash image take an hour. Instead
//! the payload (quants, sub-block scales, grid indices, signs) is uniformly random bytes —
//! every byte pattern is a valid payload in these formats — and only the f16 super-block
//! scales are written on top, chosen from the analytically known spread of a random payload
//! so that the dequantized weights have the target standard deviation and mean ≈ 0
//! (the same recipe as the reference fixtures, model.md/README §1.1).

use half::f16;
use rayon::prelude::*;

use super::rng::Rng;
use crate::quant::GgmlType;

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// `mean + std · z` with `z` approximately standard normal. Quantized tensors support
    /// only `mean = 0` (their payload is symmetric by construction).
    Normal { mean: f32, std: f32 },
    /// Uniform in `[lo, hi)`.
    Uniform { lo: f32, hi: f32 },
    /// Hash-routing table `[k, rows]` (I32): every row holds `k` distinct expert ids in
    /// `[0, n_expert)`, as a trained `tid2eid` does.
    ExpertIds { n_expert: u32 },
}

/// Elements per random stream for plain (F32/F16) tensors; fixed so that the output does not
/// depend on the thread count.
const CHUNK_ELEMS: usize = 1 << 16;
/// Bytes per random stream for block-quantized tensors (rounded down to whole blocks).
const CHUNK_BYTES: usize = 1 << 20;
/// Rows per random stream for the routing table.
const CHUNK_ROWS: usize = 4096;

/// RMS of the per-block scale jitter `0.5 + u`, `u` uniform on [0, 1): sqrt(1/12 + 1). The
/// jitter gives blocks different scales, as in real files, without changing the overall std.
const JITTER_RMS: f32 = 1.040_833;

/// Where the f16 scales of a block format live and how a random payload spreads.
struct BlockFormat {
    bytes: usize,
    /// Offset of the f16 super-scale `d`.
    d_at: usize,
    /// Offset of the f16 `dmin` and its ratio to `d`, for the formats with a min term.
    dmin: Option<(usize, f32)>,
    /// Std of the dequantized value of a uniformly random payload for `d = 1`.
    payload_std: f32,
}

fn block_format(ty: GgmlType) -> Option<BlockFormat> {
    Some(match ty {
        // q: int8, random except that −128 becomes −127 (the range real quantizers emit).
        // E[q²] = (2 · Σ_{k=1}^{127} k² + 127²) / 256 = 1397889 / 256 → std 73.895.
        GgmlType::Q8_0 => BlockFormat {
            bytes: 34,
            d_at: 0,
            dmin: None,
            payload_std: 73.895,
        },
        // w = d·sc·q − dmin·m with sc, m uniform on 0..15 (nibbles of a random byte) and q
        // uniform on 0..3. dmin = 1.5·d makes E[w] = d·(7.5·1.5 − 1.5·7.5) = 0 and
        // Var(sc·q − 1.5·m) = (271.25 − 11.25²) + 2.25·(77.5 − 7.5²) = 192.5 → std 13.874.
        GgmlType::Q2_K => BlockFormat {
            bytes: 84,
            d_at: 80,
            dmin: Some((82, 1.5)),
            payload_std: 13.874,
        },
        // Same with 6-bit sc, m (uniform on 0..63 for random packed bytes; every sub-block's
        // bits come from distinct bits of the 12 scale bytes) and q on 0..15: dmin = 7.5·d
        // gives zero mean and Var(sc·q − 7.5·m) = (1333.5·77.5 − 236.25²) + 56.25·341.25
        // = 66727.5 → std 258.317.
        GgmlType::Q4_K => BlockFormat {
            bytes: 144,
            d_at: 0,
            dmin: Some((2, 7.5)),
            payload_std: 258.317,
        },
        // w = d·(0.5 + ls)/4 · g · (±1): ls uniform on 0..15, g a byte of a uniformly chosen
        // entry of GGML's 256-entry IQ2_XXS grid, sign uniform. E[((0.5+ls)/4)²] = 85.25/16;
        // the grid's bytes are 1127× 8, 556× 25, 365× 43 out of 2048, E[g²] = 534.430
        // (counted once from the table) → std sqrt(5.328125 · 534.430) = 53.362. Zero mean by
        // the symmetric signs.
        GgmlType::IQ2_XXS => BlockFormat {
            bytes: 66,
            d_at: 0,
            dmin: None,
            payload_std: 53.362,
        },
        _ => return None,
    })
}

/// Whether this type can hold a tensor drawn with `init`; `Err` says why not.
pub(crate) fn check(name: &str, ty: GgmlType, init: Init) -> Result<(), String> {
    let bad = |why: &str| Err(format!("synthetic tensor '{name}' ({ty}, {init:?}): {why}"));
    match (ty, init) {
        (GgmlType::F32 | GgmlType::F16, Init::Normal { mean, std }) => {
            if !(mean.is_finite() && std.is_finite() && std >= 0.0) {
                return bad("mean and std must be finite, std ≥ 0");
            }
            if ty == GgmlType::F16 && mean.abs() + 4.0 * std > 60000.0 {
                return bad("values would overflow f16");
            }
            Ok(())
        }
        (GgmlType::F32 | GgmlType::F16, Init::Uniform { lo, hi }) => {
            if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                return bad("bounds must be finite and ordered");
            }
            Ok(())
        }
        (GgmlType::I32, Init::ExpertIds { n_expert }) => {
            if n_expert == 0 || n_expert > i32::MAX as u32 {
                return bad("expert count out of range");
            }
            Ok(())
        }
        (_, Init::Normal { mean, std }) if block_format(ty).is_some() => {
            let f = block_format(ty).expect("checked by the guard");
            if mean != 0.0 {
                return bad("quantized random payloads are zero-mean");
            }
            if !(std.is_finite() && std > 0.0) {
                return bad("std must be positive and finite");
            }
            // Smallest and largest scale written: 0.5·base and 1.5·base·(dmin ratio).
            let base = std / (f.payload_std * JITTER_RMS);
            let top = 1.5 * base * f.dmin.map_or(1.0, |(_, r)| r);
            let (lo, hi) = (
                f16::from_bits(f16_bits(0.5 * base)),
                f16::from_bits(f16_bits(top)),
            );
            if lo.to_f32() <= 0.0 || !hi.is_finite() {
                return bad("std does not fit the f16 block scales");
            }
            Ok(())
        }
        _ => bad("no generator for this combination"),
    }
}

/// Fills `out` (the whole tensor, `[k, rows]` dims for tables) with random values.
/// `dims` are GGUF-order; `key` comes from [`super::rng::tensor_key`].
pub(crate) fn fill(
    ty: GgmlType,
    dims: &[u64],
    init: Init,
    key: u64,
    out: &mut [u8],
) -> Result<(), String> {
    match (ty, init) {
        (GgmlType::F32, Init::Normal { .. } | Init::Uniform { .. }) => {
            fill_plain(out, key, init, f32::to_le_bytes);
            Ok(())
        }
        (GgmlType::F16, Init::Normal { .. } | Init::Uniform { .. }) => {
            fill_plain(out, key, init, |v| f16_bits(v).to_le_bytes());
            Ok(())
        }
        (GgmlType::I32, Init::ExpertIds { n_expert }) => {
            let k = *dims.first().ok_or("routing table without dims")? as usize;
            if k == 0 || k > n_expert as usize {
                return Err(format!(
                    "routing table rows of {k} distinct ids out of {n_expert} experts"
                ));
            }
            fill_expert_ids(out, k, n_expert as usize, key);
            Ok(())
        }
        (_, Init::Normal { std, .. }) => {
            let f = block_format(ty).ok_or_else(|| format!("no generator for {ty}"))?;
            if !out.len().is_multiple_of(f.bytes) {
                return Err(format!(
                    "{ty} tensor of {} bytes is not whole blocks",
                    out.len()
                ));
            }
            fill_blocks(out, ty, &f, std, key);
            Ok(())
        }
        _ => Err(format!("no generator for {ty} with {init:?}")),
    }
}

/// Normal-ish values come from an Irwin-Hall sum of four random bytes: 1021 levels between
/// −3.45σ and +3.45σ, looked up in a per-tensor table of already-encoded values. Two values
/// per 64-bit draw and no arithmetic or rounding per element, which is what lets the 1 GB
/// F16 Flash embedding fill at memory speed. The discreteness (steps of σ/148) is finer than
/// f16's own resolution near σ, so nothing is lost for random weights.
const SUM4_LEVELS: usize = 4 * 255 + 1;
const SUM4_MEAN: f32 = 510.0;
/// sqrt(4 · (256² − 1) / 12).
const SUM4_STD: f32 = 147.800_54;

/// The two sums of four bytes of a 64-bit draw (bytes 0-3 and 4-7), by SIMD-within-a-register.
#[inline]
fn byte_sums(r: u64) -> (usize, usize) {
    let pairs = (r & 0x00ff_00ff_00ff_00ff) + ((r >> 8) & 0x00ff_00ff_00ff_00ff);
    let quads = (pairs & 0x0000_ffff_0000_ffff) + ((pairs >> 16) & 0x0000_ffff_0000_ffff);
    ((quads & 0xffff_ffff) as usize, (quads >> 32) as usize)
}

fn fill_plain<const W: usize>(
    out: &mut [u8],
    key: u64,
    init: Init,
    encode: impl Fn(f32) -> [u8; W] + Sync,
) {
    match init {
        Init::Normal { mean, std } => {
            let table: Vec<[u8; W]> = (0..SUM4_LEVELS)
                .map(|s| encode(mean + std * (s as f32 - SUM4_MEAN) / SUM4_STD))
                .collect();
            out.par_chunks_mut(CHUNK_ELEMS * W)
                .enumerate()
                .for_each(|(ci, chunk)| {
                    let mut rng = Rng::stream(key, ci as u64);
                    let mut pairs = chunk.chunks_exact_mut(2 * W);
                    for pair in &mut pairs {
                        let (a, b) = byte_sums(rng.next_u64());
                        pair[..W].copy_from_slice(&table[a]);
                        pair[W..].copy_from_slice(&table[b]);
                    }
                    let rest = pairs.into_remainder();
                    if !rest.is_empty() {
                        rest.copy_from_slice(&table[byte_sums(rng.next_u64()).0]);
                    }
                });
        }
        Init::Uniform { lo, hi } => {
            out.par_chunks_mut(CHUNK_ELEMS * W)
                .enumerate()
                .for_each(|(ci, chunk)| {
                    let mut rng = Rng::stream(key, ci as u64);
                    for b in chunk.chunks_exact_mut(W) {
                        b.copy_from_slice(&encode(lo + (hi - lo) * rng.unit()));
                    }
                });
        }
        Init::ExpertIds { .. } => {} // rejected by `check` and `fill`
    }
}

fn fill_expert_ids(out: &mut [u8], k: usize, n_expert: usize, key: u64) {
    out.par_chunks_mut(CHUNK_ROWS * k * 4)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let mut rng = Rng::stream(key, ci as u64);
            // Partial Fisher-Yates on an identity permutation, undone after each row so that
            // a row costs O(k) rather than O(n_expert).
            let mut perm: Vec<u32> = (0..n_expert as u32).collect();
            let mut swaps = Vec::with_capacity(k);
            for row in chunk.chunks_exact_mut(k * 4) {
                for (i, slot) in row.chunks_exact_mut(4).enumerate() {
                    let j = i + rng.below((n_expert - i) as u64) as usize;
                    perm.swap(i, j);
                    swaps.push(j);
                    slot.copy_from_slice(&(perm[i] as i32).to_le_bytes());
                }
                for (i, j) in swaps.drain(..).enumerate().rev() {
                    perm.swap(i, j);
                }
            }
        });
}

fn fill_blocks(out: &mut [u8], ty: GgmlType, f: &BlockFormat, std: f32, key: u64) {
    let base = std / (f.payload_std * JITTER_RMS);
    // 256 jitter levels 0.5 + (k + ½)/256 (mean 1, RMS = JITTER_RMS to 1e-5), encoded once:
    // a block then costs a table lookup indexed by one of its own random bytes (the low byte
    // of `d`, overwritten right after), not a draw plus an f32→f16 conversion.
    let scales: Vec<([u8; 2], [u8; 2])> = (0..256)
        .map(|k| {
            let d = base * (0.5 + (k as f32 + 0.5) / 256.0);
            let dmin = d * f.dmin.map_or(0.0, |(_, r)| r);
            (f16_bits(d).to_le_bytes(), f16_bits(dmin).to_le_bytes())
        })
        .collect();
    let chunk = (CHUNK_BYTES / f.bytes).max(1) * f.bytes;
    out.par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(ci, chunk)| {
            Rng::stream(key, ci as u64).fill_bytes(chunk);
            for block in chunk.chunks_exact_mut(f.bytes) {
                let (d, dmin) = scales[block[f.d_at] as usize];
                block[f.d_at..f.d_at + 2].copy_from_slice(&d);
                if let Some((at, _)) = f.dmin {
                    block[at..at + 2].copy_from_slice(&dmin);
                }
                if ty == GgmlType::Q8_0 {
                    // −128 → −127 without a branch (0x80 | 1 = 0x81), so the loop vectorizes.
                    for q in &mut block[2..] {
                        *q |= (*q == 0x80) as u8;
                    }
                }
            }
        });
}

fn f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sums_add_four_bytes_each() {
        let mut r = Rng::stream(9, 9);
        for _ in 0..10_000 {
            let x = r.next_u64();
            let b = x.to_le_bytes();
            let want = |bs: &[u8]| bs.iter().map(|&v| v as usize).sum::<usize>();
            assert_eq!(byte_sums(x), (want(&b[..4]), want(&b[4..])));
        }
        assert_eq!(byte_sums(u64::MAX), (1020, 1020));
    }

    #[test]
    fn expert_ids_rows_are_distinct_and_in_range() {
        let (k, n, rows) = (6usize, 13usize, 10_000usize);
        let mut out = vec![0u8; k * rows * 4];
        fill(
            GgmlType::I32,
            &[k as u64, rows as u64],
            Init::ExpertIds { n_expert: n as u32 },
            7,
            &mut out,
        )
        .unwrap();
        let mut hits = vec![0usize; n];
        for row in out.chunks_exact(k * 4) {
            let ids: Vec<i32> = row
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            for (a, &x) in ids.iter().enumerate() {
                assert!((0..n as i32).contains(&x), "{ids:?}");
                assert!(!ids[..a].contains(&x), "repeated id in {ids:?}");
                hits[x as usize] += 1;
            }
        }
        // Every expert is used, roughly equally (expected rows·k/n ≈ 4615 each).
        for (e, &h) in hits.iter().enumerate() {
            assert!((4000..5300).contains(&h), "expert {e} used {h} times");
        }
    }

    #[test]
    fn k_equal_to_n_gives_permutations() {
        let mut out = vec![0u8; 4 * 4 * 100];
        fill(
            GgmlType::I32,
            &[4, 100],
            Init::ExpertIds { n_expert: 4 },
            1,
            &mut out,
        )
        .unwrap();
        for row in out.chunks_exact(16) {
            let mut ids: Vec<i32> = row
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            ids.sort();
            assert_eq!(ids, [0, 1, 2, 3]);
        }
    }

    #[test]
    fn rejects_impossible_requests() {
        let n = Init::Normal {
            mean: 0.0,
            std: 1.0,
        };
        assert!(check("t", GgmlType::BF16, n).is_err());
        assert!(check("t", GgmlType::I32, n).is_err());
        assert!(check(
            "t",
            GgmlType::Q8_0,
            Init::Normal {
                mean: 1.0,
                std: 1.0
            }
        )
        .is_err());
        assert!(check(
            "t",
            GgmlType::Q4_K,
            Init::Normal {
                mean: 0.0,
                std: 1e9
            }
        )
        .is_err());
        assert!(check(
            "t",
            GgmlType::Q4_K,
            Init::Normal {
                mean: 0.0,
                std: 1e-12
            }
        )
        .is_err());
        assert!(check(
            "t",
            GgmlType::F16,
            Init::Normal {
                mean: 0.0,
                std: 1e5
            }
        )
        .is_err());
        assert!(check("t", GgmlType::Q2_K, Init::Uniform { lo: 0.0, hi: 1.0 }).is_err());
        assert!(check("t", GgmlType::Q2_K, n).is_ok());
        let mut out = vec![0u8; 8];
        let e = fill(
            GgmlType::I32,
            &[4, 2],
            Init::ExpertIds { n_expert: 3 },
            0,
            &mut out,
        );
        assert!(
            e.is_err(),
            "4 distinct ids out of 3 experts must be refused"
        );
    }

    #[test]
    fn plain_values_have_the_requested_moments() {
        let n = 100_000;
        let mut out = vec![0u8; n * 2];
        let init = Init::Normal {
            mean: 1.0,
            std: 0.1,
        };
        fill(GgmlType::F16, &[n as u64], init, 3, &mut out).unwrap();
        let v: Vec<f32> = out
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        let mean = v.iter().sum::<f32>() / n as f32;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n as f32).sqrt();
        assert!((mean - 1.0).abs() < 0.002, "mean {mean}");
        assert!((std - 0.1).abs() < 0.003, "std {std}");
        let mut out = vec![0u8; n * 4];
        fill(
            GgmlType::F32,
            &[n as u64],
            Init::Uniform { lo: 0.5, hi: 1.5 },
            3,
            &mut out,
        )
        .unwrap();
        for b in out.chunks_exact(4) {
            let x = f32::from_le_bytes(b.try_into().unwrap());
            assert!((0.5..1.5).contains(&x));
        }
    }

    #[test]
    fn q8_0_payload_never_holds_minus_128_and_scales_are_finite() {
        let mut out = vec![0u8; 34 * 10_000];
        fill(
            GgmlType::Q8_0,
            &[320_000],
            Init::Normal {
                mean: 0.0,
                std: 0.02,
            },
            5,
            &mut out,
        )
        .unwrap();
        let (mut s2, mut n) = (0f64, 0usize);
        for b in out.chunks_exact(34) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            assert!(d.is_finite() && d > 0.0);
            for &q in &b[2..] {
                assert_ne!(q, 0x80);
                let w = d as f64 * (q as i8) as f64;
                s2 += w * w;
                n += 1;
            }
        }
        let std = (s2 / n as f64).sqrt();
        assert!((std - 0.02).abs() < 0.02 * 0.05, "Q8_0 realized std {std}");
    }
}
