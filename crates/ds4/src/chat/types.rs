//! Encoder inputs: messages, tool definitions and the `encode_messages` keyword arguments, in
//! the shape the official encoder accepts (OpenAI-style dicts plus its extension keys). They
//! deserialize directly from a case's `encoder_call` (`{"messages": [...], "kwargs": {...}}`).

use serde::Deserialize;
use serde_json::Value;

/// A JSON field that distinguishes "absent" from `null`: the encoder reads several keys with
/// `msg.get(key, default)`, where a missing key and an explicit `null` render differently
/// (a tool result with `content: null` renders as `None`, a missing one as empty).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Nullable<T> {
    #[default]
    Absent,
    Null,
    Value(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Nullable<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Only reached when the key is present (`#[serde(default)]` covers absence).
        Ok(match Option::<T>::deserialize(d)? {
            None => Nullable::Null,
            Some(v) => Nullable::Value(v),
        })
    }
}

impl<T> Nullable<T> {
    pub fn as_value(&self) -> Option<&T> {
        match self {
            Nullable::Value(v) => Some(v),
            _ => None,
        }
    }
}

/// Message roles the official encoder knows. Anything else (including OpenAI's legacy
/// `function`) makes it raise, so it fails deserialization here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    /// Encoder extension: `<｜latest_reminder｜>` + content.
    LatestReminder,
}

/// Message content: a string, or a list of parts (only meaningful for `tool` messages; the
/// encoder raises or misrenders lists elsewhere, which [`super::render`] reports as errors).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One element of a list content: `{"type": "text", "text": ...}`; other types render as
/// `[Unsupported <type>]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type", default)]
    pub kind: Nullable<String>,
    #[serde(default)]
    pub text: Nullable<String>,
}

/// A tool declaration in OpenAI form; the encoder renders `json.dumps(function)`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ToolDef {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The function object (name, description, parameters) in the client's key order.
    /// Missing makes the encoder raise (KeyError), reported by render.
    #[serde(default)]
    pub function: Option<Value>,
}

/// An assistant tool call in OpenAI form.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ToolCall {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// Normally a JSON string (`"{\"city\": \"Rome\"}"`). The encoder `json.loads` it; a
    /// string that does not parse becomes one `arguments` string parameter, and a non-string
    /// value (already-decoded object) becomes one `arguments` parameter with `string="false"`.
    pub arguments: Value,
    /// The encoder also looks for the call id here when ordering tool results.
    #[serde(default)]
    pub id: Option<String>,
}

/// One chat message as the official encoder reads it. Keys it ignores (`name`, `mask`, ...)
/// are ignored here too.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Message {
    pub role: Role,
    #[serde(default)]
    pub content: Nullable<Content>,
    #[serde(default)]
    pub reasoning_content: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// For `tool` messages: which call this result answers (orders merged results).
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// Tool declarations; rendered only on `system` and `developer` messages.
    #[serde(default)]
    pub tools: Option<Vec<ToolDef>>,
    /// Encoder extension: adds a `## Response Format:` section to system/developer text.
    #[serde(default)]
    pub response_format: Option<Value>,
    /// Encoder extension: quick-instruction task token (`action`, `query`, ...).
    #[serde(default)]
    pub task: Option<String>,
    /// Encoder extension: an assistant message rendered without its closing EOS
    /// (continue-final-message).
    #[serde(default)]
    pub wo_eos: bool,
}

impl Message {
    /// A plain text message with no other fields.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: Nullable::Value(Content::Text(content.into())),
            reasoning_content: None,
            tool_calls: None,
            tool_call_id: None,
            tools: None,
            response_format: None,
            task: None,
            wo_eos: false,
        }
    }
}

/// `thinking_mode`: the generation prompt ends in `</think>` (chat) or `<think>` (thinking).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThinkingMode {
    Chat,
    Thinking,
}

/// `reasoning_effort`. The V4 encoder accepts only these two (or none); `High` renders the
/// same as none, `Max` adds the Think-Max text in thinking mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasoningEffort {
    High,
    Max,
}

fn yes() -> bool {
    true
}

/// The keyword arguments of `encode_messages`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EncodeOptions {
    pub thinking_mode: ThinkingMode,
    /// Messages already encoded (a cached prefix): only `messages` is rendered and no BOS is
    /// emitted, but every decision (last user turn, reasoning dropping, tool result order,
    /// tools flag) still sees `context + messages`.
    #[serde(default)]
    pub context: Option<Vec<Message>>,
    /// Drop reasoning (and developer turns) before the last user turn. Disabled by the
    /// encoder whenever any message declares tools.
    #[serde(default = "yes")]
    pub drop_thinking: bool,
    #[serde(default = "yes")]
    pub add_default_bos_token: bool,
    #[serde(default)]
    pub reasoning_effort: Option<ReasoningEffort>,
}

impl EncodeOptions {
    /// Defaults of `encode_messages` for the given mode.
    pub fn new(thinking_mode: ThinkingMode) -> Self {
        EncodeOptions {
            thinking_mode,
            context: None,
            drop_thinking: true,
            add_default_bos_token: true,
            reasoning_effort: None,
        }
    }
}

/// A recorded encoder call: `{"messages": [...], "kwargs": {...}}` (a `function` key, as in
/// the cases, is ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EncoderCall {
    pub messages: Vec<Message>,
    pub kwargs: EncodeOptions,
}

impl EncoderCall {
    pub fn render(&self) -> Result<super::RenderedPrompt, super::RenderError> {
        super::render(&self.messages, &self.kwargs)
    }
}
