//! `ds4 cuda …`: CUDA backend diagnostics — device info, kernel self-test against the CPU
//! reference, and kernel bandwidth benchmarks (CSV).

use clap::{Args, Subcommand};
use ds4::backend::cuda::check::{bench, selftest, BenchConfig, BenchRow, CheckRow};
use ds4::backend::cuda::{probe, CudaAvailability, CudaBackend};

/// Arguments of `ds4 cuda`.
#[derive(Args, Debug)]
pub struct CudaArgs {
    #[command(subcommand)]
    pub what: CudaWhat,
}

/// `ds4 cuda` modes.
#[derive(Subcommand, Debug)]
pub enum CudaWhat {
    /// Probe the CUDA runtime and print the device (or why it is unusable).
    Info,
    /// Run every GPU kernel on random data against the CPU reference; non-zero exit on failure.
    Selftest {
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Small shapes only.
        #[arg(long)]
        quick: bool,
    },
    /// Weight bandwidth of the kernels at Flash shapes (CSV on stdout).
    Bench {
        /// Back-to-back calls per timed repeat.
        #[arg(long, default_value_t = 200)]
        iters: usize,
        /// Timed repeats (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Tokens of the prefill measurements.
        #[arg(long, default_value_t = 512)]
        prefill_tokens: usize,
        /// Parts to run, comma separated: matvec, moe, prefill (default: all).
        #[arg(long, value_delimiter = ',')]
        sections: Vec<String>,
    },
}

fn backend() -> anyhow::Result<CudaBackend> {
    let t = std::time::Instant::now();
    let be = CudaBackend::new(0)?;
    let (origin, key) = be.kernel_origin();
    eprintln!("# device: {}", be.info());
    eprintln!(
        "# kernels: {origin:?} (key {key}) in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    Ok(be)
}

/// Runs `ds4 cuda`.
pub fn run(args: CudaArgs) -> anyhow::Result<()> {
    match args.what {
        CudaWhat::Info => match probe(0) {
            CudaAvailability::Available(d) => {
                println!("CUDA available: {d}");
                match d.peak_bandwidth_gbs() {
                    Some(p) => println!("peak bandwidth (datasheet): {p:.0} GB/s"),
                    None => println!("peak bandwidth: unknown card"),
                }
                let be = backend()?;
                let (free, total) = be.mem_info()?;
                println!("memory: {} MiB free of {} MiB", free >> 20, total >> 20);
            }
            CudaAvailability::Unavailable(why) => println!("CUDA unavailable: {why}"),
        },
        CudaWhat::Selftest { seed, quick } => {
            let be = backend()?;
            let t = std::time::Instant::now();
            let rows = selftest(&be, seed, quick)?;
            println!("{}", CheckRow::CSV_HEADER);
            for r in &rows {
                println!("{}", r.csv());
            }
            let failed: Vec<&CheckRow> = rows.iter().filter(|r| !r.pass).collect();
            eprintln!(
                "# selftest: {} checks, {} failed, {:.1} s",
                rows.len(),
                failed.len(),
                t.elapsed().as_secs_f64()
            );
            if !failed.is_empty() {
                for r in failed {
                    eprintln!("FAIL {} {} {}", r.kernel, r.ty, r.shape);
                }
                anyhow::bail!("CUDA self-test failed");
            }
        }
        CudaWhat::Bench {
            iters,
            repeats,
            prefill_tokens,
            sections,
        } => {
            let be = backend()?;
            if let Some(p) = be.info().peak_bandwidth_gbs() {
                eprintln!("# peak bandwidth (datasheet): {p:.0} GB/s");
            }
            let cfg = BenchConfig {
                iters: iters.max(1),
                repeats: repeats.max(1),
                prefill_tokens: prefill_tokens.max(1),
                sections,
            };
            println!("{}", BenchRow::CSV_HEADER);
            bench(&be, &cfg, &mut |r| println!("{}", r.csv()))?;
        }
    }
    Ok(())
}
