//! Shared helpers of the model tests: tiny configs, random parameters and
//! batches, comparisons.
#![allow(dead_code)]

use std::path::PathBuf;

use fpdt_model::{FpdtGroup, ModelConfig, Schedule, SplitMix64};
use fpdt_runtime::{AllocEvent, CpuConfig, MetaConfig};

/// A small cpu device for tests: 64 MiB of device and host memory, the
/// arena pageable (no memlock needed), freed blocks poisoned.
pub fn cpu() -> CpuConfig {
    CpuConfig {
        name: "t".into(),
        device_memory: 64 << 20,
        host_memory: 64 << 20,
        pin_host_memory: false,
        poison_freed: true,
        ..CpuConfig::default()
    }
}

/// The allocation events of one forward and backward on each rank, on the
/// cpu device (random weights and batch) or on the meta device.
pub fn traces(cfg: &ModelConfig, sched: Schedule, meta: bool) -> Vec<Vec<AllocEvent>> {
    let params = random_params(cfg, 1);
    let p32: Vec<f32> = params.iter().map(|&x| x as f32).collect();
    let (tokens, targets) = random_batch(cfg, sched.seq_len, 2);
    let mut g = if meta {
        FpdtGroup::meta(cfg, sched, &MetaConfig::default()).unwrap()
    } else {
        FpdtGroup::cpu(cfg, sched, &p32, &cpu()).unwrap()
    };
    g.on_all(|r| r.load_batch(&tokens, &targets)).unwrap();
    g.on_all(|r| {
        r.device().ledger().start_recording();
        r.forward_backward()?;
        Ok(r.device().ledger().take_recording())
    })
    .unwrap()
}

/// Asserts that the cpu and meta devices record the same allocation
/// events for one step of `cfg` under `sched`, on every rank.
pub fn assert_cpu_and_meta_traces_equal(cfg: &ModelConfig, sched: Schedule) {
    let c = traces(cfg, sched, false);
    let m = traces(cfg, sched, true);
    assert_eq!(c.len(), m.len());
    for (r, (a, b)) in c.iter().zip(&m).enumerate() {
        assert!(
            a.len() > 100,
            "rank {r}: only {} allocation events",
            a.len()
        );
        assert_eq!(
            a, b,
            "rank {r} of {sched:?}: cpu and meta allocation traces differ"
        );
    }
}

/// A fresh directory under the system's temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `fpdt-<tag>-<pid>`, emptied first.
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("fpdt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    /// The path of `name` inside.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The path of `name` inside, as a string (for command lines).
    pub fn s(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny GPT (LayerNorm, GeLU, biases, tied head).
pub fn tiny_gpt() -> ModelConfig {
    ModelConfig {
        intermediate: 48,
        ..ModelConfig::gpt(29, 16, 2, 4)
    }
}

/// A tiny Llama with GQA (4 query heads over 2 kv heads, untied head).
pub fn tiny_llama() -> ModelConfig {
    ModelConfig {
        rope_theta: 10_000.0,
        ..ModelConfig::llama(31, 16, 2, 4, 2, 40)
    }
}

/// Parameters with every kind of value exercised: weights of std `0.3`,
/// norm gains around 1 and non-zero biases.
pub fn random_params(cfg: &ModelConfig, seed: u64) -> Vec<f64> {
    random_params_std(cfg, seed, 0.3)
}

/// [`random_params`] with weights of std `std`.
pub fn random_params_std(cfg: &ModelConfig, seed: u64, std: f64) -> Vec<f64> {
    let layout = cfg.layout();
    let mut p: Vec<f64> = layout
        .init(seed, std)
        .iter()
        .map(|&x| f64::from(x))
        .collect();
    let mut rng = SplitMix64(seed ^ 0xABCD);
    for e in layout.entries() {
        let is_bias = e.name.ends_with(".bias");
        let is_gain = e.name.contains("norm") && !is_bias;
        for x in &mut p[e.range()] {
            if is_bias {
                *x = 0.1 * rng.uniform_sym();
            } else if is_gain {
                *x = 1.0 + 0.2 * rng.uniform_sym();
            }
        }
    }
    // Round to f32 so the f32 model and the f64 reference see the same values.
    p.iter().map(|&x| f64::from(x as f32)).collect()
}

/// Random tokens and next-token targets (the last target ignored, plus one
/// more ignored in the middle when the sequence is long enough).
pub fn random_batch(cfg: &ModelConfig, seq: usize, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut rng = SplitMix64(seed);
    let tokens: Vec<u32> = (0..=seq)
        .map(|_| rng.below(cfg.vocab_size) as u32)
        .collect();
    let mut targets: Vec<i32> = tokens[1..].iter().map(|&t| t as i32).collect();
    targets[seq - 1] = -1;
    if seq > 4 {
        targets[seq / 2] = -1;
    }
    (tokens[..seq].to_vec(), targets)
}

/// Largest `|a - b| / max(|b|, floor)` over the elements, with the index.
pub fn max_rel(a: &[f64], b: &[f64], floor: f64) -> (f64, usize) {
    assert_eq!(a.len(), b.len());
    let mut worst = (0.0, 0);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let e = (x - y).abs() / y.abs().max(floor);
        if e > worst.0 || e.is_nan() {
            worst = (e, i);
        }
    }
    worst
}

/// The AdamW settings of the optimizer tests.
pub fn test_adamw() -> fpdt_ptx::cpu::AdamW {
    fpdt_ptx::cpu::AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    }
}
