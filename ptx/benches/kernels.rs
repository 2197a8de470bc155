//! CPU twins: attention forward and backward GFLOP/s at head dim 64 and 128
//! beside the `gemm` crate's f32 rate at the same FLOP count.
//!
//! Target (issue 4): the attention forward reaches at least 50% of gemm's
//! f32 matrix-product rate on this machine.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use fpdt_ptx::cpu::{self, AttnShape};
use half::bf16;

#[path = "../../benches/support/mod.rs"]
mod support;

fn fill(n: usize, seed: u32) -> Vec<f32> {
    // A cheap deterministic pattern in [-1, 1).
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(97));
            (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300))
        .sample_size(10)
        .configure_from_args();
    let tokens = 1024;
    let heads = 4;
    let mut rows = Vec::new();
    for d in [64usize, 128] {
        let s = AttnShape {
            q_tokens: tokens,
            kv_tokens: tokens,
            heads,
            kv_heads: heads,
            head_dim: d,
        };
        let q = fill(s.q_len(), 1);
        let k = fill(s.kv_len(), 2);
        let v = fill(s.kv_len(), 3);
        let do_ = fill(s.q_len(), 4);
        let (qb, kb, vb, dob): (Vec<bf16>, Vec<bf16>, Vec<bf16>, Vec<bf16>) = (
            q.iter().map(|&x| bf16::from_f32(x)).collect(),
            k.iter().map(|&x| bf16::from_f32(x)).collect(),
            v.iter().map(|&x| bf16::from_f32(x)).collect(),
            do_.iter().map(|&x| bf16::from_f32(x)).collect(),
        );
        let mut o = vec![0.0f32; s.q_len()];
        let mut lse = vec![0.0f32; s.rows()];
        let scale = s.default_scale();
        let fwd = format!("attn fwd d{d}");
        c.bench_function(&fwd, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    cpu::attn_fwd_chunk(&q, &k, &v, &s, false, scale, &mut o, &mut lse)
                        .expect("fwd");
                }
                let e = t.elapsed();
                support::record(&fwd, e, iters);
                e
            })
        });
        let fwdb = format!("attn fwd bf16 d{d}");
        c.bench_function(&fwdb, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    cpu::attn_fwd_chunk(&qb, &kb, &vb, &s, false, scale, &mut o, &mut lse)
                        .expect("fwd");
                }
                let e = t.elapsed();
                support::record(&fwdb, e, iters);
                e
            })
        });
        let mut delta = vec![0.0f32; s.rows()];
        cpu::attn_delta(&do_, &o, d, &mut delta).expect("delta");
        let (mut dq, mut dk, mut dv) = (
            vec![0.0f32; s.q_len()],
            vec![0.0f32; s.kv_len()],
            vec![0.0f32; s.kv_len()],
        );
        let bwd = format!("attn bwd d{d}");
        c.bench_function(&bwd, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    cpu::attn_bwd_chunk(
                        &qb, &kb, &vb, &lse, &dob, &delta, &s, false, scale, &mut dq, &mut dk,
                        &mut dv,
                    )
                    .expect("bwd");
                }
                let e = t.elapsed();
                support::record(&bwd, e, iters);
                e
            })
        });
        // gemm at the forward's FLOP count: [tokens, 2*heads*d] x [2*heads*d, tokens].
        let kk = 2 * heads * d;
        let a = fill(tokens * kk, 5);
        let bm = fill(kk * tokens, 6);
        let mut cm = vec![0.0f32; tokens * tokens];
        let gname = format!("gemm f32 same flops d{d}");
        c.bench_function(&gname, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    cpu::gemm_f32(
                        tokens, tokens, kk, &mut cm, tokens, false, &a, kk, 1, &bm, tokens, 1, 1.0,
                        true,
                    )
                    .expect("gemm");
                    black_box(&cm);
                }
                let e = t.elapsed();
                support::record(&gname, e, iters);
                e
            })
        });
        let flops = s.fwd_flops();
        let rate = |name: &str, f: f64| f / support::median(name) / 1e9;
        let g = rate(&gname, flops);
        for (name, f) in [(&fwd, flops), (&fwdb, flops), (&bwd, 2.5 * flops)] {
            let r = rate(name, f);
            rows.push(vec![
                name.clone(),
                support::fmt_time(support::median(name)),
                format!("{r:.1}"),
                format!("{g:.1}"),
                format!("{:.0}%", 100.0 * r / g),
            ]);
        }
    }
    support::print_table(
        &format!("CPU attention twins ({tokens} x {tokens} tokens, {heads} heads, non-causal)"),
        &["kernel", "median", "GFLOP/s", "gemm f32 GFLOP/s", "of gemm"],
        &rows,
    );
}
