//! The run configuration of `gpo train --config run.toml`. Every choice the paper leaves open is
//! a named option with a stated default.

use super::values::{Search, SearchConfig};
use crate::engine::{KvMode, StepConfig};
use crate::reward::VerifierConfig;
use crate::task::arith::ArithConfig;
use crate::train::{Aggregation, Objective, Recompute, Schedule, Target};
use crate::tree::CriticalMode;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a run does each iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// GPO-GRPO (Procedure I): root samples + continuations reset at the critical step.
    Gpo,
    /// GPO-PPO: as `gpo`, PPO loss with Monte-Carlo advantages (r − V(s_m); roots r − V(s_0)).
    GpoPpo,
    /// Plain GRPO on root samples.
    Grpo,
    /// Plain PPO on root samples (advantage r − group mean).
    Ppo,
    /// Baseline: resets at a step drawn uniformly (no value estimation), GRPO loss.
    RandomReset,
    /// GPO-DPO (Procedure II): preference pairs sharing the critical prefix.
    GpoDpo,
    /// GPO-KTO: continuations from the critical prefix, labelled by reward.
    GpoKto,
    /// GPO-SimPO.
    GpoSimpo,
    /// GPO-ORPO.
    GpoOrpo,
    /// Baseline DPO on whole trajectories (a correct and an incorrect sample of a prompt).
    Dpo,
    /// Baseline KTO on whole trajectories.
    Kto,
    /// Baseline SimPO on whole trajectories.
    Simpo,
    /// Baseline ORPO on whole trajectories.
    Orpo,
}

impl Mode {
    /// True for modes that estimate step values and reset at the critical step.
    pub fn uses_values(self) -> bool {
        matches!(self, Mode::Gpo | Mode::GpoPpo | Mode::GpoDpo | Mode::GpoKto | Mode::GpoSimpo | Mode::GpoOrpo)
    }

    /// True for the offline (preference / labelled) modes.
    pub fn offline(self) -> bool {
        matches!(
            self,
            Mode::GpoDpo
                | Mode::GpoKto
                | Mode::GpoSimpo
                | Mode::GpoOrpo
                | Mode::Dpo
                | Mode::Kto
                | Mode::Simpo
                | Mode::Orpo
        )
    }

    /// The training objective of the mode, with the run's loss settings.
    pub fn objective(self, t: &TrainSection) -> Objective {
        match self {
            Mode::Gpo | Mode::Grpo | Mode::RandomReset => Objective::Grpo { clip: t.clip, aggregation: t.aggregation },
            Mode::GpoPpo | Mode::Ppo => Objective::Ppo { clip: t.clip },
            Mode::GpoDpo | Mode::Dpo => Objective::Dpo { beta: t.beta },
            Mode::GpoKto | Mode::Kto => Objective::Kto { beta: t.beta, desirable_weight: 1.0, undesirable_weight: 1.0 },
            Mode::GpoSimpo | Mode::Simpo => Objective::Simpo { beta: t.simpo_beta, gamma: t.simpo_gamma },
            Mode::GpoOrpo | Mode::Orpo => Objective::Orpo { lambda: t.orpo_lambda },
        }
    }

    /// Name as written in configs and metrics.
    pub fn name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
    }
}

/// Where prompts come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskSection {
    /// JSONL task file for training (default: the built-in generator).
    pub train_file: Option<PathBuf>,
    /// JSONL task file for held-out evaluation (default: the built-in generator).
    pub eval_file: Option<PathBuf>,
    /// Generator knobs (used when no file is given).
    pub generator: ArithConfig,
    /// Generated training problems.
    pub train_count: usize,
    /// Generated held-out problems.
    pub eval_count: usize,
    /// Seed of the generated training problems.
    pub train_seed: u64,
    /// Seed of the generated held-out problems (different from training).
    pub eval_seed: u64,
    /// System message before every task prompt (training and evaluation); None = none.
    pub system: Option<String>,
}

impl Default for TaskSection {
    fn default() -> Self {
        TaskSection {
            train_file: None,
            eval_file: None,
            generator: ArithConfig::default(),
            train_count: 2000,
            eval_count: 100,
            train_seed: 7,
            eval_seed: 1_000_003,
            system: None,
        }
    }
}

/// Root sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutSection {
    /// Prompts per wave.
    pub prompts: usize,
    /// Root samples per prompt (the GRPO group size G).
    pub group_size: usize,
    /// Generated tokens per iteration (all rollouts counted); waves of `prompts` prompts are
    /// collected until it is spent. 0 = exactly one wave. Equal budgets make modes comparable.
    pub budget_tokens: u64,
    /// Sampling temperature.
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Tokens per sample.
    pub max_tokens: usize,
}

impl Default for RolloutSection {
    fn default() -> Self {
        RolloutSection { prompts: 4, group_size: 4, budget_tokens: 0, temperature: 1.0, top_p: 1.0, max_tokens: 192 }
    }
}

/// Which prompts get a critical-step analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gate {
    /// Only prompts whose root group is mixed (0 < p̂ < 1): elsewhere no step can matter to a
    /// group-relative learner, and the budget goes back to root samples. Default.
    #[default]
    Mixed,
    /// Every prompt (the paper).
    Any,
}

/// Monte-Carlo step values and the critical-step search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValueSection {
    /// Rollouts per probed prefix M (paper default 4).
    pub rollouts: usize,
    /// How the critical step is found: `bisect` (default; ⌈log₂ K⌉ probes) or `dense` (every
    /// prefix, the paper).
    pub search: Search,
    /// Critical-step rule: `auto` (default: drop for failed trajectories, gain for correct ones),
    /// `abs`, `drop`, `gain`.
    pub critical: CriticalMode,
    /// Which prompts are analysed: `mixed` root groups only (default) or `any`.
    pub gate: Gate,
    /// Root trajectories analysed per prompt (default 1; those with ≥ 2 steps).
    pub analyse: usize,
    /// Prefer failed trajectories for analysis. Default true.
    pub prefer_failed: bool,
    /// Dense search: stop sampling a prefix once its value is settled. Default false.
    pub adaptive: bool,
    /// Adaptive: samples before a prefix may be declared settled. Default 2.
    pub adaptive_min: usize,
    /// Adaptive: also settled when the ~95% Hoeffding half-width is below this (0 = only
    /// unanimous samples settle). Default 0.
    pub adaptive_tol: f64,
    /// The most of an iteration's token budget (`rollout.budget_tokens`) that probes and resets
    /// may spend, in (0, 1]. Once it is spent, the iteration's remaining waves sample roots
    /// only, so analyses never crowd out prompts. Default 0.35 (the probe limit; kept
    /// over 1 = no cap for that limit and breadth, not accuracy: see the README experiment); no
    /// effect without a token budget.
    pub share: f64,
}

impl Default for ValueSection {
    fn default() -> Self {
        ValueSection {
            rollouts: 4,
            search: Search::Bisect,
            critical: CriticalMode::Auto,
            gate: Gate::Mixed,
            analyse: 1,
            prefer_failed: true,
            adaptive: false,
            adaptive_min: 2,
            adaptive_tol: 0.0,
            share: 0.35,
        }
    }
}

impl ValueSection {
    /// The search settings.
    pub fn search_config(&self) -> SearchConfig {
        SearchConfig {
            search: self.search,
            rollouts: self.rollouts,
            adaptive: self.adaptive,
            adaptive_min: self.adaptive_min,
            adaptive_tol: self.adaptive_tol,
        }
    }
}

/// Resets at the critical prefix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResetSection {
    /// Continuations sampled from the reset state N (default: the group size).
    pub continuations: Option<usize>,
    /// Offline modes: most continuations drawn at a prefix while looking for one correct and one
    /// incorrect (the value rollouts there count). Default 16.
    pub max_tries: usize,
    /// Spend rollouts saved by the adaptive budget on extra continuations. Default true.
    pub reinvest_savings: bool,
}

impl Default for ResetSection {
    fn default() -> Self {
        ResetSection { continuations: None, max_tries: 16, reinvest_savings: true }
    }
}

/// The rollout engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSection {
    /// Parallel sequences.
    pub parallel: u32,
    /// KV cells per sequence.
    pub ctx_per_sequence: u32,
    /// KV layout.
    pub kv: KvMode,
    /// CPU threads (0 = all).
    pub threads: i32,
    /// GPU layers (-1 = all).
    pub gpu_layers: i32,
    /// Where tokens are sampled: "auto" (the graph on a GPU, else the host), "graph" or "host".
    pub sampling: crate::engine::SamplingBackend,
}

impl Default for EngineSection {
    fn default() -> Self {
        EngineSection {
            parallel: 16,
            ctx_per_sequence: 1024,
            kv: KvMode::PerSequence,
            threads: 0,
            gpu_layers: -1,
            sampling: crate::engine::SamplingBackend::Auto,
        }
    }
}

/// The learner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Learning rate.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// Schedule after warm-up.
    pub schedule: Schedule,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f32,
    /// Adapted projections.
    pub targets: Vec<Target>,
    /// PPO/GRPO clip ε.
    pub clip: f64,
    /// GRPO aggregation.
    pub aggregation: Aggregation,
    /// k3 KL coefficient to the base model (0 = off).
    pub kl_coef: f64,
    /// DPO/KTO β.
    pub beta: f64,
    /// SimPO β.
    pub simpo_beta: f64,
    /// SimPO γ.
    pub simpo_gamma: f64,
    /// ORPO λ.
    pub orpo_lambda: f64,
    /// Sequences per backward pass.
    pub micro_batch: usize,
    /// Optimiser steps per iteration's batch.
    pub epochs: usize,
    /// Train on every rollout of the tree: probe (value) rollouts join the group of the prefix
    /// they were sampled from, with the resets there. Default true; false is the paper's recipe
    /// (roots and resets only).
    pub train_on_value_rollouts: bool,
    /// Weight of TreeRL's root term: each online sample's advantage gains w·(r − V(root)), so
    /// samples from a prefix are also compared with the prompt as a whole. Default 0 (off).
    pub root_term: f64,
    /// Truncated importance sampling cap against the rollout log-probs (None = off).
    pub tis_cap: Option<f64>,
    /// Recompute activations block by block in the backward pass: true, false, or "auto"
    /// (default: only when a micro-batch's activations would exceed `activation_budget_mib`).
    pub recompute: Recompute,
    /// Activation memory `recompute = "auto"` allows per micro-batch, MiB (default 1536).
    pub activation_budget_mib: u64,
    /// Run a micro-batch's sequences through the trainer packed into one forward without padding
    /// (default true); false runs one forward per sequence.
    pub pack: bool,
    /// Trainer device: "cpu" (default), "cuda" or "cuda:N" (CUDA builds).
    pub device: String,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            lr: 2e-4,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            rank: 16,
            alpha: 32.0,
            targets: Target::ALL.to_vec(),
            clip: 0.2,
            aggregation: Aggregation::TokenMean,
            kl_coef: 0.0,
            beta: 0.1,
            simpo_beta: 2.0,
            simpo_gamma: 0.5,
            orpo_lambda: 0.1,
            micro_batch: 4,
            epochs: 1,
            train_on_value_rollouts: true,
            root_term: 0.0,
            tis_cap: None,
            recompute: Recompute::Auto,
            activation_budget_mib: crate::train::DEFAULT_ACTIVATION_BUDGET_MIB,
            pack: true,
            device: "cpu".into(),
        }
    }
}

/// Held-out evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Evaluate every this many iterations (and after the last); 0 = only before and after.
    pub every: usize,
    /// Tokens per answer.
    pub max_tokens: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection { every: 0, max_tokens: 192 }
    }
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// What to do each iteration.
    pub mode: Mode,
    /// Iterations.
    pub iterations: usize,
    /// Output directory (metrics, checkpoints, adapter, exports, plot).
    pub output: PathBuf,
    /// GGUF model (default: the cached SmolLM2-135M-Instruct Q4_1).
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// Master seed: prompts, sampling and adapter initialisation derive from it.
    #[serde(default)]
    pub seed: u64,
    /// Tasks.
    #[serde(default)]
    pub tasks: TaskSection,
    /// Root sampling.
    #[serde(default)]
    pub rollout: RolloutSection,
    /// Step segmentation.
    #[serde(default)]
    pub steps: StepConfig,
    /// Step values.
    #[serde(default)]
    pub value: ValueSection,
    /// Resets.
    #[serde(default)]
    pub reset: ResetSection,
    /// Reward.
    #[serde(default)]
    pub verifier: VerifierConfig,
    /// Rollout engine.
    #[serde(default)]
    pub engine: EngineSection,
    /// Learner.
    #[serde(default)]
    pub train: TrainSection,
    /// Evaluation.
    #[serde(default)]
    pub eval: EvalSection,
}

impl RunConfig {
    /// Reads and checks a TOML file; relative paths are taken relative to the file.
    pub fn load(path: &Path) -> Result<RunConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(path.to_path_buf()),
            _ => Error::io(path, e),
        })?;
        Self::from_toml(&text, path.parent().unwrap_or(Path::new("."))).map_err(|e| match e {
            Error::Data { reason, .. } => Error::Data { path: path.to_path_buf(), line: 0, reason },
            e => e,
        })
    }

    /// Parses and checks TOML text; relative paths (output, model, task files) are taken
    /// relative to `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<RunConfig> {
        let mut cfg: RunConfig = toml::from_str(text).map_err(|e| Error::Data {
            path: PathBuf::from("<config>"),
            line: 0,
            reason: e.to_string(),
        })?;
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut cfg.output);
        for p in [&mut cfg.model, &mut cfg.tasks.train_file, &mut cfg.tasks.eval_file].into_iter().flatten() {
            fix(p);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges; names the bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |w: &'static str, why: &str| Err(Error::invalid(w, why.to_string()));
        if self.iterations == 0 {
            return bad("iterations", "must be at least 1");
        }
        if self.rollout.prompts == 0 || self.rollout.group_size == 0 {
            return bad("rollout", "prompts and group_size must be at least 1");
        }
        if self.rollout.group_size < 2 && !self.mode.uses_values() {
            return bad("rollout.group_size", "GRPO and whole-trajectory pairs need at least 2 samples per prompt");
        }
        if self.mode.uses_values() && self.value.rollouts == 0 {
            return bad("value.rollouts", "must be at least 1");
        }
        if !(self.value.share > 0.0 && self.value.share <= 1.0) {
            return bad("value.share", "must be in (0, 1]");
        }
        if self.value.adaptive && self.value.search != Search::Dense {
            return bad("value.adaptive", "settles prefixes of the dense search: set value.search = \"dense\"");
        }
        if !(self.train.root_term.is_finite() && self.train.root_term >= 0.0) {
            return bad("train.root_term", "must be a finite weight ≥ 0");
        }
        if self.value.adaptive && (self.value.adaptive_min == 0 || self.value.adaptive_min > self.value.rollouts) {
            return bad("value.adaptive_min", "must be in 1..=value.rollouts");
        }
        if self.reset.continuations == Some(0) {
            return bad("reset.continuations", "must be at least 1");
        }
        if self.engine.ctx_per_sequence < 64 || self.engine.parallel == 0 {
            return bad("engine", "parallel ≥ 1 and ctx_per_sequence ≥ 64");
        }
        self.steps.validate()?;
        crate::reward::Verifier::new(&self.verifier)?;
        Ok(())
    }

    /// Reset continuations per critical prefix (N; default G).
    pub fn continuations(&self) -> usize {
        self.reset.continuations.unwrap_or(self.rollout.group_size)
    }
}
