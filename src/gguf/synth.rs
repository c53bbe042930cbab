//! Small random-weight GGUF models in llama.cpp's layout, for fast numeric tests and for
//! benchmarking model shapes without downloading weights. The tokenizer (and chat template) is
//! copied from a donor GGUF so prompts tokenize exactly as with the real model.

use crate::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// Shape and family of a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    /// `llama`, `qwen2` (adds q/k/v biases) or `gemma3` (Q/K norms, sandwich norms, sliding
    /// window on all but every 6th layer).
    pub architecture: String,
    /// Hidden size.
    pub n_embd: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Head width (None = n_embd / n_head).
    pub head_dim: Option<usize>,
    /// Sliding window of local layers (gemma3).
    pub sliding_window: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Feed-forward width.
    pub n_ff: usize,
    /// Training context length written to the metadata.
    pub n_ctx_train: usize,
    /// RoPE base frequency.
    pub rope_base: f32,
    /// RMS-norm epsilon.
    pub rms_eps: f32,
    /// Share `token_embd` as the output matrix (no `output.weight`).
    pub tie_embeddings: bool,
    /// Storage type of the matrices (F32 or F16; norms and biases are always F32).
    pub dtype: GgmlDType,
    /// Scale of the output matrix (implies an untied `output.weight` when not 1). Random weights
    /// give nearly uniform next-token distributions; a scale of ~30 makes them peaked like a
    /// trained model's, so sampling does not hinge on 1e-7 differences between kernels.
    pub logit_scale: f32,
    /// Weight seed.
    pub seed: u64,
}

impl SynthSpec {
    /// A tiny llama-family model (fast enough for unit tests).
    pub fn tiny(architecture: &str) -> SynthSpec {
        SynthSpec {
            architecture: architecture.into(),
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            head_dim: None,
            sliding_window: 0,
            n_head_kv: 2,
            n_ff: 128,
            n_ctx_train: 2048,
            rope_base: 10_000.0,
            rms_eps: 1e-5,
            tie_embeddings: true,
            dtype: GgmlDType::F32,
            logit_scale: 1.0,
            seed: 0,
        }
    }

    fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.n_embd / self.n_head)
    }
}

fn bad(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Gguf { path: path.to_path_buf(), reason: e.to_string() }
}

/// Writes a random-weight model with `spec`'s shape and the donor's tokenizer.
pub fn write_synthetic(path: &Path, donor: &Path, spec: &SynthSpec) -> Result<()> {
    if !matches!(spec.architecture.as_str(), "llama" | "qwen2" | "gemma3") {
        return Err(Error::invalid(
            "architecture",
            format!("{} (synthetic models: llama, qwen2, gemma3)", spec.architecture),
        ));
    }
    if spec.n_head == 0 || spec.head_dim() == 0 || spec.n_head_kv == 0 || spec.n_head % spec.n_head_kv != 0 {
        return Err(Error::invalid("shape", "n_head must be positive and divide by n_head_kv"));
    }
    let (donor_content, _) = super::read_content(donor)?;
    let n_vocab = match donor_content.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => tokens.len(),
        _ => return Err(bad(donor, "donor has no tokenizer.ggml.tokens")),
    };
    let arch = spec.architecture.as_str();
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(format!("gpo-synthetic-{arch}"))),
        (format!("{arch}.context_length"), Value::U32(spec.n_ctx_train as u32)),
        (format!("{arch}.embedding_length"), Value::U32(spec.n_embd as u32)),
        (format!("{arch}.block_count"), Value::U32(spec.n_layer as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(spec.n_ff as u32)),
        (format!("{arch}.attention.head_count"), Value::U32(spec.n_head as u32)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(spec.n_head_kv as u32)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(spec.rms_eps)),
        (format!("{arch}.rope.freq_base"), Value::F32(spec.rope_base)),
        (format!("{arch}.rope.dimension_count"), Value::U32(spec.head_dim() as u32)),
        (format!("{arch}.vocab_size"), Value::U32(n_vocab as u32)),
        (format!("{arch}.attention.key_length"), Value::U32(spec.head_dim() as u32)),
        (format!("{arch}.attention.value_length"), Value::U32(spec.head_dim() as u32)),
    ];
    if arch == "gemma3" && spec.sliding_window > 0 {
        md.push((format!("{arch}.attention.sliding_window"), Value::U32(spec.sliding_window as u32)));
    }
    let mut tok_keys: Vec<&String> = donor_content.metadata.keys().filter(|k| k.starts_with("tokenizer.")).collect();
    tok_keys.sort();
    for k in tok_keys {
        md.push((k.clone(), donor_content.metadata[k].clone()));
    }

    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut ts: Vec<(String, QTensor)> = Vec::new();
    let mut matrix = |name: String, rows: usize, cols: usize, rng: &mut ChaCha8Rng| -> Result<()> {
        let s = if name == "output.weight" { spec.logit_scale } else { 1.0 } / (cols as f32).sqrt();
        let data: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-s..s)).collect();
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).map_err(|e| bad(path, e))?;
        ts.push((name, QTensor::quantize(&t, spec.dtype).map_err(|e| bad(path, e))?));
        Ok(())
    };
    let (e, hd, kv) = (spec.n_embd, spec.head_dim(), spec.n_head_kv * spec.head_dim());
    matrix("token_embd.weight".into(), n_vocab, e, &mut rng)?;
    if !spec.tie_embeddings || spec.logit_scale != 1.0 {
        matrix("output.weight".into(), n_vocab, e, &mut rng)?;
    }
    for l in 0..spec.n_layer {
        matrix(format!("blk.{l}.attn_q.weight"), spec.n_head * hd, e, &mut rng)?;
        matrix(format!("blk.{l}.attn_k.weight"), kv, e, &mut rng)?;
        matrix(format!("blk.{l}.attn_v.weight"), kv, e, &mut rng)?;
        matrix(format!("blk.{l}.attn_output.weight"), e, spec.n_head * hd, &mut rng)?;
        matrix(format!("blk.{l}.ffn_gate.weight"), spec.n_ff, e, &mut rng)?;
        matrix(format!("blk.{l}.ffn_up.weight"), spec.n_ff, e, &mut rng)?;
        matrix(format!("blk.{l}.ffn_down.weight"), e, spec.n_ff, &mut rng)?;
    }
    let mut vector = |name: String, n: usize, value: Option<f32>, rng: &mut ChaCha8Rng| -> Result<()> {
        let data: Vec<f32> = (0..n).map(|_| value.unwrap_or_else(|| rng.random_range(-0.1..0.1))).collect();
        let t = Tensor::from_vec(data, n, &Device::Cpu).map_err(|e| bad(path, e))?;
        ts.push((name, QTensor::quantize(&t, GgmlDType::F32).map_err(|e| bad(path, e))?));
        Ok(())
    };
    vector("output_norm.weight".into(), e, None, &mut rng)?;
    for l in 0..spec.n_layer {
        vector(format!("blk.{l}.attn_norm.weight"), e, None, &mut rng)?;
        vector(format!("blk.{l}.ffn_norm.weight"), e, None, &mut rng)?;
        if arch == "gemma3" {
            vector(format!("blk.{l}.attn_q_norm.weight"), hd, None, &mut rng)?;
            vector(format!("blk.{l}.attn_k_norm.weight"), hd, None, &mut rng)?;
            vector(format!("blk.{l}.post_attention_norm.weight"), e, None, &mut rng)?;
            vector(format!("blk.{l}.post_ffw_norm.weight"), e, None, &mut rng)?;
        }
        if arch == "qwen2" {
            vector(format!("blk.{l}.attn_q.bias"), spec.n_head * hd, None, &mut rng)?;
            vector(format!("blk.{l}.attn_k.bias"), kv, None, &mut rng)?;
            vector(format!("blk.{l}.attn_v.bias"), kv, None, &mut rng)?;
        }
    }
    // Norm weights near 1 keep activations in range.
    for (name, t) in ts.iter_mut() {
        if name.ends_with("norm.weight") {
            let v = t.dequantize(&Device::Cpu).and_then(|x| x.affine(1.0, 1.0)).map_err(|e| bad(path, e))?;
            *t = QTensor::quantize(&v, GgmlDType::F32).map_err(|e| bad(path, e))?;
        }
    }
    super::write_atomic(path, &md, &ts)
}

/// 2-D weight tensors of a GGUF model as (name, n_in, n_out), sorted by name: what a LoRA
/// adapter for it may target.
pub fn linear_tensors(model: &Path) -> Result<Vec<(String, usize, usize)>> {
    let (content, _) = super::read_content(model)?;
    let mut out: Vec<(String, usize, usize)> = content
        .tensor_infos
        .iter()
        .filter(|(name, info)| name.starts_with("blk.") && info.shape.dims().len() == 2)
        .map(|(name, info)| (name.clone(), info.shape.dims()[1], info.shape.dims()[0]))
        .collect();
    out.sort();
    Ok(out)
}
