//! fpdt-model: GPT and Llama with hand-written backward, the FPDT layer
//! schedule, the optimizer, data and checkpoints.

pub mod config;
pub mod error;
pub mod fpdt;
pub mod layers;
pub mod reference;

pub use config::{
    Activation, Family, LayerParams, ModelConfig, Norm, ParamEntry, ParamLayout, Schedule,
    SplitMix64,
};
pub use error::{ModelError, Result};
pub use fpdt::{FpdtGroup, RankModel, StepOutput};
