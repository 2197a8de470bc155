//! The in-process group on one GPU (issue #5): two ranks sharing it, each
//! on its own stream and thread. The all-to-all (device-to-device copies
//! on the streams) against a plain device copy of the same bytes on each
//! rank's stream at the same time; the all-reduce (pulls, the reduce
//! kernel, the gather) against the same copy. Timed with CUDA events on the ranks'
//! streams (the slower rank counts); medians of several rounds. Without a
//! GPU it says why and exits 0.
//!
//! `FPDT_BENCH_MAX_MIB` caps the buffer size (default 256 MiB per rank).
//! Lines starting `RESULT` are read by `scripts/gpu-check.sh`.

use std::thread;
use std::time::Duration;

use fpdt_comm::{Communicator, DType, GroupConfig, InProcessComm, InProcessGroup, ReduceOp};
use fpdt_runtime::{CudaConfig, Device, Stream};

const P: usize = 2;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of one `op` on `s`, timed by events around `reps` runs.
fn time_on(
    s: &Stream,
    reps: usize,
    rounds: usize,
    mut op: impl FnMut() -> Result<(), String>,
) -> Result<f64, String> {
    let mut out = Vec::new();
    for _ in 0..rounds {
        let a = s.record().map_err(|e| e.to_string())?;
        for _ in 0..reps {
            op()?;
        }
        let b = s.record().map_err(|e| e.to_string())?;
        b.wait_timeout(Duration::from_secs(300))
            .map_err(|e| e.to_string())?;
        let (ta, tb) = (a.time_ns(), b.time_ns());
        let dt = match (ta, tb) {
            (Some(ta), Some(tb)) => tb.saturating_sub(ta) as f64 * 1e-9,
            _ => return Err("events without GPU times".into()),
        };
        out.push(dt / reps as f64);
    }
    Ok(median(out))
}

/// Per rank: (copy, all-to-all, all-reduce) median seconds for `bytes`.
fn measure(ranks: &[InProcessComm], bytes: usize) -> Result<Vec<(f64, f64, f64)>, String> {
    let (reps, rounds) = (3, 5);
    thread::scope(|sc| {
        let handles: Vec<_> = ranks
            .iter()
            .enumerate()
            .map(|(r, c)| {
                sc.spawn(move || -> Result<(f64, f64, f64), String> {
                    let dev = c.device();
                    let e = |e: fpdt_runtime::RuntimeError| e.to_string();
                    let s = dev.new_stream(&format!("rank {r}")).map_err(e)?;
                    let send = dev.alloc(bytes, "send").map_err(e)?;
                    let recv = dev.alloc(bytes, "recv").map_err(e)?;
                    let ce = |e: fpdt_comm::CommError| e.to_string();
                    // Warm-up (and the first barrier lines the ranks up).
                    c.all_to_all(&s, send.view(), recv.view()).map_err(ce)?;
                    c.synchronize(&s).map_err(ce)?;
                    let copy = time_on(&s, reps, rounds, || {
                        s.copy(send.view(), recv.view()).map_err(e)
                    })?;
                    c.barrier(&s).map_err(ce)?;
                    let a2a = time_on(&s, reps, rounds, || {
                        c.all_to_all(&s, send.view(), recv.view()).map_err(ce)
                    })?;
                    let ar = time_on(&s, 1, 3, || {
                        c.all_reduce(&s, recv.view(), DType::F32, ReduceOp::Sum)
                            .map_err(ce)
                    })?;
                    Ok((copy, a2a, ar))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a rank panicked".to_string())?)
            .collect()
    })
}

fn main() {
    let max_mib: usize = std::env::var("FPDT_BENCH_MAX_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let dev = match Device::cuda_with(CudaConfig {
        // Per rank: send and recv (2 x max) and the all-reduce's scratch
        // for the peers' slices (max / P x (P - 1)); P ranks share the GPU.
        device_memory: Some((P * 3 * max_mib + 64) << 20),
        host_memory: (2 * max_mib + 64) << 20,
        check_each_launch: false,
        ..CudaConfig::default()
    }) {
        Ok(d) => d,
        Err(e) => {
            println!("comm gpu bench: skipped, no GPU: {e}");
            return;
        }
    };
    let name = dev
        .gpu_info()
        .map(|g| g.name.clone())
        .unwrap_or_else(|| "?".into());
    let cfg = GroupConfig {
        name: "bench".into(),
        // Short, so a rank that fails (out of memory, say) ends the bench
        // with its error before the check script's time limit kills it.
        timeout: Duration::from_secs(20),
        ..GroupConfig::default()
    };
    let ranks = match InProcessGroup::create(vec![dev.clone(); P], cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("comm gpu bench: {e}");
            std::process::exit(1);
        }
    };
    println!("In-process group on {name}, P = {P} ranks sharing it (medians, slower rank)");
    println!(
        "| bytes per rank | device copy GB/s | all-to-all GB/s | ratio | all-reduce f32 GB/s |"
    );
    println!("|---|---|---|---|---|");
    let mut mib = 16.min(max_mib).max(1);
    while mib <= max_mib {
        let bytes = mib << 20;
        match measure(&ranks, bytes) {
            Ok(v) => {
                let worst = |f: fn(&(f64, f64, f64)) -> f64| v.iter().map(f).fold(0.0, f64::max);
                let (copy, a2a, ar) = (worst(|t| t.0), worst(|t| t.1), worst(|t| t.2));
                let gbps = |t: f64| bytes as f64 / t / 1e9;
                println!(
                    "| {mib} MiB | {:.1} | {:.1} | {:.2} | {:.1} |",
                    gbps(copy),
                    gbps(a2a),
                    copy / a2a,
                    gbps(ar)
                );
                println!(
                    "RESULT comm_a2a_vs_copy mib={mib} copy_gbps={:.1} a2a_gbps={:.1} ratio={:.3} allreduce_gbps={:.2}",
                    gbps(copy),
                    gbps(a2a),
                    copy / a2a,
                    gbps(ar)
                );
            }
            Err(e) => {
                eprintln!("comm gpu bench at {mib} MiB: {e}");
                std::process::exit(1);
            }
        }
        mib *= 4;
    }
}
