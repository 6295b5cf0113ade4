//! The engine worker: the one thread that owns the model, the live session and the disk KV
//! cache, fed by a bounded queue. The HTTP layer talks to it only through the types of this
//! module ([`Engine`], [`PromptInput`], [`Job`], [`Event`]); it never sees engine types.
//!
//! Wiring status (see README "Engine wiring"): tokenizer = `ds4::tokenizer` (real), sampler =
//! `ds4::sample` (real); session = [`stub::Session`] and chat rendering/parsing =
//! [`chat_shim`] are stand-ins until `ds4::model::Session` and `ds4::chat` land. Only this
//! module changes when they do.

pub mod chat_shim;
pub mod kvdisk;
pub mod stub;

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use ds4::sample::{argmax, Sampler, SamplerConfig};
use ds4::tokenizer::{EncodeMode, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

use chat_shim::{RenderOptions, Rendered, StreamEvent, SyntaxState};
use kvdisk::{DiskCache, Reason};
use stub::Session;

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
        /// Tool schema JSON texts (function objects), in order.
        tools: Vec<String>,
        thinking: bool,
        think_max: bool,
    },
    /// Legacy completions: the prompt is wrapped in the default chat template (§2.8).
    Completion {
        prompt: String,
        thinking: bool,
        think_max: bool,
    },
}

/// A rendered and tokenized prompt.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub text: String,
    pub specials: Vec<Range<usize>>,
    pub tokens: Vec<u32>,
    pub thinking: bool,
    /// Chat kind: output is split into reasoning / content / tool calls.
    pub chat: bool,
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

    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::SeqCst)
    }

    /// Renders and tokenizes a prompt (blocking; call from a blocking thread). Applies exact
    /// DSML replay from tool memory (and the disk cache's tool maps) first.
    pub fn prepare(&self, input: PromptInput) -> Result<Prepared, SubmitError> {
        let tok = self.shared.tokenizer.get().ok_or(SubmitError::Loading)?;
        let (rendered, thinking, chat) = match input {
            PromptInput::Chat {
                mut messages,
                tools,
                thinking,
                think_max,
            } => {
                if self.shared.cfg.exact_dsml_replay {
                    self.apply_tool_memory(&mut messages);
                }
                let think_max = think_max && self.shared.cfg.ctx >= THINK_MAX_MIN_CTX;
                let r = chat_shim::render(
                    &messages,
                    &RenderOptions {
                        thinking,
                        think_max,
                        tools,
                    },
                );
                (r, thinking, true)
            }
            PromptInput::Completion {
                prompt,
                thinking,
                think_max,
            } => {
                let think_max = think_max && self.shared.cfg.ctx >= THINK_MAX_MIN_CTX;
                let msgs = [
                    Msg::text(Role::System, "You are a helpful assistant"),
                    Msg::text(Role::User, prompt),
                ];
                let r = chat_shim::render(
                    &msgs,
                    &RenderOptions {
                        thinking,
                        think_max,
                        tools: Vec::new(),
                    },
                );
                (r, thinking, false)
            }
        };
        let Rendered { text, specials } = rendered;
        let tokens = tok.encode_with_specials(&text, &specials);
        Ok(Prepared {
            text,
            specials,
            tokens,
            thinking,
            chat,
        })
    }

    fn apply_tool_memory(&self, messages: &mut [Msg]) {
        let ids: HashSet<String> = messages
            .iter()
            .flat_map(|m| m.tool_calls.iter().map(|c| c.id.clone()))
            .collect();
        if ids.is_empty() {
            return;
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
                }
            }
        }
    }

    /// Is `id` a tool-call id this server produced (live state available)?
    pub fn knows_call_id(&self, id: &str) -> bool {
        self.shared.tool_memory.lock().unwrap().map.contains_key(id)
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

// ---------------------------------------------------------------------------------------
// Worker
// ---------------------------------------------------------------------------------------

const REAL_WEIGHTS_HINT: &str = "huggingface-cli download antirez/deepseek-v4-gguf DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-chat-v2.gguf --local-dir . && ln -s DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-chat-v2.gguf ds4flash.gguf";

fn tokenizer_from_gguf(g: &ds4::gguf::GgufFile) -> Result<Tokenizer, String> {
    let tokens = g
        .get_string_array("tokenizer.ggml.tokens")
        .map_err(|e| e.to_string())?
        .ok_or("no tokenizer.ggml.tokens")?;
    let merges = g
        .get_string_array("tokenizer.ggml.merges")
        .map_err(|e| e.to_string())?
        .ok_or("no tokenizer.ggml.merges")?;
    let tokens: Vec<String> = tokens.into_iter().map(str::to_string).collect();
    let merges: Vec<String> = merges.into_iter().map(str::to_string).collect();
    let types: Option<Vec<i32>> = g
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().map(|x| x.as_i64().unwrap_or(1) as i32).collect());
    match types {
        Some(t) => Tokenizer::with_token_types(tokens, &merges, &t),
        None => Tokenizer::new(tokens, &merges),
    }
    .map_err(|e| e.to_string())
}

/// The shipped tokenizer (data/ds4-tokenizer.gguf), found next to the binary, in the current
/// directory or in the source tree.
fn find_shipped_tokenizer() -> Option<PathBuf> {
    let mut cands = vec![PathBuf::from("data/ds4-tokenizer.gguf")];
    if let Ok(exe) = std::env::current_exe() {
        for anc in exe.ancestors().skip(1).take(4) {
            cands.push(anc.join("data/ds4-tokenizer.gguf"));
        }
    }
    cands.push(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/ds4-tokenizer.gguf"
    )));
    cands.into_iter().find(|p| p.is_file())
}

fn load(shared: &Shared) -> Result<(Arc<Tokenizer>, ModelInfo), String> {
    let path = &shared.cfg.model_path;
    let engine = "stub (forward pass not wired yet: ds4::model::Session pending)".to_string();
    if path.exists() {
        let g = ds4::gguf::GgufFile::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let g = Arc::new(g);
        let tok = tokenizer_from_gguf(&g)?;
        let model = ds4::model::Model::from_gguf(g)?;
        let quant_bits = match model.expert_types().0.name() {
            n if n.contains("q4") || n.contains("Q4") => 4,
            _ => 2,
        };
        eprintln!(
            "ds4-server: model {} (experts {}), {} tokens context",
            path.display(),
            model.expert_types().0.name(),
            shared.cfg.ctx
        );
        Ok((
            Arc::new(tok),
            ModelInfo {
                backend: "cpu".into(),
                engine,
                demo: false,
                note: Some(
                    "engine forward pass not wired yet; outputs are placeholder tokens".into(),
                ),
                quant_bits,
            },
        ))
    } else {
        let tp = find_shipped_tokenizer().ok_or_else(|| {
            format!(
                "no model at {} and the shipped tokenizer data/ds4-tokenizer.gguf was not found",
                path.display()
            )
        })?;
        let g = ds4::gguf::GgufFile::open(&tp).map_err(|e| format!("{}: {e}", tp.display()))?;
        let tok = tokenizer_from_gguf(&g)?;
        let note = format!(
            "no model file at {}: serving the synthetic DS4 demo model (random weights, real \
             tokenizer); its output is noise. Get real weights: {REAL_WEIGHTS_HINT}",
            path.display()
        );
        eprintln!("ds4-server: {note}");
        Ok((
            Arc::new(tok),
            ModelInfo {
                backend: "cpu".into(),
                engine,
                demo: true,
                note: Some(note),
                quant_bits: 2,
            },
        ))
    }
}

fn worker_main(shared: Arc<Shared>, rx: Receiver<WorkerMsg>) {
    let (tok, info) = match load(&shared) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("ds4-server: failed to load the model: {e}");
            *shared.status.write().unwrap() = Status::Failed(e);
            std::process::exit(1);
        }
    };
    let disk = shared.cfg.kv_disk_dir.as_ref().and_then(|d| {
        match DiskCache::open(d, shared.cfg.kv_disk_space_mb, info.quant_bits) {
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
    let _ = shared.tokenizer.set(tok.clone());
    *shared.info.write().unwrap() = info;
    *shared.status.write().unwrap() = Status::Ready;
    eprintln!("ds4-server: model ready");
    let mut w = Worker {
        vocab: tok.vocab_size(),
        eos: tok.specials().eos,
        tok,
        session: None,
        disk,
        last_stored: 0,
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
                    w.session = None;
                    let _ = events.send(Event::Failed("internal error in the engine".into()));
                }
                shared.metrics.running.fetch_sub(1, Ordering::SeqCst);
            }
            WorkerMsg::Shutdown => break,
        }
    }
    // Fail whatever is still queued, then write the shutdown checkpoint.
    while let Ok(WorkerMsg::Job(job)) = rx.try_recv() {
        shared.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
        let _ = job
            .events
            .send(Event::Failed("server shutting down".into()));
    }
    w.checkpoint_live(Reason::Shutdown);
}

struct Worker {
    shared: Arc<Shared>,
    tok: Arc<Tokenizer>,
    vocab: usize,
    eos: u32,
    session: Option<Session>,
    disk: Option<Arc<DiskCache>>,
    /// Token count of the last continued/cold store of the live session.
    last_stored: usize,
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

impl Worker {
    fn cfg(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    fn new_session(&self) -> Session {
        Session::new(self.vocab, self.cfg().ctx, self.cfg().test_delay)
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

    /// Decides how much of the prompt the KV state already holds (protocol.md §5.2) and
    /// makes the live session that state. Returns the effective prompt and the cached count.
    fn sync_plan(&mut self, p: &Prepared) -> (Vec<u32>, usize, &'static str) {
        if let Some(s) = &self.session {
            let live = s.tokens();
            if !live.is_empty() && live.len() <= p.tokens.len() && p.tokens.starts_with(live) {
                return (p.tokens.clone(), live.len(), "memory-token");
            }
            if !live.is_empty() {
                let bytes = self.tok.decode(live);
                if bytes.len() <= p.text.len()
                    && p.text.is_char_boundary(bytes.len())
                    && p.text.as_bytes().starts_with(&bytes)
                {
                    let mut eff = live.to_vec();
                    eff.extend(self.encode_suffix(p, bytes.len()));
                    let n = live.len();
                    return (eff, n, "memory-text");
                }
            }
        }
        // Miss: keep the live state on disk before replacing it.
        self.checkpoint_live(Reason::Evict);
        self.session = None;
        self.last_stored = 0;
        if let Some(disk) = self.disk.clone() {
            let min = self.cfg().kv_min_tokens as u32;
            if let Some(hit) = disk.lookup(p.text.as_bytes(), self.cfg().ctx as u32, min) {
                if p.text.is_char_boundary(hit.text_len) {
                    let c = self.cfg();
                    match Session::restore(self.vocab, c.ctx, c.test_delay, &hit.payload) {
                        Ok(s) if s.tokens().len() == hit.tokens as usize => {
                            let mut eff = s.tokens().to_vec();
                            let n = eff.len();
                            eff.extend(self.encode_suffix(p, hit.text_len));
                            {
                                let mut mem = self.shared.tool_memory.lock().unwrap();
                                for (id, dsml) in hit.tool_map.iter().cloned() {
                                    mem.insert(id, dsml.into(), c.tool_memory_max_ids);
                                }
                            }
                            disk.touch(&hit, n > c.kv_cold_max_tokens);
                            eprintln!(
                                "ds4-server: kv cache: disk hit {} tokens ({})",
                                n,
                                hit.path.display()
                            );
                            self.last_stored = n;
                            self.session = Some(s);
                            return (eff, n, "disk-text");
                        }
                        Ok(_) | Err(_) => {
                            eprintln!(
                                "ds4-server: kv cache: removing unusable checkpoint {}",
                                hit.path.display()
                            );
                            let _ = std::fs::remove_file(&hit.path);
                        }
                    }
                }
            }
        }
        self.session = Some(self.new_session());
        (p.tokens.clone(), 0, "cold")
    }

    /// Where a cold prompt of `n` tokens is checkpointed (protocol.md §5.6), if at all.
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

    /// Stores the live session to disk (if enabled and long enough).
    fn checkpoint_live(&mut self, reason: Reason) {
        let (Some(disk), Some(s)) = (self.disk.clone(), self.session.as_ref()) else {
            return;
        };
        let n = s.tokens().len();
        if n < self.cfg().kv_min_tokens || n == 0 {
            return;
        }
        if matches!(reason, Reason::Evict | Reason::Shutdown) && n == self.last_stored {
            // Already on disk at this exact length.
            return;
        }
        let text = self.tok.decode(s.tokens());
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
            self.cfg().ctx as u32,
            reason,
            &s.snapshot(),
            &tool_map,
        ) {
            Ok(path) => {
                self.last_stored = n;
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
            }
            Err(e) => eprintln!(
                "ds4-server: kv cache: {} checkpoint skipped: {e}",
                reason.name()
            ),
        }
    }

    fn run(&mut self, job: Job) {
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

        // ---- prefill (with reuse and checkpoints)
        let (eff, cached, source) = self.sync_plan(p);
        self.hit(source);
        if eff.len() >= ctx {
            send(Event::Failed(format!(
                "Prompt has {} tokens, but the configured context size is {ctx} tokens",
                eff.len()
            )));
            return;
        }
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
        for cut in cuts {
            if cut <= pos {
                continue;
            }
            let base = pos - cached;
            let piece = &eff[pos..cut];
            let session = self.session.as_mut().expect("session after sync");
            let mut cb = |done: usize, _n: usize| {
                if last_progress.elapsed() >= Duration::from_millis(200) {
                    last_progress = Instant::now();
                    send(Event::Prefill {
                        done: base + done,
                        total,
                    });
                }
                !cancelled()
            };
            if let Err(e) = session.prefill_with(piece, &mut cb) {
                if cancelled() {
                    eprintln!("ds4-server: prefill cancelled (client gone)");
                    return;
                }
                self.session = None;
                send(Event::Failed(format!("prefill failed: {e}")));
                return;
            }
            pos = cut;
            if Some(cut) == cold_at {
                self.checkpoint_live(Reason::Cold);
            } else if step > 0 && cut.is_multiple_of(step) && cut > self.last_stored {
                self.checkpoint_live(Reason::Continued);
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
        let mut sampler = Sampler::new(if p.thinking {
            SamplerConfig {
                seed: job.sampling.seed,
                ..SamplerConfig::default()
            }
        } else {
            job.sampling
        });
        let mut script: Option<VecDeque<u32>> = self.cfg().test_output.as_ref().map(|v| {
            let k = self.shared.gen_counter.fetch_add(1, Ordering::SeqCst);
            let s = if v.is_empty() { "" } else { &v[k % v.len()] };
            let mut t: VecDeque<u32> = self.tok.encode(s, EncodeMode::Render).into();
            t.push_back(self.eos);
            t
        });
        let mut parser = p.chat.then(|| chat_shim::StreamParser::new(p.thinking));
        let mut decoder = self.tok.stream_decoder();
        let stops: Vec<&String> = job.stop.iter().filter(|s| !s.is_empty()).collect();
        let max_stop = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut raw = String::new();
        let mut fed = 0usize;
        let mut generated = 0usize;
        let mut finish = Finish::Length;
        let mut ids: Vec<String> = Vec::new();
        let mut reasoning_closed = false;
        let t_decode = Instant::now();

        let mut forward = |text: &str,
                           parser: &mut Option<chat_shim::StreamParser>,
                           ids: &mut Vec<String>,
                           eof: bool|
         -> bool {
            let evs = match parser {
                Some(pp) => {
                    let mut v = pp.push(text);
                    if eof {
                        v.extend(pp.finish());
                    }
                    v
                }
                None => {
                    if !text.is_empty() {
                        send(Event::Content(text.to_string()));
                    }
                    return false;
                }
            };
            let mut block_done = false;
            for e in evs {
                match e {
                    StreamEvent::Reasoning(s) => send(Event::Reasoning(s)),
                    StreamEvent::ReasoningDone => {
                        reasoning_closed = true;
                        send(Event::ReasoningDone)
                    }
                    StreamEvent::Content(s) => send(Event::Content(s)),
                    StreamEvent::ToolStart { index, name } => {
                        let id = new_call_id(job.call_id_prefix);
                        ids.push(id.clone());
                        send(Event::ToolStart { index, id, name })
                    }
                    StreamEvent::ToolArgs { index, fragment } => {
                        send(Event::ToolArgs { index, fragment })
                    }
                    StreamEvent::BlockDone => block_done = true,
                }
            }
            block_done
        };

        while generated < budget {
            if cancelled() {
                finish = Finish::Error;
                break;
            }
            let session = self.session.as_mut().expect("session");
            let structural = job.tools_active
                && parser
                    .as_ref()
                    .is_some_and(|pp| pp.syntax_state() == SyntaxState::Structural);
            let token = match script.as_mut() {
                Some(s) => s.pop_front().unwrap_or(self.eos),
                None if structural => argmax(session.logits()),
                None => sampler.sample(session.logits()),
            };
            if token == self.eos {
                finish = Finish::Stop;
                break;
            }
            if step > 0 {
                let n = session.tokens().len();
                let in_block = parser.as_ref().is_some_and(|pp| pp.in_block());
                if n.is_multiple_of(step) && n > self.last_stored && !in_block {
                    self.checkpoint_live(Reason::Continued);
                }
            }
            let session = self.session.as_mut().expect("session");
            if let Err(e) = session.decode(token) {
                eprintln!("ds4-server: decode failed: {e}");
                finish = Finish::Error;
                break;
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
                if forward(&chunk, &mut parser, &mut ids, false) {
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
        forward(&rest, &mut parser, &mut ids, true);
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
            reasoning_closed,
        };
        if p.chat {
            let parsed = chat_shim::parse_completion(&raw, p.thinking);
            out.reasoning = parsed.reasoning;
            out.content = parsed.content;
            if parsed.malformed && finish != Finish::Error {
                eprintln!("ds4-server: invalid tool call returned as assistant text");
                if finish == Finish::ToolCalls {
                    out.finish = Finish::Stop;
                }
            }
            if !parsed.calls.is_empty() && finish != Finish::Error {
                let block: Arc<str> = parsed.raw_dsml.unwrap_or_default().into();
                let mut mem = self.shared.tool_memory.lock().unwrap();
                for (i, c) in parsed.calls.into_iter().enumerate() {
                    let id = ids
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| new_call_id(job.call_id_prefix));
                    mem.insert(id.clone(), block.clone(), self.cfg().tool_memory_max_ids);
                    out.calls.push(ToolCall {
                        id,
                        name: c.name,
                        arguments: c.arguments,
                    });
                }
                out.finish = Finish::ToolCalls;
            } else if finish == Finish::ToolCalls {
                out.finish = Finish::Stop;
            }
        }
        send(Event::Done(Box::new(out)));
    }
}

/// `json.dumps`-style serialisation (", " and ": " separators) used for canonical DSML.
pub fn json_spaced(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(json_spaced).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!(
                    "{}: {}",
                    serde_json::to_string(k).unwrap_or_default(),
                    json_spaced(v)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}
