//! Step values of a single trajectory, for embedders (the C ABI, gpod): M continuations from
//! every prefix by KV fork, scored by any function, shared through a [`Tree`], and the critical
//! step. The training loop batches the same procedure across many trajectories (`collect`).

use super::collect::Rollouts;
use crate::engine::{GenerateRequest, SamplingParams, Trajectory};
use crate::tree::{advantages, critical_step, CriticalMode, Tree};
use crate::Result;
use serde::{Deserialize, Serialize};

/// Monte-Carlo values along one trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepValues {
    /// V(s_0) … V(s_K); the last is the trajectory's own reward.
    pub values: Vec<f64>,
    /// Samples behind each value (the last counts the trajectory itself).
    pub counts: Vec<u32>,
    /// A_i = V(s_{i+1}) − V(s_i).
    pub advantages: Vec<f64>,
    /// The critical step (None when every value is equal).
    pub critical: Option<usize>,
    /// Token offsets (into the trajectory's generated tokens) of s_0 … s_K.
    pub boundaries: Vec<usize>,
    /// Continuations sampled.
    pub rollouts: usize,
}

/// Estimates the values of `traj`'s prefixes with `m` continuations each; `score` gives the
/// reward of a trajectory (the parent's own reward is `score(traj)`).
pub fn estimate(
    rollouts: &dyn Rollouts,
    traj: &Trajectory,
    m: usize,
    sampling: &SamplingParams,
    mode: CriticalMode,
    score: &mut dyn FnMut(&Trajectory) -> Result<f64>,
) -> Result<StepValues> {
    let steps: Vec<&[i32]> = traj.steps.iter().map(|s| &traj.tokens[s.start..s.end]).collect();
    let reward = score(traj)?;
    let mut tree = Tree::new();
    // The trajectory defines its prefixes; its reward is only V(s_K) (see `tree`).
    let path = tree.insert(Tree::ROOT, &steps, reward);
    tree.nodes[Tree::ROOT].value = Default::default(); // it was not sampled from s_0 by us
    let mut boundaries = vec![0];
    boundaries.extend(traj.steps.iter().map(|s| s.end));
    let k = steps.len();
    let reqs: Vec<GenerateRequest> = (0..k)
        .map(|i| {
            let sp = SamplingParams { seed: sampling.seed.wrapping_add(i as u64 * 1_000_003), ..sampling.clone() };
            GenerateRequest::continuing(traj, boundaries[i], m, sp)
        })
        .collect::<Result<_>>()?;
    let mut n = 0;
    for (i, ts) in rollouts.sample(reqs)?.into_iter().enumerate() {
        for t in ts {
            let r = score(&t)?;
            let cont: Vec<&[i32]> = t.steps.iter().map(|s| &t.tokens[s.start..s.end]).collect();
            tree.insert(path[i], &cont, r);
            n += 1;
        }
    }
    let mut values: Vec<f64> = (0..k).map(|i| tree.nodes[path[i]].value.mean()).collect();
    let mut counts: Vec<u32> = (0..k).map(|i| tree.nodes[path[i]].value.count).collect();
    values.push(reward);
    counts.push(1);
    Ok(StepValues {
        advantages: advantages(&values),
        critical: critical_step(&values, mode),
        values,
        counts,
        boundaries,
        rollouts: n,
    })
}
