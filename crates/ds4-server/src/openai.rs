//! OpenAI `POST /v1/chat/completions` and `POST /v1/completions` (protocol.md §4.5-§4.6).

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::engine::{Bindings, Event, Msg, Outcome, PromptInput, Role, ToolCall, Usage, MODEL_ID};
use crate::http::{
    arguments_text, check_auth, collect, content_text, json_response, prepare, read_json, sse_data,
    sse_response, submit, thinking_mode, trace_head, Api, ApiError, App, Fields, GenParams,
    Projector,
};

const API: Api = Api::OpenAi;

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt,
        "completion_tokens": u.completion,
        "total_tokens": u.prompt + u.completion,
        "prompt_tokens_details": {"cached_tokens": u.cached, "cache_write_tokens": u.prompt - u.cached},
    })
}

/// The function object the encoder renders (`json.dumps(function)`) from any tool shape:
/// OpenAI chat `{type, function}`, Responses/flat `{type:"function", name, description,
/// parameters}`, Anthropic `{name, description, input_schema}`. Client key order is kept.
pub fn schema_text(t: &Map<String, Value>) -> Option<Value> {
    if let Some(f @ Value::Object(_)) = t.get("function") {
        return Some(f.clone());
    }
    let name = t.get("name")?.as_str()?;
    let mut f = Map::new();
    f.insert("name".into(), json!(name));
    if let Some(d) = t.get("description") {
        f.insert("description".into(), d.clone());
    }
    let params = t
        .get("parameters")
        .or_else(|| t.get("input_schema"))
        .cloned()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    f.insert("parameters".into(), params);
    Some(Value::Object(f))
}

fn parse_tools(f: &Fields) -> Result<(Vec<Value>, bool), ApiError> {
    let tools = match f.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => {
            let mut out = Vec::new();
            for t in a {
                let Value::Object(o) = t else {
                    return Err(ApiError::bad(
                        API,
                        "invalid JSON request: each tool must be an object",
                    ));
                };
                if let Some(s) = schema_text(o) {
                    out.push(s);
                }
            }
            out
        }
        Some(_) => {
            return Err(ApiError::bad(
                API,
                "invalid JSON request: 'tools' must be an array",
            ))
        }
    };
    let none = matches!(f.get("tool_choice"), Some(Value::String(s)) if s == "none");
    let active = !tools.is_empty() && !none;
    Ok((if active { tools } else { Vec::new() }, active))
}

fn parse_messages(v: Option<&Value>) -> Result<Vec<Msg>, ApiError> {
    let Some(Value::Array(arr)) = v else {
        return Err(ApiError::bad(
            API,
            match v {
                None | Some(Value::Null) => "missing messages",
                _ => "invalid JSON request: 'messages' must be an array",
            },
        ));
    };
    let mut out = Vec::new();
    for (i, m) in arr.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(ApiError::bad(
                API,
                format!("invalid JSON request: messages[{i}] must be an object"),
            ));
        };
        let role = match m.get("role").and_then(|r| r.as_str()).unwrap_or("user") {
            "system" => Role::System,
            "developer" => Role::Developer,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" | "function" => Role::Tool,
            _ => continue,
        };
        let mut msg = Msg::text(role, content_text(m.get("content")));
        if let Some(r) = m.get("reasoning_content") {
            let r = content_text(Some(r));
            if !r.is_empty() {
                msg.reasoning = Some(r);
            }
        }
        msg.tool_call_id = m
            .get("tool_call_id")
            .and_then(|x| x.as_str())
            .map(str::to_string);
        if let Some(Value::Array(calls)) = m.get("tool_calls") {
            for c in calls {
                let Some(func) = c.get("function") else {
                    continue;
                };
                let Some(name) = func.get("name").and_then(|n| n.as_str()) else {
                    continue;
                };
                msg.tool_calls.push(ToolCall {
                    id: c
                        .get("id")
                        .and_then(|x| x.as_str())
                        .unwrap_or("")
                        .to_string(),
                    name: name.to_string(),
                    arguments: arguments_text(func.get("arguments")),
                });
            }
        }
        out.push(msg);
    }
    Ok(out)
}

fn finish_str(o: &Outcome) -> &'static str {
    o.finish.openai()
}

fn message_json(o: &Outcome) -> Value {
    let mut m = Map::new();
    m.insert("role".into(), json!("assistant"));
    m.insert("content".into(), json!(o.content));
    if let Some(r) = o.reasoning.as_ref().filter(|r| !r.is_empty()) {
        m.insert("reasoning_content".into(), json!(r));
    }
    if !o.calls.is_empty() {
        m.insert("tool_calls".into(), calls_json(&o.calls, true));
    }
    Value::Object(m)
}

fn calls_json(calls: &[ToolCall], with_index: bool) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut v = json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                });
                if with_index {
                    v.as_object_mut().unwrap().insert("index".into(), json!(i));
                }
                v
            })
            .collect(),
    )
}

pub async fn chat(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    match chat_inner(app, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(app: App, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    check_auth(&app, &headers, API)?;
    let obj = read_json(&app, body, API).await?;
    let f = Fields::new(&obj, API);
    let model = f.str("model")?.unwrap_or(MODEL_ID).to_string();
    let messages = parse_messages(f.get("messages"))?;
    let (tools, tools_active) = parse_tools(&f)?;
    let (thinking, think_max) = thinking_mode(&f, f.get("reasoning_effort"), true)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = f
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(|b| b.as_bool())
        .unwrap_or(false);
    let max_tokens = match f.uint("max_completion_tokens", true)? {
        Some(m) => Some(m),
        None => f.uint("max_tokens", true)?,
    };
    let params = GenParams {
        max_tokens,
        sampling: f.sampling()?,
        stop: f.stop("stop")?,
        tools_active,
        call_id_prefix: "call_",
        trace: trace_head(
            &app,
            "chat.completions",
            &model,
            stream,
            include_usage,
            &obj,
        ),
        bindings: Bindings::Thinking,
    };
    let input = PromptInput::Chat {
        messages,
        tools,
        thinking,
        think_max,
        outputs: None,
    };
    let head = Head {
        kind: "chat_completions",
        param: "messages",
        id_prefix: "chatcmpl",
        object: "chat.completion",
        model,
        stream,
    };
    respond(
        &app,
        input,
        params,
        head,
        |id, created, model| ChatStream {
            id,
            created,
            model,
            include_usage,
            streamed_calls: 0,
        },
        |o| json!([{"index": 0, "message": message_json(o), "finish_reason": finish_str(o)}]),
    )
    .await
}

/// What the two OpenAI endpoints' shared tail needs to know of a request.
struct Head {
    /// Request counter key (`/metrics`).
    kind: &'static str,
    /// The request field a context overflow is reported against.
    param: &'static str,
    id_prefix: &'static str,
    /// `object` of the non-streamed response.
    object: &'static str,
    model: String,
    stream: bool,
}

/// Renders and queues the request, then streams it through the projector `sse` makes from
/// (id, created, model), or answers with the object whose `choices` come from `choices`.
async fn respond<P: Projector>(
    app: &App,
    input: PromptInput,
    params: GenParams,
    h: Head,
    sse: impl FnOnce(String, u64, String) -> P,
    choices: impl FnOnce(&Outcome) -> Value,
) -> Result<Response, ApiError> {
    let prepared = prepare(app, input, API).await?;
    crate::count_request(app, h.kind);
    let run = submit(app, prepared, params, API, h.param)?;
    let id = format!("{}-{}", h.id_prefix, app.next_seq());
    let created = crate::http::unix_now();
    if h.stream {
        return Ok(sse_response(app, run, sse(id, created, h.model)));
    }
    let o = collect(run, API).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "id": id,
            "object": h.object,
            "created": created,
            "model": h.model,
            "choices": choices(&o),
            "usage": usage_json(&o.usage),
        }),
    ))
}

struct ChatStream {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    streamed_calls: usize,
}

impl ChatStream {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> String {
        sse_data(&json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }))
    }
}

/// The SSE error event OpenAI SDKs understand, then the terminator.
pub fn openai_stream_error(msg: &str) -> String {
    format!(
        "event: error\ndata: {}\n\ndata: [DONE]\n\n",
        json!({"error": {"message": msg, "type": "server_error"}})
    )
}

impl Projector for ChatStream {
    fn start(&mut self) -> String {
        self.chunk(json!({"role": "assistant", "content": ""}), None)
    }

    fn event(&mut self, ev: Event) -> (String, bool) {
        match ev {
            Event::Reasoning(s) => (self.chunk(json!({"reasoning_content": s}), None), false),
            Event::Content(s) => (self.chunk(json!({"content": s}), None), false),
            Event::ToolStart { index, id, name } => {
                self.streamed_calls += 1;
                (
                    self.chunk(
                        json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                            "function": {"name": name, "arguments": ""}}]}),
                        None,
                    ),
                    false,
                )
            }
            Event::ToolArgs { index, fragment } => (
                self.chunk(
                    json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}),
                    None,
                ),
                false,
            ),
            Event::Done(o) => {
                let mut s = String::new();
                if !o.calls.is_empty() && self.streamed_calls == 0 {
                    s.push_str(
                        &self.chunk(json!({"tool_calls": calls_json(&o.calls, true)}), None),
                    );
                }
                s.push_str(&self.chunk(json!({}), Some(finish_str(&o))));
                if self.include_usage {
                    s.push_str(&sse_data(&json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage_json(&o.usage),
                    })));
                }
                s.push_str("data: [DONE]\n\n");
                (s, true)
            }
            Event::Failed(m) => (openai_stream_error(&m), true),
            _ => (String::new(), false),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Legacy completions
// ---------------------------------------------------------------------------------------

pub async fn completions(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    match completions_inner(app, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(app: App, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    check_auth(&app, &headers, API)?;
    let obj = read_json(&app, body, API).await?;
    let f = Fields::new(&obj, API);
    let model = f.str("model")?.unwrap_or(MODEL_ID).to_string();
    let prompt = match f.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => match a.first() {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(ApiError::bad(API, "missing prompt")),
        },
        None | Some(Value::Null) => return Err(ApiError::bad(API, "missing prompt")),
        Some(_) => {
            return Err(ApiError::bad(
                API,
                "invalid JSON request: 'prompt' must be a string or an array of strings",
            ))
        }
    };
    let (thinking, think_max) = thinking_mode(&f, f.get("reasoning_effort"), true)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = f
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(|b| b.as_bool())
        .unwrap_or(false);
    let params = GenParams {
        max_tokens: f.uint("max_tokens", true)?,
        sampling: f.sampling()?,
        stop: f.stop("stop")?,
        tools_active: false,
        call_id_prefix: "call_",
        trace: trace_head(&app, "completions", &model, stream, include_usage, &obj),
        bindings: Bindings::None,
    };
    let input = PromptInput::Completion {
        prompt,
        thinking,
        think_max,
    };
    let head = Head {
        kind: "completions",
        param: "prompt",
        id_prefix: "cmpl",
        object: "text_completion",
        model,
        stream,
    };
    respond(
        &app,
        input,
        params,
        head,
        |id, created, model| CompletionStream {
            id,
            created,
            model,
            include_usage,
        },
        |o| json!([{"text": o.raw, "index": 0, "logprobs": null, "finish_reason": finish_str(o)}]),
    )
    .await
}

struct CompletionStream {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl CompletionStream {
    fn chunk(&self, text: &str, finish: Option<&str>) -> String {
        sse_data(&json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}],
        }))
    }
}

impl Projector for CompletionStream {
    fn start(&mut self) -> String {
        ": ok\n\n".into()
    }
    fn event(&mut self, ev: Event) -> (String, bool) {
        match ev {
            Event::Content(s) | Event::Reasoning(s) => (self.chunk(&s, None), false),
            Event::Done(o) => {
                let mut s = self.chunk("", Some(finish_str(&o)));
                if self.include_usage {
                    s.push_str(&sse_data(&json!({
                        "id": self.id,
                        "object": "text_completion",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage_json(&o.usage),
                    })));
                }
                s.push_str("data: [DONE]\n\n");
                (s, true)
            }
            Event::Failed(m) => (openai_stream_error(&m), true),
            _ => (String::new(), false),
        }
    }
}
