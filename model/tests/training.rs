//! Training steps of the FPDT model against the reference, the cpu/meta
//! allocation-trace equality, and bad input.

mod common;

use common::*;
use fpdt_model::{reference, FpdtGroup, ModelConfig, Schedule};
use fpdt_runtime::MetaConfig;

#[test]
fn three_adamw_steps_follow_the_reference_losses() {
    let opt = test_adamw();
    for cfg in [tiny_gpt(), tiny_llama()] {
        let mut params = random_params(&cfg, 21);
        let p32: Vec<f32> = params.iter().map(|&x| x as f32).collect();
        let sched = Schedule::fpdt(24, 2, 3);
        let mut g = FpdtGroup::cpu(&cfg, sched, &p32, &cpu()).unwrap();
        let (mut m, mut v) = (vec![0.0; params.len()], vec![0.0; params.len()]);
        let mut losses = Vec::new();
        for step in 1..=3u32 {
            let (tokens, targets) = random_batch(&cfg, 24, 100 + u64::from(step));
            let r = reference::loss_and_grads(&cfg, &params, &tokens, &targets).unwrap();
            let out = g.step(&tokens, &targets).unwrap();
            let rel = (out.loss - r.loss).abs() / r.loss;
            assert!(
                rel < 1e-4,
                "{:?} step {step}: loss {} vs {} (rel {rel:e})",
                cfg.family,
                out.loss,
                r.loss
            );
            losses.push(r.loss);
            reference::adamw_step(&mut params, &r.grads, &mut m, &mut v, &opt, step as i32);
            g.adamw_step(&opt).unwrap();
        }
        // The weights after three steps follow too.
        let w = g.ranks()[0].params().unwrap();
        let (err, i) = max_rel(
            &w.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
            &params,
            1e-2,
        );
        assert!(err < 1e-3, "{:?}: weight {i} off by {err:e}", cfg.family);
        assert!(losses.iter().all(|l| l.is_finite()));
    }
}

#[test]
fn meta_device_gives_the_cpu_allocation_trace() {
    for (cfg, sched) in [
        (tiny_gpt(), Schedule::fpdt(24, 2, 3)),
        (
            tiny_llama(),
            Schedule {
                checkpoint: false,
                ..Schedule::fpdt(16, 2, 4)
            },
        ),
        (tiny_gpt(), Schedule::ulysses(12, 4)),
    ] {
        assert_cpu_and_meta_traces_equal(&cfg, sched);
    }
}

#[test]
fn meta_device_runs_a_full_size_config_without_data() {
    // llama-3-8b layer shapes at 64K tokens on 4 ranks would not fit this
    // machine; meta only records sizes. One layer keeps it quick.
    let cfg = ModelConfig {
        layers: 1,
        ..ModelConfig::preset("llama-3-8b").unwrap()
    };
    let sched = Schedule::fpdt(1 << 16, 4, 16);
    let meta = MetaConfig {
        device_memory: 200 << 30,
        host_memory: 1 << 42,
        ..MetaConfig::default()
    };
    let mut g = FpdtGroup::meta(&cfg, sched, &meta).unwrap();
    let tokens = vec![0u32; sched.seq_len];
    let targets = vec![1i32; sched.seq_len];
    g.forward_backward(&tokens, &targets).unwrap();
    let peak = g.ranks()[0]
        .device()
        .ledger()
        .usage(fpdt_runtime::Space::Device)
        .peak;
    // Weights and gradients (f32) plus O(chunk) activations: at 64K tokens
    // the largest are one loss sub-chunk's logits and their gradient
    // (512 rows x 128256 x 4 bytes each).
    // Weights and gradients are padded to a multiple of P; the optimizer's
    // device shard (1/P of them) receives the reduce-scatter.
    let n_pad = cfg.layout().padded_len(4);
    let fixed = (2 * n_pad + n_pad / 4) * 4;
    assert!(
        peak > fixed,
        "peak {peak} must hold params, grads and the optimizer shard ({fixed})"
    );
    assert!(
        peak - fixed < 1 << 30,
        "activations {} exceed 1 GiB",
        peak - fixed
    );
    assert!(g.ranks()[0].loss().is_err(), "meta has no data to download");
}

#[test]
fn bad_configs_are_rejected_before_allocation_naming_field_value_and_rule() {
    let gpt = tiny_gpt();
    let p = vec![0.0f32; gpt.layout().len()];
    let dev_cfg = cpu();
    let err = |cfg: &ModelConfig, s: Schedule| {
        FpdtGroup::cpu(cfg, s, &p, &dev_cfg)
            .unwrap_err()
            .to_string()
    };
    // heads (4) not divisible by P = 3.
    let e = err(&gpt, Schedule::fpdt(18, 3, 2));
    assert!(e.contains("heads = 4") && e.contains("P (3)"), "{e}");
    // seq_len not divisible by u * P.
    let e = err(&gpt, Schedule::fpdt(10, 2, 3));
    assert!(
        e.contains("seq_len = 10") && e.contains("divisible by chunks (u = 3) x ranks (P = 2) = 6"),
        "{e}"
    );
    // chunk larger than the sequence (more chunks than tokens).
    let e = err(&gpt, Schedule::fpdt(4, 1, 8));
    assert!(
        e.contains("chunks (u) = 8") && e.contains("must not exceed seq_len (4)"),
        "{e}"
    );
    // zero sizes.
    let e = err(&gpt, Schedule::fpdt(0, 1, 1));
    assert!(e.contains("seq_len = 0") && e.contains("positive"), "{e}");
    let e = err(
        &ModelConfig {
            hidden: 0,
            ..gpt.clone()
        },
        Schedule::fpdt(4, 1, 1),
    );
    assert!(e.contains("hidden = 0"), "{e}");
    // heads not divisible by kv heads.
    let e = err(
        &ModelConfig {
            kv_heads: 3,
            ..gpt.clone()
        },
        Schedule::fpdt(4, 1, 1),
    );
    assert!(e.contains("heads = 4") && e.contains("kv_heads (3)"), "{e}");
    // kv heads not divisible by P.
    let e = err(&tiny_llama(), Schedule::fpdt(16, 4, 1));
    assert!(e.contains("kv_heads = 2") && e.contains("P (4)"), "{e}");
    // Wrong parameter count.
    let e = FpdtGroup::cpu(&gpt, Schedule::fpdt(4, 1, 1), &p[1..], &dev_cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("initial parameters"), "{e}");
}

#[test]
fn hf_configs_load_and_unknown_activations_are_named() {
    let gpt2 = r#"{"model_type":"gpt2","n_embd":768,"n_head":12,"n_layer":12,"n_positions":1024,
        "vocab_size":50257,"layer_norm_epsilon":1e-5,"activation_function":"gelu_new","n_inner":null}"#;
    let c = ModelConfig::from_hf_json(gpt2).unwrap();
    assert_eq!(c, ModelConfig::preset("gpt2-124m").unwrap());
    let llama = r#"{"model_type":"llama","hidden_size":4096,"num_attention_heads":32,
        "num_key_value_heads":8,"num_hidden_layers":32,"intermediate_size":14336,
        "rope_theta":500000.0,"rms_norm_eps":1e-5,"tie_word_embeddings":false,
        "vocab_size":128256,"hidden_act":"silu","max_position_embeddings":8192}"#;
    let c = ModelConfig::from_hf_json(llama).unwrap();
    assert_eq!(c, ModelConfig::preset("llama-3-8b").unwrap());
    let e = ModelConfig::from_hf_json(&gpt2.replace("gelu_new", "relu"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("activation_function") && e.contains("relu") && e.contains("unknown activation"),
        "{e}"
    );
    let e = ModelConfig::from_hf_json(
        &llama.replace("\"num_key_value_heads\":8", "\"num_key_value_heads\":5"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("heads = 32") && e.contains("kv_heads (5)"),
        "{e}"
    );
    let e = ModelConfig::from_hf_json(r#"{"n_embd":64}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("n_head") && e.contains("required"), "{e}");
    let e = ModelConfig::preset("gpt-9000").unwrap_err().to_string();
    assert!(e.contains("gpt-9000") && e.contains("llama-3-8b"), "{e}");
    let e = ModelConfig::from_hf_json("not json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn flops_per_token_counts_matmuls_and_causal_attention() {
    let c = ModelConfig::preset("gpt2-124m").unwrap();
    // 6N for the matmuls (the 124M less the embedding's lookup plus the tied
    // head, which is a matmul) and 6 * L * H * d * S for the attention.
    let f = c.flops_per_token(1024);
    let attn = 6.0 * 12.0 * 768.0 * 1024.0;
    let n = c.matmul_params() as f64;
    assert_eq!(f, 6.0 * n + attn);
    assert_eq!(
        c.matmul_params(),
        12 * (4 * 768 * 768 + 2 * 768 * 3072) + 50257 * 768
    );
}
