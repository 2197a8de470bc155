//! The in-process group: P ranks as threads of one process, each with its
//! own device (or its own stream of a shared device).
//!
//! Each collective is one job per rank, enqueued on the rank's stream. A
//! stream only touches memory of its own device, so the ranks exchange bytes
//! through the group's shared state, a mailbox per rank:
//!
//! 1. the job deposits what it sends (and a description of the call) in its
//!    rank's mailbox;
//! 2. it waits at the group's barrier, with the group's timeout;
//! 3. it checks that every rank called the same collective with fitting
//!    arguments, then reads what it receives from the other ranks' mailboxes
//!    into its own buffer.
//!
//! Mailboxes come in two sets used by alternate collectives, so a fast rank
//! can deposit for collective k+1 while a slow one still reads collective
//! k; it cannot get to k+2 before every rank has finished k, because k+1's
//! barrier needs them all. One barrier per phase, no trailing barrier.
//!
//! All-to-all and all-reduce, the collectives that move the most bytes,
//! stream instead of staging whole buffers: after the barrier (which still
//! checks the calls), every ordered pair of ranks has a ring of
//! [`GroupConfig::ring_depth`] pieces of [`GroupConfig::piece_bytes`]; the
//! sender copies a piece in, the receiver copies it out as soon as it is
//! there. The ring stays in cache, so each byte goes through memory about as
//! often as in a plain copy (read from the source buffer, written to the
//! destination), where a whole-buffer mailbox would write and read it once
//! more. All-reduce is a reduce-scatter over the rings, then an all-gather:
//! rank r receives piece k of slice r of every buffer and reduces it in
//! rank order, in place in its own buffer and in the same pass into one
//! slot of its fan-out (a ring with one sender and P - 1 receivers, so the
//! result is written once however many peers read it).
//!
//! A rank that never arrives makes the others fail with
//! [`CommError::Timeout`] naming it; any failure aborts the group, so every
//! later collective fails at once instead of waiting. On the meta device no
//! job runs: each collective only advances the stream's clock.
//!
//! On cuda the exchange happens at enqueue time instead (`run_on_gpu`): the
//! ranks swap events and buffer handles at the barrier, and each rank's
//! stream pulls from its peers' buffers with device-to-device copies and
//! reduces with a PTX kernel, ordered by the events, while the host goes
//! on. So there a collective returns only once every rank has called it.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use fpdt_runtime::{
    CpuConfig, Device, DeviceKind, Event, HostBuffer, MetaConfig, SharedView, Stream, View, Work,
};

use crate::communicator::{check, traffic, work, Communicator};
use crate::error::{duplicate, CommError, Result};
use crate::types::{reduce_in_place, reduce_into, DType, ReduceOp};

/// Configuration of an in-process group.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Name in errors and traces.
    pub name: String,
    /// Longest a rank waits at a collective for the others before the
    /// collective (and the group) fails with [`CommError::Timeout`].
    pub timeout: Duration,
    /// Bytes of one piece of the all-to-all and all-reduce streams
    /// (rounded down to whole elements for all-reduce, at least one).
    /// Small enough that `ring_depth` pieces per pair of ranks stay in
    /// cache, large enough that the hand-over per piece costs little.
    pub piece_bytes: usize,
    /// Pieces a sender may be ahead of its receiver, per pair of ranks.
    pub ring_depth: usize,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            name: "inproc".into(),
            timeout: Duration::from_secs(120),
            // Tuned on the 2-core bench machine (bench/README.md,
            // Collectives): 64 KiB pieces lost 10-20 points of the memcpy
            // ratio to hand-overs, 1 MiB ones gained nothing; depth 2 and 4
            // measured alike at P = 2, and 2 keeps the rings of P = 4 (24
            // pairs) at 6 MiB.
            piece_bytes: 256 << 10,
            ring_depth: 2,
        }
    }
}

/// Constructors of in-process groups.
pub struct InProcessGroup;

impl InProcessGroup {
    /// A group of `devices.len()` ranks; rank `r` runs on `devices[r]`.
    /// The devices must be of one kind (cpu, meta or cuda; on cuda the
    /// collectives run on the GPU's streams, see `run_on_gpu`). Several ranks may share
    /// one device if each issues its collectives on its own stream.
    pub fn create(devices: Vec<Device>, cfg: GroupConfig) -> Result<Vec<InProcessComm>> {
        let world = devices.len();
        if world == 0 {
            return Err(CommError::Invalid(format!(
                "in-process group `{}`: needs at least one device, got none",
                cfg.name
            )));
        }
        let kind = devices[0].kind();
        if let Some(d) = devices.iter().find(|d| d.kind() != kind) {
            return Err(CommError::Invalid(format!(
                "in-process group `{}`: devices must be of one kind, but `{}` is {} and `{}` is {kind}",
                cfg.name,
                d.name(),
                d.kind(),
                devices[0].name()
            )));
        }
        if cfg.timeout.is_zero() {
            return Err(CommError::Invalid(format!(
                "in-process group `{}`: timeout must be positive, got 0",
                cfg.name
            )));
        }
        if cfg.piece_bytes == 0 || cfg.ring_depth == 0 {
            return Err(CommError::Invalid(format!(
                "in-process group `{}`: piece_bytes and ring_depth must be positive, got {} and {}",
                cfg.name, cfg.piece_bytes, cfg.ring_depth
            )));
        }
        let shared = Arc::new(Shared::new(cfg, world));
        Ok(devices
            .into_iter()
            .enumerate()
            .map(|(rank, device)| InProcessComm {
                rank,
                world,
                device,
                shared: shared.clone(),
                next_seq: AtomicU64::new(0),
            })
            .collect())
    }

    /// A group of `world` cpu devices made from `cpu` (rank `r`'s device is
    /// named `<cpu.name>-r<r>`).
    pub fn cpu(world: usize, cpu: &CpuConfig, cfg: GroupConfig) -> Result<Vec<InProcessComm>> {
        let devices = (0..world)
            .map(|r| {
                Device::cpu(CpuConfig {
                    name: format!("{}-r{r}", cpu.name),
                    ..cpu.clone()
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Self::create(devices, cfg)
    }

    /// A group of `world` meta devices made from `meta`.
    pub fn meta(world: usize, meta: &MetaConfig, cfg: GroupConfig) -> Result<Vec<InProcessComm>> {
        let devices = (0..world)
            .map(|r| {
                Device::meta(MetaConfig {
                    name: format!("{}-r{r}", meta.name),
                    ..meta.clone()
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Self::create(devices, cfg)
    }
}

/// One rank of an in-process group.
pub struct InProcessComm {
    rank: usize,
    world: usize,
    device: Device,
    shared: Arc<Shared>,
    next_seq: AtomicU64,
}

impl std::fmt::Debug for InProcessComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "InProcessComm(group `{}`, rank {}/{}, {:?})",
            self.shared.name, self.rank, self.world, self.device
        )
    }
}

/// A call as the ranks compare it.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    AllToAll {
        bytes: usize,
    },
    AllToAllV {
        send: Vec<usize>,
        recv: Vec<usize>,
    },
    AllReduce {
        bytes: usize,
        dtype: DType,
        op: ReduceOp,
    },
    ReduceScatter {
        recv_bytes: usize,
        dtype: DType,
        op: ReduceOp,
    },
    AllGather {
        send_bytes: usize,
    },
    Broadcast {
        bytes: usize,
        root: usize,
    },
    Barrier,
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::AllToAll { .. } => "all_to_all",
            Op::AllToAllV { .. } => "all_to_all_v",
            Op::AllReduce { .. } => "all_reduce",
            Op::ReduceScatter { .. } => "reduce_scatter",
            Op::AllGather { .. } => "all_gather",
            Op::Broadcast { .. } => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

/// Why the group stopped.
#[derive(Debug, Clone)]
enum Broken {
    Timeout { what: String, secs: f64 },
    Aborted { rank: usize, reason: String },
}

impl Broken {
    fn to_error(&self) -> CommError {
        match self {
            Broken::Timeout { what, secs } => CommError::Timeout {
                what: what.clone(),
                secs: *secs,
            },
            Broken::Aborted { rank, reason } => CommError::Aborted {
                rank: *rank,
                reason: reason.clone(),
            },
        }
    }
}

struct BarrierState {
    generation: u64,
    arrived: Vec<bool>,
    count: usize,
    broken: Option<Broken>,
}

/// One rank's mailbox in one of the two sets.
#[derive(Default)]
struct Slot {
    op: Mutex<Option<Op>>,
    data: RwLock<Vec<u8>>,
    /// On cuda: what the rank's stream offers its peers.
    gpu: Mutex<Option<GpuPost>>,
}

/// A rank's part of a collective on cuda: the event after which its
/// buffers are ready, the buffers, and the event after which it has
/// finished reading its peers'.
#[derive(Clone)]
struct GpuPost {
    ready: Event,
    send: Option<SharedView>,
    recv: Option<SharedView>,
    /// All-reduce: after the rank's slice is reduced.
    mid: Option<Event>,
    done: Option<Event>,
}

/// One piece of a ring. The words keep the bytes 8-byte aligned, so the
/// reductions take their vectorized path.
#[derive(Default)]
struct Piece {
    words: Vec<u64>,
    len: usize,
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }

    /// The piece resized to `len` bytes (contents unspecified).
    fn bytes_mut(&mut self, len: usize) -> &mut [u8] {
        self.words.resize(len.div_ceil(8), 0);
        self.len = len;
        &mut bytemuck::cast_slice_mut(&mut self.words)[..len]
    }

    fn fill(&mut self, src: &[u8]) {
        self.bytes_mut(src.len()).copy_from_slice(src);
    }
}

/// The pieces from one rank to another: one sender, one receiver. The
/// counters only grow, over every collective that uses the ring; both
/// sides derive the same number of pieces per collective from the
/// (validated) arguments, so they stay in step without a reset. Piece `k`
/// lives in slot `k % depth`; the sender writes it once `consumed + depth >
/// k`, the receiver reads it once `produced > k`. The slot's mutex is never
/// contended (the counters hand the slot over); it lets safe code share it.
struct Ring {
    slots: Vec<Mutex<Piece>>,
    produced: AtomicU64,
    consumed: AtomicU64,
}

impl Ring {
    fn new(depth: usize) -> Ring {
        Ring {
            slots: (0..depth).map(|_| Mutex::new(Piece::default())).collect(),
            produced: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
        }
    }
}

/// The pieces one rank sends alike to every other rank: one sender, P - 1
/// receivers, each with its own count; piece `k` is written once every
/// receiver has taken piece `k - depth`. Receivers read a slot at the same
/// time (a read lock each); the sender's write lock is never contended.
struct Fanout {
    slots: Vec<RwLock<Piece>>,
    produced: AtomicU64,
    /// `consumed[to]`; the sender's own entry is unused.
    consumed: Vec<AtomicU64>,
}

impl Fanout {
    fn new(depth: usize, world: usize) -> Fanout {
        Fanout {
            slots: (0..depth).map(|_| RwLock::new(Piece::default())).collect(),
            produced: AtomicU64::new(0),
            consumed: (0..world).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// Where a rank sleeps while its rings are not ready; `waiters` lets the
/// side that makes progress skip the wake-up when nobody sleeps.
#[derive(Default)]
struct Doorbell {
    lock: Mutex<()>,
    cv: Condvar,
    waiters: AtomicUsize,
}

/// Polls of a ring counter before a rank sleeps on its doorbell: about a
/// microsecond, enough for a peer that is a piece behind on another core.
const SPIN_POLLS: usize = 200;

/// Longest sleep between checks of the deadline and of the group's state
/// (a wake-up normally comes first).
const NAP: Duration = Duration::from_millis(10);

struct Shared {
    name: String,
    world: usize,
    timeout: Duration,
    barrier: Mutex<BarrierState>,
    cv: Condvar,
    sets: [Vec<Slot>; 2],
    errors: Vec<Mutex<Option<CommError>>>,
    piece_bytes: usize,
    depth: usize,
    /// `rings[from * world + to]`: all-to-all pieces and all-reduce's
    /// reduce-scatter.
    rings: Vec<Ring>,
    /// `fanouts[from]`: all-reduce's all-gather, one copy of each reduced
    /// piece for every peer.
    fanouts: Vec<Fanout>,
    bells: Vec<Doorbell>,
}

/// Which way a rank waits on a ring.
#[derive(Clone, Copy)]
enum Side {
    /// The sender, for a free slot.
    Send,
    /// The receiver, for a filled slot.
    Recv,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

fn fill(slot: &RwLock<Vec<u8>>, bytes: &[u8]) {
    let mut d = write(slot);
    d.clear();
    d.extend_from_slice(bytes);
}

/// Elements `[r*n/p, (r+1)*n/p)` as a byte range: rank `r`'s slice of an
/// all-reduce of `n` elements.
fn part(r: usize, p: usize, n: usize, size: usize) -> Range<usize> {
    (r * n / p) * size..((r + 1) * n / p) * size
}

fn missing(arrived: &[bool]) -> Vec<usize> {
    arrived
        .iter()
        .enumerate()
        .filter(|(_, a)| !**a)
        .map(|(r, _)| r)
        .collect()
}

impl Shared {
    fn new(cfg: GroupConfig, world: usize) -> Shared {
        let set = || (0..world).map(|_| Slot::default()).collect::<Vec<_>>();
        Shared {
            name: cfg.name,
            world,
            timeout: cfg.timeout,
            piece_bytes: cfg.piece_bytes,
            depth: cfg.ring_depth,
            rings: (0..world * world)
                .map(|_| Ring::new(cfg.ring_depth))
                .collect(),
            fanouts: (0..world)
                .map(|_| Fanout::new(cfg.ring_depth, world))
                .collect(),
            bells: (0..world).map(|_| Doorbell::default()).collect(),
            barrier: Mutex::new(BarrierState {
                generation: 0,
                arrived: vec![false; world],
                count: 0,
                broken: None,
            }),
            cv: Condvar::new(),
            sets: [set(), set()],
            errors: (0..world).map(|_| Mutex::new(None)).collect(),
        }
    }

    fn broken(&self) -> Option<CommError> {
        lock(&self.barrier).broken.as_ref().map(Broken::to_error)
    }

    fn abort(&self, rank: usize, reason: &str) {
        let mut st = lock(&self.barrier);
        if st.broken.is_none() {
            st.broken = Some(Broken::Aborted {
                rank,
                reason: reason.to_string(),
            });
        }
        drop(st);
        self.cv.notify_all();
        self.ring_all();
    }

    /// Wakes every rank sleeping on a ring (the group broke).
    fn ring_all(&self) {
        for b in &self.bells {
            let _g = lock(&b.lock);
            b.cv.notify_all();
        }
    }

    /// Wakes `rank` if it sleeps on a ring.
    fn ring(&self, rank: usize) {
        let b = &self.bells[rank];
        // SeqCst pairs with the sleeper's increment before its last check:
        // either it sees the counter this side just moved, or this side sees
        // it waiting.
        if b.waiters.load(Ordering::SeqCst) > 0 {
            let _g = lock(&b.lock);
            b.cv.notify_all();
        }
    }

    fn ring_of(&self, from: usize, to: usize) -> &Ring {
        &self.rings[from * self.world + to]
    }

    /// Waits until `ready`, the group broke, or `timeout` without progress.
    /// `me` sleeps on its doorbell; `peer` is the rank it waits for.
    #[allow(clippy::too_many_arguments)]
    fn wait_ring(
        &self,
        me: usize,
        peer: usize,
        side: Side,
        seq: u64,
        what: &str,
        piece: u64,
        ready: impl Fn() -> bool,
    ) -> Result<()> {
        for _ in 0..SPIN_POLLS {
            if ready() {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        let bell = &self.bells[me];
        let deadline = Instant::now() + self.timeout;
        let mut g = lock(&bell.lock);
        bell.waiters.fetch_add(1, Ordering::SeqCst);
        let r = loop {
            if ready() {
                break Ok(());
            }
            if let Some(e) = self.broken() {
                break Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                let doing = match side {
                    Side::Send => "take",
                    Side::Recv => "send",
                };
                let b = Broken::Timeout {
                    what: format!(
                        "rank {peer} of group `{}` to {doing} piece {piece} of collective #{seq} \
                         ({what}) to or from rank {me}",
                        self.name
                    ),
                    secs: self.timeout.as_secs_f64(),
                };
                let e = b.to_error();
                lock(&self.barrier).broken.get_or_insert(b);
                break Err(e);
            }
            g = bell
                .cv
                .wait_timeout(g, NAP.min(deadline - now))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        bell.waiters.fetch_sub(1, Ordering::SeqCst);
        drop(g);
        if r.is_err() {
            self.cv.notify_all();
            self.ring_all();
        }
        r
    }

    /// Waits for a free slot on ring `set` from `from` to `to`; the slot,
    /// to fill and hand over with [`Shared::sent`].
    fn send_slot(
        &self,
        from: usize,
        to: usize,
        seq: u64,
        what: &str,
    ) -> Result<MutexGuard<'_, Piece>> {
        let ring = self.ring_of(from, to);
        let k = ring.produced.load(Ordering::Relaxed);
        let depth = self.depth as u64;
        self.wait_ring(from, to, Side::Send, seq, what, k, || {
            ring.consumed.load(Ordering::SeqCst) + depth > k
        })?;
        Ok(lock(&ring.slots[(k % depth) as usize]))
    }

    /// Hands the slot from [`Shared::send_slot`] to the receiver.
    fn sent(&self, slot: MutexGuard<'_, Piece>, from: usize, to: usize) {
        drop(slot);
        self.ring_of(from, to)
            .produced
            .fetch_add(1, Ordering::SeqCst);
        self.ring(to);
    }

    /// Waits for the next piece on ring `set` from `from` to `to`; the slot,
    /// to read and give back with [`Shared::taken`].
    fn recv_slot(
        &self,
        from: usize,
        to: usize,
        seq: u64,
        what: &str,
    ) -> Result<MutexGuard<'_, Piece>> {
        let ring = self.ring_of(from, to);
        let k = ring.consumed.load(Ordering::Relaxed);
        self.wait_ring(to, from, Side::Recv, seq, what, k, || {
            ring.produced.load(Ordering::SeqCst) > k
        })?;
        Ok(lock(&ring.slots[(k % self.depth as u64) as usize]))
    }

    /// Gives the slot from [`Shared::recv_slot`] back to the sender.
    fn taken(&self, slot: MutexGuard<'_, Piece>, from: usize, to: usize) {
        drop(slot);
        self.ring_of(from, to)
            .consumed
            .fetch_add(1, Ordering::SeqCst);
        self.ring(from);
    }

    /// Waits until every peer of `from` has taken the piece that last used
    /// the next fan-out slot; the slot, to fill and hand over with
    /// [`Shared::fanned`].
    fn fan_slot(&self, from: usize, seq: u64, what: &str) -> Result<RwLockWriteGuard<'_, Piece>> {
        let fan = &self.fanouts[from];
        let k = fan.produced.load(Ordering::Relaxed);
        let depth = self.depth as u64;
        for to in (0..self.world).filter(|&to| to != from) {
            let consumed = &fan.consumed[to];
            self.wait_ring(from, to, Side::Send, seq, what, k, || {
                consumed.load(Ordering::SeqCst) + depth > k
            })?;
        }
        Ok(write(&fan.slots[(k % depth) as usize]))
    }

    /// Hands the slot from [`Shared::fan_slot`] to every peer of `from`.
    fn fanned(&self, slot: RwLockWriteGuard<'_, Piece>, from: usize) {
        drop(slot);
        self.fanouts[from].produced.fetch_add(1, Ordering::SeqCst);
        for to in (0..self.world).filter(|&to| to != from) {
            self.ring(to);
        }
    }

    /// Copies `to`'s next piece of `from`'s fan-out into `dst`.
    fn fan_recv(&self, from: usize, to: usize, seq: u64, what: &str, dst: &mut [u8]) -> Result<()> {
        let fan = &self.fanouts[from];
        let consumed = &fan.consumed[to];
        let k = consumed.load(Ordering::Relaxed);
        self.wait_ring(to, from, Side::Recv, seq, what, k, || {
            fan.produced.load(Ordering::SeqCst) > k
        })?;
        {
            let slot = read(&fan.slots[(k % self.depth as u64) as usize]);
            if slot.len != dst.len() {
                return Err(CommError::Invalid(format!(
                    "group `{}`: collective #{seq} ({what}): rank {to} expected a piece of {} \
                     bytes from rank {from}'s fan-out, got {}",
                    self.name,
                    dst.len(),
                    slot.len
                )));
            }
            dst.copy_from_slice(slot.bytes());
        }
        consumed.fetch_add(1, Ordering::SeqCst);
        self.ring(from);
        Ok(())
    }

    fn send(&self, from: usize, to: usize, seq: u64, what: &str, src: &[u8]) -> Result<()> {
        let mut slot = self.send_slot(from, to, seq, what)?;
        slot.fill(src);
        self.sent(slot, from, to);
        Ok(())
    }

    fn recv(&self, from: usize, to: usize, seq: u64, what: &str, dst: &mut [u8]) -> Result<()> {
        let slot = self.recv_slot(from, to, seq, what)?;
        if slot.len != dst.len() {
            return Err(CommError::Invalid(format!(
                "group `{}`: collective #{seq} ({what}): rank {to} expected a piece of {} bytes \
                 from rank {from}, got {}",
                self.name,
                dst.len(),
                slot.len
            )));
        }
        dst.copy_from_slice(slot.bytes());
        self.taken(slot, from, to);
        Ok(())
    }

    /// Rank `rank`'s all-to-all after the barrier: piece by piece, each
    /// block for a peer goes into that peer's ring and each block from a
    /// peer comes out of its ring, in rotated order (rank r first serves
    /// r+1), so no two ranks start on the same peer.
    fn stream_all_to_all(
        &self,
        rank: usize,
        seq: u64,
        bytes: usize,
        send: &[u8],
        recv: &mut [u8],
    ) -> Result<()> {
        let p = self.world;
        let b = bytes / p;
        let q = self.piece_bytes;
        let what = "all_to_all";
        for k in 0..b.div_ceil(q) {
            let r = k * q..((k + 1) * q).min(b);
            let at = |i: usize| i * b + r.start..i * b + r.end;
            for d in 1..p {
                let j = (rank + d) % p;
                self.send(rank, j, seq, what, &send[at(j)])?;
            }
            recv[at(rank)].copy_from_slice(&send[at(rank)]);
            for d in 1..p {
                let i = (rank + p - d) % p;
                self.recv(i, rank, seq, what, &mut recv[at(i)])?;
            }
        }
        Ok(())
    }

    /// Rank `rank`'s all-reduce after the barrier. Rank r owns slice r of
    /// the elements ([`part`]); round k: send piece k of slice j to rank j
    /// (its ring), reduce piece k of slice r from every rank in rank order
    /// in place and into the fan-out, then copy piece k of every other
    /// slice from its owner's fan-out. A rank never waits on a later round
    /// of a peer than its own, so the rounds cannot deadlock.
    fn stream_all_reduce(
        &self,
        rank: usize,
        seq: u64,
        n: usize,
        dtype: DType,
        op: ReduceOp,
        buf: &mut [u8],
    ) -> Result<()> {
        let p = self.world;
        if p == 1 {
            // One rank: the reduction of one buffer is the buffer (x / 1 is
            // exact for Avg).
            return Ok(());
        }
        let size = dtype.size();
        let qe = (self.piece_bytes / size).max(1);
        let what = "all_reduce";
        // Byte range of piece k of slice j, or None past its end.
        let piece = |j: usize, k: usize| -> Option<Range<usize>> {
            let e = part(j, p, n, 1);
            let s = e.start + k * qe;
            (s < e.end).then(|| s * size..(s + qe).min(e.end) * size)
        };
        let rounds = (0..p)
            .map(|j| part(j, p, n, 1).len().div_ceil(qe))
            .max()
            .unwrap_or(0);
        for k in 0..rounds {
            for d in 1..p {
                let j = (rank + d) % p;
                if let Some(r) = piece(j, k) {
                    self.send(rank, j, seq, what, &buf[r])?;
                }
            }
            if let Some(r) = piece(rank, k) {
                let mut inbound = Vec::with_capacity(p - 1);
                for i in (0..p).filter(|&i| i != rank) {
                    inbound.push((i, self.recv_slot(i, rank, seq, what)?));
                }
                let mut out = self.fan_slot(rank, seq, what)?;
                {
                    let others: Vec<&[u8]> = inbound.iter().map(|(_, s)| s.bytes()).collect();
                    let len = r.len();
                    reduce_in_place(dtype, op, &others, rank, &mut buf[r], out.bytes_mut(len))?;
                }
                self.fanned(out, rank);
                for (i, s) in inbound {
                    self.taken(s, i, rank);
                }
            }
            for d in 1..p {
                let i = (rank + p - d) % p;
                if let Some(r) = piece(i, k) {
                    self.fan_recv(i, rank, seq, what, &mut buf[r])?;
                }
            }
        }
        Ok(())
    }

    fn record_error(&self, rank: usize, e: &CommError) {
        lock(&self.errors[rank]).get_or_insert_with(|| duplicate(e));
    }

    fn stored_error(&self, rank: usize) -> Option<CommError> {
        lock(&self.errors[rank]).as_ref().map(duplicate)
    }

    /// Waits until every rank arrived, the group broke, or the timeout.
    fn wait(&self, rank: usize, seq: u64, what: &str) -> Result<()> {
        let mut st = lock(&self.barrier);
        if let Some(b) = &st.broken {
            return Err(b.to_error());
        }
        let gen = st.generation;
        st.arrived[rank] = true;
        st.count += 1;
        if st.count == self.world {
            st.count = 0;
            st.arrived.iter_mut().for_each(|a| *a = false);
            st.generation += 1;
            drop(st);
            self.cv.notify_all();
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            if st.generation != gen {
                return Ok(());
            }
            if let Some(b) = &st.broken {
                return Err(b.to_error());
            }
            let now = Instant::now();
            if now >= deadline {
                let b = Broken::Timeout {
                    what: format!(
                        "rank(s) {:?} of group `{}` to reach collective #{seq} ({what})",
                        missing(&st.arrived),
                        self.name
                    ),
                    secs: self.timeout.as_secs_f64(),
                };
                let e = b.to_error();
                st.broken = Some(b);
                drop(st);
                self.cv.notify_all();
                self.ring_all();
                return Err(e);
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Every rank's call of collective `seq`, read from `set` after the
    /// barrier.
    fn calls(&self, set: &[Slot], seq: u64) -> Result<Vec<Op>> {
        set.iter()
            .map(|s| lock(&s.op).clone())
            .collect::<Option<Vec<Op>>>()
            .ok_or_else(|| self.missing_call(seq))
    }

    fn missing_call(&self, seq: u64) -> CommError {
        CommError::Invalid(format!(
            "group `{}`: collective #{seq}: a rank passed the barrier without its call",
            self.name
        ))
    }

    /// The body of rank `rank`'s job for collective `seq`.
    fn run(
        &self,
        rank: usize,
        seq: u64,
        op: &Op,
        ins: &[&[u8]],
        outs: &mut [&mut [u8]],
    ) -> Result<()> {
        if let Some(e) = self.broken() {
            return Err(e);
        }
        let set = &self.sets[(seq & 1) as usize];
        let me = &set[rank];
        *lock(&me.op) = Some(op.clone());
        match op {
            Op::AllToAllV { .. } | Op::ReduceScatter { .. } | Op::AllGather { .. } => {
                fill(&me.data, ins[0])
            }
            Op::Broadcast { root, .. } if *root == rank => fill(&me.data, outs[0]),
            // These two stream through the rings after the barrier.
            Op::AllToAll { .. } | Op::AllReduce { .. } => {}
            Op::Broadcast { .. } | Op::Barrier => {}
        }
        self.wait(rank, seq, op.name())?;
        let ops = self.calls(set, seq)?;
        validate(seq, op, &ops)?;
        match op {
            Op::AllToAll { bytes } => self.stream_all_to_all(rank, seq, *bytes, ins[0], outs[0])?,
            Op::AllToAllV { recv: my_recv, .. } => {
                let recv = &mut *outs[0];
                let mut at = 0;
                for (i, peer) in ops.iter().enumerate() {
                    let Op::AllToAllV { send, .. } = peer else {
                        continue;
                    };
                    let from: usize = send[..rank].iter().sum();
                    let n = my_recv[i];
                    let dst = &mut recv[at..at + n];
                    if i == rank {
                        dst.copy_from_slice(&ins[0][from..from + n]);
                    } else {
                        dst.copy_from_slice(&read(&set[i].data)[from..from + n]);
                    }
                    at += n;
                }
            }
            Op::AllReduce { bytes, dtype, op } => {
                self.stream_all_reduce(rank, seq, bytes / dtype.size(), *dtype, *op, outs[0])?
            }
            Op::ReduceScatter {
                recv_bytes,
                dtype,
                op,
                ..
            } => {
                let b = *recv_bytes;
                let guards: Vec<_> = set.iter().map(|s| read(&s.data)).collect();
                let srcs: Vec<&[u8]> = guards
                    .iter()
                    .map(|g| &g[rank * b..(rank + 1) * b])
                    .collect();
                reduce_into(*dtype, *op, &srcs, outs[0])?;
            }
            Op::AllGather { send_bytes } => {
                let b = *send_bytes;
                let recv = &mut *outs[0];
                for (i, s) in set.iter().enumerate() {
                    let dst = &mut recv[i * b..(i + 1) * b];
                    if i == rank {
                        dst.copy_from_slice(ins[0]);
                    } else {
                        dst.copy_from_slice(&read(&s.data));
                    }
                }
            }
            Op::Broadcast { root, .. } => {
                if *root != rank {
                    outs[0].copy_from_slice(&read(&set[*root].data));
                }
            }
            Op::Barrier => {}
        }
        Ok(())
    }
}

/// Checks that the ranks' calls fit together. Every rank sees the same
/// calls, so every rank reaches the same verdict.
fn validate(seq: u64, mine: &Op, ops: &[Op]) -> Result<()> {
    let name = mine.name();
    let mismatch = |detail: String| CommError::Mismatch {
        seq,
        op: name,
        detail,
    };
    if ops.iter().any(|o| o.name() != ops[0].name()) {
        let calls: Vec<String> = ops
            .iter()
            .enumerate()
            .map(|(r, o)| format!("rank {r} called {}", o.name()))
            .collect();
        return Err(mismatch(calls.join(", ")));
    }
    if let Op::AllToAllV { .. } = &ops[0] {
        for (i, a) in ops.iter().enumerate() {
            for (j, b) in ops.iter().enumerate() {
                if let (Op::AllToAllV { recv, .. }, Op::AllToAllV { send, .. }) = (a, b) {
                    if recv[j] != send[i] {
                        return Err(mismatch(format!(
                            "rank {i} expects {} bytes from rank {j}, which sends it {}",
                            recv[j], send[i]
                        )));
                    }
                }
            }
        }
        return Ok(());
    }
    if ops.iter().all(|o| o == &ops[0]) {
        return Ok(());
    }
    let calls: Vec<String> = ops
        .iter()
        .enumerate()
        .map(|(r, o)| format!("rank {r}: {}", describe(o)))
        .collect();
    Err(mismatch(format!("arguments differ: {}", calls.join("; "))))
}

fn describe(op: &Op) -> String {
    match op {
        Op::AllToAll { bytes } => format!("{bytes} bytes"),
        Op::AllToAllV { send, recv } => format!("send {send:?}, recv {recv:?}"),
        Op::AllReduce { bytes, dtype, op } => format!("{bytes} bytes of {dtype}, {op}"),
        Op::ReduceScatter {
            recv_bytes,
            dtype,
            op,
        } => format!("{recv_bytes} bytes of {dtype} per rank, {op}"),
        Op::AllGather { send_bytes } => format!("{send_bytes} bytes per rank"),
        Op::Broadcast { bytes, root } => format!("{bytes} bytes from root {root}"),
        Op::Barrier => "barrier".into(),
    }
}

impl InProcessComm {
    /// The rank's device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The group's name.
    pub fn group_name(&self) -> &str {
        &self.shared.name
    }

    /// The group's timeout.
    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// Why the group stopped, if it did (a timeout or an abort).
    pub fn broken(&self) -> Option<CommError> {
        self.shared.broken()
    }

    /// Runs `f` (checks and the enqueue of one collective); where it fails,
    /// the group is aborted after the work already enqueued on `stream`, so
    /// the other ranks fail at this collective instead of waiting for it.
    fn guarded(&self, stream: &Stream, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let r = f();
        if let Err(e) = &r {
            let reason = e.to_string();
            let shared = self.shared.clone();
            let rank = self.rank;
            let queued = self.device.has_data()
                && stream
                    .launch_host(
                        "abort group",
                        Work::kernel(0.0, 0),
                        &[],
                        &[],
                        Box::new(move |_, _| {
                            shared.abort(rank, &reason);
                            Ok(())
                        }),
                    )
                    .is_ok()
                && stream.failure().is_none();
            if !queued {
                self.shared.abort(self.rank, &e.to_string());
            }
        }
        r
    }

    fn enqueue(
        &self,
        stream: &Stream,
        op: Op,
        bytes: u64,
        reads: &[View<'_>],
        writes: &[View<'_>],
    ) -> Result<()> {
        if let Some(e) = self.shared.broken() {
            return Err(e);
        }
        if let Some(f) = stream.failure() {
            return Err(CommError::Invalid(format!(
                "{} on stream `{}`: the stream has failed earlier ({f}); the collective cannot run",
                op.name(),
                stream.name()
            )));
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        if self.device.kind() == DeviceKind::Cuda {
            // The reduce kernel takes up to MAX_REDUCE_INPUTS inputs; larger
            // groups reduce on the host.
            let staged = self.world > crate::kernels::MAX_REDUCE_INPUTS
                && matches!(op, Op::AllReduce { .. } | Op::ReduceScatter { .. });
            let r = if staged {
                self.run_staged(stream, seq, op, reads, writes)
            } else {
                self.run_on_gpu(stream, seq, &op, reads, writes)
            };
            if let Err(e) = &r {
                self.shared.record_error(self.rank, e);
                self.shared.abort(self.rank, &e.to_string());
            }
            return r;
        }
        let name = format!("{} #{seq}", op.name());
        let shared = self.shared.clone();
        let rank = self.rank;
        stream.launch_host(
            name,
            work(bytes),
            reads,
            writes,
            Box::new(
                move |ins, outs| match shared.run(rank, seq, &op, ins, outs) {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        let msg = e.to_string();
                        shared.record_error(rank, &e);
                        shared.abort(rank, &msg);
                        Err(msg)
                    }
                },
            ),
        )?;
        Ok(())
    }
}

impl InProcessComm {
    /// A reduction on cuda in a group larger than the reduce kernel's
    /// fan-in ([`MAX_REDUCE_INPUTS`](crate::kernels::MAX_REDUCE_INPUTS)
    /// ranks), staged through pinned host buffers: the host
    /// waits for the stream, copies what the collective reads to the host,
    /// runs the same body as on cpu (barrier, checks, rings) on the calling
    /// thread, and enqueues the copies of the results back to the device.
    /// So on cuda a collective blocks its caller until every rank has
    /// called it: each rank must enqueue from its own thread (as
    /// `FpdtGroup` does). Exact, but synchronous and two trips over the
    /// host link.
    fn run_staged(
        &self,
        stream: &Stream,
        seq: u64,
        op: Op,
        reads: &[View<'_>],
        writes: &[View<'_>],
    ) -> Result<()> {
        // In-place collectives read what their output holds now.
        let reads_writes = matches!(op, Op::AllReduce { .. } | Op::Broadcast { .. });
        let stage = |v: &View<'_>, copy_in: bool| -> Result<HostBuffer> {
            let h = self
                .device
                .alloc_host(v.len().max(1), "collective staging")?;
            if copy_in && !v.is_empty() {
                stream.copy(*v, h.bytes(0..v.len())?)?;
            }
            Ok(h)
        };
        let ins: Vec<HostBuffer> = reads
            .iter()
            .map(|v| stage(v, true))
            .collect::<Result<_>>()?;
        let mut outs: Vec<HostBuffer> = writes
            .iter()
            .map(|v| stage(v, reads_writes))
            .collect::<Result<_>>()?;
        stream.synchronize()?;
        let in_bytes: Vec<Vec<u8>> = ins
            .iter()
            .zip(reads)
            .map(|(h, v)| h.to_vec::<u8>(v.len()))
            .collect::<std::result::Result<_, _>>()?;
        let mut out_bytes: Vec<Vec<u8>> = outs
            .iter()
            .zip(writes)
            .map(|(h, v)| h.to_vec::<u8>(v.len()))
            .collect::<std::result::Result<_, _>>()?;
        let in_refs: Vec<&[u8]> = in_bytes.iter().map(|b| b.as_slice()).collect();
        let mut out_refs: Vec<&mut [u8]> = out_bytes.iter_mut().map(|b| b.as_mut_slice()).collect();
        self.shared
            .run(self.rank, seq, &op, &in_refs, &mut out_refs)?;
        // The staging buffers may drop at once: the stream holds them until
        // its copies have run.
        for ((h, v), b) in outs.iter_mut().zip(writes).zip(&out_bytes) {
            if !v.is_empty() {
                h.copy_from(b)?;
                stream.copy(h.bytes(0..v.len())?, *v)?;
            }
        }
        Ok(())
    }
}

impl InProcessComm {
    /// A collective on cuda, on the GPU's streams. Each rank records when
    /// its buffers are ready and posts them with the event; after the host
    /// barrier its stream waits for its peers' ready events and pulls what
    /// it receives straight from their buffers (device-to-device copies,
    /// peer copies between GPUs). Reductions pull the peers' part of the
    /// rank's slice into a scratch buffer and reduce in rank order with
    /// `comm/kernels/reduce.ptx`; the all-reduce then fences (an event per
    /// rank, exchanged at a barrier) and gathers the reduced slices. At the
    /// end each rank records when it is done reading, and after a last
    /// barrier waits for its peers' done events, so later work cannot
    /// overwrite a buffer a peer still reads. The host only exchanges
    /// events and handles and never waits for the GPU; each rank must
    /// enqueue from its own thread.
    fn run_on_gpu(
        &self,
        stream: &Stream,
        seq: u64,
        op: &Op,
        reads: &[View<'_>],
        writes: &[View<'_>],
    ) -> Result<()> {
        let sh = &*self.shared;
        let (me, world) = (self.rank, self.world);
        if let Some(e) = sh.broken() {
            return Err(e);
        }
        let set = &sh.sets[(seq & 1) as usize];
        *lock(&set[me].op) = Some(op.clone());
        *lock(&set[me].gpu) = Some(GpuPost {
            ready: stream.record()?,
            send: reads.first().map(View::share),
            recv: writes.first().map(View::share),
            mid: None,
            done: None,
        });
        sh.wait(me, seq, op.name())?;
        let missing_call = || sh.missing_call(seq);
        let ops = sh.calls(set, seq)?;
        validate(seq, op, &ops)?;
        let posts = set
            .iter()
            .map(|s| lock(&s.gpu).clone())
            .collect::<Option<Vec<GpuPost>>>()
            .ok_or_else(missing_call)?;
        for (p, post) in posts.iter().enumerate() {
            if p != me {
                stream.wait(&post.ready)?;
            }
        }
        let of = |v: &Option<SharedView>, what: &str| {
            v.clone().ok_or_else(|| {
                CommError::Invalid(format!(
                    "group `{}`: collective #{seq}: a rank posted no {what} buffer",
                    sh.name
                ))
            })
        };
        // Records an event into the rank's post (`field`), meets the others
        // at a barrier, and makes the stream wait for theirs.
        let fence = |stage: &str, field: fn(&mut GpuPost) -> &mut Option<Event>| -> Result<()> {
            let ev = stream.record()?;
            if let Some(post) = lock(&set[me].gpu).as_mut() {
                *field(post) = Some(ev);
            }
            sh.wait(me, seq, &format!("{}, {stage}", op.name()))?;
            for (p, s) in set.iter().enumerate() {
                if p == me {
                    continue;
                }
                let ev = lock(&s.gpu).as_mut().and_then(|g| field(g).clone());
                stream.wait(&ev.ok_or_else(missing_call)?)?;
            }
            Ok(())
        };
        // Pulls: (source buffer, byte range in it, byte offset in `dst`).
        let pull = |dst: &View<'_>, pulls: Vec<(SharedView, Range<usize>, usize)>| -> Result<()> {
            for (src, range, at) in pulls {
                if range.is_empty() {
                    continue;
                }
                let n = range.len();
                stream.copy_peer(src.view().bytes(range)?, dst.bytes(at..at + n)?)?;
            }
            Ok(())
        };
        let sends =
            || -> Result<Vec<SharedView>> { posts.iter().map(|p| of(&p.send, "send")).collect() };
        let recvs = || -> Result<Vec<SharedView>> {
            posts.iter().map(|p| of(&p.recv, "receive")).collect()
        };
        let mine = of(&posts[me].recv, "receive");
        match op {
            Op::AllToAll { bytes } => {
                let b = bytes / world;
                let s = sends()?;
                let pulls = (0..world).map(|p| (s[p].clone(), me * b..(me + 1) * b, p * b));
                pull(&mine?.view(), pulls.collect())?;
            }
            Op::AllToAllV { recv: my_recv, .. } => {
                let s = sends()?;
                let mut pulls = Vec::new();
                let mut at = 0;
                for (p, peer) in ops.iter().enumerate() {
                    if let Op::AllToAllV { send, .. } = peer {
                        let from: usize = send[..me].iter().sum();
                        pulls.push((s[p].clone(), from..from + my_recv[p], at));
                        at += my_recv[p];
                    }
                }
                pull(&mine?.view(), pulls)?;
            }
            Op::AllGather { send_bytes } => {
                let b = *send_bytes;
                let s = sends()?;
                let pulls = (0..world).map(|p| (s[p].clone(), 0..b, p * b));
                pull(&mine?.view(), pulls.collect())?;
            }
            Op::Broadcast { bytes, root } => {
                if *root != me {
                    let r = recvs()?;
                    pull(&mine?.view(), vec![(r[*root].clone(), 0..*bytes, 0)])?;
                }
            }
            Op::Barrier => {}
            Op::ReduceScatter {
                recv_bytes,
                dtype,
                op: rop,
            } => {
                let b = *recv_bytes;
                let s = sends()?;
                let out = mine?;
                self.reduce_slices(stream, *dtype, *rop, &s, me * b..(me + 1) * b, &out.view())?;
            }
            Op::AllReduce {
                bytes,
                dtype,
                op: rop,
            } => {
                let size = dtype.size();
                let n = bytes / size;
                let r = recvs()?;
                let buf = mine?;
                let slice = part(me, world, n, size);
                let out = buf.view().bytes(slice.clone())?;
                self.reduce_slices(stream, *dtype, *rop, &r, slice, &out)?;
                // Every slice reduced before anyone gathers it.
                fence("slices reduced", |g| &mut g.mid)?;
                let pulls = (0..world)
                    .filter(|&p| p != me)
                    .map(|p| {
                        let sl = part(p, world, n, size);
                        let at = sl.start;
                        (r[p].clone(), sl, at)
                    })
                    .collect();
                pull(&buf.view(), pulls)?;
            }
        }
        fence("copies enqueued", |g| &mut g.done)
    }

    /// `out = bufs[0][range] op bufs[1][range] op ...` in rank order: the
    /// peers' ranges are pulled into a scratch buffer of this device, the
    /// rank's own is read in place (`out` may be it).
    fn reduce_slices(
        &self,
        stream: &Stream,
        dtype: DType,
        op: ReduceOp,
        bufs: &[SharedView],
        range: Range<usize>,
        out: &View<'_>,
    ) -> Result<()> {
        let len = range.len();
        if len == 0 {
            return Ok(());
        }
        let me = self.rank;
        let scratch = self
            .device
            .alloc(len * (bufs.len() - 1), "collective scratch")?;
        let mut at = 0;
        let mut slots = Vec::with_capacity(bufs.len());
        for (p, b) in bufs.iter().enumerate() {
            if p == me {
                slots.push(None);
                continue;
            }
            stream.copy_peer(b.view().bytes(range.clone())?, scratch.bytes(at..at + len)?)?;
            slots.push(Some(at));
            at += len;
        }
        let own = bufs[me].view();
        let own = own.bytes(range)?;
        let inputs: Vec<View<'_>> = slots
            .iter()
            .map(|s| match s {
                Some(at) => scratch.bytes(*at..*at + len),
                None => Ok(own),
            })
            .collect::<std::result::Result<_, _>>()?;
        // The scratch may drop now: the stream holds it until the kernel ran.
        crate::kernels::launch_reduce(stream, dtype, op, &inputs, *out)
    }
}

impl Communicator for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn backend(&self) -> &'static str {
        "in-process"
    }

    fn all_to_all(&self, stream: &Stream, send: View<'_>, recv: View<'_>) -> Result<()> {
        self.guarded(stream, || {
            check::all_to_all(self.world, &send, &recv)?;
            let op = Op::AllToAll { bytes: send.len() };
            let t = traffic::all_to_all(send.len(), self.world);
            self.enqueue(stream, op, t, &[send], &[recv])
        })
    }

    fn all_to_all_v(
        &self,
        stream: &Stream,
        send: View<'_>,
        send_splits: &[usize],
        recv: View<'_>,
        recv_splits: &[usize],
    ) -> Result<()> {
        self.guarded(stream, || {
            check::splits(self.world, &send, send_splits, &recv, recv_splits)?;
            let t = (send.len() - send_splits[self.rank]) as u64;
            let op = Op::AllToAllV {
                send: send_splits.to_vec(),
                recv: recv_splits.to_vec(),
            };
            self.enqueue(stream, op, t, &[send], &[recv])
        })
    }

    fn all_reduce(&self, stream: &Stream, buf: View<'_>, dtype: DType, op: ReduceOp) -> Result<()> {
        self.guarded(stream, || {
            check::elements("all_reduce", &buf, dtype)?;
            let t = traffic::all_reduce(buf.len(), self.world);
            let op = Op::AllReduce {
                bytes: buf.len(),
                dtype,
                op,
            };
            self.enqueue(stream, op, t, &[], &[buf])
        })
    }

    fn reduce_scatter(
        &self,
        stream: &Stream,
        send: View<'_>,
        recv: View<'_>,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.guarded(stream, || {
            check::reduce_scatter(self.world, &send, &recv, dtype)?;
            let t = traffic::reduce_scatter(send.len(), self.world);
            let op = Op::ReduceScatter {
                recv_bytes: recv.len(),
                dtype,
                op,
            };
            self.enqueue(stream, op, t, &[send], &[recv])
        })
    }

    fn all_gather(&self, stream: &Stream, send: View<'_>, recv: View<'_>) -> Result<()> {
        self.guarded(stream, || {
            check::all_gather(self.world, &send, &recv)?;
            let t = traffic::all_gather(recv.len(), self.world);
            let op = Op::AllGather {
                send_bytes: send.len(),
            };
            self.enqueue(stream, op, t, &[send], &[recv])
        })
    }

    fn broadcast(&self, stream: &Stream, buf: View<'_>, root: usize) -> Result<()> {
        self.guarded(stream, || {
            check::root(self.world, root)?;
            let t = traffic::broadcast(buf.len(), self.world);
            let op = Op::Broadcast {
                bytes: buf.len(),
                root,
            };
            self.enqueue(stream, op, t, &[], &[buf])
        })
    }

    fn barrier(&self, stream: &Stream) -> Result<()> {
        self.guarded(stream, || self.enqueue(stream, Op::Barrier, 0, &[], &[]))
    }

    fn abort(&self, reason: &str) {
        self.shared.abort(self.rank, reason);
    }

    fn synchronize(&self, stream: &Stream) -> Result<()> {
        match stream.synchronize() {
            Ok(()) => Ok(()),
            Err(e) => Err(self.shared.stored_error(self.rank).unwrap_or(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_elements_in_order() {
        for p in 1..6 {
            for n in 0..20 {
                let mut next = 0;
                for r in 0..p {
                    let rg = part(r, p, n, 4);
                    assert_eq!(rg.start, next);
                    next = rg.end;
                }
                assert_eq!(next, n * 4);
            }
        }
    }

    fn shared(world: usize, timeout: Duration) -> Shared {
        Shared::new(
            GroupConfig {
                name: "g".into(),
                timeout,
                piece_bytes: 4,
                ring_depth: 2,
            },
            world,
        )
    }

    #[test]
    fn a_piece_that_never_comes_times_out_naming_the_peer_and_breaks_the_group() {
        let g = shared(2, Duration::from_millis(50));
        let t = Instant::now();
        let e = g.recv(1, 0, 7, "all_to_all", &mut [0u8; 4]).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let s = e.to_string();
        assert!(
            s.contains("timed out after 0.05 s waiting for rank 1 of group `g` to send piece 0 of collective #7 (all_to_all) to or from rank 0"),
            "{s}"
        );
        // Broken now: the other rank, waiting in turn, fails at once.
        let t = Instant::now();
        let again = g.recv(0, 1, 7, "all_to_all", &mut [0u8; 4]).unwrap_err();
        assert!(
            again.to_string().contains("rank 1 of group `g` to send"),
            "{again}"
        );
        assert!(t.elapsed() < Duration::from_millis(40), "{:?}", t.elapsed());
    }

    #[test]
    fn a_full_ring_waits_for_its_receiver_and_an_abort_releases_the_sender() {
        let g = shared(2, Duration::from_secs(20));
        // Depth 2: two pieces fit without a receiver.
        g.send(0, 1, 0, "all_to_all", &[1, 2, 3, 4]).unwrap();
        g.send(0, 1, 0, "all_to_all", &[5, 6, 7, 8]).unwrap();
        std::thread::scope(|scope| {
            let sender = scope.spawn(|| g.send(0, 1, 0, "all_to_all", &[9, 9, 9, 9]));
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !sender.is_finished(),
                "a third piece must wait for a free slot"
            );
            let mut got = [0u8; 4];
            g.recv(0, 1, 0, "all_to_all", &mut got).unwrap();
            assert_eq!(got, [1, 2, 3, 4]);
            assert!(
                sender.join().unwrap().is_ok(),
                "taking a piece frees a slot"
            );
            g.recv(0, 1, 0, "all_to_all", &mut got).unwrap();
            assert_eq!(got, [5, 6, 7, 8]);
            g.recv(0, 1, 0, "all_to_all", &mut got).unwrap();
            assert_eq!(got, [9, 9, 9, 9]);
            // Full again; the abort from another rank ends the wait.
            g.send(0, 1, 1, "all_to_all", &[0; 4]).unwrap();
            g.send(0, 1, 1, "all_to_all", &[0; 4]).unwrap();
            let t = Instant::now();
            let sender = scope.spawn(|| g.send(0, 1, 1, "all_to_all", &[0; 4]));
            std::thread::sleep(Duration::from_millis(20));
            g.abort(1, "rank 1 failed");
            let e = sender.join().unwrap().unwrap_err();
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
            assert!(
                e.to_string().contains("aborted by rank 1: rank 1 failed"),
                "{e}"
            );
        });
    }

    #[test]
    fn validate_names_the_disagreeing_ranks() {
        let a = Op::AllReduce {
            bytes: 16,
            dtype: DType::F32,
            op: ReduceOp::Sum,
        };
        let b = Op::AllReduce {
            bytes: 32,
            dtype: DType::F32,
            op: ReduceOp::Sum,
        };
        let e = validate(3, &a, &[a.clone(), b]).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("collective #3"), "{s}");
        assert!(
            s.contains("rank 0: 16 bytes") && s.contains("rank 1: 32 bytes"),
            "{s}"
        );
        let e = validate(0, &a, &[a.clone(), Op::Barrier]).unwrap_err();
        assert!(e.to_string().contains("rank 1 called barrier"), "{e}");
        let v0 = Op::AllToAllV {
            send: vec![1, 2],
            recv: vec![1, 3],
        };
        let v1 = Op::AllToAllV {
            send: vec![2, 0],
            recv: vec![2, 0],
        };
        let e = validate(0, &v0, &[v0.clone(), v1]).unwrap_err();
        assert!(
            e.to_string()
                .contains("rank 0 expects 3 bytes from rank 1, which sends it 2"),
            "{e}"
        );
    }
}
