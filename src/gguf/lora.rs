//! llama.cpp's GGUF LoRA adapter format.
//!
//! Metadata: `general.type = "adapter"`, `general.architecture` = the base model's,
//! `adapter.type = "lora"`, `adapter.lora.alpha` (f32). For each adapted base tensor `W` (shape
//! out × in): `<W name>.lora_a` with ggml ne = [in, r] and `<W name>.lora_b` with ne = [r, out];
//! llama.cpp adds `scale · (alpha / r) · B·A·x` to `W·x`.

use crate::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

/// The low-rank update of one base tensor, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTensor {
    /// Base tensor name, e.g. `blk.0.attn_q.weight`.
    pub base: String,
    /// Rank.
    pub rank: usize,
    /// Input width of the base tensor.
    pub n_in: usize,
    /// Output width of the base tensor.
    pub n_out: usize,
    /// A, `rank × n_in`.
    pub a: Vec<f32>,
    /// B, `n_out × rank`.
    pub b: Vec<f32>,
}

/// A whole adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapterFile {
    /// Base model architecture (`general.architecture`).
    pub architecture: String,
    /// LoRA alpha; the update is scaled by `alpha / rank`.
    pub alpha: f32,
    /// The adapted tensors.
    pub tensors: Vec<LoraTensor>,
}

impl LoraAdapterFile {
    /// Writes the adapter (atomically).
    pub fn write(&self, path: &Path) -> Result<()> {
        let bad = |why: String| Error::Gguf { path: path.to_path_buf(), reason: why };
        let md = vec![
            ("general.type".to_string(), Value::String("adapter".into())),
            ("general.architecture".to_string(), Value::String(self.architecture.clone())),
            ("adapter.type".to_string(), Value::String("lora".into())),
            ("adapter.lora.alpha".to_string(), Value::F32(self.alpha)),
        ];
        let mut ts = Vec::with_capacity(2 * self.tensors.len());
        for t in &self.tensors {
            if t.a.len() != t.rank * t.n_in || t.b.len() != t.n_out * t.rank {
                return Err(bad(format!(
                    "{}: A/B sizes do not match rank {} × ({} in, {} out)",
                    t.base, t.rank, t.n_in, t.n_out
                )));
            }
            let a = Tensor::from_slice(&t.a, (t.rank, t.n_in), &Device::Cpu).map_err(|e| bad(e.to_string()))?;
            let b = Tensor::from_slice(&t.b, (t.n_out, t.rank), &Device::Cpu).map_err(|e| bad(e.to_string()))?;
            ts.push((
                format!("{}.lora_a", t.base),
                QTensor::quantize(&a, GgmlDType::F32).map_err(|e| bad(e.to_string()))?,
            ));
            ts.push((
                format!("{}.lora_b", t.base),
                QTensor::quantize(&b, GgmlDType::F32).map_err(|e| bad(e.to_string()))?,
            ));
        }
        super::write_atomic(path, &md, &ts)
    }

    /// Reads an adapter written in this format.
    pub fn read(path: &Path) -> Result<LoraAdapterFile> {
        let (content, mut f) = super::read_content(path)?;
        let bad = |why: String| Error::Gguf { path: path.to_path_buf(), reason: why };
        if super::meta_str(&content, "general.type") != Some("adapter")
            || super::meta_str(&content, "adapter.type") != Some("lora")
        {
            return Err(bad("not a LoRA adapter (general.type / adapter.type)".into()));
        }
        let architecture = super::meta_str(&content, "general.architecture").unwrap_or_default().to_string();
        let alpha = content
            .metadata
            .get("adapter.lora.alpha")
            .and_then(|v| v.to_f32().ok())
            .ok_or_else(|| bad("missing adapter.lora.alpha".into()))?;
        let mut names: Vec<&String> = content.tensor_infos.keys().filter(|k| k.ends_with(".lora_a")).collect();
        names.sort();
        let mut tensors = Vec::new();
        for a_name in names {
            let base = a_name.trim_end_matches(".lora_a").to_string();
            let read = |name: &str, f: &mut std::fs::File| -> Result<Tensor> {
                content
                    .tensor(f, name, &Device::Cpu)
                    .and_then(|q| q.dequantize(&Device::Cpu))
                    .map_err(|e| bad(format!("{name}: {e}")))
            };
            let a = read(a_name, &mut f)?;
            let b = read(&format!("{base}.lora_b"), &mut f)?;
            let (rank, n_in) = a.dims2().map_err(|e| bad(e.to_string()))?;
            let (n_out, rank_b) = b.dims2().map_err(|e| bad(e.to_string()))?;
            if rank != rank_b {
                return Err(bad(format!("{base}: rank of A ({rank}) differs from B ({rank_b})")));
            }
            let flat = |t: Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| bad(e.to_string()));
            tensors.push(LoraTensor { base, rank, n_in, n_out, a: flat(a)?, b: flat(b)? });
        }
        Ok(LoraAdapterFile { architecture, alpha, tensors })
    }
}
