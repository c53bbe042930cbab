//! gpod — the gpo daemon: `gpod --socket /tmp/gpo.sock [--config gpod.toml] [--model m.gguf]`.

use clap::Parser;
use gpo::daemon::{serve, DaemonConfig};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "gpod", version, about = "gpo daemon: generation, step values and GPO training over a Unix socket")]
struct Cli {
    /// Socket path (overrides the config).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// gpod.toml (limits, allowed users, group, state directory, model).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model to serve from the start (overrides the config).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Directory for queued jobs (overrides the config; must belong to this user, not be
    /// writable by others).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Root of the model, adapter and task files clients may name (overrides `[paths] models`).
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// Root of the run directories clients' training jobs write (overrides `[paths] runs`).
    #[arg(long)]
    runs_dir: Option<PathBuf>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GPO_LOG").unwrap_or_else(|_| "info,llama.cpp=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut cfg = match &cli.config {
        Some(p) => gpo::daemon::server::load_config(p).unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(2)
        }),
        None => DaemonConfig::default(),
    };
    if let Some(s) = cli.socket {
        cfg.socket = s;
    }
    if let Some(m) = cli.model {
        cfg.model = Some(m);
    }
    if let Some(d) = cli.state_dir {
        cfg.state_dir = d;
    }
    if let Some(d) = cli.models_dir {
        cfg.paths.models = d;
    }
    if let Some(d) = cli.runs_dir {
        cfg.paths.runs = Some(d);
    }
    // SIGTERM / SIGINT: stop admitting, reply to what is in flight, checkpoint, exit.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("error: cannot handle signal {sig}: {e}");
            std::process::exit(1);
        }
    }
    if let Err(e) = serve(cfg, stop) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
