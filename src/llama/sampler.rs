//! llama.cpp sampler chains (top-k → top-p → min-p → temperature → seeded draw, or greedy).

use super::{sys, Token};
use std::ptr::NonNull;

/// An owned llama.cpp sampler chain.
pub struct SamplerChain {
    ptr: NonNull<sys::llama_sampler>,
}

// SAFETY: a chain is plain state owned by one thread at a time.
unsafe impl Send for SamplerChain {}

impl Drop for SamplerChain {
    fn drop(&mut self) {
        // SAFETY: the chain owns its stages and is freed once.
        unsafe { sys::llama_sampler_free(self.ptr.as_ptr()) };
    }
}

impl SamplerChain {
    /// Builds the chain. `temperature <= 0` is greedy (argmax; the other settings are ignored).
    /// Zero / one values disable a stage: `top_k = 0`, `top_p = 1`, `min_p = 0`.
    pub fn new(temperature: f32, top_k: i32, top_p: f32, min_p: f32, seed: u32) -> SamplerChain {
        // SAFETY: each stage is created and handed to the chain, which takes ownership.
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            if temperature <= 0.0 {
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_greedy());
            } else {
                if top_k > 0 {
                    sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_top_k(top_k));
                }
                if top_p < 1.0 {
                    sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_top_p(top_p, 1));
                }
                if min_p > 0.0 {
                    sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_min_p(min_p, 1));
                }
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_temp(temperature));
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_dist(seed));
            }
            SamplerChain { ptr: NonNull::new(chain).expect("llama_sampler_chain_init returned NULL") }
        }
    }

    /// Wraps a chain created by `llama_sampler_chain_init`; the result owns (and frees) it.
    ///
    /// # Safety
    /// `ptr` must be a sampler chain that nothing else frees.
    pub(crate) unsafe fn from_raw(ptr: NonNull<sys::llama_sampler>) -> SamplerChain {
        SamplerChain { ptr }
    }

    /// The raw chain (owned by `self`).
    pub(crate) fn as_ptr(&self) -> *mut sys::llama_sampler {
        self.ptr.as_ptr()
    }

    /// The chain's stages in order (owned by the chain).
    pub(crate) fn stages(&self) -> Vec<*mut sys::llama_sampler> {
        // SAFETY: valid chain; indices below its length.
        unsafe {
            let n = sys::llama_sampler_chain_n(self.ptr.as_ptr());
            (0..n).map(|i| sys::llama_sampler_chain_get(self.ptr.as_ptr(), i)).collect()
        }
    }

    /// Tells every stage that `token` was taken (RNG and other state advance).
    pub fn accept(&mut self, token: Token) {
        // SAFETY: valid chain.
        unsafe { sys::llama_sampler_accept(self.ptr.as_ptr(), token) };
    }

    /// Samples from a logit row and advances the chain's state (its RNG).
    pub fn sample_row(&mut self, logits: &[f32], scratch: &mut Vec<sys::llama_token_data>) -> Token {
        scratch.clear();
        scratch.extend(logits.iter().enumerate().map(|(i, &l)| sys::llama_token_data {
            id: i as Token,
            logit: l,
            p: 0.0,
        }));
        let mut arr = sys::llama_token_data_array {
            data: scratch.as_mut_ptr(),
            size: scratch.len(),
            selected: -1,
            sorted: false,
        };
        // SAFETY: arr points into scratch, alive and exclusively borrowed for the call.
        unsafe { sys::llama_sampler_apply(self.ptr.as_ptr(), &mut arr) };
        assert!(arr.selected >= 0 && (arr.selected as usize) < arr.size, "sampler selected nothing");
        // SAFETY: selected index checked against size.
        let token = unsafe { (*arr.data.add(arr.selected as usize)).id };
        self.accept(token);
        token
    }
}
