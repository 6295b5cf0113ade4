//! `ds4 synth`: writes a synthetic model (random weights, exact ds4 layout) to a GGUF file.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use ds4::synth::{write_file, Profile, SynthOptions};

#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// Model profile: tiny (a few MB), demo (~130 MB, real tokenizer), flash-q2 (~81 GiB),
    /// flash-q4 (~153 GiB).
    #[arg(long)]
    pub profile: Profile,
    /// Output GGUF path (written to a temporary file, then renamed).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights; the same seed gives a byte-identical file.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of layers (default: the profile's full depth), e.g. to cut Flash for tests.
    #[arg(long)]
    pub layers: Option<usize>,
}

/// Outputs below this size finish in about a second: no progress display.
const PROGRESS_MIN_BYTES: u64 = 256 << 20;

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let opts = SynthOptions {
        profile: args.profile,
        seed: args.seed,
        layers: args.layers,
    };
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_shown = (Instant::now(), 0u64);
    let summary = write_file(&opts, &args.out, |done, total| {
        if total < PROGRESS_MIN_BYTES {
            return;
        }
        // On a terminal: a line redrawn at most twice a second. Otherwise (logs, CI): one
        // line per 10 % so the log stays short.
        let step = if tty {
            last_shown.0.elapsed().as_millis() >= 500 || done == total
        } else {
            done * 10 / total > last_shown.1 * 10 / total
        };
        if !step {
            return;
        }
        last_shown = (Instant::now(), done);
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        let line = format!(
            "synth: {:.2} / {:.2} GiB ({:.0}%), {:.2} GB/s",
            gib(done),
            gib(total),
            100.0 * done as f64 / total as f64,
            done as f64 / secs / 1e9
        );
        let mut err = std::io::stderr();
        if tty {
            let _ = write!(err, "\r{line}\x1b[K");
            if done == total {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
    })
    .map_err(anyhow::Error::msg)
    .with_context(|| {
        format!(
            "generating {} model into {}",
            opts.profile,
            args.out.display()
        )
    })?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "wrote {} (synthetic {}, seed {}{}): {summary}; {secs:.1} s ({:.2} GB/s)",
        args.out.display(),
        opts.profile,
        opts.seed,
        opts.layers
            .map_or(String::new(), |n| format!(", {n} layers")),
        summary.file_bytes as f64 / secs.max(1e-9) / 1e9
    );
    Ok(())
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}
