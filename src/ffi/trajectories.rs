//! A list of trajectories returned by generate/fork, with borrowed accessors.

use super::{fail_msg, guard, GpoStatus};
use crate::engine::Trajectory;
use std::ffi::{c_char, CString};

/// Trajectories owned by the caller (free with gpo_trajectories_free()).
/// Thread-safety: read-only after creation; may be read from several threads at once.
pub struct GpoTrajectories {
    pub(crate) items: Vec<Trajectory>,
    texts: Vec<CString>,
    steps: Vec<Vec<u32>>,
    reasons: Vec<CString>,
}

impl GpoTrajectories {
    pub(crate) fn boxed(items: Vec<Trajectory>) -> *mut GpoTrajectories {
        let texts = items.iter().map(|t| CString::new(t.text.replace('\0', " ")).unwrap_or_default()).collect();
        let steps =
            items.iter().map(|t| t.steps.iter().flat_map(|s| [s.start as u32, s.end as u32]).collect()).collect();
        let reasons = items
            .iter()
            .map(|t| {
                CString::new(
                    serde_json::to_value(&t.finish)
                        .ok()
                        .map(|v| v.to_string().trim_matches('"').to_string())
                        .unwrap_or_default(),
                )
                .unwrap_or_default()
            })
            .collect();
        Box::into_raw(Box::new(GpoTrajectories { items, texts, steps, reasons }))
    }

    /// The `index`-th trajectory of a valid list, or an error status with the message set.
    ///
    /// # Safety
    /// `list` is NULL or a live pointer from gpo.
    pub(crate) unsafe fn get<'a>(list: *const GpoTrajectories, index: usize) -> Result<&'a Trajectory, GpoStatus> {
        let Some(l) = (unsafe { list.as_ref() }) else { return Err(super::null_arg("trajectories")) };
        l.items.get(index).ok_or_else(|| {
            fail_msg(
                GpoStatus::GpoInvalidArgument,
                &format!("index {index} is out of range (the list holds {})", l.items.len()),
            )
        })
    }
}

/// Frees a trajectory list. NULL is a no-op; every pointer obtained from its accessors becomes
/// invalid.
///
/// # Safety
/// `list` is NULL or a pointer from gpo not freed before.
#[no_mangle]
pub unsafe extern "C" fn gpo_trajectories_free(list: *mut GpoTrajectories) {
    unsafe { super::free_boxed(list) }
}

/// Number of trajectories (0 for NULL).
///
/// # Safety
/// `list` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn gpo_trajectories_count(list: *const GpoTrajectories) -> usize {
    unsafe { list.as_ref() }.map_or(0, |l| l.items.len())
}

/// Text of trajectory `index` (NUL-terminated UTF-8), or NULL when out of range.
/// Ownership: borrowed; valid until the list is freed.
///
/// # Safety
/// `list` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn gpo_trajectory_text(list: *const GpoTrajectories, index: usize) -> *const c_char {
    unsafe { list.as_ref() }.and_then(|l| l.texts.get(index)).map_or(std::ptr::null(), |c| c.as_ptr())
}

/// Why trajectory `index` stopped ("eog", "length", "stop", "context_full", "cancelled"), or NULL.
/// Ownership: borrowed; valid until the list is freed.
///
/// # Safety
/// `list` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn gpo_trajectory_finish(list: *const GpoTrajectories, index: usize) -> *const c_char {
    unsafe { list.as_ref() }.and_then(|l| l.reasons.get(index)).map_or(std::ptr::null(), |c| c.as_ptr())
}

/// Generated token ids and their log-probs of trajectory `index`: `*tokens` and `*logprobs`
/// (either may be NULL) point to `*len` entries. Ownership: borrowed; valid until the list is
/// freed.
///
/// # Safety
/// `list` is NULL or valid; output pointers are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn gpo_trajectory_tokens(
    list: *const GpoTrajectories,
    index: usize,
    tokens: *mut *const i32,
    logprobs: *mut *const f32,
    len: *mut usize,
) -> GpoStatus {
    guard(|| {
        let t = unsafe { GpoTrajectories::get(list, index) }?;
        unsafe {
            if !tokens.is_null() {
                *tokens = t.tokens.as_ptr();
            }
            if !logprobs.is_null() {
                *logprobs = t.logprobs.as_ptr();
            }
            if !len.is_null() {
                *len = t.tokens.len();
            }
        }
        Ok(())
    })
}

/// Step boundaries of trajectory `index`: `*bounds` points to `2 × *n_steps` values
/// `start0, end0, start1, end1, …` (token offsets into the generated tokens). Ownership:
/// borrowed; valid until the list is freed.
///
/// # Safety
/// `list` is NULL or valid; output pointers are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn gpo_trajectory_steps(
    list: *const GpoTrajectories,
    index: usize,
    bounds: *mut *const u32,
    n_steps: *mut usize,
) -> GpoStatus {
    guard(|| {
        unsafe { GpoTrajectories::get(list, index) }?;
        let l = unsafe { &*list };
        unsafe {
            if !bounds.is_null() {
                *bounds = l.steps[index].as_ptr();
            }
            if !n_steps.is_null() {
                *n_steps = l.steps[index].len() / 2;
            }
        }
        Ok(())
    })
}

/// Adapter version that produced trajectory `index` (0 = base model; 0 when out of range).
///
/// # Safety
/// `list` is NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn gpo_trajectory_adapter_version(list: *const GpoTrajectories, index: usize) -> u64 {
    unsafe { list.as_ref() }.and_then(|l| l.items.get(index)).map_or(0, |t| t.adapter_version)
}
