//! Zero-copy GGUF v3 reader.
//!
//! The header and tensor directory are parsed into small owned structures; tensor data is
//! never copied: [`GgufFile::tensor_data`] returns a slice of the memory map. Every size read
//! from the file is checked against the bytes actually remaining before anything is
//! allocated, so a hostile file cannot make the reader allocate more than a small multiple of
//! its own size, and every failure names what was wrong and where.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::value::{Value, ValueType};
use super::GgufError;
use crate::quant::GgmlType;

/// GGUF magic, "GGUF" little-endian.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest array nesting accepted (real files use 1).
const MAX_ARRAY_DEPTH: u32 = 4;
/// Most dimensions of a tensor (GGML's limit).
const MAX_DIMS: u32 = 4;
/// Most elements in one metadata array. The largest real arrays (vocabulary, merges) have
/// about 130k entries; the cap keeps a forged count from driving a huge allocation.
const MAX_ARRAY_LEN: u64 = 1 << 22;

/// Where the bytes of a GGUF file live.
enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the contiguous axis.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape as `[ne0, ne1, ...]` for messages.
    pub fn shape_string(&self) -> String {
        format!("{:?}", self.dims)
    }
}

/// A parsed GGUF file: metadata, tensor directory and the mapped bytes.
pub struct GgufFile {
    storage: Storage,
    path: Option<PathBuf>,
    pub version: u32,
    pub alignment: u64,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses a file. Only the header and directory are read; tensor data stays
    /// on disk until touched.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| GgufError::io(path, e))?;
        // SAFETY: the map is read-only. If another process truncates the file while it is
        // mapped, reads fault (SIGBUS); that is the documented cost of zero-copy loading and
        // the same contract every mmap-based model loader has.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| GgufError::io(path, e))?;
        let mut g = GgufFile::parse(Storage::Mmap(mmap))?;
        g.path = Some(path.to_path_buf());
        Ok(g)
    }

    /// Parses a GGUF image held in memory. Tensor data is only as aligned as the vector's
    /// allocation; [`GgufWriter::to_gguf`](super::GgufWriter::to_gguf) builds page-aligned
    /// images for in-process models.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        GgufFile::parse(Storage::Owned(bytes))
    }

    /// Parses an image built in an anonymous memory map (page-aligned).
    pub(crate) fn from_anon(map: memmap2::Mmap) -> Result<GgufFile, GgufError> {
        GgufFile::parse(Storage::Mmap(map))
    }

    fn parse(storage: Storage) -> Result<GgufFile, GgufError> {
        let bytes = storage.bytes();
        let mut c = Cursor { buf: bytes, pos: 0 };
        let magic = c.take(4, "magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::format(
                0,
                format!("bad magic {magic:02x?}: not a GGUF file (expected \"GGUF\")"),
            ));
        }
        let version = c.u32("version")?;
        if version != 3 {
            return Err(GgufError::format(
                4,
                format!("unsupported GGUF version {version} (only version 3 is supported)"),
            ));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // Each metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes, each
        // tensor entry at least 8 + 4 + 8 + 4 + 8 bytes.
        c.check_count(n_kv, 13, "metadata entries")?;
        c.check_count(n_tensors, 32, "tensor entries")?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut meta_index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let at = c.pos;
            let key = c.string(&format!("key of metadata entry {i}"))?;
            let code = c.u32(&format!("type of metadata key '{key}'"))?;
            let ty = ValueType::from_u32(code).ok_or_else(|| {
                GgufError::format(
                    c.pos - 4,
                    format!("metadata key '{key}' has unknown value type {code}"),
                )
            })?;
            let value = c.value(ty, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::format(
                    at,
                    format!("metadata key '{key}' appears twice"),
                ));
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => match metadata[i].1 {
                Value::U32(a) if a > 0 && a.is_power_of_two() => a as u64,
                ref v => {
                    return Err(GgufError::format(
                        0,
                        format!("general.alignment must be a power-of-two u32, found {v}"),
                    ))
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let at = c.pos;
            let name = c.string(&format!("name of tensor {i}"))?;
            let n_dims = c.u32(&format!("dimension count of tensor '{name}'"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::format(
                    c.pos - 4,
                    format!("tensor '{name}' has {n_dims} dimensions (1..={MAX_DIMS} allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                let ne = c.u64(&format!("dimension {d} of tensor '{name}'"))?;
                if ne == 0 {
                    return Err(GgufError::format(
                        c.pos - 8,
                        format!("tensor '{name}' has a zero-sized dimension {d}"),
                    ));
                }
                dims.push(ne);
            }
            let code = c.u32(&format!("type of tensor '{name}'"))?;
            let ty = match GgmlType::from_u32(code) {
                Some(t) if t != GgmlType::Q8_K => t,
                _ => {
                    return Err(GgufError::format(
                        c.pos - 4,
                        format!("tensor '{name}' has unsupported type code {code}"),
                    ))
                }
            };
            let offset = c.u64(&format!("offset of tensor '{name}'"))?;
            let n_bytes = tensor_bytes(&name, &dims, ty).map_err(|e| match e {
                GgufError::Format { msg, .. } => GgufError::format(at, msg),
                e => e,
            })?;
            if !offset.is_multiple_of(alignment) {
                return Err(GgufError::format(
                    c.pos - 8,
                    format!(
                        "tensor '{name}' data offset {offset} is not a multiple of the alignment {alignment}"
                    ),
                ));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::format(
                    at,
                    format!("tensor '{name}' appears twice"),
                ));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_bytes,
            });
        }

        let data_start = align_up(c.pos as u64, alignment);
        let file_len = bytes.len() as u64;
        if data_start > file_len && !tensors.is_empty() {
            return Err(GgufError::format(
                c.pos,
                format!("file ends before its data section (data would start at {data_start}, file has {file_len} bytes)"),
            ));
        }
        let data_len = file_len.saturating_sub(data_start);
        for t in &tensors {
            let end = t.offset.checked_add(t.n_bytes);
            if end.is_none_or(|e| e > data_len) {
                return Err(GgufError::format(
                    data_start,
                    format!(
                        "tensor '{}' ({} {}, {} bytes at data offset {}) extends past the end of the file (data section has {} bytes): truncated file?",
                        t.name, t.ty, t.shape_string(), t.n_bytes, t.offset, data_len
                    ),
                ));
            }
        }
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| tensors[i].offset);
        for w in order.windows(2) {
            let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
            if a.offset + a.n_bytes > b.offset {
                return Err(GgufError::format(
                    data_start + b.offset,
                    format!(
                        "tensors '{}' (data offset {}, {} bytes) and '{}' (data offset {}) overlap",
                        a.name, a.offset, a.n_bytes, b.name, b.offset
                    ),
                ));
            }
        }

        Ok(GgufFile {
            storage,
            path: None,
            version,
            alignment,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            data_start,
        })
    }

    /// Path the file was opened from (None for in-memory images).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Total size of the file image in bytes.
    pub fn file_size(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    /// Offset of the data section from the start of the file.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// Array of strings (e.g. `tokenizer.ggml.tokens`); `None` if absent, an error if it
    /// is present with another type.
    pub fn get_string_array(&self, key: &str) -> Result<Option<Vec<&str>>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let wrong = || {
            GgufError::format(
                0,
                format!("metadata key '{key}' is not an array of strings"),
            )
        };
        let items = v.as_array().ok_or_else(wrong)?;
        items
            .iter()
            .map(|v| v.as_str().ok_or_else(wrong))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// The tensor directory, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Directory entry of a tensor.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor, straight from the map.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_start + info.offset) as usize;
        &self.storage.bytes()[start..start + info.n_bytes as usize]
    }

    /// Directory entry and bytes of a tensor by name.
    pub fn tensor(&self, name: &str) -> Option<(&TensorInfo, &[u8])> {
        let info = self.tensor_info(name)?;
        Some((info, self.tensor_data(info)))
    }
}

/// Bytes taken by a tensor of this shape and type, with overflow and block checks.
pub(crate) fn tensor_bytes(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64, GgufError> {
    if !dims[0].is_multiple_of(ty.block_elems() as u64) {
        return Err(GgufError::format(
            0,
            format!(
                "tensor '{name}': first dimension {} is not a multiple of the {} block size {}",
                dims[0],
                ty,
                ty.block_elems()
            ),
        ));
    }
    ty.row_bytes(dims[0])
        .and_then(|row| dims[1..].iter().try_fold(row, |acc, &d| acc.checked_mul(d)))
        .ok_or_else(|| {
            GgufError::format(
                0,
                format!("tensor '{name}': size of shape {dims:?} overflows"),
            )
        })
}

pub(crate) fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Bounds-checked little-endian reader over the file image.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        if (n as u64) > self.remaining() {
            return Err(GgufError::format(
                self.pos,
                format!(
                    "file truncated while reading {what} (needs {n} bytes, {} left)",
                    self.remaining()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Rejects a count of items that cannot fit in the remaining bytes.
    fn check_count(&self, count: u64, min_item_bytes: u64, what: &str) -> Result<(), GgufError> {
        if count.saturating_mul(min_item_bytes) > self.remaining() {
            return Err(GgufError::format(
                self.pos,
                format!(
                    "absurd count of {what}: {count} (only {} bytes left in the file)",
                    self.remaining()
                ),
            ));
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(GgufError::format(
                at,
                format!(
                    "{what}: string length {len} exceeds the {} bytes left in the file",
                    self.remaining()
                ),
            ));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| GgufError::format(at + 8, format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(key)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(key)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(key)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(key)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            ValueType::Bool => {
                let at = self.pos;
                match self.array::<1>(key)?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => {
                        return Err(GgufError::format(
                            at,
                            format!("metadata key '{key}': invalid bool byte {b}"),
                        ))
                    }
                }
            }
            ValueType::String => {
                Value::String(self.string(&format!("value of metadata key '{key}'"))?)
            }
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::format(
                        self.pos,
                        format!(
                            "metadata key '{key}': arrays nested deeper than {MAX_ARRAY_DEPTH}"
                        ),
                    ));
                }
                let code = self.u32(key)?;
                let elem = ValueType::from_u32(code).ok_or_else(|| {
                    GgufError::format(
                        self.pos - 4,
                        format!("metadata key '{key}': array of unknown element type {code}"),
                    )
                })?;
                let n = self.u64(key)?;
                if n > MAX_ARRAY_LEN {
                    return Err(GgufError::format(
                        self.pos - 8,
                        format!("metadata key '{key}': array of {n} elements exceeds the limit of {MAX_ARRAY_LEN}"),
                    ));
                }
                self.check_count(
                    n,
                    elem.min_encoded_len(),
                    &format!("elements in array '{key}'"),
                )?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}
