//! Test support for the fake driver (`runtime/tests/fake_cuda/fake_cuda.c`):
//! its device memory is host memory and it runs no PTX, but it hands every
//! launch it does not know to a hook. [`install_fake_executor`] installs one
//! that calls an executor of this process (the PTX crate's interpreter), so
//! kernels launched through the real cuda path (`Stream::launch_ptx`) run
//! on machines without a GPU. On a real driver it does nothing.

use std::ffi::{c_char, c_void, CStr};
use std::sync::{Mutex, OnceLock};

use super::launch::{entry_params, KernelArg};
use crate::error::{Result, RuntimeError};

/// A device allocation a launch's arguments point into: its address and
/// its bytes.
#[derive(Debug, Clone)]
pub struct FakeRegion {
    /// Device address of the allocation's first byte.
    pub base: u64,
    /// The allocation's bytes before the launch; the executor leaves them
    /// as the kernel left them.
    pub bytes: Vec<u8>,
}

/// One launch the fake driver hands over.
#[derive(Debug)]
pub struct FakeLaunch<'a> {
    /// The module's PTX.
    pub ptx: &'a str,
    /// The entry.
    pub entry: &'a str,
    /// Blocks of the grid.
    pub grid: [u32; 3],
    /// Threads of a block.
    pub block: [u32; 3],
    /// Dynamic shared memory, bytes.
    pub shared_bytes: u32,
    /// The arguments in `.entry` order (8-byte ones as `U64`: pointers are
    /// among them).
    pub args: Vec<KernelArg>,
    /// The allocations the 8-byte arguments point into.
    pub regions: Vec<FakeRegion>,
}

/// Runs a launch over its regions.
pub type FakeExecutor =
    dyn Fn(&mut FakeLaunch<'_>) -> std::result::Result<(), String> + Send + Sync;

type Hook =
    unsafe extern "C" fn(*const c_char, *const c_char, *const u32, u32, *mut *mut c_void) -> i32;
type SetHook = unsafe extern "C" fn(Option<Hook>);
type FindAllocation = unsafe extern "C" fn(u64, *mut u64, *mut usize) -> i32;

struct Installed {
    exec: Box<FakeExecutor>,
    find: FindAllocation,
    /// One launch at a time (the executor's memory is a copy).
    lock: Mutex<()>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Installs `exec` as the fake driver's kernel executor. True when the
/// loaded driver is the fake (the first executor installed stays); false,
/// and nothing changes, on a real driver.
pub fn install_fake_executor(exec: Box<FakeExecutor>) -> Result<bool> {
    super::driver::init()?;
    // SAFETY: `init` loaded libcuda.so.1; RTLD_NOLOAD only returns the
    // handle of that already loaded library (running no initialisers).
    let lib = unsafe {
        libloading::os::unix::Library::open(
            Some("libcuda.so.1"),
            libc::RTLD_NOW | libc::RTLD_NOLOAD,
        )
    }
    .map_err(|e| RuntimeError::Cuda(format!("libcuda.so.1 is not loaded: {e}")))?;
    // SAFETY: the fake driver defines these two functions with exactly
    // these C signatures (fake_cuda.c); a real driver defines neither.
    let (set, find) = unsafe {
        match (
            lib.get::<SetHook>(b"fake_cuda_set_launch_hook\0"),
            lib.get::<FindAllocation>(b"fake_cuda_allocation\0"),
        ) {
            (Ok(s), Ok(f)) => (*s, *f),
            _ => return Ok(false),
        }
    };
    // The library stays loaded for the process (cudarc holds it too).
    std::mem::forget(lib);
    let _ = INSTALLED.set(Installed {
        exec,
        find,
        lock: Mutex::new(()),
    });
    // SAFETY: `hook` has the signature the fake expects and stays valid
    // for the life of the process.
    unsafe { set(Some(hook)) };
    Ok(true)
}

unsafe extern "C" fn hook(
    ptx: *const c_char,
    entry: *const c_char,
    dims: *const u32,
    shared: u32,
    params: *mut *mut c_void,
) -> i32 {
    let r = std::panic::catch_unwind(|| {
        // SAFETY: the fake passes its module text and the entry's name
        // (NUL-terminated, alive for the call), six dimensions, and one
        // pointer per parameter of the entry (cuLaunchKernel's contract).
        unsafe { run(ptx, entry, dims, shared, params) }
    });
    match r {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("fake cuda executor: {e}");
            1
        }
        Err(_) => {
            eprintln!("fake cuda executor: panicked");
            1
        }
    }
}

/// # Safety
/// As `hook`'s caller guarantees: valid strings, six dims, one valid
/// pointer per parameter of `entry` in `ptx`.
unsafe fn run(
    ptx: *const c_char,
    entry: *const c_char,
    dims: *const u32,
    shared: u32,
    params: *mut *mut c_void,
) -> std::result::Result<(), String> {
    let Some(inst) = INSTALLED.get() else {
        return Err("no executor installed".into());
    };
    // SAFETY: see the function's contract.
    let (ptx, entry, dims) = unsafe {
        (
            CStr::from_ptr(ptx).to_str().map_err(|e| e.to_string())?,
            CStr::from_ptr(entry).to_str().map_err(|e| e.to_string())?,
            std::slice::from_raw_parts(dims, 6),
        )
    };
    let decl = entry_params(ptx, entry).map_err(|e| e.to_string())?;
    let mut args = Vec::with_capacity(decl.len());
    for (i, p) in decl.iter().enumerate() {
        // SAFETY: parameter i's pointer holds `p.size` bytes of it.
        let b = unsafe { std::slice::from_raw_parts((*params.add(i)).cast::<u8>(), p.size) };
        args.push(match (p.size, p.ty.starts_with('f')) {
            (8, _) => KernelArg::U64(u64::from_le_bytes(b.try_into().map_err(|_| "size")?)),
            (4, true) => KernelArg::F32(f32::from_le_bytes(b.try_into().map_err(|_| "size")?)),
            (4, false) => KernelArg::U32(u32::from_le_bytes(b.try_into().map_err(|_| "size")?)),
            (n, _) => return Err(format!("{entry}: a {n}-byte parameter is not supported")),
        });
    }
    let _one = inst.lock.lock().unwrap_or_else(|e| e.into_inner());
    let mut regions: Vec<FakeRegion> = Vec::new();
    for a in &args {
        let KernelArg::U64(v) = *a else { continue };
        let (mut base, mut len) = (0u64, 0usize);
        // SAFETY: a plain lookup in the fake's allocation table.
        if unsafe { (inst.find)(v, &mut base, &mut len) } == 0 {
            continue;
        }
        if regions.iter().any(|r| r.base == base) {
            continue;
        }
        // SAFETY: the fake's allocation of `len` bytes at `base` is live
        // host memory (it is only freed by cuMemFree, which the runtime
        // calls after the work on it is done).
        let bytes = unsafe { std::slice::from_raw_parts(base as *const u8, len) }.to_vec();
        regions.push(FakeRegion { base, bytes });
    }
    let before: Vec<Vec<u8>> = regions.iter().map(|r| r.bytes.clone()).collect();
    let mut launch = FakeLaunch {
        ptx,
        entry,
        grid: [dims[0], dims[1], dims[2]],
        block: [dims[3], dims[4], dims[5]],
        shared_bytes: shared,
        args,
        regions,
    };
    (inst.exec)(&mut launch)?;
    // Write back only the bytes the kernel changed: other threads may copy
    // to other parts of the same allocation meanwhile.
    for (r, old) in launch.regions.iter().zip(&before) {
        if r.bytes.len() != old.len() {
            return Err(format!("{entry}: the executor resized a region"));
        }
        let mut i = 0;
        while i < old.len() {
            if r.bytes[i] == old[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < old.len() && r.bytes[i] != old[i] {
                i += 1;
            }
            // SAFETY: `start..i` lies inside the live allocation at `base`
            // (same length as the snapshot), and `r.bytes` is a separate
            // buffer.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    r.bytes[start..i].as_ptr(),
                    (r.base as *mut u8).add(start),
                    i - start,
                );
            }
        }
    }
    Ok(())
}
