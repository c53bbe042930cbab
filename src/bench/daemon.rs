//! `gpo bench daemon`: generation through gpod's socket against the in-process library on the
//! same workload (same process, alternating rounds), and requests/s of small generate calls from
//! 16 concurrent clients.

use super::median;
use crate::daemon::client::Client;
use crate::daemon::{serve, DaemonConfig};
use crate::engine::{Engine, EngineConfig, GenerateRequest, KvMode, Prompt, SamplingParams};
use crate::Result;
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// Settings of the daemon benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// GGUF model (default: the cached SmolLM2-135M-Instruct Q4_1).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Sequences per generate call of the throughput workload.
    #[arg(short = 'n', long, default_value_t = 8)]
    pub n: usize,
    /// Tokens per sequence.
    #[arg(short = 'g', long, default_value_t = 64)]
    pub gen: usize,
    /// Rounds (medians reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Concurrent clients of the request-rate workload.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Small requests per client.
    #[arg(long, default_value_t = 8)]
    pub requests: usize,
}

fn workload(n: usize, g: usize, seed: u64) -> (GenerateRequest, serde_json::Value) {
    let prompt = "Write a short story about a robot learning to count.";
    // Same prompt, seed and engine settings on both sides: the same tokens are sampled, so the
    // two paths do identical work (token counts are printed to show it).
    let sp = SamplingParams { temperature: 0.8, max_tokens: g, seed, ..Default::default() };
    let req = GenerateRequest::new(Prompt::user(prompt), n, sp);
    let wire = json!({ "op": "generate", "prompt": prompt, "n": n, "sampling": { "temperature": 0.8, "max_tokens": g, "seed": seed } });
    (req, wire)
}

/// Runs the benchmark and prints a table.
pub fn daemon(args: &DaemonArgs) -> Result<()> {
    let model = match &args.model {
        Some(p) => p.clone(),
        None => crate::models::default_model()?,
    };
    let dir = std::env::temp_dir().join(format!("gpo-bench-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| crate::Error::io(&dir, e))?;
    let socket = dir.join("gpod.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let cfg = DaemonConfig {
        socket: socket.clone(),
        state_dir: dir.clone(),
        model: Some(model.clone()),
        ..Default::default()
    };
    let engine_cfg = EngineConfig {
        model: model.clone(),
        n_ctx: 16 * 1024,
        n_parallel: 16,
        kv_mode: KvMode::PerSequence,
        ..Default::default()
    };
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || serve(cfg, stop))
    };
    let t0 = Instant::now();
    while Client::connect(&socket).is_err() {
        if t0.elapsed().as_secs() > 120 {
            return Err(crate::Error::EngineStopped("gpod did not start".into()));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let local = Engine::start(engine_cfg)?;
    let mut client = Client::connect(&socket)?;
    println!(
        "daemon overhead: generate {} × {} tokens per call, {} rounds, medians; model {}",
        args.n,
        args.gen,
        args.rounds,
        model.display()
    );
    // Warm-up both.
    local.generate(workload(args.n, 4, 0).0)?;
    client.call(workload(args.n, 4, 0).1)?;
    let (mut tl, mut ts, mut tokens_l, mut tokens_s) = (Vec::new(), Vec::new(), 0usize, 0usize);
    for r in 0..args.rounds {
        let (req, wire) = workload(args.n, args.gen, 100 + r as u64);
        let t = Instant::now();
        tokens_l += local.generate(req)?.iter().map(|t| t.tokens.len()).sum::<usize>();
        tl.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let v = client.call(wire)?;
        ts.push(t.elapsed().as_secs_f64());
        tokens_s += v["result"]["trajectories"]
            .as_array()
            .map_or(0, |a| a.iter().map(|t| t["tokens"].as_array().map_or(0, Vec::len)).sum());
    }
    let (ml, ms) = (median(&mut tl), median(&mut ts));
    let (rl, rs) = (tokens_l as f64 / args.rounds as f64 / ml, tokens_s as f64 / args.rounds as f64 / ms);
    println!("tokens generated: in-process {tokens_l}, socket {tokens_s}");
    println!("| path | s/call | tokens/s | vs in-process |");
    println!("|---|---|---|---|");
    println!("| in-process library | {ml:.3} | {rl:.1} | 1.00× |");
    println!("| gpod over the socket | {ms:.3} | {rs:.1} | {:.2}× |", rs / rl);

    // Request rate: many small calls from concurrent clients.
    let small = |c: usize, i: usize| json!({ "op": "generate", "prompt": format!("client {c} request {i}"), "sampling": { "max_tokens": 4, "seed": i } });
    let t = Instant::now();
    let handles: Vec<_> = (0..args.clients)
        .map(|c| {
            let socket = socket.clone();
            let k = args.requests;
            std::thread::spawn(move || -> Result<usize> {
                let mut cl = Client::connect(&socket)?;
                let mut ok = 0;
                for i in 0..k {
                    ok += cl.call(small(c, i))?["ok"].as_bool().unwrap_or(false) as usize;
                }
                Ok(ok)
            })
        })
        .collect();
    let socket_rate = join_counts(handles)? as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let handles: Vec<_> = (0..args.clients)
        .map(|c| {
            let e = local.clone();
            let k = args.requests;
            std::thread::spawn(move || -> Result<usize> {
                for i in 0..k {
                    let sp = SamplingParams { max_tokens: 4, seed: i as u64, ..Default::default() };
                    e.generate(GenerateRequest::new(Prompt::user(format!("client {c} request {i}")), 1, sp))?;
                }
                Ok(k)
            })
        })
        .collect();
    let local_rate = join_counts(handles)? as f64 / t.elapsed().as_secs_f64();
    println!("\nsmall requests (4 tokens) from {} concurrent clients, {} each:", args.clients, args.requests);
    println!("| path | requests/s | vs in-process |");
    println!("|---|---|---|");
    println!("| in-process library ({} threads) | {local_rate:.1} | 1.00× |", args.clients);
    println!("| gpod ({} socket clients) | {socket_rate:.1} | {:.2}× |", args.clients, socket_rate / local_rate);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = server.join();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Joins client threads and sums the requests each completed.
fn join_counts(handles: Vec<std::thread::JoinHandle<Result<usize>>>) -> Result<usize> {
    let mut done = 0;
    for h in handles {
        done += h.join().map_err(|_| crate::Error::EngineStopped("client thread panicked".into()))??;
    }
    Ok(done)
}
