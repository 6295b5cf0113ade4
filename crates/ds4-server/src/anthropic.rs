//! Anthropic `POST /v1/messages` and `/v1/messages/count_tokens` (protocol.md §4.8), with
//! what Claude Code sends (../shared/notes/agent-clients.md): `?beta=true`, adaptive
//! thinking, system messages inside `messages`, billing-header system parts, cache_control.

use std::collections::HashSet;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::engine::{
    new_item_id, Bindings, Event, Finish, Msg, Outcome, PromptInput, Role, ToolApi, ToolCall,
    ToolOutputs, MODEL_ID,
};
use crate::http::{
    arguments_value, check_auth, collect, json_response, prepare, read_json, settle, sse_event,
    sse_response, submit, thinking_mode, trace_head, Api, ApiError, App, Fields, GenParams,
    Projector,
};
use crate::openai::schema_text;

const API: Api = Api::Anthropic;

fn block_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|b| match b {
                Value::String(s) => Some(s.as_str()),
                Value::Object(o)
                    if o.get("type").and_then(|t| t.as_str()).unwrap_or("text") == "text" =>
                {
                    o.get("text").and_then(|t| t.as_str())
                }
                _ => None,
            })
            .collect(),
        _ => String::new(),
    }
}

/// `system`: string or blocks; parts starting with `x-anthropic-` (Claude Code's per-session
/// billing header) are dropped so the long fixed prefix is shared across sessions.
fn system_text(v: Option<&Value>) -> Result<String, ApiError> {
    let parts: Vec<String> = match v {
        None | Some(Value::Null) => return Ok(String::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|b| match b {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("text").and_then(|t| t.as_str()).map(str::to_string),
                _ => None,
            })
            .collect(),
        Some(_) => {
            return Err(ApiError::bad(
                API,
                "invalid JSON request: 'system' must be a string or an array of text blocks",
            ))
        }
    };
    let mut out = String::new();
    for p in parts.iter().filter(|p| !p.starts_with("x-anthropic-")) {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(p);
    }
    Ok(out)
}

struct Parsed {
    input: PromptInput,
    tools_active: bool,
}

fn parse(app: &App, f: &Fields) -> Result<Parsed, ApiError> {
    let Some(Value::Array(arr)) = f.get("messages") else {
        return Err(ApiError::bad(
            API,
            match f.get("messages") {
                None | Some(Value::Null) => "missing messages",
                _ => "invalid JSON request: 'messages' must be an array",
            },
        ));
    };
    let mut messages = Vec::new();
    let sys = system_text(f.get("system"))?;
    if !sys.is_empty() {
        messages.push(Msg::text(Role::System, sys));
    }
    let mut seen_tool_use: HashSet<String> = HashSet::new();
    // §5.3: the trailing run of tool_result user messages (where it starts in `messages`, and
    // where a system message after it stops it), and whether a result answers a call only
    // the live session knows (§4.8, §5.2 step 4).
    let mut tail_from: Option<usize> = None;
    let mut tail_to: Option<usize> = None;
    let mut needs_live = false;
    for (i, m) in arr.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(ApiError::bad(
                API,
                format!("invalid JSON request: messages[{i}] must be an object"),
            ));
        };
        let role = m.get("role").and_then(|r| r.as_str()).unwrap_or("user");
        let content = m.get("content");
        let first = messages.len();
        match role {
            "system" => {
                if tail_from.is_some() {
                    tail_to.get_or_insert(first);
                }
                messages.push(Msg::text(Role::System, system_text(content)?));
            }
            "assistant" => {
                tail_from = None;
                let mut msg = Msg::text(Role::Assistant, "");
                match content {
                    Some(Value::String(s)) => msg.content = s.clone(),
                    Some(Value::Array(blocks)) => {
                        for b in blocks {
                            let ty = b.get("type").and_then(|t| t.as_str()).unwrap_or("text");
                            match ty {
                                "text" => msg
                                    .content
                                    .push_str(b.get("text").and_then(|t| t.as_str()).unwrap_or("")),
                                "thinking" => {
                                    let t =
                                        b.get("thinking").and_then(|t| t.as_str()).unwrap_or("");
                                    msg.reasoning.get_or_insert_with(String::new).push_str(t);
                                }
                                "tool_use" | "server_tool_use" => {
                                    let id = b
                                        .get("id")
                                        .and_then(|x| x.as_str())
                                        .unwrap_or("")
                                        .to_string();
                                    seen_tool_use.insert(id.clone());
                                    msg.tool_calls.push(ToolCall {
                                        id,
                                        name: b
                                            .get("name")
                                            .and_then(|x| x.as_str())
                                            .unwrap_or("")
                                            .to_string(),
                                        arguments: b
                                            .get("input")
                                            .map(|v| v.to_string())
                                            .unwrap_or_else(|| "{}".into()),
                                    });
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
                messages.push(msg);
            }
            "user" => {
                let mut text = String::new();
                let mut any_result = false;
                match content {
                    Some(Value::String(s)) => text = s.clone(),
                    Some(Value::Array(blocks)) => {
                        for b in blocks {
                            match b.get("type").and_then(|t| t.as_str()).unwrap_or("text") {
                                "text" => text.push_str(b.get("text").and_then(|t| t.as_str()).unwrap_or("")),
                                "tool_result" => {
                                    let id = b.get("tool_use_id").and_then(|x| x.as_str()).unwrap_or("").to_string();
                                    if !seen_tool_use.contains(&id) {
                                        if !app.engine.is_live_call(ToolApi::Anthropic, &id) {
                                            return Err(ApiError::bad(API, format!(
                                                "Anthropic continuation state is not available for tool_use_id {id}; retry by replaying the full messages history"
                                            )));
                                        }
                                        needs_live = true;
                                    }
                                    let mut t = Msg::text(Role::Tool, block_text(b.get("content")));
                                    t.tool_call_id = Some(id);
                                    messages.push(t);
                                    any_result = true;
                                }
                                _ => {}
                            }
                        }
                    }
                    None | Some(Value::Null) => {}
                    Some(_) => return Err(ApiError::bad(API, format!("invalid JSON request: messages[{i}].content must be a string or an array of blocks"))),
                }
                if !text.is_empty() || !any_result {
                    messages.push(Msg::text(Role::User, text));
                }
                if !any_result {
                    tail_from = None;
                } else if tail_from.is_none() || tail_to.is_some() {
                    (tail_from, tail_to) = (Some(first), None);
                }
            }
            _ => {}
        }
    }
    let tail = tail_from.map_or(0..0, |from| from..tail_to.unwrap_or(messages.len()));
    let mut ids: Vec<String> = Vec::new();
    for m in &messages[tail.clone()] {
        if let Some(id) = m.tool_call_id.as_ref().filter(|id| !ids.contains(id)) {
            ids.push(id.clone());
        }
    }
    let outputs = ToolOutputs {
        api: ToolApi::Anthropic,
        tail,
        ids,
        needs_live,
    };
    let mut tools = Vec::new();
    match f.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => {
            for t in a {
                let Value::Object(o) = t else { continue };
                if o.get("defer_loading").and_then(|d| d.as_bool()) == Some(true) {
                    continue;
                }
                if let Some(s) = schema_text(o) {
                    tools.push(s);
                }
            }
        }
        Some(_) => {
            return Err(ApiError::bad(
                API,
                "invalid JSON request: 'tools' must be an array",
            ))
        }
    }
    let none = f
        .get("tool_choice")
        .and_then(|c| c.get("type"))
        .and_then(|t| t.as_str())
        == Some("none");
    let tools_active = !tools.is_empty() && !none;
    let effort = f
        .get("output_config")
        .and_then(|o| o.get("effort"))
        .or_else(|| f.get("reasoning_effort"));
    // Claude Code omits `thinking` exactly when the user turned thinking off.
    let (thinking, think_max) = thinking_mode(f, effort, false)?;
    Ok(Parsed {
        input: PromptInput::Chat {
            messages,
            tools: if tools_active { tools } else { Vec::new() },
            thinking,
            think_max,
            outputs: Some(outputs),
        },
        tools_active,
    })
}

fn usage_json(o: &Outcome) -> Value {
    json!({
        "input_tokens": o.usage.prompt - o.usage.cached,
        "output_tokens": o.usage.completion,
        "cache_read_input_tokens": o.usage.cached,
        "cache_creation_input_tokens": 0,
    })
}

fn stop_reason(f: Finish) -> &'static str {
    match f {
        Finish::ToolCalls => "tool_use",
        Finish::Length => "max_tokens",
        _ => "end_turn",
    }
}

pub async fn messages(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    match messages_inner(app, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn messages_inner(app: App, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    check_auth(&app, &headers, API)?;
    let obj = read_json(&app, body, API).await?;
    let f = Fields::new(&obj, API);
    let model = f.str("model")?.unwrap_or(MODEL_ID).to_string();
    let parsed = parse(&app, &f)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let mut sampling = f.sampling()?;
    sampling.min_p = ds4::sample::SamplerConfig::default().min_p;
    let params = GenParams {
        max_tokens: f.uint("max_tokens", false)?,
        sampling,
        stop: f.stop("stop_sequences")?,
        tools_active: parsed.tools_active,
        call_id_prefix: "toolu_",
        trace: trace_head(&app, "messages", &model, stream, false, &obj),
        bindings: Bindings::Messages,
    };
    let prepared = prepare(&app, parsed.input, API).await?;
    crate::count_request(&app, "messages");
    let mut run = submit(&app, prepared, params, API, "messages")?;
    settle(&mut run, API).await?;
    let id = new_item_id("msg_");
    if stream {
        let prompt_tokens = run.prompt_tokens;
        return Ok(sse_response(
            &app,
            run,
            MessagesStream {
                id,
                model,
                prompt_tokens,
                index: 0,
                open: Open::None,
                any_text: false,
                any_thinking: false,
                streamed_calls: 0,
                started: false,
            },
        ));
    }
    let o = collect(run, API).await?;
    let mut content = Vec::new();
    if let Some(r) = o.reasoning.as_ref().filter(|r| !r.is_empty()) {
        content.push(json!({"type": "thinking", "thinking": r, "signature": id}));
    }
    if !o.content.is_empty() {
        content.push(json!({"type": "text", "text": o.content}));
    }
    for c in &o.calls {
        content.push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": arguments_value(&c.arguments)}));
    }
    if content.iter().all(|b| b["type"] == "thinking") {
        content.push(json!({"type": "text", "text": ""}));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason(o.finish),
            "stop_sequence": null,
            "usage": usage_json(&o),
        }),
    ))
}

pub async fn count_tokens(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let r: Result<Response, ApiError> = async {
        check_auth(&app, &headers, API)?;
        let obj = read_json(&app, body, API).await?;
        let f = Fields::new(&obj, API);
        let parsed = parse(&app, &f)?;
        let prepared = prepare(&app, parsed.input, API).await?;
        crate::count_request(&app, "count_tokens");
        Ok(json_response(
            StatusCode::OK,
            &json!({"input_tokens": prepared.tokens.len()}),
        ))
    }
    .await;
    r.unwrap_or_else(|e| e.into_response())
}

#[derive(PartialEq)]
enum Open {
    None,
    Thinking,
    Text,
    Tool,
}

struct MessagesStream {
    id: String,
    model: String,
    prompt_tokens: usize,
    index: usize,
    open: Open,
    any_text: bool,
    any_thinking: bool,
    streamed_calls: usize,
    /// `message_start` was sent.
    started: bool,
}

impl MessagesStream {
    fn close(&mut self, out: &mut String) {
        if self.open == Open::None {
            return;
        }
        if self.open == Open::Thinking {
            out.push_str(&sse_event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": self.index,
                        "delta": {"type": "signature_delta", "signature": self.id}}),
            ));
        }
        out.push_str(&sse_event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": self.index}),
        ));
        self.index += 1;
        self.open = Open::None;
    }

    fn open(&mut self, out: &mut String, kind: Open, block: Value) {
        self.close(out);
        out.push_str(&sse_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": self.index, "content_block": block}),
        ));
        self.open = kind;
    }

    fn delta(&self, delta: Value) -> String {
        sse_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": self.index, "delta": delta}),
        )
    }
}

impl MessagesStream {
    /// `message_start` with the prompt's real cached / uncached split (known once the engine
    /// has looked up the KV prefix: `Event::Prompt`).
    fn message_start(&mut self, prompt_tokens: usize, cached: usize) -> String {
        self.started = true;
        sse_event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": prompt_tokens - cached.min(prompt_tokens), "output_tokens": 0,
                          "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0},
            }}),
        )
    }
}

impl Projector for MessagesStream {
    /// Nothing yet: `message_start` waits for the prefix lookup (`Event::Prompt`), so its
    /// usage is the real split. Until then keep-alives are SSE comments.
    fn start(&mut self) -> String {
        String::new()
    }

    fn keepalive(&self) -> String {
        if self.started {
            sse_event("ping", &json!({"type": "ping"}))
        } else {
            ": keep-alive\n\n".into()
        }
    }

    fn event(&mut self, ev: Event) -> (String, bool) {
        let mut out = String::new();
        if let Event::Prompt {
            prompt_tokens,
            cached,
        } = ev
        {
            if !self.started {
                out = self.message_start(prompt_tokens, cached);
            }
            return (out, false);
        }
        if !self.started && !matches!(ev, Event::Failed(_) | Event::Prefill { .. }) {
            // Not expected (the engine sends `Prompt` first); keep the event order valid.
            let n = self.prompt_tokens;
            out = self.message_start(n, 0);
        }
        match ev {
            Event::Reasoning(s) => {
                if self.open != Open::Thinking {
                    self.open(
                        &mut out,
                        Open::Thinking,
                        json!({"type": "thinking", "thinking": "", "signature": ""}),
                    );
                    self.any_thinking = true;
                }
                out.push_str(&self.delta(json!({"type": "thinking_delta", "thinking": s})));
            }
            Event::ReasoningDone if self.open == Open::Thinking => self.close(&mut out),
            Event::Content(s) => {
                if self.open != Open::Text {
                    self.open(&mut out, Open::Text, json!({"type": "text", "text": ""}));
                    self.any_text = true;
                }
                out.push_str(&self.delta(json!({"type": "text_delta", "text": s})));
            }
            Event::ToolStart { id, name, .. } => {
                self.open(
                    &mut out,
                    Open::Tool,
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                );
                self.streamed_calls += 1;
            }
            Event::ToolArgs { fragment, .. } if self.open == Open::Tool => out.push_str(
                &self.delta(json!({"type": "input_json_delta", "partial_json": fragment})),
            ),
            Event::Done(o) => {
                self.close(&mut out);
                if self.streamed_calls == 0 {
                    for c in &o.calls {
                        self.open(
                            &mut out,
                            Open::Tool,
                            json!({"type": "tool_use", "id": c.id, "name": c.name, "input": {}}),
                        );
                        out.push_str(&self.delta(json!({"type": "input_json_delta",
                            "partial_json": arguments_value(&c.arguments).to_string()})));
                        self.close(&mut out);
                    }
                }
                if !self.any_text && o.calls.is_empty() {
                    self.open(&mut out, Open::Text, json!({"type": "text", "text": ""}));
                    self.close(&mut out);
                }
                out.push_str(&sse_event(
                    "message_delta",
                    &json!({"type": "message_delta",
                            "delta": {"stop_reason": stop_reason(o.finish), "stop_sequence": null},
                            "usage": usage_json(&o)}),
                ));
                out.push_str(&sse_event("message_stop", &json!({"type": "message_stop"})));
                return (out, true);
            }
            Event::Failed(m) => {
                out.push_str(&sse_event(
                    "error",
                    &json!({"type": "error", "error": {"type": "api_error", "message": m}}),
                ));
                return (out, true);
            }
            _ => {}
        }
        (out, false)
    }
}
