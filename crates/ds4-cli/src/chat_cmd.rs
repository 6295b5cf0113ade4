//! `ds4 render` and `ds4 parse`: the chat module over stdin/stdout, so prompts and parses can
//! be checked against the official encoder (or scripted) without a model.

use std::io::{Read, Write};

use clap::{Args, ValueEnum};
use ds4::chat::{self, EncoderCall, ThinkingMode};

/// Reads `{"messages": [...], "kwargs": {...}}` (a recorded `encode_messages` call) on stdin
/// and prints the rendered prompt exactly, without a trailing newline.
#[derive(Args, Debug)]
pub struct RenderArgs {}

/// Reads a completion (the text after the prompt's `<think>` / `</think>`) on stdin and prints
/// the parsed assistant message as JSON, or fails like the official parser.
#[derive(Args, Debug)]
pub struct ParseArgs {
    /// The thinking mode the completion was generated in.
    #[arg(long, value_enum)]
    mode: Mode,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Chat,
    Thinking,
}

/// Prints `error` as one line on stderr and exits with status 1 (the contract for scripts:
/// stdout holds a result only on success).
fn fail(command: &str, error: impl std::fmt::Display) -> ! {
    eprintln!("ds4 {command}: {error}");
    std::process::exit(1)
}

fn read_stdin(command: &str) -> String {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        fail(command, format_args!("cannot read stdin as UTF-8: {e}"));
    }
    input
}

pub fn render(_args: RenderArgs) -> anyhow::Result<()> {
    let input = read_stdin("render");
    let call: EncoderCall = serde_json::from_str(&input)
        .unwrap_or_else(|e| fail("render", format_args!("invalid encoder call: {e}")));
    let prompt = call.render().unwrap_or_else(|e| fail("render", e));
    let mut out = std::io::stdout().lock();
    out.write_all(prompt.text.as_bytes())?;
    out.flush()?;
    Ok(())
}

pub fn parse(args: ParseArgs) -> anyhow::Result<()> {
    let text = read_stdin("parse");
    let mode = match args.mode {
        Mode::Chat => ThinkingMode::Chat,
        Mode::Thinking => ThinkingMode::Thinking,
    };
    match chat::parse_completion(&text, mode) {
        Ok(message) => {
            println!("{}", serde_json::to_string(&message)?);
            Ok(())
        }
        // The message quotes model output (newlines included): print it as a JSON string so
        // the report stays on one line.
        Err(e) => fail(
            "parse",
            format_args!(
                "{}: {}",
                e.python_type(),
                serde_json::to_string(&e.to_string())?
            ),
        ),
    }
}
