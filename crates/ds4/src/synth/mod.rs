//! Synthetic DeepSeek V4 models: the exact ds4 GGUF layout filled with random but valid
//! weights.
//!
//! Used for tests, benchmarks and the server's default `demo` model, so that the whole engine
//! runs without the 81 GB download. Four profiles:
//! * `tiny`: the reference fixtures' "tiny" shape (6 layers with ratios 0,0,4,128,4,128,
//!   3 hash layers, shared expert, 4 HC streams, D 256, 4 experts top-2) and a 320-token
//!   vocabulary cut from the real tokenizer; a few MB.
//! * `demo`: small dims (8 layers, D 256, 16 experts top-4) with the real 129,280-token
//!   tokenizer, so it can serve real text; about 130 MB, fast on 2 cores.
//! * `flash-q2`, `flash-q4`: the published Flash tensor set, shapes and types (≈ 81 GiB /
//!   153 GiB); `layers` cuts the depth for testing.
//!
//! Every tensor comes from [`crate::model::weights::expected_tensors`] with the type ds4 stores
//! it as ([`Role::ds4_type`]); tiny and demo use the q2 mix. Values are random with
//! realistic magnitudes (matrices std 1/sqrt(fan_in), norms ≈ 1, small HC controls, O(1)
//! sinks, small router bias, distinct expert ids per `tid2eid` row). Generation is streaming
//! (one tensor at a time), parallel (rayon, fixed chunking) and deterministic for a seed.
//!
//! The files say what they are: `general.name` mentions random weights and `ds4.synthetic`
//! is `true`.

mod fill;
mod rng;
mod vocab;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

pub use fill::Init;
pub use vocab::SPECIAL_TOKENS;

use crate::gguf::{GgufError, GgufFile, GgufWriter, TensorSpec, Value, ValueType};
use crate::model::config::{flash_ratio, ARCH};
use crate::model::weights::{expected_tensors, Role};
use crate::model::{Config, ExpertQuant};

/// Metadata key marking a generated model (bool `true`).
pub const SYNTHETIC_KEY: &str = "ds4.synthetic";

/// Which synthetic model to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Profile {
    Tiny,
    Demo,
    FlashQ2,
    FlashQ4,
}

impl Profile {
    pub const ALL: [Profile; 4] = [
        Profile::Tiny,
        Profile::Demo,
        Profile::FlashQ2,
        Profile::FlashQ4,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Tiny => "tiny",
            Profile::Demo => "demo",
            Profile::FlashQ2 => "flash-q2",
            Profile::FlashQ4 => "flash-q4",
        }
    }

    /// Routed-expert quantization: Q4_K for flash-q4, the q2 mix otherwise.
    pub fn experts(self) -> ExpertQuant {
        match self {
            Profile::FlashQ4 => ExpertQuant::Q4,
            _ => ExpertQuant::Q2,
        }
    }

    /// Full depth of the profile.
    pub fn default_layers(self) -> usize {
        match self {
            Profile::Tiny => 6,
            Profile::Demo => 8,
            Profile::FlashQ2 | Profile::FlashQ4 => 43,
        }
    }

    /// Deepest `layers` accepted: Flash's schedule is defined for 43 layers; the small
    /// profiles may be made deeper (e.g. for pipeline tests) up to 64.
    pub fn max_layers(self) -> usize {
        match self {
            Profile::FlashQ2 | Profile::FlashQ4 => 43,
            _ => 64,
        }
    }

    fn is_flash(self) -> bool {
        matches!(self, Profile::FlashQ2 | Profile::FlashQ4)
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Profile, String> {
        Profile::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Profile::ALL.iter().map(|p| p.name()).collect();
                format!(
                    "unknown synthetic profile '{s}' (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// What to generate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthOptions {
    pub profile: Profile,
    /// Seed of every random value; the same options give byte-identical files.
    pub seed: u64,
    /// Number of layers (default: the profile's full depth). The compress-ratio schedule
    /// stays Flash's, so a cut model keeps its first layers exactly.
    pub layers: Option<usize>,
}

impl SynthOptions {
    pub fn new(profile: Profile) -> SynthOptions {
        SynthOptions {
            profile,
            seed: 0,
            layers: None,
        }
    }
}

/// The hyperparameters of the model these options describe.
pub fn config_for(opts: &SynthOptions) -> Result<Config, String> {
    let p = opts.profile;
    let n_layer = opts.layers.unwrap_or(p.default_layers());
    if n_layer == 0 || n_layer > p.max_layers() {
        return Err(format!(
            "profile {p}: layers must be between 1 and {}, got {n_layer}",
            p.max_layers()
        ));
    }
    // Arrays cover at least the profile's full depth, as a cut of a real file would.
    let n_arr = n_layer.max(p.default_layers());
    let mut c = Config {
        n_layer,
        n_embd: 256,
        n_vocab: 320,
        n_head: 4,
        head_dim: 128,
        n_rot: 64,
        q_lora_rank: 64,
        o_lora_rank: 32,
        o_groups: 2,
        n_expert: 4,
        n_expert_used: 2,
        n_ff_exp: 256,
        n_expert_shared: 1,
        n_hash_layers: 3.min(n_layer),
        swa: 16,
        idx_heads: 16,
        idx_dim: 128,
        idx_topk: 8,
        hc: 4,
        sinkhorn_iters: 20,
        compress_ratios: (0..n_arr).map(flash_ratio).collect(),
        swiglu_clamp: vec![10.0; n_arr],
        rope_base: 10000.0,
        compress_rope_base: 160000.0,
        rope_scale_factor: 16.0,
        rope_orig_ctx: 65536.0,
        yarn_beta_fast: 32.0,
        yarn_beta_slow: 1.0,
        expert_weights_scale: 1.5,
        expert_weights_norm: true,
        rms_eps: 1e-6,
        hc_eps: 1e-6,
        context_length: 4096,
    };
    match p {
        // The fixtures' tiny shape (README §1.1), the values above.
        Profile::Tiny => {}
        // Small enough to generate tokens fast on 2 cores, but with the real vocabulary,
        // more experts than tiny (so routing is visible) and windows that real chats cross:
        // a 64-token sliding window and an indexer that starts selecting at 32 compressed
        // rows (128 tokens).
        Profile::Demo => {
            c.n_vocab = 129_280;
            c.q_lora_rank = 128;
            c.o_lora_rank = 64;
            c.n_expert = 16;
            c.n_expert_used = 4;
            c.swa = 64;
            c.idx_topk = 32;
            c.context_length = 32768;
        }
        // Flash, model.md §1.
        Profile::FlashQ2 | Profile::FlashQ4 => {
            c.n_embd = 4096;
            c.n_vocab = 129_280;
            c.n_head = 64;
            c.head_dim = 512;
            c.q_lora_rank = 1024;
            c.o_lora_rank = 1024;
            c.o_groups = 8;
            c.n_expert = 256;
            c.n_expert_used = 6;
            c.n_ff_exp = 2048;
            c.swa = 128;
            c.idx_heads = 64;
            c.idx_topk = 512;
            c.context_length = 1 << 20;
        }
    }
    Ok(c)
}

/// One tensor of the plan: where it goes and how its values are drawn.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTensor {
    pub spec: TensorSpec,
    pub init: Init,
}

/// Produces the bytes of every tensor of a [`GgufWriter`] built by [`writer`].
#[derive(Clone, Debug)]
pub struct Filler {
    seed: u64,
    tensors: Vec<PlannedTensor>,
}

impl Filler {
    /// The tensors in file order with their initialisers.
    pub fn tensors(&self) -> &[PlannedTensor] {
        &self.tensors
    }

    /// Fills tensor `i` (the writer's callback): `buf` is exactly the tensor's bytes.
    pub fn fill(&self, i: usize, spec: &TensorSpec, buf: &mut [u8]) -> Result<(), GgufError> {
        let t = self
            .tensors
            .get(i)
            .filter(|t| t.spec == *spec)
            .ok_or_else(|| {
                GgufError::Invalid(format!(
                    "synthetic filler has no tensor #{i} named '{}'",
                    spec.name
                ))
            })?;
        let key = rng::tensor_key(self.seed, &spec.name);
        fill::fill(spec.ty, &spec.dims, t.init, key, buf)
            .map_err(|e| GgufError::Invalid(format!("tensor '{}': {e}", spec.name)))
    }
}

/// How the values of a tensor are drawn, from its role and name (see the module doc).
fn init_for(c: &Config, name: &str, dims: &[u64], role: Role) -> Result<Init, String> {
    let normal = |std: f32| Init::Normal { mean: 0.0, std };
    // ne0 is the input axis of every matrix in the layout (model.md §0).
    let linear = || normal(1.0 / (dims[0] as f32).sqrt());
    let suffix = name.rsplit_once('.').map_or(name, |(head, _)| head);
    let suffix = suffix.rsplit('.').next().unwrap_or(suffix);
    Ok(match role {
        // Unit-std embeddings: the first HC state is the embedding itself.
        Role::Embedding => normal(1.0),
        Role::Dense | Role::ExpertGateUp | Role::ExpertDown => linear(),
        Role::Plain if suffix.ends_with("_fn") => {
            // The HC control sees an RMS-normalised N·D state, so 0.7/sqrt(N·D) keeps the
            // pre-sigmoid / pre-Sinkhorn logits around ±0.7: every stream stays in play.
            normal(0.7 / (dims[0] as f32).sqrt())
        }
        // Position biases are added to compressor gate scores of O(1).
        Role::Plain if suffix.ends_with("_ape") => normal(0.5),
        Role::Plain => linear(),
        Role::Vector if suffix.ends_with("_norm") => Init::Normal {
            mean: 1.0,
            std: 0.1,
        },
        Role::Vector if suffix.ends_with("_scale") => Init::Uniform { lo: 0.5, hi: 1.5 },
        Role::Vector if suffix.ends_with("_base") => normal(0.5),
        // Sinks compete with O(1) attention scores in the softmax denominator.
        Role::Vector if suffix == "attn_sinks" => normal(1.0),
        // The selection bias only nudges routing among sqrt(softplus) scores of O(1).
        Role::Vector if suffix == "exp_probs_b" => normal(0.1),
        Role::TokenTable => Init::ExpertIds {
            n_expert: c.n_expert as u32,
        },
        Role::Vector => return Err(format!("no initialiser for vector tensor '{name}'")),
    })
}

/// Every metadata entry of the model these options describe (`general.*`, `ds4.synthetic*`,
/// all `deepseek4.*` keys of model.md §2.2 and the `tokenizer.*` keys), in file order.
pub fn metadata_for(opts: &SynthOptions) -> Result<Vec<(String, Value)>, String> {
    metadata(opts, &config_for(opts)?)
}

fn metadata(opts: &SynthOptions, c: &Config) -> Result<Vec<(String, Value)>, String> {
    let u = |x: usize| -> Result<Value, String> {
        u32::try_from(x)
            .map(Value::U32)
            .map_err(|_| format!("{x} does not fit a u32 key"))
    };
    let k = |s: &str| format!("{ARCH}.{s}");
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(ARCH.into())),
        (
            "general.name".into(),
            Value::String(format!(
                "ds4 synthetic {} (random weights)",
                opts.profile.name()
            )),
        ),
        (SYNTHETIC_KEY.into(), Value::Bool(true)),
        (
            format!("{SYNTHETIC_KEY}.profile"),
            Value::String(opts.profile.name().into()),
        ),
        (format!("{SYNTHETIC_KEY}.seed"), Value::U64(opts.seed)),
    ];
    for (key, v) in [
        ("context_length", c.context_length),
        ("block_count", c.n_layer),
        ("embedding_length", c.n_embd),
        ("vocab_size", c.n_vocab),
        ("attention.head_count", c.n_head),
        ("attention.head_count_kv", 1),
        ("attention.key_length", c.head_dim),
        ("attention.value_length", c.head_dim),
        ("rope.dimension_count", c.n_rot),
        ("attention.q_lora_rank", c.q_lora_rank),
        ("attention.output_lora_rank", c.o_lora_rank),
        ("attention.output_group_count", c.o_groups),
        ("expert_count", c.n_expert),
        ("expert_used_count", c.n_expert_used),
        ("expert_feed_forward_length", c.n_ff_exp),
        ("expert_shared_count", c.n_expert_shared),
        ("expert_group_count", 0),
        ("expert_group_used_count", 0),
        ("hash_layer_count", c.n_hash_layers),
        ("attention.sliding_window", c.swa),
        ("attention.indexer.head_count", c.idx_heads),
        ("attention.indexer.key_length", c.idx_dim),
        ("attention.indexer.top_k", c.idx_topk),
        ("hyper_connection.count", c.hc),
        ("hyper_connection.sinkhorn_iterations", c.sinkhorn_iters),
        (
            "rope.scaling.original_context_length",
            c.rope_orig_ctx as usize,
        ),
    ] {
        m.push((k(key), u(v)?));
    }
    m.push((
        k("attention.compress_ratios"),
        Value::Array(
            ValueType::U32,
            c.compress_ratios.iter().map(|&r| Value::U32(r)).collect(),
        ),
    ));
    m.push((
        k("swiglu_clamp_exp"),
        Value::Array(
            ValueType::F32,
            c.swiglu_clamp.iter().map(|&x| Value::F32(x)).collect(),
        ),
    ));
    for (key, v) in [
        ("rope.freq_base", c.rope_base as f32),
        ("rope.scaling.factor", c.rope_scale_factor as f32),
        ("rope.scaling.yarn_beta_fast", c.yarn_beta_fast as f32),
        ("rope.scaling.yarn_beta_slow", c.yarn_beta_slow as f32),
        (
            "attention.compress_rope_freq_base",
            c.compress_rope_base as f32,
        ),
        ("expert_weights_scale", c.expert_weights_scale),
        ("attention.layer_norm_rms_epsilon", c.rms_eps),
        ("hyper_connection.epsilon", c.hc_eps),
    ] {
        m.push((k(key), Value::F32(v)));
    }
    m.push((k("expert_weights_norm"), Value::Bool(c.expert_weights_norm)));
    let tok = if c.n_vocab == 129_280 {
        vocab::real_entries()?
    } else {
        vocab::small_entries(c.n_vocab)?
    };
    m.extend(tok);
    Ok(m)
}

/// The tensor plan of a config: every tensor of the ds4 layout, typed as ds4 stores it.
pub fn plan(c: &Config, experts: ExpertQuant) -> Result<Vec<PlannedTensor>, String> {
    expected_tensors(c)
        .into_iter()
        .map(|e| {
            let ty = e.role.ds4_type(experts);
            let init = init_for(c, &e.name, &e.dims, e.role)?;
            fill::check(&e.name, ty, init)?;
            Ok(PlannedTensor {
                spec: TensorSpec::new(e.name, &e.dims, ty),
                init,
            })
        })
        .collect()
}

/// The writer (metadata + tensor directory, no data yet) and the filler that produces each
/// tensor's bytes. Nothing is generated until the writer's `write`/`to_bytes` runs, so a
/// full-size Flash directory costs nothing to inspect.
pub fn writer(opts: &SynthOptions) -> Result<(GgufWriter, Filler), String> {
    let c = config_for(opts)?;
    let tensors = plan(&c, opts.profile.experts())?;
    let mut w = GgufWriter::new();
    for (k, v) in metadata(opts, &c)? {
        w.add_metadata(k, v).map_err(|e| e.to_string())?;
    }
    for t in &tensors {
        w.add_tensor(t.spec.clone()).map_err(|e| e.to_string())?;
    }
    if opts.profile.is_flash() && opts.layers.is_none_or(|n| n == 43) {
        // Guard the promise of the flash profiles: the full-depth model is Flash exactly.
        let m = c.flash_mismatches();
        if !m.is_empty() {
            return Err(format!("flash profile is not Flash: {}", m.join("; ")));
        }
    }
    Ok((
        w,
        Filler {
            seed: opts.seed,
            tensors,
        },
    ))
}

/// Builds the whole model image in memory (no file) and parses it.
pub fn build_in_memory(opts: &SynthOptions) -> Result<Arc<GgufFile>, String> {
    let (w, f) = writer(opts)?;
    w.to_gguf(|i, spec, buf| f.fill(i, spec, buf))
        .map(Arc::new)
        .map_err(|e| format!("building the synthetic model in memory: {e}"))
}

/// Writes the model to `path` (atomically). `progress(done, total)` is called after each
/// tensor with bytes of tensor data produced so far.
pub fn write_file(
    opts: &SynthOptions,
    path: impl AsRef<Path>,
    mut progress: impl FnMut(u64, u64),
) -> Result<Summary, String> {
    let (w, f) = writer(opts)?;
    let summary = Summary::of(&w);
    let total = summary.tensor_bytes;
    let mut done = 0u64;
    w.write_file(path, |i, spec, buf| {
        f.fill(i, spec, buf)?;
        done += buf.len() as u64;
        progress(done, total);
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok(summary)
}

/// Counts of a model layout: tensors, bytes, and per type (count, bytes).
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub n_tensors: usize,
    pub file_bytes: u64,
    pub tensor_bytes: u64,
    pub by_type: BTreeMap<&'static str, (usize, u64)>,
}

impl Summary {
    pub fn of(w: &GgufWriter) -> Summary {
        let mut by_type: BTreeMap<&'static str, (usize, u64)> = BTreeMap::new();
        let mut tensor_bytes = 0;
        for t in w.tensors() {
            let n = t.n_bytes().unwrap_or(0);
            let e = by_type.entry(t.ty.name()).or_default();
            e.0 += 1;
            e.1 += n;
            tensor_bytes += n;
        }
        Summary {
            n_tensors: w.tensors().len(),
            file_bytes: w.file_size(),
            tensor_bytes,
            by_type,
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tensors, {} bytes ({:.2} GiB):",
            self.n_tensors,
            self.file_bytes,
            self.file_bytes as f64 / (1u64 << 30) as f64
        )?;
        for (ty, (n, bytes)) in &self.by_type {
            write!(
                f,
                " {ty} {n} ({:.1} MiB)",
                *bytes as f64 / (1u64 << 20) as f64
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_follows_roles_and_names() {
        let c = config_for(&SynthOptions::new(Profile::Tiny)).unwrap();
        let p = plan(&c, ExpertQuant::Q2).unwrap();
        let get = |n: &str| p.iter().find(|t| t.spec.name == n).unwrap().init;
        let n = |mean, std| Init::Normal { mean, std };
        assert_eq!(get("token_embd.weight"), n(0.0, 1.0));
        assert_eq!(get("blk.0.attn_q_a.weight"), n(0.0, 1.0 / 16.0));
        assert_eq!(get("blk.0.attn_q_b.weight"), n(0.0, 1.0 / 8.0));
        assert_eq!(get("blk.0.ffn_down_exps.weight"), n(0.0, 1.0 / 16.0));
        assert_eq!(get("blk.0.hc_attn_fn.weight"), n(0.0, 0.7 / 32.0));
        assert_eq!(get("output_hc_fn.weight"), n(0.0, 0.7 / 32.0));
        assert_eq!(get("blk.2.attn_compressor_ape.weight"), n(0.0, 0.5));
        assert_eq!(get("blk.2.indexer.proj.weight"), n(0.0, 1.0 / 16.0));
        assert_eq!(get("blk.0.attn_norm.weight"), n(1.0, 0.1));
        assert_eq!(get("blk.2.indexer_compressor_norm.weight"), n(1.0, 0.1));
        assert_eq!(get("output_norm.weight"), n(1.0, 0.1));
        assert_eq!(
            get("output_hc_scale.weight"),
            Init::Uniform { lo: 0.5, hi: 1.5 }
        );
        assert_eq!(get("blk.0.hc_ffn_base.weight"), n(0.0, 0.5));
        assert_eq!(get("blk.0.attn_sinks.weight"), n(0.0, 1.0));
        assert_eq!(get("blk.3.exp_probs_b.bias"), n(0.0, 0.1));
        assert_eq!(
            get("blk.1.ffn_gate_tid2eid.weight"),
            Init::ExpertIds { n_expert: 4 }
        );
    }
}
