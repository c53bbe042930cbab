//! Model hyper-parameters read from a GGUF file, per supported architecture family.

use crate::gguf::meta_str;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use serde::{Deserialize, Serialize};

/// Architecture families the trainer has a gradient-safe forward for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `llama` (SmolLM2, Llama 3): normal RoPE on llama.cpp's permuted Q/K rows.
    Llama,
    /// `qwen2` (Qwen2.5, DeepSeek-R1-Distill-Qwen): NeoX RoPE, q/k/v biases.
    Qwen2,
    /// `gemma3`: scaled embeddings, Q/K norms, sandwich norms, GELU, sliding-window layers.
    Gemma3,
}

/// Names accepted in `general.architecture`.
pub const SUPPORTED: &[&str] = &["llama", "qwen2", "gemma3"];

/// Shape and numerics of a model, as llama.cpp reads them from the GGUF.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchConfig {
    /// Family.
    pub family: Family,
    /// `general.architecture`.
    pub name: String,
    /// Hidden size.
    pub n_embd: usize,
    /// Blocks.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Head width.
    pub head_dim: usize,
    /// Feed-forward width.
    pub n_ff: usize,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// RMS-norm epsilon.
    pub rms_eps: f64,
    /// RoPE base frequency (global layers).
    pub rope_base: f64,
    /// RoPE base frequency of sliding-window layers (gemma3).
    pub rope_base_swa: f64,
    /// Position scale of global layers (1 / linear rope-scaling factor).
    pub rope_scale: f64,
    /// Rotated dimensions per head.
    pub n_rot: usize,
    /// NeoX (half-split) rotation instead of adjacent pairs.
    pub rope_neox: bool,
    /// Sliding window of local layers (0 = none).
    pub sliding_window: usize,
    /// Every `swa_pattern`-th layer is global, the others local (gemma3: 6).
    pub swa_pattern: usize,
    /// Final logit soft-capping (0 = none).
    pub final_logit_softcap: f64,
    /// Emulate llama.cpp's CPU GELU lookup table (parity checks only; see `TrainerConfig`).
    #[serde(default)]
    pub ggml_cpu_gelu: bool,
}

fn get_u(c: &Content, key: &str) -> Option<usize> {
    c.metadata.get(key).and_then(|v| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from))).map(|v| v as usize)
}

fn get_f(c: &Content, key: &str) -> Option<f64> {
    c.metadata.get(key).and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
}

impl ArchConfig {
    /// Reads the hyper-parameters; unsupported architectures get an error naming the supported ones.
    pub fn from_gguf(c: &Content) -> Result<ArchConfig> {
        let name = meta_str(c, "general.architecture").unwrap_or("").to_string();
        let family = match name.as_str() {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "gemma3" => Family::Gemma3,
            other => {
                return Err(Error::invalid(
                    "architecture",
                    format!("the trainer supports {} (this model is {other:?})", SUPPORTED.join(", ")),
                ))
            }
        };
        let need = |key: &str| {
            get_u(c, &format!("{name}.{key}"))
                .ok_or_else(|| Error::invalid("gguf", format!("missing {name}.{key} in the model metadata")))
        };
        let n_embd = need("embedding_length")?;
        let n_head = need("attention.head_count")?;
        let head_dim = get_u(c, &format!("{name}.attention.key_length")).unwrap_or(n_embd / n_head.max(1));
        let n_vocab = match c.tensor_infos.get("token_embd.weight") {
            Some(t) => t.shape.dims()[0],
            None => return Err(Error::invalid("gguf", "missing token_embd.weight")),
        };
        let rope_base = get_f(c, &format!("{name}.rope.freq_base")).unwrap_or(10_000.0);
        let gemma = family == Family::Gemma3;
        let sliding_window = if gemma { get_u(c, &format!("{name}.attention.sliding_window")).unwrap_or(0) } else { 0 };
        let swa_pattern = match c.metadata.get(&format!("{name}.attention.sliding_window_pattern")) {
            Some(Value::U32(p)) => *p as usize,
            _ => 6,
        };
        Ok(ArchConfig {
            family,
            n_embd,
            n_layer: need("block_count")?,
            n_head,
            n_head_kv: get_u(c, &format!("{name}.attention.head_count_kv")).unwrap_or(n_head),
            head_dim,
            n_ff: need("feed_forward_length")?,
            n_vocab,
            rms_eps: get_f(c, &format!("{name}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
            rope_base,
            rope_base_swa: get_f(c, &format!("{name}.rope.freq_base_swa")).unwrap_or(if gemma {
                10_000.0
            } else {
                rope_base
            }),
            rope_scale: match meta_str(c, &format!("{name}.rope.scaling.type")) {
                Some("linear") => 1.0 / get_f(c, &format!("{name}.rope.scaling.factor")).unwrap_or(1.0),
                None | Some("none") => 1.0,
                Some(other) => {
                    return Err(Error::invalid(
                        "architecture",
                        format!("rope scaling {other:?} is not supported by the trainer"),
                    ))
                }
            },
            n_rot: get_u(c, &format!("{name}.rope.dimension_count")).unwrap_or(head_dim),
            rope_neox: family != Family::Llama,
            sliding_window,
            swa_pattern,
            final_logit_softcap: get_f(c, &format!("{name}.final_logit_softcapping")).unwrap_or(0.0),
            ggml_cpu_gelu: false,
            name,
        })
    }

    /// True when layer `il` uses the sliding window (llama.cpp's pattern: all but every n-th).
    pub fn is_swa(&self, il: usize) -> bool {
        self.sliding_window > 0 && (self.swa_pattern == 0 || il % self.swa_pattern < self.swa_pattern - 1)
    }
}
