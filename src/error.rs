//! The crate's error type: one enum, every variant says what went wrong and what to do next.

use std::path::PathBuf;

/// Result alias used across gpo.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in gpo. Messages are written for the person who has to act on them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that should exist does not.
    #[error("file not found: {0} (check the path, or run the setup command in the README to fetch the default model)")]
    NotFound(PathBuf),

    /// The file exists but is not a GGUF file (bad magic, or not a regular file). The message
    /// never quotes the file's contents (gpod returns it to clients).
    #[error("{path} is not a GGUF file ({why}); pass a llama.cpp GGUF model")]
    NotGguf { path: PathBuf, why: &'static str },

    /// llama.cpp refused to load the model; `reason` is llama.cpp's own last error line.
    #[error("llama.cpp could not load the model {path}: {reason}")]
    ModelLoad { path: PathBuf, reason: String },

    /// llama.cpp refused to create a context with the given settings.
    #[error("llama.cpp could not create a context ({settings}): {reason}")]
    ContextCreate { settings: String, reason: String },

    /// A LoRA adapter could not be loaded or applied.
    #[error("LoRA adapter {path} rejected: {reason}")]
    Adapter { path: PathBuf, reason: String },

    /// A request or setting is invalid; the message names the field and the accepted range.
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },

    /// The prompt does not fit the context the engine was started with.
    #[error("prompt is {tokens} tokens but a sequence holds at most {limit} (raise n_ctx, lower n_parallel in per-sequence KV mode, or shorten the prompt)")]
    PromptTooLong { tokens: usize, limit: usize },

    /// The request was cancelled before it finished.
    #[error("request cancelled")]
    Cancelled,

    /// The engine thread is gone (shut down or crashed); start a new engine.
    #[error("the engine has stopped: {0}")]
    EngineStopped(String),

    /// llama_decode failed with a code other than "no KV slot".
    #[error("llama_decode failed with code {code}: {reason}")]
    Decode { code: i32, reason: String },

    /// Tokenization or detokenization failed.
    #[error("tokenizer error: {0}")]
    Tokenize(String),

    /// The chat template could not be applied.
    #[error("chat template error: {0}")]
    ChatTemplate(String),

    /// A GGUF file could not be read or written by gpo itself.
    #[error("GGUF error in {path}: {reason}")]
    Gguf { path: PathBuf, reason: String },

    /// A task or data file has a malformed line.
    #[error("{path}:{line}: {reason}")]
    Data { path: PathBuf, line: usize, reason: String },

    /// A tensor operation of the trainer failed.
    #[error("trainer: {0}")]
    Train(String),

    /// I/O error with the path it happened on.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl Error {
    /// Builds an [`Error::Invalid`].
    pub fn invalid(what: &'static str, why: impl Into<String>) -> Self {
        Error::Invalid { what, why: why.into() }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
