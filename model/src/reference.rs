//! The dense single-rank reference model in f64: plain full causal
//! attention over the whole sequence, no chunks, no offload, one rank.
//! Forward loss and a hand-written backward for every parameter, over the
//! same flat [`ParamLayout`] as the FPDT model. It is the oracle of the
//! FPDT model's invariant test, and is itself checked against finite
//! differences.
//!
//! The math (both families; GPT has biases and LayerNorm, Llama neither):
//! ```text
//! x = embed[tokens]
//! per layer:  h = norm1(x); q = rope(h Wq^T + bq); k = rope(h Wk^T + bk); v = h Wv^T + bv
//!             x = x + attn(q, k, v) Wo^T + bo
//!             h = norm2(x); x = x + mlp(h)     gelu: proj(gelu(fc h)); swiglu: down(silu(gate h) * up h)
//! loss = mean over targets != -1 of cross_entropy(norm_f(x) lm_head^T, target)
//! ```
//! RoPE uses global positions `0..S`; attention scale is `1/sqrt(head_dim)`.

use std::ops::Range;

use fpdt_ptx::cpu::AttnShape;
use fpdt_ptx::reference as r;

use crate::config::{Activation, ModelConfig, Norm};
use crate::error::{ModelError, Result};

/// Targets equal to this are not counted in the loss.
pub const IGNORE_INDEX: i32 = -1;

/// Checks tokens and targets against `cfg`.
pub fn check_batch(cfg: &ModelConfig, tokens: &[u32], targets: &[i32]) -> Result<usize> {
    if tokens.len() != targets.len() {
        return Err(ModelError::Shape(format!(
            "{} tokens but {} targets: one target per token",
            tokens.len(),
            targets.len()
        )));
    }
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(ModelError::config(
            "tokens",
            t,
            format!("token ids must be below vocab_size ({})", cfg.vocab_size),
        ));
    }
    if let Some(t) = targets
        .iter()
        .find(|&&t| t != IGNORE_INDEX && (t < 0 || t as usize >= cfg.vocab_size))
    {
        return Err(ModelError::config(
            "targets",
            t,
            format!(
                "targets must be below vocab_size ({}) or {IGNORE_INDEX} (ignored)",
                cfg.vocab_size
            ),
        ));
    }
    let valid = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    if valid == 0 {
        return Err(ModelError::config(
            "targets",
            "all ignored",
            "at least one target must be counted",
        ));
    }
    Ok(valid)
}

fn sl(p: &[f64], r: &Range<usize>) -> Vec<f64> {
    p[r.clone()].to_vec()
}

fn add_into(g: &mut [f64], r: &Range<usize>, v: &[f64]) {
    for (a, b) in g[r.clone()].iter_mut().zip(v) {
        *a += b;
    }
}

fn linear(x: &[f64], w: &[f64], b: Option<&[f64]>, t: usize, inp: usize, out: usize) -> Vec<f64> {
    r::matmul(x, w, b, t, out, inp, false, true)
}

/// Backward of `y = x W^T + b`: returns dx, accumulates dW and db.
#[allow(clippy::too_many_arguments)]
fn linear_bwd(
    dy: &[f64],
    x: &[f64],
    w: &[f64],
    t: usize,
    inp: usize,
    out: usize,
    grads: &mut [f64],
    wr: &Range<usize>,
    br: &Option<Range<usize>>,
) -> Vec<f64> {
    let dx = r::matmul(dy, w, None, t, inp, out, false, false);
    let dw = r::matmul(dy, x, None, out, inp, t, true, false);
    add_into(grads, wr, &dw);
    if let Some(br) = br {
        let mut db = vec![0.0; out];
        for row in dy.chunks(out) {
            for (a, b) in db.iter_mut().zip(row) {
                *a += b;
            }
        }
        add_into(grads, br, &db);
    }
    dx
}

fn norm_fwd(
    cfg: &ModelConfig,
    p: &[f64],
    x: &[f64],
    w: &Range<usize>,
    b: &Option<Range<usize>>,
) -> Vec<f64> {
    let g = sl(p, w);
    match cfg.norm {
        Norm::LayerNorm => {
            let beta = b.as_ref().map_or(vec![0.0; cfg.hidden], |b| sl(p, b));
            r::layer_norm_fwd(x, &g, &beta, cfg.hidden, cfg.norm_eps).0
        }
        Norm::RmsNorm => r::rms_norm_fwd(x, &g, cfg.hidden, cfg.norm_eps).0,
    }
}

fn norm_bwd(
    cfg: &ModelConfig,
    p: &[f64],
    x: &[f64],
    dy: &[f64],
    w: &Range<usize>,
    b: &Option<Range<usize>>,
    grads: &mut [f64],
) -> Vec<f64> {
    let g = sl(p, w);
    match cfg.norm {
        Norm::LayerNorm => {
            let (dx, dg, db) = r::layer_norm_bwd(x, &g, dy, cfg.hidden, cfg.norm_eps);
            add_into(grads, w, &dg);
            if let Some(b) = b {
                add_into(grads, b, &db);
            }
            dx
        }
        Norm::RmsNorm => {
            let (dx, dg) = r::rms_norm_bwd(x, &g, dy, cfg.hidden, cfg.norm_eps);
            add_into(grads, w, &dg);
            dx
        }
    }
}

struct LayerCache {
    x: Vec<f64>,
    h1: Vec<f64>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    o: Vec<f64>,
    x1: Vec<f64>,
    h2: Vec<f64>,
    z1: Vec<f64>,
    z3: Vec<f64>,
    act: Vec<f64>,
}

/// The reference model's result.
#[derive(Debug, Clone)]
pub struct RefOutput {
    /// Mean cross-entropy over the counted targets.
    pub loss: f64,
    /// Gradient of `loss` for every parameter (the flat layout); empty when
    /// only the loss was asked for.
    pub grads: Vec<f64>,
    /// Counted targets whose logits' argmax (the first maximum) is the
    /// target.
    pub correct: usize,
}

/// Forward (and, with `backward`, the gradient of) the mean loss of the
/// dense model with parameters `params` (the flat layout of `cfg`) on one
/// sequence.
pub fn run(
    cfg: &ModelConfig,
    params: &[f64],
    tokens: &[u32],
    targets: &[i32],
    backward: bool,
) -> Result<RefOutput> {
    cfg.validate()?;
    let layout = cfg.layout();
    if params.len() != layout.len() {
        return Err(ModelError::Shape(format!(
            "reference: {} parameters given, the layout has {}",
            params.len(),
            layout.len()
        )));
    }
    let valid = check_batch(cfg, tokens, targets)?;
    let (t, h, d) = (tokens.len(), cfg.hidden, cfg.head_dim);
    let (qd, kvd, inter) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate);
    let positions: Vec<u32> = (0..t as u32).collect();
    let theta = cfg.rope_theta;
    let shape = AttnShape {
        q_tokens: t,
        kv_tokens: t,
        heads: cfg.heads,
        kv_heads: cfg.kv_heads,
        head_dim: d,
    };
    let scale = 1.0 / (d as f64).sqrt();
    let opt = |b: &Option<Range<usize>>| b.as_ref().map(|b| sl(params, b));

    let mut x = r::embedding_fwd(&params[layout.embed()], tokens, h);
    let mut caches = Vec::with_capacity(cfg.layers);
    for lp in layout.layers() {
        let h1 = norm_fwd(cfg, params, &x, &lp.norm1_w, &lp.norm1_b);
        let q = linear(
            &h1,
            &params[lp.wq.clone()],
            opt(&lp.bq).as_deref(),
            t,
            h,
            qd,
        );
        let k = linear(
            &h1,
            &params[lp.wk.clone()],
            opt(&lp.bk).as_deref(),
            t,
            h,
            kvd,
        );
        let v = linear(
            &h1,
            &params[lp.wv.clone()],
            opt(&lp.bv).as_deref(),
            t,
            h,
            kvd,
        );
        let q = r::rope(&q, &positions, cfg.heads, d, theta, false);
        let k = r::rope(&k, &positions, cfg.kv_heads, d, theta, false);
        let (o, _lse) = r::attn_fwd(&q, &k, &v, &shape, true, scale);
        let a = linear(&o, &params[lp.wo.clone()], opt(&lp.bo).as_deref(), t, qd, h);
        let x1: Vec<f64> = x.iter().zip(&a).map(|(p, q)| p + q).collect();
        let h2 = norm_fwd(cfg, params, &x1, &lp.norm2_w, &lp.norm2_b);
        let z1 = linear(
            &h2,
            &params[lp.w1.clone()],
            opt(&lp.b1).as_deref(),
            t,
            h,
            inter,
        );
        let (z3, act) = match (cfg.activation, &lp.w3) {
            (Activation::SwiGlu, Some(w3)) => {
                let z3 = linear(&h2, &params[w3.clone()], None, t, h, inter);
                let act: Vec<f64> = z1.iter().zip(&z3).map(|(&g, &u)| r::swiglu(g, u)).collect();
                (z3, act)
            }
            _ => (
                Vec::new(),
                z1.iter().map(|&z| r::gelu_tanh(z)).collect::<Vec<f64>>(),
            ),
        };
        let m = linear(
            &act,
            &params[lp.w2.clone()],
            opt(&lp.b2).as_deref(),
            t,
            inter,
            h,
        );
        let x2: Vec<f64> = x1.iter().zip(&m).map(|(p, q)| p + q).collect();
        caches.push(LayerCache {
            x: std::mem::replace(&mut x, x2),
            h1,
            q,
            k,
            v,
            o,
            x1,
            h2,
            z1,
            z3,
            act,
        });
    }
    let hf = norm_fwd(cfg, params, &x, &layout.norm_f_w(), &layout.norm_f_b());
    let vocab = cfg.vocab_size;
    let logits = linear(&hf, &params[layout.lm_head()], None, t, h, vocab);
    let gs = 1.0 / valid as f64;
    let (losses, dlogits) = r::cross_entropy(&logits, targets, vocab, IGNORE_INDEX, gs);
    let loss = losses.iter().sum::<f64>() * gs;
    let correct = logits
        .chunks(vocab)
        .zip(targets)
        .filter(|(row, &t)| {
            t != IGNORE_INDEX && {
                let best = row
                    .iter()
                    .enumerate()
                    .fold(0, |b, (j, &z)| if z > row[b] { j } else { b });
                best as i64 == i64::from(t)
            }
        })
        .count();
    if !backward {
        return Ok(RefOutput {
            loss,
            grads: Vec::new(),
            correct,
        });
    }

    let mut g = vec![0.0; layout.len()];
    let dhf = linear_bwd(
        &dlogits,
        &hf,
        &params[layout.lm_head()],
        t,
        h,
        vocab,
        &mut g,
        &layout.lm_head(),
        &None,
    );
    let mut dx = norm_bwd(
        cfg,
        params,
        &x,
        &dhf,
        &layout.norm_f_w(),
        &layout.norm_f_b(),
        &mut g,
    );
    for (lp, c) in layout.layers().iter().zip(&caches).rev() {
        // MLP.
        let dact = linear_bwd(
            &dx,
            &c.act,
            &params[lp.w2.clone()],
            t,
            inter,
            h,
            &mut g,
            &lp.w2,
            &lp.b2,
        );
        let dh2 = match (cfg.activation, &lp.w3) {
            (Activation::SwiGlu, Some(w3)) => {
                let (mut dz1, mut dz3) = (vec![0.0; dact.len()], vec![0.0; dact.len()]);
                for i in 0..dact.len() {
                    (dz1[i], dz3[i]) = r::swiglu_grad(c.z1[i], c.z3[i], dact[i]);
                }
                let a = linear_bwd(
                    &dz1,
                    &c.h2,
                    &params[lp.w1.clone()],
                    t,
                    h,
                    inter,
                    &mut g,
                    &lp.w1,
                    &lp.b1,
                );
                let b = linear_bwd(
                    &dz3,
                    &c.h2,
                    &params[w3.clone()],
                    t,
                    h,
                    inter,
                    &mut g,
                    w3,
                    &None,
                );
                a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<_>>()
            }
            _ => {
                let dz1: Vec<f64> = dact
                    .iter()
                    .zip(&c.z1)
                    .map(|(d, &z)| d * r::gelu_tanh_grad(z))
                    .collect();
                linear_bwd(
                    &dz1,
                    &c.h2,
                    &params[lp.w1.clone()],
                    t,
                    h,
                    inter,
                    &mut g,
                    &lp.w1,
                    &lp.b1,
                )
            }
        };
        let dn2 = norm_bwd(cfg, params, &c.x1, &dh2, &lp.norm2_w, &lp.norm2_b, &mut g);
        let dx1: Vec<f64> = dx.iter().zip(&dn2).map(|(a, b)| a + b).collect();
        // Attention.
        let do_ = linear_bwd(
            &dx1,
            &c.o,
            &params[lp.wo.clone()],
            t,
            qd,
            h,
            &mut g,
            &lp.wo,
            &lp.bo,
        );
        let (dq, dk, dv) = r::attn_bwd_analytic(&c.q, &c.k, &c.v, &do_, &shape, true, scale);
        let dq = r::rope(&dq, &positions, cfg.heads, d, theta, true);
        let dk = r::rope(&dk, &positions, cfg.kv_heads, d, theta, true);
        let mut dh1 = linear_bwd(
            &dq,
            &c.h1,
            &params[lp.wq.clone()],
            t,
            h,
            qd,
            &mut g,
            &lp.wq,
            &lp.bq,
        );
        for (dy, wr, br) in [(&dk, &lp.wk, &lp.bk), (&dv, &lp.wv, &lp.bv)] {
            let part = linear_bwd(dy, &c.h1, &params[wr.clone()], t, h, kvd, &mut g, wr, br);
            for (a, b) in dh1.iter_mut().zip(&part) {
                *a += b;
            }
        }
        let dn1 = norm_bwd(cfg, params, &c.x, &dh1, &lp.norm1_w, &lp.norm1_b, &mut g);
        dx = dx1.iter().zip(&dn1).map(|(a, b)| a + b).collect();
    }
    let de = r::embedding_bwd(&dx, tokens, h, vocab);
    add_into(&mut g, &layout.embed(), &de);
    Ok(RefOutput {
        loss,
        grads: g,
        correct,
    })
}

/// The loss only.
pub fn loss(cfg: &ModelConfig, params: &[f64], tokens: &[u32], targets: &[i32]) -> Result<f64> {
    Ok(run(cfg, params, tokens, targets, false)?.loss)
}

/// The loss and the gradient of every parameter.
pub fn loss_and_grads(
    cfg: &ModelConfig,
    params: &[f64],
    tokens: &[u32],
    targets: &[i32],
) -> Result<RefOutput> {
    run(cfg, params, tokens, targets, true)
}

/// One AdamW step in f64 over the whole flat buffer (PyTorch semantics,
/// decoupled weight decay, `step` 1-based), the optimizer of the reference
/// training loop.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    params: &mut [f64],
    grads: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    cfg: &fpdt_ptx::cpu::AdamW,
    step: i32,
) {
    r::adamw(
        params,
        grads,
        m,
        v,
        f64::from(cfg.lr),
        f64::from(cfg.beta1),
        f64::from(cfg.beta2),
        f64::from(cfg.eps),
        f64::from(cfg.weight_decay),
        step,
    );
}
