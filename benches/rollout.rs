//! Criterion benchmarks of the rollout engine against the raw llama.cpp loop on the default model
//! (small workload; `gpo bench rollout` runs the full one and prints ratios).

use criterion::{criterion_group, criterion_main, Criterion};
use gpo::bench::{bench_engine, gpo_rollout, raw_rollout, Setup, Workload};
use gpo::engine::{KvMode, SamplingBackend};
use gpo::llama::{Model, ModelParams};
use std::time::Duration;

fn rollout(c: &mut Criterion) {
    let model = gpo::models::default_model().expect("default model missing: run scripts/fetch-model.sh");
    let w = Workload { b: 4, p: 64, g: 32, k: 4 };
    let setup =
        Setup { kv: KvMode::Unified, threads: 0, gpu_layers: -1, flash_attn: None, sampling: SamplingBackend::Graph };
    let engine = bench_engine(model.clone(), &w, &setup, true).expect("engine");
    let host_setup = Setup { sampling: SamplingBackend::Host, ..setup };
    let host_sampling = bench_engine(model.clone(), &w, &host_setup, true).expect("engine");
    let no_cache = bench_engine(model.clone(), &w, &setup, false).expect("engine");
    let m = Model::load(&model, &ModelParams::default()).expect("model");

    let mut g = c.benchmark_group("rollout_b4_p64_g32_k4");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("raw_c_api/generate", |b| {
        b.iter_custom(|n| {
            (0..n).map(|i| secs(|| raw_rollout(&m, &w, &setup, i).map(|t| t.prefill_s + t.decode_s))).sum()
        })
    });
    g.bench_function("gpo/generate", |b| {
        b.iter_custom(|n| (0..n).map(|i| secs(|| gpo_rollout(&engine, &no_cache, &w, i).map(|t| t.generate_s))).sum())
    });
    g.bench_function("gpo/generate_host_sampling", |b| {
        b.iter_custom(|n| {
            (0..n).map(|i| secs(|| gpo_rollout(&host_sampling, &no_cache, &w, i).map(|t| t.generate_s))).sum()
        })
    });
    g.bench_function("gpo/fork", |b| {
        b.iter_custom(|n| (0..n).map(|i| secs(|| gpo_rollout(&engine, &no_cache, &w, i).map(|t| t.fork_s))).sum())
    });
    g.bench_function("gpo/re_prefill", |b| {
        b.iter_custom(|n| (0..n).map(|i| secs(|| gpo_rollout(&engine, &no_cache, &w, i).map(|t| t.reprefill_s))).sum())
    });
    g.finish();
}

fn secs(f: impl FnOnce() -> gpo::Result<f64>) -> Duration {
    Duration::from_secs_f64(f().expect("benchmark run"))
}

criterion_group!(benches, rollout);
criterion_main!(benches);
