//! Bad input and missing peers: each a clear error, and no rank left
//! hanging (every test is bounded well below the group's timeout unless the
//! timeout is what it tests).

mod common;

use std::time::{Duration, Instant};

use common::{group, group_with_timeout, upload, zeros};
use fpdt_comm::{
    CommError, Communicator, DType, GroupConfig, InProcessComm, InProcessGroup, ReduceOp,
};
use fpdt_runtime::{CpuConfig, Device, MetaConfig};

/// Synchronizes every rank, returning each one's result and the time taken.
fn sync_results(ranks: &[InProcessComm]) -> (Vec<Result<(), CommError>>, Duration) {
    let t = Instant::now();
    let r = ranks
        .iter()
        .map(|c| c.synchronize(c.device().compute()))
        .collect();
    (r, t.elapsed())
}

#[test]
fn a_rank_that_never_arrives_times_out_the_others_naming_it() {
    let ranks = group_with_timeout(3, Duration::from_millis(300));
    let bufs: Vec<_> = ranks.iter().map(|c| upload(c, &[1.0f32; 8])).collect();
    // Rank 2 never calls.
    for (c, b) in ranks.iter().zip(&bufs).take(2) {
        c.all_reduce(c.device().compute(), b.view(), DType::F32, ReduceOp::Sum)
            .unwrap();
    }
    let (res, took) = sync_results(&ranks[..2]);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    for r in res {
        let e = r.unwrap_err();
        assert!(e.is_timeout(), "{e}");
        let s = e.to_string();
        assert!(
            s.contains("rank(s) [2]") && s.contains("collective #0"),
            "{s}"
        );
    }
    // The group is broken: later calls fail at once, on every rank.
    let e = ranks[2]
        .all_reduce(
            ranks[2].device().compute(),
            bufs[2].view(),
            DType::F32,
            ReduceOp::Sum,
        )
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    assert!(ranks[0].broken().is_some());
}

#[test]
fn mismatched_local_sizes_fail_that_rank_and_abort_the_others_quickly() {
    let ranks = group(3);
    let a: Vec<_> = ranks.iter().map(|c| upload(c, &[7u8; 12])).collect();
    let b: Vec<_> = ranks
        .iter()
        .map(|c| zeros(c, if c.rank() == 1 { 8 } else { 12 }))
        .collect();
    let mut errs = Vec::new();
    for (c, (s, r)) in ranks.iter().zip(a.iter().zip(&b)) {
        if let Err(e) = c.all_to_all(c.device().compute(), s.view(), r.view()) {
            errs.push((c.rank(), e));
        }
    }
    // Rank 1 refuses its call; a rank called after its abort landed may be
    // refused at the call too (a race with the abort, not an error): with
    // the abort's reason, like the others at their synchronize.
    let (rank, e) = errs.first().expect("rank 1's call fails");
    assert_eq!(*rank, 1);
    let s = e.to_string();
    assert!(s.contains("12 bytes") && s.contains("has 8"), "{s}");
    let refused_at_call: Vec<usize> = errs[1..].iter().map(|(r, _)| *r).collect();
    for (r, e) in &errs[1..] {
        match e {
            CommError::Aborted { rank: 1, reason } => assert!(reason.contains("has 8"), "{reason}"),
            other => panic!("rank {r} at its call: {other:?}"),
        }
    }
    let (res, took) = sync_results(&ranks);
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} (group timeout is 20 s)"
    );
    for (r, res) in res.iter().enumerate() {
        if r == 1 || refused_at_call.contains(&r) {
            assert!(res.is_ok(), "rank {r} enqueued nothing");
            continue;
        }
        match res {
            Err(CommError::Aborted { rank: 1, reason }) => {
                assert!(reason.contains("has 8"), "{reason}")
            }
            other => panic!("rank {r}: {other:?}"),
        }
    }
}

#[test]
fn sizes_that_differ_between_ranks_are_a_mismatch_on_every_rank() {
    let ranks = group(2);
    let bufs: Vec<_> = ranks
        .iter()
        .map(|c| upload(c, &vec![1.0f32; 4 + 4 * c.rank()]))
        .collect();
    for (c, b) in ranks.iter().zip(&bufs) {
        c.all_reduce(c.device().compute(), b.view(), DType::F32, ReduceOp::Sum)
            .unwrap();
    }
    let (res, took) = sync_results(&ranks);
    assert!(took < Duration::from_secs(5));
    for r in res {
        let e = r.unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, CommError::Mismatch { seq: 0, .. }), "{s}");
        assert!(
            s.contains("rank 0: 16 bytes") && s.contains("rank 1: 32 bytes"),
            "{s}"
        );
    }
}

#[test]
fn different_collectives_on_different_ranks_are_a_mismatch() {
    let ranks = group(2);
    let b0 = upload(&ranks[0], &[1.0f32; 4]);
    ranks[0]
        .all_reduce(
            ranks[0].device().compute(),
            b0.view(),
            DType::F32,
            ReduceOp::Sum,
        )
        .unwrap();
    ranks[1].barrier(ranks[1].device().compute()).unwrap();
    let (res, _) = sync_results(&ranks);
    for r in res {
        let s = r.unwrap_err().to_string();
        assert!(
            s.contains("rank 0 called all_reduce, rank 1 called barrier"),
            "{s}"
        );
    }
}

#[test]
fn unequal_split_tables_are_a_mismatch_naming_both_ranks() {
    let ranks = group(2);
    let s0 = upload(&ranks[0], &[0u8; 4]);
    let r0 = zeros(&ranks[0], 4);
    let s1 = upload(&ranks[1], &[0u8; 4]);
    let r1 = zeros(&ranks[1], 4);
    // Rank 0 sends 1 byte to rank 1, but rank 1 expects 2 from rank 0.
    ranks[0]
        .all_to_all_v(
            ranks[0].device().compute(),
            s0.view(),
            &[3, 1],
            r0.view(),
            &[3, 1],
        )
        .unwrap();
    ranks[1]
        .all_to_all_v(
            ranks[1].device().compute(),
            s1.view(),
            &[1, 3],
            r1.view(),
            &[2, 2],
        )
        .unwrap();
    let (res, _) = sync_results(&ranks);
    for r in res {
        let s = r.unwrap_err().to_string();
        assert!(
            s.contains("rank 1 expects 2 bytes from rank 0, which sends it 1"),
            "{s}"
        );
    }
}

#[test]
fn local_argument_errors_name_the_rule() {
    // Each case on a fresh group of one rank (an error aborts the group).
    let one = || group(1).pop().unwrap();
    let c = one();
    let s = c.device().compute();
    let x = upload(&c, &[0u8; 10]);
    let y = zeros(&c, 10);

    let e = c.broadcast(s, x.view(), 1).unwrap_err();
    assert!(
        matches!(
            e,
            CommError::RankOutOfRange {
                rank: 1,
                world: 1,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("broadcast root"), "{e}");

    let c = one();
    let x = upload(&c, &[0u8; 10]);
    let e = c
        .all_reduce(c.device().compute(), x.view(), DType::F32, ReduceOp::Sum)
        .unwrap_err();
    assert!(e.to_string().contains("not a whole number of f32"), "{e}");

    let c = one();
    let x = upload(&c, &[0u8; 12]);
    let v = x.bytes(2..10).unwrap();
    let e = c
        .all_reduce(c.device().compute(), v, DType::F32, ReduceOp::Sum)
        .unwrap_err();
    assert!(e.to_string().contains("not aligned for f32"), "{e}");

    let c = one();
    let x = upload(&c, &[0u8; 12]);
    let y2 = zeros(&c, 8);
    let e = c
        .all_to_all_v(c.device().compute(), x.view(), &[12, 0], y2.view(), &[8])
        .unwrap_err();
    assert!(e.to_string().contains("send_splits has 2 entries"), "{e}");

    let c = one();
    let x = upload(&c, &[0u8; 12]);
    let e = c
        .all_gather(c.device().compute(), x.view(), y.view())
        .unwrap_err();
    assert!(
        e.to_string().contains("world size (1) x send buffer"),
        "{e}"
    );

    // A view of another device: the runtime refuses it, the group aborts.
    let c = one();
    let other = Device::cpu(common::cpu_config()).unwrap();
    let foreign = other.alloc(8, "foreign").unwrap();
    let mine = zeros(&c, 8);
    let e = c
        .all_to_all(c.device().compute(), foreign.view(), mine.view())
        .unwrap_err();
    assert!(e.to_string().contains("belongs to another device"), "{e}");
}

#[test]
fn reduce_scatter_and_all_to_all_sizes_must_fit_the_world() {
    let ranks = group(3);
    let c = &ranks[0];
    let x = upload(c, &[0.0f32; 7]);
    let y = zeros(c, 8);
    let e = c
        .reduce_scatter(
            c.device().compute(),
            x.view(),
            y.view(),
            DType::F32,
            ReduceOp::Sum,
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("world size (3) x receive buffer"),
        "{e}"
    );
    let ranks = group(3);
    let c = &ranks[0];
    let x = upload(c, &[0u8; 8]);
    let y = zeros(c, 8);
    let e = c
        .all_to_all(c.device().compute(), x.view(), y.view())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "all_to_all: send buffer length in bytes (8) must be divisible by the world size (3)"
    );
}

#[test]
fn an_explicit_abort_releases_the_waiting_ranks() {
    let ranks = group(2);
    ranks[0].barrier(ranks[0].device().compute()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    ranks[1].abort("data loader failed");
    let (res, took) = sync_results(&ranks[..1]);
    assert!(took < Duration::from_secs(5));
    let s = res[0].as_ref().unwrap_err().to_string();
    assert_eq!(
        s,
        "the communication group was aborted by rank 1: data loader failed"
    );
}

#[test]
fn groups_refuse_bad_configurations() {
    let e = InProcessGroup::create(vec![], GroupConfig::default()).unwrap_err();
    assert!(e.to_string().contains("at least one device"), "{e}");
    let cpu = Device::cpu(common::cpu_config()).unwrap();
    let meta = Device::meta(MetaConfig::default()).unwrap();
    let e = InProcessGroup::create(vec![cpu, meta], GroupConfig::default()).unwrap_err();
    assert!(e.to_string().contains("one kind"), "{e}");
    let e = InProcessGroup::cpu(
        2,
        &CpuConfig {
            device_memory: 1 << 20,
            host_memory: 1 << 20,
            ..CpuConfig::default()
        },
        GroupConfig {
            timeout: Duration::ZERO,
            ..GroupConfig::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("timeout must be positive"), "{e}");
    for (piece_bytes, ring_depth) in [(0, 4), (64, 0)] {
        let e = InProcessGroup::cpu(
            2,
            &CpuConfig {
                device_memory: 1 << 20,
                host_memory: 1 << 20,
                ..CpuConfig::default()
            },
            GroupConfig {
                piece_bytes,
                ring_depth,
                ..GroupConfig::default()
            },
        )
        .unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "piece_bytes and ring_depth must be positive, got {piece_bytes} and {ring_depth}"
            )),
            "{e}"
        );
    }
}
