//! Tests of the NCCL binding. Machines without NCCL (CI) test loading
//! errors, and the binding's plumbing (symbols, result checks, grouped
//! send/recv, async errors, init timeouts) against a fake single-process
//! `libnccl` compiled from C by the test where a C compiler exists.

use std::sync::{Arc, OnceLock};

use super::*;

const FAKE_C: &str = r#"
#include <string.h>
#include <stddef.h>
#include <unistd.h>
typedef struct { char internal[128]; } ncclUniqueId;
typedef struct { int nranks, rank, async; } fakeComm;
typedef fakeComm* ncclComm_t;
static fakeComm comms[256];
static int ncomms = 0;
static __thread int in_group = 0;
static __thread const void* ps = 0; static __thread size_t psn = 0;
static __thread void* pr = 0; static __thread size_t prn = 0;
int ncclGetVersion(int* v) { *v = 22105; return 0; }
int ncclGetUniqueId(ncclUniqueId* id) { memset(id->internal, 0, 128); memcpy(id->internal, "FAKE", 4); return 0; }
int ncclCommInitRank(ncclComm_t* c, int nranks, ncclUniqueId id, int rank) {
  if (nranks < 1 || rank < 0 || rank >= nranks) return 4;
  if (nranks > 1) { sleep(1); return 6; }
  if (ncomms >= 256) return 3;
  fakeComm* f = &comms[__sync_fetch_and_add(&ncomms, 1)];
  f->nranks = nranks; f->rank = rank;
  f->async = ((unsigned char)id.internal[0] == 0xEE) ? 6 : 0;
  *c = f; return 0;
}
int ncclCommDestroy(ncclComm_t c) { return c ? 0 : 4; }
int ncclCommAbort(ncclComm_t c) { return c ? 0 : 4; }
int ncclCommGetAsyncError(ncclComm_t c, int* e) { *e = c->async; return 0; }
const char* ncclGetErrorString(int r) {
  switch (r) { case 0: return "no error"; case 4: return "invalid argument (fake)";
  case 5: return "invalid usage (fake)"; case 6: return "remote process exited (fake)";
  default: return "fake error"; }
}
const char* ncclGetLastError(ncclComm_t c) { (void)c; return "fake detail"; }
int ncclGroupStart(void) { in_group++; return 0; }
int ncclGroupEnd(void) {
  if (in_group <= 0) return 5;
  if (--in_group) return 0;
  int r = 0;
  if (psn != prn) r = 5; else if (psn) memmove(pr, ps, psn);
  psn = prn = 0; return r;
}
int ncclSend(const void* b, size_t n, int dt, int peer, ncclComm_t c, void* s) {
  (void)s; if (dt != 0) return 4; if (!in_group || peer != c->rank) return 5; ps = b; psn = n; return 0;
}
int ncclRecv(void* b, size_t n, int dt, int peer, ncclComm_t c, void* s) {
  (void)s; if (dt != 0) return 4; if (!in_group || peer != c->rank) return 5; pr = b; prn = n; return 0;
}
static size_t esize(int dt) {
  switch (dt) { case 0: return 1; case 6: case 9: return 2; case 7: return 4; case 8: return 8; default: return 0; }
}
int ncclAllReduce(const void* s, void* r, size_t n, int dt, int op, ncclComm_t c, void* st) {
  (void)c; (void)st; size_t e = esize(dt); if (!e || op < 0 || op > 4) return 4; if (s != r) memmove(r, s, n * e); return 0;
}
int ncclReduceScatter(const void* s, void* r, size_t n, int dt, int op, ncclComm_t c, void* st) {
  return ncclAllReduce(s, r, n, dt, op, c, st);
}
int ncclAllGather(const void* s, void* r, size_t n, int dt, ncclComm_t c, void* st) {
  (void)c; (void)st; size_t e = esize(dt); if (!e) return 4; if (s != r) memmove(r, s, n * e); return 0;
}
int ncclBroadcast(const void* s, void* r, size_t n, int dt, int root, ncclComm_t c, void* st) {
  (void)c; (void)st; size_t e = esize(dt); if (!e || root != 0) return 4; if (s != r) memmove(r, s, n * e); return 0;
}
"#;

/// The fake library, compiled once; None (with the reason printed) where
/// there is no C compiler.
fn fake() -> Option<Arc<Nccl>> {
    static LIB: OnceLock<Option<String>> = OnceLock::new();
    let path = LIB.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fpdt-comm-fake-nccl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let src = dir.join("fake_nccl.c");
        let lib = dir.join("libfakenccl.so");
        std::fs::write(&src, FAKE_C).ok()?;
        let out = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&lib)
            .arg(&src)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(lib.to_string_lossy().into_owned()),
            Ok(o) => {
                eprintln!(
                    "skipping fake-NCCL tests: cc failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                None
            }
            Err(e) => {
                eprintln!("skipping fake-NCCL tests: no C compiler ({e})");
                None
            }
        }
    });
    path.as_ref()
        .map(|p| Nccl::load_from(p).expect("the fake NCCL loads"))
}

fn fake_comm(nccl: &Arc<Nccl>, id: UniqueId) -> NcclComm {
    NcclComm::init_rank(nccl.clone(), &id, 0, 1, InitOptions::default()).expect("init")
}

#[test]
fn a_missing_library_is_a_clear_error() {
    let e = Nccl::load_from("/nonexistent/libnccl.so.2").unwrap_err();
    assert!(matches!(e, CommError::NcclUnavailable(_)), "{e}");
    assert!(e.to_string().contains("/nonexistent/libnccl.so.2"), "{e}");
    match Nccl::load() {
        Ok(n) => eprintln!("NCCL is present here: {n:?}"),
        Err(e) => {
            let s = e.to_string();
            assert!(s.contains("libnccl.so.2") || s.contains(LIB_ENV), "{s}");
        }
    }
}

#[test]
fn load_searches_site_packages_and_reports_what_it_tried() {
    let root = std::env::temp_dir().join(format!("fpdt-comm-nccl-tree-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let venv = root.join("venv");
    let env =
        fpdt_runtime::libs::SearchEnv::isolated(&root).var("VIRTUAL_ENV", venv.to_string_lossy());
    let e = Nccl::load_with(&env).unwrap_err();
    assert!(matches!(e, CommError::NcclUnavailable(_)), "{e}");
    let s = e.to_string();
    assert!(s.contains(LIB_ENV) && s.contains("libnccl.so.2"), "{s}");
    assert!(
        s.contains(
            &venv
                .join("lib/python3*/site-packages")
                .display()
                .to_string()
        ),
        "{s}"
    );
    if fake().is_some() {
        let lib_dir = venv.join("lib/python3.11/site-packages/nvidia/nccl/lib");
        std::fs::create_dir_all(&lib_dir).unwrap();
        let src = std::env::temp_dir()
            .join(format!("fpdt-comm-fake-nccl-{}", std::process::id()))
            .join("libfakenccl.so");
        std::fs::copy(src, lib_dir.join("libnccl.so.2")).unwrap();
        let n = Nccl::load_with(&env).expect("the wheel's copy loads");
        assert_eq!(n.path(), lib_dir.join("libnccl.so.2").display().to_string());
        assert_eq!(n.version_string(), "2.21.5");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_library_without_the_symbols_is_refused() {
    let e = Nccl::load_from("libc.so.6").unwrap_err();
    assert!(e.to_string().contains("lacks `ncclGetVersion`"), "{e}");
}

#[test]
fn version_codes_format_as_releases() {
    assert_eq!(version_string(22105), "2.21.5");
    assert_eq!(version_string(2804), "2.8.4");
    assert_eq!(ffi::result_name(6), "ncclRemoteError");
}

#[test]
fn the_fake_library_loads_with_version_and_unique_id() {
    let Some(n) = fake() else { return };
    assert_eq!(n.version_string(), "2.21.5");
    let id = n.unique_id().unwrap();
    assert_eq!(&id.0[..4], b"FAKE");
    assert_eq!(n.error_string(4), "invalid argument (fake)");
    assert!(UniqueId::from_bytes(&[0; 12]).is_err());
}

#[test]
fn raw_collectives_pass_pointers_and_counts() {
    let Some(n) = fake() else { return };
    let comm = fake_comm(&n, n.unique_id().unwrap());
    let send = [1.0f32, 2.0, 3.0, 4.0];
    let mut recv = [0.0f32; 4];
    // SAFETY: host memory stands in for device memory in the fake, which
    // copies count elements synchronously; both arrays outlive the call.
    unsafe {
        comm.raw_all_reduce(
            send.as_ptr().cast(),
            recv.as_mut_ptr().cast(),
            3,
            DType::F32,
            ReduceOp::Sum,
            RawStream(std::ptr::null_mut()),
        )
    }
    .unwrap();
    assert_eq!(recv, [1.0, 2.0, 3.0, 0.0], "exactly 3 elements moved");
    let src = [9u8, 8, 7, 6, 5];
    let mut dst = [0u8; 5];
    // SAFETY: as above; the splits sum to the arrays' lengths.
    unsafe {
        comm.raw_all_to_all_v(
            src.as_ptr().cast(),
            &[5],
            dst.as_mut_ptr().cast(),
            &[5],
            RawStream(std::ptr::null_mut()),
        )
    }
    .unwrap();
    assert_eq!(dst, src, "grouped send/recv to self");
    comm.async_error().unwrap();
}

#[test]
fn nccl_errors_carry_the_code_name_and_the_library_text() {
    let Some(n) = fake() else { return };
    let comm = fake_comm(&n, n.unique_id().unwrap());
    let src = [0u8; 4];
    let mut dst = [0u8; 4];
    // SAFETY: as in the test above; the fake refuses the unequal sizes
    // before touching memory.
    let e = unsafe {
        comm.raw_all_to_all_v(
            src.as_ptr().cast(),
            &[4],
            dst.as_mut_ptr().cast(),
            &[2],
            RawStream(std::ptr::null_mut()),
        )
    }
    .unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("ncclGroupEnd failed with ncclInvalidUsage (5): invalid usage (fake)"),
        "{s}"
    );
    // SAFETY: as above; root 3 is refused before NCCL is called.
    let e = unsafe {
        comm.raw_broadcast(
            src.as_ptr().cast(),
            dst.as_mut_ptr().cast(),
            4,
            3,
            RawStream(std::ptr::null_mut()),
        )
    }
    .unwrap_err();
    assert!(
        matches!(
            e,
            CommError::RankOutOfRange {
                rank: 3,
                world: 1,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn an_async_error_aborts_the_communicator_and_fails_later_calls() {
    let Some(n) = fake() else { return };
    // The fake reports ncclRemoteError for communicators of this id.
    let comm = fake_comm(&n, UniqueId([0xEE; 128]));
    let e = comm
        .wait_until(Duration::from_secs(5), || Ok(false))
        .unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("ncclRemoteError") && s.contains("remote process exited (fake): fake detail"),
        "{s}"
    );
    let e = comm.async_error().unwrap_err();
    assert!(matches!(e, CommError::Aborted { .. }), "{e}");
}

#[test]
fn waiting_past_the_timeout_aborts_instead_of_hanging() {
    let Some(n) = fake() else { return };
    let comm = fake_comm(&n, n.unique_id().unwrap());
    let t = Instant::now();
    let e = comm
        .wait_until(Duration::from_millis(50), || Ok(false))
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
    let mut calls = 0;
    let comm = fake_comm(&n, n.unique_id().unwrap());
    comm.wait_until(Duration::from_secs(5), || {
        calls += 1;
        Ok(calls == 3)
    })
    .unwrap();
    assert_eq!(calls, 3);
}

#[test]
fn an_init_whose_peers_never_join_times_out() {
    let Some(n) = fake() else { return };
    let id = n.unique_id().unwrap();
    let t = Instant::now();
    let e = NcclComm::init_rank(
        n.clone(),
        &id,
        0,
        2,
        InitOptions {
            timeout: Duration::from_millis(100),
            on_init_thread: None,
        },
    )
    .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    assert!(e.to_string().contains("rank 0 of 2"), "{e}");
    assert!(t.elapsed() < Duration::from_millis(900));
    let e = NcclComm::init_rank(n, &id, 2, 2, InitOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            CommError::RankOutOfRange {
                rank: 2,
                world: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn the_init_hook_runs_and_its_error_is_returned() {
    let Some(n) = fake() else { return };
    let id = n.unique_id().unwrap();
    let e = NcclComm::init_rank(
        n,
        &id,
        0,
        1,
        InitOptions {
            timeout: Duration::from_secs(5),
            on_init_thread: Some(Box::new(|| {
                Err(CommError::Invalid("no CUDA device 3".into()))
            })),
        },
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "no CUDA device 3");
}

#[test]
fn the_communicator_trait_needs_cuda_streams() {
    let Some(n) = fake() else { return };
    let comm = fake_comm(&n, n.unique_id().unwrap());
    let dev = fpdt_runtime::Device::cpu(fpdt_runtime::CpuConfig {
        device_memory: 1 << 20,
        host_memory: 1 << 20,
        ..fpdt_runtime::CpuConfig::default()
    })
    .unwrap();
    let b = dev.alloc(16, "x").unwrap();
    let e = comm
        .all_reduce(dev.compute(), b.view(), DType::F32, ReduceOp::Sum)
        .unwrap_err();
    assert!(e.to_string().contains("needs cuda device memory"), "{e}");
    assert_eq!(comm.backend(), "nccl");
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));
}
