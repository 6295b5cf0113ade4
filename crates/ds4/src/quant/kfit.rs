//! Shared sub-block fitting for the Q2_K / Q4_K weight quantizers.
//!
//! Both formats approximate a sub-block as `w = scale·q − offset` with `q ∈ [0, nmax]` and
//! `offset ≥ 0` (the format stores the minimum as an unsigned multiple of `dmin`). We start
//! from the min/max fit and refine with a few rounds of least squares on the chosen `q`;
//! a refinement is kept only if it lowers the squared error, so the result is never worse
//! than min/max.

/// Returns `(scale, offset)` for `x`, both ≥ 0.
pub(crate) fn fit(x: &[f32], nmax: u8) -> (f32, f32) {
    let nmax_f = nmax as f32;
    let lo = x.iter().fold(0.0f32, |m, &v| m.min(v)); // offset ≥ 0 requires lo ≤ 0
    let hi = x.iter().fold(lo, |m, &v| m.max(v));
    if hi <= lo || hi.is_nan() || lo.is_nan() {
        // All zero or all equal to a non-positive value: representable with scale 0.
        return (0.0, -lo);
    }
    let mut best = ((hi - lo) / nmax_f, -lo);
    let mut best_err = err(x, best.0, best.1, nmax_f);
    let mut cur = best;
    for _ in 0..4 {
        let (scale, offset) = cur;
        let (mut sq, mut sx, mut sqq, mut sqx) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for &v in x {
            let q = assign(v, scale, offset, nmax_f) as f64;
            sq += q;
            sx += v as f64;
            sqq += q * q;
            sqx += q * v as f64;
        }
        let n = x.len() as f64;
        let den = n * sqq - sq * sq;
        if den <= 0.0 {
            break;
        }
        let mut s = (n * sqx - sq * sx) / den;
        let mut o = -(sx - s * sq) / n;
        if o < 0.0 {
            // Clamp the intercept and refit the slope alone.
            o = 0.0;
            s = if sqq > 0.0 { sqx / sqq } else { 0.0 };
        }
        if s.is_nan() || s <= 0.0 || !s.is_finite() {
            break;
        }
        cur = (s as f32, o as f32);
        let e = err(x, cur.0, cur.1, nmax_f);
        if e < best_err {
            best_err = e;
            best = cur;
        } else {
            break;
        }
    }
    best
}

/// Nearest level for `v` given the sub-block parameters.
#[inline]
pub(crate) fn assign(v: f32, scale: f32, offset: f32, nmax: f32) -> u8 {
    if scale > 0.0 {
        ((v + offset) / scale).round().clamp(0.0, nmax) as u8
    } else {
        0
    }
}

fn err(x: &[f32], scale: f32, offset: f32, nmax: f32) -> f64 {
    x.iter()
        .map(|&v| {
            let q = assign(v, scale, offset, nmax) as f32;
            let e = (scale * q - offset - v) as f64;
            e * e
        })
        .sum()
}

/// Quantizes per-sub-block scales (or offsets) to `bits`-bit multiples of one f16 super
/// scale. Returns the f16-rounded super scale (as stored) and the integer multiples.
pub(crate) fn quantize_scales(vals: &[f32], levels: u8, out: &mut [u8]) -> half::f16 {
    let vmax = vals.iter().fold(0.0f32, |m, &v| m.max(v));
    let sup = half::f16::from_f32(vmax / levels as f32);
    let s = sup.to_f32();
    for (o, &v) in out.iter_mut().zip(vals) {
        *o = if s > 0.0 {
            (v / s).round().clamp(0.0, levels as f32) as u8
        } else {
            0
        };
    }
    sup
}
