//! Model loading shared by the subcommands: a GGUF file or an in-memory synthetic model,
//! the thread pool, and the startup summary (profile, quant mix, backend, memory plan).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ds4::model::{BackendChoice, Config, Model};
use ds4::synth::{Profile, SynthOptions};

/// Default model path, as ds4.
pub const DEFAULT_MODEL: &str = "ds4flash.gguf";

/// Where the weights come from and how many threads run them.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model file (a DeepSeek V4 Flash GGUF as published for ds4, or any model of the same
    /// architecture).
    #[arg(short = 'm', long = "model", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Use a synthetic model built in memory instead of a file: tiny, demo, flash-q2 or
    /// flash-q4 (random weights; for testing and benchmarks only).
    #[arg(long, value_name = "PROFILE", conflicts_with = "model")]
    pub synthetic: Option<Profile>,
    /// Layers of the synthetic model (default: the profile's depth).
    #[arg(long, value_name = "N", requires = "synthetic")]
    pub synthetic_layers: Option<usize>,
    /// Compute backend: auto (CUDA when a usable GPU is found, else CPU), cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub backend: BackendChoice,
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(short = 't', long, value_name = "N")]
    pub threads: Option<usize>,
}

/// Sizes the global thread pool (once per process).
pub fn init_threads(threads: Option<usize>) -> Result<usize> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the thread pool")?;
    }
    Ok(rayon::current_num_threads())
}

/// Loads the model the arguments name. With the default path missing, the error says how
/// to get real weights or use a synthetic model.
pub fn load_model(args: &ModelArgs) -> Result<Arc<Model>> {
    init_threads(args.threads)?;
    let started = std::time::Instant::now();
    let model = match args.synthetic {
        Some(profile) => {
            let opts = SynthOptions {
                layers: args.synthetic_layers,
                ..SynthOptions::new(profile)
            };
            eprintln!("ds4: building synthetic '{profile}' model in memory (random weights)...");
            let file = ds4::synth::build_in_memory(&opts).map_err(anyhow::Error::msg)?;
            Model::from_gguf(file).map_err(anyhow::Error::msg)?
        }
        None => {
            if !args.model.exists() {
                bail!(
                    "model file '{}' not found.\n  Get the real weights (q2, about 81 GiB):\n    \
                     huggingface-cli download antirez/deepseek-v4-gguf \
                     DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-chat-v2.gguf --local-dir .\n  \
                     and pass it with -m, or try the engine on a random-weight model with --synthetic demo",
                    args.model.display()
                );
            }
            Model::open(&args.model).map_err(anyhow::Error::msg)?
        }
    };
    let model = Arc::new(model);
    print_summary(&model, args.synthetic.is_some(), started.elapsed());
    Ok(model)
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Bytes of KV state per token of context, and the fixed part (model.md §4.2): compressed
/// and indexer rows grow with the context, raw windows and compressor frontiers do not.
/// Rows are held as f32.
pub fn kv_bytes(c: &Config, ctx: usize) -> u64 {
    let mut per_tok = 0f64;
    let mut fixed = 0u64;
    for il in 0..c.n_layer {
        fixed += (c.swa * c.head_dim) as u64;
        match c.ratio(il) {
            0 => {}
            4 => {
                per_tok += (c.head_dim + c.idx_dim) as f64 / 4.0;
                fixed += (8 * 2 * 2 * c.head_dim + 8 * 2 * 2 * c.idx_dim) as u64;
            }
            r => {
                per_tok += c.head_dim as f64 / r as f64;
                fixed += (2 * r * c.head_dim) as u64;
            }
        }
    }
    4 * (fixed + (per_tok * ctx as f64) as u64)
}

fn print_summary(model: &Model, synthetic: bool, took: std::time::Duration) {
    let c = &model.cfg;
    let source = match model.file.path() {
        Some(p) => p.display().to_string(),
        None => "in memory".to_string(),
    };
    eprintln!(
        "ds4: model {source}: {}{}",
        c.profile_name(),
        if synthetic {
            " [SYNTHETIC, random weights: output is noise]"
        } else {
            ""
        }
    );
    let mix: Vec<String> = model
        .quant_mix()
        .iter()
        .map(|(ty, (n, bytes))| format!("{ty} {n} tensors {:.2} GiB", gib(*bytes)))
        .collect();
    eprintln!("ds4: quant mix: {}", mix.join(", "));
    eprintln!("ds4: loaded in {:.2} s", took.as_secs_f64());
}

/// Resolves the backend before the first session: with CUDA wanted, uploads the weights to
/// the GPU with a progress line; `auto` falls back to the CPU with the reason, an explicit
/// `cuda` without a usable GPU is an error. Prints the backend in use.
pub fn prepare_backend(model: &Model, choice: BackendChoice) -> Result<BackendChoice> {
    let resolved = match choice {
        BackendChoice::Cpu => BackendChoice::Cpu,
        BackendChoice::Auto | BackendChoice::Cuda => {
            let started = std::time::Instant::now();
            let mut last = 0usize;
            let result = model.upload_cuda(&mut |done, total| {
                let pct = done * 100 / total.max(1);
                if pct >= last + 10 || done == total {
                    last = pct;
                    eprint!("\rds4: uploading weights to the GPU: {pct}%");
                }
            });
            match result {
                Ok(_) => {
                    eprintln!(
                        "\rds4: uploading weights to the GPU: 100% ({:.1} s)",
                        started.elapsed().as_secs_f64()
                    );
                    BackendChoice::Cuda
                }
                Err(why) if choice == BackendChoice::Auto => {
                    eprintln!("ds4: CUDA not used ({why}); running on the CPU");
                    BackendChoice::Cpu
                }
                Err(why) => bail!("--backend cuda: {why}"),
            }
        }
    };
    if resolved == BackendChoice::Cpu {
        eprintln!(
            "ds4: backend: cpu, {} threads, {}",
            rayon::current_num_threads(),
            if cfg!(target_arch = "x86_64") && std::is_x86_feature_detected!("avx2") {
                "AVX2"
            } else {
                "scalar kernels"
            }
        );
    } else {
        eprintln!("ds4: backend: cuda");
    }
    Ok(resolved)
}

/// Prints the memory plan for a context size.
pub fn print_memory_plan(model: &Model, ctx: usize) {
    eprintln!(
        "ds4: memory: weights {:.2} GiB ({}), KV state up to {:.3} GiB at a context of {ctx} tokens (allocated as used)",
        gib(model.file.file_size()),
        if model.file.path().is_some() { "memory-mapped" } else { "in memory" },
        gib(kv_bytes(&model.cfg, ctx))
    );
}

/// Reads a whole text file with a clear error.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}
