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

/// Widens raw storage bytes of `dtype` to f32, for callers that hold
/// untyped buffers (the model's host kernels over runtime views).
pub fn widen_bytes(src: &[u8], dtype: super::DType) -> Result<Vec<f32>> {
    const K: &str = "widen_bytes";
    if src.len() % dtype.size() != 0 {
        return Err(bad(
            K,
            "src",
            format!(
                "{} bytes is not a whole number of {}",
                src.len(),
                dtype.suffix()
            ),
        ));
    }
    Ok(match dtype {
        super::DType::F32 => src
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        super::DType::BF16 => src
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    })
}

/// Narrows f32 values into raw storage bytes of `dtype` (round to nearest
/// even for bf16).
pub fn narrow_bytes(src: &[f32], dtype: super::DType, dst: &mut [u8]) -> Result<()> {
    const K: &str = "narrow_bytes";
    check_len(K, "dst", dst.len(), mul(K, "src", src.len(), dtype.size())?)?;
    match dtype {
        super::DType::F32 => {
            for (d, x) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
        super::DType::BF16 => {
            for (d, x) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&half::bf16::from_f32(*x).to_le_bytes());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod byte_cast_tests {
    use super::*;
    use crate::cpu::DType;

    #[test]
    fn bf16_bytes_round_trip_to_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties to even (1.0).
        let x = [1.0f32, 1.0 + 1.0 / 256.0, -3.5, 1.0 + 3.0 / 256.0];
        let mut b = vec![0u8; 8];
        narrow_bytes(&x, DType::BF16, &mut b).unwrap();
        let y = widen_bytes(&b, DType::BF16).unwrap();
        assert_eq!(y, vec![1.0, 1.0, -3.5, 1.0 + 4.0 / 256.0]);
        assert!(narrow_bytes(&x, DType::BF16, &mut b[..6]).is_err());
        assert!(widen_bytes(&b[..3], DType::BF16).is_err());
        let mut f = vec![0u8; 16];
        narrow_bytes(&x, DType::F32, &mut f).unwrap();
        assert_eq!(widen_bytes(&f, DType::F32).unwrap(), x.to_vec());
    }
}
