//! The rollout engine: batched sampling with log-probs on llama.cpp, step-aware trajectories,
//! KV-fork resets, adapter hot-swap.
//!
//! [`Engine::start`] loads a model and spawns the thread that owns the llama.cpp context. An
//! `Engine` is a cheap, cloneable, thread-safe handle: any thread submits requests, and requests
//! from different callers share decode batches. The engine stops when the last handle drops.
//!
//! ```no_run
//! use gpo::engine::{Engine, EngineConfig, GenerateRequest, Prompt, SamplingParams};
//! let engine = Engine::start(EngineConfig::new("model.gguf"))?;
//! let out = engine.generate(GenerateRequest::new(Prompt::user("2+2?"), 4, SamplingParams::default()))?;
//! let forks = engine.fork(&out[0], out[0].steps[0].end, 4, SamplingParams::default())?;
//! # Ok::<(), gpo::Error>(())
//! ```

pub mod logprob;
pub mod request;
mod scheduler;
pub mod steps;
pub mod trajectory;

pub use request::{ForkOrigin, GenerateRequest, Prompt, SamplingParams};
pub use steps::{StepConfig, StepSpan};
pub use trajectory::{FinishReason, Trajectory};

pub use crate::llama::KvMode;
use crate::llama::{Context, ContextParams, Model, ModelParams, Token};
use crate::{Error, Result};
use crossbeam_channel::{Receiver, Sender};
use scheduler::{Command, Job, Scheduler};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Engine settings. Defaults suit the bundled small model on a CPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    /// GGUF model file.
    pub model: PathBuf,
    /// Layers offloaded to the GPU (negative = all; ignored by CPU builds).
    pub n_gpu_layers: i32,
    /// CPU threads (0 = all cores).
    pub n_threads: i32,
    /// Total KV cells over all sequences (per-sequence mode: each holds n_ctx / n_parallel).
    pub n_ctx: u32,
    /// Parallel sequences (llama.cpp sequence ids); running plus cached prefixes.
    pub n_parallel: u32,
    /// Largest batch per decode call.
    pub n_batch: u32,
    /// KV layout (see [`KvMode`]); default chosen by measurement, see the README.
    pub kv_mode: KvMode,
    /// Most tokens idle cached prefixes may hold before the least recently used is evicted.
    pub max_cached_tokens: usize,
    /// Flash attention (None = llama.cpp decides).
    pub flash_attn: Option<bool>,
    /// Keep K/V in f32 instead of f16: log-probs without KV rounding, at twice the KV memory.
    pub kv_f32: bool,
    /// Reuse cached prefixes by KV fork (default true; false recomputes every prefix, for A/B runs).
    pub prefix_cache: bool,
    /// Where decoding sequences draw their tokens (see [`SamplingBackend`]).
    pub sampling: SamplingBackend,
}

/// Where tokens are sampled and their log-probs computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SamplingBackend {
    /// The graph when the model runs on a GPU (the logit rows then stay on the device), the host
    /// otherwise: on the CPU the graph's top-k sorts the whole row and measured 0.91× the host
    /// path for truncated sampling (README, "Sampling in the graph").
    #[default]
    Auto,
    /// Inside llama.cpp's decode graph (its backend-sampling API): one token and one log-prob
    /// come back per sequence instead of a vocabulary row. llama.cpp's CPU, CUDA and Metal
    /// backends run the whole chain there; a chain a backend cannot run falls back to the host.
    /// A sequence's first token is drawn on the host (its request's samples share that row).
    Graph,
    /// On the host: every logit row is copied back and one fused pass computes the log-prob
    /// (the reference the graph path is tested against).
    Host,
}

impl std::str::FromStr for SamplingBackend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(SamplingBackend::Auto),
            "graph" => Ok(SamplingBackend::Graph),
            "host" => Ok(SamplingBackend::Host),
            _ => Err(Error::invalid("sampling", format!("{s:?} is not one of auto, graph, host"))),
        }
    }
}

impl EngineConfig {
    /// `model` with `parallel` sequences of `ctx_per_sequence` KV cells each (the other
    /// settings default).
    pub fn slots(model: impl Into<PathBuf>, parallel: u32, ctx_per_sequence: u32) -> EngineConfig {
        EngineConfig {
            model: model.into(),
            n_ctx: ctx_per_sequence.saturating_mul(parallel.max(1)),
            n_parallel: parallel,
            ..Default::default()
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            model: PathBuf::new(),
            n_gpu_layers: -1,
            n_threads: 0,
            n_ctx: 16 * 1024,
            n_parallel: 16,
            n_batch: 512,
            // Measured (README, "KV layout"): per-sequence decodes as fast as the raw loop and is
            // not slowed by cached prefixes; unified attention spans every cached cell.
            kv_mode: KvMode::PerSequence,
            max_cached_tokens: usize::MAX,
            flash_attn: None,
            kv_f32: false,
            prefix_cache: true,
            sampling: SamplingBackend::Auto,
        }
    }
}

impl EngineConfig {
    /// Defaults with the given model.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        EngineConfig { model: model.into(), ..Default::default() }
    }
}

/// What the engine serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineInfo {
    /// Model file.
    pub model: PathBuf,
    /// `general.architecture`.
    pub architecture: String,
    /// llama.cpp's short description.
    pub description: String,
    /// Vocabulary size.
    pub n_vocab: i32,
    /// BOS token.
    pub bos: Option<Token>,
    /// EOS token.
    pub eos: Option<Token>,
    /// The model's chat template.
    pub chat_template: Option<String>,
    /// Total KV cells.
    pub n_ctx: u32,
    /// KV cells per sequence (the longest prompt + completion).
    pub n_ctx_seq: u32,
    /// Parallel sequences.
    pub n_parallel: u32,
    /// KV layout.
    pub kv_mode: KvMode,
    /// Whether decoding sequences sample inside the graph (the resolved [`SamplingBackend`]).
    pub graph_sampling: bool,
    /// Most tokens one decode call takes.
    pub n_batch: u32,
}

/// Counters since start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EngineStats {
    /// Requests submitted.
    pub requests: u64,
    /// Sequences finished (any reason).
    pub finished_sequences: u64,
    /// Tokens sampled.
    pub generated_tokens: u64,
    /// Prompt / prefix tokens computed.
    pub prefill_tokens: u64,
    /// Tokens of those sampled inside llama.cpp's decode graph (see `EngineConfig::sampling`).
    pub graph_sampled_tokens: u64,
    /// Prefix tokens reused from the KV instead of computed.
    pub reused_tokens: u64,
    /// KV forks (sequence copies).
    pub forks: u64,
    /// Cached prefixes evicted.
    pub evictions: u64,
    /// Running sequences preempted for lack of KV.
    pub preemptions: u64,
    /// `llama_decode` calls.
    pub decode_calls: u64,
    /// Time inside `llama_decode`.
    pub decode_seconds: f64,
    /// Adapter swaps.
    pub adapter_swaps: u64,
    /// Current adapter version (0 = base model).
    pub adapter_version: u64,
    /// Sequences running now.
    pub running: usize,
    /// Idle sequences whose KV is kept for reuse.
    pub cached: usize,
    /// Tokens held by cached sequences.
    pub cached_tokens: usize,
    /// Queue length.
    pub waiting: usize,
}

/// Events of one request.
#[derive(Debug)]
pub enum Event {
    /// A token was sampled (only for `stream` requests).
    Token {
        /// Request id.
        request: u64,
        /// Sequence index within the request.
        index: usize,
        /// Token id.
        token: Token,
        /// Its log-prob.
        logprob: f32,
    },
    /// A sequence finished.
    Finished(Trajectory),
    /// The request failed as a whole.
    Failed(Error),
}

struct Inner {
    tx: Sender<Command>,
    model: Arc<Model>,
    info: EngineInfo,
    next_request: AtomicU64,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.lock().map(|mut g| g.take()).unwrap_or(None) {
            let _ = t.join();
        }
    }
}

/// Handle to a running engine. Clone it freely; it is `Send + Sync`.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// A submitted request: its events, and a way to cancel it.
pub struct RequestHandle {
    /// Request id.
    pub id: u64,
    n: usize,
    events: Receiver<Event>,
    cancelled: Arc<AtomicBool>,
    wake: Sender<Command>,
    done: bool,
}

/// Cancels one request from any thread (cloneable; outlives nothing it needs).
#[derive(Clone)]
pub struct Canceller {
    cancelled: Arc<AtomicBool>,
    wake: Sender<Command>,
}

impl Canceller {
    /// Asks the engine to stop the request; its sequences finish with `Cancelled`.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        let _ = self.wake.send(Command::Wake);
    }
}

impl RequestHandle {
    /// A handle that cancels this request from another thread.
    pub fn canceller(&self) -> Canceller {
        Canceller { cancelled: self.cancelled.clone(), wake: self.wake.clone() }
    }

    /// The event stream (tokens if streaming, then one `Finished` per sequence).
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// Asks the engine to stop this request; its sequences finish with `Cancelled`.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
        let _ = self.wake.send(Command::Wake);
    }

    /// Waits for all sequences; trajectories come back in index order. A cancelled request
    /// gives `Err(Cancelled)`.
    pub fn wait(mut self) -> Result<Vec<Trajectory>> {
        let mut out: Vec<Option<Trajectory>> = vec![None; self.n];
        let mut left = self.n;
        let mut cancelled = false;
        while left > 0 {
            match self.events.recv() {
                Ok(Event::Finished(t)) => {
                    cancelled |= t.finish == FinishReason::Cancelled;
                    let i = t.index;
                    if out[i].replace(t).is_none() {
                        left -= 1;
                    }
                }
                Ok(Event::Token { .. }) => {}
                Ok(Event::Failed(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => return Err(Error::EngineStopped("the engine thread exited".into())),
            }
        }
        self.done = true;
        if cancelled {
            return Err(Error::Cancelled);
        }
        Ok(out.into_iter().map(|t| t.expect("all finished")).collect())
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        if !self.done {
            self.cancel(); // nobody will read the results
        }
    }
}

impl Engine {
    /// Loads the model, creates the context and starts the engine thread.
    pub fn start(cfg: EngineConfig) -> Result<Engine> {
        if cfg.n_parallel == 0 {
            return Err(Error::invalid("n_parallel", "must be at least 1"));
        }
        let model = Model::load(&cfg.model, &ModelParams { n_gpu_layers: cfg.n_gpu_layers, ..Default::default() })?;
        let params = ContextParams {
            n_ctx: cfg.n_ctx,
            n_batch: cfg.n_batch.max(cfg.n_parallel),
            n_seq_max: cfg.n_parallel,
            n_threads: cfg.n_threads,
            kv_mode: cfg.kv_mode,
            flash_attn: cfg.flash_attn,
            kv_f32: cfg.kv_f32,
        };
        let ctx = Context::new(model.clone(), &params)?;
        let graph_sampling = match cfg.sampling {
            SamplingBackend::Graph => true,
            SamplingBackend::Host => false,
            SamplingBackend::Auto => cfg.n_gpu_layers != 0 && crate::llama::has_gpu(),
        };
        let info = EngineInfo {
            model: cfg.model.clone(),
            architecture: model.architecture(),
            description: model.description(),
            n_vocab: model.n_vocab(),
            bos: model.bos(),
            eos: model.eos(),
            chat_template: model.chat_template(),
            n_ctx: ctx.n_ctx(),
            n_ctx_seq: ctx.n_ctx_seq(),
            n_parallel: cfg.n_parallel,
            kv_mode: cfg.kv_mode,
            graph_sampling,
            n_batch: ctx.n_batch(),
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let scheduler = Scheduler::new(ctx, rx, cfg.max_cached_tokens, cfg.prefix_cache, graph_sampling);
        let thread = std::thread::Builder::new()
            .name("gpo-engine".into())
            .spawn(move || {
                let mut scheduler = scheduler;
                scheduler.bind_thread();
                scheduler.run()
            })
            .map_err(|e| Error::EngineStopped(format!("could not spawn the engine thread: {e}")))?;
        Ok(Engine {
            inner: Arc::new(Inner {
                tx,
                model,
                info,
                next_request: AtomicU64::new(0),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// What the engine serves.
    pub fn info(&self) -> &EngineInfo {
        &self.inner.info
    }

    /// The model (tokenizer, chat template, metadata); usable from any thread.
    pub fn model(&self) -> &Arc<Model> {
        &self.inner.model
    }

    /// Turns a prompt into tokens exactly as the engine will.
    pub fn tokenize_prompt(&self, prompt: &Prompt) -> Result<Vec<Token>> {
        prompt.tokens(&self.inner.model)
    }

    /// Submits a request and returns at once; see [`RequestHandle`].
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestHandle> {
        Ok(self.submit_many(vec![req])?.remove(0))
    }

    /// Submits several requests as one unit: the engine admits them together, so how they are
    /// batched (and therefore every sampled token) does not depend on thread timing.
    pub fn submit_many(&self, reqs: Vec<GenerateRequest>) -> Result<Vec<RequestHandle>> {
        let mut jobs = Vec::with_capacity(reqs.len());
        let mut handles = Vec::with_capacity(reqs.len());
        for req in reqs {
            let (job, handle) = self.prepare(req)?;
            jobs.push(Arc::new(job));
            handles.push(handle);
        }
        self.send(Command::Submit(jobs))?;
        Ok(handles)
    }

    fn prepare(&self, req: GenerateRequest) -> Result<(Job, RequestHandle)> {
        if req.n == 0 {
            return Err(Error::invalid("n", "a request needs at least one sequence"));
        }
        let limit = self.inner.info.n_parallel as usize * 64;
        if req.n > limit {
            return Err(Error::invalid("n", format!("{} sequences in one request (at most {limit})", req.n)));
        }
        req.sampling.validate()?;
        req.steps.validate()?;
        let context = self.tokenize_prompt(&req.prompt)?;
        let capacity = self.inner.info.n_ctx_seq as usize;
        if context.len() >= capacity {
            return Err(Error::PromptTooLong { tokens: context.len(), limit: capacity.saturating_sub(1) });
        }
        let prompt_len = req.prompt_len.unwrap_or(context.len());
        if prompt_len > context.len() {
            return Err(Error::invalid(
                "prompt_len",
                format!("{prompt_len} exceeds the {} prompt tokens", context.len()),
            ));
        }
        let id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events) = crossbeam_channel::unbounded();
        let cancelled = Arc::new(AtomicBool::new(false));
        let job = Job {
            id,
            context: Arc::new(context),
            prompt_len,
            sampling: req.sampling,
            steps: req.steps,
            stream: req.stream,
            origin: req.origin,
            n: req.n,
            events: events_tx,
            cancelled: cancelled.clone(),
        };
        let handle = RequestHandle { id, n: req.n, events, cancelled, wake: self.inner.tx.clone(), done: false };
        Ok((job, handle))
    }

    /// Submits and waits.
    pub fn generate(&self, req: GenerateRequest) -> Result<Vec<Trajectory>> {
        self.submit(req)?.wait()
    }

    /// Submits several requests as one unit (they share batches) and waits for all.
    pub fn generate_many(&self, reqs: Vec<GenerateRequest>) -> Result<Vec<Vec<Trajectory>>> {
        self.submit_many(reqs)?.into_iter().map(RequestHandle::wait).collect()
    }

    /// Builds the request that continues `parent` after its first `at` generated tokens.
    pub fn fork_request(
        &self,
        parent: &Trajectory,
        at: usize,
        n: usize,
        sampling: SamplingParams,
    ) -> Result<GenerateRequest> {
        GenerateRequest::continuing(parent, at, n, sampling)
    }

    /// Samples `n` continuations of `parent` from its `at`-th generated token. The prefix KV is
    /// forked from the cache while it is held there, and recomputed transparently otherwise.
    pub fn fork(&self, parent: &Trajectory, at: usize, n: usize, sampling: SamplingParams) -> Result<Vec<Trajectory>> {
        self.generate(self.fork_request(parent, at, n, sampling)?)
    }

    /// Loads a GGUF LoRA adapter and swaps it in at `scale`. Requests submitted earlier finish on
    /// the previous adapter; later ones use this one. Returns the new adapter version.
    pub fn set_adapter(&self, path: impl AsRef<Path>, scale: f32) -> Result<u64> {
        if !scale.is_finite() {
            return Err(Error::invalid("scale", "must be finite"));
        }
        self.swap(Some((path.as_ref().to_path_buf(), scale)))
    }

    /// Removes the adapter (back to the base model). Returns the new adapter version.
    pub fn remove_adapter(&self) -> Result<u64> {
        self.swap(None)
    }

    fn swap(&self, adapter: Option<(PathBuf, f32)>) -> Result<u64> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.send(Command::SetAdapter { adapter, reply })?;
        rx.recv().map_err(|_| Error::EngineStopped("the engine thread exited".into()))?
    }

    /// Drops every cached prefix, freeing its KV (running requests are not affected). Returns
    /// how many cached sequences were dropped.
    pub fn clear_cache(&self) -> Result<usize> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.send(Command::ClearCache(reply))?;
        rx.recv().map_err(|_| Error::EngineStopped("the engine thread exited".into()))
    }

    /// Counters since start.
    pub fn stats(&self) -> Result<EngineStats> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.send(Command::Stats(reply))?;
        rx.recv().map_err(|_| Error::EngineStopped("the engine thread exited".into()))
    }

    fn send(&self, c: Command) -> Result<()> {
        self.inner.tx.send(c).map_err(|_| Error::EngineStopped("the engine thread exited".into()))
    }
}
