//! Q4_K: 256 elements in 144 bytes (model.md §5):
//! `[f16 d][f16 dmin][scales u8; 12][qs u8; 128]`; eight sub-blocks of 32 with 6-bit
//! scale/min packed into the 12 scale bytes; chunk c (64 elements) keeps sub-block 2c in
//! the low nibbles of `qs[32c..32c+32]` and sub-block 2c+1 in the high nibbles.

use super::kfit;
use super::q8_k::{BlockQ8K, QK_K};
use half::f16;

pub(crate) const BLOCK_BYTES: usize = 144;

#[inline]
fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Unpacks the 6-bit (scale, min) of sub-block `s` from the 12 scale bytes.
#[inline]
pub(crate) fn scale_min(scales: &[u8], s: usize) -> (u8, u8) {
    if s < 4 {
        (scales[s] & 63, scales[s + 4] & 63)
    } else {
        (
            (scales[s + 4] & 15) | ((scales[s - 4] >> 6) << 4),
            (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4),
        )
    }
}

/// Inverse of [`scale_min`] for all eight sub-blocks (values must be < 64).
pub(crate) fn pack_scales(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
    }
    s
}

/// `w = (d·sc)·q − (dmin·m)`, products in gguf-py's order for bit-exactness.
pub(crate) fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(QK_K))
    {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let scales = &b[4..16];
        let qs = &b[16..144];
        for s in 0..8 {
            let (sc, m) = scale_min(scales, s);
            let dl = d * sc as f32;
            let ml = dmin * m as f32;
            let c = s / 2;
            let shift = 4 * (s % 2);
            for l in 0..32 {
                let q = (qs[32 * c + l] >> shift) & 15;
                out[32 * s + l] = dl * q as f32 - ml;
            }
        }
    }
}

/// Scalar Q4_K × Q8_K: `d_x·[d·Σ_s sc_s·Σ q4·q8 − dmin·Σ_s m_s·(bsum_2s + bsum_2s+1)]`.
pub(crate) fn dot_scalar(row: &[u8], xq: &[BlockQ8K]) -> f32 {
    let mut acc = 0.0f32;
    for (b, x) in row.chunks_exact(BLOCK_BYTES).zip(xq) {
        let scales = &b[4..16];
        let qs = &b[16..144];
        let mut summs = 0i32;
        let mut isum = 0i32;
        for s in 0..8 {
            let (sc, m) = scale_min(scales, s);
            summs += m as i32 * (x.bsums[2 * s] as i32 + x.bsums[2 * s + 1] as i32);
            let c = s / 2;
            let shift = 4 * (s % 2);
            let mut si = 0i32;
            for l in 0..32 {
                si += ((qs[32 * c + l] >> shift) & 15) as i32 * x.qs[32 * s + l] as i32;
            }
            isum += sc as i32 * si;
        }
        let d = x.d * f16_at(b, 0);
        let dmin = x.d * f16_at(b, 2);
        acc += d * isum as f32 - dmin * summs as f32;
    }
    acc
}

/// Weight quantizer: per-sub-block least-squares fit (see `kfit`), 6-bit scales/mins
/// relative to f16 super-scales, codes re-assigned against the stored parameters.
pub(crate) fn quantize(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src
        .chunks_exact(QK_K)
        .zip(dst.chunks_exact_mut(BLOCK_BYTES))
    {
        let mut scales = [0f32; 8];
        let mut offs = [0f32; 8];
        for s in 0..8 {
            (scales[s], offs[s]) = kfit::fit(&x[32 * s..32 * s + 32], 15);
        }
        let mut sc = [0u8; 8];
        let mut mn = [0u8; 8];
        let d = kfit::quantize_scales(&scales, 63, &mut sc);
        let dmin = kfit::quantize_scales(&offs, 63, &mut mn);
        b.fill(0);
        b[0..2].copy_from_slice(&d.to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&dmin.to_bits().to_le_bytes());
        b[4..16].copy_from_slice(&pack_scales(&sc, &mn));
        let (d, dmin) = (d.to_f32(), dmin.to_f32());
        for (e, &v) in x.iter().enumerate() {
            let s = e / 32;
            let q = kfit::assign(v, d * sc[s] as f32, dmin * mn[s] as f32, 15.0);
            b[16 + 32 * (s / 2) + e % 32] |= q << (4 * (s % 2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (scale, min) pair in every sub-block position survives pack → unpack.
    #[test]
    fn scale_packing_round_trips() {
        for v in 0..64u8 {
            for w in [0u8, 1, 31, 32, 62, 63] {
                let mut sc = [0u8; 8];
                let mut mn = [0u8; 8];
                for s in 0..8 {
                    sc[s] = (v + s as u8 * 7) % 64;
                    mn[s] = (w + s as u8 * 13) % 64;
                }
                let p = pack_scales(&sc, &mn);
                for s in 0..8 {
                    assert_eq!(scale_min(&p, s), (sc[s], mn[s]));
                }
            }
        }
    }
}
