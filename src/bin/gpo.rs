//! `gpo`: the command line for humans. Subcommands: demo, generate, eval, tasks, bench, info.

use clap::{Args, Parser, Subcommand};
use gpo::engine::{Engine, EngineConfig, GenerateRequest, KvMode, Prompt, SamplingParams, StepConfig};
use gpo::eval::{evaluate, EvalConfig};
use gpo::task::{self, arith::ArithConfig, Task};
use gpo::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "gpo",
    version,
    about = "Guided Pivotal Optimization: critical-step RL fine-tuning on llama.cpp + candle"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate and evaluate on the built-in arithmetic task with the default model.
    Demo {
        #[command(flatten)]
        engine: EngineArgs,
        /// Number of held-out problems.
        #[arg(long, default_value_t = 20)]
        n: usize,
    },
    /// Sample completions for one prompt and print them with steps and log-probs.
    Generate {
        #[command(flatten)]
        engine: EngineArgs,
        /// The prompt (a user message, through the chat template unless --raw).
        #[arg(long)]
        prompt: String,
        /// Send the prompt as raw text, without the chat template.
        #[arg(long)]
        raw: bool,
        /// Number of samples.
        #[arg(short, long, default_value_t = 1)]
        n: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Print JSON lines (one trajectory each) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Accuracy (greedy, optionally pass@k) on a JSONL task file or generated problems.
    Eval {
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        tasks: TaskArgs,
        /// LoRA adapter (GGUF) to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Samples per task for pass@k (0 = greedy only).
        #[arg(long, default_value_t = 0)]
        k: usize,
        /// Tokens per answer.
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// Write per-task results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// System message before each task.
        #[arg(long)]
        system: Option<String>,
        /// Temperature of the pass@k samples.
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
    },
    /// Run GPO (or a baseline) from a TOML config; re-running the same command resumes.
    Train {
        /// Run configuration (TOML; see configs/).
        #[arg(long)]
        config: PathBuf,
        /// Override the config's master seed (repeated runs of one config).
        #[arg(long)]
        seed: Option<u64>,
        /// Override the config's output directory.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Plot held-out accuracy and reward per iteration of one or more runs (SVG).
    Plot {
        /// Run directories.
        #[arg(long = "run", required = true)]
        runs: Vec<PathBuf>,
        /// Output SVG.
        #[arg(long, default_value = "plot.svg")]
        out: PathBuf,
    },
    /// The experiment report: per setting under --dir (<setting>/<arm>/seed-<n>/), a table of
    /// held-out accuracy (mean ± 95% interval over seeds) and token use, and a plot with a band
    /// per arm; the tables replace the README's `<!-- report:<setting> -->` sections.
    Report {
        /// Directory of finished runs.
        #[arg(long, default_value = "docs/experiment")]
        dir: PathBuf,
        /// README to update in place (without it the tables are printed).
        #[arg(long)]
        readme: Option<PathBuf>,
        /// Where the plots go (experiment-<setting>.svg).
        #[arg(long, default_value = "docs")]
        plots: PathBuf,
    },
    /// Merge a run's critical-step pairs and reset rollouts into TRL-shaped JSONL files.
    Export {
        /// Run directory.
        #[arg(long)]
        run: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Train a LoRA adapter on a JSONL file of scored completions or preference data.
    Fit(FitArgs),
    /// Write generated arithmetic problems as JSONL to stdout.
    Tasks {
        #[command(flatten)]
        tasks: TaskArgs,
    },
    /// Benchmarks that print ratios against a baseline measured in the same process.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
    /// Print what the model is and how the engine would run it.
    Info {
        #[command(flatten)]
        engine: EngineArgs,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Rollout engine vs a raw llama.cpp C-API loop on the same workload.
    Rollout(gpo::bench::RolloutArgs),
    /// Training step (forward + backward + AdamW) vs PyTorch + PEFT and candle's plain autograd.
    Train(gpo::bench::train::TrainArgs),
    /// gpod over its socket vs the in-process library; request rate with 16 clients.
    Daemon(gpo::bench::daemon::DaemonArgs),
}

#[derive(Args, Clone)]
struct FitArgs {
    /// Training data (JSONL): {"prompt","completion","reward"} for nll/ppo/grpo,
    /// {"prompt","chosen","rejected"} for dpo/simpo/orpo, {"prompt","completion","label"} for kto.
    #[arg(long)]
    data: PathBuf,
    /// GGUF model (default: the cached SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    model: Option<PathBuf>,
    /// nll, ppo, grpo, dpo, kto, simpo or orpo.
    #[arg(long, default_value = "grpo")]
    objective: String,
    /// Where to write the llama.cpp GGUF LoRA adapter.
    #[arg(long, default_value = "adapter.gguf")]
    out: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA alpha (default 2 × rank).
    #[arg(long)]
    alpha: Option<f32>,
    /// Adapted projections, comma separated (q,k,v,o,gate,up,down).
    #[arg(long, default_value = "q,k,v,o,gate,up,down", value_delimiter = ',')]
    targets: Vec<String>,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Passes over the data.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Items per optimiser step (GRPO keeps groups together).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Sampling temperature the completions were drawn at.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Checkpoint directory (resumes from its newest checkpoint).
    #[arg(long)]
    checkpoints: Option<PathBuf>,
    /// Append one JSON line of metrics per step here.
    #[arg(long)]
    metrics: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct EngineArgs {
    /// GGUF model (default: the cached SmolLM2-135M-Instruct Q4_1).
    #[arg(long, global = true)]
    model: Option<PathBuf>,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: i32,
    /// Layers on the GPU (-1 = all).
    #[arg(long, default_value_t = -1)]
    gpu_layers: i32,
    /// Total KV cells (per-sequence KV: each sequence holds ctx / parallel).
    #[arg(long, default_value_t = 16384)]
    ctx: u32,
    /// Parallel sequences.
    #[arg(long, default_value_t = 16)]
    parallel: u32,
    /// KV layout: per-sequence (default, measured faster) or unified.
    #[arg(long, default_value = "per-sequence")]
    kv: KvMode,
    /// Where tokens are sampled: auto (the decode graph on a GPU, else the host), graph or host.
    #[arg(long, default_value = "auto")]
    sampling: gpo::engine::SamplingBackend,
}

impl EngineArgs {
    fn config(&self) -> Result<EngineConfig> {
        let model = match &self.model {
            Some(p) => p.clone(),
            None => gpo::models::default_model()?,
        };
        Ok(EngineConfig {
            model,
            n_threads: self.threads,
            n_gpu_layers: self.gpu_layers,
            n_ctx: self.ctx,
            n_parallel: self.parallel,
            kv_mode: self.kv,
            sampling: self.sampling,
            ..Default::default()
        })
    }
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: i32,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Min-p (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Tokens per sample.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            seed: self.seed,
            ignore_eog: false,
        }
    }
}

#[derive(Args, Clone)]
struct TaskArgs {
    /// JSONL task file ({"prompt": …, "answer": …} per line); default: generated problems.
    #[arg(long)]
    tasks: Option<PathBuf>,
    /// Number of generated problems.
    #[arg(long, default_value_t = 50)]
    count: usize,
    /// Operations per generated problem.
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Largest operand of generated problems.
    #[arg(long, default_value_t = 10)]
    max_operand: u32,
    /// Allow doubling/tripling steps.
    #[arg(long)]
    multiply: bool,
    /// Seed of generated problems (held-out sets use a different seed than training).
    #[arg(long, default_value_t = 1_000_003)]
    task_seed: u64,
}

impl TaskArgs {
    fn load(&self) -> Result<Vec<Task>> {
        match &self.tasks {
            Some(p) => task::load_jsonl(p),
            None => ArithConfig {
                steps: self.steps,
                max_operand: self.max_operand,
                multiply: self.multiply,
                ..Default::default()
            }
            .generate(self.count, self.task_seed),
        }
    }
}

/// Progress on stderr: a bar on a terminal; elsewhere (CI logs, pipes) a plain line whenever the
/// message changes and every 5 s otherwise, as cargo and pip do, so a long phase never looks hung.
#[derive(Clone)]
struct Meter {
    pb: ProgressBar,
    /// Plain-line mode: the last line's time and message.
    plain: Option<Arc<Mutex<(Instant, String)>>>,
}

impl Meter {
    fn tick(&self, force: bool) {
        let Some(p) = &self.plain else { return };
        let Ok(mut last) = p.lock() else { return };
        let msg = self.pb.message();
        if force || msg != last.1 || last.0.elapsed() >= Duration::from_secs(5) {
            let len = self.pb.length().unwrap_or(0);
            eprintln!("{msg}: {}/{len} ({:.0} s)", self.pb.position(), self.pb.elapsed().as_secs_f64());
            *last = (Instant::now(), msg);
        }
    }
    fn set_message(&self, m: String) {
        self.pb.set_message(m);
        self.tick(false);
    }
    fn set_position(&self, p: u64) {
        self.pb.set_position(p);
        self.tick(false);
    }
    fn inc(&self, n: u64) {
        self.pb.inc(n);
        self.tick(false);
    }
    fn println(&self, line: String) {
        match self.plain {
            Some(_) => eprintln!("{line}"),
            None => self.pb.println(line),
        }
    }
    fn finish_and_clear(&self) {
        if self.plain.is_some() && !self.pb.is_finished() {
            self.tick(true);
        }
        self.pb.finish_and_clear();
    }
}

fn bar(len: usize, what: &str) -> Meter {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let pb = if terminal {
        ProgressBar::new(len as u64)
    } else {
        ProgressBar::with_draw_target(Some(len as u64), indicatif::ProgressDrawTarget::hidden())
    };
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} ({elapsed})")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    let plain = (!terminal).then(|| Arc::new(Mutex::new((Instant::now(), String::new()))));
    let m = Meter { pb, plain };
    m.tick(true);
    if m.plain.is_some() {
        // Phases that report nothing for minutes (a held-out evaluation inside a run) still get
        // a line every few seconds.
        let ticker = m.clone();
        std::thread::spawn(move || {
            while !ticker.pb.is_finished() {
                std::thread::sleep(Duration::from_secs(5));
                ticker.tick(false);
            }
        });
    }
    m
}

fn run_eval(engine: &Engine, tasks: &[Task], cfg: &EvalConfig) -> Result<gpo::eval::EvalReport> {
    let pb = bar(tasks.len(), "evaluating");
    let report = evaluate(engine, tasks, cfg, |done| pb.set_position(done as u64))?;
    pb.finish_and_clear();
    Ok(report)
}

struct Bars {
    bar: Meter,
}

impl gpo::gpo::Progress for Bars {
    fn phase(&mut self, iteration: usize, what: &str) {
        self.bar.set_message(format!("iteration {iteration}: {what}"));
    }
    fn iteration(&mut self, r: &gpo::gpo::MetricsRow) {
        self.bar.inc(1);
        let held = r.heldout_accuracy.map(|a| format!(", held-out {:.1}%", 100.0 * a)).unwrap_or_default();
        self.bar.println(format!(
            "iter {:>3} reward {:.3} loss {} critical {:?} value-cost {:.0}% rollouts {} ({:.0} tok/s) train {:.0} tok/s{held}",
            r.iteration,
            r.reward_mean,
            r.loss.map_or("-".into(), |l| format!("{l:.4}")),
            r.critical_histogram,
            100.0 * r.value_cost,
            r.collect.total_rollouts(),
            r.rollout_tokens_per_s,
            r.train_tokens_per_s,
        ));
    }
}

fn train_run(config: &std::path::Path, seed: Option<u64>, output: Option<PathBuf>) -> Result<()> {
    let mut cfg = gpo::gpo::RunConfig::load(config)?;
    if let Some(s) = seed {
        cfg.seed = s;
    }
    if let Some(o) = output {
        cfg.output = o;
    }
    let done = gpo::gpo::read_metrics(&cfg.output)?.len();
    eprintln!(
        "run: {} mode, {} iterations → {}{}",
        cfg.mode.name(),
        cfg.iterations,
        cfg.output.display(),
        if done > 0 { format!(" (resuming after {done})") } else { String::new() }
    );
    let bar = bar(cfg.iterations, "starting");
    bar.set_position(done as u64);
    let rows = gpo::gpo::run(&cfg, &mut Bars { bar: bar.clone() })?;
    bar.finish_and_clear();
    let initial: Option<f64> = std::fs::read_to_string(cfg.output.join("eval-initial.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["heldout_accuracy"].as_f64());
    let fin = rows.iter().rev().find_map(|r| r.heldout_accuracy);
    if let (Some(a), Some(b)) = (initial, fin) {
        println!("held-out accuracy: {:.1}% → {:.1}%", 100.0 * a, 100.0 * b);
    }
    gpo::gpo::plot::plot(&[cfg.output.as_path()], &cfg.output.join("plot.svg"))?;
    println!(
        "metrics: {}  plot: {}",
        cfg.output.join("metrics.jsonl").display(),
        cfg.output.join("plot.svg").display()
    );
    Ok(())
}

fn fit(a: FitArgs) -> Result<()> {
    use gpo::train::{jsonl, LoraConfig, Objective, OptimConfig, Schedule, Target, Trainer, TrainerConfig};
    let model = match a.model {
        Some(p) => p,
        None => gpo::models::default_model()?,
    };
    let objective = Objective::by_name(&a.objective)?;
    let targets = a.targets.iter().map(|t| t.trim().parse::<Target>()).collect::<Result<Vec<_>>>()?;
    let vocab = gpo::llama::Model::load(
        &model,
        &gpo::llama::ModelParams { vocab_only: true, n_gpu_layers: 0, ..Default::default() },
    )?;
    let data = jsonl::load(&a.data, &objective, &vocab)?;
    let batches = data.chunks(a.batch);
    let total = (batches.len() * a.epochs) as u64;
    let cfg = TrainerConfig {
        model,
        objective,
        lora: LoraConfig { rank: a.rank, alpha: a.alpha.unwrap_or(2.0 * a.rank as f32), targets, seed: 0 },
        optim: OptimConfig {
            lr: a.lr,
            schedule: Schedule::Cosine,
            total_steps: total,
            warmup_steps: total / 20,
            ..Default::default()
        },
        temperature: a.temperature,
        ..Default::default()
    };
    let (mut trainer, resumed) = match &a.checkpoints {
        Some(dir) => Trainer::resume_or_new(cfg, dir)?,
        None => (Trainer::new(cfg)?, None),
    };
    if let Some(m) = &resumed {
        eprintln!("resumed from step {}", m.step);
    }
    eprintln!(
        "{} items in {} batches × {} epochs; {} trainable parameters",
        data.len(),
        batches.len(),
        a.epochs,
        trainer.lora().n_params()
    );
    let pb = bar(total as usize, "training");
    pb.set_position(trainer.steps_done());
    let mut metrics = match &a.metrics {
        Some(p) => Some(std::fs::OpenOptions::new().create(true).append(true).open(p).map_err(|e| Error::io(p, e))?),
        None => None,
    };
    for step in trainer.steps_done()..total {
        let r = trainer.step(&batches[(step as usize) % batches.len()])?;
        if let Some(why) = &r.skipped {
            pb.println(format!("step {step}: skipped ({why})"));
        }
        pb.set_message(format!("loss {:.4} | {:.0} tok/s", r.loss, r.tokens_per_s));
        pb.inc(1);
        if let Some(f) = metrics.as_mut() {
            use std::io::Write;
            writeln!(f, "{}", serde_json::to_string(&r).expect("report serialises"))
                .map_err(|e| Error::io(a.metrics.as_ref().expect("path"), e))?;
        }
        if let Some(dir) = &a.checkpoints {
            trainer.save_checkpoint(dir, serde_json::Value::Null)?;
        }
    }
    pb.finish_and_clear();
    trainer.export_adapter(&a.out)?;
    println!(
        "adapter written to {} ({} steps); load it with `gpo eval --adapter {}`",
        a.out.display(),
        trainer.steps_done(),
        a.out.display()
    );
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("GPO_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e}");
        std::process::exit(match e {
            Error::Invalid { .. } | Error::PromptTooLong { .. } => 2,
            _ => 1,
        });
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Demo { engine, n } => {
            let cfg = engine.config()?;
            eprintln!("model: {}", cfg.model.display());
            let engine = Engine::start(cfg)?;
            let tasks = ArithConfig::default().generate(n, 1_000_003)?;
            println!("Problem: {}\n", tasks[0].prompt);
            let sp = SamplingParams { temperature: 0.8, max_tokens: 160, seed: 1, ..Default::default() };
            let samples = engine.generate(GenerateRequest::new(Prompt::user(&tasks[0].prompt), 2, sp))?;
            for (i, t) in samples.iter().enumerate() {
                println!(
                    "--- sample {i}: {} steps, {} tokens, log-prob {:.2}, reward {}",
                    t.steps.len(),
                    t.tokens.len(),
                    t.total_logprob(),
                    gpo::reward::number::score(&t.text, &tasks[0].answer)
                );
                for (k, s) in t.steps.iter().enumerate() {
                    println!("  [{k}] {}", engine.model().detokenize(&t.tokens[s.start..s.end]).trim_end());
                }
            }
            let report = run_eval(
                &engine,
                &tasks,
                &EvalConfig { max_tokens: 160, k: 4, temperature: 0.8, seed: 7, system: None },
            )?;
            println!(
                "\nheld-out accuracy on {} generated problems: greedy {:.1}%, pass@4 {:.1}%, mean sample accuracy {:.1}%",
                report.tasks,
                100.0 * report.greedy_accuracy,
                100.0 * report.pass_at_k,
                100.0 * report.sample_accuracy
            );
        }
        Cmd::Generate { engine, prompt, raw, n, sampling, json } => {
            let engine = Engine::start(engine.config()?)?;
            let prompt = if raw { Prompt::Raw(prompt) } else { Prompt::user(prompt) };
            let mut req = GenerateRequest::new(prompt, n, sampling.params());
            req.steps = StepConfig::default();
            for t in engine.generate(req)? {
                if json {
                    println!("{}", serde_json::to_string(&t).expect("trajectory serialises"));
                } else {
                    println!(
                        "=== sample {} ({:?}, {} tokens, {} steps, log-prob {:.3})",
                        t.index,
                        t.finish,
                        t.tokens.len(),
                        t.steps.len(),
                        t.total_logprob()
                    );
                    println!("{}", t.text);
                }
            }
        }
        Cmd::Eval { engine, tasks, adapter, k, max_tokens, out, system, temperature } => {
            let engine = Engine::start(engine.config()?)?;
            if let Some(a) = adapter {
                engine.set_adapter(a, 1.0)?;
            }
            let tasks = tasks.load()?;
            let report =
                run_eval(&engine, &tasks, &EvalConfig { max_tokens, k, system, temperature, ..Default::default() })?;
            println!("tasks {}  greedy accuracy {:.1}%", report.tasks, 100.0 * report.greedy_accuracy);
            if k > 0 {
                println!(
                    "pass@{k} {:.1}%  sample accuracy {:.1}%",
                    100.0 * report.pass_at_k,
                    100.0 * report.sample_accuracy
                );
            }
            if let Some(p) = out {
                std::fs::write(&p, serde_json::to_string_pretty(&report).expect("report serialises"))
                    .map_err(|e| Error::io(&p, e))?;
            }
        }
        Cmd::Fit(args) => fit(args)?,
        Cmd::Train { config, seed, output } => train_run(&config, seed, output)?,
        Cmd::Plot { runs, out } => {
            let refs: Vec<&std::path::Path> = runs.iter().map(|p| p.as_path()).collect();
            gpo::gpo::plot::plot(&refs, &out)?;
            println!("plot written to {}", out.display());
        }
        Cmd::Report { dir, readme, plots } => {
            for s in gpo::gpo::report::report(&dir, readme.as_deref(), &plots)? {
                eprintln!("report: {s} → {}", plots.join(format!("experiment-{s}.svg")).display());
            }
        }
        Cmd::Export { run, out } => {
            for (kind, path, rows) in gpo::gpo::export::merge(&run, &out)? {
                println!("{kind}: {rows} rows → {}", path.display());
            }
        }
        Cmd::Tasks { tasks } => {
            for t in tasks.load()? {
                println!("{}", serde_json::to_string(&t).expect("task serialises"));
            }
        }
        Cmd::Bench { which } => match which {
            BenchCmd::Rollout(args) => gpo::bench::rollout(&args)?,
            BenchCmd::Train(args) => gpo::bench::train::train(&args)?,
            BenchCmd::Daemon(args) => gpo::bench::daemon::daemon(&args)?,
        },
        Cmd::Info { engine } => {
            let cfg = engine.config()?;
            let engine = Engine::start(cfg.clone())?;
            println!("{}", serde_json::to_string_pretty(engine.info()).expect("info serialises"));
            println!("llama.cpp {} | {}", gpo::llama::version(), gpo::llama::system_info().trim());
            print_choices(&cfg, engine.info());
        }
    }
    Ok(())
}

/// What the engine chose for this machine, and why (`gpo info`).
fn print_choices(cfg: &EngineConfig, info: &gpo::engine::EngineInfo) {
    let devices = gpo::llama::devices();
    println!("devices:");
    for d in &devices {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        println!(
            "  {} ({}){}",
            d.name,
            d.description,
            if d.gpu {
                format!(", {:.1} GiB, {:.1} GiB free", gib(d.memory.0), gib(d.memory.1))
            } else {
                String::new()
            }
        );
    }
    let gpu = devices.iter().find(|d| d.gpu);
    let layers = match (gpu, cfg.n_gpu_layers) {
        (None, _) => "all on the CPU: llama.cpp found no GPU".to_string(),
        (Some(g), n) if n < 0 => format!("all on {} (gpu_layers = -1: everything that fits is offloaded)", g.name),
        (Some(g), 0) => format!("all on the CPU (gpu_layers = 0), although {} is present", g.name),
        (Some(g), n) => format!("{n} on {}, the rest on the CPU", g.name),
    };
    println!("layers: {layers}");
    let sampling = match (cfg.sampling, info.graph_sampling) {
        (gpo::engine::SamplingBackend::Auto, true) => {
            "in the decode graph (auto: the logits live on the GPU, so one token and one log-prob per sequence come back instead of a vocabulary row)"
        }
        (gpo::engine::SamplingBackend::Auto, false) => {
            "on the host (auto: no GPU holds the logits; on the CPU the host path measured faster than the graph's full-row top-k)"
        }
        (_, true) => "in the decode graph (asked for)",
        (_, false) => "on the host (asked for)",
    };
    println!("sampling: {sampling}");
    println!(
        "kv: {} ({})",
        info.kv_mode,
        match info.kv_mode {
            KvMode::PerSequence => "default: decodes as fast as the raw C-API loop and cached prefixes do not slow it",
            KvMode::Unified => "asked for: forks share cells, but attention spans every cached cell",
        }
    );
    println!(
        "parallel: {} sequences × {} KV cells, batches of up to {} tokens per decode",
        info.n_parallel, info.n_ctx_seq, info.n_batch
    );
}
