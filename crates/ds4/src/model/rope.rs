//! Partial interleaved RoPE on the tail of a vector, with optional YaRN (model.md §3.0).
//!
//! Frequencies and angles are computed in f64 (safe at 1M positions); the rotation itself
//! runs in f32.

use super::config::Config;

/// The inverse frequencies `f'_i` of one RoPE regime, one per pair `i = 0..R/2`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    freqs: Vec<f64>,
}

/// `(cos θ_i, sin θ_i)` for every pair at one position.
pub type Angles = Vec<(f32, f32)>;

impl Rope {
    /// Plain RoPE: `f_i = base^(−2i/R)`.
    pub fn plain(base: f64, n_rot: usize) -> Rope {
        let freqs = (0..n_rot / 2)
            .map(|i| base.powf(-2.0 * i as f64 / n_rot as f64))
            .collect();
        Rope { freqs }
    }

    /// RoPE with YaRN frequency interpolation and no magnitude scaling (model.md §3.0):
    /// pairs below `low` keep `f_i`, pairs above `high` use `f_i/factor`, linear blend between.
    pub fn yarn(
        base: f64,
        n_rot: usize,
        factor: f64,
        orig_ctx: f64,
        beta_fast: f64,
        beta_slow: f64,
    ) -> Rope {
        let r = n_rot as f64;
        let c = |n: f64| r * (orig_ctx / (2.0 * std::f64::consts::PI * n)).ln() / (2.0 * base.ln());
        let low = c(beta_fast).floor().max(0.0);
        let mut high = c(beta_slow).ceil().min(r - 1.0);
        if low == high {
            high += 0.001;
        }
        let freqs = Rope::plain(base, n_rot)
            .freqs
            .iter()
            .enumerate()
            .map(|(i, &f)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let smooth = 1.0 - ramp;
                f / factor * (1.0 - smooth) + f * smooth
            })
            .collect();
        Rope { freqs }
    }

    /// The regime of a layer with compression ratio `ratio`: plain base for ratio 0,
    /// compressed base + YaRN otherwise (model.md §6.3).
    pub fn for_ratio(cfg: &Config, ratio: usize) -> Rope {
        if ratio == 0 {
            Rope::plain(cfg.rope_base, cfg.n_rot)
        } else {
            Rope::yarn(
                cfg.compress_rope_base,
                cfg.n_rot,
                cfg.rope_scale_factor,
                cfg.rope_orig_ctx,
                cfg.yarn_beta_fast,
                cfg.yarn_beta_slow,
            )
        }
    }

    pub fn freqs(&self) -> &[f64] {
        &self.freqs
    }

    /// Angles at position `pos` (`θ_i = pos·f'_i` in f64).
    pub fn angles(&self, pos: usize, out: &mut Angles) {
        out.clear();
        out.extend(self.freqs.iter().map(|&f| {
            let (s, c) = (pos as f64 * f).sin_cos();
            (c as f32, s as f32)
        }));
    }

    /// Rotates the last `2·angles.len()` dims of `x` in adjacent pairs by `θ`
    /// (or by `−θ` when `inverse`).
    pub fn rotate_tail(x: &mut [f32], angles: &[(f32, f32)], inverse: bool) {
        let off = x.len() - 2 * angles.len();
        for (pair, &(c, s)) in x[off..].chunks_exact_mut(2).zip(angles) {
            let s = if inverse { -s } else { s };
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = a * s + b * c;
        }
    }

    /// Rotates the tail of every `width`-wide head of `x`.
    pub fn rotate_heads(x: &mut [f32], width: usize, angles: &[(f32, f32)], inverse: bool) {
        for head in x.chunks_exact_mut(width) {
            Rope::rotate_tail(head, angles, inverse);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_yarn_ramp_is_15_to_25() {
        let plain = Rope::plain(160000.0, 64);
        let y = Rope::yarn(160000.0, 64, 16.0, 65536.0, 32.0, 1.0);
        for i in 0..32 {
            let ratio = y.freqs[i] / plain.freqs[i];
            let want = if i <= 15 {
                1.0
            } else if i >= 25 {
                1.0 / 16.0
            } else {
                let smooth = 1.0 - (i as f64 - 15.0) / 10.0;
                1.0 / 16.0 * (1.0 - smooth) + smooth
            };
            assert!((ratio - want).abs() < 1e-12, "pair {i}: {ratio} vs {want}");
        }
    }

    #[test]
    fn inverse_rotation_undoes_rotation() {
        let r = Rope::plain(10000.0, 4);
        let mut a = Angles::new();
        r.angles(12345, &mut a);
        let orig = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut x = orig;
        Rope::rotate_tail(&mut x, &a, false);
        assert_eq!(x[..2], orig[..2]);
        assert!(x[2..]
            .iter()
            .zip(&orig[2..])
            .any(|(a, b)| (a - b).abs() > 1e-3));
        Rope::rotate_tail(&mut x, &a, true);
        for (a, b) in x.iter().zip(orig) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
