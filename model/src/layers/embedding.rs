//! Token embedding, forward (row gather) and backward (scatter-add into the
//! f32 gradient of the table).

use fpdt_ptx::cpu::{embedding_bwd, embedding_fwd};
use fpdt_runtime::View;

use super::{kernel, Ctx};
use crate::error::Result;

/// `x[t] = embed[ids[t]]`; `ids` are u32 stored in an f32-sized buffer.
pub(crate) fn forward(ctx: &Ctx<'_>, ids: View<'_>, x: View<'_>) -> Result<()> {
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
pub(crate) fn backward(ctx: &Ctx<'_>, ids: View<'_>, dx: View<'_>) -> Result<()> {
    let dim = ctx.cfg.hidden;
    let n = dx.len_of::<f32>() as f64;
    kernel(
        ctx.s(),
        "embedding_bwd",
        n,
        &[dx, ids],
        &[ctx.g(&ctx.layout.embed())?],
        move |i, o| embedding_bwd(i[0], bytemuck::cast_slice::<f32, u32>(i[1]), dim, o[0]),
    )
}
