//! A thin binding of cuBLASLt, loaded at run time through [`crate::libs`].
//!
//! cudarc's cuBLASLt loader only tries the sonames of the CUDA version it
//! was built for; this one finds `libcublasLt.so.13` or `.so.12` wherever
//! the user has it (`FPDT_CUBLASLT_LIB`, `LD_LIBRARY_PATH`, the loader's
//! path, PyTorch's wheels, the toolkit) and binds the few entry points a
//! bf16 GEMM needs.
//!
//! # Layout
//!
//! cuBLASLt is column-major: element (i, j) of an r x c matrix with leading
//! dimension `ld` (>= r) is at `i + j * ld`. [`MatmulBf16`] computes
//! `D = alpha * op(A) op(B) + beta * D` with op(A) m x k, op(B) k x n and
//! D m x n, all column-major; `trans_a` means A is stored k x m (so
//! `lda >= k`), else m x k (`lda >= m`); likewise B is stored n x k when
//! `trans_b` (`ldb >= n`), else k x n (`ldb >= k`); `ldd >= m`.
//!
//! A row-major [R, C] matrix with row stride C is the column-major [C, R]
//! matrix, its transpose. So the row-major product `D[M,N] = A[M,K] B[K,N]`
//! is the column-major `D^T = B^T A^T`: pass m = N, n = M, k = K, B's
//! pointer as `a` (lda = N), A's pointer as `b` (ldb = K), and ldd = N
//! ([`MatmulBf16::row_major`] does this). A linear layer `Y = X W^T` with
//! W row-major [N, K] is the same with `trans_a` set and lda = K. A fused
//! bias has one element per row of the column-major D, that is one per
//! column of the row-major result (per output feature), as a linear layer
//! wants.
//!
//! # Checks
//!
//! [`MatmulBf16::validate`] (pure, no library needed) rejects zero
//! dimensions, leading dimensions below the rows of the stored matrix,
//! null or misaligned pointers (16 bytes) and a bias of the wrong length
//! before any call. Every cuBLASLt status is checked and returned as
//! [`RuntimeError::Cublas`], naming the function and the library's status
//! text.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Result, RuntimeError};
use crate::libs::{self, Found, Place, SearchEnv};

/// The variable naming the cuBLASLt file to load instead of searching.
pub const LIB_ENV: &str = libs::CUBLASLT.env_var;

/// ABI values from `cublasLt.h`, `cublas_api.h` and `library_types.h`
/// (the same in CUDA 12 and 13).
pub mod sys {
    use std::ffi::{c_char, c_int, c_void};

    /// `cublasStatus_t`.
    pub type Status = c_int;
    /// `cublasLtHandle_t`.
    pub type Handle = *mut c_void;
    /// `cublasLtMatmulDesc_t`.
    pub type MatmulDesc = *mut c_void;
    /// `cublasLtMatrixLayout_t`.
    pub type MatrixLayout = *mut c_void;
    /// `cublasLtMatmulPreference_t`.
    pub type MatmulPreference = *mut c_void;
    /// `cudaStream_t` / `CUstream`.
    pub type Stream = *mut c_void;

    /// `CUBLAS_STATUS_SUCCESS`.
    pub const STATUS_SUCCESS: Status = 0;

    /// `cudaDataType_t` `CUDA_R_32F`.
    pub const CUDA_R_32F: c_int = 0;
    /// `cudaDataType_t` `CUDA_R_16BF`.
    pub const CUDA_R_16BF: c_int = 14;
    /// `cublasComputeType_t` `CUBLAS_COMPUTE_32F`.
    pub const COMPUTE_32F: c_int = 68;
    /// `cublasOperation_t` `CUBLAS_OP_N`.
    pub const OP_N: i32 = 0;
    /// `cublasOperation_t` `CUBLAS_OP_T`.
    pub const OP_T: i32 = 1;

    /// `CUBLASLT_MATMUL_DESC_TRANSA` (int32_t).
    pub const DESC_TRANSA: c_int = 3;
    /// `CUBLASLT_MATMUL_DESC_TRANSB` (int32_t).
    pub const DESC_TRANSB: c_int = 4;
    /// `CUBLASLT_MATMUL_DESC_EPILOGUE` (uint32_t).
    pub const DESC_EPILOGUE: c_int = 7;
    /// `CUBLASLT_MATMUL_DESC_BIAS_POINTER` (const void*).
    pub const DESC_BIAS_POINTER: c_int = 8;
    /// `CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE` (int32_t; default -1: D's type).
    pub const DESC_BIAS_DATA_TYPE: c_int = 26;

    /// `CUBLASLT_EPILOGUE_DEFAULT`.
    pub const EPILOGUE_DEFAULT: u32 = 1;
    /// `CUBLASLT_EPILOGUE_BIAS`: adds bias[i] to row i of D.
    pub const EPILOGUE_BIAS: u32 = 4;

    /// `CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES` (uint64_t).
    pub const PREF_MAX_WORKSPACE_BYTES: c_int = 1;
    /// `CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES` (uint32_t, default 256).
    pub const PREF_MIN_ALIGNMENT_A_BYTES: c_int = 5;
    /// `CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES`.
    pub const PREF_MIN_ALIGNMENT_B_BYTES: c_int = 6;
    /// `CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES`.
    pub const PREF_MIN_ALIGNMENT_C_BYTES: c_int = 7;
    /// `CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES`.
    pub const PREF_MIN_ALIGNMENT_D_BYTES: c_int = 8;

    /// `cublasLtMatmulAlgo_t`: 8 opaque words.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct MatmulAlgo {
        /// Opaque.
        pub data: [u64; 8],
    }

    /// `cublasLtMatmulHeuristicResult_t` (96 bytes).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct HeuristicResult {
        /// The algorithm.
        pub algo: MatmulAlgo,
        /// Workspace it needs.
        pub workspace_size: usize,
        /// Its status: the other fields are valid only when success.
        pub state: Status,
        /// Device utilization estimate.
        pub waves_count: f32,
        /// Reserved.
        pub reserved: [c_int; 4],
    }

    /// `cublasLtCreate`.
    pub type Create = unsafe extern "C" fn(*mut Handle) -> Status;
    /// `cublasLtDestroy`.
    pub type Destroy = unsafe extern "C" fn(Handle) -> Status;
    /// `cublasLtGetVersion`.
    pub type GetVersion = unsafe extern "C" fn() -> usize;
    /// `cublasLtGetStatusName` / `cublasLtGetStatusString`.
    pub type StatusText = unsafe extern "C" fn(Status) -> *const c_char;
    /// `cublasLtMatmulDescCreate(desc, computeType, scaleType)`.
    pub type MatmulDescCreate = unsafe extern "C" fn(*mut MatmulDesc, c_int, c_int) -> Status;
    /// `cublasLtMatmulDescSetAttribute(desc, attr, buf, size)`.
    pub type MatmulDescSetAttribute =
        unsafe extern "C" fn(MatmulDesc, c_int, *const c_void, usize) -> Status;
    /// `cublasLtMatmulDescDestroy`.
    pub type MatmulDescDestroy = unsafe extern "C" fn(MatmulDesc) -> Status;
    /// `cublasLtMatrixLayoutCreate(layout, type, rows, cols, ld)`.
    pub type MatrixLayoutCreate =
        unsafe extern "C" fn(*mut MatrixLayout, c_int, u64, u64, i64) -> Status;
    /// `cublasLtMatrixLayoutSetAttribute(layout, attr, buf, size)`.
    pub type MatrixLayoutSetAttribute =
        unsafe extern "C" fn(MatrixLayout, c_int, *const c_void, usize) -> Status;
    /// `cublasLtMatrixLayoutDestroy`.
    pub type MatrixLayoutDestroy = unsafe extern "C" fn(MatrixLayout) -> Status;
    /// `cublasLtMatmulPreferenceCreate`.
    pub type MatmulPreferenceCreate = unsafe extern "C" fn(*mut MatmulPreference) -> Status;
    /// `cublasLtMatmulPreferenceSetAttribute(pref, attr, buf, size)`.
    pub type MatmulPreferenceSetAttribute =
        unsafe extern "C" fn(MatmulPreference, c_int, *const c_void, usize) -> Status;
    /// `cublasLtMatmulPreferenceDestroy`.
    pub type MatmulPreferenceDestroy = unsafe extern "C" fn(MatmulPreference) -> Status;
    /// `cublasLtMatmulAlgoGetHeuristic(handle, desc, A, B, C, D, pref,
    /// requested, results, returned)`.
    pub type MatmulAlgoGetHeuristic = unsafe extern "C" fn(
        Handle,
        MatmulDesc,
        MatrixLayout,
        MatrixLayout,
        MatrixLayout,
        MatrixLayout,
        MatmulPreference,
        c_int,
        *mut HeuristicResult,
        *mut c_int,
    ) -> Status;
    /// `cublasLtMatmul(handle, desc, alpha, A, Adesc, B, Bdesc, beta, C,
    /// Cdesc, D, Ddesc, algo, workspace, workspaceBytes, stream)`.
    pub type Matmul = unsafe extern "C" fn(
        Handle,
        MatmulDesc,
        *const c_void,
        *const c_void,
        MatrixLayout,
        *const c_void,
        MatrixLayout,
        *const c_void,
        *const c_void,
        MatrixLayout,
        *mut c_void,
        MatrixLayout,
        *const MatmulAlgo,
        *mut c_void,
        usize,
        Stream,
    ) -> Status;
}

/// The entry points, resolved once.
#[derive(Clone, Copy)]
struct Fns {
    create: sys::Create,
    destroy: sys::Destroy,
    get_version: sys::GetVersion,
    status_name: sys::StatusText,
    status_string: sys::StatusText,
    desc_create: sys::MatmulDescCreate,
    desc_set: sys::MatmulDescSetAttribute,
    desc_destroy: sys::MatmulDescDestroy,
    layout_create: sys::MatrixLayoutCreate,
    // Bound so that a library lacking it is refused at load time; strided
    // batches (the next user of the binding) set layout attributes.
    #[allow(dead_code)]
    layout_set: sys::MatrixLayoutSetAttribute,
    layout_destroy: sys::MatrixLayoutDestroy,
    pref_create: sys::MatmulPreferenceCreate,
    pref_set: sys::MatmulPreferenceSetAttribute,
    pref_destroy: sys::MatmulPreferenceDestroy,
    heuristic: sys::MatmulAlgoGetHeuristic,
    matmul: sys::Matmul,
}

/// The names of every entry point bound, in the order [`Fns`] holds them.
pub const SYMBOLS: &[&str] = &[
    "cublasLtCreate",
    "cublasLtDestroy",
    "cublasLtGetVersion",
    "cublasLtGetStatusName",
    "cublasLtGetStatusString",
    "cublasLtMatmulDescCreate",
    "cublasLtMatmulDescSetAttribute",
    "cublasLtMatmulDescDestroy",
    "cublasLtMatrixLayoutCreate",
    "cublasLtMatrixLayoutSetAttribute",
    "cublasLtMatrixLayoutDestroy",
    "cublasLtMatmulPreferenceCreate",
    "cublasLtMatmulPreferenceSetAttribute",
    "cublasLtMatmulPreferenceDestroy",
    "cublasLtMatmulAlgoGetHeuristic",
    "cublasLtMatmul",
];

impl Fns {
    fn resolve(lib: &libloading::Library, path: &Path) -> std::result::Result<Fns, String> {
        fn get<T: Copy>(
            lib: &libloading::Library,
            path: &Path,
            name: &str,
        ) -> std::result::Result<T, String> {
            // SAFETY: each `T` below is the C signature cublasLt.h declares
            // for `name`; the pointer is copied out and used only while the
            // library stays loaded (`CublasLt` keeps it after the pointers).
            unsafe { lib.get::<T>(name) }
                .map(|s| *s)
                .map_err(|e| format!("`{}` lacks `{name}`: {e}", path.display()))
        }
        Ok(Fns {
            create: get(lib, path, SYMBOLS[0])?,
            destroy: get(lib, path, SYMBOLS[1])?,
            get_version: get(lib, path, SYMBOLS[2])?,
            status_name: get(lib, path, SYMBOLS[3])?,
            status_string: get(lib, path, SYMBOLS[4])?,
            desc_create: get(lib, path, SYMBOLS[5])?,
            desc_set: get(lib, path, SYMBOLS[6])?,
            desc_destroy: get(lib, path, SYMBOLS[7])?,
            layout_create: get(lib, path, SYMBOLS[8])?,
            layout_set: get(lib, path, SYMBOLS[9])?,
            layout_destroy: get(lib, path, SYMBOLS[10])?,
            pref_create: get(lib, path, SYMBOLS[11])?,
            pref_set: get(lib, path, SYMBOLS[12])?,
            pref_destroy: get(lib, path, SYMBOLS[13])?,
            heuristic: get(lib, path, SYMBOLS[14])?,
            matmul: get(lib, path, SYMBOLS[15])?,
        })
    }
}

/// A loaded cuBLASLt. Cheap to share (`Arc`).
pub struct CublasLt {
    fns: Fns,
    path: PathBuf,
    place: Place,
    version: usize,
    // Last: the function pointers above must not outlive the library.
    _lib: libloading::Library,
}

impl std::fmt::Debug for CublasLt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CublasLt({} from `{}`)",
            self.version_string(),
            self.path.display()
        )
    }
}

/// `major.minor.patch` of a `cublasLtGetVersion` code
/// (`major * 10000 + minor * 100 + patch`).
pub fn version_string(code: usize) -> String {
    format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
}

impl CublasLt {
    /// Finds and loads cuBLASLt from this process's environment.
    pub fn load() -> Result<Arc<CublasLt>> {
        Self::load_with(&SearchEnv::from_process())
    }

    /// Finds and loads cuBLASLt as seen from `env`.
    pub fn load_with(env: &SearchEnv) -> Result<Arc<CublasLt>> {
        let found = libs::find_library_in(&libs::CUBLASLT, env)?;
        Self::from_found(found)
    }

    /// Binds the entry points of a library the finder loaded.
    pub fn from_found(found: Found) -> Result<Arc<CublasLt>> {
        let fns = Fns::resolve(&found.library, &found.path).map_err(|e| {
            RuntimeError::Library(format!(
                "cuBLASLt {e} (set {LIB_ENV} to a cuBLASLt of CUDA 12 or 13)"
            ))
        })?;
        // SAFETY: cublasLtGetVersion takes nothing and returns a number.
        let version = unsafe { (fns.get_version)() };
        Ok(Arc::new(CublasLt {
            fns,
            path: found.path,
            place: found.place,
            version,
            _lib: found.library,
        }))
    }

    /// The file loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the finder found it.
    pub fn place(&self) -> Place {
        self.place
    }

    /// `cublasLtGetVersion`'s code.
    pub fn version(&self) -> usize {
        self.version
    }

    /// The version as `major.minor.patch`.
    pub fn version_string(&self) -> String {
        version_string(self.version)
    }

    fn text(f: sys::StatusText, status: sys::Status) -> String {
        // SAFETY: the status-text functions take any value and return a
        // static NUL-terminated string or null (handled).
        let p = unsafe { f(status) };
        if p.is_null() {
            return String::from("(no text)");
        }
        // SAFETY: non-null, NUL-terminated and static, per cublasLt.h.
        unsafe { CStr::from_ptr(p as *const c_char) }
            .to_string_lossy()
            .into_owned()
    }

    /// `cublasLtGetStatusName` of `status` ("CUBLAS_STATUS_NOT_SUPPORTED").
    pub fn status_name(&self, status: i32) -> String {
        Self::text(self.fns.status_name, status)
    }

    /// `cublasLtGetStatusString` of `status`.
    pub fn status_string(&self, status: i32) -> String {
        Self::text(self.fns.status_string, status)
    }

    fn check(
        &self,
        call: &'static str,
        status: sys::Status,
        doing: &dyn Fn() -> String,
    ) -> Result<()> {
        if status == sys::STATUS_SUCCESS {
            return Ok(());
        }
        Err(RuntimeError::Cublas {
            call,
            status,
            status_name: self.status_name(status),
            message: format!("{} ({})", self.status_string(status), doing()),
        })
    }

    /// A new cuBLASLt handle (`cublasLtCreate`). Needs a CUDA driver and a
    /// GPU (without them: [`RuntimeError::Cublas`] with
    /// `CUBLAS_STATUS_NOT_INITIALIZED`); create it with the device's
    /// context current and use it with that context's streams.
    pub fn handle(self: &Arc<Self>) -> Result<Handle> {
        let mut raw: sys::Handle = std::ptr::null_mut();
        // SAFETY: cublasLtCreate writes the new handle through the pointer,
        // a live local.
        let status = unsafe { (self.fns.create)(&mut raw) };
        self.check("cublasLtCreate", status, &|| {
            format!("creating a handle with `{}`", self.path.display())
        })?;
        Ok(Handle {
            lt: self.clone(),
            raw,
            algos: Mutex::new(HashMap::new()),
        })
    }
}

/// The key of a cached heuristic choice: everything the heuristic sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AlgoKey {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    lda: usize,
    ldb: usize,
    ldd: usize,
    out: OutDType,
    bias: bool,
    workspace_bytes: usize,
    align: [u32; 4],
}

/// A cuBLASLt handle (RAII: `cublasLtDestroy` on drop), with the algorithm
/// chosen for each GEMM shape cached so that the heuristic runs once per
/// shape.
pub struct Handle {
    lt: Arc<CublasLt>,
    raw: sys::Handle,
    algos: Mutex<HashMap<AlgoKey, sys::MatmulAlgo>>,
}

// SAFETY: cuBLAS documents its functions as callable from several host
// threads even with the same handle, the hazard being changes to a
// handle's settings; a cuBLASLt handle has none (stream, workspace and
// descriptors are per call). The algorithm cache is behind a mutex.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cublasLt Handle({:?})", self.raw)
    }
}

impl Handle {
    /// The raw `cublasLtHandle_t`.
    pub fn raw(&self) -> *mut c_void {
        self.raw
    }

    /// How many GEMM shapes have a cached algorithm.
    pub fn cached_algorithms(&self) -> usize {
        self.algos.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the live handle created by cublasLtCreate, destroyed once.
        // A failure cannot be reported from drop; the handle is gone anyway.
        let _ = unsafe { (self.lt.fns.destroy)(self.raw) };
    }
}

/// The element type of the output D (and of a fused bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutDType {
    /// bf16 (rounded from the fp32 accumulator).
    Bf16,
    /// fp32.
    F32,
}

impl OutDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            OutDType::Bf16 => 2,
            OutDType::F32 => 4,
        }
    }

    fn cuda(self) -> c_int {
        match self {
            OutDType::Bf16 => sys::CUDA_R_16BF,
            OutDType::F32 => sys::CUDA_R_32F,
        }
    }
}

/// A bias vector fused into the GEMM's epilogue: `D[i, j] += bias[i]`
/// (column-major D), in D's element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bias {
    /// Device pointer.
    pub ptr: u64,
    /// Elements: must be m, the rows of D.
    pub len: usize,
}

/// One bf16 GEMM, column-major (see the module documentation):
/// `D = alpha * op(A) op(B) + beta * D`, fp32 accumulation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatmulBf16 {
    /// Rows of op(A) and D.
    pub m: usize,
    /// Columns of op(B) and D.
    pub n: usize,
    /// Columns of op(A), rows of op(B).
    pub k: usize,
    /// A is stored k x m (op(A) = A^T) instead of m x k.
    pub trans_a: bool,
    /// B is stored n x k (op(B) = B^T) instead of k x n.
    pub trans_b: bool,
    /// Device pointer to A (bf16).
    pub a: u64,
    /// Leading dimension of A as stored (elements).
    pub lda: usize,
    /// Device pointer to B (bf16).
    pub b: u64,
    /// Leading dimension of B as stored.
    pub ldb: usize,
    /// Device pointer to D (read as C when beta != 0).
    pub d: u64,
    /// Leading dimension of D.
    pub ldd: usize,
    /// D's element type.
    pub out: OutDType,
    /// A fused bias, if any.
    pub bias: Option<Bias>,
    /// Device workspace (0 when `workspace_bytes` is 0).
    pub workspace: u64,
    /// Workspace size; more lets cuBLASLt pick faster (split-k) kernels.
    pub workspace_bytes: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of D's previous contents (0: D is only written).
    pub beta: f32,
}

/// The alignment every pointer handed to [`CublasLt::matmul_bf16`] must
/// have (what the tensor-core kernels load with).
pub const POINTER_ALIGN: u64 = 16;

fn alignment(ptr: u64) -> u32 {
    // The largest power of two dividing ptr, capped at cuBLASLt's default
    // assumption of 256.
    if ptr == 0 {
        return 256;
    }
    (1u64 << ptr.trailing_zeros().min(8)) as u32
}

impl MatmulBf16 {
    /// The column-major arguments of the row-major product
    /// `D[m,n] = A[m,k] B[k,n]` (densely stored, row strides k, n and n):
    /// computed as `D^T = B^T A^T`. No bias, no workspace, alpha 1, beta 0.
    pub fn row_major(
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        b: u64,
        d: u64,
        out: OutDType,
    ) -> MatmulBf16 {
        MatmulBf16 {
            m: n,
            n: m,
            k,
            trans_a: false,
            trans_b: false,
            a: b,
            lda: n,
            b: a,
            ldb: k,
            d,
            ldd: n,
            out,
            bias: None,
            workspace: 0,
            workspace_bytes: 0,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// Rows and columns of A as stored.
    pub fn a_stored(&self) -> (usize, usize) {
        if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }

    /// Rows and columns of B as stored.
    pub fn b_stored(&self) -> (usize, usize) {
        if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }

    /// Checks every argument against cuBLASLt's rules and ours, without
    /// the library: the error names the argument, its value and the rule.
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(RuntimeError::Invalid(format!("matmul_bf16: {s}")));
        for (name, v) in [("m", self.m), ("n", self.n), ("k", self.k)] {
            if v == 0 {
                return bad(format!("{name} = 0: every dimension must be at least 1"));
            }
            if i64::try_from(v).is_err() {
                return bad(format!("{name} = {v} does not fit cuBLASLt's int64"));
            }
        }
        let (ar, ac) = self.a_stored();
        let (br, bc) = self.b_stored();
        let t = |x: bool| if x { "T" } else { "N" };
        for (name, ld, rows, cols, what) in [
            (
                "lda",
                self.lda,
                ar,
                ac,
                format!("A (trans_a = {})", t(self.trans_a)),
            ),
            (
                "ldb",
                self.ldb,
                br,
                bc,
                format!("B (trans_b = {})", t(self.trans_b)),
            ),
            ("ldd", self.ldd, self.m, self.n, "D".to_string()),
        ] {
            if ld < rows {
                return bad(format!(
                    "{name} = {ld} is below the {rows} rows of {what}, stored {rows} x {cols} \
                     column-major: the leading dimension must be at least the rows"
                ));
            }
            if i64::try_from(ld).is_err() {
                return bad(format!("{name} = {ld} does not fit cuBLASLt's int64"));
            }
        }
        let mut ptrs = vec![("a", self.a), ("b", self.b), ("d", self.d)];
        if let Some(bias) = self.bias {
            ptrs.push(("bias.ptr", bias.ptr));
        }
        if self.workspace_bytes > 0 {
            ptrs.push(("workspace", self.workspace));
        }
        for (name, p) in ptrs {
            if p == 0 {
                return bad(format!("{name} is a null device pointer"));
            }
            if p % POINTER_ALIGN != 0 {
                return bad(format!(
                    "{name} = {p:#x} is not aligned to {POINTER_ALIGN} bytes (it is off by {})",
                    p % POINTER_ALIGN
                ));
            }
        }
        if let Some(bias) = self.bias {
            if bias.len != self.m {
                return bad(format!(
                    "bias.len = {} but D has m = {} rows: the bias epilogue adds bias[i] to \
                     row i of the column-major D (one per output feature of a row-major product)",
                    bias.len, self.m
                ));
            }
        }
        if !self.alpha.is_finite() || !self.beta.is_finite() {
            return bad(format!(
                "alpha = {} and beta = {} must be finite",
                self.alpha, self.beta
            ));
        }
        Ok(())
    }

    fn key(&self) -> AlgoKey {
        AlgoKey {
            m: self.m,
            n: self.n,
            k: self.k,
            trans_a: self.trans_a,
            trans_b: self.trans_b,
            lda: self.lda,
            ldb: self.ldb,
            ldd: self.ldd,
            out: self.out,
            bias: self.bias.is_some(),
            workspace_bytes: self.workspace_bytes,
            align: [
                alignment(self.a),
                alignment(self.b),
                alignment(self.d),
                self.bias.map_or(256, |b| alignment(b.ptr)),
            ],
        }
    }
}

/// Owns a cuBLASLt descriptor and destroys it on every exit path.
struct Owned<'a> {
    raw: *mut c_void,
    destroy: unsafe extern "C" fn(*mut c_void) -> sys::Status,
    _lt: &'a CublasLt,
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        if !self.raw.is_null() {
            // SAFETY: a live descriptor created by the matching create call,
            // destroyed once; a failed destroy cannot be reported from drop.
            let _ = unsafe { (self.destroy)(self.raw) };
        }
    }
}

impl CublasLt {
    /// Sets attribute `attr` (named `name` in errors) of a descriptor
    /// through `set`, the library's `cublasLt<what>SetAttribute`.
    fn set_attr<T>(
        &self,
        set: unsafe extern "C" fn(*mut c_void, c_int, *const c_void, usize) -> sys::Status,
        what: &'static str,
        obj: &Owned<'_>,
        attr: c_int,
        name: &'static str,
        v: &T,
    ) -> Result<()> {
        // SAFETY: `v` is a live value of the type cublasLt.h gives `attr`,
        // and its size is passed; the descriptor is live and of the kind
        // `set` takes.
        let s = unsafe {
            set(
                obj.raw,
                attr,
                (v as *const T).cast(),
                std::mem::size_of_val(v),
            )
        };
        self.check(what, s, &|| format!("setting {name}"))
    }

    fn desc_attr<T>(&self, desc: &Owned<'_>, attr: c_int, name: &'static str, v: &T) -> Result<()> {
        let set = self.fns.desc_set;
        self.set_attr(set, "cublasLtMatmulDescSetAttribute", desc, attr, name, v)
    }

    fn pref_attr<T>(&self, pref: &Owned<'_>, attr: c_int, name: &'static str, v: &T) -> Result<()> {
        let set = self.fns.pref_set;
        self.set_attr(
            set,
            "cublasLtMatmulPreferenceSetAttribute",
            pref,
            attr,
            name,
            v,
        )
    }

    fn layout(
        &self,
        dtype: c_int,
        rows: usize,
        cols: usize,
        ld: usize,
        what: &'static str,
    ) -> Result<Owned<'_>> {
        let mut raw: sys::MatrixLayout = std::ptr::null_mut();
        // SAFETY: writes the new layout through a live local; the sizes were
        // validated to fit (rows, cols > 0, ld fits an i64).
        let s = unsafe {
            (self.fns.layout_create)(&mut raw, dtype, rows as u64, cols as u64, ld as i64)
        };
        self.check("cublasLtMatrixLayoutCreate", s, &|| {
            format!("layout of {what}: {rows} x {cols}, ld {ld}")
        })?;
        Ok(Owned {
            raw,
            destroy: self.fns.layout_destroy,
            _lt: self,
        })
    }

    /// Enqueues `args` on `stream` (a `CUstream`; null is the legacy
    /// default stream) with `handle`. The arguments are validated first
    /// ([`MatmulBf16::validate`]); the algorithm comes from cuBLASLt's
    /// heuristic, once per shape and alignment (cached in the handle).
    ///
    /// # Safety
    /// `a`, `b`, `d`, the bias and the workspace must be device memory of
    /// the stream's context holding at least the extents the arguments
    /// describe (`ld * (cols - 1) + rows` elements of each matrix as
    /// stored), valid until the work on `stream` completes; D must not
    /// overlap A, B or the bias.
    pub unsafe fn matmul_bf16(
        &self,
        handle: &Handle,
        stream: *mut c_void,
        args: &MatmulBf16,
    ) -> Result<()> {
        args.validate()?;
        if !std::ptr::eq(Arc::as_ptr(&handle.lt), self) {
            return Err(RuntimeError::Invalid(format!(
                "matmul_bf16: the handle belongs to the cuBLASLt loaded from `{}`, not `{}`",
                handle.lt.path.display(),
                self.path.display()
            )));
        }
        let shape = || {
            format!(
                "m {} n {} k {}, op(A) {}, op(B) {}, lda {} ldb {} ldd {}, D {:?}{}, workspace {} B",
                args.m,
                args.n,
                args.k,
                if args.trans_a { "T" } else { "N" },
                if args.trans_b { "T" } else { "N" },
                args.lda,
                args.ldb,
                args.ldd,
                args.out,
                if args.bias.is_some() { " + bias" } else { "" },
                args.workspace_bytes
            )
        };

        let mut raw_desc: sys::MatmulDesc = std::ptr::null_mut();
        // SAFETY: writes the new descriptor through a live local.
        let s = unsafe { (self.fns.desc_create)(&mut raw_desc, sys::COMPUTE_32F, sys::CUDA_R_32F) };
        self.check("cublasLtMatmulDescCreate", s, &shape)?;
        let desc = Owned {
            raw: raw_desc,
            destroy: self.fns.desc_destroy,
            _lt: self,
        };
        let op = |t: bool| if t { sys::OP_T } else { sys::OP_N };
        self.desc_attr(&desc, sys::DESC_TRANSA, "TRANSA", &op(args.trans_a))?;
        self.desc_attr(&desc, sys::DESC_TRANSB, "TRANSB", &op(args.trans_b))?;
        match args.bias {
            Some(bias) => {
                self.desc_attr(&desc, sys::DESC_EPILOGUE, "EPILOGUE", &sys::EPILOGUE_BIAS)?;
                let p = bias.ptr as *const c_void;
                self.desc_attr(&desc, sys::DESC_BIAS_POINTER, "BIAS_POINTER", &p)?;
                self.desc_attr(
                    &desc,
                    sys::DESC_BIAS_DATA_TYPE,
                    "BIAS_DATA_TYPE",
                    &args.out.cuda(),
                )?;
            }
            None => {
                self.desc_attr(
                    &desc,
                    sys::DESC_EPILOGUE,
                    "EPILOGUE",
                    &sys::EPILOGUE_DEFAULT,
                )?;
            }
        }
        let (ar, ac) = args.a_stored();
        let (br, bc) = args.b_stored();
        let la = self.layout(sys::CUDA_R_16BF, ar, ac, args.lda, "A")?;
        let lb = self.layout(sys::CUDA_R_16BF, br, bc, args.ldb, "B")?;
        let ld = self.layout(args.out.cuda(), args.m, args.n, args.ldd, "D")?;

        let key = args.key();
        let cached = handle
            .algos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied();
        let algo = match cached {
            Some(a) => a,
            None => {
                let a = self.choose_algo(handle, &desc, &la, &lb, &ld, args, &key, &shape)?;
                handle
                    .algos
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, a);
                a
            }
        };

        // SAFETY: every descriptor is live; alpha and beta are host f32s
        // (the default host pointer mode, scale type fp32); the device
        // pointers and the stream are the caller's promise; D is also C.
        let s = unsafe {
            (self.fns.matmul)(
                handle.raw,
                desc.raw,
                (&args.alpha as *const f32).cast(),
                args.a as *const c_void,
                la.raw,
                args.b as *const c_void,
                lb.raw,
                (&args.beta as *const f32).cast(),
                args.d as *const c_void,
                ld.raw,
                args.d as *mut c_void,
                ld.raw,
                &algo,
                args.workspace as *mut c_void,
                args.workspace_bytes,
                stream,
            )
        };
        self.check("cublasLtMatmul", s, &shape)
    }

    #[allow(clippy::too_many_arguments)]
    fn choose_algo(
        &self,
        handle: &Handle,
        desc: &Owned<'_>,
        la: &Owned<'_>,
        lb: &Owned<'_>,
        ld: &Owned<'_>,
        args: &MatmulBf16,
        key: &AlgoKey,
        shape: &dyn Fn() -> String,
    ) -> Result<sys::MatmulAlgo> {
        let mut raw_pref: sys::MatmulPreference = std::ptr::null_mut();
        // SAFETY: writes the new preference through a live local.
        let s = unsafe { (self.fns.pref_create)(&mut raw_pref) };
        self.check("cublasLtMatmulPreferenceCreate", s, shape)?;
        let pref = Owned {
            raw: raw_pref,
            destroy: self.fns.pref_destroy,
            _lt: self,
        };
        let ws = args.workspace_bytes as u64;
        self.pref_attr(
            &pref,
            sys::PREF_MAX_WORKSPACE_BYTES,
            "MAX_WORKSPACE_BYTES",
            &ws,
        )?;
        // The heuristic assumes 256-byte aligned buffers unless told: say
        // what the pointers really have, so it never picks a kernel that
        // needs more.
        let [aa, ab, ad, _] = key.align;
        self.pref_attr(
            &pref,
            sys::PREF_MIN_ALIGNMENT_A_BYTES,
            "MIN_ALIGNMENT_A_BYTES",
            &aa,
        )?;
        self.pref_attr(
            &pref,
            sys::PREF_MIN_ALIGNMENT_B_BYTES,
            "MIN_ALIGNMENT_B_BYTES",
            &ab,
        )?;
        self.pref_attr(
            &pref,
            sys::PREF_MIN_ALIGNMENT_C_BYTES,
            "MIN_ALIGNMENT_C_BYTES",
            &ad,
        )?;
        self.pref_attr(
            &pref,
            sys::PREF_MIN_ALIGNMENT_D_BYTES,
            "MIN_ALIGNMENT_D_BYTES",
            &ad,
        )?;

        let mut result = sys::HeuristicResult::default();
        let mut returned: c_int = 0;
        // SAFETY: all descriptors are live; one result is requested and
        // `result` has room for one; `returned` is a live local. C and D
        // share D's layout.
        let s = unsafe {
            (self.fns.heuristic)(
                handle.raw,
                desc.raw,
                la.raw,
                lb.raw,
                ld.raw,
                ld.raw,
                pref.raw,
                1,
                &mut result,
                &mut returned,
            )
        };
        self.check("cublasLtMatmulAlgoGetHeuristic", s, shape)?;
        if returned < 1 {
            return Err(RuntimeError::Cublas {
                call: "cublasLtMatmulAlgoGetHeuristic",
                status: sys::STATUS_SUCCESS,
                status_name: "no algorithm".into(),
                message: format!(
                    "no kernel supports this GEMM ({}; pointer alignments {:?} bytes)",
                    shape(),
                    key.align
                ),
            });
        }
        self.check(
            "cublasLtMatmulAlgoGetHeuristic (result state)",
            result.state,
            shape,
        )?;
        if result.workspace_size > args.workspace_bytes {
            return Err(RuntimeError::Invalid(format!(
                "matmul_bf16: the chosen algorithm needs {} workspace bytes, {} given ({})",
                result.workspace_size,
                args.workspace_bytes,
                shape()
            )));
        }
        Ok(result.algo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heuristic_result_has_the_c_layout() {
        // 64 bytes of algo, size_t, int, float, int[4].
        assert_eq!(std::mem::size_of::<sys::MatmulAlgo>(), 64);
        assert_eq!(std::mem::size_of::<sys::HeuristicResult>(), 96);
        assert_eq!(
            std::mem::offset_of!(sys::HeuristicResult, workspace_size),
            64
        );
        assert_eq!(std::mem::offset_of!(sys::HeuristicResult, state), 72);
        assert_eq!(std::mem::offset_of!(sys::HeuristicResult, waves_count), 76);
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1008), 8);
        assert_eq!(alignment(0x1080), 128);
    }

    #[test]
    fn the_algo_cache_key_tells_alignments_apart() {
        let a = MatmulBf16::row_major(4, 8, 16, 0x1000, 0x2000, 0x3000, OutDType::F32);
        let mut b = a;
        b.a = 0x1010;
        assert_ne!(a.key(), b.key());
        let mut c = a;
        c.alpha = 2.0;
        assert_eq!(a.key(), c.key(), "alpha does not change the algorithm");
    }
}
