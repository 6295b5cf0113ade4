//! `ds4-server`: OpenAI and Anthropic compatible HTTP API over the ds4 engine.

fn main() {
    eprintln!("ds4-server: not implemented yet");
    std::process::exit(2);
}
