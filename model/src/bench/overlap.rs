//! What offloading costs: one FPDT training step (forward, backward, the
//! AdamW step) on one cpu device (or one cuda device), with its chunks offloaded to the host
//! arena and prefetched back (double-buffered), against the same step with
//! everything resident, over chunk sizes; and the share of the copy
//! streams' busy time that ran while the compute stream was busy too
//! (copies hidden behind compute), read from the device's trace.
//!
//! Both schedules checkpoint (the same kernels run), so the difference is
//! the copies and their waits. Medians of a few steps, the two schedules
//! alternated, side by side in one run. The sweep stops when the next chunk
//! size would take the run past its time budget, and says so.

use std::time::{Duration, Instant};

use fpdt_runtime::trace::{busy_ns, overlap_ns};
use fpdt_runtime::{fmt_bytes, CpuConfig, CudaConfig, OpKind, Space, TraceEvent};

use crate::config::{Family, ModelConfig, Precision, Schedule, SplitMix64};
use crate::error::{ModelError, Result};
use crate::fpdt::{FpdtGroup, OptimStep};

use super::{fmt_time, median, render_table};

/// The chunk sizes swept by default (tokens).
pub const DEFAULT_CHUNKS: [usize; 6] = [1024, 2048, 4096, 8192, 16384, 32768];

/// What to sweep.
#[derive(Debug, Clone)]
pub struct OverlapOptions {
    /// The model (its `max_seq_len` is raised to the longest sequence).
    pub model: ModelConfig,
    /// Chunk sizes C, tokens, in the order run.
    pub chunks: Vec<usize>,
    /// Chunks per sequence (u; S = u * C): at least 2 for chunk i's offload
    /// to overlap chunk i+1's compute.
    pub chunks_per_seq: usize,
    /// Steps measured per schedule and chunk size (after one warm-up each).
    pub reps: usize,
    /// Time budget of the sweep: it stops before a size whose estimated cost
    /// would take it past this.
    pub budget: Duration,
    /// Device memory of the cpu device (the budget of its slab).
    pub device_memory: usize,
    /// Host arena of the cpu device.
    pub host_memory: usize,
    /// Run on the first GPU (the cuda device) instead of the cpu device.
    pub cuda: bool,
    /// Working precision (bf16 is what runs on the GPU on cuda).
    pub precision: Precision,
}

impl OverlapOptions {
    /// The bench's model: two layers of a small GPT with head dim 64
    /// (vocab 512, hidden 128, 2 heads of 64).
    pub fn default_model() -> ModelConfig {
        ModelConfig::gpt(512, 128, 2, 2)
    }
}

impl Default for OverlapOptions {
    fn default() -> Self {
        OverlapOptions {
            model: Self::default_model(),
            chunks: DEFAULT_CHUNKS.to_vec(),
            chunks_per_seq: 4,
            reps: 3,
            budget: Duration::from_secs(120),
            device_memory: 1 << 30,
            host_memory: 2 << 30,
            cuda: false,
            precision: Precision::F32,
        }
    }
}

/// One chunk size: medians over the measured steps.
#[derive(Debug, Clone, PartialEq)]
pub struct OverlapRow {
    /// Chunk size C, tokens.
    pub chunk: usize,
    /// Sequence length S = u * C.
    pub seq_len: usize,
    /// Median step time with everything resident, s.
    pub resident_s: f64,
    /// Median step time with offload and prefetch, s.
    pub offload_s: f64,
    /// Bytes copied between device and host in the offload run (the most
    /// of any step).
    pub copied_bytes: u64,
    /// Median busy time of the copy streams (union) in the offload run, s.
    pub copy_s: f64,
    /// Median share of that copy time during which a kernel ran too.
    pub hidden_fraction: f64,
    /// Peak device memory of the resident run.
    pub peak_resident: usize,
    /// Peak device memory of the offload run.
    pub peak_offload: usize,
}

impl OverlapRow {
    /// Extra step time of offloading, relative (0.05 = 5% slower).
    pub fn offload_cost(&self) -> f64 {
        self.offload_s / self.resident_s - 1.0
    }
}

/// Why the sweep stopped before its last size.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetStop {
    /// The chunk size not run.
    pub next_chunk: usize,
    /// What the last size run took, s.
    pub last_cost_s: f64,
    /// The estimated cost of the next size, s.
    pub estimate_s: f64,
}

/// The sweep's result.
#[derive(Debug, Clone)]
pub struct OverlapReport {
    /// The model run (max_seq_len raised).
    pub model: ModelConfig,
    /// Chunks per sequence.
    pub chunks_per_seq: usize,
    /// Steps measured per schedule and size.
    pub reps: usize,
    /// The budget, s.
    pub budget_s: f64,
    /// One row per size run.
    pub rows: Vec<OverlapRow>,
    /// Set when the budget stopped the sweep early.
    pub stopped: Option<BudgetStop>,
    /// Wall time of the whole sweep.
    pub total: Duration,
    /// The device it ran on, in words.
    pub device: String,
    /// The working precision.
    pub precision: Precision,
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

fn step(g: &mut FpdtGroup, tokens: &[u32], targets: &[i32]) -> Result<Step> {
    let dev = g
        .ranks()
        .first()
        .ok_or_else(|| ModelError::Shape("the group has no rank".into()))?
        .device()
        .clone();
    dev.synchronize()?;
    dev.trace().clear();
    let t = Instant::now();
    let stats = g.accumulate(tokens, targets, 1.0)?;
    g.optimizer_step(&OptimStep::typical(1e-4))?;
    dev.synchronize()?;
    let wall = t.elapsed();
    if !stats.loss.is_finite() {
        return Err(ModelError::Shape(format!(
            "the step's loss is {}, not finite",
            stats.loss
        )));
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

/// Runs the sweep; `progress` gets a line as each size starts and ends.
pub fn run(opts: &OverlapOptions, progress: &mut dyn FnMut(&str)) -> Result<OverlapReport> {
    if opts.chunks.is_empty() || opts.chunks.contains(&0) {
        return Err(ModelError::config(
            "chunks",
            format!("{:?}", opts.chunks),
            "needs at least one chunk size, each positive",
        ));
    }
    if opts.chunks_per_seq == 0 {
        return Err(ModelError::config("chunks_per_seq", 0, "must be positive"));
    }
    if opts.reps == 0 {
        return Err(ModelError::config("reps", 0, "must be at least 1"));
    }
    let longest = opts.chunks.iter().max().copied().unwrap_or(0) * opts.chunks_per_seq;
    let cfg = ModelConfig {
        max_seq_len: opts.model.max_seq_len.max(longest),
        ..opts.model.clone()
    };
    let params = cfg.layout().init(1, 0.02);
    let cpu = CpuConfig {
        name: "overlap".into(),
        device_memory: opts.device_memory,
        host_memory: opts.host_memory,
        pin_host_memory: false,
        ..CpuConfig::default()
    };
    let gpu = CudaConfig {
        device_memory: Some(opts.device_memory),
        host_memory: opts.host_memory,
        ..CudaConfig::default()
    };
    let budget_s = opts.budget.as_secs_f64();
    let u = opts.chunks_per_seq;
    let device_name = match opts.cuda {
        true => fpdt_runtime::cuda::probe()
            .ok()
            .and_then(|g| g.first().map(|g| format!("cuda device ({})", g.name)))
            .unwrap_or_else(|| "cuda device".into()),
        false => "cpu device".into(),
    };
    let start = Instant::now();
    let mut rows = Vec::new();
    let mut stopped = None;
    let mut last: Option<(usize, f64)> = None;
    for (i, &chunk) in opts.chunks.iter().enumerate() {
        // Attention is most of a step and grows as S^2.
        if let Some((last_chunk, last_cost_s)) = last {
            let estimate_s = last_cost_s * (chunk as f64 / last_chunk as f64).powi(2);
            if start.elapsed().as_secs_f64() + estimate_s > budget_s {
                stopped = Some(BudgetStop {
                    next_chunk: chunk,
                    last_cost_s,
                    estimate_s,
                });
                break;
            }
        }
        let t_size = Instant::now();
        let s = u * chunk;
        progress(&format!(
            "C = {chunk} (S = {s}), size {} of {}: {} + {} steps per schedule",
            i + 1,
            opts.chunks.len(),
            1,
            opts.reps
        ));
        let mut rng = SplitMix64(chunk as u64);
        let tokens: Vec<u32> = (0..s).map(|_| rng.below(cfg.vocab_size) as u32).collect();
        let targets: Vec<i32> = (0..s).map(|_| rng.below(cfg.vocab_size) as i32).collect();
        let offload = Schedule {
            precision: opts.precision,
            ..Schedule::fpdt(s, 1, u)
        };
        let resident = Schedule {
            offload: false,
            ..offload
        };
        let group = |sched: Schedule| -> Result<FpdtGroup> {
            match opts.cuda {
                true => FpdtGroup::cuda(&cfg, sched, &params, &gpu),
                false => FpdtGroup::cpu(&cfg, sched, &params, &cpu),
            }
        };
        let mut groups = [group(resident)?, group(offload)?];
        let mut steps: [Vec<Step>; 2] = [Vec::new(), Vec::new()];
        for rep in 0..=opts.reps {
            for (g, out) in groups.iter_mut().zip(steps.iter_mut()) {
                let st = step(g, &tokens, &targets)?;
                if rep > 0 {
                    out.push(st);
                }
            }
        }
        let [res, off] = &steps;
        let wall = |v: &[Step]| median(v.iter().map(|s| s.wall.as_secs_f64()).collect());
        let row = OverlapRow {
            chunk,
            seq_len: s,
            resident_s: wall(res),
            offload_s: wall(off),
            copied_bytes: off.iter().map(|s| s.copied).max().unwrap_or(0),
            copy_s: median(off.iter().map(|s| s.copy_ns as f64 * 1e-9).collect()),
            hidden_fraction: median(
                off.iter()
                    .map(|s| s.hidden_ns as f64 / s.copy_ns.max(1) as f64)
                    .collect(),
            ),
            peak_resident: res.first().map_or(0, |s| s.device_peak),
            peak_offload: off.first().map_or(0, |s| s.device_peak),
        };
        let cost = t_size.elapsed().as_secs_f64();
        progress(&format!(
            "C = {chunk}: resident {}, offload {} ({:.1} s for this size)",
            fmt_time(row.resident_s),
            fmt_time(row.offload_s),
            cost
        ));
        rows.push(row);
        last = Some((chunk, cost));
    }
    Ok(OverlapReport {
        model: cfg,
        chunks_per_seq: u,
        reps: opts.reps,
        budget_s,
        rows,
        stopped,
        total: start.elapsed(),
        device: device_name,
        precision: opts.precision,
    })
}

/// The column names of [`render`]'s table.
pub const HEADER: [&str; 8] = [
    "C (tokens)",
    "S",
    "all resident",
    "offload + prefetch",
    "cost of offload",
    "copies (offload run)",
    "copy time hidden",
    "peak device resident / offload",
];

/// The report as the bench prints it: the table, a line on the budget and
/// the total time.
pub fn render(r: &OverlapReport) -> String {
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|row| {
            vec![
                row.chunk.to_string(),
                row.seq_len.to_string(),
                fmt_time(row.resident_s),
                fmt_time(row.offload_s),
                format!("{:+.1}%", 100.0 * row.offload_cost()),
                format!(
                    "{} in {}",
                    fmt_bytes(row.copied_bytes as usize),
                    fmt_time(row.copy_s)
                ),
                format!("{:.0}%", 100.0 * row.hidden_fraction),
                format!(
                    "{} / {}",
                    fmt_bytes(row.peak_resident),
                    fmt_bytes(row.peak_offload)
                ),
            ]
        })
        .collect();
    let family = match r.model.family {
        Family::Gpt => "GPT",
        Family::Llama => "Llama",
    };
    let mut out = render_table(
        &format!(
            "one training step, {} layers of {family} hidden {} (head dim {}), P = 1, u = {} \
             chunks, checkpointing on in both, {}; median of {} step{} each, {}",
            r.model.layers,
            r.model.hidden,
            r.model.head_dim,
            r.chunks_per_seq,
            match r.precision {
                Precision::F32 => "f32",
                Precision::Bf16 => "bf16",
            },
            r.reps,
            if r.reps == 1 { "" } else { "s" },
            r.device
        ),
        &HEADER,
        &rows,
    );
    match &r.stopped {
        Some(s) => out.push_str(&format!(
            "stopped before C = {}: the last size took {:.0} s, the next would take about {:.0} s \
             more (attention grows as S^2), past the {:.0} s budget\n",
            s.next_chunk, s.last_cost_s, s.estimate_s, r.budget_s
        )),
        None => out.push_str(&format!(
            "every chunk size ran within the {:.0} s budget\n",
            r.budget_s
        )),
    }
    out.push_str(&format!("total {:.0} s\n", r.total.as_secs_f64()));
    out
}
