//! STAND-IN for `ds4::chat` (branch `chat`), used until that module lands on main.
//!
//! Renders a message list like DeepSeek's official V4 encoder (`../reference/chat/README.md`
//! summary: system in place with the tools block appended, user/tool merging, reasoning drop
//! rule, DSML tool-call blocks) and parses generated text back (protocol.md §3). It is kept
//! deliberately small; the byte-exact renderer and the strict parser are `ds4::chat`'s job.
//! When `ds4::chat` lands, only [`render`], [`parse_completion`] and [`StreamParser`] here are
//! replaced by thin adapters.

use std::ops::Range;

use super::{Msg, Role};

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
pub const USER: &str = "<｜User｜>";
pub const ASSISTANT: &str = "<｜Assistant｜>";
pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";
pub const DSML: &str = "｜DSML｜";

const THINK_MAX_PREFIX: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

const TOOLS_HEAD: &str = "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"$TOOL_NAME\">\n<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n...\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\nString parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\nIf thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\nOtherwise, output directly after </think> with tool calls or final response.\n\n### Available Tool Schemas\n\n";
const TOOLS_TAIL: &str =
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n";

pub const BLOCK_START: &str = "<｜DSML｜tool_calls>";
pub const BLOCK_END: &str = "</｜DSML｜tool_calls>";
const INVOKE_START: &str = "<｜DSML｜invoke";
const INVOKE_END: &str = "</｜DSML｜invoke>";
const PARAM_START: &str = "<｜DSML｜parameter";
const PARAM_END: &str = "</｜DSML｜parameter>";

/// A rendered prompt: text plus the byte ranges where the template put special tokens (so
/// the same strings inside user content are tokenized as plain text).
#[derive(Debug, Clone, Default)]
pub struct Rendered {
    pub text: String,
    pub specials: Vec<Range<usize>>,
}

impl Rendered {
    fn special(&mut self, s: &str) {
        let start = self.text.len();
        self.text.push_str(s);
        self.specials.push(start..self.text.len());
    }
    fn plain(&mut self, s: &str) {
        self.text.push_str(s);
    }
    /// DSML text written by the template (tool-call blocks): its `｜DSML｜` markers are
    /// template specials, everything else plain.
    fn dsml(&mut self, s: &str) {
        let mut rest = s;
        while let Some(i) = rest.find(DSML) {
            self.plain(&rest[..i]);
            self.special(DSML);
            rest = &rest[i + DSML.len()..];
        }
        self.plain(rest);
    }
}

/// Render options.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    pub thinking: bool,
    pub think_max: bool,
    /// One JSON object text per tool (the function schema), in order.
    pub tools: Vec<String>,
}

/// Renders `messages` (official V4 encoder rules, "first_system" tools placement).
pub fn render(messages: &[Msg], opts: &RenderOptions) -> Rendered {
    let mut out = Rendered::default();
    out.special(BOS);
    if opts.thinking && opts.think_max {
        out.plain(THINK_MAX_PREFIX);
    }
    // Merge runs of user / tool messages into single user turns (joined by "\n\n").
    enum Turn<'a> {
        System(&'a Msg),
        User(String),
        Assistant(&'a Msg),
    }
    let mut turns: Vec<Turn> = Vec::new();
    for m in messages {
        match m.role {
            Role::System | Role::Developer => turns.push(Turn::System(m)),
            Role::User | Role::Tool => {
                let piece = if m.role == Role::Tool {
                    format!("<tool_result>{}</tool_result>", m.content)
                } else {
                    m.content.clone()
                };
                if let Some(Turn::User(prev)) = turns.last_mut() {
                    prev.push_str("\n\n");
                    prev.push_str(&piece);
                } else {
                    turns.push(Turn::User(piece));
                }
            }
            Role::Assistant => turns.push(Turn::Assistant(m)),
        }
    }
    let tools_block = if opts.tools.is_empty() {
        None
    } else {
        Some(format!("{TOOLS_HEAD}{}{TOOLS_TAIL}", opts.tools.join("\n")))
    };
    let dropping = tools_block.is_none();
    let last_user = turns
        .iter()
        .rposition(|t| matches!(t, Turn::User(_)))
        .unwrap_or(0);
    let mut tools_done = false;
    if let Some(tb) = &tools_block {
        if !matches!(turns.first(), Some(Turn::System(_))) {
            out.plain("\n\n");
            out.plain(tb);
            tools_done = true;
        }
    }
    for (i, t) in turns.iter().enumerate() {
        match t {
            Turn::System(m) => {
                out.plain(&m.content);
                if let (false, Some(tb)) = (tools_done, &tools_block) {
                    out.plain("\n\n");
                    out.plain(tb);
                    tools_done = true;
                }
            }
            Turn::User(text) => {
                out.special(USER);
                out.plain(text);
                let next_is_assistant = matches!(turns.get(i + 1), Some(Turn::Assistant(_)));
                if next_is_assistant || i + 1 == turns.len() {
                    out.special(ASSISTANT);
                    let think = opts.thinking && (!dropping || i >= last_user);
                    out.special(if think { THINK_OPEN } else { THINK_CLOSE });
                }
            }
            Turn::Assistant(m) => {
                let keep = opts.thinking && (!dropping || i > last_user);
                if keep {
                    if let Some(r) = &m.reasoning {
                        out.plain(r);
                    }
                    out.special(THINK_CLOSE);
                }
                out.plain(&m.content);
                if let Some(raw) = &m.raw_dsml {
                    out.dsml(raw);
                } else if !m.tool_calls.is_empty() {
                    out.dsml(&canonical_dsml(&m.tool_calls));
                }
                out.special(EOS);
            }
        }
    }
    out
}

/// The canonical DSML block for tool calls (official encoder form).
pub fn canonical_dsml(calls: &[super::ToolCall]) -> String {
    let mut s = String::from("\n\n<｜DSML｜tool_calls>\n");
    let invokes: Vec<String> = calls
        .iter()
        .map(|c| {
            let params: Vec<String> = match serde_json::from_str::<serde_json::Value>(&c.arguments)
            {
                Ok(serde_json::Value::Object(map)) => map
                    .iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(sv) => format!(
                            "<｜DSML｜parameter name=\"{k}\" string=\"true\">{sv}</｜DSML｜parameter>"
                        ),
                        other => format!(
                            "<｜DSML｜parameter name=\"{k}\" string=\"false\">{}</｜DSML｜parameter>",
                            super::json_spaced(other)
                        ),
                    })
                    .collect(),
                _ => vec![format!(
                    "<｜DSML｜parameter name=\"arguments\" string=\"true\">{}</｜DSML｜parameter>",
                    c.arguments
                )],
            };
            format!(
                "<｜DSML｜invoke name=\"{}\">\n{}\n</｜DSML｜invoke>",
                c.name,
                params.join("\n")
            )
        })
        .collect();
    s.push_str(&invokes.join("\n"));
    s.push_str("\n</｜DSML｜tool_calls>");
    s
}

/// A tool call parsed from generated DSML: name and compact JSON arguments (keys in order).
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

/// The authoritative parse of a finished generation.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    pub reasoning: Option<String>,
    pub content: String,
    pub calls: Vec<ParsedCall>,
    /// The exact DSML block (from its start, including a leading "\n\n", to the end tag).
    pub raw_dsml: Option<String>,
    /// A block started but could not be parsed (returned as text).
    pub malformed: bool,
}

/// Splits reasoning / content and parses a DSML tool-call block (protocol.md §3.1-§3.2).
pub fn parse_completion(text: &str, thinking: bool) -> Parsed {
    let (reasoning, after) = split_reasoning(text, thinking);
    let mut p = Parsed {
        reasoning,
        ..Default::default()
    };
    let start = after
        .find(&format!("\n\n{BLOCK_START}"))
        .or_else(|| after.find(BLOCK_START));
    let Some(start) = start else {
        p.content = after.to_string();
        return p;
    };
    match parse_block(&after[start..]) {
        Some((calls, len)) => {
            p.content = after[..start].trim_end().to_string();
            p.raw_dsml = Some(after[start..start + len].to_string());
            p.calls = calls;
        }
        None => {
            p.content = after.to_string();
            p.malformed = true;
        }
    }
    p
}

fn split_reasoning(text: &str, thinking: bool) -> (Option<String>, &str) {
    let t = if thinking {
        text.strip_prefix(THINK_OPEN).unwrap_or(text)
    } else {
        text
    };
    match t.find(THINK_CLOSE) {
        Some(i) => (Some(t[..i].to_string()), &t[i + THINK_CLOSE.len()..]),
        None => (None, t),
    }
}

fn skip_ws(s: &str) -> &str {
    s.trim_start_matches([' ', '\t', '\n', '\r'])
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=\"");
    let i = tag.find(&key)? + key.len();
    let j = tag[i..].find('"')?;
    Some(&tag[i..i + j])
}

/// Parses one block starting at `s` (possibly with a leading "\n\n"); returns the calls and
/// the byte length of the block.
fn parse_block(s: &str) -> Option<(Vec<ParsedCall>, usize)> {
    let body_start = s.find(BLOCK_START)? + BLOCK_START.len();
    let mut rest = &s[body_start..];
    let mut calls = Vec::new();
    loop {
        rest = skip_ws(rest);
        if let Some(r) = rest.strip_prefix(BLOCK_END) {
            return Some((calls, s.len() - r.len()));
        }
        let r = rest.strip_prefix(INVOKE_START)?;
        let gt = r.find('>')?;
        let name = attr(&r[..gt], "name")?.to_string();
        rest = &r[gt + 1..];
        let mut args = String::from("{");
        loop {
            rest = skip_ws(rest);
            if let Some(r) = rest.strip_prefix(INVOKE_END) {
                rest = r;
                break;
            }
            let r = rest.strip_prefix(PARAM_START)?;
            let gt = r.find('>')?;
            let tag = &r[..gt];
            let pname = attr(tag, "name")?;
            let is_string = attr(tag, "string").is_none_or(|v| v == "true");
            let r = &r[gt + 1..];
            let end = r.find(PARAM_END)?;
            let value = &r[..end];
            if args.len() > 1 {
                args.push(',');
            }
            args.push_str(&serde_json::to_string(pname).ok()?);
            args.push(':');
            if is_string {
                args.push_str(&serde_json::to_string(value).ok()?);
            } else {
                let v = value.trim();
                match serde_json::from_str::<serde_json::Value>(v) {
                    Ok(j) => args.push_str(&serde_json::to_string(&j).ok()?),
                    Err(_) if v.is_empty() => args.push_str("null"),
                    Err(_) => args.push_str(&serde_json::to_string(v).ok()?),
                }
            }
            rest = &r[end + PARAM_END.len()..];
        }
        args.push('}');
        calls.push(ParsedCall {
            name,
            arguments: args,
        });
    }
}

/// Events of the incremental projection (protocol.md §3.6).
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Reasoning(String),
    /// The reasoning block closed (`</think>` seen).
    ReasoningDone,
    Content(String),
    /// A tool call header: index within the turn and function name.
    ToolStart {
        index: usize,
        name: String,
    },
    /// A fragment of the JSON arguments of call `index`.
    ToolArgs {
        index: usize,
        fragment: String,
    },
    /// The DSML block is complete: generation should stop.
    BlockDone,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PState {
    Reasoning,
    Content,
    /// Inside a block, between tags.
    Tags,
    /// Inside an invoke, between parameters.
    Invoke,
    /// Inside a parameter value.
    Value {
        string: bool,
    },
    /// Block finished, or the live projection gave up (final parse decides).
    Done,
}

/// How the next token should be sampled (protocol.md §3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntaxState {
    /// Request sampling.
    Free,
    /// DSML structure: argmax.
    Structural,
}

/// Incremental parser over generated text.
pub struct StreamParser {
    state: PState,
    pending: String,
    seen_think_open_check: bool,
    call_index: usize,
    in_call: bool,
    first_param: bool,
    /// The projection aborted on unexpected bytes.
    pub aborted: bool,
    /// Number of tool calls whose header was streamed.
    pub streamed_calls: usize,
}

fn is_prefix_of(s: &str, tag: &str) -> bool {
    tag.starts_with(s)
}

/// Length of the longest suffix of `s` that is a proper prefix of `tag` (on char boundaries).
fn partial_suffix(s: &str, tag: &str) -> usize {
    let max = s.len().min(tag.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

impl StreamParser {
    pub fn new(thinking: bool) -> StreamParser {
        StreamParser {
            state: if thinking {
                PState::Reasoning
            } else {
                PState::Content
            },
            pending: String::new(),
            seen_think_open_check: !thinking,
            call_index: 0,
            in_call: false,
            first_param: true,
            aborted: false,
            streamed_calls: 0,
        }
    }

    /// How the next token should be sampled.
    pub fn syntax_state(&self) -> SyntaxState {
        match self.state {
            PState::Tags | PState::Invoke => SyntaxState::Structural,
            PState::Value { string: false } => SyntaxState::Structural,
            PState::Value { string: true } => {
                if self.pending.len() >= 2 && is_prefix_of(&self.pending, PARAM_END)
                    || partial_suffix(&self.pending, PARAM_END) >= 2
                {
                    SyntaxState::Structural
                } else {
                    SyntaxState::Free
                }
            }
            PState::Content => {
                // A partial block-start marker is structural once it is unambiguous.
                let n = partial_suffix(&self.pending, BLOCK_START);
                if n >= 2 {
                    SyntaxState::Structural
                } else {
                    SyntaxState::Free
                }
            }
            _ => SyntaxState::Free,
        }
    }

    /// Is generation inside a tool-call block (no continued checkpoints there)?
    pub fn in_block(&self) -> bool {
        matches!(
            self.state,
            PState::Tags | PState::Invoke | PState::Value { .. }
        )
    }

    /// Feeds newly generated text; returns the events it completes.
    pub fn push(&mut self, text: &str) -> Vec<StreamEvent> {
        self.pending.push_str(text);
        let mut ev = Vec::new();
        self.run(&mut ev, false);
        ev
    }

    /// End of generation: releases whatever was held back.
    pub fn finish(&mut self) -> Vec<StreamEvent> {
        let mut ev = Vec::new();
        self.run(&mut ev, true);
        match self.state {
            PState::Reasoning if !self.pending.is_empty() => {
                ev.push(StreamEvent::Reasoning(std::mem::take(&mut self.pending)))
            }
            PState::Content if !self.pending.is_empty() => {
                ev.push(StreamEvent::Content(std::mem::take(&mut self.pending)))
            }
            _ => {}
        }
        ev
    }

    fn run(&mut self, ev: &mut Vec<StreamEvent>, eof: bool) {
        loop {
            let before = (self.state, self.pending.len());
            self.step(ev, eof);
            if (self.state, self.pending.len()) == before {
                break;
            }
        }
    }

    fn step(&mut self, ev: &mut Vec<StreamEvent>, eof: bool) {
        match self.state {
            PState::Reasoning => {
                if !self.seen_think_open_check {
                    if self.pending.starts_with(THINK_OPEN) {
                        self.pending.drain(..THINK_OPEN.len());
                        self.seen_think_open_check = true;
                    } else if is_prefix_of(&self.pending, THINK_OPEN) && !eof {
                        return;
                    } else {
                        self.seen_think_open_check = true;
                    }
                }
                if let Some(i) = self.pending.find(THINK_CLOSE) {
                    if i > 0 {
                        ev.push(StreamEvent::Reasoning(self.pending[..i].to_string()));
                    }
                    self.pending.drain(..i + THINK_CLOSE.len());
                    ev.push(StreamEvent::ReasoningDone);
                    self.state = PState::Content;
                } else {
                    let hold = if eof {
                        0
                    } else {
                        partial_suffix(&self.pending, THINK_CLOSE)
                    };
                    let n = self.pending.len() - hold;
                    if n > 0 {
                        ev.push(StreamEvent::Reasoning(self.pending[..n].to_string()));
                        self.pending.drain(..n);
                    }
                }
            }
            PState::Content => {
                if let Some(i) = self.pending.find(BLOCK_START) {
                    let text = self.pending[..i].trim_end();
                    if !text.is_empty() {
                        ev.push(StreamEvent::Content(text.to_string()));
                    }
                    self.pending.drain(..i + BLOCK_START.len());
                    self.state = PState::Tags;
                    return;
                }
                if eof {
                    return;
                }
                // Hold back trailing whitespace and a possible partial marker.
                let hold_tag = partial_suffix(&self.pending, BLOCK_START);
                let body = &self.pending[..self.pending.len() - hold_tag];
                let keep = body.trim_end().len();
                if keep > 0 {
                    ev.push(StreamEvent::Content(self.pending[..keep].to_string()));
                    self.pending.drain(..keep);
                }
            }
            PState::Tags => {
                let t = skip_ws(&self.pending).len();
                let cut = self.pending.len() - t;
                self.pending.drain(..cut);
                if self.pending.starts_with(BLOCK_END) {
                    self.pending.drain(..BLOCK_END.len());
                    self.state = PState::Done;
                    ev.push(StreamEvent::BlockDone);
                } else if self.pending.starts_with(INVOKE_START) {
                    let Some(gt) = self.pending.find('>') else {
                        return;
                    };
                    match attr(&self.pending[..gt], "name") {
                        Some(name) => {
                            let name = name.to_string();
                            self.pending.drain(..gt + 1);
                            ev.push(StreamEvent::ToolStart {
                                index: self.call_index,
                                name,
                            });
                            ev.push(StreamEvent::ToolArgs {
                                index: self.call_index,
                                fragment: "{".into(),
                            });
                            self.streamed_calls += 1;
                            self.in_call = true;
                            self.first_param = true;
                            self.state = PState::Invoke;
                        }
                        None => self.abort(),
                    }
                } else if self.pending.is_empty()
                    || is_prefix_of(&self.pending, BLOCK_END)
                    || is_prefix_of(&self.pending, INVOKE_START)
                {
                    // wait for more
                } else {
                    self.abort();
                }
            }
            PState::Invoke => {
                let t = skip_ws(&self.pending).len();
                let cut = self.pending.len() - t;
                self.pending.drain(..cut);
                if self.pending.starts_with(INVOKE_END) {
                    self.pending.drain(..INVOKE_END.len());
                    ev.push(StreamEvent::ToolArgs {
                        index: self.call_index,
                        fragment: "}".into(),
                    });
                    self.call_index += 1;
                    self.in_call = false;
                    self.state = PState::Tags;
                } else if self.pending.starts_with(PARAM_START) {
                    let Some(gt) = self.pending.find('>') else {
                        return;
                    };
                    let tag = &self.pending[..gt];
                    let (Some(name), Some(string)) = (attr(tag, "name"), attr(tag, "string"))
                    else {
                        self.abort();
                        return;
                    };
                    let string = string == "true";
                    let mut frag = String::new();
                    if !self.first_param {
                        frag.push(',');
                    }
                    frag.push_str(&serde_json::to_string(name).unwrap_or_default());
                    frag.push(':');
                    if string {
                        frag.push('"');
                    }
                    self.first_param = false;
                    self.pending.drain(..gt + 1);
                    ev.push(StreamEvent::ToolArgs {
                        index: self.call_index,
                        fragment: frag,
                    });
                    self.state = PState::Value { string };
                } else if self.pending.is_empty()
                    || is_prefix_of(&self.pending, INVOKE_END)
                    || is_prefix_of(&self.pending, PARAM_START)
                {
                } else {
                    self.abort();
                }
            }
            PState::Value { string } => {
                let (value_end, done) = match self.pending.find(PARAM_END) {
                    Some(i) => (i, true),
                    None => (
                        self.pending.len() - partial_suffix(&self.pending, PARAM_END),
                        false,
                    ),
                };
                let mut frag = String::new();
                let v = &self.pending[..value_end];
                if string {
                    let q = serde_json::to_string(v).unwrap_or_default();
                    frag.push_str(&q[1..q.len() - 1]);
                } else {
                    frag.push_str(v);
                }
                if done {
                    if string {
                        frag.push('"');
                    }
                    self.pending.drain(..value_end + PARAM_END.len());
                    self.state = PState::Invoke;
                } else {
                    self.pending.drain(..value_end);
                }
                if !frag.is_empty() {
                    ev.push(StreamEvent::ToolArgs {
                        index: self.call_index,
                        fragment: frag,
                    });
                }
            }
            PState::Done => {}
        }
    }

    fn abort(&mut self) {
        self.aborted = true;
        self.state = PState::Done;
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(text: &str, thinking: bool, step: usize) -> Vec<StreamEvent> {
        let mut p = StreamParser::new(thinking);
        let mut ev = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        for c in chars.chunks(step) {
            ev.extend(p.push(&c.iter().collect::<String>()));
        }
        ev.extend(p.finish());
        ev
    }

    fn join(ev: &[StreamEvent]) -> (String, String, String) {
        let (mut r, mut c, mut a) = (String::new(), String::new(), String::new());
        for e in ev {
            match e {
                StreamEvent::Reasoning(s) => r.push_str(s),
                StreamEvent::Content(s) => c.push_str(s),
                StreamEvent::ToolArgs { fragment, .. } => a.push_str(fragment),
                _ => {}
            }
        }
        (r, c, a)
    }

    const CALL: &str = "Need it.</think>Sure.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Ro\"me</｜DSML｜parameter>\n<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

    #[test]
    fn stream_matches_final_parse_at_every_chunking() {
        let parsed = parse_completion(CALL, true);
        assert_eq!(parsed.reasoning.as_deref(), Some("Need it."));
        assert_eq!(parsed.content, "Sure.");
        assert_eq!(parsed.calls.len(), 1);
        assert_eq!(parsed.calls[0].arguments, r#"{"city":"Ro\"me","days":2}"#);
        assert!(parsed
            .raw_dsml
            .as_deref()
            .unwrap()
            .starts_with("\n\n<｜DSML｜"));
        for step in [1, 2, 3, 7, 1000] {
            let ev = collect(CALL, true, step);
            let (r, c, a) = join(&ev);
            assert_eq!(r, "Need it.");
            assert_eq!(c, "Sure.");
            assert_eq!(a, parsed.calls[0].arguments, "step {step}");
            assert!(ev.contains(&StreamEvent::BlockDone));
        }
    }

    #[test]
    fn plain_and_malformed() {
        let p = parse_completion("hello", false);
        assert_eq!(p.content, "hello");
        let p = parse_completion("x\n\n<｜DSML｜tool_calls>\n<oops", false);
        assert!(p.malformed && p.calls.is_empty());
        let ev = collect("a <b> c", false, 1);
        assert_eq!(join(&ev).1, "a <b> c");
    }

    #[test]
    fn render_shapes() {
        let msgs = vec![Msg::text(Role::System, "S"), Msg::text(Role::User, "hi")];
        let r = render(
            &msgs,
            &RenderOptions {
                thinking: true,
                ..Default::default()
            },
        );
        assert_eq!(
            r.text,
            "<｜begin▁of▁sentence｜>S<｜User｜>hi<｜Assistant｜><think>"
        );
        assert_eq!(r.specials.len(), 4);
    }
}
