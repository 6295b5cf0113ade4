//! Model config and tensor contract on the fixture files and on broken variants of them.

use std::sync::Arc;

use ds4::gguf::{GgufFile, GgufWriter, TensorSpec, Value};
use ds4::model::{Config, Model};
use ds4::quant::GgmlType;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fixtures")
        .join(name)
        .join("model.gguf")
}

#[test]
fn fixtures_bind_with_their_shapes() {
    let m = Model::open(fixture("tiny-f32")).unwrap();
    let c = &m.cfg;
    assert_eq!(
        (c.n_layer, c.n_embd, c.n_vocab, c.n_head, c.head_dim, c.n_rot),
        (6, 128, 320, 4, 128, 64)
    );
    assert_eq!((c.q_lora_rank, c.o_groups, c.o_lora_rank), (64, 4, 16));
    assert_eq!(
        (c.n_expert, c.n_expert_used, c.n_ff_exp, c.swa),
        (8, 3, 32, 20)
    );
    assert_eq!((c.idx_heads, c.idx_dim, c.idx_topk), (16, 128, 6));
    assert_eq!(c.compress_ratios[..6], [0, 0, 4, 128, 4, 128]);
    assert!(!c.flash_mismatches().is_empty());
    assert!(m.weights.layers[2].indexer.is_some());
    assert!(m.weights.layers[3].indexer.is_none() && m.weights.layers[3].attn_compressor.is_some());
    assert!(m.weights.layers[0].ffn_gate_tid2eid.is_some());
    let m = Model::open(fixture("tiny-q2")).unwrap();
    assert_eq!(m.expert_types(), (GgmlType::IQ2_XXS, GgmlType::Q2_K));
    assert_eq!((m.cfg.n_embd, m.cfg.swa, m.cfg.idx_topk), (256, 16, 8));
    let m = Model::open(fixture("tiny-q4")).unwrap();
    assert_eq!(m.expert_types(), (GgmlType::Q4_K, GgmlType::Q4_K));
}

/// Rewrites a fixture with edits to metadata and tensors.
fn rewrite(
    meta_edit: impl Fn(&str, &Value) -> Option<Value>,
    tensor_edit: impl Fn(&TensorSpec) -> Option<TensorSpec>,
    extra: Option<TensorSpec>,
) -> GgufFile {
    let g = GgufFile::open(fixture("tiny-f32")).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in g.metadata() {
        if let Some(v) = meta_edit(k, v) {
            w.add_metadata(k.clone(), v).unwrap();
        }
    }
    for t in g.tensors() {
        if let Some(s) = tensor_edit(&TensorSpec::new(t.name.clone(), &t.dims, t.ty)) {
            w.add_tensor(s).unwrap();
        }
    }
    if let Some(s) = extra {
        w.add_tensor(s).unwrap();
    }
    GgufFile::from_bytes(w.to_bytes(|_, _, _| Ok(())).unwrap()).unwrap()
}

#[test]
fn broken_tensor_layout_lists_every_problem() {
    let g = rewrite(
        |_, v| Some(v.clone()),
        |t| match t.name.as_str() {
            "blk.1.attn_kv.weight" => None,
            "blk.2.attn_q_b.weight" => Some(TensorSpec::new(t.name.clone(), &[64, 256], t.ty)),
            "blk.3.attn_norm.weight" => {
                Some(TensorSpec::new(t.name.clone(), &t.dims, GgmlType::F16))
            }
            "blk.4.ffn_up_exps.weight" => {
                Some(TensorSpec::new(t.name.clone(), &t.dims, GgmlType::F16))
            }
            _ => Some(t.clone()),
        },
        Some(TensorSpec::new("blk.0.bogus.weight", &[4], GgmlType::F32)),
    );
    let err = Model::from_gguf(Arc::new(g))
        .err()
        .expect("must be refused");
    for needle in [
        "5 problems",
        "missing tensor 'blk.1.attn_kv.weight'",
        "'blk.2.attn_q_b.weight' has shape [64, 256], expected [64, 512]",
        "'blk.3.attn_norm.weight' has type F16, expected one of F32",
        "routed gate experts are F32 but up experts are F16",
        "unexpected tensor 'blk.0.bogus.weight'",
    ] {
        assert!(err.contains(needle), "missing '{needle}' in:\n{err}");
    }
}

#[test]
fn broken_metadata_lists_every_problem() {
    let g = rewrite(
        |k, v| match k {
            "deepseek4.embedding_length" => None,
            "deepseek4.attention.head_count_kv" => Some(Value::U32(2)),
            "deepseek4.expert_weights_norm" => Some(Value::U32(1)),
            "deepseek4.rope.freq_base" => Some(Value::String("x".into())),
            _ => Some(v.clone()),
        },
        |t| Some(t.clone()),
        None,
    );
    let err = Config::from_gguf(&g).unwrap_err();
    for needle in [
        "missing metadata key 'deepseek4.embedding_length'",
        "expert_weights_norm' must be a bool",
        "rope.freq_base' must be a finite number",
    ] {
        assert!(err.contains(needle), "missing '{needle}' in:\n{err}");
    }
    let g = rewrite(
        |k, v| match k {
            "deepseek4.attention.head_count_kv" => Some(Value::U32(2)),
            "deepseek4.attention.compress_ratios" => {
                let mut a = v.as_array().unwrap().to_vec();
                a[3] = Value::I32(64);
                Some(Value::Array(ds4::gguf::ValueType::I32, a))
            }
            _ => Some(v.clone()),
        },
        |t| Some(t.clone()),
        None,
    );
    let err = Config::from_gguf(&g).unwrap_err();
    assert!(err.contains("one shared KV head expected"), "{err}");
    assert!(err.contains("layer 3: compress ratio 64"), "{err}");
}
