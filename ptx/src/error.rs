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
}
