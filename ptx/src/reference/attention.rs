//! Naive f64 attention: the oracle of the attention twins and kernels.
//! Straightforward loops, no blocking, no online softmax.

use crate::cpu::AttnShape;

fn visible(causal: bool, i: usize, j: usize) -> bool {
    !causal || j <= i
}

/// Scores `scale * q_i . k_j` of q head `h` against its kv head, with
/// masked entries as `-inf`: `[q_tokens][kv_tokens]`.
fn scores(q: &[f64], k: &[f64], s: &AttnShape, causal: bool, scale: f64, h: usize) -> Vec<f64> {
    let (d, g) = (s.head_dim, h / s.group());
    let mut out = vec![f64::NEG_INFINITY; s.q_tokens * s.kv_tokens];
    for i in 0..s.q_tokens {
        for j in 0..s.kv_tokens {
            if visible(causal, i, j) {
                let qi = &q[(i * s.heads + h) * d..][..d];
                let kj = &k[(j * s.kv_heads + g) * d..][..d];
                out[i * s.kv_tokens + j] =
                    scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>();
            }
        }
    }
    out
}

/// Attention of one (q chunk, kv chunk) pair: the normalized output
/// `[q_tokens, heads, head_dim]` and the log-sum-exp `[q_tokens, heads]`.
/// A row that sees no key gets `o = 0`, `lse = -inf`.
pub fn attn_fwd(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    s: &AttnShape,
    causal: bool,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let d = s.head_dim;
    let mut o = vec![0.0; s.q_tokens * s.heads * d];
    let mut lse = vec![f64::NEG_INFINITY; s.q_tokens * s.heads];
    for h in 0..s.heads {
        let g = h / s.group();
        let sc = scores(q, k, s, causal, scale, h);
        for i in 0..s.q_tokens {
            let row = &sc[i * s.kv_tokens..][..s.kv_tokens];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if m == f64::NEG_INFINITY {
                continue;
            }
            let sum: f64 = row.iter().map(|x| (x - m).exp()).sum();
            let l = m + sum.ln();
            lse[i * s.heads + h] = l;
            let oi = &mut o[(i * s.heads + h) * d..][..d];
            for (j, x) in row.iter().enumerate() {
                let p = (x - l).exp();
                let vj = &v[(j * s.kv_heads + g) * d..][..d];
                for (a, b) in oi.iter_mut().zip(vj) {
                    *a += p * b;
                }
            }
        }
    }
    (o, lse)
}

/// The LSE merge in its naive form: `lse' = ln(e^lse + e^lse_j)`,
/// `o' = (e^lse o + e^lse_j o_j) / e^lse'`, evaluated relative to the larger
/// lse so it does not overflow. Rows are `lse.len()`, each `head_dim` wide.
pub fn lse_merge(o: &mut [f64], lse: &mut [f64], o_j: &[f64], lse_j: &[f64], head_dim: usize) {
    for r in 0..lse.len() {
        let (a, b) = (lse[r], lse_j[r]);
        let m = a.max(b);
        if m == f64::NEG_INFINITY {
            continue;
        }
        let (wa, wb) = ((a - m).exp(), (b - m).exp());
        let l = m + (wa + wb).ln();
        for c in 0..head_dim {
            let x = &mut o[r * head_dim + c];
            *x = (wa * *x + wb * o_j[r * head_dim + c]) / (wa + wb);
        }
        lse[r] = l;
    }
}

/// `D = rowsum(dO * O)` per row of `head_dim`.
pub fn attn_delta(do_: &[f64], o: &[f64], head_dim: usize) -> Vec<f64> {
    do_.chunks(head_dim)
        .zip(o.chunks(head_dim))
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum())
        .collect()
}

/// Backward of one pair in the FPDT form: probabilities from the final
/// `lse`, `dS = P * (dP - D)` with the given `delta`. Returns this pair's
/// contributions `(dq, dk, dv)` (GQA: dk, dv summed over the q heads of a kv head).
#[allow(clippy::too_many_arguments)]
pub fn attn_bwd_pair(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    lse: &[f64],
    do_: &[f64],
    delta: &[f64],
    s: &AttnShape,
    causal: bool,
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = s.head_dim;
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    for h in 0..s.heads {
        let g = h / s.group();
        let sc = scores(q, k, s, causal, scale, h);
        for i in 0..s.q_tokens {
            let l = lse[i * s.heads + h];
            let doi = &do_[(i * s.heads + h) * d..][..d];
            for j in 0..s.kv_tokens {
                let x = sc[i * s.kv_tokens + j];
                if x == f64::NEG_INFINITY {
                    continue;
                }
                let p = (x - l).exp();
                let vj = &v[(j * s.kv_heads + g) * d..][..d];
                let dp: f64 = doi.iter().zip(vj).map(|(a, b)| a * b).sum();
                let ds = p * (dp - delta[i * s.heads + h]);
                for c in 0..d {
                    dv[(j * s.kv_heads + g) * d + c] += p * doi[c];
                    dq[(i * s.heads + h) * d + c] += scale * ds * k[(j * s.kv_heads + g) * d + c];
                    dk[(j * s.kv_heads + g) * d + c] += scale * ds * q[(i * s.heads + h) * d + c];
                }
            }
        }
    }
    (dq, dk, dv)
}

/// The analytic gradient of naive softmax attention `o = softmax(s) v` for
/// the upstream gradient `do_`, through the full softmax Jacobian
/// (`dS = P * (dP - rowsum(P * dP))`), independent of the FPDT form.
pub fn attn_bwd_analytic(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    do_: &[f64],
    s: &AttnShape,
    causal: bool,
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let d = s.head_dim;
    let n = s.kv_tokens;
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    for h in 0..s.heads {
        let g = h / s.group();
        let sc = scores(q, k, s, causal, scale, h);
        for i in 0..s.q_tokens {
            let row = &sc[i * n..][..n];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = row.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|x| x / z).collect();
            let doi = &do_[(i * s.heads + h) * d..][..d];
            let dp: Vec<f64> = (0..n)
                .map(|j| {
                    (0..d)
                        .map(|c| doi[c] * v[(j * s.kv_heads + g) * d + c])
                        .sum()
                })
                .collect();
            let pdp: f64 = (0..n).map(|j| p[j] * dp[j]).sum();
            for j in 0..n {
                let ds = p[j] * (dp[j] - pdp);
                for c in 0..d {
                    dv[(j * s.kv_heads + g) * d + c] += p[j] * doi[c];
                    dq[(i * s.heads + h) * d + c] += scale * ds * k[(j * s.kv_heads + g) * d + c];
                    dk[(j * s.kv_heads + g) * d + c] += scale * ds * q[(i * s.heads + h) * d + c];
                }
            }
        }
    }
    (dq, dk, dv)
}
