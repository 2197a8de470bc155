//! The sharded optimizer step: gradient accumulation, the reduce-scatter and
//! all-gather over P ranks, clipping by the global norm, skipped non-finite
//! steps, the argmax accuracy, and restoring the state bit for bit.

mod common;

use common::*;
use fpdt_model::{reference, FpdtGroup, ModelConfig, OptimStep, Schedule};
use fpdt_ptx::cpu::AdamW;
use fpdt_runtime::{MetaConfig, Space};

const OPT: AdamW = AdamW {
    lr: 1e-2,
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 0.1,
};

fn to_f32(p: &[f64]) -> Vec<f32> {
    p.iter().map(|&x| x as f32).collect()
}

fn norm(g: &[f64]) -> f64 {
    g.iter().map(|x| x * x).sum::<f64>().sqrt()
}

#[test]
fn accumulated_clipped_sharded_step_equals_the_reference() {
    // Two sequences of one step, P = 1, 2, 4 (the shards split the flat
    // layout unevenly: its length is not a multiple of 4), clipping active.
    for (cfg, ranks) in [(tiny_gpt(), 1), (tiny_gpt(), 2), (tiny_llama(), 2)] {
        for p in [ranks, 4].into_iter().filter(|&p| cfg.kv_heads % p == 0) {
            let params = random_params(&cfg, 5);
            let sched = Schedule::fpdt(24, p, 3);
            let mut g = FpdtGroup::cpu(&cfg, sched, &to_f32(&params), &cpu()).unwrap();
            let batches = [random_batch(&cfg, 24, 1), random_batch(&cfg, 24, 2)];
            let mut mean = vec![0.0; params.len()];
            for (tokens, targets) in &batches {
                let r = reference::loss_and_grads(&cfg, &params, tokens, targets).unwrap();
                let st = g.accumulate(tokens, targets, 0.5).unwrap();
                let rel = (st.loss - r.loss).abs() / r.loss;
                assert!(rel < 1e-4, "P={p}: loss {} vs {}", st.loss, r.loss);
                for (a, b) in mean.iter_mut().zip(&r.grads) {
                    *a += 0.5 * b;
                }
            }
            let n = norm(&mean);
            let clip = 0.5 * n;
            let rep = g.optimizer_step(&OptimStep { adamw: OPT, clip }).unwrap();
            assert!(!rep.skipped);
            assert!(
                (rep.grad_norm - n).abs() / n < 1e-4,
                "P={p}: norm {} vs {n}",
                rep.grad_norm
            );
            assert!((rep.clip_scale - clip / (n + 1e-6)).abs() < 1e-4);
            let clipped: Vec<f64> = mean.iter().map(|x| x * clip / (n + 1e-6)).collect();
            let mut want = params.clone();
            let (mut m, mut v) = (vec![0.0; want.len()], vec![0.0; want.len()]);
            reference::adamw_step(&mut want, &clipped, &mut m, &mut v, &OPT, 1);
            for rank in g.ranks() {
                let w: Vec<f64> = rank
                    .params()
                    .unwrap()
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect();
                let (err, i) = max_rel(&w, &want, 1e-2);
                assert!(
                    err < 1e-3,
                    "{:?} P={p} rank {}: weight {i} off by {err:e}",
                    cfg.family,
                    rank.rank()
                );
            }
            let st = g.optimizer_state().unwrap();
            let (wm, mm, vm) = (st.master, st.m, st.v);
            assert_eq!(st.steps, 1);
            assert_eq!(wm.len(), params.len());
            let (err, i) = max_rel(
                &mm.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
                &m,
                1e-3,
            );
            assert!(err < 1e-3, "P={p}: first moment {i} off by {err:e}");
            let (err, i) = max_rel(
                &vm.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
                &v,
                1e-6,
            );
            assert!(err < 1e-3, "P={p}: second moment {i} off by {err:e}");
        }
    }
}

#[test]
fn accuracy_counts_the_argmax_hits_the_reference_counts() {
    let cfg = tiny_llama();
    let params = random_params(&cfg, 9);
    let mut g = FpdtGroup::cpu(&cfg, Schedule::fpdt(16, 2, 2), &to_f32(&params), &cpu()).unwrap();
    let mut total = 0;
    for seed in 0..4 {
        let (tokens, targets) = random_batch(&cfg, 16, 40 + seed);
        let r = reference::loss(&cfg, &params, &tokens, &targets).unwrap();
        let want = reference::run(&cfg, &params, &tokens, &targets, false)
            .unwrap()
            .correct;
        let st = g.accumulate(&tokens, &targets, 1.0).unwrap();
        assert!((st.loss - r).abs() / r < 1e-4);
        assert_eq!(st.correct, want, "seed {seed}");
        assert_eq!(st.targets, targets.iter().filter(|&&t| t >= 0).count());
        total += want;
    }
    // Targets equal to the token's own argmax: every counted one is a hit.
    assert!(
        total < 4 * 14,
        "random weights should not predict every target"
    );
}

#[test]
fn a_non_finite_gradient_skips_the_step_and_changes_nothing() {
    let cfg = tiny_gpt();
    let mut params = to_f32(&random_params(&cfg, 3));
    let (tokens, targets) = random_batch(&cfg, 12, 7);
    // One embedding weight of a token in the batch overflows the forward.
    let row = tokens[0] as usize * cfg.hidden;
    params[cfg.layout().embed().start + row] = f32::INFINITY;
    let mut g = FpdtGroup::cpu(&cfg, Schedule::fpdt(12, 2, 2), &params, &cpu()).unwrap();
    let before = g.optimizer_state().unwrap();
    let st = g.accumulate(&tokens, &targets, 1.0).unwrap();
    assert!(!st.loss.is_finite(), "loss {}", st.loss);
    let rep = g
        .optimizer_step(&OptimStep {
            adamw: OPT,
            clip: 1.0,
        })
        .unwrap();
    assert!(rep.skipped && !rep.grad_norm.is_finite(), "{rep:?}");
    let after = g.optimizer_state().unwrap();
    assert_eq!(after.steps, 0, "a skipped step is not counted");
    for (a, b) in [
        (&before.master, &after.master),
        (&before.m, &after.m),
        (&before.v, &after.v),
    ] {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
    let w = g.params().unwrap();
    assert!(w
        .iter()
        .zip(&params)
        .all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn restoring_the_state_continues_bit_for_bit() {
    let cfg = tiny_llama();
    let sched = Schedule::fpdt(16, 2, 2);
    let batch = |i: u64| random_batch(&cfg, 16, 60 + i);
    let step = OptimStep {
        adamw: OPT,
        clip: 1.0,
    };
    let mut a = FpdtGroup::cpu(&cfg, sched, &to_f32(&random_params(&cfg, 1)), &cpu()).unwrap();
    for i in 0..2 {
        let (t, y) = batch(i);
        a.accumulate(&t, &y, 1.0).unwrap();
        a.optimizer_step(&step).unwrap();
    }
    let saved = a.optimizer_state().unwrap();
    assert_eq!(saved.steps, 2);
    // Another start, then the saved state.
    let mut b = FpdtGroup::cpu(&cfg, sched, &to_f32(&random_params(&cfg, 2)), &cpu()).unwrap();
    b.restore(&saved).unwrap();
    assert_eq!(b.params().unwrap(), a.params().unwrap());
    for i in 2..4 {
        let (t, y) = batch(i);
        let la = a.accumulate(&t, &y, 1.0).unwrap().loss;
        let lb = b.accumulate(&t, &y, 1.0).unwrap().loss;
        assert_eq!(la.to_bits(), lb.to_bits(), "step {i}: {la} vs {lb}");
        let ra = a.optimizer_step(&step).unwrap();
        let rb = b.optimizer_step(&step).unwrap();
        assert_eq!(ra.grad_norm.to_bits(), rb.grad_norm.to_bits());
    }
    let (pa, pb) = (a.params().unwrap(), b.params().unwrap());
    assert!(pa.iter().zip(&pb).all(|(x, y)| x.to_bits() == y.to_bits()));
    let short = fpdt_model::OptimizerState {
        master: saved.master[1..].to_vec(),
        ..saved.clone()
    };
    let e = b.restore(&short).unwrap_err().to_string();
    let n = saved.master.len();
    assert!(e.contains("weights") && e.contains(&n.to_string()), "{e}");
}

#[test]
fn the_optimizer_state_lives_in_the_host_arena_sharded() {
    // On meta, at a size where the arithmetic is plain: 1/P of the fp32
    // master weights and both moments per rank in host memory, and only the
    // shard's gradient on the device beside weights and gradients.
    let cfg = ModelConfig {
        layers: 2,
        ..ModelConfig::preset("gpt2-124m").unwrap()
    };
    for p in [1usize, 4] {
        let sched = Schedule::fpdt(4096, p, 4);
        let meta = MetaConfig {
            device_memory: 64 << 30,
            host_memory: 64 << 30,
            ..MetaConfig::default()
        };
        let mut g = FpdtGroup::meta(&cfg, sched, &meta).unwrap();
        let (t, y) = (vec![0u32; 4096], vec![1i32; 4096]);
        g.accumulate(&t, &y, 1.0).unwrap();
        g.optimizer_step(&OptimStep {
            adamw: OPT,
            clip: 1.0,
        })
        .unwrap();
        let k = cfg.layout().padded_len(p) / p;
        let host = g.ranks()[0].device().ledger().usage(Space::Host).peak;
        assert!(
            host >= 4 * k * 4,
            "P={p}: host peak {host} < master, m, v and the grad shard ({})",
            16 * k
        );
        let tags = g.ranks()[0].device().host_stats();
        assert!(tags.in_use >= 4 * k * 4, "{tags:?}");
    }
}
