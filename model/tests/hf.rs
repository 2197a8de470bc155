//! Hugging Face weights in and out (issue #7): hand-built GPT-2 and Llama
//! directories (written here with the safetensors crate, a distinct value
//! per element) load with every element where the reference model reads
//! it (positions derived from the HF conventions, not from the mapping
//! code); F16/BF16 widen exactly; sharded indexes load; save -> load is
//! bit-for-bit; every error names the tensor or the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fpdt_model::checkpoint::Tensor;
use fpdt_model::hf;
use fpdt_model::{reference, ModelConfig, SplitMix64};
use safetensors::{Dtype, SafeTensors};

fn tmpdir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("fpdt-hf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("temp dir");
    p
}

/// One tensor of a hand-built file: name, shape, f32 values.
#[derive(Clone)]
struct T {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// Distinct values: element k of the whole file is `k / 4096` (exact in f32).
struct Counter(u32);

impl Counter {
    fn take(&mut self, shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        (0..n)
            .map(|_| {
                self.0 += 1;
                self.0 as f32 / 4096.0
            })
            .collect()
    }
}

fn t(c: &mut Counter, name: String, shape: &[usize]) -> T {
    T {
        values: c.take(shape),
        name,
        shape: shape.to_vec(),
    }
}

fn write_tensors(path: &Path, tensors: &[Tensor]) {
    let items: Vec<(&str, &Tensor)> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(items, Some(meta), path).expect("write safetensors");
}

fn write_f32(path: &Path, ts: &[T]) {
    let tensors: Vec<Tensor> = ts
        .iter()
        .map(|x| Tensor::f32(x.name.clone(), x.shape.clone(), &x.values))
        .collect();
    write_tensors(path, &tensors);
}

fn by_name<'a>(ts: &'a [T], name: &str) -> &'a T {
    ts.iter()
        .find(|x| x.name == name)
        .unwrap_or_else(|| panic!("test tensor {name}"))
}

// ---- GPT-2 ---------------------------------------------------------------

const G_H: usize = 8;
const G_HEADS: usize = 2;
const G_LAYERS: usize = 2;
const G_VOCAB: usize = 11;
const G_POS: usize = 16;
const G_INNER: usize = 4 * G_H;

fn gpt2_config(n_layer: usize) -> String {
    // Keys as transformers writes them for GPT2LMHeadModel.
    format!(
        r#"{{
  "activation_function": "gelu_new",
  "architectures": ["GPT2LMHeadModel"],
  "attn_pdrop": 0.1,
  "bos_token_id": 10,
  "embd_pdrop": 0.1,
  "eos_token_id": 10,
  "initializer_range": 0.02,
  "layer_norm_epsilon": 1e-05,
  "model_type": "gpt2",
  "n_ctx": {G_POS},
  "n_embd": {G_H},
  "n_head": {G_HEADS},
  "n_inner": null,
  "n_layer": {n_layer},
  "n_positions": {G_POS},
  "resid_pdrop": 0.1,
  "scale_attn_weights": true,
  "summary_type": "cls_index",
  "torch_dtype": "float32",
  "vocab_size": {G_VOCAB}
}}"#
    )
}

/// Every tensor of a GPT-2 checkpoint (Conv1D weights `[in, out]`), with the
/// causal-mask buffers old checkpoints carry and a non-zero `wpe`.
fn gpt2_tensors(prefix: &str) -> Vec<T> {
    let mut c = Counter(0);
    let (h, i) = (G_H, G_INNER);
    let mut v = vec![
        t(&mut c, format!("{prefix}wte.weight"), &[G_VOCAB, h]),
        t(&mut c, format!("{prefix}wpe.weight"), &[G_POS, h]),
    ];
    for l in 0..G_LAYERS {
        let n = |s: &str| format!("{prefix}h.{l}.{s}");
        v.push(t(&mut c, n("ln_1.weight"), &[h]));
        v.push(t(&mut c, n("ln_1.bias"), &[h]));
        v.push(t(&mut c, n("attn.c_attn.weight"), &[h, 3 * h]));
        v.push(t(&mut c, n("attn.c_attn.bias"), &[3 * h]));
        v.push(t(&mut c, n("attn.c_proj.weight"), &[h, h]));
        v.push(t(&mut c, n("attn.c_proj.bias"), &[h]));
        v.push(t(&mut c, n("ln_2.weight"), &[h]));
        v.push(t(&mut c, n("ln_2.bias"), &[h]));
        v.push(t(&mut c, n("mlp.c_fc.weight"), &[h, i]));
        v.push(t(&mut c, n("mlp.c_fc.bias"), &[i]));
        v.push(t(&mut c, n("mlp.c_proj.weight"), &[i, h]));
        v.push(t(&mut c, n("mlp.c_proj.bias"), &[h]));
        v.push(t(&mut c, n("attn.bias"), &[1, 1, G_POS, G_POS]));
    }
    v.push(t(&mut c, format!("{prefix}ln_f.weight"), &[h]));
    v.push(t(&mut c, format!("{prefix}ln_f.bias"), &[h]));
    v
}

fn gpt2_dir(tag: &str, prefix: &str) -> (PathBuf, Vec<T>) {
    let dir = tmpdir(tag);
    std::fs::write(dir.join("config.json"), gpt2_config(G_LAYERS)).expect("config");
    let ts = gpt2_tensors(prefix);
    write_f32(&dir.join("model.safetensors"), &ts);
    (dir, ts)
}

/// `flat[entry]` as a row-major matrix: element (row, col).
fn at(cfg: &ModelConfig, flat: &[f32], entry: &str, row: usize, col: usize) -> f32 {
    let layout = cfg.layout();
    let e = layout
        .get(entry)
        .unwrap_or_else(|| panic!("layout has {entry}"));
    let cols = if e.shape.len() == 2 { e.shape[1] } else { 1 };
    assert!(row < e.shape[0] && col < cols, "{entry} ({row}, {col})");
    flat[e.offset + row * cols + col]
}

/// The HF Conv1D convention: `y[o] = sum_i x[i] W[i][o] + b[o]` with W
/// `[in, total]`; output `o` of our `[out, in]` matrix (`y = x W^T`) is
/// column `col + o`. Checks every element of `entry`.
fn assert_conv1d(cfg: &ModelConfig, flat: &[f32], entry: &str, w: &T, col: usize) {
    let (inp, total) = (w.shape[0], w.shape[1]);
    let e = cfg.layout().get(entry).cloned().expect("entry");
    assert_eq!(e.shape[1], inp, "{entry} in-dim");
    for o in 0..e.shape[0] {
        for i in 0..inp {
            assert_eq!(
                at(cfg, flat, entry, o, i).to_bits(),
                w.values[i * total + col + o].to_bits(),
                "{entry}[{o}][{i}] should be {}[{i}][{}]",
                w.name,
                col + o
            );
        }
    }
}

fn assert_copy(cfg: &ModelConfig, flat: &[f32], entry: &str, src: &[f32]) {
    let e = cfg.layout().get(entry).cloned().expect("entry");
    assert_eq!(e.numel(), src.len(), "{entry} size");
    for (k, s) in src.iter().enumerate() {
        assert_eq!(flat[e.offset + k].to_bits(), s.to_bits(), "{entry}[{k}]");
    }
}

fn check_gpt2_positions(cfg: &ModelConfig, flat: &[f32], ts: &[T], prefix: &str) {
    let h = G_H;
    let g = |s: &str| by_name(ts, &format!("{prefix}{s}"));
    assert_copy(cfg, flat, "embed.weight", &g("wte.weight").values);
    for l in 0..G_LAYERS {
        let n = |s: &str| format!("layers.{l}.{s}");
        let hf = |s: &str| g(&format!("h.{l}.{s}"));
        assert_copy(cfg, flat, &n("norm1.weight"), &hf("ln_1.weight").values);
        assert_copy(cfg, flat, &n("norm1.bias"), &hf("ln_1.bias").values);
        let w = hf("attn.c_attn.weight");
        assert_conv1d(cfg, flat, &n("attn.q.weight"), w, 0);
        assert_conv1d(cfg, flat, &n("attn.k.weight"), w, h);
        assert_conv1d(cfg, flat, &n("attn.v.weight"), w, 2 * h);
        let b = &hf("attn.c_attn.bias").values;
        assert_copy(cfg, flat, &n("attn.q.bias"), &b[0..h]);
        assert_copy(cfg, flat, &n("attn.k.bias"), &b[h..2 * h]);
        assert_copy(cfg, flat, &n("attn.v.bias"), &b[2 * h..3 * h]);
        assert_conv1d(cfg, flat, &n("attn.o.weight"), hf("attn.c_proj.weight"), 0);
        assert_copy(cfg, flat, &n("attn.o.bias"), &hf("attn.c_proj.bias").values);
        assert_copy(cfg, flat, &n("norm2.weight"), &hf("ln_2.weight").values);
        assert_copy(cfg, flat, &n("norm2.bias"), &hf("ln_2.bias").values);
        assert_conv1d(cfg, flat, &n("mlp.fc.weight"), hf("mlp.c_fc.weight"), 0);
        assert_copy(cfg, flat, &n("mlp.fc.bias"), &hf("mlp.c_fc.bias").values);
        assert_conv1d(cfg, flat, &n("mlp.proj.weight"), hf("mlp.c_proj.weight"), 0);
        assert_copy(
            cfg,
            flat,
            &n("mlp.proj.bias"),
            &hf("mlp.c_proj.bias").values,
        );
    }
    assert_copy(cfg, flat, "norm_f.weight", &g("ln_f.weight").values);
    assert_copy(cfg, flat, "norm_f.bias", &g("ln_f.bias").values);
}

#[test]
fn hand_built_gpt2_lands_where_the_reference_reads_it() {
    for prefix in ["transformer.", ""] {
        let (dir, ts) = gpt2_dir(&format!("gpt2-pos-{}", prefix.len()), prefix);
        let got = hf::load(&dir).expect("load gpt2");
        let cfg = &got.config;
        assert_eq!(
            (
                cfg.vocab_size,
                cfg.hidden,
                cfg.layers,
                cfg.heads,
                cfg.kv_heads
            ),
            (G_VOCAB, G_H, G_LAYERS, G_HEADS, G_HEADS)
        );
        assert_eq!((cfg.intermediate, cfg.max_seq_len), (G_INNER, G_POS));
        assert!(cfg.tie_embeddings);
        assert_eq!(got.params.len(), cfg.layout().len());
        check_gpt2_positions(cfg, &got.params, &ts, prefix);

        // q of one input row, computed the HF way (x W + b over the fused
        // columns 0..h) and the reference's way (x Wq^T + bq) from the
        // loaded buffer, agree.
        let x: Vec<f64> = (0..G_H).map(|i| 0.5 - i as f64 * 0.125).collect();
        let w = by_name(&ts, &format!("{prefix}h.1.attn.c_attn.weight"));
        let b = by_name(&ts, &format!("{prefix}h.1.attn.c_attn.bias"));
        for o in 0..G_H {
            let hf_q: f64 = (0..G_H)
                .map(|i| x[i] * f64::from(w.values[i * 3 * G_H + o]))
                .sum::<f64>()
                + f64::from(b.values[o]);
            let ours: f64 = (0..G_H)
                .map(|i| x[i] * f64::from(at(cfg, &got.params, "layers.1.attn.q.weight", o, i)))
                .sum::<f64>()
                + f64::from(at(cfg, &got.params, "layers.1.attn.q.bias", o, 0));
            assert_eq!(hf_q, ours, "q[{o}]");
        }

        // Dropped on purpose, and said so: wpe (non-zero here) and the
        // causal-mask buffers; nothing unexpected.
        let r = &got.report;
        assert!(r.unexpected.is_empty(), "{:?}", r.unexpected);
        assert!(
            r.dropped
                .iter()
                .any(|d| d.starts_with(&format!("{prefix}wpe.weight"))),
            "{:?}",
            r.dropped
        );
        for l in 0..G_LAYERS {
            let name = format!("{prefix}h.{l}.attn.bias");
            assert!(r.dropped.iter().any(|d| d.starts_with(&name)), "{name}");
        }
        assert!(
            r.notes
                .iter()
                .any(|n| n.contains("wpe") && n.contains("RoPE")),
            "{:?}",
            r.notes
        );
        assert_eq!(r.dtypes.get("F32"), Some(&(3 + 12 * G_LAYERS)));
        assert_eq!(r.files, vec![dir.join("model.safetensors")]);

        // The loaded weights run through the reference model.
        let p64: Vec<f64> = got.params.iter().map(|&v| f64::from(v) * 0.01).collect();
        let out = reference::run(cfg, &p64, &[1, 2, 3, 4], &[2, 3, 4, 5], false).expect("ref");
        assert!(out.loss.is_finite() && out.loss > 0.0, "{}", out.loss);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

// ---- Llama ---------------------------------------------------------------

fn llama_config(tied: bool) -> String {
    format!(
        r#"{{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 8,
  "initializer_range": 0.02,
  "intermediate_size": 12,
  "max_position_embeddings": 64,
  "model_type": "llama",
  "num_attention_heads": 4,
  "num_hidden_layers": 2,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_scaling": {{"factor": 8.0, "rope_type": "llama3"}},
  "rope_theta": 500000.0,
  "tie_word_embeddings": {tied},
  "torch_dtype": "bfloat16",
  "vocab_size": 7
}}"#
    )
}

fn llama_tensors(tied: bool) -> Vec<T> {
    let mut c = Counter(0);
    let (h, kv, i, v) = (8, 4, 12, 7);
    let mut out = vec![t(&mut c, "model.embed_tokens.weight".into(), &[v, h])];
    for l in 0..2 {
        let n = |s: &str| format!("model.layers.{l}.{s}");
        out.push(t(&mut c, n("input_layernorm.weight"), &[h]));
        out.push(t(&mut c, n("self_attn.q_proj.weight"), &[h, h]));
        out.push(t(&mut c, n("self_attn.k_proj.weight"), &[kv, h]));
        out.push(t(&mut c, n("self_attn.v_proj.weight"), &[kv, h]));
        out.push(t(&mut c, n("self_attn.o_proj.weight"), &[h, h]));
        out.push(t(&mut c, n("post_attention_layernorm.weight"), &[h]));
        out.push(t(&mut c, n("mlp.gate_proj.weight"), &[i, h]));
        out.push(t(&mut c, n("mlp.up_proj.weight"), &[i, h]));
        out.push(t(&mut c, n("mlp.down_proj.weight"), &[h, i]));
        out.push(t(&mut c, n("self_attn.rotary_emb.inv_freq"), &[1]));
    }
    out.push(t(&mut c, "model.norm.weight".into(), &[h]));
    if !tied {
        out.push(t(&mut c, "lm_head.weight".into(), &[v, h]));
    }
    out
}

#[test]
fn hand_built_llama_gqa_copies_every_linear_as_is() {
    for tied in [false, true] {
        let dir = tmpdir(&format!("llama-pos-{tied}"));
        std::fs::write(dir.join("config.json"), llama_config(tied)).expect("config");
        let ts = llama_tensors(tied);
        write_f32(&dir.join("model.safetensors"), &ts);
        let got = hf::load(&dir).expect("load llama");
        let cfg = &got.config;
        assert_eq!((cfg.heads, cfg.kv_heads, cfg.head_dim), (4, 2, 2));
        assert_eq!((cfg.rope_theta, cfg.norm_eps), (500_000.0, 1e-6));
        assert_eq!(cfg.tie_embeddings, tied);
        let g = |s: &str| &by_name(&ts, s).values;
        assert_copy(
            cfg,
            &got.params,
            "embed.weight",
            g("model.embed_tokens.weight"),
        );
        for l in 0..2 {
            let hf = |s: &str| g(&format!("model.layers.{l}.{s}"));
            let n = |s: &str| format!("layers.{l}.{s}");
            // nn.Linear is [out, in], as ours: element (o, i) in the same place.
            for (ours, theirs) in [
                ("norm1.weight", "input_layernorm.weight"),
                ("attn.q.weight", "self_attn.q_proj.weight"),
                ("attn.k.weight", "self_attn.k_proj.weight"),
                ("attn.v.weight", "self_attn.v_proj.weight"),
                ("attn.o.weight", "self_attn.o_proj.weight"),
                ("norm2.weight", "post_attention_layernorm.weight"),
                ("mlp.gate.weight", "mlp.gate_proj.weight"),
                ("mlp.up.weight", "mlp.up_proj.weight"),
                ("mlp.down.weight", "mlp.down_proj.weight"),
            ] {
                assert_copy(cfg, &got.params, &n(ours), hf(theirs));
            }
            // k is [kv_heads * head_dim, hidden] = [4, 8]: row 3, column 5.
            let k = hf("self_attn.k_proj.weight");
            assert_eq!(
                at(cfg, &got.params, &n("attn.k.weight"), 3, 5),
                k[3 * 8 + 5]
            );
        }
        assert_copy(cfg, &got.params, "norm_f.weight", g("model.norm.weight"));
        if !tied {
            assert_copy(cfg, &got.params, "lm_head.weight", g("lm_head.weight"));
        }
        let r = &got.report;
        assert!(r.unexpected.is_empty(), "{:?}", r.unexpected);
        assert_eq!(r.dropped.len(), 2, "{:?}", r.dropped); // two inv_freq buffers
        assert!(
            r.notes.iter().any(|n| n.contains("rope_scaling")),
            "{:?}",
            r.notes
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

// ---- dtypes ----------------------------------------------------------------

#[test]
fn bf16_and_f16_tensors_widen_exactly() {
    let (dir, ts) = gpt2_dir("dtypes", "transformer.");
    // wte in BF16: bit patterns 0x3F80 + k are 1 + k/128 (bf16 is the top
    // half of an f32, so its value is the f32 with those 16 high bits).
    let n_wte = G_VOCAB * G_H;
    let bf: Vec<u16> = (0..n_wte as u16).map(|k| 0x3F80 + k).collect();
    // ln_f.weight in F16: hand-decoded IEEE half values.
    let f16_cases: [(u16, f32); G_H] = [
        (0x3C00, 1.0),
        (0xC000, -2.0),
        (0x3555, 0.333_251_95),
        (0x0001, 5.960_464_5e-8), // smallest subnormal, 2^-24
        (0x7BFF, 65504.0),        // largest finite
        (0x8000, -0.0),
        (0x0400, 6.103_515_6e-5), // smallest normal, 2^-14
        (0x3800, 0.5),
    ];
    let mut tensors: Vec<Tensor> = Vec::new();
    for x in &ts {
        if x.name == "transformer.wte.weight" {
            tensors.push(Tensor {
                name: x.name.clone(),
                dtype: Dtype::BF16,
                shape: x.shape.clone(),
                data: bf.iter().flat_map(|b| b.to_le_bytes()).collect(),
            });
        } else if x.name == "transformer.ln_f.weight" {
            tensors.push(Tensor {
                name: x.name.clone(),
                dtype: Dtype::F16,
                shape: x.shape.clone(),
                data: f16_cases
                    .iter()
                    .flat_map(|(b, _)| b.to_le_bytes())
                    .collect(),
            });
        } else {
            tensors.push(Tensor::f32(x.name.clone(), x.shape.clone(), &x.values));
        }
    }
    write_tensors(&dir.join("model.safetensors"), &tensors);
    let got = hf::load(&dir).expect("load mixed dtypes");
    let cfg = &got.config;
    for (k, b) in bf.iter().enumerate() {
        let want = 1.0 + k as f32 / 128.0;
        assert_eq!(
            f32::from_bits(u32::from(*b) << 16),
            want,
            "test's own decode"
        );
        assert_eq!(
            at(cfg, &got.params, "embed.weight", k / G_H, k % G_H).to_bits(),
            want.to_bits(),
            "bf16 element {k}"
        );
    }
    for (k, (_, want)) in f16_cases.iter().enumerate() {
        assert_eq!(
            at(cfg, &got.params, "norm_f.weight", k, 0).to_bits(),
            want.to_bits(),
            "f16 element {k}"
        );
    }
    let d = &got.report.dtypes;
    assert_eq!((d.get("BF16"), d.get("F16")), (Some(&1), Some(&1)), "{d:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- shards ----------------------------------------------------------------

fn write_sharded(dir: &Path, ts: &[T], index_override: Option<(&str, &str)>) {
    let (a, b) = ts.split_at(ts.len() / 2);
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    write_f32(&dir.join(names[0]), a);
    write_f32(&dir.join(names[1]), b);
    let mut map = serde_json::Map::new();
    for (part, file) in [(a, names[0]), (b, names[1])] {
        for x in part {
            map.insert(x.name.clone(), file.into());
        }
    }
    if let Some((tensor, file)) = index_override {
        map.insert(tensor.into(), file.into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
}

#[test]
fn sharded_weights_load_like_one_file() {
    let (one, ts) = gpt2_dir("shard-one", "transformer.");
    let single = hf::load(&one).expect("single");
    let dir = tmpdir("shard-two");
    std::fs::write(dir.join("config.json"), gpt2_config(G_LAYERS)).expect("config");
    write_sharded(&dir, &ts, None);
    let got = hf::load(&dir).expect("sharded");
    assert_eq!(got.report.files.len(), 2);
    assert_eq!(got.params.len(), single.params.len());
    assert!(got
        .params
        .iter()
        .zip(&single.params)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    check_gpt2_positions(&got.config, &got.params, &ts, "transformer.");

    // The index names a shard that is not there.
    let bad = tmpdir("shard-missing");
    std::fs::write(bad.join("config.json"), gpt2_config(G_LAYERS)).expect("config");
    write_sharded(
        &bad,
        &ts,
        Some(("transformer.ln_f.bias", "model-00003-of-00003.safetensors")),
    );
    let e = hf::load(&bad).expect_err("missing shard").to_string();
    assert!(e.contains("model-00003-of-00003.safetensors"), "{e}");

    // The index puts a tensor in the wrong shard.
    let wrong = tmpdir("shard-wrong");
    std::fs::write(wrong.join("config.json"), gpt2_config(G_LAYERS)).expect("config");
    write_sharded(
        &wrong,
        &ts,
        Some(("transformer.wte.weight", "model-00002-of-00002.safetensors")),
    );
    let e = hf::load(&wrong).expect_err("wrong shard").to_string();
    assert!(
        e.contains("transformer.wte.weight") && e.contains("model-00002-of-00002"),
        "{e}"
    );
    for d in [one, dir, bad, wrong] {
        let _ = std::fs::remove_dir_all(d);
    }
}

// ---- load errors -------------------------------------------------------------

fn gpt2_variant(tag: &str, config: String, edit: impl FnOnce(&mut Vec<T>)) -> (PathBuf, String) {
    let dir = tmpdir(tag);
    std::fs::write(dir.join("config.json"), config).expect("config");
    let mut ts = gpt2_tensors("transformer.");
    edit(&mut ts);
    write_f32(&dir.join("model.safetensors"), &ts);
    let msg = match hf::load(&dir) {
        Ok(_) => String::from("(loaded)"),
        Err(e) => e.to_string(),
    };
    (dir, msg)
}

#[test]
fn load_errors_name_the_tensor_and_the_file() {
    let cfg = || gpt2_config(G_LAYERS);
    let mut dirs = Vec::new();

    let (d, e) = gpt2_variant("err-missing", cfg(), |ts| {
        ts.retain(|x| x.name != "transformer.h.1.mlp.c_fc.bias")
    });
    assert!(
        e.contains("transformer.h.1.mlp.c_fc.bias")
            && e.contains("missing")
            && e.contains("model.safetensors"),
        "{e}"
    );
    dirs.push(d);

    let (d, e) = gpt2_variant("err-shape", cfg(), |ts| {
        for x in ts.iter_mut() {
            if x.name == "transformer.h.0.mlp.c_fc.weight" {
                x.shape = vec![G_INNER, G_H]; // nn.Linear order instead of Conv1D's
            }
        }
    });
    assert!(
        e.contains("transformer.h.0.mlp.c_fc.weight")
            && e.contains(&format!("{:?}", [G_INNER, G_H]))
            && e.contains(&format!("{:?}", [G_H, G_INNER]))
            && e.contains("model.safetensors"),
        "{e}"
    );
    dirs.push(d);

    // config.json says one layer, the weights have two.
    let (d, e) = gpt2_variant("err-layers", gpt2_config(1), |_| {});
    assert!(
        e.contains("transformer.h.1.") && e.contains("config.json") && e.contains("1 layers"),
        "{e}"
    );
    dirs.push(d);

    // config.json's vocabulary differs from the embedding's rows.
    let (d, e) = gpt2_variant(
        "err-vocab",
        cfg().replace(&format!("\"vocab_size\": {G_VOCAB}"), "\"vocab_size\": 12"),
        |_| {},
    );
    assert!(
        e.contains("transformer.wte.weight") && e.contains("[12, 8]") && e.contains("[11, 8]"),
        "{e}"
    );
    dirs.push(d);

    let (d, e) = gpt2_variant("err-nan", cfg(), |ts| {
        for x in ts.iter_mut() {
            if x.name == "transformer.h.0.ln_2.bias" {
                x.values[3] = f32::NAN;
            }
        }
    });
    assert!(
        e.contains("transformer.h.0.ln_2.bias") && e.contains("element 3"),
        "{e}"
    );
    dirs.push(d);

    // An unknown tensor is listed, not an error and not silently ignored.
    let dir = tmpdir("err-extra");
    std::fs::write(dir.join("config.json"), cfg()).expect("config");
    let mut ts = gpt2_tensors("transformer.");
    ts.push(T {
        name: "transformer.h.0.attn.q_norm.weight".into(),
        shape: vec![G_H],
        values: vec![1.0; G_H],
    });
    write_f32(&dir.join("model.safetensors"), &ts);
    let got = hf::load(&dir).expect("extra tensor loads");
    assert_eq!(
        got.report.unexpected,
        vec![format!("transformer.h.0.attn.q_norm.weight F32 [{G_H}]")]
    );
    assert!(got.report.notes.iter().any(|n| n.contains("q_norm")));
    dirs.push(dir);

    // Unsupported dtype.
    let dir = tmpdir("err-dtype");
    std::fs::write(dir.join("config.json"), cfg()).expect("config");
    let tensors: Vec<Tensor> = gpt2_tensors("transformer.")
        .iter()
        .map(|x| {
            let mut t = Tensor::f32(x.name.clone(), x.shape.clone(), &x.values);
            if x.name == "transformer.wte.weight" {
                t.dtype = Dtype::I32;
            }
            t
        })
        .collect();
    write_tensors(&dir.join("model.safetensors"), &tensors);
    let e = hf::load(&dir).expect_err("i32").to_string();
    assert!(
        e.contains("transformer.wte.weight")
            && e.contains("I32")
            && e.contains("model.safetensors"),
        "{e}"
    );
    dirs.push(dir);

    // A truncated weights file.
    let (dir, _) = gpt2_dir("err-trunc", "transformer.");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() - 100]).expect("truncate");
    let e = hf::load(&dir).expect_err("truncated").to_string();
    assert!(e.contains(&path.display().to_string()), "{e}");
    dirs.push(dir);

    // No weights at all; no config.json; no directory.
    let dir = tmpdir("err-noweights");
    std::fs::write(dir.join("config.json"), cfg()).expect("config");
    let e = hf::load(&dir).expect_err("no weights").to_string();
    assert!(
        e.contains(&dir.display().to_string()) && e.contains("model.safetensors"),
        "{e}"
    );
    std::fs::remove_file(dir.join("config.json")).expect("rm");
    let e = hf::load(&dir).expect_err("no config").to_string();
    assert!(e.contains("config.json"), "{e}");
    let e = hf::load(&dir.join("absent"))
        .expect_err("no dir")
        .to_string();
    assert!(e.contains("absent"), "{e}");
    dirs.push(dir);

    // A config key with a bad value names the file and the key.
    let (d, e) = gpt2_variant(
        "err-cfg",
        cfg().replace("\"n_head\": 2", "\"n_head\": -2"),
        |_| {},
    );
    assert!(e.contains("config.json") && e.contains("n_head"), "{e}");
    dirs.push(d);

    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

// ---- save ------------------------------------------------------------------

/// Parameters with a distinct value per element (and non-trivial biases).
fn distinct_params(cfg: &ModelConfig, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..cfg.layout().len())
        .map(|k| (k as f32 + 1.0) * 1e-4 + (rng.uniform_sym() as f32) * 1e-6)
        .collect()
}

fn assert_bits_eq(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "element {k}");
    }
}

fn read_saved(dir: &Path) -> (Vec<u8>, serde_json::Value) {
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("saved weights");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("cfg"))
            .expect("json");
    (bytes, cfg)
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let v = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(v.dtype(), Dtype::F32, "{name}");
    let vals = v
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (v.shape().to_vec(), vals)
}

#[test]
fn gpt_round_trip_is_bit_exact_and_in_hf_layout() {
    let cfg = ModelConfig::preset("tiny-gpt").expect("preset");
    let params = distinct_params(&cfg, 7);
    let root = tmpdir("save-gpt");
    let dir = root.join("export");
    hf::save(&dir, &cfg, &params).expect("save");
    let got = hf::load(&dir).expect("load back");
    assert_eq!(got.config, cfg);
    assert_bits_eq(&got.params, &params);
    assert!(got.report.unexpected.is_empty());
    assert!(
        got.report
            .dropped
            .iter()
            .any(|d| d.contains("wpe") && d.contains("zeros")),
        "{:?}",
        got.report.dropped
    );

    // What is on disk is HF's layout, checked without hf.rs.
    let (bytes, json) = read_saved(&dir);
    assert_eq!(json["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(json["n_embd"], cfg.hidden);
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    assert!(
        st.tensor("lm_head.weight").is_err(),
        "tied head is not written"
    );
    let h = cfg.hidden;
    let (shape, w) = f32s(&st, "transformer.h.1.attn.c_attn.weight");
    assert_eq!(shape, vec![h, 3 * h]);
    for o in 0..h {
        for i in 0..h {
            assert_eq!(
                w[i * 3 * h + h + o],
                at(&cfg, &params, "layers.1.attn.k.weight", o, i)
            );
        }
    }
    let (shape, w) = f32s(&st, "transformer.h.0.mlp.c_proj.weight");
    assert_eq!(shape, vec![cfg.intermediate, h]);
    assert_eq!(
        w[5 * h + 3],
        at(&cfg, &params, "layers.0.mlp.proj.weight", 3, 5)
    );
    let (shape, wpe) = f32s(&st, "transformer.wpe.weight");
    assert_eq!(shape, vec![cfg.max_seq_len, h]);
    assert!(wpe.iter().all(|&x| x == 0.0));
    let names: Vec<String> = std::fs::read_dir(&root)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["export".to_string()], "no temporary leftovers");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn llama_round_trip_is_bit_exact_gqa_tied_and_untied() {
    for tied in [false, true] {
        let cfg = ModelConfig {
            tie_embeddings: tied,
            ..ModelConfig::preset("tiny-llama").expect("preset")
        };
        assert!(cfg.kv_heads < cfg.heads, "GQA");
        let params = distinct_params(&cfg, 11);
        let root = tmpdir(&format!("save-llama-{tied}"));
        let dir = root.join("export");
        hf::save(&dir, &cfg, &params).expect("save");
        let got = hf::load(&dir).expect("load back");
        assert_eq!(got.config, cfg);
        assert_bits_eq(&got.params, &params);
        assert!(got.report.unexpected.is_empty() && got.report.dropped.is_empty());

        let (bytes, json) = read_saved(&dir);
        assert_eq!(json["architectures"][0], "LlamaForCausalLM");
        assert_eq!(json["num_key_value_heads"], cfg.kv_heads);
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        let (shape, k) = f32s(&st, "model.layers.1.self_attn.k_proj.weight");
        assert_eq!(shape, vec![cfg.kv_dim(), cfg.hidden]);
        assert_eq!(
            k[2 * cfg.hidden + 7],
            at(&cfg, &params, "layers.1.attn.k.weight", 2, 7)
        );
        assert_eq!(st.tensor("lm_head.weight").is_ok(), !tied);
        let _ = std::fs::remove_dir_all(&root);
    }
}

#[test]
fn bf16_save_rounds_and_loads_back() {
    let cfg = ModelConfig::preset("tiny-llama").expect("preset");
    // Values with at most 8 significant bits are exact in bf16.
    let params: Vec<f32> = (0..cfg.layout().len())
        .map(|k| ((k % 255) as f32 - 127.0) / 64.0)
        .collect();
    let root = tmpdir("save-bf16");
    let dir = root.join("export");
    hf::save_as(&dir, &cfg, &params, Dtype::BF16).expect("save bf16");
    let (bytes, json) = read_saved(&dir);
    assert_eq!(json["torch_dtype"], "bfloat16");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    assert_eq!(
        st.tensor("model.norm.weight").expect("norm").dtype(),
        Dtype::BF16
    );
    assert!(
        bytes.len() < 4 * params.len(),
        "about half the bytes of f32"
    );
    let got = hf::load(&dir).expect("load bf16");
    assert_bits_eq(&got.params, &params);
    assert_eq!(
        got.report.dtypes.get("BF16"),
        Some(&(2 + 9 * cfg.layers + 1))
    );
    let e = hf::save_as(&dir, &cfg, &params, Dtype::I8).expect_err("i8");
    assert!(e.to_string().contains("dtype"), "{e}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn saving_over_an_export_replaces_weights_and_keeps_other_files() {
    let cfg = ModelConfig::preset("tiny-gpt").expect("preset");
    let root = tmpdir("save-over");
    let dir = root.join("export");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("tokenizer.json"), "{\"kept\": true}").expect("tok");
    std::fs::write(dir.join("model-00001-of-00002.safetensors"), "stale").expect("stale");
    std::fs::write(dir.join("model.safetensors.index.json"), "{}").expect("stale index");
    let first = distinct_params(&cfg, 1);
    hf::save(&dir, &cfg, &first).expect("first save");
    let second: Vec<f32> = first.iter().map(|x| -x).collect();
    hf::save(&dir, &cfg, &second).expect("second save");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("tokenizer.json")).expect("tok"),
        "{\"kept\": true}"
    );
    assert_bits_eq(&hf::load(&dir).expect("load").params, &second);
    let leftovers: Vec<String> = std::fs::read_dir(&root)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "export")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn save_refuses_what_hf_cannot_hold_and_writes_nothing() {
    let root = tmpdir("save-bad");
    let dir = root.join("export");
    let gqa_gpt = ModelConfig {
        kv_heads: 2,
        ..ModelConfig::preset("tiny-gpt").expect("preset")
    };
    let e = hf::save(&dir, &gqa_gpt, &vec![0.0; gqa_gpt.layout().len()])
        .expect_err("gpt with gqa")
        .to_string();
    assert!(e.contains("kv_heads") && e.contains('2'), "{e}");

    let cfg = ModelConfig::preset("tiny-llama").expect("preset");
    let short = vec![0.0; cfg.layout().len() - 1];
    let e = hf::save(&dir, &cfg, &short).expect_err("short").to_string();
    assert!(
        e.contains(&(cfg.layout().len() - 1).to_string())
            && e.contains(&cfg.layout().len().to_string()),
        "{e}"
    );
    assert!(!dir.exists());
    let left: Vec<_> = std::fs::read_dir(&root).expect("ls").flatten().collect();
    assert!(left.is_empty());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_tied_head_in_the_file_is_dropped_and_a_differing_one_is_noted() {
    for same in [true, false] {
        let dir = tmpdir(&format!("tied-head-{same}"));
        std::fs::write(dir.join("config.json"), gpt2_config(G_LAYERS)).expect("config");
        let mut ts = gpt2_tensors("transformer.");
        let mut head = by_name(&ts, "transformer.wte.weight").clone();
        head.name = "lm_head.weight".into();
        if !same {
            head.values[0] += 1.0;
        }
        ts.push(head);
        write_f32(&dir.join("model.safetensors"), &ts);
        let got = hf::load(&dir).expect("load");
        let r = &got.report;
        assert!(r.unexpected.is_empty(), "{:?}", r.unexpected);
        let d = r
            .dropped
            .iter()
            .find(|d| d.starts_with("lm_head.weight"))
            .expect("head dropped");
        assert_eq!(d.contains("equal"), same, "{d}");
        assert_eq!(
            r.notes.iter().any(|n| n.contains("lm_head")),
            !same,
            "{:?}",
            r.notes
        );
        // The embedding (the head, tied) is wte, not the file's lm_head.
        assert_copy(
            &got.config,
            &got.params,
            "embed.weight",
            &by_name(&ts, "transformer.wte.weight").values,
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_missing_export_points_at_the_copy_an_interrupted_save_left() {
    let root = tmpdir("interrupted");
    std::fs::create_dir_all(root.join(".old-hf-export-4242")).expect("old copy");
    let e = hf::load(&root.join("export"))
        .expect_err("absent")
        .to_string();
    assert!(e.contains(".old-hf-export-4242"), "{e}");
    let _ = std::fs::remove_dir_all(&root);
}

fn entries(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_save_stopped_at_any_stage_leaves_one_whole_export_and_the_next_save_cleans_up() {
    use hf::SaveStage;
    let cfg = ModelConfig::preset("tiny-gpt").expect("preset");
    let v1 = distinct_params(&cfg, 3);
    let v2: Vec<f32> = v1.iter().map(|x| x * 2.0).collect();
    let v3: Vec<f32> = v1.iter().map(|x| x * 3.0).collect();
    for stage in [
        SaveStage::Written,
        SaveStage::OldMovedAside,
        SaveStage::Renamed,
    ] {
        let root = tmpdir(&format!("crash-{stage:?}"));
        let dir = root.join("export");
        hf::save(&dir, &cfg, &v1).expect("first save");
        std::fs::write(dir.join("tokenizer.json"), "tok").expect("tokenizer");
        let e = hf::save_with_hook(&dir, &cfg, &v2, Dtype::F32, &mut |s| {
            if s == stage {
                Err(fpdt_model::ModelError::Checkpoint(format!(
                    "crash at {s:?}"
                )))
            } else {
                Ok(())
            }
        })
        .expect_err("stopped");
        assert!(e.to_string().contains("crash"), "{e}");
        let left = entries(&root);
        match stage {
            // The export is the old one, whole; the new one waits in a
            // temporary directory.
            SaveStage::Written => {
                assert_bits_eq(&hf::load(&dir).expect("old export").params, &v1);
                assert!(
                    left.iter().any(|n| n.starts_with(".tmp-hf-export-")),
                    "{left:?}"
                );
            }
            // The export is absent; the old one is whole beside it, and a
            // load says where.
            SaveStage::OldMovedAside => {
                assert!(!dir.exists());
                let old = left
                    .iter()
                    .find(|n| n.starts_with(".old-hf-export-"))
                    .expect("old copy");
                let msg = hf::load(&dir).expect_err("absent").to_string();
                assert!(msg.contains(old.as_str()), "{msg}");
                assert_bits_eq(&hf::load(&root.join(old)).expect("old copy").params, &v1);
            }
            // The new export is in place, the old copy not yet removed.
            SaveStage::Renamed => {
                assert_bits_eq(&hf::load(&dir).expect("new export").params, &v2);
                assert!(
                    left.iter().any(|n| n.starts_with(".old-hf-export-")),
                    "{left:?}"
                );
            }
        }
        hf::save(&dir, &cfg, &v3).expect("next save");
        assert_eq!(entries(&root), ["export"], "leftovers removed");
        assert_bits_eq(&hf::load(&dir).expect("latest").params, &v3);
        assert_eq!(
            std::fs::read_to_string(dir.join("tokenizer.json")).expect("kept"),
            "tok",
            "the tokenizer survives a stopped save at {stage:?}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
