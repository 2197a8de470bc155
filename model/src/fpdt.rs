//! The FPDT model of one rank, and an in-process group of P ranks.
//!
//! A step: embedding per local chunk; every layer's forward (the FPDT
//! attention block and the chunked MLP block, see [`crate::layers`]); the
//! chunked loss, fused with its backward; every layer's backward in reverse
//! (recomputing the layer's forward from its offloaded input when
//! checkpointing); the embedding's backward; then the all-reduce of the
//! loss. Gradients accumulate on each rank over micro-batches; the optimizer
//! step reduce-scatters them, so each rank updates its shard of the fp32
//! master weights and AdamW moments (in the host arena) and the updated
//! shards are all-gathered into the working weights replicated on every
//! rank's device (DESIGN.md section 5, "Optimizer").

use fpdt_comm::GroupConfig;
use fpdt_comm::{Communicator, DType, FpdtLayout, InProcessComm, InProcessGroup, ReduceOp};
use fpdt_ptx::cpu::{adamw_step, AdamW};
use fpdt_runtime::{
    cuda::blas::WORKSPACE_BYTES, cuda::Blas, ChunkMover, CpuConfig, CudaConfig, Device,
    DeviceBuffer, DeviceKind, HostBuffer, MetaConfig,
};

use crate::config::{ModelConfig, ParamLayout, Precision, Schedule};
use crate::error::{ModelError, Result};
use crate::layers::{block, embedding, fill, loss, Ctx, Gemms, Stash, Tv, F32};
use crate::reference::check_batch;
use fpdt_ptx::cpu::{narrow_bytes, widen_bytes, DType as Storage};

/// Where the gradients of a rank stand between optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GradState {
    /// Zero: nothing accumulated since the last optimizer step.
    Zero,
    /// This rank's own contribution, not yet reduced over the ranks.
    Local,
    /// Summed over the ranks, the whole flat layout on every rank.
    Full,
}

/// The optimizer state of one rank: its shard of the fp32 master weights
/// and of the AdamW moments, in the host arena (DESIGN.md section 5), and
/// one device buffer of the shard's size that receives the reduce-scattered
/// gradient and then sends the updated weights to the all-gather.
struct OptimizerShard {
    /// Elements of the (padded) flat layout this rank updates.
    range: std::ops::Range<usize>,
    master: HostBuffer,
    m: HostBuffer,
    v: HostBuffer,
    /// The shard's gradient, copied to the host for the update.
    host_grad: HostBuffer,
    /// Reduce-scatter target, then all-gather source.
    dev_shard: DeviceBuffer,
    /// The updated shard rounded to the working dtype (bf16 path only; on
    /// the f32 path the master shard is the working shard).
    host_working: Option<HostBuffer>,
    /// AdamW steps taken (the bias correction's t).
    steps: u32,
}

/// AdamW's state: fp32 master weights, first and second moments (each the
/// flat layout, or one rank's shard of it) and the steps taken.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// The fp32 master weights.
    pub master: Vec<f32>,
    /// First moments.
    pub m: Vec<f32>,
    /// Second moments.
    pub v: Vec<f32>,
    /// AdamW steps taken (skipped steps not counted).
    pub steps: u32,
}

/// What one forward and backward pass of a sequence measured (global over
/// the ranks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroStats {
    /// Mean loss over the sequence's counted targets.
    pub loss: f64,
    /// Counted targets (not ignored).
    pub targets: usize,
    /// Counted targets whose logits' argmax is the target.
    pub correct: usize,
}

impl MicroStats {
    /// `correct / targets` (0 when nothing was counted).
    pub fn accuracy(&self) -> f64 {
        if self.targets == 0 {
            0.0
        } else {
            self.correct as f64 / self.targets as f64
        }
    }
}

/// What an optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimReport {
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    /// The factor the gradient was scaled by (1: not clipped).
    pub clip_scale: f64,
    /// True when the norm was not finite: no weight changed.
    pub skipped: bool,
}

/// The optimizer settings of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimStep {
    /// AdamW's constants; `lr` is this step's learning rate.
    pub adamw: AdamW,
    /// Clip the gradient to this global norm (0: no clipping).
    pub clip: f64,
}

impl OptimStep {
    /// The usual LLM settings at learning rate `lr`: betas 0.9/0.95,
    /// eps 1e-8, weight decay 0.1, clipping at norm 1.
    pub fn typical(lr: f32) -> OptimStep {
        OptimStep {
            adamw: AdamW {
                lr,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
            },
            clip: 1.0,
        }
    }
}

/// One rank of the FPDT model: its device, its communicator, the working
/// weights, the gradients and its shard of the optimizer state.
pub struct RankModel<C: Communicator> {
    cfg: ModelConfig,
    layout: ParamLayout,
    sched: Schedule,
    comm: C,
    dev: Device,
    mover: ChunkMover,
    /// Working weights, the flat layout padded to a multiple of P (in the
    /// schedule's storage dtype; the fp32 master is the optimizer's).
    params: DeviceBuffer,
    /// Gradients, same shape (f32), accumulated over micro-batches.
    grads: DeviceBuffer,
    grad_state: GradState,
    /// [weighted loss sum, correct argmax count] of the last pass.
    loss: DeviceBuffer,
    /// Where the loss and the gradient norm are read on the host (kept, so
    /// reading them allocates nothing and the cpu and meta allocation
    /// traces stay equal).
    readback: HostBuffer,
    last: Option<MicroStats>,
    opt: OptimizerShard,
    batch: Option<(DeviceBuffer, DeviceBuffer, usize)>,
    /// On cuda: run every layer op as a host kernel, even those with a PTX
    /// kernel (what the cpu device computes, bit for bit).
    host_kernels: bool,
    /// On cuda: cuBLASLt for the linear layers' GEMMs, or why not (the
    /// GEMMs then run as host kernels).
    blas: std::result::Result<Blas, String>,
    /// On cuda: the token positions `0..seq_len` (u32), uploaded once, so
    /// RoPE's kernels read any chunk's (contiguous) positions from a slice
    /// of it instead of a copy per call (`S * 4` bytes: 8 MiB at 2M
    /// tokens). On meta with the GPU path modelled: its size alone.
    positions: Option<DeviceBuffer>,
    /// On meta: model the cuda device's GPU path (PTX kernels, cuBLASLt
    /// GEMMs, their allocations) instead of the cpu device's host kernels.
    gpu_path: bool,
    /// On meta with the GPU path modelled: the cuBLASLt workspace the cuda
    /// device holds.
    meta_workspace: Option<DeviceBuffer>,
}

impl<C: Communicator> std::fmt::Debug for RankModel<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RankModel(rank {} of {}, {:?})",
            self.comm.rank(),
            self.comm.world_size(),
            self.sched
        )
    }
}

impl<C: Communicator> RankModel<C> {
    /// Rank `comm.rank()` of the model `cfg` run with `sched` on `dev`, with
    /// initial weights `params` (the flat layout; `None` only on a device
    /// without data, the meta planner's, where weights are sizes alone).
    /// Everything is validated before anything is allocated.
    pub fn new(
        cfg: &ModelConfig,
        sched: Schedule,
        comm: C,
        dev: Device,
        params: Option<&[f32]>,
    ) -> Result<Self> {
        sched.validate(cfg)?;
        if comm.world_size() != sched.ranks {
            return Err(ModelError::config(
                "ranks (P)",
                sched.ranks,
                format!(
                    "must equal the communicator's world size ({})",
                    comm.world_size()
                ),
            ));
        }
        let layout = cfg.layout();
        let n = layout.len();
        match params {
            Some(w) if w.len() != n => {
                return Err(ModelError::Shape(format!(
                    "{} initial parameters given, the layout of this config has {n}",
                    w.len(),
                )))
            }
            None if dev.has_data() => {
                return Err(ModelError::Shape(format!(
                    "the {} device holds data: it needs initial weights",
                    dev.kind()
                )))
            }
            _ => {}
        }
        let p = sched.ranks;
        let n_pad = layout.padded_len(p);
        let k = n_pad / p;
        let r = comm.rank();
        let range = r * k..(r + 1) * k;
        let wdt = sched.precision.storage();
        let weights = dev.alloc(n_pad * wdt.size(), "params")?;
        let grads = dev.alloc(n_pad * F32, "grads")?;
        let loss = dev.alloc(2 * F32, "loss")?;
        let readback = dev.alloc_host(3 * F32, "readback")?;
        let mut master = dev.alloc_host(k * F32, "adam master")?;
        let mut m = dev.alloc_host(k * F32, "adam m")?;
        let mut v = dev.alloc_host(k * F32, "adam v")?;
        let host_grad = dev.alloc_host(k * F32, "grad shard")?;
        let dev_shard = dev.alloc(k * F32, "shard")?;
        let host_working = match sched.precision {
            Precision::F32 => None,
            Precision::Bf16 => Some(dev.alloc_host(k * wdt.size(), "working shard")?),
        };
        if let Some(w) = params {
            let mut padded = w.to_vec();
            padded.resize(n_pad, 0.0);
            dev.write(weights.view(), &stored(&padded, wdt)?)?;
            master.copy_from(&padded[range.clone()])?;
            m.write(|x: &mut [f32]| x.fill(0.0))?;
            v.write(|x: &mut [f32]| x.fill(0.0))?;
        }
        fill(dev.compute(), Tv::f32(grads.view()), 0.0)?;
        let blas = if dev.kind() == DeviceKind::Cuda {
            Blas::with_workspace(&dev, Self::workspace_bytes(&dev)).map_err(|e| e.to_string())
        } else {
            Err(format!("the {} device multiplies on the host", dev.kind()))
        };
        let positions = match dev.kind() {
            DeviceKind::Cuda => {
                let iota: Vec<u32> = (0..sched.seq_len as u32).collect();
                Some(dev.upload(&iota, "rope positions")?)
            }
            _ => None,
        };
        Ok(RankModel {
            cfg: cfg.clone(),
            layout,
            sched,
            mover: ChunkMover::new(&dev),
            comm,
            dev,
            params: weights,
            grads,
            grad_state: GradState::Zero,
            loss,
            readback,
            last: None,
            opt: OptimizerShard {
                range,
                master,
                m,
                v,
                host_grad,
                dev_shard,
                host_working,
                steps: 0,
            },
            batch: None,
            host_kernels: false,
            blas,
            positions,
            gpu_path: false,
            meta_workspace: None,
        })
    }

    /// The cuBLASLt workspace a cuda device of this budget gets: the
    /// recommended 32 MiB, or 1/16 of a small budget.
    fn workspace_bytes(dev: &Device) -> usize {
        (dev.device_budget() / 16).min(WORKSPACE_BYTES) & !255
    }

    /// On the meta device: plan the step the cuda device runs (its PTX
    /// kernels, its cuBLASLt GEMMs, and what they allocate: the positions
    /// buffer, the GEMM workspace, f32 GEMM outputs) when `on`, instead of
    /// the cpu device's host kernels (the default, whose peaks the cpu
    /// device measures exactly). Refused on the other devices, which run
    /// the path they have.
    pub fn model_gpu_path(&mut self, on: bool) -> Result<()> {
        if self.dev.kind() != DeviceKind::Meta {
            return Err(ModelError::config(
                "gpu path",
                on,
                format!(
                    "is modelled on the meta device only (this rank runs on {})",
                    self.dev.kind()
                ),
            ));
        }
        if on == self.gpu_path {
            return Ok(());
        }
        if on {
            let ws = Self::workspace_bytes(&self.dev);
            self.positions = Some(self.dev.alloc(self.sched.seq_len * 4, "rope positions")?);
            self.meta_workspace = Some(self.dev.alloc(ws, "cublaslt workspace")?);
        } else {
            self.positions = None;
            self.meta_workspace = None;
        }
        self.gpu_path = on;
        Ok(())
    }

    /// Whether this rank's layer ops run (or, on meta, are modelled) as
    /// PTX kernels and cuBLASLt GEMMs rather than host kernels.
    fn on_gpu(&self) -> bool {
        match self.dev.kind() {
            DeviceKind::Cuda => !self.host_kernels,
            DeviceKind::Meta => self.gpu_path,
            DeviceKind::Cpu => false,
        }
    }

    /// Where the linear layers' GEMMs run: cuBLASLt (and its file), or
    /// host kernels and why.
    pub fn gemm_backend(&self) -> String {
        match &self.blas {
            Ok(b) => format!("cuBLASLt `{}`", b.library().path().display()),
            Err(e) => format!("host kernels ({e})"),
        }
    }

    /// On cuda, runs every layer op as a host kernel (staged through the
    /// pinned arena) instead of its PTX kernel where it has one: what the
    /// cpu device computes, bit for bit. No effect elsewhere.
    pub fn set_host_kernels(&mut self, on: bool) {
        self.host_kernels = on;
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.sched
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Loads one sequence: all `S` tokens and targets (global order; each
    /// rank keeps its share in the FPDT token layout). Targets of -1 are
    /// ignored.
    pub fn load_batch(&mut self, tokens: &[u32], targets: &[i32]) -> Result<()> {
        if tokens.len() != self.sched.seq_len {
            return Err(ModelError::config(
                "tokens",
                tokens.len(),
                format!("the schedule's seq_len is {}", self.sched.seq_len),
            ));
        }
        let valid = check_batch(&self.cfg, tokens, targets)?;
        let lay = FpdtLayout::new(self.sched.seq_len, self.sched.ranks, self.sched.chunks)?;
        let r = self.comm.rank();
        // Replace before allocating, so two batches are never held at once.
        self.batch = None;
        let ids = self.dev.upload(&lay.shard(tokens, r)?, "ids")?;
        let labels = self.dev.upload(&lay.shard(targets, r)?, "labels")?;
        self.batch = Some((ids, labels, valid));
        Ok(())
    }

    /// Forward and backward of the loaded sequence, from zero gradients,
    /// with the gradient all-reduced: afterwards [`Self::loss`] and
    /// [`Self::grads`] hold the global mean loss and its gradient (the same
    /// on every rank). Call on every rank at once.
    pub fn forward_backward(&mut self) -> Result<()> {
        self.zero_grads()?;
        self.accumulate(1.0)?;
        let r = self.reduce_full();
        self.abort_on_err(r)
    }

    /// Forward and backward of the loaded sequence, adding `weight` times
    /// its mean-loss gradient to this rank's gradients (not yet reduced over
    /// the ranks: the optimizer step reduce-scatters them). Gradient
    /// accumulation over A sequences uses `weight = 1/A`. Call on every rank
    /// at once.
    pub fn accumulate(&mut self, weight: f32) -> Result<MicroStats> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(ModelError::config(
                "weight",
                weight,
                "must be finite and positive",
            ));
        }
        if self.grad_state == GradState::Full {
            return Err(ModelError::Shape(
                "accumulate after forward_backward: the gradients are already reduced; take an \
                 optimizer step or zero them first"
                    .into(),
            ));
        }
        let r = self.run(weight);
        let stats = self.abort_on_err(r)?;
        self.grad_state = GradState::Local;
        self.last = Some(stats);
        Ok(stats)
    }

    fn abort_on_err<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.comm.abort(&e.to_string());
        }
        r
    }

    /// Sets the gradients to zero (a new accumulation).
    pub fn zero_grads(&mut self) -> Result<()> {
        if self.grad_state != GradState::Zero {
            fill(self.dev.compute(), Tv::f32(self.grads.view()), 0.0)?;
            self.grad_state = GradState::Zero;
        }
        Ok(())
    }

    fn reduce_full(&mut self) -> Result<()> {
        let s = self.dev.compute();
        self.comm
            .all_reduce(s, self.grads.view(), DType::F32, ReduceOp::Sum)?;
        self.comm.synchronize(s)?;
        self.grad_state = GradState::Full;
        Ok(())
    }

    fn run(&mut self, weight: f32) -> Result<MicroStats> {
        let (ids, labels, valid) = self
            .batch
            .as_ref()
            .ok_or_else(|| ModelError::Shape("forward_backward before load_batch".into()))?;
        let ctx = Ctx {
            cfg: &self.cfg,
            layout: &self.layout,
            sched: &self.sched,
            dev: &self.dev,
            mover: &self.mover,
            comm: &self.comm,
            params: &self.params,
            wdt: self.sched.precision.storage(),
            adt: self.sched.precision.storage(),
            // Activation gradients in bf16 too: half the bytes of dO, dx and
            // the all-to-alls of the backward (f32 ones measured only
            // slightly closer to the reference, the forward's rounding
            // dominating).
            gdt: self.sched.precision.storage(),
            grads: &self.grads,
            gpu: self.on_gpu(),
            gemms: match self.dev.kind() {
                DeviceKind::Cuda => self.blas.as_ref().ok().map(|b| Gemms(Some(b))),
                DeviceKind::Meta => Some(Gemms(None)),
                DeviceKind::Cpu => None,
            }
            .filter(|_| self.on_gpu()),
            positions: self.positions.as_ref(),
        };
        let s = ctx.s();
        fill(s, Tv::f32(self.loss.view()), 0.0)?;
        let (u, c, h) = (
            self.sched.chunks,
            self.sched.local_chunk_tokens(),
            self.cfg.hidden,
        );
        fn rows(b: &DeviceBuffer, i: usize, c: usize) -> fpdt_runtime::Result<Tv<'_>> {
            Ok(Tv::f32(b.elems::<f32>(i * c..(i + 1) * c)?))
        }
        // Embedding.
        let mut x = Vec::with_capacity(u);
        for i in 0..u {
            let e = ctx.alloc_act(c * h, "x")?;
            embedding::forward(&ctx, rows(ids, i, c)?, e.view())?;
            x.push(ctx.stash(e)?);
        }
        // Layers forward.
        let mut inputs: Vec<Vec<Stash>> = Vec::with_capacity(self.cfg.layers);
        let mut saved = Vec::with_capacity(self.cfg.layers);
        for l in 0..self.cfg.layers {
            let (out, sv) = block::forward(&ctx, l, &x)?;
            saved.push((!self.sched.checkpoint).then_some(sv));
            inputs.push(std::mem::replace(&mut x, out));
        }
        // Loss, fused with its backward.
        let scale = weight / *valid as f32;
        let mut dys = Vec::with_capacity(u);
        for (i, xi) in x.iter().enumerate() {
            let xl = xi.fetch(&self.mover)?;
            let dx = ctx.alloc_grad(c * h, "dx")?;
            loss::forward_backward(
                &ctx,
                xl.view()?,
                rows(labels, i, c)?,
                dx.view(),
                Tv::f32(self.loss.view()),
                c,
                scale,
            )?;
            drop(xl);
            dys.push(ctx.stash(dx)?);
        }
        drop(x);
        // Layers backward.
        for l in (0..self.cfg.layers).rev() {
            let xs = inputs
                .pop()
                .ok_or_else(|| ModelError::Shape("layer input missing".into()))?;
            let sv = match saved.pop().flatten() {
                Some(sv) => sv,
                None => block::forward(&ctx, l, &xs)?.1,
            };
            dys = block::backward(&ctx, l, &xs, &sv, &dys)?;
        }
        for (i, dy) in dys.iter().enumerate() {
            let g = dy.fetch(&self.mover)?;
            embedding::backward(&ctx, rows(ids, i, c)?, g.view()?)?;
        }
        drop(dys);
        self.comm
            .all_reduce(s, self.loss.view(), DType::F32, ReduceOp::Sum)?;
        self.comm.synchronize(s)?;
        self.dev.synchronize()?;
        let targets = *valid;
        if !self.dev.has_data() {
            // Meta: the same copy, no data to read.
            s.copy(self.loss.view(), self.readback.elems::<f32>(0..2)?)?;
            return Ok(MicroStats {
                loss: f64::NAN,
                targets,
                correct: 0,
            });
        }
        s.copy(self.loss.view(), self.readback.elems::<f32>(0..2)?)?;
        s.synchronize()?;
        let acc = self.readback.to_vec::<f32>(2)?;
        Ok(MicroStats {
            loss: f64::from(acc[0]) / f64::from(weight),
            targets,
            correct: acc[1] as usize,
        })
    }

    /// The mean loss of the last pass (cpu: downloaded; meta has no data).
    pub fn loss(&self) -> Result<f64> {
        match self.last {
            Some(m) if self.dev.has_data() => Ok(m.loss),
            Some(_) => Err(ModelError::Runtime(fpdt_runtime::RuntimeError::NoData {
                what: "the loss".into(),
            })),
            None => Err(ModelError::Shape("no forward pass has run".into())),
        }
    }

    /// What the last pass measured.
    pub fn last_stats(&self) -> Option<MicroStats> {
        self.last
    }

    /// The gradients (the flat layout) after [`Self::forward_backward`].
    pub fn grads(&self) -> Result<Vec<f32>> {
        if self.grad_state != GradState::Full {
            return Err(ModelError::Shape(
                "the gradients are not reduced over the ranks: call forward_backward".into(),
            ));
        }
        let mut g = self.dev.download::<f32>(self.grads.view())?;
        g.truncate(self.layout.len());
        Ok(g)
    }

    /// The working weights (the flat layout; bf16 ones widened to f32).
    pub fn params(&self) -> Result<Vec<f32>> {
        let raw = self.dev.download::<u8>(self.params.view())?;
        let mut p = widen_bytes(&raw, self.sched.precision.storage())?;
        p.truncate(self.layout.len());
        Ok(p)
    }

    /// This rank's shard of the optimizer state and the range of the
    /// padded flat layout it covers.
    pub fn optimizer_shard(&self) -> Result<(std::ops::Range<usize>, OptimizerState)> {
        self.dev.synchronize()?;
        let k = self.opt.range.len();
        Ok((
            self.opt.range.clone(),
            OptimizerState {
                master: self.opt.master.to_vec(k)?,
                m: self.opt.m.to_vec(k)?,
                v: self.opt.v.to_vec(k)?,
                steps: self.opt.steps,
            },
        ))
    }

    /// Restores weights and optimizer state (the whole flat layout, each
    /// rank takes its shard), e.g. from a checkpoint. The working weights
    /// become the master weights.
    pub fn restore(&mut self, state: &OptimizerState) -> Result<()> {
        let n = self.layout.len();
        let (master, m, v, steps) = (&state.master, &state.m, &state.v, state.steps);
        for (what, x) in [("weights", master), ("adam m", m), ("adam v", v)] {
            if x.len() != n {
                return Err(ModelError::Shape(format!(
                    "restore: {what} has {} values, the layout has {n}",
                    x.len()
                )));
            }
        }
        let n_pad = self.layout.padded_len(self.sched.ranks);
        let pad = |x: &[f32]| {
            let mut y = x.to_vec();
            y.resize(n_pad, 0.0);
            y
        };
        let (w, m, v) = (pad(master), pad(m), pad(v));
        let r = self.opt.range.clone();
        self.dev.synchronize()?;
        self.dev.write(
            self.params.view(),
            &stored(&w, self.sched.precision.storage())?,
        )?;
        self.opt.master.copy_from(&w[r.clone()])?;
        self.opt.m.copy_from(&m[r.clone()])?;
        self.opt.v.copy_from(&v[r])?;
        self.opt.steps = steps;
        self.zero_grads()?;
        self.dev.synchronize()?;
        Ok(())
    }

    /// One sharded AdamW step with the accumulated gradients: reduce-scatter
    /// (each rank receives the sum of its shard), the global norm (an
    /// all-reduce of the shards' squared norms), clipping, AdamW on the fp32
    /// master shard and moments in the host arena, the updated shard copied
    /// to the device and all-gathered into every rank's working weights.
    /// A non-finite norm skips the update (no weight or moment changes).
    /// The gradients are zero afterwards. Call on every rank at once.
    pub fn optimizer_step(&mut self, step: &OptimStep) -> Result<OptimReport> {
        let r = self.optimizer_step_inner(step);
        self.abort_on_err(r)
    }

    fn optimizer_step_inner(&mut self, step: &OptimStep) -> Result<OptimReport> {
        if !(step.clip.is_finite() && step.clip >= 0.0) {
            return Err(ModelError::config(
                "clip",
                step.clip,
                "must be finite and >= 0 (0: no clipping)",
            ));
        }
        let s = self.dev.compute().clone();
        let on_gpu = self.on_gpu();
        let opt = &mut self.opt;
        let k = opt.range.len();
        match self.grad_state {
            GradState::Zero | GradState::Local => self.comm.reduce_scatter(
                &s,
                self.grads.view(),
                opt.dev_shard.view(),
                DType::F32,
                ReduceOp::Sum,
            )?,
            GradState::Full => s.copy(
                self.grads.elems::<f32>(opt.range.clone())?,
                opt.dev_shard.view(),
            )?,
        }
        // The squared norm of this shard, then of all shards.
        let sq = self.dev.alloc(F32, "grad norm")?;
        if on_gpu {
            // On the GPU (red.add of per-warp sums: the last bits vary run to
            // run), not a host kernel staging the whole shard to the host.
            fill(&s, Tv::f32(sq.view()), 0.0)?;
            let shard = opt.dev_shard.view();
            let l = fpdt_ptx::kernels::sq_norm(
                k,
                fpdt_ptx::cpu::DType::F32,
                sq.view().addr() as u64,
                shard.addr() as u64,
            )?;
            crate::layers::ptx_launch(&s, &l, 2.0 * k as f64, &[shard], &[sq.view()])?;
        } else {
            crate::layers::kernel(
                &s,
                "grad_sq_norm",
                2.0 * k as f64,
                &[Tv::f32(opt.dev_shard.view())],
                &[Tv::f32(sq.view())],
                |i, o| {
                    o[0][0] = fpdt_ptx::cpu::sq_norm(i[0]) as f32;
                    Ok(())
                },
            )?;
        }
        self.comm
            .all_reduce(&s, sq.view(), DType::F32, ReduceOp::Sum)?;
        s.copy(opt.dev_shard.view(), opt.host_grad.view())?;
        s.copy(sq.view(), self.readback.elems::<f32>(2..3)?)?;
        self.comm.synchronize(&s)?;
        s.synchronize()?;
        drop(sq);
        let norm = if self.dev.has_data() {
            f64::from(self.readback.to_vec::<f32>(3)?[2]).sqrt()
        } else {
            0.0
        };
        let scale = if step.clip > 0.0 && norm > step.clip {
            step.clip / (norm + 1e-6)
        } else {
            1.0
        };
        if !norm.is_finite() {
            // Every rank saw the same all-reduced norm, so all skip.
            fill(&s, Tv::f32(self.grads.view()), 0.0)?;
            self.grad_state = GradState::Zero;
            s.synchronize()?;
            return Ok(OptimReport {
                grad_norm: norm,
                clip_scale: 1.0,
                skipped: true,
            });
        }
        opt.steps += 1;
        let t = opt.steps;
        let adamw = step.adamw;
        let gs = scale as f32;
        // AdamW on the host shard (the arena): 10 FLOPs per element.
        let mut writes = vec![
            Tv::f32(opt.master.view()),
            Tv::f32(opt.m.view()),
            Tv::f32(opt.v.view()),
        ];
        let wdt = self.sched.precision.storage();
        if let Some(w) = &opt.host_working {
            // Rounded to bf16 by the kernel helper as it is written.
            writes.push(Tv {
                v: w.view(),
                dt: wdt,
            });
        }
        crate::layers::kernel(
            &s,
            "adamw_host",
            10.0 * k as f64,
            &[Tv::f32(opt.host_grad.view())],
            &writes,
            move |i, o| {
                let (p, rest) = o.split_at_mut(1);
                let (m, rest) = rest.split_at_mut(1);
                let (v, rest) = rest.split_at_mut(1);
                match rest.first_mut() {
                    Some(w) => adamw_step(&adamw, t, gs, p[0], i[0], m[0], v[0], w),
                    None => {
                        let mut working = vec![0.0f32; p[0].len()];
                        adamw_step(&adamw, t, gs, p[0], i[0], m[0], v[0], &mut working)
                    }
                }
            },
        )?;
        match &opt.host_working {
            // The all-gather moves the bf16 working shard (half the bytes).
            Some(w) => {
                let send = opt.dev_shard.bytes(0..k * wdt.size())?;
                s.copy(w.view(), send)?;
                self.comm.all_gather(&s, send, self.params.view())?;
            }
            // f32 working weights are the master weights themselves.
            None => {
                s.copy(opt.master.view(), opt.dev_shard.view())?;
                self.comm
                    .all_gather(&s, opt.dev_shard.view(), self.params.view())?;
            }
        }
        fill(&s, Tv::f32(self.grads.view()), 0.0)?;
        self.comm.synchronize(&s)?;
        s.synchronize()?;
        self.grad_state = GradState::Zero;
        Ok(OptimReport {
            grad_norm: norm,
            clip_scale: scale,
            skipped: false,
        })
    }

    /// One AdamW step at `opt.lr` without clipping (the optimizer's step
    /// counter supplies the bias correction).
    pub fn adamw_step(&mut self, opt: &AdamW) -> Result<OptimReport> {
        self.optimizer_step(&OptimStep {
            adamw: *opt,
            clip: 0.0,
        })
    }
}

/// What a step of the whole group returns.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The global mean loss.
    pub loss: f64,
    /// Its gradient (the flat layout), as rank 0 holds it.
    pub grads: Vec<f32>,
}

/// P ranks of the FPDT model in one process, one thread per rank.
pub struct FpdtGroup {
    ranks: Vec<RankModel<InProcessComm>>,
}

impl std::fmt::Debug for FpdtGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FpdtGroup({} ranks)", self.ranks.len())
    }
}

impl FpdtGroup {
    /// P cpu devices made from `cpu`.
    pub fn cpu(
        cfg: &ModelConfig,
        sched: Schedule,
        params: &[f32],
        cpu: &CpuConfig,
    ) -> Result<Self> {
        sched.validate(cfg)?;
        let comms = InProcessGroup::cpu(sched.ranks, cpu, GroupConfig::default())?;
        Self::from_comms(cfg, sched, Some(params), comms)
    }

    /// P ranks on the GPU of `cuda` (its `ordinal`), one cuda device each,
    /// sharing it: with `device_memory` None each rank takes 1/P of
    /// `memory_fraction` of the memory free now. The layers run as host
    /// kernels staged through each rank's pinned arena (see
    /// `Stream::launch_host`), the copies, offloads and collectives on the
    /// GPU's streams.
    pub fn cuda(
        cfg: &ModelConfig,
        sched: Schedule,
        params: &[f32],
        cuda: &CudaConfig,
    ) -> Result<Self> {
        sched.validate(cfg)?;
        let p = sched.ranks;
        let f = cuda.memory_fraction;
        let base = cuda
            .name
            .clone()
            .unwrap_or_else(|| format!("cuda{}", cuda.ordinal));
        let devices = (0..p)
            .map(|r| {
                Device::cuda_with(CudaConfig {
                    name: Some(if p == 1 {
                        base.clone()
                    } else {
                        format!("{base}-r{r}")
                    }),
                    // Rank r sees what ranks 0..r left: (1 - r f / P) of it.
                    memory_fraction: if cuda.device_memory.is_none() && f > 0.0 {
                        f / (p as f64 - r as f64 * f)
                    } else {
                        f
                    },
                    ..cuda.clone()
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let comms = InProcessGroup::create(devices, GroupConfig::default())?;
        Self::from_comms(cfg, sched, Some(params), comms)
    }

    /// P meta devices made from `meta` (sizes and costs only: no weights).
    pub fn meta(cfg: &ModelConfig, sched: Schedule, meta: &MetaConfig) -> Result<Self> {
        sched.validate(cfg)?;
        let comms = InProcessGroup::meta(sched.ranks, meta, GroupConfig::default())?;
        Self::from_comms(cfg, sched, None, comms)
    }

    fn from_comms(
        cfg: &ModelConfig,
        sched: Schedule,
        params: Option<&[f32]>,
        comms: Vec<InProcessComm>,
    ) -> Result<Self> {
        let ranks = comms
            .into_iter()
            .map(|c| {
                let dev = c.device().clone();
                RankModel::new(cfg, sched, c, dev, params)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(FpdtGroup { ranks })
    }

    /// [`RankModel::set_host_kernels`] on every rank.
    pub fn set_host_kernels(&mut self, on: bool) {
        self.ranks.iter_mut().for_each(|r| r.set_host_kernels(on));
    }

    /// [`RankModel::model_gpu_path`] on every rank.
    pub fn model_gpu_path(&mut self, on: bool) -> Result<()> {
        self.ranks.iter_mut().try_for_each(|r| r.model_gpu_path(on))
    }

    /// The ranks.
    pub fn ranks(&self) -> &[RankModel<InProcessComm>] {
        &self.ranks
    }

    /// Runs `f` on every rank at once, one thread each; the first error wins.
    pub fn on_all<T: Send>(
        &mut self,
        f: impl Fn(&mut RankModel<InProcessComm>) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let results: Vec<Result<T>> = std::thread::scope(|sc| {
            let hs: Vec<_> = self
                .ranks
                .iter_mut()
                .map(|r| {
                    let f = &f;
                    sc.spawn(move || f(r))
                })
                .collect();
            hs.into_iter()
                .enumerate()
                .map(|(rank, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err(ModelError::Rank {
                            rank,
                            message: "the rank's thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// Loads the batch on every rank and runs forward and backward.
    pub fn forward_backward(&mut self, tokens: &[u32], targets: &[i32]) -> Result<()> {
        self.on_all(|r| r.load_batch(tokens, targets))?;
        self.on_all(|r| r.forward_backward())?;
        Ok(())
    }

    /// One training step's loss and gradients (cpu).
    pub fn step(&mut self, tokens: &[u32], targets: &[i32]) -> Result<StepOutput> {
        self.forward_backward(tokens, targets)?;
        let r0 = self
            .ranks
            .first()
            .ok_or_else(|| ModelError::Shape("empty group".into()))?;
        Ok(StepOutput {
            loss: r0.loss()?,
            grads: r0.grads()?,
        })
    }

    /// AdamW on every rank (see [`RankModel::adamw_step`]).
    pub fn adamw_step(&mut self, opt: &AdamW) -> Result<OptimReport> {
        first(self.on_all(|r| r.adamw_step(opt))?)
    }

    /// Zeroes every rank's gradients.
    pub fn zero_grads(&mut self) -> Result<()> {
        self.on_all(|r| r.zero_grads())?;
        Ok(())
    }

    /// Loads a sequence on every rank and accumulates `weight` times its
    /// gradient (see [`RankModel::accumulate`]).
    pub fn accumulate(
        &mut self,
        tokens: &[u32],
        targets: &[i32],
        weight: f32,
    ) -> Result<MicroStats> {
        self.on_all(|r| r.load_batch(tokens, targets))?;
        first(self.on_all(|r| r.accumulate(weight))?)
    }

    /// The sharded optimizer step on every rank (see
    /// [`RankModel::optimizer_step`]).
    pub fn optimizer_step(&mut self, step: &OptimStep) -> Result<OptimReport> {
        first(self.on_all(|r| r.optimizer_step(step))?)
    }

    /// The working weights (rank 0's; all ranks hold the same).
    pub fn params(&self) -> Result<Vec<f32>> {
        self.ranks
            .first()
            .ok_or_else(|| ModelError::Shape("empty group".into()))?
            .params()
    }

    /// The whole optimizer state (the flat layout), gathered from the
    /// ranks' shards.
    pub fn optimizer_state(&self) -> Result<OptimizerState> {
        let mut all = OptimizerState {
            master: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
            steps: 0,
        };
        for r in &self.ranks {
            let (_, sh) = r.optimizer_shard()?;
            all.master.extend(sh.master);
            all.m.extend(sh.m);
            all.v.extend(sh.v);
            all.steps = sh.steps;
        }
        let n = self
            .ranks
            .first()
            .map(|r| r.layout.len())
            .unwrap_or_default();
        all.master.truncate(n);
        all.m.truncate(n);
        all.v.truncate(n);
        Ok(all)
    }

    /// Restores weights and optimizer state on every rank.
    pub fn restore(&mut self, state: &OptimizerState) -> Result<()> {
        self.on_all(|r| r.restore(state))?;
        Ok(())
    }
}

/// `values` as the bytes of `dtype` (rounded to nearest even for bf16).
fn stored(values: &[f32], dtype: Storage) -> Result<Vec<u8>> {
    let mut b = vec![0u8; values.len() * dtype.size()];
    narrow_bytes(values, dtype, &mut b)?;
    Ok(b)
}

/// Rank 0's result of a call on all ranks.
fn first<T>(v: Vec<T>) -> Result<T> {
    v.into_iter()
        .next()
        .ok_or_else(|| ModelError::Shape("empty group".into()))
}
