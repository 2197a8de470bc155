//! GPU memory for the slab allocator, and host memory pinned for the GPU.

use std::sync::Arc;

use cudarc::driver::sys;
use fpdt_alloc::{Pinner, Region};

use super::driver::{check, Context};

/// One `cuMemAlloc` the slab allocator carves: allocations never reach the
/// driver again, so they cost nanoseconds and never synchronise the GPU.
pub(crate) struct CudaRegion {
    ctx: Arc<Context>,
    base: u64,
    len: usize,
}

impl CudaRegion {
    pub(crate) fn new(ctx: Arc<Context>, len: usize) -> crate::Result<CudaRegion> {
        let base = ctx.alloc(len)?;
        Ok(CudaRegion { ctx, base, len })
    }
}

impl Region for CudaRegion {
    fn base_addr(&self) -> usize {
        self.base as usize
    }

    fn len(&self) -> usize {
        self.len
    }

    fn on_free(&self, _offset: usize, _len: usize) {
        // Device bytes are never touched by the host.
    }
}

impl Drop for CudaRegion {
    fn drop(&mut self) {
        self.ctx.free(self.base);
    }
}

/// Pins host memory with `cuMemHostRegister` (portable: every context may
/// copy from it at full speed).
pub(crate) struct CudaHostPinner {
    pub(crate) ctx: Arc<Context>,
}

impl Pinner for CudaHostPinner {
    fn name(&self) -> &'static str {
        "cuMemHostRegister"
    }

    fn pin(&self, addr: usize, len: usize) -> Result<(), String> {
        self.ctx.bind().map_err(|e| e.to_string())?;
        // SAFETY: the arena hands over a mapping of `len` bytes at `addr`
        // that it keeps alive until `unpin`.
        let r = unsafe {
            sys::cuMemHostRegister_v2(addr as *mut _, len, sys::CU_MEMHOSTREGISTER_PORTABLE)
        };
        check(r, || {
            format!("cuMemHostRegister of {}", fpdt_alloc::fmt_bytes(len))
        })
        .map_err(|e| e.to_string())
    }

    fn unpin(&self, addr: usize, _len: usize) {
        if self.ctx.bind().is_ok() {
            // SAFETY: undoes the successful registration of this range.
            let _ = unsafe { sys::cuMemHostUnregister(addr as *mut _) };
        }
    }
}
