//! Running launchers' kernels on a real GPU: [`KernelLaunch::enqueue`] puts
//! one on a cuda stream, and [`GpuRunner`] mirrors the interpreter's
//! surface (allocate, run, read back) so a kernel test can run on either;
//! [`Runner`] picks one from `FPDT_PTX_BACKEND` (`interp`, the default, or
//! `cuda`), which is how `scripts/gpu-check.sh` runs every kernel test on
//! the GPU against the CPU twins.

use std::sync::OnceLock;

use fpdt_runtime::{CudaConfig, Device, DeviceBuffer, KernelArg, PtxKernel, Stream, View, Work};

use crate::interp::Interpreter;
use crate::launch::{Arg, KernelLaunch};
use crate::PtxError;

fn dev_err(e: fpdt_runtime::RuntimeError) -> PtxError {
    PtxError::Device(e.to_string())
}

fn kernel_args(args: &[Arg]) -> Vec<KernelArg> {
    args.iter()
        .map(|a| match *a {
            Arg::Ptr(v) => KernelArg::Ptr(v),
            Arg::U64(v) => KernelArg::U64(v),
            Arg::U32(v) => KernelArg::U32(v),
            Arg::I32(v) => KernelArg::I32(v),
            Arg::F32(v) => KernelArg::F32(v),
        })
        .collect()
}

impl KernelLaunch {
    /// The checks the cuda device makes before launching, without a GPU:
    /// the arguments against the `.entry`'s parameter list in the module
    /// text. The interpreter backend of [`Runner`] makes them on every
    /// launch, so each kernel test also shows the launch would be accepted.
    pub fn check_for_cuda(&self) -> Result<(), PtxError> {
        let params =
            fpdt_runtime::cuda::launch::entry_params(self.module, &self.entry).map_err(dev_err)?;
        fpdt_runtime::cuda::launch::check_args(&self.entry, &params, &kernel_args(&self.args))
            .map_err(dev_err)
    }

    /// Enqueues the kernel on `stream` (cuda: launched; meta: costed as
    /// `work`); `reads` and `writes` are the views its pointers lie in.
    pub fn enqueue(
        &self,
        stream: &Stream,
        work: Work,
        reads: &[View<'_>],
        writes: &[View<'_>],
    ) -> Result<(), PtxError> {
        let args = kernel_args(&self.args);
        let k = PtxKernel {
            ptx: self.module,
            entry: &self.entry,
            grid: [self.grid.x, self.grid.y, self.grid.z],
            block: [self.block.x, self.block.y, self.block.z],
            shared_bytes: self.shared_bytes,
            args: &args,
        };
        stream
            .launch_ptx(self.entry.clone(), work, &k, reads, writes)
            .map_err(dev_err)
    }
}

/// Test support (`FPDT_FAKE_CUDA_INTERP=1`): on the fake driver of
/// `runtime/tests/fake_cuda`, kernels launched on the "GPU" run in this
/// crate's interpreter, over the fake's memory, so the whole cuda launch
/// path (argument checks, marshalling, `cuLaunchKernel`) runs without a
/// GPU. True when installed; false on a real driver, which it leaves alone.
pub fn install_interpreter_on_fake_driver() -> Result<bool, PtxError> {
    fpdt_runtime::cuda::fake::install_fake_executor(Box::new(|l| {
        let mut it = Interpreter::new(l.ptx).map_err(|e| e.to_string())?;
        for r in &l.regions {
            it.map_at(r.base, &r.bytes).map_err(|e| e.to_string())?;
        }
        let args: Vec<Arg> = l
            .args
            .iter()
            .map(|a| match *a {
                KernelArg::Ptr(v) | KernelArg::U64(v) => Arg::U64(v),
                KernelArg::U32(v) => Arg::U32(v),
                KernelArg::I32(v) => Arg::I32(v),
                KernelArg::F32(v) => Arg::F32(v),
            })
            .collect();
        let [gx, gy, gz] = l.grid;
        let [bx, by, bz] = l.block;
        it.launch(l.entry, (gx, gy, gz), (bx, by, bz), l.shared_bytes, &args)
            .map_err(|e| e.to_string())?;
        for r in &mut l.regions {
            r.bytes = it.read(r.base, r.bytes.len()).map_err(|e| e.to_string())?;
        }
        Ok(())
    }))
    .map_err(dev_err)
}

/// The process's GPU for kernel tests (made once: 1 GiB of device memory;
/// 64 MiB on the fake driver with the interpreter, which copies the region
/// for every launch).
fn test_device() -> Result<Device, PtxError> {
    static DEV: OnceLock<Result<Device, String>> = OnceLock::new();
    DEV.get_or_init(|| {
        let fake = std::env::var_os("FPDT_FAKE_CUDA_INTERP").is_some();
        if fake {
            match install_interpreter_on_fake_driver() {
                Ok(true) => {}
                Ok(false) => {
                    return Err(
                        "FPDT_FAKE_CUDA_INTERP is set but the loaded driver is not the fake".into(),
                    )
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Device::cuda_with(CudaConfig {
            device_memory: Some(if fake { 64 << 20 } else { 1 << 30 }),
            host_memory: if fake { 64 << 20 } else { 256 << 20 },
            ..CudaConfig::default()
        })
        .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(PtxError::Device)
}

/// Global memory on the GPU with the interpreter's surface: allocations by
/// address, kernels run to completion, reads back to the host.
pub struct GpuRunner {
    dev: Device,
    ptx: &'static str,
    bufs: Vec<DeviceBuffer>,
}

impl GpuRunner {
    /// A runner over the process's GPU; `ptx` is the default module for
    /// [`GpuRunner::launch`]. Fails (never panics) without a GPU.
    pub fn new(ptx: &'static str) -> Result<GpuRunner, PtxError> {
        Ok(GpuRunner {
            dev: test_device()?,
            ptx,
            bufs: Vec::new(),
        })
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    fn find(&self, addr: u64, len: usize) -> Result<(usize, usize), PtxError> {
        self.bufs
            .iter()
            .enumerate()
            .find_map(|(i, b)| {
                let base = b.view().addr() as u64;
                (addr >= base && addr + len as u64 <= base + b.len() as u64)
                    .then(|| (i, (addr - base) as usize))
            })
            .ok_or_else(|| {
                PtxError::Device(format!(
                    "0x{addr:x}..+{len} lies in no allocation of this runner"
                ))
            })
    }

    /// A new allocation holding `bytes`; returns its device address.
    pub fn alloc(&mut self, bytes: &[u8]) -> Result<u64, PtxError> {
        // Never empty: an empty allocation has no address to hand out.
        let b = if bytes.is_empty() {
            self.dev.upload(&[0u8; 4], "runner").map_err(dev_err)?
        } else {
            self.dev.upload(bytes, "runner").map_err(dev_err)?
        };
        let a = b.view().addr() as u64;
        self.bufs.push(b);
        Ok(a)
    }

    /// A new zeroed allocation.
    pub fn alloc_zeroed(&mut self, len: usize) -> Result<u64, PtxError> {
        self.alloc(&vec![0u8; len])
    }

    /// A new allocation holding `values`.
    pub fn alloc_slice<T: bytemuck::Pod>(&mut self, values: &[T]) -> Result<u64, PtxError> {
        self.alloc(bytemuck::cast_slice(values))
    }

    /// Overwrites device memory at `addr` (inside one allocation).
    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PtxError> {
        let (i, off) = self.find(addr, bytes.len())?;
        let v = self.bufs[i]
            .bytes(off..off + bytes.len())
            .map_err(dev_err)?;
        self.dev.write(v, bytes).map_err(dev_err)
    }

    /// Reads `len` bytes at `addr` (inside one allocation).
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, PtxError> {
        let (i, off) = self.find(addr, len)?;
        let v = self.bufs[i].bytes(off..off + len).map_err(dev_err)?;
        self.dev.download(v).map_err(dev_err)
    }

    /// Reads `n` values of a plain type.
    pub fn read_vec<T: bytemuck::Pod>(&self, addr: u64, n: usize) -> Result<Vec<T>, PtxError> {
        let b = self.read(addr, n * std::mem::size_of::<T>())?;
        Ok(b.chunks_exact(std::mem::size_of::<T>())
            .map(bytemuck::pod_read_unaligned)
            .collect())
    }

    /// Reads `n` f32 values.
    pub fn read_f32(&self, addr: u64, n: usize) -> Result<Vec<f32>, PtxError> {
        self.read_vec(addr, n)
    }

    /// Runs a launcher's kernel to completion (every allocation of the
    /// runner is declared written).
    pub fn run(&mut self, l: &KernelLaunch) -> Result<(), PtxError> {
        let views: Vec<View<'_>> = self.bufs.iter().map(|b| b.view()).collect();
        let s = self.dev.compute();
        l.enqueue(s, Work::kernel(0.0, 0), &[], &views)?;
        s.synchronize().map_err(dev_err)
    }

    /// Runs `entry` of the runner's module.
    pub fn launch(
        &mut self,
        entry: &str,
        grid: impl Into<crate::Dim3>,
        block: impl Into<crate::Dim3>,
        shared_bytes: u32,
        args: &[Arg],
    ) -> Result<(), PtxError> {
        let l = KernelLaunch {
            module: self.ptx,
            entry: entry.to_string(),
            grid: grid.into(),
            block: block.into(),
            shared_bytes,
            args: args.to_vec(),
        };
        self.run(&l)
    }
}

/// A kernel test's backend: the PTX interpreter (default) or the GPU
/// (`FPDT_PTX_BACKEND=cuda`; then a missing GPU is an error, not a skip).
pub enum Runner {
    /// The PTX interpreter, with its race and bounds checks.
    Interp(Box<Interpreter>),
    /// The cuda device.
    Gpu(GpuRunner),
}

/// Unwraps the interpreter's plain results and the runner's fallible ones
/// into one shape.
macro_rules! both {
    ($self:ident, $r:ident => $e:expr) => {
        match $self {
            Runner::Interp($r) => Ok($e),
            Runner::Gpu($r) => $e,
        }
    };
}

impl Runner {
    /// The backend `FPDT_PTX_BACKEND` names, over module `ptx`.
    pub fn new(ptx: &'static str) -> Result<Runner, PtxError> {
        match std::env::var("FPDT_PTX_BACKEND").as_deref() {
            Ok("cuda") => Ok(Runner::Gpu(GpuRunner::new(ptx)?)),
            Ok("interp") | Err(_) => Ok(Runner::Interp(Box::new(Interpreter::new(ptx)?))),
            Ok(other) => Err(PtxError::Device(format!(
                "FPDT_PTX_BACKEND = `{other}`: use `interp` or `cuda`"
            ))),
        }
    }

    /// Which backend this is.
    pub fn backend(&self) -> &'static str {
        match self {
            Runner::Interp(_) => "interp",
            Runner::Gpu(_) => "cuda",
        }
    }

    /// A new allocation holding `values`.
    pub fn alloc_slice<T: bytemuck::Pod>(&mut self, values: &[T]) -> Result<u64, PtxError> {
        both!(self, r => r.alloc_slice(values))
    }

    /// A new zeroed allocation.
    pub fn alloc_zeroed(&mut self, len: usize) -> Result<u64, PtxError> {
        both!(self, r => r.alloc_zeroed(len))
    }

    /// A new allocation holding `bytes`.
    pub fn alloc(&mut self, bytes: &[u8]) -> Result<u64, PtxError> {
        both!(self, r => r.alloc(bytes))
    }

    /// Overwrites memory at `addr`.
    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PtxError> {
        match self {
            Runner::Interp(r) => r.write(addr, bytes),
            Runner::Gpu(r) => r.write(addr, bytes),
        }
    }

    /// Reads `n` values of a plain type.
    pub fn read_vec<T: bytemuck::Pod>(&self, addr: u64, n: usize) -> Result<Vec<T>, PtxError> {
        match self {
            Runner::Interp(r) => r.read_vec(addr, n),
            Runner::Gpu(r) => r.read_vec(addr, n),
        }
    }

    /// Reads `n` f32 values.
    pub fn read_f32(&self, addr: u64, n: usize) -> Result<Vec<f32>, PtxError> {
        self.read_vec(addr, n)
    }

    /// Reads `len` bytes.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, PtxError> {
        match self {
            Runner::Interp(r) => r.read(addr, len),
            Runner::Gpu(r) => r.read(addr, len),
        }
    }

    /// Runs a launcher's kernel to completion.
    pub fn run(&mut self, l: &KernelLaunch) -> Result<(), PtxError> {
        match self {
            Runner::Interp(r) => {
                l.check_for_cuda()?;
                r.run(l).map(|_| ())
            }
            Runner::Gpu(r) => r.run(l),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_the_runner_says_why() {
        match GpuRunner::new(crate::kernels::RESIDUAL_ADD_PTX) {
            Ok(_) => eprintln!("a GPU is present: nothing to check here"),
            Err(e) => {
                let m = e.to_string();
                assert!(m.contains("cuda"), "{m}");
            }
        }
    }

    #[test]
    fn the_backend_variable_is_checked() {
        // Only the parse of the value is tested here (the variable is
        // process-wide; other tests read it).
        let r = Runner::new(crate::kernels::RESIDUAL_ADD_PTX).unwrap();
        let want = match std::env::var("FPDT_PTX_BACKEND").as_deref() {
            Ok("cuda") => "cuda",
            _ => "interp",
        };
        assert_eq!(r.backend(), want);
    }

    #[test]
    fn enqueue_on_meta_costs_the_launch() {
        let dev = Device::meta(fpdt_runtime::MetaConfig::default()).unwrap();
        // The first block too: meta addresses start above a nonzero base,
        // as launchers, which refuse a null pointer, need.
        let a = dev.alloc(4096, "a").unwrap();
        let b = dev.alloc(4096, "b").unwrap();
        let o = dev.alloc(4096, "o").unwrap();
        let l = crate::kernels::residual_add(
            1024,
            crate::cpu::DType::F32,
            o.view().addr() as u64,
            a.view().addr() as u64,
            b.view().addr() as u64,
        )
        .unwrap();
        l.enqueue(
            dev.compute(),
            Work::kernel(1024.0, 12288),
            &[a.view(), b.view()],
            &[o.view()],
        )
        .unwrap();
        let ev = dev.trace().events();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].name, "residual_add_f32");
    }
}

#[cfg(test)]
mod cuda_checks {
    use crate::cpu::DType;
    use crate::kernels;

    #[test]
    fn a_launch_with_a_wrong_argument_fails_the_cuda_check() {
        let mut l = kernels::residual_add(64, DType::F32, 256, 512, 768).unwrap();
        l.check_for_cuda().unwrap();
        l.args[3] = crate::Arg::F32(64.0);
        let e = l.check_for_cuda().unwrap_err().to_string();
        assert!(e.contains("argument 3"), "{e}");
        l.args.pop();
        let e = l.check_for_cuda().unwrap_err().to_string();
        assert!(e.contains("3 arguments given, the entry takes 4"), "{e}");
    }
}
