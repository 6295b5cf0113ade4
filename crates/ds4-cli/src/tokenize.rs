//! `ds4 tokenize` / `ds4 detokenize`: the engine's tokenizer on the command line.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use ds4::gguf::GgufFile;
use ds4::tokenizer::{EncodeMode, Tokenizer};

/// The model file used when `-m` is not given.
const DEFAULT_MODEL: &str = "./ds4flash.gguf";

/// The DeepSeek V4 tokenizer shipped with the sources, so that tokenizing works without a
/// model file (identical vocabulary and merges to the model GGUF's).
static EMBEDDED_TOKENIZER: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data/ds4-tokenizer.gguf"
));

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    /// Every added token string becomes its id (HF `encode`).
    Hf,
    /// No special strings are recognised.
    Plain,
    /// Only the seven chat-structure specials are recognised (ds4 rendered prompts).
    Render,
}

impl From<ModeArg> for EncodeMode {
    fn from(m: ModeArg) -> EncodeMode {
        match m {
            ModeArg::Hf => EncodeMode::Hf,
            ModeArg::Plain => EncodeMode::Plain,
            ModeArg::Render => EncodeMode::Render,
        }
    }
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// GGUF file holding the tokenizer (a model file or a tokenizer-only GGUF)
    /// [default: ./ds4flash.gguf, else the built-in DeepSeek V4 tokenizer]
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Which special-token strings in the text become special ids
    #[arg(long, value_enum, default_value = "render")]
    mode: ModeArg,
    /// Read JSON lines of {"text": ...} from FILE (`-` = stdin) and print one id array per
    /// line, instead of tokenizing all of stdin as one text
    #[arg(long, value_name = "FILE")]
    jsonl: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DetokenizeArgs {
    /// GGUF file holding the tokenizer
    /// [default: ./ds4flash.gguf, else the built-in DeepSeek V4 tokenizer]
    #[arg(short, long)]
    model: Option<PathBuf>,
}

/// Load the tokenizer from `-m`, the default model file, or the built-in copy.
fn load(model: Option<&Path>) -> Result<Tokenizer> {
    let (path, explicit) = match model {
        Some(p) => (p, true),
        None => (Path::new(DEFAULT_MODEL), false),
    };
    if !explicit && !path.exists() {
        eprintln!(
            "note: {DEFAULT_MODEL} not found; using the built-in DeepSeek V4 tokenizer \
             (data/ds4-tokenizer.gguf)"
        );
        let file =
            GgufFile::from_bytes(EMBEDDED_TOKENIZER.to_vec()).context("built-in tokenizer GGUF")?;
        return Tokenizer::from_gguf(&file).context("built-in tokenizer");
    }
    if !path.exists() {
        bail!("model file {} does not exist", path.display());
    }
    let file = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    Tokenizer::from_gguf(&file).with_context(|| format!("tokenizer in {}", path.display()))
}

pub fn tokenize(args: TokenizeArgs) -> Result<()> {
    let tok = load(args.model.as_deref())?;
    let mode = EncodeMode::from(args.mode);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match &args.jsonl {
        None => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("reading stdin")?;
            let text = String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "stdin is not valid UTF-8 (first bad byte at offset {})",
                    e.utf8_error().valid_up_to()
                )
            })?;
            writeln!(out, "{}", serde_json::to_string(&tok.encode(&text, mode))?)?;
        }
        Some(path) => {
            let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
                Box::new(std::io::BufReader::new(std::io::stdin()))
            } else {
                let f = std::fs::File::open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                Box::new(std::io::BufReader::new(f))
            };
            for (n, line) in reader.lines().enumerate() {
                let line = line.with_context(|| format!("{}: line {}", path.display(), n + 1))?;
                if line.trim().is_empty() {
                    continue;
                }
                let value: serde_json::Value = serde_json::from_str(&line)
                    .with_context(|| format!("{}: line {}: bad JSON", path.display(), n + 1))?;
                let Some(text) = value.get("text").and_then(|t| t.as_str()) else {
                    bail!(
                        "{}: line {}: expected an object with a string field \"text\"",
                        path.display(),
                        n + 1
                    );
                };
                writeln!(out, "{}", serde_json::to_string(&tok.encode(text, mode))?)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

pub fn detokenize(args: DetokenizeArgs) -> Result<()> {
    let tok = load(args.model.as_deref())?;
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading stdin")?;
    let values: Vec<serde_json::Value> = serde_json::from_str(&input)
        .context("stdin must be a JSON array of token ids, e.g. [0, 128803, 30594]")?;
    let mut ids = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let id = v
            .as_u64()
            .filter(|&id| id < tok.vocab_size() as u64)
            .with_context(|| {
                format!(
                    "element {i} ({v}) is not a token id in 0..{} (vocabulary size)",
                    tok.vocab_size()
                )
            })?;
        ids.push(id as u32);
    }
    // Raw bytes: a token sequence may end inside a UTF-8 character, and the exact bytes are
    // what round-trips.
    let mut out = std::io::stdout().lock();
    out.write_all(&tok.decode(&ids))?;
    out.flush()?;
    Ok(())
}
