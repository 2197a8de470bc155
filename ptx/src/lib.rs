//! fpdt-ptx: the kernels of fpdt and the means to test them without a GPU.
//!
//! Every kernel exists three times (see `CONVENTIONS.md`):
//! - a hand-written PTX source in `ptx/kernels/`, embedded with `include_str!`;
//! - a launcher that validates shapes and builds a [`KernelLaunch`]
//!   (module, entry, grid, block, shared memory, packed arguments) that the
//!   cuda backend or the [`interp`] PTX interpreter runs;
//! - a CPU twin in [`cpu`], the cpu backend's implementation.
//!
//! Naive f64 references in [`reference`](mod@reference) are the oracle for both.

pub mod cpu;
mod error;
pub mod gpu;
pub mod interp;
pub mod kernels;
pub mod launch;
pub mod matmul;
pub mod reference;

pub use error::PtxError;
pub use gpu::{GpuRunner, Runner};
pub use launch::{Arg, Dim3, KernelLaunch};

/// The crate's result type.
pub type Result<T, E = PtxError> = std::result::Result<T, E>;
