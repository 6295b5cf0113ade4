//! Tokenizer metadata for synthetic models.
//!
//! The real DeepSeek V4 tokenizer (`data/ds4-tokenizer.gguf`, MIT, 5 MB) is compiled in so
//! that generating a model never depends on the working directory. `demo` and the Flash
//! profiles carry it whole; `tiny` carries a 320-token vocabulary cut from it the way the
//! reference fixtures did (README §1.1), so a tiny model still tokenizes any text.

use std::collections::HashSet;

use crate::gguf::{GgufFile, Value, ValueType};

static REAL_TOKENIZER: &[u8] = include_bytes!("../../../../data/ds4-tokenizer.gguf");

/// The strings ds4 looks up in the token table (model.md §2.2); the first two are BOS/EOS.
pub use crate::tokenizer::STRUCTURAL_SPECIALS as SPECIAL_TOKENS;

/// Ids 0..3 of the real vocabulary are BOS, EOS and pad; 3..259 are the 256 byte symbols.
const BYTE_SYMBOLS_END: usize = 259;

/// `tokenizer.*` metadata entries, in file order.
pub(crate) type Entries = Vec<(String, Value)>;

fn real() -> Result<GgufFile, String> {
    GgufFile::from_bytes(REAL_TOKENIZER.to_vec())
        .map_err(|e| format!("embedded tokenizer is unreadable: {e}"))
}

fn strings<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, String> {
    g.get_string_array(key)
        .map_err(|e| format!("embedded tokenizer: {e}"))?
        .ok_or_else(|| format!("embedded tokenizer lacks '{key}'"))
}

/// The real tokenizer's `tokenizer.*` entries, unchanged (129,280 tokens).
pub(crate) fn real_entries() -> Result<Entries, String> {
    let g = real()?;
    let n = strings(&g, "tokenizer.ggml.tokens")?.len();
    if n != 129_280 {
        return Err(format!(
            "embedded tokenizer has {n} tokens, expected 129280"
        ));
    }
    Ok(g.metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .cloned()
        .collect())
}

/// A small complete byte-level BPE vocabulary of `n_vocab` tokens: the real ids 0..259
/// (BOS, EOS, pad, 256 byte symbols), then merged tokens taken from the real merge list in
/// rank order (a merge is kept when both sides are already tokens and the result is new),
/// then the five chat specials. Every text stays encodable and ds4 finds all 7 specials.
/// Other `tokenizer.*` keys (model, pre, BOS/EOS/pad ids, add_* flags) are copied from the
/// real file: ids 0..3 mean the same here.
pub(crate) fn small_entries(n_vocab: usize) -> Result<Entries, String> {
    let g = real()?;
    let tokens = strings(&g, "tokenizer.ggml.tokens")?;
    let merges = strings(&g, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
        .ok_or("embedded tokenizer: token_type is not an integer array")?;
    let type_code = |id: usize| types.get(id).copied().unwrap_or(1);
    let real_id: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let tail = &SPECIAL_TOKENS[2..];
    let n_merged = n_vocab
        .checked_sub(BYTE_SYMBOLS_END + tail.len())
        .ok_or_else(|| {
            format!("a vocabulary of {n_vocab} cannot hold the 256 byte symbols and 7 specials")
        })?;
    let mut out_tokens: Vec<String> = tokens[..BYTE_SYMBOLS_END]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut out_types: Vec<i64> = (0..BYTE_SYMBOLS_END).map(type_code).collect();
    let mut have: HashSet<String> = out_tokens.iter().cloned().collect();
    let mut out_merges = Vec::with_capacity(n_merged);
    for m in &merges {
        if out_merges.len() == n_merged {
            break;
        }
        let Some((a, b)) = m.split_once(' ') else {
            return Err(format!("embedded tokenizer: malformed merge {m:?}"));
        };
        let joined = format!("{a}{b}");
        if have.contains(a) && have.contains(b) && !have.contains(&joined) {
            out_merges.push(m.to_string());
            out_types.push(real_id.get(joined.as_str()).map_or(1, |&i| type_code(i)));
            out_tokens.push(joined.clone());
            have.insert(joined);
        }
    }
    if out_merges.len() != n_merged {
        return Err(format!(
            "only {} usable merges for a vocabulary of {n_vocab}",
            out_merges.len()
        ));
    }
    for s in tail {
        let id = real_id
            .get(s)
            .ok_or_else(|| format!("embedded tokenizer lacks the special token {s:?}"))?;
        out_tokens.push(s.to_string());
        out_types.push(type_code(*id));
    }
    let mut entries = Entries::new();
    for (k, v) in g.metadata() {
        let v = match k.as_str() {
            "tokenizer.ggml.tokens" => Value::string_array(out_tokens.iter().cloned()),
            "tokenizer.ggml.merges" => Value::string_array(out_merges.iter().cloned()),
            "tokenizer.ggml.token_type" => Value::Array(
                ValueType::I32,
                out_types.iter().map(|&t| Value::I32(t as i32)).collect(),
            ),
            k if k.starts_with("tokenizer.") => v.clone(),
            _ => continue,
        };
        entries.push((k.clone(), v));
    }
    Ok(entries)
}
