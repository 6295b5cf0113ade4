//! Byte-level BPE tokenizer for DeepSeek V4 (protocol.md §1).
//!
//! Reproduces the official HF tokenizer (`tokenizer.json` of the V4 release) exactly: the
//! three-split pre-tokenizer (`pretok`), the GPT-2 byte alphabet (`bytes`) and rank-ordered
//! merges (`bpe`). The vocabulary and merges come from GGUF metadata
//! (`tokenizer.ggml.tokens`, `tokenizer.ggml.merges`), never from `tokenizer.json`.
//!
//! Three encoding modes decide which literal strings in the text become single special ids
//! ([`EncodeMode`]); [`Tokenizer::encode_with_specials`] is the injection-safe variant used by
//! the chat renderer.

mod bpe;
mod bytes;
mod decode;
mod gguf;
mod pretok;

use std::ops::Range;
use std::sync::Mutex;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

pub use decode::StreamDecoder;

use bpe::{FastMap, Merges, Scratch};

/// The seven strings ds4 recognises in rendered chat text (protocol.md §1.2), in the order of
/// the fields of [`SpecialTokens`].
pub const STRUCTURAL_SPECIALS: [&str; 7] = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "｜DSML｜",
];

/// GGUF `tokenizer.ggml.token_type` values that mark an HF "added token".
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Ids of the structural special tokens, resolved by string at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: u32,
    pub eos: u32,
    pub user: u32,
    pub assistant: u32,
    pub think_open: u32,
    pub think_close: u32,
    pub dsml: u32,
}

impl SpecialTokens {
    /// The ids in the order of [`STRUCTURAL_SPECIALS`].
    pub fn as_array(&self) -> [u32; 7] {
        [
            self.bos,
            self.eos,
            self.user,
            self.assistant,
            self.think_open,
            self.think_close,
            self.dsml,
        ]
    }
}

/// Which literal special-token strings in the input are turned into their ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncodeMode {
    /// As HF `Tokenizer.encode(text, add_special_tokens=False)`: every added token string
    /// (1283 in the V4 vocabulary) is matched, leftmost-longest.
    Hf,
    /// No special matching at all: pre-tokenizer + BPE only (ds4 "plain tokenization").
    Plain,
    /// Only the seven [`STRUCTURAL_SPECIALS`] are matched (ds4 "rendered-chat tokenization").
    #[default]
    Render,
}

impl std::str::FromStr for EncodeMode {
    type Err = TokenizerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hf" => Ok(EncodeMode::Hf),
            "plain" => Ok(EncodeMode::Plain),
            "render" => Ok(EncodeMode::Render),
            other => Err(TokenizerError::BadMode(other.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer vocabulary is empty")]
    EmptyVocab,
    #[error("tokenizer vocabulary has {0} entries, more than u32 ids can address")]
    VocabTooLarge(usize),
    #[error("required special token {0:?} is missing from the vocabulary")]
    MissingSpecial(&'static str),
    #[error("merge rule #{rank} {rule:?} is not of the form \"left right\"")]
    BadMerge { rank: usize, rule: String },
    #[error("merge rule #{rank} {rule:?} uses {token:?}, which is not in the vocabulary")]
    MergeOutOfVocab {
        rank: usize,
        rule: String,
        token: String,
    },
    #[error("token_type has {types} entries but the vocabulary has {tokens}")]
    TokenTypeLength { types: usize, tokens: usize },
    #[error("cannot build the special-token matcher: {0}")]
    Matcher(String),
    #[error(
        "special span {start}..{end} is not one of the structural special strings, or is out of \
         bounds, off a char boundary, or overlaps the previous span"
    )]
    BadSpecialSpan { start: usize, end: usize },
    #[error("unknown encode mode {0:?} (expected hf, plain or render)")]
    BadMode(String),
    #[error("GGUF tokenizer metadata: {0}")]
    Gguf(String),
}

/// Pieces longer than this are not cached (long runs are rare and would bloat the cache).
const CACHE_MAX_PIECE: usize = 64;
/// The cache is cleared when it reaches this many entries, bounding memory.
const CACHE_MAX_ENTRIES: usize = 1 << 16;

type PieceCache = FastMap<Box<[u8]>, Box<[u32]>>;

/// A DeepSeek V4 byte-level BPE tokenizer. Cheap to share: encoding takes `&self`.
pub struct Tokenizer {
    tokens: Vec<String>,
    token_to_id: FastMap<String, u32>,
    merges: Merges,
    /// Id of the single-byte symbol for each byte, if the vocabulary has it.
    byte_ids: [Option<u32>; 256],
    /// Decoded bytes of every token: `decoded[offsets[i]..offsets[i + 1]]`.
    decoded: Vec<u8>,
    offsets: Vec<usize>,
    is_added: Vec<bool>,
    n_added: usize,
    specials: SpecialTokens,
    /// Leftmost-longest matcher over every added token string, with the id per pattern.
    added_matcher: AhoCorasick,
    added_ids: Vec<u32>,
    /// Leftmost-longest matcher over the seven structural specials.
    render_matcher: AhoCorasick,
    render_ids: Vec<u32>,
    cache: Mutex<PieceCache>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("added_tokens", &self.n_added)
            .field("specials", &self.specials)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Build from the vocabulary (index = id) and the merge list (`"left right"`, rank =
    /// index). Added tokens are derived structurally: a token is "added" when BPE can never
    /// produce it, i.e. it is neither a single byte symbol nor the result of any merge (for the
    /// V4 vocabulary this is exactly HF's 1283 added tokens).
    pub fn new(tokens: Vec<String>, merges: &[String]) -> Result<Tokenizer, TokenizerError> {
        Self::build(tokens, merges, None)
    }

    /// Like [`Tokenizer::new`], but the added tokens are those whose GGUF
    /// `tokenizer.ggml.token_type` is CONTROL (3) or USER_DEFINED (4), which is how converters
    /// record HF's special and non-special added tokens.
    pub fn with_token_types(
        tokens: Vec<String>,
        merges: &[String],
        token_types: &[i32],
    ) -> Result<Tokenizer, TokenizerError> {
        if token_types.len() != tokens.len() {
            return Err(TokenizerError::TokenTypeLength {
                types: token_types.len(),
                tokens: tokens.len(),
            });
        }
        Self::build(tokens, merges, Some(token_types))
    }

    fn build(
        tokens: Vec<String>,
        merges: &[String],
        token_types: Option<&[i32]>,
    ) -> Result<Tokenizer, TokenizerError> {
        if tokens.is_empty() {
            return Err(TokenizerError::EmptyVocab);
        }
        if u32::try_from(tokens.len()).is_err() {
            return Err(TokenizerError::VocabTooLarge(tokens.len()));
        }
        // Later duplicates win, as in ds4's loader.
        let mut token_to_id: FastMap<String, u32> =
            FastMap::with_capacity_and_hasher(tokens.len(), Default::default());
        for (i, t) in tokens.iter().enumerate() {
            token_to_id.insert(t.clone(), i as u32);
        }

        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let s = bytes::BYTE_TO_CHAR[b].to_string();
            *slot = token_to_id.get(&s).copied();
        }

        let mut reachable = vec![false; tokens.len()];
        let mut merge_table = Merges::with_capacity(merges.len());
        let mut joined = String::new();
        for (rank, rule) in merges.iter().enumerate() {
            let Some((l, r)) = rule.split_once(' ') else {
                return Err(TokenizerError::BadMerge {
                    rank,
                    rule: rule.clone(),
                });
            };
            joined.clear();
            joined.push_str(l);
            joined.push_str(r);
            let lookup = |t: &str| {
                token_to_id
                    .get(t)
                    .copied()
                    .ok_or_else(|| TokenizerError::MergeOutOfVocab {
                        rank,
                        rule: rule.clone(),
                        token: t.to_string(),
                    })
            };
            let (li, ri, mi) = (lookup(l)?, lookup(r)?, lookup(&joined)?);
            let rank32 = u32::try_from(rank).unwrap_or(u32::MAX - 1);
            merge_table.insert(li, ri, rank32, mi);
            reachable[mi as usize] = true;
        }
        for id in byte_ids.iter().flatten() {
            reachable[*id as usize] = true;
        }

        let is_added: Vec<bool> = match token_types {
            Some(types) => types
                .iter()
                .map(|&t| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
                .collect(),
            None => reachable.iter().map(|r| !r).collect(),
        };
        // An empty pattern would match everywhere; no real vocabulary has one.
        let is_added: Vec<bool> = is_added
            .into_iter()
            .zip(&tokens)
            .map(|(a, t)| a && !t.is_empty())
            .collect();
        let n_added = is_added.iter().filter(|a| **a).count();

        let mut specials = [0u32; 7];
        for (slot, s) in specials.iter_mut().zip(STRUCTURAL_SPECIALS) {
            *slot = token_to_id
                .get(s)
                .copied()
                .ok_or(TokenizerError::MissingSpecial(s))?;
        }
        let specials = SpecialTokens {
            bos: specials[0],
            eos: specials[1],
            user: specials[2],
            assistant: specials[3],
            think_open: specials[4],
            think_close: specials[5],
            dsml: specials[6],
        };

        // HF matches added tokens in two passes (non-normalized, then normalized ones). With
        // no normalizer and no added string overlapping another, one leftmost-longest pass
        // over all of them finds the same matches.
        let mut added_patterns = Vec::with_capacity(n_added);
        let mut added_ids = Vec::with_capacity(n_added);
        for (t, _) in tokens.iter().zip(&is_added).filter(|(_, a)| **a) {
            added_patterns.push(t.as_str());
            // Resolve by string so duplicates agree with the later-wins vocabulary map.
            added_ids.push(token_to_id.get(t).copied().unwrap_or_default());
        }
        let added_matcher = matcher(&added_patterns)?;
        let render_matcher = matcher(&STRUCTURAL_SPECIALS)?;
        let render_ids = specials.as_array().to_vec();

        let mut decoded = Vec::new();
        let mut offsets = Vec::with_capacity(tokens.len() + 1);
        offsets.push(0);
        for t in &tokens {
            bytes::vocab_string_bytes(t, &mut decoded);
            offsets.push(decoded.len());
        }

        Ok(Tokenizer {
            tokens,
            token_to_id,
            merges: merge_table,
            byte_ids,
            decoded,
            offsets,
            is_added,
            n_added,
            specials,
            added_matcher,
            added_ids,
            render_matcher,
            render_ids,
            cache: Mutex::new(PieceCache::default()),
        })
    }

    /// Number of ids (the logit width).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The structural special ids.
    pub fn specials(&self) -> &SpecialTokens {
        &self.specials
    }

    /// Number of added tokens (matched in [`EncodeMode::Hf`]).
    pub fn added_token_count(&self) -> usize {
        self.n_added
    }

    /// Whether `id` is an added token (a literal string matched before BPE in hf mode).
    pub fn is_added_token(&self, id: u32) -> bool {
        self.is_added.get(id as usize).copied().unwrap_or(false)
    }

    /// The vocabulary string of `id` (GPT-2 byte-encoded form for BPE tokens).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of a vocabulary string, exactly as stored (e.g. `"Ġthe"`, `"<think>"`).
    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.token_to_id.get(s).copied()
    }

    /// The raw bytes token `id` stands for (possibly a partial UTF-8 sequence).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        let (a, b) = (*self.offsets.get(i)?, *self.offsets.get(i + 1)?);
        self.decoded.get(a..b)
    }

    /// Concatenated bytes of `ids`; ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            if let Some(b) = self.token_bytes(id) {
                out.extend_from_slice(b);
            }
        }
        out
    }

    /// [`Tokenizer::decode`] as text, invalid UTF-8 replaced by U+FFFD.
    pub fn decode_lossy(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode(ids)).into_owned()
    }

    /// A fresh [`StreamDecoder`] (convenience; it holds no reference to the tokenizer).
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder::new()
    }

    /// Encode `text` in `mode`.
    pub fn encode(&self, text: &str, mode: EncodeMode) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 4);
        let mut ws = self.workspace();
        match mode {
            EncodeMode::Plain => self.encode_plain(text, &mut ws, &mut out),
            EncodeMode::Hf => self.encode_matched(
                text,
                &self.added_matcher,
                &self.added_ids,
                &mut ws,
                &mut out,
            ),
            EncodeMode::Render => self.encode_matched(
                text,
                &self.render_matcher,
                &self.render_ids,
                &mut ws,
                &mut out,
            ),
        }
        ws.release();
        out
    }

    /// Injection-safe rendering: `specials` are the byte ranges of `text` where the chat
    /// template inserted one of the seven structural special strings. Exactly those ranges
    /// become special ids; everything else (user text containing `<｜Assistant｜>`, say) is
    /// encoded as plain text, each stretch between two specials pre-tokenized as a whole, so
    /// the result equals [`EncodeMode::Render`] whenever the non-template text contains no
    /// special string. Ranges that are invalid (see [`Tokenizer::try_encode_with_specials`])
    /// are ignored, i.e. their text is encoded as plain text.
    pub fn encode_with_specials(&self, text: &str, specials: &[Range<usize>]) -> Vec<u32> {
        self.encode_spans(text, specials, false)
            .unwrap_or_else(|_| self.encode(text, EncodeMode::Plain))
    }

    /// Like [`Tokenizer::encode_with_specials`] but rejects a range that is out of bounds, not
    /// on char boundaries, overlaps or precedes the previous range, or does not cover exactly
    /// one of the seven structural special strings.
    pub fn try_encode_with_specials(
        &self,
        text: &str,
        specials: &[Range<usize>],
    ) -> Result<Vec<u32>, TokenizerError> {
        self.encode_spans(text, specials, true)
    }

    fn encode_spans(
        &self,
        text: &str,
        specials: &[Range<usize>],
        strict: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + specials.len() + 4);
        let mut ws = self.workspace();
        let mut pos = 0usize;
        for r in specials {
            let id = if r.start >= pos {
                text.get(r.clone()).and_then(|s| {
                    STRUCTURAL_SPECIALS
                        .iter()
                        .position(|x| *x == s)
                        .map(|k| self.render_ids[k])
                })
            } else {
                None
            };
            match id {
                Some(id) => {
                    // `r.start >= pos` and both are char boundaries, so this slice is valid.
                    if let Some(span) = text.get(pos..r.start) {
                        self.encode_plain(span, &mut ws, &mut out);
                    }
                    out.push(id);
                    pos = r.end;
                }
                None if strict => {
                    ws.release();
                    return Err(TokenizerError::BadSpecialSpan {
                        start: r.start,
                        end: r.end,
                    });
                }
                None => {}
            }
        }
        if let Some(rest) = text.get(pos..) {
            self.encode_plain(rest, &mut ws, &mut out);
        }
        ws.release();
        Ok(out)
    }

    fn encode_matched(
        &self,
        text: &str,
        m: &AhoCorasick,
        ids: &[u32],
        ws: &mut Workspace<'_>,
        out: &mut Vec<u32>,
    ) {
        let mut pos = 0usize;
        for hit in m.find_iter(text) {
            if let Some(span) = text.get(pos..hit.start()) {
                self.encode_plain(span, ws, out);
            }
            if let Some(&id) = ids.get(hit.pattern().as_usize()) {
                out.push(id);
            }
            pos = hit.end();
        }
        if let Some(rest) = text.get(pos..) {
            self.encode_plain(rest, ws, out);
        }
    }

    /// Pre-tokenize `text` and BPE every piece.
    fn encode_plain(&self, text: &str, ws: &mut Workspace<'_>, out: &mut Vec<u32>) {
        let b = text.as_bytes();
        pretok::pre_tokenize(text, &mut |start, end| {
            self.encode_piece(&b[start..end], ws, out);
        });
    }

    fn encode_piece(&self, piece: &[u8], ws: &mut Workspace<'_>, out: &mut Vec<u32>) {
        let cacheable = piece.len() <= CACHE_MAX_PIECE;
        if cacheable {
            if let Some(hit) = ws.cache.as_ref().and_then(|c| c.get(piece)) {
                out.extend_from_slice(hit);
                return;
            }
        }
        ws.syms.clear();
        // Bytes without a single-byte symbol are dropped, as HF's BPE does without an
        // unknown token (cannot happen with a complete byte-level vocabulary).
        ws.syms.extend(
            piece
                .iter()
                .filter_map(|&byte| self.byte_ids[byte as usize]),
        );
        let start = out.len();
        self.merges.apply(&mut ws.syms, &mut ws.scratch, out);
        if cacheable {
            if let Some(cache) = ws.cache.as_mut() {
                if cache.len() >= CACHE_MAX_ENTRIES {
                    cache.clear();
                }
                cache.insert(piece.into(), out[start..].into());
            }
        }
    }

    fn workspace(&self) -> Workspace<'_> {
        // The cache is an optimisation only: if another thread holds it (or a panic poisoned
        // it), encode without it rather than wait.
        Workspace {
            cache: self.cache.try_lock().ok(),
            syms: Vec::new(),
            scratch: Scratch::default(),
        }
    }
}

/// Per-call scratch state: the cache guard (if free) and reusable buffers.
struct Workspace<'a> {
    cache: Option<std::sync::MutexGuard<'a, PieceCache>>,
    syms: Vec<u32>,
    scratch: Scratch,
}

impl Workspace<'_> {
    fn release(&mut self) {
        self.cache = None;
    }
}

fn matcher(patterns: &[&str]) -> Result<AhoCorasick, TokenizerError> {
    AhoCorasickBuilder::new()
        .match_kind(MatchKind::LeftmostLongest)
        .build(patterns)
        .map_err(|e| TokenizerError::Matcher(e.to_string()))
}
