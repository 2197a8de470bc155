//! The slab allocator: one reserved region carved into size classes.
//!
//! The device region (a big `cuMemAlloc`, a budgeted host mapping on the cpu
//! backend, or nothing at all on the meta backend) is reserved once and then
//! sub-allocated here. The allocator only deals in offsets; what backs the
//! region is a [`Region`], so the same code runs over GPU memory, host memory
//! and a purely virtual range (planner, tests).
//!
//! The algorithm is two-level segregated fit (TLSF): free blocks sit in lists
//! indexed by a (first level = power of two, second level = one of 16
//! subdivisions) size class; two bitmaps find a non-empty class that is
//! guaranteed to fit in O(1), and freed blocks are merged with their free
//! physical neighbours in O(1). Every block is a multiple of [`ALIGN`] bytes
//! and starts at a multiple of [`ALIGN`].

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::AllocError;
use crate::fmt_bytes;

/// Alignment (and granule) of every block, in bytes. 256 covers every vector
/// load width and the alignment cuBLASLt and cp.async want.
pub const ALIGN: usize = 256;

const SL_BITS: u32 = 4;
const SL_COUNT: usize = 1 << SL_BITS;
const FL_COUNT: usize = 64;
const NIL: u32 = u32::MAX;

/// What backs a slab allocator's range: device memory, a host mapping, or
/// nothing (a virtual range for the meta device).
pub trait Region: Send + Sync {
    /// Address of offset 0 (0 for a virtual region).
    fn base_addr(&self) -> usize;
    /// Size of the region in bytes.
    fn len(&self) -> usize;
    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Called with a block's range when it is returned, before it can be
    /// handed out again (the cpu backend poisons freed memory here in tests).
    fn on_free(&self, _offset: usize, _len: usize) {}
}

/// A region with no memory behind it: offsets only. The meta device and the
/// planner use it to account for memory they never touch.
#[derive(Debug, Clone, Copy)]
pub struct VirtualRegion {
    len: usize,
}

impl VirtualRegion {
    /// A virtual region of `len` bytes.
    pub fn new(len: usize) -> Self {
        VirtualRegion { len }
    }
}

impl Region for VirtualRegion {
    fn base_addr(&self) -> usize {
        0
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// Allocation statistics of one tag (what a block was allocated for).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TagStats {
    /// Bytes (rounded to [`ALIGN`]) held by live blocks of this tag.
    pub in_use: usize,
    /// High-water mark of `in_use`.
    pub peak: usize,
    /// Live blocks of this tag.
    pub blocks: usize,
}

/// A snapshot of a slab allocator's statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct SlabStats {
    /// Size of the region.
    pub capacity: usize,
    /// Most bytes that may be in use at once (at most `capacity`).
    pub budget: usize,
    /// Bytes held by live blocks, rounded to [`ALIGN`].
    pub in_use: usize,
    /// Bytes asked for by live blocks (before rounding).
    pub requested: usize,
    /// High-water mark of `in_use`.
    pub peak: usize,
    /// Live blocks.
    pub live_blocks: usize,
    /// Allocations served since creation.
    pub allocs: u64,
    /// Blocks returned since creation.
    pub frees: u64,
    /// Largest block that could be allocated now (ignoring the budget).
    pub largest_free: usize,
    /// Free bytes of the region not in the largest free block, as a fraction
    /// of all free bytes: 0 when free memory is one block, near 1 when it is
    /// scattered.
    pub fragmentation: f64,
    /// Per-tag statistics, by tag name.
    pub tags: BTreeMap<&'static str, TagStats>,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    offset: usize,
    size: usize,
    prev_phys: u32,
    next_phys: u32,
    prev_free: u32,
    next_free: u32,
    free: bool,
}

/// The TLSF state: nodes for physical blocks, free lists, bitmaps, stats.
struct Tlsf {
    nodes: Vec<Node>,
    spare: Vec<u32>,
    heads: [[u32; SL_COUNT]; FL_COUNT],
    fl_bitmap: u64,
    sl_bitmap: [u16; FL_COUNT],
    capacity: usize,
    budget: usize,
    in_use: usize,
    requested: usize,
    peak: usize,
    live: usize,
    allocs: u64,
    frees: u64,
    /// Per-tag statistics; a handful of tags, so a vector searched by
    /// pointer first beats a map on the hot path. Blocks keep their index.
    tags: Vec<(&'static str, TagStats)>,
    /// Threads blocked in `wait_for_free`: a free wakes them only when there
    /// are some, since a condvar notify costs a system call.
    waiters: usize,
}

/// Size class of a block of `g` granules: (first level, second level).
fn mapping(g: usize) -> (usize, usize) {
    if g < SL_COUNT {
        (0, g)
    } else {
        let f = usize::BITS - 1 - g.leading_zeros();
        let sl = (g >> (f - SL_BITS)) - SL_COUNT;
        ((f - SL_BITS + 1) as usize, sl)
    }
}

/// Smallest class whose every block holds `g` granules.
fn mapping_search(g: usize) -> (usize, usize) {
    if g < SL_COUNT {
        (0, g)
    } else {
        let f = usize::BITS - 1 - g.leading_zeros();
        mapping(g.saturating_add((1usize << (f - SL_BITS)) - 1))
    }
}

impl Tlsf {
    fn new(capacity: usize, budget: usize) -> Self {
        let mut t = Tlsf {
            nodes: Vec::new(),
            spare: Vec::new(),
            heads: [[NIL; SL_COUNT]; FL_COUNT],
            fl_bitmap: 0,
            sl_bitmap: [0; FL_COUNT],
            capacity,
            budget,
            in_use: 0,
            requested: 0,
            peak: 0,
            live: 0,
            allocs: 0,
            frees: 0,
            tags: Vec::new(),
            waiters: 0,
        };
        let usable = capacity / ALIGN * ALIGN;
        if usable > 0 {
            let n = t.new_node(Node {
                offset: 0,
                size: usable,
                prev_phys: NIL,
                next_phys: NIL,
                prev_free: NIL,
                next_free: NIL,
                free: true,
            });
            t.insert_free(n);
        }
        t
    }

    fn new_node(&mut self, node: Node) -> u32 {
        match self.spare.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        }
    }

    fn insert_free(&mut self, n: u32) {
        let (fl, sl) = mapping(self.nodes[n as usize].size / ALIGN);
        let head = self.heads[fl][sl];
        {
            let node = &mut self.nodes[n as usize];
            node.free = true;
            node.prev_free = NIL;
            node.next_free = head;
        }
        if head != NIL {
            self.nodes[head as usize].prev_free = n;
        }
        self.heads[fl][sl] = n;
        self.fl_bitmap |= 1 << fl;
        self.sl_bitmap[fl] |= 1 << sl;
    }

    fn remove_free(&mut self, n: u32) {
        let Node {
            size,
            prev_free,
            next_free,
            ..
        } = self.nodes[n as usize];
        if prev_free != NIL {
            self.nodes[prev_free as usize].next_free = next_free;
        } else {
            let (fl, sl) = mapping(size / ALIGN);
            self.heads[fl][sl] = next_free;
            if next_free == NIL {
                self.sl_bitmap[fl] &= !(1 << sl);
                if self.sl_bitmap[fl] == 0 {
                    self.fl_bitmap &= !(1 << fl);
                }
            }
        }
        if next_free != NIL {
            self.nodes[next_free as usize].prev_free = prev_free;
        }
        self.nodes[n as usize].free = false;
    }

    /// A free block of at least `g` granules, in O(1).
    fn find(&self, g: usize) -> Option<u32> {
        let (fl, sl) = mapping_search(g);
        if fl >= FL_COUNT {
            return None;
        }
        let sl_map = u32::from(self.sl_bitmap[fl]) & (!0u32 << sl);
        let (fl, sl) = if sl_map != 0 {
            (fl, sl_map.trailing_zeros() as usize)
        } else {
            let fl_map = if fl + 1 >= 64 {
                0
            } else {
                self.fl_bitmap & (!0u64 << (fl + 1))
            };
            if fl_map == 0 {
                return None;
            }
            let fl = fl_map.trailing_zeros() as usize;
            (fl, self.sl_bitmap[fl].trailing_zeros() as usize)
        };
        let n = self.heads[fl][sl];
        (n != NIL).then_some(n)
    }

    fn alloc(&mut self, bytes: usize) -> Option<(u32, usize, usize)> {
        let g = bytes.div_ceil(ALIGN).max(1);
        let need = g.checked_mul(ALIGN)?;
        if self.in_use.checked_add(need)? > self.budget {
            return None;
        }
        let n = self.find(g)?;
        self.remove_free(n);
        let node = self.nodes[n as usize];
        if node.size - need >= ALIGN {
            let rest = self.new_node(Node {
                offset: node.offset + need,
                size: node.size - need,
                prev_phys: n,
                next_phys: node.next_phys,
                prev_free: NIL,
                next_free: NIL,
                free: true,
            });
            if node.next_phys != NIL {
                self.nodes[node.next_phys as usize].prev_phys = rest;
            }
            let cur = &mut self.nodes[n as usize];
            cur.next_phys = rest;
            cur.size = need;
            self.insert_free(rest);
        }
        let size = self.nodes[n as usize].size;
        Some((n, self.nodes[n as usize].offset, size))
    }

    fn free(&mut self, mut n: u32) {
        let next = self.nodes[n as usize].next_phys;
        if next != NIL && self.nodes[next as usize].free {
            self.remove_free(next);
            let absorbed = self.nodes[next as usize];
            let cur = &mut self.nodes[n as usize];
            cur.size += absorbed.size;
            cur.next_phys = absorbed.next_phys;
            if absorbed.next_phys != NIL {
                self.nodes[absorbed.next_phys as usize].prev_phys = n;
            }
            self.spare.push(next);
        }
        let prev = self.nodes[n as usize].prev_phys;
        if prev != NIL && self.nodes[prev as usize].free {
            self.remove_free(prev);
            let cur = self.nodes[n as usize];
            let p = &mut self.nodes[prev as usize];
            p.size += cur.size;
            p.next_phys = cur.next_phys;
            if cur.next_phys != NIL {
                self.nodes[cur.next_phys as usize].prev_phys = prev;
            }
            self.spare.push(n);
            n = prev;
        }
        self.insert_free(n);
    }

    /// Index of `tag` in `tags`, added when new.
    fn tag_index(&mut self, tag: &'static str) -> usize {
        let found = self
            .tags
            .iter()
            .position(|(t, _)| std::ptr::eq(*t, tag))
            .or_else(|| self.tags.iter().position(|(t, _)| *t == tag));
        match found {
            Some(i) => i,
            None => {
                self.tags.push((tag, TagStats::default()));
                self.tags.len() - 1
            }
        }
    }

    fn largest_free(&self) -> usize {
        if self.fl_bitmap == 0 {
            return 0;
        }
        let fl = 63 - self.fl_bitmap.leading_zeros() as usize;
        let sl = 15 - self.sl_bitmap[fl].leading_zeros() as usize;
        let mut n = self.heads[fl][sl];
        let mut best = 0;
        while n != NIL {
            best = best.max(self.nodes[n as usize].size);
            n = self.nodes[n as usize].next_free;
        }
        best
    }
}

struct Shared {
    region: Box<dyn Region>,
    space: &'static str,
    state: Mutex<Tlsf>,
    freed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Tlsf> {
        // The state is consistent between calls (no method panics midway), so
        // a poisoned lock can be taken over.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A size-class allocator over one reserved [`Region`], with a budget and
/// statistics. Cheap to clone (a handle); blocks keep the region alive.
#[derive(Clone)]
pub struct SlabAllocator {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SlabAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.shared.lock();
        f.debug_struct("SlabAllocator")
            .field("space", &self.shared.space)
            .field("capacity", &s.capacity)
            .field("budget", &s.budget)
            .field("in_use", &s.in_use)
            .finish()
    }
}

impl SlabAllocator {
    /// An allocator over `region` that lets at most `budget` bytes be in use.
    /// `space` names the memory in errors ("device", "host").
    pub fn new(
        region: impl Region + 'static,
        budget: usize,
        space: &'static str,
    ) -> Result<Self, AllocError> {
        let capacity = region.len();
        if budget > capacity {
            return Err(AllocError::InvalidConfig(format!(
                "{space} budget ({}) must not exceed the reserved region ({})",
                fmt_bytes(budget),
                fmt_bytes(capacity)
            )));
        }
        if region.base_addr() % ALIGN != 0 {
            return Err(AllocError::InvalidConfig(format!(
                "{space} region base {:#x} is not {ALIGN}-byte aligned",
                region.base_addr()
            )));
        }
        Ok(SlabAllocator {
            shared: Arc::new(Shared {
                state: Mutex::new(Tlsf::new(capacity, budget)),
                region: Box::new(region),
                space,
                freed: Condvar::new(),
            }),
        })
    }

    /// An allocator over a [`VirtualRegion`] of `budget` bytes.
    pub fn virtual_region(budget: usize, space: &'static str) -> Result<Self, AllocError> {
        Self::new(VirtualRegion::new(budget), budget, space)
    }

    /// Allocates `bytes` (rounded up to [`ALIGN`]) for `tag`. Out of memory is
    /// an error naming the request, the tag, what is in use, the budget and
    /// the largest free block.
    pub fn alloc(&self, bytes: usize, tag: &'static str) -> Result<SlabBlock, AllocError> {
        let mut s = self.shared.lock();
        match s.alloc(bytes) {
            Some((node, offset, reserved)) => {
                s.in_use += reserved;
                s.requested += bytes;
                s.peak = s.peak.max(s.in_use);
                s.live += 1;
                s.allocs += 1;
                let tag_idx = s.tag_index(tag);
                let t = &mut s.tags[tag_idx].1;
                t.in_use += reserved;
                t.blocks += 1;
                t.peak = t.peak.max(t.in_use);
                Ok(SlabBlock {
                    shared: self.shared.clone(),
                    node,
                    offset,
                    len: bytes,
                    reserved,
                    tag,
                    tag_idx,
                })
            }
            None => Err(AllocError::OutOfMemory {
                space: self.shared.space,
                request: bytes,
                tag,
                in_use: s.in_use,
                budget: s.budget,
                largest_free: s.largest_free(),
            }),
        }
    }

    /// Blocks until some block is returned or `timeout` passes; true when a
    /// block was returned. Lets a caller whose allocation failed because
    /// blocks are still held by in-flight work wait for them.
    pub fn wait_for_free(&self, timeout: Duration) -> bool {
        let mut s = self.shared.lock();
        let frees = s.frees;
        s.waiters += 1;
        let (mut s, _) = self
            .shared
            .freed
            .wait_timeout_while(s, timeout, |s| s.frees == frees)
            .unwrap_or_else(|e| e.into_inner());
        s.waiters -= 1;
        s.frees != frees
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> SlabStats {
        let s = self.shared.lock();
        let largest_free = s.largest_free();
        let free_total = s.capacity / ALIGN * ALIGN - s.in_use;
        let fragmentation = if free_total == 0 {
            0.0
        } else {
            1.0 - largest_free as f64 / free_total as f64
        };
        SlabStats {
            capacity: s.capacity,
            budget: s.budget,
            in_use: s.in_use,
            requested: s.requested,
            peak: s.peak,
            live_blocks: s.live,
            allocs: s.allocs,
            frees: s.frees,
            largest_free,
            fragmentation,
            tags: s.tags.iter().copied().collect(),
        }
    }

    /// Bytes in use now.
    pub fn in_use(&self) -> usize {
        self.shared.lock().in_use
    }

    /// The budget.
    pub fn budget(&self) -> usize {
        self.shared.lock().budget
    }

    /// Size of the reserved region.
    pub fn capacity(&self) -> usize {
        self.shared.region.len()
    }

    /// Resets the peak (overall and per tag) to what is in use now, so one
    /// phase's high-water mark can be measured.
    pub fn reset_peak(&self) {
        let mut s = self.shared.lock();
        s.peak = s.in_use;
        for (_, t) in s.tags.iter_mut() {
            t.peak = t.in_use;
        }
    }

    /// The region behind this allocator.
    pub fn region(&self) -> &dyn Region {
        self.shared.region.as_ref()
    }

    /// The memory space's name ("device", "host").
    pub fn space(&self) -> &'static str {
        self.shared.space
    }
}

/// A block of a [`SlabAllocator`]'s region. Dropping it returns it.
pub struct SlabBlock {
    shared: Arc<Shared>,
    node: u32,
    offset: usize,
    len: usize,
    reserved: usize,
    tag: &'static str,
    tag_idx: usize,
}

impl std::fmt::Debug for SlabBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlabBlock")
            .field("space", &self.shared.space)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("tag", &self.tag)
            .finish()
    }
}

impl SlabBlock {
    /// Offset of the block in its region (a multiple of [`ALIGN`]).
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Bytes asked for.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether zero bytes were asked for.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes reserved (a multiple of [`ALIGN`], at least `len`).
    pub fn reserved(&self) -> usize {
        self.reserved
    }
    /// What the block was allocated for.
    pub fn tag(&self) -> &'static str {
        self.tag
    }
    /// Address of the block: the region's base plus the offset (an offset
    /// only, for a virtual region).
    pub fn addr(&self) -> usize {
        self.shared.region.base_addr() + self.offset
    }
    /// The allocator's memory space ("device", "host").
    pub fn space(&self) -> &'static str {
        self.shared.space
    }
}

impl Drop for SlabBlock {
    fn drop(&mut self) {
        self.shared.region.on_free(self.offset, self.reserved);
        let mut s = self.shared.lock();
        s.free(self.node);
        s.in_use -= self.reserved;
        s.requested -= self.len;
        s.live -= 1;
        s.frees += 1;
        let t = &mut s.tags[self.tag_idx].1;
        t.in_use -= self.reserved;
        t.blocks -= 1;
        let wake = s.waiters > 0;
        drop(s);
        if wake {
            self.shared.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_monotonic_and_search_fits() {
        let mut last = (0, 0);
        for g in 1..100_000usize {
            let c = mapping(g);
            assert!(c >= last, "class of {g} went down");
            last = c;
            // Every block in the searched class holds g granules: the
            // smallest size of class mapping_search(g) is >= g.
            let (fl, sl) = mapping_search(g);
            let min = if fl == 0 {
                sl
            } else {
                let f = fl as u32 + SL_BITS - 1;
                (SL_COUNT + sl) << (f - SL_BITS)
            };
            assert!(min >= g, "class ({fl},{sl}) min {min} < {g}");
        }
    }

    #[test]
    fn split_and_merge_restore_one_block() {
        let a = SlabAllocator::virtual_region(1 << 20, "device").unwrap();
        let b1 = a.alloc(1000, "x").unwrap();
        let b2 = a.alloc(5000, "y").unwrap();
        let b3 = a.alloc(1, "x").unwrap();
        assert_eq!(b1.reserved(), 1024);
        assert_eq!(b2.offset(), 1024);
        assert_eq!(a.stats().tags["x"].in_use, 1024 + 256);
        drop(b2);
        drop(b1);
        drop(b3);
        let s = a.stats();
        assert_eq!(s.in_use, 0);
        assert_eq!(s.largest_free, 1 << 20);
        assert_eq!(s.fragmentation, 0.0);
        assert_eq!(s.tags["x"].peak, 1280);
    }

    #[test]
    fn budget_is_enforced_with_a_named_error() {
        let a = SlabAllocator::new(VirtualRegion::new(1 << 20), 4096, "device").unwrap();
        let _b = a.alloc(4000, "kv").unwrap();
        let e = a.alloc(512, "q").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("512 B"), "{msg}");
        assert!(msg.contains("`q`"), "{msg}");
        assert!(
            msg.contains("4.00 KiB in use of a 4.00 KiB budget"),
            "{msg}"
        );
        assert!(msg.contains("largest free block 1020 KiB"), "{msg}");
    }
}
