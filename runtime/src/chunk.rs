//! Chunk guards: RAII values whose moves between device and host are
//! asynchronous copies.
//!
//! A chunk (q, k, v, o, lse, dq, x, ... of one sequence chunk) is in one of
//! four states, each a type:
//! - [`Resident`]: on the device, usable by kernels;
//! - offloading, then [`HostChunk`]: a device-to-host copy was enqueued on the
//!   d2h stream after the compute stream's work so far; the device block goes
//!   back to the slab when that copy completes, not before;
//! - [`Pending`]: a host-to-device copy was enqueued on the h2d stream; the
//!   only thing to do with it is [`Pending::ready`], which makes the compute
//!   stream wait for the copy and returns the [`Resident`]. Using a chunk
//!   before it arrived is therefore impossible by type.
//!
//! A [`DoubleBuffer`] keeps two device slots for KV chunks so the next
//! chunk's copy overlaps this chunk's attention; a slot is refilled only
//! after the compute stream finished with it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::device::Device;
use crate::error::{Result, RuntimeError};
use crate::memory::{DeviceBuffer, HostBuffer, HostRead, View};
use crate::stream::{Event, Stream};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Moves chunks: produced and consumed on `compute`, prefetched on `h2d`,
/// offloaded on `d2h`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ChunkMover {
    device: Device,
    compute: Stream,
    h2d: Stream,
    d2h: Stream,
}

impl ChunkMover {
    /// A mover over the device's own compute, h2d and d2h streams.
    pub fn new(device: &Device) -> ChunkMover {
        ChunkMover {
            device: device.clone(),
            compute: device.compute().clone(),
            h2d: device.h2d().clone(),
            d2h: device.d2h().clone(),
        }
    }

    /// A mover over other streams of the device.
    pub fn with_streams(device: &Device, compute: &Stream, h2d: &Stream, d2h: &Stream) -> Self {
        ChunkMover {
            device: device.clone(),
            compute: compute.clone(),
            h2d: h2d.clone(),
            d2h: d2h.clone(),
        }
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The stream chunks are produced and consumed on.
    pub fn compute(&self) -> &Stream {
        &self.compute
    }

    /// A new resident chunk of `bytes` (uninitialized device memory).
    pub fn alloc(&self, bytes: usize, tag: &'static str) -> Result<Resident> {
        Ok(Resident::new(self.device.alloc(bytes, tag)?))
    }

    /// Enqueues the copy of `chunk` to a new host block, after the compute
    /// stream's work so far, and keeps `chunk` resident.
    pub fn copy_to_host(&self, chunk: &Resident) -> Result<HostChunk> {
        let buf = chunk.buffer()?;
        self.copy_out(buf)
    }

    fn copy_out(&self, buf: &DeviceBuffer) -> Result<HostChunk> {
        let produced = self.compute.record()?;
        self.d2h.wait(&produced)?;
        let host = self.device.alloc_host(buf.len(), buf.tag())?;
        self.d2h.copy(buf.view(), host.view())?;
        let written = self.d2h.record()?;
        Ok(HostChunk { buf: host, written })
    }

    /// Offloads `chunk`: enqueues its copy to the host after the compute
    /// stream's work so far and gives up the device block, which returns to
    /// the slab once the copy completed.
    pub fn offload(&self, mut chunk: Resident) -> Result<HostChunk> {
        let buf = chunk.take()?;
        self.copy_out(&buf)
        // `buf` drops here: released in program order, returned to the slab
        // by the copy when it finishes.
    }

    /// Enqueues the copy of `chunk` into a new device block on the h2d
    /// stream (after the chunk's own offload copy, if it is still running).
    pub fn prefetch(&self, chunk: &HostChunk) -> Result<Pending> {
        let buf = self.device.alloc(chunk.len(), chunk.tag())?;
        self.h2d.wait(&chunk.written)?;
        self.h2d.copy(chunk.buf.view(), buf.view())?;
        let copied = self.h2d.record()?;
        Ok(Pending { buf, copied })
    }

    /// Wraps data already in the host arena (inputs, labels) as a chunk.
    pub fn host_chunk(&self, buf: HostBuffer) -> Result<HostChunk> {
        // Nothing is copying into it: an event recorded now is complete as
        // soon as the d2h stream's earlier work is, which is all we need.
        let written = self.d2h.record()?;
        Ok(HostChunk { buf, written })
    }
}

/// What a resident chunk does when dropped.
enum DropPolicy {
    Release,
    Offload { mover: ChunkMover, slot: HostSlot },
}

/// A chunk on the device. Dropping it releases it, or offloads it into a
/// [`HostSlot`] when made with [`Resident::offload_on_drop`].
pub struct Resident {
    buf: Option<DeviceBuffer>,
    policy: DropPolicy,
}

impl std::fmt::Debug for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Resident({:?})", self.buf)
    }
}

impl Resident {
    /// A resident chunk owning `buf`; dropping it releases `buf`.
    pub fn new(buf: DeviceBuffer) -> Resident {
        Resident {
            buf: Some(buf),
            policy: DropPolicy::Release,
        }
    }

    fn take(&mut self) -> Result<DeviceBuffer> {
        self.buf
            .take()
            .ok_or_else(|| RuntimeError::Invalid("resident chunk was already moved out".into()))
    }

    /// The device buffer.
    pub fn buffer(&self) -> Result<&DeviceBuffer> {
        self.buf
            .as_ref()
            .ok_or_else(|| RuntimeError::Invalid("resident chunk was already moved out".into()))
    }

    /// The whole chunk as a view (an empty view never exists: a moved-out
    /// chunk cannot be reached, since moving out consumes it).
    pub fn view(&self) -> Result<View<'_>> {
        Ok(self.buffer()?.view())
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.buf.as_ref().map_or(0, DeviceBuffer::len)
    }

    /// Whether the chunk has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buffer, leaving the guard's drop policy behind.
    pub fn into_buffer(mut self) -> Result<DeviceBuffer> {
        self.policy = DropPolicy::Release;
        self.take()
    }

    /// Makes dropping this chunk offload it through `mover`; the host copy
    /// (or the error of making it) lands in the returned slot.
    pub fn offload_on_drop(mut self, mover: &ChunkMover) -> (Resident, HostSlot) {
        let slot = HostSlot::default();
        self.policy = DropPolicy::Offload {
            mover: mover.clone(),
            slot: slot.clone(),
        };
        (self, slot)
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        if let (Some(buf), DropPolicy::Offload { mover, slot }) = (self.buf.take(), &self.policy) {
            let r = mover.copy_out(&buf);
            *lock(&slot.0) = Some(r);
        }
    }
}

/// Where a chunk offloaded on drop lands.
#[derive(Clone, Default)]
pub struct HostSlot(Arc<Mutex<Option<Result<HostChunk>>>>);

impl HostSlot {
    /// The host chunk (or the error of offloading it), once the resident
    /// chunk was dropped; None before.
    pub fn take(&self) -> Option<Result<HostChunk>> {
        lock(&self.0).take()
    }
}

/// A chunk in the host arena, possibly still being written by its offload
/// copy (`written` completes when it is done).
pub struct HostChunk {
    buf: HostBuffer,
    written: Event,
}

impl std::fmt::Debug for HostChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostChunk({:?})", self.buf)
    }
}

impl HostChunk {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the chunk has no bytes.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// What the chunk holds.
    pub fn tag(&self) -> &'static str {
        self.buf.tag()
    }

    /// Whether the offload copy has completed.
    pub fn is_written(&self) -> bool {
        self.written.is_complete()
    }

    /// The event that completes when the chunk's bytes are all on the host.
    pub fn written(&self) -> &Event {
        &self.written
    }

    /// The host buffer, for reads by the host once written.
    pub fn read<T: bytemuck::Pod>(&self) -> Result<HostRead<'_, T>> {
        self.written
            .wait_timeout(std::time::Duration::from_secs(600))?;
        self.buf.read()
    }

    /// The host buffer as a view (for copies by other streams).
    pub fn view(&self) -> View<'_> {
        self.buf.view()
    }
}

/// A chunk on its way to the device. The only way to use it is
/// [`Pending::ready`].
pub struct Pending {
    buf: DeviceBuffer,
    copied: Event,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pending({:?})", self.buf)
    }
}

impl Pending {
    /// Makes `stream` wait for the copy and returns the resident chunk.
    pub fn ready(self, stream: &Stream) -> Result<Resident> {
        stream.wait(&self.copied)?;
        Ok(Resident::new(self.buf))
    }

    /// Whether the copy has already completed.
    pub fn is_copied(&self) -> bool {
        self.copied.is_complete()
    }
}

struct Slot {
    buf: DeviceBuffer,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// A pending copy or a guard uses the slot.
    busy: bool,
    /// Completes when the last user of the slot is done with it.
    released: Option<Event>,
}

/// Two device slots that chunks are prefetched into in turn, so the copy of
/// the next chunk overlaps the use of this one. A slot is refilled only after
/// the compute stream finished with its previous chunk; asking for a third
/// slot while both are in use is an error.
pub struct DoubleBuffer {
    mover: ChunkMover,
    slots: [Arc<Slot>; 2],
    next: AtomicUsize,
    slot_bytes: usize,
}

impl DoubleBuffer {
    /// Two slots of `slot_bytes` each.
    pub fn new(mover: &ChunkMover, slot_bytes: usize, tag: &'static str) -> Result<Self> {
        let mk = || -> Result<Arc<Slot>> {
            Ok(Arc::new(Slot {
                buf: mover.device.alloc(slot_bytes, tag)?,
                state: Mutex::new(SlotState::default()),
            }))
        };
        Ok(DoubleBuffer {
            mover: mover.clone(),
            slots: [mk()?, mk()?],
            next: AtomicUsize::new(0),
            slot_bytes,
        })
    }

    /// Size of each slot.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Enqueues the copy of `chunk` into the next slot, after the compute
    /// stream released that slot's previous chunk.
    pub fn prefetch(&self, chunk: &HostChunk) -> Result<PendingSlot> {
        if chunk.len() > self.slot_bytes {
            return Err(RuntimeError::Invalid(format!(
                "double buffer `{}`: chunk `{}` of {} bytes exceeds the slot size {}",
                self.slots[0].buf.tag(),
                chunk.tag(),
                chunk.len(),
                self.slot_bytes
            )));
        }
        let i = self.next.load(Ordering::Relaxed);
        let slot = &self.slots[i];
        let released = {
            let mut st = lock(&slot.state);
            if st.busy {
                return Err(RuntimeError::Invalid(format!(
                    "double buffer `{}`: slot {i} is still in use; drop its guard before \
                     prefetching a third chunk",
                    slot.buf.tag()
                )));
            }
            st.busy = true;
            st.released.take()
        };
        let enqueue = || -> Result<Event> {
            let h2d = &self.mover.h2d;
            if let Some(ev) = &released {
                h2d.wait(ev)?;
            }
            h2d.wait(&chunk.written)?;
            h2d.copy(chunk.buf.view(), slot.buf.bytes(0..chunk.len())?)?;
            h2d.record()
        };
        match enqueue() {
            Ok(copied) => {
                self.next.store(1 - i, Ordering::Relaxed);
                Ok(PendingSlot {
                    slot: Some(slot.clone()),
                    copied,
                    len: chunk.len(),
                    compute: self.mover.compute.clone(),
                })
            }
            Err(e) => {
                let mut st = lock(&slot.state);
                st.busy = false;
                st.released = released;
                Err(e)
            }
        }
    }
}

/// A chunk being copied into a slot of a [`DoubleBuffer`].
pub struct PendingSlot {
    slot: Option<Arc<Slot>>,
    copied: Event,
    len: usize,
    compute: Stream,
}

impl PendingSlot {
    /// Makes the compute stream wait for the copy; returns the slot's guard.
    pub fn ready(mut self) -> Result<SlotGuard> {
        self.compute.wait(&self.copied)?;
        let slot = self
            .slot
            .take()
            .ok_or_else(|| RuntimeError::Invalid("pending slot already used".into()))?;
        Ok(SlotGuard {
            slot,
            len: self.len,
            compute: self.compute.clone(),
        })
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        // Never made ready: the slot is free once the copy into it is done.
        if let Some(slot) = self.slot.take() {
            let mut st = lock(&slot.state);
            st.busy = false;
            st.released = Some(self.copied.clone());
        }
    }
}

/// A chunk in a slot of a [`DoubleBuffer`], ready for the compute stream.
/// Dropping it hands the slot back after the compute work enqueued so far.
pub struct SlotGuard {
    slot: Arc<Slot>,
    len: usize,
    compute: Stream,
}

impl SlotGuard {
    /// The chunk's bytes in the slot.
    pub fn view(&self) -> View<'_> {
        // `len <= slot size` was checked when the copy was enqueued.
        self.slot
            .buf
            .bytes(0..self.len)
            .unwrap_or_else(|_| self.slot.buf.view())
    }

    /// Size of the chunk in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the chunk has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let released = self.compute.record().ok();
        let mut st = lock(&self.slot.state);
        st.busy = false;
        // If recording failed the stream is closed or broken; a later
        // prefetch fails on the same stream anyway.
        st.released = released;
    }
}
