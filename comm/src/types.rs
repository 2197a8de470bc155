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
    let aligned = match dtype {
        DType::F32 => reduce_aligned::<f32>(op, srcs, out, |x| x, |x| x),
        DType::Bf16 => reduce_aligned::<u16>(op, srcs, out, bf16_to_f32, f32_to_bf16),
        _ => false,
    };
    if aligned {
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

/// [`reduce_into`] where the source of rank `own_at` is `own` itself:
/// `others` are the other sources in rank order, and the result is written
/// over `own` and into `copy` (the in-process all-reduce reduces its slice
/// in place and hands the same bytes to its peers). For aligned f32 and
/// bf16 this is one pass; otherwise `own` is copied first.
pub(crate) fn reduce_in_place(
    dtype: DType,
    op: ReduceOp,
    others: &[&[u8]],
    own_at: usize,
    own: &mut [u8],
    copy: &mut [u8],
) -> Result<()> {
    if own_at > others.len() {
        return Err(CommError::Invalid(format!(
            "reduce: own source at rank {own_at}, but there are only {} sources",
            others.len() + 1
        )));
    }
    if let Some((i, s)) = others
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() != own.len())
    {
        return Err(CommError::Invalid(format!(
            "reduce: other source {i} has {} bytes, the own one {}",
            s.len(),
            own.len()
        )));
    }
    if copy.len() != own.len() || own.len() % dtype.size() != 0 {
        return Err(CommError::Invalid(format!(
            "reduce: the copy has {} bytes and the own source {}; both must be equal and a \
             whole number of {dtype} elements",
            copy.len(),
            own.len()
        )));
    }
    let done = match dtype {
        DType::F32 => in_place_aligned::<f32>(op, others, own_at, own, copy, |x| x, |x| x),
        DType::Bf16 => {
            in_place_aligned::<u16>(op, others, own_at, own, copy, bf16_to_f32, f32_to_bf16)
        }
        DType::F64 | DType::F16 => false,
    };
    if !done {
        let mine = own.to_vec();
        let mut srcs = others.to_vec();
        srcs.insert(own_at, &mine);
        reduce_into(dtype, op, &srcs, copy)?;
        own.copy_from_slice(copy);
    }
    Ok(())
}

/// [`reduce_in_place`] over slices of `T`, when every one is aligned for
/// it; false (nothing written) otherwise.
fn in_place_aligned<T: bytemuck::Pod>(
    op: ReduceOp,
    others: &[&[u8]],
    own_at: usize,
    own: &mut [u8],
    copy: &mut [u8],
    load: impl Fn(T) -> f32 + Copy,
    store: impl Fn(f32) -> T + Copy,
) -> bool {
    let (Ok(own), Ok(copy)) = (
        bytemuck::try_cast_slice_mut::<u8, T>(own),
        bytemuck::try_cast_slice_mut::<u8, T>(copy),
    ) else {
        return false;
    };
    let Some(typed) = typed_slices::<T>(others) else {
        return false;
    };
    let dst = Dst {
        out: own,
        own_at: Some(own_at),
        copy: Some(copy),
    };
    reduce_lanes_op(op, &typed, dst, load, store);
    true
}

/// Every byte slice as a slice of `T`, or None where one is misaligned.
fn typed_slices<'a, T: bytemuck::Pod>(srcs: &[&'a [u8]]) -> Option<Vec<&'a [T]>> {
    srcs.iter()
        .map(|s| bytemuck::try_cast_slice::<u8, T>(s).ok())
        .collect()
}

/// The path where every slice is aligned for `T` (the usual case):
/// [`reduce_lanes`] loading each element to f32 and storing the result
/// once (f32 as is; bf16 as `u16` bits, the same bits as [`reduce_typed`]
/// over `half::bf16`), same order and NaN rules as [`reduce_typed`]. False
/// (nothing written) where a slice is misaligned.
fn reduce_aligned<T: bytemuck::Pod>(
    op: ReduceOp,
    srcs: &[&[u8]],
    out: &mut [u8],
    load: impl Fn(T) -> f32 + Copy,
    store: impl Fn(f32) -> T + Copy,
) -> bool {
    let Ok(o) = bytemuck::try_cast_slice_mut::<u8, T>(out) else {
        return false;
    };
    let Some(typed) = typed_slices::<T>(srcs) else {
        return false;
    };
    let dst = Dst {
        out: o,
        own_at: None,
        copy: None,
    };
    reduce_lanes_op(op, &typed, dst, load, store);
    true
}

/// bf16 bits to f32: exact, a shift.
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// f32 to bf16 bits, rounding to nearest even; a NaN stays a (quiet) NaN.
/// The same bits as `half::bf16::from_f32`, written without branches so
/// that the narrowing vectorizes.
fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    // Wraps only for NaN patterns, whose rounded value is not used.
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let quiet_nan = (b >> 16) | 0x0040;
    let is_nan = b & 0x7FFF_FFFF > 0x7F80_0000;
    (if is_nan { quiet_nan } else { rounded }) as u16
}

/// [`reduce_lanes`] with the combining step of `op`, chosen once outside
/// the loops. A NaN on any rank wins for Max and Min, whatever the rank
/// order (as in [`reduce_typed`]).
fn reduce_lanes_op<T: Copy>(
    op: ReduceOp,
    srcs: &[&[T]],
    out: Dst<'_, T>,
    load: impl Fn(T) -> f32 + Copy,
    store: impl Fn(f32) -> T + Copy,
) {
    let p = (srcs.len() + usize::from(out.own_at.is_some())) as f32;
    match op {
        ReduceOp::Sum => reduce_lanes(srcs, out, load, store, |a, x| a + x, |a| a),
        ReduceOp::Avg => reduce_lanes(srcs, out, load, store, |a, x| a + x, |a| a / p),
        ReduceOp::Max => reduce_lanes(
            srcs,
            out,
            load,
            store,
            |a, x| {
                if !a.is_nan() && (x.is_nan() || x > a) {
                    x
                } else {
                    a
                }
            },
            |a| a,
        ),
        ReduceOp::Min => reduce_lanes(
            srcs,
            out,
            load,
            store,
            |a, x| {
                if !a.is_nan() && (x.is_nan() || x < a) {
                    x
                } else {
                    a
                }
            },
            |a| a,
        ),
    }
}

/// Elements one step of [`reduce_lanes`] keeps in registers: two AVX2
/// vectors of f32.
const LANES: usize = 16;

/// Where [`reduce_lanes`] writes.
struct Dst<'a, T> {
    /// The result.
    out: &'a mut [T],
    /// Where `out` is also a source: its rank (the other sources are
    /// `srcs` in rank order, around it).
    own_at: Option<usize>,
    /// A second copy of the result.
    copy: Option<&'a mut [T]>,
}

/// `out[i] = store(finish(((load(x0[i]) c load(x1[i])) c load(x2[i])) ...))`
/// in f32, over the sources in rank order, `LANES` elements at a time: the
/// accumulators stay in registers while each source streams past once, so
/// there is one pass over memory whatever the number of sources. With
/// `own_at`, each group of `out` is read as a source before it is
/// overwritten. Every slice has `out.len()` elements.
fn reduce_lanes<T: Copy>(
    srcs: &[&[T]],
    dst: Dst<'_, T>,
    load: impl Fn(T) -> f32 + Copy,
    store: impl Fn(f32) -> T + Copy,
    combine: impl Fn(f32, f32) -> f32 + Copy,
    finish: impl Fn(f32) -> f32 + Copy,
) {
    let Dst {
        out,
        own_at,
        mut copy,
    } = dst;
    let (before, after) = srcs.split_at(own_at.unwrap_or(srcs.len()).min(srcs.len()));
    let own = own_at.is_some();
    // Full groups work on arrays, so the loops have a constant length and
    // become a few vector instructions.
    let start = |acc: &mut [f32; LANES], x: &[T]| {
        acc.iter_mut().zip(x).for_each(|(a, x)| *a = load(*x));
    };
    let fold = |acc: &mut [f32; LANES], x: &[T]| {
        acc.iter_mut()
            .zip(x)
            .for_each(|(a, x)| *a = combine(*a, load(*x)));
    };
    let n = out.len();
    let full = n / LANES * LANES;
    for c in 0..full / LANES {
        let at = c * LANES..(c + 1) * LANES;
        let mut acc = [0.0f32; LANES];
        // The first source in rank order starts the sums, the rest fold in.
        let rest_after = match (before.split_first(), own) {
            (Some((x0, rest)), _) => {
                start(&mut acc, &x0[at.clone()]);
                for s in rest {
                    fold(&mut acc, &s[at.clone()]);
                }
                if own {
                    fold(&mut acc, &out[at.clone()]);
                }
                after
            }
            (None, true) => {
                start(&mut acc, &out[at.clone()]);
                after
            }
            (None, false) => {
                let Some((x0, rest)) = after.split_first() else {
                    return;
                };
                start(&mut acc, &x0[at.clone()]);
                rest
            }
        };
        for s in rest_after {
            fold(&mut acc, &s[at.clone()]);
        }
        for (o, a) in out[at.clone()].iter_mut().zip(&acc) {
            *o = store(finish(*a));
        }
        if let Some(c) = copy.as_deref_mut() {
            c[at.clone()].copy_from_slice(&out[at]);
        }
    }
    for i in full..n {
        let mine = own.then(|| load(out[i]));
        let mut xs = before
            .iter()
            .map(|s| load(s[i]))
            .chain(mine)
            .chain(after.iter().map(|s| load(s[i])));
        let Some(x0) = xs.next() else {
            return;
        };
        out[i] = store(finish(xs.fold(x0, combine)));
        if let Some(c) = copy.as_deref_mut() {
            c[i] = out[i];
        }
    }
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
    fn bf16_narrowing_matches_half_bit_for_bit() {
        let mut patterns: Vec<u32> = vec![
            0,
            0x8000_0000,
            0x7F80_0000, // inf
            0xFF80_0000, // -inf
            0x7F7F_FFFF, // f32::MAX rounds to inf
            0x7F7F_7FFF, // just below the tie
            0x3F80_8000, // tie, even below: stays
            0x3F81_8000, // tie, odd below: rounds up
            0x3F80_8001, // above the tie
            0x0000_0001, // smallest subnormal
            0x807F_FFFF, // negative subnormal rounding to a normal
            0x7F80_0001, // signalling NaN with low payload only
            0x7FC0_0000, // quiet NaN
            0xFFFF_FFFF, // negative NaN, all ones
        ];
        let mut x: u32 = 0x1234_5678;
        for _ in 0..200_000 {
            // xorshift32: a spread of bit patterns, every exponent.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            patterns.push(x);
        }
        for b in patterns {
            let f = f32::from_bits(b);
            assert_eq!(f32_to_bf16(f), bf16::from_f32(f).to_bits(), "{b:#010x}");
            // Widening is exact; half also quiets a signalling NaN there,
            // which the shift leaves to the arithmetic and the narrowing
            // (the blocked-path test shows the reduced bits agree).
            let h = (b >> 16) as u16;
            let (w, want) = (bf16_to_f32(h), bf16::from_bits(h).to_f32());
            if want.is_nan() {
                assert!(w.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(w.to_bits(), want.to_bits(), "{h:#06x}");
            }
        }
    }

    #[test]
    fn bf16_blocked_path_equals_the_generic_one_for_every_op() {
        // 2500 elements: two full blocks of the fast path and a partial one;
        // NaNs (quiet and signalling), infinities, and sums that round.
        let n = 2500;
        let src = |seed: u32| -> Vec<u8> {
            let mut x = seed;
            let v: Vec<bf16> = (0..n)
                .map(|i| match i % 97 {
                    0 => bf16::NAN,
                    1 => bf16::INFINITY,
                    2 => bf16::NEG_INFINITY,
                    3 => bf16::from_bits(0xFF81), // a signalling NaN
                    _ => {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        bf16::from_f32((x % 20_001) as f32 / 64.0 - 150.0)
                    }
                })
                .collect();
            bytes(&v)
        };
        let srcs = [src(1), src(2), src(3)];
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
            let refs: Vec<&[u8]> = srcs.iter().map(|s| &s[..]).collect();
            let mut fast = vec![0u8; 2 * n];
            reduce_into(DType::Bf16, op, &refs, &mut fast).unwrap();
            let shifted: Vec<Vec<u8>> = srcs
                .iter()
                .map(|s| {
                    let mut v = vec![0u8; 2 * n + 1];
                    v[1..].copy_from_slice(s);
                    v
                })
                .collect();
            let refs1: Vec<&[u8]> = shifted.iter().map(|s| &s[1..]).collect();
            let mut slow = vec![0u8; 2 * n + 1];
            assert!(
                bytemuck::try_cast_slice::<u8, u16>(&slow[1..]).is_err(),
                "the shifted output must be misaligned to force the generic path"
            );
            reduce_into(DType::Bf16, op, &refs1, &mut slow[1..]).unwrap();
            assert_eq!(fast, slow[1..], "{op}");
        }
    }

    #[test]
    fn in_place_reduction_equals_reduce_into_for_every_rank_position() {
        // 37 elements: two full groups of lanes and a tail; NaNs included.
        let n = 37;
        let vals = |seed: u32| -> Vec<f64> {
            let mut x = seed;
            (0..n)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    if i == 5 {
                        f64::NAN
                    } else {
                        (x % 100_001) as f64 / 977.0 - 50.0
                    }
                })
                .collect()
        };
        for dtype in [DType::F32, DType::Bf16, DType::F16, DType::F64] {
            let enc = |v: &[f64]| -> Vec<u8> {
                match dtype {
                    DType::F32 => bytes(&v.iter().map(|x| *x as f32).collect::<Vec<_>>()),
                    DType::F64 => bytes(v),
                    DType::Bf16 => bytes(&v.iter().map(|x| bf16::from_f64(*x)).collect::<Vec<_>>()),
                    DType::F16 => bytes(&v.iter().map(|x| f16::from_f64(*x)).collect::<Vec<_>>()),
                }
            };
            for p in 1..=4usize {
                let srcs: Vec<Vec<u8>> = (0..p).map(|r| enc(&vals(r as u32 + 7))).collect();
                for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
                    let refs: Vec<&[u8]> = srcs.iter().map(|s| &s[..]).collect();
                    let mut want = vec![0u8; srcs[0].len()];
                    reduce_into(dtype, op, &refs, &mut want).unwrap();
                    for at in 0..p {
                        let others: Vec<&[u8]> =
                            (0..p).filter(|&r| r != at).map(|r| &srcs[r][..]).collect();
                        let mut own = srcs[at].clone();
                        let mut copy = vec![0u8; own.len()];
                        reduce_in_place(dtype, op, &others, at, &mut own, &mut copy).unwrap();
                        assert_eq!(own, want, "{dtype} {op} P = {p}, own at {at}");
                        assert_eq!(copy, want, "{dtype} {op} P = {p}, own at {at}");
                    }
                }
            }
        }
        let mut own = vec![0u8; 8];
        let mut copy = vec![0u8; 4];
        let e = reduce_in_place(DType::F32, ReduceOp::Sum, &[], 0, &mut own, &mut copy);
        assert!(e.unwrap_err().to_string().contains("the copy has 4 bytes"));
        let mut copy8 = vec![0u8; 8];
        let e = reduce_in_place(DType::F32, ReduceOp::Sum, &[], 1, &mut own, &mut copy8);
        assert!(e.unwrap_err().to_string().contains("own source at rank 1"));
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
