//! Final norm, output head and softmax cross-entropy, fused forward and
//! backward and chunked along tokens: the logits `[rows, vocab]` exist for
//! one sub-chunk of `loss_tokens` rows at a time.

use fpdt_ptx::cpu::{argmax_hits, softmax_cross_entropy};
use fpdt_ptx::kernels;

use super::mlp::rows;
use super::{kernel, linear_bwd, linear_fwd, norm, ptx_launch, Ctx, Tv};
use crate::error::Result;
use crate::reference::IGNORE_INDEX;

/// For the `t` rows of the last layer's output `x` with `labels` (i32 in an
/// f32-sized buffer): adds `grad_scale * sum(loss)` to `loss_acc[0]` and the
/// number of rows whose logits' argmax is the label to `loss_acc[1]`, writes
/// `dx`, accumulates the head's and the final norm's gradients.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_backward(
    ctx: &Ctx<'_>,
    x: Tv<'_>,
    labels: Tv<'_>,
    dx: Tv<'_>,
    loss_acc: Tv<'_>,
    t: usize,
    grad_scale: f32,
) -> Result<()> {
    let (h, vocab) = (ctx.cfg.hidden, ctx.cfg.vocab_size);
    let step = ctx.sched.loss_tokens();
    let head = ctx.layout.lm_head();
    let (nw, nb) = (ctx.layout.norm_f_w(), ctx.layout.norm_f_b());
    let mut a = 0;
    while a < t {
        let b = (a + step).min(t);
        let n = b - a;
        let xr = rows(&x, h, a, b)?;
        let hn = ctx.alloc_act(n * h, "loss norm")?;
        norm::forward(ctx, xr, &nw, &nb, hn.view(), n)?;
        let logits = ctx.alloc(n * vocab, "logits")?;
        linear_fwd(
            ctx,
            hn.view(),
            ctx.p(&head)?,
            None,
            logits.view(),
            n,
            h,
            vocab,
        )?;
        let dlogits = ctx.alloc(n * vocab, "logits grad")?;
        xent(
            ctx,
            logits.view(),
            labels.elems(a..b)?,
            dlogits.view(),
            loss_acc,
            n,
            grad_scale,
        )?;
        drop(logits);
        let dhn = ctx.alloc_grad(n * h, "loss norm grad")?;
        linear_bwd(
            ctx,
            dlogits.view(),
            hn.view(),
            ctx.p(&head)?,
            Some((dhn.view(), false)),
            ctx.g(&head)?,
            None,
            n,
            h,
            vocab,
        )?;
        drop(dlogits);
        norm::backward(ctx, xr, dhn.view(), &nw, &nb, rows(&dx, h, a, b)?, false, n)?;
        a = b;
    }
    Ok(())
}

/// Softmax cross-entropy of `n` rows of f32 `logits`: `dlogits`, and
/// `grad_scale * sum(loss)` and the argmax hits added to `loss_acc[0..2]`.
/// On a GPU two kernels (the fused row pass, then one warp summing its
/// per-row losses and hits), so the logits never leave the device.
fn xent(
    ctx: &Ctx<'_>,
    logits: Tv<'_>,
    labels: Tv<'_>,
    dlogits: Tv<'_>,
    loss_acc: Tv<'_>,
    n: usize,
    grad_scale: f32,
) -> Result<()> {
    let (s, vocab) = (ctx.s(), ctx.cfg.vocab_size);
    let flops = 6.0 * (n * vocab) as f64;
    if ctx.gpu {
        let (losses, hits) = (ctx.alloc(n, "row losses")?, ctx.alloc(n, "row hits")?);
        let (lv, hv) = (losses.view(), hits.view());
        let l = kernels::softmax_cross_entropy(
            n,
            vocab,
            IGNORE_INDEX,
            grad_scale,
            lv.addr(),
            hv.addr(),
            dlogits.addr(),
            logits.addr(),
            labels.addr(),
        )?;
        ptx_launch(
            s,
            &l,
            flops,
            &[logits.v, labels.v],
            &[dlogits.v, lv.v, hv.v],
        )?;
        let l = kernels::softmax_xent_sums(n, grad_scale, loss_acc.addr(), lv.addr(), hv.addr())?;
        return ptx_launch(s, &l, 2.0 * n as f64, &[lv.v, hv.v], &[loss_acc.v]);
    }
    kernel(
        s,
        "softmax_xent",
        flops,
        &[logits, labels],
        &[dlogits, loss_acc],
        move |i, o| {
            let labels = bytemuck::cast_slice::<f32, i32>(i[1]);
            let (mut losses, mut hits) = (vec![0.0f32; n], vec![0.0f32; n]);
            let (dl, acc) = o.split_at_mut(1);
            softmax_cross_entropy(
                i[0],
                labels,
                vocab,
                IGNORE_INDEX,
                grad_scale,
                &mut losses,
                dl[0],
            )?;
            argmax_hits(i[0], labels, vocab, IGNORE_INDEX, &mut hits)?;
            acc[0][0] += grad_scale * losses.iter().sum::<f32>();
            acc[0][1] += hits.iter().sum::<f32>();
            Ok(())
        },
    )
}
