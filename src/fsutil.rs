//! Durable file replacement: the one way gpo writes run metadata, checkpoints, adapters and
//! gpod's job files, so a crash or `kill -9` leaves either the old file or the new one.

use crate::{Error, Result};
use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Writes `path` through `fill`: into a temporary file in the same directory, which is fsynced,
/// renamed over `path`, and the directory fsynced. On error the temporary file is removed and
/// `path` is untouched.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let dir = parent(path);
    let mut tmp = tempfile::Builder::new().prefix(".gpo-tmp").tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    fill(tmp.as_file_mut())?;
    tmp.as_file().sync_all().map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    sync_dir(dir)
}

/// Writes `bytes` to `path` atomically and durably (see [`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(|e| Error::io(path, e)))
}

/// Moves a finished temporary file `tmp` (same directory) over `path` durably: for writers that
/// insist on writing a path of their own.
pub fn commit(tmp: &Path, path: &Path) -> Result<()> {
    File::open(tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(tmp, e))?;
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    sync_dir(parent(path))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_atomic(&p, b"old").unwrap();
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        let failed = write_atomic_with(&p, |f| {
            f.write_all(b"half").unwrap();
            Err(Error::invalid("test", "fails midway"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"new", "a failed write leaves the old file");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
    }
}
