//! Issue #9: what offloading costs. One FPDT training step (forward,
//! backward, the AdamW step) of a small GPT on one cpu device, with its
//! chunks offloaded to the host arena and prefetched back (double-buffered)
//! against the same step with everything resident, at chunk sizes from 1K
//! tokens up; and the share of the copy streams' busy time that ran while
//! the compute stream was busy too (copies hidden behind compute), read from
//! the device's trace.
//!
//! Both schedules checkpoint (the same kernels run), so the difference is
//! the copies and their waits. Medians of a few steps, the two schedules
//! alternated, side by side in one run. The sweep stops when the next chunk
//! size would take the run past its time budget (`FPDT_OVERLAP_BUDGET_S`,
//! default 120 s), and says so.

#[path = "../../benches/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use fpdt_model::{FpdtGroup, ModelConfig, ModelError, OptimStep, Schedule, SplitMix64};
use fpdt_runtime::trace::overlap_ns;
use fpdt_runtime::{fmt_bytes, CpuConfig, OpKind, Space, TraceEvent};

/// Chunks per sequence: enough for chunk i's offload to overlap chunk
/// i+1's compute.
const CHUNKS: usize = 4;
/// Steps measured per schedule and chunk size (after one warm-up each).
const REPS: usize = 3;

/// Total time covered by at least one of `evs`, ns.
fn busy_ns(evs: &[&TraceEvent]) -> u64 {
    let mut iv: Vec<(u64, u64)> = evs.iter().map(|e| (e.start_ns, e.end_ns)).collect();
    iv.sort_unstable();
    let (mut total, mut cur): (u64, Option<(u64, u64)>) = (0, None);
    for (s, e) in iv {
        cur = match cur {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                total += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    total + cur.map_or(0, |(s, e)| e - s)
}

/// One measured step.
struct Step {
    wall: Duration,
    /// Busy time of the host-device copy streams (union), ns.
    copy_ns: u64,
    /// Of which while a kernel ran, ns.
    hidden_ns: u64,
    /// Bytes copied between device and host.
    copied: u64,
    /// Peak device memory.
    device_peak: usize,
}

fn step(g: &mut FpdtGroup, tokens: &[u32], targets: &[i32]) -> Result<Step, ModelError> {
    let dev = g.ranks()[0].device().clone();
    dev.synchronize()?;
    dev.trace().clear();
    let t = Instant::now();
    let stats = g.accumulate(tokens, targets, 1.0)?;
    g.optimizer_step(&OptimStep::typical(1e-4))?;
    dev.synchronize()?;
    let wall = t.elapsed();
    if !stats.loss.is_finite() {
        return Err(ModelError::Shape(format!("loss {}", stats.loss)));
    }
    let events = dev.trace().events();
    let copies: Vec<&TraceEvent> = events
        .iter()
        .filter(|e| matches!(e.kind, OpKind::CopyH2D | OpKind::CopyD2H))
        .collect();
    let kernels: Vec<&TraceEvent> = events.iter().filter(|e| e.kind == OpKind::Kernel).collect();
    Ok(Step {
        wall,
        copy_ns: busy_ns(&copies),
        hidden_ns: overlap_ns(&copies, &kernels),
        copied: copies.iter().map(|e| e.bytes).sum(),
        device_peak: dev.ledger().usage(Space::Device).peak,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let budget = std::env::var("FPDT_OVERLAP_BUDGET_S")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(120.0);
    // Two layers of a small GPT with head dim 64 (2 heads of 64).
    let cfg = ModelConfig {
        max_seq_len: 1 << 20,
        ..ModelConfig::gpt(512, 128, 2, 2)
    };
    let params = cfg.layout().init(1, 0.02);
    let cpu = CpuConfig {
        name: "overlap".into(),
        device_memory: 1 << 30,
        host_memory: 2 << 30,
        pin_host_memory: false,
        ..CpuConfig::default()
    };
    let start = Instant::now();
    let mut rows = Vec::new();
    let mut stop = None;
    let mut last_cost = 0.0;
    for chunk in [1024usize, 2048, 4096, 8192, 16384, 32768] {
        // Attention is most of a step and grows as S^2: the next size costs
        // about 4x this one.
        let spent = start.elapsed().as_secs_f64();
        if last_cost > 0.0 && spent + 4.0 * last_cost > budget {
            stop = Some(format!(
                "stopped before C = {chunk}: the last size took {last_cost:.0} s, the next would \
                 take about {:.0} s more (attention grows as S^2), past the {budget:.0} s budget",
                4.0 * last_cost
            ));
            break;
        }
        let t_size = Instant::now();
        let s = CHUNKS * chunk;
        let mut rng = SplitMix64(chunk as u64);
        let tokens: Vec<u32> = (0..s).map(|_| rng.below(cfg.vocab_size) as u32).collect();
        let targets: Vec<i32> = (0..s).map(|_| rng.below(cfg.vocab_size) as i32).collect();
        let offload = Schedule::fpdt(s, 1, CHUNKS);
        let resident = Schedule {
            offload: false,
            ..offload
        };
        let mut groups = [
            FpdtGroup::cpu(&cfg, resident, &params, &cpu)?,
            FpdtGroup::cpu(&cfg, offload, &params, &cpu)?,
        ];
        let mut steps: [Vec<Step>; 2] = [Vec::new(), Vec::new()];
        for rep in 0..=REPS {
            for (g, out) in groups.iter_mut().zip(steps.iter_mut()) {
                let st = step(g, &tokens, &targets)?;
                if rep > 0 {
                    out.push(st);
                }
            }
        }
        let [res, off] = &steps;
        let wall = |v: &[Step]| median(v.iter().map(|s| s.wall.as_secs_f64()).collect());
        let (t_res, t_off) = (wall(res), wall(off));
        for (name, v) in [("resident", res), ("offload", off)] {
            for st in v {
                support::record(&format!("{name} C={chunk}"), st.wall, 1);
            }
        }
        let copy_s = median(off.iter().map(|s| s.copy_ns as f64 * 1e-9).collect());
        let hidden = median(
            off.iter()
                .map(|s| s.hidden_ns as f64 / s.copy_ns.max(1) as f64)
                .collect(),
        );
        let copied = off.iter().map(|s| s.copied).max().unwrap_or(0);
        rows.push(vec![
            format!("{chunk}"),
            format!("{s}"),
            support::fmt_time(support::median(&format!("resident C={chunk}"))),
            support::fmt_time(support::median(&format!("offload C={chunk}"))),
            format!("{:+.1}%", 100.0 * (t_off / t_res - 1.0)),
            format!(
                "{} in {}",
                fmt_bytes(copied as usize),
                support::fmt_time(copy_s)
            ),
            format!("{:.0}%", 100.0 * hidden),
            format!(
                "{} / {}",
                fmt_bytes(res.first().map_or(0, |s| s.device_peak)),
                fmt_bytes(off.first().map_or(0, |s| s.device_peak))
            ),
        ]);
        last_cost = t_size.elapsed().as_secs_f64();
    }
    support::print_table(
        &format!(
            "one training step, {} layers of GPT hidden {} (head dim {}), P = 1, u = {CHUNKS} \
             chunks, checkpointing on in both; median of {REPS} steps each, cpu device",
            cfg.layers, cfg.hidden, cfg.head_dim
        ),
        &[
            "C (tokens)",
            "S",
            "all resident",
            "offload + prefetch",
            "cost of offload",
            "copies (offload run)",
            "copy time hidden",
            "peak device resident / offload",
        ],
        &rows,
    );
    match stop {
        Some(s) => println!("{s}"),
        None => println!("every chunk size ran within the {budget:.0} s budget"),
    }
    println!("total {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}
