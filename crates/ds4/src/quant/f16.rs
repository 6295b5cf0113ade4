//! F16 (IEEE binary16) and BF16 rows: decoding, encoding (model.md §5).
//!
//! Both decodings are exact widenings, so every path (scalar, F16C, dequantize-then-dot)
//! produces the same f32 values; only the accumulation order of dots can differ.

use half::{bf16, f16};

/// Decodes little-endian binary16 values. `src.len() == 2 * dst.len()`.
pub(crate) fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    }
}

/// Decodes little-endian bfloat16 values: the 16 bits become the high half of an f32,
/// which keeps NaN payloads and signed zeros.
pub(crate) fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
}

/// Decodes little-endian f32 values (`from_le_bytes` because rows need not be aligned).
pub(crate) fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Decodes little-endian i32 values, converted to the nearest f32.
pub(crate) fn dequantize_i32(src: &[u8], dst: &mut [f32]) {
    for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *o = i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32;
    }
}

/// Encodes to binary16, round to nearest even (overflow to ±inf, NaN stays NaN).
pub(crate) fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    for (x, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
        o.copy_from_slice(&f16::from_f32(*x).to_bits().to_le_bytes());
    }
}

/// Encodes to bfloat16, round to nearest even (NaN stays NaN).
pub(crate) fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    for (x, o) in src.iter().zip(dst.chunks_exact_mut(2)) {
        o.copy_from_slice(&bf16::from_f32(*x).to_bits().to_le_bytes());
    }
}

/// Encodes to little-endian f32 (a plain copy).
pub(crate) fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    for (x, o) in src.iter().zip(dst.chunks_exact_mut(4)) {
        o.copy_from_slice(&x.to_le_bytes());
    }
}

/// Encodes to little-endian i32, rounding to nearest (ties away) and saturating; NaN → 0.
pub(crate) fn quantize_i32(src: &[f32], dst: &mut [u8]) {
    for (x, o) in src.iter().zip(dst.chunks_exact_mut(4)) {
        o.copy_from_slice(&(x.round() as i32).to_le_bytes());
    }
}
