//! STAND-IN for `ds4::model::Session` (branch `fwd`), used until the forward pass lands.
//!
//! It has the shape of the planned session API (prefill with a progress/cancel callback,
//! single-token decode, logits, token history, snapshot/restore) so the worker, the KV reuse
//! logic and the disk cache run for real. Its "logits" are a deterministic pseudo-random
//! function of the last token and position, so sampled text is noise; the server says so at
//! startup and in /v1/models. Replace `Session` by `ds4::model::Session` when it exists.

use std::time::Duration;

const MAGIC: &[u8; 4] = b"STUB";

pub struct Session {
    tokens: Vec<u32>,
    logits: Vec<f32>,
    vocab: usize,
    ctx: usize,
    /// Simulated compute time per token (test seam `--test-delay-ms`).
    delay: Duration,
}

impl Session {
    pub fn new(vocab: usize, ctx: usize, delay: Duration) -> Session {
        Session {
            tokens: Vec::new(),
            logits: vec![0.0; vocab],
            vocab,
            ctx,
            delay,
        }
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Evaluates `tokens` in chunks; `progress(done, total)` is called after each chunk and
    /// returns false to cancel (the session then holds the chunks evaluated so far).
    pub fn prefill_with(
        &mut self,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<(), String> {
        if self.tokens.len() + tokens.len() > self.ctx {
            return Err(format!(
                "prefill past the context: {} + {} > {}",
                self.tokens.len(),
                tokens.len(),
                self.ctx
            ));
        }
        const CHUNK: usize = 64;
        let mut done = 0;
        for c in tokens.chunks(CHUNK) {
            if !self.delay.is_zero() {
                std::thread::sleep(self.delay * c.len() as u32 / 8);
            }
            self.tokens.extend_from_slice(c);
            done += c.len();
            if !progress(done, tokens.len()) {
                self.refresh_logits();
                return Err("cancelled".into());
            }
        }
        self.refresh_logits();
        Ok(())
    }

    pub fn decode(&mut self, token: u32) -> Result<(), String> {
        if self.tokens.len() >= self.ctx {
            return Err("context full".into());
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        self.tokens.push(token);
        self.refresh_logits();
        Ok(())
    }

    fn refresh_logits(&mut self) {
        let last = self.tokens.last().copied().unwrap_or(0) as u64;
        let mut x = (last << 32 | self.tokens.len() as u64) ^ 0x9E37_79B9_7F4A_7C15;
        for l in self.logits.iter_mut() {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let u = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u32 << 24) as f32;
            *l = u * 8.0;
        }
        // Keep the stand-in from ending every answer at once.
        if let Some(l) = self.logits.get_mut(1) {
            *l = -1e9;
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + 4 * self.tokens.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&(self.vocab as u32).to_le_bytes());
        b.extend_from_slice(&(self.tokens.len() as u32).to_le_bytes());
        for t in &self.tokens {
            b.extend_from_slice(&t.to_le_bytes());
        }
        b
    }

    pub fn restore(
        vocab: usize,
        ctx: usize,
        delay: Duration,
        bytes: &[u8],
    ) -> Result<Session, String> {
        let u32_at = |i: usize| -> Option<u32> {
            bytes
                .get(i..i + 4)
                .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
        };
        if bytes.get(..4) != Some(MAGIC.as_slice()) {
            return Err("not a session snapshot".into());
        }
        if u32_at(4) != Some(vocab as u32) {
            return Err("snapshot vocabulary differs".into());
        }
        let n = u32_at(8).ok_or("truncated snapshot")? as usize;
        if bytes.len() != 12 + 4 * n {
            return Err("snapshot size mismatch".into());
        }
        if n >= ctx {
            return Err("snapshot longer than the context".into());
        }
        let mut s = Session::new(vocab, ctx, delay);
        s.tokens = (0..n).map(|i| u32_at(12 + 4 * i).unwrap()).collect();
        s.refresh_logits();
        Ok(s)
    }
}
