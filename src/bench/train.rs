//! `gpo bench train`: tokens/s, peak memory and the phase profile of one training step
//! (forward + backward + AdamW) on a fixed batch, for gpo's variants and two references measured
//! in the same run: PyTorch + PEFT (what a user would otherwise run; `scripts/peft_train.py`,
//! embedded, in the environment `scripts/peft-env.sh` creates) and candle's plain autograd.
//!
//! Every variant runs in its own child process, so each peak-memory figure is that variant's
//! alone, and under a memory cap, so a variant that would exhaust the machine is stopped instead.

use super::median;
use crate::train::profile::{self, OpTime, Pass};
use crate::train::{
    Aggregation, Batch, Completion, LoraConfig, Objective, Recompute, StepPhases, Target, Trainer, TrainerConfig,
};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Settings of the training benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// GGUF model (default: the cached SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Sequences per step.
    #[arg(short = 'b', long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence (prompt of 16 + completion).
    #[arg(short = 't', long, default_value_t = 256)]
    pub tokens: usize,
    /// LoRA rank (all seven projections).
    #[arg(short = 'r', long, default_value_t = 16)]
    pub rank: usize,
    /// Timed steps per variant (after one warm-up step); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Skip candle's plain-autograd baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Python with torch, transformers and peft for the PyTorch + PEFT row (default:
    /// $GPO_PEFT_PYTHON, else the environment of scripts/peft-env.sh if it exists).
    #[arg(long)]
    pub peft_python: Option<PathBuf>,
    /// Skip the PyTorch + PEFT row.
    #[arg(long)]
    pub no_peft: bool,
    /// Memory cap of each variant's process in MiB (0 = 90% of the memory available at start).
    #[arg(long, default_value_t = 0)]
    pub mem_cap_mib: u64,
    /// Also time each fused op of gpo's variants (forward and backward) and print where the
    /// step's time goes per op; the clock adds a little overhead to every op.
    #[arg(long)]
    pub ops: bool,
    /// Internal: measure only this variant and print its result as JSON (the child processes).
    #[arg(long, hide = true)]
    pub only: Option<Variant>,
}

/// What `gpo bench train` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// candle's plain autograd: frozen-weight gradients, full logits, no recomputation.
    Plain,
    /// gpo's trainer keeping activations, one forward per sequence (`pack = false`).
    Unpacked,
    /// gpo's trainer keeping activations, the micro-batch packed into one forward.
    Keep,
    /// gpo's trainer with block recomputation (the default of real runs).
    Recompute,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Plain => "candle plain autograd",
            Variant::Unpacked => "gpo: frozen-weight op, chunked head, activations kept, one forward per sequence",
            Variant::Keep => "gpo: + sequences packed into one forward",
            Variant::Recompute => "gpo: + block recomputation",
        }
    }

    fn arg(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Unpacked => "unpacked",
            Variant::Keep => "keep",
            Variant::Recompute => "recompute",
        }
    }
}

/// One variant's measurement.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Measured {
    /// Median seconds per step.
    pub step_s: f64,
    /// Tokens (batch × tokens) per second at the median.
    pub tokens_per_s: f64,
    /// Peak memory, MiB: the process's peak RSS for gpo's rows; for the PEFT row, its peak RSS
    /// on the CPU and PyTorch's peak allocated device memory on CUDA.
    pub peak_mib: f64,
    /// Median phase profile (gpo's variants).
    #[serde(default)]
    pub phases: Option<StepPhases>,
    /// What the row ran on (PEFT: torch version and threads).
    #[serde(default)]
    pub note: String,
    /// Per-op wall time per step, averaged over the timed steps (`--ops`).
    #[serde(default)]
    pub ops: Vec<OpTime>,
}

/// Peak resident memory of this process, in MiB (Linux; 0 elsewhere). Each variant runs in its
/// own process, so this is that variant's peak.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// A GRPO batch of `b` sequences of `t` tokens (random ids, groups of two consecutive
/// sequences with rewards 1 and 0 or 0 and 1, so every group has a learning signal).
pub fn fixed_batch(b: usize, t: usize, n_vocab: usize) -> Batch {
    let prompt_len = 16.min(t - 1);
    let ids = super::random_prompt(n_vocab as i32, b * t, 7);
    Batch::Completions(
        (0..b)
            .map(|i| {
                let s: Vec<u32> = ids[i * t..(i + 1) * t].iter().map(|&x| x as u32).collect();
                Completion {
                    group: (i / 2) as u64,
                    ..Completion::new(
                        s[..prompt_len].to_vec(),
                        s[prompt_len..].to_vec(),
                        ((i + i / 2) % 2 == 0) as u8 as f64,
                    )
                }
            })
            .collect(),
    )
}

/// Median seconds per step, peak RSS and median phases of `steps` steps after a warm-up.
fn measure(cfg: TrainerConfig, batch: &Batch, steps: usize, tokens: f64) -> Result<Measured> {
    let mut t = Trainer::new(cfg)?;
    t.step(batch)?;
    profile::take();
    let (mut times, mut phases) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
    for _ in 0..steps {
        let t0 = Instant::now();
        let r = t.step(batch)?;
        if let Some(why) = r.skipped {
            return Err(Error::Train(why));
        }
        times.push(t0.elapsed().as_secs_f64());
        phases.push(r.phases);
    }
    let pick = |f: fn(&StepPhases) -> f64| median(&mut phases.iter().map(f).collect::<Vec<_>>());
    let phases = StepPhases {
        forward: pick(|p| p.forward),
        backward: pick(|p| p.backward),
        recompute: pick(|p| p.recompute),
        optimizer: pick(|p| p.optimizer),
        recomputed: phases.first().is_some_and(|p| p.recomputed),
    };
    let step_s = median(&mut times);
    let mut ops = profile::take();
    for o in &mut ops {
        o.seconds /= steps as f64;
        o.calls /= steps as u64;
    }
    Ok(Measured {
        ops,
        step_s,
        tokens_per_s: tokens / step_s,
        peak_mib: peak_rss_mib(),
        phases: Some(phases),
        note: String::new(),
    })
}

/// Memory the kernel says is available, in MiB (Linux; None elsewhere).
fn mem_available_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let l = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(l.split_whitespace().nth(1)?.parse::<u64>().ok()? / 1024)
}

/// Caps the data segment (heap and anonymous mappings) of a child at `mib` MiB.
fn cap_memory(cmd: &mut Command, mib: u64) {
    use std::os::unix::process::CommandExt;
    let bytes = mib.saturating_mul(1 << 20) as libc::rlim_t;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            if libc::setrlimit(libc::RLIMIT_DATA, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs a child under the memory cap; it prints `RESULT {json}` last, and its other output is
/// shown as progress. Returns the JSON text.
fn run_child(mut cmd: Command, what: &str, cap_mib: u64) -> Result<String> {
    cap_memory(&mut cmd, cap_mib);
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| Error::invalid("bench", format!("cannot start {what}: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text.lines().filter(|l| !l.starts_with("RESULT ")) {
        eprintln!("  {what}: {l}");
    }
    if let Some(json) = text.lines().rev().find_map(|l| l.strip_prefix("RESULT ")) {
        return Ok(json.to_string());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let mut tail: Vec<&str> = err.lines().rev().take(4).collect();
    tail.reverse();
    let why = match out.status.code() {
        Some(c) => format!("exit code {c}"),
        None => format!("{}; over the {cap_mib} MiB memory cap?", out.status),
    };
    Err(Error::invalid("bench", format!("{what} failed ({why}): {}", tail.join(" | "))))
}

/// The Python of the PyTorch + PEFT row: the flag, $GPO_PEFT_PYTHON, or scripts/peft-env.sh's
/// environment when it exists.
pub fn peft_python(flag: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = flag {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("GPO_PEFT_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = std::env::var_os("GPO_PEFT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::models::cache_dir().join("gpo").join("peft-venv"));
    let py = venv.join("bin").join("python");
    py.exists().then_some(py)
}

/// The comparison script, carried inside the binary so the row works from any directory.
const PEFT_SCRIPT: &str = include_str!("../../scripts/peft_train.py");

fn measure_peft(python: &Path, model: &Path, args: &TrainArgs, cap_mib: u64) -> Result<Measured> {
    let dir = tempfile::tempdir().map_err(|e| Error::invalid("bench", format!("temporary directory: {e}")))?;
    let script = dir.path().join("peft_train.py");
    std::fs::write(&script, PEFT_SCRIPT).map_err(|e| Error::io(&script, e))?;
    let mut cmd = Command::new(python);
    cmd.arg(&script).arg("--gguf").arg(model);
    cmd.args(["-b", &args.batch.to_string(), "-t", &args.tokens.to_string(), "-r", &args.rank.to_string()]);
    cmd.args(["--steps", &args.steps.to_string(), "--device", &args.device]);
    #[derive(Deserialize)]
    struct Peft {
        step_s: f64,
        tokens_per_s: f64,
        peak_mib: f64,
        threads: u32,
        torch: String,
        dtype: String,
    }
    let json = run_child(cmd, "PyTorch + PEFT", cap_mib)?;
    let p: Peft =
        serde_json::from_str(&json).map_err(|e| Error::invalid("bench", format!("PEFT result {json}: {e}")))?;
    Ok(Measured {
        step_s: p.step_s,
        tokens_per_s: p.tokens_per_s,
        peak_mib: p.peak_mib,
        phases: None,
        note: format!("torch {}, {}, {} threads", p.torch, p.dtype, p.threads),
        ops: Vec::new(),
    })
}

/// Runs the benchmark and prints a table: each row in its own process, PEFT first.
pub fn train(args: &TrainArgs) -> Result<()> {
    let model = match &args.model {
        Some(p) => p.clone(),
        None => crate::models::default_model()?,
    };
    if args.batch < 2 || args.tokens < 2 || args.steps == 0 {
        return Err(Error::invalid("workload", "batch ≥ 2 (a GRPO group of two), tokens ≥ 2 and steps ≥ 1"));
    }
    let tokens = (args.batch * args.tokens) as f64;
    if let Some(v) = args.only {
        profile::set_enabled(args.ops);
        let cfg = TrainerConfig {
            model: model.clone(),
            objective: Objective::Grpo { clip: 0.2, aggregation: Aggregation::TokenMean },
            lora: LoraConfig { rank: args.rank, alpha: 2.0 * args.rank as f32, targets: Target::ALL.to_vec(), seed: 1 },
            micro_batch: args.batch,
            device: args.device.clone(),
            plain_autograd: v == Variant::Plain,
            recompute: if v == Variant::Recompute { Recompute::Always } else { Recompute::Never },
            pack: v != Variant::Unpacked,
            ..Default::default()
        };
        let n_vocab =
            crate::train::Weights::load(&model, candle_core::DType::F32, &candle_core::Device::Cpu)?.cfg.n_vocab;
        let m = measure(cfg, &fixed_batch(args.batch, args.tokens, n_vocab), args.steps, tokens)?;
        println!("RESULT {}", serde_json::to_string(&m).expect("json"));
        return Ok(());
    }
    let cap = if args.mem_cap_mib > 0 {
        args.mem_cap_mib
    } else {
        mem_available_mib().map_or(u64::MAX >> 20, |m| m * 9 / 10)
    };
    println!(
        "train step: GRPO, {} × {} tokens, LoRA r={} on q,k,v,o,gate,up,down, AdamW; {} timed steps after a warm-up, medians; each row in its own process (memory cap {cap} MiB)",
        args.batch, args.tokens, args.rank, args.steps
    );
    println!("model: {}", model.display());
    let (content, _) = crate::gguf::read_content(&model)?;
    let arch = crate::train::arch::ArchConfig::from_gguf(&content)?;
    let dtype_bytes = if args.device.starts_with("cuda") { 2 } else { 4 };
    let est = crate::train::model::keep_activation_bytes(&arch, vec![args.tokens; args.batch], dtype_bytes) >> 20;
    let budget = crate::train::DEFAULT_ACTIVATION_BUDGET_MIB;
    println!(
        "recompute = \"auto\" (the default) would {} at this shape: kept activations ≈ {est} MiB, budget {budget} MiB",
        if est > budget { "recompute" } else { "keep activations" }
    );
    let peft = if args.no_peft {
        None
    } else {
        match peft_python(args.peft_python.as_deref()) {
            Some(py) => match measure_peft(&py, &model, args, cap) {
                Ok(m) => Some(m),
                Err(e) => {
                    eprintln!("not measured: {e}");
                    None
                }
            },
            None => {
                eprintln!(
                    "PyTorch + PEFT row not measured: no environment. Create it with scripts/peft-env.sh \
                     (or pass --peft-python / set GPO_PEFT_PYTHON); --no-peft silences this."
                );
                None
            }
        }
    };
    let exe = std::env::current_exe().map_err(|e| Error::invalid("bench", format!("own executable: {e}")))?;
    let mut rows: Vec<(String, Measured)> = Vec::new();
    if let Some(p) = &peft {
        rows.push((format!("PyTorch + PEFT ({})", p.note), p.clone()));
    }
    let variants: &[Variant] = if args.no_baseline {
        &[Variant::Unpacked, Variant::Keep, Variant::Recompute]
    } else {
        &[Variant::Plain, Variant::Unpacked, Variant::Keep, Variant::Recompute]
    };
    for &v in variants {
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "train", "--only", v.arg(), "--no-peft", "--no-baseline"]);
        cmd.arg("--model").arg(&model);
        cmd.args(["-b", &args.batch.to_string(), "-t", &args.tokens.to_string(), "-r", &args.rank.to_string()]);
        cmd.args(["--steps", &args.steps.to_string(), "--device", &args.device]);
        if args.ops {
            cmd.arg("--ops");
        }
        let measured = run_child(cmd, v.label(), cap).and_then(|json| {
            serde_json::from_str::<Measured>(&json).map_err(|e| Error::invalid("bench", format!("{json}: {e}")))
        });
        match measured {
            Ok(m) => rows.push((v.label().to_string(), m)),
            Err(e) => eprintln!("not measured: {e}"),
        }
    }
    println!("| variant | s/step | tokens/s | peak RSS MiB | speed vs PEFT | memory vs PEFT |");
    println!("|---|---|---|---|---|---|");
    for (name, m) in &rows {
        let (speed, mem) = match &peft {
            Some(p) => (format!("{:.2}×", p.step_s / m.step_s), format!("{:.2}×", m.peak_mib / p.peak_mib)),
            None => ("—".into(), "—".into()),
        };
        println!("| {name} | {:.2} | {:.1} | {:.0} | {speed} | {mem} |", m.step_s, m.tokens_per_s, m.peak_mib);
    }
    println!();
    println!("where a gpo step's time goes (medians, s): forward | backward (of which recomputation) | AdamW | rest");
    for (name, m) in &rows {
        if let Some(p) = m.phases {
            let rest = (m.step_s - p.forward - p.backward - p.optimizer).max(0.0);
            println!(
                "  {name}: {:.2} | {:.2} ({:.2}) | {:.3} | {:.2}   = {:.0}% | {:.0}% ({:.0}%) | {:.1}% | {:.0}%",
                p.forward,
                p.backward,
                p.recompute,
                p.optimizer,
                rest,
                100.0 * p.forward / m.step_s,
                100.0 * p.backward / m.step_s,
                100.0 * p.recompute / m.step_s,
                100.0 * p.optimizer / m.step_s,
                100.0 * rest / m.step_s
            );
        }
    }
    for (name, m) in rows.iter().filter(|(_, m)| !m.ops.is_empty()) {
        print_ops(name, m);
    }
    Ok(())
}

/// The per-op table of one variant: seconds per step in each op's forward and backward, and
/// what the ops leave of the step (candle's graph: gradient sums, copies, reshapes; AdamW).
fn print_ops(name: &str, m: &Measured) {
    println!();
    println!("per op, {name} (s per step; forwards inside recomputation count as forward):");
    println!("| op | forward | backward | calls per step | share of step |");
    println!("|---|---|---|---|---|");
    let mut names: Vec<&str> = Vec::new();
    for o in &m.ops {
        if !names.contains(&o.op.as_str()) {
            names.push(&o.op);
        }
    }
    let per = |op: &str, pass: Pass| m.ops.iter().find(|o| o.op == op && o.pass == pass);
    let mut total = 0.0;
    for op in names {
        let (f, b) = (per(op, Pass::Forward), per(op, Pass::Backward));
        let (fs, bs) = (f.map_or(0.0, |o| o.seconds), b.map_or(0.0, |o| o.seconds));
        let calls = f.or(b).map_or(0, |o| o.calls);
        total += fs + bs;
        println!("| {op} | {fs:.3} | {bs:.3} | {calls} | {:.0}% |", 100.0 * (fs + bs) / m.step_s);
    }
    let rest = (m.step_s - total).max(0.0);
    println!(
        "| everything else (candle's graph, copies, AdamW) | | | | {:.0}% ({rest:.2} s) |",
        100.0 * rest / m.step_s
    );
}
