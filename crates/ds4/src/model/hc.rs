//! Manifold-constrained hyper-connections: `hc_pre` (with Sinkhorn), `hc_post` and the
//! output head's stream weights (model.md §3.2, §3.5).
//!
//! The HC state of one token is `N` streams of `D` values, stream-major (`flat[j·D + d]`).

use super::linear::Mat;
use super::ops::{rms_scale, sigmoid};
use super::params::HcParams;

/// Sizes and constants of the HC sites.
#[derive(Clone, Copy)]
pub struct HcDims {
    /// Streams `N`.
    pub n: usize,
    /// Model dim `D`.
    pub d: usize,
    pub rms_eps: f32,
    pub hc_eps: f32,
    pub sinkhorn_iters: usize,
}

impl HcDims {
    /// Control width `(2+N)·N`.
    pub fn mix(&self) -> usize {
        (2 + self.n) * self.n
    }
}

/// Per-token outputs of `hc_pre` kept for the matching `hc_post`.
pub struct HcSplit {
    /// `Q_k`, `n_tok × N`.
    pub post: Vec<f32>,
    /// `M[j][k]`, `n_tok × N × N`.
    pub comb: Vec<f32>,
}

impl HcSplit {
    pub fn new() -> HcSplit {
        HcSplit {
            post: Vec::new(),
            comb: Vec::new(),
        }
    }
}

/// `mix = fn · RMSNorm(flat(X))` for every token: computed as `(fn·flat)·rms` (identical
/// math, no normalised copy of the state). `mix` gets `n_tok × fn.rows` values.
pub fn control(dims: &HcDims, f: Mat, x: &[f32], n_tok: usize, mix: &mut Vec<f32>, exact: bool) {
    let flat = dims.n * dims.d;
    mix.resize(n_tok * f.rows, 0.0);
    f.apply(x, n_tok, mix, exact);
    for (t, m) in mix.chunks_exact_mut(f.rows).enumerate() {
        let s = rms_scale(&x[t * flat..(t + 1) * flat], dims.rms_eps);
        m.iter_mut().for_each(|v| *v *= s);
    }
}

/// Sinkhorn normalisation of the `N×N` matrix `c` in place (model.md §3.2 step 3, §6.9):
/// row softmax + eps, column normalisation, then `iters − 1` rounds of row and column
/// normalisation, each dividing by `sum + eps`.
pub fn sinkhorn(c: &mut [f32], n: usize, iters: usize, eps: f32) {
    for row in c.chunks_exact_mut(n) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut s = 0.0;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            s += *v;
        }
        row.iter_mut().for_each(|v| *v = *v / s + eps);
    }
    let normalize_cols = |c: &mut [f32]| {
        for k in 0..n {
            let s: f32 = (0..n).map(|j| c[j * n + k]).sum();
            (0..n).for_each(|j| c[j * n + k] /= s + eps);
        }
    };
    normalize_cols(c);
    for _ in 1..iters {
        for row in c.chunks_exact_mut(n) {
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= s + eps);
        }
        normalize_cols(c);
    }
}

/// `hc_pre` for `n_tok` tokens (model.md §3.2): from the state `x` (`n_tok × N·D`) and its
/// control vector `mix`, writes the sublayer input `y = Σ_j P_j·X_j` (`n_tok × D`) and keeps
/// `post` and the Sinkhorn-normalised `comb` for `hc_post`.
pub fn pre(
    dims: &HcDims,
    p: &HcParams,
    x: &[f32],
    mix: &[f32],
    y: &mut Vec<f32>,
    split: &mut HcSplit,
) {
    let (n, d, w) = (dims.n, dims.d, dims.mix());
    let n_tok = mix.len() / w;
    y.clear();
    y.resize(n_tok * d, 0.0);
    split.post.resize(n_tok * n, 0.0);
    split.comb.resize(n_tok * n * n, 0.0);
    for t in 0..n_tok {
        let m = &mix[t * w..(t + 1) * w];
        let streams = &x[t * n * d..(t + 1) * n * d];
        let yt = &mut y[t * d..(t + 1) * d];
        for j in 0..n {
            let pj = sigmoid(m[j] * p.scale[0] + p.base[j]) + dims.hc_eps;
            yt.iter_mut()
                .zip(&streams[j * d..(j + 1) * d])
                .for_each(|(y, &s)| *y += pj * s);
        }
        for k in 0..n {
            split.post[t * n + k] = 2.0 * sigmoid(m[n + k] * p.scale[1] + p.base[n + k]);
        }
        let c = &mut split.comb[t * n * n..(t + 1) * n * n];
        for (i, v) in c.iter_mut().enumerate() {
            *v = m[2 * n + i] * p.scale[2] + p.base[2 * n + i];
        }
        sinkhorn(c, n, dims.sinkhorn_iters, dims.hc_eps);
    }
}

/// `hc_post` in place (model.md §3.2, §6.11): `X_k ← Q_k·F + Σ_j M[j][k]·X_j` with `F` the
/// sublayer output (`n_tok × D`). `tmp` is scratch.
pub fn post(dims: &HcDims, x: &mut [f32], f: &[f32], split: &HcSplit, tmp: &mut Vec<f32>) {
    let (n, d) = (dims.n, dims.d);
    tmp.resize(n * d, 0.0);
    for (t, (xt, ft)) in x.chunks_exact_mut(n * d).zip(f.chunks_exact(d)).enumerate() {
        let q = &split.post[t * n..(t + 1) * n];
        let m = &split.comb[t * n * n..(t + 1) * n * n];
        for k in 0..n {
            let out = &mut tmp[k * d..(k + 1) * d];
            out.iter_mut().zip(ft).for_each(|(o, &fv)| *o = q[k] * fv);
            for j in 0..n {
                let mjk = m[j * n + k];
                out.iter_mut()
                    .zip(&xt[j * d..(j + 1) * d])
                    .for_each(|(o, &xv)| *o += mjk * xv);
            }
        }
        xt.copy_from_slice(tmp);
    }
}

/// Output head mixing (model.md §3.5 steps 2-3, before the final norm): `h = Σ_j w_j·X_j`
/// with `w_j = sigmoid(m_j·scale + base_j) + eps`, for every token.
pub fn head_mix(dims: &HcDims, base: &[f32], scale: f32, x: &[f32], mix: &[f32], h: &mut Vec<f32>) {
    let (n, d) = (dims.n, dims.d);
    let n_tok = mix.len() / n;
    h.clear();
    h.resize(n_tok * d, 0.0);
    for t in 0..n_tok {
        let ht = &mut h[t * d..(t + 1) * d];
        for j in 0..n {
            let wj = sigmoid(mix[t * n + j] * scale + base[j]) + dims.hc_eps;
            ht.iter_mut()
                .zip(&x[(t * n + j) * d..(t * n + j + 1) * d])
                .for_each(|(h, &s)| *h += wj * s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinkhorn_is_nearly_doubly_stochastic() {
        let mut c: Vec<f32> = (0..16).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
        sinkhorn(&mut c, 4, 20, 1e-6);
        for k in 0..4 {
            let col: f32 = (0..4).map(|j| c[j * 4 + k]).sum();
            assert!((col - 1.0).abs() < 1e-4, "column {k}: {col}");
        }
        for j in 0..4 {
            let row: f32 = c[j * 4..j * 4 + 4].iter().sum();
            assert!((row - 1.0).abs() < 1e-3, "row {j}: {row}");
        }
    }
}
