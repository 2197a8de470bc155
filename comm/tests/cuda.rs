//! The in-process group on cuda devices: two ranks sharing one GPU, each
//! on its own stream and thread, every collective against the serial
//! computation; a mismatched call and a missing rank fail on every rank.
//! Without a GPU each test prints why it skipped; `scripts/fake-cuda-test.sh`
//! runs them against the fake driver, where they must not skip.

use std::thread;
use std::time::Duration;

use fpdt_comm::{
    CommError, Communicator, DType, GroupConfig, InProcessComm, InProcessGroup, ReduceOp,
};
use fpdt_runtime::{CudaConfig, Device, DeviceBuffer, Stream};

const P: usize = 2;

fn gpu(test: &str) -> Option<Device> {
    match Device::cuda_with(CudaConfig {
        device_memory: Some(64 << 20),
        host_memory: 64 << 20,
        wait_timeout: Duration::from_secs(60),
        ..CudaConfig::default()
    }) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("{test}: skipped, no GPU: {e}");
            None
        }
    }
}

fn group(dev: &Device, timeout: Duration) -> Vec<InProcessComm> {
    group_of(vec![dev.clone(); P], timeout)
}

fn group_of(devices: Vec<Device>, timeout: Duration) -> Vec<InProcessComm> {
    let cfg = GroupConfig {
        name: "cuda-test".into(),
        timeout,
        ..GroupConfig::default()
    };
    InProcessGroup::create(devices, cfg).expect("a cuda group")
}

/// Runs `f(rank, comm, stream)` on one thread per rank.
fn on_ranks<T: Send>(
    ranks: &[InProcessComm],
    f: impl Fn(usize, &InProcessComm, &Stream) -> T + Sync,
) -> Vec<T> {
    thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter()
            .enumerate()
            .map(|(r, c)| {
                let f = &f;
                s.spawn(move || {
                    let stream = c.device().new_stream(&format!("rank {r}")).expect("stream");
                    f(r, c, &stream)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

fn f32s(dev: &Device, b: &DeviceBuffer) -> Vec<f32> {
    dev.download(b.view()).expect("download")
}

/// Rank r's i-th value: distinct per rank and index, exact in f32 sums.
fn value(r: usize, i: usize) -> f32 {
    (r * 1000 + i) as f32 * 0.5
}

#[test]
fn every_collective_on_a_shared_gpu_equals_the_serial_result() {
    let Some(dev) = gpu("every_collective_on_a_shared_gpu_equals_the_serial_result") else {
        return;
    };
    every_collective_equals_the_serial_result(&group(&dev, Duration::from_secs(30)));
}

#[test]
fn every_collective_between_two_devices_equals_the_serial_result() {
    // Two devices (on one GPU here, or on two): each rank's buffers belong
    // to its own device, so its peers' are copied with copy_peer.
    let test = "every_collective_between_two_devices_equals_the_serial_result";
    let Some(a) = gpu(test) else {
        return;
    };
    let Some(b) = gpu(test) else {
        return;
    };
    every_collective_equals_the_serial_result(&group_of(vec![a, b], Duration::from_secs(30)));
}

fn every_collective_equals_the_serial_result(ranks: &[InProcessComm]) {
    let n = 6; // elements per rank block
               // all_to_all_v: rank i sends split(i, j) f32 to rank j (a zero included).
    let split = |i: usize, j: usize| (i * 3 + j * 2) % 4;
    let got = on_ranks(ranks, |r, c, s| {
        let dev = c.device();
        let mine: Vec<f32> = (0..P * n).map(|i| value(r, i)).collect();
        let send = dev.upload(&mine, "send").expect("upload");
        let a2a = dev.alloc(4 * P * n, "a2a").expect("alloc");
        c.all_to_all(s, send.view(), a2a.view())
            .expect("all_to_all");
        let sends: Vec<usize> = (0..P).map(|j| 4 * split(r, j)).collect();
        let recvs: Vec<usize> = (0..P).map(|i| 4 * split(i, r)).collect();
        let v_send = send.bytes(0..sends.iter().sum()).expect("view");
        let v_recv = dev
            .alloc(recvs.iter().sum::<usize>().max(4), "a2av")
            .expect("alloc");
        let v_recv_view = v_recv.bytes(0..recvs.iter().sum()).expect("view");
        c.all_to_all_v(s, v_send, &sends, v_recv_view, &recvs)
            .expect("all_to_all_v");
        let gathered = dev.alloc(4 * P * n, "gathered").expect("alloc");
        let first = send.elems::<f32>(0..n).expect("view");
        c.all_gather(s, first, gathered.view()).expect("all_gather");
        let summed = dev.upload(&mine, "summed").expect("upload");
        c.all_reduce(s, summed.view(), DType::F32, ReduceOp::Sum)
            .expect("all_reduce");
        let scattered = dev.alloc(4 * n, "scattered").expect("alloc");
        c.reduce_scatter(s, send.view(), scattered.view(), DType::F32, ReduceOp::Max)
            .expect("reduce_scatter");
        let bcast = dev.upload(&mine, "bcast").expect("upload");
        c.broadcast(s, bcast.view(), 1).expect("broadcast");
        c.barrier(s).expect("barrier");
        c.synchronize(s).expect("synchronize");
        let mut a2av = f32s(dev, &v_recv);
        a2av.truncate(recvs.iter().sum::<usize>() / 4);
        [a2a, gathered, summed, scattered, bcast]
            .map(|b| f32s(dev, &b))
            .into_iter()
            .chain([a2av])
            .collect::<Vec<_>>()
    });
    for (r, v) in got.iter().enumerate() {
        let [a2a, gathered, summed, scattered, bcast, a2av] = &v[..] else {
            panic!("six results");
        };
        let want_a2a: Vec<f32> = (0..P)
            .flat_map(|p| (r * n..(r + 1) * n).map(move |i| value(p, i)))
            .collect();
        assert_eq!(a2a, &want_a2a, "all_to_all, rank {r}");
        let want_a2av: Vec<f32> = (0..P)
            .flat_map(|i| {
                let from: usize = (0..r).map(|j| split(i, j)).sum();
                (from..from + split(i, r)).map(move |k| value(i, k))
            })
            .collect();
        assert_eq!(a2av, &want_a2av, "all_to_all_v, rank {r}");
        let want_gather: Vec<f32> = (0..P)
            .flat_map(|p| (0..n).map(move |i| value(p, i)))
            .collect();
        assert_eq!(gathered, &want_gather, "all_gather, rank {r}");
        let want_sum: Vec<f32> = (0..P * n)
            .map(|i| (0..P).map(|p| value(p, i)).sum())
            .collect();
        assert_eq!(summed, &want_sum, "all_reduce, rank {r}");
        let want_max: Vec<f32> = (r * n..(r + 1) * n).map(|i| value(P - 1, i)).collect();
        assert_eq!(scattered, &want_max, "reduce_scatter, rank {r}");
        let want_bcast: Vec<f32> = (0..P * n).map(|i| value(1, i)).collect();
        assert_eq!(bcast, &want_bcast, "broadcast, rank {r}");
    }
}

#[test]
fn work_before_and_after_a_collective_stays_ordered_on_the_stream() {
    let Some(dev) = gpu("work_before_and_after_a_collective_stays_ordered_on_the_stream") else {
        return;
    };
    let ranks = group(&dev, Duration::from_secs(30));
    let got = on_ranks(&ranks, |r, c, s| {
        // The input is written by a copy queued just before the collective,
        // the output read by a copy queued just after it.
        let src = dev.upload(&[r as f32 + 1.0; 4], "src").expect("upload");
        let buf = dev.alloc(16, "buf").expect("alloc");
        s.copy(src.view(), buf.view()).expect("copy in");
        c.all_reduce(s, buf.view(), DType::F32, ReduceOp::Sum)
            .expect("all_reduce");
        // The all-to-all reads what the all-reduce wrote, on the GPU path.
        let moved = dev.alloc(16, "moved").expect("alloc");
        c.all_to_all(s, buf.view(), moved.view())
            .expect("all_to_all");
        let out = dev.alloc(16, "out").expect("alloc");
        s.copy(moved.view(), out.view()).expect("copy out");
        // Overwriting the send buffer right after must not reach the peer.
        s.copy(src.view(), buf.view()).expect("overwrite");
        s.synchronize().expect("sync");
        f32s(&dev, &out)
    });
    for (r, v) in got.iter().enumerate() {
        assert_eq!(v, &vec![3.0f32; 4], "rank {r}");
    }
}

#[test]
fn a_mismatched_call_and_a_missing_rank_fail_every_rank_by_name() {
    let Some(dev) = gpu("a_mismatched_call_and_a_missing_rank_fail_every_rank_by_name") else {
        return;
    };
    let ranks = group(&dev, Duration::from_secs(30));
    let errs = on_ranks(&ranks, |r, c, s| {
        let b = dev.alloc(4 * (4 + 4 * r), "b").expect("alloc");
        c.all_reduce(s, b.view(), DType::F32, ReduceOp::Sum)
            .expect_err("lengths differ")
    });
    for (r, e) in errs.iter().enumerate() {
        assert!(matches!(e, CommError::Mismatch { .. }), "rank {r}: {e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("all_reduce") && msg.contains("16 bytes"),
            "rank {r}: {msg}"
        );
    }
    // Rank 1 never calls: rank 0 times out naming it.
    let ranks = group(&dev, Duration::from_millis(300));
    let errs = on_ranks(&ranks, |r, c, s| {
        if r == 1 {
            return None;
        }
        Some(c.barrier(s).expect_err("rank 1 is missing"))
    });
    let e = errs[0].as_ref().expect("rank 0's error");
    assert!(matches!(e, CommError::Timeout { .. }), "{e:?}");
    assert!(e.to_string().contains("[1]"), "names rank 1: {e}");
}

/// Bytes of `n` values of `dtype` for rank `r` (varied magnitudes, so the
/// rank order of the sums matters).
fn typed_values(dtype: DType, r: usize, n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let x = ((r * 7 + i * 13) % 29) as f64 * 10f64.powi((i % 5) as i32 - 2) - 3.0;
            match dtype {
                DType::F32 => (x as f32).to_le_bytes().to_vec(),
                DType::F64 => x.to_le_bytes().to_vec(),
                DType::Bf16 => half::bf16::from_f64(x).to_le_bytes().to_vec(),
                DType::F16 => half::f16::from_f64(x).to_le_bytes().to_vec(),
            }
        })
        .collect()
}

#[test]
fn reductions_on_the_gpu_and_past_its_fan_in_equal_the_host_reduction() {
    let Some(dev) = gpu("reductions_on_the_gpu_and_past_its_fan_in_equal_the_host_reduction")
    else {
        return;
    };
    // 3 ranks reduce with the kernel; 9, more than it takes, on the host.
    for p in [3usize, 9] {
        let ranks = group_of(vec![dev.clone(); p], Duration::from_secs(30));
        let n = 2 * p + 1; // not a multiple of P: the slices differ in size
        for dtype in [DType::F32, DType::F64, DType::Bf16, DType::F16] {
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
                let ins: Vec<Vec<u8>> = (0..p).map(|r| typed_values(dtype, r, n)).collect();
                let srcs: Vec<&[u8]> = ins.iter().map(|v| v.as_slice()).collect();
                let mut want = vec![0u8; n * dtype.size()];
                fpdt_comm::reduce_into(dtype, op, &srcs, &mut want).expect("host reduce");
                let got = on_ranks(&ranks, |r, c, s| {
                    let dev = c.device();
                    let buf = dev.upload(&ins[r], "buf").expect("upload");
                    c.all_reduce(s, buf.view(), dtype, op).expect("all_reduce");
                    // reduce_scatter of p blocks of 2 elements each.
                    let b = 2 * dtype.size();
                    let send = dev.upload(&ins[r][..p * b], "send").expect("upload");
                    let recv = dev.alloc(b, "recv").expect("alloc");
                    c.reduce_scatter(s, send.view(), recv.view(), dtype, op)
                        .expect("reduce_scatter");
                    c.synchronize(s).expect("sync");
                    let all: Vec<u8> = dev.download(buf.view()).expect("download");
                    let mine: Vec<u8> = dev.download(recv.view()).expect("download");
                    (all, mine)
                });
                for (r, (all, mine)) in got.iter().enumerate() {
                    assert_eq!(all, &want, "P = {p}, {dtype} {op}: all_reduce, rank {r}");
                    // Each block reduced alone equals the same elements of
                    // the whole reduction (element-wise, same order).
                    let b = 2 * dtype.size();
                    let blocks: Vec<&[u8]> = ins.iter().map(|v| &v[r * b..(r + 1) * b]).collect();
                    let mut w = vec![0u8; b];
                    fpdt_comm::reduce_into(dtype, op, &blocks, &mut w).expect("host reduce");
                    assert_eq!(mine, &w, "P = {p}, {dtype} {op}: reduce_scatter, rank {r}");
                }
            }
        }
    }
}
