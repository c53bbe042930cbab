//! A token batch with checked writes (llama-cpp-2's `LlamaBatch::add` writes past the allocated
//! sequence-id arrays when given too many ids; here every token carries exactly one id).

use super::{sys, Token};

/// Tokens for one `llama_decode`, one sequence id each.
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
    /// Batch indices of the tokens whose logits are requested, ascending.
    outputs: Vec<i32>,
}

// SAFETY: the batch owns its heap arrays.
unsafe impl Send for Batch {}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_init, freed once.
        unsafe { sys::llama_batch_free(self.raw) };
    }
}

impl Batch {
    /// A batch for up to `capacity` tokens.
    pub fn new(capacity: usize) -> Batch {
        let capacity = capacity.max(1);
        // SAFETY: allocates arrays for `capacity` tokens with one sequence id slot each.
        let raw = unsafe { sys::llama_batch_init(capacity as i32, 0, 1) };
        Batch { raw, capacity, outputs: Vec::new() }
    }

    /// Tokens in the batch.
    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    /// True when no token was added.
    pub fn is_empty(&self) -> bool {
        self.raw.n_tokens == 0
    }

    /// Room left.
    pub fn remaining(&self) -> usize {
        self.capacity - self.len()
    }

    /// Removes all tokens.
    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
        self.outputs.clear();
    }

    /// Adds a token at `pos` of sequence `seq`; `output` requests its logits. Returns the token's
    /// batch index (what [`super::Context::logits`] takes) when `output` is set, or None when the
    /// batch is full.
    pub fn push(&mut self, token: Token, pos: i32, seq: i32, output: bool) -> Option<Option<i32>> {
        let i = self.len();
        if i >= self.capacity {
            return None;
        }
        // SAFETY: i < capacity, and every array was allocated for `capacity` entries with one
        // sequence id each.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = seq;
            *self.raw.logits.add(i) = output as i8;
        }
        self.raw.n_tokens += 1;
        let out = output.then(|| {
            self.outputs.push(i as i32);
            i as i32
        });
        Some(out)
    }

    pub(crate) fn seq_at(&self, i: usize) -> i32 {
        assert!(i < self.len());
        // SAFETY: i < n_tokens ≤ capacity.
        unsafe { *(*self.raw.seq_id.add(i)) }
    }

    pub(crate) fn outputs(&self) -> &[i32] {
        &self.outputs
    }

    pub(crate) fn raw(&self) -> sys::llama_batch {
        self.raw
    }
}
