//! Row-wise, element-wise, loss, optimizer, permute and matmul twins
//! against the naive f64 oracle, f32 (1e-5) and bf16 (1e-2) storage, odd sizes.

mod common;

use common::*;
use fpdt_ptx::cpu::{self, CeStats, Element, MatmulSpec, Transpose};
use fpdt_ptx::{reference, PtxError};
use half::bf16;

const DIMS: &[(usize, usize)] = &[(1, 1), (7, 33), (64, 128), (3, 1000), (300, 257)];

fn arg(e: PtxError) -> &'static str {
    match e {
        PtxError::BadArgument { arg, .. } => arg,
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

fn embedding<E: Element>() {
    let mut r = rng(1);
    for &(tokens, dim) in DIMS {
        let vocab = 11;
        let table: Vec<E> = to_e(&uniform(&mut r, vocab * dim, 1.0));
        let ids: Vec<u32> = (0..tokens).map(|t| ((t * 7 + 3) % vocab) as u32).collect();
        let mut out = vec![E::default(); tokens * dim];
        cpu::embedding_fwd(&table, &ids, dim, &mut out).unwrap();
        assert_eq!(
            rel_err(&out, &reference::embedding_fwd(&to_f64(&table), &ids, dim)),
            0.0
        );
        let dout: Vec<E> = to_e(&uniform(&mut r, tokens * dim, 1.0));
        let init = uniform(&mut r, vocab * dim, 1.0);
        let mut dt = init.clone();
        cpu::embedding_bwd(&dout, &ids, dim, &mut dt).unwrap();
        let want: Vec<f64> = reference::embedding_bwd(&to_f64(&dout), &ids, dim, vocab)
            .iter()
            .zip(&init)
            .map(|(a, b)| a + f64::from(*b))
            .collect();
        assert!(rel_err(&dt, &want) < 1e-5);
    }
    let table = vec![E::default(); 4 * 2];
    let mut out = vec![E::default(); 2];
    assert_eq!(
        arg(cpu::embedding_fwd(&table, &[4], 2, &mut out).unwrap_err()),
        "ids"
    );
}

#[test]
fn embedding_f32_bf16() {
    embedding::<f32>();
    embedding::<bf16>();
}

fn norms<E: Element>(seed: u64) {
    let mut r = rng(seed);
    let eps = 1e-5;
    // A norm over one element is degenerate (dx = O(eps) by cancellation).
    for &(rows, dim) in DIMS.iter().filter(|(_, d)| *d > 1) {
        let x: Vec<E> = to_e(&uniform(&mut r, rows * dim, 2.0));
        let g: Vec<E> = to_e(&uniform(&mut r, dim, 1.0));
        let b: Vec<E> = to_e(&uniform(&mut r, dim, 1.0));
        let dy: Vec<E> = to_e(&uniform(&mut r, rows * dim, 1.0));
        let (xf, gf, bf, dyf) = (to_f64(&x), to_f64(&g), to_f64(&b), to_f64(&dy));
        // LayerNorm.
        let mut y = vec![E::default(); x.len()];
        let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
        cpu::layer_norm_fwd(&x, &g, &b, dim, eps as f32, &mut y, &mut mean, &mut rstd).unwrap();
        let (ry, rm, rr) = reference::layer_norm_fwd(&xf, &gf, &bf, dim, eps);
        assert!(rel_err(&y, &ry) < tol::<E>(), "ln y {rows}x{dim}");
        assert!(rel_err(&mean, &rm) < 1e-5 && rel_err(&rstd, &rr) < 1e-5);
        let mut dx = vec![E::default(); x.len()];
        let (mut dg, mut db) = (vec![0.5f32; dim], vec![0.25f32; dim]);
        cpu::layer_norm_bwd(&x, &g, &dy, &mean, &rstd, dim, &mut dx, &mut dg, &mut db).unwrap();
        let (rdx, rdg, rdb) = reference::layer_norm_bwd(&xf, &gf, &dyf, dim, eps);
        let plus = |v: &[f64], c: f64| v.iter().map(|x| x + c).collect::<Vec<_>>();
        assert!(
            rel_err(&dx, &rdx) < tol::<E>(),
            "ln dx {rows}x{dim}: {:e}",
            rel_err(&dx, &rdx)
        );
        assert!(rel_err(&dg, &plus(&rdg, 0.5)) < 1e-5 && rel_err(&db, &plus(&rdb, 0.25)) < 1e-5);
        // RMSNorm.
        let mut rstd = vec![0.0; rows];
        cpu::rms_norm_fwd(&x, &g, dim, eps as f32, &mut y, &mut rstd).unwrap();
        let (ry, rr) = reference::rms_norm_fwd(&xf, &gf, dim, eps);
        assert!(rel_err(&y, &ry) < tol::<E>() && rel_err(&rstd, &rr) < 1e-5);
        let mut dg = vec![0.0f32; dim];
        cpu::rms_norm_bwd(&x, &g, &dy, &rstd, dim, &mut dx, &mut dg).unwrap();
        let (rdx, rdg) = reference::rms_norm_bwd(&xf, &gf, &dyf, dim, eps);
        assert!(
            rel_err(&dx, &rdx) < tol::<E>(),
            "rms dx {:e}",
            rel_err(&dx, &rdx)
        );
        assert!(rel_err(&dg, &rdg) < 1e-5, "rms dg {:e}", rel_err(&dg, &rdg));
    }
    let mut y = vec![E::default(); 6];
    let mut rstd = vec![0.0; 2];
    let e = cpu::rms_norm_fwd(
        &[E::default(); 6],
        &[E::default(); 2],
        3,
        1e-5,
        &mut y,
        &mut rstd,
    );
    assert_eq!(arg(e.unwrap_err()), "gamma");
}

#[test]
fn norms_f32() {
    norms::<f32>(2);
}

#[test]
fn norms_bf16() {
    norms::<bf16>(3);
}

fn activations<E: Element>(seed: u64) {
    let mut r = rng(seed);
    for n in [1usize, 31, 4097, 100_003] {
        let x: Vec<E> = to_e(&uniform(&mut r, n, 5.0));
        let u: Vec<E> = to_e(&uniform(&mut r, n, 2.0));
        let d: Vec<E> = to_e(&uniform(&mut r, n, 1.0));
        let (xf, uf, df) = (to_f64(&x), to_f64(&u), to_f64(&d));
        let mut y = vec![E::default(); n];
        let mut y2 = vec![E::default(); n];
        cpu::gelu_tanh_fwd(&x, &mut y).unwrap();
        let want: Vec<f64> = xf.iter().map(|&v| reference::gelu_tanh(v)).collect();
        assert!(
            rel_err(&y, &want) < tol::<E>(),
            "gelu {:e}",
            rel_err(&y, &want)
        );
        cpu::gelu_tanh_bwd(&x, &d, &mut y).unwrap();
        let want: Vec<f64> = xf
            .iter()
            .zip(&df)
            .map(|(&v, &g)| g * reference::gelu_tanh_grad(v))
            .collect();
        assert!(
            rel_err(&y, &want) < tol::<E>(),
            "gelu' {:e}",
            rel_err(&y, &want)
        );
        cpu::swiglu_fwd(&x, &u, &mut y).unwrap();
        let want: Vec<f64> = xf
            .iter()
            .zip(&uf)
            .map(|(&g, &u)| reference::swiglu(g, u))
            .collect();
        assert!(rel_err(&y, &want) < tol::<E>());
        cpu::swiglu_bwd(&x, &u, &d, &mut y, &mut y2).unwrap();
        let grads: Vec<(f64, f64)> = (0..n)
            .map(|i| reference::swiglu_grad(xf[i], uf[i], df[i]))
            .collect();
        let (wg, wu): (Vec<f64>, Vec<f64>) = grads.into_iter().unzip();
        assert!(rel_err(&y, &wg) < tol::<E>() && rel_err(&y2, &wu) < tol::<E>());
        cpu::residual_add(&x, &u, &mut y).unwrap();
        let want: Vec<f64> = xf.iter().zip(&uf).map(|(a, b)| a + b).collect();
        assert!(rel_err(&y, &want) < tol::<E>());
    }
    let mut y = vec![E::default(); 3];
    assert_eq!(
        arg(cpu::swiglu_fwd(&[E::default(); 3], &[E::default(); 2], &mut y).unwrap_err()),
        "up"
    );
}

#[test]
fn activations_f32_bf16() {
    activations::<f32>(4);
    activations::<bf16>(5);
}

fn rope<E: Element>(seed: u64) {
    let mut r = rng(seed);
    for (tokens, heads, d, theta) in [
        (1, 1, 2, 10_000.0f32),
        (13, 3, 64, 10_000.0),
        (40, 2, 128, 500_000.0),
    ] {
        let x: Vec<E> = to_e(&uniform(&mut r, tokens * heads * d, 1.0));
        // Positions as input: not contiguous, large (long-context) values included.
        let pos: Vec<u32> = (0..tokens)
            .map(|t| (t as u32) * 977 + 1_999_000 * (t as u32 % 2))
            .collect();
        let mut y = vec![E::default(); x.len()];
        cpu::rope_fwd(&x, &pos, heads, d, theta, &mut y).unwrap();
        let want = reference::rope(&to_f64(&x), &pos, heads, d, f64::from(theta), false);
        assert!(
            rel_err(&y, &want) < tol::<E>(),
            "rope {:e}",
            rel_err(&y, &want)
        );
        let mut dx = vec![E::default(); x.len()];
        cpu::rope_bwd(&x, &pos, heads, d, theta, &mut dx).unwrap();
        let want = reference::rope(&to_f64(&x), &pos, heads, d, f64::from(theta), true);
        assert!(rel_err(&dx, &want) < tol::<E>());
    }
    // The backward is the transpose: <rope(x), y> == <x, rope_bwd(y)> (f64 oracle).
    let (t, h, d) = (5, 2, 8);
    let x: Vec<f64> = uniform(&mut r, t * h * d, 1.0)
        .into_iter()
        .map(f64::from)
        .collect();
    let y: Vec<f64> = uniform(&mut r, t * h * d, 1.0)
        .into_iter()
        .map(f64::from)
        .collect();
    let pos = [0, 3, 9, 100, 7];
    let a: f64 = reference::rope(&x, &pos, h, d, 1e4, false)
        .iter()
        .zip(&y)
        .map(|(a, b)| a * b)
        .sum();
    let b: f64 = reference::rope(&y, &pos, h, d, 1e4, true)
        .iter()
        .zip(&x)
        .map(|(a, b)| a * b)
        .sum();
    assert!((a - b).abs() < 1e-12);
    let mut out = vec![E::default(); 3];
    assert_eq!(
        arg(cpu::rope_fwd(&[E::default(); 3], &[0], 1, 3, 1e4, &mut out).unwrap_err()),
        "head_dim"
    );
}

#[test]
fn rope_f32_bf16() {
    rope::<f32>(6);
    rope::<bf16>(7);
}

#[test]
fn cross_entropy_fused_and_chunked() {
    let mut r = rng(8);
    let ignore = -100;
    // The last case pads the vocabulary to 520 with masked (-inf) logits
    // that make its whole last chunk -inf.
    for (tokens, vocab, chunks, padded) in [
        (1, 5, 1, 0),
        (9, 1000, 3, 0),
        (33, 517, 4, 0),
        (10, 520, 4, 130),
    ] {
        let mut logits = uniform(&mut r, tokens * vocab, 8.0);
        for row in logits.chunks_mut(vocab) {
            row[vocab - padded..].fill(f32::NEG_INFINITY);
        }
        let labels: Vec<i32> = (0..tokens)
            .map(|t| {
                if t % 4 == 1 {
                    ignore
                } else {
                    ((t * 131) % (vocab - padded)) as i32
                }
            })
            .collect();
        let scale = 1.0 / tokens as f32;
        let (rl, rd) =
            reference::cross_entropy(&to_f64(&logits), &labels, vocab, ignore, f64::from(scale));
        let mut loss = vec![0.0f32; tokens];
        let mut dl = vec![0.0f32; logits.len()];
        let n =
            cpu::softmax_cross_entropy(&logits, &labels, vocab, ignore, scale, &mut loss, &mut dl)
                .unwrap();
        assert_eq!(n, labels.iter().filter(|&&l| l != ignore).count());
        assert!(rel_err(&loss, &rl) < 1e-5 && rel_err(&dl, &rd) < 1e-5);
        // Vocabulary split into chunks of unequal width.
        let w = vocab.div_ceil(chunks);
        let bounds: Vec<(usize, usize)> = (0..chunks)
            .map(|c| (c * w, ((c + 1) * w).min(vocab)))
            .collect();
        let chunk = |x: &[f32], a: usize, b: usize| -> Vec<f32> {
            (0..tokens)
                .flat_map(|t| x[t * vocab + a..t * vocab + b].to_vec())
                .collect()
        };
        let mut stats = vec![CeStats::EMPTY; tokens];
        for &(a, b) in &bounds {
            cpu::ce_chunk_stats(&chunk(&logits, a, b), &labels, b - a, a, ignore, &mut stats)
                .unwrap();
        }
        let mut loss2 = vec![0.0f32; tokens];
        assert_eq!(
            cpu::ce_finish(&stats, &labels, ignore, &mut loss2).unwrap(),
            n
        );
        assert!(rel_err(&loss2, &rl) < 1e-5);
        let mut dl2 = vec![0.0f32; logits.len()];
        for &(a, b) in &bounds {
            let mut part = vec![0.0f32; tokens * (b - a)];
            cpu::ce_chunk_grad(
                &chunk(&logits, a, b),
                &labels,
                b - a,
                a,
                ignore,
                &stats,
                scale,
                &mut part,
            )
            .unwrap();
            for t in 0..tokens {
                dl2[t * vocab + a..t * vocab + b]
                    .copy_from_slice(&part[t * (b - a)..(t + 1) * (b - a)]);
            }
        }
        assert!(rel_err(&dl2, &rd) < 1e-5);
    }
    let mut l = vec![0.0; 1];
    let mut d = vec![0.0; 3];
    let e = cpu::softmax_cross_entropy(&[0.0; 3], &[3], 3, -100, 1.0, &mut l, &mut d);
    assert_eq!(arg(e.unwrap_err()), "labels");
}

#[test]
fn adamw_matches_reference() {
    let mut r = rng(9);
    let n = 70_001;
    let cfg = cpu::AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let p0 = uniform(&mut r, n, 1.0);
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
    let (mut rp, mut rm, mut rv) = (to_f64(&p0), vec![0.0; n], vec![0.0; n]);
    let mut w = vec![bf16::ZERO; n];
    for step in 1..=3 {
        let g: Vec<bf16> = to_e(&uniform(&mut r, n, 1.0));
        cpu::adamw_step(&cfg, step, 0.5, &mut p, &g, &mut m, &mut v, &mut w).unwrap();
        let gf: Vec<f64> = to_f64(&g).iter().map(|x| 0.5 * x).collect();
        reference::adamw(
            &mut rp,
            &gf,
            &mut rm,
            &mut rv,
            1e-3,
            0.9,
            0.95,
            1e-8,
            0.1,
            step as i32,
        );
    }
    // The update is ~1e-3 of p: compare the change, not only p.
    let dp: Vec<f64> = p.iter().zip(&p0).map(|(a, b)| f64::from(a - b)).collect();
    let rdp: Vec<f64> = rp.iter().zip(&p0).map(|(a, b)| a - f64::from(*b)).collect();
    assert!(rel_err(&p, &rp) < 1e-6);
    assert!(
        rel_err64(&dp, &rdp) < 1e-3,
        "update {:e}",
        rel_err64(&dp, &rdp)
    );
    assert!(rel_err(&m, &rm) < 1e-5 && rel_err(&v, &rv) < 1e-5);
    assert!(rel_err(&w, &rp) < 1e-2);
    let e = cpu::adamw_step(
        &cfg,
        0,
        1.0,
        &mut p,
        &vec![bf16::ZERO; n],
        &mut m,
        &mut v,
        &mut w,
    );
    assert_eq!(arg(e.unwrap_err()), "step");
}

#[test]
fn sq_norm_and_casts() {
    let mut r = rng(10);
    for n in [0usize, 1, 1025, 200_001] {
        let x = uniform(&mut r, n, 3.0);
        let want: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let got = cpu::sq_norm(&x);
        assert!(
            (got - want).abs() <= 1e-5 * want.max(1e-30),
            "{got} vs {want}"
        );
        let mut b = vec![bf16::ZERO; n];
        cpu::cast(&x, &mut b).unwrap();
        assert!(b.iter().zip(&x).all(|(a, b)| *a == bf16::from_f32(*b)));
        let mut back = vec![0.0f32; n];
        cpu::cast(&b, &mut back).unwrap();
        assert!(rel_err(&back, &to_f64(&x)) < 1e-2);
    }
    assert_eq!(
        arg(cpu::cast(&[0.0f32; 2], &mut [bf16::ZERO; 3]).unwrap_err()),
        "dst"
    );
}

#[test]
fn ulysses_pack_unpack() {
    let mut r = rng(11);
    for (t, h, d, p) in [(1, 1, 1, 1), (5, 8, 16, 4), (7, 6, 64, 2), (3, 6, 5, 3)] {
        let x: Vec<bf16> = to_e(&uniform(&mut r, t * h * d, 1.0));
        let mut packed = vec![bf16::ZERO; x.len()];
        cpu::ulysses_pack(&x, t, h, d, p, &mut packed).unwrap();
        assert_eq!(
            rel_err(&packed, &reference::ulysses_pack(&to_f64(&x), t, h, d, p)),
            0.0
        );
        let mut back = vec![bf16::ZERO; x.len()];
        cpu::ulysses_unpack(&packed, t, h, d, p, &mut back).unwrap();
        assert_eq!(back, x);
    }
    let mut out = vec![0.0f32; 6];
    assert_eq!(
        arg(cpu::ulysses_pack(&[0.0f32; 6], 1, 3, 2, 2, &mut out).unwrap_err()),
        "heads"
    );
}

fn matmul<E: Element, C: Element>(seed: u64) {
    let mut r = rng(seed);
    for (m, n, k) in [(1, 1, 1), (7, 13, 5), (65, 33, 129), (200, 96, 64)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let a: Vec<E> = to_e(&uniform(&mut r, m * k, 1.0));
            let b: Vec<E> = to_e(&uniform(&mut r, k * n, 1.0));
            let bias: Vec<E> = to_e(&uniform(&mut r, n, 1.0));
            let c0 = uniform(&mut r, m * n, 1.0);
            let tr = |x| if x { Transpose::Yes } else { Transpose::No };
            for (with_bias, acc) in [(false, false), (true, false), (true, true)] {
                let spec = MatmulSpec {
                    m,
                    n,
                    k,
                    trans_a: tr(ta),
                    trans_b: tr(tb),
                    accumulate: acc,
                };
                let mut c: Vec<C> = to_e(&c0);
                cpu::matmul(&spec, &a, &b, with_bias.then_some(&bias[..]), &mut c).unwrap();
                let bf = to_f64(&bias);
                let mut want = reference::matmul(
                    &to_f64(&a),
                    &to_f64(&b),
                    with_bias.then_some(&bf[..]),
                    m,
                    n,
                    k,
                    ta,
                    tb,
                );
                if acc {
                    let c0e: Vec<C> = to_e(&c0);
                    want.iter_mut().zip(to_f64(&c0e)).for_each(|(w, c)| *w += c);
                }
                let e = rel_err(&c, &want);
                assert!(
                    e < tol::<C>(),
                    "{m}x{n}x{k} ta={ta} tb={tb} bias={with_bias} acc={acc}: {e:e}"
                );
            }
        }
    }
    let spec = MatmulSpec {
        m: 2,
        n: 2,
        k: 2,
        trans_a: Transpose::No,
        trans_b: Transpose::No,
        accumulate: false,
    };
    let mut c = vec![C::default(); 4];
    assert_eq!(
        arg(cpu::matmul(&spec, &[E::default(); 4], &[E::default(); 3], None, &mut c).unwrap_err()),
        "b"
    );
}

#[test]
fn matmul_transposes_bias_accumulate() {
    matmul::<f32, f32>(12);
    matmul::<bf16, f32>(13);
    matmul::<bf16, bf16>(14);
}
