//! `ds4`: command line for the DeepSeek V4 Flash engine.

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
    /// Render an encoder call (JSON on stdin) to the exact prompt text.
    Render(chat_cmd::RenderArgs),
    /// Parse a completion (stdin) into an assistant message (JSON).
    Parse(chat_cmd::ParseArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Render(args) => chat_cmd::render(args),
        Command::Parse(args) => chat_cmd::parse(args),
    }
}
