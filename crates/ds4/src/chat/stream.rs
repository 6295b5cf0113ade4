//! Incremental projection of a completion as it is generated (protocol.md §3.6), following
//! the official grammar of [`super::parse_completion`] so that the events of a completion
//! that parses add up exactly to the final message: concatenated reasoning / content deltas
//! equal `reasoning_content` / `content`, and each call's argument deltas concatenate to its
//! final `arguments` text (`{"k": "v", "n": 2}`, the official spelling).
//!
//! Text is emitted as soon as it cannot belong to a marker: a tail that could still grow
//! into `</think>`, EOS or `\n\n<｜DSML｜tool_calls` is held back, so splits anywhere (inside
//! `</thi` + `nk>`, inside DSML tags) never leak marker bytes. The first certain violation of
//! the grammar is reported as [`StreamEvent::Malformed`] and ends the projection; the final
//! result from [`StreamParser::finish`] is always the one-shot parse of the whole text.

use std::collections::HashSet;

use super::parse::{
    find_string_attr, match_invoke_header, parse_completion, value_terminator_len, ParseError,
    ParsedMessage, ATTR_STRING_FALSE, ATTR_STRING_TRUE, INVOKE_END, PARAM_END, PARAM_NAME_PREFIX,
    PARAM_START, TOOL_CALLS_START,
};
use super::pyjson;
use super::types::ThinkingMode;
use super::{BOS, DSML, EOS, THINK_END, THINK_START};

/// One step of the projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    ReasoningDelta(String),
    ContentDelta(String),
    /// A complete invoke header was read. `index` counts calls from 0 in this completion;
    /// call ids are the server's business (protocol.md §4.10).
    ToolCallStart {
        index: usize,
        name: String,
    },
    /// A fragment of the call's arguments JSON text, starting with `{`.
    ToolCallArgsDelta {
        index: usize,
        delta: String,
    },
    /// The call's closing `}` has been sent.
    ToolCallEnd {
        index: usize,
    },
    /// The text can no longer parse; nothing more is projected. `finish` gives the
    /// authoritative error.
    Malformed {
        reason: String,
    },
}

/// Where the next generated token lands, for greedy DSML syntax sampling (protocol.md §3.5,
/// applied to the official grammar): `Structural` and `JsonStructural` positions are sampled
/// at temperature 0, the others with the request's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntaxState {
    /// Reasoning, content, or after the block.
    Outside,
    /// DSML tags, attributes and the fixed text between them (or a marker being completed).
    Structural,
    /// Inside a `string="true"` value.
    StringBody,
    /// Inside a `string="false"` value, outside any JSON string literal.
    JsonStructural,
    /// Inside a JSON string literal of a `string="false"` value.
    JsonString,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reasoning,
    Content,
    /// After `\n\n<｜DSML｜tool_calls` or an invoke's `</｜DSML｜invoke`: `>\n` and the next tag.
    BlockGap,
    /// After `<｜DSML｜invoke`: ` name="...">\n` up to the first parameter or the invoke end.
    InvokeHeader,
    /// After `<｜DSML｜parameter`: ` name="..." string="true|false">`.
    ParamHeader,
    ParamValue {
        is_string: bool,
    },
    /// After `/｜DSML｜parameter`: `>\n` and the next parameter or the invoke end.
    ParamGap,
    /// After `</｜DSML｜tool_calls>`: an optional EOS.
    AfterBlock,
    Done,
    Failed,
}

/// Strings that make the official parser reject reasoning or content containing them.
const REASONING_FORBIDDEN: [&str; 4] = [BOS, EOS, THINK_START, DSML];
const CONTENT_FORBIDDEN: [&str; 4] = [BOS, THINK_START, THINK_END, DSML];
const PARAM_CLOSE_TAG: &str = "</｜DSML｜parameter";

/// Incremental parser: feed text deltas with [`StreamParser::push`], then call
/// [`StreamParser::finish`].
#[derive(Debug, Clone)]
pub struct StreamParser {
    mode: ThinkingMode,
    buf: String,
    state: State,
    /// Start of the current state's text in `buf`.
    pos: usize,
    /// Reasoning, content and values: bytes before this were emitted.
    emitted: usize,
    /// Stop-string searches of the current state resume here (earlier bytes hold none).
    scanned: usize,
    /// Reasoning and content: forbidden strings were looked for in the bytes before this.
    checked: usize,
    /// Calls started so far (the index of the current one is `calls - 1`).
    calls: usize,
    params_in_call: HashSet<String>,
    /// JSON string-literal tracking inside a `string="false"` value, for [`SyntaxState`].
    json_pos: usize,
    json_in_string: bool,
    json_escaped: bool,
    events: Vec<StreamEvent>,
}

impl StreamParser {
    pub fn new(mode: ThinkingMode) -> Self {
        let state = match mode {
            ThinkingMode::Thinking => State::Reasoning,
            ThinkingMode::Chat => State::Content,
        };
        StreamParser {
            mode,
            buf: String::new(),
            state,
            pos: 0,
            emitted: 0,
            scanned: 0,
            checked: 0,
            calls: 0,
            params_in_call: HashSet::new(),
            json_pos: 0,
            json_in_string: false,
            json_escaped: false,
            events: Vec::new(),
        }
    }

    /// The whole text received so far.
    pub fn text(&self) -> &str {
        &self.buf
    }

    /// Appends a delta and returns the events it completes.
    pub fn push(&mut self, delta: &str) -> Vec<StreamEvent> {
        self.buf.push_str(delta);
        self.run(false);
        std::mem::take(&mut self.events)
    }

    /// Ends the stream: flushes what the end of text completes and returns the last events
    /// with the final message, which is exactly `parse_completion` of the whole text.
    pub fn finish(mut self) -> (Vec<StreamEvent>, Result<ParsedMessage, ParseError>) {
        self.run(true);
        let result = parse_completion(&self.buf, self.mode);
        if let Err(e) = &result {
            if self.state != State::Failed {
                self.events.push(StreamEvent::Malformed {
                    reason: e.to_string(),
                });
            }
        }
        (self.events, result)
    }

    /// Whether the next token is generated inside DSML structure (see [`SyntaxState`]).
    pub fn syntax_state(&self) -> SyntaxState {
        match self.state {
            State::Reasoning | State::Done | State::Failed => SyntaxState::Outside,
            // A held-back `\n\n<｜...` is a block being opened; `\n\n<` alone may be HTML.
            State::Content => {
                let tail = &self.buf[self.emitted..];
                if tail.len() > 3 && TOOL_CALLS_START.starts_with(tail) {
                    SyntaxState::Structural
                } else {
                    SyntaxState::Outside
                }
            }
            State::BlockGap
            | State::InvokeHeader
            | State::ParamHeader
            | State::ParamGap
            | State::AfterBlock => SyntaxState::Structural,
            State::ParamValue { is_string } => {
                if !is_string && self.json_in_string {
                    SyntaxState::JsonString
                } else if self.closing_param_tag_pending() {
                    SyntaxState::Structural
                } else if is_string {
                    SyntaxState::StringBody
                } else {
                    SyntaxState::JsonStructural
                }
            }
        }
    }

    /// The text ends with at least `</` of the parameter end tag.
    fn closing_param_tag_pending(&self) -> bool {
        let value = &self.buf[self.pos..];
        (2..=PARAM_CLOSE_TAG.len())
            .filter(|&k| PARAM_CLOSE_TAG.is_char_boundary(k))
            .any(|k| value.ends_with(&PARAM_CLOSE_TAG[..k]))
    }

    fn run(&mut self, eof: bool) {
        while self.step(eof) {}
        if let State::ParamValue { is_string: false } = self.state {
            self.track_json();
        }
    }

    /// Advances the current state; true if it changed state (so there may be more to do).
    fn step(&mut self, eof: bool) -> bool {
        match self.state {
            State::Reasoning | State::Content => self.text_region(eof),
            State::BlockGap => match self
                .fixed_choice(&[">\n<｜DSML｜invoke", ">\n</｜DSML｜tool_calls>"])
            {
                Choice::Matched(0, end) => self.enter(State::InvokeHeader, end),
                Choice::Matched(_, end) => self.enter(State::AfterBlock, end),
                // The official loop accepts a text that stops right after a block element.
                Choice::Partial if eof && self.pos == self.buf.len() => {
                    self.enter(State::Done, self.pos)
                }
                Choice::Partial if !eof => false,
                _ => self.fail("expected `>\\n` then `<｜DSML｜invoke` or `</｜DSML｜tool_calls>`"),
            },
            State::InvokeHeader => self.invoke_header(eof),
            State::ParamHeader => self.param_header(eof),
            State::ParamValue { is_string } => self.param_value(is_string, eof),
            State::ParamGap => match self
                .fixed_choice(&[">\n<｜DSML｜parameter", ">\n</｜DSML｜invoke"])
            {
                Choice::Matched(0, end) => self.enter(State::ParamHeader, end),
                Choice::Matched(_, end) => {
                    self.end_call();
                    self.enter(State::BlockGap, end)
                }
                Choice::Partial if !eof => false,
                // Ending right after a parameter's `>\n` still closes the call.
                Choice::Partial if &self.buf[self.pos..] == ">\n" => {
                    self.end_call();
                    self.enter(State::Done, self.buf.len())
                }
                _ => self.fail("expected `>\\n` then `<｜DSML｜parameter` or `</｜DSML｜invoke`"),
            },
            State::AfterBlock => match self.fixed_choice(&[EOS]) {
                Choice::Matched(_, end) => self.enter(State::Done, end),
                Choice::Partial if !eof || self.pos == self.buf.len() => false,
                _ => self.fail("text after the tool-call block"),
            },
            State::Done => {
                if self.pos < self.buf.len() {
                    self.fail("text after the end of the message")
                } else {
                    false
                }
            }
            State::Failed => false,
        }
    }

    fn enter(&mut self, state: State, pos: usize) -> bool {
        self.state = state;
        self.pos = pos;
        self.emitted = pos;
        self.scanned = pos;
        self.checked = pos;
        if let State::ParamValue { .. } = state {
            self.json_pos = pos;
            self.json_in_string = false;
            self.json_escaped = false;
        }
        true
    }

    fn fail(&mut self, reason: &str) -> bool {
        self.events.push(StreamEvent::Malformed {
            reason: reason.to_string(),
        });
        self.state = State::Failed;
        true
    }

    /// Earliest occurrence of any stop at or after `scanned` (absolute position, stop index).
    /// After a miss, later searches skip all but the last bytes that could start a stop.
    fn find_stop(&mut self, stops: &[&str]) -> Option<(usize, usize)> {
        let hay = &self.buf[self.scanned..];
        let found = stops
            .iter()
            .enumerate()
            .filter_map(|(k, s)| hay.find(s).map(|p| (self.scanned + p, k)))
            .min_by_key(|&(p, _)| p);
        if found.is_none() {
            let longest = stops.iter().map(|s| s.len()).max().unwrap_or(1);
            let from = self.buf.len().saturating_sub(longest - 1).max(self.scanned);
            self.scanned = floor_char_boundary(&self.buf, from);
        }
        found
    }

    /// Reasoning or content, up to its stop strings.
    fn text_region(&mut self, eof: bool) -> bool {
        let reasoning = self.state == State::Reasoning;
        let stops: &[&str] = if reasoning {
            &[THINK_END, TOOL_CALLS_START]
        } else {
            &[EOS, TOOL_CALLS_START]
        };
        match self.find_stop(stops) {
            Some((at, k)) => {
                if !self.emit_text(at) {
                    return true;
                }
                match (reasoning, k) {
                    (true, 0) => self.enter(State::Content, at + THINK_END.len()),
                    (true, _) => self.fail("tool-call block before </think>"),
                    (false, 0) => self.enter(State::Done, at + EOS.len()),
                    (false, _) => self.enter(State::BlockGap, at + TOOL_CALLS_START.len()),
                }
            }
            None if eof => self.fail(if reasoning {
                "missing </think>"
            } else {
                "missing EOS"
            }),
            None => {
                let hold = self.pos + held_tail_start(&self.buf[self.pos..], stops);
                self.emit_text(hold);
                false
            }
        }
    }

    /// Emits reasoning/content up to `upto` after checking it for strings the official
    /// parser rejects there. False (and the stream failed) if one is found.
    fn emit_text(&mut self, upto: usize) -> bool {
        let reasoning = self.state == State::Reasoning;
        let forbidden: &[&str] = if reasoning {
            &REASONING_FORBIDDEN
        } else {
            &CONTENT_FORBIDDEN
        };
        let longest = forbidden.iter().map(|s| s.len()).max().unwrap_or(1);
        // Re-check a little before `checked` so a string split across pushes is seen whole.
        let from = floor_char_boundary(
            &self.buf,
            self.checked.saturating_sub(longest - 1).max(self.pos),
        );
        if let Some(token) = forbidden
            .iter()
            .find(|t| self.buf[from..upto].contains(**t))
        {
            self.fail(&format!(
                "special token {token} inside {}",
                if reasoning { "reasoning" } else { "content" }
            ));
            return false;
        }
        self.checked = upto;
        if upto > self.emitted {
            let delta = self.buf[self.emitted..upto].to_string();
            self.emitted = upto;
            self.events.push(if reasoning {
                StreamEvent::ReasoningDelta(delta)
            } else {
                StreamEvent::ContentDelta(delta)
            });
        }
        true
    }

    /// The current text must continue with exactly one of `options`.
    fn fixed_choice(&self, options: &[&str]) -> Choice {
        let rest = &self.buf[self.pos..];
        if let Some(k) = options.iter().position(|o| rest.starts_with(o)) {
            return Choice::Matched(k, self.pos + options[k].len());
        }
        if options.iter().any(|o| o.starts_with(rest)) {
            Choice::Partial
        } else {
            Choice::Mismatch
        }
    }

    fn invoke_header(&mut self, eof: bool) -> bool {
        let (header_end, next) = match self.find_stop(&[PARAM_START, INVOKE_END]) {
            Some((at, 0)) => (at, Some(State::ParamHeader)),
            Some((at, _)) => (at, Some(State::BlockGap)),
            // The official parser accepts a text that ends inside the header if it matches.
            None if eof => (self.buf.len(), None),
            None => return false,
        };
        let Some(name) = match_invoke_header(&self.buf[self.pos..header_end]).map(str::to_string)
        else {
            return self.fail("invalid invoke header");
        };
        let index = self.calls;
        self.calls += 1;
        self.params_in_call.clear();
        self.events.push(StreamEvent::ToolCallStart { index, name });
        self.events.push(StreamEvent::ToolCallArgsDelta {
            index,
            delta: "{".into(),
        });
        match next {
            Some(State::ParamHeader) => {
                self.enter(State::ParamHeader, header_end + PARAM_START.len())
            }
            Some(_) => {
                self.end_call();
                self.enter(State::BlockGap, header_end + INVOKE_END.len())
            }
            None => {
                self.end_call();
                self.enter(State::Done, header_end)
            }
        }
    }

    fn end_call(&mut self) {
        let index = self.calls - 1;
        self.events.push(StreamEvent::ToolCallArgsDelta {
            index,
            delta: "}".into(),
        });
        self.events.push(StreamEvent::ToolCallEnd { index });
    }

    fn param_header(&mut self, eof: bool) -> bool {
        let rest = &self.buf[self.pos..];
        if !rest.starts_with(PARAM_NAME_PREFIX) {
            return if PARAM_NAME_PREFIX.starts_with(rest) && !eof {
                false
            } else {
                self.fail("parameter tag must continue with ` name=\"`")
            };
        }
        let name_start = self.pos + PARAM_NAME_PREFIX.len();
        self.scanned = self.scanned.max(name_start);
        // The name runs to the first string attribute, unless the value end comes first.
        let (at, is_string, attr_len) =
            match self.find_stop(&[ATTR_STRING_TRUE, ATTR_STRING_FALSE, PARAM_END]) {
                Some((at, 0)) => (at, true, ATTR_STRING_TRUE.len()),
                Some((at, 1)) => (at, false, ATTR_STRING_FALSE.len()),
                Some(_) => return self.fail("parameter tag without `string=\"true|false\"`"),
                None if eof => return self.fail("text ends inside a parameter tag"),
                None => return false,
            };
        debug_assert_eq!(
            find_string_attr(&self.buf[name_start..]).map(|a| a.0),
            Some(at - name_start)
        );
        let name = self.buf[name_start..at].to_string();
        if !self.params_in_call.insert(name.clone()) {
            return self.fail("duplicate parameter name");
        }
        let index = self.calls - 1;
        let mut delta = String::new();
        if self.params_in_call.len() > 1 {
            delta.push_str(", ");
        }
        delta.push_str(&pyjson::dumps_str(&name));
        delta.push_str(": ");
        if is_string {
            delta.push('"');
        }
        self.events
            .push(StreamEvent::ToolCallArgsDelta { index, delta });
        self.enter(State::ParamValue { is_string }, at + attr_len)
    }

    fn param_value(&mut self, is_string: bool, eof: bool) -> bool {
        match self.find_stop(&[PARAM_END]) {
            Some((at, _)) => {
                let Some(term) = value_terminator_len(&self.buf[self.pos..at]) else {
                    return self.fail("parameter value must end with `<`");
                };
                self.emit_value(at - term, is_string);
                if is_string {
                    self.events.push(StreamEvent::ToolCallArgsDelta {
                        index: self.calls - 1,
                        delta: "\"".into(),
                    });
                }
                self.enter(State::ParamGap, at + PARAM_END.len())
            }
            None if eof => self.fail("text ends inside a parameter value"),
            None => {
                // The value stops before `<` or `<\n` ahead of the end tag: keep 2 more bytes.
                let hold = self.pos + held_tail_start(&self.buf[self.pos..], &[PARAM_END]);
                let upto = floor_char_boundary(&self.buf, hold.saturating_sub(2));
                if upto > self.emitted {
                    self.emit_value(upto, is_string);
                }
                false
            }
        }
    }

    fn emit_value(&mut self, upto: usize, is_string: bool) {
        if upto <= self.emitted {
            return;
        }
        let raw = &self.buf[self.emitted..upto];
        let delta = if is_string {
            let mut s = String::with_capacity(raw.len());
            pyjson::escape_str_into(&mut s, raw);
            s
        } else {
            raw.to_string()
        };
        self.emitted = upto;
        self.events.push(StreamEvent::ToolCallArgsDelta {
            index: self.calls - 1,
            delta,
        });
    }

    fn track_json(&mut self) {
        for &b in &self.buf.as_bytes()[self.json_pos..] {
            if self.json_in_string {
                if self.json_escaped {
                    self.json_escaped = false;
                } else if b == b'\\' {
                    self.json_escaped = true;
                } else if b == b'"' {
                    self.json_in_string = false;
                }
            } else if b == b'"' {
                self.json_in_string = true;
            }
        }
        self.json_pos = self.buf.len();
    }
}

enum Choice {
    /// Option k matched; the position after it.
    Matched(usize, usize),
    /// The text so far is a proper prefix of an option.
    Partial,
    Mismatch,
}

/// Offset of the earliest suffix of `region` that could still grow into one of `stops`
/// (`region.len()` if none): those bytes must not be emitted yet.
fn held_tail_start(region: &str, stops: &[&str]) -> usize {
    let longest = stops.iter().map(|s| s.len()).max().unwrap_or(1);
    let from = region.len().saturating_sub(longest - 1);
    (from..region.len())
        .filter(|&q| region.is_char_boundary(q))
        .find(|&q| stops.iter().any(|s| s.starts_with(&region[q..])))
        .unwrap_or(region.len())
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        mode: ThinkingMode,
        deltas: &[&str],
    ) -> (Vec<StreamEvent>, Result<ParsedMessage, ParseError>) {
        let mut p = StreamParser::new(mode);
        let mut events = Vec::new();
        for d in deltas {
            events.extend(p.push(d));
        }
        let (tail, result) = p.finish();
        events.extend(tail);
        (events, result)
    }

    #[test]
    fn marker_split_is_held_back() {
        let mut p = StreamParser::new(ThinkingMode::Thinking);
        assert_eq!(
            p.push("abc</thi"),
            vec![StreamEvent::ReasoningDelta("abc".into())]
        );
        assert_eq!(p.push("nk>x"), vec![StreamEvent::ContentDelta("x".into())]);
        assert_eq!(p.push("\n\n<｜DS"), vec![]);
        assert_eq!(p.syntax_state(), SyntaxState::Structural);
        assert_eq!(p.push("ML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"true\">q\"u"), vec![
            StreamEvent::ToolCallStart { index: 0, name: "f".into() },
            StreamEvent::ToolCallArgsDelta { index: 0, delta: "{".into() },
            StreamEvent::ToolCallArgsDelta { index: 0, delta: "\"a\": \"".into() },
            // The last 2 bytes wait: a value may end in `<\n` before the end tag.
            StreamEvent::ToolCallArgsDelta { index: 0, delta: "q".into() },
        ]);
        assert_eq!(p.syntax_state(), SyntaxState::StringBody);
        assert_eq!(
            p.push("ote"),
            vec![StreamEvent::ToolCallArgsDelta {
                index: 0,
                delta: "\\\"uo".into()
            }]
        );
        assert_eq!(
            p.push("</"),
            vec![StreamEvent::ToolCallArgsDelta {
                index: 0,
                delta: "t".into()
            }]
        );
        assert_eq!(p.syntax_state(), SyntaxState::Structural);
        let (events, result) = p.finish();
        assert!(matches!(events.last(), Some(StreamEvent::Malformed { .. })));
        assert_eq!(
            result,
            Err(ParseError::ParameterFormat(
                " name=\"a\" string=\"true\">q\"uote</".into()
            ))
        );
    }

    #[test]
    fn json_value_states() {
        let mut p = StreamParser::new(ThinkingMode::Chat);
        p.push("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"false\">{\"k");
        assert_eq!(p.syntax_state(), SyntaxState::JsonString);
        p.push("\\\"\": [");
        assert_eq!(p.syntax_state(), SyntaxState::JsonStructural);
    }

    #[test]
    fn early_malformed_reports() {
        let (events, result) = run(ThinkingMode::Chat, &["a<th", "ink>b<｜end▁of▁sentence｜>"]);
        assert_eq!(
            events.first(),
            Some(&StreamEvent::ContentDelta("a<th".into()))
        );
        assert!(matches!(events.get(1), Some(StreamEvent::Malformed { .. })));
        assert_eq!(result, Err(ParseError::SpecialToken(THINK_START)));
    }
}
