//! The cuda reduction kernels (comm/kernels/reduce.ptx) in the PTX
//! interpreter against `reduce_into`, the host reduction every other path
//! uses: every storage type and op, 1 to 8 inputs, NaNs, infinities and
//! signed zeros among the values, a length that is not a multiple of the
//! block. Equal bit for bit (any NaN for a NaN).

use fpdt_comm::kernels::{reduce_entry, reduce_op_code, MAX_REDUCE_INPUTS, REDUCE_PTX};
use fpdt_comm::{reduce_into, DType, ReduceOp};
use fpdt_ptx::interp::Interpreter;
use fpdt_ptx::Arg;
use half::{bf16, f16};
use rand::{Rng, SeedableRng};

/// `n` values of `dtype` as bytes, with special values mixed in.
fn values(dtype: DType, n: usize, rng: &mut rand::rngs::StdRng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n {
        let x: f64 = match rng.random_range(0..20) {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => f64::NEG_INFINITY,
            3 => -0.0,
            _ => rng.random_range(-1e3..1e3) * 10f64.powi(rng.random_range(-3..3)),
        };
        match dtype {
            DType::F32 => out.extend((x as f32).to_le_bytes()),
            DType::F64 => out.extend(x.to_le_bytes()),
            DType::Bf16 => out.extend(bf16::from_f64(x).to_le_bytes()),
            DType::F16 => out.extend(f16::from_f64(x).to_le_bytes()),
        }
    }
    out
}

fn is_nan(dtype: DType, b: &[u8]) -> bool {
    match dtype {
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_nan(),
        DType::F64 => f64::from_le_bytes(b.try_into().unwrap_or([0; 8])).is_nan(),
        DType::Bf16 => bf16::from_le_bytes([b[0], b[1]]).is_nan(),
        DType::F16 => f16::from_le_bytes([b[0], b[1]]).is_nan(),
    }
}

#[test]
fn the_reduce_kernels_equal_reduce_into_bit_for_bit() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let n = 300; // more than one block of 256, not a multiple of it
    let mut interp = Interpreter::new(REDUCE_PTX).expect("the module parses");
    for dtype in [DType::F32, DType::F64, DType::Bf16, DType::F16] {
        let size = dtype.size();
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
            for count in 1..=MAX_REDUCE_INPUTS {
                let ins: Vec<Vec<u8>> = (0..count).map(|_| values(dtype, n, &mut rng)).collect();
                let srcs: Vec<&[u8]> = ins.iter().map(|v| v.as_slice()).collect();
                let mut want = vec![0u8; n * size];
                reduce_into(dtype, op, &srcs, &mut want).expect("host reduce");
                let out = interp.alloc_zeroed(n * size);
                let mut args = vec![
                    Arg::Ptr(out),
                    Arg::U32(n as u32),
                    Arg::U32(count as u32),
                    Arg::U32(reduce_op_code(op)),
                ];
                for k in 0..MAX_REDUCE_INPUTS {
                    args.push(match ins.get(k) {
                        Some(v) => Arg::Ptr(interp.alloc(v)),
                        None => Arg::U64(0),
                    });
                }
                // Two blocks of 128: the grid-stride loop covers the rest.
                interp
                    .launch(reduce_entry(dtype), (2, 1, 1), (128, 1, 1), 0, &args)
                    .expect("the kernel runs");
                let got = interp.read(out, n * size).expect("read back");
                for i in 0..n {
                    let (g, w) = (
                        &got[i * size..(i + 1) * size],
                        &want[i * size..(i + 1) * size],
                    );
                    let same = g == w || (is_nan(dtype, g) && is_nan(dtype, w));
                    assert!(
                        same,
                        "{dtype} {op} of {count} inputs, element {i}: kernel {g:?}, host {w:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_output_may_be_one_of_the_inputs() {
    let mut interp = Interpreter::new(REDUCE_PTX).expect("the module parses");
    let a: Vec<f32> = (0..40).map(|i| i as f32).collect();
    let b: Vec<f32> = (0..40).map(|i| 100.0 - i as f32).collect();
    let pa = interp.alloc_slice(&a);
    let pb = interp.alloc_slice(&b);
    let mut args = vec![
        Arg::Ptr(pb),
        Arg::U32(40),
        Arg::U32(2),
        Arg::U32(reduce_op_code(ReduceOp::Sum)),
        Arg::Ptr(pa),
        Arg::Ptr(pb),
    ];
    args.extend((2..MAX_REDUCE_INPUTS).map(|_| Arg::U64(0)));
    interp
        .launch("reduce_f32", (1, 1, 1), (64, 1, 1), 0, &args)
        .expect("the kernel runs");
    let got = interp.read_f32(pb, 40).expect("read back");
    assert_eq!(got, vec![100.0f32; 40]);
}
