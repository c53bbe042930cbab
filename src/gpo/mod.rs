//! The GPO loop (Guided Pivotal Optimization): sample trajectories, estimate step values by
//! Monte-Carlo rollouts from KV-forked prefixes, find the critical step, reset there, and train
//! online (GPO-GRPO/PPO) or offline (GPO-DPO/KTO/SimPO/ORPO) — plus the baselines at equal
//! budget. Driven by `gpo train --config run.toml`.

pub mod chart;
pub mod collect;
pub mod config;
pub mod export;
pub mod plot;
pub mod report;
pub mod run;
pub mod values;

pub use config::{Mode, RunConfig};
pub use run::{read_metrics, run, MetricsRow, Progress, Quiet};
