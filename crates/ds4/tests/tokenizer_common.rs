// Shared helpers for the tokenizer integration tests (included with `mod` by each test file).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use ds4::tokenizer::Tokenizer;
use serde_json::Value;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tokenizer")
}

pub fn gguf_path() -> PathBuf {
    repo_root().join("data/ds4-tokenizer.gguf")
}

pub fn read_jsonl(name: &str) -> Vec<Value> {
    let path = data_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("jsonl line"))
        .collect()
}

pub fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The tokenizer arrays of a GGUF file, read by a minimal test-only parser (independent of
/// the library's GGUF reader, so the two can check each other).
pub struct RawVocab {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub token_types: Vec<i32>,
}

pub fn raw_vocab() -> &'static RawVocab {
    static V: OnceLock<RawVocab> = OnceLock::new();
    V.get_or_init(|| {
        let bytes = std::fs::read(gguf_path()).expect("data/ds4-tokenizer.gguf");
        parse_gguf_vocab(&bytes)
    })
}

pub fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let v = raw_vocab();
        Tokenizer::with_token_types(v.tokens.clone(), &v.merges, &v.token_types)
            .expect("tokenizer from GGUF arrays")
    })
}

/// The same vocabulary without token types (added tokens derived structurally).
pub fn tokenizer_untyped() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let v = raw_vocab();
        Tokenizer::new(v.tokens.clone(), &v.merges).expect("tokenizer from GGUF arrays")
    })
}

struct Cur<'a> {
    b: &'a [u8],
    p: usize,
}

impl Cur<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.p..self.p + n];
        self.p += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8(self.take(n).to_vec()).expect("utf8 string")
    }
    /// Skip or collect one value of GGUF type `t`.
    fn value(&mut self, t: u32, strings: &mut Vec<String>, ints: &mut Vec<i32>) {
        match t {
            0 | 1 | 7 => {
                self.take(1);
            }
            2 | 3 => {
                self.take(2);
            }
            4 | 6 => {
                self.take(4);
            }
            5 => ints.push(self.u32() as i32),
            8 => strings.push(self.string()),
            9 => {
                let et = self.u32();
                let n = self.u64();
                for _ in 0..n {
                    self.value(et, strings, ints);
                }
            }
            10..=12 => {
                self.take(8);
            }
            _ => panic!("bad gguf type {t}"),
        }
    }
}

fn parse_gguf_vocab(b: &[u8]) -> RawVocab {
    let mut c = Cur { b, p: 0 };
    assert_eq!(c.take(4), b"GGUF");
    let _version = c.u32();
    let _n_tensors = c.u64();
    let n_kv = c.u64();
    let mut out = RawVocab {
        tokens: vec![],
        merges: vec![],
        token_types: vec![],
    };
    for _ in 0..n_kv {
        let key = c.string();
        let t = c.u32();
        let (mut s, mut i) = (Vec::new(), Vec::new());
        c.value(t, &mut s, &mut i);
        match key.as_str() {
            "tokenizer.ggml.tokens" => out.tokens = s,
            "tokenizer.ggml.merges" => out.merges = s,
            "tokenizer.ggml.token_type" => out.token_types = i,
            _ => {}
        }
    }
    out
}
