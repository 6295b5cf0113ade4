//! The small tensors of the model (norm weights, HC scales/bases, sinks, biases, position
//! biases, hash tables) decoded to f32 once when the model is opened, and the RoPE tables.

use super::config::Config;
use super::rope::Rope;
use super::weights::{CompressorWeights, LayerWeights, Weights};
use crate::gguf::{GgufFile, TensorInfo};
use crate::quant::{self, GgmlType};

/// One hyper-connection site: `scale[3]` and `base[(2+N)·N]` (model.md §3.2).
#[derive(Clone, Debug)]
pub struct HcParams {
    pub scale: [f32; 3],
    pub base: Vec<f32>,
}

/// A KV compressor's position bias `ape` (`ratio × W`) and output norm (model.md §3.3.1).
#[derive(Clone, Debug)]
pub struct CompressorParams {
    pub ape: Vec<f32>,
    pub norm: Vec<f32>,
}

#[derive(Clone, Debug)]
pub struct LayerParams {
    pub ratio: usize,
    /// RoPE regime of every rotation in this layer.
    pub rope: Rope,
    pub hc_attn: HcParams,
    pub hc_ffn: HcParams,
    pub attn_norm: Vec<f32>,
    pub q_a_norm: Vec<f32>,
    pub kv_a_norm: Vec<f32>,
    pub sinks: Vec<f32>,
    pub compressor: Option<CompressorParams>,
    pub indexer_compressor: Option<CompressorParams>,
    pub ffn_norm: Vec<f32>,
    /// Expert selection bias (`exp_probs_b`), non-hash layers.
    pub expert_bias: Option<Vec<f32>>,
    /// `tid2eid`, row-major `[vocab][k]`, checked `< n_expert` (hash layers).
    pub tid2eid: Option<Vec<u32>>,
    pub swiglu_clamp: f32,
}

#[derive(Clone, Debug)]
pub struct Params {
    pub layers: Vec<LayerParams>,
    pub output_hc_base: Vec<f32>,
    pub output_hc_scale: f32,
    pub output_norm: Vec<f32>,
}

fn tensor_f32(g: &GgufFile, t: &TensorInfo) -> Result<Vec<f32>, String> {
    let n = t.n_elements() as usize;
    if !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return Err(format!(
            "{}: small tensor of type {} not supported",
            t.name, t.ty
        ));
    }
    let mut v = vec![0f32; n];
    quant::dequantize_row(t.ty, g.tensor_data(t), &mut v);
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(format!("{}: element {i} is not finite", t.name));
    }
    Ok(v)
}

fn hc(g: &GgufFile, scale: &TensorInfo, base: &TensorInfo) -> Result<HcParams, String> {
    let s = tensor_f32(g, scale)?;
    Ok(HcParams {
        scale: [s[0], s[1], s[2]],
        base: tensor_f32(g, base)?,
    })
}

fn compressor(g: &GgufFile, w: &CompressorWeights) -> Result<CompressorParams, String> {
    Ok(CompressorParams {
        ape: tensor_f32(g, &w.ape)?,
        norm: tensor_f32(g, &w.norm)?,
    })
}

fn tid2eid(cfg: &Config, g: &GgufFile, t: &TensorInfo) -> Result<Vec<u32>, String> {
    let bytes = g.tensor_data(t);
    bytes
        .chunks_exact(4)
        .enumerate()
        .map(|(i, b)| {
            let e = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if e < 0 || e as usize >= cfg.n_expert {
                Err(format!(
                    "{}: entry {i} = {e} is not an expert id (0..{})",
                    t.name, cfg.n_expert
                ))
            } else {
                Ok(e as u32)
            }
        })
        .collect()
}

fn layer(cfg: &Config, g: &GgufFile, il: usize, w: &LayerWeights) -> Result<LayerParams, String> {
    let ratio = cfg.ratio(il);
    Ok(LayerParams {
        ratio,
        rope: Rope::for_ratio(cfg, ratio),
        hc_attn: hc(g, &w.hc_attn_scale, &w.hc_attn_base)?,
        hc_ffn: hc(g, &w.hc_ffn_scale, &w.hc_ffn_base)?,
        attn_norm: tensor_f32(g, &w.attn_norm)?,
        q_a_norm: tensor_f32(g, &w.attn_q_a_norm)?,
        kv_a_norm: tensor_f32(g, &w.attn_kv_a_norm)?,
        sinks: tensor_f32(g, &w.attn_sinks)?,
        compressor: w
            .attn_compressor
            .as_ref()
            .map(|c| compressor(g, c))
            .transpose()?,
        indexer_compressor: w
            .indexer
            .as_ref()
            .map(|i| compressor(g, &i.compressor))
            .transpose()?,
        ffn_norm: tensor_f32(g, &w.ffn_norm)?,
        expert_bias: w
            .exp_probs_b
            .as_ref()
            .map(|t| tensor_f32(g, t))
            .transpose()?,
        tid2eid: w
            .ffn_gate_tid2eid
            .as_ref()
            .map(|t| tid2eid(cfg, g, t))
            .transpose()?,
        swiglu_clamp: cfg.swiglu_clamp[il],
    })
}

impl Params {
    /// Decodes the small tensors of a bound model.
    pub fn load(cfg: &Config, g: &GgufFile, w: &Weights) -> Result<Params, String> {
        let layers = w
            .layers
            .iter()
            .enumerate()
            .map(|(il, lw)| layer(cfg, g, il, lw))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Params {
            layers,
            output_hc_base: tensor_f32(g, &w.output_hc_base)?,
            output_hc_scale: tensor_f32(g, &w.output_hc_scale)?[0],
            output_norm: tensor_f32(g, &w.output_norm)?,
        })
    }
}
