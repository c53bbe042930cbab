//! Checkpoints: adapter + optimiser state + step, written atomically (each file through a
//! temporary name and a rename, the manifest last), and an exact resume.
//!
//! Layout: `<dir>/step-00000042/{adapter.gguf, optimizer.safetensors, manifest.json}`. A step
//! directory without a manifest is incomplete and ignored.

use super::lora::{cerr, LoraConfig};
use super::{Trainer, TrainerConfig};
use crate::gguf::lora::LoraAdapterFile;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const MANIFEST: &str = "manifest.json";
const FORMAT: u32 = 1;

/// What a checkpoint records besides its tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub format: u32,
    /// Steps applied.
    pub step: u64,
    /// Fingerprint of the base model (architecture, tensor names, shapes and types).
    pub model_fingerprint: String,
    /// Base model file at save time (informational).
    pub model: PathBuf,
    /// Adapter shape.
    pub lora: LoraConfig,
    /// Optimiser update count.
    pub optimizer_t: u64,
    /// Free-form state of the caller (e.g. the GPO loop's iteration and RNG).
    pub extra: serde_json::Value,
}

/// A fingerprint of a GGUF model: SHA-256 over its architecture keys and tensor index.
/// Cheap (no tensor data read) and different for any other model shape or architecture.
pub fn fingerprint(model: &Path) -> Result<String> {
    let (c, _) = crate::gguf::read_content(model)?;
    let mut h = Sha256::new();
    let mut keys: Vec<&String> = c
        .metadata
        .keys()
        .filter(|k| {
            k.starts_with("general.architecture")
                || k.contains(".block_count")
                || k.contains("_length")
                || k.contains("head_count")
        })
        .collect();
    keys.sort();
    for k in keys {
        h.update(k.as_bytes());
        h.update(format!("{:?}", c.metadata[k]).as_bytes());
    }
    let mut names: Vec<(&String, String)> =
        c.tensor_infos.iter().map(|(n, t)| (n, format!("{:?}{:?}", t.shape.dims(), t.ggml_dtype))).collect();
    names.sort();
    for (n, d) in names {
        h.update(n.as_bytes());
        h.update(d.as_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

use crate::fsutil::write_atomic;

/// The step directory name.
pub fn step_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:08}"))
}

/// The newest complete checkpoint under `dir`, if any.
pub fn latest(dir: &Path) -> Option<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) else { continue };
        if e.path().join(MANIFEST).is_file() && best.as_ref().is_none_or(|(b, _)| step > *b) {
            best = Some((step, e.path()));
        }
    }
    best.map(|(_, p)| p)
}

/// Reads a manifest.
pub fn read_manifest(ckpt: &Path) -> Result<Manifest> {
    let p = ckpt.join(MANIFEST);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Data { path: p, line: 1, reason: e.to_string() })
}

impl Trainer {
    /// Saves a checkpoint of the current state under `dir` and returns its path. `extra` is
    /// stored in the manifest for the caller.
    pub fn save_checkpoint(&self, dir: &Path, extra: serde_json::Value) -> Result<PathBuf> {
        let out = step_dir(dir, self.step);
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let _ = std::fs::remove_file(out.join(MANIFEST)); // incomplete until rewritten
        self.lora.export(&out.join("adapter.gguf"))?;
        let state: HashMap<String, candle_core::Tensor> = self.optim.state().into_iter().collect();
        let opt_path = out.join("optimizer.safetensors");
        let tmp = opt_path.with_extension("tmp");
        candle_core::safetensors::save(&state, &tmp).map_err(cerr)?;
        crate::fsutil::commit(&tmp, &opt_path)?;
        let manifest = Manifest {
            format: FORMAT,
            step: self.step,
            model_fingerprint: self.fingerprint.clone(),
            model: self.cfg.model.clone(),
            lora: self.lora.cfg.clone(),
            optimizer_t: self.optim.t,
            extra,
        };
        write_atomic(&out.join(MANIFEST), serde_json::to_string_pretty(&manifest).expect("manifest").as_bytes())?;
        Ok(out)
    }

    /// Restores a checkpoint into this trainer (same model and adapter shape required) and returns
    /// its manifest. The next step then matches an uninterrupted run bit for bit.
    pub fn load_checkpoint(&mut self, ckpt: &Path) -> Result<Manifest> {
        let m = read_manifest(ckpt)?;
        let bad = |why: String| Error::invalid("checkpoint", format!("{}: {why}", ckpt.display()));
        if m.format != FORMAT {
            return Err(bad(format!("format {} (this build reads {FORMAT})", m.format)));
        }
        if m.model_fingerprint != self.fingerprint {
            return Err(bad(format!(
                "written for another model ({}), not {}",
                m.model.display(),
                self.cfg.model.display()
            )));
        }
        if m.lora != self.lora.cfg {
            return Err(bad(format!("adapter shape differs: checkpoint {:?}, config {:?}", m.lora, self.lora.cfg)));
        }
        self.lora.load_values(&LoraAdapterFile::read(&ckpt.join("adapter.gguf"))?)?;
        let state =
            candle_core::safetensors::load(ckpt.join("optimizer.safetensors"), &self.weights.device).map_err(cerr)?;
        self.optim.load_state(m.optimizer_t, |k| state.get(k).cloned())?;
        self.step = m.step;
        Ok(m)
    }

    /// A trainer resumed from the newest checkpoint under `dir`, or a fresh one when none exists.
    pub fn resume_or_new(cfg: TrainerConfig, dir: &Path) -> Result<(Trainer, Option<Manifest>)> {
        let mut t = Trainer::new(cfg)?;
        match latest(dir) {
            Some(ckpt) => {
                let m = t.load_checkpoint(&ckpt)?;
                Ok((t, Some(m)))
            }
            None => Ok((t, None)),
        }
    }
}
