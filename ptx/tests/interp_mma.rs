//! Tensor-core PTX on the interpreter: ldmatrix layouts (x1/x2/x4, .trans)
//! against the PTX ISA's fragment figures, mma.sync m16n8k16 products of
//! random bf16/f16 matrices against an f64 product, a tiled 64x64x64 GEMM
//! fed by cp.async, and cp.async's commit/wait groups.

mod interp_support;

use std::fmt::Write;

use fpdt_ptx::interp::{Fault, Interpreter};
use fpdt_ptx::{Arg, PtxError};
use half::{bf16, f16};
use interp_support::{assemble_all, module, Rng};

fn ldmatrix_kernel() -> String {
    module(
        r#"
// Shared memory holds 4 row-major 8x8 b16 matrices (matrix m, row r at byte
// m*128 + r*16); each form of ldmatrix stores its registers per lane.
.visible .entry ldm(.param .u64 pin, .param .u64 pout)
{
    .reg .b32 %r<40>;
    .reg .b64 %rd<8>;
    .shared .align 16 .b8 mats[512];
    ld.param.u64 %rd1, [pin];
    ld.param.u64 %rd2, [pout];
    mov.u32 %r1, %laneid;
    // copy 512 bytes: 16 per lane
    mul.wide.u32 %rd3, %r1, 16;
    add.s64 %rd4, %rd1, %rd3;
    ld.global.v4.u32 {%r2, %r3, %r4, %r5}, [%rd4];
    mov.u32 %r6, mats;
    shl.b32 %r7, %r1, 4;
    add.u32 %r8, %r6, %r7;
    st.shared.v4.u32 [%r8], {%r2, %r3, %r4, %r5};
    bar.warp.sync -1;
    // lane l gives the address of row l % 8 of matrix l / 8
    ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%r10}, [%r8];
    ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%r11, %r12}, [%r8];
    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r13, %r14, %r15, %r16}, [%r8];
    ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%r17, %r18, %r19, %r20}, [%r8];
    ldmatrix.sync.aligned.m8n8.x2.trans.shared::cta.b16 {%r21, %r22}, [%r8];
    mul.wide.u32 %rd5, %r1, 48;
    add.s64 %rd6, %rd2, %rd5;
    st.global.v4.u32 [%rd6], {%r10, %r11, %r12, %r13};
    st.global.v4.u32 [%rd6+16], {%r14, %r15, %r16, %r17};
    st.global.v4.u32 [%rd6+32], {%r18, %r19, %r20, %r21};
    ret;
}
"#,
    )
}

#[test]
fn ldmatrix_layouts_match_the_ptx_isa() {
    // element (m, r, c) = m * 64 + r * 8 + c
    let mats: Vec<u16> = (0..256u16).collect();
    let mut it = Interpreter::new(&ldmatrix_kernel()).unwrap();
    let pin = it.alloc_slice(&mats);
    let pout = it.alloc_zeroed(32 * 48);
    it.launch("ldm", 1, 32, 0, &[Arg::Ptr(pin), Arg::Ptr(pout)])
        .unwrap();
    let out: Vec<u32> = it.read_vec(pout, 32 * 12).unwrap();
    let el = |m: u32, r: u32, c: u32| m * 64 + r * 8 + c;
    for l in 0..32u32 {
        let o = &out[l as usize * 12..l as usize * 12 + 12];
        // thread l holds row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1
        let frag = |m: u32| el(m, l / 4, 2 * (l % 4)) | (el(m, l / 4, 2 * (l % 4) + 1) << 16);
        // transposed: column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1
        let trans = |m: u32| el(m, 2 * (l % 4), l / 4) | (el(m, 2 * (l % 4) + 1, l / 4) << 16);
        let want = [
            frag(0),
            frag(0),
            frag(1),
            frag(0),
            frag(1),
            frag(2),
            frag(3),
            trans(0),
            trans(1),
            trans(2),
            trans(3),
            trans(0),
        ];
        assert_eq!(o, &want[..], "lane {l}");
    }
}

/// One warp: D (16x8 f32) = A (16x16, row-major) @ B (16x8, row-major) + C,
/// A via ldmatrix.x4 with generic addresses, B via ldmatrix.x2.trans.
fn mma_one(ty: &str) -> String {
    module(&format!(
        r#"
.visible .entry mma_one(.param .u64 pa, .param .u64 pb, .param .u64 pc, .param .u64 pd)
{{
    .reg .b32 %r<40>;
    .reg .f32 %f<12>;
    .reg .b64 %rd<20>;
    .shared .align 16 .b8 sa[512];
    .shared .align 16 .b8 sb[256];
    ld.param.u64 %rd1, [pa];
    ld.param.u64 %rd2, [pb];
    ld.param.u64 %rd3, [pc];
    ld.param.u64 %rd4, [pd];
    mov.u32 %r1, %laneid;
    // A: 16 bytes per lane, B: 8 bytes per lane, by cp.async
    mov.u32 %r2, sa;
    shl.b32 %r3, %r1, 4;
    add.u32 %r4, %r2, %r3;
    mul.wide.u32 %rd5, %r1, 16;
    add.s64 %rd6, %rd1, %rd5;
    cp.async.cg.shared.global [%r4], [%rd6], 16;
    mov.u32 %r5, sb;
    shl.b32 %r6, %r1, 3;
    add.u32 %r7, %r5, %r6;
    mul.wide.u32 %rd7, %r1, 8;
    add.s64 %rd8, %rd2, %rd7;
    cp.async.ca.shared.global [%r7], [%rd8], 8;
    cp.async.commit_group;
    cp.async.wait_group 0;
    bar.sync 0;
    // A: lane l -> row l % 16, column block (l / 16) * 8
    and.b32 %r8, %r1, 15;
    shr.u32 %r9, %r1, 4;
    shl.b32 %r10, %r8, 5;
    shl.b32 %r11, %r9, 4;
    add.u32 %r12, %r10, %r11;
    add.u32 %r13, %r2, %r12;
    cvt.u64.u32 %rd9, %r13;
    cvta.shared.u64 %rd10, %rd9;
    ldmatrix.sync.aligned.m8n8.x4.b16 {{%r20, %r21, %r22, %r23}}, [%rd10];
    // B (k x n, row-major): lane l (< 16) -> row k = l
    shl.b32 %r14, %r8, 4;
    add.u32 %r15, %r5, %r14;
    ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {{%r24, %r25}}, [%r15];
    // C and D: row g = l / 4 (and g + 8), columns 2 (l % 4) + {{0, 1}}
    shr.u32 %r16, %r1, 2;
    and.b32 %r17, %r1, 3;
    shl.b32 %r18, %r16, 3;
    shl.b32 %r19, %r17, 1;
    add.u32 %r18, %r18, %r19;
    mul.wide.u32 %rd11, %r18, 4;
    add.s64 %rd12, %rd3, %rd11;
    ld.global.v2.f32 {{%f1, %f2}}, [%rd12];
    ld.global.v2.f32 {{%f3, %f4}}, [%rd12+256];
    mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{%f5, %f6, %f7, %f8}}, {{%r20, %r21, %r22, %r23}}, {{%r24, %r25}}, {{%f1, %f2, %f3, %f4}};
    add.s64 %rd13, %rd4, %rd11;
    st.global.v2.f32 [%rd13], {{%f5, %f6}};
    st.global.v2.f32 [%rd13+256], {{%f7, %f8}};
    ret;
}}
"#
    ))
}

fn to_bits(x: &[f32], bf: bool) -> (Vec<u16>, Vec<f64>) {
    x.iter()
        .map(|&v| {
            if bf {
                let h = bf16::from_f32(v);
                (h.to_bits(), h.to_f64())
            } else {
                let h = f16::from_f32(v);
                (h.to_bits(), h.to_f64())
            }
        })
        .unzip()
}

fn check_product(
    got: &[f32],
    a: &[f64],
    b_kn: impl Fn(usize, usize) -> f64,
    c: &[f32],
    m: usize,
    n: usize,
    k: usize,
) {
    let mut worst = 0f64;
    for i in 0..m {
        for j in 0..n {
            let mut s = f64::from(c[i * n + j]);
            let mut mag = s.abs();
            for kk in 0..k {
                let p = a[i * k + kk] * b_kn(kk, j);
                s += p;
                mag += p.abs();
            }
            let g = f64::from(got[i * n + j]);
            let rel = (g - s).abs() / s.abs().max(1e-3);
            assert!(rel < 1e-2, "({i},{j}): got {g}, want {s}, rel err {rel}");
            // f32 accumulation of exact products: far tighter than 1e-2
            assert!(
                (g - s).abs() <= 1e-5 * mag.max(1.0),
                "({i},{j}): got {g}, want {s}"
            );
            worst = worst.max(rel);
        }
    }
    println!("worst relative error {worst:e}");
}

#[test]
fn mma_m16n8k16_bf16_and_f16_match_an_f64_product() {
    for (ty, bf) in [("bf16", true), ("f16", false)] {
        let mut rng = Rng(if bf { 3 } else { 4 });
        let af: Vec<f32> = (0..256).map(|_| rng.f32() * 2.0).collect();
        let bfv: Vec<f32> = (0..128).map(|_| rng.f32() * 2.0).collect();
        let c: Vec<f32> = (0..128).map(|_| rng.f32()).collect();
        let (ab, a64) = to_bits(&af, bf);
        let (bb, b64) = to_bits(&bfv, bf);
        let mut it = Interpreter::new(&mma_one(ty)).unwrap();
        let pa = it.alloc_slice(&ab);
        let pb = it.alloc_slice(&bb);
        let pc = it.alloc_slice(&c);
        let pd = it.alloc_zeroed(128 * 4);
        it.launch(
            "mma_one",
            1,
            32,
            0,
            &[Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(pc), Arg::Ptr(pd)],
        )
        .unwrap();
        let d = it.read_f32(pd, 128).unwrap();
        check_product(&d, &a64, |k, n| b64[k * 8 + n], &c, 16, 8, 16);
    }
}

/// A block of 4 warps computes C (64x64 f32) = A (64x64) @ B^T with B stored
/// as [n][k] (the `.col` operand, as in Q K^T); A and B reach shared memory
/// by cp.async in two groups. Generated with the k and n loops unrolled.
pub fn gemm_64() -> String {
    let mut s = String::new();
    s.push_str(
        r#"
.visible .entry gemm64(.param .u64 pa, .param .u64 pb, .param .u64 pc)
{
    .reg .pred %p<2>;
    .reg .b32 %r<64>;
    .reg .b32 %ra<4>;
    .reg .b32 %rb<2>;
    .reg .f32 %acc<32>;
    .reg .b64 %rd<16>;
    .shared .align 16 .b8 sa[8192];
    .shared .align 16 .b8 sb[8192];
    ld.param.u64 %rd1, [pa];
    ld.param.u64 %rd2, [pb];
    ld.param.u64 %rd3, [pc];
    mov.u32 %r1, %tid.x;
    mov.u32 %r2, %laneid;
    mov.u32 %r3, %warpid;
    mov.u32 %r4, sa;
    mov.u32 %r5, sb;
    // 512 chunks of 16 bytes per matrix: chunk i = tid + 128 j
"#,
    );
    for (mat, base, greg) in [("a", "%r4", "%rd1"), ("b", "%r5", "%rd2")] {
        for j in 0..4 {
            let _ = writeln!(s, "    add.u32 %r6, %r1, {};", 128 * j);
            s.push_str("    shl.b32 %r7, %r6, 4;\n");
            let _ = writeln!(s, "    add.u32 %r8, {base}, %r7;");
            s.push_str("    cvt.u64.u32 %rd4, %r7;\n");
            let _ = writeln!(s, "    add.s64 %rd5, {greg}, %rd4;");
            s.push_str("    cp.async.cg.shared.global [%r8], [%rd5], 16;\n");
        }
        let _ = writeln!(s, "    cp.async.commit_group; // group {mat}");
    }
    s.push_str("    cp.async.wait_group 1;\n    cp.async.wait_group 0;\n    bar.sync 0;\n");
    for i in 0..32 {
        let _ = writeln!(s, "    mov.f32 %acc{i}, 0f00000000;");
    }
    // A address for lane l: row 16 w + l % 16, column (l / 16) * 8 (+ 16 kk)
    s.push_str(
        r#"    and.b32 %r9, %r2, 15;
    shl.b32 %r10, %r3, 4;
    add.u32 %r9, %r9, %r10;
    shl.b32 %r9, %r9, 7;
    shr.u32 %r11, %r2, 4;
    shl.b32 %r11, %r11, 4;
    add.u32 %r9, %r9, %r11;
    add.u32 %r12, %r4, %r9;
    // B address for lane l (< 16): row n = l % 8 (+ 8 j), column k = (l / 8) * 8 (+ 16 kk)
    and.b32 %r13, %r2, 7;
    shl.b32 %r13, %r13, 7;
    shr.u32 %r14, %r2, 3;
    and.b32 %r14, %r14, 1;
    shl.b32 %r14, %r14, 4;
    add.u32 %r13, %r13, %r14;
    add.u32 %r15, %r5, %r13;
"#,
    );
    for kk in 0..4 {
        let _ = writeln!(
            s,
            "    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{%ra0, %ra1, %ra2, %ra3}}, [%r12+{}];",
            kk * 32
        );
        for j in 0..8 {
            let _ = writeln!(
                s,
                "    ldmatrix.sync.aligned.m8n8.x2.shared.b16 {{%rb0, %rb1}}, [%r15+{}];",
                j * 8 * 128 + kk * 32
            );
            let a = 4 * j;
            let _ = writeln!(
                s,
                "    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{%acc{a}, %acc{}, %acc{}, %acc{}}}, {{%ra0, %ra1, %ra2, %ra3}}, {{%rb0, %rb1}}, {{%acc{a}, %acc{}, %acc{}, %acc{}}};",
                a + 1,
                a + 2,
                a + 3,
                a + 1,
                a + 2,
                a + 3
            );
        }
    }
    // store: row 16 w + g (and + 8), column 8 j + 2 t
    s.push_str(
        r#"    shr.u32 %r16, %r2, 2;
    and.b32 %r17, %r2, 3;
    shl.b32 %r18, %r3, 4;
    add.u32 %r16, %r16, %r18;
    shl.b32 %r19, %r16, 6;
    shl.b32 %r20, %r17, 1;
    add.u32 %r19, %r19, %r20;
    mul.wide.u32 %rd6, %r19, 4;
    add.s64 %rd7, %rd3, %rd6;
"#,
    );
    for j in 0..8 {
        let a = 4 * j;
        let _ = writeln!(
            s,
            "    st.global.v2.f32 [%rd7+{}], {{%acc{a}, %acc{}}};",
            j * 32,
            a + 1
        );
        let _ = writeln!(
            s,
            "    st.global.v2.f32 [%rd7+{}], {{%acc{}, %acc{}}};",
            j * 32 + 8 * 64 * 4,
            a + 2,
            a + 3
        );
    }
    s.push_str("    ret;\n}\n");
    module(&s)
}

#[test]
fn tiled_gemm_with_cp_async_ldmatrix_and_mma() {
    let mut rng = Rng(9);
    let af: Vec<f32> = (0..64 * 64).map(|_| rng.f32()).collect();
    let bfv: Vec<f32> = (0..64 * 64).map(|_| rng.f32()).collect();
    let (ab, a64) = to_bits(&af, true);
    let (bb, b64) = to_bits(&bfv, true);
    let mut it = Interpreter::new(&gemm_64()).unwrap();
    let pa = it.alloc_slice(&ab);
    let pb = it.alloc_slice(&bb);
    let pc = it.alloc_zeroed(64 * 64 * 4);
    let st = it
        .launch(
            "gemm64",
            1,
            128,
            0,
            &[Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(pc)],
        )
        .unwrap();
    assert_eq!(st.warps, 4);
    let c = it.read_f32(pc, 64 * 64).unwrap();
    let zero = vec![0f32; 64 * 64];
    // B is stored [n][k]
    check_product(&c, &a64, |k, n| b64[n * 64 + k], &zero, 64, 64, 64);
}

fn cp_async_groups() -> String {
    module(
        r#"
// Each thread copies three 16-byte chunks in three groups (the second
// with src-size 8, zero-filling the rest; the third with ignore-src),
// waiting with wait_group 2, 1, 0 and reading each chunk as it lands.
// With `early` set, chunk 2 is read after wait_group 1: not landed yet.
.visible .entry groups(.param .u64 pin, .param .u64 pout, .param .u32 early)
{
    .reg .pred %p<4>;
    .reg .b32 %r<24>;
    .reg .b64 %rd<12>;
    .shared .align 16 .b8 buf[3072];
    ld.param.u64 %rd1, [pin];
    ld.param.u64 %rd2, [pout];
    ld.param.u32 %r20, [early];
    setp.ne.u32 %p2, %r20, 0;
    mov.u32 %r1, %tid.x;
    mul.wide.u32 %rd3, %r1, 48;
    add.s64 %rd4, %rd1, %rd3;
    mov.u32 %r2, buf;
    mul.lo.u32 %r3, %r1, 48;
    add.u32 %r4, %r2, %r3;
    setp.eq.u32 %p1, %r1, %r1;
    cp.async.ca.shared.global [%r4], [%rd4], 16;
    cp.async.commit_group;
    cp.async.cg.shared.global [%r4+16], [%rd4+16], 16, 8;
    cp.async.commit_group;
    cp.async.cg.shared.global [%r4+32], [%rd4+32], 16, %p1;
    cp.async.commit_group;
    cp.async.wait_group 2;
    ld.shared.v4.u32 {%r5, %r6, %r7, %r8}, [%r4];
    cp.async.wait_group 1;
    ld.shared.v4.u32 {%r9, %r10, %r11, %r12}, [%r4+16];
    @%p2 ld.shared.v4.u32 {%r13, %r14, %r15, %r16}, [%r4+32]; // EARLY
    cp.async.wait_group 0;
    ld.shared.v4.u32 {%r13, %r14, %r15, %r16}, [%r4+32];
    mul.wide.u32 %rd5, %r1, 48;
    add.s64 %rd6, %rd2, %rd5;
    st.global.v4.u32 [%rd6], {%r5, %r6, %r7, %r8};
    st.global.v4.u32 [%rd6+16], {%r9, %r10, %r11, %r12};
    st.global.v4.u32 [%rd6+32], {%r13, %r14, %r15, %r16};
    ret;
}
"#,
    )
}

#[test]
fn cp_async_commit_and_wait_groups() {
    let n = 64usize;
    let src: Vec<u32> = (0..n as u32 * 12).map(|i| i * 3 + 1).collect();
    let text = cp_async_groups();
    let mut it = Interpreter::new(&text).unwrap();
    let pin = it.alloc_slice(&src);
    let pout = it.alloc_zeroed(n * 48);
    it.launch(
        "groups",
        1,
        n as u32,
        0,
        &[Arg::Ptr(pin), Arg::Ptr(pout), Arg::U32(0)],
    )
    .unwrap();
    let out: Vec<u32> = it.read_vec(pout, n * 12).unwrap();
    for t in 0..n {
        let s = &src[t * 12..t * 12 + 12];
        let want = [s[0], s[1], s[2], s[3], s[4], s[5], 0, 0, 0, 0, 0, 0];
        assert_eq!(&out[t * 12..t * 12 + 12], &want, "thread {t}");
    }
    match it.launch(
        "groups",
        1,
        n as u32,
        0,
        &[Arg::Ptr(pin), Arg::Ptr(pout), Arg::U32(1)],
    ) {
        Err(PtxError::Exec {
            fault,
            line,
            thread,
            ..
        }) => {
            assert_eq!(fault, Fault::UninitializedShared);
            assert_eq!(
                line,
                text.lines().position(|l| l.contains("// EARLY")).unwrap() + 1
            );
            assert_eq!(thread.x, 0);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn mma_needs_the_whole_warp() {
    let text = module(
        r#"
.visible .entry half_warp()
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .f32 %f<8>;
    mov.u32 %r1, %laneid;
    mov.b32 %r2, 0;
    mov.f32 %f1, 0f00000000;
    setp.lt.u32 %p1, %r1, 16;
    @%p1 mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f2, %f3, %f4, %f5}, {%r2, %r2, %r2, %r2}, {%r2, %r2}, {%f1, %f1, %f1, %f1};
    ret;
}
"#,
    );
    let mut it = Interpreter::new(&text).unwrap();
    match it.launch("half_warp", 1, 32, 0, &[]) {
        Err(PtxError::Exec {
            fault: Fault::Divergence,
            thread,
            ..
        }) => assert_eq!(thread.x, 16),
        other => panic!("{other:?}"),
    }
    assemble_all(&[("half_warp", text)]);
}

#[test]
fn tensor_core_kernels_are_real_ptx() {
    assemble_all(&[
        ("ldm", ldmatrix_kernel()),
        ("mma_bf16", mma_one("bf16")),
        ("mma_f16", mma_one("f16")),
        ("gemm64", gemm_64()),
        ("groups", cp_async_groups()),
    ]);
}
