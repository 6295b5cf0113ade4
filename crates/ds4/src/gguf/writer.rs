//! GGUF v3 writer.
//!
//! The writer knows the whole layout before any data is produced: metadata and tensor specs
//! are registered first, then [`GgufWriter::write`] streams the header and asks a callback to
//! fill each tensor's bytes in turn. This lets an 80 GB synthetic model be written (or built
//! in memory with [`GgufWriter::to_bytes`]) without holding more than one tensor at a time.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::reader::{align_up, tensor_bytes, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use super::value::Value;
use super::GgufError;
use crate::quant::GgmlType;

/// A tensor to be written: name, GGUF-order shape and type.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dims: &[u64], ty: GgmlType) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dims: dims.to_vec(),
            ty,
        }
    }

    /// Bytes of data this tensor takes.
    pub fn n_bytes(&self) -> Result<u64, GgufError> {
        if self.dims.is_empty() || self.dims.len() > 4 || self.dims.contains(&0) {
            return Err(GgufError::Invalid(format!(
                "tensor '{}' has shape {:?}",
                self.name, self.dims
            )));
        }
        tensor_bytes(&self.name, &self.dims, self.ty).map_err(|e| GgufError::Invalid(e.to_string()))
    }
}

/// Builder of a GGUF file.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorSpec>,
    sizes: Vec<u64>,
    alignment: Option<u64>,
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Adds a metadata entry. `general.alignment` (u32, power of two) also sets the data
    /// alignment used by the writer.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: Value) -> Result<(), GgufError> {
        let key = key.into();
        if self.metadata.iter().any(|(k, _)| *k == key) {
            return Err(GgufError::Invalid(format!(
                "metadata key '{key}' added twice"
            )));
        }
        check_value(&key, &value, 0)?;
        if key == "general.alignment" {
            match value {
                Value::U32(a) if a > 0 && a.is_power_of_two() => self.alignment = Some(a as u64),
                _ => {
                    return Err(GgufError::Invalid(
                        "general.alignment must be a power-of-two u32".into(),
                    ))
                }
            }
        }
        self.metadata.push((key, value));
        Ok(())
    }

    /// Registers a tensor; its bytes are produced later by the fill callback.
    pub fn add_tensor(&mut self, spec: TensorSpec) -> Result<(), GgufError> {
        if self.tensors.iter().any(|t| t.name == spec.name) {
            return Err(GgufError::Invalid(format!(
                "tensor '{}' added twice",
                spec.name
            )));
        }
        if spec.ty == GgmlType::Q8_K {
            return Err(GgufError::Invalid(format!(
                "tensor '{}': Q8_K is an activation format",
                spec.name
            )));
        }
        self.sizes.push(spec.n_bytes()?);
        self.tensors.push(spec);
        Ok(())
    }

    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    fn alignment(&self) -> u64 {
        self.alignment.unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// Data-section offsets of every tensor and the total data size.
    fn data_layout(&self) -> (Vec<u64>, u64) {
        let a = self.alignment();
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut at = 0u64;
        for &n in &self.sizes {
            offsets.push(at);
            at = align_up(at + n, a);
        }
        (offsets, at)
    }

    fn header(&self, offsets: &[u64]) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&GGUF_MAGIC);
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut h, k);
            h.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut h, v);
        }
        for (t, off) in self.tensors.iter().zip(offsets) {
            put_str(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&(t.ty as u32).to_le_bytes());
            h.extend_from_slice(&off.to_le_bytes());
        }
        let padded = align_up(h.len() as u64, self.alignment()) as usize;
        h.resize(padded, 0);
        h
    }

    /// Total size of the file that will be written.
    pub fn file_size(&self) -> u64 {
        let (offsets, data) = self.data_layout();
        self.header(&offsets).len() as u64 + data
    }

    /// Streams the file to `out`. `fill(i, spec, buf)` must fill `buf` (zeroed, exactly the
    /// tensor's size) with tensor `i`'s bytes.
    pub fn write<W: Write>(
        &self,
        out: &mut W,
        mut fill: impl FnMut(usize, &TensorSpec, &mut [u8]) -> Result<(), GgufError>,
    ) -> Result<u64, GgufError> {
        let io = |e| GgufError::Io {
            path: "<writer>".into(),
            source: e,
        };
        let (offsets, data_len) = self.data_layout();
        let header = self.header(&offsets);
        out.write_all(&header).map_err(io)?;
        let mut buf = Vec::new();
        let mut written = 0u64;
        for (i, t) in self.tensors.iter().enumerate() {
            let pad = offsets[i] - written;
            out.write_all(&vec![0u8; pad as usize]).map_err(io)?;
            buf.clear();
            buf.resize(self.sizes[i] as usize, 0);
            fill(i, t, &mut buf)?;
            out.write_all(&buf).map_err(io)?;
            written = offsets[i] + self.sizes[i];
        }
        out.write_all(&vec![0u8; (data_len - written) as usize])
            .map_err(io)?;
        Ok(header.len() as u64 + data_len)
    }

    /// Builds the whole file image in memory, filling tensors in place (no extra copy).
    pub fn to_bytes(
        &self,
        mut fill: impl FnMut(usize, &TensorSpec, &mut [u8]) -> Result<(), GgufError>,
    ) -> Result<Vec<u8>, GgufError> {
        let (offsets, data_len) = self.data_layout();
        let mut image = self.header(&offsets);
        let data_start = image.len();
        image.resize(data_start + data_len as usize, 0);
        for (i, t) in self.tensors.iter().enumerate() {
            let s = data_start + offsets[i] as usize;
            fill(i, t, &mut image[s..s + self.sizes[i] as usize])?;
        }
        Ok(image)
    }

    /// Builds the image in an anonymous memory map and parses it: the model lives in memory
    /// with no file, tensor data is page-aligned, and pages are zeroed lazily by the kernel
    /// (an 80 GB image is not zero-filled by one thread before `fill` runs).
    pub fn to_gguf(
        &self,
        mut fill: impl FnMut(usize, &TensorSpec, &mut [u8]) -> Result<(), GgufError>,
    ) -> Result<super::GgufFile, GgufError> {
        let (offsets, data_len) = self.data_layout();
        let header = self.header(&offsets);
        let total = header.len() + data_len as usize;
        let anon = |e| GgufError::io(Path::new("<anonymous memory>"), e);
        let mut map = memmap2::MmapMut::map_anon(total).map_err(anon)?;
        map[..header.len()].copy_from_slice(&header);
        for (i, t) in self.tensors.iter().enumerate() {
            let s = header.len() + offsets[i] as usize;
            fill(i, t, &mut map[s..s + self.sizes[i] as usize])?;
        }
        super::GgufFile::from_anon(map.make_read_only().map_err(anon)?)
    }

    /// Writes to `path` atomically: a temporary file in the same directory, fsync, rename.
    pub fn write_file(
        &self,
        path: impl AsRef<Path>,
        fill: impl FnMut(usize, &TensorSpec, &mut [u8]) -> Result<(), GgufError>,
    ) -> Result<u64, GgufError> {
        let path = path.as_ref();
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let result = (|| {
            let file = File::create(&tmp).map_err(|e| GgufError::io(&tmp, e))?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            let n = self.write(&mut w, fill).map_err(|e| match e {
                GgufError::Io { source, .. } => GgufError::io(&tmp, source),
                e => e,
            })?;
            let file = w
                .into_inner()
                .map_err(|e| GgufError::io(&tmp, e.into_error()))?;
            file.sync_all().map_err(|e| GgufError::io(&tmp, e))?;
            std::fs::rename(&tmp, path).map_err(|e| GgufError::io(path, e))?;
            Ok(n)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn check_value(key: &str, v: &Value, depth: u32) -> Result<(), GgufError> {
    if let Value::Array(elem, items) = v {
        if depth >= 4 {
            return Err(GgufError::Invalid(format!(
                "'{key}': arrays nested too deep"
            )));
        }
        for it in items {
            if it.value_type() != *elem {
                return Err(GgufError::Invalid(format!(
                    "'{key}': array of {elem:?} holds a {:?}",
                    it.value_type()
                )));
            }
            check_value(key, it, depth + 1)?;
        }
    }
    Ok(())
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.push(*x as u8),
        Value::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => h.push(*x as u8),
        Value::String(s) => put_str(h, s),
        Value::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::Array(elem, items) => {
            h.extend_from_slice(&(*elem as u32).to_le_bytes());
            h.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(h, it);
            }
        }
    }
}
