//! The dense f64 reference model against finite differences.

mod common;

use common::*;
use fpdt_model::{reference, ModelConfig};

fn check_fd(cfg: &ModelConfig, seq: usize, seed: u64) {
    let params = random_params(cfg, seed);
    let (tokens, targets) = random_batch(cfg, seq, seed + 1);
    let out = reference::loss_and_grads(cfg, &params, &tokens, &targets).unwrap();
    let base = reference::loss(cfg, &params, &tokens, &targets).unwrap();
    assert!((out.loss - base).abs() < 1e-14);
    assert!(out.loss.is_finite() && out.loss > 0.0);
    let layout = cfg.layout();
    let eps = 1e-5;
    let mut checked = 0;
    for e in layout.entries() {
        let r = e.range();
        // Up to 6 elements spread over each parameter.
        let step = (r.len() / 6).max(1);
        for i in r.clone().step_by(step) {
            let mut p = params.clone();
            p[i] += eps;
            let lp = reference::loss(cfg, &p, &tokens, &targets).unwrap();
            p[i] -= 2.0 * eps;
            let lm = reference::loss(cfg, &p, &tokens, &targets).unwrap();
            let fd = (lp - lm) / (2.0 * eps);
            let g = out.grads[i];
            let err = (fd - g).abs() / g.abs().max(1e-4);
            assert!(
                err < 1e-5,
                "{}[{}]: analytic {g:e}, finite difference {fd:e} (rel err {err:e})",
                e.name,
                i - r.start
            );
            checked += 1;
        }
    }
    assert!(checked > 50);
}

#[test]
fn gpt_reference_gradients_match_finite_differences() {
    check_fd(&tiny_gpt(), 7, 11);
}

#[test]
fn llama_gqa_reference_gradients_match_finite_differences() {
    let cfg = tiny_llama();
    assert_ne!(cfg.heads, cfg.kv_heads);
    check_fd(&cfg, 9, 12);
}

#[test]
fn reference_rejects_bad_batches() {
    let cfg = tiny_gpt();
    let p = random_params(&cfg, 1);
    let e = reference::loss(&cfg, &p, &[0, 1], &[1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 tokens but 1 targets"), "{e}");
    let e = reference::loss(&cfg, &p, &[0, 99], &[1, 2])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokens") && e.contains("99") && e.contains("vocab_size"),
        "{e}"
    );
    let e = reference::loss(&cfg, &p, &[0, 1], &[-1, -1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("targets"), "{e}");
    let e = reference::loss(&cfg, &p[1..], &[0, 1], &[1, 2])
        .unwrap_err()
        .to_string();
    assert!(e.contains("parameters"), "{e}");
}
