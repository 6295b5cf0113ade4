//! Engine options: numeric mode, QAT simulations, context size.

/// How a session computes (model.md §3.9, reference README §1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    /// Exact mode: f32 activations into every projection (weights dequantized exactly, no
    /// Q8_0/Q8_K activation quantization) and raw / compressed / indexer rows stored in f32.
    /// Off = production numerics like ds4: activations quantized per weight type and stored
    /// rows rounded to F16 precision.
    pub exact: bool,
    /// The official FP8 KV and indexer FP4 (Hadamard) QAT simulations (model.md §3.0).
    pub qat_sim: bool,
    /// Largest number of positions a session may hold; `None` = the model's
    /// `context_length`. Memory grows with use, not with this number.
    pub ctx: Option<usize>,
    /// Tokens per internal prefill chunk (bounds the prefill scratch memory).
    pub prefill_chunk: usize,
}

/// Hard upper bound on `ctx` (the model's `max_position_embeddings`, model.md §1).
pub const MAX_CTX: usize = 1 << 20;

/// Default internal prefill chunk (ds4's default, model.md §3.7).
pub const DEFAULT_PREFILL_CHUNK: usize = 2048;

impl EngineOptions {
    /// Production numerics (ds4-like), QAT simulations on.
    pub fn production() -> EngineOptions {
        EngineOptions {
            exact: false,
            qat_sim: true,
            ctx: None,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        }
    }

    /// Exact mode with the given QAT switch (the golden fixtures: QAT off except
    /// `tiny-q2-qat`).
    pub fn exact(qat_sim: bool) -> EngineOptions {
        EngineOptions {
            exact: true,
            qat_sim,
            ..EngineOptions::production()
        }
    }

    /// Sets the context size.
    pub fn with_ctx(mut self, ctx: usize) -> EngineOptions {
        self.ctx = Some(ctx);
        self
    }
}

impl Default for EngineOptions {
    fn default() -> EngineOptions {
        EngineOptions::production()
    }
}
