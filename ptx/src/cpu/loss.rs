//! Fused softmax cross-entropy over vocabulary chunks. A single chunk that
//! covers the whole vocabulary goes through [`softmax_cross_entropy`] in one
//! pass (loss and dlogits). A vocabulary split into chunks goes through
//! [`ce_chunk_stats`] per chunk (running max, running sum of exponentials,
//! the target logit: [`CeStats`], merged like the attention LSE), then
//! [`ce_finish`] for the loss and [`ce_chunk_grad`] per chunk for dlogits.

use super::{bad, check_len, mul, par_rows, row_ranges, split_rows};
use crate::Result;

/// Running softmax statistics of one row over the vocabulary chunks seen.
/// `#[repr(C)]`: the kernels keep the same three f32 a row (max, sum,
/// target), so a `[CeStats]` is the device buffer's layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CeStats {
    /// Running maximum logit.
    pub max: f32,
    /// `sum exp(logit - max)` over the chunks seen.
    pub sum: f32,
    /// The label's logit once its chunk was seen, 0 before.
    pub target: f32,
}

impl CeStats {
    /// Nothing seen yet.
    pub const EMPTY: CeStats = CeStats {
        max: f32::NEG_INFINITY,
        sum: 0.0,
        target: 0.0,
    };

    /// Combines the statistics of two disjoint sets of vocabulary chunks.
    pub fn merge(self, o: CeStats) -> CeStats {
        let max = self.max.max(o.max);
        if max == f32::NEG_INFINITY {
            return CeStats {
                target: self.target + o.target,
                ..CeStats::EMPTY
            };
        }
        let sum = self.sum * (self.max - max).exp() + o.sum * (o.max - max).exp();
        CeStats {
            max,
            sum,
            target: self.target + o.target,
        }
    }

    /// `log(sum exp(logit))` over the chunks seen.
    pub fn lse(&self) -> f32 {
        self.max + self.sum.ln()
    }
}

const MIN_ELEMS: usize = 1 << 15;

fn check_labels(
    kernel: &'static str,
    logits: usize,
    labels: &[i32],
    vocab_chunk: usize,
    ignore_index: i32,
) -> Result<()> {
    if vocab_chunk == 0 {
        return Err(bad(kernel, "vocab_chunk", "is 0, must be at least 1"));
    }
    check_len(
        kernel,
        "logits",
        logits,
        mul(kernel, "labels", labels.len(), vocab_chunk)?,
    )?;
    if let Some((t, l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l < 0 && l != ignore_index)
    {
        return Err(bad(
            kernel,
            "labels",
            format!("label {l} at token {t} is negative and not the ignore index {ignore_index}"),
        ));
    }
    Ok(())
}

/// The column of `label` in the chunk starting at `offset`, if there.
fn local(label: i32, offset: usize, width: usize) -> Option<usize> {
    let l = usize::try_from(label).ok()?;
    (offset..offset + width).contains(&l).then(|| l - offset)
}

/// Folds one vocabulary chunk `logits: [tokens, vocab_chunk]` (columns
/// `vocab_offset..vocab_offset + vocab_chunk` of the vocabulary) into the
/// running `stats: [tokens]`. Rows whose label is `ignore_index` are skipped.
pub fn ce_chunk_stats(
    logits: &[f32],
    labels: &[i32],
    vocab_chunk: usize,
    vocab_offset: usize,
    ignore_index: i32,
    stats: &mut [CeStats],
) -> Result<()> {
    const K: &str = "ce_chunk_stats";
    check_labels(K, logits.len(), labels, vocab_chunk, ignore_index)?;
    check_len(K, "stats", stats.len(), labels.len())?;
    let w = vocab_chunk;
    let ranges = row_ranges(labels.len(), (MIN_ELEMS / w).max(1));
    let parts = split_rows(stats, 1, &ranges);
    par_rows(&ranges, parts, |r, st| {
        for (i, t) in r.enumerate() {
            if labels[t] == ignore_index {
                continue;
            }
            let row = &logits[t * w..][..w];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            // A chunk of -inf logits (masked vocabulary padding) adds nothing;
            // `-inf - -inf` would make the sum NaN.
            let sum = if max == f32::NEG_INFINITY {
                0.0
            } else {
                row.iter().map(|x| (x - max).exp()).sum()
            };
            let target = local(labels[t], vocab_offset, w).map_or(0.0, |c| row[c]);
            st[i] = st[i].merge(CeStats { max, sum, target });
        }
    });
    Ok(())
}

/// Per-row losses `lse - target` from the final statistics (0 for ignored
/// rows); returns the number of rows that count.
pub fn ce_finish(
    stats: &[CeStats],
    labels: &[i32],
    ignore_index: i32,
    losses: &mut [f32],
) -> Result<usize> {
    const K: &str = "ce_finish";
    check_len(K, "stats", stats.len(), labels.len())?;
    check_len(K, "losses", losses.len(), labels.len())?;
    let mut n = 0;
    for ((l, s), &lab) in losses.iter_mut().zip(stats).zip(labels) {
        if lab == ignore_index {
            *l = 0.0;
        } else {
            *l = s.lse() - s.target;
            n += 1;
        }
    }
    Ok(n)
}

/// dlogits of one vocabulary chunk from the *final* statistics:
/// `grad_scale * (softmax - onehot(label))`, 0 for ignored rows.
#[allow(clippy::too_many_arguments)]
pub fn ce_chunk_grad(
    logits: &[f32],
    labels: &[i32],
    vocab_chunk: usize,
    vocab_offset: usize,
    ignore_index: i32,
    stats: &[CeStats],
    grad_scale: f32,
    dlogits: &mut [f32],
) -> Result<()> {
    const K: &str = "ce_chunk_grad";
    check_labels(K, logits.len(), labels, vocab_chunk, ignore_index)?;
    check_len(K, "stats", stats.len(), labels.len())?;
    check_len(K, "dlogits", dlogits.len(), logits.len())?;
    let w = vocab_chunk;
    let ranges = row_ranges(labels.len(), (MIN_ELEMS / w).max(1));
    let parts = split_rows(dlogits, w, &ranges);
    par_rows(&ranges, parts, |r, dl| {
        for (i, t) in r.enumerate() {
            let out = &mut dl[i * w..][..w];
            if labels[t] == ignore_index {
                out.fill(0.0);
                continue;
            }
            let lse = stats[t].lse();
            for (o, x) in out.iter_mut().zip(&logits[t * w..][..w]) {
                *o = grad_scale * (x - lse).exp();
            }
            if let Some(c) = local(labels[t], vocab_offset, w) {
                out[c] -= grad_scale;
            }
        }
    });
    Ok(())
}

/// Fused softmax cross-entropy when one chunk is the whole vocabulary:
/// per row the loss `lse - logit[label]` and `dlogits = grad_scale *
/// (softmax - onehot)`, in one pass over the row (ignored rows: loss 0,
/// dlogits 0). A label outside `0..vocab` that is not `ignore_index` is an
/// error. Returns the number of rows that count.
pub fn softmax_cross_entropy(
    logits: &[f32],
    labels: &[i32],
    vocab: usize,
    ignore_index: i32,
    grad_scale: f32,
    losses: &mut [f32],
    dlogits: &mut [f32],
) -> Result<usize> {
    const K: &str = "softmax_cross_entropy";
    check_labels(K, logits.len(), labels, vocab, ignore_index)?;
    check_len(K, "losses", losses.len(), labels.len())?;
    check_len(K, "dlogits", dlogits.len(), logits.len())?;
    if let Some((t, l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l != ignore_index && l as usize >= vocab)
    {
        return Err(bad(
            K,
            "labels",
            format!("label {l} at token {t} is outside the vocab of {vocab}"),
        ));
    }
    let w = vocab;
    let ranges = row_ranges(labels.len(), (MIN_ELEMS / w).max(1));
    let parts: Vec<_> = split_rows(losses, 1, &ranges)
        .into_iter()
        .zip(split_rows(dlogits, w, &ranges))
        .collect();
    par_rows(&ranges, parts, |r, (ls, dl)| {
        for (i, t) in r.enumerate() {
            let out = &mut dl[i * w..][..w];
            if labels[t] == ignore_index {
                ls[i] = 0.0;
                out.fill(0.0);
                continue;
            }
            let row = &logits[t * w..][..w];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for (o, x) in out.iter_mut().zip(row) {
                *o = (x - max).exp();
                sum += *o;
            }
            let c = labels[t] as usize;
            ls[i] = max + sum.ln() - row[c];
            let s = grad_scale / sum;
            out.iter_mut().for_each(|o| *o *= s);
            out[c] -= grad_scale;
        }
    });
    Ok(labels.iter().filter(|&&l| l != ignore_index).count())
}

/// Per row of `logits: [rows, vocab]`, 1.0 when the row's first maximum is
/// its label and 0.0 otherwise (and for ignored rows): the accuracy metric's
/// hits, as `softmax_xent_f32` writes them beside the loss. NaNs never win.
pub fn argmax_hits(
    logits: &[f32],
    labels: &[i32],
    vocab: usize,
    ignore_index: i32,
    hits: &mut [f32],
) -> Result<()> {
    const K: &str = "argmax_hits";
    check_labels(K, logits.len(), labels, vocab, ignore_index)?;
    check_len(K, "hits", hits.len(), labels.len())?;
    for ((h, row), &label) in hits.iter_mut().zip(logits.chunks(vocab)).zip(labels) {
        // The first strict maximum above -inf (column 0 when there is none).
        let (mut best, mut top) = (0, f32::NEG_INFINITY);
        for (j, &z) in row.iter().enumerate() {
            if z > top {
                (best, top) = (j, z);
            }
        }
        let hit = label != ignore_index && best as i64 == i64::from(label);
        *h = if hit { 1.0 } else { 0.0 };
    }
    Ok(())
}
