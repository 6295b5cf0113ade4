//! The tensor contract (model.md §2.3) and weight binding.
//!
//! [`expected_tensors`] lists every tensor a model of a given [`Config`] must have, with its
//! GGUF-order shape, the types this engine accepts and the type ds4's published files use.
//! [`Weights::bind`] checks a file against that list and refuses it with one message listing
//! every missing, extra, misshapen or wrongly typed tensor. Field names mirror GGUF names.

use std::collections::HashMap;

use super::config::Config;
use crate::gguf::{GgufFile, TensorInfo};
use crate::quant::GgmlType;

/// Role of a tensor, which decides the types accepted and the type ds4 stores it as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Token embedding (F16 in ds4).
    Embedding,
    /// Attention, shared-expert and output projections (Q8_0 in ds4).
    Dense,
    /// HC, compressor, indexer and router matrices (F16 in ds4).
    Plain,
    /// Norm weights, sinks, biases, HC base/scale (always F32).
    Vector,
    /// Hash routing table (I32).
    TokenTable,
    /// Routed gate/up experts (IQ2_XXS in q2, Q4_K in q4).
    ExpertGateUp,
    /// Routed down experts (Q2_K in q2, Q4_K in q4).
    ExpertDown,
}

/// Routed-expert quantization of a published file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertQuant {
    /// IQ2_XXS gate/up, Q2_K down.
    Q2,
    /// Q4_K everywhere.
    Q4,
}

impl Role {
    /// Types the engine accepts for this role.
    pub fn accepted(self) -> &'static [GgmlType] {
        use GgmlType::*;
        match self {
            Role::Embedding => &[F16, F32, BF16, Q8_0],
            Role::Dense => &[Q8_0, F16, F32, BF16],
            Role::Plain => &[F16, F32, BF16],
            Role::Vector => &[F32],
            Role::TokenTable => &[I32],
            Role::ExpertGateUp | Role::ExpertDown => &[IQ2_XXS, Q2_K, Q4_K, Q8_0, F16, F32],
        }
    }

    /// The type ds4's published files use for this role.
    pub fn ds4_type(self, experts: ExpertQuant) -> GgmlType {
        use GgmlType::*;
        match (self, experts) {
            (Role::Embedding | Role::Plain, _) => F16,
            (Role::Dense, _) => Q8_0,
            (Role::Vector, _) => F32,
            (Role::TokenTable, _) => I32,
            (Role::ExpertGateUp, ExpertQuant::Q2) => IQ2_XXS,
            (Role::ExpertDown, ExpertQuant::Q2) => Q2_K,
            (Role::ExpertGateUp | Role::ExpertDown, ExpertQuant::Q4) => Q4_K,
        }
    }
}

/// One tensor of the contract.
#[derive(Clone, Debug, PartialEq)]
pub struct Expected {
    pub name: String,
    pub dims: Vec<u64>,
    pub role: Role,
    /// `exp_probs_b.bias` is optional on non-hash layers.
    pub optional: bool,
}

/// Every tensor a model with this config has, in ds4's order (model.md §2.3).
pub fn expected_tensors(c: &Config) -> Vec<Expected> {
    let mut v = Vec::new();
    let d = c.n_embd as u64;
    let hc_flat = (c.hc * c.n_embd) as u64;
    let mut push = |name: String, dims: &[u64], role: Role, optional: bool| {
        v.push(Expected {
            name,
            dims: dims.to_vec(),
            role,
            optional,
        });
    };
    push(
        "token_embd.weight".into(),
        &[d, c.n_vocab as u64],
        Role::Embedding,
        false,
    );
    push(
        "output_hc_fn.weight".into(),
        &[hc_flat, c.hc as u64],
        Role::Plain,
        false,
    );
    push(
        "output_hc_base.weight".into(),
        &[c.hc as u64],
        Role::Vector,
        false,
    );
    push("output_hc_scale.weight".into(), &[1], Role::Vector, false);
    push("output_norm.weight".into(), &[d], Role::Vector, false);
    push(
        "output.weight".into(),
        &[d, c.n_vocab as u64],
        Role::Dense,
        false,
    );
    let mix = c.hc_mix() as u64;
    let (dh, h) = (c.head_dim as u64, c.n_head as u64);
    let ql = c.q_lora_rank as u64;
    let group_in = h * dh / c.o_groups as u64;
    let low = (c.o_groups * c.o_lora_rank) as u64;
    let (ne, nf) = (c.n_expert as u64, c.n_ff_exp as u64);
    for il in 0..c.n_layer {
        let p = |s: &str| format!("blk.{il}.{s}");
        push(p("hc_attn_fn.weight"), &[hc_flat, mix], Role::Plain, false);
        push(p("hc_attn_scale.weight"), &[3], Role::Vector, false);
        push(p("hc_attn_base.weight"), &[mix], Role::Vector, false);
        push(p("attn_norm.weight"), &[d], Role::Vector, false);
        push(p("attn_q_a.weight"), &[d, ql], Role::Dense, false);
        push(p("attn_q_a_norm.weight"), &[ql], Role::Vector, false);
        push(p("attn_q_b.weight"), &[ql, h * dh], Role::Dense, false);
        push(p("attn_kv.weight"), &[d, dh], Role::Dense, false);
        push(p("attn_kv_a_norm.weight"), &[dh], Role::Vector, false);
        push(p("attn_sinks.weight"), &[h], Role::Vector, false);
        push(
            p("attn_output_a.weight"),
            &[group_in, low],
            Role::Dense,
            false,
        );
        push(p("attn_output_b.weight"), &[low, d], Role::Dense, false);
        let ratio = c.ratio(il);
        if ratio != 0 {
            let w = c.compressor_width(ratio) as u64;
            push(
                p("attn_compressor_ape.weight"),
                &[w, ratio as u64],
                Role::Plain,
                false,
            );
            push(p("attn_compressor_kv.weight"), &[d, w], Role::Plain, false);
            push(
                p("attn_compressor_gate.weight"),
                &[d, w],
                Role::Plain,
                false,
            );
            push(p("attn_compressor_norm.weight"), &[dh], Role::Vector, false);
        }
        if ratio == 4 {
            let (ih, id) = (c.idx_heads as u64, c.idx_dim as u64);
            push(
                p("indexer.attn_q_b.weight"),
                &[ql, ih * id],
                Role::Plain,
                false,
            );
            push(p("indexer.proj.weight"), &[d, ih], Role::Plain, false);
            push(
                p("indexer_compressor_ape.weight"),
                &[2 * id, 4],
                Role::Plain,
                false,
            );
            push(
                p("indexer_compressor_kv.weight"),
                &[d, 2 * id],
                Role::Plain,
                false,
            );
            push(
                p("indexer_compressor_gate.weight"),
                &[d, 2 * id],
                Role::Plain,
                false,
            );
            push(
                p("indexer_compressor_norm.weight"),
                &[id],
                Role::Vector,
                false,
            );
        }
        push(p("hc_ffn_fn.weight"), &[hc_flat, mix], Role::Plain, false);
        push(p("hc_ffn_scale.weight"), &[3], Role::Vector, false);
        push(p("hc_ffn_base.weight"), &[mix], Role::Vector, false);
        push(p("ffn_norm.weight"), &[d], Role::Vector, false);
        push(p("ffn_gate_inp.weight"), &[d, ne], Role::Plain, false);
        if c.is_hash_layer(il) {
            push(
                p("ffn_gate_tid2eid.weight"),
                &[c.n_expert_used as u64, c.n_vocab as u64],
                Role::TokenTable,
                false,
            );
        } else {
            push(p("exp_probs_b.bias"), &[ne], Role::Vector, true);
        }
        push(
            p("ffn_gate_exps.weight"),
            &[d, nf, ne],
            Role::ExpertGateUp,
            false,
        );
        push(
            p("ffn_up_exps.weight"),
            &[d, nf, ne],
            Role::ExpertGateUp,
            false,
        );
        push(
            p("ffn_down_exps.weight"),
            &[nf, d, ne],
            Role::ExpertDown,
            false,
        );
        push(p("ffn_gate_shexp.weight"), &[d, nf], Role::Dense, false);
        push(p("ffn_up_shexp.weight"), &[d, nf], Role::Dense, false);
        push(p("ffn_down_shexp.weight"), &[nf, d], Role::Dense, false);
    }
    v
}

/// Checks a file's tensor directory against the contract. Returns every problem.
pub fn check_tensors(c: &Config, g: &GgufFile) -> Vec<String> {
    let mut problems = Vec::new();
    let expected = expected_tensors(c);
    let mut known: HashMap<&str, &Expected> = HashMap::with_capacity(expected.len());
    for e in &expected {
        known.insert(e.name.as_str(), e);
        match g.tensor_info(&e.name) {
            None if e.optional => {}
            None => problems.push(format!("missing tensor '{}' (shape {:?})", e.name, e.dims)),
            Some(t) => {
                if t.dims != e.dims {
                    problems.push(format!(
                        "tensor '{}' has shape {:?}, expected {:?}",
                        e.name, t.dims, e.dims
                    ));
                }
                if !e.role.accepted().contains(&t.ty) {
                    let ok: Vec<&str> = e.role.accepted().iter().map(|t| t.name()).collect();
                    problems.push(format!(
                        "tensor '{}' has type {}, expected one of {}",
                        e.name,
                        t.ty,
                        ok.join("/")
                    ));
                }
            }
        }
    }
    for il in 0..c.n_layer {
        let ty = |s: &str| g.tensor_info(&format!("blk.{il}.{s}")).map(|t| t.ty);
        if let (Some(a), Some(b)) = (ty("ffn_gate_exps.weight"), ty("ffn_up_exps.weight")) {
            if a != b {
                problems.push(format!(
                    "blk.{il}: routed gate experts are {a} but up experts are {b} (must match)"
                ));
            }
        }
    }
    for t in g.tensors() {
        if !known.contains_key(t.name.as_str()) {
            problems.push(format!(
                "unexpected tensor '{}' ({} {:?})",
                t.name, t.ty, t.dims
            ));
        }
    }
    problems
}

/// Main and indexer KV compressor (model.md §3.3.1).
#[derive(Clone, Debug)]
pub struct CompressorWeights {
    /// `[W, ratio]`: row `p` = position bias for in-window position `p`.
    pub ape: TensorInfo,
    pub kv: TensorInfo,
    pub gate: TensorInfo,
    pub norm: TensorInfo,
}

/// Lightning indexer of a ratio-4 layer (model.md §3.3.2).
#[derive(Clone, Debug)]
pub struct IndexerWeights {
    /// `indexer.attn_q_b`: q LoRA → indexer heads.
    pub attn_q_b: TensorInfo,
    /// `indexer.proj`: x → per-head weights.
    pub proj: TensorInfo,
    pub compressor: CompressorWeights,
}

/// One transformer block (`blk.{il}.*`).
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub hc_attn_fn: TensorInfo,
    pub hc_attn_scale: TensorInfo,
    pub hc_attn_base: TensorInfo,
    pub attn_norm: TensorInfo,
    pub attn_q_a: TensorInfo,
    pub attn_q_a_norm: TensorInfo,
    pub attn_q_b: TensorInfo,
    pub attn_kv: TensorInfo,
    pub attn_kv_a_norm: TensorInfo,
    pub attn_sinks: TensorInfo,
    pub attn_output_a: TensorInfo,
    pub attn_output_b: TensorInfo,
    /// `attn_compressor_*`, ratio ≠ 0 layers.
    pub attn_compressor: Option<CompressorWeights>,
    /// `indexer.*` and `indexer_compressor_*`, ratio-4 layers.
    pub indexer: Option<IndexerWeights>,
    pub hc_ffn_fn: TensorInfo,
    pub hc_ffn_scale: TensorInfo,
    pub hc_ffn_base: TensorInfo,
    pub ffn_norm: TensorInfo,
    pub ffn_gate_inp: TensorInfo,
    /// Selection bias (non-hash layers, optional).
    pub exp_probs_b: Option<TensorInfo>,
    /// Token → experts table (hash layers).
    pub ffn_gate_tid2eid: Option<TensorInfo>,
    pub ffn_gate_exps: TensorInfo,
    pub ffn_up_exps: TensorInfo,
    pub ffn_down_exps: TensorInfo,
    pub ffn_gate_shexp: TensorInfo,
    pub ffn_up_shexp: TensorInfo,
    pub ffn_down_shexp: TensorInfo,
}

/// All weights of the model, as directory entries into the mapped file.
#[derive(Clone, Debug)]
pub struct Weights {
    pub token_embd: TensorInfo,
    pub output_hc_fn: TensorInfo,
    pub output_hc_base: TensorInfo,
    pub output_hc_scale: TensorInfo,
    pub output_norm: TensorInfo,
    pub output: TensorInfo,
    pub layers: Vec<LayerWeights>,
}

impl Weights {
    /// Validates the tensor directory against the contract and binds every tensor.
    pub fn bind(c: &Config, g: &GgufFile) -> Result<Weights, String> {
        let problems = check_tensors(c, g);
        if !problems.is_empty() {
            return Err(format!(
                "the model file does not match the DeepSeek V4 tensor layout ({} problem{}):\n  {}",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                problems.join("\n  ")
            ));
        }
        // Every required tensor exists (checked above), so lookups below cannot fail.
        let t = |name: &str| {
            g.tensor_info(name)
                .cloned()
                .expect("checked by check_tensors")
        };
        let opt = |name: &str| g.tensor_info(name).cloned();
        let compressor = |p: &str| CompressorWeights {
            ape: t(&format!("{p}_ape.weight")),
            kv: t(&format!("{p}_kv.weight")),
            gate: t(&format!("{p}_gate.weight")),
            norm: t(&format!("{p}_norm.weight")),
        };
        let layers = (0..c.n_layer)
            .map(|il| {
                let n = |s: &str| t(&format!("blk.{il}.{s}"));
                let ratio = c.ratio(il);
                LayerWeights {
                    hc_attn_fn: n("hc_attn_fn.weight"),
                    hc_attn_scale: n("hc_attn_scale.weight"),
                    hc_attn_base: n("hc_attn_base.weight"),
                    attn_norm: n("attn_norm.weight"),
                    attn_q_a: n("attn_q_a.weight"),
                    attn_q_a_norm: n("attn_q_a_norm.weight"),
                    attn_q_b: n("attn_q_b.weight"),
                    attn_kv: n("attn_kv.weight"),
                    attn_kv_a_norm: n("attn_kv_a_norm.weight"),
                    attn_sinks: n("attn_sinks.weight"),
                    attn_output_a: n("attn_output_a.weight"),
                    attn_output_b: n("attn_output_b.weight"),
                    attn_compressor: (ratio != 0)
                        .then(|| compressor(&format!("blk.{il}.attn_compressor"))),
                    indexer: (ratio == 4).then(|| IndexerWeights {
                        attn_q_b: n("indexer.attn_q_b.weight"),
                        proj: n("indexer.proj.weight"),
                        compressor: compressor(&format!("blk.{il}.indexer_compressor")),
                    }),
                    hc_ffn_fn: n("hc_ffn_fn.weight"),
                    hc_ffn_scale: n("hc_ffn_scale.weight"),
                    hc_ffn_base: n("hc_ffn_base.weight"),
                    ffn_norm: n("ffn_norm.weight"),
                    ffn_gate_inp: n("ffn_gate_inp.weight"),
                    exp_probs_b: opt(&format!("blk.{il}.exp_probs_b.bias")),
                    ffn_gate_tid2eid: opt(&format!("blk.{il}.ffn_gate_tid2eid.weight")),
                    ffn_gate_exps: n("ffn_gate_exps.weight"),
                    ffn_up_exps: n("ffn_up_exps.weight"),
                    ffn_down_exps: n("ffn_down_exps.weight"),
                    ffn_gate_shexp: n("ffn_gate_shexp.weight"),
                    ffn_up_shexp: n("ffn_up_shexp.weight"),
                    ffn_down_shexp: n("ffn_down_shexp.weight"),
                }
            })
            .collect();
        Ok(Weights {
            token_embd: t("token_embd.weight"),
            output_hc_fn: t("output_hc_fn.weight"),
            output_hc_base: t("output_hc_base.weight"),
            output_hc_scale: t("output_hc_scale.weight"),
            output_norm: t("output_norm.weight"),
            output: t("output.weight"),
            layers,
        })
    }
}
