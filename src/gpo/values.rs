//! Monte-Carlo step values and the search for the critical step: the one implementation behind
//! the training loop (`collect`, many trajectories batched per round), the C ABI and gpod
//! ([`estimate`], one trajectory).
//!
//! An [`Analysis`] is one trajectory inside its prompt's [`Tree`]. Each round it asks for probes
//! (M continuations forked at a step boundary); the samples go into the tree, and the analysis
//! moves on:
//! - `dense` (the paper's recipe): every prefix s_0 … s_{K−1} gets M samples (with the adaptive
//!   budget, a prefix stops once its samples agree); the critical step is [`critical_step`] of
//!   the values.
//! - `bisect`: V(s_0) and V(s_K) = r bound the trajectory; probe the midpoint, keep the half with
//!   the larger change in the rule's direction, stop at the adjacent pair: ⌈log₂ K⌉ probes.
//!   Values along a failed trajectory are close to monotone, so the kept half holds the step
//!   that lost the most. When V(s_0) and r show no change in the rule's direction there is no
//!   critical step and nothing is probed.

use super::collect::Rollouts;
use crate::engine::{GenerateRequest, SamplingParams, StepConfig, Trajectory};
use crate::tree::{advantages, critical_step, CriticalMode, Tree};
use crate::Result;
use serde::{Deserialize, Serialize};

/// How the critical step is searched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Search {
    /// Estimate every prefix (the paper; K probes).
    Dense,
    /// Binary search between V(s_0) and V(s_K) (⌈log₂ K⌉ probes).
    #[default]
    Bisect,
}

/// Settings of a value search.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchConfig {
    /// Dense or bisect.
    pub search: Search,
    /// Samples per probed prefix (M).
    pub rollouts: usize,
    /// Dense only: stop sampling a prefix once it is settled.
    pub adaptive: bool,
    /// Adaptive: samples before a prefix may settle.
    pub adaptive_min: usize,
    /// Adaptive: also settled when the ~95% Hoeffding half-width is below this.
    pub adaptive_tol: f64,
}

impl SearchConfig {
    /// Dense search with `rollouts` samples per prefix, no adaptive budget.
    pub fn dense(rollouts: usize) -> SearchConfig {
        SearchConfig { search: Search::Dense, rollouts, adaptive: false, adaptive_min: 2, adaptive_tol: 0.0 }
    }
}

/// The rule a trajectory's critical step is chosen by, given its reward: `Auto` is `drop` for a
/// failed trajectory (reward < 0.5) and `gain` for a correct one.
pub fn resolve(mode: CriticalMode, reward: f64) -> CriticalMode {
    match mode {
        CriticalMode::Auto if reward < 0.5 => CriticalMode::Drop,
        CriticalMode::Auto => CriticalMode::Gain,
        m => m,
    }
}

/// How much a value change `to − from` counts under a (resolved) rule.
fn key(mode: CriticalMode, change: f64) -> f64 {
    match mode {
        CriticalMode::Drop => -change,
        CriticalMode::Gain => change,
        CriticalMode::Abs | CriticalMode::Auto => change.abs(),
    }
}

/// One trajectory under analysis inside its prompt's tree.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// Index of its tree (the prompt) in the caller's slice.
    pub tree: usize,
    /// Token offsets b_0 = 0 … b_K of the prefixes s_0 … s_K in the trajectory.
    pub bounds: Vec<usize>,
    /// Tree nodes of s_0 … s_K.
    pub path: Vec<usize>,
    /// The trajectory's own reward: V(s_K).
    pub reward: f64,
    /// The rule, resolved for this trajectory.
    pub mode: CriticalMode,
    /// Probes issued (requests of continuations at one prefix).
    pub probes: usize,
    /// Indices (into the search's samples) drawn from each prefix s_0 … s_{K−1}.
    pub drawn: Vec<Vec<usize>>,
    /// V(s_0) … V(s_K) when finished (NaN where bisection did not look).
    pub values: Vec<f64>,
    /// The critical step (index of the step from s_m to s_{m+1}).
    pub critical: Option<usize>,
    /// Dense adaptive: samples not drawn because prefixes settled.
    pub saved: usize,
    /// The budget stopped the search before it finished (no critical step).
    pub cut: bool,
    done: bool,
    lo: usize,
    hi: usize,
    round: usize,
}

impl Analysis {
    /// An analysis of `t` (scored `reward`), already inserted into `tree` from node `start`.
    pub fn new(tree_index: usize, tree: &Tree, start: usize, t: &Trajectory, reward: f64, mode: CriticalMode) -> Self {
        let mut bounds = vec![0];
        bounds.extend(t.steps.iter().map(|s| s.end));
        let mut path = vec![start];
        let mut cur = start;
        for edge in t.step_tokens() {
            cur = tree.nodes[cur]
                .children
                .iter()
                .copied()
                .find(|&c| tree.nodes[c].edge == edge)
                .expect("the trajectory was inserted into its tree");
            path.push(cur);
        }
        let k = bounds.len() - 1;
        Analysis {
            tree: tree_index,
            bounds,
            path,
            reward,
            mode: resolve(mode, reward),
            probes: 0,
            drawn: vec![Vec::new(); k],
            values: Vec::new(),
            critical: None,
            saved: 0,
            cut: false,
            done: false,
            lo: 0,
            hi: k,
            round: 0,
        }
    }

    /// Steps K.
    pub fn steps(&self) -> usize {
        self.bounds.len() - 1
    }

    fn count(&self, tr: &Tree, i: usize) -> usize {
        tr.nodes[self.path[i]].value.count as usize
    }

    /// V(s_i) as the search sees it: the tree's estimate, or the reward at s_K.
    fn value(&self, tr: &Tree, i: usize) -> f64 {
        if i == self.steps() {
            self.reward
        } else {
            tr.nodes[self.path[i]].value.mean()
        }
    }

    /// The probes (prefix, samples) this analysis wants next; empty once it has finished.
    fn wants(&mut self, tr: &Tree, cfg: &SearchConfig) -> Vec<(usize, usize)> {
        if self.done {
            return Vec::new();
        }
        let w = match cfg.search {
            Search::Dense => self.dense_wants(tr, cfg),
            Search::Bisect => self.bisect_wants(tr, cfg).into_iter().collect(),
        };
        if w.is_empty() {
            self.finish(tr, cfg);
        }
        self.round += 1;
        w
    }

    fn dense_wants(&self, tr: &Tree, cfg: &SearchConfig) -> Vec<(usize, usize)> {
        let m = cfg.rollouts;
        let target = if cfg.adaptive { (cfg.adaptive_min + self.round).min(m) } else { m };
        (0..self.steps())
            .filter_map(|i| {
                let s = tr.nodes[self.path[i]].value;
                let n = s.count as usize;
                let settled =
                    cfg.adaptive && n >= cfg.adaptive_min && (s.unanimous() || s.half_width() < cfg.adaptive_tol);
                (n < target && !settled).then(|| (i, target - n))
            })
            .collect()
    }

    /// Moves the bisection as far as the samples allow; the next probe, if one is needed.
    fn bisect_wants(&mut self, tr: &Tree, cfg: &SearchConfig) -> Option<(usize, usize)> {
        let m = cfg.rollouts;
        if self.steps() == 0 {
            return None;
        }
        if self.count(tr, self.lo) < m {
            return Some((self.lo, m - self.count(tr, self.lo)));
        }
        let total = self.value(tr, self.hi) - self.value(tr, self.lo);
        if key(self.mode, total) <= 1e-12 {
            return None; // no change in the rule's direction between the ends
        }
        while self.hi - self.lo > 1 {
            let mid = (self.lo + self.hi) / 2;
            if self.count(tr, mid) < m {
                return Some((mid, m - self.count(tr, mid)));
            }
            let (vl, vm, vh) = (self.value(tr, self.lo), self.value(tr, mid), self.value(tr, self.hi));
            if key(self.mode, vm - vl) >= key(self.mode, vh - vm) {
                self.hi = mid;
            } else {
                self.lo = mid;
            }
        }
        None
    }

    fn finish(&mut self, tr: &Tree, cfg: &SearchConfig) {
        self.done = true;
        let k = self.steps();
        self.values =
            (0..=k).map(|i| if i == k || self.count(tr, i) > 0 { self.value(tr, i) } else { f64::NAN }).collect();
        if self.cut {
            return;
        }
        self.critical = match cfg.search {
            Search::Dense => critical_step(&self.values, self.mode),
            Search::Bisect if k > 0 => {
                let change = self.value(tr, self.hi) - self.value(tr, self.lo);
                (self.hi == self.lo + 1 && key(self.mode, change) > 1e-12).then_some(self.lo)
            }
            Search::Bisect => None,
        };
        if cfg.search == Search::Dense && cfg.adaptive {
            self.saved = (0..k).map(|i| cfg.rollouts.saturating_sub(self.count(tr, i))).sum();
        }
    }

    /// Stops the search (the budget ran out); what was drawn stays.
    fn cut(&mut self, tr: &Tree, cfg: &SearchConfig) {
        self.cut = true;
        self.finish(tr, cfg);
    }
}

/// A probe: `n` continuations of analysis `analysis` forked at prefix `prefix`, in round `round`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Analysis index.
    pub analysis: usize,
    /// Prefix index i (fork at s_i).
    pub prefix: usize,
    /// Continuations.
    pub n: usize,
    /// Search round (seeds).
    pub round: usize,
}

/// One continuation drawn by a search.
#[derive(Debug, Clone)]
pub struct Drawn {
    /// Analysis it was drawn for.
    pub analysis: usize,
    /// Prefix index it was forked at.
    pub prefix: usize,
    /// The continuation.
    pub traj: Trajectory,
    /// Its reward.
    pub reward: f64,
}

/// What a search needs from its caller: requests, sampling, scoring and the budget.
pub trait ProbeHost {
    /// The request for a probe (the fork, its sampling seed and step segmentation).
    fn request(&self, analyses: &[Analysis], probe: &Probe) -> Result<GenerateRequest>;
    /// Samples every request of a round (they share batches).
    fn sample(&mut self, reqs: Vec<GenerateRequest>) -> Result<Vec<Vec<Trajectory>>>;
    /// Reward of a continuation drawn for `analysis`.
    fn score(&mut self, analysis: usize, t: &Trajectory) -> Result<f64>;
    /// Whether the budget admits `probe` on top of `pending` rollouts already admitted this
    /// round; a refused probe ends its analysis.
    fn admit(&mut self, _probe: &Probe, _pending: usize) -> bool {
        true
    }
}

/// Runs every analysis to the end in rounds (one batched sampling call per round); samples go
/// into the trees and are returned in the order drawn (`Analysis::drawn` indexes them).
pub fn search(
    host: &mut dyn ProbeHost,
    trees: &mut [Tree],
    analyses: &mut [Analysis],
    cfg: &SearchConfig,
) -> Result<Vec<Drawn>> {
    let mut drawn = Vec::new();
    loop {
        let mut probes = Vec::new();
        let mut pending = 0;
        for a in 0..analyses.len() {
            let round = analyses[a].round;
            let wants = analyses[a].wants(&trees[analyses[a].tree], cfg);
            for (prefix, n) in wants {
                let p = Probe { analysis: a, prefix, n, round };
                if analyses[a].cut {
                    break;
                }
                if !host.admit(&p, pending) {
                    analyses[a].cut(&trees[analyses[a].tree], cfg);
                    break;
                }
                pending += n;
                probes.push(p);
            }
        }
        if probes.is_empty() {
            return Ok(drawn);
        }
        let reqs = probes.iter().map(|p| host.request(analyses, p)).collect::<Result<Vec<_>>>()?;
        let got = host.sample(reqs)?;
        for (p, ts) in probes.iter().zip(got) {
            analyses[p.analysis].probes += 1;
            for t in ts {
                let reward = host.score(p.analysis, &t)?;
                let a = &mut analyses[p.analysis];
                trees[a.tree].insert(a.path[p.prefix], &t.step_tokens(), reward);
                a.drawn[p.prefix].push(drawn.len());
                drawn.push(Drawn { analysis: p.analysis, prefix: p.prefix, traj: t, reward });
            }
        }
    }
}

/// Monte-Carlo values along one trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepValues {
    /// V(s_0) … V(s_K); the last is the trajectory's own reward (NaN/null where a bisection
    /// did not look).
    pub values: Vec<f64>,
    /// Samples behind each value (the last counts the trajectory itself).
    pub counts: Vec<u32>,
    /// A_i = V(s_{i+1}) − V(s_i).
    pub advantages: Vec<f64>,
    /// The critical step (None when no step changes the value in the rule's direction).
    pub critical: Option<usize>,
    /// Token offsets (into the trajectory's generated tokens) of s_0 … s_K.
    pub boundaries: Vec<usize>,
    /// Continuations sampled.
    pub rollouts: usize,
    /// Probes issued.
    pub probes: usize,
}

struct Single<'a> {
    src: &'a dyn Rollouts,
    traj: &'a Trajectory,
    sampling: &'a SamplingParams,
    steps: &'a StepConfig,
    score: &'a mut dyn FnMut(&Trajectory) -> Result<f64>,
}

impl ProbeHost for Single<'_> {
    fn request(&self, analyses: &[Analysis], p: &Probe) -> Result<GenerateRequest> {
        let seed = self.sampling.seed.wrapping_add((p.prefix as u64 + 1000 * p.round as u64) * 1_000_003);
        let sp = SamplingParams { seed, ..self.sampling.clone() };
        let mut r = GenerateRequest::continuing(self.traj, analyses[p.analysis].bounds[p.prefix], p.n, sp)?;
        r.steps = self.steps.clone();
        Ok(r)
    }
    fn sample(&mut self, reqs: Vec<GenerateRequest>) -> Result<Vec<Vec<Trajectory>>> {
        self.src.sample(reqs)
    }
    fn score(&mut self, _: usize, t: &Trajectory) -> Result<f64> {
        (self.score)(t)
    }
}

/// Values of `traj`'s prefixes and its critical step by `cfg`'s search (continuations segmented
/// by `steps`, the segmentation the trajectory was generated with); `score` gives the reward of
/// a trajectory (the trajectory's own reward is `score(traj)`).
pub fn estimate(
    rollouts: &dyn Rollouts,
    traj: &Trajectory,
    cfg: &SearchConfig,
    sampling: &SamplingParams,
    steps: &StepConfig,
    mode: CriticalMode,
    score: &mut dyn FnMut(&Trajectory) -> Result<f64>,
) -> Result<StepValues> {
    let reward = score(traj)?;
    let mut trees = vec![Tree::new()];
    trees[0].insert(Tree::ROOT, &traj.step_tokens(), reward);
    trees[0].nodes[Tree::ROOT].value = Default::default(); // it was not sampled from s_0 by us
    let mut analyses = vec![Analysis::new(0, &trees[0], Tree::ROOT, traj, reward, mode)];
    let mut host = Single { src: rollouts, traj, sampling, steps, score };
    let drawn = search(&mut host, &mut trees, &mut analyses, cfg)?;
    let a = &analyses[0];
    let k = a.steps();
    let mut counts: Vec<u32> = (0..k).map(|i| trees[0].nodes[a.path[i]].value.count).collect();
    counts.push(1);
    Ok(StepValues {
        advantages: advantages(&a.values),
        critical: a.critical,
        values: a.values.clone(),
        counts,
        boundaries: a.bounds.clone(),
        rollouts: drawn.len(),
        probes: a.probes,
    })
}
