//! gpod's wire protocol: newline-delimited JSON, one object per line, version field `v` = 1.
//!
//! Request: `{"v": 1, "id": <string|number>, "op": "<op>", …}`. Replies echo the id:
//! `{"v": 1, "id": …, "ok": true, "result": {…}}` or
//! `{"v": 1, "id": …, "ok": false, "error": {"code": "…", "message": "…"}}`.
//! Events (after `subscribe`): `{"v": 1, "id": …, "event": "progress" | "done" | "failed", "data": {…}}`.
//!
//! Ops: `status`, `load`, `generate`, `fork`, `values`, `train`, `eval`, `cancel`, `subscribe`,
//! `shutdown` (fields below). Parsing never panics and checks every limit before work starts.

use crate::engine::{Prompt, SamplingParams, StepConfig};
use crate::gpo::values::Search;
use crate::llama::ChatMessage;
use crate::reward::VerifierConfig;
use crate::task::Task;
use crate::tree::CriticalMode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

/// Protocol version.
pub const VERSION: u64 = 1;

/// Per-request limits (from gpod.toml).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted line, bytes.
    pub max_message_bytes: usize,
    /// Most sequences per request.
    pub max_n: usize,
    /// Most tokens generated per sequence.
    pub max_tokens: usize,
    /// Most prompt characters (tokens are checked against the context by the engine too).
    pub max_prompt_chars: usize,
    /// Most requests in flight per connection.
    pub max_inflight: usize,
    /// Most rollouts per prefix for `values`.
    pub max_rollouts: usize,
    /// Most eval tasks per request.
    pub max_eval_tasks: usize,
    /// Most parallel sequences a `load` may ask for.
    pub max_parallel: u32,
    /// Most KV cells (parallel × ctx_per_sequence) a `load` may ask for.
    pub max_ctx_cells: u64,
    /// Most client connections at a time (more are told `busy` and closed).
    pub max_connections: usize,
    /// Seconds a client may take to finish a line it started (idle time between lines is free).
    pub idle_timeout_s: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 1 << 20,
            max_n: 64,
            max_tokens: 2048,
            max_prompt_chars: 32 * 1024,
            max_inflight: 8,
            max_rollouts: 32,
            max_eval_tasks: 1000,
            max_parallel: 64,
            max_ctx_cells: 65_536,
            max_connections: 64,
            idle_timeout_s: 30.0,
        }
    }
}

/// Engine settings of a `load` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadEngine {
    /// Parallel sequences.
    pub parallel: u32,
    /// KV cells per sequence.
    pub ctx_per_sequence: u32,
    /// "unified" or "per-sequence".
    pub kv: crate::engine::KvMode,
    /// CPU threads (0 = all).
    pub threads: i32,
    /// GPU layers (-1 = all).
    pub gpu_layers: i32,
    /// Where tokens are sampled: "auto" (the graph on a GPU, else the host), "graph" or "host".
    pub sampling: crate::engine::SamplingBackend,
}

impl Default for LoadEngine {
    fn default() -> Self {
        LoadEngine {
            parallel: 16,
            ctx_per_sequence: 1024,
            kv: crate::engine::KvMode::PerSequence,
            threads: 0,
            gpu_layers: -1,
            sampling: crate::engine::SamplingBackend::Auto,
        }
    }
}

/// What an `adapter` request asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterChange {
    /// Report the current adapter and version.
    Show,
    /// Load a GGUF LoRA adapter file (inside the models root) at `scale`.
    File { path: PathBuf, scale: f32 },
    /// Load the final adapter of a run (a directory inside the runs root) at `scale`.
    Run { run: PathBuf, scale: f32 },
    /// Back to the base model.
    Remove,
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Daemon, engine and job status.
    Status,
    /// Load (or replace) the serving model; without `engine`, gpod.toml's engine settings.
    Load { model: String, engine: Option<LoadEngine> },
    /// Sample `n` completions.
    Generate { prompt: Prompt, n: usize, sampling: SamplingParams, steps: StepConfig },
    /// Continue a remembered trajectory after `at` generated tokens.
    Fork { trajectory: u64, at: usize, n: usize, sampling: SamplingParams },
    /// Step values and the critical step of a remembered trajectory.
    Values {
        trajectory: u64,
        rollouts: usize,
        /// `dense` (default: every prefix) or `bisect`.
        search: Search,
        critical: CriticalMode,
        verifier: VerifierConfig,
        answer: String,
        sampling: SamplingParams,
    },
    /// Queue a GPO run (TOML config text). Its paths resolve inside the daemon's roots: the
    /// output inside `[paths] runs`, model and task files inside `[paths] models`; `output`
    /// overrides the config's output (as `gpo train --output` does).
    Train { config: String, output: Option<PathBuf>, install: bool },
    /// Set, remove or report the serving engine's LoRA adapter.
    Adapter(AdapterChange),
    /// Held-out accuracy on the serving engine.
    Eval { tasks: Vec<Task>, max_tokens: usize },
    /// Cancel a request (by its id, on any connection of the same user) or a job.
    Cancel { target: Value },
    /// Stream a job's progress events.
    Subscribe { job: u64 },
    /// Stop the daemon (finishing the current training step).
    Shutdown,
}

/// A request: its id and operation.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Client-chosen id, echoed in the reply.
    pub id: Value,
    /// The operation.
    pub op: Op,
}

/// Why a line was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    /// Machine-readable code (`malformed`, `version`, `unknown_op`, `invalid`, `too_large`).
    pub code: &'static str,
    /// What was wrong.
    pub message: String,
    /// The request's id if it could be read.
    pub id: Value,
}

fn invalid(id: &Value, code: &'static str, message: impl Into<String>) -> ProtocolError {
    ProtocolError { code, message: message.into(), id: id.clone() }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Sampling {
    temperature: Option<f32>,
    top_k: Option<i32>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    max_tokens: Option<usize>,
    stop: Option<Vec<String>>,
    seed: Option<u64>,
}

fn sampling(id: &Value, v: Option<&Value>, limits: &Limits) -> Result<SamplingParams, ProtocolError> {
    let s: Sampling = match v {
        None | Some(Value::Null) => Sampling::default(),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| invalid(id, "invalid", format!("sampling: {e}")))?,
    };
    let d = SamplingParams::default();
    let p = SamplingParams {
        temperature: s.temperature.unwrap_or(d.temperature),
        top_k: s.top_k.unwrap_or(d.top_k),
        top_p: s.top_p.unwrap_or(d.top_p),
        min_p: s.min_p.unwrap_or(d.min_p),
        max_tokens: s.max_tokens.unwrap_or(d.max_tokens),
        stop: s.stop.unwrap_or_default(),
        seed: s.seed.unwrap_or(0),
        ignore_eog: false,
    };
    if p.max_tokens > limits.max_tokens {
        return Err(invalid(
            id,
            "too_large",
            format!("max_tokens {} exceeds the limit {}", p.max_tokens, limits.max_tokens),
        ));
    }
    p.validate().map_err(|e| invalid(id, "invalid", e.to_string()))?;
    Ok(p)
}

fn get<'a>(o: &'a serde_json::Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn uint(id: &Value, o: &serde_json::Map<String, Value>, k: &str, default: Option<u64>) -> Result<u64, ProtocolError> {
    match get(o, k) {
        Some(v) => v.as_u64().ok_or_else(|| invalid(id, "invalid", format!("{k} must be a non-negative integer"))),
        None => default.ok_or_else(|| invalid(id, "invalid", format!("missing {k}"))),
    }
}

fn string(id: &Value, o: &serde_json::Map<String, Value>, k: &str) -> Result<String, ProtocolError> {
    match get(o, k) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(invalid(id, "invalid", format!("{k} must be a string"))),
        None => Err(invalid(id, "invalid", format!("missing {k}"))),
    }
}

fn count(id: &Value, o: &serde_json::Map<String, Value>, limits: &Limits) -> Result<usize, ProtocolError> {
    let n = uint(id, o, "n", Some(1))? as usize;
    if n == 0 {
        return Err(invalid(id, "invalid", "n must be at least 1"));
    }
    if n > limits.max_n {
        return Err(invalid(id, "too_large", format!("n {n} exceeds the limit {}", limits.max_n)));
    }
    Ok(n)
}

/// Parses one line. Every failure names what to fix; the id is kept when it could be read.
pub fn parse_request(line: &str, limits: &Limits) -> Result<Request, ProtocolError> {
    if line.len() > limits.max_message_bytes {
        return Err(invalid(
            &Value::Null,
            "too_large",
            format!("message of {} bytes exceeds the limit {}", line.len(), limits.max_message_bytes),
        ));
    }
    let v: Value =
        serde_json::from_str(line).map_err(|e| invalid(&Value::Null, "malformed", format!("not JSON: {e}")))?;
    let Value::Object(o) = v else { return Err(invalid(&Value::Null, "malformed", "a request is a JSON object")) };
    // Numeric ids must survive the round trip exactly, in any client's JSON: integers within
    // ±2^53 (larger ones come back as floats, or are rounded by JavaScript clients).
    const SAFE: u64 = 1 << 53;
    let id = match o.get("id") {
        None => Value::Null,
        Some(v @ (Value::String(_) | Value::Null)) => v.clone(),
        Some(Value::Number(n))
            if n.as_u64().is_some_and(|x| x <= SAFE) || n.as_i64().is_some_and(|x| x.unsigned_abs() <= SAFE) =>
        {
            Value::Number(n.clone())
        }
        Some(_) => {
            return Err(invalid(
                &Value::Null,
                "invalid",
                "id must be a string or an integer within ±2^53 (use a string for other ids)",
            ))
        }
    };
    match o.get("v") {
        None | Some(Value::Null) => return Err(invalid(&id, "version", format!("missing \"v\": {VERSION}"))),
        Some(v) => match v.as_u64() {
            Some(VERSION) => {}
            Some(other) => {
                return Err(invalid(&id, "version", format!("protocol version {other} (this gpod speaks {VERSION})")))
            }
            None => return Err(invalid(&id, "version", format!("\"v\" must be the integer {VERSION}, got {v}"))),
        },
    }
    let op = match o.get("op") {
        Some(Value::String(s)) => s.as_str(),
        None | Some(Value::Null) => return Err(invalid(&id, "invalid", "missing \"op\"")),
        Some(v) => return Err(invalid(&id, "invalid", format!("\"op\" must be a string, got {v}"))),
    };
    // Structured fields are JSON objects: serde would also read a struct from an array, in field
    // order (`"sampling": [1]` as a temperature).
    for k in ["sampling", "engine", "steps", "verifier"] {
        if let Some(v) = get(&o, k).filter(|v| !v.is_object()) {
            return Err(invalid(&id, "invalid", format!("{k} must be a JSON object, got {v}")));
        }
    }
    let op = match op {
        "status" => Op::Status,
        "shutdown" => Op::Shutdown,
        "load" => Op::Load {
            model: string(&id, &o, "model")?,
            engine: match get(&o, "engine") {
                Some(e) => {
                    let e: LoadEngine = serde_json::from_value(e.clone())
                        .map_err(|e| invalid(&id, "invalid", format!("engine: {e}")))?;
                    let cells = u64::from(e.parallel) * u64::from(e.ctx_per_sequence);
                    if e.parallel > limits.max_parallel || cells > limits.max_ctx_cells {
                        return Err(invalid(
                            &id,
                            "too_large",
                            format!(
                                "engine of {} sequences × {} cells exceeds the limits ({} sequences, {} cells)",
                                e.parallel, e.ctx_per_sequence, limits.max_parallel, limits.max_ctx_cells
                            ),
                        ));
                    }
                    Some(e)
                }
                None => None,
            },
        },
        "generate" => {
            let prompt = match (get(&o, "prompt"), get(&o, "messages"), get(&o, "tokens")) {
                (Some(Value::String(p)), None, None) => {
                    if p.len() > limits.max_prompt_chars {
                        return Err(invalid(
                            &id,
                            "too_large",
                            format!("prompt of {} characters exceeds the limit {}", p.len(), limits.max_prompt_chars),
                        ));
                    }
                    if o.get("raw").and_then(Value::as_bool).unwrap_or(false) {
                        Prompt::Raw(p.clone())
                    } else {
                        Prompt::user(p.clone())
                    }
                }
                (None, Some(m), None) => {
                    let msgs: Vec<ChatMessage> = serde_json::from_value(m.clone())
                        .map_err(|e| invalid(&id, "invalid", format!("messages: {e}")))?;
                    if msgs.iter().map(|m| m.content.len()).sum::<usize>() > limits.max_prompt_chars {
                        return Err(invalid(&id, "too_large", "messages exceed the prompt limit"));
                    }
                    Prompt::Chat(msgs)
                }
                (None, None, Some(t)) => {
                    let toks: Vec<i32> = serde_json::from_value(t.clone())
                        .map_err(|e| invalid(&id, "invalid", format!("tokens: {e}")))?;
                    if toks.len() > limits.max_prompt_chars {
                        return Err(invalid(&id, "too_large", "too many prompt tokens"));
                    }
                    Prompt::Tokens(toks)
                }
                _ => return Err(invalid(&id, "invalid", "give exactly one of prompt (string), messages or tokens")),
            };
            let steps = match get(&o, "steps") {
                Some(s) => {
                    serde_json::from_value(s.clone()).map_err(|e| invalid(&id, "invalid", format!("steps: {e}")))?
                }
                None => StepConfig::default(),
            };
            Op::Generate {
                prompt,
                n: count(&id, &o, limits)?,
                sampling: sampling(&id, get(&o, "sampling"), limits)?,
                steps,
            }
        }
        "fork" => Op::Fork {
            trajectory: uint(&id, &o, "trajectory", None)?,
            at: uint(&id, &o, "at", None)? as usize,
            n: count(&id, &o, limits)?,
            sampling: sampling(&id, get(&o, "sampling"), limits)?,
        },
        "values" => {
            let rollouts = uint(&id, &o, "rollouts", Some(4))? as usize;
            if rollouts == 0 || rollouts > limits.max_rollouts {
                return Err(invalid(
                    &id,
                    if rollouts == 0 { "invalid" } else { "too_large" },
                    format!("rollouts must be in 1..={}", limits.max_rollouts),
                ));
            }
            Op::Values {
                trajectory: uint(&id, &o, "trajectory", None)?,
                rollouts,
                search: match get(&o, "search") {
                    Some(c) => serde_json::from_value(c.clone())
                        .map_err(|e| invalid(&id, "invalid", format!("search: {e}")))?,
                    None => Search::Dense,
                },
                critical: match get(&o, "critical") {
                    Some(c) => serde_json::from_value(c.clone())
                        .map_err(|e| invalid(&id, "invalid", format!("critical: {e}")))?,
                    None => CriticalMode::Abs,
                },
                verifier: match get(&o, "verifier") {
                    Some(c) => serde_json::from_value(c.clone())
                        .map_err(|e| invalid(&id, "invalid", format!("verifier: {e}")))?,
                    None => VerifierConfig::Numeric,
                },
                answer: string(&id, &o, "answer")?,
                sampling: sampling(&id, get(&o, "sampling"), limits)?,
            }
        }
        "train" => Op::Train {
            config: string(&id, &o, "config")?,
            output: match (get(&o, "output"), get(&o, "base")) {
                (_, Some(_)) => {
                    return Err(invalid(
                        &id,
                        "invalid",
                        "base is no longer accepted: a run's paths resolve inside the daemon's [paths] roots",
                    ))
                }
                (None, None) => None,
                (Some(Value::String(b)), None) => Some(PathBuf::from(b)),
                (Some(_), None) => return Err(invalid(&id, "invalid", "output must be a string (a path)")),
            },
            install: match get(&o, "install") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(invalid(&id, "invalid", "install must be true or false")),
            },
        },
        "adapter" => {
            let scale = match get(&o, "scale") {
                None => 1.0,
                Some(v) => match v.as_f64() {
                    Some(x) if x.is_finite() && x.abs() <= 16.0 => x as f32,
                    _ => return Err(invalid(&id, "invalid", "scale must be a number in [-16, 16]")),
                },
            };
            let path = |k: &str| match get(&o, k) {
                None => Ok(None),
                Some(Value::String(p)) => Ok(Some(PathBuf::from(p))),
                Some(_) => Err(invalid(&id, "invalid", format!("{k} must be a string (a path)"))),
            };
            let remove = match get(&o, "remove") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(invalid(&id, "invalid", "remove must be true or false")),
            };
            Op::Adapter(match (path("path")?, path("run")?, remove) {
                (None, None, false) => AdapterChange::Show,
                (Some(path), None, false) => AdapterChange::File { path, scale },
                (None, Some(run), false) => AdapterChange::Run { run, scale },
                (None, None, true) => AdapterChange::Remove,
                _ => return Err(invalid(&id, "invalid", "give one of path, run or remove")),
            })
        }
        "eval" => {
            let tasks: Vec<Task> = match get(&o, "tasks") {
                Some(t) => {
                    serde_json::from_value(t.clone()).map_err(|e| invalid(&id, "invalid", format!("tasks: {e}")))?
                }
                None => return Err(invalid(&id, "invalid", "missing tasks ([{\"prompt\": …, \"answer\": …}])")),
            };
            if tasks.is_empty() || tasks.len() > limits.max_eval_tasks {
                return Err(invalid(&id, "invalid", format!("between 1 and {} tasks", limits.max_eval_tasks)));
            }
            let max_tokens = uint(&id, &o, "max_tokens", Some(256))? as usize;
            if max_tokens == 0 || max_tokens > limits.max_tokens {
                return Err(invalid(&id, "too_large", format!("max_tokens must be in 1..={}", limits.max_tokens)));
            }
            Op::Eval { tasks, max_tokens }
        }
        "cancel" => {
            Op::Cancel { target: get(&o, "target").cloned().ok_or_else(|| invalid(&id, "invalid", "missing target"))? }
        }
        "subscribe" => Op::Subscribe { job: uint(&id, &o, "job", None)? },
        other => {
            return Err(invalid(
                &id,
                "unknown_op",
                format!(
                "unknown op {other:?} (status, load, generate, fork, values, train, eval, cancel, subscribe, adapter, shutdown)"
            ),
            ))
        }
    };
    Ok(Request { id, op })
}

/// A success reply line (without the newline).
pub fn ok(id: &Value, result: Value) -> String {
    serde_json::json!({ "v": VERSION, "id": id, "ok": true, "result": result }).to_string()
}

/// An error reply line.
pub fn err(id: &Value, code: &str, message: &str) -> String {
    serde_json::json!({ "v": VERSION, "id": id, "ok": false, "error": { "code": code, "message": message } })
        .to_string()
}

/// An event line.
pub fn event(id: &Value, kind: &str, data: Value) -> String {
    serde_json::json!({ "v": VERSION, "id": id, "event": kind, "data": data }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;

    fn p(s: &str) -> Result<Request, ProtocolError> {
        parse_request(s, &Limits::default())
    }

    #[test]
    fn wrong_types_are_named_not_reported_missing() {
        let msg = |s: &str| p(s).unwrap_err().message;
        assert!(msg(r#"{"v":1.0,"op":"status"}"#).contains("must be the integer 1"));
        assert!(msg(r#"{"v":1,"op":5}"#).contains("\"op\" must be a string"));
        assert!(msg(r#"{"op":"status"}"#).contains("missing \"v\""));
        assert!(
            msg(r#"{"v":1,"op":"generate","prompt":"x","sampling":[1]}"#).contains("sampling must be a JSON object")
        );
        assert!(msg(r#"{"v":1,"op":"load","model":"m","engine":[1,2]}"#).contains("engine must be a JSON object"));
        assert!(p(r#"{"v":1,"op":"generate","prompt":"x","sampling":{"temperature":1}}"#).is_ok());
    }

    #[test]
    fn gpod_toml_rejects_unknown_keys_in_every_section() {
        use crate::daemon::server::DaemonConfig;
        for text in ["typo = 1", "[limits]\nmax_rollout = 3", "[engine]\nmodel = \"m.gguf\""] {
            let e = toml::from_str::<DaemonConfig>(text).unwrap_err().to_string();
            assert!(e.contains("unknown field"), "{text}: {e}");
        }
        assert!(toml::from_str::<DaemonConfig>("[limits]\nmax_rollouts = 3").is_ok());
    }

    #[test]
    fn valid_requests() {
        let r =
            p(r#"{"v":1,"id":7,"op":"generate","prompt":"hi","n":3,"sampling":{"temperature":0.5,"max_tokens":9}}"#)
                .unwrap();
        assert_eq!(r.id, serde_json::json!(7));
        match r.op {
            Op::Generate { n, sampling, .. } => assert_eq!((n, sampling.max_tokens, sampling.temperature), (3, 9, 0.5)),
            o => panic!("{o:?}"),
        }
        assert!(matches!(p(r#"{"v":1,"id":"a","op":"status"}"#).unwrap().op, Op::Status));
        assert_eq!(p(r#"{"v":1,"id":9007199254740992,"op":"status"}"#).unwrap().id, serde_json::json!(1u64 << 53));
        assert_eq!(p(r#"{"v":1,"id":-5,"op":"status"}"#).unwrap().id, serde_json::json!(-5));
        for bad in ["9007199254740993", "18446744073709551616", "1.5", "[1]"] {
            let e = p(&format!(r#"{{"v":1,"id":{bad},"op":"status"}}"#)).unwrap_err();
            assert!(e.message.contains("2^53"), "{bad}: {}", e.message);
        }
        assert!(matches!(p(r#"{"v":1,"op":"fork","trajectory":3,"at":2}"#).unwrap().op, Op::Fork { n: 1, .. }));
        assert!(matches!(
            p(r#"{"v":1,"op":"values","trajectory":3,"answer":"5","verifier":{"kind":"exact"}}"#).unwrap().op,
            Op::Values { .. }
        ));
        assert_eq!(p(r#"{"v":1,"op":"adapter"}"#).unwrap().op, Op::Adapter(AdapterChange::Show));
        assert_eq!(
            p(r#"{"v":1,"op":"adapter","run":"quick","scale":0.5}"#).unwrap().op,
            Op::Adapter(AdapterChange::Run { run: PathBuf::from("quick"), scale: 0.5 })
        );
        assert_eq!(p(r#"{"v":1,"op":"adapter","remove":true}"#).unwrap().op, Op::Adapter(AdapterChange::Remove));
        for bad in [
            r#"{"v":1,"op":"adapter","path":"a","run":"b"}"#,
            r#"{"v":1,"op":"adapter","path":"a","scale":1e9}"#,
            r#"{"v":1,"op":"adapter","path":7}"#,
            r#"{"v":1,"op":"adapter","remove":"yes"}"#,
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
        match p(r#"{"v":1,"op":"train","config":"x","output":"quick"}"#).unwrap().op {
            Op::Train { output, .. } => assert_eq!(output.as_deref(), Some(Path::new("quick"))),
            o => panic!("{o:?}"),
        }
        assert!(matches!(p(r#"{"v":1,"op":"train","config":"x"}"#).unwrap().op, Op::Train { output: None, .. }));
        assert!(p(r#"{"v":1,"op":"train","config":"x","base":"/"}"#).is_err());
    }

    #[test]
    fn invalid_requests_get_codes_and_keep_the_id() {
        let code = |s: &str| p(s).unwrap_err().code;
        assert_eq!(code("not json"), "malformed");
        assert_eq!(code("[1,2]"), "malformed");
        assert_eq!(code(r#"{"id":1,"op":"status"}"#), "version");
        assert_eq!(code(r#"{"v":2,"op":"status"}"#), "version");
        assert_eq!(code(r#"{"v":1}"#), "invalid");
        assert_eq!(code(r#"{"v":1,"op":"dance"}"#), "unknown_op");
        assert_eq!(code(r#"{"v":1,"op":"generate","prompt":"x","n":0}"#), "invalid");
        assert_eq!(code(r#"{"v":1,"op":"generate","prompt":"x","n":1000}"#), "too_large");
        assert_eq!(
            code(r#"{"v":1,"op":"load","model":"m","engine":{"parallel":16,"ctx_per_sequence":32768}}"#),
            "too_large"
        );
        assert_eq!(
            code(r#"{"v":1,"op":"load","model":"m","engine":{"parallel":1000,"ctx_per_sequence":8}}"#),
            "too_large"
        );
        assert_eq!(code(r#"{"v":1,"op":"generate","prompt":"x","sampling":{"max_tokens":999999}}"#), "too_large");
        assert_eq!(code(r#"{"v":1,"op":"generate","prompt":"x","sampling":{"top_p":0}}"#), "invalid");
        assert_eq!(code(r#"{"v":1,"op":"generate","prompt":"x","sampling":{"stop":[""]}}"#), "invalid");
        assert_eq!(code(r#"{"v":1,"op":"generate","prompt":"x","sampling":{"warp":9}}"#), "invalid");
        assert_eq!(code(r#"{"v":1,"op":"generate","prompt":"x","messages":[]}"#), "invalid");
        assert_eq!(code(r#"{"v":1,"op":"fork","trajectory":-1,"at":0}"#), "invalid");
        assert_eq!(code(r#"{"v":1,"op":"values","trajectory":1,"answer":"1","rollouts":1000}"#), "too_large");
        assert_eq!(code(r#"{"v":1,"id":[1],"op":"status"}"#), "invalid");
        assert_eq!(code(r#"{"v":1,"op":"train","config":"x","base":"runs"}"#), "invalid");
        assert_eq!(code(r#"{"v":1,"op":"train","config":"x","base":7}"#), "invalid");
        let big = format!(r#"{{"v":1,"op":"generate","prompt":"{}"}}"#, "x".repeat(40_000));
        assert_eq!(code(&big), "too_large");
        assert_eq!(p(r#"{"v":1,"id":"k","op":"dance"}"#).unwrap_err().id, serde_json::json!("k"));
    }

    #[test]
    fn fuzz_seeds_are_valid_requests() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/protocol");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(p(&text).is_ok(), "{}: {:?}", path.display(), p(&text).err().map(|e| e.message));
            n += 1;
        }
        assert!(n >= 8, "seed corpus in {}", dir.display());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn parser_never_panics_on_arbitrary_text(s in ".{0,300}") {
            let _ = p(&s);
        }

        #[test]
        fn parser_never_panics_on_mutated_requests(
            base in prop::sample::select(vec![
                r#"{"v":1,"id":1,"op":"generate","prompt":"hi","n":2,"sampling":{"temperature":0.5}}"#,
                r#"{"v":1,"id":"x","op":"values","trajectory":3,"answer":"5","rollouts":2}"#,
                r#"{"v":1,"op":"fork","trajectory":1,"at":3,"n":2}"#,
                r#"{"v":1,"op":"train","config":"mode = \"gpo\""}"#,
            ]),
            pos in 0usize..120, byte in any::<u8>(), cut in 0usize..130,
        ) {
            let mut b = base.as_bytes().to_vec();
            let i = pos % b.len();
            b[i] = byte;
            b.truncate(cut.max(1).min(b.len()));
            let _ = p(&String::from_utf8_lossy(&b));
        }
    }
}
