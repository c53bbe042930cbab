//! Text training data in JSONL, tokenized exactly as the rollout engine tokenizes prompts.
//!
//! One object per line, by objective:
//! - NLL / PPO / GRPO: `{"prompt": …, "completion": …, "reward": 1.0}` (optional `"group"` —
//!   default: the prompt text —, `"advantage"`, `"raw": true` to skip the chat template);
//! - DPO / SimPO / ORPO: `{"prompt": …, "chosen": …, "rejected": …}` (TRL's preference format);
//! - KTO: `{"prompt": …, "completion": …, "label": true}` (TRL's unpaired format).

use super::data::{Batch, Completion, Labeled, Pair};
use super::loss::Objective;
use crate::engine::Prompt;
use crate::llama::Model;
use crate::{Error, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Deserialize)]
struct Row {
    prompt: String,
    #[serde(default)]
    raw: bool,
    completion: Option<String>,
    chosen: Option<String>,
    rejected: Option<String>,
    reward: Option<f64>,
    advantage: Option<f64>,
    label: Option<bool>,
    group: Option<serde_json::Value>,
}

fn ids(v: Vec<i32>) -> Vec<u32> {
    v.into_iter().map(|t| t as u32).collect()
}

fn group_id(key: &str) -> u64 {
    // FNV-1a: stable across runs and platforms.
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Reads a JSONL file into one [`Batch`] of the kind `objective` trains on.
pub fn load(path: &Path, objective: &Objective, model: &Model) -> Result<Batch> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(path.to_path_buf()),
        _ => Error::io(path, e),
    })?;
    let (mut comps, mut pairs, mut labeled) = (Vec::new(), Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| Error::Data { path: path.to_path_buf(), line: i + 1, reason };
        let row: Row = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let prompt_tokens = if row.raw { Prompt::Raw(row.prompt.clone()) } else { Prompt::user(row.prompt.clone()) };
        let prompt = ids(prompt_tokens.tokens(model).map_err(|e| bad(e.to_string()))?);
        let tok = |field: &str, s: &Option<String>| -> Result<Vec<u32>> {
            let s = s.as_ref().ok_or_else(|| bad(format!("missing \"{field}\" (needed by {})", objective.name())))?;
            let t = ids(model.tokenize(s, false, false)?);
            if t.is_empty() {
                return Err(bad(format!("\"{field}\" is empty")));
            }
            Ok(t)
        };
        match objective {
            Objective::Nll | Objective::Ppo { .. } | Objective::Grpo { .. } => {
                let reward = match (row.reward, objective) {
                    (Some(r), _) => r,
                    (None, Objective::Nll) => 1.0,
                    (None, _) => return Err(bad(format!("missing \"reward\" (needed by {})", objective.name()))),
                };
                let group = row.group.as_ref().map(|g| g.to_string()).unwrap_or_else(|| row.prompt.clone());
                comps.push(Completion {
                    prompt,
                    completion: tok("completion", &row.completion)?,
                    behaviour_logprobs: None,
                    reward,
                    advantage: row.advantage,
                    group: group_id(&group),
                });
            }
            Objective::Dpo { .. } | Objective::Simpo { .. } | Objective::Orpo { .. } => {
                pairs.push(Pair {
                    chosen: tok("chosen", &row.chosen)?,
                    rejected: tok("rejected", &row.rejected)?,
                    prompt,
                });
            }
            Objective::Kto { .. } => {
                let desirable = row.label.ok_or_else(|| bad("missing \"label\" (true/false, needed by kto)".into()))?;
                labeled.push(Labeled { completion: tok("completion", &row.completion)?, prompt, desirable });
            }
        }
    }
    let batch = match objective {
        Objective::Nll | Objective::Ppo { .. } | Objective::Grpo { .. } => Batch::Completions(comps),
        Objective::Dpo { .. } | Objective::Simpo { .. } | Objective::Orpo { .. } => Batch::Pairs(pairs),
        Objective::Kto { .. } => Batch::Labeled(labeled),
    };
    if batch.is_empty() {
        return Err(Error::Data { path: path.to_path_buf(), line: 0, reason: "no training rows".into() });
    }
    Ok(batch)
}

impl Batch {
    /// Splits into batches of at most `size` items, keeping GRPO groups (same group id) together.
    pub fn chunks(&self, size: usize) -> Vec<Batch> {
        let size = size.max(1);
        match self {
            Batch::Completions(v) => {
                let mut groups: Vec<Vec<Completion>> = Vec::new();
                for c in v {
                    match groups.iter_mut().find(|g| g[0].group == c.group) {
                        Some(g) => g.push(c.clone()),
                        None => groups.push(vec![c.clone()]),
                    }
                }
                let mut out: Vec<Vec<Completion>> = vec![Vec::new()];
                for g in groups {
                    if !out.last().expect("non-empty").is_empty()
                        && out.last().expect("non-empty").len() + g.len() > size
                    {
                        out.push(Vec::new());
                    }
                    out.last_mut().expect("non-empty").extend(g);
                }
                out.into_iter().filter(|b| !b.is_empty()).map(Batch::Completions).collect()
            }
            Batch::Pairs(v) => v.chunks(size).map(|c| Batch::Pairs(c.to_vec())).collect(),
            Batch::Labeled(v) => v.chunks(size).map(|c| Batch::Labeled(c.to_vec())).collect(),
        }
    }
}
