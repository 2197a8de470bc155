//! The [`Communicator`] trait, and the argument checks every implementation
//! shares.

use fpdt_runtime::{Stream, View, Work};

use crate::error::{CommError, Result};
use crate::types::{DType, ReduceOp};

/// A rank of a communication group: collectives over the group's ranks,
/// each enqueued on a stream of the caller's device and ordered with the
/// rest of that stream's work.
///
/// Rules shared by every implementation (as in NCCL):
/// - every rank calls the same collectives in the same order, with
///   matching arguments (the in-process group checks this and fails every
///   rank with [`CommError::Mismatch`] where they differ);
/// - a rank issues its collectives on one stream at a time: two collectives
///   of one rank on different streams may run in either order;
/// - the call only enqueues: results are ready once the stream reaches that
///   point (wait on an event, or [`Communicator::synchronize`]);
/// - sizes are in bytes, except the element type of reductions;
/// - send and receive buffers must not overlap (all-reduce and broadcast
///   work in place on one buffer).
///
/// On the meta device the collectives move no data: each advances the
/// stream's virtual clock by the cost model's time for the bytes one rank
/// sends over the interconnect, so the planner can run the schedule.
pub trait Communicator: Send + Sync {
    /// This rank's index, `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks in the group.
    fn world_size(&self) -> usize;

    /// The implementation ("in-process", "nccl").
    fn backend(&self) -> &'static str;

    /// All-to-all with equal splits: `send` holds `world_size` blocks of
    /// `send.len() / world_size` bytes, block `j` goes to rank `j`; block `i`
    /// of `recv` comes from rank `i`. `send` and `recv` have the same length,
    /// a multiple of the world size.
    fn all_to_all(&self, stream: &Stream, send: View<'_>, recv: View<'_>) -> Result<()>;

    /// All-to-all with unequal splits: `send` is `send_splits[j]` bytes for
    /// rank `j`, one after the other; `recv` is `recv_splits[i]` bytes from
    /// rank `i`. Rank `i`'s `recv_splits[j]` must equal rank `j`'s
    /// `send_splits[i]`.
    fn all_to_all_v(
        &self,
        stream: &Stream,
        send: View<'_>,
        send_splits: &[usize],
        recv: View<'_>,
        recv_splits: &[usize],
    ) -> Result<()>;

    /// All-reduce in place: every rank's `buf` becomes the element-wise
    /// reduction of all ranks' `buf`. Any number of elements.
    fn all_reduce(&self, stream: &Stream, buf: View<'_>, dtype: DType, op: ReduceOp) -> Result<()>;

    /// Reduce-scatter: `send` holds `world_size` blocks of `recv.len()`
    /// bytes; rank `r`'s `recv` becomes the reduction of block `r` over all
    /// ranks.
    fn reduce_scatter(
        &self,
        stream: &Stream,
        send: View<'_>,
        recv: View<'_>,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()>;

    /// All-gather: block `i` (of `send.len()` bytes) of every rank's `recv`
    /// becomes rank `i`'s `send`; `recv.len() == world_size * send.len()`.
    fn all_gather(&self, stream: &Stream, send: View<'_>, recv: View<'_>) -> Result<()>;

    /// Broadcast in place: every rank's `buf` becomes rank `root`'s `buf`.
    fn broadcast(&self, stream: &Stream, buf: View<'_>, root: usize) -> Result<()>;

    /// A point every rank's stream must reach before any goes on.
    fn barrier(&self, stream: &Stream) -> Result<()>;

    /// Aborts the group: this rank's later collectives, and every other
    /// rank's pending and later ones, fail (with [`crate::CommError::Aborted`]
    /// naming this rank and `reason` where the backend can tell) instead of
    /// waiting for a call that will not come. For a rank that hit an error
    /// between collectives.
    fn abort(&self, reason: &str);

    /// Blocks the host until `stream` has run everything enqueued so far; a
    /// failed collective is reported as the communication error it was
    /// (a timeout naming the missing ranks, a mismatch, an abort).
    fn synchronize(&self, stream: &Stream) -> Result<()>;
}

/// Bytes one rank sends over the interconnect in a collective, as NCCL's
/// "bus bandwidth" counts them (the meta device's cost and the trace's
/// annotation).
pub(crate) mod traffic {
    fn share(bytes: usize, p: usize) -> u64 {
        if p <= 1 {
            0
        } else {
            (bytes as u128 * (p as u128 - 1) / p as u128) as u64
        }
    }

    /// All-to-all of `bytes` per rank.
    pub(crate) fn all_to_all(bytes: usize, p: usize) -> u64 {
        share(bytes, p)
    }

    /// Ring all-reduce of `bytes`: a reduce-scatter and an all-gather.
    pub(crate) fn all_reduce(bytes: usize, p: usize) -> u64 {
        2 * share(bytes, p)
    }

    /// Reduce-scatter of `send_bytes` (world * recv).
    pub(crate) fn reduce_scatter(send_bytes: usize, p: usize) -> u64 {
        share(send_bytes, p)
    }

    /// All-gather into `recv_bytes` (world * send).
    pub(crate) fn all_gather(recv_bytes: usize, p: usize) -> u64 {
        share(recv_bytes, p)
    }

    /// Broadcast of `bytes`.
    pub(crate) fn broadcast(bytes: usize, p: usize) -> u64 {
        if p <= 1 {
            0
        } else {
            bytes as u64
        }
    }
}

/// The work annotation of a collective moving `bytes` per rank.
pub(crate) fn work(bytes: u64) -> Work {
    Work::collective(bytes)
}

/// Checks of arguments one rank can make alone. Each error names the
/// argument, its value and the rule.
pub(crate) mod check {
    use super::*;

    pub(crate) fn same_len(op: &str, send: &View<'_>, recv: &View<'_>) -> Result<()> {
        if send.len() != recv.len() {
            return Err(CommError::Invalid(format!(
                "{op}: send buffer `{}` has {} bytes but receive buffer `{}` has {}: they must be equal",
                send.tag(),
                send.len(),
                recv.tag(),
                recv.len()
            )));
        }
        Ok(())
    }

    pub(crate) fn divisible(op: &str, what: &str, bytes: usize, p: usize) -> Result<()> {
        if bytes % p != 0 {
            return Err(CommError::NotDivisible {
                what: format!("{op}: {what} length in bytes"),
                value: bytes,
                by_what: "the world size".into(),
                by: p,
            });
        }
        Ok(())
    }

    pub(crate) fn all_to_all(p: usize, send: &View<'_>, recv: &View<'_>) -> Result<()> {
        same_len("all_to_all", send, recv)?;
        divisible("all_to_all", "send buffer", send.len(), p)
    }

    pub(crate) fn splits(
        p: usize,
        send: &View<'_>,
        send_splits: &[usize],
        recv: &View<'_>,
        recv_splits: &[usize],
    ) -> Result<()> {
        for (name, splits, view) in [("send", send_splits, send), ("recv", recv_splits, recv)] {
            if splits.len() != p {
                return Err(CommError::Invalid(format!(
                    "all_to_all_v: {name}_splits has {} entries but the world has {p} ranks: one per rank",
                    splits.len()
                )));
            }
            let total: usize = splits.iter().sum();
            if total != view.len() {
                return Err(CommError::Invalid(format!(
                    "all_to_all_v: {name}_splits {splits:?} add up to {total} bytes but buffer `{}` has {}",
                    view.tag(),
                    view.len()
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn elements(op: &str, view: &View<'_>, dtype: DType) -> Result<()> {
        if view.len() % dtype.size() != 0 {
            return Err(CommError::Invalid(format!(
                "{op}: buffer `{}` has {} bytes, not a whole number of {dtype} elements ({} bytes each)",
                view.tag(),
                view.len(),
                dtype.size()
            )));
        }
        if view.addr() % dtype.size() != 0 {
            return Err(CommError::Invalid(format!(
                "{op}: buffer `{}` at offset {} is not aligned for {dtype}",
                view.tag(),
                view.offset()
            )));
        }
        Ok(())
    }

    pub(crate) fn reduce_scatter(
        p: usize,
        send: &View<'_>,
        recv: &View<'_>,
        dtype: DType,
    ) -> Result<()> {
        elements("reduce_scatter", send, dtype)?;
        elements("reduce_scatter", recv, dtype)?;
        if send.len() != p * recv.len() {
            return Err(CommError::Invalid(format!(
                "reduce_scatter: send buffer `{}` has {} bytes but must be world size ({p}) x receive buffer `{}` ({} bytes) = {}",
                send.tag(),
                send.len(),
                recv.tag(),
                recv.len(),
                p * recv.len()
            )));
        }
        Ok(())
    }

    pub(crate) fn all_gather(p: usize, send: &View<'_>, recv: &View<'_>) -> Result<()> {
        if recv.len() != p * send.len() {
            return Err(CommError::Invalid(format!(
                "all_gather: receive buffer `{}` has {} bytes but must be world size ({p}) x send buffer `{}` ({} bytes) = {}",
                recv.tag(),
                recv.len(),
                send.tag(),
                send.len(),
                p * send.len()
            )));
        }
        Ok(())
    }

    pub(crate) fn root(p: usize, root: usize) -> Result<()> {
        if root >= p {
            return Err(CommError::RankOutOfRange {
                what: "broadcast root".into(),
                rank: root,
                world: p,
            });
        }
        Ok(())
    }
}
