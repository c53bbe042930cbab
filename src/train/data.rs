//! Training batches: scored completions (NLL, PPO, GRPO), preference pairs (DPO, SimPO, ORPO) and
//! labelled completions (KTO), with the JSONL formats the CLI reads.

use super::loss::Objective;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// A completion with its reward (and, from the rollout engine, its behaviour log-probs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Prompt token ids (conditioning, never trained on).
    pub prompt: Vec<u32>,
    /// Completion token ids.
    pub completion: Vec<u32>,
    /// Rollout log-probs of the completion tokens, if known.
    #[serde(default)]
    pub behaviour_logprobs: Option<Vec<f32>>,
    /// Reward in [0, 1] (or any scale for PPO).
    #[serde(default)]
    pub reward: f64,
    /// Explicit advantage (e.g. reward − V(s)); None = derived from the group (GRPO: reward
    /// normalised within the group; PPO: reward minus the group's mean reward).
    #[serde(default)]
    pub advantage: Option<f64>,
    /// Group id: GRPO normalises rewards within a group (same prompt or same reset prefix).
    #[serde(default)]
    pub group: u64,
}

impl Completion {
    /// A completion with a reward, group 0.
    pub fn new(prompt: Vec<u32>, completion: Vec<u32>, reward: f64) -> Completion {
        Completion { prompt, completion, behaviour_logprobs: None, reward, advantage: None, group: 0 }
    }
}

/// A preference pair sharing its prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    /// Shared prompt (for GPO: the prompt plus the critical prefix).
    pub prompt: Vec<u32>,
    /// Preferred completion.
    pub chosen: Vec<u32>,
    /// Dispreferred completion.
    pub rejected: Vec<u32>,
}

/// An unpaired completion labelled desirable or not (KTO).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Labeled {
    /// Prompt.
    pub prompt: Vec<u32>,
    /// Completion.
    pub completion: Vec<u32>,
    /// Desirable?
    pub desirable: bool,
}

/// What one optimiser step trains on.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    /// For NLL, PPO, GRPO.
    Completions(Vec<Completion>),
    /// For DPO, SimPO, ORPO.
    Pairs(Vec<Pair>),
    /// For KTO.
    Labeled(Vec<Labeled>),
}

impl Batch {
    /// Sequences (pairs count twice).
    pub fn len(&self) -> usize {
        match self {
            Batch::Completions(v) => v.len(),
            Batch::Pairs(v) => 2 * v.len(),
            Batch::Labeled(v) => v.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Completion tokens trained on.
    pub fn completion_tokens(&self) -> usize {
        match self {
            Batch::Completions(v) => v.iter().map(|c| c.completion.len()).sum(),
            Batch::Pairs(v) => v.iter().map(|p| p.chosen.len() + p.rejected.len()).sum(),
            Batch::Labeled(v) => v.iter().map(|c| c.completion.len()).sum(),
        }
    }

    /// Token lengths (prompt + completion) of each item's sequences: one per item, two per pair.
    pub fn sequence_lengths(&self) -> Vec<Vec<usize>> {
        match self {
            Batch::Completions(v) => v.iter().map(|c| vec![c.prompt.len() + c.completion.len()]).collect(),
            Batch::Pairs(v) => {
                v.iter().map(|p| vec![p.prompt.len() + p.chosen.len(), p.prompt.len() + p.rejected.len()]).collect()
            }
            Batch::Labeled(v) => v.iter().map(|c| vec![c.prompt.len() + c.completion.len()]).collect(),
        }
    }

    /// Checks shape and fit to the objective; names the bad item.
    pub fn validate(&self, objective: &Objective, n_vocab: usize) -> Result<()> {
        let kind = match self {
            Batch::Completions(_) => "completions",
            Batch::Pairs(_) => "pairs",
            Batch::Labeled(_) => "labeled",
        };
        let fits = matches!(
            (objective, self),
            (Objective::Nll | Objective::Ppo { .. } | Objective::Grpo { .. }, Batch::Completions(_))
                | (Objective::Dpo { .. } | Objective::Simpo { .. } | Objective::Orpo { .. }, Batch::Pairs(_))
                | (Objective::Kto { .. }, Batch::Labeled(_))
        );
        if !fits {
            return Err(Error::invalid(
                "batch",
                format!("{} trains on {}, got {kind}", objective.name(), expected(objective)),
            ));
        }
        if self.is_empty() {
            return Err(Error::invalid("batch", "is empty"));
        }
        let check = |i: usize, prompt: &[u32], completion: &[u32], what: &str| -> Result<()> {
            if prompt.is_empty() {
                return Err(Error::invalid("batch", format!("item {i}: empty prompt")));
            }
            if completion.is_empty() {
                return Err(Error::invalid("batch", format!("item {i}: empty {what}")));
            }
            if let Some(t) = prompt.iter().chain(completion).find(|&&t| t as usize >= n_vocab) {
                return Err(Error::invalid(
                    "batch",
                    format!("item {i}: token {t} outside the vocabulary of {n_vocab}"),
                ));
            }
            Ok(())
        };
        match self {
            Batch::Completions(v) => {
                for (i, c) in v.iter().enumerate() {
                    check(i, &c.prompt, &c.completion, "completion")?;
                    if let Some(b) = &c.behaviour_logprobs {
                        if b.len() != c.completion.len() {
                            return Err(Error::invalid(
                                "batch",
                                format!("item {i}: {} log-probs for {} tokens", b.len(), c.completion.len()),
                            ));
                        }
                    }
                }
            }
            Batch::Pairs(v) => {
                for (i, p) in v.iter().enumerate() {
                    check(i, &p.prompt, &p.chosen, "chosen")?;
                    check(i, &p.prompt, &p.rejected, "rejected")?;
                }
            }
            Batch::Labeled(v) => {
                for (i, c) in v.iter().enumerate() {
                    check(i, &c.prompt, &c.completion, "completion")?;
                }
            }
        }
        Ok(())
    }

    /// A reason to skip the step when the batch carries NaN/∞ rewards, advantages or log-probs.
    pub fn non_finite(&self) -> Option<String> {
        let Batch::Completions(v) = self else { return None };
        for (i, c) in v.iter().enumerate() {
            if !c.reward.is_finite() {
                return Some(format!("item {i} has a non-finite reward ({}) — step not applied", c.reward));
            }
            if c.advantage.is_some_and(|a| !a.is_finite()) {
                return Some(format!("item {i} has a non-finite advantage — step not applied"));
            }
            if c.behaviour_logprobs.as_ref().is_some_and(|b| b.iter().any(|x| !x.is_finite())) {
                return Some(format!("item {i} has non-finite behaviour log-probs — step not applied"));
            }
        }
        None
    }
}

fn expected(o: &Objective) -> &'static str {
    match o {
        Objective::Nll | Objective::Ppo { .. } | Objective::Grpo { .. } => "completions",
        Objective::Dpo { .. } | Objective::Simpo { .. } | Objective::Orpo { .. } => "pairs",
        Objective::Kto { .. } => "labeled",
    }
}
