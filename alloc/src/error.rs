//! The allocator crate's error type.

use crate::fmt_bytes;

/// Errors of the allocators.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// No block of the requested size fits the budget or the free space.
    #[error(
        "out of {space} memory: a request of {} for `{tag}` failed with {} in use of a {} budget \
         (largest free block {}); use a smaller chunk size or raise the {space} memory budget",
        fmt_bytes(*request), fmt_bytes(*in_use), fmt_bytes(*budget), fmt_bytes(*largest_free)
    )]
    OutOfMemory {
        /// The memory space ("device", "host").
        space: &'static str,
        /// Bytes asked for.
        request: usize,
        /// What they were for.
        tag: &'static str,
        /// Bytes in use at the time.
        in_use: usize,
        /// The budget.
        budget: usize,
        /// The largest block that could have been handed out.
        largest_free: usize,
    },
    /// The NUMA topology could not be read.
    #[error("topology: {0}")]
    Topology(String),
    /// A configuration that cannot work (budget above the region, misaligned base, ...).
    #[error("invalid allocator configuration: {0}")]
    InvalidConfig(String),
}
