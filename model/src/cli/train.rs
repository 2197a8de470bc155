//! `fpdt train` and `fpdt plan`: flags, their checks, and what runs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::ValueEnum;

use crate::checkpoint::{self, config_fields};
use crate::config::{ModelConfig, Precision, Schedule};
use crate::hf;
use std::io::IsTerminal;

use fpdt_ptx::cpu::AdamW;
use fpdt_runtime::{fmt_bytes, CpuConfig, CudaConfig};
use indicatif::{ProgressBar, ProgressStyle};

use crate::data::{DataSplit, PackedLoader, TokenDataset, TokenWidth};
use crate::error::{ModelError, Result};
use crate::passkey::PasskeyGen;
use crate::passkey::{PasskeyTask, DEFAULT_ANSWERS, DEFAULT_DIGITS};
use crate::train::{LrShape, SeqStage, Source, StepRecord, TrainDevice, TrainOptions, Trainer};

use super::parse_bytes_arg;

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// The best device for the run: cuda when a GPU is found and the run
    /// computes there (bf16 at head dims 64 or 128, cuBLASLt loaded), else
    /// cpu (says why on a GPU machine).
    Auto,
    /// The cpu backend.
    Cpu,
    /// An NVIDIA GPU: the P ranks share it (memory, streams, copies,
    /// collectives and, in bf16, every layer op on the GPU; what has no GPU
    /// kernel runs as a host kernel staged through each rank's pinned arena).
    Cuda,
}

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl Switch {
    fn on(self) -> bool {
        self == Switch::On
    }
}

/// The learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LrSchedule {
    /// Cosine decay to --min-lr.
    Cosine,
    /// Linear decay to --min-lr.
    Linear,
    /// --lr throughout.
    Constant,
}

/// `fpdt train`. With no flags: a tiny Llama on the passkey task.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Device backend.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Sequence-parallel ranks in this process (P). Under torchrun or Slurm
    /// a world of one process is fine; one rank per process is refused (not
    /// supported yet).
    #[arg(long, default_value_t = 2, value_name = "P")]
    pub ranks: usize,
    /// Model: a preset (tiny-llama, tiny-gpt, gpt2-124m, llama-3-8b, ...) or
    /// a Hugging Face config.json.
    #[arg(long, default_value = "tiny-llama", value_name = "PRESET|CONFIG.JSON")]
    pub model: String,
    /// Token files (flat little-endian u16 or u32); without it the built-in
    /// passkey task is trained.
    #[arg(long, num_args = 1.., value_name = "FILE")]
    pub data: Vec<PathBuf>,
    /// Token files for validation (default: the last --val-fraction of --data).
    #[arg(long, num_args = 1.., value_name = "FILE")]
    pub val_data: Vec<PathBuf>,
    /// Fraction of --data held out for validation when --val-data is absent.
    #[arg(long, default_value_t = 0.01, value_name = "F")]
    pub val_fraction: f64,
    /// Token width of the files (default: u32 for names ending in .u32,
    /// else u16).
    #[arg(long, value_parser = parse_width, value_name = "u16|u32")]
    pub token_width: Option<TokenWidth>,
    /// Tokens per sequence (S).
    #[arg(long, default_value_t = 2048, value_name = "S")]
    pub seq_len: usize,
    /// Tokens per chunk (C; S/C chunks, C/P tokens per rank and chunk);
    /// default S/4.
    #[arg(long, value_name = "C")]
    pub chunk: Option<usize>,
    /// Offload chunk tensors to the host arena.
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub offload: Switch,
    /// Activation checkpointing (recompute each layer's forward in backward).
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub checkpointing: Switch,
    /// Sequence-length warmup: `S1:N1,S2:N2,...` trains N1 steps on
    /// sequences of S1 tokens, then N2 on S2, ..., then the remaining steps
    /// at --seq-len (each Si in as many chunks and ranks as --seq-len).
    /// `auto`: for the passkey task, 64 tokens for 2/3 of --steps and 256
    /// for 1/5 (the lengths below --seq-len); none for --data. `none`: off.
    #[arg(long, default_value = "auto", value_name = "S:N,...|auto|none")]
    pub seq_stages: String,
    /// Optimizer steps (the warmup stages' included).
    #[arg(long, default_value_t = 1500, value_name = "N")]
    pub steps: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-3, value_name = "LR")]
    pub lr: f64,
    /// Final learning rate of the decay.
    #[arg(long, default_value_t = 1e-3, value_name = "LR")]
    pub min_lr: f64,
    /// Warmup steps (linear from 0).
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub warmup: u64,
    /// Schedule after warmup.
    #[arg(long = "lr-schedule", value_enum, default_value_t = LrSchedule::Cosine)]
    pub lr_schedule: LrSchedule,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.1, value_name = "WD")]
    pub weight_decay: f64,
    /// AdamW beta1.
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    /// AdamW beta2.
    #[arg(long, default_value_t = 0.95)]
    pub beta2: f64,
    /// Sequences per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub grad_accum: u64,
    /// Clip gradients to this global norm (0: no clipping).
    #[arg(long, default_value_t = 1.0, value_name = "NORM")]
    pub clip: f64,
    /// Continue from a checkpoint (a run directory or a step directory).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Run directory: checkpoints, metrics, the loss curve, the trace.
    #[arg(long, default_value = "runs/fpdt", value_name = "DIR")]
    pub out: PathBuf,
    /// Metrics file, one JSON line per step (default OUT/metrics.jsonl).
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub ckpt_every: u64,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub keep: usize,
    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub eval_every: u64,
    /// Sequences per evaluation.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub eval_batches: usize,
    /// Write the Chrome trace of this step (1-based) to OUT/trace.json
    /// (0: none; default: the second step at the full --seq-len).
    #[arg(long, value_name = "STEP")]
    pub trace_step: Option<u64>,
    /// Without a progress bar (not a terminal, or --no-progress): print a
    /// line every N steps.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub log_every: u64,
    /// Standard deviation of the seeded initial weights.
    #[arg(long, default_value_t = 0.02, value_name = "STD")]
    pub init_std: f64,
    /// Stop after this many non-finite steps in a row.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub max_bad_steps: u32,
    /// Seed of weights, data order and the task.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Digits of the passkey (built-in task).
    #[arg(long, default_value_t = DEFAULT_DIGITS, value_name = "K")]
    pub passkey_digits: usize,
    /// Times the passkey is answered at the end (the first answer is the
    /// retrieval that validation scores; the repeats are more targets).
    #[arg(long, default_value_t = DEFAULT_ANSWERS, value_name = "A")]
    pub passkey_answers: usize,
    /// Device memory per rank (cpu backend: the budget of its device slab).
    #[arg(long, default_value = "2G", value_parser = parse_bytes_arg, value_name = "BYTES")]
    pub device_memory: usize,
    /// Host arena per rank.
    #[arg(long, default_value = "4G", value_parser = parse_bytes_arg, value_name = "BYTES")]
    pub host_memory: usize,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Working precision: f32, or bf16 (bf16 weights, activations and
    /// offloaded chunks; fp32 master weights, accumulators and loss).
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    pub precision: String,
    /// Start from Hugging Face weights (a directory with config.json and
    /// model.safetensors, GPT-2 or Llama); the model comes from its
    /// config.json, so --model is not used.
    #[arg(long, value_name = "HF_DIR")]
    pub init_from: Option<PathBuf>,
    /// At the end, save the weights in Hugging Face layout (config.json +
    /// model.safetensors) to this directory.
    #[arg(long, value_name = "DIR")]
    pub export_hf: Option<PathBuf>,
    /// Fault injection for tests: make these steps' loss NaN (comma
    /// separated), to exercise the skip and the stop after
    /// --max-bad-steps.
    #[arg(long, hide = true, value_delimiter = ',', value_name = "STEPS")]
    pub inject_nan_steps: Vec<u64>,
}

fn parse_width(s: &str) -> std::result::Result<TokenWidth, String> {
    TokenWidth::parse(s).ok_or_else(|| format!("`{s}` is not a token width: use u16 or u32"))
}

/// Under torchrun or srun (`RANK` or `SLURM_PROCID` set): a world of one
/// process trains as usual; a larger one is refused rather than having
/// every process train its own copy into the same --out. One rank per
/// process is not in the trainer yet (the NCCL communicator and the
/// rendezvous it would use are in fpdt-comm, and `fpdt-rendezvous-check`
/// tries a launcher's set-up).
pub(super) fn check_launcher(get: &dyn Fn(&str) -> Option<String>) -> Result<()> {
    if get("RANK").is_none() && get("SLURM_PROCID").is_none() {
        return Ok(());
    }
    // Only the rank and the world size matter here: rank 0's address is
    // not needed to refuse (or to train alone).
    let lookup = |k: &str| {
        get(k).or_else(|| match k {
            "MASTER_ADDR" => Some("localhost".to_string()),
            "MASTER_PORT" => Some("29500".to_string()),
            _ => None,
        })
    };
    let env = fpdt_comm::rendezvous::RendezvousEnv::from_lookup(lookup).map_err(|e| {
        ModelError::Usage {
            flag: "launcher environment".into(),
            message: e.to_string(),
        }
    })?;
    if env.world_size <= 1 {
        return Ok(());
    }
    let (rank, world) = match env.launcher {
        fpdt_comm::rendezvous::Launcher::Torchrun => ("RANK", "WORLD_SIZE"),
        fpdt_comm::rendezvous::Launcher::Slurm => ("SLURM_PROCID", "SLURM_NTASKS"),
    };
    Err(ModelError::Usage {
        flag: world.into(),
        message: format!(
            "{rank}={} of {world}={}: fpdt train runs its ranks in one process (--ranks P, \
             sharing this process's device); one rank per process under a launcher is not \
             supported yet: launch one process with --ranks {}",
            env.rank, env.world_size, env.world_size
        ),
    })
}

pub(super) fn usage(flag: &str, message: impl Into<String>) -> ModelError {
    ModelError::Usage {
        flag: flag.into(),
        message: message.into(),
    }
}

/// A model from a preset name or a config.json path.
/// `--device cuda`: a driver and a GPU must be there (the error names the
/// flag). Test support: with `FPDT_FAKE_CUDA_INTERP` set, on the fake
/// driver the PTX kernels run in the interpreter (scripts/fake-cuda-test.sh).
pub fn check_cuda() -> Result<()> {
    if let Err(e) = fpdt_runtime::cuda::probe() {
        return Err(usage(
            "--device",
            format!("cuda: {e}; or run with --device cpu"),
        ));
    }
    if std::env::var_os("FPDT_FAKE_CUDA_INTERP").is_some()
        && !fpdt_ptx::gpu::install_interpreter_on_fake_driver()?
    {
        return Err(usage(
            "--device",
            "cuda: FPDT_FAKE_CUDA_INTERP is set, but the driver is not the fake one",
        ));
    }
    Ok(())
}

pub fn load_model_config(spec: &str) -> Result<ModelConfig> {
    let p = Path::new(spec);
    let looks_like_file = spec.ends_with(".json") || spec.contains('/') || p.is_file();
    if looks_like_file {
        if !p.exists() {
            return Err(usage(
                "--model",
                format!("config file `{spec}` not found: name a config.json or a preset"),
            ));
        }
        return ModelConfig::from_hf_file(p)
            .map_err(|e| usage("--model", format!("`{spec}`: {e}")));
    }
    ModelConfig::preset(spec).map_err(|e| usage("--model", e.to_string()))
}

/// Everything `train` checked, ready to run.
#[derive(Debug)]
pub struct TrainPlan {
    /// The model.
    pub config: ModelConfig,
    /// The schedule.
    pub schedule: Schedule,
    /// The training data (None: the passkey task).
    pub data: Option<Arc<TokenDataset>>,
    /// Validation data when given separately.
    pub val_data: Option<Arc<TokenDataset>>,
    /// Training and validation ranges of `data` (validation: of `val_data`
    /// when given, else the held-out tail of `data`).
    pub split: Option<DataSplit>,
    /// The passkey task when there is no --data.
    pub task: Option<PasskeyTask>,
    /// The sequence-length warmup (checked against the schedule).
    pub seq_stages: Vec<SeqStage>,
    /// The metrics file.
    pub metrics: PathBuf,
    /// Hugging Face weights to start from (--init-from).
    pub init: Option<hf::HfCheckpoint>,
}

pub(super) fn finite_in(flag: &str, v: f64, lo: f64, hi: f64, rule: &str) -> Result<()> {
    if !v.is_finite() || v < lo || v > hi {
        return Err(usage(flag, format!("{v} {rule}")));
    }
    Ok(())
}

impl TrainArgs {
    /// Checks every flag (and the files they name); errors name the flag.
    pub fn check(&self) -> Result<TrainPlan> {
        check_launcher(&|k| std::env::var(k).ok())?;
        if self.device == DeviceChoice::Cuda {
            check_cuda()?;
        }
        if self.ranks == 0 {
            return Err(usage("--ranks", "0 must be at least 1"));
        }
        if self.seq_len == 0 {
            return Err(usage("--seq-len", "0 must be positive"));
        }
        let chunk = self.chunk.unwrap_or((self.seq_len / 4).max(1));
        if chunk == 0 || chunk > self.seq_len || self.seq_len % chunk != 0 {
            return Err(usage(
                "--chunk",
                format!(
                    "{chunk} must divide --seq-len {} (and not exceed it)",
                    self.seq_len
                ),
            ));
        }
        if chunk % self.ranks != 0 {
            return Err(usage(
                "--chunk",
                format!(
                    "{chunk} must be divisible by --ranks {} (each rank holds C/P tokens of a chunk)",
                    self.ranks
                ),
            ));
        }
        if self.steps == 0 {
            return Err(usage("--steps", "0 must be at least 1"));
        }
        finite_in(
            "--lr",
            self.lr,
            f64::MIN_POSITIVE,
            10.0,
            "must be positive and at most 10",
        )?;
        finite_in(
            "--min-lr",
            self.min_lr,
            0.0,
            self.lr,
            "must be in [0, --lr]",
        )?;
        if self.warmup > self.steps {
            return Err(usage(
                "--warmup",
                format!("{} must not exceed --steps {}", self.warmup, self.steps),
            ));
        }
        finite_in(
            "--weight-decay",
            self.weight_decay,
            0.0,
            1.0,
            "must be in [0, 1]",
        )?;
        finite_in("--beta1", self.beta1, 0.0, 0.999_999, "must be in [0, 1)")?;
        finite_in(
            "--beta2",
            self.beta2,
            0.0,
            0.999_999_99,
            "must be in [0, 1)",
        )?;
        if self.grad_accum == 0 {
            return Err(usage("--grad-accum", "0 must be at least 1"));
        }
        finite_in(
            "--clip",
            self.clip,
            0.0,
            f64::MAX,
            "must be finite and >= 0 (0: no clipping)",
        )?;
        if self.keep == 0 {
            return Err(usage("--keep", "0 must be at least 1"));
        }
        if self.max_bad_steps == 0 {
            return Err(usage("--max-bad-steps", "0 must be at least 1"));
        }
        if self.device_memory == 0 {
            return Err(usage("--device-memory", "0 must be positive"));
        }
        if self.host_memory == 0 {
            return Err(usage("--host-memory", "0 must be positive"));
        }

        let precision: Precision = self
            .precision
            .parse()
            .map_err(|e: ModelError| usage("--precision", e.to_string()))?;
        let (config, init) = match &self.init_from {
            Some(_) if self.resume.is_some() => {
                return Err(usage(
                    "--init-from",
                    "cannot be combined with --resume (a checkpoint has its own weights): \
                     give one of them",
                ))
            }
            Some(dir) => {
                let hf = hf::load(dir).map_err(|e| usage("--init-from", e.to_string()))?;
                (hf.config.clone(), Some(hf))
            }
            None => (load_model_config(&self.model)?, None),
        };
        if config.heads % self.ranks != 0 || config.kv_heads % self.ranks != 0 {
            return Err(usage(
                "--ranks",
                format!(
                    "{} must divide the model's heads ({}) and kv_heads ({}) (Ulysses splits \
                     heads across ranks)",
                    self.ranks, config.heads, config.kv_heads
                ),
            ));
        }
        let schedule = Schedule {
            offload: self.offload.on(),
            checkpoint: self.checkpointing.on(),
            precision,
            ..Schedule::fpdt(self.seq_len, self.ranks, self.seq_len / chunk)
        };
        schedule.validate(&config)?;

        let (data, val_data, split, task) = if self.data.is_empty() {
            if !self.val_data.is_empty() {
                return Err(usage(
                    "--val-data",
                    "needs --data (the passkey task makes its own)",
                ));
            }
            let task = PasskeyTask::new(
                self.seq_len,
                self.passkey_digits,
                config.vocab_size,
                self.passkey_answers,
            )?;
            (None, None, None, Some(task))
        } else {
            let ds = TokenDataset::open(&self.data, self.token_width, config.vocab_size)?;
            let (val, split) = if self.val_data.is_empty() {
                (None, ds.split(self.val_fraction, self.seq_len)?)
            } else {
                let v = TokenDataset::open(&self.val_data, self.token_width, config.vocab_size)?;
                let vs = v.split(0.0, self.seq_len)?;
                let ts = ds.split(0.0, self.seq_len)?;
                (
                    Some(Arc::new(v)),
                    DataSplit {
                        train: ts.train,
                        val: vs.train,
                    },
                )
            };
            (Some(Arc::new(ds)), val, Some(split), None)
        };

        let seq_stages = self.seq_stages(&config, &schedule, task.as_ref())?;
        checkpoint::check_writable(&self.out)?;
        if let Some(r) = &self.resume {
            // Checks the config now; the state is restored when training runs.
            checkpoint::load(r, &config_fields(&config))?;
        }
        if let Some(dir) = &self.export_hf {
            checkpoint::check_writable(dir).map_err(|e| usage("--export-hf", e.to_string()))?;
        }
        let metrics = self
            .metrics
            .clone()
            .unwrap_or_else(|| self.out.join("metrics.jsonl"));
        Ok(TrainPlan {
            config,
            schedule,
            data,
            val_data,
            split,
            task,
            seq_stages,
            metrics,
            init,
        })
    }

    /// The checked --seq-stages: every stage shorter than --seq-len, split
    /// into the same chunks over the same ranks, valid for the model (and
    /// the passkey task), with steps left at the full length.
    fn seq_stages(
        &self,
        config: &ModelConfig,
        full: &Schedule,
        task: Option<&PasskeyTask>,
    ) -> Result<Vec<SeqStage>> {
        let flag = "--seq-stages";
        let spec = self.seq_stages.trim();
        let fits = |len: usize| -> std::result::Result<(), String> {
            let per = full.chunks * full.ranks;
            if len == 0 || len >= full.seq_len {
                return Err(format!(
                    "must be positive and shorter than --seq-len {}",
                    full.seq_len
                ));
            }
            if len % per != 0 {
                return Err(format!(
                    "must split into the {} chunks of --seq-len over {} ranks: use a multiple \
                     of {per}",
                    full.chunks, full.ranks
                ));
            }
            let s = Schedule {
                seq_len: len,
                ..*full
            };
            s.validate(config).map_err(|e| e.to_string())?;
            if let Some(t) = task {
                t.with_seq_len(len).map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        let stages: Vec<SeqStage> = match spec {
            "none" | "" => Vec::new(),
            "auto" => match task {
                None => Vec::new(),
                Some(t) => {
                    let floor = PasskeyTask::min_seq_len(t.digits, t.answers) + 16;
                    let start = floor.max(64).next_power_of_two();
                    [(start, self.steps * 2 / 3), (start * 4, self.steps / 5)]
                        .into_iter()
                        .filter(|&(len, steps)| steps > 0 && fits(len).is_ok())
                        .map(|(seq_len, steps)| SeqStage { seq_len, steps })
                        .collect()
                }
            },
            list => {
                let mut out = Vec::new();
                for item in list.split(',') {
                    let (len, steps) = item.trim().split_once(':').ok_or_else(|| {
                        usage(
                            flag,
                            format!("`{item}` is not S:STEPS (e.g. 64:1000,256:300), auto or none"),
                        )
                    })?;
                    let len: usize = len.trim().parse().map_err(|_| {
                        usage(flag, format!("`{item}`: `{len}` is not a sequence length"))
                    })?;
                    let steps: u64 = steps.trim().parse().map_err(|_| {
                        usage(flag, format!("`{item}`: `{steps}` is not a step count"))
                    })?;
                    if steps == 0 {
                        return Err(usage(flag, format!("`{item}`: 0 steps; drop the stage")));
                    }
                    fits(len).map_err(|e| usage(flag, format!("`{item}`: length {len} {e}")))?;
                    out.push(SeqStage {
                        seq_len: len,
                        steps,
                    });
                }
                out
            }
        };
        let warm: u64 = stages.iter().map(|s| s.steps).sum();
        if warm >= self.steps {
            return Err(usage(
                flag,
                format!(
                    "the stages take {warm} steps, leaving none of --steps {} at --seq-len {}",
                    self.steps, full.seq_len
                ),
            ));
        }
        Ok(stages)
    }
}

/// The options of the loop from the checked flags.
pub fn train_options(args: &TrainArgs, plan: &TrainPlan) -> TrainOptions {
    TrainOptions {
        steps: args.steps,
        lr: args.lr,
        min_lr: args.min_lr,
        warmup: args.warmup,
        shape: match args.lr_schedule {
            LrSchedule::Cosine => LrShape::Cosine,
            LrSchedule::Linear => LrShape::Linear,
            LrSchedule::Constant => LrShape::Constant,
        },
        adamw: AdamW {
            lr: args.lr as f32,
            beta1: args.beta1 as f32,
            beta2: args.beta2 as f32,
            eps: 1e-8,
            weight_decay: args.weight_decay as f32,
        },
        grad_accum: args.grad_accum,
        clip: args.clip,
        ckpt_every: args.ckpt_every,
        keep: args.keep,
        eval_every: args.eval_every,
        eval_batches: args.eval_batches,
        max_bad_steps: args.max_bad_steps,
        seed: args.seed,
        init_std: args.init_std,
        out: args.out.clone(),
        metrics: plan.metrics.clone(),
        progress: !args.no_progress,
        log_every: args.log_every,
        trace_step: match args.trace_step {
            Some(0) => None,
            Some(n) => Some(n),
            // The second step at the full length: past the first's
            // allocations, at the size the run is about.
            None => {
                Some((plan.seq_stages.iter().map(|s| s.steps).sum::<u64>() + 2).min(args.steps))
            }
        },
        poison_steps: args.inject_nan_steps.clone(),
        seq_stages: plan.seq_stages.clone(),
    }
}

/// The data source of a checked plan.
pub fn source(args: &TrainArgs, plan: &TrainPlan) -> Result<Source> {
    match (&plan.data, &plan.task, &plan.split) {
        (Some(d), _, Some(split)) => {
            let train = PackedLoader::new(
                d.clone(),
                split.train.clone(),
                plan.schedule.seq_len,
                args.seed,
                true,
            )?;
            let val_set = plan.val_data.clone().unwrap_or_else(|| d.clone());
            let val = (!split.val.is_empty()).then(|| (val_set, split.val.clone()));
            Ok(Source::Tokens { train, val })
        }
        (None, Some(task), _) => Ok(Source::Passkey {
            train: PasskeyGen::new(*task, args.seed),
            task: *task,
        }),
        _ => Err(ModelError::Data("no training data and no task".into())),
    }
}

fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn step_line(r: &StepRecord, passkey: bool) -> String {
    let mut s = format!(
        "loss {:.4}  acc {:5.1}%  lr {:.2e}  |g| {:.3}  {} tok/s  MFU {:.1}%  device {}  host {}",
        r.loss,
        100.0 * r.accuracy,
        r.lr,
        r.grad_norm,
        fmt_rate(r.tokens_per_s),
        100.0 * r.mfu,
        fmt_bytes(r.device_peak),
        fmt_bytes(r.host_peak),
    );
    if r.skipped {
        s.push_str("  SKIPPED (non-finite)");
    }
    if let Some(e) = r.eval {
        s.push_str(&format!(
            "  | val loss {:.4} {} {:.1}%",
            e.loss,
            if passkey { "key acc" } else { "acc" },
            100.0 * e.accuracy
        ));
    }
    s
}

/// Resolves `--device`: `auto` is cuda when a GPU is found and the run
/// computes there (bf16, attention at a head dim the kernels take, cuBLASLt
/// loaded), else cpu; on a GPU machine it says why it chose cpu (the cuda
/// device would stage the host kernels through pinned memory, slower than
/// the cpu device).
fn pick_device(
    asked: DeviceChoice,
    cfg: &ModelConfig,
    precision: Precision,
) -> (DeviceChoice, Option<String>) {
    if asked != DeviceChoice::Auto {
        return (asked, None);
    }
    let gpus = match fpdt_runtime::cuda::probe() {
        Ok(g) if !g.is_empty() => g,
        _ => return (DeviceChoice::Cpu, None),
    };
    let found = format!("{} GPU(s) found ({})", gpus.len(), gpus[0].name);
    let host_on_cuda = match (precision, cfg.head_dim) {
        (Precision::F32, _) => Some(
            "f32 runs attention and the GEMMs as host kernels on cuda (--precision bf16 runs \
             them on the GPU)"
                .to_string(),
        ),
        (Precision::Bf16, 64 | 128) => None,
        (Precision::Bf16, d) => Some(format!(
            "the attention kernels take head dims 64 and 128, this model's is {d}"
        )),
    };
    if let Some(reason) = host_on_cuda {
        return (
            DeviceChoice::Cpu,
            Some(format!(
                "{found}, but the trainer runs on the cpu device: {reason}; --device cuda runs \
                 there anyway"
            )),
        );
    }
    if let Err(e) = fpdt_runtime::cublaslt::CublasLt::load() {
        return (
            DeviceChoice::Cpu,
            Some(format!(
                "{found}, but the trainer runs on the cpu device: cuBLASLt did not load ({e}), \
                 so the GEMMs would be host kernels; --device cuda runs there anyway"
            )),
        );
    }
    (
        DeviceChoice::Cuda,
        Some(format!("{found}: training on the cuda device")),
    )
}

/// `fpdt train`.
pub fn train(args: &TrainArgs) -> Result<ExitCode> {
    let plan = args.check()?;
    let (choice, why) = pick_device(args.device, &plan.config, plan.schedule.precision);
    if let Some(why) = why {
        eprintln!("fpdt train: note: {why}");
    }
    if choice == DeviceChoice::Cuda && args.device == DeviceChoice::Auto {
        // What `--device cuda` checks when the flag is parsed.
        check_cuda()?;
    }
    let s = plan.schedule;
    let what = match (&plan.data, &plan.task) {
        (Some(d), _) => format!("token data {}", d.describe()),
        (None, Some(t)) => format!(
            "the passkey task ({}-digit keys in {} tokens, answered {} times, vocabulary {})",
            t.digits, t.seq_len, t.answers, t.vocab_size
        ),
        (None, None) => "nothing".into(),
    };
    let device_name = match choice {
        DeviceChoice::Cuda => "the cuda device",
        DeviceChoice::Auto | DeviceChoice::Cpu => "the cpu device",
    };
    println!(
        "fpdt train: {} ({} parameters) on {device_name}, S = {} tokens over P = {} ranks in {} \
         chunks of {} tokens ({} per rank), offload {}, checkpointing {}, {}; {what}",
        match &args.init_from {
            Some(d) => d.display().to_string(),
            None => args.model.clone(),
        },
        plan.config.param_count(),
        s.seq_len,
        s.ranks,
        s.chunks,
        s.chunk_tokens(),
        s.local_chunk_tokens(),
        if s.offload { "on" } else { "off" },
        if s.checkpoint { "on" } else { "off" },
        match s.precision {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16 (fp32 master)",
        },
    );
    if !plan.seq_stages.is_empty() {
        let mut at = 0;
        let stages: Vec<String> = plan
            .seq_stages
            .iter()
            .map(|st| {
                let line = format!("S = {} for steps {}-{}", st.seq_len, at + 1, at + st.steps);
                at += st.steps;
                line
            })
            .collect();
        println!(
            "sequence-length warmup: {}, then S = {} (--seq-stages none trains at S throughout)",
            stages.join(", "),
            s.seq_len
        );
    }
    let device = match choice {
        DeviceChoice::Cuda => TrainDevice::Cuda(CudaConfig {
            device_memory: Some(args.device_memory),
            host_memory: args.host_memory,
            ..CudaConfig::default()
        }),
        DeviceChoice::Auto | DeviceChoice::Cpu => TrainDevice::Cpu(CpuConfig {
            name: "cpu".into(),
            device_memory: args.device_memory,
            host_memory: args.host_memory,
            ..CpuConfig::default()
        }),
    };
    let opts = train_options(args, &plan);
    let mut trainer = Trainer::new(
        &plan.config,
        s,
        &device,
        source(args, &plan)?,
        opts.clone(),
        plan.init.as_ref().map(|h| h.params.clone()),
    )?;
    if choice == DeviceChoice::Cuda {
        let bf16 = s.precision == Precision::Bf16;
        let gpu_attention = matches!(plan.config.head_dim, 64 | 128);
        let gemms = match trainer.group().ranks().first().map(|r| r.gemm_backend()) {
            Some(b) if bf16 => b,
            Some(_) => "host kernels (cuBLASLt takes bf16: --precision bf16)".to_string(),
            None => "?".to_string(),
        };
        println!(
            "on cuda: {}; GEMMs on {gemms}; AdamW on the host arena's fp32 master shard",
            match (bf16, gpu_attention) {
                (true, true) => "every layer op as a PTX kernel".to_string(),
                (true, false) => format!(
                    "the layer ops as PTX kernels but attention, a host kernel at head dim {} \
                     (the kernels take 64 and 128)",
                    plan.config.head_dim
                ),
                (false, _) => "the norms, embedding, loss and element-wise ops as PTX kernels; \
                     attention and the GEMMs as host kernels (f32: --precision bf16 runs them on \
                     the GPU)"
                    .to_string(),
            }
        );
    }
    if let (Some(dir), Some(h)) = (&args.init_from, &plan.init) {
        println!(
            "weights from `{}` ({})",
            dir.display(),
            h.report
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for n in h.report.notes.iter().chain(&h.report.dropped) {
            println!("  note: {n}");
        }
        for u in &h.report.unexpected {
            println!("  not used: {u}");
        }
    }
    if let Some(r) = &args.resume {
        let ck = checkpoint::load(r, &config_fields(&plan.config))?;
        trainer.resume(&ck)?;
        println!(
            "resumed from `{}` at step {}",
            ck.dir.display(),
            trainer.step_count()
        );
    }
    if trainer.step_count() >= opts.steps {
        println!(
            "nothing to do: the run is at step {} and --steps is {}",
            trainer.step_count(),
            opts.steps
        );
        return Ok(ExitCode::SUCCESS);
    }
    let bar = if opts.progress && std::io::stderr().is_terminal() {
        let b = ProgressBar::new(opts.steps);
        b.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed}<{eta} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b.set_position(trainer.step_count());
        Some(b)
    } else {
        None
    };
    let log_every = opts.log_every;
    let passkey = plan.task.is_some();
    let mut last_len = None;
    let mut on_step = |r: &StepRecord| {
        if last_len != Some(r.seq_len) {
            let line = format!("-- S = {} tokens from step {}", r.seq_len, r.step);
            match &bar {
                Some(b) => b.println(line),
                None => println!("{line}"),
            }
            last_len = Some(r.seq_len);
        }
        match &bar {
            Some(b) => {
                b.set_position(r.step);
                b.set_message(step_line(r, passkey));
                if r.eval.is_some() || r.skipped {
                    b.println(format!("step {:>5}  {}", r.step, step_line(r, passkey)));
                }
            }
            None => {
                if (log_every > 0 && r.step % log_every == 0) || r.eval.is_some() || r.skipped {
                    println!("step {:>5}  {}", r.step, step_line(r, passkey));
                }
            }
        }
    };
    let result = trainer.run(&mut on_step);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let sum = result?;
    println!(
        "done: {} steps in {:.1} s ({} tok/s); loss {:.4} -> {:.4}{}",
        sum.steps,
        sum.seconds,
        fmt_rate(sum.tokens_per_s),
        sum.first_loss,
        sum.last_loss,
        if sum.skipped > 0 {
            format!(", {} steps skipped", sum.skipped)
        } else {
            String::new()
        }
    );
    if let (Some(first), Some(last)) = (sum.evals.first(), sum.evals.last()) {
        println!(
            "validation: loss {:.4} -> {:.4}, {} {:.1}% -> {:.1}% (step {} at S = {} -> step {} at S = {})",
            first.1.loss,
            last.1.loss,
            if passkey { "key accuracy" } else { "accuracy" },
            100.0 * first.1.accuracy,
            100.0 * last.1.accuracy,
            first.0,
            first.1.seq_len,
            last.0,
            last.1.seq_len
        );
    }
    println!("metrics: {}", opts.metrics.display());
    if let Some(p) = &sum.checkpoint {
        println!("checkpoint: {}", p.display());
    }
    if let Some(p) = &sum.plot {
        println!("loss curve: {}", p.display());
    }
    if let Some(p) = &sum.trace {
        println!(
            "trace of one step: {} (open in https://ui.perfetto.dev)",
            p.display()
        );
    }
    if let Some(dir) = &args.export_hf {
        let cfg = ModelConfig {
            max_seq_len: plan.config.max_seq_len.max(s.seq_len),
            ..plan.config.clone()
        };
        // The fp32 master weights (the working copy may be bf16).
        let master = trainer.group().optimizer_state()?.master;
        let n = cfg.layout().len();
        hf::save(dir, &cfg, master.get(..n).unwrap_or(&master))?;
        println!("Hugging Face weights: {}", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}
