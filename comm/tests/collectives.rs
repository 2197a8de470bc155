//! Every collective of the in-process group for P = 1, 2, 3, 4 against the
//! obvious serial computation.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{download, group, group_with_pieces, upload, zeros};
use fpdt_comm::{Communicator, DType, ReduceOp};
use fpdt_runtime::Work;
use half::bf16;
use rand::{Rng, SeedableRng};

fn sync_all(ranks: &[fpdt_comm::InProcessComm]) {
    for c in ranks {
        c.synchronize(c.device().compute()).expect("collective");
    }
}

fn byte(rank: usize, i: usize) -> u8 {
    (rank * 37 + i * 11 + 5) as u8
}

#[test]
fn all_to_all_matches_the_block_transpose() {
    for p in 1..=4 {
        // 7-byte blocks: neither a power of two nor a multiple of P.
        let block = 7;
        let ranks = group(p);
        let sends: Vec<Vec<u8>> = (0..p)
            .map(|r| (0..p * block).map(|i| byte(r, i)).collect())
            .collect();
        let bufs: Vec<_> = ranks
            .iter()
            .map(|c| (upload(c, &sends[c.rank()]), zeros(c, p * block)))
            .collect();
        for (c, (s, r)) in ranks.iter().zip(&bufs) {
            c.all_to_all(c.device().compute(), s.view(), r.view())
                .unwrap();
        }
        sync_all(&ranks);
        for (c, (_, r)) in ranks.iter().zip(&bufs) {
            let got: Vec<u8> = download(c, r);
            let me = c.rank();
            let want: Vec<u8> = (0..p)
                .flat_map(|i| sends[i][me * block..(me + 1) * block].to_vec())
                .collect();
            assert_eq!(got, want, "P = {p}, rank {me}");
        }
    }
}

#[test]
fn all_to_all_v_moves_unequal_and_empty_splits() {
    for p in 1..=4 {
        let ranks = group(p);
        // split[i][j]: bytes rank i sends to rank j (zeros included).
        let split = |i: usize, j: usize| (i * 3 + j * 5 + 1) % 7;
        let sends: Vec<Vec<u8>> = (0..p)
            .map(|i| {
                let n: usize = (0..p).map(|j| split(i, j)).sum();
                (0..n).map(|k| byte(i, k)).collect()
            })
            .collect();
        let bufs: Vec<_> = ranks
            .iter()
            .map(|c| {
                let me = c.rank();
                let recv: usize = (0..p).map(|i| split(i, me)).sum();
                (upload(c, &sends[me]), zeros(c, recv.max(1)), recv)
            })
            .collect();
        for (c, (s, r, n)) in ranks.iter().zip(&bufs) {
            let me = c.rank();
            let ss: Vec<usize> = (0..p).map(|j| split(me, j)).collect();
            let rs: Vec<usize> = (0..p).map(|i| split(i, me)).collect();
            let send_view = s.bytes(0..sends[me].len()).unwrap();
            let recv_view = r.bytes(0..*n).unwrap();
            c.all_to_all_v(c.device().compute(), send_view, &ss, recv_view, &rs)
                .unwrap();
        }
        sync_all(&ranks);
        for (c, (_, r, n)) in ranks.iter().zip(&bufs) {
            let me = c.rank();
            let mut want = Vec::new();
            for (i, send) in sends.iter().enumerate() {
                let from: usize = (0..me).map(|j| split(i, j)).sum();
                want.extend_from_slice(&send[from..from + split(i, me)]);
            }
            let got: Vec<u8> = download(c, r);
            assert_eq!(&got[..*n], &want[..], "P = {p}, rank {me}");
        }
    }
}

fn f32_data(rank: usize, n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 100 + rank as u64);
    (0..n).map(|_| rng.random_range(-4.0f32..4.0)).collect()
}

/// Rank-order f32 reduction, the oracle.
fn serial_f32(inputs: &[Vec<f32>], op: ReduceOp) -> Vec<f32> {
    let n = inputs[0].len();
    (0..n)
        .map(|i| {
            let mut a = inputs[0][i];
            for x in &inputs[1..] {
                a = match op {
                    ReduceOp::Sum | ReduceOp::Avg => a + x[i],
                    ReduceOp::Max => a.max(x[i]),
                    ReduceOp::Min => a.min(x[i]),
                };
            }
            if op == ReduceOp::Avg {
                a / inputs.len() as f32
            } else {
                a
            }
        })
        .collect()
}

#[test]
fn all_reduce_f32_every_op_equals_the_rank_order_reduction() {
    for p in 1..=4 {
        let ranks = group(p);
        // 13 elements: not a multiple of any P > 1, so the per-rank slices
        // of the reduction are uneven.
        for (k, op) in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min]
            .into_iter()
            .enumerate()
        {
            let inputs: Vec<Vec<f32>> = (0..p).map(|r| f32_data(r, 13, k as u64)).collect();
            let bufs: Vec<_> = ranks.iter().map(|c| upload(c, &inputs[c.rank()])).collect();
            for (c, b) in ranks.iter().zip(&bufs) {
                c.all_reduce(c.device().compute(), b.view(), DType::F32, op)
                    .unwrap();
            }
            sync_all(&ranks);
            let want = serial_f32(&inputs, op);
            for (c, b) in ranks.iter().zip(&bufs) {
                let got: Vec<f32> = download(c, b);
                assert_eq!(got, want, "P = {p}, {op}, rank {}", c.rank());
            }
        }
    }
}

#[test]
fn all_reduce_bf16_sums_in_f32_and_every_rank_agrees_bitwise() {
    for p in 1..=4 {
        let ranks = group(p);
        let n = 1031; // more than one reduction block, odd
        let inputs: Vec<Vec<bf16>> = (0..p)
            .map(|r| f32_data(r, n, 9).into_iter().map(bf16::from_f32).collect())
            .collect();
        let bufs: Vec<_> = ranks.iter().map(|c| upload(c, &inputs[c.rank()])).collect();
        for (c, b) in ranks.iter().zip(&bufs) {
            c.all_reduce(c.device().compute(), b.view(), DType::Bf16, ReduceOp::Sum)
                .unwrap();
        }
        sync_all(&ranks);
        let want: Vec<bf16> = (0..n)
            .map(|i| {
                let s = inputs.iter().fold(0.0f32, |a, x| a + x[i].to_f32());
                bf16::from_f32(s)
            })
            .collect();
        for (c, b) in ranks.iter().zip(&bufs) {
            let got: Vec<bf16> = download(c, b);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "P = {p}, rank {}",
                c.rank()
            );
        }
    }
}

#[test]
fn reduce_scatter_gives_each_rank_its_reduced_block() {
    for p in 1..=4 {
        let ranks = group(p);
        let per = 5; // elements per rank: not a multiple of P
        let inputs: Vec<Vec<f32>> = (0..p).map(|r| f32_data(r, p * per, 3)).collect();
        let bufs: Vec<_> = ranks
            .iter()
            .map(|c| (upload(c, &inputs[c.rank()]), zeros(c, per * 4)))
            .collect();
        for (c, (s, r)) in ranks.iter().zip(&bufs) {
            c.reduce_scatter(
                c.device().compute(),
                s.view(),
                r.view(),
                DType::F32,
                ReduceOp::Sum,
            )
            .unwrap();
        }
        sync_all(&ranks);
        let full = serial_f32(&inputs, ReduceOp::Sum);
        for (c, (_, r)) in ranks.iter().zip(&bufs) {
            let me = c.rank();
            let got: Vec<f32> = download(c, r);
            assert_eq!(
                got,
                full[me * per..(me + 1) * per].to_vec(),
                "P = {p}, rank {me}"
            );
        }
    }
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    for p in 1..=4 {
        let ranks = group(p);
        let n = 7;
        let sends: Vec<Vec<u8>> = (0..p)
            .map(|r| (0..n).map(|i| byte(r, i)).collect())
            .collect();
        let bufs: Vec<_> = ranks
            .iter()
            .map(|c| (upload(c, &sends[c.rank()]), zeros(c, p * n)))
            .collect();
        for (c, (s, r)) in ranks.iter().zip(&bufs) {
            c.all_gather(c.device().compute(), s.view(), r.view())
                .unwrap();
        }
        sync_all(&ranks);
        let want: Vec<u8> = sends.concat();
        for (c, (_, r)) in ranks.iter().zip(&bufs) {
            assert_eq!(download::<u8>(c, r), want, "P = {p}, rank {}", c.rank());
        }
    }
}

#[test]
fn broadcast_from_every_root() {
    for p in 1..=4 {
        let ranks = group(p);
        for root in 0..p {
            let n = 11;
            let datas: Vec<Vec<u8>> = (0..p)
                .map(|r| (0..n).map(|i| byte(r + root * 7, i)).collect())
                .collect();
            let bufs: Vec<_> = ranks.iter().map(|c| upload(c, &datas[c.rank()])).collect();
            for (c, b) in ranks.iter().zip(&bufs) {
                c.broadcast(c.device().compute(), b.view(), root).unwrap();
            }
            sync_all(&ranks);
            for (c, b) in ranks.iter().zip(&bufs) {
                assert_eq!(download::<u8>(c, b), datas[root], "P = {p}, root {root}");
            }
        }
    }
}

#[test]
fn barrier_holds_every_rank_until_the_slowest_arrives() {
    for p in 2..=4 {
        let ranks = group(p);
        let flag = Arc::new(AtomicBool::new(false));
        // The last rank works for 100 ms before the barrier; every other rank
        // checks, after the barrier, that the work is done.
        let seen: Vec<Arc<AtomicBool>> = (0..p).map(|_| Arc::new(AtomicBool::new(false))).collect();
        for c in &ranks {
            let s = c.device().compute();
            if c.rank() == p - 1 {
                let f = flag.clone();
                s.launch_host(
                    "slow",
                    Work::kernel(0.0, 0),
                    &[],
                    &[],
                    Box::new(move |_, _| {
                        std::thread::sleep(Duration::from_millis(100));
                        f.store(true, Ordering::SeqCst);
                        Ok(())
                    }),
                )
                .unwrap();
            }
            c.barrier(s).unwrap();
            let (f, seen) = (flag.clone(), seen[c.rank()].clone());
            s.launch_host(
                "after",
                Work::kernel(0.0, 0),
                &[],
                &[],
                Box::new(move |_, _| {
                    seen.store(f.load(Ordering::SeqCst), Ordering::SeqCst);
                    Ok(())
                }),
            )
            .unwrap();
        }
        sync_all(&ranks);
        for (r, s) in seen.iter().enumerate() {
            assert!(
                s.load(Ordering::SeqCst),
                "P = {p}: rank {r} passed the barrier early"
            );
        }
    }
}

#[test]
fn long_mixed_sequences_stay_matched_with_one_host_thread_per_rank() {
    // Alternating collectives of different sizes exercise both mailbox sets
    // and a fast rank running ahead of a slow one; 8-byte pieces two deep
    // make the all-reduce and all-to-all streams take several pieces and
    // wait on each other's rings.
    let p = 3;
    let ranks = group_with_pieces(p, 8, 2);
    std::thread::scope(|scope| {
        for c in &ranks {
            scope.spawn(move || {
                let s = c.device().compute();
                let me = c.rank();
                for step in 0..40usize {
                    let n = 1 + (step * 7) % 23;
                    let x = upload(c, &vec![(me + step) as f32; n]);
                    c.all_reduce(s, x.view(), DType::F32, ReduceOp::Sum)
                        .unwrap();
                    let send: Vec<u8> = (0..p * (step % 5 + 1))
                        .map(|i| byte(me, i + step))
                        .collect();
                    let a = upload(c, &send);
                    let b = zeros(c, send.len());
                    c.all_to_all(s, a.view(), b.view()).unwrap();
                    if me == step % p {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    c.synchronize(s).unwrap();
                    let want = (0..p).map(|r| (r + step) as f32).sum::<f32>();
                    assert_eq!(download::<f32>(c, &x), vec![want; n], "step {step}");
                    let blk = step % 5 + 1;
                    let got: Vec<u8> = download(c, &b);
                    for i in 0..p {
                        let w: Vec<u8> = (me * blk..(me + 1) * blk)
                            .map(|k| byte(i, k + step))
                            .collect();
                        assert_eq!(&got[i * blk..(i + 1) * blk], &w[..], "step {step}");
                    }
                }
            });
        }
    });
}

/// Uploads `data`, padded to at least one byte (a device buffer is never
/// empty); the callers view the first `data.len()` bytes.
fn padded(c: &fpdt_comm::InProcessComm, data: &[u8]) -> fpdt_runtime::DeviceBuffer {
    let mut d = data.to_vec();
    d.resize(data.len().max(1), 0);
    upload(c, &d)
}

#[test]
fn all_to_all_streams_in_any_piece_size_and_back_to_back_calls() {
    for p in 1..=4 {
        for (piece, depth) in [(1, 1), (3, 2), (5, 3), (64, 4)] {
            let ranks = group_with_pieces(p, piece, depth);
            // Three calls enqueued before one synchronize: the rings'
            // counters carry over from one call to the next, and a 0-byte
            // call sends no piece at all.
            let blocks = [7usize, 0, 13];
            let mut calls = Vec::new();
            for (t, &block) in blocks.iter().enumerate() {
                let sends: Vec<Vec<u8>> = (0..p)
                    .map(|r| (0..p * block).map(|i| byte(r, i + 31 * t)).collect())
                    .collect();
                let bufs: Vec<_> = ranks
                    .iter()
                    .map(|c| {
                        let recv = padded(c, &vec![0u8; p * block]);
                        (padded(c, &sends[c.rank()]), recv)
                    })
                    .collect();
                calls.push((block, sends, bufs));
            }
            for (block, _, bufs) in &calls {
                for (c, (s, r)) in ranks.iter().zip(bufs) {
                    let n = p * block;
                    c.all_to_all(
                        c.device().compute(),
                        s.bytes(0..n).unwrap(),
                        r.bytes(0..n).unwrap(),
                    )
                    .unwrap();
                }
            }
            sync_all(&ranks);
            for (block, sends, bufs) in &calls {
                for (c, (_, r)) in ranks.iter().zip(bufs) {
                    let me = c.rank();
                    let got: Vec<u8> = download(c, r);
                    let want: Vec<u8> = (0..p)
                        .flat_map(|i| sends[i][me * block..(me + 1) * block].to_vec())
                        .collect();
                    assert_eq!(
                        &got[..p * block],
                        &want[..],
                        "P = {p}, piece {piece}, depth {depth}, block {block}, rank {me}"
                    );
                }
            }
        }
    }
}

/// Values spread over 2^-12..2^12 in magnitude, so that sums of a few of
/// them round and their order shows in the bits ([`f32_data`]'s values
/// share one fine grid, and their sums are exact in any order).
fn f32_data_wide(rank: usize, n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 100 + rank as u64);
    (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * 2f32.powi(rng.random_range(-12..=12)))
        .collect()
}

/// Rank-order bf16 reduction in f32, rounded once: the oracle.
fn serial_bf16(inputs: &[Vec<bf16>], op: ReduceOp) -> Vec<bf16> {
    let wide: Vec<Vec<f32>> = inputs
        .iter()
        .map(|v| v.iter().map(|x| x.to_f32()).collect())
        .collect();
    serial_f32(&wide, op)
        .into_iter()
        .map(bf16::from_f32)
        .collect()
}

#[test]
fn all_reduce_streams_in_any_piece_size_for_f32_and_bf16() {
    let ops = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min];
    for p in 1..=4 {
        // 1 byte: one element per piece; 12 and 40 bytes: 3 and 10 f32 (6
        // and 20 bf16), neither dividing the slices; 4096: one piece.
        for (piece, depth) in [(1, 1), (12, 2), (40, 3), (4096, 4)] {
            let ranks = group_with_pieces(p, piece, depth);
            // Not multiples of P; 1 element leaves some ranks' slices empty.
            for n in [1usize, 5, 13, 1031] {
                // Every op in both dtypes enqueued before one synchronize.
                let mut f32_calls = Vec::new();
                let mut bf16_calls = Vec::new();
                for (k, &op) in ops.iter().enumerate() {
                    let inputs: Vec<Vec<f32>> =
                        (0..p).map(|r| f32_data_wide(r, n, 20 + k as u64)).collect();
                    let halves: Vec<Vec<bf16>> = (0..p)
                        .map(|r| {
                            let v = f32_data_wide(r, n, 40 + k as u64);
                            v.into_iter().map(bf16::from_f32).collect()
                        })
                        .collect();
                    let fb: Vec<_> = ranks.iter().map(|c| upload(c, &inputs[c.rank()])).collect();
                    let hb: Vec<_> = ranks.iter().map(|c| upload(c, &halves[c.rank()])).collect();
                    for (c, (f, h)) in ranks.iter().zip(fb.iter().zip(&hb)) {
                        let s = c.device().compute();
                        c.all_reduce(s, f.view(), DType::F32, op).unwrap();
                        c.all_reduce(s, h.view(), DType::Bf16, op).unwrap();
                    }
                    f32_calls.push((op, serial_f32(&inputs, op), fb));
                    bf16_calls.push((op, serial_bf16(&halves, op), hb));
                }
                sync_all(&ranks);
                for (op, want, bufs) in &f32_calls {
                    for (c, b) in ranks.iter().zip(bufs) {
                        let got: Vec<f32> = download(c, b);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&got),
                            bits(want),
                            "f32 {op}, P = {p}, piece {piece}, n {n}, rank {}",
                            c.rank()
                        );
                    }
                }
                for (op, want, bufs) in &bf16_calls {
                    for (c, b) in ranks.iter().zip(bufs) {
                        let got: Vec<bf16> = download(c, b);
                        let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&got),
                            bits(want),
                            "bf16 {op}, P = {p}, piece {piece}, n {n}, rank {}",
                            c.rank()
                        );
                    }
                }
            }
        }
    }
}
