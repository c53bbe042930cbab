//! The LoRA trainer on candle: gradient-safe forward over the same GGUF weights the rollout
//! engine uses, PPO/GRPO and DPO-family losses, AdamW, checkpoints, and exact export of the
//! adapter to llama.cpp's GGUF LoRA format.
//!
//! ```no_run
//! use gpo::train::{Trainer, TrainerConfig, Batch, Completion};
//! let mut t = Trainer::new(TrainerConfig::new("model.gguf"))?;
//! let batch = Batch::Completions(vec![Completion::new(vec![1, 2, 3], vec![4, 5], 1.0)]);
//! let report = t.step(&batch)?;
//! t.export_adapter("adapter.gguf".as_ref())?;
//! # Ok::<(), gpo::Error>(())
//! ```

pub mod arch;
pub mod checkpoint;
pub mod data;
pub mod head;
pub mod jsonl;
pub mod lora;
pub mod loss;
pub mod model;
pub mod ops;
pub mod optim;
pub mod profile;

pub use data::{Batch, Completion, Labeled, Pair};
pub use lora::{Lora, LoraConfig, Target};
pub use loss::{Aggregation, Objective};
pub use optim::{OptimConfig, Schedule};

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use lora::cerr;
use model::Forward;
pub use ops::{Clock, GradSink};
use optim::AdamW;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
pub use weights::Weights;

pub mod weights;

/// Trainer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainerConfig {
    /// GGUF model (the same file the rollout engine loads).
    pub model: PathBuf,
    /// Adapter shape.
    pub lora: LoraConfig,
    /// Optimiser.
    pub optim: OptimConfig,
    /// Loss.
    pub objective: Objective,
    /// Coefficient of the k3 KL penalty to the base model for PPO/GRPO (0 = off).
    pub kl_coef: f64,
    /// Truncated importance sampling against the behaviour log-probs: weight
    /// `min(π_old/μ, cap)` per token (None = off).
    pub tis_cap: Option<f64>,
    /// Sampling temperature of the behaviour policy (log-probs are of logits / T).
    pub temperature: f64,
    /// Sequences per backward pass (gradient accumulation over micro-batches); 0 = all.
    pub micro_batch: usize,
    /// Positions per chunk of the output head.
    pub head_chunk: usize,
    /// Run a micro-batch's sequences through the model packed into one matrix of rows, without
    /// padding (one matmul per projection for all of them; attention stays per sequence). Off:
    /// one forward per sequence. Same losses and gradients up to matmul summation order.
    pub pack: bool,
    /// Seed of the trainer's RNG (adapter initialisation).
    pub seed: u64,
    /// Compute in f64 (gradient checks) instead of f32.
    pub f64: bool,
    /// "cpu" (default) or "cuda" / "cuda:N" (CUDA builds; weights in bf16, adapter master in f32).
    pub device: String,
    /// Where π_old of the PPO ratio comes from.
    pub pi_old: PiOld,
    /// Fixed KTO reference point (None = the clamped batch estimate, as TRL does).
    pub kto_z_ref: Option<f64>,
    /// Whether to recompute activations block by block in the backward pass (memory bounded by
    /// one block, for long reasoning traces) instead of keeping them (keeping is ~1.3× faster). The output
    /// head is recomputed chunk by chunk either way.
    pub recompute: Recompute,
    /// [`Recompute::Auto`] keeps activations while a micro-batch's estimate stays within this
    /// many MiB.
    pub activation_budget_mib: u64,
    /// Optimiser steps per batch (PPO epochs) in [`Trainer::fit_batch`]. With 1, π_old is the
    /// current policy and comes out of the gradient pass itself; with more, it is computed once
    /// before the first epoch.
    pub epochs: usize,
    /// Use candle's plain autograd (frozen-weight gradients computed, no activation
    /// recomputation): the in-process baseline of `gpo bench train`, not for real runs.
    pub plain_autograd: bool,
    /// Emulate llama.cpp's CPU GELU (f16 lookup table, ~1e-3 relative error) in the forward
    /// value, for exact parity checks of GELU models against a CPU llama.cpp. Off for training:
    /// GPU backends compute the exact GELU.
    pub ggml_cpu_gelu: bool,
}

/// Default of [`TrainerConfig::activation_budget_mib`]: room for 4 × ~238-token or 8 × ~128-token
/// sequences of a 135M model; beyond it, recomputation bounds memory (a 4 × 256 step of that
/// model then peaks at ~1.3 GiB instead of ~2.8 GiB, a third of PyTorch + PEFT's).
pub const DEFAULT_ACTIVATION_BUDGET_MIB: u64 = 1536;

/// When the trainer recomputes activations in the backward pass instead of keeping them.
/// In TOML: `true` (always), `false` (never) or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recompute {
    /// Keep activations when a micro-batch's estimate ([`model::keep_activation_bytes`]) fits
    /// the activation budget; recompute otherwise. The default.
    #[default]
    Auto,
    /// Always recompute (memory bounded by one block).
    Always,
    /// Never recompute (fastest; memory grows with tokens and with the square of sequence length).
    Never,
}

impl Serialize for Recompute {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Recompute::Auto => s.serialize_str("auto"),
            Recompute::Always => s.serialize_bool(true),
            Recompute::Never => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Recompute {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(Recompute::Always),
            Raw::Bool(false) => Ok(Recompute::Never),
            Raw::Word(w) if w == "auto" => Ok(Recompute::Auto),
            Raw::Word(w) => {
                Err(serde::de::Error::custom(format!("recompute = {w:?}: expected true, false or \"auto\"")))
            }
        }
    }
}

/// Source of π_old in the PPO/GRPO ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PiOld {
    /// Recomputed by the trainer before each update (default; immune to rollout/learner
    /// numerical mismatch, as large RL stacks do).
    Trainer,
    /// The behaviour log-probs recorded by the rollout engine.
    Behaviour,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            model: PathBuf::new(),
            lora: LoraConfig::default(),
            optim: OptimConfig::default(),
            objective: Objective::Grpo { clip: 0.2, aggregation: Aggregation::TokenMean },
            kl_coef: 0.0,
            tis_cap: None,
            temperature: 1.0,
            micro_batch: 4,
            head_chunk: 256,
            pack: true,
            seed: 0,
            f64: false,
            device: "cpu".into(),
            pi_old: PiOld::Trainer,
            kto_z_ref: None,
            recompute: Recompute::Auto,
            activation_budget_mib: DEFAULT_ACTIVATION_BUDGET_MIB,
            epochs: 1,
            plain_autograd: false,
            ggml_cpu_gelu: false,
        }
    }
}

impl TrainerConfig {
    /// Defaults with the given model.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        TrainerConfig { model: model.into(), ..Default::default() }
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepReport {
    /// Steps applied after this one (1-based); unchanged when skipped.
    pub step: u64,
    /// Objective name.
    pub objective: String,
    /// Loss value.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Completion tokens in the batch.
    pub tokens: usize,
    /// Sequences in the batch.
    pub sequences: usize,
    /// Wall time of the step.
    pub seconds: f64,
    /// Completion tokens per second (forward + backward + update).
    pub tokens_per_s: f64,
    /// Mean |log π_old − log μ| per token between trainer and rollout log-probs.
    pub logprob_gap_mean: Option<f64>,
    /// Largest per-token gap.
    pub logprob_gap_max: Option<f64>,
    /// Mean k3 KL to the base model (when computed).
    pub kl: Option<f64>,
    /// Fraction of tokens whose ratio was clipped (PPO/GRPO).
    pub clip_fraction: Option<f64>,
    /// Mean reward of the batch (completions).
    pub reward_mean: Option<f64>,
    /// Mean implicit-reward margin of pairs (chosen − rejected, relative to the reference for DPO).
    pub margin: Option<f64>,
    /// Where the step's time went.
    pub phases: StepPhases,
    /// Why the step was not applied (non-finite input or gradient).
    pub skipped: Option<String>,
}

/// Wall time of a step's phases, in seconds. `backward` includes `recompute` (the checkpointed
/// blocks and output-head chunks run again with gradients); the rest of `seconds` is loss
/// arithmetic and bookkeeping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepPhases {
    /// Forward passes (with and without gradients: policy, reference, π_old).
    pub forward: f64,
    /// Backward passes.
    pub backward: f64,
    /// Of `backward`: recomputation of checkpointed blocks and head chunks.
    pub recompute: f64,
    /// Whether this step recomputed its blocks' activations (see [`Recompute`]).
    pub recomputed: bool,
    /// Gradient clipping and the AdamW update.
    pub optimizer: f64,
}

/// The trainer: frozen base weights, the LoRA adapter, AdamW.
pub struct Trainer {
    cfg: TrainerConfig,
    weights: Weights,
    lora: Lora,
    optim: AdamW,
    sink: GradSink,
    /// Forward and backward wall time of the current step.
    clocks: (Clock, Clock),
    /// The current step's recomputation decision.
    recompute_now: bool,
    step: u64,
    fingerprint: String,
    /// π_old fixed for the epochs of one step (None: take it from the gradient pass).
    frozen_old: Option<Vec<Vec<f64>>>,
}

fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64).and_then(|t| t.to_vec1::<f64>()).map_err(cerr)
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64).and_then(|t| t.to_scalar::<f64>()).map_err(cerr)
}

impl Trainer {
    /// Loads the model and creates a fresh adapter and optimiser.
    pub fn new(cfg: TrainerConfig) -> Result<Trainer> {
        if !(cfg.temperature > 0.0 && cfg.temperature.is_finite()) {
            return Err(Error::invalid("temperature", format!("{} must be positive", cfg.temperature)));
        }
        if let Some(c) = cfg.tis_cap {
            if c.is_nan() || c <= 0.0 {
                return Err(Error::invalid("tis_cap", format!("{c} must be positive")));
            }
        }
        let device = match cfg.device.as_str() {
            "cpu" => Device::Cpu,
            d if d.starts_with("cuda") => {
                let idx = match d.strip_prefix("cuda").unwrap_or("").strip_prefix(':') {
                    Some(n) => n
                        .parse::<usize>()
                        .map_err(|_| Error::invalid("device", format!("{d:?}: use cuda or cuda:N")))?,
                    None => 0,
                };
                Device::new_cuda(idx)
                    .map_err(|e| Error::invalid("device", format!("{d}: {e} (CUDA needs a `--features cuda` build)")))?
            }
            other => return Err(Error::invalid("device", format!("{other:?}: use cpu, cuda or cuda:N"))),
        };
        let dtype = if cfg.f64 {
            DType::F64
        } else if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        let mut weights = Weights::load(&cfg.model, dtype, &device)?;
        weights.cfg.ggml_cpu_gelu = cfg.ggml_cpu_gelu;
        let fingerprint = checkpoint::fingerprint(&cfg.model)?;
        let lora = Lora::new(&weights, &LoraConfig { seed: cfg.lora.seed ^ cfg.seed, ..cfg.lora.clone() })?;
        let optim = AdamW::new(cfg.optim.clone(), &lora.vars())?;
        Ok(Trainer {
            cfg,
            weights,
            lora,
            optim,
            sink: GradSink::default(),
            clocks: Default::default(),
            recompute_now: true,
            step: 0,
            fingerprint,
            frozen_old: None,
        })
    }

    /// Settings.
    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }

    /// The adapter.
    pub fn lora(&self) -> &Lora {
        &self.lora
    }

    /// The frozen weights.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Steps applied.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    fn forward(&self, adapter: bool) -> Forward<'_> {
        Forward {
            weights: &self.weights,
            lora: adapter.then_some(&self.lora),
            sink: &self.sink,
            head_chunk: self.cfg.head_chunk,
            plain: self.cfg.plain_autograd,
            recompute: self.recompute_now,
        }
    }

    /// Per-token log-probs of `completion` after `prompt` (no gradient). `adapter = false` gives the
    /// base model (the reference policy).
    pub fn logprobs(&self, prompt: &[u32], completion: &[u32], adapter: bool) -> Result<Vec<f64>> {
        let lp = self.lp_many([(prompt, completion)], adapter, false)?;
        to_vec(&lp[0])
    }

    /// Log-probs of each `(prompt, completion)`, one tensor per sequence: one packed forward for
    /// all of them (or one forward each, with `pack = false` or the plain baseline). `adapter =
    /// false` is the reference policy; `grad` records the graph for the backward pass. Callers
    /// pack the same sequences together for the reference and for the policy, so that a fresh
    /// adapter (B = 0) gives bit-identical values on both sides.
    fn lp_many<'a>(
        &self,
        seqs: impl IntoIterator<Item = (&'a [u32], &'a [u32])>,
        adapter: bool,
        grad: bool,
    ) -> Result<Vec<Tensor>> {
        let joined: Vec<(Vec<u32>, usize)> =
            seqs.into_iter().map(|(p, c)| (p.iter().chain(c).copied().collect(), p.len())).collect();
        let refs: Vec<(&[u32], usize)> = joined.iter().map(|(s, start)| (s.as_slice(), *start)).collect();
        let fwd = self.forward(adapter);
        let temperature = self.cfg.temperature;
        self.clocks.0.time(|| {
            if self.cfg.pack && !self.cfg.plain_autograd {
                fwd.logprobs_packed(&refs, temperature, grad)
            } else {
                refs.iter().map(|&(s, start)| fwd.logprobs(s, start, temperature, grad)).collect()
            }
        })
    }

    /// [`Trainer::lp_many`] with gradients to the adapter.
    fn lp_grad<'a>(&self, seqs: impl IntoIterator<Item = (&'a [u32], &'a [u32])>) -> Result<Vec<Tensor>> {
        self.lp_many(seqs, true, true)
    }

    /// Log-prob values without gradients, packed micro-batch by micro-batch exactly as the
    /// gradient pass packs `items`; `seqs` maps one item to its sequences.
    fn lp_values<'a, T>(
        &self,
        items: &'a [T],
        seqs: impl Fn(&'a T) -> Vec<(&'a [u32], &'a [u32])>,
        adapter: bool,
    ) -> Result<Vec<Vec<f64>>> {
        let mut out = Vec::new();
        for r in self.micro_batches(items.len()) {
            for lp in self.lp_many(items[r].iter().flat_map(&seqs), adapter, false)? {
                out.push(to_vec(&lp)?);
            }
        }
        Ok(out)
    }

    /// Writes the adapter as a llama.cpp GGUF LoRA file.
    pub fn export_adapter(&self, path: &Path) -> Result<()> {
        self.lora.export(path)
    }

    /// Trains on `batch` for [`TrainerConfig::epochs`] optimiser steps and returns each step's
    /// report. With more than one epoch and `pi_old = "trainer"`, π_old of the PPO/GRPO ratio
    /// is the policy before the first epoch, computed once (packed as the gradient pass packs),
    /// so later epochs are clipped against where the batch was sampled from; with one epoch
    /// this is exactly [`Trainer::step`].
    pub fn fit_batch(&mut self, batch: &Batch) -> Result<Vec<StepReport>> {
        let epochs = self.cfg.epochs.max(1);
        if epochs > 1 && self.cfg.pi_old == PiOld::Trainer {
            if let Batch::Completions(items) = batch {
                batch.validate(&self.cfg.objective, self.weights.cfg.n_vocab)?;
                self.frozen_old = Some(self.lp_values(items, |c| vec![(&c.prompt[..], &c.completion[..])], true)?);
            }
        }
        let mut reports = Vec::with_capacity(epochs);
        let mut result = Ok(());
        for _ in 0..epochs {
            match self.step(batch) {
                Ok(r) => reports.push(r),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.frozen_old = None;
        result.map(|()| reports)
    }

    /// One optimiser step on `batch` (gradient accumulation over micro-batches inside).
    pub fn step(&mut self, batch: &Batch) -> Result<StepReport> {
        batch.validate(&self.cfg.objective, self.weights.cfg.n_vocab)?;
        let t0 = Instant::now();
        let mut report = StepReport {
            step: self.step,
            objective: self.cfg.objective.name().into(),
            tokens: batch.completion_tokens(),
            sequences: batch.len(),
            ..Default::default()
        };
        if let Some(why) = batch.non_finite() {
            report.skipped = Some(why);
            return Ok(report);
        }
        self.sink.clear();
        // Forward passes outside a step (log-probs for reports) do not count towards it.
        let _ = (self.clocks.0.take(), self.clocks.1.take(), self.sink.recompute.take());
        self.recompute_now = self.needs_recompute(batch);
        let loss = match batch {
            Batch::Completions(items) => self.policy_loss(items, &mut report)?,
            Batch::Pairs(items) => self.pair_loss(items, &mut report)?,
            Batch::Labeled(items) => self.kto_loss(items, &mut report)?,
        };
        report.loss = loss;
        if report.skipped.is_some() {
            return Ok(report);
        }
        let vars = self.lora.vars();
        let grads = coverage(&self.lora, &self.sink)?;
        if !loss.is_finite() || grads.iter().any(|g| !all_finite(g)) {
            report.skipped =
                Some(format!("non-finite {} — step not applied", if loss.is_finite() { "gradient" } else { "loss" }));
            return Ok(report);
        }
        let t_opt = Instant::now();
        let (norm, lr) = self.optim.step(&vars, &grads)?;
        report.phases = StepPhases {
            forward: self.clocks.0.take(),
            backward: self.clocks.1.take(),
            recompute: self.sink.recompute.take(),
            optimizer: t_opt.elapsed().as_secs_f64(),
            recomputed: self.recompute_now,
        };
        self.step += 1;
        report.step = self.step;
        report.grad_norm = norm;
        report.lr = lr;
        report.seconds = t0.elapsed().as_secs_f64();
        report.tokens_per_s = report.tokens as f64 / report.seconds.max(1e-9);
        Ok(report)
    }

    /// Whether `batch` is trained with recomputation: by the setting, or (auto) when the
    /// activations of its largest micro-batch would exceed the budget.
    pub fn needs_recompute(&self, batch: &Batch) -> bool {
        match self.cfg.recompute {
            Recompute::Always => true,
            Recompute::Never => false,
            Recompute::Auto => {
                let lens = batch.sequence_lengths();
                let bytes = self.weights.dtype.size_in_bytes();
                let largest = self
                    .micro_batches(lens.len())
                    .into_iter()
                    .map(|r| model::keep_activation_bytes(&self.weights.cfg, lens[r].iter().flatten().copied(), bytes))
                    .max()
                    .unwrap_or(0);
                largest > self.cfg.activation_budget_mib << 20
            }
        }
    }

    fn micro_batches(&self, n: usize) -> Vec<std::ops::Range<usize>> {
        let m = if self.cfg.micro_batch == 0 { n.max(1) } else { self.cfg.micro_batch };
        (0..n).step_by(m).map(|s| s..(s + m).min(n)).collect()
    }

    fn policy_loss(&mut self, items: &[Completion], report: &mut StepReport) -> Result<f64> {
        let obj = self.cfg.objective.clone();
        let rewards: Vec<f64> = items.iter().map(|c| c.reward).collect();
        report.reward_mean = Some(rewards.iter().sum::<f64>() / rewards.len() as f64);
        let total_tokens: usize = items.iter().map(|c| c.completion.len()).sum();
        if let Objective::Nll = obj {
            let mut loss = 0.0;
            for r in self.micro_batches(items.len()) {
                let mut parts = Vec::new();
                for lp in self.lp_grad(items[r].iter().map(|c| (&c.prompt[..], &c.completion[..])))? {
                    parts.push(loss::nll_sequence(&lp, total_tokens as f64).map_err(cerr)?);
                }
                loss += self.backward(parts)?;
            }
            return Ok(loss);
        }
        let (clip, aggregation) = match obj {
            Objective::Ppo { clip } => (clip, Aggregation::TokenMean),
            Objective::Grpo { clip, aggregation } => (clip, aggregation),
            _ => unreachable!("validated"),
        };
        let groups: Vec<u64> = items.iter().map(|c| c.group).collect();
        // Explicit advantages (the GPO loop computes them per tree node) win over the group's.
        let advantages: Vec<f64> = match obj {
            Objective::Grpo { .. } => loss::group_advantages(&rewards, &groups, 1e-4)
                .into_iter()
                .zip(items)
                .map(|(a, c)| c.advantage.unwrap_or(a))
                .collect(),
            _ => items
                .iter()
                .map(|c| {
                    c.advantage.unwrap_or_else(|| {
                        // Without a value estimate: reward minus the mean reward of its group.
                        let g: Vec<f64> = items.iter().filter(|o| o.group == c.group).map(|o| o.reward).collect();
                        c.reward - g.iter().sum::<f64>() / g.len() as f64
                    })
                })
                .collect(),
        };
        // π_old: the rollout's log-probs, the policy before several epochs, or (one epoch) the
        // current policy itself, read off the gradient pass below.
        let fixed_old: Option<Vec<Vec<f64>>> = match self.cfg.pi_old {
            PiOld::Behaviour => items
                .iter()
                .map(|c| c.behaviour_logprobs.as_ref().map(|mu| mu.iter().map(|&x| x as f64).collect()))
                .collect(),
            PiOld::Trainer => self.frozen_old.clone(),
        };
        let reference: Option<Vec<Vec<f64>>> = if self.cfg.kl_coef > 0.0 {
            Some(self.lp_values(items, |c| vec![(&c.prompt[..], &c.completion[..])], false)?)
        } else {
            None
        };
        let dev = self.weights.device.clone();
        let dt = self.weights.dtype;
        let vec_t = |v: &[f64]| Tensor::from_slice(v, v.len(), &dev).and_then(|t| t.to_dtype(dt)).map_err(cerr);
        let mut loss = 0.0;
        let (mut clipped, mut active, mut kl_sum) = (0usize, 0usize, 0.0);
        let mut olds: Vec<Vec<f64>> = Vec::with_capacity(items.len());
        for r in self.micro_batches(items.len()) {
            let mut parts = Vec::new();
            let lps = self.lp_grad(items[r.clone()].iter().map(|c| (&c.prompt[..], &c.completion[..])))?;
            for (i, lp) in r.zip(lps) {
                let c = &items[i];
                let norm = match aggregation {
                    Aggregation::TokenMean => total_tokens as f64,
                    Aggregation::SequenceMean => (c.completion.len() * items.len()) as f64,
                };
                let lp_now = to_vec(&lp)?;
                let (old_vals, old_t) = match &fixed_old {
                    Some(o) => (o[i].clone(), vec_t(&o[i])?),
                    None => (lp_now.clone(), lp.detach()),
                };
                let weights = match (self.cfg.tis_cap, &c.behaviour_logprobs) {
                    (Some(cap), Some(mu)) => Some(vec_t(
                        &old_vals.iter().zip(mu).map(|(o, m)| (o - *m as f64).exp().min(cap)).collect::<Vec<_>>(),
                    )?),
                    _ => None,
                };
                clipped += lp_now.iter().zip(&old_vals).filter(|(l, o)| ((*l - *o).exp() - 1.0).abs() > clip).count();
                // Tokens whose loss term has a gradient: the ratio is inside the clip range on
                // the side its advantage pushes towards, or a KL term pulls on it.
                let adv = advantages[i];
                active += lp_now
                    .iter()
                    .zip(&old_vals)
                    .filter(|(l, o)| {
                        let r = (*l - *o).exp();
                        self.cfg.kl_coef > 0.0 || (adv > 0.0 && r < 1.0 + clip) || (adv < 0.0 && r > 1.0 - clip)
                    })
                    .count();
                let refs = reference.as_ref().map(|r| vec_t(&r[i])).transpose()?;
                if let Some(rf) = reference.as_ref() {
                    kl_sum += lp_now.iter().zip(&rf[i]).map(|(l, r)| (r - l).exp() - (r - l) - 1.0).sum::<f64>();
                }
                parts.push(
                    loss::policy_sequence(
                        &lp,
                        &old_t,
                        advantages[i],
                        clip,
                        weights.as_ref(),
                        refs.as_ref().map(|r| (r, self.cfg.kl_coef)),
                        norm,
                    )
                    .map_err(cerr)?,
                );
                olds.push(old_vals);
            }
            loss += self.backward(parts)?;
        }
        self.gap(items, &olds, report);
        report.clip_fraction = Some(clipped as f64 / total_tokens as f64);
        if active == 0 {
            // A legitimately zero gradient (later PPO epochs, all-zero advantages): nothing to
            // apply, and nothing for the coverage check to judge.
            report.skipped = Some(
                "no token carries a gradient (every ratio clipped on its advantage's side, or zero advantages) \
                 — step not applied"
                    .into(),
            );
        }
        report.kl = reference.map(|_| kl_sum / total_tokens as f64);
        Ok(loss)
    }

    /// Rollout/learner log-prob gap against the behaviour log-probs, when given.
    fn gap(&self, items: &[Completion], old: &[Vec<f64>], report: &mut StepReport) {
        let (mut sum, mut max, mut n) = (0.0f64, 0.0f64, 0usize);
        for (c, o) in items.iter().zip(old) {
            if let Some(mu) = &c.behaviour_logprobs {
                for (a, b) in o.iter().zip(mu) {
                    let d = (a - *b as f64).abs();
                    sum += d;
                    max = max.max(d);
                    n += 1;
                }
            }
        }
        if n > 0 {
            report.logprob_gap_mean = Some(sum / n as f64);
            report.logprob_gap_max = Some(max);
        }
    }

    fn pair_loss(&mut self, items: &[Pair], report: &mut StepReport) -> Result<f64> {
        let obj = self.cfg.objective.clone();
        let n = items.len() as f64;
        let refs: Option<Vec<(f64, f64)>> = if obj.needs_reference() {
            let lps = self.lp_values(
                items,
                |p| vec![(&p.prompt[..], &p.chosen[..]), (&p.prompt[..], &p.rejected[..])],
                false,
            )?;
            Some(lps.chunks(2).map(|cr| (cr[0].iter().sum(), cr[1].iter().sum())).collect())
        } else {
            None
        };
        let mut loss = 0.0;
        let mut margin = 0.0;
        for r in self.micro_batches(items.len()) {
            let mut parts = Vec::new();
            let lps = self.lp_grad(
                items[r.clone()]
                    .iter()
                    .flat_map(|p| [(&p.prompt[..], &p.chosen[..]), (&p.prompt[..], &p.rejected[..])]),
            )?;
            for (i, lp) in r.zip(lps.chunks(2)) {
                let p = &items[i];
                let c = lp[0].sum_all().map_err(cerr)?;
                let rj = lp[1].sum_all().map_err(cerr)?;
                let (cv, rv) = (scalar(&c)?, scalar(&rj)?);
                let part = match obj {
                    Objective::Dpo { beta } => {
                        let (c_ref, r_ref) = refs.as_ref().expect("reference")[i];
                        margin += (cv - c_ref) - (rv - r_ref);
                        loss::dpo(&c, &rj, c_ref, r_ref, beta)
                    }
                    Objective::Simpo { beta, gamma } => {
                        margin += cv / p.chosen.len() as f64 - rv / p.rejected.len() as f64;
                        loss::simpo(&c, p.chosen.len(), &rj, p.rejected.len(), beta, gamma)
                    }
                    Objective::Orpo { lambda } => {
                        margin += cv / p.chosen.len() as f64 - rv / p.rejected.len() as f64;
                        loss::orpo(&c, p.chosen.len(), &rj, p.rejected.len(), lambda)
                    }
                    _ => unreachable!("validated"),
                };
                parts.push((part.map_err(cerr)? / n).map_err(cerr)?);
            }
            loss += self.backward(parts)?;
        }
        report.margin = Some(margin / n);
        Ok(loss)
    }

    fn kto_loss(&mut self, items: &[Labeled], report: &mut StepReport) -> Result<f64> {
        let Objective::Kto { beta, desirable_weight, undesirable_weight } = self.cfg.objective else {
            unreachable!("validated")
        };
        fn one(s: &Labeled) -> Vec<(&[u32], &[u32])> {
            vec![(&s.prompt[..], &s.completion[..])]
        }
        let sums = |v: Vec<Vec<f64>>| v.iter().map(|lp| lp.iter().sum()).collect::<Vec<f64>>();
        let refs = sums(self.lp_values(items, one, false)?);
        let pol = sums(self.lp_values(items, one, true)?);
        // The reference point: batch-mean policy/reference log-ratio, clamped at 0 and detached.
        let z_ref = self
            .cfg
            .kto_z_ref
            .unwrap_or_else(|| (pol.iter().zip(&refs).map(|(p, r)| p - r).sum::<f64>() / items.len() as f64).max(0.0));
        report.kl = Some(z_ref);
        let n = items.len() as f64;
        let mut loss = 0.0;
        for r in self.micro_batches(items.len()) {
            let mut parts = Vec::new();
            let lps = self.lp_grad(items[r.clone()].iter().map(|s| (&s.prompt[..], &s.completion[..])))?;
            for (i, lp) in r.zip(lps) {
                let s = &items[i];
                let lp = lp.sum_all().map_err(cerr)?;
                let w = if s.desirable { desirable_weight } else { undesirable_weight };
                parts.push((loss::kto(&lp, refs[i], z_ref, s.desirable, beta, w).map_err(cerr)? / n).map_err(cerr)?);
            }
            loss += self.backward(parts)?;
        }
        Ok(loss)
    }

    /// Backward of a sum of loss parts; gradients land in the sink. Returns the value.
    fn backward(&self, parts: Vec<Tensor>) -> Result<f64> {
        if parts.is_empty() {
            return Ok(0.0);
        }
        let total = Tensor::stack(&parts, 0).and_then(|t| t.sum_all()).map_err(cerr)?;
        let value = scalar(&total)?;
        let grads = self.clocks.1.time(|| total.backward()).map_err(cerr)?;
        // Adapter tensors used outside checkpointed blocks (the plain baseline) report here.
        for v in self.lora.vars() {
            if let Some(g) = grads.get(v.as_tensor()) {
                self.sink.add(v.as_tensor().id(), g).map_err(cerr)?;
            }
        }
        Ok(value)
    }

    /// The gradient the last step computed for a trainable tensor (tests and diagnostics).
    pub fn last_grad(&self, v: &Var) -> Option<Tensor> {
        self.sink.get(v.as_tensor().id())
    }

    /// Loss of `batch` at the current parameters without updating them (gradient checks).
    pub fn loss_value(&mut self, batch: &Batch) -> Result<f64> {
        batch.validate(&self.cfg.objective, self.weights.cfg.n_vocab)?;
        let mut report = StepReport::default();
        self.sink.clear();
        self.recompute_now = self.needs_recompute(batch);
        match batch {
            Batch::Completions(items) => self.policy_loss(items, &mut report),
            Batch::Pairs(items) => self.pair_loss(items, &mut report),
            Batch::Labeled(items) => self.kto_loss(items, &mut report),
        }
    }
}

/// Gradients of every trainable tensor, in [`Lora::vars`] order, with the coverage check that
/// runs on every step and stops the run when a gradient is missing or all zero. The one allowed
/// zero: dL/dA = scale·Bᵀ(…) vanishes exactly while B = 0 (the standard initialisation).
pub fn coverage(lora: &Lora, sink: &GradSink) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(2 * lora.pairs.len());
    for p in &lora.pairs {
        let name = p.target.gguf_name(p.block);
        let b_zero = scalar(&p.b.as_tensor().abs().map_err(cerr)?.max_all().map_err(cerr)?)? == 0.0;
        for (v, which) in [(&p.a, "lora_a"), (&p.b, "lora_b")] {
            let g = sink.get(v.as_tensor().id()).ok_or_else(|| {
                Error::Train(format!(
                    "no gradient reached {name}.{which}: the forward does not use it (coverage check)"
                ))
            })?;
            let g_zero = all_finite(&g) && scalar(&g.abs().map_err(cerr)?.max_all().map_err(cerr)?)? == 0.0;
            if g_zero && !(which == "lora_a" && b_zero) {
                return Err(Error::Train(format!("{name}.{which} received an all-zero gradient (coverage check)")));
            }
            out.push(g);
        }
    }
    Ok(out)
}

fn all_finite(t: &Tensor) -> bool {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all()?.to_vec1::<f64>())
        .map(|v| v.iter().all(|x| x.is_finite()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recompute_reads_true_false_and_auto() {
        #[derive(Deserialize, Serialize)]
        struct T {
            recompute: Recompute,
        }
        for (text, want) in [("true", Recompute::Always), ("false", Recompute::Never), ("\"auto\"", Recompute::Auto)] {
            let t: T = toml::from_str(&format!("recompute = {text}")).unwrap();
            assert_eq!(t.recompute, want);
            assert_eq!(toml::to_string(&t).unwrap().trim(), format!("recompute = {text}"));
        }
        let err = toml::from_str::<T>("recompute = \"sometimes\"").err().unwrap().to_string();
        assert!(err.contains("expected true, false or \"auto\""), "{err}");
    }
}
