//! cpu streams: enqueue-to-complete latency of an empty operation, copy
//! bandwidth between the arena and the device region against a plain
//! single-thread memcpy, and the overlap of a copy with a kernel.
//!
//! Targets (issue 2): latency median under 10 us; copy bandwidth at least 80%
//! of memcpy; a kernel and a copy of equal duration on separate streams
//! finish in at most 1.2x the time of one alone.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use fpdt_runtime::{CpuConfig, Device, Work};

#[path = "../../benches/support/mod.rs"]
mod support;

const COPY_BYTES: usize = 64 << 20;

fn device() -> Device {
    Device::cpu(CpuConfig {
        device_memory: 512 << 20,
        host_memory: 512 << 20,
        ..CpuConfig::default()
    })
    .expect("cpu device")
}

fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn spin_op(d: Duration) -> fpdt_runtime::HostFn {
    Box::new(move |_, _| {
        spin(d);
        Ok(())
    })
}

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .configure_from_args();
    let dev = device();

    c.bench_function("empty op enqueue-to-complete", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                dev.compute()
                    .launch_host(
                        "empty",
                        Work::kernel(0.0, 0),
                        &[],
                        &[],
                        Box::new(|_, _| Ok(())),
                    )
                    .expect("enqueue");
                dev.compute().synchronize().expect("sync");
            }
            let e = t.elapsed();
            support::record("latency", e, iters);
            e
        })
    });

    let mut host = dev.alloc_host(COPY_BYTES, "src").expect("host");
    host.write::<u8, _>(|d| d.fill(7)).expect("fill");
    let dst = dev.alloc(COPY_BYTES, "dst").expect("device");
    let src_vec = vec![7u8; COPY_BYTES];
    let mut dst_vec = vec![0u8; COPY_BYTES];

    let mut g = c.benchmark_group("copy 64 MiB");
    g.sample_size(20);
    g.bench_function("h2d stream", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                dev.h2d().copy(host.view(), dst.view()).expect("copy");
                dev.h2d().synchronize().expect("sync");
            }
            let e = t.elapsed();
            support::record("h2d", e, iters);
            e
        })
    });
    g.bench_function("memcpy", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                dst_vec.copy_from_slice(black_box(&src_vec));
                black_box(&mut dst_vec);
            }
            let e = t.elapsed();
            support::record("memcpy", e, iters);
            e
        })
    });
    g.finish();

    // A kernel as long as the copy, then both at once on separate streams.
    let copy_time = Duration::from_secs_f64(support::median("h2d"));
    let mut g = c.benchmark_group("overlap");
    g.sample_size(20);
    g.bench_function("kernel alone", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                dev.compute()
                    .launch_host("spin", Work::kernel(0.0, 0), &[], &[], spin_op(copy_time))
                    .expect("enqueue");
                dev.compute().synchronize().expect("sync");
            }
            let e = t.elapsed();
            support::record("kernel", e, iters);
            e
        })
    });
    g.bench_function("kernel and copy", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                dev.compute()
                    .launch_host("spin", Work::kernel(0.0, 0), &[], &[], spin_op(copy_time))
                    .expect("enqueue");
                dev.h2d().copy(host.view(), dst.view()).expect("copy");
                dev.synchronize().expect("sync");
            }
            let e = t.elapsed();
            support::record("both", e, iters);
            e
        })
    });
    g.finish();
    c.final_summary();

    let lat = support::median("latency");
    let h2d = support::median("h2d");
    let memcpy = support::median("memcpy");
    let kernel = support::median("kernel");
    let both = support::median("both");
    let gbs = |s: f64| format!("{:.2} GB/s", COPY_BYTES as f64 / s / 1e9);
    support::print_table(
        "cpu streams (medians)",
        &["measure", "value", "target", "met"],
        &[
            vec![
                "empty op enqueue-to-complete".into(),
                support::fmt_time(lat),
                "< 10 us".into(),
                (lat < 10e-6).to_string(),
            ],
            vec![
                "h2d copy 64 MiB".into(),
                format!("{} ({})", gbs(h2d), support::fmt_time(h2d)),
                String::new(),
                String::new(),
            ],
            vec![
                "memcpy 64 MiB".into(),
                format!("{} ({})", gbs(memcpy), support::fmt_time(memcpy)),
                String::new(),
                String::new(),
            ],
            vec![
                "copy / memcpy bandwidth".into(),
                format!("{:.2}", memcpy / h2d),
                ">= 0.80".into(),
                (memcpy / h2d >= 0.8).to_string(),
            ],
            vec![
                "kernel + copy / kernel alone".into(),
                format!(
                    "{:.2} ({} vs {})",
                    both / kernel,
                    support::fmt_time(both),
                    support::fmt_time(kernel)
                ),
                "<= 1.20".into(),
                (both / kernel <= 1.2).to_string(),
            ],
        ],
    );
}
