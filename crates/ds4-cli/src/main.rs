//! `ds4`: command line for the DeepSeek V4 Flash engine.

mod bench;
mod synth;

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
    /// Writes a synthetic model (random weights, exact ds4 layout).
    Synth(synth::SynthArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Synth(args) => synth::run(args),
    }
}
