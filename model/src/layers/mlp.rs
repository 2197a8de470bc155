//! The MLP with its pre-norm and residual, chunked along tokens: GeLU
//! (`proj(gelu(fc h)) `, GPT) or SwiGLU (`down(silu(gate h) * up h)`, Llama).
//! Token-wise, so it runs `mlp_tokens` rows at a time and the wide
//! activation `[rows, intermediate]` never exists for more than one
//! sub-chunk; backward recomputes it from the block input.

use fpdt_ptx::cpu::{gelu_tanh_bwd, gelu_tanh_fwd, matmul, swiglu_bwd, swiglu_fwd, DType};
use fpdt_ptx::kernels;

use super::{
    kernel, linear_bwd, linear_dgrad_sum, linear_residual_fwd, missing, norm, Buf, Ctx, Tv,
};
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
    let mut a = 0;
    while a < t {
        let b = (a + step).min(t);
        let n = b - a;
        let xr = rows(&x, h, a, b)?;
        let hn = ctx.alloc_act(n * h, "mlp norm")?;
        norm::forward(ctx, xr, &lp.norm2_w, &lp.norm2_b, hn.view(), n)?;
        let act = wide(ctx, lp, hn.view(), n, false)?.act;
        let bias = match &lp.b2 {
            Some(r) => Some(ctx.p(r)?),
            None => None,
        };
        let yr = rows(&y, h, a, b)?;
        linear_residual_fwd(ctx, act.view(), ctx.p(&lp.w2)?, bias, xr, yr, n, inter, h)?;
        a = b;
    }
    Ok(())
}

/// The wide activation of the `n` rows of the pre-norm output `hn`, and
/// with `aux` the pre-activations its backward needs.
struct Wide {
    /// `act(h)` `[n, intermediate]`.
    act: Buf,
    /// `fc h` (GeLU) or `gate h` (SwiGLU), when asked for.
    z1: Option<Buf>,
    /// `up h` (SwiGLU), when asked for.
    z3: Option<Buf>,
}

/// The up projection(s) with the activation fused into their epilogue (as
/// cuBLASLt's GELU epilogue does; SwiGLU's gate and up projections in one
/// kernel): the pre-activations stay f32 and only `act` is rounded to the
/// activation dtype, one rounding instead of two on the bf16 path. With
/// `aux` the pre-activations are written too (rounded, like the GELU_AUX
/// epilogue's), for the activation's backward. Forward and backward run
/// this same kernel, so backward's `act` is bit-equal to forward's.
fn wide(ctx: &Ctx<'_>, lp: &LayerParams, hn: Tv<'_>, n: usize, aux: bool) -> Result<Wide> {
    let (h, inter) = (ctx.cfg.hidden, ctx.cfg.intermediate);
    let w3 = match (ctx.cfg.activation, &lp.w3) {
        (Activation::SwiGlu, Some(w3)) => Some(ctx.p(w3)?),
        _ => None,
    };
    let act = ctx.alloc_act(n * inter, "mlp wide")?;
    let z1 = match aux {
        true => Some(ctx.alloc_act(n * inter, "mlp wide")?),
        false => None,
    };
    let z3 = match (aux, w3.is_some()) {
        (true, true) => Some(ctx.alloc_act(n * inter, "mlp wide")?),
        _ => None,
    };
    let mut reads = vec![hn, ctx.p(&lp.w1)?];
    let b1 = match &lp.b1 {
        Some(r) => Some(ctx.p(r)?),
        None => None,
    };
    let has_b1 = b1.is_some();
    reads.extend(b1);
    let w3_at = w3.map(|_| reads.len());
    reads.extend(w3);
    let mut writes = vec![act.view()];
    writes.extend(z1.as_ref().map(Buf::view));
    writes.extend(z3.as_ref().map(Buf::view));
    let spec = super::linear_spec(n, h, inter, false);
    let gemms = if w3_at.is_some() { 2.0 } else { 1.0 };
    let flops = gemms * 2.0 * (n * h * inter) as f64 + 8.0 * (n * inter) as f64;
    // On the GPU: the GEMMs into f32, the activation in f32, each output
    // rounded once (as the host kernel does).
    let w1 = ctx.p(&lp.w1)?;
    // (Only the dtype of an f32 output matters to the check.)
    let f32_out = Tv::f32(hn.v);
    let b1_32 = b1.map(|b| Tv {
        dt: DType::F32,
        ..b
    });
    let on_gpu = act.view().dt == DType::BF16
        && super::gemm_blas(ctx, &[hn, w1], f32_out, b1_32.as_ref()).is_some()
        && w3.is_none_or(|w3| super::gemm_blas(ctx, &[hn, w3], f32_out, None).is_some());
    if let (true, Some(blas)) = (on_gpu, ctx.gemms) {
        let s = ctx.s();
        let z1f = ctx.alloc(n * inter, "mlp pre-activation")?;
        let widened = super::f32_bias(ctx, b1)?;
        let b1 = widened.as_ref().map(Buf::view).or(b1);
        super::gemm(s, blas, &spec, hn, w1, b1, z1f.view())?;
        let a32 = ctx.alloc(n * inter, "mlp activation")?;
        let (z1v, av) = (z1f.view(), a32.view());
        let ew = 8.0 * (n * inter) as f64;
        let z3f = match w3 {
            Some(w3) => {
                let z3f = ctx.alloc(n * inter, "mlp pre-activation")?;
                super::gemm(s, blas, &spec, hn, w3, None, z3f.view())?;
                let l = kernels::swiglu_fwd(
                    n * inter,
                    DType::F32,
                    av.addr(),
                    z1v.addr(),
                    z3f.view().addr(),
                )?;
                super::ptx_launch(s, &l, ew, &[z1v.v, z3f.view().v], &[av.v])?;
                Some(z3f)
            }
            None => {
                let l = kernels::gelu_tanh_fwd(n * inter, DType::F32, av.addr(), z1v.addr())?;
                super::ptx_launch(s, &l, ew, &[z1v.v], &[av.v])?;
                None
            }
        };
        super::cast_on_gpu(s, av, act.view())?;
        if let Some(z1) = &z1 {
            super::cast_on_gpu(s, z1v, z1.view())?;
        }
        if let (Some(z3), Some(z3f)) = (&z3, &z3f) {
            super::cast_on_gpu(s, z3f.view(), z3.view())?;
        }
        return Ok(Wide { act, z1, z3 });
    }
    let (name, len) = match w3_at {
        Some(_) => ("mlp_up_swiglu_fwd", n * inter),
        None => ("mlp_fc_gelu_fwd", n * inter),
    };
    kernel(ctx.s(), name, flops, &reads, &writes, move |i, o| {
        let mut z1 = vec![0.0f32; len];
        matmul(&spec, i[0], i[1], has_b1.then(|| i[2]), &mut z1)?;
        let (act, pre) = o.split_at_mut(1);
        match w3_at {
            Some(k) => {
                let mut z3 = vec![0.0f32; len];
                matmul(&spec, i[0], i[k], None, &mut z3)?;
                swiglu_fwd(&z1, &z3, act[0])?;
                if let [a, b] = pre {
                    a.copy_from_slice(&z1);
                    b.copy_from_slice(&z3);
                }
            }
            None => {
                gelu_tanh_fwd(&z1, act[0])?;
                if let [a] = pre {
                    a.copy_from_slice(&z1);
                }
            }
        }
        Ok(())
    })?;
    Ok(Wide { act, z1, z3 })
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
        let Wide { act, z1, z3 } = wide(ctx, lp, hn.view(), n, true)?;
        let z1 = z1.ok_or_else(|| missing("mlp pre-activation", a))?;
        let dact = ctx.alloc_grad(n * inter, "mlp wide grad")?;
        linear_bwd(
            ctx,
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
        let dz1 = ctx.alloc_grad(n * inter, "mlp wide grad")?;
        let dhn = ctx.alloc_grad(n * h, "mlp norm grad")?;
        match (z3, &lp.w3) {
            (Some(z3), Some(w3)) => {
                let dz3 = ctx.alloc_grad(n * inter, "mlp wide grad")?;
                let (g, u, da, dg, du) =
                    (z1.view(), z3.view(), dact.view(), dz1.view(), dz3.view());
                if ctx.gpu && [g, u, da, dg, du].iter().all(|t| t.dt == g.dt) {
                    let l = kernels::swiglu_bwd(
                        n * inter,
                        g.dt,
                        dg.addr(),
                        du.addr(),
                        g.addr(),
                        u.addr(),
                        da.addr(),
                    )?;
                    super::ptx_launch(
                        s,
                        &l,
                        8.0 * (n * inter) as f64,
                        &[g.v, u.v, da.v],
                        &[dg.v, du.v],
                    )?;
                } else {
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
                }
                linear_bwd(
                    ctx,
                    dz3.view(),
                    hn.view(),
                    ctx.p(w3)?,
                    None,
                    ctx.g(w3)?,
                    None,
                    n,
                    h,
                    inter,
                )?;
                linear_bwd(
                    ctx,
                    dz1.view(),
                    hn.view(),
                    ctx.p(&lp.w1)?,
                    None,
                    ctx.g(&lp.w1)?,
                    opt(&lp.b1)?,
                    n,
                    h,
                    inter,
                )?;
                // dhn as the fused gate-and-up projection's dgrad: one
                // rounding.
                let parts = [
                    (dz3.view(), ctx.p(w3)?, inter),
                    (dz1.view(), ctx.p(&lp.w1)?, inter),
                ];
                linear_dgrad_sum(ctx, &parts, dhn.view(), n, h)?;
            }
            _ => {
                let (zv, da, dz) = (z1.view(), dact.view(), dz1.view());
                if ctx.gpu && zv.dt == da.dt && da.dt == dz.dt {
                    let l =
                        kernels::gelu_tanh_bwd(n * inter, zv.dt, dz.addr(), zv.addr(), da.addr())?;
                    super::ptx_launch(s, &l, 10.0 * (n * inter) as f64, &[zv.v, da.v], &[dz.v])?;
                } else {
                    kernel(
                        s,
                        "gelu_bwd",
                        10.0 * (n * inter) as f64,
                        &[zv, da],
                        &[dz],
                        |i, o| gelu_tanh_bwd(i[0], i[1], o[0]),
                    )?;
                }
                linear_bwd(
                    ctx,
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
