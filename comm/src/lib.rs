//! fpdt-comm: communication for sequence-parallel training.
//!
//! - [`Communicator`]: rank, world size and the collectives (all-to-all with
//!   equal and unequal splits, all-reduce, reduce-scatter, all-gather,
//!   broadcast, barrier), each enqueued on a stream of the caller's device.
//! - [`InProcessGroup`]: P ranks as threads of one process, each with its
//!   own device; what the tests and the cpu trainer use.
//! - [`nccl`]: a thin binding of `libnccl.so.2`, loaded at run time.
//! - [`rendezvous`]: the torchrun / Slurm environment, and rank 0 serving
//!   the NCCL unique id over TCP.
//! - [`ulysses`]: the head-parallel all-to-all of one chunk and its pack /
//!   unpack permutes; [`layout`]: the FPDT token layout.
//!
//! ```
//! use fpdt_comm::{Communicator, DType, GroupConfig, InProcessGroup, ReduceOp};
//! use fpdt_runtime::CpuConfig;
//! let cpu = CpuConfig { device_memory: 1 << 20, host_memory: 1 << 20, ..CpuConfig::default() };
//! let ranks = InProcessGroup::cpu(2, &cpu, GroupConfig::default())?;
//! let bufs = ranks
//!     .iter()
//!     .map(|c| c.device().upload(&[c.rank() as f32 + 1.0; 3], "x"))
//!     .collect::<Result<Vec<_>, _>>()?;
//! for (c, b) in ranks.iter().zip(&bufs) {
//!     c.all_reduce(c.device().compute(), b.view(), DType::F32, ReduceOp::Sum)?;
//! }
//! for (c, b) in ranks.iter().zip(&bufs) {
//!     c.synchronize(c.device().compute())?;
//!     assert_eq!(c.device().download::<f32>(b.view())?, vec![3.0; 3]);
//! }
//! # Ok::<(), fpdt_comm::CommError>(())
//! ```

mod communicator;
mod error;
mod inproc;
pub mod kernels;
pub mod layout;
pub mod nccl;
pub mod rendezvous;
mod types;
pub mod ulysses;

pub use communicator::Communicator;
pub use error::{CommError, Result};
pub use inproc::{GroupConfig, InProcessComm, InProcessGroup};
pub use layout::FpdtLayout;
pub use types::{reduce_into, DType, ReduceOp};
pub use ulysses::{UlyssesAllToAll, UlyssesConfig};
