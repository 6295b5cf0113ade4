//! Sessions: one KV state per conversation (model.md §4), prefill in chunks, decode,
//! logits, snapshot and restore.

use std::sync::Arc;

use super::cache::LayerCache;
use super::forward::{forward, Scratch, Want};
use super::options::{EngineOptions, MAX_CTX};
use super::Model;

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
}

/// An inference session over a shared model.
pub struct Session {
    pub(crate) model: Arc<Model>,
    pub(crate) opts: EngineOptions,
    pub(crate) ctx: usize,
    pub(crate) caches: Vec<LayerCache>,
    pub(crate) tokens: Vec<u32>,
    pub(crate) logits: Vec<f32>,
    scratch: Scratch,
}

impl Session {
    /// An empty session (position 0).
    pub fn new(model: Arc<Model>, opts: EngineOptions) -> Result<Session, SessionError> {
        let ctx = check_options(&model, &opts)?;
        let caches = (0..model.cfg.n_layer)
            .map(|il| LayerCache::new(&model.cfg, il, ctx))
            .collect();
        Ok(Session {
            model,
            opts,
            ctx,
            caches,
            tokens: Vec::new(),
            logits: Vec::new(),
            scratch: Scratch::default(),
        })
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

    /// Logits of the last processed position (empty before the first token).
    pub fn logits(&self) -> &[f32] {
        &self.logits
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

    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Bytes of KV state currently held (raw windows, compressor frontiers, rows).
    pub fn state_bytes(&self) -> usize {
        self.caches.iter().map(LayerCache::bytes).sum()
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
        for chunk in tokens.chunks(self.opts.prefill_chunk.max(1)) {
            let pos = self.pos();
            let want = if all.is_some() { Want::All } else { Want::Last };
            forward(
                &model,
                self.opts.exact,
                self.opts.qat_sim,
                &mut self.caches,
                chunk,
                pos,
                want,
                &mut self.scratch,
                &mut rows,
            );
            self.tokens.extend_from_slice(chunk);
            self.logits.clear();
            self.logits.extend_from_slice(&rows[rows.len() - vocab..]);
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
    /// Assembles a session from restored parts (used by snapshot restore).
    pub(crate) fn from_parts(
        model: Arc<Model>,
        opts: EngineOptions,
        ctx: usize,
        caches: Vec<LayerCache>,
        tokens: Vec<u32>,
        logits: Vec<f32>,
    ) -> Session {
        Session {
            model,
            opts,
            ctx,
            caches,
            tokens,
            logits,
            scratch: Scratch::default(),
        }
    }
}
