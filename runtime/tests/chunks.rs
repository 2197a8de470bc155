//! Chunk guards, the double buffer, the ledger and the trace.

use std::time::Duration;

use fpdt_runtime::trace::overlap_ns;
use fpdt_runtime::{
    ChunkMover, CpuConfig, Device, DoubleBuffer, MetaConfig, OpKind, Resident, Space, Work,
};

fn cpu_poisoned() -> Device {
    Device::cpu(CpuConfig {
        device_memory: 64 << 20,
        host_memory: 64 << 20,
        poison_freed: true,
        ..CpuConfig::default()
    })
    .unwrap()
}

fn pattern(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| i.wrapping_mul(2654435761) ^ seed)
        .collect()
}

#[test]
fn offloaded_block_is_reused_only_after_its_copy() {
    let dev = cpu_poisoned();
    let mover = ChunkMover::new(&dev);
    let n = 1 << 18;
    let data = pattern(n, 1);
    let chunk = Resident::new(dev.upload(&data, "kv").unwrap());
    // Hold the d2h stream so the offload copy is late.
    dev.d2h()
        .launch_host(
            "busy",
            Work::kernel(0.0, 0),
            &[],
            &[],
            Box::new(|_, _| {
                std::thread::sleep(Duration::from_millis(150));
                Ok(())
            }),
        )
        .unwrap();
    let host = mover.offload(chunk).unwrap();
    // The program released the block: the ledger no longer counts it...
    assert_eq!(dev.ledger().usage(Space::Device).in_use, 0);
    // ...but the slab must not hand it out before the copy ran: a new block
    // of the same size, overwritten at once, must not corrupt the copy.
    let other = dev.upload(&pattern(n, 99), "other").unwrap();
    assert!(!host.is_written(), "the copy should still be waiting");
    assert_eq!(&*host.read::<u32>().unwrap(), &data[..]);
    drop(other);
    // Once everything is done the block is returned (and poisoned).
    dev.synchronize().unwrap();
    assert_eq!(dev.device_stats().in_use, 0);
}

#[test]
fn offload_then_prefetch_round_trips_through_the_host() {
    let dev = cpu_poisoned();
    let mover = ChunkMover::new(&dev);
    let data = pattern(5000, 7);
    let r = Resident::new(dev.upload(&data, "q").unwrap());
    let host = mover.offload(r).unwrap();
    let pending = mover.prefetch(&host).unwrap();
    let back = pending.ready(dev.compute()).unwrap();
    assert_eq!(dev.download::<u32>(back.view().unwrap()).unwrap(), data);
}

#[test]
fn dropping_a_resident_offloads_it_when_asked() {
    let dev = cpu_poisoned();
    let mover = ChunkMover::new(&dev);
    let data = pattern(1000, 3);
    let (r, slot) = Resident::new(dev.upload(&data, "x").unwrap()).offload_on_drop(&mover);
    assert!(slot.take().is_none());
    drop(r);
    let host = slot
        .take()
        .expect("dropped chunk must land in its slot")
        .unwrap();
    assert_eq!(&*host.read::<u32>().unwrap(), &data[..]);
    // A plain resident just releases.
    let r = Resident::new(dev.upload(&data, "y").unwrap());
    drop(r);
    dev.synchronize().unwrap();
    assert_eq!(dev.ledger().usage(Space::Device).in_use, 0);
}

#[test]
fn double_buffer_streams_chunks_through_two_slots() {
    let dev = cpu_poisoned();
    let mover = ChunkMover::new(&dev);
    let chunks: Vec<Vec<u32>> = (0..6).map(|j| pattern(4096 - j * 100, j as u32)).collect();
    let hosts: Vec<_> = chunks
        .iter()
        .map(|c| {
            mover
                .offload(Resident::new(dev.upload(c, "kv").unwrap()))
                .unwrap()
        })
        .collect();
    let db = DoubleBuffer::new(&mover, 4096 * 4, "kv slot").unwrap();
    let sums = dev.alloc(8 * chunks.len(), "sums").unwrap();
    let mut pending = Some(db.prefetch(&hosts[0]).unwrap());
    for j in 0..chunks.len() {
        let cur = pending.take().unwrap().ready().unwrap();
        if j + 1 < chunks.len() {
            pending = Some(db.prefetch(&hosts[j + 1]).unwrap());
        }
        // A third prefetch while both slots are in use is refused.
        if j + 2 < chunks.len() && j == 0 {
            let e = db
                .prefetch(&hosts[j + 2])
                .err()
                .expect("third slot must be refused");
            assert!(e.to_string().contains("still in use"), "{e}");
        }
        dev.compute()
            .launch_host(
                "sum",
                Work::kernel(1.0, 8),
                &[cur.view()],
                &[sums.elems::<u64>(j..j + 1).unwrap()],
                Box::new(|ins, outs| {
                    std::thread::sleep(Duration::from_millis(5));
                    let v: &[u32] = bytemuck::cast_slice(ins[0]);
                    let s: u64 = v.iter().map(|&x| x as u64).sum();
                    outs[0].copy_from_slice(&s.to_le_bytes());
                    Ok(())
                }),
            )
            .unwrap();
    }
    let got = dev.download::<u64>(sums.view()).unwrap();
    let want: Vec<u64> = chunks
        .iter()
        .map(|c| c.iter().map(|&x| x as u64).sum())
        .collect();
    assert_eq!(got, want);
}

#[test]
fn trace_shows_a_copy_overlapping_a_kernel() {
    let dev = Device::cpu(CpuConfig {
        device_memory: 512 << 20,
        host_memory: 512 << 20,
        ..CpuConfig::default()
    })
    .unwrap();
    let bytes = 128 << 20;
    let mut host = dev.alloc_host(bytes, "src").unwrap();
    host.write::<u8, _>(|d| d.fill(1)).unwrap();
    let dst = dev.alloc(bytes, "dst").unwrap();
    dev.synchronize().unwrap();
    dev.trace().clear();
    dev.compute()
        .launch_host(
            "compute",
            Work::kernel(0.0, 0),
            &[],
            &[],
            Box::new(|_, _| {
                std::thread::sleep(Duration::from_millis(300));
                Ok(())
            }),
        )
        .unwrap();
    dev.h2d().copy(host.view(), dst.view()).unwrap();
    dev.synchronize().unwrap();
    let ev = dev.trace().events();
    let kernels: Vec<_> = ev.iter().filter(|e| e.kind == OpKind::Kernel).collect();
    let copies: Vec<_> = ev.iter().filter(|e| e.kind == OpKind::CopyH2D).collect();
    assert_eq!((kernels.len(), copies.len()), (1, 1));
    let overlap = overlap_ns(&kernels, &copies);
    assert!(
        overlap as f64 >= 0.9 * copies[0].duration_ns() as f64,
        "copy {} ns, overlap {} ns",
        copies[0].duration_ns(),
        overlap
    );
    // The Chrome trace names both streams and both events.
    let json: serde_json::Value =
        serde_json::from_str(&fpdt_runtime::trace::chrome_trace_json(&[dev.trace()])).unwrap();
    let evs = json["traceEvents"].as_array().unwrap();
    assert!(evs.iter().any(|e| e["ph"] == "X" && e["cat"] == "h2d"));
    assert!(evs
        .iter()
        .any(|e| e["ph"] == "M" && e["args"]["name"] == "compute"));
}

/// The same schedule on cpu and meta: identical allocation traces.
fn schedule(dev: &Device) -> Vec<fpdt_runtime::AllocEvent> {
    dev.ledger().start_recording();
    let mover = ChunkMover::new(dev);
    let mut hosts = Vec::new();
    for i in 0..4usize {
        let r = mover.alloc(1000 + i * 300, "kv").unwrap();
        let tmp = dev.alloc(4096, "scratch").unwrap();
        drop(tmp);
        hosts.push(mover.offload(r).unwrap());
    }
    let db = DoubleBuffer::new(&mover, 4096, "slot").unwrap();
    for h in &hosts {
        let g = db.prefetch(h).unwrap().ready().unwrap();
        drop(g);
    }
    drop(db);
    drop(hosts);
    dev.synchronize().unwrap();
    dev.ledger().take_recording()
}

#[test]
fn cpu_and_meta_record_the_same_allocation_trace() {
    let cpu = cpu_poisoned();
    let meta = Device::meta(MetaConfig::default()).unwrap();
    let a = schedule(&cpu);
    let b = schedule(&meta);
    assert!(!a.is_empty());
    assert_eq!(a, b);
    assert_eq!(
        cpu.ledger().usage(Space::Device).peak,
        meta.ledger().usage(Space::Device).peak
    );
    assert_eq!(
        cpu.ledger().usage(Space::Host).peak,
        meta.ledger().usage(Space::Host).peak
    );
}
