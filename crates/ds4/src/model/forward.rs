//! The forward pass over a chunk of consecutive tokens, layer-major (model.md §3.6, §3.7).

use super::attention::{self, AttnScratch};
use super::cache::LayerCache;
use super::config::Config;
use super::hc::{self, HcDims, HcSplit};
use super::linear::Mat;
use super::moe::{self, MoeScratch};
use super::ops::{rms_norm, rms_norm_rows};
use super::params::LayerParams;
use super::weights::LayerWeights;
use super::Model;
use crate::gguf::TensorInfo;

/// One layer's weights, small parameters and numeric switches.
pub struct Layer<'a> {
    pub cfg: &'a Config,
    pub p: &'a LayerParams,
    pub w: &'a LayerWeights,
    pub model: &'a Model,
    /// Exact mode (f32 activations, f32 stored rows).
    pub exact: bool,
    /// QAT simulations on.
    pub qat: bool,
}

impl<'a> Layer<'a> {
    pub fn mat(&self, t: &'a TensorInfo) -> Mat<'a> {
        Mat::new(self.model, t)
    }
}

/// Which positions of a chunk get logits.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Want {
    /// The last position only.
    Last,
    /// Every position (`n × vocab`).
    All,
}

/// Buffers reused by every chunk of a session.
#[derive(Default)]
pub struct Scratch {
    /// HC state of every token, `n × N·D`.
    x: Vec<f32>,
    mix: Vec<f32>,
    /// Sublayer input, `n × D`.
    y: Vec<f32>,
    split: Option<HcSplit>,
    tmp: Vec<f32>,
    /// Sublayer output, `n × D`.
    f: Vec<f32>,
    attn: AttnScratch,
    moe: MoeScratch,
}

/// Runs tokens at positions `p0..p0+n` through the model, updating `caches`, and writes
/// the requested logits into `logits`. Token ids must be `< vocab` (checked by the session).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    model: &Model,
    exact: bool,
    qat: bool,
    caches: &mut [LayerCache],
    tokens: &[u32],
    p0: usize,
    want: Want,
    s: &mut Scratch,
    logits: &mut Vec<f32>,
) {
    let (cfg, n) = (&model.cfg, tokens.len());
    let dims = HcDims {
        n: cfg.hc,
        d: cfg.n_embd,
        rms_eps: cfg.rms_eps,
        hc_eps: cfg.hc_eps,
        sinkhorn_iters: cfg.sinkhorn_iters,
    };
    let mut split = s.split.take().unwrap_or_else(HcSplit::new);
    embed(model, tokens, &mut s.x); // §3.1
    for (il, cache) in caches.iter_mut().enumerate() {
        let l = Layer {
            cfg,
            p: &model.params.layers[il],
            w: &model.weights.layers[il],
            model,
            exact,
            qat,
        };
        // §3.2 + §3.3: attention site.
        hc::control(&dims, l.mat(&l.w.hc_attn_fn), &s.x, n, &mut s.mix, exact);
        hc::pre(&dims, &l.p.hc_attn, &s.x, &s.mix, &mut s.y, &mut split);
        rms_norm_rows(&mut s.y, &l.p.attn_norm, cfg.rms_eps);
        attention::forward(&l, cache, &s.y, n, p0, &mut s.f, &mut s.attn);
        hc::post(&dims, &mut s.x, &s.f, &split, &mut s.tmp);
        // §3.2 + §3.4: FFN site.
        hc::control(&dims, l.mat(&l.w.hc_ffn_fn), &s.x, n, &mut s.mix, exact);
        hc::pre(&dims, &l.p.hc_ffn, &s.x, &s.mix, &mut s.y, &mut split);
        rms_norm_rows(&mut s.y, &l.p.ffn_norm, cfg.rms_eps);
        moe::forward(&l, &s.y, tokens, &mut s.f, &mut s.moe);
        hc::post(&dims, &mut s.x, &s.f, &split, &mut s.tmp);
    }
    s.split = Some(split);
    let first = match want {
        Want::Last => n - 1,
        Want::All => 0,
    };
    let x = &s.x[first * dims.n * dims.d..];
    head(model, &dims, x, exact, &mut s.mix, &mut s.y, logits); // §3.5
}

/// §3.1: `e = token_embd[token]` copied into all `N` streams.
fn embed(model: &Model, tokens: &[u32], x: &mut Vec<f32>) {
    let (n_hc, d) = (model.cfg.hc, model.cfg.n_embd);
    let table = Mat::new(model, &model.weights.token_embd);
    x.resize(tokens.len() * n_hc * d, 0.0);
    for (t, &tok) in tokens.iter().enumerate() {
        let streams = &mut x[t * n_hc * d..(t + 1) * n_hc * d];
        table.row_into(tok as usize, &mut streams[..d]);
        for j in 1..n_hc {
            streams.copy_within(0..d, j * d);
        }
    }
}

/// §3.5: output HC mixing, final norm and LM head for the tokens of `x` (`m × N·D`).
fn head(
    model: &Model,
    dims: &HcDims,
    x: &[f32],
    exact: bool,
    mix: &mut Vec<f32>,
    h: &mut Vec<f32>,
    logits: &mut Vec<f32>,
) {
    let (cfg, w, p) = (&model.cfg, &model.weights, &model.params);
    let m = x.len() / (dims.n * dims.d);
    hc::control(dims, Mat::new(model, &w.output_hc_fn), x, m, mix, exact);
    hc::head_mix(dims, &p.output_hc_base, p.output_hc_scale, x, mix, h);
    for row in h.chunks_exact_mut(dims.d) {
        rms_norm(row, Some(&p.output_norm), cfg.rms_eps);
    }
    logits.resize(m * cfg.n_vocab, 0.0);
    Mat::new(model, &w.output).apply(h, m, logits, exact);
}
