//! A llama.cpp context: KV memory for up to `n_seq_max` sequences, decode, logits, adapters.

use super::{clear_last_error, sys, take_last_error, Batch, GraphSampler, LoraAdapter, Model, Token};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::ptr::NonNull;
use std::sync::Arc;

/// How the KV cache is laid out across sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvMode {
    /// One pool of `n_ctx` cells shared by all sequences: a fork is metadata only (zero copy),
    /// but attention spans the cells of every sequence.
    Unified,
    /// `n_ctx / n_seq_max` cells per sequence: attention sees only its own cells; a fork copies the
    /// source sequence's whole buffer.
    PerSequence,
}

impl std::str::FromStr for KvMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "unified" => Ok(KvMode::Unified),
            "per-sequence" | "per-seq" | "split" => Ok(KvMode::PerSequence),
            _ => Err(Error::invalid("kv_mode", format!("{s:?} is not one of unified, per-sequence"))),
        }
    }
}

impl std::fmt::Display for KvMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvMode::Unified => "unified",
            KvMode::PerSequence => "per-sequence",
        })
    }
}

/// Settings for a [`Context`].
#[derive(Debug, Clone)]
pub struct ContextParams {
    /// Total KV cells (tokens) over all sequences.
    pub n_ctx: u32,
    /// Largest batch handed to one `llama_decode`.
    pub n_batch: u32,
    /// Sequences (llama.cpp sequence ids `0..n_seq_max`).
    pub n_seq_max: u32,
    /// CPU threads; 0 = all available cores.
    pub n_threads: i32,
    /// KV layout.
    pub kv_mode: KvMode,
    /// Flash attention: None = llama.cpp's automatic choice.
    pub flash_attn: Option<bool>,
    /// Keep K/V in f32 instead of f16 (exact log-probs at twice the KV memory).
    pub kv_f32: bool,
}

/// Why a decode failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// No free KV cells for the batch; the memory state is unchanged.
    NoKvSlot,
    /// Aborted by the abort callback.
    Aborted,
    /// Any other failure, with llama.cpp's code and message.
    Failed(i32, String),
}

/// A llama.cpp context. Owned by one thread at a time (Send, not Sync).
pub struct Context {
    ptr: NonNull<sys::llama_context>,
    mem: sys::llama_memory_t,
    model: Arc<Model>,
    n_seq_max: u32,
    kv_mode: KvMode,
    /// The adapter currently set; the context keeps it alive while llama.cpp uses it.
    adapter: Option<(Arc<LoraAdapter>, f32)>,
    /// Batch indices that carried logits in the last successful decode, ascending.
    outputs: Vec<i32>,
    /// (batch index, sequence) of the outputs of the last decode that were sampled in the graph,
    /// ascending: their sequences had a graph sampler attached when the batch was decoded.
    graph_outputs: Vec<(i32, i32)>,
    /// Graph samplers attached per sequence id. llama.cpp holds raw pointers to them, so they are
    /// owned here and dropped only after detaching or after the context is freed.
    graph_samplers: Vec<Option<GraphSampler>>,
    /// The engine thread that owns this context, once an engine runs it: decoding and adapter
    /// swaps (which touch the model's unlocked adapter set) are asserted to happen there.
    owner: Option<std::thread::ThreadId>,
}

// SAFETY: a llama_context may move between threads; it is never used from two at once (&mut self).
unsafe impl Send for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: freed once; the adapter Arc is dropped after the context that used it.
        unsafe { sys::llama_free(self.ptr.as_ptr()) };
    }
}

impl Context {
    /// Creates a context on `model`.
    pub fn new(model: Arc<Model>, p: &ContextParams) -> Result<Context> {
        let settings = format!("n_ctx={} n_seq_max={} kv={:?}", p.n_ctx, p.n_seq_max, p.kv_mode);
        // SAFETY: plain function returning a constant.
        let max_seq = unsafe { sys::llama_max_parallel_sequences() } as u32;
        if p.n_seq_max == 0 || p.n_seq_max > max_seq {
            return Err(Error::invalid("n_parallel", format!("{} is outside 1..={max_seq}", p.n_seq_max)));
        }
        if p.n_ctx < 16 || p.n_batch == 0 {
            return Err(Error::invalid(
                "n_ctx",
                format!("n_ctx={} n_batch={} (n_ctx must be ≥ 16, n_batch ≥ 1)", p.n_ctx, p.n_batch),
            ));
        }
        let threads = if p.n_threads > 0 {
            p.n_threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get() as i32)
        };
        // SAFETY: plain-data params; the model pointer is valid while `model` is held.
        let ptr = unsafe {
            let mut c = sys::llama_context_default_params();
            c.n_ctx = p.n_ctx;
            c.n_batch = p.n_batch;
            c.n_ubatch = p.n_batch;
            c.n_seq_max = p.n_seq_max;
            c.n_threads = threads;
            c.n_threads_batch = threads;
            c.kv_unified = p.kv_mode == KvMode::Unified;
            c.no_perf = true;
            if p.kv_f32 {
                c.type_k = sys::GGML_TYPE_F32;
                c.type_v = sys::GGML_TYPE_F32;
            }
            c.flash_attn_type = match p.flash_attn {
                None => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
                Some(true) => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
                Some(false) => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            };
            clear_last_error();
            sys::llama_init_from_model(model.as_ptr(), c)
        };
        let ptr = NonNull::new(ptr).ok_or_else(|| Error::ContextCreate {
            settings,
            reason: take_last_error().unwrap_or_else(|| "unknown reason".into()),
        })?;
        // SAFETY: valid context.
        let mem = unsafe { sys::llama_get_memory(ptr.as_ptr()) };
        Ok(Context {
            ptr,
            mem,
            model,
            n_seq_max: p.n_seq_max,
            kv_mode: p.kv_mode,
            adapter: None,
            outputs: Vec::new(),
            graph_outputs: Vec::new(),
            graph_samplers: (0..p.n_seq_max).map(|_| None).collect(),
            owner: None,
        })
    }

    /// Binds this context and its model to the calling (engine) thread.
    pub(crate) fn bind_owner(&mut self) {
        self.owner = Some(std::thread::current().id());
        self.model.bind_owner();
    }

    fn assert_owner(&self) {
        assert!(
            self.owner.is_none_or(|t| t == std::thread::current().id()),
            "an engine's llama.cpp context used off its engine thread"
        );
    }

    /// The model this context runs.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// KV layout.
    pub fn kv_mode(&self) -> KvMode {
        self.kv_mode
    }

    /// Total KV cells.
    pub fn n_ctx(&self) -> u32 {
        // SAFETY: valid context.
        unsafe { sys::llama_n_ctx(self.ptr.as_ptr()) }
    }

    /// KV cells one sequence can hold (n_ctx in unified mode; llama.cpp rounds per-sequence sizes).
    pub fn n_ctx_seq(&self) -> u32 {
        // SAFETY: valid context.
        unsafe { sys::llama_n_ctx_seq(self.ptr.as_ptr()) }
    }

    /// Largest batch.
    pub fn n_batch(&self) -> u32 {
        // SAFETY: valid context.
        unsafe { sys::llama_n_batch(self.ptr.as_ptr()) }
    }

    /// Number of sequence ids.
    pub fn n_seq_max(&self) -> u32 {
        self.n_seq_max
    }

    fn check_seq(&self, seq: i32) {
        assert!(seq >= 0 && (seq as u32) < self.n_seq_max, "sequence id {seq} outside 0..{}", self.n_seq_max);
    }

    /// Runs the model on a batch. On `NoKvSlot` the memory is unchanged and the batch can be
    /// retried after freeing cells.
    pub fn decode(&mut self, batch: &Batch) -> std::result::Result<(), DecodeError> {
        self.assert_owner();
        for i in 0..batch.len() {
            self.check_seq(batch.seq_at(i));
        }
        clear_last_error();
        // SAFETY: the batch was built with checked writes; sequence ids were checked above.
        let rc = unsafe { sys::llama_decode(self.ptr.as_ptr(), batch.raw()) };
        self.outputs.clear();
        self.graph_outputs.clear();
        if rc == 0 {
            self.outputs.extend_from_slice(batch.outputs());
            self.graph_outputs.extend(
                self.outputs
                    .iter()
                    .map(|&i| (i, batch.seq_at(i as usize)))
                    .filter(|&(_, seq)| self.graph_samplers[seq as usize].is_some()),
            );
        }
        match rc {
            0 => Ok(()),
            1 => Err(DecodeError::NoKvSlot),
            2 => Err(DecodeError::Aborted),
            _ => Err(DecodeError::Failed(rc, take_last_error().unwrap_or_default())),
        }
    }

    /// Logits of the token at `batch_index` of the last decoded batch (it must have asked for them).
    /// None when the row was sampled in the graph and llama.cpp sent no raw logits back.
    pub fn logits(&self, batch_index: i32) -> Option<&[f32]> {
        // llama.cpp copies raw rows back unless every output row was sampled in the graph.
        let raw_logits = self.graph_outputs.len() < self.outputs.len();
        if !raw_logits || self.outputs.binary_search(&batch_index).is_err() {
            return None;
        }
        // SAFETY: the index carried logits in the last successful decode; the row has n_vocab
        // floats and stays valid until the next decode (which needs &mut self).
        unsafe {
            let p = sys::llama_get_logits_ith(self.ptr.as_ptr(), batch_index);
            (!p.is_null()).then(|| std::slice::from_raw_parts(p, self.model.n_vocab() as usize))
        }
    }

    /// Attaches a graph sampler to sequence `seq`: from the next decode on, llama.cpp samples that
    /// sequence's output rows inside the graph ([`Context::graph_sampled`]). Gives the sampler
    /// back when llama.cpp refuses it or cannot run every stage on the backend (then sample on
    /// the host). Replaces nothing: detach first.
    pub fn attach_sampler(&mut self, seq: i32, sampler: GraphSampler) -> std::result::Result<(), GraphSampler> {
        self.check_seq(seq);
        assert!(self.graph_samplers[seq as usize].is_none(), "sequence {seq} already has a graph sampler");
        // SAFETY: valid context and chain; the chain is stored below and outlives its attachment.
        let accepted = unsafe { sys::llama_set_sampler(self.ptr.as_ptr(), seq, sampler.as_ptr()) };
        if accepted && sampler.offloaded() {
            self.graph_samplers[seq as usize] = Some(sampler);
            return Ok(());
        }
        if accepted {
            // SAFETY: detaching the chain just attached, before it is handed back.
            unsafe { sys::llama_set_sampler(self.ptr.as_ptr(), seq, std::ptr::null_mut()) };
        }
        Err(sampler)
    }

    /// Detaches and returns the graph sampler of `seq`, if any (its state is current).
    pub fn detach_sampler(&mut self, seq: i32) -> Option<GraphSampler> {
        self.check_seq(seq);
        let sampler = self.graph_samplers[seq as usize].take()?;
        // SAFETY: valid context; NULL detaches (llama.cpp drops its pointer to the chain).
        unsafe { sys::llama_set_sampler(self.ptr.as_ptr(), seq, std::ptr::null_mut()) };
        Some(sampler)
    }

    /// Whether `seq` has a graph sampler attached.
    pub fn has_sampler(&self, seq: i32) -> bool {
        self.graph_samplers.get(seq as usize).is_some_and(|s| s.is_some())
    }

    /// Whether the output at `batch_index` of the last decode was sampled in the graph.
    pub fn is_graph_output(&self, batch_index: i32) -> bool {
        self.graph_outputs.binary_search_by_key(&batch_index, |&(i, _)| i).is_ok()
    }

    /// The token the graph sampled for the output at `batch_index` of the last decode, with its
    /// log-prob (see `engine::logprob`); the sequence's sampler has accepted it. None when that
    /// row was not sampled in the graph or llama.cpp returned nothing for it.
    pub fn graph_sampled(&mut self, batch_index: i32) -> Option<(Token, f32)> {
        let k = self.graph_outputs.binary_search_by_key(&batch_index, |&(i, _)| i).ok()?;
        let seq = self.graph_outputs[k].1;
        // SAFETY: the index carried an output in the last successful decode of this context;
        // the probs row holds `count` floats and is read before the next decode.
        let (token, logprob) = unsafe {
            let token = sys::llama_get_sampled_token_ith(self.ptr.as_ptr(), batch_index);
            let probs = sys::llama_get_sampled_probs_ith(self.ptr.as_ptr(), batch_index);
            let count = sys::llama_get_sampled_probs_count_ith(self.ptr.as_ptr(), batch_index);
            if token < 0 || probs.is_null() || count != 1 {
                return None;
            }
            (token, *probs)
        };
        // A sampler detached since the decode has no state left to advance: report nothing.
        self.graph_samplers[seq as usize].as_mut()?.accept(token);
        Some((token, logprob))
    }

    /// Makes `dst` hold exactly the first `len` positions of `src` (the KV fork).
    /// Unified mode shares the cells (metadata only); per-sequence mode copies the whole source
    /// buffer and drops the tail, because a partial cross-stream copy aborts inside llama.cpp.
    pub fn fork_prefix(&mut self, src: i32, dst: i32, len: i32) {
        self.check_seq(src);
        self.check_seq(dst);
        assert!(src != dst, "fork onto itself");
        // SAFETY: ids checked; ranges are whole-sequence or [0, len) as llama.cpp requires.
        unsafe {
            sys::llama_memory_seq_rm(self.mem, dst, -1, -1);
            match self.kv_mode {
                KvMode::Unified => sys::llama_memory_seq_cp(self.mem, src, dst, 0, len),
                KvMode::PerSequence => {
                    sys::llama_memory_seq_cp(self.mem, src, dst, -1, -1);
                    sys::llama_memory_seq_rm(self.mem, dst, len, -1);
                }
            }
        }
    }

    /// Drops positions `from..` of `seq` (all of it for 0).
    pub fn truncate(&mut self, seq: i32, from: i32) {
        self.check_seq(seq);
        // SAFETY: id checked; removing a tail of one sequence never fails.
        unsafe { sys::llama_memory_seq_rm(self.mem, seq, from.max(0), -1) };
    }

    /// Largest position held for `seq`, -1 if empty.
    pub fn seq_pos_max(&self, seq: i32) -> i32 {
        self.check_seq(seq);
        // SAFETY: id checked.
        unsafe { sys::llama_memory_seq_pos_max(self.mem, seq) }
    }

    /// Clears all sequences.
    pub fn clear(&mut self) {
        // SAFETY: valid memory handle.
        unsafe { sys::llama_memory_clear(self.mem, true) };
    }

    /// Sets (or with `None` removes) the LoRA adapter. The previous adapter is released only after
    /// the context stops using it, so a swap never frees memory llama.cpp still points at.
    pub fn set_adapter(&mut self, adapter: Option<(Arc<LoraAdapter>, f32)>) -> Result<()> {
        self.assert_owner();
        if let Some((a, _)) = &adapter {
            if !Arc::ptr_eq(a.model(), &self.model) {
                return Err(Error::Adapter {
                    path: a.path().to_path_buf(),
                    reason: "loaded for another model instance".into(),
                });
            }
        }
        let rc = match &adapter {
            // SAFETY: the adapter pointer is alive (we hold an Arc); arrays live for the call.
            Some((a, scale)) => unsafe {
                let mut ptrs = [a.as_ptr()];
                let mut scales = [*scale];
                sys::llama_set_adapters_lora(self.ptr.as_ptr(), ptrs.as_mut_ptr(), 1, scales.as_mut_ptr())
            },
            // SAFETY: n = 0 with NULL arrays clears the adapters.
            None => unsafe {
                sys::llama_set_adapters_lora(self.ptr.as_ptr(), std::ptr::null_mut(), 0, std::ptr::null_mut())
            },
        };
        if rc != 0 {
            return Err(Error::Adapter {
                path: adapter.as_ref().map(|(a, _)| a.path().to_path_buf()).unwrap_or_default(),
                reason: format!("llama_set_adapters_lora returned {rc}"),
            });
        }
        self.adapter = adapter; // the old Arc drops here, after llama.cpp switched away from it
        Ok(())
    }
}
