//! The cuda backend: the driver API through cudarc's raw bindings, loaded
//! at run time, so the crate builds and its tests run where there is no
//! CUDA at all; [`crate::Device::cuda`] then says why there is no GPU.
//!
//! - **memory**: one `cuMemAlloc` region per device, carved by the slab
//!   allocator; the host arena registered with `cuMemHostRegister`, placed
//!   on the NUMA node of the GPU's PCI slot;
//! - **streams**: compute, h2d and d2h are `CUstream`s; events are
//!   `CUevent`s (cross-stream waits with `cuStreamWaitEvent`); copies are
//!   `cuMemcpyAsync`, so the copy engines run beside the compute stream;
//! - **kernels**: PTX modules loaded once per context, functions cached,
//!   arguments checked against the `.entry`'s parameter list and every
//!   pointer against the views the launch declares ([`launch`]);
//! - **GEMM**: cuBLASLt over views ([`blas`]), enqueued and traced like a
//!   kernel, its workspace from the slab;
//! - **trace**: every copy and kernel is bracketed by timing events, so the
//!   Chrome trace shows what the GPU did and when.

pub mod blas;
mod driver;
pub mod fake;
pub mod launch;
mod memory;
pub(crate) mod queue;

use std::time::Duration;

pub use blas::{Blas, Gemm};
pub use driver::{driver_version, probe, GpuInfo};
pub(crate) use driver::{init, Context};
pub use launch::{KernelArg, LaunchLimits, PtxKernel};
pub(crate) use memory::{CudaHostPinner, CudaRegion};

use crate::error::{Result, RuntimeError};

/// Configuration of a cuda device.
#[derive(Debug, Clone)]
pub struct CudaConfig {
    /// The GPU's ordinal (as `nvidia-smi` lists them, subject to
    /// `CUDA_VISIBLE_DEVICES`).
    pub ordinal: usize,
    /// Name in traces and errors (default `cuda<ordinal>`).
    pub name: Option<String>,
    /// Device memory to reserve, bytes; None: `memory_fraction` of the
    /// memory free when the device is made.
    pub device_memory: Option<usize>,
    /// Share of the free memory the slab takes when `device_memory` is None
    /// (the rest stays for cuBLASLt, NCCL and other processes), in (0, 1].
    pub memory_fraction: f64,
    /// Size of the host arena, bytes.
    pub host_memory: usize,
    /// Register the host arena with `cuMemHostRegister`, so copies from and
    /// to it run at the link's speed and asynchronously.
    pub pin_host_memory: bool,
    /// NUMA node of the host arena; None: the node of the GPU's PCI slot.
    pub numa_node: Option<usize>,
    /// Longest a stream or the host waits for an event before giving up.
    pub wait_timeout: Duration,
    /// Wait for each kernel right after its launch and report its fault
    /// there, naming it (default: in debug builds). This serialises the
    /// host with the GPU, so copies enqueued after a kernel cannot overlap
    /// it: turn it off to measure overlap.
    pub check_each_launch: bool,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            ordinal: 0,
            name: None,
            device_memory: None,
            memory_fraction: 0.9,
            host_memory: 4 << 30,
            pin_host_memory: true,
            numa_node: None,
            wait_timeout: Duration::from_secs(600),
            check_each_launch: cfg!(debug_assertions),
        }
    }
}

/// Slabs are carved in 2 MiB units (the driver's large page).
const REGION_GRANULE: usize = 2 << 20;

impl CudaConfig {
    /// Checks the fields that need no GPU.
    pub fn validate(&self) -> Result<()> {
        let f = self.memory_fraction;
        if !(f > 0.0 && f <= 1.0) {
            return Err(RuntimeError::Invalid(format!(
                "cuda device {}: memory_fraction = {f}: it must lie in (0, 1]",
                self.ordinal
            )));
        }
        if self.host_memory == 0 {
            return Err(RuntimeError::Invalid(format!(
                "cuda device {}: host_memory = 0: the host arena needs at least one byte",
                self.ordinal
            )));
        }
        if self.device_memory == Some(0) {
            return Err(RuntimeError::Invalid(format!(
                "cuda device {}: device_memory = 0: give a size or None for a share of free memory",
                self.ordinal
            )));
        }
        Ok(())
    }

    /// The slab's size given the free device memory: the asked size, which
    /// must be free, or the fraction of what is free, in whole granules.
    pub fn region_bytes(&self, free: usize) -> Result<usize> {
        self.validate()?;
        let want = match self.device_memory {
            Some(b) => {
                if b > free {
                    return Err(RuntimeError::Cuda(format!(
                        "device {}: device_memory = {} but only {} is free",
                        self.ordinal,
                        fpdt_alloc::fmt_bytes(b),
                        fpdt_alloc::fmt_bytes(free)
                    )));
                }
                b
            }
            None => (free as f64 * self.memory_fraction) as usize,
        };
        let bytes = want / REGION_GRANULE * REGION_GRANULE;
        if bytes == 0 {
            return Err(RuntimeError::Cuda(format!(
                "device {}: {} of device memory is less than one {} granule",
                self.ordinal,
                fpdt_alloc::fmt_bytes(want),
                fpdt_alloc::fmt_bytes(REGION_GRANULE)
            )));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_region_is_a_fraction_of_free_memory_in_granules() {
        let c = CudaConfig::default();
        let free = 80 << 30;
        let b = c.region_bytes(free).unwrap();
        assert_eq!(b % REGION_GRANULE, 0);
        assert!(b <= free * 9 / 10 && b + REGION_GRANULE > free * 9 / 10);
        let c = CudaConfig {
            device_memory: Some((3 << 20) + 5),
            ..CudaConfig::default()
        };
        assert_eq!(c.region_bytes(free).unwrap(), 2 << 20);
    }

    #[test]
    fn bad_sizes_are_named() {
        for f in [0.0, -0.5, 1.5, f64::NAN] {
            let c = CudaConfig {
                memory_fraction: f,
                ..CudaConfig::default()
            };
            let e = c.region_bytes(1 << 30).unwrap_err().to_string();
            assert!(e.contains("memory_fraction") && e.contains("(0, 1]"), "{e}");
        }
        let c = CudaConfig {
            device_memory: Some(2 << 30),
            ..CudaConfig::default()
        };
        let e = c.region_bytes(1 << 30).unwrap_err().to_string();
        assert!(e.contains("device_memory") && e.contains("free"), "{e}");
        let c = CudaConfig {
            host_memory: 0,
            ..CudaConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("host_memory = 0"));
        let c = CudaConfig::default();
        let e = c.region_bytes(1 << 20).unwrap_err().to_string();
        assert!(e.contains("granule"), "{e}");
    }
}
