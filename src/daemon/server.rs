//! gpod's server: connections, request dispatch over one shared engine, the training job queue,
//! persistence of jobs across restarts, graceful shutdown.

use super::protocol::{self, parse_request, AdapterChange, Limits, LoadEngine, Op, Request};
use super::socket;
use super::trust::{self, Paths, VerifierPolicy};
use crate::engine::{Canceller, Engine, EngineConfig, GenerateRequest, RequestHandle, StepConfig, Trajectory};
use crate::eval::{evaluate, EvalConfig};
use crate::fsutil::write_atomic;
use crate::gpo::{MetricsRow, Progress, RunConfig};
use crate::reward::Verifier;
use crate::{Error, Result};
use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// gpod settings (`gpod.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Socket path.
    pub socket: PathBuf,
    /// Where queued training jobs are kept (so a restarted daemon resumes them). Must be owned by
    /// the daemon's user and not writable by others; created 0700.
    pub state_dir: PathBuf,
    /// Roots for every file a client names.
    pub paths: Paths,
    /// Which external verifier commands clients may run.
    pub verifier: VerifierPolicy,
    /// Model served from the start (optional; `load` can set or replace it).
    pub model: Option<PathBuf>,
    /// Serving engine settings.
    pub engine: LoadEngine,
    /// Request limits.
    pub limits: Limits,
    /// Users allowed to connect (besides the daemon's own user and root).
    pub allowed_uids: Vec<u32>,
    /// Group that may use the socket (mode 0660); None = owner only (0600).
    pub group: Option<String>,
    /// Trajectories remembered for `fork`/`values`.
    pub remember: usize,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: PathBuf::from("/tmp/gpo.sock"),
            state_dir: trust::default_state_dir(),
            paths: Paths::default(),
            verifier: VerifierPolicy::default(),
            model: None,
            engine: LoadEngine::default(),
            limits: Limits::default(),
            allowed_uids: Vec::new(),
            group: None,
            remember: 10_000,
        }
    }
}

impl DaemonConfig {
    /// Where clients' runs write: `[paths] runs`, else `runs/` in the state directory.
    pub fn runs_root(&self) -> PathBuf {
        self.paths.runs.clone().unwrap_or_else(|| self.state_dir.join("runs"))
    }
}

/// Root and the daemon's own user see and cancel every peer's trajectories and jobs.
fn privileged(uid: u32) -> bool {
    uid == 0 || uid == socket::my_uid()
}

/// State of a training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Job id.
    pub id: u64,
    /// queued, running, done, failed, cancelled.
    pub state: String,
    /// Iterations completed.
    pub iteration: usize,
    /// Iterations of the run.
    pub iterations: usize,
    /// Output directory of the run.
    pub output: PathBuf,
    /// Error message when failed.
    pub error: Option<String>,
}

struct Job {
    info: JobInfo,
    /// The uid that queued it.
    owner: u32,
    cfg: RunConfig,
    cancel: Arc<AtomicBool>,
    /// Set by a cancel and by shutdown: interrupts the initial evaluation at once.
    interrupt: Arc<AtomicBool>,
    /// Install the final adapter into the serving engine when the job is done.
    install: bool,
    subscribers: Vec<Sender<(String, Value)>>,
}

/// Remembered trajectories with the step segmentation they were generated with (forks and
/// values of a trajectory segment their continuations the same way) and the uid they belong to.
struct Store {
    by_id: HashMap<u64, (Trajectory, StepConfig, u32)>,
    order: VecDeque<u64>,
    cap: usize,
}

impl Store {
    fn put(&mut self, ts: &[Trajectory], steps: &StepConfig, owner: u32) {
        for t in ts {
            if self.by_id.insert(t.id, (t.clone(), steps.clone(), owner)).is_none() {
                self.order.push_back(t.id);
            }
        }
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }
}

/// A sampling request in flight: `cancel` (same uid, same request id) or its connection closing
/// stops it.
struct InFlight {
    uid: u32,
    conn: u64,
    key: String,
    cancellers: Vec<Canceller>,
}

/// Everything connections share.
pub struct Shared {
    cfg: DaemonConfig,
    engine: RwLock<Option<(PathBuf, Engine)>>,
    /// The next trajectory id. The daemon numbers trajectories itself: every engine numbers its
    /// own from 0, and ids must stay unique across `load`s.
    next_id: AtomicU64,
    store: Mutex<Store>,
    jobs: Mutex<Vec<Job>>,
    job_tx: Sender<u64>,
    requests: Mutex<Vec<InFlight>>,
    /// Set by `shutdown` or SIGTERM.
    pub shutdown: Arc<AtomicBool>,
    connections: AtomicUsize,
    /// Numbers connections (for cancelling a closed connection's requests).
    next_conn: AtomicU64,
    /// Connections still open: a request that registers after its connection closed (its thread
    /// was slower than the client's hang-up) cancels itself.
    open: Mutex<HashSet<u64>>,
    /// Request threads that have not replied yet (shutdown waits for them).
    active: AtomicUsize,
    /// The serving engine's adapter file and scale (None: the base model).
    adapter: Mutex<Option<(PathBuf, f32)>>,
}

fn traj_json(t: &Trajectory) -> Value {
    json!({
        "id": t.id,
        "text": t.text,
        "tokens": t.tokens,
        "logprobs": t.logprobs,
        "steps": t.steps.iter().map(|s| [s.start, s.end]).collect::<Vec<_>>(),
        "finish": t.finish,
        "adapter_version": t.adapter_version,
        "prompt_tokens": t.prompt_len,
        "context_tokens": t.context.len(),
    })
}

fn code_of(e: &Error) -> &'static str {
    match e {
        Error::Invalid { .. } | Error::PromptTooLong { .. } | Error::Data { .. } | Error::ChatTemplate(_) => "invalid",
        Error::NotFound(_) | Error::Io { .. } => "not_found",
        Error::NotGguf { .. } | Error::ModelLoad { .. } | Error::Adapter { .. } | Error::Gguf { .. } => "model",
        Error::Cancelled => "cancelled",
        _ => "internal",
    }
}

impl Shared {
    fn engine(&self) -> Result<Engine> {
        self.engine
            .read()
            .map_err(|_| Error::EngineStopped("engine lock poisoned".into()))?
            .as_ref()
            .map(|(_, e)| e.clone())
            .ok_or_else(|| {
                Error::invalid("model", "no model loaded: send {\"op\": \"load\", \"model\": \"…gguf\"} first")
            })
    }

    fn load(&self, model: &Path, e: &LoadEngine) -> Result<Value> {
        let engine = Engine::start(EngineConfig {
            n_gpu_layers: e.gpu_layers,
            n_threads: e.threads,
            kv_mode: e.kv,
            sampling: e.sampling,
            ..EngineConfig::slots(model, e.parallel, e.ctx_per_sequence)
        })?;
        let info = serde_json::to_value(engine.info()).expect("info");
        let mut slot = self.engine.write().map_err(|_| Error::EngineStopped("engine lock poisoned".into()))?;
        *slot = Some((model.to_path_buf(), engine));
        if let Ok(mut a) = self.adapter.lock() {
            *a = None;
        }
        Ok(info)
    }

    /// Runs requests for one client request id; `cancel` with that id stops them.
    fn sample(&self, uid: u32, conn: u64, id: &Value, reqs: Vec<GenerateRequest>) -> Result<Vec<Vec<Trajectory>>> {
        let engine = self.engine()?;
        let steps: Vec<StepConfig> = reqs.iter().map(|r| r.steps.clone()).collect();
        let handles: Vec<RequestHandle> = engine.submit_many(reqs)?;
        let key = id.to_string();
        let cancellers: Vec<Canceller> = handles.iter().map(RequestHandle::canceller).collect();
        if let Ok(mut r) = self.requests.lock() {
            r.push(InFlight { uid, conn, key: key.clone(), cancellers: cancellers.clone() });
        }
        // The connection leaves `open` before it cancels what is registered, so a request
        // registered after that scan sees it gone here.
        if self.open.lock().is_ok_and(|o| !o.contains(&conn)) {
            cancellers.iter().for_each(Canceller::cancel);
        }
        let out: Result<Vec<_>> = handles.into_iter().map(RequestHandle::wait).collect();
        if let Ok(mut r) = self.requests.lock() {
            if let Some(i) = r.iter().position(|f| f.conn == conn && f.key == key) {
                r.remove(i);
            }
        }
        let mut out = out?;
        for t in out.iter_mut().flatten() {
            t.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(mut s) = self.store.lock() {
            for (ts, st) in out.iter().zip(&steps) {
                s.put(ts, st, uid);
            }
        }
        Ok(out)
    }

    /// Applies an `adapter` request to the serving engine (on its engine thread) and reports
    /// the adapter in use.
    fn adapter(&self, change: &AdapterChange) -> Result<Value> {
        let engine = self.engine()?;
        let set = match change {
            AdapterChange::Show => None,
            AdapterChange::Remove => Some(None),
            AdapterChange::File { path, scale } => {
                Some(Some((trust::confine(&self.cfg.paths.models, path, "path")?, *scale)))
            }
            AdapterChange::Run { run, scale } => {
                let dir = trust::confine(&self.cfg.runs_root(), run, "run")?;
                let file = crate::gpo::run::adapter_path(&dir);
                if !file.is_file() {
                    return Err(Error::invalid(
                        "run",
                        format!("{} has no adapter yet (no iteration finished)", run.display()),
                    ));
                }
                Some(Some((file, *scale)))
            }
        };
        let mut current = self.adapter.lock().map_err(|_| Error::EngineStopped("adapter lock".into()))?;
        let version = match set {
            None => engine.stats()?.adapter_version,
            Some(None) => {
                let v = engine.remove_adapter()?;
                *current = None;
                v
            }
            Some(Some((file, scale))) => {
                let v = engine.set_adapter(&file, scale)?;
                *current = Some((file, scale));
                v
            }
        };
        Ok(json!({
            "adapter": current.as_ref().map(|(p, _)| p.clone()),
            "scale": current.as_ref().map(|(_, s)| *s),
            "version": version,
        }))
    }

    /// A remembered trajectory of `uid`'s (any, for a privileged uid); others' are "unknown".
    fn trajectory(&self, id: u64, uid: u32) -> Result<(Trajectory, StepConfig)> {
        self.store
            .lock()
            .ok()
            .and_then(|s| s.by_id.get(&id).cloned())
            .filter(|(_, _, owner)| *owner == uid || privileged(uid))
            .map(|(t, st, _)| (t, st))
            .ok_or_else(|| Error::invalid("trajectory", format!("{id} is unknown (expired or never generated here)")))
    }

    fn dispatch(self: &Arc<Self>, uid: u32, conn: u64, req: &Request, out: &Writer) -> Result<Value> {
        match &req.op {
            Op::Status => {
                let engine = self.engine.read().ok().and_then(|g| g.as_ref().map(|(p, e)| (p.clone(), e.clone())));
                let (model, info, stats) = match engine {
                    Some((p, e)) => (
                        json!(p),
                        serde_json::to_value(e.info()).expect("info"),
                        serde_json::to_value(e.stats()?).expect("stats"),
                    ),
                    None => (Value::Null, Value::Null, Value::Null),
                };
                let jobs: Vec<JobInfo> = self
                    .jobs
                    .lock()
                    .map(|j| j.iter().filter(|j| j.owner == uid || privileged(uid)).map(|j| j.info.clone()).collect())
                    .unwrap_or_default();
                Ok(json!({
                    "version": crate::VERSION,
                    "protocol": protocol::VERSION,
                    "model": model,
                    "engine": info,
                    "stats": stats,
                    "jobs": jobs,
                    "adapter": self.adapter.lock().ok().and_then(|a| a.as_ref().map(|(p, s)| json!({"path": p, "scale": s}))),
                    "connections": self.connections.load(Ordering::Relaxed),
                }))
            }
            Op::Load { model, engine } => {
                let engine = engine.as_ref().unwrap_or(&self.cfg.engine);
                self.load(&trust::confine(&self.cfg.paths.models, Path::new(model), "model")?, engine)
            }
            Op::Generate { prompt, n, sampling, steps } => {
                let mut r = GenerateRequest::new(prompt.clone(), *n, sampling.clone());
                r.steps = steps.clone();
                let ts = self.sample(uid, conn, &req.id, vec![r])?.remove(0);
                Ok(json!({ "trajectories": ts.iter().map(traj_json).collect::<Vec<_>>() }))
            }
            Op::Fork { trajectory, at, n, sampling } => {
                let (parent, steps) = self.trajectory(*trajectory, uid)?;
                let mut r = GenerateRequest::continuing(&parent, *at, *n, sampling.clone())?;
                r.steps = steps;
                let ts = self.sample(uid, conn, &req.id, vec![r])?.remove(0);
                Ok(json!({ "trajectories": ts.iter().map(traj_json).collect::<Vec<_>>() }))
            }
            Op::Values { trajectory, rollouts, search, critical, verifier, answer, sampling } => {
                self.cfg.verifier.check(verifier)?;
                let (t, steps) = self.trajectory(*trajectory, uid)?;
                let v = Verifier::new(verifier)?;
                let model = self.engine()?.model().clone();
                let mut score = |t: &Trajectory| Ok(v.score(&model.detokenize(&t.context), &t.text, answer) as f64);
                let rollouts_src = ClientRollouts { shared: self.clone(), uid, conn, id: req.id.clone() };
                let search = crate::gpo::values::SearchConfig {
                    search: *search,
                    ..crate::gpo::values::SearchConfig::dense(*rollouts)
                };
                let sv =
                    crate::gpo::values::estimate(&rollouts_src, &t, &search, sampling, &steps, *critical, &mut score)?;
                Ok(serde_json::to_value(sv).expect("values"))
            }
            Op::Train { config, output, install } => self.queue_job(config, output.as_deref(), *install, uid),
            Op::Adapter(change) => self.adapter(change),
            Op::Eval { tasks, max_tokens } => {
                let engine = self.engine()?;
                let r =
                    evaluate(&engine, tasks, &EvalConfig { max_tokens: *max_tokens, ..Default::default() }, |_| {})?;
                Ok(
                    json!({ "tasks": r.tasks, "greedy_accuracy": r.greedy_accuracy, "correct": r.results.iter().map(|x| x.greedy_correct).collect::<Vec<_>>() }),
                )
            }
            Op::Cancel { target } => {
                let mut n = 0;
                if let Some(job) = target.get("job").and_then(Value::as_u64) {
                    if let Ok(jobs) = self.jobs.lock() {
                        for j in jobs.iter().filter(|j| j.info.id == job && (j.owner == uid || privileged(uid))) {
                            j.cancel.store(true, Ordering::Relaxed);
                            j.interrupt.store(true, Ordering::Relaxed);
                            if matches!(j.info.state.as_str(), "queued" | "running") {
                                // Persisted at once: a restart must not resume a cancelled job.
                                let _ = write_atomic(&self.job_file(job, "cancelled"), b"");
                            }
                            n += 1;
                        }
                    }
                } else if let Ok(r) = self.requests.lock() {
                    let key = target.to_string();
                    for f in r.iter().filter(|f| f.uid == uid && f.key == key) {
                        for c in &f.cancellers {
                            c.cancel();
                        }
                        n += 1;
                    }
                }
                Ok(json!({ "cancelled": n }))
            }
            Op::Subscribe { job } => {
                let (tx, rx) = crossbeam_channel::unbounded();
                let done = {
                    let mut jobs = self.jobs.lock().map_err(|_| Error::EngineStopped("job lock".into()))?;
                    let j = jobs
                        .iter_mut()
                        .find(|j| j.info.id == *job && (j.owner == uid || privileged(uid)))
                        .ok_or_else(|| Error::invalid("job", format!("{job} is unknown")))?;
                    let finished = matches!(j.info.state.as_str(), "done" | "failed" | "cancelled");
                    if !finished {
                        j.subscribers.push(tx);
                    }
                    finished.then(|| j.info.clone())
                };
                if let Some(info) = done {
                    return Ok(serde_json::to_value(info).expect("job"));
                }
                // Stream events until the job ends; the reply closes the subscription.
                while let Ok((kind, data)) = rx.recv() {
                    out.line(&protocol::event(&req.id, &kind, data.clone()));
                    if kind != "progress" {
                        return Ok(data);
                    }
                }
                Err(Error::EngineStopped("the daemon is shutting down".into()))
            }
            Op::Shutdown => {
                if uid != socket::my_uid() && uid != 0 {
                    return Err(Error::invalid("permission", "only the daemon's user may shut it down"));
                }
                self.shutdown.store(true, Ordering::Relaxed);
                Ok(json!({ "stopping": true }))
            }
        }
    }

    /// Puts a finished run's adapter into the serving engine, if it serves the run's model.
    fn install(&self, run: &RunConfig) -> Result<Value> {
        let trained = match &run.model {
            Some(m) => m.clone(),
            None => crate::models::default_model_path(),
        };
        let serving = self.engine.read().ok().and_then(|g| g.as_ref().map(|(p, _)| p.clone()));
        let same = |a: &Path, b: &Path| a.canonicalize().ok().is_some_and(|a| b.canonicalize().ok() == Some(a));
        match serving {
            Some(s) if same(&s, &trained) => {}
            Some(s) => {
                return Err(Error::invalid(
                    "install",
                    format!("trained on {} but serving {}; not installed", trained.display(), s.display()),
                ))
            }
            None => return Err(Error::invalid("install", "no model is being served")),
        }
        let rel = run.output.strip_prefix(self.cfg.runs_root()).unwrap_or(&run.output).to_path_buf();
        self.adapter(&AdapterChange::Run { run: rel, scale: 1.0 })
    }

    /// `jobs/<id>.<ext>` in the state directory.
    fn job_file(&self, id: u64, ext: &str) -> PathBuf {
        self.cfg.state_dir.join("jobs").join(format!("{id:06}.{ext}"))
    }

    /// Confines a run configuration a client sent (or a restored job's) to the daemon's roots
    /// and verifier policy.
    fn confine_run(&self, cfg: &mut RunConfig) -> Result<()> {
        trust::confine_run(cfg, &self.cfg.paths.models, &self.cfg.runs_root(), &self.cfg.verifier)
    }

    fn queue_job(&self, config: &str, output: Option<&Path>, install: bool, uid: u32) -> Result<Value> {
        // Parsed without a base directory: relative paths stay relative to the daemon's roots.
        let mut cfg = RunConfig::from_toml(config, Path::new("")).map_err(|e| match e {
            Error::Data { reason, .. } => Error::invalid("config", reason),
            e => e,
        })?;
        if let Some(o) = output {
            cfg.output = o.to_path_buf();
        }
        self.confine_run(&mut cfg)?;
        let mut jobs = self.jobs.lock().map_err(|_| Error::EngineStopped("job lock".into()))?;
        let dir = self.cfg.state_dir.join("jobs");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // Unique across restarts: past every job this state directory has ever held.
        let on_disk = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .flatten()
            .filter_map(|e| e.path().file_stem()?.to_str()?.parse::<u64>().ok())
            .max();
        let id = jobs.iter().map(|j| j.info.id).chain(on_disk).max().unwrap_or(0) + 1;
        // Owner and install marker first: the job file's appearance makes the job real.
        write_atomic(&self.job_file(id, "owner"), uid.to_string().as_bytes())?;
        if install {
            write_atomic(&self.job_file(id, "install"), b"")?;
        }
        let text = toml::to_string(&cfg).map_err(|e| Error::invalid("config", e.to_string()))?;
        write_atomic(&self.job_file(id, "toml"), text.as_bytes())?;
        let info = JobInfo {
            id,
            state: "queued".into(),
            iteration: 0,
            iterations: cfg.iterations,
            output: cfg.output.clone(),
            error: None,
        };
        jobs.push(Job {
            info: info.clone(),
            owner: uid,
            cfg,
            cancel: Arc::new(AtomicBool::new(false)),
            interrupt: Arc::new(AtomicBool::new(false)),
            install,
            subscribers: Vec::new(),
        });
        let _ = self.job_tx.send(id);
        Ok(serde_json::to_value(info).expect("job"))
    }

    fn job_event(&self, id: u64, kind: &str, data: Value, update: impl FnOnce(&mut JobInfo)) {
        if let Ok(mut jobs) = self.jobs.lock() {
            if let Some(j) = jobs.iter_mut().find(|j| j.info.id == id) {
                update(&mut j.info);
                j.subscribers.retain(|s| s.send((kind.to_string(), data.clone())).is_ok());
                if kind != "progress" {
                    j.subscribers.clear();
                }
            }
        }
    }
}

/// The daemon's `Rollouts`: samples on the shared engine, cancellable with the request's id.
struct ClientRollouts {
    shared: Arc<Shared>,
    uid: u32,
    conn: u64,
    id: Value,
}

impl crate::gpo::collect::Rollouts for ClientRollouts {
    fn sample(&self, reqs: Vec<GenerateRequest>) -> Result<Vec<Vec<Trajectory>>> {
        self.shared.sample(self.uid, self.conn, &self.id, reqs)
    }
    fn render(&self, tokens: &[i32]) -> String {
        self.shared.engine().map(|e| e.model().detokenize_special(tokens)).unwrap_or_default()
    }
}

struct JobProgress<'a> {
    shared: &'a Shared,
    id: u64,
    cancel: Arc<AtomicBool>,
    interrupt: Arc<AtomicBool>,
}

impl Progress for JobProgress<'_> {
    fn phase(&mut self, iteration: usize, what: &str) {
        self.shared.job_event(self.id, "progress", json!({ "iteration": iteration, "phase": what }), |_| {});
    }
    fn iteration(&mut self, r: &MetricsRow) {
        let data = serde_json::to_value(r).expect("row");
        self.shared.job_event(self.id, "progress", json!({ "iteration": r.iteration, "metrics": data }), |i| {
            i.iteration = r.iteration + 1
        });
    }
    fn should_stop(&mut self, at_boundary: bool) -> bool {
        // A job cancel stops at once; a daemon shutdown finishes the current iteration first.
        self.cancel.load(Ordering::Relaxed) || (at_boundary && self.shared.shutdown.load(Ordering::Relaxed))
    }
    fn cancel_flag(&self) -> Option<Arc<AtomicBool>> {
        Some(self.interrupt.clone())
    }
}

fn job_worker(shared: Arc<Shared>, rx: Receiver<u64>) {
    while let Ok(id) = rx.recv() {
        if shared.shutdown.load(Ordering::Relaxed) {
            return;
        }
        let (cfg, cancel, interrupt, install) = match shared.jobs.lock().ok().and_then(|j| {
            j.iter()
                .find(|j| j.info.id == id)
                .map(|j| (j.cfg.clone(), j.cancel.clone(), j.interrupt.clone(), j.install))
        }) {
            Some(x) => x,
            None => continue,
        };
        if cancel.load(Ordering::Relaxed) {
            finish_job(&shared, id, "cancelled", None);
            continue;
        }
        shared.job_event(id, "progress", json!({ "state": "running" }), |i| i.state = "running".into());
        let mut p = JobProgress { shared: &shared, id, cancel: cancel.clone(), interrupt };
        match crate::gpo::run(&cfg, &mut p) {
            Ok(rows) => {
                let mut data = json!({ "iterations": rows.len() });
                if install {
                    data["installed"] = match shared.install(&cfg) {
                        Ok(v) => v,
                        Err(e) => json!({ "error": e.to_string() }),
                    };
                }
                finish_job(&shared, id, "done", Some(data))
            }
            Err(Error::Cancelled) if shared.shutdown.load(Ordering::Relaxed) && !cancel.load(Ordering::Relaxed) => {
                // Interrupted by shutdown: the job stays queued on disk and resumes next start.
                shared.job_event(id, "interrupted", json!({ "resumes": true }), |i| i.state = "interrupted".into());
                return;
            }
            Err(Error::Cancelled) => finish_job(&shared, id, "cancelled", None),
            Err(e) => finish_job(&shared, id, "failed", Some(json!({ "error": e.to_string() }))),
        }
    }
}

fn finish_job(shared: &Shared, id: u64, state: &str, data: Option<Value>) {
    let _ =
        write_atomic(&shared.job_file(id, state), data.as_ref().map(|d| d.to_string()).unwrap_or_default().as_bytes());
    let err = data.as_ref().and_then(|d| d.get("error")).and_then(Value::as_str).map(str::to_string);
    let kind = if state == "done" { "done" } else { "failed" };
    shared.job_event(id, kind, json!({ "job": id, "state": state, "result": data }), |i| {
        i.state = state.into();
        i.error = err;
    });
}

/// Jobs queued or running when the daemon stopped (no done/failed/cancelled marker), with the
/// uid that queued them (the daemon's own for jobs written before owners were recorded).
fn restore_jobs(state_dir: &Path) -> Vec<(u64, u32, bool, RunConfig)> {
    let dir = state_dir.join("jobs");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else { return out };
    let mut paths: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect();
    paths.sort();
    for p in paths {
        let Some(id) = p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok()) else { continue };
        if ["done", "failed", "cancelled"].iter().any(|m| p.with_extension(m).exists()) {
            continue;
        }
        let owner = std::fs::read_to_string(p.with_extension("owner"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(socket::my_uid);
        match std::fs::read_to_string(&p).ok().and_then(|t| toml::from_str::<RunConfig>(&t).ok()) {
            Some(cfg) => out.push((id, owner, p.with_extension("install").exists(), cfg)),
            None => tracing::warn!("skipping unreadable job {}", p.display()),
        }
    }
    out
}

/// Writes lines to one client; a slow client only blocks its own writers.
#[derive(Clone)]
pub struct Writer {
    stream: Arc<Mutex<UnixStream>>,
}

impl Writer {
    fn line(&self, s: &str) {
        if let Ok(mut w) = self.stream.lock() {
            let _ = w.write_all(s.as_bytes()).and_then(|_| w.write_all(b"\n")).and_then(|_| w.flush());
        }
    }
}

/// One line read from a client.
enum Incoming {
    /// A UTF-8 line (newline removed).
    Line(String),
    /// A line longer than the limit (consumed): its length.
    TooLong(usize),
    /// Not UTF-8: the offset of the first invalid byte.
    NotUtf8(usize),
}

fn utf8(buf: Vec<u8>) -> Incoming {
    String::from_utf8(buf).map(Incoming::Line).unwrap_or_else(|e| Incoming::NotUtf8(e.utf8_error().valid_up_to()))
}

/// Reads one line of at most `max` bytes. Longer lines are consumed and reported as too long.
/// Waiting between lines is unbounded; a line begun but not finished within `idle` is an error
/// (`TimedOut`). The stream's read timeout sets how often that is checked.
fn read_line(
    r: &mut BufReader<UnixStream>,
    max: usize,
    idle: std::time::Duration,
) -> std::io::Result<Option<Incoming>> {
    let mut buf = Vec::new();
    let mut total = 0usize;
    let mut started: Option<std::time::Instant> = None;
    loop {
        if started.is_some_and(|t| t.elapsed() > idle) {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if !chunk.is_empty() {
            started.get_or_insert_with(std::time::Instant::now);
        }
        if chunk.is_empty() {
            return Ok(if total == 0 {
                None
            } else if total > max {
                Some(Incoming::TooLong(total))
            } else {
                Some(utf8(buf))
            });
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if total + take <= max + 1 {
            buf.extend_from_slice(&chunk[..take]);
        }
        total += take;
        r.consume(take);
        if done {
            if total > max + 1 {
                return Ok(Some(Incoming::TooLong(total - 1)));
            }
            while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
                buf.pop();
            }
            return Ok(Some(utf8(buf)));
        }
    }
}

fn handle_connection(shared: Arc<Shared>, stream: UnixStream, uid: u32) {
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let Ok(write_half) = stream.try_clone() else {
        shared.connections.fetch_sub(1, Ordering::Relaxed);
        return;
    };
    if let Ok(mut o) = shared.open.lock() {
        o.insert(conn);
    }
    let out = Writer { stream: Arc::new(Mutex::new(write_half)) };
    let inflight = Arc::new(AtomicUsize::new(0));
    let mut reader = BufReader::new(stream);
    let limits = shared.cfg.limits.clone();
    let idle = std::time::Duration::from_secs_f64(limits.idle_timeout_s.max(0.001));
    // Wakes the reader now and then, so a line left half-sent is noticed.
    let _ = reader.get_ref().set_read_timeout(Some(idle.min(std::time::Duration::from_secs(1))));
    loop {
        let line = match read_line(&mut reader, limits.max_message_bytes, idle) {
            Ok(Some(Incoming::Line(l))) => l,
            Ok(Some(Incoming::NotUtf8(at))) => {
                // Replacing the bytes would run a prompt the client never sent.
                out.line(&protocol::err(&Value::Null, "malformed", &format!("the line is not UTF-8 (byte {at})")));
                continue;
            }
            Ok(Some(Incoming::TooLong(len))) => {
                out.line(&protocol::err(
                    &Value::Null,
                    "too_large",
                    &format!("message of {len} bytes exceeds the limit {}", limits.max_message_bytes),
                ));
                continue;
            }
            Ok(None) => break,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    out.line(&protocol::err(&Value::Null, "timeout", "a partial line was left unfinished; closing"));
                }
                break;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let req = match parse_request(&line, &limits) {
            Ok(r) => r,
            Err(e) => {
                out.line(&protocol::err(&e.id, e.code, &e.message));
                continue;
            }
        };
        if inflight.load(Ordering::Relaxed) >= limits.max_inflight {
            out.line(&protocol::err(
                &req.id,
                "busy",
                &format!("at most {} requests in flight per connection", limits.max_inflight),
            ));
            continue;
        }
        if shared.shutdown.load(Ordering::Relaxed) {
            out.line(&protocol::err(&req.id, "cancelled", "the daemon is shutting down"));
            continue;
        }
        inflight.fetch_add(1, Ordering::Relaxed);
        shared.active.fetch_add(1, Ordering::SeqCst);
        let (shared, out, inflight) = (shared.clone(), out.clone(), inflight.clone());
        std::thread::spawn(move || {
            let reply =
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shared.dispatch(uid, conn, &req, &out)))
                {
                    Ok(Ok(v)) => protocol::ok(&req.id, v),
                    Ok(Err(e)) => protocol::err(&req.id, code_of(&e), &e.to_string()),
                    Err(_) => protocol::err(
                        &req.id,
                        "internal",
                        "internal error while handling the request (see the daemon log)",
                    ),
                };
            out.line(&reply);
            inflight.fetch_sub(1, Ordering::Relaxed);
            shared.active.fetch_sub(1, Ordering::SeqCst);
        });
    }
    // The client is gone: nobody will read what its requests would produce. Requests whose
    // threads have not registered yet cancel themselves when they do (see `open`).
    if let Ok(mut o) = shared.open.lock() {
        o.remove(&conn);
    }
    if let Ok(r) = shared.requests.lock() {
        for c in r.iter().filter(|f| f.conn == conn).flat_map(|f| &f.cancellers) {
            c.cancel();
        }
    }
    shared.connections.fetch_sub(1, Ordering::Relaxed);
}

/// Runs the daemon until `shutdown` (request, SIGTERM) and returns after the current training
/// iteration is checkpointed. `stop` is an extra flag (signal handlers set it).
pub fn serve(mut cfg: DaemonConfig, stop: Arc<AtomicBool>) -> Result<()> {
    trust::ensure_private_dir(&cfg.state_dir)?;
    let runs = cfg.runs_root();
    std::fs::create_dir_all(&runs).map_err(|e| Error::io(&runs, e))?;
    // Absolute roots: jobs store their resolved paths, and a restart must read them the same way.
    cfg.paths.runs = Some(runs.canonicalize().map_err(|e| Error::io(&runs, e))?);
    cfg.paths.models = std::path::absolute(&cfg.paths.models).map_err(|e| Error::io(&cfg.paths.models, e))?;
    let _lock = socket::lock(&cfg.socket)?;
    let listener = socket::bind(&cfg.socket, cfg.group.as_deref())?;
    let bound = std::fs::metadata(&cfg.socket).map_err(|e| Error::io(&cfg.socket, e))?;
    listener.set_nonblocking(true).map_err(|e| Error::io(&cfg.socket, e))?;
    let (job_tx, job_rx) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared {
        store: Mutex::new(Store { by_id: HashMap::new(), order: VecDeque::new(), cap: cfg.remember.max(1) }),
        engine: RwLock::new(None),
        jobs: Mutex::new(Vec::new()),
        job_tx,
        requests: Mutex::new(Vec::new()),
        shutdown: stop,
        connections: AtomicUsize::new(0),
        next_conn: AtomicU64::new(0),
        open: Mutex::new(HashSet::new()),
        active: AtomicUsize::new(0),
        adapter: Mutex::new(None),
        next_id: AtomicU64::new(0),
        cfg,
    });
    if let Some(m) = shared.cfg.model.clone() {
        shared.load(&m, &shared.cfg.engine)?;
    }
    for (id, owner, install, mut run) in restore_jobs(&shared.cfg.state_dir) {
        // Re-checked against today's roots and verifier policy before anything runs.
        let refused = shared.confine_run(&mut run).err();
        if let Ok(mut jobs) = shared.jobs.lock() {
            let info = JobInfo {
                id,
                state: "queued".into(),
                iteration: 0,
                iterations: run.iterations,
                output: run.output.clone(),
                error: None,
            };
            jobs.push(Job {
                info,
                owner,
                cfg: run,
                cancel: Arc::new(AtomicBool::new(false)),
                interrupt: Arc::new(AtomicBool::new(false)),
                install,
                subscribers: Vec::new(),
            });
        }
        match refused {
            None => {
                tracing::info!("resuming job {id}");
                let _ = shared.job_tx.send(id);
            }
            Some(e) => {
                tracing::warn!("not resuming job {id}: {e}");
                finish_job(&shared, id, "failed", Some(json!({ "error": e.to_string() })));
            }
        }
    }
    let worker = {
        let s = shared.clone();
        std::thread::Builder::new()
            .name("gpod-jobs".into())
            .spawn(move || job_worker(s, job_rx))
            .map_err(|e| Error::EngineStopped(e.to_string()))?
    };
    let mut allowed = shared.cfg.allowed_uids.clone();
    allowed.extend([socket::my_uid(), 0]);
    tracing::info!("gpod listening on {}", shared.cfg.socket.display());
    while !shared.shutdown.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                match socket::peer_uid(&stream) {
                    Some(_) if shared.connections.load(Ordering::Relaxed) >= shared.cfg.limits.max_connections => {
                        let mut st = stream;
                        let msg = format!("at most {} connections at a time", shared.cfg.limits.max_connections);
                        let _ = writeln!(st, "{}", protocol::err(&Value::Null, "busy", &msg));
                    }
                    Some(uid) if allowed.contains(&uid) => {
                        shared.connections.fetch_add(1, Ordering::Relaxed);
                        let s = shared.clone();
                        std::thread::spawn(move || handle_connection(s, stream, uid));
                    }
                    other => {
                        tracing::warn!("refused a connection from uid {other:?}");
                        let mut st = stream;
                        let _ =
                            writeln!(st, "{}", protocol::err(&Value::Null, "permission", "this user may not use gpod"));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => tracing::warn!("accept failed: {e}"),
        }
    }
    tracing::info!("gpod stopping: finishing the current training iteration");
    // Only our own socket: another daemon may have replaced a stale-looking one meanwhile.
    if socket::same_file(&shared.cfg.socket, &bound) {
        let _ = std::fs::remove_file(&shared.cfg.socket);
    }
    // Sampling requests in flight end now, each with a `cancelled` reply; a job in its initial
    // evaluation stops at once, one in an iteration after checkpointing it.
    if let Ok(r) = shared.requests.lock() {
        for c in r.iter().flat_map(|f| &f.cancellers) {
            c.cancel();
        }
    }
    if let Ok(jobs) = shared.jobs.lock() {
        jobs.iter().for_each(|j| j.interrupt.store(true, Ordering::Relaxed));
    }
    let _ = shared.job_tx.send(u64::MAX); // wakes an idle worker
    let _ = worker.join();
    // Subscribers of jobs that will not run again get their reply now.
    if let Ok(mut jobs) = shared.jobs.lock() {
        jobs.iter_mut().for_each(|j| j.subscribers.clear());
    }
    // Every request thread replies before the engine goes: then the engine thread is joined, so
    // the process never exits while llama.cpp is still computing.
    let t0 = std::time::Instant::now();
    while shared.active.load(Ordering::SeqCst) > 0 && t0.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let engine = shared.engine.write().ok().and_then(|mut e| e.take());
    drop(engine); // the last handle: joins the engine thread
    Ok(())
}

/// Reads `gpod.toml`.
pub fn load_config(path: &Path) -> Result<DaemonConfig> {
    let mut text = String::new();
    std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text)).map_err(|e| Error::io(path, e))?;
    toml::from_str(&text).map_err(|e| Error::Data { path: path.to_path_buf(), line: 0, reason: e.to_string() })
}
