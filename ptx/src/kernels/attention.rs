//! Launchers of the attention kernels.

use super::{bad, blocks_for, check_ptr, dtype_variant, fits_u32};
use crate::cpu::{AttnShape, DType};
use crate::launch::{Arg, Dim3, KernelLaunch};
use crate::Result;

/// The flash-attention forward module (entries `attn_fwd_d64`, `attn_fwd_d128`).
pub const ATTN_FWD_PTX: &str = include_str!("../../kernels/attn_fwd.ptx");
/// The LSE merge module (entry `lse_merge_f32`).
pub const LSE_MERGE_PTX: &str = include_str!("../../kernels/lse_merge.ptx");
/// The delta module (entries `attn_delta_bf16`, `attn_delta_f32`).
pub const ATTN_DELTA_PTX: &str = include_str!("../../kernels/attn_delta.ptx");

/// Query rows per CTA and keys per tile of `attn_fwd_d*` (see the generator).
const FWD_BQ: usize = 64;
const FWD_BK: usize = 32;

/// Device addresses of one attention pair's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnPtrs {
    /// q `[q_tokens, heads, head_dim]`, bf16.
    pub q: u64,
    /// k `[kv_tokens, kv_heads, head_dim]`, bf16.
    pub k: u64,
    /// v `[kv_tokens, kv_heads, head_dim]`, bf16.
    pub v: u64,
    /// Partial o `[q_tokens, heads, head_dim]`, f32 (written).
    pub o: u64,
    /// lse `[q_tokens, heads]`, f32 (written).
    pub lse: u64,
}

/// The forward of one attention pair (see `cpu::attn_fwd_chunk`): bf16
/// storage, head dims 64 and 128, causal for the diagonal pair, GQA.
/// q, k, v must be 16-byte aligned (cp.async), o 8-byte, lse 4-byte.
pub fn attn_fwd_chunk(
    shape: &AttnShape,
    causal: bool,
    scale: f32,
    dtype: DType,
    p: &AttnPtrs,
) -> Result<KernelLaunch> {
    const K: &str = "attn_fwd_chunk";
    shape.validate(K, causal)?;
    dtype_variant(K, dtype, &[DType::BF16])?;
    let d = shape.head_dim;
    let entry = match d {
        64 => "attn_fwd_d64",
        128 => "attn_fwd_d128",
        _ => return Err(bad(K, "head_dim", format!("{d} has no kernel (64 or 128)"))),
    };
    if !scale.is_finite() {
        return Err(bad(K, "scale", format!("{scale} is not finite")));
    }
    check_ptr(K, "q", p.q, 16)?;
    check_ptr(K, "k", p.k, 16)?;
    check_ptr(K, "v", p.v, 16)?;
    check_ptr(K, "o", p.o, 8)?;
    check_ptr(K, "lse", p.lse, 4)?;
    // The kernel forms token*heads + head and byte strides in 32 bits.
    fits_u32(
        K,
        "q_tokens",
        (shape.q_tokens as u128 + FWD_BQ as u128) * shape.heads as u128,
    )?;
    fits_u32(K, "kv_tokens", shape.kv_tokens as u128 + FWD_BK as u128)?;
    fits_u32(K, "heads", shape.heads as u128 * d as u128 * 4)?;
    let heads = u32::try_from(shape.heads)
        .ok()
        .filter(|&h| h <= 65_535)
        .ok_or_else(|| {
            bad(
                K,
                "heads",
                format!("{} exceeds the grid's y limit 65535", shape.heads),
            )
        })?;
    let qblocks = fits_u32(K, "q_tokens", shape.q_tokens.div_ceil(FWD_BQ) as u128)?;
    Ok(KernelLaunch {
        module: ATTN_FWD_PTX,
        entry: entry.to_string(),
        grid: Dim3::new(qblocks, heads, 1),
        block: Dim3::new(128, 1, 1),
        shared_bytes: (2 * 2 * FWD_BK * d * 2) as u32,
        args: vec![
            Arg::Ptr(p.q),
            Arg::Ptr(p.k),
            Arg::Ptr(p.v),
            Arg::Ptr(p.o),
            Arg::Ptr(p.lse),
            Arg::U32(shape.q_tokens as u32),
            Arg::U32(shape.kv_tokens as u32),
            Arg::U32(heads),
            Arg::U32(shape.kv_heads as u32),
            Arg::U32(u32::from(causal)),
            Arg::F32(scale),
        ],
    })
}

/// The stable LSE merge of `rows` rows of `head_dim` (see `cpu::lse_merge`):
/// o, lse updated in place from o_j, lse_j (all f32).
pub fn lse_merge(
    rows: usize,
    head_dim: usize,
    o: u64,
    lse: u64,
    o_j: u64,
    lse_j: u64,
) -> Result<KernelLaunch> {
    const K: &str = "lse_merge";
    if head_dim == 0 {
        return Err(bad(K, "head_dim", "is 0, must be at least 1"));
    }
    for (arg, ptr) in [("o", o), ("lse", lse), ("o_j", o_j), ("lse_j", lse_j)] {
        check_ptr(K, arg, ptr, 4)?;
    }
    let n = fits_u32(K, "rows", rows as u128 * head_dim as u128)?;
    Ok(KernelLaunch {
        module: LSE_MERGE_PTX,
        entry: "lse_merge_f32".to_string(),
        grid: Dim3::new(blocks_for(u64::from(n), 256), 1, 1),
        block: Dim3::new(256, 1, 1),
        shared_bytes: 0,
        args: vec![
            Arg::Ptr(o),
            Arg::Ptr(lse),
            Arg::Ptr(o_j),
            Arg::Ptr(lse_j),
            Arg::U32(rows as u32),
            Arg::U32(head_dim as u32),
        ],
    })
}

/// `delta = rowsum(do * o)` over `rows` rows of `head_dim`, do and o of
/// `dtype`, delta f32. One warp per row.
pub fn attn_delta(
    rows: usize,
    head_dim: usize,
    dtype: DType,
    do_: u64,
    o: u64,
    delta: u64,
) -> Result<KernelLaunch> {
    const K: &str = "attn_delta";
    let sfx = dtype_variant(K, dtype, &[DType::BF16, DType::F32])?;
    if head_dim == 0 {
        return Err(bad(K, "head_dim", "is 0, must be at least 1"));
    }
    check_ptr(K, "do", do_, dtype.size() as u64)?;
    check_ptr(K, "o", o, dtype.size() as u64)?;
    check_ptr(K, "delta", delta, 4)?;
    fits_u32(K, "rows", rows as u128 * head_dim as u128)?;
    let r = rows as u32;
    Ok(KernelLaunch {
        module: ATTN_DELTA_PTX,
        entry: format!("attn_delta_{sfx}"),
        grid: Dim3::new(blocks_for(u64::from(r), 8), 1, 1),
        block: Dim3::new(256, 1, 1),
        shared_bytes: 0,
        args: vec![
            Arg::Ptr(do_),
            Arg::Ptr(o),
            Arg::Ptr(delta),
            Arg::U32(r),
            Arg::U32(head_dim as u32),
        ],
    })
}

/// The flash-attention backward module (entries `attn_bwd_d64`,
/// `attn_bwd_d128`, `attn_bwd_d128_k128`).
pub const ATTN_BWD_PTX: &str = include_str!("../../kernels/attn_bwd.ptx");

/// Device addresses of one attention pair's backward tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnBwdPtrs {
    /// q `[q_tokens, heads, head_dim]`, bf16.
    pub q: u64,
    /// k `[kv_tokens, kv_heads, head_dim]`, bf16.
    pub k: u64,
    /// v `[kv_tokens, kv_heads, head_dim]`, bf16.
    pub v: u64,
    /// do `[q_tokens, heads, head_dim]`, bf16.
    pub do_: u64,
    /// Final lse `[q_tokens, heads]`, f32.
    pub lse: u64,
    /// delta `[q_tokens, heads]`, f32.
    pub delta: u64,
    /// dq `[q_tokens, heads, head_dim]`, f32 (accumulated).
    pub dq: u64,
    /// dk `[kv_tokens, kv_heads, head_dim]`, f32 (accumulated).
    pub dk: u64,
    /// dv `[kv_tokens, kv_heads, head_dim]`, f32 (accumulated).
    pub dv: u64,
}

/// Keys per CTA of [`attn_bwd_chunk`]'s kernel (see
/// [`attn_bwd_chunk_keys`]).
pub const ATTN_BWD_KEYS: usize = 64;

/// The backward of one attention pair (see `cpu::attn_bwd_chunk`): bf16
/// storage, head dims 64 and 128; accumulates dq, dk, dv (f32) with atomic
/// adds, so summation order (and the last bits) vary between runs.
pub fn attn_bwd_chunk(
    shape: &AttnShape,
    causal: bool,
    scale: f32,
    dtype: DType,
    p: &AttnBwdPtrs,
) -> Result<KernelLaunch> {
    attn_bwd_chunk_keys(shape, causal, scale, dtype, p, ATTN_BWD_KEYS)
}

/// [`attn_bwd_chunk`] with `keys` keys per CTA: 64 (4 warps), or 128 (8
/// warps, head dim 128 only). Each CTA adds its dq contribution once per
/// q tile, so 128 keys halve the dq atomics; 64 fit two CTAs per SM.
pub fn attn_bwd_chunk_keys(
    shape: &AttnShape,
    causal: bool,
    scale: f32,
    dtype: DType,
    p: &AttnBwdPtrs,
    keys: usize,
) -> Result<KernelLaunch> {
    const K: &str = "attn_bwd_chunk";
    shape.validate(K, causal)?;
    dtype_variant(K, dtype, &[DType::BF16])?;
    let d = shape.head_dim;
    let (entry, bq) = match (d, keys) {
        (64, 64) => ("attn_bwd_d64", 32usize),
        (128, 64) => ("attn_bwd_d128", 16usize),
        (128, 128) => ("attn_bwd_d128_k128", 16usize),
        (64 | 128, _) => {
            return Err(bad(
                K,
                "keys",
                format!(
                "{keys} keys per CTA has no kernel at head_dim {d} (64, or 128 at head_dim 128)"
            ),
            ))
        }
        _ => return Err(bad(K, "head_dim", format!("{d} has no kernel (64 or 128)"))),
    };
    if !scale.is_finite() {
        return Err(bad(K, "scale", format!("{scale} is not finite")));
    }
    for (arg, ptr) in [("q", p.q), ("k", p.k), ("v", p.v), ("do", p.do_)] {
        check_ptr(K, arg, ptr, 16)?;
    }
    for (arg, ptr) in [
        ("lse", p.lse),
        ("delta", p.delta),
        ("dq", p.dq),
        ("dk", p.dk),
        ("dv", p.dv),
    ] {
        check_ptr(K, arg, ptr, 4)?;
    }
    fits_u32(
        K,
        "q_tokens",
        (shape.q_tokens as u128 + keys as u128) * shape.heads as u128,
    )?;
    fits_u32(
        K,
        "kv_tokens",
        (shape.kv_tokens as u128 + keys as u128) * shape.kv_heads as u128,
    )?;
    let heads = u32::try_from(shape.heads)
        .ok()
        .filter(|&h| h <= 65_535)
        .ok_or_else(|| {
            bad(
                K,
                "heads",
                format!("{} exceeds the grid's y limit 65535", shape.heads),
            )
        })?;
    let kblocks = fits_u32(K, "kv_tokens", shape.kv_tokens.div_ceil(keys) as u128)?;
    let warps = keys / 16;
    let shared = 2 * keys * d * 2 + 2 * bq * d * 2 + warps * 16 * bq * 2;
    Ok(KernelLaunch {
        module: ATTN_BWD_PTX,
        entry: entry.to_string(),
        grid: Dim3::new(kblocks, heads, 1),
        block: Dim3::new(32 * warps as u32, 1, 1),
        shared_bytes: shared as u32,
        args: vec![
            Arg::Ptr(p.q),
            Arg::Ptr(p.k),
            Arg::Ptr(p.v),
            Arg::Ptr(p.do_),
            Arg::Ptr(p.lse),
            Arg::Ptr(p.delta),
            Arg::Ptr(p.dq),
            Arg::Ptr(p.dk),
            Arg::Ptr(p.dv),
            Arg::U32(shape.q_tokens as u32),
            Arg::U32(shape.kv_tokens as u32),
            Arg::U32(heads),
            Arg::U32(shape.kv_heads as u32),
            Arg::U32(u32::from(causal)),
            Arg::F32(scale),
        ],
    })
}
