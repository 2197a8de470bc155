//! Every `.ptx` kernel run on the PTX interpreter at small shapes through
//! its launcher, against its CPU twin within bf16 tolerance (1e-2, relative
//! in the max norm); the interpreter's bounds, race and uninitialized-read
//! checks are on, so a clean run also means they stayed silent.

mod common;

use common::*;
use fpdt_ptx::cpu::{self, AttnShape, DType};
use fpdt_ptx::interp::Interpreter;
use fpdt_ptx::kernels;
use fpdt_ptx::PtxError;
use half::bf16;

fn shape(q: usize, kv: usize, h: usize, kvh: usize, d: usize) -> AttnShape {
    AttnShape {
        q_tokens: q,
        kv_tokens: kv,
        heads: h,
        kv_heads: kvh,
        head_dim: d,
    }
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

#[test]
fn attn_fwd_matches_twin() {
    for (n, &(qt, kt, h, kvh, d, causal)) in [
        (17usize, 40usize, 2usize, 1usize, 64usize, false),
        (33, 33, 2, 2, 64, true),
        (9, 35, 2, 1, 128, false),
        (66, 66, 1, 1, 128, true),
    ]
    .iter()
    .enumerate()
    {
        let s = shape(qt, kt, h, kvh, d);
        let mut r = rng(40 + n as u64);
        let q: Vec<bf16> = to_e(&uniform(&mut r, s.q_len(), 1.0));
        let k: Vec<bf16> = to_e(&uniform(&mut r, s.kv_len(), 1.0));
        let v: Vec<bf16> = to_e(&uniform(&mut r, s.kv_len(), 1.0));
        let scale = s.default_scale();
        let mut o = vec![0.0f32; s.q_len()];
        let mut lse = vec![0.0f32; s.rows()];
        cpu::attn_fwd_chunk(&q, &k, &v, &s, causal, scale, &mut o, &mut lse).unwrap();

        let mut it = Interpreter::new(kernels::ATTN_FWD_PTX).unwrap();
        let p = kernels::AttnPtrs {
            q: it.alloc_slice(&q),
            k: it.alloc_slice(&k),
            v: it.alloc_slice(&v),
            o: it.alloc_zeroed(s.q_len() * 4),
            lse: it.alloc_zeroed(s.rows() * 4),
        };
        let l = kernels::attn_fwd_chunk(&s, causal, scale, DType::BF16, &p).unwrap();
        it.run(&l).unwrap();
        let go = it.read_f32(p.o, s.q_len()).unwrap();
        let gl = it.read_f32(p.lse, s.rows()).unwrap();
        let (eo, el) = (rel_err(&go, &f64s(&o)), rel_err(&gl, &f64s(&lse)));
        println!("{s:?} causal={causal}: o err {eo:e}, lse err {el:e}");
        assert!(
            eo < 1e-2 && el < 1e-3,
            "{s:?} causal={causal}: o {eo:e}, lse {el:e}"
        );
    }
}

#[test]
fn lse_merge_matches_twin() {
    let mut r = rng(50);
    let (rows, d) = (37, 72);
    let o0 = uniform(&mut r, rows * d, 1.0);
    let oj = uniform(&mut r, rows * d, 1.0);
    let mut l0 = uniform(&mut r, rows, 20.0);
    let mut lj = uniform(&mut r, rows, 20.0);
    l0[0] = f32::NEG_INFINITY;
    lj[1] = f32::NEG_INFINITY;
    let mut it = Interpreter::new(kernels::LSE_MERGE_PTX).unwrap();
    let (po, pl, poj, plj) = (
        it.alloc_slice(&o0),
        it.alloc_slice(&l0),
        it.alloc_slice(&oj),
        it.alloc_slice(&lj),
    );
    it.run(&kernels::lse_merge(rows, d, po, pl, poj, plj).unwrap())
        .unwrap();
    let (mut o, mut l) = (o0.clone(), l0.clone());
    cpu::lse_merge(&mut o, &mut l, &oj, &lj, d).unwrap();
    let go = it.read_f32(po, rows * d).unwrap();
    let gl = it.read_f32(pl, rows).unwrap();
    assert!(
        rel_err(&go, &f64s(&o)) < 1e-5,
        "o {:e}",
        rel_err(&go, &f64s(&o))
    );
    assert!(
        rel_err(&gl, &f64s(&l)) < 1e-5,
        "lse {:e}",
        rel_err(&gl, &f64s(&l))
    );
}

#[test]
fn attn_delta_matches_twin() {
    let mut r = rng(51);
    let (rows, d) = (19, 128);
    let a: Vec<bf16> = to_e(&uniform(&mut r, rows * d, 1.0));
    let b: Vec<bf16> = to_e(&uniform(&mut r, rows * d, 1.0));
    let mut want = vec![0.0f32; rows];
    cpu::attn_delta(&a, &b, d, &mut want).unwrap();
    let mut it = Interpreter::new(kernels::ATTN_DELTA_PTX).unwrap();
    let (pa, pb, pd) = (
        it.alloc_slice(&a),
        it.alloc_slice(&b),
        it.alloc_zeroed(rows * 4),
    );
    it.run(&kernels::attn_delta(rows, d, DType::BF16, pa, pb, pd).unwrap())
        .unwrap();
    let got = it.read_f32(pd, rows).unwrap();
    assert!(rel_err(&got, &f64s(&want)) < 1e-5);
}

#[test]
fn launchers_reject_bad_arguments() {
    let arg = |e: PtxError| match e {
        PtxError::BadArgument { arg, .. } => arg,
        _ => "other",
    };
    let p = kernels::AttnPtrs {
        q: 256,
        k: 512,
        v: 768,
        o: 1024,
        lse: 2048,
    };
    let s = shape(8, 8, 2, 1, 64);
    assert_eq!(
        arg(
            kernels::attn_fwd_chunk(&shape(8, 8, 2, 1, 96), false, 0.1, DType::BF16, &p)
                .unwrap_err()
        ),
        "head_dim"
    );
    assert_eq!(
        arg(kernels::attn_fwd_chunk(&s, false, 0.1, DType::F32, &p).unwrap_err()),
        "dtype"
    );
    assert_eq!(
        arg(kernels::attn_fwd_chunk(
            &s,
            false,
            0.1,
            DType::BF16,
            &kernels::AttnPtrs { k: 520, ..p }
        )
        .unwrap_err()),
        "k"
    );
    assert_eq!(
        arg(kernels::attn_fwd_chunk(
            &s,
            false,
            0.1,
            DType::BF16,
            &kernels::AttnPtrs { q: 0, ..p }
        )
        .unwrap_err()),
        "q"
    );
    assert_eq!(
        arg(
            kernels::attn_fwd_chunk(&shape(8, 4, 2, 1, 64), true, 0.1, DType::BF16, &p)
                .unwrap_err()
        ),
        "kv_tokens"
    );
    assert_eq!(
        arg(
            kernels::attn_fwd_chunk(&shape(8, 8, 3, 2, 64), false, 0.1, DType::BF16, &p)
                .unwrap_err()
        ),
        "kv_heads"
    );
    assert_eq!(
        arg(kernels::lse_merge(4, 0, 256, 256, 256, 256).unwrap_err()),
        "head_dim"
    );
    assert_eq!(
        arg(kernels::attn_delta(4, 64, DType::BF16, 257, 256, 256).unwrap_err()),
        "do"
    );
}
