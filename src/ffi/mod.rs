//! The C ABI (`libgpo.so`, `include/gpo.h`). Every function catches panics at the boundary and
//! reports failures as a [`GpoStatus`] with a thread-local message from [`gpo_last_error`].
//!
//! Conventions (as in llama.h and rustls-ffi): opaque handles created by `gpo_*_new` and freed by
//! `gpo_*_free` (which accept NULL); settings structs from `gpo_*_default_params()`; every
//! fallible call returns a status; pointers returned by accessors are borrowed from the handle
//! and valid until it is freed; strings passed in are borrowed for the call only.

mod engine;
mod score;
mod train;
mod trajectories;

pub use engine::*;
pub use score::*;
pub use train::*;
pub use trajectories::*;

use std::cell::RefCell;
use std::ffi::{c_char, CString};

/// Result code of every fallible gpo call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpoStatus {
    /// Success.
    GpoOk = 0,
    /// An argument was NULL or out of range.
    GpoInvalidArgument = 1,
    /// A file was missing or unreadable.
    GpoIoError = 2,
    /// A model or adapter was rejected.
    GpoModelError = 3,
    /// The call was cancelled.
    GpoCancelled = 4,
    /// A Rust panic was caught at the boundary (a bug in gpo; please report it). The handles the
    /// call used should only be freed afterwards.
    GpoPanic = 5,
    /// Anything else; see gpo_last_error().
    GpoInternalError = 6,
    /// A user callback returned an error.
    GpoCallbackError = 7,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `msg` as this thread's last error.
pub(crate) fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// The outcome of an FFI body: `Err` carries the status (its message is already recorded).
pub(crate) type FfiResult = Result<(), GpoStatus>;

impl From<crate::Error> for GpoStatus {
    fn from(e: crate::Error) -> GpoStatus {
        fail(&e)
    }
}

/// Runs an FFI body, mapping `Ok` to GPO_OK and a panic to `GpoPanic` with its message as the
/// last error. After a panic the handles the call used may be inconsistent: the header tells
/// callers to only free them.
pub(crate) fn guard(f: impl FnOnce() -> FfiResult) -> GpoStatus {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => GpoStatus::GpoOk,
        Ok(Err(status)) => status,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error (panic): {msg}"));
            GpoStatus::GpoPanic
        }
    }
}

/// gpo's version as a NUL-terminated string, e.g. "0.1.0".
/// Ownership: static storage owned by the library; never free it.
#[no_mangle]
pub extern "C" fn gpo_version() -> *const c_char {
    static V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
}

/// The message of the last failed gpo call on the calling thread ("" if none).
/// Ownership: owned by the library; valid until the next gpo call on the same thread. Copy it
/// if you need it longer. Thread-safety: each thread has its own message.
#[no_mangle]
pub extern "C" fn gpo_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Maps a gpo error to its status code and records its message as the last error.
pub(crate) fn fail(e: &crate::Error) -> GpoStatus {
    use crate::Error as E;
    set_last_error(&e.to_string());
    match e {
        E::NotFound(_) | E::Io { .. } => GpoStatus::GpoIoError,
        E::NotGguf { .. } | E::ModelLoad { .. } | E::Adapter { .. } | E::Gguf { .. } => GpoStatus::GpoModelError,
        E::Invalid { .. } | E::PromptTooLong { .. } | E::Data { .. } => GpoStatus::GpoInvalidArgument,
        E::Cancelled => GpoStatus::GpoCancelled,
        _ => GpoStatus::GpoInternalError,
    }
}

/// Records `msg` and returns `status`.
pub(crate) fn fail_msg(status: GpoStatus, msg: &str) -> GpoStatus {
    set_last_error(msg);
    status
}

/// The status of a NULL argument.
pub(crate) fn null_arg(what: &str) -> GpoStatus {
    fail_msg(GpoStatus::GpoInvalidArgument, &format!("{what} is NULL"))
}

/// A handle argument, or GPO_INVALID_ARGUMENT when NULL.
///
/// # Safety
/// `p` must be NULL or point to a live `T`.
pub(crate) unsafe fn handle<'a, T>(p: *const T, what: &str) -> Result<&'a T, GpoStatus> {
    unsafe { p.as_ref() }.ok_or_else(|| null_arg(what))
}

/// A mutable handle argument, or GPO_INVALID_ARGUMENT when NULL.
///
/// # Safety
/// `p` must be NULL or point to a live `T` not used elsewhere during the call.
pub(crate) unsafe fn handle_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, GpoStatus> {
    unsafe { p.as_mut() }.ok_or_else(|| null_arg(what))
}

/// A settings struct argument, or the defaults when NULL.
///
/// # Safety
/// `p` must be NULL or valid.
pub(crate) unsafe fn params_or<T: Copy>(p: *const T, default: T) -> T {
    unsafe { p.as_ref() }.copied().unwrap_or(default)
}

/// A JSON config argument decoded into `T`, or `T::default()` when NULL.
///
/// # Safety
/// `p` must be NULL or NUL-terminated.
pub(crate) unsafe fn json_arg<T: serde::de::DeserializeOwned + Default>(
    p: *const c_char,
    what: &str,
) -> Result<T, GpoStatus> {
    if p.is_null() {
        return Ok(T::default());
    }
    let text = unsafe { str_arg(p, what) }?;
    serde_json::from_str(text).map_err(|e| fail_msg(GpoStatus::GpoInvalidArgument, &format!("{what}: {e}")))
}

/// Stores a new handle into an out-pointer checked by [`check_out`].
pub(crate) fn put<T>(out: &mut *mut T, value: T) {
    *out = Box::into_raw(Box::new(value));
}

/// Checks an output pointer and clears what it points to.
///
/// # Safety
/// `out` must be NULL or writable.
pub(crate) unsafe fn check_out<'a, T>(out: *mut *mut T) -> Result<&'a mut *mut T, GpoStatus> {
    match unsafe { out.as_mut() } {
        Some(o) => {
            *o = std::ptr::null_mut();
            Ok(o)
        }
        None => Err(null_arg("out")),
    }
}

/// Reads a NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string valid for the call.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, GpoStatus> {
    if p.is_null() {
        return Err(null_arg(what));
    }
    // SAFETY: non-NULL and NUL-terminated per the contract above.
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| fail_msg(GpoStatus::GpoInvalidArgument, &format!("{what} is not valid UTF-8")))
}

/// Reads a NUL-terminated UTF-8 path argument.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string valid for the call.
pub(crate) unsafe fn path_arg<'a>(p: *const c_char, what: &str) -> Result<&'a std::path::Path, GpoStatus> {
    unsafe { str_arg(p, what) }.map(std::path::Path::new)
}

/// Checks that `path` is a GGUF model llama.cpp can load (vocabulary and metadata only, no
/// weights). Returns GPO_OK, or an error code with the reason in gpo_last_error().
/// `path`: NUL-terminated UTF-8, borrowed for the call only; NULL gives GPO_INVALID_ARGUMENT.
/// Thread-safety: may be called from any thread.
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string valid for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn gpo_model_check(path: *const c_char) -> GpoStatus {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let path = unsafe { path_arg(path, "path") }?;
        let params = crate::llama::ModelParams { vocab_only: true, n_gpu_layers: 0, ..Default::default() };
        crate::llama::Model::load(path, &params)?;
        Ok(())
    })
}

/// A static description of a status code (a GpoStatus value; any other integer gives "unknown
/// status" — taken as an int because a C caller may pass any). Ownership: static storage; never
/// free it.
#[no_mangle]
pub extern "C" fn gpo_status_string(status: i32) -> *const c_char {
    let s: &'static str = match status {
        0 => "ok\0",
        1 => "invalid argument\0",
        2 => "I/O error\0",
        3 => "model or adapter rejected\0",
        4 => "cancelled\0",
        5 => "internal error (panic caught)\0",
        6 => "internal error\0",
        7 => "a callback returned an error\0",
        _ => "unknown status\0",
    };
    s.as_ptr().cast()
}

/// Drops a boxed handle behind a panic guard: a panicking destructor never unwinds into C.
///
/// # Safety
/// `p` is NULL or a pointer from `Box::into_raw` not freed before.
pub(crate) unsafe fn free_boxed<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: the caller passes a live pointer from Box::into_raw exactly once.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(unsafe { Box::from_raw(p) })));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn version_and_errors() {
        let v = unsafe { CStr::from_ptr(gpo_version()) }.to_str().unwrap();
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
        assert_eq!(unsafe { CStr::from_ptr(gpo_last_error()) }.to_bytes(), b"");
        let st = guard(|| panic!("boom"));
        assert_eq!(st, GpoStatus::GpoPanic);
        let msg = unsafe { CStr::from_ptr(gpo_last_error()) }.to_str().unwrap();
        assert!(msg.contains("boom"), "{msg}");
        assert_eq!(guard(|| Err(fail_msg(GpoStatus::GpoIoError, "io"))), GpoStatus::GpoIoError);
        assert_eq!(unsafe { CStr::from_ptr(gpo_last_error()) }.to_str().unwrap(), "io");
        let s = unsafe { CStr::from_ptr(gpo_status_string(GpoStatus::GpoCancelled as i32)) };
        assert_eq!(s.to_str().unwrap(), "cancelled");
    }

    #[test]
    fn model_check_reports_null_missing_and_non_gguf() {
        assert_eq!(unsafe { gpo_model_check(std::ptr::null()) }, GpoStatus::GpoInvalidArgument);
        assert!(unsafe { CStr::from_ptr(gpo_last_error()) }.to_str().unwrap().contains("NULL"));
        let missing = std::ffi::CString::new("/nonexistent/model.gguf").unwrap();
        assert_eq!(unsafe { gpo_model_check(missing.as_ptr()) }, GpoStatus::GpoIoError);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"not a model").unwrap();
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { gpo_model_check(c.as_ptr()) }, GpoStatus::GpoModelError);
        assert!(unsafe { CStr::from_ptr(gpo_last_error()) }.to_str().unwrap().contains("not a GGUF file"));
    }
}
