//! `fpdt plan`: the real schedule on the meta device, for sizes far beyond
//! this machine.

use std::process::ExitCode;

use crate::config::Schedule;
use crate::error::Result;

use super::train::{finite_in, load_model_config, usage};
use super::{parse_bytes_arg, EXIT_NOT_BUILT};

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
}

/// `fpdt plan`.
pub fn plan(args: &PlanArgs) -> Result<ExitCode> {
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
    if args.gpu_memory == 0 {
        return Err(usage("--gpu-memory", "0 must be positive"));
    }
    if args.host_memory == 0 {
        return Err(usage("--host-memory", "0 must be positive"));
    }
    let config = load_model_config(&args.model)?;
    if config.heads % args.gpus != 0 || config.kv_heads % args.gpus != 0 {
        return Err(usage(
            "--gpus",
            format!(
                "{} must divide the model's heads ({}) and kv_heads ({})",
                args.gpus, config.heads, config.kv_heads
            ),
        ));
    }
    let schedule = Schedule::fpdt(args.seq_len, args.gpus, args.seq_len / chunk);
    schedule.validate(&config)?;
    println!(
        "checked: {} ({} parameters, {:.3e} FLOP/token at S = {}), {} GPUs, chunks of {} tokens",
        args.model,
        config.param_count(),
        config.flops_per_token(args.seq_len),
        args.seq_len,
        args.gpus,
        chunk
    );
    eprintln!(
        "error: fpdt plan: the meta-device planner is not built yet (the model's schedule on the \
         meta device is still being written)"
    );
    Ok(ExitCode::from(EXIT_NOT_BUILT))
}
