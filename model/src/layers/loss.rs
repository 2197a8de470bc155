//! Final norm, output head and softmax cross-entropy, fused forward and
//! backward and chunked along tokens: the logits `[rows, vocab]` exist for
//! one sub-chunk of `loss_tokens` rows at a time.

use fpdt_ptx::cpu::softmax_cross_entropy;

use super::mlp::rows;
use super::{kernel, linear_bwd, linear_fwd, norm, Ctx, Tv};
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
    let s = ctx.s();
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
        kernel(
            s,
            "softmax_xent",
            6.0 * (n * vocab) as f64,
            &[logits.view(), labels.elems(a..b)?],
            &[dlogits.view(), loss_acc],
            move |i, o| {
                let labels = bytemuck::cast_slice::<f32, i32>(i[1]);
                let mut losses = vec![0.0f32; n];
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
                acc[0][0] += grad_scale * losses.iter().sum::<f32>();
                // Argmax hits among the counted targets (the first maximum
                // wins a tie), for the accuracy metric.
                let mut hits = 0u32;
                for (row, &t) in i[0].chunks(vocab).zip(labels) {
                    if t == IGNORE_INDEX {
                        continue;
                    }
                    let mut best = 0;
                    for (j, &z) in row.iter().enumerate() {
                        if z > row[best] {
                            best = j;
                        }
                    }
                    hits += u32::from(best as i64 == i64::from(t));
                }
                acc[0][1] += hits as f32;
                Ok(())
            },
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
