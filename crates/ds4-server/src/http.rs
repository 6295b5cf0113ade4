//! HTTP plumbing shared by the API modules: app state, errors in each API's shape, auth,
//! body reading, request-field helpers, job submission and the SSE body.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ds4::sample::SamplerConfig;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::engine::trace::TraceHead;
use crate::engine::{Bindings, Engine, Event, Job, Outcome, Prepared, PromptInput, SubmitError};

pub struct AppState {
    pub engine: Engine,
    pub api_key: Option<String>,
    pub body_limit: usize,
    pub started: Instant,
    pub seq: AtomicU64,
    pub keepalive: Duration,
}

impl AppState {
    /// Process-wide response counter shared by all APIs (`chatcmpl-<n>`, `cmpl-<n>`).
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }
}

pub type App = Arc<AppState>;

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Anthropic,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub api: Api,
    pub message: String,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    pub extra: Vec<(&'static str, Value)>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, api: Api, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            api,
            message: message.into(),
            code: None,
            param: None,
            extra: Vec::new(),
            retry_after: None,
        }
    }
    pub fn bad(api: Api, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, api, message)
    }

    fn openai_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500 => "server_error",
            503 => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn anthropic_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            500 => "api_error",
            503 | 529 => "overloaded_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> Value {
        match self.api {
            Api::OpenAi => {
                let mut e = Map::new();
                e.insert("message".into(), json!(self.message));
                e.insert("type".into(), json!(self.openai_type()));
                e.insert("param".into(), json!(self.param));
                e.insert("code".into(), json!(self.code));
                for (k, v) in &self.extra {
                    e.insert((*k).into(), v.clone());
                }
                json!({ "error": e })
            }
            Api::Anthropic => {
                let mut e = Map::new();
                e.insert("type".into(), json!(self.anthropic_type()));
                e.insert("message".into(), json!(self.message));
                for (k, v) in &self.extra {
                    e.insert((*k).into(), v.clone());
                }
                json!({ "type": "error", "error": e })
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_response(self.status, &self.body());
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

pub fn json_response(status: StatusCode, v: &Value) -> Response {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn submit_error(e: SubmitError, api: Api) -> ApiError {
    let (status, msg, retry) = match e {
        SubmitError::Loading => (
            StatusCode::SERVICE_UNAVAILABLE,
            "model is loading; retry shortly",
            5,
        ),
        SubmitError::QueueFull => (
            StatusCode::TOO_MANY_REQUESTS,
            "server busy: request queue is full; retry shortly",
            2,
        ),
        SubmitError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "server shutting down", 5),
        SubmitError::BadRequest(m) => {
            return ApiError::bad(api, format!("invalid request: {m}"));
        }
    };
    let mut err = ApiError::new(status, api, msg);
    err.retry_after = Some(retry);
    err
}

// ---------------------------------------------------------------------------------------
// Auth and body
// ---------------------------------------------------------------------------------------

/// With `--api-key`, accept `Authorization: Bearer KEY` or `x-api-key: KEY`.
pub fn check_auth(app: &AppState, headers: &HeaderMap, api: Api) -> Result<(), ApiError> {
    let Some(key) = &app.api_key else {
        return Ok(());
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let xkey = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if bearer == Some(key.as_str()) || xkey == Some(key.as_str()) {
        Ok(())
    } else {
        let mut e = ApiError::new(
            StatusCode::UNAUTHORIZED,
            api,
            "invalid or missing API key (send Authorization: Bearer <key> or x-api-key)",
        );
        e.code = Some("invalid_api_key");
        Err(e)
    }
}

/// Reads and parses a JSON object body with the configured size limit.
pub async fn read_json(
    app: &AppState,
    body: Body,
    api: Api,
) -> Result<Map<String, Value>, ApiError> {
    let bytes: Bytes = match axum::body::to_bytes(body, app.body_limit).await {
        Ok(b) => b,
        Err(e) => {
            let too_large = std::error::Error::source(&e)
                .map(|s| s.to_string().contains("length limit"))
                .unwrap_or(false)
                || e.to_string().contains("length limit");
            if too_large {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    api,
                    format!(
                        "request body too large (limit {} MiB; raise --body-limit-mb)",
                        app.body_limit >> 20
                    ),
                ));
            }
            return Err(ApiError::bad(
                api,
                "bad HTTP request: could not read the body",
            ));
        }
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad(
            api,
            "invalid JSON request: body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad(api, format!("invalid JSON request: {e}"))),
    }
}

// ---------------------------------------------------------------------------------------
// Field helpers: known keys with the wrong type fail with 400
// ---------------------------------------------------------------------------------------

pub struct Fields<'a> {
    pub obj: &'a Map<String, Value>,
    pub api: Api,
}

impl<'a> Fields<'a> {
    pub fn new(obj: &'a Map<String, Value>, api: Api) -> Fields<'a> {
        Fields { obj, api }
    }
    fn wrong(&self, key: &str, want: &str) -> ApiError {
        let mut e = ApiError::bad(
            self.api,
            format!("invalid JSON request: '{key}' must be {want}"),
        );
        e.code = Some("invalid_value");
        e
    }
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key)
    }
    /// Absent -> None; number -> Some; anything else -> 400.
    pub fn f64(&self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.obj.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(_) => Err(self.wrong(key, "a number")),
        }
    }
    /// Integer, clamped at 0; null allowed where OpenAI allows it.
    pub fn uint(&self, key: &str, allow_null: bool) -> Result<Option<u64>, ApiError> {
        match self.obj.get(key) {
            None => Ok(None),
            Some(Value::Null) if allow_null => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(u) = n.as_u64() {
                    Ok(Some(u))
                } else if let Some(i) = n.as_i64() {
                    Ok(Some(i.max(0) as u64))
                } else if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0) {
                    Ok(Some(f.max(0.0) as u64))
                } else {
                    Err(self.wrong(key, "an integer"))
                }
            }
            Some(_) => Err(self.wrong(key, "an integer")),
        }
    }
    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.wrong(key, "a boolean")),
        }
    }
    pub fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.wrong(key, "a string")),
        }
    }

    /// Sampling knobs (OpenAI allows null for most; Anthropic does not send null).
    pub fn sampling(&self) -> Result<SamplerConfig, ApiError> {
        let mut c = SamplerConfig::default();
        let num = |k: &str| -> Result<Option<f64>, ApiError> {
            match self.obj.get(k) {
                Some(Value::Null) => Ok(None),
                _ => self.f64(k),
            }
        };
        if let Some(t) = num("temperature")? {
            c.temperature = t as f32;
        }
        if let Some(p) = num("top_p")? {
            c.top_p = p as f32;
        }
        if let Some(p) = num("min_p")? {
            c.min_p = p as f32;
        }
        if let Some(k) = self.uint("top_k", true)? {
            c.top_k = k as usize;
        }
        if let Some(s) = self.uint("seed", true)? {
            c.seed = s;
        }
        Ok(c.normalized())
    }

    /// `stop` / `stop_sequences`: string or array of strings (others skipped).
    pub fn stop(&self, key: &str) -> Result<Vec<String>, ApiError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect()),
            Some(Value::Array(a)) => Ok(a
                .iter()
                .filter_map(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()),
            Some(_) => Err(self.wrong(key, "a string or an array of strings")),
        }
    }
}

/// Thinking-mode selection (protocol.md §2.7). `default_on` is the API's default when the
/// request has no explicit control and no alias model name.
pub fn thinking_mode(
    f: &Fields,
    effort: Option<&Value>,
    default_on: bool,
) -> Result<(bool, bool), ApiError> {
    let mut explicit: Option<bool> = None;
    match f.get("thinking") {
        Some(Value::Bool(b)) => explicit = Some(*b),
        Some(Value::Object(o)) => match o.get("type").and_then(|t| t.as_str()) {
            Some("enabled") | Some("adaptive") => explicit = Some(true),
            Some("disabled") => explicit = Some(false),
            _ => {}
        },
        _ => {}
    }
    if let Some(Value::Bool(b)) = f.get("think") {
        explicit = Some(*b);
    }
    let mut max = false;
    match effort {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => match s.as_str() {
            "max" => {
                max = true;
                if explicit.is_none() && f.api == Api::OpenAi {
                    explicit = Some(true);
                }
            }
            "xhigh" | "high" | "medium" | "low" | "minimal" => {
                if explicit.is_none() && f.api == Api::OpenAi {
                    explicit = Some(true);
                }
            }
            "none" => explicit = Some(false),
            other => {
                return Err(ApiError::bad(
                    f.api,
                    format!(
                        "invalid JSON request: unsupported reasoning effort {other:?} \
                         (expected none, minimal, low, medium, high, xhigh or max)"
                    ),
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::bad(
                f.api,
                "invalid JSON request: reasoning effort must be a string",
            ))
        }
    }
    let on = explicit.unwrap_or_else(|| match f.get("model").and_then(|m| m.as_str()) {
        Some("deepseek-chat") => false,
        Some("deepseek-reasoner") => true,
        _ => default_on,
    });
    Ok((on, on && max))
}

// ---------------------------------------------------------------------------------------
// Running a job
// ---------------------------------------------------------------------------------------

/// Sets the cancel flag when dropped (client gone: response future or body stream dropped).
pub struct CancelOnDrop(pub Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

pub struct Running {
    pub prompt_tokens: usize,
    rx: UnboundedReceiver<Event>,
    /// An event already taken from `rx` by [`settle`], delivered first.
    pending: Option<Event>,
    /// The request needs live tool state (protocol.md §5.2 step 4).
    needs_live: bool,
    /// Dropped with the response (client gone): cancels the job.
    pub _guard: CancelOnDrop,
}

impl Running {
    /// The job's next event (None once the worker is done with it).
    pub async fn recv(&mut self) -> Option<Event> {
        match self.pending.take() {
            Some(ev) => Some(ev),
            None => self.rx.recv().await,
        }
    }
}

/// For a request that needs live tool state: waits until the worker has looked up the KV
/// state, so that a lost state is an HTTP 409 (protocol.md §4.9, §5.2 step 4) even for a
/// stream, whose headers are not sent yet. Other requests return at once.
pub async fn settle(run: &mut Running, api: Api) -> Result<(), ApiError> {
    if !run.needs_live {
        return Ok(());
    }
    loop {
        match run.rx.recv().await {
            Some(Event::Prefill { .. }) => {}
            Some(Event::Conflict(m)) => return Err(ApiError::new(StatusCode::CONFLICT, api, m)),
            ev => {
                run.pending = ev;
                return Ok(());
            }
        }
    }
}

pub struct GenParams {
    pub max_tokens: Option<u64>,
    pub sampling: SamplerConfig,
    pub stop: Vec<String>,
    pub tools_active: bool,
    pub call_id_prefix: &'static str,
    /// The request for `--trace` (None when tracing is off).
    pub trace: Option<TraceHead>,
    /// The live binding the request may continue and leaves behind (§5.3).
    pub bindings: Bindings,
}

/// The request as `--trace` records it; None (and no copy of the body) when tracing is off.
pub fn trace_head(
    app: &App,
    kind: &'static str,
    model: &str,
    stream: bool,
    include_usage: bool,
    request: &Map<String, Value>,
) -> Option<TraceHead> {
    app.engine.tracing().then(|| TraceHead {
        kind,
        model: model.to_string(),
        stream,
        include_usage,
        request: Value::Object(request.clone()),
    })
}

/// Context-overflow error in the API's shape (Claude Code parses the Anthropic wording).
pub fn context_error(api: Api, n: usize, ctx: usize, param: &'static str) -> ApiError {
    match api {
        Api::Anthropic => {
            let mut e = ApiError::bad(
                api,
                format!("prompt is too long: {n} tokens > {ctx} maximum"),
            );
            e.extra = vec![("n_prompt_tokens", json!(n)), ("n_ctx", json!(ctx))];
            e
        }
        Api::OpenAi => {
            let mut e = ApiError::bad(
                api,
                format!("Prompt has {n} tokens, but the configured context size is {ctx} tokens"),
            );
            e.code = Some("context_length_exceeded");
            e.param = Some(param);
            e.extra = vec![("n_prompt_tokens", json!(n)), ("n_ctx", json!(ctx))];
            e
        }
    }
}

/// Renders + tokenizes off the async threads.
pub async fn prepare(app: &App, input: PromptInput, api: Api) -> Result<Prepared, ApiError> {
    let engine = app.engine.clone();
    match tokio::task::spawn_blocking(move || engine.prepare(input)).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(submit_error(e, api)),
        Err(_) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            api,
            "internal error while rendering the prompt",
        )),
    }
}

/// Context check, then queue.
pub fn submit(
    app: &App,
    prepared: Prepared,
    params: GenParams,
    api: Api,
    param: &'static str,
) -> Result<Running, ApiError> {
    let ctx = app.engine.ctx();
    let n = prepared.tokens.len();
    let needs_live = prepared.tail.as_ref().is_some_and(|t| t.needs_live);
    if n >= ctx {
        return Err(context_error(api, n, ctx, param));
    }
    let (tx, rx) = unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let job = Job {
        prepared,
        max_tokens: params.max_tokens,
        sampling: params.sampling,
        stop: params.stop,
        tools_active: params.tools_active,
        call_id_prefix: params.call_id_prefix,
        events: tx,
        cancel: cancel.clone(),
        trace: params.trace,
        bindings: params.bindings,
    };
    app.engine.submit(job).map_err(|e| submit_error(e, api))?;
    Ok(Running {
        prompt_tokens: n,
        rx,
        pending: None,
        needs_live,
        _guard: CancelOnDrop(cancel),
    })
}

/// Waits for the outcome (non-streaming).
pub async fn collect(mut run: Running, api: Api) -> Result<Outcome, ApiError> {
    while let Some(ev) = run.recv().await {
        match ev {
            Event::Done(o) => return Ok(*o),
            Event::Failed(m) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, api, m))
            }
            Event::Conflict(m) => return Err(ApiError::new(StatusCode::CONFLICT, api, m)),
            _ => {}
        }
    }
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        api,
        "the engine stopped before answering",
    ))
}

// ---------------------------------------------------------------------------------------
// SSE
// ---------------------------------------------------------------------------------------

/// Turns engine events into one API's SSE frames.
pub trait Projector: Send + 'static {
    /// Frames sent right after the headers.
    fn start(&mut self) -> String;
    /// Frames for one event; `Done`/`Failed` must end the stream (return true).
    fn event(&mut self, ev: Event) -> (String, bool);
    /// A keep-alive frame.
    fn keepalive(&self) -> String {
        ": keep-alive\n\n".into()
    }
}

pub fn sse_data(v: &Value) -> String {
    format!("data: {}\n\n", serde_json::to_string(v).unwrap_or_default())
}

pub fn sse_event(name: &str, v: &Value) -> String {
    format!(
        "event: {name}\ndata: {}\n\n",
        serde_json::to_string(v).unwrap_or_default()
    )
}

struct SseState<P: Projector> {
    run: Running,
    proj: P,
    started: bool,
    finished: bool,
    keepalive: Duration,
    last_write: Instant,
}

pub fn sse_response<P: Projector>(app: &App, run: Running, proj: P) -> Response {
    let st = SseState {
        run,
        proj,
        started: false,
        finished: false,
        keepalive: app.keepalive,
        last_write: Instant::now(),
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if st.finished {
            return None;
        }
        if !st.started {
            st.started = true;
            st.last_write = Instant::now();
            let s = st.proj.start();
            if !s.is_empty() {
                return Some((Ok::<Bytes, Infallible>(Bytes::from(s)), st));
            }
        }
        loop {
            let wait = st.keepalive.saturating_sub(st.last_write.elapsed());
            match tokio::time::timeout(wait, st.run.recv()).await {
                Err(_) => {
                    st.last_write = Instant::now();
                    let s = st.proj.keepalive();
                    return Some((Ok(Bytes::from(s)), st));
                }
                Ok(None) => {
                    st.finished = true;
                    let (s, _) = st
                        .proj
                        .event(Event::Failed("the engine stopped before answering".into()));
                    return Some((Ok(Bytes::from(s)), st));
                }
                Ok(Some(Event::Prefill { .. })) => {
                    if st.last_write.elapsed() >= st.keepalive {
                        st.last_write = Instant::now();
                        let s = st.proj.keepalive();
                        return Some((Ok(Bytes::from(s)), st));
                    }
                }
                Ok(Some(ev)) => {
                    // A 409 after the headers (a request not settled first) ends the stream.
                    let ev = match ev {
                        Event::Conflict(m) => Event::Failed(m),
                        ev => ev,
                    };
                    let (s, done) = st.proj.event(ev);
                    st.finished = done;
                    if s.is_empty() && !done {
                        continue;
                    }
                    st.last_write = Instant::now();
                    return Some((Ok(Bytes::from(s)), st));
                }
            }
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Text of an OpenAI-style content value: string, null, or array of strings / {text} parts
/// (concatenated without separator; other parts ignored).
pub fn content_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|p| match p {
                Value::String(s) => Some(s.as_str()),
                Value::Object(o) => o.get("text").and_then(|t| t.as_str()),
                _ => None,
            })
            .collect(),
        _ => String::new(),
    }
}

/// JSON text of a tool-call arguments value (string kept verbatim, other JSON serialised).
pub fn arguments_text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "{}".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Parsed JSON arguments as a value (for Anthropic `input`), `{}` when not an object.
pub fn arguments_value(s: &str) -> Value {
    match serde_json::from_str::<Value>(s) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({}),
    }
}
