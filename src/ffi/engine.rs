//! Engine handle: load a model, generate, fork, adapters, cancel.

use super::{check_out, guard, handle, params_or, path_arg, put, str_arg, GpoStatus, GpoTrajectories};
use crate::engine::{
    Canceller, Engine, EngineConfig, GenerateRequest, KvMode, Prompt, RequestHandle, SamplingBackend, SamplingParams,
    Trajectory,
};
use std::ffi::c_char;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A rollout engine (model + llama.cpp context + its thread).
/// Thread-safety: every function taking a `const GpoEngine *` may be called from any thread
/// concurrently; requests from different threads share decode batches.
pub struct GpoEngine {
    pub(crate) engine: Engine,
    /// Cancellers of the calls in flight, by call id (gpo_engine_cancel uses them all).
    inflight: Mutex<Vec<(u64, Vec<Canceller>)>>,
    next_call: AtomicU64,
}

/// Engine settings (take them from gpo_engine_default_params() and change what you need).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GpoEngineParams {
    /// Layers offloaded to the GPU (-1 = all; ignored by CPU builds).
    pub n_gpu_layers: i32,
    /// CPU threads (0 = all cores).
    pub n_threads: i32,
    /// KV cells per sequence (longest prompt + completion).
    pub n_ctx_per_seq: u32,
    /// Parallel sequences.
    pub n_parallel: u32,
    /// true = one KV pool shared by all sequences; false = per-sequence KV (default).
    pub kv_unified: bool,
    /// Where tokens are sampled: GPO_SAMPLING_AUTO (default: inside the decode graph when a GPU
    /// holds the logits, else on the host), GPO_SAMPLING_GRAPH or GPO_SAMPLING_HOST.
    pub sampling: u32,
}

/// Values of `GpoEngineParams::sampling` (the field is a plain `uint32_t`, so a wrong value is
/// an error, never undefined behaviour).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpoSampling {
    /// Inside the decode graph when a GPU holds the logits, on the host otherwise (default).
    GpoSamplingAuto = 0,
    /// Inside llama.cpp's decode graph (the host for a chain the backend cannot run).
    GpoSamplingGraph = 1,
    /// On the host (every logit row is copied back).
    GpoSamplingHost = 2,
}

/// Sampling settings of one call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GpoSamplingParams {
    /// Temperature (0 = greedy). Default 1.
    pub temperature: f32,
    /// Top-k (0 = off).
    pub top_k: i32,
    /// Top-p in (0, 1] (1 = off).
    pub top_p: f32,
    /// Min-p in [0, 1) (0 = off).
    pub min_p: f32,
    /// Tokens per sample (default 256).
    pub max_tokens: u32,
    /// Seed.
    pub seed: u64,
}

/// Default engine settings.
#[no_mangle]
pub extern "C" fn gpo_engine_default_params() -> GpoEngineParams {
    GpoEngineParams {
        n_gpu_layers: -1,
        n_threads: 0,
        n_ctx_per_seq: 1024,
        n_parallel: 16,
        kv_unified: false,
        sampling: GpoSampling::GpoSamplingAuto as u32,
    }
}

/// Default sampling settings.
#[no_mangle]
pub extern "C" fn gpo_sampling_default_params() -> GpoSamplingParams {
    GpoSamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, max_tokens: 256, seed: 0 }
}

impl From<&GpoSamplingParams> for SamplingParams {
    fn from(p: &GpoSamplingParams) -> Self {
        SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            max_tokens: p.max_tokens as usize,
            seed: p.seed,
            ..Default::default()
        }
    }
}

/// Loads `model_path` (GGUF) and starts an engine. On success `*out` owns a new engine; free it
/// with gpo_engine_free(). `params` may be NULL (defaults). `model_path`: borrowed for the call.
///
/// # Safety
/// `model_path` is NULL or NUL-terminated; `params` is NULL or valid; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn gpo_engine_new(
    model_path: *const c_char,
    params: *const GpoEngineParams,
    out: *mut *mut GpoEngine,
) -> GpoStatus {
    guard(|| {
        let out = unsafe { check_out(out) }?;
        let path = unsafe { path_arg(model_path, "model_path") }?;
        let p = unsafe { params_or(params, gpo_engine_default_params()) };
        let sampling = match p.sampling {
            x if x == GpoSampling::GpoSamplingAuto as u32 => SamplingBackend::Auto,
            x if x == GpoSampling::GpoSamplingGraph as u32 => SamplingBackend::Graph,
            x if x == GpoSampling::GpoSamplingHost as u32 => SamplingBackend::Host,
            other => {
                return Err(crate::Error::invalid(
                    "sampling",
                    format!("{other} is not GPO_SAMPLING_AUTO (0), GPO_SAMPLING_GRAPH (1) or GPO_SAMPLING_HOST (2)"),
                )
                .into())
            }
        };
        let engine = Engine::start(EngineConfig {
            n_gpu_layers: p.n_gpu_layers,
            n_threads: p.n_threads,
            kv_mode: if p.kv_unified { KvMode::Unified } else { KvMode::PerSequence },
            sampling,
            ..EngineConfig::slots(path, p.n_parallel, p.n_ctx_per_seq)
        })?;
        put(out, GpoEngine { engine, inflight: Mutex::new(Vec::new()), next_call: AtomicU64::new(0) });
        Ok(())
    })
}

/// Stops the engine and frees it. NULL is a no-op. Calls in flight on other threads must have
/// returned first.
///
/// # Safety
/// `engine` is NULL or a pointer from gpo_engine_new() not freed before.
#[no_mangle]
pub unsafe extern "C" fn gpo_engine_free(engine: *mut GpoEngine) {
    unsafe { super::free_boxed(engine) }
}

impl GpoEngine {
    /// Runs requests as one unit, cancellable through gpo_engine_cancel().
    pub(crate) fn run(&self, reqs: Vec<GenerateRequest>) -> crate::Result<Vec<Vec<Trajectory>>> {
        let handles: Vec<RequestHandle> = self.engine.submit_many(reqs)?;
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let cancellers = handles.iter().map(RequestHandle::canceller).collect();
        if let Ok(mut v) = self.inflight.lock() {
            v.push((id, cancellers));
        }
        let out = handles.into_iter().map(RequestHandle::wait).collect();
        if let Ok(mut v) = self.inflight.lock() {
            v.retain(|(c, _)| *c != id);
        }
        out
    }

    /// Runs one request; its trajectories as a new handle for the caller to own.
    fn run_one(&self, req: GenerateRequest) -> crate::Result<*mut GpoTrajectories> {
        let mut got = self.run(vec![req])?;
        Ok(GpoTrajectories::boxed(got.remove(0)))
    }
}

/// Samples `n` completions of `prompt` (a user message through the model's chat template, or raw
/// text when `raw`). On success `*out` owns the trajectories (free with
/// gpo_trajectories_free()). `params` may be NULL (defaults). Blocks until done or cancelled.
///
/// # Safety
/// Pointers are NULL or valid for the call; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn gpo_generate(
    engine: *const GpoEngine,
    prompt: *const c_char,
    raw: bool,
    n: usize,
    params: *const GpoSamplingParams,
    out: *mut *mut GpoTrajectories,
) -> GpoStatus {
    guard(|| {
        let out = unsafe { check_out(out) }?;
        let e = unsafe { handle(engine, "engine") }?;
        let text = unsafe { str_arg(prompt, "prompt") }?;
        let p = unsafe { params_or(params, gpo_sampling_default_params()) };
        let prompt = if raw { Prompt::Raw(text.to_string()) } else { Prompt::user(text) };
        *out = e.run_one(GenerateRequest::new(prompt, n, (&p).into()))?;
        Ok(())
    })
}

/// Samples `n` continuations of trajectory `index` of `from` after its first `at` generated
/// tokens, forking its cached KV. On success `*out` owns the new trajectories.
///
/// # Safety
/// Pointers are NULL or valid for the call; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn gpo_fork(
    engine: *const GpoEngine,
    from: *const GpoTrajectories,
    index: usize,
    at: usize,
    n: usize,
    params: *const GpoSamplingParams,
    out: *mut *mut GpoTrajectories,
) -> GpoStatus {
    guard(|| {
        let out = unsafe { check_out(out) }?;
        let e = unsafe { handle(engine, "engine") }?;
        let parent = unsafe { GpoTrajectories::get(from, index) }?;
        let p = unsafe { params_or(params, gpo_sampling_default_params()) };
        *out = e.run_one(GenerateRequest::continuing(parent, at, n, (&p).into())?)?;
        Ok(())
    })
}

fn report_version(v: u64, version_out: *mut u64) {
    if !version_out.is_null() {
        // SAFETY: the caller passes NULL or a writable pointer.
        unsafe { *version_out = v };
    }
}

/// Loads a GGUF LoRA adapter and swaps it in at `scale`; `*version_out` (may be NULL) receives
/// the new adapter version. Calls in flight finish on the previous adapter.
///
/// # Safety
/// Pointers are NULL or valid for the call.
#[no_mangle]
pub unsafe extern "C" fn gpo_engine_set_adapter(
    engine: *const GpoEngine,
    path: *const c_char,
    scale: f32,
    version_out: *mut u64,
) -> GpoStatus {
    guard(|| {
        let e = unsafe { handle(engine, "engine") }?;
        let path = unsafe { path_arg(path, "path") }?;
        report_version(e.engine.set_adapter(path, scale)?, version_out);
        Ok(())
    })
}

/// Removes the adapter (back to the base model); `*version_out` (may be NULL) receives the new
/// adapter version.
///
/// # Safety
/// Pointers are NULL or valid for the call.
#[no_mangle]
pub unsafe extern "C" fn gpo_engine_remove_adapter(engine: *const GpoEngine, version_out: *mut u64) -> GpoStatus {
    guard(|| {
        let e = unsafe { handle(engine, "engine") }?;
        report_version(e.engine.remove_adapter()?, version_out);
        Ok(())
    })
}

/// Cancels every call in flight on this engine (from any thread); they return GPO_CANCELLED.
///
/// # Safety
/// `engine` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn gpo_engine_cancel(engine: *const GpoEngine) -> GpoStatus {
    guard(|| {
        let e = unsafe { handle(engine, "engine") }?;
        if let Ok(v) = e.inflight.lock() {
            for c in v.iter().flat_map(|(_, cs)| cs) {
                c.cancel();
            }
        }
        Ok(())
    })
}
