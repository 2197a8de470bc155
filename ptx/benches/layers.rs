//! CPU twins of the layer kernels (issue #9: "the layer kernels, in GB/s
//! against the machine's measured memory bandwidth"). Each kernel's bytes
//! read + written per second beside a copy and a STREAM triad of the same
//! bytes on as many threads as the twins use, timed alternately in one run
//! (medians of 7).
//! Element-wise and row-wise kernels are memory bound, so the copy is the
//! roofline they are judged against. f32 storage, 4096 rows of 1024.

use std::hint::black_box;
use std::time::Instant;

use fpdt_ptx::cpu::{self, AdamW};

#[path = "../../benches/support/mod.rs"]
mod support;

const ROWS: usize = 4096;
const DIM: usize = 1024;
const N: usize = ROWS * DIM;
const REPS: usize = 7;

fn fill(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(97));
            (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// A copy of `src` into `dst` split over the machine's threads.
fn parallel_copy(src: &[f32], dst: &mut [f32]) {
    let t = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = src.len().div_ceil(t);
    std::thread::scope(|s| {
        for (d, c) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
            s.spawn(move || d.copy_from_slice(c));
        }
    });
}

/// STREAM's triad `a = b + s c` split over the machine's threads: what
/// plain vectorised loops reach (libc's copy is not always the fastest).
fn parallel_triad(a: &mut [f32], b: &[f32], c: &[f32]) {
    let t = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = a.len().div_ceil(t);
    std::thread::scope(|sc| {
        for ((a, b), c) in a
            .chunks_mut(chunk)
            .zip(b.chunks(chunk))
            .zip(c.chunks(chunk))
        {
            sc.spawn(move || {
                for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                    *a = b + 0.5 * c;
                }
            });
        }
    });
}

struct Case<'a> {
    name: &'static str,
    /// Bytes read plus bytes written by one call.
    bytes: usize,
    run: Box<dyn FnMut() + 'a>,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let x = fill(N, 1);
    let dy = fill(N, 2);
    let up = fill(N, 3);
    let gamma = fill(DIM, 4);
    let beta = fill(DIM, 5);
    let (mut y, mut dx, mut dx2) = (vec![0.0f32; N], vec![0.0f32; N], vec![0.0f32; N]);
    let (mut mean, mut rstd) = (vec![0.0f32; ROWS], vec![0.0f32; ROWS]);
    let (mut dgamma, mut dbeta) = (vec![0.0f32; DIM], vec![0.0f32; DIM]);
    cpu::layer_norm_fwd(&x, &gamma, &beta, DIM, 1e-5, &mut y, &mut mean, &mut rstd)
        .expect("layer norm");
    let positions: Vec<u32> = (0..ROWS as u32).collect();
    let (mut master, mut m, mut v, mut working) = (
        fill(N, 6),
        vec![0.0f32; N],
        vec![0.0f32; N],
        vec![0.0f32; N],
    );
    let opt = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let f = 4; // bytes per f32
               // Each closure borrows what it needs; they run one at a time.
    let cell = std::cell::RefCell::new((&mut y, &mut dx, &mut dx2));
    let stats = std::cell::RefCell::new((&mut mean, &mut rstd, &mut dgamma, &mut dbeta));
    let opt_state = std::cell::RefCell::new((&mut master, &mut m, &mut v, &mut working));
    let mut cases: Vec<Case<'_>> = Vec::new();
    cases.push(Case {
        name: "layer_norm fwd",
        bytes: 2 * N * f,
        run: Box::new(|| {
            let (y, _, _) = &mut *cell.borrow_mut();
            let (mean, rstd, _, _) = &mut *stats.borrow_mut();
            cpu::layer_norm_fwd(&x, &gamma, &beta, DIM, 1e-5, y, mean, rstd).expect("ln fwd");
        }),
    });
    cases.push(Case {
        name: "layer_norm bwd",
        bytes: 3 * N * f,
        run: Box::new(|| {
            let (_, dx, _) = &mut *cell.borrow_mut();
            let (mean, rstd, dg, db) = &mut *stats.borrow_mut();
            cpu::layer_norm_bwd(&x, &gamma, &dy, mean, rstd, DIM, dx, dg, db).expect("ln bwd");
        }),
    });
    cases.push(Case {
        name: "rms_norm fwd",
        bytes: 2 * N * f,
        run: Box::new(|| {
            let (y, _, _) = &mut *cell.borrow_mut();
            let (_, rstd, _, _) = &mut *stats.borrow_mut();
            cpu::rms_norm_fwd(&x, &gamma, DIM, 1e-5, y, rstd).expect("rms fwd");
        }),
    });
    cases.push(Case {
        name: "rms_norm bwd",
        bytes: 3 * N * f,
        run: Box::new(|| {
            let (_, dx, _) = &mut *cell.borrow_mut();
            let (_, rstd, dg, _) = &mut *stats.borrow_mut();
            cpu::rms_norm_bwd(&x, &gamma, &dy, rstd, DIM, dx, dg).expect("rms bwd");
        }),
    });
    cases.push(Case {
        name: "gelu_tanh fwd",
        bytes: 2 * N * f,
        run: Box::new(|| {
            let (y, _, _) = &mut *cell.borrow_mut();
            cpu::gelu_tanh_fwd(&x, y).expect("gelu fwd");
        }),
    });
    cases.push(Case {
        name: "gelu_tanh bwd",
        bytes: 3 * N * f,
        run: Box::new(|| {
            let (_, dx, _) = &mut *cell.borrow_mut();
            cpu::gelu_tanh_bwd(&x, &dy, dx).expect("gelu bwd");
        }),
    });
    cases.push(Case {
        name: "swiglu fwd",
        bytes: 3 * N * f,
        run: Box::new(|| {
            let (y, _, _) = &mut *cell.borrow_mut();
            cpu::swiglu_fwd(&x, &up, y).expect("swiglu fwd");
        }),
    });
    cases.push(Case {
        name: "swiglu bwd",
        bytes: 5 * N * f,
        run: Box::new(|| {
            let (_, dx, dx2) = &mut *cell.borrow_mut();
            cpu::swiglu_bwd(&x, &up, &dy, dx, dx2).expect("swiglu bwd");
        }),
    });
    cases.push(Case {
        name: "rope fwd (16 heads of 64)",
        bytes: 2 * N * f,
        run: Box::new(|| {
            let (y, _, _) = &mut *cell.borrow_mut();
            cpu::rope_fwd(&x, &positions, 16, 64, 10_000.0, y).expect("rope");
        }),
    });
    cases.push(Case {
        name: "adamw (f32 working copy)",
        bytes: 8 * N * f,
        run: Box::new(|| {
            let (master, m, v, w) = &mut *opt_state.borrow_mut();
            cpu::adamw_step(&opt, 3, 1.0, master, &dy, m, v, w).expect("adamw");
        }),
    });
    cases.push(Case {
        name: "sq_norm",
        bytes: N * f,
        run: Box::new(|| {
            black_box(cpu::sq_norm(&x));
        }),
    });

    // Big enough for the largest case (AdamW's 8 N: 4 N read, 4 N written).
    let copy_src = fill(4 * N, 7);
    let mut copy_dst = vec![0.0f32; 4 * N];
    let mut rows = Vec::new();
    for case in &mut cases {
        // The copy moves the same bytes: it reads half and writes half.
        let copy_elems = (case.bytes / f / 2).min(copy_src.len());
        let copy_bytes = 2 * copy_elems * f;
        // The triad moves the same bytes: two thirds read, one written.
        let triad_elems = (case.bytes / f / 3).min(copy_src.len() / 2);
        let triad_bytes = 3 * triad_elems * f;
        let (mut tk, mut tc, mut tt) = (Vec::new(), Vec::new(), Vec::new());
        (case.run)();
        for _ in 0..REPS {
            let t = Instant::now();
            (case.run)();
            tk.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            parallel_copy(&copy_src[..copy_elems], &mut copy_dst[..copy_elems]);
            black_box(&copy_dst);
            tc.push(t.elapsed().as_secs_f64());
            let (b, c) = copy_src.split_at(copy_src.len() / 2);
            let t = Instant::now();
            parallel_triad(
                &mut copy_dst[..triad_elems],
                &b[..triad_elems],
                &c[..triad_elems],
            );
            black_box(&copy_dst);
            tt.push(t.elapsed().as_secs_f64());
        }
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (k, c, tr) = (med(tk), med(tc), med(tt));
        let kbw = case.bytes as f64 / k / 1e9;
        let cbw = copy_bytes as f64 / c / 1e9;
        let tbw = triad_bytes as f64 / tr / 1e9;
        let roof = cbw.max(tbw);
        rows.push(vec![
            case.name.to_string(),
            format!("{} MiB", case.bytes >> 20),
            support::fmt_time(k),
            format!("{kbw:.1}"),
            format!("{cbw:.1}"),
            format!("{tbw:.1}"),
            format!("{:.0}%", 100.0 * kbw / roof),
        ]);
    }
    support::print_table(
        &format!(
            "CPU layer-kernel twins, f32, {ROWS} x {DIM}, against a copy and a triad of the same \
             bytes on {} threads (median of {REPS}, alternated)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        &[
            "kernel",
            "bytes moved",
            "median",
            "GB/s",
            "copy GB/s",
            "triad GB/s",
            "of the better",
        ],
        &rows,
    );
}
