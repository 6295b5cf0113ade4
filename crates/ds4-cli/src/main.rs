//! `ds4`: command line for the DeepSeek V4 Flash engine.

mod bench;
mod cuda_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ds4", version, about = "DeepSeek V4 Flash inference engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Performance measurements.
    Bench(bench::BenchArgs),
    /// CUDA backend: device info, kernel self-test, kernel benchmarks.
    Cuda(cuda_cmd::CudaArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Cuda(args) => cuda_cmd::run(args),
    }
}
