//! `ds4 bench`: walks a fixed text to each context frontier and prints one CSV row per
//! frontier, like ds4-bench (protocol.md §6.3): the prefill speed of the new interval, the
//! greedy decode speed at that frontier, and the KV state size.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use ds4::model::{EngineOptions, Session};
use ds4::tokenizer::EncodeMode;

use crate::load::{load_model, ModelArgs};

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
    /// Distance between frontiers.
    #[arg(long, default_value_t = 2048)]
    pub step_incr: usize,
    /// Greedy tokens decoded at each frontier.
    #[arg(
        long = "gen-tokens",
        visible_alias = "tokens",
        short = 'n',
        default_value_t = 128
    )]
    pub gen_tokens: usize,
    /// Text to walk (plain BPE, no BOS); default: a built-in English text, repeated.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<std::path::PathBuf>,
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

pub fn run(args: ModelBenchArgs) -> Result<()> {
    if args.ctx_start == 0 || args.ctx_max < args.ctx_start || args.step_incr == 0 {
        bail!("need 0 < --ctx-start <= --ctx-max and --step-incr > 0");
    }
    let model = load_model(&args.model)?;
    let tok = ds4::tokenizer::Tokenizer::from_gguf(&model.file)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    let text = match &args.prompt_file {
        Some(p) => crate::load::read_text(p)?,
        None => TEXT.to_string(),
    };
    let unit = tok.encode(&text, EncodeMode::Plain);
    if unit.is_empty() {
        bail!("the benchmark text has no tokens");
    }
    let mut ids = Vec::with_capacity(args.ctx_max);
    while ids.len() < args.ctx_max {
        ids.extend_from_slice(&unit);
    }
    ids.truncate(args.ctx_max);
    let ctx = args.ctx_max + args.gen_tokens + 1;
    let opts = if args.exact {
        EngineOptions::exact(true)
    } else {
        EngineOptions::production()
    };
    let mut session = Session::new(model.clone(), opts.clone().with_ctx(ctx))?;
    let eos = tok.specials().eos as usize;
    println!("ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes");
    let mut frontier = args.ctx_start;
    loop {
        let from = session.pos();
        let t0 = Instant::now();
        session.prefill(&ids[from..frontier])?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let snapshot = session.snapshot();
        let t1 = Instant::now();
        for _ in 0..args.gen_tokens {
            // Greedy, never EOS: the benchmark always decodes the full count.
            let logits = session.logits();
            let mut best = if eos == 0 { 1 } else { 0 };
            for (i, &l) in logits.iter().enumerate() {
                if i != eos && l > logits[best] {
                    best = i;
                }
            }
            session.decode(best as u32)?;
        }
        let gen_secs = t1.elapsed().as_secs_f64();
        println!(
            "{},{},{:.2},{},{:.2},{}",
            frontier,
            frontier - from,
            (frontier - from) as f64 / prefill_secs.max(1e-9),
            args.gen_tokens,
            args.gen_tokens as f64 / gen_secs.max(1e-9),
            snapshot.len()
        );
        session = Session::restore(model.clone(), opts.clone().with_ctx(ctx), &snapshot)?;
        if frontier >= args.ctx_max {
            break;
        }
        frontier = (frontier + args.step_incr).min(args.ctx_max);
    }
    Ok(())
}
