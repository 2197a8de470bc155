//! The PTX interpreter, instruction family by instruction family, against
//! results computed by hand in Rust.

mod interp_support;

use fpdt_ptx::interp::Interpreter;
use fpdt_ptx::Arg;
use interp_support::{assemble_all, module, Rng};

fn int_ops() -> String {
    module(
        r#"
.visible .entry int_ops(.param .u64 pa, .param .u64 pb, .param .u64 po)
{
    .reg .b32 %r<12>;
    .reg .b64 %rd<12>;
    ld.param.u64 %rd1, [pa];
    ld.param.u64 %rd2, [pb];
    ld.param.u64 %rd3, [po];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd4, %r1, 4;
    add.s64 %rd5, %rd1, %rd4;
    add.s64 %rd6, %rd2, %rd4;
    ld.global.u32 %r2, [%rd5];
    ld.global.u32 %r3, [%rd6];
    mul.lo.u32 %r4, %r1, 112;
    cvt.u64.u32 %rd7, %r4;
    add.s64 %rd8, %rd3, %rd7;
    add.s32 %r5, %r2, %r3;
    st.global.u32 [%rd8], %r5;
    sub.s32 %r5, %r2, %r3;
    st.global.u32 [%rd8+4], %r5;
    mul.lo.s32 %r5, %r2, %r3;
    st.global.u32 [%rd8+8], %r5;
    mul.hi.s32 %r5, %r2, %r3;
    st.global.u32 [%rd8+12], %r5;
    mul.hi.u32 %r5, %r2, %r3;
    st.global.u32 [%rd8+16], %r5;
    mad.lo.s32 %r5, %r2, %r3, 7;
    st.global.u32 [%rd8+20], %r5;
    div.s32 %r5, %r2, %r3;
    st.global.u32 [%rd8+24], %r5;
    rem.s32 %r5, %r2, %r3;
    st.global.u32 [%rd8+28], %r5;
    div.u32 %r5, %r2, %r3;
    st.global.u32 [%rd8+32], %r5;
    min.s32 %r5, %r2, %r3;
    st.global.u32 [%rd8+36], %r5;
    max.u32 %r5, %r2, %r3;
    st.global.u32 [%rd8+40], %r5;
    and.b32 %r5, %r2, %r3;
    st.global.u32 [%rd8+44], %r5;
    or.b32 %r5, %r2, %r3;
    st.global.u32 [%rd8+48], %r5;
    xor.b32 %r5, %r2, %r3;
    st.global.u32 [%rd8+52], %r5;
    and.b32 %r6, %r3, 31;
    shl.b32 %r5, %r2, %r6;
    st.global.u32 [%rd8+56], %r5;
    shr.s32 %r5, %r2, %r6;
    st.global.u32 [%rd8+60], %r5;
    shr.u32 %r5, %r2, %r6;
    st.global.u32 [%rd8+64], %r5;
    neg.s32 %r5, %r2;
    st.global.u32 [%rd8+68], %r5;
    abs.s32 %r5, %r2;
    st.global.u32 [%rd8+72], %r5;
    popc.b32 %r5, %r2;
    st.global.u32 [%rd8+76], %r5;
    clz.b32 %r5, %r2;
    st.global.u32 [%rd8+80], %r5;
    brev.b32 %r5, %r2;
    st.global.u32 [%rd8+84], %r5;
    bfe.u32 %r5, %r2, 4, 8;
    st.global.u32 [%rd8+88], %r5;
    bfe.s32 %r5, %r2, 28, 4;
    st.global.u32 [%rd8+92], %r5;
    prmt.b32 %r5, %r2, %r3, 0x7351;
    st.global.u32 [%rd8+96], %r5;
    shl.b32 %r7, %r2, 40;
    st.global.u32 [%rd8+100], %r7;
    mul.wide.s32 %rd9, %r2, %r3;
    st.global.u64 [%rd8+104], %rd9;
    ret;
}
"#,
    )
}

#[test]
fn integer_arithmetic_and_logic() {
    let n = 64usize;
    let mut rng = Rng(7);
    let mut a: Vec<u32> = (0..n).map(|_| rng.next_u32()).collect();
    let mut b: Vec<u32> = (0..n).map(|_| rng.next_u32() | 1).collect();
    a[0] = 7;
    b[0] = 0xffff_fffe; // -2
    a[1] = (-7i32) as u32;
    b[1] = 2;
    let mut it = Interpreter::new(&int_ops()).unwrap();
    let pa = it.alloc_slice(&a);
    let pb = it.alloc_slice(&b);
    let po = it.alloc_zeroed(n * 112);
    it.launch(
        "int_ops",
        1,
        n as u32,
        0,
        &[Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(po)],
    )
    .unwrap();
    let out: Vec<u32> = it.read_vec(po, n * 28).unwrap();
    for i in 0..n {
        let (x, y) = (a[i], b[i]);
        let (xs, ys) = (x as i32, y as i32);
        let sh = y & 31;
        let prmt = {
            let src = u64::from(x) | (u64::from(y) << 32);
            let byte = |s: u32| ((src >> (8 * (s & 7))) & 0xff) as u32;
            byte(1) | (byte(5) << 8) | (byte(3) << 16) | (byte(7) << 24)
        };
        let want: [u32; 26] = [
            x.wrapping_add(y),
            x.wrapping_sub(y),
            x.wrapping_mul(y),
            ((i64::from(xs) * i64::from(ys)) >> 32) as u32,
            ((u64::from(x) * u64::from(y)) >> 32) as u32,
            x.wrapping_mul(y).wrapping_add(7),
            xs.wrapping_div(ys) as u32,
            xs.wrapping_rem(ys) as u32,
            x / y,
            xs.min(ys) as u32,
            x.max(y),
            x & y,
            x | y,
            x ^ y,
            x << sh,
            (xs >> sh) as u32,
            x >> sh,
            xs.wrapping_neg() as u32,
            xs.wrapping_abs() as u32,
            x.count_ones(),
            x.leading_zeros(),
            x.reverse_bits(),
            (x >> 4) & 0xff,
            (xs >> 28) as u32,
            prmt,
            0,
        ];
        let got = &out[i * 28..i * 28 + 26];
        assert_eq!(got, &want[..], "thread {i}: a={x:#x} b={y:#x}");
        let wide = u64::from(out[i * 28 + 26]) | (u64::from(out[i * 28 + 27]) << 32);
        assert_eq!(
            wide as i64,
            i64::from(xs) * i64::from(ys),
            "mul.wide.s32 thread {i}"
        );
    }
}

fn float_ops() -> String {
    module(
        r#"
.visible .entry float_ops(.param .u64 pa, .param .u64 pb, .param .u64 po)
{
    .reg .b32 %r<4>;
    .reg .f32 %f<8>;
    .reg .b64 %rd<10>;
    .reg .f64 %fd<4>;
    ld.param.u64 %rd1, [pa];
    ld.param.u64 %rd2, [pb];
    ld.param.u64 %rd3, [po];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd4, %r1, 4;
    add.s64 %rd5, %rd1, %rd4;
    add.s64 %rd6, %rd2, %rd4;
    ld.global.f32 %f1, [%rd5];
    ld.global.f32 %f2, [%rd6];
    mul.wide.u32 %rd7, %r1, 80;
    add.s64 %rd8, %rd3, %rd7;
    add.f32 %f3, %f1, %f2;
    st.global.f32 [%rd8], %f3;
    sub.f32 %f3, %f1, %f2;
    st.global.f32 [%rd8+4], %f3;
    mul.f32 %f3, %f1, %f2;
    st.global.f32 [%rd8+8], %f3;
    fma.rn.f32 %f3, %f1, %f2, 0f3F800000;
    st.global.f32 [%rd8+12], %f3;
    div.rn.f32 %f3, %f1, %f2;
    st.global.f32 [%rd8+16], %f3;
    abs.f32 %f4, %f1;
    sqrt.rn.f32 %f3, %f4;
    st.global.f32 [%rd8+20], %f3;
    rcp.rn.f32 %f3, %f2;
    st.global.f32 [%rd8+24], %f3;
    min.f32 %f3, %f1, %f2;
    st.global.f32 [%rd8+28], %f3;
    max.f32 %f3, %f1, %f2;
    st.global.f32 [%rd8+32], %f3;
    neg.f32 %f3, %f1;
    st.global.f32 [%rd8+36], %f3;
    add.rz.f32 %f3, %f1, %f2;
    st.global.f32 [%rd8+40], %f3;
    add.rm.f32 %f3, %f1, %f2;
    st.global.f32 [%rd8+44], %f3;
    add.rp.f32 %f3, %f1, %f2;
    st.global.f32 [%rd8+48], %f3;
    mul.rz.f32 %f3, %f1, %f2;
    st.global.f32 [%rd8+52], %f3;
    ex2.approx.ftz.f32 %f3, %f1;
    st.global.f32 [%rd8+56], %f3;
    lg2.approx.f32 %f3, %f4;
    st.global.f32 [%rd8+60], %f3;
    rsqrt.approx.f32 %f3, %f4;
    st.global.f32 [%rd8+64], %f3;
    mul.sat.f32 %f3, %f1, 0f40000000;
    st.global.f32 [%rd8+68], %f3;
    cvt.f64.f32 %fd1, %f1;
    cvt.f64.f32 %fd2, %f2;
    fma.rn.f64 %fd3, %fd1, %fd2, %fd1;
    st.global.f64 [%rd8+72], %fd3;
    ret;
}
"#,
    )
}

/// Exact value of a + b (or a * b) as f64 for inputs in modest ranges,
/// rounded to f32 in direction `dir` (-1 down, 0 toward zero, 1 up).
fn round_dir(x: f64, dir: i32) -> f32 {
    let r = x as f32; // nearest
    let rf = f64::from(r);
    if rf == x {
        return r;
    }
    let up = |v: f32| {
        f32::from_bits(if v >= 0.0 {
            v.to_bits() + 1
        } else {
            v.to_bits() - 1
        })
    };
    let down = |v: f32| {
        f32::from_bits(if v > 0.0 {
            v.to_bits() - 1
        } else {
            v.to_bits() + 1
        })
    };
    let (lo, hi) = if rf < x { (r, up(r)) } else { (down(r), r) };
    match dir {
        -1 => lo,
        1 => hi,
        _ => {
            if x > 0.0 {
                lo
            } else {
                hi
            }
        }
    }
}

#[test]
fn float_arithmetic_with_rounding_modes() {
    let n = 96usize;
    let mut rng = Rng(11);
    let a: Vec<f32> = (0..n)
        .map(|i| rng.f32() * (1 + i % 7) as f32 * 3.0)
        .collect();
    let b: Vec<f32> = (0..n)
        .map(|i| rng.f32() * (1 + i % 5) as f32 + 0.01)
        .collect();
    let mut it = Interpreter::new(&float_ops()).unwrap();
    let pa = it.alloc_slice(&a);
    let pb = it.alloc_slice(&b);
    let po = it.alloc_zeroed(n * 80);
    it.launch(
        "float_ops",
        1,
        n as u32,
        0,
        &[Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(po)],
    )
    .unwrap();
    let out = it.read_f32(po, n * 20).unwrap();
    for i in 0..n {
        let (x, y) = (a[i], b[i]);
        let o = &out[i * 20..i * 20 + 20];
        let exact: [f32; 15] = [
            x + y,
            x - y,
            x * y,
            x.mul_add(y, 1.0),
            x / y,
            x.abs().sqrt(),
            1.0 / y,
            x.min(y),
            x.max(y),
            -x,
            round_dir(f64::from(x) + f64::from(y), 0),
            round_dir(f64::from(x) + f64::from(y), -1),
            round_dir(f64::from(x) + f64::from(y), 1),
            round_dir(f64::from(x) * f64::from(y), 0),
            (x * 2.0).clamp(0.0, 1.0),
        ];
        let got = [
            o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8], o[9], o[10], o[11], o[12], o[13],
            o[17],
        ];
        for (j, (g, w)) in got.iter().zip(exact.iter()).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "thread {i} result {j}: a={x} b={y}: got {g}, want {w}"
            );
        }
        let approx = [
            (o[14], x.exp2()),
            (o[15], x.abs().log2()),
            (o[16], 1.0 / x.abs().sqrt()),
        ];
        for (g, w) in approx {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "thread {i}: approx {g} vs {w}"
            );
        }
        let d = f64::from_bits(u64::from(o[18].to_bits()) | (u64::from(o[19].to_bits()) << 32));
        assert_eq!(d, f64::from(x).mul_add(f64::from(y), f64::from(x)));
    }
}

fn cvt_kernel() -> String {
    module(
        r#"
.visible .entry cvt_cases(.param .u64 pin, .param .u64 pout)
{
    .reg .b16 %h<4>;
    .reg .b32 %r<8>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [pin];
    ld.param.u64 %rd2, [pout];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd3, %r1, 4;
    add.s64 %rd4, %rd1, %rd3;
    ld.global.f32 %f1, [%rd4];
    mul.wide.u32 %rd5, %r1, 32;
    add.s64 %rd6, %rd2, %rd5;
    cvt.rn.bf16.f32 %h1, %f1;
    st.global.b16 [%rd6], %h1;
    cvt.rn.f16.f32 %h2, %f1;
    st.global.b16 [%rd6+2], %h2;
    cvt.rz.f16.f32 %h3, %f1;
    st.global.b16 [%rd6+4], %h3;
    cvt.rz.bf16.f32 %h3, %f1;
    st.global.b16 [%rd6+6], %h3;
    cvt.rni.s32.f32 %r2, %f1;
    st.global.s32 [%rd6+8], %r2;
    cvt.rzi.s32.f32 %r2, %f1;
    st.global.s32 [%rd6+12], %r2;
    cvt.rn.bf16x2.f32 %r3, %f1, 0f3F800000;
    st.global.b32 [%rd6+16], %r3;
    cvt.f32.f16 %f2, %h2;
    st.global.f32 [%rd6+20], %f2;
    cvt.rn.f32.s32 %f3, %r1;
    st.global.f32 [%rd6+24], %f3;
    cvt.rpi.u32.f32 %r4, %f1;
    st.global.u32 [%rd6+28], %r4;
    ret;
}

.visible .entry cvt_int(.param .u64 pin, .param .u64 pout)
{
    .reg .b32 %r<8>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [pin];
    ld.param.u64 %rd2, [pout];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd3, %r1, 4;
    add.s64 %rd4, %rd1, %rd3;
    ld.global.s32 %r2, [%rd4];
    mul.wide.u32 %rd5, %r1, 16;
    add.s64 %rd6, %rd2, %rd5;
    cvt.rn.f32.s32 %f1, %r2;
    st.global.f32 [%rd6], %f1;
    cvt.sat.u8.s32 %r3, %r2;
    st.global.u32 [%rd6+4], %r3;
    cvt.s16.s32 %r4, %r2;
    cvt.s32.s16 %r5, %r4;
    st.global.u32 [%rd6+8], %r5;
    cvt.rz.f32.s32 %f2, %r2;
    st.global.f32 [%rd6+12], %f2;
    ret;
}
"#,
    )
}

#[test]
fn cvt_rounds_to_nearest_even_and_saturates() {
    let p2 = |e: i32| 2f32.powi(e);
    let cases: Vec<f32> = vec![
        1.0 + p2(-8),                // bf16 tie -> even (down)
        1.0 + 3.0 * p2(-8),          // bf16 tie -> even (up)
        f32::from_bits(0x3f80_8001), // just above the tie -> up
        f32::MAX,                    // bf16 overflow -> inf; f16 -> inf
        f32::NAN,
        65520.0,       // f16 tie between max finite and 2^16 -> inf
        65519.0,       // f16 -> max finite
        p2(-25),       // f16 subnormal tie -> 0
        3.0 * p2(-25), // f16 subnormal tie -> even (2 * 2^-24)
        2.5,
        -2.5,
        3.5,
        -2.7,
        1e10,
        -1e10,
        1.0 + p2(-10) + p2(-11), // f16: rz keeps 1+2^-10, rn ties to even -> 1+2^-9
    ];
    let n = cases.len();
    let mut it = Interpreter::new(&cvt_kernel()).unwrap();
    let pin = it.alloc_slice(&cases);
    let pout = it.alloc_zeroed(n * 32);
    it.launch(
        "cvt_cases",
        1,
        n as u32,
        0,
        &[Arg::Ptr(pin), Arg::Ptr(pout)],
    )
    .unwrap();
    let raw = it.read(pout, n * 32).unwrap();
    let u16at = |i: usize, o: usize| u16::from_le_bytes([raw[i * 32 + o], raw[i * 32 + o + 1]]);
    let u32at = |i: usize, o: usize| {
        u32::from_le_bytes(raw[i * 32 + o..i * 32 + o + 4].try_into().unwrap())
    };
    // (bf16 rn, f16 rn, f16 rz, bf16 rz, rni, rzi)
    let want: Vec<(u16, u16, u16, u16, i32, i32)> = vec![
        (0x3f80, 0x3c04, 0x3c04, 0x3f80, 1, 1),
        (0x3f82, 0x3c0c, 0x3c0c, 0x3f81, 1, 1),
        (0x3f81, 0x3c04, 0x3c04, 0x3f80, 1, 1),
        (0x7f80, 0x7c00, 0x7bff, 0x7f7f, i32::MAX, i32::MAX),
        (0x7fff, 0x7fff, 0x7fff, 0x7fff, 0, 0),
        (0x4780, 0x7c00, 0x7bff, 0x477f, 65520, 65520),
        (0x4780, 0x7bff, 0x7bff, 0x477f, 65519, 65519),
        (0x3300, 0x0000, 0x0000, 0x3300, 0, 0),
        (0x33c0, 0x0002, 0x0001, 0x33c0, 0, 0),
        (0x4020, 0x4100, 0x4100, 0x4020, 2, 2),
        (0xc020, 0xc100, 0xc100, 0xc020, -2, -2),
        (0x4060, 0x4300, 0x4300, 0x4060, 4, 3),
        (0xc02d, 0xc166, 0xc166, 0xc02c, -3, -2),
        (0x5015, 0x7c00, 0x7bff, 0x5015, i32::MAX, i32::MAX),
        (0xd015, 0xfc00, 0xfbff, 0xd015, i32::MIN, i32::MIN),
        (0x3f80, 0x3c02, 0x3c01, 0x3f80, 1, 1),
    ];
    for (i, w) in want.iter().enumerate() {
        let got = (
            u16at(i, 0),
            u16at(i, 2),
            u16at(i, 4),
            u16at(i, 6),
            u32at(i, 8) as i32,
            u32at(i, 12) as i32,
        );
        assert_eq!(got, *w, "case {i}: {}", cases[i]);
        // packing: a -> upper half, b (1.0) -> lower half
        assert_eq!(
            u32at(i, 16),
            (u32::from(w.0) << 16) | 0x3f80,
            "bf16x2 case {i}"
        );
        // f16 -> f32 is exact
        let back = f32::from_bits(u32at(i, 20));
        let h = half::f16::from_bits(w.1).to_f32();
        assert!(
            back.to_bits() == h.to_bits() || (back.is_nan() && h.is_nan()),
            "f16->f32 case {i}"
        );
        assert_eq!(f32::from_bits(u32at(i, 24)), i as f32);
        let rpi = match cases[i] {
            x if x.is_nan() || x <= 0.0 => 0,
            x if x >= 4294967296.0 => u32::MAX,
            x => x.ceil() as u32,
        };
        assert_eq!(u32at(i, 28), rpi, "cvt.rpi.u32 case {i}");
    }

    let ints: Vec<i32> = vec![
        16_777_217,
        16_777_219,
        -16_777_217,
        300,
        -5,
        70000,
        -70000,
        i32::MAX,
    ];
    let n = ints.len();
    let pin = it.alloc_slice(&ints);
    let pout = it.alloc_zeroed(n * 16);
    it.launch("cvt_int", 1, n as u32, 0, &[Arg::Ptr(pin), Arg::Ptr(pout)])
        .unwrap();
    let out: Vec<u32> = it.read_vec(pout, n * 4).unwrap();
    for (i, &x) in ints.iter().enumerate() {
        assert_eq!(f32::from_bits(out[i * 4]), x as f32, "cvt.rn.f32.s32 {x}");
        assert_eq!(out[i * 4 + 1], x.clamp(0, 255) as u32, "cvt.sat.u8.s32 {x}");
        assert_eq!(out[i * 4 + 2] as i32, i32::from(x as i16), "cvt.s16 {x}");
        let rz = {
            let r = x as f32;
            if (r as f64).abs() > (x as f64).abs() {
                f32::from_bits(r.to_bits() - 1)
            } else {
                r
            }
        };
        assert_eq!(f32::from_bits(out[i * 4 + 3]), rz, "cvt.rz.f32.s32 {x}");
    }
}

fn control_flow() -> String {
    module(
        r#"
// Per lane: a loop of lane % 5 iterations, nested if/else on lane bits,
// then a full-warp shfl after reconvergence.
.visible .entry diverge(.param .u64 po)
{
    .reg .pred %p<4>;
    .reg .b32 %r<12>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [po];
    mov.u32 %r1, %tid.x;
    and.b32 %r9, %r1, 31;
    rem.u32 %r2, %r9, 5;
    mov.u32 %r3, 0;
    mov.u32 %r4, 0;
LOOP:
    setp.ge.u32 %p1, %r4, %r2;
    @%p1 bra LOOP_END;
    add.u32 %r3, %r3, %r4;
    add.u32 %r3, %r3, 10;
    add.u32 %r4, %r4, 1;
    bra.uni LOOP;
LOOP_END:
    and.b32 %r5, %r1, 1;
    setp.eq.u32 %p2, %r5, 0;
    @%p2 bra EVEN;
    and.b32 %r6, %r1, 2;
    setp.ne.u32 %p3, %r6, 0;
    @!%p3 bra ODD_LOW;
    add.u32 %r3, %r3, 3000;
    bra.uni ODD_DONE;
ODD_LOW:
    add.u32 %r3, %r3, 1000;
ODD_DONE:
    bra.uni JOIN;
EVEN:
    add.u32 %r3, %r3, 2000;
JOIN:
    shfl.sync.bfly.b32 %r7, %r3, 1, 31, -1;
    add.u32 %r8, %r3, %r7;
    mul.wide.u32 %rd2, %r1, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r8;
    ret;
}
"#,
    )
}

#[test]
fn divergence_and_reconvergence() {
    let mut it = Interpreter::new(&control_flow()).unwrap();
    let po = it.alloc_zeroed(64 * 4);
    let stats = it.launch("diverge", 1, 64, 0, &[Arg::Ptr(po)]).unwrap();
    let out: Vec<u32> = it.read_vec(po, 64).unwrap();
    let per_lane = |t: u32| {
        let l = t % 32;
        let mut v = 0;
        for j in 0..(l % 5) {
            v += j + 10;
        }
        v + if t & 1 == 0 {
            2000
        } else if t & 2 != 0 {
            3000
        } else {
            1000
        }
    };
    for t in 0..64u32 {
        assert_eq!(out[t as usize], per_lane(t) + per_lane(t ^ 1), "thread {t}");
    }
    assert_eq!(stats.blocks, 1);
    assert_eq!(stats.warps, 2);
    assert!(stats.thread_instructions < stats.instructions * 32);
}

fn specials_and_grid() -> String {
    module(
        r#"
.visible .entry ids(.param .u64 po)
{
    .reg .b32 %r<20>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [po];
    mov.u32 %r1, %tid.x;
    mov.u32 %r2, %tid.y;
    mov.u32 %r3, %tid.z;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %ntid.y;
    mov.u32 %r6, %ctaid.x;
    mov.u32 %r7, %ctaid.y;
    mov.u32 %r8, %nctaid.x;
    mov.u32 %r9, %laneid;
    mov.u32 %r10, %warpid;
    // linear thread in block, linear block, global index
    mad.lo.u32 %r11, %r3, %r5, %r2;
    mad.lo.u32 %r11, %r11, %r4, %r1;
    mad.lo.u32 %r12, %r7, %r8, %r6;
    mov.u32 %r13, %ntid.z;
    mul.lo.u32 %r14, %r4, %r5;
    mul.lo.u32 %r14, %r14, %r13;
    mad.lo.u32 %r15, %r12, %r14, %r11;
    mul.wide.u32 %rd2, %r15, 16;
    add.s64 %rd3, %rd1, %rd2;
    st.global.v4.u32 [%rd3], {%r11, %r12, %r9, %r10};
    ret;
}
"#,
    )
}

#[test]
fn special_registers_over_a_2d_grid_of_3d_blocks() {
    let mut it = Interpreter::new(&specials_and_grid()).unwrap();
    let (bx, by, bz) = (8u32, 3u32, 2u32);
    let (gx, gy) = (3u32, 2u32);
    let nt = (bx * by * bz) as usize;
    let total = nt * (gx * gy) as usize;
    let po = it.alloc_zeroed(total * 16);
    let st = it
        .launch("ids", (gx, gy), (bx, by, bz), 0, &[Arg::Ptr(po)])
        .unwrap();
    assert_eq!(st.blocks, 6);
    let out: Vec<u32> = it.read_vec(po, total * 4).unwrap();
    for g in 0..total {
        let (t, b) = (g % nt, g / nt);
        assert_eq!(
            &out[g * 4..g * 4 + 4],
            &[t as u32, b as u32, (t % 32) as u32, (t / 32) as u32]
        );
    }
}

fn shuffles() -> String {
    module(
        r#"
.visible .entry shuffles(.param .u64 po, .param .u32 width)
{
    .reg .pred %p<8>;
    .reg .b32 %r<24>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [po];
    ld.param.u32 %r20, [width];
    mov.u32 %r1, %laneid;
    mul.lo.u32 %r2, %r1, 7;
    add.u32 %r2, %r2, 100;
    // c for up: (32 - width) << 8; for the others also | 31
    sub.u32 %r3, 32, %r20;
    shl.b32 %r4, %r3, 8;
    or.b32 %r5, %r4, 31;
    shfl.sync.up.b32 %r6|%p1, %r2, 3, %r4, -1;
    shfl.sync.down.b32 %r7|%p2, %r2, 5, %r5, -1;
    shfl.sync.bfly.b32 %r8|%p3, %r2, 6, %r5, -1;
    shfl.sync.idx.b32 %r9|%p4, %r2, 13, %r5, -1;
    setp.eq.u32 %p5, %r1, 3;
    and.b32 %r10, %r1, 3;
    setp.eq.u32 %p6, %r10, 0;
    vote.sync.ballot.b32 %r11, %p6, -1;
    vote.sync.any.pred %p7, %p5, -1;
    selp.u32 %r12, 1, 0, %p7;
    vote.sync.all.pred %p7, %p6, -1;
    selp.u32 %r13, 1, 0, %p7;
    vote.sync.uni.pred %p7, %p6, -1;
    selp.u32 %r14, 1, 0, %p7;
    selp.u32 %r15, 1, 0, %p1;
    selp.u32 %r16, 1, 0, %p2;
    selp.u32 %r17, 1, 0, %p3;
    selp.u32 %r18, 1, 0, %p4;
    mul.wide.u32 %rd2, %r1, 48;
    add.s64 %rd3, %rd1, %rd2;
    st.global.v4.u32 [%rd3], {%r6, %r7, %r8, %r9};
    st.global.v4.u32 [%rd3+16], {%r11, %r12, %r13, %r14};
    st.global.v4.u32 [%rd3+32], {%r15, %r16, %r17, %r18};
    ret;
}
"#,
    )
}

#[test]
fn shfl_and_vote_follow_cuda_semantics() {
    let mut it = Interpreter::new(&shuffles()).unwrap();
    for width in [32u32, 16, 8] {
        let po = it.alloc_zeroed(32 * 48);
        it.launch("shuffles", 1, 32, 0, &[Arg::Ptr(po), Arg::U32(width)])
            .unwrap();
        let out: Vec<u32> = it.read_vec(po, 32 * 12).unwrap();
        let v = |l: u32| l * 7 + 100;
        for l in 0..32u32 {
            let o = &out[l as usize * 12..l as usize * 12 + 12];
            let seg = l % width;
            // __shfl_up_sync(v, 3, width)
            let (up, up_ok) = if seg >= 3 { (v(l - 3), 1) } else { (v(l), 0) };
            // __shfl_down_sync(v, 5, width)
            let (down, down_ok) = if seg + 5 < width {
                (v(l + 5), 1)
            } else {
                (v(l), 0)
            };
            // __shfl_xor_sync(v, 6, width)
            let x = l ^ 6;
            let (bfly, bfly_ok) = if x / width == l / width {
                (v(x), 1)
            } else {
                (v(l), 0)
            };
            // __shfl_sync(v, 13, width)
            let src = (l / width) * width + 13 % width;
            let idx = v(src);
            assert_eq!(&o[0..4], &[up, down, bfly, idx], "width {width} lane {l}");
            assert_eq!(
                &o[8..12],
                &[up_ok, down_ok, bfly_ok, 1],
                "width {width} lane {l} predicates"
            );
            assert_eq!(&o[4..8], &[0x1111_1111, 1, 0, 0], "votes lane {l}");
        }
    }
}

fn atomics() -> String {
    module(
        r#"
.visible .entry atomics(.param .u64 pcount, .param .u64 pold, .param .u64 pf, .param .u64 phist)
{
    .reg .pred %p<4>;
    .reg .b32 %r<16>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<12>;
    .shared .align 4 .u32 hist[8];
    ld.param.u64 %rd1, [pcount];
    ld.param.u64 %rd2, [pold];
    ld.param.u64 %rd3, [pf];
    ld.param.u64 %rd4, [phist];
    mov.u32 %r1, %tid.x;
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mad.lo.u32 %r4, %r2, %r3, %r1;
    // unique tickets
    atom.global.add.u32 %r5, [%rd1], 1;
    mul.wide.u32 %rd5, %r4, 4;
    add.s64 %rd6, %rd2, %rd5;
    st.global.u32 [%rd6], %r5;
    red.global.add.u32 [%rd1+4], %r4;
    atom.global.max.s32 %r6, [%rd1+8], %r4;
    atom.global.min.u32 %r6, [%rd1+12], %r4;
    atom.global.or.b32 %r6, [%rd1+16], %r4;
    cvt.rn.f32.u32 %f1, %r4;
    red.global.add.f32 [%rd3], %f1;
    // compare-and-swap: only the thread that sees 0 stores its id + 1
    add.u32 %r7, %r4, 1;
    atom.global.cas.b32 %r8, [%rd1+20], 0, %r7;
    // shared histogram of tid % 8
    setp.lt.u32 %p1, %r1, 8;
    @%p1 st.shared.u32 [hist+0], 0;
    @%p1 mul.lo.u32 %r9, %r1, 4;
    @%p1 mov.u32 %r10, hist;
    @%p1 add.u32 %r11, %r10, %r9;
    @%p1 st.shared.u32 [%r11], 0;
    bar.sync 0;
    and.b32 %r12, %r1, 7;
    mul.lo.u32 %r12, %r12, 4;
    mov.u32 %r13, hist;
    add.u32 %r13, %r13, %r12;
    atom.shared.add.u32 %r14, [%r13], 1;
    bar.sync 0;
    @!%p1 bra DONE;
    ld.shared.u32 %r15, [%r11];
    mul.wide.u32 %rd7, %r4, 4;
    add.s64 %rd8, %rd4, %rd7;
    st.global.u32 [%rd8], %r15;
DONE:
    ret;
}
"#,
    )
}

#[test]
fn atom_and_red_on_global_and_shared() {
    let mut it = Interpreter::new(&atomics()).unwrap();
    let (blocks, threads) = (4u32, 96u32);
    let n = (blocks * threads) as usize;
    let pcount = it.alloc_slice(&[0u32, 0, 0, u32::MAX, 0, 0]);
    let pold = it.alloc_zeroed(n * 4);
    let pf = it.alloc_zeroed(4);
    let phist = it.alloc_zeroed(n * 4);
    it.launch(
        "atomics",
        blocks,
        threads,
        0,
        &[
            Arg::Ptr(pcount),
            Arg::Ptr(pold),
            Arg::Ptr(pf),
            Arg::Ptr(phist),
        ],
    )
    .unwrap();
    let c: Vec<u32> = it.read_vec(pcount, 6).unwrap();
    assert_eq!(c[0], n as u32);
    assert_eq!(c[1], (0..n as u32).sum::<u32>());
    assert_eq!(c[2], n as u32 - 1);
    assert_eq!(c[3], 0);
    assert_eq!(c[4], (0..n as u32).fold(0, |a, b| a | b));
    assert_eq!(c[5], 1, "the first thread in execution order wins the cas");
    let mut old: Vec<u32> = it.read_vec(pold, n).unwrap();
    old.sort_unstable();
    assert_eq!(old, (0..n as u32).collect::<Vec<_>>());
    let f = it.read_f32(pf, 1).unwrap()[0];
    assert_eq!(f, (0..n).map(|x| x as f32).sum::<f32>());
    let hist: Vec<u32> = it.read_vec(phist, n).unwrap();
    for b in 0..blocks as usize {
        for t in 0..8 {
            assert_eq!(
                hist[b * threads as usize + t],
                threads / 8,
                "block {b} bin {t}"
            );
        }
    }
}

fn block_reduce() -> String {
    module(
        r#"
// Tree reduction over 256 threads in shared memory with bar.sync in a loop.
.visible .entry block_sum(.param .u64 pin, .param .u64 pout)
{
    .reg .pred %p<4>;
    .reg .b32 %r<16>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<8>;
    .shared .align 4 .f32 buf[256];
    ld.param.u64 %rd1, [pin];
    ld.param.u64 %rd2, [pout];
    mov.u32 %r1, %tid.x;
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mad.lo.u32 %r4, %r2, %r3, %r1;
    mul.wide.u32 %rd3, %r4, 4;
    add.s64 %rd4, %rd1, %rd3;
    ld.global.f32 %f1, [%rd4];
    mov.u32 %r5, buf;
    shl.b32 %r6, %r1, 2;
    add.u32 %r7, %r5, %r6;
    st.shared.f32 [%r7], %f1;
    bar.sync 0;
    shr.u32 %r8, %r3, 1;
STEP:
    setp.eq.u32 %p1, %r8, 0;
    @%p1 bra END;
    setp.lt.u32 %p2, %r1, %r8;
    @!%p2 bra SKIP;
    shl.b32 %r9, %r8, 2;
    add.u32 %r10, %r7, %r9;
    ld.shared.f32 %f2, [%r10];
    ld.shared.f32 %f3, [%r7];
    add.f32 %f3, %f3, %f2;
    st.shared.f32 [%r7], %f3;
SKIP:
    bar.sync 0;
    shr.u32 %r8, %r8, 1;
    bra.uni STEP;
END:
    setp.ne.u32 %p3, %r1, 0;
    @%p3 bra DONE;
    ld.shared.f32 %f1, [buf];
    mul.wide.u32 %rd5, %r2, 4;
    add.s64 %rd6, %rd2, %rd5;
    st.global.f32 [%rd6], %f1;
DONE:
    ret;
}
"#,
    )
}

#[test]
fn shared_memory_reduction_with_barriers() {
    let mut it = Interpreter::new(&block_reduce()).unwrap();
    let blocks = 3usize;
    let x: Vec<f32> = (0..256 * blocks).map(|i| (i % 17) as f32 * 0.5).collect();
    let pin = it.alloc_slice(&x);
    let pout = it.alloc_zeroed(blocks * 4);
    it.launch(
        "block_sum",
        blocks as u32,
        256,
        0,
        &[Arg::Ptr(pin), Arg::Ptr(pout)],
    )
    .unwrap();
    let out = it.read_f32(pout, blocks).unwrap();
    for b in 0..blocks {
        let want: f32 = x[b * 256..(b + 1) * 256].iter().sum();
        assert_eq!(out[b], want);
    }
}

fn halves() -> String {
    module(
        r#"
.visible .entry halves(.param .u64 pa, .param .u64 po)
{
    .reg .b16 %h<8>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [pa];
    ld.param.u64 %rd2, [po];
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd3, %r1, 8;
    add.s64 %rd4, %rd1, %rd3;
    ld.global.v2.b32 {%r2, %r3}, [%rd4];
    fma.rn.bf16x2 %r4, %r2, %r3, %r2;
    add.rn.f16x2 %r5, %r2, %r3;
    mul.rn.f16x2 %r6, %r2, %r3;
    mov.b32 {%h1, %h2}, %r2;
    mov.b32 {%h3, %h4}, %r3;
    fma.rn.bf16 %h5, %h1, %h3, %h2;
    max.f16 %h6, %h2, %h4;
    mov.b32 %r7, {%h5, %h6};
    mul.wide.u32 %rd5, %r1, 16;
    add.s64 %rd6, %rd2, %rd5;
    st.global.v4.b32 [%rd6], {%r4, %r5, %r6, %r7};
    ret;
}
"#,
    )
}

#[test]
fn f16_and_bf16_arithmetic_packed_and_scalar() {
    use half::{bf16, f16};
    let mut rng = Rng(5);
    let n = 32;
    let raw: Vec<u32> = (0..2 * n).map(|_| rng.next_u32() & 0x3fff_3fff).collect();
    let mut it = Interpreter::new(&halves()).unwrap();
    let pa = it.alloc_slice(&raw);
    let po = it.alloc_zeroed(n * 16);
    it.launch("halves", 1, n as u32, 0, &[Arg::Ptr(pa), Arg::Ptr(po)])
        .unwrap();
    let out: Vec<u32> = it.read_vec(po, n * 4).unwrap();
    let lo = |v: u32| (v & 0xffff) as u16;
    let hi = |v: u32| (v >> 16) as u16;
    for i in 0..n {
        let (a, b) = (raw[2 * i], raw[2 * i + 1]);
        let bfma = |x: u16, y: u16, z: u16| {
            let (x, y, z) = (
                bf16::from_bits(x).to_f64(),
                bf16::from_bits(y).to_f64(),
                bf16::from_bits(z).to_f64(),
            );
            bf16::from_f64(x * y + z).to_bits()
        };
        let hop = |x: u16, y: u16, f: fn(f32, f32) -> f32| {
            f16::from_f32(f(f16::from_bits(x).to_f32(), f16::from_bits(y).to_f32())).to_bits()
        };
        let w0 =
            u32::from(bfma(lo(a), lo(b), lo(a))) | (u32::from(bfma(hi(a), hi(b), hi(a))) << 16);
        let w1 = u32::from(hop(lo(a), lo(b), |x, y| x + y))
            | (u32::from(hop(hi(a), hi(b), |x, y| x + y)) << 16);
        let w2 = u32::from(hop(lo(a), lo(b), |x, y| x * y))
            | (u32::from(hop(hi(a), hi(b), |x, y| x * y)) << 16);
        let w3 =
            u32::from(bfma(lo(a), lo(b), hi(a))) | (u32::from(hop(hi(a), hi(b), f32::max)) << 16);
        assert_eq!(&out[i * 4..i * 4 + 4], &[w0, w1, w2, w3], "thread {i}");
    }
}

#[test]
fn parse_errors_name_the_line() {
    let bad = module(
        ".visible .entry k()\n{\n    .reg .b32 %r<2>;\n    add.u32 %r1, %r1, %r9;\n    ret;\n}\n",
    );
    match Interpreter::new(&bad) {
        Err(fpdt_ptx::PtxError::Parse { line, message }) => {
            assert_eq!(line, 8);
            assert!(message.contains("%r9"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let bad = module(".visible .entry k()\n{\n    frobnicate.u32 1;\n}\n");
    let e = Interpreter::new(&bad).unwrap_err().to_string();
    assert!(e.contains("line 7") && e.contains("frobnicate"), "{e}");
    let bad = module(".visible .entry k()\n{\n    bra NOWHERE;\n}\n");
    assert!(Interpreter::new(&bad)
        .unwrap_err()
        .to_string()
        .contains("NOWHERE"));
    assert!(Interpreter::new("garbage").is_err());
    assert!(Interpreter::new(&module(".visible .entry k(\n")).is_err());
}

#[test]
fn launch_arguments_and_host_accesses_are_checked() {
    let mut it = Interpreter::new(&block_reduce()).unwrap();
    let p = it.alloc_zeroed(16);
    assert!(it.launch("nope", 1, 32, 0, &[]).is_err());
    assert!(it.launch("block_sum", 1, 32, 0, &[Arg::Ptr(p)]).is_err());
    assert!(it
        .launch("block_sum", 1, 32, 0, &[Arg::Ptr(p), Arg::U32(3)])
        .is_err());
    assert!(it
        .launch("block_sum", 1, 2048, 0, &[Arg::Ptr(p), Arg::Ptr(p)])
        .is_err());
    assert!(it.read(p, 17).is_err());
    assert!(it.read(p + 8, 8).is_ok());
    assert!(it.write(p + 12, &[0; 8]).is_err());
    assert!(p % 256 == 0 && p != 0);
    let q = it.alloc(&[1, 2, 3]);
    assert_eq!(it.read(q, 3).unwrap(), vec![1, 2, 3]);
    assert!(q > p + 16);
}

#[test]
fn run_takes_a_kernel_launch() {
    let text: &'static str = Box::leak(block_reduce().into_boxed_str());
    let mut it = Interpreter::new(&int_ops()).unwrap();
    let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let pin = it.alloc_slice(&x);
    let pout = it.alloc_zeroed(4);
    let l = fpdt_ptx::KernelLaunch {
        module: text,
        entry: "block_sum".into(),
        grid: 1.into(),
        block: 64.into(),
        shared_bytes: 0,
        args: vec![Arg::Ptr(pin), Arg::Ptr(pout)],
    };
    it.run(&l).unwrap();
    it.run(&l).unwrap();
    assert_eq!(
        it.read_f32(pout, 1).unwrap()[0],
        (0..64).sum::<i32>() as f32
    );
}

#[test]
fn test_kernels_are_real_ptx() {
    assemble_all(&[
        ("int_ops", int_ops()),
        ("float_ops", float_ops()),
        ("cvt", cvt_kernel()),
        ("diverge", control_flow()),
        ("ids", specials_and_grid()),
        ("shuffles", shuffles()),
        ("atomics", atomics()),
        ("block_sum", block_reduce()),
        ("halves", halves()),
    ]);
}
