//! Reading and writing GGUF files with candle's GGUF reader/writer: LoRA adapters in llama.cpp's
//! format ([`lora`]) and small random-weight models for tests and benchmarks ([`synth`]).

pub mod lora;
pub mod synth;

use crate::{Error, Result};
use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::QTensor;
use std::path::Path;

/// Opens a GGUF file and reads its header (metadata and tensor index).
pub fn read_content(path: &Path) -> Result<(Content, std::fs::File)> {
    crate::llama::check_gguf(path)?;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut f).map_err(|e| Error::Gguf { path: path.to_path_buf(), reason: e.to_string() })?;
    Ok((content, f))
}

/// Writes a GGUF file atomically and durably ([`crate::fsutil::write_atomic_with`]).
pub fn write_atomic(path: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) -> Result<()> {
    crate::fsutil::write_atomic_with(path, |file| {
        let mut f = std::io::BufWriter::new(file);
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &md, &ts)
            .map_err(|e| Error::Gguf { path: path.to_path_buf(), reason: e.to_string() })?;
        std::io::Write::flush(&mut f).map_err(|e| Error::io(path, e))
    })
}

/// A string metadata value, or None.
pub fn meta_str<'a>(content: &'a Content, key: &str) -> Option<&'a str> {
    content.metadata.get(key).and_then(|v| v.to_string().ok()).map(String::as_str)
}
