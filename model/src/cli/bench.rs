//! `fpdt bench overlap` and `fpdt bench memory`: the tables of the
//! `overlap` and `memory` bench binaries (see [`crate::bench`]), with the
//! sizes a user would vary as flags.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};

use crate::bench::memory::{self, MemoryDevice, MemoryOptions};
use crate::bench::overlap::{self, OverlapOptions, DEFAULT_CHUNKS};
use crate::config::{ModelConfig, Precision};
use crate::error::{ModelError, Result};

use super::parse_bytes_arg;
use super::train::{finite_in, load_model_config, usage};

/// Where a bench runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchDevice {
    /// The cpu backend: kernels and copies really run.
    Cpu,
    /// The meta device: bytes are counted, nothing runs.
    Meta,
    /// NVIDIA GPUs (not supported by the model's layers yet).
    Cuda,
}

/// `fpdt bench`'s subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Step time with chunks offloaded and prefetched vs everything
    /// resident, over chunk sizes; the share of copy time hidden behind
    /// compute (cpu device).
    Overlap(OverlapArgs),
    /// Peak device memory per rank against sequence length, FPDT vs the
    /// Ulysses baseline.
    Memory(MemoryArgs),
}

/// `fpdt bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The benchmark.
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// `fpdt bench overlap`.
#[derive(Debug, Clone, clap::Args)]
pub struct OverlapArgs {
    /// Chunk sizes C to sweep, tokens, comma separated (in the order run).
    #[arg(long, value_delimiter = ',', value_name = "C,...",
          default_values_t = DEFAULT_CHUNKS.to_vec())]
    pub chunks: Vec<usize>,
    /// Chunks per sequence (u; S = u * C).
    #[arg(long, default_value_t = 4, value_name = "U")]
    pub chunks_per_seq: usize,
    /// Steps measured per schedule and chunk size, after one warm-up.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub reps: usize,
    /// Time budget of the sweep: it stops before a chunk size whose
    /// estimated cost would take it past this.
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    pub budget_secs: f64,
    /// Model: a preset (tiny-gpt, tiny-llama, gpt2-124m, ...) or a Hugging
    /// Face config.json; default: 2 layers of a GPT with hidden 128 and 2
    /// heads of 64 (vocab 512).
    #[arg(long, value_name = "PRESET|CONFIG.JSON")]
    pub model: Option<String>,
    /// Device backend: cpu, or cuda (the first GPU; with --precision bf16
    /// and head dims 64 or 128 the step computes there).
    #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
    pub device: BenchDevice,
    /// Working precision of the step: f32, or bf16 (what runs on the GPU).
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    pub precision: Precision,
    /// Device memory (per group: the two schedules each have one).
    #[arg(long, default_value = "1G", value_parser = parse_bytes_arg, value_name = "BYTES")]
    pub device_memory: usize,
    /// Host arena (per group).
    #[arg(long, default_value = "2G", value_parser = parse_bytes_arg, value_name = "BYTES")]
    pub host_memory: usize,
    /// No progress lines on stderr.
    #[arg(long)]
    pub no_progress: bool,
}

/// `fpdt bench memory`.
#[derive(Debug, Clone, clap::Args)]
pub struct MemoryArgs {
    /// Model: a preset or a Hugging Face config.json.
    #[arg(long, default_value = "gpt2-124m", value_name = "PRESET|CONFIG.JSON")]
    pub model: String,
    /// Keep only this many of the model's layers (0: all of them).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub layers: usize,
    /// Sequence-parallel ranks (P).
    #[arg(long, default_value_t = 4, value_name = "P")]
    pub ranks: usize,
    /// FPDT's chunk size C, tokens.
    #[arg(long, default_value_t = 4096, value_name = "C")]
    pub chunk: usize,
    /// Sequence lengths, comma separated, each a multiple of --chunk.
    #[arg(long, value_delimiter = ',', value_name = "S,...",
          default_values_t = vec![8192usize, 16384, 32768, 65536])]
    pub seq_lens: Vec<usize>,
    /// Device backend: meta counts bytes at any size; cpu runs the steps.
    #[arg(long, value_enum, default_value_t = BenchDevice::Meta)]
    pub device: BenchDevice,
    /// Device memory per rank (default: 1T on meta, 4G on cpu).
    #[arg(long, value_parser = parse_bytes_arg, value_name = "BYTES")]
    pub device_memory: Option<usize>,
    /// Host memory per rank (default: 16T on meta, 8G on cpu).
    #[arg(long, value_parser = parse_bytes_arg, value_name = "BYTES")]
    pub host_memory: Option<usize>,
    /// No progress lines on stderr.
    #[arg(long)]
    pub no_progress: bool,
}

fn cuda_not_supported() -> ModelError {
    usage(
        "--device",
        "cuda: this bench reads peak memory, which the meta device gives exactly at any size \
         (the planner's tests check it equals what the cpu device measures); use --device meta \
         or --device cpu",
    )
}

impl OverlapArgs {
    /// Checks every flag; errors name the flag, the value and the rule.
    pub fn check(&self) -> Result<OverlapOptions> {
        match self.device {
            BenchDevice::Cuda => super::train::check_cuda()?,
            BenchDevice::Meta => {
                return Err(usage(
                    "--device",
                    "meta: this bench measures step time and copies overlapping kernels, and the \
                     meta device runs neither (it only counts bytes); use --device cpu, or \
                     `fpdt bench memory --device meta`",
                ))
            }
            BenchDevice::Cpu => {}
        }
        if self.chunks.is_empty() {
            return Err(usage("--chunks", "empty: name at least one chunk size"));
        }
        if let Some(c) = self.chunks.iter().find(|&&c| c == 0) {
            return Err(usage(
                "--chunks",
                format!("{c}: every chunk size must be positive"),
            ));
        }
        if self.chunks_per_seq < 2 {
            return Err(usage(
                "--chunks-per-seq",
                format!(
                    "{} must be at least 2 (a chunk's copies overlap the next chunk's compute)",
                    self.chunks_per_seq
                ),
            ));
        }
        if self.reps == 0 {
            return Err(usage("--reps", "0 must be at least 1"));
        }
        finite_in(
            "--budget-secs",
            self.budget_secs,
            f64::MIN_POSITIVE,
            1e9,
            "must be a positive number of seconds",
        )?;
        if self.device_memory == 0 {
            return Err(usage("--device-memory", "0 must be positive"));
        }
        if self.host_memory == 0 {
            return Err(usage("--host-memory", "0 must be positive"));
        }
        let model = match &self.model {
            Some(spec) => load_model_config(spec)?,
            None => OverlapOptions::default_model(),
        };
        Ok(OverlapOptions {
            model,
            chunks: self.chunks.clone(),
            chunks_per_seq: self.chunks_per_seq,
            reps: self.reps,
            budget: Duration::from_secs_f64(self.budget_secs),
            device_memory: self.device_memory,
            host_memory: self.host_memory,
            cuda: self.device == BenchDevice::Cuda,
            precision: self.precision,
        })
    }
}

impl MemoryArgs {
    /// Checks every flag; errors name the flag, the value and the rule.
    pub fn check(&self) -> Result<MemoryOptions> {
        let (device, dev_default, host_default) = match self.device {
            BenchDevice::Cuda => return Err(cuda_not_supported()),
            BenchDevice::Meta => (MemoryDevice::Meta, 1usize << 40, 1usize << 44),
            BenchDevice::Cpu => (MemoryDevice::Cpu, 4 << 30, 8 << 30),
        };
        let base = load_model_config(&self.model)?;
        if self.layers > base.layers {
            return Err(usage(
                "--layers",
                format!(
                    "{} is more than the model's {} layers (0 keeps them all)",
                    self.layers, base.layers
                ),
            ));
        }
        let model = ModelConfig {
            layers: if self.layers == 0 {
                base.layers
            } else {
                self.layers
            },
            ..base
        };
        if self.ranks == 0 {
            return Err(usage("--ranks", "0 must be at least 1"));
        }
        if model.heads % self.ranks != 0 || model.kv_heads % self.ranks != 0 {
            return Err(usage(
                "--ranks",
                format!(
                    "{} must divide the model's heads ({}) and kv_heads ({})",
                    self.ranks, model.heads, model.kv_heads
                ),
            ));
        }
        if self.chunk == 0 || self.chunk % self.ranks != 0 {
            return Err(usage(
                "--chunk",
                format!(
                    "{} must be a positive multiple of --ranks {} (each rank holds C/P tokens)",
                    self.chunk, self.ranks
                ),
            ));
        }
        if self.seq_lens.is_empty() {
            return Err(usage("--seq-lens", "empty: name at least one length"));
        }
        if let Some(s) = self
            .seq_lens
            .iter()
            .find(|&&s| s == 0 || s % self.chunk != 0)
        {
            return Err(usage(
                "--seq-lens",
                format!("{s} must be a positive multiple of --chunk {}", self.chunk),
            ));
        }
        let device_memory = self.device_memory.unwrap_or(dev_default);
        let host_memory = self.host_memory.unwrap_or(host_default);
        if device_memory == 0 {
            return Err(usage("--device-memory", "0 must be positive"));
        }
        if host_memory == 0 {
            return Err(usage("--host-memory", "0 must be positive"));
        }
        Ok(MemoryOptions {
            model,
            model_name: self.model.clone(),
            ranks: self.ranks,
            chunk: self.chunk,
            seq_lens: self.seq_lens.clone(),
            device,
            device_memory,
            host_memory,
        })
    }
}

/// Runs `fpdt bench ...`: progress on stderr, the table on stdout.
pub fn bench(args: &BenchArgs) -> Result<ExitCode> {
    match &args.command {
        BenchCommand::Overlap(a) => {
            let opts = a.check()?;
            let mut progress = |m: &str| {
                if !a.no_progress {
                    eprintln!("bench overlap: {m}");
                }
            };
            let report = overlap::run(&opts, &mut progress)?;
            print!("{}", overlap::render(&report));
        }
        BenchCommand::Memory(a) => {
            let opts = a.check()?;
            let mut progress = |m: &str| {
                if !a.no_progress {
                    eprintln!("bench memory: {m}");
                }
            };
            let report = memory::run(&opts, &mut progress)?;
            print!("{}", memory::render(&report));
        }
    }
    Ok(ExitCode::SUCCESS)
}
