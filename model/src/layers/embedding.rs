//! Token embedding, forward (row gather) and backward (scatter-add into the
//! f32 gradient of the table).

use fpdt_ptx::cpu::{embedding_bwd, embedding_fwd};

use super::{kernel, Ctx, Tv};
use crate::error::Result;

/// `x[t] = embed[ids[t]]`; `ids` are u32 stored in an f32-sized buffer.
pub(crate) fn forward(ctx: &Ctx<'_>, ids: Tv<'_>, x: Tv<'_>) -> Result<()> {
    let dim = ctx.cfg.hidden;
    kernel(
        ctx.s(),
        "embedding_fwd",
        0.0,
        &[ctx.p(&ctx.layout.embed())?, ids],
        &[x],
        move |i, o| embedding_fwd(i[0], bytemuck::cast_slice::<f32, u32>(i[1]), dim, o[0]),
    )
}

/// `dembed[ids[t]] += dx[t]`.
pub(crate) fn backward(ctx: &Ctx<'_>, ids: Tv<'_>, dx: Tv<'_>) -> Result<()> {
    let dim = ctx.cfg.hidden;
    let n = dx.len() as f64;
    kernel(
        ctx.s(),
        "embedding_bwd",
        n,
        &[dx, ids],
        &[ctx.g(&ctx.layout.embed())?],
        move |i, o| embedding_bwd(i[0], bytemuck::cast_slice::<f32, u32>(i[1]), dim, o[0]),
    )
}
