//! The meta-device planner: one real training step (forward, backward and
//! the sharded optimizer step) of a configuration far beyond this machine,
//! run on P meta devices (DESIGN.md section 2), and what it needed.
//!
//! Nothing here computes memory by formula. Every byte reported is read back
//! from the devices' logical ledgers after the step ran, so the report
//! follows the model as it changes (a new optimizer layout, bf16 weights,
//! another chunking of the loss) without an edit here. Times are the meta
//! streams' virtual clocks, advanced by the cost model
//! ([`fpdt_runtime::CostModel`]): FLOPs over the peak rate times the kernel
//! efficiency, bytes over each link's bandwidth, copies on their own streams
//! overlapping compute exactly as the schedule's events allow.

use std::collections::BTreeMap;
use std::time::Instant;

use fpdt_alloc::AllocError;
use fpdt_comm::CommError;
use fpdt_runtime::{CostModel, Device, MetaConfig, OpKind, RuntimeError, Space};

use crate::config::{ModelConfig, Precision, Schedule};
use crate::error::{ModelError, Result};
use crate::fpdt::{FpdtGroup, OptimStep};

/// Which schedule a plan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlanKind {
    /// FPDT: chunks of `PlanSpec::chunk` tokens, with the spec's offload and
    /// checkpoint knobs (both on by default).
    Fpdt,
    /// The Ulysses baseline: one chunk (u = 1), nothing offloaded, activation
    /// checkpointing on (as the paper's baseline runs it), whatever the
    /// spec's knobs say.
    Ulysses,
}

impl PlanKind {
    /// "FPDT" or "Ulysses".
    pub fn name(self) -> &'static str {
        match self {
            PlanKind::Fpdt => "FPDT",
            PlanKind::Ulysses => "Ulysses",
        }
    }
}

/// What to plan: the sequence, the GPUs and their budgets and rates.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanSpec {
    /// Tokens per sequence, S.
    pub seq_len: usize,
    /// GPUs, the sequence-parallel degree P.
    pub gpus: usize,
    /// Tokens per global chunk, C (FPDT; the Ulysses baseline uses S).
    pub chunk: usize,
    /// Device memory per GPU, bytes.
    pub gpu_memory: usize,
    /// Host memory per GPU (its share of the node's arena), bytes.
    pub host_memory: usize,
    /// Host-device link (PCIe) bandwidth each way, GB/s (10^9 bytes/s).
    pub host_link_gbps: f64,
    /// GPU-GPU link bandwidth per GPU for collectives, GB/s.
    pub nvlink_gbps: f64,
    /// Dense bf16 peak per GPU, TFLOP/s (the MFU denominator).
    pub peak_tflops: f64,
    /// Fraction of the peak large kernels reach (the cost model's rate is
    /// `peak * kernel_efficiency`).
    pub kernel_efficiency: f64,
    /// Offload chunk tensors to the host arena (FPDT).
    pub offload: bool,
    /// Activation checkpointing (FPDT).
    pub checkpoint: bool,
    /// Tokens per loss sub-chunk (0: the schedule's default, the MLP
    /// sub-chunk C/(2P)).
    pub loss_chunk: usize,
    /// Working precision. f32 plans the host kernels' path (the cpu
    /// device's, whose peaks it matches exactly); bf16 plans what the cuda
    /// device runs: its PTX kernels and cuBLASLt GEMMs and what they
    /// allocate ([`crate::fpdt::RankModel::model_gpu_path`]).
    pub precision: Precision,
}

impl PlanSpec {
    /// `seq_len` tokens on `gpus` H100 SXM 80 GB with chunks of `chunk`
    /// tokens: 989 TFLOP/s, 55 GB/s PCIe, 370 GB/s NVLink (the rates of
    /// [`CostModel::h100_sxm`]), 256 GiB of host memory per GPU, offload and
    /// checkpointing on.
    pub fn h100(seq_len: usize, gpus: usize, chunk: usize) -> PlanSpec {
        let c = CostModel::h100_sxm();
        PlanSpec {
            seq_len,
            gpus,
            chunk,
            gpu_memory: 80 << 30,
            host_memory: 256 << 30,
            host_link_gbps: c.h2d_bandwidth / 1e9,
            nvlink_gbps: c.collective_bandwidth / 1e9,
            peak_tflops: c.peak_flops / 1e12,
            kernel_efficiency: c.kernel_efficiency,
            offload: true,
            checkpoint: true,
            loss_chunk: 0,
            precision: Precision::F32,
        }
    }

    /// The same spec at another sequence length.
    pub fn at(&self, seq_len: usize) -> PlanSpec {
        PlanSpec {
            seq_len,
            ..self.clone()
        }
    }

    /// The cost model of one GPU: the H100 SXM rates with this spec's peak,
    /// efficiency and link bandwidths.
    pub fn cost_model(&self) -> CostModel {
        CostModel {
            peak_flops: self.peak_tflops * 1e12,
            kernel_efficiency: self.kernel_efficiency,
            h2d_bandwidth: self.host_link_gbps * 1e9,
            d2h_bandwidth: self.host_link_gbps * 1e9,
            collective_bandwidth: self.nvlink_gbps * 1e9,
            ..CostModel::h100_sxm()
        }
    }

    /// Checks the spec's own values (not yet against a model); errors name
    /// the field, the value and the rule.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("seq_len", self.seq_len),
            ("gpus", self.gpus),
            ("chunk", self.chunk),
            ("gpu_memory", self.gpu_memory),
            ("host_memory", self.host_memory),
        ] {
            if v == 0 {
                return Err(ModelError::config(field, 0, "must be positive"));
            }
        }
        for (field, v) in [
            ("host_link_gbps", self.host_link_gbps),
            ("nvlink_gbps", self.nvlink_gbps),
            ("peak_tflops", self.peak_tflops),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ModelError::config(field, v, "must be finite and positive"));
            }
        }
        if !(self.kernel_efficiency.is_finite()
            && self.kernel_efficiency > 0.0
            && self.kernel_efficiency <= 1.0)
        {
            return Err(ModelError::config(
                "kernel_efficiency",
                self.kernel_efficiency,
                "must be in (0, 1]",
            ));
        }
        if self.chunk % self.gpus != 0 {
            return Err(ModelError::config(
                "chunk",
                self.chunk,
                format!(
                    "must be divisible by gpus ({}): every GPU holds chunk/gpus tokens of it",
                    self.gpus
                ),
            ));
        }
        Ok(())
    }

    /// The schedule `kind` runs at this spec's sequence length.
    pub fn schedule(&self, kind: PlanKind) -> Result<Schedule> {
        self.validate()?;
        let s = self.seq_len;
        let sched = match kind {
            PlanKind::Fpdt => {
                if s % self.chunk != 0 {
                    return Err(ModelError::config(
                        "seq_len",
                        s,
                        format!("must be a multiple of the chunk ({})", self.chunk),
                    ));
                }
                Schedule {
                    offload: self.offload,
                    checkpoint: self.checkpoint,
                    loss_chunk: self.loss_chunk,
                    precision: self.precision,
                    ..Schedule::fpdt(s, self.gpus, s / self.chunk)
                }
            }
            PlanKind::Ulysses => Schedule {
                checkpoint: true,
                loss_chunk: self.loss_chunk,
                precision: self.precision,
                ..Schedule::ulysses(s, self.gpus)
            },
        };
        // The loss sub-chunk must fit in one rank's chunk; clamp it rather
        // than refuse, so one spec serves both kinds at every length.
        let c = sched.local_chunk_tokens();
        Ok(Schedule {
            loss_chunk: sched.loss_chunk.min(c),
            ..sched
        })
    }
}

/// One tag of a ledger: what it held at most, and what it held at the
/// moment the space's peak was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagUsage {
    /// The allocation tag (`params`, `grads`, `kv`, `logits`, ...).
    pub tag: &'static str,
    /// The group it is reported in ([`category`]).
    pub category: &'static str,
    /// High-water mark of this tag alone, bytes.
    pub peak: usize,
    /// Bytes this tag held at the space's peak (these sum to the peak).
    pub at_peak: usize,
}

/// Peak memory of one space of one rank, and what held it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryReport {
    /// High-water mark of the logical ledger, bytes.
    pub peak: usize,
    /// Per tag, largest `at_peak` first.
    pub tags: Vec<TagUsage>,
}

impl MemoryReport {
    /// Bytes held at the peak per category, largest first (sums to `peak`).
    pub fn by_category(&self) -> Vec<(&'static str, usize)> {
        let mut m: BTreeMap<&'static str, usize> = BTreeMap::new();
        for t in &self.tags {
            *m.entry(t.category).or_default() += t.at_peak;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v
    }
}

/// Busy time of one rank's streams during the step, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StreamBusy {
    /// Kernels (compute stream).
    pub compute: f64,
    /// Collectives (all-to-all, reduce-scatter, all-gather, all-reduce).
    pub collective: f64,
    /// Host-to-device copies (prefetches).
    pub h2d: f64,
    /// Device-to-host copies (offloads).
    pub d2h: f64,
    /// Device-to-device and host-to-host copies.
    pub other_copies: f64,
}

/// What one planned step needed and how long it is predicted to take.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanReport {
    /// The schedule kind.
    pub kind: PlanKind,
    /// The schedule that ran.
    pub schedule: Schedule,
    /// The spec it ran under.
    pub spec: PlanSpec,
    /// Device memory of the rank with the highest peak.
    pub device: MemoryReport,
    /// Host memory (arena) of the rank with the highest peak.
    pub host: MemoryReport,
    /// Predicted time of the step (forward, backward, optimizer): the
    /// latest virtual clock over every rank's streams, seconds.
    pub step_time: f64,
    /// Of which the optimizer step, seconds.
    pub optimizer_time: f64,
    /// Busy time per stream kind of the slowest rank.
    pub busy: StreamBusy,
    /// Model FLOPs of the step over all ranks: `flops_per_token(S) * S`
    /// (forward and backward, causal attention counted as half of full,
    /// recomputation not counted).
    pub model_flops: f64,
    /// FLOPs of every kernel that ran, recomputation included, all ranks.
    pub executed_flops: f64,
    /// Wall-clock seconds this machine took to run the plan.
    pub wall_time: f64,
}

impl PlanReport {
    /// Tokens per second of the predicted step.
    pub fn tokens_per_s(&self) -> f64 {
        self.schedule.seq_len as f64 / self.step_time
    }

    /// Model FLOPs utilization: model FLOPs / (step time * peak * P).
    pub fn mfu(&self) -> f64 {
        self.model_flops / (self.step_time * self.spec.peak_tflops * 1e12 * self.spec.gpus as f64)
    }

    /// Hardware FLOPs utilization: the FLOPs that ran (recomputation
    /// included) over the same denominator.
    pub fn hfu(&self) -> f64 {
        self.executed_flops
            / (self.step_time * self.spec.peak_tflops * 1e12 * self.spec.gpus as f64)
    }

    /// Whether the device peak is within the GPU memory.
    pub fn fits_device(&self) -> bool {
        self.device.peak <= self.spec.gpu_memory
    }

    /// Whether the host peak is within the host memory.
    pub fn fits_host(&self) -> bool {
        self.host.peak <= self.spec.host_memory
    }

    /// Whether both fit.
    pub fn fits(&self) -> bool {
        self.fits_device() && self.fits_host()
    }
}

/// The category a tag is reported under. Tags the planner does not know
/// (the model gains new ones) are reported under "other", never dropped.
pub fn category(tag: &str) -> &'static str {
    match tag {
        "params" => "weights",
        "grads" => "gradients",
        "shard" | "grad shard" | "grad norm" => "optimizer",
        t if t.starts_with("adam") || t.starts_with("optim") || t.starts_with("master") => {
            "optimizer"
        }
        "ids" | "labels" | "loss" | "readback" | "staging" => "batch and loss",
        t if t.starts_with("logits") || t.starts_with("loss") => "logits",
        t if t.starts_with("mlp") => "mlp",
        "x" | "dx" | "x mid" | "dx mid" => "layer inputs",
        t if t.starts_with("attn")
            || t.starts_with('q')
            || t.starts_with('k')
            || t.starts_with('v')
            || t.starts_with('o')
            || t.starts_with("lse")
            || t.starts_with("do")
            || t.starts_with("dq")
            || t.starts_with("dk")
            || t.starts_with("dv")
            || t == "delta" =>
        {
            "attention"
        }
        _ => "other",
    }
}

/// Whether `e` says a step could not run within a device's budgets: the
/// allocator's out-of-memory error, seen directly or as the reason a rank
/// aborted the group (any device kind: the cpu device's budget fails the
/// same way).
pub fn is_out_of_memory(e: &ModelError) -> bool {
    fn alloc_oom(e: &RuntimeError) -> bool {
        matches!(e, RuntimeError::Alloc(AllocError::OutOfMemory { .. }))
    }
    match e {
        ModelError::Runtime(r) => alloc_oom(r),
        ModelError::Comm(CommError::Aborted { reason, .. }) => reason.starts_with("out of "),
        ModelError::Comm(c) => {
            let mut src = std::error::Error::source(c);
            while let Some(s) = src {
                if let Some(r) = s.downcast_ref::<RuntimeError>() {
                    if alloc_oom(r) {
                        return true;
                    }
                }
                src = s.source();
            }
            c.to_string().contains("out of device memory")
                || c.to_string().contains("out of host memory")
        }
        ModelError::Rank { message, .. } => message.starts_with("out of "),
        _ => false,
    }
}

/// Composition of a ledger space at its peak: replays the allocation events
/// recorded since `start` (the tags' holdings when recording began).
fn composition_at_peak(
    start: &BTreeMap<&'static str, usize>,
    events: &[fpdt_runtime::AllocEvent],
    space: Space,
) -> BTreeMap<&'static str, usize> {
    let mut now = start.clone();
    let mut total: usize = now.values().sum();
    let (mut best, mut best_total) = (now.clone(), total);
    for e in events.iter().filter(|e| e.space == space) {
        let t = now.entry(e.tag).or_default();
        if e.alloc {
            *t += e.bytes;
            total += e.bytes;
            if total > best_total {
                best_total = total;
                best.clone_from(&now);
            }
        } else {
            *t = t.saturating_sub(e.bytes);
            total = total.saturating_sub(e.bytes);
        }
    }
    best
}

fn memory_report(
    dev: &Device,
    space: Space,
    start: &BTreeMap<&'static str, usize>,
    events: &[fpdt_runtime::AllocEvent],
) -> MemoryReport {
    let usage = dev.ledger().usage(space);
    let at = composition_at_peak(start, events, space);
    let mut tags: Vec<TagUsage> = usage
        .tags
        .iter()
        .map(|(tag, st)| TagUsage {
            tag,
            category: category(tag),
            peak: st.peak,
            at_peak: at.get(tag).copied().unwrap_or(0),
        })
        .collect();
    tags.sort_by(|a, b| b.at_peak.cmp(&a.at_peak).then(b.peak.cmp(&a.peak)));
    MemoryReport {
        peak: usage.peak,
        tags,
    }
}

/// The budgets the meta devices get: far above the spec's, so a step that
/// does not fit still runs to its end and reports its true peak.
fn meta_config(spec: &PlanSpec) -> MetaConfig {
    MetaConfig {
        name: "plan".into(),
        device_memory: spec.gpu_memory.saturating_mul(16).max(1 << 40),
        host_memory: spec.host_memory.saturating_mul(16).max(1 << 44),
        cost: spec.cost_model(),
    }
}

/// The optimizer step the plan takes (the values do not matter on meta;
/// clipping on, as training runs it).
fn optim_step() -> OptimStep {
    OptimStep::typical(3e-4)
}

/// Plans one training step of `cfg` under `spec` with the schedule `kind`:
/// runs it on `spec.gpus` meta devices and reads what it used. A step that
/// does not fit the budgets still reports its peaks (`fits()` is false).
pub fn plan(cfg: &ModelConfig, spec: &PlanSpec, kind: PlanKind) -> Result<PlanReport> {
    let wall = Instant::now();
    let sched = spec.schedule(kind)?;
    sched.validate(cfg)?;
    let mut g = FpdtGroup::meta(cfg, sched, &meta_config(spec))?;
    if sched.precision == Precision::Bf16 {
        g.model_gpu_path(true)?;
    }
    // What the construction allocated (weights, gradients, optimizer
    // state) is held when recording starts; the replay starts from it.
    let mut starts = Vec::with_capacity(g.ranks().len());
    let mut t0 = Vec::with_capacity(g.ranks().len());
    for r in g.ranks() {
        let d = r.device();
        let held = |space| {
            d.ledger()
                .usage(space)
                .tags
                .iter()
                .map(|(t, s)| (*t, s.in_use))
                .collect::<BTreeMap<_, _>>()
        };
        starts.push((held(Space::Device), held(Space::Host)));
        d.ledger().start_recording();
        // Totals only: the events of a long step (hundreds of millions at
        // 4M tokens on 8 ranks) would not fit in this machine's memory.
        d.trace().set_enabled(false);
        d.trace().clear();
        t0.push(d.now_ns());
    }
    let tokens = vec![0u32; sched.seq_len];
    let targets = vec![0i32; sched.seq_len];
    g.accumulate(&tokens, &targets, 1.0)?;
    let t_mid: Vec<u64> = g.ranks().iter().map(|r| r.device().now_ns()).collect();
    g.optimizer_step(&optim_step())?;
    let mut best: Option<(usize, MemoryReport, MemoryReport)> = None;
    let (mut step_ns, mut opt_ns) = (0u64, 0u64);
    let mut busy = StreamBusy::default();
    let mut slowest = 0u64;
    let mut executed = 0.0;
    for (i, r) in g.ranks().iter().enumerate() {
        let d = r.device();
        d.synchronize()?;
        let events = d.ledger().take_recording();
        let (sd, sh) = &starts[i];
        let dev_mem = memory_report(d, Space::Device, sd, &events);
        let host_mem = memory_report(d, Space::Host, sh, &events);
        drop(events);
        let end = d.now_ns();
        let rank_ns = end.saturating_sub(t0[i]);
        step_ns = step_ns.max(rank_ns);
        opt_ns = opt_ns.max(end.saturating_sub(t_mid[i]));
        let totals = d.trace().totals();
        let secs = |k: OpKind| totals.of(k).busy_ns as f64 * 1e-9;
        let b = StreamBusy {
            compute: secs(OpKind::Kernel),
            collective: secs(OpKind::Collective),
            h2d: secs(OpKind::CopyH2D),
            d2h: secs(OpKind::CopyD2H),
            other_copies: secs(OpKind::CopyD2D) + secs(OpKind::CopyH2H),
        };
        executed += totals.of(OpKind::Kernel).flops;
        d.trace().clear();
        if rank_ns >= slowest {
            slowest = rank_ns;
            busy = b;
        }
        let worse = match &best {
            None => true,
            Some((_, dm, hm)) => (dev_mem.peak, host_mem.peak) > (dm.peak, hm.peak),
        };
        if worse {
            best = Some((i, dev_mem, host_mem));
        }
    }
    let (_, device, host) = best.ok_or_else(|| ModelError::Shape("no ranks planned".into()))?;
    Ok(PlanReport {
        kind,
        schedule: sched,
        spec: spec.clone(),
        device,
        host,
        step_time: step_ns as f64 * 1e-9,
        optimizer_time: opt_ns as f64 * 1e-9,
        busy,
        model_flops: cfg.flops_per_token(sched.seq_len) * sched.seq_len as f64,
        executed_flops: executed,
        wall_time: wall.elapsed().as_secs_f64(),
    })
}

/// Tokens as the paper writes them: 64K, 2M, 1.5M, 12345.
pub fn fmt_tokens(n: usize) -> String {
    const K: usize = 1 << 10;
    const M: usize = 1 << 20;
    if n >= M && n % (M / 4) == 0 {
        let m = n as f64 / M as f64;
        if n % M == 0 {
            format!("{}M", n / M)
        } else {
            format!("{m:.2}M")
        }
    } else if n >= K && n % K == 0 {
        format!("{}K", n / K)
    } else {
        n.to_string()
    }
}

/// Runs `plan`, counting a step the meta devices could not hold even in
/// their oversized budgets as not fitting (and as having no peaks).
fn probe(cfg: &ModelConfig, spec: &PlanSpec, kind: PlanKind) -> Result<Option<PlanReport>> {
    match plan(cfg, spec, kind) {
        Ok(r) => Ok(Some(r)),
        Err(e) if is_out_of_memory(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The lengths `kind` is searched over are multiples of this: the chunk
/// for FPDT (u = S/C whole chunks), for the baseline the chunk too when it
/// is at most 4K tokens, else the largest multiple of P up to 4K tokens (one chunk of S tokens, S divisible by P).
pub fn granule(spec: &PlanSpec, kind: PlanKind) -> usize {
    match kind {
        PlanKind::Fpdt => spec.chunk,
        PlanKind::Ulysses => {
            let p = spec.gpus.max(1);
            if spec.chunk <= 4096 {
                spec.chunk
            } else {
                (4096 / p).max(1) * p
            }
        }
    }
}

/// The largest sequence that fits, and its plan.
#[derive(Debug, Clone, PartialEq)]
pub struct MaxLen {
    /// The schedule kind.
    pub kind: PlanKind,
    /// The largest multiple of the granule that fits (0 when none does).
    pub seq_len: usize,
    /// The granule searched over.
    pub granule: usize,
    /// The plan at `seq_len` (None when not even one granule fits).
    pub report: Option<PlanReport>,
    /// Steps planned during the search.
    pub probes: usize,
    /// Wall-clock seconds of the search.
    pub wall_time: f64,
}

/// Peaks measured at `k` granules: (k, device peak, host peak).
type Measured = (usize, usize, usize);

/// The largest number of granules whose step the straight line through
/// two measured steps (`a.0 != b.0`) puts within both budgets, from `b`;
/// None when neither peak grows with the length (no bound).
fn extrapolate(spec: &PlanSpec, a: Measured, b: Measured) -> Option<usize> {
    let dk = b.0 as f64 - a.0 as f64;
    if dk == 0.0 {
        return None;
    }
    let bound = |ma: usize, mb: usize, budget: usize| {
        let slope = (mb as f64 - ma as f64) / dk;
        (slope > 0.0).then(|| b.0 as f64 + ((budget as f64 - mb as f64) / slope).floor())
    };
    [
        bound(a.1, b.1, spec.gpu_memory),
        bound(a.2, b.2, spec.host_memory),
    ]
    .into_iter()
    .flatten()
    .reduce(f64::min)
    .map(|k| k.max(0.0).min(usize::MAX as f64 / 2.0) as usize)
}

/// Whether `c`'s peaks lie on the line through `a` and `b` (within 1% of
/// each peak): the peaks grow linearly with the length, so extrapolating
/// from them is worth a probe.
fn on_line(a: Measured, b: Measured, c: Measured) -> bool {
    let dk = b.0 as f64 - a.0 as f64;
    if dk == 0.0 {
        return false;
    }
    let near = |ma: usize, mb: usize, mc: usize| {
        let predicted = mb as f64 + (mb as f64 - ma as f64) / dk * (c.0 as f64 - b.0 as f64);
        (predicted - mc as f64).abs() <= 0.01 * mc as f64
    };
    near(a.1, b.1, c.1) && near(a.2, b.2, c.2)
}

/// At most this many probes are placed by extrapolation; after them the
/// search falls back to doubling and bisection, whose cost is bounded.
const GUIDED_PROBES: usize = 4;

/// A guided probe lands at most this many times the longest length known
/// to fit, so a wrong extrapolation cannot ask for a step far costlier than
/// the answer's.
const GUIDED_REACH: usize = 32;

/// The largest sequence (a multiple of [`granule`]) whose step fits
/// `spec`'s device and host memory with the schedule `kind`.
/// `spec.seq_len` is ignored; `limit` caps the search (in tokens).
///
/// The answer is the largest fitting multiple, as a plain doubling and
/// bisection would find it (peaks grow with the length), found with fewer
/// of the costly long probes (a step's planning time grows with u^2): small
/// lengths are doubled until three measured steps lie on one line; then
/// the line through the latest two says where the budgets are crossed, and
/// that length and its neighbour are planned, which usually closes the
/// search. When the peaks are not linear, or after [`GUIDED_PROBES`]
/// guesses, it goes on by doubling and bisection.
pub fn max_seq_len(
    cfg: &ModelConfig,
    spec: &PlanSpec,
    kind: PlanKind,
    limit: usize,
) -> Result<MaxLen> {
    spec.validate()?;
    let wall = Instant::now();
    let g = granule(spec, kind);
    let max_k = (limit / g).max(1);
    let mut probes = 0;
    let found = search(spec, max_k, |k| {
        probes += 1;
        Ok(probe(cfg, &spec.at(k * g), kind)?.map(|r| ((k, r.device.peak, r.host.peak), r)))
    })?;
    let (k, report) = match found {
        Some((k, r)) => (k, Some(r)),
        None => (0, None),
    };
    Ok(MaxLen {
        kind,
        seq_len: k * g,
        granule: g,
        report,
        probes,
        wall_time: wall.elapsed().as_secs_f64(),
    })
}

/// The search of [`max_seq_len`] over `1..=max_k` granules: `step(k)`
/// plans k granules and returns the measured peaks and the report (None
/// when the step could not run at all: it does not fit). Returns the
/// largest k that fits `spec`'s budgets and its report.
fn search<R>(
    spec: &PlanSpec,
    max_k: usize,
    mut step: impl FnMut(usize) -> Result<Option<(Measured, R)>>,
) -> Result<Option<(usize, R)>> {
    let fits = |m: &Measured| m.1 <= spec.gpu_memory && m.2 <= spec.host_memory;
    let mut measured: Vec<Measured> = Vec::new();
    let mut at = |k: usize, measured: &mut Vec<Measured>| -> Result<Option<R>> {
        Ok(step(k)?.and_then(|(m, r)| {
            measured.push(m);
            fits(&m).then_some(r)
        }))
    };
    let Some(first) = at(1, &mut measured)? else {
        return Ok(None);
    };
    // Invariant: `lo` granules fit, `hi` do not (or exceed the limit).
    let (mut lo, mut lo_report) = (1usize, first);
    let mut hi = max_k + 1;
    let mut guided = 0;
    while hi - lo > 1 {
        let n = measured.len();
        let line = (n >= 3 && guided < GUIDED_PROBES)
            .then(|| (measured[n - 3], measured[n - 2], measured[n - 1]))
            .filter(|&(a, b, c)| on_line(a, b, c))
            .map(|(_, b, c)| extrapolate(spec, b, c).unwrap_or(max_k));
        let k = match line {
            Some(k) => {
                guided += 1;
                k.min(lo.saturating_mul(GUIDED_REACH))
            }
            None if hi > max_k => lo.saturating_mul(2),
            None => lo + (hi - lo) / 2,
        }
        .clamp(lo + 1, hi - 1);
        match at(k, &mut measured)? {
            Some(r) => (lo, lo_report) = (k, r),
            None => hi = k,
        }
    }
    Ok(Some((lo, lo_report)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_fall_into_categories_and_unknown_ones_into_other() {
        assert_eq!(category("params"), "weights");
        assert_eq!(category("grads"), "gradients");
        assert_eq!(category("adam m"), "optimizer");
        assert_eq!(category("kv"), "attention");
        assert_eq!(category("logits grad"), "logits");
        assert_eq!(category("mlp wide"), "mlp");
        assert_eq!(category("x"), "layer inputs");
        assert_eq!(category("something new"), "other");
    }

    #[test]
    fn the_composition_at_the_peak_sums_to_the_peak() {
        use fpdt_runtime::AllocEvent;
        let ev = |tag, bytes, alloc| AllocEvent {
            space: Space::Device,
            tag,
            bytes,
            alloc,
        };
        let start = BTreeMap::from([("params", 100)]);
        // a: 50, b: 70 (peak 220 with a and b), free a, c: 40 (210 < 220).
        let events = [
            ev("a", 50, true),
            ev("b", 70, true),
            ev("a", 50, false),
            ev("c", 40, true),
        ];
        let at = composition_at_peak(&start, &events, Space::Device);
        assert_eq!(at.get("params"), Some(&100));
        assert_eq!(at.get("a"), Some(&50));
        assert_eq!(at.get("b"), Some(&70));
        assert_eq!(at.get("c"), None);
    }

    /// A spec whose budgets are `dev` and `host` bytes.
    fn budgets(dev: usize, host: usize) -> PlanSpec {
        PlanSpec {
            gpu_memory: dev,
            host_memory: host,
            ..PlanSpec::h100(1024, 1, 1024)
        }
    }

    /// The search over peaks given by `peaks(k)` (None: the step cannot
    /// run), with the probes it made.
    fn run_search(
        spec: &PlanSpec,
        max_k: usize,
        peaks: impl Fn(usize) -> Option<(usize, usize)>,
    ) -> (usize, Vec<usize>) {
        let mut probed = Vec::new();
        let found = search(spec, max_k, |k| {
            probed.push(k);
            Ok(peaks(k).map(|(d, h)| ((k, d, h), k)))
        })
        .unwrap_or_else(|e| panic!("search failed: {e}"));
        if let Some((k, r)) = found {
            assert_eq!(k, r, "the report is the one planned at the answer");
        }
        (found.map_or(0, |f| f.0), probed)
    }

    /// The answer a scan of every k finds: the largest k whose peaks fit,
    /// when every shorter one fits too.
    fn scan(
        spec: &PlanSpec,
        max_k: usize,
        peaks: impl Fn(usize) -> Option<(usize, usize)>,
    ) -> usize {
        (1..=max_k)
            .take_while(|&k| {
                peaks(k).is_some_and(|(d, h)| d <= spec.gpu_memory && h <= spec.host_memory)
            })
            .last()
            .unwrap_or(0)
    }

    #[test]
    fn the_search_finds_what_a_scan_finds_for_linear_and_other_peaks() {
        type Peaks = Box<dyn Fn(usize) -> Option<(usize, usize)>>;
        let shapes: Vec<(&str, Peaks)> = vec![
            // FPDT-like: the device flat, the host linear.
            ("host linear", Box::new(|k| Some((1000 + k, 500 + 37 * k)))),
            // Baseline-like: the device linear, the host flat.
            ("device linear", Box::new(|k| Some((300 + 91 * k, 50)))),
            // A different first step (u = 1 schedules differ), then linear.
            (
                "kinked",
                Box::new(|k| Some((if k == 1 { 90 } else { 400 + 13 * k }, 7 * k))),
            ),
            ("quadratic", Box::new(|k| Some((k * k * 3, k)))),
            // Linear in steps of 4 (rounding to blocks).
            ("stepped", Box::new(|k| Some((100 + 50 * (k / 4), 10)))),
            // The meta devices give up past a length.
            (
                "cannot run past 60",
                Box::new(|k| (k <= 60).then_some((k, 10 * k))),
            ),
            ("flat", Box::new(|_| Some((10, 10)))),
            ("nothing fits", Box::new(|k| Some((100_000 + k, 0)))),
        ];
        for (dev, host) in [(10_000, 10_000), (4_000, 900), (2_500, 100_000), (600, 600)] {
            let spec = budgets(dev, host);
            for max_k in [1, 7, 100, 1000] {
                for (name, peaks) in &shapes {
                    let want = scan(&spec, max_k, peaks);
                    let (got, probed) = run_search(&spec, max_k, peaks);
                    assert_eq!(
                        got, want,
                        "{name}, budgets {dev}/{host}, max_k {max_k}: probes {probed:?}"
                    );
                    assert!(
                        probed.iter().all(|&k| (1..=max_k).contains(&k)),
                        "{name}: probed outside 1..={max_k}: {probed:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn linear_peaks_close_the_search_in_few_probes_none_far_past_the_answer() {
        // Host 2.8 per granule over a budget of 256: the answer is 89 (like
        // llama-3-8b on 4 GPUs at 16K-token chunks), device peaks flat.
        let spec = budgets(80, 256_000);
        let peaks = |k: usize| Some((70, 5_000 + 2_800 * k));
        let (got, probed) = run_search(&spec, 1024, peaks);
        assert_eq!(got, 89);
        // Doubling 1, 2, 4 to see the line, then 89 and 90.
        assert_eq!(probed, vec![1, 2, 4, 89, 90]);
        // The plain doubling and bisection probed 1, 2, 4, .., 128, then
        // 96, 80, 88, 92, 90, 89: six probes at u >= 80 and one at 128.
        assert!(
            probed.iter().filter(|&&k| k >= 64).count() <= 2,
            "{probed:?}"
        );
    }

    #[test]
    fn extrapolation_finds_where_the_line_crosses_the_budget() {
        let spec = budgets(1000, 10_000);
        // Device 100 + 10 k: 1000 reached at k = 90.
        assert_eq!(extrapolate(&spec, (2, 120, 0), (4, 140, 0)), Some(90));
        // Host 30 per granule from 400 at k = 3: (10000-400)/30 = 320 more.
        assert_eq!(extrapolate(&spec, (1, 340, 340), (3, 340, 400)), Some(323));
        // The smaller of both bounds.
        assert_eq!(extrapolate(&spec, (2, 120, 60), (4, 140, 120)), Some(90));
        // Nothing grows: no bound.
        assert_eq!(extrapolate(&spec, (2, 120, 60), (4, 120, 60)), None);
        assert!(on_line((1, 10, 5), (2, 20, 5), (8, 80, 5)));
        assert!(!on_line((1, 10, 5), (2, 20, 5), (8, 160, 5)));
    }

    #[test]
    fn the_baseline_granule_divides_by_p() {
        let spec = PlanSpec::h100(1 << 20, 8, 65_536);
        let g = granule(&spec, PlanKind::Ulysses);
        assert_eq!(g % 8, 0);
        assert!(g <= 4096);
        let spec = PlanSpec::h100(1 << 20, 3, 65_535);
        let g = granule(&spec, PlanKind::Ulysses);
        assert_eq!(g % 3, 0, "{g}");
    }
}
