//! `gpo bench rollout`: the engine against a raw llama.cpp C-API loop on the same workload, in the
//! same process, so the printed ratios are fair on a noisy machine.
//!
//! Workload (the shape of `shared/anchors/rollbench.cpp`): B sequences share one P-token prompt
//! (prefilled once), each decodes G tokens greedily; then K branches restart from position
//! L = P + G/2 of sequence 0 and decode G/2 tokens — by KV fork, and by re-prefilling L tokens per
//! branch. The engine additionally records every token's log-prob and its steps.

pub mod daemon;
mod raw;
pub mod train;

use crate::engine::{Engine, EngineConfig, GenerateRequest, KvMode, Prompt, SamplingParams};
use crate::llama::{Model, ModelParams, Token};
use crate::Result;
use std::path::PathBuf;
use std::time::Instant;

pub use raw::{raw_rollout, RawTimes};

/// Settings of the rollout benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct RolloutArgs {
    /// GGUF model (default: the cached SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Sequences sharing the prompt.
    #[arg(short = 'b', long, default_value_t = 8)]
    pub batch: usize,
    /// Prompt tokens.
    #[arg(short = 'p', long, default_value_t = 128)]
    pub prompt: usize,
    /// Generated tokens per sequence.
    #[arg(short = 'g', long, default_value_t = 128)]
    pub gen: usize,
    /// Branches restarted from the middle of sequence 0.
    #[arg(short = 'k', long, default_value_t = 8)]
    pub forks: usize,
    /// Rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// KV layouts to measure (unified, per-sequence); repeat the flag for both.
    #[arg(long = "kv", default_values_t = vec![KvMode::Unified])]
    pub kv: Vec<KvMode>,
    /// Layers on the GPU (-1 = all).
    #[arg(long, default_value_t = -1)]
    pub gpu_layers: i32,
    /// Flash attention: auto, on or off (both sides).
    #[arg(long, default_value = "auto")]
    pub flash_attn: FlashAttn,
    /// Where the engine samples: auto, graph or host (the raw loop samples on the host).
    #[arg(long, default_value = "auto")]
    pub sampling: crate::engine::SamplingBackend,
}

/// Flash-attention policy for benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FlashAttn {
    /// llama.cpp decides.
    Auto,
    /// Always on.
    On,
    /// Always off.
    Off,
}

impl FlashAttn {
    /// As the engine's setting.
    pub fn setting(self) -> Option<bool> {
        match self {
            FlashAttn::Auto => None,
            FlashAttn::On => Some(true),
            FlashAttn::Off => Some(false),
        }
    }
}

/// Context settings shared by both sides of the benchmark.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// KV layout.
    pub kv: KvMode,
    /// CPU threads (0 = all).
    pub threads: i32,
    /// GPU layers.
    pub gpu_layers: i32,
    /// Flash attention.
    pub flash_attn: Option<bool>,
    /// Where the engine samples (the raw loop always samples on the host).
    pub sampling: crate::engine::SamplingBackend,
}

/// Timings of the gpo engine on the workload (seconds).
#[derive(Debug, Clone, Copy, Default)]
pub struct GpoTimes {
    /// Prefill of a P-token prompt (plus one sampled token).
    pub prefill_s: f64,
    /// B×G generation, prompt prefill included.
    pub generate_s: f64,
    /// K branches by KV fork, G/2 tokens each.
    pub fork_s: f64,
    /// K branches by re-prefilling the L-token prefix, G/2 tokens each.
    pub reprefill_s: f64,
}

/// The workload's dimensions.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Sequences sharing the prompt.
    pub b: usize,
    /// Prompt tokens.
    pub p: usize,
    /// Generated tokens.
    pub g: usize,
    /// Branches.
    pub k: usize,
}

impl Workload {
    /// KV cells both runs use (as rollbench sizes them).
    pub fn n_ctx(&self) -> u32 {
        ((self.p + self.g) * (self.b + self.k + 2) + 256) as u32
    }

    /// Batch size both runs use.
    pub fn n_batch(&self) -> u32 {
        (self.p + self.g).max(self.b).max(512) as u32
    }

    /// Sequence ids both runs use.
    pub fn n_seq(&self) -> u32 {
        (self.b + self.k + 1) as u32
    }
}

/// Deterministic pseudo-random prompt tokens away from the special ids.
pub fn random_prompt(n_vocab: i32, len: usize, seed: u64) -> Vec<Token> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            100 + (s % (n_vocab as u64 - 200)) as Token
        })
        .collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { ignore_eog: true, ..SamplingParams::greedy(max_tokens) }
}

/// Starts an engine sized for the workload.
pub fn bench_engine(model: PathBuf, w: &Workload, setup: &Setup, prefix_cache: bool) -> Result<Engine> {
    Engine::start(EngineConfig {
        model,
        n_gpu_layers: setup.gpu_layers,
        n_threads: setup.threads,
        n_ctx: w.n_ctx(),
        n_parallel: w.n_seq(),
        n_batch: w.n_batch(),
        kv_mode: setup.kv,
        flash_attn: setup.flash_attn,
        sampling: setup.sampling,
        prefix_cache,
        ..Default::default()
    })
}

/// Runs the workload through two engines (prefix cache on for fork, off for re-prefill), each
/// starting with an empty cache like the raw loop's fresh context.
pub fn gpo_rollout(engine: &Engine, no_cache: &Engine, w: &Workload, seed: u64) -> Result<GpoTimes> {
    engine.clear_cache()?;
    no_cache.clear_cache()?;
    let n_vocab = engine.info().n_vocab;
    let probe = random_prompt(n_vocab, w.p, seed ^ 0xABCD);
    let t0 = Instant::now();
    engine.generate(GenerateRequest::new(Prompt::Tokens(probe), 1, greedy(1)))?;
    let prefill_s = t0.elapsed().as_secs_f64();
    engine.clear_cache()?; // the raw loop's rollout starts from an empty context too

    let prompt = random_prompt(n_vocab, w.p, seed);
    let t0 = Instant::now();
    let trajs = engine.generate(GenerateRequest::new(Prompt::Tokens(prompt), w.b, greedy(w.g)))?;
    let generate_s = t0.elapsed().as_secs_f64();

    let at = w.g / 2;
    let t0 = Instant::now();
    engine.fork(&trajs[0], at, w.k, greedy(w.g / 2))?;
    let fork_s = t0.elapsed().as_secs_f64();

    // Without a prefix cache every branch recomputes its prefix, as each would in a system
    // without KV forks (separate requests, so nothing is shared).
    let reqs = (0..w.k)
        .map(|_| {
            let mut r = no_cache.fork_request(&trajs[0], at, 1, greedy(w.g / 2))?;
            r.origin = None;
            Ok(r)
        })
        .collect::<Result<Vec<_>>>()?;
    let t0 = Instant::now();
    no_cache.generate_many(reqs)?;
    let reprefill_s = t0.elapsed().as_secs_f64();
    Ok(GpoTimes { prefill_s, generate_s, fork_s, reprefill_s })
}

/// Median of a slice (NaN for empty).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// `gpo bench rollout`: runs both sides `rounds` times, alternating, and prints medians and ratios.
pub fn rollout(args: &RolloutArgs) -> Result<()> {
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => crate::models::default_model()?,
    };
    let w = Workload { b: args.batch, p: args.prompt, g: args.gen.max(2), k: args.forks };
    if w.b == 0 || w.k == 0 || w.p == 0 {
        return Err(crate::Error::invalid("workload", "batch, prompt and forks must be at least 1"));
    }
    let model = Model::load(&model_path, &ModelParams { n_gpu_layers: args.gpu_layers, ..Default::default() })?;
    println!(
        "rollout workload: B={} sequences × G={} tokens on a P={} prompt; K={} branches from L={} tokens, {} tokens each; {} rounds, medians",
        w.b,
        w.g,
        w.p,
        w.k,
        w.p + w.g / 2,
        w.g / 2,
        args.rounds
    );
    println!("model: {} ({})", model_path.display(), model.description());
    for &kv in &args.kv {
        let setup = Setup {
            kv,
            threads: args.threads,
            gpu_layers: args.gpu_layers,
            flash_attn: args.flash_attn.setting(),
            sampling: args.sampling,
        };
        let engine = bench_engine(model_path.clone(), &w, &setup, true)?;
        println!("gpo samples {}", if engine.info().graph_sampling { "in the decode graph" } else { "on the host" });
        let no_cache = bench_engine(model_path.clone(), &w, &setup, false)?;
        // Warm-up both sides once.
        gpo_rollout(&engine, &no_cache, &Workload { g: 8, ..w }, 99)?;
        raw_rollout(&model, &Workload { g: 8, ..w }, &setup, 99)?;
        let (mut rp, mut rd, mut rf, mut rn, mut rt) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut gp, mut gd, mut gf, mut gn, mut gt) = (vec![], vec![], vec![], vec![], vec![]);
        for round in 0..args.rounds {
            let seed = 1000 + round as u64;
            let r = raw_rollout(&model, &w, &setup, seed)?;
            let g = gpo_rollout(&engine, &no_cache, &w, seed)?;
            rp.push(w.p as f64 / r.prefill_s);
            rd.push((w.b * w.g) as f64 / r.decode_s);
            rf.push(r.fork_s);
            rn.push(r.reprefill_s);
            rt.push(r.prefill_s + r.decode_s);
            gp.push(w.p as f64 / g.prefill_s);
            gd.push((w.b * w.g) as f64 / (g.generate_s - g.prefill_s).max(1e-9));
            gf.push(g.fork_s);
            gn.push(g.reprefill_s);
            gt.push(g.generate_s);
        }
        let (rp, rd, rf, rn, rt) =
            (median(&mut rp), median(&mut rd), median(&mut rf), median(&mut rn), median(&mut rt));
        let (gp, gd, gf, gn, gt) =
            (median(&mut gp), median(&mut gd), median(&mut gf), median(&mut gn), median(&mut gt));
        println!("\nKV {kv}, flash attention {:?}", args.flash_attn);
        println!("| metric | raw C API | gpo | gpo/raw |");
        println!("|---|---|---|---|");
        println!("| prefill tok/s | {rp:.0} | {gp:.0} | {:.2}× |", gp / rp);
        println!("| decode tok/s | {rd:.1} | {gd:.1} | {:.2}× |", gd / rd);
        println!("| rollout (prefill + B×G) s | {rt:.3} | {gt:.3} | {:.2}× |", rt / gt);
        println!("| K branches by fork s | {rf:.3} | {gf:.3} | {:.2}× |", rf / gf);
        println!("| K branches by re-prefill s | {rn:.3} | {gn:.3} | {:.2}× |", rn / gn);
        println!("| fork speed-up over re-prefill | {:.2}× | {:.2}× | |", rn / rf, gn / gf);
        let s = engine.stats()?;
        println!(
            "engine: {} forks, {} prefix tokens reused, {} computed, {} evictions, {} preemptions",
            s.forks, s.reused_tokens, s.prefill_tokens, s.evictions, s.preemptions
        );
        drop((engine, no_cache));
        sampling_paths(&model_path, &w, &setup, args.rounds)?;
    }
    Ok(())
}

/// Sampled decoding (T = 0.9, top-k 40, top-p 0.95: the GPO loop's kind) with the chain in the
/// decode graph against the same engine sampling on the host, alternating, in this process.
fn sampling_paths(model: &std::path::Path, w: &Workload, setup: &Setup, rounds: usize) -> Result<()> {
    let graph = bench_engine(
        model.to_path_buf(),
        w,
        &Setup { sampling: crate::engine::SamplingBackend::Graph, ..*setup },
        true,
    )?;
    let host = bench_engine(
        model.to_path_buf(),
        w,
        &Setup { sampling: crate::engine::SamplingBackend::Host, ..*setup },
        true,
    )?;
    let n_vocab = graph.info().n_vocab;
    let params = SamplingParams {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        max_tokens: w.g,
        ignore_eog: true,
        ..Default::default()
    };
    let run = |e: &Engine, seed: u64| -> Result<f64> {
        e.clear_cache()?;
        let prompt = random_prompt(n_vocab, w.p, seed);
        let t0 = Instant::now();
        let ts =
            e.generate(GenerateRequest::new(Prompt::Tokens(prompt), w.b, SamplingParams { seed, ..params.clone() }))?;
        Ok(ts.iter().map(|t| t.tokens.len()).sum::<usize>() as f64 / t0.elapsed().as_secs_f64())
    };
    run(&graph, 7)?; // warm-up
    run(&host, 7)?;
    let (mut g, mut h) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let seed = 2000 + round as u64;
        h.push(run(&host, seed)?);
        g.push(run(&graph, seed)?);
    }
    let (g, h) = (median(&mut g), median(&mut h));
    println!(
        "
sampled rollout (T = 0.9, top-k 40, top-p 0.95; prefill + B×G), gpo only"
    );
    println!("| metric | host sampling | graph sampling | graph/host |");
    println!("|---|---|---|---|");
    println!("| tok/s | {h:.1} | {g:.1} | {:.2}× |", g / h);
    Ok(())
}
