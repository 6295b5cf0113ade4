//! `ds4`: command line for the DeepSeek V4 Flash engine.

mod bench;
mod cuda_cmd;
mod logits;
mod tokenize;

use clap::{Parser, Subcommand};

mod chat_cmd;

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
    /// Run token ids through the model and write every position's logits as .npy
    Logits(logits::LogitsArgs),
    /// Tokenize text from stdin and print the token ids as a JSON array
    Tokenize(tokenize::TokenizeArgs),
    /// Read a JSON array of token ids from stdin and write the text they stand for
    Detokenize(tokenize::DetokenizeArgs),
    /// Render an encoder call (JSON on stdin) to the exact prompt text.
    Render(chat_cmd::RenderArgs),
    /// Parse a completion (stdin) into an assistant message (JSON).
    Parse(chat_cmd::ParseArgs),
    /// CUDA backend: device info, kernel self-test, kernel benchmarks.
    Cuda(cuda_cmd::CudaArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Tokenize(args) => tokenize::tokenize(args),
        Command::Detokenize(args) => tokenize::detokenize(args),
        Command::Render(args) => chat_cmd::render(args),
        Command::Parse(args) => chat_cmd::parse(args),
        Command::Cuda(args) => cuda_cmd::run(args),
    }
}
