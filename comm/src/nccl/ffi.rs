//! The raw NCCL C API this crate binds: types, constants and function
//! pointers resolved from `libnccl.so.2` at run time. Only what the
//! communicator needs is bound.

use std::ffi::{c_char, c_int, c_void};

/// `ncclResult_t`.
pub type NcclResult = c_int;
/// `ncclComm_t`, an opaque handle.
pub type RawCommPtr = *mut c_void;
/// `cudaStream_t` / `CUstream`, an opaque handle.
pub type RawStreamPtr = *mut c_void;

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NcclUniqueId {
    pub internal: [c_char; 128],
}

pub const NCCL_SUCCESS: NcclResult = 0;
pub const NCCL_IN_PROGRESS: NcclResult = 7;

/// `ncclResult_t` names, by value.
pub fn result_name(code: NcclResult) -> &'static str {
    match code {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError",
        2 => "ncclSystemError",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError",
        7 => "ncclInProgress",
        _ => "an unknown ncclResult_t",
    }
}

/// `ncclDataType_t` values.
pub mod dtype {
    use std::ffi::c_int;
    pub const INT8: c_int = 0;
    pub const FLOAT16: c_int = 6;
    pub const FLOAT32: c_int = 7;
    pub const FLOAT64: c_int = 8;
    /// Since NCCL 2.10.
    pub const BFLOAT16: c_int = 9;
}

/// `ncclRedOp_t` values.
pub mod redop {
    use std::ffi::c_int;
    pub const SUM: c_int = 0;
    pub const MAX: c_int = 2;
    pub const MIN: c_int = 3;
    /// Since NCCL 2.10.
    pub const AVG: c_int = 4;
}

pub type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> NcclResult;
pub type GetUniqueIdFn = unsafe extern "C" fn(*mut NcclUniqueId) -> NcclResult;
pub type CommInitRankFn =
    unsafe extern "C" fn(*mut RawCommPtr, c_int, NcclUniqueId, c_int) -> NcclResult;
pub type CommFn = unsafe extern "C" fn(RawCommPtr) -> NcclResult;
pub type CommGetAsyncErrorFn = unsafe extern "C" fn(RawCommPtr, *mut NcclResult) -> NcclResult;
pub type GetErrorStringFn = unsafe extern "C" fn(NcclResult) -> *const c_char;
pub type GetLastErrorFn = unsafe extern "C" fn(RawCommPtr) -> *const c_char;
pub type GroupFn = unsafe extern "C" fn() -> NcclResult;
pub type SendFn = unsafe extern "C" fn(
    *const c_void,
    usize,
    c_int,
    c_int,
    RawCommPtr,
    RawStreamPtr,
) -> NcclResult;
pub type RecvFn =
    unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, RawCommPtr, RawStreamPtr) -> NcclResult;
/// `ncclAllReduce` and `ncclReduceScatter` (count is the receive count).
pub type ReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    RawCommPtr,
    RawStreamPtr,
) -> NcclResult;
pub type AllGatherFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    RawCommPtr,
    RawStreamPtr,
) -> NcclResult;
pub type BroadcastFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    RawCommPtr,
    RawStreamPtr,
) -> NcclResult;

/// Every bound function.
#[derive(Clone, Copy)]
pub struct Fns {
    pub get_version: GetVersionFn,
    pub get_unique_id: GetUniqueIdFn,
    pub comm_init_rank: CommInitRankFn,
    pub comm_destroy: CommFn,
    pub comm_abort: CommFn,
    pub comm_get_async_error: CommGetAsyncErrorFn,
    pub get_error_string: GetErrorStringFn,
    /// Since NCCL 2.13; absent in older libraries.
    pub get_last_error: Option<GetLastErrorFn>,
    pub group_start: GroupFn,
    pub group_end: GroupFn,
    pub send: SendFn,
    pub recv: RecvFn,
    pub all_reduce: ReduceFn,
    pub reduce_scatter: ReduceFn,
    pub all_gather: AllGatherFn,
    pub broadcast: BroadcastFn,
}

impl Fns {
    /// Resolves every symbol of `lib`.
    pub fn resolve(lib: &libloading::Library, path: &str) -> Result<Fns, String> {
        macro_rules! sym {
            ($name:literal) => {{
                // SAFETY: the symbol is looked up by its C name and read as
                // the function pointer type of its declaration in nccl.h
                // (the types above); the pointer is only used while `lib`
                // is loaded, which the `Nccl` holding both guarantees.
                match unsafe { lib.get($name) } {
                    Ok(s) => *s,
                    Err(e) => return Err(format!("`{path}` lacks `{}`: {e}", $name)),
                }
            }};
        }
        // SAFETY: as in `sym!`; a missing symbol is None instead of an error.
        let get_last_error = unsafe { lib.get::<GetLastErrorFn>("ncclGetLastError") }
            .ok()
            .map(|s| *s);
        Ok(Fns {
            get_version: sym!("ncclGetVersion"),
            get_unique_id: sym!("ncclGetUniqueId"),
            comm_init_rank: sym!("ncclCommInitRank"),
            comm_destroy: sym!("ncclCommDestroy"),
            comm_abort: sym!("ncclCommAbort"),
            comm_get_async_error: sym!("ncclCommGetAsyncError"),
            get_error_string: sym!("ncclGetErrorString"),
            get_last_error,
            group_start: sym!("ncclGroupStart"),
            group_end: sym!("ncclGroupEnd"),
            send: sym!("ncclSend"),
            recv: sym!("ncclRecv"),
            all_reduce: sym!("ncclAllReduce"),
            reduce_scatter: sym!("ncclReduceScatter"),
            all_gather: sym!("ncclAllGather"),
            broadcast: sym!("ncclBroadcast"),
        })
    }
}
