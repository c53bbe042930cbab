//! LoRA parameters: `W·x + (alpha/r)·B·(A·x)` on chosen projections, A random, B zero at start,
//! and the exact round trip to llama.cpp's GGUF adapter format (same layout, no permutation:
//! the trainer works on the GGUF's own tensor layout).

use super::weights::Weights;
use crate::gguf::lora::{LoraAdapterFile, LoraTensor};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A projection LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Query.
    Q,
    /// Key.
    K,
    /// Value.
    V,
    /// Attention output.
    O,
    /// FFN gate.
    Gate,
    /// FFN up.
    Up,
    /// FFN down.
    Down,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    /// GGUF tensor name of the adapted weight in block `l`.
    pub fn gguf_name(self, l: usize) -> String {
        let s = match self {
            Target::Q => "attn_q",
            Target::K => "attn_k",
            Target::V => "attn_v",
            Target::O => "attn_output",
            Target::Gate => "ffn_gate",
            Target::Up => "ffn_up",
            Target::Down => "ffn_down",
        };
        format!("blk.{l}.{s}.weight")
    }
}

impl std::str::FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Target> {
        Ok(match s {
            "q" | "q_proj" => Target::Q,
            "k" | "k_proj" => Target::K,
            "v" | "v_proj" => Target::V,
            "o" | "o_proj" => Target::O,
            "gate" | "gate_proj" => Target::Gate,
            "up" | "up_proj" => Target::Up,
            "down" | "down_proj" => Target::Down,
            _ => return Err(Error::invalid("lora.targets", format!("{s:?} is not one of q, k, v, o, gate, up, down"))),
        })
    }
}

/// LoRA settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Adapted projections (default: all seven).
    pub targets: Vec<Target>,
    /// Rank r.
    pub rank: usize,
    /// Alpha; the update is scaled by alpha / r.
    pub alpha: f32,
    /// Seed of A's initialisation.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { targets: Target::ALL.to_vec(), rank: 16, alpha: 32.0, seed: 0 }
    }
}

/// One adapted projection.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// Block index.
    pub block: usize,
    /// Projection.
    pub target: Target,
    /// A, r × n_in.
    pub a: Var,
    /// B, n_out × r.
    pub b: Var,
}

/// The trainable adapter.
#[derive(Debug, Clone)]
pub struct Lora {
    /// Settings.
    pub cfg: LoraConfig,
    /// Pairs, sorted by (block, target).
    pub pairs: Vec<LoraPair>,
    /// Architecture of the base model.
    pub architecture: String,
}

impl Lora {
    /// A fresh adapter for `w`: A ~ U(-1/√n_in, 1/√n_in) (PEFT's Kaiming-uniform bound), B = 0.
    pub fn new(w: &Weights, cfg: &LoraConfig) -> Result<Lora> {
        if cfg.rank == 0 {
            return Err(Error::invalid("lora.rank", "must be at least 1"));
        }
        if cfg.targets.is_empty() {
            return Err(Error::invalid("lora.targets", "name at least one of q, k, v, o, gate, up, down"));
        }
        if !(cfg.alpha.is_finite() && cfg.alpha > 0.0) {
            return Err(Error::invalid("lora.alpha", format!("{} must be a positive number", cfg.alpha)));
        }
        let mut targets = cfg.targets.clone();
        targets.sort();
        targets.dedup();
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut pairs = Vec::new();
        for block in 0..w.blocks.len() {
            for &target in &targets {
                let (n_in, n_out) = w.linear_shape(block, target);
                if cfg.rank > n_in.min(n_out) {
                    return Err(Error::invalid(
                        "lora.rank",
                        format!("{} exceeds {}×{} of {}", cfg.rank, n_out, n_in, target.gguf_name(block)),
                    ));
                }
                let bound = 1.0 / (n_in as f64).sqrt();
                let a: Vec<f64> = (0..cfg.rank * n_in).map(|_| rng.random_range(-bound..bound)).collect();
                // f32 master copy (f64 when the whole model computes in f64 for gradient checks).
                let master = if w.dtype == DType::F64 { DType::F64 } else { DType::F32 };
                let a =
                    Tensor::from_vec(a, (cfg.rank, n_in), &w.device).and_then(|t| t.to_dtype(master)).map_err(cerr)?;
                let b = Tensor::zeros((n_out, cfg.rank), master, &w.device).map_err(cerr)?;
                pairs.push(LoraPair {
                    block,
                    target,
                    a: Var::from_tensor(&a).map_err(cerr)?,
                    b: Var::from_tensor(&b).map_err(cerr)?,
                });
            }
        }
        Ok(Lora { cfg: LoraConfig { targets, ..cfg.clone() }, pairs, architecture: w.cfg.name.clone() })
    }

    /// alpha / r.
    pub fn scale(&self) -> f64 {
        self.cfg.alpha as f64 / self.cfg.rank as f64
    }

    /// The pair adapting `target` of `block`, if any.
    pub fn pair(&self, block: usize, target: Target) -> Option<&LoraPair> {
        self.pairs.iter().find(|p| p.block == block && p.target == target)
    }

    /// Every trainable tensor (A and B of each pair).
    pub fn vars(&self) -> Vec<Var> {
        self.pairs.iter().flat_map(|p| [p.a.clone(), p.b.clone()]).collect()
    }

    /// Trainable tensors of one block.
    pub fn block_vars(&self, block: usize) -> Vec<Var> {
        self.pairs.iter().filter(|p| p.block == block).flat_map(|p| [p.a.clone(), p.b.clone()]).collect()
    }

    /// Number of trainable parameters.
    pub fn n_params(&self) -> usize {
        self.pairs.iter().map(|p| p.a.as_tensor().elem_count() + p.b.as_tensor().elem_count()).sum()
    }

    /// The adapter in llama.cpp's GGUF LoRA format.
    pub fn to_file(&self) -> Result<LoraAdapterFile> {
        let mut tensors = Vec::with_capacity(self.pairs.len());
        for p in &self.pairs {
            let (rank, n_in) = p.a.as_tensor().dims2().map_err(cerr)?;
            let (n_out, _) = p.b.as_tensor().dims2().map_err(cerr)?;
            let flat = |v: &Var| v.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            tensors.push(LoraTensor {
                base: p.target.gguf_name(p.block),
                rank,
                n_in,
                n_out,
                a: flat(&p.a).map_err(cerr)?,
                b: flat(&p.b).map_err(cerr)?,
            });
        }
        Ok(LoraAdapterFile { architecture: self.architecture.clone(), alpha: self.cfg.alpha, tensors })
    }

    /// Writes the adapter as a llama.cpp GGUF LoRA file.
    pub fn export(&self, path: &std::path::Path) -> Result<()> {
        self.to_file()?.write(path)
    }

    /// Loads values from an adapter file written for the same model and configuration.
    pub fn load_values(&self, file: &LoraAdapterFile) -> Result<()> {
        let bad = |why: String| Error::invalid("adapter", why);
        if file.architecture != self.architecture {
            return Err(bad(format!("adapter is for {} but the model is {}", file.architecture, self.architecture)));
        }
        if file.tensors.len() != self.pairs.len() {
            return Err(bad(format!(
                "adapter has {} tensors, the configuration {}",
                file.tensors.len(),
                self.pairs.len()
            )));
        }
        for p in &self.pairs {
            let name = p.target.gguf_name(p.block);
            let t = file.tensors.iter().find(|t| t.base == name).ok_or_else(|| bad(format!("adapter lacks {name}")))?;
            let (rank, n_in) = p.a.as_tensor().dims2().map_err(cerr)?;
            let (n_out, _) = p.b.as_tensor().dims2().map_err(cerr)?;
            if (t.rank, t.n_in, t.n_out) != (rank, n_in, n_out) {
                return Err(bad(format!(
                    "{name}: adapter is rank {} {}→{}, model wants rank {rank} {n_in}→{n_out}",
                    t.rank, t.n_in, t.n_out
                )));
            }
            let dev = p.a.as_tensor().device();
            let dt = p.a.as_tensor().dtype();
            p.a.set(&Tensor::from_slice(&t.a, (rank, n_in), dev).and_then(|x| x.to_dtype(dt)).map_err(cerr)?)
                .map_err(cerr)?;
            p.b.set(&Tensor::from_slice(&t.b, (n_out, rank), dev).and_then(|x| x.to_dtype(dt)).map_err(cerr)?)
                .map_err(cerr)?;
        }
        Ok(())
    }
}

/// Converts a candle error into ours.
pub(crate) fn cerr(e: candle_core::Error) -> Error {
    Error::Train(e.to_string())
}
