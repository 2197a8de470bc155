//! The runtime's error type.

use fpdt_alloc::AllocError;

/// Errors of the runtime. Every failure of a device, a stream or a misuse of
/// the API is one of these values; nothing in the runtime panics on them.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// An allocation failed (out of memory, bad configuration).
    #[error(transparent)]
    Alloc(#[from] AllocError),

    /// Work was enqueued on a stream whose worker has shut down.
    #[error("stream `{stream}` is closed: its device was shut down")]
    StreamClosed {
        /// The stream's name.
        stream: String,
    },

    /// An operation failed on a stream; the stream refuses further work
    /// (its later operations are skipped) and every event recorded after the
    /// failure reports it.
    #[error("stream `{stream}`: operation `{op}` failed: {message}")]
    StreamFailed {
        /// The stream's name.
        stream: String,
        /// The failed operation.
        op: String,
        /// What went wrong.
        message: String,
    },

    /// Two operations (or an operation and the host) touched the same bytes
    /// at the same time, one of them writing: the schedule lacks an event
    /// wait between them.
    #[error(
        "data race on `{tag}` bytes {start}..{end}: `{op}` needs them while `{other}` holds them; \
         order the two with an event"
    )]
    Race {
        /// Tag of the buffer.
        tag: &'static str,
        /// First byte of the overlap.
        start: usize,
        /// One past the last byte of the overlap.
        end: usize,
        /// The operation that found the conflict.
        op: String,
        /// The holder of the conflicting borrow.
        other: String,
    },

    /// The host tried to read or write a buffer that enqueued work still uses.
    #[error(
        "buffer `{tag}` is still used by enqueued work ({pending}); synchronize before {what}"
    )]
    BufferBusy {
        /// Tag of the buffer.
        tag: &'static str,
        /// What the host tried.
        what: &'static str,
        /// What is pending.
        pending: String,
    },

    /// A view or copy reached outside its buffer, or two views did not fit.
    #[error("{what}: range {start}..{end} does not fit in `{tag}` of {len} bytes")]
    OutOfBounds {
        /// The operation or argument.
        what: String,
        /// The tag of the buffer.
        tag: &'static str,
        /// First byte asked for.
        start: usize,
        /// One past the last byte asked for.
        end: usize,
        /// Size of the buffer.
        len: usize,
    },

    /// An argument broke a rule of the API (the message names it).
    #[error("{0}")]
    Invalid(String),

    /// Waiting for something took longer than the configured limit.
    #[error("timed out after {secs:.1} s waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The limit.
        secs: f64,
    },

    /// The meta device has no data to read.
    #[error("the meta device holds no data: {what} needs the cpu or cuda device")]
    NoData {
        /// What needed data.
        what: String,
    },

    /// The operation is not available on this device.
    #[error("{what} is not supported on the {device} device")]
    Unsupported {
        /// The device kind.
        device: &'static str,
        /// The operation.
        what: String,
    },

    /// A CUDA driver or library call failed, or CUDA is not present.
    #[error("cuda: {0}")]
    Cuda(String),

    /// A shared library (cuBLASLt, NCCL) is not found or does not load; the
    /// message says what was tried and which variable to set.
    #[error("{0}")]
    Library(String),

    /// A cuBLASLt call returned an error status.
    #[error("{call} failed: {status_name} ({status}): {message}")]
    Cublas {
        /// The cuBLASLt function.
        call: &'static str,
        /// Its `cublasStatus_t`.
        status: i32,
        /// `cublasLtGetStatusName` of it.
        status_name: String,
        /// `cublasLtGetStatusString` of it, with what was being done.
        message: String,
    },

    /// An operating-system call failed (files, threads, mappings).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl From<crate::libs::LibError> for RuntimeError {
    fn from(e: crate::libs::LibError) -> Self {
        RuntimeError::Library(e.to_string())
    }
}

/// The runtime's result type.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
