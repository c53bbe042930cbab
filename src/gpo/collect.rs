//! One iteration's data: root samples, the critical-step search, resets, and the training data
//! of the whole tree — with the budget accounting that makes modes comparable.
//!
//! Every sampled continuation belongs to the group of the prefix (tree node) it was sampled
//! from: roots to the prompt's group, probe rollouts and resets to the node they were forked at
//! (so the probes and the resets at the critical prefix form one group). Online modes train on
//! every group with a learning signal (GRPO: rewards normalised within the group; PPO:
//! r − V(prefix); optionally + w·(r − V(root))); offline modes pair every correct with every
//! incorrect sample of a group. Groups without a signal are counted, not trained.

use super::config::{Gate, Mode, RunConfig};
use super::values::{self, Analysis, Probe, ProbeHost};
use crate::engine::{Engine, GenerateRequest, Prompt, SamplingParams, Trajectory};
use crate::llama::Token;
use crate::reward::Verifier;
use crate::task::Task;
use crate::train::{Completion, Labeled, Pair};
use crate::tree::Tree;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

/// Counters of one iteration: rollouts and generated tokens by purpose, what was trained on,
/// the search, timing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CollectStats {
    /// Prompts used.
    pub prompts: usize,
    /// Root samples.
    pub root_rollouts: u64,
    /// Tokens of root samples.
    pub root_tokens: u64,
    /// Probe (value-estimation) rollouts.
    pub value_rollouts: u64,
    /// Their tokens.
    pub value_tokens: u64,
    /// Reset continuations (online) or pair-search continuations (offline).
    pub reset_rollouts: u64,
    /// Their tokens.
    pub reset_tokens: u64,
    /// Sum of root rewards.
    pub root_reward_sum: f64,
    /// Root samples with reward ≥ 0.5.
    pub root_correct: u64,
    /// Prompts not analysed because their root group was not mixed (`value.gate = "mixed"`).
    pub gated: usize,
    /// Trajectories analysed for a critical step.
    pub analysed: usize,
    /// Analysed trajectories without a critical step (no change in the rule's direction).
    pub no_critical: usize,
    /// Analyses stopped by the token budget before they finished.
    pub cut: usize,
    /// Probes issued (requests of M continuations at one prefix).
    pub probes: u64,
    /// Critical-step indices (0-based step of the trajectory).
    pub critical_steps: Vec<usize>,
    /// Critical-step positions relative to the trajectory's step count, in [0, 1).
    pub critical_relative: Vec<f64>,
    /// Value rollouts not drawn because a prefix was settled (adaptive budget).
    pub saved_rollouts: u64,
    /// Groups of samples that share a prefix (trained or not).
    pub groups: u64,
    /// Groups without a learning signal (all advantages zero / no correct-incorrect pair).
    pub zero_signal_groups: u64,
    /// Generated tokens in the training batch, by purpose.
    pub trained_root_tokens: u64,
    /// See `trained_root_tokens`.
    pub trained_value_tokens: u64,
    /// See `trained_root_tokens`.
    pub trained_reset_tokens: u64,
    /// Tokens of samples in groups without a signal.
    pub zero_signal_tokens: u64,
    /// Tokens the configuration leaves out of training (probes with
    /// `train.train_on_value_rollouts = false`).
    pub untrained_tokens: u64,
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

    /// Generated tokens in the training batch.
    pub fn trained_tokens(&self) -> u64 {
        self.trained_root_tokens + self.trained_value_tokens + self.trained_reset_tokens
    }
}

/// What an iteration collected for training and export.
#[derive(Debug, Default)]
pub struct Collected {
    /// Online modes: scored completions with explicit advantages (groups with a signal only).
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

/// Why a sample was drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A root sample of the prompt.
    Root,
    /// A probe (value-estimation) rollout.
    Probe,
    /// A continuation at the critical prefix.
    Reset,
}

/// A scored sample inside its prompt's tree.
struct Sample {
    t: Trajectory,
    reward: f64,
    prompt: usize,
    /// Tree node it was sampled from (its group).
    node: usize,
    purpose: Purpose,
    /// The analysis it belongs to (probes and resets).
    analysis: Option<usize>,
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
    /// Generated tokens this iteration may spend (None: one wave, no limit inside it). A wave
    /// always samples its roots; a probe or reset is admitted only while the tokens spent plus
    /// the most its admitted rollouts can cost stay below the budget, so the overspend is at most
    /// one probe (or one root wave).
    pub budget: Option<u64>,
}

fn ids(v: &[i32]) -> Vec<u32> {
    v.iter().map(|&t| t as u32).collect()
}

/// The search's view of the collector: requests, timed sampling, scoring, budget.
struct LoopHost<'c, 'a> {
    c: &'c Collector<'a>,
    wave: usize,
    tasks: &'c [Task],
    parents: Vec<&'c Trajectory>,
    /// Prompt index of each analysis.
    prompts: Vec<usize>,
    stats: &'c mut CollectStats,
}

impl ProbeHost for LoopHost<'_, '_> {
    fn request(&self, analyses: &[Analysis], p: &Probe) -> Result<GenerateRequest> {
        let c = self.c;
        let seed = mix(&[
            c.cfg.seed,
            c.iteration as u64,
            self.wave as u64,
            p.analysis as u64,
            7,
            p.prefix as u64,
            p.round as u64,
        ]);
        let mut r = GenerateRequest::continuing(
            self.parents[p.analysis],
            analyses[p.analysis].bounds[p.prefix],
            p.n,
            c.sampling(seed),
        )?;
        r.steps = c.cfg.steps.clone();
        Ok(r)
    }

    fn sample(&mut self, reqs: Vec<GenerateRequest>) -> Result<Vec<Vec<Trajectory>>> {
        self.c.run(reqs, self.stats)
    }

    fn score(&mut self, analysis: usize, t: &Trajectory) -> Result<f64> {
        self.stats.value_rollouts += 1;
        self.stats.value_tokens += t.tokens.len() as u64;
        Ok(self.c.reward(&self.tasks[self.prompts[analysis]], t))
    }

    fn admit(&mut self, probe: &Probe, pending: usize) -> bool {
        self.c.admits(self.stats, pending, probe.n)
    }
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

    fn reward(&self, task: &Task, t: &Trajectory) -> f64 {
        self.verifier.score(&task.prompt, &t.text, &task.answer) as f64
    }

    /// Whether the budget admits `n` more probe or reset rollouts on top of `pending` admitted
    /// in this round: the iteration's budget (which the last admitted request may overrun), and
    /// the share of it that analyses may spend (which none may).
    fn admits(&self, st: &CollectStats, pending: usize, n: usize) -> bool {
        let mt = self.cfg.rollout.max_tokens;
        self.budget.is_none_or(|b| {
            st.total_tokens() + ((pending * mt) as u64) < b && self.within_share(st, ((pending + n) * mt) as u64, b)
        })
    }

    /// Whether analyses' tokens (probes and resets) plus `pending` stay within `value.share` of
    /// budget `b`.
    fn within_share(&self, st: &CollectStats, pending: u64, b: u64) -> bool {
        (st.value_tokens + st.reset_tokens + pending) as f64 <= self.cfg.value.share * b as f64
    }

    /// Submits all requests at once (they share batches) and waits for all.
    fn run(&self, reqs: Vec<GenerateRequest>, stats: &mut CollectStats) -> Result<Vec<Vec<Trajectory>>> {
        let t0 = Instant::now();
        let out = self.engine.sample(reqs)?;
        stats.rollout_seconds += t0.elapsed().as_secs_f64();
        Ok(out)
    }

    /// One iteration: waves of `rollout.prompts` tasks (from `next_tasks`) until the budget is
    /// spent (one wave without a budget). `stop` is asked between waves; true abandons the
    /// iteration with [`Error::Cancelled`].
    pub fn iteration(
        &self,
        next_tasks: &mut dyn FnMut() -> Vec<Task>,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<Collected> {
        let mut out = Collected::default();
        let mut wave = 0;
        loop {
            let tasks = next_tasks();
            self.wave(wave, &tasks, &mut out)?;
            wave += 1;
            if stop() {
                return Err(Error::Cancelled);
            }
            if self.budget.is_none_or(|b| out.stats.total_tokens() >= b) {
                return Ok(out);
            }
        }
    }

    /// Collects data for `tasks` (one wave) into `out`.
    pub fn wave(&self, wave: usize, tasks: &[Task], out: &mut Collected) -> Result<()> {
        let cfg = self.cfg;
        let g = cfg.rollout.group_size;
        out.stats.prompts += tasks.len();
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
        let mut trees: Vec<Tree> = (0..tasks.len()).map(|_| Tree::new()).collect();
        let mut samples = Vec::new();
        for (p, ts) in self.run(reqs, &mut out.stats)?.into_iter().enumerate() {
            for t in ts {
                let reward = self.reward(&tasks[p], &t);
                let st = &mut out.stats;
                st.root_rollouts += 1;
                st.root_tokens += t.tokens.len() as u64;
                st.root_reward_sum += reward;
                st.root_correct += u64::from(reward >= 0.5);
                trees[p].insert(Tree::ROOT, &t.step_tokens(), reward);
                samples.push(Sample { t, reward, prompt: p, node: Tree::ROOT, purpose: Purpose::Root, analysis: None });
            }
        }
        let analyses = if cfg.mode.uses_values() || cfg.mode == Mode::RandomReset {
            self.analyse_and_reset(wave, tasks, &mut trees, &mut samples, out)?
        } else {
            Vec::new()
        };
        self.emit(wave, tasks, &trees, &analyses, samples, out);
        Ok(())
    }

    /// Chooses the trajectories to analyse, searches their critical steps (or draws one, for
    /// random reset) and samples the resets; probes and resets join `samples`.
    fn analyse_and_reset(
        &self,
        wave: usize,
        tasks: &[Task],
        trees: &mut [Tree],
        samples: &mut Vec<Sample>,
        out: &mut Collected,
    ) -> Result<Vec<Analysis>> {
        let cfg = self.cfg;
        let (it, w) = (self.iteration as u64, wave as u64);
        // The analyses' share of the budget cannot pay for one more probe: roots only from here.
        let probe = (cfg.value.rollouts.max(cfg.continuations()).max(1) * cfg.rollout.max_tokens) as u64;
        if self.budget.is_some_and(|b| cfg.value.share < 1.0 && !self.within_share(&out.stats, probe, b)) {
            return Ok(Vec::new());
        }
        // Roots by prompt, as sample indices.
        let mut by_prompt: Vec<Vec<usize>> = vec![Vec::new(); tasks.len()];
        for (i, s) in samples.iter().enumerate() {
            by_prompt[s.prompt].push(i);
        }
        let mut analyses = Vec::new();
        let mut parents: Vec<Trajectory> = Vec::new();
        for (p, roots) in by_prompt.iter().enumerate() {
            let (lo, hi) = roots.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &i| {
                (lo.min(samples[i].reward), hi.max(samples[i].reward))
            });
            if cfg.mode.uses_values() && cfg.value.gate == Gate::Mixed && hi - lo <= 1e-12 {
                out.stats.gated += 1;
                continue;
            }
            let mut order: Vec<usize> = roots.iter().copied().filter(|&i| samples[i].t.steps.len() >= 2).collect();
            let prefer_failed = cfg.value.prefer_failed && cfg.mode != Mode::RandomReset;
            order.sort_by_key(|&i| {
                (prefer_failed && samples[i].reward >= 0.5, mix(&[cfg.seed, it, w, p as u64, 2, i as u64]))
            });
            for &i in order.iter().take(cfg.value.analyse.max(1)) {
                let s = &samples[i];
                analyses.push(Analysis::new(p, &trees[p], Tree::ROOT, &s.t, s.reward, cfg.value.critical));
                parents.push(s.t.clone());
            }
        }
        if cfg.mode.uses_values() {
            let mut host = LoopHost {
                c: self,
                wave,
                tasks,
                parents: parents.iter().collect(),
                prompts: analyses.iter().map(|a| a.tree).collect(),
                stats: &mut out.stats,
            };
            let drawn = values::search(&mut host, trees, &mut analyses, &cfg.value.search_config())?;
            for d in drawn {
                let a = &analyses[d.analysis];
                samples.push(Sample {
                    t: d.traj,
                    reward: d.reward,
                    prompt: a.tree,
                    node: a.path[d.prefix],
                    purpose: Purpose::Probe,
                    analysis: Some(d.analysis),
                });
            }
        } else {
            for (a_idx, a) in analyses.iter_mut().enumerate() {
                a.critical = Some((mix(&[cfg.seed, it, w, a_idx as u64, 3]) % a.steps() as u64) as usize);
            }
        }
        let st = &mut out.stats;
        for a in &analyses {
            st.analysed += 1;
            st.probes += a.probes as u64;
            st.saved_rollouts += a.saved as u64;
            st.cut += usize::from(a.cut);
            match a.critical {
                Some(m) => {
                    st.critical_steps.push(m);
                    st.critical_relative.push(m as f64 / a.steps() as f64);
                }
                None if !a.cut => st.no_critical += 1,
                None => {}
            }
        }
        self.resets(wave, tasks, &analyses, &parents, trees, samples, out)?;
        Ok(analyses)
    }

    /// Continuations at every critical prefix: N (plus the adaptive savings) online; offline,
    /// rounds of N until the prefix's group holds a correct and an incorrect sample (at most
    /// `reset.max_tries` there, the probes included).
    #[allow(clippy::too_many_arguments)]
    fn resets(
        &self,
        wave: usize,
        tasks: &[Task],
        analyses: &[Analysis],
        parents: &[Trajectory],
        trees: &mut [Tree],
        samples: &mut Vec<Sample>,
        out: &mut Collected,
    ) -> Result<()> {
        let cfg = self.cfg;
        let n = cfg.continuations();
        let offline = cfg.mode.offline();
        for round in 0u64.. {
            let mut reqs = Vec::new();
            let mut owners = Vec::new();
            let mut pending = 0;
            for (a_idx, a) in analyses.iter().enumerate() {
                let Some(m) = a.critical else { continue };
                let k = if offline {
                    let here: Vec<f64> = samples
                        .iter()
                        .filter(|s| s.analysis == Some(a_idx) && s.node == a.path[m])
                        .map(|s| s.reward)
                        .collect();
                    let done = here.iter().any(|&r| r >= 0.5) && here.iter().any(|&r| r < 0.5);
                    if done || here.len() >= cfg.reset.max_tries {
                        continue;
                    }
                    n.min(cfg.reset.max_tries - here.len())
                } else if round == 0 {
                    n + if cfg.reset.reinvest_savings { a.saved } else { 0 }
                } else {
                    continue;
                };
                if !self.admits(&out.stats, pending, k) {
                    continue;
                }
                pending += k;
                let seed = mix(&[cfg.seed, self.iteration as u64, wave as u64, a_idx as u64, 5, round]);
                let mut r = GenerateRequest::continuing(&parents[a_idx], a.bounds[m], k, self.sampling(seed))?;
                r.steps = cfg.steps.clone();
                reqs.push(r);
                owners.push(a_idx);
            }
            if reqs.is_empty() {
                return Ok(());
            }
            for (a_idx, ts) in owners.into_iter().zip(self.run(reqs, &mut out.stats)?) {
                let a = &analyses[a_idx];
                let m = a.critical.expect("reset only at a critical step");
                for t in ts {
                    let reward = self.reward(&tasks[a.tree], &t);
                    out.stats.reset_rollouts += 1;
                    out.stats.reset_tokens += t.tokens.len() as u64;
                    trees[a.tree].insert(a.path[m], &t.step_tokens(), reward);
                    samples.push(Sample {
                        t,
                        reward,
                        prompt: a.tree,
                        node: a.path[m],
                        purpose: Purpose::Reset,
                        analysis: Some(a_idx),
                    });
                }
            }
        }
        Ok(())
    }

    /// Turns the wave's samples into training data, group by group, and counts where every
    /// token went.
    fn emit(
        &self,
        wave: usize,
        tasks: &[Task],
        trees: &[Tree],
        analyses: &[Analysis],
        samples: Vec<Sample>,
        out: &mut Collected,
    ) {
        let cfg = self.cfg;
        let text = |t: &[i32]| self.engine.render(t);
        for s in samples.iter().filter(|s| s.purpose == Purpose::Reset) {
            let a = &analyses[s.analysis.expect("resets belong to an analysis")];
            out.export_resets.push(serde_json::json!({
                "prompt": text(&s.t.context),
                "completion": s.t.text,
                "reward": s.reward,
                "critical_step": a.critical,
                "steps": a.steps(),
                "values": a.values,
                "answer": tasks[s.prompt].answer,
            }));
        }
        // Groups: samples drawn from the same prefix of the same prompt.
        let mut groups: BTreeMap<(usize, usize), Vec<&Sample>> = BTreeMap::new();
        // Without tree-wide training, probes stay out of the batch, except (offline) those at the
        // critical prefix, which the pair search there drew from.
        let at_critical = |s: &Sample| {
            s.analysis.is_some_and(|a| analyses[a].critical.is_some_and(|m| analyses[a].path[m] == s.node))
        };
        for s in &samples {
            if s.purpose == Purpose::Probe
                && !cfg.train.train_on_value_rollouts
                && !(cfg.mode.offline() && at_critical(s))
            {
                out.stats.untrained_tokens += s.t.tokens.len() as u64;
                continue;
            }
            groups.entry((s.prompt, s.node)).or_default().push(s);
        }
        let st = &mut out.stats;
        let count = |st: &mut CollectStats, s: &Sample, trained: bool| {
            let n = s.t.tokens.len() as u64;
            if !trained {
                st.zero_signal_tokens += n;
                return;
            }
            match s.purpose {
                Purpose::Root => st.trained_root_tokens += n,
                Purpose::Probe => st.trained_value_tokens += n,
                Purpose::Reset => st.trained_reset_tokens += n,
            }
        };
        for ((p, node), members) in groups {
            st.groups += 1;
            let group_id = mix(&[self.iteration as u64, wave as u64, p as u64, node as u64]);
            if matches!(cfg.mode, Mode::Kto | Mode::GpoKto) {
                for s in &members {
                    let desirable = s.reward >= 0.5;
                    out.labeled.push(Labeled { prompt: ids(&s.t.context), completion: ids(&s.t.tokens), desirable });
                    out.export_kto.push(serde_json::json!({ "prompt": text(&s.t.context), "completion": s.t.text, "label": desirable, "answer": tasks[p].answer }));
                    count(st, s, true);
                }
            } else if cfg.mode.offline() {
                let good: Vec<&&Sample> = members.iter().filter(|s| s.reward >= 0.5).collect();
                let bad: Vec<&&Sample> = members.iter().filter(|s| s.reward < 0.5).collect();
                let paired = !good.is_empty() && !bad.is_empty();
                st.zero_signal_groups += u64::from(!paired);
                for s in &members {
                    count(st, s, paired);
                }
                for c in &good {
                    for r in &bad {
                        out.pairs.push(Pair {
                            prompt: ids(&c.t.context),
                            chosen: ids(&c.t.tokens),
                            rejected: ids(&r.t.tokens),
                        });
                        out.export_pairs.push(serde_json::json!({ "prompt": text(&c.t.context), "chosen": c.t.text, "rejected": r.t.text, "answer": tasks[p].answer }));
                    }
                }
            } else {
                let adv = self.advantages(&trees[p], node, &members);
                let signal = adv.iter().any(|a| a.abs() > 1e-12);
                st.zero_signal_groups += u64::from(!signal);
                for (s, a) in members.iter().zip(adv) {
                    count(st, s, signal);
                    if signal {
                        out.completions.push(Completion {
                            prompt: ids(&s.t.context),
                            completion: ids(&s.t.tokens),
                            behaviour_logprobs: Some(s.t.logprobs.clone()),
                            reward: s.reward,
                            advantage: Some(a),
                            group: group_id,
                        });
                    }
                }
            }
        }
    }

    /// Advantages of one group sampled from `node`: GRPO normalises rewards within the group,
    /// PPO takes r − V(node); the root term adds w·(r − V(root)).
    fn advantages(&self, tree: &Tree, node: usize, members: &[&Sample]) -> Vec<f64> {
        let rewards: Vec<f64> = members.iter().map(|s| s.reward).collect();
        let mut adv = match self.cfg.mode {
            Mode::GpoPpo | Mode::Ppo => {
                let v = tree.nodes[node].value.mean();
                rewards.iter().map(|r| r - v).collect()
            }
            _ => crate::train::loss::group_advantages(&rewards, &vec![0; rewards.len()], 1e-4),
        };
        let w = self.cfg.train.root_term;
        if w > 0.0 {
            let v_root = tree.nodes[Tree::ROOT].value.mean();
            for (a, r) in adv.iter_mut().zip(&rewards) {
                *a += w * (r - v_root);
            }
        }
        adv
    }
}
