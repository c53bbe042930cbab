//! The output head's log-probabilities of chosen tokens as one graph node.
//!
//! `log softmax(softcap(h·Wᵀ)/T)[target]` over a 49k-token vocabulary is the largest tensor of
//! a training step: 4 × 256 positions make 50M logits (200 MB in f32). Built from candle's ops,
//! its forward makes six passes over them (max, shift, exp, sum, log, gather), each into a fresh
//! zero-filled buffer, and its backward as many again. [`head_logprobs`] instead runs `chunk`
//! positions at a time through one reused buffer: one gemm, then one pass for the row maxima and
//! one for `Σ exp`, keeping only each row's log-sum-exp. The backward recomputes a chunk's
//! logits, turns them into `dL/dlogits = g·(onehot − p)·dz/dl` in place and multiplies by W:
//! frozen W gets no gradient, so nothing of size vocab outlives a chunk.
//!
//! The CPU kernels cover f32 and f64; other devices and dtypes run the same maths as tensor
//! ops (GPU), recomputed in the backward.

use super::ops::{checkpoint, cpu_elems, frozen_linear, gemm_into, log_softmax_last, par_rows, GradSink, Real};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use std::sync::Mutex;

type CResult<T> = candle_core::Result<T>;

/// `log π(targets[i] | h[i])` for the rows of `h` (n × d) under the frozen output matrix `w`
/// (vocab × d): logits `l = h·Wᵀ`, optionally soft-capped (`c·tanh(l/c)` when `softcap > 0`),
/// scaled by `inv_t`, log-softmax over the vocabulary, the target's entry. One node whose
/// backward returns the gradient of `h` only. `chunk` bounds the rows whose logits exist at
/// once (at least 1).
pub fn head_logprobs(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    inv_t: f64,
    softcap: f64,
    chunk: usize,
) -> CResult<Tensor> {
    let (n, d) = h.dims2()?;
    let (vocab, wd) = w.dims2()?;
    if wd != d || targets.len() != n {
        candle_core::bail!("head: h {n}×{d}, W {vocab}×{wd} and {} targets do not match", targets.len());
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("head: target {bad} outside the vocabulary of {vocab}");
    }
    let cpu_kernel = h.device().is_cpu() && matches!(h.dtype(), DType::F32 | DType::F64);
    if !cpu_kernel {
        // Tensor ops, the logits recomputed in the backward pass.
        let tg = Tensor::from_slice(targets, n, h.device())?;
        let w = w.clone();
        let f = move |h: &Tensor| tensor_head(h, &w, &tg, inv_t, softcap);
        return if h.track_op() { checkpoint(h, vec![], &GradSink::default(), f) } else { f(h) };
    }
    let h = h.contiguous()?;
    let op = HeadLogprobs {
        h: h.detach(),
        w: w.contiguous()?,
        targets: targets.to_vec(),
        inv_t,
        softcap,
        chunk: chunk.max(1),
        lse: Mutex::new(Vec::new()),
    };
    h.apply_op1(op)
}

/// The head from candle's ops: the reference of the CPU kernels and the GPU path.
pub fn tensor_head(h: &Tensor, w: &Tensor, targets: &Tensor, inv_t: f64, softcap: f64) -> CResult<Tensor> {
    logprobs_of_logits(frozen_linear(h, w)?, targets, inv_t, softcap)
}

/// Log-probs of `targets` from raw logits (n × vocab) by candle's ops: soft-cap, scale,
/// log-softmax, the target's entry.
pub fn logprobs_of_logits(mut logits: Tensor, targets: &Tensor, inv_t: f64, softcap: f64) -> CResult<Tensor> {
    if softcap > 0.0 {
        logits = ((logits / softcap)?.tanh()? * softcap)?;
    }
    log_softmax_last(&(logits * inv_t)?)?.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)
}

struct HeadLogprobs {
    h: Tensor,
    w: Tensor,
    targets: Vec<u32>,
    inv_t: f64,
    softcap: f64,
    chunk: usize,
    /// Each row's log-sum-exp of the scaled logits, from the forward, for the backward.
    lse: Mutex<Vec<f64>>,
}

impl HeadLogprobs {
    /// Logits of rows `r0..r0 + rows` into `buf`, then soft-capped and scaled in place.
    fn scaled_logits<T: Real>(&self, h: &[T], w: &[T], r0: usize, rows: usize, buf: &mut [T]) {
        let d = self.h.dims()[1];
        let vocab = self.w.dims()[0];
        gemm_into(buf, rows, vocab, d, &h[r0 * d..(r0 + rows) * d], w, 1, d);
        if self.softcap <= 0.0 && self.inv_t == 1.0 {
            return;
        }
        let (inv_t, cap) = (T::from_f64(self.inv_t), T::from_f64(self.softcap));
        par_rows::<_, ()>(&mut buf[..rows * vocab], vocab, |_, b| {
            if self.softcap > 0.0 {
                b.iter_mut().for_each(|z| *z = (*z / cap).tanh() * cap * inv_t);
            } else {
                b.iter_mut().for_each(|z| *z *= inv_t);
            }
            Vec::new()
        });
    }

    fn cpu_forward<T: Real>(&self) -> CResult<Vec<T>> {
        let (n, d) = self.h.dims2()?;
        let vocab = self.w.dims()[0];
        let ((hs, hl), (ws, wl)) = (self.h.storage_and_layout(), self.w.storage_and_layout());
        let h = cpu_elems::<T>(&hs, hl, n * d, "head")?;
        let w = cpu_elems::<T>(&ws, wl, vocab * d, "head")?;
        let chunk = self.chunk.min(n);
        let mut buf = vec![T::from_f64(0.0); chunk * vocab];
        let mut lse = vec![0.0f64; n];
        let mut out = vec![0.0f64; n];
        for r0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - r0);
            self.scaled_logits(h, w, r0, rows, &mut buf);
            let lse_rows = par_rows(&mut buf[..rows * vocab], vocab, |_, b| {
                b.chunks_exact(vocab)
                    .map(|row| {
                        let max = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z.to_f64()));
                        let m = T::from_f64(max);
                        let sum: f64 = row.iter().map(|&z| (z - m).exp().to_f64()).sum();
                        max + sum.ln()
                    })
                    .collect()
            });
            lse[r0..r0 + rows].copy_from_slice(&lse_rows);
            for r in r0..r0 + rows {
                let z = buf[(r - r0) * vocab + self.targets[r] as usize].to_f64();
                out[r] = z - lse[r];
            }
        }
        *self.lse.lock().expect("head lse poisoned") = lse;
        Ok(out.into_iter().map(T::from_f64).collect())
    }

    fn cpu_backward<T: Real>(&self, g: &Tensor) -> CResult<Tensor> {
        let (n, d) = self.h.dims2()?;
        let vocab = self.w.dims()[0];
        let g = g.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let lse = self.lse.lock().expect("head lse poisoned").clone();
        if lse.len() != n {
            candle_core::bail!("head: backward without a forward");
        }
        let ((hs, hl), (ws, wl)) = (self.h.storage_and_layout(), self.w.storage_and_layout());
        let h = cpu_elems::<T>(&hs, hl, n * d, "head")?;
        let w = cpu_elems::<T>(&ws, wl, vocab * d, "head")?;
        let chunk = self.chunk.min(n);
        let mut buf = vec![T::from_f64(0.0); chunk * vocab];
        let mut dh = vec![T::from_f64(0.0); n * d];
        let (inv_t, cap) = (T::from_f64(self.inv_t), T::from_f64(self.softcap));
        let one = T::from_f64(1.0);
        for r0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - r0);
            // Raw logits (before cap and scale): the cap's derivative needs them.
            gemm_into(&mut buf, rows, vocab, d, &h[r0 * d..(r0 + rows) * d], w, 1, d);
            par_rows::<_, ()>(&mut buf[..rows * vocab], vocab, |first, b| {
                for (i, row) in b.chunks_exact_mut(vocab).enumerate() {
                    let r = r0 + first + i;
                    let (gr, lse) = (T::from_f64(g[r]), T::from_f64(lse[r]));
                    let t = self.targets[r] as usize;
                    let l_t = row[t];
                    // dL/dl_j = g·(onehot_j − p_j)·dz/dl_j with z = cap(l)·inv_t
                    for l in row.iter_mut() {
                        let (z, dz) = if self.softcap > 0.0 {
                            let t = (*l / cap).tanh();
                            (t * cap * inv_t, (one - t * t) * inv_t)
                        } else {
                            (*l * inv_t, inv_t)
                        };
                        *l = T::from_f64(0.0) - gr * (z - lse).exp() * dz;
                    }
                    let dz = if self.softcap > 0.0 {
                        let th = (l_t / cap).tanh();
                        (one - th * th) * inv_t
                    } else {
                        inv_t
                    };
                    row[t] += gr * dz;
                }
                Vec::new()
            });
            gemm_into(&mut dh[r0 * d..(r0 + rows) * d], rows, d, vocab, &buf[..rows * vocab], w, d, 1);
        }
        Tensor::from_vec(dh, (n, d), self.h.device())
    }
}

impl CustomOp1 for HeadLogprobs {
    fn name(&self) -> &'static str {
        "head-logprobs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        super::profile::time("head-logprobs", super::profile::Pass::Forward, || {
            let n = l.dims()[0];
            let out = match s {
                CpuStorage::F32(_) => CpuStorage::F32(self.cpu_forward::<f32>()?),
                CpuStorage::F64(_) => CpuStorage::F64(self.cpu_forward::<f64>()?),
                _ => candle_core::bail!("head: the CPU kernel takes f32 or f64"),
            };
            Ok((out, Shape::from(n)))
        })
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        super::profile::time("head-logprobs", super::profile::Pass::Backward, || {
            let dh = match self.h.dtype() {
                DType::F32 => self.cpu_backward::<f32>(grad)?,
                _ => self.cpu_backward::<f64>(grad)?,
            };
            Ok(Some(dh))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic values in about [-scale, scale].
    fn fill(n: usize, seed: u64, scale: f64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Values and `dh` of Σ c_i·lp_i from the kernel and from candle's ops; returns the largest
    /// differences relative to the largest entry of each reference.
    fn compare(dtype: DType, softcap: f64, inv_t: f64, chunk: usize) -> (f64, f64) {
        let (n, d, vocab) = (7, 5, 37);
        let dev = Device::Cpu;
        let mk = |v: Vec<f64>, shape: &[usize]| Tensor::from_vec(v, shape, &dev).unwrap().to_dtype(dtype).unwrap();
        let w = mk(fill(vocab * d, 1, 2.0), &[vocab, d]);
        let h0 = mk(fill(n * d, 2, 1.5), &[n, d]);
        let c = mk(fill(n, 3, 1.0), &[n]);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 11 + 3) % vocab as u32).collect();
        let run = |fused: bool| {
            let h = Var::from_tensor(&h0).unwrap();
            let lp = if fused {
                head_logprobs(h.as_tensor(), &w, &targets, inv_t, softcap, chunk).unwrap()
            } else {
                let tg = Tensor::from_slice(&targets, n, &dev).unwrap();
                tensor_head(h.as_tensor(), &w, &tg, inv_t, softcap).unwrap()
            };
            let g = (&lp * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let dh = g.get(h.as_tensor()).expect("h gets a gradient").clone();
            let f = |t: Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            (f(lp), f(dh))
        };
        let ((lp, dh), (lp_ref, dh_ref)) = (run(true), run(false));
        let rel = |a: &[f64], b: &[f64]| {
            let top = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / top
        };
        assert!(lp.iter().all(|&v| v < 0.0), "log-probs are negative: {lp:?}");
        (rel(&lp, &lp_ref), rel(&dh, &dh_ref))
    }

    #[test]
    fn head_kernel_equals_the_tensor_ops_in_values_and_gradients() {
        for (softcap, inv_t) in [(0.0, 1.0), (0.0, 1.0 / 0.7), (3.0, 1.0), (3.0, 1.3)] {
            // One row per chunk, chunks with a remainder, all rows at once.
            for chunk in [1, 3, 64] {
                let (v, g) = compare(DType::F64, softcap, inv_t, chunk);
                assert!(v < 1e-13 && g < 1e-12, "f64 cap {softcap} 1/T {inv_t} chunk {chunk}: {v:e} {g:e}");
                let (v, g) = compare(DType::F32, softcap, inv_t, chunk);
                assert!(v < 1e-6 && g < 1e-5, "f32 cap {softcap} 1/T {inv_t} chunk {chunk}: {v:e} {g:e}");
            }
        }
    }

    #[test]
    fn head_rejects_mismatched_shapes_and_targets() {
        let dev = Device::Cpu;
        let h = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((5, 3), DType::F32, &dev).unwrap();
        let bad_width = Tensor::zeros((5, 4), DType::F32, &dev).unwrap();
        assert!(head_logprobs(&h, &bad_width, &[0, 1], 1.0, 0.0, 8).unwrap_err().to_string().contains("do not match"));
        assert!(head_logprobs(&h, &w, &[0], 1.0, 0.0, 8).unwrap_err().to_string().contains("do not match"));
        assert!(head_logprobs(&h, &w, &[0, 5], 1.0, 0.0, 8)
            .unwrap_err()
            .to_string()
            .contains("outside the vocabulary"));
        // Uniform logits: every token has log-probability −ln 5.
        let lp = head_logprobs(&h, &w, &[0, 4], 1.0, 0.0, 1).unwrap().to_vec1::<f32>().unwrap();
        assert!(lp.iter().all(|v| (v + 5f32.ln()).abs() < 1e-6), "{lp:?}");
    }
}
