//! In-process all-to-all and all-reduce on the cpu backend beside a plain
//! memcpy of the same bytes; the target is at least 70%.
//!
//! Bandwidth is algorithm bandwidth, nccl-tests' `algbw`: S / t, where S is
//! the size of each rank's buffer (all-to-all: its send buffer, as large as
//! its receive buffer; all-reduce: the buffer it reduces in place) and t the
//! wall time from enqueuing every rank's call to every rank's stream having
//! finished it. The baseline is the same run with the collective replaced by
//! a plain copy: every rank's stream copies S bytes between two of its own
//! buffers (`Stream::copy`, one `copy_from_slice` on the stream's worker),
//! all P at once, enqueued and synchronized the same way. Both write S bytes
//! into every rank's destination, on the same P worker threads, so
//! memcpy time / collective time is what the collective costs beyond putting
//! its result in place. nccl-tests' `busbw` scales algbw by the link traffic
//! of a ring ((P-1)/P for all-to-all, 2(P-1)/P for all-reduce); in one
//! process there are no links, so it is not used here. A single-threaded
//! copy of all P x S bytes is printed for reference.
//!
//! All-reduce sums buffers of zeros: they stay zero over the repeated
//! in-place calls (no overflow to infinities), and an f32 add takes the same
//! time on zeros as on any other normal number.
//!
//! `FPDT_COLLECTIVES_PIECE` and `FPDT_COLLECTIVES_DEPTH` override the
//! group's [`GroupConfig::piece_bytes`] and [`GroupConfig::ring_depth`] (to
//! tune them), `FPDT_COLLECTIVES_P` the list of world sizes (e.g. `2`).
//!
//! Cases alternate: each repetition runs every case `ITERS` times in turn,
//! so load from other processes drifting during the run hits every case
//! alike. Times are medians over the repetitions; the ratio's quartiles are
//! those of the per-repetition ratios.

use std::hint::black_box;
use std::time::Instant;

use fpdt_comm::{Communicator, DType, GroupConfig, InProcessComm, InProcessGroup, ReduceOp};
use fpdt_runtime::{CpuConfig, DeviceBuffer};

#[path = "../../benches/support/mod.rs"]
mod support;

/// Bytes of each rank's buffer.
const BYTES: usize = 16 << 20;
/// Calls of one case in a row, per repetition.
const ITERS: usize = 4;
/// Repetitions measured (after one discarded warm-up repetition).
const REPS: usize = 15;
const TARGET: f64 = 0.70;

struct Rank {
    comm: InProcessComm,
    send: DeviceBuffer,
    recv: DeviceBuffer,
    f32_buf: DeviceBuffer,
    bf16_buf: DeviceBuffer,
}

fn ranks(p: usize) -> Vec<Rank> {
    let comms = InProcessGroup::cpu(
        p,
        &CpuConfig {
            name: "bench".into(),
            device_memory: 5 * BYTES,
            host_memory: BYTES,
            ..CpuConfig::default()
        },
        group_config(),
    )
    .expect("group");
    comms
        .into_iter()
        .map(|comm| {
            let d = comm.device();
            let send = d.upload(&vec![1u8; BYTES], "send").expect("upload");
            let recv = d.upload(&vec![0u8; BYTES], "recv").expect("upload");
            let f32_buf = d.upload(&vec![0.0f32; BYTES / 4], "f32").expect("upload");
            let bf16_buf = d.upload(&vec![0u16; BYTES / 2], "bf16").expect("upload");
            Rank {
                comm,
                send,
                recv,
                f32_buf,
                bf16_buf,
            }
        })
        .collect()
}

/// A numeric environment variable, or `default` where it is unset.
fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: expected a whole number")),
        Err(_) => default,
    }
}

fn group_config() -> GroupConfig {
    let d = GroupConfig::default();
    GroupConfig {
        piece_bytes: env_usize("FPDT_COLLECTIVES_PIECE", d.piece_bytes),
        ring_depth: env_usize("FPDT_COLLECTIVES_DEPTH", d.ring_depth),
        ..d
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Memcpy,
    AllToAll,
    AllReduceF32,
    AllReduceBf16,
    MemcpyOneThread,
}

impl Case {
    const ALL: [Case; 5] = [
        Case::Memcpy,
        Case::AllToAll,
        Case::AllReduceF32,
        Case::AllReduceBf16,
        Case::MemcpyOneThread,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::Memcpy => "memcpy, P streams x S",
            Case::AllToAll => "all_to_all",
            Case::AllReduceF32 => "all_reduce f32 sum",
            Case::AllReduceBf16 => "all_reduce bf16 sum",
            Case::MemcpyOneThread => "memcpy, 1 thread, P x S",
        }
    }
}

/// Seconds per call of `case`, over `ITERS` calls.
fn run(case: Case, rs: &[Rank], host: &mut (Vec<u8>, Vec<u8>)) -> f64 {
    let t = Instant::now();
    for _ in 0..ITERS {
        if case == Case::MemcpyOneThread {
            host.1.copy_from_slice(black_box(&host.0));
            black_box(&mut host.1);
            continue;
        }
        for r in rs {
            let c = &r.comm;
            let s = c.device().compute();
            match case {
                Case::Memcpy => s.copy(r.send.view(), r.recv.view()).expect("copy"),
                Case::AllToAll => c
                    .all_to_all(s, r.send.view(), r.recv.view())
                    .expect("all_to_all"),
                Case::AllReduceF32 => c
                    .all_reduce(s, r.f32_buf.view(), DType::F32, ReduceOp::Sum)
                    .expect("all_reduce"),
                Case::AllReduceBf16 => c
                    .all_reduce(s, r.bf16_buf.view(), DType::Bf16, ReduceOp::Sum)
                    .expect("all_reduce"),
                Case::MemcpyOneThread => unreachable!("handled above"),
            }
        }
        for r in rs {
            r.comm
                .synchronize(r.comm.device().compute())
                .expect("synchronize");
        }
    }
    t.elapsed().as_secs_f64() / ITERS as f64
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The 25th and 75th percentiles (nearest rank).
fn quartiles(v: &[f64]) -> (f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.25), at(0.75))
}

fn main() {
    let gbs = |t: f64| BYTES as f64 / t / 1e9;
    let mut rows = Vec::new();
    let ps: Vec<usize> = match std::env::var("FPDT_COLLECTIVES_P") {
        Ok(v) => v
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("FPDT_COLLECTIVES_P={v}: expected e.g. 2,4"))
            })
            .collect(),
        Err(_) => vec![2, 4],
    };
    for &p in &ps {
        let rs = ranks(p);
        let mut host = (vec![1u8; p * BYTES], vec![0u8; p * BYTES]);
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); Case::ALL.len()];
        for rep in 0..=REPS {
            for (i, &case) in Case::ALL.iter().enumerate() {
                let t = run(case, &rs, &mut host);
                if rep > 0 {
                    times[i].push(t);
                }
            }
        }
        let memcpy = &times[0];
        let m = median(memcpy);
        for (i, &case) in Case::ALL.iter().enumerate() {
            let t = median(&times[i]);
            let (bw, ratio, spread, verdict) = match case {
                Case::Memcpy => (gbs(t), "100%".into(), String::new(), String::new()),
                Case::MemcpyOneThread => (
                    (p * BYTES) as f64 / t / 1e9,
                    String::new(),
                    String::new(),
                    String::new(),
                ),
                _ => {
                    let per_rep: Vec<f64> =
                        memcpy.iter().zip(&times[i]).map(|(m, c)| m / c).collect();
                    let (lo, hi) = quartiles(&per_rep);
                    let r = m / t;
                    (
                        gbs(t),
                        format!("{:.0}%", 100.0 * r),
                        format!("{:.0}-{:.0}%", 100.0 * lo, 100.0 * hi),
                        if r >= TARGET { "yes" } else { "no" }.into(),
                    )
                }
            };
            rows.push(vec![
                format!("P={p}"),
                case.name().into(),
                support::fmt_time(t),
                format!("{bw:.2} GB/s"),
                ratio,
                spread,
                verdict,
            ]);
        }
    }
    support::print_table(
        &format!(
            "in-process collectives vs memcpy of the same bytes, S = {} MiB per rank \
             (medians of {REPS} alternated repetitions of {ITERS} calls; target >= {:.0}%)",
            BYTES >> 20,
            100.0 * TARGET
        ),
        &[
            "P",
            "case",
            "median per call",
            "algbw S/t (1 thread: P*S/t)",
            "memcpy / collective",
            "quartiles",
            ">= 70%",
        ],
        &rows,
    );
    let g = group_config();
    println!(
        "pieces of {} KiB, {} deep; cores available: {}; P worker threads per group (plus \
         this one, idle while they run)",
        g.piece_bytes >> 10,
        g.ring_depth,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}
