//! The trajectory tree of one prompt: nodes are prefixes at step boundaries (edges are steps, as
//! token ids), each holding a Monte-Carlo value estimate (mean, count, spread).
//!
//! Which samples count for a node's value (unbiased Monte-Carlo):
//! - a trajectory sampled from node `n` is a sample of V(n);
//! - it is also a sample of every *already existing* deeper node it passes through (a draw from
//!   π(·|n) that happens to reproduce a prefix is, conditioned on it, a draw from π(·|prefix)) —
//!   so continuations feed deeper prefixes and nothing is sampled twice;
//! - it is **not** a sample of the nodes it creates itself (they exist because of it — counting
//!   it would bias V towards its own reward), except its terminal leaf, whose value is exactly
//!   its reward (V(s_K) = r).

use crate::llama::Token;
use serde::{Deserialize, Serialize};

/// Running value statistics of a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ValueStats {
    /// Samples.
    pub count: u32,
    sum: f64,
    sum_sq: f64,
}

impl ValueStats {
    /// Adds a reward.
    pub fn add(&mut self, r: f64) {
        self.count += 1;
        self.sum += r;
        self.sum_sq += r * r;
    }

    /// Mean reward (NaN without samples).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.sum / self.count as f64
        }
    }

    /// Population standard deviation.
    pub fn spread(&self) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        let m = self.mean();
        (self.sum_sq / self.count as f64 - m * m).max(0.0).sqrt()
    }

    /// Half-width of a ~95% confidence interval for a mean of rewards in [0, 1] (Hoeffding).
    pub fn half_width(&self) -> f64 {
        if self.count == 0 {
            return f64::INFINITY;
        }
        ((2.0f64 / 0.05).ln() / (2.0 * self.count as f64)).sqrt()
    }

    /// True when every sample had the same reward.
    pub fn unanimous(&self) -> bool {
        self.count > 0 && self.spread() < 1e-12
    }
}

/// One prefix node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    /// Parent (None for the root, the prompt itself).
    pub parent: Option<usize>,
    /// Tokens of the step leading here from the parent.
    pub edge: Vec<Token>,
    /// Completion tokens from the root to here.
    pub depth_tokens: usize,
    /// Children.
    pub children: Vec<usize>,
    /// Value estimate.
    pub value: ValueStats,
    /// Set when a trajectory ended here (its reward is the node's exact value).
    pub terminal: bool,
}

/// The tree of one prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tree {
    /// Nodes; index 0 is the root (the prompt).
    pub nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

impl Tree {
    /// A tree holding only the root.
    pub fn new() -> Tree {
        Tree {
            nodes: vec![Node {
                parent: None,
                edge: Vec::new(),
                depth_tokens: 0,
                children: Vec::new(),
                value: ValueStats::default(),
                terminal: false,
            }],
        }
    }

    /// Root id.
    pub const ROOT: usize = 0;

    fn child(&self, n: usize, edge: &[Token]) -> Option<usize> {
        self.nodes[n].children.iter().copied().find(|&c| self.nodes[c].edge == edge)
    }

    /// Inserts a trajectory sampled from node `start`, given as its steps (token ids of each
    /// step, in order), with its reward. Returns the path of node ids it passes, `start` first
    /// and its terminal node last. Value samples follow the rules in the module docs.
    pub fn insert(&mut self, start: usize, steps: &[&[Token]], reward: f64) -> Vec<usize> {
        self.nodes[start].value.add(reward);
        let mut path = vec![start];
        let mut cur = start;
        for (i, step) in steps.iter().enumerate() {
            let last = i + 1 == steps.len();
            cur = match self.child(cur, step) {
                Some(c) => {
                    // An existing prefix this sample passes through: an unbiased sample of it.
                    self.nodes[c].value.add(reward);
                    c
                }
                None => {
                    let depth = self.nodes[cur].depth_tokens + step.len();
                    self.nodes.push(Node {
                        parent: Some(cur),
                        edge: step.to_vec(),
                        depth_tokens: depth,
                        children: Vec::new(),
                        value: ValueStats::default(),
                        terminal: false,
                    });
                    let id = self.nodes.len() - 1;
                    self.nodes[cur].children.push(id);
                    if last {
                        self.nodes[id].value.add(reward); // V(s_K) = r
                    }
                    id
                }
            };
            path.push(cur);
        }
        if let Some(&t) = path.last() {
            self.nodes[t].terminal = true;
        }
        path
    }

    /// Completion tokens from the root to `n`.
    pub fn prefix_tokens(&self, mut n: usize) -> Vec<Token> {
        let mut edges = Vec::new();
        while let Some(p) = self.nodes[n].parent {
            edges.push(&self.nodes[n].edge);
            n = p;
        }
        edges.into_iter().rev().flatten().copied().collect()
    }
}

/// How the critical step is chosen from the advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CriticalMode {
    /// Largest |A_i| (default).
    #[default]
    Abs,
    /// Smallest A_i: the step that lost the most value.
    Drop,
    /// Largest A_i: the step that gained the most.
    Gain,
    /// `drop` for a failed trajectory (reward < 0.5), `gain` for a correct one (resolved per
    /// trajectory by the loop; [`critical_step`] alone reads it as `abs`).
    Auto,
}

/// Advantages `A_i = V(s_{i+1}) − V(s_i)` along a path of values.
pub fn advantages(values: &[f64]) -> Vec<f64> {
    values.windows(2).map(|w| w[1] - w[0]).collect()
}

/// The critical step: index i of the step from s_i to s_{i+1}. Ties go to the earliest step;
/// a path whose values are all equal has no critical step.
pub fn critical_step(values: &[f64], mode: CriticalMode) -> Option<usize> {
    if values.len() < 2 || values.iter().all(|v| (v - values[0]).abs() < 1e-12) {
        return None;
    }
    let adv = advantages(values);
    let key = |a: f64| match mode {
        CriticalMode::Abs | CriticalMode::Auto => a.abs(),
        CriticalMode::Drop => -a,
        CriticalMode::Gain => a,
    };
    let mut best = 0;
    for (i, &a) in adv.iter().enumerate() {
        if key(a) > key(adv[best]) + 1e-12 {
            best = i;
        }
    }
    Some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_follow_the_sampling_rules() {
        let mut t = Tree::new();
        let a: &[Token] = &[1, 2];
        let b: &[Token] = &[3];
        let c: &[Token] = &[4, 5];
        // The analysed trajectory creates s1 = [a], s2 = [a, b], leaf [a, b, c]: only the root and
        // the leaf get its reward.
        let p = t.insert(Tree::ROOT, &[a, b, c], 1.0);
        assert_eq!(p.len(), 4);
        assert_eq!(t.nodes[p[1]].value.count, 0);
        assert_eq!(t.nodes[p[2]].value.count, 0);
        assert_eq!(t.nodes[p[3]].value.mean(), 1.0);
        assert!(t.nodes[p[3]].terminal);
        // A continuation from s1 that reproduces step b feeds s1 and s2, not its own new leaf's
        // ancestors beyond.
        let q = t.insert(p[1], &[b, &[9]], 0.0);
        assert_eq!(q[1], p[2]);
        assert_eq!(t.nodes[p[1]].value.count, 1);
        assert_eq!(t.nodes[p[2]].value.count, 1);
        assert_eq!(t.nodes[p[2]].value.mean(), 0.0);
        // A sibling from the root sharing step a counts for the root and s1.
        t.insert(Tree::ROOT, &[a, &[7]], 1.0);
        assert_eq!(t.nodes[Tree::ROOT].value.count, 2);
        assert_eq!(t.nodes[p[1]].value.count, 2);
        assert_eq!(t.nodes[p[1]].value.mean(), 0.5);
        assert_eq!(t.prefix_tokens(p[2]), vec![1, 2, 3]);
        assert_eq!(t.nodes[p[2]].depth_tokens, 3);
    }

    #[test]
    fn critical_step_modes_and_ties() {
        let v = [0.5, 0.75, 0.0, 0.25, 1.0];
        assert_eq!(advantages(&v), vec![0.25, -0.75, 0.25, 0.75]);
        assert_eq!(critical_step(&v, CriticalMode::Abs), Some(1)); // |−0.75| ties 0.75: earliest
        assert_eq!(critical_step(&v, CriticalMode::Drop), Some(1));
        assert_eq!(critical_step(&v, CriticalMode::Gain), Some(3));
        assert_eq!(critical_step(&[1.0, 1.0, 1.0], CriticalMode::Abs), None);
        assert_eq!(critical_step(&[0.0], CriticalMode::Abs), None);
        assert_eq!(critical_step(&[0.0, 0.5, 1.0], CriticalMode::Abs), Some(0));
    }

    #[test]
    fn stats() {
        let mut s = ValueStats::default();
        assert!(s.mean().is_nan() && s.half_width().is_infinite());
        for r in [1.0, 0.0, 1.0, 1.0] {
            s.add(r);
        }
        assert_eq!(s.mean(), 0.75);
        assert!((s.spread() - 0.1875f64.sqrt()).abs() < 1e-12);
        assert!(!s.unanimous());
        let mut u = ValueStats::default();
        u.add(1.0);
        u.add(1.0);
        assert!(u.unanimous());
        assert!(u.half_width() > s.half_width());
    }
}
