//! Wall time per op of training steps, for `gpo bench train --ops`: which fused node costs what
//! in the forward and the backward, and (by difference with the step's phases) how much is
//! candle's graph around them. Off unless enabled; when off an op pays one relaxed load.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Vec<OpTime>> = Mutex::new(Vec::new());

/// Which pass an op's time was spent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pass {
    /// The op's forward.
    Forward,
    /// The op's backward (its part of the input and parameter gradients).
    Backward,
}

/// Accumulated wall time of one op in one pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpTime {
    /// The op's name (`lora-linear`, `attention`, `head-logprobs`, ...).
    pub op: String,
    /// Forward or backward.
    pub pass: Pass,
    /// Seconds spent, summed over calls.
    pub seconds: f64,
    /// Number of calls.
    pub calls: u64,
}

/// Turns the per-op clock on or off (process-wide).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Runs `f`, adding its wall time to `op`'s row for `pass` when the profile is enabled.
pub(crate) fn time<T>(op: &'static str, pass: Pass, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let t0 = Instant::now();
    let r = f();
    let dt = t0.elapsed().as_secs_f64();
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    match table.iter_mut().find(|r| r.op == op && r.pass == pass) {
        Some(row) => {
            row.seconds += dt;
            row.calls += 1;
        }
        None => table.push(OpTime { op: op.to_string(), pass, seconds: dt, calls: 1 }),
    }
    r
}

/// The rows accumulated since the last `take`, in first-seen order; clears them.
pub fn take() -> Vec<OpTime> {
    std::mem::take(&mut *TABLE.lock().unwrap_or_else(|e| e.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_accumulate_per_op_and_pass_only_while_enabled() {
        // Other tests may run profiled ops meanwhile: look only at this test's rows.
        let mine =
            |rows: Vec<OpTime>| -> Vec<OpTime> { rows.into_iter().filter(|r| r.op.starts_with("test-")).collect() };
        take();
        time("test-a", Pass::Forward, || ());
        assert!(mine(take()).is_empty(), "disabled: nothing recorded");
        set_enabled(true);
        time("test-a", Pass::Forward, || std::thread::sleep(std::time::Duration::from_millis(2)));
        time("test-a", Pass::Forward, || ());
        time("test-a", Pass::Backward, || ());
        time("test-b", Pass::Forward, || ());
        set_enabled(false);
        let rows = mine(take());
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].op.as_str(), rows[0].pass, rows[0].calls), ("test-a", Pass::Forward, 2));
        assert!(rows[0].seconds >= 0.002);
        assert_eq!((rows[1].op.as_str(), rows[1].pass, rows[1].calls), ("test-a", Pass::Backward, 1));
        assert_eq!((rows[2].op.as_str(), rows[2].calls), ("test-b", 1));
        assert!(mine(take()).is_empty(), "take clears");
    }
}
