//! fpdt: a runtime for training language models on ultra-long sequences,
//! a reimplementation of the Fully Pipelined Distributed Transformer (FPDT).
//!
//! This facade re-exports the workspace crates; see each crate for its part:
//! - [`alloc`]: the pinned, NUMA-bound host arena and the device slab allocator;
//! - [`runtime`]: devices (cpu, cuda, meta), streams, events, copies, chunk guards, traces;
//! - [`ptx`]: kernels (hand-written PTX, launchers, CPU twins) and the PTX interpreter;
//! - [`comm`]: communicators, the in-process group, NCCL, the Ulysses all-to-all;
//! - [`model`]: GPT and Llama, the FPDT layer, the optimizer, data and checkpoints.

pub use fpdt_alloc as alloc;
pub use fpdt_comm as comm;
pub use fpdt_model as model;
pub use fpdt_ptx as ptx;
pub use fpdt_runtime as runtime;

/// The README's Rust examples, compiled and run as doctests so they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
