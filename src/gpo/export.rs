//! Merges a run's per-iteration exports into the JSONL files TRL's trainers read:
//! `pairs.jsonl` (`prompt`, `chosen`, `rejected` — DPOTrainer), `kto.jsonl` (`prompt`,
//! `completion`, `label` — KTOTrainer) and `resets.jsonl` (reset rollouts with their critical
//! step, values and reward). Prompts are the chat-templated prompt plus the critical prefix, as
//! text with special tokens, so a cluster trainer sees exactly the state gpo reset to.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Writes the merged files into `out` and returns (kind, path, rows) for each non-empty kind.
pub fn merge(run_dir: &Path, out: &Path) -> Result<Vec<(String, PathBuf, usize)>> {
    let src = run_dir.join("export");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&src).map_err(|e| Error::io(&src, e))?.flatten().map(|e| e.path()).collect();
    files.sort();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut written = Vec::new();
    for kind in ["pairs", "kto", "resets"] {
        let mut text = String::new();
        let mut rows = 0;
        for f in files.iter().filter(|f| f.to_string_lossy().ends_with(&format!(".{kind}.jsonl"))) {
            let t = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
            rows += t.lines().filter(|l| !l.trim().is_empty()).count();
            text.push_str(&t);
        }
        if rows > 0 {
            let p = out.join(format!("{kind}.jsonl"));
            std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
            written.push((kind.to_string(), p, rows));
        }
    }
    Ok(written)
}
