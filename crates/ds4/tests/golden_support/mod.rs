//! Fixture loading and row-by-row comparison shared by the golden and session tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ds4::model::Model;
use safetensors::SafeTensors;

pub mod synth;

pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fixtures")
        .join(name)
}

/// One golden fixture (reference README §1).
pub struct Fixture {
    pub name: String,
    pub model: Arc<Model>,
    pub qat_sim: bool,
    pub vocab: usize,
    pub prompt: Vec<u32>,
    pub chunks: Vec<usize>,
    pub decode_ids: Vec<u32>,
    pub prefill_logits: Vec<f32>,
    pub chunked_logits: Vec<f32>,
    pub decode_logits: Vec<f32>,
}

fn ints(st: &SafeTensors, name: &str) -> Vec<i64> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::I32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
        .collect()
}

fn floats(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let dir = fixture_dir(name);
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
        let gguf = dir.join(meta["model_gguf"].as_str().unwrap());
        let model = Arc::new(Model::open(&gguf).unwrap());
        let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let ids = |n: &str| {
            ints(&st, n)
                .into_iter()
                .map(|v| v as u32)
                .collect::<Vec<_>>()
        };
        Fixture {
            name: name.into(),
            vocab: model.cfg.n_vocab,
            model,
            qat_sim: meta["qat_sim"].as_bool().unwrap(),
            prompt: ids("prompt_ids"),
            chunks: ints(&st, "chunk_sizes")
                .into_iter()
                .map(|v| v as usize)
                .collect(),
            decode_ids: ids("decode_ids"),
            prefill_logits: floats(&st, "prefill_logits"),
            chunked_logits: floats(&st, "chunked_logits"),
            decode_logits: floats(&st, "decode_logits"),
        }
    }
}

/// Row-by-row comparison of logits (README §1 pass criteria).
#[derive(Debug, Default, Clone)]
pub struct Compare {
    pub rows: usize,
    /// Per-row `max_v |got − want|`.
    pub row_max_abs: Vec<f32>,
    /// Largest per-row `max_abs / max_v |want|`.
    pub max_rel: f32,
    pub top1_agree: usize,
    /// Rows whose top-5 token sets differ.
    pub top5_mismatch: Vec<usize>,
}

fn top5(row: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(5);
    idx.sort_unstable();
    idx
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
        .unwrap()
}

impl Compare {
    pub fn new(got: &[f32], want: &[f32], vocab: usize) -> Compare {
        assert_eq!(got.len(), want.len(), "logit count");
        let mut c = Compare::default();
        for (r, (g, w)) in got
            .chunks_exact(vocab)
            .zip(want.chunks_exact(vocab))
            .enumerate()
        {
            let max_abs = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            c.max_rel = c.max_rel.max(max_abs / scale);
            c.row_max_abs.push(if max_abs.is_nan() {
                f32::INFINITY
            } else {
                max_abs
            });
            c.top1_agree += (argmax(g) == argmax(w)) as usize;
            if top5(g) != top5(w) {
                c.top5_mismatch.push(r);
            }
            c.rows += 1;
        }
        c
    }

    pub fn max_abs(&self) -> f32 {
        self.row_max_abs.iter().copied().fold(0.0, f32::max)
    }

    pub fn median_abs(&self) -> f32 {
        let mut v = self.row_max_abs.clone();
        v.sort_by(f32::total_cmp);
        if v.is_empty() {
            return 0.0;
        }
        v[v.len() / 2]
    }

    pub fn merge(&mut self, o: &Compare) {
        let off = self.rows;
        self.rows += o.rows;
        self.row_max_abs.extend_from_slice(&o.row_max_abs);
        self.max_rel = self.max_rel.max(o.max_rel);
        self.top1_agree += o.top1_agree;
        self.top5_mismatch
            .extend(o.top5_mismatch.iter().map(|r| r + off));
    }

    pub fn top1_rate(&self) -> f64 {
        self.top1_agree as f64 / self.rows.max(1) as f64
    }

    pub fn summary(&self) -> String {
        format!(
            "rows {:4}  max_abs {:.3e}  median_abs {:.3e}  max_rel {:.3e}  top1 {:.4}  top5 mismatches {}",
            self.rows,
            self.max_abs(),
            self.median_abs(),
            self.max_rel,
            self.top1_rate(),
            self.top5_mismatch.len()
        )
    }

    /// README §1, QAT off: every row within 1e-3 absolute and relative, same top-5 set.
    pub fn assert_exact(&self, what: &str) {
        let bad: Vec<usize> = (0..self.rows)
            .filter(|&r| self.row_max_abs[r] > 1e-3)
            .collect();
        assert!(
            bad.is_empty() && self.max_rel <= 1e-3 && self.top5_mismatch.is_empty(),
            "{what}: {} (rows over 1e-3: {:?}, top-5 mismatches at {:?})",
            self.summary(),
            &bad[..bad.len().min(10)],
            &self.top5_mismatch[..self.top5_mismatch.len().min(10)]
        );
    }
}
