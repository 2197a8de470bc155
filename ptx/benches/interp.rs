//! The PTX interpreter's speed: the project's attention forward kernel on
//! one tile (a 64-row q block against 128 keys, head dim 64, one head:
//! cp.async, ldmatrix, mma.sync, shuffles), with the checks on and off, and
//! a plain ALU loop; instructions per second (warp instructions and thread
//! instructions) in a table at the end.
//!
//! Target (issue 3): the attention tile interprets in well under a second in
//! a release build.

use std::time::{Duration, Instant};

use criterion::Criterion;
use fpdt_ptx::cpu::{AttnShape, DType};
use fpdt_ptx::interp::{Interpreter, LaunchStats};
use fpdt_ptx::{kernels, Arg, KernelLaunch};
use half::bf16;

#[path = "../../benches/support/mod.rs"]
mod support;

const ALU_LOOP: &str = r#"
.version 8.0
.target sm_80
.address_size 64
.visible .entry alu_loop(.param .u64 po, .param .u32 iters)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [po];
    ld.param.u32 %r1, [iters];
    mov.u32 %r2, %tid.x;
    cvt.rn.f32.u32 %f1, %r2;
    mov.f32 %f2, 0f3F800000;
    mov.u32 %r3, 0;
LOOP:
    fma.rn.f32 %f2, %f2, 0f3F7FF000, %f1;
    xor.b32 %r4, %r3, %r2;
    add.u32 %r3, %r3, 1;
    setp.lt.u32 %p1, %r3, %r1;
    @%p1 bra LOOP;
    mul.wide.u32 %rd2, %r2, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.f32 [%rd3], %f2;
    ret;
}
"#;

fn fill(n: usize, seed: u32) -> Vec<bf16> {
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(97));
            bf16::from_f32((x >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
        })
        .collect()
}

struct Case {
    name: &'static str,
    it: Interpreter,
    launch: KernelLaunch,
    stats: LaunchStats,
}

fn attention_case(name: &'static str, checks: bool) -> Case {
    let s = AttnShape {
        q_tokens: 64,
        kv_tokens: 128,
        heads: 1,
        kv_heads: 1,
        head_dim: 64,
    };
    let mut it = Interpreter::new(kernels::ATTN_FWD_PTX).expect("attention module decodes");
    it.set_checks(checks);
    let p = kernels::AttnPtrs {
        q: it.alloc_slice(&fill(s.q_len(), 1)),
        k: it.alloc_slice(&fill(s.kv_len(), 2)),
        v: it.alloc_slice(&fill(s.kv_len(), 3)),
        o: it.alloc_zeroed(s.q_len() * 4),
        lse: it.alloc_zeroed(s.rows() * 4),
    };
    let launch =
        kernels::attn_fwd_chunk(&s, false, s.default_scale(), DType::BF16, &p).expect("launch");
    let stats = it.run(&launch).expect("attention tile runs");
    Case {
        name,
        it,
        launch,
        stats,
    }
}

fn alu_case() -> Case {
    let mut it = Interpreter::new(ALU_LOOP).expect("alu module decodes");
    let po = it.alloc_zeroed(256 * 4);
    let launch = KernelLaunch {
        module: ALU_LOOP,
        entry: "alu_loop".into(),
        grid: 1.into(),
        block: 256.into(),
        shared_bytes: 0,
        args: vec![Arg::Ptr(po), Arg::U32(2000)],
    };
    let stats = it.run(&launch).expect("alu loop runs");
    Case {
        name: "alu loop 256 threads x 2000",
        it,
        launch,
        stats,
    }
}

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300))
        .sample_size(10)
        .configure_from_args();
    let mut cases = vec![
        attention_case("attn fwd tile 64x128 d64 (checks on)", true),
        attention_case("attn fwd tile 64x128 d64 (checks off)", false),
        alu_case(),
    ];
    for case in &mut cases {
        let name = case.name;
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    case.it.run(&case.launch).expect("launch");
                }
                let e = t.elapsed();
                support::record(name, e, iters);
                e
            });
        });
    }
    c.final_summary();
    let rows: Vec<Vec<String>> = cases
        .iter()
        .map(|case| {
            let t = support::median(case.name);
            let st = case.stats;
            vec![
                case.name.to_string(),
                support::fmt_time(t),
                st.instructions.to_string(),
                st.thread_instructions.to_string(),
                format!("{:.1}", st.instructions as f64 / t / 1e6),
                format!("{:.1}", st.thread_instructions as f64 / t / 1e6),
            ]
        })
        .collect();
    support::print_table(
        "PTX interpreter (release, one thread)",
        &[
            "kernel",
            "median",
            "warp instr",
            "thread instr",
            "M warp instr/s",
            "M thread instr/s",
        ],
        &rows,
    );
    let attn = support::median(cases[0].name);
    println!(
        "attention tile with checks: {} (target: well under 1 s) -> {}",
        support::fmt_time(attn),
        if attn < 0.5 { "met" } else { "NOT met" }
    );
}
