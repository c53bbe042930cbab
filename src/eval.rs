//! Accuracy of a model (with its current adapter) on a task set: greedy and pass@k.

use crate::engine::{Canceller, Engine, GenerateRequest, Prompt, RequestHandle, SamplingParams};
use crate::reward::number;
use crate::task::Task;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};

/// How to evaluate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalConfig {
    /// Tokens per answer.
    pub max_tokens: usize,
    /// Samples per task for pass@k (0 = greedy only).
    pub k: usize,
    /// Temperature of the pass@k samples.
    pub temperature: f32,
    /// Seed of the pass@k samples.
    pub seed: u64,
    /// System message before each task (None = none).
    pub system: Option<String>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { max_tokens: 256, k: 0, temperature: 1.0, seed: 0, system: None }
    }
}

/// Result of one task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResult {
    /// The greedy answer text.
    pub greedy: String,
    /// Whether the greedy answer is correct.
    pub greedy_correct: bool,
    /// Correct samples among the k (pass@k).
    pub k_correct: usize,
}

/// Aggregate accuracy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    /// Tasks evaluated.
    pub tasks: usize,
    /// Greedy accuracy in [0, 1].
    pub greedy_accuracy: f64,
    /// k used for pass@k (0 = not measured).
    pub k: usize,
    /// Unbiased pass@k estimate with n = k samples (fraction of tasks with ≥ 1 correct sample).
    pub pass_at_k: f64,
    /// Mean fraction of correct samples (pass@1 estimated from the k samples).
    pub sample_accuracy: f64,
    /// Per-task results, in input order.
    pub results: Vec<TaskResult>,
}

/// Evaluates `tasks` on `engine`; all requests are submitted at once so they share batches.
/// `progress` is called with the number of finished tasks.
pub fn evaluate(engine: &Engine, tasks: &[Task], cfg: &EvalConfig, progress: impl FnMut(usize)) -> Result<EvalReport> {
    evaluate_or_cancel(engine, tasks, cfg, progress, &AtomicBool::new(false))
}

/// [`evaluate`], stopped within ~20 ms of `cancel` being set (then [`Error::Cancelled`]).
pub fn evaluate_or_cancel(
    engine: &Engine,
    tasks: &[Task],
    cfg: &EvalConfig,
    progress: impl FnMut(usize),
    cancel: &AtomicBool,
) -> Result<EvalReport> {
    let finished = &AtomicBool::new(false);
    let (tx, rx) = crossbeam_channel::bounded::<Vec<Canceller>>(1);
    std::thread::scope(|s| {
        s.spawn(move || {
            let Ok(cancellers) = rx.recv() else { return };
            while !finished.load(Ordering::Relaxed) {
                if cancel.load(Ordering::Relaxed) {
                    cancellers.iter().for_each(Canceller::cancel);
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        let r = run_eval(engine, tasks, cfg, progress, tx);
        finished.store(true, Ordering::Relaxed);
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        r
    })
}

fn run_eval(
    engine: &Engine,
    tasks: &[Task],
    cfg: &EvalConfig,
    mut progress: impl FnMut(usize),
    cancellers: crossbeam_channel::Sender<Vec<Canceller>>,
) -> Result<EvalReport> {
    let prompt = |t: &Task| Prompt::with_system(cfg.system.as_deref(), &t.prompt);
    // Each set is submitted as one unit, so batching (and the sampled tokens) is reproducible.
    let greedy = engine.submit_many(
        tasks.iter().map(|t| GenerateRequest::new(prompt(t), 1, SamplingParams::greedy(cfg.max_tokens))).collect(),
    )?;
    let sampled: Vec<Option<crate::engine::RequestHandle>> = if cfg.k > 0 {
        let reqs = tasks
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let sp = SamplingParams {
                    temperature: cfg.temperature,
                    max_tokens: cfg.max_tokens,
                    seed: cfg.seed.wrapping_add(i as u64 * 7919),
                    ..Default::default()
                };
                GenerateRequest::new(prompt(t), cfg.k, sp)
            })
            .collect();
        engine.submit_many(reqs)?.into_iter().map(Some).collect()
    } else {
        tasks.iter().map(|_| None).collect()
    };
    let _ = cancellers.send(greedy.iter().chain(sampled.iter().flatten()).map(RequestHandle::canceller).collect());
    let mut results = Vec::with_capacity(tasks.len());
    for (i, ((task, g), s)) in tasks.iter().zip(greedy).zip(sampled).enumerate() {
        let g = g.wait()?.remove(0);
        let greedy_correct = number::score(&g.text, &task.answer) > 0.0;
        let k_correct = match s {
            Some(h) => h.wait()?.iter().filter(|t| number::score(&t.text, &task.answer) > 0.0).count(),
            None => 0,
        };
        results.push(TaskResult { greedy: g.text, greedy_correct, k_correct });
        progress(i + 1);
    }
    let n = results.len().max(1) as f64;
    Ok(EvalReport {
        tasks: results.len(),
        greedy_accuracy: results.iter().filter(|r| r.greedy_correct).count() as f64 / n,
        k: cfg.k,
        pass_at_k: if cfg.k > 0 { results.iter().filter(|r| r.k_correct > 0).count() as f64 / n } else { 0.0 },
        sample_accuracy: if cfg.k > 0 {
            results.iter().map(|r| r.k_correct as f64 / cfg.k as f64).sum::<f64>() / n
        } else {
            0.0
        },
        results,
    })
}
