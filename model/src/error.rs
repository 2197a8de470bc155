//! The error type of fpdt-model.

use fpdt_comm::CommError;
use fpdt_ptx::PtxError;
use fpdt_runtime::RuntimeError;

/// The crate's result type.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Everything that can go wrong in fpdt-model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A configuration value breaks a rule; names the field, its value and
    /// the rule.
    #[error("invalid config: {field} = {value}: {rule}")]
    Config {
        /// The field (for example `heads`).
        field: String,
        /// Its value as given.
        value: String,
        /// The rule it breaks.
        rule: String,
    },
    /// A tensor or input has the wrong size.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A JSON document could not be parsed.
    #[error("{what}: {source}")]
    Json {
        /// What was being parsed.
        what: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Communication failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// A kernel rejected its arguments.
    #[error(transparent)]
    Ptx(#[from] PtxError),
    /// A rank's worker thread failed.
    #[error("rank {rank}: {message}")]
    Rank {
        /// The rank.
        rank: usize,
        /// What happened.
        message: String,
    },
    /// Token data is missing, truncated, empty or out of the vocabulary;
    /// one line naming the file and what to do.
    #[error("{0}")]
    Data(String),
    /// A checkpoint is missing, torn, or from another config; one line
    /// naming the checkpoint (and the field) and what to do.
    #[error("{0}")]
    Checkpoint(String),
    /// Tokenizing text failed (the tokenizer itself, or an input file).
    #[error("{0}")]
    Tokenizer(String),
    /// A training run that had to stop (diverged).
    #[error("{0}")]
    Training(String),
    /// A command-line flag has a bad value; names the flag and the rule.
    #[error("{flag}: {message}")]
    Usage {
        /// The flag, e.g. `--seq-len`.
        flag: String,
        /// What is wrong and what to do.
        message: String,
    },
}

impl ModelError {
    /// A config error naming `field`, `value` and `rule`.
    pub fn config(field: impl Into<String>, value: impl ToString, rule: impl Into<String>) -> Self {
        ModelError::Config {
            field: field.into(),
            value: value.to_string(),
            rule: rule.into(),
        }
    }
}
