//! fpdt-runtime: devices, streams, events, copies, chunk guards and traces.
//!
//! Every piece of the FPDT schedule is written once against this API and
//! runs on three backends ([`DeviceKind`]): cpu (threads standing in for a
//! GPU, the default and what CI tests), meta (sizes and predicted times, no
//! data: the planner) and cuda.
//!
//! ```
//! use fpdt_runtime::{Device, Work};
//! let dev = Device::cpu_default()?;
//! let x = dev.upload(&[1.0f32, 2.0, 3.0], "x")?;
//! let y = dev.alloc(12, "y")?;
//! dev.compute().launch_host("double", Work::kernel(3.0, 24), &[x.view()], &[y.view()],
//!     Box::new(|ins, outs| {
//!         let x: &[f32] = bytemuck::cast_slice(ins[0]);
//!         let y: &mut [f32] = bytemuck::cast_slice_mut(&mut *outs[0]);
//!         for (y, x) in y.iter_mut().zip(x) { *y = 2.0 * x; }
//!         Ok(())
//!     }))?;
//! assert_eq!(dev.download::<f32>(y.view())?, vec![2.0, 4.0, 6.0]);
//! # Ok::<(), fpdt_runtime::RuntimeError>(())
//! ```

pub mod chunk;
mod cost;
mod cpu;
pub mod cublaslt;
pub mod cuda;
mod device;
mod error;
pub mod libs;
mod memory;
mod stream;
pub mod trace;

pub use chunk::{
    ChunkMover, DoubleBuffer, HostChunk, HostSlot, Pending, PendingSlot, Resident, SlotGuard,
};
pub use cost::CostModel;
pub use cuda::{CudaConfig, GpuInfo, KernelArg, PtxKernel};
pub use device::{CpuConfig, Device, DeviceKind, MetaConfig};
pub use error::{Result, RuntimeError};
pub use memory::{
    AllocEvent, DeviceBuffer, HostBuffer, HostRead, MemoryLedger, SharedView, Space, SpaceUsage,
    View,
};
pub use stream::{Event, HostFn, Stream, Work};
pub use trace::{KindTotal, OpKind, Trace, TraceEvent, TraceTotals};

pub use fpdt_alloc::{fmt_bytes, SlabStats, TagStats};
