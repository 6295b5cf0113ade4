//! GGUF reader/writer: round trips, the fixture files, and malformed input.

use ds4::gguf::{GgufError, GgufFile, GgufWriter, TensorSpec, Value, ValueType};
use ds4::quant::GgmlType;

/// A small file with every metadata type, nested arrays and a few tensors.
fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String("deepseek4".into()))
        .unwrap();
    w.add_metadata("a.u8", Value::U8(7)).unwrap();
    w.add_metadata("a.i8", Value::I8(-7)).unwrap();
    w.add_metadata("a.u16", Value::U16(65535)).unwrap();
    w.add_metadata("a.i16", Value::I16(-300)).unwrap();
    w.add_metadata("a.u32", Value::U32(43)).unwrap();
    w.add_metadata("a.i32", Value::I32(-43)).unwrap();
    w.add_metadata("a.f32", Value::F32(1e-6)).unwrap();
    w.add_metadata("a.bool", Value::Bool(true)).unwrap();
    w.add_metadata("a.u64", Value::U64(1 << 40)).unwrap();
    w.add_metadata("a.i64", Value::I64(-(1 << 40))).unwrap();
    w.add_metadata("a.f64", Value::F64(0.1)).unwrap();
    w.add_metadata("a.strs", Value::string_array(["Ġhello", "", "｜DSML｜"]))
        .unwrap();
    w.add_metadata("a.empty", Value::Array(ValueType::U32, vec![]))
        .unwrap();
    let inner =
        |xs: &[i32]| Value::Array(ValueType::I32, xs.iter().map(|&x| Value::I32(x)).collect());
    w.add_metadata(
        "a.nested",
        Value::Array(
            ValueType::Array,
            vec![inner(&[1, 2]), inner(&[]), inner(&[3])],
        ),
    )
    .unwrap();
    w.add_tensor(TensorSpec::new("t.f32", &[5, 3], GgmlType::F32))
        .unwrap();
    w.add_tensor(TensorSpec::new("t.q8", &[64, 2], GgmlType::Q8_0))
        .unwrap();
    w.add_tensor(TensorSpec::new("t.q2k", &[256, 1, 2], GgmlType::Q2_K))
        .unwrap();
    w.add_tensor(TensorSpec::new("t.i32", &[3], GgmlType::I32))
        .unwrap();
    w
}

fn fill_pattern(i: usize, _: &TensorSpec, buf: &mut [u8]) -> Result<(), GgufError> {
    for (j, b) in buf.iter_mut().enumerate() {
        *b = (i * 31 + j * 7) as u8;
    }
    Ok(())
}

fn sample_bytes() -> Vec<u8> {
    sample_writer().to_bytes(fill_pattern).unwrap()
}

#[test]
fn round_trip_in_memory_and_file() {
    let w = sample_writer();
    let bytes = w.to_bytes(fill_pattern).unwrap();
    assert_eq!(bytes.len() as u64, w.file_size());
    let g = GgufFile::from_bytes(bytes.clone()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.get_str("general.architecture"), Some("deepseek4"));
    assert_eq!(g.get("a.i16"), Some(&Value::I16(-300)));
    assert_eq!(g.get("a.u64").and_then(Value::as_u64), Some(1 << 40));
    assert_eq!(g.get("a.i64").and_then(Value::as_i64), Some(-(1 << 40)));
    assert_eq!(g.get("a.f32").and_then(Value::as_f64), Some(1e-6f32 as f64));
    assert_eq!(
        g.get_string_array("a.strs").unwrap().unwrap(),
        vec!["Ġhello", "", "｜DSML｜"]
    );
    assert!(g.get_string_array("a.u32").is_err());
    assert_eq!(
        g.get("a.empty"),
        Some(&Value::Array(ValueType::U32, vec![]))
    );
    let nested = g.get("a.nested").unwrap().as_array().unwrap();
    assert_eq!(nested.len(), 3);
    assert_eq!(nested[2].as_array().unwrap(), &[Value::I32(3)]);
    assert_eq!(g.metadata().len(), 15);
    // Tensor directory and data.
    assert_eq!(g.tensors().len(), 4);
    let (info, data) = g.tensor("t.q2k").unwrap();
    assert_eq!(info.dims, vec![256, 1, 2]);
    assert_eq!(info.ty, GgmlType::Q2_K);
    assert_eq!(data.len(), 2 * 84);
    assert_eq!(data[5], (2 * 31 + 5 * 7) as u8);
    for t in g.tensors() {
        assert_eq!((g.data_start() + t.offset) % g.alignment, 0);
    }
    // The anonymous-map image parses to the same directory and data, page-aligned.
    let anon = w.to_gguf(fill_pattern).unwrap();
    assert_eq!(anon.file_size(), bytes.len() as u64);
    for t in g.tensors() {
        let a = anon.tensor(&t.name).unwrap().1;
        assert_eq!(a, g.tensor_data(t));
        assert_eq!(a.as_ptr() as usize % 32, 0, "tensor data aligned in memory");
    }
    // Streaming writer produces the same bytes.
    let dir = std::env::temp_dir().join(format!("ds4-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("x.gguf");
    let n = w.write_file(&path, fill_pattern).unwrap();
    assert_eq!(n, bytes.len() as u64);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let g2 = GgufFile::open(&path).unwrap();
    assert_eq!(g2.tensor("t.f32").unwrap().1, g.tensor("t.f32").unwrap().1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn custom_alignment_is_honoured() {
    let mut w = GgufWriter::new();
    w.add_metadata("general.alignment", Value::U32(256))
        .unwrap();
    w.add_tensor(TensorSpec::new("a", &[3], GgmlType::F32))
        .unwrap();
    w.add_tensor(TensorSpec::new("b", &[3], GgmlType::F32))
        .unwrap();
    let g = GgufFile::from_bytes(w.to_bytes(fill_pattern).unwrap()).unwrap();
    assert_eq!(g.alignment, 256);
    assert_eq!(g.tensor_info("b").unwrap().offset, 256);
    assert_eq!(g.data_start() % 256, 0);
}

#[test]
fn writer_rejects_bad_specs() {
    let mut w = GgufWriter::new();
    assert!(w
        .add_tensor(TensorSpec::new("x", &[100], GgmlType::Q8_0))
        .is_err());
    assert!(w
        .add_tensor(TensorSpec::new("x", &[0], GgmlType::F32))
        .is_err());
    w.add_tensor(TensorSpec::new("x", &[32], GgmlType::Q8_0))
        .unwrap();
    assert!(w
        .add_tensor(TensorSpec::new("x", &[32], GgmlType::Q8_0))
        .is_err());
    assert!(w
        .add_metadata("k", Value::Array(ValueType::U8, vec![Value::U32(1)]))
        .is_err());
    assert!(w.add_metadata("general.alignment", Value::U32(3)).is_err());
}

#[test]
fn opens_the_fixture_models() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fixtures");
    for name in ["tiny-f32", "tiny-q2", "tiny-q4"] {
        let g = GgufFile::open(dir.join(name).join("model.gguf")).unwrap();
        assert_eq!(g.tensors().len(), 178, "{name}");
        assert_eq!(
            g.get("deepseek4.block_count").and_then(Value::as_u64),
            Some(6)
        );
        let toks = g
            .get_string_array("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap();
        assert_eq!(toks.len(), 320);
    }
}

fn expect_err(bytes: Vec<u8>, needle: &str) {
    match GgufFile::from_bytes(bytes) {
        Ok(_) => panic!("accepted a file that should fail with '{needle}'"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(needle),
                "error '{msg}' does not mention '{needle}'"
            );
        }
    }
}

#[test]
fn malformed_headers_name_the_problem() {
    let good = sample_bytes();
    let mut b = good.clone();
    b[0] = b'X';
    expect_err(b, "bad magic");
    let mut b = good.clone();
    b[4] = 2;
    expect_err(b, "version 2");
    expect_err(good[..3].to_vec(), "truncated");
    expect_err(good[..good.len() - 30].to_vec(), "past the end");
    // Absurd tensor count.
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_err(b, "absurd count");
    // Absurd metadata count.
    let mut b = good.clone();
    b[16..24].copy_from_slice(&(1u64 << 50).to_le_bytes());
    expect_err(b, "absurd count");
}

/// Byte offset of the (u32 n_dims, dims, type, offset) entry of tensor `name`.
fn tensor_entry(bytes: &[u8], name: &str) -> usize {
    let mut pat = (name.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(name.as_bytes());
    bytes.windows(pat.len()).position(|w| w == pat).unwrap() + pat.len()
}

#[test]
fn malformed_tensor_directory_names_the_problem() {
    let good = sample_bytes();
    let at = tensor_entry(&good, "t.q8"); // n_dims=2, dims 64,2, type, offset
    let ty_at = at + 4 + 16;
    let off_at = ty_at + 4;
    let mut b = good.clone();
    b[ty_at..ty_at + 4].copy_from_slice(&99u32.to_le_bytes());
    expect_err(b, "unsupported type code 99");
    let mut b = good.clone();
    b[off_at..off_at + 8].copy_from_slice(&4u64.to_le_bytes());
    expect_err(b, "not a multiple of the alignment");
    let mut b = good.clone();
    b[off_at..off_at + 8].copy_from_slice(&0u64.to_le_bytes());
    expect_err(b, "overlap");
    let mut b = good.clone();
    b[off_at..off_at + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    expect_err(b, "past the end");
    let mut b = good.clone();
    b[at + 4..at + 12].copy_from_slice(&63u64.to_le_bytes());
    expect_err(b, "not a multiple of the Q8_0 block size");
    let mut b = good.clone();
    b[at + 4..at + 12].copy_from_slice(&(u64::MAX - 63).to_le_bytes());
    expect_err(b, "overflows");
    let mut b = good.clone();
    b[at..at + 4].copy_from_slice(&9u32.to_le_bytes());
    expect_err(b, "9 dimensions");
    // Duplicate tensor name.
    let mut w = GgufWriter::new();
    w.add_tensor(TensorSpec::new("aa", &[1], GgmlType::F32))
        .unwrap();
    w.add_tensor(TensorSpec::new("ab", &[1], GgmlType::F32))
        .unwrap();
    let mut b = w.to_bytes(fill_pattern).unwrap();
    let p = tensor_entry(&b, "ab") - 1;
    b[p] = b'a';
    expect_err(b, "appears twice");
}

#[test]
fn malformed_metadata_names_the_problem() {
    let good = sample_bytes();
    // Key "a.bool": type 7, then one byte.
    let mut pat = 6u64.to_le_bytes().to_vec();
    pat.extend_from_slice(b"a.bool");
    let at = good.windows(pat.len()).position(|w| w == pat).unwrap() + pat.len();
    let mut b = good.clone();
    b[at + 4] = 5;
    expect_err(b, "invalid bool");
    let mut b = good.clone();
    b[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    expect_err(b, "unknown value type 77");
    // String array element length beyond the file.
    let mut pat = 6u64.to_le_bytes().to_vec();
    pat.extend_from_slice(b"a.strs");
    let at = good.windows(pat.len()).position(|w| w == pat).unwrap() + pat.len();
    let mut b = good.clone();
    b[at + 8..at + 16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    expect_err(b, "exceeds the limit");
    let mut b = good.clone();
    b[at + 8..at + 16].copy_from_slice(&(1u64 << 20).to_le_bytes());
    expect_err(b, "absurd count");
    let mut b = good.clone();
    b[at + 16..at + 24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_err(b, "string length");
    // Non-UTF-8 string.
    let mut b = good.clone();
    b[at + 24] = 0xff;
    expect_err(b, "UTF-8");
    // Bad alignment value.
    let mut w = GgufWriter::new();
    w.add_metadata("general.alignment", Value::U32(64)).unwrap();
    let mut b = w.to_bytes(fill_pattern).unwrap();
    let p = b
        .windows(4)
        .rposition(|w| w == 64u32.to_le_bytes())
        .unwrap();
    b[p] = 48;
    expect_err(b, "power-of-two");
}

/// xorshift64*: a tiny deterministic PRNG so the property test needs no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Property: any mutation of a valid file either parses into a consistent directory or
/// returns an error; it never panics and never allocates beyond the limits. Runs for a
/// bounded time (DS4_FUZZ_SECS, default 5 s) so CI stays fast.
#[test]
fn mutated_files_never_panic() {
    let seeds = [sample_bytes(), {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fixtures");
        // Header and directory of a real fixture (data truncated to keep mutation fast).
        let full = std::fs::read(dir.join("tiny-q2/model.gguf")).unwrap();
        let g = GgufFile::from_bytes(full.clone()).unwrap();
        full[..g.data_start() as usize + 4096].to_vec()
    }];
    let secs: u64 = std::env::var("DS4_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut n = 0u64;
    let (mut ok, mut err) = (0u64, 0u64);
    while std::time::Instant::now() < deadline || n < 2000 {
        let mut b = seeds[rng.below(seeds.len())].clone();
        let edits = 1 + rng.below(4);
        for _ in 0..edits {
            match rng.below(6) {
                0 => {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
                1 => {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
                2 => {
                    let cut = rng.below(b.len());
                    b.truncate(cut.max(1));
                }
                3 => {
                    // Overwrite an aligned u64 with an extreme value (counts, lengths, offsets).
                    let i = rng.below(b.len().saturating_sub(8).max(1)) & !7;
                    let v = [u64::MAX, 0, 1 << 32, 1 << 62, rng.next()][rng.below(5)];
                    let end = (i + 8).min(b.len());
                    b[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
                }
                4 => {
                    let i = rng.below(b.len());
                    let v = (rng.next() % 40) as u32;
                    let end = (i + 4).min(b.len());
                    b[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
                }
                _ => {
                    let i = rng.below(b.len());
                    b.insert(i, rng.next() as u8);
                }
            }
        }
        match GgufFile::from_bytes(b) {
            Ok(g) => {
                ok += 1;
                for t in g.tensors() {
                    assert_eq!(g.tensor_data(t).len() as u64, t.n_bytes);
                }
            }
            Err(e) => {
                err += 1;
                assert!(!e.to_string().is_empty());
            }
        }
        n += 1;
    }
    eprintln!("gguf mutation test: {n} files, {ok} parsed, {err} rejected");
    assert!(err > 0);
}
