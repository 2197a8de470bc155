//! The bf16 mixed-precision path (`Schedule.precision = Bf16`): bf16
//! working weights and activations, f32 accumulation, statistics, gradients
//! and master weights. Loss and every parameter gradient equal the dense
//! f64 reference within 2e-2 relative; offloaded activations take about
//! half the host bytes of the f32 path; AdamW follows the reference; the
//! cpu and meta allocation traces are equal.

mod common;

use common::*;
use fpdt_model::config::Precision;
use fpdt_model::{reference, FpdtGroup, ModelConfig, Schedule};
use fpdt_ptx::cpu::{narrow_bytes, widen_bytes, DType};
use fpdt_runtime::{MetaConfig, Space};

/// The bf16 tolerance: relative error of the loss, and of the whole
/// gradient `||g - ref||_2 / ||ref||_2`.
const TOL: f64 = 2e-2;

/// The models of the gradient comparison: width 32 (GPT 4 heads of 8,
/// Llama 8 query heads over 4 kv heads, so P = 4 splits both), weights at GPT-2's initial scale (std 0.02 at width 768, that is
/// 0.55 / sqrt(width)), biases and norm gains random as everywhere else.
///
/// Why not the width-16, std-0.3 models of the f32 tests (measured, issue
/// #6): their per-tensor error is set by how much the model amplifies
/// rounding, not by the bf16 path. The f32 path's worst tensor there is off
/// by about 22 times f32's unit roundoff; the bf16 path's by about 18 times
/// bf16's (2.6e-2 GPT, 2.9e-2 Llama on average over 6 seeds x 10 configs,
/// up to 6e-2). At a fixed std 0.3 the error grows with width (each matmul
/// grows activations by 0.3 * sqrt(width): at width 64 even the whole
/// gradient is 4e-2..1e-1 off); with the std scaled as models are really
/// initialised it shrinks. At width 32 and GPT-2's scale, over 7 seeds x
/// the 7 schedules below, the worst tensor is 1.71e-2 (GPT) and 1.34e-2
/// (Llama), 1.2e-2 and 1.0e-2 on average, the whole gradient at most
/// 7.6e-3: the 2e-2 holds for every tensor.
fn bf16_models() -> [ModelConfig; 2] {
    let h = 32;
    [
        ModelConfig {
            intermediate: 3 * h,
            ..ModelConfig::gpt(61, h, 2, 4)
        },
        ModelConfig {
            rope_theta: 10_000.0,
            ..ModelConfig::llama(61, h, 2, 8, 4, 3 * h)
        },
    ]
}

/// [`random_params_std`] at GPT-2's initial scale for `cfg`'s width.
fn gpt2_scale_params(cfg: &ModelConfig, seed: u64) -> Vec<f64> {
    random_params_std(cfg, seed, 0.55 / (cfg.hidden as f64).sqrt())
}

fn bf16(sched: Schedule) -> Schedule {
    Schedule {
        precision: Precision::Bf16,
        ..sched
    }
}

/// `||a - b|| / ||b||` over one tensor.
fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let n: f64 = b.iter().map(|y| y * y).sum();
    (d / n).sqrt()
}

/// Checks loss, the whole gradient and every tensor against the reference;
/// returns the worst tensor error.
fn compare(
    cfg: &ModelConfig,
    loss: f64,
    grads: &[f32],
    r: &reference::RefOutput,
    what: &str,
) -> f64 {
    let rel = (loss - r.loss).abs() / r.loss.abs();
    assert!(
        rel < TOL,
        "{what}: loss {loss} vs reference {} (rel {rel:e})",
        r.loss
    );
    let mut worst: f64 = 0.0;
    let mut bad = Vec::new();
    for e in cfg.layout().entries() {
        let g: Vec<f64> = grads[e.range()].iter().map(|&x| f64::from(x)).collect();
        let gr = &r.grads[e.range()];
        assert!(
            gr.iter().any(|&x| x != 0.0),
            "{what}: reference gradient of {} is zero",
            e.name
        );
        let err = rel_l2(&g, gr);
        if err >= TOL {
            bad.push(format!("{} off by {err:.3e}", e.name));
        }
        worst = worst.max(err);
    }
    assert!(
        bad.is_empty(),
        "{what}: gradients off (relative L2, tolerance {TOL}): {}",
        bad.join(", ")
    );
    let all: Vec<f64> = grads[..r.grads.len()]
        .iter()
        .map(|&x| f64::from(x))
        .collect();
    let whole = rel_l2(&all, &r.grads);
    assert!(
        whole < TOL,
        "{what}: the whole gradient is off by {whole:e} (relative L2)"
    );
    println!("{what}: whole gradient off by {whole:.2e}, worst tensor {worst:.2e}");
    worst
}

#[test]
fn bf16_loss_and_every_gradient_equal_the_reference() {
    // (S, P, u, offload, checkpoint): u in 1..=4, P in {1, 2, 4}, offload
    // and checkpointing on and off, S = 18, 20, 30, 40 not powers of two.
    let cases = [
        (12, 1, 1, false, false),
        (18, 1, 3, true, true),
        (20, 2, 2, true, false),
        (24, 2, 3, false, true),
        (30, 2, 3, true, true),
        (32, 4, 4, true, true),
        (40, 4, 2, false, false),
    ];
    for cfg in bf16_models() {
        // bf16-representable weights, so the model and the reference see the
        // same values (as the f32 tests round to f32): the tolerance is for
        // the bf16 compute path, not for rounding the weights.
        let p32 = round_bf16(
            &gpt2_scale_params(&cfg, 7)
                .iter()
                .map(|&x| x as f32)
                .collect::<Vec<_>>(),
        );
        let params: Vec<f64> = p32.iter().map(|&x| f64::from(x)).collect();
        for (seq, ranks, chunks, offload, checkpoint) in cases {
            let what = format!(
                "{:?} S={seq} P={ranks} u={chunks} offload={offload} checkpoint={checkpoint}",
                cfg.family
            );
            let (tokens, targets) = random_batch(&cfg, seq, 3);
            let r = reference::loss_and_grads(&cfg, &params, &tokens, &targets).unwrap();
            let sched = Schedule {
                offload,
                checkpoint,
                ..Schedule::fpdt(seq, ranks, chunks)
            };
            let mut g = FpdtGroup::cpu(&cfg, bf16(sched), &p32, &cpu()).unwrap();
            let out = g.step(&tokens, &targets).unwrap();
            let worst = compare(&cfg, out.loss, &out.grads, &r, &what);
            // The same schedule in f32 is 1e-4 close: bf16 storage really
            // rounded (an error well above f32's), yet within its tolerance.
            let mut g32 = FpdtGroup::cpu(&cfg, sched, &p32, &cpu()).unwrap();
            let out32 = g32.step(&tokens, &targets).unwrap();
            let differs = out
                .grads
                .iter()
                .zip(&out32.grads)
                .map(|(a, b)| f64::from((a - b).abs()))
                .fold(0.0, f64::max);
            assert!(
                differs > 1e-4 && worst > 1e-4,
                "{what}: bf16 gradients match f32 too closely ({differs:e}, {worst:e}): nothing was rounded"
            );
            for rk in g.ranks() {
                assert_eq!(rk.grads().unwrap(), out.grads, "{what}: rank {}", rk.rank());
            }
        }
    }
}

/// Peak bytes above what was held before one forward/backward, per space.
fn activation_bytes(g: &mut FpdtGroup, tokens: &[u32], targets: &[i32]) -> (usize, usize) {
    g.on_all(|r| r.load_batch(tokens, targets)).unwrap();
    let v = g
        .on_all(|r| {
            let dev = r.device().clone();
            let l = dev.ledger();
            l.reset_peaks();
            let (d0, h0) = (l.usage(Space::Device).in_use, l.usage(Space::Host).in_use);
            r.forward_backward()?;
            Ok((
                l.usage(Space::Device).peak - d0,
                l.usage(Space::Host).peak - h0,
            ))
        })
        .unwrap();
    v[0]
}

#[test]
fn bf16_offloads_about_half_the_bytes_of_f32() {
    for cfg in [tiny_gpt(), tiny_llama()] {
        let params = random_params(&cfg, 5);
        let p32: Vec<f32> = params.iter().map(|&x| x as f32).collect();
        // Long enough chunks that the allocator's granule does not dominate.
        let seq = 384;
        let (tokens, targets) = random_batch(&cfg, seq, 4);
        let sched = Schedule::fpdt(seq, 2, 3);
        let mut g32 = FpdtGroup::cpu(&cfg, sched, &p32, &cpu()).unwrap();
        let mut g16 = FpdtGroup::cpu(&cfg, bf16(sched), &p32, &cpu()).unwrap();
        let (d32, h32) = activation_bytes(&mut g32, &tokens, &targets);
        let (d16, h16) = activation_bytes(&mut g16, &tokens, &targets);
        let (hr, dr) = (h16 as f64 / h32 as f64, d16 as f64 / d32 as f64);
        println!(
            "{:?}: host activations {h16} vs {h32} bytes ({hr:.3}), device {d16} vs {d32} ({dr:.3})",
            cfg.family
        );
        // lse and the dq accumulators stay f32, so a bit above one half.
        assert!(
            (0.45..0.65).contains(&hr),
            "{:?}: bf16 host activations {h16} are {hr:.3} of f32's {h32}",
            cfg.family
        );
        assert!(
            dr < 0.9,
            "{:?}: bf16 device activations {d16} are {dr:.3} of f32's {d32}",
            cfg.family
        );
        // The working weights are half the size; the master stays f32.
        let w = |g: &FpdtGroup| {
            let u = g.ranks()[0].device().ledger().usage(Space::Device);
            u.tags.get("params").map_or(0, |t| t.peak) as f64
        };
        let wr = w(&g16) / w(&g32);
        assert!(
            (wr - 0.5).abs() < 0.01,
            "{:?}: bf16 working weights are {wr:.3} of f32's",
            cfg.family
        );
    }
}

/// `x` rounded to bf16 and widened back.
fn round_bf16(x: &[f32]) -> Vec<f32> {
    let mut b = vec![0u8; 2 * x.len()];
    narrow_bytes(x, DType::BF16, &mut b).unwrap();
    widen_bytes(&b, DType::BF16).unwrap()
}

#[test]
fn bf16_three_adamw_steps_follow_the_reference_losses() {
    let opt = test_adamw();
    for cfg in [tiny_gpt(), tiny_llama()] {
        let mut params = random_params(&cfg, 21);
        let p32: Vec<f32> = params.iter().map(|&x| x as f32).collect();
        let mut g = FpdtGroup::cpu(&cfg, bf16(Schedule::fpdt(24, 2, 3)), &p32, &cpu()).unwrap();
        // The working weights start as the bf16 rounding of the given ones.
        assert_eq!(g.params().unwrap(), round_bf16(&p32));
        let (mut m, mut v) = (vec![0.0; params.len()], vec![0.0; params.len()]);
        for step in 1..=3u32 {
            let (tokens, targets) = random_batch(&cfg, 24, 100 + u64::from(step));
            let r = reference::loss_and_grads(&cfg, &params, &tokens, &targets).unwrap();
            let out = g.step(&tokens, &targets).unwrap();
            let rel = (out.loss - r.loss).abs() / r.loss;
            assert!(
                rel < TOL,
                "{:?} step {step}: loss {} vs {} (rel {rel:e})",
                cfg.family,
                out.loss,
                r.loss
            );
            reference::adamw_step(&mut params, &r.grads, &mut m, &mut v, &opt, step as i32);
            g.adamw_step(&opt).unwrap();
            // After each step the working weights are the fp32 master
            // rounded to bf16, on every rank.
            let master = g.optimizer_state().unwrap().master;
            let want = round_bf16(&master);
            for rk in g.ranks() {
                assert_eq!(rk.params().unwrap(), want, "{:?} step {step}", cfg.family);
            }
        }
        // The master weights moved as the reference's did (AdamW moves each
        // weight by about lr per step whatever the gradient's size).
        let master = g.optimizer_state().unwrap().master;
        let m64: Vec<f64> = master.iter().map(|&x| f64::from(x)).collect();
        let err = rel_l2(&m64, &params);
        assert!(
            err < 1e-2,
            "{:?}: master weights off by {err:e}",
            cfg.family
        );
    }
}

#[test]
fn bf16_meta_device_gives_the_cpu_allocation_trace() {
    for (cfg, sched) in [
        (tiny_gpt(), Schedule::fpdt(24, 2, 3)),
        (
            tiny_llama(),
            Schedule {
                checkpoint: false,
                ..Schedule::fpdt(16, 2, 4)
            },
        ),
        (tiny_gpt(), Schedule::ulysses(12, 2)),
    ] {
        let sched = bf16(sched);
        assert_cpu_and_meta_traces_equal(&cfg, sched);
    }
}

#[test]
fn precision_parses_its_names_and_names_a_bad_one() {
    assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
    assert_eq!("f32".parse::<Precision>().unwrap(), Precision::F32);
    assert_eq!(Schedule::fpdt(8, 1, 2).precision, Precision::F32);
    let e = "fp8".parse::<Precision>().unwrap_err().to_string();
    assert!(
        e.contains("precision") && e.contains("fp8") && e.contains("bf16"),
        "{e}"
    );
}

#[test]
fn bf16_halves_the_offloaded_bytes_of_a_full_size_layer_on_meta() {
    // llama-3-8b layer shapes at 64K tokens on 4 ranks: sizes only.
    let cfg = ModelConfig {
        layers: 1,
        ..ModelConfig::preset("llama-3-8b").unwrap()
    };
    let meta = MetaConfig {
        device_memory: 200 << 30,
        host_memory: 1 << 42,
        ..MetaConfig::default()
    };
    let tokens = vec![0u32; 1 << 16];
    let targets = vec![1i32; 1 << 16];
    let run = |sched: Schedule| {
        let mut g = FpdtGroup::meta(&cfg, sched, &meta).unwrap();
        activation_bytes(&mut g, &tokens, &targets)
    };
    let sched = Schedule::fpdt(1 << 16, 4, 16);
    let (d32, h32) = run(sched);
    let (d16, h16) = run(bf16(sched));
    let (hr, dr) = (h16 as f64 / h32 as f64, d16 as f64 / d32 as f64);
    println!(
        "llama-3-8b layer, 64K: host {h16} vs {h32} ({hr:.3}), device {d16} vs {d32} ({dr:.3})"
    );
    assert!(
        (0.45..0.65).contains(&hr),
        "host activations {hr:.3} of f32's"
    );
    // On the device the peak is one loss sub-chunk's f32 logits and their
    // gradient (512 x 128256 x 4 bytes each), kept f32 for the loss, so the
    // saving there is small.
    assert!(d16 < d32, "device activations {dr:.3} of f32's");
}
