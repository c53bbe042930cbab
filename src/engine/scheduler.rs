//! The engine thread: continuous batching over KV slots, prefix reuse by KV fork, adapter swaps.
//!
//! Every llama.cpp sequence id is a *slot*. A slot is free, running one sequence, or *cached*:
//! it keeps the KV of a finished sequence so later requests that share its prefix (forks, more
//! samples of the same prompt) copy that KV instead of recomputing it. Admission picks, for each
//! waiting sequence, the slot holding the longest common prefix of the same adapter version.
//! The samples of one request share their prompt: the first (leader) prefills it, the others fork
//! the leader's KV and sample their first token from the leader's logits. When KV runs out,
//! cached slots are evicted least recently used first, then running sequences are preempted
//! (their KV dropped, to be recomputed later with their sampler state kept).

use super::logprob::row_stats;
use super::request::{ForkOrigin, SamplingParams};
use super::steps::{segment, StepConfig};
use super::trajectory::{FinishReason, Trajectory};
use super::{EngineStats, Event};
use crate::llama::{Batch, Context, DecodeError, GraphSampler, LoraAdapter, Model, SamplerChain, Token};
use crate::{Error, Result};
use crossbeam_channel::{Receiver, Sender};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Work for one request, shared by its sequences.
pub(crate) struct Job {
    pub id: u64,
    pub context: Arc<Vec<Token>>,
    pub prompt_len: usize,
    pub sampling: SamplingParams,
    pub steps: StepConfig,
    pub stream: bool,
    pub origin: Option<ForkOrigin>,
    pub n: usize,
    pub events: Sender<Event>,
    pub cancelled: Arc<AtomicBool>,
}

/// Messages to the engine thread.
pub(crate) enum Command {
    /// Jobs admitted together (one command, so their batching does not depend on timing).
    Submit(Vec<Arc<Job>>),
    /// Load (path, scale) or remove the adapter. The file is loaded here, on the engine thread:
    /// llama.cpp registers every adapter in its model's (unlocked) adapter set, which decoding
    /// reads, so no other thread may load or free one.
    SetAdapter {
        adapter: Option<(PathBuf, f32)>,
        reply: Sender<Result<u64>>,
    },
    Stats(Sender<EngineStats>),
    /// Drops every cached prefix (running sequences are untouched).
    ClearCache(Sender<usize>),
    /// Wakes the thread to look at cancellation flags.
    Wake,
    Shutdown,
}

/// A sequence that waits for a slot (new, or preempted with its progress kept).
struct Waiting {
    job: Arc<Job>,
    index: usize,
    sampler: Option<SamplerChain>,
    generated: Vec<Token>,
    logprobs: Vec<f32>,
    text: Vec<u8>,
    /// The leader of this sequence's request is prefilling the same context (share its logits).
    follows: Option<usize>,
    /// The backend could not run this sequence's sampler chain in the graph: sample on the host.
    host_only: bool,
}

enum Pending {
    Seq(Waiting),
    Adapter { adapter: Option<(Arc<LoraAdapter>, f32)>, reply: Sender<Result<u64>> },
}

/// A running sequence.
struct Running {
    w: Waiting,
    /// Tokens not yet in the KV (prefill remainder, or the last sampled token).
    pending: Vec<Token>,
    admitted_at: u64,
    /// Followers waiting for this sequence's first logits.
    followers: Vec<Waiting>,
}

#[derive(Default)]
struct Slot {
    /// Tokens whose KV the sequence holds, position 0 onwards.
    tokens: Vec<Token>,
    version: u64,
    last_used: u64,
    running: Option<Box<Running>>,
    cached: bool,
}

pub(crate) struct Scheduler {
    ctx: Context,
    model: Arc<Model>,
    rx: Receiver<Command>,
    slots: Vec<Slot>,
    queue: VecDeque<Pending>,
    batch: Batch,
    version: u64,
    tick: u64,
    next_traj: u64,
    max_cached_tokens: usize,
    prefix_cache: bool,
    seq_capacity: usize,
    /// Set when a sequence was preempted for lack of KV: nothing new is admitted until a running
    /// sequence finishes (re-admitting at once would only fail again).
    kv_blocked: bool,
    scratch: Vec<crate::llama::sys::llama_token_data>,
    /// Sample decoding sequences inside llama.cpp's graph (see [`GraphSampler`]).
    graph_sampling: bool,
    stats: EngineStats,
}

/// One token of a batch whose logits are read back.
struct Output {
    slot: usize,
    index: i32,
}

fn common_prefix(a: &[Token], b: &[Token]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Waiting {
    fn new(job: Arc<Job>, index: usize, follows: Option<usize>) -> Waiting {
        let s = &job.sampling;
        let sampler = (s.temperature > 0.0)
            .then(|| SamplerChain::new(s.temperature, s.top_k, s.top_p, s.min_p, s.sequence_seed(index)));
        Waiting {
            job,
            index,
            sampler,
            generated: Vec::new(),
            logprobs: Vec::new(),
            text: Vec::new(),
            follows,
            host_only: false,
        }
    }

    /// Every token that must be in the KV before the next sample.
    fn target(&self) -> Vec<Token> {
        self.job.context.iter().chain(&self.generated).copied().collect()
    }
}

impl Scheduler {
    pub fn new(
        ctx: Context,
        rx: Receiver<Command>,
        max_cached_tokens: usize,
        prefix_cache: bool,
        graph_sampling: bool,
    ) -> Scheduler {
        let n = ctx.n_seq_max() as usize;
        let model = ctx.model().clone();
        let batch = Batch::new(ctx.n_batch() as usize);
        let seq_capacity = ctx.n_ctx_seq() as usize;
        Scheduler {
            ctx,
            model,
            rx,
            slots: (0..n).map(|_| Slot::default()).collect(),
            queue: VecDeque::new(),
            batch,
            version: 0,
            tick: 0,
            next_traj: 0,
            max_cached_tokens: if prefix_cache { max_cached_tokens } else { 0 },
            prefix_cache,
            seq_capacity,
            kv_blocked: false,
            scratch: Vec::new(),
            graph_sampling,
            stats: EngineStats::default(),
        }
    }

    fn running(&self) -> usize {
        self.slots.iter().filter(|s| s.running.is_some()).count()
    }

    /// Makes the calling thread the engine thread: the only one that may decode with the
    /// context or change its model's adapters (asserted in the context, refused for adapters).
    pub fn bind_thread(&mut self) {
        self.ctx.bind_owner();
    }

    /// Runs until shutdown.
    pub fn run(mut self) {
        loop {
            let idle = self.running() == 0 && !self.can_admit();
            let first = if idle { self.rx.recv().ok() } else { self.rx.try_recv().ok() };
            let mut cmd = first;
            if idle && cmd.is_none() {
                return; // every handle is gone
            }
            while let Some(c) = cmd.take() {
                if !self.command(c) {
                    self.shutdown();
                    return;
                }
                cmd = self.rx.try_recv().ok();
            }
            self.reap_cancelled();
            self.admit();
            if self.running() > 0 {
                self.step();
            }
        }
    }

    fn command(&mut self, c: Command) -> bool {
        match c {
            Command::Submit(jobs) => {
                for job in jobs {
                    self.stats.requests += 1;
                    for i in 0..job.n {
                        let follows = (i > 0 && self.prefix_cache).then_some(0);
                        self.queue.push_back(Pending::Seq(Waiting::new(job.clone(), i, follows)));
                    }
                }
            }
            Command::SetAdapter { adapter, reply } => {
                let loaded = match adapter {
                    None => Ok(None),
                    Some((path, scale)) => LoraAdapter::load(self.ctx.model(), path).map(|a| Some((a, scale))),
                };
                match loaded {
                    Ok(adapter) => self.queue.push_back(Pending::Adapter { adapter, reply }),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Stats(reply) => {
                let mut s = self.stats.clone();
                s.adapter_version = self.version;
                s.running = self.running();
                s.cached = self.slots.iter().filter(|s| s.cached).count();
                s.cached_tokens = self.slots.iter().filter(|s| s.cached).map(|s| s.tokens.len()).sum();
                s.waiting = self.queue.len();
                let _ = reply.send(s);
            }
            Command::ClearCache(reply) => {
                let cached: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].cached).collect();
                for &i in &cached {
                    self.evict(i);
                }
                let _ = reply.send(cached.len());
            }
            Command::Wake => {}
            Command::Shutdown => return false,
        }
        true
    }

    fn shutdown(&mut self) {
        for slot in 0..self.slots.len() {
            if let Some(r) = self.take_running(slot) {
                self.finish_waiting(r.w, FinishReason::Cancelled);
                for f in r.followers {
                    self.finish_waiting(f, FinishReason::Cancelled);
                }
            }
        }
        while let Some(p) = self.queue.pop_front() {
            match p {
                Pending::Seq(w) => self.finish_waiting(w, FinishReason::Cancelled),
                Pending::Adapter { reply, .. } => {
                    let _ = reply.send(Err(Error::EngineStopped("shut down before the adapter swap".into())));
                }
            }
        }
    }

    /// True when the head of the queue could be admitted now.
    fn can_admit(&self) -> bool {
        match self.queue.front() {
            None => false,
            Some(Pending::Adapter { .. }) => self.running() == 0,
            Some(Pending::Seq(_)) => {
                !(self.kv_blocked && self.running() > 0) && self.slots.iter().any(|s| s.running.is_none())
            }
        }
    }

    fn reap_cancelled(&mut self) {
        let mut i = 0;
        while i < self.queue.len() {
            let cancelled = matches!(&self.queue[i], Pending::Seq(w) if w.job.cancelled.load(Ordering::Relaxed));
            if cancelled {
                if let Some(Pending::Seq(w)) = self.queue.remove(i) {
                    self.finish_waiting(w, FinishReason::Cancelled);
                }
            } else {
                i += 1;
            }
        }
        for slot in 0..self.slots.len() {
            let cancelled =
                self.slots[slot].running.as_ref().is_some_and(|r| r.w.job.cancelled.load(Ordering::Relaxed));
            if cancelled {
                self.finish_slot(slot, FinishReason::Cancelled);
            }
        }
    }

    // ---- admission ------------------------------------------------------------------------

    fn admit(&mut self) {
        while let Some(front) = self.queue.front() {
            match front {
                Pending::Adapter { .. } => {
                    if self.running() > 0 {
                        return; // barrier: requests before the swap finish on the old adapter
                    }
                    if let Some(Pending::Adapter { adapter, reply }) = self.queue.pop_front() {
                        let _ = reply.send(self.swap_adapter(adapter));
                    }
                }
                Pending::Seq(w) => {
                    if self.kv_blocked && self.running() > 0 {
                        return;
                    }
                    self.kv_blocked = false;
                    if let Some(leader) = w.follows {
                        // Wait while the leader still prefills the shared context.
                        if self.leader_slot(&w.job, leader).is_some() {
                            let Some(Pending::Seq(w)) = self.queue.pop_front() else { unreachable!() };
                            let slot = self.leader_slot(&w.job, leader).expect("leader slot");
                            self.slots[slot].running.as_mut().expect("running").followers.push(w);
                            continue;
                        }
                    }
                    let Some(Pending::Seq(w)) = self.queue.pop_front() else { unreachable!() };
                    if let Err(w) = self.place(w) {
                        self.queue.push_front(Pending::Seq(w));
                        return;
                    }
                }
            }
        }
    }

    /// The slot of a request's leader while it is still prefilling (so followers can share).
    fn leader_slot(&self, job: &Arc<Job>, leader: usize) -> Option<usize> {
        self.slots.iter().position(|s| {
            s.running.as_ref().is_some_and(|r| {
                Arc::ptr_eq(&r.w.job, job) && r.w.index == leader && r.w.generated.is_empty() && !r.pending.is_empty()
            })
        })
    }

    fn swap_adapter(&mut self, adapter: Option<(Arc<LoraAdapter>, f32)>) -> Result<u64> {
        self.ctx.set_adapter(adapter)?;
        self.version += 1;
        self.stats.adapter_swaps += 1;
        // KV computed under the old adapter must never seed new samples.
        for slot in 0..self.slots.len() {
            if self.slots[slot].cached {
                self.evict(slot);
            }
        }
        Ok(self.version)
    }

    /// Puts a waiting sequence into a slot, reusing the longest cached prefix. Gives it back when
    /// no slot can be freed.
    fn place(&mut self, mut w: Waiting) -> std::result::Result<(), Waiting> {
        w.follows = None;
        let target = w.target();
        // Longest prefix held by any slot of the current adapter version.
        let mut best: Option<(usize, usize)> = None;
        for (i, s) in self.slots.iter().enumerate() {
            if self.prefix_cache && (s.cached || s.running.is_some()) && s.version == self.version {
                let l = common_prefix(&s.tokens, &target);
                if l > best.map_or(0, |b| b.1) {
                    best = Some((i, l));
                }
            }
        }
        // Keep at least one token to feed: its logits give the next sample.
        let reuse = best.map_or(0, |(_, l)| l.min(target.len() - 1));
        let source = best.map(|(i, _)| i).filter(|_| reuse > 0);

        // Take over the source itself when it is cached and nothing of it would be lost.
        let take_over = source.filter(|&s| self.slots[s].cached && self.slots[s].tokens.len() <= reuse + 1);
        let dst = match take_over {
            Some(s) => s,
            None => match self.free_slot(source) {
                Some(d) => d,
                None => match source.filter(|&s| self.slots[s].cached) {
                    Some(s) => s, // no room: reuse the cached source, losing its tail
                    None => return Err(w),
                },
            },
        };

        if Some(dst) == source {
            self.ctx.truncate(dst as i32, reuse as i32);
        } else if let Some(src) = source {
            self.ctx.fork_prefix(src as i32, dst as i32, reuse as i32);
            self.stats.forks += 1;
        } else {
            self.ctx.truncate(dst as i32, 0);
        }
        self.stats.reused_tokens += reuse as u64;
        self.tick += 1;
        let slot = &mut self.slots[dst];
        slot.tokens.clear();
        slot.tokens.extend_from_slice(&target[..reuse]);
        slot.version = self.version;
        slot.cached = false;
        slot.last_used = self.tick;
        let pending = target[reuse..].to_vec();
        slot.running = Some(Box::new(Running { w, pending, admitted_at: self.tick, followers: Vec::new() }));
        Ok(())
    }

    /// The least recently used cached slot other than `keep`.
    fn lru_cached(&self, keep: Option<usize>) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, s)| s.cached && Some(*i) != keep)
            .min_by_key(|(_, s)| s.last_used)
            .map(|(i, _)| i)
    }

    /// A slot for new work: a free one, else the least recently used cached one (not `keep`).
    fn free_slot(&mut self, keep: Option<usize>) -> Option<usize> {
        if let Some(i) = self.slots.iter().position(|s| s.running.is_none() && !s.cached) {
            return Some(i);
        }
        let lru = self.lru_cached(keep)?;
        self.evict(lru);
        Some(lru)
    }

    fn evict(&mut self, slot: usize) {
        self.ctx.truncate(slot as i32, 0);
        let s = &mut self.slots[slot];
        s.tokens.clear();
        s.cached = false;
        self.stats.evictions += 1;
    }

    fn evict_lru_cached(&mut self) -> bool {
        let lru = self.lru_cached(None);
        lru.inspect(|&i| self.evict(i)).is_some()
    }

    // ---- one decode step ------------------------------------------------------------------

    fn step(&mut self) {
        let (outputs, fed) = self.fill_batch();
        if self.batch.is_empty() {
            return;
        }
        let t0 = Instant::now();
        loop {
            match self.ctx.decode(&self.batch) {
                Ok(()) => break,
                Err(DecodeError::NoKvSlot) => {
                    if self.evict_lru_cached() {
                        continue;
                    }
                    // No cached KV left to drop: preempt the newest running sequence, retry next step.
                    self.preempt_newest();
                    return;
                }
                Err(e) => {
                    let reason = match e {
                        DecodeError::Failed(code, msg) => Error::Decode { code, reason: msg },
                        DecodeError::Aborted => Error::Decode { code: 2, reason: "aborted".into() },
                        DecodeError::NoKvSlot => unreachable!(),
                    };
                    self.fail_all(reason);
                    return;
                }
            }
        }
        self.stats.decode_calls += 1;
        self.stats.decode_seconds += t0.elapsed().as_secs_f64();
        // The batch is in the KV now: move the fed tokens from `pending` to the slot's tokens.
        for (slot, take) in fed {
            let s = &mut self.slots[slot];
            let r = s.running.as_mut().expect("running");
            if take > 1 || r.w.generated.is_empty() {
                self.stats.prefill_tokens += take as u64;
            }
            s.tokens.extend(r.pending.drain(..take));
        }
        self.consume(outputs);
    }

    /// Fills the batch: one token for each decoding sequence first, then prefill chunks.
    /// Returns the outputs to read back and how many pending tokens of each slot were fed; nothing
    /// is committed until the decode succeeds (a failed decode leaves the KV unchanged).
    fn fill_batch(&mut self) -> (Vec<Output>, Vec<(usize, usize)>) {
        self.attach_graph_samplers();
        self.batch.clear();
        let mut outputs = Vec::new();
        let mut fed = Vec::new();
        let mut order: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].running.is_some()).collect();
        // Decoding sequences (one pending token) first, then prefills, oldest admission first.
        order.sort_by_key(|&i| {
            let r = self.slots[i].running.as_ref().expect("running");
            (r.pending.len() > 1, r.admitted_at)
        });
        for i in order {
            let slot = &self.slots[i];
            let r = slot.running.as_ref().expect("running");
            let room = self.batch.remaining();
            if room == 0 {
                break;
            }
            let take = r.pending.len().min(room);
            let pos0 = slot.tokens.len();
            for (k, &tok) in r.pending[..take].iter().enumerate() {
                let last = k + 1 == r.pending.len();
                let out = self.batch.push(tok, (pos0 + k) as i32, i as i32, last).expect("room checked");
                if let Some(index) = out {
                    outputs.push(Output { slot: i, index });
                }
            }
            if take > 0 {
                fed.push((i, take));
            }
        }
        (outputs, fed)
    }

    /// Reads logits, samples, records log-probs, checks stop conditions.
    fn consume(&mut self, outputs: Vec<Output>) {
        // A. Followers share their leader's context: give each a slot holding a fork of the
        //    leader's KV (memory operations leave the logits of this batch untouched).
        let mut groups: Vec<(i32, Vec<usize>)> = Vec::with_capacity(outputs.len());
        for out in outputs {
            let followers = std::mem::take(&mut self.slots[out.slot].running.as_mut().expect("running").followers);
            let mut members = vec![out.slot];
            for mut f in followers {
                let Some(dst) = self.free_slot(None) else {
                    f.follows = None;
                    self.queue.push_front(Pending::Seq(f));
                    continue;
                };
                let tokens = self.slots[out.slot].tokens.clone();
                self.ctx.fork_prefix(out.slot as i32, dst as i32, tokens.len() as i32);
                self.stats.forks += 1;
                self.stats.reused_tokens += tokens.len() as u64;
                self.tick += 1;
                let s = &mut self.slots[dst];
                s.tokens = tokens;
                s.version = self.version;
                s.cached = false;
                s.last_used = self.tick;
                s.running = Some(Box::new(Running {
                    w: f,
                    pending: Vec::new(),
                    admitted_at: self.tick,
                    followers: Vec::new(),
                }));
                members.push(dst);
            }
            groups.push((out.index, members));
        }
        // B. One pass over each logit row: max, log-sum-exp; then each member samples.
        let mut sampled: Vec<(usize, Token, f32)> = Vec::new();
        let mut broken = Vec::new();
        let mut unsampled = Vec::new();
        for (index, members) in groups {
            if self.ctx.is_graph_output(index) {
                // Graph samplers are attached only to sequences without followers.
                let slot = members[0];
                match self.ctx.graph_sampled(index) {
                    Some((token, logprob)) if logprob.is_finite() => {
                        self.stats.graph_sampled_tokens += 1;
                        sampled.push((slot, token, logprob));
                    }
                    Some(_) => broken.push(slot),
                    None => unsampled.push(slot),
                }
                continue;
            }
            let logits = self.ctx.logits(index).expect("logits were requested for this token");
            let temperature = self.slots[members[0]].running.as_ref().expect("running").w.job.sampling.temperature;
            let stats = row_stats(logits, temperature);
            if !(stats.max.is_finite() && stats.log_sum_exp.is_finite()) {
                broken.extend(members);
                continue;
            }
            for slot in members {
                let w = &mut self.slots[slot].running.as_mut().expect("running").w;
                let (token, logprob) = sample(w, logits, &stats, &mut self.scratch);
                sampled.push((slot, token, logprob));
            }
        }
        // C. Record the tokens and apply stop conditions.
        for (slot, token, logprob) in sampled {
            self.accept(slot, token, logprob);
        }
        for slot in broken {
            let why = "the model produced non-finite logits (NaN or infinity): its weights or adapter are broken";
            self.fail_slot(slot, Error::Decode { code: -2, reason: why.into() });
        }
        for slot in unsampled {
            let why = "llama.cpp returned no token or log-prob from this sequence's in-graph sampler (sampling = \"host\" avoids the graph)";
            self.fail_slot(slot, Error::Decode { code: -3, reason: why.into() });
        }
    }

    /// Gives every decoding sequence that has none a graph sampler (its host chain's stages and
    /// state), so its next token is drawn inside the decode graph. Prefilling sequences, leaders
    /// whose followers share their first logits, and first tokens stay on the host.
    fn attach_graph_samplers(&mut self) {
        if !self.graph_sampling {
            return;
        }
        for i in 0..self.slots.len() {
            let Some(r) = self.slots[i].running.as_mut() else { continue };
            let w = &mut r.w;
            if w.host_only || w.generated.is_empty() || r.pending.len() != 1 || !r.followers.is_empty() {
                continue;
            }
            if self.ctx.has_sampler(i as i32) {
                continue;
            }
            let g = match &w.sampler {
                None => GraphSampler::greedy(),
                Some(host) => GraphSampler::wrapping(host, w.job.sampling.temperature),
            };
            if self.ctx.attach_sampler(i as i32, g).is_err() {
                tracing::warn!("the backend cannot run this sampler chain in the graph; sampling on the host");
                w.host_only = true;
            }
        }
    }

    /// Takes the sequence out of `slot`, detaching its graph sampler and handing the sampler's
    /// state back to the sequence's host chain (a preempted sequence resumes where it was).
    fn take_running(&mut self, slot: usize) -> Option<Box<Running>> {
        let mut r = self.slots[slot].running.take();
        if let Some(g) = self.ctx.detach_sampler(slot as i32) {
            if let Some(r) = r.as_mut().filter(|r| r.w.sampler.is_some()) {
                r.w.sampler = Some(g.to_host());
            }
        }
        r
    }

    /// Appends a sampled token to the sequence in `slot` and finishes it when a stop condition holds.
    fn accept(&mut self, slot: usize, token: Token, logprob: f32) {
        self.stats.generated_tokens += 1;
        let model = self.model.clone();
        let capacity = self.seq_capacity;
        let s = &mut self.slots[slot];
        s.last_used = self.tick;
        let r = s.running.as_mut().expect("running");
        let w = &mut r.w;
        w.generated.push(token);
        w.logprobs.push(logprob);
        let piece = model.piece(token);
        let before = w.text.len();
        w.text.extend_from_slice(piece);
        if w.job.stream {
            let _ = w.job.events.send(Event::Token { request: w.job.id, index: w.index, token, logprob });
        }
        let sp = &w.job.sampling;
        let finish = if model.is_eog(token) && !sp.ignore_eog {
            Some(FinishReason::Eog)
        } else if let Some(stop) = sp.stop.iter().find(|stop| {
            let from = before.saturating_sub(stop.len() - 1);
            w.text[from..].windows(stop.len()).any(|win| win == stop.as_bytes())
        }) {
            Some(FinishReason::Stop(stop.clone()))
        } else if w.generated.len() >= sp.max_tokens {
            Some(FinishReason::Length)
        } else if s.tokens.len() + 1 > capacity {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
        match finish {
            Some(reason) => self.finish_slot(slot, reason),
            None => r.pending = vec![token],
        }
    }

    fn finish_slot(&mut self, slot: usize, reason: FinishReason) {
        let Some(r) = self.take_running(slot) else { return };
        let r = *r;
        for f in r.followers {
            if reason == FinishReason::Cancelled {
                self.finish_waiting(f, FinishReason::Cancelled);
            } else {
                // The leader stopped before its first logits (cannot happen) — requeue safely.
                self.queue.push_front(Pending::Seq(Waiting { follows: None, ..f }));
            }
        }
        let s = &mut self.slots[slot];
        s.cached = true;
        self.kv_blocked = false;
        self.finish_waiting(r.w, reason);
        self.enforce_cache_budget();
    }

    fn enforce_cache_budget(&mut self) {
        loop {
            let held: usize = self.slots.iter().filter(|s| s.cached).map(|s| s.tokens.len()).sum();
            if held <= self.max_cached_tokens || !self.evict_lru_cached() {
                return;
            }
        }
    }

    fn finish_waiting(&mut self, w: Waiting, reason: FinishReason) {
        let job = &w.job;
        let steps = segment(&w.generated.iter().map(|&t| self.model.piece(t)).collect::<Vec<_>>(), &job.steps);
        let t = Trajectory {
            id: self.next_traj,
            request: job.id,
            index: w.index,
            context: job.context.clone(),
            prompt_len: job.prompt_len,
            text: String::from_utf8_lossy(&w.text).into_owned(),
            tokens: w.generated,
            logprobs: w.logprobs,
            steps,
            adapter_version: self.version,
            temperature: job.sampling.temperature,
            finish: reason,
            origin: job.origin,
        };
        self.next_traj += 1;
        self.stats.finished_sequences += 1;
        let _ = job.events.send(Event::Finished(t));
    }

    /// Frees the KV of the most recently admitted running sequence; it waits again with its
    /// progress and sampler state and is recomputed when room returns.
    fn preempt_newest(&mut self) {
        let newest = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.running.as_ref().map(|r| (i, r.admitted_at)))
            .max_by_key(|&(_, t)| t)
            .map(|(i, _)| i);
        let Some(slot) = newest else { return };
        if self.running() == 1 {
            // Alone and still out of room: the context is simply full.
            self.finish_slot(slot, FinishReason::ContextFull);
            return;
        }
        let r = *self.take_running(slot).expect("running");
        self.ctx.truncate(slot as i32, 0);
        self.slots[slot].tokens.clear();
        self.stats.preemptions += 1;
        self.kv_blocked = true;
        for f in r.followers.into_iter().rev() {
            self.queue.push_front(Pending::Seq(Waiting { follows: None, ..f }));
        }
        self.queue.push_front(Pending::Seq(r.w));
    }

    fn fail_all(&mut self, e: Error) {
        let msg = e.to_string();
        tracing::error!("decode failed, failing running requests: {msg}");
        for slot in 0..self.slots.len() {
            self.fail_slot(slot, Error::Decode { code: -1, reason: msg.clone() });
        }
    }

    /// Fails the request running in `slot` (and drops its queued sequences).
    fn fail_slot(&mut self, slot: usize, e: Error) {
        if let Some(r) = self.take_running(slot) {
            r.w.job.cancelled.store(true, Ordering::Relaxed);
            let _ = r.w.job.events.send(Event::Failed(e));
            self.ctx.truncate(slot as i32, 0);
            self.slots[slot].tokens.clear();
        }
    }
}

/// Samples the next token of `w` from `logits`; returns it with its log-prob.
fn sample(
    w: &mut Waiting,
    logits: &[f32],
    stats: &super::logprob::RowStats,
    scratch: &mut Vec<crate::llama::sys::llama_token_data>,
) -> (Token, f32) {
    let token = match w.sampler.as_mut() {
        None => stats.argmax as Token,
        Some(chain) => chain.sample_row(logits, scratch),
    };
    (token, stats.logprob(logits, token as usize))
}
