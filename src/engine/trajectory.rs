//! A generated sequence with everything training needs.

use super::request::ForkOrigin;
use super::steps::StepSpan;
use crate::llama::Token;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model emitted an end-of-generation token (kept as the last token).
    Eog,
    /// `max_tokens` reached.
    Length,
    /// A stop string appeared (kept in the text).
    Stop(String),
    /// The sequence filled its KV capacity.
    ContextFull,
    /// The request was cancelled.
    Cancelled,
}

/// One generated sequence. `context` holds every token fed before the first generated token:
/// the prompt (`context[..prompt_len]`) followed, for forks, by the inherited completion prefix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    /// Engine-wide unique id.
    pub id: u64,
    /// Request it belongs to.
    pub request: u64,
    /// Index within the request (0..n).
    pub index: usize,
    /// Tokens before the generated ones.
    pub context: Arc<Vec<Token>>,
    /// Length of the original prompt inside `context`.
    pub prompt_len: usize,
    /// Generated tokens.
    pub tokens: Vec<Token>,
    /// `log π(token)` of each generated token (see [`super::logprob`]).
    pub logprobs: Vec<f32>,
    /// Text of the generated tokens.
    pub text: String,
    /// Steps over `tokens`.
    pub steps: Vec<StepSpan>,
    /// Adapter version that produced every token.
    pub adapter_version: u64,
    /// Temperature the log-probs were computed at.
    pub temperature: f32,
    /// Why generation stopped.
    pub finish: FinishReason,
    /// Set when this sequence continues another trajectory.
    pub origin: Option<ForkOrigin>,
}

impl Trajectory {
    /// Prompt tokens.
    pub fn prompt(&self) -> &[Token] {
        &self.context[..self.prompt_len]
    }

    /// Inherited completion tokens (forks) followed by the generated ones.
    pub fn completion(&self) -> Vec<Token> {
        self.context[self.prompt_len..].iter().chain(&self.tokens).copied().collect()
    }

    /// The generated tokens of each step, in order (the edges of the trajectory's tree path).
    pub fn step_tokens(&self) -> Vec<&[Token]> {
        self.steps.iter().map(|s| &self.tokens[s.start..s.end]).collect()
    }

    /// Sum of the generated tokens' log-probs.
    pub fn total_logprob(&self) -> f64 {
        self.logprobs.iter().map(|&l| l as f64).sum()
    }
}
