//! Shared helpers of the model tests: tiny configs, random parameters and
//! batches, comparisons.
#![allow(dead_code)]

use fpdt_model::{ModelConfig, SplitMix64};

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
    let layout = cfg.layout();
    let mut p: Vec<f64> = layout
        .init(seed, 0.3)
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
