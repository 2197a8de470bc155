//! Slab allocator and host arena against the system allocator.
//!
//! Target (issue 2): an alloc+free pair of the slab has a median under
//! 100 ns, and is faster than the system allocator for the same sizes and
//! alignment; the ratio is printed.

use std::alloc::{alloc, dealloc, Layout};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use fpdt_alloc::{ArenaConfig, HostArena, NoPinner, SlabAllocator};

#[path = "../../benches/support/mod.rs"]
mod support;

/// Sizes of the chunk buffers a layer step allocates: a few KiB (lse) to a
/// few MiB (kv chunks), cycled so neither allocator sees one size only.
const SIZES: [usize; 8] = [
    4 << 10,
    64 << 10,
    1 << 20,
    8 << 20,
    16 << 10,
    256 << 10,
    2 << 20,
    512,
];

/// Blocks alive at once in the FIFO pattern.
const WINDOW: usize = 16;

fn main() {
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300))
        .configure_from_args();

    let slab = SlabAllocator::virtual_region(1 << 30, "device").expect("slab");
    // Keep a few blocks live so the free lists are not trivially empty.
    let _held: Vec<_> = (0..64)
        .map(|i| slab.alloc(SIZES[i % SIZES.len()], "held").expect("held"))
        .collect();
    let arena = HostArena::new(ArenaConfig {
        pinner: Arc::new(NoPinner),
        ..ArenaConfig::new(1 << 30)
    })
    .expect("arena");

    let mut g = c.benchmark_group("alloc+free pair");
    g.bench_function("slab", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for i in 0..iters {
                let blk = slab
                    .alloc(SIZES[i as usize % SIZES.len()], "x")
                    .expect("alloc");
                black_box(&blk);
            }
            let e = t.elapsed();
            support::record("slab", e, iters);
            e
        })
    });
    g.bench_function("host arena", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for i in 0..iters {
                let blk = arena
                    .alloc(SIZES[i as usize % SIZES.len()], "x")
                    .expect("alloc");
                black_box(&blk);
            }
            let e = t.elapsed();
            support::record("arena", e, iters);
            e
        })
    });
    g.bench_function("system allocator", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for i in 0..iters {
                let size = SIZES[i as usize % SIZES.len()];
                let Ok(layout) = Layout::from_size_align(size, 256) else {
                    continue;
                };
                // SAFETY: the layout has a non-zero size; the pointer is
                // freed with the same layout right away and never read.
                unsafe {
                    let p = alloc(layout);
                    black_box(p);
                    if !p.is_null() {
                        dealloc(p, layout);
                    }
                }
            }
            let e = t.elapsed();
            support::record("system", e, iters);
            e
        })
    });
    g.finish();

    // The pattern of a layer step: blocks live a while (chunks in flight,
    // double-buffer slots), freed in the order they were made.
    let mut g = c.benchmark_group("alloc+free, 16 live (FIFO)");
    g.bench_function("slab", |b| {
        b.iter_custom(|iters| {
            let mut live = std::collections::VecDeque::with_capacity(WINDOW + 1);
            let t = Instant::now();
            for i in 0..iters {
                live.push_back(
                    slab.alloc(SIZES[i as usize % SIZES.len()], "x")
                        .expect("alloc"),
                );
                if live.len() > WINDOW {
                    live.pop_front();
                }
            }
            let e = t.elapsed();
            drop(live);
            support::record("slab fifo", e, iters);
            e
        })
    });
    g.bench_function("system allocator", |b| {
        b.iter_custom(|iters| {
            let mut live = std::collections::VecDeque::with_capacity(WINDOW + 1);
            let t = Instant::now();
            for i in 0..iters {
                let size = SIZES[i as usize % SIZES.len()];
                let Ok(layout) = Layout::from_size_align(size, 256) else {
                    continue;
                };
                // SAFETY: non-zero size; each pointer is freed once, with
                // its own layout, and never read.
                let p = unsafe { alloc(layout) };
                live.push_back((p, layout));
                if live.len() > WINDOW {
                    if let Some((p, l)) = live.pop_front() {
                        if !p.is_null() {
                            // SAFETY: as above.
                            unsafe { dealloc(p, l) };
                        }
                    }
                }
            }
            let e = t.elapsed();
            for (p, l) in live {
                if !p.is_null() {
                    // SAFETY: as above.
                    unsafe { dealloc(p, l) };
                }
            }
            support::record("system fifo", e, iters);
            e
        })
    });
    g.finish();
    c.final_summary();

    let slab_t = support::median("slab");
    let arena_t = support::median("arena");
    let sys_t = support::median("system");
    let slab_fifo = support::median("slab fifo");
    let sys_fifo = support::median("system fifo");
    support::print_table(
        "allocator: one alloc+free pair, sizes 512 B .. 8 MiB cycled (medians)",
        &["allocator", "median", "vs system", "target", "met"],
        &[
            vec![
                "slab (TLSF)".into(),
                support::fmt_time(slab_t),
                format!("{:.2}x faster", sys_t / slab_t),
                "< 100 ns, faster than system".into(),
                (slab_t < 100e-9 && slab_t < sys_t).to_string(),
            ],
            vec![
                "host arena (slab over the mapping)".into(),
                support::fmt_time(arena_t),
                format!("{:.2}x faster", sys_t / arena_t),
                String::new(),
                String::new(),
            ],
            vec![
                "system (glibc, 256-aligned)".into(),
                support::fmt_time(sys_t),
                "1.00x".into(),
                String::new(),
                String::new(),
            ],
            vec![
                "slab, 16 blocks live (FIFO)".into(),
                support::fmt_time(slab_fifo),
                format!("{:.2}x faster", sys_fifo / slab_fifo),
                "faster than system".into(),
                (slab_fifo < sys_fifo).to_string(),
            ],
            vec![
                "system, 16 blocks live (FIFO)".into(),
                support::fmt_time(sys_fifo),
                "1.00x".into(),
                String::new(),
                String::new(),
            ],
        ],
    );
}
