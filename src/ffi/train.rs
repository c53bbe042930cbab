//! Trainer and whole-run handles.

use super::{check_out, fail_msg, guard, handle, handle_mut, json_arg, path_arg, put, GpoStatus, GpoTrajectories};
use crate::gpo::{MetricsRow, Progress, RunConfig};
use crate::train::{Batch, Completion, Trainer, TrainerConfig};
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};

/// A LoRA trainer over a GGUF model. Thread-safety: not thread-safe; use from one thread at a time.
pub struct GpoTrainer {
    t: Trainer,
}

/// What one training step did.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GpoStepReport {
    /// Steps applied so far.
    pub step: u64,
    /// Loss.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Completion tokens per second.
    pub tokens_per_s: f64,
    /// Mean |learner − rollout| log-prob per token (NaN when unknown).
    pub logprob_gap: f64,
    /// true when the step was skipped (non-finite input or gradient) and not applied.
    pub skipped: bool,
}

/// Creates a trainer. `config_json` (may be NULL for defaults) is a TrainerConfig as JSON, e.g.
/// `{"temperature": 0.7, "objective": {"kind": "grpo", "clip": 0.2, "aggregation": "token-mean"},
/// "lora": {"rank": 8}, "optim": {"lr": 1e-4}}`; its `model` field is ignored in favour of
/// `model_path`. Set `temperature` to the sampling temperature of the trajectories you train on
/// (log-probs are of logits / T); GpoStepReport.logprob_gap reveals a mismatch.
/// On success `*out` owns the trainer (free with gpo_trainer_free()).
///
/// # Safety
/// Strings are NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn gpo_trainer_new(
    model_path: *const c_char,
    config_json: *const c_char,
    out: *mut *mut GpoTrainer,
) -> GpoStatus {
    guard(|| {
        let out = unsafe { check_out(out) }?;
        let path = unsafe { path_arg(model_path, "model_path") }?;
        let mut cfg: TrainerConfig = unsafe { json_arg(config_json, "trainer config") }?;
        cfg.model = path.to_path_buf();
        put(out, GpoTrainer { t: Trainer::new(cfg)? });
        Ok(())
    })
}

/// Frees a trainer; NULL is a no-op.
///
/// # Safety
/// `t` is NULL or a pointer from gpo_trainer_new() not freed before.
#[no_mangle]
pub unsafe extern "C" fn gpo_trainer_free(t: *mut GpoTrainer) {
    unsafe { super::free_boxed(t) }
}

/// One optimiser step (NLL/PPO/GRPO, per the trainer's objective) on the trajectories of `batch`
/// with `rewards[i]` for trajectory i (`n_rewards` must equal the batch size) and optional GRPO
/// `groups` (NULL = one group). The trajectories' contexts are conditioning; their generated
/// tokens and log-probs are trained on. `report` may be NULL.
///
/// # Safety
/// Pointers are NULL or valid; `rewards` and `groups` hold `n_rewards` entries.
#[no_mangle]
pub unsafe extern "C" fn gpo_trainer_step(
    t: *mut GpoTrainer,
    batch: *const GpoTrajectories,
    rewards: *const f32,
    n_rewards: usize,
    groups: *const u64,
    report: *mut GpoStepReport,
) -> GpoStatus {
    guard(|| {
        let t = unsafe { handle_mut(t, "trainer") }?;
        let b = unsafe { handle(batch, "batch") }?;
        if rewards.is_null() {
            return Err(super::null_arg("rewards"));
        }
        if n_rewards != b.items.len() {
            return Err(fail_msg(
                GpoStatus::GpoInvalidArgument,
                &format!("{n_rewards} rewards for {} trajectories", b.items.len()),
            ));
        }
        let rewards = unsafe { std::slice::from_raw_parts(rewards, n_rewards) };
        let groups = (!groups.is_null()).then(|| unsafe { std::slice::from_raw_parts(groups, n_rewards) });
        let items: Vec<Completion> = b
            .items
            .iter()
            .enumerate()
            .map(|(i, tr)| Completion {
                prompt: tr.context.iter().map(|&x| x as u32).collect(),
                completion: tr.tokens.iter().map(|&x| x as u32).collect(),
                behaviour_logprobs: Some(tr.logprobs.clone()),
                reward: rewards[i] as f64,
                advantage: None,
                group: groups.map_or(0, |g| g[i]),
            })
            .collect();
        let r = t.t.step(&Batch::Completions(items))?;
        if let Some(out) = unsafe { report.as_mut() } {
            *out = GpoStepReport {
                step: r.step,
                loss: r.loss,
                grad_norm: r.grad_norm,
                tokens_per_s: r.tokens_per_s,
                logprob_gap: r.logprob_gap_mean.unwrap_or(f64::NAN),
                skipped: r.skipped.is_some(),
            };
        }
        Ok(())
    })
}

/// Writes the adapter as a llama.cpp GGUF LoRA file (load it with gpo_engine_set_adapter()).
///
/// # Safety
/// Pointers are NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn gpo_trainer_export(t: *const GpoTrainer, path: *const c_char) -> GpoStatus {
    guard(|| {
        let t = unsafe { handle(t, "trainer") }?;
        t.t.export_adapter(unsafe { path_arg(path, "path") }?)?;
        Ok(())
    })
}

/// A whole GPO run (see `gpo train --config`). Thread-safety: gpo_run_start() from one thread;
/// gpo_run_cancel() from any thread.
pub struct GpoRun {
    cfg: RunConfig,
    cancel: AtomicBool,
}

/// Progress of a run, passed to the progress callback after every iteration.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GpoProgress {
    /// Iteration just finished (0-based).
    pub iteration: usize,
    /// Iterations of the run.
    pub iterations: usize,
    /// Mean reward of the root samples.
    pub reward_mean: f64,
    /// Loss (NaN when no update was applied).
    pub loss: f64,
    /// Held-out accuracy (NaN when not evaluated this iteration).
    pub heldout_accuracy: f64,
    /// Adapter version now serving.
    pub adapter_version: u64,
    /// Rollouts of the iteration.
    pub rollouts: u64,
}

/// Progress callback: return 0 to continue, non-zero to stop the run (gpo_run_start() then
/// returns GPO_CANCELLED; the run resumes from its last checkpoint next time).
pub type GpoProgressFn = Option<unsafe extern "C" fn(user_data: *mut c_void, progress: *const GpoProgress) -> i32>;

/// Reads a run configuration (TOML file). On success `*out` owns the run (free with gpo_run_free()).
///
/// # Safety
/// `config_path` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn gpo_run_new(config_path: *const c_char, out: *mut *mut GpoRun) -> GpoStatus {
    guard(|| {
        let out = unsafe { check_out(out) }?;
        let cfg = RunConfig::load(unsafe { path_arg(config_path, "config_path") }?)?;
        put(out, GpoRun { cfg, cancel: AtomicBool::new(false) });
        Ok(())
    })
}

struct CallbackProgress {
    cb: GpoProgressFn,
    user: *mut c_void,
    total: usize,
    cancel: *const AtomicBool,
    stop: bool,
}

impl Progress for CallbackProgress {
    fn iteration(&mut self, r: &MetricsRow) {
        if let Some(cb) = self.cb {
            let p = GpoProgress {
                iteration: r.iteration,
                iterations: self.total,
                reward_mean: r.reward_mean,
                loss: r.loss.unwrap_or(f64::NAN),
                heldout_accuracy: r.heldout_accuracy.unwrap_or(f64::NAN),
                adapter_version: r.adapter_version,
                rollouts: r.collect.total_rollouts(),
            };
            // SAFETY: the caller promised the callback is callable with user_data.
            if unsafe { cb(self.user, &p) } != 0 {
                self.stop = true;
            }
        }
    }

    fn should_stop(&mut self, _at_boundary: bool) -> bool {
        // SAFETY: points into the GpoRun borrowed for the whole gpo_run_start() call.
        self.stop || unsafe { (*self.cancel).load(Ordering::Relaxed) }
    }
}

/// Runs (or resumes) the GPO run until it has done all its iterations, the progress callback
/// asks to stop, or gpo_run_cancel() is called (GPO_CANCELLED; progress is kept up to the last
/// completed iteration). `progress` may be NULL.
///
/// # Safety
/// `run` is NULL or valid and not freed during the call; `progress` must be safe to call with
/// `user_data`.
#[no_mangle]
pub unsafe extern "C" fn gpo_run_start(run: *mut GpoRun, progress: GpoProgressFn, user_data: *mut c_void) -> GpoStatus {
    guard(|| {
        let r = unsafe { handle(run, "run") }?;
        r.cancel.store(false, Ordering::Relaxed);
        let mut p =
            CallbackProgress { cb: progress, user: user_data, total: r.cfg.iterations, cancel: &r.cancel, stop: false };
        crate::gpo::run(&r.cfg, &mut p)?;
        Ok(())
    })
}

/// Asks a running gpo_run_start() to stop at the next iteration boundary (any thread; with a
/// valid `run` it is one atomic store, so a signal handler may call it).
///
/// # Safety
/// `run` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn gpo_run_cancel(run: *const GpoRun) -> GpoStatus {
    guard(|| {
        unsafe { handle(run, "run") }?.cancel.store(true, Ordering::Relaxed);
        Ok(())
    })
}

/// Frees a run; NULL is a no-op. It must not be running.
///
/// # Safety
/// `run` is NULL or a pointer from gpo_run_new() not freed before.
#[no_mangle]
pub unsafe extern "C" fn gpo_run_free(run: *mut GpoRun) {
    unsafe { super::free_boxed(run) }
}
