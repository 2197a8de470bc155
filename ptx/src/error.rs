//! The kernel crate's error type. Add variants; keep messages naming the
//! argument, the value and the rule.

/// Errors of kernels, launchers and the PTX interpreter.
#[derive(Debug, thiserror::Error)]
pub enum PtxError {
    /// A launcher argument broke a rule (shape, stride, alignment, dtype):
    /// the message names the argument, its value and the rule.
    #[error("{kernel}: argument `{arg}` {message}")]
    BadArgument {
        /// The kernel.
        kernel: &'static str,
        /// The argument.
        arg: &'static str,
        /// What is wrong, with the value and the rule.
        message: String,
    },

    /// The PTX interpreter could not parse or decode a module.
    #[error("PTX line {line}: {message}")]
    Parse {
        /// 1-based line of the module text.
        line: usize,
        /// What is wrong.
        message: String,
    },

    /// The PTX interpreter stopped a kernel: a check failed (out-of-bounds
    /// or misaligned access, uninitialized shared read, shared-memory race,
    /// partial barrier) or an instruction could not run.
    #[error(
        "{kernel}: line {line}: block ({},{},{}) thread ({},{},{}): {fault}: {message}",
        .block.x, .block.y, .block.z, .thread.x, .thread.y, .thread.z
    )]
    Exec {
        /// The `.entry`.
        kernel: String,
        /// 1-based line of the instruction in the module text.
        line: usize,
        /// `%ctaid` of the block.
        block: crate::launch::Dim3,
        /// `%tid` of the thread.
        thread: crate::launch::Dim3,
        /// Which check failed.
        fault: crate::interp::Fault,
        /// Details: addresses, sizes, the other thread of a race.
        message: String,
    },

    /// A launch or host access of the interpreter was refused (unknown
    /// entry, wrong arguments, bad shapes, out-of-bounds `read`/`write`).
    #[error("interpreter: {0}")]
    Interp(String),

    /// The device a kernel ran on refused or failed (no GPU, a driver
    /// error, a launch the runtime's checks refused).
    #[error("device: {0}")]
    Device(String),
}
