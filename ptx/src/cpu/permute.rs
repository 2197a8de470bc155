//! Casts and the Ulysses head-group permutes.

use super::{bad, check_len, mul, par_rows, row_ranges, split_rows, Element};
use crate::Result;

/// Element-wise cast between storage types (f32 <-> bf16, round to nearest even).
pub fn cast<A: Element, B: Element>(src: &[A], dst: &mut [B]) -> Result<()> {
    check_len("cast", "dst", dst.len(), src.len())?;
    let ranges = row_ranges(src.len(), 1 << 16);
    let parts = split_rows(dst, 1, &ranges);
    par_rows(&ranges, parts, |r, d| {
        for (o, x) in d.iter_mut().zip(&src[r]) {
            *o = B::from_f32(x.to_f32());
        }
    });
    Ok(())
}

fn check(
    kernel: &'static str,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    ranks: usize,
) -> Result<usize> {
    if ranks == 0 {
        return Err(bad(kernel, "ranks", "is 0, must be at least 1"));
    }
    if heads == 0 || heads % ranks != 0 {
        return Err(bad(
            kernel,
            "heads",
            format!("{heads} is not a non-zero multiple of ranks = {ranks}"),
        ));
    }
    if head_dim == 0 {
        return Err(bad(kernel, "head_dim", "is 0, must be at least 1"));
    }
    let th = mul(kernel, "tokens", tokens, heads)?;
    mul(kernel, "tokens", th, head_dim)
}

/// Ulysses pack: local `[tokens, heads, head_dim]` -> `[ranks][tokens,
/// heads/ranks, head_dim]`, block `r` holding heads `r*heads/ranks ..
/// (r+1)*heads/ranks` (what rank `r` receives). The receive side's
/// `[ranks][tokens, heads/ranks, d]` already is `[ranks*tokens, heads/ranks,
/// d]` in memory (source rank order = token order), so it needs no permute.
pub fn ulysses_pack<E: Element>(
    local: &[E],
    tokens: usize,
    heads: usize,
    head_dim: usize,
    ranks: usize,
    out: &mut [E],
) -> Result<()> {
    const K: &str = "ulysses_pack";
    let n = check(K, tokens, heads, head_dim, ranks)?;
    check_len(K, "local", local.len(), n)?;
    check_len(K, "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let hp = heads / ranks;
    let gw = hp * head_dim;
    for (r, blk) in out.chunks_mut(tokens * gw).enumerate().take(ranks) {
        for (t, row) in blk.chunks_mut(gw).enumerate() {
            row.copy_from_slice(&local[(t * heads + r * hp) * head_dim..][..gw]);
        }
    }
    Ok(())
}

/// Ulysses unpack, the inverse of [`ulysses_pack`]: `[ranks][tokens,
/// heads/ranks, head_dim]` (head groups from each rank, for the same tokens)
/// -> `[tokens, heads, head_dim]`. This is the reverse all-to-all's receive side.
pub fn ulysses_unpack<E: Element>(
    groups: &[E],
    tokens: usize,
    heads: usize,
    head_dim: usize,
    ranks: usize,
    out: &mut [E],
) -> Result<()> {
    const K: &str = "ulysses_unpack";
    let n = check(K, tokens, heads, head_dim, ranks)?;
    check_len(K, "groups", groups.len(), n)?;
    check_len(K, "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let hp = heads / ranks;
    let gw = hp * head_dim;
    for (t, row) in out.chunks_mut(heads * head_dim).enumerate() {
        for r in 0..ranks {
            row[r * gw..][..gw].copy_from_slice(&groups[(r * tokens + t) * gw..][..gw]);
        }
    }
    Ok(())
}
