//! The Ulysses all-to-all of one chunk with the FPDT token layout, on cpu
//! and meta groups.

mod common;

use std::time::Duration;

use common::{download, group, upload, zeros};
use fpdt_comm::ulysses::Heads;
use fpdt_comm::{
    Communicator, FpdtLayout, GroupConfig, InProcessGroup, UlyssesAllToAll, UlyssesConfig,
};
use fpdt_runtime::{MetaConfig, OpKind};

/// Value of element (token, head, e): unique and easy to read in a failure.
fn val(token: usize, head: usize, e: usize) -> f32 {
    (token * 1000 + head * 10 + e) as f32
}

fn global_tensor(s: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(s * heads * d);
    for t in 0..s {
        for h in 0..heads {
            for e in 0..d {
                v.push(val(t, h, e));
            }
        }
    }
    v
}

#[test]
fn layout_then_per_chunk_all_to_all_gives_each_rank_chunk_j_of_its_heads() {
    let (u, c, d) = (3, 2, 3);
    for p in 1..=4 {
        // GQA: twice as many query heads as kv heads, both divisible by P.
        let (heads, kv_heads) = (2 * p, p);
        let s = u * p * c;
        let layout = FpdtLayout::new(s, p, u).unwrap();
        let cfg = UlyssesConfig::new(heads, kv_heads, d, p).unwrap();
        let ranks = group(p);
        for (kind, h) in [(Heads::Query, heads), (Heads::KeyValue, kv_heads)] {
            let global = global_tensor(s, h, d);
            let row = h * d;
            for j in 0..u {
                let chunk = layout.chunk_range(j).unwrap();
                let outs: Vec<_> = ranks
                    .iter()
                    .map(|comm| {
                        let shard = layout.shard_rows(&global, row, comm.rank()).unwrap();
                        let local = layout.local_chunk_range(j).unwrap();
                        let x = upload(comm, &shard[local.start * row..local.end * row]);
                        let y = zeros(comm, x.len());
                        let a2a = UlyssesAllToAll::new(comm, comm.device().clone(), cfg).unwrap();
                        a2a.scatter_heads(comm.device().compute(), kind, 4, x.view(), y.view())
                            .unwrap();
                        (x, y)
                    })
                    .collect();
                for (comm, (_, y)) in ranks.iter().zip(&outs) {
                    comm.synchronize(comm.device().compute()).unwrap();
                    let got: Vec<f32> = download(comm, y);
                    let hp = h / p;
                    let r = comm.rank();
                    let want: Vec<f32> = chunk
                        .clone()
                        .flat_map(|t| {
                            (r * hp..(r + 1) * hp)
                                .flat_map(move |hh| (0..d).map(move |e| val(t, hh, e)))
                        })
                        .collect();
                    assert_eq!(got, want, "P = {p}, {kind:?}, chunk {j}, rank {r}");
                }
            }
        }
    }
}

#[test]
fn scatter_then_gather_is_the_identity() {
    for p in 1..=4 {
        let (heads, c, d) = (2 * p, 3, 5);
        let cfg = UlyssesConfig::new(heads, heads, d, p).unwrap();
        let ranks = group(p);
        let bufs: Vec<_> = ranks
            .iter()
            .map(|comm| {
                let data: Vec<f32> = (0..c * heads * d)
                    .map(|i| (comm.rank() * 10_000 + i) as f32)
                    .collect();
                let x = upload(comm, &data);
                let mid = zeros(comm, x.len());
                let back = zeros(comm, x.len());
                let a2a = UlyssesAllToAll::new(comm, comm.device().clone(), cfg).unwrap();
                let s = comm.device().compute();
                a2a.scatter_heads(s, Heads::Query, 4, x.view(), mid.view())
                    .unwrap();
                a2a.gather_heads(s, Heads::Query, 4, mid.view(), back.view())
                    .unwrap();
                (data, x, mid, back)
            })
            .collect();
        for (comm, (data, _, _, back)) in ranks.iter().zip(&bufs) {
            comm.synchronize(comm.device().compute()).unwrap();
            assert_eq!(&download::<f32>(comm, back), data, "P = {p}");
        }
        // Staging buffers went back once the work was done.
        for comm in &ranks {
            let usage = comm.device().ledger().usage(fpdt_runtime::Space::Device);
            assert_eq!(usage.tags.get("ulysses staging").map(|t| t.in_use), Some(0));
        }
    }
}

#[test]
fn gather_heads_undoes_the_layout_to_each_ranks_local_tokens() {
    // The backward direction: every rank holds [C, H/P, d] of chunk j for its
    // heads; after gather_heads it holds its local tokens of chunk j, all heads.
    let (p, u, c, heads, d) = (3, 2, 2, 6, 2);
    let s = u * p * c;
    let layout = FpdtLayout::new(s, p, u).unwrap();
    let cfg = UlyssesConfig::new(heads, heads, d, p).unwrap();
    let global = global_tensor(s, heads, d);
    let ranks = group(p);
    for j in 0..u {
        let chunk = layout.chunk_range(j).unwrap();
        let outs: Vec<_> = ranks
            .iter()
            .map(|comm| {
                let r = comm.rank();
                let hp = heads / p;
                let mine: Vec<f32> = chunk
                    .clone()
                    .flat_map(|t| {
                        (r * hp..(r + 1) * hp)
                            .flat_map(move |hh| (0..d).map(move |e| val(t, hh, e)))
                    })
                    .collect();
                let x = upload(comm, &mine);
                let y = zeros(comm, x.len());
                let a2a = UlyssesAllToAll::new(comm, comm.device().clone(), cfg).unwrap();
                a2a.gather_heads(comm.device().compute(), Heads::Query, 4, x.view(), y.view())
                    .unwrap();
                (x, y)
            })
            .collect();
        for (comm, (_, y)) in ranks.iter().zip(&outs) {
            comm.synchronize(comm.device().compute()).unwrap();
            let row = heads * d;
            let shard = layout.shard_rows(&global, row, comm.rank()).unwrap();
            let local = layout.local_chunk_range(j).unwrap();
            assert_eq!(
                download::<f32>(comm, y),
                shard[local.start * row..local.end * row].to_vec(),
                "chunk {j}, rank {}",
                comm.rank()
            );
        }
    }
}

#[test]
fn tokens_labels_and_positions_shard_alike_and_unshard_back() {
    let layout = FpdtLayout::new(24, 3, 2).unwrap();
    let tokens: Vec<u32> = (0..24).map(|i| 100 + i).collect();
    let labels: Vec<u32> = (0..24).map(|i| 101 + i).collect();
    let shards: Vec<Vec<u32>> = (0..3).map(|r| layout.shard(&tokens, r).unwrap()).collect();
    for (r, sh) in shards.iter().enumerate() {
        let pos = layout.positions(r).unwrap();
        let lab = layout.shard(&labels, r).unwrap();
        for ((t, l), p) in sh.iter().zip(&lab).zip(&pos) {
            assert_eq!(*t, 100 + *p as u32, "rank {r}");
            assert_eq!(*l, t + 1, "rank {r}: the label is still the next token");
        }
    }
    assert_eq!(layout.unshard(&shards).unwrap(), tokens);
}

#[test]
fn the_meta_group_advances_clocks_and_allocates_as_the_cpu_group_does() {
    let (p, c, heads, d) = (4, 1024, 8, 128);
    let cfg = UlyssesConfig::new(heads, heads, d, p).unwrap();
    let meta = InProcessGroup::meta(p, &MetaConfig::default(), GroupConfig::default()).unwrap();
    let cpu = group(p);
    let bytes = c * heads * d * 2; // bf16
    meta[1].device().ledger().start_recording();
    cpu[1].device().ledger().start_recording();
    let run = |ranks: &[fpdt_comm::InProcessComm]| {
        let mut keep = Vec::new();
        for comm in ranks {
            let dev = comm.device();
            let x = dev.alloc(bytes, "q").unwrap();
            let y = dev.alloc(bytes, "q heads").unwrap();
            let a2a = UlyssesAllToAll::new(comm, dev.clone(), cfg).unwrap();
            a2a.scatter_heads(dev.compute(), Heads::Query, 2, x.view(), y.view())
                .unwrap();
            keep.push((x, y));
        }
        for comm in ranks {
            comm.synchronize(comm.device().compute()).unwrap();
        }
        drop(keep);
    };
    run(&meta);
    run(&cpu);
    let meta_allocs = meta[1].device().ledger().take_recording();
    let cpu_allocs = cpu[1].device().ledger().take_recording();
    assert!(!meta_allocs.is_empty());
    assert_eq!(
        meta_allocs, cpu_allocs,
        "same schedule, same allocation trace"
    );

    // On meta the collective took the cost model's time for the bytes one
    // rank sends: (P-1)/P of the chunk.
    let dev = meta[1].device();
    let ev = dev.trace().events();
    let coll = ev
        .iter()
        .find(|e| e.kind == OpKind::Collective)
        .expect("a collective in the trace");
    let sent = (bytes * (p - 1) / p) as u64;
    assert_eq!(coll.bytes, sent);
    let cost = dev.cost_model();
    let want =
        ((sent as f64 / cost.collective_bandwidth + cost.launch_latency) * 1e9).round() as u64;
    assert_eq!(coll.end_ns - coll.start_ns, want);
    assert!(ev
        .iter()
        .any(|e| e.kind == OpKind::Kernel && e.name == "ulysses pack"));
    assert!(dev.now_ns() >= coll.end_ns);
}

#[test]
fn ulysses_refuses_heads_not_divisible_by_p_and_bad_chunks() {
    let e = UlyssesConfig::new(8, 2, 64, 4).unwrap_err();
    assert_eq!(
        e.to_string(),
        "kv_heads (2) must be divisible by the sequence-parallel degree P (4)"
    );
    let ranks = fpdt_comm::InProcessGroup::cpu(
        2,
        &common::cpu_config(),
        GroupConfig {
            name: "u".into(),
            timeout: Duration::from_secs(20),
            ..GroupConfig::default()
        },
    )
    .unwrap();
    let cfg3 = UlyssesConfig::new(6, 6, 4, 3).unwrap();
    let e = UlyssesAllToAll::new(&ranks[0], ranks[0].device().clone(), cfg3)
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("P (3) differs from the communicator's world size (2)"),
        "{e}"
    );

    // A chunk that is not whole tokens on rank 0: rank 0 fails, rank 1 is
    // released by the abort instead of waiting 20 s.
    let cfg = UlyssesConfig::new(4, 4, 4, 2).unwrap();
    let a0 = UlyssesAllToAll::new(&ranks[0], ranks[0].device().clone(), cfg).unwrap();
    let a1 = UlyssesAllToAll::new(&ranks[1], ranks[1].device().clone(), cfg).unwrap();
    let (x0, y0) = (zeros(&ranks[0], 60), zeros(&ranks[0], 60));
    let (x1, y1) = (zeros(&ranks[1], 64), zeros(&ranks[1], 64));
    a1.scatter_heads(
        ranks[1].device().compute(),
        Heads::Query,
        4,
        x1.view(),
        y1.view(),
    )
    .unwrap();
    let e = a0
        .scatter_heads(
            ranks[0].device().compute(),
            Heads::Query,
            4,
            x0.view(),
            y0.view(),
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("not a whole number of tokens"),
        "{e}"
    );
    let t = std::time::Instant::now();
    let e = ranks[1]
        .synchronize(ranks[1].device().compute())
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(e.to_string().contains("aborted by rank 0"), "{e}");
}
