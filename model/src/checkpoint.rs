//! Checkpoints that a crash cannot tear.
//!
//! A run directory holds one directory per checkpoint and a pointer to the
//! newest:
//!
//! ```text
//! RUN/latest                        "step-00000100"
//! RUN/step-00000100/model.safetensors      weights, named as ParamLayout names them
//! RUN/step-00000100/optimizer.safetensors  fp32 master weights and AdamW moments
//! RUN/step-00000100/state.json             step, config fields, data position, RNG states
//! ```
//!
//! A save writes the three files into a temporary directory beside them,
//! fsyncs each file and the directory, renames the directory into place,
//! fsyncs the run directory, then replaces `latest` the same way (temporary
//! file, fsync, rename, fsync). A crash at any point leaves `latest`
//! naming a complete checkpoint: the previous one until the final rename,
//! the new one after it. Leftover temporary directories are ignored by
//! loads and removed by the next save.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, ParamLayout};
use crate::data::DataPosition;
use crate::error::{ModelError, Result};

/// The weights file in a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// The optimizer state file.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The training state file.
pub const STATE_FILE: &str = "state.json";
/// The pointer to the newest checkpoint in a run directory.
pub const LATEST_FILE: &str = "latest";
/// `state.json`'s `format`.
pub const FORMAT: &str = "fpdt-checkpoint/1";

const TMP_PREFIX: &str = ".tmp-";

/// One named tensor: dtype, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Name (e.g. `layers.0.attn.q.weight`).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// The elements, little-endian.
    pub data: Vec<u8>,
}

impl Tensor {
    /// An f32 tensor.
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Tensor {
        Tensor {
            name: name.into(),
            dtype: Dtype::F32,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The elements as f32 (F32 tensors only).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        if self.dtype != Dtype::F32 {
            return Err(ModelError::Checkpoint(format!(
                "tensor `{}` is {:?}, expected F32",
                self.name, self.dtype
            )));
        }
        Ok(self
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

impl safetensors::View for &Tensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The small JSON beside the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// [`FORMAT`].
    pub format: String,
    /// Optimizer steps done.
    pub step: u64,
    /// Tokens trained on.
    pub tokens_seen: u64,
    /// The fields a resume must match (see [`config_fields`]).
    pub config: BTreeMap<String, String>,
    /// Where the data loader is (None for the synthetic task).
    pub data: Option<DataPosition>,
    /// Named generator states (e.g. `passkey`).
    pub rng: BTreeMap<String, u64>,
    /// Anything else the trainer keeps (loss history, schedule).
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl TrainState {
    /// A state at `step` for `config`.
    pub fn new(step: u64, config: BTreeMap<String, String>) -> TrainState {
        TrainState {
            format: FORMAT.into(),
            step,
            tokens_seen: 0,
            config,
            data: None,
            rng: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }
}

/// The fields of a model config a checkpoint must match, by name.
pub fn config_fields(cfg: &ModelConfig) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    put("family", format!("{:?}", cfg.family));
    put("vocab_size", cfg.vocab_size.to_string());
    put("hidden", cfg.hidden.to_string());
    put("layers", cfg.layers.to_string());
    put("heads", cfg.heads.to_string());
    put("kv_heads", cfg.kv_heads.to_string());
    put("head_dim", cfg.head_dim.to_string());
    put("intermediate", cfg.intermediate.to_string());
    put("rope_theta", cfg.rope_theta.to_string());
    put("norm_eps", cfg.norm_eps.to_string());
    put("norm", format!("{:?}", cfg.norm));
    put("activation", format!("{:?}", cfg.activation));
    put("bias", cfg.bias.to_string());
    put("tie_embeddings", cfg.tie_embeddings.to_string());
    m
}

/// One tensor per layout entry, from the flat buffer `flat`, names
/// prefixed by `prefix` (e.g. `exp_avg.`; empty for weights).
pub fn tensors_from_flat(layout: &ParamLayout, flat: &[f32], prefix: &str) -> Result<Vec<Tensor>> {
    if flat.len() < layout.len() {
        return Err(ModelError::Shape(format!(
            "flat buffer of {} elements, the layout needs {}",
            flat.len(),
            layout.len()
        )));
    }
    Ok(layout
        .entries()
        .iter()
        .map(|e| {
            Tensor::f32(
                format!("{prefix}{}", e.name),
                e.shape.clone(),
                &flat[e.range()],
            )
        })
        .collect())
}

/// The flat buffer from `tensors` named as the layout's entries (with
/// `prefix`); every entry must be present with its shape. `what` names the
/// file in errors.
pub fn flat_from_tensors(
    layout: &ParamLayout,
    tensors: &[Tensor],
    prefix: &str,
    what: &str,
) -> Result<Vec<f32>> {
    let by_name: HashMap<&str, &Tensor> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut flat = vec![0f32; layout.len()];
    for e in layout.entries() {
        let name = format!("{prefix}{}", e.name);
        let t = by_name.get(name.as_str()).ok_or_else(|| {
            ModelError::Checkpoint(format!(
                "{what}: tensor `{name}` is missing: the checkpoint is from another model config"
            ))
        })?;
        if t.shape != e.shape {
            return Err(ModelError::Checkpoint(format!(
                "{what}: tensor `{name}` has shape {:?}, this config needs {:?}: the checkpoint \
                 is from another model config",
                t.shape, e.shape
            )));
        }
        let v = t.to_f32()?;
        flat[e.range()].copy_from_slice(&v);
    }
    Ok(flat)
}

/// A loaded checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// The training state.
    pub state: TrainState,
    /// The weights.
    pub weights: Vec<Tensor>,
    /// The optimizer state.
    pub optimizer: Vec<Tensor>,
}

/// The points of a save, for tests of crashes (see [`save_with_hook`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveStage {
    /// The weights file is written (not yet fsynced) in the temporary directory.
    ModelWritten,
    /// All three files are written and fsynced in the temporary directory.
    FilesSynced,
    /// The temporary directory was renamed into place; `latest` still
    /// names the previous checkpoint.
    Renamed,
    /// The new pointer is written and fsynced under a temporary name.
    PointerSynced,
    /// `latest` names the new checkpoint.
    Done,
}

/// The directory name of the checkpoint at `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> ModelError {
    move |e| ModelError::Checkpoint(format!("{what}: {e}"))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("fsync of directory `{}`", dir.display())))
}

fn write_safetensors(path: &Path, tensors: &[Tensor], kind: &str) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("fpdt".to_string(), kind.to_string());
    let items: Vec<(&str, &Tensor)> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    safetensors::serialize_to_file(items, Some(meta), path)
        .map_err(|e| ModelError::Checkpoint(format!("writing `{}`: {e}", path.display())))
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("fsync of `{}`", path.display())))
}

/// Checks that `dir` can hold checkpoints: creates it and a probe file.
/// The error names the directory and what to do.
pub fn check_writable(dir: &Path) -> Result<()> {
    let fail = |e: std::io::Error| {
        ModelError::Checkpoint(format!(
            "output directory `{}` is not writable ({e}): choose another --out",
            dir.display()
        ))
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(format!("{TMP_PREFIX}probe-{}", std::process::id()));
    File::create(&probe)
        .and_then(|mut f| f.write_all(b"probe"))
        .map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)
}

/// Saves a checkpoint into `run_dir` and points `latest` at it; keeps the
/// newest `keep` checkpoints (at least 1), removing older ones and stale
/// temporary directories. Returns the checkpoint's directory.
pub fn save(
    run_dir: &Path,
    state: &TrainState,
    weights: &[Tensor],
    optimizer: &[Tensor],
    keep: usize,
) -> Result<PathBuf> {
    save_with_hook(run_dir, state, weights, optimizer, keep, &mut |_| Ok(()))
}

/// [`save`], calling `hook` at each [`SaveStage`]; an error from the hook
/// stops the save there (as a crash would, but leaving the files as they
/// are for inspection).
pub fn save_with_hook(
    run_dir: &Path,
    state: &TrainState,
    weights: &[Tensor],
    optimizer: &[Tensor],
    keep: usize,
    hook: &mut dyn FnMut(SaveStage) -> Result<()>,
) -> Result<PathBuf> {
    check_writable(run_dir)?;
    let name = step_dir_name(state.step);
    let tmp = run_dir.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(format!("removing `{}`", tmp.display())))?;
    }
    std::fs::create_dir(&tmp).map_err(io(format!("creating `{}`", tmp.display())))?;

    write_safetensors(&tmp.join(MODEL_FILE), weights, "weights")?;
    hook(SaveStage::ModelWritten)?;
    write_safetensors(&tmp.join(OPTIMIZER_FILE), optimizer, "optimizer")?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| ModelError::Json {
        what: "serializing the training state".into(),
        source: e,
    })?;
    std::fs::write(tmp.join(STATE_FILE), json)
        .map_err(io(format!("writing `{}`", tmp.join(STATE_FILE).display())))?;
    for f in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
        sync_file(&tmp.join(f))?;
    }
    sync_dir(&tmp)?;
    hook(SaveStage::FilesSynced)?;

    // A checkpoint of the same step already there (a rerun from an earlier
    // one) stays until pruned: the new one takes the next free suffix.
    let mut name = name;
    let mut n = 1;
    while run_dir.join(&name).exists() {
        name = format!("{}-{n}", step_dir_name(state.step));
        n += 1;
    }
    let dest = run_dir.join(&name);
    std::fs::rename(&tmp, &dest).map_err(io(format!(
        "renaming `{}` to `{}`",
        tmp.display(),
        dest.display()
    )))?;
    sync_dir(run_dir)?;
    hook(SaveStage::Renamed)?;

    write_pointer(run_dir, &name, hook)?;
    hook(SaveStage::Done)?;
    prune(run_dir, keep.max(1), &name);
    Ok(dest)
}

fn write_pointer(
    run_dir: &Path,
    name: &str,
    hook: &mut dyn FnMut(SaveStage) -> Result<()>,
) -> Result<()> {
    let ptr = run_dir.join(LATEST_FILE);
    let tmp = run_dir.join(format!("{TMP_PREFIX}{LATEST_FILE}-{}", std::process::id()));
    {
        let mut f = File::create(&tmp).map_err(io(format!("writing `{}`", tmp.display())))?;
        f.write_all(format!("{name}\n").as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io(format!("writing `{}`", tmp.display())))?;
    }
    hook(SaveStage::PointerSynced)?;
    std::fs::rename(&tmp, &ptr).map_err(io(format!("renaming `{}`", tmp.display())))?;
    sync_dir(run_dir)
}

/// Removes temporary leftovers and all but the newest `keep` checkpoints
/// (never `current`). Best effort: a failure to remove is not an error.
fn prune(run_dir: &Path, keep: usize, current: &str) {
    let Ok(rd) = std::fs::read_dir(run_dir) else {
        return;
    };
    let mut steps = Vec::new();
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(TMP_PREFIX) {
            let p = e.path();
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(&p);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        } else if let Some(key) = step_key(&n) {
            steps.push((key, n));
        }
    }
    steps.sort();
    let n = steps.len();
    for (i, (_, name)) in steps.into_iter().enumerate() {
        if i + keep < n && name != current {
            let _ = std::fs::remove_dir_all(run_dir.join(name));
        }
    }
}

/// `(step, suffix)` of a checkpoint directory name `step-N` or `step-N-k`.
fn step_key(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("step-")?;
    match rest.split_once('-') {
        Some((s, k)) => Some((s.parse().ok()?, k.parse().ok()?)),
        None => Some((rest.parse().ok()?, 0)),
    }
}

fn latest_name(run_dir: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(run_dir.join(LATEST_FILE)) {
        Ok(s) => {
            let s = s.trim().to_string();
            Ok(if s.is_empty() { None } else { Some(s) })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::Checkpoint(format!(
            "reading `{}`: {e}",
            run_dir.join(LATEST_FILE).display()
        ))),
    }
}

/// The newest checkpoint of `run_dir` (the one `latest` names), if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(latest_name(run_dir)?.map(|n| run_dir.join(n)))
}

/// Resolves `path`: a checkpoint directory (holding `state.json`) or a run
/// directory (its `latest`).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        return Err(ModelError::Checkpoint(format!(
            "checkpoint `{}` not found: pass a run directory (with `{LATEST_FILE}`) or a \
             checkpoint directory (with `{STATE_FILE}`) to --resume",
            path.display()
        )));
    }
    match latest(path)? {
        Some(p) => Ok(p),
        None => Err(ModelError::Checkpoint(format!(
            "`{}` holds no checkpoint (no `{LATEST_FILE}` and no `{STATE_FILE}`): pass a run \
             directory that has saved one, or start without --resume",
            path.display()
        ))),
    }
}

fn read_safetensors(path: &Path) -> Result<Vec<Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| {
        ModelError::Checkpoint(format!(
            "checkpoint file `{}` cannot be read ({e}): the checkpoint is incomplete; resume from \
             another one",
            path.display()
        ))
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        ModelError::Checkpoint(format!(
            "checkpoint file `{}` is damaged ({e}): resume from another checkpoint",
            path.display()
        ))
    })?;
    let mut out: Vec<Tensor> = st
        .iter()
        .map(|(name, v)| Tensor {
            name: name.to_string(),
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Loads the checkpoint at `path` (see [`resolve`]) and checks that it was
/// written for `expect_config` (see [`config_fields`]): a mismatch is one
/// line naming the first differing field.
pub fn load(path: &Path, expect_config: &BTreeMap<String, String>) -> Result<Checkpoint> {
    let dir = resolve(path)?;
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| {
        ModelError::Checkpoint(format!(
            "`{}` cannot be read ({e}): the checkpoint is incomplete",
            state_path.display()
        ))
    })?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| {
        ModelError::Checkpoint(format!(
            "`{}` is not an fpdt training state ({e}): the checkpoint is damaged or not fpdt's",
            state_path.display()
        ))
    })?;
    if state.format != FORMAT {
        return Err(ModelError::Checkpoint(format!(
            "`{}` has format `{}`, this build reads `{FORMAT}`",
            state_path.display(),
            state.format
        )));
    }
    check_config(&dir, &state.config, expect_config)?;
    let weights = read_safetensors(&dir.join(MODEL_FILE))?;
    let optimizer = read_safetensors(&dir.join(OPTIMIZER_FILE))?;
    Ok(Checkpoint {
        dir,
        state,
        weights,
        optimizer,
    })
}

/// The first field where `saved` and `expected` differ, as one line.
pub fn check_config(
    dir: &Path,
    saved: &BTreeMap<String, String>,
    expected: &BTreeMap<String, String>,
) -> Result<()> {
    let keys: std::collections::BTreeSet<&String> = saved.keys().chain(expected.keys()).collect();
    for k in keys {
        let (s, e) = (saved.get(k), expected.get(k));
        if s != e {
            let show = |v: Option<&String>| v.map_or("(absent)".to_string(), |v| v.clone());
            return Err(ModelError::Checkpoint(format!(
                "checkpoint `{}` is from another config: {k} = {} there, {} in this run; resume \
                 with the same model settings, or write to a new --out",
                dir.display(),
                show(s),
                show(e)
            )));
        }
    }
    Ok(())
}
