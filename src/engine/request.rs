//! What callers ask the engine for: prompts, sampling settings, fork requests.

use super::steps::StepConfig;
use crate::llama::{ChatMessage, Model, Token};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Sampling settings of one request. Chain order: top-k → top-p → min-p → temperature → draw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 = greedy. Default 1.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off. Default 0.
    pub top_k: i32,
    /// Nucleus mass in (0, 1]; 1 = off. Default 1.
    pub top_p: f32,
    /// Drop tokens below `min_p · p_max`, in [0, 1); 0 = off. Default 0.
    pub min_p: f32,
    /// Most tokens to generate per sequence. Default 256.
    pub max_tokens: usize,
    /// Generation stops once the text contains one of these (kept in the output).
    pub stop: Vec<String>,
    /// Seed; sequence `i` of a request uses a seed derived from (seed, i). Default 0.
    pub seed: u64,
    /// Keep generating past end-of-generation tokens (benchmarks). Default false.
    pub ignore_eog: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            max_tokens: 256,
            stop: Vec::new(),
            seed: 0,
            ignore_eog: false,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with `max_tokens`.
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams { temperature: 0.0, max_tokens, ..Default::default() }
    }

    /// Checks every field and names the bad one.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::invalid("temperature", format!("{} must be a finite number ≥ 0", self.temperature)));
        }
        if self.top_k < 0 {
            return Err(Error::invalid("top_k", format!("{} must be ≥ 0 (0 disables it)", self.top_k)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid("top_p", format!("{} must be in (0, 1] (1 disables it)", self.top_p)));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return Err(Error::invalid("min_p", format!("{} must be in [0, 1) (0 disables it)", self.min_p)));
        }
        if self.max_tokens == 0 {
            return Err(Error::invalid("max_tokens", "must be at least 1"));
        }
        if let Some(i) = self.stop.iter().position(String::is_empty) {
            return Err(Error::invalid(
                "stop",
                format!("stop string #{i} is empty; an empty stop string would end generation at once"),
            ));
        }
        Ok(())
    }

    /// Seed of sequence `index` (a SplitMix64 step, so neighbouring seeds differ in every bit).
    pub fn sequence_seed(&self, index: usize) -> u32 {
        let mut z = self.seed.wrapping_add((index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as u32
    }
}

/// The prompt of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Messages rendered with the model's chat template (assistant turn opened).
    Chat(Vec<ChatMessage>),
    /// Raw text, tokenized as is (BOS added when the model wants one).
    Raw(String),
    /// Token ids, used as is.
    Tokens(Vec<Token>),
}

impl Prompt {
    /// A single user message through the chat template.
    pub fn user(text: impl Into<String>) -> Prompt {
        Prompt::Chat(vec![ChatMessage::user(text)])
    }

    /// A user message after an optional system message.
    pub fn with_system(system: Option<&str>, text: impl Into<String>) -> Prompt {
        let mut m: Vec<ChatMessage> =
            system.map(|s| ChatMessage { role: "system".into(), content: s.into() }).into_iter().collect();
        m.push(ChatMessage::user(text));
        Prompt::Chat(m)
    }

    /// The prompt's tokens as the engine feeds them (chat template with special tokens, raw
    /// text with BOS as the model wants, or the ids themselves after a vocabulary check).
    pub fn tokens(&self, model: &Model) -> Result<Vec<Token>> {
        let tokens = match self {
            Prompt::Chat(messages) => {
                if messages.is_empty() {
                    return Err(Error::invalid("prompt", "a chat prompt needs at least one message"));
                }
                model.tokenize(&model.apply_chat_template(messages)?, true, true)?
            }
            Prompt::Raw(text) => model.tokenize(text, true, false)?,
            Prompt::Tokens(t) => {
                if !model.valid_tokens(t) {
                    return Err(Error::invalid("prompt", format!("token ids must be in 0..{}", model.n_vocab())));
                }
                t.clone()
            }
        };
        if tokens.is_empty() {
            return Err(Error::invalid("prompt", "the prompt has no tokens"));
        }
        Ok(tokens)
    }
}

/// Where a forked trajectory came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkOrigin {
    /// Trajectory forked from.
    pub parent: u64,
    /// Number of the parent's generated tokens kept as prefix.
    pub at: usize,
}

/// A request: `n` sequences continuing one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// What to continue.
    pub prompt: Prompt,
    /// Number of sequences (≥ 1).
    pub n: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Step segmentation of the outputs.
    pub steps: StepConfig,
    /// Send a [`super::Event::Token`] per generated token.
    pub stream: bool,
    /// Tokens at the start of a `Prompt::Tokens` prompt that are the original prompt (the rest is
    /// an inherited completion prefix); None = all of it.
    pub prompt_len: Option<usize>,
    /// Set by [`super::Engine::fork`].
    pub origin: Option<ForkOrigin>,
}

impl GenerateRequest {
    /// `n` samples of `prompt` with `sampling`, default steps, no streaming.
    pub fn new(prompt: Prompt, n: usize, sampling: SamplingParams) -> Self {
        GenerateRequest {
            prompt,
            n,
            sampling,
            steps: StepConfig::default(),
            stream: false,
            prompt_len: None,
            origin: None,
        }
    }

    /// `n` continuations of `parent` after its first `at` generated tokens (the request behind
    /// a KV fork).
    pub fn continuing(parent: &super::Trajectory, at: usize, n: usize, sampling: SamplingParams) -> Result<Self> {
        if at > parent.tokens.len() {
            return Err(Error::invalid(
                "at",
                format!("fork position {at} is past the trajectory's {} tokens", parent.tokens.len()),
            ));
        }
        let mut tokens = parent.context.as_ref().clone();
        tokens.extend_from_slice(&parent.tokens[..at]);
        let mut req = GenerateRequest::new(Prompt::Tokens(tokens), n, sampling);
        req.prompt_len = Some(parent.prompt_len);
        req.origin = Some(ForkOrigin { parent: parent.id, at });
        Ok(req)
    }
}
