//! In-process collectives on the cpu backend against a plain memcpy of the
//! same bytes.
//!
//! Each of P ranks holds `BYTES`; one iteration is every rank's collective,
//! enqueued from one host thread, then every rank synchronized. The
//! baseline copies the same total (P x `BYTES`, what all ranks receive)
//! with one single-threaded `copy_from_slice`. The target is a
//! ratio (memcpy time / collective time) of at least 70%.
//!
//! The in-process group moves each byte twice (into the sender's mailbox,
//! then out into the receiver's buffer: a stream only reaches its own
//! device's memory), on P worker threads at once; all-reduce also reads
//! every rank's slice to reduce it. So the ratio depends on how many cores
//! run the P workers in parallel.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use fpdt_comm::{Communicator, DType, GroupConfig, InProcessComm, InProcessGroup, ReduceOp};
use fpdt_runtime::{CpuConfig, DeviceBuffer};

#[path = "../../benches/support/mod.rs"]
mod support;

const BYTES: usize = 16 << 20;

fn group(p: usize) -> Vec<InProcessComm> {
    InProcessGroup::cpu(
        p,
        &CpuConfig {
            name: "bench".into(),
            device_memory: 4 * BYTES,
            host_memory: 4 * BYTES,
            ..CpuConfig::default()
        },
        GroupConfig::default(),
    )
    .expect("group")
}

fn bufs(ranks: &[InProcessComm]) -> Vec<(DeviceBuffer, DeviceBuffer)> {
    ranks
        .iter()
        .map(|c| {
            let a = c
                .device()
                .upload(&vec![1.0f32; BYTES / 4], "send")
                .expect("upload");
            let b = c
                .device()
                .upload(&vec![0.0f32; BYTES / 4], "recv")
                .expect("upload");
            (a, b)
        })
        .collect()
}

fn sync(ranks: &[InProcessComm]) {
    for c in ranks {
        c.synchronize(c.device().compute()).expect("sync");
    }
}

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
        .configure_from_args();
    let ps = [2usize, 4];
    for &p in &ps {
        let src = vec![1u8; p * BYTES];
        let mut dst = vec![0u8; p * BYTES];
        let mut g = c.benchmark_group(format!("P={p}, 16 MiB per rank"));
        g.bench_function("memcpy of P x 16 MiB", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    dst.copy_from_slice(black_box(&src));
                    black_box(&mut dst);
                }
                let e = t.elapsed();
                support::record(&format!("memcpy p{p}"), e, iters);
                e
            })
        });
        let ranks = group(p);
        let bs = bufs(&ranks);
        g.bench_function("all_to_all", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    for (c, (s, r)) in ranks.iter().zip(&bs) {
                        c.all_to_all(c.device().compute(), s.view(), r.view())
                            .expect("all_to_all");
                    }
                    sync(&ranks);
                }
                let e = t.elapsed();
                support::record(&format!("all_to_all p{p}"), e, iters);
                e
            })
        });
        g.bench_function("all_reduce f32", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    for (c, (_, r)) in ranks.iter().zip(&bs) {
                        c.all_reduce(c.device().compute(), r.view(), DType::F32, ReduceOp::Sum)
                            .expect("all_reduce");
                    }
                    sync(&ranks);
                }
                let e = t.elapsed();
                support::record(&format!("all_reduce p{p}"), e, iters);
                e
            })
        });
        g.finish();
    }
    c.final_summary();

    let mut rows = Vec::new();
    for &p in &ps {
        let m = support::median(&format!("memcpy p{p}"));
        for op in ["all_to_all", "all_reduce"] {
            let t = support::median(&format!("{op} p{p}"));
            let gbs = (p * BYTES) as f64 / t / 1e9;
            rows.push(vec![
                format!("{op}, P={p}"),
                support::fmt_time(t),
                support::fmt_time(m),
                format!("{gbs:.2} GB/s"),
                format!("{:.0}%", 100.0 * m / t),
            ]);
        }
    }
    support::print_table(
        "in-process collectives vs memcpy of the same bytes (target >= 70%)",
        &[
            "collective",
            "median",
            "memcpy median",
            "received bytes / s",
            "memcpy / collective",
        ],
        &rows,
    );
    println!(
        "cores available: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}
