//! GGUF v3 container: zero-copy reader over memmap2 and a writer.
//!
//! Format: magic "GGUF", u32 version (3), u64 tensor count, u64 metadata count, metadata
//! entries (string key, u32 type, value), tensor directory (string name, u32 n_dims, u64 dims,
//! u32 type, u64 offset into the data section), padding to `general.alignment` (default 32),
//! then tensor data. Strings are u64 length + UTF-8 bytes; everything little-endian.

mod reader;
mod value;
mod writer;

use std::path::Path;

pub use reader::{GgufFile, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC};
pub use value::{Value, ValueType};
pub use writer::{GgufWriter, TensorSpec};

/// Why a GGUF file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The bytes do not form a valid GGUF file; `offset` is where the problem was found.
    #[error("malformed GGUF at byte {offset}: {msg}")]
    Format { offset: u64, msg: String },
    /// The writer was asked to write something GGUF cannot hold.
    #[error("cannot write GGUF: {0}")]
    Invalid(String),
}

impl GgufError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> GgufError {
        GgufError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn format(offset: impl TryInto<u64>, msg: String) -> GgufError {
        GgufError::Format {
            offset: offset.try_into().unwrap_or(u64::MAX),
            msg,
        }
    }
}
