//! # gpo — Guided Pivotal Optimization
//!
//! RL fine-tuning for reasoning LLMs that finds the *critical step* of a trajectory (the step
//! whose Monte-Carlo value changes most), resets generation there and learns from the new
//! continuations (arXiv 2509.16456). Rollouts run on llama.cpp, LoRA training on candle over the
//! same GGUF weights, and adapters hot-swap back into the rollout engine.
//!
//! Layers, in the direction data flows: [`engine`] (llama.cpp rollouts with log-probs, steps,
//! KV forks, adapters) → [`tree`] (prefix values, critical step) → [`reward`] (verifiers) →
//! [`train`] (candle LoRA trainer) → adapter → engine. [`gpo`] sequences them; [`eval`]
//! measures; the C ABI lives in [`ffi`].

pub mod bench;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod eval;
pub mod ffi;
pub mod fsutil;
pub mod gguf;
pub mod gpo;
pub mod llama;
pub mod models;
pub mod reward;
pub mod task;
pub mod train;
pub mod tree;

pub use error::{Error, Result};

/// gpo's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
