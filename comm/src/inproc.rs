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
//!    into its own buffer (all-reduce: each rank reduces one slice of the
//!    elements, a second barrier, then every rank gathers the slices).
//!
//! Mailboxes come in two sets used by alternate collectives, so a fast rank
//! can deposit for collective k+1 while a slow one still reads collective
//! k; it cannot get to k+2 before every rank has finished k, because k+1's
//! barrier needs them all. One barrier per phase, no trailing barrier.
//!
//! A rank that never arrives makes the others fail with
//! [`CommError::Timeout`] naming it; any failure aborts the group, so every
//! later collective fails at once instead of waiting. On the meta device no
//! job runs: each collective only advances the stream's clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use fpdt_runtime::{CpuConfig, Device, DeviceKind, MetaConfig, Stream, View, Work};

use crate::communicator::{check, traffic, work, Communicator};
use crate::error::{duplicate, CommError, Result};
use crate::types::{reduce_into, DType, ReduceOp};

/// Configuration of an in-process group.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Name in errors and traces.
    pub name: String,
    /// Longest a rank waits at a collective for the others before the
    /// collective (and the group) fails with [`CommError::Timeout`].
    pub timeout: Duration,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            name: "inproc".into(),
            timeout: Duration::from_secs(120),
        }
    }
}

/// Constructors of in-process groups.
pub struct InProcessGroup;

impl InProcessGroup {
    /// A group of `devices.len()` ranks; rank `r` runs on `devices[r]`.
    /// The devices must be of one kind (cpu or meta). Several ranks may share
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
        if kind == DeviceKind::Cuda {
            return Err(CommError::Invalid(format!(
                "in-process group `{}`: cuda devices are not supported yet (device-to-device \
                 exchange needs the cuda backend's peer copies)",
                cfg.name
            )));
        }
        if cfg.timeout.is_zero() {
            return Err(CommError::Invalid(format!(
                "in-process group `{}`: timeout must be positive, got 0",
                cfg.name
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
    reduced: RwLock<Vec<u8>>,
}

struct Shared {
    name: String,
    world: usize,
    timeout: Duration,
    barrier: Mutex<BarrierState>,
    cv: Condvar,
    sets: [Vec<Slot>; 2],
    errors: Vec<Mutex<Option<CommError>>>,
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
fn part(r: usize, p: usize, n: usize, size: usize) -> std::ops::Range<usize> {
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
                return Err(e);
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
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
        let p = self.world;
        let set = &self.sets[(seq & 1) as usize];
        let me = &set[rank];
        *lock(&me.op) = Some(op.clone());
        match op {
            Op::AllToAll { .. } | Op::AllToAllV { .. } | Op::ReduceScatter { .. } => {
                fill(&me.data, ins[0])
            }
            Op::AllGather { .. } => fill(&me.data, ins[0]),
            Op::AllReduce { .. } => fill(&me.data, outs[0]),
            Op::Broadcast { root, .. } if *root == rank => fill(&me.data, outs[0]),
            Op::Broadcast { .. } | Op::Barrier => {}
        }
        self.wait(rank, seq, op.name())?;
        let ops = set
            .iter()
            .map(|s| lock(&s.op).clone())
            .collect::<Option<Vec<Op>>>()
            .ok_or_else(|| {
                CommError::Invalid(format!(
                    "group `{}`: collective #{seq}: a rank passed the barrier without its call",
                    self.name
                ))
            })?;
        validate(seq, op, &ops)?;
        match op {
            Op::AllToAll { bytes } => {
                let b = bytes / p;
                let recv = &mut *outs[0];
                for i in 0..p {
                    let dst = &mut recv[i * b..(i + 1) * b];
                    if i == rank {
                        dst.copy_from_slice(&ins[0][rank * b..(rank + 1) * b]);
                    } else {
                        dst.copy_from_slice(&read(&set[i].data)[rank * b..(rank + 1) * b]);
                    }
                }
            }
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
                let n = bytes / dtype.size();
                let mine = part(rank, p, n, dtype.size());
                {
                    let guards: Vec<_> = set.iter().map(|s| read(&s.data)).collect();
                    let srcs: Vec<&[u8]> = guards.iter().map(|g| &g[mine.clone()]).collect();
                    let mut red = write(&me.reduced);
                    red.resize(mine.len(), 0);
                    reduce_into(*dtype, *op, &srcs, &mut red)?;
                }
                self.wait(rank, seq, "all_reduce, gather phase")?;
                let buf = &mut *outs[0];
                for (i, s) in set.iter().enumerate() {
                    buf[part(i, p, n, dtype.size())].copy_from_slice(&read(&s.reduced));
                }
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
