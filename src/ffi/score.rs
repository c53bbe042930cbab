//! Verifiers and step values with a reward callback.

use super::engine::{gpo_sampling_default_params, GpoEngine, GpoSamplingParams};
use super::{
    check_out, fail_msg, guard, handle, handle_mut, json_arg, params_or, put, str_arg, GpoStatus, GpoTrajectories,
};
use crate::gpo::collect::Rollouts;
use crate::reward::{Verifier, VerifierConfig};
use crate::tree::CriticalMode;
use std::ffi::{c_char, c_void, CString};

/// A verifier built from a JSON config (e.g. `{"kind": "numeric"}`, `{"kind": "regex",
/// "pattern": "…"}`, `{"kind": "command", "command": ["./check"], "timeout_ms": 2000}`).
/// Thread-safety: may be used from several threads at once.
pub struct GpoVerifier {
    v: Verifier,
}

/// Builds a verifier; NULL `config_json` gives the numeric final-answer verifier. On success
/// `*out` owns it (free with gpo_verifier_free()).
///
/// # Safety
/// `config_json` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn gpo_verifier_new(config_json: *const c_char, out: *mut *mut GpoVerifier) -> GpoStatus {
    guard(|| {
        let out = unsafe { check_out(out) }?;
        let cfg: VerifierConfig = unsafe { json_arg(config_json, "verifier config") }?;
        put(out, GpoVerifier { v: Verifier::new(&cfg)? });
        Ok(())
    })
}

/// Frees a verifier; NULL is a no-op.
///
/// # Safety
/// `v` is NULL or a pointer from gpo_verifier_new() not freed before.
#[no_mangle]
pub unsafe extern "C" fn gpo_verifier_free(v: *mut GpoVerifier) {
    unsafe { super::free_boxed(v) }
}

/// Scores `completion` against `answer` into `*score` ([0, 1]). A failing external command scores 0.
///
/// # Safety
/// Pointers are NULL or valid for the call.
#[no_mangle]
pub unsafe extern "C" fn gpo_verifier_score(
    v: *const GpoVerifier,
    prompt: *const c_char,
    completion: *const c_char,
    answer: *const c_char,
    score: *mut f32,
) -> GpoStatus {
    guard(|| {
        let v = unsafe { handle(v, "verifier") }?;
        let (p, c, a) =
            unsafe { (str_arg(prompt, "prompt")?, str_arg(completion, "completion")?, str_arg(answer, "answer")?) };
        let score = unsafe { handle_mut(score, "score") }?;
        *score = v.v.score(p, c, a);
        Ok(())
    })
}

/// A reward callback: scores `completion` (the generated text; `prompt` is the trajectory's
/// context as text) into `*score` and returns 0, or returns non-zero to abort the calling
/// function with GPO_CALLBACK_ERROR. Called on the calling thread; the strings are borrowed for
/// the duration of the call.
pub type GpoRewardFn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        prompt: *const c_char,
        completion: *const c_char,
        score: *mut f32,
    ) -> i32,
>;

/// Settings of gpo_step_values().
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GpoValueParams {
    /// Continuations per prefix (M). Default 4.
    pub rollouts: u32,
    /// 0 = abs (largest |A_i|), 1 = drop (smallest A_i), 2 = gain (largest A_i), 3 = auto (drop
    /// for a failed trajectory, gain for a correct one).
    pub critical_mode: i32,
    /// Sampling of the continuations.
    pub sampling: GpoSamplingParams,
}

/// Default value-estimation settings.
#[no_mangle]
pub extern "C" fn gpo_value_default_params() -> GpoValueParams {
    GpoValueParams { rollouts: 4, critical_mode: 0, sampling: gpo_sampling_default_params() }
}

/// Monte-Carlo step values of one trajectory.
/// Thread-safety: read-only after creation.
pub struct GpoValues {
    values: Vec<f64>,
    advantages: Vec<f64>,
    critical: i64,
}

/// Estimates V(s_0) … V(s_K) of trajectory `index` of `list` with `params.rollouts` KV-forked
/// continuations per prefix, scored by `reward` (called for the trajectory itself and every
/// continuation, with `user_data`). On success `*out` owns the result (free with
/// gpo_values_free()). A callback returning non-zero aborts with GPO_CALLBACK_ERROR.
///
/// # Safety
/// Pointers are NULL or valid for the call; `reward` must be safe to call with `user_data`.
#[no_mangle]
pub unsafe extern "C" fn gpo_step_values(
    engine: *const GpoEngine,
    list: *const GpoTrajectories,
    index: usize,
    params: *const GpoValueParams,
    reward: GpoRewardFn,
    user_data: *mut c_void,
    out: *mut *mut GpoValues,
) -> GpoStatus {
    guard(|| {
        let out = unsafe { check_out(out) }?;
        let e = unsafe { handle(engine, "engine") }?;
        let traj = unsafe { GpoTrajectories::get(list, index) }?;
        let cb = reward.ok_or_else(|| super::null_arg("reward"))?;
        let p = unsafe { params_or(params, gpo_value_default_params()) };
        let mode = match p.critical_mode {
            0 => CriticalMode::Abs,
            1 => CriticalMode::Drop,
            2 => CriticalMode::Gain,
            3 => CriticalMode::Auto,
            m => {
                return Err(fail_msg(
                    GpoStatus::GpoInvalidArgument,
                    &format!("critical_mode {m} (0 abs, 1 drop, 2 gain, 3 auto)"),
                ))
            }
        };
        if p.rollouts == 0 {
            return Err(fail_msg(GpoStatus::GpoInvalidArgument, "rollouts must be at least 1"));
        }
        let model = e.engine.model().clone();
        let mut cb_failed = false;
        let mut score = |t: &crate::engine::Trajectory| -> crate::Result<f64> {
            let prompt = CString::new(model.detokenize_special(&t.context).replace('\0', " ")).unwrap_or_default();
            let completion = CString::new(t.text.replace('\0', " ")).unwrap_or_default();
            let mut s = 0.0f32;
            // SAFETY: the caller promised the callback is callable with user_data.
            let rc = unsafe { cb(user_data, prompt.as_ptr(), completion.as_ptr(), &mut s) };
            if rc != 0 || !s.is_finite() {
                cb_failed = true;
                return Err(crate::Error::invalid("reward callback", format!("returned {rc} (score {s})")));
            }
            Ok(s as f64)
        };
        let v = crate::gpo::values::estimate(
            &EngineRollouts(e),
            traj,
            &crate::gpo::values::SearchConfig::dense(p.rollouts as usize),
            &(&p.sampling).into(),
            &crate::engine::StepConfig::default(), // gpo_generate segments with the default
            mode,
            &mut score,
        )
        .map_err(|err| {
            if cb_failed {
                fail_msg(GpoStatus::GpoCallbackError, "the reward callback returned an error")
            } else {
                err.into()
            }
        })?;
        put(
            out,
            GpoValues { critical: v.critical.map_or(-1, |c| c as i64), values: v.values, advantages: v.advantages },
        );
        Ok(())
    })
}

struct EngineRollouts<'a>(&'a GpoEngine);

impl Rollouts for EngineRollouts<'_> {
    fn sample(&self, reqs: Vec<crate::engine::GenerateRequest>) -> crate::Result<Vec<Vec<crate::engine::Trajectory>>> {
        self.0.run(reqs)
    }
    fn render(&self, tokens: &[i32]) -> String {
        self.0.engine.model().detokenize_special(tokens)
    }
}

/// Frees step values; NULL is a no-op.
///
/// # Safety
/// `v` is NULL or a pointer from gpo_step_values() not freed before.
#[no_mangle]
pub unsafe extern "C" fn gpo_values_free(v: *mut GpoValues) {
    unsafe { super::free_boxed(v) }
}

/// The values V(s_0) … V(s_K): `*values` points to `*len` doubles; `*advantages` (may be NULL)
/// to `*len − 1`. Returns the critical step, or -1 when all values are equal (or `v` is NULL).
/// Ownership: borrowed; valid until gpo_values_free().
///
/// # Safety
/// `v` is NULL or valid; output pointers are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn gpo_values_get(
    v: *const GpoValues,
    values: *mut *const f64,
    advantages: *mut *const f64,
    len: *mut usize,
) -> i64 {
    let Some(v) = (unsafe { v.as_ref() }) else { return -1 };
    unsafe {
        if !values.is_null() {
            *values = v.values.as_ptr();
        }
        if !advantages.is_null() {
            *advantages = v.advantages.as_ptr();
        }
        if !len.is_null() {
            *len = v.values.len();
        }
    }
    v.critical
}
