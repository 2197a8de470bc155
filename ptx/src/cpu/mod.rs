//! CPU twins of the kernels: the cpu backend's implementation. Fast where it
//! matters (blocked attention over the `gemm` crate's micro-kernels,
//! multi-threaded with `std::thread::scope`), safe Rust throughout except the
//! one checked wrapper around `gemm::gemm` in [`matmul`].
//!
//! Every function validates its slice lengths and shapes and returns
//! [`PtxError::BadArgument`] naming the argument; nothing panics on bad input.

mod attention;
mod element;
mod loss;
mod matmul;
mod optim;
mod permute;
mod rowwise;

pub use attention::{attn_bwd_chunk, attn_delta, attn_fwd_chunk, lse_merge, AttnShape};
pub use element::{widen, DType, Element};
pub use loss::{
    argmax_hits, ce_chunk_grad, ce_chunk_stats, ce_finish, softmax_cross_entropy, CeStats,
};
pub use matmul::{gemm_f32, matmul, MatmulSpec, Transpose};
pub use optim::{adamw_step, sq_norm, AdamW};
pub use permute::{cast, narrow_bytes, ulysses_pack, ulysses_unpack, widen_bytes};
pub use rowwise::{
    embedding_bwd, embedding_fwd, gelu_tanh_bwd, gelu_tanh_fwd, layer_norm_bwd, layer_norm_fwd,
    residual_add, rms_norm_bwd, rms_norm_fwd, rope_bwd, rope_fwd, swiglu_bwd, swiglu_fwd,
};

use crate::{PtxError, Result};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The error for a bad argument of `kernel`.
pub(crate) fn bad(kernel: &'static str, arg: &'static str, message: impl Into<String>) -> PtxError {
    PtxError::BadArgument {
        kernel,
        arg,
        message: message.into(),
    }
}

/// Checks that a slice has exactly `want` elements.
pub(crate) fn check_len(
    kernel: &'static str,
    arg: &'static str,
    got: usize,
    want: usize,
) -> Result<()> {
    if got != want {
        return Err(bad(
            kernel,
            arg,
            format!("has {got} elements, the shape needs {want}"),
        ));
    }
    Ok(())
}

/// `a * b`, or an error naming `arg` when it overflows.
pub(crate) fn mul(kernel: &'static str, arg: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| bad(kernel, arg, format!("size {a} x {b} overflows usize")))
}

/// Worker threads for the twins: the machine's parallelism, asked once
/// (`available_parallelism` reads the cgroup files on every call, which cost
/// thousands of syscalls per training step when asked per op).
pub(crate) fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
}

/// Runs `f(0..tasks)` on a pool of scoped threads pulling from a shared
/// counter; returns the results in task order.
pub(crate) fn par_map<T: Send>(tasks: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let n = threads().min(tasks);
    if n <= 1 {
        return (0..tasks).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut all: Vec<(usize, T)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let t = next.fetch_add(1, Ordering::Relaxed);
                        if t >= tasks {
                            break;
                        }
                        mine.push((t, f(t)));
                    }
                    mine
                })
            })
            .collect();
        // A worker can only fail by panicking inside `f`; re-raise it here.
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    all.sort_by_key(|(t, _)| *t);
    all.into_iter().map(|(_, v)| v).collect()
}

/// Splits `rows` rows into at most `threads()` contiguous ranges of at
/// least `min_rows` rows (at least one range, possibly empty).
pub(crate) fn row_ranges(rows: usize, min_rows: usize) -> Vec<std::ops::Range<usize>> {
    let parts = threads().min(rows / min_rows.max(1)).max(1);
    let per = rows.div_ceil(parts);
    (0..parts)
        .map(|p| (p * per).min(rows)..((p + 1) * per).min(rows))
        .collect()
}

/// Splits `data` (rows of `width`) along `ranges` of rows.
pub(crate) fn split_rows<'a, T>(
    mut data: &'a mut [T],
    width: usize,
    ranges: &[std::ops::Range<usize>],
) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let take = ((r.end - r.start) * width).min(data.len());
        let (a, b) = data.split_at_mut(take);
        out.push(a);
        data = b;
    }
    out
}

/// Runs `f(range, parts...)` on each row range in parallel, each with its
/// own rows of the mutable outputs.
pub(crate) fn par_rows<T: Send>(
    ranges: &[std::ops::Range<usize>],
    parts: Vec<T>,
    f: impl Fn(std::ops::Range<usize>, T) + Sync,
) {
    if ranges.len() <= 1 {
        for (r, p) in ranges.iter().cloned().zip(parts) {
            f(r, p);
        }
        return;
    }
    std::thread::scope(|s| {
        for (r, p) in ranges.iter().cloned().zip(parts) {
            let f = &f;
            s.spawn(move || f(r, p));
        }
    });
}

/// `exp(x)` for f32 in a branch-free form the compiler vectorizes:
/// Cody-Waite reduction to `r` in `[-ln2/2, ln2/2]`, a degree-7 Taylor
/// polynomial (relative error about 1e-7), exponent by bit assembly.
/// `x < -87` (including `-inf`) gives 0.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: rounds to nearest
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + MAGIC) - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}
