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
//!   On the CPU, attention's softmax and its backward are one in-place pass per row over scores
//!   that gemm writes into one buffer per sequence ([`gemm_into`], [`par_rows`]);
//! - plain differentiable tensor ops for norms, RoPE, softmax, log-softmax (the references of
//!   the fused ops, and the plain-autograd baseline).
//!
//! The output head's log-probabilities are one node too, in [`super::head`].

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
        let bmnk = self.bmnk(l)?;
        let (xl, wtl) = self.layouts(l, bmnk)?;
        let (ws, _) = self.w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else { candle_core::bail!("frozen-linear: weight not on the CPU") };
        Ok((s.matmul(ws, bmnk, &xl, &wtl)?, self.out_shape(l)))
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
        let (n, _) = self.w.dims2()?;
        let g = grad.reshape(((), n))?.matmul(&self.w)?;
        Ok(Some(g.reshape(arg.shape())?))
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
    /// (same gemm calls, so the same values), then bias and `scale·(x·Aᵀ)·Bᵀ` added into x·Wᵀ
    /// in place, in the plain graph's order — no zero-filled temporaries and no copy of the result.
    fn cpu_forward<T: candle_core::WithDType>(
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
        // A contiguous (rows × cols) matrix, and the transposed view of one, as matmul operands.
        let plain =
            |rows: usize, cols: usize, l: &Layout| Layout::contiguous_with_offset((rows, cols), l.start_offset());
        let tr = |rows: usize, cols: usize, l: &Layout| {
            Layout::new(Shape::from((cols, rows)), vec![1, cols], l.start_offset())
        };
        let y = {
            let (ws, wl) = self.w.storage_and_layout();
            let Storage::Cpu(ws) = &*ws else { candle_core::bail!("lora-linear: weight not on the CPU") };
            xs.matmul(ws, (1, m, n, k), &plain(m, k, xl), &tr(n, k, wl))?
        };
        let u = xs.matmul(a, (1, m, r, k), &plain(m, k, xl), &tr(r, k, al))?;
        let d = u.matmul(b, (1, m, n, r), &Layout::contiguous((m, r)), &tr(n, r, bl))?;
        let mut y = T::cpu_storage_data(y)?;
        let d = T::cpu_storage_as_slice(&d)?;
        let (mul, zero) = (T::from_f64(self.scale), T::from_f64(0.0));
        let guard = self.bias.as_ref().map(|t| t.storage_and_layout());
        let bias = match &guard {
            Some((s, l)) => Some(cpu_elems::<T>(s, l, n, "lora-linear bias")?),
            None => None,
        };
        for (yr, dr) in y.chunks_exact_mut(n).zip(d.chunks_exact(n)) {
            match bias {
                Some(bias) => {
                    yr.iter_mut().zip(dr).zip(bias).for_each(|((y, &d), &c)| *y = (*y + c) + (d * mul + zero))
                }
                None => yr.iter_mut().zip(dr).for_each(|(y, &d)| *y += d * mul + zero),
            }
        }
        Ok((T::to_cpu_storage_owned(y), Shape::from((m, n))))
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
        match xs {
            CpuStorage::F32(_) => self.cpu_forward::<f32>(xs, xl, a, al, b, bl),
            CpuStorage::F64(_) => self.cpu_forward::<f64>(xs, xl, a, al, b, bl),
            _ => cpu_of(output_storage(|| self.forward()), "lora-linear"),
        }
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
        let g = grad.detach();
        // X·Aᵀ is rows × r: recomputing it is cheaper than keeping it.
        let u = self.x.matmul(&self.a.t()?)?;
        let gu = (g.matmul(&self.b)? * self.scale)?;
        let db = (g.t()?.matmul(&u)? * self.scale)?;
        let da = gu.t()?.matmul(&self.x)?;
        let dx = match sum_of_products(&g, &self.w, &gu, &self.a)? {
            Some(dx) => dx,
            None => (g.matmul(&self.w)? + gu.matmul(&self.a)?)?,
        };
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `p·q + r·s` for 2-D CPU tensors (f32 or f64, contiguous), the second product added into the
/// first in place (one [rows × cols] buffer instead of three); None where that does not apply.
fn sum_of_products(p: &Tensor, q: &Tensor, r: &Tensor, s: &Tensor) -> CResult<Option<Tensor>> {
    fn mm(a: &Tensor, b: &Tensor) -> CResult<Option<CpuStorage>> {
        let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
        let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
        match (&*sa, &*sb) {
            (Storage::Cpu(x), Storage::Cpu(y)) if k == k2 && la.is_contiguous() && lb.is_contiguous() => {
                Ok(Some(x.matmul(y, (1, m, n, k), la, lb)?))
            }
            _ => Ok(None),
        }
    }
    fn add<T: candle_core::WithDType>(
        a: CpuStorage,
        b: &CpuStorage,
        shape: (usize, usize),
        dev: &candle_core::Device,
    ) -> CResult<Tensor> {
        let mut a = T::cpu_storage_data(a)?;
        a.iter_mut().zip(T::cpu_storage_as_slice(b)?).for_each(|(x, &y)| *x += y);
        Tensor::from_vec(a, shape, dev)
    }
    let shape = (p.dim(0)?, q.dim(1)?);
    let (Some(a), Some(b)) = (mm(p, q)?, mm(r, s)?) else { return Ok(None) };
    match (&a, &b) {
        (CpuStorage::F32(_), CpuStorage::F32(_)) => add::<f32>(a, &b, shape, p.device()).map(Some),
        (CpuStorage::F64(_), CpuStorage::F64(_)) => add::<f64>(a, &b, shape, p.device()).map(Some),
        _ => Ok(None),
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
        Storage::Cpu(c) if l.is_contiguous() => Ok(&T::cpu_storage_as_slice(c)?[l.start_offset()..][..n]),
        _ => candle_core::bail!("{op}: needs contiguous CPU tensors"),
    }
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
    assert!(dst.len() >= rows * cols && lhs.len() >= rows * inner);
    assert!(rhs.len() > (inner.max(1) - 1) * rhs_rs + (cols.max(1) - 1) * rhs_cs);
    let threads = candle_core::utils::get_num_threads();
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
            cols as isize,
            false,
            lhs.as_ptr(),
            1,
            inner as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::from_f64(0.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            par,
        );
    }
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
        cpu_of(output_storage(|| (self.fwd)(&self.input)), self.name)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _s: &candle_core::CudaStorage, _l: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        cuda_of(output_storage(|| (self.fwd)(&self.input)), self.name)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some((self.bwd)(&self.input, &grad.detach())?))
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
/// candle's own formula for silu (bit-identical forward); elsewhere they run tensor ops.
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
}

impl Real for f32 {
    fn exp(self) -> f32 {
        f32::exp(self)
    }
    fn tanh(self) -> f32 {
        f32::tanh(self)
    }
}

impl Real for f64 {
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn tanh(self) -> f64 {
        f64::tanh(self)
    }
}

/// candle's silu, `v / (1 + e^(−v))`, and σ(v).
fn silu_sigmoid<T: Real>(v: T) -> (T, T) {
    let one = T::from_f64(1.0);
    let e = one + (T::from_f64(0.0) - v).exp();
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
        let out = match g {
            CpuStorage::F32(_) if gl.is_contiguous() && ul.is_contiguous() => self.cpu_forward::<f32>(g, gl, u, ul)?,
            CpuStorage::F64(_) if gl.is_contiguous() && ul.is_contiguous() => self.cpu_forward::<f64>(g, gl, u, ul)?,
            _ => return cpu_of(output_storage(|| self.forward()), "swiglu"),
        };
        Ok((out, gl.shape().clone()))
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
        let dy = grad.detach();
        let (dg, du) = match (dy.device().is_cpu(), dy.dtype()) {
            (true, DType::F32) => self.cpu_backward::<f32>(&dy)?,
            (true, DType::F64) => self.cpu_backward::<f64>(&dy)?,
            _ => self.tensor_backward(&dy)?,
        };
        Ok((Some(dg), Some(du)))
    }
}

/// [`rope`] as one node: the backward is the inverse rotation (the same rope with `−sin`).
pub fn rope_fused(x: &Tensor, cos: &Tensor, sin: &Tensor, neox: bool) -> CResult<Tensor> {
    let (cf, sf, cb, sb) = (cos.clone(), sin.clone(), cos.clone(), sin.neg()?);
    fused1(x, "rope", Box::new(move |x| rope(x, &cf, &sf, neox)), Box::new(move |_, g| rope(g, &cb, &sb, neox)))
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

    /// Attention probabilities of one sequence on the CPU: `q·kᵀ` per KV head by gemm into one
    /// buffer, then per row one kernel for `softmax(s·scale + mask)` in place — the same
    /// arithmetic in the same order as the tensor ops (bit-identical in f64), without their five
    /// intermediate [heads × t × t] tensors. Masked (−∞) entries skip the exponential.
    fn cpu_probs<T: Real>(&self, q: &Tensor, k: &Tensor, mask: &Tensor) -> CResult<Tensor> {
        let ((nkv, gt, hd), (_, t, _)) = (q.dims3()?, k.dims3()?);
        let ((qs, ql), (ks, kl), (ms, ml)) =
            (q.storage_and_layout(), k.storage_and_layout(), mask.storage_and_layout());
        let qv = cpu_elems::<T>(&qs, ql, nkv * gt * hd, "attention")?;
        let kv = cpu_elems::<T>(&ks, kl, nkv * t * hd, "attention")?;
        let mv = cpu_elems::<T>(&ms, ml, t * t, "attention mask")?;
        let mut p = vec![T::from_f64(0.0); nkv * gt * t];
        for h in 0..nkv {
            let (qh, kh) = (&qv[h * gt * hd..(h + 1) * gt * hd], &kv[h * t * hd..(h + 1) * t * hd]);
            gemm_into(&mut p[h * gt * t..(h + 1) * gt * t], gt, t, hd, qh, kh, 1, hd);
        }
        let (scale, zero) = (T::from_f64(self.scale), T::from_f64(0.0));
        par_rows::<_, ()>(&mut p, t, |first, rows| {
            for (r, row) in rows.chunks_exact_mut(t).enumerate() {
                let m = &mv[((first + r) % t) * t..][..t];
                let mut max = T::from_f64(f64::NEG_INFINITY);
                for (z, &m) in row.iter_mut().zip(m) {
                    *z = (*z * scale + zero) + m;
                    if *z > max {
                        max = *z;
                    }
                }
                let mut sum = zero;
                for z in row.iter_mut() {
                    *z = if z.to_f64() == f64::NEG_INFINITY { zero } else { (*z - max).exp() };
                    sum += *z;
                }
                row.iter_mut().for_each(|z| *z /= sum);
            }
            Vec::new()
        });
        Tensor::from_vec(p, (nkv, gt, t), q.device())
    }

    /// `ds = p ⊙ (dp − Σ_j dp·p)·scale` for one sequence on the CPU, `dp = g·vᵀ` by gemm into
    /// the buffer that becomes ds: one pass per row instead of four tensor ops.
    fn cpu_dscores<T: Real>(&self, p: &Tensor, g: &Tensor, v: &Tensor) -> CResult<Tensor> {
        let ((nkv, gt, t), (_, _, hd)) = (p.dims3()?, v.dims3()?);
        let ((ps, pl), (gs, gl), (vs, vl)) = (p.storage_and_layout(), g.storage_and_layout(), v.storage_and_layout());
        let pv = cpu_elems::<T>(&ps, pl, nkv * gt * t, "attention backward")?;
        let gv = cpu_elems::<T>(&gs, gl, nkv * gt * hd, "attention backward")?;
        let vv = cpu_elems::<T>(&vs, vl, nkv * t * hd, "attention backward")?;
        let mut ds = vec![T::from_f64(0.0); nkv * gt * t];
        for h in 0..nkv {
            let (gh, vh) = (&gv[h * gt * hd..(h + 1) * gt * hd], &vv[h * t * hd..(h + 1) * t * hd]);
            gemm_into(&mut ds[h * gt * t..(h + 1) * gt * t], gt, t, hd, gh, vh, 1, hd);
        }
        let scale = T::from_f64(self.scale);
        par_rows::<_, ()>(&mut ds, t, |first, rows| {
            for (r, row) in rows.chunks_exact_mut(t).enumerate() {
                let pr = &pv[(first + r) * t..][..t];
                let dot = row.iter().zip(pr).fold(T::from_f64(0.0), |a, (&d, &p)| a + d * p);
                row.iter_mut().zip(pr).for_each(|(d, &p)| *d = p * (*d - dot) * scale);
            }
            Vec::new()
        });
        Tensor::from_vec(ds, (nkv, gt, t), p.device())
    }

    fn forward(&self) -> CResult<Tensor> {
        self.forward_with(|this, q, k, mask| {
            let g = this.group();
            let (nkv, t) = (k.dim(0)?, k.dim(1)?);
            let scores = (q.matmul(&k.t()?)? * this.scale)?;
            let scores = scores.reshape((nkv, g, t, t))?.broadcast_add(mask)?.reshape((nkv, g * t, t))?;
            softmax_last(&scores)
        })
    }

    /// The forward with `probs(self, q, k, mask)` giving one sequence's attention
    /// probabilities (kv_heads, group·t, t) from its grouped queries and its keys.
    fn forward_with(&self, probs_of: impl Fn(&Self, &Tensor, &Tensor, &Tensor) -> CResult<Tensor>) -> CResult<Tensor> {
        let seg = |x: &Tensor, s: usize, t: usize| x.narrow(1, s, t)?.contiguous();
        let mut outs = Vec::with_capacity(self.masks.len());
        let mut probs = Vec::with_capacity(self.masks.len());
        for (s, t, mask) in self.segments() {
            let (q, k, v) = (self.grouped(&self.q, s, t)?, seg(&self.k, s, t)?, seg(&self.v, s, t)?);
            let p = probs_of(self, &q, &k, mask)?;
            outs.push(self.ungrouped(&p.matmul(&v)?, t)?);
            probs.push(p);
        }
        *self.probs.lock().expect("attention probabilities poisoned") = Some(probs);
        cat_positions(outs)
    }
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
            DType::F32 => self.forward_with(Attention::cpu_probs::<f32>),
            DType::F64 => self.forward_with(Attention::cpu_probs::<f64>),
            _ => self.forward(),
        };
        cpu_of(output_storage(forward), "attention")
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
        let probs = match self.probs.lock().expect("attention probabilities poisoned").clone() {
            Some(p) => p,
            None => candle_core::bail!("attention: backward before forward"),
        };
        let seg = |x: &Tensor, s: usize, t: usize| x.narrow(1, s, t)?.contiguous();
        let g_all = grad.detach();
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        for ((s, t, _), p) in self.segments().zip(&probs) {
            let (q, k, v) = (self.grouped(&self.q, s, t)?, seg(&self.k, s, t)?, seg(&self.v, s, t)?);
            let g = self.grouped(&g_all, s, t)?;
            dvs.push(p.t()?.matmul(&g)?);
            // ds carries the scale on the CPU path (scaled once instead of dq and dk).
            let (ds, scale) = match (g.device().is_cpu(), g.dtype()) {
                (true, DType::F32) => (self.cpu_dscores::<f32>(p, &g, &v)?, 1.0),
                (true, DType::F64) => (self.cpu_dscores::<f64>(p, &g, &v)?, 1.0),
                _ => {
                    let dp = g.matmul(&v.t()?)?;
                    ((p * dp.broadcast_sub(&(&dp * p)?.sum_keepdim(D::Minus1)?)?)?, self.scale)
                }
            };
            let (dq, dk) = (ds.matmul(&k)?, ds.t()?.matmul(&q)?);
            let (dq, dk) = if scale == 1.0 { (dq, dk) } else { ((dq * scale)?, (dk * scale)?) };
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
