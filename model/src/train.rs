//! The training loop of `fpdt train`, readable top to bottom:
//!
//! 1. [`Trainer::new`] builds P in-process ranks of the FPDT model on cpu
//!    devices, with seeded initial weights (or given ones).
//! 2. [`Trainer::resume`] restores weights, optimizer state, data position,
//!    generator states and the step from a checkpoint.
//! 3. [`Trainer::run`] repeats [`Trainer::step`]: `grad_accum` sequences
//!    (each a forward and backward on every rank, weighted `1/grad_accum`),
//!    then one sharded AdamW step at the scheduled learning rate with the
//!    gradient clipped to its global norm. A step whose loss or gradient
//!    norm is not finite changes nothing and is reported; too many in a row
//!    stop the run with the last good checkpoint intact. Every step writes a
//!    JSON line of metrics; every `eval_every` steps the validation loss and
//!    accuracy are measured; every `ckpt_every` steps a checkpoint is saved.
//!    One step is traced (Chrome trace), and the loss curve is drawn at the
//!    end (see [`crate::plot`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use fpdt_ptx::cpu::AdamW;
use fpdt_runtime::{CpuConfig, CudaConfig, Space};
use serde::Serialize;

use crate::checkpoint::{self, config_fields, Checkpoint, Tensor, TrainState};
use crate::config::{ModelConfig, Schedule};
use crate::data::{PackedLoader, Sample, TokenDataset};
use crate::error::{ModelError, Result};
use crate::fpdt::{FpdtGroup, OptimStep, OptimizerState};
use crate::passkey::{PasskeyGen, PasskeyTask};

/// The learning rate after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrShape {
    /// Cosine from the peak to the minimum at the last step.
    Cosine,
    /// Linear from the peak to the minimum.
    Linear,
    /// The peak throughout.
    Constant,
}

/// How the loop runs (the trainer's flags, checked by the CLI).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Optimizer steps in all (a resumed run continues to this number).
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the decay.
    pub min_lr: f64,
    /// Warmup steps (linear from `lr / warmup`).
    pub warmup: u64,
    /// Decay after warmup.
    pub shape: LrShape,
    /// AdamW's betas, epsilon and weight decay (its `lr` is ignored).
    pub adamw: AdamW,
    /// Sequences per optimizer step.
    pub grad_accum: u64,
    /// Global gradient-norm clip (0: none).
    pub clip: f64,
    /// Checkpoint every N steps (0: only at the end).
    pub ckpt_every: u64,
    /// Checkpoints kept.
    pub keep: usize,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: u64,
    /// Sequences per evaluation.
    pub eval_batches: usize,
    /// Non-finite steps in a row that stop the run.
    pub max_bad_steps: u32,
    /// Seed of the weights and of the data order.
    pub seed: u64,
    /// Standard deviation of the initial weights.
    pub init_std: f64,
    /// Run directory (checkpoints, trace, loss curve).
    pub out: PathBuf,
    /// Metrics file, one JSON line per step.
    pub metrics: PathBuf,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Print a line every N steps when there is no bar (0: never).
    pub log_every: u64,
    /// The step (1-based) whose Chrome trace is written to `out/trace.json`.
    pub trace_step: Option<u64>,
    /// Fault injection for tests: steps (1-based) whose loss is replaced by
    /// NaN before the finite check, as a diverging run would produce.
    pub poison_steps: Vec<u64>,
    /// Sequence-length warmup: these stages first, in order, then the
    /// schedule's own length for the remaining steps (empty: none).
    pub seq_stages: Vec<SeqStage>,
}

/// A stage of the sequence-length warmup (DeepSpeed's "curriculum
/// learning" by sequence length): `steps` optimizer steps on sequences of
/// `seq_len` tokens, in as many chunks over as many ranks as the full
/// schedule. Short sequences first let attention find what it must attend
/// to before the softmax is spread over thousands of positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SeqStage {
    /// Tokens per sequence in this stage.
    pub seq_len: usize,
    /// Optimizer steps of this stage.
    pub steps: u64,
}

impl TrainOptions {
    /// The learning rate of step `step` (1-based): linear warmup to `lr`
    /// over `warmup` steps, then the decay to `min_lr` at `steps`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup > 0 && step <= self.warmup {
            return self.lr * step as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup.min(step)) as f64 / span).clamp(0.0, 1.0);
        let f = match self.shape {
            LrShape::Constant => return self.lr,
            LrShape::Linear => 1.0 - t,
            LrShape::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
        };
        self.min_lr + (self.lr - self.min_lr) * f
    }

    /// The sequence length of step `step` (1-based): that of its warmup
    /// stage, else `full`.
    pub fn seq_len_at(&self, step: u64, full: usize) -> usize {
        let mut end = 0;
        for st in &self.seq_stages {
            end += st.steps;
            if step <= end {
                return st.seq_len;
            }
        }
        full
    }

    /// The first step at the full sequence length.
    pub fn full_length_from(&self) -> u64 {
        self.seq_stages.iter().map(|s| s.steps).sum::<u64>() + 1
    }

    /// True when `step` is the last step of a warmup stage.
    pub fn ends_stage(&self, step: u64) -> bool {
        let mut end = 0;
        self.seq_stages.iter().any(|st| {
            end += st.steps;
            step == end
        })
    }
}

/// Where training sequences come from.
pub enum Source {
    /// The built-in passkey task: a fresh sample each time; evaluation on a
    /// fixed set drawn from another seed.
    Passkey {
        /// The training stream.
        train: PasskeyGen,
        /// The task.
        task: PasskeyTask,
    },
    /// Token files packed to the sequence length.
    Tokens {
        /// The training loader (seeded order).
        train: PackedLoader,
        /// Validation data and its range (in order, from its start).
        val: Option<(Arc<TokenDataset>, Range<usize>)>,
    },
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Passkey { task, .. } => write!(f, "Passkey({task:?})"),
            Source::Tokens { val, .. } => write!(f, "Tokens(validation: {})", val.is_some()),
        }
    }
}

impl Source {
    /// The next training sequence, `seq_len` tokens long: the passkey task
    /// made at that length; a token window cut to its first `seq_len`
    /// tokens (a warmup stage reads as many windows as a full run would).
    fn next(&mut self, seq_len: usize) -> Result<Sample> {
        Ok(match self {
            Source::Passkey { train, task } => {
                let t = task.with_seq_len(seq_len)?;
                train.next_sample_of(&t).sample
            }
            Source::Tokens { train, .. } => {
                let mut s = train.next_sample();
                s.tokens.truncate(seq_len);
                s.labels.truncate(seq_len);
                s
            }
        })
    }
}

/// Seed of the passkey evaluation set (fixed, apart from training's).
const EVAL_SEED_MIX: u64 = 0xE7A1_5EED_0000_0001;

/// One evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalResult {
    /// Mean loss over the evaluation sequences (passkey: over the first
    /// answer's digits, the retrieval).
    pub loss: f64,
    /// Share of counted targets predicted (argmax); for the passkey task,
    /// the share of key digits retrieved (first answer only).
    pub accuracy: f64,
    /// Tokens per evaluation sequence (the step's warmup stage).
    pub seq_len: usize,
}

/// The JSON line of one step.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// Steps done (1-based).
    pub step: u64,
    /// Mean training loss of the step's sequences.
    pub loss: f64,
    /// Argmax accuracy on the step's counted targets (passkey: every
    /// answer digit, the repeats included).
    pub accuracy: f64,
    /// Tokens per sequence of this step (its warmup stage).
    pub seq_len: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Clip factor applied (1: none).
    pub clip_scale: f64,
    /// True when the step changed nothing (non-finite loss or norm).
    pub skipped: bool,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Tokens per second of this step.
    pub tokens_per_s: f64,
    /// Model FLOP utilisation of this step against `peak_flops`.
    pub mfu: f64,
    /// Wall time of the step, ms.
    pub step_ms: f64,
    /// Peak device memory of a rank so far, bytes.
    pub device_peak: usize,
    /// Peak host (arena) memory of a rank so far, bytes.
    pub host_peak: usize,
    /// Evaluation at this step, when one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalResult>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Steps done.
    pub steps: u64,
    /// Mean loss of the first and last steps of this run.
    pub first_loss: f64,
    /// See `first_loss`.
    pub last_loss: f64,
    /// The evaluations of this run (step, result).
    pub evals: Vec<(u64, EvalResult)>,
    /// Steps skipped as non-finite.
    pub skipped: u64,
    /// Wall time of the loop, seconds.
    pub seconds: f64,
    /// Mean tokens per second.
    pub tokens_per_s: f64,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// The loss curve, when drawn.
    pub plot: Option<PathBuf>,
    /// The Chrome trace, when written.
    pub trace: Option<PathBuf>,
}

/// The trainer: P ranks, the data, the options and where the run stands.
pub struct Trainer {
    cfg: ModelConfig,
    /// The schedule of the full sequence length.
    full: Schedule,
    /// The schedule `group` runs: `full`, or a warmup stage's.
    sched: Schedule,
    device: TrainDevice,
    group: FpdtGroup,
    /// Peak device and host memory of the groups of earlier stages.
    earlier_peaks: (usize, usize),
    source: Source,
    opts: TrainOptions,
    step: u64,
    tokens_seen: u64,
    bad_in_row: u32,
    /// (step, training loss) of every step done, resumed runs included.
    history: Vec<(u64, f64)>,
    /// (step, validation loss, accuracy).
    eval_history: Vec<(u64, f64, f64)>,
    peak_flops: f64,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Trainer(step {}, {:?}, {:?})",
            self.step, self.sched, self.source
        )
    }
}

/// The f32 matrix-product rate of this machine, FLOP/s: the peak the cpu
/// device's MFU is measured against (a 256^3 product, best of 5).
pub fn measured_cpu_peak() -> f64 {
    let n = 256;
    let a = vec![1.0f32; n * n];
    let b = vec![0.5f32; n * n];
    let mut c = vec![0.0f32; n * n];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let spec = fpdt_ptx::cpu::MatmulSpec {
            m: n,
            n,
            k: n,
            trans_a: fpdt_ptx::cpu::Transpose::No,
            trans_b: fpdt_ptx::cpu::Transpose::No,
            accumulate: false,
        };
        if fpdt_ptx::cpu::matmul(&spec, &a, &b, None, &mut c).is_err() {
            return f64::NAN;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best.max(1e-9)
}

/// Where the trainer's ranks run.
#[derive(Debug, Clone)]
pub enum TrainDevice {
    /// P cpu devices made from this config.
    Cpu(CpuConfig),
    /// P cuda devices sharing the GPU of this config ([`FpdtGroup::cuda`]).
    Cuda(CudaConfig),
}

impl Trainer {
    /// P ranks of `cfg` under `sched` on `device`, with `weights` (the flat
    /// layout) or seeded ones.
    pub fn new(
        cfg: &ModelConfig,
        sched: Schedule,
        device: &TrainDevice,
        source: Source,
        opts: TrainOptions,
        weights: Option<Vec<f32>>,
    ) -> Result<Trainer> {
        let w = match weights {
            Some(w) => w,
            None => cfg.layout().init(opts.seed, opts.init_std),
        };
        let first = Schedule {
            seq_len: opts.seq_len_at(1, sched.seq_len),
            ..sched
        };
        let group = build_group(cfg, first, device, &w)?;
        Ok(Trainer {
            cfg: cfg.clone(),
            full: sched,
            sched: first,
            device: device.clone(),
            group,
            earlier_peaks: (0, 0),
            source,
            opts,
            step: 0,
            tokens_seen: 0,
            bad_in_row: 0,
            history: Vec::new(),
            eval_history: Vec::new(),
            peak_flops: measured_cpu_peak(),
        })
    }

    /// Steps done.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The model's ranks.
    pub fn group(&self) -> &FpdtGroup {
        &self.group
    }

    /// Continues from `ck` (checked against this config when loaded).
    pub fn resume(&mut self, ck: &Checkpoint) -> Result<()> {
        let layout = self.cfg.layout();
        let what = ck.dir.display().to_string();
        let master = checkpoint::flat_from_tensors(&layout, &ck.weights, "", &what)?;
        let m = checkpoint::flat_from_tensors(&layout, &ck.optimizer, "exp_avg.", &what)?;
        let v = checkpoint::flat_from_tensors(&layout, &ck.optimizer, "exp_avg_sq.", &what)?;
        let adam_steps = ck
            .state
            .extra
            .get("adam_steps")
            .and_then(|x| x.as_u64())
            .unwrap_or(ck.state.step) as u32;
        self.group.restore(&OptimizerState {
            master,
            m,
            v,
            steps: adam_steps,
        })?;
        match (&mut self.source, &ck.state.data) {
            (Source::Tokens { train, .. }, Some(pos)) => train.restore(*pos)?,
            (Source::Tokens { .. }, None) => {
                return Err(ModelError::Checkpoint(format!(
                    "{what}: the checkpoint was trained on the passkey task, this run reads \
                     --data: resume with the same data source"
                )))
            }
            (Source::Passkey { train, .. }, None) => {
                let s = ck.state.rng.get("passkey").copied().ok_or_else(|| {
                    ModelError::Checkpoint(format!(
                        "{what}: state.json has no `passkey` generator state"
                    ))
                })?;
                train.restore(s);
            }
            (Source::Passkey { .. }, Some(_)) => {
                return Err(ModelError::Checkpoint(format!(
                    "{what}: the checkpoint was trained on token data, this run is the passkey \
                     task: pass the same --data"
                )))
            }
        }
        self.step = ck.state.step;
        self.tokens_seen = ck.state.tokens_seen;
        self.bad_in_row = ck
            .state
            .extra
            .get("bad_in_row")
            .and_then(|x| x.as_u64())
            .unwrap_or(0) as u32;
        self.history = ck
            .state
            .extra
            .get("loss_history")
            .and_then(|x| serde_json::from_value(x.clone()).ok())
            .unwrap_or_default();
        self.eval_history = ck
            .state
            .extra
            .get("eval_history")
            .and_then(|x| serde_json::from_value(x.clone()).ok())
            .unwrap_or_default();
        Ok(())
    }

    /// Runs step `step` on the schedule of its warmup stage: when that is
    /// not the group's, a new group is built and given the optimizer state
    /// (fp32 master weights and moments, exactly), as a resume would.
    fn enter_stage(&mut self, step: u64) -> Result<()> {
        let want = Schedule {
            seq_len: self.opts.seq_len_at(step, self.full.seq_len),
            ..self.full
        };
        if want == self.sched {
            return Ok(());
        }
        let state = self.group.optimizer_state()?;
        let mut group = build_group(&self.cfg, want, &self.device, &state.master)?;
        group.restore(&state)?;
        self.earlier_peaks = self.peaks();
        self.group = group;
        self.sched = want;
        Ok(())
    }

    fn peaks(&self) -> (usize, usize) {
        let (mut d, mut h) = self.earlier_peaks;
        for r in self.group.ranks() {
            let l = r.device().ledger();
            d = d.max(l.usage(Space::Device).peak);
            h = h.max(l.usage(Space::Host).peak);
        }
        (d, h)
    }

    /// One optimizer step: `grad_accum` sequences, then AdamW.
    pub fn step(&mut self) -> Result<StepRecord> {
        let t0 = Instant::now();
        let step = self.step + 1;
        let a = self.opts.grad_accum.max(1);
        let weight = 1.0 / a as f32;
        let (mut loss, mut targets, mut correct) = (0.0, 0usize, 0usize);
        self.enter_stage(step)?;
        for _ in 0..a {
            let s = self.source.next(self.sched.seq_len)?;
            let st = self.group.accumulate(&s.tokens, &s.labels, weight)?;
            loss += st.loss / a as f64;
            targets += st.targets;
            correct += st.correct;
        }
        if self.opts.poison_steps.contains(&step) {
            loss = f64::NAN;
        }
        let lr = self.opts.lr_at(step);
        let (grad_norm, clip_scale, skipped) = if loss.is_finite() {
            let rep = self.group.optimizer_step(&OptimStep {
                adamw: AdamW {
                    lr: lr as f32,
                    ..self.opts.adamw
                },
                clip: self.opts.clip,
            })?;
            (rep.grad_norm, rep.clip_scale, rep.skipped)
        } else {
            self.group.zero_grads()?;
            (f64::NAN, 1.0, true)
        };
        let tokens = a * self.sched.seq_len as u64;
        self.step = step;
        if skipped {
            self.bad_in_row += 1;
        } else {
            self.bad_in_row = 0;
            self.tokens_seen += tokens;
            self.history.push((step, loss));
        }
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        let flops = self.cfg.flops_per_token(self.sched.seq_len) * tokens as f64;
        let (device_peak, host_peak) = self.peaks();
        Ok(StepRecord {
            step,
            loss,
            accuracy: if targets == 0 {
                0.0
            } else {
                correct as f64 / targets as f64
            },
            seq_len: self.sched.seq_len,
            lr,
            grad_norm,
            clip_scale,
            skipped,
            tokens: self.tokens_seen,
            tokens_per_s: tokens as f64 / secs,
            mfu: flops / secs / self.peak_flops,
            step_ms: secs * 1e3,
            device_peak,
            host_peak,
            eval: None,
        })
    }

    /// Validation loss and accuracy over `eval_batches` sequences (the same
    /// ones each time). The gradients of the passes are discarded.
    pub fn evaluate(&mut self) -> Result<EvalResult> {
        let n = self.opts.eval_batches.max(1);
        let samples: Vec<Sample> = match &self.source {
            Source::Passkey { task, .. } => {
                let t = task.with_seq_len(self.sched.seq_len)?;
                let mut g = PasskeyGen::new(t, self.opts.seed ^ EVAL_SEED_MIX);
                (0..n).map(|_| g.next_sample().retrieval()).collect()
            }
            Source::Tokens {
                val: Some((d, r)), ..
            } => {
                let mut l = PackedLoader::new(d.clone(), r.clone(), self.sched.seq_len, 0, false)?;
                (0..n.min(l.windows())).map(|_| l.next_sample()).collect()
            }
            Source::Tokens { val: None, .. } => {
                return Err(ModelError::Data(
                    "no validation data: give --val-data or a positive --val-fraction".into(),
                ))
            }
        };
        let (mut loss, mut targets, mut correct) = (0.0, 0, 0);
        for s in &samples {
            self.group.zero_grads()?;
            let st = self.group.accumulate(&s.tokens, &s.labels, 1.0)?;
            loss += st.loss / samples.len() as f64;
            targets += st.targets;
            correct += st.correct;
        }
        self.group.zero_grads()?;
        let r = EvalResult {
            loss,
            accuracy: if targets == 0 {
                0.0
            } else {
                correct as f64 / targets as f64
            },
            seq_len: self.sched.seq_len,
        };
        self.eval_history.push((self.step, r.loss, r.accuracy));
        Ok(r)
    }

    /// The training state at this step (what a checkpoint's JSON holds).
    fn state(&self, adam_steps: u32) -> Result<TrainState> {
        let mut st = TrainState::new(self.step, config_fields(&self.cfg));
        st.tokens_seen = self.tokens_seen;
        match &self.source {
            Source::Passkey { train, .. } => {
                st.rng.insert("passkey".into(), train.state());
            }
            Source::Tokens { train, .. } => st.data = Some(train.position()),
        }
        let mut extra = BTreeMap::new();
        extra.insert("adam_steps".into(), serde_json::Value::from(adam_steps));
        extra.insert(
            "bad_in_row".into(),
            serde_json::Value::from(self.bad_in_row),
        );
        extra.insert("loss_history".into(), to_json(&self.history)?);
        extra.insert("eval_history".into(), to_json(&self.eval_history)?);
        extra.insert("seed".into(), serde_json::Value::from(self.opts.seed));
        st.extra = extra;
        Ok(st)
    }

    /// Saves a checkpoint of this step in the run directory.
    pub fn save(&self) -> Result<PathBuf> {
        let layout = self.cfg.layout();
        let os = self.group.optimizer_state()?;
        let weights = checkpoint::tensors_from_flat(&layout, &os.master, "")?;
        let mut opt: Vec<Tensor> = checkpoint::tensors_from_flat(&layout, &os.m, "exp_avg.")?;
        opt.extend(checkpoint::tensors_from_flat(
            &layout,
            &os.v,
            "exp_avg_sq.",
        )?);
        checkpoint::save(
            &self.opts.out,
            &self.state(os.steps)?,
            &weights,
            &opt,
            self.opts.keep,
        )
    }

    /// Writes the Chrome trace of what the ranks' devices recorded.
    fn write_trace(&self, path: &Path) -> Result<()> {
        let traces: Vec<&fpdt_runtime::Trace> = self
            .group
            .ranks()
            .iter()
            .map(|r| r.device().trace())
            .collect();
        fpdt_runtime::trace::write_chrome_trace(&traces, path)?;
        Ok(())
    }

    fn set_tracing(&self, on: bool) {
        for r in self.group.ranks() {
            let t = r.device().trace();
            t.clear();
            t.set_enabled(on);
        }
    }

    /// Trains to `opts.steps`, reporting each step to `on_step` (the CLI's
    /// progress bar). Stops with an error after `max_bad_steps` non-finite
    /// steps in a row, leaving the last good checkpoint as it was.
    pub fn run(&mut self, on_step: &mut dyn FnMut(&StepRecord)) -> Result<Summary> {
        let start = Instant::now();
        let metrics = self.open_metrics()?;
        let mut metrics = std::io::BufWriter::new(metrics);
        let (mut first, mut last, mut skipped, mut tokens) = (f64::NAN, f64::NAN, 0, 0u64);
        let mut evals = Vec::new();
        let mut ckpt = None;
        let mut trace = None;
        let begin = self.step;
        while self.step < self.opts.steps {
            let n = self.step + 1;
            // Before tracing starts, so the trace is of the stage's group
            // (step() then finds the stage entered).
            self.enter_stage(n)?;
            let traced = self.opts.trace_step == Some(n);
            if traced {
                self.set_tracing(true);
            }
            let mut rec = self.step()?;
            if traced {
                let p = self.opts.out.join("trace.json");
                self.write_trace(&p)?;
                self.set_tracing(false);
                trace = Some(p);
            }
            if rec.skipped {
                skipped += 1;
            } else {
                tokens += self.opts.grad_accum * rec.seq_len as u64;
                if first.is_nan() {
                    first = rec.loss;
                }
                last = rec.loss;
            }
            let done = self.step == self.opts.steps;
            let at = self.step;
            let every = |k: u64| k > 0 && at % k == 0;
            if every(self.opts.eval_every) || done || self.opts.ends_stage(at) {
                let e = self.evaluate()?;
                evals.push((self.step, e));
                rec.eval = Some(e);
            }
            let line = serde_json::to_string(&rec).map_err(|e| ModelError::Json {
                what: "a metrics line".into(),
                source: e,
            })?;
            writeln!(metrics, "{line}")
                .and_then(|_| metrics.flush())
                .map_err(|e| ModelError::Io {
                    what: format!("writing `{}`", self.opts.metrics.display()),
                    source: e,
                })?;
            on_step(&rec);
            if self.bad_in_row >= self.opts.max_bad_steps {
                let last_good = checkpoint::latest(&self.opts.out)?;
                return Err(ModelError::Training(format!(
                    "stopped at step {}: {} steps in a row had a non-finite loss or gradient \
                     norm (--max-bad-steps {}); {}: lower --lr or raise --clip's strictness",
                    self.step,
                    self.bad_in_row,
                    self.opts.max_bad_steps,
                    match last_good {
                        Some(p) => format!("the last good checkpoint is `{}`", p.display()),
                        None => "no checkpoint was written yet".into(),
                    }
                )));
            }
            if (every(self.opts.ckpt_every) || done) && !rec.skipped {
                ckpt = Some(self.save()?);
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        let plot = if self.history.len() >= 2 {
            let p = self.opts.out.join("loss.png");
            crate::plot::loss_curve(&p, &self.history, &self.eval_history)?;
            Some(p)
        } else {
            None
        };
        Ok(Summary {
            steps: self.step - begin,
            first_loss: first,
            last_loss: last,
            evals,
            skipped,
            seconds,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
            checkpoint: ckpt,
            plot,
            trace,
        })
    }

    /// The metrics file: new for a fresh run; for a resumed one, the lines
    /// up to the resumed step kept (a crashed run's later lines dropped).
    fn open_metrics(&self) -> Result<std::fs::File> {
        let p = &self.opts.metrics;
        let io = |e: std::io::Error| ModelError::Io {
            what: format!("metrics file `{}`", p.display()),
            source: e,
        };
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let kept = if self.step > 0 {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s <= self.step)
                })
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        } else {
            String::new()
        };
        let mut f = std::fs::File::create(p).map_err(io)?;
        f.write_all(kept.as_bytes()).map_err(io)?;
        Ok(f)
    }
}

/// P ranks of `cfg` under `sched` on `device` with weights `w`.
fn build_group(
    cfg: &ModelConfig,
    sched: Schedule,
    device: &TrainDevice,
    w: &[f32],
) -> Result<FpdtGroup> {
    match device {
        TrainDevice::Cpu(cpu) => FpdtGroup::cpu(cfg, sched, w, cpu),
        TrainDevice::Cuda(cuda) => FpdtGroup::cuda(cfg, sched, w, cuda),
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| ModelError::Json {
        what: "the training state".into(),
        source: e,
    })
}
