//! The built-in synthetic long-context task: passkey retrieval.
//!
//! A random key of a few digits is hidden at a random depth in thousands of
//! random filler tokens and asked for at the end, the answer given A times:
//!
//! ```text
//! BOS filler… KEY d1 … dk END_KEY filler… QUERY (ANSWER d1 … dk) × A
//! ```
//!
//! Every answer digit is a training target (every other label is
//! [`IGNORE_INDEX`]). Only the first answer has to be *retrieved*: it can
//! be read from nowhere but the key, up to the whole sequence back. The
//! repeats after it give the model many more targets per sequence that the
//! same look-up solves (find the digit of this place, copy it), which is
//! what lets a tiny model discover the look-up in a few CPU minutes: with
//! one answer per sequence of thousands of tokens the signal that should
//! grow an attention head is about 1/S of the noise around it, and a run of
//! 300 steps stayed at chance. Validation scores the first answer alone
//! ([`PasskeySample::retrieval`]), so its accuracy is retrieval only.
//!
//! Digit d of place i is its own token, `DIGIT0 + 10 i + d`: a digit says
//! which place it holds, so the model finds the key's i-th digit by what it
//! is, not by counting positions from the KEY marker (which needs a
//! two-layer induction circuit a 2-layer, 32-wide model does not form in
//! minutes). Fillers are the ids after the digits. The vocabulary is small
//! (96 ids for tiny-llama). Generation is seeded ([`SplitMix64`]) and its
//! state is one u64, saved with checkpoints for a bit-for-bit resume.

use std::ops::Range;

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
/// Opens each answer ("the pass key is").
pub const ANSWER: u32 = 6;
/// Token of digit 0 of the first place; see [`PasskeyTask::digit_token`].
pub const DIGIT0: u32 = 7;
/// The default key length in digits.
pub const DEFAULT_DIGITS: usize = 4;
/// The default number of answers at the end.
pub const DEFAULT_ANSWERS: usize = 8;

fn one() -> usize {
    1
}

/// The task's shape: sequence length, key digits, vocabulary, answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasskeyTask {
    /// Tokens per sequence (inputs; labels are as many).
    pub seq_len: usize,
    /// Digits in the key.
    pub digits: usize,
    /// Vocabulary size (more than [`PasskeyTask::filler0`]).
    pub vocab_size: usize,
    /// Times the answer is given at the end (the first is the retrieval).
    #[serde(default = "one")]
    pub answers: usize,
}

impl PasskeyTask {
    /// The shortest sequence that holds a key of `digits` digits answered
    /// `answers` times: BOS, the key block, the query and the answers.
    pub fn min_seq_len(digits: usize, answers: usize) -> usize {
        1 + (digits + 2) + 1 + answers * (digits + 1)
    }

    /// The token of digit `d` (0..9) at place `place` (0-based).
    pub fn digit_token(place: usize, d: u32) -> u32 {
        DIGIT0 + 10 * place as u32 + d
    }

    /// The first filler id (fillers are `filler0()..vocab_size`).
    pub fn filler0(&self) -> u32 {
        DIGIT0 + 10 * self.digits as u32
    }

    /// A checked task. Errors name the flag and the rule.
    pub fn new(
        seq_len: usize,
        digits: usize,
        vocab_size: usize,
        answers: usize,
    ) -> Result<PasskeyTask> {
        let usage = |flag: &str, message: String| ModelError::Usage {
            flag: flag.into(),
            message,
        };
        if digits == 0 {
            return Err(usage("--passkey-digits", "0 must be at least 1".into()));
        }
        if answers == 0 {
            return Err(usage("--passkey-answers", "0 must be at least 1".into()));
        }
        let ids = DIGIT0 as usize + 10 * digits;
        if vocab_size <= ids {
            return Err(usage(
                "--passkey-digits",
                format!(
                    "{digits} digits need {ids} ids for markers and digits (10 per place) plus \
                     filler, more than the model's vocabulary of {vocab_size}: use fewer digits \
                     or a model with a larger vocabulary"
                ),
            ));
        }
        let min = Self::min_seq_len(digits, answers);
        if seq_len < min {
            return Err(usage(
                "--seq-len",
                format!(
                    "{seq_len} is too short for the passkey task with {digits}-digit keys \
                     answered {answers} times: use at least {min}"
                ),
            ));
        }
        Ok(PasskeyTask {
            seq_len,
            digits,
            vocab_size,
            answers,
        })
    }

    /// The same task at another sequence length (a stage of the sequence
    /// length warmup), checked.
    pub fn with_seq_len(&self, seq_len: usize) -> Result<PasskeyTask> {
        PasskeyTask::new(seq_len, self.digits, self.vocab_size, self.answers)
    }

    /// One sample with the key at `depth` (0: right after BOS, 1: right
    /// before the question; None: uniform), drawing from `rng`.
    pub fn sample(&self, rng: &mut SplitMix64, depth: Option<f64>) -> PasskeySample {
        let s = self.seq_len;
        let k = self.digits;
        let filler0 = self.filler0();
        let fillers = self.vocab_size - filler0 as usize;
        // seq holds s + 1 tokens: inputs are seq[..s], labels seq[1..].
        let mut seq: Vec<u32> = (0..=s)
            .map(|_| filler0 + rng.below(fillers) as u32)
            .collect();
        seq[0] = BOS;
        let key: Vec<u32> = (0..k).map(|_| rng.below(10) as u32).collect();
        let query_at = s - self.answers * (k + 1);
        // The key block (k + 2 tokens) starts in [1, query_at - (k + 2)].
        let span = query_at - (k + 2) - 1;
        let at = 1 + match depth {
            Some(d) => (d.clamp(0.0, 1.0) * span as f64).round() as usize,
            None => rng.below(span + 1),
        };
        seq[at] = KEY;
        for (i, &d) in key.iter().enumerate() {
            seq[at + 1 + i] = Self::digit_token(i, d);
        }
        seq[at + 1 + k] = END_KEY;
        seq[query_at] = QUERY;
        for a in 0..self.answers {
            let first = query_at + 1 + a * (k + 1);
            seq[first] = ANSWER;
            for (i, &d) in key.iter().enumerate() {
                seq[first + 1 + i] = Self::digit_token(i, d);
            }
        }
        let tokens = seq[..s].to_vec();
        // Label t is token t + 1: a target where that is an answer digit.
        let labels = (0..s)
            .map(|t| {
                let next = seq[t + 1];
                if t > query_at && next != ANSWER {
                    next as i32
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        PasskeySample {
            sample: Sample { tokens, labels },
            key,
            key_at: at,
            first_answer: query_at + 1..query_at + 1 + k,
        }
    }
}

/// One passkey sequence and what is hidden in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasskeySample {
    /// Tokens and labels (targets at every answer digit).
    pub sample: Sample,
    /// The key, as digits 0..9.
    pub key: Vec<u32>,
    /// Position of the KEY marker.
    pub key_at: usize,
    /// Label positions of the first answer's digits: the retrieval.
    pub first_answer: Range<usize>,
}

impl PasskeySample {
    /// The sample with targets at the first answer only: what the key's
    /// retrieval is scored on (the later answers can copy the first).
    pub fn retrieval(&self) -> Sample {
        let labels = self
            .sample
            .labels
            .iter()
            .enumerate()
            .map(|(t, &l)| {
                if self.first_answer.contains(&t) {
                    l
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        Sample {
            tokens: self.sample.tokens.clone(),
            labels,
        }
    }
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

    /// The next sample at sequence length `task` (the same stream at
    /// another length: a stage of the sequence-length warmup).
    pub fn next_sample_of(&mut self, task: &PasskeyTask) -> PasskeySample {
        task.sample(&mut self.rng, None)
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
