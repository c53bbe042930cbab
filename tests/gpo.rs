//! The GPO loop: step values on a scripted policy with a planted critical step, the adaptive
//! budget, resets on the real model, and resume after `kill -9`.

mod common;

use common::{
    real_model, scratch, script_context, script_trajectory, tiny_model, SCRIPT_NL as NL, SCRIPT_PROMPT as PROMPT,
};
use gpo::engine::{GenerateRequest, Trajectory};
use gpo::gpo::collect::{mix, Collected, Collector, Rollouts};
use gpo::gpo::config::Gate;
use gpo::gpo::values::Search;
use gpo::gpo::{Mode, RunConfig};
use gpo::reward::{Verifier, VerifierConfig};
use gpo::task::Task;
use gpo::tree::CriticalMode;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A policy with known values: 4 steps of 2 tokens (step token, newline). Step 1 chooses good (2)
/// with probability `q` or bad (3); the final step answers correctly (4) with probability
/// `p_good` after good and `p_bad` after bad. V(prefix) is known exactly.
struct Scripted {
    q: f64,
    p_good: f64,
    p_bad: f64,
    next_id: AtomicU64,
    rollouts: AtomicU64,
}

impl Scripted {
    fn new(q: f64, p_good: f64, p_bad: f64) -> Scripted {
        Scripted { q, p_good, p_bad, next_id: AtomicU64::new(0), rollouts: AtomicU64::new(0) }
    }

    fn one(&self, context: Arc<Vec<i32>>, prompt_len: usize, seed: u64) -> Trajectory {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let done: Vec<i32> = context[prompt_len..].to_vec();
        let mut step_tok: Vec<i32> = done.chunks(2).map(|c| c[0]).collect();
        let mut tokens = Vec::new();
        while step_tok.len() < 4 {
            let t = match step_tok.len() {
                1 => {
                    if rng.random_bool(self.q) {
                        2
                    } else {
                        3
                    }
                }
                3 => {
                    let p = if step_tok[1] == 2 { self.p_good } else { self.p_bad };
                    if rng.random_bool(p) {
                        4
                    } else {
                        5
                    }
                }
                _ => 1,
            };
            step_tok.push(t);
            tokens.extend([t, NL]);
        }
        let text = format!("reasoning\nAnswer: {}", if step_tok[3] == 4 { 1 } else { 0 });
        script_trajectory(self.next_id.fetch_add(1, Ordering::Relaxed), context, prompt_len, tokens, text)
    }
}

impl Rollouts for Scripted {
    fn sample(&self, reqs: Vec<GenerateRequest>) -> gpo::Result<Vec<Vec<Trajectory>>> {
        Ok(reqs
            .into_iter()
            .map(|r| {
                let (context, prompt_len) = script_context(&r);
                (0..r.n)
                    .map(|i| {
                        self.rollouts.fetch_add(1, Ordering::Relaxed);
                        self.one(context.clone(), prompt_len, mix(&[r.sampling.seed, i as u64]))
                    })
                    .collect()
            })
            .collect())
    }

    fn render(&self, tokens: &[i32]) -> String {
        format!("{tokens:?}")
    }
}

/// The paper's recipe (dense values at every step, any prompt, `abs`, resets only trained) on
/// the random scripted policy: the tests of value estimation itself.
fn scripted_cfg(rollouts: usize) -> RunConfig {
    let mut c: RunConfig = toml::from_str("mode = \"gpo\"\niterations = 1\noutput = \"/tmp/unused\"\n").unwrap();
    c.rollout.group_size = 8;
    c.rollout.prompts = 6;
    c.value.rollouts = rollouts;
    c.value.prefer_failed = true;
    c.value.search = Search::Dense;
    c.value.gate = Gate::Any;
    c.value.critical = CriticalMode::Abs;
    c.train.train_on_value_rollouts = false;
    c
}

fn collect(policy: &Scripted, cfg: &RunConfig) -> Collected {
    let verifier = Verifier::new(&VerifierConfig::Numeric).unwrap();
    let tasks: Vec<Task> =
        (0..cfg.rollout.prompts).map(|i| Task { prompt: format!("q{i}"), answer: "1".into() }).collect();
    let c = Collector { engine: policy, verifier: &verifier, cfg, iteration: 0, budget: None };
    let mut out = Collected::default();
    c.wave(0, &tasks, &mut out).unwrap();
    out
}

#[test]
fn values_converge_and_the_planted_critical_step_is_found() {
    // Failures only happen after the bad choice, so every analysed (failed) trajectory took it.
    let policy = Scripted::new(0.5, 1.0, 0.1);
    let cfg = scripted_cfg(200);
    let out = collect(&policy, &cfg);
    assert_eq!(out.stats.analysed, 6);
    assert_eq!(out.stats.critical_steps, vec![1; 6], "the choice at step 1 carries the value");
    // Reset rows carry the values of the analysed (failed, bad-choice) trajectories.
    let values: Vec<Vec<f64>> =
        out.export_resets.iter().map(|r| serde_json::from_value(r["values"].clone()).unwrap()).collect();
    assert!(!values.is_empty());
    for v in &values {
        // V(s0) = V(s1) = q·1 + (1−q)·0.1 = 0.55; V(s2) = V(s3) = 0.1; V(s4) = r = 0.
        let want = [0.55, 0.55, 0.1, 0.1, 0.0];
        for (got, w) in v.iter().zip(want) {
            assert!((got - w).abs() < 0.12, "values {v:?} vs {want:?}");
        }
    }
    // Resets start at s1 (before the critical step): their context ends with the neutral step 0.
    for c in out.completions.iter().filter(|c| c.prompt.len() > 1) {
        assert_eq!(c.prompt, vec![PROMPT as u32, 1, NL as u32]);
    }
    let resets = out.completions.iter().filter(|c| c.prompt.len() > 1).count();
    assert_eq!(resets, 6 * cfg.continuations());
    assert_eq!(out.stats.reset_rollouts as usize, resets);
}

#[test]
fn critical_modes_pick_as_specified() {
    // A trajectory that took the bad branch and still succeeded: A = [0, −0.4, 0, +0.9].
    let v = [0.5, 0.5, 0.1, 0.1, 1.0];
    assert_eq!(gpo::tree::critical_step(&v, CriticalMode::Abs), Some(3));
    assert_eq!(gpo::tree::critical_step(&v, CriticalMode::Drop), Some(1));
    assert_eq!(gpo::tree::critical_step(&v, CriticalMode::Gain), Some(3));
    // A failure after the good choice loses its value at the last step: abs picks step 3 there.
    assert_eq!(gpo::tree::critical_step(&[0.5, 0.5, 0.9, 0.9, 0.0], CriticalMode::Abs), Some(3));
    // Through the collector: `drop` on failed trajectories finds the bad choice.
    let policy = Scripted::new(0.5, 1.0, 0.1);
    let mut cfg = scripted_cfg(200);
    cfg.value.critical = CriticalMode::Drop;
    assert_eq!(collect(&policy, &cfg).stats.critical_steps, vec![1; 6]);
}

#[test]
fn continuations_feed_deeper_prefixes_and_the_adaptive_budget_saves_rollouts() {
    // After the bad choice nothing succeeds: the deep prefixes settle on unanimous zeros.
    let full = Scripted::new(0.5, 1.0, 0.0);
    let cfg = scripted_cfg(8);
    let out_full = collect(&full, &cfg);
    let mut adaptive = scripted_cfg(8);
    adaptive.value.adaptive = true;
    adaptive.value.adaptive_min = 2;
    adaptive.reset.reinvest_savings = false;
    let lean = Scripted::new(0.5, 1.0, 0.0);
    let out_lean = collect(&lean, &adaptive);
    assert_eq!(out_lean.stats.critical_steps, vec![1; 6]);
    assert!(out_lean.stats.saved_rollouts > 0);
    assert!(
        out_lean.stats.value_rollouts < out_full.stats.value_rollouts,
        "adaptive {} vs full {} value rollouts",
        out_lean.stats.value_rollouts,
        out_full.stats.value_rollouts
    );
    // Sharing: with M = 8 per prefix and 4 prefixes, drawing every sample fresh would cost 8 per
    // prefix beyond s0's siblings; continuations passing deeper prefixes make it cheaper.
    assert!(out_full.stats.value_rollouts < 6 * 8 * 3, "{}", out_full.stats.value_rollouts);
    // Reinvested savings become extra resets.
    adaptive.reset.reinvest_savings = true;
    let again = collect(&Scripted::new(0.5, 1.0, 0.0), &adaptive);
    assert_eq!(again.stats.reset_rollouts, (6 * adaptive.continuations()) as u64 + again.stats.saved_rollouts);
}

#[test]
fn offline_gpo_pairs_share_the_critical_prefix() {
    let policy = Scripted::new(0.5, 1.0, 0.1);
    let mut cfg = scripted_cfg(32);
    cfg.mode = Mode::GpoDpo;
    let out = collect(&policy, &cfg);
    assert!(out.pairs.iter().any(|p| p.prompt.len() > 1), "pairs at the critical prefix");
    for p in &out.pairs {
        // Root groups pair at the prompt; every other pair shares the critical prefix s1.
        if p.prompt.len() > 1 {
            assert_eq!(p.prompt, vec![PROMPT as u32, 1, NL as u32], "pairs share the critical prefix s1");
        }
        assert_ne!(p.chosen, p.rejected);
    }
    assert_eq!(out.export_pairs.len(), out.pairs.len());
}

fn small_real_run(dir: &str, mode: &str) -> RunConfig {
    let text = format!(
        r#"
mode = "{mode}"
iterations = 1
output = "{}"
model = "{}"
seed = 5
[tasks]
train_count = 8
eval_count = 4
[tasks.generator]
steps = 1
[rollout]
prompts = 2
group_size = 4
temperature = 0.8
max_tokens = 48
[value]
rollouts = 2
search = "dense"   # every step's value, every prompt: a critical step is all but certain
gate = "any"
critical = "abs"
[verifier]
kind = "regex"
pattern = "(?s)^.{{0,90}}$"
[train]
rank = 4
alpha = 8.0
lr = 1e-3
[eval]
max_tokens = 32
[engine]
parallel = 16
ctx_per_sequence = 512
"#,
        scratch(dir).display(),
        real_model().display()
    );
    let mut cfg: RunConfig = toml::from_str(&text).unwrap();
    cfg.validate().unwrap();
    cfg.output = scratch(dir);
    cfg
}

#[test]
fn one_gpo_iteration_on_the_real_model_resets_trains_and_swaps() {
    let cfg = small_real_run("run-real-gpo", "gpo");
    let rows = gpo::gpo::run(&cfg, &mut gpo::gpo::Quiet).unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert!(r.collect.value_rollouts > 0, "{r:?}");
    assert!(r.collect.analysed >= 2);
    assert!(r.collect.reset_rollouts > 0, "a critical step should be found with this verifier: {r:?}");
    assert!(r.loss.is_some() && r.adapter_version == 1, "trained and swapped: {r:?}");
    assert!(r.heldout_accuracy.is_some());
    // Resets begin at a step boundary of a root sample: the exported prompts end with its prefix.
    let resets = std::fs::read_to_string(cfg.output.join("export/00000.resets.jsonl")).unwrap();
    let model = gpo::llama::Model::load(real_model(), &Default::default()).unwrap();
    let template = model.apply_chat_template(&[gpo::llama::ChatMessage::user("x")]).unwrap();
    for line in resets.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let prompt = v["prompt"].as_str().unwrap();
        assert!(prompt.contains("<|im_start|>assistant\n"), "{prompt}");
        let step = v["critical_step"].as_u64().unwrap();
        let prefix = prompt.split("<|im_start|>assistant\n").nth(1).unwrap();
        assert!(prefix.matches('\n').count() as u64 >= step, "prefix has the steps before the critical one");
    }
    assert!(template.contains("<|im_start|>"));
    assert!(cfg.output.join("adapter.gguf").exists());
    let merged = gpo::gpo::export::merge(&cfg.output, &scratch("run-real-gpo-export")).unwrap();
    assert!(merged.iter().any(|(k, _, n)| k == "resets" && *n > 0));
}

#[test]
fn a_killed_run_resumes_with_identical_metrics() {
    // The flat random model gives varied samples (a learning signal); every iteration starts
    // from a clean KV cache, so the resumed engine samples exactly what the original did.
    let peaked = tiny_model("llama");
    let text = |out: &std::path::Path| {
        format!(
            r#"
mode = "gpo"
iterations = 4
output = "{}"
model = "{}"
seed = 9
[tasks]
train_count = 16
eval_count = 2
[rollout]
prompts = 2
group_size = 4
max_tokens = 24
[value]
rollouts = 2
[verifier]
kind = "regex"
pattern = "x"
[train]
rank = 2
alpha = 4.0
lr = 5e-3
[eval]
max_tokens = 8
[engine]
parallel = 8
ctx_per_sequence = 256
"#,
            out.display(),
            peaked.display()
        )
    };
    let (a, b) = (scratch("resume-a"), scratch("resume-b"));
    let (ca, cb) = (scratch("resume-a.toml"), scratch("resume-b.toml"));
    std::fs::write(&ca, text(&a)).unwrap();
    std::fs::write(&cb, text(&b)).unwrap();
    let gpo = env!("CARGO_BIN_EXE_gpo");
    assert!(std::process::Command::new(gpo)
        .args(["train", "--config", ca.to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    // Kill -9 the second run as soon as its first iteration is committed.
    let mut child = std::process::Command::new(gpo)
        .args(["train", "--config", cb.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !b.join("checkpoints").join("iter-00000").join("step-00000001").join("manifest.json").exists()
        && !b.join("checkpoints").join("iter-00000").join("step-00000000").join("manifest.json").exists()
    {
        assert!(t0.elapsed().as_secs() < 120, "the first iteration never completed");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done = gpo::gpo::read_metrics(&b).unwrap().len();
    assert!(done < 4, "killed before the end ({done} iterations done)");
    // As if an older gpo had started the run: its saved configuration lacks a setting added
    // since. The resume reads it with that setting's default and goes on.
    let saved = b.join("config.toml");
    let old: String = std::fs::read_to_string(&saved)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("activation_budget_mib"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(old, std::fs::read_to_string(&saved).unwrap(), "the setting was there to remove");
    std::fs::write(&saved, old).unwrap();
    assert!(std::process::Command::new(gpo)
        .args(["train", "--config", cb.to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    let ra: Vec<_> = gpo::gpo::read_metrics(&a).unwrap().iter().map(|r| r.without_timing()).collect();
    let rb: Vec<_> = gpo::gpo::read_metrics(&b).unwrap().iter().map(|r| r.without_timing()).collect();
    assert_eq!(ra.len(), 4);
    assert!(ra.iter().any(|r| r.loss.is_some()), "the run must train for resume to mean something: {ra:?}");
    assert_eq!(ra, rb, "resumed run must match the uninterrupted one");
    assert_eq!(std::fs::read(a.join("adapter.gguf")).unwrap(), std::fs::read(b.join("adapter.gguf")).unwrap());
    // A run with a different setting is not resumed into the same directory.
    let changed = text(&b).replace("seed = 9", "seed = 10");
    std::fs::write(&cb, changed).unwrap();
    let out = std::process::Command::new(gpo).args(["train", "--config", cb.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another configuration"), "{out:?}");
}

#[test]
fn configs_are_checked() {
    let bad = |s: &str| {
        toml::from_str::<RunConfig>(s)
            .map_err(|e| e.to_string())
            .and_then(|c: RunConfig| c.validate().map_err(|e| e.to_string()))
    };
    assert!(bad("mode = \"gpo\"\niterations = 0\noutput = \"x\"").unwrap_err().contains("iterations"));
    assert!(bad("mode = \"nope\"\niterations = 1\noutput = \"x\"").is_err());
    assert!(bad("mode = \"gpo\"\niterations = 1\noutput = \"x\"\ntypo = 3").unwrap_err().contains("typo"));
    // A key in the wrong section is an error naming it, not a silent default (a misplaced
    // `model` used to train the default model).
    for section in ["tasks", "rollout", "value", "reset", "engine", "train", "eval", "steps", "tasks.generator"] {
        let e = bad(&format!("mode = \"gpo\"\niterations = 1\noutput = \"x\"\n[{section}]\nmodel = \"m.gguf\""))
            .unwrap_err();
        assert!(e.contains("unknown field `model`"), "[{section}]: {e}");
    }
    assert!(bad("mode = \"grpo\"\niterations = 1\noutput = \"x\"\n[rollout]\ngroup_size = 1")
        .unwrap_err()
        .contains("group_size"));
    assert!(bad("mode = \"gpo\"\niterations = 1\noutput = \"x\"\n[verifier]\nkind = \"regex\"\npattern = \"(\"")
        .unwrap_err()
        .contains("pattern"));
    assert!(bad("mode = \"gpo\"\niterations = 1\noutput = \"x\"\n[value]\nsearch = \"dense\"\nadaptive = true\nadaptive_min = 9")
        .unwrap_err()
        .contains("adaptive_min"));
    // The adaptive budget settles the prefixes of the dense search; bisection has none to settle.
    assert!(bad("mode = \"gpo\"\niterations = 1\noutput = \"x\"\n[value]\nadaptive = true")
        .unwrap_err()
        .contains("dense"));
    assert!(bad("mode = \"gpo\"\niterations = 1\noutput = \"x\"\n[value]\nsearch = \"linear\"").is_err());
    assert!(bad("mode = \"gpo\"\niterations = 1\noutput = \"x\"\n[train]\nroot_term = -1.0")
        .unwrap_err()
        .contains("root_term"));
}

#[test]
fn shipped_configs_load() {
    // Every run configuration in configs/ (the experiment's arms, the quick run, TRL's workload)
    // parses and validates, with its relative output resolved next to the file.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut files = vec![root.join("quick.toml"), root.join("trl-workload/grpo.toml")];
    for setting in std::fs::read_dir(root.join("experiment")).unwrap() {
        for e in std::fs::read_dir(setting.unwrap().path()).unwrap() {
            files.push(e.unwrap().path());
        }
    }
    assert!(files.len() >= 8, "{files:?}");
    for f in files {
        let cfg = RunConfig::load(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(cfg.output.starts_with(f.parent().unwrap()), "{}", f.display());
    }
}
