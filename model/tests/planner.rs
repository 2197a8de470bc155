//! The planner's evidence: what it reports for a step on the meta devices
//! is what the cpu device measures running the same full step (forward,
//! backward, the sharded optimizer step); FPDT fits at least 16x the
//! baseline's longest sequence in the same small device budget, because its
//! activations on the device stay O(chunk); bad input is an error naming
//! the field or flag.

use std::collections::BTreeMap;
use std::error::Error;
use std::process::Command;

use fpdt_model::planner::{self, PlanKind, PlanReport, PlanSpec};
use fpdt_model::{FpdtGroup, ModelConfig, ModelError, OptimStep, Schedule, SplitMix64};
use fpdt_runtime::{CpuConfig, Space, SpaceUsage};

type TestResult = std::result::Result<(), Box<dyn Error>>;

/// A plan spec for small models: `gpus` GPUs of `gpu` bytes with `host`
/// bytes of host memory each, the H100 rates.
fn spec(seq_len: usize, gpus: usize, chunk: usize, gpu: usize, host: usize) -> PlanSpec {
    PlanSpec {
        gpu_memory: gpu,
        host_memory: host,
        ..PlanSpec::h100(seq_len, gpus, chunk)
    }
}

/// The ledgers of every rank after one full training step of `sched` on
/// cpu devices: forward and backward of one random sequence, then the
/// sharded AdamW step with clipping. Returns (device, host) usage per rank,
/// and the host usage again with its peak counted from the start of the
/// step (after the batch upload).
fn cpu_step(
    cfg: &ModelConfig,
    sched: Schedule,
) -> Result<Vec<(SpaceUsage, SpaceUsage, SpaceUsage)>, ModelError> {
    let cpu = CpuConfig {
        name: "plan-check".into(),
        device_memory: 64 << 20,
        host_memory: 64 << 20,
        pin_host_memory: false,
        ..CpuConfig::default()
    };
    let params = cfg.layout().init(7, 0.02);
    let mut g = FpdtGroup::cpu(cfg, sched, &params, &cpu)?;
    let mut rng = SplitMix64(11);
    let tokens: Vec<u32> = (0..sched.seq_len)
        .map(|_| rng.below(cfg.vocab_size) as u32)
        .collect();
    let targets: Vec<i32> = (0..sched.seq_len)
        .map(|_| rng.below(cfg.vocab_size) as i32)
        .collect();
    // The step's peaks are counted from a reset of the ledger's peaks
    // after the batch upload, whose host staging buffer (like the one the
    // weights were written through) only devices with data need; the
    // lifetime ones combine both sides of the reset.
    g.on_all(|r| r.load_batch(&tokens, &targets))?;
    let before: Vec<(SpaceUsage, SpaceUsage)> = g
        .ranks()
        .iter()
        .map(|r| {
            let l = r.device().ledger();
            (l.usage(Space::Device), l.usage(Space::Host))
        })
        .collect();
    for r in g.ranks() {
        r.device().ledger().reset_peaks();
    }
    g.on_all(|r| r.accumulate(1.0).map(|_| ()))?;
    g.optimizer_step(&OptimStep::typical(1e-3))?;
    let mut out = Vec::new();
    for (r, (dev_before, host_before)) in g.ranks().iter().zip(before) {
        let d = r.device();
        d.synchronize()?;
        let l = d.ledger();
        let host_step = l.usage(Space::Host);
        out.push((
            lifetime(&dev_before, l.usage(Space::Device)),
            lifetime(&host_before, host_step.clone()),
            host_step,
        ));
    }
    Ok(out)
}

/// The lifetime ledger of a space from its usage before a reset of the
/// peaks and after it: the larger peak of each, overall and per tag.
fn lifetime(before: &SpaceUsage, mut after: SpaceUsage) -> SpaceUsage {
    after.peak = after.peak.max(before.peak);
    for (tag, st) in &before.tags {
        let t = after.tags.entry(tag).or_default();
        t.peak = t.peak.max(st.peak);
    }
    after
}

/// Per-tag high-water marks of a ledger space (tags that never held
/// anything dropped: the meta ledger never sees them).
fn tag_peaks(u: &SpaceUsage) -> BTreeMap<&'static str, usize> {
    u.tags
        .iter()
        .filter(|(_, s)| s.peak > 0)
        .map(|(t, s)| (*t, s.peak))
        .collect()
}

fn report_tag_peaks(m: &planner::MemoryReport) -> BTreeMap<&'static str, usize> {
    m.tags
        .iter()
        .filter(|t| t.peak > 0)
        .map(|t| (t.tag, t.peak))
        .collect()
}

#[test]
fn planned_peaks_equal_what_the_cpu_device_measures_in_a_full_step() -> TestResult {
    let gpt = ModelConfig::preset("tiny-gpt")?;
    let llama = ModelConfig::preset("tiny-llama")?;
    // (model, S, P, C, offload, checkpoint, kind)
    let cases = [
        (&gpt, 256, 2, 64, true, true, PlanKind::Fpdt),
        (&llama, 192, 2, 64, false, true, PlanKind::Fpdt),
        (&gpt, 128, 1, 32, true, false, PlanKind::Fpdt),
        (&llama, 96, 1, 32, false, false, PlanKind::Fpdt),
        (&llama, 256, 2, 128, true, true, PlanKind::Fpdt),
        (&gpt, 256, 2, 64, true, true, PlanKind::Ulysses),
        (&llama, 128, 1, 32, true, true, PlanKind::Ulysses),
    ];
    for (cfg, s, p, c, offload, checkpoint, kind) in cases {
        let sp = PlanSpec {
            offload,
            checkpoint,
            ..spec(s, p, c, 64 << 20, 64 << 20)
        };
        let what = format!(
            "{:?} {} S = {s}, P = {p}, C = {c}, offload {offload}, ckpt {checkpoint}",
            cfg.family,
            kind.name()
        );
        let plan = planner::plan(cfg, &sp, kind)?;
        let ranks = cpu_step(cfg, plan.schedule)?;
        // The planner reports the rank with the highest (device, host)
        // peaks; pick the same one among the cpu ranks.
        let (dev, host_life, host_step) = ranks
            .iter()
            .max_by_key(|(d, _, h)| (d.peak, h.peak))
            .ok_or("no ranks")?;
        assert_eq!(
            plan.device.peak, dev.peak,
            "{what}: planned device peak vs the cpu device's (its whole life)"
        );
        assert_eq!(
            plan.host.peak, host_step.peak,
            "{what}: planned host peak vs the cpu device's during the step"
        );
        assert_eq!(
            report_tag_peaks(&plan.device),
            tag_peaks(dev),
            "{what}: device peaks per tag"
        );
        // Host tags: the same, but for the cpu's staging buffers (the
        // weights written at construction, the batch uploaded), which a
        // device without data does not need.
        let mut cpu_host = tag_peaks(host_life);
        let staging = cpu_host.remove("staging");
        assert!(staging.is_some(), "{what}: the cpu device staged uploads");
        assert_eq!(
            report_tag_peaks(&plan.host),
            cpu_host,
            "{what}: host peaks per tag (staging aside)"
        );
        // What held the peak adds up to it.
        for (space, m) in [("device", &plan.device), ("host", &plan.host)] {
            let sum: usize = m.tags.iter().map(|t| t.at_peak).sum();
            assert_eq!(sum, m.peak, "{what}: {space} tags at the peak");
            let by_cat: usize = m.by_category().iter().map(|(_, b)| b).sum();
            assert_eq!(by_cat, m.peak, "{what}: {space} categories at the peak");
        }
        assert!(plan.step_time > 0.0 && plan.optimizer_time > 0.0, "{what}");
        assert!(plan.optimizer_time < plan.step_time, "{what}");
    }
    Ok(())
}

/// Bytes of the tags that hold activations (attention, MLP, logits, layer
/// inputs) at the device peak.
fn activations_at_peak(r: &PlanReport) -> usize {
    r.device
        .by_category()
        .iter()
        .filter(|(c, _)| matches!(*c, "attention" | "mlp" | "logits" | "layer inputs"))
        .map(|(_, b)| b)
        .sum()
}

/// High-water marks of the activation tags on the device.
fn activation_tag_peaks(r: &PlanReport) -> BTreeMap<&'static str, usize> {
    r.device
        .tags
        .iter()
        .filter(|t| matches!(t.category, "attention" | "mlp" | "logits" | "layer inputs"))
        .map(|t| (t.tag, t.peak))
        .collect()
}

#[test]
fn fpdt_fits_16x_the_baseline_in_a_small_device_budget_because_its_activations_are_o_chunk(
) -> TestResult {
    // tiny-gpt on 2 GPUs of 1 MiB with 32 MiB of host memory each: the
    // baseline keeps every token's activations on the device, FPDT keeps
    // one chunk's there and the rest in host memory.
    let cfg = ModelConfig::preset("tiny-gpt")?;
    let (chunk, gpu, host) = (256, 1 << 20, 32 << 20);
    let sp = spec(chunk, 2, chunk, gpu, host);
    let limit = 1 << 20;
    let f = planner::max_seq_len(&cfg, &sp, PlanKind::Fpdt, limit)?;
    let u = planner::max_seq_len(&cfg, &sp, PlanKind::Ulysses, limit)?;
    assert!(u.seq_len > 0, "the baseline fits some sequence");
    assert!(
        f.seq_len < limit,
        "FPDT ends inside the search: {}",
        f.seq_len
    );
    let ratio = f.seq_len as f64 / u.seq_len as f64;
    println!(
        "tiny-gpt, 2 GPUs of 1 MiB, 32 MiB host each: FPDT {} tokens ({} probes), Ulysses {} \
         ({} probes): {ratio:.1}x",
        f.seq_len, f.probes, u.seq_len, u.probes
    );
    assert!(
        ratio >= 16.0,
        "FPDT {} vs Ulysses {} tokens: {ratio:.1}x",
        f.seq_len,
        u.seq_len
    );
    let fr = f.report.as_ref().ok_or("FPDT's report at its longest")?;
    let ur = u
        .report
        .as_ref()
        .ok_or("the baseline's report at its longest")?;
    // One granule more does not fit: the baseline for lack of device
    // memory, FPDT for lack of host memory (it still fits the device).
    let u_next = planner::plan(&cfg, &sp.at(u.seq_len + u.granule), PlanKind::Ulysses)?;
    assert!(
        !u_next.fits_device(),
        "the baseline is bounded by the device"
    );
    let f_next = planner::plan(&cfg, &sp.at(f.seq_len + f.granule), PlanKind::Fpdt)?;
    assert!(
        f_next.fits_device() && !f_next.fits_host(),
        "FPDT is bounded by host memory: device {} of {gpu}, host {} of {host}",
        f_next.device.peak,
        f_next.host.peak
    );
    // The reason: FPDT's activation buffers on the device are the same at
    // 4 chunks and at its longest sequence (O(chunk)), while the
    // baseline's grow with the sequence and fill its budget.
    let f4 = planner::plan(&cfg, &sp.at(4 * chunk), PlanKind::Fpdt)?;
    assert_eq!(
        activation_tag_peaks(&f4),
        activation_tag_peaks(fr),
        "FPDT activation tags at 4 chunks vs at {} tokens",
        f.seq_len
    );
    assert_eq!(activations_at_peak(&f4), activations_at_peak(fr));
    // Only the batch's token ids and labels grow on FPDT's device, by 8
    // bytes per token per GPU (rounded to 256-byte blocks).
    let growth = fr.device.peak - f4.device.peak;
    let batch = (f.seq_len - 4 * chunk) / 2 * 8;
    assert!(
        growth.abs_diff(batch) <= 1024,
        "FPDT device growth {growth} vs the batch's {batch}"
    );
    let u_small = planner::plan(&cfg, &sp.at(2 * u.granule), PlanKind::Ulysses)?;
    let (a_small, a_max) = (activations_at_peak(&u_small), activations_at_peak(ur));
    let len_ratio = u.seq_len as f64 / (2 * u.granule) as f64;
    let act_ratio = a_max as f64 / a_small as f64;
    assert!(
        act_ratio > 0.8 * len_ratio,
        "the baseline's activations grow with S: {act_ratio:.2}x for {len_ratio:.2}x tokens"
    );
    assert!(
        a_max > ur.device.peak / 2,
        "activations are most of the baseline's peak: {a_max} of {}",
        ur.device.peak
    );
    Ok(())
}

fn assert_names(e: &ModelError, want: &[&str]) {
    let msg = e.to_string();
    for w in want {
        assert!(msg.contains(w), "`{w}` missing from: {msg}");
    }
}

#[test]
fn bad_plans_are_errors_naming_the_field() -> TestResult {
    let cfg = ModelConfig::preset("tiny-gpt")?;
    let ok = spec(512, 2, 128, 64 << 20, 64 << 20);
    let err = |sp: &PlanSpec, kind| match planner::plan(&cfg, sp, kind) {
        Ok(_) => Err(format!("{sp:?} planned")),
        Err(e) => Ok(e),
    };
    // Zero GPUs.
    let e = err(
        &PlanSpec {
            gpus: 0,
            ..ok.clone()
        },
        PlanKind::Fpdt,
    )?;
    assert_names(&e, &["gpus", "positive"]);
    let e = planner::max_seq_len(
        &cfg,
        &PlanSpec {
            gpus: 0,
            ..ok.clone()
        },
        PlanKind::Fpdt,
        4096,
    )
    .err()
    .ok_or("max_seq_len with 0 GPUs")?;
    assert_names(&e, &["gpus"]);
    // Heads (4) not divisible by 3 GPUs.
    let e = err(&spec(384, 3, 192, 64 << 20, 64 << 20), PlanKind::Fpdt)?;
    assert_names(&e, &["heads", "4", "divisible", "3"]);
    let e = err(&spec(384, 3, 192, 64 << 20, 64 << 20), PlanKind::Ulysses)?;
    assert_names(&e, &["heads"]);
    // A chunk that does not divide the sequence, and one that does not
    // divide by the GPUs.
    let e = err(&spec(1000, 2, 300, 64 << 20, 64 << 20), PlanKind::Fpdt)?;
    assert_names(&e, &["seq_len", "1000", "chunk (300)"]);
    let e = err(&spec(1000, 2, 125, 64 << 20, 64 << 20), PlanKind::Fpdt)?;
    assert_names(&e, &["chunk", "125", "gpus (2)"]);
    // Rates and efficiency.
    let e = err(
        &PlanSpec {
            peak_tflops: 0.0,
            ..ok.clone()
        },
        PlanKind::Fpdt,
    )?;
    assert_names(&e, &["peak_tflops"]);
    let e = err(
        &PlanSpec {
            kernel_efficiency: 1.5,
            ..ok.clone()
        },
        PlanKind::Fpdt,
    )?;
    assert_names(&e, &["kernel_efficiency", "(0, 1]"]);
    // A device budget below even one chunk's step: nothing fits, and the
    // plan at one chunk says so (not an error: a report that does not fit).
    let tiny = spec(512, 2, 128, 64 << 10, 64 << 20);
    let m = planner::max_seq_len(&cfg, &tiny, PlanKind::Fpdt, 1 << 16)?;
    assert_eq!((m.seq_len, m.report.is_none(), m.probes), (0, true, 1));
    let one = planner::plan(&cfg, &tiny.at(128), PlanKind::Fpdt)?;
    assert!(!one.fits_device() && one.fits_host());
    assert!(one.device.peak > 64 << 10);
    Ok(())
}

/// Runs `fpdt plan` with `args`; returns (exit code, stdout, stderr).
fn fpdt_plan(args: &[&str]) -> Result<(Option<i32>, String, String), Box<dyn Error>> {
    let o = Command::new(env!("CARGO_BIN_EXE_fpdt"))
        .arg("plan")
        .args(args)
        .output()?;
    Ok((
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    ))
}

fn plan_fails(args: &[&str], want: &[&str]) -> TestResult {
    let (code, _, err) = fpdt_plan(args)?;
    assert_eq!(code, Some(1), "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
    for w in want {
        assert!(err.contains(w), "{args:?}: `{w}` missing from {err}");
    }
    Ok(())
}

#[test]
fn fpdt_plan_names_the_flag_of_bad_input() -> TestResult {
    let m = ["--model", "tiny-gpt"];
    let with =
        |extra: &[&'static str]| -> Vec<&'static str> { m.iter().chain(extra).copied().collect() };
    plan_fails(&with(&["--gpus", "0"]), &["--gpus"])?;
    plan_fails(&with(&["--precision", "fp8"]), &["--precision", "fp8"])?;
    plan_fails(
        &with(&["--gpus", "3", "--seq-len", "384", "--chunk", "96"]),
        &["--gpus", "heads (4)"],
    )?;
    plan_fails(
        &with(&["--seq-len", "1000", "--chunk", "300"]),
        &["--chunk", "300", "--seq-len 1000"],
    )?;
    // Device and host budgets that hold not even one chunk's step.
    let small = ["--gpus", "2", "--seq-len", "512", "--chunk", "128"];
    let mut a = with(&small);
    a.extend(["--gpu-memory", "64K"]);
    plan_fails(&a, &["--gpu-memory", "one chunk of 128 tokens", "--chunk"])?;
    let mut a = with(&small);
    a.extend(["--host-memory", "16K"]);
    plan_fails(&a, &["--host-memory", "one chunk of 128 tokens"])?;
    // The same model in budgets that do hold it plans both schedules.
    let mut a = with(&small);
    a.extend([
        "--gpu-memory",
        "1M",
        "--host-memory",
        "32M",
        "--search-limit",
        "8192",
    ]);
    let (code, out, err) = fpdt_plan(&a)?;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("FPDT fits"), "{out}");
    assert!(out.contains("largest sequence that fits"), "{out}");
    Ok(())
}

#[test]
fn a_bf16_plan_counts_what_the_gpu_path_allocates() -> TestResult {
    // Head dim 64: the attention kernels' (llama: RoPE reads positions).
    let cfg = ModelConfig {
        rope_theta: 10_000.0,
        ..ModelConfig::llama(31, 128, 2, 2, 2, 64)
    };
    let at = |precision| -> Result<PlanReport, Box<dyn Error>> {
        let s = PlanSpec {
            precision,
            ..spec(1024, 2, 256, 1 << 30, 1 << 30)
        };
        Ok(planner::plan(&cfg, &s, PlanKind::Fpdt)?)
    };
    let f32 = report_tag_peaks(&at(fpdt_model::config::Precision::F32)?.device);
    let bf16 = report_tag_peaks(&at(fpdt_model::config::Precision::Bf16)?.device);
    // The cuda device's own buffers: the GEMM workspace (cuBLASLt's 32
    // MiB) and the positions 0..S (u32) RoPE reads, in bf16 only.
    assert_eq!(
        bf16.get("cublaslt workspace"),
        Some(&(32 << 20)),
        "{bf16:?}"
    );
    assert_eq!(bf16.get("rope positions"), Some(&(1024 * 4)), "{bf16:?}");
    for t in ["cublaslt workspace", "rope positions"] {
        assert!(!f32.contains_key(t), "{t} in the f32 plan: {f32:?}");
    }
    // The layer inputs (kept resident: one rank's chunk rows of hidden
    // 128) in bf16: half the f32 bytes.
    let x = |m: &BTreeMap<&str, usize>| m.get("x").copied().unwrap_or(0);
    assert!(x(&f32) > 0, "{f32:?}");
    assert_eq!(2 * x(&bf16), x(&f32), "layer inputs: {bf16:?} vs {f32:?}");
    Ok(())
}
