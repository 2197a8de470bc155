//! A PTX interpreter: runs the project's hand-written `.ptx` kernels on the
//! CPU, so that they are tested on every change without a GPU.
//!
//! ```
//! use fpdt_ptx::interp::Interpreter;
//! use fpdt_ptx::Arg;
//!
//! let ptx = r#"
//! .version 8.0
//! .target sm_80
//! .address_size 64
//! .visible .entry add_one(.param .u64 p, .param .u32 n)
//! {
//!     .reg .pred %p<2>;
//!     .reg .b32 %r<4>;
//!     .reg .f32 %f<2>;
//!     .reg .b64 %rd<4>;
//!     ld.param.u64 %rd1, [p];
//!     ld.param.u32 %r1, [n];
//!     mov.u32 %r2, %tid.x;
//!     setp.ge.u32 %p1, %r2, %r1;
//!     @%p1 bra DONE;
//!     mul.wide.u32 %rd2, %r2, 4;
//!     add.s64 %rd3, %rd1, %rd2;
//!     ld.global.f32 %f1, [%rd3];
//!     add.f32 %f1, %f1, 0f3F800000;
//!     st.global.f32 [%rd3], %f1;
//! DONE:
//!     ret;
//! }
//! "#;
//! let mut it = Interpreter::new(ptx)?;
//! let x = it.alloc(bytemuck::cast_slice(&[1.0f32, 2.0, 3.0]));
//! let stats = it.launch("add_one", 1, 32, 0, &[Arg::Ptr(x), Arg::U32(3)])?;
//! assert_eq!(it.read_f32(x, 3)?, vec![2.0, 3.0, 4.0]);
//! assert!(stats.instructions > 0);
//! # Ok::<(), fpdt_ptx::PtxError>(())
//! ```
//!
//! # What it models
//! - **Warps** of 32 lanes in lockstep with per-lane predicates. A warp runs
//!   the group of its lanes at the lowest program counter; lanes that diverge
//!   at a branch run one side after the other and reconverge where their
//!   program counters meet (min-PC scheduling, which reconverges at the
//!   immediate post-dominator of structured code).
//! - **Blocks** of several warps: each warp runs until all its live lanes
//!   wait at a barrier (`bar.sync` / `barrier.sync`, ids 0..16, optional
//!   thread count, `bar.arrive`) or have exited; then complete barriers
//!   release. The **grid** runs block by block.
//! - **Memory**: global memory of allocations made with [`Interpreter::alloc`]
//!   (256-byte aligned, with gaps between them), the block's shared memory
//!   (static `.shared` variables, then the `.extern .shared` dynamic window),
//!   `.param` space, and generic addresses (`cvta.shared` maps shared memory
//!   into a window of the generic space).
//! - **Instructions**: ld/st/ldu (global, shared, param, generic; `.v2`,
//!   `.v4`; cache modifiers ignored), mov (with packing/unpacking of
//!   vectors), cvta, isspacep; integer add/sub/mul(.lo/.hi/.wide)/mad/div/
//!   rem/min/max/neg/abs, and/or/xor/not/cnot, shl/shr, popc/clz/brev/bfind/
//!   bfe/prmt/shf, selp; f32 add/sub/mul/fma/mad (`.rn/.rz/.rm/.rp`, `.ftz`,
//!   `.sat`), div (`.rn/.approx/.full`), rcp, sqrt, rsqrt, ex2, lg2, sin, cos,
//!   tanh, min/max (`.NaN`), neg/abs/copysign, testp; f64 arithmetic (round
//!   to nearest); f16/bf16 and their x2 forms (add/sub/mul/fma/min/max/neg/
//!   abs/ex2); setp (all comparisons, `.and/.or/.xor`, two destinations);
//!   cvt between integers, f16, bf16, f32, f64 (`.rn/.rz/.rm/.rp`,
//!   `.rni/.rzi/.rmi/.rpi`, `.sat`, `.ftz`, `.relu`, `.satfinite`) and the
//!   packing `cvt.rn.{f16x2,bf16x2}.f32`; bra/ret/exit/trap; the special
//!   registers (`%tid`, `%ntid`, `%ctaid`, `%nctaid`, `%laneid`, `%warpid`,
//!   `%lanemask_*`, ...); shfl.sync (up, down, bfly, idx, with the clamp and
//!   segment mask of operand c), vote(.sync) all/any/uni/ballot, activemask,
//!   redux.sync, bar.warp.sync; atom/red (add, min, max, and, or, xor, exch,
//!   cas, inc, dec) on global and shared; cp.async (`.ca/.cg`, src-size,
//!   ignore-src) with commit_group / wait_group / wait_all; ldmatrix (m8n8
//!   x1/x2/x4, `.trans`); mma.sync.aligned m16n8k16 and m16n8k8 with f16 or
//!   bf16 inputs and f32 (or f16) accumulators in the fragment layouts of the
//!   PTX ISA; membar/fence/prefetch as no-ops.
//!
//! # Checks
//! Each stops the launch with [`PtxError::Exec`], which names the kernel,
//! the instruction's line, the block and the thread, and a [`Fault`]:
//! out-of-bounds or misaligned global/shared/param accesses (an access must
//! lie in one allocation), reads of shared memory not written in this block,
//! shared-memory races (two warps touching the same byte between two
//! barriers, at least one of them writing; atomics excepted), barriers that
//! only part of a block reaches (a thread exited or waits elsewhere),
//! warp-collective instructions (`shfl.sync`, `vote.sync`, `ldmatrix`,
//! `mma`) whose member lanes do not all execute them, and an instruction
//! limit against endless loops. Lanes of one warp are treated as ordered
//! (lockstep), so intra-warp communication through shared memory needs no
//! barrier here; cp.async data lands in shared memory when its group is
//! waited for, so reading it before `cp.async.wait_group` is reported.
//!
//! # Speed
//! Modules are decoded once into a compact form: operands are register
//! indices (immediates become constant registers, special registers are
//! registers set at block start), arithmetic is a function pointer chosen
//! by type and modifiers, branch targets are instruction indices. Registers
//! are per-warp arrays of `[u64; 32]`. See `benches/interp.rs`.
//!
//! # Why a hand-written parser
//! The `ptx-syntax` crate (0.5, successor of the deprecated `ptx-90-parser`)
//! was evaluated first. It does not fit: it is edition 2024 (needs Rust
//! 1.85, above this workspace's `rust-version` 1.80), it is about 126k lines
//! with `clap`, `serde_json`, `logos` and proc macros as library
//! dependencies (slow builds on small CI machines), and its AST has one type
//! per instruction variant of the whole PTX 9 ISA, which would still have to
//! be lowered case by case into the form executed here. The subset our
//! kernels use needs a few hundred lines of lexer and parser
//! ([`lexer`](self), [`parser`](self)), with errors that name the line.

mod decode;
mod exec;
mod lexer;
mod ops;
mod parser;

use std::fmt;

use crate::launch::{Arg, Dim3, KernelLaunch};
use crate::PtxError;

pub use exec::GLOBAL_BASE;

/// Which check stopped a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// A global, shared or param access outside its memory or allocation.
    OutOfBounds,
    /// An access not aligned to its size.
    Misaligned,
    /// A read of shared memory that no thread of the block wrote.
    UninitializedShared,
    /// Two warps accessed the same shared byte between barriers, one writing.
    SharedRace,
    /// A barrier that only part of the block reached.
    PartialBarrier,
    /// A warp-collective instruction whose member lanes do not all execute it.
    Divergence,
    /// `trap`.
    Trap,
    /// More warp instructions than the limit (an endless loop?).
    Limit,
    /// An operation that is invalid at run time (bad barrier id, ...).
    Invalid,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::OutOfBounds => "out-of-bounds access",
            Fault::Misaligned => "misaligned access",
            Fault::UninitializedShared => "uninitialized shared-memory read",
            Fault::SharedRace => "shared-memory race",
            Fault::PartialBarrier => "partial barrier",
            Fault::Divergence => "warp not converged",
            Fault::Trap => "trap",
            Fault::Limit => "instruction limit",
            Fault::Invalid => "invalid operation",
        })
    }
}

/// What a launch executed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaunchStats {
    /// Warp instructions issued (one per instruction per lane group).
    pub instructions: u64,
    /// Thread instructions: lanes that executed an instruction (guard true).
    pub thread_instructions: u64,
    /// Warps run.
    pub warps: u64,
    /// Blocks run.
    pub blocks: u64,
}

/// A parsed module, simulated global memory, and launches over both.
#[derive(Debug)]
pub struct Interpreter {
    source: String,
    kernels: Vec<decode::Kernel>,
    /// Other modules met by [`Interpreter::run`], by text.
    others: Vec<(String, Vec<decode::Kernel>)>,
    global: exec::Global,
    checks: bool,
    limit: u64,
}

fn parse_module(text: &str) -> Result<Vec<decode::Kernel>, PtxError> {
    let m = parser::parse(text)?;
    decode::decode_module(&m)
}

impl Interpreter {
    /// Parses and decodes a module; an error names the line.
    pub fn new(ptx: &str) -> Result<Interpreter, PtxError> {
        Ok(Interpreter {
            source: ptx.to_string(),
            kernels: parse_module(ptx)?,
            others: Vec::new(),
            global: exec::Global::default(),
            checks: true,
            limit: 1 << 32,
        })
    }

    /// Names of the module's entries.
    pub fn entries(&self) -> Vec<&str> {
        self.kernels.iter().map(|k| k.name.as_str()).collect()
    }

    /// Turns the memory checks (uninitialized shared reads, races) on or
    /// off; bounds and alignment are always checked. On by default.
    pub fn set_checks(&mut self, on: bool) {
        self.checks = on;
    }

    /// Most warp instructions one launch may execute (default 2^32).
    pub fn set_instruction_limit(&mut self, n: u64) {
        self.limit = n;
    }

    /// Copies `bytes` into a new allocation of global memory; returns its
    /// device address (256-byte aligned, nonzero).
    pub fn alloc(&mut self, bytes: &[u8]) -> u64 {
        let a = self.global.alloc(bytes.len());
        if let Ok(o) = self.global.find(a, bytes.len() as u64) {
            self.global.bytes_mut(o, bytes.len()).copy_from_slice(bytes);
        }
        a
    }

    /// Copies `bytes` into a new allocation at device address `addr` (for
    /// running kernels over memory that lives elsewhere, as a fake driver
    /// does); it must not overlap another allocation.
    pub fn map_at(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PtxError> {
        let o = self
            .global
            .map_at(addr, bytes.len())
            .map_err(|m| PtxError::Interp(format!("map_at: {m}")))?;
        self.global.bytes_mut(o, bytes.len()).copy_from_slice(bytes);
        Ok(())
    }

    /// Frees every allocation of global memory.
    pub fn clear_memory(&mut self) {
        self.global = exec::Global::default();
    }

    /// A new zeroed allocation of `len` bytes.
    pub fn alloc_zeroed(&mut self, len: usize) -> u64 {
        self.global.alloc(len)
    }

    /// A new allocation holding `values` (f32, u32, bf16, ... as bytes).
    pub fn alloc_slice<T: bytemuck::Pod>(&mut self, values: &[T]) -> u64 {
        self.alloc(bytemuck::cast_slice(values))
    }

    /// Overwrites global memory at `addr`; the range must lie in one allocation.
    pub fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PtxError> {
        let o = self
            .global
            .find(addr, bytes.len() as u64)
            .map_err(|m| PtxError::Interp(format!("write: {m}")))?;
        self.global.bytes_mut(o, bytes.len()).copy_from_slice(bytes);
        Ok(())
    }

    /// Reads `len` bytes of global memory; the range must lie in one allocation.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, PtxError> {
        exec_find(&self.global, addr, len)
    }

    /// Reads `n` f32 values.
    pub fn read_f32(&self, addr: u64, n: usize) -> Result<Vec<f32>, PtxError> {
        self.read_vec(addr, n)
    }

    /// Reads `n` values of a plain type.
    pub fn read_vec<T: bytemuck::Pod>(&self, addr: u64, n: usize) -> Result<Vec<T>, PtxError> {
        let b = self.read(addr, n * std::mem::size_of::<T>())?;
        Ok(b.chunks_exact(std::mem::size_of::<T>())
            .map(bytemuck::pod_read_unaligned)
            .collect())
    }

    /// Runs `entry` over `grid` blocks of `block` threads with `shared_bytes`
    /// of dynamic shared memory, to completion.
    pub fn launch(
        &mut self,
        entry: &str,
        grid: impl Into<Dim3>,
        block: impl Into<Dim3>,
        shared_bytes: u32,
        args: &[Arg],
    ) -> Result<LaunchStats, PtxError> {
        let k = self
            .kernels
            .iter()
            .find(|k| k.name == entry)
            .ok_or_else(|| {
                PtxError::Interp(format!(
                    "no entry `{entry}` in the module (it has: {})",
                    self.entries().join(", ")
                ))
            })?;
        run_kernel(
            k,
            &mut self.global,
            grid.into(),
            block.into(),
            shared_bytes,
            args,
            self.checks,
            self.limit,
        )
    }

    /// Runs a launcher's [`KernelLaunch`]; its module is this interpreter's
    /// or is parsed (once) and kept.
    pub fn run(&mut self, l: &KernelLaunch) -> Result<LaunchStats, PtxError> {
        if l.module != self.source {
            if !self.others.iter().any(|(t, _)| t == l.module) {
                let ks = parse_module(l.module)?;
                self.others.push((l.module.to_string(), ks));
            }
            let ks = self
                .others
                .iter()
                .find(|(t, _)| t == l.module)
                .map(|(_, k)| k);
            let k = ks
                .and_then(|ks| ks.iter().find(|k| k.name == l.entry))
                .ok_or_else(|| {
                    PtxError::Interp(format!("no entry `{}` in the launch's module", l.entry))
                })?;
            return run_kernel(
                k,
                &mut self.global,
                l.grid,
                l.block,
                l.shared_bytes,
                &l.args,
                self.checks,
                self.limit,
            );
        }
        self.launch(&l.entry, l.grid, l.block, l.shared_bytes, &l.args)
    }
}

fn exec_find(g: &exec::Global, addr: u64, len: usize) -> Result<Vec<u8>, PtxError> {
    let o = g
        .find_ro(addr, len as u64)
        .map_err(|m| PtxError::Interp(format!("read: {m}")))?;
    Ok(g.bytes(o, len).to_vec())
}

#[allow(clippy::too_many_arguments)]
fn run_kernel(
    k: &decode::Kernel,
    global: &mut exec::Global,
    grid: Dim3,
    block: Dim3,
    shared_bytes: u32,
    args: &[Arg],
    checks: bool,
    limit: u64,
) -> Result<LaunchStats, PtxError> {
    let bad = |m: String| Err(PtxError::Interp(format!("{}: {m}", k.name)));
    if grid.count() == 0 || block.count() == 0 {
        return bad(format!("empty launch: grid {grid:?}, block {block:?}"));
    }
    if block.count() > 1024 || block.z > 64 {
        return bad(format!(
            "block {block:?} has more than 1024 threads or z > 64"
        ));
    }
    if args.len() != k.params.len() {
        return bad(format!(
            "takes {} parameters, {} given",
            k.params.len(),
            args.len()
        ));
    }
    let mut params = vec![0u8; k.param_bytes as usize];
    for (i, (a, p)) in args.iter().zip(&k.params).enumerate() {
        let ok = match a {
            Arg::Ptr(_) | Arg::U64(_) => p.size == 8 && p.ty != ".f32",
            Arg::U32(_) | Arg::I32(_) => p.size == 4 && p.ty != ".f32",
            Arg::F32(_) => p.size == 4 && (p.ty == ".f32" || p.ty == ".b32"),
        };
        if !ok {
            return bad(format!(
                "parameter {i} `{}` is {} ({} bytes), given {a:?}",
                p.name, p.ty, p.size
            ));
        }
        let b = a.to_le_bytes();
        let o = p.offset as usize;
        params[o..o + b.len()].copy_from_slice(&b);
    }
    let cfg = exec::LaunchCfg {
        grid,
        block,
        dyn_shared: shared_bytes,
        checks,
        limit,
    };
    exec::launch(k, global, &params, &cfg)
}
