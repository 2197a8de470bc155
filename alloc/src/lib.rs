//! fpdt-alloc: the memory under the fpdt runtime.
//!
//! - [`HostArena`]: one large anonymous mapping bound to the NUMA node
//!   nearest the GPU (`mbind`) and pinned through a [`Pinner`] (`mlock` here,
//!   `cuMemHostRegister` on cuda), sub-allocated into RAII [`HostBlock`]s.
//! - [`Topology`]: NUMA nodes, their cpus and memory, and a PCI device's
//!   node, from Linux sysfs (or hwloc with the `hwloc` feature).
//! - [`SlabAllocator`]: carves one reserved region (device memory, a host
//!   mapping, or a virtual range) into size classes with O(1) alloc and free,
//!   256-byte alignment, a budget and statistics. Blocks are RAII values.
//!
//! Nothing outside this crate and `fpdt-runtime` touches raw memory.

pub mod arena;
mod error;
#[cfg(feature = "hwloc")]
mod hwloc;
pub mod slab;
pub mod topology;

pub use arena::{
    memlock_limit, ArenaConfig, HostArena, HostBlock, MlockPinner, NoPinner, NumaBinding, PinState,
    Pinner,
};
pub use error::AllocError;
pub use slab::{Region, SlabAllocator, SlabBlock, SlabStats, TagStats, VirtualRegion, ALIGN};
pub use topology::{NumaNode, Topology};

/// Formats a byte count for people: `512 B`, `4.00 KiB`, `1.50 GiB`.
pub fn fmt_bytes(bytes: usize) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v < 10.0 {
        format!("{v:.2} {}", UNITS[u])
    } else if v < 100.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.0} {}", UNITS[u])
    }
}
