//! Attention twins against the naive f64 oracle: one pair forward and
//! backward (causal, GQA, head dims 64 and 128, odd lengths, f32 and bf16
//! storage), the LSE merge, chunked attention merged with the LSE merge
//! against unchunked attention, and the oracle's own gradient against
//! finite differences.

mod common;

use common::*;
use fpdt_ptx::cpu::{self, AttnShape, Element};
use fpdt_ptx::{reference, PtxError};
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

struct Inputs<E> {
    q: Vec<E>,
    k: Vec<E>,
    v: Vec<E>,
    do_: Vec<E>,
}

fn inputs<E: Element>(s: &AttnShape, seed: u64) -> Inputs<E> {
    let mut r = rng(seed);
    Inputs {
        q: to_e(&uniform(&mut r, s.q_len(), 1.0)),
        k: to_e(&uniform(&mut r, s.kv_len(), 1.0)),
        v: to_e(&uniform(&mut r, s.kv_len(), 1.0)),
        do_: to_e(&uniform(&mut r, s.q_len(), 1.0)),
    }
}

const SHAPES: &[(usize, usize, usize, usize, usize, bool)] = &[
    (1, 1, 1, 1, 64, false),
    (1, 1, 1, 1, 64, true),
    (37, 53, 4, 2, 64, false),
    (70, 70, 2, 1, 128, true),
    (65, 300, 2, 2, 64, false),
    (300, 300, 3, 1, 64, true),
    (129, 129, 2, 2, 128, true),
    (5, 17, 6, 3, 128, false),
];

fn check_fwd<E: Element>(seed: u64) {
    for (n, &(qt, kt, h, kvh, d, causal)) in SHAPES.iter().enumerate() {
        let s = shape(qt, kt, h, kvh, d);
        let x = inputs::<E>(&s, seed + n as u64);
        let scale = s.default_scale();
        let mut o = vec![0.0f32; s.q_len()];
        let mut lse = vec![0.0f32; s.rows()];
        cpu::attn_fwd_chunk(&x.q, &x.k, &x.v, &s, causal, scale, &mut o, &mut lse).unwrap();
        let (ro, rl) = reference::attn_fwd(
            &to_f64(&x.q),
            &to_f64(&x.k),
            &to_f64(&x.v),
            &s,
            causal,
            f64::from(scale),
        );
        let (eo, el) = (rel_err(&o, &ro), rel_err(&lse, &rl));
        assert!(
            eo < 1e-5 && el < 1e-5,
            "{s:?} causal={causal}: o err {eo:e}, lse err {el:e}"
        );
    }
}

#[test]
fn fwd_matches_reference_f32() {
    check_fwd::<f32>(1);
}

#[test]
fn fwd_matches_reference_bf16() {
    // Inputs are bf16, outputs f32: the oracle sees the same bf16 values, so
    // only f32 arithmetic separates them.
    check_fwd::<bf16>(100);
}

fn check_bwd<E: Element>(seed: u64) {
    for (n, &(qt, kt, h, kvh, d, causal)) in SHAPES.iter().enumerate() {
        let s = shape(qt, kt, h, kvh, d);
        let x = inputs::<E>(&s, seed + n as u64);
        let scale = s.default_scale();
        let (q, k, v, do_) = (to_f64(&x.q), to_f64(&x.k), to_f64(&x.v), to_f64(&x.do_));
        let (ro, rl) = reference::attn_fwd(&q, &k, &v, &s, causal, f64::from(scale));
        // The twin gets the final lse and delta as f32, as on the device.
        let lse: Vec<f32> = rl.iter().map(|&x| x as f32).collect();
        let delta64 = reference::attn_delta(&do_, &ro, d);
        let delta: Vec<f32> = delta64.iter().map(|&x| x as f32).collect();
        // Accumulation: start from non-zero dq/dk/dv.
        let mut r = rng(seed + 77);
        let dq0 = uniform(&mut r, s.q_len(), 0.1);
        let dk0 = uniform(&mut r, s.kv_len(), 0.1);
        let dv0 = uniform(&mut r, s.kv_len(), 0.1);
        let (mut dq, mut dk, mut dv) = (dq0.clone(), dk0.clone(), dv0.clone());
        cpu::attn_bwd_chunk(
            &x.q, &x.k, &x.v, &lse, &x.do_, &delta, &s, causal, scale, &mut dq, &mut dk, &mut dv,
        )
        .unwrap();
        let (rq, rk, rv) =
            reference::attn_bwd_analytic(&q, &k, &v, &do_, &s, causal, f64::from(scale));
        let add = |a: &[f32], b: &[f64]| -> Vec<f64> {
            a.iter().zip(b).map(|(x, y)| f64::from(*x) + y).collect()
        };
        let (eq, ek, ev) = (
            rel_err(&dq, &add(&dq0, &rq)),
            rel_err(&dk, &add(&dk0, &rk)),
            rel_err(&dv, &add(&dv0, &rv)),
        );
        assert!(
            eq < 1e-5 && ek < 1e-5 && ev < 1e-5,
            "{s:?} causal={causal}: dq {eq:e} dk {ek:e} dv {ev:e}"
        );
    }
}

#[test]
fn bwd_matches_analytic_gradient_f32() {
    check_bwd::<f32>(7);
}

#[test]
fn bwd_matches_analytic_gradient_bf16() {
    check_bwd::<bf16>(700);
}

#[test]
fn delta_is_rowsum_of_do_times_o() {
    let mut r = rng(3);
    for (rows, d) in [(1, 64), (17, 128), (33, 64)] {
        let a: Vec<bf16> = to_e(&uniform(&mut r, rows * d, 1.0));
        let o = uniform(&mut r, rows * d, 1.0);
        let mut delta = vec![0.0f32; rows];
        cpu::attn_delta(&a, &o, d, &mut delta).unwrap();
        let want = reference::attn_delta(&to_f64(&a), &to_f64(&o), d);
        assert!(rel_err(&delta, &want) < 1e-5);
    }
}

/// The oracle itself: the analytic gradient (and the FPDT pair form) of the
/// loss `sum(w * o)` against central finite differences, in f64.
#[test]
fn reference_gradient_matches_finite_differences() {
    for (s, causal) in [(shape(3, 4, 2, 1, 4), false), (shape(4, 4, 2, 2, 3), true)] {
        let mut r = rng(11);
        let f = |x: Vec<f32>| x.into_iter().map(f64::from).collect::<Vec<f64>>();
        let (q, k, v) = (
            f(uniform(&mut r, s.q_len(), 1.0)),
            f(uniform(&mut r, s.kv_len(), 1.0)),
            f(uniform(&mut r, s.kv_len(), 1.0)),
        );
        let w = f(uniform(&mut r, s.q_len(), 1.0));
        let scale = 0.7;
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let (o, _) = reference::attn_fwd(q, k, v, &s, causal, scale);
            o.iter().zip(&w).map(|(a, b)| a * b).sum()
        };
        let (dq, dk, dv) = reference::attn_bwd_analytic(&q, &k, &v, &w, &s, causal, scale);
        let (o, lse) = reference::attn_fwd(&q, &k, &v, &s, causal, scale);
        let delta = reference::attn_delta(&w, &o, s.head_dim);
        let (pq, pk, pv) =
            reference::attn_bwd_pair(&q, &k, &v, &lse, &w, &delta, &s, causal, scale);
        assert!(
            rel_err64(&pq, &dq) < 1e-12
                && rel_err64(&pk, &dk) < 1e-12
                && rel_err64(&pv, &dv) < 1e-12
        );
        let h = 1e-6;
        let fd = |which: usize, i: usize| -> f64 {
            let mut a = [q.clone(), k.clone(), v.clone()];
            a[which][i] += h;
            let up = loss(&a[0], &a[1], &a[2]);
            a[which][i] -= 2.0 * h;
            let dn = loss(&a[0], &a[1], &a[2]);
            (up - dn) / (2.0 * h)
        };
        for (which, g) in [&dq, &dk, &dv].into_iter().enumerate() {
            let num: Vec<f64> = (0..g.len()).map(|i| fd(which, i)).collect();
            let e = rel_err64(g, &num);
            assert!(
                e < 1e-7,
                "tensor {which}: analytic vs finite difference {e:e}"
            );
        }
    }
}

#[test]
fn lse_merge_matches_naive_form() {
    let mut r = rng(5);
    let (rows, d) = (23, 64);
    let o0 = uniform(&mut r, rows * d, 1.0);
    let oj = uniform(&mut r, rows * d, 1.0);
    let mut l0 = uniform(&mut r, rows, 30.0);
    let mut lj = uniform(&mut r, rows, 30.0);
    l0[0] = f32::NEG_INFINITY; // empty accumulator takes the partial
    lj[1] = f32::NEG_INFINITY; // empty partial changes nothing
    l0[2] = 80.0; // far apart: no overflow
    lj[2] = -80.0;
    let (mut o, mut l) = (o0.clone(), l0.clone());
    cpu::lse_merge(&mut o, &mut l, &oj, &lj, d).unwrap();
    let (mut ro, mut rl) = (to_f64(&o0), to_f64(&l0));
    reference::lse_merge(&mut ro, &mut rl, &to_f64(&oj), &to_f64(&lj), d);
    assert!(rel_err(&o, &ro) < 1e-5, "o {:e}", rel_err(&o, &ro));
    assert!(rel_err(&l, &rl) < 1e-6, "lse {:e}", rel_err(&l, &rl));
    assert_eq!(&o[..d], &oj[..d]);
    assert_eq!(&o[d..2 * d], &o0[d..2 * d]);
}

/// Takes token rows `t0..t1` of a `[tokens, heads, d]` tensor.
fn rows<T: Copy>(x: &[T], t0: usize, t1: usize, width: usize) -> Vec<T> {
    x[t0 * width..t1 * width].to_vec()
}

/// FPDT's schedule on one rank: u chunks of c tokens; forward of q chunk i
/// against kv chunks 0..=i (causal on the diagonal) merged with the LSE
/// merge; backward with outer loop over kv chunks and inner over q chunks,
/// from the final o and lse. Must equal unchunked causal attention.
fn chunked<E: Element>(u: usize, c: usize, h: usize, kvh: usize, d: usize, seed: u64) {
    let full = shape(u * c, u * c, h, kvh, d);
    let x = inputs::<E>(&full, seed);
    let scale = full.default_scale();
    let pair = shape(c, c, h, kvh, d);
    let (qw, kw) = (h * d, kvh * d);
    let mut o = vec![0.0f32; full.q_len()];
    let mut lse = vec![f32::NEG_INFINITY; full.rows()];
    for i in 0..u {
        let qi = rows(&x.q, i * c, (i + 1) * c, qw);
        let mut oi = vec![0.0f32; pair.q_len()];
        let mut li = vec![f32::NEG_INFINITY; pair.rows()];
        for j in 0..=i {
            let (kj, vj) = (
                rows(&x.k, j * c, (j + 1) * c, kw),
                rows(&x.v, j * c, (j + 1) * c, kw),
            );
            let mut oj = vec![0.0f32; pair.q_len()];
            let mut lj = vec![0.0f32; pair.rows()];
            cpu::attn_fwd_chunk(&qi, &kj, &vj, &pair, i == j, scale, &mut oj, &mut lj).unwrap();
            cpu::lse_merge(&mut oi, &mut li, &oj, &lj, d).unwrap();
        }
        o[i * c * qw..(i + 1) * c * qw].copy_from_slice(&oi);
        lse[i * c * h..(i + 1) * c * h].copy_from_slice(&li);
    }
    let (q, k, v, do_) = (to_f64(&x.q), to_f64(&x.k), to_f64(&x.v), to_f64(&x.do_));
    let (ro, rl) = reference::attn_fwd(&q, &k, &v, &full, true, f64::from(scale));
    assert!(rel_err(&o, &ro) < 1e-5, "chunked o {:e}", rel_err(&o, &ro));
    assert!(
        rel_err(&lse, &rl) < 1e-5,
        "chunked lse {:e}",
        rel_err(&lse, &rl)
    );

    // Backward: the final o is stored as E (as on the device).
    let o_e: Vec<E> = to_e(&o);
    let mut delta = vec![0.0f32; full.rows()];
    cpu::attn_delta(&x.do_, &o_e, d, &mut delta).unwrap();
    let mut dq = vec![0.0f32; full.q_len()];
    let mut dk = vec![0.0f32; full.kv_len()];
    let mut dv = vec![0.0f32; full.kv_len()];
    for i in 0..u {
        let (ki, vi) = (
            rows(&x.k, i * c, (i + 1) * c, kw),
            rows(&x.v, i * c, (i + 1) * c, kw),
        );
        let mut dki = vec![0.0f32; pair.kv_len()];
        let mut dvi = vec![0.0f32; pair.kv_len()];
        for qc in i..u {
            let (qq, dd) = (
                rows(&x.q, qc * c, (qc + 1) * c, qw),
                rows(&x.do_, qc * c, (qc + 1) * c, qw),
            );
            let (lq, deq) = (
                rows(&lse, qc * c, (qc + 1) * c, h),
                rows(&delta, qc * c, (qc + 1) * c, h),
            );
            let mut dqq = rows(&dq, qc * c, (qc + 1) * c, qw);
            cpu::attn_bwd_chunk(
                &qq,
                &ki,
                &vi,
                &lq,
                &dd,
                &deq,
                &pair,
                qc == i,
                scale,
                &mut dqq,
                &mut dki,
                &mut dvi,
            )
            .unwrap();
            dq[qc * c * qw..(qc + 1) * c * qw].copy_from_slice(&dqq);
        }
        dk[i * c * kw..(i + 1) * c * kw].copy_from_slice(&dki);
        dv[i * c * kw..(i + 1) * c * kw].copy_from_slice(&dvi);
    }
    let (rq, rk, rv) =
        reference::attn_bwd_analytic(&q, &k, &v, &do_, &full, true, f64::from(scale));
    // f32 storage of o: exact path; bf16 o perturbs delta at bf16 precision.
    let t = if E::DTYPE == cpu::DType::F32 {
        1e-5
    } else {
        1e-2
    };
    let (eq, ek, ev) = (rel_err(&dq, &rq), rel_err(&dk, &rk), rel_err(&dv, &rv));
    assert!(
        eq < t && ek < t && ev < t,
        "chunked backward: dq {eq:e} dk {ek:e} dv {ev:e}"
    );
}

#[test]
fn chunked_equals_unchunked_f32() {
    chunked::<f32>(3, 23, 2, 1, 64, 21);
    chunked::<f32>(4, 16, 4, 2, 128, 22);
}

#[test]
fn chunked_equals_unchunked_bf16() {
    chunked::<bf16>(3, 31, 2, 2, 64, 23);
}

#[test]
fn bad_arguments_are_named() {
    let s = shape(4, 4, 4, 2, 64);
    let x = inputs::<f32>(&s, 1);
    let mut o = vec![0.0f32; s.q_len()];
    let mut lse = vec![0.0f32; s.rows()];
    let arg = |e: PtxError| match e {
        PtxError::BadArgument { arg, .. } => arg,
        #[allow(unreachable_patterns)]
        _ => "other",
    };
    let e =
        cpu::attn_fwd_chunk(&x.q[1..], &x.k, &x.v, &s, false, 0.1, &mut o, &mut lse).unwrap_err();
    assert_eq!(arg(e), "q");
    let bad = shape(4, 4, 4, 3, 64);
    let e = cpu::attn_fwd_chunk(&x.q, &x.k, &x.v, &bad, false, 0.1, &mut o, &mut lse).unwrap_err();
    assert_eq!(arg(e), "kv_heads");
    let rect = shape(4, 2, 4, 2, 64);
    let e = cpu::attn_fwd_chunk(
        &x.q,
        &x.k[..rect.kv_len()],
        &x.v[..rect.kv_len()],
        &rect,
        true,
        0.1,
        &mut o,
        &mut lse,
    )
    .unwrap_err();
    assert_eq!(arg(e), "kv_tokens");
    let mut small = vec![0.0f32; 3];
    let e = cpu::attn_fwd_chunk(&x.q, &x.k, &x.v, &s, false, 0.1, &mut o, &mut small).unwrap_err();
    assert_eq!(arg(e), "lse");
    let e = cpu::lse_merge(&mut o, &mut lse, &x.q[..5], &[0.0; 16], 64).unwrap_err();
    assert_eq!(arg(e), "o_j");
}
