//! The runtime at work, before the trainer exists: a sequence of KV chunks
//! lives in the pinned host arena, and a "query" streams through them with
//! the next chunk prefetched into a double buffer while this one is used,
//! the way FPDT's attention forward does. The same work runs once with every
//! chunk resident, for comparison, and the step's Chrome trace is written.
//!
//! `cargo run --release --example overlap [chunks] [chunk MiB]`

use std::time::Instant;

use fpdt::runtime::trace::overlap_ns;
use fpdt::runtime::{ChunkMover, CpuConfig, Device, DoubleBuffer, OpKind, Resident, Work};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A kernel that reads a whole chunk and does a few flops per element: a
/// stand-in for attention of one query block against one KV chunk.
fn attend(dev: &Device, kv: fpdt::runtime::View<'_>, out: fpdt::runtime::View<'_>) -> Res<()> {
    let n = kv.len_of::<f32>();
    dev.compute().launch_host(
        "attend",
        Work::kernel(8.0 * n as f64, kv.len() as u64),
        &[kv],
        &[out],
        Box::new(|ins, outs| {
            let kv: &[f32] = bytemuck::cast_slice(ins[0]);
            let mut acc = 0.0f32;
            for _ in 0..4 {
                for x in kv {
                    acc = acc.mul_add(0.999, x.sin());
                }
            }
            outs[0].copy_from_slice(&acc.to_le_bytes());
            Ok(())
        }),
    )?;
    Ok(())
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let chunks: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(8);
    let chunk_mib: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(16);
    if chunks == 0 || chunk_mib == 0 {
        return Err("chunks and chunk MiB must be at least 1".into());
    }
    let chunk_bytes = chunk_mib << 20;
    let dev = Device::cpu(CpuConfig {
        device_memory: (chunks + 4) * chunk_bytes,
        host_memory: (chunks + 4) * chunk_bytes,
        ..CpuConfig::default()
    })?;
    println!("device {}: {}", dev.name(), dev.host_arena_report());
    let mover = ChunkMover::new(&dev);
    let values: Vec<f32> = (0..chunk_bytes / 4)
        .map(|i| (i % 1000) as f32 * 1e-3)
        .collect();

    // Resident baseline: every chunk on the device at once.
    let resident: Vec<_> = (0..chunks)
        .map(|_| dev.upload(&values, "kv"))
        .collect::<Result<_, _>>()?;
    let out = dev.alloc(4 * chunks, "scores")?;
    let t = Instant::now();
    for (j, kv) in resident.iter().enumerate() {
        attend(&dev, kv.view(), out.elems::<f32>(j..j + 1)?)?;
    }
    dev.synchronize()?;
    let t_resident = t.elapsed();
    let peak_resident = dev.ledger().usage(fpdt::runtime::Space::Device).in_use;
    drop(resident);

    // Offloaded: chunks in the host arena, two device slots.
    let hosts = (0..chunks)
        .map(|_| mover.offload(Resident::new(dev.upload(&values, "kv")?)))
        .collect::<Result<Vec<_>, _>>()?;
    dev.synchronize()?;
    dev.ledger().reset_peaks();
    dev.trace().clear();
    let db = DoubleBuffer::new(&mover, chunk_bytes, "kv slot")?;
    let t = Instant::now();
    let mut next = Some(db.prefetch(&hosts[0])?);
    for j in 0..chunks {
        let cur = next.take().ok_or("no pending chunk")?.ready()?;
        if j + 1 < chunks {
            next = Some(db.prefetch(&hosts[j + 1])?);
        }
        attend(&dev, cur.view(), out.elems::<f32>(j..j + 1)?)?;
    }
    dev.synchronize()?;
    let t_offload = t.elapsed();
    let peak_offload = dev.ledger().usage(fpdt::runtime::Space::Device).peak;

    let ev = dev.trace().events();
    let kernels: Vec<_> = ev.iter().filter(|e| e.kind == OpKind::Kernel).collect();
    let copies: Vec<_> = ev.iter().filter(|e| e.kind == OpKind::CopyH2D).collect();
    let copy_ns: u64 = copies.iter().map(|e| e.duration_ns()).sum();
    let hidden = overlap_ns(&kernels, &copies);
    std::fs::create_dir_all("runs")?;
    let trace_path = std::path::Path::new("runs/overlap-trace.json");
    dev.trace().write_chrome(trace_path)?;

    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!("{chunks} chunks of {chunk_mib} MiB streamed through a double buffer:");
    println!(
        "  all resident : {:8.1} ms, device memory {:7.1} MiB",
        t_resident.as_secs_f64() * 1e3,
        mib(peak_resident)
    );
    println!(
        "  offloaded    : {:8.1} ms, device memory {:7.1} MiB (peak)",
        t_offload.as_secs_f64() * 1e3,
        mib(peak_offload)
    );
    println!(
        "  copies       : {:8.1} ms in all, {:.0}% hidden behind compute",
        copy_ns as f64 / 1e6,
        100.0 * hidden as f64 / copy_ns.max(1) as f64
    );
    println!(
        "  trace        : {} (open in https://ui.perfetto.dev)",
        trace_path.display()
    );
    Ok(())
}
