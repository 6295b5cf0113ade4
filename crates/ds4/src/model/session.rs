//! Sessions: one KV state per conversation (model.md §4), prefill in chunks, decode,
//! logits, snapshot and restore.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::sync::Arc;

use super::cache::LayerCache;
use super::forward::{forward, Scratch, Want};
use super::options::{BackendChoice, EngineOptions, MAX_CTX};
use super::Model;
use crate::backend::cuda::{GpuModel, GpuSession};
use crate::sample::{argmax, Sampler};

/// Why a session call failed. The session is unchanged by a refused call; a cancelled
/// prefill keeps the chunks it finished.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error(
        "context full: {pos} tokens in the session + {n} new exceed the context of {ctx} tokens"
    )]
    ContextFull { pos: usize, n: usize, ctx: usize },
    #[error("token id {token} at index {index} is out of range (vocabulary of {vocab})")]
    BadToken {
        token: u32,
        index: usize,
        vocab: usize,
    },
    #[error("prefill cancelled after {done} of {total} tokens")]
    Cancelled { done: usize, total: usize },
    #[error("invalid engine options: {0}")]
    Options(String),
    #[error("invalid session snapshot: {0}")]
    Snapshot(String),
    #[error("GPU backend: {0}")]
    Backend(String),
}

/// An inference session over a shared model.
pub struct Session {
    pub(crate) model: Arc<Model>,
    pub(crate) opts: EngineOptions,
    pub(crate) ctx: usize,
    pub(crate) caches: Vec<LayerCache>,
    pub(crate) tokens: Vec<u32>,
    /// Logits of the last position on the host. A GPU session leaves them on the device after
    /// each step (only the sampled token needs to cross the bus) and fills this on first use.
    pub(crate) logits: OnceCell<Vec<f32>>,
    scratch: Scratch,
    /// The CUDA state when this session runs on the GPU (`caches` is then unused).
    pub(crate) gpu: Option<Box<GpuSession>>,
}

/// Resolves the backend choice: the GPU model to use, or `None` for the CPU.
fn choose_backend(
    model: &Model,
    opts: &EngineOptions,
) -> Result<Option<Arc<GpuModel>>, SessionError> {
    match opts.backend {
        BackendChoice::Cpu => Ok(None),
        BackendChoice::Cuda => model
            .upload_cuda(&mut |_, _| {})
            .map(Some)
            .map_err(SessionError::Backend),
        BackendChoice::Auto => match model.upload_cuda(&mut |_, _| {}) {
            Ok(g) => Ok(Some(g)),
            Err(why) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| eprintln!("ds4: running on the CPU ({why})"));
                Ok(None)
            }
        },
    }
}

fn gpu_err(e: crate::backend::cuda::CudaError) -> SessionError {
    SessionError::Backend(e.to_string())
}

impl Session {
    /// An empty session (position 0).
    pub fn new(model: Arc<Model>, opts: EngineOptions) -> Result<Session, SessionError> {
        let ctx = check_options(&model, &opts)?;
        let gpu = match choose_backend(&model, &opts)? {
            Some(gm) => Some(Box::new(
                GpuSession::new(gm, &model, ctx, opts.exact, opts.qat_sim).map_err(gpu_err)?,
            )),
            None => None,
        };
        let caches = if gpu.is_some() {
            Vec::new()
        } else {
            (0..model.cfg.n_layer)
                .map(|il| LayerCache::new(&model.cfg, il, ctx))
                .collect()
        };
        Ok(Session {
            model,
            opts,
            ctx,
            caches,
            tokens: Vec::new(),
            logits: OnceCell::from(Vec::new()),
            scratch: Scratch::default(),
            gpu,
        })
    }

    /// Runs one untimed prefill of a full GPU chunk and one decode step on a throwaway GPU
    /// session, so that the process's first-use costs (cuBLAS handles and heuristics, lazily
    /// loaded kernels, the device allocator's first growth: ~0.14 s on the full Flash model)
    /// are paid at startup instead of by the first request. Returns the time it took, or
    /// `None` when `opts` resolve to the CPU (nothing to warm).
    pub fn warm_up(
        model: Arc<Model>,
        opts: &EngineOptions,
    ) -> Result<Option<std::time::Duration>, SessionError> {
        if opts.backend == BackendChoice::Cpu {
            return Ok(None);
        }
        let t0 = std::time::Instant::now();
        // The chunk the sessions of `opts`' context will take (the GEMM shapes to warm).
        let ctx = opts.ctx.unwrap_or(model.cfg.context_length);
        let n = crate::backend::cuda::session::gpu_chunk(ctx).min(ctx.max(3) - 2);
        let mut s = Session::new(model, opts.clone().with_ctx(n + 2))?;
        if s.gpu.is_none() {
            return Ok(None);
        }
        let vocab = s.model.cfg.n_vocab as u32;
        let ids: Vec<u32> = (0..n as u32).map(|i| (7 + 13 * i) % vocab).collect();
        s.prefill(&ids)?;
        let next = s.argmax();
        s.decode(next)?;
        Ok(Some(t0.elapsed()))
    }

    /// Processes `tokens` at the next positions (any length; internally in chunks of
    /// `prefill_chunk`). Afterwards [`Session::logits`] holds the last position's logits.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<(), SessionError> {
        self.prefill_with(tokens, &mut |_, _| true)
    }

    /// [`Session::prefill`] that reports progress after each internal chunk:
    /// `progress(done, total)` returns false to cancel (the finished chunks stay in the
    /// session, and the call returns [`SessionError::Cancelled`]).
    pub fn prefill_with(
        &mut self,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<(), SessionError> {
        self.run(tokens, None, progress)
    }

    /// Like [`Session::prefill`] but returns the logits of every position of `tokens`
    /// (`tokens.len() × vocab`, row-major).
    pub fn prefill_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SessionError> {
        let mut all = Vec::with_capacity(tokens.len() * self.model.cfg.n_vocab);
        self.run(tokens, Some(&mut all), &mut |_, _| true)?;
        Ok(all)
    }

    /// Processes one token at the next position.
    pub fn decode(&mut self, token: u32) -> Result<(), SessionError> {
        self.run(&[token], None, &mut |_, _| true)
    }

    /// Logits of the last processed position (empty before the first token). On the GPU
    /// this downloads them on first use after a step; [`Session::sample`] and
    /// [`Session::argmax`] usually need not.
    pub fn logits(&self) -> &[f32] {
        self.logits.get_or_init(|| match &self.gpu {
            Some(g) => g.last_logits().unwrap_or_else(|e| {
                eprintln!("ds4: reading the logits from the GPU failed: {e}");
                Vec::new()
            }),
            None => Vec::new(),
        })
    }

    /// [`Session::logits`] with the device error, if any.
    pub(crate) fn try_logits(&self) -> Result<&[f32], SessionError> {
        if let (Some(g), None) = (&self.gpu, self.logits.get()) {
            let row = g.last_logits().map_err(gpu_err)?;
            return Ok(self.logits.get_or_init(|| row));
        }
        Ok(self.logits())
    }

    /// The most likely next token (lowest id on ties), as [`crate::sample::argmax`] of
    /// [`Session::logits`]; on the GPU only the id comes back.
    pub fn argmax(&self) -> u32 {
        if let (Some(g), None) = (&self.gpu, self.logits.get()) {
            match g.narrow(f32::INFINITY, 1.0, 0) {
                Ok(n) => return n.best,
                Err(e) => eprintln!("ds4: GPU argmax failed, using the host logits: {e}"),
            }
        }
        argmax(self.logits())
    }

    /// Draws the next token with `sampler`, exactly as `sampler.sample(self.logits())`. On
    /// the GPU, greedy decoding and the min-p-only rule (ds4's defaults) bring back only the
    /// tokens that can be drawn; other settings read the whole row.
    pub fn sample(&self, sampler: &mut Sampler) -> u32 {
        if let (Some(g), None) = (&self.gpu, self.logits.get()) {
            if sampler.cfg.temperature <= 0.0 {
                return self.argmax();
            }
            if let Some(cut) = sampler.sparse_cut() {
                // Enough for any min-p set of a real model; more falls back to the row.
                const CAP: usize = 16384;
                match g.narrow(cut, 1.0 / sampler.cfg.temperature, CAP) {
                    Ok(n) => {
                        if let Some(c) = &n.candidates {
                            return sampler.sample_sparse(n.best, n.max, c);
                        }
                    }
                    Err(e) => eprintln!("ds4: GPU sampling failed, using the host logits: {e}"),
                }
            }
        }
        sampler.sample(self.logits())
    }

    /// Number of positions processed (the next token's position).
    pub fn pos(&self) -> usize {
        self.tokens.len()
    }

    /// Every token processed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The context size (most positions this session accepts).
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// The backend this session runs on (`Cpu` or `Cuda`, never `Auto`).
    pub fn backend(&self) -> BackendChoice {
        if self.gpu.is_some() {
            BackendChoice::Cuda
        } else {
            BackendChoice::Cpu
        }
    }

    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Bytes of KV state currently held (raw windows, compressor frontiers, rows).
    pub fn state_bytes(&self) -> usize {
        match &self.gpu {
            Some(g) => g.state_bytes(self.pos()),
            None => self.caches.iter().map(LayerCache::bytes).sum(),
        }
    }

    /// The layer caches in host memory (downloaded from the GPU for a CUDA session): the
    /// common form snapshots are written from, so both backends write the same bytes.
    pub(crate) fn host_caches(&self) -> Result<Cow<'_, [LayerCache]>, SessionError> {
        match &self.gpu {
            Some(g) => Ok(Cow::Owned(
                g.to_caches(&self.model, self.pos()).map_err(gpu_err)?,
            )),
            None => Ok(Cow::Borrowed(&self.caches)),
        }
    }

    /// Checks `tokens` fit and are valid, then runs them chunk by chunk.
    fn run(
        &mut self,
        tokens: &[u32],
        mut all: Option<&mut Vec<f32>>,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<(), SessionError> {
        let vocab = self.model.cfg.n_vocab;
        if let Some((index, &token)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return Err(SessionError::BadToken {
                token,
                index,
                vocab,
            });
        }
        if self.pos() + tokens.len() > self.ctx {
            return Err(SessionError::ContextFull {
                pos: self.pos(),
                n: tokens.len(),
                ctx: self.ctx,
            });
        }
        let model = Arc::clone(&self.model);
        let total = tokens.len();
        let mut done = 0;
        let mut rows = Vec::new();
        // On the GPU a step is at least the chunk its scratch is sized for (the GPU splits
        // longer steps itself): the routed experts get more tokens per decoded weight.
        let step = match self.gpu.as_ref() {
            Some(g) => self.opts.prefill_chunk.max(g.chunk_len()),
            None => self.opts.prefill_chunk,
        };
        for chunk in tokens.chunks(step.max(1)) {
            let pos = self.pos();
            let want = if all.is_some() { Want::All } else { Want::Last };
            match self.gpu.as_mut() {
                Some(g) => {
                    rows.clear();
                    g.forward(&model, chunk, pos, want == Want::All, &mut rows)
                        .map_err(gpu_err)?;
                }
                None => forward(
                    &model,
                    self.opts.exact,
                    self.opts.qat_sim,
                    &mut self.caches,
                    chunk,
                    pos,
                    want,
                    &mut self.scratch,
                    &mut rows,
                ),
            }
            self.tokens.extend_from_slice(chunk);
            // A GPU step without `all` returns no rows: the logits stay on the device.
            self.logits = if rows.len() >= vocab {
                OnceCell::from(rows[rows.len() - vocab..].to_vec())
            } else {
                OnceCell::new()
            };
            if let Some(all) = all.as_deref_mut() {
                all.extend_from_slice(&rows);
            }
            done += chunk.len();
            if !progress(done, total) && done < total {
                return Err(SessionError::Cancelled { done, total });
            }
        }
        Ok(())
    }
}

/// Validates options against the model; returns the context size.
pub(crate) fn check_options(model: &Model, opts: &EngineOptions) -> Result<usize, SessionError> {
    let cfg = &model.cfg;
    let ctx = opts.ctx.unwrap_or(cfg.context_length.min(MAX_CTX));
    let max = MAX_CTX.max(cfg.context_length);
    if ctx == 0 || ctx > max {
        return Err(SessionError::Options(format!(
            "context size {ctx} must be between 1 and {max}"
        )));
    }
    if opts.prefill_chunk == 0 {
        return Err(SessionError::Options(
            "prefill chunk must be positive".into(),
        ));
    }
    if opts.qat_sim {
        let nope = cfg.head_dim - cfg.n_rot;
        if !nope.is_multiple_of(64) {
            return Err(SessionError::Options(format!(
                "QAT simulation needs the non-RoPE head dims ({nope}) in blocks of 64"
            )));
        }
        let any_csa = (0..cfg.n_layer).any(|il| cfg.ratio(il) == 4);
        if any_csa && (cfg.idx_dim < 32 || !cfg.idx_dim.is_power_of_two()) {
            return Err(SessionError::Options(format!(
                "QAT simulation needs a power-of-two indexer key length >= 32, found {}",
                cfg.idx_dim
            )));
        }
    }
    Ok(ctx)
}

impl Session {
    /// Assembles a session from restored parts (used by snapshot restore); on the GPU the
    /// caches are uploaded.
    pub(crate) fn from_parts(
        model: Arc<Model>,
        opts: EngineOptions,
        ctx: usize,
        caches: Vec<LayerCache>,
        tokens: Vec<u32>,
        logits: Vec<f32>,
    ) -> Result<Session, SessionError> {
        let (gpu, caches) = match choose_backend(&model, &opts)? {
            Some(gm) => {
                let g = GpuSession::from_caches(
                    gm,
                    &model,
                    ctx,
                    opts.exact,
                    opts.qat_sim,
                    &caches,
                    tokens.len(),
                )
                .map_err(gpu_err)?;
                (Some(Box::new(g)), Vec::new())
            }
            None => (None, caches),
        };
        Ok(Session {
            model,
            opts,
            ctx,
            caches,
            tokens,
            logits: OnceCell::from(logits),
            scratch: Scratch::default(),
            gpu,
        })
    }
}
