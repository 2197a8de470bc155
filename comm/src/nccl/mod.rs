//! A thin binding of NCCL, loaded at run time.
//!
//! [`Nccl::load`] finds the library with the runtime's finder
//! ([`fpdt_runtime::libs`], spec [`fpdt_runtime::libs::NCCL`]): the file
//! named by `FPDT_NCCL_LIB` if set (and only that), else `libnccl.so.2`
//! (then `libnccl.so`) in each `LD_LIBRARY_PATH` directory, through the
//! dynamic loader's search, in python site-packages (PyTorch's wheels ship
//! it under `nvidia/nccl/lib`), then the CUDA toolkit. Without it, loading
//! returns [`CommError::NcclUnavailable`] listing every place tried; the
//! crate builds and tests without it.
//!
//! Two layers:
//! - **raw**: [`NcclComm`]'s `unsafe fn raw_*` calls take device pointers and
//!   a raw `cudaStream_t` / `CUstream` ([`RawStream`]). Each checks its
//!   `ncclResult_t`, with the text of `ncclGetErrorString` (and
//!   `ncclGetLastError` where the library has it).
//! - **[`Communicator`]**: the trait's collectives on runtime streams. The
//!   runtime cannot hand out a CUDA stream handle yet, so these go through a
//!   [`CudaLauncher`] the cuda backend provides
//!   ([`NcclComm::set_launcher`]): it enqueues a closure that receives the
//!   stream's raw handle, and keeps the views' memory alive until the work
//!   is done. Until one is set, the trait's collectives return an error
//!   that says so.
//!
//! No hang: [`NcclComm::init_rank`] gives up after a timeout (a peer that
//! never joins), and [`NcclComm::wait_until`] polls
//! `ncclCommGetAsyncError` beside a completion test and aborts the
//! communicator on an asynchronous error or a timeout, so every rank ends
//! in an error. All-to-all is grouped send/recv.

mod ffi;

use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fpdt_runtime::{libs, DeviceKind, Stream, View, Work};

use crate::communicator::{check, traffic, work, Communicator};
use crate::error::{CommError, Result};
use crate::rendezvous::RendezvousEnv;
use crate::types::{DType, ReduceOp};

use ffi::{Fns, NcclUniqueId, RawCommPtr, NCCL_IN_PROGRESS, NCCL_SUCCESS};

/// The environment variable naming the NCCL library to load instead of
/// searching.
pub const LIB_ENV: &str = libs::NCCL.env_var;

/// The names tried, in order, in each place searched when [`LIB_ENV`] is
/// unset.
pub const DEFAULT_NAMES: &[&str] = libs::NCCL.sonames;

/// A loaded NCCL library. Cheap to share (`Arc`).
pub struct Nccl {
    fns: Fns,
    path: String,
    version: i32,
    // Last: the function pointers above must not outlive the library.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nccl({} from `{}`)", self.version_string(), self.path)
    }
}

/// `major.minor.patch` of an `ncclGetVersion` code (2.9 and later:
/// `major*10000 + minor*100 + patch`; older: `major*1000 + minor*100 + patch`).
pub fn version_string(code: i32) -> String {
    if code >= 10000 {
        format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, (code % 1000) / 100, code % 100)
    }
}

impl Nccl {
    /// Loads NCCL: `FPDT_NCCL_LIB` if set (only that), else the first
    /// loadable `libnccl` of the finder's search.
    pub fn load() -> Result<Arc<Nccl>> {
        Self::load_with(&libs::SearchEnv::from_process())
    }

    /// [`Nccl::load`] as seen from `env` (variables, filesystem root).
    pub fn load_with(env: &libs::SearchEnv) -> Result<Arc<Nccl>> {
        let found = libs::find_library_in(&libs::NCCL, env)
            .map_err(|e| CommError::NcclUnavailable(e.to_string()))?;
        Self::from_library(found.library, &found.path.display().to_string())
    }

    /// Loads NCCL from `path` (a file path or a soname).
    pub fn load_from(path: &str) -> Result<Arc<Nccl>> {
        // SAFETY: loading a shared library runs its initializers; NCCL's
        // (and any library a user names as NCCL) are trusted like any other
        // linked library. Nothing else is assumed about it here.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
            CommError::NcclUnavailable(format!(
                "cannot load `{path}`: {}",
                libs::loader_message(&e)
            ))
        })?;
        Self::from_library(lib, path)
    }

    fn from_library(lib: libloading::Library, path: &str) -> Result<Arc<Nccl>> {
        let fns = Fns::resolve(&lib, path).map_err(CommError::NcclUnavailable)?;
        let mut version: c_int = 0;
        // SAFETY: ncclGetVersion writes one int through the pointer, which
        // points to a live local.
        let code = unsafe { (fns.get_version)(&mut version) };
        let nccl = Nccl {
            fns,
            path: path.to_string(),
            version,
            _lib: lib,
        };
        nccl.check("ncclGetVersion", code, None)?;
        Ok(Arc::new(nccl))
    }

    /// The file (or soname) loaded.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `ncclGetVersion`'s code.
    pub fn version(&self) -> i32 {
        self.version
    }

    /// The version as `major.minor.patch`.
    pub fn version_string(&self) -> String {
        version_string(self.version)
    }

    /// `ncclGetErrorString` of `code`.
    pub fn error_string(&self, code: i32) -> String {
        // SAFETY: ncclGetErrorString takes any value and returns a pointer
        // to a static NUL-terminated string (or null, handled below).
        let p = unsafe { (self.fns.get_error_string)(code) };
        if p.is_null() {
            return String::from("(no error string)");
        }
        // SAFETY: non-null, NUL-terminated and static, as NCCL documents.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn check(&self, call: &'static str, code: i32, comm: Option<RawCommPtr>) -> Result<()> {
        if code == NCCL_SUCCESS {
            return Ok(());
        }
        let mut message = self.error_string(code);
        if let (Some(last), Some(c)) = (self.fns.get_last_error, comm) {
            // SAFETY: ncclGetLastError takes a live communicator (or null)
            // and returns a NUL-terminated string owned by NCCL, copied
            // at once.
            let p = unsafe { last(c) };
            if !p.is_null() {
                // SAFETY: non-null and NUL-terminated, per nccl.h.
                let s = unsafe { CStr::from_ptr(p) }.to_string_lossy();
                if !s.is_empty() {
                    message = format!("{message}: {s}");
                }
            }
        }
        Err(CommError::Nccl {
            call,
            code,
            code_name: ffi::result_name(code),
            message,
        })
    }

    /// A new unique id (rank 0 makes it; the rendezvous hands it out).
    pub fn unique_id(&self) -> Result<UniqueId> {
        let mut id = NcclUniqueId { internal: [0; 128] };
        // SAFETY: ncclGetUniqueId fills the 128-byte struct it points to,
        // a live local of that layout.
        let code = unsafe { (self.fns.get_unique_id)(&mut id) };
        self.check("ncclGetUniqueId", code, None)?;
        Ok(UniqueId(id.internal.map(|c| c as u8)))
    }
}

/// An NCCL unique id: the 128 bytes every rank of a communicator shares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId(pub [u8; 128]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UniqueId({:02x?}..)", &self.0[..8])
    }
}

impl UniqueId {
    /// From the bytes the rendezvous delivered.
    pub fn from_bytes(b: &[u8]) -> Result<UniqueId> {
        let a: [u8; 128] = b.try_into().map_err(|_| {
            CommError::Rendezvous(format!(
                "an NCCL unique id has 128 bytes, the rendezvous delivered {}",
                b.len()
            ))
        })?;
        Ok(UniqueId(a))
    }

    fn to_ffi(self) -> NcclUniqueId {
        NcclUniqueId {
            internal: self.0.map(|b| b as std::ffi::c_char),
        }
    }
}

/// A raw CUDA stream handle (`cudaStream_t` / `CUstream`; null is the
/// legacy default stream), as the cuda backend hands it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawStream(pub *mut c_void);

// SAFETY: a CUDA stream handle is an opaque token the driver accepts from
// any thread of the process; this type never dereferences it.
unsafe impl Send for RawStream {}
// SAFETY: as above; sharing the token shares no memory.
unsafe impl Sync for RawStream {}

/// What the cuda backend provides so that NCCL work can go on runtime
/// streams: enqueue `f` on `stream` with the stream's raw handle, holding
/// the views' memory (reads and writes) until the work `f` enqueued is done,
/// and recording it in the trace as `name` with `work`.
pub trait CudaLauncher: Send + Sync {
    /// Enqueues `f` on `stream`; `f` gets the raw stream handle.
    fn launch(
        &self,
        stream: &Stream,
        name: &str,
        work: Work,
        reads: &[View<'_>],
        writes: &[View<'_>],
        f: &mut dyn FnMut(RawStream) -> Result<()>,
    ) -> Result<()>;
}

struct RawComm(RawCommPtr);

// SAFETY: an ncclComm_t may be used from any thread as long as calls on it
// do not run concurrently; `NcclComm` serializes them behind a mutex.
unsafe impl Send for RawComm {}

/// Options of [`NcclComm::init_rank`].
pub struct InitOptions {
    /// Longest the init waits for every rank to join.
    pub timeout: Duration,
    /// Run on the init thread before `ncclCommInitRank` (NCCL uses the
    /// calling thread's current CUDA device: the cuda backend sets it here).
    pub on_init_thread: Option<Box<dyn FnOnce() -> Result<()> + Send>>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            timeout: Duration::from_secs(300),
            on_init_thread: None,
        }
    }
}

/// One rank of an NCCL communicator.
pub struct NcclComm {
    nccl: Arc<Nccl>,
    comm: Mutex<Option<RawComm>>,
    aborted: AtomicBool,
    rank: usize,
    world: usize,
    launcher: Option<Arc<dyn CudaLauncher>>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclComm(rank {}/{}, NCCL {})",
            self.rank,
            self.world,
            self.nccl.version_string()
        )
    }
}

fn dtype_code(nccl: &Nccl, d: DType) -> Result<c_int> {
    Ok(match d {
        DType::F32 => ffi::dtype::FLOAT32,
        DType::F64 => ffi::dtype::FLOAT64,
        DType::F16 => ffi::dtype::FLOAT16,
        DType::Bf16 => {
            if nccl.version < 21000 {
                return Err(CommError::Invalid(format!(
                    "bf16 reductions need NCCL 2.10 or newer, `{}` is {}",
                    nccl.path,
                    nccl.version_string()
                )));
            }
            ffi::dtype::BFLOAT16
        }
    })
}

fn op_code(nccl: &Nccl, op: ReduceOp) -> Result<c_int> {
    Ok(match op {
        ReduceOp::Sum => ffi::redop::SUM,
        ReduceOp::Max => ffi::redop::MAX,
        ReduceOp::Min => ffi::redop::MIN,
        ReduceOp::Avg => {
            if nccl.version < 21000 {
                return Err(CommError::Invalid(format!(
                    "avg reductions need NCCL 2.10 or newer, `{}` is {}",
                    nccl.path,
                    nccl.version_string()
                )));
            }
            ffi::redop::AVG
        }
    })
}

impl NcclComm {
    /// `ncclCommInitRank` for `rank` of `world`, on a helper thread so that
    /// a rank that never joins ends in [`CommError::Timeout`] after
    /// `opts.timeout` instead of a hang. (A timed-out init thread stays
    /// blocked inside NCCL; if it ever returns, it aborts the communicator.)
    pub fn init_rank(
        nccl: Arc<Nccl>,
        id: &UniqueId,
        rank: usize,
        world: usize,
        opts: InitOptions,
    ) -> Result<NcclComm> {
        if rank >= world {
            return Err(CommError::RankOutOfRange {
                what: "ncclCommInitRank".into(),
                rank,
                world,
            });
        }
        let (nranks, r) = match (c_int::try_from(world), c_int::try_from(rank)) {
            (Ok(n), Ok(r)) => (n, r),
            _ => {
                return Err(CommError::Invalid(format!(
                    "ncclCommInitRank: world size {world} does not fit NCCL's int"
                )))
            }
        };
        let (tx, rx) = std::sync::mpsc::channel::<Result<RawComm>>();
        let lib = nccl.clone();
        let raw_id = id.to_ffi();
        let hook = opts.on_init_thread;
        std::thread::Builder::new()
            .name(format!("fpdt-nccl-init-r{rank}"))
            .spawn(move || {
                let r = (|| {
                    if let Some(h) = hook {
                        h()?;
                    }
                    let mut comm: RawCommPtr = std::ptr::null_mut();
                    // SAFETY: `comm` is a live local NCCL writes the new
                    // handle to; the id is passed by value as nccl.h
                    // declares; nranks and rank were range-checked.
                    let code = unsafe { (lib.fns.comm_init_rank)(&mut comm, nranks, raw_id, r) };
                    lib.check("ncclCommInitRank", code, None)?;
                    Ok(RawComm(comm))
                })();
                if let Err(std::sync::mpsc::SendError(Ok(c))) = tx.send(r) {
                    // The caller gave up: nobody will use this communicator.
                    // SAFETY: `c` is the live handle NCCL just returned,
                    // owned by no one else; abort frees it.
                    unsafe { (lib.fns.comm_abort)(c.0) };
                }
            })
            .map_err(|e| CommError::io("starting the NCCL init thread", e))?;
        match rx.recv_timeout(opts.timeout) {
            Ok(Ok(c)) => Ok(NcclComm {
                nccl,
                comm: Mutex::new(Some(c)),
                aborted: AtomicBool::new(false),
                rank,
                world,
                launcher: None,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(CommError::Timeout {
                what: format!("ncclCommInitRank of rank {rank} of {world} (every rank must join)"),
                secs: opts.timeout.as_secs_f64(),
            }),
        }
    }

    /// Loads NCCL, shares a unique id from rank 0 over the rendezvous, and
    /// initializes this rank. The CUDA device must be current on the init
    /// thread (see [`InitOptions::on_init_thread`]).
    pub fn from_env(env: &RendezvousEnv, opts: InitOptions) -> Result<NcclComm> {
        let nccl = Nccl::load()?;
        let n = nccl.clone();
        let bytes = env.share_from_rank0(opts.timeout, move || Ok(n.unique_id()?.0.to_vec()))?;
        let id = UniqueId::from_bytes(&bytes)?;
        Self::init_rank(nccl, &id, env.rank, env.world_size, opts)
    }

    /// The library.
    pub fn library(&self) -> &Arc<Nccl> {
        &self.nccl
    }

    /// Sets how collectives get onto runtime streams (the cuda backend).
    pub fn set_launcher(&mut self, launcher: Arc<dyn CudaLauncher>) {
        self.launcher = Some(launcher);
    }

    fn handle(&self) -> Result<MutexGuard<'_, Option<RawComm>>> {
        let g = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            return Err(CommError::Aborted {
                rank: self.rank,
                reason: "the NCCL communicator was aborted".into(),
            });
        }
        Ok(g)
    }

    fn ptr(g: &MutexGuard<'_, Option<RawComm>>) -> RawCommPtr {
        g.as_ref().map_or(std::ptr::null_mut(), |c| c.0)
    }

    /// `ncclCommGetAsyncError`: Ok while none is pending (or the
    /// communicator is still initializing).
    pub fn async_error(&self) -> Result<()> {
        let g = self.handle()?;
        let c = Self::ptr(&g);
        let mut state = NCCL_SUCCESS;
        // SAFETY: `c` is the live handle (the guard holds it), `state` a
        // live local NCCL writes to.
        let code = unsafe { (self.nccl.fns.comm_get_async_error)(c, &mut state) };
        self.nccl.check("ncclCommGetAsyncError", code, Some(c))?;
        if state == NCCL_SUCCESS || state == NCCL_IN_PROGRESS {
            return Ok(());
        }
        self.nccl
            .check("an asynchronous NCCL operation", state, Some(c))
    }

    /// `ncclCommAbort`: frees the communicator without waiting for peers;
    /// every later call fails with [`CommError::Aborted`]. Idempotent.
    pub fn abort_now(&self) -> Result<()> {
        let mut g = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        self.aborted.store(true, Ordering::SeqCst);
        if let Some(c) = g.take() {
            // SAFETY: `c` is the live handle, taken out so no one uses it
            // again.
            let code = unsafe { (self.nccl.fns.comm_abort)(c.0) };
            self.nccl.check("ncclCommAbort", code, None)?;
        }
        Ok(())
    }

    /// Waits until `done()` says the enqueued work finished (the cuda
    /// backend passes a stream or event query), polling
    /// `ncclCommGetAsyncError` beside it. An asynchronous error, or
    /// `timeout` passing, aborts the communicator and returns the error,
    /// so a vanished peer ends in an error, not a hang.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Err(e) = self.async_error() {
                let _ = self.abort_now();
                return Err(e);
            }
            if done()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.abort_now();
                return Err(CommError::Timeout {
                    what: format!(
                        "NCCL work of rank {} of {} to complete",
                        self.rank, self.world
                    ),
                    secs: timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// `ncclGroupStart`, `f`, `ncclGroupEnd` (also when `f` fails).
    fn grouped(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        // SAFETY: group calls take no arguments; they only bracket the calls
        // in `f` on this thread.
        let code = unsafe { (self.nccl.fns.group_start)() };
        self.nccl.check("ncclGroupStart", code, None)?;
        let r = f();
        // SAFETY: closes the group opened above.
        let code = unsafe { (self.nccl.fns.group_end)() };
        r.and(self.nccl.check("ncclGroupEnd", code, None))
    }

    /// `ncclAllReduce` of `count` elements.
    ///
    /// # Safety
    /// `send` and `recv` must be device pointers (or the same pointer, in
    /// place) to `count` elements of `dtype` each, valid on `stream`'s
    /// device until the enqueued work completes; `stream` must be a live
    /// CUDA stream of that device.
    pub unsafe fn raw_all_reduce(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        stream: RawStream,
    ) -> Result<()> {
        let (d, o) = (dtype_code(&self.nccl, dtype)?, op_code(&self.nccl, op)?);
        let g = self.handle()?;
        let c = Self::ptr(&g);
        // SAFETY: the caller guarantees the pointers and the stream; `c`
        // is the live handle.
        let code = unsafe { (self.nccl.fns.all_reduce)(send, recv, count, d, o, c, stream.0) };
        self.nccl.check("ncclAllReduce", code, Some(c))
    }

    /// `ncclReduceScatter`: `recv_count` elements per rank.
    ///
    /// # Safety
    /// As [`NcclComm::raw_all_reduce`], with `send` holding
    /// `world * recv_count` elements and `recv` `recv_count`.
    pub unsafe fn raw_reduce_scatter(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        recv_count: usize,
        dtype: DType,
        op: ReduceOp,
        stream: RawStream,
    ) -> Result<()> {
        let (d, o) = (dtype_code(&self.nccl, dtype)?, op_code(&self.nccl, op)?);
        let g = self.handle()?;
        let c = Self::ptr(&g);
        // SAFETY: the caller guarantees the pointers and the stream.
        let code =
            unsafe { (self.nccl.fns.reduce_scatter)(send, recv, recv_count, d, o, c, stream.0) };
        self.nccl.check("ncclReduceScatter", code, Some(c))
    }

    /// `ncclAllGather` of `send_bytes` bytes per rank.
    ///
    /// # Safety
    /// `send` must hold `send_bytes` and `recv` `world * send_bytes` bytes
    /// of device memory, valid until the work completes, on `stream`'s
    /// device.
    pub unsafe fn raw_all_gather(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        send_bytes: usize,
        stream: RawStream,
    ) -> Result<()> {
        let g = self.handle()?;
        let c = Self::ptr(&g);
        // SAFETY: the caller guarantees the pointers and the stream.
        let code = unsafe {
            (self.nccl.fns.all_gather)(send, recv, send_bytes, ffi::dtype::INT8, c, stream.0)
        };
        self.nccl.check("ncclAllGather", code, Some(c))
    }

    /// `ncclBroadcast` of `bytes` bytes from `root`.
    ///
    /// # Safety
    /// `send` (read on the root) and `recv` must be `bytes` bytes of device
    /// memory, valid until the work completes, on `stream`'s device.
    pub unsafe fn raw_broadcast(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        bytes: usize,
        root: usize,
        stream: RawStream,
    ) -> Result<()> {
        check::root(self.world, root)?;
        let g = self.handle()?;
        let c = Self::ptr(&g);
        // SAFETY: the caller guarantees the pointers and the stream; root
        // was range-checked (so it fits an int, as world does).
        let code = unsafe {
            (self.nccl.fns.broadcast)(
                send,
                recv,
                bytes,
                ffi::dtype::INT8,
                root as c_int,
                c,
                stream.0,
            )
        };
        self.nccl.check("ncclBroadcast", code, Some(c))
    }

    /// All-to-all with per-peer byte counts as one group of `ncclSend` /
    /// `ncclRecv`: `send_splits[j]` bytes at their offset in `send` go to
    /// rank `j`, `recv_splits[i]` bytes from rank `i` land at their offset in
    /// `recv`.
    ///
    /// # Safety
    /// `send` and `recv` must hold the splits' sums of bytes of device
    /// memory, valid until the work completes, on `stream`'s device.
    pub unsafe fn raw_all_to_all_v(
        &self,
        send: *const c_void,
        send_splits: &[usize],
        recv: *mut c_void,
        recv_splits: &[usize],
        stream: RawStream,
    ) -> Result<()> {
        if send_splits.len() != self.world || recv_splits.len() != self.world {
            return Err(CommError::Invalid(format!(
                "all_to_all_v: {} send and {} recv splits for a world of {}",
                send_splits.len(),
                recv_splits.len(),
                self.world
            )));
        }
        let g = self.handle()?;
        let c = Self::ptr(&g);
        let fns = self.nccl.fns;
        self.grouped(|| {
            let (mut so, mut ro) = (0usize, 0usize);
            for peer in 0..self.world {
                let (sn, rn) = (send_splits[peer], recv_splits[peer]);
                let p = peer as c_int;
                if sn > 0 {
                    // SAFETY: `send + so .. + sn` lies inside the caller's
                    // send buffer (the offsets sum the splits); the stream
                    // and handle are live.
                    let code = unsafe {
                        (fns.send)(
                            send.cast::<u8>().add(so).cast(),
                            sn,
                            ffi::dtype::INT8,
                            p,
                            c,
                            stream.0,
                        )
                    };
                    self.nccl.check("ncclSend", code, Some(c))?;
                }
                if rn > 0 {
                    // SAFETY: as above, inside the receive buffer.
                    let code = unsafe {
                        (fns.recv)(
                            recv.cast::<u8>().add(ro).cast(),
                            rn,
                            ffi::dtype::INT8,
                            p,
                            c,
                            stream.0,
                        )
                    };
                    self.nccl.check("ncclRecv", code, Some(c))?;
                }
                so += sn;
                ro += rn;
            }
            Ok(())
        })
    }

    fn launcher(&self, op: &str, stream: &Stream) -> Result<&Arc<dyn CudaLauncher>> {
        if stream.device_kind() != DeviceKind::Cuda {
            return Err(CommError::Invalid(format!(
                "NCCL {op}: stream `{}` is on a {} device; NCCL needs cuda device memory",
                stream.name(),
                stream.device_kind()
            )));
        }
        self.launcher.as_ref().ok_or_else(|| {
            CommError::Invalid(format!(
                "NCCL {op} on stream `{}`: no CUDA stream launcher is set \
                 (NcclComm::set_launcher); the runtime's cuda backend provides it",
                stream.name()
            ))
        })
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let g = self.comm.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = g.take() {
            // SAFETY: the live handle, taken out; destroy frees it after
            // its pending work (abort was not called: it would have taken it).
            unsafe { (self.nccl.fns.comm_destroy)(c.0) };
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_to_all(&self, stream: &Stream, send: View<'_>, recv: View<'_>) -> Result<()> {
        check::all_to_all(self.world, &send, &recv)?;
        let b = send.len() / self.world;
        let splits = vec![b; self.world];
        self.all_to_all_v(stream, send, &splits, recv, &splits)
    }

    fn all_to_all_v(
        &self,
        stream: &Stream,
        send: View<'_>,
        send_splits: &[usize],
        recv: View<'_>,
        recv_splits: &[usize],
    ) -> Result<()> {
        check::splits(self.world, &send, send_splits, &recv, recv_splits)?;
        let l = self.launcher("all_to_all", stream)?;
        let (sp, rp) = (send.addr() as *const c_void, recv.addr() as *mut c_void);
        let t = (send.len() - send_splits[self.rank]) as u64;
        l.launch(
            stream,
            "nccl all_to_all",
            work(t),
            &[send],
            &[recv],
            &mut |s| {
                // SAFETY: the views are device memory of the stream's device
                // (checked kind; the launcher holds them until the work is
                // done), the splits add up to their lengths (checked).
                unsafe { self.raw_all_to_all_v(sp, send_splits, rp, recv_splits, s) }
            },
        )
    }

    fn all_reduce(&self, stream: &Stream, buf: View<'_>, dtype: DType, op: ReduceOp) -> Result<()> {
        check::elements("all_reduce", &buf, dtype)?;
        let l = self.launcher("all_reduce", stream)?;
        let p = buf.addr() as *mut c_void;
        let n = buf.len() / dtype.size();
        let t = traffic::all_reduce(buf.len(), self.world);
        l.launch(stream, "nccl all_reduce", work(t), &[], &[buf], &mut |s| {
            // SAFETY: in place on `n` elements of the view (checked), held
            // by the launcher until done.
            unsafe { self.raw_all_reduce(p, p, n, dtype, op, s) }
        })
    }

    fn reduce_scatter(
        &self,
        stream: &Stream,
        send: View<'_>,
        recv: View<'_>,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        check::reduce_scatter(self.world, &send, &recv, dtype)?;
        let l = self.launcher("reduce_scatter", stream)?;
        let (sp, rp) = (send.addr() as *const c_void, recv.addr() as *mut c_void);
        let n = recv.len() / dtype.size();
        let t = traffic::reduce_scatter(send.len(), self.world);
        l.launch(
            stream,
            "nccl reduce_scatter",
            work(t),
            &[send],
            &[recv],
            &mut |s| {
                // SAFETY: sizes checked (send = world x recv); views held.
                unsafe { self.raw_reduce_scatter(sp, rp, n, dtype, op, s) }
            },
        )
    }

    fn all_gather(&self, stream: &Stream, send: View<'_>, recv: View<'_>) -> Result<()> {
        check::all_gather(self.world, &send, &recv)?;
        let l = self.launcher("all_gather", stream)?;
        let (sp, rp) = (send.addr() as *const c_void, recv.addr() as *mut c_void);
        let n = send.len();
        let t = traffic::all_gather(recv.len(), self.world);
        l.launch(
            stream,
            "nccl all_gather",
            work(t),
            &[send],
            &[recv],
            &mut |s| {
                // SAFETY: sizes checked (recv = world x send); views held.
                unsafe { self.raw_all_gather(sp, rp, n, s) }
            },
        )
    }

    fn broadcast(&self, stream: &Stream, buf: View<'_>, root: usize) -> Result<()> {
        check::root(self.world, root)?;
        let l = self.launcher("broadcast", stream)?;
        let p = buf.addr() as *mut c_void;
        let n = buf.len();
        let t = traffic::broadcast(n, self.world);
        l.launch(stream, "nccl broadcast", work(t), &[], &[buf], &mut |s| {
            // SAFETY: in place on the view's bytes, held by the launcher.
            unsafe { self.raw_broadcast(p, p, n, root, s) }
        })
    }

    fn barrier(&self, stream: &Stream) -> Result<()> {
        // NCCL has no barrier: an all-reduce of nothing still synchronizes
        // the ranks' streams, but zero-byte collectives are no-ops in NCCL,
        // so a one-element all-gather into a scratch buffer would be needed;
        // the cuda backend owns scratch memory.
        let _ = self.launcher("barrier", stream)?;
        Err(CommError::Invalid(
            "NCCL barrier on a runtime stream needs a scratch device buffer from the cuda \
             backend (not built yet)"
                .into(),
        ))
    }

    fn abort(&self, _reason: &str) {
        let _ = self.abort_now();
    }

    fn synchronize(&self, stream: &Stream) -> Result<()> {
        stream.synchronize()?;
        self.async_error()
    }
}

#[cfg(test)]
mod tests;
