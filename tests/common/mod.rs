//! Helpers shared by the integration tests: the real default model and tiny synthetic models.
#![allow(dead_code)]

use gpo::engine::{Engine, EngineConfig, KvMode};
use gpo::gguf::lora::{LoraAdapterFile, LoraTensor};
use gpo::gguf::synth::linear_tensors;
use gpo::gguf::synth::{write_synthetic, SynthSpec};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The real SmolLM2-135M-Instruct Q4_1 model (fetched by `scripts/fetch-model.sh`, SHA-256 checked).
pub fn real_model() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        gpo::models::default_model()
            .unwrap_or_else(|e| panic!("the test model is missing or wrong: {e}\nrun scripts/fetch-model.sh first"))
    })
    .clone()
}

fn scratch_dir() -> &'static Path {
    static D: OnceLock<tempfile::TempDir> = OnceLock::new();
    D.get_or_init(|| tempfile::tempdir().expect("tempdir")).path()
}

/// A tiny random-weight model of `arch` with the real model's tokenizer, written once per process.
pub fn tiny_model(arch: &str) -> PathBuf {
    static LLAMA: OnceLock<PathBuf> = OnceLock::new();
    static QWEN: OnceLock<PathBuf> = OnceLock::new();
    static PEAKED: OnceLock<PathBuf> = OnceLock::new();
    let (cell, scale) = match arch {
        "llama" => (&LLAMA, 1.0),
        "qwen2" => (&QWEN, 1.0),
        // Peaked next-token distributions, like a trained model's.
        "llama-peaked" => (&PEAKED, 30.0),
        _ => panic!("no tiny {arch}"),
    };
    cell.get_or_init(|| {
        let p = scratch_dir().join(format!("tiny-{arch}.gguf"));
        let family = arch.trim_end_matches("-peaked");
        let spec = SynthSpec { seed: 7, logit_scale: scale, ..SynthSpec::tiny(family) };
        write_synthetic(&p, &real_model(), &spec).expect("write tiny model");
        p
    })
    .clone()
}

/// A fresh path in the per-process scratch directory.
pub fn scratch(name: &str) -> PathBuf {
    scratch_dir().join(name)
}

/// An engine on `model` sized for tests: 2 threads, `parallel` slots, `n_ctx` cells.
pub fn engine(model: &Path, parallel: u32, n_ctx: u32, kv: KvMode) -> Engine {
    Engine::start(EngineConfig {
        model: model.to_path_buf(),
        n_threads: 2,
        n_ctx,
        n_parallel: parallel,
        n_batch: 256,
        kv_mode: kv,
        ..Default::default()
    })
    .expect("engine starts")
}

/// A one-sequence context on the engine's model, for replaying what the engine sampled.
pub fn test_context(e: &Engine) -> gpo::llama::Context {
    gpo::llama::Context::new(
        e.model().clone(),
        &gpo::llama::ContextParams {
            n_ctx: 2048,
            n_batch: 1024,
            n_seq_max: 1,
            n_threads: 2,
            kv_mode: KvMode::Unified,
            flash_attn: None,
            kv_f32: false,
        },
    )
    .unwrap()
}

/// Replays a single-sequence trajectory with the engine's batch shapes (the context in one batch,
/// then one token per decode) and compares every recorded log-prob with a full f64 host
/// log-softmax of the same logit row. Returns the largest absolute difference.
pub fn replay_logprob_error(e: &Engine, t: &gpo::engine::Trajectory) -> f64 {
    let mut ctx = test_context(e);
    let mut batch = gpo::llama::Batch::new(t.context.len());
    for (i, &tok) in t.context.iter().enumerate() {
        batch.push(tok, i as i32, 0, i + 1 == t.context.len()).unwrap();
    }
    ctx.decode(&batch).unwrap();
    let mut row_index = t.context.len() as i32 - 1;
    let mut worst = 0.0f64;
    for (k, (&tok, &lp)) in t.tokens.iter().zip(&t.logprobs).enumerate() {
        let want = gpo::engine::logprob::log_softmax_reference(ctx.logits(row_index).expect("row"), t.temperature)
            [tok as usize];
        worst = worst.max((want - lp as f64).abs());
        if k + 1 < t.tokens.len() {
            batch.clear();
            batch.push(tok, (t.context.len() + k) as i32, 0, true).unwrap();
            ctx.decode(&batch).unwrap();
            row_index = 0;
        }
    }
    worst
}

/// Resident memory of this process in KiB.
pub fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("procfs");
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Writes a random LoRA adapter on `model`'s q and v projections (B uniform in ±`b`; exactly
/// zero for b = 0, all NaN for b = NaN).
pub fn write_adapter(model: &Path, name: &str, rank: usize, b: f32, seed: u64) -> PathBuf {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let tensors = linear_tensors(model)
        .unwrap()
        .into_iter()
        .filter(|(n, _, _)| n.ends_with("attn_q.weight") || n.ends_with("attn_v.weight"))
        .map(|(base, n_in, n_out)| LoraTensor {
            base,
            rank,
            n_in,
            n_out,
            a: (0..rank * n_in).map(|_| rng.random_range(-0.1..0.1)).collect(),
            b: (0..n_out * rank).map(|_| if b == 0.0 || b.is_nan() { b } else { rng.random_range(-b..b) }).collect(),
        })
        .collect();
    let path = scratch(name);
    LoraAdapterFile { architecture: "llama".into(), alpha: 2.0 * rank as f32, tensors }.write(&path).unwrap();
    path
}

/// The newline token of the scripted policies (steps are a state token and a newline).
pub const SCRIPT_NL: i32 = 10;
/// The one-token prompt the scripted policies give a text prompt.
pub const SCRIPT_PROMPT: i32 = 100;

/// A scripted policy's view of a request: the context (prompt plus inherited prefix) and the
/// prompt length; any non-token prompt is the one-token prompt [`SCRIPT_PROMPT`].
pub fn script_context(r: &gpo::engine::GenerateRequest) -> (std::sync::Arc<Vec<i32>>, usize) {
    match &r.prompt {
        gpo::engine::Prompt::Tokens(t) => (std::sync::Arc::new(t.clone()), r.prompt_len.unwrap_or(t.len())),
        _ => (std::sync::Arc::new(vec![SCRIPT_PROMPT]), 1),
    }
}

/// A scripted trajectory: `tokens` are (state, newline) pairs, one step each.
pub fn script_trajectory(
    id: u64,
    context: std::sync::Arc<Vec<i32>>,
    prompt_len: usize,
    tokens: Vec<i32>,
    text: String,
) -> gpo::engine::Trajectory {
    let steps = (0..tokens.len() / 2).map(|k| gpo::engine::StepSpan { start: 2 * k, end: 2 * k + 2 }).collect();
    gpo::engine::Trajectory {
        id,
        request: 0,
        index: 0,
        context,
        prompt_len,
        logprobs: vec![-1.0; tokens.len()],
        tokens,
        text,
        steps,
        adapter_version: 0,
        temperature: 1.0,
        finish: gpo::engine::FinishReason::Eog,
        origin: None,
    }
}
