//! Differentiable building blocks of the training forward.
//!
//! candle's fused `rms_norm`, `softmax_last_dim`, `rope*` and `QMatMul` record no backward (LoRA
//! tensors upstream of them silently get no gradient), and its matmul backward always computes the
//! weight gradient, frozen weights included. So the forward uses only:
//! - [`FrozenLinear`]: `x·Wᵀ` through the backend's own matmul, backward `dX = dY·W` only;
//! - [`checkpoint`]: runs a block without keeping its activations and recomputes it in the
//!   backward pass (activation recomputation); parameter gradients found there go to a
//!   [`GradSink`];
//! - [`rms_norm_fused`], [`rope_fused`], [`attention`]: norms, RoPE and masked attention as
//!   single graph nodes with analytic backwards (their forwards run the plain ops, so values are
//!   bit-identical). candle's backward allocates and accumulates a gradient for every node, so
//!   collapsing each into one node halves the kept activations and the backward's element-wise
//!   work;
//!   On the CPU, attention runs as units of (sequence, head) on one thread each, gemm reading
//!   q, k and v rows in place ([`gemm_strided`], [`par_units`]), softmax one pass per row; the
//!   LoRA projection's backward is gemms into its own buffers;
//! - plain differentiable tensor ops for norms, RoPE, softmax, log-softmax (the references of
//!   the fused ops, and the plain-autograd baseline).
//!
//! The output head's log-probabilities are one node too, in [`super::head`].

use super::profile::{self, Pass};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, TensorId, Var, D};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type CResult<T> = candle_core::Result<T>;

/// `y = x·Wᵀ` for a frozen `W` (out × in): the backward returns only the input gradient.
pub struct FrozenLinear {
    w: Tensor,
}

impl FrozenLinear {
    /// Wraps a frozen weight (out × in, contiguous).
    pub fn new(w: Tensor) -> FrozenLinear {
        FrozenLinear { w }
    }

    fn bmnk(&self, l: &Layout) -> CResult<(usize, usize, usize, usize)> {
        let (n, k) = self.w.dims2()?;
        let dims = l.dims();
        let last = *dims.last().ok_or_else(|| candle_core::Error::Msg("frozen-linear on a scalar".into()))?;
        if last != k {
            candle_core::bail!("frozen-linear: input width {last} but weight is {n}×{k}");
        }
        Ok((1, l.shape().elem_count() / k, n, k))
    }

    fn layouts(&self, l: &Layout, bmnk: (usize, usize, usize, usize)) -> CResult<(Layout, Layout)> {
        if !l.is_contiguous() {
            candle_core::bail!("frozen-linear needs a contiguous input");
        }
        let (_, m, n, k) = bmnk;
        let x = Layout::contiguous_with_offset((1, m, k), l.start_offset());
        let (_, wl) = self.w.storage_and_layout();
        // Wᵀ as a (1, k, n) view of the (n, k) weight.
        let wt = Layout::new(Shape::from((1, k, n)), vec![n * k, 1, k], wl.start_offset());
        Ok((x, wt))
    }

    fn out_shape(&self, l: &Layout) -> Shape {
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("rank ≥ 1") = self.w.dims()[0];
        Shape::from(dims)
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        profile::time("frozen-linear", Pass::Forward, || {
            let bmnk = self.bmnk(l)?;
            let (xl, wtl) = self.layouts(l, bmnk)?;
            let (ws, _) = self.w.storage_and_layout();
            let Storage::Cpu(ws) = &*ws else { candle_core::bail!("frozen-linear: weight not on the CPU") };
            Ok((s.matmul(ws, bmnk, &xl, &wtl)?, self.out_shape(l)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        let bmnk = self.bmnk(l)?;
        let (xl, wtl) = self.layouts(l, bmnk)?;
        let (ws, _) = self.w.storage_and_layout();
        let Storage::Cuda(ws) = &*ws else { candle_core::bail!("frozen-linear: weight not on the GPU") };
        Ok((s.matmul(ws, bmnk, &xl, &wtl)?, self.out_shape(l)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        profile::time("frozen-linear", Pass::Backward, || {
            let (n, _) = self.w.dims2()?;
            let g = grad.reshape(((), n))?.matmul(&self.w)?;
            Ok(Some(g.reshape(arg.shape())?))
        })
    }
}

/// `x·Wᵀ` with a frozen W.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    x.contiguous()?.apply_op1(FrozenLinear::new(w.clone()))
}

/// `y = x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ` — a frozen projection with its LoRA update — as one
/// node over the inputs (x, A, B). The plain graph has seven nodes per projection (the frozen
/// matmul, two transposes, two matmuls, the scale and the sum), and candle's backward allocates,
/// zero-fills and accumulates a gradient for each; this node's backward computes only
/// `dX = dY·W + scale·(dY·B)·A`, `dA = scale·(dY·B)ᵀ·X` and `dB = scale·dYᵀ·(X·Aᵀ)`. The
/// forward runs the plain ops in the plain order (bit-identical values). `x` is (rows, in),
/// `w` (out, in), `a` (r, in), `b` (out, r).
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> CResult<Tensor> {
    let x = x.contiguous()?;
    let (rows, n_in) = x.dims2()?;
    let (n_out, k) = w.dims2()?;
    let (r, a_in) = a.dims2()?;
    let (b_out, b_r) = b.dims2()?;
    if k != n_in || a_in != n_in || b_out != n_out || b_r != r {
        candle_core::bail!("lora-linear: x {rows}×{n_in}, W {n_out}×{k}, A {r}×{a_in}, B {b_out}×{b_r} do not chain");
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let op = LoraLinear { x: x.detach(), w: w.clone(), bias: bias.cloned(), a: a.detach(), b: b.detach(), scale };
    x.apply_op3(&a, &b, op)
}

struct LoraLinear {
    x: Tensor,
    w: Tensor,
    bias: Option<Tensor>,
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl LoraLinear {
    fn forward(&self) -> CResult<Tensor> {
        let mut y = frozen_linear(&self.x, &self.w)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let delta = self.x.matmul(&self.a.t()?)?.matmul(&self.b.t()?)?;
        y + (delta * self.scale)?
    }

    /// The CPU forward without intermediate tensors: the three matmuls the plain graph runs
    /// (gemm, as candle's matmul does them), then bias
    /// and `scale·(x·Aᵀ)·Bᵀ` added into x·Wᵀ in place, in the plain graph's order.
    fn cpu_forward<T: Real>(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let ((m, k), (r, _), (n, _)) = (xl.shape().dims2()?, al.shape().dims2()?, bl.shape().dims2()?);
        if !(xl.is_contiguous() && al.is_contiguous() && bl.is_contiguous()) {
            candle_core::bail!("lora-linear needs contiguous inputs");
        }
        let (x, a, b) = (cpu_slice::<T>(xs, xl, m * k)?, cpu_slice::<T>(a, al, r * k)?, cpu_slice::<T>(b, bl, n * r)?);
        let (ws, wl) = self.w.storage_and_layout();
        let w = cpu_elems::<T>(&ws, wl, n * k, "lora-linear weight")?;
        let threads = candle_core::utils::get_num_threads();
        let (zero, one) = (T::from_f64(0.0), T::from_f64(1.0));
        let mut y = vec![zero; m * n];
        gemm_strided(&mut y, n, m, n, k, (x, k, 1), (w, 1, k), false, one, threads);
        let mut u = vec![zero; m * r];
        gemm_strided(&mut u, r, m, r, k, (x, k, 1), (a, 1, k), false, one, threads);
        let mut d = vec![zero; m * n];
        gemm_strided(&mut d, n, m, n, r, (&u, r, 1), (b, 1, r), false, one, threads);
        let d = &d[..];
        let mul = T::from_f64(self.scale);
        let guard = self.bias.as_ref().map(|t| t.storage_and_layout());
        let bias = match &guard {
            Some((s, l)) => Some(cpu_elems::<T>(s, l, n, "lora-linear bias")?),
            None => None,
        };
        par_rows::<_, ()>(&mut y, n, |first, rows| {
            for (yr, dr) in rows.chunks_exact_mut(n).zip(d[first * n..].chunks_exact(n)) {
                match bias {
                    Some(bias) => {
                        yr.iter_mut().zip(dr).zip(bias).for_each(|((y, &d), &c)| *y = (*y + c) + (d * mul + zero))
                    }
                    None => yr.iter_mut().zip(dr).for_each(|(y, &d)| *y += d * mul + zero),
                }
            }
            Vec::new()
        });
        Ok((T::to_cpu_storage_owned(y), Shape::from((m, n))))
    }
}

impl LoraLinear {
    /// The backward on the CPU, every product by gemm into its own buffer on candle's thread
    /// count, scales folded into the gemms and `dX = dY·W + (scale·dY·B)·A` accumulated in
    /// place: no candle temporaries, transposes or element-wise passes.
    fn cpu_backward<T: Real>(&self, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let ((m, k), (r, _), (n, _)) = (self.x.dims2()?, self.a.dims2()?, self.b.dims2()?);
        let ((xs, xl), (ws, wl), (as_, al), (bs, bl), (gs, gl)) = (
            self.x.storage_and_layout(),
            self.w.storage_and_layout(),
            self.a.storage_and_layout(),
            self.b.storage_and_layout(),
            g.storage_and_layout(),
        );
        let x = cpu_elems::<T>(&xs, xl, m * k, "lora-linear backward")?;
        let w = cpu_elems::<T>(&ws, wl, n * k, "lora-linear backward")?;
        let a = cpu_elems::<T>(&as_, al, r * k, "lora-linear backward")?;
        let b = cpu_elems::<T>(&bs, bl, n * r, "lora-linear backward")?;
        let gv = cpu_elems::<T>(&gs, gl, m * n, "lora-linear backward")?;
        let threads = candle_core::utils::get_num_threads();
        let (zero, one, scale) = (T::from_f64(0.0), T::from_f64(1.0), T::from_f64(self.scale));
        // X·Aᵀ (m × r): recomputing it is cheaper than keeping it.
        let mut u = vec![zero; m * r];
        gemm_strided(&mut u, r, m, r, k, (x, k, 1), (a, 1, k), false, one, threads);
        // scale·dY·B (m × r).
        let mut gu = vec![zero; m * r];
        gemm_strided(&mut gu, r, m, r, n, (gv, n, 1), (b, r, 1), false, scale, threads);
        // dB = scale·dYᵀ·U (n × r), dA = GUᵀ·X (r × k).
        let mut db = vec![zero; n * r];
        gemm_strided(&mut db, r, n, r, m, (gv, 1, n), (&u, r, 1), false, scale, threads);
        let mut da = vec![zero; r * k];
        gemm_strided(&mut da, k, r, k, m, (&gu, 1, r), (x, k, 1), false, one, threads);
        // dX = dY·W + GU·A (m × k).
        let mut dx = vec![zero; m * k];
        gemm_strided(&mut dx, k, m, k, n, (gv, n, 1), (w, k, 1), false, one, threads);
        gemm_strided(&mut dx, k, m, k, r, (&gu, r, 1), (a, k, 1), true, one, threads);
        let dev = self.x.device();
        Ok((
            Some(Tensor::from_vec(dx, (m, k), dev)?),
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        profile::time("lora-linear", Pass::Forward, || match xs {
            CpuStorage::F32(_) => self.cpu_forward::<f32>(xs, xl, a, al, b, bl),
            CpuStorage::F64(_) => self.cpu_forward::<f64>(xs, xl, a, al, b, bl),
            _ => cpu_of(output_storage(|| self.forward()), "lora-linear"),
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda_of(output_storage(|| self.forward()), "lora-linear")
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _a: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        profile::time("lora-linear", Pass::Backward, || {
            let g = grad.detach();
            match (g.device().is_cpu(), g.dtype()) {
                (true, DType::F32) => return self.cpu_backward::<f32>(&g),
                (true, DType::F64) => return self.cpu_backward::<f64>(&g),
                _ => {}
            }
            // X·Aᵀ is rows × r: recomputing it is cheaper than keeping it.
            let u = self.x.matmul(&self.a.t()?)?;
            let gu = (g.matmul(&self.b)? * self.scale)?;
            let db = (g.t()?.matmul(&u)? * self.scale)?;
            let da = gu.t()?.matmul(&self.x)?;
            let dx = (g.matmul(&self.w)? + gu.matmul(&self.a)?)?;
            Ok((Some(dx), Some(da), Some(db)))
        })
    }
}

/// The `n` elements of a contiguous CPU storage from its layout's offset, as `T`.
pub(crate) fn cpu_elems<'s, T: candle_core::WithDType>(
    s: &'s Storage,
    l: &Layout,
    n: usize,
    op: &str,
) -> CResult<&'s [T]> {
    match s {
        Storage::Cpu(c) if l.is_contiguous() => cpu_slice(c, l, n),
        _ => candle_core::bail!("{op}: needs contiguous CPU tensors"),
    }
}

/// The `n` elements of a CPU storage from its (contiguous) layout's offset, as `T`.
fn cpu_slice<'s, T: candle_core::WithDType>(c: &'s CpuStorage, l: &Layout, n: usize) -> CResult<&'s [T]> {
    Ok(&T::cpu_storage_as_slice(c)?[l.start_offset()..][..n])
}

/// `dst (rows × cols) = lhs (rows × inner) · rhs`, where `rhs` is given by its strides
/// (row stride, column stride) — gemm into a caller's buffer, on candle's thread count.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into<T: Real>(
    dst: &mut [T],
    rows: usize,
    cols: usize,
    inner: usize,
    lhs: &[T],
    rhs: &[T],
    rhs_rs: usize,
    rhs_cs: usize,
) {
    let threads = candle_core::utils::get_num_threads();
    gemm_strided(
        dst,
        cols,
        rows,
        cols,
        inner,
        (lhs, inner, 1),
        (rhs, rhs_rs, rhs_cs),
        false,
        T::from_f64(1.0),
        threads,
    );
}

/// `dst (+)= beta · lhs · rhs` for a `rows × cols` block of `dst` with row stride `dst_rs`,
/// where each operand is given as (elements, row stride, column stride), so transposed views
/// cost nothing; `accumulate` adds into `dst` instead of overwriting it; `threads` > 1 lets
/// gemm use the rayon pool.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    rows: usize,
    cols: usize,
    inner: usize,
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
    accumulate: bool,
    beta: T,
    threads: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    // The last element a (rows × cols) view with these strides touches, plus one.
    let span = |r: usize, c: usize, rs: usize, cs: usize| (r - 1) * rs + (c - 1) * cs + 1;
    assert!(dst.len() >= span(rows, cols, dst_rs, 1) && cols <= dst_rs.max(1));
    if inner > 0 {
        assert!(lhs.0.len() >= span(rows, inner, lhs.1, lhs.2) && rhs.0.len() >= span(inner, cols, rhs.1, rhs.2));
    }
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above keep every index gemm reads or writes inside the slices; the
    // destination does not alias the operands (a unique borrow).
    unsafe {
        gemm::gemm(
            rows,
            cols,
            inner,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            T::from_f64(1.0),
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

/// Runs `f` on every unit of work, the units dealt round-robin to candle's thread count (one
/// thread each: a unit's gemms run single-threaded, so the cores never wait on each other
/// inside a unit).
pub(crate) fn par_units<U: Send>(units: Vec<U>, f: impl Fn(U) + Sync) {
    let threads = candle_core::utils::get_num_threads().min(units.len()).max(1);
    let mut groups: Vec<Vec<U>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, u) in units.into_iter().enumerate() {
        groups[i % threads].push(u);
    }
    let f = &f;
    std::thread::scope(|sc| {
        for g in groups {
            sc.spawn(move || g.into_iter().for_each(f));
        }
    });
}

/// Runs `f(first_row, rows)` over the rows of `buf` (each `width` wide) in contiguous groups on
/// candle's thread count; returns what the groups return, in row order.
pub(crate) fn par_rows<T: Send, R: Send>(
    buf: &mut [T],
    width: usize,
    f: impl Fn(usize, &mut [T]) -> Vec<R> + Sync,
) -> Vec<R> {
    let rows = buf.len() / width.max(1);
    let threads = candle_core::utils::get_num_threads().min(rows).max(1);
    let group = rows.div_ceil(threads).max(1);
    std::thread::scope(|sc| {
        let workers: Vec<_> = buf[..rows * width]
            .chunks_mut(group * width)
            .enumerate()
            .map(|(i, b)| {
                let f = &f;
                sc.spawn(move || f(i * group, b))
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("row worker panicked")).collect()
    })
}

/// Gradients of parameters found while recomputing checkpointed blocks, summed per parameter.
#[derive(Clone, Default)]
pub struct GradSink {
    inner: Arc<Mutex<HashMap<TensorId, Tensor>>>,
    /// Time the checkpointed blocks feeding this sink spent on recomputation.
    pub recompute: Clock,
}

impl GradSink {
    /// Adds `g` to the gradient of the parameter with id `id`.
    pub fn add(&self, id: TensorId, g: &Tensor) -> CResult<()> {
        let mut m = self.inner.lock().expect("grad sink poisoned");
        let sum = match m.remove(&id) {
            Some(prev) => (prev + g)?,
            None => g.clone(),
        };
        m.insert(id, sum);
        Ok(())
    }

    /// The accumulated gradient of a parameter.
    pub fn get(&self, id: TensorId) -> Option<Tensor> {
        self.inner.lock().expect("grad sink poisoned").get(&id).cloned()
    }

    /// Forgets all gradients.
    pub fn clear(&self) {
        self.inner.lock().expect("grad sink poisoned").clear();
    }
}

/// Accumulated wall time of one phase of a training step (shared, thread-safe; for the profile).
#[derive(Clone, Default)]
pub struct Clock(Arc<std::sync::atomic::AtomicU64>);

impl Clock {
    /// Runs `f`, adding its wall time to the clock.
    pub fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t0 = std::time::Instant::now();
        let r = f();
        self.0.fetch_add(t0.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        r
    }

    /// Seconds counted since the last `take`; resets the clock.
    pub fn take(&self) -> f64 {
        self.0.swap(0, std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
    }
}

type BlockFn = Arc<dyn Fn(&Tensor) -> CResult<Tensor> + Send + Sync>;

struct Checkpoint {
    f: BlockFn,
    input: Tensor,
    params: Vec<Var>,
    sink: GradSink,
}

fn storage_of(t: &Tensor) -> CResult<Storage> {
    let t = t.force_contiguous()?;
    let (s, l) = t.storage_and_layout();
    s.try_clone(l)
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> CResult<(CpuStorage, Shape)> {
        cpu_of(output_storage(|| (self.f)(&self.input)), "checkpoint")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _s: &candle_core::CudaStorage, _l: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda_of(output_storage(|| (self.f)(&self.input)), "checkpoint")
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        // Recompute the block with gradients and pull the incoming gradient through it.
        let x = Var::from_tensor(&self.input)?;
        let y = self.sink.recompute.time(|| (self.f)(x.as_tensor()))?;
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        for p in &self.params {
            if let Some(g) = grads.get(p.as_tensor()) {
                self.sink.add(p.as_tensor().id(), g)?;
            }
        }
        Ok(grads.get(x.as_tensor()).cloned())
    }
}

/// Applies `f` to `x` without keeping `f`'s activations: the backward pass recomputes them.
/// Gradients of `params` used inside `f` are added to `sink`; the returned tensor carries the
/// gradient of `x`. `x` must be part of a graph that leads to a variable (wrap the first input of
/// a model in a `Var`), otherwise candle never calls the backward.
pub fn checkpoint(
    x: &Tensor,
    params: Vec<Var>,
    sink: &GradSink,
    f: impl Fn(&Tensor) -> CResult<Tensor> + Send + Sync + 'static,
) -> CResult<Tensor> {
    let op = Checkpoint { f: Arc::new(f), input: x.detach(), params, sink: sink.clone() };
    x.apply_op1(op)
}

/// The storage and shape of `f()`'s output: how the ops below, which compute their forward with
/// tensor ops on inputs they captured, hand the result back to candle.
fn output_storage(f: impl FnOnce() -> CResult<Tensor>) -> CResult<(Storage, Shape)> {
    let out = f()?;
    Ok((storage_of(&out)?, out.shape().clone()))
}

fn cpu_of(r: CResult<(Storage, Shape)>, name: &str) -> CResult<(CpuStorage, Shape)> {
    match r? {
        (Storage::Cpu(s), shape) => Ok((s, shape)),
        _ => candle_core::bail!("{name}: output left the CPU"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_of(r: CResult<(Storage, Shape)>, name: &str) -> CResult<(candle_core::CudaStorage, Shape)> {
    match r? {
        (Storage::Cuda(s), shape) => Ok((s, shape)),
        _ => candle_core::bail!("{name}: output left the GPU"),
    }
}

type Fwd1 = Box<dyn Fn(&Tensor) -> CResult<Tensor> + Send + Sync>;
type Bwd1 = Box<dyn Fn(&Tensor, &Tensor) -> CResult<Tensor> + Send + Sync>;

/// A one-input op whose forward and backward are given as closures over plain tensor ops: the
/// graph holds one node (and its input) instead of every intermediate of the forward, so the
/// backward allocates and accumulates one gradient instead of one per intermediate.
struct Fused1 {
    name: &'static str,
    input: Tensor,
    fwd: Fwd1,
    /// (input, gradient of the output) → gradient of the input.
    bwd: Bwd1,
}

impl CustomOp1 for Fused1 {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> CResult<(CpuStorage, Shape)> {
        profile::time(self.name, Pass::Forward, || cpu_of(output_storage(|| (self.fwd)(&self.input)), self.name))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _s: &candle_core::CudaStorage, _l: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda_of(output_storage(|| (self.fwd)(&self.input)), self.name)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        profile::time(self.name, Pass::Backward, || Ok(Some((self.bwd)(&self.input, &grad.detach())?)))
    }
}

fn fused1(x: &Tensor, name: &'static str, fwd: Fwd1, bwd: Bwd1) -> CResult<Tensor> {
    x.apply_op1(Fused1 { name, input: x.detach(), fwd, bwd })
}

/// [`rms_norm`] as one node with its analytic input gradient (`w` is frozen):
/// `dx = r·g' − x·r³·mean(x·g')` with `g' = g·w`, `r = (mean(x²) + ε)^-½`. The forward runs the
/// same tensor ops as [`rms_norm`], so values are bit-identical.
pub fn rms_norm_fused(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    let (wf, wb) = (w.clone(), w.clone());
    fused1(
        x,
        "rms-norm",
        Box::new(move |x| rms_norm(x, &wf, eps)),
        Box::new(move |x, g| {
            let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
            let gw = g.broadcast_mul(&wb)?;
            let m = (x * &gw)?.mean_keepdim(D::Minus1)?;
            let r3 = r.powf(3.0)?;
            gw.broadcast_mul(&r)? - x.broadcast_mul(&(m * r3)?)?
        }),
    )
}

/// `silu(g)·u`, the SwiGLU gate of llama and qwen2's MLP, as one node over (g, u): the plain
/// graph keeps silu(g) and accumulates a gradient for both nodes. Backward:
/// `dg = dy·u·σ(g)·(1 + g·(1 − σ(g)))`, `du = dy·silu(g)`. On the CPU (f32/f64, contiguous)
/// forward and backward are one pass each over the elements, split across the cores, with
/// candle's own formula for silu (bit-identical forward in f64; f32 takes [`exp_f32`], within
/// 2 ulp of libm's); elsewhere they run tensor ops.
pub fn swiglu(g: &Tensor, u: &Tensor) -> CResult<Tensor> {
    if g.shape() != u.shape() {
        candle_core::bail!("swiglu: gate {:?} and up {:?} differ in shape", g.dims(), u.dims());
    }
    let (g, u) = (g.contiguous()?, u.contiguous()?);
    g.apply_op2(&u, SwiGlu { g: g.detach(), u: u.detach() })
}

struct SwiGlu {
    g: Tensor,
    u: Tensor,
}

/// The element types the one-pass CPU kernels handle.
pub(crate) trait Real: candle_core::WithDType + Send + Sync {
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
    /// `exp` where the last bits need not match libm's: [`exp_f32`] for f32, `exp` for f64.
    fn exp_fast(self) -> Self;
    /// `row = softmax(row·scale + mask)` in place; entries masked with −∞ become exactly 0.
    /// f64: the tensor ops' arithmetic in their order (bit-identical); f32: vectorised, with
    /// [`exp_f32`] (within 2 ulp) and sums in 8 lanes.
    fn softmax_row(row: &mut [Self], mask: &[Self], scale: Self);
}

impl Real for f32 {
    fn exp(self) -> f32 {
        f32::exp(self)
    }
    fn tanh(self) -> f32 {
        f32::tanh(self)
    }
    fn exp_fast(self) -> f32 {
        exp_f32(self)
    }
    fn softmax_row(row: &mut [f32], mask: &[f32], scale: f32) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { softmax_row_f32_avx2(row, mask, scale) };
        }
        softmax_row_f32(row, mask, scale)
    }
}

/// `exp(x)` for f32 without branches, so loops over it vectorise: Cody–Waite reduction by
/// ln 2 and Cephes' degree-6 polynomial, within 2 ulp of `f32::exp` on [−87, 88] (inputs are
/// clamped to that range: below it the result is ~1e-38 instead of a denormal or 0).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer in the low bits.
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let p =
        ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.5;
    let e = (r * r) * p + r + 1.0;
    let k = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    e * f32::from_bits((k.wrapping_add(127) as u32) << 23)
}

#[inline(always)]
fn softmax_row_f32(row: &mut [f32], mask: &[f32], scale: f32) {
    const L: usize = 8;
    let mask = &mask[..row.len()];
    let split = row.len() / L * L;
    let mut lanes = [f32::NEG_INFINITY; L];
    for (zs, ms) in row[..split].chunks_exact_mut(L).zip(mask.chunks_exact(L)) {
        for l in 0..L {
            let z = zs[l] * scale + ms[l];
            zs[l] = z;
            lanes[l] = if z > lanes[l] { z } else { lanes[l] };
        }
    }
    let mut max = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for (z, &m) in row[split..].iter_mut().zip(&mask[split..]) {
        *z = *z * scale + m;
        max = if *z > max { *z } else { max };
    }
    let mut sums = [0f32; L];
    for (zs, ms) in row[..split].chunks_exact_mut(L).zip(mask.chunks_exact(L)) {
        for l in 0..L {
            let e = exp_f32(zs[l] - max);
            zs[l] = if ms[l] == f32::NEG_INFINITY { 0.0 } else { e };
            sums[l] += zs[l];
        }
    }
    let mut sum = sums.iter().sum::<f32>();
    for (z, &m) in row[split..].iter_mut().zip(&mask[split..]) {
        *z = if m == f32::NEG_INFINITY { 0.0 } else { exp_f32(*z - max) };
        sum += *z;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|z| *z *= inv);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_f32_avx2(row: &mut [f32], mask: &[f32], scale: f32) {
    softmax_row_f32(row, mask, scale)
}

impl Real for f64 {
    fn softmax_row(row: &mut [f64], mask: &[f64], scale: f64) {
        let mut max = f64::NEG_INFINITY;
        for (z, &m) in row.iter_mut().zip(mask) {
            *z = (*z * scale + 0.0) + m;
            if *z > max {
                max = *z;
            }
        }
        let mut sum = 0.0;
        for z in row.iter_mut() {
            *z = if *z == f64::NEG_INFINITY { 0.0 } else { (*z - max).exp() };
            sum += *z;
        }
        row.iter_mut().for_each(|z| *z /= sum);
    }
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn tanh(self) -> f64 {
        f64::tanh(self)
    }
    fn exp_fast(self) -> f64 {
        f64::exp(self)
    }
}

/// candle's silu, `v / (1 + e^(−v))`, and σ(v) (the exponential from [`Real::exp_fast`]).
fn silu_sigmoid<T: Real>(v: T) -> (T, T) {
    let one = T::from_f64(1.0);
    let e = one + (T::from_f64(0.0) - v).exp_fast();
    (v / e, one / e)
}

/// Runs `f(i, out)` over `0..n` in contiguous chunks on the available cores, each chunk writing
/// its own slice of every output.
fn par_chunks<T: Real, const K: usize>(n: usize, f: impl Fn(usize, [&mut [T]; K]) + Sync) -> [Vec<T>; K] {
    let mut outs: [Vec<T>; K] = std::array::from_fn(|_| vec![T::from_f64(0.0); n]);
    let threads = candle_core::utils::get_num_threads().min(n.div_ceil(1 << 14)).max(1);
    let chunk = n.div_ceil(threads).max(1);
    let mut parts: Vec<[&mut [T]; K]> = (0..threads).map(|_| std::array::from_fn(|_| &mut [][..])).collect();
    for (k, out) in outs.iter_mut().enumerate() {
        for (part, c) in parts.iter_mut().zip(out.chunks_mut(chunk)) {
            part[k] = c;
        }
    }
    std::thread::scope(|sc| {
        for (t, part) in parts.into_iter().enumerate() {
            let f = &f;
            sc.spawn(move || f(t * chunk, part));
        }
    });
    outs
}

impl SwiGlu {
    fn forward(&self) -> CResult<Tensor> {
        self.g.silu()? * &self.u
    }

    fn cpu_forward<T: Real>(&self, g: &CpuStorage, gl: &Layout, u: &CpuStorage, ul: &Layout) -> CResult<CpuStorage> {
        let n = gl.shape().elem_count();
        let g = &T::cpu_storage_as_slice(g)?[gl.start_offset()..][..n];
        let u = &T::cpu_storage_as_slice(u)?[ul.start_offset()..][..n];
        let [y] = par_chunks::<T, 1>(n, |at, [y]| {
            for (i, y) in y.iter_mut().enumerate() {
                *y = silu_sigmoid(g[at + i]).0 * u[at + i];
            }
        });
        Ok(T::to_cpu_storage_owned(y))
    }

    fn cpu_backward<T: Real>(&self, dy: &Tensor) -> CResult<(Tensor, Tensor)> {
        let dy = dy.contiguous()?;
        let n = dy.elem_count();
        let ((gs, gl), (us, ul), (ds, dl)) =
            (self.g.storage_and_layout(), self.u.storage_and_layout(), dy.storage_and_layout());
        let slice = |s, l| cpu_elems::<T>(s, l, n, "swiglu backward");
        let (g, u, d) = (slice(&gs, gl)?, slice(&us, ul)?, slice(&ds, dl)?);
        let one = T::from_f64(1.0);
        let [dg, du] = par_chunks::<T, 2>(n, |at, [dg, du]| {
            for (i, (dg, du)) in dg.iter_mut().zip(du.iter_mut()).enumerate() {
                let (silu, s) = silu_sigmoid(g[at + i]);
                *dg = d[at + i] * u[at + i] * (s + silu * (one - s));
                *du = d[at + i] * silu;
            }
        });
        let dev = dy.device();
        Ok((Tensor::from_vec(dg, self.g.shape(), dev)?, Tensor::from_vec(du, self.g.shape(), dev)?))
    }

    /// The backward from tensor ops (GPU, half precision).
    fn tensor_backward(&self, dy: &Tensor) -> CResult<(Tensor, Tensor)> {
        let s = (self.g.neg()?.exp()? + 1.0)?.recip()?;
        let silu = (&self.g * &s)?;
        // σ(g)·(1 + g·(1 − σ(g))) = σ(g) + silu(g)·(1 − σ(g))
        let dsilu = (&s + (&silu * s.affine(-1.0, 1.0)?)?)?;
        let dg = ((dy * &self.u)? * dsilu)?;
        let du = (dy * silu)?;
        Ok((dg, du))
    }
}

impl candle_core::CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, g: &CpuStorage, gl: &Layout, u: &CpuStorage, ul: &Layout) -> CResult<(CpuStorage, Shape)> {
        profile::time("swiglu", Pass::Forward, || {
            let out = match g {
                CpuStorage::F32(_) if gl.is_contiguous() && ul.is_contiguous() => {
                    self.cpu_forward::<f32>(g, gl, u, ul)?
                }
                CpuStorage::F64(_) if gl.is_contiguous() && ul.is_contiguous() => {
                    self.cpu_forward::<f64>(g, gl, u, ul)?
                }
                _ => return cpu_of(output_storage(|| self.forward()), "swiglu"),
            };
            Ok((out, gl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda_of(output_storage(|| self.forward()), "swiglu")
    }

    fn bwd(&self, _g: &Tensor, _u: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        profile::time("swiglu", Pass::Backward, || {
            let dy = grad.detach();
            let (dg, du) = match (dy.device().is_cpu(), dy.dtype()) {
                (true, DType::F32) => self.cpu_backward::<f32>(&dy)?,
                (true, DType::F64) => self.cpu_backward::<f64>(&dy)?,
                _ => self.tensor_backward(&dy)?,
            };
            Ok((Some(dg), Some(du)))
        })
    }
}

/// [`rope`] as one node: the backward is the inverse rotation (the same rope with `−sin`).
pub fn rope_fused(x: &Tensor, cos: &Tensor, sin: &Tensor, neox: bool) -> CResult<Tensor> {
    let (cf, sf, cb, sb) = (cos.clone(), sin.clone(), cos.clone(), sin.neg()?);
    fused1(
        x,
        "rope",
        Box::new(move |x| rope_kernel(x, &cf, &sf, neox)),
        Box::new(move |_, g| rope_kernel(g, &cb, &sb, neox)),
    )
}

/// [`rope`] on the CPU (f32/f64) as one pass over the rows, split across the cores, with the
/// same products and sums per element (bit-identical); the tensor ops elsewhere.
fn rope_kernel(x: &Tensor, cos: &Tensor, sin: &Tensor, neox: bool) -> CResult<Tensor> {
    fn run<T: Real>(x: &Tensor, cos: &Tensor, sin: &Tensor, neox: bool) -> CResult<Tensor> {
        let (h, t, d) = x.dims3()?;
        let half = d / 2;
        if cos.dims2()? != (t, half) || sin.dims2()? != (t, half) || d % 2 != 0 {
            candle_core::bail!("rope: x {:?} against tables {:?}", x.dims(), cos.dims());
        }
        let x = x.contiguous()?;
        let ((xs, xl), (cs, cl), (ss, sl)) =
            (x.storage_and_layout(), cos.storage_and_layout(), sin.storage_and_layout());
        let xv = cpu_elems::<T>(&xs, xl, h * t * d, "rope")?;
        let (cv, sv) = (cpu_elems::<T>(&cs, cl, t * half, "rope")?, cpu_elems::<T>(&ss, sl, t * half, "rope")?);
        let mut out = vec![T::from_f64(0.0); h * t * d];
        par_rows::<_, ()>(&mut out, d, |first, rows| {
            for (r, o) in rows.chunks_exact_mut(d).enumerate() {
                let (row, p) = (first + r, (first + r) % t);
                let xr = &xv[row * d..][..d];
                let (c, s) = (&cv[p * half..][..half], &sv[p * half..][..half]);
                for i in 0..half {
                    let (a, b) = if neox { (xr[i], xr[half + i]) } else { (xr[2 * i], xr[2 * i + 1]) };
                    let (r0, r1) = (a * c[i] - b * s[i], a * s[i] + b * c[i]);
                    if neox {
                        (o[i], o[half + i]) = (r0, r1);
                    } else {
                        (o[2 * i], o[2 * i + 1]) = (r0, r1);
                    }
                }
            }
            Vec::new()
        });
        Tensor::from_vec(out, (h, t, d), x.device())
    }
    let contiguous_tables = cos.is_contiguous() && sin.is_contiguous();
    match (x.device().is_cpu() && contiguous_tables, x.dtype()) {
        (true, DType::F32) => run::<f32>(x, cos, sin, neox),
        (true, DType::F64) => run::<f64>(x, cos, sin, neox),
        _ => rope(x, cos, sin, neox),
    }
}

/// Masked scaled-dot-product attention of one sequence, `softmax(q·kᵀ·scale + mask)·v` for
/// q, k, v of shape (heads, t, head_dim) and an additive (t, t) mask, as one node: the graph
/// keeps the probabilities P and the inputs instead of the ~6 (heads × t × t) intermediates of
/// the plain ops, and the backward is analytic: dV = Pᵀ·dO, dS = P ⊙ (dO·Vᵀ − rowsum(P ⊙ dO·Vᵀ)),
/// dQ = dS·K·scale, dK = dSᵀ·Q·scale. The forward runs the plain ops (bit-identical values).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> CResult<Tensor> {
    attention_packed(q, k, v, std::slice::from_ref(mask), scale)
}

/// [`attention`] over sequences packed along the position axis: q of shape (heads, T, head_dim),
/// k and v of shape (kv_heads, T, head_dim) with kv_heads dividing heads (grouped-query
/// attention: query head h reads KV head h / (heads / kv_heads), as llama.cpp does), holding
/// the sequences one after the other; `masks[i]` is sequence i's (tᵢ, tᵢ) mask and T = Σ tᵢ.
/// Each sequence attends only to itself. One node for the whole pack: no per-sequence slicing
/// nodes whose backward would write full-size zero gradients, and no copies of K and V per
/// query head (the query heads of a group run as one matrix against their KV head, and the
/// backward's dK, dV sum over the group by the same matmuls).
pub fn attention_packed(q: &Tensor, k: &Tensor, v: &Tensor, masks: &[Tensor], scale: f64) -> CResult<Tensor> {
    let total: usize = masks.iter().map(|m| m.dim(0)).sum::<CResult<usize>>()?;
    let ((nh, tq, hd), (nkv, tk, hdk)) = (q.dims3()?, k.dims3()?);
    if total != tq || tk != tq || v.dims3()? != (nkv, tk, hdk) || hdk != hd {
        candle_core::bail!(
            "attention: masks cover {total} positions; q {:?}, k {:?}, v {:?} do not match",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if nkv == 0 || nh % nkv != 0 {
        candle_core::bail!("attention: {nkv} KV heads do not divide {nh} query heads");
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let op = Attention {
        q: q.detach(),
        k: k.detach(),
        v: v.detach(),
        masks: masks.iter().map(Tensor::detach).collect(),
        scale,
        probs: Mutex::new(None),
    };
    q.apply_op3(&k, &v, op)
}

struct Attention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    masks: Vec<Tensor>,
    scale: f64,
    /// Per sequence, (kv_heads, group·t, t).
    probs: Mutex<Option<Vec<Tensor>>>,
}

impl Attention {
    /// (start, length, mask) of each sequence along the position axis.
    fn segments(&self) -> impl Iterator<Item = (usize, usize, &Tensor)> {
        self.masks.iter().scan(0, |start, m| {
            let t = m.dims()[0];
            *start += t;
            Some((*start - t, t, m))
        })
    }

    /// Query heads per KV head.
    fn group(&self) -> usize {
        self.q.dims()[0] / self.k.dims()[0]
    }

    /// Sequence `s..s+t` of q (or of its gradient) as (kv_heads, group·t, head_dim): the query
    /// heads of one KV head stacked along the rows.
    fn grouped(&self, x: &Tensor, s: usize, t: usize) -> CResult<Tensor> {
        let (nh, _, hd) = x.dims3()?;
        let g = self.group();
        x.narrow(1, s, t)?.contiguous()?.reshape((nh / g, g * t, hd))
    }

    /// The inverse of [`Attention::grouped`]: (kv_heads, group·t, d) → (heads, t, d).
    fn ungrouped(&self, x: &Tensor, t: usize) -> CResult<Tensor> {
        let (nkv, _, d) = x.dims3()?;
        x.reshape((nkv * self.group(), t, d))
    }

    /// The forward on the CPU: one unit of work per (sequence, query head), spread over the
    /// cores, each on one thread: `s = q·kᵀ` by gemm into that head's block of the sequence's
    /// probability buffer, `softmax(s·scale + mask)` in place row by row (masked entries are
    /// exactly 0), then `p·v` by gemm straight into the head's rows of the output. No copies of
    /// q, k or v and no per-sequence temporaries; the probabilities are kept for the backward,
    /// per sequence as (kv_heads, group·t, t) like the tensor path's.
    fn cpu_forward<T: Real>(&self) -> CResult<Tensor> {
        let ((nh, total, hd), nkv) = (self.q.dims3()?, self.k.dims()[0]);
        let group = nh / nkv;
        let ((qs, ql), (ks, kl), (vs, vl)) =
            (self.q.storage_and_layout(), self.k.storage_and_layout(), self.v.storage_and_layout());
        let q = cpu_elems::<T>(&qs, ql, nh * total * hd, "attention")?;
        let k = cpu_elems::<T>(&ks, kl, nkv * total * hd, "attention")?;
        let v = cpu_elems::<T>(&vs, vl, nkv * total * hd, "attention")?;
        let segs: Vec<(usize, usize, &Tensor)> = self.segments().collect();
        let guards: Vec<_> = segs.iter().map(|(_, _, m)| m.storage_and_layout()).collect();
        let masks = segs
            .iter()
            .zip(&guards)
            .map(|((_, t, _), (ms, ml))| cpu_elems::<T>(ms, ml, t * t, "attention mask"))
            .collect::<CResult<Vec<_>>>()?;
        let mut out = vec![T::from_f64(0.0); nh * total * hd];
        let mut probs: Vec<Vec<T>> = segs.iter().map(|(_, t, _)| vec![T::from_f64(0.0); nh * t * t]).collect();
        // Units (sequence, head): the head's rows of the output and its block of probabilities.
        let lens: Vec<usize> = segs.iter().map(|(_, t, _)| *t).collect();
        let mut out_rows = head_rows(&mut out, total, hd, &lens);
        let mut units = Vec::with_capacity(segs.len() * nh);
        for (si, ((s, t, _), p)) in segs.iter().zip(probs.iter_mut()).enumerate() {
            for (h, ph) in p.chunks_mut(t * t).enumerate() {
                units.push((si, *s, *t, h, std::mem::take(&mut out_rows[h][si]), ph));
            }
        }
        let (scale, one) = (T::from_f64(self.scale), T::from_f64(1.0));
        par_units(units, |(si, s, t, h, o, p)| {
            let kv = h / group;
            let qh = &q[(h * total + s) * hd..][..t * hd];
            let (kh, vh) = (&k[(kv * total + s) * hd..][..t * hd], &v[(kv * total + s) * hd..][..t * hd]);
            gemm_strided(p, t, t, t, hd, (qh, hd, 1), (kh, 1, hd), false, one, 1);
            for (row, m) in p.chunks_exact_mut(t).zip(masks[si].chunks_exact(t)) {
                T::softmax_row(row, m, scale);
            }
            gemm_strided(o, hd, t, hd, t, (p, t, 1), (vh, hd, 1), false, one, 1);
        });
        let dev = self.q.device();
        let probs = segs
            .iter()
            .zip(probs)
            .map(|((_, t, _), p)| Tensor::from_vec(p, (nkv, group * t, *t), dev))
            .collect::<CResult<Vec<_>>>()?;
        *self.probs.lock().expect("attention probabilities poisoned") = Some(probs);
        Tensor::from_vec(out, (nh, total, hd), dev)
    }

    /// The backward on the CPU: one unit per (sequence, KV head), each on one thread, looping
    /// over its query heads: `dv += pᵀ·g`, `ds = p ⊙ (g·vᵀ − Σ_j (g·vᵀ)·p)·scale` in one
    /// buffer, `dq = ds·k` into the head's rows, `dk += dsᵀ·q`, all by gemm on the kept
    /// probabilities, straight into the gradients' rows.
    fn cpu_backward<T: Real>(&self, probs: &[Tensor], grad: &Tensor) -> CResult<(Tensor, Tensor, Tensor)> {
        let ((nh, total, hd), nkv) = (self.q.dims3()?, self.k.dims()[0]);
        let group = nh / nkv;
        let grad = grad.contiguous()?;
        let ((qs, ql), (ks, kl), (vs, vl), (gs, gl)) = (
            self.q.storage_and_layout(),
            self.k.storage_and_layout(),
            self.v.storage_and_layout(),
            grad.storage_and_layout(),
        );
        let q = cpu_elems::<T>(&qs, ql, nh * total * hd, "attention backward")?;
        let k = cpu_elems::<T>(&ks, kl, nkv * total * hd, "attention backward")?;
        let v = cpu_elems::<T>(&vs, vl, nkv * total * hd, "attention backward")?;
        let g = cpu_elems::<T>(&gs, gl, nh * total * hd, "attention backward")?;
        let segs: Vec<(usize, usize, &Tensor)> = self.segments().collect();
        let pguards: Vec<_> = probs.iter().map(|p| p.storage_and_layout()).collect();
        let ps = segs
            .iter()
            .zip(&pguards)
            .map(|((_, t, _), (s, l))| cpu_elems::<T>(s, l, nh * t * t, "attention backward"))
            .collect::<CResult<Vec<_>>>()?;
        let zero = T::from_f64(0.0);
        let (mut dq, mut dk, mut dv) =
            (vec![zero; nh * total * hd], vec![zero; nkv * total * hd], vec![zero; nkv * total * hd]);
        let lens: Vec<usize> = segs.iter().map(|(_, t, _)| *t).collect();
        let mut dq_rows = head_rows(&mut dq, total, hd, &lens);
        let mut dk_rows = head_rows(&mut dk, total, hd, &lens);
        let mut dv_rows = head_rows(&mut dv, total, hd, &lens);
        let mut units = Vec::with_capacity(segs.len() * nkv);
        for (si, (s, t, _)) in segs.iter().enumerate() {
            for kv in 0..nkv {
                let dqs: Vec<&mut [T]> =
                    (kv * group..(kv + 1) * group).map(|h| std::mem::take(&mut dq_rows[h][si])).collect();
                let dks = std::mem::take(&mut dk_rows[kv][si]);
                let dvs = std::mem::take(&mut dv_rows[kv][si]);
                units.push((si, *s, *t, kv, dqs, dks, dvs));
            }
        }
        let (scale, one) = (T::from_f64(self.scale), T::from_f64(1.0));
        par_units(units, |(si, s, t, kv, dqs, dks, dvs)| {
            let (kh, vh) = (&k[(kv * total + s) * hd..][..t * hd], &v[(kv * total + s) * hd..][..t * hd]);
            let mut ds = vec![zero; t * t];
            for (j, dqh) in dqs.into_iter().enumerate() {
                let h = kv * group + j;
                let (qh, gh) = (&q[(h * total + s) * hd..][..t * hd], &g[(h * total + s) * hd..][..t * hd]);
                let p = &ps[si][h * t * t..][..t * t];
                gemm_strided(dvs, hd, t, hd, t, (p, 1, t), (gh, hd, 1), j > 0, one, 1);
                gemm_strided(&mut ds, t, t, t, hd, (gh, hd, 1), (vh, 1, hd), false, one, 1);
                for (row, pr) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                    let dot = row.iter().zip(pr).fold(zero, |a, (&d, &p)| a + d * p);
                    row.iter_mut().zip(pr).for_each(|(d, &p)| *d = p * (*d - dot) * scale);
                }
                gemm_strided(dqh, hd, t, hd, t, (&ds, t, 1), (kh, hd, 1), false, one, 1);
                gemm_strided(dks, hd, t, hd, t, (&ds, 1, t), (qh, hd, 1), j > 0, one, 1);
            }
        });
        let dev = self.q.device();
        Ok((
            Tensor::from_vec(dq, (nh, total, hd), dev)?,
            Tensor::from_vec(dk, (nkv, total, hd), dev)?,
            Tensor::from_vec(dv, (nkv, total, hd), dev)?,
        ))
    }

    /// The forward from tensor ops (GPU, half precision), per sequence.
    fn forward(&self) -> CResult<Tensor> {
        let seg = |x: &Tensor, s: usize, t: usize| x.narrow(1, s, t)?.contiguous();
        let mut outs = Vec::with_capacity(self.masks.len());
        let mut probs = Vec::with_capacity(self.masks.len());
        for (s, t, mask) in self.segments() {
            let (q, k, v) = (self.grouped(&self.q, s, t)?, seg(&self.k, s, t)?, seg(&self.v, s, t)?);
            let (nkv, g) = (k.dim(0)?, self.group());
            let scores = (q.matmul(&k.t()?)? * self.scale)?;
            let scores = scores.reshape((nkv, g, t, t))?.broadcast_add(mask)?.reshape((nkv, g * t, t))?;
            let p = softmax_last(&scores)?;
            outs.push(self.ungrouped(&p.matmul(&v)?, t)?);
            probs.push(p);
        }
        *self.probs.lock().expect("attention probabilities poisoned") = Some(probs);
        cat_positions(outs)
    }
}

/// A (heads, total, hd) buffer cut into each head's rows of each packed sequence (`lens`
/// positions each, in order): `[head][sequence]`, disjoint, for the attention units.
fn head_rows<'a, T>(buf: &'a mut [T], total: usize, hd: usize, lens: &[usize]) -> Vec<Vec<&'a mut [T]>> {
    buf.chunks_mut(total * hd)
        .map(|mut head| {
            lens.iter()
                .map(|t| {
                    let (rows, rest) = std::mem::take(&mut head).split_at_mut(t * hd);
                    head = rest;
                    rows
                })
                .collect()
        })
        .collect()
}

/// Concatenates per-sequence (heads, t, d) tensors along the position axis.
fn cat_positions(mut parts: Vec<Tensor>) -> CResult<Tensor> {
    if parts.len() == 1 {
        Ok(parts.pop().expect("one part"))
    } else {
        Tensor::cat(&parts, 1)
    }
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let forward = || match self.q.dtype() {
            DType::F32 => self.cpu_forward::<f32>(),
            DType::F64 => self.cpu_forward::<f64>(),
            _ => self.forward(),
        };
        profile::time("attention", Pass::Forward, || cpu_of(output_storage(forward), "attention"))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda_of(output_storage(|| self.forward()), "attention")
    }

    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        profile::time("attention", Pass::Backward, || self.backward(grad))
    }
}

impl Attention {
    /// Gradients of q, k and v from the kept probabilities.
    fn backward(&self, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs = match self.probs.lock().expect("attention probabilities poisoned").clone() {
            Some(p) => p,
            None => candle_core::bail!("attention: backward before forward"),
        };
        let g_all = grad.detach();
        let cpu = match (g_all.device().is_cpu(), g_all.dtype()) {
            (true, DType::F32) => Some(self.cpu_backward::<f32>(&probs, &g_all)?),
            (true, DType::F64) => Some(self.cpu_backward::<f64>(&probs, &g_all)?),
            _ => None,
        };
        if let Some((dq, dk, dv)) = cpu {
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let seg = |x: &Tensor, s: usize, t: usize| x.narrow(1, s, t)?.contiguous();
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        for ((s, t, _), p) in self.segments().zip(&probs) {
            let (q, k, v) = (self.grouped(&self.q, s, t)?, seg(&self.k, s, t)?, seg(&self.v, s, t)?);
            let g = self.grouped(&g_all, s, t)?;
            dvs.push(p.t()?.matmul(&g)?);
            let dp = g.matmul(&v.t()?)?;
            let ds = (p * dp.broadcast_sub(&(&dp * p)?.sum_keepdim(D::Minus1)?)?)?;
            let (dq, dk) = ((ds.matmul(&k)? * self.scale)?, (ds.t()?.matmul(&q)? * self.scale)?);
            dqs.push(self.ungrouped(&dq, t)?);
            dks.push(dk);
        }
        Ok((Some(cat_positions(dqs)?), Some(cat_positions(dks)?), Some(cat_positions(dvs)?)))
    }
}

/// RMS norm over the last dimension, times `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> CResult<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let r = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&r)?.broadcast_mul(w)
}

/// Softmax over the last dimension (shift by the detached row max).
pub fn softmax_last(x: &Tensor) -> CResult<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last(x: &Tensor) -> CResult<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// cos/sin tables of shape (t, n_rot/2) for positions `0..t`, computed like ggml: the angle of
/// pair i is `s·p · θ^i` with `θ = base^(-2/n_rot)` accumulated in f32 (`s` = linear scaling).
pub fn rope_tables(
    t: usize,
    n_rot: usize,
    base: f64,
    pos_scale: f64,
    dtype: DType,
    dev: &candle_core::Device,
) -> CResult<(Tensor, Tensor)> {
    let half = n_rot / 2;
    let theta_scale = (base as f32).powf(-2.0 / n_rot as f32);
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in 0..t {
        let mut theta = p as f32 * pos_scale as f32;
        for _ in 0..half {
            cos.push(theta.cos());
            sin.push(theta.sin());
            theta *= theta_scale;
        }
    }
    let cos = Tensor::from_vec(cos, (t, half), dev)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (t, half), dev)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Rotates `x` (heads, t, head_dim) by the tables. `neox` rotates the halves (x_i, x_{i+d/2});
/// otherwise adjacent pairs (x_{2i}, x_{2i+1}) as llama.cpp does on llama's permuted Q/K rows.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, neox: bool) -> CResult<Tensor> {
    let (h, t, d) = x.dims3()?;
    let half = d / 2;
    let (x0, x1) = if neox {
        (x.narrow(2, 0, half)?, x.narrow(2, half, half)?)
    } else {
        let pairs = x.reshape((h, t, half, 2))?;
        (pairs.narrow(3, 0, 1)?.squeeze(3)?, pairs.narrow(3, 1, 1)?.squeeze(3)?)
    };
    let r0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
    let r1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
    if neox {
        Tensor::cat(&[r0, r1], 2)
    } else {
        Tensor::stack(&[r0, r1], 3)?.reshape((h, t, d))
    }
}

/// GELU, tanh approximation (ggml_gelu), from differentiable ops.
pub fn gelu_tanh(x: &Tensor) -> CResult<Tensor> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = ((x.powf(3.0)? * 0.044715)? + x)?.affine(c, 0.0)?;
    ((inner.tanh()? + 1.0)? * 0.5)?.mul(x)
}

/// ggml's CPU GELU, bit for bit: the input rounded to f16 indexes a 65,536-entry f16 table built
/// with ggml's own f32 formula; |x| ≥ 10 is passed through (0 below −10). Value of the table,
/// gradient of the exact GELU (straight-through). Only for parity checks against a CPU
/// llama.cpp (CPU tensors); training uses [`gelu_tanh`].
pub fn gelu_ggml_cpu(x: &Tensor) -> CResult<Tensor> {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        const A: f32 = 0.044715;
        const S: f32 = 0.797_884_6;
        (0..=u16::MAX)
            .map(|bits| {
                let f = half::f16::from_bits(bits).to_f32();
                let g = 0.5 * f * (1.0 + (S * f * (1.0 + A * f * f)).tanh());
                half::f16::from_f32(g).to_f32()
            })
            .collect()
    });
    let exact = gelu_tanh(x)?;
    let v: Vec<f32> = x
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|xi| {
            if xi <= -10.0 {
                0.0
            } else if xi >= 10.0 {
                xi
            } else {
                table[half::f16::from_f32(xi).to_bits() as usize]
            }
        })
        .collect();
    let v = Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?;
    exact.clone() + (v - exact)?.detach()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn frozen_linear_matches_matmul_and_has_input_gradient_only() {
        let w = t(&[1.0, 2.0, 3.0, -1.0, 0.5, 0.25], &[2, 3]);
        let x =
            Var::from_tensor(&t(&[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2], &[2, 2, 3])).unwrap();
        let y = frozen_linear(x.as_tensor(), &w).unwrap();
        let want = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_eq!(y.to_vec3::<f64>().unwrap(), want.to_vec3::<f64>().unwrap());
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap().to_vec3::<f64>().unwrap();
        // d(sum y)/dx = column sums of W for every row.
        assert_eq!(gx[1][1], vec![0.0, 2.5, 3.25]);
        assert!(g.get(&w).is_none());
    }

    #[test]
    fn checkpoint_gives_the_same_gradients_as_the_plain_graph() {
        let p = Var::from_tensor(&t(&[0.3, -0.2, 0.7], &[3])).unwrap();
        let x0 = Var::from_tensor(&t(&[1.0, 2.0, -1.0, 0.5, 0.25, 3.0], &[2, 3])).unwrap();
        let f = {
            let p = p.clone();
            move |x: &Tensor| x.broadcast_mul(p.as_tensor())?.tanh()?.sqr()
        };
        let plain = f(x0.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let sink = GradSink::default();
        let y = checkpoint(x0.as_tensor(), vec![p.clone()], &sink, f).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let a = plain.get(p.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        let b = sink.get(p.as_tensor().id()).unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(a, b);
        assert_eq!(
            plain.get(x0.as_tensor()).unwrap().to_vec2::<f64>().unwrap(),
            g.get(x0.as_tensor()).unwrap().to_vec2::<f64>().unwrap()
        );
    }

    /// Value and input gradients of `fused` and `plain` on the same inputs, in f64: the value
    /// must be bit-identical, the gradients equal to 1e-12 (relative).
    fn same_as_plain(inputs: &[Tensor], plain: impl Fn(&[Tensor]) -> Tensor, fused: impl Fn(&[Tensor]) -> Tensor) {
        let run = |f: &dyn Fn(&[Tensor]) -> Tensor| {
            let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts);
            // A weighted sum, so every output element has its own gradient.
            let w = Tensor::arange(0.0, y.elem_count() as f64, &Device::Cpu).unwrap().reshape(y.shape()).unwrap();
            let w = (w * 0.37).unwrap().sin().unwrap();
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Vec<f64>> =
                ts.iter().map(|t| g.get(t).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()).collect();
            (y.flatten_all().unwrap().to_vec1::<f64>().unwrap(), grads)
        };
        let (ya, ga) = run(&plain);
        let (yb, gb) = run(&fused);
        assert_eq!(ya, yb, "forward values differ");
        for (a, b) in ga.iter().flatten().zip(gb.iter().flatten()) {
            assert!((a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0), "gradient {a} vs {b}");
        }
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 10_000) as f64 / 5_000.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn fused_norm_rope_and_attention_equal_the_plain_ops() {
        let w = randn(&[8], 1);
        same_as_plain(
            &[randn(&[5, 8], 2)],
            |x| rms_norm(&x[0], &w, 1e-5).unwrap(),
            |x| rms_norm_fused(&x[0], &w, 1e-5).unwrap(),
        );
        let (c, s) = rope_tables(6, 8, 10_000.0, 1.0, DType::F64, &Device::Cpu).unwrap();
        for neox in [false, true] {
            same_as_plain(
                &[randn(&[3, 6, 8], 3)],
                |x| rope(&x[0], &c, &s, neox).unwrap(),
                |x| rope_fused(&x[0], &c, &s, neox).unwrap(),
            );
        }
        let mask = Tensor::from_vec(
            (0..36).map(|i| if i % 6 > i / 6 { f64::NEG_INFINITY } else { 0.0 }).collect::<Vec<_>>(),
            (6, 6),
            &Device::Cpu,
        )
        .unwrap();
        let plain = |x: &[Tensor]| {
            let scores = (x[0].matmul(&x[1].t().unwrap()).unwrap() * 0.35).unwrap().broadcast_add(&mask).unwrap();
            softmax_last(&scores).unwrap().matmul(&x[2]).unwrap()
        };
        same_as_plain(&[randn(&[2, 6, 4], 4), randn(&[2, 6, 4], 5), randn(&[2, 6, 4], 6)], plain, |x| {
            attention(&x[0], &x[1], &x[2], &mask, 0.35).unwrap()
        });
        // Grouped-query attention: 6 query heads on 2 KV heads, against K and V copied per head.
        let expand = |z: &Tensor| z.unsqueeze(1).unwrap().expand((2, 3, 6, 4)).unwrap().reshape((6, 6, 4)).unwrap();
        same_as_plain(
            &[randn(&[6, 6, 4], 7), randn(&[2, 6, 4], 8), randn(&[2, 6, 4], 9)],
            |x| plain(&[x[0].clone(), expand(&x[1]), expand(&x[2])]),
            |x| attention(&x[0], &x[1], &x[2], &mask, 0.35).unwrap(),
        );
        // Packed: sequences of 6 and 4 positions (GQA) against each sequence on its own.
        let mask4 = mask.narrow(0, 0, 4).unwrap().narrow(1, 0, 4).unwrap().contiguous().unwrap();
        let per_seq = |x: &[Tensor]| {
            let part = |z: &Tensor, s: usize, t: usize| z.narrow(1, s, t).unwrap().contiguous().unwrap();
            let a = attention(&part(&x[0], 0, 6), &part(&x[1], 0, 6), &part(&x[2], 0, 6), &mask, 0.35).unwrap();
            let b = attention(&part(&x[0], 6, 4), &part(&x[1], 6, 4), &part(&x[2], 6, 4), &mask4, 0.35).unwrap();
            Tensor::cat(&[a, b], 1).unwrap()
        };
        same_as_plain(&[randn(&[6, 10, 4], 10), randn(&[2, 10, 4], 11), randn(&[2, 10, 4], 12)], per_seq, |x| {
            attention_packed(&x[0], &x[1], &x[2], &[mask.clone(), mask4.clone()], 0.35).unwrap()
        });
        let bad = attention(&randn(&[6, 6, 4], 7), &randn(&[4, 6, 4], 8), &randn(&[4, 6, 4], 9), &mask, 0.35);
        assert!(bad.unwrap_err().to_string().contains("do not divide"));
    }

    #[test]
    fn lora_linear_and_swiglu_equal_the_plain_ops() {
        let (w, bias) = (randn(&[6, 8], 7), randn(&[6], 8));
        let plain = |x: &[Tensor], bias: Option<&Tensor>| {
            let mut y = frozen_linear(&x[0], &w).unwrap();
            if let Some(bias) = bias {
                y = y.broadcast_add(bias).unwrap();
            }
            let delta = x[0].matmul(&x[1].t().unwrap()).unwrap().matmul(&x[2].t().unwrap()).unwrap();
            (y + (delta * 0.75).unwrap()).unwrap()
        };
        // B non-zero, so every input's gradient has a LoRA part; with and without bias.
        let inputs = [randn(&[5, 8], 9), randn(&[3, 8], 10), randn(&[6, 3], 11)];
        for bias in [None, Some(&bias)] {
            same_as_plain(&inputs, |x| plain(x, bias), |x| lora_linear(&x[0], &w, bias, &x[1], &x[2], 0.75).unwrap());
        }
        let bad = lora_linear(&inputs[0], &w, None, &inputs[2], &inputs[1], 0.75).unwrap_err().to_string();
        assert!(bad.contains("do not chain"), "{bad}");
        // Small (one chunk) and large enough to be split across threads.
        for (shape, seed) in [([4, 7], 12), ([64, 600], 14)] {
            same_as_plain(
                &[(randn(&shape, seed) * 4.0).unwrap(), randn(&shape, seed + 1)],
                |x| (x[0].silu().unwrap() * &x[1]).unwrap(),
                |x| swiglu(&x[0], &x[1]).unwrap(),
            );
        }
    }

    #[test]
    fn exp_f32_is_within_two_ulp_and_f32_attention_follows_f64() {
        let mut worst = 0u32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (a, b) = (exp_f32(x), x.exp());
            worst = worst.max((a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32);
        }
        assert!(worst <= 2, "exp_f32 is {worst} ulp off");
        assert_eq!(exp_f32(0.0), 1.0);
        // The f32 kernels (vectorised softmax) against the f64 ones, forward and gradients.
        let mask = Tensor::from_vec(
            (0..81).map(|i| if i % 9 > i / 9 { f64::NEG_INFINITY } else { 0.0 }).collect::<Vec<_>>(),
            (9, 9),
            &Device::Cpu,
        )
        .unwrap();
        let inputs = [randn(&[4, 9, 8], 21), randn(&[2, 9, 8], 22), randn(&[2, 9, 8], 23)];
        let run = |dt: DType| {
            let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap()).collect();
            let m = mask.to_dtype(dt).unwrap();
            let y = attention(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), &m, 0.35).unwrap();
            let w = Tensor::arange(0.0, y.elem_count() as f64, &Device::Cpu).unwrap().reshape(y.shape()).unwrap();
            let w = (w * 0.37).unwrap().sin().unwrap().to_dtype(dt).unwrap();
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let mut all = flat(&y);
            vars.iter().for_each(|v| all.extend(flat(g.get(v.as_tensor()).unwrap())));
            all
        };
        let (a, b) = (run(DType::F64), run(DType::F32));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "f64 {x} vs f32 {y}");
        }
    }

    #[test]
    fn gemm_strided_matches_the_naive_product_on_one_thread_and_two() {
        // 300 × 7 = (300 × 9)·(9 × 7), rhs as a transposed view, with and without accumulation.
        let lhs: Vec<f64> = (0..300 * 9).map(|i| ((i * 37 % 101) as f64 - 50.0) / 17.0).collect();
        let rhs: Vec<f64> = (0..7 * 9).map(|i| ((i * 13 % 29) as f64 - 14.0) / 5.0).collect();
        let naive: Vec<f64> =
            (0..300 * 7).map(|e| (0..9).fold(0.0, |s, k| s + lhs[(e / 7) * 9 + k] * rhs[(e % 7) * 9 + k])).collect();
        let run = |threads: usize, accumulate: bool| {
            let mut dst = vec![1.0; 300 * 7];
            gemm_strided(&mut dst, 7, 300, 7, 9, (&lhs, 9, 1), (&rhs, 1, 9), accumulate, 0.5, threads);
            dst
        };
        for accumulate in [false, true] {
            let (one, two) = (run(1, accumulate), run(2, accumulate));
            assert_eq!(one, two, "the thread count changed the result");
            for (d, n) in one.iter().zip(&naive) {
                let want = if accumulate { 1.0 + 0.5 * n } else { 0.5 * n };
                assert!((d - want).abs() < 1e-12, "{d} vs {want}");
            }
        }
    }

    #[test]
    fn softmax_and_log_softmax_agree() {
        let x = t(&[1.0, 2.0, 3.0, -5.0, 0.0, 5.0], &[2, 3]);
        let a = softmax_last(&x).unwrap().log().unwrap().to_vec2::<f64>().unwrap();
        let b = log_softmax_last(&x).unwrap().to_vec2::<f64>().unwrap();
        for (r, s) in a.iter().zip(&b) {
            for (u, v) in r.iter().zip(s) {
                assert!((u - v).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn rope_rotations_preserve_norm_and_differ_by_layout() {
        let x = t(&(0..16).map(|i| i as f64 * 0.1).collect::<Vec<_>>(), &[1, 2, 8]);
        let (c, s) = rope_tables(2, 8, 10_000.0, 1.0, DType::F64, &Device::Cpu).unwrap();
        for neox in [false, true] {
            let y = rope(&x, &c, &s, neox).unwrap();
            let n0 = x.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
            let n1 = y.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
            assert!((n0 - n1).abs() < 1e-5);
            // Position 0 is not rotated.
            let first: Vec<f64> = y.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let orig: Vec<f64> = x.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert!(first.iter().zip(&orig).all(|(a, b)| (a - b).abs() < 1e-12));
        }
        let a = rope(&x, &c, &s, false).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let b = rope(&x, &c, &s, true).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(a.iter().zip(&b).any(|(u, v)| (u - v).abs() > 1e-3));
    }
}
