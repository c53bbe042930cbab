//! One iteration's data: root samples, Monte-Carlo step values, critical-step resets, pairs —
//! and the budget accounting that makes modes comparable.

use super::config::{Mode, RunConfig};
use crate::engine::{Engine, GenerateRequest, Prompt, SamplingParams, Trajectory};
use crate::llama::Token;
use crate::reward::Verifier;
use crate::task::Task;
use crate::train::{Completion, Labeled, Pair};
use crate::tree::{critical_step, Tree};
use crate::Result;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Counters of one iteration (rollouts and generated tokens by purpose, critical steps, timing).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CollectStats {
    /// Prompts used.
    pub prompts: usize,
    /// Root samples.
    pub root_rollouts: u64,
    /// Tokens of root samples.
    pub root_tokens: u64,
    /// Value-estimation rollouts.
    pub value_rollouts: u64,
    /// Their tokens.
    pub value_tokens: u64,
    /// Reset continuations (online) or pair-search continuations (offline).
    pub reset_rollouts: u64,
    /// Their tokens.
    pub reset_tokens: u64,
    /// Sum of root rewards.
    pub root_reward_sum: f64,
    /// Trajectories analysed for a critical step.
    pub analysed: usize,
    /// Analysed trajectories without a critical step (all values equal).
    pub no_critical: usize,
    /// Critical-step indices (0-based step of the trajectory).
    pub critical_steps: Vec<usize>,
    /// Critical-step positions relative to the trajectory's step count, in [0, 1).
    pub critical_relative: Vec<f64>,
    /// Value rollouts not drawn because a prefix was settled (adaptive budget).
    pub saved_rollouts: u64,
    /// Wall time of all sampling.
    pub rollout_seconds: f64,
}

impl CollectStats {
    /// Every generated token, all purposes.
    pub fn total_tokens(&self) -> u64 {
        self.root_tokens + self.value_tokens + self.reset_tokens
    }

    /// Every rollout, all purposes.
    pub fn total_rollouts(&self) -> u64 {
        self.root_rollouts + self.value_rollouts + self.reset_rollouts
    }
}

/// What an iteration collected for training and export.
#[derive(Debug, Default)]
pub struct Collected {
    /// Online modes: scored completions (roots and resets).
    pub completions: Vec<Completion>,
    /// DPO/SimPO/ORPO pairs.
    pub pairs: Vec<Pair>,
    /// KTO samples.
    pub labeled: Vec<Labeled>,
    /// TRL-shaped rows: preference pairs.
    pub export_pairs: Vec<serde_json::Value>,
    /// TRL-shaped rows: labelled completions (KTO).
    pub export_kto: Vec<serde_json::Value>,
    /// Reset rollouts with their critical step and values.
    pub export_resets: Vec<serde_json::Value>,
    /// Counters.
    pub stats: CollectStats,
}

/// A stable 64-bit mix of several integers (SplitMix64 rounds), for seeds.
pub fn mix(parts: &[u64]) -> u64 {
    let mut h = 0x9E37_79B9_7F4A_7C15u64;
    for &p in parts {
        h ^= p.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(h << 6).wrapping_add(h >> 2);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

struct Scored {
    t: Trajectory,
    reward: f64,
}

/// Where rollouts come from: the engine, or a scripted policy in tests.
pub trait Rollouts {
    /// Samples every request (they may share batches); trajectories per request, in order.
    fn sample(&self, reqs: Vec<GenerateRequest>) -> Result<Vec<Vec<Trajectory>>>;
    /// Text of tokens with special tokens rendered (exports).
    fn render(&self, tokens: &[Token]) -> String;
}

impl Rollouts for Engine {
    fn sample(&self, reqs: Vec<GenerateRequest>) -> Result<Vec<Vec<Trajectory>>> {
        self.generate_many(reqs)
    }

    fn render(&self, tokens: &[Token]) -> String {
        self.model().detokenize_special(tokens)
    }
}

/// The per-iteration collector.
pub struct Collector<'a> {
    /// The policy's rollouts (the engine with its current adapter).
    pub engine: &'a dyn Rollouts,
    /// The verifier.
    pub verifier: &'a Verifier,
    /// The run.
    pub cfg: &'a RunConfig,
    /// Iteration number (seeds).
    pub iteration: usize,
}

/// One analysed root trajectory inside its prompt's tree.
struct Analysis {
    prompt: usize,
    root: usize,
    /// Token offsets b_0 = 0 … b_K = len of the prefixes s_0 … s_K.
    bounds: Vec<usize>,
    /// Tree nodes of s_0 … s_K.
    path: Vec<usize>,
    /// Continuations drawn per prefix i (value rollouts), for pair search and training.
    drawn: Vec<Vec<usize>>,
    values: Vec<f64>,
    critical: Option<usize>,
    /// Extra continuations earned by the adaptive budget.
    bonus: usize,
}

fn steps_of(t: &Trajectory) -> Vec<&[i32]> {
    t.steps.iter().map(|s| &t.tokens[s.start..s.end]).collect()
}

fn ids(v: &[i32]) -> Vec<u32> {
    v.iter().map(|&t| t as u32).collect()
}

impl Collector<'_> {
    fn sampling(&self, seed: u64) -> SamplingParams {
        let r = &self.cfg.rollout;
        SamplingParams {
            temperature: r.temperature,
            top_p: r.top_p,
            max_tokens: r.max_tokens,
            seed,
            ..Default::default()
        }
    }

    fn score(&self, task: &Task, t: Trajectory) -> Scored {
        let reward = self.verifier.score(&task.prompt, &t.text, &task.answer) as f64;
        Scored { t, reward }
    }

    /// Submits all requests at once (they share batches) and waits for all.
    fn run(&self, reqs: Vec<GenerateRequest>, stats: &mut CollectStats) -> Result<Vec<Vec<Trajectory>>> {
        let t0 = Instant::now();
        let out = self.engine.sample(reqs)?;
        stats.rollout_seconds += t0.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Collects data for `tasks` (one wave) into `out`.
    pub fn wave(&self, wave: usize, tasks: &[Task], out: &mut Collected) -> Result<()> {
        let cfg = self.cfg;
        let g = cfg.rollout.group_size;
        let st = &mut out.stats;
        st.prompts += tasks.len();
        let reqs = tasks
            .iter()
            .enumerate()
            .map(|(p, task)| {
                let mut r = GenerateRequest::new(
                    Prompt::with_system(cfg.tasks.system.as_deref(), &task.prompt),
                    g,
                    self.sampling(mix(&[cfg.seed, self.iteration as u64, wave as u64, p as u64, 1])),
                );
                r.steps = cfg.steps.clone();
                r
            })
            .collect();
        let roots: Vec<Vec<Scored>> = self
            .run(reqs, st)?
            .into_iter()
            .zip(tasks)
            .map(|(ts, task)| ts.into_iter().map(|t| self.score(task, t)).collect())
            .collect();
        for s in roots.iter().flatten() {
            st.root_rollouts += 1;
            st.root_tokens += s.t.tokens.len() as u64;
            st.root_reward_sum += s.reward;
        }
        let group =
            |p: usize, kind: u64, k: usize| mix(&[self.iteration as u64, wave as u64, p as u64, kind, k as u64]);

        match cfg.mode {
            Mode::Grpo | Mode::Ppo => {
                for (p, ss) in roots.iter().enumerate() {
                    for s in ss {
                        out.completions.push(completion(s, group(p, 0, 0), None));
                    }
                }
            }
            Mode::Dpo | Mode::Simpo | Mode::Orpo | Mode::Kto => {
                for (p, ss) in roots.iter().enumerate() {
                    self.offline_data(&tasks[p], ss.iter().collect(), out);
                }
            }
            _ => self.reset_modes(wave, tasks, roots, out)?,
        }
        Ok(())
    }

    /// Preference pairs / labelled samples from candidates that share their context.
    fn offline_data(&self, task: &Task, cands: Vec<&Scored>, out: &mut Collected) {
        let text = |t: &[i32]| self.engine.render(t);
        if self.cfg.mode == Mode::Kto || self.cfg.mode == Mode::GpoKto {
            for s in &cands {
                let desirable = s.reward >= 0.5;
                out.labeled.push(Labeled { prompt: ids(&s.t.context), completion: ids(&s.t.tokens), desirable });
                out.export_kto.push(serde_json::json!({ "prompt": text(&s.t.context), "completion": s.t.text, "label": desirable, "answer": task.answer }));
            }
            return;
        }
        let good = cands.iter().find(|s| s.reward >= 0.5);
        let bad = cands.iter().find(|s| s.reward < 0.5);
        if let (Some(c), Some(r)) = (good, bad) {
            out.pairs.push(Pair { prompt: ids(&c.t.context), chosen: ids(&c.t.tokens), rejected: ids(&r.t.tokens) });
            out.export_pairs.push(serde_json::json!({ "prompt": text(&c.t.context), "chosen": c.t.text, "rejected": r.t.text, "answer": task.answer }));
        }
    }

    fn reset_modes(&self, wave: usize, tasks: &[Task], roots: Vec<Vec<Scored>>, out: &mut Collected) -> Result<()> {
        let cfg = self.cfg;
        let n_cont = cfg.continuations();
        // The tree of each prompt holds its root samples: V(s_0) starts from the G samples.
        let mut trees: Vec<Tree> = roots
            .iter()
            .map(|ss| {
                let mut tr = Tree::new();
                for s in ss {
                    tr.insert(Tree::ROOT, &steps_of(&s.t), s.reward);
                }
                tr
            })
            .collect();
        // Choose the trajectories to analyse (≥ 2 steps preferred; failed first if asked).
        let mut analyses: Vec<Analysis> = Vec::new();
        for (p, ss) in roots.iter().enumerate() {
            let mut order: Vec<usize> = (0..ss.len()).collect();
            let key = |i: &usize| mix(&[cfg.seed, self.iteration as u64, wave as u64, p as u64, 2, *i as u64]);
            order.sort_by_key(|i| (ss[*i].t.steps.len() < 2, cfg.value.prefer_failed && ss[*i].reward >= 0.5, key(i)));
            for &i in order.iter().take(cfg.value.analyse.max(1)) {
                let t = &ss[i].t;
                let mut bounds = vec![0];
                bounds.extend(t.steps.iter().map(|s| s.end));
                // Re-walk the tree along the trajectory (it is already inserted).
                let mut path = vec![Tree::ROOT];
                let mut cur = Tree::ROOT;
                for step in steps_of(t) {
                    cur = trees[p].nodes[cur]
                        .children
                        .iter()
                        .copied()
                        .find(|&c| trees[p].nodes[c].edge == step)
                        .expect("inserted");
                    path.push(cur);
                }
                let k = bounds.len() - 1;
                analyses.push(Analysis {
                    prompt: p,
                    root: i,
                    bounds,
                    path,
                    drawn: vec![Vec::new(); k],
                    values: Vec::new(),
                    critical: None,
                    bonus: 0,
                });
            }
        }
        // Candidates drawn during value estimation, by (analysis, prefix): kept for pairs/training.
        let mut pool: Vec<Scored> = Vec::new();
        if cfg.mode.uses_values() {
            self.estimate_values(wave, tasks, &roots, &mut trees, &mut analyses, &mut pool, &mut out.stats)?;
        } else {
            // Random reset: the step is drawn uniformly; no values are estimated.
            for (a_idx, a) in analyses.iter_mut().enumerate() {
                let k = a.bounds.len() - 1;
                if k > 0 {
                    a.critical = Some(
                        (mix(&[cfg.seed, self.iteration as u64, wave as u64, a_idx as u64, 3]) % k as u64) as usize,
                    );
                }
            }
        }
        let st = &mut out.stats;
        for a in &analyses {
            st.analysed += 1;
            match a.critical {
                Some(m) => {
                    st.critical_steps.push(m);
                    st.critical_relative.push(m as f64 / (a.bounds.len() - 1) as f64);
                }
                None => st.no_critical += 1,
            }
        }
        // Roots join the training batch in their prompt groups (online modes).
        if !cfg.mode.offline() {
            for (p, ss) in roots.iter().enumerate() {
                let v0 = trees[p].nodes[Tree::ROOT].value.mean();
                for s in ss {
                    let adv = (cfg.mode == Mode::GpoPpo).then_some(s.reward - v0);
                    out.completions.push(completion(s, mix(&[self.iteration as u64, wave as u64, p as u64, 0]), adv));
                }
            }
            if cfg.train.train_on_value_rollouts {
                for (a_idx, a) in analyses.iter().enumerate() {
                    for (i, drawn) in a.drawn.iter().enumerate() {
                        let grp = mix(&[self.iteration as u64, wave as u64, a_idx as u64, 4, i as u64]);
                        for &c in drawn {
                            out.completions.push(completion(&pool[c], grp, None));
                        }
                    }
                }
            }
        }
        // Reset at the critical prefix: N continuations (plus adaptive savings).
        let mut reqs = Vec::new();
        let mut owners = Vec::new();
        for (a_idx, a) in analyses.iter().enumerate() {
            let Some(m) = a.critical else { continue };
            let parent = &roots[a.prompt][a.root].t;
            let n = if cfg.mode.offline() { n_cont.min(cfg.reset.max_tries) } else { n_cont + a.bonus };
            let seed = mix(&[cfg.seed, self.iteration as u64, wave as u64, a_idx as u64, 5]);
            let mut r = GenerateRequest::continuing(parent, a.bounds[m], n, self.sampling(seed))?;
            r.steps = cfg.steps.clone();
            reqs.push(r);
            owners.push(a_idx);
        }
        let resets = self.run(reqs, &mut out.stats)?;
        let mut per_analysis: Vec<Vec<Scored>> = (0..analyses.len()).map(|_| Vec::new()).collect();
        for (a_idx, ts) in owners.into_iter().zip(resets) {
            let a = &analyses[a_idx];
            let task = &tasks[a.prompt];
            for t in ts {
                out.stats.reset_rollouts += 1;
                out.stats.reset_tokens += t.tokens.len() as u64;
                per_analysis[a_idx].push(self.score(task, t));
            }
        }
        // Offline modes: keep drawing at the prefix until a correct and an incorrect exist.
        if cfg.mode.offline() {
            self.search_pairs(wave, tasks, &roots, &analyses, &pool, &mut per_analysis, out)?;
            return Ok(());
        }
        for (a_idx, a) in analyses.iter().enumerate() {
            let Some(m) = a.critical else { continue };
            let v_m = a.values.get(m).copied().unwrap_or(f64::NAN);
            let grp = mix(&[self.iteration as u64, wave as u64, a_idx as u64, 6]);
            for s in &per_analysis[a_idx] {
                let adv = (cfg.mode == Mode::GpoPpo).then_some(s.reward - v_m);
                out.completions.push(completion(s, grp, adv));
                out.export_resets.push(serde_json::json!({
                    "prompt": self.engine.render(&s.t.context),
                    "completion": s.t.text,
                    "reward": s.reward,
                    "critical_step": m,
                    "steps": a.bounds.len() - 1,
                    "values": a.values,
                    "answer": tasks[a.prompt].answer,
                }));
            }
        }
        Ok(())
    }

    /// Monte-Carlo values of s_0 … s_{K−1} of every analysis (V(s_K) = r), in rounds; then the
    /// critical step. Continuations feed every existing prefix they pass through.
    #[allow(clippy::too_many_arguments)]
    fn estimate_values(
        &self,
        wave: usize,
        tasks: &[Task],
        roots: &[Vec<Scored>],
        trees: &mut [Tree],
        analyses: &mut [Analysis],
        pool: &mut Vec<Scored>,
        st: &mut CollectStats,
    ) -> Result<()> {
        let v = &self.cfg.value;
        let m_full = v.rollouts;
        let settled = |tr: &Tree, node: usize, target: usize| {
            let s = tr.nodes[node].value;
            (s.count as usize) >= target
                || (v.adaptive
                    && s.count as usize >= v.adaptive_min
                    && (s.unanimous() || s.half_width() < v.adaptive_tol))
        };
        let mut round = 0;
        loop {
            // Target samples per prefix this round.
            let target = if v.adaptive { (v.adaptive_min + round).min(m_full) } else { m_full };
            let mut reqs = Vec::new();
            let mut owners = Vec::new();
            for (a_idx, a) in analyses.iter().enumerate() {
                let tr = &trees[a.prompt];
                for i in 0..a.bounds.len() - 1 {
                    let node = a.path[i];
                    if settled(tr, node, target) || (tr.nodes[node].value.count as usize) >= m_full {
                        continue;
                    }
                    let need = target.saturating_sub(tr.nodes[node].value.count as usize).max(1);
                    let parent = &roots[a.prompt][a.root].t;
                    let seed = mix(&[
                        self.cfg.seed,
                        self.iteration as u64,
                        wave as u64,
                        a_idx as u64,
                        7,
                        i as u64,
                        round as u64,
                    ]);
                    let mut r = GenerateRequest::continuing(parent, a.bounds[i], need, self.sampling(seed))?;
                    r.steps = self.cfg.steps.clone();
                    reqs.push(r);
                    owners.push((a_idx, i));
                }
            }
            if reqs.is_empty() {
                break;
            }
            let got = self.run(reqs, st)?;
            for ((a_idx, i), ts) in owners.into_iter().zip(got) {
                let a = &mut analyses[a_idx];
                let task = &tasks[a.prompt];
                for t in ts {
                    st.value_rollouts += 1;
                    st.value_tokens += t.tokens.len() as u64;
                    let s = self.score(task, t);
                    trees[a.prompt].insert(a.path[i], &steps_of(&s.t), s.reward);
                    a.drawn[i].push(pool.len());
                    pool.push(s);
                }
            }
            round += 1;
            if !v.adaptive || v.adaptive_min + round > m_full + 1 {
                break;
            }
        }
        for a in analyses.iter_mut() {
            let tr = &trees[a.prompt];
            let k = a.bounds.len() - 1;
            let mut values: Vec<f64> = (0..k).map(|i| tr.nodes[a.path[i]].value.mean()).collect();
            values.push(roots[a.prompt][a.root].reward);
            if v.adaptive {
                let saved: usize =
                    (0..k).map(|i| m_full.saturating_sub(tr.nodes[a.path[i]].value.count as usize)).sum();
                st.saved_rollouts += saved as u64;
                if self.cfg.reset.reinvest_savings {
                    a.bonus = saved;
                }
            }
            a.critical = critical_step(&values, v.critical);
            a.values = values;
        }
        Ok(())
    }

    /// Offline GPO: at each critical prefix, draw more continuations (in rounds of N, bounded by
    /// `max_tries` including the value rollouts drawn there) until one correct and one incorrect
    /// exist; then build the pair or labelled samples.
    #[allow(clippy::too_many_arguments)]
    fn search_pairs(
        &self,
        wave: usize,
        tasks: &[Task],
        roots: &[Vec<Scored>],
        analyses: &[Analysis],
        pool: &[Scored],
        found: &mut [Vec<Scored>],
        out: &mut Collected,
    ) -> Result<()> {
        let n = self.cfg.continuations();
        let mut round = 0u64;
        loop {
            let mut reqs = Vec::new();
            let mut owners = Vec::new();
            for (a_idx, a) in analyses.iter().enumerate() {
                let Some(m) = a.critical else { continue };
                let drawn_here = a.drawn.get(m).map_or(0, Vec::len);
                let tries = found[a_idx].len() + drawn_here;
                let all: Vec<f64> = found[a_idx]
                    .iter()
                    .map(|s| s.reward)
                    .chain(a.drawn.get(m).into_iter().flatten().map(|&c| pool[c].reward))
                    .collect();
                let done = all.iter().any(|&r| r >= 0.5) && all.iter().any(|&r| r < 0.5);
                if done || tries >= self.cfg.reset.max_tries {
                    continue;
                }
                let k = n.min(self.cfg.reset.max_tries - tries);
                let seed = mix(&[self.cfg.seed, self.iteration as u64, wave as u64, a_idx as u64, 8, round]);
                let mut r =
                    GenerateRequest::continuing(&roots[a.prompt][a.root].t, a.bounds[m], k, self.sampling(seed))?;
                r.steps = self.cfg.steps.clone();
                reqs.push(r);
                owners.push(a_idx);
            }
            if reqs.is_empty() {
                break;
            }
            for (a_idx, ts) in owners.into_iter().zip(self.run(reqs, &mut out.stats)?) {
                for t in ts {
                    out.stats.reset_rollouts += 1;
                    out.stats.reset_tokens += t.tokens.len() as u64;
                    found[a_idx].push(self.score(&tasks[analyses[a_idx].prompt], t));
                }
            }
            round += 1;
        }
        for (a_idx, a) in analyses.iter().enumerate() {
            let Some(m) = a.critical else { continue };
            let cands: Vec<&Scored> =
                a.drawn.get(m).into_iter().flatten().map(|&c| &pool[c]).chain(found[a_idx].iter()).collect();
            self.offline_data(&tasks[a.prompt], cands, out);
        }
        Ok(())
    }
}

fn completion(s: &Scored, group: u64, advantage: Option<f64>) -> Completion {
    Completion {
        prompt: ids(&s.t.context),
        completion: ids(&s.t.tokens),
        behaviour_logprobs: Some(s.t.logprobs.clone()),
        reward: s.reward,
        advantage,
        group,
    }
}
