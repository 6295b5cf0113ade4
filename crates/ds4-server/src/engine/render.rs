//! API requests -> the official encoder's inputs (`ds4::chat::render`), as
//! ../shared/reference/chat/README.md maps them, plus the server's own additions on top of
//! the rendered text: exact DSML replay of sampled tool-call blocks (protocol.md §5.4) and
//! the legacy-completions template (§2.8).
//!
//! Mapping (the contract with the reference cases):
//! * `system` and `developer` messages -> `system` messages, rendered where they stand
//!   (agent clients send their system prompt as developer messages; agent-clients.md);
//! * user / tool / assistant messages map one to one (content already flattened to text by
//!   the API layer; tool results keep `tool_call_id`; assistant `reasoning_content` and
//!   `tool_calls` with the client's arguments text);
//! * request-level tools use the `first_system` placement: attached to the first message if
//!   it is a system message, else to an empty system message inserted at position 0;
//! * thinking on -> `thinking_mode="thinking"`, off -> `"chat"`; Think Max -> effort `max`.

use std::ops::Range;

use ds4::chat::{
    self, EncodeOptions, FunctionCall, Message, ReasoningEffort, RenderedPrompt, ThinkingMode,
    ToolDef,
};
use serde_json::Value;

use super::{Msg, Role};

/// The DSML block markers of the official grammar.
pub const BLOCK_START: &str = "\n\n<｜DSML｜tool_calls";
pub const BLOCK_END: &str = "</｜DSML｜tool_calls>";

/// Renders a chat request. `tools` are function objects (`{name, description,
/// parameters}`) in the client's key order. Errors are inputs the official encoder rejects.
pub fn render_chat(
    messages: &[Msg],
    tools: &[Value],
    thinking: bool,
    think_max: bool,
) -> Result<RenderedPrompt, String> {
    // Private-use sentinel naming the calls whose block is replayed verbatim; it cannot
    // collide with request text that does not itself contain it (checked).
    let sentinel = format!("\u{F8FF}ds4-replay-{:x}-", std::process::id());
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    let mut replays: Vec<&str> = Vec::new();
    for m in messages {
        let mut msg = message(m);
        if m.role == Role::Assistant && !m.tool_calls.is_empty() {
            let replay = m
                .raw_dsml
                .as_deref()
                .filter(|_| !m.content.contains(&sentinel));
            let calls = m
                .tool_calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (name, arguments) = match replay {
                        // The sentinel marks where the replayed block goes; its
                        // arguments are never rendered.
                        Some(_) if i == 0 => (
                            format!("{sentinel}{}", replays.len()),
                            Value::String("{}".into()),
                        ),
                        Some(_) => (c.name.clone(), Value::String("{}".into())),
                        None => (c.name.clone(), Value::String(c.arguments.clone())),
                    };
                    chat::ToolCall {
                        id: (!c.id.is_empty()).then(|| c.id.clone()),
                        kind: Some("function".into()),
                        function: FunctionCall {
                            name,
                            arguments,
                            id: None,
                        },
                    }
                })
                .collect();
            if let Some(r) = replay {
                replays.push(r);
            }
            msg.tool_calls = Some(calls);
        }
        out.push(msg);
    }
    if !tools.is_empty() {
        let defs = tool_defs(tools);
        match out.first_mut() {
            Some(first) if first.role == chat::Role::System => first.tools = Some(defs),
            _ => {
                let mut sys = Message::text(chat::Role::System, "");
                sys.tools = Some(defs);
                out.insert(0, sys);
            }
        }
    }
    let mut opts = encode_options(thinking);
    if thinking && think_max {
        opts.reasoning_effort = Some(ReasoningEffort::Max);
    }
    let mut r = chat::render(&out, &opts).map_err(|e| e.to_string())?;
    for (k, raw) in replays.iter().enumerate() {
        r = splice_block(r, &format!("invoke name=\"{sentinel}{k}\""), raw)?;
    }
    Ok(r)
}

/// The encoder message of `m` without its tool calls (which need the replay logic above).
fn message(m: &Msg) -> Message {
    let role = match m.role {
        Role::System | Role::Developer => chat::Role::System,
        Role::User => chat::Role::User,
        Role::Tool => chat::Role::Tool,
        Role::Assistant => chat::Role::Assistant,
    };
    let mut msg = Message::text(role, m.content.clone());
    match m.role {
        Role::Tool => msg.tool_call_id = m.tool_call_id.clone(),
        Role::Assistant => msg.reasoning_content = m.reasoning.clone(),
        _ => {}
    }
    msg
}

fn tool_defs(tools: &[Value]) -> Vec<ToolDef> {
    tools
        .iter()
        .map(|f| ToolDef {
            kind: Some("function".into()),
            function: Some(f.clone()),
        })
        .collect()
}

fn encode_options(thinking: bool) -> EncodeOptions {
    EncodeOptions::new(if thinking {
        ThinkingMode::Thinking
    } else {
        ThinkingMode::Chat
    })
}

/// The live-tail suffix (protocol.md §2.9) as the official encoder renders it: what follows a
/// sampled tool-call block, which a live session holds up to its end tag, when `tail` (the
/// request's trailing tool outputs, with any user text after them) answers the calls `ids`:
/// `<｜end▁of▁sentence｜>`, the user turn with the results in call order, the generation
/// prefix. It is the rendering of `tail` after an assistant turn making those calls, so it
/// equals the end of the full prompt of a request that replays the whole history.
pub fn live_suffix(
    tail: &[Msg],
    ids: &[String],
    tools: &[Value],
    thinking: bool,
) -> Result<RenderedPrompt, String> {
    let mut turn = Message::text(chat::Role::Assistant, "");
    turn.tool_calls = Some(
        ids.iter()
            .map(|id| chat::ToolCall {
                id: Some(id.clone()),
                kind: Some("function".into()),
                function: FunctionCall {
                    name: String::new(),
                    arguments: Value::String("{}".into()),
                    id: None,
                },
            })
            .collect(),
    );
    // Declared tools keep the encoder's reasoning-dropping decision what the full render makes.
    if !tools.is_empty() {
        turn.tools = Some(tool_defs(tools));
    }
    let mut opts = encode_options(thinking);
    opts.context = Some(vec![turn]);
    let msgs: Vec<Message> = tail.iter().map(message).collect();
    let r = chat::render(&msgs, &opts).map_err(|e| e.to_string())?;
    let mut text = String::with_capacity(chat::EOS.len() + r.text.len());
    text.push_str(chat::EOS);
    text.push_str(&r.text);
    let n = chat::EOS.len();
    let specials = std::iter::once(0..n)
        .chain(r.specials.iter().map(|s| s.start + n..s.end + n))
        .collect();
    Ok(RenderedPrompt { text, specials })
}

/// Replaces the rendered block containing `marker` by `raw` (an exact sampled block, from its
/// leading blank line to the end tag); its DSML markers become template specials.
fn splice_block(r: RenderedPrompt, marker: &str, raw: &str) -> Result<RenderedPrompt, String> {
    let at = r
        .text
        .find(marker)
        .ok_or("internal error: replay marker not rendered")?;
    let start = r.text[..at]
        .rfind(BLOCK_START)
        .ok_or("internal error: replay block start")?;
    let end = at
        + r.text[at..]
            .find(BLOCK_END)
            .ok_or("internal error: replay block end")?
        + BLOCK_END.len();
    let mut text = String::with_capacity(r.text.len() + raw.len());
    text.push_str(&r.text[..start]);
    text.push_str(raw);
    text.push_str(&r.text[end..]);
    let delta = raw.len() as isize - (end - start) as isize;
    let mut specials: Vec<Range<usize>> = r
        .specials
        .iter()
        .filter(|s| s.end <= start)
        .cloned()
        .collect();
    specials.extend(dsml_markers(raw).map(|s| s.start + start..s.end + start));
    specials.extend(
        r.specials
            .iter()
            .filter(|s| s.start >= end)
            .map(|s| ((s.start as isize + delta) as usize)..((s.end as isize + delta) as usize)),
    );
    Ok(RenderedPrompt { text, specials })
}

fn dsml_markers(s: &str) -> impl Iterator<Item = Range<usize>> + '_ {
    s.match_indices(chat::DSML).map(|(i, m)| i..i + m.len())
}

/// `/v1/completions` (protocol.md §2.8): BOS [+ Think Max text] + `You are a helpful
/// assistant` + `<｜User｜>` + prompt + `<｜Assistant｜>` + `<think>` / `</think>`, which is the
/// official encoder's rendering of that system + user pair.
pub fn render_completion(
    prompt: &str,
    thinking: bool,
    think_max: bool,
) -> Result<RenderedPrompt, String> {
    let msgs = [
        Msg::text(Role::System, "You are a helpful assistant"),
        Msg::text(Role::User, prompt),
    ];
    render_chat(&msgs, &[], thinking, think_max)
}

/// The exact tool-call block of a generated text (for replay): from the blank line before
/// the block start to the end tag, searched after the reasoning.
pub fn raw_block(text: &str, thinking: bool) -> Option<&str> {
    let from = if thinking {
        text.find(chat::THINK_END)? + chat::THINK_END.len()
    } else {
        0
    };
    let s = from + text[from..].find(BLOCK_START)?;
    let e = s + text[s..].find(BLOCK_END)? + BLOCK_END.len();
    Some(&text[s..e])
}

/// Compact JSON re-serialisation of parsed arguments (`{"k":"v"}`, key order kept);
/// `{}` when the model wrote something that is not JSON (protocol.md §3.2 item 8).
pub fn compact_arguments(official: &str) -> String {
    match serde_json::from_str::<Value>(official) {
        Ok(v @ Value::Object(_)) => v.to_string(),
        _ => "{}".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ToolCall;

    fn weather_tool() -> Value {
        serde_json::json!({"name": "get_weather", "description": "Get the weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"},
            "days": {"type": "integer"}}, "required": ["city"]}})
    }

    #[test]
    fn one_turn_matches_the_official_encoder() {
        let msgs = [
            Msg::text(Role::System, "You are a helpful assistant."),
            Msg::text(Role::User, "What is 2+2?"),
        ];
        let r = render_chat(&msgs, &[], true, false).unwrap();
        assert_eq!(
            r.text,
            "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜><think>"
        );
        let r = render_completion("Say hi", false, false).unwrap();
        assert_eq!(
            r.text,
            "<｜begin▁of▁sentence｜>You are a helpful assistant<｜User｜>Say hi<｜Assistant｜></think>"
        );
    }

    #[test]
    fn tools_go_after_the_first_system_message() {
        let msgs = [
            Msg::text(Role::System, "S"),
            Msg::text(Role::User, "Weather in Rome?"),
        ];
        let r = render_chat(&msgs, &[weather_tool()], true, false).unwrap();
        assert!(r.text.starts_with("<｜begin▁of▁sentence｜>S\n\n## Tools\n"));
        assert!(r.text.contains(
            "{\"name\": \"get_weather\", \"description\": \"Get the weather for a city.\""
        ));
        assert!(r
            .text
            .ends_with("tool calls.\n<｜User｜>Weather in Rome?<｜Assistant｜><think>"));
        let r = render_chat(&msgs[1..], &[weather_tool()], false, false).unwrap();
        assert!(r.text.starts_with("<｜begin▁of▁sentence｜>\n\n## Tools\n"));
    }

    #[test]
    fn exact_replay_splices_the_sampled_block() {
        let raw = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"x\" string=\"false\">[1,2]</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
        let mut a = Msg::text(Role::Assistant, "ok");
        a.reasoning = Some("r".into());
        a.tool_calls.push(ToolCall {
            id: "call_1".into(),
            name: "f".into(),
            arguments: "{\"x\":[1,2]}".into(),
        });
        let mut t = Msg::text(Role::Tool, "done");
        t.tool_call_id = Some("call_1".into());
        let mut msgs = vec![Msg::text(Role::User, "q"), a, t];
        let canonical = render_chat(&msgs, &[], true, false).unwrap();
        assert!(canonical.text.contains("[1, 2]"));
        msgs[1].raw_dsml = Some(raw.into());
        let r = render_chat(&msgs, &[], true, false).unwrap();
        assert_eq!(
            r.text,
            format!("<｜begin▁of▁sentence｜><｜User｜>q<｜Assistant｜></think>ok{raw}<｜end▁of▁sentence｜><｜User｜><tool_result>done</tool_result><｜Assistant｜><think>")
        );
        // Every special range covers a special string, in order.
        let mut last = 0;
        for s in &r.specials {
            assert!(s.start >= last);
            last = s.end;
            assert!(chat::STRUCTURAL_SPECIALS.contains(&&r.text[s.clone()]));
        }
        assert_eq!(r.specials.len(), canonical.specials.len());
    }

    fn call(id: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            name: "get_weather".into(),
            arguments: "{\"city\":\"Rome\"}".into(),
        }
    }

    fn result(id: &str, text: &str) -> Msg {
        let mut t = Msg::text(Role::Tool, text);
        t.tool_call_id = Some(id.into());
        t
    }

    #[test]
    fn the_live_suffix_is_the_end_of_the_full_render() {
        let mut a = Msg::text(Role::Assistant, "");
        a.reasoning = Some("r".into());
        a.tool_calls = vec![call("call_a"), call("call_b")];
        let history = vec![Msg::text(Role::System, "S"), Msg::text(Role::User, "q"), a];
        let ids = ["call_a".to_string(), "call_b".to_string()];
        // Results in the other order (the encoder sorts them by call order), then user text.
        let tail = [
            result("call_b", "cloudy"),
            result("call_a", "sunny"),
            Msg::text(Role::User, "and now?"),
        ];
        for (tools, thinking) in [
            (vec![weather_tool()], true),
            (vec![], true),
            (vec![], false),
        ] {
            let full: Vec<Msg> = history.iter().chain(&tail).cloned().collect();
            let full = render_chat(&full, &tools, thinking, false).unwrap();
            let suffix = live_suffix(&tail, &ids, &tools, thinking).unwrap();
            let at = full.text.len() - suffix.text.len();
            assert_eq!(&full.text[at..], suffix.text, "{tools:?} {thinking}");
            assert!(full.text[..at].ends_with(BLOCK_END));
            // The live session holds the prompt up to the block's end tag (no EOS). (In
            // thinking mode without tools a replay drops the turn's reasoning, which the live
            // session holds: the suffix is what continues it.)
            let head = render_chat(&history, &tools, thinking, false).unwrap();
            let live = head.text.strip_suffix(chat::EOS).unwrap();
            assert_eq!(live == &full.text[..at], !(thinking && tools.is_empty()));
            let tail_specials: Vec<Range<usize>> = full
                .specials
                .iter()
                .filter(|r| r.start >= at)
                .map(|r| r.start - at..r.end - at)
                .collect();
            assert_eq!(suffix.specials, tail_specials);
        }
        let s = live_suffix(&tail[1..2], &ids[..1], &[], true).unwrap();
        assert_eq!(
            s.text,
            "<｜end▁of▁sentence｜><｜User｜><tool_result>sunny</tool_result><｜Assistant｜><think>"
        );
    }

    #[test]
    fn raw_block_and_arguments() {
        let t = "r</think>x\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>";
        assert_eq!(
            raw_block(t, true),
            Some("\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>")
        );
        assert_eq!(raw_block("no think", true), None);
        assert_eq!(
            compact_arguments("{\"b\": 1, \"a\": \"x\"}"),
            "{\"b\":1,\"a\":\"x\"}"
        );
        assert_eq!(compact_arguments("{\"a\": abc}"), "{}");
    }
}
