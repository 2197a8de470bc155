//! Devices: one API, three backends.
//!
//! - **cpu** (the default, and what CI tests): device memory is a separate,
//!   budgeted region carved by the slab allocator; host memory is the arena;
//!   streams are worker threads; copies run on copy-stream threads, so
//!   copy/compute overlap is real and the trace shows it.
//! - **meta**: no data and no compute. Allocations, copies and kernels are
//!   recorded with their sizes, and a cost model advances each stream's
//!   clock. Running the real schedule on it gives the exact peak memory of a
//!   configuration far beyond this machine and a predicted step time.
//! - **cuda**: an NVIDIA GPU through the driver API (see [`crate::cuda`]);
//!   `Device::cuda` probes first and says why there is no GPU instead of
//!   panicking.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fpdt_alloc::{
    AllocError, ArenaConfig, HostArena, MlockPinner, NoPinner, PinState, SlabAllocator, SlabStats,
};
use serde::Serialize;

use crate::cost::CostModel;
use crate::cpu::MappedRegion;
use crate::cuda::queue::Gpu;
use crate::cuda::{CudaConfig, CudaHostPinner, CudaRegion};
use crate::error::{Result, RuntimeError};
use crate::memory::{rounded, DeviceBuffer, HostBuffer, MemInner, MemoryLedger, Space, View};
use crate::stream::{retire_cuda_streams, Event, Stream, StreamInner};
use crate::trace::Trace;

/// Which backend a device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// Host threads and host memory standing in for a GPU.
    Cpu,
    /// An NVIDIA GPU through the CUDA driver.
    Cuda,
    /// No data, no compute: sizes and predicted times only.
    Meta,
}

impl DeviceKind {
    /// "cpu", "cuda" or "meta".
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Meta => "meta",
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DeviceKind {
    type Err = RuntimeError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda),
            "meta" => Ok(DeviceKind::Meta),
            other => Err(RuntimeError::Invalid(format!(
                "device `{other}` is unknown: use cpu, cuda or meta"
            ))),
        }
    }
}

/// Says once per process that a host arena could not be pinned: copies from
/// pageable memory are slower, and a user timing overlap must know.
fn warn_once_unpinned(arena: &HostArena) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| eprintln!("fpdt: warning: {}", arena.report()));
}

static NEXT_DEVICE_ID: AtomicU64 = AtomicU64::new(1);

/// What every stream and buffer of a device shares.
pub(crate) struct Core {
    pub(crate) id: u64,
    pub(crate) kind: DeviceKind,
    pub(crate) name: String,
    pub(crate) trace: Trace,
    pub(crate) epoch: Instant,
    pub(crate) ledger: Arc<MemoryLedger>,
    pub(crate) cost: CostModel,
    pub(crate) wait_timeout: Duration,
    /// The host's position on the meta device's virtual clock.
    meta_host_ns: AtomicU64,
    /// On cuda: the context and the GPU clock's origin.
    pub(crate) gpu: Option<Arc<Gpu>>,
    /// On cuda: the device's streams, whose completed work a host wait
    /// retires.
    pub(crate) cuda_streams: Mutex<Vec<Weak<StreamInner>>>,
    /// The host arena's allocator (a handle on the device's), for the
    /// staging buffers of host kernels on cuda streams.
    pub(crate) host_mem: SlabAllocator,
}

impl Core {
    pub(crate) fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub(crate) fn meta_host_time(&self) -> u64 {
        self.meta_host_ns.load(Ordering::Relaxed)
    }

    pub(crate) fn advance_meta_host(&self, t: u64) {
        self.meta_host_ns.fetch_max(t, Ordering::Relaxed);
    }

    /// A block of `slab` (this device's, of `space`); when it is full but
    /// the ledger says the request fits, waits (up to `wait_timeout`) for
    /// in-flight work to give blocks back.
    pub(crate) fn alloc_block(
        &self,
        slab: &SlabAllocator,
        space: Space,
        bytes: usize,
        tag: &'static str,
    ) -> Result<fpdt_alloc::SlabBlock> {
        let deadline = Instant::now() + self.wait_timeout;
        loop {
            match slab.alloc(bytes, tag) {
                Ok(b) => return Ok(b),
                Err(e @ AllocError::OutOfMemory { .. }) => {
                    // Blocks the program already released may still be held
                    // by in-flight work (an offload's copy). If the program's
                    // own accounting says the request fits, wait for them.
                    let logical = self.ledger.usage(space).in_use;
                    let fits = logical + rounded(bytes) <= slab.budget();
                    let now = Instant::now();
                    if !fits || now >= deadline {
                        return Err(e.into());
                    }
                    // On cuda, completed work gives its blocks back only
                    // when retired.
                    retire_cuda_streams(self);
                    slab.wait_for_free((deadline - now).min(Duration::from_millis(50)));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A pinned host buffer from this device's arena.
    pub(crate) fn alloc_host(&self, bytes: usize, tag: &'static str) -> Result<HostBuffer> {
        let block = self.alloc_block(&self.host_mem, Space::Host, bytes, tag)?;
        Ok(HostBuffer::new(
            block,
            self.kind != DeviceKind::Meta,
            self.ledger.clone(),
            self.id,
        ))
    }

    pub(crate) fn owns(&self, mem: &Arc<MemInner>) -> bool {
        mem.device_id() == self.id
    }
}

/// Configuration of a cpu device.
#[derive(Debug, Clone)]
pub struct CpuConfig {
    /// Name in traces and errors.
    pub name: String,
    /// Size of the device memory region (its budget), bytes. The region is
    /// an anonymous mapping, so untouched memory costs nothing.
    pub device_memory: usize,
    /// Size of the host arena, bytes.
    pub host_memory: usize,
    /// Pin the host arena with `mlock` (pages are locked as they are first
    /// touched). When the memlock limit refuses, the arena stays pageable
    /// and [`Device::host_arena_report`] says why.
    pub pin_host_memory: bool,
    /// Bind the host arena to this NUMA node (None: the kernel places pages).
    pub numa_node: Option<usize>,
    /// Fill freed device memory with 0xFF (NaN for f32 and bf16), so a use
    /// after free shows up in results. For tests.
    pub poison_freed: bool,
    /// Longest a stream or the host waits for an event before giving up.
    pub wait_timeout: Duration,
}

impl Default for CpuConfig {
    fn default() -> Self {
        CpuConfig {
            name: "cpu0".into(),
            device_memory: 2 << 30,
            host_memory: 4 << 30,
            pin_host_memory: true,
            numa_node: None,
            poison_freed: false,
            wait_timeout: Duration::from_secs(600),
        }
    }
}

/// Configuration of a meta device.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    /// Name in traces and errors.
    pub name: String,
    /// Device memory budget, bytes. Allocations beyond it fail as they would
    /// on the real device.
    pub device_memory: usize,
    /// Host memory budget, bytes.
    pub host_memory: usize,
    /// The rates the predicted times come from.
    pub cost: CostModel,
}

impl Default for MetaConfig {
    fn default() -> Self {
        MetaConfig {
            name: "meta0".into(),
            device_memory: 80 << 30,
            host_memory: 1 << 40,
            cost: CostModel::h100_sxm(),
        }
    }
}

struct DeviceInner {
    core: Arc<Core>,
    device_mem: SlabAllocator,
    /// The pinned arena behind the host allocator (`core.host_mem`; None on
    /// meta, whose host memory is a virtual range).
    arena: Option<HostArena>,
    compute: Stream,
    h2d: Stream,
    d2h: Stream,
    streams: Mutex<Vec<Stream>>,
    next_stream: AtomicU32,
}

/// A device: its memory, its streams (compute, host-to-device copies,
/// device-to-host copies, and any created later), its trace and its ledger.
/// Cheap to clone (a handle).
#[derive(Clone)]
pub struct Device {
    inner: Arc<DeviceInner>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({} `{}`)", self.kind(), self.name())
    }
}

impl Device {
    /// A cpu device.
    pub fn cpu(cfg: CpuConfig) -> Result<Device> {
        if cfg.device_memory == 0 || cfg.host_memory == 0 {
            return Err(RuntimeError::Invalid(format!(
                "cpu device `{}`: device_memory ({}) and host_memory ({}) must be non-zero",
                cfg.name, cfg.device_memory, cfg.host_memory
            )));
        }
        let dev_region = MappedRegion::new(cfg.device_memory, cfg.poison_freed, "device memory")?;
        let device_mem = SlabAllocator::new(dev_region, cfg.device_memory, "device")?;
        let arena = HostArena::new(ArenaConfig {
            bytes: cfg.host_memory,
            numa_node: cfg.numa_node,
            pinner: if cfg.pin_host_memory {
                Arc::new(MlockPinner)
            } else {
                Arc::new(NoPinner)
            },
            poison_freed: cfg.poison_freed,
        })?;
        if cfg.pin_host_memory {
            if let PinState::Unpinned { .. } = arena.pin_state() {
                warn_once_unpinned(&arena);
            }
        }
        Self::build(
            DeviceKind::Cpu,
            None,
            Instant::now(),
            cfg.name,
            CostModel::cpu_estimate(),
            cfg.wait_timeout,
            device_mem,
            arena.allocator().clone(),
            Some(arena),
        )
    }

    /// A cpu device with the default configuration.
    pub fn cpu_default() -> Result<Device> {
        Self::cpu(CpuConfig::default())
    }

    /// A meta device.
    pub fn meta(cfg: MetaConfig) -> Result<Device> {
        let device_mem = SlabAllocator::virtual_region(cfg.device_memory, "device")?;
        let host_mem = SlabAllocator::virtual_region(cfg.host_memory, "host")?;
        Self::build(
            DeviceKind::Meta,
            None,
            Instant::now(),
            cfg.name,
            cfg.cost,
            Duration::from_secs(600),
            device_mem,
            host_mem,
            None,
        )
    }

    /// A CUDA device with the default configuration (90% of the free
    /// memory, a 4 GiB pinned arena on the GPU's NUMA node). Returns an
    /// error (never panics) where the driver or the GPU is missing.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Self::cuda_with(CudaConfig {
            ordinal,
            ..CudaConfig::default()
        })
    }

    /// A CUDA device.
    pub fn cuda_with(cfg: CudaConfig) -> Result<Device> {
        cfg.validate()?;
        crate::cuda::init()?;
        let name = cfg
            .name
            .clone()
            .unwrap_or_else(|| format!("cuda{}", cfg.ordinal));
        let ctx = Arc::new(crate::cuda::Context::new(
            cfg.ordinal,
            cfg.check_each_launch,
        )?);
        let (free, _) = ctx.mem_info()?;
        let bytes = cfg.region_bytes(free)?;
        let region = CudaRegion::new(ctx.clone(), bytes)?;
        let device_mem = SlabAllocator::new(region, bytes, "device")?;
        let numa_node = match cfg.numa_node {
            Some(n) => Some(n),
            // The node of the GPU's PCI slot, where copies cross one link;
            // unknown topology: let the kernel place the pages.
            None => fpdt_alloc::Topology::detect()
                .ok()
                .and_then(|t| t.pci_node(&ctx.info.pci_bus_id).ok().flatten()),
        };
        let arena = HostArena::new(ArenaConfig {
            bytes: cfg.host_memory,
            numa_node,
            pinner: if cfg.pin_host_memory {
                Arc::new(CudaHostPinner { ctx: ctx.clone() })
            } else {
                Arc::new(NoPinner)
            },
            poison_freed: false,
        })?;
        if cfg.pin_host_memory {
            if let PinState::Unpinned { .. } = arena.pin_state() {
                warn_once_unpinned(&arena);
            }
        }
        let epoch = Instant::now();
        let gpu = Arc::new(Gpu::new(ctx, || epoch.elapsed().as_nanos() as u64)?);
        Self::build(
            DeviceKind::Cuda,
            Some(gpu),
            epoch,
            name,
            CostModel::h100_sxm(),
            cfg.wait_timeout,
            device_mem,
            arena.allocator().clone(),
            Some(arena),
        )
    }

    /// What the driver says about this device's GPU (None off cuda).
    pub fn gpu_info(&self) -> Option<&crate::cuda::GpuInfo> {
        self.inner.core.gpu.as_ref().map(|g| &g.ctx.info)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        kind: DeviceKind,
        gpu: Option<Arc<Gpu>>,
        epoch: Instant,
        name: String,
        cost: CostModel,
        wait_timeout: Duration,
        device_mem: SlabAllocator,
        host_mem: SlabAllocator,
        arena: Option<HostArena>,
    ) -> Result<Device> {
        let core = Arc::new(Core {
            id: NEXT_DEVICE_ID.fetch_add(1, Ordering::Relaxed),
            kind,
            trace: Trace::new(name.clone()),
            name,
            epoch,
            ledger: Arc::new(MemoryLedger::default()),
            cost,
            wait_timeout,
            meta_host_ns: AtomicU64::new(0),
            gpu,
            cuda_streams: Mutex::new(Vec::new()),
            host_mem,
        });
        let compute = Stream::new(core.clone(), 0, "compute")?;
        let h2d = Stream::new(core.clone(), 1, "h2d")?;
        let d2h = Stream::new(core.clone(), 2, "d2h")?;
        Ok(Device {
            inner: Arc::new(DeviceInner {
                core,
                device_mem,
                arena,
                streams: Mutex::new(vec![compute.clone(), h2d.clone(), d2h.clone()]),
                compute,
                h2d,
                d2h,
                next_stream: AtomicU32::new(3),
            }),
        })
    }

    /// The backend.
    pub fn kind(&self) -> DeviceKind {
        self.inner.core.kind
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.inner.core.name
    }

    /// Whether the device holds data (false on meta).
    pub fn has_data(&self) -> bool {
        self.kind() != DeviceKind::Meta
    }

    /// The stream kernels run on.
    pub fn compute(&self) -> &Stream {
        &self.inner.compute
    }

    /// The stream host-to-device copies (prefetches) run on.
    pub fn h2d(&self) -> &Stream {
        &self.inner.h2d
    }

    /// The stream device-to-host copies (offloads) run on.
    pub fn d2h(&self) -> &Stream {
        &self.inner.d2h
    }

    /// A new stream (for example one per communicator).
    pub fn new_stream(&self, name: &str) -> Result<Stream> {
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        let s = Stream::new(self.inner.core.clone(), id, name)?;
        self.inner
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(s.clone());
        Ok(s)
    }

    /// Waits for every stream of the device; reports the first failure.
    pub fn synchronize(&self) -> Result<()> {
        let streams = self
            .inner
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut first = None;
        for s in &streams {
            if let Err(e) = s.synchronize() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Finishes the queued work and closes every stream: later work fails
    /// with [`RuntimeError::StreamClosed`]. Memory stays readable.
    pub fn shutdown(&self) -> Result<()> {
        let r = self.synchronize();
        for s in self
            .inner
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            s.close();
        }
        r
    }

    fn alloc_in(
        &self,
        space: Space,
        bytes: usize,
        tag: &'static str,
    ) -> Result<fpdt_alloc::SlabBlock> {
        let slab = match space {
            Space::Device => &self.inner.device_mem,
            Space::Host => &self.inner.core.host_mem,
        };
        self.inner.core.alloc_block(slab, space, bytes, tag)
    }

    /// Allocates device memory.
    pub fn alloc(&self, bytes: usize, tag: &'static str) -> Result<DeviceBuffer> {
        let block = self.alloc_in(Space::Device, bytes, tag)?;
        Ok(DeviceBuffer::new(
            block,
            self.has_data(),
            self.inner.core.ledger.clone(),
            self.inner.core.id,
        ))
    }

    /// Allocates host memory from the arena.
    pub fn alloc_host(&self, bytes: usize, tag: &'static str) -> Result<HostBuffer> {
        self.inner.core.alloc_host(bytes, tag)
    }

    /// Allocates device memory and copies `data` into it, on the compute
    /// stream; returns once the copy is done. On meta only allocates.
    pub fn upload<T: bytemuck::Pod>(&self, data: &[T], tag: &'static str) -> Result<DeviceBuffer> {
        let bytes = std::mem::size_of_val(data);
        let buf = self.alloc(bytes, tag)?;
        if self.has_data() {
            let mut staging = self.alloc_host(bytes, "staging")?;
            staging.copy_from(data)?;
            self.compute().copy(staging.view(), buf.view())?;
            self.compute().synchronize()?;
        }
        Ok(buf)
    }

    /// Copies `data` into device memory `dst` (same byte length), after the
    /// work already enqueued on the compute stream; returns once done.
    pub fn write<T: bytemuck::Pod>(&self, dst: View<'_>, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        if bytes != dst.len() {
            return Err(RuntimeError::Invalid(format!(
                "write to `{}`: {} bytes of data for a view of {} bytes",
                dst.tag(),
                bytes,
                dst.len()
            )));
        }
        if !self.has_data() {
            return Ok(());
        }
        let mut staging = self.alloc_host(bytes, "staging")?;
        staging.copy_from(data)?;
        self.compute().copy(staging.view(), dst)?;
        self.compute().synchronize()
    }

    /// Copies device (or host) memory back to a vector, after the work
    /// already enqueued on the compute stream; returns once done.
    pub fn download<T: bytemuck::Pod>(&self, src: View<'_>) -> Result<Vec<T>> {
        if !self.has_data() {
            return Err(RuntimeError::NoData {
                what: format!("downloading `{}`", src.tag()),
            });
        }
        let size = std::mem::size_of::<T>().max(1);
        if src.len() % size != 0 {
            return Err(RuntimeError::Invalid(format!(
                "download of `{}`: {} bytes is not a whole number of {}",
                src.tag(),
                src.len(),
                std::any::type_name::<T>()
            )));
        }
        let staging = self.alloc_host(src.len(), "staging")?;
        self.compute().copy(src, staging.view())?;
        self.compute().synchronize()?;
        staging.to_vec(src.len() / size)
    }

    /// Records an event on the compute stream.
    pub fn record(&self) -> Result<Event> {
        self.compute().record()
    }

    /// The logical memory ledger (program order; what the planner reports).
    pub fn ledger(&self) -> &MemoryLedger {
        &self.inner.core.ledger
    }

    /// Statistics of the device memory slab (physical blocks).
    pub fn device_stats(&self) -> SlabStats {
        self.inner.device_mem.stats()
    }

    /// Statistics of the host arena (physical blocks).
    pub fn host_stats(&self) -> SlabStats {
        self.inner.core.host_mem.stats()
    }

    /// Device memory budget, bytes.
    pub fn device_budget(&self) -> usize {
        self.inner.device_mem.budget()
    }

    /// The pinned host arena (None on meta).
    pub fn host_arena(&self) -> Option<&HostArena> {
        self.inner.arena.as_ref()
    }

    /// One line on the host arena: size, NUMA binding, pinning (and why
    /// not); on meta, its budget.
    pub fn host_arena_report(&self) -> String {
        match &self.inner.arena {
            Some(a) => a.report(),
            None => format!(
                "host memory of {}: virtual (meta device)",
                fpdt_alloc::fmt_bytes(self.host_budget())
            ),
        }
    }

    /// Host memory budget, bytes.
    pub fn host_budget(&self) -> usize {
        self.inner.core.host_mem.budget()
    }

    /// The device's trace.
    pub fn trace(&self) -> &Trace {
        &self.inner.core.trace
    }

    /// The cost model (predicted times on meta; annotations elsewhere).
    pub fn cost_model(&self) -> &CostModel {
        &self.inner.core.cost
    }

    /// Now on the device's clock, in nanoseconds: wall time since creation
    /// on cpu; on meta, the latest of the host's and every stream's
    /// predicted clock.
    pub fn now_ns(&self) -> u64 {
        match self.kind() {
            DeviceKind::Meta => {
                let streams = self
                    .inner
                    .streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                streams
                    .iter()
                    .filter_map(Stream::meta_time_ns)
                    .fold(self.inner.core.meta_host_time(), u64::max)
            }
            _ => self.inner.core.now_ns(),
        }
    }
}

impl Drop for DeviceInner {
    fn drop(&mut self) {
        if self.core.kind == DeviceKind::Cuda {
            // Finish the GPU's work before the slab and the arena (fields
            // dropped before the streams) give their memory back.
            let streams =
                std::mem::take(&mut *self.streams.lock().unwrap_or_else(|e| e.into_inner()));
            for s in &streams {
                let _ = s.synchronize();
            }
        }
    }
}
