//! Element types and reduction operators of the collectives, and the plain
//! Rust reductions the in-process group runs.

use half::{bf16, f16};

use crate::error::{CommError, Result};

/// Element type of a reduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
    /// bfloat16 (reduced in f32, rounded once to bf16 at the end).
    Bf16,
    /// IEEE binary16 (reduced in f32, rounded once to f16 at the end).
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::Bf16 | DType::F16 => 2,
        }
    }

    /// "f32", "f64", "bf16" or "f16".
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reduction operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum over ranks.
    Sum,
    /// Mean over ranks (the sum divided by the world size).
    Avg,
    /// Element-wise maximum.
    Max,
    /// Element-wise minimum.
    Min,
}

impl ReduceOp {
    /// "sum", "avg", "max" or "min".
    pub fn as_str(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        }
    }
}

impl std::fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reduces `srcs` (one byte slice per rank, in rank order, all of
/// `out.len()` bytes) element-wise into `out`.
///
/// The order is fixed: `((x0 op x1) op x2) ...` in rank order, in f32 for
/// f32/bf16/f16 and f64 for f64, rounded once to the storage type; `Avg`
/// divides the sum by the number of sources. Every rank of a group that
/// reduces the same inputs gets bit-identical results.
pub fn reduce_into(dtype: DType, op: ReduceOp, srcs: &[&[u8]], out: &mut [u8]) -> Result<()> {
    if srcs.is_empty() {
        return Err(CommError::Invalid("reduce: no sources".into()));
    }
    if out.len() % dtype.size() != 0 {
        return Err(CommError::Invalid(format!(
            "reduce: {} bytes is not a whole number of {dtype} elements",
            out.len()
        )));
    }
    if let Some((i, s)) = srcs.iter().enumerate().find(|(_, s)| s.len() != out.len()) {
        return Err(CommError::Invalid(format!(
            "reduce: source {i} has {} bytes, the output {}",
            s.len(),
            out.len()
        )));
    }
    if dtype == DType::F32 && reduce_f32_aligned(op, srcs, out) {
        return Ok(());
    }
    match dtype {
        DType::F32 => {
            reduce_typed::<4, f32>(op, srcs, out, f32::from_le_bytes, |x| x.to_le_bytes())
        }
        DType::F64 => {
            reduce_typed::<8, f64>(op, srcs, out, f64::from_le_bytes, |x| x.to_le_bytes())
        }
        DType::Bf16 => reduce_typed::<2, f32>(
            op,
            srcs,
            out,
            |b| bf16::from_le_bytes(b).to_f32(),
            |x| bf16::from_f32(x).to_le_bytes(),
        ),
        DType::F16 => reduce_typed::<2, f32>(
            op,
            srcs,
            out,
            |b| f16::from_le_bytes(b).to_f32(),
            |x| f16::from_f32(x).to_le_bytes(),
        ),
    }
    Ok(())
}

/// The f32 path where every slice is 4-byte aligned (the usual case): plain
/// slices the compiler vectorizes, same order and NaN rules as
/// [`reduce_typed`]. False (nothing written) where a slice is misaligned.
fn reduce_f32_aligned(op: ReduceOp, srcs: &[&[u8]], out: &mut [u8]) -> bool {
    let Ok(o) = bytemuck::try_cast_slice_mut::<u8, f32>(out) else {
        return false;
    };
    let mut typed = Vec::with_capacity(srcs.len());
    for s in srcs {
        match bytemuck::try_cast_slice::<u8, f32>(s) {
            Ok(t) => typed.push(t),
            Err(_) => return false,
        }
    }
    o.copy_from_slice(typed[0]);
    for t in &typed[1..] {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => o.iter_mut().zip(*t).for_each(|(a, x)| *a += x),
            ReduceOp::Max => o.iter_mut().zip(*t).for_each(|(a, x)| {
                if !a.is_nan() && (x.is_nan() || *x > *a) {
                    *a = *x
                }
            }),
            ReduceOp::Min => o.iter_mut().zip(*t).for_each(|(a, x)| {
                if !a.is_nan() && (x.is_nan() || *x < *a) {
                    *a = *x
                }
            }),
        }
    }
    if op == ReduceOp::Avg {
        let p = typed.len() as f32;
        o.iter_mut().for_each(|a| *a /= p);
    }
    true
}

/// Accumulator arithmetic of [`reduce_typed`].
trait Acc: Copy + PartialOrd + std::ops::Add<Output = Self> + std::ops::Div<Output = Self> {
    fn from_count(n: usize) -> Self;
    fn is_nan(self) -> bool;
}

impl Acc for f32 {
    fn from_count(n: usize) -> Self {
        n as f32
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}

impl Acc for f64 {
    fn from_count(n: usize) -> Self {
        n as f64
    }
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

/// Element-wise reduction in blocks, so each source is streamed once per
/// block while the accumulators stay in cache.
fn reduce_typed<const N: usize, A: Acc>(
    op: ReduceOp,
    srcs: &[&[u8]],
    out: &mut [u8],
    load: impl Fn([u8; N]) -> A,
    store: impl Fn(A) -> [u8; N],
) {
    const BLOCK: usize = 1024;
    let n = out.len() / N;
    let mut acc: Vec<A> = Vec::with_capacity(BLOCK);
    let get = |s: &[u8], i: usize| -> A {
        let mut b = [0u8; N];
        b.copy_from_slice(&s[i * N..(i + 1) * N]);
        load(b)
    };
    let mut start = 0;
    while start < n {
        let end = (start + BLOCK).min(n);
        acc.clear();
        acc.extend((start..end).map(|i| get(srcs[0], i)));
        for s in &srcs[1..] {
            for (a, i) in acc.iter_mut().zip(start..end) {
                let x = get(s, i);
                *a = match op {
                    ReduceOp::Sum | ReduceOp::Avg => *a + x,
                    // A NaN on any rank wins, whatever the rank order.
                    ReduceOp::Max if a.is_nan() => *a,
                    ReduceOp::Max if x.is_nan() || x > *a => x,
                    ReduceOp::Min if a.is_nan() => *a,
                    ReduceOp::Min if x.is_nan() || x < *a => x,
                    ReduceOp::Max | ReduceOp::Min => *a,
                };
            }
        }
        if op == ReduceOp::Avg {
            let p = A::from_count(srcs.len());
            for a in acc.iter_mut() {
                *a = *a / p;
            }
        }
        for (a, i) in acc.iter().zip(start..end) {
            out[i * N..(i + 1) * N].copy_from_slice(&store(*a));
        }
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
        bytemuck::cast_slice(v).to_vec()
    }

    #[test]
    fn f32_sum_avg_max_min_in_rank_order() {
        let a = bytes(&[1.0f32, -2.0, 3.5]);
        let b = bytes(&[0.5f32, 4.0, -1.0]);
        let c = bytes(&[2.0f32, f32::NAN, 0.0]);
        let mut out = vec![0u8; 12];
        let check = |op, out: &mut Vec<u8>, srcs: &[&[u8]]| {
            reduce_into(DType::F32, op, srcs, out).unwrap();
            bytemuck::cast_slice::<u8, f32>(out).to_vec()
        };
        assert_eq!(
            check(ReduceOp::Sum, &mut out, &[&a, &b]),
            vec![1.5, 2.0, 2.5]
        );
        assert_eq!(
            check(ReduceOp::Avg, &mut out, &[&a, &b]),
            vec![0.75, 1.0, 1.25]
        );
        assert_eq!(
            check(ReduceOp::Max, &mut out, &[&a, &b]),
            vec![1.0, 4.0, 3.5]
        );
        assert_eq!(
            check(ReduceOp::Min, &mut out, &[&a, &b]),
            vec![0.5, -2.0, -1.0]
        );
        let m = check(ReduceOp::Max, &mut out, &[&a, &b, &c]);
        assert_eq!(m[0], 2.0);
        assert!(m[1].is_nan(), "NaN propagates through max");
    }

    #[test]
    fn bf16_sums_in_f32_and_rounds_once() {
        // 256 + 1 + 1 in bf16 step by step is 256 (1 is below half an ulp
        // of 256), but in f32 it is 258, which bf16 represents exactly.
        let v = |x: f32| bytes(&[bf16::from_f32(x)]);
        let (a, b, c) = (v(256.0), v(1.0), v(1.0));
        let mut out = vec![0u8; 2];
        reduce_into(DType::Bf16, ReduceOp::Sum, &[&a, &b, &c], &mut out).unwrap();
        assert_eq!(bf16::from_le_bytes([out[0], out[1]]).to_f32(), 258.0);
    }

    #[test]
    fn misaligned_f32_slices_reduce_like_aligned_ones() {
        let a = bytes(&[1.5f32, f32::NAN, -3.0, 7.0]);
        let b = bytes(&[2.0f32, 1.0, -4.0, f32::NAN]);
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
            let mut fast = vec![0u8; 16];
            reduce_into(DType::F32, op, &[&a, &b], &mut fast).unwrap();
            // Shift everything by one byte to force the generic path.
            let (mut a1, mut b1, mut o1) = (vec![0u8; 17], vec![0u8; 17], vec![0u8; 17]);
            a1[1..].copy_from_slice(&a);
            b1[1..].copy_from_slice(&b);
            reduce_into(DType::F32, op, &[&a1[1..], &b1[1..]], &mut o1[1..]).unwrap();
            let f: Vec<u32> = fast
                .chunks(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let g: Vec<u32> = o1[1..]
                .chunks(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(f, g, "{op}");
        }
    }

    #[test]
    fn mismatched_sources_are_errors() {
        let a = vec![0u8; 8];
        let b = vec![0u8; 4];
        let mut out = vec![0u8; 8];
        let e = reduce_into(DType::F32, ReduceOp::Sum, &[&a, &b], &mut out).unwrap_err();
        assert!(e.to_string().contains("source 1 has 4 bytes"), "{e}");
        let mut odd = vec![0u8; 6];
        let e = reduce_into(DType::F32, ReduceOp::Sum, &[&a[..6]], &mut odd).unwrap_err();
        assert!(e.to_string().contains("whole number of f32"), "{e}");
    }
}
