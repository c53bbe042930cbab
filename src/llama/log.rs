//! Routes llama.cpp / ggml log lines to `tracing` and keeps the last error line per thread, so a
//! failed call (which only returns NULL) can be turned into an error that says why.

use super::sys;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};

thread_local! {
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
    static LAST_LEVEL: RefCell<sys::ggml_log_level> = const { RefCell::new(0) };
}

pub(super) fn install() {
    // SAFETY: the callback is a plain extern "C" fn valid for the whole process.
    unsafe { sys::llama_log_set(Some(callback), std::ptr::null_mut()) };
}

/// Forgets the last captured error of this thread; call before a llama.cpp call that may fail.
pub(crate) fn clear_last_error() {
    LAST_ERROR.with(|e| *e.borrow_mut() = None);
}

/// Takes the error lines llama.cpp logged on this thread since [`clear_last_error`], joined
/// with "; " and without their `function_name:` prefixes.
pub(crate) fn take_last_error() -> Option<String> {
    LAST_ERROR.with(|e| e.borrow_mut().take()).map(|s| {
        let lines: Vec<&str> = s
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| match l.split_once(": ") {
                // "llama_adapter_lora_init_impl: msg" → "msg"
                Some((head, tail)) if !head.contains(' ') => tail,
                _ => l,
            })
            .collect();
        lines.join("; ")
    })
}

unsafe extern "C" fn callback(level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string valid for the call.
    let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let level = if level == sys::GGML_LOG_LEVEL_CONT { LAST_LEVEL.with(|l| *l.borrow()) } else { level };
    LAST_LEVEL.with(|l| *l.borrow_mut() = level);
    if level == sys::GGML_LOG_LEVEL_ERROR {
        LAST_ERROR.with(|e| {
            let mut e = e.borrow_mut();
            e.get_or_insert_with(String::new).push_str(&msg);
        });
    }
    let line = msg.trim_end();
    if line.is_empty() {
        return;
    }
    match level {
        sys::GGML_LOG_LEVEL_ERROR => tracing::debug!(target: "llama.cpp", "error: {line}"),
        sys::GGML_LOG_LEVEL_WARN => tracing::debug!(target: "llama.cpp", "warn: {line}"),
        _ => tracing::trace!(target: "llama.cpp", "{line}"),
    }
}
