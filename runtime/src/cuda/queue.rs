//! A cuda stream: a `CUstream` and the work in flight on it. Each copy and
//! kernel is bracketed by two timing events; when the second has completed
//! the work is retired: its trace event is recorded from the GPU's clock
//! and the memory references it held are dropped, so the blocks may return
//! to the slab. Retiring is lazy (at the next enqueue, a host wait, an
//! allocation that ran out of memory): no thread polls the GPU.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::sys;

use super::driver::{check, Context};
use super::launch::{check_args, check_pointers, check_shape, KernelArg};
use crate::error::{Result, RuntimeError};
use crate::memory::MemRef;
use crate::stream::Work;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A kernel launch as the stream keeps it (owned arguments).
#[derive(Debug, Clone)]
pub(crate) struct OwnedKernel {
    pub(crate) ptx: &'static str,
    pub(crate) entry: String,
    pub(crate) grid: [u32; 3],
    pub(crate) block: [u32; 3],
    pub(crate) shared_bytes: u32,
    pub(crate) args: Vec<KernelArg>,
}

struct InFlight {
    name: Cow<'static, str>,
    work: Work,
    start: sys::CUevent,
    end: sys::CUevent,
    _refs: Vec<MemRef>,
}

/// Work that completed: what the trace records.
pub(crate) struct Retired {
    pub(crate) name: Cow<'static, str>,
    pub(crate) work: Work,
    pub(crate) start_ns: u64,
    pub(crate) end_ns: u64,
}

/// The GPU side of a device: its context and the clock's origin.
pub(crate) struct Gpu {
    pub(crate) ctx: Arc<Context>,
    /// An event recorded when the device was made, and the host's clock
    /// (nanoseconds since the device's epoch) at that moment.
    epoch: sys::CUevent,
    epoch_host_ns: u64,
}

// SAFETY: the event handle is a driver object usable from any thread with
// the context current; it is only read (elapsed times) after creation.
unsafe impl Send for Gpu {}
// SAFETY: as above.
unsafe impl Sync for Gpu {}

impl Gpu {
    /// Records the clock's origin on a fresh stream and waits for it.
    pub(crate) fn new(ctx: Arc<Context>, host_now_ns: impl FnOnce() -> u64) -> Result<Gpu> {
        ctx.bind()?;
        let epoch = ctx.event()?;
        // SAFETY: a valid event; the null stream is the legacy default one.
        check(
            unsafe { sys::cuEventRecord(epoch, std::ptr::null_mut()) },
            || "cuEventRecord (the device's clock origin)".into(),
        )?;
        // SAFETY: a recorded event.
        check(unsafe { sys::cuEventSynchronize(epoch) }, || {
            "cuEventSynchronize (the device's clock origin)".into()
        })?;
        Ok(Gpu {
            ctx,
            epoch,
            epoch_host_ns: host_now_ns(),
        })
    }

    /// When a completed event completed, in nanoseconds on the device's
    /// clock.
    pub(crate) fn time_ns(&self, ev: sys::CUevent) -> Result<u64> {
        Ok(self.epoch_host_ns + self.elapsed_ns(self.epoch, ev)?)
    }

    /// Nanoseconds between two completed events of this context.
    pub(crate) fn elapsed_ns(&self, a: sys::CUevent, b: sys::CUevent) -> Result<u64> {
        let mut ms = 0f32;
        // SAFETY: both events were recorded in this context and completed.
        check(unsafe { sys::cuEventElapsedTime(&mut ms, a, b) }, || {
            "cuEventElapsedTime".into()
        })?;
        Ok((f64::from(ms.max(0.0)) * 1e6) as u64)
    }

    /// Whether a recorded event has completed; an error is an asynchronous
    /// failure of the work before it (a kernel's illegal access).
    pub(crate) fn query(&self, ev: sys::CUevent, what: &str) -> Result<bool> {
        self.ctx.bind()?;
        // SAFETY: a valid, recorded event.
        let r = unsafe { sys::cuEventQuery(ev) };
        match r {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            other => {
                check(other, || format!("cuEventQuery ({what})"))?;
                Ok(true)
            }
        }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        self.ctx.recycle(self.epoch);
    }
}

/// A `CUstream` and its work in flight.
pub(crate) struct CudaQueue {
    pub(crate) gpu: Arc<Gpu>,
    raw: sys::CUstream,
    pending: Mutex<VecDeque<InFlight>>,
}

// SAFETY: the stream handle is usable from any thread with the context
// current; the queue of work is behind a mutex.
unsafe impl Send for CudaQueue {}
// SAFETY: as above.
unsafe impl Sync for CudaQueue {}

impl CudaQueue {
    pub(crate) fn new(gpu: Arc<Gpu>, name: &str) -> Result<CudaQueue> {
        gpu.ctx.bind()?;
        let mut raw: sys::CUstream = std::ptr::null_mut();
        // SAFETY: writes one stream handle; non-blocking: no implicit
        // synchronisation with the legacy default stream.
        check(
            unsafe {
                sys::cuStreamCreate(&mut raw, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
            },
            || format!("cuStreamCreate (stream `{name}`)"),
        )?;
        Ok(CudaQueue {
            gpu,
            raw,
            pending: Mutex::new(VecDeque::new()),
        })
    }

    /// The raw stream, for libraries that enqueue on it (cuBLASLt, NCCL).
    pub(crate) fn raw(&self) -> sys::CUstream {
        self.raw
    }

    /// Runs `op` between two timing events and keeps `refs` until both
    /// completed.
    fn bracketed(
        &self,
        name: Cow<'static, str>,
        work: Work,
        refs: Vec<MemRef>,
        op: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let ctx = &self.gpu.ctx;
        ctx.bind()?;
        let start = ctx.event()?;
        let end = ctx.event().inspect_err(|_| ctx.recycle(start))?;
        let r = (|| {
            // SAFETY: valid event and stream of this context.
            check(unsafe { sys::cuEventRecord(start, self.raw) }, || {
                format!("cuEventRecord (before `{name}`)")
            })?;
            op()?;
            // SAFETY: as above.
            check(unsafe { sys::cuEventRecord(end, self.raw) }, || {
                format!("cuEventRecord (after `{name}`)")
            })
        })();
        if let Err(e) = r {
            // What was enqueued may still run: wait before the memory
            // references go (and with them, perhaps, the memory).
            // SAFETY: a valid stream.
            let _ = unsafe { sys::cuStreamSynchronize(self.raw) };
            ctx.recycle(start);
            ctx.recycle(end);
            return Err(e);
        }
        lock(&self.pending).push_back(InFlight {
            name,
            work,
            start,
            end,
            _refs: refs,
        });
        Ok(())
    }

    /// Enqueues a copy of `len` bytes (any of device and registered or
    /// pageable host memory: unified addressing tells them apart).
    pub(crate) fn copy(
        &self,
        name: Cow<'static, str>,
        work: Work,
        src: u64,
        dst: u64,
        len: usize,
        refs: Vec<MemRef>,
    ) -> Result<()> {
        let label = name.clone();
        self.bracketed(name, work, refs, || {
            // SAFETY: both ranges lie in blocks the references keep alive
            // until the copy completed; the stream belongs to this context.
            check(
                unsafe { sys::cuMemcpyAsync(dst, src, len, self.raw) },
                || format!("cuMemcpyAsync ({label}, {len} bytes)"),
            )
        })
    }

    /// Enqueues work a library issues on the raw stream (cuBLASLt, NCCL),
    /// tracked like a kernel.
    pub(crate) fn foreign(
        &self,
        name: Cow<'static, str>,
        work: Work,
        refs: Vec<MemRef>,
        op: impl FnOnce(sys::CUstream) -> Result<()>,
    ) -> Result<()> {
        self.bracketed(name, work, refs, || op(self.raw))
    }

    /// Enqueues a host function that the driver runs in stream order on
    /// its own thread (`cuLaunchHostFunc`), between the op's two events.
    pub(crate) fn host(
        &self,
        name: Cow<'static, str>,
        work: Work,
        refs: Vec<MemRef>,
        call: HostCall,
    ) -> Result<()> {
        self.bracketed(name, work, refs, || {
            let user = Box::into_raw(Box::new(call));
            // SAFETY: a valid stream of this context; `run_host_call` takes
            // back the box exactly once, when the driver runs it.
            let r = unsafe { sys::cuLaunchHostFunc(self.raw, Some(run_host_call), user.cast()) };
            if r != sys::CUresult::CUDA_SUCCESS {
                // SAFETY: the driver refused the call, so it never runs it:
                // the box is still ours, and freed once, here.
                drop(unsafe { Box::from_raw(user) });
            }
            check(r, || "cuLaunchHostFunc".into())
        })
    }

    /// Checks and enqueues a PTX kernel.
    pub(crate) fn launch(
        &self,
        name: Cow<'static, str>,
        work: Work,
        k: &OwnedKernel,
        ranges: &[(u64, u64)],
        refs: Vec<MemRef>,
    ) -> Result<()> {
        let ctx = self.gpu.ctx.clone();
        let view = super::launch::PtxKernel {
            ptx: k.ptx,
            entry: &k.entry,
            grid: k.grid,
            block: k.block,
            shared_bytes: k.shared_bytes,
            args: &k.args,
        };
        check_shape(&view, &ctx.info.limits)?;
        check_pointers(&k.entry, &k.args, ranges)?;
        ctx.bind()?;
        let raw = ctx.function(k.ptx, &k.entry, k.shared_bytes, |f| {
            check_args(&k.entry, &f.params, &k.args)?;
            Ok(f.raw as usize)
        })?;
        let mut bytes: Vec<[u8; 8]> = k.args.iter().map(KernelArg::to_le_bytes).collect();
        let mut ptrs: Vec<*mut std::ffi::c_void> =
            bytes.iter_mut().map(|b| b.as_mut_ptr().cast()).collect();
        let entry = k.entry.clone();
        self.bracketed(name, work, refs, || {
            // SAFETY: the function is loaded in this context; `ptrs` holds
            // one pointer per parameter (count and sizes checked above),
            // each to 8 bytes that outlive the call, which copies them.
            let r = unsafe {
                sys::cuLaunchKernel(
                    raw as sys::CUfunction,
                    k.grid[0],
                    k.grid[1],
                    k.grid[2],
                    k.block[0],
                    k.block[1],
                    k.block[2],
                    k.shared_bytes,
                    self.raw,
                    ptrs.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            };
            check(r, || format!("cuLaunchKernel (`{entry}`)"))?;
            if ctx.check_each_launch {
                // A kernel's fault is reported by the launch that caused
                // it, not by some later synchronisation.
                // SAFETY: a valid stream.
                let r = unsafe { sys::cuStreamSynchronize(self.raw) };
                check(r, || format!("kernel `{entry}` (checked after launch)"))?;
            }
            Ok(())
        })
    }

    /// Records `ev` (from the pool) on the stream.
    pub(crate) fn record(&self, ev: sys::CUevent) -> Result<()> {
        self.gpu.ctx.bind()?;
        // SAFETY: valid event and stream of this context.
        check(unsafe { sys::cuEventRecord(ev, self.raw) }, || {
            "cuEventRecord".into()
        })
    }

    /// Makes later work wait for `ev` (recorded on any stream of any
    /// device of this process).
    pub(crate) fn wait(&self, ev: sys::CUevent) -> Result<()> {
        self.gpu.ctx.bind()?;
        // SAFETY: valid event and stream; flags 0.
        check(unsafe { sys::cuStreamWaitEvent(self.raw, ev, 0) }, || {
            "cuStreamWaitEvent".into()
        })
    }

    /// Retires the completed work at the front, oldest first; returns it for
    /// the trace. A failed query retires nothing and reports the failure.
    pub(crate) fn retire(&self) -> Result<Vec<Retired>> {
        let mut done = Vec::new();
        let mut q = lock(&self.pending);
        while let Some(front) = q.front() {
            if !self.gpu.query(front.end, &front.name)? {
                break;
            }
            let w = q
                .pop_front()
                .ok_or_else(|| RuntimeError::Cuda("queue emptied".into()))?;
            // Positions come from the device's clock origin, in f32 ms
            // (coarser as a run gets long: 62 us after 1000 s); durations
            // from the op's own two events, exact to the event's 0.5 us.
            let start_ns = self.gpu.time_ns(w.start)?;
            let end_ns = start_ns + self.gpu.elapsed_ns(w.start, w.end)?;
            self.gpu.ctx.recycle(w.start);
            self.gpu.ctx.recycle(w.end);
            done.push(Retired {
                name: w.name,
                work: w.work,
                start_ns,
                end_ns,
            });
        }
        Ok(done)
    }

    /// Number of operations not retired yet.
    pub(crate) fn in_flight(&self) -> usize {
        lock(&self.pending).len()
    }
}

impl Drop for CudaQueue {
    fn drop(&mut self) {
        if self.gpu.ctx.bind().is_ok() {
            // SAFETY: the stream is ours; synchronising first means the
            // memory references dropped below are no longer used by the GPU.
            unsafe {
                let _ = sys::cuStreamSynchronize(self.raw);
                let _ = sys::cuStreamDestroy_v2(self.raw);
            }
        }
        for w in lock(&self.pending).drain(..) {
            self.gpu.ctx.recycle(w.start);
            self.gpu.ctx.recycle(w.end);
        }
    }
}

/// A host kernel on a cuda stream: the function, the pinned staging blocks
/// it reads and writes (address, bytes), and where its failure goes.
pub(crate) struct HostCall {
    pub(crate) f: crate::stream::HostFn,
    pub(crate) ins: Vec<(usize, usize)>,
    pub(crate) outs: Vec<(usize, usize)>,
    pub(crate) report: Box<dyn FnOnce(String) + Send>,
}

/// Runs a [`HostCall`] on the driver's callback thread. It must not call
/// CUDA (the driver forbids it there) and must not unwind into C.
unsafe extern "C" fn run_host_call(user: *mut std::ffi::c_void) {
    // SAFETY: `user` is the `Box<HostCall>` that `CudaQueue::host` leaked
    // for this one call; the driver calls this function once with it.
    let call = unsafe { Box::from_raw(user.cast::<HostCall>()) };
    let HostCall {
        f,
        ins,
        outs,
        report,
    } = *call;
    // SAFETY: each (address, bytes) is a pinned staging block of at least
    // that many bytes, allocated for this call alone and held by the op's
    // memory references until the op's end event, which the stream records
    // after this function; the copies that fill and drain the blocks are
    // ordered before and after it on the same stream, so nothing else
    // touches them while these slices live, and inputs and outputs are
    // distinct blocks.
    let ins: Vec<&[u8]> = ins
        .iter()
        .map(|&(a, n)| unsafe { std::slice::from_raw_parts(a as *const u8, n) })
        .collect();
    // SAFETY: as above.
    let mut outs: Vec<&mut [u8]> = outs
        .iter()
        .map(|&(a, n)| unsafe { std::slice::from_raw_parts_mut(a as *mut u8, n) })
        .collect();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || f(&ins, &mut outs)));
    match r {
        Ok(Ok(())) => {}
        Ok(Err(m)) => report(m),
        Err(_) => report("the host kernel panicked".into()),
    }
}
