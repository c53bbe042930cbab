//! The critical-step search and tree-wide training on a deterministic policy whose values are
//! known by hand: bisection's probes, groups, advantages, the mixed-group gate, the shared value
//! estimator and the token budget of every mode.

use gpo::engine::{GenerateRequest, Prompt, SamplingParams, StepConfig, Trajectory};
use gpo::gpo::collect::{Collected, Collector, Rollouts};
use gpo::gpo::config::Gate;
use gpo::gpo::values::{estimate, Search, SearchConfig};
use gpo::gpo::RunConfig;
use gpo::reward::{Verifier, VerifierConfig};
use gpo::task::Task;
use gpo::tree::CriticalMode;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

mod common;

use common::{script_context, script_trajectory, SCRIPT_NL as NL, SCRIPT_PROMPT as PROMPT};
/// Steps of every trajectory (the last is the answer).
const K: usize = 8;
/// The step at which a trajectory may fall off the cliff.
const CLIFF: usize = 2;

/// A deterministic policy: K steps of two tokens (a state token, a newline). A trajectory is
/// alive until step CLIFF, where sample j of a request of n (u = (j + ½)/n) dies when
/// u ≥ `survive`; dead stays dead; the answer is correct iff alive at the end. State tokens are
/// unique (2·id + alive), so no two samples share a tree node below the one they were forked at.
/// Hence, for requests of 4 and survive = ½: V(alive prefix before or at the cliff) = ½,
/// V(alive after it) = 1, V(dead) = 0, exactly.
struct Cliff {
    survive: f64,
    next: AtomicI32,
}

impl Cliff {
    fn new(survive: f64) -> Cliff {
        Cliff { survive, next: AtomicI32::new(1000) }
    }

    fn one(&self, context: Arc<Vec<i32>>, prompt_len: usize, u: f64) -> Trajectory {
        let done: Vec<i32> = context[prompt_len..].chunks(2).map(|c| c[0]).collect();
        let mut alive = done.last().is_none_or(|t| t % 2 == 1);
        let mut tokens = Vec::new();
        for d in done.len()..K {
            if d == CLIFF && u >= self.survive {
                alive = false;
            }
            tokens.extend([2 * self.next.fetch_add(1, Ordering::Relaxed) + i32::from(alive), NL]);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) as u64;
        script_trajectory(id, context, prompt_len, tokens, format!("steps\nAnswer: {}", i32::from(alive)))
    }
}

impl Rollouts for Cliff {
    fn sample(&self, reqs: Vec<GenerateRequest>) -> gpo::Result<Vec<Vec<Trajectory>>> {
        Ok(reqs
            .into_iter()
            .map(|r| {
                let (context, prompt_len) = script_context(&r);
                (0..r.n).map(|j| self.one(context.clone(), prompt_len, (j as f64 + 0.5) / r.n as f64)).collect()
            })
            .collect())
    }

    fn render(&self, tokens: &[i32]) -> String {
        format!("{tokens:?}")
    }
}

/// The new defaults, one prompt of G = 4, M = N = 4.
fn cfg(mode: &str) -> RunConfig {
    let mut c: RunConfig =
        toml::from_str(&format!("mode = \"{mode}\"\niterations = 1\noutput = \"/tmp/unused\"\n")).unwrap();
    c.rollout.prompts = 1;
    c.rollout.group_size = 4;
    c.rollout.max_tokens = 2 * K;
    c.value.rollouts = 4;
    c.reset.continuations = Some(4);
    c.validate().unwrap();
    c
}

fn task() -> Task {
    Task { prompt: "q".into(), answer: "1".into() }
}

fn wave(policy: &Cliff, cfg: &RunConfig) -> Collected {
    let verifier = Verifier::new(&VerifierConfig::Numeric).unwrap();
    let c = Collector { engine: policy, verifier: &verifier, cfg, iteration: 0, budget: None };
    let mut out = Collected::default();
    c.wave(0, &[task()], &mut out).unwrap();
    out
}

/// Completions by group: (prompt length, rewards, advantages), in prompt-length order.
fn groups(out: &Collected) -> Vec<(usize, Vec<f64>, Vec<f64>)> {
    let mut g: BTreeMap<u64, (usize, Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for c in &out.completions {
        let e = g.entry(c.group).or_insert((c.prompt.len(), Vec::new(), Vec::new()));
        assert_eq!(e.0, c.prompt.len(), "a group shares its prefix");
        e.1.push(c.reward);
        e.2.push(c.advantage.expect("the loop gives explicit advantages"));
    }
    let mut v: Vec<_> = g.into_values().collect();
    v.sort_by_key(|a| a.0);
    v
}

#[test]
fn bisection_finds_the_cliff_in_three_probes_and_every_rollout_is_accounted_for() {
    let out = wave(&Cliff::new(0.5), &cfg("gpo"));
    let st = &out.stats;
    // Roots: u = ⅛, ⅜ survive, ⅝, ⅞ die at the cliff: a mixed group, p̂ = ½.
    assert_eq!((st.root_rollouts, st.root_correct, st.gated), (4, 2, 0));
    // A failed root is analysed with `drop`: V = [½ ½ ½ 0 0 0 0 0 | r = 0]. Bisection: s4 (0) →
    // keep [0, 4]; s2 (½) → keep [2, 4]; s3 (0) → keep [2, 3]: the cliff, step 2, in 3 probes.
    assert_eq!(st.analysed, 1);
    assert_eq!(st.probes, 3);
    assert_eq!(st.critical_steps, vec![CLIFF]);
    assert_eq!(st.value_rollouts, 12);
    assert_eq!(st.reset_rollouts, 4);
    let resets: Vec<f64> = out.export_resets.iter().map(|r| r["reward"].as_f64().unwrap()).collect();
    assert_eq!(resets, vec![1.0, 1.0, 0.0, 0.0]);
    let values: Vec<Option<f64>> = serde_json::from_value(out.export_resets[0]["values"].clone()).unwrap();
    assert_eq!(values, vec![Some(0.5), None, Some(0.5), Some(0.0), Some(0.0), None, None, None, Some(0.0)]);
    // Groups: the roots (prompt: 1 token); the probes at s2 with the resets there (8 samples,
    // prompt + 2 steps); s3 and s4 (all dead: no signal, counted, not trained).
    let g = groups(&out);
    let a = 0.5 / (0.5 + 1e-4);
    assert_eq!(g.len(), 2, "{g:?}");
    assert_eq!(g[0], (1, vec![1.0, 1.0, 0.0, 0.0], vec![a, a, -a, -a]));
    assert_eq!(g[1].0, 1 + 2 * CLIFF);
    assert_eq!(g[1].1, vec![1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
    assert_eq!(g[1].2, vec![a, a, -a, -a, a, a, -a, -a]);
    assert_eq!((st.groups, st.zero_signal_groups), (4, 2));
    // Tokens: a continuation from s_i writes 2(K − i). Roots 4·16, s4 4·8, s2 4·12 (+ resets
    // 4·12), s3 4·10.
    assert_eq!(st.root_tokens, 64);
    assert_eq!(st.value_tokens, 32 + 48 + 40);
    assert_eq!(st.reset_tokens, 48);
    assert_eq!((st.trained_root_tokens, st.trained_value_tokens, st.trained_reset_tokens), (64, 48, 48));
    assert_eq!(st.zero_signal_tokens, 32 + 40);
    assert_eq!(st.untrained_tokens, 0);
    // Every generated token is trained on or sits in a counted zero-signal group.
    assert_eq!(st.trained_tokens() + st.zero_signal_tokens, st.total_tokens());
    let batch: u64 = out.completions.iter().map(|c| c.completion.len() as u64).sum();
    assert_eq!(batch, st.trained_tokens());
}

#[test]
fn the_dense_search_probes_every_step_and_agrees() {
    let mut c = cfg("gpo");
    c.value.search = Search::Dense;
    let out = wave(&Cliff::new(0.5), &c);
    // s0 already holds the 4 roots; s1 … s7 need a probe each.
    assert_eq!(out.stats.probes, 7);
    assert_eq!(out.stats.critical_steps, vec![CLIFF]);
    let values: Vec<f64> = serde_json::from_value(out.export_resets[0]["values"].clone()).unwrap();
    assert_eq!(values, vec![0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
}

#[test]
fn auto_takes_drop_for_failed_and_gain_for_correct_trajectories() {
    let mut c = cfg("gpo");
    c.value.analyse = 4; // all four roots: two failed, two correct
    let out = wave(&Cliff::new(0.5), &c);
    // Correct: V = [½ ½ ½ 1 1 1 1 1 | 1]: the gain is at the cliff too; 3 probes each.
    assert_eq!(out.stats.critical_steps, vec![CLIFF; 4]);
    assert_eq!(out.stats.probes, 12);
    // `abs` on the same values finds the same step; `gain` on a failed trajectory finds none.
    c.value.analyse = 1;
    c.value.critical = CriticalMode::Gain;
    let none = wave(&Cliff::new(0.5), &c);
    assert_eq!((none.stats.analysed, none.stats.no_critical, none.stats.probes), (1, 1, 0));
    assert_eq!(none.stats.reset_rollouts, 0);
}

#[test]
fn ppo_advantages_are_taken_against_the_node_and_the_root_term_adds_to_them() {
    let out = wave(&Cliff::new(0.5), &cfg("gpo-ppo"));
    let g = groups(&out);
    // V(root) = ½ from the four roots; V(s2) = ½ from its 4 probes and 4 resets.
    assert_eq!(g[0].2, vec![0.5, 0.5, -0.5, -0.5]);
    assert_eq!(g[1].2, vec![0.5, 0.5, -0.5, -0.5, 0.5, 0.5, -0.5, -0.5]);
    let mut c = cfg("gpo-ppo");
    c.train.root_term = 1.0;
    let g = groups(&wave(&Cliff::new(0.5), &c));
    // + (r − V(root)) = ±½: the root group doubles; so do the samples at s2 (same V).
    assert_eq!(g[0].2, vec![1.0, 1.0, -1.0, -1.0]);
    // The all-dead groups at s3 and s4 gain a signal against the root: −½ each.
    assert_eq!(g.len(), 4, "{g:?}");
    assert!(g.iter().filter(|x| x.1.iter().all(|&r| r == 0.0)).all(|x| x.2.iter().all(|&a| a == -0.5)));
}

#[test]
fn the_paper_recipe_trains_resets_only_and_counts_the_rest() {
    let mut c = cfg("gpo");
    c.value.search = Search::Dense;
    c.train.train_on_value_rollouts = false;
    let out = wave(&Cliff::new(0.5), &c);
    let st = &out.stats;
    assert_eq!(st.trained_value_tokens, 0);
    assert_eq!(st.untrained_tokens, st.value_tokens);
    // The resets at s2 form their own group of 4 there (the probes are left out).
    let g = groups(&out);
    assert_eq!(g[1].1, vec![1.0, 1.0, 0.0, 0.0]);
}

#[test]
fn mixed_gating_skips_prompts_whose_roots_all_agree() {
    for survive in [0.0, 1.0] {
        // All die (all wrong) or all survive (all right): no step can matter to GRPO here.
        let out = wave(&Cliff::new(survive), &cfg("gpo"));
        let st = &out.stats;
        assert_eq!((st.gated, st.analysed, st.probes, st.reset_rollouts), (1, 0, 0, 0), "survive {survive}");
        assert!(out.completions.is_empty());
        assert_eq!(st.zero_signal_tokens, st.total_tokens());
        // The paper's gate analyses them anyway (and, all values equal, finds nothing).
        let mut any = cfg("gpo");
        any.value.gate = Gate::Any;
        any.value.search = Search::Dense;
        let st = wave(&Cliff::new(survive), &any).stats;
        assert_eq!((st.gated, st.analysed, st.no_critical), (0, 1, 1));
        assert!(st.probes > 0);
    }
}

#[test]
fn offline_modes_pair_every_correct_with_every_incorrect_sample_of_a_prefix() {
    let out = wave(&Cliff::new(0.5), &cfg("gpo-dpo"));
    // Root group 2 × 2 = 4 pairs at the prompt; s2's probes already hold 2 correct and 2
    // incorrect, so the pair search draws no resets there: 2 × 2 = 4 pairs at the critical prefix.
    let at_root = out.pairs.iter().filter(|p| p.prompt.len() == 1).count();
    let at_cliff = out.pairs.iter().filter(|p| p.prompt.len() == 1 + 2 * CLIFF).count();
    assert_eq!((at_root, at_cliff, out.pairs.len()), (4, 4, 8));
    assert_eq!(out.stats.reset_rollouts, 0);
    assert_eq!(out.stats.zero_signal_groups, 2);
    let kto = wave(&Cliff::new(0.5), &cfg("gpo-kto"));
    assert_eq!(kto.labeled.len() as u64, kto.stats.total_rollouts(), "every rollout is a labelled sample");
}

#[test]
fn one_estimator_serves_the_c_abi_and_gpod() {
    let policy = Cliff::new(0.5);
    // A failed trajectory: the third of four root samples.
    let mut r = GenerateRequest::new(Prompt::Tokens(vec![PROMPT]), 4, SamplingParams::default());
    r.prompt_len = Some(1);
    let failed = policy.sample(vec![r]).unwrap().remove(0).remove(2);
    let verifier = Verifier::new(&VerifierConfig::Numeric).unwrap();
    let mut score = |t: &Trajectory| Ok(verifier.score("q", &t.text, "1") as f64);
    let sp = SamplingParams::default();
    let steps = StepConfig::default();
    let dense =
        estimate(&policy, &failed, &SearchConfig::dense(4), &sp, &steps, CriticalMode::Abs, &mut score).unwrap();
    // No roots here: s0 is probed too (K = 8 probes of 4).
    assert_eq!(dense.values, vec![0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    assert_eq!(dense.advantages, vec![0.0, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0]);
    assert_eq!((dense.critical, dense.probes, dense.rollouts), (Some(CLIFF), 8, 32));
    assert_eq!(dense.counts, vec![4, 4, 4, 4, 4, 4, 4, 4, 1]);
    let bisect = SearchConfig { search: Search::Bisect, ..SearchConfig::dense(4) };
    let b = estimate(&policy, &failed, &bisect, &sp, &steps, CriticalMode::Auto, &mut score).unwrap();
    // s0, then s4, s2, s3.
    assert_eq!((b.critical, b.probes, b.rollouts), (Some(CLIFF), 4, 16));
    assert_eq!(b.counts, vec![4, 0, 4, 4, 4, 0, 0, 0, 1]);
}

/// Tokens an iteration may overspend: one probe, one reset, or one root wave at most.
fn slack(c: &RunConfig) -> u64 {
    let unit = c.value.rollouts.max(c.continuations()).max(c.rollout.prompts * c.rollout.group_size);
    (unit * c.rollout.max_tokens) as u64
}

#[test]
fn no_mode_overspends_its_budget_by_more_than_one_probe_or_wave() {
    let verifier = Verifier::new(&VerifierConfig::Numeric).unwrap();
    for mode in ["gpo", "gpo-ppo", "grpo", "ppo", "random-reset", "gpo-dpo", "gpo-kto", "dpo", "kto"] {
        for (search, budget) in
            [(Search::Bisect, 150u64), (Search::Bisect, 700), (Search::Dense, 700), (Search::Dense, 2000)]
        {
            let mut c = cfg(mode);
            c.value.search = search;
            let policy = Cliff::new(0.5);
            let collector =
                Collector { engine: &policy, verifier: &verifier, cfg: &c, iteration: 0, budget: Some(budget) };
            let out = collector.iteration(&mut || vec![task()], &mut || false).unwrap();
            let spent = out.stats.total_tokens();
            assert!(spent >= budget, "{mode}: stops only when the budget is spent ({spent} < {budget})");
            assert!(spent <= budget + slack(&c), "{mode} {search:?}: spent {spent} of {budget}");
        }
    }
    // A budget smaller than one analysis cuts it: what was drawn still counts (and trains).
    // (Uncapped: under the default 35% share such a budget admits no probe at all.)
    let mut c = cfg("gpo");
    c.value.share = 1.0;
    let policy = Cliff::new(0.5);
    let collector = Collector { engine: &policy, verifier: &verifier, cfg: &c, iteration: 0, budget: Some(100) };
    let out = collector.iteration(&mut || vec![task()], &mut || false).unwrap();
    assert_eq!((out.stats.analysed, out.stats.cut, out.stats.reset_rollouts), (1, 1, 0));
    assert_eq!(out.stats.trained_tokens() + out.stats.zero_signal_tokens, out.stats.total_tokens());
}

#[test]
fn the_analysis_share_caps_probes_and_resets_and_returns_the_rest_to_roots() {
    let verifier = Verifier::new(&VerifierConfig::Numeric).unwrap();
    for mode in ["gpo", "gpo-ppo", "random-reset", "gpo-dpo"] {
        for budget in [700u64, 2000, 5000] {
            let run = |share: f64| {
                let mut c = cfg(mode);
                c.value.share = share;
                let policy = Cliff::new(0.5);
                let collector =
                    Collector { engine: &policy, verifier: &verifier, cfg: &c, iteration: 0, budget: Some(budget) };
                let out = collector.iteration(&mut || vec![task()], &mut || false).unwrap();
                assert!(out.stats.total_tokens() >= budget, "{mode} share {share}: the budget is spent");
                assert!(out.stats.total_tokens() <= budget + slack(&c), "{mode} share {share}: overspent");
                out.stats
            };
            let (capped, free) = (run(0.3), run(1.0));
            let analysis = capped.value_tokens + capped.reset_tokens;
            assert!(analysis as f64 <= 0.3 * budget as f64, "{mode} {budget}: analyses spent {analysis}");
            assert!(capped.prompts >= free.prompts, "{mode} {budget}: {} < {} prompts", capped.prompts, free.prompts);
            if budget >= 2000 {
                assert!(capped.prompts > free.prompts, "{mode} {budget}: the cap returns tokens to roots");
                assert!(analysis > 0, "{mode} {budget}: the cap still leaves room for analyses");
            }
        }
    }
    let mut c = cfg("gpo");
    c.value.share = 0.0;
    assert!(c.validate().unwrap_err().to_string().contains("value.share"));
}
