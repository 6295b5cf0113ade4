//! `ds4 bench`: walks a fixed text to each context frontier and prints one CSV row per
//! frontier, like ds4-bench (protocol.md §6.3): the prefill speed of the new interval, the
//! greedy decode speed at that frontier, and the KV state size.

use std::io::Write as _;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use ds4::model::{BackendChoice, EngineOptions, Model, Session};
use ds4::tokenizer::EncodeMode;

use crate::load::{load_model, prepare_backend, ModelArgs};

#[derive(Args, Debug)]
pub struct ModelBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// First context frontier.
    #[arg(long, default_value_t = 2048)]
    pub ctx_start: usize,
    /// Last context frontier.
    #[arg(long, default_value_t = 32768)]
    pub ctx_max: usize,
    /// Distance between frontiers (used when --step-mul is 1).
    #[arg(long, default_value_t = 2048)]
    pub step_incr: usize,
    /// Geometric frontiers: each is the previous one times F, rounded up (at least +1);
    /// e.g. `--ctx-start 2048 --ctx-max 65536 --step-mul 2` measures 2k, 4k, ..., 64k.
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    pub step_mul: f64,
    /// Context allocated for the session (default: ctx-max + gen-tokens + 1); must exceed
    /// ctx-max + gen-tokens.
    #[arg(long, value_name = "N")]
    pub ctx_alloc: Option<usize>,
    /// Write the CSV to FILE instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<std::path::PathBuf>,
    /// Greedy tokens decoded at each frontier.
    #[arg(
        long = "gen-tokens",
        visible_alias = "tokens",
        short = 'n',
        default_value_t = 128
    )]
    pub gen_tokens: usize,
    /// Text to walk (plain BPE, no BOS); default: a built-in English text, repeated.
    #[arg(long, value_name = "FILE", conflicts_with = "chat_prompt_file")]
    pub prompt_file: Option<std::path::PathBuf>,
    /// Text to walk, rendered as one non-thinking user message after the system prompt.
    #[arg(long, value_name = "FILE")]
    pub chat_prompt_file: Option<std::path::PathBuf>,
    /// System prompt of --chat-prompt-file.
    #[arg(
        short = 's',
        long = "system",
        default_value = "You are a helpful assistant."
    )]
    pub system: String,
    /// Exact numerics instead of production numerics.
    #[arg(long)]
    pub exact: bool,
}

/// Built-in text: varied English prose so BPE yields realistic token lengths.
const TEXT: &str = "The history of computing is a story of layers. Each generation of engineers \
built on the abstractions of the last, hiding complexity behind interfaces that were simpler to \
use than the machinery beneath them. Vacuum tubes gave way to transistors, transistors to \
integrated circuits, and integrated circuits to processors with billions of switches. Software \
followed the same path: machine code, assemblers, compilers, operating systems, libraries and \
frameworks. Today a language model can read a repository, propose a change, run the tests and \
explain what failed, all on a workstation under a desk. Whether that is progress depends on what \
we ask of it, how carefully we check its work, and whether the data stays where it belongs. ";

/// The context frontiers: start, then +incr (or ×mul rounded up, at least +1), capped at max.
fn frontiers(start: usize, max: usize, incr: usize, mul: f64) -> Vec<usize> {
    let mut out = vec![start];
    let mut f = start;
    while f < max {
        f = if mul > 1.0 {
            ((f as f64 * mul).ceil() as usize).max(f + 1)
        } else {
            f + incr
        }
        .min(max);
        out.push(f);
    }
    out
}

pub fn run(args: ModelBenchArgs) -> Result<()> {
    if args.ctx_start == 0 || args.ctx_max < args.ctx_start || args.step_incr == 0 {
        bail!("need 0 < --ctx-start <= --ctx-max and --step-incr > 0");
    }
    if !(args.step_mul >= 1.0 && args.step_mul.is_finite()) {
        bail!("--step-mul must be a number >= 1 (got {})", args.step_mul);
    }
    let ctx = args.ctx_alloc.unwrap_or(args.ctx_max + args.gen_tokens + 1);
    if ctx <= args.ctx_max + args.gen_tokens {
        bail!(
            "--ctx-alloc {ctx} must exceed --ctx-max + --gen-tokens ({})",
            args.ctx_max + args.gen_tokens
        );
    }
    let mut csv: Box<dyn std::io::Write> = match &args.csv {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", p.display()))?,
        )),
        None => Box::new(std::io::stdout()),
    };
    let model = load_model(&args.model)?;
    let tok = ds4::tokenizer::Tokenizer::from_gguf(&model.file)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    let ids = match &args.chat_prompt_file {
        Some(p) => {
            // One non-thinking user turn, as ds4-bench renders it (protocol.md §6.3).
            let sp = tok.specials();
            let mut ids = vec![sp.bos];
            ids.extend(tok.encode(&args.system, EncodeMode::Plain));
            ids.push(sp.user);
            ids.extend(tok.encode(&crate::load::read_text(p)?, EncodeMode::Plain));
            ids.push(sp.assistant);
            ids.push(sp.think_close);
            if ids.len() < args.ctx_max {
                bail!(
                    "{} renders to {} tokens, fewer than --ctx-max {}",
                    p.display(),
                    ids.len(),
                    args.ctx_max
                );
            }
            ids.truncate(args.ctx_max);
            ids
        }
        None => {
            let text = match &args.prompt_file {
                Some(p) => crate::load::read_text(p)?,
                None => TEXT.to_string(),
            };
            let unit = tok.encode(&text, EncodeMode::Plain);
            if unit.is_empty() {
                bail!("the benchmark text has no tokens");
            }
            // A short file is walked repeatedly, so any --ctx-max can be measured.
            let mut ids = Vec::with_capacity(args.ctx_max);
            while ids.len() < args.ctx_max {
                ids.extend_from_slice(&unit);
            }
            ids.truncate(args.ctx_max);
            ids
        }
    };
    let mut opts = if args.exact {
        EngineOptions::exact(true)
    } else {
        EngineOptions::production()
    };
    opts.backend = prepare_backend(&model, args.model.backend)?;
    // As the server does at startup: the process's GPU first-use costs (~0.14 s on the full
    // model) stay out of the first frontier's prefill figure.
    if let Some(took) = Session::warm_up(model.clone(), &opts)? {
        eprintln!("ds4: GPU warmed up ({:.2} s, untimed)", took.as_secs_f64());
    }
    let mut session = Session::new(model.clone(), opts.clone().with_ctx(ctx))?;
    let eos = tok.specials().eos as usize;
    writeln!(
        csv,
        "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes"
    )?;
    csv.flush()?;
    for frontier in frontiers(args.ctx_start, args.ctx_max, args.step_incr, args.step_mul) {
        let from = session.pos();
        let t0 = Instant::now();
        session.prefill(&ids[from..frontier])?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let snapshot = session.snapshot();
        let t1 = Instant::now();
        for _ in 0..args.gen_tokens {
            // Greedy, never EOS: the benchmark always decodes the full count. The device's
            // argmax serves unless it is EOS; then the host scans the row without it.
            let mut best = session.argmax() as usize;
            if best == eos {
                let logits = session.logits();
                best = if eos == 0 { 1 } else { 0 };
                for (i, &l) in logits.iter().enumerate() {
                    if i != eos && l > logits[best] {
                        best = i;
                    }
                }
            }
            session.decode(best as u32)?;
        }
        let gen_secs = t1.elapsed().as_secs_f64();
        let row = format!(
            "{},{},{:.2},{},{:.2},{}",
            frontier,
            frontier - from,
            (frontier - from) as f64 / prefill_secs.max(1e-9),
            args.gen_tokens,
            args.gen_tokens as f64 / gen_secs.max(1e-9),
            snapshot.len()
        );
        writeln!(csv, "{row}")?;
        if args.csv.is_some() {
            // The file gets the CSV; the terminal still sees progress.
            eprintln!("{row}");
        }
        if opts.backend == BackendChoice::Cuda {
            gpu_line(
                &model,
                frontier,
                args.gen_tokens as f64 / gen_secs.max(1e-9),
            );
        }
        csv.flush()?;
        session = Session::restore(model.clone(), opts.clone().with_ctx(ctx), &snapshot)?;
    }
    Ok(())
}

/// The GPU figures ds4-bench's CSV has no column for, as a `#` line on stderr: weight
/// bandwidth of decode (bytes of weights one step reads × tokens/s), its fraction of the card's
/// datasheet peak, and the device memory in use.
fn gpu_line(model: &Model, frontier: usize, gen_tps: f64) {
    // The model is already resident (prepare_backend uploaded it), so this is a lookup.
    let Ok(gm) = model.upload_cuda(&mut |_, _| {}) else {
        return;
    };
    let gbs = gm.bytes_per_token as f64 * gen_tps / 1e9;
    let peak = gm
        .backend()
        .info()
        .peak_bandwidth_gbs()
        .map_or(String::new(), |p| {
            format!(
                " = {:.0}% of the {p:.0} GB/s datasheet peak",
                gbs / p * 100.0
            )
        });
    let mem = gm
        .backend()
        .mem_info()
        .map_or(String::new(), |(free, total)| {
            format!(
                "; GPU memory in use {:.1} of {:.1} GiB",
                (total - free) as f64 / 1073741824.0,
                total as f64 / 1073741824.0
            )
        });
    eprintln!(
        "# ctx {frontier}: decode reads {:.2} GB of weights per token, {gbs:.0} GB/s{peak}{mem}",
        gm.bytes_per_token as f64 / 1e9
    );
}

#[cfg(test)]
mod tests {
    use super::frontiers;

    #[test]
    fn frontiers_step_by_increment_or_factor_and_stop_at_max() {
        assert_eq!(frontiers(2048, 6144, 2048, 1.0), vec![2048, 4096, 6144]);
        assert_eq!(frontiers(2048, 5000, 2048, 1.0), vec![2048, 4096, 5000]);
        assert_eq!(
            frontiers(2048, 65536, 2048, 2.0),
            vec![2048, 4096, 8192, 16384, 32768, 65536]
        );
        // A factor too small to move still advances by one token.
        assert_eq!(frontiers(3, 5, 1, 1.1), vec![3, 4, 5]);
        assert_eq!(frontiers(7, 7, 1, 2.0), vec![7]);
    }
}
