//! The CUDA driver, through cudarc's raw bindings (loaded at run time):
//! probing, one context per device, results turned into errors that name
//! the operation, an event pool and the per-context module cache.
//!
//! cudarc's dynamic loader panics when `libcuda` is missing, so every entry
//! point here goes through [`driver_present`] first.

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys;

use super::launch::{entry_params, EntryParam, LaunchLimits};
use crate::error::{Result, RuntimeError};

/// Whether `libcuda` can be loaded (checked once per process).
pub(crate) fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: loading the driver library runs its initialisers; that is
    // what every CUDA program does, and nothing else runs here.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// The driver's name and description of a result code.
fn describe(r: sys::CUresult) -> String {
    let mut name: *const std::ffi::c_char = std::ptr::null();
    let mut text: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: both calls only write a pointer to a static string owned by
    // the driver (or leave it null for an unknown code).
    let (rn, rt) = unsafe {
        (
            sys::cuGetErrorName(r, &mut name),
            sys::cuGetErrorString(r, &mut text),
        )
    };
    let read = |p: *const std::ffi::c_char, ok: sys::CUresult| {
        if ok == sys::CUresult::CUDA_SUCCESS && !p.is_null() {
            // SAFETY: the driver returned a NUL-terminated static string.
            Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        } else {
            None
        }
    };
    match (read(name, rn), read(text, rt)) {
        (Some(n), Some(t)) => format!("{n}: {t}"),
        (Some(n), None) => n,
        _ => format!("{r:?}"),
    }
}

/// Turns a driver result into an error naming the call and what it did.
pub(crate) fn check(r: sys::CUresult, op: impl FnOnce() -> String) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(RuntimeError::Cuda(format!("{}: {}", op(), describe(r))))
    }
}

/// `cuInit`, once; the error says what is missing.
pub(crate) fn init() -> Result<()> {
    if !driver_present() {
        return Err(RuntimeError::Cuda(
            "no CUDA driver: libcuda.so.1 could not be loaded (install the NVIDIA driver, or run \
             on a machine with a GPU; the cpu and meta devices need neither)"
                .into(),
        ));
    }
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        // SAFETY: cuInit takes flags 0 and may be called from any thread.
        check(unsafe { sys::cuInit(0) }, || "cuInit".into()).map_err(|e| e.to_string())
    })
    .clone()
    .map_err(RuntimeError::Cuda)
}

/// Number of GPUs the driver sees.
pub(crate) fn device_count() -> Result<usize> {
    init()?;
    let mut n = 0;
    // SAFETY: writes one int.
    check(unsafe { sys::cuDeviceGetCount(&mut n) }, || {
        "cuDeviceGetCount".into()
    })?;
    Ok(n.max(0) as usize)
}

/// The CUDA version the driver supports (major, minor), e.g. (13, 0).
pub fn driver_version() -> Result<(u32, u32)> {
    init()?;
    let mut v = 0;
    // SAFETY: writes one int.
    check(unsafe { sys::cuDriverGetVersion(&mut v) }, || {
        "cuDriverGetVersion".into()
    })?;
    let v = v.max(0) as u32;
    Ok((v / 1000, v % 1000 / 10))
}

/// What the driver says about one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Its ordinal.
    pub ordinal: usize,
    /// Its name ("NVIDIA H100 80GB HBM3").
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
    /// Total memory, bytes.
    pub total_memory: usize,
    /// PCI bus id ("0000:1b:00.0"), for NUMA placement.
    pub pci_bus_id: String,
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// Copy engines that can run beside compute.
    pub async_engines: u32,
    /// Launch limits.
    pub limits: LaunchLimits,
}

fn attribute(dev: sys::CUdevice, a: sys::CUdevice_attribute, what: &str) -> Result<u32> {
    let mut v = 0;
    // SAFETY: writes one int for a valid device handle.
    check(unsafe { sys::cuDeviceGetAttribute(&mut v, a, dev) }, || {
        format!("cuDeviceGetAttribute({what})")
    })?;
    Ok(v.max(0) as u32)
}

/// The driver's description of GPU `ordinal`.
pub(crate) fn gpu_info(ordinal: usize) -> Result<(sys::CUdevice, GpuInfo)> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(RuntimeError::Cuda(format!(
            "device {ordinal} does not exist: the driver sees {count} GPU(s)"
        )));
    }
    let mut dev: sys::CUdevice = 0;
    // SAFETY: writes one device handle; the ordinal was checked above.
    check(
        unsafe { sys::cuDeviceGet(&mut dev, ordinal as i32) },
        || format!("cuDeviceGet({ordinal})"),
    )?;
    let mut name = [0 as std::ffi::c_char; 256];
    // SAFETY: the driver writes at most `len` bytes, NUL-terminated.
    check(
        unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev) },
        || "cuDeviceGetName".into(),
    )?;
    // SAFETY: NUL-terminated within the buffer (written by the driver).
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let mut bus = [0 as std::ffi::c_char; 64];
    // SAFETY: as above.
    check(
        unsafe { sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as i32, dev) },
        || "cuDeviceGetPCIBusId".into(),
    )?;
    // SAFETY: as above.
    let pci_bus_id = unsafe { CStr::from_ptr(bus.as_ptr()) }
        .to_string_lossy()
        .to_ascii_lowercase();
    let mut total = 0usize;
    // SAFETY: writes one size.
    check(unsafe { sys::cuDeviceTotalMem_v2(&mut total, dev) }, || {
        "cuDeviceTotalMem".into()
    })?;
    use sys::CUdevice_attribute as A;
    let info = GpuInfo {
        ordinal,
        name,
        compute_capability: (
            attribute(
                dev,
                A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                "cc major",
            )?,
            attribute(
                dev,
                A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                "cc minor",
            )?,
        ),
        total_memory: total,
        pci_bus_id,
        multiprocessors: attribute(dev, A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "SMs")?,
        async_engines: attribute(
            dev,
            A::CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT,
            "copy engines",
        )?,
        limits: LaunchLimits {
            max_threads_per_block: attribute(
                dev,
                A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK,
                "max threads",
            )?,
            max_grid: [
                attribute(dev, A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X, "grid x")?,
                attribute(dev, A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y, "grid y")?,
                attribute(dev, A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z, "grid z")?,
            ],
            max_shared_optin: attribute(
                dev,
                A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                "shared memory opt-in",
            )?,
        },
    };
    Ok((dev, info))
}

/// Every GPU the driver sees, or why none can be used.
pub fn probe() -> Result<Vec<GpuInfo>> {
    let n = device_count()?;
    (0..n).map(|i| gpu_info(i).map(|(_, g)| g)).collect()
}

/// A loaded function and what its launches are checked against.
pub(crate) struct Function {
    pub(crate) raw: sys::CUfunction,
    pub(crate) params: Vec<EntryParam>,
    /// The dynamic shared memory the function's attribute allows now.
    pub(crate) shared_allowed: u32,
}

/// One device's primary context, its event pool and its modules.
pub(crate) struct Context {
    pub(crate) ordinal: usize,
    dev: sys::CUdevice,
    pub(crate) raw: sys::CUcontext,
    pub(crate) info: GpuInfo,
    /// Synchronise after each launch (see `CudaConfig::check_each_launch`).
    pub(crate) check_each_launch: bool,
    events: Mutex<Vec<usize>>,
    /// Modules by the address of their text; functions by (module, entry).
    modules: Mutex<HashMap<usize, usize>>,
    functions: Mutex<HashMap<(usize, String), Function>>,
}

// SAFETY: the raw handles are driver objects, usable from any thread once
// the context is made current there (`bind`); the maps are behind mutexes.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

impl Context {
    /// Retains the primary context of GPU `ordinal`.
    pub(crate) fn new(ordinal: usize, check_each_launch: bool) -> Result<Context> {
        let (dev, info) = gpu_info(ordinal)?;
        let mut raw: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: writes one context handle for a valid device.
        check(
            unsafe { sys::cuDevicePrimaryCtxRetain(&mut raw, dev) },
            || format!("cuDevicePrimaryCtxRetain(device {ordinal})"),
        )?;
        let ctx = Context {
            ordinal,
            dev,
            raw,
            info,
            check_each_launch,
            events: Mutex::new(Vec::new()),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        };
        ctx.bind()?;
        Ok(ctx)
    }

    /// Makes the context current on the calling thread (cheap; done before
    /// every driver call, since the caller may be any thread).
    pub(crate) fn bind(&self) -> Result<()> {
        // SAFETY: the context was retained in `new` and is released only
        // in `drop`.
        check(unsafe { sys::cuCtxSetCurrent(self.raw) }, || {
            format!("cuCtxSetCurrent(device {})", self.ordinal)
        })
    }

    /// Free and total device memory, bytes.
    pub(crate) fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: writes two sizes; the context is current.
        check(
            unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) },
            || "cuMemGetInfo".into(),
        )?;
        Ok((free, total))
    }

    /// An event with timing enabled, from the pool.
    pub(crate) fn event(&self) -> Result<sys::CUevent> {
        if let Some(e) = self.events.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(e as sys::CUevent);
        }
        self.bind()?;
        let mut e: sys::CUevent = std::ptr::null_mut();
        // SAFETY: writes one event handle; the context is current.
        check(
            unsafe { sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DEFAULT as u32) },
            || "cuEventCreate".into(),
        )?;
        Ok(e)
    }

    /// Returns an event to the pool (its last use must have completed or
    /// been superseded: re-recording an event is allowed).
    pub(crate) fn recycle(&self, e: sys::CUevent) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e as usize);
    }

    /// The function `entry` of the module whose text is `ptx`, loading the
    /// module on first use (`cuModuleLoadData`), and the dynamic shared
    /// memory raised to `shared` bytes where more than allowed now.
    pub(crate) fn function<R>(
        &self,
        ptx: &'static str,
        entry: &str,
        shared: u32,
        use_fn: impl FnOnce(&Function) -> Result<R>,
    ) -> Result<R> {
        let key = (ptx.as_ptr() as usize, entry.to_string());
        let mut fns = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if !fns.contains_key(&key) {
            let params = entry_params(ptx, entry)?;
            let module = self.module(ptx, entry)?;
            let cname = std::ffi::CString::new(entry).map_err(|_| {
                RuntimeError::Invalid(format!("kernel name `{entry}` contains a NUL byte"))
            })?;
            let mut raw: sys::CUfunction = std::ptr::null_mut();
            // SAFETY: the module is loaded and stays loaded for the
            // context's life; the name is NUL-terminated.
            check(
                unsafe {
                    sys::cuModuleGetFunction(&mut raw, module as sys::CUmodule, cname.as_ptr())
                },
                || format!("cuModuleGetFunction(`{entry}`)"),
            )?;
            fns.insert(
                key.clone(),
                Function {
                    raw,
                    params,
                    shared_allowed: 48 * 1024,
                },
            );
        }
        let f = fns.get_mut(&key).ok_or_else(|| {
            RuntimeError::Cuda(format!("kernel `{entry}` vanished from the cache"))
        })?;
        if shared > f.shared_allowed {
            // SAFETY: a valid function handle; the attribute takes bytes.
            check(
                unsafe {
                    sys::cuFuncSetAttribute(
                        f.raw,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        shared as i32,
                    )
                },
                || format!("cuFuncSetAttribute(`{entry}`, dynamic shared memory {shared} bytes)"),
            )?;
            f.shared_allowed = shared;
        }
        use_fn(f)
    }

    fn module(&self, ptx: &'static str, entry: &str) -> Result<usize> {
        let key = ptx.as_ptr() as usize;
        let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&m) = mods.get(&key) {
            return Ok(m);
        }
        self.bind()?;
        let text = std::ffi::CString::new(ptx).map_err(|_| {
            RuntimeError::Invalid(format!("the PTX module of `{entry}` contains a NUL byte"))
        })?;
        // The JIT's log names the line of a PTX error; ask for it.
        const LOG: usize = 8192;
        let mut log = vec![0u8; LOG];
        let mut opts = [
            sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
            sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
        ];
        let mut vals: [*mut c_void; 2] = [log.as_mut_ptr().cast(), LOG as *mut c_void];
        let mut m: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: the text is NUL-terminated and outlives the call; the
        // option arrays have two entries each; the log buffer has LOG bytes.
        let r = unsafe {
            sys::cuModuleLoadDataEx(
                &mut m,
                text.as_ptr().cast(),
                opts.len() as u32,
                opts.as_mut_ptr(),
                vals.as_mut_ptr(),
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            let end = log.iter().position(|&b| b == 0).unwrap_or(LOG);
            let log = String::from_utf8_lossy(&log[..end]).trim().to_string();
            return Err(RuntimeError::Cuda(format!(
                "cuModuleLoadData (the module of `{entry}`): {}{}",
                describe(r),
                if log.is_empty() {
                    String::new()
                } else {
                    format!("; JIT log: {log}")
                }
            )));
        }
        mods.insert(key, m as usize);
        Ok(m as usize)
    }

    /// Device memory, `bytes` of it, as one allocation.
    pub(crate) fn alloc(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        let mut p: sys::CUdeviceptr = 0;
        // SAFETY: writes one device pointer; the context is current.
        check(unsafe { sys::cuMemAlloc_v2(&mut p, bytes) }, || {
            format!(
                "cuMemAlloc of {} on device {}",
                fpdt_alloc::fmt_bytes(bytes),
                self.ordinal
            )
        })?;
        Ok(p)
    }

    pub(crate) fn free(&self, p: u64) {
        if self.bind().is_ok() {
            // SAFETY: `p` came from `alloc` and is freed once, after every
            // stream of the device was synchronised.
            let _ = unsafe { sys::cuMemFree_v2(p) };
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        // SAFETY: every handle below was created in this context and no
        // stream uses them any more (the device synchronised before its
        // last handle dropped).
        unsafe {
            for e in self
                .events
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..)
            {
                let _ = sys::cuEventDestroy_v2(e as sys::CUevent);
            }
            for (_, m) in self
                .modules
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .drain()
            {
                let _ = sys::cuModuleUnload(m as sys::CUmodule);
            }
            let _ = sys::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}
