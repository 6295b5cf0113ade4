//! Model hyperparameters read from GGUF metadata (model.md §1, §2.2).
//!
//! Every shape comes from the `deepseek4.*` keys, so the same code runs the full Flash model
//! and the tiny test models. [`Config::flash_mismatches`] tells whether a file is exactly the
//! published Flash profile.

use crate::gguf::{GgufFile, Value};

/// Architecture prefix of every model key.
pub const ARCH: &str = "deepseek4";

/// Hyperparameters of a DeepSeek V4 model.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub n_layer: usize,
    /// Model dim `D`.
    pub n_embd: usize,
    pub n_vocab: usize,
    /// Query heads `H`.
    pub n_head: usize,
    /// Head dim `Dh` (key = value length; one shared KV head).
    pub head_dim: usize,
    /// RoPE dims `R` (the last `R` dims of each head).
    pub n_rot: usize,
    pub q_lora_rank: usize,
    /// Output LoRA rank per group `Lo`.
    pub o_lora_rank: usize,
    /// Output groups `G`.
    pub o_groups: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    /// Expert FFN dim (routed and shared).
    pub n_ff_exp: usize,
    pub n_expert_shared: usize,
    /// Layers `il < n_hash_layers` route by the `tid2eid` table.
    pub n_hash_layers: usize,
    /// Raw sliding-window rows (including the current token).
    pub swa: usize,
    pub idx_heads: usize,
    pub idx_dim: usize,
    pub idx_topk: usize,
    /// Hyper-connection streams `N`.
    pub hc: usize,
    pub sinkhorn_iters: usize,
    /// Compression ratio per layer: 0 (sliding only), 4 (CSA) or 128 (HCA).
    pub compress_ratios: Vec<u32>,
    /// SwiGLU clamp per layer.
    pub swiglu_clamp: Vec<f32>,
    pub rope_base: f64,
    pub compress_rope_base: f64,
    pub rope_scale_factor: f64,
    pub rope_orig_ctx: f64,
    pub yarn_beta_fast: f64,
    pub yarn_beta_slow: f64,
    pub expert_weights_scale: f32,
    pub expert_weights_norm: bool,
    pub rms_eps: f32,
    pub hc_eps: f32,
    /// Trained context length (printed, not enforced; model.md §1).
    pub context_length: usize,
}

/// A problem with the metadata, collected so that one message lists every problem.
fn missing(key: &str) -> String {
    format!("missing metadata key '{ARCH}.{key}'")
}

struct Reader<'a> {
    g: &'a GgufFile,
    errors: Vec<String>,
}

impl Reader<'_> {
    fn value(&mut self, key: &str) -> Option<&Value> {
        let v = self.g.get(&format!("{ARCH}.{key}"));
        if v.is_none() {
            self.errors.push(missing(key));
        }
        v
    }

    fn usize(&mut self, key: &str) -> usize {
        match self.value(key).map(|v| (v.as_u64(), v.to_string())) {
            Some((Some(x), _)) if x <= u32::MAX as u64 => x as usize,
            Some((_, shown)) => {
                self.errors.push(format!(
                    "'{ARCH}.{key}' must be a non-negative integer, found {shown}"
                ));
                0
            }
            None => 0,
        }
    }

    fn opt_usize(&mut self, key: &str) -> Option<usize> {
        self.g.get(&format!("{ARCH}.{key}"))?;
        Some(self.usize(key))
    }

    fn f64(&mut self, key: &str) -> f64 {
        match self.value(key).map(|v| (v.as_f64(), v.to_string())) {
            Some((Some(x), _)) if x.is_finite() => x,
            Some((_, shown)) => {
                self.errors.push(format!(
                    "'{ARCH}.{key}' must be a finite number, found {shown}"
                ));
                0.0
            }
            None => 0.0,
        }
    }

    fn array<T>(&mut self, key: &str, conv: impl Fn(&Value) -> Option<T>) -> Vec<T> {
        let Some(v) = self.value(key) else {
            return Vec::new();
        };
        let shown = v.to_string();
        match v
            .as_array()
            .and_then(|items| items.iter().map(&conv).collect::<Option<Vec<T>>>())
        {
            Some(xs) => xs,
            None => {
                self.errors
                    .push(format!("'{ARCH}.{key}' has the wrong type: {shown}"));
                Vec::new()
            }
        }
    }
}

impl Config {
    /// Reads and sanity-checks the hyperparameters. The error lists every problem found.
    pub fn from_gguf(g: &GgufFile) -> Result<Config, String> {
        let mut r = Reader {
            g,
            errors: Vec::new(),
        };
        let n_layer = r.usize("block_count");
        let head_dim = r.usize("attention.key_length");
        let value_length = r.usize("attention.value_length");
        let n_head_kv = r.usize("attention.head_count_kv");
        let cfg = Config {
            n_layer,
            n_embd: r.usize("embedding_length"),
            n_vocab: r.usize("vocab_size"),
            n_head: r.usize("attention.head_count"),
            head_dim,
            n_rot: r.usize("rope.dimension_count"),
            q_lora_rank: r.usize("attention.q_lora_rank"),
            o_lora_rank: r.usize("attention.output_lora_rank"),
            o_groups: r.usize("attention.output_group_count"),
            n_expert: r.usize("expert_count"),
            n_expert_used: r.usize("expert_used_count"),
            n_ff_exp: r.usize("expert_feed_forward_length"),
            n_expert_shared: r.usize("expert_shared_count"),
            n_hash_layers: r.usize("hash_layer_count"),
            swa: r.usize("attention.sliding_window"),
            idx_heads: r.usize("attention.indexer.head_count"),
            idx_dim: r.usize("attention.indexer.key_length"),
            idx_topk: r.usize("attention.indexer.top_k"),
            hc: r.usize("hyper_connection.count"),
            sinkhorn_iters: r.usize("hyper_connection.sinkhorn_iterations"),
            compress_ratios: r.array("attention.compress_ratios", |v| {
                v.as_u64().and_then(|x| u32::try_from(x).ok())
            }),
            swiglu_clamp: r.array("swiglu_clamp_exp", |v| v.as_f64().map(|x| x as f32)),
            rope_base: r.f64("rope.freq_base"),
            compress_rope_base: r.f64("attention.compress_rope_freq_base"),
            rope_scale_factor: r.f64("rope.scaling.factor"),
            rope_orig_ctx: r.f64("rope.scaling.original_context_length"),
            yarn_beta_fast: r.f64("rope.scaling.yarn_beta_fast"),
            yarn_beta_slow: r.f64("rope.scaling.yarn_beta_slow"),
            expert_weights_scale: r.f64("expert_weights_scale") as f32,
            expert_weights_norm: match r.value("expert_weights_norm").map(Value::as_bool) {
                Some(Some(b)) => b,
                Some(None) => {
                    r.errors
                        .push(format!("'{ARCH}.expert_weights_norm' must be a bool"));
                    true
                }
                None => true,
            },
            rms_eps: r.f64("attention.layer_norm_rms_epsilon") as f32,
            hc_eps: r.f64("hyper_connection.epsilon") as f32,
            context_length: g
                .get(&format!("{ARCH}.context_length"))
                .and_then(Value::as_u64)
                .unwrap_or(1 << 20) as usize,
        };
        for key in ["expert_group_count", "expert_group_used_count"] {
            if let Some(n) = r.opt_usize(key) {
                if n != 0 {
                    r.errors.push(format!(
                        "'{ARCH}.{key}' = {n}: group-limited routing is not part of DeepSeek V4"
                    ));
                }
            }
        }
        let mut errors = r.errors;
        if errors.is_empty() {
            cfg.check(&mut errors, value_length, n_head_kv);
        }
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(errors.join("\n"))
        }
    }

    /// Structural checks every DeepSeek V4 model must pass (any size).
    fn check(&self, e: &mut Vec<String>, value_length: usize, n_head_kv: usize) {
        let mut need = |ok: bool, msg: String| {
            if !ok {
                e.push(msg);
            }
        };
        for (name, v) in [
            ("block_count", self.n_layer),
            ("embedding_length", self.n_embd),
            ("vocab_size", self.n_vocab),
            ("attention.head_count", self.n_head),
            ("attention.key_length", self.head_dim),
            ("attention.q_lora_rank", self.q_lora_rank),
            ("attention.output_lora_rank", self.o_lora_rank),
            ("attention.output_group_count", self.o_groups),
            ("expert_count", self.n_expert),
            ("expert_used_count", self.n_expert_used),
            ("expert_feed_forward_length", self.n_ff_exp),
            ("attention.sliding_window", self.swa),
            ("hyper_connection.count", self.hc),
            ("hyper_connection.sinkhorn_iterations", self.sinkhorn_iters),
        ] {
            need(v > 0, format!("'{ARCH}.{name}' must be positive"));
        }
        need(
            n_head_kv == 1,
            format!("one shared KV head expected, found head_count_kv = {n_head_kv}"),
        );
        need(
            value_length == self.head_dim,
            format!(
                "value_length {value_length} must equal key_length {} (K = V)",
                self.head_dim
            ),
        );
        need(
            self.n_rot > 0 && self.n_rot.is_multiple_of(2) && self.n_rot <= self.head_dim,
            format!(
                "rope dimension count {} must be even and at most the head dim {}",
                self.n_rot, self.head_dim
            ),
        );
        need(
            self.n_expert_used <= self.n_expert,
            format!(
                "expert_used_count {} exceeds expert_count {}",
                self.n_expert_used, self.n_expert
            ),
        );
        need(
            self.n_expert_shared == 1,
            format!(
                "exactly one shared expert expected, found {}",
                self.n_expert_shared
            ),
        );
        need(
            self.o_groups > 0 && self.n_head.is_multiple_of(self.o_groups),
            format!(
                "head count {} is not divisible by the {} output groups",
                self.n_head, self.o_groups
            ),
        );
        need(
            self.n_hash_layers <= self.n_layer,
            format!(
                "hash_layer_count {} exceeds block_count {}",
                self.n_hash_layers, self.n_layer
            ),
        );
        need(
            self.compress_ratios.len() >= self.n_layer,
            format!(
                "compress_ratios has {} entries for {} layers",
                self.compress_ratios.len(),
                self.n_layer
            ),
        );
        need(
            self.swiglu_clamp.len() >= self.n_layer,
            format!(
                "swiglu_clamp_exp has {} entries for {} layers",
                self.swiglu_clamp.len(),
                self.n_layer
            ),
        );
        let mut any_csa = false;
        for (il, &r) in self.compress_ratios.iter().take(self.n_layer).enumerate() {
            need(
                matches!(r, 0 | 4 | 128),
                format!("layer {il}: compress ratio {r} (0, 4 or 128 expected)"),
            );
            any_csa |= r == 4;
        }
        if any_csa {
            need(
                self.idx_heads > 0 && self.idx_dim >= self.n_rot && self.idx_topk > 0,
                format!(
                    "ratio-4 layers need an indexer: heads {}, key length {} (>= rope dims {}), top_k {}",
                    self.idx_heads, self.idx_dim, self.n_rot, self.idx_topk
                ),
            );
            need(
                self.idx_dim.is_power_of_two(),
                format!(
                    "indexer key length {} must be a power of two (Hadamard)",
                    self.idx_dim
                ),
            );
        }
        for (name, v) in [
            ("rope.freq_base", self.rope_base),
            ("attention.compress_rope_freq_base", self.compress_rope_base),
            ("rope.scaling.factor", self.rope_scale_factor),
            ("rope.scaling.original_context_length", self.rope_orig_ctx),
            ("rope.scaling.yarn_beta_fast", self.yarn_beta_fast),
            ("rope.scaling.yarn_beta_slow", self.yarn_beta_slow),
        ] {
            need(
                v > 0.0,
                format!("'{ARCH}.{name}' must be positive, found {v}"),
            );
        }
        need(
            self.rms_eps > 0.0,
            "layer_norm_rms_epsilon must be positive".into(),
        );
        need(
            self.hc_eps > 0.0,
            "hyper_connection.epsilon must be positive".into(),
        );
    }

    /// Compression ratio of layer `il` (0, 4 or 128).
    pub fn ratio(&self, il: usize) -> usize {
        self.compress_ratios[il] as usize
    }

    /// Whether layer `il` routes experts by the token-id table.
    pub fn is_hash_layer(&self, il: usize) -> bool {
        il < self.n_hash_layers
    }

    /// Main compressor width `W` = `coff·Dh` (model.md §1.2).
    pub fn compressor_width(&self, ratio: usize) -> usize {
        if ratio == 4 {
            2 * self.head_dim
        } else {
            self.head_dim
        }
    }

    /// Hyper-connection control width `(2+N)·N`.
    pub fn hc_mix(&self) -> usize {
        (2 + self.hc) * self.hc
    }

    /// Checks the file is exactly the published DeepSeek V4 Flash profile (model.md §2.2).
    /// Returns every mismatch; empty means Flash.
    pub fn flash_mismatches(&self) -> Vec<String> {
        let mut e = Vec::new();
        let mut int = |name: &str, have: usize, want: usize| {
            if have != want {
                e.push(format!("{name} = {have} (Flash: {want})"));
            }
        };
        int("block_count", self.n_layer, 43);
        int("embedding_length", self.n_embd, 4096);
        int("vocab_size", self.n_vocab, 129280);
        int("attention.head_count", self.n_head, 64);
        int("attention.key_length", self.head_dim, 512);
        int("rope.dimension_count", self.n_rot, 64);
        int("attention.q_lora_rank", self.q_lora_rank, 1024);
        int("attention.output_lora_rank", self.o_lora_rank, 1024);
        int("attention.output_group_count", self.o_groups, 8);
        int("expert_count", self.n_expert, 256);
        int("expert_used_count", self.n_expert_used, 6);
        int("expert_feed_forward_length", self.n_ff_exp, 2048);
        int("expert_shared_count", self.n_expert_shared, 1);
        int("hash_layer_count", self.n_hash_layers, 3);
        int("attention.sliding_window", self.swa, 128);
        int("attention.indexer.head_count", self.idx_heads, 64);
        int("attention.indexer.key_length", self.idx_dim, 128);
        int("attention.indexer.top_k", self.idx_topk, 512);
        int("hyper_connection.count", self.hc, 4);
        int(
            "hyper_connection.sinkhorn_iterations",
            self.sinkhorn_iters,
            20,
        );
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1e-30);
        for (name, have, want) in [
            (
                "rope.scaling.original_context_length",
                self.rope_orig_ctx,
                65536.0,
            ),
            ("rope.freq_base", self.rope_base, 10000.0),
            ("rope.scaling.factor", self.rope_scale_factor, 16.0),
            ("rope.scaling.yarn_beta_fast", self.yarn_beta_fast, 32.0),
            ("rope.scaling.yarn_beta_slow", self.yarn_beta_slow, 1.0),
            (
                "attention.compress_rope_freq_base",
                self.compress_rope_base,
                160000.0,
            ),
            (
                "expert_weights_scale",
                self.expert_weights_scale as f64,
                1.5,
            ),
            (
                "attention.layer_norm_rms_epsilon",
                self.rms_eps as f64,
                1e-6,
            ),
            ("hyper_connection.epsilon", self.hc_eps as f64, 1e-6),
        ] {
            if !close(have, want) {
                e.push(format!("{name} = {have} (Flash: {want})"));
            }
        }
        if !self.expert_weights_norm {
            e.push("expert_weights_norm = false (Flash: true)".into());
        }
        for il in 0..self.n_layer.min(43) {
            let want = flash_ratio(il);
            if self.compress_ratios.get(il) != Some(&want) {
                e.push(format!(
                    "compress_ratios[{il}] = {:?} (Flash: {want})",
                    self.compress_ratios.get(il)
                ));
            }
            if self
                .swiglu_clamp
                .get(il)
                .is_none_or(|&c| !close(c as f64, 10.0))
            {
                e.push(format!(
                    "swiglu_clamp_exp[{il}] = {:?} (Flash: 10)",
                    self.swiglu_clamp.get(il)
                ));
            }
        }
        e
    }

    /// A short human description: "Flash" or the shape of a test model.
    pub fn profile_name(&self) -> String {
        if self.flash_mismatches().is_empty() {
            "DeepSeek V4 Flash".into()
        } else {
            format!(
                "DeepSeek V4 (custom shape: {} layers, dim {}, {} heads x {}, {} experts top-{}, vocab {})",
                self.n_layer, self.n_embd, self.n_head, self.head_dim, self.n_expert, self.n_expert_used, self.n_vocab
            )
        }
    }
}

/// Flash's attention schedule: layers 0-1 sliding only, then ratio 4 on even and 128 on odd
/// layers (model.md §1.1).
pub fn flash_ratio(il: usize) -> u32 {
    if il < 2 {
        0
    } else if il.is_multiple_of(2) {
        4
    } else {
        128
    }
}
