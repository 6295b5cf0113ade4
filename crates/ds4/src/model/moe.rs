//! Mixture-of-experts sublayer (model.md §3.4): sqrt-softplus router (bias for selection
//! only, hash routing on the first layers), normalised and scaled weights, clamped SwiGLU
//! routed experts and the shared expert.
//!
//! Tokens are grouped by expert so each expert's matrices are read once per chunk. Every
//! token's output is summed in ascending expert order, then the shared expert, whatever the
//! chunk: results do not depend on chunking.

use super::forward::Layer;
use super::linear::Mat;
use super::ops::{silu, softplus, top_k};

/// ds4's floor on the router weight sum, 2^-14 = 6.1035e-5 (model.md §3.4 step 3).
const WEIGHT_SUM_FLOOR: f32 = 1.0 / 16384.0;

#[derive(Default)]
pub struct MoeScratch {
    /// Router scores `sqrt(softplus(logit))`, `n × E`.
    scores: Vec<f32>,
    biased: Vec<f32>,
    top: Vec<usize>,
    /// Chosen experts and their weights, `n × k`.
    chosen: Vec<usize>,
    weights: Vec<f32>,
    /// One expert's tokens: (token, weight).
    batch: Vec<(usize, f32)>,
    xs: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

/// MoE sublayer for `n` tokens with normed inputs `z` (`n × D`) and ids `tokens`; writes
/// `out` (`n × D`).
pub fn forward(l: &Layer, z: &[f32], tokens: &[u32], out: &mut Vec<f32>, s: &mut MoeScratch) {
    let (c, n) = (l.cfg, tokens.len());
    router_scores(l, z, n, s);
    route(l, tokens, s);
    out.clear();
    out.resize(n * c.n_embd, 0.0);
    let (gate, up, down) = (
        l.mat(&l.w.ffn_gate_exps),
        l.mat(&l.w.ffn_up_exps),
        l.mat(&l.w.ffn_down_exps),
    );
    for e in 0..c.n_expert {
        s.batch.clear();
        for t in 0..n {
            for j in 0..c.n_expert_used {
                if s.chosen[t * c.n_expert_used + j] == e {
                    s.batch.push((t, s.weights[t * c.n_expert_used + j]));
                }
            }
        }
        if s.batch.is_empty() {
            continue;
        }
        let f = c.n_ff_exp;
        let expert = (gate.expert(e, f), up.expert(e, f), down.expert(e, c.n_embd));
        swiglu_ffn(l, expert, z, out, s);
    }
    let shared = (
        l.mat(&l.w.ffn_gate_shexp),
        l.mat(&l.w.ffn_up_shexp),
        l.mat(&l.w.ffn_down_shexp),
    );
    s.batch.clear();
    s.batch.extend((0..n).map(|t| (t, 1.0)));
    swiglu_ffn(l, shared, z, out, s);
}

/// Step 1: `s_e = sqrt(softplus(Wg·z))`.
fn router_scores(l: &Layer, z: &[f32], n: usize, s: &mut MoeScratch) {
    s.scores.resize(n * l.cfg.n_expert, 0.0);
    l.mat(&l.w.ffn_gate_inp).apply(z, n, &mut s.scores, l.exact);
    s.scores.iter_mut().for_each(|v| *v = softplus(*v).sqrt());
}

/// Steps 2-3: selection (hash table row of the token, or top-k of `score + bias`, ties to
/// the lower id) and weights `s_sel / Σ s_sel · expert_weights_scale` from unbiased scores.
fn route(l: &Layer, tokens: &[u32], s: &mut MoeScratch) {
    let (c, k) = (l.cfg, l.cfg.n_expert_used);
    let n = tokens.len();
    s.chosen.resize(n * k, 0);
    s.weights.resize(n * k, 0.0);
    for (t, &tok) in tokens.iter().enumerate() {
        let scores = &s.scores[t * c.n_expert..(t + 1) * c.n_expert];
        let chosen = &mut s.chosen[t * k..(t + 1) * k];
        if let Some(table) = &l.p.tid2eid {
            let row = &table[tok as usize * k..(tok as usize + 1) * k];
            chosen
                .iter_mut()
                .zip(row)
                .for_each(|(c, &e)| *c = e as usize);
        } else {
            s.biased.clear();
            s.biased.extend_from_slice(scores);
            if let Some(bias) = &l.p.expert_bias {
                s.biased.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
            }
            top_k(&s.biased, k, &mut s.top);
            chosen.copy_from_slice(&s.top);
        }
        let sum: f32 = chosen.iter().map(|&e| scores[e]).sum();
        let norm = if c.expert_weights_norm {
            1.0 / sum.max(WEIGHT_SUM_FLOOR)
        } else {
            1.0
        };
        for (w, &e) in s.weights[t * k..(t + 1) * k].iter_mut().zip(chosen.iter()) {
            *w = scores[e] * norm * c.expert_weights_scale;
        }
    }
}

/// Steps 4-5 for the tokens in `s.batch`: `out_t += W2·(silu(min(W1·z,c))·clamp(W3·z,±c)·w_t)`.
fn swiglu_ffn(
    l: &Layer,
    (w1, w3, w2): (Mat, Mat, Mat),
    z: &[f32],
    out: &mut [f32],
    s: &mut MoeScratch,
) {
    let (d, f, m) = (l.cfg.n_embd, w1.rows, s.batch.len());
    let clamp = l.p.swiglu_clamp;
    s.xs.resize(m * d, 0.0);
    for (i, &(t, _)) in s.batch.iter().enumerate() {
        s.xs[i * d..(i + 1) * d].copy_from_slice(&z[t * d..(t + 1) * d]);
    }
    s.gate.resize(m * f, 0.0);
    s.up.resize(m * f, 0.0);
    w1.apply(&s.xs, m, &mut s.gate, l.exact);
    w3.apply(&s.xs, m, &mut s.up, l.exact);
    for (i, &(_, w)) in s.batch.iter().enumerate() {
        let (g, u) = (&mut s.gate[i * f..(i + 1) * f], &s.up[i * f..(i + 1) * f]);
        g.iter_mut().zip(u).for_each(|(g, &u)| {
            *g = silu(g.min(clamp)) * u.clamp(-clamp, clamp) * w;
        });
    }
    s.down.resize(m * d, 0.0);
    w2.apply(&s.gate, m, &mut s.down, l.exact);
    for (i, &(t, _)) in s.batch.iter().enumerate() {
        out[t * d..(t + 1) * d]
            .iter_mut()
            .zip(&s.down[i * d..(i + 1) * d])
            .for_each(|(o, &v)| *o += v);
    }
}
