//! Launchers: validate every argument (shapes, alignment, dtype, 32-bit
//! index ranges the PTX relies on) and build the [`KernelLaunch`](crate::KernelLaunch) that the
//! cuda backend or the PTX interpreter runs. Nothing is built on bad input.
//!
//! Device buffers are passed as `u64` device addresses. Each launcher names
//! the `.entry` it runs; variants (another head dim, a future `wgmma`
//! sm_90a path) are other entries chosen here, so callers do not change.

mod attention;
mod rowwise;

pub use attention::{
    attn_bwd_chunk, attn_bwd_chunk_keys, attn_delta, attn_fwd_chunk, lse_merge, AttnBwdPtrs,
    AttnPtrs, ATTN_BWD_KEYS, ATTN_BWD_PTX, ATTN_DELTA_PTX, ATTN_FWD_PTX, LSE_MERGE_PTX,
};
#[allow(unused_imports)]
pub use rowwise::*;

use crate::cpu::DType;
use crate::{PtxError, Result};

pub(crate) fn bad(kernel: &'static str, arg: &'static str, message: impl Into<String>) -> PtxError {
    PtxError::BadArgument {
        kernel,
        arg,
        message: message.into(),
    }
}

/// Checks that a device address is non-null and aligned to `align` bytes.
pub(crate) fn check_ptr(kernel: &'static str, arg: &'static str, p: u64, align: u64) -> Result<()> {
    if p == 0 {
        return Err(bad(kernel, arg, "is a null device address"));
    }
    if p % align != 0 {
        return Err(bad(
            kernel,
            arg,
            format!("address {p:#x} is not {align}-byte aligned"),
        ));
    }
    Ok(())
}

/// A count that the kernel indexes with 32-bit arithmetic.
pub(crate) fn fits_u32(kernel: &'static str, arg: &'static str, v: u128) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        bad(
            kernel,
            arg,
            format!("{v} does not fit the kernel's 32-bit indexing"),
        )
    })
}

/// The entry suffix of a dtype, checking that the kernel has that variant.
pub(crate) fn dtype_variant(
    kernel: &'static str,
    dtype: DType,
    allowed: &[DType],
) -> Result<&'static str> {
    if !allowed.contains(&dtype) {
        return Err(bad(
            kernel,
            "dtype",
            format!("{dtype:?} has no variant (have {allowed:?})"),
        ));
    }
    Ok(dtype.suffix())
}

/// Blocks of `threads` covering `n` items, capped for grid-stride loops.
pub(crate) fn blocks_for(n: u64, threads: u32) -> u32 {
    (n.div_ceil(u64::from(threads))).clamp(1, 65_535) as u32
}
