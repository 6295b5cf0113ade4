//! Token sampling with ds4's rules and defaults (protocol.md §4.4).
//!
//! Defaults: temperature 1, top_p 1, min_p 0.05, top_k 0 (no cap). `temperature <= 0` is
//! argmax (ties to the lowest id). A seed > 0 makes sampling reproducible: the random stream
//! is ds4's xorshift64*, so the same seed draws the same uniforms as ds4.

use std::sync::atomic::{AtomicU64, Ordering};

/// Sampling knobs of one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// 0 = no cap; capped at 1024.
    pub top_k: usize,
    /// Outside (0, 1] means 1 (off).
    pub top_p: f32,
    /// Tokens whose probability is below `min_p` × the best token's are dropped.
    pub min_p: f32,
    /// 0 = seed from the clock and a process-wide counter.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.05,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Applies ds4's clamping of out-of-range knobs.
    pub fn normalized(mut self) -> Self {
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            self.top_p = 1.0;
        }
        if self.min_p.is_nan() || self.min_p < 0.0 {
            self.min_p = 0.0;
        }
        self.top_k = self.top_k.min(1024);
        if self.temperature.is_nan() {
            self.temperature = 1.0;
        }
        self
    }
}

/// ds4's xorshift64* generator.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1) with 24 bits of resolution.
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) & 0xFF_FFFF) as f32 / (1u32 << 24) as f32
    }
}

/// A sampler: config plus its random stream.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub cfg: SamplerConfig,
    rng: Rng,
    scratch: Vec<(u32, f32)>,
}

fn clock_seed() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ SEQ
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Index of the largest finite-or-not logit, lowest index on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() && !l.is_nan() {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let cfg = cfg.normalized();
        let seed = if cfg.seed == 0 {
            clock_seed()
        } else {
            cfg.seed
        };
        Sampler {
            cfg,
            rng: Rng::new(seed),
            scratch: Vec::new(),
        }
    }

    /// Draws the next token id from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let c = self.cfg;
        if c.temperature <= 0.0 || logits.len() <= 1 {
            return argmax(logits);
        }
        let max = logits[argmax(logits) as usize];
        if !max.is_finite() {
            return argmax(logits);
        }
        let inv_t = 1.0 / c.temperature;
        if c.top_k == 0 && c.top_p >= 1.0 {
            let all = logits.iter().enumerate().map(|(i, &l)| (i as u32, l));
            return self.draw_min_p(all, max, argmax(logits));
        }
        // Sorted path: top_k and/or top_p.
        let cand = &mut self.scratch;
        cand.clear();
        let mut total = 0.0f64;
        for (i, &l) in logits.iter().enumerate() {
            let w = ((l - max) * inv_t).exp();
            total += w as f64;
            if w > 0.0 {
                cand.push((i as u32, w));
            }
        }
        let keep_sorted = |cand: &mut Vec<(u32, f32)>, k: usize| {
            let by = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            if k > 0 && k < cand.len() {
                cand.select_nth_unstable_by(k - 1, by);
                cand.truncate(k);
            }
            cand.sort_unstable_by(by);
        };
        keep_sorted(cand, c.top_k);
        let p0 = cand.first().map_or(1.0, |x| x.1);
        let mut kept = 0usize;
        let mut cum = 0.0f64;
        for &(_, w) in cand.iter() {
            if w < p0 * c.min_p {
                break;
            }
            kept += 1;
            cum += w as f64 / total;
            if cum >= c.top_p as f64 {
                break;
            }
        }
        cand.truncate(kept.max(1));
        let sum: f64 = cand.iter().map(|x| x.1 as f64).sum();
        let target = self.rng.uniform() as f64 * sum;
        let mut acc = 0.0f64;
        for &(id, w) in cand.iter() {
            acc += w as f64;
            if acc > target {
                return id;
            }
        }
        cand.last().map_or(0, |x| x.0)
    }
}

impl Sampler {
    /// The min-p rule alone (no top-k / top-p cap): weights relative to the best token
    /// (best = 1), so min_p compares directly; `tokens` in index order, `best` the argmax.
    fn draw_min_p(
        &mut self,
        tokens: impl Iterator<Item = (u32, f32)> + Clone,
        max: f32,
        best: u32,
    ) -> u32 {
        let c = self.cfg;
        let inv_t = 1.0 / c.temperature;
        let mut sum = 0.0f64;
        for (_, l) in tokens.clone() {
            let w = ((l - max) * inv_t).exp();
            if w >= c.min_p {
                sum += w as f64;
            }
        }
        let target = self.rng.uniform() as f64 * sum;
        let mut acc = 0.0f64;
        let mut last = best;
        for (i, l) in tokens {
            let w = ((l - max) * inv_t).exp();
            if w >= c.min_p {
                acc += w as f64;
                last = i;
                if acc > target {
                    return i;
                }
            }
        }
        last
    }

    /// When this sampler's draw depends only on the tokens whose scaled logit
    /// `(l − max)/temperature` is at least the returned cut (a little below ln(min_p)), a
    /// device may send just those: see [`Sampler::sample_sparse`]. `None` for greedy
    /// decoding and for top-k / top-p, which need the whole row.
    pub fn sparse_cut(&self) -> Option<f32> {
        let c = self.cfg;
        (c.temperature > 0.0 && c.top_k == 0 && c.top_p >= 1.0 && c.min_p > 0.0)
            .then(|| c.min_p.min(1.0).ln() - 0.01)
    }

    /// [`Sampler::sample`] from a narrowed row: `best` and `max` are the row's argmax and its
    /// value, `cands` (index order) every token with `(l − max)/temperature ≥`
    /// [`Sampler::sparse_cut`]. Draws the same token, from the same random stream, as
    /// `sample` on the full row.
    pub fn sample_sparse(&mut self, best: u32, max: f32, cands: &[(u32, f32)]) -> u32 {
        if self.cfg.temperature <= 0.0 || !max.is_finite() {
            return best;
        }
        self.draw_min_p(cands.iter().copied(), max, best)
    }
}

/// Log-probability of a token and its best alternatives under the raw (temperature 1)
/// distribution.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logit: f32,
    pub logprob: f32,
}

/// log_softmax normaliser: `max + ln Σ exp(l − max)`.
fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if !max.is_finite() {
        return max;
    }
    max + logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// The chosen token's log-probability and the `top_n` most likely tokens (descending,
/// ties to the lowest id).
pub fn logprobs(logits: &[f32], chosen: u32, top_n: usize) -> (TokenLogprob, Vec<TokenLogprob>) {
    let lse = log_sum_exp(logits);
    let lp = |id: u32| {
        let logit = logits[id as usize];
        TokenLogprob {
            id,
            logit,
            logprob: (logit as f64 - lse) as f32,
        }
    };
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let by = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let n = top_n.min(ids.len());
    if n > 0 && n < ids.len() {
        ids.select_nth_unstable_by(n - 1, by);
    }
    ids.truncate(n);
    ids.sort_unstable_by(by);
    (lp(chosen), ids.into_iter().map(lp).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 3.0, 0.0, 2.9, -5.0]
    }

    #[test]
    fn greedy_takes_lowest_index_on_ties() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&logits()), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 1.0]), 1);
    }

    /// What a device sends for a narrowed row: argmax, max, and the tokens at or above the cut.
    pub(crate) fn narrow(row: &[f32], cut: f32, inv_t: f32) -> (u32, f32, Vec<(u32, f32)>) {
        let best = argmax(row);
        let max = row[best as usize];
        let cands = row
            .iter()
            .enumerate()
            .filter(|(_, &l)| (l - max) * inv_t >= cut)
            .map(|(i, &l)| (i as u32, l))
            .collect();
        (best, max, cands)
    }

    #[test]
    fn sparse_sampling_draws_what_the_full_row_draws() {
        // Rows with ties, a wide spread and values right at the min-p boundary.
        let mut r = Rng::new(9);
        for case in 0..60 {
            let n = 50 + case * 37;
            let mut row: Vec<f32> = (0..n).map(|_| r.uniform() * 12.0 - 6.0).collect();
            row[case % n] = row[(case * 7) % n];
            let temperature = [0.3f32, 0.7, 1.0, 1.6][case % 4];
            let min_p = [0.05f32, 0.2, 0.01, 1.0, 3.0][case % 5];
            // A token exactly at the boundary w = min_p (for min_p <= 1).
            let best = argmax(&row) as usize;
            if min_p <= 1.0 {
                row[(case * 13 + 1) % n] = row[best] + min_p.ln() * temperature;
            }
            let cfg = SamplerConfig {
                temperature,
                min_p,
                seed: 1 + case as u64,
                ..Default::default()
            };
            let mut full = Sampler::new(cfg);
            let mut sparse = Sampler::new(cfg);
            let cut = sparse.sparse_cut().expect("min-p only config narrows");
            let (b, m, c) = narrow(&row, cut, 1.0 / temperature);
            assert!(c.len() < n || min_p <= 0.01, "the cut narrows the row");
            for step in 0..50 {
                assert_eq!(
                    full.sample(&row),
                    sparse.sample_sparse(b, m, &c),
                    "case {case} step {step}"
                );
            }
        }
        // Configs that need the whole row do not narrow.
        for cfg in [
            SamplerConfig::greedy(),
            SamplerConfig {
                top_k: 40,
                ..Default::default()
            },
            SamplerConfig {
                top_p: 0.9,
                ..Default::default()
            },
            SamplerConfig {
                min_p: 0.0,
                ..Default::default()
            },
        ] {
            assert_eq!(Sampler::new(cfg).sparse_cut(), None, "{cfg:?}");
        }
    }

    #[test]
    fn rng_matches_xorshift64_star() {
        // Independent recomputation of the first output for seed 1.
        let mut x: u64 = 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        assert_eq!(Rng::new(1).next_u64(), x.wrapping_mul(0x2545F4914F6CDD1D));
        assert_eq!(Rng::new(0).0, 0x9E3779B97F4A7C15);
        let mut r = Rng::new(7);
        for _ in 0..1000 {
            let u = r.uniform();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_the_distribution() {
        let cfg = SamplerConfig {
            seed: 42,
            min_p: 0.0,
            ..Default::default()
        };
        let l = logits();
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg);
            (0..200).map(|_| s.sample(&l)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg);
            (0..200).map(|_| s.sample(&l)).collect()
        };
        assert_eq!(a, b);
        // Empirical frequencies follow softmax within sampling noise.
        let mut s = Sampler::new(cfg);
        let n = 40_000;
        let mut counts = vec![0usize; l.len()];
        for _ in 0..n {
            counts[s.sample(&l) as usize] += 1;
        }
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        for (i, &c) in counts.iter().enumerate() {
            let p = (l[i] as f64).exp() / z;
            let f = c as f64 / n as f64;
            assert!(
                (f - p).abs() < 4.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-3,
                "token {i}: {f} vs {p}"
            );
        }
    }

    #[test]
    fn filters_restrict_the_support() {
        let l = logits();
        let draw = |cfg: SamplerConfig| {
            let mut s = Sampler::new(SamplerConfig { seed: 3, ..cfg });
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..3000 {
                seen.insert(s.sample(&l));
            }
            seen.into_iter().collect::<Vec<_>>()
        };
        assert_eq!(
            draw(SamplerConfig {
                top_k: 2,
                min_p: 0.0,
                ..Default::default()
            }),
            vec![1, 4]
        );
        assert_eq!(
            draw(SamplerConfig {
                top_k: 3,
                min_p: 0.0,
                ..Default::default()
            }),
            vec![1, 4, 6]
        );
        // min_p 0.5: exp(2.5-3)=0.61 and exp(2.9-3)=0.90 stay, exp(1-3)=0.135 goes.
        assert_eq!(
            draw(SamplerConfig {
                min_p: 0.5,
                ..Default::default()
            }),
            vec![1, 2, 4, 6]
        );
        // top_p small: only the top token (ties resolved to the lowest id first).
        assert_eq!(
            draw(SamplerConfig {
                top_p: 0.01,
                min_p: 0.0,
                ..Default::default()
            }),
            vec![1]
        );
        // Very low temperature concentrates on the tied best tokens.
        assert_eq!(
            draw(SamplerConfig {
                temperature: 1e-3,
                min_p: 0.0,
                ..Default::default()
            }),
            vec![1, 4]
        );
    }

    #[test]
    fn normalization_clamps_knobs() {
        let c = SamplerConfig {
            top_p: 1.5,
            min_p: -1.0,
            top_k: 5000,
            ..Default::default()
        }
        .normalized();
        assert_eq!((c.top_p, c.min_p, c.top_k), (1.0, 0.0, 1024));
        let c = SamplerConfig {
            top_p: 0.0,
            ..Default::default()
        }
        .normalized();
        assert_eq!(c.top_p, 1.0);
    }

    #[test]
    fn logprobs_match_log_softmax() {
        let l = logits();
        let (chosen, top) = logprobs(&l, 2, 3);
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        assert!((chosen.logprob as f64 - (2.5f64 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.id).collect::<Vec<_>>(), vec![1, 4, 6]);
        let total: f64 = l.iter().map(|&x| (x as f64 - z.ln()).exp()).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }
}
