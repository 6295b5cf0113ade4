//! `ds4-server`: OpenAI (chat, completions, Responses) and Anthropic (Messages) compatible
//! HTTP API over the ds4 engine, for coding agents (Claude Code, Codex CLI, opencode).
//!
//! Layout: [`http`] (state, errors, auth, SSE), one module per API ([`openai`],
//! [`responses`], [`anthropic`]), and [`engine`], the single worker thread that owns the
//! model, the live KV session and the disk KV cache. Spec: shared/spec/protocol.md §4-§5.

mod anthropic;
mod engine;
mod http;
mod openai;
mod responses;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use serde_json::{json, Value};

use engine::{Engine, EngineConfig, Status, MODEL_ID};
use http::{check_auth, json_response, Api, ApiError, App, AppState};

#[derive(Parser, Debug)]
#[command(
    name = "ds4-server",
    version,
    about = "OpenAI / Anthropic / Responses compatible server for DeepSeek V4 Flash",
    after_help = "Endpoints: GET /health /metrics /v1/models /v1/models/{id}; POST /v1/chat/completions \
/v1/completions /v1/responses /v1/messages /v1/messages/count_tokens.\n\
With no model file at --model the server runs a SYNTHETIC demo model (random weights, real\n\
tokenizer: answers are noise). Real weights: huggingface-cli download antirez/deepseek-v4-gguf\n\
DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-chat-v2.gguf --local-dir . and pass it with -m."
)]
struct Args {
    /// Model file (GGUF). If it does not exist, the synthetic demo model is served.
    #[arg(short = 'm', long, default_value = "ds4flash.gguf")]
    model: PathBuf,
    /// Context size in tokens (prompt + output).
    #[arg(short = 'c', long, default_value_t = 32768, value_parser = clap::value_parser!(u64).range(16..))]
    ctx: u64,
    /// Default (and maximum) generated tokens when a request sets none; always clamped to
    /// the context that remains.
    #[arg(short = 'n', long, default_value_t = 393216, value_parser = clap::value_parser!(u64).range(1..))]
    tokens: u64,
    /// Compute backend: auto (CUDA when a usable GPU is found, else CPU), cpu or cuda.
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda")]
    backend: ds4::model::BackendChoice,
    /// CPU threads for the engine (0 = all cores).
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require this key as `Authorization: Bearer KEY` or `x-api-key: KEY` on /v1 routes.
    #[arg(long)]
    api_key: Option<String>,
    /// Add permissive CORS headers (browser clients).
    #[arg(long)]
    cors: bool,
    /// Maximum request body size in MiB (agent prompts with tool schemas are large).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    body_limit_mb: u64,
    /// Requests that may wait for the engine; beyond it requests get 429 + Retry-After.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    queue: u64,
    /// Seconds between SSE keep-alives while nothing else is sent (e.g. long prefills).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    keepalive_secs: u64,
    /// Directory of the disk KV cache (checkpoints survive restarts). Off when absent.
    #[arg(long)]
    kv_disk_dir: Option<PathBuf>,
    /// Disk KV cache budget in MiB.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    kv_disk_space_mb: u64,
    /// Shortest checkpoint written or used, in tokens.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    kv_cache_min_tokens: u64,
    /// Longest prompt that gets a cold checkpoint (0 disables cold checkpoints).
    #[arg(long, default_value_t = 30000)]
    kv_cache_cold_max_tokens: u64,
    /// Checkpoint the live session every N tokens (0 disables).
    #[arg(long, default_value_t = 10000)]
    kv_cache_continued_interval_tokens: u64,
    #[arg(long, default_value_t = 32)]
    kv_cache_boundary_trim_tokens: u64,
    #[arg(long, default_value_t = 2048)]
    kv_cache_boundary_align_tokens: u64,
    /// Render tool-call history canonically instead of replaying the sampled DSML bytes.
    #[arg(long)]
    disable_exact_dsml_tool_replay: bool,
    #[arg(long, default_value_t = 100000, value_parser = clap::value_parser!(u64).range(1..))]
    tool_memory_max_ids: u64,
    /// TEST-ONLY seam: FILE is a JSON array of strings. The k-th generation request (0-based,
    /// k mod array length) emits the tokens of the k-th string followed by end-of-sequence
    /// instead of sampling, through the normal tokenizer, streaming parser, tool-call mapping
    /// and usage accounting; prefill and KV caching still run for real. Exists because a
    /// random-weight model cannot produce tool calls or reasoning on demand.
    #[arg(long, value_name = "FILE")]
    test_output: Option<PathBuf>,
    /// TEST-ONLY: add N ms of extra delay per generated token (and per 8 prefilled tokens),
    /// to test disconnects, queueing and keep-alives deterministically.
    #[arg(long, default_value_t = 0, value_name = "N")]
    test_delay_ms: u64,
    /// Live KV sessions kept in memory. With 2 or more, a side request (an agent's title or
    /// summary request) does not destroy the agent's live session; each costs KV memory.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=16))]
    kv_slots: u64,
    /// Lock file that keeps one ds4 process per machine (two would each map the model).
    /// Default: $DS4_LOCK_FILE, else /tmp/ds4.lock. A second server exits with status 2.
    #[arg(long, value_name = "FILE")]
    lock_file: Option<PathBuf>,
    /// Layers of the synthetic demo model served when --model is missing (default: its
    /// full depth, 8). Fewer layers run faster (tests).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=64))]
    demo_layers: Option<u64>,
    /// Append a human-readable record of every request to FILE: the request, the KV cache
    /// decision (what was reused, and why not when nothing was), the rendered prompt, the
    /// generated text and the parsed message. For debugging agent sessions; it holds prompts
    /// in clear text.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
}

pub fn count_request(app: &App, kind: &str) {
    engine::Metrics::count(&app.engine.metrics().requests, kind);
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.kv_cache_cold_max_tokens != 0
        && args.kv_cache_cold_max_tokens < args.kv_cache_min_tokens
    {
        eprintln!("ds4-server: --kv-cache-cold-max-tokens must be 0 or >= --kv-cache-min-tokens");
        std::process::exit(2);
    }
    let lock_path = args
        .lock_file
        .clone()
        .or_else(|| std::env::var_os("DS4_LOCK_FILE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/tmp/ds4.lock"));
    let _lock = match take_lock(&lock_path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ds4-server: {e}");
            std::process::exit(2);
        }
    };
    let test_output = match &args.test_output {
        None => None,
        Some(p) => {
            let parsed = std::fs::read_to_string(p)
                .map_err(|e| e.to_string())
                .and_then(|s| serde_json::from_str::<Vec<String>>(&s).map_err(|e| e.to_string()));
            match parsed {
                Ok(v) => {
                    eprintln!(
                        "ds4-server: TEST MODE: outputs scripted by {} ({} strings)",
                        p.display(),
                        v.len()
                    );
                    Some(v)
                }
                Err(e) => {
                    eprintln!(
                        "ds4-server: --test-output {}: expected a JSON array of strings: {e}",
                        p.display()
                    );
                    std::process::exit(2);
                }
            }
        }
    };
    let trace = match &args.trace {
        None => None,
        Some(p) => match engine::trace::TraceFile::open(p) {
            Ok(t) => {
                eprintln!("ds4-server: tracing every request to {}", p.display());
                Some(t)
            }
            Err(e) => {
                eprintln!(
                    "ds4-server: --trace {}: cannot open for appending: {e}",
                    p.display()
                );
                std::process::exit(2);
            }
        },
    };
    if args.threads > 0 {
        // The engine's parallel kernels use the global rayon pool; size it before first use.
        std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    }
    let ctx = args.ctx as usize;
    let engine = Engine::start(EngineConfig {
        model_path: args.model.clone(),
        ctx,
        default_max_tokens: args.tokens as usize,
        queue: args.queue as usize,
        kv_disk_dir: args.kv_disk_dir.clone(),
        kv_disk_space_mb: args.kv_disk_space_mb,
        kv_min_tokens: args.kv_cache_min_tokens as usize,
        kv_cold_max_tokens: args.kv_cache_cold_max_tokens as usize,
        kv_continued_interval: args.kv_cache_continued_interval_tokens as usize,
        kv_boundary_trim: args.kv_cache_boundary_trim_tokens as usize,
        kv_boundary_align: args.kv_cache_boundary_align_tokens as usize,
        tool_memory_max_ids: args.tool_memory_max_ids as usize,
        exact_dsml_replay: !args.disable_exact_dsml_tool_replay,
        test_output,
        test_delay: Duration::from_millis(args.test_delay_ms),
        kv_slots: args.kv_slots as usize,
        demo_layers: args.demo_layers.map(|n| n as usize),
        backend: args.backend,
        trace,
    });
    let app: App = Arc::new(AppState {
        engine: engine.clone(),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        body_limit: (args.body_limit_mb as usize) << 20,
        started: Instant::now(),
        seq: AtomicU64::new(0),
        keepalive: Duration::from_secs(args.keepalive_secs),
    });
    let cors = args.cors;
    let router = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .fallback(not_found)
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            cors_layer(cors, req, next)
        }))
        .with_state(app.clone());

    let host = if args.host == "localhost" {
        "127.0.0.1"
    } else {
        args.host.as_str()
    };
    let addr: SocketAddr = match format!("{host}:{}", args.port).parse() {
        Ok(a) => a,
        Err(_) => match tokio::net::lookup_host((host, args.port))
            .await
            .ok()
            .and_then(|mut a| a.next())
        {
            Some(a) => a,
            None => {
                eprintln!("ds4-server: cannot resolve --host {}", args.host);
                std::process::exit(2);
            }
        },
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ds4-server: cannot listen on {addr}: {e}");
            std::process::exit(2);
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    eprintln!(
        "ds4-server: listening on http://{local} (ctx {ctx}, queue {}, body limit {} MiB{}{})",
        args.queue,
        args.body_limit_mb,
        if app.api_key.is_some() {
            ", api key required"
        } else {
            ""
        },
        if cors { ", CORS on" } else { "" },
    );
    let eng2 = engine.clone();
    let shutdown = async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            if let Ok(mut s) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                s.recv().await;
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {},
            _ = term => {},
        }
        eprintln!("ds4-server: shutting down");
        eng2.begin_shutdown();
    };
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
    {
        eprintln!("ds4-server: server error: {e}");
    }
    let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
    eprintln!("ds4-server: bye");
}

/// Takes the machine-wide lock (protocol.md §4.3): an exclusive `flock` on `path`, with this
/// process id written inside. Held until the process exits.
fn take_lock(path: &std::path::Path) -> Result<std::fs::File, String> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::io::AsRawFd;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("cannot open the lock file {}: {e}", path.display()))?;
    // SAFETY: flock on a file descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        let pid = pid.trim();
        return Err(format!(
            "another ds4 process{} holds {}: stop it first (or point --lock-file / \
             DS4_LOCK_FILE elsewhere if it really should run alongside)",
            if pid.is_empty() {
                String::new()
            } else {
                format!(" (pid {pid})")
            },
            path.display()
        ));
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = writeln!(f, "{}", std::process::id());
    Ok(f)
}

async fn cors_layer(cors: bool, req: Request, next: Next) -> Response {
    let mut resp = if req.method() == Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    if cors {
        let h = resp.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("*"),
        );
    }
    resp
}

async fn not_found(uri: Uri) -> Response {
    let api = if uri.path().starts_with("/v1/messages") {
        Api::Anthropic
    } else {
        Api::OpenAi
    };
    ApiError::new(
        StatusCode::NOT_FOUND,
        api,
        format!("unknown endpoint {}", uri.path()),
    )
    .into_response()
}

async fn health(State(app): State<App>) -> Response {
    match app.engine.status() {
        Status::Ready if !app.engine.is_shutting_down() => json_response(
            StatusCode::OK,
            &json!({"status": "ok", "model": MODEL_ID, "uptime_s": app.started.elapsed().as_secs()}),
        ),
        Status::Ready => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "shutting_down"}),
        ),
        Status::Loading => {
            let mut r = json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "loading"}),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        }
        Status::Failed(e) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "failed", "error": e}),
        ),
    }
}

fn model_object(app: &AppState) -> Value {
    let info = app.engine.info();
    let ctx = app.engine.ctx();
    let mut m = json!({
        "id": MODEL_ID,
        "object": "model",
        "created": 1767225600,
        "owned_by": "ds4-rs",
        "name": if info.demo { "DeepSeek V4 Flash (synthetic demo model)" } else { "DeepSeek V4 Flash" },
        "context_length": ctx,
        "backend": info.backend,
        "engine": info.engine,
        "demo": info.demo,
        "top_provider": {"context_length": ctx, "max_completion_tokens": app.engine.default_max_tokens().min(ctx), "is_moderated": false},
        "supported_parameters": ["tools", "tool_choice", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "stream", "reasoning_effort"],
    });
    if let Some(n) = info.note {
        m["note"] = json!(n);
    }
    m
}

async fn models(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Err(e) = check_auth(&app, &headers, Api::OpenAi) {
        return e.into_response();
    }
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [model_object(&app)]}),
    )
}

async fn model_by_id(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = check_auth(&app, &headers, Api::OpenAi) {
        return e.into_response();
    }
    if id == MODEL_ID {
        json_response(StatusCode::OK, &model_object(&app))
    } else {
        let mut e = ApiError::new(
            StatusCode::NOT_FOUND,
            Api::OpenAi,
            format!("The model '{id}' does not exist"),
        );
        e.code = Some("model_not_found");
        e.into_response()
    }
}

async fn metrics(State(app): State<App>) -> Response {
    use std::fmt::Write;
    let m = app.engine.metrics();
    let mut s = String::new();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let _ = writeln!(s, "# HELP ds4_requests_total Generation requests accepted, by endpoint.\n# TYPE ds4_requests_total counter");
    for (k, v) in m.requests.lock().unwrap().iter() {
        let _ = writeln!(s, "ds4_requests_total{{endpoint=\"{k}\"}} {v}");
    }
    for (name, help, v) in [
        (
            "ds4_prompt_tokens_total",
            "Prompt tokens of finished prefills (cached included).",
            load(&m.prompt_tokens),
        ),
        (
            "ds4_cached_prompt_tokens_total",
            "Prompt tokens served from the KV cache.",
            load(&m.cached_tokens),
        ),
        (
            "ds4_completion_tokens_total",
            "Generated tokens.",
            load(&m.completion_tokens),
        ),
        (
            "ds4_kv_disk_stores_total",
            "Checkpoints written to the disk KV cache.",
            load(&m.disk_stores),
        ),
    ] {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
    let rate = |tok: u64, us: u64| {
        if us == 0 {
            0.0
        } else {
            tok as f64 / (us as f64 / 1e6)
        }
    };
    let _ = writeln!(s, "# HELP ds4_prefill_tokens_per_second Average prefill speed.\n# TYPE ds4_prefill_tokens_per_second gauge\nds4_prefill_tokens_per_second {:.3}", rate(load(&m.prefill_tokens), load(&m.prefill_us)));
    let _ = writeln!(s, "# HELP ds4_decode_tokens_per_second Average decode speed.\n# TYPE ds4_decode_tokens_per_second gauge\nds4_decode_tokens_per_second {:.3}", rate(load(&m.decode_tokens), load(&m.decode_us)));
    let _ = writeln!(s, "# HELP ds4_cache_hits_total KV reuse decisions by kind (responses-visible, responses-tool-output, anthropic-tool-output, memory-token, thinking-visible, memory-text, disk-text, cold; conflict: a 409, the live tool state was gone).\n# TYPE ds4_cache_hits_total counter");
    for (k, v) in m.cache_hits.lock().unwrap().iter() {
        let _ = writeln!(s, "ds4_cache_hits_total{{kind=\"{k}\"}} {v}");
    }
    let _ = writeln!(s, "# HELP ds4_queue_depth Requests waiting for the engine.\n# TYPE ds4_queue_depth gauge\nds4_queue_depth {}", m.queue_depth.load(Ordering::Relaxed));
    let _ = writeln!(
        s,
        "# HELP ds4_running Requests being generated.\n# TYPE ds4_running gauge\nds4_running {}",
        m.running.load(Ordering::Relaxed)
    );
    if let Some((bytes, files)) = app.engine.disk_usage() {
        let _ = writeln!(s, "# HELP ds4_kv_disk_bytes Disk KV cache size.\n# TYPE ds4_kv_disk_bytes gauge\nds4_kv_disk_bytes {bytes}\n# HELP ds4_kv_disk_files Disk KV cache files.\n# TYPE ds4_kv_disk_files gauge\nds4_kv_disk_files {files}");
    }
    let mut r = Response::new(axum::body::Body::from(s));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}
