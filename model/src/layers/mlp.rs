//! The MLP with its pre-norm and residual, chunked along tokens: GeLU
//! (`proj(gelu(fc h)) `, GPT) or SwiGLU (`down(silu(gate h) * up h)`, Llama).
//! Token-wise, so it runs `mlp_tokens` rows at a time and the wide
//! activation `[rows, intermediate]` never exists for more than one
//! sub-chunk; backward recomputes it from the block input.

use fpdt_ptx::cpu::{gelu_tanh_bwd, gelu_tanh_fwd, swiglu_bwd, swiglu_fwd};

use super::{kernel, linear_bwd, linear_fwd, norm, Buf, Ctx, Tv};
use crate::config::{Activation, LayerParams};
use crate::error::Result;

/// Rows `[a, b)` of a `[rows, width]` view.
pub(crate) fn rows<'a>(v: &Tv<'a>, width: usize, a: usize, b: usize) -> Result<Tv<'a>> {
    v.rows(width, a, b)
}

/// `y = x + mlp(norm2(x))` for the `t` rows of `x`.
pub(crate) fn forward(
    ctx: &Ctx<'_>,
    lp: &LayerParams,
    x: Tv<'_>,
    y: Tv<'_>,
    t: usize,
) -> Result<()> {
    let (h, inter) = (ctx.cfg.hidden, ctx.cfg.intermediate);
    let step = ctx.sched.mlp_tokens();
    let s = ctx.s();
    let mut a = 0;
    while a < t {
        let b = (a + step).min(t);
        let n = b - a;
        let xr = rows(&x, h, a, b)?;
        let hn = ctx.alloc_act(n * h, "mlp norm")?;
        norm::forward(ctx, xr, &lp.norm2_w, &lp.norm2_b, hn.view(), n)?;
        let act = wide(ctx, lp, hn.view(), n)?;
        let m = ctx.alloc_act(n * h, "mlp out")?;
        let bias = match &lp.b2 {
            Some(r) => Some(ctx.p(r)?),
            None => None,
        };
        linear_fwd(s, act.view(), ctx.p(&lp.w2)?, bias, m.view(), n, inter, h)?;
        super::residual(s, xr, m.view(), rows(&y, h, a, b)?)?;
        a = b;
    }
    Ok(())
}

/// The wide activation `act(h)` `[n, intermediate]`.
fn wide(ctx: &Ctx<'_>, lp: &LayerParams, hn: Tv<'_>, n: usize) -> Result<Buf> {
    let (h, inter) = (ctx.cfg.hidden, ctx.cfg.intermediate);
    let s = ctx.s();
    let z1 = ctx.alloc_act(n * inter, "mlp wide")?;
    let b1 = match &lp.b1 {
        Some(r) => Some(ctx.p(r)?),
        None => None,
    };
    linear_fwd(s, hn, ctx.p(&lp.w1)?, b1, z1.view(), n, h, inter)?;
    let act = ctx.alloc_act(n * inter, "mlp wide")?;
    match (ctx.cfg.activation, &lp.w3) {
        (Activation::SwiGlu, Some(w3)) => {
            let z3 = ctx.alloc_act(n * inter, "mlp wide")?;
            linear_fwd(s, hn, ctx.p(w3)?, None, z3.view(), n, h, inter)?;
            kernel(
                s,
                "swiglu_fwd",
                4.0 * (n * inter) as f64,
                &[z1.view(), z3.view()],
                &[act.view()],
                |i, o| swiglu_fwd(i[0], i[1], o[0]),
            )?;
        }
        _ => kernel(
            s,
            "gelu_fwd",
            8.0 * (n * inter) as f64,
            &[z1.view()],
            &[act.view()],
            |i, o| gelu_tanh_fwd(i[0], o[0]),
        )?,
    }
    Ok(act)
}

/// Backward of [`forward`] from the block input `x` and the output gradient
/// `dy`: `dx = dy + norm2'^T mlp'^T dy`, parameter gradients accumulated.
pub(crate) fn backward(
    ctx: &Ctx<'_>,
    lp: &LayerParams,
    x: Tv<'_>,
    dy: Tv<'_>,
    dx: Tv<'_>,
    t: usize,
) -> Result<()> {
    let (h, inter) = (ctx.cfg.hidden, ctx.cfg.intermediate);
    let step = ctx.sched.mlp_tokens();
    let s = ctx.s();
    let opt = |r: &Option<std::ops::Range<usize>>| -> Result<Option<Tv<'_>>> {
        Ok(match r {
            Some(r) => Some(ctx.g(r)?),
            None => None,
        })
    };
    let mut a = 0;
    while a < t {
        let b = (a + step).min(t);
        let n = b - a;
        let (xr, dyr, dxr) = (rows(&x, h, a, b)?, rows(&dy, h, a, b)?, rows(&dx, h, a, b)?);
        // Recompute the block's forward up to the wide activation.
        let hn = ctx.alloc_act(n * h, "mlp norm")?;
        norm::forward(ctx, xr, &lp.norm2_w, &lp.norm2_b, hn.view(), n)?;
        let z1 = ctx.alloc_act(n * inter, "mlp wide")?;
        let b1 = match &lp.b1 {
            Some(r) => Some(ctx.p(r)?),
            None => None,
        };
        linear_fwd(s, hn.view(), ctx.p(&lp.w1)?, b1, z1.view(), n, h, inter)?;
        let dact = ctx.alloc_grad(n * inter, "mlp wide grad")?;
        let dz1 = ctx.alloc_grad(n * inter, "mlp wide grad")?;
        let dhn = ctx.alloc_grad(n * h, "mlp norm grad")?;
        match (ctx.cfg.activation, &lp.w3) {
            (Activation::SwiGlu, Some(w3)) => {
                let z3 = ctx.alloc_act(n * inter, "mlp wide")?;
                linear_fwd(s, hn.view(), ctx.p(w3)?, None, z3.view(), n, h, inter)?;
                let act = ctx.alloc_act(n * inter, "mlp wide")?;
                kernel(
                    s,
                    "swiglu_fwd",
                    4.0 * (n * inter) as f64,
                    &[z1.view(), z3.view()],
                    &[act.view()],
                    |i, o| swiglu_fwd(i[0], i[1], o[0]),
                )?;
                let w2 = ctx.p(&lp.w2)?;
                linear_bwd(
                    s,
                    dyr,
                    act.view(),
                    w2,
                    Some((dact.view(), false)),
                    ctx.g(&lp.w2)?,
                    opt(&lp.b2)?,
                    n,
                    inter,
                    h,
                )?;
                drop(act);
                let dz3 = ctx.alloc_grad(n * inter, "mlp wide grad")?;
                kernel(
                    s,
                    "swiglu_bwd",
                    8.0 * (n * inter) as f64,
                    &[z1.view(), z3.view(), dact.view()],
                    &[dz1.view(), dz3.view()],
                    |i, o| {
                        let (a, b) = o.split_at_mut(1);
                        swiglu_bwd(i[0], i[1], i[2], a[0], b[0])
                    },
                )?;
                linear_bwd(
                    s,
                    dz3.view(),
                    hn.view(),
                    ctx.p(w3)?,
                    Some((dhn.view(), false)),
                    ctx.g(w3)?,
                    None,
                    n,
                    h,
                    inter,
                )?;
                linear_bwd(
                    s,
                    dz1.view(),
                    hn.view(),
                    ctx.p(&lp.w1)?,
                    Some((dhn.view(), true)),
                    ctx.g(&lp.w1)?,
                    opt(&lp.b1)?,
                    n,
                    h,
                    inter,
                )?;
            }
            _ => {
                let act = ctx.alloc_act(n * inter, "mlp wide")?;
                kernel(
                    s,
                    "gelu_fwd",
                    8.0 * (n * inter) as f64,
                    &[z1.view()],
                    &[act.view()],
                    |i, o| gelu_tanh_fwd(i[0], o[0]),
                )?;
                linear_bwd(
                    s,
                    dyr,
                    act.view(),
                    ctx.p(&lp.w2)?,
                    Some((dact.view(), false)),
                    ctx.g(&lp.w2)?,
                    opt(&lp.b2)?,
                    n,
                    inter,
                    h,
                )?;
                drop(act);
                kernel(
                    s,
                    "gelu_bwd",
                    10.0 * (n * inter) as f64,
                    &[z1.view(), dact.view()],
                    &[dz1.view()],
                    |i, o| gelu_tanh_bwd(i[0], i[1], o[0]),
                )?;
                linear_bwd(
                    s,
                    dz1.view(),
                    hn.view(),
                    ctx.p(&lp.w1)?,
                    Some((dhn.view(), false)),
                    ctx.g(&lp.w1)?,
                    opt(&lp.b1)?,
                    n,
                    h,
                    inter,
                )?;
            }
        }
        // dx = dy + norm2 backward.
        super::copy(s, dyr, dxr)?;
        norm::backward(ctx, xr, dhn.view(), &lp.norm2_w, &lp.norm2_b, dxr, true, n)?;
        a = b;
    }
    Ok(())
}
