//! Each checker of the PTX interpreter, triggered by a small faulty kernel,
//! and the same kernels fixed, which must pass.

mod interp_support;

use fpdt_ptx::interp::{Fault, Interpreter};
use fpdt_ptx::{Arg, Dim3, PtxError};
use interp_support::{assemble_all, module};

/// Runs `entry` and returns (fault, line, block, thread, message).
fn fault_of(
    text: &str,
    entry: &str,
    grid: u32,
    block: u32,
    args: &[Arg],
) -> (Fault, usize, Dim3, Dim3, String) {
    let mut it = Interpreter::new(text).unwrap();
    let args: Vec<Arg> = args
        .iter()
        .map(|a| match a {
            Arg::Ptr(n) => Arg::Ptr(it.alloc_zeroed(*n as usize)),
            x => *x,
        })
        .collect();
    match it.launch(entry, grid, block, 0, &args) {
        Err(PtxError::Exec {
            kernel,
            line,
            block,
            thread,
            fault,
            message,
        }) => {
            assert_eq!(kernel, entry);
            (fault, line, block, thread, message)
        }
        other => panic!("{entry}: expected a fault, got {other:?}"),
    }
}

/// 1-based line of the first line of `text` containing `pat`.
fn line_of(text: &str, pat: &str) -> usize {
    text.lines()
        .position(|l| l.contains(pat))
        .map(|i| i + 1)
        .unwrap()
}

fn oob() -> String {
    module(
        r#"
.visible .entry oob_global(.param .u64 p)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [p];
    mov.u32 %r1, %tid.x;
    setp.eq.u32 %p1, %r1, 40;
    // thread 40 writes one element past the end of 64 floats
    @%p1 add.u32 %r1, %r1, 24;
    mul.wide.u32 %rd2, %r1, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r1; // STORE
    ret;
}

.visible .entry oob_shared()
{
    .reg .b32 %r<4>;
    .shared .align 4 .b8 buf[256];
    mov.u32 %r1, %tid.x;
    shl.b32 %r2, %r1, 3;
    mov.u32 %r3, buf;
    add.u32 %r3, %r3, %r2;
    st.shared.u32 [%r3], %r1; // SHARED_STORE
    ret;
}

.visible .entry misaligned(.param .u64 p)
{
    .reg .b32 %r<2>;
    .reg .b64 %rd<2>;
    ld.param.u64 %rd1, [p];
    ld.global.u32 %r1, [%rd1+2]; // MISALIGNED
    ret;
}
"#,
    )
}

#[test]
fn out_of_bounds_global_store_names_block_and_thread() {
    let t = oob();
    let (f, line, block, thread, msg) = fault_of(&t, "oob_global", 2, 64, &[Arg::Ptr(256)]);
    assert_eq!(f, Fault::OutOfBounds);
    assert_eq!(line, line_of(&t, "// STORE"));
    assert_eq!(block, Dim3::new(0, 0, 0));
    assert_eq!(thread, Dim3::new(40, 0, 0));
    assert!(msg.contains("past the end"), "{msg}");
}

#[test]
fn out_of_bounds_shared_and_misaligned_accesses() {
    let t = oob();
    let (f, line, _, thread, _) = fault_of(&t, "oob_shared", 1, 64, &[]);
    assert_eq!(f, Fault::OutOfBounds);
    assert_eq!(line, line_of(&t, "// SHARED_STORE"));
    assert_eq!(
        thread.x, 32,
        "256 bytes hold 32 strided u32 slots of 8 bytes"
    );
    let (f, line, _, thread, _) = fault_of(&t, "misaligned", 1, 32, &[Arg::Ptr(64)]);
    assert_eq!(f, Fault::Misaligned);
    assert_eq!(line, line_of(&t, "// MISALIGNED"));
    assert_eq!(thread.x, 0);
}

fn shared_kernels() -> String {
    module(
        r#"
// Even threads write their slot; every thread reads its own.
.visible .entry uninit(.param .u64 p)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<4>;
    .shared .align 4 .u32 buf[128];
    mov.u32 %r1, %tid.x;
    shl.b32 %r2, %r1, 2;
    mov.u32 %r3, buf;
    add.u32 %r3, %r3, %r2;
    and.b32 %r4, %r1, 1;
    setp.eq.u32 %p1, %r4, 0;
    @%p1 st.shared.u32 [%r3], %r1;
    bar.sync 0;
    ld.shared.u32 %r5, [%r3]; // UNINIT_READ
    ret;
}

// Thread t writes slot t and reads slot t + 32 (another warp's): with the
// barrier (fixed = 1) fine, without it a race.
.visible .entry neighbor(.param .u64 p, .param .u32 fixed)
{
    .reg .pred %p<2>;
    .reg .b32 %r<12>;
    .reg .b64 %rd<4>;
    .shared .align 4 .u32 buf[128];
    ld.param.u64 %rd1, [p];
    ld.param.u32 %r9, [fixed];
    setp.ne.u32 %p1, %r9, 0;
    mov.u32 %r1, %tid.x;
    shl.b32 %r2, %r1, 2;
    mov.u32 %r3, buf;
    add.u32 %r4, %r3, %r2;
    st.shared.u32 [%r4], %r1;
    bar.sync 0;
    add.u32 %r10, %r1, 1000;
    st.shared.u32 [%r4], %r10; // RACE_WRITE
    @%p1 bar.sync 0;
    add.u32 %r5, %r1, 32;
    and.b32 %r5, %r5, 127;
    shl.b32 %r6, %r5, 2;
    add.u32 %r7, %r3, %r6;
    ld.shared.u32 %r8, [%r7]; // RACE_READ
    mul.wide.u32 %rd2, %r1, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r8;
    ret;
}

// Every thread writes the same word: warps race.
.visible .entry same_word()
{
    .reg .b32 %r<2>;
    .shared .align 4 .u32 flag;
    mov.u32 %r1, %tid.x;
    st.shared.u32 [flag], %r1; // SAME_WORD
    ret;
}

// Reads after a barrier, then writes without one: write-after-read race.
.visible .entry war()
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .shared .align 4 .u32 buf[64];
    mov.u32 %r1, %tid.x;
    shl.b32 %r2, %r1, 2;
    mov.u32 %r3, buf;
    add.u32 %r4, %r3, %r2;
    st.shared.u32 [%r4], %r1;
    bar.sync 0;
    ld.shared.u32 %r5, [buf];
    setp.eq.u32 %p1, %r1, 63;
    @%p1 st.shared.u32 [buf], %r5; // WAR
    ret;
}
"#,
    )
}

#[test]
fn uninitialized_shared_read() {
    let t = shared_kernels();
    let (f, line, _, thread, msg) = fault_of(&t, "uninit", 1, 64, &[Arg::Ptr(4)]);
    assert_eq!(f, Fault::UninitializedShared);
    assert_eq!(line, line_of(&t, "// UNINIT_READ"));
    assert_eq!(thread.x, 1);
    assert!(msg.contains("not written"), "{msg}");
}

#[test]
fn shared_race_between_barriers_and_none_with_the_barrier() {
    let t = shared_kernels();
    let (f, line, _, thread, msg) = fault_of(&t, "neighbor", 1, 128, &[Arg::Ptr(512), Arg::U32(0)]);
    assert_eq!(f, Fault::SharedRace);
    // warp 0 runs first and reads slots 32..63 before warp 1 writes them
    // again; warp 1's write of slot 32 races with thread 0's read
    assert_eq!(line, line_of(&t, "// RACE_WRITE"));
    assert_eq!(thread.x, 32);
    assert!(msg.contains("read by thread (0,0,0)"), "{msg}");
    let (f, _, _, _, msg) = fault_of(&t, "same_word", 1, 64, &[]);
    assert_eq!(f, Fault::SharedRace);
    assert!(msg.contains("write by thread"), "{msg}");
    let (f, line, _, thread, _) = fault_of(&t, "war", 1, 64, &[]);
    assert_eq!(
        (f, line, thread.x),
        (Fault::SharedRace, line_of(&t, "// WAR"), 63)
    );

    let mut it = Interpreter::new(&t).unwrap();
    let p = it.alloc_zeroed(512);
    it.launch("neighbor", 1, 128, 0, &[Arg::Ptr(p), Arg::U32(1)])
        .unwrap();
    let out: Vec<u32> = it.read_vec(p, 128).unwrap();
    assert!(out
        .iter()
        .enumerate()
        .all(|(i, &v)| v as usize == (i + 32) % 128 + 1000));
}

fn barrier_kernels() -> String {
    module(
        r#"
.visible .entry early_exit()
{
    .reg .pred %p<2>;
    .reg .b32 %r<2>;
    mov.u32 %r1, %tid.x;
    setp.lt.u32 %p1, %r1, 32;
    @%p1 bra DONE; // EXIT_BRANCH
    bar.sync 0; // BARRIER
DONE:
    ret;
}

.visible .entry two_barriers()
{
    .reg .pred %p<2>;
    .reg .b32 %r<2>;
    mov.u32 %r1, %tid.x;
    setp.lt.u32 %p1, %r1, 64;
    @%p1 bra OTHER;
    bar.sync 0; // FIRST
    bra.uni DONE;
OTHER:
    bar.sync 1; // SECOND
DONE:
    ret;
}

.visible .entry named_ok(.param .u64 p)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<4>;
    .shared .align 4 .u32 buf[128];
    ld.param.u64 %rd1, [p];
    mov.u32 %r1, %tid.x;
    shl.b32 %r2, %r1, 2;
    mov.u32 %r3, buf;
    add.u32 %r3, %r3, %r2;
    st.shared.u32 [%r3], %r1;
    setp.lt.u32 %p1, %r1, 64;
    // two groups of 64 threads, each with its own barrier
    @%p1 bar.sync 1, 64;
    @!%p1 bar.sync 2, 64;
    bar.sync 0;
    ret;
}
"#,
    )
}

#[test]
fn partial_barrier_names_a_missing_thread() {
    let t = barrier_kernels();
    let (f, line, _, thread, msg) = fault_of(&t, "early_exit", 1, 128, &[]);
    assert_eq!(f, Fault::PartialBarrier);
    assert_eq!(line, line_of(&t, "// BARRIER"));
    assert_eq!(thread.x, 0);
    assert!(msg.contains("96 of 128") && msg.contains("exited"), "{msg}");
    let (f, _, _, thread, msg) = fault_of(&t, "two_barriers", 1, 128, &[]);
    assert_eq!(f, Fault::PartialBarrier);
    assert!(msg.contains("waits at barrier"), "{msg}");
    assert_eq!(
        thread.x, 0,
        "thread 0 waits at barrier 1 while barrier 0 waits for it"
    );
    let mut it = Interpreter::new(&t).unwrap();
    let p = it.alloc_zeroed(4);
    it.launch("named_ok", 1, 128, 0, &[Arg::Ptr(p)]).unwrap();
}

fn warp_kernels() -> String {
    module(
        r#"
.visible .entry shfl_diverged()
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    mov.u32 %r1, %laneid;
    setp.ge.u32 %p1, %r1, 16;
    @%p1 bra DONE;
    shfl.sync.bfly.b32 %r2, %r1, 1, 31, -1; // SHFL
DONE:
    ret;
}

.visible .entry shfl_half(.param .u64 p)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [p];
    mov.u32 %r1, %laneid;
    setp.ge.u32 %p1, %r1, 16;
    @%p1 bra DONE;
    shfl.sync.bfly.b32 %r2, %r1, 1, 31, 0xffff;
    mul.wide.u32 %rd2, %r1, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r2;
DONE:
    ret;
}

.visible .entry forever()
{
    .reg .b32 %r<2>;
    mov.u32 %r1, 0;
LOOP:
    add.u32 %r1, %r1, 1;
    bra.uni LOOP; // LOOP
}
"#,
    )
}

#[test]
fn warp_collectives_need_their_members_and_loops_hit_the_limit() {
    let t = warp_kernels();
    let (f, line, _, thread, msg) = fault_of(&t, "shfl_diverged", 1, 32, &[]);
    assert_eq!(f, Fault::Divergence);
    assert_eq!(line, line_of(&t, "// SHFL"));
    assert_eq!(thread.x, 0);
    assert!(msg.contains("0xffff0000"), "{msg}");
    let mut it = Interpreter::new(&t).unwrap();
    let p = it.alloc_zeroed(64);
    it.launch("shfl_half", 1, 32, 0, &[Arg::Ptr(p)]).unwrap();
    let out: Vec<u32> = it.read_vec(p, 16).unwrap();
    assert_eq!(out, (0..16u32).map(|l| l ^ 1).collect::<Vec<_>>());
    it.set_instruction_limit(10_000);
    match it.launch("forever", 1, 32, 0, &[]) {
        Err(PtxError::Exec {
            fault: Fault::Limit,
            line,
            ..
        }) => assert!(line >= line_of(&t, "LOOP:")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn error_messages_name_kernel_line_block_and_thread() {
    let t = oob();
    let mut it = Interpreter::new(&t).unwrap();
    let p = it.alloc_zeroed(256);
    let e = it
        .launch("oob_global", (1, 2), 64, 0, &[Arg::Ptr(p)])
        .unwrap_err()
        .to_string();
    let line = line_of(&t, "// STORE");
    assert!(
        e.starts_with(&format!(
            "oob_global: line {line}: block (0,0,0) thread (40,0,0): out-of-bounds access"
        )),
        "{e}"
    );
}

#[test]
fn checker_kernels_are_real_ptx() {
    assemble_all(&[
        ("oob", oob()),
        ("shared", shared_kernels()),
        ("barriers", barrier_kernels()),
        ("warps", warp_kernels()),
    ]);
}
