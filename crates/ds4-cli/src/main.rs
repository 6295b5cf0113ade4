//! `ds4`: command line for the DeepSeek V4 Flash engine.

mod bench;
mod tokenize;

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
    /// Tokenize text from stdin and print the token ids as a JSON array
    Tokenize(tokenize::TokenizeArgs),
    /// Read a JSON array of token ids from stdin and write the text they stand for
    Detokenize(tokenize::DetokenizeArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Tokenize(args) => tokenize::tokenize(args),
        Command::Detokenize(args) => tokenize::detokenize(args),
    }
}
