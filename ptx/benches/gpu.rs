//! GPU benchmarks (issue #8, #4): copy bandwidth, pinned against pageable
//! and against the link's limit; device-to-device copies; the attention
//! kernels' TFLOP/s at the shape `scripts/sdpa_bench.py` times PyTorch at;
//! FPDT's chunked attention forward with K and V offloaded to pinned host
//! memory and prefetched through a double buffer, against the same pass
//! with them resident, per chunk size (the offload overhead and the share
//! of copy time the trace shows hidden behind kernels).
//! Without a GPU it says why and exits 0. Timed with CUDA events on the
//! streams (the trace's clock); medians of several repetitions.
//!
//! Lines starting `RESULT` are read by `scripts/gpu-check.sh`.

use std::time::Duration;

use fpdt_ptx::cpu::{AttnShape, DType};
use fpdt_ptx::kernels::{self, AttnBwdPtrs, AttnPtrs};
use fpdt_runtime::trace::{busy_ns, overlap_ns, write_chrome_trace};
use fpdt_runtime::{
    ChunkMover, CudaConfig, Device, DoubleBuffer, HostChunk, OpKind, Stream, TraceEvent, View, Work,
};

/// PCIe Gen5 x16, each way (REFERENCE-NUMBERS.md).
const PCIE5_GBPS: f64 = 64.0;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of one `op`, timed by events around `reps` runs.
fn time_on(s: &Stream, reps: usize, rounds: usize, mut op: impl FnMut() -> bool) -> Option<f64> {
    let mut out = Vec::new();
    for _ in 0..rounds {
        let a = s.record().ok()?;
        for _ in 0..reps {
            if !op() {
                return None;
            }
        }
        let b = s.record().ok()?;
        b.wait_timeout(Duration::from_secs(120)).ok()?;
        a.wait_timeout(Duration::from_secs(1)).ok()?;
        let dt = (b.time_ns()? - a.time_ns()?) as f64 * 1e-9;
        out.push(dt / reps as f64);
    }
    Some(median(out))
}

fn device(pinned: bool, dev_bytes: usize, host_bytes: usize) -> Result<Device, String> {
    Device::cuda_with(CudaConfig {
        device_memory: Some(dev_bytes),
        host_memory: host_bytes,
        pin_host_memory: pinned,
        check_each_launch: false,
        ..CudaConfig::default()
    })
    .map_err(|e| e.to_string())
}

fn copy_rows() -> Result<(), String> {
    let bytes = 256 << 20;
    println!("\n## Copies, {} MiB, median of 5 x 4", bytes >> 20);
    println!("| copy | GB/s | of PCIe Gen5 x16 ({PCIE5_GBPS} GB/s) |");
    println!("|---|---|---|");
    for pinned in [true, false] {
        let dev = device(pinned, 2 * bytes + (64 << 20), bytes + (64 << 20))?;
        let h = dev.alloc_host(bytes, "host").map_err(|e| e.to_string())?;
        let d = dev.alloc(bytes, "dev").map_err(|e| e.to_string())?;
        let d2 = dev.alloc(bytes, "dev2").map_err(|e| e.to_string())?;
        let label = if pinned { "pinned" } else { "pageable" };
        let run = |s: &Stream, src: View<'_>, dst: View<'_>, what: &str, link: bool| {
            let t = time_on(s, 4, 5, || s.copy(src, dst).is_ok());
            match t {
                Some(t) => {
                    let gbps = bytes as f64 / t / 1e9;
                    let of = if link {
                        format!("{:.0}%", 100.0 * gbps / PCIE5_GBPS)
                    } else {
                        "-".into()
                    };
                    println!("| {what} | {gbps:.1} | {of} |");
                    println!(
                        "RESULT copy_{} gbps={gbps:.2}",
                        what.split(" (").next().unwrap_or(what).replace(' ', "_")
                    );
                }
                None => println!("| {what} | failed: {:?} |  |", s.failure()),
            }
        };
        run(dev.h2d(), h.view(), d.view(), &format!("h2d {label}"), true);
        run(dev.d2h(), d.view(), h.view(), &format!("d2h {label}"), true);
        if pinned {
            // Device to device: read and write, so twice the bytes move.
            run(
                dev.compute(),
                d.view(),
                d2.view(),
                "d2d (bytes copied)",
                false,
            );
        }
        dev.synchronize().map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn fill_bf16(n: usize, seed: u32) -> Vec<half::bf16> {
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(97));
            half::bf16::from_f32((x >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
        })
        .collect()
}

/// `FPDT_BENCH_TOKENS` (for a quick run on the fake driver), else `default`.
fn bench_tokens(default: usize) -> usize {
    std::env::var("FPDT_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&t: &usize| t >= 128 && t % 32 == 0)
        .unwrap_or(default)
}

fn attention_rows() -> Result<(), String> {
    let (tokens, heads, d) = (bench_tokens(16 * 1024), 16, 128);
    let s = AttnShape {
        q_tokens: tokens,
        kv_tokens: tokens,
        heads,
        kv_heads: heads,
        head_dim: d,
    };
    let n = tokens * heads * d;
    let dev = device(true, 2 << 30, 64 << 20)?;
    let err = |e: fpdt_runtime::RuntimeError| e.to_string();
    let q = dev.upload(&fill_bf16(n, 1), "q").map_err(err)?;
    let k = dev.upload(&fill_bf16(n, 2), "k").map_err(err)?;
    let v = dev.upload(&fill_bf16(n, 3), "v").map_err(err)?;
    let dout = dev.upload(&fill_bf16(n, 4), "do").map_err(err)?;
    let o = dev.alloc(n * 4, "o").map_err(err)?;
    let lse = dev.alloc(tokens * heads * 4, "lse").map_err(err)?;
    let delta = dev.alloc(tokens * heads * 4, "delta").map_err(err)?;
    let dq = dev.alloc(n * 4, "dq").map_err(err)?;
    let dk = dev.alloc(n * 4, "dk").map_err(err)?;
    let dv = dev.alloc(n * 4, "dv").map_err(err)?;
    let a = |b: &fpdt_runtime::DeviceBuffer| b.view().addr() as u64;
    let scale = s.default_scale();
    let fwd = kernels::attn_fwd_chunk(
        &s,
        true,
        scale,
        DType::BF16,
        &AttnPtrs {
            q: a(&q),
            k: a(&k),
            v: a(&v),
            o: a(&o),
            lse: a(&lse),
        },
    )
    .map_err(|e| e.to_string())?;
    let bwd_ptrs = AttnBwdPtrs {
        q: a(&q),
        k: a(&k),
        v: a(&v),
        do_: a(&dout),
        lse: a(&lse),
        delta: a(&delta),
        dq: a(&dq),
        dk: a(&dk),
        dv: a(&dv),
    };
    // The default kernel first, then the other keys-per-CTA variants.
    let mut bwds = vec![];
    for keys in [kernels::ATTN_BWD_KEYS, 128] {
        if bwds.iter().any(|&(k, _)| k == keys) {
            continue;
        }
        let l = kernels::attn_bwd_chunk_keys(&s, true, scale, DType::BF16, &bwd_ptrs, keys)
            .map_err(|e| e.to_string())?;
        bwds.push((keys, l));
    }
    // The bf16 o the delta reads is not at hand (o is f32): the f32 delta
    // variant over the f32 o costs the same order and is what the model
    // runs with f32 accumulators.
    let del = kernels::attn_delta(tokens * heads, d, DType::F32, a(&dout), a(&o), a(&delta))
        .map_err(|e| e.to_string())?;
    let c = dev.compute();
    let (reads, writes) = (
        [q.view(), k.view(), v.view(), dout.view()],
        [
            o.view(),
            lse.view(),
            delta.view(),
            dq.view(),
            dk.view(),
            dv.view(),
        ],
    );
    // Causal: half the score matrix. Forward 2 matmuls, backward 5 (the
    // FlashAttention papers' count: backward = 2.5 x forward).
    let fwd_flops = 4.0 * (tokens as f64).powi(2) * heads as f64 * d as f64 / 2.0;
    let bwd_flops = 2.5 * fwd_flops;
    let tf = time_on(c, 3, 5, || {
        fwd.enqueue(c, Work::kernel(fwd_flops, 0), &reads, &writes)
            .is_ok()
    });
    let tbs: Vec<_> = bwds
        .iter()
        .map(|(keys, bwd)| {
            let t = time_on(c, 3, 5, || {
                del.enqueue(c, Work::kernel(0.0, 0), &reads, &writes)
                    .is_ok()
                    && bwd
                        .enqueue(c, Work::kernel(bwd_flops, 0), &reads, &writes)
                        .is_ok()
            });
            (*keys, t)
        })
        .collect();
    println!(
        "\n## Attention, bf16, causal, {tokens} tokens, {heads} heads, head dim {d} (median of 5 x 3)"
    );
    println!("| pass | ms | TFLOP/s |");
    println!("|---|---|---|");
    let mut rows = vec![("forward".to_string(), "fwd".to_string(), tf, fwd_flops)];
    for (i, (keys, t)) in tbs.into_iter().enumerate() {
        // The sdpa script reads `attn_bwd`: the default kernel's.
        let key = if i == 0 {
            "bwd".to_string()
        } else {
            format!("bwd_k{keys}")
        };
        let dflt = if i == 0 { ", the default" } else { "" };
        rows.push((
            format!("backward (delta + bwd, {keys} keys per CTA{dflt})"),
            key,
            t,
            bwd_flops,
        ));
    }
    for (name, key, t, f) in rows {
        match t {
            Some(t) => {
                println!("| {name} | {:.2} | {:.1} |", t * 1e3, f / t / 1e12);
                println!("RESULT attn_{key} tflops={:.2}", f / t / 1e12);
            }
            None => println!("| {name} | failed: {:?} | |", c.failure()),
        }
    }
    Ok(())
}

/// FPDT's attention forward over one sequence of `tokens`, chunked: for each
/// q chunk i, every kv chunk j <= i (causal within the diagonal pair),
/// partial outputs merged by LSE. K and V of chunk j are one buffer (K then
/// V); resident, or in the host arena and prefetched into a
/// [`DoubleBuffer`] one pair ahead, so the copy of the next pair's kv runs
/// on the h2d stream while this pair's kernels run on compute. Only K and V
/// move (q and the output accumulator stay resident): they are what the
/// pass re-reads, u(u+1)/2 chunk loads against u for q.
fn offload_rows() -> Result<(), String> {
    let (tokens, heads, d) = (bench_tokens(64 * 1024), 16, 128);
    let err = |e: fpdt_runtime::RuntimeError| e.to_string();
    let perr = |e: fpdt_ptx::PtxError| e.to_string();
    let kv_all = 2 * tokens * heads * d * 2;
    // Chunks of S/32 .. S/4: 2K .. 16K at 64K tokens.
    let chunks = [tokens / 32, tokens / 16, tokens / 8, tokens / 4];
    let max_chunk = tokens / 4;
    let slot = 2 * max_chunk * heads * d * 2;
    let acc = max_chunk * heads * d * 4;
    let dev = device(
        true,
        tokens * heads * d * 2 + kv_all + 2 * slot + 2 * acc + (256 << 20),
        kv_all + (64 << 20),
    )?;
    let trace_dir = std::env::var_os("FPDT_BENCH_TRACE_DIR");
    let mover = ChunkMover::new(&dev);
    let c = dev.compute().clone();
    let q = dev
        .upload(&fill_bf16(tokens * heads * d, 11), "q")
        .map_err(err)?;
    let scale = 1.0 / (d as f32).sqrt();
    println!(
        "\n## FPDT attention forward, {tokens} tokens, {heads} heads, d{d}, bf16, causal: \
         K and V offloaded and prefetched vs resident (median of 3)"
    );
    println!(
        "| chunk | pairs | resident ms | offloaded ms | overhead | kv copied | h2d busy (trace) | copy hidden behind kernels (trace) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for chunk in chunks {
        let u = tokens / chunk;
        let (qb, kvb) = (chunk * heads * d * 2, 2 * chunk * heads * d * 2);
        // Every kv chunk on the device, and a copy of each in the host arena.
        let mut kv_dev = Vec::with_capacity(u);
        let mut kv_host: Vec<HostChunk> = Vec::with_capacity(u);
        for j in 0..u {
            let r = fpdt_runtime::Resident::new(
                dev.upload(&fill_bf16(kvb / 2, 100 + j as u32), "kv")
                    .map_err(err)?,
            );
            kv_host.push(mover.copy_to_host(&r).map_err(err)?);
            kv_dev.push(r.into_buffer().map_err(err)?);
        }
        dev.synchronize().map_err(err)?;
        let db = DoubleBuffer::new(&mover, kvb, "kv slots").map_err(err)?;
        let o_acc = dev.alloc(chunk * heads * d * 4, "o").map_err(err)?;
        let l_acc = dev.alloc(chunk * heads * 4, "lse").map_err(err)?;
        let o_tmp = dev.alloc(chunk * heads * d * 4, "o_j").map_err(err)?;
        let l_tmp = dev.alloc(chunk * heads * 4, "lse_j").map_err(err)?;
        let shape = AttnShape {
            q_tokens: chunk,
            kv_tokens: chunk,
            heads,
            kv_heads: heads,
            head_dim: d,
        };
        let pair_flops = |diag: bool| {
            4.0 * (chunk as f64).powi(2) * (heads * d) as f64 * if diag { 0.5 } else { 1.0 }
        };
        let pairs: Vec<(usize, usize)> =
            (0..u).flat_map(|i| (0..=i).map(move |j| (i, j))).collect();
        let a = |v: &View<'_>| v.addr() as u64;
        // One pass; returns its seconds (events on the compute stream, from
        // before the first copy to after the last kernel).
        let pass = |offload: bool| -> Result<f64, String> {
            let t0 = c.record().map_err(err)?;
            let mut pending = if offload {
                Some(db.prefetch(&kv_host[0]).map_err(err)?)
            } else {
                None
            };
            for (n, &(i, j)) in pairs.iter().enumerate() {
                let guard = match pending.take() {
                    Some(p) => Some(p.ready().map_err(err)?),
                    None => None,
                };
                if offload {
                    if let Some(&(_, jn)) = pairs.get(n + 1) {
                        pending = Some(db.prefetch(&kv_host[jn]).map_err(err)?);
                    }
                }
                let kv = match &guard {
                    Some(g) => g.view(),
                    None => kv_dev[j].view(),
                };
                let qv = q.view().bytes(i * qb..(i + 1) * qb).map_err(err)?;
                let (kvk, kvv) = (
                    kv.bytes(0..kvb / 2).map_err(err)?,
                    kv.bytes(kvb / 2..kvb).map_err(err)?,
                );
                let (o, l) = if j == 0 {
                    (o_acc.view(), l_acc.view())
                } else {
                    (o_tmp.view(), l_tmp.view())
                };
                let f = kernels::attn_fwd_chunk(
                    &shape,
                    i == j,
                    scale,
                    DType::BF16,
                    &AttnPtrs {
                        q: a(&qv),
                        k: a(&kvk),
                        v: a(&kvv),
                        o: a(&o),
                        lse: a(&l),
                    },
                )
                .map_err(perr)?;
                f.enqueue(&c, Work::kernel(pair_flops(i == j), 0), &[qv, kv], &[o, l])
                    .map_err(perr)?;
                if j > 0 {
                    let m = kernels::lse_merge(
                        chunk * heads,
                        d,
                        a(&o_acc.view()),
                        a(&l_acc.view()),
                        a(&o),
                        a(&l),
                    )
                    .map_err(perr)?;
                    m.enqueue(
                        &c,
                        Work::kernel(0.0, 0),
                        &[o, l],
                        &[o_acc.view(), l_acc.view()],
                    )
                    .map_err(perr)?;
                }
                drop(guard);
            }
            let t1 = c.record().map_err(err)?;
            t1.wait_timeout(Duration::from_secs(120)).map_err(err)?;
            let ns = t1
                .time_ns()
                .zip(t0.time_ns())
                .map(|(b, a)| b.saturating_sub(a))
                .ok_or("no event times")?;
            c.failure().map_or(Ok(()), |e| Err(format!("{e:?}")))?;
            Ok(ns as f64 * 1e-9)
        };
        pass(false)?;
        pass(true)?;
        let res = median((0..3).map(|_| pass(false)).collect::<Result<_, _>>()?);
        let off = median((0..3).map(|_| pass(true)).collect::<Result<_, _>>()?);
        // One more offloaded pass, traced alone.
        dev.synchronize().map_err(err)?;
        dev.trace().clear();
        pass(true)?;
        dev.synchronize().map_err(err)?;
        let evs = dev.trace().events();
        let h2d: Vec<&TraceEvent> = evs.iter().filter(|e| e.kind == OpKind::CopyH2D).collect();
        let kern: Vec<&TraceEvent> = evs.iter().filter(|e| e.kind == OpKind::Kernel).collect();
        let (busy, hidden) = (busy_ns(&h2d), overlap_ns(&h2d, &kern));
        if let (Some(dir), 8192) = (&trace_dir, chunk) {
            let path = std::path::Path::new(dir).join("fpdt-attention-offload-8k.json");
            match write_chrome_trace(&[dev.trace()], &path) {
                Ok(()) => eprintln!(
                    "trace of the offloaded pass at chunk 8K: {}",
                    path.display()
                ),
                Err(e) => eprintln!("trace not written: {e}"),
            }
        }
        let copied = pairs.len() * kvb;
        println!(
            "| {} | {} | {:.2} | {:.2} | {:+.1}% | {:.2} GB | {:.2} ms | {:.0}% |",
            chunk,
            pairs.len(),
            res * 1e3,
            off * 1e3,
            100.0 * (off / res - 1.0),
            copied as f64 / 1e9,
            busy as f64 * 1e-6,
            100.0 * hidden as f64 / busy.max(1) as f64
        );
        println!(
            "RESULT fpdt_offload chunk={chunk} resident_ms={:.3} offload_ms={:.3} overhead_pct={:.2} hidden_pct={:.1}",
            res * 1e3,
            off * 1e3,
            100.0 * (off / res - 1.0),
            100.0 * hidden as f64 / busy.max(1) as f64
        );
        dev.trace().clear();
    }
    Ok(())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let gpus = match fpdt_runtime::cuda::probe() {
        Ok(g) if !g.is_empty() => g,
        Ok(_) => {
            println!("gpu bench: skipped: the driver sees no GPU");
            return;
        }
        Err(e) => {
            println!("gpu bench: skipped: {e}");
            return;
        }
    };
    let g = &gpus[0];
    println!(
        "# GPU benchmarks on {} (sm_{}{}, {} SMs, {} copy engines, {} GiB, PCI {})",
        g.name,
        g.compute_capability.0,
        g.compute_capability.1,
        g.multiprocessors,
        g.async_engines,
        g.total_memory >> 30,
        g.pci_bus_id
    );
    if let Err(e) = copy_rows() {
        println!("copies: failed: {e}");
    }
    if let Err(e) = attention_rows() {
        println!("attention: failed: {e}");
    }
    if let Err(e) = offload_rows() {
        println!("fpdt attention offload: failed: {e}");
    }
}
