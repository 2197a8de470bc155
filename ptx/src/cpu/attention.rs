//! Attention for one (q chunk, kv chunk) pair on the cpu: blocked flash
//! attention (online softmax over kv blocks) whose tile products run on the
//! `gemm` crate's f32 micro-kernels, parallel over (head, q block) tasks.

use super::{bad, check_len, fast_exp, gemm_f32, mul, par_map, widen, Element};
use crate::Result;

/// Query rows per task.
const BQ: usize = 64;
/// Keys per block of the online softmax.
const BK: usize = 256;

/// The shape of one attention pair (see `CONVENTIONS.md`): q is
/// `[q_tokens, heads, head_dim]`, k and v `[kv_tokens, kv_heads, head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttnShape {
    /// Query tokens of the pair.
    pub q_tokens: usize,
    /// Key/value tokens of the pair.
    pub kv_tokens: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl AttnShape {
    /// q heads per kv head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// The default softmax scale `1/sqrt(head_dim)`.
    pub fn default_scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// Elements of q, o, do, dq.
    pub fn q_len(&self) -> usize {
        self.q_tokens * self.heads * self.head_dim
    }

    /// Elements of k, v, dk, dv.
    pub fn kv_len(&self) -> usize {
        self.kv_tokens * self.kv_heads * self.head_dim
    }

    /// Elements of lse and delta.
    pub fn rows(&self) -> usize {
        self.q_tokens * self.heads
    }

    /// Multiply-adds times two of the forward (QK^T and PV), causal halving
    /// not counted.
    pub fn fwd_flops(&self) -> f64 {
        4.0 * self.q_tokens as f64
            * self.kv_tokens as f64
            * self.heads as f64
            * self.head_dim as f64
    }

    /// Checks the shape rules for `kernel`: non-zero sizes, `kv_heads`
    /// divides `heads`, square pair when causal, sizes that do not overflow.
    pub fn validate(&self, kernel: &'static str, causal: bool) -> Result<()> {
        for (arg, v) in [
            ("q_tokens", self.q_tokens),
            ("kv_tokens", self.kv_tokens),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(bad(kernel, arg, "is 0, must be at least 1"));
            }
        }
        if self.heads % self.kv_heads != 0 {
            return Err(bad(
                kernel,
                "kv_heads",
                format!("{} does not divide heads = {}", self.kv_heads, self.heads),
            ));
        }
        if causal && self.q_tokens != self.kv_tokens {
            return Err(bad(
                kernel,
                "kv_tokens",
                format!(
                    "{} differs from q_tokens = {}: the causal (diagonal) pair is square",
                    self.kv_tokens, self.q_tokens
                ),
            ));
        }
        let qh = mul(kernel, "q_tokens", self.q_tokens, self.heads)?;
        mul(kernel, "q_tokens", qh, self.head_dim)?;
        let kh = mul(kernel, "kv_tokens", self.kv_tokens, self.kv_heads)?;
        mul(kernel, "kv_tokens", kh, self.head_dim)?;
        Ok(())
    }
}

/// Softmax in base 2 on a tile: `s` holds `log2(e) * scale * q.k`; masked
/// keys (causal, `j > i`) become 0. Returns nothing; `p` overwrites `s`.
/// Forward: running max `m` (base 2) and sum `l` per row, `alpha` the
/// factor the row's accumulator must be scaled by.
fn online_softmax_tile(
    s: &mut [f32],
    rows: usize,
    cols: usize,
    mask_from: Option<(usize, usize)>,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) {
    for r in 0..rows {
        let row = &mut s[r * cols..][..cols];
        // Keys j with j0 + c > i0 + r are masked.
        let vis = match mask_from {
            Some((i, j0)) => (i + r + 1).saturating_sub(j0).min(cols),
            None => cols,
        };
        row[vis..].fill(0.0);
        let row = &mut row[..vis];
        let m_new = m[r].max(lanes_max(row));
        if m_new == f32::NEG_INFINITY {
            row.fill(0.0);
            alpha[r] = 1.0;
            continue;
        }
        for x in row.iter_mut() {
            *x = fast_exp2(*x - m_new);
        }
        let sum = lanes_sum(row);
        alpha[r] = fast_exp2(m[r] - m_new);
        l[r] = l[r] * alpha[r] + sum;
        m[r] = m_new;
    }
}

/// Maximum with 8 independent lanes (vectorizes; NaN-free inputs).
fn lanes_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = if *v > *a { *v } else { *a };
        }
    }
    let tail = it
        .remainder()
        .iter()
        .cloned()
        .fold(f32::NEG_INFINITY, f32::max);
    acc.iter().cloned().fold(tail, f32::max)
}

/// Sum with 8 independent lanes (vectorizes).
fn lanes_sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

#[inline(always)]
fn fast_exp2(x: f32) -> f32 {
    fast_exp(x * std::f32::consts::LN_2)
}

/// Forward of one attention pair, all heads: writes the pair's normalized
/// partial output `o` `[q_tokens, heads, head_dim]` (f32) and `lse`
/// `[q_tokens, heads]` (f32, natural log). `causal` masks `j > i` (the
/// diagonal pair). GQA: q head `h` reads kv head `h / (heads / kv_heads)`.
#[allow(clippy::too_many_arguments)]
pub fn attn_fwd_chunk<E: Element>(
    q: &[E],
    k: &[E],
    v: &[E],
    shape: &AttnShape,
    causal: bool,
    scale: f32,
    o: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    const KN: &str = "attn_fwd_chunk";
    shape.validate(KN, causal)?;
    check_len(KN, "q", q.len(), shape.q_len())?;
    check_len(KN, "k", k.len(), shape.kv_len())?;
    check_len(KN, "v", v.len(), shape.kv_len())?;
    check_len(KN, "o", o.len(), shape.q_len())?;
    check_len(KN, "lse", lse.len(), shape.rows())?;
    if !scale.is_finite() {
        return Err(bad(KN, "scale", format!("{scale} is not finite")));
    }
    let s = *shape;
    let (q, k, v) = (widen(q), widen(k), widen(v));
    let (q, k, v) = (&q[..], &k[..], &v[..]);
    let d = s.head_dim;
    let (qs, ks) = (s.heads * d, s.kv_heads * d);
    let qblocks = s.q_tokens.div_ceil(BQ);
    let c = scale * std::f32::consts::LOG2_E;
    let results = par_map(s.heads * qblocks, |t| -> Result<(Vec<f32>, Vec<f32>)> {
        let (h, qb) = (t / qblocks, t % qblocks);
        let g = h / s.group();
        let i0 = qb * BQ;
        let bq = BQ.min(s.q_tokens - i0);
        let qv = &q[i0 * qs + h * d..];
        let mut acc = vec![0.0f32; bq * d];
        let mut st = vec![0.0f32; bq * BK];
        let mut m = vec![f32::NEG_INFINITY; bq];
        let mut l = vec![0.0f32; bq];
        let mut alpha = vec![1.0f32; bq];
        let kv_end = if causal {
            (i0 + bq).min(s.kv_tokens)
        } else {
            s.kv_tokens
        };
        let mut j0 = 0;
        while j0 < kv_end {
            let bk = BK.min(kv_end - j0);
            let kv = &k[j0 * ks + g * d..];
            let vv = &v[j0 * ks + g * d..];
            gemm_f32(
                bq, bk, d, &mut st, bk, false, qv, qs, 1, kv, 1, ks, c, false,
            )?;
            let mask = (causal && j0 + bk > i0 + 1).then_some((i0, j0));
            online_softmax_tile(&mut st, bq, bk, mask, &mut m, &mut l, &mut alpha);
            for (r, a) in alpha.iter().enumerate() {
                if *a != 1.0 {
                    acc[r * d..][..d].iter_mut().for_each(|x| *x *= a);
                }
            }
            gemm_f32(
                bq, d, bk, &mut acc, d, true, &st, bk, 1, vv, ks, 1, 1.0, false,
            )?;
            j0 += bk;
        }
        let mut lse_t = vec![f32::NEG_INFINITY; bq];
        for r in 0..bq {
            if l[r] > 0.0 {
                let inv = 1.0 / l[r];
                acc[r * d..][..d].iter_mut().for_each(|x| *x *= inv);
                lse_t[r] = (m[r] + l[r].log2()) * std::f32::consts::LN_2;
            } else {
                acc[r * d..][..d].fill(0.0);
            }
        }
        Ok((acc, lse_t))
    });
    for (t, res) in results.into_iter().enumerate() {
        let (acc, lse_t) = res?;
        let (h, qb) = (t / qblocks, t % qblocks);
        let i0 = qb * BQ;
        for (r, (row, l)) in acc.chunks(d).zip(lse_t).enumerate() {
            let i = i0 + r;
            o[i * qs + h * d..][..d].copy_from_slice(row);
            lse[i * s.heads + h] = l;
        }
    }
    Ok(())
}

/// Folds a partial `(o_j, lse_j)` into the running `(o, lse)` in the stable
/// form `lse' = lse - logsigmoid(lse - lse_j)`,
/// `o' = o - sigmoid(lse_j - lse) * (o - o_j)`. A running `lse = -inf`
/// takes the partial as is; a partial with `lse_j = -inf` changes nothing.
/// Rows are `lse.len()`, each `head_dim` wide.
pub fn lse_merge(
    o: &mut [f32],
    lse: &mut [f32],
    o_j: &[f32],
    lse_j: &[f32],
    head_dim: usize,
) -> Result<()> {
    const KN: &str = "lse_merge";
    if head_dim == 0 {
        return Err(bad(KN, "head_dim", "is 0, must be at least 1"));
    }
    let rows = lse.len();
    check_len(KN, "lse_j", lse_j.len(), rows)?;
    check_len(KN, "o", o.len(), mul(KN, "o", rows, head_dim)?)?;
    check_len(KN, "o_j", o_j.len(), rows * head_dim)?;
    for r in 0..rows {
        let (a, b) = (lse[r], lse_j[r]);
        let or = &mut o[r * head_dim..][..head_dim];
        let oj = &o_j[r * head_dim..][..head_dim];
        if b == f32::NEG_INFINITY {
            continue;
        }
        if a == f32::NEG_INFINITY {
            or.copy_from_slice(oj);
            lse[r] = b;
            continue;
        }
        // sigmoid(b - a) and -logsigmoid(a - b) = softplus(b - a), stably.
        let x = b - a;
        let sig = if x >= 0.0 {
            1.0 / (1.0 + (-x).exp())
        } else {
            x.exp() / (1.0 + x.exp())
        };
        let softplus = x.max(0.0) + (-x.abs()).exp().ln_1p();
        lse[r] = a + softplus;
        for (p, q) in or.iter_mut().zip(oj) {
            *p -= sig * (*p - q);
        }
    }
    Ok(())
}

/// `delta = rowsum(do * o)` per row of `head_dim` (f32 accumulation).
pub fn attn_delta<E: Element, O: Element>(
    do_: &[E],
    o: &[O],
    head_dim: usize,
    delta: &mut [f32],
) -> Result<()> {
    const KN: &str = "attn_delta";
    if head_dim == 0 {
        return Err(bad(KN, "head_dim", "is 0, must be at least 1"));
    }
    let rows = delta.len();
    let n = mul(KN, "delta", rows, head_dim)?;
    check_len(KN, "do", do_.len(), n)?;
    check_len(KN, "o", o.len(), n)?;
    for ((dr, a), b) in delta
        .iter_mut()
        .zip(do_.chunks(head_dim))
        .zip(o.chunks(head_dim))
    {
        *dr = a.iter().zip(b).map(|(x, y)| x.to_f32() * y.to_f32()).sum();
    }
    Ok(())
}

/// Backward of one attention pair: from q, k, v, the *final* lse, do and
/// `delta = rowsum(do * o)` (see [`attn_delta`]; o itself is not needed),
/// accumulates `dq += ...`, `dk += ...`, `dv += ...` (f32). GQA: dk and dv
/// of a kv head sum over its q heads.
#[allow(clippy::too_many_arguments)]
pub fn attn_bwd_chunk<E: Element>(
    q: &[E],
    k: &[E],
    v: &[E],
    lse: &[f32],
    do_: &[E],
    delta: &[f32],
    shape: &AttnShape,
    causal: bool,
    scale: f32,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<()> {
    const KN: &str = "attn_bwd_chunk";
    shape.validate(KN, causal)?;
    check_len(KN, "q", q.len(), shape.q_len())?;
    check_len(KN, "k", k.len(), shape.kv_len())?;
    check_len(KN, "v", v.len(), shape.kv_len())?;
    check_len(KN, "lse", lse.len(), shape.rows())?;
    check_len(KN, "do", do_.len(), shape.q_len())?;
    check_len(KN, "delta", delta.len(), shape.rows())?;
    check_len(KN, "dq", dq.len(), shape.q_len())?;
    check_len(KN, "dk", dk.len(), shape.kv_len())?;
    check_len(KN, "dv", dv.len(), shape.kv_len())?;
    if !scale.is_finite() {
        return Err(bad(KN, "scale", format!("{scale} is not finite")));
    }
    let s = *shape;
    let (q, k, v, dov) = (widen(q), widen(k), widen(v), widen(do_));
    let (q, k, v, dov) = (&q[..], &k[..], &v[..], &dov[..]);
    let d = s.head_dim;
    let (qs, ks) = (s.heads * d, s.kv_heads * d);
    let qblocks = s.q_tokens.div_ceil(BQ);
    let units = s.group() * qblocks; // per kv head: (q head in group, q block)
    let parts = (2 * super::threads()).div_ceil(s.kv_heads).clamp(1, units);
    let c = scale * std::f32::consts::LOG2_E;
    let n = s.kv_tokens;
    type Part = (Vec<f32>, Vec<f32>, Vec<(usize, usize, Vec<f32>)>);
    let results = par_map(s.kv_heads * parts, |t| -> Result<Part> {
        let (g, part) = (t / parts, t % parts);
        let mut dk_p = vec![0.0f32; n * d];
        let mut dv_p = vec![0.0f32; n * d];
        let mut dqs = Vec::new();
        let mut st = vec![0.0f32; BQ * BK];
        let mut dp = vec![0.0f32; BQ * BK];
        for u in (part..units).step_by(parts) {
            let h = g * s.group() + u / qblocks;
            let i0 = (u % qblocks) * BQ;
            let bq = BQ.min(s.q_tokens - i0);
            let qv = &q[i0 * qs + h * d..];
            let dov = &dov[i0 * qs + h * d..];
            let lse2: Vec<f32> = (0..bq)
                .map(|r| lse[(i0 + r) * s.heads + h] * std::f32::consts::LOG2_E)
                .collect();
            let dl: Vec<f32> = (0..bq).map(|r| delta[(i0 + r) * s.heads + h]).collect();
            let mut dq_u = vec![0.0f32; bq * d];
            let kv_end = if causal { (i0 + bq).min(n) } else { n };
            let mut j0 = 0;
            while j0 < kv_end {
                let bk = BK.min(kv_end - j0);
                let kv = &k[j0 * ks + g * d..];
                let vv = &v[j0 * ks + g * d..];
                gemm_f32(
                    bq, bk, d, &mut st, bk, false, qv, qs, 1, kv, 1, ks, c, false,
                )?;
                gemm_f32(
                    bq, bk, d, &mut dp, bk, false, dov, qs, 1, vv, 1, ks, 1.0, false,
                )?;
                for r in 0..bq {
                    let vis = if causal {
                        (i0 + r + 1).saturating_sub(j0).min(bk)
                    } else {
                        bk
                    };
                    let srow = &mut st[r * bk..][..bk];
                    let prow = &mut dp[r * bk..][..bk];
                    let (l2, dr) = (lse2[r], dl[r]);
                    for (x, y) in srow[..vis].iter_mut().zip(prow[..vis].iter_mut()) {
                        let p = fast_exp2(*x - l2);
                        *x = p;
                        *y = p * (*y - dr) * scale;
                    }
                    srow[vis..].fill(0.0);
                    prow[vis..].fill(0.0);
                }
                // dv += P^T dO, dk += dS^T Q, dq += dS K (dS already scaled).
                let dvb = &mut dv_p[j0 * d..];
                gemm_f32(bk, d, bq, dvb, d, true, &st, 1, bk, dov, qs, 1, 1.0, false)?;
                let dkb = &mut dk_p[j0 * d..];
                gemm_f32(bk, d, bq, dkb, d, true, &dp, 1, bk, qv, qs, 1, 1.0, false)?;
                gemm_f32(
                    bq, d, bk, &mut dq_u, d, true, &dp, bk, 1, kv, ks, 1, 1.0, false,
                )?;
                j0 += bk;
            }
            dqs.push((h, i0, dq_u));
        }
        Ok((dk_p, dv_p, dqs))
    });
    for (t, res) in results.into_iter().enumerate() {
        let (dk_p, dv_p, dqs) = res?;
        let g = t / parts;
        for j in 0..n {
            let (dst_k, src_k) = (&mut dk[j * ks + g * d..][..d], &dk_p[j * d..][..d]);
            dst_k.iter_mut().zip(src_k).for_each(|(a, b)| *a += b);
            let (dst_v, src_v) = (&mut dv[j * ks + g * d..][..d], &dv_p[j * d..][..d]);
            dst_v.iter_mut().zip(src_v).for_each(|(a, b)| *a += b);
        }
        for (h, i0, dq_u) in dqs {
            for (r, row) in dq_u.chunks(d).enumerate() {
                let dst = &mut dq[(i0 + r) * qs + h * d..][..d];
                dst.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
    }
    Ok(())
}
