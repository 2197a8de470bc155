//! AdamW with fp32 master weights and moments and a low-precision working
//! copy, and the squared-norm reduction for gradient clipping.

use super::{bad, check_len, par_rows, row_ranges, split_rows, Element};
use crate::Result;

const MIN_ELEMS: usize = 1 << 15;

/// AdamW hyper-parameters (decoupled weight decay, PyTorch semantics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

/// One AdamW step `step` (1-based) on a shard: with `g = grad_scale * grad`,
/// `p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
/// p -= lr * (m / (1-b1^step)) / (sqrt(v / (1-b2^step)) + eps)`, then the
/// working copy `working = p` rounded to its dtype.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step<G: Element, W: Element>(
    cfg: &AdamW,
    step: u32,
    grad_scale: f32,
    master: &mut [f32],
    grad: &[G],
    m: &mut [f32],
    v: &mut [f32],
    working: &mut [W],
) -> Result<()> {
    const K: &str = "adamw_step";
    if step == 0 {
        return Err(bad(K, "step", "is 0; steps count from 1"));
    }
    for (arg, b) in [("beta1", cfg.beta1), ("beta2", cfg.beta2)] {
        if !(0.0..1.0).contains(&b) {
            return Err(bad(K, arg, format!("{b} is outside [0, 1)")));
        }
    }
    let n = master.len();
    check_len(K, "grad", grad.len(), n)?;
    check_len(K, "m", m.len(), n)?;
    check_len(K, "v", v.len(), n)?;
    check_len(K, "working", working.len(), n)?;
    let bc1 = 1.0 - f64::from(cfg.beta1).powi(step as i32);
    let bc2 = 1.0 - f64::from(cfg.beta2).powi(step as i32);
    let (step_size, bc2_sqrt) = ((f64::from(cfg.lr) / bc1) as f32, bc2.sqrt() as f32);
    let decay = 1.0 - cfg.lr * cfg.weight_decay;
    let c = *cfg;
    let ranges = row_ranges(n, MIN_ELEMS);
    let parts: Vec<_> = split_rows(master, 1, &ranges)
        .into_iter()
        .zip(split_rows(m, 1, &ranges))
        .zip(split_rows(v, 1, &ranges))
        .zip(split_rows(working, 1, &ranges))
        .collect();
    par_rows(&ranges, parts, |r, (((p, m), v), w)| {
        for (i, e) in r.enumerate() {
            let g = grad_scale * grad[e].to_f32();
            m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g;
            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g * g;
            let denom = v[i].sqrt() / bc2_sqrt + c.eps;
            p[i] = p[i] * decay - step_size * m[i] / denom;
            w[i] = W::from_f32(p[i]);
        }
    });
    Ok(())
}

/// `sum x^2` (f64 accumulation of per-range f32 partials of 1024 elements).
pub fn sq_norm<E: Element>(x: &[E]) -> f64 {
    let ranges = row_ranges(x.len(), MIN_ELEMS);
    let sums = std::sync::Mutex::new(0.0f64);
    par_rows(&ranges, vec![(); ranges.len()], |r, ()| {
        let s: f64 = x[r]
            .chunks(1024)
            .map(|c| f64::from(c.iter().map(|v| v.to_f32() * v.to_f32()).sum::<f32>()))
            .sum();
        if let Ok(mut t) = sums.lock() {
            *t += s;
        }
    });
    sums.into_inner().unwrap_or(f64::NAN)
}
