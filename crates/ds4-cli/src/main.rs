//! `ds4`: command line for the DeepSeek V4 Flash engine.
//!
//! Without a subcommand it generates: `ds4 -p "..."` answers once, `ds4` alone starts an
//! interactive chat. Subcommands expose the engine's parts (tokenizer, chat template, logits,
//! synthetic models, benchmarks).

mod bench;
mod bench_model;
mod chat_cmd;
mod cuda_cmd;
mod generate;
mod load;
mod logits;
mod synth;
mod tokenize;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ds4",
    version,
    about = "DeepSeek V4 Flash inference engine",
    long_about = "DeepSeek V4 Flash inference engine.\n\n\
        ds4 -p \"question\"        answer once (streams tokens; thinking shown in grey)\n\
        ds4                        interactive chat that keeps its context between turns\n\
        ds4 --synthetic demo -p hi run on a random-weight model (no download needed)\n\n\
        The model defaults to ./ds4flash.gguf (the published ds4 q2/q4 GGUF files).",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: generate::RunArgs,
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
    /// Writes a synthetic model (random weights, exact ds4 layout).
    Synth(synth::SynthArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        None => generate::run(cli.run),
        Some(Command::Bench(args)) => bench::run(args),
        Some(Command::Logits(args)) => logits::run(args),
        Some(Command::Tokenize(args)) => tokenize::tokenize(args),
        Some(Command::Detokenize(args)) => tokenize::detokenize(args),
        Some(Command::Render(args)) => chat_cmd::render(args),
        Some(Command::Parse(args)) => chat_cmd::parse(args),
        Some(Command::Cuda(args)) => cuda_cmd::run(args),
        Some(Command::Synth(args)) => synth::run(args),
    };
    if let Err(e) = result {
        eprintln!("ds4: error: {e:#}");
        std::process::exit(1);
    }
}
