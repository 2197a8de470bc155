//! The largest sequence one training step fits in a fixed device budget,
//! FPDT (chunks offloaded to host memory, checkpointing) over the Ulysses
//! baseline (one chunk, nothing offloaded), same model and GPUs:
//!
//! - on meta devices at full size: llama-3-8b on 4 and 8 GPUs of 80 GB
//!   (256 GiB of host memory each), found by the planner's search;
//! - on cpu devices at a small size, a real run: tiny-gpt on 2 "GPUs" of
//!   1 MiB of device memory (8 MiB of host memory each). The planner's
//!   answer is checked by running the step for real at that length (it must
//!   run) and one granule longer (it must run out of memory).
//!
//! Prints a table; the paper's claim is a ratio of at least 16x. Set
//! `FPDT_MAX_SEQ_QUICK=1` to skip the 8-GPU search (the slowest part).

#[path = "../../benches/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use fpdt_model::planner::{self, fmt_tokens, MaxLen, PlanKind, PlanSpec};
use fpdt_model::{FpdtGroup, ModelConfig, ModelError, OptimStep, SplitMix64};
use fpdt_runtime::{fmt_bytes, CpuConfig};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// One row: where, FPDT's and the baseline's longest sequences, the ratio
/// and what bounds each.
struct Row {
    setting: String,
    fpdt: MaxLen,
    ulysses: MaxLen,
    /// The real run's verdict (cpu rows).
    checked: Option<String>,
}

/// What stops a schedule one granule past its longest sequence.
fn bound(cfg: &ModelConfig, spec: &PlanSpec, m: &MaxLen) -> Result<String, ModelError> {
    let next = planner::plan(cfg, &spec.at(m.seq_len + m.granule), m.kind)?;
    // Over by less than the printed precision: say by how much.
    let over = |peak: usize, budget: usize| {
        let (p, b) = (fmt_bytes(peak), fmt_bytes(budget));
        if p == b {
            format!("{} over {b}", fmt_bytes(peak.saturating_sub(budget)))
        } else {
            format!("{p} > {b}")
        }
    };
    Ok(match (next.fits_device(), next.fits_host()) {
        (false, true) => format!("device ({})", over(next.device.peak, spec.gpu_memory)),
        (true, false) => format!("host ({})", over(next.host.peak, spec.host_memory)),
        (false, false) => "device and host".into(),
        (true, true) => "the search limit".into(),
    })
}

fn search(cfg: &ModelConfig, spec: &PlanSpec, setting: &str, limit: usize) -> BenchResult<Row> {
    let fpdt = planner::max_seq_len(cfg, spec, PlanKind::Fpdt, limit)?;
    let ulysses = planner::max_seq_len(cfg, spec, PlanKind::Ulysses, limit)?;
    Ok(Row {
        setting: setting.into(),
        fpdt,
        ulysses,
        checked: None,
    })
}

/// Runs one real training step (forward, backward, the sharded AdamW
/// step) of `kind` at `seq_len` on cpu devices with `spec`'s budgets:
/// Ok(true) when it ran, Ok(false) when a device ran out of memory, and its
/// wall time.
fn cpu_step(
    cfg: &ModelConfig,
    spec: &PlanSpec,
    kind: PlanKind,
    seq_len: usize,
) -> BenchResult<(bool, Duration)> {
    let sp = spec.at(seq_len);
    let sched = sp.schedule(kind)?;
    let cpu = CpuConfig {
        name: "max-seq".into(),
        device_memory: sp.gpu_memory,
        host_memory: sp.host_memory,
        pin_host_memory: false,
        // Out of memory is the expected answer one granule past the
        // longest: waiting for frees that cannot come only costs time.
        wait_timeout: Duration::from_secs(2),
        ..CpuConfig::default()
    };
    let params = cfg.layout().init(3, 0.02);
    let mut rng = SplitMix64(5);
    let tokens: Vec<u32> = (0..seq_len)
        .map(|_| rng.below(cfg.vocab_size) as u32)
        .collect();
    let targets: Vec<i32> = (0..seq_len)
        .map(|_| rng.below(cfg.vocab_size) as i32)
        .collect();
    let t = Instant::now();
    let run = || -> Result<(), ModelError> {
        let mut g = FpdtGroup::cpu(cfg, sched, &params, &cpu)?;
        let stats = g.accumulate(&tokens, &targets, 1.0)?;
        if !stats.loss.is_finite() {
            return Err(ModelError::Shape(format!(
                "loss {} at S = {seq_len}",
                stats.loss
            )));
        }
        g.optimizer_step(&OptimStep::typical(1e-3))?;
        Ok(())
    };
    match run() {
        Ok(()) => Ok((true, t.elapsed())),
        Err(e) if planner::is_out_of_memory(&e) => Ok((false, t.elapsed())),
        Err(e) => Err(e.into()),
    }
}

/// Checks a planned longest sequence with real steps: it runs, one granule
/// more does not. Returns the verdict.
fn check_on_cpu(cfg: &ModelConfig, spec: &PlanSpec, m: &MaxLen) -> BenchResult<String> {
    let (at, t_at) = cpu_step(cfg, spec, m.kind, m.seq_len)?;
    let (next, t_next) = cpu_step(cfg, spec, m.kind, m.seq_len + m.granule)?;
    let label = |ran| if ran { "runs" } else { "out of memory" };
    Ok(format!(
        "{}: {} ({}), {}: {} ({})",
        m.seq_len,
        label(at),
        support::fmt_time(t_at.as_secs_f64()),
        m.seq_len + m.granule,
        label(next),
        support::fmt_time(t_next.as_secs_f64()),
    ) + if at && !next {
        ""
    } else {
        "  <- differs from the plan"
    })
}

fn main() -> BenchResult<()> {
    let quick = std::env::var_os("FPDT_MAX_SEQ_QUICK").is_some();
    let llama = ModelConfig::preset("llama-3-8b")?;
    // 64K-token chunks: DeepSpeed's default; it keeps u small and the
    // search quick at millions of tokens.
    let chunk = 65_536;
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for gpus in [4usize, 8] {
        if gpus == 8 && quick {
            notes.push("8 GPUs skipped (FPDT_MAX_SEQ_QUICK)".to_string());
            continue;
        }
        let spec = PlanSpec::h100(chunk, gpus, chunk);
        let setting = format!(
            "meta: llama-3-8b, {gpus} GPUs of {}, {} host each, C = 64K",
            fmt_bytes(spec.gpu_memory),
            fmt_bytes(spec.host_memory)
        );
        let t = Instant::now();
        let mut row = search(&llama, &spec, &setting, 16 << 20)?;
        support::record(&format!("search {gpus} GPUs"), t.elapsed(), 1);
        notes.push(format!(
            "{gpus} GPUs: FPDT bounded by {}, the baseline by {}",
            bound(&llama, &spec, &row.fpdt)?,
            bound(&llama, &spec, &row.ulysses)?
        ));
        row.checked = None;
        rows.push(row);
    }
    // A real run: tiny-gpt on 2 cpu "GPUs" of 1 MiB, 8 MiB host.
    let tiny = ModelConfig::preset("tiny-gpt")?;
    let spec = PlanSpec {
        gpu_memory: 1 << 20,
        host_memory: 8 << 20,
        ..PlanSpec::h100(256, 2, 256)
    };
    let t = Instant::now();
    let mut row = search(
        &tiny,
        &spec,
        "cpu: tiny-gpt, 2 GPUs of 1 MiB, 8 MiB host each, C = 256",
        1 << 20,
    )?;
    support::record("search tiny", t.elapsed(), 1);
    notes.push(format!(
        "tiny-gpt: FPDT bounded by {}, the baseline by {}",
        bound(&tiny, &spec, &row.fpdt)?,
        bound(&tiny, &spec, &row.ulysses)?
    ));
    let t = Instant::now();
    row.checked = Some(format!(
        "FPDT {}; Ulysses {}",
        check_on_cpu(&tiny, &spec, &row.fpdt)?,
        check_on_cpu(&tiny, &spec, &row.ulysses)?
    ));
    support::record("cpu check", t.elapsed(), 1);
    rows.push(row);

    let mut table = Vec::new();
    let mut short = Vec::new();
    for r in &rows {
        let ratio = r.fpdt.seq_len as f64 / r.ulysses.seq_len.max(1) as f64;
        if ratio < 16.0 {
            short.push(format!(
                "{}: {ratio:.1}x is below the paper's 16x (see what bounds each above)",
                r.setting
            ));
        }
        let peak = |m: &MaxLen| {
            m.report.as_ref().map_or("-".into(), |p| {
                format!("{} / {}", fmt_bytes(p.device.peak), fmt_bytes(p.host.peak))
            })
        };
        table.push(vec![
            r.setting.clone(),
            format!("{} ({})", fmt_tokens(r.fpdt.seq_len), peak(&r.fpdt)),
            format!("{} ({})", fmt_tokens(r.ulysses.seq_len), peak(&r.ulysses)),
            format!("{ratio:.1}x"),
            format!("{} + {}", r.fpdt.probes, r.ulysses.probes),
        ]);
        if let Some(c) = &r.checked {
            notes.push(format!("real cpu steps: {c}"));
        }
    }
    for n in &notes {
        println!("{n}");
    }
    for (name, _) in [
        ("search 4 GPUs", ()),
        ("search 8 GPUs", ()),
        ("search tiny", ()),
        ("cpu check", ()),
    ] {
        let m = support::median(name);
        if m.is_finite() {
            println!("{name}: {}", support::fmt_time(m));
        }
    }
    support::print_table(
        "largest sequence of one training step in a fixed device budget (peak device / host at it)",
        &[
            "setting",
            "FPDT",
            "Ulysses baseline",
            "ratio",
            "steps planned",
        ],
        &table,
    );
    if short.is_empty() {
        println!("every ratio is at least the paper's 16x");
    } else {
        for s in short {
            println!("{s}");
        }
    }
    Ok(())
}
