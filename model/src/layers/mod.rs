//! The layers of the FPDT model, one file each with forward and backward
//! side by side (the llm.c way), written once against the runtime API so the
//! same schedule runs on the cpu device (host kernels over the CPU twins)
//! and on the meta device (sizes and costs only).
//!
//! Storage is f32 here (the exact path of the equality tests); accumulation
//! is f32 everywhere.

pub mod attention;
pub mod block;
pub mod embedding;
pub mod loss;
pub mod mlp;
pub mod norm;

use fpdt_comm::Communicator;
use fpdt_ptx::cpu::{matmul, MatmulSpec, Transpose};
use fpdt_ptx::PtxError;
use fpdt_runtime::{
    ChunkMover, Device, DeviceBuffer, HostChunk, Pending, Resident, Stream, View, Work,
};

use crate::config::{ModelConfig, ParamLayout, Schedule};
use crate::error::{ModelError, Result};

/// Bytes of one f32.
pub(crate) const F32: usize = 4;

/// What every layer of one rank works with.
pub(crate) struct Ctx<'a> {
    pub cfg: &'a ModelConfig,
    pub layout: &'a ParamLayout,
    pub sched: &'a Schedule,
    pub dev: &'a Device,
    pub mover: &'a ChunkMover,
    pub comm: &'a dyn Communicator,
    /// Working weights, the flat layout (f32).
    pub params: &'a DeviceBuffer,
    /// Gradients, the flat layout (f32, accumulated).
    pub grads: &'a DeviceBuffer,
}

impl Ctx<'_> {
    /// The compute stream.
    pub fn s(&self) -> &Stream {
        self.mover.compute()
    }

    /// Parameters in `r` (elements of the flat layout).
    pub fn p(&self, r: &std::ops::Range<usize>) -> Result<View<'_>> {
        Ok(self.params.elems::<f32>(r.clone())?)
    }

    /// Gradients in `r`.
    pub fn g(&self, r: &std::ops::Range<usize>) -> Result<View<'_>> {
        Ok(self.grads.elems::<f32>(r.clone())?)
    }

    /// A device buffer of `n` f32.
    pub fn alloc(&self, n: usize, tag: &'static str) -> Result<DeviceBuffer> {
        Ok(self.dev.alloc(n * F32, tag)?)
    }

    /// A device buffer of `n` f32 set to zero.
    pub fn zeros(&self, n: usize, tag: &'static str) -> Result<DeviceBuffer> {
        let b = self.alloc(n, tag)?;
        fill(self.s(), b.view(), 0.0)?;
        Ok(b)
    }

    /// Keeps `buf` for later: offloaded to the host arena when the schedule
    /// offloads, else resident.
    pub fn stash(&self, buf: DeviceBuffer) -> Result<Stash> {
        Stash::keep(buf, self.sched.offload, self.mover)
    }
}

/// Runs `f` as a kernel on `s` over f32 views (ids and labels travel as
/// bit-cast u32/i32 in f32 slices). On meta only its cost is recorded.
pub(crate) fn kernel<F>(
    s: &Stream,
    name: &'static str,
    flops: f64,
    reads: &[View<'_>],
    writes: &[View<'_>],
    f: F,
) -> Result<()>
where
    F: FnOnce(&[&[f32]], &mut [&mut [f32]]) -> std::result::Result<(), PtxError> + Send + 'static,
{
    let bytes = reads.iter().chain(writes).map(|v| v.len() as u64).sum();
    s.launch_host(
        name,
        Work::kernel(flops, bytes),
        reads,
        writes,
        Box::new(move |ins, outs| {
            let ins = ins
                .iter()
                .map(|b| bytemuck::try_cast_slice::<u8, f32>(b))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| format!("{name}: input is not f32-aligned: {e:?}"))?;
            let mut outs = outs
                .iter_mut()
                .map(|b| bytemuck::try_cast_slice_mut::<u8, f32>(b))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| format!("{name}: output is not f32-aligned: {e:?}"))?;
            f(&ins, &mut outs).map_err(|e| e.to_string())
        }),
    )?;
    Ok(())
}

/// Sets every element of `v` to `x`.
pub(crate) fn fill(s: &Stream, v: View<'_>, x: f32) -> Result<()> {
    kernel(s, "fill", 0.0, &[], &[v], move |_, o| {
        o[0].iter_mut().for_each(|y| *y = x);
        Ok(())
    })
}

/// `y = x + r` element-wise (the residual add).
pub(crate) fn residual(s: &Stream, x: View<'_>, r: View<'_>, y: View<'_>) -> Result<()> {
    let n = x.len_of::<f32>() as f64;
    kernel(s, "residual", n, &[x, r], &[y], |i, o| {
        fpdt_ptx::cpu::residual_add(i[0], i[1], o[0])
    })
}

/// `y[t, out] = x[t, inp] W[out, inp]^T (+ b)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_fwd(
    s: &Stream,
    x: View<'_>,
    w: View<'_>,
    b: Option<View<'_>>,
    y: View<'_>,
    t: usize,
    inp: usize,
    out: usize,
) -> Result<()> {
    let spec = MatmulSpec {
        m: t,
        n: out,
        k: inp,
        trans_a: Transpose::No,
        trans_b: Transpose::Yes,
        accumulate: false,
    };
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
    s: &Stream,
    dy: View<'_>,
    x: View<'_>,
    w: View<'_>,
    dx: Option<(View<'_>, bool)>,
    dw: View<'_>,
    db: Option<View<'_>>,
    t: usize,
    inp: usize,
    out: usize,
) -> Result<()> {
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
        matmul(
            &MatmulSpec {
                m: out,
                n: inp,
                k: t,
                trans_a: Transpose::Yes,
                trans_b: Transpose::No,
                accumulate: true,
            },
            dy,
            x,
            None,
            &mut *dw[0],
        )?;
        let mut k = 0;
        if has_db {
            for row in dy.chunks(out) {
                for (a, b) in rest[0].iter_mut().zip(row) {
                    *a += b;
                }
            }
            k = 1;
        }
        if has_dx {
            matmul(
                &MatmulSpec {
                    m: t,
                    n: inp,
                    k: out,
                    trans_a: Transpose::No,
                    trans_b: Transpose::No,
                    accumulate: dx_acc,
                },
                dy,
                w,
                None,
                &mut *rest[k],
            )?;
        }
        Ok(())
    })
}

/// A chunk tensor kept for later: resident, or offloaded to the host arena.
pub(crate) enum Stash {
    /// On the device.
    Dev(DeviceBuffer),
    /// In the host arena.
    Host(HostChunk),
}

/// A stash on its way back: already there, or being prefetched.
pub(crate) enum Incoming<'a> {
    Here(&'a DeviceBuffer),
    Coming(Pending),
}

/// A stash on the device, ready for the compute stream.
pub(crate) enum Held<'a> {
    Here(&'a DeviceBuffer),
    Own(Resident),
}

impl Held<'_> {
    pub fn view(&self) -> Result<View<'_>> {
        match self {
            Held::Here(b) => Ok(b.view()),
            Held::Own(r) => Ok(r.view()?),
        }
    }
}

impl<'a> Incoming<'a> {
    pub fn ready(self, mover: &ChunkMover) -> Result<Held<'a>> {
        Ok(match self {
            Incoming::Here(b) => Held::Here(b),
            Incoming::Coming(p) => Held::Own(p.ready(mover.compute())?),
        })
    }
}

impl Stash {
    pub fn keep(buf: DeviceBuffer, offload: bool, mover: &ChunkMover) -> Result<Stash> {
        Ok(if offload {
            Stash::Host(mover.offload(Resident::new(buf))?)
        } else {
            Stash::Dev(buf)
        })
    }

    /// Starts bringing the chunk to the device (a prefetch on the h2d stream
    /// when it is on the host).
    pub fn start<'a>(&'a self, mover: &ChunkMover) -> Result<Incoming<'a>> {
        Ok(match self {
            Stash::Dev(b) => Incoming::Here(b),
            Stash::Host(h) => Incoming::Coming(mover.prefetch(h)?),
        })
    }

    /// Brings the chunk to the device now.
    pub fn fetch<'a>(&'a self, mover: &ChunkMover) -> Result<Held<'a>> {
        self.start(mover)?.ready(mover)
    }

    /// Moves the chunk to the device and out of the stash (to be updated).
    pub fn take(self, mover: &ChunkMover) -> Result<DeviceBuffer> {
        match self {
            Stash::Dev(b) => Ok(b),
            Stash::Host(h) => Ok(mover.prefetch(&h)?.ready(mover.compute())?.into_buffer()?),
        }
    }
}

/// The error of a missing saved tensor (a schedule bug, reported not panicked).
pub(crate) fn missing(what: &str, i: usize) -> ModelError {
    ModelError::Shape(format!("saved tensor {what} of chunk {i} is missing"))
}
