//! Quantization-aware-training simulations of the official model (model.md §3.0):
//! FP8 E4M3FN round trip for KV rows, Walsh–Hadamard + FP4 E2M1 round trip for the
//! lightning indexer. All arithmetic is f32 in the reference's order, so the results are
//! bit-exact against `ops/qat.safetensors`.

const E4M3_MAX: f32 = 448.0;
const E2M1_MAX: f32 = 6.0;
const FP8_AMAX_FLOOR: f32 = 1e-4;
/// `6·2^-126`: keeps `amax/6` a normal f32 so the power-of-two scale is well defined.
const FP4_AMAX_FLOOR: f32 = 6.0 * f32::MIN_POSITIVE;
const FP8_BLOCK: usize = 64;
const FP4_BLOCK: usize = 32;

/// `2^ceil(log2(r))` for `r > 0`, computed exactly from the bits. `ceilf(log2f(r))` (what
/// ds4's C does) can be off by one just above a power of two, which the spec rules out.
fn pow2_ceil(r: f32) -> f32 {
    if r.is_nan() || r <= 0.0 || !r.is_finite() {
        // NaN, zero, negative or inf: nothing sensible to round to; propagate.
        return r;
    }
    if r < f32::MIN_POSITIVE {
        // Subnormal (unreachable with the amax floors above): do it in f64, still exact.
        let e = (r as f64).log2().ceil() as i32;
        return (2.0f64).powi(e) as f32;
    }
    let bits = r.to_bits();
    let exp = bits >> 23; // sign is 0
    if bits & 0x7f_ffff == 0 {
        r
    } else {
        // exp + 1 == 255 yields +inf, the correct answer for r > f32::MAX/2.
        f32::from_bits((exp + 1) << 23)
    }
}

/// Rounds `x` to the nearest FP8 E4M3FN value, ties to even mantissa. Inputs beyond ±448
/// are clamped first (E4M3FN has no infinity); NaN stays NaN.
pub fn fp8_e4m3_round(x: f32) -> f32 {
    let v = x.clamp(-E4M3_MAX, E4M3_MAX);
    let a = v.abs();
    // Quantum of a's binade: 2^(e-3) with 3 mantissa bits; subnormals share the 2^-6
    // binade. Exponent from the bits (0 for f32 subnormals → clamped to -6 anyway).
    let e = ((a.to_bits() >> 23) as i32 - 127).max(-6);
    let step = f32::from_bits(((e - 3 + 127) as u32) << 23);
    let q = (a / step).round_ties_even() * step;
    q.copysign(v)
}

/// Rounds `|v| ≤ 6` to E2M1 {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even code.
fn e2m1_round(v: f32) -> f32 {
    const GRID: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    let a = v.abs();
    // Strict / non-strict comparisons alternate so each midpoint falls to the even code.
    let code = (a > 0.25) as usize
        + (a >= 0.75) as usize
        + (a > 1.25) as usize
        + (a >= 1.75) as usize
        + (a > 2.5) as usize
        + (a >= 3.5) as usize
        + (a > 5.0) as usize;
    GRID[code].copysign(v)
}

fn block_scale(x: &[f32], floor: f32, max: f32) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(floor);
    pow2_ceil(amax / max)
}

/// FP8 KV simulation: in blocks of 64, `s = 2^ceil(log2(max(amax,1e-4)/448))`,
/// `x ← E4M3(clamp(x/s, ±448))·s`. Callers pass the non-RoPE part of a KV row.
///
/// # Panics
/// If `x.len()` is not a multiple of 64 (a caller bug).
pub fn fp8sim_inplace(x: &mut [f32]) {
    assert!(
        x.len().is_multiple_of(FP8_BLOCK),
        "fp8sim: length {} not a multiple of 64",
        x.len()
    );
    for blk in x.chunks_exact_mut(FP8_BLOCK) {
        let s = block_scale(blk, FP8_AMAX_FLOOR, E4M3_MAX);
        for v in blk.iter_mut() {
            *v = fp8_e4m3_round(*v / s) * s;
        }
    }
}

/// FP4 simulation: in blocks of 32, `s = 2^ceil(log2(max(amax,6·2^-126)/6))`,
/// `x ← E2M1(clamp(x/s, ±6))·s`.
///
/// # Panics
/// If `x.len()` is not a multiple of 32 (a caller bug).
pub fn fp4sim_inplace(x: &mut [f32]) {
    assert!(
        x.len().is_multiple_of(FP4_BLOCK),
        "fp4sim: length {} not a multiple of 32",
        x.len()
    );
    for blk in x.chunks_exact_mut(FP4_BLOCK) {
        let s = block_scale(blk, FP4_AMAX_FLOOR, E2M1_MAX);
        for v in blk.iter_mut() {
            *v = e2m1_round((*v / s).clamp(-E2M1_MAX, E2M1_MAX)) * s;
        }
    }
}

/// Normalised Walsh–Hadamard transform in natural (Sylvester) order: butterflies with
/// strides 1, 2, …, n/2 mapping `(a, b) → (a+b, a−b)`, then `× f32(1/sqrt(n))`. The stride
/// order fixes the f32 rounding, so it must not be changed.
///
/// # Panics
/// If `x.len()` is not a power of two (a caller bug).
pub fn hadamard_inplace(x: &mut [f32]) {
    let n = x.len();
    assert!(
        n.is_power_of_two(),
        "hadamard: length {n} is not a power of two"
    );
    let mut h = 1;
    while h < n {
        for blk in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = blk.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        h *= 2;
    }
    let scale = (1.0 / (n as f64).sqrt()) as f32;
    for v in x.iter_mut() {
        *v *= scale;
    }
}

/// Lightning-indexer QAT on a 128-wide row (query or compressed row): Hadamard, then FP4.
///
/// # Panics
/// If the length is not a power of two ≥ 32.
pub fn indexer_qat_inplace(row: &mut [f32]) {
    hadamard_inplace(row);
    fp4sim_inplace(row);
}
