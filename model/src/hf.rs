//! Weights in Hugging Face layout: a directory with `config.json` and
//! `model.safetensors` (or shards `model-0000i-of-0000n.safetensors` with
//! `model.safetensors.index.json`), read into the flat [`ParamLayout`]
//! buffer to continue training a pretrained GPT-2 or Llama at longer
//! context, and written back in the same layout.
//!
//! How the two layouts relate (our convention, see [`crate::reference`]:
//! every linear layer is `y = x W^T + b` with `W` stored `[out, in]`
//! row-major, the PyTorch `nn.Linear` convention):
//!
//! - Llama (`nn.Linear` everywhere): every tensor is copied as it is.
//!   HF Llama checkpoints already keep q and k in the rotate-half RoPE
//!   order (pairs `(i, i + head_dim/2)`), and our RoPE is rotate-half too
//!   (`fpdt_ptx::reference::rope`), so no permutation of q/k rows is
//!   needed (unlike Meta's original interleaved checkpoints).
//! - GPT-2 uses `Conv1D` layers: `y = x W + b` with `W` stored `[in, out]`,
//!   so each weight is transposed; `attn.c_attn` fuses q|k|v along `out`
//!   and is split into our three matrices (and its bias into three).
//!   GPT-2's learned absolute positions (`wpe`) have no place in our GPT,
//!   which uses RoPE: a loaded `wpe` is dropped and the report says so; a
//!   saved directory holds an all-zero `wpe` (see [`save`]). GPT-2's GeLU is
//!   `gelu_new`, the tanh form our GPT uses.
//!
//! A load returns a [`LoadReport`] beside the weights: the files read, the
//! dtypes widened, every tensor dropped on purpose (with why) and every
//! tensor nobody knows (listed, never silently ignored), plus notes on
//! what does not carry over (learned positions, RoPE scaling). Errors name
//! the file and the tensor.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::{json, Value};

use crate::config::{Activation, Family, ModelConfig, Norm, ParamLayout};
use crate::error::{ModelError, Result};

/// The config file of a Hugging Face model directory.
pub const CONFIG_FILE: &str = "config.json";
/// The single weights file.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of sharded weights (`weight_map`: tensor name -> shard file).
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The largest safetensors header read (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// What a load did beside producing the weights.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// The weight files read, in order.
    pub files: Vec<PathBuf>,
    /// How many of the used tensors were stored in each dtype (`F32`,
    /// `F16`, `BF16`); all are widened to f32.
    pub dtypes: BTreeMap<String, usize>,
    /// Tensors present but not used on purpose, each with why (learned
    /// positions, attention-mask buffers, a tied head).
    pub dropped: Vec<String>,
    /// Tensors no mapping knows: not loaded. A caller should show them;
    /// they usually mean the checkpoint has parts our model lacks.
    pub unexpected: Vec<String>,
    /// What does not carry over, one line each.
    pub notes: Vec<String>,
}

/// A loaded Hugging Face model directory.
#[derive(Debug, Clone)]
pub struct HfCheckpoint {
    /// The config read from `config.json`.
    pub config: ModelConfig,
    /// The weights in the flat layout of `config` (`config.layout()`).
    pub params: Vec<f32>,
    /// What was dropped, unknown or not carried over.
    pub report: LoadReport,
}

/// Where (part of) one Hugging Face tensor lives in the flat buffer.
#[derive(Debug, Clone)]
enum Piece {
    /// The whole tensor is this range, same element order.
    Same(Range<usize>),
    /// Elements `start..start + dst.len()` of a 1-D tensor are this range
    /// (a slice of the fused `c_attn` bias).
    Segment { start: usize, dst: Range<usize> },
    /// A `Conv1D` weight `[in, total_out]`: its columns `col..col + n` are
    /// our `[n, in]` matrix at `dst` (transposed).
    Columns { col: usize, dst: Range<usize> },
}

/// One Hugging Face tensor: its name, its shape, and where its elements go.
/// No pieces: a tensor written as zeros (GPT-2 `wpe`).
#[derive(Debug, Clone)]
struct Slot {
    name: String,
    shape: Vec<usize>,
    pieces: Vec<Piece>,
}

impl Slot {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Scatters the HF tensor's values `src` into `flat`.
    fn scatter(&self, src: &[f32], flat: &mut [f32]) {
        for p in &self.pieces {
            match p {
                Piece::Same(dst) => flat[dst.clone()].copy_from_slice(src),
                Piece::Segment { start, dst } => {
                    flat[dst.clone()].copy_from_slice(&src[*start..*start + dst.len()])
                }
                Piece::Columns { col, dst } => {
                    let (inp, total) = (self.shape[0], self.shape[1]);
                    let n = dst.len() / inp;
                    for o in 0..n {
                        for i in 0..inp {
                            flat[dst.start + o * inp + i] = src[i * total + col + o];
                        }
                    }
                }
            }
        }
    }

    /// Gathers the HF tensor's values from `flat` (the inverse of
    /// [`Slot::scatter`]; zeros where no piece writes).
    fn gather(&self, flat: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0f32; self.numel()];
        for p in &self.pieces {
            match p {
                Piece::Same(dst) => out.copy_from_slice(&flat[dst.clone()]),
                Piece::Segment { start, dst } => {
                    out[*start..*start + dst.len()].copy_from_slice(&flat[dst.clone()])
                }
                Piece::Columns { col, dst } => {
                    let (inp, total) = (self.shape[0], self.shape[1]);
                    let n = dst.len() / inp;
                    for o in 0..n {
                        for i in 0..inp {
                            out[i * total + col + o] = flat[dst.start + o * inp + i];
                        }
                    }
                }
            }
        }
        out
    }
}

/// Checks that `cfg` has a Hugging Face form: GPT-2 (LayerNorm, GeLU,
/// biases, multi-head attention with `heads * head_dim = hidden`) or Llama
/// (RMSNorm, SwiGLU, no biases). `what` names the source in errors.
fn check_representable(cfg: &ModelConfig, what: &str) -> Result<()> {
    let bad = |field: &str, value: String, rule: &str| {
        Err(ModelError::config(format!("{what}: {field}"), value, rule))
    };
    match cfg.family {
        Family::Gpt => {
            if cfg.norm != Norm::LayerNorm || !cfg.bias {
                return bad(
                    "norm/bias",
                    format!("{:?}/{}", cfg.norm, cfg.bias),
                    "the GPT-2 layout has LayerNorm and biases",
                );
            }
            if cfg.activation != Activation::Gelu {
                return bad(
                    "activation",
                    format!("{:?}", cfg.activation),
                    "the GPT-2 layout has one MLP input matrix (c_fc) and GeLU; SwiGLU needs \
                     gate and up matrices (use the Llama family)",
                );
            }
            if cfg.kv_heads != cfg.heads {
                return bad(
                    "kv_heads",
                    cfg.kv_heads.to_string(),
                    "the GPT-2 layout has no grouped-query attention: kv_heads must equal heads",
                );
            }
            if cfg.q_dim() != cfg.hidden {
                return bad(
                    "head_dim",
                    cfg.head_dim.to_string(),
                    "the GPT-2 layout needs heads * head_dim = hidden (n_embd divisible by n_head)",
                );
            }
        }
        Family::Llama => {
            if cfg.norm != Norm::RmsNorm || cfg.bias {
                return bad(
                    "norm/bias",
                    format!("{:?}/{}", cfg.norm, cfg.bias),
                    "the Llama layout has RMSNorm and no biases",
                );
            }
            if cfg.activation != Activation::SwiGlu {
                return bad(
                    "activation",
                    format!("{:?}", cfg.activation),
                    "the Llama layout has gate, up and down matrices: only SwiGLU (hidden_act \
                     silu) maps onto fpdt's Llama",
                );
            }
        }
    }
    Ok(())
}

/// The tensor table of `cfg` with GPT-2 names under `prefix` (`transformer.`
/// or empty) or Llama names under `prefix` (`model.` or empty).
fn slots(cfg: &ModelConfig, layout: &ParamLayout, prefix: &str) -> Vec<Slot> {
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, pieces: Vec<Piece>| {
        out.push(Slot {
            name,
            shape,
            pieces,
        })
    };
    let (h, v, q, kv, inter) = (
        cfg.hidden,
        cfg.vocab_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate,
    );
    let same = |r: &Range<usize>| vec![Piece::Same(r.clone())];
    let opt = |r: &Option<Range<usize>>| r.clone().unwrap_or(0..0);
    match cfg.family {
        Family::Gpt => {
            push(
                format!("{prefix}wte.weight"),
                vec![v, h],
                same(&layout.embed()),
            );
            for (l, lp) in layout.layers().iter().enumerate() {
                let n = |s: &str| format!("{prefix}h.{l}.{s}");
                let cols = |r: &Range<usize>| {
                    vec![Piece::Columns {
                        col: 0,
                        dst: r.clone(),
                    }]
                };
                push(n("ln_1.weight"), vec![h], same(&lp.norm1_w));
                push(n("ln_1.bias"), vec![h], same(&opt(&lp.norm1_b)));
                push(
                    n("attn.c_attn.weight"),
                    vec![h, q + 2 * kv],
                    vec![
                        Piece::Columns {
                            col: 0,
                            dst: lp.wq.clone(),
                        },
                        Piece::Columns {
                            col: q,
                            dst: lp.wk.clone(),
                        },
                        Piece::Columns {
                            col: q + kv,
                            dst: lp.wv.clone(),
                        },
                    ],
                );
                push(
                    n("attn.c_attn.bias"),
                    vec![q + 2 * kv],
                    vec![
                        Piece::Segment {
                            start: 0,
                            dst: opt(&lp.bq),
                        },
                        Piece::Segment {
                            start: q,
                            dst: opt(&lp.bk),
                        },
                        Piece::Segment {
                            start: q + kv,
                            dst: opt(&lp.bv),
                        },
                    ],
                );
                push(n("attn.c_proj.weight"), vec![q, h], cols(&lp.wo));
                push(n("attn.c_proj.bias"), vec![h], same(&opt(&lp.bo)));
                push(n("ln_2.weight"), vec![h], same(&lp.norm2_w));
                push(n("ln_2.bias"), vec![h], same(&opt(&lp.norm2_b)));
                push(n("mlp.c_fc.weight"), vec![h, inter], cols(&lp.w1));
                push(n("mlp.c_fc.bias"), vec![inter], same(&opt(&lp.b1)));
                push(n("mlp.c_proj.weight"), vec![inter, h], cols(&lp.w2));
                push(n("mlp.c_proj.bias"), vec![h], same(&opt(&lp.b2)));
            }
            push(
                format!("{prefix}ln_f.weight"),
                vec![h],
                same(&layout.norm_f_w()),
            );
            push(
                format!("{prefix}ln_f.bias"),
                vec![h],
                same(&opt(&layout.norm_f_b())),
            );
            if !cfg.tie_embeddings {
                // GPT2LMHeadModel's head is an nn.Linear [vocab, hidden].
                push("lm_head.weight".into(), vec![v, h], same(&layout.lm_head()));
            }
        }
        Family::Llama => {
            push(
                format!("{prefix}embed_tokens.weight"),
                vec![v, h],
                same(&layout.embed()),
            );
            for (l, lp) in layout.layers().iter().enumerate() {
                let n = |s: &str| format!("{prefix}layers.{l}.{s}");
                push(n("input_layernorm.weight"), vec![h], same(&lp.norm1_w));
                push(n("self_attn.q_proj.weight"), vec![q, h], same(&lp.wq));
                push(n("self_attn.k_proj.weight"), vec![kv, h], same(&lp.wk));
                push(n("self_attn.v_proj.weight"), vec![kv, h], same(&lp.wv));
                push(n("self_attn.o_proj.weight"), vec![h, q], same(&lp.wo));
                push(
                    n("post_attention_layernorm.weight"),
                    vec![h],
                    same(&lp.norm2_w),
                );
                push(n("mlp.gate_proj.weight"), vec![inter, h], same(&lp.w1));
                push(
                    n("mlp.up_proj.weight"),
                    vec![inter, h],
                    same(&lp.w3.clone().unwrap_or(0..0)),
                );
                push(n("mlp.down_proj.weight"), vec![h, inter], same(&lp.w2));
            }
            push(
                format!("{prefix}norm.weight"),
                vec![h],
                same(&layout.norm_f_w()),
            );
            if !cfg.tie_embeddings {
                push("lm_head.weight".into(), vec![v, h], same(&layout.lm_head()));
            }
        }
    }
    out
}

fn ck(msg: String) -> ModelError {
    ModelError::Checkpoint(msg)
}

/// A tensor's entry in a safetensors header.
#[derive(Debug, Clone)]
struct Stored {
    /// Index into the list of files.
    file: usize,
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    bytes: Range<u64>,
}

/// Bytes per element of the dtypes we widen; None for the others.
fn dtype_size(dtype: &str) -> Option<usize> {
    match dtype {
        "F32" => Some(4),
        "F16" | "BF16" => Some(2),
        _ => None,
    }
}

/// Reads the header of safetensors file `path` (number `file`): every
/// tensor's dtype, shape and byte range, checked against the file's length.
fn read_header(path: &Path, file: usize) -> Result<BTreeMap<String, Stored>> {
    let shown = path.display();
    let mut f =
        File::open(path).map_err(|e| ck(format!("weights file `{shown}`: cannot open: {e}")))?;
    let file_len = f
        .metadata()
        .map_err(|e| ck(format!("weights file `{shown}`: cannot stat: {e}")))?
        .len();
    let mut n8 = [0u8; 8];
    f.read_exact(&mut n8).map_err(|e| {
        ck(format!(
            "weights file `{shown}` is not safetensors: shorter than its 8-byte header length ({e})"
        ))
    })?;
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER_BYTES || 8 + n > file_len {
        return Err(ck(format!(
            "weights file `{shown}` is not safetensors or is truncated: header length {n} \
             bytes, file length {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| ck(format!("weights file `{shown}`: reading the header: {e}")))?;
    let v: Value = serde_json::from_slice(&header).map_err(|e| {
        ck(format!(
            "weights file `{shown}`: the header is not JSON: {e}"
        ))
    })?;
    let obj = v.as_object().ok_or_else(|| {
        ck(format!(
            "weights file `{shown}`: the header is not a JSON object"
        ))
    })?;
    let data_start = 8 + n;
    let mut out = BTreeMap::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |why: &str| ck(format!("weights file `{shown}`: tensor `{name}`: {why}"));
        let dtype = info
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no dtype string in the header"))?
            .to_string();
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no shape array in the header"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape entries must be non-negative integers"))?;
        let offsets: Vec<u64> = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no data_offsets in the header"))?
            .iter()
            .map(Value::as_u64)
            .collect::<Option<_>>()
            .ok_or_else(|| bad("data_offsets must be two non-negative integers"))?;
        let [begin, end] = offsets[..] else {
            return Err(bad("data_offsets must be two non-negative integers"));
        };
        let (begin, end) = (data_start + begin, data_start + end);
        if begin > end || end > file_len {
            return Err(bad(&format!(
                "bytes {begin}..{end} lie outside the file ({file_len} bytes): truncated or damaged"
            )));
        }
        if let Some(size) = dtype_size(&dtype) {
            let numel: usize = shape.iter().product();
            if (end - begin) as u128 != numel as u128 * size as u128 {
                return Err(bad(&format!(
                    "{} bytes for shape {shape:?} of {dtype} (needs {})",
                    end - begin,
                    numel as u128 * size as u128
                )));
            }
        }
        out.insert(
            name.clone(),
            Stored {
                file,
                dtype,
                shape,
                bytes: begin..end,
            },
        );
    }
    Ok(out)
}

/// The weight files of `dir` and every tensor in them.
struct Weights {
    files: Vec<PathBuf>,
    tensors: BTreeMap<String, Stored>,
}

impl Weights {
    fn open(dir: &Path) -> Result<Weights> {
        let single = dir.join(WEIGHTS_FILE);
        let index = dir.join(INDEX_FILE);
        if single.is_file() {
            let tensors = read_header(&single, 0)?;
            return Ok(Weights {
                files: vec![single],
                tensors,
            });
        }
        if !index.is_file() {
            return Err(ck(format!(
                "`{}` has neither `{WEIGHTS_FILE}` nor `{INDEX_FILE}` (with its shards): not a \
                 Hugging Face model directory in safetensors form (.bin/.pt weights are not read)",
                dir.display()
            )));
        }
        let shown = index.display();
        let text = std::fs::read_to_string(&index)
            .map_err(|e| ck(format!("index `{shown}`: cannot read: {e}")))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ck(format!("index `{shown}`: not JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ck(format!("index `{shown}`: no `weight_map` object")))?;
        let mut wanted: BTreeMap<&str, &str> = BTreeMap::new();
        let mut shard_names: Vec<&str> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                ck(format!(
                    "index `{shown}`: weight_map[`{name}`] = {file}: must be a file name"
                ))
            })?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(ck(format!(
                    "index `{shown}`: weight_map[`{name}`] = `{file}`: shards must be plain file \
                     names in the same directory"
                )));
            }
            wanted.insert(name, file);
            if !shard_names.contains(&file) {
                shard_names.push(file);
            }
        }
        shard_names.sort_unstable();
        let mut files = Vec::new();
        let mut tensors: BTreeMap<String, Stored> = BTreeMap::new();
        for (i, s) in shard_names.iter().enumerate() {
            let path = dir.join(s);
            if !path.is_file() {
                let first = wanted.iter().find(|(_, f)| *f == s).map_or("", |(n, _)| *n);
                return Err(ck(format!(
                    "shard `{}` (named by `{shown}`, e.g. for `{first}`) is missing",
                    path.display()
                )));
            }
            for (name, st) in read_header(&path, i)? {
                if let Some(prev) = tensors.get(&name) {
                    return Err(ck(format!(
                        "tensor `{name}` is in two shards: `{}` and `{}`",
                        dir.join(shard_names[prev.file]).display(),
                        path.display()
                    )));
                }
                tensors.insert(name, st);
            }
            files.push(path);
        }
        for (name, file) in &wanted {
            let holder = tensors.get(*name).map(|t| t.file);
            if holder.map(|f| shard_names[f]) != Some(*file) {
                return Err(ck(format!(
                    "index `{shown}` puts tensor `{name}` in `{file}`, which does not hold it"
                )));
            }
        }
        Ok(Weights { files, tensors })
    }

    /// The tensor `name` widened to f32.
    fn read_f32(&self, name: &str, st: &Stored) -> Result<Vec<f32>> {
        let path = &self.files[st.file];
        let shown = path.display();
        let size = dtype_size(&st.dtype).ok_or_else(|| {
            ck(format!(
                "weights file `{shown}`: tensor `{name}` is {}: unsupported dtype (F32, F16 and \
                 BF16 are read)",
                st.dtype
            ))
        })?;
        let len = usize::try_from(st.bytes.end - st.bytes.start).map_err(|_| {
            ck(format!(
                "weights file `{shown}`: tensor `{name}` is too large"
            ))
        })?;
        let mut buf = vec![0u8; len];
        let mut f = File::open(path)
            .map_err(|e| ck(format!("weights file `{shown}`: cannot open: {e}")))?;
        f.seek(SeekFrom::Start(st.bytes.start))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| {
                ck(format!(
                    "weights file `{shown}`: reading tensor `{name}`: {e}"
                ))
            })?;
        Ok(match size {
            4 => buf
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            _ if st.dtype == "F16" => buf
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => buf
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        })
    }
}

/// The layer index of a per-layer tensor name (`h.3.` or `layers.3.` after
/// `prefix`).
fn layer_of(name: &str, prefix: &str, family: Family) -> Option<usize> {
    let rest = name.strip_prefix(prefix)?;
    let rest = match family {
        Family::Gpt => rest.strip_prefix("h.")?,
        Family::Llama => rest.strip_prefix("layers.")?,
    };
    rest.split('.').next()?.parse().ok()
}

/// Reads `config.json` of `dir` through [`ModelConfig::from_hf_json`]; errors
/// name the file. Also returns notes on what the parser does not model.
fn read_config(dir: &Path) -> Result<(ModelConfig, Vec<String>)> {
    let path = dir.join(CONFIG_FILE);
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ck(format!(
            "`{shown}` cannot be read ({e}): a Hugging Face model directory has a config.json"
        ))
    })?;
    let cfg = ModelConfig::from_hf_json(&text).map_err(|e| match e {
        ModelError::Config { field, value, rule } => ModelError::Config {
            field: format!("{shown}: {field}"),
            value,
            rule,
        },
        ModelError::Json { source, .. } => ModelError::Json {
            what: format!("parsing `{shown}`"),
            source,
        },
        other => other,
    })?;
    check_representable(&cfg, &shown)?;
    let v: Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        what: format!("parsing `{shown}`"),
        source,
    })?;
    let mut notes = Vec::new();
    let model_type = v.get("model_type").and_then(Value::as_str);
    let expected = match cfg.family {
        Family::Gpt => "gpt2",
        Family::Llama => "llama",
    };
    if let Some(t) = model_type {
        if t != expected {
            notes.push(format!(
                "model_type `{t}` is read with the {expected} tensor names: whatever it has \
                 beyond {expected} is listed as unexpected or not modelled"
            ));
        }
    }
    if let Some(s) = v.get("rope_scaling").filter(|s| !s.is_null()) {
        notes.push(format!(
            "rope_scaling {s} is ignored: fpdt's RoPE is unscaled (theta = {}), so positions \
             beyond the original context see different frequencies than in pretraining",
            cfg.rope_theta
        ));
    }
    if let Some(w) = v.get("sliding_window").filter(|w| !w.is_null()) {
        notes.push(format!(
            "sliding_window {w} is ignored: fpdt attends over the whole causal prefix"
        ));
    }
    if cfg.family == Family::Gpt {
        if v.get("scale_attn_by_inverse_layer_idx")
            .and_then(Value::as_bool)
            == Some(true)
        {
            notes.push(
                "scale_attn_by_inverse_layer_idx is ignored: fpdt scales scores by \
                 1/sqrt(head_dim) only"
                    .into(),
            );
        }
        if v.get("rope_theta").is_none() {
            notes.push(format!(
                "GPT-2 positions become RoPE (rotate-half, theta = {}, the default: config.json \
                 has no rope_theta)",
                cfg.rope_theta
            ));
        }
    }
    Ok((cfg, notes))
}

/// Loads a Hugging Face model directory (`config.json` and safetensors
/// weights, single or sharded; F32, F16 or BF16, widened to f32) into the
/// flat layout of the config it describes. Every tensor the layout needs
/// must be present with its shape; tensors of a layer the config does not
/// have are an error (config and weights disagree); other unknown tensors
/// are listed in the report.
pub fn load(dir: &Path) -> Result<HfCheckpoint> {
    if !dir.is_dir() {
        return Err(ck(format!(
            "Hugging Face model directory `{}` not found{}",
            dir.display(),
            interrupted_hint(dir)
        )));
    }
    let (cfg, notes) = read_config(dir)?;
    let weights = Weights::open(dir)?;
    let mut report = LoadReport {
        files: weights.files.clone(),
        notes,
        ..LoadReport::default()
    };
    let shown_files = || {
        weights
            .files
            .iter()
            .map(|f| format!("`{}`", f.display()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let config_path = dir.join(CONFIG_FILE);

    // HF saves GPT2LMHeadModel as `transformer.*` and GPT2Model (the hub's
    // own gpt2 files) with no prefix; LlamaForCausalLM as `model.*`.
    let (marker, with_prefix) = match cfg.family {
        Family::Gpt => ("wte.weight", "transformer."),
        Family::Llama => ("embed_tokens.weight", "model."),
    };
    let prefix = if weights
        .tensors
        .contains_key(&format!("{with_prefix}{marker}"))
    {
        with_prefix
    } else if weights.tensors.contains_key(marker) {
        ""
    } else {
        with_prefix
    };

    let layout = cfg.layout();
    let table = slots(&cfg, &layout, prefix);
    let mut used: HashMap<&str, ()> = HashMap::new();
    for name in weights.tensors.keys() {
        if let Some(l) = layer_of(name, prefix, cfg.family) {
            if l >= cfg.layers {
                return Err(ck(format!(
                    "config and weights disagree: tensor `{name}` in {} is of layer {l}, but \
                     `{}` says the model has {} layers",
                    shown_files(),
                    config_path.display(),
                    cfg.layers
                )));
            }
        }
    }

    let mut params = vec![0.0f32; layout.len()];
    for slot in &table {
        let st = weights.tensors.get(&slot.name).ok_or_else(|| {
            ck(format!(
                "tensor `{}` is missing from {} (needed by the {:?} config of `{}`)",
                slot.name,
                shown_files(),
                cfg.family,
                config_path.display()
            ))
        })?;
        let file = weights.files[st.file].display();
        if st.shape != slot.shape {
            return Err(ck(format!(
                "weights file `{file}`: tensor `{}` has shape {:?}, expected {:?} from `{}`",
                slot.name,
                st.shape,
                slot.shape,
                config_path.display()
            )));
        }
        let values = weights.read_f32(&slot.name, st)?;
        if let Some(i) = values.iter().position(|x| !x.is_finite()) {
            return Err(ck(format!(
                "weights file `{file}`: tensor `{}` has a non-finite value ({}) at element {i}",
                slot.name, values[i]
            )));
        }
        slot.scatter(&values, &mut params);
        *report.dtypes.entry(st.dtype.clone()).or_insert(0) += 1;
        used.insert(slot.name.as_str(), ());
    }

    for (name, st) in &weights.tensors {
        if used.contains_key(name.as_str()) {
            continue;
        }
        let rest = name.strip_prefix(prefix).unwrap_or(name);
        let is_layer_buffer = layer_of(name, prefix, cfg.family).is_some()
            && (rest.ends_with(".attn.bias")
                || rest.ends_with(".attn.masked_bias")
                || rest.ends_with(".rotary_emb.inv_freq"));
        if is_layer_buffer {
            report.dropped.push(format!(
                "{name}: a constant buffer (causal mask or RoPE table), not a weight"
            ));
        } else if cfg.family == Family::Gpt && rest == "wpe.weight" {
            let wpe = weights.read_f32(name, st)?;
            if wpe.iter().all(|&x| x == 0.0) {
                report
                    .dropped
                    .push(format!("{name}: all zeros (an fpdt export): nothing lost"));
            } else {
                report.dropped.push(format!(
                    "{name}: learned absolute positions {:?}; fpdt's GPT uses RoPE instead",
                    st.shape
                ));
                report.notes.push(format!(
                    "GPT-2 learned positions (`{name}`) are dropped: fpdt's GPT encodes positions \
                     with RoPE, so the pretrained model must adapt to them; expect a higher \
                     initial loss than the original model's"
                ));
            }
        } else if name == "lm_head.weight" && cfg.tie_embeddings {
            let head = weights.read_f32(name, st)?;
            let embed = &params[layout.embed()];
            if head.len() == embed.len() && head.iter().zip(embed).all(|(a, b)| a == b) {
                report
                    .dropped
                    .push(format!("{name}: equal to the tied token embedding"));
            } else {
                report.dropped.push(format!(
                    "{name}: differs from the token embedding, but config.json ties them \
                     (tie_word_embeddings); the embedding is used"
                ));
                report.notes.push(format!(
                    "`{name}` differs from the token embedding and is not used: the config ties \
                     the head to the embedding"
                ));
            }
        } else {
            report
                .unexpected
                .push(format!("{name} {} {:?}", st.dtype, st.shape));
        }
    }
    if !report.unexpected.is_empty() {
        report.notes.push(format!(
            "{} tensor(s) no mapping knows were not loaded (see `unexpected`): {}",
            report.unexpected.len(),
            report.unexpected.join(", ")
        ));
    }
    Ok(HfCheckpoint {
        config: cfg,
        params,
        report,
    })
}

/// The dtype name Hugging Face writes as `torch_dtype`.
fn torch_dtype(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// The `config.json` of `cfg` in Hugging Face keys (`GPT2LMHeadModel` or
/// `LlamaForCausalLM`), with `torch_dtype` naming `dtype`.
/// [`ModelConfig::from_hf_json`] reads it back to `cfg`.
pub fn config_json(cfg: &ModelConfig, dtype: Dtype) -> Result<Value> {
    cfg.validate()?;
    check_representable(cfg, "config")?;
    Ok(match cfg.family {
        Family::Gpt => json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.hidden,
            "n_layer": cfg.layers,
            "n_head": cfg.heads,
            "n_inner": cfg.intermediate,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "torch_dtype": torch_dtype(dtype),
            // Not a GPT-2 key: Hugging Face keeps it as an attribute and
            // ignores it; fpdt reads it back.
            "rope_theta": cfg.rope_theta,
            "fpdt_positions": "fpdt trained these weights with RoPE (rotate-half, rope_theta); \
                               wpe is written as zeros and Hugging Face's GPT-2 applies no RoPE",
        }),
        Family::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden,
            "intermediate_size": cfg.intermediate,
            "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_scaling": null,
            "tie_word_embeddings": cfg.tie_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": torch_dtype(dtype),
        }),
    })
}

/// One tensor to write, built from the flat buffer only when the writer
/// asks for its bytes (so a save holds one tensor's copy at a time).
struct OutTensor<'a> {
    slot: &'a Slot,
    params: &'a [f32],
    dtype: Dtype,
}

impl safetensors::View for &OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.slot.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let v = self.slot.gather(self.params);
        Cow::Owned(match self.dtype {
            Dtype::F16 => v
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
            Dtype::BF16 => v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
            _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        })
    }
    fn data_len(&self) -> usize {
        let size = if self.dtype == Dtype::F32 { 4 } else { 2 };
        self.slot.numel() * size
    }
}

/// Saves `params` (the flat layout of `cfg`) as a Hugging Face model
/// directory in f32: see [`save_as`].
pub fn save(dir: &Path, cfg: &ModelConfig, params: &[f32]) -> Result<()> {
    save_as(dir, cfg, params, Dtype::F32)
}

/// Saves `params` (the flat layout of `cfg`) into `dir` as `config.json`
/// and one `model.safetensors` with Hugging Face names and layouts, the
/// tensors stored as `dtype` (F32, or F16/BF16 rounded to nearest even).
///
/// GPT-2: Hugging Face's `GPT2LMHeadModel` has a learned position table
/// `wpe` that fpdt's GPT (RoPE) does not have; a missing `wpe` would be
/// randomly initialised by `from_pretrained`, adding noise to every token,
/// so an all-zero `wpe` `[n_positions, n_embd]` is written instead (it adds
/// nothing; [`load`] drops it again and says nothing was lost). Hugging
/// Face's GPT-2 applies no RoPE, so it does not compute what fpdt's GPT
/// computes from these weights; Llama's does.
///
/// Crash-safe: everything is written into a temporary directory beside
/// `dir` and fsynced, then renamed into place; an existing `dir` is first
/// renamed aside (its other files, e.g. a tokenizer, are carried over by
/// hard link or copy; old weight files are not) and removed after. A crash
/// leaves either the old directory, or the new one, never a mix: between
/// the two renames `dir` is absent and the old copy lies at
/// `.old-hf-NAME-PID` beside it.
pub fn save_as(dir: &Path, cfg: &ModelConfig, params: &[f32], dtype: Dtype) -> Result<()> {
    save_with_hook(dir, cfg, params, dtype, &mut |_| Ok(()))
}

/// The points of a save, for tests of crashes (see [`save_with_hook`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveStage {
    /// Every file is written and fsynced in the temporary directory; the
    /// export directory is untouched.
    Written,
    /// The previous export directory was renamed aside; the new one is not
    /// yet in place (the export directory is absent).
    OldMovedAside,
    /// The new directory is in place; the previous copy is not yet removed.
    Renamed,
}

/// [`save_as`], calling `hook` at each [`SaveStage`]; an error from the
/// hook stops the save there and leaves the files as they are, as a crash
/// would. The next save removes what such a stop left: temporary
/// directories at its start, previous copies after its success (their
/// other files carried over when the export directory itself is absent).
pub fn save_with_hook(
    dir: &Path,
    cfg: &ModelConfig,
    params: &[f32],
    dtype: Dtype,
    hook: &mut dyn FnMut(SaveStage) -> Result<()>,
) -> Result<()> {
    if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(ModelError::config(
            "dtype",
            format!("{dtype:?}"),
            "Hugging Face weights are saved as F32, F16 or BF16",
        ));
    }
    let config = config_json(cfg, dtype)?;
    let layout = cfg.layout();
    if params.len() != layout.len() {
        return Err(ModelError::Shape(format!(
            "params has {} elements, the layout of this config has {}",
            params.len(),
            layout.len()
        )));
    }
    let prefix = match cfg.family {
        Family::Gpt => "transformer.",
        Family::Llama => "model.",
    };
    let mut table = slots(cfg, &layout, prefix);
    if cfg.family == Family::Gpt {
        table.push(Slot {
            name: format!("{prefix}wpe.weight"),
            shape: vec![cfg.max_seq_len, cfg.hidden],
            pieces: Vec::new(),
        });
    }

    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            ck(format!(
                "export directory `{}` has no final name component: name a directory",
                dir.display()
            ))
        })?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if dir.exists() && !dir.is_dir() {
        return Err(ck(format!(
            "export directory `{}` exists and is not a directory",
            dir.display()
        )));
    }
    std::fs::create_dir_all(&parent)
        .map_err(|e| ck(format!("creating `{}`: {e}", parent.display())))?;
    let tmp_prefix = format!(".tmp-hf-{name}-");
    let old_prefix = format!(".old-hf-{name}-");
    for p in siblings(&parent, &tmp_prefix)? {
        std::fs::remove_dir_all(&p)
            .map_err(|e| ck(format!("removing the leftover `{}`: {e}", p.display())))?;
    }
    if dir.is_dir() {
        // The export is whole, so previous copies an earlier stopped save
        // left are stale (and one could block this save's move aside).
        for p in siblings(&parent, &old_prefix)? {
            std::fs::remove_dir_all(&p)
                .map_err(|e| ck(format!("removing the leftover `{}`: {e}", p.display())))?;
        }
    }
    let pid = std::process::id();
    let tmp = parent.join(format!("{tmp_prefix}{pid}"));
    let old = parent.join(format!("{old_prefix}{pid}"));
    // The files to carry over: the export's own, or, when an earlier save
    // stopped with the export moved aside, that previous copy's.
    let carry_from = if dir.is_dir() {
        Some(dir.to_path_buf())
    } else {
        siblings(&parent, &old_prefix)?.into_iter().next()
    };
    if let Err(e) = write_into(&tmp, carry_from.as_deref(), &config, &table, params, dtype) {
        if tmp.exists() {
            // Best effort: the error being returned matters more.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        return Err(e);
    }
    hook(SaveStage::Written)?;
    swap_into_place(&tmp, dir, &old, &parent, hook)?;
    hook(SaveStage::Renamed)?;
    for p in siblings(&parent, &old_prefix)? {
        std::fs::remove_dir_all(&p)
            .map_err(|e| ck(format!("removing the previous copy `{}`: {e}", p.display())))?;
    }
    Ok(())
}

/// The entries of `parent` whose names start with `prefix`, sorted.
fn siblings(parent: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(parent)
        .map_err(|e| ck(format!("listing `{}`: {e}", parent.display())))?;
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

/// Writes the new directory's files into `tmp` (carrying the other files
/// of `carry_from` over) and fsyncs them.
fn write_into(
    tmp: &Path,
    carry_from: Option<&Path>,
    config: &Value,
    table: &[Slot],
    params: &[f32],
    dtype: Dtype,
) -> Result<()> {
    std::fs::create_dir(tmp).map_err(|e| ck(format!("creating `{}`: {e}", tmp.display())))?;
    let cfg_path = tmp.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(config).map_err(|source| ModelError::Json {
        what: "serializing config.json".into(),
        source,
    })?;
    File::create(&cfg_path)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())
                .and_then(|_| f.write_all(b"\n"))
        })
        .map_err(|e| ck(format!("writing `{}`: {e}", cfg_path.display())))?;

    let weights_path = tmp.join(WEIGHTS_FILE);
    let views: Vec<OutTensor<'_>> = table
        .iter()
        .map(|slot| OutTensor {
            slot,
            params,
            dtype,
        })
        .collect();
    let mut meta = HashMap::new();
    // transformers' safetensors loader wants the framework in the metadata.
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(
        views.iter().map(|v| (v.slot.name.as_str(), v)),
        Some(meta),
        &weights_path,
    )
    .map_err(|e| ck(format!("writing `{}`: {e}", weights_path.display())))?;

    if let Some(from) = carry_from {
        carry_over(from, tmp)?;
    }
    let rd = std::fs::read_dir(tmp).map_err(|e| ck(format!("listing `{}`: {e}", tmp.display())))?;
    for entry in rd {
        let p = entry
            .map_err(|e| ck(format!("listing `{}`: {e}", tmp.display())))?
            .path();
        File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(|e| ck(format!("fsync of `{}`: {e}", p.display())))?;
    }
    sync_dir(tmp)
}

/// Whether `name` is a file a save replaces (never carried over).
fn is_replaced(name: &str) -> bool {
    name == CONFIG_FILE
        || name == INDEX_FILE
        || (name.starts_with("model") && name.ends_with(".safetensors"))
}

/// Links (or copies) `dir`'s regular files other than the ones a save
/// replaces into `tmp`; a subdirectory is an error (a save replaces the
/// whole directory and would lose it).
fn carry_over(dir: &Path, tmp: &Path) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| ck(format!("listing `{}`: {e}", dir.display())))?;
    for entry in rd {
        let entry = entry.map_err(|e| ck(format!("listing `{}`: {e}", dir.display())))?;
        let p = entry.path();
        let fname = entry.file_name();
        if is_replaced(&fname.to_string_lossy()) {
            continue;
        }
        if p.is_dir() {
            return Err(ck(format!(
                "export directory `{}` holds the subdirectory `{}`: a save replaces the whole \
                 directory; move it away or export to a new directory",
                dir.display(),
                fname.to_string_lossy()
            )));
        }
        let dst = tmp.join(&fname);
        if std::fs::hard_link(&p, &dst).is_err() {
            std::fs::copy(&p, &dst)
                .map_err(|e| ck(format!("copying `{}` into the export: {e}", p.display())))?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ck(format!("fsync of directory `{}`: {e}", dir.display())))
}

/// Renames the finished `tmp` to `dir` (an existing `dir` moved to `old`
/// first; the caller removes it).
fn swap_into_place(
    tmp: &Path,
    dir: &Path,
    old: &Path,
    parent: &Path,
    hook: &mut dyn FnMut(SaveStage) -> Result<()>,
) -> Result<()> {
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, old).map_err(|e| {
            ck(format!(
                "moving the previous `{}` aside to `{}`: {e}",
                dir.display(),
                old.display()
            ))
        })?;
        hook(SaveStage::OldMovedAside)?;
    }
    if let Err(e) = std::fs::rename(tmp, dir) {
        if had_old {
            // Put the previous copy back so the directory is never absent
            // after a failed save.
            let _ = std::fs::rename(old, dir);
        }
        return Err(ck(format!(
            "renaming `{}` to `{}`: {e}",
            tmp.display(),
            dir.display()
        )));
    }
    sync_dir(parent)
}

/// When `dir` is missing because a save was interrupted between its two
/// renames, where the previous copy is.
fn interrupted_hint(dir: &Path) -> String {
    let (Some(name), Some(parent)) = (dir.file_name(), dir.parent()) else {
        return String::new();
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let prefix = format!(".old-hf-{}-", name.to_string_lossy());
    let Ok(rd) = std::fs::read_dir(parent) else {
        return String::new();
    };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            return format!(
                " (an interrupted save left the previous copy at `{}`: rename it back)",
                e.path().display()
            );
        }
    }
    String::new()
}
