//! Every `.ptx` kernel run on the PTX interpreter at small shapes through
//! its launcher, against its CPU twin within bf16 tolerance (1e-2, relative
//! in the max norm); the interpreter's bounds, race and uninitialized-read
//! checks are on, so a clean run also means they stayed silent. With
//! `FPDT_PTX_BACKEND=cuda` the same tests run the kernels on the GPU
//! (`scripts/gpu-check.sh`, also under compute-sanitizer).

mod common;

use common::*;
use fpdt_ptx::cpu::{self, AttnShape, DType, Element};
use fpdt_ptx::kernels;
use fpdt_ptx::PtxError;
use fpdt_ptx::Runner;
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

        let mut it = Runner::new(kernels::ATTN_FWD_PTX).unwrap();
        let p = kernels::AttnPtrs {
            q: it.alloc_slice(&q).unwrap(),
            k: it.alloc_slice(&k).unwrap(),
            v: it.alloc_slice(&v).unwrap(),
            o: it.alloc_zeroed(s.q_len() * 4).unwrap(),
            lse: it.alloc_zeroed(s.rows() * 4).unwrap(),
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
    let mut it = Runner::new(kernels::LSE_MERGE_PTX).unwrap();
    let (po, pl, poj, plj) = (
        it.alloc_slice(&o0).unwrap(),
        it.alloc_slice(&l0).unwrap(),
        it.alloc_slice(&oj).unwrap(),
        it.alloc_slice(&lj).unwrap(),
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
    let mut it = Runner::new(kernels::ATTN_DELTA_PTX).unwrap();
    let (pa, pb, pd) = (
        it.alloc_slice(&a).unwrap(),
        it.alloc_slice(&b).unwrap(),
        it.alloc_zeroed(rows * 4).unwrap(),
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

/// The LayerNorm backward and chunked cross-entropy launchers name the bad
/// argument and build nothing.
#[test]
fn rowwise_launchers_reject_bad_arguments() {
    let arg = |e: PtxError| match e {
        PtxError::BadArgument { arg, .. } => arg,
        _ => "other",
    };
    let ln = |dt: DType, mean: u64, dbeta: u64| {
        kernels::layer_norm_bwd(4, 8, dt, 256, 512, dbeta, 768, 1024, 1280, mean, 1536)
    };
    assert!(ln(DType::BF16, 2048, 4096).is_ok());
    assert_eq!(arg(ln(DType::BF16, 2050, 4096).unwrap_err()), "mean");
    assert_eq!(arg(ln(DType::BF16, 2048, 0).unwrap_err()), "dbeta");
    assert_eq!(
        arg(
            kernels::layer_norm_bwd(4, 0, DType::F32, 256, 256, 256, 256, 256, 256, 256, 256)
                .unwrap_err()
        ),
        "dim"
    );
    // bf16 x, misaligned for 2-byte elements.
    assert_eq!(
        arg(
            kernels::layer_norm_bwd(4, 8, DType::BF16, 256, 256, 256, 257, 256, 256, 256, 256)
                .unwrap_err()
        ),
        "x"
    );

    assert!(kernels::ce_chunk_stats(4, 100, 200, -100, 256, 512, 768).is_ok());
    assert_eq!(
        arg(kernels::ce_chunk_stats(4, 0, 0, -100, 256, 512, 768).unwrap_err()),
        "vocab_chunk"
    );
    assert_eq!(
        arg(kernels::ce_chunk_stats(4, 100, i32::MAX as usize, -100, 256, 512, 768).unwrap_err()),
        "vocab_offset"
    );
    assert_eq!(
        arg(kernels::ce_chunk_stats(1 << 20, 1 << 13, 0, -100, 256, 512, 768).unwrap_err()),
        "rows"
    );
    assert_eq!(
        arg(kernels::ce_chunk_stats(4, 100, 0, -100, 0, 512, 768).unwrap_err()),
        "stats"
    );
    assert_eq!(
        arg(kernels::ce_chunk_grad(4, 100, 0, -100, f32::NAN, 256, 512, 768, 1024).unwrap_err()),
        "grad_scale"
    );
    assert_eq!(
        arg(kernels::ce_chunk_grad(4, 100, 0, -100, 1.0, 256, 514, 768, 1024).unwrap_err()),
        "logits"
    );
    assert_eq!(
        arg(kernels::ce_finish(4, -100, 256, 258, 768).unwrap_err()),
        "stats"
    );
    assert_eq!(
        arg(
            kernels::softmax_cross_entropy(4, 10, -100, f32::INFINITY, 256, 384, 512, 768, 1024)
                .unwrap_err()
        ),
        "grad_scale"
    );
}

/// Runs `launch` on a fresh interpreter whose buffers `setup` allocates;
/// returns the interpreter for reading results.
fn interp() -> Runner {
    Runner::new(".version 8.0\n.target sm_80\n.address_size 64\n").unwrap()
}

fn bf(x: &[f32]) -> Vec<bf16> {
    to_e(x)
}

fn read_bf16(it: &Runner, p: u64, n: usize) -> Vec<bf16> {
    it.read_vec::<bf16>(p, n).unwrap()
}

#[test]
fn elementwise_kernels_match_twins() {
    let mut r = rng(60);
    let n = 1000;
    let a = bf(&uniform(&mut r, n, 3.0));
    let b = bf(&uniform(&mut r, n, 3.0));
    let c = bf(&uniform(&mut r, n, 1.0));
    let mut it = interp();
    let (pa, pb, pc) = (
        it.alloc_slice(&a).unwrap(),
        it.alloc_slice(&b).unwrap(),
        it.alloc_slice(&c).unwrap(),
    );
    let (o1, o2) = (
        it.alloc_zeroed(n * 2).unwrap(),
        it.alloc_zeroed(n * 2).unwrap(),
    );
    let check = |it: &Runner, p: u64, want: &[bf16], what: &str| {
        let got = read_bf16(it, p, n);
        let e = rel_err(&got, &to_f64(want));
        assert!(e < 1e-2, "{what}: {e:e}");
    };
    let mut w1 = vec![bf16::ZERO; n];
    let mut w2 = vec![bf16::ZERO; n];

    it.run(&kernels::residual_add(n, DType::BF16, o1, pa, pb).unwrap())
        .unwrap();
    cpu::residual_add(&a, &b, &mut w1).unwrap();
    check(&it, o1, &w1, "residual_add");

    it.run(&kernels::swiglu_fwd(n, DType::BF16, o1, pa, pb).unwrap())
        .unwrap();
    cpu::swiglu_fwd(&a, &b, &mut w1).unwrap();
    check(&it, o1, &w1, "swiglu_fwd");

    it.run(&kernels::swiglu_bwd(n, DType::BF16, o1, o2, pa, pb, pc).unwrap())
        .unwrap();
    cpu::swiglu_bwd(&a, &b, &c, &mut w1, &mut w2).unwrap();
    check(&it, o1, &w1, "swiglu_bwd dgate");
    check(&it, o2, &w2, "swiglu_bwd dup");

    it.run(&kernels::gelu_tanh_fwd(n, DType::BF16, o1, pa).unwrap())
        .unwrap();
    cpu::gelu_tanh_fwd(&a, &mut w1).unwrap();
    check(&it, o1, &w1, "gelu_fwd");

    it.run(&kernels::gelu_tanh_bwd(n, DType::BF16, o1, pa, pc).unwrap())
        .unwrap();
    cpu::gelu_tanh_bwd(&a, &c, &mut w1).unwrap();
    check(&it, o1, &w1, "gelu_bwd");

    // Casts both ways.
    let f = uniform(&mut r, n, 5.0);
    let pf = it.alloc_slice(&f).unwrap();
    it.run(&kernels::cast(n, DType::F32, DType::BF16, o1, pf).unwrap())
        .unwrap();
    assert_eq!(
        read_bf16(&it, o1, n),
        bf(&f),
        "cast f32 -> bf16 rounds to nearest even"
    );
    let pf2 = it.alloc_zeroed(n * 4).unwrap();
    it.run(&kernels::cast(n, DType::BF16, DType::F32, pf2, pa).unwrap())
        .unwrap();
    let want: Vec<f32> = a.iter().map(|x| x.to_f32()).collect();
    assert_eq!(it.read_f32(pf2, n).unwrap(), want);

    // Fill, every element written (over a poisoned buffer), the value
    // rounded once for bf16.
    for (v, dt) in [
        (-1.0f32 / 3.0, DType::BF16),
        (f32::NEG_INFINITY, DType::F32),
        (0.0, DType::F32),
    ] {
        let p = it.alloc_slice(&vec![f32::NAN; n]).unwrap();
        it.run(&kernels::fill(n, dt, p, v).unwrap()).unwrap();
        match dt {
            DType::BF16 => {
                let got = read_bf16(&it, p, n);
                assert!(
                    got.iter().all(|&x| x == half::bf16::from_f32(v)),
                    "fill bf16"
                );
                // The rest of the poisoned f32 buffer is untouched.
                let tail = it.read_f32(p, n).unwrap();
                assert!(
                    tail[n / 2 + 1..].iter().all(|x| x.is_nan()),
                    "fill bf16 wrote past n"
                );
            }
            DType::F32 => {
                let got = it.read_f32(p, n).unwrap();
                assert!(
                    got.iter().all(|&x| x.to_bits() == v.to_bits()),
                    "fill f32 {v}"
                );
            }
        }
    }
    assert!(
        kernels::fill(n, DType::F32, 2, 0.0).is_err(),
        "a misaligned out is refused"
    );

    // Squared norm.
    let out = it.alloc_zeroed(4).unwrap();
    it.run(&kernels::sq_norm(n, DType::BF16, out, pa).unwrap())
        .unwrap();
    let got = f64::from(it.read_f32(out, 1).unwrap()[0]);
    let want = cpu::sq_norm(&a);
    assert!((got - want).abs() < 1e-5 * want, "sq_norm {got} vs {want}");
}

/// The norms' forward and backward kernels at storage type `E`: outputs in
/// `E` within `tol::<E>()` of the twin, f32 statistics and parameter
/// gradients within 1e-5.
fn norm_kernels<E: Element>(seed: u64) {
    let mut r = rng(seed);
    let dt = E::DTYPE;
    let z = dt.size();
    for (rows, dim) in [(5usize, 33usize), (9, 256), (3, 70)] {
        let x: Vec<E> = to_e(&uniform(&mut r, rows * dim, 2.0));
        let g: Vec<E> = to_e(&uniform(&mut r, dim, 1.0));
        let bt: Vec<E> = to_e(&uniform(&mut r, dim, 1.0));
        let dy: Vec<E> = to_e(&uniform(&mut r, rows * dim, 1.0));
        let eps = 1e-5;
        let mut it = interp();
        let (px, pg, pb, pdy) = (
            it.alloc_slice(&x).unwrap(),
            it.alloc_slice(&g).unwrap(),
            it.alloc_slice(&bt).unwrap(),
            it.alloc_slice(&dy).unwrap(),
        );
        let (py, prs, pm) = (
            it.alloc_zeroed(rows * dim * z).unwrap(),
            it.alloc_zeroed(rows * 4).unwrap(),
            it.alloc_zeroed(rows * 4).unwrap(),
        );
        let read = |it: &Runner, p: u64, n: usize| it.read_vec::<E>(p, n).unwrap();
        let what = format!("{dt:?} {rows}x{dim}");
        let mut y = vec![E::default(); rows * dim];
        let (mut rs, mut mean) = (vec![0.0f32; rows], vec![0.0f32; rows]);

        it.run(&kernels::rms_norm_fwd(rows, dim, eps, dt, py, prs, px, pg).unwrap())
            .unwrap();
        cpu::rms_norm_fwd(&x, &g, dim, eps, &mut y, &mut rs).unwrap();
        assert!(
            rel_err(&read(&it, py, rows * dim), &to_f64(&y)) < tol::<E>(),
            "rms y {what}"
        );
        assert!(rel_err(&it.read_f32(prs, rows).unwrap(), &to_f64(&rs)) < 1e-5);

        let (pdx, pdg) = (
            it.alloc_zeroed(rows * dim * z).unwrap(),
            it.alloc_zeroed(dim * 4).unwrap(),
        );
        it.run(&kernels::rms_norm_bwd(rows, dim, dt, pdx, pdg, px, pg, pdy, prs).unwrap())
            .unwrap();
        let mut dx = vec![E::default(); rows * dim];
        let mut dg = vec![0.0f32; dim];
        cpu::rms_norm_bwd(&x, &g, &dy, &rs, dim, &mut dx, &mut dg).unwrap();
        assert!(
            rel_err(&read(&it, pdx, rows * dim), &to_f64(&dx)) < tol::<E>(),
            "rms dx {what}"
        );
        assert!(rel_err(&it.read_f32(pdg, dim).unwrap(), &to_f64(&dg)) < 1e-5);

        it.run(&kernels::layer_norm_fwd(rows, dim, eps, dt, py, pm, prs, px, pg, pb).unwrap())
            .unwrap();
        cpu::layer_norm_fwd(&x, &g, &bt, dim, eps, &mut y, &mut mean, &mut rs).unwrap();
        assert!(
            rel_err(&read(&it, py, rows * dim), &to_f64(&y)) < tol::<E>(),
            "ln y {what}"
        );
        assert!(rel_err(&it.read_f32(pm, rows).unwrap(), &to_f64(&mean)) < 1e-5);
        assert!(rel_err(&it.read_f32(prs, rows).unwrap(), &to_f64(&rs)) < 1e-5);

        // Backward from the saved statistics; dgamma and dbeta accumulate
        // onto what is there (non-zero starting values).
        let (dg0, db0) = (uniform(&mut r, dim, 1.0), uniform(&mut r, dim, 1.0));
        let (pdg, pdb) = (it.alloc_slice(&dg0).unwrap(), it.alloc_slice(&db0).unwrap());
        it.run(
            &kernels::layer_norm_bwd(rows, dim, dt, pdx, pdg, pdb, px, pg, pdy, pm, prs).unwrap(),
        )
        .unwrap();
        let (mut dg, mut db) = (dg0.clone(), db0.clone());
        cpu::layer_norm_bwd(&x, &g, &dy, &mean, &rs, dim, &mut dx, &mut dg, &mut db).unwrap();
        let e = rel_err(&read(&it, pdx, rows * dim), &to_f64(&dx));
        assert!(e < tol::<E>(), "ln dx {what}: {e:e}");
        let e = rel_err(&it.read_f32(pdg, dim).unwrap(), &to_f64(&dg));
        assert!(e < 1e-5, "ln dgamma {what}: {e:e}");
        let e = rel_err(&it.read_f32(pdb, dim).unwrap(), &to_f64(&db));
        assert!(e < 1e-5, "ln dbeta {what}: {e:e}");
    }
}

#[test]
fn norm_kernels_match_twins_bf16() {
    norm_kernels::<bf16>(61);
}

#[test]
fn norm_kernels_match_twins_f32() {
    norm_kernels::<f32>(64);
}

/// Columns `a..b` of the `[rows, vocab]` matrix `x`, as `[rows, b - a]`.
fn columns(x: &[f32], vocab: usize, a: usize, b: usize) -> Vec<f32> {
    x.chunks(vocab).flat_map(|row| row[a..b].to_vec()).collect()
}

/// The vocabulary-chunked cross-entropy kernels (stats per chunk, finish,
/// grad per chunk) against their twins, and the chunked result against the
/// whole-row kernel: unequal chunk widths (none a multiple of 32), labels on
/// chunk boundaries, an ignored row, and a padded row whose last chunk is
/// all -inf.
#[test]
fn chunked_cross_entropy_kernels_match_twins() {
    let mut r = rng(65);
    let (rows, vocab, ignore, scale) = (8usize, 300usize, -100i32, 0.125f32);
    let bounds = [(0usize, 100usize), (100, 233), (233, 300)];
    let mut logits = uniform(&mut r, rows * vocab, 6.0);
    logits[7 * vocab + 233..8 * vocab].fill(f32::NEG_INFINITY);
    let labels: Vec<i32> = vec![3, ignore, 299, 0, 100, 99, 233, 150];
    let mut it = interp();
    let plab = it.alloc_slice(&labels).unwrap();
    let pstats = it.alloc_slice(&vec![cpu::CeStats::EMPTY; rows]).unwrap();
    let mut stats = vec![cpu::CeStats::EMPTY; rows];
    let chunk_ptrs: Vec<u64> = bounds
        .iter()
        .map(|&(a, b)| it.alloc_slice(&columns(&logits, vocab, a, b)).unwrap())
        .collect();
    for (&(a, b), &pc) in bounds.iter().zip(&chunk_ptrs) {
        it.run(&kernels::ce_chunk_stats(rows, b - a, a, ignore, pstats, pc, plab).unwrap())
            .unwrap();
        let chunk = columns(&logits, vocab, a, b);
        cpu::ce_chunk_stats(&chunk, &labels, b - a, a, ignore, &mut stats).unwrap();
    }
    let got: Vec<cpu::CeStats> = it.read_vec(pstats, rows).unwrap();
    for (t, (g, w)) in got.iter().zip(&stats).enumerate() {
        // Max and target are exact; the sum's rounding order differs.
        assert_eq!((g.max, g.target), (w.max, w.target), "row {t}");
        let e = (f64::from(g.sum) - f64::from(w.sum)).abs() / f64::from(w.sum).max(1e-30);
        assert!(
            e < 1e-5 || (g.sum == 0.0 && w.sum == 0.0),
            "row {t} sum {g:?} vs {w:?}"
        );
    }
    assert_eq!(got[1], cpu::CeStats::EMPTY, "the ignored row is untouched");

    let ploss = it.alloc_zeroed(rows * 4).unwrap();
    it.run(&kernels::ce_finish(rows, ignore, ploss, pstats, plab).unwrap())
        .unwrap();
    let mut loss = vec![0.0f32; rows];
    cpu::ce_finish(&stats, &labels, ignore, &mut loss).unwrap();
    let gloss = it.read_f32(ploss, rows).unwrap();
    assert!(
        rel_err(&gloss, &to_f64(&loss)) < 1e-5,
        "{gloss:?} vs {loss:?}"
    );
    assert_eq!(gloss[1], 0.0);

    let mut dl = vec![0.0f32; rows * vocab];
    for (&(a, b), &pc) in bounds.iter().zip(&chunk_ptrs) {
        let w = b - a;
        let pd = it.alloc_zeroed(rows * w * 4).unwrap();
        it.run(&kernels::ce_chunk_grad(rows, w, a, ignore, scale, pd, pc, plab, pstats).unwrap())
            .unwrap();
        let chunk = columns(&logits, vocab, a, b);
        let mut want = vec![0.0f32; rows * w];
        cpu::ce_chunk_grad(&chunk, &labels, w, a, ignore, &stats, scale, &mut want).unwrap();
        let got = it.read_f32(pd, rows * w).unwrap();
        let e = rel_err(&got, &to_f64(&want));
        assert!(e < 1e-5, "chunk {a}..{b}: {e:e}");
        for (t, row) in got.chunks(w).enumerate() {
            dl[t * vocab + a..t * vocab + b].copy_from_slice(row);
        }
    }

    // Chunked equals unchunked (the one-pass whole-row kernel).
    let pl = it.alloc_slice(&logits).unwrap();
    let (pl1, ph1, pd1) = (
        it.alloc_zeroed(rows * 4).unwrap(),
        it.alloc_zeroed(rows * 4).unwrap(),
        it.alloc_zeroed(rows * vocab * 4).unwrap(),
    );
    let l = kernels::softmax_cross_entropy(rows, vocab, ignore, scale, pl1, ph1, pd1, pl, plab);
    it.run(&l.unwrap()).unwrap();
    let whole_loss = it.read_f32(pl1, rows).unwrap();
    let whole_dl = it.read_f32(pd1, rows * vocab).unwrap();
    assert!(rel_err(&gloss, &to_f64(&whole_loss)) < 1e-5);
    assert!(rel_err(&dl, &to_f64(&whole_dl)) < 1e-5);
}

#[test]
fn loss_embedding_adamw_kernels_match_twins() {
    let mut r = rng(62);
    // Cross-entropy.
    let (rows, vocab, ignore) = (6usize, 300usize, -100i32);
    let mut logits = uniform(&mut r, rows * vocab, 6.0);
    let labels: Vec<i32> = vec![3, ignore, 299, 0, 150, 7];
    // Argmax cases: a clear hit in lane 3 (row 0), a hit in the last column
    // (row 2), a tie the earlier column wins against the label (row 4: a
    // miss), and a maximum away from the label (row 5).
    logits[3] = 9.0;
    logits[2 * vocab + 299] = 9.0;
    logits[4 * vocab + 20] = 9.0;
    logits[4 * vocab + 150] = 9.0;
    logits[5 * vocab + 7 + 96] = 9.0;
    let mut it = interp();
    let (pl, plab) = (
        it.alloc_slice(&logits).unwrap(),
        it.alloc_slice(&labels).unwrap(),
    );
    let (ploss, phits, pd) = (
        it.alloc_zeroed(rows * 4).unwrap(),
        it.alloc_zeroed(rows * 4).unwrap(),
        it.alloc_zeroed(rows * vocab * 4).unwrap(),
    );
    let l = kernels::softmax_cross_entropy(rows, vocab, ignore, 0.25, ploss, phits, pd, pl, plab);
    it.run(&l.unwrap()).unwrap();
    let (mut loss, mut dl) = (vec![0.0f32; rows], vec![0.0f32; rows * vocab]);
    cpu::softmax_cross_entropy(&logits, &labels, vocab, ignore, 0.25, &mut loss, &mut dl).unwrap();
    let got_loss = it.read_f32(ploss, rows).unwrap();
    assert!(rel_err(&got_loss, &to_f64(&loss)) < 1e-5);
    assert!(rel_err(&it.read_f32(pd, rows * vocab).unwrap(), &to_f64(&dl)) < 1e-5);
    let mut hits = vec![0.0f32; rows];
    cpu::argmax_hits(&logits, &labels, vocab, ignore, &mut hits).unwrap();
    assert_eq!(hits, [1.0, 0.0, 1.0, 0.0, 0.0, 0.0], "the twin's own cases");
    let got_hits = it.read_f32(phits, rows).unwrap();
    assert_eq!(got_hits, hits);

    // The step's accumulators: added to what they held, hits counted.
    let pacc = it.alloc_slice(&[1.5f32, 2.0]).unwrap();
    it.run(&kernels::softmax_xent_sums(rows, 0.25, pacc, ploss, phits).unwrap())
        .unwrap();
    let acc = it.read_f32(pacc, 2).unwrap();
    let want = 1.5 + 0.25 * loss.iter().map(|&x| f64::from(x)).sum::<f64>();
    assert!(
        (f64::from(acc[0]) - want).abs() < 1e-5 * want,
        "{} vs {want}",
        acc[0]
    );
    assert_eq!(acc[1], 4.0);
    // More rows than lanes: every element counted once.
    let n = 1000;
    let ones = vec![1.0f32; n];
    let xs: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let (px, po) = (it.alloc_slice(&xs).unwrap(), it.alloc_slice(&ones).unwrap());
    let pacc = it.alloc_zeroed(8).unwrap();
    it.run(&kernels::softmax_xent_sums(n, 2.0, pacc, px, po).unwrap())
        .unwrap();
    assert_eq!(it.read_f32(pacc, 2).unwrap(), [2.0 * 499_500.0, 1000.0]);

    // Embedding forward and scatter-add backward (repeated ids).
    let (tokens, dim, v) = (7usize, 40usize, 5usize);
    let table = bf(&uniform(&mut r, v * dim, 1.0));
    let ids: Vec<u32> = vec![0, 4, 2, 2, 4, 1, 0];
    let dout = bf(&uniform(&mut r, tokens * dim, 1.0));
    let (pt, pid, pdo) = (
        it.alloc_slice(&table).unwrap(),
        it.alloc_slice(&ids).unwrap(),
        it.alloc_slice(&dout).unwrap(),
    );
    let (pout, pdt) = (
        it.alloc_zeroed(tokens * dim * 2).unwrap(),
        it.alloc_zeroed(v * dim * 4).unwrap(),
    );
    it.run(&kernels::embedding_fwd(tokens, dim, v, DType::BF16, pout, pt, pid).unwrap())
        .unwrap();
    let mut out = vec![bf16::ZERO; tokens * dim];
    cpu::embedding_fwd(&table, &ids, dim, &mut out).unwrap();
    assert_eq!(read_bf16(&it, pout, tokens * dim), out);
    it.run(&kernels::embedding_bwd(tokens, dim, v, DType::BF16, pdt, pdo, pid).unwrap())
        .unwrap();
    let mut dt = vec![0.0f32; v * dim];
    cpu::embedding_bwd(&dout, &ids, dim, &mut dt).unwrap();
    assert!(rel_err(&it.read_f32(pdt, v * dim).unwrap(), &to_f64(&dt)) < 1e-6);

    // AdamW, two steps.
    let n = 777;
    let cfg = cpu::AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let p0 = uniform(&mut r, n, 1.0);
    let (pm_, pv_) = (
        it.alloc_zeroed(n * 4).unwrap(),
        it.alloc_zeroed(n * 4).unwrap(),
    );
    let (pp, pw) = (
        it.alloc_slice(&p0).unwrap(),
        it.alloc_zeroed(n * 2).unwrap(),
    );
    let (mut p, mut m, mut vv, mut w) = (
        p0.clone(),
        vec![0.0f32; n],
        vec![0.0f32; n],
        vec![bf16::ZERO; n],
    );
    for step in 1..=2 {
        let g = bf(&uniform(&mut r, n, 1.0));
        let pg = it.alloc_slice(&g).unwrap();
        it.run(
            &kernels::adamw_step(&cfg, step, 0.5, n, DType::BF16, pp, pm_, pv_, pw, pg).unwrap(),
        )
        .unwrap();
        cpu::adamw_step(&cfg, step, 0.5, &mut p, &g, &mut m, &mut vv, &mut w).unwrap();
    }
    assert!(rel_err(&it.read_f32(pp, n).unwrap(), &to_f64(&p)) < 1e-5);
    assert!(rel_err(&it.read_f32(pm_, n).unwrap(), &to_f64(&m)) < 1e-5);
    assert!(rel_err(&it.read_f32(pv_, n).unwrap(), &to_f64(&vv)) < 1e-5);
    assert!(rel_err(&read_bf16(&it, pw, n), &to_f64(&w)) < 1e-2);
}

#[test]
fn rope_and_ulysses_kernels_match_twins() {
    let mut r = rng(63);
    let (tokens, heads, d) = (9usize, 3usize, 64usize);
    let x = bf(&uniform(&mut r, tokens * heads * d, 1.0));
    let pos: Vec<u32> = (0..tokens as u32).map(|t| t * 131 + 5).collect();
    let mut it = interp();
    let (px, ppos, py) = (
        it.alloc_slice(&x).unwrap(),
        it.alloc_slice(&pos).unwrap(),
        it.alloc_zeroed(x.len() * 2).unwrap(),
    );
    for inverse in [false, true] {
        it.run(
            &kernels::rope(
                tokens,
                heads,
                d,
                10_000.0,
                inverse,
                DType::BF16,
                py,
                px,
                ppos,
            )
            .unwrap(),
        )
        .unwrap();
        let mut y = vec![bf16::ZERO; x.len()];
        if inverse {
            cpu::rope_bwd(&x, &pos, heads, d, 10_000.0, &mut y).unwrap();
        } else {
            cpu::rope_fwd(&x, &pos, heads, d, 10_000.0, &mut y).unwrap();
        }
        let e = rel_err(&read_bf16(&it, py, x.len()), &to_f64(&y));
        assert!(e < 1e-2, "rope inverse={inverse}: {e:e}");
    }
    let (t, h, hd, p) = (5usize, 8usize, 16usize, 4usize);
    let x = bf(&uniform(&mut r, t * h * hd, 1.0));
    let (px, pp, pu) = (
        it.alloc_slice(&x).unwrap(),
        it.alloc_zeroed(x.len() * 2).unwrap(),
        it.alloc_zeroed(x.len() * 2).unwrap(),
    );
    it.run(&kernels::ulysses_pack(t, h, hd, p, DType::BF16, pp, px).unwrap())
        .unwrap();
    let mut want = vec![bf16::ZERO; x.len()];
    cpu::ulysses_pack(&x, t, h, hd, p, &mut want).unwrap();
    assert_eq!(read_bf16(&it, pp, x.len()), want);
    it.run(&kernels::ulysses_unpack(t, h, hd, p, DType::BF16, pu, pp).unwrap())
        .unwrap();
    assert_eq!(read_bf16(&it, pu, x.len()), x);
}

/// The f32 entries of the element-wise, embedding, optimizer, RoPE,
/// Ulysses and delta kernels (the tests above run their bf16 variants)
/// against the f32 twins, 1e-5 relative (exact for the copies).
#[test]
fn f32_variants_match_twins() {
    let mut r = rng(66);
    let f = DType::F32;
    let mut it = interp();
    let close = |got: Vec<f32>, want: &[f32], what: &str| {
        let e = rel_err(&got, &to_f64(want));
        assert!(e < 1e-5, "{what} f32: {e:e}");
    };
    let n = 1000;
    let (a, b, c) = (
        uniform(&mut r, n, 3.0),
        uniform(&mut r, n, 3.0),
        uniform(&mut r, n, 1.0),
    );
    let (pa, pb, pc) = (
        it.alloc_slice(&a).unwrap(),
        it.alloc_slice(&b).unwrap(),
        it.alloc_slice(&c).unwrap(),
    );
    let (o1, o2) = (
        it.alloc_zeroed(n * 4).unwrap(),
        it.alloc_zeroed(n * 4).unwrap(),
    );
    let (mut w1, mut w2) = (vec![0.0f32; n], vec![0.0f32; n]);

    it.run(&kernels::residual_add(n, f, o1, pa, pb).unwrap())
        .unwrap();
    cpu::residual_add(&a, &b, &mut w1).unwrap();
    close(it.read_f32(o1, n).unwrap(), &w1, "residual_add");
    it.run(&kernels::swiglu_fwd(n, f, o1, pa, pb).unwrap())
        .unwrap();
    cpu::swiglu_fwd(&a, &b, &mut w1).unwrap();
    close(it.read_f32(o1, n).unwrap(), &w1, "swiglu_fwd");
    it.run(&kernels::swiglu_bwd(n, f, o1, o2, pa, pb, pc).unwrap())
        .unwrap();
    cpu::swiglu_bwd(&a, &b, &c, &mut w1, &mut w2).unwrap();
    close(it.read_f32(o1, n).unwrap(), &w1, "swiglu_bwd dgate");
    close(it.read_f32(o2, n).unwrap(), &w2, "swiglu_bwd dup");
    it.run(&kernels::gelu_tanh_fwd(n, f, o1, pa).unwrap())
        .unwrap();
    cpu::gelu_tanh_fwd(&a, &mut w1).unwrap();
    close(it.read_f32(o1, n).unwrap(), &w1, "gelu_fwd");
    it.run(&kernels::gelu_tanh_bwd(n, f, o1, pa, pc).unwrap())
        .unwrap();
    cpu::gelu_tanh_bwd(&a, &c, &mut w1).unwrap();
    close(it.read_f32(o1, n).unwrap(), &w1, "gelu_bwd");
    let out = it.alloc_zeroed(4).unwrap();
    it.run(&kernels::sq_norm(n, f, out, pa).unwrap()).unwrap();
    let (got, want) = (f64::from(it.read_f32(out, 1).unwrap()[0]), cpu::sq_norm(&a));
    assert!(
        (got - want).abs() < 1e-5 * want,
        "sq_norm f32 {got} vs {want}"
    );

    // Embedding, repeated ids.
    let (tokens, dim, v) = (7usize, 40usize, 5usize);
    let table = uniform(&mut r, v * dim, 1.0);
    let ids: Vec<u32> = vec![0, 4, 2, 2, 4, 1, 0];
    let dout = uniform(&mut r, tokens * dim, 1.0);
    let (pt, pid, pdo) = (
        it.alloc_slice(&table).unwrap(),
        it.alloc_slice(&ids).unwrap(),
        it.alloc_slice(&dout).unwrap(),
    );
    let (pout, pdt) = (
        it.alloc_zeroed(tokens * dim * 4).unwrap(),
        it.alloc_zeroed(v * dim * 4).unwrap(),
    );
    it.run(&kernels::embedding_fwd(tokens, dim, v, f, pout, pt, pid).unwrap())
        .unwrap();
    let mut want = vec![0.0f32; tokens * dim];
    cpu::embedding_fwd(&table, &ids, dim, &mut want).unwrap();
    assert_eq!(
        it.read_f32(pout, tokens * dim).unwrap(),
        want,
        "embedding_fwd f32"
    );
    it.run(&kernels::embedding_bwd(tokens, dim, v, f, pdt, pdo, pid).unwrap())
        .unwrap();
    let mut want = vec![0.0f32; v * dim];
    cpu::embedding_bwd(&dout, &ids, dim, &mut want).unwrap();
    close(it.read_f32(pdt, v * dim).unwrap(), &want, "embedding_bwd");

    // AdamW with an f32 gradient, two steps.
    let cfg = cpu::AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let p0 = uniform(&mut r, n, 1.0);
    let (pp, pm, pv, pw) = (
        it.alloc_slice(&p0).unwrap(),
        it.alloc_zeroed(n * 4).unwrap(),
        it.alloc_zeroed(n * 4).unwrap(),
        it.alloc_zeroed(n * 2).unwrap(),
    );
    let (mut p, mut m, mut vv, mut w) = (p0, vec![0.0f32; n], vec![0.0f32; n], vec![bf16::ZERO; n]);
    for step in 1..=2 {
        let g = uniform(&mut r, n, 1.0);
        let pg = it.alloc_slice(&g).unwrap();
        it.run(&kernels::adamw_step(&cfg, step, 0.5, n, f, pp, pm, pv, pw, pg).unwrap())
            .unwrap();
        cpu::adamw_step(&cfg, step, 0.5, &mut p, &g, &mut m, &mut vv, &mut w).unwrap();
    }
    close(it.read_f32(pp, n).unwrap(), &p, "adamw master");
    close(it.read_f32(pm, n).unwrap(), &m, "adamw m");
    close(it.read_f32(pv, n).unwrap(), &vv, "adamw v");

    // RoPE both ways.
    let (t, h, d) = (9usize, 3usize, 64usize);
    let x = uniform(&mut r, t * h * d, 1.0);
    let pos: Vec<u32> = (0..t as u32).map(|i| i * 131 + 5).collect();
    let (px, ppos, py) = (
        it.alloc_slice(&x).unwrap(),
        it.alloc_slice(&pos).unwrap(),
        it.alloc_zeroed(x.len() * 4).unwrap(),
    );
    for inverse in [false, true] {
        it.run(&kernels::rope(t, h, d, 10_000.0, inverse, f, py, px, ppos).unwrap())
            .unwrap();
        let mut y = vec![0.0f32; x.len()];
        if inverse {
            cpu::rope_bwd(&x, &pos, h, d, 10_000.0, &mut y).unwrap();
        } else {
            cpu::rope_fwd(&x, &pos, h, d, 10_000.0, &mut y).unwrap();
        }
        let e = rel_err(&it.read_f32(py, x.len()).unwrap(), &to_f64(&y));
        assert!(e < 1e-5, "rope f32 inverse={inverse}: {e:e}");
    }

    // Ulysses, exact permutes.
    let (t, h, hd, ranks) = (5usize, 6usize, 16usize, 3usize);
    let x = uniform(&mut r, t * h * hd, 1.0);
    let (px, pp, pu) = (
        it.alloc_slice(&x).unwrap(),
        it.alloc_zeroed(x.len() * 4).unwrap(),
        it.alloc_zeroed(x.len() * 4).unwrap(),
    );
    it.run(&kernels::ulysses_pack(t, h, hd, ranks, f, pp, px).unwrap())
        .unwrap();
    let mut want = vec![0.0f32; x.len()];
    cpu::ulysses_pack(&x, t, h, hd, ranks, &mut want).unwrap();
    assert_eq!(it.read_f32(pp, x.len()).unwrap(), want, "ulysses_pack f32");
    it.run(&kernels::ulysses_unpack(t, h, hd, ranks, f, pu, pp).unwrap())
        .unwrap();
    assert_eq!(it.read_f32(pu, x.len()).unwrap(), x, "ulysses_unpack f32");

    // Attention delta with f32 dO and O.
    let (rows, d) = (19usize, 64usize);
    let (da, oa) = (
        uniform(&mut r, rows * d, 1.0),
        uniform(&mut r, rows * d, 1.0),
    );
    let (pda, poa, pdl) = (
        it.alloc_slice(&da).unwrap(),
        it.alloc_slice(&oa).unwrap(),
        it.alloc_zeroed(rows * 4).unwrap(),
    );
    it.run(&kernels::attn_delta(rows, d, f, pda, poa, pdl).unwrap())
        .unwrap();
    let mut want = vec![0.0f32; rows];
    cpu::attn_delta(&da, &oa, d, &mut want).unwrap();
    close(it.read_f32(pdl, rows).unwrap(), &want, "attn_delta");
}

#[test]
fn embedding_kernel_traps_on_bad_id() {
    let mut it = interp();
    if it.backend() == "cuda" {
        // A trap on a GPU is sticky: every later launch of the process
        // fails, so the other tests sharing the device would too.
        eprintln!(
            "embedding_kernel_traps_on_bad_id: on cuda a trap poisons the process's context; \
             checked in the interpreter instead"
        );
        it = Runner::Interp(Box::new(
            fpdt_ptx::interp::Interpreter::new(".version 8.0\n.target sm_80\n.address_size 64\n")
                .unwrap(),
        ));
    }
    let table = vec![bf16::ONE; 4 * 8];
    let (pt, pid, pout) = (
        it.alloc_slice(&table).unwrap(),
        it.alloc_slice(&[4u32]).unwrap(),
        it.alloc_zeroed(16).unwrap(),
    );
    let l = kernels::embedding_fwd(1, 8, 4, DType::BF16, pout, pt, pid).unwrap();
    assert!(
        it.run(&l).is_err(),
        "an id outside the table must stop the kernel"
    );
}

#[test]
fn attn_bwd_matches_twin() {
    for (n, &(qt, kt, h, kvh, d, causal)) in [
        (21usize, 70usize, 2usize, 1usize, 64usize, false),
        (70, 70, 2, 2, 64, true),
        (19, 37, 2, 1, 128, false),
        (66, 66, 1, 1, 128, true),
        // Several CTAs of 128 keys, the last one partial.
        (33, 300, 2, 2, 128, false),
        (150, 150, 1, 1, 128, true),
    ]
    .iter()
    .enumerate()
    {
        let s = shape(qt, kt, h, kvh, d);
        let mut r = rng(80 + n as u64);
        let q: Vec<bf16> = to_e(&uniform(&mut r, s.q_len(), 1.0));
        let k: Vec<bf16> = to_e(&uniform(&mut r, s.kv_len(), 1.0));
        let v: Vec<bf16> = to_e(&uniform(&mut r, s.kv_len(), 1.0));
        let do_: Vec<bf16> = to_e(&uniform(&mut r, s.q_len(), 1.0));
        let scale = s.default_scale();
        let mut o = vec![0.0f32; s.q_len()];
        let mut lse = vec![0.0f32; s.rows()];
        cpu::attn_fwd_chunk(&q, &k, &v, &s, causal, scale, &mut o, &mut lse).unwrap();
        let mut delta = vec![0.0f32; s.rows()];
        cpu::attn_delta(&do_, &o, d, &mut delta).unwrap();
        let (mut dq, mut dk, mut dv) = (
            vec![0.0f32; s.q_len()],
            vec![0.0f32; s.kv_len()],
            vec![0.0f32; s.kv_len()],
        );
        cpu::attn_bwd_chunk(
            &q, &k, &v, &lse, &do_, &delta, &s, causal, scale, &mut dq, &mut dk, &mut dv,
        )
        .unwrap();

        // Every keys-per-CTA variant of this head dim.
        let variants: &[usize] = if d == 128 { &[64, 128] } else { &[64] };
        for &keys in variants {
            let mut it = Runner::new(kernels::ATTN_BWD_PTX).unwrap();
            let p = kernels::AttnBwdPtrs {
                q: it.alloc_slice(&q).unwrap(),
                k: it.alloc_slice(&k).unwrap(),
                v: it.alloc_slice(&v).unwrap(),
                do_: it.alloc_slice(&do_).unwrap(),
                lse: it.alloc_slice(&lse).unwrap(),
                delta: it.alloc_slice(&delta).unwrap(),
                dq: it.alloc_zeroed(s.q_len() * 4).unwrap(),
                dk: it.alloc_zeroed(s.kv_len() * 4).unwrap(),
                dv: it.alloc_zeroed(s.kv_len() * 4).unwrap(),
            };
            it.run(
                &kernels::attn_bwd_chunk_keys(&s, causal, scale, DType::BF16, &p, keys).unwrap(),
            )
            .unwrap();
            let gq = it.read_f32(p.dq, s.q_len()).unwrap();
            let gk = it.read_f32(p.dk, s.kv_len()).unwrap();
            let gv = it.read_f32(p.dv, s.kv_len()).unwrap();
            let (eq, ek, ev) = (
                rel_err(&gq, &f64s(&dq)),
                rel_err(&gk, &f64s(&dk)),
                rel_err(&gv, &f64s(&dv)),
            );
            println!("{s:?} causal={causal} keys={keys}: dq {eq:e} dk {ek:e} dv {ev:e}");
            assert!(
                eq < 1e-2 && ek < 1e-2 && ev < 1e-2,
                "{s:?} causal={causal} keys={keys}: dq {eq:e} dk {ek:e} dv {ev:e}"
            );
        }
    }
    // A variant that does not exist is an error naming the argument.
    let s = shape(16, 16, 1, 1, 64);
    let p = kernels::AttnBwdPtrs {
        q: 256,
        k: 256,
        v: 256,
        do_: 256,
        lse: 256,
        delta: 256,
        dq: 256,
        dk: 256,
        dv: 256,
    };
    for keys in [128, 32] {
        let e = kernels::attn_bwd_chunk_keys(&s, false, 0.1, DType::BF16, &p, keys)
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys") && e.contains(&keys.to_string()), "{e}");
    }
}
