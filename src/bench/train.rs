//! `gpo bench train`: tokens/s and peak memory of forward + backward + AdamW step on a fixed
//! batch, against candle's plain autograd (frozen-weight gradients, no activation
//! recomputation) in the same process.

use super::median;
use crate::train::{Aggregation, Batch, Completion, LoraConfig, Objective, Target, Trainer, TrainerConfig};
use crate::Result;
use std::path::PathBuf;
use std::time::Instant;

/// Settings of the training benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// GGUF model (default: the cached SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Sequences per step.
    #[arg(short = 'b', long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence (prompt of 16 + completion).
    #[arg(short = 't', long, default_value_t = 256)]
    pub tokens: usize,
    /// LoRA rank (all seven projections).
    #[arg(short = 'r', long, default_value_t = 16)]
    pub rank: usize,
    /// Timed steps per variant (after one warm-up step); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Skip the plain-autograd baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Peak resident memory since the last reset, in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Resets the peak-RSS counter (Linux: `echo 5 > /proc/self/clear_refs`).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A GRPO batch of `b` sequences of `t` tokens (random ids, two groups).
pub fn fixed_batch(b: usize, t: usize, n_vocab: usize) -> Batch {
    let prompt_len = 16.min(t - 1);
    let ids = super::random_prompt(n_vocab as i32, b * t, 7);
    Batch::Completions(
        (0..b)
            .map(|i| {
                let s: Vec<u32> = ids[i * t..(i + 1) * t].iter().map(|&x| x as u32).collect();
                Completion {
                    group: (i % 2) as u64,
                    ..Completion::new(s[..prompt_len].to_vec(), s[prompt_len..].to_vec(), (i % 3 == 0) as u8 as f64)
                }
            })
            .collect(),
    )
}

/// Median seconds per step and peak RSS (MiB) of `steps` steps after a warm-up.
fn measure(cfg: TrainerConfig, batch: &Batch, steps: usize) -> Result<(f64, f64)> {
    reset_peak_rss();
    let mut t = Trainer::new(cfg)?;
    t.step(batch)?;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t0 = Instant::now();
        let r = t.step(batch)?;
        if let Some(why) = r.skipped {
            return Err(crate::Error::Train(why));
        }
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok((median(&mut times), peak_rss_mib()))
}

/// Runs the benchmark and prints a table.
pub fn train(args: &TrainArgs) -> Result<()> {
    let model = match &args.model {
        Some(p) => p.clone(),
        None => crate::models::default_model()?,
    };
    if args.batch == 0 || args.tokens < 2 {
        return Err(crate::Error::invalid("workload", "batch ≥ 1 and tokens ≥ 2"));
    }
    let cfg = TrainerConfig {
        model: model.clone(),
        objective: Objective::Grpo { clip: 0.2, aggregation: Aggregation::TokenMean },
        lora: LoraConfig { rank: args.rank, alpha: 2.0 * args.rank as f32, targets: Target::ALL.to_vec(), seed: 1 },
        micro_batch: args.batch,
        device: args.device.clone(),
        ..Default::default()
    };
    let n_vocab = crate::train::Weights::load(&model, candle_core::DType::F32, &candle_core::Device::Cpu)?.cfg.n_vocab;
    let batch = fixed_batch(args.batch, args.tokens, n_vocab);
    let tokens = (args.batch * args.tokens) as f64;
    println!(
        "train step: GRPO, {} × {} tokens, LoRA r={} on q,k,v,o,gate,up,down, AdamW; {} timed steps, medians",
        args.batch, args.tokens, args.rank, args.steps
    );
    println!("model: {}", model.display());
    println!("| variant | s/step | tokens/s | peak RSS MiB | vs baseline |");
    println!("|---|---|---|---|---|");
    let base = if args.no_baseline {
        None
    } else {
        let (bs, bm) =
            measure(TrainerConfig { plain_autograd: true, recompute: false, ..cfg.clone() }, &batch, args.steps)?;
        println!("| candle plain autograd (baseline) | {bs:.2} | {:.0} | {bm:.0} | 1.00× |", tokens / bs);
        Some((bs, bm))
    };
    for (name, recompute) in
        [("gpo: frozen-weight op, chunked head", false), ("gpo: + block recomputation (default)", true)]
    {
        let (s, m) = measure(TrainerConfig { recompute, ..cfg.clone() }, &batch, args.steps)?;
        let vs = base.map(|(bs, bm)| format!("{:.2}× speed, {:.2}× memory", bs / s, m / bm)).unwrap_or_default();
        println!("| {name} | {s:.2} | {:.0} | {m:.0} | {vs} |", tokens / s);
    }
    Ok(())
}
