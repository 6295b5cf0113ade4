//! OpenAI Responses `POST /v1/responses` (protocol.md §4.7) as Codex CLI uses it: developer
//! messages as system text, reasoning items echoed back, namespace and custom tools,
//! `custom_tool_call` output for custom (grammar) tools.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::engine::{
    new_item_id, Bindings, Event, Finish, Msg, Outcome, PromptInput, Role, ToolApi, ToolCall,
    ToolOutputs, MODEL_ID,
};
use crate::http::{
    check_auth, collect, content_text, json_response, prepare, read_json, settle, sse_data,
    sse_response, submit, thinking_mode, trace_head, unix_now, Api, ApiError, App, Fields,
    GenParams, Projector,
};
use crate::openai::schema_text;

const API: Api = Api::OpenAi;

/// How a rendered tool name maps back to what the client declared.
#[derive(Clone, Debug)]
enum ToolKind {
    Function {
        namespace: Option<String>,
        name: String,
    },
    Custom {
        name: String,
    },
}

#[derive(Default)]
struct ToolSet {
    schemas: Vec<Value>,
    kinds: HashMap<String, ToolKind>,
}

fn parse_tools(v: Option<&Value>, ts: &mut ToolSet) -> Result<(), ApiError> {
    let arr = match v {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(ApiError::bad(
                API,
                "invalid JSON request: 'tools' must be an array",
            ))
        }
    };
    for t in arr {
        let Value::Object(o) = t else { continue };
        let ty = o.get("type").and_then(|t| t.as_str()).unwrap_or("function");
        match ty {
            "function" => {
                if let (Some(s), Some(name)) =
                    (schema_text(o), o.get("name").and_then(|n| n.as_str()))
                {
                    ts.schemas.push(s);
                    ts.kinds.insert(
                        name.into(),
                        ToolKind::Function {
                            namespace: None,
                            name: name.into(),
                        },
                    );
                } else if let Some(s) = schema_text(o) {
                    ts.schemas.push(s);
                }
            }
            "custom" => {
                let Some(name) = o.get("name").and_then(|n| n.as_str()) else {
                    continue;
                };
                let mut desc = o
                    .get("description")
                    .and_then(|d| d.as_str())
                    .unwrap_or("")
                    .to_string();
                if let Some(fmt) = o.get("format") {
                    if let Some(def) = fmt.get("definition").and_then(|d| d.as_str()) {
                        desc.push_str("\nThe `input` parameter is raw text in this grammar:\n");
                        desc.push_str(def);
                    }
                }
                let f = json!({"name": name, "description": desc, "parameters": {
                    "type": "object",
                    "properties": {"input": {"type": "string", "description": "raw tool input"}},
                    "required": ["input"]}});
                ts.schemas.push(f);
                ts.kinds
                    .insert(name.into(), ToolKind::Custom { name: name.into() });
            }
            "namespace" => {
                let ns = o.get("name").and_then(|n| n.as_str()).unwrap_or("");
                if let Some(Value::Array(inner)) = o.get("tools") {
                    for it in inner {
                        let Value::Object(io) = it else { continue };
                        let Some(name) = io.get("name").and_then(|n| n.as_str()) else {
                            continue;
                        };
                        let full = format!("{ns}{name}");
                        let mut f = Map::new();
                        f.insert("name".into(), json!(full));
                        f.insert(
                            "description".into(),
                            io.get("description").cloned().unwrap_or(json!("")),
                        );
                        f.insert(
                            "parameters".into(),
                            io.get("parameters")
                                .or_else(|| io.get("input_schema"))
                                .cloned()
                                .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                        );
                        ts.schemas.push(Value::Object(f));
                        ts.kinds.insert(
                            full,
                            ToolKind::Function {
                                namespace: Some(ns.into()),
                                name: name.into(),
                            },
                        );
                    }
                }
            }
            "tool_search" => {
                let f = json!({"name": "tool_search",
                    "description": o.get("description").cloned().unwrap_or(json!("Search available tools.")),
                    "parameters": o.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}}))});
                ts.schemas.push(f);
                ts.kinds.insert(
                    "tool_search".into(),
                    ToolKind::Function {
                        namespace: None,
                        name: "tool_search".into(),
                    },
                );
            }
            // Hosted tools (web_search, file_search, ...) cannot run here: dropped.
            _ => {}
        }
    }
    Ok(())
}

fn output_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(_)) => content_text(v),
        None | Some(Value::Null) => String::new(),
        Some(other) => other.to_string(),
    }
}

struct Parsed {
    messages: Vec<Msg>,
}

fn parse_input(f: &Fields) -> Result<Parsed, ApiError> {
    let mut messages: Vec<Msg> = Vec::new();
    match f.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(Msg::text(Role::System, s.clone())),
        Some(_) => {
            return Err(ApiError::bad(
                API,
                "invalid JSON request: 'instructions' must be a string",
            ))
        }
    }
    let items = match f.get("input") {
        None | Some(Value::Null) => return Err(ApiError::bad(API, "missing input")),
        Some(Value::String(s)) => {
            messages.push(Msg::text(Role::User, s.clone()));
            return Ok(Parsed { messages });
        }
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(ApiError::bad(
                API,
                "invalid JSON request: 'input' must be a string or an array",
            ))
        }
    };
    let mut pending_reasoning: Option<String> = None;
    // Calls append to the previous assistant message; reasoning attaches to the next one.
    fn assistant_for_call<'a>(
        messages: &'a mut Vec<Msg>,
        pending: &mut Option<String>,
    ) -> &'a mut Msg {
        let reuse =
            matches!(messages.last(), Some(m) if m.role == Role::Assistant) && pending.is_none();
        if !reuse {
            let mut m = Msg::text(Role::Assistant, "");
            m.reasoning = pending.take();
            messages.push(m);
        }
        messages.last_mut().unwrap()
    }
    for (i, item) in items.iter().enumerate() {
        let Value::Object(o) = item else {
            return Err(ApiError::bad(
                API,
                format!("invalid JSON request: input[{i}] must be an object"),
            ));
        };
        let ty = o.get("type").and_then(|t| t.as_str()).unwrap_or("message");
        let call_id = || {
            o.get("call_id")
                .or_else(|| o.get("id"))
                .and_then(|x| x.as_str())
                .unwrap_or("")
                .to_string()
        };
        match ty {
            "message" => {
                let role = match o.get("role").and_then(|r| r.as_str()).unwrap_or("user") {
                    "system" => Role::System,
                    "developer" => Role::Developer,
                    "assistant" => Role::Assistant,
                    _ => Role::User,
                };
                let text = content_text(o.get("content"));
                if role == Role::Assistant {
                    let mut m = Msg::text(Role::Assistant, text);
                    m.reasoning = pending_reasoning.take();
                    messages.push(m);
                } else {
                    if let Some(r) = pending_reasoning.take() {
                        let mut m = Msg::text(Role::Assistant, "");
                        m.reasoning = Some(r);
                        messages.push(m);
                    }
                    messages.push(Msg::text(role, text));
                }
            }
            "reasoning" => {
                // Our own reasoning items carry the exact text in encrypted_content.
                let text = match o.get("encrypted_content") {
                    Some(Value::String(s)) if !s.is_empty() => s.clone(),
                    _ => {
                        let mut parts = Vec::new();
                        for key in ["summary", "content"] {
                            if let Some(Value::Array(a)) = o.get(key) {
                                let t: String = a
                                    .iter()
                                    .filter_map(|b| b.get("text").and_then(|t| t.as_str()))
                                    .collect();
                                if !t.is_empty() {
                                    parts.push(t);
                                }
                            }
                        }
                        parts.join("\n")
                    }
                };
                pending_reasoning
                    .get_or_insert_with(String::new)
                    .push_str(&text);
            }
            "function_call" | "custom_tool_call" | "local_shell_call" | "tool_search_call" => {
                let name = match ty {
                    "function_call" => format!(
                        "{}{}",
                        o.get("namespace").and_then(|n| n.as_str()).unwrap_or(""),
                        o.get("name").and_then(|n| n.as_str()).unwrap_or("")
                    ),
                    "custom_tool_call" => o
                        .get("name")
                        .and_then(|n| n.as_str())
                        .unwrap_or("")
                        .to_string(),
                    "local_shell_call" => "local_shell".into(),
                    _ => "tool_search".into(),
                };
                let arguments = match ty {
                    "custom_tool_call" => {
                        json!({"input": o.get("input").and_then(|x| x.as_str()).unwrap_or("")})
                            .to_string()
                    }
                    _ => match o
                        .get("arguments")
                        .or_else(|| o.get("action"))
                        .or_else(|| o.get("input"))
                    {
                        Some(Value::String(s)) => s.clone(),
                        Some(v) => v.to_string(),
                        None => "{}".into(),
                    },
                };
                let id = call_id();
                let m = assistant_for_call(&mut messages, &mut pending_reasoning);
                m.tool_calls.push(ToolCall {
                    id,
                    name,
                    arguments,
                });
            }
            t if t.ends_with("_output") => {
                if let Some(r) = pending_reasoning.take() {
                    let mut m = Msg::text(Role::Assistant, "");
                    m.reasoning = Some(r);
                    messages.push(m);
                }
                let content = o
                    .get("output")
                    .or_else(|| o.get("result"))
                    .or_else(|| o.get("tools"));
                let mut m = Msg::text(Role::Tool, output_text(content));
                m.tool_call_id = Some(call_id());
                messages.push(m);
            }
            // compaction summaries, item references, hosted-tool records: nothing to render.
            _ => {}
        }
    }
    if let Some(r) = pending_reasoning.take() {
        let mut m = Msg::text(Role::Assistant, "");
        m.reasoning = Some(r);
        messages.push(m);
    }
    Ok(Parsed { messages })
}

/// Tool-output validation (protocol.md §4.7): every output answers a call replayed before it
/// in the request or a call of the live Responses tool-call turn (`live`), else 400. Then
/// what the outputs claim of the live session (§5.3): the trailing run of outputs answers the
/// calls of the assistant message right before it, or, when the request replays no history
/// (only outputs, after any instructions / developer text), the outputs' own ids.
fn tool_outputs(messages: &[Msg], live: impl Fn(&str) -> bool) -> Result<ToolOutputs, ApiError> {
    let mut needs_live = false;
    for (i, m) in messages.iter().enumerate() {
        let Some(id) = m.tool_call_id.as_deref().filter(|_| m.role == Role::Tool) else {
            continue;
        };
        let replayed = messages[..i]
            .iter()
            .any(|p| p.tool_calls.iter().any(|c| c.id == id));
        if replayed {
            continue;
        }
        if !live(id) {
            return Err(ApiError::bad(
                API,
                format!(
                    "Responses continuation state is not available for call_id {id}; retry by \
                     replaying the full input history"
                ),
            ));
        }
        needs_live = true;
    }
    let start = messages
        .iter()
        .rposition(|m| m.role != Role::Tool)
        .map_or(0, |i| i + 1);
    let (head, tail) = messages.split_at(start);
    let ids: Vec<&str> = match head.last() {
        _ if tail.is_empty() => Vec::new(),
        Some(a) if a.role == Role::Assistant => {
            a.tool_calls.iter().map(|c| c.id.as_str()).collect()
        }
        _ if head
            .iter()
            .all(|m| matches!(m.role, Role::System | Role::Developer)) =>
        {
            tail.iter()
                .filter_map(|m| m.tool_call_id.as_deref())
                .collect()
        }
        _ => Vec::new(),
    };
    let mut unique: Vec<String> = Vec::new();
    for id in ids {
        if !unique.iter().any(|u| u == id) {
            unique.push(id.to_string());
        }
    }
    Ok(ToolOutputs {
        api: ToolApi::Responses,
        tail: start..messages.len(),
        ids: unique,
        needs_live,
    })
}

fn usage_json(o: &Outcome) -> Value {
    json!({
        "input_tokens": o.usage.prompt,
        "input_tokens_details": {"cached_tokens": o.usage.cached},
        "output_tokens": o.usage.completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": o.usage.prompt + o.usage.completion,
    })
}

struct Ctx {
    id: String,
    created: u64,
    model: String,
    kinds: HashMap<String, ToolKind>,
    show_reasoning: bool,
    encrypted: bool,
    rs_id: String,
    msg_id: String,
}

impl Ctx {
    fn response(
        &self,
        status: &str,
        output: Vec<Value>,
        usage: Option<Value>,
        finish: Option<Finish>,
    ) -> Value {
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": output, "parallel_tool_calls": true,
            "tool_choice": "auto", "tools": [], "metadata": {}, "instructions": null,
            "error": null, "incomplete_details": null, "usage": usage,
        });
        match finish {
            Some(Finish::Length) => {
                r["incomplete_details"] = json!({"reason": "max_output_tokens"})
            }
            Some(Finish::Error) => {
                r["error"] = json!({"code": "server_error", "message": "generation failed"})
            }
            _ => {}
        }
        r
    }

    fn reasoning_item(&self, text: &str, status: &str) -> Value {
        let mut v = json!({"id": self.rs_id, "type": "reasoning", "status": status,
            "summary": [{"type": "summary_text", "text": text}]});
        if self.encrypted {
            v["encrypted_content"] = json!(text);
        }
        v
    }

    fn message_item(&self, text: &str, status: &str) -> Value {
        json!({"id": self.msg_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]})
    }

    fn call_item(&self, c: &ToolCall, status: &str, full: bool) -> Value {
        let hex: String =
            c.id.strip_prefix("call_")
                .unwrap_or(&c.id)
                .chars()
                .take(24)
                .collect();
        let fc_id = format!("fc_{hex}");
        match self.kinds.get(&c.name) {
            Some(ToolKind::Custom { name }) => {
                let input = serde_json::from_str::<Value>(&c.arguments)
                    .ok()
                    .and_then(|v| v.get("input").and_then(|i| i.as_str()).map(str::to_string))
                    .unwrap_or_else(|| c.arguments.clone());
                json!({"id": fc_id, "type": "custom_tool_call", "status": status, "call_id": c.id,
                    "name": name, "input": if full { input } else { String::new() }})
            }
            kind => {
                let (ns, name) = match kind {
                    Some(ToolKind::Function { namespace, name }) => {
                        (namespace.clone(), name.clone())
                    }
                    _ => (None, c.name.clone()),
                };
                let mut v = json!({"id": fc_id, "type": "function_call", "status": status, "call_id": c.id,
                    "name": name, "arguments": if full { c.arguments.clone() } else { String::new() }});
                if let Some(ns) = ns {
                    v["namespace"] = json!(ns);
                }
                v
            }
        }
    }

    fn final_output(&self, o: &Outcome) -> Vec<Value> {
        let item_status = if matches!(o.finish, Finish::Length | Finish::Error) {
            "incomplete"
        } else {
            "completed"
        };
        let mut out = Vec::new();
        if let Some(r) = o
            .reasoning
            .as_ref()
            .filter(|r| !r.is_empty() && self.show_reasoning)
        {
            out.push(self.reasoning_item(r, "completed"));
        }
        if !o.content.is_empty() {
            out.push(self.message_item(&o.content, item_status));
        }
        for c in &o.calls {
            out.push(self.call_item(c, "completed", true));
        }
        out
    }
}

fn status_of(f: Finish) -> &'static str {
    match f {
        Finish::Length => "incomplete",
        Finish::Error => "failed",
        _ => "completed",
    }
}

pub async fn responses(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    match inner(app, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn inner(app: App, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    check_auth(&app, &headers, API)?;
    let obj = read_json(&app, body, API).await?;
    let f = Fields::new(&obj, API);
    for key in ["previous_response_id", "conversation"] {
        if !matches!(f.get(key), None | Some(Value::Null)) {
            return Err(ApiError::bad(
                API,
                format!("{key} is not supported; replay full input instead"),
            ));
        }
    }
    let model = f.str("model")?.unwrap_or(MODEL_ID).to_string();
    let parsed = parse_input(&f)?;
    let outputs = tool_outputs(&parsed.messages, |id| {
        app.engine.is_live_call(ToolApi::Responses, id)
    })?;
    let mut ts = ToolSet::default();
    parse_tools(f.get("tools"), &mut ts)?;
    let none = matches!(f.get("tool_choice"), Some(Value::String(s)) if s == "none");
    let tools_active = !ts.schemas.is_empty() && !none;
    let reasoning = f.get("reasoning");
    let effort = reasoning.and_then(|r| r.get("effort"));
    let (thinking, think_max) = thinking_mode(&f, effort, true)?;
    // §4.7: a thinking-mode replay of earlier tool calls without their reasoning is accepted
    // but renders a history the model did not produce (it reasoned before those calls).
    let bare = parsed
        .messages
        .iter()
        .filter(|m| !m.tool_calls.is_empty() && m.reasoning.as_deref().is_none_or(|r| r.is_empty()))
        .count();
    if thinking && bare > 0 {
        eprintln!(
            "ds4-server: responses: {bare} replayed tool-call turn(s) without their reasoning              in thinking mode: rendered without it (lower fidelity; send the reasoning items              back, e.g. with include=[\"reasoning.encrypted_content\"])"
        );
    }
    let summary = reasoning
        .and_then(|r| r.get("summary"))
        .and_then(|s| s.as_str());
    let encrypted = matches!(f.get("include"), Some(Value::Array(a))
        if a.iter().any(|x| x.as_str() == Some("reasoning.encrypted_content")));
    let show_reasoning = matches!(summary, Some("auto" | "concise" | "detailed")) || encrypted;
    let stream = f.bool("stream")?.unwrap_or(false);
    let max_tokens = match f.uint("max_output_tokens", true)? {
        Some(m) => Some(m),
        None => f.uint("max_tokens", true)?,
    };
    let mut sampling = f.sampling()?;
    sampling.seed = 0;
    let params = GenParams {
        max_tokens,
        sampling,
        stop: Vec::new(),
        tools_active,
        call_id_prefix: "call_",
        trace: trace_head(&app, "responses", &model, stream, false, &obj),
        bindings: Bindings::Responses {
            echo_reasoning: show_reasoning,
        },
    };
    let prepared = prepare(
        &app,
        PromptInput::Chat {
            messages: parsed.messages,
            tools: if tools_active { ts.schemas } else { Vec::new() },
            thinking,
            think_max,
            outputs: Some(outputs),
        },
        API,
    )
    .await?;
    crate::count_request(&app, "responses");
    let mut run = submit(&app, prepared, params, API, "input")?;
    settle(&mut run, API).await?;
    let ctx = Ctx {
        id: new_item_id("resp_"),
        created: unix_now(),
        model,
        kinds: ts.kinds,
        show_reasoning,
        encrypted,
        rs_id: new_item_id("rs_"),
        msg_id: new_item_id("msg_"),
    };
    if stream {
        return Ok(sse_response(
            &app,
            run,
            ResponsesStream {
                ctx,
                seq: 0,
                out_index: 0,
                reasoning: None,
                message: None,
                done_items: Vec::new(),
            },
        ));
    }
    let o = collect(run, API).await?;
    let out = ctx.final_output(&o);
    Ok(json_response(
        StatusCode::OK,
        &ctx.response(
            status_of(o.finish),
            out,
            Some(usage_json(&o)),
            Some(o.finish),
        ),
    ))
}

struct OpenItem {
    index: usize,
    text: String,
}

struct ResponsesStream {
    ctx: Ctx,
    seq: u64,
    out_index: usize,
    reasoning: Option<OpenItem>,
    message: Option<OpenItem>,
    done_items: Vec<Value>,
}

impl ResponsesStream {
    fn ev(&mut self, ty: &str, mut v: Value) -> String {
        v["type"] = json!(ty);
        v["sequence_number"] = json!(self.seq);
        self.seq += 1;
        sse_data(&v)
    }

    fn close_reasoning(&mut self, out: &mut String, closed: bool) {
        let Some(r) = self.reasoning.take() else {
            return;
        };
        let id = self.ctx.rs_id.clone();
        out.push_str(&self.ev(
            "response.reasoning_summary_text.done",
            json!({"item_id": id, "output_index": r.index, "summary_index": 0, "text": r.text}),
        ));
        out.push_str(&self.ev("response.reasoning_summary_part.done", json!({"item_id": id, "output_index": r.index, "summary_index": 0, "part": {"type": "summary_text", "text": r.text}})));
        let item = self
            .ctx
            .reasoning_item(&r.text, if closed { "completed" } else { "incomplete" });
        out.push_str(&self.ev(
            "response.output_item.done",
            json!({"output_index": r.index, "item": item}),
        ));
        self.done_items.push(item);
    }

    fn close_message(&mut self, out: &mut String, status: &str) {
        let Some(m) = self.message.take() else { return };
        let id = self.ctx.msg_id.clone();
        out.push_str(&self.ev(
            "response.output_text.done",
            json!({"item_id": id, "output_index": m.index, "content_index": 0, "text": m.text}),
        ));
        out.push_str(&self.ev(
            "response.content_part.done",
            json!({"item_id": id, "output_index": m.index, "content_index": 0,
            "part": {"type": "output_text", "text": m.text, "annotations": []}}),
        ));
        let item = self.ctx.message_item(&m.text, status);
        out.push_str(&self.ev(
            "response.output_item.done",
            json!({"output_index": m.index, "item": item}),
        ));
        self.done_items.push(item);
    }
}

impl Projector for ResponsesStream {
    fn start(&mut self) -> String {
        let r = self.ctx.response("in_progress", Vec::new(), None, None);
        let mut s = self.ev("response.created", json!({"response": r.clone()}));
        s.push_str(&self.ev("response.in_progress", json!({"response": r})));
        s
    }

    fn event(&mut self, ev: Event) -> (String, bool) {
        let mut out = String::new();
        match ev {
            Event::Reasoning(t) if self.ctx.show_reasoning => {
                if self.reasoning.is_none() {
                    let index = self.out_index;
                    self.out_index += 1;
                    let id = self.ctx.rs_id.clone();
                    let mut item = json!({"id": id, "type": "reasoning", "status": "in_progress", "summary": []});
                    if self.ctx.encrypted {
                        item["encrypted_content"] = Value::Null;
                    }
                    out.push_str(&self.ev(
                        "response.output_item.added",
                        json!({"output_index": index, "item": item}),
                    ));
                    out.push_str(&self.ev("response.reasoning_summary_part.added", json!({"item_id": id, "output_index": index, "summary_index": 0, "part": {"type": "summary_text", "text": ""}})));
                    self.reasoning = Some(OpenItem {
                        index,
                        text: String::new(),
                    });
                }
                let r = self.reasoning.as_mut().unwrap();
                r.text.push_str(&t);
                let index = r.index;
                let id = self.ctx.rs_id.clone();
                out.push_str(&self.ev(
                    "response.reasoning_summary_text.delta",
                    json!({"item_id": id, "output_index": index, "summary_index": 0, "delta": t}),
                ));
            }
            Event::ReasoningDone => self.close_reasoning(&mut out, true),
            Event::Content(t) => {
                self.close_reasoning(&mut out, true);
                if self.message.is_none() {
                    let index = self.out_index;
                    self.out_index += 1;
                    let id = self.ctx.msg_id.clone();
                    out.push_str(&self.ev("response.output_item.added", json!({"output_index": index,
                        "item": {"id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}})));
                    out.push_str(&self.ev(
                        "response.content_part.added",
                        json!({"item_id": id, "output_index": index, "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": []}}),
                    ));
                    self.message = Some(OpenItem {
                        index,
                        text: String::new(),
                    });
                }
                let m = self.message.as_mut().unwrap();
                m.text.push_str(&t);
                let index = m.index;
                let id = self.ctx.msg_id.clone();
                out.push_str(&self.ev(
                    "response.output_text.delta",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "delta": t}),
                ));
            }
            Event::Done(o) => {
                let closed = o.reasoning_closed;
                self.close_reasoning(&mut out, closed);
                let item_status = if matches!(o.finish, Finish::Length | Finish::Error) {
                    "incomplete"
                } else {
                    "completed"
                };
                // A recovered parse failure: the final content may be longer than what was streamed.
                if let Some(m) = &self.message {
                    if o.content.len() > m.text.len() && o.content.starts_with(&m.text) {
                        let tail = o.content[m.text.len()..].to_string();
                        let (index, id) = (m.index, self.ctx.msg_id.clone());
                        self.message.as_mut().unwrap().text.push_str(&tail);
                        out.push_str(&self.ev("response.output_text.delta", json!({"item_id": id, "output_index": index, "content_index": 0, "delta": tail})));
                    }
                }
                self.close_message(&mut out, item_status);
                for c in &o.calls {
                    let index = self.out_index;
                    self.out_index += 1;
                    let added = self.ctx.call_item(c, "in_progress", false);
                    let full = self.ctx.call_item(c, "completed", true);
                    let item_id = full["id"].clone();
                    out.push_str(&self.ev(
                        "response.output_item.added",
                        json!({"output_index": index, "item": added}),
                    ));
                    if full["type"] == "custom_tool_call" {
                        let input = full["input"].clone();
                        out.push_str(&self.ev(
                            "response.custom_tool_call_input.delta",
                            json!({"item_id": item_id, "output_index": index, "delta": input}),
                        ));
                        out.push_str(&self.ev(
                            "response.custom_tool_call_input.done",
                            json!({"item_id": item_id, "output_index": index, "input": input}),
                        ));
                    } else {
                        let args = full["arguments"].clone();
                        out.push_str(&self.ev(
                            "response.function_call_arguments.delta",
                            json!({"item_id": item_id, "output_index": index, "delta": args}),
                        ));
                        let mut done = json!({"item_id": item_id, "output_index": index, "name": full["name"], "arguments": args});
                        if let Some(ns) = full.get("namespace") {
                            done["namespace"] = ns.clone();
                        }
                        out.push_str(&self.ev("response.function_call_arguments.done", done));
                    }
                    out.push_str(&self.ev(
                        "response.output_item.done",
                        json!({"output_index": index, "item": full}),
                    ));
                    self.done_items.push(full);
                }
                let status = status_of(o.finish);
                let r = self.ctx.response(
                    status,
                    std::mem::take(&mut self.done_items),
                    Some(usage_json(&o)),
                    Some(o.finish),
                );
                let ty = match status {
                    "incomplete" => "response.incomplete",
                    "failed" => "response.failed",
                    _ => "response.completed",
                };
                out.push_str(&self.ev(ty, json!({"response": r})));
                return (out, true);
            }
            Event::Failed(m) => {
                let r = self
                    .ctx
                    .response("failed", Vec::new(), None, Some(Finish::Error));
                out.push_str(&format!("event: error\ndata: {}\n\n", json!({"type": "error", "error": {"message": m, "type": "server_error"}, "sequence_number": self.seq})));
                self.seq += 1;
                out.push_str(&self.ev("response.failed", json!({"response": r})));
                return (out, true);
            }
            _ => {}
        }
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(ids: &[&str]) -> Msg {
        let mut m = Msg::text(Role::Assistant, "");
        for id in ids {
            m.tool_calls.push(ToolCall {
                id: id.to_string(),
                name: "f".into(),
                arguments: "{}".into(),
            });
        }
        m
    }

    fn output(id: &str) -> Msg {
        let mut m = Msg::text(Role::Tool, "ok");
        m.tool_call_id = Some(id.into());
        m
    }

    #[test]
    fn tool_outputs_answer_the_calls_before_them_or_live_ones() {
        let none = |_: &str| false;
        // A full replay: the expected set is the assistant's calls, even those not answered.
        let msgs = [Msg::text(Role::User, "q"), call(&["a", "b"]), output("b")];
        let o = tool_outputs(&msgs, none).unwrap();
        assert_eq!(
            (o.tail, o.ids, o.needs_live),
            (2..3, vec!["a".into(), "b".into()], false)
        );
        // Outputs only (after instructions): their own ids, which only the live session knows.
        let msgs = [
            Msg::text(Role::System, "i"),
            output("a"),
            output("a"),
            output("b"),
        ];
        let o = tool_outputs(&msgs, |id| id != "c").unwrap();
        assert_eq!(
            (o.tail, o.ids, o.needs_live),
            (1..4, vec!["a".into(), "b".into()], true)
        );
        let e = tool_outputs(&msgs, |id| id == "a").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            e.message,
            "Responses continuation state is not available for call_id b; retry by replaying \
             the full input history"
        );
        // Not ending with outputs: nothing to append, but a live-only output still needs it.
        let msgs = [output("a"), Msg::text(Role::User, "go on")];
        let o = tool_outputs(&msgs, |_| true).unwrap();
        assert_eq!((o.tail, o.ids.len(), o.needs_live), (2..2, 0, true));
        // Outputs after a user message (no call before them): no expected set.
        let msgs = [Msg::text(Role::User, "q"), output("a")];
        let o = tool_outputs(&msgs, |_| true).unwrap();
        assert_eq!((o.ids.len(), o.needs_live), (0, true));
    }
}
