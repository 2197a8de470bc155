//! Finding the CUDA libraries where users actually have them.
//!
//! cuBLASLt and NCCL are often not in a system toolkit but inside Python
//! wheels (PyTorch's `site-packages/nvidia/*/lib`), for CUDA 12 or 13. A
//! [`LibrarySpec`] names a library's override variable, its sonames in
//! preference order and the wheel subdirectories that ship it;
//! [`find_library`] searches, in this order:
//!
//! 1. the override variable (`FPDT_CUBLASLT_LIB`, `FPDT_NCCL_LIB`): a file
//!    path (or a soname for the dynamic loader). When it is set, only it is
//!    tried: a file that does not load is an error naming the variable, the
//!    path and the loader's message, never a silent fallback;
//! 2. each directory of `LD_LIBRARY_PATH`, each soname in order;
//! 3. the dynamic loader's own search by soname (`dlopen` of the bare
//!    name: its cache, `RUNPATH`s, the system directories);
//! 4. python site-packages, found without running Python: `$VIRTUAL_ENV`,
//!    `$CONDA_PREFIX`, `~/.local`, pyenv's versions, then the system
//!    prefixes (`/usr/local/lib/python3*/dist-packages`,
//!    `/usr/lib/python3*/site-packages`, `/opt/conda`, ...), each with the
//!    spec's wheel subdirectories;
//! 5. the CUDA toolkit: `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`,
//!    `/usr/local/cuda/lib64`, `/usr/local/cuda/targets/*/lib`.
//!
//! A file is accepted when it loads and exports the spec's probe symbol; a
//! file that fails is recorded and the search goes on, so the error when
//! nothing loads lists every place tried and what each gave, and says which
//! variable to set. The search reads its environment from a [`SearchEnv`],
//! which tests build over a temporary directory (a fake filesystem root and
//! fake variables, the loader's own search off).
//!
//! Every library loaded through the finder is recorded process-wide:
//! [`loaded_libraries`] lists them (`fpdt info` prints it).

use std::collections::{BTreeMap, HashSet};
use std::ffi::{c_void, CStr};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What to look for: one shared library and where it hides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibrarySpec {
    /// The library's name in messages ("cuBLASLt").
    pub name: &'static str,
    /// The override variable: when set, the only file tried.
    pub env_var: &'static str,
    /// File names, most preferred first (newest CUDA major first).
    pub sonames: &'static [&'static str],
    /// Directories under a site-packages directory that wheels put the
    /// library in.
    pub wheel_dirs: &'static [&'static str],
    /// A symbol the library must export: a file without it is not this
    /// library (or is too old) and the search goes on.
    pub probe_symbol: &'static str,
}

/// cuBLASLt: CUDA 13's `nvidia-cublas` wheel ships it in `nvidia/cu13/lib`,
/// CUDA 12's `nvidia-cublas-cu12` in `nvidia/cublas/lib`.
pub const CUBLASLT: LibrarySpec = LibrarySpec {
    name: "cuBLASLt",
    env_var: "FPDT_CUBLASLT_LIB",
    sonames: &["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"],
    wheel_dirs: &["nvidia/cu13/lib", "nvidia/cublas/lib"],
    probe_symbol: "cublasLtGetVersion",
};

/// NCCL: the `nvidia-nccl-cu12` / `-cu13` wheels ship it in
/// `nvidia/nccl/lib`.
pub const NCCL: LibrarySpec = LibrarySpec {
    name: "NCCL",
    env_var: "FPDT_NCCL_LIB",
    sonames: &["libnccl.so.2", "libnccl.so"],
    wheel_dirs: &["nvidia/nccl/lib", "nvidia/cu13/lib"],
    probe_symbol: "ncclGetVersion",
};

/// Where a candidate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    /// The spec's override variable.
    Override,
    /// A directory of `LD_LIBRARY_PATH`.
    LdLibraryPath,
    /// The dynamic loader's search by soname.
    SystemLoader,
    /// A python site-packages directory (a wheel's `lib`).
    SitePackages,
    /// A CUDA toolkit directory.
    CudaToolkit,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Place::Override => "override variable",
            Place::LdLibraryPath => "LD_LIBRARY_PATH",
            Place::SystemLoader => "dynamic loader search",
            Place::SitePackages => "python site-packages",
            Place::CudaToolkit => "CUDA toolkit",
        })
    }
}

/// One step of the search, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A file that exists: load it.
    File {
        /// Where it was found.
        place: Place,
        /// The file.
        path: PathBuf,
    },
    /// A bare soname handed to the dynamic loader.
    Soname(String),
    /// A place looked at that holds none of the sonames (kept so that the
    /// error can say it was searched).
    Nothing {
        /// Which kind of place.
        place: Place,
        /// The directory or pattern.
        location: String,
        /// What was missing there.
        outcome: String,
    },
}

/// A place tried and what it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Which kind of place.
    pub place: Place,
    /// The file, soname, directory or pattern.
    pub target: String,
    /// Why it was not taken (the loader's message, a missing symbol, no
    /// file there).
    pub outcome: String,
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.target, self.place, self.outcome)
    }
}

/// A library found and loaded.
#[derive(Debug)]
pub struct Found {
    /// The loaded library; its symbols live as long as it does.
    pub library: libloading::Library,
    /// The file loaded (for a soname the loader resolved, the file it
    /// chose, where the loader can tell).
    pub path: PathBuf,
    /// Where it was found.
    pub place: Place,
    /// Candidates tried before it that did not load.
    pub skipped: Vec<Attempt>,
}

/// Why no library was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LibError {
    /// The override variable names a file that does not load.
    #[error(
        "{library}: {var}={path:?} does not load: {message} \
         (fix or unset {var}; when it is set nothing else is tried)"
    )]
    Override {
        /// The library's name.
        library: &'static str,
        /// The variable.
        var: &'static str,
        /// Its value.
        path: String,
        /// The loader's message (or the missing symbol).
        message: String,
    },
    /// Nothing loadable was found anywhere.
    #[error(
        "{library} not found (looked for {}); tried: {}; set {var} to the library's file \
         or add its directory to LD_LIBRARY_PATH",
        sonames.join(", "),
        join_attempts(tried)
    )]
    NotFound {
        /// The library's name.
        library: &'static str,
        /// The file names looked for.
        sonames: &'static [&'static str],
        /// The override variable to set.
        var: &'static str,
        /// Every place tried, in order, with what each gave.
        tried: Vec<Attempt>,
    },
}

impl LibError {
    /// The places tried (empty for an override failure, where only the
    /// override was).
    pub fn tried(&self) -> &[Attempt] {
        match self {
            LibError::NotFound { tried, .. } => tried,
            LibError::Override { .. } => &[],
        }
    }
}

fn join_attempts(tried: &[Attempt]) -> String {
    if tried.is_empty() {
        return "nothing (no place to search)".into();
    }
    tried
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The environment a search reads: variables, the filesystem root that the
/// fixed system paths are taken under, and whether the dynamic loader's own
/// search by soname is used.
#[derive(Debug, Clone)]
pub struct SearchEnv {
    vars: BTreeMap<String, String>,
    root: PathBuf,
    system_loader: bool,
}

impl SearchEnv {
    /// This process's environment, the real root, the loader's search on.
    pub fn from_process() -> SearchEnv {
        // Every variable, so that any spec's override variable is seen.
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
            .collect();
        SearchEnv {
            vars,
            root: PathBuf::from("/"),
            system_loader: true,
        }
    }

    /// No variables, the fixed system paths taken under `root`, the
    /// loader's search off: a search that sees only what a test built.
    pub fn isolated(root: impl Into<PathBuf>) -> SearchEnv {
        SearchEnv {
            vars: BTreeMap::new(),
            root: root.into(),
            system_loader: false,
        }
    }

    /// Sets a variable (an empty value counts as unset).
    pub fn var(mut self, name: &str, value: impl Into<String>) -> SearchEnv {
        self.vars.insert(name.to_string(), value.into());
        self
    }

    /// Turns the dynamic loader's search by soname on or off.
    pub fn system_loader(mut self, on: bool) -> SearchEnv {
        self.system_loader = on;
        self
    }

    /// A variable's value, `None` when unset or blank.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn rooted(&self, absolute: &str) -> PathBuf {
        self.root.join(absolute.trim_start_matches('/'))
    }
}

/// Does `name` match `pattern`, whose only wildcard is `*` (any run of
/// characters)?
fn wildcard(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Orders names with their digit runs compared as numbers, so that
/// `python3.12` sorts after `python3.9`.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, sa), (db, sb)) in ca.iter().zip(&cb) {
        let o = if *da && *db {
            let (ta, tb) = (sa.trim_start_matches('0'), sb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then(ta.cmp(tb))
        } else {
            sa.cmp(sb)
        };
        if o.is_ne() {
            return o;
        }
    }
    ca.len().cmp(&cb.len())
}

/// The directories matching `pattern` (a relative path whose components may
/// hold `*`) under `base`; within a wildcard component the newest version
/// comes first.
fn glob_dirs(base: &Path, pattern: &str) -> Vec<PathBuf> {
    let mut current = vec![base.to_path_buf()];
    for component in pattern.split('/').filter(|c| !c.is_empty()) {
        let mut next = Vec::new();
        for dir in &current {
            if component.contains('*') {
                let Ok(entries) = std::fs::read_dir(dir) else {
                    continue;
                };
                let mut names: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|n| wildcard(component, n))
                    .collect();
                names.sort_by(|a, b| natural_cmp(b, a));
                next.extend(names.into_iter().map(|n| dir.join(n)));
            } else {
                let p = dir.join(component);
                if p.is_dir() {
                    next.push(p);
                }
            }
        }
        current = next;
    }
    current
}

/// The python site-packages directories to search, in order, each once;
/// a pattern that matched nothing is an `Err` with the pattern (for the
/// report), in its place.
fn site_packages(env: &SearchEnv) -> Vec<std::result::Result<PathBuf, String>> {
    let mut patterns: Vec<(PathBuf, &str)> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(prefix) = env.get(var) {
            patterns.push((PathBuf::from(prefix), "lib/python3*/site-packages"));
        }
    }
    if let Some(home) = env.get("HOME") {
        let home = PathBuf::from(home);
        patterns.push((home.clone(), ".local/lib/python3*/site-packages"));
        patterns.push((home, ".pyenv/versions/*/lib/python3*/site-packages"));
    }
    for p in [
        "usr/local/lib/python3*/dist-packages",
        "usr/local/lib/python3*/site-packages",
        "usr/lib/python3/dist-packages",
        "usr/lib/python3*/dist-packages",
        "usr/lib/python3*/site-packages",
        "opt/conda/lib/python3*/site-packages",
    ] {
        patterns.push((env.rooted("/"), p));
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (base, pattern) in patterns {
        let found = glob_dirs(&base, pattern);
        if found.is_empty() {
            out.push(Err(base.join(pattern).display().to_string()));
        }
        for dir in found {
            // `python3/dist-packages` also matches `python3*/dist-packages`.
            let key = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
            if seen.insert(key) {
                out.push(Ok(dir));
            }
        }
    }
    out
}

/// The steps of the search after the override, in order (only the
/// filesystem is read: nothing is loaded). The override itself is not a
/// step: [`find_library_in`] tries it alone.
pub fn search_plan(spec: &LibrarySpec, env: &SearchEnv) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let names = spec.sonames.join(", ");
    let mut scan = |steps: &mut Vec<Step>, place: Place, dir: &Path| {
        let mut any = false;
        for soname in spec.sonames {
            let path = dir.join(soname);
            if path.is_file() {
                any = true;
                let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
                if seen.insert(key) {
                    steps.push(Step::File { place, path });
                }
            }
        }
        if !any {
            steps.push(Step::Nothing {
                place,
                location: dir.display().to_string(),
                outcome: format!("none of {names}"),
            });
        }
    };

    if let Some(list) = env.get("LD_LIBRARY_PATH") {
        for dir in list.split(':').filter(|d| !d.is_empty()) {
            scan(&mut steps, Place::LdLibraryPath, Path::new(dir));
        }
    }
    if env.system_loader {
        for soname in spec.sonames {
            steps.push(Step::Soname(soname.to_string()));
        }
    }
    for sp in site_packages(env) {
        let sp = match sp {
            Ok(dir) => dir,
            Err(pattern) => {
                steps.push(Step::Nothing {
                    place: Place::SitePackages,
                    location: pattern,
                    outcome: "no such directory".into(),
                });
                continue;
            }
        };
        for sub in spec.wheel_dirs {
            let dir = sp.join(sub);
            if dir.is_dir() {
                scan(&mut steps, Place::SitePackages, &dir);
            }
        }
        if !spec.wheel_dirs.iter().any(|sub| sp.join(sub).is_dir()) {
            steps.push(Step::Nothing {
                place: Place::SitePackages,
                location: sp.display().to_string(),
                outcome: format!("none of {}", spec.wheel_dirs.join(", ")),
            });
        }
    }
    let mut toolkit: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(prefix) = env.get(var) {
            toolkit.push(Path::new(prefix).join("lib64"));
        }
    }
    toolkit.push(env.rooted("/usr/local/cuda/lib64"));
    let targets = glob_dirs(&env.rooted("/usr/local/cuda/targets"), "*/lib");
    if targets.is_empty() {
        toolkit.push(env.rooted("/usr/local/cuda/targets/*/lib"));
    }
    toolkit.extend(targets);
    for dir in toolkit {
        if dir.is_dir() {
            scan(&mut steps, Place::CudaToolkit, &dir);
        } else {
            steps.push(Step::Nothing {
                place: Place::CudaToolkit,
                location: dir.display().to_string(),
                outcome: "no such directory".into(),
            });
        }
    }
    steps
}

/// The loader's message: libloading's error and its sources (dlerror's
/// text, which names the file and the reason).
pub fn loader_message(e: &libloading::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Loads `target` (a path, or a bare soname for the loader) and checks the
/// probe symbol; on success also returns the symbol's address.
fn try_load(
    spec: &LibrarySpec,
    target: &std::ffi::OsStr,
) -> Result<(libloading::Library, *const c_void), String> {
    // SAFETY: loading a shared library runs its initializers. The files
    // tried are the CUDA libraries the user installed (or named with the
    // override), trusted like any linked library; nothing else is assumed.
    let lib = unsafe { libloading::Library::new(target) }.map_err(|e| loader_message(&e))?;
    // SAFETY: the symbol is only looked up, and its address read; it is not
    // called here, so its real type does not matter.
    let addr = match unsafe { lib.get::<unsafe extern "C" fn()>(spec.probe_symbol) } {
        Ok(f) => *f as *const c_void,
        Err(e) => {
            return Err(format!(
                "loads, but lacks `{}` (not {}, or too old): {}",
                spec.probe_symbol,
                spec.name,
                loader_message(&e)
            ))
        }
    };
    Ok((lib, addr))
}

/// The file a loaded symbol lives in, as the loader reports it.
fn file_of(addr: *const c_void) -> Option<PathBuf> {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: dladdr only reads the address (a symbol of a library that is
    // loaded and stays loaded while the caller holds it) and fills `info`,
    // a live local.
    let ok = unsafe { libc::dladdr(addr, &mut info) };
    if ok == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated, owned by the loader for as long as
    // the library is loaded; copied at once.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    Some(PathBuf::from(name.to_string_lossy().into_owned()))
}

static LOADED: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());

fn record_loaded(name: &str, path: &Path) {
    let mut list = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if !list.iter().any(|(n, p)| n == name && p == path) {
        list.push((name.to_string(), path.to_path_buf()));
    }
}

/// Every library the finder has loaded in this process, as (library name,
/// file), in load order, each once.
pub fn loaded_libraries() -> Vec<(String, PathBuf)> {
    LOADED.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Finds and loads `spec`'s library from this process's environment.
pub fn find_library(spec: &LibrarySpec) -> Result<Found, LibError> {
    find_library_in(spec, &SearchEnv::from_process())
}

/// Finds and loads `spec`'s library as seen from `env` (see the module
/// documentation for the order).
pub fn find_library_in(spec: &LibrarySpec, env: &SearchEnv) -> Result<Found, LibError> {
    if let Some(value) = env.get(spec.env_var) {
        return match try_load(spec, value.as_ref()) {
            Ok((library, addr)) => {
                let path = file_of(addr).unwrap_or_else(|| PathBuf::from(value));
                record_loaded(spec.name, &path);
                Ok(Found {
                    library,
                    path,
                    place: Place::Override,
                    skipped: Vec::new(),
                })
            }
            Err(message) => Err(LibError::Override {
                library: spec.name,
                var: spec.env_var,
                path: value.to_string(),
                message,
            }),
        };
    }
    let mut tried = Vec::new();
    let mut failed = Vec::new();
    for step in search_plan(spec, env) {
        let (place, target) = match step {
            Step::File { place, path } => (place, path.into_os_string()),
            Step::Soname(name) => (Place::SystemLoader, name.into()),
            Step::Nothing {
                place,
                location,
                outcome,
            } => {
                tried.push(Attempt {
                    place,
                    target: location,
                    outcome,
                });
                continue;
            }
        };
        match try_load(spec, &target) {
            Ok((library, addr)) => {
                let path = match place {
                    Place::SystemLoader => file_of(addr).unwrap_or_else(|| PathBuf::from(&target)),
                    _ => PathBuf::from(&target),
                };
                record_loaded(spec.name, &path);
                return Ok(Found {
                    library,
                    path,
                    place,
                    skipped: failed,
                });
            }
            Err(outcome) => {
                let attempt = Attempt {
                    place,
                    target: target.to_string_lossy().into_owned(),
                    outcome,
                };
                failed.push(attempt.clone());
                tried.push(attempt);
            }
        }
    }
    Err(LibError::NotFound {
        library: spec.name,
        sonames: spec.sonames,
        var: spec.env_var,
        tried,
    })
}
