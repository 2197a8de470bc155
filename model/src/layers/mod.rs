//! The layers of the FPDT model, one file each with forward and backward
//! side by side (the llm.c way), written once against the runtime API so the
//! same schedule runs on the cpu device (host kernels over the CPU twins)
//! and on the meta device (sizes and costs only).
//!
//! Storage is f32 on the exact path and bf16 on the mixed-precision one
//! (`Schedule.precision`): working weights and activations in the storage
//! dtype; attention's output and LSE accumulators, dq/dk/dv, norm
//! statistics, logits, the loss and every parameter gradient in f32.
//! Accumulation is f32 everywhere: the host kernels widen their inputs to
//! f32 and round their outputs to each output's dtype.
//!
//! What a GPU kernel would keep in registers is rounded once, not once per
//! step: element-wise epilogues are fused into their GEMM (the residual add
//! into the output projections, RoPE into the q and k projections, GeLU /
//! SwiGLU into the up projections) and the input gradient of projections
//! sharing an input (Q, K, V; gate and up) is one f32 sum. Everything that
//! is stored, offloaded or sent between ranks stays in the storage dtype.

pub mod attention;
pub mod block;
pub mod embedding;
pub mod loss;
pub mod mlp;
pub mod norm;

use fpdt_comm::Communicator;
use fpdt_ptx::cpu::{matmul, narrow_bytes, widen_bytes, DType, MatmulSpec, Transpose};
use fpdt_ptx::PtxError;
use fpdt_runtime::{
    cuda::Blas, ChunkMover, Device, DeviceBuffer, HostChunk, Pending, Resident, Stream, View, Work,
};

use crate::config::{ModelConfig, ParamLayout, Schedule};
use crate::error::{ModelError, Result};

/// Bytes of one f32.
pub(crate) const F32: usize = 4;

/// A device view with the dtype of its elements.
#[derive(Clone, Copy)]
pub(crate) struct Tv<'a> {
    pub v: View<'a>,
    pub dt: DType,
}

impl<'a> Tv<'a> {
    /// An f32 view.
    pub fn f32(v: View<'a>) -> Tv<'a> {
        Tv { v, dt: DType::F32 }
    }

    /// The device address of the view (a PTX kernel argument).
    pub fn addr(&self) -> u64 {
        self.v.addr() as u64
    }

    /// Elements in the view.
    pub fn len(&self) -> usize {
        self.v.len() / self.dt.size()
    }

    /// Elements `r` of the view.
    pub fn elems(&self, r: std::ops::Range<usize>) -> Result<Tv<'a>> {
        let s = self.dt.size();
        Ok(Tv {
            v: self.v.bytes(r.start * s..r.end * s)?,
            dt: self.dt,
        })
    }

    /// Rows `[a, b)` of a `[rows, width]` view.
    pub fn rows(&self, width: usize, a: usize, b: usize) -> Result<Tv<'a>> {
        self.elems(a * width..b * width)
    }
}

/// A device buffer with the dtype of its elements.
pub(crate) struct Buf {
    pub buf: DeviceBuffer,
    pub dt: DType,
}

impl Buf {
    /// The whole buffer.
    pub fn view(&self) -> Tv<'_> {
        Tv {
            v: self.buf.view(),
            dt: self.dt,
        }
    }

    /// Elements `r` of the buffer.
    pub fn elems(&self, r: std::ops::Range<usize>) -> Result<Tv<'_>> {
        self.view().elems(r)
    }
}

/// The GEMM engine of the GPU path: the device's cuBLASLt on cuda; `None`
/// inside on the meta device modelling that path (each GEMM costed, the
/// same allocations around it).
#[derive(Clone, Copy)]
pub(crate) struct Gemms<'a>(pub Option<&'a Blas>);

/// What every layer of one rank works with.
pub(crate) struct Ctx<'a> {
    pub cfg: &'a ModelConfig,
    pub layout: &'a ParamLayout,
    pub sched: &'a Schedule,
    pub dev: &'a Device,
    pub mover: &'a ChunkMover,
    pub comm: &'a dyn Communicator,
    /// Working weights, the flat layout (in `wdt`).
    pub params: &'a DeviceBuffer,
    /// Storage dtype of the working weights.
    pub wdt: DType,
    /// Storage dtype of activations.
    pub adt: DType,
    /// Storage dtype of the gradients of activations (what backward
    /// stashes and moves between layers and ranks).
    pub gdt: DType,
    /// Gradients, the flat layout (f32, accumulated).
    pub grads: &'a DeviceBuffer,
    /// Launch the PTX kernel of an op where it has one (on cuda, unless
    /// host kernels were asked for); else the op's host kernel.
    pub gpu: bool,
    /// Where the linear layers' GEMMs run when `gpu` (bf16 operands): the
    /// device's cuBLASLt on cuda, costed as the same GEMM on meta; None:
    /// host kernels.
    pub gemms: Option<Gemms<'a>>,
    /// On cuda: the positions `0..seq_len` (u32) on the device, for RoPE.
    pub positions: Option<&'a DeviceBuffer>,
}

impl Ctx<'_> {
    /// The compute stream.
    pub fn s(&self) -> &Stream {
        self.mover.compute()
    }

    /// Parameters in `r` (elements of the flat layout).
    pub fn p(&self, r: &std::ops::Range<usize>) -> Result<Tv<'_>> {
        let s = self.wdt.size();
        Ok(Tv {
            v: self.params.bytes(r.start * s..r.end * s)?,
            dt: self.wdt,
        })
    }

    /// Gradients in `r` (f32).
    pub fn g(&self, r: &std::ops::Range<usize>) -> Result<Tv<'_>> {
        Ok(Tv::f32(self.grads.elems::<f32>(r.clone())?))
    }

    /// A device buffer of `n` f32.
    pub fn alloc(&self, n: usize, tag: &'static str) -> Result<Buf> {
        self.alloc_as(n, DType::F32, tag)
    }

    /// A device buffer of `n` activations (the storage dtype).
    pub fn alloc_act(&self, n: usize, tag: &'static str) -> Result<Buf> {
        self.alloc_as(n, self.adt, tag)
    }

    /// A device buffer of `n` activation gradients.
    pub fn alloc_grad(&self, n: usize, tag: &'static str) -> Result<Buf> {
        self.alloc_as(n, self.gdt, tag)
    }

    /// A device buffer of `n` elements of `dt`.
    pub fn alloc_as(&self, n: usize, dt: DType, tag: &'static str) -> Result<Buf> {
        Ok(Buf {
            buf: self.dev.alloc(n * dt.size(), tag)?,
            dt,
        })
    }

    /// A device buffer of `n` f32 set to zero.
    pub fn zeros(&self, n: usize, tag: &'static str) -> Result<Buf> {
        let b = self.alloc(n, tag)?;
        fill(self.s(), b.view(), 0.0)?;
        Ok(b)
    }

    /// `src` in the activation dtype: `None` when it already is (use `src`
    /// itself), else a new buffer tagged `tag` holding its rounded copy.
    pub fn narrowed(&self, src: Tv<'_>, tag: &'static str) -> Result<Option<Buf>> {
        self.narrowed_to(src, self.adt, tag)
    }

    /// `src` in `dt`: `None` when it already is, else a rounded copy.
    pub fn narrowed_to(&self, src: Tv<'_>, dt: DType, tag: &'static str) -> Result<Option<Buf>> {
        if src.dt == dt {
            return Ok(None);
        }
        let b = self.alloc_as(src.len(), dt, tag)?;
        if self.gpu {
            cast_on_gpu(self.s(), src, b.view())?;
        } else {
            copy(self.s(), src, b.view())?;
        }
        Ok(Some(b))
    }

    /// Keeps `buf` for later: offloaded to the host arena when the schedule
    /// offloads, else resident.
    pub fn stash(&self, buf: Buf) -> Result<Stash> {
        Stash::keep(buf, self.sched.offload, self.mover)
    }
}

/// A kernel output: the f32 bytes themselves, or an f32 copy rounded back
/// to the output's dtype after the kernel ran.
enum OutSlot<'b> {
    Direct(&'b mut [f32]),
    Widened(Vec<f32>, &'b mut [u8], DType),
}

/// Runs `f` as a kernel on `s` over f32 slices: f32 views are passed as
/// they are, bf16 inputs widened, bf16 outputs widened and rounded back
/// afterwards (ids and labels travel as bit-cast u32/i32 in f32 views). On
/// meta only its cost is recorded.
pub(crate) fn kernel<F>(
    s: &Stream,
    name: &'static str,
    flops: f64,
    reads: &[Tv<'_>],
    writes: &[Tv<'_>],
    f: F,
) -> Result<()>
where
    F: FnOnce(&[&[f32]], &mut [&mut [f32]]) -> std::result::Result<(), PtxError> + Send + 'static,
{
    let bytes = reads.iter().chain(writes).map(|t| t.v.len() as u64).sum();
    let rdt: Vec<DType> = reads.iter().map(|t| t.dt).collect();
    let wdt: Vec<DType> = writes.iter().map(|t| t.dt).collect();
    let rv: Vec<View<'_>> = reads.iter().map(|t| t.v).collect();
    let wv: Vec<View<'_>> = writes.iter().map(|t| t.v).collect();
    s.launch_host(
        name,
        Work::kernel(flops, bytes),
        &rv,
        &wv,
        Box::new(move |ins, outs| {
            let widened = ins
                .iter()
                .zip(&rdt)
                .map(|(b, &dt)| match dt {
                    DType::F32 => bytemuck::try_cast_slice::<u8, f32>(b)
                        .map(std::borrow::Cow::Borrowed)
                        .map_err(|e| format!("{name}: input is not f32-aligned: {e:?}")),
                    _ => widen_bytes(b, dt)
                        .map(std::borrow::Cow::Owned)
                        .map_err(|e| e.to_string()),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let ins: Vec<&[f32]> = widened.iter().map(|c| &c[..]).collect();
            let mut slots = outs
                .iter_mut()
                .zip(&wdt)
                .map(|(b, &dt)| match dt {
                    DType::F32 => bytemuck::try_cast_slice_mut::<u8, f32>(b)
                        .map(OutSlot::Direct)
                        .map_err(|e| format!("{name}: output is not f32-aligned: {e:?}")),
                    _ => widen_bytes(b, dt)
                        .map(|w| OutSlot::Widened(w, b, dt))
                        .map_err(|e| e.to_string()),
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            {
                let mut outs: Vec<&mut [f32]> = slots
                    .iter_mut()
                    .map(|o| match o {
                        OutSlot::Direct(d) => &mut **d,
                        OutSlot::Widened(w, _, _) => &mut w[..],
                    })
                    .collect();
                f(&ins, &mut outs).map_err(|e| e.to_string())?;
            }
            for o in slots {
                if let OutSlot::Widened(w, b, dt) = o {
                    narrow_bytes(&w, dt, b).map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        }),
    )?;
    Ok(())
}

/// `dst = src` element-wise, rounded to `dst`'s dtype.
pub(crate) fn copy(s: &Stream, src: Tv<'_>, dst: Tv<'_>) -> Result<()> {
    // Same dtype on a GPU: a device copy, not a host kernel.
    if src.dt == dst.dt && s.device_kind() == fpdt_runtime::DeviceKind::Cuda {
        return Ok(s.copy(src.v, dst.v)?);
    }
    kernel(s, "copy", 0.0, &[src], &[dst], |i, o| {
        fpdt_ptx::cpu::cast(i[0], o[0])
    })
}

/// `dst = src` converted from f32 to `dst`'s dtype by the cast kernel.
pub(crate) fn cast_on_gpu(s: &Stream, src: Tv<'_>, dst: Tv<'_>) -> Result<()> {
    let l = fpdt_ptx::kernels::cast(dst.len(), src.dt, dst.dt, dst.addr(), src.addr())?;
    ptx_launch(s, &l, 0.0, &[src.v], &[dst.v])
}

/// Enqueues the PTX launch `l` on `s`, its trace counting each view's
/// bytes once (read or written).
pub(crate) fn ptx_launch(
    s: &Stream,
    l: &fpdt_ptx::KernelLaunch,
    flops: f64,
    reads: &[View<'_>],
    writes: &[View<'_>],
) -> Result<()> {
    let bytes = reads.iter().chain(writes).map(|v| v.len() as u64).sum();
    l.enqueue(s, Work::kernel(flops, bytes), reads, writes)?;
    Ok(())
}

/// Sets every element of `v` to `x`.
pub(crate) fn fill(s: &Stream, v: Tv<'_>, x: f32) -> Result<()> {
    // On a GPU: the fill kernel (the same bits as the host's f32 fill
    // rounded to v's dtype), not a host kernel staging v.
    if s.device_kind() == fpdt_runtime::DeviceKind::Cuda {
        let l = fpdt_ptx::kernels::fill(v.len(), v.dt, v.addr(), x)?;
        return ptx_launch(s, &l, 0.0, &[], &[v.v]);
    }
    kernel(s, "fill", 0.0, &[], &[v], move |_, o| {
        o[0].iter_mut().for_each(|y| *y = x);
        Ok(())
    })
}

/// The cuBLASLt to run a GEMM with on the GPU: when the context has one,
/// the operands `ab` are bf16 and the output (and the bias, in the
/// output's type, as cuBLASLt's epilogue reads it) bf16 or f32. None: the
/// host kernel runs (the cpu device, f32 runs, forced host kernels).
pub(crate) fn gemm_blas<'a>(
    ctx: &Ctx<'a>,
    ab: &[Tv<'_>],
    d: Tv<'_>,
    bias: Option<&Tv<'_>>,
) -> Option<Gemms<'a>> {
    let blas = ctx.gemms.filter(|_| ctx.gpu)?;
    let ok = ab.iter().all(|t| t.dt == DType::BF16)
        && matches!(d.dt, DType::BF16 | DType::F32)
        && bias.is_none_or(|b| b.dt == d.dt);
    ok.then_some(blas)
}

/// The bias of a GEMM into an f32 output (cuBLASLt's epilogue reads it in
/// the output's type): `None` when `b` is absent or f32 already (use `b`),
/// else its f32 copy, widened on the GPU (`out` elements: cheap).
pub(crate) fn f32_bias(ctx: &Ctx<'_>, b: Option<Tv<'_>>) -> Result<Option<Buf>> {
    match b {
        Some(b) => ctx.narrowed_to(b, DType::F32, "bias f32"),
        None => Ok(None),
    }
}

/// `d (+)= op(a) op(b) (+ bias)` through cuBLASLt on `s`.
pub(crate) fn gemm(
    s: &Stream,
    blas: Gemms<'_>,
    spec: &MatmulSpec,
    a: Tv<'_>,
    b: Tv<'_>,
    bias: Option<Tv<'_>>,
    d: Tv<'_>,
) -> Result<()> {
    fpdt_ptx::matmul::matmul(
        s,
        blas.0,
        spec,
        &fpdt_ptx::matmul::MatmulViews {
            a: a.v,
            b: b.v,
            bias: bias.map(|t| t.v),
            c: d.v,
            input: a.dt,
            output: d.dt,
        },
    )?;
    Ok(())
}

/// The weight gradient of a linear layer, `dW[out, inp] += dy[t, out]^T
/// x[t, inp]`.
fn wgrad_spec(t: usize, inp: usize, out: usize) -> MatmulSpec {
    MatmulSpec {
        m: out,
        n: inp,
        k: t,
        trans_a: Transpose::Yes,
        trans_b: Transpose::No,
        accumulate: true,
    }
}

/// `db += sum_t dy[t, :]` over rows of `width`: a bias gradient.
fn add_column_sums(dy: &[f32], width: usize, db: &mut [f32]) {
    for row in dy.chunks(width) {
        for (a, b) in db.iter_mut().zip(row) {
            *a += b;
        }
    }
}

/// The input gradient of a linear layer, `dy[t, out] W[out, inp]`, onto
/// `dx` or added to it.
fn dgrad_spec(t: usize, inp: usize, out: usize, accumulate: bool) -> MatmulSpec {
    MatmulSpec {
        m: t,
        n: inp,
        k: out,
        trans_a: Transpose::No,
        trans_b: Transpose::No,
        accumulate,
    }
}

/// The product of a linear layer, `x[t, inp] W[out, inp]^T`, onto the
/// output or added to it.
pub(crate) fn linear_spec(t: usize, inp: usize, out: usize, accumulate: bool) -> MatmulSpec {
    MatmulSpec {
        m: t,
        n: out,
        k: inp,
        trans_a: Transpose::No,
        trans_b: Transpose::Yes,
        accumulate,
    }
}

/// `y = r + x W^T (+ b)`: a projection with the residual add fused into
/// its epilogue (the GEMM accumulates onto the residual in f32, as
/// cuBLASLt's `D = A B + C` does), so the block's output is rounded to
/// `y`'s dtype once and the projection's own output is never stored.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_residual_fwd(
    ctx: &Ctx<'_>,
    x: Tv<'_>,
    w: Tv<'_>,
    b: Option<Tv<'_>>,
    r: Tv<'_>,
    y: Tv<'_>,
    t: usize,
    inp: usize,
    out: usize,
) -> Result<()> {
    let s = ctx.s();
    let spec = linear_spec(t, inp, out, true);
    if let Some(blas) = gemm_blas(ctx, &[x, w], y, b.as_ref()).filter(|_| r.dt == y.dt) {
        // D = r, then D += x W^T (+ b): rounded to y's dtype once.
        s.copy(r.v, y.v)?;
        return gemm(s, blas, &spec, x, w, b, y);
    }
    let flops = 2.0 * (t * inp * out) as f64 + (t * out) as f64;
    let mut reads = vec![x, w, r];
    let has_b = b.is_some();
    reads.extend(b);
    kernel(
        s,
        "linear_residual_fwd",
        flops,
        &reads,
        &[y],
        move |i, o| {
            // The output slot is f32 here (bf16 outputs are widened by
            // `kernel` and rounded once after this closure).
            fpdt_ptx::cpu::cast(i[2], o[0])?;
            matmul(&spec, i[0], i[1], has_b.then(|| i[3]), o[0])
        },
    )
}

/// `y[t, out] = x[t, inp] W[out, inp]^T (+ b)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_fwd(
    ctx: &Ctx<'_>,
    x: Tv<'_>,
    w: Tv<'_>,
    b: Option<Tv<'_>>,
    y: Tv<'_>,
    t: usize,
    inp: usize,
    out: usize,
) -> Result<()> {
    let s = ctx.s();
    let spec = linear_spec(t, inp, out, false);
    if let Some(blas) = gemm_blas(ctx, &[x, w], y, b.as_ref()) {
        return gemm(s, blas, &spec, x, w, b, y);
    }
    let flops = 2.0 * (t * inp * out) as f64;
    let mut reads = vec![x, w];
    let has_b = b.is_some();
    reads.extend(b);
    kernel(s, "linear_fwd", flops, &reads, &[y], move |i, o| {
        matmul(&spec, i[0], i[1], has_b.then(|| i[2]), o[0])
    })
}

/// Backward of [`linear_fwd`]: `dx (+)= dy W`, `dW += dy^T x`, `db += sum_t dy`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_bwd(
    ctx: &Ctx<'_>,
    dy: Tv<'_>,
    x: Tv<'_>,
    w: Tv<'_>,
    dx: Option<(Tv<'_>, bool)>,
    dw: Tv<'_>,
    db: Option<Tv<'_>>,
    t: usize,
    inp: usize,
    out: usize,
) -> Result<()> {
    let s = ctx.s();
    // An f32 dy (the logits' gradient) is rounded to bf16 for cuBLASLt, as
    // the activations' gradients are in a bf16 run.
    let as_bf16 = Tv {
        dt: DType::BF16,
        ..dy
    };
    let on_gpu = gemm_blas(ctx, &[as_bf16, x], dw, None).filter(|_| {
        dx.as_ref()
            .is_none_or(|d| gemm_blas(ctx, &[as_bf16, w], d.0, None).is_some())
    });
    if let Some(blas) = on_gpu {
        let dy16 = match dy.dt {
            DType::BF16 => None,
            _ => {
                let b = ctx.alloc_as(t * out, DType::BF16, "dy bf16")?;
                cast_on_gpu(s, dy, b.view())?;
                Some(b)
            }
        };
        let g = dy16.as_ref().map_or(dy, |b| b.view());
        gemm(s, blas, &wgrad_spec(t, inp, out), g, x, None, dw)?;
        if let Some(db) = db {
            // The bias gradient (GPT's biases), the column sums of dy: a
            // GEMV against a row of ones, `db[1, out] += ones[1, t] dy[t,
            // out]` (unit leading dimensions nowhere), so dy stays on the
            // device.
            let ones = ctx.alloc_as(t, DType::BF16, "ones")?;
            fill(s, ones.view(), 1.0)?;
            let spec = MatmulSpec {
                m: 1,
                n: out,
                k: t,
                trans_a: Transpose::No,
                trans_b: Transpose::No,
                accumulate: true,
            };
            gemm(s, blas, &spec, ones.view(), g, None, db)?;
        }
        if let Some((dx, acc)) = dx {
            let dx_spec = dgrad_spec(t, inp, out, acc);
            gemm(s, blas, &dx_spec, g, w, None, dx)?;
        }
        return Ok(());
    }
    let flops = 2.0 * (t * inp * out) as f64 * if dx.is_some() { 2.0 } else { 1.0 };
    let dx_acc = dx.as_ref().is_some_and(|d| d.1);
    let has_dx = dx.is_some();
    let has_db = db.is_some();
    let mut writes = vec![dw];
    writes.extend(db);
    writes.extend(dx.map(|d| d.0));
    kernel(s, "linear_bwd", flops, &[dy, x, w], &writes, move |i, o| {
        let (dy, x, w) = (i[0], i[1], i[2]);
        let (dw, rest) = o.split_at_mut(1);
        matmul(&wgrad_spec(t, inp, out), dy, x, None, &mut *dw[0])?;
        let mut k = 0;
        if has_db {
            add_column_sums(dy, out, rest[0]);
            k = 1;
        }
        if has_dx {
            matmul(&dgrad_spec(t, inp, out, dx_acc), dy, w, None, &mut *rest[k])?;
        }
        Ok(())
    })
}

/// `dx = sum_k dy_k W_k` over projections that read the same input (Q, K
/// and V of attention; gate and up of SwiGLU): the input gradient of one
/// fused projection, summed in f32 and rounded to `dx`'s dtype once rather
/// than once per projection. `parts` are `(dy_k [t, out_k], W_k [out_k,
/// inp], out_k)`; the weight gradients are [`linear_bwd`]'s (with `dx`
/// `None`).
pub(crate) fn linear_dgrad_sum(
    ctx: &Ctx<'_>,
    parts: &[(Tv<'_>, Tv<'_>, usize)],
    dx: Tv<'_>,
    t: usize,
    inp: usize,
) -> Result<()> {
    let s = ctx.s();
    let gpu = parts
        .iter()
        .map(|p| gemm_blas(ctx, &[p.0, p.1], Tv::f32(dx.v), None))
        .collect::<Option<Vec<_>>>()
        .and_then(|b| b.first().copied());
    if let Some(blas) = gpu {
        // Summed in f32 and rounded to dx's dtype once, as on the host.
        let acc = if dx.dt == DType::F32 {
            None
        } else {
            Some(ctx.alloc(t * inp, "dgrad sum")?)
        };
        let sum = acc.as_ref().map_or(dx, |a| a.view());
        for (k, &(dy, w, out)) in parts.iter().enumerate() {
            let spec = dgrad_spec(t, inp, out, k > 0);
            gemm(s, blas, &spec, dy, w, None, sum)?;
        }
        if acc.is_some() {
            cast_on_gpu(s, sum, dx)?;
        }
        return Ok(());
    }
    let outs: Vec<usize> = parts.iter().map(|p| p.2).collect();
    let flops = outs.iter().map(|&o| 2.0 * (t * inp * o) as f64).sum();
    let reads: Vec<Tv<'_>> = parts.iter().flat_map(|p| [p.0, p.1]).collect();
    kernel(s, "linear_dgrad_sum", flops, &reads, &[dx], move |i, o| {
        for (k, (&out, pair)) in outs.iter().zip(i.chunks(2)).enumerate() {
            let spec = dgrad_spec(t, inp, out, k > 0);
            matmul(&spec, pair[0], pair[1], None, &mut *o[0])?;
        }
        Ok(())
    })
}

/// A chunk tensor kept for later: resident, or offloaded to the host
/// arena; with the dtype of its elements.
pub(crate) struct Stash {
    place: Place,
    dt: DType,
}

enum Place {
    /// On the device.
    Dev(DeviceBuffer),
    /// In the host arena.
    Host(HostChunk),
}

/// A stash on its way back: already there, or being prefetched.
pub(crate) struct Incoming<'a> {
    place: Coming<'a>,
    dt: DType,
}

enum Coming<'a> {
    Here(&'a DeviceBuffer),
    Prefetch(Pending),
}

/// A stash on the device, ready for the compute stream.
pub(crate) struct Held<'a> {
    place: Here<'a>,
    dt: DType,
}

enum Here<'a> {
    Borrowed(&'a DeviceBuffer),
    Own(Resident),
}

impl Held<'_> {
    pub fn view(&self) -> Result<Tv<'_>> {
        let v = match &self.place {
            Here::Borrowed(b) => b.view(),
            Here::Own(r) => r.view()?,
        };
        Ok(Tv { v, dt: self.dt })
    }
}

impl<'a> Incoming<'a> {
    pub fn ready(self, mover: &ChunkMover) -> Result<Held<'a>> {
        let place = match self.place {
            Coming::Here(b) => Here::Borrowed(b),
            Coming::Prefetch(p) => Here::Own(p.ready(mover.compute())?),
        };
        Ok(Held { place, dt: self.dt })
    }
}

impl Stash {
    pub fn keep(buf: Buf, offload: bool, mover: &ChunkMover) -> Result<Stash> {
        let place = if offload {
            Place::Host(mover.offload(Resident::new(buf.buf))?)
        } else {
            Place::Dev(buf.buf)
        };
        Ok(Stash { place, dt: buf.dt })
    }

    /// The chunk in the host arena, when it was offloaded.
    pub fn host(&self) -> Option<&HostChunk> {
        match &self.place {
            Place::Host(h) => Some(h),
            Place::Dev(_) => None,
        }
    }

    /// Starts bringing the chunk to the device (a prefetch on the h2d stream
    /// when it is on the host).
    pub fn start<'a>(&'a self, mover: &ChunkMover) -> Result<Incoming<'a>> {
        let place = match &self.place {
            Place::Dev(b) => Coming::Here(b),
            Place::Host(h) => Coming::Prefetch(mover.prefetch(h)?),
        };
        Ok(Incoming { place, dt: self.dt })
    }

    /// Brings the chunk to the device now.
    pub fn fetch<'a>(&'a self, mover: &ChunkMover) -> Result<Held<'a>> {
        self.start(mover)?.ready(mover)
    }

    /// Moves the chunk to the device and out of the stash (to be updated).
    pub fn take(self, mover: &ChunkMover) -> Result<Buf> {
        let buf = match self.place {
            Place::Dev(b) => b,
            Place::Host(h) => mover.prefetch(&h)?.ready(mover.compute())?.into_buffer()?,
        };
        Ok(Buf { buf, dt: self.dt })
    }
}

/// The error of a missing saved tensor (a schedule bug, reported not panicked).
pub(crate) fn missing(what: &str, i: usize) -> ModelError {
    ModelError::Shape(format!("saved tensor {what} of chunk {i} is missing"))
}
