//! `ds4 bench …`: performance measurements. Each mode is a `BenchWhat` variant so new
//! modes can be added without touching the others.

use clap::{Args, Subcommand};
use ds4::quant::{bench_kernels, BenchConfig, GgmlType, KernelBench};

/// Arguments of `ds4 bench`: without a subcommand, the model benchmark (CSV per context
/// frontier); `ds4 bench kernels` times the quant kernels alone.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: Option<BenchWhat>,
    #[command(flatten)]
    pub model: crate::bench_model::ModelBenchArgs,
}

/// Benchmark modes.
#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Weight-streaming throughput of the matvec kernels per format (CSV on stdout).
    Kernels {
        /// Formats to time, comma separated (F32,F16,BF16,Q8_0,Q4_K,Q2_K,IQ2_XXS).
        #[arg(long, value_delimiter = ',')]
        types: Option<Vec<String>>,
        /// Matrix rows.
        #[arg(long, default_value_t = 4096)]
        rows: usize,
        /// Matrix columns (multiple of 256).
        #[arg(long, default_value_t = 4096)]
        cols: usize,
        /// Minimum seconds measured per point.
        #[arg(long, default_value_t = 1.0)]
        secs: f64,
        /// Thread counts, comma separated; 0 = all cores.
        #[arg(long, value_delimiter = ',', default_value = "1,0")]
        threads: Vec<usize>,
        /// Also time the exact (f32 activation) path.
        #[arg(long)]
        exact: bool,
    },
}

fn parse_type(s: &str) -> anyhow::Result<GgmlType> {
    let all = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q2_K,
        GgmlType::IQ2_XXS,
    ];
    all.into_iter()
        .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
        .ok_or_else(|| anyhow::anyhow!("unknown or unsupported type {s:?}"))
}

/// Runs `ds4 bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let Some(what) = args.what else {
        return crate::bench_model::run(args.model);
    };
    match what {
        BenchWhat::Kernels {
            types,
            rows,
            cols,
            secs,
            threads,
            exact,
        } => {
            anyhow::ensure!(
                cols % 256 == 0 && cols > 0 && rows > 0,
                "--cols must be a positive multiple of 256"
            );
            let mut cfg = BenchConfig {
                n_rows: rows,
                n_cols: cols,
                min_secs: secs,
                threads,
                exact,
                ..Default::default()
            };
            if let Some(t) = types {
                cfg.types = t
                    .iter()
                    .map(|s| parse_type(s))
                    .collect::<anyhow::Result<_>>()?;
            }
            eprintln!("# isa: {:?}", ds4::quant::Isa::detect());
            println!("{}", KernelBench::CSV_HEADER);
            for r in bench_kernels(&cfg) {
                println!("{}", r.csv_row());
            }
        }
    }
    Ok(())
}
