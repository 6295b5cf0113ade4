//! Per-layer session state (model.md §4.1): the raw sliding window, the KV compressor
//! frontiers and the compressed / indexer rows.

use super::config::Config;

/// Frontier of one KV compressor (model.md §3.3.1). Ratio 4 keeps `2r` rows (rows `0..r` =
/// previous window, read through lane A; rows `r..2r` = current window, lane B); other
/// ratios keep `r` rows. Each row is `W = coff·d` wide; scores start at −∞, values at 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Compressor {
    pub ratio: usize,
    /// Output width `d` (`Dh` main, `iD` indexer).
    pub d: usize,
    /// `coff`: 2 for the overlapping ratio-4 compressor, else 1.
    pub coff: usize,
    pub kv: Vec<f32>,
    pub score: Vec<f32>,
}

impl Compressor {
    pub fn new(ratio: usize, d: usize, width: usize) -> Compressor {
        let coff = width / d;
        let n = coff * ratio * width;
        Compressor {
            ratio,
            d,
            coff,
            kv: vec![0.0; n],
            score: vec![f32::NEG_INFINITY; n],
        }
    }

    /// State width `W`.
    pub fn width(&self) -> usize {
        self.coff * self.d
    }

    /// Feeds the projections of the token at position `p` (`kv`, and `score` with the
    /// position bias already added). At the last token of a window (`(p+1) mod r = 0`) pools
    /// the window into `pooled` (`d` values) and returns true.
    pub fn push(&mut self, p: usize, kv: &[f32], score: &[f32], pooled: &mut [f32]) -> bool {
        let (r, w, d) = (self.ratio, self.width(), self.d);
        let slot = (self.coff - 1) * r + p % r;
        self.kv[slot * w..(slot + 1) * w].copy_from_slice(kv);
        self.score[slot * w..(slot + 1) * w].copy_from_slice(score);
        if !(p + 1).is_multiple_of(r) {
            return false;
        }
        // Candidates per output dim i: (state row, column). Ratio 4: previous window's
        // lane A then current window's lane B (model.md §6.5).
        let cand = |c: usize, i: usize| -> usize {
            if self.coff == 2 && c >= r {
                c * w + d + i
            } else {
                c * w + i
            }
        };
        let n_cand = self.coff * r;
        for (i, out) in pooled.iter_mut().enumerate().take(d) {
            let m = (0..n_cand).fold(f32::NEG_INFINITY, |m, c| m.max(self.score[cand(c, i)]));
            let (mut num, mut den) = (0.0f32, 0.0f32);
            for c in 0..n_cand {
                let e = (self.score[cand(c, i)] - m).exp();
                den += e;
                num += e * self.kv[cand(c, i)];
            }
            *out = num / den;
        }
        if self.coff == 2 {
            self.kv.copy_within(r * w..2 * r * w, 0);
            self.score.copy_within(r * w..2 * r * w, 0);
        }
        true
    }
}

/// Append-only rows (compressed KV rows or indexer rows), grown on demand up to `max_rows`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rows {
    pub width: usize,
    pub data: Vec<f32>,
    pub max_rows: usize,
}

impl Rows {
    pub fn new(width: usize, max_rows: usize) -> Rows {
        Rows {
            width,
            data: Vec::new(),
            max_rows,
        }
    }

    pub fn len(&self) -> usize {
        self.data.len() / self.width
    }

    pub fn row(&self, c: usize) -> &[f32] {
        &self.data[c * self.width..(c + 1) * self.width]
    }

    /// Appends a row, growing the buffer geometrically but never past `max_rows`.
    pub fn push(&mut self, row: &[f32]) {
        if self.data.len() == self.data.capacity() {
            let want_rows = (self.len() * 2)
                .max(64)
                .min(self.max_rows)
                .max(self.len() + 1);
            self.data
                .reserve_exact(want_rows * self.width - self.data.len());
        }
        self.data.extend_from_slice(row);
    }
}

/// A compressor and the rows it emitted.
#[derive(Clone, Debug, PartialEq)]
pub struct Compressed {
    pub state: Compressor,
    pub rows: Rows,
}

/// Everything one layer remembers between tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerCache {
    /// Ring of the last `swa` raw KV rows (`Dh` wide); position `p` lives in row `p mod swa`.
    pub raw: Vec<f32>,
    /// Main compressor and compressed rows (ratio ≠ 0).
    pub comp: Option<Compressed>,
    /// Indexer compressor and indexer rows (ratio 4).
    pub index: Option<Compressed>,
}

impl LayerCache {
    /// Empty state of layer `il` for a context of `ctx` positions.
    pub fn new(cfg: &Config, il: usize, ctx: usize) -> LayerCache {
        let ratio = cfg.ratio(il);
        let compressed = |d: usize, width: usize| Compressed {
            state: Compressor::new(ratio, d, width),
            rows: Rows::new(d, ctx / ratio),
        };
        LayerCache {
            raw: vec![0.0; cfg.swa * cfg.head_dim],
            comp: (ratio != 0).then(|| compressed(cfg.head_dim, cfg.compressor_width(ratio))),
            index: (ratio == 4).then(|| compressed(cfg.idx_dim, 2 * cfg.idx_dim)),
        }
    }

    /// Bytes held by this layer's state (allocated, not reserved).
    pub fn bytes(&self) -> usize {
        let c = |x: &Option<Compressed>| {
            x.as_ref().map_or(0, |c| {
                (c.rows.data.len() + c.state.kv.len() + c.state.score.len()) * 4
            })
        };
        self.raw.len() * 4 + c(&self.comp) + c(&self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio4_first_window_ignores_lane_a_and_shifts() {
        // d = 1, W = 2: lane A is column 0, lane B column 1.
        let mut c = Compressor::new(4, 1, 2);
        let mut out = [0f32];
        for p in 0..3 {
            assert!(!c.push(p, &[100.0, p as f32], &[0.0, 0.0], &mut out));
        }
        assert!(c.push(3, &[100.0, 3.0], &[0.0, 0.0], &mut out));
        assert!((out[0] - 1.5).abs() < 1e-6, "{}", out[0]);
        // Second window: previous lane A (all 100, score 0) mixes in with equal weight.
        for p in 4..7 {
            assert!(!c.push(p, &[0.0, 0.0], &[0.0, 0.0], &mut out));
        }
        assert!(c.push(7, &[0.0, 0.0], &[0.0, 0.0], &mut out));
        assert!((out[0] - 50.0).abs() < 1e-4, "{}", out[0]);
    }

    #[test]
    fn rows_grow_on_demand_and_stop_at_max() {
        let mut r = Rows::new(3, 100);
        assert_eq!(r.data.capacity(), 0);
        for i in 0..100 {
            r.push(&[i as f32; 3]);
        }
        assert_eq!(r.len(), 100);
        assert_eq!(r.data.capacity(), 300);
        assert_eq!(r.row(7), [7.0; 3]);
    }
}
