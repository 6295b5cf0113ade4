//! Timing helpers for the quant kernels (ignored by default; run with
//! `cargo test --release -p ds4 --test quant_perf -- --ignored --nocapture`).
//! `DS4_PERF_SECS` sets the seconds per point (default 1), `DS4_PERF_TOK` the matmul batch.
//! `ds4 bench kernels` is the reported benchmark; this adds single-thread matmul and the
//! small router/HC shapes.

use ds4::quant::*;
use std::time::Instant;

struct Rng(u64);
impl Rng {
    fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn f(&mut self) -> f32 {
        (self.u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

fn weights(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let rb = ty.row_bytes(cols as u64).unwrap() as usize;
    let mut w = vec![0u8; rb * rows];
    if !can_quantize(ty) {
        for b in w.chunks_exact_mut(ty.block_bytes()) {
            b.iter_mut().for_each(|v| *v = rng.u64() as u8);
            b[0..2].copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
        }
        return w;
    }
    let row: Vec<f32> = (0..cols).map(|_| rng.f() * 0.05).collect();
    for r in w.chunks_exact_mut(rb) {
        quantize_row(ty, &row, r).unwrap();
    }
    w
}

fn secs() -> f64 {
    std::env::var("DS4_PERF_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}
extern "C" {
    fn clock_gettime(clk: i32, ts: *mut Timespec) -> i32;
}

/// CPU seconds of the calling thread (Linux `CLOCK_THREAD_CPUTIME_ID`): on a shared machine
/// this excludes the time other processes hold the core.
fn thread_cpu() -> f64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: valid out-pointer; clock id 3 is CLOCK_THREAD_CPUTIME_ID on Linux.
    unsafe { clock_gettime(3, &mut ts) };
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

/// Seconds per call. Single-threaded callers (`DS4_PERF_CPU=1`) are timed in thread CPU
/// time, which is far less noisy on a loaded machine; otherwise wall time.
fn time(mut f: impl FnMut()) -> f64 {
    let cpu = std::env::var("DS4_PERF_CPU").as_deref() == Ok("1");
    f();
    let t0 = Instant::now();
    let c0 = thread_cpu();
    let mut n = 0;
    while n < 3 || t0.elapsed().as_secs_f64() < secs() {
        f();
        n += 1;
    }
    if cpu {
        (thread_cpu() - c0) / n as f64
    } else {
        t0.elapsed().as_secs_f64() / n as f64
    }
}

const TYPES: [GgmlType; 5] = [
    GgmlType::F16,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q2_K,
    GgmlType::IQ2_XXS,
];

/// `DS4_PERF_TYPES=Q2_K,IQ2_XXS` restricts the formats; `DS4_PERF_SHAPES=4096x4096,..`
/// the matvec shapes; `DS4_PERF_THREADS=1,2` the thread counts.
fn types() -> Vec<GgmlType> {
    match std::env::var("DS4_PERF_TYPES") {
        Ok(s) => TYPES
            .into_iter()
            .filter(|t| s.split(',').any(|n| n.eq_ignore_ascii_case(t.name())))
            .collect(),
        Err(_) => TYPES.to_vec(),
    }
}

fn shapes() -> Vec<(usize, usize)> {
    match std::env::var("DS4_PERF_SHAPES") {
        Ok(s) => s
            .split(',')
            .map(|p| {
                let (r, c) = p.split_once('x').unwrap();
                (r.parse().unwrap(), c.parse().unwrap())
            })
            .collect(),
        Err(_) => vec![(4096, 4096), (1024, 4096), (24, 16384)],
    }
}

fn threads() -> Vec<usize> {
    match std::env::var("DS4_PERF_THREADS") {
        Ok(s) => s.split(',').map(|v| v.parse().unwrap()).collect(),
        Err(_) => vec![1, 2],
    }
}

fn modes() -> Vec<bool> {
    match std::env::var("DS4_PERF_EXACT").as_deref() {
        Ok("0") => vec![false],
        Ok("1") => vec![true],
        _ => vec![false, true],
    }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

#[test]
#[ignore]
fn perf_matvec() {
    let mut rng = Rng(1);
    println!("kernel,type,exact,rows,cols,threads,us,weight_GBps");
    for ty in types() {
        for (rows, cols) in shapes() {
            let w = weights(ty, rows, cols, &mut rng);
            let x: Vec<f32> = (0..cols).map(|_| rng.f()).collect();
            let mut y = vec![0f32; rows];
            for &exact in &modes() {
                for &threads in &threads() {
                    let t = pool(threads)
                        .install(|| time(|| matvec(ty, &w, rows, cols, &x, &mut y, exact)));
                    println!(
                        "matvec,{ty},{exact},{rows},{cols},{threads},{:.1},{:.2}",
                        t * 1e6,
                        w.len() as f64 / t / 1e9
                    );
                }
            }
        }
    }
}

#[test]
#[ignore]
fn perf_matmul() {
    let mut rng = Rng(2);
    let n_tok: usize = std::env::var("DS4_PERF_TOK")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let (rows, cols) = (2048usize, 4096usize);
    println!("kernel,type,exact,rows,cols,tokens,threads,ms,weight_GBps_equiv,GMAC_per_s");
    for ty in types() {
        let w = weights(ty, rows, cols, &mut rng);
        let xs: Vec<f32> = (0..n_tok * cols).map(|_| rng.f()).collect();
        let mut ys = vec![0f32; n_tok * rows];
        for &exact in &modes() {
            let t =
                pool(1).install(|| time(|| matmul(ty, &w, rows, cols, &xs, n_tok, &mut ys, exact)));
            println!(
                "matmul,{ty},{exact},{rows},{cols},{n_tok},1,{:.2},{:.2},{:.2}",
                t * 1e3,
                (w.len() * n_tok) as f64 / t / 1e9,
                (rows * cols * n_tok) as f64 / t / 1e9
            );
        }
    }
}

/// Single-row kernels called directly on this thread (no rayon), timed in thread CPU time,
/// over a 256-row matrix that stays in L2: the compute rate of each kernel.
#[test]
#[ignore]
fn perf_dots() {
    let mut rng = Rng(3);
    let (rows, cols) = (256usize, 4096usize);
    let isa = Isa::detect();
    println!("kernel,type,exact,rows,cols,ns_per_row,weight_GBps(cpu time)");
    for ty in types() {
        let w = weights(ty, rows, cols, &mut rng);
        let rb = w.len() / rows;
        let x: Vec<f32> = (0..cols).map(|_| rng.f()).collect();
        let x8 = quantize_act_q8_0(&x);
        let xk = quantize_act_q8_k(&x);
        for &exact in &modes() {
            let mut sink = 0f32;
            let mut run = || {
                for r in w.chunks_exact(rb) {
                    sink += match ty {
                        _ if exact => dot_f32_with(isa, ty, r, &x),
                        GgmlType::Q8_0 => dot_q8_0_with(isa, r, &x8),
                        GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => {
                            dot_q8_k_with(isa, ty, r, &xk)
                        }
                        _ => dot_f32_with(isa, ty, r, &x),
                    };
                }
            };
            let c0 = thread_cpu();
            let mut n = 0;
            run();
            while n < 3 || thread_cpu() - c0 < secs() {
                run();
                n += 1;
            }
            let t = (thread_cpu() - c0) / (n + 1) as f64;
            std::hint::black_box(sink);
            println!(
                "dot,{ty},{exact},{rows},{cols},{:.1},{:.2}",
                t * 1e9 / rows as f64,
                w.len() as f64 / t / 1e9
            );
        }
    }
}
