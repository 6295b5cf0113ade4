//! DeepSeek V4 chat format (protocol.md §2-§3): prompt rendering byte for byte like DeepSeek's
//! official encoder (`encoding_dsv4.py`, pinned by reference/chat/cases.jsonl), and parsing
//! of generated text (reasoning / content / DSML tool calls) with the official parser's
//! grammar and errors, one-shot or incrementally.
//!
//! * [`render`] / [`EncoderCall::render`]: messages + `encode_messages` kwargs -> prompt text
//!   with the byte ranges of template-placed special tokens ([`RenderedPrompt`]).
//! * [`parse_completion`]: completion text -> [`ParsedMessage`] or the official error.
//! * [`StreamParser`]: the same grammar fed by deltas, emitting [`StreamEvent`]s, plus the
//!   [`SyntaxState`] hint for greedy DSML sampling.
//!
//! Where ds4 (the C server) renders differently from the official encoder (protocol.md
//! §2.11), this module follows the official encoder.

mod parse;
mod pyjson;
mod render;
mod stream;
mod types;

pub use parse::{parse_completion, ParseError, ParsedMessage, ParsedToolCall};
pub use render::{render, RenderError, RenderedPrompt};
pub use stream::{StreamEvent, StreamParser, SyntaxState};
pub use types::{
    Content, ContentPart, EncodeOptions, EncoderCall, FunctionCall, Message, Nullable,
    ReasoningEffort, Role, ThinkingMode, ToolCall, ToolDef,
};

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
pub const USER: &str = "<｜User｜>";
pub const ASSISTANT: &str = "<｜Assistant｜>";
pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";
/// The DSML marker token; tags are `<` + DSML + `tool_calls>` etc.
pub const DSML: &str = "｜DSML｜";
/// Encoder-extension role prefix; a vocabulary token, but not one the template marks.
pub const LATEST_REMINDER: &str = "<｜latest_reminder｜>";

/// The structural special-token strings that [`RenderedPrompt::specials`] ranges cover.
pub use crate::tokenizer::STRUCTURAL_SPECIALS;
