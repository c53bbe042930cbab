//! The GPO loop: {sample → values → critical step → reset → train → swap} per iteration, with a
//! metrics row, per-iteration exports and a checkpoint each time; `kill -9` at any moment and
//! the same command resumes from the last completed iteration.

use super::collect::{CollectStats, Collector};
use super::config::{Mode, RunConfig};
use crate::engine::{Engine, EngineConfig};
use crate::eval::{evaluate, evaluate_or_cancel, EvalConfig};
use crate::reward::Verifier;
use crate::task::{self, Task};
use crate::train::{checkpoint, Batch, LoraConfig, OptimConfig, Trainer, TrainerConfig};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsRow {
    /// Iteration (0-based).
    pub iteration: usize,
    /// Mode.
    pub mode: String,
    /// Mean reward of the root samples.
    pub reward_mean: f64,
    /// Fraction of root samples that were correct (reward ≥ 0.5).
    pub accuracy: f64,
    /// Rollouts and tokens by purpose, critical steps.
    pub collect: CollectStats,
    /// Critical-step histogram: count per step index.
    pub critical_histogram: Vec<usize>,
    /// Value-estimation (probe) tokens as a fraction of all generated tokens.
    pub value_cost: f64,
    /// Probes per analysed trajectory (None when nothing was analysed).
    #[serde(default)]
    pub probes_per_analysis: Option<f64>,
    /// Trained tokens over generated tokens outside groups without a signal.
    #[serde(default)]
    pub trained_fraction: f64,
    /// Sequences trained on.
    pub train_sequences: usize,
    /// Training loss (None when the step was skipped).
    pub loss: Option<f64>,
    /// k3 KL to the base model / KTO reference point.
    pub kl: Option<f64>,
    /// Rollout/learner log-prob gap (mean |Δ| per token).
    pub logprob_gap: Option<f64>,
    /// Largest per-token gap.
    pub logprob_gap_max: Option<f64>,
    /// Gradient norm.
    pub grad_norm: Option<f64>,
    /// Mean pair margin (offline modes).
    pub margin: Option<f64>,
    /// Why no update was applied this iteration.
    pub train_skipped: Option<String>,
    /// Adapter version serving the next iteration.
    pub adapter_version: u64,
    /// Held-out greedy accuracy after this iteration (when evaluated).
    pub heldout_accuracy: Option<f64>,
    /// Verifier calls that failed or timed out (scored 0).
    pub verifier_failures: u64,
    /// Generated tokens per second of sampling (timing; varies between runs).
    pub rollout_tokens_per_s: f64,
    /// Trained tokens per second (timing).
    pub train_tokens_per_s: f64,
    /// Wall time of the iteration (timing).
    pub seconds: f64,
}

impl MetricsRow {
    /// The row without its timing fields (what an interrupted and an uninterrupted run share).
    pub fn without_timing(&self) -> MetricsRow {
        let mut r = self.clone();
        r.rollout_tokens_per_s = 0.0;
        r.train_tokens_per_s = 0.0;
        r.seconds = 0.0;
        r.collect.rollout_seconds = 0.0;
        r
    }
}

/// Reads `metrics.jsonl` of a run directory.
pub fn read_metrics(dir: &Path) -> Result<Vec<MetricsRow>> {
    let p = dir.join("metrics.jsonl");
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&p, e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::Data { path: p.clone(), line: i + 1, reason: e.to_string() })
        })
        .collect()
}

/// Held-out accuracy before training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitialEval {
    /// Greedy accuracy of the base model.
    pub heldout_accuracy: f64,
    /// Held-out tasks.
    pub tasks: usize,
}

/// Progress reports of a run.
pub trait Progress {
    /// A phase started ("sampling", "values", "training", …).
    fn phase(&mut self, _iteration: usize, _what: &str) {}
    /// An iteration finished.
    fn iteration(&mut self, _row: &MetricsRow) {}
    /// Checked before each iteration (`at_boundary`) and between waves: true stops the run with
    /// `Error::Cancelled`. Stopping between waves abandons the unfinished iteration (nothing of it
    /// is committed; a later run redoes it exactly).
    fn should_stop(&mut self, _at_boundary: bool) -> bool {
        false
    }
    /// A flag that, once set, interrupts the initial held-out evaluation at once (it can take
    /// minutes; iterations are interrupted through `should_stop`).
    fn cancel_flag(&self) -> Option<Arc<AtomicBool>> {
        None
    }
}

/// No progress output.
pub struct Quiet;
impl Progress for Quiet {}

use crate::fsutil::write_atomic;

/// The adapter of a run's latest finished iteration (a llama.cpp GGUF LoRA adapter), in its
/// output directory.
pub fn adapter_path(output: &Path) -> PathBuf {
    output.join("adapter.gguf")
}

/// Directory layout of a run.
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    fn new(root: &Path) -> Result<RunDir> {
        for d in [root.to_path_buf(), root.join("checkpoints"), root.join("export")] {
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        Ok(RunDir { root: root.to_path_buf() })
    }
    fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    fn adapter(&self) -> PathBuf {
        adapter_path(&self.root)
    }
    fn export(&self, it: usize, kind: &str) -> PathBuf {
        self.root.join("export").join(format!("{it:05}.{kind}.jsonl"))
    }
}

fn tasks_from(file: &Option<PathBuf>, gen: &crate::task::arith::ArithConfig, n: usize, seed: u64) -> Result<Vec<Task>> {
    match file {
        Some(p) => task::load_jsonl(p),
        None => gen.generate(n, seed),
    }
}

/// Keeps only rows of iterations `< keep` and removes exports of later iterations (a crash
/// between writing them and the checkpoint leaves them behind).
fn roll_back(dir: &RunDir, keep: usize) -> Result<()> {
    let rows: Vec<MetricsRow> = read_metrics(&dir.root)?.into_iter().filter(|r| r.iteration < keep).collect();
    let mut text = String::new();
    for r in &rows {
        text.push_str(&serde_json::to_string(r).expect("row"));
        text.push('\n');
    }
    write_atomic(&dir.metrics(), text.as_bytes())?;
    let exp = dir.root.join("export");
    for e in std::fs::read_dir(&exp).map_err(|e| Error::io(&exp, e))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.split('.').next().and_then(|s| s.parse::<usize>().ok()).is_some_and(|it| it >= keep) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// Runs (or resumes) a GPO run. Returns the metrics of every iteration.
pub fn run(cfg: &RunConfig, progress: &mut dyn Progress) -> Result<Vec<MetricsRow>> {
    cfg.validate()?;
    let dir = RunDir::new(&cfg.output)?;
    let cfg_text = toml::to_string_pretty(cfg).map_err(|e| Error::invalid("config", e.to_string()))?;
    let saved_cfg = dir.root.join("config.toml");
    if let Ok(prev) = std::fs::read_to_string(&saved_cfg) {
        // Compared as read by this version: settings added since the run began take their
        // defaults, so upgrading gpo does not strand a run half-way.
        let same = prev == cfg_text
            || toml::from_str::<RunConfig>(&prev)
                .ok()
                .and_then(|p| toml::to_string_pretty(&p).ok())
                .is_some_and(|p| p == cfg_text);
        if !same && latest_iteration(&dir.checkpoints()).is_some() {
            return Err(Error::invalid(
                "output",
                format!(
                    "{} holds a run with another configuration; choose another output directory",
                    dir.root.display()
                ),
            ));
        }
    }
    write_atomic(&saved_cfg, cfg_text.as_bytes())?;
    let model = match &cfg.model {
        Some(p) => p.clone(),
        None => crate::models::default_model()?,
    };
    let verifier = Verifier::new(&cfg.verifier)?;
    let train_tasks =
        tasks_from(&cfg.tasks.train_file, &cfg.tasks.generator, cfg.tasks.train_count, cfg.tasks.train_seed)?;
    let eval_tasks = tasks_from(&cfg.tasks.eval_file, &cfg.tasks.generator, cfg.tasks.eval_count, cfg.tasks.eval_seed)?;
    let t = &cfg.train;
    let tcfg = TrainerConfig {
        model: model.clone(),
        lora: LoraConfig { rank: t.rank, alpha: t.alpha, targets: t.targets.clone(), seed: cfg.seed },
        optim: OptimConfig {
            lr: t.lr,
            warmup_steps: t.warmup_steps,
            schedule: t.schedule,
            total_steps: (cfg.iterations * t.epochs.max(1)) as u64,
            ..Default::default()
        },
        objective: cfg.mode.objective(t),
        kl_coef: t.kl_coef,
        tis_cap: t.tis_cap,
        temperature: cfg.rollout.temperature.max(1e-3) as f64,
        micro_batch: t.micro_batch,
        epochs: t.epochs.max(1),
        recompute: t.recompute,
        activation_budget_mib: t.activation_budget_mib,
        pack: t.pack,
        device: t.device.clone(),
        ..Default::default()
    };
    let mut trainer = Trainer::new(tcfg)?;
    let resume = latest_iteration(&dir.checkpoints());
    let manifest = match &resume {
        Some(ckpt) => Some(trainer.load_checkpoint(ckpt)?),
        None => None,
    };
    let (start, mut cursor, mut carry) = match &manifest {
        Some(m) => (
            m.extra["iteration"].as_u64().unwrap_or(0) as usize + 1,
            m.extra["task_cursor"].as_u64().unwrap_or(0) as usize,
            m.extra["budget_carry"].as_i64().unwrap_or(0),
        ),
        None => (0, 0, 0i64),
    };
    roll_back(&dir, start)?;
    let engine = Engine::start(EngineConfig {
        n_gpu_layers: cfg.engine.gpu_layers,
        n_threads: cfg.engine.threads,
        kv_mode: cfg.engine.kv,
        sampling: cfg.engine.sampling,
        ..EngineConfig::slots(model.clone(), cfg.engine.parallel, cfg.engine.ctx_per_sequence)
    })?;
    if let Some(ckpt) = &resume {
        if trainer.steps_done() > 0 {
            engine.set_adapter(ckpt.join("adapter.gguf"), 1.0)?;
        }
    }
    let eval_cfg =
        EvalConfig { max_tokens: cfg.eval.max_tokens, system: cfg.tasks.system.clone(), ..Default::default() };
    let initial = dir.root.join("eval-initial.json");
    if !initial.exists() {
        progress.phase(0, "held-out evaluation (base model)");
        let cancel = progress.cancel_flag().unwrap_or_default();
        let r = evaluate_or_cancel(&engine, &eval_tasks, &eval_cfg, |_| {}, &cancel)?;
        let e = InitialEval { heldout_accuracy: r.greedy_accuracy, tasks: r.tasks };
        write_atomic(&initial, serde_json::to_string_pretty(&e).expect("eval").as_bytes())?;
    }

    for it in start..cfg.iterations {
        if progress.should_stop(true) {
            return Err(Error::Cancelled);
        }
        let t_iter = Instant::now();
        // Each iteration starts from an empty KV cache: a resumed run then sees exactly the state
        // an uninterrupted one did (earlier prefixes are of other prompts, rarely worth keeping).
        engine.clear_cache()?;
        progress.phase(it, "sampling");
        // The budget of this iteration: the configured one plus the previous iterations' under- or
        // overspend, so cumulative budgets of different modes match to within one probe or wave.
        let target = cfg.rollout.budget_tokens as i64 + carry;
        let budget = (cfg.rollout.budget_tokens > 0).then_some(target.max(0) as u64);
        let collector = Collector { engine: &engine, verifier: &verifier, cfg, iteration: it, budget };
        let mut next_tasks = || {
            let tasks: Vec<Task> =
                (0..cfg.rollout.prompts).map(|k| train_tasks[(cursor + k) % train_tasks.len()].clone()).collect();
            cursor += tasks.len();
            tasks
        };
        let mut data = collector.iteration(&mut next_tasks, &mut || progress.should_stop(false))?;
        if budget.is_some() {
            carry = target - data.stats.total_tokens() as i64;
        }
        progress.phase(it, "training");
        let batch = match cfg.mode {
            m if m.offline() && matches!(m, Mode::Kto | Mode::GpoKto) => {
                Batch::Labeled(std::mem::take(&mut data.labeled))
            }
            m if m.offline() => Batch::Pairs(std::mem::take(&mut data.pairs)),
            _ => Batch::Completions(std::mem::take(&mut data.completions)),
        };
        let mut row = MetricsRow { iteration: it, mode: cfg.mode.name(), ..Default::default() };
        let t_train = Instant::now();
        if batch.is_empty() {
            row.train_skipped =
                Some("no learning signal (every group's rewards were equal, or no pair was found)".into());
        } else {
            // `[train] epochs` optimiser steps on the batch; the row reports the last one.
            let reports = trainer.fit_batch(&batch)?;
            let r = reports.last().expect("at least one epoch").clone();
            row.loss = r.skipped.is_none().then_some(r.loss);
            row.train_skipped = r.skipped;
            row.kl = r.kl;
            row.logprob_gap = r.logprob_gap_mean;
            row.logprob_gap_max = r.logprob_gap_max;
            row.grad_norm = Some(r.grad_norm);
            row.margin = r.margin;
            row.train_sequences = batch.len();
            row.train_tokens_per_s = batch.completion_tokens() as f64 * trainer.config().epochs as f64
                / t_train.elapsed().as_secs_f64().max(1e-9);
            trainer.export_adapter(&dir.adapter())?;
            row.adapter_version = engine.set_adapter(dir.adapter(), 1.0)?;
        }
        if row.adapter_version == 0 {
            row.adapter_version = engine.stats()?.adapter_version;
        }
        let last = it + 1 == cfg.iterations;
        if last || (cfg.eval.every > 0 && (it + 1) % cfg.eval.every == 0) {
            progress.phase(it, "held-out evaluation");
            row.heldout_accuracy = Some(evaluate(&engine, &eval_tasks, &eval_cfg, |_| {})?.greedy_accuracy);
        }
        let st = &data.stats;
        row.reward_mean = st.root_reward_sum / st.root_rollouts.max(1) as f64;
        row.accuracy = st.root_correct as f64 / st.root_rollouts.max(1) as f64;
        row.probes_per_analysis = (st.analysed > 0).then(|| st.probes as f64 / st.analysed as f64);
        let with_signal = st.total_tokens() - st.zero_signal_tokens;
        row.trained_fraction = st.trained_tokens() as f64 / with_signal.max(1) as f64;
        let max_step = st.critical_steps.iter().copied().max().map_or(0, |m| m + 1);
        row.critical_histogram = (0..max_step).map(|i| st.critical_steps.iter().filter(|&&s| s == i).count()).collect();
        row.value_cost = st.value_tokens as f64 / st.total_tokens().max(1) as f64;
        row.verifier_failures =
            verifier.failures.timeouts.load(Ordering::Relaxed) + verifier.failures.errors.load(Ordering::Relaxed);
        row.rollout_tokens_per_s = st.total_tokens() as f64 / st.rollout_seconds.max(1e-9);
        row.collect = data.stats.clone();
        row.seconds = t_iter.elapsed().as_secs_f64();
        // Exports and metrics first, the checkpoint (manifest last) commits the iteration.
        for (kind, rows) in [("pairs", &data.export_pairs), ("kto", &data.export_kto), ("resets", &data.export_resets)]
        {
            if !rows.is_empty() {
                let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
                write_atomic(&dir.export(it, kind), text.as_bytes())?;
            }
        }
        {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.metrics())
                .map_err(|e| Error::io(dir.metrics(), e))?;
            writeln!(f, "{}", serde_json::to_string(&row).expect("row")).map_err(|e| Error::io(dir.metrics(), e))?;
            f.sync_all().map_err(|e| Error::io(dir.metrics(), e))?;
        }
        let iter_dir = dir.checkpoints().join(format!("iter-{it:05}"));
        trainer.save_checkpoint(
            &iter_dir,
            serde_json::json!({ "iteration": it, "task_cursor": cursor, "budget_carry": carry }),
        )?;
        // Older checkpoints are no longer needed once this one is complete.
        prune_checkpoints(&dir.checkpoints(), it);
        progress.iteration(&row);
    }
    read_metrics(&dir.root)
}

fn iterations_saved(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let it = e.file_name().to_string_lossy().strip_prefix("iter-")?.parse::<usize>().ok()?;
            Some((it, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// The newest complete checkpoint of a run (checkpoints/iter-N/step-M with its manifest).
fn latest_iteration(dir: &Path) -> Option<PathBuf> {
    iterations_saved(dir).into_iter().rev().find_map(|(_, p)| checkpoint::latest(&p))
}

fn prune_checkpoints(dir: &Path, keep: usize) {
    for (it, p) in iterations_saved(dir) {
        if it < keep {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}
