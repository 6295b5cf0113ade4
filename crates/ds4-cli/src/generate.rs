//! `ds4` without a subcommand: one-shot generation (`-p`), interactive multi-turn chat,
//! `--dump-tokens` and `--dump-logprobs` (protocol.md §2.8, §6.1, §6.5, §6.6).
//!
//! Prompts are built at token level as ds4 does: BOS, [Think Max prefix], [system text],
//! `<｜User｜>`, the user text (plain BPE: special-token strings typed by the user stay
//! text), `<｜Assistant｜>`, then `<think>` or `</think>`. Interactive chat keeps one session
//! and appends each turn, so earlier turns are never recomputed.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use ds4::model::{EngineOptions, Model, Session};
use ds4::sample::{logprobs, Sampler, SamplerConfig};
use ds4::tokenizer::{EncodeMode, Tokenizer};

use crate::load::{load_model, prepare_backend, print_memory_plan, read_text, ModelArgs};

/// Prefix rendered after BOS in Think Max mode (protocol.md §2.1).
const THINK_MAX_PREFIX: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";
/// Think Max needs room to think; below this context it falls back to normal thinking.
const THINK_MAX_MIN_CTX: usize = 393_216;

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt for one-shot generation (omit for an interactive chat).
    #[arg(short = 'p', long, value_name = "TEXT", conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the one-shot prompt from a file.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// System prompt ("" disables it).
    #[arg(
        long = "system",
        visible_alias = "sys",
        default_value = "You are a helpful assistant"
    )]
    pub system: String,
    /// Context size in tokens (up to 1048576; memory is allocated as the context fills).
    #[arg(short = 'c', long, default_value_t = 32768)]
    pub ctx: usize,
    /// Most tokens to generate per answer (clamped to the free context).
    #[arg(short = 'n', long = "tokens", default_value_t = 50000)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long = "temp", default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Keep only the K most likely tokens (0 = no cap).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Random seed (0 = from the clock); a fixed seed reproduces a run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Thinking mode (the default): the model reasons inside <think>...</think> first.
    #[arg(long, conflicts_with_all = ["nothink", "think_max"])]
    pub think: bool,
    /// Answer directly, without reasoning.
    #[arg(long)]
    pub nothink: bool,
    /// Maximum reasoning effort (needs --ctx >= 393216, else normal thinking).
    #[arg(long)]
    pub think_max: bool,
    /// Print the prompt's token ids and vocabulary strings, then exit (no weights needed
    /// beyond the tokenizer). Special-token strings in the text are recognised.
    #[arg(long)]
    pub dump_tokens: bool,
    /// Greedy-decode the prompt's answer and write every step's top alternatives as JSON.
    #[arg(long, value_name = "FILE")]
    pub dump_logprobs: Option<PathBuf>,
    /// Alternatives per step for --dump-logprobs (max 128).
    #[arg(long, default_value_t = 20)]
    pub logprobs_top_k: usize,
    /// Exact numerics (f32 activations and KV rows) instead of ds4's production numerics.
    #[arg(long)]
    pub exact: bool,
    /// Turn off the FP8 KV / FP4 indexer QAT simulations.
    #[arg(long)]
    pub no_qat_sim: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    NoThink,
    Think,
    ThinkMax,
}

/// Set by Ctrl+C; generation and prefill poll it and stop, the program does not exit.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn run(args: RunArgs) -> Result<()> {
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(read_text(f)?),
        (None, None) => None,
    };
    if args.dump_tokens {
        let Some(text) = prompt else {
            bail!("--dump-tokens needs -p or --prompt-file");
        };
        return dump_tokens(&args.model, &text);
    }
    if args.ctx == 0 || args.ctx > 1 << 20 {
        bail!("--ctx must be between 1 and 1048576");
    }
    let model = load_model(&args.model)?;
    let tok = Tokenizer::from_gguf(&model.file).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    print_memory_plan(&model, args.ctx);
    let backend = prepare_backend(&model, args.model.backend)?;
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
        .context("installing the Ctrl+C handler")?;
    let mut mode = if args.nothink {
        Mode::NoThink
    } else if args.think_max {
        Mode::ThinkMax
    } else {
        Mode::Think
    };
    if mode == Mode::ThinkMax && args.ctx < THINK_MAX_MIN_CTX {
        eprintln!("ds4: --think-max needs --ctx >= {THINK_MAX_MIN_CTX}; using normal thinking");
        mode = Mode::Think;
    }
    let mut chat = Chat::new(model, tok, &args, mode, backend)?;
    match prompt {
        Some(text) => {
            if let Some(path) = &args.dump_logprobs {
                return chat.dump_logprobs(&text, path, args.logprobs_top_k.min(128));
            }
            chat.turn(&text)?;
            Ok(())
        }
        None if args.dump_logprobs.is_some() => bail!("--dump-logprobs needs -p or --prompt-file"),
        None => chat.interactive(),
    }
}

/// `--dump-tokens`: rendered-chat tokenization of the text as written (protocol.md §6.5).
fn dump_tokens(margs: &ModelArgs, text: &str) -> Result<()> {
    let tok = if margs.synthetic.is_some() {
        let model = load_model(margs)?;
        Tokenizer::from_gguf(&model.file)
    } else {
        Tokenizer::from_gguf_path(&margs.model)
    }
    .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    let ids = tok.encode(text, EncodeMode::Render);
    let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    println!("[{}]", list.join(", "));
    for id in ids {
        println!("{id:>6}  {}", tok.token_str(id).unwrap_or("?"));
    }
    Ok(())
}

/// One conversation: the session and everything needed to extend it turn by turn.
struct Chat {
    model: Arc<Model>,
    tok: Tokenizer,
    session: Session,
    opts: EngineOptions,
    sampler_cfg: SamplerConfig,
    system: String,
    mode: Mode,
    max_tokens: usize,
    ctx: usize,
}

impl Chat {
    fn new(
        model: Arc<Model>,
        tok: Tokenizer,
        args: &RunArgs,
        mode: Mode,
        backend: ds4::model::BackendChoice,
    ) -> Result<Chat> {
        let mut opts = if args.exact {
            EngineOptions::exact(!args.no_qat_sim)
        } else {
            EngineOptions::production()
        };
        opts.qat_sim = !args.no_qat_sim;
        opts.backend = backend;
        opts = opts.with_ctx(args.ctx);
        let session = Session::new(model.clone(), opts.clone())?;
        Ok(Chat {
            model,
            tok,
            session,
            opts,
            sampler_cfg: SamplerConfig {
                temperature: args.temperature,
                top_k: args.top_k,
                top_p: args.top_p,
                min_p: args.min_p,
                seed: args.seed,
            },
            system: args.system.clone(),
            mode,
            max_tokens: args.max_tokens,
            ctx: args.ctx,
        })
    }

    /// Tokens that open a conversation: BOS, Think Max prefix, system text.
    fn preamble(&self) -> Vec<u32> {
        let mut ids = vec![self.tok.specials().bos];
        if self.mode == Mode::ThinkMax {
            ids.extend(self.tok.encode(THINK_MAX_PREFIX, EncodeMode::Plain));
        }
        if !self.system.is_empty() {
            ids.extend(self.tok.encode(&self.system, EncodeMode::Plain));
        }
        ids
    }

    /// Tokens of one user turn up to the generation prefix.
    fn user_turn(&self, text: &str) -> Vec<u32> {
        let sp = self.tok.specials();
        let mut ids = vec![sp.user];
        ids.extend(self.tok.encode(text, EncodeMode::Plain));
        ids.push(sp.assistant);
        ids.push(if self.mode == Mode::NoThink {
            sp.think_close
        } else {
            sp.think_open
        });
        ids
    }

    /// Prefills `ids` with a progress line for long prompts; Ctrl+C cancels.
    fn prefill(&mut self, ids: &[u32]) -> Result<bool> {
        let started = Instant::now();
        let show = ids.len() >= 512 && std::io::stderr().is_terminal();
        let total = ids.len();
        let result = self.session.prefill_with(ids, &mut |done, _| {
            if show {
                eprint!(
                    "\rds4: processing {total} input tokens: {done}/{total} ({}%)",
                    done * 100 / total.max(1)
                );
            }
            !INTERRUPTED.load(Ordering::SeqCst)
        });
        if show {
            eprintln!();
        }
        match result {
            Ok(()) => {
                let secs = started.elapsed().as_secs_f64();
                if total >= 64 {
                    eprintln!(
                        "ds4: prefill: {:.2} t/s ({total} tokens)",
                        total as f64 / secs
                    );
                }
                Ok(true)
            }
            Err(ds4::model::SessionError::Cancelled { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs one user turn: prefill, then sample and stream the answer.
    fn turn(&mut self, text: &str) -> Result<()> {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let mut ids = Vec::new();
        if self.session.pos() == 0 {
            ids.extend(self.preamble());
        } else {
            // Close the previous answer: EOS is never evaluated when sampled (protocol.md
            // §1.7), so the next turn starts by feeding it.
            ids.push(self.tok.specials().eos);
        }
        ids.extend(self.user_turn(text));
        let free = self.ctx.saturating_sub(self.session.pos());
        if ids.len() >= free {
            bail!(
                "the prompt needs {} tokens but only {free} of the {}-token context are free (use /ctx N or --ctx)",
                ids.len(),
                self.ctx
            );
        }
        if !self.prefill(&ids)? {
            eprintln!("\nds4: interrupted");
            return Ok(());
        }
        self.generate()
    }

    /// Samples until EOS, the token budget, the context end or Ctrl+C.
    fn generate(&mut self) -> Result<()> {
        let sp = *self.tok.specials();
        let mut sampler = Sampler::new(self.sampler_cfg);
        let mut dec = self.tok.stream_decoder();
        let mut out = std::io::stdout().lock();
        let tty = std::io::stdout().is_terminal();
        let budget = self
            .max_tokens
            .min(self.ctx.saturating_sub(self.session.pos() + 1));
        let in_think = self.mode != Mode::NoThink;
        if in_think && tty {
            write!(out, "\x1b[90m")?;
        }
        let started = Instant::now();
        let mut n = 0usize;
        let mut thinking = in_think;
        while n < budget {
            if INTERRUPTED.load(Ordering::SeqCst) {
                eprintln!("\nds4: interrupted");
                break;
            }
            let id = self.session.sample(&mut sampler);
            n += 1;
            if id == sp.eos {
                break;
            }
            if thinking && id == sp.think_close {
                thinking = false;
                if tty {
                    write!(out, "\x1b[0m")?;
                }
                writeln!(out)?;
            } else {
                write!(out, "{}", dec.push(&self.tok, id))?;
            }
            out.flush()?;
            self.session.decode(id)?;
        }
        write!(out, "{}", dec.flush())?;
        if tty && thinking {
            write!(out, "\x1b[0m")?;
        }
        writeln!(out)?;
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "ds4: generation: {:.2} t/s ({n} tokens)",
            n as f64 / secs.max(1e-9)
        );
        Ok(())
    }

    /// Interactive multi-turn chat on stdin.
    fn interactive(&mut self) -> Result<()> {
        eprintln!("ds4: interactive chat; /help for commands, Ctrl+C stops an answer, /quit exits");
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        loop {
            eprint!("ds4> ");
            std::io::stderr().flush()?;
            let Some(line) = lines.next() else {
                eprintln!();
                return Ok(());
            };
            let line = line.context("reading stdin")?;
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(cmd) = line.strip_prefix('/') {
                if !self.command(cmd)? {
                    return Ok(());
                }
                continue;
            }
            if let Err(e) = self.turn(line) {
                eprintln!("ds4: error: {e:#}");
            }
        }
    }

    /// Handles a `/command`; returns false to quit.
    fn command(&mut self, cmd: &str) -> Result<bool> {
        let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
        match name {
            "quit" | "exit" => return Ok(false),
            "help" => eprintln!(
                "/think       reason before answering (default)\n/nothink     answer directly\n\
                 /think-max   maximum reasoning effort (needs a context >= {THINK_MAX_MIN_CTX})\n\
                 /ctx N       start over with a context of N tokens\n/read FILE   send a file's text as the next message\n\
                 /quit        exit"
            ),
            "think" => self.set_mode(Mode::Think)?,
            "nothink" => self.set_mode(Mode::NoThink)?,
            "think-max" => {
                if self.ctx < THINK_MAX_MIN_CTX {
                    eprintln!("ds4: think-max needs a context >= {THINK_MAX_MIN_CTX} (/ctx {THINK_MAX_MIN_CTX})");
                } else {
                    self.set_mode(Mode::ThinkMax)?;
                }
            }
            "ctx" => match arg.trim().parse::<usize>() {
                Ok(n) if n > 0 && n <= 1 << 20 => {
                    self.ctx = n;
                    self.opts = self.opts.clone().with_ctx(n);
                    self.reset()?;
                    print_memory_plan(&self.model, n);
                    eprintln!("ds4: new session with a context of {n} tokens");
                }
                _ => eprintln!("ds4: usage: /ctx N (1..1048576)"),
            },
            "read" => match std::fs::read_to_string(arg.trim()) {
                Ok(text) => {
                    if let Err(e) = self.turn(&text) {
                        eprintln!("ds4: error: {e:#}");
                    }
                }
                Err(e) => eprintln!("ds4: cannot read '{}': {e}", arg.trim()),
            },
            other => eprintln!("ds4: unknown command /{other} (/help lists them)"),
        }
        Ok(true)
    }

    /// Switches thinking mode. Think Max changes the preamble, so it starts a new session.
    fn set_mode(&mut self, mode: Mode) -> Result<()> {
        let restart = (mode == Mode::ThinkMax) != (self.mode == Mode::ThinkMax);
        self.mode = mode;
        if restart && self.session.pos() > 0 {
            self.reset()?;
            eprintln!("ds4: Think Max changes the prompt preamble; the conversation starts over");
        }
        eprintln!("ds4: mode {mode:?}");
        Ok(())
    }

    fn reset(&mut self) -> Result<()> {
        self.session = Session::new(self.model.clone(), self.opts.clone())?;
        Ok(())
    }

    /// `--dump-logprobs`: greedy decode, writing the top alternatives of each step
    /// (protocol.md §6.6).
    fn dump_logprobs(&mut self, text: &str, path: &PathBuf, top_k: usize) -> Result<()> {
        let mut ids = self.preamble();
        ids.extend(self.user_turn(text));
        let n_prompt = ids.len();
        if n_prompt >= self.ctx {
            bail!(
                "the prompt needs {n_prompt} tokens, more than the context of {}",
                self.ctx
            );
        }
        self.prefill(&ids)?;
        let eos = self.tok.specials().eos;
        let budget = self.max_tokens.min(self.ctx - n_prompt - 1);
        let token_json = |id: u32| {
            let bytes = self.tok.decode(&[id]);
            serde_json::json!({"id": id, "text": String::from_utf8_lossy(&bytes), "bytes": bytes})
        };
        let mut steps = Vec::new();
        for step in 0..budget {
            let logits = self.session.logits();
            let chosen = ds4::sample::argmax(logits);
            let (_, top) = logprobs(logits, chosen, top_k);
            let alts: Vec<_> = top
                .iter()
                .map(|t| serde_json::json!({"token": token_json(t.id), "logit": t.logit, "logprob": t.logprob}))
                .collect();
            steps.push(serde_json::json!({"step": step, "selected": token_json(chosen), "top_logprobs": alts}));
            if chosen == eos {
                break;
            }
            self.session.decode(chosen)?;
        }
        let doc = serde_json::json!({
            "source": "ds4-rs",
            "prompt_tokens": n_prompt,
            "ctx": self.ctx,
            "top_k": top_k,
            "steps": steps,
        });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("ds4: wrote {} steps to {}", steps.len(), path.display());
        Ok(())
    }
}
