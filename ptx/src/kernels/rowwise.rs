//! Launchers of the row-wise and element-wise kernels. Element-wise kernels
//! run one thread per element (grid-stride, 256 threads a block); row-wise
//! ones one warp per row (8 rows a block).

use super::{bad, blocks_for, check_ptr, dtype_variant, fits_u32};
use crate::cpu::DType;
use crate::launch::{Arg, Dim3, KernelLaunch};
use crate::Result;

/// `residual_add_{bf16,f32}`.
pub const RESIDUAL_ADD_PTX: &str = include_str!("../../kernels/residual_add.ptx");
/// `cast_f32_bf16`, `cast_bf16_f32`.
pub const CAST_PTX: &str = include_str!("../../kernels/cast.ptx");
/// `fill_{bf16,f32}`.
pub const FILL_PTX: &str = include_str!("../../kernels/fill.ptx");
/// `swiglu_{fwd,bwd}_{bf16,f32}`.
pub const SWIGLU_PTX: &str = include_str!("../../kernels/swiglu.ptx");
/// `gelu_tanh_{fwd,bwd}_{bf16,f32}`.
pub const GELU_TANH_PTX: &str = include_str!("../../kernels/gelu_tanh.ptx");
/// `rms_norm_{fwd,bwd}_{bf16,f32}`.
pub const RMS_NORM_PTX: &str = include_str!("../../kernels/rms_norm.ptx");
/// `layer_norm_{fwd,bwd}_{bf16,f32}`.
pub const LAYER_NORM_PTX: &str = include_str!("../../kernels/layer_norm.ptx");
/// `softmax_xent_f32` (whole-vocabulary rows) and the vocabulary-chunked
/// `softmax_xent_{stats,grad,finish}_f32`.
pub const SOFTMAX_XENT_PTX: &str = include_str!("../../kernels/softmax_xent.ptx");
/// `embedding_{fwd,bwd}_{bf16,f32}`.
pub const EMBEDDING_PTX: &str = include_str!("../../kernels/embedding.ptx");
/// `adamw_{bf16,f32}` (grad dtype).
pub const ADAMW_PTX: &str = include_str!("../../kernels/adamw.ptx");
/// `sq_norm_{bf16,f32}`.
pub const SQ_NORM_PTX: &str = include_str!("../../kernels/sq_norm.ptx");
/// `ulysses_{pack,unpack}_{bf16,f32}`.
pub const ULYSSES_PTX: &str = include_str!("../../kernels/ulysses.ptx");
/// `rope_{fwd,bwd}_{bf16,f32}`.
pub const ROPE_PTX: &str = include_str!("../../kernels/rope.ptx");

const BOTH: &[DType] = &[DType::BF16, DType::F32];

fn ptrs(kernel: &'static str, list: &[(&'static str, u64, u64)]) -> Result<Vec<Arg>> {
    list.iter()
        .map(|&(arg, p, align)| check_ptr(kernel, arg, p, align).map(|()| Arg::Ptr(p)))
        .collect()
}

fn elementwise(
    module: &'static str,
    entry: String,
    n: u32,
    mut args: Vec<Arg>,
    tail: &[Arg],
) -> KernelLaunch {
    args.push(Arg::U32(n));
    args.extend_from_slice(tail);
    KernelLaunch {
        module,
        entry,
        grid: Dim3::new(blocks_for(u64::from(n), 256), 1, 1),
        block: Dim3::new(256, 1, 1),
        shared_bytes: 0,
        args,
    }
}

fn rows_launch(
    module: &'static str,
    entry: String,
    rows: u32,
    mut args: Vec<Arg>,
    tail: &[Arg],
) -> KernelLaunch {
    args.push(Arg::U32(rows));
    args.extend_from_slice(tail);
    KernelLaunch {
        module,
        entry,
        grid: Dim3::new(blocks_for(u64::from(rows), 8), 1, 1),
        block: Dim3::new(256, 1, 1),
        shared_bytes: 0,
        args,
    }
}

fn count(kernel: &'static str, arg: &'static str, n: usize) -> Result<u32> {
    fits_u32(kernel, arg, n as u128)
}

fn rows_dim(kernel: &'static str, rows: usize, dim: usize) -> Result<(u32, u32)> {
    if dim == 0 {
        return Err(bad(kernel, "dim", "is 0, must be at least 1"));
    }
    fits_u32(kernel, "rows", rows as u128 * dim as u128)?;
    Ok((rows as u32, dim as u32))
}

/// An element-wise kernel whose every pointer holds `n` elements of one
/// `dtype`: entry `{kernel}_{dtype}`, pointers checked in order.
fn same_dtype_elementwise(
    kernel: &'static str,
    module: &'static str,
    n: usize,
    dtype: DType,
    list: &[(&'static str, u64)],
) -> Result<KernelLaunch> {
    let s = dtype_variant(kernel, dtype, BOTH)?;
    let z = dtype.size() as u64;
    let checked: Vec<_> = list.iter().map(|&(name, p)| (name, p, z)).collect();
    let args = ptrs(kernel, &checked)?;
    Ok(elementwise(
        module,
        format!("{kernel}_{s}"),
        count(kernel, "n", n)?,
        args,
        &[],
    ))
}

/// `out = a + b` over `n` elements of `dtype`.
pub fn residual_add(n: usize, dtype: DType, out: u64, a: u64, b: u64) -> Result<KernelLaunch> {
    same_dtype_elementwise(
        "residual_add",
        RESIDUAL_ADD_PTX,
        n,
        dtype,
        &[("out", out), ("a", a), ("b", b)],
    )
}

/// Cast `n` elements `from` -> `to` (f32 <-> bf16).
pub fn cast(n: usize, from: DType, to: DType, dst: u64, src: u64) -> Result<KernelLaunch> {
    const K: &str = "cast";
    if from == to {
        return Err(bad(
            K,
            "to",
            format!("{to:?} equals the source dtype: nothing to cast"),
        ));
    }
    let args = ptrs(
        K,
        &[
            ("dst", dst, to.size() as u64),
            ("src", src, from.size() as u64),
        ],
    )?;
    Ok(elementwise(
        CAST_PTX,
        format!("cast_{}_{}", from.suffix(), to.suffix()),
        count(K, "n", n)?,
        args,
        &[],
    ))
}

/// `out[i] = value` over `n` elements of `dtype` (bf16: `value` rounded to
/// nearest even).
pub fn fill(n: usize, dtype: DType, out: u64, value: f32) -> Result<KernelLaunch> {
    const K: &str = "fill";
    let s = dtype_variant(K, dtype, BOTH)?;
    let args = ptrs(K, &[("out", out, dtype.size() as u64)])?;
    Ok(elementwise(
        FILL_PTX,
        format!("fill_{s}"),
        count(K, "n", n)?,
        args,
        &[Arg::F32(value)],
    ))
}

/// SwiGLU forward `out = silu(gate) * up`.
pub fn swiglu_fwd(n: usize, dtype: DType, out: u64, gate: u64, up: u64) -> Result<KernelLaunch> {
    same_dtype_elementwise(
        "swiglu_fwd",
        SWIGLU_PTX,
        n,
        dtype,
        &[("out", out), ("gate", gate), ("up", up)],
    )
}

/// SwiGLU backward into `dgate`, `dup`.
pub fn swiglu_bwd(
    n: usize,
    dtype: DType,
    dgate: u64,
    dup: u64,
    gate: u64,
    up: u64,
    dout: u64,
) -> Result<KernelLaunch> {
    same_dtype_elementwise(
        "swiglu_bwd",
        SWIGLU_PTX,
        n,
        dtype,
        &[
            ("dgate", dgate),
            ("dup", dup),
            ("gate", gate),
            ("up", up),
            ("dout", dout),
        ],
    )
}

/// GeLU (tanh) forward `y = gelu(x)`.
pub fn gelu_tanh_fwd(n: usize, dtype: DType, y: u64, x: u64) -> Result<KernelLaunch> {
    same_dtype_elementwise(
        "gelu_tanh_fwd",
        GELU_TANH_PTX,
        n,
        dtype,
        &[("y", y), ("x", x)],
    )
}

/// GeLU (tanh) backward `dx = dy * gelu'(x)`.
pub fn gelu_tanh_bwd(n: usize, dtype: DType, dx: u64, x: u64, dy: u64) -> Result<KernelLaunch> {
    same_dtype_elementwise(
        "gelu_tanh_bwd",
        GELU_TANH_PTX,
        n,
        dtype,
        &[("dx", dx), ("x", x), ("dy", dy)],
    )
}

/// RMSNorm forward over `rows` rows of `dim`: y (dtype), rstd (f32).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_fwd(
    rows: usize,
    dim: usize,
    eps: f32,
    dtype: DType,
    y: u64,
    rstd: u64,
    x: u64,
    gamma: u64,
) -> Result<KernelLaunch> {
    const K: &str = "rms_norm_fwd";
    let s = dtype_variant(K, dtype, BOTH)?;
    let (r, d) = rows_dim(K, rows, dim)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(bad(K, "eps", format!("{eps} must be finite and >= 0")));
    }
    let z = dtype.size() as u64;
    let args = ptrs(
        K,
        &[
            ("y", y, z),
            ("rstd", rstd, 4),
            ("x", x, z),
            ("gamma", gamma, z),
        ],
    )?;
    Ok(rows_launch(
        RMS_NORM_PTX,
        format!("rms_norm_fwd_{s}"),
        r,
        args,
        &[Arg::U32(d), Arg::F32(eps)],
    ))
}

/// RMSNorm backward: dx (dtype) and `dgamma += ...` (f32, atomic adds).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_bwd(
    rows: usize,
    dim: usize,
    dtype: DType,
    dx: u64,
    dgamma: u64,
    x: u64,
    gamma: u64,
    dy: u64,
    rstd: u64,
) -> Result<KernelLaunch> {
    const K: &str = "rms_norm_bwd";
    let s = dtype_variant(K, dtype, BOTH)?;
    let (r, d) = rows_dim(K, rows, dim)?;
    let z = dtype.size() as u64;
    let args = ptrs(
        K,
        &[
            ("dx", dx, z),
            ("dgamma", dgamma, 4),
            ("x", x, z),
            ("gamma", gamma, z),
            ("dy", dy, z),
            ("rstd", rstd, 4),
        ],
    )?;
    Ok(rows_launch(
        RMS_NORM_PTX,
        format!("rms_norm_bwd_{s}"),
        r,
        args,
        &[Arg::U32(d)],
    ))
}

/// LayerNorm forward: y (dtype), mean and rstd (f32).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_fwd(
    rows: usize,
    dim: usize,
    eps: f32,
    dtype: DType,
    y: u64,
    mean: u64,
    rstd: u64,
    x: u64,
    gamma: u64,
    beta: u64,
) -> Result<KernelLaunch> {
    const K: &str = "layer_norm_fwd";
    let s = dtype_variant(K, dtype, BOTH)?;
    let (r, d) = rows_dim(K, rows, dim)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(bad(K, "eps", format!("{eps} must be finite and >= 0")));
    }
    let z = dtype.size() as u64;
    let args = ptrs(
        K,
        &[
            ("y", y, z),
            ("mean", mean, 4),
            ("rstd", rstd, 4),
            ("x", x, z),
            ("gamma", gamma, z),
            ("beta", beta, z),
        ],
    )?;
    Ok(rows_launch(
        LAYER_NORM_PTX,
        format!("layer_norm_fwd_{s}"),
        r,
        args,
        &[Arg::U32(d), Arg::F32(eps)],
    ))
}

/// LayerNorm backward from the saved mean and rstd: dx (dtype), and
/// `dgamma += sum dy * xhat`, `dbeta += sum dy` (f32, atomic adds; zero them
/// first for a fresh gradient).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_bwd(
    rows: usize,
    dim: usize,
    dtype: DType,
    dx: u64,
    dgamma: u64,
    dbeta: u64,
    x: u64,
    gamma: u64,
    dy: u64,
    mean: u64,
    rstd: u64,
) -> Result<KernelLaunch> {
    const K: &str = "layer_norm_bwd";
    let s = dtype_variant(K, dtype, BOTH)?;
    let (r, d) = rows_dim(K, rows, dim)?;
    let z = dtype.size() as u64;
    let args = ptrs(
        K,
        &[
            ("dx", dx, z),
            ("dgamma", dgamma, 4),
            ("dbeta", dbeta, 4),
            ("x", x, z),
            ("gamma", gamma, z),
            ("dy", dy, z),
            ("mean", mean, 4),
            ("rstd", rstd, 4),
        ],
    )?;
    Ok(rows_launch(
        LAYER_NORM_PTX,
        format!("layer_norm_bwd_{s}"),
        r,
        args,
        &[Arg::U32(d)],
    ))
}

fn check_grad_scale(kernel: &'static str, grad_scale: f32) -> Result<()> {
    if !grad_scale.is_finite() {
        return Err(bad(
            kernel,
            "grad_scale",
            format!("{grad_scale} must be finite"),
        ));
    }
    Ok(())
}

/// Shape checks of one vocabulary chunk: `rows * vocab_chunk` fits the
/// kernel's 32-bit indexing and the chunk's columns
/// `vocab_offset..vocab_offset + vocab_chunk` are valid i32 labels.
fn vocab_chunk(
    kernel: &'static str,
    rows: usize,
    vocab_chunk: usize,
    vocab_offset: usize,
) -> Result<(u32, u32, u32)> {
    if vocab_chunk == 0 {
        return Err(bad(kernel, "vocab_chunk", "is 0, must be at least 1"));
    }
    let (r, w) = rows_dim(kernel, rows, vocab_chunk)?;
    let end = vocab_offset as u128 + vocab_chunk as u128;
    if end > i32::MAX as u128 {
        return Err(bad(
            kernel,
            "vocab_offset",
            format!(
                "{vocab_offset} + vocab_chunk {vocab_chunk} exceeds the i32 label range {}",
                i32::MAX
            ),
        ));
    }
    Ok((r, w, vocab_offset as u32))
}

/// Folds one vocabulary chunk `logits: [rows, vocab_chunk]` (f32, columns
/// `vocab_offset..vocab_offset + vocab_chunk` of the vocabulary) into the
/// running per-row `stats` (`[rows]` of [`crate::cpu::CeStats`]: max, sum,
/// target as three f32; start from [`crate::cpu::CeStats::EMPTY`]). Rows
/// whose label is `ignore_index` keep their stats. The twin is
/// [`crate::cpu::ce_chunk_stats`].
#[allow(clippy::too_many_arguments)]
pub fn ce_chunk_stats(
    rows: usize,
    vocab_chunk: usize,
    vocab_offset: usize,
    ignore_index: i32,
    stats: u64,
    logits: u64,
    labels: u64,
) -> Result<KernelLaunch> {
    const K: &str = "ce_chunk_stats";
    let (r, w, off) = self::vocab_chunk(K, rows, vocab_chunk, vocab_offset)?;
    let args = ptrs(
        K,
        &[
            ("stats", stats, 4),
            ("logits", logits, 4),
            ("labels", labels, 4),
        ],
    )?;
    Ok(rows_launch(
        SOFTMAX_XENT_PTX,
        "softmax_xent_stats_f32".to_string(),
        r,
        args,
        &[Arg::U32(w), Arg::U32(off), Arg::U32(ignore_index as u32)],
    ))
}

/// Per-row losses `lse - target` from the final `stats` (0 for ignored
/// rows). The twin is [`crate::cpu::ce_finish`].
pub fn ce_finish(
    rows: usize,
    ignore_index: i32,
    loss: u64,
    stats: u64,
    labels: u64,
) -> Result<KernelLaunch> {
    const K: &str = "ce_finish";
    let n = count(K, "rows", rows)?;
    let args = ptrs(
        K,
        &[
            ("loss", loss, 4),
            ("stats", stats, 4),
            ("labels", labels, 4),
        ],
    )?;
    Ok(elementwise(
        SOFTMAX_XENT_PTX,
        "softmax_xent_finish_f32".to_string(),
        n,
        args,
        &[Arg::U32(ignore_index as u32)],
    ))
}

/// dlogits of one vocabulary chunk from the *final* `stats`:
/// `grad_scale * (softmax - onehot(label))`, 0 for ignored rows. The twin is
/// [`crate::cpu::ce_chunk_grad`].
#[allow(clippy::too_many_arguments)]
pub fn ce_chunk_grad(
    rows: usize,
    vocab_chunk: usize,
    vocab_offset: usize,
    ignore_index: i32,
    grad_scale: f32,
    dlogits: u64,
    logits: u64,
    labels: u64,
    stats: u64,
) -> Result<KernelLaunch> {
    const K: &str = "ce_chunk_grad";
    let (r, w, off) = self::vocab_chunk(K, rows, vocab_chunk, vocab_offset)?;
    check_grad_scale(K, grad_scale)?;
    let args = ptrs(
        K,
        &[
            ("dlogits", dlogits, 4),
            ("logits", logits, 4),
            ("labels", labels, 4),
            ("stats", stats, 4),
        ],
    )?;
    Ok(rows_launch(
        SOFTMAX_XENT_PTX,
        "softmax_xent_grad_f32".to_string(),
        r,
        args,
        &[
            Arg::U32(w),
            Arg::U32(off),
            Arg::U32(ignore_index as u32),
            Arg::F32(grad_scale),
        ],
    ))
}

/// Fused softmax cross-entropy over full-vocabulary f32 rows: per-row loss,
/// per-row argmax hit (1.0 when the row's first maximum is its label, else
/// 0.0; the twin is [`crate::cpu::argmax_hits`]) and the gradient
/// `dlogits = grad_scale * (softmax - onehot)`. Labels are i32 with
/// `ignore_index` (ignored rows: loss, hit and dlogits 0); negative indices
/// other than it are the caller's bug: labels live on the device and cannot
/// be checked here.
#[allow(clippy::too_many_arguments)]
pub fn softmax_cross_entropy(
    rows: usize,
    vocab: usize,
    ignore_index: i32,
    grad_scale: f32,
    loss: u64,
    hits: u64,
    dlogits: u64,
    logits: u64,
    labels: u64,
) -> Result<KernelLaunch> {
    const K: &str = "softmax_cross_entropy";
    let (r, v) = rows_dim(K, rows, vocab)?;
    check_grad_scale(K, grad_scale)?;
    let args = ptrs(
        K,
        &[
            ("loss", loss, 4),
            ("hits", hits, 4),
            ("dlogits", dlogits, 4),
            ("logits", logits, 4),
            ("labels", labels, 4),
        ],
    )?;
    Ok(rows_launch(
        SOFTMAX_XENT_PTX,
        "softmax_xent_f32".to_string(),
        r,
        args,
        &[
            Arg::U32(v),
            Arg::U32(ignore_index as u32),
            Arg::F32(grad_scale),
        ],
    ))
}

/// `acc[0] += scale * sum(loss[..n])` and `acc[1] += sum(hits[..n])` (f32):
/// the step's loss and accuracy accumulators, on the device. One warp, so
/// the sum's order (and the reported loss's bits) is the same every run.
pub fn softmax_xent_sums(
    n: usize,
    scale: f32,
    acc: u64,
    loss: u64,
    hits: u64,
) -> Result<KernelLaunch> {
    const K: &str = "softmax_xent_sums";
    let n = count(K, "n", n)?;
    check_grad_scale(K, scale)?;
    let mut args = ptrs(K, &[("acc", acc, 4), ("loss", loss, 4), ("hits", hits, 4)])?;
    args.push(Arg::U32(n));
    args.push(Arg::F32(scale));
    Ok(KernelLaunch {
        module: SOFTMAX_XENT_PTX,
        entry: "softmax_xent_sums_f32".to_string(),
        grid: Dim3::new(1, 1, 1),
        block: Dim3::new(32, 1, 1),
        shared_bytes: 0,
        args,
    })
}

/// Embedding lookup of `tokens` ids into rows of `dim` (an id >= vocab traps).
#[allow(clippy::too_many_arguments)]
pub fn embedding_fwd(
    tokens: usize,
    dim: usize,
    vocab: usize,
    dtype: DType,
    out: u64,
    table: u64,
    ids: u64,
) -> Result<KernelLaunch> {
    const K: &str = "embedding_fwd";
    let s = dtype_variant(K, dtype, BOTH)?;
    let (_, d) = rows_dim(K, tokens, dim)?;
    fits_u32(K, "vocab", vocab as u128 * dim as u128)?;
    let z = dtype.size() as u64;
    let args = ptrs(K, &[("out", out, z), ("table", table, z), ("ids", ids, 4)])?;
    Ok(elementwise(
        EMBEDDING_PTX,
        format!("embedding_fwd_{s}"),
        (tokens * dim) as u32,
        args,
        &[Arg::U32(d), Arg::U32(vocab as u32)],
    ))
}

/// Embedding backward: `dtable[ids[t]] += dout[t]` (f32 table gradient).
#[allow(clippy::too_many_arguments)]
pub fn embedding_bwd(
    tokens: usize,
    dim: usize,
    vocab: usize,
    dtype: DType,
    dtable: u64,
    dout: u64,
    ids: u64,
) -> Result<KernelLaunch> {
    const K: &str = "embedding_bwd";
    let s = dtype_variant(K, dtype, BOTH)?;
    let (_, d) = rows_dim(K, tokens, dim)?;
    fits_u32(K, "vocab", vocab as u128 * dim as u128)?;
    let args = ptrs(
        K,
        &[
            ("dtable", dtable, 4),
            ("dout", dout, dtype.size() as u64),
            ("ids", ids, 4),
        ],
    )?;
    Ok(elementwise(
        EMBEDDING_PTX,
        format!("embedding_bwd_{s}"),
        (tokens * dim) as u32,
        args,
        &[Arg::U32(d), Arg::U32(vocab as u32)],
    ))
}

/// One AdamW step (see `cpu::adamw_step`) on `n` parameters: f32 master,
/// m, v; bf16 working copy; gradient of `grad_dtype`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    cfg: &crate::cpu::AdamW,
    step: u32,
    grad_scale: f32,
    n: usize,
    grad_dtype: DType,
    master: u64,
    m: u64,
    v: u64,
    working: u64,
    grad: u64,
) -> Result<KernelLaunch> {
    const K: &str = "adamw_step";
    let s = dtype_variant(K, grad_dtype, BOTH)?;
    if step == 0 {
        return Err(bad(K, "step", "is 0; steps count from 1"));
    }
    for (arg, b) in [("beta1", cfg.beta1), ("beta2", cfg.beta2)] {
        if !(0.0..1.0).contains(&b) {
            return Err(bad(K, arg, format!("{b} is outside [0, 1)")));
        }
    }
    let args = ptrs(
        K,
        &[
            ("master", master, 4),
            ("m", m, 4),
            ("v", v, 4),
            ("working", working, 2),
            ("grad", grad, grad_dtype.size() as u64),
        ],
    )?;
    let bc1 = 1.0 - f64::from(cfg.beta1).powi(step as i32);
    let bc2 = 1.0 - f64::from(cfg.beta2).powi(step as i32);
    let tail = [
        Arg::F32(cfg.beta1),
        Arg::F32(cfg.beta2),
        Arg::F32(cfg.eps),
        Arg::F32(1.0 - cfg.lr * cfg.weight_decay),
        Arg::F32((f64::from(cfg.lr) / bc1) as f32),
        Arg::F32(bc2.sqrt() as f32),
        Arg::F32(grad_scale),
    ];
    Ok(elementwise(
        ADAMW_PTX,
        format!("adamw_{s}"),
        count(K, "n", n)?,
        args,
        &tail,
    ))
}

/// `out[0] += sum x^2` over `n` elements (zero `out` first).
pub fn sq_norm(n: usize, dtype: DType, out: u64, x: u64) -> Result<KernelLaunch> {
    const K: &str = "sq_norm";
    let s = dtype_variant(K, dtype, BOTH)?;
    let args = ptrs(K, &[("out", out, 4), ("x", x, dtype.size() as u64)])?;
    let mut l = elementwise(
        SQ_NORM_PTX,
        format!("sq_norm_{s}"),
        count(K, "n", n)?,
        args,
        &[],
    );
    l.grid = Dim3::new(blocks_for(n as u64, 256).min(1024), 1, 1);
    Ok(l)
}

#[allow(clippy::too_many_arguments)]
fn ulysses(
    kernel: &'static str,
    entry: &str,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    ranks: usize,
    dtype: DType,
    out: u64,
    src: u64,
) -> Result<KernelLaunch> {
    let s = dtype_variant(kernel, dtype, BOTH)?;
    if ranks == 0 || heads == 0 || heads % ranks != 0 {
        return Err(bad(
            kernel,
            "heads",
            format!("{heads} is not a non-zero multiple of ranks = {ranks}"),
        ));
    }
    if head_dim == 0 || tokens == 0 {
        return Err(bad(
            kernel,
            if head_dim == 0 { "head_dim" } else { "tokens" },
            "is 0, must be at least 1",
        ));
    }
    let n = fits_u32(
        kernel,
        "tokens",
        tokens as u128 * heads as u128 * head_dim as u128,
    )?;
    let z = dtype.size() as u64;
    let args = ptrs(kernel, &[("out", out, z), ("src", src, z)])?;
    Ok(elementwise(
        ULYSSES_PTX,
        format!("{entry}_{s}"),
        n,
        args,
        &[
            Arg::U32(tokens as u32),
            Arg::U32(head_dim as u32),
            Arg::U32((heads / ranks) as u32),
            Arg::U32(ranks as u32),
        ],
    ))
}

/// Ulysses pack `[tokens, heads, d]` -> `[ranks][tokens, heads/ranks, d]`.
#[allow(clippy::too_many_arguments)]
pub fn ulysses_pack(
    tokens: usize,
    heads: usize,
    head_dim: usize,
    ranks: usize,
    dtype: DType,
    out: u64,
    local: u64,
) -> Result<KernelLaunch> {
    ulysses(
        "ulysses_pack",
        "ulysses_pack",
        tokens,
        heads,
        head_dim,
        ranks,
        dtype,
        out,
        local,
    )
}

/// Ulysses unpack, the inverse of [`ulysses_pack`].
#[allow(clippy::too_many_arguments)]
pub fn ulysses_unpack(
    tokens: usize,
    heads: usize,
    head_dim: usize,
    ranks: usize,
    dtype: DType,
    out: u64,
    groups: u64,
) -> Result<KernelLaunch> {
    ulysses(
        "ulysses_unpack",
        "ulysses_unpack",
        tokens,
        heads,
        head_dim,
        ranks,
        dtype,
        out,
        groups,
    )
}

/// RoPE (rotate-half) forward or, `inverse`, backward on `[tokens, heads,
/// head_dim]` at `positions` (u32 device array of `tokens`).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    tokens: usize,
    heads: usize,
    head_dim: usize,
    theta: f32,
    inverse: bool,
    dtype: DType,
    y: u64,
    x: u64,
    positions: u64,
) -> Result<KernelLaunch> {
    const K: &str = "rope";
    let s = dtype_variant(K, dtype, BOTH)?;
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(bad(
            K,
            "head_dim",
            format!("{head_dim} must be even and non-zero"),
        ));
    }
    if heads == 0 {
        return Err(bad(K, "heads", "is 0, must be at least 1"));
    }
    if !(theta.is_finite() && theta > 1.0) {
        return Err(bad(K, "theta", format!("{theta} must be finite and > 1")));
    }
    let n = fits_u32(
        K,
        "tokens",
        tokens as u128 * heads as u128 * head_dim as u128,
    )? / 2;
    let z = dtype.size() as u64;
    let mut args = ptrs(K, &[("y", y, z), ("x", x, z), ("positions", positions, 4)])?;
    let ratio = f64::from(theta).powf(-2.0 / head_dim as f64);
    args.push(Arg::U32(n));
    args.push(Arg::U32(heads as u32));
    args.push(Arg::U32(head_dim as u32));
    args.push(Arg::U64(ratio.to_bits()));
    let dir = if inverse { "bwd" } else { "fwd" };
    Ok(KernelLaunch {
        module: ROPE_PTX,
        entry: format!("rope_{dir}_{s}"),
        grid: Dim3::new(blocks_for(u64::from(n), 256), 1, 1),
        block: Dim3::new(256, 1, 1),
        shared_bytes: 0,
        args,
    })
}
