//! Session snapshots: a versioned little-endian byte format holding the token history, the
//! last logits and every layer's state (model.md §4.1), checked against the model on
//! restore. Corrupt or foreign bytes give an error, never a panic.
//!
//! Layout (version 1): magic `DS4SESS\0`, u32 version, u32 × 8 shape (layers, dim, vocab,
//! head dim, rope dims, window, indexer dim, HC streams), u32 ratio per layer, u8 exact,
//! u8 qat, u64 token count + u32 ids, u64 logit count + f32 values, then per layer: the raw
//! rows of the last `min(pos, swa)` positions, oldest first; for each compressor (main,
//! then indexer): its kv and score frontiers and u64 row count + rows.

use std::sync::Arc;

use super::cache::{Compressed, LayerCache};
use super::options::EngineOptions;
use super::session::{check_options, Session, SessionError};
use super::Model;

const MAGIC: &[u8; 8] = b"DS4SESS\0";
const VERSION: u32 = 1;

fn shape(model: &Model) -> Vec<u32> {
    let c = &model.cfg;
    let mut v: Vec<u32> = [
        c.n_layer, c.n_embd, c.n_vocab, c.head_dim, c.n_rot, c.swa, c.idx_dim, c.hc,
    ]
    .iter()
    .map(|&x| x as u32)
    .collect();
    v.extend(c.compress_ratios.iter().take(c.n_layer));
    v
}

struct Writer(Vec<u8>);

impl Writer {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: usize) {
        self.0.extend_from_slice(&(v as u64).to_le_bytes());
    }
    fn f32s(&mut self, v: &[f32]) {
        self.0.reserve(v.len() * 4);
        v.iter()
            .for_each(|x| self.0.extend_from_slice(&x.to_le_bytes()));
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

fn err(msg: impl Into<String>) -> SessionError {
    SessionError::Snapshot(msg.into())
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], SessionError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| err(format!("truncated at byte {} ({what})", self.at)))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, SessionError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, SessionError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<usize, SessionError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        usize::try_from(u64::from_le_bytes(a)).map_err(|_| err(format!("{what}: count too large")))
    }
    /// Exactly `n` f32 values (length checked against the remaining bytes first).
    fn f32s_into(&mut self, out: &mut [f32], what: &str) -> Result<(), SessionError> {
        let bytes = out
            .len()
            .checked_mul(4)
            .ok_or_else(|| err(format!("{what}: size overflow")))?;
        let b = self.take(bytes, what)?;
        for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
    fn f32s(&mut self, n: usize, what: &str) -> Result<Vec<f32>, SessionError> {
        if n.saturating_mul(4) > self.b.len() - self.at {
            return Err(err(format!("truncated at byte {} ({what})", self.at)));
        }
        let mut v = vec![0f32; n];
        self.f32s_into(&mut v, what)?;
        Ok(v)
    }
}

impl Session {
    /// Serializes the session state (see the module docs for the format). A GPU session
    /// whose state cannot be read back (a device error) reports it on stderr and returns no
    /// bytes, which [`Session::restore`] refuses; [`Session::try_snapshot`] returns the error.
    pub fn snapshot(&self) -> Vec<u8> {
        self.try_snapshot().unwrap_or_else(|e| {
            eprintln!("ds4: snapshot failed: {e}");
            Vec::new()
        })
    }

    /// [`Session::snapshot`] with the device error, if any.
    pub fn try_snapshot(&self) -> Result<Vec<u8>, SessionError> {
        let caches = self.host_caches()?;
        let cfg = &self.model.cfg;
        let mut w = Writer(Vec::with_capacity(self.state_bytes() + 1024));
        w.0.extend_from_slice(MAGIC);
        w.u32(VERSION);
        shape(&self.model).into_iter().for_each(|v| w.u32(v));
        w.0.push(self.opts.exact as u8);
        w.0.push(self.opts.qat_sim as u8);
        w.u64(self.tokens.len());
        self.tokens.iter().for_each(|&t| w.u32(t));
        let logits = self.try_logits()?;
        w.u64(logits.len());
        w.f32s(logits);
        let (pos, swa, dh) = (self.pos(), cfg.swa, cfg.head_dim);
        for cache in caches.iter() {
            for q in pos.saturating_sub(swa)..pos {
                let slot = q % swa;
                w.f32s(&cache.raw[slot * dh..(slot + 1) * dh]);
            }
            for c in [&cache.comp, &cache.index].into_iter().flatten() {
                w.f32s(&c.state.kv);
                w.f32s(&c.state.score);
                w.u64(c.rows.len());
                w.f32s(&c.rows.data);
            }
        }
        Ok(w.0)
    }

    /// Rebuilds a session from [`Session::snapshot`] bytes. The snapshot must come from a
    /// model of the same shape and the same numeric mode (exact / QAT), and fit `opts`'
    /// context.
    pub fn restore(
        model: Arc<Model>,
        opts: EngineOptions,
        bytes: &[u8],
    ) -> Result<Session, SessionError> {
        let ctx = check_options(&model, &opts)?;
        let mut r = Reader { b: bytes, at: 0 };
        if r.take(8, "magic")? != MAGIC {
            return Err(err("not a ds4 session snapshot (bad magic)"));
        }
        let version = r.u32("version")?;
        if version != VERSION {
            return Err(err(format!(
                "unsupported version {version} (this build reads {VERSION})"
            )));
        }
        for (i, want) in shape(&model).into_iter().enumerate() {
            let have = r.u32("model shape")?;
            if have != want {
                return Err(err(format!(
                    "made for another model (shape field {i} is {have}, this model has {want})"
                )));
            }
        }
        let (exact, qat) = (r.u8("mode")? != 0, r.u8("mode")? != 0);
        if (exact, qat) != (opts.exact, opts.qat_sim) {
            return Err(err(format!(
                "made with exact={exact} qat_sim={qat}, restoring with exact={} qat_sim={}",
                opts.exact, opts.qat_sim
            )));
        }
        let cfg = &model.cfg;
        let n_tok = r.u64("token count")?;
        if n_tok > ctx {
            return Err(SessionError::ContextFull {
                pos: 0,
                n: n_tok,
                ctx,
            });
        }
        let mut tokens = Vec::with_capacity(n_tok.min(bytes.len() / 4));
        for _ in 0..n_tok {
            let t = r.u32("tokens")?;
            if t as usize >= cfg.n_vocab {
                return Err(err(format!("token id {t} out of range")));
            }
            tokens.push(t);
        }
        let n_logits = r.u64("logit count")?;
        if n_logits != 0 && n_logits != cfg.n_vocab {
            return Err(err(format!(
                "{n_logits} logits for a vocabulary of {}",
                cfg.n_vocab
            )));
        }
        let logits = r.f32s(n_logits, "logits")?;
        let (pos, swa, dh) = (n_tok, cfg.swa, cfg.head_dim);
        let mut caches = Vec::with_capacity(cfg.n_layer);
        for il in 0..cfg.n_layer {
            let mut cache = LayerCache::new(cfg, il, ctx);
            for q in pos.saturating_sub(swa)..pos {
                let slot = q % swa;
                r.f32s_into(&mut cache.raw[slot * dh..(slot + 1) * dh], "raw window")?;
            }
            for c in [&mut cache.comp, &mut cache.index].into_iter().flatten() {
                read_compressed(&mut r, c, pos, il)?;
            }
            caches.push(cache);
        }
        if r.at != bytes.len() {
            return Err(err(format!("{} trailing bytes", bytes.len() - r.at)));
        }
        Session::from_parts(model, opts, ctx, caches, tokens, logits)
    }
}

fn read_compressed(
    r: &mut Reader,
    c: &mut Compressed,
    pos: usize,
    il: usize,
) -> Result<(), SessionError> {
    r.f32s_into(&mut c.state.kv, "compressor values")?;
    r.f32s_into(&mut c.state.score, "compressor scores")?;
    let n = r.u64("row count")?;
    if n != pos / c.state.ratio {
        return Err(err(format!(
            "layer {il}: {n} compressed rows after {pos} tokens (expected {})",
            pos / c.state.ratio
        )));
    }
    c.rows.data = r.f32s(n.saturating_mul(c.rows.width), "compressed rows")?;
    Ok(())
}
