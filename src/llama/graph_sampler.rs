//! Sampling inside llama.cpp's decode graph (its experimental backend-sampling API), with the
//! sampled token's log-probability computed there too.
//!
//! A [`GraphSampler`] is a llama.cpp sampler chain `[head, stages…, tail]`, attached to one
//! sequence id of a [`Context`](super::Context) with `llama_set_sampler`:
//! - `head` (ours) sees the raw logit row `z` first and builds `p = softmax(z / T)` as a graph
//!   node — the untruncated distribution of the log-prob definition in `engine::logprob`;
//! - the stages are llama.cpp's own backend samplers (top-k, top-p, min-p, temperature, then the
//!   seeded draw; or greedy), cloned from the sequence's host chain so the RNG state carries over;
//! - `tail` (ours) gathers `log p[sampled]` and makes it the only float the row sends back to the
//!   host (it replaces the `probs` / `logits` / `candidates` outputs the stages left, which would
//!   otherwise copy up to a whole vocabulary row per sequence and step).
//!
//! llama.cpp runs a chain's stages on the backend only as long as each one supports it (a
//! "backend prefix"); the rest would run on the host without our log-prob. `tail` is called last
//! and only when every stage before it was offloaded, so it records that the whole chain runs in
//! the graph ([`GraphSampler::offloaded`]); callers fall back to host sampling otherwise.

use super::{sys, SamplerChain, Token};
use std::ffi::c_char;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::Arc;

/// State shared by one chain's `head` and `tail`.
struct Shared {
    /// `softmax(z / T)` of the row being sampled (a node of the graph being built).
    probs: AtomicPtr<sys::ggml_tensor>,
    /// Set by `tail`'s backend init: every stage before it runs on the backend.
    offloaded: AtomicBool,
}

/// What each of our two samplers' `ctx` points at.
struct Stage {
    shared: Arc<Shared>,
    /// `1 / T` for the head (unused by the tail).
    inv_temperature: f32,
}

/// A sampler chain that samples in the decode graph and returns each token's log-prob.
pub struct GraphSampler {
    chain: SamplerChain,
    shared: Arc<Shared>,
}

impl GraphSampler {
    /// Greedy decoding; log-probs at `T = 1` (the model's own distribution), as on the host.
    pub fn greedy() -> GraphSampler {
        // SAFETY: a fresh sampler handed to the chain, which owns it.
        Self::assemble(1.0, |chain| unsafe { sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_greedy()) })
    }

    /// The stages of `host` (cloned, RNG state included) between our head and tail; `temperature`
    /// is the one `host` samples at (it sets the log-prob's `T`).
    pub fn wrapping(host: &SamplerChain, temperature: f32) -> GraphSampler {
        let inv_t = 1.0 / crate::engine::logprob::effective_temperature(temperature);
        Self::assemble(inv_t, |chain| {
            for stage in host.stages() {
                // SAFETY: `stage` is alive (owned by `host`); the clone is handed to `chain`.
                unsafe { sys::llama_sampler_chain_add(chain, sys::llama_sampler_clone(stage)) };
            }
        })
    }

    fn assemble(inv_temperature: f32, stages: impl FnOnce(*mut sys::llama_sampler)) -> GraphSampler {
        let shared = Arc::new(Shared { probs: AtomicPtr::new(ptr::null_mut()), offloaded: AtomicBool::new(false) });
        // SAFETY: the chain takes ownership of every sampler added to it; our two samplers' ctx
        // boxes are freed by their `free` callbacks when the chain is freed.
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            sys::llama_sampler_chain_add(chain, new_stage(&HEAD, shared.clone(), inv_temperature));
            stages(chain);
            sys::llama_sampler_chain_add(chain, new_stage(&TAIL, shared.clone(), 1.0));
            let chain = SamplerChain::from_raw(NonNull::new(chain).expect("llama_sampler_chain_init returned NULL"));
            GraphSampler { chain, shared }
        }
    }

    /// True once llama.cpp has initialised the chain for a backend and every stage runs there.
    pub fn offloaded(&self) -> bool {
        self.shared.offloaded.load(Ordering::Relaxed)
    }

    /// The chain handle `llama_set_sampler` takes (owned by `self`).
    pub(crate) fn as_ptr(&self) -> *mut sys::llama_sampler {
        self.chain.as_ptr()
    }

    /// Records that the context's sampled `token` was taken (advances transactional RNG state).
    pub fn accept(&mut self, token: Token) {
        self.chain.accept(token);
    }

    /// A host chain with this chain's stages and their current state (RNG included), for
    /// sampling on the host again (for instance after the sequence was preempted).
    pub fn to_host(&self) -> SamplerChain {
        let stages = self.chain.stages();
        let inner = &stages[1..stages.len() - 1];
        // SAFETY: clones of live stages handed to a new chain that owns them.
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            for &s in inner {
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_clone(s));
            }
            SamplerChain::from_raw(NonNull::new(chain).expect("llama_sampler_chain_init returned NULL"))
        }
    }
}

// ---- the two samplers' C callbacks --------------------------------------------------------------
//
// None of them can panic: they only touch plain pointers and atomics.

/// # Safety
/// `iface` must be one of our static interfaces.
unsafe fn new_stage(
    iface: &'static sys::llama_sampler_i,
    shared: Arc<Shared>,
    inv_temperature: f32,
) -> *mut sys::llama_sampler {
    let ctx = Box::into_raw(Box::new(Stage { shared, inv_temperature }));
    // llama.cpp never writes through the interface pointer.
    sys::llama_sampler_init(iface as *const _ as *mut _, ctx.cast())
}

/// # Safety
/// `smpl` must be one of our samplers.
unsafe fn stage<'a>(smpl: *const sys::llama_sampler) -> &'a Stage {
    &*((*smpl).ctx as *const Stage)
}

unsafe extern "C" fn head_name(_: *const sys::llama_sampler) -> *const c_char {
    c"gpo-logprob-head".as_ptr()
}

unsafe extern "C" fn tail_name(_: *const sys::llama_sampler) -> *const c_char {
    c"gpo-logprob-tail".as_ptr()
}

/// Host sampling: both stages leave the candidates alone (the host computes log-probs itself).
unsafe extern "C" fn apply_nothing(_: *mut sys::llama_sampler, _: *mut sys::llama_token_data_array) {}

unsafe extern "C" fn clone_stage(smpl: *const sys::llama_sampler) -> *mut sys::llama_sampler {
    // A clone shares its original's head/tail state; gpo never clones a whole graph chain
    // (`to_host` clones only llama.cpp's stages).
    let s = stage(smpl);
    new_stage(&*((*smpl).iface as *const sys::llama_sampler_i), s.shared.clone(), s.inv_temperature)
}

unsafe extern "C" fn free_stage(smpl: *mut sys::llama_sampler) {
    drop(Box::from_raw((*smpl).ctx as *mut Stage));
}

unsafe extern "C" fn copy_nothing(_: *const sys::llama_sampler, _: *mut sys::llama_sampler) {}

unsafe extern "C" fn head_backend_init(
    _: *mut sys::llama_sampler,
    buft: sys::ggml_backend_buffer_type_t,
    _: u32,
) -> bool {
    supports_ops(buft)
}

unsafe extern "C" fn tail_backend_init(
    smpl: *mut sys::llama_sampler,
    buft: sys::ggml_backend_buffer_type_t,
    _: u32,
) -> bool {
    // Called only when every earlier stage of the chain was offloaded.
    let ok = supports_ops(buft);
    stage(smpl).shared.offloaded.store(ok, Ordering::Relaxed);
    ok
}

unsafe extern "C" fn head_backend_apply(
    smpl: *mut sys::llama_sampler,
    ctx: *mut sys::ggml_context,
    _: *mut sys::ggml_cgraph,
    data: *mut sys::llama_sampler_data,
) {
    let s = stage(smpl);
    let logits = (*data).logits;
    let n = sys::ggml_nelements(logits);
    let row = sys::ggml_reshape_1d(ctx, logits, n);
    let probs = sys::ggml_soft_max_ext(ctx, row, ptr::null_mut(), s.inv_temperature, 0.0);
    sys::ggml_set_name(probs, c"gpo_logprob_softmax".as_ptr());
    s.shared.probs.store(probs, Ordering::Relaxed);
}

unsafe extern "C" fn tail_backend_apply(
    smpl: *mut sys::llama_sampler,
    ctx: *mut sys::ggml_context,
    _: *mut sys::ggml_cgraph,
    data: *mut sys::llama_sampler_data,
) {
    let s = stage(smpl);
    let probs = s.shared.probs.swap(ptr::null_mut(), Ordering::Relaxed);
    let sampled = (*data).sampled;
    if probs.is_null() || sampled.is_null() {
        return; // nothing sampled in the graph: the caller sees no log-prob and falls back
    }
    let column = sys::ggml_reshape_2d(ctx, probs, 1, sys::ggml_nelements(probs));
    let index = sys::ggml_reshape_1d(ctx, sampled, sys::ggml_nelements(sampled));
    let picked = sys::ggml_get_rows(ctx, column, index);
    let logprob = sys::ggml_log(ctx, picked);
    sys::ggml_set_name(logprob, c"gpo_logprob".as_ptr());
    // One float per row comes back; the stages' vocabulary-sized outputs stay on the device.
    (*data).probs = logprob;
    (*data).logits = ptr::null_mut();
    (*data).candidates = ptr::null_mut();
}

/// True when the device behind `buft` runs every op our two stages add.
unsafe fn supports_ops(buft: sys::ggml_backend_buffer_type_t) -> bool {
    let device = sys::ggml_backend_buft_get_device(buft);
    if device.is_null() {
        return true; // llama.cpp's convention: no device means the CPU, which runs every op
    }
    let params = sys::ggml_init_params {
        mem_size: 16 * sys::ggml_tensor_overhead(),
        mem_buffer: ptr::null_mut(),
        no_alloc: true,
    };
    let ctx = sys::ggml_init(params);
    if ctx.is_null() {
        return false;
    }
    let logits = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_F32, 1024);
    let probs = sys::ggml_soft_max_ext(ctx, logits, ptr::null_mut(), 1.0, 0.0);
    let index = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I32, 1);
    let picked = sys::ggml_get_rows(ctx, sys::ggml_reshape_2d(ctx, probs, 1, 1024), index);
    let logprob = sys::ggml_log(ctx, picked);
    let ok = [probs, picked, logprob].iter().all(|&op| sys::ggml_backend_dev_supports_op(device, op));
    sys::ggml_free(ctx);
    ok
}

static HEAD: sys::llama_sampler_i = sys::llama_sampler_i {
    name: Some(head_name),
    accept: None,
    apply: Some(apply_nothing),
    reset: None,
    clone: Some(clone_stage),
    free: Some(free_stage),
    backend_init: Some(head_backend_init),
    backend_accept: None,
    backend_apply: Some(head_backend_apply),
    backend_set_input: None,
    backend_reset: None,
    copy_state: Some(copy_nothing),
};

static TAIL: sys::llama_sampler_i = sys::llama_sampler_i {
    name: Some(tail_name),
    accept: None,
    apply: Some(apply_nothing),
    reset: None,
    clone: Some(clone_stage),
    free: Some(free_stage),
    backend_init: Some(tail_backend_init),
    backend_accept: None,
    backend_apply: Some(tail_backend_apply),
    backend_set_input: None,
    backend_reset: None,
    copy_state: Some(copy_nothing),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::logprob::log_softmax_reference;
    use crate::llama::{Batch, Context, ContextParams, KvMode, Model, ModelParams};

    /// A chain with a stage llama.cpp cannot run on a backend (typical-p) is refused whole; a
    /// supported chain on another sequence samples in the graph within the same decode, while
    /// the refused sequence still gets its raw logits for host sampling.
    #[test]
    fn a_chain_the_backend_cannot_run_is_refused_and_mixed_batches_work() {
        let path = crate::models::default_model().expect("the test model (scripts/fetch-model.sh)");
        let model = Model::load(&path, &ModelParams::default()).unwrap();
        let params = ContextParams {
            n_ctx: 512,
            n_batch: 64,
            n_seq_max: 2,
            n_threads: 2,
            kv_mode: KvMode::PerSequence,
            flash_attn: None,
            kv_f32: false,
        };
        let mut ctx = Context::new(model.clone(), &params).unwrap();
        // SAFETY: fresh samplers handed to a fresh chain that `from_raw` then owns.
        let host = unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_typical(0.9, 1));
            sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_dist(1));
            SamplerChain::from_raw(NonNull::new(chain).unwrap())
        };
        let refused = ctx.attach_sampler(0, GraphSampler::wrapping(&host, 1.0)).unwrap_err();
        assert!(!refused.offloaded());
        assert!(!ctx.has_sampler(0));
        assert!(ctx.attach_sampler(1, GraphSampler::greedy()).is_ok());

        let prompt = model.tokenize("The capital of France is", true, false).unwrap();
        let mut batch = Batch::new(2 * prompt.len());
        let mut last = [0i32; 2];
        for seq in 0..2 {
            for (i, &t) in prompt.iter().enumerate() {
                let out = batch.push(t, i as i32, seq, i + 1 == prompt.len()).unwrap();
                if let Some(index) = out {
                    last[seq as usize] = index;
                }
            }
        }
        ctx.decode(&batch).unwrap();
        assert!(
            !ctx.is_graph_output(last[0]) && ctx.graph_sampled(last[0]).is_none(),
            "no graph sampler on sequence 0"
        );
        assert!(ctx.is_graph_output(last[1]));
        let (token, logprob) = ctx.graph_sampled(last[1]).expect("sequence 1 sampled in the graph");
        // Sequence 0 has no graph sampler, so llama.cpp copied the raw rows of both back.
        let row = ctx.logits(last[1]).expect("raw logits in a mixed batch").to_vec();
        let argmax = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(token as usize, argmax, "greedy in the graph picks the host's argmax");
        let want = log_softmax_reference(&row, 1.0)[argmax];
        assert!((want - logprob as f64).abs() < 1e-4, "graph log-prob {logprob} vs host {want}");
        assert!(ctx.logits(last[0]).is_some());
        // A sampler attached after the decode does not make that decode's row a graph row.
        assert!(ctx.attach_sampler(0, GraphSampler::greedy()).is_ok());
        assert!(!ctx.is_graph_output(last[0]) && ctx.graph_sampled(last[0]).is_none());
        assert!(ctx.logits(last[0]).is_some());
        assert!(ctx.detach_sampler(1).is_some());
        assert!(!ctx.has_sampler(1));
    }
}
