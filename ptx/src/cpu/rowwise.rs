//! Row-wise and element-wise twins: embedding, LayerNorm, RMSNorm, GeLU
//! (tanh), SwiGLU, RoPE (rotate-half), residual add. Arithmetic in f32,
//! parallel over contiguous row ranges.

use super::{bad, check_len, fast_exp, mul, par_rows, row_ranges, split_rows, Element};
use crate::Result;

/// Element-wise work below this many elements per thread is not split.
const MIN_ELEMS: usize = 1 << 15;

fn rows_of(kernel: &'static str, arg: &'static str, len: usize, dim: usize) -> Result<usize> {
    if dim == 0 {
        return Err(bad(kernel, "dim", "is 0, must be at least 1"));
    }
    if len % dim != 0 {
        return Err(bad(
            kernel,
            arg,
            format!("has {len} elements, not a multiple of dim = {dim}"),
        ));
    }
    Ok(len / dim)
}

fn min_rows(dim: usize) -> usize {
    (MIN_ELEMS / dim.max(1)).max(1)
}

/// Applies `f` element-wise over equal-length inputs into `out`, in parallel.
fn map2<A: Element, B: Element, O: Element>(
    a: &[A],
    b: &[B],
    out: &mut [O],
    f: impl Fn(f32, f32) -> f32 + Sync,
) {
    let ranges = row_ranges(out.len(), MIN_ELEMS);
    let parts = split_rows(out, 1, &ranges);
    par_rows(&ranges, parts, |r, o| {
        for ((o, x), y) in o.iter_mut().zip(&a[r.clone()]).zip(&b[r]) {
            *o = O::from_f32(f(x.to_f32(), y.to_f32()));
        }
    });
}

/// Embedding lookup: `out[t] = table[ids[t]]`, table `[vocab, dim]`,
/// out `[tokens, dim]`. An id outside the table is an error.
pub fn embedding_fwd<E: Element>(
    table: &[E],
    ids: &[u32],
    dim: usize,
    out: &mut [E],
) -> Result<()> {
    const K: &str = "embedding_fwd";
    let vocab = rows_of(K, "table", table.len(), dim)?;
    check_len(K, "out", out.len(), mul(K, "ids", ids.len(), dim)?)?;
    if let Some((t, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(bad(
            K,
            "ids",
            format!("id {id} at token {t} is outside the vocab of {vocab}"),
        ));
    }
    for (row, &id) in out.chunks_mut(dim).zip(ids) {
        row.copy_from_slice(&table[id as usize * dim..][..dim]);
    }
    Ok(())
}

/// Embedding backward: scatter-add `dtable[ids[t]] += dout[t]` (f32),
/// parallel over vocab ranges.
pub fn embedding_bwd<E: Element>(
    dout: &[E],
    ids: &[u32],
    dim: usize,
    dtable: &mut [f32],
) -> Result<()> {
    const K: &str = "embedding_bwd";
    let vocab = rows_of(K, "dtable", dtable.len(), dim)?;
    check_len(K, "dout", dout.len(), mul(K, "ids", ids.len(), dim)?)?;
    if let Some((t, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(bad(
            K,
            "ids",
            format!("id {id} at token {t} is outside the vocab of {vocab}"),
        ));
    }
    let ranges = row_ranges(vocab, 1.max(vocab / super::threads().max(1)));
    let parts = split_rows(dtable, dim, &ranges);
    par_rows(&ranges, parts, |r, dt| {
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if r.contains(&id) {
                let dst = &mut dt[(id - r.start) * dim..][..dim];
                for (a, b) in dst.iter_mut().zip(&dout[t * dim..][..dim]) {
                    *a += b.to_f32();
                }
            }
        }
    });
    Ok(())
}

/// LayerNorm forward over rows of `dim`: `y = (x - mean) * rstd * gamma + beta`,
/// also writing `mean` and `rstd = 1/sqrt(var + eps)` per row (f32).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_fwd<E: Element>(
    x: &[E],
    gamma: &[E],
    beta: &[E],
    dim: usize,
    eps: f32,
    y: &mut [E],
    mean: &mut [f32],
    rstd: &mut [f32],
) -> Result<()> {
    const K: &str = "layer_norm_fwd";
    let rows = rows_of(K, "x", x.len(), dim)?;
    check_len(K, "gamma", gamma.len(), dim)?;
    check_len(K, "beta", beta.len(), dim)?;
    check_len(K, "y", y.len(), x.len())?;
    check_len(K, "mean", mean.len(), rows)?;
    check_len(K, "rstd", rstd.len(), rows)?;
    let ranges = row_ranges(rows, min_rows(dim));
    let parts: Vec<_> = split_rows(y, dim, &ranges)
        .into_iter()
        .zip(split_rows(mean, 1, &ranges))
        .zip(split_rows(rstd, 1, &ranges))
        .collect();
    par_rows(&ranges, parts, |r, ((y, mean), rstd)| {
        for (i, row) in r.clone().enumerate() {
            let xr = &x[row * dim..][..dim];
            let mu = xr.iter().map(|v| v.to_f32()).sum::<f32>() / dim as f32;
            let var = xr.iter().map(|v| (v.to_f32() - mu).powi(2)).sum::<f32>() / dim as f32;
            let rs = 1.0 / (var + eps).sqrt();
            mean[i] = mu;
            rstd[i] = rs;
            for (c, o) in y[i * dim..][..dim].iter_mut().enumerate() {
                *o = E::from_f32((xr[c].to_f32() - mu) * rs * gamma[c].to_f32() + beta[c].to_f32());
            }
        }
    });
    Ok(())
}

/// Reduces per-range partial sums of width `dim` into `acc` (`+=`).
fn add_partials(acc: &mut [f32], partials: Vec<Vec<f32>>) {
    for p in partials {
        acc.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
}

/// LayerNorm backward: writes `dx` and accumulates `dgamma += sum dy * xhat`,
/// `dbeta += sum dy` (f32), from the saved `mean` and `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_bwd<E: Element>(
    x: &[E],
    gamma: &[E],
    dy: &[E],
    mean: &[f32],
    rstd: &[f32],
    dim: usize,
    dx: &mut [E],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    const K: &str = "layer_norm_bwd";
    let rows = rows_of(K, "x", x.len(), dim)?;
    check_len(K, "gamma", gamma.len(), dim)?;
    check_len(K, "dy", dy.len(), x.len())?;
    check_len(K, "mean", mean.len(), rows)?;
    check_len(K, "rstd", rstd.len(), rows)?;
    check_len(K, "dx", dx.len(), x.len())?;
    check_len(K, "dgamma", dgamma.len(), dim)?;
    check_len(K, "dbeta", dbeta.len(), dim)?;
    let ranges = row_ranges(rows, min_rows(dim));
    let parts = split_rows(dx, dim, &ranges);
    let partials = std::sync::Mutex::new(Vec::new());
    par_rows(&ranges, parts, |r, dxp| {
        let mut dg = vec![0.0f32; dim];
        let mut db = vec![0.0f32; dim];
        let mut g = vec![0.0f32; dim];
        let mut xh = vec![0.0f32; dim];
        for (i, row) in r.clone().enumerate() {
            let (mu, rs) = (mean[row], rstd[row]);
            let (mut s1, mut s2) = (0.0f32, 0.0f32);
            for c in 0..dim {
                let d = dy[row * dim + c].to_f32();
                xh[c] = (x[row * dim + c].to_f32() - mu) * rs;
                g[c] = d * gamma[c].to_f32();
                s1 += g[c];
                s2 += g[c] * xh[c];
                dg[c] += d * xh[c];
                db[c] += d;
            }
            let (s1, s2) = (s1 / dim as f32, s2 / dim as f32);
            for (c, o) in dxp[i * dim..][..dim].iter_mut().enumerate() {
                *o = E::from_f32(rs * (g[c] - s1 - xh[c] * s2));
            }
        }
        if let Ok(mut p) = partials.lock() {
            p.push((dg, db));
        }
    });
    let (dgs, dbs): (Vec<_>, Vec<_>) = partials
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .unzip();
    add_partials(dgamma, dgs);
    add_partials(dbeta, dbs);
    Ok(())
}

/// RMSNorm forward: `y = x * rstd * gamma`, `rstd = 1/sqrt(mean(x^2) + eps)`
/// per row (saved, f32).
pub fn rms_norm_fwd<E: Element>(
    x: &[E],
    gamma: &[E],
    dim: usize,
    eps: f32,
    y: &mut [E],
    rstd: &mut [f32],
) -> Result<()> {
    const K: &str = "rms_norm_fwd";
    let rows = rows_of(K, "x", x.len(), dim)?;
    check_len(K, "gamma", gamma.len(), dim)?;
    check_len(K, "y", y.len(), x.len())?;
    check_len(K, "rstd", rstd.len(), rows)?;
    let ranges = row_ranges(rows, min_rows(dim));
    let parts: Vec<_> = split_rows(y, dim, &ranges)
        .into_iter()
        .zip(split_rows(rstd, 1, &ranges))
        .collect();
    par_rows(&ranges, parts, |r, (y, rstd)| {
        for (i, row) in r.clone().enumerate() {
            let xr = &x[row * dim..][..dim];
            let ms = xr.iter().map(|v| v.to_f32().powi(2)).sum::<f32>() / dim as f32;
            let rs = 1.0 / (ms + eps).sqrt();
            rstd[i] = rs;
            for (c, o) in y[i * dim..][..dim].iter_mut().enumerate() {
                *o = E::from_f32(xr[c].to_f32() * rs * gamma[c].to_f32());
            }
        }
    });
    Ok(())
}

/// RMSNorm backward: writes `dx = rstd * (dy*gamma - xhat * mean(dy*gamma*xhat))`
/// and accumulates `dgamma += sum dy * xhat` (f32).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_bwd<E: Element>(
    x: &[E],
    gamma: &[E],
    dy: &[E],
    rstd: &[f32],
    dim: usize,
    dx: &mut [E],
    dgamma: &mut [f32],
) -> Result<()> {
    const K: &str = "rms_norm_bwd";
    let rows = rows_of(K, "x", x.len(), dim)?;
    check_len(K, "gamma", gamma.len(), dim)?;
    check_len(K, "dy", dy.len(), x.len())?;
    check_len(K, "rstd", rstd.len(), rows)?;
    check_len(K, "dx", dx.len(), x.len())?;
    check_len(K, "dgamma", dgamma.len(), dim)?;
    let ranges = row_ranges(rows, min_rows(dim));
    let parts = split_rows(dx, dim, &ranges);
    let partials = std::sync::Mutex::new(Vec::new());
    par_rows(&ranges, parts, |r, dxp| {
        let mut dg = vec![0.0f32; dim];
        let mut g = vec![0.0f32; dim];
        let mut xh = vec![0.0f32; dim];
        for (i, row) in r.clone().enumerate() {
            let rs = rstd[row];
            let mut s = 0.0f32;
            for c in 0..dim {
                let d = dy[row * dim + c].to_f32();
                xh[c] = x[row * dim + c].to_f32() * rs;
                g[c] = d * gamma[c].to_f32();
                s += g[c] * xh[c];
                dg[c] += d * xh[c];
            }
            let s = s / dim as f32;
            for (c, o) in dxp[i * dim..][..dim].iter_mut().enumerate() {
                *o = E::from_f32(rs * (g[c] - xh[c] * s));
            }
        }
        if let Ok(mut p) = partials.lock() {
            p.push(dg);
        }
    });
    add_partials(dgamma, partials.into_inner().unwrap_or_default());
    Ok(())
}

const GELU_C: f32 = 0.797_884_6; // sqrt(2/pi)
const GELU_A: f32 = 0.044_715;

/// `1 / (1 + e^-x)`, with the vectorisable [`fast_exp`] (libm's `expf`
/// per element made GeLU and SwiGLU compute bound).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// GeLU, tanh approximation: `y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`,
/// computed as `x sigmoid(2u)` (the same function: `1 + tanh u = 2 sigmoid(2u)`),
/// which has no cancellation where `tanh u` is near -1.
pub fn gelu_tanh_fwd<E: Element>(x: &[E], y: &mut [E]) -> Result<()> {
    check_len("gelu_tanh_fwd", "y", y.len(), x.len())?;
    map2(x, x, y, |x, _| {
        x * sigmoid(2.0 * GELU_C * (x + GELU_A * x * x * x))
    });
    Ok(())
}

/// GeLU (tanh) backward: `dx = dy * gelu'(x)`; with `s = sigmoid(2u)`,
/// `0.5 (1 + tanh u) = s` and `1 - tanh^2 u = 4 s (1 - s)`.
pub fn gelu_tanh_bwd<E: Element>(x: &[E], dy: &[E], dx: &mut [E]) -> Result<()> {
    check_len("gelu_tanh_bwd", "dy", dy.len(), x.len())?;
    check_len("gelu_tanh_bwd", "dx", dx.len(), x.len())?;
    map2(x, dy, dx, |x, d| {
        let s = sigmoid(2.0 * GELU_C * (x + GELU_A * x * x * x));
        d * (s + 2.0 * x * s * (1.0 - s) * GELU_C * (1.0 + 3.0 * GELU_A * x * x))
    });
    Ok(())
}

/// SwiGLU: `out = silu(gate) * up`, element-wise over equal shapes.
pub fn swiglu_fwd<E: Element>(gate: &[E], up: &[E], out: &mut [E]) -> Result<()> {
    check_len("swiglu_fwd", "up", up.len(), gate.len())?;
    check_len("swiglu_fwd", "out", out.len(), gate.len())?;
    map2(gate, up, out, |g, u| g * sigmoid(g) * u);
    Ok(())
}

/// SwiGLU backward: `dgate = dout * up * silu'(gate)`, `dup = dout * silu(gate)`.
pub fn swiglu_bwd<E: Element>(
    gate: &[E],
    up: &[E],
    dout: &[E],
    dgate: &mut [E],
    dup: &mut [E],
) -> Result<()> {
    const K: &str = "swiglu_bwd";
    let n = gate.len();
    check_len(K, "up", up.len(), n)?;
    check_len(K, "dout", dout.len(), n)?;
    check_len(K, "dgate", dgate.len(), n)?;
    check_len(K, "dup", dup.len(), n)?;
    let ranges = row_ranges(n, MIN_ELEMS);
    let parts: Vec<_> = split_rows(dgate, 1, &ranges)
        .into_iter()
        .zip(split_rows(dup, 1, &ranges))
        .collect();
    par_rows(&ranges, parts, |r, (dg, du)| {
        for (i, e) in r.enumerate() {
            let (g, u, d) = (gate[e].to_f32(), up[e].to_f32(), dout[e].to_f32());
            let s = sigmoid(g);
            dg[i] = E::from_f32(d * u * s * (1.0 + g * (1.0 - s)));
            du[i] = E::from_f32(d * g * s);
        }
    });
    Ok(())
}

/// RoPE, rotate-half form, on `x: [tokens, heads, head_dim]` with
/// `positions: [tokens]`: for `i < head_dim/2`, angle `pos * theta^(-2i/head_dim)`
/// (computed in f64), `y1 = x1 cos - x2 sin`, `y2 = x2 cos + x1 sin` where
/// `x1 = x[i]`, `x2 = x[i + head_dim/2]`. `inverse` rotates by `-angle`
/// (the backward).
#[allow(clippy::too_many_arguments)]
fn rope<E: Element>(
    kernel: &'static str,
    x: &[E],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    theta: f32,
    inverse: bool,
    y: &mut [E],
) -> Result<()> {
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(bad(
            kernel,
            "head_dim",
            format!("{head_dim} must be even and non-zero"),
        ));
    }
    if heads == 0 {
        return Err(bad(kernel, "heads", "is 0, must be at least 1"));
    }
    if !(theta.is_finite() && theta > 1.0) {
        return Err(bad(
            kernel,
            "theta",
            format!("{theta} must be finite and > 1"),
        ));
    }
    let width = mul(kernel, "heads", heads, head_dim)?;
    let n = mul(kernel, "positions", positions.len(), width)?;
    check_len(kernel, "x", x.len(), n)?;
    check_len(kernel, "y", y.len(), n)?;
    let half = head_dim / 2;
    let sign = if inverse { -1.0f64 } else { 1.0 };
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| f64::from(theta).powf(-2.0 * i as f64 / head_dim as f64))
        .collect();
    let ranges = row_ranges(positions.len(), min_rows(width));
    let parts = split_rows(y, width, &ranges);
    par_rows(&ranges, parts, |r, yp| {
        let mut cs = vec![(0.0f32, 0.0f32); half];
        for (i, t) in r.clone().enumerate() {
            let pos = f64::from(positions[t]);
            for (c, f) in cs.iter_mut().zip(&inv_freq) {
                let (s, co) = (sign * pos * f).sin_cos();
                *c = (co as f32, s as f32);
            }
            for h in 0..heads {
                let xr = &x[(t * heads + h) * head_dim..][..head_dim];
                let yr = &mut yp[(i * heads + h) * head_dim..][..head_dim];
                for (c, &(co, s)) in cs.iter().enumerate() {
                    let (x1, x2) = (xr[c].to_f32(), xr[c + half].to_f32());
                    yr[c] = E::from_f32(x1 * co - x2 * s);
                    yr[c + half] = E::from_f32(x2 * co + x1 * s);
                }
            }
        }
    });
    Ok(())
}

/// RoPE forward (see the rotation above): `y = rope(x, positions)`.
pub fn rope_fwd<E: Element>(
    x: &[E],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    theta: f32,
    y: &mut [E],
) -> Result<()> {
    rope("rope_fwd", x, positions, heads, head_dim, theta, false, y)
}

/// RoPE backward: the transpose of the rotation, i.e. rotation by `-angle`.
pub fn rope_bwd<E: Element>(
    dy: &[E],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    theta: f32,
    dx: &mut [E],
) -> Result<()> {
    rope("rope_bwd", dy, positions, heads, head_dim, theta, true, dx)
}

/// Residual add: `out = a + b` element-wise (f32 arithmetic).
pub fn residual_add<E: Element>(a: &[E], b: &[E], out: &mut [E]) -> Result<()> {
    check_len("residual_add", "b", b.len(), a.len())?;
    check_len("residual_add", "out", out.len(), a.len())?;
    map2(a, b, out, |x, y| x + y);
    Ok(())
}

#[cfg(test)]
mod exp_tests {
    use super::*;

    #[test]
    fn fast_exp_is_within_4e_7_of_f64() {
        let mut worst = 0.0f64;
        let n = 200_000;
        for i in 0..=n {
            let v = -87.0 + 175.0 * i as f32 / n as f32;
            let want = f64::from(v).exp();
            let rel = ((f64::from(fast_exp(v)) - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
        // Clamped above, 0 below the normal range.
        assert!(fast_exp(1e4).is_finite() && fast_exp(1e4) > 1e38);
        assert_eq!(fast_exp(-1e4), 0.0);
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn gelu_and_its_gradient_follow_f64_without_cancellation() {
        let xs: Vec<f32> = (0..4001)
            .map(|i| -12.0 + 24.0 * i as f32 / 4000.0)
            .collect();
        let mut y = vec![0.0f32; xs.len()];
        let mut g = vec![0.0f32; xs.len()];
        gelu_tanh_fwd(&xs, &mut y).unwrap();
        gelu_tanh_bwd(&xs, &vec![1.0f32; xs.len()], &mut g).unwrap();
        for ((&x, &y), &g) in xs.iter().zip(&y).zip(&g) {
            // The f64 reference (tanh form) where it does not cancel; the
            // same function in its sigmoid form in f64 where it would
            // (f64's tanh rounds to -1 below x = -6 or so).
            let xd = f64::from(x);
            let u = 0.797_884_560_802_865_4 * (xd + 0.044_715 * xd * xd * xd);
            let sd = 1.0 / (1.0 + (-2.0 * u).exp());
            let du = 0.797_884_560_802_865_4 * (1.0 + 3.0 * 0.044_715 * xd * xd);
            let (want, dwant) = if x.abs() <= 4.0 {
                (
                    crate::reference::gelu_tanh(xd),
                    crate::reference::gelu_tanh_grad(xd),
                )
            } else {
                (xd * sd, sd + 2.0 * xd * sd * (1.0 - sd) * du)
            };
            // Relative to the value itself, even where it is tiny (x << 0).
            // In the tails the f32 argument's own rounding (|2u| up to 80,
            // so about 5e-6 absolute) bounds any f32 implementation; below
            // 1e-35 (past the clamp of fast_exp) values are zero to f32.
            // The gradient is a sum of terms of order 0.1-1 that cancel
            // near its zero (x = -0.75): its error is absolute there.
            let tol = if x.abs() <= 4.0 { 2e-6 } else { 3e-5 };
            assert!(
                (f64::from(y) - want).abs() <= tol * want.abs() + 1e-35,
                "gelu({x}) = {y}, want {want}"
            );
            assert!(
                (f64::from(g) - dwant).abs() <= tol * dwant.abs().max(0.05),
                "gelu'({x}) = {g}, want {dwant}"
            );
        }
    }
}
