//! Streams and events.
//!
//! A [`Stream`] runs the operations enqueued on it in order. On the cpu
//! device each stream is a worker thread; on the meta device a stream is a
//! virtual clock that advances by the cost model's time for each operation;
//! on the cuda device a stream is a `CUstream` (see [`crate::cuda`]).
//! An [`Event`] marks a point in a stream; another stream can wait for it,
//! and the host can wait for it. A failed operation makes its stream refuse
//! later work, and every event recorded after it carries the failure, so an
//! error reaches whoever waits, on any stream, instead of being lost.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender};

use crate::cuda::queue::{CudaQueue, HostCall, OwnedKernel};
use crate::cuda::PtxKernel;
use crate::device::{Core, DeviceKind};
use crate::error::{Result, RuntimeError};
use crate::memory::{HostBuffer, MemRef, Space, View};
use crate::trace::{OpKind, TraceEvent};

/// What an operation costs: the meta device turns it into a predicted time;
/// the trace reports it beside measured times.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Work {
    /// Kind of operation.
    pub kind: OpKind,
    /// Floating-point operations.
    pub flops: f64,
    /// Bytes read and written (kernels) or moved (copies, collectives).
    pub bytes: u64,
}

impl Work {
    /// A kernel doing `flops` and touching `bytes`.
    pub fn kernel(flops: f64, bytes: u64) -> Work {
        Work {
            kind: OpKind::Kernel,
            flops,
            bytes,
        }
    }

    /// A collective moving `bytes` per rank over the interconnect.
    pub fn collective(bytes: u64) -> Work {
        Work {
            kind: OpKind::Collective,
            flops: 0.0,
            bytes,
        }
    }
}

/// The host function a cpu kernel runs: inputs as byte slices, outputs as
/// mutable byte slices, in the order the views were given.
pub type HostFn =
    Box<dyn FnOnce(&[&[u8]], &mut [&mut [u8]]) -> std::result::Result<(), String> + Send>;

#[derive(Debug, Clone)]
struct Failure {
    stream: String,
    op: String,
    message: String,
}

impl Failure {
    fn to_error(&self) -> RuntimeError {
        RuntimeError::StreamFailed {
            stream: self.stream.clone(),
            op: self.op.clone(),
            message: self.message.clone(),
        }
    }
}

#[derive(Debug)]
struct Completion {
    time_ns: u64,
    failure: Option<Failure>,
}

struct EventState {
    stream: Arc<str>,
    /// On the meta device: the device, whose host clock a host wait advances.
    meta: Option<Arc<Core>>,
    /// On the cuda device: the `CUevent`, polled for completion.
    gpu: Option<GpuEvent>,
    done: Mutex<Option<Completion>>,
    cv: Condvar,
}

/// The GPU side of an event.
struct GpuEvent {
    core: Arc<Core>,
    raw: usize,
    /// The stream's failure when the event was recorded.
    failure: Option<Failure>,
    /// The stream's late failures and how many host kernels preceded the
    /// event: one of those failing is the event's failure too.
    late: (LateFailure, u64),
}

impl Drop for EventState {
    fn drop(&mut self) {
        if let Some(g) = &self.gpu {
            if let Some(gpu) = &g.core.gpu {
                gpu.ctx.recycle(g.raw as cudarc::driver::sys::CUevent);
            }
        }
    }
}

/// A point in a stream: complete when everything enqueued before it on that
/// stream has run. Cheap to clone.
#[derive(Clone)]
pub struct Event {
    inner: Arc<EventState>,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Event(stream `{}`, complete: {})",
            self.inner.stream,
            self.is_complete()
        )
    }
}

impl Event {
    fn new(stream: Arc<str>, meta: Option<Arc<Core>>) -> Event {
        Event {
            inner: Arc::new(EventState {
                stream,
                meta,
                gpu: None,
                done: Mutex::new(None),
                cv: Condvar::new(),
            }),
        }
    }

    fn new_gpu(
        stream: Arc<str>,
        core: Arc<Core>,
        raw: usize,
        failure: Option<Failure>,
        late: (LateFailure, u64),
    ) -> Event {
        Event {
            inner: Arc::new(EventState {
                stream,
                meta: None,
                gpu: Some(GpuEvent {
                    core,
                    raw,
                    failure,
                    late,
                }),
                done: Mutex::new(None),
                cv: Condvar::new(),
            }),
        }
    }

    /// The raw `CUevent` of an event recorded on a cuda stream.
    fn gpu_raw(&self) -> Option<cudarc::driver::sys::CUevent> {
        self.inner
            .gpu
            .as_ref()
            .map(|g| g.raw as cudarc::driver::sys::CUevent)
    }

    /// On cuda: asks the driver whether the event completed and, if so,
    /// fills in its completion. True when complete (or not a GPU event).
    fn poll_gpu(&self) -> bool {
        let Some(g) = &self.inner.gpu else {
            return true;
        };
        let Some(gpu) = &g.core.gpu else {
            return true;
        };
        let mut done = self.lock();
        if done.is_some() {
            return true;
        }
        let raw = g.raw as cudarc::driver::sys::CUevent;
        let what = format!("an event of stream `{}`", self.inner.stream);
        let completion = match gpu.query(raw, &what) {
            Ok(false) => return false,
            Ok(true) => match gpu.time_ns(raw) {
                Ok(t) => Completion {
                    time_ns: t,
                    failure: g.failure.clone().or_else(|| {
                        let (late, before) = &g.late;
                        lock(late)
                            .as_ref()
                            .filter(|(i, _)| i < before)
                            .map(|(_, f)| f.clone())
                    }),
                },
                Err(e) => Completion {
                    time_ns: 0,
                    failure: Some(Failure {
                        stream: self.inner.stream.to_string(),
                        op: "event time".into(),
                        message: e.to_string(),
                    }),
                },
            },
            Err(e) => Completion {
                time_ns: 0,
                failure: Some(Failure {
                    stream: self.inner.stream.to_string(),
                    op: "work before an event (asynchronous GPU error)".into(),
                    message: e.to_string(),
                }),
            },
        };
        *done = Some(completion);
        true
    }

    fn lock(&self) -> MutexGuard<'_, Option<Completion>> {
        self.inner.done.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn complete(&self, time_ns: u64, failure: Option<Failure>) {
        *self.lock() = Some(Completion { time_ns, failure });
        self.inner.cv.notify_all();
    }

    /// Whether the event has completed (successfully or not).
    pub fn is_complete(&self) -> bool {
        if self.inner.gpu.is_some() {
            return self.poll_gpu();
        }
        self.lock().is_some()
    }

    /// Blocks the host until the event completes, then reports the failure
    /// of its stream, if any. Gives up after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<u64> {
        if let Some(g) = &self.inner.gpu {
            // The driver cannot wait with a deadline: poll, spinning
            // briefly, then sleeping longer and longer (at most 1 ms).
            let start = Instant::now();
            let mut nap = Duration::from_micros(2);
            while !self.poll_gpu() {
                if start.elapsed() >= timeout {
                    return Err(RuntimeError::Timeout {
                        what: format!("an event of stream `{}`", self.inner.stream),
                        secs: timeout.as_secs_f64(),
                    });
                }
                if nap < Duration::from_micros(50) {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(nap);
                }
                nap = (nap * 2).min(Duration::from_millis(1));
            }
            retire_cuda_streams(&g.core);
        }
        let g = self.lock();
        let (g, _) = self
            .inner
            .cv
            .wait_timeout_while(g, timeout, |c| c.is_none())
            .unwrap_or_else(|e| e.into_inner());
        match &*g {
            None => Err(RuntimeError::Timeout {
                what: format!("an event of stream `{}`", self.inner.stream),
                secs: timeout.as_secs_f64(),
            }),
            Some(c) => {
                if let Some(core) = &self.inner.meta {
                    core.advance_meta_host(c.time_ns);
                }
                match &c.failure {
                    Some(f) => Err(f.to_error()),
                    None => Ok(c.time_ns),
                }
            }
        }
    }

    /// Time at which the event completed, in nanoseconds on its device's
    /// clock (measured on cpu, predicted on meta); None while pending.
    pub fn time_ns(&self) -> Option<u64> {
        self.poll_gpu();
        self.lock().as_ref().map(|c| c.time_ns)
    }

    fn failure(&self) -> Option<Failure> {
        self.poll_gpu();
        self.lock().as_ref().and_then(|c| c.failure.clone())
    }
}

enum Body {
    Host(HostFn),
    Copy,
    /// A PTX kernel: costed on meta, never sent to a cpu worker.
    Kernel,
    Record(Event),
    Wait(Event),
}

struct Job {
    name: Cow<'static, str>,
    work: Work,
    reads: Vec<MemRef>,
    writes: Vec<MemRef>,
    body: Body,
}

/// A cpu stream's worker thread and its queue.
struct Worker {
    tx: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A meta stream's virtual clock.
struct MetaClock {
    now_ns: u64,
}

enum Exec {
    Worker(Worker),
    Meta(Mutex<MetaClock>),
    /// A `CUstream`; the flag says the stream was closed.
    Cuda(CudaQueue, AtomicBool),
}

pub(crate) struct StreamInner {
    id: u32,
    name: Arc<str>,
    core: Arc<Core>,
    failure: Arc<Mutex<Option<Failure>>>,
    /// On cuda: the first failure of a host kernel (which the driver runs
    /// later, on its thread) with the kernel's index among the stream's
    /// host kernels, so only events recorded after it report it.
    late: LateFailure,
    /// Host kernels enqueued so far.
    host_calls: AtomicU64,
    exec: Exec,
}

type LateFailure = Arc<Mutex<Option<(u64, Failure)>>>;

/// An ordered queue of operations on a device. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Stream {
    inner: Arc<StreamInner>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Stream(`{}` on {})",
            self.inner.name, self.inner.core.name
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Stream {
    pub(crate) fn new(core: Arc<Core>, id: u32, name: &str) -> Result<Stream> {
        let name: Arc<str> = Arc::from(name);
        let failure = Arc::new(Mutex::new(None));
        let exec = match core.kind {
            DeviceKind::Meta => Exec::Meta(Mutex::new(MetaClock { now_ns: 0 })),
            DeviceKind::Cpu => {
                let (tx, rx) = crossbeam::channel::unbounded::<Job>();
                let ctx = WorkerCtx {
                    id,
                    name: name.clone(),
                    core: core.clone(),
                    failure: failure.clone(),
                };
                let thread = std::thread::Builder::new()
                    .name(format!("fpdt-{}-{}", core.name, name))
                    .spawn(move || ctx.run(rx))
                    .map_err(|source| RuntimeError::Io {
                        what: format!("starting the worker thread of stream `{name}`"),
                        source,
                    })?;
                Exec::Worker(Worker {
                    tx: Mutex::new(Some(tx)),
                    thread: Mutex::new(Some(thread)),
                })
            }
            DeviceKind::Cuda => {
                let gpu = core.gpu.clone().ok_or_else(|| {
                    RuntimeError::Cuda(format!("device `{}` has no GPU context", core.name))
                })?;
                Exec::Cuda(CudaQueue::new(gpu, &name)?, AtomicBool::new(false))
            }
        };
        let inner = Arc::new(StreamInner {
            id,
            name,
            core,
            failure,
            late: Arc::new(Mutex::new(None)),
            host_calls: AtomicU64::new(0),
            exec,
        });
        if let Exec::Cuda(..) = inner.exec {
            lock(&inner.core.cuda_streams).push(Arc::downgrade(&inner));
        }
        Ok(Stream { inner })
    }

    /// The queue of a cuda stream about to take an op, its finished work
    /// retired; None when the stream has failed (the op is skipped, as
    /// every later one). An error off cuda or when closed.
    fn cuda_for_op(&self) -> Result<Option<&CudaQueue>> {
        let Some(q) = self.cuda()? else {
            return Err(RuntimeError::Cuda(format!(
                "stream `{}` has no CUstream",
                self.inner.name
            )));
        };
        self.retire();
        Ok((!self.has_failed()).then_some(q))
    }

    /// The cuda stream's queue, or None on other devices; an error when
    /// the stream was closed.
    fn cuda(&self) -> Result<Option<&CudaQueue>> {
        match &self.inner.exec {
            Exec::Cuda(q, closed) => {
                if closed.load(Ordering::Acquire) {
                    return Err(RuntimeError::StreamClosed {
                        stream: self.inner.name.to_string(),
                    });
                }
                Ok(Some(q))
            }
            _ => Ok(None),
        }
    }

    fn set_failure(&self, op: &str, e: &RuntimeError) {
        lock(&self.inner.failure).get_or_insert(Failure {
            stream: self.inner.name.to_string(),
            op: op.to_string(),
            message: e.to_string(),
        });
    }

    fn has_failed(&self) -> bool {
        lock(&self.inner.failure).is_some()
    }

    /// Retires the completed work of a cuda stream: records its trace
    /// events and drops the memory it held. No-op on other devices.
    pub(crate) fn retire(&self) {
        let Exec::Cuda(q, _) = &self.inner.exec else {
            return;
        };
        match q.retire() {
            Ok(done) => {
                for r in done {
                    self.inner.core.trace.record(TraceEvent {
                        stream: self.inner.name.clone(),
                        stream_id: self.inner.id,
                        name: r.name,
                        kind: r.work.kind,
                        bytes: r.work.bytes,
                        flops: r.work.flops,
                        start_ns: r.start_ns,
                        end_ns: r.end_ns,
                    });
                }
            }
            Err(e) => self.set_failure("asynchronous GPU work", &e),
        }
    }

    /// Operations enqueued on a cuda stream and not yet retired (0 elsewhere).
    pub fn in_flight(&self) -> usize {
        match &self.inner.exec {
            Exec::Cuda(q, _) => q.in_flight(),
            _ => 0,
        }
    }

    /// The raw `CUstream` of a cuda stream, for libraries that enqueue on
    /// it (cuBLASLt, NCCL); None on other devices. Work enqueued through
    /// it is ordered with this stream's but not tracked by it: the caller
    /// keeps its memory alive (for example by recording an event and
    /// holding the buffers until it completes).
    pub fn cuda_stream_raw(&self) -> Option<*mut std::ffi::c_void> {
        match &self.inner.exec {
            Exec::Cuda(q, _) => Some(q.raw().cast()),
            _ => None,
        }
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The stream's number within its device (its row in the trace).
    pub fn id(&self) -> u32 {
        self.inner.id
    }

    /// The kind of device the stream belongs to.
    pub fn device_kind(&self) -> DeviceKind {
        self.inner.core.kind
    }

    /// The name of the device the stream belongs to.
    pub fn device_name(&self) -> &str {
        &self.inner.core.name
    }

    /// Whether two handles name the same stream.
    pub fn same_as(&self, other: &Stream) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    fn check_device(&self, v: &View<'_>, what: &str) -> Result<()> {
        if !self.inner.core.owns(v.inner()) {
            return Err(RuntimeError::Invalid(format!(
                "{what}: buffer `{}` belongs to another device than stream `{}` ({})",
                v.tag(),
                self.inner.name,
                self.inner.core.name
            )));
        }
        Ok(())
    }

    /// Records an event after everything enqueued so far.
    pub fn record(&self) -> Result<Event> {
        if let Some(q) = self.cuda()? {
            self.retire();
            let gpu = &q.gpu;
            let raw = gpu.ctx.event()?;
            if let Err(e) = q.record(raw) {
                gpu.ctx.recycle(raw);
                self.set_failure("record", &e);
                return Err(e);
            }
            let failure = lock(&self.inner.failure).clone();
            let before = self.inner.host_calls.load(Ordering::SeqCst);
            return Ok(Event::new_gpu(
                self.inner.name.clone(),
                self.inner.core.clone(),
                raw as usize,
                failure,
                (self.inner.late.clone(), before),
            ));
        }
        let meta = (self.inner.core.kind == DeviceKind::Meta).then(|| self.inner.core.clone());
        let ev = Event::new(self.inner.name.clone(), meta);
        self.submit(Job {
            name: Cow::Borrowed("record"),
            work: Work::kernel(0.0, 0),
            reads: Vec::new(),
            writes: Vec::new(),
            body: Body::Record(ev.clone()),
        })?;
        Ok(ev)
    }

    /// Makes later work on this stream wait until `event` completed. If the
    /// event's stream failed, this stream fails too.
    pub fn wait(&self, event: &Event) -> Result<()> {
        if let Some(q) = self.cuda()? {
            match event.gpu_raw() {
                Some(raw) => {
                    if let Err(e) = q.wait(raw) {
                        self.set_failure("wait", &e);
                        return Err(e);
                    }
                }
                // An event of a cpu stream: the host waits for it, then
                // enqueues what follows (the ordering holds; the GPU idles).
                None => match event.wait_timeout(self.inner.core.wait_timeout) {
                    Ok(_) | Err(RuntimeError::StreamFailed { .. }) => {}
                    Err(e) => {
                        self.set_failure("wait", &e);
                        return Err(e);
                    }
                },
            }
            if let Some(f) = event.failure() {
                lock(&self.inner.failure).get_or_insert(f);
            }
            return Ok(());
        }
        self.submit(Job {
            name: Cow::Borrowed("wait"),
            work: Work::kernel(0.0, 0),
            reads: Vec::new(),
            writes: Vec::new(),
            body: Body::Wait(event.clone()),
        })
    }

    /// Blocks the host until everything enqueued so far has run; reports the
    /// stream's failure if any.
    pub fn synchronize(&self) -> Result<()> {
        let ev = self.record()?;
        ev.wait_timeout(self.inner.core.wait_timeout).map(|_| ())
    }

    /// Copies `src` to `dst` (same length; any of host and device memory).
    pub fn copy(&self, src: View<'_>, dst: View<'_>) -> Result<()> {
        self.check_device(&src, "copy source")?;
        self.copy_checked(src, dst)
    }

    /// Copies `src`, device memory of this device or of another cuda device
    /// of this process (a peer rank's, see [`View::share`]), to `dst` on
    /// this device. Only on cuda, where one address space covers every GPU
    /// of the process; elsewhere it is [`Stream::copy`].
    pub fn copy_peer(&self, src: View<'_>, dst: View<'_>) -> Result<()> {
        if self.inner.core.kind != DeviceKind::Cuda || self.inner.core.owns(src.inner()) {
            return self.copy(src, dst);
        }
        if src.space() != Space::Device {
            return Err(RuntimeError::Invalid(format!(
                "copy_peer: source `{}` is host memory of another device than stream `{}`",
                src.tag(),
                self.inner.name
            )));
        }
        self.copy_checked(src, dst)
    }

    fn copy_checked(&self, src: View<'_>, dst: View<'_>) -> Result<()> {
        self.check_device(&dst, "copy destination")?;
        if src.len() != dst.len() {
            return Err(RuntimeError::Invalid(format!(
                "copy: source `{}` has {} bytes but destination `{}` has {}",
                src.tag(),
                src.len(),
                dst.tag(),
                dst.len()
            )));
        }
        if src.overlaps(&dst) {
            return Err(RuntimeError::Invalid(format!(
                "copy: source and destination overlap in `{}`",
                src.tag()
            )));
        }
        let kind = match (src.space(), dst.space()) {
            (Space::Host, Space::Device) => OpKind::CopyH2D,
            (Space::Device, Space::Host) => OpKind::CopyD2H,
            (Space::Device, Space::Device) => OpKind::CopyD2D,
            (Space::Host, Space::Host) => OpKind::CopyH2H,
        };
        let name = format!("{} {}", kind.as_str(), dst.tag());
        let work = Work {
            kind,
            flops: 0.0,
            bytes: src.len() as u64,
        };
        if let Some(q) = self.cuda()? {
            self.retire();
            if self.has_failed() {
                return Ok(());
            }
            let refs = vec![src.to_ref(false), dst.to_ref(true)];
            let (s, d, n) = (src.addr() as u64, dst.addr() as u64, src.len());
            let r = q.copy(Cow::Owned(name.clone()), work, s, d, n, refs);
            if let Err(e) = &r {
                self.set_failure(&name, e);
            }
            return r;
        }
        self.submit(Job {
            name: Cow::Owned(name),
            work,
            reads: vec![src.to_ref(false)],
            writes: vec![dst.to_ref(true)],
            body: Body::Copy,
        })
    }

    /// Enqueues a host function as a kernel: on the cpu device it runs on the
    /// stream's worker over the bytes of `reads` and `writes`; on the meta
    /// device it is not run, and its `work` advances the stream's clock. The
    /// views of one call must not overlap where one of them is written.
    pub fn launch_host(
        &self,
        name: impl Into<Cow<'static, str>>,
        work: Work,
        reads: &[View<'_>],
        writes: &[View<'_>],
        f: HostFn,
    ) -> Result<()> {
        let name = name.into();
        for v in reads.iter().chain(writes) {
            self.check_device(v, &name)?;
        }
        for (i, w) in writes.iter().enumerate() {
            for (j, o) in writes.iter().enumerate() {
                if i != j && w.overlaps(o) {
                    return Err(RuntimeError::Invalid(format!(
                        "{name}: outputs {i} and {j} overlap in `{}`",
                        w.tag()
                    )));
                }
            }
            for (j, r) in reads.iter().enumerate() {
                if w.overlaps(r) {
                    return Err(RuntimeError::Invalid(format!(
                        "{name}: output {i} overlaps input {j} in `{}`",
                        w.tag()
                    )));
                }
            }
        }
        if self.inner.core.kind == DeviceKind::Cuda {
            return self.launch_host_staged(name, work, reads, writes, f);
        }
        self.submit(Job {
            name,
            work,
            reads: reads.iter().map(|v| v.to_ref(false)).collect(),
            writes: writes.iter().map(|v| v.to_ref(true)).collect(),
            body: Body::Host(f),
        })
    }

    /// A host kernel on cuda: its views are copied into pinned staging
    /// buffers of the device's arena, the driver runs `f` over those in
    /// stream order (`cuLaunchHostFunc`), and what it wrote is copied back.
    /// Correct and asynchronous, but each call crosses the host link twice
    /// and the host computes: the fallback for work without a PTX kernel.
    fn launch_host_staged(
        &self,
        name: Cow<'static, str>,
        work: Work,
        reads: &[View<'_>],
        writes: &[View<'_>],
        f: HostFn,
    ) -> Result<()> {
        let Some(q) = self.cuda_for_op()? else {
            return Ok(());
        };
        let core = &self.inner.core;
        let stage = |v: &View<'_>| core.alloc_host(v.len().max(1), "host kernel staging");
        let ins = reads
            .iter()
            .map(stage)
            .collect::<Result<Vec<HostBuffer>>>()?;
        let outs = writes
            .iter()
            .map(stage)
            .collect::<Result<Vec<HostBuffer>>>()?;
        // Outputs too: a kernel may read what it accumulates into.
        for (v, h) in reads.iter().zip(&ins).chain(writes.iter().zip(&outs)) {
            if !v.is_empty() {
                self.copy(*v, h.bytes(0..v.len())?)?;
            }
        }
        let index = self.inner.host_calls.fetch_add(1, Ordering::SeqCst);
        let (late, failure) = (self.inner.late.clone(), self.inner.failure.clone());
        let (stream, op) = (self.inner.name.to_string(), name.to_string());
        let call = HostCall {
            f,
            ins: ins
                .iter()
                .zip(reads)
                .map(|(h, v)| (h.view().addr(), v.len()))
                .collect(),
            outs: outs
                .iter()
                .zip(writes)
                .map(|(h, v)| (h.view().addr(), v.len()))
                .collect(),
            report: Box::new(move |message| {
                let f = Failure {
                    stream,
                    op,
                    message,
                };
                lock(&late).get_or_insert((index, f.clone()));
                lock(&failure).get_or_insert(f);
            }),
        };
        let refs: Vec<MemRef> = ins
            .iter()
            .map(|h| h.view().to_ref(false))
            .chain(outs.iter().map(|h| h.view().to_ref(true)))
            .collect();
        if let Err(e) = q.host(name.clone(), work, refs, call) {
            self.set_failure(&name, &e);
            return Err(e);
        }
        for (v, h) in writes.iter().zip(&outs) {
            if !v.is_empty() {
                self.copy(h.bytes(0..v.len())?, *v)?;
            }
        }
        Ok(())
    }

    /// Launches a PTX kernel on a cuda stream. `reads` and `writes` are the
    /// views the kernel touches: every pointer argument must lie in one of
    /// them, and they stay allocated until the kernel completed. The
    /// arguments are checked against the `.entry`'s parameter list and the
    /// shapes against the device's limits before anything is launched. On
    /// meta only `work` is costed; the cpu device runs the kernel's CPU
    /// twin instead (through [`Stream::launch_host`]).
    pub fn launch_ptx(
        &self,
        name: impl Into<Cow<'static, str>>,
        work: Work,
        kernel: &PtxKernel<'_>,
        reads: &[View<'_>],
        writes: &[View<'_>],
    ) -> Result<()> {
        let name = name.into();
        for v in reads.iter().chain(writes) {
            self.check_device(v, &name)?;
        }
        match self.inner.core.kind {
            DeviceKind::Cpu => Err(RuntimeError::Unsupported {
                device: "cpu",
                what: format!(
                    "PTX kernel `{}` (run its CPU twin with launch_host, or the PTX interpreter)",
                    kernel.entry
                ),
            }),
            DeviceKind::Meta => self.submit(Job {
                name,
                work,
                reads: reads.iter().map(|v| v.to_ref(false)).collect(),
                writes: writes.iter().map(|v| v.to_ref(true)).collect(),
                body: Body::Kernel,
            }),
            DeviceKind::Cuda => {
                let Some(q) = self.cuda_for_op()? else {
                    return Ok(());
                };
                let ranges: Vec<(u64, u64)> = reads
                    .iter()
                    .chain(writes)
                    .map(|v| (v.addr() as u64, v.len() as u64))
                    .collect();
                let refs: Vec<MemRef> = reads
                    .iter()
                    .map(|v| v.to_ref(false))
                    .chain(writes.iter().map(|v| v.to_ref(true)))
                    .collect();
                let owned = OwnedKernel {
                    ptx: kernel.ptx,
                    entry: kernel.entry.to_string(),
                    grid: kernel.grid,
                    block: kernel.block,
                    shared_bytes: kernel.shared_bytes,
                    args: kernel.args.to_vec(),
                };
                let r = q.launch(name.clone(), work, &owned, &ranges, refs);
                if let Err(e) = &r {
                    // Bad arguments launch nothing and leave the stream
                    // usable; a driver failure stops it.
                    if !matches!(e, RuntimeError::Invalid(_)) {
                        self.set_failure(&name, e);
                    }
                }
                r
            }
        }
    }

    /// Enqueues work that a CUDA library issues on this stream's raw
    /// `CUstream` (a cuBLASLt matmul, an NCCL collective): `issue` is
    /// called once with the stream, between the two timing events of the
    /// trace, and `reads`/`writes` stay allocated until the work completed.
    /// Only on cuda (elsewhere: [`RuntimeError::Unsupported`]).
    pub fn enqueue_cuda(
        &self,
        name: impl Into<Cow<'static, str>>,
        work: Work,
        reads: &[View<'_>],
        writes: &[View<'_>],
        issue: impl FnOnce(*mut std::ffi::c_void) -> Result<()>,
    ) -> Result<()> {
        let name = name.into();
        for v in reads.iter().chain(writes) {
            self.check_device(v, &name)?;
        }
        let Some(q) = self.cuda()? else {
            return Err(RuntimeError::Unsupported {
                device: self.inner.core.kind.as_str(),
                what: format!("`{name}` on a raw CUDA stream"),
            });
        };
        self.retire();
        if self.has_failed() {
            return Ok(());
        }
        let refs: Vec<MemRef> = reads
            .iter()
            .map(|v| v.to_ref(false))
            .chain(writes.iter().map(|v| v.to_ref(true)))
            .collect();
        let r = q.foreign(name.clone(), work, refs, |raw| issue(raw.cast()));
        if let Err(e) = &r {
            if !matches!(e, RuntimeError::Invalid(_)) {
                self.set_failure(&name, e);
            }
        }
        r
    }

    fn submit(&self, job: Job) -> Result<()> {
        match &self.inner.exec {
            Exec::Cuda(..) => Err(RuntimeError::Cuda(format!(
                "stream `{}`: internal: `{}` was queued as cpu work",
                self.inner.name, job.name
            ))),
            Exec::Worker(w) => {
                let tx = lock(&w.tx);
                match tx.as_ref() {
                    Some(tx) => tx.send(job).map_err(|_| RuntimeError::StreamClosed {
                        stream: self.inner.name.to_string(),
                    }),
                    None => Err(RuntimeError::StreamClosed {
                        stream: self.inner.name.to_string(),
                    }),
                }
            }
            Exec::Meta(clock) => {
                self.run_meta(&mut lock(clock), job);
                Ok(())
            }
        }
    }

    /// The meta device: advance the virtual clock; run nothing.
    fn run_meta(&self, clock: &mut MetaClock, job: Job) {
        let core = &self.inner.core;
        let host_now = core.meta_host_time();
        let start = clock.now_ns.max(host_now);
        match job.body {
            Body::Record(ev) => {
                clock.now_ns = start;
                ev.complete(start, lock(&self.inner.failure).clone());
            }
            Body::Wait(ev) => {
                let t = ev.time_ns().unwrap_or(start);
                clock.now_ns = start.max(t);
                if let Some(f) = ev.failure() {
                    lock(&self.inner.failure).get_or_insert(f);
                }
            }
            Body::Host(_) | Body::Copy | Body::Kernel => {
                let dur = core.cost.duration_ns(&job.work);
                clock.now_ns = start + dur;
                core.trace.record(TraceEvent {
                    stream: self.inner.name.clone(),
                    stream_id: self.inner.id,
                    name: job.name,
                    kind: job.work.kind,
                    bytes: job.work.bytes,
                    flops: job.work.flops,
                    start_ns: start,
                    end_ns: start + dur,
                });
            }
        }
    }

    /// Predicted time of the stream's clock on the meta device, in
    /// nanoseconds (None on other devices).
    pub fn meta_time_ns(&self) -> Option<u64> {
        match &self.inner.exec {
            Exec::Meta(c) => Some(lock(c).now_ns),
            Exec::Worker(_) | Exec::Cuda(..) => None,
        }
    }

    /// Stops accepting work; what is queued still runs. Later enqueues fail
    /// with [`RuntimeError::StreamClosed`].
    pub(crate) fn close(&self) {
        match &self.inner.exec {
            Exec::Worker(w) => {
                lock(&w.tx).take();
            }
            Exec::Cuda(_, closed) => closed.store(true, Ordering::Release),
            Exec::Meta(_) => {}
        }
    }

    /// Whether the stream accepts work.
    pub fn is_open(&self) -> bool {
        match &self.inner.exec {
            Exec::Worker(w) => lock(&w.tx).is_some(),
            Exec::Cuda(_, closed) => !closed.load(Ordering::Acquire),
            Exec::Meta(_) => true,
        }
    }

    /// The failure that stopped this stream, if any.
    pub fn failure(&self) -> Option<RuntimeError> {
        lock(&self.inner.failure).as_ref().map(Failure::to_error)
    }
}

impl Drop for StreamInner {
    fn drop(&mut self) {
        if let Exec::Worker(w) = &self.exec {
            // Closing the channel ends the worker after the queued work.
            lock(&w.tx).take();
            if let Some(t) = lock(&w.thread).take() {
                // A job that held the last handle of its own stream drops it
                // on the worker thread: joining there would wait forever.
                if t.thread().id() != std::thread::current().id() {
                    let _ = t.join();
                }
            }
        }
    }
}

struct WorkerCtx {
    id: u32,
    name: Arc<str>,
    core: Arc<Core>,
    failure: Arc<Mutex<Option<Failure>>>,
}

impl WorkerCtx {
    fn run(self, rx: Receiver<Job>) {
        for job in rx {
            self.run_job(job);
        }
    }

    fn fail(&self, op: &str, message: String) {
        lock(&self.failure).get_or_insert(Failure {
            stream: self.name.to_string(),
            op: op.to_string(),
            message,
        });
    }

    fn run_job(&self, job: Job) {
        let Job {
            name,
            work,
            reads,
            writes,
            body,
        } = job;
        match body {
            Body::Record(ev) => {
                let f = lock(&self.failure).clone();
                ev.complete(self.core.now_ns(), f);
            }
            Body::Wait(ev) => match ev.wait_timeout(self.core.wait_timeout) {
                Ok(_) => {}
                Err(RuntimeError::StreamFailed {
                    stream,
                    op,
                    message,
                }) => {
                    lock(&self.failure).get_or_insert(Failure {
                        stream,
                        op,
                        message,
                    });
                }
                Err(e) => self.fail("wait", e.to_string()),
            },
            Body::Host(_) | Body::Copy | Body::Kernel if lock(&self.failure).is_some() => {
                // The stream has failed: later work is skipped.
            }
            Body::Kernel => self.fail(&name, "a PTX kernel reached a cpu worker".into()),
            Body::Host(f) => {
                let start = self.core.now_ns();
                let r = run_with_borrows(&name, &reads, &writes, |ins, outs| f(ins, outs));
                let end = self.core.now_ns();
                match r {
                    Ok(()) => self.trace(name, work, start, end),
                    Err(msg) => self.fail(&name, msg),
                }
            }
            Body::Copy => {
                let start = self.core.now_ns();
                let r = run_with_borrows(&name, &reads, &writes, |ins, outs| {
                    outs[0].copy_from_slice(ins[0]);
                    Ok(())
                });
                let end = self.core.now_ns();
                match r {
                    Ok(()) => self.trace(name, work, start, end),
                    Err(msg) => self.fail(&name, msg),
                }
            }
        }
        // `reads` and `writes` drop here: the blocks they hold may return to
        // their allocator now that the work is done.
    }

    fn trace(&self, name: Cow<'static, str>, work: Work, start: u64, end: u64) {
        self.core.trace.record(TraceEvent {
            stream: self.name.clone(),
            stream_id: self.id,
            name,
            kind: work.kind,
            bytes: work.bytes,
            flops: work.flops,
            start_ns: start,
            end_ns: end,
        });
    }
}

/// Takes every view's bytes in the registry, runs `f` over them, gives them
/// back. A conflict (a race in the schedule) fails without touching memory.
fn run_with_borrows(
    name: &str,
    reads: &[MemRef],
    writes: &[MemRef],
    f: impl FnOnce(&[&[u8]], &mut [&mut [u8]]) -> std::result::Result<(), String>,
) -> std::result::Result<(), String> {
    let mut rb = Vec::with_capacity(reads.len());
    for r in reads {
        rb.push(r.borrow(name).map_err(|e| e.to_string())?);
    }
    let mut wb = Vec::with_capacity(writes.len());
    for w in writes {
        wb.push(w.borrow(name).map_err(|e| e.to_string())?);
    }
    let ins: Vec<&[u8]> = rb.iter().map(|b| b.bytes()).collect();
    let mut outs: Vec<&mut [u8]> = wb.iter().map(|b| b.bytes_mut()).collect();
    f(&ins, &mut outs)
}

/// Retires the completed work of every cuda stream of a device (after a
/// host wait: what completed may be holding memory the host wants).
pub(crate) fn retire_cuda_streams(core: &Core) {
    let streams: Vec<Weak<StreamInner>> = lock(&core.cuda_streams).clone();
    for s in streams.iter().filter_map(Weak::upgrade) {
        Stream { inner: s }.retire();
    }
}
