//! One transformer layer: the FPDT attention block, then the chunked MLP
//! block, forward and backward.

use super::attention::{self, Saved};
use super::{mlp, Ctx, Stash};
use crate::error::{ModelError, Result};

fn layer<'a>(ctx: &'a Ctx<'_>, l: usize) -> Result<&'a crate::config::LayerParams> {
    ctx.layout
        .layer(l)
        .ok_or_else(|| ModelError::Shape(format!("layer {l} is not in the layout")))
}

/// Forward of layer `l` over the chunks `xs` of its input.
pub(crate) fn forward(ctx: &Ctx<'_>, l: usize, xs: &[Stash]) -> Result<(Vec<Stash>, Saved)> {
    let lp = layer(ctx, l)?;
    let (x_mid, mut saved) = attention::forward(ctx, lp, xs)?;
    let (c, h) = (ctx.sched.local_chunk_tokens(), ctx.cfg.hidden);
    let mut outs = Vec::with_capacity(x_mid.len());
    for xm in &x_mid {
        let x = xm.fetch(ctx.mover)?;
        let y = ctx.alloc_act(c * h, "x")?;
        mlp::forward(ctx, lp, x.view()?, y.view(), c)?;
        drop(x);
        outs.push(ctx.stash(y)?);
    }
    saved.x_mid = x_mid;
    Ok((outs, saved))
}

/// Backward of layer `l`: from the gradient of its output per chunk, the
/// gradient of its input per chunk.
pub(crate) fn backward(
    ctx: &Ctx<'_>,
    l: usize,
    xs: &[Stash],
    saved: &Saved,
    dys: &[Stash],
) -> Result<Vec<Stash>> {
    let lp = layer(ctx, l)?;
    let (c, h) = (ctx.sched.local_chunk_tokens(), ctx.cfg.hidden);
    let mut dxm = Vec::with_capacity(dys.len());
    for (xm, dy) in saved.x_mid.iter().zip(dys) {
        let x = xm.fetch(ctx.mover)?;
        let g = dy.fetch(ctx.mover)?;
        let dx = ctx.alloc_grad(c * h, "dx mid")?;
        mlp::backward(ctx, lp, x.view()?, g.view()?, dx.view(), c)?;
        drop((x, g));
        dxm.push(ctx.stash(dx)?);
    }
    attention::backward(ctx, lp, xs, saved, &dxm)
}
