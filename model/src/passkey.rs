//! The built-in synthetic long-context task: passkey retrieval.
//!
//! A random key of a few digit tokens is hidden at a random depth in
//! thousands of random filler tokens and asked for at the end:
//!
//! ```text
//! BOS filler… KEY d1 … dk END_KEY filler… QUERY ANSWER d1 … dk
//! ```
//!
//! Only the answer digits are targets (every other label is
//! [`IGNORE_INDEX`]), so the loss and the accuracy measure retrieval alone:
//! the answer can only be read from the key, up to the whole sequence back.
//! The vocabulary is small (256 ids by default) so that a tiny model learns
//! the task on a CPU in minutes. Generation is seeded ([`SplitMix64`]) and
//! its state is one u64, saved with checkpoints for a bit-for-bit resume.

use serde::{Deserialize, Serialize};

use crate::config::SplitMix64;
use crate::data::{Sample, IGNORE_INDEX};
use crate::error::{ModelError, Result};

/// Beginning of sequence.
pub const BOS: u32 = 1;
/// Opens the hidden key ("the pass key is").
pub const KEY: u32 = 3;
/// Closes the hidden key ("remember it").
pub const END_KEY: u32 = 4;
/// The question ("what is the pass key?").
pub const QUERY: u32 = 5;
/// Opens the answer ("the pass key is").
pub const ANSWER: u32 = 6;
/// Token of digit 0; digits 0..9 are `DIGIT0..DIGIT0 + 10`.
pub const DIGIT0: u32 = 7;
/// First filler token; fillers are `FILLER0..vocab_size`.
pub const FILLER0: u32 = DIGIT0 + 10;
/// The default vocabulary.
pub const DEFAULT_VOCAB: usize = 256;
/// The default key length in digits.
pub const DEFAULT_DIGITS: usize = 4;

/// The task's shape: sequence length, key digits, vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasskeyTask {
    /// Tokens per sequence (inputs; labels are as many).
    pub seq_len: usize,
    /// Digits in the key.
    pub digits: usize,
    /// Vocabulary size (at least [`FILLER0`] + 1).
    pub vocab_size: usize,
}

impl PasskeyTask {
    /// The shortest sequence that holds a key of `digits` digits:
    /// BOS, the key block, the query and the answer.
    pub fn min_seq_len(digits: usize) -> usize {
        2 * digits + 4
    }

    /// A checked task. Errors name the flag and the rule.
    pub fn new(seq_len: usize, digits: usize, vocab_size: usize) -> Result<PasskeyTask> {
        if digits == 0 {
            return Err(ModelError::Usage {
                flag: "--passkey-digits".into(),
                message: "0 must be at least 1".into(),
            });
        }
        if seq_len < Self::min_seq_len(digits) {
            return Err(ModelError::Usage {
                flag: "--seq-len".into(),
                message: format!(
                    "{seq_len} is too short for the passkey task with {digits}-digit keys: \
                     use at least {}",
                    Self::min_seq_len(digits)
                ),
            });
        }
        if vocab_size <= FILLER0 as usize {
            return Err(ModelError::config(
                "vocab_size",
                vocab_size,
                format!("the passkey task needs more than {FILLER0} ids (markers, digits, filler)"),
            ));
        }
        Ok(PasskeyTask {
            seq_len,
            digits,
            vocab_size,
        })
    }

    /// One sample with the key at `depth` (0: right after BOS, 1: right
    /// before the question; None: uniform), drawing from `rng`.
    pub fn sample(&self, rng: &mut SplitMix64, depth: Option<f64>) -> PasskeySample {
        let s = self.seq_len;
        let k = self.digits;
        let fillers = self.vocab_size - FILLER0 as usize;
        // seq holds s + 1 tokens: inputs are seq[..s], labels seq[1..].
        let mut seq: Vec<u32> = (0..=s)
            .map(|_| FILLER0 + rng.below(fillers) as u32)
            .collect();
        seq[0] = BOS;
        let key: Vec<u32> = (0..k).map(|_| rng.below(10) as u32).collect();
        let query_at = s - k - 1;
        // The key block (k + 2 tokens) starts in [1, query_at - (k + 2)].
        let span = query_at - (k + 2) - 1;
        let at = 1 + match depth {
            Some(d) => (d.clamp(0.0, 1.0) * span as f64).round() as usize,
            None => rng.below(span + 1),
        };
        seq[at] = KEY;
        for (i, &d) in key.iter().enumerate() {
            seq[at + 1 + i] = DIGIT0 + d;
        }
        seq[at + 1 + k] = END_KEY;
        seq[query_at] = QUERY;
        seq[query_at + 1] = ANSWER;
        for (i, &d) in key.iter().enumerate() {
            seq[query_at + 2 + i] = DIGIT0 + d;
        }
        let tokens = seq[..s].to_vec();
        let labels = (0..s)
            .map(|t| {
                if t + 1 >= query_at + 2 {
                    seq[t + 1] as i32
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        PasskeySample {
            sample: Sample { tokens, labels },
            key,
            key_at: at,
        }
    }
}

/// One passkey sequence and what is hidden in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasskeySample {
    /// Tokens and labels (targets only at the answer digits).
    pub sample: Sample,
    /// The key, as digits 0..9.
    pub key: Vec<u32>,
    /// Position of the KEY marker.
    pub key_at: usize,
}

/// A seeded stream of passkey samples; its state is one u64.
#[derive(Debug, Clone)]
pub struct PasskeyGen {
    task: PasskeyTask,
    rng: SplitMix64,
}

impl PasskeyGen {
    /// A generator for `task` from `seed`.
    pub fn new(task: PasskeyTask, seed: u64) -> PasskeyGen {
        PasskeyGen {
            task,
            rng: SplitMix64(seed ^ 0x7A55_4B3E_9C1D_0F21),
        }
    }

    /// The task.
    pub fn task(&self) -> &PasskeyTask {
        &self.task
    }

    /// The next sample (key at a uniform depth).
    pub fn next_sample(&mut self) -> PasskeySample {
        self.task.sample(&mut self.rng, None)
    }

    /// The generator's state (to save).
    pub fn state(&self) -> u64 {
        self.rng.0
    }

    /// Continues from a saved state.
    pub fn restore(&mut self, state: u64) {
        self.rng = SplitMix64(state);
    }
}

/// Per-position argmax of row-major `logits` (`rows x vocab`).
pub fn argmax_rows(logits: &[f32], vocab: usize) -> Vec<u32> {
    if vocab == 0 {
        return Vec::new();
    }
    logits
        .chunks_exact(vocab)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

/// Passkey accuracy: answer digits and whole keys predicted right.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasskeyScore {
    /// Answer digits predicted right.
    pub digits_correct: u64,
    /// Answer digits scored.
    pub digits: u64,
    /// Keys with every digit right.
    pub keys_correct: u64,
    /// Keys scored.
    pub keys: u64,
}

impl PasskeyScore {
    /// Scores one sequence: `predicted[t]` is the model's token at position
    /// t (the argmax of its logits); positions whose label is not
    /// [`IGNORE_INDEX`] are the answer.
    pub fn add(&mut self, labels: &[i32], predicted: &[u32]) {
        let mut all = true;
        let mut any = false;
        for (&l, &p) in labels.iter().zip(predicted) {
            if l == IGNORE_INDEX {
                continue;
            }
            any = true;
            self.digits += 1;
            if l >= 0 && p == l as u32 {
                self.digits_correct += 1;
            } else {
                all = false;
            }
        }
        if any {
            self.keys += 1;
            if all {
                self.keys_correct += 1;
            }
        }
    }

    /// Adds another score.
    pub fn merge(&mut self, other: &PasskeyScore) {
        self.digits_correct += other.digits_correct;
        self.digits += other.digits;
        self.keys_correct += other.keys_correct;
        self.keys += other.keys;
    }

    /// Fraction of answer digits right (0 when none were scored).
    pub fn digit_accuracy(&self) -> f64 {
        if self.digits == 0 {
            0.0
        } else {
            self.digits_correct as f64 / self.digits as f64
        }
    }

    /// Fraction of keys entirely right (0 when none were scored).
    pub fn key_accuracy(&self) -> f64 {
        if self.keys == 0 {
            0.0
        } else {
            self.keys_correct as f64 / self.keys as f64
        }
    }
}
