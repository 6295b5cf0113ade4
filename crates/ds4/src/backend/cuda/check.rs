//! GPU-vs-CPU verification and bandwidth benchmarks of the kernels, shared by
//! `ds4 cuda selftest` / `ds4 cuda bench` and the `tests/cuda*.rs` integration tests.
//!
//! References are computed on the CPU from `quant::dequantize_row` (bit-exact GGML decoding)
//! with f64 sums. The error of an output is reported relative to its *L1 mass*
//! `Σ_i |w_i·x_i|`, the natural scale of f32 summation error (a plain relative error is
//! meaningless for outputs that cancel to near zero).

use super::device::{
    ActQuant, CudaBackend, CudaError, GemmScratch, GpuWeight, Result, SUPPORTED_TYPES,
};
use super::prefill::Grouping;
use crate::quant::{
    dequantize_row, matvec as cpu_matvec, quantize_act_q8_0, quantize_act_q8_k, quantize_row,
    GgmlType,
};
use cudarc::driver::{CudaSlice, DevicePtr};
use half::f16;

/// Tolerance (max error / L1 mass) of the f32-activation kernels. f32 sums of a few thousand
/// terms stay near 1e-7 of the mass; an indexing bug gives O(1).
pub const TOL_F32: f64 = 1e-5;
/// Tolerance of the f16-GEMM path: weights and activations rounded to f16 (2^-11 relative
/// each), f32 accumulation.
pub const TOL_F16_GEMM: f64 = 2e-3;

/// Tolerance of the grouped MoE (gate|up GEMM, SwiGLU, down GEMM, all with f16 operands):
/// the f16 rounding of the SwiGLU output adds to the two products' (max error over the down
/// product's L1 mass). An indexing or grouping bug gives O(1).
pub const TOL_MOE_GROUPED: f64 = 1e-2;

/// Small deterministic PRNG (SplitMix64): test data must be reproducible from a seed and the
/// library has no `rand` dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            c.copy_from_slice(&r[..c.len()]);
        }
    }
    /// f16 bits of a random scale with magnitude in [lo, hi), random sign if `signed`.
    fn scale(&mut self, lo: f64, hi: f64, signed: bool) -> [u8; 2] {
        let mut v = lo + (hi - lo) * self.uniform();
        if signed && self.next_u64() & 1 == 1 {
            v = -v;
        }
        f16::from_f64(v).to_bits().to_le_bytes()
    }
}

/// Random activations: normal, with a few large outliers (real hidden states have them).
pub fn random_activations(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v = rng.normal();
            if rng.uniform() < 0.01 {
                (v * 20.0) as f32
            } else {
                v as f32
            }
        })
        .collect()
}

/// Random weight bytes of type `ty`: valid blocks with random payload and sane f16 scales
/// (every code, scale and grid index is exercised), or quantized random floats for F32/F16.
pub fn random_weight(rng: &mut Rng, ty: GgmlType, n_rows: usize, n_cols: usize) -> Vec<u8> {
    let rb = n_cols / ty.block_elems() * ty.block_bytes();
    let mut w = vec![0u8; rb * n_rows];
    match ty {
        GgmlType::F32 | GgmlType::F16 => {
            let x: Vec<f32> = (0..n_rows * n_cols)
                .map(|_| (rng.normal() * 0.05) as f32)
                .collect();
            quantize_row(ty, &x, &mut w).expect("float types quantize");
        }
        _ => {
            rng.fill(&mut w);
            for b in w.chunks_exact_mut(ty.block_bytes()) {
                match ty {
                    GgmlType::Q8_0 => b[0..2].copy_from_slice(&rng.scale(1e-3, 2e-2, true)),
                    GgmlType::Q2_K => {
                        b[80..82].copy_from_slice(&rng.scale(1e-3, 2e-2, false));
                        b[82..84].copy_from_slice(&rng.scale(1e-3, 2e-2, false));
                    }
                    GgmlType::Q4_K => {
                        b[0..2].copy_from_slice(&rng.scale(1e-4, 2e-3, false));
                        b[2..4].copy_from_slice(&rng.scale(1e-4, 2e-3, false));
                    }
                    GgmlType::IQ2_XXS => b[0..2].copy_from_slice(&rng.scale(1e-3, 2e-2, true)),
                    _ => unreachable!("no random generator for {ty}"),
                }
            }
        }
    }
    w
}

/// CPU reference of one matrix: per output, (Σ w·x, Σ |w·x|) in f64.
fn reference(ty: GgmlType, w: &[u8], n_rows: usize, n_cols: usize, x: &[f32]) -> Vec<(f64, f64)> {
    let rb = n_cols / ty.block_elems() * ty.block_bytes();
    let mut row = vec![0f32; n_cols];
    (0..n_rows)
        .map(|o| {
            dequantize_row(ty, &w[o * rb..(o + 1) * rb], &mut row);
            row.iter().zip(x).fold((0.0, 0.0), |(s, a), (&wv, &xv)| {
                let p = wv as f64 * xv as f64;
                (s + p, a + p.abs())
            })
        })
        .collect()
}

/// One line of the self-test report.
#[derive(Clone, Debug)]
pub struct CheckRow {
    /// Kernel name (matvec, matmul, gemm_f16, moe_shared_x, moe_per_x, dequant_f32, …).
    pub kernel: String,
    /// Weight type.
    pub ty: GgmlType,
    /// Shape description.
    pub shape: String,
    /// Max |gpu − ref|.
    pub max_abs: f64,
    /// Max |gpu − ref| / Σ|w·x| (for dequant: mismatching elements).
    pub max_err: f64,
    /// ‖gpu − ref‖₂ / ‖ref‖₂.
    pub rel_l2: f64,
    /// Pass threshold on `max_err`.
    pub tol: f64,
    /// Outcome.
    pub pass: bool,
    /// Extra information (e.g. deviation from the CPU `quant::matvec`).
    pub note: String,
}

impl CheckRow {
    /// CSV header matching [`CheckRow::csv`].
    pub const CSV_HEADER: &'static str =
        "kernel,type,shape,max_abs,max_err_over_l1,rel_l2,tol,pass,note";
    /// One CSV line.
    pub fn csv(&self) -> String {
        format!(
            "{},{},{},{:.3e},{:.3e},{:.3e},{:.0e},{},{}",
            self.kernel,
            self.ty,
            self.shape,
            self.max_abs,
            self.max_err,
            self.rel_l2,
            self.tol,
            if self.pass { "PASS" } else { "FAIL" },
            self.note
        )
    }
}

fn compare(
    kernel: &str,
    ty: GgmlType,
    shape: String,
    gpu: &[f32],
    refs: &[(f64, f64)],
    tol: f64,
) -> CheckRow {
    let (mut max_abs, mut max_err, mut num, mut den) = (0f64, 0f64, 0f64, 0f64);
    let mut bad = false;
    for (&g, &(r, l1)) in gpu.iter().zip(refs) {
        if !g.is_finite() {
            bad = true;
            continue;
        }
        let d = (g as f64 - r).abs();
        max_abs = max_abs.max(d);
        max_err = max_err.max(d / l1.max(1e-30));
        num += d * d;
        den += r * r;
    }
    bad |= gpu.len() != refs.len();
    CheckRow {
        kernel: kernel.into(),
        ty,
        shape,
        max_abs,
        max_err,
        rel_l2: (num / den.max(1e-300)).sqrt(),
        tol,
        pass: !bad && max_err <= tol,
        note: if bad {
            "non-finite or missing outputs".into()
        } else {
            String::new()
        },
    }
}

/// Poisoned (NaN) output buffer, so unwritten elements are caught.
fn poisoned(be: &CudaBackend, n: usize) -> Result<CudaSlice<f32>> {
    be.upload_f32(&vec![f32::NAN; n])
}

/// How many of the paired halves of `a` and `b` differ (lengths must match, else all).
fn f16_differ(a: &[u16], b: &[u16]) -> usize {
    if a.len() != b.len() {
        return a.len().max(b.len());
    }
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

/// How many of the paired values of `a` and `b` differ in bits.
fn bits_differ(a: &[f32], b: &[f32]) -> usize {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// `same_bits`, and every value finite: two outputs that both stayed poisoned (a kernel that
/// wrote nothing) do not count as equal.
fn same_finite_bits(a: &[f32], b: &[f32]) -> bool {
    same_bits(a, b) && a.iter().all(|v| v.is_finite())
}

/// Runs every kernel for every type on random data against the CPU reference.
/// `quick` shrinks the shapes (for the integration tests).
pub fn selftest(be: &CudaBackend, seed: u64, quick: bool) -> Result<Vec<CheckRow>> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let shapes: &[(usize, usize)] = if quick {
        &[(77, 512)]
    } else {
        &[(300, 1024), (2048, 4096)]
    };
    for ty in SUPPORTED_TYPES {
        for &(n_rows, n_cols) in shapes {
            check_type(be, &mut rng, ty, n_rows, n_cols, quick, &mut out)?;
        }
        check_moe(be, &mut rng, ty, &mut out)?;
    }
    for (tg, td) in [
        (GgmlType::IQ2_XXS, GgmlType::Q2_K),
        (GgmlType::Q8_0, GgmlType::Q8_0),
        (GgmlType::F16, GgmlType::Q4_K),
        (GgmlType::F32, GgmlType::Q2_K),
    ] {
        let n_tok = if quick { 13 } else { 75 };
        check_moe_grouped(be, &mut rng, tg, td, (8, 512, 256, n_tok, 3), &mut out)?;
    }
    if !quick {
        // Flash shapes (D 4096, F 2048): the pf_mx fragment decoders over many 256-blocks.
        let (tg, td) = (GgmlType::IQ2_XXS, GgmlType::Q2_K);
        check_moe_grouped(be, &mut rng, tg, td, (4, 4096, 2048, 90, 2), &mut out)?;
        // Many small tiles: every token-group count NG = 1..8 of pf_mx(s|w)'s dispatch.
        check_moe_grouped(be, &mut rng, tg, td, (12, 4096, 2048, 40, 6), &mut out)?;
        // One expert with 300 rows: pf_mxw4's full 128-token tiles and a remainder.
        check_moe_grouped(be, &mut rng, tg, td, (2, 4096, 2048, 150, 2), &mut out)?;
    }
    check_attn(be, &mut rng, &mut out)?;
    check_indexer(be, &mut rng, &mut out)?;
    check_indexer_tc(be, &mut rng, &mut out)?;
    check_idx_q_finish_w(be, &mut rng, &mut out)?;
    check_qkv_finish1(be, &mut rng, &mut out)?;
    check_e2m1_fast(be, &mut out)?;
    check_compress(be, &mut rng, &mut out)?;
    check_mv8_grouped(be, &mut rng, &mut out)?;
    for (n, d) in [(4usize, 4096usize), (2, 256)] {
        check_hc_pre1(be, &mut rng, n, d, false, &mut out)?;
        check_hc_pre1(be, &mut rng, n, d, true, &mut out)?;
    }
    // 8192 (a 512-thread block): the loop form in both runs.
    for width in [1024usize, 4096, 8192] {
        check_rms_norm_q8(be, &mut rng, width, &mut out)?;
    }
    check_hc_post_moe(be, &mut rng, &mut out)?;
    check_hc_post_ring(be, &mut rng, &mut out)?;
    for kx in [0usize, 6, 9] {
        check_hc_post_mix(be, &mut rng, kx, &mut out)?;
    }
    check_route(be, &mut rng, &mut out)?;
    check_hc_prefill(be, &mut rng, &mut out)?;
    check_pf_group(be, &mut rng, &mut out)?;
    check_hc_fn_range(be, &mut rng, &mut out)?;
    for t_n in [5usize, 37] {
        check_hc_post_fn(be, &mut rng, t_n, &mut out)?;
    }
    for ty in [GgmlType::Q8_0, GgmlType::Q2_K, GgmlType::IQ2_XXS] {
        check_glu_int8(be, &mut rng, ty, &mut out)?;
    }
    check_pdl_chain(be, &mut rng, &mut out)?;
    check_sample(be, &mut rng, &mut out)?;
    check_mv2_f16(be, &mut rng, &mut out)?;
    Ok(out)
}

/// The FP4 rounding of the indexer queries' warp form (`e2m1_round_fast`) against the
/// reference rounding (`e2m1_round`, the CPU's rule) on every float, clamped to [−6, 6] as
/// their callers do: the same bits or the pattern where they first differ.
fn check_e2m1_fast(be: &CudaBackend, out: &mut Vec<CheckRow>) -> Result<()> {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let st = be.stream();
    let f = be.function("k_e2m1_check")?;
    let bad = st.clone_htod(&[0u64, u64::MAX])?;
    let pb = bad.device_ptr(st).0;
    let mut b = st.launch_builder(&f);
    b.arg(&pb);
    let cfg = LaunchConfig {
        grid_dim: (4096, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument list matches k_e2m1_check; bad holds two u64.
    unsafe { b.launch(cfg) }?;
    let r = st.clone_dtoh(&bad)?;
    let mut row = exact_row("e2m1_fast", GgmlType::F32, "all 2^32 floats", r[0] as usize);
    row.note = if r[0] == 0 {
        "0 of 2^32 roundings differ from e2m1_round".into()
    } else {
        format!(
            "{} of 2^32 roundings differ from e2m1_round, the first at bits {:#010x}",
            r[0], r[1]
        )
    };
    out.push(row);
    Ok(())
}

/// The decode query heads and KV row finish (`k_qkv_finish1`) with its angles before the PDL
/// wait and the KV row's FP8 scales by warps (`exact` bit 1) against the row functions (bit 1
/// clear), bit for bit, with and without QAT and the F16 storage rounding.
fn check_qkv_finish1(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let st = be.stream();
    let f = be.function("k_qkv_finish1")?;
    for (nh, dh, half, p0) in [(64usize, 512usize, 32usize, 4_097i64), (8, 256, 64, 77)] {
        let freqs: Vec<f64> = (0..half)
            .map(|i| 10000f64.powf(-(i as f64) / half as f64))
            .collect();
        let d_freqs = st.clone_htod(&freqs)?;
        let d_p0 = st.clone_htod(&[p0])?;
        let (pf, pp) = (d_freqs.device_ptr(st).0, d_p0.device_ptr(st).0);
        let w: Vec<f32> = random_activations(rng, dh)
            .iter()
            .map(|v| 1.0 + 0.1 * v)
            .collect();
        let dw = be.upload_f32(&w)?;
        let pw = dw.device_ptr(st).0;
        for (qat, exact) in [(1i32, 0i32), (0, 0), (1, 1)] {
            let q = random_activations(rng, nh * dh);
            let mut kv = random_activations(rng, dh);
            // A 64-block of zeros: the scale's floor case.
            kv[64..128].iter_mut().for_each(|v| *v = 0.0);
            let bufs = [
                (be.upload_f32(&q)?, be.upload_f32(&kv)?),
                (be.upload_f32(&q)?, be.upload_f32(&kv)?),
            ];
            for (i, (dq, dkv)) in bufs.iter().enumerate() {
                let (pq, pk) = (dq.device_ptr(st).0, dkv.device_ptr(st).0);
                let (nhi, dhi, hi, eps) = (nh as i32, dh as i32, half as i32, 1e-6f32);
                let ex = exact | (i as i32) << 1;
                let mut b = st.launch_builder(&f);
                b.arg(&pq)
                    .arg(&pk)
                    .arg(&pw)
                    .arg(&nhi)
                    .arg(&dhi)
                    .arg(&hi)
                    .arg(&eps);
                b.arg(&pf).arg(&pp).arg(&qat).arg(&ex);
                let cfg = LaunchConfig {
                    grid_dim: (nh as u32 + 1, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: argument list matches k_qkv_finish1; q nh·dh, kv and w dh floats.
                unsafe { b.launch(cfg) }?;
            }
            let (q0, k0) = (be.download(&bufs[0].0)?, be.download(&bufs[0].1)?);
            let (q1, k1) = (be.download(&bufs[1].0)?, be.download(&bufs[1].1)?);
            let bad = bits_differ(&q0, &q1) + bits_differ(&k0, &k1);
            let shape = format!("H={nh} dh={dh} half={half} qat={qat} exact={exact}");
            let mut row = exact_row("qkv_finish1_pre", GgmlType::F32, &shape, bad);
            row.note = format!(
                "{bad} of {} values differ from the row functions' (angles before the wait, \
                 FP8 scales by warps)",
                q0.len() + k0.len()
            );
            out.push(row);
        }
    }
    Ok(())
}

/// The warp form of the indexer's query finish (`k_idx_q_finish_w<E>`: RoPE, then with QAT the
/// Hadamard rotation and FP4 rounding), with its angles inline and from `k_rope_cs`'s table,
/// against the block form `k_idx_q_finish`: the f32 rows and their bf16 copies bit for bit,
/// with and without QAT.
fn check_idx_q_finish_w(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let st = be.stream();
    let old = be.function("k_idx_q_finish")?;
    let rope_cs = be.function("k_rope_cs")?;
    let cfg = |grid: (u32, u32, u32), threads: u32| LaunchConfig {
        grid_dim: grid,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    for (id, ih, n) in [(128usize, 64usize, 3usize), (64, 16, 2), (256, 12, 2)] {
        let new = be.function(&format!("k_idx_q_finish_w{}", id / 32))?;
        let half = 32usize;
        let freqs: Vec<f64> = (0..half)
            .map(|i| 10000f64.powf(-(i as f64) / half as f64))
            .collect();
        let d_freqs = st.clone_htod(&freqs)?;
        let d_p0 = st.clone_htod(&[12_345i64])?;
        let (pf, pp) = (d_freqs.device_ptr(st).0, d_p0.device_ptr(st).0);
        let (ihi, idi, hi) = (ih as i32, id as i32, half as i32);
        let inv = (1.0 / (id as f64).sqrt()) as f32;
        let tab = be.alloc_f32(n * half * 2)?;
        let ptab = tab.device_ptr(st).0;
        let mut b = st.launch_builder(&rope_cs);
        b.arg(&pf).arg(&pp).arg(&hi).arg(&ptab);
        // SAFETY: argument list matches k_rope_cs; tab holds n·half pairs.
        unsafe { b.launch(cfg((half.div_ceil(64) as u32, n as u32, 1), 64)) }?;
        for qat in [0i32, 1] {
            let q = random_activations(rng, n * ih * id);
            // Copy 0: the block form; 1: the warp form, angles inline; 2: from the table; 3:
            // from the table, bf16 rows only (keep32 = 0, the tensor-core scores' form); 4:
            // as a decode token's (angles inline before the PDL wait, hpw bit 4), bf16 only.
            let qs = [
                be.upload_f32(&q)?,
                be.upload_f32(&q)?,
                be.upload_f32(&q)?,
                be.upload_f32(&q)?,
                be.upload_f32(&q)?,
            ];
            let hs = [
                st.alloc_zeros::<u16>(n * ih * id)?,
                st.alloc_zeros::<u16>(n * ih * id)?,
                st.alloc_zeros::<u16>(n * ih * id)?,
                st.alloc_zeros::<u16>(n * ih * id)?,
                st.alloc_zeros::<u16>(n * ih * id)?,
            ];
            let pq: Vec<u64> = qs.iter().map(|x| x.device_ptr(st).0).collect();
            let ph: Vec<u64> = hs.iter().map(|x| x.device_ptr(st).0).collect();
            let mut b = st.launch_builder(&old);
            b.arg(&pq[0]).arg(&ihi).arg(&idi).arg(&hi).arg(&pf).arg(&pp);
            b.arg(&qat).arg(&inv).arg(&ph[0]);
            // SAFETY: argument list matches k_idx_q_finish; buffers sized above.
            unsafe { b.launch(cfg(((n * ih) as u32, 1, 1), 64)) }?;
            // Copies 1 and 2 with several heads a warp (prefill chunks), 3 with one (decode).
            let many = super::attn::IQF_HPW as i32;
            for (i, pt, keep32, hpw) in [
                (1usize, 0u64, 1i32, many),
                (2, ptab, 1, many),
                (3, ptab, 0, 1),
                (4, 0, 0, 1 | 16),
            ] {
                let mut b = st.launch_builder(&new);
                b.arg(&pq[i]).arg(&ihi).arg(&hi).arg(&pf).arg(&pp).arg(&pt);
                b.arg(&qat).arg(&inv).arg(&ph[i]).arg(&keep32).arg(&hpw);
                // SAFETY: argument list matches k_idx_q_finish_w<E>; buffers sized above.
                let gy = ih.div_ceil(8 * (hpw & 15) as usize) as u32;
                unsafe { b.launch(cfg((n as u32, gy, 1), 256)) }?;
            }
            let (a, h16a) = (be.download(&qs[0])?, st.clone_dtoh(&hs[0])?);
            for (i, name) in [(1usize, "idx_q_finish_w"), (2, "idx_q_finish_w_tab")] {
                let (b2, h16b) = (be.download(&qs[i])?, st.clone_dtoh(&hs[i])?);
                let bad = bits_differ(&a, &b2) + f16_differ(&h16a, &h16b);
                let shape = format!("n={n} iH={ih} iD={id} qat={qat}");
                let mut row = exact_row(name, GgmlType::F32, &shape, bad);
                row.note = format!(
                    "{bad} of {} values (f32 and bf16) differ from k_idx_q_finish",
                    2 * a.len()
                );
                out.push(row);
            }
            // bf16 only: the same bf16 rows, and q left as it was.
            for (i, name) in [
                (3usize, "idx_q_finish_w_bf16_only"),
                (4, "idx_q_finish_w_pre"),
            ] {
                let (b3, h16c) = (be.download(&qs[i])?, st.clone_dtoh(&hs[i])?);
                let bad = bits_differ(&b3, &q) + f16_differ(&h16a, &h16c);
                let shape = format!("n={n} iH={ih} iD={id} qat={qat}");
                let mut row = exact_row(name, GgmlType::F32, &shape, bad);
                row.note = format!(
                    "{bad} of {} values differ (bf16 from k_idx_q_finish's, f32 from the input \
                     it must leave alone)",
                    2 * q.len()
                );
                out.push(row);
            }
        }
    }
    Ok(())
}

/// The router (`k_route`): expert choice by top-k of sqrt(softplus(logit)) + bias (ties to
/// the lower id, some planted) against the CPU's `ops::top_k`, ids in id order exactly and
/// weights within rounding (expf/log1pf may differ from Rust's in the last bit).
fn check_route(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    use crate::model::ops::{softplus, top_k};
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let st = be.stream();
    let f = be.function("k_route")?;
    // nsplit > 1: the logits as partial sums (the split router product), added in part order.
    for (n_exp, k, n_tok, nsplit) in [
        (256usize, 6usize, 3usize, 1usize),
        (16, 4, 5, 1),
        (64, 8, 1, 1),
        (256, 6, 7, 4),
    ] {
        // Ties: equal logits (and so equal biased scores where the bias is equal); in every
        // part, so that the sums tie too.
        let mut parts = random_activations(rng, nsplit * n_tok * n_exp);
        for j in 0..nsplit * n_tok {
            parts[j * n_exp + 3] = parts[j * n_exp + 1];
            parts[j * n_exp + n_exp - 1] = parts[j * n_exp + 1];
        }
        let plane = n_tok * n_exp;
        let logits: Vec<f32> = (0..plane)
            .map(|i| (1..nsplit).fold(parts[i], |a, j| a + parts[j * plane + i]))
            .collect();
        let mut bias: Vec<f32> = (0..n_exp).map(|_| (rng.normal() * 0.1) as f32).collect();
        bias[3] = bias[1];
        bias[n_exp - 1] = bias[1];
        let (dl, db) = (be.upload_f32(&parts)?, be.upload_f32(&bias)?);
        let (ns, sstride) = (nsplit as i32, plane as i64);
        let toks = be.upload_i32(&vec![0; n_tok])?;
        let (n_e, k_i, norm_on, scale) = (n_exp as i32, k as i32, 1i32, 2.5f32);
        let null = 0u64;
        let cfg = LaunchConfig {
            grid_dim: (n_tok as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (n_exp.next_multiple_of(2) * 4 + n_exp * 8) as u32,
        };
        // warp_fin 0: thread 0 finishes the slots; 1: warp 0 (production). reg 0: the top-k
        // rounds over shared memory and the bias read after the score; 1: over registers and
        // the first bias before the wait (production). Fresh poisoned outputs each time.
        let run = |warp_fin: i32, reg: i32| -> Result<(Vec<i32>, Vec<f32>)> {
            let (ids, wts) = (
                be.upload_i32(&vec![-1; n_tok * k])?,
                poisoned(be, n_tok * k)?,
            );
            let mut b = st.launch_builder(&f);
            b.arg(&dl)
                .arg(&n_e)
                .arg(&k_i)
                .arg(&toks)
                .arg(&null)
                .arg(&db)
                .arg(&norm_on)
                .arg(&scale)
                .arg(&ids)
                .arg(&wts)
                .arg(&ns)
                .arg(&sstride)
                .arg(&warp_fin)
                .arg(&reg)
                .arg(&reg);
            // SAFETY: argument list matches k_route; logits n_tok × n_exp, ids/wts n_tok × k.
            unsafe { b.launch(cfg) }?;
            Ok((be.download(&ids)?, be.download(&wts)?))
        };
        let (ti, tw) = run(0, 0)?;
        let (si, sw) = run(1, 0)?;
        let (gi, gw) = run(1, 1)?;
        out.push(same_row(
            "route_warp_finish",
            GgmlType::F32,
            &format!("E{n_exp} k{k} n{n_tok} parts{nsplit}"),
            ti == si && same_finite_bits(&tw, &sw),
            "warp 0 vs thread 0 finishing the slots: ids and weights the same bits",
        ));
        out.push(same_row(
            "route_reg_topk",
            GgmlType::F32,
            &format!("E{n_exp} k{k} n{n_tok} parts{nsplit}"),
            si == gi && same_finite_bits(&sw, &gw),
            "top-k rounds over registers vs shared memory (bias loaded early vs late): ids and \
             weights the same bits",
        ));
        let (mut bad_ids, mut max_rel) = (0usize, 0f64);
        let mut top = Vec::new();
        for t in 0..n_tok {
            let scores: Vec<f32> = logits[t * n_exp..(t + 1) * n_exp]
                .iter()
                .map(|&v| softplus(v).sqrt())
                .collect();
            let biased: Vec<f32> = scores.iter().zip(&bias).map(|(s, b)| s + b).collect();
            top_k(&biased, k, &mut top);
            let sum: f32 = top.iter().map(|&e| scores[e]).sum();
            let nrm = 1.0 / sum.max(1.0 / 16384.0);
            let mut cpu: Vec<(usize, f32)> =
                top.iter().map(|&e| (e, scores[e] * nrm * scale)).collect();
            cpu.sort_by_key(|c| c.0);
            for (j, (e, w)) in cpu.iter().enumerate() {
                bad_ids += usize::from(gi[t * k + j] != *e as i32);
                let g = gw[t * k + j] as f64;
                max_rel = max_rel.max((g - *w as f64).abs() / (*w as f64).abs().max(1e-30));
            }
        }
        let shape = format!("E{n_exp} k{k} n{n_tok} parts{nsplit}");
        let mut row = exact_row("route_ids", GgmlType::F32, &shape, bad_ids);
        row.note = format!("{bad_ids} chosen ids differ from the CPU's top_k (ties planted)");
        out.push(row);
        out.push(CheckRow {
            kernel: "route_weights".into(),
            ty: GgmlType::F32,
            shape,
            max_abs: 0.0,
            max_err: max_rel,
            rel_l2: 0.0,
            tol: 1e-5,
            pass: max_rel <= 1e-5 && bad_ids == 0,
            note: "max relative difference of the slot weights from the CPU's".into(),
        });
    }
    Ok(())
}

/// The fused pair of F16 products (quant.cu `mv2_f16`, a compressor's kv and gate in
/// decode): against the f64 reference and bit for bit against two `mv_f16` launches, at the
/// flash compressors' shapes (ratio 4 and 128 KV, indexer).
fn check_mv2_f16(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let st = be.stream();
    let f = be.function("mv2_f16")?;
    for (n_rows, n_cols) in [(1024usize, 4096usize), (512, 4096), (256, 4096), (40, 96)] {
        let wa = random_weight(rng, GgmlType::F16, n_rows, n_cols);
        let wb = random_weight(rng, GgmlType::F16, n_rows, n_cols);
        let x = random_activations(rng, n_cols);
        let ga = be.upload_weight(GgmlType::F16, &wa, n_rows, n_cols, 1, &mut |_, _| {})?;
        let gb = be.upload_weight(GgmlType::F16, &wb, n_rows, n_cols, 1, &mut |_, _| {})?;
        let xd = be.upload_f32(&x)?;
        let (ya, yb) = (poisoned(be, n_rows)?, poisoned(be, n_rows)?);
        let split = super::device::mv_split(n_rows, n_cols, 1);
        let cfg = LaunchConfig {
            grid_dim: ((2 * n_rows as u32).div_ceil(8 / split), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = (
            be.weight_ptr(&ga),
            be.weight_ptr(&gb),
            n_rows as i32,
            n_cols as i32,
            xd.device_ptr(st).0,
            ya.device_ptr(st).0,
            yb.device_ptr(st).0,
            split as i32,
        );
        let mut lb = st.launch_builder(&f);
        lb.arg(&args.0)
            .arg(&args.1)
            .arg(&args.2)
            .arg(&args.3)
            .arg(&args.4)
            .arg(&args.5)
            .arg(&args.6)
            .arg(&args.7);
        // SAFETY: both weights n_rows × n_cols F16, x n_cols, ya/yb n_rows floats.
        unsafe { lb.launch(cfg) }?;
        let (fa, fb) = (be.download(&ya)?, be.download(&yb)?);
        let mut sa = be.alloc_f32(n_rows)?;
        let mut sb = be.alloc_f32(n_rows)?;
        be.matvec(&ga, 0, &xd.slice(..), &mut sa.slice_mut(..))?;
        be.matvec(&gb, 0, &xd.slice(..), &mut sb.slice_mut(..))?;
        let (ma, mb) = (be.download(&sa)?, be.download(&sb)?);
        let shape = format!("2x {n_rows}x{n_cols}");
        let mut refs = reference(GgmlType::F16, &wa, n_rows, n_cols, &x);
        refs.extend(reference(GgmlType::F16, &wb, n_rows, n_cols, &x));
        let both: Vec<f32> = fa.iter().chain(&fb).copied().collect();
        out.push(compare(
            "mv2_f16",
            GgmlType::F16,
            shape.clone(),
            &both,
            &refs,
            TOL_F32,
        ));
        out.push(CheckRow {
            kernel: "mv2_f16_vs_mv_f16".into(),
            ty: GgmlType::F16,
            shape,
            max_abs: 0.0,
            max_err: 0.0,
            rel_l2: 0.0,
            tol: 0.0,
            pass: same_bits(&fa, &ma) && same_bits(&fb, &mb),
            note: "bit-identical to two mv_f16 launches".into(),
        });
    }
    Ok(())
}

/// Logits narrowing (sample.cu): the multi-block `k_sample_mb` against the
/// CPU rule (`sample::argmax`, then every `(l − max)·inv_t ≥ cut` in id order) and against
/// the one-block `k_sample_prep`, bit for bit: rows of the vocabulary's size with ties at the
/// maximum, NaNs and infinities, an all-NaN row, a row whose candidates pass the cap, and a
/// row of more than 256 blocks (several rounds of the last block's scan). Each case runs
/// twice (the ticket must be back at 0).
fn check_sample(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    use super::session::{narrow_launch, narrow_scratch};
    // A position past 2^32, so that both halves of the fed i64 are checked.
    const FED_POS: i64 = (5 << 32) | 12345;
    let st = be.stream();
    let kf = [be.function("k_sample_prep")?, be.function("k_sample_mb")?];
    let cap = 16384usize;
    // (n, inv_t, cut, kind): 0 random + ties + NaN/inf, 1 all NaN, 2 everything passes.
    let cases: [(usize, f32, f32, u8); 7] = [
        (129_280, 1.0, 0.05f32.ln() - 0.01, 0),
        (129_280, 1.0 / 0.3, -0.5, 0),
        (129_280, 1.0, -1e30, 2),
        (3000, 1.0, -0.5, 1),
        (5001, 1.0, -3.0, 0),
        (300_000, 1.0, -4.0, 0),
        (5001, 1.0, f32::NEG_INFINITY, 0),
    ];
    for (n, inv_t, cut, kind) in cases {
        let mut row: Vec<f32> = (0..n).map(|_| (rng.normal() * 2.0) as f32).collect();
        match kind {
            1 => row.iter_mut().for_each(|v| *v = f32::NAN),
            _ => {
                for _ in 0..n / 500 {
                    let i = rng.next_u64() as usize % n;
                    row[i] = f32::NAN;
                }
                for _ in 0..8 {
                    let i = rng.next_u64() as usize % n;
                    row[i] = f32::NEG_INFINITY;
                }
                // The maximum three times, the first copy not in the first block.
                let top = row
                    .iter()
                    .filter(|v| !v.is_nan())
                    .fold(f32::MIN, |a, &b| a.max(b));
                for i in [n / 3, n / 2, n - 1] {
                    row[i] = top + 1.0;
                }
            }
        }
        // CPU rule.
        let best = crate::sample::argmax(&row);
        let mx = row[best as usize];
        let want: Vec<(i32, f32)> = row
            .iter()
            .enumerate()
            .filter(|(_, &l)| (l - mx) * inv_t >= cut)
            .map(|(i, &l)| (i as i32, l))
            .collect();
        let d_row = be.upload_f32(&row)?;
        let (nk, nv) = narrow_scratch(n);
        let d_wk = be.upload_i32(&vec![0; nk])?;
        let d_wv = be.alloc_f32(nv)?;
        let mut runs = Vec::new();
        let mut fed_bad = 0usize;
        for multi in [true, true, false] {
            let d_head = be.upload_i32(&[-7; 3])?;
            let d_ids = be.upload_i32(&vec![-7; cap])?;
            let d_vals = poisoned(be, cap)?;
            // The argmax fed to a decode step's token and position buffers.
            let d_ftok = be.upload_i32(&[-7])?;
            let d_fpos = be.upload_i32(&[-7, -7])?;
            // SAFETY: the row holds n floats, head 3, ids/vals cap, wk/wv narrow_scratch(n),
            // the fed token one i32 and the position two (one i64).
            unsafe {
                narrow_launch(
                    st,
                    [&kf[0], &kf[1]],
                    multi,
                    d_row.device_ptr(st).0,
                    n,
                    inv_t,
                    cut,
                    cap,
                    [
                        d_head.device_ptr(st).0,
                        d_wk.device_ptr(st).0,
                        d_ids.device_ptr(st).0,
                    ],
                    [d_wv.device_ptr(st).0, d_vals.device_ptr(st).0],
                    Some((d_ftok.device_ptr(st).0, d_fpos.device_ptr(st).0, FED_POS)),
                )?
            };
            let head = be.download(&d_head)?;
            let fpos = be.download(&d_fpos)?;
            let fed_pos = i64::from(fpos[0] as u32) | (i64::from(fpos[1]) << 32);
            fed_bad += usize::from(be.download(&d_ftok)?[0] != head[0] || fed_pos != FED_POS);
            let ids = be.download(&d_ids)?;
            let vals = be.download(&d_vals)?;
            let c = (head[2].max(0) as usize).min(cap);
            let cands: Vec<(i32, u32)> = ids[..c]
                .iter()
                .zip(&vals[..c])
                .map(|(&i, v)| (i, v.to_bits()))
                .collect();
            runs.push((head, cands));
        }
        let mut bad = fed_bad;
        let (head, cands) = &runs[0];
        bad += (head[0] != best as i32) as usize;
        bad += (head[1] as u32 != mx.to_bits()) as usize;
        bad += (head[2] as usize != want.len()) as usize;
        if want.len() <= cap {
            bad += (cands.len() != want.len()) as usize;
            bad += cands
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.0 != b.0 || a.1 != b.1.to_bits())
                .count();
        }
        let shape = format!("n={n} inv_t={inv_t} cut={cut} candidates={}", want.len());
        out.push(CheckRow {
            kernel: "sample_narrow_mb".into(),
            ty: GgmlType::F32,
            shape: shape.clone(),
            max_abs: 0.0,
            max_err: bad as f64,
            rel_l2: 0.0,
            tol: 0.0,
            pass: bad == 0,
            note: format!(
                "{bad} mismatches (argmax, max bits, count, candidate ids/bits, the fed token \
                 and position) vs the CPU rule"
            ),
        });
        let same_one_block = runs[0] == runs[2] || want.len() > cap && runs[0].0 == runs[2].0;
        out.push(det_row(
            "sample_narrow_mb",
            GgmlType::F32,
            &format!("{shape}, twice and vs k_sample_prep"),
            runs[0] == runs[1] && same_one_block,
        ));
    }
    Ok(())
}

/// A self-test row of a forward kernel: max |gpu − ref| over max |ref| against `tol`.
fn fwd_row(
    kernel: &str,
    shape: String,
    gpu: &[f32],
    refs: &[f64],
    tol: f64,
    note: &str,
) -> CheckRow {
    let (mut max_abs, mut scale, mut num, mut den) = (0f64, 0f64, 0f64, 0f64);
    let mut bad = gpu.len() != refs.len();
    for (&g, &r) in gpu.iter().zip(refs) {
        if !g.is_finite() {
            bad = true;
            continue;
        }
        let d = (g as f64 - r).abs();
        max_abs = max_abs.max(d);
        scale = scale.max(r.abs());
        num += d * d;
        den += r * r;
    }
    let max_err = max_abs / scale.max(1e-30);
    CheckRow {
        kernel: kernel.into(),
        ty: GgmlType::F32,
        shape,
        max_abs,
        max_err,
        rel_l2: (num / den.max(1e-300)).sqrt(),
        tol,
        pass: !bad && max_err <= tol,
        note: note.into(),
    }
}

/// Attention (attn.cu: scores, softmax, weighted sum + inverse RoPE) for a few tokens past
/// the raw window, at ratios 0, 4 (random selections) and 128, against an f64 reference of
/// attention.rs `attend_head` + the inverse rotation.
fn check_attn(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    use super::attn::{attend, Attend, AttnKernels};
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let cfg = |g: (u32, u32, u32), b: u32| LaunchConfig {
        grid_dim: g,
        block_dim: (b, 1, 1),
        shared_mem_bytes: 0,
    };
    let k = AttnKernels::load(be)?;
    let st = be.stream();
    // (H, Dh, RoPE pairs, window, top-k): flash-sized, and small heads (tiny fixtures).
    let cases = [
        (
            64usize, 512usize, 32usize, 128usize, 40usize, 0usize, 300usize, 3usize,
        ),
        (64, 512, 32, 128, 40, 4, 261, 5),
        (64, 512, 32, 128, 40, 128, 700, 2),
        (64, 512, 32, 128, 40, 4, 1000, 1),
        (6, 128, 16, 16, 8, 4, 90, 37),
        (6, 128, 16, 16, 8, 128, 300, 2),
        // Prefill-sized: the flash top-k (640 rows a token) and a 4k-context ratio 128.
        (64, 512, 32, 128, 512, 4, 3000, 12),
        (64, 512, 32, 128, 512, 128, 4000, 10),
        // Decode steps at 4k and 16k (one token; what the split-rows kernel serves).
        (64, 512, 32, 128, 512, 4, 4095, 1),
        (64, 512, 32, 128, 512, 128, 4095, 1),
        (64, 512, 32, 128, 512, 0, 4095, 1),
        (64, 512, 32, 128, 512, 128, 16383, 1),
        (64, 512, 32, 128, 512, 4, 70, 1),
        // A ratio-128 decode step at 150k: 1,299 rows, row blocks of 3 tiles of 16 (the
        // tensor-core kernel walks them as two tiles of 32: row `attend_fdtc_multitile`).
        (64, 512, 32, 128, 512, 128, 150_000, 1),
    ];
    for (h_n, dh, half, swa, topk, ratio, p0, n) in cases {
        let n_comp_rows = (p0 + n) / ratio.max(1);
        let q = random_activations(rng, n * h_n * dh);
        let ckv = random_activations(rng, n * dh);
        let ring = random_activations(rng, swa * dh);
        let comp = random_activations(rng, (n_comp_rows * dh).max(1));
        let sinks: Vec<f32> = (0..h_n).map(|_| rng.normal() as f32).collect();
        let freqs: Vec<f64> = (0..half).map(|_| rng.uniform()).collect();
        // Ratio 4: each token's selection, ascending, `topk` of its visible rows.
        let mut sel = vec![0i32; n * topk];
        let mut cnt = vec![0i32; n];
        for t in 0..n {
            let vis = (p0 + t + 1) / 4;
            let mut pick: Vec<i32> = (0..vis as i32).collect();
            for i in 0..topk.min(vis) {
                let j = i + (rng.next_u64() as usize) % (vis - i);
                pick.swap(i, j);
            }
            pick.truncate(topk.min(vis));
            pick.sort_unstable();
            cnt[t] = pick.len() as i32;
            sel[t * topk..t * topk + pick.len()].copy_from_slice(&pick);
        }
        let max_comp = match ratio {
            0 => 0,
            4 => topk,
            r => (p0 + n) / r,
        };
        let rows_cap = swa + max_comp;
        let d_q = be.upload_f32(&q)?;
        let d_ckv = be.upload_f32(&ckv)?;
        let d_ring = be.upload_f32(&ring)?;
        let d_comp = be.upload_f32(&comp)?;
        let d_sinks = be.upload_f32(&sinks)?;
        let d_freqs = st.clone_htod(&freqs)?;
        let d_sel = be.upload_i32(&sel)?;
        let d_cnt = be.upload_i32(&cnt)?;
        let d_p0 = st.clone_htod(&[p0 as i64])?;
        let d_o = poisoned(be, n * h_n * dh)?;
        let ns_max = super::attn::DECODE_SPLIT;
        let d_inv = be.alloc_f32(n * h_n)?;
        let fd_nb = super::attn::fd_blocks(rows_cap).1;
        let d_sc = be.alloc_f32((ns_max * n * h_n * rows_cap).max(fd_nb * n * h_n * 2))?;
        let d_part = be.alloc_f32(ns_max.max(fd_nb) * n * h_n * dh)?;
        let d_rows16 = st.alloc_zeros::<u16>((swa + n + n_comp_rows) * dh)?;
        let pp = |b: &CudaSlice<f32>| b.device_ptr(st).0;
        let pi = |b: &CudaSlice<i32>| b.device_ptr(st).0;
        let mut args = Attend {
            n,
            q: pp(&d_q),
            ckv: pp(&d_ckv),
            ring: pp(&d_ring),
            comp: if ratio == 0 { 0 } else { pp(&d_comp) },
            sel: pi(&d_sel),
            cnt: pi(&d_cnt),
            sel_ld: topk,
            ratio,
            p0: d_p0.device_ptr(st).0,
            swa,
            dh,
            n_head: h_n,
            sinks: pp(&d_sinks),
            scale: 1.0 / (dh as f32).sqrt(),
            half,
            freqs: d_freqs.device_ptr(st).0,
            o: pp(&d_o),
            rows16: d_rows16.device_ptr(st).0,
            comp_rows: if ratio == 0 { 0 } else { n_comp_rows },
            o16: 0,
            cs_tab: 0,
            qeps: 0.0,
            q16: false,
            sc: pp(&d_sc),
            part: pp(&d_part),
            inv: pp(&d_inv),
            nsplit: 1,
            rows_cap,
            tc: false,
            fd: false,
            fd_tc: false,
            fd_pdl: false,
            q0: 0,
            d0: 0,
        };
        // SAFETY: every buffer above is sized as `Attend` documents.
        unsafe { attend(st, &k, &args)? };
        let gpu = be.download(&d_o)?;
        unsafe { attend(st, &k, &args)? };
        let gpu2 = be.download(&d_o)?;
        args.nsplit = ns_max;
        // SAFETY: as above (the scratch holds ns_max splits).
        unsafe { attend(st, &k, &args)? };
        let gpu3 = be.download(&d_o)?;
        // Production chunks: the tensor-core kernel (f16 queries and weights).
        args.nsplit = 1;
        args.tc = true;
        let tc_ok = super::attn::tc_supported(h_n, dh, half);
        // SAFETY: as above (the tensor-core kernel reads q, the rows, sinks and freqs).
        unsafe { attend(st, &k, &args)? };
        let gpu4 = be.download(&d_o)?;
        unsafe { attend(st, &k, &args)? };
        let gpu5 = be.download(&d_o)?;
        // The f16 output form (production prefill's input of attn_output_a): the same values
        // rounded as f32_to_f16 rounds, o untouched.
        let d_o16 = st.alloc_zeros::<u16>(n * h_n * dh)?;
        args.o16 = d_o16.device_ptr(st).0;
        // SAFETY: as above; o16 holds n × H × Dh halves.
        unsafe { attend(st, &k, &args)? };
        let gpu_o16 = be.download(&d_o16)?;
        let o16_mism = gpu_o16
            .iter()
            .zip(&gpu4)
            .filter(|(h, v)| **h != f16::from_f32(**v).to_bits())
            .count();
        // Production prefill: the kernel normalizes and rotates the q_b product itself
        // (cs_tab), against k_head_norm_rope in place and then the kernel: the same bits. Both
        // runs write o (o16 cleared: with it set the kernel leaves o alone, and the rows
        // compared two untouched poisoned buffers until the fifteenth session).
        args.o16 = 0;
        let qn_ok = super::attn::tc_qnorm_supported(dh) && half > 0;
        // Then the same with the q_b product as f16 (production's f16 GEMM output): against
        // k_head_norm_rope on f32 of those halves.
        let mut qn_rows: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
        if qn_ok {
            let qeps = 1e-6f32;
            let tab = be.alloc_f32(n * half * 2)?;
            let (pfr, pp0, ptab) = (args.freqs, args.p0, pp(&tab));
            let (hi, dhi, hai) = (h_n as i32, dh as i32, half as i32);
            let rope_cs = be.function("k_rope_cs")?;
            let mut b = st.launch_builder(&rope_cs);
            b.arg(&pfr).arg(&pp0).arg(&hai).arg(&ptab);
            // SAFETY: argument list matches k_rope_cs; tab holds n·half pairs.
            unsafe { b.launch(cfg((half.div_ceil(64) as u32, n as u32, 1), 64)) }?;
            let hnr = be.function("k_head_norm_rope")?;
            let q_h: Vec<u16> = q.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
            let q_hf: Vec<f32> = q_h.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
            let d_qh = st.clone_htod(&q_h)?;
            for half_q in [false, true] {
                let d_qref = be.upload_f32(if half_q { &q_hf } else { &q })?;
                let pqr = pp(&d_qref);
                let mut b = st.launch_builder(&hnr);
                b.arg(&pqr)
                    .arg(&hi)
                    .arg(&dhi)
                    .arg(&hai)
                    .arg(&qeps)
                    .arg(&pfr)
                    .arg(&pp0);
                // SAFETY: argument list matches k_head_norm_rope; n·H rows of dh.
                unsafe { b.launch(cfg(((n * h_n) as u32, 1, 1), 128)) }?;
                let d_oq = poisoned(be, n * h_n * dh)?;
                args.o = pp(&d_oq);
                args.q = pqr;
                // SAFETY: as above (q normalized in place).
                unsafe { attend(st, &k, &args)? };
                let gpu_qr = be.download(&d_oq)?;
                let d_on = poisoned(be, n * h_n * dh)?;
                args.o = pp(&d_on);
                args.q = if half_q {
                    d_qh.device_ptr(st).0
                } else {
                    pp(&d_q)
                };
                args.q16 = half_q;
                args.cs_tab = ptab;
                args.qeps = qeps;
                // SAFETY: as above; cs_tab holds n·half pairs, q (n·H·dh f32 or f16 values)
                // is left as it is.
                unsafe { attend(st, &k, &args)? };
                qn_rows.push((be.download(&d_on)?, gpu_qr));
                args.cs_tab = 0;
                args.q16 = false;
            }
            args.q = pp(&d_q);
        }
        // Decode steps: split-rows flash decoding (fresh poison in o first).
        args.tc = false;
        args.fd = true;
        let fd_ok = super::attn::fd_supported(dh);
        let d_o2 = poisoned(be, n * h_n * dh)?;
        args.o = pp(&d_o2);
        // SAFETY: as above (sc and part hold fd_nb row blocks).
        unsafe { attend(st, &k, &args)? };
        let gpu6 = be.download(&d_o2)?;
        unsafe { attend(st, &k, &args)? };
        let gpu7 = be.download(&d_o2)?;
        // The same with o's Q8_0 codes for the output product, from the combine's registers.
        let (d_q0, d_d0) = (
            be.alloc_f32(n * h_n * dh / 4)?,
            be.alloc_f32(n * h_n * dh / 32)?,
        );
        args.q0 = pp(&d_q0);
        args.d0 = pp(&d_d0);
        let fd_q8 = args.writes_q8();
        // SAFETY: as above; q0/d0 hold the codes and scales of n × H × Dh outputs.
        unsafe { attend(st, &k, &args)? };
        let gpu8 = be.download(&d_o2)?;
        let q8_mism = code_mismatches(
            ActQuant::Q8_0,
            &gpu8,
            &download_codes(be, &d_q0, n * h_n * dh)?,
            &be.download(&d_d0)?,
        ) + usize::from(!same_bits(&gpu6, &gpu8));
        // The split-rows kernel on tensor cores (f16 queries, rows and weights), fresh poison;
        // the combine's codes are checked above for the f32 form only.
        args.q0 = 0;
        args.fd_tc = true;
        let d_o3 = poisoned(be, n * h_n * dh)?;
        args.o = pp(&d_o3);
        // SAFETY: as above (sc and part hold fd_nb row blocks).
        unsafe { attend(st, &k, &args)? };
        let gpu9 = be.download(&d_o3)?;
        unsafe { attend(st, &k, &args)? };
        let gpu10 = be.download(&d_o3)?;
        // Reference in f64.
        let scale = 1.0 / (dh as f64).sqrt();
        let mut refs = vec![0f64; n * h_n * dh];
        for t in 0..n {
            let p = p0 + t;
            let mut rows: Vec<&[f32]> = Vec::new();
            for qp in (p + 1).saturating_sub(swa)..=p {
                rows.push(if qp >= p0 {
                    &ckv[(qp - p0) * dh..(qp - p0 + 1) * dh]
                } else {
                    &ring[(qp % swa) * dh..(qp % swa + 1) * dh]
                });
            }
            let comp_ids: Vec<usize> = match ratio {
                0 => vec![],
                4 => sel[t * topk..t * topk + cnt[t] as usize]
                    .iter()
                    .map(|&c| c as usize)
                    .collect(),
                r => (0..(p + 1) / r).collect(),
            };
            for c in comp_ids {
                rows.push(&comp[c * dh..(c + 1) * dh]);
            }
            for h in 0..h_n {
                let qh = &q[(t * h_n + h) * dh..(t * h_n + h + 1) * dh];
                let s: Vec<f64> = rows
                    .iter()
                    .map(|k| {
                        qh.iter()
                            .zip(*k)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let sink = sinks[h] as f64;
                let m = s.iter().fold(sink, |a, &b| a.max(b));
                let den = (sink - m).exp() + s.iter().map(|v| (v - m).exp()).sum::<f64>();
                let o = &mut refs[(t * h_n + h) * dh..(t * h_n + h + 1) * dh];
                for (v, k) in s.iter().zip(&rows) {
                    let w = (v - m).exp() / den;
                    for (oe, &ke) in o.iter_mut().zip(*k) {
                        *oe += w * ke as f64;
                    }
                }
                let off = dh - 2 * half;
                for (i, f) in freqs.iter().enumerate() {
                    let (sn, cs) = (p as f64 * f).sin_cos();
                    let (a, b) = (o[off + 2 * i], o[off + 2 * i + 1]);
                    o[off + 2 * i] = a * cs + b * sn;
                    o[off + 2 * i + 1] = -a * sn + b * cs;
                }
            }
        }
        let shape = format!("ratio{ratio} p0={p0} n={n} H={h_n} Dh={dh}");
        out.push(fwd_row(
            "attend",
            shape.clone(),
            &gpu,
            &refs,
            1e-5,
            "vs f64 reference",
        ));
        out.push(fwd_row(
            "attend_split4",
            shape.clone(),
            &gpu3,
            &refs,
            1e-5,
            "decode split (4 dim / row ranges) vs f64 reference",
        ));
        out.push(det_row(
            "attend",
            GgmlType::F32,
            &shape,
            same_bits(&gpu, &gpu2),
        ));
        if fd_ok {
            out.push(fwd_row(
                "attend_fd",
                shape.clone(),
                &gpu6,
                &refs,
                1e-5,
                "split-rows flash decoding (online softmax from the sink) vs f64 reference",
            ));
            out.push(det_row(
                "attend_fd",
                GgmlType::F32,
                &shape,
                same_bits(&gpu6, &gpu7),
            ));
        }
        if fd_ok {
            // Row blocks of more than 2 tiles of 16: the kernel walks several of its tiles.
            let name = if super::attn::fd_blocks(rows_cap).0 <= 2 {
                "attend_fdtc"
            } else {
                "attend_fdtc_multitile"
            };
            out.push(fwd_row(
                name,
                shape.clone(),
                &gpu9,
                &refs,
                1e-2,
                "split-rows flash decoding on tensor cores vs f64 reference (f16 q and weights; \
                 these random K rows are rounded too, production's are F16-exact)",
            ));
            out.push(det_row(
                name,
                GgmlType::F32,
                &shape,
                same_bits(&gpu9, &gpu10),
            ));
        }
        if fd_q8 {
            out.push(exact_row(
                "attend_fd_q8_0_codes",
                GgmlType::Q8_0,
                &shape,
                q8_mism,
            ));
        }
        if tc_ok {
            out.push(fwd_row(
                "attend_tc",
                shape.clone(),
                &gpu4,
                &refs,
                1e-2,
                "tensor cores vs f64 reference (f16 q and weights; these random K rows are \
                 rounded too, production's are F16-exact)",
            ));
            out.push(det_row(
                "attend_tc",
                GgmlType::F32,
                &shape,
                same_bits(&gpu4, &gpu5),
            ));
            let mut row = exact_row("attend_tc_f16", GgmlType::F16, &shape, o16_mism);
            row.note = format!("{o16_mism} f16 outputs differ in bits from f16(f32 output)");
            out.push(row);
            for ((gpu_qn, gpu_qr), (name, ty)) in qn_rows.iter().zip([
                ("attend_tc_qnorm", GgmlType::F32),
                ("attend_tc_qnorm_q16", GgmlType::F16),
            ]) {
                let same = same_finite_bits(gpu_qn, gpu_qr);
                let mut row = exact_row(name, ty, &shape, usize::from(!same));
                row.note = "queries normalized and rotated in the kernel vs by k_head_norm_rope: \
                            the same output bits"
                    .into();
                out.push(row);
            }
        }
    }
    Ok(())
}

/// The indexer scores of `n` tokens from position `p0` (64 heads of 128, ratio 4) for the
/// queries, weights and rows given, by `k_idx_scores_tc` (`tc`; `k_idx_scores_wg` where
/// `wg` lets it, with `tpb` tokens a block where given) or `k_idx_scores`: `n × ld` floats,
/// `ld = (p0 + n)/4 + 1`, poisoned where no row is visible.
fn run_idx_scores(
    be: &CudaBackend,
    k: &super::attn::AttnKernels,
    (q, w, rows): (&[f32], &[f32], &[f32]),
    p0: usize,
    n: usize,
    (tc, wg, tpb, r32): (bool, bool, Option<usize>, Option<bool>),
) -> Result<Vec<f32>> {
    use super::attn::{idx_scores, idx_scores_tc, to_bf16};
    let (ih, id, r) = (64usize, 128usize, 4usize);
    let vis_max = (p0 + n) / r;
    let ld = vis_max + 1;
    let st = be.stream();
    // The kernels scale the weights by wscale = 0.5: they get 2w, so the product is w exactly
    // (a missing scale doubles every score).
    let w2: Vec<f32> = w.iter().map(|&x| 2.0 * x).collect();
    let (d_q, d_w, d_rows) = (be.upload_f32(q)?, be.upload_f32(&w2)?, be.upload_f32(rows)?);
    let d_q16 = st.alloc_zeros::<u16>(n * ih * id)?;
    let d_p0 = st.clone_htod(&[p0 as i64])?;
    let d_sc = poisoned(be, n * ld)?;
    let pp = |b: &CudaSlice<f32>| b.device_ptr(st).0;
    let p0p = d_p0.device_ptr(st).0;
    // SAFETY: buffers sized as `idx_scores` / `idx_scores_tc` document.
    let pw = (pp(&d_w), 0.5f32);
    unsafe {
        if tc {
            let q16 = d_q16.device_ptr(st).0;
            let (pq, pr, ps) = (pp(&d_q), pp(&d_rows), pp(&d_sc));
            to_bf16(st, k, pq, q16, n * ih * id)?;
            idx_scores_tc(be, k, n, q16, pw, pr, p0p, vis_max, ps, ld, wg, tpb, r32)?
        } else {
            let (pq, pr, ps) = (pp(&d_q), pp(&d_rows), pp(&d_sc));
            idx_scores(st, k, n, pq, pw, pr, ih, id, p0p, r, vis_max, ps, ld)?
        }
    };
    be.download(&d_sc)
}

/// The visible scores of `sc` (`n × ld`) in token-major order, with the f64 reference score
/// and L1 mass Σ_h |w_h|·Σ|q·k| of each.
#[allow(clippy::too_many_arguments)]
fn idx_reference(
    sc: &[f32],
    q: &[f32],
    w: &[f32],
    rows: &[f32],
    (ih, id, r): (usize, usize, usize),
    p0: usize,
    n: usize,
    ld: usize,
) -> (Vec<f32>, Vec<(f64, f64)>) {
    let (mut gpu, mut pairs) = (Vec::new(), Vec::new());
    for t in 0..n {
        for row in 0..(p0 + t + 1) / r {
            let kr = &rows[row * id..(row + 1) * id];
            let (mut s, mut l1) = (0f64, 0f64);
            for h in 0..ih {
                let qh = &q[(t * ih + h) * id..(t * ih + h + 1) * id];
                let d: f64 = qh.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let da: f64 = qh
                    .iter()
                    .zip(kr)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum();
                s += w[t * ih + h] as f64 * d.max(0.0);
                l1 += (w[t * ih + h] as f64).abs() * da;
            }
            gpu.push(sc[t * ld + row]);
            pairs.push((s, l1));
        }
    }
    (gpu, pairs)
}

/// The tensor-core indexer scores (`k_idx_scores_tc`, production prefill with QAT) on
/// fp4sim'd queries and F16-stored fp4sim'd rows: against the f64 reference, against the f32
/// `k_idx_scores` (exact products and block sums: equal but for rare rounding), and run to
/// run. 20 tokens: token groups of 8 with a partial one, and a row tile (from 256) that the
/// group's first tokens do not see yet (its first group then has one token); 23 tokens (a
/// last group of 7: `k_idx_scores_wg`'s token pairs and a single one); one token at position
/// 8190 (a decode step).
fn check_indexer_tc(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    // Prefill chunks, and a decode step (one token) at a longer context.
    for (p0, n) in [(1020usize, 20usize), (1020, 23), (8190, 1)] {
        check_indexer_tc_at(be, rng, p0, n, out)?;
    }
    Ok(())
}

/// Indexer scores `got` against another kernel's `base` (the same visible scores, `pairs`
/// their f64 references and L1 masses): within 1e-6 of each score's mass, with how many
/// differ in bits from `base_name`'s.
fn scores_vs(
    name: &str,
    shape: &str,
    got: &[f32],
    (base, pairs): (&[f32], &[(f64, f64)]),
    base_name: &str,
) -> CheckRow {
    let as_ref: Vec<(f64, f64)> = base
        .iter()
        .zip(pairs)
        .map(|(&v, &(_, l1))| (v as f64, l1))
        .collect();
    let mut row = compare(name, GgmlType::F32, shape.into(), got, &as_ref, 1e-6);
    row.note = format!(
        "{} of {} scores differ in bits from {base_name}",
        bits_differ(base, got),
        got.len()
    );
    row
}

fn check_indexer_tc_at(
    be: &CudaBackend,
    rng: &mut Rng,
    p0: usize,
    n: usize,
    out: &mut Vec<CheckRow>,
) -> Result<()> {
    let k = super::attn::AttnKernels::load(be)?;
    let (ih, id, r) = (64usize, 128usize, 4usize);
    let vis_max = (p0 + n) / r;
    let ld = vis_max + 1;
    let mut q = random_activations(rng, n * ih * id);
    q.chunks_exact_mut(id)
        .for_each(crate::quant::indexer_qat_inplace);
    let mut rows = random_activations(rng, vis_max * id);
    for row in rows.chunks_exact_mut(id) {
        crate::quant::indexer_qat_inplace(row);
        row.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32());
    }
    let w: Vec<f32> = (0..n * ih).map(|_| (rng.normal() * 0.1) as f32).collect();
    // tc twice, f32, then (where the wgmma form takes the step) wg twice and once with all
    // the tokens in one block a row tile.
    let wg = k.has_idx_wg() && n >= 16;
    // Then the 128- and 32-row forms of k_idx_scores_tc (bit for bit the same).
    let mut modes = vec![
        (true, false, None, None),
        (true, false, None, None),
        (false, false, None, None),
        (true, false, None, Some(false)),
        (true, false, None, Some(true)),
    ];
    if wg {
        modes.extend([
            (true, true, None, None),
            (true, true, None, None),
            (true, true, Some(n), None),
        ]);
    }
    let mut runs = Vec::new();
    for mode in modes {
        runs.push(run_idx_scores(be, &k, (&q, &w, &rows), p0, n, mode)?);
    }
    let shape = format!("p0={p0} n={n} iH={ih} iD={id} fp4");
    let (tc, pairs) = idx_reference(&runs[0], &q, &w, &rows, (ih, id, r), p0, n, ld);
    out.push(compare(
        "idx_scores_tc",
        GgmlType::F32,
        shape.clone(),
        &tc,
        &pairs,
        TOL_F32,
    ));
    let (f32s, _) = idx_reference(&runs[2], &q, &w, &rows, (ih, id, r), p0, n, ld);
    out.push(scores_vs(
        "idx_scores_tc_vs_f32",
        &shape,
        &tc,
        (&f32s, &pairs),
        "k_idx_scores",
    ));
    out.push(det_row(
        "idx_scores_tc",
        GgmlType::F32,
        &shape,
        same_bits(&runs[0], &runs[1]),
    ));
    let (r128, _) = idx_reference(&runs[3], &q, &w, &rows, (ih, id, r), p0, n, ld);
    let (r32, _) = idx_reference(&runs[4], &q, &w, &rows, (ih, id, r), p0, n, ld);
    let bad = bits_differ(&r128, &r32);
    let mut row = exact_row("idx_scores_tc32_vs_128", GgmlType::F32, &shape, bad);
    row.note = format!(
        "{bad} of {} scores differ in bits between 32 and 128 rows a block",
        r128.len()
    );
    out.push(row);
    // The wgmma form (Hopper, prefill-sized steps): the same terms as k_idx_scores_tc summed
    // in another order, so against the f64 reference as tc is, and against tc within f32
    // rounding of each score's mass.
    if wg {
        let (wgs, _) = idx_reference(&runs[5], &q, &w, &rows, (ih, id, r), p0, n, ld);
        out.push(compare(
            "idx_scores_wg",
            GgmlType::F32,
            shape.clone(),
            &wgs,
            &pairs,
            TOL_F32,
        ));
        out.push(scores_vs(
            "idx_scores_wg_vs_tc",
            &shape,
            &wgs,
            (&tc, &pairs),
            "k_idx_scores_tc (another order of the same terms)",
        ));
        out.push(det_row(
            "idx_scores_wg",
            GgmlType::F32,
            &shape,
            same_bits(&runs[5], &runs[6]),
        ));
        // A block's tokens are its loop's, so how many it takes changes no score.
        let (one, _) = idx_reference(&runs[7], &q, &w, &rows, (ih, id, r), p0, n, ld);
        let mism = bits_differ(&wgs, &one);
        out.push(CheckRow {
            note: format!(
                "{mism} of {} scores differ in bits with all {n} tokens in one block",
                wgs.len()
            ),
            ..exact_row("idx_scores_wg_tpb", GgmlType::F32, &shape, mism)
        });
    }
    Ok(())
}

/// Indexer scores (attn.cu) against an f64 reference, and the exact top-k against
/// `ops::top_k` (ascending), on the GPU's own scores and on scores full of ties.
fn check_indexer(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    let k = super::attn::AttnKernels::load(be)?;
    let (ih, id, kk, r) = (64usize, 128usize, 512usize, 4usize);
    let (p0, n) = (4090usize, 6usize);
    let vis_max = (p0 + n) / r;
    let ld = vis_max + 1;
    let q = random_activations(rng, n * ih * id);
    let w: Vec<f32> = (0..n * ih).map(|_| (rng.normal() * 0.1) as f32).collect();
    let rows = random_activations(rng, vis_max * id);
    let sc = run_idx_scores(be, &k, (&q, &w, &rows), p0, n, (false, false, None, None))?;
    let shape = format!("p0={p0} n={n} iH={ih} iD={id}");
    let (gpu, pairs) = idx_reference(&sc, &q, &w, &rows, (ih, id, r), p0, n, ld);
    out.push(compare(
        "idx_scores",
        GgmlType::F32,
        shape,
        &gpu,
        &pairs,
        TOL_F32,
    ));
    // Top-k: the GPU's scores, then scores with many ties (8 levels); then one decode token
    // through k_topk1 and k_topk_mb, and longer rows: 15k and 35k visible.
    let tied: Vec<f32> = (0..n * ld)
        .map(|_| (rng.next_u64() % 8) as f32 * 0.5 - 1.0)
        .collect();
    // ld = vis_max + 1 (odd): k_topk_rows (k_topk_w: a warp a token, when its switch is on);
    // the same rows with ld a multiple of 4: a block of k_topk1 a token (prefill chunks;
    // k_topk_w when its switch is on).
    check_topk(be, &k, "topk_rows", &sc, p0, n, ld, kk, None, out)?;
    check_topk(be, &k, "topk_rows_ties", &tied, p0, n, ld, kk, None, out)?;
    let ld4 = ld.next_multiple_of(4);
    let pad = |v: &[f32]| -> Vec<f32> {
        v.chunks(ld)
            .flat_map(|r| {
                r.iter()
                    .copied()
                    .chain(std::iter::repeat_n(f32::NAN, ld4 - ld))
            })
            .collect()
    };
    check_topk(be, &k, "topk1_chunk", &pad(&sc), p0, n, ld4, kk, None, out)?;
    check_topk(
        be,
        &k,
        "topk1_chunk_ties",
        &pad(&tied),
        p0,
        n,
        ld4,
        kk,
        None,
        out,
    )?;
    // Prefill chunks of up to 2,048 visible rows take a warp a token (k_topk_w; the rows above
    // run its 32-key form): 64 keys a lane (1,500 rows), normal and with 8 tied levels, and a
    // chunk whose first tokens see at most topk rows (all taken).
    for (name, p0, n) in [("topk_w64", 6000usize, 6usize), ("topk_w_short", 2040, 16)] {
        let ld = ((p0 + n) / r + 1).next_multiple_of(4);
        let normal: Vec<f32> = (0..n * ld).map(|_| rng.normal() as f32).collect();
        let mixed = tie_mix(rng, n * ld, 2, 0.25);
        check_topk(be, &k, name, &normal, p0, n, ld, kk, None, out)?;
        check_topk(
            be,
            &k,
            &format!("{name}_ties"),
            &mixed,
            p0,
            n,
            ld,
            kk,
            None,
            out,
        )?;
    }
    // One decode token through k_topk_mb: 64 blocks of ~16 rows (ties across many blocks),
    // and as a launch at the visible count would size it.
    let min_mb = super::attn::topk_mb_min_rows();
    if min_mb < usize::MAX / 2 {
        let last = &sc[(n - 1) * ld..n * ld];
        let last_tied = &tied[(n - 1) * ld..n * ld];
        let p_last = p0 + n - 1;
        check_topk(
            be,
            &k,
            "topk_mb",
            last,
            p_last,
            1,
            ld,
            kk,
            Some(min_mb.max(1 << 16)),
            out,
        )?;
        check_topk(
            be,
            &k,
            "topk_mb_ties",
            last_tied,
            p_last,
            1,
            ld,
            kk,
            Some(min_mb.max(1 << 16)),
            out,
        )?;
    }
    // One decode token through k_topk1 (keys in registers; DS4_CUDA_TOPK1=0: k_topk_rows),
    // from one key a thread to 16: normal scores, and a mix with 8 tied levels.
    for vis in [700usize, 1024, 1500, 4096, 8191, 16_384] {
        let (p0, ld) = (vis * r - 1, vis + 1);
        let normal: Vec<f32> = (0..ld).map(|_| rng.normal() as f32).collect();
        let mixed = tie_mix(rng, ld, 2, 0.25);
        for (name, sc) in [("topk1", &normal), ("topk1_ties", &mixed)] {
            let name = format!("{name}_{vis}");
            check_topk(be, &k, &name, sc, p0, 1, ld, kk, None, out)?;
        }
    }
    // Chunks of long rows: 15k visible (k_topk1 when ld is a multiple of 4, as here), 35k
    // (k_topk_rows).
    for p0 in [60_000usize, 140_000] {
        let (n, ld) = (3usize, ((p0 + 3) / r + 1).next_multiple_of(4));
        let sc = tie_mix(rng, n * ld, 3, 0.5);
        check_topk(be, &k, "topk_rows_long", &sc, p0, n, ld, kk, None, out)?;
        if min_mb < usize::MAX / 2 {
            let vis = (p0 + 1) / r;
            let v = vis.max(min_mb);
            check_topk(
                be,
                &k,
                "topk_mb_long",
                &sc[..ld],
                p0,
                1,
                ld,
                kk,
                Some(v),
                out,
            )?;
        }
    }
    Ok(())
}

/// `len` top-k scores: every `every`-th one of 8 tied levels `step` apart, the others normal.
fn tie_mix(rng: &mut Rng, len: usize, every: usize, step: f32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            if i % every == 0 {
                (rng.next_u64() % 8) as f32 * step
            } else {
                rng.normal() as f32
            }
        })
        .collect()
}

/// `k_topk_rows` on `scores` (`n × ld`, ratio 4 from position p0) against `ops::top_k`:
/// every token's selection (ascending rows) and count equal. `mb = Some(v)`: one token through
/// `k_topk_mb`, its grid sized as for a launch serving up to `v` visible rows (v ≥ the
/// threshold; a large v spreads few rows over many blocks).
#[allow(clippy::too_many_arguments)]
fn check_topk(
    be: &CudaBackend,
    k: &super::attn::AttnKernels,
    name: &str,
    scores: &[f32],
    p0: usize,
    n: usize,
    ld: usize,
    kk: usize,
    mb: Option<usize>,
    out: &mut Vec<CheckRow>,
) -> Result<()> {
    use super::attn::topk;
    use crate::model::ops::top_k;
    let r = 4usize;
    let st = be.stream();
    let d_s = be.upload_f32(scores)?;
    let d_sel = be.upload_i32(&vec![-1; n * kk])?;
    let d_cnt = be.upload_i32(&vec![-1; n])?;
    let d_p0 = st.clone_htod(&[p0 as i64])?;
    let work = be.upload_i32(&vec![0; super::attn::TOPK_MB_WORDS])?;
    let pi = |b: &CudaSlice<i32>| b.device_ptr(st).0;
    let (vis_max, w) = match mb {
        Some(v) => {
            assert!(
                n == 1 && v >= super::attn::topk_mb_min_rows(),
                "{name}: not k_topk_mb"
            );
            (v, pi(&work))
        }
        None => ((p0 + n) / r, 0),
    };
    // Twice: the second launch finds the work buffer as the first left it.
    for _ in 0..if mb.is_some() { 2 } else { 1 } {
        // SAFETY: buffers sized as `topk` documents.
        unsafe {
            topk(
                be,
                k,
                n,
                d_s.device_ptr(st).0,
                ld,
                d_p0.device_ptr(st).0,
                r,
                kk,
                pi(&d_sel),
                pi(&d_cnt),
                vis_max,
                w,
            )?
        };
    }
    let sel = be.download(&d_sel)?;
    let cnt = be.download(&d_cnt)?;
    let mut bad = 0usize;
    let mut idx = Vec::new();
    for t in 0..n {
        let vis = (p0 + t + 1) / r;
        top_k(&scores[t * ld..t * ld + vis], kk, &mut idx);
        idx.sort_unstable();
        let want: Vec<i32> = idx.iter().map(|&i| i as i32).collect();
        if cnt[t] as usize != want.len() || sel[t * kk..t * kk + want.len()] != want[..] {
            bad += 1;
        }
    }
    let mut row = exact_row(name, GgmlType::F32, &format!("p0={p0} n={n} k={kk}"), bad);
    row.note = format!("{bad} tokens' selections differ from ops::top_k");
    out.push(row);
    Ok(())
}

/// The windowed compressor (attn.cu k_comp_pool + k_comp_state) fed a sequence in uneven
/// chunks, against cache.rs `Compressor::push` + RMSNorm + RoPE (exact mode, no QAT): rows
/// to f32 rounding of the RMS scale, frontier bit for bit.
fn check_compress(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    use super::attn::{compress, AttnKernels, Compress};
    use crate::model::cache::Compressor;
    use crate::model::ops::rms_norm;
    let k = AttnKernels::load(be)?;
    let st = be.stream();
    let (half, eps) = (16usize, 1e-6f32);
    for (ratio, d, coff) in [(4usize, 128usize, 2usize), (128, 64, 1)] {
        let wd = coff * d;
        let chunks: &[usize] = if ratio == 4 {
            &[1, 6, 3, 1, 1, 17, 40, 2]
        } else {
            &[5, 200, 1, 130, 1, 64]
        };
        let total: usize = chunks.iter().sum();
        let kvp = random_activations(rng, total * wd);
        let scp: Vec<f32> = (0..total * wd).map(|_| rng.normal() as f32).collect();
        let ape: Vec<f32> = (0..ratio * wd)
            .map(|_| (rng.normal() * 0.5) as f32)
            .collect();
        let norm: Vec<f32> = (0..d).map(|_| 1.0 + (rng.normal() * 0.1) as f32).collect();
        let freqs: Vec<f64> = (0..half).map(|_| rng.uniform()).collect();
        // CPU reference.
        let mut cpu = Compressor::new(ratio, d, wd);
        let mut want = Vec::new();
        let mut pooled = vec![0f32; d];
        for pos in 0..total {
            let score: Vec<f32> = (0..wd)
                .map(|i| scp[pos * wd + i] + ape[(pos % ratio) * wd + i])
                .collect();
            if cpu.push(pos, &kvp[pos * wd..(pos + 1) * wd], &score, &mut pooled) {
                rms_norm(&mut pooled, Some(&norm), eps);
                let ang: Vec<(f32, f32)> = freqs
                    .iter()
                    .map(|&f| {
                        let (s, c) = ((pos + 1 - ratio) as f64 * f).sin_cos();
                        (c as f32, s as f32)
                    })
                    .collect();
                crate::model::rope::Rope::rotate_tail(&mut pooled, &ang, false);
                want.extend_from_slice(&pooled);
            }
        }
        // GPU, chunk by chunk.
        let n_state = coff * ratio * wd;
        let d_kv = be.alloc_f32(n_state)?;
        let d_sc = be.upload_f32(&vec![f32::NEG_INFINITY; n_state])?;
        let n_rows = total / ratio;
        let d_rows = poisoned(be, (n_rows * d).max(1))?;
        let d_ape = be.upload_f32(&ape)?;
        let d_norm = be.upload_f32(&norm)?;
        let d_freqs = st.clone_htod(&freqs)?;
        let mut p0 = 0;
        for &n in chunks {
            let d_kvp = be.upload_f32(&kvp[p0 * wd..(p0 + n) * wd])?;
            let d_scp = be.upload_f32(&scp[p0 * wd..(p0 + n) * wd])?;
            let d_p0 = st.clone_htod(&[p0 as i64])?;
            let pp = |b: &CudaSlice<f32>| b.device_ptr(st).0;
            let c = Compress {
                n,
                kvp: pp(&d_kvp),
                scp: pp(&d_scp),
                ape: pp(&d_ape),
                skv: pp(&d_kv),
                ssc: pp(&d_sc),
                rows: pp(&d_rows),
                norm: pp(&d_norm),
                freqs: d_freqs.device_ptr(st).0,
                p0: d_p0.device_ptr(st).0,
                ratio,
                d,
                coff,
                half,
                eps,
                kind: 0,
                qat: false,
                exact: true,
            };
            // SAFETY: buffers sized as `Compress` documents.
            unsafe { compress(be, &k, &c)? };
            be.synchronize()?;
            p0 += n;
        }
        let rows = be.download(&d_rows)?;
        let refs: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        let shape = format!("r={ratio} d={d} chunks={chunks:?}");
        out.push(fwd_row(
            "compress_rows",
            shape.clone(),
            &rows[..want.len()],
            &refs,
            1e-6,
            "vs Compressor::push + RMSNorm + RoPE",
        ));
        let (gkv, gsc) = (be.download(&d_kv)?, be.download(&d_sc)?);
        let mism = !same_bits(&gkv, &cpu.kv) as usize + !same_bits(&gsc, &cpu.score) as usize;
        let mut row = exact_row("compress_state", GgmlType::F32, &shape, mism);
        row.note = format!("{mism} of 2 frontier buffers differ in bits from Compressor");
        out.push(row);
    }
    Ok(())
}

/// Programmatic dependent launch: a chain of 24 dependent launches (quantize, int8 matvec,
/// quantize, ... each reading the previous output) run with PDL on must give the same bits
/// as with it off; a missing wait would let a kernel read its input before it is written.
fn check_pdl_chain(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    let (ty, n) = (GgmlType::Q8_0, 2048usize);
    let wb = random_weight(rng, ty, n, n);
    let w = be.upload_weight(ty, &wb, n, n, 1, &mut |_, _| {})?;
    let x = random_activations(rng, n);
    let run = |pdl: bool| -> Result<Vec<f32>> {
        let bufs = [be.upload_f32(&x)?, be.alloc_f32(n)?];
        let qb = be.alloc_f32(n / 4)?;
        let db = be.alloc_f32(n / 32)?;
        let st = be.stream();
        let p: Vec<u64> = bufs.iter().map(|b| b.device_ptr(st).0).collect();
        let (qp, dp) = (qb.device_ptr(st).0, db.device_ptr(st).0);
        be.set_pdl(pdl);
        let mut r = Ok(());
        for i in 0..12 {
            // SAFETY: every buffer holds n values (codes: n bytes, scales: n/32).
            r = unsafe {
                be.quant_act_raw(ActQuant::Q8_0, p[i % 2], n, qp, dp)
                    .and_then(|_| be.mv8_raw(&w, 0, 1, qp, dp, 0, p[(i + 1) % 2]))
            };
            if r.is_err() {
                break;
            }
        }
        be.set_pdl(false);
        r?;
        be.download(&bufs[0])
    };
    let (a, b) = (run(false)?, run(true)?);
    let same = same_finite_bits(&a, &b);
    out.push(CheckRow {
        kernel: "pdl_chain".into(),
        ty,
        shape: format!("24 launches, {n}x{n}"),
        max_abs: 0.0,
        max_err: if same { 0.0 } else { 1.0 },
        rel_l2: 0.0,
        tol: 0.0,
        pass: same,
        note: "programmatic dependent launch vs plain launches, bit for bit".into(),
    });
    Ok(())
}

/// Fused gate+up+SwiGLU over int8 activations (`mv8glu_raw`, the routed-expert form: ids,
/// routing weights, clamp) against the CPU's quantized matvecs and the SwiGLU of moe.rs
/// (`silu(min(g, c))·clamp(u, ±c)·w`).
fn check_glu_int8(
    be: &CudaBackend,
    rng: &mut Rng,
    ty: GgmlType,
    out: &mut Vec<CheckRow>,
) -> Result<()> {
    use crate::model::ops;
    let kind = ActQuant::of(ty).expect("int8 type");
    // 2048 / 4096 columns: IQ2_XXS rows of whole 8-block groups (lane_rows_iq2a); 1280: the
    // general lane path (rows 2-byte aligned). The Flash shape (2048 rows: 384 units of the
    // lane kernels' persistent grid, more than an H100/H200 holds at once) makes blocks take
    // several units.
    for (n_rows, n_cols) in [(96usize, 2048usize), (40, 4096), (24, 1280), (2048, 4096)] {
        let n_exp = 4;
        let wgb = random_weight(rng, ty, n_exp * n_rows, n_cols);
        let wub = random_weight(rng, ty, n_exp * n_rows, n_cols);
        let wg = be.upload_weight(ty, &wgb, n_rows, n_cols, n_exp, &mut |_, _| {})?;
        let wu = be.upload_weight(ty, &wub, n_rows, n_cols, n_exp, &mut |_, _| {})?;
        let ids = [3i32, 0, 2];
        let wts: Vec<f32> = ids.iter().map(|_| rng.uniform() as f32).collect();
        let clamp = 10.0f32;
        let x = random_activations(rng, n_cols);
        let (idsd, wtsd, xd) = (
            be.upload_i32(&ids)?,
            be.upload_f32(&wts)?,
            be.upload_f32(&x)?,
        );
        let qb = be.alloc_f32(n_cols / 4)?;
        let db = be.alloc_f32(n_cols / kind.block())?;
        let h = poisoned(be, ids.len() * n_rows)?;
        let st = be.stream();
        let (xp, qp, dp, hp, ip, wp) = (
            xd.device_ptr(st).0,
            qb.device_ptr(st).0,
            db.device_ptr(st).0,
            h.device_ptr(st).0,
            idsd.device_ptr(st).0,
            wtsd.device_ptr(st).0,
        );
        // SAFETY: buffers sized above (one shared input, slots outputs of n_rows).
        unsafe {
            be.quant_act_raw(kind, xp, n_cols, qp, dp)?;
            be.mv8glu_raw(&wg, &wu, ip, ids.len(), qp, dp, wp, clamp, hp)?;
        }
        let gpu = be.download(&h)?;
        let mat = n_rows * (n_cols / ty.block_elems() * ty.block_bytes());
        let mut cpu = vec![0f32; ids.len() * n_rows];
        let (mut g, mut u) = (vec![0f32; n_rows], vec![0f32; n_rows]);
        for (sl, &e) in ids.iter().enumerate() {
            let e = e as usize;
            cpu_matvec(
                ty,
                &wgb[e * mat..(e + 1) * mat],
                n_rows,
                n_cols,
                &x,
                &mut g,
                false,
            );
            cpu_matvec(
                ty,
                &wub[e * mat..(e + 1) * mat],
                n_rows,
                n_cols,
                &x,
                &mut u,
                false,
            );
            for o in 0..n_rows {
                let gv = g[o].min(clamp);
                let uv = u[o].clamp(-clamp, clamp);
                cpu[sl * n_rows + o] = ops::silu(gv) * uv * wts[sl];
            }
        }
        // Random Q8_0 gate/up sums cancel (their L1 mass is ~100x the result), so f32
        // summation order moves them by up to ~1e-5 of the largest output (7e-6 seen): the
        // bound is looser than the plain matvec rows'.
        let mut row = rel_row(
            "glu_int8",
            &format!("{n_exp}exp,{}sel,{n_rows}x{n_cols}", ids.len()),
            &gpu,
            &cpu,
            5e-5,
            "vs CPU quantized matvecs + SwiGLU; max_err = max|d| / max|cpu|",
        );
        row.ty = ty;
        out.push(row);
    }
    Ok(())
}

/// `k_hc_post_ring` (decode ring push + hc_post) against the CPU: `hc::post` bit for bit, and
/// the KV row copied into ring slot `pos % swa`, every other slot untouched.
fn check_hc_post_ring(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    use crate::model::hc;
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let (n, d, swa, dh, pos) = (4usize, 4096usize, 128usize, 512usize, 1234i64);
    let x = random_activations(rng, n * d);
    let f = random_activations(rng, d);
    let kv = random_activations(rng, dh);
    let ring0 = random_activations(rng, swa * dh);
    let post: Vec<f32> = (0..n).map(|_| rng.uniform() as f32 * 2.0).collect();
    let comb: Vec<f32> = (0..n * n).map(|_| rng.uniform() as f32).collect();
    let dims = test_hc_dims(n, d);
    let split = hc::HcSplit {
        post: post.clone(),
        comb: comb.clone(),
    };
    let mut cpu = x.clone();
    hc::post(&dims, &mut cpu, &f, &split, &mut Vec::new());
    let mut ring_cpu = ring0.clone();
    let slot = pos as usize % swa;
    ring_cpu[slot * dh..(slot + 1) * dh].copy_from_slice(&kv);
    let xd = be.upload_f32(&x)?;
    let ringd = be.upload_f32(&ring0)?;
    let bufs = [
        be.upload_f32(&f)?,
        be.upload_f32(&post)?,
        be.upload_f32(&comb)?,
        be.upload_f32(&kv)?,
    ];
    let posd = be.stream().clone_htod(&[pos])?;
    let st = be.stream();
    let (xp, rp, pp) = (
        xd.device_ptr(st).0,
        ringd.device_ptr(st).0,
        posd.device_ptr(st).0,
    );
    let bp: Vec<u64> = bufs.iter().map(|b| b.device_ptr(st).0).collect();
    let (ni, di, si, hi) = (n as i32, d as i32, swa as i32, dh as i32);
    let fun = be.function("k_hc_post_ring")?;
    let mut b = st.launch_builder(&fun);
    b.arg(&xp)
        .arg(&bp[0])
        .arg(&bp[1])
        .arg(&bp[2])
        .arg(&ni)
        .arg(&di)
        .arg(&bp[3])
        .arg(&rp)
        .arg(&pp)
        .arg(&si)
        .arg(&hi);
    let cfg = LaunchConfig {
        grid_dim: ((d as u32).div_ceil(256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument list matches k_hc_post_ring; buffers sized above.
    unsafe { b.launch(cfg) }?;
    let g = be.download(&xd)?;
    let gr = be.download(&ringd)?;
    let mism = g
        .iter()
        .zip(&cpu)
        .chain(gr.iter().zip(&ring_cpu))
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let mut row = exact_row(
        "hc_post_ring",
        GgmlType::F32,
        &format!("n{n}xd{d},ring{swa}x{dh}"),
        mism,
    );
    row.note = format!("{mism} elements differ in bits from CPU hc::post + ring copy");
    out.push(row);
    Ok(())
}

/// `k_hc_post_moe` (decode expert sum + hc_post) against the CPU: f = Σ_j dn_j + sh in
/// slot order (as moe.rs), then `hc::post`.
fn check_hc_post_moe(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    use crate::model::hc;
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let (n, d, k) = (4usize, 4096usize, 6usize);
    let x = random_activations(rng, n * d);
    let dn = random_activations(rng, k * d);
    let sh = random_activations(rng, d);
    let post: Vec<f32> = (0..n).map(|_| rng.uniform() as f32 * 2.0).collect();
    let comb: Vec<f32> = (0..n * n).map(|_| rng.uniform() as f32).collect();
    let mut f = vec![0f32; d];
    for (e, fe) in f.iter_mut().enumerate() {
        let mut a = 0f32;
        for j in 0..k {
            a += dn[j * d + e];
        }
        *fe = a + sh[e];
    }
    let dims = test_hc_dims(n, d);
    let split = hc::HcSplit {
        post: post.clone(),
        comb: comb.clone(),
    };
    let mut cpu = x.clone();
    hc::post(&dims, &mut cpu, &f, &split, &mut Vec::new());
    let xd = be.upload_f32(&x)?;
    let bufs = [
        be.upload_f32(&dn)?,
        be.upload_f32(&sh)?,
        be.upload_f32(&post)?,
        be.upload_f32(&comb)?,
    ];
    let st = be.stream();
    let xp = xd.device_ptr(st).0;
    let pp: Vec<u64> = bufs.iter().map(|b| b.device_ptr(st).0).collect();
    let (ki, ni, di) = (k as i32, n as i32, d as i32);
    let fun = be.function("k_hc_post_moe")?;
    let mut b = st.launch_builder(&fun);
    b.arg(&xp)
        .arg(&pp[0])
        .arg(&pp[1])
        .arg(&ki)
        .arg(&pp[2])
        .arg(&pp[3])
        .arg(&ni)
        .arg(&di);
    let cfg = LaunchConfig {
        grid_dim: ((d as u32).div_ceil(256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument list matches k_hc_post_moe; buffers sized above.
    unsafe { b.launch(cfg) }?;
    let g = be.download(&xd)?;
    let mism = bits_differ(&g, &cpu);
    let mut row = exact_row(
        "hc_post_moe",
        GgmlType::F32,
        &format!("n{n}xd{d}xk{k}"),
        mism,
    );
    row.note = format!("{mism} elements differ in bits from CPU moe sum + hc::post");
    out.push(row);
    Ok(())
}

/// `k_hc_post_mix` (decode: a site's hc_post fused into the next site's control product)
/// against the two kernels it replaces, run on a copy of the state: `k_hc_post_ring` (kx = 0,
/// with the ring push) or `k_hc_post_moe` (kx expert rows), then `k_hc_mix_part`. The new
/// state (written to the other buffer, the old one untouched), the partial dots, the partial
/// sums of squares and the ring, bit for bit.
fn check_hc_post_mix(
    be: &CudaBackend,
    rng: &mut Rng,
    kx: usize,
    out: &mut Vec<CheckRow>,
) -> Result<()> {
    use super::device::Slot;
    use cudarc::driver::LaunchConfig;
    let (n, d, swa, dh, pos) = (4usize, 4096usize, 128usize, 512usize, 777i64);
    let (rows, width) = ((2 + n) * n, n * d);
    let nb = width / 512;
    let wb = random_weight(rng, GgmlType::F16, rows, width);
    let w = be.upload_weight(GgmlType::F16, &wb, rows, width, 1, &mut |_, _| {})?;
    let x = random_activations(rng, width);
    let f = random_activations(rng, kx.max(1) * d);
    let sh = random_activations(rng, d);
    let kv = random_activations(rng, dh);
    let ring0 = random_activations(rng, swa * dh);
    let post: Vec<f32> = (0..n).map(|_| rng.uniform() as f32 * 2.0).collect();
    let comb: Vec<f32> = (0..n * n).map(|_| rng.uniform() as f32).collect();
    let st = be.stream();
    let up = |v: &[f32]| be.upload_f32(v);
    let (xa, xb, xn) = (up(&x)?, up(&x)?, poisoned(be, width)?);
    let (fd, shd, kvd, pd, cd) = (up(&f)?, up(&sh)?, up(&kv)?, up(&post)?, up(&comb)?);
    let (ra, rb) = (up(&ring0)?, up(&ring0)?);
    let (pa, pb) = (poisoned(be, nb * rows)?, poisoned(be, nb * rows)?);
    let (sa, sb) = (st.alloc_zeros::<f64>(nb)?, st.alloc_zeros::<f64>(nb)?);
    let posd = st.clone_htod(&[pos])?;
    let pt = |b: &CudaSlice<f32>| b.device_ptr(st).0;
    let ptd = |b: &CudaSlice<f64>| b.device_ptr(st).0;
    let (wp, pp) = (be.weight_ptr(&w), posd.device_ptr(st).0);
    let (ni, di, ri, wi, ki) = (n as i32, d as i32, rows as i32, width as i32, kx as i32);
    let cfg = |grid: (u32, u32, u32), threads: u32| LaunchConfig {
        grid_dim: grid,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let post_grid = ((d as u32).div_ceil(256), 1, 1);
    let mix_grid = (nb as u32, rows.div_ceil(8) as u32, 1);
    // SAFETY (every launch below): the argument lists match the kernels' signatures; the
    // buffers are sized above (f holds kx·d floats, the ring swa·dh).
    // The reference: the separate kernels on xa (in place), ring ra.
    if kx == 0 {
        let mut a = [
            pt(&xa),
            pt(&fd),
            pt(&pd),
            pt(&cd),
            ni.slot(),
            di.slot(),
            pt(&kvd),
            pt(&ra),
        ]
        .into_iter()
        .chain([pp, (swa as i32).slot(), (dh as i32).slot()])
        .collect::<Vec<u64>>();
        unsafe { be.launch_slots(&be.function("k_hc_post_ring")?, cfg(post_grid, 256), &mut a) }?;
    } else {
        let mut a = [
            pt(&xa),
            pt(&fd),
            pt(&shd),
            ki.slot(),
            pt(&pd),
            pt(&cd),
            ni.slot(),
            di.slot(),
        ];
        unsafe { be.launch_slots(&be.function("k_hc_post_moe")?, cfg(post_grid, 256), &mut a) }?;
    }
    let mut a = [
        pt(&xa),
        wp,
        1i32.slot(),
        ri.slot(),
        wi.slot(),
        pt(&pa),
        ptd(&sa),
    ];
    unsafe { be.launch_slots(&be.function("k_hc_mix_part")?, cfg(mix_grid, 64), &mut a) }?;
    // The fused kernel: old state xb, new state xn, ring rb.
    let (shp, kvp, rp) = if kx == 0 {
        (0, pt(&kvd), pt(&rb))
    } else {
        (pt(&shd), 0, 0)
    };
    let mut a = vec![
        pt(&xb),
        wp,
        1i32.slot(),
        ri.slot(),
        wi.slot(),
        pt(&pb),
        ptd(&sb),
        pt(&xn),
    ];
    a.extend([
        pt(&fd),
        shp,
        ki.slot(),
        pt(&pd),
        pt(&cd),
        ni.slot(),
        di.slot(),
        kvp,
        rp,
        pp,
    ]);
    a.extend([(swa as i32).slot(), (dh as i32).slot()]);
    unsafe { be.launch_slots(&be.function("k_hc_post_mix")?, cfg(mix_grid, 64), &mut a) }?;
    let dl = |b: &CudaSlice<f32>| be.download(b);
    let (ssa, ssb) = (st.clone_dtoh(&sa)?, st.clone_dtoh(&sb)?);
    let mism = bits_differ(&dl(&xn)?, &dl(&xa)?)
        + bits_differ(&dl(&pb)?, &dl(&pa)?)
        + bits_differ(&dl(&rb)?, &dl(&ra)?)
        + bits_differ(&dl(&xb)?, &x)
        + ssa
            .iter()
            .zip(&ssb)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
    let shape = format!("n{n}xd{d}xk{kx}");
    let mut row = exact_row("hc_post_mix", GgmlType::F16, &shape, mism);
    row.note = format!(
        "{mism} elements differ in bits from {} + k_hc_mix_part (state, partials, ring)",
        if kx == 0 {
            "k_hc_post_ring"
        } else {
            "k_hc_post_moe"
        }
    );
    out.push(row);
    Ok(())
}

/// Bytes `q` (codes) and f32 `d` (scales) downloaded from f32-typed scratch.
fn download_codes(be: &CudaBackend, q: &CudaSlice<f32>, n: usize) -> Result<Vec<u8>> {
    Ok(code_bytes(&be.download(q)?, n))
}

/// The first `n` int8 codes of a buffer downloaded as f32 words.
fn code_bytes(words: &[f32], n: usize) -> Vec<u8> {
    words
        .iter()
        .flat_map(|v| v.to_bits().to_le_bytes())
        .take(n)
        .collect()
}

/// Mismatching codes + scales of GPU int8 activations against the CPU quantizer of `x`.
fn code_mismatches(kind: ActQuant, x: &[f32], gq: &[u8], gd: &[f32]) -> usize {
    let (cq, cd): (Vec<u8>, Vec<f32>) = match kind {
        ActQuant::Q8_0 => {
            let v = quantize_act_q8_0(x);
            (
                v.iter().flat_map(|b| b.qs.map(|q| q as u8)).collect(),
                v.iter().map(|b| b.d).collect(),
            )
        }
        ActQuant::Q8K => {
            let v = quantize_act_q8_k(x);
            (
                v.iter().flat_map(|b| b.qs.map(|q| q as u8)).collect(),
                v.iter().map(|b| b.d).collect(),
            )
        }
    };
    cq.iter().zip(gq).filter(|(a, b)| a != b).count()
        + bits_differ(&cd, gd)
        + cq.len().abs_diff(gq.len())
        + cd.len().abs_diff(gd.len())
}

/// max |gpu − cpu| / max |cpu| as a check row.
fn rel_row(kernel: &str, shape: &str, gpu: &[f32], cpu: &[f32], tol: f64, note: &str) -> CheckRow {
    let (mut m, mut r) = (0f64, 0f64);
    let mut bad = gpu.len() != cpu.len();
    for (a, b) in gpu.iter().zip(cpu) {
        if !a.is_finite() {
            bad = true;
        }
        m = m.max((*a as f64 - *b as f64).abs());
        r = r.max((*b as f64).abs());
    }
    let rel = m / r.max(1e-30);
    CheckRow {
        kernel: kernel.into(),
        ty: GgmlType::F32,
        shape: shape.into(),
        max_abs: m,
        max_err: rel,
        rel_l2: 0.0,
        tol,
        pass: !bad && rel <= tol,
        note: note.into(),
    }
}

/// Grouped int8 matvec (the out_a / expert-down form: slot s multiplies matrix ids[s] by its
/// own input) against the CPU's quantized matvec: Q8_0 for both 16-byte-load kernels (512
/// and 2048 columns, and 4 rows a warp split over the columns where the slots hold 4,096
/// rows or more: 1030 x 4096), Q2_K and IQ2_XXS for the lane-owned kernels (1280 columns = 5
/// blocks: odd IQ2_XXS rows start 2 bytes off a word), row counts that leave partial row groups.
fn check_mv8_grouped(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    for (ty, n_rows, n_cols) in [
        (GgmlType::Q8_0, 98usize, 512usize),
        (GgmlType::Q8_0, 66, 2048),
        (GgmlType::Q8_0, 1030, 4096),
        (GgmlType::Q2_K, 98, 2048),
        (GgmlType::Q2_K, 67, 1280),
        (GgmlType::IQ2_XXS, 98, 4096),
        (GgmlType::IQ2_XXS, 67, 1280),
    ] {
        let kind = ActQuant::of(ty).expect("int8 type");
        let n_exp = 4;
        let wb = random_weight(rng, ty, n_exp * n_rows, n_cols);
        let w = be.upload_weight(ty, &wb, n_rows, n_cols, n_exp, &mut |_, _| {})?;
        let ids = [2i32, 0, 3, 2, 1];
        let idsd = be.upload_i32(&ids)?;
        let slots = ids.len();
        let x = random_activations(rng, slots * n_cols);
        let xd = be.upload_f32(&x)?;
        let qb = be.alloc_f32((slots * n_cols).div_ceil(4))?;
        let db = be.alloc_f32(slots * n_cols / kind.block())?;
        let y = poisoned(be, slots * n_rows)?;
        let st = be.stream();
        let (xp, _g0) = xd.device_ptr(st);
        let (qp, _g1) = qb.device_ptr(st);
        let (dp, _g2) = db.device_ptr(st);
        let (yp, _g3) = y.device_ptr(st);
        let (ip, _g4) = idsd.device_ptr(st);
        // SAFETY: buffers sized above (slots inputs of n_cols, slots outputs of n_rows).
        unsafe {
            be.quant_act_raw(kind, xp, slots * n_cols, qp, dp)?;
            be.mv8_raw(&w, ip, slots, qp, dp, n_cols, yp)?;
        }
        let g = be.download(&y)?;
        let mat = n_rows * (n_cols / ty.block_elems() * ty.block_bytes());
        let mut cpu = vec![0f32; slots * n_rows];
        for (sl, &e) in ids.iter().enumerate() {
            let e = e as usize;
            cpu_matvec(
                ty,
                &wb[e * mat..(e + 1) * mat],
                n_rows,
                n_cols,
                &x[sl * n_cols..(sl + 1) * n_cols],
                &mut cpu[sl * n_rows..(sl + 1) * n_rows],
                false,
            );
        }
        let mut row = rel_row(
            "matvec_int8_grouped",
            &format!("{n_exp}exp,{slots}sel,{n_rows}x{n_cols}"),
            &g,
            &cpu,
            1e-5,
            "vs CPU quantized matvec; max_err = max|d| / max|cpu|",
        );
        row.ty = ty;
        out.push(row);
    }
    Ok(())
}

/// Decode hc_pre (`k_hc_mix_part` + `k_hc_pre1`, F16 fn) against the CPU's `hc::control`
/// maths (fn·flat in f64, times `rms_scale`), `hc::pre` and `ops::rms_norm`; the fused int8
/// forms of y bit for bit against the CPU quantizers applied to the GPU's y. `head`: the
/// output head's form (n mixing rows; `hc::head_mix`, then the norm; the Q8_0 codes only).
fn check_hc_pre1(
    be: &CudaBackend,
    rng: &mut Rng,
    n: usize,
    d: usize,
    head: bool,
    out: &mut Vec<CheckRow>,
) -> Result<()> {
    use crate::model::{hc, ops, params::HcParams};
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let (rows, width) = (if head { n } else { (2 + n) * n }, n * d);
    let shape = format!("n{n}xd{d}{}", if head { " head" } else { "" });
    let (eps, hc_eps, iters) = (1e-6f32, 1e-6f32, 20usize);
    let wb = random_weight(rng, GgmlType::F16, rows, width);
    let w = be.upload_weight(GgmlType::F16, &wb, rows, width, 1, &mut |_, _| {})?;
    let x = random_activations(rng, width);
    let scale3: Vec<f32> = (0..3).map(|_| (0.5 + rng.uniform()) as f32).collect();
    let base: Vec<f32> = (0..rows).map(|_| (rng.normal() * 0.5) as f32).collect();
    let norm: Vec<f32> = (0..d).map(|_| (1.0 + 0.2 * rng.normal()) as f32).collect();
    // CPU.
    let mut wf = vec![0f32; rows * width];
    dequantize_row(GgmlType::F16, &wb, &mut wf);
    let s = ops::rms_scale(&x, eps);
    let mix: Vec<f32> = wf
        .chunks_exact(width)
        .map(|r| {
            let v: f64 = r.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            v as f32 * s
        })
        .collect();
    let dims = hc::HcDims {
        n,
        d,
        rms_eps: eps,
        hc_eps,
        sinkhorn_iters: iters,
    };
    let params = HcParams {
        scale: [scale3[0], scale3[1], scale3[2]],
        base: base.clone(),
    };
    let (mut ycpu, mut split) = (Vec::new(), hc::HcSplit::new());
    if head {
        hc::head_mix(&dims, &base, scale3[0], &x, &mix, &mut ycpu);
    } else {
        hc::pre(&dims, &params, &x, &mix, &mut ycpu, &mut split);
    }
    ops::rms_norm(&mut ycpu, Some(&norm), eps);
    // GPU.
    let nb = width / 512;
    let xd = be.upload_f32(&x)?;
    let part = be.alloc_f32(nb * rows)?;
    let ss = be.stream().alloc_zeros::<f64>(nb)?;
    let (sc, bs, nm) = (
        be.upload_f32(&scale3)?,
        be.upload_f32(&base)?,
        be.upload_f32(&norm)?,
    );
    let mut y = poisoned(be, d)?;
    let mut post = poisoned(be, n)?;
    let mut comb = poisoned(be, n * n)?;
    let mut q0 = be.alloc_f32(d / 4)?;
    let mut d0 = be.alloc_f32(d / 32)?;
    let mut qk = be.alloc_f32(d / 4)?;
    let mut dk = be.alloc_f32(d / 256)?;
    let st = be.stream();
    let wp = be.weight_ptr(&w);
    let (fm, fp) = (be.function("k_hc_mix_part")?, be.function("k_hc_pre1")?);
    let mut ptrs: Vec<u64> = [
        &xd, &part, &sc, &bs, &y, &post, &comb, &nm, &q0, &d0, &qk, &dk,
    ]
    .iter()
    .map(|b| b.device_ptr(st).0)
    .collect();
    if head {
        // No Q8_K codes in the head's form.
        ptrs[10] = 0;
        ptrs[11] = 0;
    }
    let hd = i32::from(head);
    let ssp = ss.device_ptr(st).0;
    let (wty, ri, wi, nbi, ni, di, it) = (
        1i32,
        rows as i32,
        width as i32,
        nb as i32,
        n as i32,
        d as i32,
        iters as i32,
    );
    let cfg = |g: u32, b: u32| LaunchConfig {
        grid_dim: (g, 1, 1),
        block_dim: (b, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = st.launch_builder(&fm);
    b.arg(&ptrs[0])
        .arg(&wp)
        .arg(&wty)
        .arg(&ri)
        .arg(&wi)
        .arg(&ptrs[1])
        .arg(&ssp);
    // SAFETY: argument list matches k_hc_mix_part; buffers sized above.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (nb as u32, rows.div_ceil(8) as u32, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        })
    }?;
    // k_hc_pre1 over the partials; `clog` 0: with its own Sinkhorn.
    let pre1h = |clog: u64, hoist: i32, lean: i32| -> Result<()> {
        let mut b = st.launch_builder(&fp);
        b.arg(&ptrs[0])
            .arg(&ptrs[1])
            .arg(&ssp)
            .arg(&nbi)
            .arg(&ni)
            .arg(&di);
        b.arg(&eps).arg(&hc_eps).arg(&it);
        for p in &ptrs[2..12] {
            b.arg(p);
        }
        b.arg(&clog).arg(&hoist).arg(&lean).arg(&hd);
        // SAFETY: argument list matches k_hc_pre1; buffers sized above, clog n·n floats.
        unsafe { b.launch(cfg(1, super::session::HC_PRE1_THREADS)) }?;
        Ok(())
    };
    let pre1 = |clog: u64| pre1h(clog, 1, 1);
    // The partials' reduction as a loop (hoist 0) and with both rows a warp loaded at once;
    // P_j and the norm's total published through shared memory (lean 0) and formed by each
    // warp: every output the same bits.
    pre1h(0, 0, 0)?;
    let loop_out = [be.download(&y)?, be.download(&post)?, be.download(&comb)?];
    let loop_codes = [
        be.download(&q0)?,
        be.download(&d0)?,
        be.download(&qk)?,
        be.download(&dk)?,
    ];
    // Every output poisoned again, so one the second form does not write cannot match.
    for b in [
        &mut y, &mut post, &mut comb, &mut q0, &mut d0, &mut qk, &mut dk,
    ] {
        let nan = vec![f32::NAN; b.len()];
        st.memcpy_htod(&nan, b)?;
    }
    pre1(0)?;
    let gy = be.download(&y)?;
    let gcomb = be.download(&comb)?;
    // The head's form writes no post, combination or Q8_K codes.
    let mut hoist_same = same_finite_bits(&loop_out[0], &gy)
        && (head
            || same_finite_bits(&loop_out[1], &be.download(&post)?)
                && same_finite_bits(&loop_out[2], &gcomb));
    let written = if head { 2 } else { 4 };
    for (b, c) in [&q0, &d0, &qk, &dk]
        .into_iter()
        .zip(&loop_codes)
        .take(written)
    {
        hoist_same &= same_bits(c, &be.download(b)?);
    }
    out.push(same_row(
        "hc_pre1_hoist",
        GgmlType::F32,
        &shape,
        hoist_same,
        "partials of both rows a warp loaded at once, P_j and the norm's total formed in each \
         warp vs the loop and shared memory: y, post, comb and codes the same bits",
    ));
    // The control product is a 16384-term f32 sum on the GPU (f64 here): ~1e-7 of its L1
    // mass, ~1e-5 of the (cancelling) sum itself, which exp/sigmoid pass on.
    let note = if head {
        "vs CPU hc::head_mix + rms_norm (mix in f64); max_err = max|d| / max|cpu|"
    } else {
        "vs CPU hc::pre + rms_norm (mix in f64); max_err = max|d| / max|cpu|"
    };
    let tol = 1e-4;
    out.push(rel_row("hc_pre1_y", &shape, &gy, &ycpu, tol, note));
    let m0 = code_mismatches(
        ActQuant::Q8_0,
        &gy,
        &download_codes(be, &q0, d)?,
        &be.download(&d0)?,
    );
    out.push(exact_row("hc_pre1_q8_0_codes", GgmlType::Q8_0, &shape, m0));
    if head {
        return Ok(());
    }
    // The same with the Sinkhorn left to k_sinkhorn1 (production decode's fork): y and the
    // combination bit for bit.
    let clog = be.alloc_f32(n * n)?;
    let comb2 = poisoned(be, n * n)?;
    pre1(clog.device_ptr(st).0)?;
    let fs = be.function("k_sinkhorn1")?;
    let mut b = st.launch_builder(&fs);
    b.arg(&clog).arg(&ni).arg(&it).arg(&hc_eps).arg(&comb2);
    // SAFETY: argument list matches k_sinkhorn1; clog and comb2 hold n·n floats.
    unsafe { b.launch(cfg(1, 32)) }?;
    let split_same = same_bits(&gy, &be.download(&y)?) && same_bits(&gcomb, &be.download(&comb2)?);
    out.push(same_row(
        "hc_pre1_sinkhorn1",
        GgmlType::F32,
        &shape,
        split_same,
        "y and the combination with the Sinkhorn in k_sinkhorn1: the same bits",
    ));
    out.push(rel_row(
        "hc_pre1_post",
        &shape,
        &be.download(&post)?,
        &split.post,
        tol,
        note,
    ));
    out.push(rel_row(
        "hc_pre1_comb",
        &shape,
        &be.download(&comb)?,
        &split.comb,
        tol,
        note,
    ));
    let mk = code_mismatches(
        ActQuant::Q8K,
        &gy,
        &download_codes(be, &qk, d)?,
        &be.download(&dk)?,
    );
    out.push(exact_row(
        "hc_pre1_q8_k_codes",
        GgmlType::IQ2_XXS,
        &shape,
        mk,
    ));
    Ok(())
}

/// `k_rms_norm_q8` against `ops::rms_norm`; its codes bit for bit against the CPU Q8_0
/// activation quantizer applied to the GPU's output.
fn check_rms_norm_q8(
    be: &CudaBackend,
    rng: &mut Rng,
    width: usize,
    out: &mut Vec<CheckRow>,
) -> Result<()> {
    use crate::model::ops;
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let eps = 1e-6f32;
    let x = random_activations(rng, width);
    let w: Vec<f32> = (0..width)
        .map(|_| (1.0 + 0.2 * rng.normal()) as f32)
        .collect();
    let mut cpu = x.clone();
    ops::rms_norm(&mut cpu, Some(&w), eps);
    let wd = be.upload_f32(&w)?;
    let st = be.stream();
    let f = be.function("k_rms_norm_q8")?;
    let wi = width as i32;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: ((width / 8).min(512) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // The kernel in its loop form (one = 0) or with the row in registers (one = 1, the
    // decode path's when the row fits the block): the normalized row and its codes.
    let run = |one: i32| -> Result<[Vec<f32>; 3]> {
        let xd = be.upload_f32(&x)?;
        let (q0, d0) = (poisoned(be, width / 4)?, poisoned(be, width / 32)?);
        let (xp, wp, qp, dp) = (
            xd.device_ptr(st).0,
            wd.device_ptr(st).0,
            q0.device_ptr(st).0,
            d0.device_ptr(st).0,
        );
        let mut b = st.launch_builder(&f);
        b.arg(&xp)
            .arg(&wp)
            .arg(&wi)
            .arg(&eps)
            .arg(&qp)
            .arg(&dp)
            .arg(&one);
        // SAFETY: argument list matches k_rms_norm_q8; buffers sized above.
        unsafe { b.launch(cfg) }?;
        Ok([be.download(&xd)?, be.download(&q0)?, be.download(&d0)?])
    };
    let looped = run(0)?;
    let [g, q0, d0] = run(1)?;
    let shape = format!("{width}");
    let same = same_finite_bits(&looped[0], &g)
        && same_bits(&looped[1], &q0)
        && same_finite_bits(&looped[2], &d0);
    out.push(same_row(
        "rms_norm_q8_one",
        GgmlType::F32,
        &shape,
        same,
        "row in registers, weights with it vs the loop form: row and codes the same bits",
    ));
    out.push(rel_row(
        "rms_norm_q8",
        &shape,
        &g,
        &cpu,
        1e-6,
        "vs CPU ops::rms_norm; max_err = max|d| / max|cpu|",
    ));
    let m = code_mismatches(ActQuant::Q8_0, &g, &code_bytes(&q0, width), &d0);
    out.push(exact_row("rms_norm_q8_codes", GgmlType::Q8_0, &shape, m));
    Ok(())
}

fn check_type(
    be: &CudaBackend,
    rng: &mut Rng,
    ty: GgmlType,
    n_rows: usize,
    n_cols: usize,
    quick: bool,
    out: &mut Vec<CheckRow>,
) -> Result<()> {
    let shape = format!("{n_rows}x{n_cols}");
    let wb = random_weight(rng, ty, n_rows, n_cols);
    let mut w = be.upload_weight(ty, &wb, n_rows, n_cols, 1, &mut |_, _| {})?;

    // Dequantization, bit for bit (f32) and as rounded f16.
    let rb = n_cols / ty.block_elems() * ty.block_bytes();
    let mut cpu = vec![0f32; n_rows * n_cols];
    for (o, r) in cpu.chunks_exact_mut(n_cols).enumerate() {
        dequantize_row(ty, &wb[o * rb..(o + 1) * rb], r);
    }
    let mut d32 = poisoned(be, n_rows * n_cols)?;
    be.dequantize_f32(&w, 0, &mut d32.slice_mut(..))?;
    let g32 = be.download(&d32)?;
    let mism32 = bits_differ(&cpu, &g32);
    out.push(exact_row("dequant_f32", ty, &shape, mism32));
    let mut d16 = be.stream().alloc_zeros::<u16>(n_rows * n_cols)?;
    be.dequantize_f16(&w, 0, &mut d16.slice_mut(..))?;
    let g16 = be.download(&d16)?;
    let mism16 = cpu
        .iter()
        .zip(&g16)
        .filter(|(a, &b)| f16::from_f32(**a).to_bits() != b)
        .count();
    out.push(exact_row("dequant_f16", ty, &shape, mism16));

    // Matvec against the f64 reference, plus the CPU engine's own exact matvec for scale.
    let x = random_activations(rng, n_cols);
    let refs = reference(ty, &wb, n_rows, n_cols, &x);
    let xd = be.upload_f32(&x)?;
    let run_mv = |be: &CudaBackend| -> Result<Vec<f32>> {
        let mut y = poisoned(be, n_rows)?;
        be.matvec(&w, 0, &xd.slice(..), &mut y.slice_mut(..))?;
        be.download(&y)
    };
    let y1 = run_mv(be)?;
    let y2 = run_mv(be)?;
    let mut row = compare("matvec", ty, shape.clone(), &y1, &refs, TOL_F32);
    let mut ycpu = vec![0f32; n_rows];
    cpu_matvec(ty, &wb, n_rows, n_cols, &x, &mut ycpu, true);
    let dcpu = y1
        .iter()
        .zip(&ycpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    row.note = format!("max|gpu-cpu_exact|={dcpu:.2e}");
    out.push(row);
    out.push(det_row("matvec", ty, &shape, same_bits(&y1, &y2)));

    // Production mode: int8 activations quantized on the GPU (codes and scales bit for bit
    // against the CPU quantizers) and the dp4a matvec against the CPU's quantized matvec.
    if let Some(kind) = ActQuant::of(ty) {
        let st = be.stream();
        let qb = be.alloc_f32(n_cols.div_ceil(4))?;
        let db = be.alloc_f32(n_cols / kind.block())?;
        let (xp, _g0) = xd.device_ptr(st);
        let (qp, _g1) = qb.device_ptr(st);
        let (dp, _g2) = db.device_ptr(st);
        // SAFETY: x holds n_cols floats, qb n_cols bytes, db n_cols/block scales.
        unsafe { be.quant_act_raw(kind, xp, n_cols, qp, dp)? };
        let gq: Vec<u8> = be
            .download(&qb)?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .take(n_cols)
            .collect();
        let gd = be.download(&db)?;
        let (cq, cd): (Vec<u8>, Vec<f32>) = match kind {
            ActQuant::Q8_0 => {
                let v = quantize_act_q8_0(&x);
                (
                    v.iter().flat_map(|b| b.qs.map(|q| q as u8)).collect(),
                    v.iter().map(|b| b.d).collect(),
                )
            }
            ActQuant::Q8K => {
                let v = quantize_act_q8_k(&x);
                (
                    v.iter().flat_map(|b| b.qs.map(|q| q as u8)).collect(),
                    v.iter().map(|b| b.d).collect(),
                )
            }
        };
        let mism = cq.iter().zip(&gq).filter(|(a, b)| a != b).count() + bits_differ(&cd, &gd);
        out.push(exact_row("quant_act", ty, &shape, mism));
        let y = poisoned(be, n_rows)?;
        let (yp, _g3) = y.device_ptr(st);
        // SAFETY: as above; y holds n_rows floats.
        unsafe { be.mv8_raw(&w, 0, 1, qp, dp, 0, yp)? };
        let g8 = be.download(&y)?;
        let mut yq = vec![0f32; n_rows];
        cpu_matvec(ty, &wb, n_rows, n_cols, &x, &mut yq, false);
        let (mut m, mut r) = (0f32, 0f32);
        for (a, b) in g8.iter().zip(&yq) {
            m = m.max(if a.is_finite() {
                (a - b).abs()
            } else {
                f32::INFINITY
            });
            r = r.max(b.abs());
        }
        let rel = m / r.max(1e-30);
        out.push(CheckRow {
            kernel: "matvec_int8".into(),
            ty,
            shape: shape.clone(),
            max_abs: m as f64,
            max_err: rel as f64,
            rel_l2: 0.0,
            tol: 1e-5,
            pass: rel <= 1e-5,
            note: "vs CPU quantized matvec; max_err = max|d| / max|cpu|".into(),
        });
    }

    // Prefill: CUDA-core tiles and the f16 GEMM path. n_tok not a multiple of the tile.
    let n_tok = if quick { 11 } else { 37 };
    let xs: Vec<f32> = random_activations(rng, n_tok * n_cols);
    let xsd = be.upload_f32(&xs)?;
    let mut refs_t = Vec::with_capacity(n_tok * n_rows);
    for t in 0..n_tok {
        refs_t.extend(reference(
            ty,
            &wb,
            n_rows,
            n_cols,
            &xs[t * n_cols..(t + 1) * n_cols],
        ));
    }
    let tshape = format!("{shape}x{n_tok}tok");
    let mut results = Vec::new();
    for rep in 0..2 {
        let mut ys = poisoned(be, n_tok * n_rows)?;
        be.matmul(&w, 0, &xsd.slice(..), n_tok, &mut ys.slice_mut(..))?;
        let ys = be.download(&ys)?;
        if rep == 0 {
            out.push(compare("matmul", ty, tshape.clone(), &ys, &refs_t, TOL_F32));
        }
        results.push(ys);
    }
    out.push(det_row(
        "matmul",
        ty,
        &tshape,
        same_bits(&results[0], &results[1]),
    ));
    let mut scratch = GemmScratch::default();
    let mut gemm = |w: &GpuWeight| -> Result<Vec<f32>> {
        let mut ys = poisoned(be, n_tok * n_rows)?;
        be.matmul_gemm(
            w,
            0,
            &xsd.slice(..),
            n_tok,
            &mut ys.slice_mut(..),
            &mut scratch,
        )?;
        be.download(&ys)
    };
    results.clear();
    for rep in 0..2 {
        let ys = gemm(&w)?;
        if rep == 0 {
            out.push(compare(
                "gemm_f16",
                ty,
                tshape.clone(),
                &ys,
                &refs_t,
                TOL_F16_GEMM,
            ));
        }
        results.push(ys);
    }
    out.push(det_row(
        "gemm_f16",
        ty,
        &tshape,
        same_bits(&results[0], &results[1]),
    ));
    // With the f16 copy made at load (GpuModel, quantized dense weights): the same products
    // without the per-call dequantization, bit for bit.
    if !matches!(ty, GgmlType::F16 | GgmlType::F32) {
        be.attach_f16(&mut w)?;
        let ys = gemm(&w)?;
        let mut row = exact_row(
            "gemm_f16_copy",
            ty,
            &tshape,
            usize::from(!same_bits(&results[0], &ys)),
        );
        row.note =
            "weights from the f16 copy (attach_f16): the same bits as dequantizing per call".into();
        out.push(row);
    }
    // The production prefill's f32 cuBLAS path (router product): exact decode + SGEMM.
    if matches!(ty, GgmlType::F16 | GgmlType::F32 | GgmlType::Q8_0) {
        let st = be.stream();
        let w32 = be.alloc_f32(n_rows * n_cols)?;
        results.clear();
        for _ in 0..2 {
            let ys = poisoned(be, n_tok * n_rows)?;
            {
                let (px, _a) = xsd.device_ptr(st);
                let (py, _b) = ys.device_ptr(st);
                let (pw, _c) = w32.device_ptr(st);
                // SAFETY: xs n_tok × n_cols, ys n_tok × n_rows, w32 n_rows × n_cols floats.
                unsafe { super::prefill::dense_sgemm(be, &w, px, n_tok, py, pw)? };
            }
            results.push(be.download(&ys)?);
        }
        out.push(compare(
            "sgemm_f32",
            ty,
            tshape.clone(),
            &results[0],
            &refs_t,
            TOL_F32,
        ));
        out.push(det_row(
            "sgemm_f32",
            ty,
            &tshape,
            same_bits(&results[0], &results[1]),
        ));
    }
    // The router product on tensor cores (dense_split3: three f16 planes of x against the
    // exact f16 weight), its three parts added in order as k_route adds them: the f32
    // product's accuracy against the f64 reference.
    let x_bound = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    if super::prefill::split3_fits(be, &w, x_bound) {
        let st = be.stream();
        let kf = super::prefill::PfKernels::load(be)?;
        let x3 = st.alloc_zeros::<u16>(3 * n_tok * n_cols)?;
        results.clear();
        for _ in 0..2 {
            let ys = poisoned(be, 3 * n_tok * n_rows)?;
            {
                let (px, _a) = xsd.device_ptr(st);
                let (py, _b) = ys.device_ptr(st);
                let (p3, _c) = x3.device_ptr(st);
                // SAFETY: xs n_tok × n_cols, x3 3·n_tok × n_cols halves, ys 3 · n_tok ×
                // n_rows floats; split3_fits.
                unsafe {
                    super::prefill::dense_split3(be, &kf, &w, px, x_bound, n_tok, p3, false, py)?
                };
            }
            let parts = be.download(&ys)?;
            let plane = n_tok * n_rows;
            results.push(
                (0..plane)
                    .map(|i| (parts[i] + parts[plane + i]) + parts[2 * plane + i])
                    .collect(),
            );
        }
        out.push(compare(
            "split3_f16_f32",
            ty,
            tshape.clone(),
            &results[0],
            &refs_t,
            TOL_F32,
        ));
        out.push(det_row(
            "split3_f16_f32",
            ty,
            &tshape,
            same_bits(&results[0], &results[1]),
        ));
    }
    Ok(())
}

fn check_moe(be: &CudaBackend, rng: &mut Rng, ty: GgmlType, out: &mut Vec<CheckRow>) -> Result<()> {
    let (n_exp, n_rows, n_cols) = (8usize, 96usize, 512usize);
    let wb = random_weight(rng, ty, n_exp * n_rows, n_cols);
    let w = be.upload_weight(ty, &wb, n_rows, n_cols, n_exp, &mut |_, _| {})?;
    // Repeated ids on purpose: the router never repeats, but the kernel must not care.
    let ids = [5i32, 1, 7, 1, 0, 3];
    let idsd = be.upload_i32(&ids)?;
    let mat = n_rows * (n_cols / ty.block_elems() * ty.block_bytes());
    let shape = format!("{n_exp}exp,{}sel,{n_rows}x{n_cols}", ids.len());
    for (kernel, stride) in [("moe_shared_x", 0usize), ("moe_per_x", n_cols)] {
        let xn = (ids.len() - 1) * stride + n_cols;
        let x = random_activations(rng, xn);
        let xd = be.upload_f32(&x)?;
        let mut refs = Vec::new();
        for (k, &e) in ids.iter().enumerate() {
            let e = e as usize;
            refs.extend(reference(
                ty,
                &wb[e * mat..(e + 1) * mat],
                n_rows,
                n_cols,
                &x[k * stride..k * stride + n_cols],
            ));
        }
        let mut ys = Vec::new();
        for _ in 0..2 {
            let mut y = poisoned(be, ids.len() * n_rows)?;
            be.moe_matvec(
                &w,
                &idsd.slice(..),
                &xd.slice(..),
                stride,
                &mut y.slice_mut(..),
            )?;
            ys.push(be.download(&y)?);
        }
        out.push(compare(kernel, ty, shape.clone(), &ys[0], &refs, TOL_F32));
        out.push(det_row(kernel, ty, &shape, same_bits(&ys[0], &ys[1])));
    }
    Ok(())
}

/// pf_mxw against pf_mxs (the same f16 products, summed in another order): max difference
/// over the L1 mass Σ|w·x| of the output.
const TOL_MXW_VS_MXS: f64 = 1e-5;

/// pf_mxq_q2_k against the CPU's Q2_K × Q8_K dot on the same gate/up outputs: max difference
/// over the L1 mass Σ|w·x| (x the dequantized codes). The min term's operands are rounded to
/// f16 (relative 2^-12 each; the term itself can be a large share of the mass).
const TOL_MXQ_VS_Q8K: f64 = 5e-4;

/// The CPU's routed-expert down product as its quantized path computes it, for the sorted rows
/// of a grouped run (`perm`: sorted row → slot) from the GPU's gate|up outputs `gu` (sorted
/// rows × 2F): SwiGLU × weight in pf_swiglu_q8's f32 expressions, Q8_K codes, `dot_q8_k`;
/// with each output's L1 mass.
fn mxq_reference(
    db: &[u8],
    ids: &[i32],
    wts: &[f32],
    perm: &[i32],
    gu: &[f32],
    (d, f): (usize, usize),
    clamp: f32,
) -> Vec<(f64, f64)> {
    use crate::quant::{dot_q8_k, quantize_act_q8_k};
    let rb = f / 256 * GgmlType::Q2_K.block_bytes();
    let mut deq: std::collections::HashMap<usize, Vec<f32>> = Default::default();
    let mut refs = Vec::with_capacity(perm.len() * d);
    for (r, &s) in perm.iter().enumerate() {
        let (e, w) = (ids[s as usize] as usize, wts[s as usize]);
        let row = &gu[r * 2 * f..(r + 1) * 2 * f];
        let h: Vec<f32> = (0..f)
            .map(|i| {
                let gv = row[i].min(clamp);
                let sil = gv * (1.0 / (1.0 + (-gv).exp()));
                sil * row[f + i].clamp(-clamp, clamp) * w
            })
            .collect();
        let xq = quantize_act_q8_k(&h);
        let xv: Vec<f64> = xq
            .iter()
            .flat_map(|b| b.qs.iter().map(move |&q| b.d as f64 * q as f64))
            .collect();
        let wf = deq.entry(e).or_insert_with(|| {
            let mut v = vec![0f32; d * f];
            for (m, o) in v.chunks_exact_mut(f).enumerate() {
                let at = (e * d + m) * rb;
                dequantize_row(GgmlType::Q2_K, &db[at..at + rb], o);
            }
            v
        });
        for m in 0..d {
            let at = (e * d + m) * rb;
            let dot = dot_q8_k(GgmlType::Q2_K, &db[at..at + rb], &xq) as f64;
            let l1: f64 = wf[m * f..(m + 1) * f]
                .iter()
                .zip(&xv)
                .map(|(&a, &b)| (a as f64 * b).abs())
                .sum();
            refs.push((dot, l1));
        }
    }
    refs
}

/// The production prefill's grouped MoE (prefill.rs) against a CPU scalar reference: the
/// expert grouping bit for bit (stable counting sort), the routed-expert outputs within
/// [`TOL_MOE_GROUPED`], and two runs bit-identical.
fn check_moe_grouped(
    be: &CudaBackend,
    rng: &mut Rng,
    tg: GgmlType,
    td: GgmlType,
    (n_exp, d, f, n_tok, k): (usize, usize, usize, usize, usize),
    out: &mut Vec<CheckRow>,
) -> Result<()> {
    use super::prefill::{moe_grouped, MoeScratch, PfKernels};
    let slots = n_tok * k;
    let gb = random_weight(rng, tg, n_exp * f, d);
    let ub = random_weight(rng, tg, n_exp * f, d);
    let db = random_weight(rng, td, n_exp * d, f);
    let gw = be.upload_weight(tg, &gb, f, d, n_exp, &mut |_, _| {})?;
    let uw = be.upload_weight(tg, &ub, f, d, n_exp, &mut |_, _| {})?;
    let dw = be.upload_weight(td, &db, d, f, n_exp, &mut |_, _| {})?;
    // Expert n_exp-1 never chosen (an unused expert); the rest skewed towards low ids.
    let ids: Vec<i32> = (0..slots)
        .map(|_| {
            let u = rng.uniform();
            ((u * u) * (n_exp - 1) as f64) as i32
        })
        .collect();
    let wts: Vec<f32> = (0..slots).map(|_| 0.1 + rng.uniform() as f32).collect();
    let y = random_activations(rng, n_tok * d);
    let clamp = 10.0f32;
    let (idsd, wtsd, yd) = (
        be.upload_i32(&ids)?,
        be.upload_f32(&wts)?,
        be.upload_f32(&y)?,
    );
    let mut kf = PfKernels::load(be)?;
    let sc = MoeScratch::new(be, slots, n_exp, d, f, true)?;
    let st = be.stream();
    // f16(y) as its producer would write it (the pf_gather16 path), and in pf_mxw's column
    // order (k_hc_pre_pf's y16p: the gate|up kernels read the tokens' rows there).
    let y16h: Vec<u16> = y.iter().map(|v| f16::from_f32(*v).to_bits()).collect();
    let y16d = st.clone_htod(&y16h)?;
    let mut y16ph = vec![0u16; y16h.len()];
    for (row, prow) in y16h.chunks_exact(d).zip(y16ph.chunks_exact_mut(d)) {
        for (c, &v) in row.iter().enumerate() {
            prow[px_pos(c)] = v;
        }
    }
    let y16pd = st.clone_htod(&y16ph)?;
    // Modes: fused at each kernel level (2: pf_mxs where the shapes allow it, else pf_mx; 1:
    // pf_mx; 0: pf_mm; levels without a kernel of their own for these types are skipped), and
    // the per-expert cuBLAS path (small shapes only).
    // Level 4: level 3 with the Q2_K down product on int8 tensor cores (pf_mxq_q2_k, where
    // it runs: Hopper, F a multiple of 1024); level 3 then runs with it off.
    // Level 5: level 4 with the IQ2_XXS gate|up over 128-token tiles (pf_mxw4_iq2_xxs).
    let mut modes: Vec<(bool, u8)> = vec![
        (true, 4),
        (true, 5),
        (true, 3),
        (true, 2),
        (true, 1),
        (true, 0),
    ];
    if d <= 1024 {
        modes.push((false, 0));
    }
    let mx_types = |t: GgmlType| matches!(t, GgmlType::IQ2_XXS | GgmlType::Q2_K);
    let has_mx = mx_types(tg) || mx_types(td);
    // pf_mxs needs rows of a multiple of 16 bytes (IQ2_XXS: 2048 columns, Q2_K: 1024).
    let row16 = |t: GgmlType, cols: usize| (cols / 256 * t.block_bytes()).is_multiple_of(16);
    let has_mxs = (mx_types(tg) && row16(tg, d)) || (mx_types(td) && row16(td, f));
    let mut refs: Vec<(f64, f64)> = Vec::new();
    // pf_mxs and pf_mx run the same decoders and MMAs in the same order: equal bits.
    let mut mxs_out: Option<Vec<f32>> = None;
    // pf_mxw (wgmma, Hopper only) takes the same f16 products, summed in the tensor core's
    // order: equal to pf_mxs to f32 rounding.
    let mut mxw_out: Option<Vec<f32>> = None;
    // pf_mxw4 takes pf_mxw's f16 products over longer tiles: its gate|up rows against
    // level 4's (pf_mxw's).
    let mut mxw_gu: Option<Vec<f32>> = None;
    for &(fused, level) in &modes {
        let kname = match (fused, level) {
            (true, 5) if has_mxs && kf.has_mxw4() && tg == GgmlType::IQ2_XXS => "moe_grouped_mxw4",
            (true, 4) if has_mxs && kf.has_mxq() && td == GgmlType::Q2_K && f % 1024 == 0 => {
                "moe_grouped_mxq"
            }
            (true, 3) if has_mxs => "moe_grouped_mxw",
            (true, 2) if has_mxs => "moe_grouped_mxs",
            (true, 1) if has_mx => "moe_grouped_mx",
            (true, 0) => "moe_grouped_mma",
            (false, _) => "moe_grouped_cublas",
            _ => continue,
        };
        let was = be.set_pf_mx(level.min(3));
        kf.q8 = Some(level >= 4);
        kf.w4 = Some(level == 5);
        let q8_taken = level >= 4 && be.pf_mm_permuted(&dw, None);
        let w4_taken = level == 5 && be.pf_mm_permuted(&gw, Some(&uw));
        if (level == 4 && !q8_taken)
            || (level == 5 && !w4_taken)
            || (level == 3 && !be.pf_mm_permuted(&gw, Some(&uw)) && !be.pf_mm_permuted(&dw, None))
        {
            be.set_pf_mx(was);
            continue;
        }
        let mut runs = Vec::new();
        for run in 0..4 {
            let dn = poisoned(be, slots * d)?;
            {
                let (pi, _a) = idsd.device_ptr(st);
                let (pw, _b) = wtsd.device_ptr(st);
                let (py, _c) = yd.device_ptr(st);
                let (pd, _d) = dn.device_ptr(st);
                let py16 = if run >= 2 { y16d.device_ptr(st).0 } else { 0 };
                let py16p = if run == 3 { y16pd.device_ptr(st).0 } else { 0 };
                // SAFETY: buffers sized for `slots` pairs of n_tok tokens; ids < n_exp.
                unsafe {
                    moe_grouped(
                        be, &kf, &sc, &gw, &uw, &dw, pi, pw, py, py16, py16p, n_tok, k, clamp, pd,
                        fused,
                    )?
                };
            }
            runs.push(be.download(&dn)?);
        }
        be.set_pf_mx(was);
        // Grouping: stable counting sort on the CPU, tiles of 64 rows per expert.
        let mism = group_mismatches(&sc.grouping(be)?, &cpu_group(&ids, n_exp));
        let shape = format!("{n_exp}exp,{n_tok}tok x{k},{f}x{d}");
        out.push(CheckRow {
            note: format!(
                "{mism} of counts/used/tiles/perm/inv differ from a CPU stable counting sort"
            ),
            ..exact_row("moe_group", tg, &shape, mism)
        });
        if refs.is_empty() {
            refs = moe_reference(
                tg,
                td,
                &gb,
                &ub,
                &db,
                &ids,
                &wts,
                &y,
                (n_exp, d, f, k),
                clamp,
            );
        }
        out.push(compare(
            kname,
            td,
            shape.clone(),
            &runs[0],
            &refs,
            TOL_MOE_GROUPED,
        ));
        out.push(det_row(kname, td, &shape, same_bits(&runs[0], &runs[1])));
        if level == 4 {
            // Against the CPU's own quantized product on the GPU's gate/up outputs: the
            // same codes, exact integer sums; what differs is the min term's two f16
            // roundings and the order of f32 sums.
            let (gu_h, dns_h) = sc.products(be)?;
            let perm = cpu_group(&ids, n_exp).perm;
            let q8ref = mxq_reference(&db, &ids, &wts, &perm, &gu_h, (d, f), clamp);
            out.push(compare(
                "moe_grouped_mxq_vs_q8k",
                td,
                shape.clone(),
                &dns_h[..slots * d],
                &q8ref,
                TOL_MXQ_VS_Q8K,
            ));
            mxw_gu = Some(gu_h);
        } else if level == 5 {
            if let Some(w) = &mxw_gu {
                let (gu_h, _) = sc.products(be)?;
                let n = slots * 2 * f;
                let (a, b) = (&gu_h[..n], &w[..n]);
                let differ = bits_differ(a, b);
                // Scale: the larger of |v| and the RMS of its token's 2F outputs (an output
                // near zero by cancellation has no relative precision of its own).
                let as_ref: Vec<(f64, f64)> = b
                    .chunks_exact(2 * f)
                    .flat_map(|r| {
                        let rms = (r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>()
                            / r.len() as f64)
                            .sqrt();
                        r.iter()
                            .map(move |&v| (v as f64, (v as f64).abs().max(rms)))
                    })
                    .collect();
                let mut row = compare(
                    "moe_grouped_mxw4_vs_mxw",
                    tg,
                    shape.clone(),
                    a,
                    &as_ref,
                    TOL_MXW_VS_MXS,
                );
                row.note = format!(
                    "{differ} of {n} gate|up outputs differ in bits; {}",
                    row.note
                );
                out.push(row);
            }
        } else if level == 3 {
            mxw_out = Some(runs[0].clone());
        } else if level == 2 && fused {
            if let Some(w) = &mxw_out {
                let as_ref: Vec<(f64, f64)> = runs[0]
                    .iter()
                    .zip(&refs)
                    .map(|(&m, &(_, l1))| (m as f64, l1))
                    .collect();
                out.push(compare(
                    "moe_grouped_mxw_vs_mxs",
                    td,
                    shape.clone(),
                    w,
                    &as_ref,
                    TOL_MXW_VS_MXS,
                ));
            }
            mxs_out = Some(runs[0].clone());
        } else if let (1, true, Some(m)) = (level, fused, &mxs_out) {
            let mism = bits_differ(m, &runs[0]);
            out.push(CheckRow {
                note: format!("{mism} outputs of pf_mxs differ in bits from pf_mx"),
                ..exact_row("moe_grouped_mxs_vs_mx", td, &shape, mism)
            });
        }
        let same16 = same_bits(&runs[0], &runs[2]);
        let mut row = exact_row(&format!("{kname}_y16"), td, &shape, usize::from(!same16));
        row.note = "inputs gathered from the f16 copy of y: bit-identical to rounding y".into();
        out.push(row);
        if fused && be.pf_mm_permuted(&gw, Some(&uw)) {
            let same = same_bits(&runs[0], &runs[3]);
            let mut row = exact_row(&format!("{kname}_y16p"), td, &shape, usize::from(!same));
            row.note = "gate|up reading the tokens' rows of the permuted f16 copy (no gather): \
                        bit-identical to rounding y"
                .into();
            out.push(row);
        }
    }
    Ok(())
}

/// Where pf_mxw wants column `c` of an activation row (prefill.cu `px_pos`).
fn px_pos(c: usize) -> usize {
    (c & !31) | (((c >> 2) & 1) << 4) | (((c >> 1) & 1) << 3) | (((c >> 3) & 3) << 1) | (c & 1)
}
/// The CPU's stable counting sort of `ids` by expert in pf_group's output form (meta =
/// counts, used experts then -1, the three tile counts; perm; inv; every expert's tiles of ≤ 64
/// rows, the tiles of ≤ 128 rows of the experts of more than 64, the others' single tiles),
/// each tile list exactly as long as its count.
fn cpu_group(ids: &[i32], n_exp: usize) -> Grouping {
    let slots = ids.len();
    let mut perm = Vec::with_capacity(slots);
    let mut meta = vec![0i32; 2 * n_exp + 3];
    let (mut tiles, mut tiles2, mut tiles1) = (Vec::new(), Vec::new(), Vec::new());
    let mut nu = 0;
    for e in 0..n_exp as i32 {
        let before = perm.len();
        perm.extend((0..slots as i32).filter(|&s| ids[s as usize] == e));
        let c = (perm.len() - before) as i32;
        meta[e as usize] = c;
        let cut = |list: &mut Vec<i32>, bn: i32| {
            for r in (0..c).step_by(bn as usize) {
                list.extend([e, before as i32 + r, (c - r).min(bn)]);
            }
        };
        cut(&mut tiles, 64);
        if c > 64 {
            cut(&mut tiles2, 128);
        } else {
            cut(&mut tiles1, 64);
        }
        if c > 0 {
            meta[n_exp + nu] = e;
            nu += 1;
        }
    }
    meta[n_exp + nu..2 * n_exp].fill(-1);
    meta[2 * n_exp] = (tiles.len() / 3) as i32;
    meta[2 * n_exp + 1] = (tiles2.len() / 3) as i32;
    meta[2 * n_exp + 2] = (tiles1.len() / 3) as i32;
    let mut inv = vec![0i32; slots];
    for (r, &s) in perm.iter().enumerate() {
        inv[s as usize] = r as i32;
    }
    Grouping {
        meta,
        perm,
        inv,
        tiles,
        tiles2,
        tiles1,
    }
}

/// Entries of the GPU grouping that differ from [`cpu_group`]'s (the GPU's buffers may be
/// longer: only the entries the CPU's hold are compared).
fn group_mismatches(got: &Grouping, want: &Grouping) -> usize {
    let diff = |a: &[i32], b: &[i32]| {
        a.iter().zip(b).filter(|(x, y)| x != y).count() + b.len().saturating_sub(a.len())
    };
    diff(&got.meta, &want.meta)
        + diff(&got.perm, &want.perm)
        + diff(&got.inv, &want.inv)
        + diff(&got.tiles, &want.tiles)
        + diff(&got.tiles2, &want.tiles2)
        + diff(&got.tiles1, &want.tiles1)
}

/// `pf_group_par` (the parallel grouping) at the flash shapes (256 experts, 2048 tokens × 6
/// slots, an uneven 1001 × 6 and 2800 × 6), ids skewed towards low experts with a never-used tail,
/// against the CPU stable counting sort: every count, used entry, tile, perm and inv equal.
fn check_pf_group(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    use super::prefill::{group, MoeScratch, PfKernels};
    let kf = PfKernels::load(be)?;
    let n_exp = 256usize;
    // 2048 × 6 slots: 384 a warp; 1001 and 2800 tokens: uneven and longer chunks.
    for n_tok in [2048usize, 1001, 2800] {
        let slots = n_tok * 6;
        let ids: Vec<i32> = (0..slots)
            .map(|_| {
                let u = rng.uniform();
                ((u * u) * (n_exp - 7) as f64) as i32
            })
            .collect();
        let sc = MoeScratch::new(be, slots, n_exp, 64, 64, false)?;
        let idsd = be.upload_i32(&ids)?;
        let st = be.stream();
        {
            let (pi, _g) = idsd.device_ptr(st);
            // SAFETY: ids holds `slots` ints < n_exp; the scratch holds `slots` pairs.
            unsafe { group(be, &kf, &sc, pi, slots, n_exp)? };
        }
        let got = sc.grouping(be)?;
        let mism = group_mismatches(&got, &cpu_group(&ids, n_exp));
        let shape = format!("{n_exp}exp,{slots}slots");
        out.push(CheckRow {
            note: format!("{mism} of counts/used/tiles/perm/inv differ from a CPU stable sort"),
            ..exact_row("pf_group_par", GgmlType::F32, &shape, mism)
        });
    }
    Ok(())
}

/// HC dimensions of the self-test's hc rows: n streams of d, eps 1e-6, 20 Sinkhorn rounds.
fn test_hc_dims(n: usize, d: usize) -> crate::model::hc::HcDims {
    crate::model::hc::HcDims {
        n,
        d,
        rms_eps: 1e-6,
        hc_eps: 1e-6,
        sinkhorn_iters: 20,
    }
}

/// Random inputs of the prefill hc_post kernels for t_n tokens (n streams of d, kx routed rows
/// a token): post / comb weights, the attention site's output `fsub`, the routed rows `dns`
/// (sorted order), the shared expert's rows `sh`, `inv` (a random permutation: the sorted row
/// of each slot) and the FFN site's output `fmoe` as k_moe_sum forms it (slot order, then sh).
struct PostInputs {
    post: Vec<f32>,
    comb: Vec<f32>,
    fsub: Vec<f32>,
    dns: Vec<f32>,
    sh: Vec<f32>,
    inv: Vec<i32>,
    fmoe: Vec<f32>,
}

impl PostInputs {
    fn random(rng: &mut Rng, t_n: usize, n: usize, d: usize, kx: usize) -> PostInputs {
        let post: Vec<f32> = (0..t_n * n).map(|_| rng.uniform() as f32 * 2.0).collect();
        let comb: Vec<f32> = (0..t_n * n * n).map(|_| rng.uniform() as f32).collect();
        let fsub = random_activations(rng, t_n * d);
        let slots = t_n * kx;
        let dns = random_activations(rng, slots * d);
        let sh = random_activations(rng, t_n * d);
        let mut inv: Vec<i32> = (0..slots as i32).collect();
        for i in (1..slots).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            inv.swap(i, j);
        }
        let mut fmoe = vec![0f32; t_n * d];
        for t in 0..t_n {
            for e in 0..d {
                let mut a = 0f32;
                for j in 0..kx {
                    a += dns[inv[t * kx + j] as usize * d + e];
                }
                fmoe[t * d + e] = a + sh[t * d + e];
            }
        }
        PostInputs {
            post,
            comb,
            fsub,
            dns,
            sh,
            inv,
            fmoe,
        }
    }
}

/// Production prefill's fused forms around hc (forward.cu) on several tokens at the flash
/// width: `k_hc_pre` at 256 threads (prefill) vs the CPU's hc::pre + rms_norm and bit for bit
/// vs its 1024-thread launch, its f16 copy y16 = f16(y); `k_rms_norm_h` = k_rms_norm + f16
/// copy; `k_hc_post4` and `k_hc_post_moe_pf` (sorted rows through a random inv, f16 copies of
/// x · HC_X16_SCALE) bit for bit
/// vs the CPU's moe sum + hc::post.
fn check_hc_prefill(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    use crate::model::{hc, ops, params::HcParams};
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let (n, d, t_n, kx) = (4usize, 4096usize, 5usize, 6usize);
    let (w, width) = ((2 + n) * n, n * d);
    let shape = format!("{t_n}tok,n{n}xd{d}");
    let (eps, hc_eps, iters) = (1e-6f32, 1e-6f32, 20usize);
    let st = be.stream();
    let cfg = |g: (u32, u32, u32), b: u32| LaunchConfig {
        grid_dim: g,
        block_dim: (b, 1, 1),
        shared_mem_bytes: 0,
    };
    let p32 = |b: &CudaSlice<f32>| b.device_ptr(st).0;
    let f16_mism = |h: &[u16], v: &[f32]| {
        h.iter()
            .zip(v)
            .filter(|(a, b)| **a != f16::from_f32(**b).to_bits())
            .count()
            + v.len().saturating_sub(h.len())
    };
    // hc_pre.
    let x = random_activations(rng, t_n * width);
    let mix_raw: Vec<f32> = (0..t_n * w).map(|_| (rng.normal() * 30.0) as f32).collect();
    let scale3: Vec<f32> = (0..3).map(|_| (0.5 + rng.uniform()) as f32).collect();
    let base: Vec<f32> = (0..w).map(|_| (rng.normal() * 0.5) as f32).collect();
    let norm: Vec<f32> = (0..d).map(|_| (1.0 + 0.2 * rng.normal()) as f32).collect();
    let mut mix = Vec::with_capacity(t_n * w);
    for t in 0..t_n {
        let s = ops::rms_scale(&x[t * width..(t + 1) * width], eps);
        mix.extend(mix_raw[t * w..(t + 1) * w].iter().map(|v| v * s));
    }
    let dims = hc::HcDims {
        n,
        d,
        rms_eps: eps,
        hc_eps,
        sinkhorn_iters: iters,
    };
    let params = HcParams {
        scale: [scale3[0], scale3[1], scale3[2]],
        base: base.clone(),
    };
    let (mut ycpu, mut split) = (Vec::new(), hc::HcSplit::new());
    hc::pre(&dims, &params, &x, &mix, &mut ycpu, &mut split);
    ops::rms_norm_rows(&mut ycpu, &norm, eps);
    let (xd, md, sd, bd, nd) = (
        be.upload_f32(&x)?,
        be.upload_f32(&mix_raw)?,
        be.upload_f32(&scale3)?,
        be.upload_f32(&base)?,
        be.upload_f32(&norm)?,
    );
    let fpre = be.function("k_hc_pre")?;
    let mut runs = Vec::new();
    for threads in [256u32, 1024] {
        let (y, post, comb) = (
            poisoned(be, t_n * d)?,
            poisoned(be, t_n * n)?,
            poisoned(be, t_n * n * n)?,
        );
        let y16 = st.alloc_zeros::<u16>(t_n * d)?;
        let y16p = if threads == 256 {
            y16.device_ptr(st).0
        } else {
            0u64
        };
        let (ni, di, it) = (n as i32, d as i32, iters as i32);
        let ptrs = [
            p32(&xd),
            p32(&md),
            p32(&sd),
            p32(&bd),
            p32(&y),
            p32(&post),
            p32(&comb),
            p32(&nd),
        ];
        let mut b = st.launch_builder(&fpre);
        b.arg(&ptrs[0])
            .arg(&ptrs[1])
            .arg(&ni)
            .arg(&di)
            .arg(&eps)
            .arg(&hc_eps)
            .arg(&it)
            .arg(&ptrs[2])
            .arg(&ptrs[3])
            .arg(&ptrs[4])
            .arg(&ptrs[5])
            .arg(&ptrs[6])
            .arg(&ptrs[7])
            .arg(&y16p);
        // SAFETY: argument list matches k_hc_pre; buffers sized above.
        unsafe { b.launch(cfg((t_n as u32, 1, 1), threads)) }?;
        runs.push((
            be.download(&y)?,
            be.download(&post)?,
            be.download(&comb)?,
            be.download(&y16)?,
        ));
    }
    let note = "vs CPU hc::pre + rms_norm; max_err = max|d| / max|cpu|";
    out.push(rel_row("hc_pre_y", &shape, &runs[0].0, &ycpu, 1e-4, note));
    out.push(rel_row(
        "hc_pre_post",
        &shape,
        &runs[0].1,
        &split.post,
        1e-4,
        note,
    ));
    out.push(rel_row(
        "hc_pre_comb",
        &shape,
        &runs[0].2,
        &split.comb,
        1e-4,
        note,
    ));
    let same = same_bits(&runs[0].0, &runs[1].0)
        && same_bits(&runs[0].1, &runs[1].1)
        && same_bits(&runs[0].2, &runs[1].2);
    let mut row = exact_row(
        "hc_pre_256_vs_1024",
        GgmlType::F32,
        &shape,
        usize::from(!same),
    );
    row.note = "y, post, comb of 256- and 1024-thread blocks bit-identical".into();
    out.push(row);
    // k_hc_pre_pf + k_hc_comb (production prefill) against k_hc_pre's outputs, bit for bit.
    {
        let (mut y, mut post, comb) = (
            poisoned(be, t_n * d)?,
            poisoned(be, t_n * n)?,
            poisoned(be, t_n * n * n)?,
        );
        let mut y16 = st.alloc_zeros::<u16>(t_n * d)?;
        let mut y16p = st.alloc_zeros::<u16>(t_n * d)?;
        let mut hs = poisoned(be, t_n)?;
        let (di, ni, it, ti) = (d as i32, n as i32, iters as i32, t_n as i32);
        let pp = [
            p32(&xd),
            p32(&md),
            p32(&sd),
            p32(&bd),
            p32(&y),
            y16.device_ptr(st).0,
            p32(&post),
            p32(&nd),
            p32(&hs),
            p32(&comb),
        ];
        let y16p_at = y16p.device_ptr(st).0;
        // k_hc_pre_pf (256 threads of 4 columns), or k_hc_pre_pf512 (512 threads of 2).
        let entries = [
            (be.function("k_hc_pre_pf")?, 4i32),
            (be.function("k_hc_pre_pf512")?, 2),
        ];
        // k_hc_pre_pf into y_at, with the router's planes (x3, scale, plane stride) or none,
        // and y's f32 form written when y32 is 1; `e` picks the entry.
        let pre_pf_e =
            |e: usize, y_at: u64, x3: u64, s3: f32, plane: i64, y32: i32| -> Result<()> {
                let (f1, cols) = (&entries[e].0, entries[e].1);
                let mut b = st.launch_builder(f1);
                b.arg(&pp[0])
                    .arg(&pp[1])
                    .arg(&di)
                    .arg(&cols)
                    .arg(&eps)
                    .arg(&hc_eps)
                    .arg(&pp[2])
                    .arg(&pp[3])
                    .arg(&y_at)
                    .arg(&pp[5])
                    .arg(&y16p_at)
                    .arg(&pp[6])
                    .arg(&pp[7])
                    .arg(&pp[8])
                    .arg(&x3)
                    .arg(&s3)
                    .arg(&plane)
                    .arg(&y32);
                // SAFETY: argument list matches k_hc_pre_pf / k_hc_pre_pf512; d / (4 · cols)
                // threads (256 or 512) own `cols` columns; x3 (when not 0) holds 3 · plane halves.
                unsafe { b.launch(cfg((t_n as u32, 1, 1), (d / (4 * cols as usize)) as u32)) }?;
                Ok(())
            };
        let pre_pf = |y_at: u64, x3: u64, s3: f32, plane: i64, y32: i32| -> Result<()> {
            pre_pf_e(0, y_at, x3, s3, plane, y32)
        };
        pre_pf(pp[4], 0, 0.0, 0, 1)?;
        // The same with the router's three f16 planes of y·s instead of y's f32 form: the
        // planes f32_split3_f16 makes of the f32 y just written, bit for bit, and no y.
        let (s3, plane) = (64f32, (t_n * d) as i64);
        let (x3, x3r) = (
            st.alloc_zeros::<u16>(3 * t_n * d)?,
            st.alloc_zeros::<u16>(3 * t_n * d)?,
        );
        let y_lean = poisoned(be, t_n * d)?;
        let (px3, px3r) = (x3.device_ptr(st).0, x3r.device_ptr(st).0);
        pre_pf(p32(&y_lean), px3, s3, plane, 0)?;
        let split = be.function("f32_split3_f16")?;
        let mut b = st.launch_builder(&split);
        b.arg(&pp[4]).arg(&px3r).arg(&plane).arg(&s3);
        // SAFETY: argument list matches f32_split3_f16; t_n · d (a multiple of 4) floats, 4 a
        // thread.
        unsafe { b.launch(cfg(((t_n * d / 4).div_ceil(256) as u32, 1, 1), 256)) }?;
        let (gx3, gx3r) = (be.download(&x3)?, be.download(&x3r)?);
        let planes_mism = gx3.iter().zip(&gx3r).filter(|(a, b)| a != b).count()
            + be.download(&y_lean)?.iter().filter(|v| !v.is_nan()).count();
        let mut row = exact_row("hc_pre_pf_planes", GgmlType::F16, &shape, planes_mism);
        row.note = format!(
            "{planes_mism} of the router's planes differ from f32_split3_f16's of y, or y written"
        );
        out.push(row);
        let f2 = be.function("k_hc_comb")?;
        let mut b = st.launch_builder(&f2);
        b.arg(&pp[1])
            .arg(&pp[8])
            .arg(&ni)
            .arg(&it)
            .arg(&hc_eps)
            .arg(&pp[2])
            .arg(&pp[3])
            .arg(&pp[9])
            .arg(&ti);
        // SAFETY: argument list matches k_hc_comb; a warp per token.
        unsafe { b.launch(cfg((t_n.div_ceil(8) as u32, 1, 1), 256)) }?;
        let (gy, gp, gc, gh) = (
            be.download(&y)?,
            be.download(&post)?,
            be.download(&comb)?,
            be.download(&y16)?,
        );
        out.push(rel_row("hc_pre_pf_y", &shape, &gy, &ycpu, 1e-4, note));
        let mism = usize::from(!same_bits(&gy, &runs[0].0))
            + usize::from(!same_bits(&gp, &runs[0].1))
            + usize::from(!same_bits(&gc, &runs[0].2))
            + usize::from(gh != runs[0].3);
        let mut row = exact_row("hc_pre_pf_vs_hc_pre", GgmlType::F32, &shape, mism);
        row.note = format!("{mism} of y, post, comb, y16 differ in bits from k_hc_pre's");
        out.push(row);
        // y16p: y16's rows with their columns where pf_mxw reads them.
        let gp16 = be.download(&y16p)?;
        let moved = gh
            .chunks_exact(d)
            .zip(gp16.chunks_exact(d))
            .map(|(a, b)| (0..d).filter(|&c| a[c] != b[px_pos(c)]).count())
            .sum::<usize>();
        let mut row = exact_row("hc_pre_pf_y16p", GgmlType::F16, &shape, moved);
        row.note = format!("{moved} of the permuted f16 copy differ from y16's (px_pos)");
        out.push(row);
        // The 512-thread entry (production's) against the 256-thread one: the f64 sums of
        // squares add in another order, which must not change their f32 results.
        let hs0 = be.download(&hs)?;
        for buf in [&mut y, &mut post, &mut hs] {
            let nan = vec![f32::NAN; buf.len()];
            be.write_f32(buf, &nan)?;
        }
        st.memset_zeros(&mut y16)?;
        st.memset_zeros(&mut y16p)?;
        pre_pf_e(1, pp[4], 0, 0.0, 0, 1)?;
        let x3e = st.alloc_zeros::<u16>(3 * t_n * d)?;
        pre_pf_e(1, p32(&y_lean), x3e.device_ptr(st).0, s3, plane, 0)?;
        let mism = bits_differ(&be.download(&y)?, &gy)
            + bits_differ(&be.download(&post)?, &gp)
            + bits_differ(&be.download(&hs)?, &hs0)
            + f16_differ(&be.download(&y16)?, &gh)
            + f16_differ(&be.download(&y16p)?, &gp16)
            + f16_differ(&be.download(&x3e)?, &gx3);
        let mut row = exact_row("hc_pre_pf512_vs_pf", GgmlType::F32, &shape, mism);
        row.note = format!(
            "{mism} of y, post, scale, y16, y16p and the planes differ in bits from the \
             256-thread blocks'"
        );
        out.push(row);
    }
    let m16 = f16_mism(&runs[0].3, &runs[0].0);
    let mut row = exact_row("hc_pre_y16", GgmlType::F16, &shape, m16);
    row.note = format!("{m16} f16 copies differ in bits from f16(y)");
    out.push(row);
    // rms_norm_h vs rms_norm.
    {
        let wdt = 1024usize;
        let v = random_activations(rng, t_n * wdt);
        let g: Vec<f32> = (0..wdt)
            .map(|_| (1.0 + 0.2 * rng.normal()) as f32)
            .collect();
        let (a, bb, gd) = (be.upload_f32(&v)?, be.upload_f32(&v)?, be.upload_f32(&g)?);
        let h = st.alloc_zeros::<u16>(t_n * wdt)?;
        let (pa, pb, pg, ph) = (p32(&a), p32(&bb), p32(&gd), h.device_ptr(st).0);
        let wi = wdt as i32;
        let f1 = be.function("k_rms_norm")?;
        let mut b = st.launch_builder(&f1);
        b.arg(&pa).arg(&pg).arg(&wi).arg(&eps);
        // SAFETY: argument list matches k_rms_norm; t_n rows of wdt.
        unsafe { b.launch(cfg((t_n as u32, 1, 1), 256)) }?;
        let f2 = be.function("k_rms_norm_h")?;
        let mut b = st.launch_builder(&f2);
        b.arg(&pb).arg(&pg).arg(&wi).arg(&eps).arg(&ph);
        // SAFETY: argument list matches k_rms_norm_h; t_n rows of wdt, h as many halves.
        unsafe { b.launch(cfg((t_n as u32, 1, 1), 256)) }?;
        let (ra, rb, rh) = (be.download(&a)?, be.download(&bb)?, be.download(&h)?);
        let mism = usize::from(!same_bits(&ra, &rb)) + f16_mism(&rh, &ra);
        let mut row = exact_row("rms_norm_h", GgmlType::F16, &format!("{t_n}x{wdt}"), mism);
        row.note = format!("{mism}: f32 rows vs k_rms_norm (0/1) + f16 copies vs f16(row)");
        out.push(row);
    }
    // hc_post4 and hc_post_moe_pf vs the CPU; their f16 copies are of x · HC_X16_SCALE.
    let scaled = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .map(|&a| a * super::session::HC_X16_SCALE)
            .collect()
    };
    let PostInputs {
        post,
        comb,
        fsub,
        dns,
        sh,
        inv,
        fmoe,
    } = PostInputs::random(rng, t_n, n, d, kx);
    let split = hc::HcSplit {
        post: post.clone(),
        comb: comb.clone(),
    };
    let mut cpu_a = x.clone();
    hc::post(&dims, &mut cpu_a, &fsub, &split, &mut Vec::new());
    let mut cpu_b = x.clone();
    hc::post(&dims, &mut cpu_b, &fmoe, &split, &mut Vec::new());
    let (pd, cd) = (be.upload_f32(&post)?, be.upload_f32(&comb)?);
    let (ni, di, ki) = (n as i32, d as i32, kx as i32);
    let grid = ((d as u32 / 4).div_ceil(256), t_n as u32, 1);
    {
        let xa = be.upload_f32(&x)?;
        let fd = be.upload_f32(&fsub)?;
        let (px, pf, pp, pc) = (p32(&xa), p32(&fd), p32(&pd), p32(&cd));
        let xh = st.alloc_zeros::<u16>(t_n * width)?;
        let pxh = xh.device_ptr(st).0;
        let fun = be.function("k_hc_post4")?;
        let mut b = st.launch_builder(&fun);
        b.arg(&px)
            .arg(&pf)
            .arg(&pp)
            .arg(&pc)
            .arg(&ni)
            .arg(&di)
            .arg(&pxh);
        // SAFETY: argument list matches k_hc_post4; t_n tokens of n·d, xh as many halves.
        unsafe { b.launch(cfg(grid, 256)) }?;
        let g = be.download(&xa)?;
        let mism = bits_differ(&g, &cpu_a) + f16_mism(&be.download(&xh)?, &scaled(&g));
        let mut row = exact_row("hc_post4", GgmlType::F32, &shape, mism);
        row.note = format!("{mism} elements (or f16 copies) differ in bits from CPU hc::post");
        out.push(row);
    }
    {
        let xb = be.upload_f32(&x)?;
        let (dd, invd, shd) = (
            be.upload_f32(&dns)?,
            be.upload_i32(&inv)?,
            be.upload_f32(&sh)?,
        );
        let (px, pdn, pinv, psh) = (p32(&xb), p32(&dd), invd.device_ptr(st).0, p32(&shd));
        let (pp, pc) = (p32(&pd), p32(&cd));
        let xh = st.alloc_zeros::<u16>(t_n * width)?;
        let pxh = xh.device_ptr(st).0;
        let fun = be.function("k_hc_post_moe_pf")?;
        let mut b = st.launch_builder(&fun);
        b.arg(&px)
            .arg(&pdn)
            .arg(&pinv)
            .arg(&psh)
            .arg(&ki)
            .arg(&pp)
            .arg(&pc)
            .arg(&ni)
            .arg(&di)
            .arg(&pxh);
        // SAFETY: argument list matches k_hc_post_moe_pf; dns holds `slots` rows, inv
        // `slots` ints < slots, xh t_n·n·d halves.
        unsafe { b.launch(cfg(grid, 256)) }?;
        let g = be.download(&xb)?;
        let mism = bits_differ(&g, &cpu_b) + f16_mism(&be.download(&xh)?, &scaled(&g));
        let mut row = exact_row(
            "hc_post_moe_pf",
            GgmlType::F32,
            &format!("{shape}xk{kx}"),
            mism,
        );
        row.note = format!(
            "{mism} elements (or f16 copies) differ in bits from CPU moe sum (via inv) + hc::post"
        );
        out.push(row);
    }
    Ok(())
}

/// Production prefill's hc_post forms with the next site's HC `fn` product fused
/// (`k_hc_post4_fn`, `k_hc_post_moe_fn`; t_n tokens, n = 4, d = 4096, 24 outputs, some
/// residual values beyond f16's range): the new state bit for bit against the CPU's (moe sum
/// +) hc::post, and the product against its f64 reference over the same f16 operands
/// (f16(X·HC_X16_SCALE) × the F16 weight, scaled back), relative to each output's L1 mass;
/// then the whole launch again: the same bits.
fn check_hc_post_fn(
    be: &CudaBackend,
    rng: &mut Rng,
    t_n: usize,
    out: &mut Vec<CheckRow>,
) -> Result<()> {
    use crate::model::hc;
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let (n, d, kx) = (4usize, 4096usize, 6usize);
    let (nmix, width) = ((2 + n) * n, n * d);
    let st = be.stream();
    let mut x = random_activations(rng, t_n * width);
    for t in 0..t_n {
        let i = (rng.next_u64() % width as u64) as usize;
        x[t * width + i] = 2.0e5;
    }
    let inp = PostInputs::random(rng, t_n, n, d, kx);
    let wb = random_weight(rng, GgmlType::F16, nmix, width);
    let w: Vec<f64> = wb
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
        .collect();
    let fw = be.upload_weight(GgmlType::F16, &wb, nmix, width, 1, &mut |_, _| {})?;
    let dims = test_hc_dims(n, d);
    let split = hc::HcSplit {
        post: inp.post.clone(),
        comb: inp.comb.clone(),
    };
    let scale = super::session::HC_X16_SCALE;
    let (pd, cd) = (be.upload_f32(&inp.post)?, be.upload_f32(&inp.comb)?);
    let (invd, shd) = (be.upload_i32(&inp.inv)?, be.upload_f32(&inp.sh)?);
    let (fd, dd) = (be.upload_f32(&inp.fsub)?, be.upload_f32(&inp.dns)?);
    let shape = format!("{t_n}tok,n{n}xd{d},{nmix}out");
    for moe in [false, true] {
        let mut cpu = x.clone();
        hc::post(
            &dims,
            &mut cpu,
            if moe { &inp.fmoe } else { &inp.fsub },
            &split,
            &mut Vec::new(),
        );
        let refs: Vec<(f64, f64)> = (0..t_n * nmix)
            .map(|i| {
                let (t, o) = (i / nmix, i % nmix);
                let (mut s, mut l1) = (0f64, 0f64);
                for k in 0..width {
                    let h = f16::from_f32(cpu[t * width + k] * scale).to_f64();
                    let p = w[o * width + k] * h / scale as f64;
                    s += p;
                    l1 += p.abs();
                }
                (s, l1)
            })
            .collect();
        let run = || -> Result<(Vec<f32>, Vec<f32>)> {
            let xd = be.upload_f32(&x)?;
            let mix = poisoned(be, t_n * nmix)?;
            let (px, pm) = (xd.device_ptr(st).0, mix.device_ptr(st).0);
            let (pp, pc, pw) = (pd.device_ptr(st).0, cd.device_ptr(st).0, be.weight_ptr(&fw));
            let (ti, di, mi, ki) = (t_n as i32, d as i32, nmix as i32, kx as i32);
            let name = if moe {
                "k_hc_post_moe_fn"
            } else {
                "k_hc_post4_fn"
            };
            let fun = be.function(name)?;
            let mut b = st.launch_builder(&fun);
            let (pf, pdn, pinv, psh) = (
                fd.device_ptr(st).0,
                dd.device_ptr(st).0,
                invd.device_ptr(st).0,
                shd.device_ptr(st).0,
            );
            b.arg(&px);
            if moe {
                b.arg(&pdn).arg(&pinv).arg(&psh).arg(&ki);
            } else {
                b.arg(&pf);
            }
            b.arg(&pp)
                .arg(&pc)
                .arg(&ti)
                .arg(&di)
                .arg(&pw)
                .arg(&mi)
                .arg(&pm);
            let cfg = LaunchConfig {
                grid_dim: (t_n.div_ceil(16) as u32, 1, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the argument list matches the kernel (forward.cu); x holds t_n states
            // of n·d, mix t_n × nmix, dns `slots` rows, inv `slots` ints < slots, the weight
            // nmix × n·d halves.
            unsafe { b.launch(cfg) }?;
            Ok((be.download(&xd)?, be.download(&mix)?))
        };
        let (gx, gm) = run()?;
        let name = if moe { "hc_post_moe_fn" } else { "hc_post4_fn" };
        let mism = bits_differ(&gx, &cpu);
        let mut row = exact_row(&format!("{name}_state"), GgmlType::F32, &shape, mism);
        row.note = format!("{mism} state elements differ in bits from CPU hc::post");
        out.push(row);
        let mut row = compare(name, GgmlType::F16, shape.clone(), &gm, &refs, 1e-5);
        row.note = format!("fn product vs f64 over the same f16 operands: {}", row.note);
        out.push(row);
        let (gx2, gm2) = run()?;
        out.push(det_row(
            &format!("{name}_det"),
            GgmlType::F16,
            &shape,
            bits_differ(&gx, &gx2) + bits_differ(&gm, &gm2) == 0,
        ));
    }
    Ok(())
}

/// Production prefill's HC `fn` product (F16 weights, f16 tensor-core GEMM) on a residual
/// stream with values beyond f16's 65,504: with the input scaled by HC_X16_SCALE (and the
/// sums scaled back) it matches the f64 reference; unscaled, the same input overflows (so the
/// planted values do test the range).
fn check_hc_fn_range(be: &CudaBackend, rng: &mut Rng, out: &mut Vec<CheckRow>) -> Result<()> {
    let (rows, cols, nt) = (24usize, 4096usize, 16usize);
    let ty = GgmlType::F16;
    let wb = random_weight(rng, ty, rows, cols);
    let w = be.upload_weight(ty, &wb, rows, cols, 1, &mut |_, _| {})?;
    let mut xs = random_activations(rng, nt * cols);
    for t in 0..nt {
        for k in 0..4 {
            let i = (rng.next_u64() % cols as u64) as usize;
            xs[t * cols + i] = if k % 2 == 0 { 3.0e5 } else { -1.5e5 };
        }
    }
    let mut refs = Vec::new();
    for t in 0..nt {
        refs.extend(reference(
            ty,
            &wb,
            rows,
            cols,
            &xs[t * cols..(t + 1) * cols],
        ));
    }
    let st = be.stream();
    let xd = be.upload_f32(&xs)?;
    let x16 = st.alloc_zeros::<u16>(nt * cols)?;
    let w16 = st.alloc_zeros::<u16>(rows * cols)?;
    let shape = format!("{rows}x{cols}x{nt}tok");
    let run = |x_scale: f32| -> Result<Vec<f32>> {
        let y = poisoned(be, nt * rows)?;
        // SAFETY: xd nt × cols floats, y nt × rows, x16 nt × cols halves, w16 rows × cols.
        unsafe {
            super::prefill::dense_gemm(
                be,
                &w,
                0,
                1,
                xd.device_ptr(st).0,
                cols,
                nt,
                y.device_ptr(st).0,
                rows,
                w16.device_ptr(st).0,
                x16.device_ptr(st).0,
                false,
                x_scale,
                false,
            )?
        };
        be.download(&y)
    };
    let ys = run(super::session::HC_X16_SCALE)?;
    let mut row = compare(
        "hc_fn_gemm_range",
        ty,
        shape.clone(),
        &ys,
        &refs,
        TOL_F16_GEMM,
    );
    row.note = format!(
        "residual values up to 3e5, input scaled by 1/16: {}",
        row.note
    );
    out.push(row);
    let unscaled = run(1.0)?;
    let finite = unscaled.iter().all(|v| v.is_finite());
    let mut row = exact_row(
        "hc_fn_gemm_unscaled_overflows",
        ty,
        &shape,
        usize::from(finite),
    );
    row.note =
        "the same product unscaled is not finite (f16 overflow): the test plants real overflows"
            .into();
    out.push(row);
    Ok(())
}

/// Routed outputs of the grouped MoE check: CPU dequantized weights, f64 sums, k_swiglu's f32
/// expressions; per output (sum, L1 mass of its products).
#[allow(clippy::too_many_arguments)]
fn moe_reference(
    tg: GgmlType,
    td: GgmlType,
    gb: &[u8],
    ub: &[u8],
    db: &[u8],
    ids: &[i32],
    wts: &[f32],
    y: &[f32],
    (n_exp, d, f, k): (usize, usize, usize, usize),
    clamp: f32,
) -> Vec<(f64, f64)> {
    let slots = ids.len();
    let deq = |ty: GgmlType, b: &[u8], rows: usize, cols: usize| {
        let mut v = vec![0f32; rows * cols];
        let rb = cols / ty.block_elems() * ty.block_bytes();
        for (o, r) in v.chunks_exact_mut(cols).enumerate() {
            dequantize_row(ty, &b[o * rb..(o + 1) * rb], r);
        }
        v
    };
    let (gf, uf, df) = (
        deq(tg, gb, n_exp * f, d),
        deq(tg, ub, n_exp * f, d),
        deq(td, db, n_exp * d, f),
    );
    let mut refs = Vec::with_capacity(slots * d);
    for s in 0..slots {
        let e = ids[s] as usize;
        let x = &y[(s / k) * d..(s / k + 1) * d];
        let dot = |w: &[f32]| {
            w.iter()
                .zip(x)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
        };
        let h: Vec<f32> = (0..f)
            .map(|o| {
                let r = (e * f + o) * d;
                let g = dot(&gf[r..r + d]) as f32;
                let u = dot(&uf[r..r + d]) as f32;
                let gv = g.min(clamp);
                let sil = gv * (1.0 / (1.0 + (-gv).exp()));
                sil * u.clamp(-clamp, clamp) * wts[s]
            })
            .collect();
        for j in 0..d {
            let r = (e * d + j) * f;
            let (mut sum, mut l1) = (0f64, 0f64);
            for (&w, &hv) in df[r..r + f].iter().zip(&h) {
                let pr = w as f64 * hv as f64;
                sum += pr;
                l1 += pr.abs();
            }
            refs.push((sum, l1));
        }
    }
    refs
}

fn exact_row(kernel: &str, ty: GgmlType, shape: &str, mismatches: usize) -> CheckRow {
    CheckRow {
        kernel: kernel.into(),
        ty,
        shape: shape.into(),
        max_abs: 0.0,
        max_err: mismatches as f64,
        rel_l2: 0.0,
        tol: 0.0,
        pass: mismatches == 0,
        note: format!("{mismatches} elements differ in bits from quant::dequantize_row"),
    }
}

/// A row for two forms of a kernel that must give the same bits (`same`), with what was compared.
fn same_row(kernel: &str, ty: GgmlType, shape: &str, same: bool, note: &str) -> CheckRow {
    let mut row = exact_row(kernel, ty, shape, usize::from(!same));
    row.note = note.into();
    row
}

fn det_row(kernel: &str, ty: GgmlType, shape: &str, same: bool) -> CheckRow {
    CheckRow {
        kernel: format!("{kernel}_determinism"),
        ty,
        shape: shape.into(),
        max_abs: 0.0,
        max_err: if same { 0.0 } else { 1.0 },
        rel_l2: 0.0,
        tol: 0.0,
        pass: same,
        note: if same {
            "two runs bit-identical".into()
        } else {
            "runs differ".into()
        },
    }
}

// ------------------------------------------------------------------------------------ bench

/// One line of `ds4 cuda bench`.
#[derive(Clone, Debug)]
pub struct BenchRow {
    /// What was timed.
    pub kernel: String,
    /// Weight type(s).
    pub ty: String,
    /// Matrix rows.
    pub rows: usize,
    /// Matrix columns.
    pub cols: usize,
    /// Tokens (prefill) or selected experts (MoE); 1 for a matvec.
    pub batch: usize,
    /// Microseconds per call (median of repeats).
    pub us: f64,
    /// Weight bytes read per call / time.
    pub gbs: f64,
    /// `gbs` over the card's datasheet peak, if known.
    pub frac_peak: Option<f64>,
    /// Arithmetic rate (2·rows·cols·batch / time), TFLOP/s.
    pub tflops: f64,
}

impl BenchRow {
    /// CSV header matching [`BenchRow::csv`].
    pub const CSV_HEADER: &'static str =
        "kernel,type,rows,cols,batch,us_per_call,weight_GBps,frac_peak,TFLOPs";
    /// One CSV line.
    pub fn csv(&self) -> String {
        format!(
            "{},{},{},{},{},{:.2},{:.1},{},{:.2}",
            self.kernel,
            self.ty,
            self.rows,
            self.cols,
            self.batch,
            self.us,
            self.gbs,
            self.frac_peak
                .map(|f| format!("{f:.3}"))
                .unwrap_or_else(|| "-".into()),
            self.tflops
        )
    }
}

/// Median over `repeats` of the mean time of `iters` back-to-back calls, in µs.
fn time_us(
    be: &CudaBackend,
    iters: usize,
    repeats: usize,
    f: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<f64> {
    for i in 0..3 {
        f(i)?;
    }
    be.synchronize()?;
    let mut v = Vec::new();
    let mut k = 0usize;
    for _ in 0..repeats {
        let ms = be.time_ms(&mut || {
            for _ in 0..iters {
                f(k)?;
                k += 1;
            }
            Ok(())
        })?;
        v.push(ms * 1000.0 / iters as f64);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// A weight of `copies` identical random matrices, so timing loops can rotate through more
/// bytes than the L2 holds (otherwise small matrices would be served from cache).
fn rotating_weight(
    be: &CudaBackend,
    rng: &mut Rng,
    ty: GgmlType,
    n_rows: usize,
    n_cols: usize,
    min_bytes: usize,
) -> Result<GpuWeight> {
    let one = random_weight(rng, ty, n_rows, n_cols);
    let copies = min_bytes.div_ceil(one.len()).max(2);
    let mut all = Vec::with_capacity(one.len() * copies);
    for _ in 0..copies {
        all.extend_from_slice(&one);
    }
    be.upload_weight(ty, &all, n_rows, n_cols, copies, &mut |_, _| {})
}

/// Bench configuration.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Back-to-back calls per timed repeat.
    pub iters: usize,
    /// Timed repeats (median taken).
    pub repeats: usize,
    /// Tokens of the prefill measurements.
    pub prefill_tokens: usize,
    /// Which parts to run: any of "matvec", "moe", "prefill" (empty = all).
    pub sections: Vec<String>,
}

impl BenchConfig {
    fn wants(&self, s: &str) -> bool {
        self.sections.is_empty() || self.sections.iter().any(|x| x == s)
    }
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            iters: 200,
            repeats: 5,
            prefill_tokens: 512,
            sections: Vec::new(),
        }
    }
}

/// Kernel bandwidth at Flash shapes: dense 4096×4096 matvec per type, expert slices, the
/// full 6-expert MoE decode of one layer (q2 and q4 files), and prefill products.
pub fn bench(be: &CudaBackend, cfg: &BenchConfig, log: &mut dyn FnMut(&BenchRow)) -> Result<()> {
    let mut rng = Rng::new(7);
    let peak = be.info().peak_bandwidth_gbs();
    // Rotate through at least 4× the L2 so every call streams from HBM.
    let min_bytes = (be.info().l2_bytes as usize * 4).max(256 << 20);
    let mk = |kernel: &str, ty: String, rows, cols, batch, us: f64, bytes: f64, flops: f64| {
        let gbs = bytes / us / 1e3;
        BenchRow {
            kernel: kernel.into(),
            ty,
            rows,
            cols,
            batch,
            us,
            gbs,
            frac_peak: peak.map(|p| gbs / p),
            tflops: flops / us / 1e6,
        }
    };

    // Decode matvecs: dense 4096×4096 of every type, then expert-shaped slices.
    let shapes: Vec<(GgmlType, usize, usize, &str)> = SUPPORTED_TYPES
        .iter()
        .map(|&t| (t, 4096, 4096, "matvec"))
        .chain([
            (GgmlType::IQ2_XXS, 2048, 4096, "matvec_expert"),
            (GgmlType::Q2_K, 4096, 2048, "matvec_expert"),
            (GgmlType::Q4_K, 2048, 4096, "matvec_expert"),
            (GgmlType::Q4_K, 4096, 2048, "matvec_expert"),
            (GgmlType::Q8_0, 32768, 1024, "matvec"),
        ])
        .collect();
    for (ty, rows, cols, kernel) in shapes.into_iter().filter(|_| cfg.wants("matvec")) {
        let w = rotating_weight(be, &mut rng, ty, rows, cols, min_bytes)?;
        let x = be.upload_f32(&random_activations(&mut rng, cols))?;
        let mut y = be.alloc_f32(rows)?;
        let n = w.n_experts;
        let us = time_us(be, cfg.iters, cfg.repeats, &mut |i| {
            be.matvec(&w, i % n, &x.slice(..), &mut y.slice_mut(..))
        })?;
        let r = mk(
            kernel,
            ty.to_string(),
            rows,
            cols,
            1,
            us,
            w.matrix_bytes() as f64,
            2.0 * (rows * cols) as f64,
        );
        log(&r);
    }

    // One layer's routed MoE at decode: 6 of 256 experts, gate + up (shared input) then down
    // (per-expert input), random ids per call, full-size expert tensors.
    for (gu, dn, label) in [
        (GgmlType::IQ2_XXS, GgmlType::Q2_K, "IQ2_XXS+Q2_K"),
        (GgmlType::Q4_K, GgmlType::Q4_K, "Q4_K"),
    ]
    .into_iter()
    .filter(|_| cfg.wants("moe"))
    {
        let (d, f, e, k) = (4096usize, 2048usize, 256usize, 6usize);
        let tiled = |rng: &mut Rng, ty, rows, cols| -> Result<GpuWeight> {
            // 8 distinct random experts tiled to 256 (the bytes are what matter).
            let distinct: Vec<Vec<u8>> =
                (0..8).map(|_| random_weight(rng, ty, rows, cols)).collect();
            let mut all = Vec::with_capacity(distinct[0].len() * e);
            for i in 0..e {
                all.extend_from_slice(&distinct[i % 8]);
            }
            be.upload_weight(ty, &all, rows, cols, e, &mut |_, _| {})
        };
        let gate = tiled(&mut rng, gu, f, d)?;
        let up = tiled(&mut rng, gu, f, d)?;
        let down = tiled(&mut rng, dn, d, f)?;
        let sets = 64usize;
        let mut ids = Vec::with_capacity(sets * k);
        for _ in 0..sets {
            let mut sel: Vec<i32> = Vec::new();
            while sel.len() < k {
                let c = (rng.next_u64() % e as u64) as i32;
                if !sel.contains(&c) {
                    sel.push(c);
                }
            }
            ids.extend(sel);
        }
        let idsd = be.upload_i32(&ids)?;
        let z = be.upload_f32(&random_activations(&mut rng, d))?;
        let mut g = be.alloc_f32(k * f)?;
        let mut u = be.alloc_f32(k * f)?;
        let h = be.upload_f32(&random_activations(&mut rng, k * f))?;
        let mut o = be.alloc_f32(k * d)?;
        let us = time_us(be, cfg.iters, cfg.repeats, &mut |i| {
            let s = i % sets;
            let idv = idsd.slice(s * k..(s + 1) * k);
            be.moe_matvec(&gate, &idv, &z.slice(..), 0, &mut g.slice_mut(..))?;
            be.moe_matvec(&up, &idv, &z.slice(..), 0, &mut u.slice_mut(..))?;
            be.moe_matvec(&down, &idv, &h.slice(..), f, &mut o.slice_mut(..))
        })?;
        let bytes = (k * (gate.matrix_bytes() + up.matrix_bytes() + down.matrix_bytes())) as f64;
        let r = mk(
            "moe_decode_layer",
            label.into(),
            f,
            d,
            k,
            us,
            bytes,
            2.0 * 3.0 * (k * f * d) as f64,
        );
        log(&r);
    }

    // Prefill: CUDA-core tiles vs dequantize-to-f16 + cuBLAS GEMM.
    let nt = cfg.prefill_tokens;
    for (ty, rows, cols) in [
        (GgmlType::Q8_0, 4096usize, 4096usize),
        (GgmlType::IQ2_XXS, 2048, 4096),
        (GgmlType::Q2_K, 4096, 2048),
    ]
    .into_iter()
    .filter(|_| cfg.wants("prefill"))
    {
        let wb = random_weight(&mut rng, ty, rows, cols);
        let w = be.upload_weight(ty, &wb, rows, cols, 1, &mut |_, _| {})?;
        let xs = be.upload_f32(&random_activations(&mut rng, nt * cols))?;
        let mut ys = be.alloc_f32(nt * rows)?;
        let flops = 2.0 * (rows * cols * nt) as f64;
        let iters = (cfg.iters / 20).max(3);
        let us = time_us(be, iters, cfg.repeats, &mut |_| {
            be.matmul(&w, 0, &xs.slice(..), nt, &mut ys.slice_mut(..))
        })?;
        log(&mk(
            "matmul_cuda_cores",
            ty.to_string(),
            rows,
            cols,
            nt,
            us,
            w.matrix_bytes() as f64,
            flops,
        ));
        let mut scratch = GemmScratch::default();
        let us = time_us(be, iters, cfg.repeats, &mut |_| {
            be.matmul_gemm(
                &w,
                0,
                &xs.slice(..),
                nt,
                &mut ys.slice_mut(..),
                &mut scratch,
            )
        })?;
        log(&mk(
            "matmul_dequant_f16_gemm",
            ty.to_string(),
            rows,
            cols,
            nt,
            us,
            w.matrix_bytes() as f64,
            flops,
        ));
    }
    Ok(())
}

/// Whether a GPU test should run: `Some(backend)`, or `None` after printing why it is skipped
/// (no GPU / libraries). A backend that is present but fails to start is an error, not a skip.
pub fn backend_for_tests() -> std::result::Result<Option<CudaBackend>, CudaError> {
    match CudaBackend::new(0) {
        Ok(b) => Ok(Some(b)),
        Err(CudaError::Unavailable(why)) => {
            eprintln!("skipping CUDA test: {why}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
