//! Streams, events, copies, errors and races on the cpu and meta devices.

use std::time::Duration;

use fpdt_runtime::{CpuConfig, Device, MetaConfig, OpKind, RuntimeError, Work};

fn cpu() -> Device {
    Device::cpu(CpuConfig {
        device_memory: 64 << 20,
        host_memory: 64 << 20,
        ..CpuConfig::default()
    })
    .unwrap()
}

fn sleep_op(ms: u64) -> fpdt_runtime::HostFn {
    Box::new(move |_, _| {
        std::thread::sleep(Duration::from_millis(ms));
        Ok(())
    })
}

#[test]
fn upload_download_round_trip() {
    let dev = cpu();
    let data: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let buf = dev.upload(&data, "x").unwrap();
    assert_eq!(dev.download::<f32>(buf.view()).unwrap(), data);
    let part = dev
        .download::<f32>(buf.elems::<f32>(10..20).unwrap())
        .unwrap();
    assert_eq!(part, data[10..20]);
}

#[test]
fn operations_on_one_stream_run_in_order() {
    let dev = cpu();
    let buf = dev.upload(&[0u32; 1], "counter").unwrap();
    for i in 0..100u32 {
        dev.compute()
            .launch_host(
                "step",
                Work::kernel(0.0, 4),
                &[],
                &[buf.view()],
                Box::new(move |_, outs| {
                    let v: &mut [u32] = bytemuck::cast_slice_mut(&mut *outs[0]);
                    // Each step checks it runs after the one before.
                    if v[0] != i {
                        return Err(format!("step {i} saw {}", v[0]));
                    }
                    v[0] = i + 1;
                    Ok(())
                }),
            )
            .unwrap();
    }
    assert_eq!(dev.download::<u32>(buf.view()).unwrap(), vec![100]);
}

#[test]
fn a_stream_waits_for_an_event_of_another() {
    let dev = cpu();
    let other = dev.new_stream("other").unwrap();
    let buf = dev.upload(&[0u32; 1], "flag").unwrap();
    other
        .launch_host(
            "slow write",
            Work::kernel(0.0, 4),
            &[],
            &[buf.view()],
            Box::new(|_, outs| {
                std::thread::sleep(Duration::from_millis(50));
                bytemuck::cast_slice_mut::<u8, u32>(&mut *outs[0])[0] = 7;
                Ok(())
            }),
        )
        .unwrap();
    let ev = other.record().unwrap();
    dev.compute().wait(&ev).unwrap();
    let out = dev.alloc(4, "out").unwrap();
    dev.compute()
        .launch_host(
            "read",
            Work::kernel(0.0, 8),
            &[buf.view()],
            &[out.view()],
            Box::new(|ins, outs| {
                outs[0].copy_from_slice(ins[0]);
                Ok(())
            }),
        )
        .unwrap();
    assert_eq!(dev.download::<u32>(out.view()).unwrap(), vec![7]);
    assert!(ev.is_complete());
}

#[test]
fn a_failed_operation_stops_its_stream_and_reaches_waiters() {
    let dev = cpu();
    let other = dev.new_stream("producer").unwrap();
    other
        .launch_host(
            "broken kernel",
            Work::kernel(0.0, 0),
            &[],
            &[],
            Box::new(|_, _| Err("bad things".into())),
        )
        .unwrap();
    let ev = other.record().unwrap();
    dev.compute().wait(&ev).unwrap();
    let err = dev.compute().synchronize().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("producer"), "{msg}");
    assert!(msg.contains("broken kernel"), "{msg}");
    assert!(msg.contains("bad things"), "{msg}");
    // Later work on the failed stream is skipped, and the failure stays.
    let buf = dev.upload(&[1u8; 4], "later");
    assert!(buf.is_err(), "upload on a failed compute stream must fail");
    assert!(dev.compute().failure().is_some());
}

#[test]
fn a_closed_stream_refuses_work() {
    let dev = cpu();
    let buf = dev.alloc(16, "x").unwrap();
    dev.shutdown().unwrap();
    let err = dev.compute().record().unwrap_err();
    assert!(matches!(err, RuntimeError::StreamClosed { .. }), "{err}");
    let err = dev
        .h2d()
        .copy(buf.view(), dev.alloc(16, "y").unwrap().view())
        .unwrap_err();
    assert!(err.to_string().contains("h2d"), "{err}");
}

#[test]
fn unordered_writers_on_two_streams_are_a_race_not_corruption() {
    let dev = cpu();
    let other = dev.new_stream("other").unwrap();
    let buf = dev.alloc(1024, "shared").unwrap();
    // Both write the same bytes with no event between them: one of them must
    // find the other's borrow and fail.
    let writer = |ms: u64| -> fpdt_runtime::HostFn {
        Box::new(move |_, outs| {
            outs[0].fill(1);
            std::thread::sleep(Duration::from_millis(ms));
            Ok(())
        })
    };
    dev.compute()
        .launch_host(
            "writer a",
            Work::kernel(0.0, 0),
            &[],
            &[buf.view()],
            writer(200),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    other
        .launch_host(
            "writer b",
            Work::kernel(0.0, 0),
            &[],
            &[buf.view()],
            writer(0),
        )
        .unwrap();
    let err = other.synchronize().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("data race on `shared`"), "{msg}");
    assert!(msg.contains("writer a"), "{msg}");
    dev.compute().synchronize().unwrap();
}

#[test]
fn the_host_cannot_read_what_enqueued_work_will_write() {
    let dev = cpu();
    let mut host = dev.alloc_host(64, "h").unwrap();
    host.copy_from(&[3u8; 64]).unwrap();
    let d = dev.upload(&[9u8; 64], "d").unwrap();
    dev.compute()
        .launch_host("hold", Work::kernel(0.0, 0), &[], &[], sleep_op(100))
        .unwrap();
    dev.compute().copy(d.view(), host.view()).unwrap();
    let err = host
        .read::<u8>()
        .err()
        .expect("read must fail while a copy is pending");
    assert!(matches!(err, RuntimeError::BufferBusy { .. }), "{err}");
    dev.compute().synchronize().unwrap();
    assert_eq!(&*host.read::<u8>().unwrap(), &[9u8; 64][..]);
}

#[test]
fn bad_copies_are_errors() {
    let dev = cpu();
    let a = dev.alloc(100, "a").unwrap();
    let b = dev.alloc(50, "b").unwrap();
    let e = dev.compute().copy(a.view(), b.view()).unwrap_err();
    assert!(e.to_string().contains("100 bytes"), "{e}");
    let e = a.bytes(90..120).unwrap_err();
    assert!(matches!(e, RuntimeError::OutOfBounds { .. }), "{e}");
    let e = dev
        .compute()
        .copy(a.bytes(0..40).unwrap(), a.bytes(20..60).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("overlap"), "{e}");
    let other = cpu();
    let c = other.alloc(100, "c").unwrap();
    let e = dev.compute().copy(a.view(), c.view()).unwrap_err();
    assert!(e.to_string().contains("another device"), "{e}");
}

#[test]
fn out_of_device_memory_names_request_tag_and_budget() {
    let dev = Device::cpu(CpuConfig {
        device_memory: 1 << 20,
        host_memory: 1 << 20,
        ..CpuConfig::default()
    })
    .unwrap();
    let _a = dev.alloc(768 << 10, "kv").unwrap();
    let e = dev.alloc(512 << 10, "q chunk").unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("512 KiB"), "{msg}");
    assert!(msg.contains("`q chunk`"), "{msg}");
    assert!(msg.contains("768 KiB in use"), "{msg}");
    assert!(msg.contains("1.00 MiB budget"), "{msg}");
    assert!(msg.contains("smaller chunk"), "{msg}");
}

#[test]
fn meta_device_predicts_overlapped_time() {
    let cost = fpdt_runtime::CostModel::h100_sxm();
    let dev = Device::meta(MetaConfig {
        cost,
        ..MetaConfig::default()
    })
    .unwrap();
    let x = dev.alloc_host(1 << 30, "x").unwrap();
    let y = dev.alloc(1 << 30, "y").unwrap();
    let flops = 1e15;
    dev.compute()
        .launch_host(
            "gemm",
            Work::kernel(flops, 0),
            &[],
            &[],
            Box::new(|_, _| Err("never runs on meta".into())),
        )
        .unwrap();
    dev.h2d().copy(x.view(), y.view()).unwrap();
    dev.synchronize().unwrap();
    let kernel_s = cost.duration(&Work::kernel(flops, 0));
    let copy_s = (1u64 << 30) as f64 / cost.h2d_bandwidth + cost.launch_latency;
    let t = dev.now_ns() as f64 / 1e9;
    // Copy and kernel ran side by side: the step takes the longer of the two.
    assert!((t - kernel_s.max(copy_s)).abs() < 1e-6, "t = {t}");
    let ev = dev.trace().events();
    assert_eq!(ev.len(), 2);
    assert!(ev.iter().any(|e| e.kind == OpKind::CopyH2D));
    // No data on meta.
    assert!(matches!(
        dev.download::<u8>(y.view()),
        Err(RuntimeError::NoData { .. })
    ));
}

#[test]
fn meta_waits_serialize_dependent_work() {
    let dev = Device::meta(MetaConfig::default()).unwrap();
    let cost = *dev.cost_model();
    let x = dev.alloc_host(1 << 30, "x").unwrap();
    let y = dev.alloc(1 << 30, "y").unwrap();
    dev.h2d().copy(x.view(), y.view()).unwrap();
    let copied = dev.h2d().record().unwrap();
    dev.compute().wait(&copied).unwrap();
    dev.compute()
        .launch_host(
            "use",
            Work::kernel(1e15, 0),
            &[y.view()],
            &[],
            Box::new(|_, _| Ok(())),
        )
        .unwrap();
    dev.synchronize().unwrap();
    let copy_s = (1u64 << 30) as f64 / cost.h2d_bandwidth + cost.launch_latency;
    let kernel_s = cost.duration(&Work::kernel(1e15, 0));
    let t = dev.now_ns() as f64 / 1e9;
    assert!((t - (copy_s + kernel_s)).abs() < 1e-6, "t = {t}");
}
