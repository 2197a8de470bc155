//! Token data: flat little-endian u16 or u32 token files (the nanoGPT /
//! llm.c convention) read through `memmap2`, a validation split, and
//! sequences packed from the concatenated documents in a deterministic,
//! seedable order whose position can be saved and restored.
//!
//! A token file is the token ids of one or more documents, each followed by
//! an end-of-text token (what `fpdt prepare` writes), with no header. Files
//! that start with llm.c's 1024-byte header (magic 20240520, version 1, the
//! token count) are read too: the header is recognised only when its count
//! matches the file's length exactly.
//!
//! Packing: the token stream (the files one after another) is cut into
//! windows of `seq_len + 1` tokens overlapping by one, so every token but
//! the first is a target exactly once per epoch. Each epoch shifts the cut
//! by a random offset below `seq_len` and visits the windows in a random
//! order; both are drawn from a [`SplitMix64`] whose 64-bit state, with the
//! epoch and the cursor, is the whole [`DataPosition`].

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::config::SplitMix64;
use crate::error::{ModelError, Result};

/// The label of a position that contributes nothing to the loss: the
/// model's own (one constant for data, tasks and the loss kernels).
pub use crate::reference::IGNORE_INDEX;

/// llm.c's token file magic (first i32 of its 256-i32 header).
pub const LLMC_MAGIC: i32 = 20240520;
const LLMC_HEADER_BYTES: usize = 256 * 4;

/// One training sequence: `tokens[t]` is the input at position t and
/// `labels[t]` the token to predict there, or [`IGNORE_INDEX`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Input token ids, `seq_len` of them.
    pub tokens: Vec<u32>,
    /// Targets (`seq_len`), [`IGNORE_INDEX`] where nothing is predicted.
    pub labels: Vec<i32>,
}

/// Bytes per token in a token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenWidth {
    /// Little-endian u16 (vocabularies up to 65536: GPT-2).
    U16,
    /// Little-endian u32 (larger vocabularies: Llama 3).
    U32,
}

impl TokenWidth {
    /// Bytes per token.
    pub fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }

    /// The largest vocabulary the width can hold.
    pub fn max_vocab(self) -> u64 {
        match self {
            TokenWidth::U16 => 1 << 16,
            TokenWidth::U32 => 1 << 32,
        }
    }

    /// Parses `u16`/`2` or `u32`/`4`.
    pub fn parse(s: &str) -> Option<TokenWidth> {
        match s.trim().to_ascii_lowercase().as_str() {
            "u16" | "2" | "16" => Some(TokenWidth::U16),
            "u32" | "4" | "32" => Some(TokenWidth::U32),
            _ => None,
        }
    }

    /// The width a file's name suggests: `.u32` (or `.u32.bin`) is u32,
    /// anything else u16 (nanoGPT's `.bin`).
    pub fn from_path(path: &Path) -> TokenWidth {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if name.ends_with(".u32") || name.ends_with(".u32.bin") {
            TokenWidth::U32
        } else {
            TokenWidth::U16
        }
    }
}

impl std::fmt::Display for TokenWidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenWidth::U16 => "u16",
            TokenWidth::U32 => "u32",
        })
    }
}

/// One memory-mapped token file, checked on open.
pub struct TokenFile {
    path: PathBuf,
    map: Mmap,
    width: TokenWidth,
    header: usize,
    len: usize,
    max_token: u32,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TokenFile(`{}`, {} {} tokens)",
            self.path.display(),
            self.len,
            self.width
        )
    }
}

fn read_i32(b: &[u8], i: usize) -> Option<i32> {
    let s = b.get(i * 4..i * 4 + 4)?;
    Some(i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl TokenFile {
    /// Opens and checks `path`: it exists, is not empty, its length is a
    /// whole number of tokens of `width`, and every id is below
    /// `vocab_size`. Each failure is one line naming the file (and the
    /// offset) and what to do.
    pub fn open(path: &Path, width: TokenWidth, vocab_size: usize) -> Result<TokenFile> {
        let shown = path.display();
        let file = File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ModelError::Data(format!(
                    "token file `{shown}` not found: check the path, or make one with \
                     `fpdt prepare TEXT... --out {shown}`"
                ))
            } else {
                ModelError::Data(format!("token file `{shown}`: cannot open: {e}"))
            }
        })?;
        let meta = file
            .metadata()
            .map_err(|e| ModelError::Data(format!("token file `{shown}`: cannot stat: {e}")))?;
        if meta.is_dir() {
            return Err(ModelError::Data(format!(
                "token file `{shown}` is a directory: name the token files inside it"
            )));
        }
        let bytes = meta.len() as usize;
        if bytes == 0 {
            return Err(ModelError::Data(format!(
                "token file `{shown}` is empty: re-run `fpdt prepare` or leave it out of --data"
            )));
        }
        // SAFETY: the file is opened read-only and this crate never writes
        // to or truncates it; the map is only read as bytes (every length
        // and offset checked against `map.len()`). Another process
        // truncating it while mapped could fault a read, as with any mapped
        // input; token files are written once, then only read.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| ModelError::Data(format!("token file `{shown}`: cannot map: {e}")))?;

        // llm.c header: magic, version 1 (u16 tokens), count matching the length.
        let mut header = 0;
        let mut width = width;
        if map.len() >= LLMC_HEADER_BYTES && read_i32(&map, 0) == Some(LLMC_MAGIC) {
            let version = read_i32(&map, 1).unwrap_or(0);
            let count = read_i32(&map, 2).unwrap_or(-1);
            if version == 1 && count >= 0 && LLMC_HEADER_BYTES + count as usize * 2 == map.len() {
                header = LLMC_HEADER_BYTES;
                width = TokenWidth::U16;
            }
        }
        let body = map.len() - header;
        let w = width.bytes();
        if body % w != 0 {
            return Err(ModelError::Data(format!(
                "token file `{shown}` is truncated: {body} bytes is not a whole number of \
                 {width} tokens ({w} bytes each); re-run `fpdt prepare`, or pass --token-width \
                 if the file holds {} tokens",
                if width == TokenWidth::U16 {
                    "u32"
                } else {
                    "u16"
                }
            )));
        }
        let len = body / w;
        if len == 0 {
            return Err(ModelError::Data(format!(
                "token file `{shown}` holds no tokens: re-run `fpdt prepare` or leave it out of --data"
            )));
        }
        let mut tf = TokenFile {
            path: path.to_path_buf(),
            map,
            width,
            header,
            len,
            max_token: 0,
        };
        tf.check_vocab(vocab_size)?;
        Ok(tf)
    }

    fn check_vocab(&mut self, vocab_size: usize) -> Result<()> {
        let body = &self.map[self.header..];
        let mut max = 0u32;
        let mut bad = None;
        match self.width {
            TokenWidth::U16 => {
                for (i, c) in body.chunks_exact(2).enumerate() {
                    let t = u16::from_le_bytes([c[0], c[1]]) as u32;
                    if t > max {
                        max = t;
                        if t as usize >= vocab_size {
                            bad = Some((i, t));
                            break;
                        }
                    }
                }
            }
            TokenWidth::U32 => {
                for (i, c) in body.chunks_exact(4).enumerate() {
                    let t = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    if t > max {
                        max = t;
                        if t as usize >= vocab_size {
                            bad = Some((i, t));
                            break;
                        }
                    }
                }
            }
        }
        if let Some((i, t)) = bad {
            return Err(ModelError::Data(format!(
                "token file `{}`: token id {t} at token {i} (byte offset {}) is beyond the \
                 vocabulary of {vocab_size}: tokenize with the model's tokenizer, or use a \
                 model with a larger vocabulary",
                self.path.display(),
                self.header + i * self.width.bytes()
            )));
        }
        self.max_token = max;
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tokens in the file.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (empty files are refused on open).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The token width.
    pub fn width(&self) -> TokenWidth {
        self.width
    }

    /// Whether the file had an llm.c header.
    pub fn has_llmc_header(&self) -> bool {
        self.header != 0
    }

    /// The largest token id in the file.
    pub fn max_token(&self) -> u32 {
        self.max_token
    }

    /// Token `i` (`i < len`).
    pub fn get(&self, i: usize) -> Option<u32> {
        if i >= self.len {
            return None;
        }
        let o = self.header + i * self.width.bytes();
        Some(match self.width {
            TokenWidth::U16 => u16::from_le_bytes([self.map[o], self.map[o + 1]]) as u32,
            TokenWidth::U32 => u32::from_le_bytes([
                self.map[o],
                self.map[o + 1],
                self.map[o + 2],
                self.map[o + 3],
            ]),
        })
    }

    /// Appends tokens `range` to `out` (the range is clamped to the file).
    pub fn extend_into(&self, range: Range<usize>, out: &mut Vec<u32>) {
        let end = range.end.min(self.len);
        let start = range.start.min(end);
        let w = self.width.bytes();
        let bytes = &self.map[self.header + start * w..self.header + end * w];
        match self.width {
            TokenWidth::U16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32),
            ),
            TokenWidth::U32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
        }
    }
}

/// Token files read as one stream, in the order given.
#[derive(Debug)]
pub struct TokenDataset {
    files: Vec<TokenFile>,
    /// `starts[i]`: the stream offset of file i's first token.
    starts: Vec<usize>,
    len: usize,
}

impl TokenDataset {
    /// Opens every file (see [`TokenFile::open`]); `width` None takes each
    /// file's width from its name ([`TokenWidth::from_path`]).
    pub fn open(
        paths: &[PathBuf],
        width: Option<TokenWidth>,
        vocab_size: usize,
    ) -> Result<TokenDataset> {
        if paths.is_empty() {
            return Err(ModelError::Data(
                "no token files given: pass --data FILE... (make them with `fpdt prepare`)".into(),
            ));
        }
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            let w = width.unwrap_or_else(|| TokenWidth::from_path(p));
            files.push(TokenFile::open(p, w, vocab_size)?);
        }
        Ok(Self::from_files(files))
    }

    /// A dataset of already opened files.
    pub fn from_files(files: Vec<TokenFile>) -> TokenDataset {
        let mut starts = Vec::with_capacity(files.len());
        let mut len = 0;
        for f in &files {
            starts.push(len);
            len += f.len();
        }
        TokenDataset { files, starts, len }
    }

    /// The files.
    pub fn files(&self) -> &[TokenFile] {
        &self.files
    }

    /// Tokens in all files.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A short description: the files (or their count) and the tokens.
    pub fn describe(&self) -> String {
        let names = if self.files.len() <= 3 {
            self.files
                .iter()
                .map(|f| format!("`{}`", f.path().display()))
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            format!("{} files", self.files.len())
        };
        format!("{names} ({} tokens)", self.len)
    }

    /// Tokens `range` of the stream (across file boundaries).
    pub fn tokens(&self, range: Range<usize>) -> Vec<u32> {
        let end = range.end.min(self.len);
        let mut out = Vec::with_capacity(end.saturating_sub(range.start));
        let mut pos = range.start;
        while pos < end {
            let fi = match self.starts.binary_search(&pos) {
                Ok(i) => i,
                Err(i) => i - 1,
            };
            let f = &self.files[fi];
            let local = pos - self.starts[fi];
            let take = (f.len() - local).min(end - pos);
            f.extend_into(local..local + take, &mut out);
            pos += take;
        }
        out
    }

    /// Splits the stream into training and validation ranges: the last
    /// `val_fraction` of the tokens (at least one sequence's worth when the
    /// fraction is positive) is validation. Both parts must hold one
    /// sequence of `seq_len + 1` tokens.
    pub fn split(&self, val_fraction: f64, seq_len: usize) -> Result<DataSplit> {
        if !(0.0..1.0).contains(&val_fraction) {
            return Err(ModelError::Usage {
                flag: "--val-fraction".into(),
                message: format!("{val_fraction} must be in [0, 1)"),
            });
        }
        let need = seq_len + 1;
        let mut val = (self.len as f64 * val_fraction).round() as usize;
        if val_fraction > 0.0 {
            val = val.max(need);
        }
        let train = self.len.saturating_sub(val);
        if train < need {
            return Err(ModelError::Data(format!(
                "token data {}: {train} training tokens{} is too few for one sequence of \
                 {need} tokens (--seq-len {seq_len} + 1): add data, lower --seq-len{}",
                self.describe(),
                if val > 0 {
                    format!(" (after {val} for validation)")
                } else {
                    String::new()
                },
                if val > 0 { " or --val-fraction" } else { "" }
            )));
        }
        Ok(DataSplit {
            train: 0..train,
            val: train..self.len,
        })
    }
}

/// Token ranges of the stream for training and validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSplit {
    /// Training tokens.
    pub train: Range<usize>,
    /// Validation tokens (empty when there is no validation split).
    pub val: Range<usize>,
}

/// Where a [`PackedLoader`] is: enough to continue bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    /// The seed the loader started from.
    pub seed: u64,
    /// Sequence length it packs to.
    pub seq_len: usize,
    /// Tokens in its range (a changed dataset is refused on restore).
    pub tokens: usize,
    /// Epochs completed.
    pub epoch: u64,
    /// Windows of this epoch already handed out.
    pub cursor: u64,
    /// The generator's state at the start of this epoch (the epoch's shift
    /// and order are drawn from it).
    pub epoch_rng: u64,
}

/// Packs a token range into `seq_len` samples in a seeded order.
#[derive(Debug)]
pub struct PackedLoader {
    data: Arc<TokenDataset>,
    range: Range<usize>,
    seq_len: usize,
    shuffle: bool,
    pos: DataPosition,
    /// This epoch's first window start (stream offset) and window order.
    shift: usize,
    order: Vec<u64>,
    /// The generator's state after drawing this epoch (the next epoch's).
    next_rng: u64,
}

/// The SplitMix64 state a seed starts from (mixed, so nearby seeds differ).
fn seed_state(seed: u64) -> u64 {
    SplitMix64(seed ^ 0x5DEE_CE66_D1CE_4E5B).next_u64()
}

impl PackedLoader {
    /// A loader over `range` of `data` (training: `shuffle` true; a
    /// validation pass: false, windows in order from the range's start).
    pub fn new(
        data: Arc<TokenDataset>,
        range: Range<usize>,
        seq_len: usize,
        seed: u64,
        shuffle: bool,
    ) -> Result<PackedLoader> {
        if seq_len == 0 {
            return Err(ModelError::Usage {
                flag: "--seq-len".into(),
                message: "0 must be positive".into(),
            });
        }
        let range = range.start.min(data.len())..range.end.min(data.len());
        if range.len() < seq_len + 1 {
            return Err(ModelError::Data(format!(
                "token data {}: a range of {} tokens is too few for one sequence of {} tokens \
                 (--seq-len {seq_len} + 1): add data or lower --seq-len",
                data.describe(),
                range.len(),
                seq_len + 1
            )));
        }
        let pos = DataPosition {
            seed,
            seq_len,
            tokens: range.len(),
            epoch: 0,
            cursor: 0,
            epoch_rng: seed_state(seed),
        };
        let mut l = PackedLoader {
            data,
            range,
            seq_len,
            shuffle,
            pos,
            shift: 0,
            order: Vec::new(),
            next_rng: 0,
        };
        l.plan_epoch();
        Ok(l)
    }

    /// Draws this epoch's shift and order from `pos.epoch_rng`.
    fn plan_epoch(&mut self) {
        let mut rng = SplitMix64(self.pos.epoch_rng);
        let len = self.range.len();
        let s = self.seq_len;
        self.shift = if self.shuffle {
            // Keep at least one window whatever the shift.
            rng.below(s.min(len - s))
        } else {
            0
        };
        let windows = (len - 1 - self.shift) / s;
        self.order = (0..windows as u64).collect();
        if self.shuffle {
            for i in (1..self.order.len()).rev() {
                let j = rng.below(i + 1);
                self.order.swap(i, j);
            }
        }
        self.next_rng = rng.0;
    }

    /// Windows per epoch (this epoch; it varies by one with the shift).
    pub fn windows(&self) -> usize {
        self.order.len()
    }

    /// The sequence length.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The next sample; at the end of an epoch the next epoch begins.
    pub fn next_sample(&mut self) -> Sample {
        if self.pos.cursor as usize >= self.order.len() {
            self.pos.epoch += 1;
            self.pos.cursor = 0;
            self.pos.epoch_rng = self.next_rng;
            self.plan_epoch();
        }
        let w = self.order[self.pos.cursor as usize] as usize;
        self.pos.cursor += 1;
        let start = self.range.start + self.shift + w * self.seq_len;
        let window = self.data.tokens(start..start + self.seq_len + 1);
        let tokens = window[..self.seq_len].to_vec();
        let labels = window[1..].iter().map(|&t| t as i32).collect();
        Sample { tokens, labels }
    }

    /// Where the loader is.
    pub fn position(&self) -> DataPosition {
        self.pos
    }

    /// Continues from `pos` (saved by [`Self::position`] from a loader over
    /// the same data, range and sequence length).
    pub fn restore(&mut self, pos: DataPosition) -> Result<()> {
        if pos.seq_len != self.seq_len || pos.tokens != self.range.len() {
            return Err(ModelError::Checkpoint(format!(
                "the saved data position is for --seq-len {} over {} tokens, this run has \
                 --seq-len {} over {} tokens: resume with the same --data, --val-fraction and \
                 --seq-len",
                pos.seq_len,
                pos.tokens,
                self.seq_len,
                self.range.len()
            )));
        }
        self.pos = pos;
        self.plan_epoch();
        if pos.cursor as usize > self.order.len() {
            return Err(ModelError::Checkpoint(format!(
                "the saved data position (window {} of epoch {}) is past the epoch's {} \
                 windows: the checkpoint does not belong to this data",
                pos.cursor,
                pos.epoch,
                self.order.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_u16(dir: &Path, name: &str, toks: &[u16]) -> PathBuf {
        let p = dir.join(name);
        let bytes: Vec<u8> = toks.iter().flat_map(|t| t.to_le_bytes()).collect();
        std::fs::write(&p, bytes).map(|_| p).unwrap_or_default()
    }

    #[test]
    fn width_from_name() {
        assert_eq!(
            TokenWidth::from_path(Path::new("a/train.bin")),
            TokenWidth::U16
        );
        assert_eq!(TokenWidth::from_path(Path::new("a/x.u32")), TokenWidth::U32);
        assert_eq!(
            TokenWidth::from_path(Path::new("x.u32.bin")),
            TokenWidth::U32
        );
        assert_eq!(TokenWidth::parse("U32"), Some(TokenWidth::U32));
        assert_eq!(TokenWidth::parse("8"), None);
    }

    #[test]
    fn stream_crosses_files() {
        let d = std::env::temp_dir().join(format!("fpdt-data-unit-{}", std::process::id()));
        std::fs::create_dir_all(&d).ok();
        let a = write_u16(&d, "a.bin", &[1, 2, 3]);
        let b = write_u16(&d, "b.bin", &[4, 5]);
        let ds = TokenDataset::open(&[a, b], None, 10).map_err(|e| e.to_string());
        let ds = ds.as_ref().map_err(|e| e.as_str());
        assert!(ds.is_ok(), "{ds:?}");
        if let Ok(ds) = ds {
            assert_eq!(ds.len(), 5);
            assert_eq!(ds.tokens(1..5), vec![2, 3, 4, 5]);
            assert_eq!(ds.tokens(3..4), vec![4]);
        }
        std::fs::remove_dir_all(&d).ok();
    }
}
