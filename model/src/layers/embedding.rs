//! Token embedding, forward (row gather) and backward (scatter-add into the
//! f32 gradient of the table).

use fpdt_ptx::cpu::{embedding_bwd, embedding_fwd};
use fpdt_ptx::kernels;

use super::{kernel, ptx_launch, Ctx, Tv};
use crate::error::Result;

/// `x[t] = embed[ids[t]]`; `ids` are u32 stored in an f32-sized buffer
/// (checked against the vocabulary when the batch was loaded: the GPU
/// kernel traps on an id beyond it).
pub(crate) fn forward(ctx: &Ctx<'_>, ids: Tv<'_>, x: Tv<'_>) -> Result<()> {
    let (dim, vocab) = (ctx.cfg.hidden, ctx.cfg.vocab_size);
    let table = ctx.p(&ctx.layout.embed())?;
    if ctx.gpu && table.dt == x.dt {
        let l = kernels::embedding_fwd(
            ids.len(),
            dim,
            vocab,
            x.dt,
            x.addr(),
            table.addr(),
            ids.addr(),
        )?;
        // The table is declared whole (the launch checks every pointer
        // against its views), so the trace overstates the bytes read.
        return ptx_launch(ctx.s(), &l, 0.0, &[table.v, ids.v], &[x.v]);
    }
    kernel(
        ctx.s(),
        "embedding_fwd",
        0.0,
        &[table, ids],
        &[x],
        move |i, o| embedding_fwd(i[0], bytemuck::cast_slice::<f32, u32>(i[1]), dim, o[0]),
    )
}

/// `dembed[ids[t]] += dx[t]`.
pub(crate) fn backward(ctx: &Ctx<'_>, ids: Tv<'_>, dx: Tv<'_>) -> Result<()> {
    let (dim, vocab) = (ctx.cfg.hidden, ctx.cfg.vocab_size);
    let n = dx.len() as f64;
    let dtable = ctx.g(&ctx.layout.embed())?;
    if ctx.gpu {
        let l = kernels::embedding_bwd(
            ids.len(),
            dim,
            vocab,
            dx.dt,
            dtable.addr(),
            dx.addr(),
            ids.addr(),
        )?;
        return ptx_launch(ctx.s(), &l, n, &[dx.v, ids.v], &[dtable.v]);
    }
    kernel(
        ctx.s(),
        "embedding_bwd",
        n,
        &[dx, ids],
        &[dtable],
        move |i, o| embedding_bwd(i[0], bytemuck::cast_slice::<f32, u32>(i[1]), dim, o[0]),
    )
}
