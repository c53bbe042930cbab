//! A loaded llama.cpp LoRA adapter, freed when the last handle drops.

use super::model::{check_gguf_file, path_cstring};
use super::{clear_last_error, sys, take_last_error, Model};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

/// A GGUF LoRA adapter bound to one model. Dropping the last `Arc` frees it
/// (`llama_adapter_lora_free`); a [`super::Context`] holds an `Arc` while the adapter is set.
pub struct LoraAdapter {
    ptr: NonNull<sys::llama_adapter_lora>,
    model: Arc<Model>,
    path: PathBuf,
}

// SAFETY: the adapter is immutable after loading; contexts only read its tensors.
unsafe impl Send for LoraAdapter {}
unsafe impl Sync for LoraAdapter {}

impl Drop for LoraAdapter {
    fn drop(&mut self) {
        // Freeing unregisters the adapter from its model's unlocked set: never from another
        // thread than the one that decodes with the model.
        if !self.model.owned_here() {
            // Leaked rather than freed while the engine thread may be decoding.
            tracing::error!("LoRA adapter {} dropped off its engine thread: leaked", self.path.display());
            return;
        }
        // SAFETY: freed once; the model (held by Arc) is still alive, so llama.cpp can unregister it.
        unsafe { sys::llama_adapter_lora_free(self.ptr.as_ptr()) };
    }
}

impl LoraAdapter {
    /// Loads an adapter for `model`. A file for another architecture, with tensors the model does
    /// not have, or with wrong shapes is rejected with llama.cpp's reason.
    pub fn load(model: &Arc<Model>, path: impl AsRef<Path>) -> Result<Arc<LoraAdapter>> {
        let path = path.as_ref();
        if !model.owned_here() {
            return Err(Error::invalid(
                "adapter",
                "this model belongs to an engine: load adapters with Engine::set_adapter (its engine thread does it)",
            ));
        }
        check_gguf_file(path).map_err(|e| match e {
            Error::NotFound(p) => Error::NotFound(p),
            other => Error::Adapter { path: path.to_path_buf(), reason: other.to_string() },
        })?;
        let c_path = path_cstring(path)?;
        clear_last_error();
        // SAFETY: valid model; path outlives the call.
        let ptr = unsafe { sys::llama_adapter_lora_init(model.as_ptr(), c_path.as_ptr()) };
        let ptr = NonNull::new(ptr).ok_or_else(|| Error::Adapter {
            path: path.to_path_buf(),
            reason: take_last_error().unwrap_or_else(|| "llama.cpp rejected the file".into()),
        })?;
        Ok(Arc::new(LoraAdapter { ptr, model: model.clone(), path: path.to_path_buf() }))
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_adapter_lora {
        self.ptr.as_ptr()
    }

    /// The model the adapter belongs to.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// File it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
