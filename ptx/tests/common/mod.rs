//! Test helpers shared by the kernel tests: seeded random inputs, bf16
//! rounding, and the error measure.
#![allow(dead_code)]

use fpdt_ptx::cpu::Element;
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A seeded generator.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` uniform values in `[-a, a)`.
pub fn uniform(r: &mut StdRng, n: usize, a: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-a..a)).collect()
}

/// Converts to the element type.
pub fn to_e<E: Element>(x: &[f32]) -> Vec<E> {
    x.iter().map(|&v| E::from_f32(v)).collect()
}

/// Widens elements to f64 (exactly: the oracle sees the stored values).
pub fn to_f64<E: Element>(x: &[E]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// Rounds f32 values to bf16 and back.
pub fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

/// Relative error in the max norm: `max |a - b| / max |b|` (b the
/// reference); `max |a - b|` when b is all zero. Non-finite values give inf
/// unless both sides agree exactly.
pub fn rel_err<E: Element>(a: &[E], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        let x = x.to_f64();
        if !y.is_finite() || !x.is_finite() {
            if x != *y {
                return f64::INFINITY;
            }
            continue;
        }
        num = num.max((x - y).abs());
        den = den.max(y.abs());
    }
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Relative error of two f64 vectors.
pub fn rel_err64(a: &[f64], b: &[f64]) -> f64 {
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let den = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Tolerance of an output stored as `E`: 1e-5 for f32, 1e-2 for bf16.
pub fn tol<E: Element>() -> f64 {
    match E::DTYPE {
        fpdt_ptx::cpu::DType::F32 => 1e-5,
        fpdt_ptx::cpu::DType::BF16 => 1e-2,
    }
}
