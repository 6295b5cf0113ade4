//! Prompt rendering, byte for byte like the official `encode_messages` (protocol.md §2,
//! reference/chat/README.md). The steps mirror the encoder's own phases, because several of
//! its quirks only make sense in that order: tool messages are merged into user turns,
//! tool results re-sorted by call order, developer turns dropped before the last user turn,
//! and only then is each remaining turn rendered with a look at its neighbour.

use std::collections::HashMap;
use std::ops::Range;

use serde_json::Value;

use super::pyjson::{self, PyValue};
use super::types::{
    Content, EncodeOptions, Message, Nullable, ReasoningEffort, Role, ThinkingMode, ToolDef,
};
use super::{
    ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, STRUCTURAL_SPECIALS, THINK_END, THINK_START, USER,
};

/// A rendered prompt. `specials` lists the byte ranges of `text` where the template (never
/// message content) placed one of the structural special-token strings; the tokenizer turns
/// exactly those into control ids and BPE-encodes everything else, so text a user or tool
/// wrote can never become `<｜Assistant｜>` or a DSML marker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RenderedPrompt {
    pub text: String,
    pub specials: Vec<Range<usize>>,
}

/// Inputs the official encoder raises on (so a server must reject them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A user message whose content is `null` or a list, or a list content where only text
    /// renders (system, assistant, reminder): the encoder raises TypeError or would print a
    /// Python repr.
    #[error("{0} message content must be a string")]
    ContentNotText(&'static str),
    #[error("developer message content must be a non-empty string")]
    EmptyDeveloperContent,
    #[error("a text part of a tool result has a null text")]
    NullTextPart,
    #[error("tool call `{0}`: arguments must decode to a JSON object")]
    ArgumentsNotObject(String),
    #[error("tool declaration without a `function` object")]
    ToolWithoutFunction,
    #[error("invalid task `{0}` (valid: action, query, authority, domain, title, read_url)")]
    InvalidTask(String),
}

const THINK_MAX_PREFIX: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n\
You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n\
Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

/// The official tools section up to the schema lines (its special-token strings are marked).
const TOOLS_HEAD: &str = "## Tools\n\n\
You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n\
<｜DSML｜tool_calls>\n\
<｜DSML｜invoke name=\"$TOOL_NAME\">\n\
<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n\
...\n\
</｜DSML｜invoke>\n\
<｜DSML｜invoke name=\"$TOOL_NAME2\">\n\
...\n\
</｜DSML｜invoke>\n\
</｜DSML｜tool_calls>\n\n\
String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n\
If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\n\
Otherwise, output directly after </think> with tool calls or final response.\n\n\
### Available Tool Schemas\n\n";

const TOOLS_TAIL: &str =
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n";

const RESPONSE_FORMAT_HEAD: &str =
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";

/// Quick-instruction task tokens (encoder extension). They are real vocabulary tokens, but
/// not among the structural specials the tokenizer maps from ranges, so they are not marked.
fn task_token(task: &str) -> Option<&'static str> {
    Some(match task {
        "action" => "<｜action｜>",
        "query" => "<｜query｜>",
        "authority" => "<｜authority｜>",
        "domain" => "<｜domain｜>",
        "title" => "<｜title｜>",
        "read_url" => "<｜read_url｜>",
        _ => return None,
    })
}

/// The prompt being built, with the special ranges recorded as they are emitted.
struct Out(RenderedPrompt);

impl Out {
    /// Content or fixed template text that contains no special token: never marked.
    fn plain(&mut self, s: &str) {
        self.0.text.push_str(s);
    }

    fn special(&mut self, token: &'static str) {
        let start = self.0.text.len();
        self.0.text.push_str(token);
        self.0.specials.push(start..self.0.text.len());
    }

    /// A fixed template literal: every special-token string in it is the template's own.
    fn template(&mut self, literal: &'static str) {
        let mut rest = literal;
        while !rest.is_empty() {
            match STRUCTURAL_SPECIALS.iter().find(|t| rest.starts_with(**t)) {
                Some(t) => {
                    self.special(t);
                    rest = &rest[t.len()..];
                }
                None => {
                    let n = rest.chars().next().map_or(1, char::len_utf8);
                    self.plain(&rest[..n]);
                    rest = &rest[n..];
                }
            }
        }
    }
}

/// One tool result or user text inside a (merged) user turn.
#[derive(Clone, Copy)]
enum Block<'a> {
    Text(&'a Nullable<Content>),
    ToolResult {
        call_id: Option<&'a str>,
        content: &'a Nullable<Content>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    System,
    Developer,
    User,
    Assistant,
    LatestReminder,
}

/// A message after the encoder's merging step.
#[derive(Clone)]
struct Turn<'a> {
    kind: Kind,
    msg: &'a Message,
    /// User turns only: their texts and tool results, joined by a blank line.
    blocks: Vec<Block<'a>>,
    /// A merged user turn keeps the extension keys of the user message that opened it; one
    /// opened by a tool result has none, and its `tools` key is gone for good.
    task: Option<&'a str>,
    wo_eos: bool,
    tools: Option<&'a [ToolDef]>,
}

impl Kind {
    fn of(role: Role) -> Kind {
        match role {
            Role::System => Kind::System,
            Role::Developer => Kind::Developer,
            // Tool results only ever live inside user turns.
            Role::User | Role::Tool => Kind::User,
            Role::Assistant => Kind::Assistant,
            Role::LatestReminder => Kind::LatestReminder,
        }
    }
}

impl Turn<'_> {
    fn declares_tools(&self) -> bool {
        self.tools.is_some_and(|t| !t.is_empty())
    }
}

/// `merge_tool_messages`: tool results become `<tool_result>` blocks of a user turn; tool
/// results and user texts that follow a user turn join it (a user text only if that turn
/// carries no task).
fn merge(messages: &[Message]) -> Vec<Turn<'_>> {
    let mut turns: Vec<Turn<'_>> = Vec::with_capacity(messages.len());
    for m in messages {
        let last_user = turns.last_mut().filter(|t| t.kind == Kind::User);
        match m.role {
            Role::Tool => {
                let block = Block::ToolResult {
                    call_id: m.tool_call_id.as_deref(),
                    content: &m.content,
                };
                match last_user {
                    Some(t) => t.blocks.push(block),
                    None => turns.push(Turn {
                        kind: Kind::User,
                        msg: m,
                        blocks: vec![block],
                        task: None,
                        wo_eos: false,
                        tools: None,
                    }),
                }
            }
            Role::User => {
                let block = Block::Text(&m.content);
                match last_user.filter(|t| t.task.is_none()) {
                    Some(t) => t.blocks.push(block),
                    None => turns.push(Turn {
                        kind: Kind::User,
                        msg: m,
                        blocks: vec![block],
                        task: m.task.as_deref(),
                        wo_eos: m.wo_eos,
                        tools: None,
                    }),
                }
            }
            role => turns.push(Turn {
                kind: Kind::of(role),
                msg: m,
                blocks: Vec::new(),
                task: m.task.as_deref(),
                wo_eos: m.wo_eos,
                tools: m.tools.as_deref(),
            }),
        }
    }
    turns
}

/// `sort_tool_results_by_call_order`: inside each user turn, tool results are stably sorted
/// by the position of their call id in the latest assistant turn with tool calls; unknown
/// or missing ids sort as position 0. Text blocks keep their slots.
fn sort_tool_results(turns: &mut [Turn<'_>]) {
    let mut order: HashMap<&str, usize> = HashMap::new();
    for turn in turns.iter_mut() {
        match turn.kind {
            Kind::Assistant => {
                let Some(calls) = turn.msg.tool_calls.as_deref().filter(|c| !c.is_empty()) else {
                    continue;
                };
                order.clear();
                for (i, call) in calls.iter().enumerate() {
                    let id = [call.id.as_deref(), call.function.id.as_deref()]
                        .into_iter()
                        .flatten()
                        .find(|id| !id.is_empty());
                    if let Some(id) = id {
                        order.insert(id, i);
                    }
                }
            }
            Kind::User => {
                let slots: Vec<usize> = (0..turn.blocks.len())
                    .filter(|&i| matches!(turn.blocks[i], Block::ToolResult { .. }))
                    .collect();
                if slots.len() < 2 || order.is_empty() {
                    continue;
                }
                let mut results: Vec<Block<'_>> = slots.iter().map(|&i| turn.blocks[i]).collect();
                results.sort_by_key(|b| match b {
                    Block::ToolResult { call_id, .. } => {
                        call_id.and_then(|id| order.get(id).copied()).unwrap_or(0)
                    }
                    Block::Text(_) => 0,
                });
                for (slot, block) in slots.into_iter().zip(results) {
                    turn.blocks[slot] = block;
                }
            }
            _ => {}
        }
    }
}

/// Index of the last user or developer turn (`find_last_user_index`), or -1.
fn last_user_index(turns: &[Turn<'_>]) -> isize {
    turns
        .iter()
        .rposition(|t| matches!(t.kind, Kind::User | Kind::Developer))
        .map_or(-1, |i| i as isize)
}

/// `_drop_thinking_messages`: developer turns before the last user turn disappear. (It also
/// strips earlier reasoning, but rendering never shows that reasoning when dropping is on.)
fn drop_old_developers<'a>(turns: &[Turn<'a>]) -> Vec<Turn<'a>> {
    let last_user = last_user_index(turns);
    turns
        .iter()
        .enumerate()
        .filter(|(i, t)| t.kind != Kind::Developer || *i as isize >= last_user)
        .map(|(_, t)| t.clone())
        .collect()
}

/// Renders `messages` (after `opts.context`, if any) exactly as `encode_messages` does.
pub fn render(messages: &[Message], opts: &EncodeOptions) -> Result<RenderedPrompt, RenderError> {
    let context = opts.context.as_deref().unwrap_or(&[]);
    let thinking = opts.thinking_mode == ThinkingMode::Thinking;

    let mut full = merge(context);
    let context_len = full.len();
    full.extend(merge(messages));
    sort_tool_results(&mut full);

    // Declared tools anywhere turn dropping off; tool-call history alone does not.
    let drop_thinking = opts.drop_thinking && !full.iter().any(Turn::declares_tools);

    let (full, first) = if thinking && drop_thinking {
        let kept = drop_old_developers(&full);
        // Rendering starts at the length of the context dropped on its own, as in the
        // encoder. That is not always the context's share of the dropped list: a developer
        // turn that ends the context survives alone but is dropped once a later user turn
        // follows, and then the first new messages are skipped. Kept for parity.
        let first = drop_old_developers(&full[..context_len]).len();
        (kept, first)
    } else {
        (full, context_len)
    };

    let mut out = Out(RenderedPrompt::default());
    if opts.add_default_bos_token && context.is_empty() {
        out.special(BOS);
    }
    let last_user = last_user_index(&full);
    for i in first..full.len() {
        render_turn(
            &mut out,
            i,
            &full,
            last_user,
            thinking,
            drop_thinking,
            opts.reasoning_effort,
        )?;
    }
    Ok(out.0)
}

fn render_turn(
    out: &mut Out,
    i: usize,
    turns: &[Turn<'_>],
    last_user: isize,
    thinking: bool,
    drop_thinking: bool,
    effort: Option<ReasoningEffort>,
) -> Result<(), RenderError> {
    let turn = &turns[i];
    let msg = turn.msg;
    // The encoder converts the tool list of whatever message carries one.
    let tools = turn.tools.unwrap_or(&[]);
    let schemas: Vec<&Value> = tools
        .iter()
        .map(|t| t.function.as_ref().ok_or(RenderError::ToolWithoutFunction))
        .collect::<Result<_, _>>()?;

    if i == 0 && thinking && effort == Some(ReasoningEffort::Max) {
        out.plain(THINK_MAX_PREFIX);
    }

    match turn.kind {
        Kind::System => {
            out.plain(text_or_empty(&msg.content, "system")?);
            system_sections(out, msg, &schemas);
        }
        Kind::Developer => {
            let content = match &msg.content {
                Nullable::Value(Content::Text(s)) if !s.is_empty() => s,
                Nullable::Value(Content::Parts(p)) if !p.is_empty() => {
                    return Err(RenderError::ContentNotText("developer"));
                }
                _ => return Err(RenderError::EmptyDeveloperContent),
            };
            out.special(USER);
            out.plain(content);
            system_sections(out, msg, &schemas);
        }
        Kind::User => {
            out.special(USER);
            for (k, block) in turn.blocks.iter().enumerate() {
                if k > 0 {
                    out.plain("\n\n");
                }
                render_block(out, block)?;
            }
        }
        Kind::LatestReminder => {
            out.plain(LATEST_REMINDER);
            match &msg.content {
                Nullable::Value(Content::Text(s)) => out.plain(s),
                // str.format of None.
                Nullable::Absent | Nullable::Null => out.plain("None"),
                Nullable::Value(Content::Parts(_)) => {
                    return Err(RenderError::ContentNotText("latest_reminder"))
                }
            }
        }
        Kind::Assistant => {
            // Reasoning is shown in thinking mode unless it is being dropped for this turn,
            // and never right after a task turn (a task answer has no thinking).
            let after_task = i > 0 && turns[i - 1].task.is_some();
            if thinking && !after_task && (!drop_thinking || i as isize > last_user) {
                out.plain(msg.reasoning_content.as_deref().unwrap_or(""));
                out.special(THINK_END);
            }
            out.plain(text_or_empty(&msg.content, "assistant")?);
            if let Some(calls) = msg.tool_calls.as_deref().filter(|c| !c.is_empty()) {
                render_tool_calls(out, calls)?;
            }
            if !turn.wo_eos {
                out.special(EOS);
            }
        }
    }

    // What follows the turn: nothing if another non-assistant turn comes next; otherwise a
    // task token, or the assistant prefix after a user/developer turn.
    if turns
        .get(i + 1)
        .is_some_and(|next| !matches!(next.kind, Kind::Assistant | Kind::LatestReminder))
    {
        return Ok(());
    }
    if let Some(task) = turn.task {
        let token = task_token(task).ok_or_else(|| RenderError::InvalidTask(task.to_string()))?;
        if task == "action" {
            out.special(ASSISTANT);
            out.special(if thinking { THINK_START } else { THINK_END });
        }
        out.plain(token);
    } else if matches!(turn.kind, Kind::User | Kind::Developer) {
        out.special(ASSISTANT);
        let open_thinking = thinking && (!drop_thinking || i as isize >= last_user);
        out.special(if open_thinking {
            THINK_START
        } else {
            THINK_END
        });
    }
    Ok(())
}

/// `content or ""` for roles whose content is plain text.
fn text_or_empty<'a>(
    content: &'a Nullable<Content>,
    role: &'static str,
) -> Result<&'a str, RenderError> {
    match content {
        Nullable::Value(Content::Text(s)) => Ok(s),
        Nullable::Value(Content::Parts(p)) if !p.is_empty() => {
            Err(RenderError::ContentNotText(role))
        }
        _ => Ok(""),
    }
}

/// Tools block and response-format section of a system or developer turn.
fn system_sections(out: &mut Out, msg: &Message, schemas: &[&Value]) {
    if !schemas.is_empty() {
        out.plain("\n\n");
        out.template(TOOLS_HEAD);
        for (k, schema) in schemas.iter().enumerate() {
            if k > 0 {
                out.plain("\n");
            }
            out.plain(&pyjson::dumps_serde(schema));
        }
        out.template(TOOLS_TAIL);
    }
    if let Some(format) = msg.response_format.as_ref().filter(|f| pyjson::truthy(f)) {
        out.plain("\n\n");
        out.plain(RESPONSE_FORMAT_HEAD);
        out.plain(&pyjson::dumps_serde(format));
    }
}

fn render_block(out: &mut Out, block: &Block<'_>) -> Result<(), RenderError> {
    match block {
        Block::Text(content) => match content {
            Nullable::Absent => {}
            Nullable::Value(Content::Text(s)) => out.plain(s),
            Nullable::Null | Nullable::Value(Content::Parts(_)) => {
                return Err(RenderError::ContentNotText("user"))
            }
        },
        Block::ToolResult { content, .. } => {
            out.plain("<tool_result>");
            match content {
                Nullable::Absent => {}
                Nullable::Null => out.plain("None"),
                Nullable::Value(Content::Text(s)) => out.plain(s),
                Nullable::Value(Content::Parts(parts)) => {
                    for (k, part) in parts.iter().enumerate() {
                        if k > 0 {
                            out.plain("\n\n");
                        }
                        match (&part.kind, &part.text) {
                            (Nullable::Value(kind), Nullable::Value(text)) if kind == "text" => {
                                out.plain(text)
                            }
                            (Nullable::Value(kind), Nullable::Absent) if kind == "text" => {}
                            (Nullable::Value(kind), Nullable::Null) if kind == "text" => {
                                return Err(RenderError::NullTextPart);
                            }
                            (Nullable::Value(kind), _) => {
                                out.plain(&format!("[Unsupported {kind}]"))
                            }
                            _ => out.plain("[Unsupported None]"),
                        }
                    }
                }
            }
            out.plain("</tool_result>");
        }
    }
    Ok(())
}

/// One DSML parameter: string values are written raw, everything else as Python JSON.
struct Param {
    name: String,
    is_string: bool,
    value: String,
}

/// The parameters the encoder derives from a call's `arguments`.
fn call_params(name: &str, arguments: &Value) -> Result<Vec<Param>, RenderError> {
    let raw = match arguments {
        Value::String(raw) => raw,
        // json.loads raises TypeError on a non-string; the except clause wraps the value.
        other => {
            return Ok(vec![Param {
                name: "arguments".into(),
                is_string: false,
                value: pyjson::dumps_serde(other),
            }]);
        }
    };
    match pyjson::loads(raw) {
        None => Ok(vec![Param {
            name: "arguments".into(),
            is_string: true,
            value: raw.clone(),
        }]),
        Some(PyValue::Dict(pairs)) => Ok(pairs
            .into_iter()
            .map(|(k, v)| match v {
                PyValue::Str(s) => Param {
                    name: k,
                    is_string: true,
                    value: s,
                },
                other => Param {
                    name: k,
                    is_string: false,
                    value: pyjson::dumps(&other),
                },
            })
            .collect()),
        Some(_) => Err(RenderError::ArgumentsNotObject(name.to_string())),
    }
}

fn render_tool_calls(out: &mut Out, calls: &[super::types::ToolCall]) -> Result<(), RenderError> {
    out.plain("\n\n<");
    out.special(DSML);
    out.plain("tool_calls>\n");
    for (k, call) in calls.iter().enumerate() {
        let params = call_params(&call.function.name, &call.function.arguments)?;
        if k > 0 {
            out.plain("\n");
        }
        out.plain("<");
        out.special(DSML);
        out.plain("invoke name=\"");
        out.plain(&call.function.name);
        out.plain("\">\n");
        for (j, p) in params.iter().enumerate() {
            if j > 0 {
                out.plain("\n");
            }
            out.plain("<");
            out.special(DSML);
            out.plain("parameter name=\"");
            out.plain(&p.name);
            out.plain(if p.is_string {
                "\" string=\"true\">"
            } else {
                "\" string=\"false\">"
            });
            out.plain(&p.value);
            out.plain("</");
            out.special(DSML);
            out.plain("parameter>");
        }
        // Zero parameters leave an empty line: the encoder joins nothing between two "\n".
        out.plain("\n</");
        out.special(DSML);
        out.plain("invoke>");
    }
    out.plain("\n</");
    out.special(DSML);
    out.plain("tool_calls>");
    Ok(())
}
