//! The model on the cuda device: with every op a host kernel (staged
//! through the pinned arena; the collectives on the GPU's streams, the
//! reductions in the same rank order) the FPDT step on P ranks sharing one
//! GPU gives the cpu device's loss and gradients exactly, and AdamW steps
//! follow the cpu group's; with the PTX kernels the ops have, it stays
//! within their distance from the CPU twins. On the fake driver the PTX
//! runs in the interpreter.
//! Without a GPU each test prints why it skipped; `scripts/fake-cuda-test.sh`
//! runs them against the fake driver, where they must not skip.

mod common;

use std::time::Duration;

use common::*;
use fpdt_model::config::{ParamLayout, Precision};
use fpdt_model::{reference, FpdtGroup, ModelConfig, Schedule};
use fpdt_runtime::{CudaConfig, DeviceKind};

fn cuda_config() -> CudaConfig {
    CudaConfig {
        // Small: on the fake driver every PTX launch copies the region.
        device_memory: Some(4 << 20),
        host_memory: 64 << 20,
        wait_timeout: Duration::from_secs(60),
        ..CudaConfig::default()
    }
}

/// `|a - b| / |b|` (2-norms).
fn rel_dist(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (d / n).sqrt()
}

/// The group on the GPU, or None after saying why the test skips.
fn gpu_group(test: &str, cfg: &ModelConfig, sched: Schedule, p32: &[f32]) -> Option<FpdtGroup> {
    if let Err(e) = fpdt_runtime::cuda::probe() {
        eprintln!("{test}: skipped, no GPU: {e}");
        return None;
    }
    // On the fake driver the PTX kernels run in the interpreter (a real
    // driver is left alone).
    fpdt_ptx::gpu::install_interpreter_on_fake_driver().expect("the fake's executor");
    Some(FpdtGroup::cuda(cfg, sched, p32, &cuda_config()).expect("a cuda group"))
}

#[test]
fn the_step_on_cuda_equals_the_cpu_step_and_the_reference() {
    let test = "the_step_on_cuda_equals_the_cpu_step_and_the_reference";
    // (S, P, u, offload, checkpoint, precision)
    let cases = [
        (24, 2, 3, true, true, Precision::F32),
        (20, 2, 2, true, false, Precision::Bf16),
        (12, 1, 1, false, false, Precision::F32),
    ];
    for cfg in [tiny_gpt(), tiny_llama()] {
        let params = random_params(&cfg, 7);
        let p32: Vec<f32> = params.iter().map(|&x| x as f32).collect();
        for (seq, ranks, chunks, offload, checkpoint, precision) in cases {
            let what = format!(
                "{:?} S={seq} P={ranks} u={chunks} offload={offload} checkpoint={checkpoint} {precision:?}",
                cfg.family
            );
            let sched = Schedule {
                offload,
                checkpoint,
                precision,
                ..Schedule::fpdt(seq, ranks, chunks)
            };
            let Some(mut g) = gpu_group(test, &cfg, sched, &p32) else {
                return;
            };
            assert!(g
                .ranks()
                .iter()
                .all(|r| r.device().kind() == DeviceKind::Cuda));
            let (tokens, targets) = random_batch(&cfg, seq, 3);
            let mut c = FpdtGroup::cpu(&cfg, sched, &p32, &cpu()).expect("a cpu group");
            let want = c.step(&tokens, &targets).expect("the cpu step");
            // With every op a host kernel: the cpu device's numbers exactly.
            g.set_host_kernels(true);
            let exact = g
                .step(&tokens, &targets)
                .expect("the cuda step, host kernels");
            assert_eq!(exact.loss.to_bits(), want.loss.to_bits(), "{what}: loss");
            assert_eq!(exact.grads, want.grads, "{what}: gradients");
            // With the PTX kernels it has (the norms' forward): within the
            // kernels' own distance from their CPU twins.
            g.set_host_kernels(false);
            g.ranks()[0].device().trace().clear();
            let out = g.step(&tokens, &targets).expect("the cuda step");
            let ptx = g.ranks()[0].device().trace().events();
            assert!(
                ptx.iter().any(|e| e.name.contains("norm_fwd_")),
                "{what}: no PTX norm kernel ran"
            );
            let tol = if precision == Precision::F32 {
                1e-5
            } else {
                1e-2
            };
            let rel = (out.loss - want.loss).abs() / want.loss.abs();
            assert!(
                rel < tol,
                "{what}: loss {} vs cpu {} ({rel:e})",
                out.loss,
                want.loss
            );
            let e = rel_dist(&out.grads, &want.grads);
            assert!(e < tol, "{what}: gradients {e:e} from the cpu's");
            // The embedding and the loss (its argmax hits included) ran as
            // PTX kernels, and GPT's bias gradients as GEMMs on cuBLASLt.
            let names: Vec<&str> = ptx.iter().map(|e| &*e.name).collect();
            for k in [
                "embedding_fwd_",
                "embedding_bwd_",
                "softmax_xent_f32",
                "softmax_xent_sums",
            ] {
                assert!(names.iter().any(|n| n.contains(k)), "{what}: no {k}");
            }
            let blas = g.ranks()[0].gemm_backend().starts_with("cuBLASLt");
            if blas && precision == Precision::Bf16 {
                for host in [
                    "linear_fwd",
                    "linear_bwd",
                    "linear_residual_fwd",
                    "linear_rope_fwd",
                    "linear_dgrad_sum",
                    "mlp_fc_gelu_fwd",
                    "mlp_up_swiglu_fwd",
                ] {
                    assert!(!names.contains(&host), "{what}: {host} on the host");
                }
            }
            // The biases' gradients on their own (GPT): a column-sum GEMV on
            // cuBLASLt in bf16 (there the host's column sum of the same dy
            // measured the same 1.1e-2: the distance is the bf16 forward's).
            let btol = 2.0 * tol;
            let lay = ParamLayout::new(&cfg);
            for lp in lay.layers() {
                for b in [&lp.bq, &lp.bk, &lp.bv, &lp.bo, &lp.b1, &lp.b2]
                    .into_iter()
                    .flatten()
                {
                    let e = rel_dist(&out.grads[b.clone()], &want.grads[b.clone()]);
                    assert!(e < btol, "{what}: bias gradient {b:?} {e:e} from the cpu's");
                }
            }
            let hits = |g: &FpdtGroup| g.ranks()[0].last_stats().map(|s| s.correct);
            if precision == Precision::F32 {
                assert_eq!(hits(&g), hits(&c), "{what}: argmax hits");
            }
            if precision == Precision::F32 {
                let r =
                    reference::loss_and_grads(&cfg, &params, &tokens, &targets).expect("reference");
                let rel = (out.loss - r.loss).abs() / r.loss;
                assert!(rel < 1e-4, "{what}: loss {} vs {}", out.loss, r.loss);
            }
            // The offloaded activations went through the GPU's copy engines.
            if offload {
                let ev = g.ranks()[0].device().trace().events();
                assert!(
                    ev.iter().any(|e| e.kind == fpdt_runtime::OpKind::CopyD2H)
                        && ev.iter().any(|e| e.kind == fpdt_runtime::OpKind::CopyH2D),
                    "{what}: no copies in the trace"
                );
            }
        }
    }
}

#[test]
fn adamw_steps_on_cuda_follow_the_cpu_group() {
    let test = "adamw_steps_on_cuda_follow_the_cpu_group";
    let cfg = tiny_llama();
    let p32: Vec<f32> = random_params(&cfg, 21).iter().map(|&x| x as f32).collect();
    let sched = Schedule::fpdt(24, 2, 3);
    let Some(mut g) = gpu_group(test, &cfg, sched, &p32) else {
        return;
    };
    g.set_host_kernels(true);
    let mut c = FpdtGroup::cpu(&cfg, sched, &p32, &cpu()).expect("a cpu group");
    let opt = test_adamw();
    for step in 1..=3u64 {
        let (tokens, targets) = random_batch(&cfg, 24, 100 + step);
        let a = g.step(&tokens, &targets).expect("cuda step");
        let b = c.step(&tokens, &targets).expect("cpu step");
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {step}: loss");
        g.adamw_step(&opt).expect("cuda adamw");
        c.adamw_step(&opt).expect("cpu adamw");
        assert_eq!(
            g.params().unwrap(),
            c.params().unwrap(),
            "step {step}: weights"
        );
    }
    // With the PTX kernels: the gradient norm on the GPU (sq_norm), the
    // clipped update near the cpu's.
    let Some(mut g) = gpu_group(test, &cfg, sched, &p32) else {
        return;
    };
    let mut c = FpdtGroup::cpu(&cfg, sched, &p32, &cpu()).expect("a cpu group");
    let clipped = fpdt_model::OptimStep {
        clip: 0.5,
        ..fpdt_model::OptimStep::typical(1e-2)
    };
    for step in 1..=2u64 {
        let (tokens, targets) = random_batch(&cfg, 24, 200 + step);
        g.ranks()[0].device().trace().clear();
        g.step(&tokens, &targets).expect("cuda step");
        c.step(&tokens, &targets).expect("cpu step");
        let a = g.optimizer_step(&clipped).expect("cuda optimizer step");
        let b = c.optimizer_step(&clipped).expect("cpu optimizer step");
        let names: Vec<String> = g.ranks()[0]
            .device()
            .trace()
            .events()
            .iter()
            .map(|e| e.name.to_string())
            .collect();
        assert!(
            names.iter().any(|n| n == "sq_norm_f32"),
            "step {step}: {names:?}"
        );
        assert!(
            !names.iter().any(|n| n == "grad_sq_norm"),
            "step {step}: norm on the host"
        );
        let rel = (a.grad_norm - b.grad_norm).abs() / b.grad_norm;
        assert!(
            rel < 1e-5,
            "step {step}: |g| {} vs cpu {}",
            a.grad_norm,
            b.grad_norm
        );
        assert!(
            b.grad_norm > 0.5 && a.clip_scale < 1.0,
            "step {step}: not clipped"
        );
        let e = rel_dist(&g.params().unwrap(), &c.params().unwrap());
        assert!(e < 1e-5, "step {step}: weights {e:e} from the cpu's");
    }
}

#[test]
fn attention_and_gemms_run_on_the_gpu_in_bf16_near_the_cpu_step() {
    let test = "attention_and_gemms_run_on_the_gpu_in_bf16_near_the_cpu_step";
    // Head dim 64 (2 heads of 64), what the attention kernels take; bf16,
    // the precision whose operands they read.
    let cfg = ModelConfig {
        rope_theta: 10_000.0,
        ..ModelConfig::llama(31, 128, 1, 2, 2, 64)
    };
    assert_eq!(cfg.head_dim, 64);
    let params = random_params_std(&cfg, 5, 0.05);
    let p32: Vec<f32> = params.iter().map(|&x| x as f32).collect();
    for (offload, chunks) in [(true, 3), (false, 2)] {
        let what = format!("S=24 P=2 u={chunks} offload={offload} bf16");
        let sched = Schedule {
            offload,
            precision: Precision::Bf16,
            ..Schedule::fpdt(24, 2, chunks)
        };
        let Some(mut g) = gpu_group(test, &cfg, sched, &p32) else {
            return;
        };
        let (tokens, targets) = random_batch(&cfg, 24, 9);
        let mut c = FpdtGroup::cpu(&cfg, sched, &p32, &cpu()).expect("a cpu group");
        let want = c.step(&tokens, &targets).expect("the cpu step");
        let names = |g: &FpdtGroup| -> Vec<String> {
            g.ranks()[0]
                .device()
                .trace()
                .events()
                .iter()
                .map(|e| e.name.to_string())
                .collect()
        };
        // Forced to host kernels, the attention ops are named as such.
        g.set_host_kernels(true);
        g.step(&tokens, &targets)
            .expect("the cuda step, host kernels");
        let host_names = names(&g);
        assert!(
            host_names.iter().any(|n| n == "attn_bwd"),
            "{what}: {host_names:?}"
        );
        g.set_host_kernels(false);
        g.ranks()[0].device().trace().clear();
        let out = g.step(&tokens, &targets).expect("the cuda step");
        let names = names(&g);
        for k in ["attn_fwd_d64", "attn_bwd_d64", "attn_delta_bf16"] {
            assert!(
                names.iter().any(|n| n.contains(k)),
                "{what}: no {k} in {names:?}"
            );
        }
        // The linear layers' GEMMs on cuBLASLt, where the library is.
        let backend = g.ranks()[0].gemm_backend();
        if backend.starts_with("cuBLASLt") {
            assert!(
                names.iter().any(|n| n.starts_with("gemm ")),
                "{what}: {names:?}"
            );
            for host in [
                "linear_fwd",
                "linear_bwd",
                "linear_residual_fwd",
                "linear_dgrad_sum",
                "linear_rope_fwd",
                "rope_bwd",
                "mlp_up_swiglu_fwd",
                "swiglu_bwd",
                "copy",
                "ulysses pack",
                "ulysses unpack",
                "fill",
                "rms_norm_bwd",
                "embedding_fwd",
                "embedding_bwd",
                "softmax_xent",
            ] {
                assert!(
                    !names.iter().any(|n| n == host),
                    "{what}: {host} ran on the host"
                );
            }
        } else {
            eprintln!("{test}: the GEMM checks skipped, no cuBLASLt: {backend}");
        }
        // RoPE read its positions from the rank's positions buffer, no
        // copy per call.
        assert!(
            !names.iter().any(|n| n == "h2d rope positions"),
            "{what}: positions copied per call"
        );
        // More than one chunk: partial outputs were merged on the GPU.
        assert!(names.iter().any(|n| n.contains("lse_merge_f32")), "{what}");
        // And no attention op fell back to a host kernel.
        for host in ["attn_fwd", "attn_bwd", "attn_delta", "lse_merge"] {
            assert!(
                !names.iter().any(|n| n == host),
                "{what}: {host} ran on the host"
            );
        }
        let rel = (out.loss - want.loss).abs() / want.loss.abs();
        assert!(rel < 1e-2, "{what}: loss {} vs cpu {}", out.loss, want.loss);
        let e = rel_dist(&out.grads, &want.grads);
        assert!(e < 2e-2, "{what}: gradients {e:e} from the cpu's");
    }
}

#[test]
fn the_meta_planner_modelling_the_gpu_path_allocates_what_the_cuda_step_does() {
    let test = "the_meta_planner_modelling_the_gpu_path_allocates_what_the_cuda_step_does";
    // The shape of the bf16 test above: every op on its PTX kernel or
    // cuBLASLt, whose allocations (f32 GEMM outputs, the positions
    // buffer, the workspace) differ from the host kernels'.
    let cfg = ModelConfig {
        rope_theta: 10_000.0,
        ..ModelConfig::llama(31, 128, 1, 2, 2, 64)
    };
    let params = random_params_std(&cfg, 5, 0.05);
    let p32: Vec<f32> = params.iter().map(|&x| x as f32).collect();
    let (tokens, targets) = random_batch(&cfg, 24, 9);
    let meta_cfg = fpdt_runtime::MetaConfig {
        device_memory: cuda_config().device_memory.unwrap_or(4 << 20),
        host_memory: cuda_config().host_memory,
        ..fpdt_runtime::MetaConfig::default()
    };
    // Peak device bytes of each rank over one step, by tag.
    type Peaks = Vec<(usize, Vec<(&'static str, usize)>)>;
    let peaks = |g: &FpdtGroup| -> Peaks {
        g.ranks()
            .iter()
            .map(|r| {
                let u = r.device().ledger().usage(fpdt_runtime::Space::Device);
                let tags = u.tags.iter().map(|(t, s)| (*t, s.peak)).collect();
                (u.peak, tags)
            })
            .collect()
    };
    for (offload, chunks) in [(true, 3), (false, 2)] {
        let what = format!("S=24 P=2 u={chunks} offload={offload} bf16");
        let sched = Schedule {
            offload,
            precision: Precision::Bf16,
            ..Schedule::fpdt(24, 2, chunks)
        };
        let Some(mut g) = gpu_group(test, &cfg, sched, &p32) else {
            return;
        };
        if !g.ranks()[0].gemm_backend().starts_with("cuBLASLt") {
            eprintln!(
                "{test}: skipped, no cuBLASLt: {}",
                g.ranks()[0].gemm_backend()
            );
            return;
        }
        // One training step as the planner runs it: the accumulation, then
        // the optimizer (clipping on: the gradient norm's kernel). Peaks
        // after each, apart from the in-process group's reduction scratch:
        // ranks sharing one GPU pull their peers' slices into it, while
        // NCCL, which the planner models, reduces in buffers of its own
        // allocated at init.
        let step = fpdt_model::fpdt::OptimStep::typical(3e-4);
        let run = |g: &mut FpdtGroup, tokens: &[u32], targets: &[i32]| -> [Peaks; 2] {
            g.accumulate(tokens, targets, 1.0)
                .expect("the accumulation");
            let acc = peaks(g);
            g.optimizer_step(&step).expect("the optimizer step");
            [acc, peaks(g)]
        };
        let scratch = |tags: &[(&str, usize)]| {
            tags.iter()
                .find(|t| t.0 == "collective scratch")
                .map_or(0, |t| t.1)
        };
        let want = run(&mut g, &tokens, &targets);
        let zeros = (vec![0u32; 24], vec![0i32; 24]);
        // Without the GPU path the planner counts the host kernels'
        // allocations: not the cuda step's.
        let mut m = FpdtGroup::meta(&cfg, sched, &meta_cfg).expect("a meta group");
        let host = run(&mut m, &zeros.0, &zeros.1);
        assert_ne!(host[0][0].1, want[0][0].1, "{what}: the host path's peaks");
        let mut m = FpdtGroup::meta(&cfg, sched, &meta_cfg).expect("a meta group");
        m.model_gpu_path(true).expect("the gpu path on meta");
        let got = run(&mut m, &zeros.0, &zeros.1);
        for (phase, (w, g)) in ["accumulation", "optimizer step"]
            .iter()
            .zip(want.iter().zip(&got))
        {
            for (r, (w, g)) in w.iter().zip(g).enumerate() {
                let what = format!("{what}: rank {r} after the {phase}");
                let tags: Vec<_> = w.1.iter().filter(|t| t.0 != "collective scratch").collect();
                assert_eq!(
                    g.1.iter().collect::<Vec<_>>(),
                    tags,
                    "{what}: per-tag peaks, meta vs cuda"
                );
                assert_eq!(scratch(&g.1), 0, "{what}: meta has no scratch");
                // The whole peak: the cuda device's at most the scratch above.
                assert!(
                    g.0 <= w.0 && w.0 <= g.0 + scratch(&w.1),
                    "{what}: peak device bytes, meta {} vs cuda {} (scratch {})",
                    g.0,
                    w.0,
                    scratch(&w.1)
                );
            }
        }
    }
    // The other devices run the path they have.
    let sched = Schedule::fpdt(24, 2, 2);
    let mut c = FpdtGroup::cpu(&cfg, sched, &p32, &cpu()).expect("a cpu group");
    let e = c
        .model_gpu_path(true)
        .expect_err("cpu has no modelled path");
    assert!(e.to_string().contains("meta device only"), "{e}");
}
