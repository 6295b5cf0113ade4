//! `ds4 cuda …`: CUDA backend diagnostics — device info, kernel self-test against the CPU
//! reference, and kernel bandwidth benchmarks (CSV).

use clap::{Args, Subcommand};
use ds4::backend::cuda::check::{bench, selftest, BenchConfig, BenchRow, CheckRow};
use ds4::backend::cuda::parity::{self, ParityRow};
use ds4::backend::cuda::{probe, CudaAvailability, CudaBackend};
use ds4::model::{BackendChoice, EngineOptions, Model, Session};
use ds4::synth::{Profile, SynthOptions};
use std::sync::Arc;
use std::time::Instant;

/// Arguments of `ds4 cuda`.
#[derive(Args, Debug)]
pub struct CudaArgs {
    #[command(subcommand)]
    pub what: CudaWhat,
}

/// `ds4 cuda` modes.
#[derive(Subcommand, Debug)]
pub enum CudaWhat {
    /// Probe the CUDA runtime and print the device (or why it is unusable).
    Info,
    /// Run every GPU kernel on random data against the CPU reference; non-zero exit on failure.
    Selftest {
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Small shapes only.
        #[arg(long)]
        quick: bool,
    },
    /// Weight bandwidth of the kernels at Flash shapes (CSV on stdout).
    Bench {
        /// Back-to-back calls per timed repeat.
        #[arg(long, default_value_t = 200)]
        iters: usize,
        /// Timed repeats (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Tokens of the prefill measurements.
        #[arg(long, default_value_t = 512)]
        prefill_tokens: usize,
        /// Parts to run, comma separated: matvec, moe, prefill (default: all).
        #[arg(long, value_delimiter = ',')]
        sections: Vec<String>,
    },
    /// Whole-model parity, GPU vs CPU: golden fixtures, a synthetic model's logits and
    /// greedy generation, run-to-run bit identity, snapshots across backends (CSV).
    Parity {
        /// Folder of the golden fixtures.
        #[arg(long, default_value = "crates/ds4/tests/data/fixtures")]
        fixtures: String,
        /// Synthetic profile of the generation check.
        #[arg(long, default_value = "demo")]
        profile: Profile,
        /// Layers of the synthetic model (default: the profile's).
        #[arg(long)]
        layers: Option<usize>,
        /// Prompt tokens before generation.
        #[arg(long, default_value_t = 200)]
        prompt: usize,
        /// Greedy steps compared.
        #[arg(long, default_value_t = 64)]
        steps: usize,
        /// Relative tolerance on the synthetic model's logits (max |gpu−cpu| / max |cpu|).
        #[arg(long, default_value_t = 1e-4)]
        rel_tol: f32,
        /// Skip the golden fixtures.
        #[arg(long)]
        no_golden: bool,
    },
    /// Whole-model speed on a synthetic model: prefill and decode tokens/s at context
    /// frontiers, weight bandwidth of decode (CSV).
    Model {
        /// Synthetic profile.
        #[arg(long, default_value = "flash-q2")]
        profile: Profile,
        /// Layers (default: the profile's). Two or more counts (e.g. `4,12`) also print the
        /// marginal cost of one layer, (t(L2) − t(L1)) / (L2 − L1), free of the embedding and
        /// output head.
        #[arg(long, value_delimiter = ',')]
        layers: Vec<usize>,
        /// Context frontiers (prompt lengths) to measure at.
        #[arg(long, value_delimiter = ',', default_value = "2048,4096")]
        ctx: Vec<usize>,
        /// Decode steps timed at each frontier.
        #[arg(long, default_value_t = 32)]
        decode: usize,
        /// Backend (cuda or cpu).
        #[arg(long, default_value = "cuda")]
        backend: String,
        /// Settings to compare in one process (one model upload), `;`-separated; each is
        /// `default` or space-separated `DS4_CUDA_*=value` switches, applied before each
        /// session. Each frontier runs every setting in turn, `--rounds` times, so slow
        /// drift of the card spreads over all of them.
        #[arg(long, value_delimiter = ';')]
        variants: Vec<String>,
        /// Rounds over the variants at each frontier.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
}

fn backend() -> anyhow::Result<CudaBackend> {
    let t = std::time::Instant::now();
    let be = CudaBackend::new(0)?;
    let (origin, key) = be.kernel_origin();
    eprintln!("# device: {}", be.info());
    eprintln!(
        "# kernels: {origin:?} (key {key}) in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    Ok(be)
}

/// Runs `ds4 cuda`.
pub fn run(args: CudaArgs) -> anyhow::Result<()> {
    match args.what {
        CudaWhat::Info => match probe(0) {
            CudaAvailability::Available(d) => {
                println!("CUDA available: {d}");
                match d.peak_bandwidth_gbs() {
                    Some(p) => println!("peak bandwidth (datasheet): {p:.0} GB/s"),
                    None => println!("peak bandwidth: unknown card"),
                }
                let be = backend()?;
                let (free, total) = be.mem_info()?;
                println!("memory: {} MiB free of {} MiB", free >> 20, total >> 20);
            }
            CudaAvailability::Unavailable(why) => println!("CUDA unavailable: {why}"),
        },
        CudaWhat::Selftest { seed, quick } => {
            let be = backend()?;
            let t = std::time::Instant::now();
            let rows = selftest(&be, seed, quick)?;
            println!("{}", CheckRow::CSV_HEADER);
            for r in &rows {
                println!("{}", r.csv());
            }
            let failed: Vec<&CheckRow> = rows.iter().filter(|r| !r.pass).collect();
            eprintln!(
                "# selftest: {} checks, {} failed, {:.1} s",
                rows.len(),
                failed.len(),
                t.elapsed().as_secs_f64()
            );
            if !failed.is_empty() {
                for r in failed {
                    eprintln!("FAIL {} {} {}", r.kernel, r.ty, r.shape);
                }
                anyhow::bail!("CUDA self-test failed");
            }
        }
        CudaWhat::Bench {
            iters,
            repeats,
            prefill_tokens,
            sections,
        } => {
            let be = backend()?;
            if let Some(p) = be.info().peak_bandwidth_gbs() {
                eprintln!("# peak bandwidth (datasheet): {p:.0} GB/s");
            }
            let cfg = BenchConfig {
                iters: iters.max(1),
                repeats: repeats.max(1),
                prefill_tokens: prefill_tokens.max(1),
                sections,
            };
            println!("{}", BenchRow::CSV_HEADER);
            bench(&be, &cfg, &mut |r| println!("{}", r.csv()))?;
        }
        CudaWhat::Parity {
            fixtures,
            profile,
            layers,
            prompt,
            steps,
            rel_tol,
            no_golden,
        } => {
            let t = Instant::now();
            let mut rows: Vec<ParityRow> = Vec::new();
            println!("{}", ParityRow::CSV_HEADER);
            if !no_golden {
                let names = ["tiny-f32", "tiny-q2", "tiny-q4", "tiny-q2-qat"];
                parity::golden(std::path::Path::new(&fixtures), &names, &mut rows)
                    .map_err(anyhow::Error::msg)?;
                rows.iter().for_each(|r| println!("{}", r.csv()));
            }
            let at = rows.len();
            parity::synthetic(profile, layers, prompt, steps, rel_tol, &mut rows)
                .map_err(anyhow::Error::msg)?;
            rows[at..].iter().for_each(|r| println!("{}", r.csv()));
            let failed = rows.iter().filter(|r| !r.pass).count();
            eprintln!(
                "# parity: {} checks, {failed} failed, {:.1} s",
                rows.len(),
                t.elapsed().as_secs_f64()
            );
            if failed > 0 {
                anyhow::bail!("CUDA parity failed");
            }
        }
        CudaWhat::Model {
            profile,
            layers,
            ctx,
            decode,
            backend,
            variants,
            rounds,
        } => {
            let backend = backend.parse().map_err(anyhow::Error::msg)?;
            let variants = parse_variants(&variants)?;
            let counts: Vec<Option<usize>> = if layers.is_empty() {
                vec![None]
            } else {
                layers.iter().map(|&l| Some(l)).collect()
            };
            let mut runs = Vec::new();
            for (i, &l) in counts.iter().enumerate() {
                runs.push(model_bench(
                    profile,
                    l,
                    &ctx,
                    decode,
                    backend,
                    &variants,
                    rounds.max(1),
                    i == 0,
                )?);
            }
            per_layer(&runs);
        }
    }
    Ok(())
}

/// One `--variants` setting: its name and the switches it sets.
type Variant = (String, Vec<(String, String)>);

/// Parses `--variants` (none: one `default` setting that changes nothing).
fn parse_variants(vs: &[String]) -> anyhow::Result<Vec<Variant>> {
    if vs.is_empty() {
        return Ok(vec![("default".into(), Vec::new())]);
    }
    vs.iter()
        .map(|v| {
            let v = v.trim();
            let mut sets = Vec::new();
            if v != "default" {
                for kv in v.split_whitespace() {
                    match kv.split_once('=') {
                        Some((k, val)) if k.starts_with("DS4_CUDA_") => {
                            sets.push((k.to_string(), val.to_string()))
                        }
                        _ => anyhow::bail!(
                            "variant {v:?}: expected `default` or DS4_CUDA_NAME=value switches, got {kv:?}"
                        ),
                    }
                }
            }
            Ok((v.to_string(), sets))
        })
        .collect()
}

/// Sets `v`'s switches and clears those the other variants set.
fn apply_variant(all: &[Variant], v: &Variant) {
    for (_, sets) in all {
        for (k, _) in sets {
            // The CLI runs its sessions on this thread, which also reads the switches.
            std::env::remove_var(k);
        }
    }
    for (k, val) in &v.1 {
        std::env::set_var(k, val);
    }
}

/// `ds4 cuda model`: builds the synthetic model in memory, uploads it, and for each context
/// frontier times a fresh session's prefill of that many tokens and the decode steps after
/// (for each variant, `rounds` times).
#[allow(clippy::too_many_arguments)]
fn model_bench(
    profile: Profile,
    layers: Option<usize>,
    ctxs: &[usize],
    decode: usize,
    backend: BackendChoice,
    variants: &[Variant],
    rounds: usize,
    header: bool,
) -> anyhow::Result<ModelRun> {
    let t = Instant::now();
    let file = ds4::synth::build_in_memory(&SynthOptions {
        profile,
        seed: 1,
        layers,
    })
    .map_err(anyhow::Error::msg)?;
    let model = Arc::new(Model::from_gguf(file).map_err(anyhow::Error::msg)?);
    let n_layer = model.cfg.n_layer;
    eprintln!(
        "# built {profile} ({n_layer} layers) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut bytes_per_token = 0usize;
    if backend == BackendChoice::Cuda {
        let t = Instant::now();
        let mut last = 0usize;
        let gm = model
            .upload_cuda(&mut |d, tot| {
                if d - last > (4 << 30) || d == tot {
                    eprintln!(
                        "# upload {:.1}/{:.1} GiB",
                        d as f64 / 1073741824.0,
                        tot as f64 / 1073741824.0
                    );
                    last = d;
                }
            })
            .map_err(anyhow::Error::msg)?;
        let (free, total) = gm.backend().mem_info()?;
        eprintln!(
            "# device: {}; weights {:.2} GiB uploaded in {:.1} s; GPU memory used {:.2} of {:.2} GiB",
            gm.backend().info(),
            gm.device_bytes as f64 / 1073741824.0,
            t.elapsed().as_secs_f64(),
            (total - free) as f64 / 1073741824.0,
            total as f64 / 1073741824.0
        );
        bytes_per_token = gm.bytes_per_token;
    }
    let max_ctx = ctxs.iter().copied().max().unwrap_or(0) + decode + 16;
    let opts = EngineOptions::production()
        .with_ctx(max_ctx)
        .with_backend(backend);
    if header {
        println!("profile,layers,backend,ctx,prefill_tok_s,decode_tok_s,decode_ms_per_layer,weight_bytes_per_token,decode_weight_gb_s,variant");
    }
    // One untimed prefill first: cuBLAS and the allocator pay their first-call costs here,
    // not in the first frontier's figure.
    if let Some(&c0) = ctxs.first() {
        let mut s = Session::new(model.clone(), opts.clone())?;
        s.prefill(&parity::prompt_ids(c0.min(4096), model.cfg.n_vocab, 5))?;
    }
    let mut run = ModelRun {
        layers: n_layer,
        points: Vec::new(),
    };
    for &c in ctxs {
        // Per variant: the sum of prefill and decode seconds over the rounds.
        let mut sums = vec![(0.0f64, 0.0f64); variants.len()];
        for _ in 0..rounds {
            for (vi, v) in variants.iter().enumerate() {
                apply_variant(variants, v);
                let (pre_s, dt) = time_frontier(&model, &opts, c, decode)?;
                println!(
                    "{profile},{n_layer},{backend},{c},{:.1},{:.2},{:.4},{bytes_per_token},{:.1},{}",
                    c as f64 / pre_s,
                    1.0 / dt,
                    dt * 1e3 / n_layer as f64,
                    bytes_per_token as f64 / dt / 1e9,
                    v.0
                );
                sums[vi].0 += pre_s;
                sums[vi].1 += dt;
            }
        }
        if let (Some(path), true) = (
            std::env::var_os("DS4_CUDA_PROBE_OUT"),
            backend == BackendChoice::Cuda,
        ) {
            let gm = model
                .upload_cuda(&mut |_, _| {})
                .map_err(anyhow::Error::msg)?;
            if let Some(v) = gm.backend().probe_dump() {
                let mut out = String::from("k,block,point,t_ns\n");
                for (i, t) in v.iter().enumerate().filter(|(_, &t)| t != 0) {
                    out += &format!("{},{},{},{t}\n", i / 1024, (i % 1024) / 8, i % 8);
                }
                std::fs::write(&path, out)?;
            }
        }
        // The marginal table compares the first variant's means.
        let r = rounds as f64;
        run.points.push((c, sums[0].0 / r, sums[0].1 / r));
    }
    Ok(run)
}

/// A fresh session's prefill of `c` tokens (seconds) and the mean seconds of `decode` steps
/// after one untimed step (first-use costs such as a decode graph's capture).
fn time_frontier(
    model: &Arc<Model>,
    opts: &EngineOptions,
    c: usize,
    decode: usize,
) -> anyhow::Result<(f64, f64)> {
    let mut s = Session::new(model.clone(), opts.clone())?;
    let prompt = parity::prompt_ids(c, model.cfg.n_vocab, 3);
    let t = Instant::now();
    s.prefill(&prompt)?;
    let pre_s = t.elapsed().as_secs_f64();
    let mut tok = s.argmax();
    s.decode(tok)?;
    tok = s.argmax();
    let t = Instant::now();
    for _ in 0..decode {
        s.decode(tok)?;
        tok = s.argmax();
    }
    Ok((pre_s, t.elapsed().as_secs_f64() / decode.max(1) as f64))
}

/// One `model_bench` run: per context, (ctx, prefill seconds, decode seconds per token).
struct ModelRun {
    layers: usize,
    points: Vec<(usize, f64, f64)>,
}

/// The marginal cost of one layer between consecutive layer counts (same contexts), as a
/// second CSV table after a `#` line.
fn per_layer(runs: &[ModelRun]) {
    if runs.len() < 2 {
        return;
    }
    println!("# marginal cost of one layer");
    println!("layers_from,layers_to,ctx,prefill_us_per_token_per_layer,decode_us_per_layer");
    for w in runs.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if b.layers == a.layers {
            continue;
        }
        let dl = b.layers as f64 - a.layers as f64;
        for (pa, pb) in a.points.iter().zip(&b.points) {
            let c = pa.0;
            println!(
                "{},{},{c},{:.2},{:.2}",
                a.layers,
                b.layers,
                (pb.1 - pa.1) / c as f64 / dl * 1e6,
                (pb.2 - pa.2) / dl * 1e6
            );
        }
    }
}
