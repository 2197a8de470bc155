//! Peak device memory of one training step (forward and backward) against
//! sequence length, at a fixed chunk size, for FPDT (offload +
//! checkpointing) and the Ulysses baseline (one chunk, nothing offloaded),
//! read from the allocator's ledger of rank 0. On the meta device only the
//! bytes are counted (any size plans in moments); on the cpu device the
//! step really runs.

use fpdt_runtime::{fmt_bytes, CpuConfig, MetaConfig, Space};

use crate::config::{ModelConfig, Schedule};
use crate::error::{ModelError, Result};
use crate::fpdt::FpdtGroup;

use super::render_table;

/// The device the steps run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryDevice {
    /// Counts bytes without running kernels.
    Meta,
    /// Runs the step on the cpu backend.
    Cpu,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct MemoryOptions {
    /// The model (its `max_seq_len` is raised to the longest sequence).
    pub model: ModelConfig,
    /// The model's name in the table's title.
    pub model_name: String,
    /// Sequence-parallel ranks P.
    pub ranks: usize,
    /// FPDT's chunk size C, tokens (each sequence length a multiple of it).
    pub chunk: usize,
    /// Sequence lengths S, in the order run.
    pub seq_lens: Vec<usize>,
    /// Where the steps run.
    pub device: MemoryDevice,
    /// Device memory per rank.
    pub device_memory: usize,
    /// Host memory per rank.
    pub host_memory: usize,
}

impl MemoryOptions {
    /// The bench's default: 4 layers of gpt2-124m, P = 4, C = 4096,
    /// S = 8K .. 64K on the meta device.
    pub fn gpt2_4_layers() -> Result<Self> {
        Ok(MemoryOptions {
            model: ModelConfig {
                layers: 4,
                ..ModelConfig::preset("gpt2-124m")?
            },
            model_name: "gpt2-124m".into(),
            ranks: 4,
            chunk: 4096,
            seq_lens: vec![8192, 16384, 32768, 65536],
            device: MemoryDevice::Meta,
            device_memory: 1 << 40,
            host_memory: 1 << 44,
        })
    }
}

/// One sequence length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryRow {
    /// Sequence length S.
    pub seq_len: usize,
    /// FPDT's peak device memory per rank.
    pub fpdt_peak: usize,
    /// The Ulysses baseline's peak device memory per rank.
    pub ulysses_peak: usize,
}

/// The measurement's result.
#[derive(Debug, Clone)]
pub struct MemoryReport {
    /// The options measured.
    pub options: MemoryOptions,
    /// Parameters and gradients (f32), bytes: in both peaks.
    pub fixed: usize,
    /// One row per sequence length.
    pub rows: Vec<MemoryRow>,
}

fn peak(
    cfg: &ModelConfig,
    sched: Schedule,
    opts: &MemoryOptions,
    params: Option<&[f32]>,
) -> Result<usize> {
    let mut g = match params {
        None => FpdtGroup::meta(
            cfg,
            sched,
            &MetaConfig {
                device_memory: opts.device_memory,
                host_memory: opts.host_memory,
                ..MetaConfig::default()
            },
        )?,
        Some(p) => FpdtGroup::cpu(
            cfg,
            sched,
            p,
            &CpuConfig {
                name: "memory".into(),
                device_memory: opts.device_memory,
                host_memory: opts.host_memory,
                pin_host_memory: false,
                ..CpuConfig::default()
            },
        )?,
    };
    let tokens: Vec<u32> = (0..sched.seq_len)
        .map(|i| (i % cfg.vocab_size) as u32)
        .collect();
    let targets: Vec<i32> = (0..sched.seq_len)
        .map(|i| ((i + 1) % cfg.vocab_size) as i32)
        .collect();
    g.forward_backward(&tokens, &targets)?;
    let rank0 = g
        .ranks()
        .first()
        .ok_or_else(|| ModelError::Shape("the group has no rank".into()))?;
    Ok(rank0.device().ledger().usage(Space::Device).peak)
}

/// Measures every sequence length; `progress` gets a line per length.
pub fn run(opts: &MemoryOptions, progress: &mut dyn FnMut(&str)) -> Result<MemoryReport> {
    if opts.chunk == 0 {
        return Err(ModelError::config("chunk", 0, "must be positive"));
    }
    if opts.seq_lens.is_empty() {
        return Err(ModelError::config(
            "seq_lens",
            "[]",
            "needs at least one sequence length",
        ));
    }
    if let Some(s) = opts
        .seq_lens
        .iter()
        .find(|&&s| s == 0 || s % opts.chunk != 0)
    {
        return Err(ModelError::config(
            "seq_lens",
            s,
            format!(
                "every length must be a positive multiple of the chunk ({})",
                opts.chunk
            ),
        ));
    }
    let longest = opts.seq_lens.iter().max().copied().unwrap_or(0);
    let cfg = ModelConfig {
        max_seq_len: opts.model.max_seq_len.max(longest),
        ..opts.model.clone()
    };
    let params = match opts.device {
        MemoryDevice::Meta => None,
        MemoryDevice::Cpu => Some(cfg.layout().init(1, 0.02)),
    };
    let fixed = 2 * cfg.layout().len() * 4;
    let mut rows = Vec::new();
    for (i, &s) in opts.seq_lens.iter().enumerate() {
        progress(&format!(
            "S = {s} ({} of {}): FPDT, then the Ulysses baseline",
            i + 1,
            opts.seq_lens.len()
        ));
        let p = params.as_deref();
        let fpdt_peak = peak(&cfg, Schedule::fpdt(s, opts.ranks, s / opts.chunk), opts, p)?;
        let ulysses_peak = peak(&cfg, Schedule::ulysses(s, opts.ranks), opts, p)?;
        rows.push(MemoryRow {
            seq_len: s,
            fpdt_peak,
            ulysses_peak,
        });
    }
    Ok(MemoryReport {
        options: MemoryOptions {
            model: cfg,
            ..opts.clone()
        },
        fixed,
        rows,
    })
}

/// The column names of [`render`]'s table.
pub const HEADER: [&str; 6] = [
    "S",
    "FPDT",
    "FPDT activations",
    "Ulysses",
    "Ulysses activations",
    "ratio",
];

/// The report as the bench prints it. Activations are the peak less the
/// parameters and gradients; the ratio is Ulysses' activations over FPDT's.
pub fn render(r: &MemoryReport) -> String {
    let o = &r.options;
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|row| {
            let f = row.fpdt_peak.saturating_sub(r.fixed);
            let u = row.ulysses_peak.saturating_sub(r.fixed);
            vec![
                row.seq_len.to_string(),
                fmt_bytes(row.fpdt_peak),
                fmt_bytes(f),
                fmt_bytes(row.ulysses_peak),
                fmt_bytes(u),
                format!("{:.1}x", u as f64 / f.max(1) as f64),
            ]
        })
        .collect();
    let device = match o.device {
        MemoryDevice::Meta => "meta",
        MemoryDevice::Cpu => "cpu",
    };
    render_table(
        &format!(
            "peak device memory per rank, {} layers of {}, P = {}, chunk C = {} (params + grads \
             = {}), {device} device",
            o.model.layers,
            o.model_name,
            o.ranks,
            o.chunk,
            fmt_bytes(r.fixed)
        ),
        &HEADER,
        &rows,
    )
}
