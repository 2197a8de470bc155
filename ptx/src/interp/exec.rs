//! Execution: the grid block by block, a block's warps each run until all
//! their live lanes wait at a barrier or have exited, then barriers release.
//! A warp executes one instruction for the group of lanes at the lowest
//! program counter (min-PC scheduling): lanes that diverge at a branch run
//! separately and reconverge where their program counters meet again, which
//! is the immediate post-dominator for structured code (if/else, loops with
//! early exits). Memory: simulated global memory (allocations with guard
//! gaps), the block's shared memory with a shadow per byte for the checks,
//! and the parameter buffer.

use super::decode::{Inst, Kernel, Op, Space, NO_REG, SHARED_WINDOW, SHARED_WINDOW_SIZE, SINK};
use super::ops::{self, Fmt, Rnd};
use super::{Fault, LaunchStats};
use crate::launch::Dim3;
use crate::PtxError;

/// Base device address of simulated global memory.
pub const GLOBAL_BASE: u64 = 0x1_0000_0000;
/// Bytes left unallocated after every allocation, so that running off its end
/// does not land in the next one.
const GUARD: u64 = 256;
/// The largest shared memory of a block (sm_90: 227 KiB).
pub(crate) const MAX_SHARED: u64 = 227 * 1024;
const FULL: u32 = u32::MAX;
const NO_BAR: u8 = u8::MAX;
const NBARS: usize = 16;

/// Simulated global memory: one byte vector; allocations at 256-byte
/// aligned offsets from [`GLOBAL_BASE`] with gaps between them, or mapped
/// at addresses of the caller's choosing ([`Global::map_at`]).
#[derive(Debug, Default)]
pub(crate) struct Global {
    data: Vec<u8>,
    /// (device address, length, offset in `data`), sorted by address.
    allocs: Vec<(u64, u64, usize)>,
    last: usize,
}

impl Global {
    fn next_offset(&self) -> u64 {
        (self.data.len() as u64 + GUARD).div_ceil(256) * 256
    }

    pub(crate) fn alloc(&mut self, len: usize) -> u64 {
        let start = self.next_offset();
        self.data.resize((start + len as u64) as usize, 0);
        // Above every mapped range too, so the table stays sorted.
        let top = self
            .allocs
            .last()
            .map_or(0, |a| (a.0 + a.1 + GUARD).div_ceil(256) * 256);
        let addr = (GLOBAL_BASE + start).max(top);
        self.allocs.push((addr, len as u64, start as usize));
        addr
    }

    /// A new allocation of `len` bytes at device address `addr`, which
    /// must not overlap another.
    pub(crate) fn map_at(&mut self, addr: u64, len: usize) -> Result<usize, String> {
        let end = addr
            .checked_add(len as u64)
            .ok_or_else(|| format!("{len} bytes at {addr:#x} overflow the address space"))?;
        let i = self.allocs.partition_point(|a| a.0 < addr);
        let before = i.checked_sub(1).and_then(|j| self.allocs.get(j));
        if before.is_some_and(|a| a.0 + a.1 > addr) || self.allocs.get(i).is_some_and(|a| a.0 < end)
        {
            return Err(format!(
                "{len} bytes at {addr:#x} overlap an allocation already there"
            ));
        }
        let start = self.next_offset() as usize;
        self.data.resize(start + len, 0);
        self.allocs.insert(i, (addr, len as u64, start));
        self.last = 0;
        Ok(start)
    }

    /// Index of the allocation holding `[addr, addr + len)`.
    fn locate(&self, addr: u64, len: u64) -> Result<usize, String> {
        let i = self.allocs.partition_point(|a| a.0 <= addr);
        if i > 0 {
            if let Some(a) = self.allocs.get(i - 1) {
                if addr.checked_add(len).is_some_and(|e| e <= a.0 + a.1) {
                    return Ok(i - 1);
                }
                if addr < a.0 + a.1 + GUARD {
                    return Err(format!(
                        "{len} bytes at {addr:#x} run past the end of the allocation {:#x}..{:#x} ({} bytes) by {} bytes",
                        a.0,
                        a.0 + a.1,
                        a.1,
                        addr.saturating_add(len) - (a.0 + a.1)
                    ));
                }
            }
        }
        if let Some(a) = self.allocs.get(i) {
            if addr.saturating_add(len) > a.0 && addr < a.0 {
                return Err(format!(
                    "{len} bytes at {addr:#x} start {} bytes before the allocation at {:#x}",
                    a.0 - addr,
                    a.0
                ));
            }
        }
        Err(format!(
            "{len} bytes at {addr:#x} are not in any allocation"
        ))
    }

    /// Offset into `data` of `[addr, addr + len)`, which must lie in one
    /// allocation (without updating the lookup cache).
    pub(crate) fn find_ro(&self, addr: u64, len: u64) -> Result<usize, String> {
        let a = self.allocs[self.locate(addr, len)?];
        Ok(a.2 + (addr - a.0) as usize)
    }

    /// Offset into `data` of `[addr, addr + len)`, which must lie in one
    /// allocation.
    #[inline]
    pub(crate) fn find(&mut self, addr: u64, len: u64) -> Result<usize, String> {
        if let Some(a) = self.allocs.get(self.last) {
            if addr >= a.0 && addr.checked_add(len).is_some_and(|e| e <= a.0 + a.1) {
                return Ok(a.2 + (addr - a.0) as usize);
            }
        }
        let i = self.locate(addr, len)?;
        self.last = i;
        let a = self.allocs[i];
        Ok(a.2 + (addr - a.0) as usize)
    }

    pub(crate) fn bytes(&self, off: usize, len: usize) -> &[u8] {
        &self.data[off..off + len]
    }

    pub(crate) fn bytes_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        &mut self.data[off..off + len]
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Shadow {
    /// Block serial that last wrote the byte (initialization).
    init: u32,
    w_epoch: u32,
    w_tid: u32,
    w_line: u32,
    r_epoch: u32,
    r_tid: u32,
    r_line: u32,
    r_multi: bool,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    dst: u32,
    len: u8,
    data: [u8; 16],
    line: u32,
    group: u32,
}

#[derive(Debug, Default, Clone)]
struct ThreadAsync {
    open: u32,
    copies: std::collections::VecDeque<Pending>,
}

/// Memory as one thread sees it, with the checks.
struct Mem<'a> {
    global: &'a mut Global,
    params: &'a [u8],
    shared: Vec<u8>,
    shadow: Vec<Shadow>,
    checks: bool,
    epoch: u32,
    serial: u32,
    bdim: Dim3,
}

type MemErr = (Fault, String);

fn tid3(bdim: Dim3, t: u32) -> Dim3 {
    let x = bdim.x.max(1);
    let y = bdim.y.max(1);
    Dim3::new(t % x, (t / x) % y, t / (x * y))
}

fn show_tid(bdim: Dim3, t: u32) -> String {
    let d = tid3(bdim, t);
    format!("({},{},{})", d.x, d.y, d.z)
}

impl Mem<'_> {
    fn sh_range(&self, off: u64, len: u64) -> Result<usize, MemErr> {
        if off
            .checked_add(len)
            .is_none_or(|e| e > self.shared.len() as u64)
        {
            return Err((
                Fault::OutOfBounds,
                format!(
                    "{len} bytes at shared address {off:#x} are outside the block's {} bytes of shared memory",
                    self.shared.len()
                ),
            ));
        }
        Ok(off as usize)
    }

    fn sh_read_check(
        &mut self,
        off: usize,
        len: usize,
        tid: u32,
        line: u32,
        atomic: bool,
    ) -> Result<(), MemErr> {
        if !self.checks {
            return Ok(());
        }
        let (epoch, serial, bdim) = (self.epoch, self.serial, self.bdim);
        for i in off..off + len {
            let s = &mut self.shadow[i];
            if s.init != serial {
                return Err((
                    Fault::UninitializedShared,
                    format!("read of {len} bytes at shared address {off:#x}: byte {i:#x} was not written in this block"),
                ));
            }
            if atomic {
                continue;
            }
            if s.w_epoch == epoch && s.w_tid / 32 != tid / 32 {
                return Err((
                    Fault::SharedRace,
                    format!(
                        "read of shared address {i:#x} races with its write by thread {} at line {} (no barrier between)",
                        show_tid(bdim, s.w_tid),
                        s.w_line
                    ),
                ));
            }
            if s.r_epoch != epoch {
                s.r_epoch = epoch;
                s.r_tid = tid;
                s.r_line = line;
                s.r_multi = false;
            } else if s.r_tid / 32 != tid / 32 {
                s.r_multi = true;
            }
        }
        Ok(())
    }

    fn sh_write_check(
        &mut self,
        off: usize,
        len: usize,
        tid: u32,
        line: u32,
        atomic: bool,
    ) -> Result<(), MemErr> {
        if !self.checks {
            return Ok(());
        }
        let (epoch, serial, bdim) = (self.epoch, self.serial, self.bdim);
        for i in off..off + len {
            let s = &mut self.shadow[i];
            if !atomic {
                if s.w_epoch == epoch && s.w_tid / 32 != tid / 32 {
                    return Err((
                        Fault::SharedRace,
                        format!(
                            "write of shared address {i:#x} races with its write by thread {} at line {} (no barrier between)",
                            show_tid(bdim, s.w_tid),
                            s.w_line
                        ),
                    ));
                }
                if s.r_epoch == epoch && (s.r_tid / 32 != tid / 32 || s.r_multi) {
                    return Err((
                        Fault::SharedRace,
                        format!(
                            "write of shared address {i:#x} races with its read by thread {} at line {} (no barrier between)",
                            show_tid(bdim, s.r_tid),
                            s.r_line
                        ),
                    ));
                }
                s.w_epoch = epoch;
                s.w_tid = tid;
                s.w_line = line;
            }
            s.init = serial;
        }
        Ok(())
    }

    /// Resolves an address of `space` to (is_shared, offset), with bounds
    /// and alignment checked.
    fn resolve(
        &mut self,
        space: Space,
        addr: u64,
        len: u64,
        align: u64,
    ) -> Result<(Space, usize), MemErr> {
        if align > 1 && addr % align != 0 {
            return Err((
                Fault::Misaligned,
                format!("{len}-byte access at {addr:#x} is not {align}-byte aligned"),
            ));
        }
        match space {
            Space::Param => {
                if addr
                    .checked_add(len)
                    .is_none_or(|e| e > self.params.len() as u64)
                {
                    return Err((
                        Fault::OutOfBounds,
                        format!("param access at offset {addr} of {len} bytes is outside the {} parameter bytes", self.params.len()),
                    ));
                }
                Ok((Space::Param, addr as usize))
            }
            Space::Shared => Ok((Space::Shared, self.sh_range(addr, len)?)),
            Space::Global => Ok((
                Space::Global,
                self.global
                    .find(addr, len)
                    .map_err(|m| (Fault::OutOfBounds, m))?,
            )),
            Space::Generic => {
                if (SHARED_WINDOW..SHARED_WINDOW + SHARED_WINDOW_SIZE).contains(&addr) {
                    Ok((Space::Shared, self.sh_range(addr - SHARED_WINDOW, len)?))
                } else {
                    Ok((
                        Space::Global,
                        self.global
                            .find(addr, len)
                            .map_err(|m| (Fault::OutOfBounds, m))?,
                    ))
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn load(
        &mut self,
        space: Space,
        addr: u64,
        size: usize,
        n: usize,
        tid: u32,
        line: u32,
        out: &mut [u64; 4],
    ) -> Result<(), MemErr> {
        let total = size * n;
        let (sp, off) = self.resolve(space, addr, total as u64, total as u64)?;
        let bytes: &[u8] = match sp {
            Space::Param => &self.params[off..off + total],
            Space::Shared => {
                self.sh_read_check(off, total, tid, line, false)?;
                &self.shared[off..off + total]
            }
            _ => self.global.bytes(off, total),
        };
        for (j, o) in out.iter_mut().enumerate().take(n) {
            let mut v = [0u8; 8];
            v[..size].copy_from_slice(&bytes[j * size..(j + 1) * size]);
            *o = u64::from_le_bytes(v);
        }
        Ok(())
    }

    fn store(
        &mut self,
        space: Space,
        addr: u64,
        size: usize,
        vals: &[u64],
        tid: u32,
        line: u32,
    ) -> Result<(), MemErr> {
        let total = size * vals.len();
        let (sp, off) = self.resolve(space, addr, total as u64, total as u64)?;
        let bytes: &mut [u8] = match sp {
            Space::Param => return Err((Fault::Invalid, "store to .param space".into())),
            Space::Shared => {
                self.sh_write_check(off, total, tid, line, false)?;
                &mut self.shared[off..off + total]
            }
            _ => self.global.bytes_mut(off, total),
        };
        for (j, v) in vals.iter().enumerate() {
            bytes[j * size..(j + 1) * size].copy_from_slice(&v.to_le_bytes()[..size]);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn atomic(
        &mut self,
        space: Space,
        addr: u64,
        size: usize,
        f: super::decode::F3,
        b: u64,
        c: u64,
        tid: u32,
        line: u32,
    ) -> Result<u64, MemErr> {
        let (sp, off) = self.resolve(space, addr, size as u64, size as u64)?;
        let bytes: &mut [u8] = match sp {
            Space::Param => return Err((Fault::Invalid, "atomic on .param space".into())),
            Space::Shared => {
                self.sh_read_check(off, size, tid, line, true)?;
                self.sh_write_check(off, size, tid, line, true)?;
                &mut self.shared[off..off + size]
            }
            _ => self.global.bytes_mut(off, size),
        };
        let mut v = [0u8; 8];
        v[..size].copy_from_slice(bytes);
        let old = u64::from_le_bytes(v);
        let new = f(old, b, c);
        bytes.copy_from_slice(&new.to_le_bytes()[..size]);
        Ok(old)
    }

    fn complete_async(
        &mut self,
        ta: &mut ThreadAsync,
        upto_group: u32,
        tid: u32,
    ) -> Result<(), (Fault, String, u32)> {
        while let Some(p) = ta.copies.front() {
            if p.group >= upto_group {
                break;
            }
            let p = *p;
            ta.copies.pop_front();
            let off = p.dst as usize;
            let len = usize::from(p.len);
            self.sh_write_check(off, len, tid, p.line, false)
                .map_err(|(f, m)| (f, m, p.line))?;
            self.shared[off..off + len].copy_from_slice(&p.data[..len]);
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Warp {
    pcs: [u32; 32],
    live: u32,
    blocked: u32,
    cur_pc: u32,
    cur_mask: u32,
    exit_line: [u32; 32],
    bar_wait: [u8; 32],
    bar_line: [u32; 32],
}

impl Warp {
    fn new(live: u32) -> Warp {
        Warp {
            pcs: [0; 32],
            live,
            blocked: 0,
            cur_pc: 0,
            cur_mask: live,
            exit_line: [0; 32],
            bar_wait: [NO_BAR; 32],
            bar_line: [0; 32],
        }
    }

    /// Picks the lanes at the lowest program counter; false if none can run.
    fn regroup(&mut self) -> bool {
        let run = self.live & !self.blocked;
        if run == 0 {
            self.cur_mask = 0;
            return false;
        }
        let mut min = u32::MAX;
        for l in Lanes(run) {
            min = min.min(self.pcs[l]);
        }
        let mut m = 0;
        for l in Lanes(run) {
            if self.pcs[l] == min {
                m |= 1 << l;
            }
        }
        self.cur_pc = min;
        self.cur_mask = m;
        true
    }

    #[inline]
    fn advance(&mut self) {
        self.cur_pc += 1;
        let others = self.live & !self.blocked & !self.cur_mask;
        if others != 0 {
            for l in Lanes(others) {
                if self.pcs[l] == self.cur_pc {
                    self.cur_mask |= 1 << l;
                }
            }
        }
    }

    fn branch(&mut self, taken: u32, target: u32) {
        if taken == 0 {
            self.advance();
            return;
        }
        let group = self.cur_mask;
        let stay = group & !taken;
        let others = self.live & !self.blocked & !group;
        if stay == 0 && others == 0 {
            self.cur_pc = target;
            return;
        }
        for l in Lanes(taken) {
            self.pcs[l] = target;
        }
        for l in Lanes(stay) {
            self.pcs[l] = self.cur_pc + 1;
        }
        self.regroup();
    }

    /// Removes `m` from the current group (they are parked elsewhere),
    /// the rest of the group moves on.
    fn park(&mut self, m: u32) {
        self.cur_mask &= !m;
        if self.cur_mask != 0 {
            self.advance();
        }
    }
}

/// Iterator over set bits of a lane mask.
struct Lanes(u32);

impl Iterator for Lanes {
    type Item = usize;
    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            None
        } else {
            let l = self.0.trailing_zeros();
            self.0 &= self.0 - 1;
            Some(l as usize)
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bar {
    expected: Option<u32>,
    extra: u32,
}

/// What a launch needs beyond the kernel.
pub(crate) struct LaunchCfg {
    pub grid: Dim3,
    pub block: Dim3,
    pub dyn_shared: u32,
    pub checks: bool,
    pub limit: u64,
}

struct Ctx<'a> {
    k: &'a Kernel,
    mem: Mem<'a>,
    ctaid: Dim3,
    nthreads: u32,
    asyncs: Vec<ThreadAsync>,
    bars: [Bar; NBARS],
    stats: LaunchStats,
    limit: u64,
}

impl Ctx<'_> {
    fn fault(&self, w: usize, lane: usize, line: u32, fault: Fault, message: String) -> PtxError {
        PtxError::Exec {
            kernel: self.k.name.clone(),
            line: line as usize,
            block: self.ctaid,
            thread: tid3(self.mem.bdim, (w * 32 + lane) as u32),
            fault,
            message,
        }
    }
}

/// Runs `k` over the grid.
pub(crate) fn launch(
    k: &Kernel,
    global: &mut Global,
    params: &[u8],
    cfg: &LaunchCfg,
) -> Result<LaunchStats, PtxError> {
    let nthreads = cfg.block.count();
    let total_shared = if cfg.dyn_shared > 0 {
        u64::from(k.dyn_offset) + u64::from(cfg.dyn_shared)
    } else {
        u64::from(k.static_shared)
    };
    if total_shared > MAX_SHARED {
        return Err(PtxError::Interp(format!(
            "{}: {total_shared} bytes of shared memory ({} static + {} dynamic) exceed the {MAX_SHARED} bytes of a block",
            k.name, k.dyn_offset, cfg.dyn_shared
        )));
    }
    let nwarps = nthreads.div_ceil(32) as usize;
    let nregs = k.nregs as usize;
    let mut ctx = Ctx {
        k,
        mem: Mem {
            global,
            params,
            shared: vec![0; total_shared as usize],
            shadow: vec![Shadow::default(); if cfg.checks { total_shared as usize } else { 0 }],
            checks: cfg.checks,
            epoch: 0,
            serial: 0,
            bdim: cfg.block,
        },
        ctaid: Dim3::new(0, 0, 0),
        nthreads: nthreads as u32,
        asyncs: vec![ThreadAsync::default(); nthreads as usize],
        bars: [Bar::default(); NBARS],
        stats: LaunchStats::default(),
        limit: cfg.limit,
    };
    let mut regs = vec![0u64; nwarps * nregs * 32];
    let mut warps: Vec<Warp> = Vec::with_capacity(nwarps);
    for bz in 0..cfg.grid.z {
        for by in 0..cfg.grid.y {
            for bx in 0..cfg.grid.x {
                ctx.ctaid = Dim3::new(bx, by, bz);
                ctx.mem.serial += 1;
                ctx.mem.epoch += 1;
                ctx.bars = [Bar::default(); NBARS];
                for a in &mut ctx.asyncs {
                    a.open = 0;
                    a.copies.clear();
                }
                warps.clear();
                regs.fill(0);
                for w in 0..nwarps {
                    let n = (nthreads as usize - w * 32).min(32);
                    let live = if n == 32 { FULL } else { (1u32 << n) - 1 };
                    warps.push(Warp::new(live));
                    init_regs(
                        &mut regs[w * nregs * 32..(w + 1) * nregs * 32],
                        k,
                        cfg,
                        ctx.ctaid,
                        w,
                        nwarps,
                        total_shared,
                    );
                }
                run_block(&mut ctx, &mut warps, &mut regs, nregs)?;
                ctx.stats.blocks += 1;
                ctx.stats.warps += nwarps as u64;
            }
        }
    }
    Ok(ctx.stats)
}

fn init_regs(
    rf: &mut [u64],
    k: &Kernel,
    cfg: &LaunchCfg,
    ctaid: Dim3,
    w: usize,
    nwarps: usize,
    total_shared: u64,
) {
    let b = cfg.block;
    let g = cfg.grid;
    for lane in 0..32usize {
        let t = (w * 32 + lane) as u32;
        let tid = tid3(b, t);
        let lm = 1u64 << lane;
        let vals: [u64; 27] = [
            u64::from(tid.x),
            u64::from(tid.y),
            u64::from(tid.z),
            u64::from(b.x),
            u64::from(b.y),
            u64::from(b.z),
            u64::from(ctaid.x),
            u64::from(ctaid.y),
            u64::from(ctaid.z),
            u64::from(g.x),
            u64::from(g.y),
            u64::from(g.z),
            lane as u64,
            w as u64,
            nwarps as u64,
            lm,
            (lm << 1).wrapping_sub(1) & 0xffff_ffff,
            lm - 1,
            !(lm - 1) & 0xffff_ffff,
            !((lm << 1).wrapping_sub(1)) & 0xffff_ffff,
            0,
            0,
            u64::from(cfg.dyn_shared),
            total_shared,
            0,
            1,
            0,
        ];
        for (r, v) in vals.iter().enumerate() {
            rf[r * 32 + lane] = *v;
        }
        for &(r, v) in &k.consts {
            rf[r as usize * 32 + lane] = v;
        }
    }
}

fn run_block(
    ctx: &mut Ctx,
    warps: &mut [Warp],
    regs: &mut [u64],
    nregs: usize,
) -> Result<(), PtxError> {
    loop {
        for (w, wp) in warps.iter_mut().enumerate() {
            if wp.live & !wp.blocked != 0 {
                run_warp(ctx, wp, &mut regs[w * nregs * 32..(w + 1) * nregs * 32], w)?;
            }
        }
        if warps.iter().all(|w| w.live == 0) {
            return Ok(());
        }
        // every live lane waits at a barrier: release the complete ones
        let mut waiting = [0u32; NBARS];
        for wp in warps.iter() {
            for l in Lanes(wp.blocked & wp.live) {
                if let Some(c) = waiting.get_mut(usize::from(wp.bar_wait[l])) {
                    *c += 1;
                }
            }
        }
        let mut released = false;
        #[allow(clippy::needless_range_loop)]
        for id in 0..NBARS {
            if waiting[id] == 0 {
                continue;
            }
            let expected = ctx.bars[id].expected.unwrap_or(ctx.nthreads);
            if waiting[id] + ctx.bars[id].extra >= expected {
                for wp in warps.iter_mut() {
                    for l in Lanes(wp.blocked) {
                        if usize::from(wp.bar_wait[l]) == id {
                            wp.blocked &= !(1 << l);
                            wp.bar_wait[l] = NO_BAR;
                        }
                    }
                    if wp.cur_mask == 0 {
                        wp.regroup();
                    }
                }
                ctx.bars[id] = Bar::default();
                released = true;
            }
        }
        if released {
            ctx.mem.epoch += 1;
            continue;
        }
        return Err(partial_barrier(ctx, warps, &waiting));
    }
}

fn partial_barrier(ctx: &Ctx, warps: &[Warp], waiting: &[u32; NBARS]) -> PtxError {
    let id = waiting.iter().position(|&c| c > 0).unwrap_or(0);
    let expected = ctx.bars[id].expected.unwrap_or(ctx.nthreads);
    let arrived = waiting[id] + ctx.bars[id].extra;
    // the barrier's line: that of its first waiter
    let mut line = 0;
    let mut first = (0usize, 0usize);
    'find: for (w, wp) in warps.iter().enumerate() {
        for l in Lanes(wp.blocked & wp.live) {
            if usize::from(wp.bar_wait[l]) == id {
                line = wp.bar_line[l];
                first = (w, l);
                break 'find;
            }
        }
    }
    // a thread that did not arrive
    for (w, wp) in warps.iter().enumerate() {
        for l in 0..32usize {
            let t = w * 32 + l;
            if t >= ctx.nthreads as usize {
                break;
            }
            let bit = 1u32 << l;
            if wp.live & bit == 0 {
                return ctx.fault(
                    w,
                    l,
                    line,
                    Fault::PartialBarrier,
                    format!(
                        "barrier {id} reached by {arrived} of {expected} threads; this thread exited at line {} without reaching it",
                        wp.exit_line[l]
                    ),
                );
            }
            if usize::from(wp.bar_wait[l]) != id && wp.blocked & bit != 0 {
                return ctx.fault(
                    w,
                    l,
                    line,
                    Fault::PartialBarrier,
                    format!(
                        "barrier {id} reached by {arrived} of {expected} threads; this thread waits at barrier {} (line {}) instead",
                        wp.bar_wait[l], wp.bar_line[l]
                    ),
                );
            }
        }
    }
    ctx.fault(
        first.0,
        first.1,
        line,
        Fault::PartialBarrier,
        format!("barrier {id} reached by {arrived} of {expected} threads and nothing else can run"),
    )
}

#[inline]
fn rd(rf: &[u64], r: u32, l: usize) -> u64 {
    rf[r as usize * 32 + l]
}

#[inline]
fn wr(rf: &mut [u64], r: u32, l: usize, v: u64) {
    rf[r as usize * 32 + l] = v;
}

#[inline]
fn addr_of(rf: &[u64], base: u32, off: i64, l: usize) -> u64 {
    let b = if base == NO_REG { 0 } else { rd(rf, base, l) };
    b.wrapping_add(off as u64)
}

#[allow(clippy::too_many_lines)]
fn run_warp(ctx: &mut Ctx, wp: &mut Warp, rf: &mut [u64], w: usize) -> Result<(), PtxError> {
    let k = ctx.k;
    let code: &[Inst] = &k.code;
    let tid0 = (w * 32) as u32;
    loop {
        if wp.cur_mask == 0 && !wp.regroup() {
            return Ok(());
        }
        let pc = wp.cur_pc as usize;
        let Some(inst) = code.get(pc) else {
            return Err(ctx.fault(
                w,
                wp.cur_mask.trailing_zeros() as usize,
                0,
                Fault::Invalid,
                format!("program counter {pc} past the end"),
            ));
        };
        let mut m = wp.cur_mask;
        if inst.guard != NO_REG {
            let base = inst.guard as usize * 32;
            let mut pm = 0u32;
            for l in Lanes(m) {
                if (rf[base + l] & 1 != 0) != inst.guard_neg {
                    pm |= 1 << l;
                }
            }
            m = pm;
        }
        ctx.stats.instructions += 1;
        ctx.stats.thread_instructions += u64::from(m.count_ones());
        if ctx.stats.instructions > ctx.limit {
            return Err(ctx.fault(
                w,
                m.trailing_zeros().min(31) as usize,
                inst.line,
                Fault::Limit,
                format!(
                    "more than {} warp instructions executed (an endless loop?)",
                    ctx.limit
                ),
            ));
        }
        let line = inst.line;
        macro_rules! fail {
            ($l:expr, $f:expr, $msg:expr) => {
                return Err(ctx.fault(w, $l, line, $f, $msg))
            };
        }
        match &inst.op {
            Op::Alu1 { f, d, a } => {
                let (d, a) = (*d as usize * 32, *a as usize * 32);
                for l in Lanes(m) {
                    rf[d + l] = f(rf[a + l]);
                }
            }
            Op::Alu2 { f, d, a, b } => {
                let (d, a, b) = (*d as usize * 32, *a as usize * 32, *b as usize * 32);
                for l in Lanes(m) {
                    rf[d + l] = f(rf[a + l], rf[b + l]);
                }
            }
            Op::Alu3 { f, d, a, b, c } => {
                let (d, a, b, c) = (
                    *d as usize * 32,
                    *a as usize * 32,
                    *b as usize * 32,
                    *c as usize * 32,
                );
                for l in Lanes(m) {
                    rf[d + l] = f(rf[a + l], rf[b + l], rf[c + l]);
                }
            }
            Op::Setp {
                f,
                p,
                q,
                a,
                b,
                comb,
                c,
                cneg,
            } => {
                for l in Lanes(m) {
                    let t = f(rd(rf, *a, l), rd(rf, *b, l));
                    let (pv, qv) = if *comb == 0 {
                        (t, !t)
                    } else {
                        let cv = (rd(rf, *c, l) & 1 != 0) != *cneg;
                        let op = |x: bool| match comb {
                            1 => x && cv,
                            2 => x || cv,
                            _ => x ^ cv,
                        };
                        (op(t), op(!t))
                    };
                    wr(rf, *p, l, u64::from(pv));
                    if *q != SINK {
                        wr(rf, *q, l, u64::from(qv));
                    }
                }
            }
            Op::Pack { d, parts, n, bits } => {
                let mk = ops::mask(u32::from(*bits));
                for l in Lanes(m) {
                    let mut v = 0u64;
                    for (j, r) in parts.iter().enumerate().take(usize::from(*n)) {
                        v |= (rd(rf, *r, l) & mk) << (j as u32 * u32::from(*bits));
                    }
                    wr(rf, *d, l, v);
                }
            }
            Op::Unpack { ds, n, bits, a } => {
                let mk = ops::mask(u32::from(*bits));
                for l in Lanes(m) {
                    let v = rd(rf, *a, l);
                    for (j, r) in ds.iter().enumerate().take(usize::from(*n)) {
                        wr(rf, *r, l, (v >> (j as u32 * u32::from(*bits))) & mk);
                    }
                }
            }
            Op::Cvt { spec, d, a } => {
                for l in Lanes(m) {
                    let v = ops::cvt(spec, rd(rf, *a, l));
                    wr(rf, *d, l, v);
                }
            }
            Op::CvtPack {
                bf,
                rnd,
                relu,
                satfinite,
                d,
                a,
                b,
            } => {
                for l in Lanes(m) {
                    let v =
                        ops::cvt_pack(*bf, *rnd, *relu, *satfinite, rd(rf, *a, l), rd(rf, *b, l));
                    wr(rf, *d, l, v);
                }
            }
            Op::Ld {
                space,
                size,
                n,
                sext,
                dmask,
                ds,
                base,
                off,
            } => {
                let mut vals = [0u64; 4];
                for l in Lanes(m) {
                    let addr = addr_of(rf, *base, *off, l);
                    if let Err((f, msg)) = ctx.mem.load(
                        *space,
                        addr,
                        usize::from(*size),
                        usize::from(*n),
                        tid0 + l as u32,
                        line,
                        &mut vals,
                    ) {
                        fail!(l, f, format!("ld: {msg}"));
                    }
                    for j in 0..usize::from(*n) {
                        let mut v = vals[j];
                        if *sext != 0 {
                            v = (ops::sext(v, u32::from(*sext)) as u64) & dmask;
                        }
                        wr(rf, ds[j], l, v);
                    }
                }
            }
            Op::St {
                space,
                size,
                n,
                srcs,
                base,
                off,
            } => {
                let n = usize::from(*n);
                let mut vals = [0u64; 4];
                for l in Lanes(m) {
                    let addr = addr_of(rf, *base, *off, l);
                    for j in 0..n {
                        vals[j] = rd(rf, srcs[j], l);
                    }
                    if let Err((f, msg)) = ctx.mem.store(
                        *space,
                        addr,
                        usize::from(*size),
                        &vals[..n],
                        tid0 + l as u32,
                        line,
                    ) {
                        fail!(l, f, format!("st: {msg}"));
                    }
                }
            }
            Op::Atom {
                space,
                size,
                f,
                d,
                base,
                off,
                b,
                c,
            } => {
                for l in Lanes(m) {
                    let addr = addr_of(rf, *base, *off, l);
                    let cv = if *c == SINK { 0 } else { rd(rf, *c, l) };
                    match ctx.mem.atomic(
                        *space,
                        addr,
                        usize::from(*size),
                        *f,
                        rd(rf, *b, l),
                        cv,
                        tid0 + l as u32,
                        line,
                    ) {
                        Ok(old) => wr(rf, *d, l, old),
                        Err((f, msg)) => fail!(l, f, format!("atom: {msg}")),
                    }
                }
            }
            Op::Bra { target } => {
                wp.branch(m, *target);
                continue;
            }
            Op::Exit => {
                for l in Lanes(m) {
                    wp.exit_line[l] = line;
                    let t = tid0 as usize + l;
                    let mut ta = std::mem::take(&mut ctx.asyncs[t]);
                    let r = ctx.mem.complete_async(&mut ta, u32::MAX, t as u32);
                    ctx.asyncs[t] = ta;
                    if let Err((f, msg, at)) = r {
                        return Err(ctx.fault(
                            w,
                            l,
                            at,
                            f,
                            format!("cp.async (completed at exit): {msg}"),
                        ));
                    }
                }
                wp.live &= !m;
                wp.park(m);
                continue;
            }
            Op::Trap => {
                if m != 0 {
                    fail!(
                        m.trailing_zeros() as usize,
                        Fault::Trap,
                        "trap executed".into()
                    );
                }
            }
            Op::Bar { id, count, arrive } => {
                if m != 0 {
                    let l0 = m.trailing_zeros() as usize;
                    let idv = rd(rf, *id, l0);
                    if idv >= NBARS as u64 {
                        fail!(
                            l0,
                            Fault::Invalid,
                            format!("barrier id {idv} is not in 0..16")
                        );
                    }
                    let idv = idv as usize;
                    for l in Lanes(m) {
                        if rd(rf, *id, l) != idv as u64 {
                            fail!(
                                l,
                                Fault::Divergence,
                                "lanes of one warp name different barriers".into()
                            );
                        }
                    }
                    if *count != NO_REG {
                        let cnt = rd(rf, *count, l0);
                        if cnt == 0
                            || cnt % 32 != 0
                            || cnt > u64::from(ctx.nthreads.div_ceil(32) * 32)
                        {
                            fail!(l0, Fault::Invalid, format!("barrier thread count {cnt} must be a nonzero multiple of 32 not above the block's {} threads", ctx.nthreads));
                        }
                        let cnt = cnt as u32;
                        match ctx.bars[idv].expected {
                            Some(e) if e != cnt => fail!(
                                l0,
                                Fault::Invalid,
                                format!("barrier {idv} used with thread counts {e} and {cnt}")
                            ),
                            _ => ctx.bars[idv].expected = Some(cnt),
                        }
                    }
                    if *arrive {
                        ctx.bars[idv].extra += m.count_ones();
                    } else {
                        for l in Lanes(m) {
                            wp.bar_wait[l] = idv as u8;
                            wp.bar_line[l] = line;
                            wp.pcs[l] = wp.cur_pc + 1;
                        }
                        wp.blocked |= m;
                        wp.park(m);
                        continue;
                    }
                }
            }
            Op::WarpSync { mask } => {
                for l in Lanes(m) {
                    let mk = rd(rf, *mask, l) as u32;
                    if mk & !m != 0 {
                        fail!(l, Fault::Divergence, format!("bar.warp.sync membermask {mk:#010x} names lanes {:#010x} that are not here (exited or diverged)", mk & !m));
                    }
                }
            }
            Op::Shfl {
                mode,
                d,
                p,
                a,
                b,
                c,
                mask,
            } => {
                check_members(ctx, rf, *mask, m, w, line, "shfl.sync")?;
                let mut src = [0u64; 32];
                src.copy_from_slice(&rf[*a as usize * 32..*a as usize * 32 + 32]);
                for l in Lanes(m) {
                    let bval = (rd(rf, *b, l) & 31) as i32;
                    let cv = rd(rf, *c, l);
                    let cval = (cv & 31) as i32;
                    let seg = ((cv >> 8) & 31) as i32;
                    let lane = l as i32;
                    let max_lane = (lane & seg) | (cval & !seg);
                    let min_lane = lane & seg;
                    let (mut j, pval) = match mode {
                        0 => {
                            let j = lane - bval;
                            (j, j >= max_lane)
                        }
                        1 => {
                            let j = lane + bval;
                            (j, j <= max_lane)
                        }
                        2 => {
                            let j = lane ^ bval;
                            (j, j <= max_lane)
                        }
                        _ => {
                            let j = min_lane | (bval & !seg);
                            (j, j <= max_lane)
                        }
                    };
                    if !pval {
                        j = lane;
                    }
                    let j = j as usize;
                    if m & (1 << j) == 0 {
                        fail!(
                            l,
                            Fault::Divergence,
                            format!("shfl.sync reads lane {j}, which does not execute it")
                        );
                    }
                    wr(rf, *d, l, src[j]);
                    if *p != SINK {
                        wr(rf, *p, l, u64::from(pval));
                    }
                }
            }
            Op::Vote {
                mode,
                d,
                a,
                neg,
                mask,
            } => {
                if *mask != NO_REG {
                    check_members(ctx, rf, *mask, m, w, line, "vote.sync")?;
                }
                let mut ballot = 0u32;
                for l in Lanes(m) {
                    if (rd(rf, *a, l) & 1 != 0) != *neg {
                        ballot |= 1 << l;
                    }
                }
                for l in Lanes(m) {
                    let members = if *mask == NO_REG {
                        m
                    } else {
                        rd(rf, *mask, l) as u32 & m
                    };
                    let b = ballot & members;
                    let v = match mode {
                        0 => u64::from(b == members),
                        1 => u64::from(b != 0),
                        2 => u64::from(b == 0 || b == members),
                        _ => u64::from(b),
                    };
                    wr(rf, *d, l, v);
                }
            }
            Op::Activemask { d } => {
                for l in Lanes(m) {
                    wr(rf, *d, l, u64::from(m));
                }
            }
            Op::Redux { f, d, a, mask } => {
                check_members(ctx, rf, *mask, m, w, line, "redux.sync")?;
                let mut acc: Option<u64> = None;
                for l in Lanes(m) {
                    let v = rd(rf, *a, l);
                    acc = Some(acc.map_or(v, |x| f(x, v)));
                }
                let acc = acc.unwrap_or(0);
                for l in Lanes(m) {
                    wr(rf, *d, l, acc);
                }
            }
            Op::CpAsync {
                dbase,
                doff,
                sbase,
                soff,
                size,
                src_size,
                ignore,
                ineg,
            } => {
                for l in Lanes(m) {
                    let t = tid0 as usize + l;
                    let size = u64::from(*size);
                    let ign = *ignore != NO_REG && ((rd(rf, *ignore, l) & 1 != 0) != *ineg);
                    let ssize = if ign {
                        0
                    } else if *src_size != NO_REG {
                        rd(rf, *src_size, l) & 0xffff_ffff
                    } else {
                        size
                    };
                    if ssize > size {
                        fail!(
                            l,
                            Fault::Invalid,
                            format!("cp.async src-size {ssize} exceeds cp-size {size}")
                        );
                    }
                    let dst = addr_of(rf, *dbase, *doff, l);
                    if dst % size != 0 {
                        fail!(
                            l,
                            Fault::Misaligned,
                            format!("cp.async destination {dst:#x} is not {size}-byte aligned")
                        );
                    }
                    let doff = match ctx.mem.sh_range(dst, size) {
                        Ok(o) => o,
                        Err((f, msg)) => fail!(l, f, format!("cp.async destination: {msg}")),
                    };
                    let src = addr_of(rf, *sbase, *soff, l);
                    let mut data = [0u8; 16];
                    if ssize > 0 {
                        if src % size != 0 {
                            fail!(
                                l,
                                Fault::Misaligned,
                                format!("cp.async source {src:#x} is not {size}-byte aligned")
                            );
                        }
                        match ctx.mem.global.find(src, ssize) {
                            Ok(o) => data[..ssize as usize]
                                .copy_from_slice(ctx.mem.global.bytes(o, ssize as usize)),
                            Err(msg) => {
                                fail!(l, Fault::OutOfBounds, format!("cp.async source: {msg}"))
                            }
                        }
                    }
                    let ta = &mut ctx.asyncs[t];
                    let group = ta.open;
                    ta.copies.push_back(Pending {
                        dst: doff as u32,
                        len: size as u8,
                        data,
                        line,
                        group,
                    });
                }
            }
            Op::CpCommit => {
                for l in Lanes(m) {
                    let ta = &mut ctx.asyncs[tid0 as usize + l];
                    ta.open += 1;
                }
            }
            Op::CpWait { n, all } => {
                for l in Lanes(m) {
                    let t = tid0 as usize + l;
                    let mut ta = std::mem::take(&mut ctx.asyncs[t]);
                    let upto = if *all {
                        ta.open += 1;
                        u32::MAX
                    } else {
                        ta.open.saturating_sub(*n)
                    };
                    let r = ctx.mem.complete_async(&mut ta, upto, t as u32);
                    ctx.asyncs[t] = ta;
                    if let Err((f, msg, at)) = r {
                        return Err(ctx.fault(
                            w,
                            l,
                            at,
                            f,
                            format!("cp.async (completed at line {line}): {msg}"),
                        ));
                    }
                }
            }
            Op::Ldmatrix {
                num,
                trans,
                ds,
                base,
                off,
                generic,
            } => {
                if m != FULL {
                    let missing = (!m).trailing_zeros() as usize;
                    fail!(
                        missing,
                        Fault::Divergence,
                        format!(
                            "ldmatrix.sync.aligned needs all 32 lanes; lanes {:#010x} execute it",
                            m
                        )
                    );
                }
                let num = usize::from(*num);
                let mut rows = [[0u16; 8]; 32];
                for (lane, row) in rows.iter_mut().enumerate().take(num * 8) {
                    let mut a = addr_of(rf, *base, *off, lane);
                    if *generic {
                        if !(SHARED_WINDOW..SHARED_WINDOW + SHARED_WINDOW_SIZE).contains(&a) {
                            fail!(
                                lane,
                                Fault::OutOfBounds,
                                format!("ldmatrix row address {a:#x} is not in shared memory")
                            );
                        }
                        a -= SHARED_WINDOW;
                    }
                    if a % 16 != 0 {
                        fail!(
                            lane,
                            Fault::Misaligned,
                            format!("ldmatrix row address {a:#x} is not 16-byte aligned")
                        );
                    }
                    let o = match ctx.mem.sh_range(a, 16) {
                        Ok(o) => o,
                        Err((f, msg)) => fail!(lane, f, format!("ldmatrix: {msg}")),
                    };
                    if let Err((f, msg)) =
                        ctx.mem
                            .sh_read_check(o, 16, tid0 + lane as u32, line, false)
                    {
                        fail!(lane, f, format!("ldmatrix: {msg}"));
                    }
                    for (j, e) in row.iter_mut().enumerate() {
                        *e = u16::from_le_bytes([
                            ctx.mem.shared[o + 2 * j],
                            ctx.mem.shared[o + 2 * j + 1],
                        ]);
                    }
                }
                for l in 0..32usize {
                    let (g, c) = (l / 4, 2 * (l % 4));
                    for (mi, r) in ds.iter().enumerate().take(num) {
                        let mat = &rows[mi * 8..mi * 8 + 8];
                        let (lo, hi) = if *trans {
                            (mat[c][g], mat[c + 1][g])
                        } else {
                            (mat[g][c], mat[g][c + 1])
                        };
                        wr(rf, *r, l, u64::from(lo) | (u64::from(hi) << 16));
                    }
                }
            }
            Op::Mma {
                k: kk,
                bf,
                d_f32,
                c_f32,
                d,
                a,
                b,
                c,
            } => {
                if m != FULL {
                    let missing = (!m).trailing_zeros() as usize;
                    fail!(
                        missing,
                        Fault::Divergence,
                        format!(
                            "mma.sync.aligned needs all 32 lanes; lanes {:#010x} execute it",
                            m
                        )
                    );
                }
                mma(rf, *kk, *bf, *d_f32, *c_f32, d, a, b, c);
            }
            Op::Nop => {}
        }
        wp.advance();
    }
}

fn check_members(
    ctx: &Ctx,
    rf: &[u64],
    mask: u32,
    m: u32,
    w: usize,
    line: u32,
    what: &str,
) -> Result<(), PtxError> {
    for l in Lanes(m) {
        let mk = rd(rf, mask, l) as u32;
        if mk & (1 << l) == 0 {
            return Err(ctx.fault(
                w,
                l,
                line,
                Fault::Divergence,
                format!("{what}: membermask {mk:#010x} does not name the executing lane {l}"),
            ));
        }
        if mk & !m != 0 {
            return Err(ctx.fault(
                w,
                l,
                line,
                Fault::Divergence,
                format!("{what}: membermask {mk:#010x} names lanes {:#010x} that do not execute it (exited or diverged)", mk & !m),
            ));
        }
    }
    Ok(())
}

/// `mma.sync.aligned.m16n8k{16,8}.row.col` with the fragment layouts of the
/// PTX ISA ("Matrix Fragments for mma.m16n8k16 / m16n8k8 with floating
/// point type"): groupID = lane / 4, threadID_in_group = lane % 4.
#[allow(clippy::too_many_arguments)]
fn mma(
    rf: &mut [u64],
    k: u8,
    bf: bool,
    d_f32: bool,
    c_f32: bool,
    d: &[u32; 4],
    a: &[u32; 4],
    b: &[u32; 2],
    c: &[u32; 4],
) {
    let fmt = if bf { Fmt::Bf16 } else { Fmt::F16 };
    let kk = usize::from(k);
    let mut am = [[0f64; 16]; 16];
    let mut bm = [[0f64; 8]; 16];
    let mut cm = [[0f64; 8]; 16];
    let half = |v: u64, i: usize| (v >> (16 * (i & 1))) & 0xffff;
    for l in 0..32usize {
        let (g, t) = (l / 4, l % 4);
        // A: 16 x k
        let na = kk / 2; // elements per lane: 8 (k16) or 4 (k8)
        for i in 0..na {
            let reg = rd(rf, a[i / 2], l);
            let row = g + 8 * ((i / 2) & 1);
            let col = t * 2 + (i & 1) + 8 * (i / 4);
            am[row][col] = fmt.to_f64(half(reg, i));
        }
        // B: k x 8
        let nb = kk / 4; // 4 (k16) or 2 (k8)
        for i in 0..nb {
            let reg = rd(rf, b[i / 2], l);
            let row = t * 2 + (i & 1) + 8 * (i / 2);
            bm[row][g] = fmt.to_f64(half(reg, i));
        }
        // C: 16 x 8
        for i in 0..4 {
            let row = g + 8 * (i / 2);
            let col = t * 2 + (i & 1);
            cm[row][col] = if c_f32 {
                Fmt::F32.to_f64(rd(rf, c[i], l) & 0xffff_ffff)
            } else {
                Fmt::F16.to_f64(half(rd(rf, c[i / 2], l), i))
            };
        }
    }
    let mut dm = [[0f64; 8]; 16];
    for (r, drow) in dm.iter_mut().enumerate() {
        for (col, dv) in drow.iter_mut().enumerate() {
            let mut s = cm[r][col];
            for (x, brow) in am[r].iter().take(kk).zip(bm.iter()) {
                s += x * brow[col];
            }
            *dv = s;
        }
    }
    for l in 0..32usize {
        let (g, t) = (l / 4, l % 4);
        if d_f32 {
            for (i, &r) in d.iter().enumerate() {
                let row = g + 8 * (i / 2);
                let col = t * 2 + (i & 1);
                wr(
                    rf,
                    r,
                    l,
                    ops::round_float(dm[row][col], Fmt::F32, Rnd::Rn, 0, false),
                );
            }
        } else {
            for (j, &r) in d.iter().enumerate().take(2) {
                let row = g + 8 * j;
                let lo = ops::round_float(dm[row][t * 2], Fmt::F16, Rnd::Rn, 0, false);
                let hi = ops::round_float(dm[row][t * 2 + 1], Fmt::F16, Rnd::Rn, 0, false);
                wr(rf, r, l, lo | (hi << 16));
            }
        }
    }
}
