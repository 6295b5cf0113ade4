//! The engine worker: the one thread that owns the model, the live session and the disk KV
//! cache, fed by a bounded queue. The HTTP layer talks to it only through the types of this
//! module ([`Engine`], [`PromptInput`], [`Job`], [`Event`]); it never sees engine types.
//!
//! The engine is the real one: `ds4::model::Session` (live KV reuse by token prefix, snapshot /
//! restore for the disk cache), prompts rendered by `ds4::chat::render` (the official encoder,
//! mapped from API requests in [`render`]) and tokenized with `encode_with_specials`, output
//! projected by `ds4::chat::StreamParser`, sampling by `ds4::sample`.

pub mod kvdisk;
pub mod render;
pub mod trace;

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use ds4::chat::{StreamEvent, StreamParser, SyntaxState, ThinkingMode};
use ds4::model::{BackendChoice, EngineOptions, Model, Session};
use ds4::sample::{Sampler, SamplerConfig};
use ds4::tokenizer::{EncodeMode, Tokenizer};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use kvdisk::{DiskCache, Reason};
use trace::{Record, TraceFile, TraceHead};

pub const MODEL_ID: &str = "deepseek-v4-flash";
/// Think Max is applied only with at least this much context (protocol.md §2.1).
pub const THINK_MAX_MIN_CTX: usize = 393_216;

// ---------------------------------------------------------------------------------------
// Request-side types (built by the API layer)
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text of the arguments object.
    pub arguments: String,
}

/// One message of a conversation, API-independent.
#[derive(Debug, Clone)]
pub struct Msg {
    pub role: Role,
    pub content: String,
    pub reasoning: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub tool_call_id: Option<String>,
    /// Exact sampled DSML block for `tool_calls` (set from tool memory before rendering).
    pub raw_dsml: Option<String>,
}

impl Msg {
    pub fn text(role: Role, content: impl Into<String>) -> Msg {
        Msg {
            role,
            content: content.into(),
            reasoning: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
            raw_dsml: None,
        }
    }
}

/// What to render.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Chat {
        messages: Vec<Msg>,
        /// Tool function objects (`{name, description, parameters}`), in order.
        tools: Vec<Value>,
        thinking: bool,
        think_max: bool,
        /// Responses and Messages: the tool outputs' claim on a live tool-call turn.
        outputs: Option<ToolOutputs>,
    },
    /// Legacy completions: the prompt is wrapped in the default chat template (§2.8).
    Completion {
        prompt: String,
        thinking: bool,
        think_max: bool,
    },
}

/// The API whose live tool-call binding (protocol.md §5.3) a request may continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolApi {
    Responses,
    Anthropic,
}

impl ToolApi {
    /// The `cache_source` of a request that continues the binding (§5.2 steps 2, 3).
    pub fn source(self) -> &'static str {
        match self {
            ToolApi::Responses => "responses-tool-output",
            ToolApi::Anthropic => "anthropic-tool-output",
        }
    }

    /// The HTTP 409 message (§4.9) for a request that needs live tool state that is gone.
    pub fn conflict(self) -> &'static str {
        match self {
            ToolApi::Responses => {
                "Responses continuation state is not available; retry by replaying the full \
                 input history"
            }
            ToolApi::Anthropic => {
                "Anthropic continuation state is not available; retry by replaying the full \
                 messages history"
            }
        }
    }
}

/// What a Responses or Messages request's tool outputs claim of the live session, recorded
/// when the request is parsed (protocol.md §5.3, last bullet).
#[derive(Debug, Clone)]
pub struct ToolOutputs {
    pub api: ToolApi,
    /// The trailing tool outputs, with any user text after them (`messages[tail]`); empty
    /// when the request does not end with tool outputs.
    pub tail: Range<usize>,
    /// The call-id set those outputs answer (no duplicates): the calls of the assistant
    /// message before them (Responses), the outputs' own ids otherwise.
    pub ids: Vec<String>,
    /// Some output answers a call the request does not replay: only the live session knows
    /// it (§5.2 step 4).
    pub needs_live: bool,
}

/// [`ToolOutputs`] rendered: the live-tail suffix (§2.9) that appends the trailing outputs to
/// a live session stopped at the end of the calls' block.
#[derive(Debug, Clone)]
pub struct LiveTail {
    pub api: ToolApi,
    /// Empty when the request does not end with tool outputs (no suffix).
    pub ids: Vec<String>,
    pub text: String,
    pub tokens: Vec<u32>,
    pub needs_live: bool,
}

/// A rendered and tokenized prompt.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub text: String,
    pub specials: Vec<Range<usize>>,
    pub tokens: Vec<u32>,
    pub thinking: bool,
    /// Think Max was rendered (asked for and the context allows it, §2.1).
    pub think_max: bool,
    /// Chat kind: output is split into reasoning / content / tool calls.
    pub chat: bool,
    /// Names of the tools rendered into the prompt (the only calls the model may make).
    pub tool_names: Vec<String>,
    /// How the history's tool calls were rendered (exact DSML replay), for `--trace`.
    pub replay: ToolReplay,
    /// Responses and Messages: the live-tail continuation of the request's tool outputs.
    pub tail: Option<LiveTail>,
}

/// Exact DSML replay of a prompt's assistant tool-call turns (protocol.md §2.9): turns
/// rendered from their sampled bytes (`mem`), call ids whose bytes were loaded from the disk
/// cache's tool maps for it (`disk`), turns rendered canonically, and the ids found nowhere.
#[derive(Debug, Clone, Default)]
pub struct ToolReplay {
    pub mem: usize,
    pub disk: usize,
    pub canonical: usize,
    pub missing_ids: Vec<String>,
}

/// A generation request for the worker.
pub struct Job {
    pub prepared: Prepared,
    pub max_tokens: Option<u64>,
    pub sampling: SamplerConfig,
    pub stop: Vec<String>,
    /// Tools declared and not disabled by tool_choice (greedy DSML structure applies).
    pub tools_active: bool,
    /// Prefix of generated tool-call ids: "call_" (OpenAI) or "toolu_" (Anthropic).
    pub call_id_prefix: &'static str,
    pub events: UnboundedSender<Event>,
    pub cancel: Arc<AtomicBool>,
    /// Set when `--trace` is on: the request as the HTTP layer saw it.
    pub trace: Option<TraceHead>,
    /// Which live binding (protocol.md §5.3) the request may continue and leaves behind.
    pub bindings: Bindings,
}

/// The live protocol bindings of an API (protocol.md §5.3): after a turn, the text the
/// client's next request will render for the conversation so far, where that differs from
/// what the live session holds (reasoning the client does not send back), so the next request
/// continues the live session instead of prefilling the conversation again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bindings {
    /// Legacy completions: none.
    None,
    /// Chat Completions: the toolless-thinking binding (§5.2 step 6).
    Thinking,
    /// Messages: the toolless-thinking binding, and after a tool-call turn its call ids
    /// (§5.2 step 3).
    Messages,
    /// Responses (§5.2 step 1). `echo_reasoning`: reasoning is returned to the client
    /// (summaries or encrypted content), so a turn with calls renders it next time.
    Responses { echo_reasoning: bool },
}

impl Bindings {
    /// The binding kind a request of this API continues (its `cache_source`).
    fn kind(self) -> Option<&'static str> {
        match self {
            Bindings::None => None,
            Bindings::Thinking | Bindings::Messages => Some("thinking-visible"),
            Bindings::Responses { .. } => Some("responses-visible"),
        }
    }

    /// The API whose tool-call turns leave a call-id binding (§5.2 steps 2, 3).
    fn tool_api(self) -> Option<ToolApi> {
        match self {
            Bindings::Messages => Some(ToolApi::Anthropic),
            Bindings::Responses { .. } => Some(ToolApi::Responses),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    ToolCalls,
    Error,
}

impl Finish {
    pub fn openai(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::ToolCalls => "tool_calls",
            Finish::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: usize,
    pub cached: usize,
    pub completion: usize,
}

/// The final, authoritative result of a job.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub raw: String,
    pub reasoning: Option<String>,
    pub content: String,
    pub calls: Vec<ToolCall>,
    pub finish: Finish,
    pub usage: Usage,
    /// The reasoning block was closed by `</think>`.
    pub reasoning_closed: bool,
}

/// What the worker reports while running a job, in order.
#[derive(Debug, Clone)]
pub enum Event {
    /// Prefill progress (tokens done of total): the stream may send a keep-alive.
    Prefill {
        done: usize,
        total: usize,
    },
    /// The KV prefix lookup is done (sent before prefill): the prompt's token count and how
    /// many of them are reused from a cache. The final usage reports the same numbers.
    Prompt {
        prompt_tokens: usize,
        cached: usize,
    },
    /// The request needs live tool state that is gone (§5.2 step 4): HTTP 409 with this
    /// message. Sent instead of `Prompt`.
    Conflict(String),
    /// Prefill finished; generation starts.
    Started {
        prompt_tokens: usize,
        cached: usize,
    },
    Reasoning(String),
    ReasoningDone,
    Content(String),
    ToolStart {
        index: usize,
        id: String,
        name: String,
    },
    ToolArgs {
        index: usize,
        fragment: String,
    },
    Done(Box<Outcome>),
    /// The job failed before producing an outcome.
    Failed(String),
}

#[derive(Debug)]
pub enum SubmitError {
    Loading,
    /// The prompt cannot be rendered (input the official encoder rejects).
    BadRequest(String),
    QueueFull,
    ShuttingDown,
}

// ---------------------------------------------------------------------------------------
// Configuration and shared state
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    pub ctx: usize,
    pub default_max_tokens: usize,
    pub queue: usize,
    pub kv_disk_dir: Option<PathBuf>,
    pub kv_disk_space_mb: u64,
    pub kv_min_tokens: usize,
    pub kv_cold_max_tokens: usize,
    pub kv_continued_interval: usize,
    pub kv_boundary_trim: usize,
    pub kv_boundary_align: usize,
    pub tool_memory_max_ids: usize,
    pub exact_dsml_replay: bool,
    pub test_output: Option<Vec<String>>,
    pub test_delay: Duration,
    /// Live KV sessions kept in memory (an agent's session survives a side request).
    pub kv_slots: usize,
    /// Layers of the synthetic demo model (None = its full depth).
    pub demo_layers: Option<usize>,
    /// Compute backend wanted (auto = CUDA when usable, else CPU).
    pub backend: BackendChoice,
    /// `--trace FILE`: every request recorded there (protocol.md §4.11).
    pub trace: Option<TraceFile>,
}

/// What /v1/models and the startup banner say about the model.
#[derive(Debug, Clone, Default)]
pub struct ModelInfo {
    pub backend: String,
    pub engine: String,
    pub demo: bool,
    pub note: Option<String>,
    pub quant_bits: u8,
}

#[derive(Default)]
pub struct Metrics {
    pub requests: Mutex<HashMap<String, u64>>,
    pub errors: Mutex<HashMap<String, u64>>,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub prefill_tokens: AtomicU64,
    pub prefill_us: AtomicU64,
    pub decode_tokens: AtomicU64,
    pub decode_us: AtomicU64,
    pub cache_hits: Mutex<HashMap<&'static str, u64>>,
    pub queue_depth: AtomicUsize,
    pub running: AtomicUsize,
    pub disk_stores: AtomicU64,
}

impl Metrics {
    pub fn count(map: &Mutex<HashMap<String, u64>>, key: &str) {
        *map.lock().unwrap().entry(key.to_string()).or_default() += 1;
    }
}

/// id -> exact DSML block, bounded (oldest ids dropped first).
#[derive(Default)]
struct ToolMemory {
    map: HashMap<String, Arc<str>>,
    order: VecDeque<String>,
}

impl ToolMemory {
    fn insert(&mut self, id: String, block: Arc<str>, cap: usize) {
        if self.map.insert(id.clone(), block).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Loading,
    Ready,
    Failed(String),
}

struct Shared {
    cfg: EngineConfig,
    status: RwLock<Status>,
    tokenizer: OnceLock<Arc<Tokenizer>>,
    info: RwLock<ModelInfo>,
    tool_memory: Mutex<ToolMemory>,
    /// The call ids of the live tool-call bindings (§5.3), as the worker last published them.
    live_calls: Mutex<Vec<(ToolApi, Vec<String>)>>,
    disk: OnceLock<Option<Arc<DiskCache>>>,
    metrics: Metrics,
    shutting_down: AtomicBool,
    gen_counter: AtomicUsize,
}

enum WorkerMsg {
    Job(Box<Job>),
    Shutdown,
}

/// Cheap-to-clone handle used by the HTTP layer.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    tx: SyncSender<WorkerMsg>,
    worker: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Engine {
    /// Starts the worker thread; the model loads in the background (status Loading).
    pub fn start(cfg: EngineConfig) -> Engine {
        let (tx, rx) = sync_channel(cfg.queue.max(1));
        let shared = Arc::new(Shared {
            cfg,
            status: RwLock::new(Status::Loading),
            tokenizer: OnceLock::new(),
            info: RwLock::new(ModelInfo::default()),
            tool_memory: Mutex::new(ToolMemory::default()),
            live_calls: Mutex::new(Vec::new()),
            disk: OnceLock::new(),
            metrics: Metrics::default(),
            shutting_down: AtomicBool::new(false),
            gen_counter: AtomicUsize::new(0),
        });
        let s2 = shared.clone();
        let handle = std::thread::Builder::new()
            .name("ds4-engine".into())
            .spawn(move || worker_main(s2, rx))
            .expect("spawn engine worker");
        Engine {
            shared,
            tx,
            worker: Arc::new(Mutex::new(Some(handle))),
        }
    }

    pub fn status(&self) -> Status {
        self.shared.status.read().unwrap().clone()
    }

    pub fn info(&self) -> ModelInfo {
        self.shared.info.read().unwrap().clone()
    }

    pub fn ctx(&self) -> usize {
        self.shared.cfg.ctx
    }

    pub fn default_max_tokens(&self) -> usize {
        self.shared.cfg.default_max_tokens
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn disk_usage(&self) -> Option<(u64, usize)> {
        self.shared
            .disk
            .get()
            .and_then(|d| d.as_ref())
            .map(|d| d.usage())
    }

    /// Is `--trace` on (the HTTP layer then attaches a [`TraceHead`] to each job)?
    pub fn tracing(&self) -> bool {
        self.shared.cfg.trace.is_some()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::SeqCst)
    }

    /// Renders and tokenizes a prompt (blocking; call from a blocking thread). Applies exact
    /// DSML replay from tool memory (and the disk cache's tool maps) first.
    pub fn prepare(&self, input: PromptInput) -> Result<Prepared, SubmitError> {
        let tok = self.shared.tokenizer.get().ok_or(SubmitError::Loading)?;
        let mut tool_names = Vec::new();
        let mut replay = ToolReplay::default();
        let mut tail = None;
        let (rendered, thinking, think_max, chat) = match input {
            PromptInput::Chat {
                mut messages,
                tools,
                thinking,
                think_max,
                outputs,
            } => {
                if self.shared.cfg.exact_dsml_replay {
                    replay = self.apply_tool_memory(&mut messages);
                }
                let think_max = think_max && self.shared.cfg.ctx >= THINK_MAX_MIN_CTX;
                let r = render::render_chat(&messages, &tools, thinking, think_max)
                    .map_err(SubmitError::BadRequest)?;
                if let Some(o) = outputs {
                    tail = Some(live_tail(tok, o, &messages, &tools, thinking)?);
                }
                tool_names = tools
                    .iter()
                    .filter_map(|t| t.get("name").and_then(|n| n.as_str()))
                    .map(str::to_string)
                    .collect();
                (r, thinking, think_max, true)
            }
            PromptInput::Completion {
                prompt,
                thinking,
                think_max,
            } => {
                let think_max = think_max && self.shared.cfg.ctx >= THINK_MAX_MIN_CTX;
                let r = render::render_completion(&prompt, thinking, think_max)
                    .map_err(SubmitError::BadRequest)?;
                (r, thinking, think_max, false)
            }
        };
        let ds4::chat::RenderedPrompt { text, specials } = rendered;
        let tokens = tok.encode_with_specials(&text, &specials);
        Ok(Prepared {
            text,
            specials,
            tokens,
            thinking,
            think_max: thinking && think_max,
            chat,
            tool_names,
            replay,
            tail,
        })
    }

    fn apply_tool_memory(&self, messages: &mut [Msg]) -> ToolReplay {
        let mut replay = ToolReplay::default();
        let ids: HashSet<String> = messages
            .iter()
            .flat_map(|m| m.tool_calls.iter().map(|c| c.id.clone()))
            .collect();
        if ids.is_empty() {
            return replay;
        }
        let mut found: HashMap<String, Arc<str>> = HashMap::new();
        {
            let mem = self.shared.tool_memory.lock().unwrap();
            for id in &ids {
                if let Some(b) = mem.map.get(id) {
                    found.insert(id.clone(), b.clone());
                }
            }
        }
        let missing: HashSet<String> = ids
            .iter()
            .filter(|i| !found.contains_key(*i))
            .cloned()
            .collect();
        if !missing.is_empty() {
            if let Some(Some(disk)) = self.shared.disk.get() {
                let mut mem = self.shared.tool_memory.lock().unwrap();
                for (id, dsml) in disk.tool_map_for(&missing) {
                    let b: Arc<str> = dsml.into();
                    replay.disk += 1;
                    mem.insert(id.clone(), b.clone(), self.shared.cfg.tool_memory_max_ids);
                    found.insert(id, b);
                }
            }
        }
        for m in messages.iter_mut() {
            if m.role != Role::Assistant || m.tool_calls.is_empty() {
                continue;
            }
            let blocks: Vec<Option<&Arc<str>>> =
                m.tool_calls.iter().map(|c| found.get(&c.id)).collect();
            if let Some(Some(first)) = blocks.first() {
                if blocks
                    .iter()
                    .all(|b| b.is_some_and(|b| Arc::ptr_eq(b, first) || b == *first))
                {
                    m.raw_dsml = Some(first.to_string());
                    replay.mem += 1;
                    continue;
                }
            }
            replay.canonical += 1;
        }
        let mut missing: Vec<String> = ids.into_iter().filter(|i| !found.contains_key(i)).collect();
        missing.sort();
        replay.missing_ids = missing;
        replay
    }

    /// Is `id` a call of a live tool-call turn of `api` (protocol.md §5.3)? Tool outputs may
    /// answer such a call without replaying it (§4.7, §4.8).
    pub fn is_live_call(&self, api: ToolApi, id: &str) -> bool {
        let live = self.shared.live_calls.lock().unwrap();
        live.iter()
            .any(|(a, ids)| *a == api && ids.iter().any(|i| i == id))
    }

    /// Queues a job; fails at once when loading, shutting down or the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if self.is_shutting_down() {
            return Err(SubmitError::ShuttingDown);
        }
        if self.status() != Status::Ready {
            return Err(SubmitError::Loading);
        }
        let m = &self.shared.metrics;
        m.queue_depth.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(WorkerMsg::Job(Box::new(job))) {
            Ok(()) => Ok(()),
            Err(e) => {
                m.queue_depth.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull,
                    TrySendError::Disconnected(_) => SubmitError::ShuttingDown,
                })
            }
        }
    }

    /// Marks the server as stopping: new jobs get 503 and running generations end.
    pub fn begin_shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Stops the worker: running generations end, the live session is checkpointed
    /// (`shutdown`), then the thread exits. Blocking.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let _ = self.tx.send(WorkerMsg::Shutdown);
        if let Some(h) = self.worker.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

/// Renders and tokenizes the live-tail suffix of a request's trailing tool outputs.
fn live_tail(
    tok: &Tokenizer,
    o: ToolOutputs,
    messages: &[Msg],
    tools: &[Value],
    thinking: bool,
) -> Result<LiveTail, SubmitError> {
    let (text, tokens) = match messages.get(o.tail.clone()) {
        Some(tail) if !tail.is_empty() && !o.ids.is_empty() => {
            let r = render::live_suffix(tail, &o.ids, tools, thinking)
                .map_err(SubmitError::BadRequest)?;
            let tokens = tok.encode_with_specials(&r.text, &r.specials);
            (r.text, tokens)
        }
        _ => (String::new(), Vec::new()),
    };
    Ok(LiveTail {
        api: o.api,
        ids: if tokens.is_empty() { Vec::new() } else { o.ids },
        text,
        tokens,
        needs_live: o.needs_live,
    })
}

/// §5.2 steps 2 and 3: the tool outputs answer exactly the live turn's calls (same set, same
/// count; neither side has duplicates).
fn same_ids(live: &[String], asked: &[String]) -> bool {
    !live.is_empty() && live.len() == asked.len() && live.iter().all(|id| asked.contains(id))
}

// ---------------------------------------------------------------------------------------
// Worker
// ---------------------------------------------------------------------------------------

const REAL_WEIGHTS_FILE: &str = "DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-chat-v2.gguf";

/// The command that fetches real weights (about 81 GiB) and serves them.
pub fn real_weights_hint() -> String {
    format!(
        "huggingface-cli download antirez/deepseek-v4-gguf {REAL_WEIGHTS_FILE} --local-dir . \
         && ds4-server -m {REAL_WEIGHTS_FILE}"
    )
}

struct Loaded {
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    info: ModelInfo,
    /// Session options with the backend resolved (cpu or cuda).
    opts: EngineOptions,
}

/// Resolves the backend once: with CUDA wanted, uploads the weights (progress logged);
/// `auto` falls back to the CPU with the reason, an explicit `cuda` fails startup.
fn resolve_backend(model: &Model, choice: BackendChoice) -> Result<BackendChoice, String> {
    if choice == BackendChoice::Cpu {
        return Ok(BackendChoice::Cpu);
    }
    let t0 = Instant::now();
    let mut last = 0usize;
    let r = model.upload_cuda(&mut |done, total| {
        let pct = done * 100 / total.max(1);
        if pct >= last + 10 || done == total {
            last = pct;
            eprintln!("ds4-server: uploading weights to the GPU: {pct}%");
        }
    });
    match r {
        Ok(_) => {
            eprintln!(
                "ds4-server: weights on the GPU ({:.1} s)",
                t0.elapsed().as_secs_f64()
            );
            Ok(BackendChoice::Cuda)
        }
        Err(why) if choice == BackendChoice::Auto => {
            eprintln!("ds4-server: CUDA not used ({why}); running on the CPU");
            Ok(BackendChoice::Cpu)
        }
        Err(why) => Err(format!("--backend cuda: {why}")),
    }
}

fn load(shared: &Shared) -> Result<Loaded, String> {
    let cfg = &shared.cfg;
    let path = &cfg.model_path;
    let t0 = Instant::now();
    let model = if path.exists() {
        eprintln!("ds4-server: loading {}", path.display());
        Model::open(path)?
    } else {
        let mut o = ds4::synth::SynthOptions::new(ds4::synth::Profile::Demo);
        o.layers = cfg.demo_layers;
        let file = ds4::synth::build_in_memory(&o)?;
        Model::from_gguf(file)?
    };
    let model = Arc::new(model);
    let synthetic = model
        .file
        .get(ds4::synth::SYNTHETIC_KEY)
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let tok = Tokenizer::from_gguf(&model.file).map_err(|e| format!("tokenizer: {e}"))?;
    let opts = EngineOptions::production()
        .with_ctx(cfg.ctx)
        .with_backend(resolve_backend(&model, cfg.backend)?);
    // Validates the context (and the backend) before the server says it is ready; the
    // backend reported in /v1/models is the one this session runs on.
    let probe = Session::new(model.clone(), opts.clone()).map_err(|e| e.to_string())?;
    let backend = probe.backend().name().to_string();
    drop(probe);
    // A server lives long: pay the GPU's first-use costs now, not in the first request. A
    // failure here (say, too little GPU memory for a full chunk) is not fatal: requests
    // still run, and say so themselves if they cannot.
    match Session::warm_up(model.clone(), &opts) {
        Ok(Some(took)) => eprintln!(
            "ds4-server: GPU warmed up ({:.2} s: one prefill chunk, one decode step)",
            took.as_secs_f64()
        ),
        Ok(None) => {}
        Err(e) => eprintln!("ds4-server: warning: GPU warm-up failed ({e}); continuing"),
    }
    let experts = model.expert_types().0.name();
    let quant_bits = if experts.to_ascii_lowercase().contains("q4") {
        4
    } else {
        2
    };
    let engine = format!(
        "ds4-rs {} ({}, {} layers, routed experts {experts}; {backend} backend{})",
        env!("CARGO_PKG_VERSION"),
        model.cfg.profile_name(),
        model.cfg.n_layer,
        if backend == "cpu" {
            format!(", {} threads", rayon_threads())
        } else {
            String::new()
        },
    );
    eprintln!(
        "ds4-server: model ready in {:.1} s: {engine}; context {} tokens",
        t0.elapsed().as_secs_f64(),
        cfg.ctx
    );
    let note = synthetic.then(|| {
        let why = if path.exists() {
            format!("{} is a synthetic model", path.display())
        } else {
            format!("no model file at {}", path.display())
        };
        format!(
            "{why}: serving a synthetic DS4-architecture demo model (random weights, the \
             real tokenizer). Its answers are noise; the API, tool calling, KV cache and \
             streaming are real. Get real weights: {}",
            real_weights_hint()
        )
    });
    if let Some(n) = &note {
        let bar = "=".repeat(78);
        eprintln!("ds4-server: {bar}");
        eprintln!(
            "ds4-server: SYNTHETIC RANDOM-WEIGHT MODEL: answers are noise (demo / testing only)"
        );
        eprintln!("ds4-server: {n}");
        eprintln!("ds4-server: {bar}");
    }
    Ok(Loaded {
        model,
        tok: Arc::new(tok),
        info: ModelInfo {
            backend,
            engine,
            demo: synthetic,
            note,
            quant_bits,
        },
        opts,
    })
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

fn worker_main(shared: Arc<Shared>, rx: Receiver<WorkerMsg>) {
    let loaded = match load(&shared) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("ds4-server: failed to load the model: {e}");
            *shared.status.write().unwrap() = Status::Failed(e);
            std::process::exit(1);
        }
    };
    let disk = shared.cfg.kv_disk_dir.as_ref().and_then(|d| {
        match DiskCache::open(d, shared.cfg.kv_disk_space_mb, loaded.info.quant_bits) {
            Ok(c) => {
                let (bytes, n) = c.usage();
                eprintln!(
                    "ds4-server: kv disk cache {} ({n} files, {bytes} bytes, budget {} MiB)",
                    d.display(),
                    shared.cfg.kv_disk_space_mb
                );
                Some(Arc::new(c))
            }
            Err(e) => {
                eprintln!("ds4-server: kv disk cache {} disabled: {e}", d.display());
                None
            }
        }
    });
    let _ = shared.disk.set(disk.clone());
    let _ = shared.tokenizer.set(loaded.tok.clone());
    *shared.info.write().unwrap() = loaded.info;
    *shared.status.write().unwrap() = Status::Ready;
    let mut w = Worker {
        eos: loaded.tok.specials().eos,
        tok: loaded.tok,
        opts: loaded.opts,
        model: loaded.model,
        slots: (0..shared.cfg.kv_slots.max(1)).map(|_| None).collect(),
        disk,
        clock: 0,
        rec: None,
        shared: shared.clone(),
    };
    while let Ok(msg) = rx.recv() {
        match msg {
            WorkerMsg::Job(job) => {
                shared.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
                shared.metrics.running.fetch_add(1, Ordering::SeqCst);
                let events = job.events.clone();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run(*job)));
                if r.is_err() {
                    w.slots.iter_mut().for_each(|s| *s = None);
                    w.publish_live_calls();
                    let _ = events.send(Event::Failed("internal error in the engine".into()));
                }
                shared.metrics.running.fetch_sub(1, Ordering::SeqCst);
            }
            WorkerMsg::Shutdown => break,
        }
    }
    // Fail whatever is still queued, then write the shutdown checkpoints.
    while let Ok(WorkerMsg::Job(job)) = rx.try_recv() {
        shared.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
        let _ = job
            .events
            .send(Event::Failed("server shutting down".into()));
    }
    for i in 0..w.slots.len() {
        w.checkpoint(i, Reason::Shutdown);
    }
}

/// One live KV session.
struct Slot {
    session: Session,
    /// Token count of the last checkpoint of this session written to disk.
    last_stored: usize,
    /// Worker clock of the last request served (least recently used is replaced first).
    used: u64,
    /// The live binding (protocol.md §5.3) of the last turn, if any: the text the next
    /// request renders for this conversation so far (without the reasoning it drops), valid
    /// while the session holds exactly `frontier` tokens. It lets that request keep the
    /// hidden reasoning's KV instead of prefilling the whole conversation again.
    binding: Option<Binding>,
}

struct Binding {
    /// The visible text and its kind, `thinking-visible` or `responses-visible`
    /// ([`Bindings::kind`]), if the next request may continue the session by it.
    visible: Option<(&'static str, String)>,
    /// A tool-call turn's API and call ids (§5.2 steps 2, 3).
    calls: Option<(ToolApi, Vec<String>)>,
    frontier: usize,
}

/// Why no KV state was chosen for a request.
enum NoPlan {
    /// It needs live tool state that is gone (§5.2 step 4): HTTP 409 with this message.
    Conflict(&'static str),
    Engine(String),
}

struct Worker {
    shared: Arc<Shared>,
    model: Arc<Model>,
    opts: EngineOptions,
    tok: Arc<Tokenizer>,
    eos: u32,
    slots: Vec<Option<Slot>>,
    disk: Option<Arc<DiskCache>>,
    clock: u64,
    /// The running request's `--trace` record (None when tracing is off).
    rec: Option<Record>,
}

fn random_hex(n_bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; n_bytes];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if !ok {
        static SEQ: AtomicU64 = AtomicU64::new(1);
        let mut x = SEQ.fetch_add(1, Ordering::Relaxed)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7);
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn new_call_id(prefix: &str) -> String {
    format!("{prefix}{}", random_hex(16))
}

pub fn new_item_id(prefix: &str) -> String {
    format!("{prefix}{}", random_hex(12))
}

/// Turns parser events into job events, and remembers what was streamed.
struct Projection<'a> {
    parser: Option<StreamParser>,
    thinking: bool,
    send: &'a dyn Fn(Event),
    call_prefix: &'static str,
    /// Ids given to calls streamed live, by call index.
    ids: Vec<String>,
    reasoning_closed: bool,
    streamed_reasoning: String,
    streamed_content: String,
    calls_started: usize,
    calls_ended: usize,
    malformed: bool,
    /// Where to look for the block end tag next.
    scan_from: usize,
    /// The request offered tools: DSML blocks become tool calls. Without tools a block is
    /// plain assistant text (see `verbatim`).
    tools: bool,
    /// Tools off and a DSML block started: from here on every generated byte is content.
    verbatim: bool,
    /// Chat kind with thinking off: a stray `</think>` from the model is dropped, never used
    /// to split the text (the prompt already closed the reasoning block).
    strip_think_end: bool,
    /// A partial `</think>` held back by `strip_think_end` until the next bytes decide it.
    held: String,
    /// Tools the request offered (calls to other names are not returned as calls).
    offered: &'a [String],
    /// Indexes of calls to tools that were not offered (dropped, see `handle`).
    skipped: HashSet<usize>,
}

impl<'a> Projection<'a> {
    /// A projection of one request's generation: its settings, with nothing streamed yet.
    fn new(
        parser: Option<StreamParser>,
        thinking: bool,
        send: &'a dyn Fn(Event),
        call_prefix: &'static str,
        tools: bool,
        strip_think_end: bool,
        offered: &'a [String],
    ) -> Self {
        Projection {
            parser,
            thinking,
            send,
            call_prefix,
            ids: Vec::new(),
            reasoning_closed: false,
            streamed_reasoning: String::new(),
            streamed_content: String::new(),
            calls_started: 0,
            calls_ended: 0,
            malformed: false,
            scan_from: 0,
            tools,
            verbatim: false,
            strip_think_end,
            held: String::new(),
            offered,
            skipped: HashSet::new(),
        }
    }

    fn close_reasoning(&mut self) {
        if self.thinking && !self.reasoning_closed {
            self.reasoning_closed = true;
            (self.send)(Event::ReasoningDone);
        }
    }

    /// Feeds generated text; true when a complete tool-call block has been generated.
    /// `last`: no more text follows (flushes what the `</think>` filter held back).
    fn push(&mut self, text: &str, last: bool) -> bool {
        let filtered;
        let text = if self.strip_think_end {
            self.held.push_str(text);
            let mut t = std::mem::take(&mut self.held).replace(ds4::chat::THINK_END, "");
            if !last {
                let end = ds4::chat::THINK_END;
                if let Some(k) = (1..end.len()).rev().find(|&k| t.ends_with(&end[..k])) {
                    self.held = t.split_off(t.len() - k);
                }
            }
            filtered = t;
            filtered.as_str()
        } else {
            text
        };
        if self.verbatim {
            if !text.is_empty() {
                self.streamed_content.push_str(text);
                (self.send)(Event::Content(text.to_string()));
            }
            return false;
        }
        let Some(pp) = self.parser.as_mut() else {
            if !text.is_empty() {
                self.streamed_content.push_str(text);
                (self.send)(Event::Content(text.to_string()));
            }
            return false;
        };
        let before = pp.text().len();
        let evs = pp.push(text);
        self.handle(evs);
        if self.verbatim {
            let tail = self
                .content_region()
                .strip_prefix(self.streamed_content.as_str())
                .unwrap_or("")
                .to_string();
            if !tail.is_empty() {
                self.streamed_content.push_str(&tail);
                (self.send)(Event::Content(tail));
            }
            return false;
        }
        if self.calls_ended == 0 || self.calls_started != self.calls_ended {
            return false;
        }
        let pp = self.parser.as_ref().unwrap();
        let t = pp.text();
        let mut from = self
            .scan_from
            .max(before.saturating_sub(render::BLOCK_END.len()));
        while !t.is_char_boundary(from) {
            from -= 1;
        }
        self.scan_from = from;
        t[from..].contains(render::BLOCK_END)
    }

    /// Text of the content region so far (after the reasoning block in thinking mode).
    fn content_region(&self) -> &str {
        let t = self.parser.as_ref().map_or("", |pp| pp.text());
        if !self.thinking {
            return t;
        }
        let t = t.strip_prefix(ds4::chat::THINK_START).unwrap_or(t);
        t.find(ds4::chat::THINK_END)
            .map_or("", |i| &t[i + ds4::chat::THINK_END.len()..])
    }

    fn handle(&mut self, evs: Vec<StreamEvent>) {
        for e in evs {
            if self.verbatim {
                return;
            }
            match e {
                // No tools offered: a DSML block is not a call. Everything from where the
                // content stopped streaming is sent as text, and so is the rest of the output.
                // (`push` sends that text; after the parser is gone the final lenient split
                // does.)
                StreamEvent::ToolCallStart { .. } if !self.tools => {
                    self.close_reasoning();
                    self.verbatim = true;
                }
                // A call to a tool the request did not offer cannot be run by the client.
                // Choice: if it is the block's first call, the whole block is returned as
                // text (as with no tools); a later one is dropped (its block-mates were
                // already streamed as calls) and logged. Never sent as a call.
                StreamEvent::ToolCallStart { index, name } if !self.offered.contains(&name) => {
                    if self.calls_started == 0 {
                        eprintln!(
                            "ds4-server: call to tool {name:?} not offered: returned as text"
                        );
                        self.close_reasoning();
                        self.verbatim = true;
                    } else {
                        eprintln!("ds4-server: call to tool {name:?} not offered: dropped");
                        self.skipped.insert(index);
                        self.ids.push(String::new());
                        self.calls_started += 1;
                    }
                }
                StreamEvent::ToolCallArgsDelta { index, .. } if self.skipped.contains(&index) => {}
                StreamEvent::ReasoningDelta(s) => {
                    self.streamed_reasoning.push_str(&s);
                    (self.send)(Event::Reasoning(s));
                }
                StreamEvent::ContentDelta(s) => {
                    self.close_reasoning();
                    self.streamed_content.push_str(&s);
                    (self.send)(Event::Content(s));
                }
                StreamEvent::ToolCallStart { index, name } => {
                    self.close_reasoning();
                    let id = new_call_id(self.call_prefix);
                    self.ids.push(id.clone());
                    self.calls_started += 1;
                    (self.send)(Event::ToolStart { index, id, name });
                }
                StreamEvent::ToolCallArgsDelta { index, delta } => (self.send)(Event::ToolArgs {
                    index,
                    fragment: delta,
                }),
                StreamEvent::ToolCallEnd { .. } => self.calls_ended += 1,
                StreamEvent::Malformed { .. } => self.malformed = true,
            }
        }
    }
}

/// The sampler a job runs with: in thinking mode the request's sampling is forced to the
/// defaults, only its seed kept (protocol.md §3.5, §4.4).
fn effective_sampling(p: &Prepared, asked: SamplerConfig) -> SamplerConfig {
    if p.thinking {
        SamplerConfig {
            seed: asked.seed,
            ..SamplerConfig::default()
        }
    } else {
        asked
    }
}

/// What a generation that does not parse under the official grammar still says (protocol.md
/// §3.1/§3.3): reasoning up to the first `</think>`, the rest as content, no calls. With
/// thinking off the whole text is content: a `</think>` there never starts the answer (unlike
/// §3.1, which would return the text before it as reasoning after it streamed as content).
fn lenient_split(raw: &str, thinking: bool) -> (Option<String>, String, bool) {
    if !thinking {
        return (None, raw.to_string(), false);
    }
    let t = raw.strip_prefix(ds4::chat::THINK_START).unwrap_or(raw);
    match t.find(ds4::chat::THINK_END) {
        Some(i) => (
            Some(t[..i].to_string()),
            t[i + ds4::chat::THINK_END.len()..].to_string(),
            true,
        ),
        None => (Some(t.to_string()), String::new(), false),
    }
}

impl Worker {
    fn cfg(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    fn hit(&self, kind: &'static str) {
        *self
            .shared
            .metrics
            .cache_hits
            .lock()
            .unwrap()
            .entry(kind)
            .or_default() += 1;
    }

    /// Tokens of `text[from..]`, with the template specials of that range.
    fn encode_suffix(&self, p: &Prepared, from: usize) -> Vec<u32> {
        let specials: Vec<Range<usize>> = p
            .specials
            .iter()
            .filter(|r| r.start >= from)
            .map(|r| r.start - from..r.end - from)
            .collect();
        self.tok.encode_with_specials(&p.text[from..], &specials)
    }

    fn new_session(&self) -> Result<Session, String> {
        Session::new(self.model.clone(), self.opts.clone()).map_err(|e| e.to_string())
    }

    /// Decides how much of the prompt a KV state already holds (protocol.md §5.2) and makes
    /// that state a slot's session. Returns the slot, the effective prompt, the cached
    /// count and the cache source.
    fn sync_plan(
        &mut self,
        p: &Prepared,
        bindings: Bindings,
    ) -> Result<(usize, Vec<u32>, usize, &'static str), NoPlan> {
        self.clock += 1;
        // The live session holding the longest prefix (token prefix, then text prefix).
        let mut best: Option<(usize, usize, Option<usize>)> = None; // (slot, tokens, text len)
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(sl) = slot else { continue };
            let live = sl.session.tokens();
            if live.is_empty() || best.is_some_and(|b| b.1 >= live.len()) {
                continue;
            }
            if live.len() <= p.tokens.len() && p.tokens.starts_with(live) {
                best = Some((i, live.len(), None));
                continue;
            }
            let bytes = self.tok.decode(live);
            if bytes.len() <= p.text.len()
                && p.text.is_char_boundary(bytes.len())
                && p.text.as_bytes().starts_with(&bytes)
            {
                best = Some((i, live.len(), Some(bytes.len())));
            }
        }
        // §5.2 steps 1 and 6: the API's live binding (Responses; chat and messages without
        // tools in thinking mode), unless the live tokens are themselves a prefix of the prompt.
        if let Some(kind) = bindings
            .kind()
            .filter(|_| best.is_none_or(|b| b.2.is_some()))
        {
            let bound = self.slots.iter().enumerate().find_map(|(i, slot)| {
                let sl = slot.as_ref()?;
                let b = sl.binding.as_ref()?;
                let (_, visible) = b.visible.as_ref().filter(|v| v.0 == kind)?;
                (sl.session.pos() == b.frontier
                    && visible.len() < p.text.len()
                    && p.text.is_char_boundary(visible.len())
                    && p.text.starts_with(visible.as_str())
                    && best.is_none_or(|x| b.frontier > x.1))
                .then_some((i, b.frontier, visible.len()))
            });
            if let Some((i, n, at)) = bound {
                if self.rec.is_some() {
                    self.trace_live(p, Some(i));
                }
                let sl = self.slots[i].as_mut().unwrap();
                sl.used = self.clock;
                let mut eff = sl.session.tokens().to_vec();
                eff.extend(self.encode_suffix(p, at));
                return Ok((i, eff, n, kind));
            }
        }
        // §5.2 steps 2-4: trailing tool outputs that answer exactly the calls of a live
        // tool-call turn continue it with the live-tail suffix (§2.9), whatever the replayed
        // history looks like; outputs for calls only the live session knows need it.
        if let Some(t) = p.tail.as_ref() {
            if let Some(i) = self.tool_binding(t) {
                if self.rec.is_some() {
                    self.trace_live(p, Some(i));
                }
                let sl = self.slots[i].as_mut().unwrap();
                sl.used = self.clock;
                let mut eff = sl.session.tokens().to_vec();
                let n = eff.len();
                eff.extend_from_slice(&t.tokens);
                return Ok((i, eff, n, t.api.source()));
            }
            if t.needs_live {
                if self.rec.is_some() {
                    self.trace_live(p, None);
                }
                return Err(NoPlan::Conflict(t.api.conflict()));
            }
        }
        if self.rec.is_some() {
            self.trace_live(p, best.map(|b| b.0));
        }
        if let Some((i, n, text_len)) = best {
            let sl = self.slots[i].as_mut().unwrap();
            sl.used = self.clock;
            return Ok(match text_len {
                None => (i, p.tokens.clone(), n, "memory-token"),
                Some(b) => {
                    let mut eff = sl.session.tokens().to_vec();
                    eff.extend(self.encode_suffix(p, b));
                    (i, eff, n, "memory-text")
                }
            });
        }
        // Miss: an empty slot, else the least recently used one, checkpointed first.
        let i = match self.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                let i = (0..self.slots.len())
                    .min_by_key(|&i| self.slots[i].as_ref().map_or(0, |s| s.used))
                    .unwrap_or(0);
                self.checkpoint(i, Reason::Evict);
                i
            }
        };
        self.slots[i] = None;
        if let Some(disk) = self.disk.clone() {
            let c = self.cfg().clone();
            let hit = disk.lookup(p.text.as_bytes(), c.ctx as u32, c.kv_min_tokens as u32);
            if let Some(hit) = hit.filter(|h| p.text.is_char_boundary(h.text_len)) {
                match Session::restore(self.model.clone(), self.opts.clone(), &hit.payload) {
                    Ok(s) if s.pos() == hit.tokens as usize => {
                        let n = s.pos();
                        let mut eff = s.tokens().to_vec();
                        eff.extend(self.encode_suffix(p, hit.text_len));
                        {
                            let mut mem = self.shared.tool_memory.lock().unwrap();
                            for (id, dsml) in hit.tool_map.iter().cloned() {
                                mem.insert(id, dsml.into(), c.tool_memory_max_ids);
                            }
                        }
                        disk.touch(&hit, n > c.kv_cold_max_tokens);
                        if let Some(r) = self.rec.as_mut() {
                            r.line("disk_tokens", n);
                        }
                        eprintln!(
                            "ds4-server: kv cache: disk hit {n} tokens ({})",
                            hit.path.display()
                        );
                        self.slots[i] = Some(Slot {
                            session: s,
                            last_stored: n,
                            used: self.clock,
                            binding: None,
                        });
                        return Ok((i, eff, n, "disk-text"));
                    }
                    r => {
                        eprintln!(
                            "ds4-server: kv cache: removing unusable checkpoint {}: {}",
                            hit.path.display(),
                            match r {
                                Err(e) => e.to_string(),
                                Ok(_) => "token count mismatch".into(),
                            }
                        );
                        let _ = std::fs::remove_file(&hit.path);
                    }
                }
            }
        }
        self.slots[i] = Some(Slot {
            session: self.new_session().map_err(NoPlan::Engine)?,
            last_stored: 0,
            used: self.clock,
            binding: None,
        });
        Ok((i, p.tokens.clone(), 0, "cold"))
    }

    /// The slot whose live tool-call binding the tool outputs of `t` continue, if any.
    fn tool_binding(&self, t: &LiveTail) -> Option<usize> {
        self.slots.iter().position(|slot| {
            slot.as_ref().is_some_and(|sl| {
                sl.binding.as_ref().is_some_and(|b| {
                    b.frontier == sl.session.pos()
                        && b.calls
                            .as_ref()
                            .is_some_and(|(api, ids)| *api == t.api && same_ids(ids, &t.ids))
                })
            })
        })
    }

    /// Makes the live call ids of the slots' bindings visible to the request parsers.
    fn publish_live_calls(&self) {
        let calls = self
            .slots
            .iter()
            .filter_map(|s| s.as_ref()?.binding.as_ref()?.calls.clone())
            .collect();
        *self.shared.live_calls.lock().unwrap() = calls;
    }

    /// Where a cold prompt is checkpointed (protocol.md §5.6), if at all.
    fn cold_store_len(&self, tokens: &[u32]) -> Option<usize> {
        let c = self.cfg();
        let n = tokens.len();
        if self.disk.is_none() || c.kv_cold_max_tokens == 0 || n < c.kv_min_tokens {
            return None;
        }
        if n > c.kv_cold_max_tokens {
            return None;
        }
        let sp = self.tok.specials();
        if let Some(first_asst) = tokens.iter().position(|&t| t == sp.assistant) {
            if let Some(anchor) = tokens[..first_asst].iter().rposition(|&t| t == sp.user) {
                if anchor >= c.kv_min_tokens {
                    return Some(anchor);
                }
            }
        }
        if c.kv_boundary_align > 0 && n > c.kv_min_tokens + c.kv_boundary_trim {
            let s = (n - c.kv_boundary_trim) / c.kv_boundary_align * c.kv_boundary_align;
            if s >= c.kv_min_tokens {
                return Some(s);
            }
        }
        Some(n)
    }

    fn continued_step(&self) -> usize {
        let c = self.cfg();
        if c.kv_continued_interval == 0 || self.disk.is_none() {
            return 0;
        }
        let a = c.kv_boundary_align.max(1);
        c.kv_continued_interval.div_ceil(a) * a
    }

    /// Stores slot `i`'s session to disk (if enabled and long enough).
    fn checkpoint(&mut self, i: usize, reason: Reason) {
        let Some(disk) = self.disk.clone() else {
            return;
        };
        let (min, ctx) = (self.cfg().kv_min_tokens, self.cfg().ctx);
        let Some(sl) = self.slots[i].as_mut() else {
            return;
        };
        let n = sl.session.pos();
        if n < min || n == 0 {
            return;
        }
        if matches!(reason, Reason::Evict | Reason::Shutdown) && n == sl.last_stored {
            // Already on disk at this exact length.
            return;
        }
        // A session at its binding's frontier is keyed by the visible transcript (§5.6, evict
        // and shutdown; ext bit 1 Responses, bit 2 toolless thinking), so after a restart the
        // follow-up finds it by text prefix as it would the live binding.
        let bound = sl
            .binding
            .as_ref()
            .filter(|b| b.frontier == n && matches!(reason, Reason::Evict | Reason::Shutdown))
            .and_then(|b| b.visible.as_ref());
        let key_bits = bound.map_or(
            0,
            |(kind, _)| {
                if *kind == "responses-visible" {
                    2
                } else {
                    4
                }
            },
        );
        let text = match bound {
            Some((_, visible)) => visible.clone().into_bytes(),
            None => self.tok.decode(sl.session.tokens()),
        };
        let tool_map: Vec<(String, String)> = {
            let mem = self.shared.tool_memory.lock().unwrap();
            mem.map
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect()
        };
        let t0 = Instant::now();
        match disk.store(
            &text,
            n as u32,
            ctx as u32,
            reason,
            &sl.session.snapshot(),
            &tool_map,
            key_bits,
        ) {
            Ok(path) => {
                sl.last_stored = n;
                self.shared
                    .metrics
                    .disk_stores
                    .fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "ds4-server: kv cache: stored {} checkpoint, {n} tokens, {} ({} ms)",
                    reason.name(),
                    path.display(),
                    t0.elapsed().as_millis()
                );
                self.note(format!(
                    "stored {} checkpoint, {n} tokens, {}",
                    reason.name(),
                    path.display()
                ));
            }
            Err(e) => {
                eprintln!(
                    "ds4-server: kv cache: {} checkpoint skipped: {e}",
                    reason.name()
                );
                self.note(format!("{} checkpoint skipped: {e}", reason.name()));
            }
        }
    }

    /// The trace's view of the live sessions for prompt `p`: the slot that matched (`hit`),
    /// else the most recently used one — its length, the tokens it shares with the prompt,
    /// why it was not reused and the tokens around the first difference.
    fn trace_live(&mut self, p: &Prepared, hit: Option<usize>) {
        let pick = hit.or_else(|| {
            (0..self.slots.len())
                .filter(|&i| self.slots[i].is_some())
                .max_by_key(|&i| self.slots[i].as_ref().map_or(0, |s| s.used))
        });
        let (live_n, common, window) = match pick.and_then(|i| self.slots[i].as_ref()) {
            Some(sl) => {
                let live = sl.session.tokens();
                let common = live
                    .iter()
                    .zip(&p.tokens)
                    .take_while(|(a, b)| a == b)
                    .count();
                let window = (common < live.len()).then(|| {
                    trace::mismatch_window(live, &p.tokens, common, |t| {
                        String::from_utf8_lossy(&self.tok.decode(&[t])).into_owned()
                    })
                });
                (live.len(), common, window)
            }
            None => (0, 0, None),
        };
        let reason = match (hit, live_n) {
            (Some(_), _) => "none (live session reused)",
            (None, 0) => "no live session",
            (None, _) if common == live_n => "live session is longer than the prompt",
            (None, _) => "live session differs from the prompt (tokens and text)",
        };
        if let Some(r) = self.rec.as_mut() {
            r.section("cache decision");
            r.line("live_tokens_before", live_n);
            r.line("live_prompt_common", common);
            r.line("memory_miss_reason", reason);
            if let Some(w) = window {
                r.line("first_mismatch", w);
            }
        }
    }

    /// Adds `--- trace: <what> ---` to the running request's record (if tracing).
    fn note(&mut self, what: String) {
        if let Some(r) = self.rec.as_mut() {
            r.event(&what);
        }
    }

    /// Reports a failed job to its client (and to the trace).
    fn fail(&mut self, events: &UnboundedSender<Event>, msg: String) {
        self.note(format!("failed: {msg}"));
        let _ = events.send(Event::Failed(msg));
    }

    /// Runs one job; with `--trace`, records it (protocol.md §4.11) and appends the record.
    fn run(&mut self, job: Job) {
        let file = self.cfg().trace.clone();
        if let (Some(tf), Some(head)) = (file.as_ref(), job.trace.as_ref()) {
            let mut r = tf.record(head);
            let p = &job.prepared;
            r.line(
                "tools",
                format_args!("{} {:?}", p.tool_names.len(), p.tool_names),
            );
            let think = match (p.thinking, p.think_max) {
                (false, _) => "off",
                (true, false) => "high",
                (true, true) => "max",
            };
            r.line("think_mode", think);
            r.line("prompt_tokens", p.tokens.len());
            r.line(
                "max_tokens",
                job.max_tokens
                    .map_or_else(|| "default".to_string(), |m| m.to_string()),
            );
            let sc = effective_sampling(p, job.sampling);
            r.line(
                "sampling",
                format_args!(
                    "temperature={} top_k={} top_p={} min_p={}{}",
                    sc.temperature,
                    sc.top_k,
                    sc.top_p,
                    sc.min_p,
                    if p.thinking {
                        " (thinking mode: the request's sampling is not used)"
                    } else {
                        ""
                    }
                ),
            );
            r.line(
                "seed",
                format_args!(
                    "{}{}",
                    sc.seed,
                    if sc.seed == 0 {
                        " (from the clock)"
                    } else {
                        ""
                    }
                ),
            );
            r.line(
                "tool_replay",
                format_args!(
                    "mem={} disk={} canonical={} missing_ids={:?}",
                    p.replay.mem, p.replay.disk, p.replay.canonical, p.replay.missing_ids
                ),
            );
            self.rec = Some(r);
        }
        self.serve(job);
        if let (Some(tf), Some(r)) = (file, self.rec.take()) {
            tf.write(r);
        }
    }

    fn session(&mut self, i: usize) -> &mut Session {
        &mut self.slots[i].as_mut().expect("live slot").session
    }

    fn serve(&mut self, job: Job) {
        let shared = self.shared.clone();
        let cancelled = || {
            job.cancel.load(Ordering::Relaxed)
                || job.events.is_closed()
                || shared.shutting_down.load(Ordering::Relaxed)
        };
        let send = |e: Event| {
            let _ = job.events.send(e);
        };
        if cancelled() {
            return;
        }
        let p = &job.prepared;
        let ctx = self.cfg().ctx;
        let delay = self.cfg().test_delay;

        // ---- prefill (with reuse and checkpoints)
        let (si, eff, cached, source) = match self.sync_plan(p, job.bindings) {
            Ok(x) => x,
            Err(NoPlan::Conflict(msg)) => {
                eprintln!("ds4-server: kv cache: live tool state not available (409)");
                self.hit("conflict");
                if let Some(r) = self.rec.as_mut() {
                    r.line("cache_source", "none (live tool state not available: 409)");
                }
                let _ = job.events.send(Event::Conflict(msg.to_string()));
                return;
            }
            Err(NoPlan::Engine(e)) => return self.fail(&job.events, format!("engine error: {e}")),
        };
        self.hit(source);
        // A binding holds only until the next request on its session (§5.2).
        if let Some(sl) = self.slots[si].as_mut() {
            sl.binding = None;
        }
        self.publish_live_calls();
        if let (Some(r), Some(head)) = (self.rec.as_mut(), job.trace.as_ref()) {
            r.line("effective_prompt_tokens", eff.len());
            r.line("cached_tokens", cached);
            r.line("cache_source", source);
            r.block(
                "raw request json",
                &serde_json::to_string_pretty(&head.request).unwrap_or_default(),
            );
            r.block("rendered prompt", &p.text);
        }
        if eff.len() >= ctx {
            return self.fail(
                &job.events,
                format!(
                    "Prompt has {} tokens, but the configured context size is {ctx} tokens",
                    eff.len()
                ),
            );
        }
        send(Event::Prompt {
            prompt_tokens: eff.len(),
            cached,
        });
        let cold_at = if cached == 0 {
            self.cold_store_len(&eff)
        } else {
            None
        };
        let step = self.continued_step();
        let mut cuts: Vec<usize> = Vec::new();
        if let Some(c) = cold_at {
            cuts.push(c);
        }
        if let Some(q) = cached.checked_div(step) {
            let mut k = (q + 1) * step;
            while k <= eff.len() {
                cuts.push(k);
                k += step;
            }
        }
        cuts.push(eff.len());
        cuts.sort_unstable();
        cuts.dedup();
        let t_prefill = Instant::now();
        let total = eff.len() - cached;
        let mut pos = cached;
        let mut last_progress = Instant::now();
        // Prefill runs in pieces sized to take ~250 ms, so a client that goes away stops it
        // within about half a second (the session keeps what was evaluated: still a valid
        // prefix), while pieces stay large enough to batch well (at least 32 tokens).
        let mut piece = 64usize;
        for cut in cuts {
            while pos < cut {
                if cancelled() {
                    eprintln!("ds4-server: prefill cancelled (client gone)");
                    self.note(format!("prefill cancelled at token {pos} (client gone)"));
                    return;
                }
                let n = piece.min(cut - pos);
                let t0 = Instant::now();
                if let Err(e) = self.session(si).prefill(&eff[pos..pos + n]) {
                    self.slots[si] = None;
                    return self.fail(&job.events, format!("prefill failed: {e}"));
                }
                if !delay.is_zero() {
                    std::thread::sleep(delay * n as u32 / 8);
                }
                pos += n;
                let dt = t0.elapsed().as_secs_f64().max(1e-4);
                piece = ((n as f64 * 0.25 / dt) as usize).clamp(32, 2048);
                if last_progress.elapsed() >= Duration::from_millis(200) {
                    last_progress = Instant::now();
                    send(Event::Prefill {
                        done: pos - cached,
                        total,
                    });
                }
            }
            let last_stored = self.slots[si].as_ref().map_or(0, |s| s.last_stored);
            if Some(cut) == cold_at {
                self.checkpoint(si, Reason::Cold);
            } else if step > 0 && cut.is_multiple_of(step) && cut > last_stored {
                self.checkpoint(si, Reason::Continued);
            }
        }
        let m = &self.shared.metrics;
        m.prefill_tokens.fetch_add(total as u64, Ordering::Relaxed);
        m.prefill_us
            .fetch_add(t_prefill.elapsed().as_micros() as u64, Ordering::Relaxed);
        m.prompt_tokens
            .fetch_add(eff.len() as u64, Ordering::Relaxed);
        m.cached_tokens.fetch_add(cached as u64, Ordering::Relaxed);
        send(Event::Started {
            prompt_tokens: eff.len(),
            cached,
        });

        // ---- generation
        let budget = job
            .max_tokens
            .map(|m| m as usize)
            .unwrap_or(self.cfg().default_max_tokens)
            .min(ctx.saturating_sub(eff.len()));
        let mut sampler = Sampler::new(effective_sampling(p, job.sampling));
        let mut script: Option<VecDeque<u32>> = self.cfg().test_output.as_ref().map(|v| {
            let k = self.shared.gen_counter.fetch_add(1, Ordering::SeqCst);
            let s = if v.is_empty() { "" } else { &v[k % v.len()] };
            let mut t: VecDeque<u32> = self.tok.encode(s, EncodeMode::Render).into();
            t.push_back(self.eos);
            t
        });
        let mode = if p.thinking {
            ThinkingMode::Thinking
        } else {
            ThinkingMode::Chat
        };
        let mut proj = Projection::new(
            p.chat.then(|| StreamParser::new(mode)),
            p.chat && p.thinking,
            &send,
            job.call_id_prefix,
            job.tools_active,
            p.chat && !p.thinking,
            &p.tool_names,
        );
        let mut decoder = self.tok.stream_decoder();
        let eos = self.eos;
        let stops: Vec<&String> = job.stop.iter().filter(|s| !s.is_empty()).collect();
        let max_stop = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut raw = String::new();
        let mut fed = 0usize;
        let mut generated = 0usize;
        let mut finish = Finish::Length;
        // The model ended the turn (not a stop string, which leaves tokens in the KV that
        // the returned text lacks).
        let mut ended_by_eos = false;
        let t_decode = Instant::now();

        while generated < budget {
            if cancelled() {
                finish = Finish::Error;
                break;
            }
            let syntax = proj
                .parser
                .as_ref()
                .map_or(SyntaxState::Outside, |pp| pp.syntax_state());
            let structural = job.tools_active
                && matches!(
                    syntax,
                    SyntaxState::Structural | SyntaxState::JsonStructural
                );
            let token = match script.as_mut() {
                Some(s) => s.pop_front().unwrap_or(eos),
                None if structural => self.session(si).argmax(),
                None => self.session(si).sample(&mut sampler),
            };
            if token == eos {
                finish = Finish::Stop;
                ended_by_eos = true;
                break;
            }
            if step > 0 && syntax == SyntaxState::Outside {
                let (n, last) = {
                    let sl = self.slots[si].as_ref().unwrap();
                    (sl.session.pos(), sl.last_stored)
                };
                if n.is_multiple_of(step) && n > last {
                    self.checkpoint(si, Reason::Continued);
                }
            }
            if let Err(e) = self.session(si).decode(token) {
                eprintln!("ds4-server: decode failed: {e}");
                finish = Finish::Error;
                break;
            }
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            generated += 1;
            raw.push_str(&decoder.push(&self.tok, token));
            let mut stop_hit = false;
            if max_stop > 0 {
                let mut from = fed.saturating_sub(max_stop);
                while !raw.is_char_boundary(from) {
                    from -= 1;
                }
                if let Some(i) = stops
                    .iter()
                    .filter_map(|s| raw[from..].find(s.as_str()))
                    .min()
                {
                    raw.truncate(from + i);
                    stop_hit = true;
                }
            }
            let mut safe = if stop_hit || max_stop == 0 {
                raw.len()
            } else {
                raw.len().saturating_sub(max_stop - 1).max(fed)
            };
            while !raw.is_char_boundary(safe) {
                safe -= 1;
            }
            if safe > fed {
                let chunk = raw[fed..safe].to_string();
                fed = safe;
                if proj.push(&chunk, false) {
                    finish = Finish::ToolCalls;
                    break;
                }
            }
            if stop_hit {
                finish = Finish::Stop;
                break;
            }
        }
        if finish != Finish::ToolCalls {
            raw.push_str(&decoder.flush());
        }
        let rest = raw[fed.min(raw.len())..].to_string();
        proj.push(&rest, true);
        let m = &self.shared.metrics;
        m.decode_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
        m.decode_us
            .fetch_add(t_decode.elapsed().as_micros() as u64, Ordering::Relaxed);
        m.completion_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);

        let usage = Usage {
            prompt: eff.len(),
            cached,
            completion: generated,
        };
        let mut out = Outcome {
            raw: raw.clone(),
            reasoning: None,
            content: raw.clone(),
            calls: Vec::new(),
            finish,
            usage,
            reasoning_closed: false,
        };
        if proj.verbatim {
            // No tools offered and the model wrote a DSML block: it is returned as text,
            // exactly what was streamed.
            eprintln!("ds4-server: tool-call block without tools offered returned as text");
            proj.parser = None;
            out.reasoning = p.thinking.then(|| proj.streamed_reasoning.clone());
            out.content = proj.streamed_content.clone();
            out.reasoning_closed = p.thinking;
            if finish == Finish::ToolCalls {
                out.finish = Finish::Stop;
            }
        }
        if let Some(mut pp) = proj.parser.take() {
            // What the parser saw (a stray `</think>` already dropped with thinking off).
            let text = pp.text().to_string();
            // The official grammar ends a message with EOS: a turn that stopped for any other
            // reason than a tool-call block is parsed as if it ended there.
            if !matches!(finish, Finish::ToolCalls | Finish::Error) {
                let evs = pp.push(ds4::chat::EOS);
                proj.handle(evs);
            }
            let (evs, result) = pp.finish();
            proj.handle(evs);
            let result = match result {
                // Reached only if the block completed in the final flush (not streamed live).
                Ok(pm)
                    if pm
                        .tool_calls
                        .first()
                        .is_some_and(|c| !job.tools_active || !p.tool_names.contains(&c.name)) =>
                {
                    Err("tool-call block without the tool offered".to_string())
                }
                Ok(pm) => Ok(pm),
                Err(e) => Err(e.to_string()),
            };
            let (reasoning, content, calls, closed) = match result {
                Ok(pm) => (
                    p.thinking.then_some(pm.reasoning_content),
                    pm.content,
                    pm.tool_calls,
                    p.thinking,
                ),
                Err(e) => {
                    let (r, c, closed) = lenient_split(&text, p.thinking);
                    if job.tools_active && c.contains(render::BLOCK_START.trim_start()) {
                        eprintln!("ds4-server: invalid tool call returned as assistant text ({e})");
                    }
                    (r, c, Vec::new(), closed)
                }
            };
            // Whatever the live projection held back (or dropped when the text stopped
            // parsing) is sent now, so the stream adds up to the final message.
            if let Some(tail) = reasoning
                .as_deref()
                .and_then(|r| r.strip_prefix(proj.streamed_reasoning.as_str()))
                .filter(|t| !t.is_empty() && !proj.reasoning_closed)
            {
                send(Event::Reasoning(tail.to_string()));
            }
            if closed {
                proj.close_reasoning();
            }
            // The stream must add up to the final message, so a tail is sent even when it
            // holds a DSML block that failed to parse (it is part of the returned text).
            if let Some(tail) = content
                .strip_prefix(proj.streamed_content.as_str())
                .filter(|t| !t.is_empty())
            {
                proj.close_reasoning();
                send(Event::Content(tail.to_string()));
            }
            out.reasoning = reasoning;
            out.content = content;
            out.reasoning_closed = closed;
            if !calls.is_empty() && finish != Finish::Error {
                let block: Arc<str> = render::raw_block(&raw, p.thinking)
                    .unwrap_or_default()
                    .into();
                let mut mem = self.shared.tool_memory.lock().unwrap();
                for (i, c) in calls.into_iter().enumerate() {
                    if !p.tool_names.contains(&c.name) {
                        continue;
                    }
                    let id = proj
                        .ids
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| new_call_id(job.call_id_prefix));
                    if !block.is_empty() {
                        mem.insert(id.clone(), block.clone(), self.cfg().tool_memory_max_ids);
                    }
                    out.calls.push(ToolCall {
                        id,
                        name: c.name,
                        arguments: render::compact_arguments(&c.arguments),
                    });
                }
                out.finish = Finish::ToolCalls;
            } else if finish == Finish::ToolCalls {
                out.finish = Finish::Stop;
            }
        }
        // §5.3: the live binding this turn leaves (the session holds prompt + raw exactly
        // when the turn ended at EOS or at the end of its tool-call block).
        let whole =
            ended_by_eos || (finish == Finish::ToolCalls && out.finish == Finish::ToolCalls);
        let visible = match job.bindings {
            // A thinking turn without tools: the next render drops its reasoning.
            Bindings::Thinking | Bindings::Messages => p
                .text
                .strip_suffix(ds4::chat::THINK_START)
                .filter(|_| {
                    p.chat
                        && p.thinking
                        && p.tool_names.is_empty()
                        && ended_by_eos
                        && out.finish == Finish::Stop
                        && out.reasoning_closed
                        && out.calls.is_empty()
                        && raw.ends_with(&format!("{}{}", ds4::chat::THINK_END, out.content))
                })
                .map(|prompt| format!("{prompt}{}{}", ds4::chat::THINK_END, out.content)),
            // A Responses turn: the client sends back content and calls (replayed as the
            // sampled DSML), and the reasoning only when it was returned and the turn made
            // calls.
            Bindings::Responses { echo_reasoning } if whole => {
                let keep = !p.thinking || (echo_reasoning && !out.calls.is_empty());
                let from = if keep {
                    Some(0)
                } else {
                    raw.find(ds4::chat::THINK_END)
                };
                from.map(|i| format!("{}{}", p.text, &raw[i..]))
            }
            _ => None,
        };
        // A tool-call turn that ended at its block: the tool outputs for exactly its calls
        // continue it (§5.2 steps 2, 3).
        let calls = job
            .bindings
            .tool_api()
            .filter(|_| whole && out.finish == Finish::ToolCalls && !out.calls.is_empty())
            .map(|api| {
                let mut ids: Vec<String> = Vec::new();
                for c in &out.calls {
                    if !ids.contains(&c.id) {
                        ids.push(c.id.clone());
                    }
                }
                (api, ids)
            });
        let visible = visible.zip(job.bindings.kind()).map(|(v, k)| (k, v));
        if let Some(sl) = self.slots[si].as_mut() {
            if visible.is_some() || calls.is_some() {
                let frontier = sl.session.pos();
                sl.binding = Some(Binding {
                    visible,
                    calls,
                    frontier,
                });
            }
        }
        self.publish_live_calls();
        if let Some(r) = self.rec.as_mut() {
            r.block("generated text", &raw);
            r.section("parsed message");
            r.line("finish", out.finish.openai());
            r.line("generated_tokens", generated);
            let start = raw.find(render::BLOCK_START.trim_start());
            let end = raw
                .find(render::BLOCK_END)
                .map(|i| i + render::BLOCK_END.len());
            r.line("dsml_start", format_args!("{start:?}"));
            r.line("dsml_end", format_args!("{end:?}"));
            r.line("reasoning", format_args!("{:?}", out.reasoning));
            r.line("content", format_args!("{:?}", out.content));
            for (i, c) in out.calls.iter().enumerate() {
                r.line(
                    &format!("tool_call[{i}]"),
                    format_args!("{} {} {}", c.id, c.name, c.arguments),
                );
            }
        }
        send(Event::Done(Box::new(out)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn tool_outputs_must_answer_exactly_the_live_calls() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(same_ids(&ids(&["a", "b"]), &ids(&["b", "a"])));
        assert!(!same_ids(&ids(&["a", "b"]), &ids(&["a"])));
        assert!(!same_ids(&ids(&["a"]), &ids(&["a", "b"])));
        assert!(!same_ids(&ids(&["a", "b"]), &ids(&["a", "c"])));
        assert!(!same_ids(&[], &[]));
    }

    #[test]
    fn lenient_split_never_splits_with_thinking_off() {
        assert_eq!(
            lenient_split("a</think>b", false),
            (None, "a</think>b".to_string(), false)
        );
        assert_eq!(
            lenient_split("<think>a</think>b", true),
            (Some("a".to_string()), "b".to_string(), true)
        );
    }

    fn project(chunks: &[&str], thinking: bool, tools: &[&str]) -> (String, String, Vec<String>) {
        let events = RefCell::new(Vec::new());
        let send = |e: Event| events.borrow_mut().push(e);
        let offered: Vec<String> = tools.iter().map(|s| s.to_string()).collect();
        let mode = if thinking {
            ThinkingMode::Thinking
        } else {
            ThinkingMode::Chat
        };
        let mut proj = Projection::new(
            Some(StreamParser::new(mode)),
            thinking,
            &send,
            "call_",
            !tools.is_empty(),
            !thinking,
            &offered,
        );
        for (i, c) in chunks.iter().enumerate() {
            proj.push(c, i + 1 == chunks.len());
        }
        let (mut r, mut c, mut calls) = (String::new(), String::new(), Vec::new());
        drop(proj);
        for e in events.into_inner() {
            match e {
                Event::Reasoning(s) => r.push_str(&s),
                Event::Content(s) => c.push_str(&s),
                Event::ToolStart { name, .. } => calls.push(name),
                _ => {}
            }
        }
        (r, c, calls)
    }

    const BLOCK: &str = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"true\">x</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

    #[test]
    fn stray_think_end_is_dropped_even_split_across_chunks() {
        let (r, c, calls) = project(&["Hi</th", "ink> there"], false, &[]);
        assert_eq!((r.as_str(), c.as_str(), calls.len()), ("", "Hi there", 0));
        let text = format!("Hi</think>{BLOCK}");
        let (r, c, calls) = project(&[&text[..5], &text[5..]], false, &["f"]);
        assert_eq!((r.as_str(), c.as_str()), ("", "Hi"));
        assert_eq!(calls, ["f"]);
    }

    #[test]
    fn dsml_is_text_without_the_tool_offered() {
        let text = format!("Title{BLOCK}");
        for tools in [&[][..], &["g"][..]] {
            let (_, c, calls) = project(&[&text[..20], &text[20..]], false, tools);
            assert!(calls.is_empty());
            assert_eq!(c, text);
        }
        let text = format!("hm</think>Title{BLOCK}");
        let (r, c, calls) = project(&[&text], true, &[]);
        assert_eq!((r.as_str(), c.as_str()), ("hm", &text[10..]));
        assert!(calls.is_empty());
    }
}
