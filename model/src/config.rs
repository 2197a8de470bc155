//! Model configuration (GPT and Llama families from one struct), presets,
//! Hugging Face `config.json` loading, validation, parameter counts, FLOPs,
//! the flat parameter layout shared by the reference model, the FPDT model
//! and checkpoints, and the schedule knobs of the FPDT layer.

use std::ops::Range;
use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

/// Which architecture family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// GPT: LayerNorm, GeLU MLP, biases, tied embeddings.
    Gpt,
    /// Llama: RMSNorm, SwiGLU MLP, no biases, untied head, GQA.
    Llama,
}

/// Normalization layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Norm {
    /// LayerNorm with gain and bias.
    LayerNorm,
    /// RMSNorm with gain only.
    RmsNorm,
}

/// MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// GeLU, tanh approximation: `down(gelu(fc(x)))`.
    Gelu,
    /// SwiGLU: `down(silu(gate(x)) * up(x))`.
    SwiGlu,
}

impl Activation {
    /// Parses the activation names of Hugging Face configs.
    pub fn parse(field: &str, name: &str) -> Result<Activation> {
        match name {
            "gelu" | "gelu_new" | "gelu_pytorch_tanh" | "gelu_tanh" => Ok(Activation::Gelu),
            "silu" | "swiglu" | "swish" => Ok(Activation::SwiGlu),
            other => Err(ModelError::config(
                field,
                format!("{other:?}"),
                "unknown activation: use gelu_new / gelu_pytorch_tanh (GeLU, tanh form) or silu (SwiGLU)",
            )),
        }
    }
}

/// One transformer configuration for both families.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Family (decides the defaults below; the fields are what the model uses).
    pub family: Family,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size (model width).
    pub hidden: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA; `heads` for multi-head attention).
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Longest sequence the config was trained for (informational: with RoPE
    /// the model runs at any length memory allows).
    pub max_seq_len: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Normalization epsilon.
    pub norm_eps: f64,
    /// Normalization layer.
    pub norm: Norm,
    /// MLP activation.
    pub activation: Activation,
    /// Linear layers have biases (GPT).
    pub bias: bool,
    /// The output head is the transposed token embedding.
    pub tie_embeddings: bool,
}

impl ModelConfig {
    /// A GPT config (LayerNorm, GeLU, biases, tied) with `head_dim = hidden / heads`
    /// and MLP width `4 * hidden`.
    pub fn gpt(vocab_size: usize, hidden: usize, layers: usize, heads: usize) -> ModelConfig {
        ModelConfig {
            family: Family::Gpt,
            vocab_size,
            hidden,
            layers,
            heads,
            kv_heads: heads,
            head_dim: hidden.checked_div(heads).unwrap_or(0),
            intermediate: 4 * hidden,
            max_seq_len: 1024,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            norm: Norm::LayerNorm,
            activation: Activation::Gelu,
            bias: true,
            tie_embeddings: true,
        }
    }

    /// A Llama config (RMSNorm, SwiGLU, no biases, untied, GQA).
    pub fn llama(
        vocab_size: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        intermediate: usize,
    ) -> ModelConfig {
        ModelConfig {
            family: Family::Llama,
            vocab_size,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim: hidden.checked_div(heads).unwrap_or(0),
            intermediate,
            max_seq_len: 8192,
            rope_theta: 500_000.0,
            norm_eps: 1e-5,
            norm: Norm::RmsNorm,
            activation: Activation::SwiGlu,
            bias: false,
            tie_embeddings: false,
        }
    }

    /// The names [`ModelConfig::preset`] knows.
    pub const PRESETS: &'static [&'static str] = &[
        "tiny-gpt",
        "tiny-llama",
        "gpt2-124m",
        "gpt2-350m",
        "gpt2-774m",
        "gpt2-1.5b",
        "gpt-2.7b",
        "gpt-6.7b",
        "llama-3-8b",
        "llama-3-70b",
    ];

    /// A named preset (case-insensitive): tiny test sizes (`tiny-gpt`,
    /// `tiny-llama`), `gpt2-124m/350m/774m/1.5b`, `gpt-2.7b`, `gpt-6.7b`,
    /// `llama-3-8b`, `llama-3-70b`.
    pub fn preset(name: &str) -> Result<ModelConfig> {
        let gpt2 = |h, l, n| ModelConfig::gpt(50257, h, l, n);
        let c = match name.to_ascii_lowercase().as_str() {
            "tiny-gpt" => ModelConfig {
                max_seq_len: 256,
                ..ModelConfig::gpt(96, 32, 2, 4)
            },
            "tiny-llama" => ModelConfig {
                max_seq_len: 256,
                rope_theta: 10_000.0,
                ..ModelConfig::llama(96, 32, 2, 4, 2, 64)
            },
            "gpt2-124m" | "gpt2" => gpt2(768, 12, 12),
            "gpt2-350m" | "gpt2-medium" => gpt2(1024, 24, 16),
            "gpt2-774m" | "gpt2-large" => gpt2(1280, 36, 20),
            "gpt2-1.5b" | "gpt2-xl" => gpt2(1600, 48, 25),
            "gpt-2.7b" => ModelConfig {
                max_seq_len: 2048,
                ..gpt2(2560, 32, 32)
            },
            "gpt-6.7b" => ModelConfig {
                max_seq_len: 2048,
                ..gpt2(4096, 32, 32)
            },
            "llama-3-8b" => ModelConfig::llama(128_256, 4096, 32, 32, 8, 14_336),
            "llama-3-70b" => ModelConfig::llama(128_256, 8192, 80, 64, 8, 28_672),
            other => {
                return Err(ModelError::config(
                    "preset",
                    format!("{other:?}"),
                    format!("unknown preset; known: {}", ModelConfig::PRESETS.join(", ")),
                ))
            }
        };
        Ok(c)
    }

    /// Loads a Hugging Face `config.json` (GPT-2 or Llama keys).
    pub fn from_hf_file(path: impl AsRef<Path>) -> Result<ModelConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            what: format!("reading {}", path.display()),
            source,
        })?;
        Self::from_hf_json(&text)
    }

    /// Parses a Hugging Face `config.json`: GPT-2 keys (`n_embd`, `n_head`,
    /// `n_layer`, `n_positions`, `vocab_size`, `n_inner`,
    /// `layer_norm_epsilon`, `activation_function`) or Llama keys
    /// (`hidden_size`, `num_attention_heads`, `num_key_value_heads`,
    /// `num_hidden_layers`, `intermediate_size`, `rope_theta`,
    /// `rms_norm_eps`, `tie_word_embeddings`, `hidden_act`, `head_dim`).
    /// The result is validated.
    pub fn from_hf_json(text: &str) -> Result<ModelConfig> {
        let v: Value = serde_json::from_str(text).map_err(|source| ModelError::Json {
            what: "parsing config.json".into(),
            source,
        })?;
        let obj = v.as_object().ok_or_else(|| {
            ModelError::config("config.json", "not an object", "must be a JSON object")
        })?;
        let uint = |k: &str| -> Result<Option<usize>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| ModelError::config(k, x, "must be a non-negative integer")),
            }
        };
        let need = |k: &str| -> Result<usize> {
            uint(k)?.ok_or_else(|| ModelError::config(k, "missing", "is required"))
        };
        let float = |k: &str| -> Result<Option<f64>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| ModelError::config(k, x, "must be a number")),
            }
        };
        let boolean = |k: &str| -> Result<Option<bool>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_bool()
                    .map(Some)
                    .ok_or_else(|| ModelError::config(k, x, "must be true or false")),
            }
        };
        let string = |k: &str| -> Result<Option<String>> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(x) => Err(ModelError::config(k, x, "must be a string")),
            }
        };
        let cfg = if obj.contains_key("n_embd") {
            let hidden = need("n_embd")?;
            let heads = need("n_head")?;
            let mut c = ModelConfig::gpt(need("vocab_size")?, hidden, need("n_layer")?, heads);
            if let Some(p) = uint("n_positions")? {
                c.max_seq_len = p;
            }
            if let Some(i) = uint("n_inner")? {
                c.intermediate = i;
            }
            if let Some(e) = float("layer_norm_epsilon")? {
                c.norm_eps = e;
            }
            if let Some(t) = float("rope_theta")? {
                c.rope_theta = t;
            }
            if let Some(a) = string("activation_function")? {
                c.activation = Activation::parse("activation_function", &a)?;
            }
            if let Some(t) = boolean("tie_word_embeddings")? {
                c.tie_embeddings = t;
            }
            c
        } else if obj.contains_key("hidden_size") {
            let hidden = need("hidden_size")?;
            let heads = need("num_attention_heads")?;
            let kv = uint("num_key_value_heads")?.unwrap_or(heads);
            let mut c = ModelConfig::llama(
                need("vocab_size")?,
                hidden,
                need("num_hidden_layers")?,
                heads,
                kv,
                need("intermediate_size")?,
            );
            if let Some(d) = uint("head_dim")? {
                c.head_dim = d;
            }
            if let Some(p) = uint("max_position_embeddings")? {
                c.max_seq_len = p;
            }
            if let Some(t) = float("rope_theta")? {
                c.rope_theta = t;
            }
            if let Some(e) = float("rms_norm_eps")? {
                c.norm_eps = e;
            }
            if let Some(t) = boolean("tie_word_embeddings")? {
                c.tie_embeddings = t;
            }
            if let Some(b) = boolean("attention_bias")? {
                if b {
                    return Err(ModelError::config(
                        "attention_bias",
                        b,
                        "Llama configs with attention biases are not supported",
                    ));
                }
            }
            if let Some(a) = string("hidden_act")? {
                c.activation = Activation::parse("hidden_act", &a)?;
            }
            c
        } else {
            return Err(ModelError::config(
                "config.json",
                "neither n_embd nor hidden_size",
                "must have GPT-2 keys (n_embd, n_head, n_layer) or Llama keys (hidden_size, \
                 num_attention_heads, num_hidden_layers)",
            ));
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the rules of the config alone (see [`Schedule::validate`] for
    /// the rules involving sequence length, P and chunks).
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate", self.intermediate),
        ] {
            if v == 0 {
                return Err(ModelError::config(field, 0, "must be positive"));
            }
        }
        if self.heads % self.kv_heads != 0 {
            return Err(ModelError::config(
                "heads",
                self.heads,
                format!("must be divisible by kv_heads ({})", self.kv_heads),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(ModelError::config(
                "head_dim",
                self.head_dim,
                "must be even (RoPE rotates pairs)",
            ));
        }
        if self.vocab_size > i32::MAX as usize {
            return Err(ModelError::config(
                "vocab_size",
                self.vocab_size,
                "must fit in i32 (labels are i32)",
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(ModelError::config(
                "rope_theta",
                self.rope_theta,
                "must be finite and > 1",
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(ModelError::config(
                "norm_eps",
                self.norm_eps,
                "must be finite and > 0",
            ));
        }
        if self.heads.checked_mul(self.head_dim).is_none()
            || self.vocab_size.checked_mul(self.hidden).is_none()
        {
            return Err(ModelError::config("hidden", self.hidden, "sizes overflow"));
        }
        Ok(())
    }

    /// Width of q (and o): `heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of k and v: `kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The flat parameter layout.
    pub fn layout(&self) -> ParamLayout {
        ParamLayout::new(self)
    }

    /// Number of parameters.
    pub fn param_count(&self) -> usize {
        self.layout().len()
    }

    /// Parameters of the matrix products (every weight matrix, the output
    /// head included, the embedding lookup excluded unless tied, since then
    /// it is the head).
    pub fn matmul_params(&self) -> usize {
        let h = self.hidden;
        let attn = h * self.q_dim() * 2 + h * self.kv_dim() * 2;
        let mlp = match self.activation {
            Activation::Gelu => 2 * h * self.intermediate,
            Activation::SwiGlu => 3 * h * self.intermediate,
        };
        self.layers * (attn + mlp) + self.vocab_size * h
    }

    /// Training FLOPs per token (forward and backward) at `seq_len` with
    /// causal attention: `6 * matmul_params + 6 * layers * heads * head_dim * seq_len`
    /// (the attention term counts the causal half of `QK^T` and `PV`).
    /// Recomputation is not counted (the MFU convention).
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        6.0 * self.matmul_params() as f64
            + 6.0 * (self.layers * self.heads * self.head_dim) as f64 * seq_len as f64
    }
}

/// One named parameter in the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamEntry {
    /// Name, e.g. `layers.0.attn.q.weight`.
    pub name: String,
    /// Shape (PyTorch convention: linear weights `[out, in]`).
    pub shape: Vec<usize>,
    /// First element in the flat buffer.
    pub offset: usize,
}

impl ParamEntry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Element range in the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel()
    }
}

/// Element ranges of one layer's parameters in the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerParams {
    /// Pre-attention norm gain.
    pub norm1_w: Range<usize>,
    /// Pre-attention norm bias (LayerNorm).
    pub norm1_b: Option<Range<usize>>,
    /// Query projection `[q_dim, hidden]`.
    pub wq: Range<usize>,
    /// Query bias.
    pub bq: Option<Range<usize>>,
    /// Key projection `[kv_dim, hidden]`.
    pub wk: Range<usize>,
    /// Key bias.
    pub bk: Option<Range<usize>>,
    /// Value projection `[kv_dim, hidden]`.
    pub wv: Range<usize>,
    /// Value bias.
    pub bv: Option<Range<usize>>,
    /// Output projection `[hidden, q_dim]`.
    pub wo: Range<usize>,
    /// Output bias.
    pub bo: Option<Range<usize>>,
    /// Pre-MLP norm gain.
    pub norm2_w: Range<usize>,
    /// Pre-MLP norm bias.
    pub norm2_b: Option<Range<usize>>,
    /// GeLU: `fc` `[intermediate, hidden]`; SwiGLU: `gate`.
    pub w1: Range<usize>,
    /// Bias of `w1`.
    pub b1: Option<Range<usize>>,
    /// SwiGLU `up` `[intermediate, hidden]`.
    pub w3: Option<Range<usize>>,
    /// Down projection `[hidden, intermediate]`.
    pub w2: Range<usize>,
    /// Bias of `w2`.
    pub b2: Option<Range<usize>>,
}

/// The flat parameter buffer's layout: every parameter's name, shape and
/// offset, in a fixed order. The reference model, the FPDT model and the
/// checkpoints share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    entries: Vec<ParamEntry>,
    len: usize,
    embed: Range<usize>,
    layers: Vec<LayerParams>,
    norm_f_w: Range<usize>,
    norm_f_b: Option<Range<usize>>,
    lm_head: Range<usize>,
}

impl ParamLayout {
    /// The layout of `cfg`. Order: `embed.weight`, per layer `norm1`,
    /// `attn.{q,k,v,o}`, `norm2`, `mlp.{fc,proj}` (GPT) or
    /// `mlp.{gate,up,down}` (Llama), then `norm_f` and `lm_head.weight`
    /// (untied only).
    pub fn new(cfg: &ModelConfig) -> ParamLayout {
        let mut b = Builder::default();
        let h = cfg.hidden;
        let embed = b.push("embed.weight", &[cfg.vocab_size, h]);
        let ln = cfg.norm == Norm::LayerNorm;
        let bias = cfg.bias;
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let p = |s: &str| format!("layers.{l}.{s}");
            let norm1_w = b.push(&p("norm1.weight"), &[h]);
            let norm1_b = ln.then(|| b.push(&p("norm1.bias"), &[h]));
            let lin = |b: &mut Builder, name: &str, out: usize, inp: usize| {
                let w = b.push(&p(&format!("{name}.weight")), &[out, inp]);
                let bb = bias.then(|| b.push(&p(&format!("{name}.bias")), &[out]));
                (w, bb)
            };
            let (wq, bq) = lin(&mut b, "attn.q", cfg.q_dim(), h);
            let (wk, bk) = lin(&mut b, "attn.k", cfg.kv_dim(), h);
            let (wv, bv) = lin(&mut b, "attn.v", cfg.kv_dim(), h);
            let (wo, bo) = lin(&mut b, "attn.o", h, cfg.q_dim());
            let norm2_w = b.push(&p("norm2.weight"), &[h]);
            let norm2_b = ln.then(|| b.push(&p("norm2.bias"), &[h]));
            let (w1, b1, w3, w2, b2) = match cfg.activation {
                Activation::Gelu => {
                    let (w1, b1) = lin(&mut b, "mlp.fc", cfg.intermediate, h);
                    let (w2, b2) = lin(&mut b, "mlp.proj", h, cfg.intermediate);
                    (w1, b1, None, w2, b2)
                }
                Activation::SwiGlu => {
                    let (w1, b1) = lin(&mut b, "mlp.gate", cfg.intermediate, h);
                    let (w3, _) = lin(&mut b, "mlp.up", cfg.intermediate, h);
                    let (w2, b2) = lin(&mut b, "mlp.down", h, cfg.intermediate);
                    (w1, b1, Some(w3), w2, b2)
                }
            };
            layers.push(LayerParams {
                norm1_w,
                norm1_b,
                wq,
                bq,
                wk,
                bk,
                wv,
                bv,
                wo,
                bo,
                norm2_w,
                norm2_b,
                w1,
                b1,
                w3,
                w2,
                b2,
            });
        }
        let norm_f_w = b.push("norm_f.weight", &[h]);
        let norm_f_b = ln.then(|| b.push("norm_f.bias", &[h]));
        let lm_head = if cfg.tie_embeddings {
            embed.clone()
        } else {
            b.push("lm_head.weight", &[cfg.vocab_size, h])
        };
        ParamLayout {
            len: b.len,
            entries: b.entries,
            embed,
            layers,
            norm_f_w,
            norm_f_b,
            lm_head,
        }
    }

    /// Total number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no parameters (never, for a valid config).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `len` rounded up to a multiple of `ranks` (the size of a buffer
    /// sharded evenly over `ranks` ranks; the tail is padding).
    pub fn padded_len(&self, ranks: usize) -> usize {
        let r = ranks.max(1);
        self.len.div_ceil(r) * r
    }

    /// Every parameter, in buffer order.
    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    /// The parameter called `name`.
    pub fn get(&self, name: &str) -> Option<&ParamEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The token embedding `[vocab, hidden]`.
    pub fn embed(&self) -> Range<usize> {
        self.embed.clone()
    }

    /// The output head `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head(&self) -> Range<usize> {
        self.lm_head.clone()
    }

    /// The final norm's gain.
    pub fn norm_f_w(&self) -> Range<usize> {
        self.norm_f_w.clone()
    }

    /// The final norm's bias (LayerNorm).
    pub fn norm_f_b(&self) -> Option<Range<usize>> {
        self.norm_f_b.clone()
    }

    /// Layer `l`'s parameters (panics never: out of range gives None).
    pub fn layer(&self, l: usize) -> Option<&LayerParams> {
        self.layers.get(l)
    }

    /// All layers.
    pub fn layers(&self) -> &[LayerParams] {
        &self.layers
    }

    /// Deterministic initial values: linear and embedding weights uniform
    /// with standard deviation `std` (a SplitMix64 stream from `seed`),
    /// residual output projections scaled by `1/sqrt(2*layers)` (GPT-2),
    /// norm gains 1, biases 0.
    pub fn init(&self, seed: u64, std: f64) -> Vec<f32> {
        let mut out = vec![0.0f32; self.len];
        let mut rng = SplitMix64(seed);
        let n_layers = self.layers.len().max(1) as f64;
        for e in &self.entries {
            let r = e.range();
            let is_norm = e.name.contains("norm");
            let is_bias = e.name.ends_with(".bias");
            if is_norm && !is_bias {
                out[r].iter_mut().for_each(|x| *x = 1.0);
            } else if !is_bias {
                let s = if e.name.ends_with("attn.o.weight")
                    || e.name.ends_with("mlp.proj.weight")
                    || e.name.ends_with("mlp.down.weight")
                {
                    std / (2.0 * n_layers).sqrt()
                } else {
                    std
                };
                for x in &mut out[r] {
                    *x = (rng.uniform_sym() * s * 3f64.sqrt()) as f32;
                }
            }
        }
        out
    }
}

#[derive(Default)]
struct Builder {
    entries: Vec<ParamEntry>,
    len: usize,
}

impl Builder {
    fn push(&mut self, name: &str, shape: &[usize]) -> Range<usize> {
        let e = ParamEntry {
            name: name.to_string(),
            shape: shape.to_vec(),
            offset: self.len,
        };
        let r = e.range();
        self.len = r.end;
        self.entries.push(e);
        r
    }
}

/// A tiny deterministic generator (SplitMix64) for initial weights and
/// test data.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[-1, 1)`.
    pub fn uniform_sym(&mut self) -> f64 {
        2.0 * self.uniform() - 1.0
    }

    /// Uniform integer in `[0, n)` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// The storage precision of working weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// f32 everywhere (the exact path of the equality tests).
    #[default]
    F32,
    /// Mixed precision: bf16 working weights and activations (what the
    /// matmuls read, what is offloaded), f32 accumulation, statistics,
    /// gradients and master weights.
    Bf16,
}

impl Precision {
    /// The storage dtype of working weights and activations.
    pub fn storage(self) -> fpdt_ptx::cpu::DType {
        match self {
            Precision::F32 => fpdt_ptx::cpu::DType::F32,
            Precision::Bf16 => fpdt_ptx::cpu::DType::BF16,
        }
    }

    /// The name a flag takes (`f32`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(ModelError::config("precision", s, "must be f32 or bf16")),
        }
    }
}

/// The knobs of one FPDT training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Global sequence length S.
    pub seq_len: usize,
    /// Sequence-parallel degree P.
    pub ranks: usize,
    /// Chunks u (C = S/u tokens per global chunk, c = C/P per rank).
    pub chunks: usize,
    /// Offload chunk tensors (q, k, v, o, lse, dq, layer inputs) to the host
    /// arena and prefetch them back.
    pub offload: bool,
    /// Activation checkpointing: keep only each layer's input (offloaded
    /// when `offload`), recompute the layer's forward in backward.
    pub checkpoint: bool,
    /// Tokens per MLP sub-chunk (0: c/2, at least 1, the paper's C/(2P)).
    pub mlp_chunk: usize,
    /// Tokens per loss sub-chunk (0: same as the MLP chunk).
    pub loss_chunk: usize,
    /// Storage precision of working weights and activations.
    pub precision: Precision,
}

impl Schedule {
    /// `S` tokens over `P` ranks in `u` chunks, offload and checkpointing on.
    pub fn fpdt(seq_len: usize, ranks: usize, chunks: usize) -> Schedule {
        Schedule {
            seq_len,
            ranks,
            chunks,
            offload: true,
            checkpoint: true,
            mlp_chunk: 0,
            loss_chunk: 0,
            precision: Precision::F32,
        }
    }

    /// Plain Ulysses: one chunk, nothing offloaded, no checkpointing.
    pub fn ulysses(seq_len: usize, ranks: usize) -> Schedule {
        Schedule {
            seq_len,
            ranks,
            chunks: 1,
            offload: false,
            checkpoint: false,
            mlp_chunk: 0,
            loss_chunk: 0,
            precision: Precision::F32,
        }
    }

    /// Tokens per global chunk, C = S/u.
    pub fn chunk_tokens(&self) -> usize {
        self.seq_len / self.chunks.max(1)
    }

    /// Tokens per rank and chunk, c = C/P.
    pub fn local_chunk_tokens(&self) -> usize {
        self.chunk_tokens() / self.ranks.max(1)
    }

    /// Tokens per MLP sub-chunk (resolved default).
    pub fn mlp_tokens(&self) -> usize {
        let c = self.local_chunk_tokens();
        let m = if self.mlp_chunk == 0 {
            c.div_ceil(2)
        } else {
            self.mlp_chunk
        };
        m.clamp(1, c.max(1))
    }

    /// Tokens per loss sub-chunk (resolved default).
    pub fn loss_tokens(&self) -> usize {
        let c = self.local_chunk_tokens();
        let m = if self.loss_chunk == 0 {
            self.mlp_tokens()
        } else {
            self.loss_chunk
        };
        m.clamp(1, c.max(1))
    }

    /// Checks the schedule against `cfg` (and `cfg` itself): positive sizes,
    /// chunk not larger than the sequence, S divisible by u*P, heads and
    /// kv_heads divisible by P. Errors name the field, value and rule.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        cfg.validate()?;
        for (field, v) in [
            ("seq_len", self.seq_len),
            ("ranks (P)", self.ranks),
            ("chunks (u)", self.chunks),
        ] {
            if v == 0 {
                return Err(ModelError::config(field, 0, "must be positive"));
            }
        }
        if self.chunks > self.seq_len {
            return Err(ModelError::config(
                "chunks (u)",
                self.chunks,
                format!(
                    "the chunk would be smaller than one token: u must not exceed seq_len ({})",
                    self.seq_len
                ),
            ));
        }
        let small = self
            .chunks
            .checked_mul(self.ranks)
            .ok_or_else(|| ModelError::config("chunks (u)", self.chunks, "u * P overflows"))?;
        if self.seq_len % small != 0 {
            return Err(ModelError::config(
                "seq_len",
                self.seq_len,
                format!(
                    "must be divisible by chunks (u = {}) x ranks (P = {}) = {small}, so every \
                     rank holds a whole number of tokens of every chunk",
                    self.chunks, self.ranks
                ),
            ));
        }
        if cfg.heads % self.ranks != 0 {
            return Err(ModelError::config(
                "heads",
                cfg.heads,
                format!(
                    "must be divisible by the sequence-parallel degree P ({})",
                    self.ranks
                ),
            ));
        }
        if cfg.kv_heads % self.ranks != 0 {
            return Err(ModelError::config(
                "kv_heads",
                cfg.kv_heads,
                format!(
                    "must be divisible by the sequence-parallel degree P ({})",
                    self.ranks
                ),
            ));
        }
        if self.mlp_chunk > self.local_chunk_tokens() {
            return Err(ModelError::config(
                "mlp_chunk",
                self.mlp_chunk,
                format!(
                    "must not exceed the tokens per rank and chunk c = {}",
                    self.local_chunk_tokens()
                ),
            ));
        }
        if self.loss_chunk > self.local_chunk_tokens() {
            return Err(ModelError::config(
                "loss_chunk",
                self.loss_chunk,
                format!(
                    "must not exceed the tokens per rank and chunk c = {}",
                    self.local_chunk_tokens()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_124m_has_the_known_parameter_count() {
        // GPT-2 small has 124,439,808 parameters with learned positions
        // (1024 x 768 = 786,432 of them); with RoPE those are absent.
        let c = ModelConfig::preset("gpt2-124m").unwrap();
        assert_eq!(c.param_count(), 124_439_808 - 786_432);
    }

    #[test]
    fn llama_3_8b_has_the_known_parameter_count() {
        let c = ModelConfig::preset("llama-3-8b").unwrap();
        assert_eq!(c.param_count(), 8_030_261_248);
    }

    #[test]
    fn layout_is_contiguous_and_named() {
        for p in ModelConfig::PRESETS.iter().take(2) {
            let c = ModelConfig::preset(p).unwrap();
            let l = c.layout();
            let mut end = 0;
            for e in l.entries() {
                assert_eq!(e.offset, end, "{}", e.name);
                end = e.range().end;
            }
            assert_eq!(end, l.len());
            assert!(l.get("layers.1.attn.q.weight").is_some());
        }
    }
}
