//! Criterion benchmark of one training step (GRPO, LoRA r = 16 on all projections, forward +
//! backward + AdamW) on the default model; `gpo bench train` prints the full comparison.

use criterion::{criterion_group, criterion_main, Criterion};
use gpo::bench::train::fixed_batch;
use gpo::train::{Aggregation, LoraConfig, Objective, Recompute, Target, Trainer, TrainerConfig};
use std::time::Duration;

fn step(c: &mut Criterion) {
    let model = gpo::models::default_model().expect("default model missing: run scripts/fetch-model.sh");
    let mut g = c.benchmark_group("train_step_2x128");
    g.sample_size(10).measurement_time(Duration::from_secs(60));
    for (name, recompute, plain, pack) in [
        ("gpo_recompute", Recompute::Always, false, true),
        ("gpo_keep_activations", Recompute::Never, false, true),
        ("gpo_keep_activations_unpacked", Recompute::Never, false, false),
        ("candle_plain_autograd", Recompute::Never, true, false),
    ] {
        let mut t = Trainer::new(TrainerConfig {
            model: model.clone(),
            objective: Objective::Grpo { clip: 0.2, aggregation: Aggregation::TokenMean },
            lora: LoraConfig { rank: 16, alpha: 32.0, targets: Target::ALL.to_vec(), seed: 1 },
            recompute,
            plain_autograd: plain,
            pack,
            micro_batch: 2,
            ..Default::default()
        })
        .expect("trainer");
        let batch = fixed_batch(2, 128, t.weights().cfg.n_vocab);
        g.bench_function(name, |b| b.iter(|| t.step(&batch).expect("step")));
    }
    g.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
