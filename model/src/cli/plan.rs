//! `fpdt plan`: the real schedule on the meta device, for sizes far beyond
//! this machine. Runs one training step of FPDT and of the Ulysses baseline
//! under the given budgets and rates (see [`crate::planner`]), prints them
//! side by side with the largest sequence each fits, and the paper's figures
//! where it published some for the model and GPU count.

use std::process::ExitCode;

use fpdt_runtime::fmt_bytes;

use crate::config::{ModelConfig, Precision};
use crate::error::{ModelError, Result};
use crate::planner::{self, fmt_tokens, MaxLen, MemoryReport, PlanKind, PlanReport, PlanSpec};

use super::parse_bytes_arg;
use super::train::{finite_in, load_model_config, usage, Switch};

/// `fpdt plan`.
#[derive(Debug, Clone, clap::Args)]
pub struct PlanArgs {
    /// Model preset or Hugging Face config.json.
    #[arg(long, default_value = "llama-3-8b", value_name = "PRESET|CONFIG.JSON")]
    pub model: String,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 262_144, value_name = "S")]
    pub seq_len: usize,
    /// GPUs (sequence-parallel ranks).
    #[arg(long, default_value_t = 4, value_name = "P")]
    pub gpus: usize,
    /// Tokens per chunk (default: S/16, at most 64K).
    #[arg(long, value_name = "C")]
    pub chunk: Option<usize>,
    /// GPU memory per GPU.
    #[arg(long, default_value = "80G", value_parser = parse_bytes_arg, value_name = "BYTES")]
    pub gpu_memory: usize,
    /// Host memory per GPU.
    #[arg(long, default_value = "256G", value_parser = parse_bytes_arg, value_name = "BYTES")]
    pub host_memory: usize,
    /// Host-device link bandwidth, GB/s.
    #[arg(long, default_value_t = 25.0, value_name = "GB/S")]
    pub pcie_gbps: f64,
    /// GPU-GPU link bandwidth, GB/s.
    #[arg(long, default_value_t = 300.0, value_name = "GB/S")]
    pub nvlink_gbps: f64,
    /// Peak dense bf16 throughput per GPU, TFLOP/s.
    #[arg(long, default_value_t = 312.0, value_name = "TFLOPS")]
    pub peak_tflops: f64,
    /// Fraction of the peak that large kernels reach in the cost model.
    #[arg(long, default_value_t = 0.72, value_name = "FRACTION")]
    pub kernel_efficiency: f64,
    /// FPDT: offload chunks to host memory.
    #[arg(long, value_enum, default_value = "on")]
    pub offload: Switch,
    /// FPDT: activation checkpointing.
    #[arg(long, value_enum, default_value = "on")]
    pub checkpoint: Switch,
    /// Tokens per loss sub-chunk (0: the MLP sub-chunk, C/(2P)).
    #[arg(long, default_value_t = 0, value_name = "TOKENS")]
    pub loss_chunk: usize,
    /// Working precision: f32 (the host kernels' path, exact against the
    /// cpu device), or bf16 (bf16 weights, activations and offloaded
    /// chunks, planned as the cuda device runs them: PTX kernels and
    /// cuBLASLt GEMMs).
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    pub precision: String,
    /// Search up to this many tokens for the largest sequence that fits
    /// (0: no search).
    #[arg(long, default_value_t = 16 << 20, value_name = "TOKENS")]
    pub search_limit: usize,
}

/// A figure the FPDT paper published (REFERENCE-NUMBERS.md).
struct PaperFigures {
    source: &'static str,
    ulysses_max: &'static str,
    ulysses_hbm_mfu: &'static str,
    fpdt_max: &'static str,
    fpdt_hbm_mfu: &'static str,
}

/// The paper's figures for `model` on `gpus` GPUs of 80 GB, where it has
/// some.
fn paper(model: &str, gpus: usize, gpu_memory: usize) -> Option<PaperFigures> {
    if gpu_memory != 80 << 30 {
        return None;
    }
    let fig = |source, ulysses_max, ulysses_hbm_mfu, fpdt_max, fpdt_hbm_mfu| {
        Some(PaperFigures {
            source,
            ulysses_max,
            ulysses_hbm_mfu,
            fpdt_max,
            fpdt_hbm_mfu,
        })
    };
    match (model.to_ascii_lowercase().as_str(), gpus) {
        ("llama-3-8b", 4) => fig(
            "FPDT paper, max length by model (read from figures)",
            "128K",
            "-",
            "2M",
            "MFU ~58%",
        ),
        ("llama-3-8b", 8) => fig(
            "FPDT paper, 8B Llama 3 on 8 GPUs table (Ulysses + ZeRO-3 / ckpt + offload + ZeRO-3 + FPDT)",
            "64K",
            "52.3G HBM, MFU 21.0%",
            "4M",
            "68.0G HBM, MFU 55.7%",
        ),
        ("gpt-2.7b", 2) => fig("FPDT paper (figures)", "128K", "-", "1M", "MFU ~40.5%"),
        ("gpt-6.7b", 4) => fig("FPDT paper (figures)", "128K", "-", "2M", "MFU ~57.7%"),
        ("llama-3-70b", 32) => fig("FPDT paper (figures)", "1M", "-", "4M", "MFU ~54%"),
        _ => None,
    }
}

fn checked_spec(args: &PlanArgs, config: &ModelConfig) -> Result<PlanSpec> {
    if args.gpus == 0 {
        return Err(usage("--gpus", "0 must be at least 1"));
    }
    if args.seq_len == 0 {
        return Err(usage("--seq-len", "0 must be positive"));
    }
    let chunk = args
        .chunk
        .unwrap_or_else(|| (args.seq_len / 16).clamp(1, 65_536));
    if chunk == 0 || args.seq_len % chunk != 0 {
        return Err(usage(
            "--chunk",
            format!("{chunk} must divide --seq-len {}", args.seq_len),
        ));
    }
    if chunk % args.gpus != 0 {
        return Err(usage(
            "--chunk",
            format!("{chunk} must be divisible by --gpus {}", args.gpus),
        ));
    }
    for (flag, v) in [
        ("--pcie-gbps", args.pcie_gbps),
        ("--nvlink-gbps", args.nvlink_gbps),
        ("--peak-tflops", args.peak_tflops),
    ] {
        finite_in(flag, v, f64::MIN_POSITIVE, f64::MAX, "must be positive")?;
    }
    finite_in(
        "--kernel-efficiency",
        args.kernel_efficiency,
        f64::MIN_POSITIVE,
        1.0,
        "must be in (0, 1]",
    )?;
    if args.gpu_memory == 0 {
        return Err(usage("--gpu-memory", "0 must be positive"));
    }
    if args.host_memory == 0 {
        return Err(usage("--host-memory", "0 must be positive"));
    }
    if config.heads % args.gpus != 0 || config.kv_heads % args.gpus != 0 {
        return Err(usage(
            "--gpus",
            format!(
                "{} must divide the model's heads ({}) and kv_heads ({})",
                args.gpus, config.heads, config.kv_heads
            ),
        ));
    }
    if args.loss_chunk > chunk / args.gpus {
        return Err(usage(
            "--loss-chunk",
            format!(
                "{} must not exceed the tokens per GPU and chunk ({} = --chunk / --gpus)",
                args.loss_chunk,
                chunk / args.gpus
            ),
        ));
    }
    let precision: Precision = args
        .precision
        .parse()
        .map_err(|e: ModelError| usage("--precision", e.to_string()))?;
    Ok(PlanSpec {
        seq_len: args.seq_len,
        gpus: args.gpus,
        chunk,
        gpu_memory: args.gpu_memory,
        host_memory: args.host_memory,
        host_link_gbps: args.pcie_gbps,
        nvlink_gbps: args.nvlink_gbps,
        peak_tflops: args.peak_tflops,
        kernel_efficiency: args.kernel_efficiency,
        offload: args.offload == Switch::On,
        checkpoint: args.checkpoint == Switch::On,
        loss_chunk: args.loss_chunk,
        precision,
    })
}

/// The flag to raise when not even the smallest step fits, and why.
fn too_small(spec: &PlanSpec, r: &PlanReport) -> ModelError {
    let c = fmt_tokens(spec.chunk);
    if !r.fits_device() {
        usage(
            "--gpu-memory",
            format!(
                "{} per GPU does not hold even one chunk of {c} tokens (FPDT needs {} at S = {c}, \
                 {} of it weights, gradients and optimizer state): raise --gpu-memory, use more \
                 --gpus or a smaller --chunk",
                fmt_bytes(spec.gpu_memory),
                fmt_bytes(r.device.peak),
                fmt_bytes(fixed_state(&r.device)),
            ),
        )
    } else {
        usage(
            "--host-memory",
            format!(
                "{} per GPU does not hold even one chunk of {c} tokens (FPDT needs {} of host \
                 memory at S = {c}): raise --host-memory or use more --gpus",
                fmt_bytes(spec.host_memory),
                fmt_bytes(r.host.peak),
            ),
        )
    }
}

/// Bytes of weights, gradients and optimizer state at the peak.
fn fixed_state(m: &MemoryReport) -> usize {
    m.by_category()
        .iter()
        .filter(|(c, _)| matches!(*c, "weights" | "gradients" | "optimizer"))
        .map(|(_, b)| b)
        .sum()
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "NO" }.to_string()
}

fn fmt_secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

/// Rows of one column per report: the step, its memory and its time.
fn table(reports: &[&PlanReport], maxes: &[Option<&MaxLen>]) -> Vec<(String, Vec<String>)> {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let col = |f: &dyn Fn(&PlanReport) -> String| reports.iter().map(|r| f(r)).collect();
    rows.push((
        "schedule".into(),
        col(&|r| {
            let s = &r.schedule;
            format!(
                "u = {}, C = {}, offload {}, ckpt {}",
                s.chunks,
                fmt_tokens(s.chunk_tokens()),
                if s.offload { "on" } else { "off" },
                if s.checkpoint { "on" } else { "off" }
            )
        }),
    ));
    rows.push((
        "peak device memory / GPU".into(),
        col(&|r| fmt_bytes(r.device.peak)),
    ));
    let mut cats: Vec<&'static str> = Vec::new();
    for r in reports {
        for (c, _) in r.device.by_category() {
            if !cats.contains(&c) {
                cats.push(c);
            }
        }
    }
    for c in cats {
        rows.push((
            format!("  {c} (at peak)"),
            col(&|r| {
                let b = r
                    .device
                    .by_category()
                    .iter()
                    .find(|(k, _)| *k == c)
                    .map_or(0, |(_, b)| *b);
                fmt_bytes(b)
            }),
        ));
    }
    rows.push((
        "  largest tag at peak".into(),
        col(&|r| {
            r.device.tags.first().map_or("-".into(), |t| {
                format!("{} {}", t.tag, fmt_bytes(t.at_peak))
            })
        }),
    ));
    rows.push((
        "peak host memory / GPU".into(),
        col(&|r| fmt_bytes(r.host.peak)),
    ));
    rows.push((
        "  largest host tag at peak".into(),
        col(&|r| {
            r.host.tags.first().map_or("-".into(), |t| {
                format!("{} {}", t.tag, fmt_bytes(t.at_peak))
            })
        }),
    ));
    rows.push((
        "predicted step time".into(),
        col(&|r| fmt_secs(r.step_time)),
    ));
    rows.push((
        "  of which optimizer".into(),
        col(&|r| fmt_secs(r.optimizer_time)),
    ));
    rows.push((
        "  compute / h2d / d2h busy".into(),
        col(&|r| {
            format!(
                "{} / {} / {}",
                fmt_secs(r.busy.compute),
                fmt_secs(r.busy.h2d),
                fmt_secs(r.busy.d2h)
            )
        }),
    ));
    rows.push((
        "tokens / s (all GPUs)".into(),
        col(&|r| format!("{:.0}", r.tokens_per_s())),
    ));
    rows.push(("MFU".into(), col(&|r| format!("{:.1}%", 100.0 * r.mfu()))));
    rows.push((
        "HFU (recompute counted)".into(),
        col(&|r| format!("{:.1}%", 100.0 * r.hfu())),
    ));
    rows.push((
        "fits device / host".into(),
        col(&|r| format!("{} / {}", yes_no(r.fits_device()), yes_no(r.fits_host()))),
    ));
    if maxes.iter().any(Option::is_some) {
        rows.push((
            "largest sequence that fits".into(),
            maxes
                .iter()
                .map(|m| match m {
                    Some(m) if m.seq_len == 0 => "none".into(),
                    Some(m) => format!("{} ({} tokens)", fmt_tokens(m.seq_len), m.seq_len),
                    None => "-".into(),
                })
                .collect(),
        ));
        rows.push((
            "  its peak device / host".into(),
            maxes
                .iter()
                .map(|m| match m.and_then(|m| m.report.as_ref()) {
                    Some(r) => format!("{} / {}", fmt_bytes(r.device.peak), fmt_bytes(r.host.peak)),
                    None => "-".into(),
                })
                .collect(),
        ));
        rows.push((
            "  its step time, MFU".into(),
            maxes
                .iter()
                .map(|m| match m.and_then(|m| m.report.as_ref()) {
                    Some(r) => format!("{}, {:.1}%", fmt_secs(r.step_time), 100.0 * r.mfu()),
                    None => "-".into(),
                })
                .collect(),
        ));
    }
    rows
}

fn print_rows(header: &[String], rows: &[(String, Vec<String>)]) {
    let w0 = rows
        .iter()
        .map(|r| r.0.len())
        .chain([header[0].len()])
        .max()
        .unwrap_or(0);
    let ncol = header.len() - 1;
    let mut w = vec![0usize; ncol];
    for (i, h) in header.iter().skip(1).enumerate() {
        w[i] = h.len();
    }
    for (_, cells) in rows {
        for (i, c) in cells.iter().enumerate().take(ncol) {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |first: &str, cells: &[String]| {
        let mut s = format!("| {first:<w0$} |");
        for (i, c) in cells.iter().enumerate().take(ncol) {
            s.push_str(&format!(" {c:<width$} |", width = w[i]));
        }
        println!("{s}");
    };
    line(&header[0], &header[1..]);
    let dashes: Vec<String> = w.iter().map(|n| "-".repeat(*n)).collect();
    line(&"-".repeat(w0), &dashes);
    for (name, cells) in rows {
        line(name, cells);
    }
}

/// `fpdt plan`.
pub fn plan(args: &PlanArgs) -> Result<ExitCode> {
    if args.gpus == 0 {
        return Err(usage("--gpus", "0 must be at least 1"));
    }
    let config = load_model_config(&args.model)?;
    let spec = checked_spec(args, &config)?;
    println!(
        "plan: {} ({:.2}B parameters, {:.3e} FLOP/token at S = {}), {} GPUs of {}, {} of host \
         memory each; {} TFLOP/s peak x {} kernel efficiency, PCIe {} GB/s, NVLink {} GB/s; {}",
        args.model,
        config.param_count() as f64 / 1e9,
        config.flops_per_token(spec.seq_len),
        fmt_tokens(spec.seq_len),
        spec.gpus,
        fmt_bytes(spec.gpu_memory),
        fmt_bytes(spec.host_memory),
        spec.peak_tflops,
        spec.kernel_efficiency,
        spec.host_link_gbps,
        spec.nvlink_gbps,
        match spec.precision {
            Precision::F32 => "f32 (the host kernels' path)",
            Precision::Bf16 => "bf16 (the cuda device's PTX kernels and cuBLASLt GEMMs)",
        },
    );
    let fpdt = planner::plan(&config, &spec, PlanKind::Fpdt)?;
    let ulysses = planner::plan(&config, &spec, PlanKind::Ulysses)?;
    let (mut fmax, mut umax) = (None, None);
    if args.search_limit > 0 {
        let f = planner::max_seq_len(&config, &spec, PlanKind::Fpdt, args.search_limit)?;
        if f.seq_len == 0 {
            // Not even one chunk fits: say which budget to raise, using the
            // smallest step's peaks.
            let smallest = planner::plan(&config, &spec.at(spec.chunk), PlanKind::Fpdt)?;
            return Err(too_small(&spec, &smallest));
        }
        fmax = Some(f);
        umax = Some(planner::max_seq_len(
            &config,
            &spec,
            PlanKind::Ulysses,
            args.search_limit,
        )?);
    }
    println!();
    let header = vec![
        format!("S = {}", fmt_tokens(spec.seq_len)),
        "FPDT".to_string(),
        "Ulysses baseline".to_string(),
    ];
    print_rows(
        &header,
        &table(&[&fpdt, &ulysses], &[fmax.as_ref(), umax.as_ref()]),
    );
    if let (Some(f), Some(u)) = (&fmax, &umax) {
        println!();
        if u.seq_len > 0 {
            println!(
                "FPDT fits {:.1}x the baseline's longest sequence ({} vs {}; searched in steps \
                 of {} and {} tokens, up to {}; {} + {} steps planned in {:.1} s)",
                f.seq_len as f64 / u.seq_len as f64,
                fmt_tokens(f.seq_len),
                fmt_tokens(u.seq_len),
                f.granule,
                u.granule,
                fmt_tokens(args.search_limit),
                f.probes,
                u.probes,
                f.wall_time + u.wall_time,
            );
        } else {
            println!(
                "the baseline fits no sequence at all (not even {} tokens); FPDT fits {}",
                u.granule,
                fmt_tokens(f.seq_len)
            );
        }
        if f.seq_len >= args.search_limit / f.granule * f.granule {
            println!("FPDT reached the search limit: it may fit longer (raise --search-limit)");
        }
    }
    if let Some(p) = paper(&args.model, spec.gpus, spec.gpu_memory) {
        println!("\npaper ({}):", p.source);
        print_rows(
            &[
                String::new(),
                "FPDT (paper)".into(),
                "Ulysses (paper)".into(),
                "FPDT (ours)".into(),
                "Ulysses (ours)".into(),
            ],
            &[
                (
                    "largest sequence".into(),
                    vec![
                        p.fpdt_max.into(),
                        p.ulysses_max.into(),
                        fmax.as_ref().map_or("-".into(), |m| fmt_tokens(m.seq_len)),
                        umax.as_ref().map_or("-".into(), |m| fmt_tokens(m.seq_len)),
                    ],
                ),
                (
                    "at that length".into(),
                    vec![
                        p.fpdt_hbm_mfu.into(),
                        p.ulysses_hbm_mfu.into(),
                        at_max(fmax.as_ref()),
                        at_max(umax.as_ref()),
                    ],
                ),
            ],
        );
        println!(
            "(ours: {} weights and f32 gradients replicated on every GPU with a sharded \
             optimizer; the paper: bf16 with ZeRO-3. MFU counts 6N + 6 L H d S FLOPs per \
             token, causal attention as half, recomputation not counted.)",
            spec.precision.name()
        );
    }
    println!(
        "\n(planned on {} meta devices in {:.1} s and {:.1} s)",
        spec.gpus, fpdt.wall_time, ulysses.wall_time
    );
    Ok(ExitCode::SUCCESS)
}

fn at_max(m: Option<&MaxLen>) -> String {
    match m.and_then(|m| m.report.as_ref()) {
        Some(r) => format!(
            "{} HBM, MFU {:.1}%",
            fmt_bytes(r.device.peak),
            100.0 * r.mfu()
        ),
        None => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_print_as_the_paper_writes_them() {
        assert_eq!(fmt_tokens(65_536), "64K");
        assert_eq!(fmt_tokens(2 << 20), "2M");
        assert_eq!(fmt_tokens(3 << 19), "1.50M");
        assert_eq!(fmt_tokens(1000), "1000");
    }
}
