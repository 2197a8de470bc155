//! The communication crate's error type.

use fpdt_runtime::RuntimeError;

/// Errors of fpdt-comm. Bad arguments, a peer that never arrives, a broken
/// rendezvous and NCCL failures are all values of this type; nothing in the
/// crate panics on them.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The runtime refused or failed an operation (a stream, a buffer).
    #[error(transparent)]
    Runtime(#[from] RuntimeError),

    /// An argument broke a rule (the message names the argument, its value
    /// and the rule).
    #[error("{0}")]
    Invalid(String),

    /// A value that must be divisible by another is not (heads by P, a
    /// buffer by the world size, ...).
    #[error("{what} ({value}) must be divisible by {by_what} ({by})")]
    NotDivisible {
        /// The quantity that must divide evenly (e.g. "kv_heads").
        what: String,
        /// Its value.
        value: usize,
        /// The divisor's name (e.g. "the sequence-parallel degree P").
        by_what: String,
        /// The divisor.
        by: usize,
    },

    /// A rank index outside `0..world_size`.
    #[error("{what}: rank {rank} is out of range for a world of {world} ranks (0..{world})")]
    RankOutOfRange {
        /// Where the rank came from.
        what: String,
        /// The rank given.
        rank: usize,
        /// The world size.
        world: usize,
    },

    /// The ranks of a group called a collective with arguments that do not
    /// fit together (different operations, sizes, roots, dtypes).
    #[error("collective #{seq} ({op}): ranks disagree: {detail}")]
    Mismatch {
        /// Index of the collective in the group's sequence (0-based).
        seq: u64,
        /// The operation of the calling rank.
        op: &'static str,
        /// What differs, naming the ranks.
        detail: String,
    },

    /// Waiting for peers (or a server, or a connection) took longer than the
    /// configured limit.
    #[error("timed out after {secs:.2} s waiting for {what}")]
    Timeout {
        /// What was waited for (names the missing ranks where known).
        what: String,
        /// The limit.
        secs: f64,
    },

    /// The group was aborted by one of its ranks (after an error), so every
    /// collective fails instead of hanging.
    #[error("the communication group was aborted by rank {rank}: {reason}")]
    Aborted {
        /// The rank that aborted.
        rank: usize,
        /// Why.
        reason: String,
    },

    /// A rendezvous environment variable is missing or malformed.
    #[error("rendezvous environment: {var}={value:?}: {rule}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value ("" when unset).
        value: String,
        /// The rule it broke.
        rule: String,
    },

    /// The rendezvous protocol failed (a peer spoke something else, a
    /// duplicate rank, a world size mismatch).
    #[error("rendezvous: {0}")]
    Rendezvous(String),

    /// The NCCL library could not be loaded (or lacks a symbol).
    #[error("NCCL is not available: {0}")]
    NcclUnavailable(String),

    /// An NCCL call returned an error.
    #[error("NCCL {call} failed with {code_name} ({code}): {message}")]
    Nccl {
        /// The function called.
        call: &'static str,
        /// The ncclResult_t value.
        code: i32,
        /// Its name (ncclInvalidArgument, ...).
        code_name: &'static str,
        /// ncclGetErrorString's text (and ncclGetLastError's where present).
        message: String,
    },

    /// An operating-system call failed (sockets, processes).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = CommError> = std::result::Result<T, E>;

impl CommError {
    /// Whether this is a timeout (waiting for peers, a server, a socket).
    pub fn is_timeout(&self) -> bool {
        matches!(self, CommError::Timeout { .. })
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> CommError {
        CommError::Io {
            what: what.into(),
            source,
        }
    }
}

/// A copy of `e` for reporting one stored failure more than once (a failed
/// collective's error is kept for every later `synchronize`). Variants
/// holding an OS or runtime error become [`CommError::Invalid`] with the
/// same text.
pub(crate) fn duplicate(e: &CommError) -> CommError {
    match e {
        CommError::Invalid(s) => CommError::Invalid(s.clone()),
        CommError::NotDivisible {
            what,
            value,
            by_what,
            by,
        } => CommError::NotDivisible {
            what: what.clone(),
            value: *value,
            by_what: by_what.clone(),
            by: *by,
        },
        CommError::RankOutOfRange { what, rank, world } => CommError::RankOutOfRange {
            what: what.clone(),
            rank: *rank,
            world: *world,
        },
        CommError::Mismatch { seq, op, detail } => CommError::Mismatch {
            seq: *seq,
            op,
            detail: detail.clone(),
        },
        CommError::Timeout { what, secs } => CommError::Timeout {
            what: what.clone(),
            secs: *secs,
        },
        CommError::Aborted { rank, reason } => CommError::Aborted {
            rank: *rank,
            reason: reason.clone(),
        },
        other => CommError::Invalid(other.to_string()),
    }
}
