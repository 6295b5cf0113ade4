//! One-shot parsing of a completion, with the official `parse_message_from_completion_text`
//! grammar and outcomes (reference/chat/parse_cases.jsonl): reasoning up to the first
//! `</think>` (thinking mode), content up to EOS or `\n\n<｜DSML｜tool_calls`, then a strict DSML
//! block. Where the official parser raises, this returns the same error type and message.

use std::collections::HashSet;

use serde::ser::{SerializeStruct, Serializer};
use serde::Serialize;

use super::pyjson;
use super::types::ThinkingMode;
use super::{BOS, DSML, EOS, THINK_END, THINK_START};

/// Start of a tool-call block; the leading blank line is part of it.
pub(crate) const TOOL_CALLS_START: &str = "\n\n<｜DSML｜tool_calls";
pub(crate) const TOOL_CALLS_END: &str = "</｜DSML｜tool_calls>";
pub(crate) const INVOKE_START: &str = "<｜DSML｜invoke";
pub(crate) const INVOKE_END: &str = "</｜DSML｜invoke";
pub(crate) const PARAM_START: &str = "<｜DSML｜parameter";
/// The parameter value ends at this string; the `<` before it is checked separately.
pub(crate) const PARAM_END: &str = "/｜DSML｜parameter";
pub(crate) const PARAM_NAME_PREFIX: &str = " name=\"";
pub(crate) const ATTR_STRING_TRUE: &str = "\" string=\"true\">";
pub(crate) const ATTR_STRING_FALSE: &str = "\" string=\"false\">";

/// A tool call as the official parser returns it; `arguments` is JSON text it builds itself:
/// `{"key": value, ...}`, string values through `json.dumps`, non-string values verbatim
/// (not validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    pub name: String,
    pub arguments: String,
}

/// The parsed assistant message. Serializes to the official result shape:
/// `{"role":"assistant","content","reasoning_content","tool_calls":[{"type":"function","function":{"name","arguments"}}]}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedMessage {
    pub content: String,
    /// Empty (not absent) in chat mode, as in the official result.
    pub reasoning_content: String,
    pub tool_calls: Vec<ParsedToolCall>,
}

impl Serialize for ParsedMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("ParsedMessage", 4)?;
        st.serialize_field("role", "assistant")?;
        st.serialize_field("content", &self.content)?;
        st.serialize_field("reasoning_content", &self.reasoning_content)?;
        st.serialize_field("tool_calls", &self.tool_calls)?;
        st.end()
    }
}

impl Serialize for ParsedToolCall {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Function<'a> {
            name: &'a str,
            arguments: &'a str,
        }
        let mut st = s.serialize_struct("ToolCall", 2)?;
        st.serialize_field("type", "function")?;
        st.serialize_field(
            "function",
            &Function {
                name: &self.name,
                arguments: &self.arguments,
            },
        )?;
        st.end()
    }
}

/// Why a completion does not parse. `Display` is the official exception's `str(e)`;
/// [`ParseError::python_type`] its class name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("Invalid thinking format: missing </think>")]
    MissingThinkEnd,
    #[error("Invalid format: missing EOS token")]
    MissingEos,
    #[error("Unexpected content after tool calls")]
    ContentAfterToolCalls,
    #[error("Unexpected content at end")]
    ContentAtEnd,
    #[error("Unexpected special token '{0}' in content")]
    SpecialToken(&'static str),
    #[error("Tool call format error: expected '>\\n' but got '{0}'")]
    ToolCallFormat(String),
    #[error("Missing special token in tool calls")]
    MissingSpecialToken,
    #[error("Tool name format error: '{0}'")]
    ToolNameFormat(String),
    #[error("Parameter format error: '{0}'")]
    ParameterFormat(String),
    #[error("Parameter format error: expected '>\\n' but got '{0}'")]
    ParameterTerminator(String),
    #[error("Duplicate parameter name: '{0}'")]
    DuplicateParameter(String),
}

impl ParseError {
    /// The exception class the official parser raises for this failure.
    pub fn python_type(&self) -> &'static str {
        match self {
            ParseError::MissingThinkEnd
            | ParseError::MissingEos
            | ParseError::ContentAfterToolCalls
            | ParseError::ContentAtEnd
            | ParseError::SpecialToken(_) => "AssertionError",
            _ => "ValueError",
        }
    }
}

/// Reads from `from` up to the earliest occurrence of any stop (the first listed wins a tie).
/// Returns the index after the stop, the text before it, and which stop matched; without a
/// match, the rest of the text and `None`.
pub(crate) fn read_until<'a>(
    text: &'a str,
    from: usize,
    stops: &[&str],
) -> (usize, &'a str, Option<usize>) {
    let mut best: Option<(usize, usize)> = None;
    for (k, stop) in stops.iter().enumerate() {
        if let Some(p) = text[from..].find(stop) {
            if best.is_none_or(|(bp, _)| from + p < bp) {
                best = Some((from + p, k));
            }
        }
    }
    match best {
        Some((p, k)) => (p + stops[k].len(), &text[from..p], Some(k)),
        None => (text.len(), &text[from..], None),
    }
}

/// Python's `str.isspace` (what `\s` matches in a str regex): Unicode White_Space plus the
/// ASCII separators U+001C..U+001F.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The invoke header between `<｜DSML｜invoke` and the next parameter / invoke end, matched like
/// `^\s*name="(.*?)">\n$`: Python's `$` also matches before a final newline, so a header
/// ending in `">\n\n` is accepted too (with the shorter name).
pub(crate) fn match_invoke_header(header: &str) -> Option<&str> {
    let rest = header
        .trim_start_matches(py_isspace)
        .strip_prefix("name=\"")?;
    rest.strip_suffix("\">\n\n")
        .or_else(|| rest.strip_suffix("\">\n"))
}

/// Where the name of a parameter header ends: the first `" string="true|false">` after the
/// ` name="` prefix, as the lazy `(.*?)` finds it. Returns (offset in `after_prefix`,
/// is_string, attribute length).
pub(crate) fn find_string_attr(after_prefix: &str) -> Option<(usize, bool, usize)> {
    let t = after_prefix.find(ATTR_STRING_TRUE);
    let f = after_prefix.find(ATTR_STRING_FALSE);
    match (t, f) {
        (Some(t), Some(f)) if f < t => Some((f, false, ATTR_STRING_FALSE.len())),
        (Some(t), _) => Some((t, true, ATTR_STRING_TRUE.len())),
        (None, Some(f)) => Some((f, false, ATTR_STRING_FALSE.len())),
        (None, None) => None,
    }
}

/// Length of the terminator a parameter value ends with: its text runs up to `/｜DSML｜parameter`
/// and the regex `(.*?)<$` needs a final `<`, or `<\n` (Python's `$` before a final newline).
pub(crate) fn value_terminator_len(content: &str) -> Option<usize> {
    if content.ends_with("<\n") {
        Some(2)
    } else if content.ends_with('<') {
        Some(1)
    } else {
        None
    }
}

/// A parameter's text between `<｜DSML｜parameter` and `/｜DSML｜parameter`, matched like
/// `^ name="(.*?)" string="(true|false)">(.*?)<$`. Returns (name, is_string, value).
fn match_param(content: &str) -> Option<(&str, bool, &str)> {
    let after = content.strip_prefix(PARAM_NAME_PREFIX)?;
    let value_end = after.len() - value_terminator_len(after)?;
    // If the first attribute leaves no room for the terminator, no later one can.
    let (at, is_string, attr_len) = find_string_attr(after)?;
    (at + attr_len <= value_end)
        .then(|| (&after[..at], is_string, &after[at + attr_len..value_end]))
}

/// `{"k": v, ...}` as `decode_dsml_to_arguments` writes it.
pub(crate) fn arguments_json(params: &[(&str, bool, &str)]) -> String {
    let mut out = String::from("{");
    for (k, (name, is_string, value)) in params.iter().enumerate() {
        if k > 0 {
            out.push_str(", ");
        }
        out.push_str(&pyjson::dumps_str(name));
        out.push_str(": ");
        if *is_string {
            out.push_str(&pyjson::dumps_str(value));
        } else {
            out.push_str(value);
        }
    }
    out.push('}');
    out
}

/// The DSML block after `\n\n<｜DSML｜tool_calls`. Returns the index where it stopped.
fn parse_tool_calls(
    text: &str,
    mut index: usize,
) -> Result<(usize, Vec<ParsedToolCall>), ParseError> {
    let mut calls = Vec::new();
    // Running off the end of the text between elements is accepted, like the official loop.
    while index < text.len() {
        let (next, gap, stop) = read_until(text, index, &[INVOKE_START, TOOL_CALLS_END]);
        index = next;
        if gap != ">\n" {
            return Err(ParseError::ToolCallFormat(gap.to_string()));
        }
        match stop {
            Some(1) => break,
            None => return Err(ParseError::MissingSpecialToken),
            _ => {}
        }
        let (next, header, mut stop) = read_until(text, index, &[PARAM_START, INVOKE_END]);
        index = next;
        let name = match_invoke_header(header)
            .ok_or_else(|| ParseError::ToolNameFormat(header.to_string()))?;
        let mut params: Vec<(&str, bool, &str)> = Vec::new();
        let mut seen = HashSet::new();
        while stop == Some(0) {
            let (next, content, _) = read_until(text, index, &[PARAM_END]);
            index = next;
            let param = match_param(content)
                .ok_or_else(|| ParseError::ParameterFormat(content.to_string()))?;
            if !seen.insert(param.0) {
                return Err(ParseError::DuplicateParameter(param.0.to_string()));
            }
            params.push(param);
            let (next, gap, s) = read_until(text, index, &[PARAM_START, INVOKE_END]);
            index = next;
            stop = s;
            if gap != ">\n" {
                return Err(ParseError::ParameterTerminator(gap.to_string()));
            }
        }
        calls.push(ParsedToolCall {
            name: name.to_string(),
            arguments: arguments_json(&params),
        });
    }
    Ok((index, calls))
}

/// Parses one generated assistant turn: the text after the prompt's `<think>` / `</think>`,
/// normally ending with `<｜end▁of▁sentence｜>` (optional after a tool block).
pub fn parse_completion(text: &str, mode: ThinkingMode) -> Result<ParsedMessage, ParseError> {
    let mut index = 0;
    let mut reasoning = "";
    if mode == ThinkingMode::Thinking {
        let (next, r, stop) = read_until(text, 0, &[THINK_END, TOOL_CALLS_START]);
        if stop != Some(0) {
            return Err(ParseError::MissingThinkEnd);
        }
        index = next;
        reasoning = r;
    }
    let (next, content, stop) = read_until(text, index, &[EOS, TOOL_CALLS_START]);
    index = next;
    let mut tool_calls = Vec::new();
    match stop {
        Some(1) => {
            let (next, calls) = parse_tool_calls(text, index)?;
            tool_calls = calls;
            let (next, tail, _) = read_until(text, next, &[EOS]);
            if !tail.is_empty() {
                return Err(ParseError::ContentAfterToolCalls);
            }
            index = next;
        }
        Some(_) => {}
        None => return Err(ParseError::MissingEos),
    }
    if index != text.len() {
        return Err(ParseError::ContentAtEnd);
    }
    for token in [BOS, EOS, THINK_START, THINK_END, DSML] {
        if content.contains(token) || reasoning.contains(token) {
            return Err(ParseError::SpecialToken(token));
        }
    }
    Ok(ParsedMessage {
        content: content.to_string(),
        reasoning_content: reasoning.to_string(),
        tool_calls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_regex_edges() {
        assert_eq!(match_invoke_header(" name=\"f\">\n"), Some("f"));
        assert_eq!(match_invoke_header("\u{1c}\t name=\"f\">\n\n"), Some("f"));
        assert_eq!(match_invoke_header(" name=\"a\">\n\">\n"), Some("a\">\n"));
        assert_eq!(match_invoke_header(" name=\">\n"), None);
        assert_eq!(match_invoke_header(" name=\"f\">"), None);
        assert_eq!(
            match_param(" name=\"x\" string=\"true\">v<"),
            Some(("x", true, "v"))
        );
        assert_eq!(
            match_param(" name=\"x\" string=\"false\">v<\n"),
            Some(("x", false, "v"))
        );
        assert_eq!(
            match_param(" name=\"x\" string=\"true\"><"),
            Some(("x", true, ""))
        );
        assert_eq!(
            match_param(" name=\"a\" string=\"true\">\" string=\"false\"><"),
            Some(("a", true, "\" string=\"false\">"))
        );
        assert_eq!(match_param(" name=\" string=\"true\">v<"), None);
        assert_eq!(match_param(" name=\"x\" string=\"true\">"), None);
    }

    #[test]
    fn truncated_blocks_the_official_parser_accepts() {
        let chat = ThinkingMode::Chat;
        let m = parse_completion("hi\n\n<｜DSML｜tool_calls", chat).unwrap();
        assert_eq!((m.content.as_str(), m.tool_calls.len()), ("hi", 0));
        let m = parse_completion(
            "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n",
            chat,
        )
        .unwrap();
        assert_eq!(
            m.tool_calls,
            vec![ParsedToolCall {
                name: "f".into(),
                arguments: "{}".into()
            }]
        );
        let t = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"false\">1</｜DSML｜parameter>\n";
        assert_eq!(
            parse_completion(t, chat).unwrap().tool_calls[0].arguments,
            "{\"a\": 1}"
        );
    }
}
