//! A loaded GGUF model: weights, vocabulary, chat template, metadata.

use super::{clear_last_error, init, sys, take_last_error, Token};
use crate::{Error, Result};
use std::ffi::{CStr, CString};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};
use std::thread::ThreadId;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct ModelParams {
    /// Layers to offload to the GPU; negative = all, 0 = CPU only.
    pub n_gpu_layers: i32,
    /// Memory-map the file (default true).
    pub use_mmap: bool,
    /// Load only the vocabulary and metadata, no weights (fast validation).
    pub vocab_only: bool,
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams { n_gpu_layers: -1, use_mmap: true, vocab_only: false }
    }
}

/// One chat message for the model's chat template.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage { role: "user".into(), content: content.into() }
    }
}

/// A llama.cpp model. Immutable after load; shared between threads through `Arc`.
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    vocab: *const sys::llama_vocab,
    path: PathBuf,
    pieces: Vec<Box<[u8]>>,
    /// The thread that decodes with this model, once an engine owns it: the only thread that
    /// may load or free its adapters.
    owner: OnceLock<ThreadId>,
}

// SAFETY: after loading, gpo calls only read-only llama.cpp functions on the model from several
// threads (vocabulary, tokenizer, metadata). The one mutable model-side structure is llama.cpp's
// unlocked set of registered adapters, which `llama_adapter_lora_init`/`_free` change and decoding
// reads: once an engine owns the model (`bind_owner`), adapters are loaded and freed on its thread
// only (`LoraAdapter::load` refuses other threads; the engine's adapters live in its context).
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: the pointer came from llama_model_load_from_file and is freed once; every
        // context and adapter holds an Arc<Model>, so none outlives it.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) };
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("path", &self.path).field("arch", &self.architecture()).finish()
    }
}

pub(crate) fn path_cstring(path: &Path) -> Result<CString> {
    let s = path.to_str().ok_or_else(|| Error::invalid("path", format!("{} is not valid UTF-8", path.display())))?;
    CString::new(s).map_err(|_| Error::invalid("path", "contains a NUL byte"))
}

/// Checks that `path` is a regular file that starts with the GGUF magic; llama.cpp reports the
/// rest. FIFOs and devices are refused before they are opened (opening a FIFO blocks).
pub(crate) fn check_gguf_file(path: &Path) -> Result<()> {
    let not_found = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(path.to_path_buf()),
        _ => Error::io(path, e),
    };
    if !std::fs::metadata(path).map_err(not_found)?.is_file() {
        return Err(Error::NotGguf { path: path.to_path_buf(), why: "not a regular file" });
    }
    let mut f = std::fs::File::open(path).map_err(not_found)?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
    if n < 4 || &magic != b"GGUF" {
        return Err(Error::NotGguf { path: path.to_path_buf(), why: "it does not start with the GGUF magic" });
    }
    Ok(())
}

impl Model {
    /// Makes the calling thread the model's owner: from now on only it may load or free
    /// adapters of this model. Called by the engine thread when it starts.
    pub(crate) fn bind_owner(&self) {
        let _ = self.owner.set(std::thread::current().id());
    }

    /// Whether the calling thread may change the model's adapter set.
    pub(crate) fn owned_here(&self) -> bool {
        self.owner.get().is_none_or(|t| *t == std::thread::current().id())
    }

    /// Loads a GGUF model. Missing files, non-GGUF files and files llama.cpp rejects (truncated,
    /// unsupported architecture) give a typed error carrying llama.cpp's reason.
    pub fn load(path: impl AsRef<Path>, params: &ModelParams) -> Result<Arc<Model>> {
        let path = path.as_ref();
        check_gguf_file(path)?;
        init();
        let c_path = path_cstring(path)?;
        // SAFETY: plain-data params; the path outlives the call.
        let ptr = unsafe {
            let mut p = sys::llama_model_default_params();
            p.n_gpu_layers = params.n_gpu_layers;
            if !params.use_mmap {
                p.load_mode = sys::LLAMA_LOAD_MODE_NONE;
            }
            p.vocab_only = params.vocab_only;
            clear_last_error();
            sys::llama_model_load_from_file(c_path.as_ptr(), p)
        };
        let ptr = NonNull::new(ptr).ok_or_else(|| Error::ModelLoad {
            path: path.to_path_buf(),
            reason: take_last_error().unwrap_or_else(|| "unknown reason (see RUST_LOG=llama.cpp=debug)".into()),
        })?;
        // SAFETY: valid model pointer.
        let vocab = unsafe { sys::llama_model_get_vocab(ptr.as_ptr()) };
        let mut model = Model { ptr, vocab, path: path.to_path_buf(), pieces: Vec::new(), owner: OnceLock::new() };
        model.pieces = (0..model.n_vocab()).map(|t| model.piece_uncached(t).into_boxed_slice()).collect();
        Ok(Arc::new(model))
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_model {
        self.ptr.as_ptr()
    }

    /// Path the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> i32 {
        // SAFETY: valid vocab pointer for the model's lifetime.
        unsafe { sys::llama_vocab_n_tokens(self.vocab) }
    }

    /// Context length the model was trained with.
    pub fn n_ctx_train(&self) -> u32 {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_ctx_train(self.as_ptr()) }.max(0) as u32
    }

    /// Hidden size.
    pub fn n_embd(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_embd(self.as_ptr()) }.max(0) as usize
    }

    /// Number of transformer blocks.
    pub fn n_layer(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_layer(self.as_ptr()) }.max(0) as usize
    }

    /// Number of parameters.
    pub fn n_params(&self) -> u64 {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_params(self.as_ptr()) }
    }

    /// Beginning-of-sequence token, if the vocabulary has one.
    pub fn bos(&self) -> Option<Token> {
        // SAFETY: valid vocab pointer.
        let t = unsafe { sys::llama_vocab_bos(self.vocab) };
        (t >= 0).then_some(t)
    }

    /// End-of-sequence token, if the vocabulary has one.
    pub fn eos(&self) -> Option<Token> {
        // SAFETY: valid vocab pointer.
        let t = unsafe { sys::llama_vocab_eos(self.vocab) };
        (t >= 0).then_some(t)
    }

    /// True for tokens that end generation (EOS, EOT, …).
    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: valid vocab pointer; llama.cpp bounds-checks the id.
        (0..self.n_vocab()).contains(&token) && unsafe { sys::llama_vocab_is_eog(self.vocab, token) }
    }

    /// Whether tokenizing a prompt adds BOS.
    pub fn add_bos(&self) -> bool {
        // SAFETY: valid vocab pointer.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab) }
    }

    /// A metadata value as a string (`general.architecture`, …).
    pub fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: buf is writable for buf.len() bytes.
            let n = unsafe {
                sys::llama_model_meta_val_str(self.as_ptr(), key.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            };
            if n < 0 {
                return None;
            }
            if (n as usize) < buf.len() {
                buf.truncate(n as usize);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n as usize + 1, 0);
        }
    }

    /// Architecture name from `general.architecture` (e.g. "llama", "qwen2").
    pub fn architecture(&self) -> String {
        self.meta("general.architecture").unwrap_or_default()
    }

    /// The model's built-in chat template, if any.
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: returns NULL or a string owned by the model.
        let p = unsafe { sys::llama_model_chat_template(self.as_ptr(), std::ptr::null()) };
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// Short description ("llama 135M Q4_1").
    pub fn description(&self) -> String {
        let mut buf = [0u8; 256];
        // SAFETY: buf is writable for its length.
        let n = unsafe { sys::llama_model_desc(self.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        String::from_utf8_lossy(&buf[..n.clamp(0, 255) as usize]).into_owned()
    }

    /// Tokenizes text. `add_special` adds BOS/EOS as the model wants; `parse_special` turns
    /// special-token text (`<|im_start|>`) into the special tokens.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<Token>> {
        let len = i32::try_from(text.len()).map_err(|_| Error::Tokenize("text longer than 2 GiB".into()))?;
        let mut out: Vec<Token> = vec![0; text.len() + 2];
        loop {
            // SAFETY: text is valid for len bytes; out is writable for out.len() tokens.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab,
                    text.as_ptr().cast(),
                    len,
                    out.as_mut_ptr(),
                    out.len() as i32,
                    add_special,
                    parse_special,
                )
            };
            if n == i32::MIN {
                return Err(Error::Tokenize("token count overflows i32".into()));
            }
            if n < 0 {
                out.resize((-n) as usize, 0);
                continue;
            }
            out.truncate(n as usize);
            return Ok(out);
        }
    }

    fn piece_uncached(&self, token: Token) -> Vec<u8> {
        let mut buf = vec![0u8; 32];
        loop {
            // SAFETY: buf is writable for its length; the token id is in range (caller).
            let n = unsafe {
                sys::llama_token_to_piece(self.vocab, token, buf.as_mut_ptr().cast(), buf.len() as i32, 0, false)
            };
            if n < 0 {
                buf.resize((-n) as usize, 0);
                continue;
            }
            buf.truncate(n as usize);
            return buf;
        }
    }

    /// The bytes a token contributes to the text (special tokens render as nothing).
    /// Out-of-range ids give an empty piece.
    pub fn piece(&self, token: Token) -> &[u8] {
        usize::try_from(token).ok().and_then(|i| self.pieces.get(i)).map_or(&[], |p| p)
    }

    /// Text of a token sequence (pieces concatenated, invalid UTF-8 replaced).
    pub fn detokenize(&self, tokens: &[Token]) -> String {
        let bytes: Vec<u8> = tokens.iter().flat_map(|&t| self.piece(t).iter().copied()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Text of a token sequence with special tokens rendered (`<|im_start|>` …), as a
    /// tokenizer with special-token parsing would read it back.
    pub fn detokenize_special(&self, tokens: &[Token]) -> String {
        let mut bytes = Vec::new();
        for &t in tokens {
            if !(0..self.n_vocab()).contains(&t) {
                continue;
            }
            let mut buf = vec![0u8; 64];
            loop {
                // SAFETY: buf is writable for its length; the id is in range.
                let n = unsafe {
                    sys::llama_token_to_piece(self.vocab, t, buf.as_mut_ptr().cast(), buf.len() as i32, 0, true)
                };
                if n < 0 {
                    buf.resize((-n) as usize, 0);
                    continue;
                }
                bytes.extend_from_slice(&buf[..n as usize]);
                break;
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// True when every id is a valid token of this vocabulary.
    pub fn valid_tokens(&self, tokens: &[Token]) -> bool {
        let n = self.n_vocab();
        tokens.iter().all(|&t| (0..n).contains(&t))
    }

    /// Renders messages with the model's chat template, ending with the assistant's turn opener.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        let tmpl = self
            .chat_template()
            .ok_or_else(|| Error::ChatTemplate("the model has no chat template; send the prompt in raw mode".into()))?;
        let c_tmpl = CString::new(tmpl).map_err(|_| Error::ChatTemplate("template contains NUL".into()))?;
        let owned: Vec<(CString, CString)> = messages
            .iter()
            .map(|m| Ok((CString::new(m.role.as_str())?, CString::new(m.content.as_str())?)))
            .collect::<std::result::Result<_, std::ffi::NulError>>()
            .map_err(|_| Error::ChatTemplate("a message contains a NUL byte".into()))?;
        let msgs: Vec<sys::llama_chat_message> =
            owned.iter().map(|(r, c)| sys::llama_chat_message { role: r.as_ptr(), content: c.as_ptr() }).collect();
        let mut buf = vec![0u8; 2 * messages.iter().map(|m| m.content.len() + m.role.len()).sum::<usize>() + 256];
        loop {
            // SAFETY: msgs point into `owned`, alive for the call; buf is writable for its length.
            let n = unsafe {
                sys::llama_chat_apply_template(
                    c_tmpl.as_ptr(),
                    msgs.as_ptr(),
                    msgs.len(),
                    true,
                    buf.as_mut_ptr().cast(),
                    buf.len() as i32,
                )
            };
            if n < 0 {
                return Err(Error::ChatTemplate(
                    "llama.cpp does not support this model's chat template; use raw mode".into(),
                ));
            }
            if n as usize > buf.len() {
                buf.resize(n as usize, 0);
                continue;
            }
            buf.truncate(n as usize);
            return String::from_utf8(buf).map_err(|_| Error::ChatTemplate("template produced invalid UTF-8".into()));
        }
    }
}
