//! Matrix products on the cpu through the `gemm` crate (f32 micro-kernels;
//! bf16 operands are widened first), with transposes and a fused bias.

use super::{bad, mul, threads, widen, Element};
use crate::Result;

const K: &str = "matmul";

/// Whether an operand is used as stored or transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transpose {
    /// As stored (row-major).
    No,
    /// Transposed.
    Yes,
}

/// `C[m, n] = op(A)[m, k] * op(B)[k, n] (+ bias[n]) (+ C when accumulating)`.
///
/// All matrices are row-major and contiguous. `op(A)` is `A` stored `[m, k]`
/// (`trans_a == No`) or `[k, m]` (`Yes`); `op(B)` is `B` stored `[k, n]` or
/// `[n, k]`. A linear layer `y = x W^T + b` with `W: [out, in]` is
/// `m = tokens, k = in, n = out, trans_b = Yes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulSpec {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Transpose of A.
    pub trans_a: Transpose,
    /// Transpose of B.
    pub trans_b: Transpose,
    /// Add into C instead of overwriting it.
    pub accumulate: bool,
}

/// A checked, safe call of `gemm::gemm` for f32:
/// `dst[i*dst_rs + j] = (accumulate ? dst : 0) + alpha * sum_p a[i*a_rs + p*a_cs] * b[p*b_rs + j*b_cs]`
/// for `i < m, j < n, p < k`. Every index is checked against the slices
/// before the call; `parallel` lets gemm use its thread pool.
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    alpha: f32,
    parallel: bool,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| -> Option<usize> {
        (rows - 1)
            .checked_mul(rs)?
            .checked_add((cols - 1).checked_mul(cs)?)
    };
    let fits = |arg: &'static str, len: usize, l: Option<usize>| match l {
        Some(l) if l < len => Ok(()),
        _ => Err(bad(
            K,
            arg,
            format!("has {len} elements, too few for the strided view"),
        )),
    };
    fits("dst", dst.len(), last(m, dst_rs, n, 1))?;
    if dst_rs < n {
        return Err(bad(
            K,
            "dst_rs",
            format!("{dst_rs} is less than the {n} columns: rows overlap"),
        ));
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..][..n].fill(0.0);
            }
        }
        return Ok(());
    }
    fits("a", a.len(), last(m, a_rs, k, a_cs))?;
    fits("b", b.len(), last(k, b_rs, n, b_cs))?;
    let par = if parallel && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    };
    let isz = |x: usize| x as isize;
    // SAFETY: every element the views address was checked above to lie
    // inside its slice (last index < len, strides non-negative); `dst` is a
    // unique borrow, so it aliases neither `a` nor `b`, and rows of `dst` do
    // not overlap (dst_rs >= n). gemm reads `a`, `b` and (when accumulating)
    // `dst`, and writes only `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            isz(dst_rs),
            accumulate,
            a.as_ptr(),
            isz(a_cs),
            isz(a_rs),
            b.as_ptr(),
            isz(b_cs),
            isz(b_rs),
            1.0f32,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
    Ok(())
}

/// `C = op(A) op(B) (+ bias) (+ C)` with f32 accumulation, for f32 or bf16
/// operands and output (see [`MatmulSpec`]). `bias` has `n` elements.
pub fn matmul<E: Element, C: Element>(
    spec: &MatmulSpec,
    a: &[E],
    b: &[E],
    bias: Option<&[E]>,
    c: &mut [C],
) -> Result<()> {
    let MatmulSpec {
        m,
        n,
        k,
        trans_a,
        trans_b,
        accumulate,
    } = *spec;
    let mk = mul(K, "a", m, k)?;
    let kn = mul(K, "b", k, n)?;
    let mn = mul(K, "c", m, n)?;
    super::check_len(K, "a", a.len(), mk)?;
    super::check_len(K, "b", b.len(), kn)?;
    super::check_len(K, "c", c.len(), mn)?;
    if let Some(bias) = bias {
        super::check_len(K, "bias", bias.len(), n)?;
    }
    let (a_rs, a_cs) = if trans_a == Transpose::No {
        (k, 1)
    } else {
        (1, m)
    };
    let (b_rs, b_cs) = if trans_b == Transpose::No {
        (n, 1)
    } else {
        (1, k)
    };
    let (a, b) = (widen(a), widen(b));
    let compute = |out: &mut [f32]| -> Result<()> {
        gemm_f32(
            m, n, k, out, n, accumulate, &a, a_rs, a_cs, &b, b_rs, b_cs, 1.0, true,
        )?;
        if let Some(bias) = bias {
            let bias = widen(bias);
            for row in out.chunks_mut(n) {
                for (x, b) in row.iter_mut().zip(bias.iter()) {
                    *x += b;
                }
            }
        }
        Ok(())
    };
    if C::DTYPE == super::DType::F32 {
        if let Ok(out) = bytemuck::try_cast_slice_mut::<C, f32>(c) {
            return compute(out);
        }
    }
    let mut tmp: Vec<f32> = if accumulate {
        widen(c).into_owned()
    } else {
        vec![0.0; mn]
    };
    compute(&mut tmp)?;
    for (d, s) in c.iter_mut().zip(&tmp) {
        *d = C::from_f32(*s);
    }
    Ok(())
}
