//! Helpers shared by the comm integration tests.

#![allow(dead_code)]

use std::time::Duration;

use fpdt_comm::{GroupConfig, InProcessComm, InProcessGroup};
use fpdt_runtime::{CpuConfig, DeviceBuffer};

/// Small cpu devices: tests move kilobytes.
pub fn cpu_config() -> CpuConfig {
    CpuConfig {
        name: "t".into(),
        device_memory: 16 << 20,
        host_memory: 16 << 20,
        poison_freed: true,
        wait_timeout: Duration::from_secs(30),
        ..CpuConfig::default()
    }
}

/// A cpu group of `p` ranks with a generous timeout (no test should reach
/// it unless it means to).
pub fn group(p: usize) -> Vec<InProcessComm> {
    group_with_timeout(p, Duration::from_secs(20))
}

pub fn group_with_timeout(p: usize, timeout: Duration) -> Vec<InProcessComm> {
    InProcessGroup::cpu(
        p,
        &cpu_config(),
        GroupConfig {
            name: format!("test-p{p}"),
            timeout,
            ..GroupConfig::default()
        },
    )
    .expect("group")
}

/// A cpu group of `p` ranks whose all-to-all and all-reduce stream in
/// pieces of `piece_bytes`, at most `ring_depth` pieces ahead: tiny pieces
/// make the tests' small buffers take many pieces and wrap every ring.
pub fn group_with_pieces(p: usize, piece_bytes: usize, ring_depth: usize) -> Vec<InProcessComm> {
    InProcessGroup::cpu(
        p,
        &cpu_config(),
        GroupConfig {
            name: format!("test-p{p}-q{piece_bytes}-d{ring_depth}"),
            timeout: Duration::from_secs(20),
            piece_bytes,
            ring_depth,
        },
    )
    .expect("group")
}

pub fn upload<T: bytemuck::Pod>(c: &InProcessComm, data: &[T]) -> DeviceBuffer {
    c.device().upload(data, "test data").expect("upload")
}

pub fn zeros(c: &InProcessComm, bytes: usize) -> DeviceBuffer {
    let b = c.device().alloc(bytes, "test out").expect("alloc");
    c.device()
        .write(b.view(), &vec![0u8; bytes])
        .expect("zero fill");
    b
}

pub fn download<T: bytemuck::Pod>(c: &InProcessComm, b: &DeviceBuffer) -> Vec<T> {
    c.device().download(b.view()).expect("download")
}
