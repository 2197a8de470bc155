//! LayerNorm (GPT) and RMSNorm (Llama), forward and backward. The row
//! statistics are recomputed in backward from the input (they are tiny; the
//! input is what the schedule keeps).

use std::ops::Range;

use fpdt_ptx::cpu::{layer_norm_bwd, layer_norm_fwd, rms_norm_bwd, rms_norm_fwd};
use fpdt_ptx::kernels;

use super::{kernel, Buf, Ctx, Tv};
use crate::config::Norm;
use crate::error::Result;

/// `y = norm(x)` over `t` rows of `hidden`, with gain `w` and bias `b`.
pub(crate) fn forward(
    ctx: &Ctx<'_>,
    x: Tv<'_>,
    w: &Range<usize>,
    b: &Option<Range<usize>>,
    y: Tv<'_>,
    t: usize,
) -> Result<()> {
    let (dim, eps) = (ctx.cfg.hidden, ctx.cfg.norm_eps as f32);
    let flops = 8.0 * (t * dim) as f64;
    let gain = ctx.p(w)?;
    if ctx.gpu && x.dt == y.dt && gain.dt == x.dt {
        return forward_ptx(ctx, x, gain, b, y, t).map(drop);
    }
    match (ctx.cfg.norm, b) {
        (Norm::LayerNorm, Some(b)) => kernel(
            ctx.s(),
            "layer_norm_fwd",
            flops,
            &[x, gain, ctx.p(b)?],
            &[y],
            move |i, o| {
                let (mut mean, mut rstd) = (vec![0.0; t], vec![0.0; t]);
                layer_norm_fwd(i[0], i[1], i[2], dim, eps, o[0], &mut mean, &mut rstd)
            },
        ),
        _ => kernel(
            ctx.s(),
            "rms_norm_fwd",
            flops,
            &[x, gain],
            &[y],
            move |i, o| {
                let mut rstd = vec![0.0; t];
                rms_norm_fwd(i[0], i[1], dim, eps, o[0], &mut rstd)
            },
        ),
    }
}

/// The row statistics a forward on the GPU wrote (f32, one per row).
struct Stats {
    rstd: Buf,
    /// LayerNorm's mean (None for RMSNorm).
    mean: Option<Buf>,
}

/// The forward as its PTX kernel (one dtype for x, the gain, the bias and
/// y); returns the row statistics, which the forward pass drops (the
/// backward recomputes them from x with this same kernel).
fn forward_ptx(
    ctx: &Ctx<'_>,
    x: Tv<'_>,
    gain: Tv<'_>,
    b: &Option<Range<usize>>,
    y: Tv<'_>,
    t: usize,
) -> Result<Stats> {
    let (dim, eps) = (ctx.cfg.hidden, ctx.cfg.norm_eps as f32);
    let flops = 8.0 * (t * dim) as f64;
    let rstd = ctx.alloc(t, "norm rstd")?;
    match (ctx.cfg.norm, b) {
        (Norm::LayerNorm, Some(b)) => {
            let beta = ctx.p(b)?;
            let mean = ctx.alloc(t, "norm mean")?;
            let l = kernels::layer_norm_fwd(
                t,
                dim,
                eps,
                x.dt,
                y.addr(),
                mean.view().addr(),
                rstd.view().addr(),
                x.addr(),
                gain.addr(),
                beta.addr(),
            )?;
            let writes = [y.v, mean.buf.view(), rstd.buf.view()];
            super::ptx_launch(ctx.s(), &l, flops, &[x.v, gain.v, beta.v], &writes)?;
            Ok(Stats {
                rstd,
                mean: Some(mean),
            })
        }
        _ => {
            let l = kernels::rms_norm_fwd(
                t,
                dim,
                eps,
                x.dt,
                y.addr(),
                rstd.view().addr(),
                x.addr(),
                gain.addr(),
            )?;
            super::ptx_launch(ctx.s(), &l, flops, &[x.v, gain.v], &[y.v, rstd.buf.view()])?;
            Ok(Stats { rstd, mean: None })
        }
    }
}

/// Backward: `dx (+)= norm'(x)^T dy` (accumulated into `dx` when
/// `accumulate`, the residual branch's gradient), `dw += ...`, `db += ...`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    ctx: &Ctx<'_>,
    x: Tv<'_>,
    dy: Tv<'_>,
    w: &Range<usize>,
    b: &Option<Range<usize>>,
    dx: Tv<'_>,
    accumulate: bool,
    t: usize,
) -> Result<()> {
    let (dim, eps) = (ctx.cfg.hidden, ctx.cfg.norm_eps as f32);
    let flops = 16.0 * (t * dim) as f64;
    let gain = ctx.p(w)?;
    if ctx.gpu && x.dt == dy.dt && dy.dt == dx.dt && gain.dt == x.dt {
        return backward_ptx(ctx, x, dy, gain, w, b, dx, accumulate, t, flops);
    }
    let add = move |dst: &mut [f32], src: &[f32]| {
        if accumulate {
            dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
        } else {
            dst.copy_from_slice(src);
        }
    };
    match (ctx.cfg.norm, b) {
        (Norm::LayerNorm, Some(b)) => kernel(
            ctx.s(),
            "layer_norm_bwd",
            flops,
            &[x, dy, ctx.p(w)?],
            &[dx, ctx.g(w)?, ctx.g(b)?],
            move |i, o| {
                let (mut mean, mut rstd) = (vec![0.0; t], vec![0.0; t]);
                let mut y = vec![0.0; t * dim];
                let zero = vec![0.0; dim];
                layer_norm_fwd(i[0], i[2], &zero, dim, eps, &mut y, &mut mean, &mut rstd)?;
                let mut d = vec![0.0; t * dim];
                let (dx, rest) = o.split_at_mut(1);
                let (dg, db) = rest.split_at_mut(1);
                layer_norm_bwd(i[0], i[2], i[1], &mean, &rstd, dim, &mut d, dg[0], db[0])?;
                add(dx[0], &d);
                Ok(())
            },
        ),
        _ => kernel(
            ctx.s(),
            "rms_norm_bwd",
            flops,
            &[x, dy, ctx.p(w)?],
            &[dx, ctx.g(w)?],
            move |i, o| {
                let mut rstd = vec![0.0; t];
                let mut y = vec![0.0; t * dim];
                rms_norm_fwd(i[0], i[2], dim, eps, &mut y, &mut rstd)?;
                let mut d = vec![0.0; t * dim];
                let (dx, dg) = o.split_at_mut(1);
                rms_norm_bwd(i[0], i[2], i[1], &rstd, dim, &mut d, dg[0])?;
                add(dx[0], &d);
                Ok(())
            },
        ),
    }
}

/// The backward as its PTX kernels: the row statistics recomputed by the
/// forward kernel (its output goes to scratch), then the backward kernel
/// (dx written, the gain's and bias's gradients added atomically in f32);
/// accumulating into `dx` adds a scratch dx with the residual-add kernel.
#[allow(clippy::too_many_arguments)]
fn backward_ptx(
    ctx: &Ctx<'_>,
    x: Tv<'_>,
    dy: Tv<'_>,
    gain: Tv<'_>,
    w: &Range<usize>,
    b: &Option<Range<usize>>,
    dx: Tv<'_>,
    accumulate: bool,
    t: usize,
    flops: f64,
) -> Result<()> {
    let dim = ctx.cfg.hidden;
    let s = ctx.s();
    let y = ctx.alloc_as(t * dim, x.dt, "norm y (recomputed)")?;
    let st = forward_ptx(ctx, x, gain, b, y.view(), t)?;
    drop(y);
    let rstd = st.rstd.view();
    let tmp = match accumulate {
        true => Some(ctx.alloc_as(t * dim, dx.dt, "norm dx")?),
        false => None,
    };
    let out = tmp.as_ref().map_or(dx, |b| b.view());
    let dg = ctx.g(w)?;
    match (b, &st.mean) {
        (Some(b), Some(mean)) => {
            let (db, mean) = (ctx.g(b)?, mean.view());
            let l = kernels::layer_norm_bwd(
                t,
                dim,
                x.dt,
                out.addr(),
                dg.addr(),
                db.addr(),
                x.addr(),
                gain.addr(),
                dy.addr(),
                mean.addr(),
                rstd.addr(),
            )?;
            let reads = [x.v, gain.v, dy.v, mean.v, rstd.v];
            super::ptx_launch(s, &l, flops, &reads, &[out.v, dg.v, db.v])?;
        }
        _ => {
            let l = kernels::rms_norm_bwd(
                t,
                dim,
                x.dt,
                out.addr(),
                dg.addr(),
                x.addr(),
                gain.addr(),
                dy.addr(),
                rstd.addr(),
            )?;
            let reads = [x.v, gain.v, dy.v, rstd.v];
            super::ptx_launch(s, &l, flops, &reads, &[out.v, dg.v])?;
        }
    }
    if tmp.is_some() {
        let l = kernels::residual_add(t * dim, dx.dt, dx.addr(), dx.addr(), out.addr())?;
        super::ptx_launch(s, &l, 0.0, &[dx.v, out.v], &[dx.v])?;
    }
    Ok(())
}
