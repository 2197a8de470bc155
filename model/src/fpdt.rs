//! The FPDT model of one rank, and an in-process group of P ranks.
//!
//! A step: embedding per local chunk; every layer's forward (the FPDT
//! attention block and the chunked MLP block, see [`crate::layers`]); the
//! chunked loss, fused with its backward; every layer's backward in reverse
//! (recomputing the layer's forward from its offloaded input when
//! checkpointing); the embedding's backward; then the all-reduce of the
//! gradients and the loss over the ranks. Parameters are replicated on each
//! rank's device (f32); [`RankModel::adamw_step`] updates them.

use fpdt_comm::GroupConfig;
use fpdt_comm::{Communicator, DType, FpdtLayout, InProcessComm, InProcessGroup, ReduceOp};
use fpdt_ptx::cpu::{adamw_step, AdamW};
use fpdt_runtime::{ChunkMover, CpuConfig, Device, DeviceBuffer, MetaConfig};

use crate::config::{ModelConfig, ParamLayout, Schedule};
use crate::error::{ModelError, Result};
use crate::layers::{block, embedding, fill, loss, Ctx, Stash, F32};
use crate::reference::check_batch;

/// One rank of the FPDT model: its device, its communicator, the working
/// weights, the gradients and the optimizer state.
pub struct RankModel<C: Communicator> {
    cfg: ModelConfig,
    layout: ParamLayout,
    sched: Schedule,
    comm: C,
    dev: Device,
    mover: ChunkMover,
    params: DeviceBuffer,
    grads: DeviceBuffer,
    loss: DeviceBuffer,
    moments: Option<(DeviceBuffer, DeviceBuffer)>,
    batch: Option<(DeviceBuffer, DeviceBuffer, usize)>,
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
        let p = match params {
            Some(w) if w.len() != layout.len() => {
                return Err(ModelError::Shape(format!(
                    "{} initial parameters given, the layout of this config has {}",
                    w.len(),
                    layout.len()
                )))
            }
            Some(w) => dev.upload(w, "params")?,
            None if dev.has_data() => {
                return Err(ModelError::Shape(format!(
                    "the {} device holds data: it needs initial weights",
                    dev.kind()
                )))
            }
            None => dev.alloc(layout.len() * F32, "params")?,
        };
        let grads = dev.alloc(layout.len() * F32, "grads")?;
        let loss = dev.alloc(F32, "loss")?;
        Ok(RankModel {
            cfg: cfg.clone(),
            layout,
            sched,
            mover: ChunkMover::new(&dev),
            comm,
            dev,
            params: p,
            grads,
            loss,
            moments: None,
            batch: None,
        })
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
        let ids = self.dev.upload(&lay.shard(tokens, r)?, "ids")?;
        let labels = self.dev.upload(&lay.shard(targets, r)?, "labels")?;
        self.batch = Some((ids, labels, valid));
        Ok(())
    }

    /// Forward and backward of the loaded sequence: afterwards [`Self::loss`]
    /// and [`Self::grads`] hold the global mean loss and its gradient (the
    /// same on every rank). Call on every rank at once.
    pub fn forward_backward(&mut self) -> Result<()> {
        let r = self.run();
        if let Err(e) = &r {
            self.comm.abort(&e.to_string());
        }
        r
    }

    fn run(&mut self) -> Result<()> {
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
            grads: &self.grads,
        };
        let s = ctx.s();
        fill(s, self.grads.view(), 0.0)?;
        fill(s, self.loss.view(), 0.0)?;
        let (u, c, h) = (
            self.sched.chunks,
            self.sched.local_chunk_tokens(),
            self.cfg.hidden,
        );
        fn rows(
            b: &DeviceBuffer,
            i: usize,
            c: usize,
        ) -> fpdt_runtime::Result<fpdt_runtime::View<'_>> {
            b.elems::<f32>(i * c..(i + 1) * c)
        }
        // Embedding.
        let mut x = Vec::with_capacity(u);
        for i in 0..u {
            let e = ctx.alloc(c * h, "x")?;
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
        let scale = 1.0 / *valid as f32;
        let mut dys = Vec::with_capacity(u);
        for (i, xi) in x.iter().enumerate() {
            let xl = xi.fetch(&self.mover)?;
            let dx = ctx.alloc(c * h, "dx")?;
            loss::forward_backward(
                &ctx,
                xl.view()?,
                rows(labels, i, c)?,
                dx.view(),
                self.loss.view(),
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
            .all_reduce(s, self.grads.view(), DType::F32, ReduceOp::Sum)?;
        self.comm
            .all_reduce(s, self.loss.view(), DType::F32, ReduceOp::Sum)?;
        self.comm.synchronize(s)?;
        self.dev.synchronize()?;
        Ok(())
    }

    /// The mean loss of the last step (cpu: downloaded; meta has no data).
    pub fn loss(&self) -> Result<f64> {
        Ok(f64::from(self.dev.download::<f32>(self.loss.view())?[0]))
    }

    /// The gradients of the last step (the flat layout).
    pub fn grads(&self) -> Result<Vec<f32>> {
        Ok(self.dev.download::<f32>(self.grads.view())?)
    }

    /// The working weights (the flat layout).
    pub fn params(&self) -> Result<Vec<f32>> {
        Ok(self.dev.download::<f32>(self.params.view())?)
    }

    /// One AdamW step (`step` 1-based) on the weights with the gradients of
    /// the last step. The f32 weights are their own master copy here.
    pub fn adamw_step(&mut self, opt: &AdamW, step: u32) -> Result<()> {
        if self.moments.is_none() {
            let n = self.layout.len() * F32;
            let m = self.dev.alloc(n, "adam m")?;
            let v = self.dev.alloc(n, "adam v")?;
            fill(self.dev.compute(), m.view(), 0.0)?;
            fill(self.dev.compute(), v.view(), 0.0)?;
            self.moments = Some((m, v));
        }
        let (m, v) = self
            .moments
            .as_ref()
            .ok_or_else(|| ModelError::Shape("optimizer state missing".into()))?;
        let opt = *opt;
        let n = self.layout.len() as f64;
        crate::layers::kernel(
            self.dev.compute(),
            "adamw",
            10.0 * n,
            &[self.grads.view()],
            &[self.params.view(), m.view(), v.view()],
            move |i, o| {
                let (p, rest) = o.split_at_mut(1);
                let (m, v) = rest.split_at_mut(1);
                let mut working = vec![0.0f32; p[0].len()];
                adamw_step(&opt, step, 1.0, p[0], i[0], m[0], v[0], &mut working)
            },
        )?;
        self.dev.synchronize()?;
        Ok(())
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

    /// AdamW on every rank.
    pub fn adamw_step(&mut self, opt: &AdamW, step: u32) -> Result<()> {
        self.on_all(|r| r.adamw_step(opt, step))?;
        Ok(())
    }
}
