//! Building a [`Tokenizer`] from GGUF tokenizer metadata (protocol.md §1.2).

use super::{Tokenizer, TokenizerError};
use crate::gguf::GgufFile;

const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_VOCAB_SIZE: &str = "deepseek4.vocab_size";

impl Tokenizer {
    /// Load the tokenizer stored in a GGUF file: `tokenizer.ggml.tokens` (index = id) and
    /// `tokenizer.ggml.merges` are required; `tokenizer.ggml.token_type`, when present, names
    /// the added tokens (otherwise they are derived as in [`Tokenizer::new`]). A present
    /// `tokenizer.ggml.model` must be `gpt2` (byte-level BPE) and a present
    /// `deepseek4.vocab_size` must equal the number of tokens.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let err = |m: String| TokenizerError::Gguf(m);
        if let Some(model) = file.get(KEY_MODEL) {
            match model.as_str() {
                Some("gpt2") => {}
                other => {
                    return Err(err(format!(
                        "{KEY_MODEL} is {other:?}, only \"gpt2\" (byte-level BPE) is supported"
                    )))
                }
            }
        }
        let strings = |key: &str| -> Result<Vec<String>, TokenizerError> {
            file.get_string_array(key)
                .map_err(|e| err(e.to_string()))?
                .map(|v| v.into_iter().map(str::to_owned).collect())
                .ok_or_else(|| err(format!("missing {key}")))
        };
        let tokens = strings(KEY_TOKENS)?;
        let merges = strings(KEY_MERGES)?;
        if let Some(v) = file.get(KEY_VOCAB_SIZE) {
            let n = v.as_u64();
            if n != Some(tokens.len() as u64) {
                return Err(err(format!(
                    "{KEY_VOCAB_SIZE} is {v} but {KEY_TOKENS} has {} entries",
                    tokens.len()
                )));
            }
        }
        match file.get(KEY_TYPES) {
            None => Tokenizer::new(tokens, &merges),
            Some(v) => {
                let items = v
                    .as_array()
                    .ok_or_else(|| err(format!("{KEY_TYPES} is not an array")))?;
                let types = items
                    .iter()
                    .map(|x| x.as_i64().and_then(|i| i32::try_from(i).ok()))
                    .collect::<Option<Vec<i32>>>()
                    .ok_or_else(|| err(format!("{KEY_TYPES} is not an array of integers")))?;
                Tokenizer::with_token_types(tokens, &merges, &types)
            }
        }
    }

    /// Load the tokenizer from the GGUF file at `path` (only metadata is read).
    pub fn from_gguf_path(path: impl AsRef<std::path::Path>) -> Result<Tokenizer, TokenizerError> {
        let file = GgufFile::open(path).map_err(|e| TokenizerError::Gguf(e.to_string()))?;
        Tokenizer::from_gguf(&file)
    }
}
