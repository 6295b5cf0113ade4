//! `ds4 logits`: run token ids through a session and write the logits of every position as
//! a `.npy` file (float32, shape `(n_tokens, vocab)`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ds4::model::{EngineOptions, Model, Session};

#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Model file (GGUF).
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// JSON file holding an array of token ids.
    #[arg(long)]
    pub tokens: PathBuf,
    /// Output `.npy` file: float32 logits, one row per position.
    #[arg(long)]
    pub out: PathBuf,
    /// Prefill chunk size (default: the whole prefill in one call).
    #[arg(long)]
    pub chunk: Option<usize>,
    /// Feed the last K ids one at a time through decode instead of prefill.
    #[arg(long, default_value_t = 0)]
    pub decode_last: usize,
    /// Exact mode: f32 activations and f32 stored rows (the golden-fixture numerics).
    #[arg(long)]
    pub exact: bool,
    /// Turn the FP8/FP4 QAT simulations off (they are on by default).
    #[arg(long)]
    pub no_qat_sim: bool,
    /// Context size in tokens (default: the model's context length).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(args: LogitsArgs) -> Result<()> {
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .context("setting up the thread pool")?;
    }
    let ids = read_ids(&args.tokens)?;
    if args.decode_last > ids.len() {
        bail!(
            "--decode-last {} exceeds the {} token ids",
            args.decode_last,
            ids.len()
        );
    }
    if args.chunk == Some(0) {
        bail!("--chunk must be positive");
    }
    let model = Arc::new(Model::open(&args.model).map_err(anyhow::Error::msg)?);
    let vocab = model.cfg.n_vocab;
    let opts = EngineOptions {
        exact: args.exact,
        qat_sim: !args.no_qat_sim,
        ctx: args.ctx,
        ..EngineOptions::production()
    };
    let mut session = Session::new(model, opts)?;
    let split = ids.len() - args.decode_last;
    let mut logits = Vec::with_capacity(ids.len() * vocab);
    let (prefill, decode) = ids.split_at(split);
    for chunk in prefill.chunks(args.chunk.unwrap_or(prefill.len()).max(1)) {
        logits.extend(session.prefill_logits(chunk)?);
    }
    for &t in decode {
        session.decode(t)?;
        logits.extend_from_slice(session.logits());
    }
    write_npy(&args.out, &logits, ids.len(), vocab)
        .with_context(|| format!("writing {}", args.out.display()))
}

fn read_ids(path: &PathBuf) -> Result<Vec<u32>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON array of token ids (non-negative integers)",
            path.display()
        )
    })
}

/// Writes a standard NPY v1.0 file: `<f4`, C order, shape `(rows, cols)`.
fn write_npy(path: &PathBuf, data: &[f32], rows: usize, cols: usize) -> Result<()> {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6) + version (2) + length (2) + header, padded with spaces to a multiple of 64
    // and ended by a newline.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = Vec::with_capacity(total + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    data.iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    let mut f = std::fs::File::create(path)?;
    f.write_all(&out)?;
    Ok(())
}
