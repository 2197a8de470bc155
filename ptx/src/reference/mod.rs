//! Naive f64 references: the oracle of the CPU twins and the PTX kernels.
//! Written for clarity, not speed; inputs and outputs are f64 slices in the
//! layouts of `CONVENTIONS.md`. Callers pass well-formed shapes (these are
//! test oracles, not user-facing kernels).

mod attention;
mod rowwise;

pub use attention::{attn_bwd_analytic, attn_bwd_pair, attn_delta, attn_fwd, lse_merge};
pub use rowwise::*;
