//! Buffers: device memory from the slab, host memory from the arena, views
//! of them, and the bookkeeping that keeps asynchronous work sound.
//!
//! Two owners per block. The user holds a [`DeviceBuffer`] or [`HostBuffer`]
//! (unique, not `Clone`); every enqueued operation that touches the block
//! holds a reference to it until the operation completes. Dropping the user's
//! buffer is the *logical* free: it is recorded in the device's
//! [`MemoryLedger`] at that point of the host program, so the cpu and meta
//! devices produce the same allocation trace. The block returns to the slab
//! (the *physical* free) only when the last operation using it completed:
//! an offloaded chunk's device memory is reused only after its copy is done.
//!
//! Every block also keeps a registry of who is using which bytes right now,
//! so two operations that touch the same bytes without an event between
//! them (a data race on a GPU) fail with [`RuntimeError::Race`] instead of
//! corrupting data, and the host cannot read bytes that enqueued work is
//! about to write.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use fpdt_alloc::{SlabBlock, TagStats, ALIGN};
use serde::Serialize;

use crate::error::{Result, RuntimeError};

/// Where a buffer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Space {
    /// Device memory (the slab region).
    Device,
    /// Host memory (the pinned arena).
    Host,
}

impl Space {
    /// "device" or "host".
    pub fn as_str(self) -> &'static str {
        match self {
            Space::Device => "device",
            Space::Host => "host",
        }
    }
}

#[derive(Debug, Clone)]
struct Borrow {
    start: usize,
    end: usize,
    write: bool,
    holder: String,
}

#[derive(Debug, Default)]
struct UseState {
    pending_reads: usize,
    pending_writes: usize,
    active: Vec<Borrow>,
}

/// One block of memory and who is using it.
pub(crate) struct MemInner {
    block: SlabBlock,
    space: Space,
    /// False on the meta device: the block is only an offset.
    has_data: bool,
    /// The device the block belongs to.
    device_id: u64,
    uses: Mutex<UseState>,
}

/// Where the meta device's addresses start (1 TiB: aligned to anything a
/// kernel asks for, and never null).
const META_BASE: usize = 1 << 40;

impl MemInner {
    fn lock(&self) -> MutexGuard<'_, UseState> {
        self.uses.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn tag(&self) -> &'static str {
        self.block.tag()
    }

    pub(crate) fn len(&self) -> usize {
        self.block.len()
    }

    pub(crate) fn addr(&self) -> usize {
        if self.has_data {
            self.block.addr()
        } else {
            // The meta device's blocks are offsets from 0: placed at a
            // nonzero base (as a GPU's virtual addresses are), so kernel
            // launchers, which refuse a null pointer, take them too.
            META_BASE + self.block.addr()
        }
    }

    pub(crate) fn device_id(&self) -> u64 {
        self.device_id
    }

    /// Registers `holder` as using bytes `start..end`; fails when someone
    /// else uses an overlapping range and one of the two writes.
    fn try_borrow(&self, start: usize, end: usize, write: bool, holder: &str) -> Result<()> {
        let mut u = self.lock();
        if let Some(b) = u
            .active
            .iter()
            .find(|b| b.start < end && start < b.end && (b.write || write))
        {
            return Err(RuntimeError::Race {
                tag: self.tag(),
                start: start.max(b.start),
                end: end.min(b.end),
                op: holder.to_string(),
                other: b.holder.clone(),
            });
        }
        u.active.push(Borrow {
            start,
            end,
            write,
            holder: holder.to_string(),
        });
        Ok(())
    }

    fn release_borrow(&self, start: usize, end: usize, write: bool) {
        let mut u = self.lock();
        if let Some(i) = u
            .active
            .iter()
            .position(|b| b.start == start && b.end == end && b.write == write)
        {
            u.active.swap_remove(i);
        }
    }
}

/// Logical memory accounting of one space of a device: what the program
/// holds, in program order. Sizes are rounded to the allocator's granule.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SpaceUsage {
    /// Bytes held now.
    pub in_use: usize,
    /// High-water mark of `in_use`.
    pub peak: usize,
    /// Per tag: bytes held, their high-water mark, live buffers.
    #[serde(skip)]
    pub tags: BTreeMap<&'static str, TagStats>,
}

/// One entry of an allocation trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AllocEvent {
    /// Which memory.
    pub space: Space,
    /// What for.
    pub tag: &'static str,
    /// Bytes, rounded to the allocator's granule.
    pub bytes: usize,
    /// True for an allocation, false for a release.
    pub alloc: bool,
}

#[derive(Debug, Default)]
struct LedgerState {
    device: SpaceUsage,
    host: SpaceUsage,
    record: Option<Vec<AllocEvent>>,
}

/// The logical memory ledger of a device: in-use and peak bytes per space and
/// per tag, and optionally the full allocation trace. It is what the planner
/// reports, identical for the same schedule on the cpu and meta devices.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    state: Mutex<LedgerState>,
}

/// Bytes a request of `bytes` occupies in a slab.
pub(crate) fn rounded(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN).max(1) * ALIGN
}

impl MemoryLedger {
    fn lock(&self) -> MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, space: Space, tag: &'static str, bytes: usize, alloc: bool) {
        let mut s = self.lock();
        let usage = match space {
            Space::Device => &mut s.device,
            Space::Host => &mut s.host,
        };
        let t = usage.tags.entry(tag).or_default();
        if alloc {
            usage.in_use += bytes;
            usage.peak = usage.peak.max(usage.in_use);
            t.in_use += bytes;
            t.blocks += 1;
            t.peak = t.peak.max(t.in_use);
        } else {
            usage.in_use -= bytes;
            t.in_use -= bytes;
            t.blocks -= 1;
        }
        if let Some(r) = s.record.as_mut() {
            r.push(AllocEvent {
                space,
                tag,
                bytes,
                alloc,
            });
        }
    }

    /// Usage of one space.
    pub fn usage(&self, space: Space) -> SpaceUsage {
        let s = self.lock();
        match space {
            Space::Device => s.device.clone(),
            Space::Host => s.host.clone(),
        }
    }

    /// Resets the peaks to what is held now, to measure one phase.
    pub fn reset_peaks(&self) {
        let mut guard = self.lock();
        let s = &mut *guard;
        for u in [&mut s.device, &mut s.host] {
            u.peak = u.in_use;
            for t in u.tags.values_mut() {
                t.peak = t.in_use;
            }
        }
    }

    /// Starts recording the allocation trace (clearing an earlier one).
    pub fn start_recording(&self) {
        self.lock().record = Some(Vec::new());
    }

    /// Stops recording and returns the allocation trace.
    pub fn take_recording(&self) -> Vec<AllocEvent> {
        self.lock().record.take().unwrap_or_default()
    }
}

/// A reference to bytes of a block, held by enqueued work. While it lives,
/// the block is not returned to its allocator and the host cannot take the
/// bytes it may write.
pub(crate) struct MemRef {
    pub(crate) mem: Arc<MemInner>,
    pub(crate) offset: usize,
    pub(crate) len: usize,
    pub(crate) write: bool,
}

impl MemRef {
    fn new(view: &View<'_>, write: bool) -> MemRef {
        {
            let mut u = view.mem.lock();
            if write {
                u.pending_writes += 1;
            } else {
                u.pending_reads += 1;
            }
        }
        MemRef {
            mem: view.mem.clone(),
            offset: view.offset,
            len: view.len,
            write,
        }
    }

    /// Takes the bytes for an operation running now; the returned guard
    /// gives them back.
    pub(crate) fn borrow(&self, holder: &str) -> Result<ActiveBorrow<'_>> {
        self.mem
            .try_borrow(self.offset, self.offset + self.len, self.write, holder)?;
        Ok(ActiveBorrow { r: self })
    }
}

impl Drop for MemRef {
    fn drop(&mut self) {
        let mut u = self.mem.lock();
        if self.write {
            u.pending_writes -= 1;
        } else {
            u.pending_reads -= 1;
        }
    }
}

/// Bytes an operation holds while it runs.
pub(crate) struct ActiveBorrow<'a> {
    r: &'a MemRef,
}

impl ActiveBorrow<'_> {
    pub(crate) fn bytes(&self) -> &[u8] {
        let r = self.r;
        if !r.mem.has_data || r.len == 0 {
            return &[];
        }
        // SAFETY: the block is alive (the MemRef holds its Arc), the range
        // was checked to lie inside it when the view was made, and the
        // registry guarantees no one writes these bytes while this borrow
        // lives.
        unsafe { std::slice::from_raw_parts((r.mem.addr() + r.offset) as *const u8, r.len) }
    }

    #[allow(clippy::mut_from_ref)]
    pub(crate) fn bytes_mut(&self) -> &mut [u8] {
        let r = self.r;
        if !r.mem.has_data || r.len == 0 || !r.write {
            return &mut [];
        }
        // SAFETY: as in `bytes`; in addition this borrow is a registered
        // write, so the registry guarantees no other reader or writer of
        // these bytes exists while it lives (a conflicting borrow fails).
        unsafe { std::slice::from_raw_parts_mut((r.mem.addr() + r.offset) as *mut u8, r.len) }
    }
}

impl Drop for ActiveBorrow<'_> {
    fn drop(&mut self) {
        self.r
            .mem
            .release_borrow(self.r.offset, self.r.offset + self.r.len, self.r.write);
    }
}

/// A range of bytes of a buffer (device or host) that operations read or
/// write. Cheap to copy; it borrows the buffer, so the buffer outlives the
/// view on the host side, and the operation holds the block until it is done.
#[derive(Clone, Copy)]
pub struct View<'a> {
    mem: &'a Arc<MemInner>,
    offset: usize,
    len: usize,
}

impl std::fmt::Debug for View<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "View({} `{}` {}..{})",
            self.mem.space.as_str(),
            self.mem.tag(),
            self.offset,
            self.offset + self.len
        )
    }
}

impl<'a> View<'a> {
    fn new(mem: &'a Arc<MemInner>, range: Range<usize>, what: &str) -> Result<View<'a>> {
        if range.start > range.end || range.end > mem.len() {
            return Err(RuntimeError::OutOfBounds {
                what: what.to_string(),
                tag: mem.tag(),
                start: range.start,
                end: range.end,
                len: mem.len(),
            });
        }
        Ok(View {
            mem,
            offset: range.start,
            len: range.end - range.start,
        })
    }

    /// Bytes in the view.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Offset of the view in its buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Where the bytes live.
    pub fn space(&self) -> Space {
        self.mem.space
    }

    /// The buffer's tag.
    pub fn tag(&self) -> &'static str {
        self.mem.tag()
    }

    /// A sub-range of this view, in bytes relative to it.
    pub fn bytes(&self, range: Range<usize>) -> Result<View<'a>> {
        if range.start > range.end || range.end > self.len {
            return Err(RuntimeError::OutOfBounds {
                what: "sub-view".into(),
                tag: self.mem.tag(),
                start: self.offset + range.start,
                end: self.offset + range.end,
                len: self.mem.len(),
            });
        }
        Ok(View {
            mem: self.mem,
            offset: self.offset + range.start,
            len: range.end - range.start,
        })
    }

    /// A sub-range of this view in elements of `T`.
    pub fn elems<T>(&self, range: Range<usize>) -> Result<View<'a>> {
        let s = std::mem::size_of::<T>();
        self.bytes(range.start * s..range.end * s)
    }

    /// Number of `T` elements in the view (rounded down).
    pub fn len_of<T>(&self) -> usize {
        self.len / std::mem::size_of::<T>().max(1)
    }

    /// Address of the first byte, for kernel launchers on a real device
    /// (on the meta device an offset above a fixed nonzero base).
    pub fn addr(&self) -> usize {
        self.mem.addr() + self.offset
    }

    /// Whether the two views share any byte.
    pub fn overlaps(&self, other: &View<'_>) -> bool {
        Arc::ptr_eq(self.mem, other.mem)
            && self.offset < other.offset + other.len
            && other.offset < self.offset + self.len
    }

    pub(crate) fn to_ref(self, write: bool) -> MemRef {
        MemRef::new(&self, write)
    }

    pub(crate) fn inner(&self) -> &'a Arc<MemInner> {
        self.mem
    }

    /// An owned handle on the same bytes, to hand to another thread (a
    /// peer rank of an in-process group).
    pub fn share(&self) -> SharedView {
        SharedView {
            mem: self.mem.clone(),
            offset: self.offset,
            len: self.len,
        }
    }
}

/// An owned handle on a range of a buffer: what one rank gives another so
/// that the other's stream can copy from it. It keeps the block allocated
/// while it lives, as an enqueued operation does; ordering the accesses
/// (events) is the holder's business. Take a [`View`] of it to use it.
#[derive(Clone)]
pub struct SharedView {
    mem: Arc<MemInner>,
    offset: usize,
    len: usize,
}

impl SharedView {
    /// The bytes as a view.
    pub fn view(&self) -> View<'_> {
        View {
            mem: &self.mem,
            offset: self.offset,
            len: self.len,
        }
    }

    /// Bytes in the view.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for SharedView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shared{:?}", self.view())
    }
}

/// Shared part of [`DeviceBuffer`] and [`HostBuffer`].
struct Owned {
    mem: Arc<MemInner>,
    ledger: Arc<MemoryLedger>,
    reserved: usize,
}

impl Owned {
    fn new(
        block: SlabBlock,
        space: Space,
        has_data: bool,
        ledger: Arc<MemoryLedger>,
        device_id: u64,
    ) -> Owned {
        let reserved = rounded(block.len());
        ledger.apply(space, block.tag(), reserved, true);
        Owned {
            mem: Arc::new(MemInner {
                block,
                space,
                has_data,
                device_id,
                uses: Mutex::new(UseState::default()),
            }),
            ledger,
            reserved,
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.ledger
            .apply(self.mem.space, self.mem.tag(), self.reserved, false);
    }
}

macro_rules! buffer_common {
    ($t:ty) => {
        impl $t {
            /// Size in bytes.
            pub fn len(&self) -> usize {
                self.o.mem.len()
            }
            /// Whether the buffer has zero bytes.
            pub fn is_empty(&self) -> bool {
                self.len() == 0
            }
            /// What the buffer is for.
            pub fn tag(&self) -> &'static str {
                self.o.mem.tag()
            }
            /// The whole buffer as a view.
            pub fn view(&self) -> View<'_> {
                View {
                    mem: &self.o.mem,
                    offset: 0,
                    len: self.o.mem.len(),
                }
            }
            /// A byte range of the buffer.
            pub fn bytes(&self, range: Range<usize>) -> Result<View<'_>> {
                View::new(&self.o.mem, range, "view")
            }
            /// An element range of the buffer, in elements of `T`.
            pub fn elems<T>(&self, range: Range<usize>) -> Result<View<'_>> {
                let s = std::mem::size_of::<T>();
                View::new(&self.o.mem, range.start * s..range.end * s, "view")
            }
            /// Number of `T` elements in the buffer (rounded down).
            pub fn len_of<T>(&self) -> usize {
                self.len() / std::mem::size_of::<T>().max(1)
            }
        }
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    f,
                    "{}(`{}`, {} bytes)",
                    stringify!($t),
                    self.tag(),
                    self.len()
                )
            }
        }
    };
}

/// Device memory: a block of the device's slab region. Dropping it releases
/// the block (once the work using it is done).
pub struct DeviceBuffer {
    o: Owned,
}

buffer_common!(DeviceBuffer);

impl DeviceBuffer {
    pub(crate) fn new(
        block: SlabBlock,
        has_data: bool,
        ledger: Arc<MemoryLedger>,
        device_id: u64,
    ) -> Self {
        DeviceBuffer {
            o: Owned::new(block, Space::Device, has_data, ledger, device_id),
        }
    }
}

/// Host memory: a block of the device's pinned host arena. The host reads
/// and writes it through [`HostBuffer::read`] and [`HostBuffer::write`],
/// which fail while enqueued work uses the bytes.
pub struct HostBuffer {
    o: Owned,
}

buffer_common!(HostBuffer);

/// Host access to a host buffer's bytes, held as a borrow in the buffer's
/// registry: enqueued work that needs conflicting access fails instead of
/// racing.
pub struct HostRead<'a, T> {
    mem: &'a MemInner,
    data: &'a [T],
}

impl<T> std::ops::Deref for HostRead<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.data
    }
}

impl<T> Drop for HostRead<'_, T> {
    fn drop(&mut self) {
        self.mem.release_borrow(0, self.mem.len(), false);
    }
}

impl HostBuffer {
    pub(crate) fn new(
        block: SlabBlock,
        has_data: bool,
        ledger: Arc<MemoryLedger>,
        device_id: u64,
    ) -> Self {
        HostBuffer {
            o: Owned::new(block, Space::Host, has_data, ledger, device_id),
        }
    }

    fn check_host_access(&self, write: bool, what: &'static str) -> Result<()> {
        let mem = &self.o.mem;
        if !mem.has_data {
            return Err(RuntimeError::NoData {
                what: format!("{what} of host buffer `{}`", mem.tag()),
            });
        }
        let u = mem.lock();
        let busy = u.pending_writes > 0 || (write && u.pending_reads > 0);
        if busy {
            return Err(RuntimeError::BufferBusy {
                tag: mem.tag(),
                what,
                pending: format!(
                    "{} pending reads, {} pending writes",
                    u.pending_reads, u.pending_writes
                ),
            });
        }
        Ok(())
    }

    /// Reads the buffer as a slice of `T` (its length rounded down to whole
    /// elements). Fails while enqueued work may still write it.
    pub fn read<T: bytemuck::Pod>(&self) -> Result<HostRead<'_, T>> {
        self.check_host_access(false, "reading")?;
        let mem = &*self.o.mem;
        mem.try_borrow(0, mem.len(), false, "host read")?;
        let n = mem.len() / std::mem::size_of::<T>().max(1);
        if mem.addr() % std::mem::align_of::<T>() != 0 {
            mem.release_borrow(0, mem.len(), false);
            return Err(RuntimeError::Invalid(format!(
                "host buffer `{}` is not aligned for {}",
                mem.tag(),
                std::any::type_name::<T>()
            )));
        }
        let data = if n == 0 {
            &[][..]
        } else {
            // SAFETY: the block is alive while `self` is, the first `n`
            // elements lie inside it, the address is aligned for T (checked
            // above), any bit pattern is a valid T (Pod), and the registered
            // read borrow makes conflicting writers fail until it is dropped.
            unsafe { std::slice::from_raw_parts(mem.addr() as *const T, n) }
        };
        Ok(HostRead { mem, data })
    }

    /// Runs `f` over the buffer as a mutable slice of `T`. Fails while
    /// enqueued work uses the buffer.
    pub fn write<T: bytemuck::Pod, R>(&mut self, f: impl FnOnce(&mut [T]) -> R) -> Result<R> {
        self.check_host_access(true, "writing")?;
        let mem = &*self.o.mem;
        if mem.addr() % std::mem::align_of::<T>() != 0 {
            return Err(RuntimeError::Invalid(format!(
                "host buffer `{}` is not aligned for {}",
                mem.tag(),
                std::any::type_name::<T>()
            )));
        }
        mem.try_borrow(0, mem.len(), true, "host write")?;
        let n = mem.len() / std::mem::size_of::<T>().max(1);
        let slice: &mut [T] = if n == 0 {
            &mut []
        } else {
            // SAFETY: as in `read`; in addition `&mut self` and the
            // registered write borrow exclude every other access while `f`
            // runs.
            unsafe { std::slice::from_raw_parts_mut(mem.addr() as *mut T, n) }
        };
        let r = f(slice);
        mem.release_borrow(0, mem.len(), true);
        Ok(r)
    }

    /// Copies `data` into the start of the buffer.
    pub fn copy_from<T: bytemuck::Pod>(&mut self, data: &[T]) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.len() > self.len() {
            return Err(RuntimeError::OutOfBounds {
                what: "host copy_from".into(),
                tag: self.tag(),
                start: 0,
                end: bytes.len(),
                len: self.len(),
            });
        }
        self.write::<u8, _>(|dst| dst[..bytes.len()].copy_from_slice(bytes))
    }

    /// The first `n` elements of the buffer as a vector.
    pub fn to_vec<T: bytemuck::Pod>(&self, n: usize) -> Result<Vec<T>> {
        let r = self.read::<T>()?;
        if n > r.len() {
            return Err(RuntimeError::OutOfBounds {
                what: "host to_vec".into(),
                tag: self.tag(),
                start: 0,
                end: n * std::mem::size_of::<T>(),
                len: self.len(),
            });
        }
        Ok(r[..n].to_vec())
    }
}
