//! The cpu device's host memory is the pinned arena, and it says how it is
//! placed and pinned.

use fpdt_runtime::{CpuConfig, Device, MetaConfig};

fn small(pin: bool) -> CpuConfig {
    CpuConfig {
        device_memory: 1 << 20,
        host_memory: 1 << 20,
        pin_host_memory: pin,
        ..CpuConfig::default()
    }
}

#[test]
fn host_buffers_come_from_the_arena() {
    let dev = Device::cpu(small(true)).unwrap();
    let arena = dev.host_arena().expect("a cpu device has an arena");
    let base = arena.base_addr();
    let mut h = dev.alloc_host(1000, "x").unwrap();
    h.copy_from(&[7u8; 1000]).unwrap();
    assert_eq!(arena.stats().in_use, 1024);
    assert_eq!(arena.stats().tags["x"].blocks, 1);
    let v = dev.upload(&[1.0f32; 4], "y").unwrap();
    drop(v);
    drop(h);
    assert_eq!(arena.stats().live_blocks, 0);
    assert!(base != 0);
}

#[test]
fn the_report_says_whether_the_arena_is_pinned() {
    let dev = Device::cpu(small(true)).unwrap();
    let r = dev.host_arena_report();
    assert!(r.contains("1.00 MiB"), "{r}");
    assert!(
        r.contains("pinned (mlock)") || r.contains("RLIMIT_MEMLOCK"),
        "pinned, or the limit that refused it: {r}"
    );
    let dev = Device::cpu(small(false)).unwrap();
    let r = dev.host_arena_report();
    assert!(r.contains("NOT pinned: pinning was not asked for"), "{r}");
}

#[test]
fn a_numa_node_that_does_not_exist_is_reported_not_fatal() {
    let dev = Device::cpu(CpuConfig {
        numa_node: Some(4000),
        ..small(false)
    })
    .unwrap();
    let r = dev.host_arena_report();
    assert!(r.contains("mbind to NUMA node 4000 failed"), "{r}");
    // The arena still works.
    let mut h = dev.alloc_host(16, "x").unwrap();
    h.copy_from(&[1u8; 16]).unwrap();
}

#[test]
fn meta_has_no_arena_but_a_budget() {
    let dev = Device::meta(MetaConfig::default()).unwrap();
    assert!(dev.host_arena().is_none());
    assert!(dev.host_arena_report().contains("virtual"));
}
