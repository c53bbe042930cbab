//! Resident memory over 1,000 adapter swaps. A process-wide measurement: this binary holds this
//! one test, so no other test's allocations run beside it (cargo runs test binaries one at a
//! time). A leaked adapter per swap must still fail it by a wide margin.

mod common;

use common::{engine, real_model, rss_kib, write_adapter};
use gpo::engine::{GenerateRequest, KvMode, Prompt, SamplingParams};

#[test]
fn a_thousand_swaps_keep_resident_memory_flat() {
    let model = real_model();
    let e = engine(&model, 2, 1024, KvMode::Unified);
    let a = write_adapter(&model, "swap-a.gguf", 8, 0.0, 6);
    let b = write_adapter(&model, "swap-b.gguf", 8, 0.5, 7);
    let size_kib = std::fs::metadata(&a).unwrap().len() / 1024;
    for i in 0..100 {
        e.set_adapter(if i % 2 == 0 { &a } else { &b }, 1.0).unwrap();
    }
    let start = rss_kib();
    for i in 0..1000 {
        e.set_adapter(if i % 2 == 0 { &a } else { &b }, 1.0).unwrap();
    }
    e.generate(GenerateRequest::new(Prompt::user("Name three fruits."), 1, SamplingParams::greedy(24))).unwrap();
    let growth = rss_kib().saturating_sub(start);
    // A leaked adapter per swap would grow by 1,000 × its size.
    assert!(growth < 20 * 1024, "RSS grew by {growth} KiB over 1,000 swaps of a {size_kib} KiB adapter");
    // The check only means something if a leak would be far above the threshold.
    assert!(1000 * size_kib >= 10 * 20 * 1024, "adapter of {size_kib} KiB too small for the leak check");
    assert_eq!(e.stats().unwrap().adapter_version, 1100);
}
