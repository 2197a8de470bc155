//! The cost model: how long an operation takes on a device that is not
//! there. The meta device advances its streams' clocks by these times, which
//! makes a predicted step time (with copy/compute overlap) and MFU.

use serde::{Deserialize, Serialize};

use crate::stream::Work;
use crate::trace::OpKind;

/// Rates of a device and its links.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// Dense bf16 peak of the tensor cores, FLOP/s.
    pub peak_flops: f64,
    /// Fraction of the peak that large kernels (GEMM, attention) reach.
    pub kernel_efficiency: f64,
    /// Device memory bandwidth, bytes/s.
    pub memory_bandwidth: f64,
    /// Host to device copy bandwidth (pinned, copy engine), bytes/s.
    pub h2d_bandwidth: f64,
    /// Device to host copy bandwidth (pinned, copy engine), bytes/s.
    pub d2h_bandwidth: f64,
    /// Device to device copy bandwidth, bytes/s.
    pub d2d_bandwidth: f64,
    /// Host to host copy bandwidth, bytes/s.
    pub h2h_bandwidth: f64,
    /// Per-rank bandwidth of collectives over the interconnect, bytes/s.
    pub collective_bandwidth: f64,
    /// Fixed cost of launching any operation, seconds.
    pub launch_latency: f64,
}

impl CostModel {
    /// An H100 SXM5 80 GB in an 8-GPU node: 989 TFLOP/s dense bf16 (about
    /// 800 measured on large GEMMs, hence the efficiency), 3.35 TB/s HBM3,
    /// PCIe Gen5 copy engines at about 55 GB/s each way (nvbandwidth), NVLink
    /// 4 at about 370 GB/s per GPU for all-to-all traffic.
    pub fn h100_sxm() -> CostModel {
        CostModel {
            peak_flops: 989e12,
            kernel_efficiency: 0.72,
            memory_bandwidth: 3.35e12,
            h2d_bandwidth: 55e9,
            d2h_bandwidth: 55e9,
            d2d_bandwidth: 1.5e12,
            h2h_bandwidth: 20e9,
            collective_bandwidth: 370e9,
            launch_latency: 4e-6,
        }
    }

    /// A rough laptop-class cpu, for annotating cpu traces.
    pub fn cpu_estimate() -> CostModel {
        CostModel {
            peak_flops: 100e9,
            kernel_efficiency: 0.5,
            memory_bandwidth: 20e9,
            h2d_bandwidth: 10e9,
            d2h_bandwidth: 10e9,
            d2d_bandwidth: 10e9,
            h2h_bandwidth: 10e9,
            collective_bandwidth: 10e9,
            launch_latency: 10e-6,
        }
    }

    /// Predicted duration of `work`, in seconds.
    pub fn duration(&self, work: &Work) -> f64 {
        let bytes = work.bytes as f64;
        let t = match work.kind {
            OpKind::Kernel => {
                let compute = work.flops / (self.peak_flops * self.kernel_efficiency);
                let memory = bytes / self.memory_bandwidth;
                compute.max(memory)
            }
            OpKind::CopyH2D => bytes / self.h2d_bandwidth,
            OpKind::CopyD2H => bytes / self.d2h_bandwidth,
            OpKind::CopyD2D => bytes / self.d2d_bandwidth,
            OpKind::CopyH2H => bytes / self.h2h_bandwidth,
            OpKind::Collective => bytes / self.collective_bandwidth,
        };
        if work.flops == 0.0 && work.bytes == 0 {
            t
        } else {
            t + self.launch_latency
        }
    }

    /// Predicted duration of `work`, in nanoseconds.
    pub fn duration_ns(&self, work: &Work) -> u64 {
        (self.duration(work) * 1e9).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_are_bound_by_the_slower_of_compute_and_memory() {
        let c = CostModel::h100_sxm();
        let compute_bound = Work::kernel(1e12, 1000);
        let t = c.duration(&compute_bound);
        let expect = 1e12 / (989e12 * 0.72) + 4e-6;
        assert!((t - expect).abs() < 1e-12);
        let memory_bound = Work::kernel(1.0, 3_350_000_000);
        assert!((c.duration(&memory_bound) - (1e-3 + 4e-6)).abs() < 1e-9);
    }

    #[test]
    fn copies_use_their_direction_bandwidth() {
        let mut c = CostModel::h100_sxm();
        c.d2h_bandwidth = 10e9;
        let w = Work {
            kind: OpKind::CopyD2H,
            flops: 0.0,
            bytes: 1_000_000_000,
        };
        assert!((c.duration(&w) - (0.1 + 4e-6)).abs() < 1e-9);
    }
}
