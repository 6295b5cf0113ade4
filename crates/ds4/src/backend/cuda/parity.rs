//! GPU-vs-CPU parity checks of the whole forward pass, run by `ds4 cuda parity` on the GPU
//! machine (which has no Rust toolchain, so these live in the library rather than in tests):
//!
//! * the golden fixtures (tests/data/fixtures): the three runs of the reference README §1
//!   (full prefill, the fixture's chunk schedule, decode) on the GPU, compared with the
//!   expected logits and with the CPU;
//! * a synthetic model: prefill logits, greedy generation (same tokens for every step) and
//!   per-step logits, GPU vs CPU;
//! * run-to-run bit identity on the GPU;
//! * snapshots written on one backend restored on the other.
//!
//! Every check returns a [`ParityRow`]; the caller prints them and fails on any `!pass`.

use std::path::Path;
use std::sync::Arc;

use crate::model::{BackendChoice, EngineOptions, Model, Session};
use crate::sample::{argmax, Sampler, SamplerConfig};
use crate::synth::{self, Profile, SynthOptions};

/// One parity measurement.
#[derive(Clone, Debug)]
pub struct ParityRow {
    pub check: String,
    /// Largest absolute logit difference.
    pub max_abs: f32,
    /// `max_abs` over the largest |reference logit|.
    pub max_rel: f32,
    /// What the row asserts, in words (with the tolerance).
    pub criterion: String,
    pub pass: bool,
}

impl ParityRow {
    pub const CSV_HEADER: &'static str = "check,max_abs,max_rel,criterion,pass";
    pub fn csv(&self) -> String {
        format!(
            "{},{:.3e},{:.3e},{},{}",
            self.check, self.max_abs, self.max_rel, self.criterion, self.pass
        )
    }
}

fn diff(got: &[f32], want: &[f32]) -> (f32, f32) {
    if got.len() != want.len() {
        return (f32::INFINITY, f32::INFINITY);
    }
    let mut m = 0f32;
    for (a, b) in got.iter().zip(want) {
        let d = (a - b).abs();
        m = if d.is_nan() { f32::INFINITY } else { m.max(d) };
    }
    let scale = want.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-30);
    (m, m / scale)
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

// ------------------------------------------------------------------ golden fixtures

/// Minimal safetensors reader (the format is an 8-byte header length, a JSON header and
/// the raw little-endian data); the library does not depend on the safetensors crate.
fn safetensor(bytes: &[u8], name: &str) -> Result<(String, Vec<u8>), String> {
    if bytes.len() < 8 {
        return Err("safetensors: truncated".into());
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let head: serde_json::Value = serde_json::from_slice(
        bytes
            .get(8..8 + n)
            .ok_or_else(|| "safetensors: bad header length".to_string())?,
    )
    .map_err(|e| format!("safetensors header: {e}"))?;
    let t = &head[name];
    let dtype = t["dtype"].as_str().unwrap_or("").to_string();
    let off = t["data_offsets"]
        .as_array()
        .ok_or_else(|| format!("safetensors: no tensor {name}"))?;
    let (a, b) = (
        off[0].as_u64().unwrap_or(0) as usize,
        off[1].as_u64().unwrap_or(0) as usize,
    );
    let data = bytes
        .get(8 + n + a..8 + n + b)
        .ok_or_else(|| format!("safetensors: {name} out of range"))?;
    Ok((dtype, data.to_vec()))
}

fn i32s(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
        .collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

struct Fixture {
    model: Arc<Model>,
    qat: bool,
    prompt: Vec<u32>,
    chunks: Vec<usize>,
    decode_ids: Vec<u32>,
    expected: [Vec<f32>; 3],
}

fn load_fixture(dir: &Path) -> Result<Fixture, String> {
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("meta.json")).map_err(|e| format!("{}: {e}", dir.display()))?,
    )
    .map_err(|e| e.to_string())?;
    let gguf = dir.join(meta["model_gguf"].as_str().unwrap_or("model.gguf"));
    let model = Arc::new(Model::open(&gguf)?);
    let bytes = std::fs::read(dir.join("expected.safetensors")).map_err(|e| e.to_string())?;
    let get = |n: &str| safetensor(&bytes, n).map(|(_, d)| d);
    let ids = |n: &str| -> Result<Vec<u32>, String> {
        Ok(i32s(&get(n)?).into_iter().map(|v| v as u32).collect())
    };
    Ok(Fixture {
        model,
        qat: meta["qat_sim"].as_bool().unwrap_or(false),
        prompt: ids("prompt_ids")?,
        chunks: i32s(&get("chunk_sizes")?)
            .into_iter()
            .map(|v| v as usize)
            .collect(),
        decode_ids: ids("decode_ids")?,
        expected: [
            f32s(&get("prefill_logits")?),
            f32s(&get("chunked_logits")?),
            f32s(&get("decode_logits")?),
        ],
    })
}

/// The three README §1 runs with `opts`: (prefill, chunked, decode) logits.
fn fixture_runs(f: &Fixture, opts: &EngineOptions) -> Result<[Vec<f32>; 3], String> {
    let new = || Session::new(f.model.clone(), opts.clone()).map_err(|e| e.to_string());
    let mut s = new()?;
    let full = s.prefill_logits(&f.prompt).map_err(|e| e.to_string())?;
    let mut s = new()?;
    let mut chunked = Vec::new();
    let mut at = 0;
    for &n in &f.chunks {
        chunked.extend(
            s.prefill_logits(&f.prompt[at..at + n])
                .map_err(|e| e.to_string())?,
        );
        at += n;
    }
    let mut s = new()?;
    s.prefill(&f.prompt).map_err(|e| e.to_string())?;
    let mut dec = Vec::new();
    for &t in &f.decode_ids {
        s.decode(t).map_err(|e| e.to_string())?;
        dec.extend_from_slice(s.logits());
    }
    Ok([full, chunked, dec])
}

/// Golden fixtures under `dir` (each a sub-folder with meta.json): GPU vs expected (exact
/// fixtures: every logit within 1e-3 absolute, the README §1 criterion; the QAT fixture:
/// reported, top-1 compared), GPU vs CPU, and GPU run-to-run bit identity.
pub fn golden(dir: &Path, names: &[&str], rows: &mut Vec<ParityRow>) -> Result<(), String> {
    for name in names {
        let f = load_fixture(&dir.join(name))?;
        let base = EngineOptions::exact(f.qat);
        let gpu = fixture_runs(&f, &base.clone().with_backend(BackendChoice::Cuda))?;
        let gpu2 = fixture_runs(&f, &base.clone().with_backend(BackendChoice::Cuda))?;
        let cpu = fixture_runs(&f, &base.clone().with_backend(BackendChoice::Cpu))?;
        let vocab = f.model.cfg.n_vocab;
        for (i, run) in ["prefill", "chunked", "decode"].iter().enumerate() {
            let (a, r) = diff(&gpu[i], &f.expected[i]);
            let (tol, crit) = if f.qat {
                // QAT rounding thresholds amplify f32 differences (README §1 pools rows and
                // checks top-1 and the median instead); report the same quantities as CPU.
                let (ca, _) = diff(&cpu[i], &f.expected[i]);
                (
                    ca.max(1e-3) * 4.0,
                    format!("<= 4x CPU's max_abs ({ca:.3e})"),
                )
            } else {
                (1e-3, "every logit within 1e-3 of expected".to_string())
            };
            rows.push(ParityRow {
                check: format!("{name}/{run} gpu-vs-expected"),
                max_abs: a,
                max_rel: r,
                criterion: crit,
                pass: a <= tol,
            });
            let (a, r) = diff(&gpu[i], &cpu[i]);
            let top1 = gpu[i]
                .chunks_exact(vocab)
                .zip(cpu[i].chunks_exact(vocab))
                .filter(|(g, c)| argmax(g) == argmax(c))
                .count();
            let n = gpu[i].len() / vocab;
            rows.push(ParityRow {
                check: format!("{name}/{run} gpu-vs-cpu (top1 {top1}/{n})"),
                max_abs: a,
                max_rel: r,
                criterion: if f.qat {
                    "top-1 agrees on >= 98% of rows".into()
                } else {
                    "max_abs <= 1e-3".into()
                },
                pass: if f.qat {
                    top1 * 50 >= n * 49
                } else {
                    a <= 1e-3
                },
            });
            rows.push(ParityRow {
                check: format!("{name}/{run} gpu run-to-run"),
                max_abs: diff(&gpu[i], &gpu2[i]).0,
                max_rel: 0.0,
                criterion: "bit-identical".into(),
                pass: bits_equal(&gpu[i], &gpu2[i]),
            });
        }
        // Production mode's tiled attention and indexer kernels (another f32 summation
        // order) on the same exact-mode runs: within the README's 1e-3 on the exact
        // fixtures; reported only on the QAT fixture, whose FP8/FP4 rounding turns any change
        // of order into occasional flips (the CPU's own order misses it by 0.15).
        super::session::force_tiled_attention(true);
        let tiled = fixture_runs(&f, &base.clone().with_backend(BackendChoice::Cuda));
        super::session::force_tiled_attention(false);
        let tiled = tiled?;
        for (i, run) in ["prefill", "chunked", "decode"].iter().enumerate() {
            let (a, r) = diff(&tiled[i], &f.expected[i]);
            rows.push(ParityRow {
                check: format!("{name}/{run} gpu-tiled-attention-vs-expected"),
                max_abs: a,
                max_rel: r,
                criterion: if f.qat {
                    "reported (QAT rounding amplifies order changes)".into()
                } else {
                    "every logit within 1e-3 of expected".into()
                },
                pass: f.qat || a <= 1e-3,
            });
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ synthetic model

/// Greedy generation of `steps` tokens after `prompt`: (prefill logits, per-step logits,
/// tokens, the session).
type Greedy = (Vec<f32>, Vec<f32>, Vec<u32>, Session);

fn greedy(
    model: &Arc<Model>,
    opts: &EngineOptions,
    prompt: &[u32],
    steps: usize,
) -> Result<Greedy, String> {
    let mut s = Session::new(model.clone(), opts.clone()).map_err(|e| e.to_string())?;
    s.prefill(prompt).map_err(|e| e.to_string())?;
    let first = s.logits().to_vec();
    let mut logits = Vec::new();
    let mut toks = Vec::new();
    let mut next = argmax(s.logits());
    for _ in 0..steps {
        toks.push(next);
        s.decode(next).map_err(|e| e.to_string())?;
        logits.extend_from_slice(s.logits());
        next = argmax(s.logits());
    }
    Ok((first, logits, toks, s))
}

/// Pseudo-random prompt (a fixed LCG, so every run and backend sees the same ids).
pub fn prompt_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Tolerance (max |Δlogit| / max |logit|) of production-mode prefill, GPU (f16 tensor-core
/// products) vs CPU (int8 activations): measured 4.3e-2 on the demo model (3.7e-2 before,
/// with f32 GPU products).
pub const PROD_PREFILL_REL_TOL: f32 = 1e-1;

/// Synthetic-model parity: GPU vs CPU prefill logits (relative tolerance `rel_tol`), greedy
/// generation of `steps` tokens (identical token sequences), GPU run-to-run bit identity,
/// and snapshots across backends (CPU → GPU and GPU → CPU, then `8` more greedy steps on
/// each, compared with an uninterrupted session of the other backend).
pub fn synthetic(
    profile: Profile,
    layers: Option<usize>,
    prompt_len: usize,
    steps: usize,
    rel_tol: f32,
    rows: &mut Vec<ParityRow>,
) -> Result<(), String> {
    let file = synth::build_in_memory(&SynthOptions {
        profile,
        seed: 7,
        layers,
    })?;
    let model = Arc::new(Model::from_gguf(file)?);
    let prompt = prompt_ids(prompt_len, model.cfg.n_vocab, 11);
    let name = profile.name();
    for (mode, base) in [
        ("exact", EngineOptions::exact(false)),
        ("production", EngineOptions::production()),
    ] {
        let base = base.with_ctx(prompt_len + steps + 64);
        let gpu_o = base.clone().with_backend(BackendChoice::Cuda);
        let cpu_o = base.clone().with_backend(BackendChoice::Cpu);
        let (g0, gl, gt, gs) = greedy(&model, &gpu_o, &prompt, steps)?;
        let (c0, cl, ct, cs) = greedy(&model, &cpu_o, &prompt, steps)?;
        let (a, r) = diff(&g0, &c0);
        // Production mode: the CPU quantizes activations (Q8_0/Q8_K, int8) before each
        // product; GPU prefill multiplies f16 weights by f16 activations on tensor cores
        // (f32 accumulation). Both approximate the exact products; on the random demo model
        // their difference was 3.7e-2 with f32 GPU products and 4.3e-2 with f16 operands
        // (the CPU's int8 rounding dominates), so the row asserts PROD_PREFILL_REL_TOL.
        let tol = if mode == "exact" {
            rel_tol
        } else {
            PROD_PREFILL_REL_TOL
        };
        rows.push(ParityRow {
            check: format!("{name}/{mode} prefill({prompt_len}) gpu-vs-cpu"),
            max_abs: a,
            max_rel: r,
            criterion: format!("max_rel <= {tol:.0e}"),
            pass: r <= tol,
        });
        let same = gt.iter().zip(&ct).take_while(|(a, b)| a == b).count();
        let (a, r) = diff(
            &gl[..same * model.cfg.n_vocab],
            &cl[..same * model.cfg.n_vocab],
        );
        let exact = mode == "exact";
        rows.push(ParityRow {
            check: format!("{name}/{mode} greedy {steps} steps: {same} identical tokens"),
            max_abs: a,
            max_rel: r,
            criterion: if exact {
                format!("all {steps} tokens identical")
            } else {
                "reported (GPU prefill: f16 operands; CPU: int8 activations)".into()
            },
            pass: same == steps || !exact,
        });
        // Run-to-run on the GPU: the same prompt and generation again, bit for bit.
        let (g0b, glb, gtb, _) = greedy(&model, &gpu_o, &prompt, steps)?;
        rows.push(ParityRow {
            check: format!("{name}/{mode} gpu run-to-run ({steps} steps)"),
            max_abs: diff(&glb, &gl).0.max(diff(&g0b, &g0).0),
            max_rel: 0.0,
            criterion: "bit-identical logits and tokens".into(),
            pass: bits_equal(&g0b, &g0) && bits_equal(&glb, &gl) && gtb == gt,
        });
        // Production decode runs a layer's independent paths on two streams (forked decode
        // graphs), and each hc_post fused into the next site's control product; production
        // prefill runs the compressors and the indexer on a side stream: the same operations
        // in another schedule or launch, so the logits must not change by a bit.
        let same_work = [
            ("DS4_CUDA_FORK", "decode forked vs one stream"),
            ("DS4_CUDA_POSTMIX", "decode hc_post fused vs alone"),
            ("DS4_CUDA_PF_ATT_FORK", "prefill side branch vs one stream"),
            (
                "DS4_CUDA_PF_SH_FORK",
                "prefill shared expert forked vs one stream",
            ),
        ];
        for (switch, what) in same_work.iter().filter(|_| !exact) {
            std::env::set_var(switch, "0");
            let one = greedy(&model, &gpu_o, &prompt, steps);
            std::env::remove_var(switch);
            let (_, gl1, gt1, _) = one?;
            rows.push(ParityRow {
                check: format!("{name}/{mode} {what} ({steps} steps)"),
                max_abs: diff(&gl1, &gl).0,
                max_rel: 0.0,
                criterion: "bit-identical logits and tokens".into(),
                pass: bits_equal(&gl1, &gl) && gt1 == gt,
            });
        }
        // Production decode on one state: the CPU session's state restored on both backends,
        // then the same 16 tokens fed to each (teacher forcing), so every step's logits
        // compare the two decode paths directly (GPU int8 activations vs CPU Q8_0/Q8_K).
        if !exact {
            let bytes = cs.try_snapshot().map_err(|e| e.to_string())?;
            let mut rg = Session::restore(model.clone(), gpu_o.clone(), &bytes)
                .map_err(|e| e.to_string())?;
            let mut rc = Session::restore(model.clone(), cpu_o.clone(), &bytes)
                .map_err(|e| e.to_string())?;
            let forced = prompt_ids(16, model.cfg.n_vocab, 23);
            let (mut la, mut lb) = (Vec::new(), Vec::new());
            let mut top1 = 0;
            for &t in &forced {
                rg.decode(t).map_err(|e| e.to_string())?;
                rc.decode(t).map_err(|e| e.to_string())?;
                la.extend_from_slice(rg.logits());
                lb.extend_from_slice(rc.logits());
                top1 += (argmax(rg.logits()) == argmax(rc.logits())) as usize;
            }
            let (a, r) = diff(&la, &lb);
            rows.push(ParityRow {
                check: format!(
                    "{name}/production decode gpu-vs-cpu, same state, 16 forced steps: top-1 {top1}/16"
                ),
                max_abs: a,
                max_rel: r,
                criterion: "reported (both quantize activations; sums in another order)".into(),
                pass: true,
            });
        }
        // Sampling on the GPU: the device narrows the row (argmax; min-p candidates) and the
        // host draws from it; both must equal the host's own answers from the whole row.
        {
            let bytes = gs.try_snapshot().map_err(|e| e.to_string())?;
            let mut g = Session::restore(model.clone(), gpu_o.clone(), &bytes)
                .map_err(|e| e.to_string())?;
            let forced = prompt_ids(16, model.cfg.n_vocab, 29);
            let cfgs = [
                SamplerConfig::greedy(),
                SamplerConfig {
                    seed: 5,
                    ..Default::default()
                },
                SamplerConfig {
                    temperature: 0.3,
                    min_p: 0.2,
                    seed: 6,
                    ..Default::default()
                },
                SamplerConfig {
                    temperature: 0.6,
                    top_k: 40,
                    seed: 7,
                    ..Default::default()
                },
            ];
            let (mut ok, mut narrowed, mut checks) = (true, 0usize, 0usize);
            for &t in &forced {
                g.decode(t).map_err(|e| e.to_string())?;
                let gpu = g.gpu.as_ref().ok_or("no GPU session")?;
                // The kernel's narrowing at a cut that keeps a few hundred tokens.
                let n = gpu
                    .narrow(-0.5, 1.0, super::NARROW_CAP)
                    .map_err(|e| e.to_string())?;
                let best = g.argmax();
                // The top-k config comes last: it reads the whole row, after which the
                // session answers from the host copy.
                let mut samplers: Vec<Sampler> = cfgs.iter().map(|&c| Sampler::new(c)).collect();
                let mut twins = samplers.clone();
                let drawn: Vec<u32> = samplers.iter_mut().map(|sm| g.sample(sm)).collect();
                let row = g.logits();
                let want_best = argmax(row);
                let want: Vec<(u32, f32)> = row
                    .iter()
                    .enumerate()
                    .filter(|(_, &l)| l - row[want_best as usize] >= -0.5)
                    .map(|(i, &l)| (i as u32, l))
                    .collect();
                let same_cands = n.candidates.as_ref().is_some_and(|c| {
                    c.len() == want.len()
                        && c.iter()
                            .zip(&want)
                            .all(|(a, b)| a.0 == b.0 && a.1.to_bits() == b.1.to_bits())
                });
                narrowed += n.candidates.as_ref().map_or(0, |c| c.len());
                ok &= n.best == want_best
                    && n.max.to_bits() == row[want_best as usize].to_bits()
                    && same_cands
                    && best == want_best;
                for (d, tw) in drawn.iter().zip(twins.iter_mut()) {
                    ok &= *d == tw.sample(row);
                    checks += 1;
                }
            }
            rows.push(ParityRow {
                check: format!(
                    "{name}/{mode} gpu sampling: 16 rows, argmax + {} candidates narrowed, {checks} draws",
                    narrowed
                ),
                max_abs: 0.0,
                max_rel: 0.0,
                criterion: "device argmax/candidates bit-equal to the row's; every draw equals the host sampler's".into(),
                pass: ok,
            });
        }
        // Snapshots across backends: restore the other backend's state and continue.
        for (from, to, sess, to_o, cont) in [
            ("cpu", "gpu", &cs, &gpu_o, &gs),
            ("gpu", "cpu", &gs, &cpu_o, &cs),
        ] {
            let bytes = sess.try_snapshot().map_err(|e| e.to_string())?;
            let mut restored =
                Session::restore(model.clone(), to_o.clone(), &bytes).map_err(|e| e.to_string())?;
            let mut other = Session::restore(
                model.clone(),
                cont.options().clone(),
                &cont.try_snapshot().map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?;
            let (mut la, mut lb) = (Vec::new(), Vec::new());
            let mut t = argmax(restored.logits());
            let mut same = 0;
            for _ in 0..8 {
                restored.decode(t).map_err(|e| e.to_string())?;
                other.decode(t).map_err(|e| e.to_string())?;
                la.extend_from_slice(restored.logits());
                lb.extend_from_slice(other.logits());
                let (ta, tb) = (argmax(restored.logits()), argmax(other.logits()));
                same += (ta == tb) as usize;
                t = ta;
            }
            let (a, r) = diff(&la, &lb);
            // Exact mode: both backends computed the same state, so the restored session must
            // continue like the target backend's own. Production mode: the two states differ
            // by the CPU's activation quantization, so only the restore itself is asserted.
            rows.push(ParityRow {
                check: format!(
                    "{name}/{mode} snapshot {from}->{to} ({} bytes), 8 steps vs {to} session ({same}/8 same)",
                    bytes.len()
                ),
                max_abs: a,
                max_rel: r,
                criterion: if exact {
                    format!("restored on {to}; next 8 tokens identical")
                } else {
                    format!("restored on {to} (tokens reported)")
                },
                pass: (same == 8 || !exact) && restored.backend() != sess.backend(),
            });
        }
    }
    Ok(())
}
