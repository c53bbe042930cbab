//! The gradient-safe forward: per-token log-probs of a token sequence under the base model plus
//! (optionally) the LoRA adapter, in llama.cpp's exact numerics convention for each family.
//!
//! With gradients, every block runs inside [`checkpoint`] (only block inputs are kept; the
//! backward recomputes one block at a time), and the output head runs in chunks of positions, so
//! `[tokens × vocab]` logits never exist for a whole sequence.

use super::arch::{ArchConfig, Family};
use super::head::{head_logprobs, logprobs_of_logits};
use super::lora::{cerr, Lora, Target};
use super::ops::{
    attention_packed, checkpoint, frozen_linear, gelu_ggml_cpu, gelu_tanh, lora_linear, rms_norm, rms_norm_fused, rope,
    rope_fused, rope_tables, softmax_last, swiglu, GradSink,
};
use super::weights::{BlockWeights, Weights};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use std::sync::Arc;

type CResult<T> = candle_core::Result<T>;

/// LoRA tensors of one block, and whether to use candle's plain matmul (baseline).
#[derive(Clone, Default)]
struct BlockLora {
    pairs: Vec<(Target, Tensor, Tensor)>,
    plain: bool,
}

/// Per-sequence tables shared by all blocks.
#[derive(Clone)]
struct Tables {
    cos: Tensor,
    sin: Tensor,
    cos_swa: Tensor,
    sin_swa: Tensor,
    mask: Tensor,
    mask_swa: Tensor,
}

fn mask(t: usize, window: usize, dtype: DType, dev: &candle_core::Device) -> CResult<Tensor> {
    let v: Vec<f32> = (0..t * t)
        .map(|k| {
            let (i, j) = (k / t, k % t);
            if j > i || (window > 0 && i - j >= window) {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(v, (t, t), dev)?.to_dtype(dtype)
}

fn tables(cfg: &ArchConfig, t: usize, dtype: DType, dev: &candle_core::Device) -> CResult<Tables> {
    let (cos, sin) = rope_tables(t, cfg.n_rot, cfg.rope_base, cfg.rope_scale, dtype, dev)?;
    let (cos_swa, sin_swa) = if cfg.sliding_window > 0 {
        rope_tables(t, cfg.n_rot, cfg.rope_base_swa, 1.0, dtype, dev)?
    } else {
        (cos.clone(), sin.clone())
    };
    let m = mask(t, 0, dtype, dev)?;
    let mask_swa = if cfg.sliding_window > 0 { mask(t, cfg.sliding_window, dtype, dev)? } else { m.clone() };
    Ok(Tables { cos, sin, cos_swa, sin_swa, mask: m, mask_swa })
}

/// The tables of sequences packed one after the other: RoPE rows concatenated along positions
/// (each sequence's positions restart at 0), one mask per sequence.
#[derive(Clone)]
struct Pack {
    cos: Tensor,
    sin: Tensor,
    cos_swa: Tensor,
    sin_swa: Tensor,
    masks: Vec<Tensor>,
    masks_swa: Vec<Tensor>,
}

impl Pack {
    fn new(segs: &[Tables]) -> CResult<Pack> {
        let cat = |f: fn(&Tables) -> &Tensor| -> CResult<Tensor> {
            match segs {
                [one] => Ok(f(one).clone()),
                _ => Tensor::cat(&segs.iter().map(f).collect::<Vec<_>>(), 0),
            }
        };
        Ok(Pack {
            cos: cat(|t| &t.cos)?,
            sin: cat(|t| &t.sin)?,
            cos_swa: cat(|t| &t.cos_swa)?,
            sin_swa: cat(|t| &t.sin_swa)?,
            masks: segs.iter().map(|t| t.mask.clone()).collect(),
            masks_swa: segs.iter().map(|t| t.mask_swa.clone()).collect(),
        })
    }
}

fn linear(
    h: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    lora: &BlockLora,
    target: Target,
    scale: f64,
) -> CResult<Tensor> {
    let pair = lora.pairs.iter().find(|(t, _, _)| *t == target);
    if let (Some((_, a, b)), false) = (pair, lora.plain) {
        return lora_linear(h, w, bias, a, b, scale);
    }
    let mut y = if lora.plain { h.broadcast_matmul(&w.t()?)? } else { frozen_linear(h, w)? };
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    if let Some((_, a, b)) = pair {
        let delta = h.matmul(&a.t()?)?.matmul(&b.t()?)?;
        y = (y + (delta * scale)?)?;
    }
    Ok(y)
}

/// One transformer block on `x` (T × d): the rows of one or more sequences packed one after
/// the other, as `pk` describes. Projections, norms, RoPE and the MLP run once on all T rows
/// (RoPE with each row's own position); attention is one node in which each sequence attends
/// only to itself.
fn block(
    x: &Tensor,
    w: &BlockWeights,
    lora: &BlockLora,
    scale: f64,
    cfg: &ArchConfig,
    il: usize,
    pk: &Pack,
) -> CResult<Tensor> {
    let t = x.dim(0)?;
    let (nh, nkv, hd) = (cfg.n_head, cfg.n_head_kv, cfg.head_dim);
    let swa = cfg.is_swa(il);
    let (cos, sin, masks) = if swa { (&pk.cos_swa, &pk.sin_swa, &pk.masks_swa) } else { (&pk.cos, &pk.sin, &pk.masks) };

    // gpo's path: norms, RoPE and attention as single nodes with analytic backwards; the plain
    // baseline keeps candle's primitive graph.
    let norm = |x: &Tensor, w: &Tensor| norm(x, w, cfg.rms_eps, lora.plain);
    let rot = |x: &Tensor| {
        if lora.plain {
            rope(x, cos, sin, cfg.rope_neox)
        } else {
            rope_fused(x, cos, sin, cfg.rope_neox)
        }
    };
    let h = norm(x, &w.attn_norm)?;
    let q = linear(&h, &w.wq, w.bq.as_ref(), lora, Target::Q, scale)?.reshape((t, nh, hd))?;
    let k = linear(&h, &w.wk, w.bk.as_ref(), lora, Target::K, scale)?.reshape((t, nkv, hd))?;
    let v = linear(&h, &w.wv, w.bv.as_ref(), lora, Target::V, scale)?.reshape((t, nkv, hd))?;
    let (q, k) = match (&w.q_norm, &w.k_norm) {
        (Some(qn), Some(kn)) => (norm(&q, qn)?, norm(&k, kn)?),
        _ => (q, k),
    };
    let q = rot(&q.transpose(0, 1)?.contiguous()?)?;
    let k = rot(&k.transpose(0, 1)?.contiguous()?)?;
    let v = v.transpose(0, 1)?.contiguous()?;
    // The fused attention node reads each KV head for its group of query heads itself; the
    // plain baseline copies K and V per query head.
    let (k, v) = if nkv != nh && lora.plain {
        let rep = nh / nkv;
        let expand = |z: Tensor| z.unsqueeze(1)?.expand((nkv, rep, t, hd))?.reshape((nh, t, hd));
        (expand(k)?, expand(v)?)
    } else {
        (k, v)
    };
    let attn_scale = 1.0 / (hd as f64).sqrt();
    let o = if lora.plain {
        let mut outs = Vec::with_capacity(masks.len());
        let mut s0 = 0;
        for m in masks {
            let n = m.dim(0)?;
            let (q, k, v) = (
                q.narrow(1, s0, n)?.contiguous()?,
                k.narrow(1, s0, n)?.contiguous()?,
                v.narrow(1, s0, n)?.contiguous()?,
            );
            outs.push(softmax_last(&(q.matmul(&k.t()?)? * attn_scale)?.broadcast_add(m)?)?.matmul(&v)?);
            s0 += n;
        }
        if outs.len() == 1 {
            outs.pop().expect("one sequence")
        } else {
            Tensor::cat(&outs, 1)?
        }
    } else {
        attention_packed(&q.contiguous()?, &k.contiguous()?, &v, masks, attn_scale)?
    };
    let o = o.transpose(0, 1)?.reshape((t, nh * hd))?;
    let mut attn = linear(&o, &w.wo, None, lora, Target::O, scale)?;
    if let Some(n) = &w.attn_post_norm {
        attn = norm(&attn, n)?;
    }
    let x = (x + attn)?;

    let h = norm(&x, &w.ffn_norm)?;
    let g = linear(&h, &w.w_gate, None, lora, Target::Gate, scale)?;
    let u = linear(&h, &w.w_up, None, lora, Target::Up, scale)?;
    let gated = match cfg.family {
        Family::Gemma3 if cfg.ggml_cpu_gelu => (gelu_ggml_cpu(&g)? * u)?,
        Family::Gemma3 => (gelu_tanh(&g)? * u)?,
        _ if lora.plain => (g.silu()? * u)?,
        _ => swiglu(&g, &u)?,
    };
    let mut d = linear(&gated, &w.w_down, None, lora, Target::Down, scale)?;
    if let Some(n) = &w.ffn_post_norm {
        d = norm(&d, n)?;
    }
    x + d
}

/// Log-probs of `targets` from hidden states `h` (n × d) with candle's plain autograd (the
/// baseline: its matmul also computes the output matrix's gradient).
fn plain_head(h: &Tensor, output: &Tensor, targets: &Tensor, inv_t: f64, softcap: f64) -> CResult<Tensor> {
    logprobs_of_logits(h.broadcast_matmul(&output.t()?)?, targets, inv_t, softcap)
}

/// RMS norm as one fused node, or as candle's primitive ops for the `plain` baseline.
fn norm(x: &Tensor, w: &Tensor, eps: f64, plain: bool) -> candle_core::Result<Tensor> {
    if plain {
        rms_norm(x, w, eps)
    } else {
        rms_norm_fused(x, w, eps)
    }
}

/// Estimated bytes of the activations that a forward with gradients keeps for sequences of
/// `lens` tokens when blocks are not recomputed: per layer and sequence of t tokens,
/// 11·t·d + 5·t·d_kv + 3·t·ff + heads·t² elements — what `block`'s nodes hold (the block
/// input, the norms, Q/K before, after the transpose and after RoPE, V before and after the
/// transpose, the attention output and its transpose, the projections and residual sums, gate,
/// up and their product, the attention probabilities). SmolLM2-135M at 4 × 256 tokens: 1,665 MiB
/// estimated; measured peak RSS kept minus recomputed, 1,580 MiB (2,388 − 808).
pub fn keep_activation_bytes(cfg: &ArchConfig, lens: impl IntoIterator<Item = usize>, dtype_bytes: usize) -> u64 {
    let (d, ff, nh) = (cfg.n_embd as u64, cfg.n_ff as u64, cfg.n_head as u64);
    let d_kv = (cfg.n_head_kv * cfg.head_dim) as u64;
    let per_layer: u64 =
        lens.into_iter().map(|t| t as u64).map(|t| 11 * t * d + 5 * t * d_kv + 3 * t * ff + nh * t * t).sum();
    per_layer * cfg.n_layer as u64 * dtype_bytes as u64
}

/// Runs the model. Borrowed weights and adapter; gradients of the adapter go to `sink`.
pub struct Forward<'a> {
    /// Frozen weights.
    pub weights: &'a Weights,
    /// Adapter; None = the base model (the reference policy).
    pub lora: Option<&'a Lora>,
    /// Where checkpointed blocks put adapter gradients.
    pub sink: &'a GradSink,
    /// Positions per output-head chunk.
    pub head_chunk: usize,
    /// candle's plain autograd: matmuls that also compute frozen-weight gradients, no activation
    /// recomputation, one head pass (the baseline of `gpo bench train`).
    pub plain: bool,
    /// Recompute each block in the backward pass instead of keeping its activations (bounded
    /// memory for long sequences at the cost of one more forward).
    pub recompute: bool,
}

impl Forward<'_> {
    /// `log π(tokens[i] | tokens[..i])` for `i` in `start..tokens.len()`, at `temperature`
    /// (log-softmax of logits / T over the full vocabulary). With `grad`, the result carries
    /// gradients to the adapter (through `sink`); without, nothing is recorded.
    pub fn logprobs(&self, tokens: &[u32], start: usize, temperature: f64, grad: bool) -> Result<Tensor> {
        let mut out = self.logprobs_packed(&[(tokens, start)], temperature, grad)?;
        Ok(out.pop().expect("one sequence in, one out"))
    }

    /// [`Forward::logprobs`] for several sequences at once, each `(tokens, start)`, one tensor
    /// per sequence in order. The sequences are packed into one matrix of rows without padding:
    /// every projection, norm, RoPE and MLP runs once for all of them (larger matmuls, fewer
    /// graph nodes), positions restart at each sequence and attention stays within it, so each
    /// result equals its own [`Forward::logprobs`] up to the summation order of the matmuls.
    pub fn logprobs_packed(&self, seqs: &[(&[u32], usize)], temperature: f64, grad: bool) -> Result<Vec<Tensor>> {
        let w = self.weights;
        let cfg = &w.cfg;
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        for &(tokens, start) in seqs {
            if start == 0 || start >= tokens.len() {
                return Err(Error::invalid(
                    "sequence",
                    format!("targets {start}..{} (needs 1 ≤ start < length)", tokens.len()),
                ));
            }
            if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.n_vocab) {
                return Err(Error::invalid(
                    "sequence",
                    format!("token id {bad} outside the vocabulary of {}", cfg.n_vocab),
                ));
            }
        }
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(Error::invalid("temperature", format!("{temperature} must be positive")));
        }
        let dev = &w.device;
        // Each sequence contributes the positions that predict a next token (all but its last).
        let inputs: Vec<u32> = seqs.iter().flat_map(|(tokens, _)| tokens[..tokens.len() - 1].iter().copied()).collect();
        let ids = Tensor::from_slice(&inputs, inputs.len(), dev).map_err(cerr)?;
        let mut x = w.tok_embd.index_select(&ids, 0).map_err(cerr)?;
        if cfg.family == Family::Gemma3 {
            x = (x * (cfg.n_embd as f32).sqrt() as f64).map_err(cerr)?;
        }
        let segs: Vec<Tables> = seqs
            .iter()
            .map(|(tokens, _)| tables(cfg, tokens.len() - 1, w.dtype, dev))
            .collect::<CResult<_>>()
            .map_err(cerr)?;
        let pk = Arc::new(Pack::new(&segs).map_err(cerr)?);
        let scale = self.lora.map_or(1.0, Lora::scale);
        if grad {
            // A variable at the root makes candle walk into the checkpointed blocks.
            x = Var::from_tensor(&x).map_err(cerr)?.as_tensor().clone();
        }
        for (il, bw) in w.blocks.iter().enumerate() {
            let pairs = self
                .lora
                .map(|l| {
                    l.pairs
                        .iter()
                        .filter(|p| p.block == il)
                        .map(|p| {
                            let (a, b) = if grad {
                                (p.a.as_tensor().clone(), p.b.as_tensor().clone())
                            } else {
                                (p.a.as_tensor().detach(), p.b.as_tensor().detach())
                            };
                            // The adapter's master copy may be wider than the compute dtype.
                            Ok((p.target, a.to_dtype(w.dtype)?, b.to_dtype(w.dtype)?))
                        })
                        .collect::<CResult<Vec<_>>>()
                })
                .transpose()
                .map_err(cerr)?
                .unwrap_or_default();
            let lora = BlockLora { pairs, plain: self.plain };
            if grad && !self.plain && self.recompute {
                let (bw, cfg, pk) = (bw.clone(), Arc::new(cfg.clone()), pk.clone());
                let params = self.lora.map(|l| l.block_vars(il)).unwrap_or_default();
                x = checkpoint(&x, params, self.sink, move |x| block(x, &bw, &lora, scale, &cfg, il, &pk))
                    .map_err(cerr)?;
            } else {
                x = block(&x, bw, &lora, scale, cfg, il, &pk).map_err(cerr)?;
            }
        }
        let h = norm(&x, &w.output_norm, cfg.rms_eps, self.plain).map_err(cerr)?;
        // The rows that predict targets: positions start-1.. of each sequence's segment.
        let mut rows = Vec::new();
        let mut targets: Vec<u32> = Vec::new();
        let mut counts = Vec::with_capacity(seqs.len());
        let mut offset = 0u32;
        for &(tokens, start) in seqs {
            let t = (tokens.len() - 1) as u32;
            rows.extend(offset + start as u32 - 1..offset + t);
            targets.extend_from_slice(&tokens[start..]);
            counts.push(tokens.len() - start);
            offset += t;
        }
        let h = if seqs.len() == 1 {
            let first = rows[0] as usize;
            h.narrow(0, first, rows.len()).map_err(cerr)?
        } else {
            let idx = Tensor::from_vec(rows, targets.len(), dev).map_err(cerr)?;
            h.index_select(&idx, 0).map_err(cerr)?
        };
        let n = targets.len();
        let inv_t = 1.0 / temperature;
        let softcap = cfg.final_logit_softcap;
        // gpo's head is one node that never holds more than `head_chunk` rows of logits; the
        // plain baseline builds [tokens × vocab] logits from candle's ops.
        let all = if self.plain {
            let tg = Tensor::from_slice(&targets, n, dev).map_err(cerr)?;
            plain_head(&h, &w.output, &tg, inv_t, softcap)
        } else {
            head_logprobs(&h, &w.output, &targets, inv_t, softcap, self.head_chunk)
        }
        .map_err(cerr)?;
        if seqs.len() == 1 {
            return Ok(vec![all]);
        }
        let mut out = Vec::with_capacity(seqs.len());
        let mut at = 0;
        for c in counts {
            out.push(all.narrow(0, at, c).map_err(cerr)?);
            at += c;
        }
        Ok(out)
    }

    /// Mean over positions of the chosen tokens' log-probs, in f64 (for reporting).
    pub fn mean_logprob(lp: &Tensor) -> Result<f64> {
        lp.to_dtype(DType::F64).and_then(|t| t.mean_all()).and_then(|t| t.to_scalar::<f64>()).map_err(cerr)
    }
}
