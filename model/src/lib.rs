//! fpdt-model: GPT and Llama with hand-written backward, the FPDT layer
//! schedule, the optimizer, data and checkpoints.

pub mod bench;
pub mod config;
pub mod error;
pub mod fpdt;
pub mod layers;
pub mod reference;

// Trainer parts: data, the passkey task, the tokenizer, checkpoints, the CLI.
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod hf;
pub mod passkey;
pub mod planner;
pub mod plot;
pub mod tokenizer;
pub mod train;

pub use config::{
    Activation, Family, LayerParams, ModelConfig, Norm, ParamEntry, ParamLayout, Schedule,
    SplitMix64,
};
pub use error::{ModelError, Result};
pub use fpdt::{
    FpdtGroup, MicroStats, OptimReport, OptimStep, OptimizerState, RankModel, StepOutput,
};
