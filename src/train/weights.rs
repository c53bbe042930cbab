//! The frozen base weights, read from the same GGUF file the rollout engine loads and
//! dequantized once (f32 on the CPU; bf16 on a GPU). No second copy of the model on disk.

use super::arch::{ArchConfig, Family};
use crate::{Error, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// One transformer block's frozen tensors (matrices are out × in).
#[derive(Debug, Clone)]
pub struct BlockWeights {
    /// Pre-attention norm.
    pub attn_norm: Tensor,
    /// Query projection.
    pub wq: Tensor,
    /// Key projection.
    pub wk: Tensor,
    /// Value projection.
    pub wv: Tensor,
    /// Output projection.
    pub wo: Tensor,
    /// q/k/v biases (qwen2).
    pub bq: Option<Tensor>,
    /// Key bias.
    pub bk: Option<Tensor>,
    /// Value bias.
    pub bv: Option<Tensor>,
    /// Per-head Q/K norms (gemma3).
    pub q_norm: Option<Tensor>,
    /// Key norm.
    pub k_norm: Option<Tensor>,
    /// Post-attention norm (gemma3).
    pub attn_post_norm: Option<Tensor>,
    /// Pre-FFN norm.
    pub ffn_norm: Tensor,
    /// Gate projection.
    pub w_gate: Tensor,
    /// Up projection.
    pub w_up: Tensor,
    /// Down projection.
    pub w_down: Tensor,
    /// Post-FFN norm (gemma3).
    pub ffn_post_norm: Option<Tensor>,
}

/// All frozen weights of a model.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Hyper-parameters.
    pub cfg: ArchConfig,
    /// Token embeddings (vocab × d).
    pub tok_embd: Tensor,
    /// Output matrix (vocab × d); shares storage with `tok_embd` when tied.
    pub output: Tensor,
    /// Final norm.
    pub output_norm: Tensor,
    /// Blocks.
    pub blocks: Vec<BlockWeights>,
    /// Compute dtype.
    pub dtype: DType,
    /// Device.
    pub device: Device,
}

fn read(c: &Content, f: &mut std::fs::File, name: &str, dtype: DType, dev: &Device, path: &Path) -> Result<Tensor> {
    c.tensor(f, name, dev)
        .and_then(|q| q.dequantize(dev))
        .and_then(|t| t.to_dtype(dtype))
        .map_err(|e| Error::Gguf { path: path.to_path_buf(), reason: format!("{name}: {e}") })
}

fn read_opt(
    c: &Content,
    f: &mut std::fs::File,
    name: &str,
    dtype: DType,
    dev: &Device,
    path: &Path,
) -> Result<Option<Tensor>> {
    if c.tensor_infos.contains_key(name) {
        read(c, f, name, dtype, dev, path).map(Some)
    } else {
        Ok(None)
    }
}

impl Weights {
    /// Reads and dequantizes every tensor the forward needs.
    pub fn load(path: &Path, dtype: DType, dev: &Device) -> Result<Weights> {
        let (c, mut f) = crate::gguf::read_content(path)?;
        let cfg = ArchConfig::from_gguf(&c)?;
        if cfg.n_rot != cfg.head_dim {
            return Err(Error::invalid("architecture", "partial rotary embeddings are not supported by the trainer"));
        }
        let tok_embd = read(&c, &mut f, "token_embd.weight", dtype, dev, path)?;
        let output = read_opt(&c, &mut f, "output.weight", dtype, dev, path)?.unwrap_or_else(|| tok_embd.clone());
        let output_norm = read(&c, &mut f, "output_norm.weight", dtype, dev, path)?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{l}.{s}");
            let mut r = |s: &str| read(&c, &mut f, &n(s), dtype, dev, path);
            let (attn_norm, wq, wk, wv, wo) = (
                r("attn_norm.weight")?,
                r("attn_q.weight")?,
                r("attn_k.weight")?,
                r("attn_v.weight")?,
                r("attn_output.weight")?,
            );
            let (ffn_norm, w_gate, w_up, w_down) =
                (r("ffn_norm.weight")?, r("ffn_gate.weight")?, r("ffn_up.weight")?, r("ffn_down.weight")?);
            let mut o = |s: &str| read_opt(&c, &mut f, &n(s), dtype, dev, path);
            let block = BlockWeights {
                bq: o("attn_q.bias")?,
                bk: o("attn_k.bias")?,
                bv: o("attn_v.bias")?,
                q_norm: o("attn_q_norm.weight")?,
                k_norm: o("attn_k_norm.weight")?,
                attn_post_norm: o("post_attention_norm.weight")?,
                ffn_post_norm: o("post_ffw_norm.weight")?,
                attn_norm,
                wq,
                wk,
                wv,
                wo,
                ffn_norm,
                w_gate,
                w_up,
                w_down,
            };
            if cfg.family == Family::Gemma3
                && (block.q_norm.is_none() || block.attn_post_norm.is_none() || block.ffn_post_norm.is_none())
            {
                return Err(Error::invalid("gguf", format!("gemma3 block {l} lacks its q/k or post norms")));
            }
            blocks.push(block);
        }
        Ok(Weights { cfg, tok_embd, output, output_norm, blocks, dtype, device: dev.clone() })
    }

    /// Shape (n_in, n_out) of a block's projection.
    pub fn linear_shape(&self, block: usize, target: super::lora::Target) -> (usize, usize) {
        let w = self.blocks[block].linear(target);
        let d = w.dims();
        (d[1], d[0])
    }
}

impl BlockWeights {
    /// The frozen matrix a LoRA target adapts.
    pub fn linear(&self, target: super::lora::Target) -> &Tensor {
        use super::lora::Target::*;
        match target {
            Q => &self.wq,
            K => &self.wk,
            V => &self.wv,
            O => &self.wo,
            Gate => &self.w_gate,
            Up => &self.w_up,
            Down => &self.w_down,
        }
    }
}
