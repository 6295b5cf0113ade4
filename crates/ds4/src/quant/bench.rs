//! Throughput microbenchmark of the row-matrix kernels (`ds4 bench kernels`).
//!
//! Reports GB/s of *weight bytes consumed*: the number that matters for decode, which is
//! bound by streaming the weights once per token.

use super::{matvec, quantize_row, GgmlType};
use std::time::Instant;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Weight formats to time (types without a quantizer are built from random bytes with
    /// sane scales).
    pub types: Vec<GgmlType>,
    /// Matrix rows.
    pub n_rows: usize,
    /// Matrix columns (a multiple of 256).
    pub n_cols: usize,
    /// Minimum measuring time per (kernel, threads) point, seconds.
    pub min_secs: f64,
    /// Thread counts to run (each in its own rayon pool); 0 means all cores.
    pub threads: Vec<usize>,
    /// Also time the exact (f32 activation) path.
    pub exact: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            types: vec![
                GgmlType::F32,
                GgmlType::F16,
                GgmlType::BF16,
                GgmlType::Q8_0,
                GgmlType::Q4_K,
                GgmlType::Q2_K,
                GgmlType::IQ2_XXS,
            ],
            n_rows: 4096,
            n_cols: 4096,
            min_secs: 1.0,
            threads: vec![1, 0],
            exact: false,
        }
    }
}

/// One measured point.
#[derive(Clone, Debug)]
pub struct KernelBench {
    /// Kernel name, e.g. `matvec`.
    pub kernel: &'static str,
    /// Weight format.
    pub ty: GgmlType,
    /// Whether the exact (f32) path was timed.
    pub exact: bool,
    /// Matrix shape.
    pub n_rows: usize,
    /// Matrix shape.
    pub n_cols: usize,
    /// Threads used.
    pub threads: usize,
    /// Calls timed.
    pub iters: usize,
    /// Mean seconds per call.
    pub secs_per_call: f64,
    /// Weight bytes consumed per second, in 10^9 bytes.
    pub gbps: f64,
}

impl KernelBench {
    /// CSV header matching [`KernelBench::csv_row`].
    pub const CSV_HEADER: &'static str =
        "kernel,type,exact,rows,cols,threads,iters,us_per_call,weight_gb_per_s";

    /// One CSV line.
    pub fn csv_row(&self) -> String {
        format!(
            "{},{},{},{},{},{},{},{:.1},{:.2}",
            self.kernel,
            self.ty,
            self.exact,
            self.n_rows,
            self.n_cols,
            self.threads,
            self.iters,
            self.secs_per_call * 1e6,
            self.gbps
        )
    }
}

/// Small deterministic generator (xorshift*) so benchmarks need no extra dependency.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Roughly N(0,1) (sum of uniforms).
    fn normal(&mut self) -> f32 {
        (0..4)
            .map(|_| (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
            .sum::<f32>()
            * 1.732
            - 3.464
    }
}

fn random_weights(ty: GgmlType, n_rows: usize, n_cols: usize, rng: &mut Rng) -> Vec<u8> {
    let rb = ty
        .row_bytes(n_cols as u64)
        .expect("n_cols is a whole number of blocks") as usize;
    let mut w = vec![0u8; rb * n_rows];
    if ty == GgmlType::IQ2_XXS {
        // No quantizer: random codes and a small f16 scale per block (timing only).
        for b in w.chunks_exact_mut(ty.block_bytes()) {
            for v in b.iter_mut() {
                *v = rng.next_u64() as u8;
            }
            b[0..2].copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
        }
        return w;
    }
    let mut row = vec![0f32; n_cols];
    for wr in w.chunks_exact_mut(rb) {
        row.iter_mut().for_each(|v| *v = rng.normal() * 0.02);
        quantize_row(ty, &row, wr).expect("bench types are quantizable");
    }
    w
}

/// Times `matvec` for every configured type and thread count; weights are random.
pub fn bench_kernels(cfg: &BenchConfig) -> Vec<KernelBench> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let x: Vec<f32> = (0..cfg.n_cols).map(|_| rng.normal()).collect();
    let mut y = vec![0f32; cfg.n_rows];
    let mut out = Vec::new();
    let modes: &[bool] = if cfg.exact { &[false, true] } else { &[false] };
    for &ty in &cfg.types {
        let w = random_weights(ty, cfg.n_rows, cfg.n_cols, &mut rng);
        for &threads in &cfg.threads {
            let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
                Ok(p) => p,
                Err(_) => continue,
            };
            for &exact in modes {
                let run = || matvec(ty, &w, cfg.n_rows, cfg.n_cols, &x, &mut y, exact);
                let (iters, secs) = pool.install(|| {
                    let mut run = run;
                    run(); // warm-up: page in the weights, spin up the pool
                    let t0 = Instant::now();
                    let mut iters = 0usize;
                    while iters < 3 || t0.elapsed().as_secs_f64() < cfg.min_secs {
                        run();
                        iters += 1;
                    }
                    (iters, t0.elapsed().as_secs_f64())
                });
                let per = secs / iters as f64;
                out.push(KernelBench {
                    kernel: "matvec",
                    ty,
                    exact,
                    n_rows: cfg.n_rows,
                    n_cols: cfg.n_cols,
                    threads: pool.current_num_threads(),
                    iters,
                    secs_per_call: per,
                    gbps: w.len() as f64 / per / 1e9,
                });
            }
        }
    }
    out
}
