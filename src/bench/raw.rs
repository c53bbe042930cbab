//! The baseline: the rollbench loop written directly against llama.cpp's C API (no engine, no
//! log-probs, host argmax), on the same model and context settings as the engine.

use super::{random_prompt, Setup, Workload};
use crate::engine::KvMode;
use crate::llama::{sys, Model};
use crate::{Error, Result};
use std::time::Instant;

/// Timings of the raw loop (seconds).
#[derive(Debug, Clone, Copy, Default)]
pub struct RawTimes {
    /// Prompt prefill.
    pub prefill_s: f64,
    /// B×G lockstep decode.
    pub decode_s: f64,
    /// K branches by `seq_cp`, G/2 tokens each.
    pub fork_s: f64,
    /// K branches by re-prefilling L tokens each, G/2 tokens each.
    pub reprefill_s: f64,
}

fn argmax(row: &[f32]) -> i32 {
    let mut best = 0;
    let mut bv = row[0];
    for (i, &v) in row.iter().enumerate().skip(1) {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best as i32
}

struct RawCtx {
    ctx: *mut sys::llama_context,
    batch: sys::llama_batch,
}

impl Drop for RawCtx {
    fn drop(&mut self) {
        // SAFETY: both were created in raw_rollout and are freed once.
        unsafe {
            sys::llama_batch_free(self.batch);
            sys::llama_free(self.ctx);
        }
    }
}

impl RawCtx {
    fn clear(&mut self) {
        self.batch.n_tokens = 0;
    }

    fn add(&mut self, t: i32, pos: usize, seq: usize, logits: bool) {
        let i = self.batch.n_tokens as usize;
        // SAFETY: callers never add more than n_batch tokens (the batch's capacity), one id each.
        unsafe {
            *self.batch.token.add(i) = t;
            *self.batch.pos.add(i) = pos as i32;
            *self.batch.n_seq_id.add(i) = 1;
            *(*self.batch.seq_id.add(i)) = seq as i32;
            *self.batch.logits.add(i) = logits as i8;
        }
        self.batch.n_tokens += 1;
    }

    fn decode(&mut self, what: &str) -> Result<()> {
        // SAFETY: valid context and batch.
        let rc = unsafe { sys::llama_decode(self.ctx, self.batch) };
        if rc != 0 {
            return Err(Error::Decode { code: rc, reason: format!("raw loop: {what}") });
        }
        Ok(())
    }

    fn pick(&self, i: i32, n_vocab: usize) -> i32 {
        // SAFETY: i indexes a token decoded with logits in the last batch; rows have n_vocab floats.
        let row = unsafe { std::slice::from_raw_parts(sys::llama_get_logits_ith(self.ctx, i), n_vocab) };
        argmax(row)
    }

    fn seq_cp(&mut self, src: usize, dst: usize, len: usize, kv: KvMode) {
        // SAFETY: ids < n_seq_max; full copies in per-sequence mode (partial ones abort there).
        unsafe {
            let mem = sys::llama_get_memory(self.ctx);
            match kv {
                KvMode::Unified => sys::llama_memory_seq_cp(mem, src as i32, dst as i32, 0, len as i32),
                KvMode::PerSequence => {
                    sys::llama_memory_seq_cp(mem, src as i32, dst as i32, -1, -1);
                    sys::llama_memory_seq_rm(mem, dst as i32, len as i32, -1);
                }
            };
        }
    }

    fn seq_rm(&mut self, seq: usize) {
        // SAFETY: id < n_seq_max.
        unsafe { sys::llama_memory_seq_rm(sys::llama_get_memory(self.ctx), seq as i32, -1, -1) };
    }
}

/// Runs the rollbench workload once on a fresh context; returns its timings.
pub fn raw_rollout(model: &Model, w: &Workload, setup: &Setup, seed: u64) -> Result<RawTimes> {
    let n_vocab = model.n_vocab() as usize;
    let kv = setup.kv;
    let threads = match setup.threads {
        t if t > 0 => t,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get() as i32),
    };
    // SAFETY: plain params; the model outlives the context (borrowed for this function).
    let ctx = unsafe {
        let mut c = sys::llama_context_default_params();
        c.n_ctx = w.n_ctx();
        c.n_batch = w.n_batch();
        c.n_ubatch = w.n_batch();
        c.n_seq_max = w.n_seq();
        c.n_threads = threads;
        c.n_threads_batch = threads;
        c.kv_unified = kv == KvMode::Unified;
        c.no_perf = true;
        c.flash_attn_type = match setup.flash_attn {
            None => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
            Some(true) => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            Some(false) => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        };
        sys::llama_init_from_model(model.as_ptr(), c)
    };
    if ctx.is_null() {
        return Err(Error::ContextCreate {
            settings: "raw bench".into(),
            reason: "llama_init_from_model returned NULL".into(),
        });
    }
    // SAFETY: capacity n_batch tokens, one sequence id each.
    let batch = unsafe { sys::llama_batch_init(w.n_batch() as i32, 0, 1) };
    let mut r = RawCtx { ctx, batch };
    let prompt = random_prompt(model.n_vocab(), w.p, seed);
    let sync = |r: &RawCtx| unsafe { sys::llama_synchronize(r.ctx) };

    // 1. Prefill once, share the prompt.
    let t0 = Instant::now();
    r.clear();
    for (i, &t) in prompt.iter().enumerate() {
        r.add(t, i, 0, i + 1 == w.p);
    }
    r.decode("prefill")?;
    sync(&r);
    let prefill_s = t0.elapsed().as_secs_f64();
    for s in 1..w.b {
        r.seq_cp(0, s, w.p, kv);
    }
    let first = r.pick(w.p as i32 - 1, n_vocab);
    let mut cur = vec![first; w.b];
    let mut hist: Vec<Vec<i32>> = vec![prompt.clone(); w.b];

    // 2. Lockstep decode.
    let t0 = Instant::now();
    for g in 0..w.g {
        r.clear();
        for s in 0..w.b {
            r.add(cur[s], w.p + g, s, true);
            hist[s].push(cur[s]);
        }
        r.decode("decode")?;
        for (s, c) in cur.iter_mut().enumerate() {
            *c = r.pick(s as i32, n_vocab);
        }
    }
    sync(&r);
    let decode_s = t0.elapsed().as_secs_f64();

    // 3. K branches from position L of sequence 0 by KV copy.
    let (l, h) = (w.p + w.g / 2, w.g / 2);
    let branch = |k: usize| w.b + k; // fresh ids, so cached sequences stay as in the engine
    let t0 = Instant::now();
    let mut bc = vec![hist[0][l]; w.k];
    for k in 0..w.k {
        r.seq_cp(0, branch(k), l, kv);
    }
    for step in 0..h {
        r.clear();
        for (k, &t) in bc.iter().enumerate() {
            r.add(t, l + step, branch(k), true);
        }
        r.decode("branch")?;
        for (k, c) in bc.iter_mut().enumerate() {
            *c = r.pick(k as i32, n_vocab);
        }
    }
    sync(&r);
    let fork_s = t0.elapsed().as_secs_f64();
    for k in 0..w.k {
        r.seq_rm(branch(k));
    }

    // 4. Naive: re-prefill the L-token prefix per branch.
    let t0 = Instant::now();
    for k in 0..w.k {
        r.clear();
        for (i, &t) in hist[0][..l].iter().enumerate() {
            r.add(t, i, branch(k), i + 1 == l);
        }
        r.decode("re-prefill")?;
    }
    let mut bc = vec![hist[0][l]; w.k];
    for step in 0..h {
        r.clear();
        for (k, &t) in bc.iter().enumerate() {
            r.add(t, l + step, branch(k), true);
        }
        r.decode("naive branch")?;
        for (k, c) in bc.iter_mut().enumerate() {
            *c = r.pick(k as i32, n_vocab);
        }
    }
    sync(&r);
    let reprefill_s = t0.elapsed().as_secs_f64();
    Ok(RawTimes { prefill_s, decode_s, fork_s, reprefill_s })
}
