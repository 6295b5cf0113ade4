//! Small numeric primitives shared by the forward pass (model.md §0, §3.0).

/// `1/sqrt(mean(x²) + eps)`, the sum of squares accumulated in f64 (as ds4 does).
pub fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let n = x.len().max(1) as f64;
    (1.0 / (ss / n + eps as f64).sqrt()) as f32
}

/// In-place `RMSNorm(x; w)`; `w = None` is the unweighted form.
pub fn rms_norm(x: &mut [f32], w: Option<&[f32]>, eps: f32) {
    let s = rms_scale(x, eps);
    match w {
        Some(w) => x.iter_mut().zip(w).for_each(|(v, &g)| *v = *v * s * g),
        None => x.iter_mut().for_each(|v| *v *= s),
    }
}

/// Applies a weighted RMSNorm to every `w.len()`-wide row of `xs`.
pub fn rms_norm_rows(xs: &mut [f32], w: &[f32], eps: f32) {
    for row in xs.chunks_exact_mut(w.len()) {
        rms_norm(row, Some(w), eps);
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// Numerically stable softplus (model.md §3.4).
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else if x < -20.0 {
        x.exp()
    } else {
        x.exp().ln_1p()
    }
}

/// Dot product in f32 with independent partial sums (vectorizes well).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a·x`.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += a * x);
}

/// Indices of the `k` largest scores in rank order (score descending, ties to the lower
/// index, model.md §3.3.2/§3.4). `k` larger than the input returns every index.
pub fn top_k(scores: &[f32], k: usize, out: &mut Vec<usize>) {
    out.clear();
    out.extend(0..scores.len());
    let by_rank = |&a: &usize, &b: &usize| scores[b].total_cmp(&scores[a]).then(a.cmp(&b));
    if k < out.len() {
        if k == 0 {
            out.clear();
            return;
        }
        out.select_nth_unstable_by(k - 1, by_rank);
        out.truncate(k);
    }
    out.sort_unstable_by(by_rank);
}

/// Rounds every value to F16 precision (how ds4 stores KV / compressed / indexer rows).
pub fn round_f16(x: &mut [f32]) {
    for v in x {
        *v = half::f16::from_f32(*v).to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_ties_go_to_the_lower_index() {
        let s = [1.0, 3.0, 3.0, 2.0, 3.0];
        let mut o = Vec::new();
        top_k(&s, 2, &mut o);
        assert_eq!(o, [1, 2]);
        top_k(&s, 4, &mut o);
        assert_eq!(o, [1, 2, 4, 3]);
        top_k(&s, 9, &mut o);
        assert_eq!(o, [1, 2, 4, 3, 0]);
        top_k(&s, 0, &mut o);
        assert!(o.is_empty());
    }

    #[test]
    fn rms_norm_unweighted_has_unit_rms() {
        let mut x = [3.0f32, -4.0, 12.0, 0.0];
        rms_norm(&mut x, None, 0.0);
        let ms: f32 = x.iter().map(|v| v * v).sum::<f32>() / 4.0;
        assert!((ms - 1.0).abs() < 1e-6);
    }

    #[test]
    fn softplus_is_continuous_at_the_switch_points() {
        for x in [-20.0f32, 20.0] {
            let (a, b) = (softplus(x - 1e-4), softplus(x + 1e-4));
            assert!((a - b).abs() < 1e-3 * a.abs().max(1e-8), "{x}: {a} {b}");
        }
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.25).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }
}
