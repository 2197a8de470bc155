//! The library finder over fake filesystem trees, and the cuBLASLt
//! binding's loading and argument checks (no GPU, no CUDA library needed;
//! the tests that need a C compiler or a real cuBLASLt say why they skip).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fpdt_runtime::cublaslt::{self, Bias, CublasLt, MatmulBf16, OutDType};
use fpdt_runtime::libs::{
    find_library_in, loaded_libraries, search_plan, LibError, LibrarySpec, Place, SearchEnv, Step,
};
use fpdt_runtime::RuntimeError;

const FAKE: LibrarySpec = LibrarySpec {
    name: "fake",
    env_var: "FPDT_TEST_FAKE_LIB",
    sonames: &["libfpdtfake.so.13", "libfpdtfake.so.12", "libfpdtfake.so"],
    wheel_dirs: &["nvidia/cu13/lib", "nvidia/fake/lib"],
    probe_symbol: "fpdt_fake_version",
};

/// A temporary directory standing in for a filesystem root.
struct Tree {
    root: PathBuf,
}

impl Tree {
    fn new(name: &str) -> Tree {
        let root = std::env::temp_dir().join(format!("fpdt-libs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("temp dir");
        Tree { root }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn dir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }

    /// A file that is not a library (text long enough for an ELF header).
    fn text(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, "this is not a shared library\n".repeat(20)).expect("write");
        p
    }

    /// A copy of a compiled library (None without a C compiler).
    fn lib(&self, rel: &str, with_probe: bool) -> Option<PathBuf> {
        let src = compiled(with_probe)?;
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::copy(src, &p).expect("copy");
        Some(p)
    }

    fn env(&self) -> SearchEnv {
        SearchEnv::isolated(&self.root)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A real shared library, with or without the probe symbol, compiled once.
fn compiled(with_probe: bool) -> Option<&'static Path> {
    static LIBS: OnceLock<Option<(PathBuf, PathBuf)>> = OnceLock::new();
    let libs = LIBS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fpdt-libs-cc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let mut out = Vec::new();
        for (name, body) in [
            ("good", "int fpdt_fake_version(void) { return 7; }\n"),
            ("other", "int fpdt_something_else(void) { return 1; }\n"),
        ] {
            let c = dir.join(format!("{name}.c"));
            let so = dir.join(format!("lib{name}.so"));
            std::fs::write(&c, body).ok()?;
            match std::process::Command::new("cc")
                .args(["-shared", "-fPIC", "-o"])
                .arg(&so)
                .arg(&c)
                .output()
            {
                Ok(o) if o.status.success() => out.push(so),
                Ok(o) => {
                    eprintln!(
                        "no fake libraries: cc failed: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                    return None;
                }
                Err(e) => {
                    eprintln!("no fake libraries: no C compiler ({e})");
                    return None;
                }
            }
        }
        Some((out[0].clone(), out[1].clone()))
    });
    libs.as_ref().map(|(good, other)| {
        if with_probe {
            good.as_path()
        } else {
            other.as_path()
        }
    })
}

fn files(steps: &[Step]) -> Vec<(Place, PathBuf)> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::File { place, path } => Some((*place, path.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn the_plan_goes_ld_library_path_then_site_packages_then_the_toolkit() {
    let t = Tree::new("plan");
    let ld1 = t.text("ld1/libfpdtfake.so.12");
    let ld2_13 = t.text("ld2/libfpdtfake.so.13");
    let ld2_so = t.text("ld2/libfpdtfake.so");
    let venv_cu13 = t.text("venv/lib/python3.11/site-packages/nvidia/cu13/lib/libfpdtfake.so.13");
    let venv_fake = t.text("venv/lib/python3.11/site-packages/nvidia/fake/lib/libfpdtfake.so.12");
    let local =
        t.text("home/.local/lib/python3.12/site-packages/nvidia/cu13/lib/libfpdtfake.so.13");
    let pyenv = t.text(
        "home/.pyenv/versions/3.10.4/lib/python3.10/site-packages/nvidia/fake/lib/libfpdtfake.so",
    );
    let sys39 = t.text("usr/lib/python3.9/site-packages/nvidia/fake/lib/libfpdtfake.so.12");
    let sys312 = t.text("usr/lib/python3.12/site-packages/nvidia/fake/lib/libfpdtfake.so.12");
    let lib64 = t.text("usr/local/cuda/lib64/libfpdtfake.so.12");
    let targets = t.text("usr/local/cuda/targets/x86_64-linux/lib/libfpdtfake.so");
    t.dir("conda");
    let ld = format!(
        "{}:{}:{}",
        t.path("ld1").display(),
        t.path("ld2").display(),
        t.path("missing").display()
    );
    let env = t
        .env()
        .var("LD_LIBRARY_PATH", ld)
        .var("VIRTUAL_ENV", t.path("venv").to_string_lossy())
        .var("CONDA_PREFIX", t.path("conda").to_string_lossy())
        .var("HOME", t.path("home").to_string_lossy());
    let steps = search_plan(&FAKE, &env);
    use Place::*;
    assert_eq!(
        files(&steps),
        vec![
            (LdLibraryPath, ld1),
            (LdLibraryPath, ld2_13),
            (LdLibraryPath, ld2_so),
            (SitePackages, venv_cu13),
            (SitePackages, venv_fake),
            (SitePackages, local),
            (SitePackages, pyenv),
            (SitePackages, sys312),
            (SitePackages, sys39),
            (CudaToolkit, lib64),
            (CudaToolkit, targets),
        ]
    );
    // The empty places are in the plan too, for the report.
    let nothing: Vec<String> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Nothing { location, .. } => Some(location.clone()),
            _ => None,
        })
        .collect();
    assert!(
        nothing.contains(&t.path("missing").display().to_string()),
        "{nothing:?}"
    );
    assert!(
        nothing
            .iter()
            .any(|n| n.starts_with(&t.path("conda").display().to_string())),
        "{nothing:?}"
    );

    // The loader's own search comes right after LD_LIBRARY_PATH.
    let steps = search_plan(&FAKE, &env.system_loader(true));
    let first_sonames = steps.iter().position(|s| matches!(s, Step::Soname(_)));
    let first_site = steps.iter().position(|s| {
        matches!(
            s,
            Step::File {
                place: SitePackages,
                ..
            }
        )
    });
    let last_ld = steps.iter().rposition(|s| {
        matches!(
            s,
            Step::File {
                place: LdLibraryPath,
                ..
            } | Step::Nothing {
                place: LdLibraryPath,
                ..
            }
        )
    });
    let sonames: Vec<&Step> = steps
        .iter()
        .filter(|s| matches!(s, Step::Soname(_)))
        .collect();
    assert_eq!(
        sonames,
        FAKE.sonames
            .iter()
            .map(|n| Step::Soname(n.to_string()))
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>()
    );
    let (Some(so), Some(site), Some(ld)) = (first_sonames, first_site, last_ld) else {
        panic!("missing steps: {steps:?}");
    };
    assert!(ld < so && so < site, "{steps:?}");
}

#[test]
fn the_same_file_reached_twice_is_tried_once() {
    let t = Tree::new("dedup");
    let lib = t.text("venv/lib/python3.11/site-packages/nvidia/cu13/lib/libfpdtfake.so.13");
    let dir = lib.parent().expect("dir").to_string_lossy().into_owned();
    let env = t
        .env()
        .var("LD_LIBRARY_PATH", dir)
        .var("VIRTUAL_ENV", t.path("venv").to_string_lossy());
    assert_eq!(
        files(&search_plan(&FAKE, &env)),
        vec![(Place::LdLibraryPath, lib)]
    );
}

#[test]
fn a_site_packages_directory_matched_by_two_patterns_is_searched_once() {
    // Debian's `/usr/lib/python3/dist-packages` matches both
    // `python3/dist-packages` and `python3*/dist-packages`.
    let t = Tree::new("debian");
    let dist = t.dir("usr/lib/python3/dist-packages").display().to_string();
    let steps = search_plan(&FAKE, &t.env());
    let visits = steps
        .iter()
        .filter(|s| matches!(s, Step::Nothing { location, .. } if *location == dist))
        .count();
    assert_eq!(visits, 1, "{steps:?}");
}

#[test]
fn a_file_that_is_not_a_library_is_reported_with_the_loader_message() {
    let t = Tree::new("notelf");
    let bad = t.text("ld/libfpdtfake.so.13");
    let env = t
        .env()
        .var("LD_LIBRARY_PATH", t.path("ld").to_string_lossy());
    let e = find_library_in(&FAKE, &env).unwrap_err();
    let LibError::NotFound { ref tried, var, .. } = e else {
        panic!("expected NotFound, got {e}");
    };
    assert_eq!(var, "FPDT_TEST_FAKE_LIB");
    let a = tried
        .iter()
        .find(|a| a.target == bad.display().to_string())
        .unwrap_or_else(|| panic!("{bad:?} not among {tried:?}"));
    assert_eq!(a.place, Place::LdLibraryPath);
    assert!(a.outcome.contains("invalid ELF header"), "{}", a.outcome);
    let s = e.to_string();
    assert!(
        s.contains(&bad.display().to_string()) && s.contains("invalid ELF header"),
        "{s}"
    );
    assert!(s.contains("set FPDT_TEST_FAKE_LIB"), "{s}");
}

#[test]
fn nothing_found_lists_every_place_tried_and_the_variable() {
    let t = Tree::new("empty");
    t.dir("ld");
    let env = t
        .env()
        .var("LD_LIBRARY_PATH", t.path("ld").to_string_lossy())
        .var("VIRTUAL_ENV", t.path("venv").to_string_lossy())
        .var("HOME", t.path("home").to_string_lossy());
    let e = find_library_in(&FAKE, &env).unwrap_err();
    let targets: Vec<String> = e.tried().iter().map(|a| a.target.clone()).collect();
    let root = t.root.display().to_string();
    for want in [
        format!("{root}/ld"),
        format!("{root}/venv/lib/python3*/site-packages"),
        format!("{root}/home/.local/lib/python3*/site-packages"),
        format!("{root}/home/.pyenv/versions/*/lib/python3*/site-packages"),
        format!("{root}/usr/local/lib/python3*/dist-packages"),
        format!("{root}/usr/lib/python3*/site-packages"),
        format!("{root}/usr/local/cuda/lib64"),
        format!("{root}/usr/local/cuda/targets/*/lib"),
    ] {
        assert!(targets.contains(&want), "`{want}` not among {targets:?}");
    }
    let ld = &e.tried()[0];
    assert_eq!(ld.place, Place::LdLibraryPath);
    assert!(
        ld.outcome
            .contains("libfpdtfake.so.13, libfpdtfake.so.12, libfpdtfake.so"),
        "{ld}"
    );
    let s = e.to_string();
    assert!(
        s.contains("fake not found") && s.contains("FPDT_TEST_FAKE_LIB"),
        "{s}"
    );
}

#[test]
fn the_override_is_the_only_place_tried() {
    let t = Tree::new("override");
    let bad = t.text("mine/libfpdtfake.so.13");
    // A loadable library elsewhere must not be fallen back to.
    let elsewhere = t.lib("ld/libfpdtfake.so.13", true);
    let env = t
        .env()
        .var("LD_LIBRARY_PATH", t.path("ld").to_string_lossy())
        .var(FAKE.env_var, bad.to_string_lossy());
    if elsewhere.is_some() {
        // Sanity: without the override, the library elsewhere loads.
        let plain = t
            .env()
            .var("LD_LIBRARY_PATH", t.path("ld").to_string_lossy());
        assert!(find_library_in(&FAKE, &plain).is_ok());
    }
    match find_library_in(&FAKE, &env) {
        Err(LibError::Override {
            var, path, message, ..
        }) => {
            assert_eq!(var, "FPDT_TEST_FAKE_LIB");
            assert_eq!(path, bad.display().to_string());
            assert!(message.contains("invalid ELF header"), "{message}");
        }
        other => panic!("expected an override error, got {other:?}"),
    }
    let missing = t.path("nowhere/libfpdtfake.so.13");
    let env = t.env().var(FAKE.env_var, missing.to_string_lossy());
    let e = find_library_in(&FAKE, &env).unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("FPDT_TEST_FAKE_LIB=") && s.contains(&missing.display().to_string()),
        "{s}"
    );
    assert!(s.contains("No such file"), "{s}");
}

#[test]
fn the_first_loadable_candidate_wins_and_the_broken_ones_are_kept() {
    let t = Tree::new("first");
    let bad = t.text("ld/libfpdtfake.so.13");
    let Some(venv) = t.lib(
        "venv/lib/python3.11/site-packages/nvidia/cu13/lib/libfpdtfake.so.13",
        true,
    ) else {
        return;
    };
    let later = t.lib("usr/local/cuda/lib64/libfpdtfake.so.12", true);
    assert!(later.is_some());
    let env = t
        .env()
        .var("LD_LIBRARY_PATH", t.path("ld").to_string_lossy())
        .var("VIRTUAL_ENV", t.path("venv").to_string_lossy());
    let found = find_library_in(&FAKE, &env).expect("the venv copy loads");
    assert_eq!(found.path, venv);
    assert_eq!(found.place, Place::SitePackages);
    assert_eq!(found.skipped.len(), 1, "{:?}", found.skipped);
    assert_eq!(found.skipped[0].target, bad.display().to_string());
    assert!(found.skipped[0].outcome.contains("invalid ELF header"));
    // SAFETY: the fake library's function takes nothing and returns an int.
    let v = unsafe {
        found
            .library
            .get::<unsafe extern "C" fn() -> i32>(b"fpdt_fake_version")
    }
    .map(|f| unsafe { f() })
    .expect("symbol");
    assert_eq!(v, 7);
    assert!(
        loaded_libraries().contains(&("fake".to_string(), venv.clone())),
        "{:?}",
        loaded_libraries()
    );
}

#[test]
fn a_library_without_the_probe_symbol_is_skipped() {
    let t = Tree::new("probe");
    let Some(other) = t.lib("ld1/libfpdtfake.so.13", false) else {
        return;
    };
    let good = t.lib("ld2/libfpdtfake.so.12", true).expect("compiled");
    let ld = format!("{}:{}", t.path("ld1").display(), t.path("ld2").display());
    let found = find_library_in(&FAKE, &t.env().var("LD_LIBRARY_PATH", ld)).expect("ld2 loads");
    assert_eq!(found.path, good);
    assert_eq!(found.skipped[0].target, other.display().to_string());
    assert!(
        found.skipped[0]
            .outcome
            .contains("lacks `fpdt_fake_version`"),
        "{}",
        found.skipped[0].outcome
    );
}

#[test]
fn an_override_that_loads_is_used() {
    let t = Tree::new("override-ok");
    let Some(mine) = t.lib("mine/libanything.so", true) else {
        return;
    };
    let found = find_library_in(&FAKE, &t.env().var(FAKE.env_var, mine.to_string_lossy()))
        .expect("the override loads");
    assert_eq!(found.place, Place::Override);
    assert_eq!(
        std::fs::canonicalize(&found.path).expect("exists"),
        std::fs::canonicalize(&mine).expect("exists")
    );
}

#[test]
fn the_system_loader_resolves_a_soname_to_its_file() {
    // libc is loaded in every process: the loader's search finds it by
    // soname, and the finder reports the file it came from.
    let spec = LibrarySpec {
        name: "libc",
        env_var: "FPDT_TEST_LIBC",
        sonames: &["libfpdt-does-not-exist.so.1", "libc.so.6"],
        wheel_dirs: &[],
        probe_symbol: "malloc",
    };
    let t = Tree::new("loader");
    let found = find_library_in(&spec, &t.env().system_loader(true)).expect("libc.so.6");
    assert_eq!(found.place, Place::SystemLoader);
    assert!(found.path.is_absolute(), "{:?}", found.path);
    assert!(
        found.path.to_string_lossy().contains("libc.so.6"),
        "{:?}",
        found.path
    );
    assert_eq!(found.skipped[0].target, "libfpdt-does-not-exist.so.1");
    assert!(
        found.skipped[0]
            .outcome
            .contains("cannot open shared object file"),
        "{}",
        found.skipped[0].outcome
    );
}

#[test]
fn cublaslt_without_the_library_lists_the_places_and_the_variable() {
    let t = Tree::new("no-cublas");
    let e = CublasLt::load_with(&t.env()).unwrap_err();
    assert!(matches!(e, RuntimeError::Library(_)), "{e}");
    let s = e.to_string();
    for want in [
        "cuBLASLt not found",
        "FPDT_CUBLASLT_LIB",
        "libcublasLt.so.13, libcublasLt.so.12, libcublasLt.so",
        "usr/local/cuda/lib64",
    ] {
        assert!(s.contains(want), "`{want}` missing from: {s}");
    }
    let e = CublasLt::load_with(
        &t.env()
            .var(cublaslt::LIB_ENV, "/nonexistent/libcublasLt.so.13"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("FPDT_CUBLASLT_LIB=\"/nonexistent/libcublasLt.so.13\""),
        "{e}"
    );
}

/// With a real cuBLASLt (a CUDA 12/13 wheel in a venv, the toolkit...):
/// every entry point resolves, the version is 12.x or 13.x, and without a
/// GPU `cublasLtCreate` fails with its status, never a crash.
#[test]
fn cublaslt_from_this_environment_binds_every_symbol_or_says_what_it_tried() {
    let lt = match CublasLt::load() {
        Ok(lt) => lt,
        Err(e) => {
            let s = e.to_string();
            assert!(s.contains("FPDT_CUBLASLT_LIB"), "{s}");
            eprintln!("skipping the real-cuBLASLt checks: {s}");
            return;
        }
    };
    eprintln!(
        "cuBLASLt {} from {} ({})",
        lt.version_string(),
        lt.path().display(),
        lt.place()
    );
    let major = lt.version() / 10000;
    assert!(major == 12 || major == 13, "version {}", lt.version());
    assert_eq!(lt.status_name(15), "CUBLAS_STATUS_NOT_SUPPORTED");
    assert!(loaded_libraries()
        .iter()
        .any(|(n, p)| n == "cuBLASLt" && p == lt.path()));
    match lt.handle() {
        Ok(h) => {
            // A GPU is present: a bad shape is refused before any call.
            let mut args = MatmulBf16::row_major(4, 8, 16, 0x1000, 0x2000, 0x3000, OutDType::F32);
            args.k = 0;
            // SAFETY: validation refuses the arguments before any pointer
            // reaches the library.
            let e = unsafe { lt.matmul_bf16(&h, std::ptr::null_mut(), &args) }.unwrap_err();
            assert!(e.to_string().contains("k = 0"), "{e}");
        }
        Err(RuntimeError::Cublas {
            call, status_name, ..
        }) => {
            assert_eq!(call, "cublasLtCreate");
            assert_eq!(status_name, "CUBLAS_STATUS_NOT_INITIALIZED");
        }
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

// ---- argument validation (pure) ----

fn good() -> MatmulBf16 {
    // Column-major 4 x 8 = (4 x 16)(16 x 8), dense.
    MatmulBf16 {
        m: 4,
        n: 8,
        k: 16,
        trans_a: false,
        trans_b: false,
        a: 0x10_0000,
        lda: 4,
        b: 0x20_0000,
        ldb: 16,
        d: 0x30_0000,
        ldd: 4,
        out: OutDType::Bf16,
        bias: None,
        workspace: 0,
        workspace_bytes: 0,
        alpha: 1.0,
        beta: 0.0,
    }
}

fn rejects(args: MatmulBf16, wants: &[&str]) {
    let e = args.validate().expect_err("must be refused");
    assert!(matches!(e, RuntimeError::Invalid(_)), "{e}");
    let s = e.to_string();
    for w in wants {
        assert!(s.contains(w), "`{w}` missing from: {s}");
    }
}

#[test]
fn validation_accepts_a_dense_gemm() {
    good().validate().expect("valid");
    let mut with_all = good();
    with_all.bias = Some(Bias {
        ptr: 0x40_0000,
        len: 4,
    });
    with_all.workspace = 0x50_0000;
    with_all.workspace_bytes = 1 << 20;
    with_all.validate().expect("valid");
}

#[test]
fn validation_refuses_zero_dimensions() {
    for (i, name) in ["m = 0", "n = 0", "k = 0"].iter().enumerate() {
        let mut a = good();
        match i {
            0 => a.m = 0,
            1 => a.n = 0,
            _ => a.k = 0,
        }
        rejects(a, &[name, "at least 1"]);
    }
}

#[test]
fn validation_checks_leading_dimensions_against_the_stored_rows() {
    let mut a = good();
    a.lda = 3;
    rejects(a, &["lda = 3", "4 rows of A (trans_a = N)"]);
    // Transposed A is stored k x m: lda must reach k = 16, m is not enough.
    let mut a = good();
    a.trans_a = true;
    a.lda = 4;
    rejects(a, &["lda = 4", "16 rows of A (trans_a = T)"]);
    a.lda = 16;
    a.validate().expect("lda = k for a transposed A");
    let mut b = good();
    b.ldb = 15;
    rejects(b, &["ldb = 15", "16 rows of B (trans_b = N)"]);
    let mut b = good();
    b.trans_b = true;
    b.ldb = 16;
    b.validate().expect("ldb = 16 >= n = 8 for a transposed B");
    b.ldb = 7;
    rejects(b, &["ldb = 7", "8 rows of B (trans_b = T)"]);
    let mut d = good();
    d.ldd = 2;
    rejects(d, &["ldd = 2", "4 rows of D"]);
}

#[test]
fn validation_checks_pointers() {
    let mut a = good();
    a.a = 0x10_0008;
    rejects(a, &["a = 0x100008", "not aligned to 16 bytes", "off by 8"]);
    let mut b = good();
    b.b = 0;
    rejects(b, &["b is a null device pointer"]);
    let mut d = good();
    d.d = 0x30_0002;
    rejects(d, &["d = 0x300002"]);
    let mut w = good();
    w.workspace_bytes = 4096;
    rejects(w, &["workspace is a null device pointer"]);
    let mut bias = good();
    bias.bias = Some(Bias {
        ptr: 0x40_0004,
        len: 4,
    });
    rejects(bias, &["bias.ptr = 0x400004"]);
}

#[test]
fn validation_checks_the_bias_length_against_the_rows_of_d() {
    let mut a = good();
    a.bias = Some(Bias {
        ptr: 0x40_0000,
        len: 8,
    });
    rejects(a, &["bias.len = 8", "m = 4 rows"]);
}

/// The column-major GEMM the arguments describe, on host arrays standing in
/// for device memory (keyed by the "pointer"), for checking the documented
/// convention.
fn reference(args: &MatmulBf16, mem: &HashMap<u64, Vec<f64>>) -> Vec<f64> {
    let (a, b) = (&mem[&args.a], &mem[&args.b]);
    let op_a = |i: usize, p: usize| {
        if args.trans_a {
            a[p + i * args.lda]
        } else {
            a[i + p * args.lda]
        }
    };
    let op_b = |p: usize, j: usize| {
        if args.trans_b {
            b[j + p * args.ldb]
        } else {
            b[p + j * args.ldb]
        }
    };
    let mut d = vec![0.0; args.ldd * args.n];
    for j in 0..args.n {
        for i in 0..args.m {
            d[i + j * args.ldd] = (0..args.k).map(|p| op_a(i, p) * op_b(p, j)).sum();
        }
    }
    d
}

fn row_major_product(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut d = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            d[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    d
}

#[test]
fn row_major_arguments_compute_the_row_major_product() {
    let (m, n, k) = (3, 5, 4);
    let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.7).sin()).collect();
    let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 1.3).cos()).collect();
    let args = MatmulBf16::row_major(m, n, k, 0x1000, 0x2000, 0x3000, OutDType::F32);
    args.validate().expect("valid");
    let mem = HashMap::from([(0x1000, a.clone()), (0x2000, b.clone())]);
    let got = reference(&args, &mem);
    let want = row_major_product(&a, &b, m, n, k);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
    }

    // A linear layer Y[m,n] = X[m,k] W^T with W row-major [n, k]: the
    // module documentation's recipe (trans_a, lda = k).
    let w: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.3).sin()).collect();
    let mut lin = MatmulBf16::row_major(m, n, k, 0x1000, 0x4000, 0x3000, OutDType::F32);
    lin.trans_a = true;
    lin.lda = k;
    lin.validate().expect("valid");
    let mem = HashMap::from([(0x1000, a.clone()), (0x4000, w.clone())]);
    let got = reference(&lin, &mem);
    let mut wt = vec![0.0; k * n];
    for r in 0..n {
        for c in 0..k {
            wt[c * n + r] = w[r * k + c];
        }
    }
    let want = row_major_product(&a, &wt, m, n, k);
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
    }
}
