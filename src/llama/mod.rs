//! A small RAII layer over llama.cpp's C API (`llama-cpp-sys-2`, the sys crate of llama-cpp-rs).
//!
//! Why not llama-cpp-2's safe types: they keep the raw `llama_model` / `llama_context` handles
//! private, so nothing can be added next to them, and gpo needs calls they do not wrap:
//! freeing a LoRA adapter on swap (llama-cpp-2 never frees one, so every swap would leak),
//! backend sampler chains with a custom log-prob stage, `llama_model_quantize` (tests write an F32
//! copy of the model), sequence-memory operations guarded for both KV modes, and llama.cpp's
//! error text (captured from its log) in our errors. Everything unsafe lives in this module; the
//! rest of gpo sees [`Model`], [`Context`], [`Batch`], [`LoraAdapter`] and [`SamplerChain`].

mod adapter;
mod batch;
mod context;
mod graph_sampler;
mod log;
mod model;
mod sampler;

pub use adapter::LoraAdapter;
pub use batch::Batch;
pub use context::{Context, ContextParams, DecodeError, KvMode};
pub use graph_sampler::GraphSampler;
pub use model::{ChatMessage, Model, ModelParams};
pub use sampler::SamplerChain;

pub use llama_cpp_sys_2 as sys;

/// A token id.
pub type Token = i32;

/// Initialises the llama.cpp backend and log routing once per process.
pub(crate) fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::install();
        // SAFETY: called once per process before any other llama.cpp call.
        unsafe { sys::llama_backend_init() };
    });
}

/// llama.cpp's version string.
pub fn version() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(sys::llama_version()) }.to_string_lossy().into_owned()
}

/// A compute device llama.cpp found.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Device {
    /// llama.cpp's name ("CPU", "CUDA0", "Metal", …).
    pub name: String,
    /// The hardware ("NVIDIA H200", the CPU's model name, …).
    pub description: String,
    /// A GPU (discrete or integrated) rather than the CPU or an accelerator.
    pub gpu: bool,
    /// Memory in bytes (total, free), as the device reports it.
    pub memory: (usize, usize),
}

/// The devices in llama.cpp's registry, in its order.
pub fn devices() -> Vec<Device> {
    init();
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            return String::new();
        }
        // SAFETY: llama.cpp returns NUL-terminated strings owned by its static registry.
        unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    // SAFETY: plain queries over llama.cpp's static device registry, indices below its count.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .map(|i| {
                let d = sys::ggml_backend_dev_get(i);
                let t = sys::ggml_backend_dev_type(d);
                let (mut free, mut total) = (0usize, 0usize);
                sys::ggml_backend_dev_memory(d, &mut free, &mut total);
                Device {
                    name: text(sys::ggml_backend_dev_name(d)),
                    description: text(sys::ggml_backend_dev_description(d)),
                    gpu: t == sys::GGML_BACKEND_DEVICE_TYPE_GPU || t == sys::GGML_BACKEND_DEVICE_TYPE_IGPU,
                    memory: (total, free),
                }
            })
            .collect()
    }
}

/// Whether llama.cpp found a GPU device (CUDA, Metal, …) to offload to.
pub fn has_gpu() -> bool {
    devices().iter().any(|d| d.gpu)
}

/// llama.cpp's description of the CPU/GPU features it was built with.
pub fn system_info() -> String {
    init();
    // SAFETY: returns a pointer to a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(sys::llama_print_system_info()) }.to_string_lossy().into_owned()
}

pub(crate) use log::{clear_last_error, take_last_error};
pub(crate) use model::check_gguf_file as check_gguf;

/// Writes an all-F32 copy of a GGUF model with llama.cpp's quantize API (used by parity tests and
/// `gpo convert`): the reference for comparing a forward pass without quantization error.
pub fn write_f32_copy(src: &std::path::Path, dst: &std::path::Path) -> crate::Result<()> {
    use crate::Error;
    model::check_gguf_file(src)?;
    init();
    let c_src = model::path_cstring(src)?;
    let c_dst = model::path_cstring(dst)?;
    // SAFETY: default params are plain data; paths are valid C strings for the call's duration.
    let rc = unsafe {
        let mut p = sys::llama_model_quantize_default_params();
        p.ftype = sys::LLAMA_FTYPE_ALL_F32;
        p.allow_requantize = true;
        p.quantize_output_tensor = true;
        p.pure_ = true;
        p.output_tensor_type = sys::GGML_TYPE_F32;
        p.token_embedding_type = sys::GGML_TYPE_F32;
        clear_last_error();
        sys::llama_model_quantize(c_src.as_ptr(), c_dst.as_ptr(), &p)
    };
    if rc != 0 {
        return Err(Error::ModelLoad {
            path: src.to_path_buf(),
            reason: take_last_error().unwrap_or_else(|| format!("llama_model_quantize returned {rc}")),
        });
    }
    Ok(())
}
