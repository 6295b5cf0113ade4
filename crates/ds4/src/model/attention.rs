//! Attention sublayer for a chunk of consecutive tokens (model.md §3.3): low-rank query,
//! shared K=V row, compressor and lightning indexer, sink-aware attention over the raw
//! window and the visible compressed rows, inverse RoPE, grouped low-rank output.
//!
//! Projections run batched over the chunk; the compressor and indexer updates run token by
//! token in position order (the state requires it); attention runs in parallel over
//! (token, head) with each token seeing exactly the rows visible at its own position, so the
//! result does not depend on how a prompt is chunked.

use rayon::prelude::*;

use super::cache::{Compressed, LayerCache, Rows};
use super::forward::Layer;
use super::linear::Mat;
use super::ops::{axpy, dot, rms_norm, rms_norm_rows, round_f16, top_k};
use super::params::CompressorParams;
use super::rope::{Angles, Rope};
use super::weights::CompressorWeights;
use crate::quant;

/// Scratch buffers of the attention sublayer, reused across layers and calls.
#[derive(Default)]
pub struct AttnScratch {
    /// RoPE angles of every token of the chunk, `n × R/2`.
    ang: Vec<(f32, f32)>,
    row_ang: Angles,
    /// `q_a_norm` output `qr`, `n × q_lora`.
    qr: Vec<f32>,
    /// Rotated per-head queries, `n × H·Dh`.
    q: Vec<f32>,
    /// This chunk's raw KV rows, `n × Dh`.
    kv: Vec<f32>,
    /// Compressor projections, `n × W`.
    comp_kv: Vec<f32>,
    comp_score: Vec<f32>,
    pooled: Vec<f32>,
    /// Indexer queries `n × iH·iD` and head weights `n × iH`.
    idx_q: Vec<f32>,
    idx_w: Vec<f32>,
    idx_scores: Vec<f32>,
    top: Vec<usize>,
    /// Compressed rows selected for each token (ratio-4 layers).
    selected: Vec<Vec<u32>>,
    /// Head outputs, `n × H·Dh`.
    o: Vec<f32>,
    group_in: Vec<f32>,
    group_out: Vec<f32>,
    low: Vec<f32>,
}

/// Which finishing a stored row gets (QAT simulation and storage rounding, model.md §3.0).
#[derive(Clone, Copy, PartialEq, Eq)]
enum RowKind {
    /// Raw KV rows and main compressed rows: FP8 on the non-RoPE dims.
    Kv,
    /// Indexer rows: Hadamard + FP4 over the whole row.
    Indexer,
}

/// Applies the QAT simulation (if on) and the storage rounding (production mode) to a row
/// about to be stored.
fn finish_row(l: &Layer, row: &mut [f32], kind: RowKind) {
    if l.qat {
        match kind {
            RowKind::Kv => quant::fp8sim_inplace(&mut row[..l.cfg.head_dim - l.cfg.n_rot]),
            RowKind::Indexer => quant::indexer_qat_inplace(row),
        }
    }
    if !l.exact {
        round_f16(row);
    }
}

/// Attention sublayer (model.md §3.3) for tokens at positions `p0..p0+n` with normed inputs
/// `x` (`n × D`); writes `out` (`n × D`) and updates the layer's state.
pub fn forward(
    l: &Layer,
    cache: &mut LayerCache,
    x: &[f32],
    n: usize,
    p0: usize,
    out: &mut Vec<f32>,
    s: &mut AttnScratch,
) {
    token_angles(l, n, p0, &mut s.ang);
    query(l, x, n, s);
    kv_rows(l, x, n, s);
    if let (Some(comp), Some(w), Some(p)) = (
        cache.comp.as_mut(),
        l.w.attn_compressor.as_ref(),
        l.p.compressor.as_ref(),
    ) {
        compress(l, comp, w, p, RowKind::Kv, x, n, p0, s);
    }
    if let (Some(index), Some(w), Some(p)) = (
        cache.index.as_mut(),
        l.w.indexer.as_ref(),
        l.p.indexer_compressor.as_ref(),
    ) {
        compress(l, index, &w.compressor, p, RowKind::Indexer, x, n, p0, s);
        select(l, &index.rows, x, n, p0, s);
    }
    attend(l, cache, n, p0, s);
    grouped_output(l, n, s, out);
    push_raw_window(l, cache, n, p0, &s.kv);
}

/// RoPE angles at each token's position with the layer's frequencies.
fn token_angles(l: &Layer, n: usize, p0: usize, ang: &mut Vec<(f32, f32)>) {
    let mut a = Angles::new();
    ang.clear();
    for t in 0..n {
        l.p.rope.angles(p0 + t, &mut a);
        ang.extend_from_slice(&a);
    }
}

/// Step 1: `qr = RMSNorm(Wq_a·x; q_a_norm)`; `q = Wq_b·qr` split into `H` heads of `Dh`,
/// each RMS-normalised without weight and rotated at its position.
fn query(l: &Layer, x: &[f32], n: usize, s: &mut AttnScratch) {
    let c = l.cfg;
    let (q_a, q_b) = (l.mat(&l.w.attn_q_a), l.mat(&l.w.attn_q_b));
    s.qr.resize(n * c.q_lora_rank, 0.0);
    q_a.apply(x, n, &mut s.qr, l.exact);
    rms_norm_rows(&mut s.qr, &l.p.q_a_norm, c.rms_eps);
    s.q.resize(n * c.n_head * c.head_dim, 0.0);
    q_b.apply(&s.qr, n, &mut s.q, l.exact);
    let half = c.n_rot / 2;
    for (t, qt) in s.q.chunks_exact_mut(c.n_head * c.head_dim).enumerate() {
        for head in qt.chunks_exact_mut(c.head_dim) {
            rms_norm(head, None, c.rms_eps);
            Rope::rotate_tail(head, &s.ang[t * half..(t + 1) * half], false);
        }
    }
}

/// Step 2: `kv = RMSNorm(Wkv·x; kv_a_norm)`, rotated at its position, finished for storage.
fn kv_rows(l: &Layer, x: &[f32], n: usize, s: &mut AttnScratch) {
    let c = l.cfg;
    s.kv.resize(n * c.head_dim, 0.0);
    l.mat(&l.w.attn_kv).apply(x, n, &mut s.kv, l.exact);
    let half = c.n_rot / 2;
    for (t, row) in s.kv.chunks_exact_mut(c.head_dim).enumerate() {
        rms_norm(row, Some(&l.p.kv_a_norm), c.rms_eps);
        Rope::rotate_tail(row, &s.ang[t * half..(t + 1) * half], false);
        finish_row(l, row, RowKind::Kv);
    }
}

/// Step 3 (and the indexer's own compressor of step 4), model.md §3.3.1: projects the
/// chunk, then feeds the tokens in order; each closed window becomes a row
/// `RMSNorm(pooled; norm)` rotated at the window's first position `c·r`.
#[allow(clippy::too_many_arguments)]
fn compress(
    l: &Layer,
    comp: &mut Compressed,
    w: &CompressorWeights,
    p: &CompressorParams,
    kind: RowKind,
    x: &[f32],
    n: usize,
    p0: usize,
    s: &mut AttnScratch,
) {
    let (r, width, d) = (comp.state.ratio, comp.state.width(), comp.state.d);
    s.comp_kv.resize(n * width, 0.0);
    s.comp_score.resize(n * width, 0.0);
    l.mat(&w.kv).apply(x, n, &mut s.comp_kv, l.exact);
    l.mat(&w.gate).apply(x, n, &mut s.comp_score, l.exact);
    s.pooled.resize(d, 0.0);
    for t in 0..n {
        let pos = p0 + t;
        let score = &mut s.comp_score[t * width..(t + 1) * width];
        let ape = &p.ape[(pos % r) * width..(pos % r + 1) * width];
        score.iter_mut().zip(ape).for_each(|(v, &a)| *v += a);
        let kv = &s.comp_kv[t * width..(t + 1) * width];
        if comp.state.push(pos, kv, score, &mut s.pooled) {
            rms_norm(&mut s.pooled, Some(&p.norm), l.cfg.rms_eps);
            l.p.rope.angles(pos + 1 - r, &mut s.row_ang);
            Rope::rotate_tail(&mut s.pooled, &s.row_ang, false);
            finish_row(l, &mut s.pooled, kind);
            comp.rows.push(&s.pooled);
        }
    }
}

/// Step 4, model.md §3.3.2: for each token, the compressed rows it attends to. With at most
/// `top_k` visible rows (`c < (p+1) div r`) all are used; otherwise the `top_k` best by
/// `Σ_h w_h·ReLU(qi_h·K_c)` (ties to the lower row).
fn select(l: &Layer, index_rows: &Rows, x: &[f32], n: usize, p0: usize, s: &mut AttnScratch) {
    let (c, r) = (l.cfg, l.p.ratio);
    let visible = |t: usize| (p0 + t + 1) / r;
    s.selected.resize_with(n, Vec::new);
    for sel in &mut s.selected[..n] {
        sel.clear();
    }
    if visible(n - 1) > c.idx_topk {
        indexer_queries(l, x, n, s);
    }
    let (ih, id) = (c.idx_heads, c.idx_dim);
    for t in 0..n {
        let n_t = visible(t);
        if n_t <= c.idx_topk {
            s.selected[t].extend(0..n_t as u32);
            continue;
        }
        let (q, w) = (
            &s.idx_q[t * ih * id..(t + 1) * ih * id],
            &s.idx_w[t * ih..(t + 1) * ih],
        );
        s.idx_scores.resize(n_t, 0.0);
        s.idx_scores
            .par_iter_mut()
            .with_min_len(64)
            .enumerate()
            .for_each(|(row, score)| {
                let k = index_rows.row(row);
                *score = q
                    .chunks_exact(id)
                    .zip(w)
                    .map(|(qh, &wh)| wh * dot(qh, k).max(0.0))
                    .sum();
            });
        top_k(&s.idx_scores, c.idx_topk, &mut s.top);
        s.top.sort_unstable();
        s.selected[t].extend(s.top.iter().map(|&i| i as u32));
    }
}

/// Indexer queries `qi = W_iq_b·qr` (heads of `iD`, rotated at the token's position, QAT)
/// and head weights `w = W_proj·x / sqrt(iD·iH)`.
fn indexer_queries(l: &Layer, x: &[f32], n: usize, s: &mut AttnScratch) {
    let (c, Some(iw)) = (l.cfg, l.w.indexer.as_ref()) else {
        return;
    };
    let (ih, id, half) = (c.idx_heads, c.idx_dim, c.n_rot / 2);
    s.idx_q.resize(n * ih * id, 0.0);
    l.mat(&iw.attn_q_b).apply(&s.qr, n, &mut s.idx_q, l.exact);
    for (t, qt) in s.idx_q.chunks_exact_mut(ih * id).enumerate() {
        for head in qt.chunks_exact_mut(id) {
            Rope::rotate_tail(head, &s.ang[t * half..(t + 1) * half], false);
            if l.qat {
                quant::indexer_qat_inplace(head);
            }
        }
    }
    s.idx_w.resize(n * ih, 0.0);
    l.mat(&iw.proj).apply(x, n, &mut s.idx_w, l.exact);
    let scale = 1.0 / ((id * ih) as f32).sqrt();
    s.idx_w.iter_mut().for_each(|v| *v *= scale);
}

/// The rows token `t` of the chunk attends to: raw rows of positions
/// `max(0, p−swa+1)..=p` (this chunk's from the scratch, older ones from the ring) and the
/// visible compressed rows (all of them for ratio 128, the selection for ratio 4).
struct RowSource<'a> {
    chunk_kv: &'a [f32],
    ring: &'a [f32],
    compressed: Option<&'a Rows>,
    selected: &'a [Vec<u32>],
    ratio: usize,
    p0: usize,
    swa: usize,
    dh: usize,
}

impl RowSource<'_> {
    fn for_each_row(&self, t: usize, mut f: impl FnMut(&[f32])) {
        let (p, dh) = (self.p0 + t, self.dh);
        for q in (p + 1).saturating_sub(self.swa)..=p {
            if q >= self.p0 {
                f(&self.chunk_kv[(q - self.p0) * dh..(q - self.p0 + 1) * dh]);
            } else {
                let slot = q % self.swa;
                f(&self.ring[slot * dh..(slot + 1) * dh]);
            }
        }
        if let Some(rows) = self.compressed {
            if self.ratio == 4 {
                self.selected[t]
                    .iter()
                    .for_each(|&c| f(rows.row(c as usize)));
            } else {
                (0..(p + 1) / self.ratio).for_each(|c| f(rows.row(c)));
            }
        }
    }
}

/// Steps 5 and 6: per (token, head), sink-aware softmax attention over the token's rows,
/// then the inverse rotation of the output tail at the query position.
fn attend(l: &Layer, cache: &LayerCache, n: usize, p0: usize, s: &mut AttnScratch) {
    let c = l.cfg;
    let (h_n, dh, half) = (c.n_head, c.head_dim, c.n_rot / 2);
    let src = RowSource {
        chunk_kv: &s.kv,
        ring: &cache.raw,
        compressed: cache.comp.as_ref().map(|c| &c.rows),
        selected: &s.selected,
        ratio: l.p.ratio,
        p0,
        swa: c.swa,
        dh,
    };
    let scale = 1.0 / (dh as f32).sqrt();
    let (q, ang, sinks) = (&s.q, &s.ang, &l.p.sinks);
    s.o.resize(n * h_n * dh, 0.0);
    s.o.par_chunks_mut(dh)
        .enumerate()
        .for_each_init(Vec::new, |scores, (i, o)| {
            let (t, h) = (i / h_n, i % h_n);
            attend_head(
                &q[i * dh..(i + 1) * dh],
                &src,
                t,
                sinks[h],
                scale,
                o,
                scores,
            );
            Rope::rotate_tail(o, &ang[t * half..(t + 1) * half], true);
        });
}

/// `o = Σ_r e^{s_r−m}·k_r / (e^{sink−m} + Σ_r e^{s_r−m})`, `s_r = q·k_r·scale`,
/// `m = max(sink, max_r s_r)` (model.md §3.0; the sink adds to the denominator only).
fn attend_head(
    q: &[f32],
    src: &RowSource,
    t: usize,
    sink: f32,
    scale: f32,
    o: &mut [f32],
    scores: &mut Vec<f32>,
) {
    scores.clear();
    src.for_each_row(t, |k| scores.push(dot(q, k) * scale));
    let m = scores.iter().fold(sink, |a, &b| a.max(b));
    let mut den = (sink - m).exp();
    for v in scores.iter_mut() {
        *v = (*v - m).exp();
        den += *v;
    }
    o.fill(0.0);
    let mut r = 0;
    src.for_each_row(t, |k| {
        axpy(o, scores[r], k);
        r += 1;
    });
    let inv = 1.0 / den;
    o.iter_mut().for_each(|v| *v *= inv);
}

/// Step 7: group `g` (heads `g·H/G..`, laid end to end) through rows `[g·Lo, (g+1)·Lo)` of
/// `attn_output_a`, then `attn_output_b` over the `G·Lo` concatenation.
fn grouped_output(l: &Layer, n: usize, s: &mut AttnScratch, out: &mut Vec<f32>) {
    let c = l.cfg;
    let (g_n, lo) = (c.o_groups, c.o_lora_rank);
    let hd = c.n_head * c.head_dim;
    let gw = hd / g_n;
    let wa = l.mat(&l.w.attn_output_a);
    s.low.resize(n * g_n * lo, 0.0);
    s.group_in.resize(n * gw, 0.0);
    s.group_out.resize(n * lo, 0.0);
    for g in 0..g_n {
        for t in 0..n {
            s.group_in[t * gw..(t + 1) * gw]
                .copy_from_slice(&s.o[t * hd + g * gw..t * hd + (g + 1) * gw]);
        }
        let wg: Mat = wa.slice_rows(g * lo, (g + 1) * lo);
        wg.apply(&s.group_in, n, &mut s.group_out, l.exact);
        for t in 0..n {
            s.low[(t * g_n + g) * lo..(t * g_n + g + 1) * lo]
                .copy_from_slice(&s.group_out[t * lo..(t + 1) * lo]);
        }
    }
    out.resize(n * c.n_embd, 0.0);
    l.mat(&l.w.attn_output_b).apply(&s.low, n, out, l.exact);
}

/// Stores this chunk's raw rows in the ring (only the last `swa` can still be needed).
fn push_raw_window(l: &Layer, cache: &mut LayerCache, n: usize, p0: usize, kv: &[f32]) {
    let (swa, dh) = (l.cfg.swa, l.cfg.head_dim);
    for t in n.saturating_sub(swa)..n {
        let slot = (p0 + t) % swa;
        cache.raw[slot * dh..(slot + 1) * dh].copy_from_slice(&kv[t * dh..(t + 1) * dh]);
    }
}
