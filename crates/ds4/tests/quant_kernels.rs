//! Property tests of the quant kernels on random inputs: SIMD twins against the scalar
//! reference, quantized dots against dequantize-then-dot, matvec/matmul consistency,
//! quantizer quality and encode round trips.

use ds4::quant::*;

/// xorshift64* — deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unif(&mut self) -> f32 {
        (self.u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        // Box–Muller.
        let u = self.unif().max(1e-7);
        let v = self.unif();
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
    fn vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }
}

const QTYPES: [GgmlType; 4] = [
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::IQ2_XXS,
];
const ALL: [GgmlType; 7] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::IQ2_XXS,
];

/// Random weight row: quantized from Gaussian data where a quantizer exists, otherwise
/// (and for half of the K-quant rows) random block bytes with a sane f16 scale, so the
/// kernels also see code/scale combinations our quantizer never emits.
fn random_row(ty: GgmlType, n: usize, rng: &mut Rng, raw: bool) -> Vec<u8> {
    let rb = ty.row_bytes(n as u64).unwrap() as usize;
    let mut w = vec![0u8; rb];
    if raw || !can_quantize(ty) {
        w.iter_mut().for_each(|b| *b = rng.u64() as u8);
        let h = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
        for b in w.chunks_exact_mut(ty.block_bytes()) {
            match ty {
                GgmlType::Q8_0 | GgmlType::IQ2_XXS => {
                    b[0..2].copy_from_slice(&h(0.01 + 0.01 * rng.unif()))
                }
                GgmlType::Q4_K => {
                    b[0..2].copy_from_slice(&h(0.002 * rng.unif()));
                    b[2..4].copy_from_slice(&h(0.002 * rng.unif()));
                }
                GgmlType::Q2_K => {
                    b[80..82].copy_from_slice(&h(0.01 * rng.unif()));
                    b[82..84].copy_from_slice(&h(0.01 * rng.unif()));
                }
                _ => {}
            }
        }
        if matches!(
            ty,
            GgmlType::Q8_0 | GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS
        ) {
            return w;
        }
    }
    quantize_row(ty, &rng.vec(n, 0.05), &mut w).unwrap();
    w
}

fn dequant(ty: GgmlType, row: &[u8], n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    dequantize_row(ty, row, &mut v);
    v
}

/// Σ a_i·b_i in f64 and Σ |a_i·b_i| (the scale of f32 summation error).
fn dot64(a: &[f32], b: &[f32]) -> (f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0), |(s, m), (&x, &y)| {
        (s + x as f64 * y as f64, m + (x as f64 * y as f64).abs())
    })
}

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Scalar];
    if Isa::Avx2.available() {
        v.push(Isa::Avx2);
    } else {
        eprintln!("note: AVX2 not available, SIMD twins not exercised");
    }
    v
}

/// Exact dot (every format, every ISA) equals the f64 dot of the dequantized row within
/// f32 summation error: |err| ≤ 1e-5·Σ|w·x| (n ≤ 4096 → worst case ~n·2^-24 ≈ 2.4e-4,
/// typical ~√n·2^-24; the bound is loose enough for both lane orders).
#[test]
fn dot_f32_matches_dequant_then_dot() {
    let mut rng = Rng(1);
    for ty in ALL {
        for &n in &[256usize, 512, 4096] {
            for raw in [false, true] {
                let row = random_row(ty, n, &mut rng, raw);
                let x = rng.vec(n, 1.0);
                let (want, mag) = dot64(&dequant(ty, &row, n), &x);
                for isa in isas() {
                    let got = dot_f32_with(isa, ty, &row, &x) as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * mag + 1e-30,
                        "{ty} {isa:?} n={n}: {got} vs {want} (mag {mag})"
                    );
                }
            }
        }
    }
}

/// Float rows of any length (tails not a multiple of 32) through both ISAs.
#[test]
fn dot_f32_odd_lengths() {
    let mut rng = Rng(2);
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        for n in [1usize, 7, 31, 33, 255, 257, 300, 1000] {
            let row = random_row(ty, n, &mut rng, false);
            let x = rng.vec(n, 1.0);
            let (want, mag) = dot64(&dequant(ty, &row, n), &x);
            for isa in isas() {
                let got = dot_f32_with(isa, ty, &row, &x) as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * mag + 1e-30,
                    "{ty} {isa:?} n={n}"
                );
            }
        }
    }
}

/// Integer dots equal the f64 dot of dequantized weights and dequantized activations up to
/// f32 rounding of the per-block scale products (≤ 1e-5 of Σ|w·x̂|), for every ISA; and
/// they differ from the exact f32 dot by at most the activation quantization noise:
/// Σ_i |w_i|·(amax_block/254) (half a step of the activation grid).
#[test]
fn quantized_dots_match_dequant_then_dot() {
    let mut rng = Rng(3);
    for ty in QTYPES {
        for &n in &[256usize, 1024, 4096] {
            for raw in [false, true] {
                let row = random_row(ty, n, &mut rng, raw);
                let w = dequant(ty, &row, n);
                let mut x = rng.vec(n, 1.0);
                x[3] = 7.5; // an outlier, as real activations have
                let (got_by_isa, xhat, blk): (Vec<f64>, Vec<f32>, usize) = if ty == GgmlType::Q8_0 {
                    let xq = quantize_act_q8_0(&x);
                    let xhat = xq
                        .iter()
                        .flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32))
                        .collect();
                    (
                        isas()
                            .into_iter()
                            .map(|i| dot_q8_0_with(i, &row, &xq) as f64)
                            .collect(),
                        xhat,
                        32,
                    )
                } else {
                    let xq = quantize_act_q8_k(&x);
                    let xhat = xq
                        .iter()
                        .flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32))
                        .collect();
                    (
                        isas()
                            .into_iter()
                            .map(|i| dot_q8_k_with(i, ty, &row, &xq) as f64)
                            .collect(),
                        xhat,
                        256,
                    )
                };
                let (want, mag) = dot64(&w, &xhat);
                let (exact, _) = dot64(&w, &x);
                let noise: f64 = w
                    .chunks(blk)
                    .zip(x.chunks(blk))
                    .map(|(wc, xc)| {
                        let amax = xc.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                        wc.iter().map(|v| v.abs() as f64).sum::<f64>() * amax / 254.0 * 1.0001
                    })
                    .sum();
                for (k, got) in got_by_isa.iter().enumerate() {
                    assert!(
                        (got - want).abs() <= 1e-5 * mag + 1e-30,
                        "{ty} isa#{k} n={n} raw={raw}: {got} vs {want}"
                    );
                    assert!(
                        (got - exact).abs() <= noise + 1e-5 * mag,
                        "{ty} n={n}: {got} vs exact {exact} (noise {noise})"
                    );
                }
            }
        }
    }
}

/// SIMD twins of the K/IQ dots compute exact integer sums and the scalar's f32 expression,
/// so they must agree bit for bit; also with extreme activations (±127/-128 everywhere).
#[test]
fn simd_k_dots_bit_identical_to_scalar() {
    if !Isa::Avx2.available() {
        eprintln!("AVX2 not available: skipped");
        return;
    }
    let mut rng = Rng(4);
    for ty in [GgmlType::Q2_K, GgmlType::Q4_K, GgmlType::IQ2_XXS] {
        for trial in 0..50 {
            let n = 256 * (1 + trial % 16);
            let row = random_row(ty, n, &mut rng, trial % 2 == 0);
            let mut xq = quantize_act_q8_k(&rng.vec(n, 1.0));
            if trial % 5 == 0 {
                for b in xq.iter_mut() {
                    for (i, q) in b.qs.iter_mut().enumerate() {
                        *q = if (rng.u64() >> 7) & 1 == 0 { -128 } else { 127 };
                        let _ = i;
                    }
                    for g in 0..16 {
                        b.bsums[g] = b.qs[16 * g..16 * g + 16].iter().map(|&q| q as i16).sum();
                    }
                }
            }
            let s = dot_q8_k_with(Isa::Scalar, ty, &row, &xq);
            let v = dot_q8_k_with(Isa::Avx2, ty, &row, &xq);
            assert_eq!(s.to_bits(), v.to_bits(), "{ty} trial {trial}: {s} vs {v}");
        }
    }
}

/// Q8_0 SIMD twin: exact integer block sums, different f32 accumulation → within
/// 1e-5·Σ|d_w·d_x·sumi|; -128 in both operands is handled exactly (no sign-trick wrap).
#[test]
fn simd_q8_0_dot_matches_scalar() {
    if !Isa::Avx2.available() {
        eprintln!("AVX2 not available: skipped");
        return;
    }
    let mut rng = Rng(5);
    for trial in 0..100 {
        let n = 32 * (1 + trial % 40);
        let mut row = random_row(GgmlType::Q8_0, n, &mut rng, true);
        let mut xq = quantize_act_q8_0(&rng.vec(n, 1.0));
        if trial % 4 == 0 {
            for (b, xb) in row.chunks_exact_mut(34).zip(xq.iter_mut()) {
                b[2..].fill(0x80);
                xb.qs = [-128; 32];
            }
        }
        let s = dot_q8_0_with(Isa::Scalar, &row, &xq) as f64;
        let v = dot_q8_0_with(Isa::Avx2, &row, &xq) as f64;
        let w = dequant(GgmlType::Q8_0, &row, n);
        let xhat: Vec<f32> = xq
            .iter()
            .flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32))
            .collect();
        let (want, mag) = dot64(&w, &xhat);
        assert!(
            (s - v).abs() <= 1e-5 * mag + 1e-30,
            "trial {trial}: {s} vs {v}"
        );
        assert!(
            (v - want).abs() <= 1e-5 * mag + 1e-30,
            "trial {trial}: {v} vs {want}"
        );
    }
}

/// matvec equals the per-row dot (same kernels) in both modes; matmul equals matvec per
/// token exactly (bit for bit), in both modes, for every format, including shapes whose
/// row count is not a multiple of the tile sizes.
#[test]
fn matvec_and_matmul_consistent() {
    let mut rng = Rng(6);
    for ty in ALL {
        let (n_rows, n_cols, n_tok) = (
            37,
            if ty.block_elems() == 32 || ty.block_elems() == 1 {
                288
            } else {
                512
            },
            5,
        );
        let w: Vec<u8> = (0..n_rows)
            .flat_map(|_| random_row(ty, n_cols, &mut rng, false))
            .collect();
        let rb = w.len() / n_rows;
        let xs = rng.vec(n_tok * n_cols, 1.0);
        for exact in [true, false] {
            let mut ys = vec![0f32; n_tok * n_rows];
            matmul(ty, &w, n_rows, n_cols, &xs, n_tok, &mut ys, exact);
            for t in 0..n_tok {
                let x = &xs[t * n_cols..(t + 1) * n_cols];
                let mut y = vec![0f32; n_rows];
                matvec(ty, &w, n_rows, n_cols, x, &mut y, exact);
                for o in 0..n_rows {
                    let row = &w[o * rb..(o + 1) * rb];
                    let want = if exact
                        || !matches!(
                            ty,
                            GgmlType::Q8_0 | GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS
                        ) {
                        dot_f32(ty, row, x)
                    } else if ty == GgmlType::Q8_0 {
                        dot_q8_0(row, &quantize_act_q8_0(x))
                    } else {
                        dot_q8_k(ty, row, &quantize_act_q8_k(x))
                    };
                    assert_eq!(
                        y[o].to_bits(),
                        want.to_bits(),
                        "{ty} exact={exact} matvec row {o}"
                    );
                    assert_eq!(
                        ys[t * n_rows + o].to_bits(),
                        y[o].to_bits(),
                        "{ty} exact={exact} matmul t={t} row {o}"
                    );
                }
            }
        }
    }
}

/// Q2_K / Q4_K quantizers on Gaussian rows: relative RMS error below a format-specific
/// bound (measured ≈ 0.28 / 0.075 here; bounds leave headroom), per-element error below
/// the group's range, zero rows stay exactly zero, and requantizing the dequantized row
/// does not increase the error against the original by more than a small factor.
#[test]
fn k_quantizers_error_bounds() {
    let mut rng = Rng(7);
    for (ty, bound, group) in [(GgmlType::Q2_K, 0.40, 16), (GgmlType::Q4_K, 0.10, 32)] {
        let n = 4096;
        let x = rng.vec(n, 0.02);
        let mut q = vec![0u8; ty.row_bytes(n as u64).unwrap() as usize];
        quantize_row(ty, &x, &mut q).unwrap();
        let y = dequant(ty, &q, n);
        let num: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
        let rel = (num / den).sqrt();
        eprintln!("{ty}: relative RMSE {rel:.4}");
        assert!(rel < bound, "{ty}: relative RMSE {rel}");
        for (xc, yc) in x.chunks(group).zip(y.chunks(group)) {
            let lo = xc.iter().fold(0f32, |m, &v| m.min(v));
            let hi = xc.iter().fold(0f32, |m, &v| m.max(v));
            for (a, b) in xc.iter().zip(yc) {
                assert!(
                    (a - b).abs() <= (hi - lo) * 1.01 + 1e-7,
                    "{ty}: {a} -> {b}, range {lo}..{hi}"
                );
            }
        }
        // Requantizing the grid values must land (almost) on the same grid.
        let mut q2 = vec![0u8; q.len()];
        quantize_row(ty, &y, &mut q2).unwrap();
        let y2 = dequant(ty, &q2, n);
        let num2: f64 = x
            .iter()
            .zip(&y2)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        assert!(num2 <= num * 1.5, "{ty}: requantized error {num2} vs {num}");
        // Zeros and a constant negative block.
        let mut z = vec![0f32; 256];
        quantize_row(ty, &z, &mut q[..ty.block_bytes()]).unwrap();
        assert!(dequant(ty, &q[..ty.block_bytes()], 256)
            .iter()
            .all(|&v| v == 0.0));
        z.iter_mut().for_each(|v| *v = -0.5);
        quantize_row(ty, &z, &mut q[..ty.block_bytes()]).unwrap();
        let d = dequant(ty, &q[..ty.block_bytes()], 256);
        assert!(
            d.iter().all(|&v| (v + 0.5).abs() < 0.01),
            "{ty}: constant block {:?}",
            &d[..4]
        );
    }
}

/// F16 / BF16 / F32 encoders invert the decoders on every non-NaN 16-bit pattern, and
/// round to nearest even on a midpoint.
#[test]
fn float_encoders_round_trip() {
    for ty in [GgmlType::F16, GgmlType::BF16] {
        let src: Vec<u8> = (0..=u16::MAX).flat_map(|p| p.to_le_bytes()).collect();
        let vals = dequant(ty, &src, 65536);
        let mut back = vec![0u8; src.len()];
        quantize_row(ty, &vals, &mut back).unwrap();
        for (i, v) in vals.iter().enumerate() {
            if !v.is_nan() {
                assert_eq!(
                    &back[2 * i..2 * i + 2],
                    &src[2 * i..2 * i + 2],
                    "{ty} pattern {i:#06x}"
                );
            }
        }
    }
    // 1 + 2^-11 is the midpoint between f16 1.0 and 1+2^-10: ties to even → 1.0.
    let mut b = [0u8; 2];
    quantize_row(GgmlType::F16, &[1.0 + 2f32.powi(-11)], &mut b).unwrap();
    assert_eq!(u16::from_le_bytes(b), 0x3c00);
    let x = [1.5f32, -0.0, f32::INFINITY, 3.25e-20];
    let mut b = [0u8; 16];
    quantize_row(GgmlType::F32, &x, &mut b).unwrap();
    assert_eq!(dequant(GgmlType::F32, &b, 4), x);
}

/// Bad data never panics: NaN/inf scales and activations flow through as NaN/inf; the
/// unsupported quantizer reports an error instead of panicking.
#[test]
fn hostile_inputs_do_not_panic() {
    let mut rng = Rng(8);
    for ty in QTYPES {
        let mut row = random_row(ty, 256, &mut rng, true);
        row.iter_mut().for_each(|b| *b = 0xFF); // NaN f16 scales everywhere
        let mut x = rng.vec(256, 1.0);
        x[0] = f32::NAN;
        x[1] = f32::INFINITY;
        let _ = dequant(ty, &row, 256);
        let _ = dot_f32(ty, &row, &x);
        let mut y = [0f32; 1];
        matvec(ty, &row, 1, 256, &x, &mut y, false);
        matvec(ty, &row, 1, 256, &x, &mut y, true);
    }
    let mut x = vec![f32::NAN; 256];
    x[5] = f32::INFINITY;
    let _ = quantize_act_q8_0(&x);
    let _ = quantize_act_q8_k(&x);
    for ty in [GgmlType::Q8_0, GgmlType::Q2_K, GgmlType::Q4_K] {
        let mut q = vec![0u8; ty.row_bytes(256).unwrap() as usize];
        quantize_row(ty, &x, &mut q).unwrap();
    }
    let mut v = x.clone();
    fp8sim_inplace(&mut v);
    let mut v = x[..128].to_vec();
    indexer_qat_inplace(&mut v);
    assert_eq!(
        quantize_row(GgmlType::IQ2_XXS, &[0.0; 256], &mut [0u8; 66]),
        Err(QuantError::Unsupported(GgmlType::IQ2_XXS))
    );
}

/// E4M3 rounding: representable values are fixed points, saturation at ±448, and a few
/// hand-checked ties (ties to even mantissa).
#[test]
fn fp8_round_basics() {
    assert_eq!(fp8_e4m3_round(448.0), 448.0);
    assert_eq!(fp8_e4m3_round(1e6), 448.0);
    assert_eq!(fp8_e4m3_round(-1e6), -448.0);
    assert_eq!(fp8_e4m3_round(1.0625), 1.0); // midpoint of 1 and 1.125 → even (1.0)
    assert_eq!(fp8_e4m3_round(1.1875), 1.25); // midpoint of 1.125 and 1.25 → even (1.25)
    assert_eq!(fp8_e4m3_round(2f32.powi(-10)), 0.0); // half the smallest subnormal → 0
    assert_eq!(fp8_e4m3_round(3.0 * 2f32.powi(-10)), 2f32.powi(-8)); // 1.5 quanta → 2
    for e in -9..=8 {
        let v = 2f32.powi(e);
        assert_eq!(fp8_e4m3_round(v), v);
    }
}

/// SIMD dequantizers are bit-identical to the scalar ones on random block bytes (every
/// scale pattern, NaN/inf/subnormal f16 scales included: NaN bits must match too).
#[test]
fn simd_dequant_bit_identical_to_scalar() {
    if !Isa::Avx2.available() {
        eprintln!("AVX2 not available: skipped");
        return;
    }
    let mut rng = Rng(9);
    for ty in QTYPES {
        for trial in 0..40 {
            let n = ty.block_elems() * (1 + trial % 9) * if ty == GgmlType::Q8_0 { 8 } else { 1 };
            let rb = ty.row_bytes(n as u64).unwrap() as usize;
            let row: Vec<u8> = if trial % 2 == 0 {
                (0..rb).map(|_| rng.u64() as u8).collect()
            } else {
                random_row(ty, n, &mut rng, trial % 4 == 1)
            };
            let mut s = vec![0f32; n];
            let mut v = vec![1f32; n];
            dequantize_row_with(Isa::Scalar, ty, &row, &mut s);
            dequantize_row_with(Isa::Avx2, ty, &row, &mut v);
            for i in 0..n {
                assert_eq!(
                    s[i].to_bits(),
                    v[i].to_bits(),
                    "{ty} trial {trial} element {i}: {} vs {}",
                    s[i],
                    v[i]
                );
            }
        }
    }
}

/// The exact dot of a quantized row equals, bit for bit, the exact dot of its dequantized
/// values stored as an F32 row (same ISA): the SIMD dequantizers feed the same values to
/// the same 32-lane accumulator in the same order as before.
#[test]
fn exact_dot_equals_f32_row_dot() {
    let mut rng = Rng(10);
    for ty in QTYPES {
        for &n in &[256usize, 1024, 4096] {
            for raw in [false, true] {
                let row = random_row(ty, n, &mut rng, raw);
                let w = dequant(ty, &row, n);
                let wb: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
                let x = rng.vec(n, 1.0);
                for isa in isas() {
                    let a = dot_f32_with(isa, ty, &row, &x);
                    let b = dot_f32_with(isa, GgmlType::F32, &wb, &x);
                    assert_eq!(a.to_bits(), b.to_bits(), "{ty} {isa:?} n={n}: {a} vs {b}");
                }
            }
        }
    }
}

/// IQ2_XXS: every grid index and every sign index, against q8 extremes (-128 included),
/// scalar vs SIMD bit for bit; and the matvec path (which uses the cheaper sign form when
/// the activations come from the quantizer) equals the scalar dot.
#[test]
fn iq2_xxs_all_grid_and_sign_codes() {
    if !Isa::Avx2.available() {
        eprintln!("AVX2 not available: skipped");
        return;
    }
    let mut rng = Rng(11);
    let n = 4096;
    let nblk = n / 256;
    let mut row = vec![0u8; nblk * 66];
    let mut gi = 0usize; // runs over grid indices
    let mut si = 0usize; // runs over sign indices
    for b in row.chunks_exact_mut(66) {
        b[0..2].copy_from_slice(&half::f16::from_f32(0.013).to_bits().to_le_bytes());
        for ib in 0..8 {
            let mut a = 0u32;
            let mut w = (rng.u64() as u32 & 15) << 28;
            for l in 0..4 {
                a |= ((gi % 256) as u32) << (8 * l);
                w |= ((si % 128) as u32) << (7 * l);
                gi += 1;
                si += 1;
            }
            b[2 + 8 * ib..6 + 8 * ib].copy_from_slice(&a.to_le_bytes());
            b[6 + 8 * ib..10 + 8 * ib].copy_from_slice(&w.to_le_bytes());
        }
    }
    assert!(gi >= 256 && si >= 128);
    for trial in 0..6 {
        let mut xq = quantize_act_q8_k(&rng.vec(n, 1.0));
        for b in xq.iter_mut() {
            for q in b.qs.iter_mut() {
                *q = match trial {
                    0 => -128,
                    1 => 127,
                    2 => {
                        if rng.u64() & 1 == 0 {
                            -128
                        } else {
                            127
                        }
                    }
                    3 => (rng.u64() as u8) as i8,
                    _ => *q,
                };
            }
            for g in 0..16 {
                b.bsums[g] = b.qs[16 * g..16 * g + 16].iter().map(|&q| q as i16).sum();
            }
        }
        let s = dot_q8_k_with(Isa::Scalar, GgmlType::IQ2_XXS, &row, &xq);
        let v = dot_q8_k_with(Isa::Avx2, GgmlType::IQ2_XXS, &row, &xq);
        assert_eq!(s.to_bits(), v.to_bits(), "trial {trial}: {s} vs {v}");
    }
    let x = rng.vec(n, 1.0);
    let mut y = [0f32; 1];
    matvec(
        GgmlType::IQ2_XXS,
        &row[..66 * nblk],
        1,
        n,
        &x,
        &mut y,
        false,
    );
    let want = dot_q8_k_with(Isa::Scalar, GgmlType::IQ2_XXS, &row, &quantize_act_q8_k(&x));
    assert_eq!(y[0].to_bits(), want.to_bits());
}

/// The Q8_K activation quantizer never emits -128 for blocks whose largest |x| is a normal
/// number above ~3e-39 (so that 1/max is finite): adversarial blocks with ties, a negative
/// maximum, values just below the maximum, tiny and huge scales. (With a subnormal maximum
/// `1/max` overflows and -128 does occur, which is why matvec checks the blocks before
/// choosing the cheaper sign form instead of assuming this.)
#[test]
fn q8_k_quantizer_never_emits_minus_128() {
    let mut rng = Rng(12);
    for trial in 0..2000 {
        let scale = 10f32.powi(trial % 64 - 34);
        let mut x = rng.vec(256, scale);
        let m = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        match trial % 4 {
            0 => x[7] = -m * 1.0000001,
            1 => {
                x[0] = m;
                x[1] = -m;
                x[2] = -m * 0.99999994;
            }
            2 => x.iter_mut().for_each(|v| *v = -v.abs()),
            _ => x[255] = -m * 3.0,
        }
        for b in quantize_act_q8_k(&x) {
            assert!(b.qs.iter().all(|&q| q != -128), "trial {trial}");
        }
    }
    // The subnormal case: -128 appears, and matvec still equals the exact-form dot.
    let x: Vec<f32> = (0..256)
        .map(|i| -1e-40 * (1.0 + i as f32 / 256.0))
        .collect();
    let xq = quantize_act_q8_k(&x);
    assert!(xq[0].qs.contains(&-128));
    let row = random_row(GgmlType::IQ2_XXS, 256, &mut rng, true);
    let mut y = [0f32; 1];
    matvec(GgmlType::IQ2_XXS, &row, 1, 256, &x, &mut y, false);
    let want = dot_q8_k_with(Isa::Scalar, GgmlType::IQ2_XXS, &row, &xq);
    assert_eq!(y[0].to_bits(), want.to_bits());
}

/// The register-tiled `matmul` kernels (several tokens per weight block, token counts that
/// leave every remainder, row counts that split into uneven parallel tiles, float rows
/// whose length is not a multiple of 32) equal `matvec` per token bit for bit, in both
/// modes.
#[test]
fn matmul_tiles_equal_matvec_many_shapes() {
    let mut rng = Rng(61);
    for ty in ALL {
        let col_opts: &[usize] = match ty.block_elems() {
            1 => &[100, 1024],
            32 => &[64, 4096],
            _ => &[256, 4096],
        };
        for &n_cols in col_opts {
            for &(n_rows, n_tok) in &[(1usize, 9usize), (19, 6), (300, 7), (40, 2)] {
                let w: Vec<u8> = (0..n_rows)
                    .flat_map(|_| random_row(ty, n_cols, &mut rng, n_rows % 2 == 0))
                    .collect();
                let xs = rng.vec(n_tok * n_cols, 1.0);
                for exact in [true, false] {
                    let mut ys = vec![f32::NAN; n_tok * n_rows];
                    matmul(ty, &w, n_rows, n_cols, &xs, n_tok, &mut ys, exact);
                    for t in 0..n_tok {
                        let mut y = vec![0f32; n_rows];
                        matvec(
                            ty,
                            &w,
                            n_rows,
                            n_cols,
                            &xs[t * n_cols..(t + 1) * n_cols],
                            &mut y,
                            exact,
                        );
                        for o in 0..n_rows {
                            assert_eq!(
                                ys[t * n_rows + o].to_bits(),
                                y[o].to_bits(),
                                "{ty} {n_rows}x{n_cols} n_tok={n_tok} exact={exact} t={t} row {o}"
                            );
                        }
                    }
                }
            }
        }
    }
}
