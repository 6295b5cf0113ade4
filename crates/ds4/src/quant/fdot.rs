//! f32 dot accumulation shared by the exact path (`dot_f32`, exact `matmul`).
//!
//! The state is 32 lanes: element `i` of a row always lands in lane `i % 32`, whether the
//! row is fed in one piece or in chunks whose lengths are multiples of 32. That invariant
//! is what makes exact-mode `matmul` (dequantize a row once, dot it with every token) equal
//! to `matvec` (dequantize chunk by chunk) bit for bit. The final reduction order is fixed.

/// Lanes of the accumulator (4 AVX2 registers).
pub(crate) const LANES: usize = 32;

/// Running accumulator; see the module docs for the lane invariant.
#[derive(Clone, Copy)]
pub(crate) struct Acc(pub(crate) [f32; LANES]);

impl Acc {
    pub(crate) fn new() -> Self {
        Acc([0.0; LANES])
    }

    /// Fixed-order reduction: fold the four 8-lane groups, then a pairwise tree.
    pub(crate) fn finish(&self) -> f32 {
        let s = &self.0;
        let mut t = [0f32; 8];
        for j in 0..8 {
            t[j] = (s[j] + s[j + 8]) + (s[j + 16] + s[j + 24]);
        }
        let u = [t[0] + t[4], t[1] + t[5], t[2] + t[6], t[3] + t[7]];
        (u[0] + u[2]) + (u[1] + u[3])
    }
}

/// Scalar twin: `lane[i % 32] += w[i]·x[i]` (separate multiply and add; no FMA).
/// `w.len()` must be a multiple of 32 unless this is the last piece of the row.
pub(crate) fn feed_scalar(acc: &mut Acc, w: &[f32], x: &[f32]) {
    debug_assert_eq!(w.len(), x.len());
    let n32 = w.len() / LANES * LANES;
    for (wc, xc) in w[..n32]
        .chunks_exact(LANES)
        .zip(x[..n32].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc.0[l] += wc[l] * xc[l];
        }
    }
    for (l, (a, b)) in w[n32..].iter().zip(&x[n32..]).enumerate() {
        acc.0[l] += a * b;
    }
}
