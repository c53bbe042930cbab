//! LoRA adapters in the engine: exact no-op for zero B, real effect otherwise, versioning, stale
//! KV never reused, swaps as barriers (memory over 1,000 swaps: `adapter_memory.rs`, alone in its
//! process).

mod common;

use common::{engine, real_model, tiny_model, write_adapter};
use gpo::engine::{GenerateRequest, KvMode, Prompt, SamplingParams};
use gpo::gguf::lora::LoraAdapterFile;

/// An adapter on the q and v projections of every layer; B is zero or random with scale `b`.
fn greedy_req() -> GenerateRequest {
    GenerateRequest::new(Prompt::user("Name three fruits."), 1, SamplingParams::greedy(24))
}

#[test]
fn lora_file_round_trips() {
    let p = write_adapter(&tiny_model("llama"), "rt.gguf", 4, 0.3, 1);
    let f = LoraAdapterFile::read(&p).unwrap();
    assert_eq!(f.architecture, "llama");
    assert_eq!(f.alpha, 8.0);
    assert_eq!(f.tensors.len(), 4); // 2 layers × (q, v)
    let t = &f.tensors[0];
    assert_eq!(t.a.len(), t.rank * t.n_in);
    assert_eq!(t.b.len(), t.n_out * t.rank);
    assert!(t.b.iter().any(|&x| x != 0.0));
}

#[test]
fn zero_b_is_a_no_op_nonzero_changes_outputs_remove_restores() {
    let model = real_model();
    let e = engine(&model, 4, 4096, KvMode::Unified);
    let base = e.generate(greedy_req()).unwrap().remove(0);
    assert_eq!(base.adapter_version, 0);

    let v1 = e.set_adapter(write_adapter(&model, "zero.gguf", 8, 0.0, 2), 1.0).unwrap();
    assert_eq!(v1, 1);
    let zero = e.generate(greedy_req()).unwrap().remove(0);
    assert_eq!(zero.adapter_version, 1);
    assert_eq!(zero.tokens, base.tokens);
    for (a, b) in zero.logprobs.iter().zip(&base.logprobs) {
        assert!((a - b).abs() < 1e-5, "zero-B adapter changed a log-prob: {a} vs {b}");
    }

    let v2 = e.set_adapter(write_adapter(&model, "real.gguf", 8, 0.5, 3), 1.0).unwrap();
    assert_eq!(v2, 2);
    let changed = e.generate(greedy_req()).unwrap().remove(0);
    let moved =
        changed.tokens != base.tokens || changed.logprobs.iter().zip(&base.logprobs).any(|(a, b)| (a - b).abs() > 1e-2);
    assert!(moved, "a non-zero adapter must change the outputs");

    assert_eq!(e.remove_adapter().unwrap(), 3);
    let restored = e.generate(greedy_req()).unwrap().remove(0);
    assert_eq!(restored.tokens, base.tokens);
    assert_eq!(restored.adapter_version, 3);
}

#[test]
fn kv_cached_under_an_older_adapter_is_never_reused() {
    let model = real_model();
    let e = engine(&model, 4, 4096, KvMode::Unified);
    let parent = e.generate(greedy_req()).unwrap().remove(0);
    // Same adapter version: the fork reuses the cached prefix.
    let s0 = e.stats().unwrap();
    e.fork(&parent, 10, 1, SamplingParams::greedy(4)).unwrap();
    let s1 = e.stats().unwrap();
    assert!(s1.reused_tokens > s0.reused_tokens);
    // After a swap the cache is dropped: the fork recomputes the whole prefix under the new adapter.
    e.set_adapter(write_adapter(&model, "stale.gguf", 8, 0.5, 4), 1.0).unwrap();
    let s2 = e.stats().unwrap();
    assert_eq!(s2.cached, 0, "cached KV of the old adapter must be dropped");
    let f = e.fork(&parent, 10, 1, SamplingParams::greedy(4)).unwrap().remove(0);
    let s3 = e.stats().unwrap();
    assert_eq!(s3.reused_tokens, s2.reused_tokens, "no prefix reused across adapter versions");
    assert!(s3.prefill_tokens - s2.prefill_tokens >= (parent.context.len() + 10) as u64);
    assert_eq!(f.adapter_version, 1);
}

#[test]
fn swap_waits_for_requests_submitted_before_it() {
    let model = tiny_model("llama");
    let e = engine(&model, 4, 4096, KvMode::Unified);
    let long = SamplingParams { ignore_eog: true, ..SamplingParams::greedy(300) };
    let before = e.submit(GenerateRequest::new(Prompt::Raw("x".into()), 2, long)).unwrap();
    let adapter = write_adapter(&model, "barrier.gguf", 4, 0.5, 5);
    let e2 = e.clone();
    let swapper = std::thread::spawn(move || e2.set_adapter(adapter, 1.0).unwrap());
    // Wait until the swap sits in the queue behind the running request, then submit another.
    while e.stats().unwrap().waiting == 0 {
        std::thread::yield_now();
    }
    assert_eq!(e.stats().unwrap().adapter_version, 0, "the swap must wait for the running request");
    let after = e.generate(GenerateRequest::new(Prompt::Raw("y".into()), 1, SamplingParams::greedy(4))).unwrap();
    assert_eq!(swapper.join().unwrap(), 1);
    for t in before.wait().unwrap() {
        assert_eq!(t.adapter_version, 0, "submitted before the swap, so sampled on the old adapter");
        assert_eq!(t.tokens.len(), 300);
    }
    assert_eq!(after[0].adapter_version, 1);
}

#[test]
fn concurrent_adapter_swap() {
    // Eight threads swap adapters while a ninth generates: every adapter is loaded and freed on
    // the engine thread (llama.cpp's adapter set is unlocked and read during decode), so this is
    // race-free; each swap gets its own version and every sample names one that existed.
    let model = tiny_model("llama");
    let e = engine(&model, 4, 4096, KvMode::PerSequence);
    let files: Vec<_> = (0..8).map(|i| write_adapter(&model, &format!("race-{i}.gguf"), 4, 0.3, 20 + i)).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gen = {
        let (e, stop) = (e.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sp = SamplingParams { ignore_eog: true, ..SamplingParams::greedy(6) };
                for t in e.generate(GenerateRequest::new(Prompt::Raw("race".into()), 2, sp)).unwrap() {
                    assert_eq!(t.tokens.len(), 6);
                    seen.push(t.adapter_version);
                }
            }
            seen
        })
    };
    let swappers: Vec<_> = files
        .into_iter()
        .map(|f| {
            let e = e.clone();
            std::thread::spawn(move || {
                let mut versions = Vec::new();
                for _ in 0..5 {
                    versions.push(e.set_adapter(&f, 1.0).unwrap());
                    versions.push(e.remove_adapter().unwrap());
                }
                versions
            })
        })
        .collect();
    let mut versions: Vec<u64> = swappers.into_iter().flat_map(|h| h.join().unwrap()).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = gen.join().unwrap();
    versions.sort_unstable();
    assert_eq!(versions, (1..=80).collect::<Vec<u64>>(), "each swap is one version, none lost or repeated");
    assert!(!seen.is_empty() && seen.iter().all(|v| *v <= 80), "{seen:?}");
    // Loading an engine's adapter on another thread than its engine thread is refused.
    let adapter = write_adapter(&model, "off-thread.gguf", 4, 0.3, 99);
    let err = gpo::llama::LoraAdapter::load(e.model(), adapter).err().expect("refused off the engine thread");
    assert!(err.to_string().contains("set_adapter"), "{err}");
}

#[test]
fn non_finite_logits_fail_the_request_instead_of_returning_null_logprobs() {
    let model = tiny_model("llama");
    let e = engine(&model, 2, 2048, KvMode::PerSequence);
    e.set_adapter(write_adapter(&model, "nan.gguf", 4, f32::NAN, 7), 1.0).unwrap();
    let err = e.generate(greedy_req()).unwrap_err().to_string();
    assert!(err.contains("non-finite logits"), "{err}");
    // The engine itself is fine: back on the base model it generates.
    e.remove_adapter().unwrap();
    let t = e.generate(greedy_req()).unwrap();
    assert!(t[0].logprobs.iter().all(|l| l.is_finite()));
}
