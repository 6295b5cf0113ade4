//! GGML tensor type codes as stored in GGUF files (model.md §2.3, §5).

use std::fmt;

/// The tensor element types this engine understands. Codes are GGML's.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
    Q2_K = 10,
    Q4_K = 12,
    /// Activation-only block format (never stored in model files).
    Q8_K = 15,
    IQ2_XXS = 16,
    I32 = 26,
    BF16 = 30,
}

impl GgmlType {
    /// Maps a GGUF type code to a type, `None` for codes this engine does not support.
    pub fn from_u32(code: u32) -> Option<GgmlType> {
        Some(match code {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2_K,
            12 => GgmlType::Q4_K,
            15 => GgmlType::Q8_K,
            16 => GgmlType::IQ2_XXS,
            26 => GgmlType::I32,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// Elements per block.
    pub const fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::I32 | GgmlType::BF16 => 1,
            GgmlType::Q8_0 => 32,
            GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::Q8_K | GgmlType::IQ2_XXS => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::I32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2_K => 84,
            GgmlType::Q4_K => 144,
            GgmlType::Q8_K => 292,
            GgmlType::IQ2_XXS => 66,
        }
    }

    /// Bytes of a row of `n` elements, `None` if `n` is not a whole number of blocks
    /// or the size overflows.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let be = self.block_elems() as u64;
        if !n.is_multiple_of(be) {
            return None;
        }
        (n / be).checked_mul(self.block_bytes() as u64)
    }

    /// Name as printed by GGML tools.
    pub const fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q8_K => "Q8_K",
            GgmlType::IQ2_XXS => "IQ2_XXS",
            GgmlType::I32 => "I32",
            GgmlType::BF16 => "BF16",
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
