//! f64 references of the row-wise and element-wise kernels.

/// `table[ids[t]]` rows.
pub fn embedding_fwd(table: &[f64], ids: &[u32], dim: usize) -> Vec<f64> {
    ids.iter()
        .flat_map(|&i| table[i as usize * dim..][..dim].iter().cloned())
        .collect()
}

/// Scatter-add of `dout` rows into a `[vocab, dim]` table gradient.
pub fn embedding_bwd(dout: &[f64], ids: &[u32], dim: usize, vocab: usize) -> Vec<f64> {
    let mut g = vec![0.0; vocab * dim];
    for (t, &i) in ids.iter().enumerate() {
        for c in 0..dim {
            g[i as usize * dim + c] += dout[t * dim + c];
        }
    }
    g
}

/// LayerNorm: `(y, mean, rstd)`.
pub fn layer_norm_fwd(
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    dim: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut y, mut mean, mut rstd) = (Vec::new(), Vec::new(), Vec::new());
    for row in x.chunks(dim) {
        let mu = row.iter().sum::<f64>() / dim as f64;
        let var = row.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / dim as f64;
        let rs = 1.0 / (var + eps).sqrt();
        y.extend(
            row.iter()
                .enumerate()
                .map(|(c, v)| (v - mu) * rs * gamma[c] + beta[c]),
        );
        mean.push(mu);
        rstd.push(rs);
    }
    (y, mean, rstd)
}

/// LayerNorm backward, recomputing the statistics: `(dx, dgamma, dbeta)`.
pub fn layer_norm_bwd(
    x: &[f64],
    gamma: &[f64],
    dy: &[f64],
    dim: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (_, mean, rstd) = layer_norm_fwd(x, gamma, &vec![0.0; dim], dim, eps);
    let mut dx = vec![0.0; x.len()];
    let (mut dg, mut db) = (vec![0.0; dim], vec![0.0; dim]);
    for r in 0..x.len() / dim {
        let xh: Vec<f64> = (0..dim)
            .map(|c| (x[r * dim + c] - mean[r]) * rstd[r])
            .collect();
        let g: Vec<f64> = (0..dim).map(|c| dy[r * dim + c] * gamma[c]).collect();
        let m1 = g.iter().sum::<f64>() / dim as f64;
        let m2 = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / dim as f64;
        for c in 0..dim {
            dx[r * dim + c] = rstd[r] * (g[c] - m1 - xh[c] * m2);
            dg[c] += dy[r * dim + c] * xh[c];
            db[c] += dy[r * dim + c];
        }
    }
    (dx, dg, db)
}

/// RMSNorm: `(y, rstd)`.
pub fn rms_norm_fwd(x: &[f64], gamma: &[f64], dim: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let (mut y, mut rstd) = (Vec::new(), Vec::new());
    for row in x.chunks(dim) {
        let rs = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / dim as f64 + eps).sqrt();
        y.extend(row.iter().enumerate().map(|(c, v)| v * rs * gamma[c]));
        rstd.push(rs);
    }
    (y, rstd)
}

/// RMSNorm backward: `(dx, dgamma)`.
pub fn rms_norm_bwd(
    x: &[f64],
    gamma: &[f64],
    dy: &[f64],
    dim: usize,
    eps: f64,
) -> (Vec<f64>, Vec<f64>) {
    let (_, rstd) = rms_norm_fwd(x, gamma, dim, eps);
    let mut dx = vec![0.0; x.len()];
    let mut dg = vec![0.0; dim];
    for r in 0..x.len() / dim {
        let xh: Vec<f64> = (0..dim).map(|c| x[r * dim + c] * rstd[r]).collect();
        let g: Vec<f64> = (0..dim).map(|c| dy[r * dim + c] * gamma[c]).collect();
        let m2 = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / dim as f64;
        for c in 0..dim {
            dx[r * dim + c] = rstd[r] * (g[c] - xh[c] * m2);
            dg[c] += dy[r * dim + c] * xh[c];
        }
    }
    (dx, dg)
}

const GELU_C: f64 = 0.797_884_560_802_865_4; // sqrt(2/pi)

/// GeLU, tanh approximation.
pub fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + (GELU_C * (x + 0.044715 * x * x * x)).tanh())
}

/// Derivative of [`gelu_tanh`].
pub fn gelu_tanh_grad(x: f64) -> f64 {
    let t = (GELU_C * (x + 0.044715 * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// SwiGLU `silu(g) * u`.
pub fn swiglu(g: f64, u: f64) -> f64 {
    g * sigmoid(g) * u
}

/// SwiGLU gradients `(d/dg, d/du)` times `d`.
pub fn swiglu_grad(g: f64, u: f64, d: f64) -> (f64, f64) {
    let s = sigmoid(g);
    (d * u * (s + g * s * (1.0 - s)), d * g * s)
}

/// RoPE (rotate-half) at `positions`, by `+angle` or, `inverse`, `-angle`.
pub fn rope(
    x: &[f64],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    theta: f64,
    inverse: bool,
) -> Vec<f64> {
    let half = head_dim / 2;
    let mut y = vec![0.0; x.len()];
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * head_dim;
            for i in 0..half {
                let mut a = f64::from(p) * theta.powf(-2.0 * i as f64 / head_dim as f64);
                if inverse {
                    a = -a;
                }
                let (x1, x2) = (x[base + i], x[base + i + half]);
                y[base + i] = x1 * a.cos() - x2 * a.sin();
                y[base + i + half] = x2 * a.cos() + x1 * a.sin();
            }
        }
    }
    y
}

/// Softmax cross-entropy over full rows: per-row losses (0 when ignored)
/// and `grad_scale * (softmax - onehot)` (0 rows when ignored).
pub fn cross_entropy(
    logits: &[f64],
    labels: &[i32],
    vocab: usize,
    ignore_index: i32,
    grad_scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut loss = vec![0.0; labels.len()];
    let mut d = vec![0.0; logits.len()];
    for (t, &l) in labels.iter().enumerate() {
        if l == ignore_index {
            continue;
        }
        let row = &logits[t * vocab..][..vocab];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
        loss[t] = m + z.ln() - row[l as usize];
        for c in 0..vocab {
            d[t * vocab + c] =
                grad_scale * ((row[c] - m).exp() / z - if c == l as usize { 1.0 } else { 0.0 });
        }
    }
    (loss, d)
}

/// One AdamW step in f64 (PyTorch semantics, decoupled decay), in place.
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    p: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    lr: f64,
    b1: f64,
    b2: f64,
    eps: f64,
    wd: f64,
    step: i32,
) {
    for i in 0..p.len() {
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let mh = m[i] / (1.0 - b1.powi(step));
        let vh = v[i] / (1.0 - b2.powi(step));
        p[i] -= lr * mh / (vh.sqrt() + eps);
    }
}

/// `y = x W^T + b` style product with explicit transposes:
/// `C[m,n] = op(A) op(B) (+ bias)`, A `[m,k]` or (`ta`) `[k,m]`, B `[k,n]` or (`tb`) `[n,k]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f64],
    b: &[f64],
    bias: Option<&[f64]>,
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = bias.map_or(0.0, |b| b[j]);
            for p in 0..k {
                let x = if ta { a[p * m + i] } else { a[i * k + p] };
                let y = if tb { b[j * k + p] } else { b[p * n + j] };
                s += x * y;
            }
            c[i * n + j] = s;
        }
    }
    c
}

/// Ulysses pack in index form: element `(r, t, hl, c)` of the output is
/// element `(t, r*H/P + hl, c)` of the input.
pub fn ulysses_pack(
    x: &[f64],
    tokens: usize,
    heads: usize,
    head_dim: usize,
    ranks: usize,
) -> Vec<f64> {
    let hp = heads / ranks;
    let mut out = vec![0.0; x.len()];
    for r in 0..ranks {
        for t in 0..tokens {
            for hl in 0..hp {
                for c in 0..head_dim {
                    out[((r * tokens + t) * hp + hl) * head_dim + c] =
                        x[(t * heads + r * hp + hl) * head_dim + c];
                }
            }
        }
    }
    out
}
