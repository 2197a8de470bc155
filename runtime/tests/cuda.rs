//! The cuda backend. Without a driver or a GPU, `Device::cuda` must fail
//! with a clear error (that is tested everywhere); the rest runs where a GPU
//! is present and otherwise prints why it skipped.

use std::time::Duration;

use fpdt_runtime::{
    CpuConfig, CudaConfig, Device, DeviceKind, KernelArg, MetaConfig, OpKind, PtxKernel,
    RuntimeError, Work,
};

/// out[i] = in[i] + 1 for i < n (one thread an element).
const ADD_ONE: &str = r#"
.version 7.0
.target sm_80
.address_size 64
.visible .entry add_one_f32(.param .u64 p_out, .param .u64 p_in, .param .u32 p_n)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .b64 %rd<8>;
    .reg .f32 %f<3>;
    ld.param.u64 %rd1, [p_out];
    ld.param.u64 %rd2, [p_in];
    ld.param.u32 %r1, [p_n];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.u32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    mul.wide.u32 %rd3, %r5, 4;
    add.s64 %rd4, %rd2, %rd3;
    add.s64 %rd5, %rd1, %rd3;
    ld.global.f32 %f1, [%rd4];
    add.f32 %f2, %f1, 0f3F800000;
    st.global.f32 [%rd5], %f2;
DONE:
    ret;
}

// One block reverses n <= shared/4 floats through dynamic shared memory.
.extern .shared .align 16 .b8 smem[];
.visible .entry reverse_shared(.param .u64 p_out, .param .u64 p_in, .param .u32 p_n)
{
    .reg .pred %p<2>;
    .reg .b32 %r<10>;
    .reg .b64 %rd<10>;
    .reg .f32 %f<2>;
    ld.param.u64 %rd1, [p_out];
    ld.param.u64 %rd2, [p_in];
    ld.param.u32 %r1, [p_n];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    mov.u32 %r2, %tid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r9, smem;
    mov.u32 %r4, %r2;
LOAD:
    setp.ge.u32 %p1, %r4, %r1;
    @%p1 bra LOADED;
    mul.wide.u32 %rd3, %r4, 4;
    add.s64 %rd4, %rd2, %rd3;
    ld.global.f32 %f1, [%rd4];
    shl.b32 %r5, %r4, 2;
    add.u32 %r5, %r5, %r9;
    st.shared.f32 [%r5], %f1;
    add.u32 %r4, %r4, %r3;
    bra LOAD;
LOADED:
    bar.sync 0;
    mov.u32 %r4, %r2;
STORE:
    setp.ge.u32 %p1, %r4, %r1;
    @%p1 bra DONE;
    sub.u32 %r6, %r1, %r4;
    sub.u32 %r6, %r6, 1;
    shl.b32 %r5, %r6, 2;
    add.u32 %r5, %r5, %r9;
    ld.shared.f32 %f1, [%r5];
    mul.wide.u32 %rd3, %r4, 4;
    add.s64 %rd4, %rd1, %rd3;
    st.global.f32 [%rd4], %f1;
    add.u32 %r4, %r4, %r3;
    bra STORE;
DONE:
    ret;
}

// Spins for about p_cycles clock cycles, then writes 1 to out[0].
.visible .entry spin(.param .u64 p_out, .param .u64 p_cycles)
{
    .reg .pred %p<2>;
    .reg .b64 %rd<6>;
    .reg .f32 %f<2>;
    ld.param.u64 %rd1, [p_out];
    ld.param.u64 %rd2, [p_cycles];
    cvta.to.global.u64 %rd1, %rd1;
    mov.u64 %rd3, %clock64;
WAIT:
    mov.u64 %rd4, %clock64;
    sub.s64 %rd5, %rd4, %rd3;
    setp.lt.s64 %p1, %rd5, %rd2;
    @%p1 bra WAIT;
    mov.f32 %f1, 0f3F800000;
    st.global.f32 [%rd1], %f1;
    ret;
}
"#;

/// A launch of `entry` of the test module.
fn kernel<'a>(
    entry: &'a str,
    grid: u32,
    block: u32,
    shared_bytes: u32,
    args: &'a [KernelArg],
) -> PtxKernel<'a> {
    PtxKernel {
        ptx: ADD_ONE,
        entry,
        grid: [grid, 1, 1],
        block: [block, 1, 1],
        shared_bytes,
        args,
    }
}

/// The name the test double of `runtime/tests/fake_cuda` gives its GPU:
/// these tests run against it in CI (`scripts/fake-cuda-test.sh`), where
/// only what needs real concurrency is skipped.
const FAKE_GPU: &str = "Fake GPU";

/// The GPU, or None after saying why the GPU tests skip.
fn gpu(test: &str) -> Option<Device> {
    gpu_with(test, cfg!(debug_assertions))
}

fn gpu_with(test: &str, check_each_launch: bool) -> Option<Device> {
    match Device::cuda_with(CudaConfig {
        check_each_launch,
        device_memory: Some(256 << 20),
        host_memory: 256 << 20,
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

#[test]
fn without_a_gpu_the_cuda_device_is_a_clear_error() {
    match Device::cuda(0) {
        Ok(d) => {
            // A GPU is here: the probe must agree.
            let gpus = fpdt_runtime::cuda::probe().unwrap();
            assert!(!gpus.is_empty());
            assert_eq!(d.kind(), DeviceKind::Cuda);
            eprintln!("GPU present: {:?}", d.gpu_info());
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(matches!(e, RuntimeError::Cuda(_)), "{e:?}");
            assert!(
                msg.contains("libcuda") || msg.contains("cuInit") || msg.contains("GPU"),
                "the error should say what is missing: {msg}"
            );
            let p = fpdt_runtime::cuda::probe().unwrap_err().to_string();
            assert_eq!(p, msg, "the probe and the device disagree");
        }
    }
}

#[test]
fn a_missing_ordinal_is_named() {
    if let Err(e) = fpdt_runtime::cuda::probe() {
        eprintln!("a_missing_ordinal_is_named: skipped, no GPU: {e}");
        return;
    }
    let e = Device::cuda(4096).unwrap_err().to_string();
    assert!(e.contains("device 4096 does not exist"), "{e}");
}

#[test]
fn bad_configs_are_rejected_before_touching_the_driver() {
    let e = Device::cuda_with(CudaConfig {
        memory_fraction: 0.0,
        ..CudaConfig::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("memory_fraction = 0"), "{e}");
}

#[test]
fn ptx_launches_are_costed_on_meta_and_refused_on_cpu() {
    let meta = Device::meta(MetaConfig::default()).unwrap();
    let x = meta.alloc(1024, "x").unwrap();
    let y = meta.alloc(1024, "y").unwrap();
    let args = [
        KernelArg::Ptr(y.view().addr() as u64),
        KernelArg::Ptr(x.view().addr() as u64),
        KernelArg::U32(256),
    ];
    let k = kernel("add_one_f32", 1, 256, 0, &args);
    meta.compute()
        .launch_ptx(
            "add one",
            Work::kernel(256.0, 2048),
            &k,
            &[x.view()],
            &[y.view()],
        )
        .unwrap();
    meta.synchronize().unwrap();
    let ev = meta.trace().events();
    let e = ev.iter().find(|e| e.name == "add one").unwrap();
    assert_eq!(e.kind, OpKind::Kernel);
    assert!(e.end_ns > e.start_ns, "the cost model gave no time");

    let cpu = Device::cpu(CpuConfig {
        device_memory: 1 << 20,
        host_memory: 1 << 20,
        ..CpuConfig::default()
    })
    .unwrap();
    let x = cpu.alloc(1024, "x").unwrap();
    let e = cpu
        .compute()
        .launch_ptx("add one", Work::kernel(0.0, 0), &k, &[x.view()], &[])
        .unwrap_err();
    assert!(matches!(e, RuntimeError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("add_one_f32"), "{e}");
}

#[test]
fn gpu_memory_round_trips_through_every_stream() {
    let Some(dev) = gpu("gpu_memory_round_trips_through_every_stream") else {
        return;
    };
    let data: Vec<f32> = (0..100_003).map(|i| i as f32 * 0.5).collect();
    let d = dev.upload(&data, "d").unwrap();
    assert_eq!(dev.download::<f32>(d.view()).unwrap(), data);

    // Host arena -> device on h2d, device -> device on compute after an
    // event, device -> host on d2h after another.
    let bytes = data.len() * 4;
    let mut h = dev.alloc_host(bytes, "h").unwrap();
    h.copy_from(&data).unwrap();
    let a = dev.alloc(bytes, "a").unwrap();
    let b = dev.alloc(bytes, "b").unwrap();
    let back = dev.alloc_host(bytes, "back").unwrap();
    dev.h2d().copy(h.view(), a.view()).unwrap();
    let e1 = dev.h2d().record().unwrap();
    dev.compute().wait(&e1).unwrap();
    dev.compute().copy(a.view(), b.view()).unwrap();
    let e2 = dev.compute().record().unwrap();
    dev.d2h().wait(&e2).unwrap();
    dev.d2h().copy(b.view(), back.view()).unwrap();
    dev.d2h().synchronize().unwrap();
    assert_eq!(back.to_vec::<f32>(data.len()).unwrap(), data);
    assert!(e1.is_complete() && e2.is_complete());
    assert!(e2.time_ns().unwrap() >= e1.time_ns().unwrap());
    // Every copy is in the trace with its GPU times.
    dev.synchronize().unwrap();
    let copies = dev
        .trace()
        .events()
        .iter()
        .filter(|e| matches!(e.kind, OpKind::CopyH2D | OpKind::CopyD2H | OpKind::CopyD2D))
        .count();
    assert!(copies >= 5, "{copies} copies traced");
    for s in [dev.compute(), dev.h2d(), dev.d2h()] {
        assert_eq!(
            s.in_flight(),
            0,
            "stream {} kept work after a sync",
            s.name()
        );
    }
}

#[test]
fn ptx_kernels_run_and_bad_launches_are_refused() {
    let Some(dev) = gpu("ptx_kernels_run_and_bad_launches_are_refused") else {
        return;
    };
    let n = 1000u32;
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let xd = dev.upload(&x, "x").unwrap();
    let yd = dev.alloc(n as usize * 4, "y").unwrap();
    let args = [
        KernelArg::Ptr(yd.view().addr() as u64),
        KernelArg::Ptr(xd.view().addr() as u64),
        KernelArg::U32(n),
    ];
    let k = kernel("add_one_f32", n.div_ceil(128), 128, 0, &args);
    let s = dev.compute();
    s.launch_ptx(
        "add one",
        Work::kernel(n as f64, 8000),
        &k,
        &[xd.view()],
        &[yd.view()],
    )
    .unwrap();
    let y = dev.download::<f32>(yd.view()).unwrap();
    assert!(y.iter().zip(&x).all(|(y, x)| *y == x + 1.0));

    // A pointer outside the declared views, a wrong argument, too many
    // threads: refused before launch, and the stream stays usable.
    let e = s
        .launch_ptx("add one", Work::kernel(0.0, 0), &k, &[xd.view()], &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("pointer argument 0"), "{e}");
    let wrong = [args[0], args[1], KernelArg::F32(1.0)];
    let e = s
        .launch_ptx(
            "add one",
            Work::kernel(0.0, 0),
            &PtxKernel {
                args: &wrong,
                ..k.clone()
            },
            &[xd.view()],
            &[yd.view()],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("argument 2 (`p_n`"), "{e}");
    let e = s
        .launch_ptx(
            "add one",
            Work::kernel(0.0, 0),
            &PtxKernel {
                block: [4096, 1, 1],
                ..k.clone()
            },
            &[xd.view()],
            &[yd.view()],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("4096 threads"), "{e}");
    s.launch_ptx(
        "add one",
        Work::kernel(0.0, 0),
        &k,
        &[xd.view()],
        &[yd.view()],
    )
    .unwrap();
    s.synchronize().unwrap();

    // More than 48 KiB of dynamic shared memory: the attribute is raised.
    let m = 24 * 1024u32; // 96 KiB of floats
    let v: Vec<f32> = (0..m).map(|i| (i * 3) as f32).collect();
    let vd = dev.upload(&v, "v").unwrap();
    let rd = dev.alloc(m as usize * 4, "r").unwrap();
    let rargs = [
        KernelArg::Ptr(rd.view().addr() as u64),
        KernelArg::Ptr(vd.view().addr() as u64),
        KernelArg::U32(m),
    ];
    s.launch_ptx(
        "reverse",
        Work::kernel(0.0, 0),
        &kernel("reverse_shared", 1, 256, m * 4, &rargs),
        &[vd.view()],
        &[rd.view()],
    )
    .unwrap();
    let r = dev.download::<f32>(rd.view()).unwrap();
    assert!(r.iter().rev().zip(&v).all(|(a, b)| a == b));
}

#[test]
fn out_of_device_memory_is_an_error_and_the_device_stays_usable() {
    let Some(dev) = gpu("out_of_device_memory_is_an_error_and_the_device_stays_usable") else {
        return;
    };
    let e = dev.alloc(dev.device_budget() + 1, "too big").unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("too big"), "{msg}");
    let x = dev.upload(&[1.0f32, 2.0], "x").unwrap();
    assert_eq!(dev.download::<f32>(x.view()).unwrap(), [1.0, 2.0]);
}

#[test]
fn copies_overlap_a_kernel_in_the_trace() {
    // No wait after the launch: the copy is enqueued while the kernel runs.
    let Some(dev) = gpu_with("copies_overlap_a_kernel_in_the_trace", false) else {
        return;
    };
    if dev.gpu_info().is_some_and(|g| g.name == FAKE_GPU) {
        eprintln!(
            "copies_overlap_a_kernel_in_the_trace: skipped, the fake driver \
             (runtime/tests/fake_cuda) runs copies and kernels one after the other"
        );
        return;
    }
    let flag = dev.alloc(4, "flag").unwrap();
    let bytes = 64 << 20;
    let h = dev.alloc_host(bytes, "h").unwrap();
    let d = dev.alloc(bytes, "d").unwrap();
    let args = [
        KernelArg::Ptr(flag.view().addr() as u64),
        KernelArg::U64(200_000_000),
    ];
    dev.compute()
        .launch_ptx(
            "spin",
            Work::kernel(0.0, 0),
            &kernel("spin", 1, 1, 0, &args),
            &[],
            &[flag.view()],
        )
        .unwrap();
    dev.h2d().copy(h.view(), d.view()).unwrap();
    dev.synchronize().unwrap();
    let ev = dev.trace().events();
    let k = ev.iter().find(|e| e.name == "spin").unwrap();
    let c = ev.iter().find(|e| e.kind == OpKind::CopyH2D).unwrap();
    eprintln!(
        "spin {}..{} ns, copy {}..{} ns",
        k.start_ns, k.end_ns, c.start_ns, c.end_ns
    );
    assert!(
        c.start_ns < k.end_ns && k.start_ns < c.end_ns,
        "the h2d copy did not run beside the kernel"
    );
}

#[test]
fn host_kernels_run_on_cuda_in_stream_order_through_staging() {
    let Some(dev) = gpu("host_kernels_run_on_cuda_in_stream_order_through_staging") else {
        return;
    };
    let s = dev.compute();
    let a = dev.upload(&[1.0f32, 2.0, 3.0, 4.0], "a").unwrap();
    let acc = dev.upload(&[10.0f32; 4], "acc").unwrap();
    let host_before = dev.ledger().usage(fpdt_runtime::Space::Host).in_use;
    // acc += 2 a, twice: the kernel reads what it accumulates into, and the
    // second call sees the first's result (stream order through staging).
    for _ in 0..2 {
        s.launch_host(
            "axpy",
            Work::kernel(8.0, 48),
            &[a.view()],
            &[acc.view()],
            Box::new(|ins, outs| {
                let x: &[f32] = bytemuck::cast_slice(ins[0]);
                let y: &mut [f32] = bytemuck::cast_slice_mut(&mut *outs[0]);
                y.iter_mut().zip(x).for_each(|(y, x)| *y += 2.0 * x);
                Ok(())
            }),
        )
        .unwrap();
    }
    // A device copy queued after it reads the result.
    let out = dev.alloc(16, "out").unwrap();
    s.copy(acc.view(), out.view()).unwrap();
    s.synchronize().unwrap();
    let got: Vec<f32> = dev.download(out.view()).unwrap();
    assert_eq!(got, vec![14.0, 18.0, 22.0, 26.0]);
    // The staging buffers went back to the arena.
    dev.synchronize().unwrap();
    assert_eq!(
        dev.ledger().usage(fpdt_runtime::Space::Host).in_use,
        host_before,
        "staging buffers leaked"
    );
    // The trace shows the copies around the host kernel.
    let ev = dev.trace().events();
    assert_eq!(ev.iter().filter(|e| e.name == "axpy").count(), 2);
    assert!(ev.iter().any(|e| e.kind == OpKind::CopyD2H));
}

#[test]
fn a_failing_host_kernel_on_cuda_fails_the_stream_from_then_on() {
    let Some(dev) = gpu("a_failing_host_kernel_on_cuda_fails_the_stream_from_then_on") else {
        return;
    };
    let s = dev.new_stream("failing").unwrap();
    let x = dev.alloc(16, "x").unwrap();
    let before = s.record().unwrap();
    s.launch_host(
        "bad",
        Work::kernel(0.0, 0),
        &[],
        &[x.view()],
        Box::new(|_, _| Err("bad input at row 3".into())),
    )
    .unwrap();
    let e = s.synchronize().unwrap_err().to_string();
    assert!(e.contains("bad") && e.contains("row 3"), "{e}");
    // An event recorded before the kernel completed cleanly.
    before.wait_timeout(Duration::from_secs(5)).unwrap();
    // A panic is a failure too, not an abort across the driver's thread.
    let t = dev.new_stream("panicking").unwrap();
    t.launch_host(
        "panics",
        Work::kernel(0.0, 0),
        &[x.view()],
        &[],
        Box::new(|_, _| panic!("boom")),
    )
    .unwrap();
    let e = t.synchronize().unwrap_err().to_string();
    assert!(e.contains("panicked"), "{e}");
    // Other streams are unaffected.
    dev.compute().synchronize().unwrap();
}

#[test]
fn raw_cuda_work_is_refused_off_cuda() {
    let cpu = Device::cpu(CpuConfig {
        device_memory: 1 << 20,
        host_memory: 1 << 20,
        ..CpuConfig::default()
    })
    .unwrap();
    let x = cpu.alloc(64, "x").unwrap();
    let mut called = false;
    let e = cpu
        .compute()
        .enqueue_cuda("gemm", Work::kernel(0.0, 0), &[x.view()], &[], |_| {
            called = true;
            Ok(())
        })
        .unwrap_err();
    assert!(!called, "the library call ran on a cpu device");
    assert!(e.to_string().contains("`gemm` on a raw CUDA stream"), "{e}");
    assert!(cpu.compute().cuda_stream_raw().is_none());
    assert_eq!(cpu.compute().in_flight(), 0);
}

#[test]
fn cublaslt_gemm_matches_the_host_product() {
    let Some(dev) = gpu("cublaslt_gemm_matches_the_host_product") else {
        return;
    };
    let blas = match fpdt_runtime::cuda::Blas::new(&dev) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cublaslt_gemm_matches_the_host_product: skipped, no cuBLASLt: {e}");
            return;
        }
    };
    use fpdt_runtime::cublaslt::OutDType;
    use half::bf16;
    let (m, n, k) = (67usize, 40usize, 96usize);
    let a: Vec<bf16> = (0..m * k)
        .map(|i| bf16::from_f32(((i * 7) % 11) as f32 / 11.0 - 0.5))
        .collect();
    let b: Vec<bf16> = (0..k * n)
        .map(|i| bf16::from_f32(((i * 5) % 13) as f32 / 13.0 - 0.5))
        .collect();
    let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25).collect();
    let (ad, bd, biasd) = (
        dev.upload(&a, "a").unwrap(),
        dev.upload(&b, "b").unwrap(),
        dev.upload(&bias, "bias").unwrap(),
    );
    let dd = dev.alloc(m * n * 4, "d").unwrap();
    blas.gemm(
        dev.compute(),
        &fpdt_runtime::cuda::Gemm {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            a: ad.view(),
            b: bd.view(),
            d: dd.view(),
            out: OutDType::F32,
            bias: Some(biasd.view()),
            accumulate: false,
        },
    )
    .unwrap();
    let d = dev.download::<f32>(dd.view()).unwrap();
    for i in 0..m {
        for j in 0..n {
            let want: f64 = (0..k)
                .map(|l| f64::from(a[i * k + l].to_f32()) * f64::from(b[l * n + j].to_f32()))
                .sum::<f64>()
                + f64::from(bias[j]);
            let got = f64::from(d[i * n + j]);
            assert!(
                (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                "({i}, {j}): {got} vs {want}"
            );
        }
    }
    assert!(dev
        .trace()
        .events()
        .iter()
        .any(|e| e.name.starts_with("gemm 67x40x96")));
}

#[test]
fn more_device_memory_than_is_free_is_refused_by_name() {
    if let Err(e) = fpdt_runtime::cuda::probe() {
        eprintln!("more_device_memory_than_is_free_is_refused_by_name: skipped, no GPU: {e}");
        return;
    }
    let e = Device::cuda_with(CudaConfig {
        device_memory: Some(1 << 50),
        host_memory: 1 << 20,
        ..CudaConfig::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("device_memory") && e.contains("is free"), "{e}");
}

#[test]
fn a_kernel_missing_from_its_module_is_named_and_nothing_runs() {
    let Some(dev) = gpu("a_kernel_missing_from_its_module_is_named_and_nothing_runs") else {
        return;
    };
    let y = dev.alloc(16, "y").unwrap();
    let e = dev
        .compute()
        .launch_ptx(
            "nope",
            Work::kernel(0.0, 0),
            &kernel("add_two_f32", 1, 1, 0, &[]),
            &[],
            &[y.view()],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("add_two_f32"), "{e}");
    assert_eq!(dev.compute().in_flight(), 0);
    // The stream is still usable.
    dev.synchronize().unwrap();
}
