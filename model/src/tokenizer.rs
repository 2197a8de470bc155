//! GPT-2 BPE (through `tiktoken-rs`, whose ranks are compiled into the
//! crate: nothing is downloaded) and `fpdt prepare`: text files to a u16
//! token file, each document followed by the end-of-text token.

use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tiktoken_rs::CoreBPE;

use crate::error::{ModelError, Result};

/// GPT-2's end-of-text token, `<|endoftext|>`.
pub const GPT2_EOT: u32 = 50256;
/// GPT-2's vocabulary size.
pub const GPT2_VOCAB: usize = 50257;

/// Text pieces tokenized at once: about this many bytes, cut where the
/// cut cannot change the result (see [`piece_end`]).
const PIECE_BYTES: usize = 1 << 20;

/// The GPT-2 tokenizer.
pub struct Gpt2Tokenizer {
    bpe: CoreBPE,
}

impl std::fmt::Debug for Gpt2Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gpt2Tokenizer")
    }
}

impl Gpt2Tokenizer {
    /// Builds the tokenizer from the ranks embedded in `tiktoken-rs`
    /// (`r50k_base`, GPT-2's encoding).
    pub fn new() -> Result<Gpt2Tokenizer> {
        let bpe = tiktoken_rs::r50k_base().map_err(|e| {
            ModelError::Tokenizer(format!("building the GPT-2 tokenizer failed: {e}"))
        })?;
        Ok(Gpt2Tokenizer { bpe })
    }

    /// Token ids of `text`; `<|endoftext|>` in the text is plain text here
    /// (documents are separated by the caller).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let end = piece_end(rest, PIECE_BYTES);
            out.extend(self.bpe.encode_ordinary(&rest[..end]));
            rest = &rest[end..];
        }
        out
    }

    /// Text of `tokens`.
    pub fn decode(&self, tokens: &[u32]) -> Result<String> {
        self.bpe
            .decode(tokens.to_vec())
            .map_err(|e| ModelError::Tokenizer(format!("decoding {} tokens: {e}", tokens.len())))
    }
}

/// Where to cut `text` near `target` bytes without changing its BPE: just
/// after a newline that is followed by a character that is neither
/// whitespace nor an apostrophe. GPT-2's pre-tokenizer then ends a
/// whitespace piece at the newline and starts a new piece after it, cut or
/// not. Without such a place, the whole text.
pub fn piece_end(text: &str, target: usize) -> usize {
    if text.len() <= target {
        return text.len();
    }
    let b = text.as_bytes();
    let mut i = target;
    while i + 1 < b.len() {
        if b[i] == b'\n' {
            let next = b[i + 1];
            if !next.is_ascii_whitespace() && next != b'\'' && next.is_ascii() {
                return i + 1;
            }
        }
        i += 1;
    }
    text.len()
}

/// What `fpdt prepare` does.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Text files, or directories (their files, recursively, sorted).
    pub inputs: Vec<PathBuf>,
    /// The token file to write (u16 little-endian).
    pub out: PathBuf,
    /// Also split each input at this separator into documents (e.g.
    /// `<|endoftext|>`); None: each file is one document.
    pub separator: Option<String>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// What `fpdt prepare` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareReport {
    /// Input files read.
    pub files: usize,
    /// Documents (each followed by an end-of-text token).
    pub documents: usize,
    /// Bytes of text read.
    pub text_bytes: u64,
    /// Tokens written (end-of-text tokens included).
    pub tokens: u64,
    /// The file written.
    pub out: PathBuf,
    /// Its size in bytes.
    pub out_bytes: u64,
    /// Input files that were not valid UTF-8 (invalid bytes replaced).
    pub lossy_files: Vec<PathBuf>,
}

impl std::fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wrote {} tokens ({} documents from {} files, {} bytes of text, {:.2} bytes/token) \
             to `{}`: {} bytes, u16 little-endian, GPT-2 BPE, EOT {GPT2_EOT} after each document",
            self.tokens,
            self.documents,
            self.files,
            self.text_bytes,
            if self.tokens == 0 {
                0.0
            } else {
                self.text_bytes as f64 / self.tokens as f64
            },
            self.out.display(),
            self.out_bytes
        )?;
        if !self.lossy_files.is_empty() {
            write!(
                f,
                "\nnote: {} input file(s) were not valid UTF-8 and had bytes replaced, first `{}`",
                self.lossy_files.len(),
                self.lossy_files[0].display()
            )?;
        }
        Ok(())
    }
}

fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let rd = std::fs::read_dir(dir).map_err(|e| {
            ModelError::Tokenizer(format!("input directory `{}`: {e}", dir.display()))
        })?;
        let mut entries = Vec::new();
        for e in rd {
            let e = e.map_err(|e| {
                ModelError::Tokenizer(format!("input directory `{}`: {e}", dir.display()))
            })?;
            entries.push(e.path());
        }
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if p
                .file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
            {
                out.push(p);
            }
        }
        Ok(())
    }
    if inputs.is_empty() {
        return Err(ModelError::Tokenizer(
            "no input given: name the text files (or directories) to tokenize".into(),
        ));
    }
    let mut out = Vec::new();
    for p in inputs {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => walk(p, &mut out)?,
            Ok(_) => out.push(p.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ModelError::Tokenizer(format!(
                    "input `{}` not found: check the path",
                    p.display()
                )))
            }
            Err(e) => {
                return Err(ModelError::Tokenizer(format!(
                    "input `{}`: {e}",
                    p.display()
                )))
            }
        }
    }
    if out.is_empty() {
        return Err(ModelError::Tokenizer(format!(
            "no files found under {}: name text files to tokenize",
            inputs
                .iter()
                .map(|p| format!("`{}`", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(out)
}

/// A temporary name beside `path` (same directory, so the rename is atomic).
pub(crate) fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Tokenizes `opts.inputs` into `opts.out`. The output is written to a
/// temporary file beside it and renamed when complete, so a failure leaves
/// no half-written token file.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    let files = collect_inputs(&opts.inputs)?;
    let out = &opts.out;
    if out.is_dir() {
        return Err(ModelError::Tokenizer(format!(
            "--out `{}` is a directory: name the token file to write, e.g. `{}`",
            out.display(),
            out.join("train.bin").display()
        )));
    }
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| {
        ModelError::Tokenizer(format!(
            "--out `{}`: cannot create directory `{}`: {e}; choose a writable location",
            out.display(),
            dir.display()
        ))
    })?;
    let tmp = temp_beside(out);
    let file = std::fs::File::create(&tmp).map_err(|e| {
        ModelError::Tokenizer(format!(
            "--out `{}`: cannot write in `{}`: {e}; choose a writable location",
            out.display(),
            dir.display()
        ))
    })?;
    let result = write_tokens(&files, opts, file);
    match result {
        Ok(mut report) => {
            std::fs::rename(&tmp, out).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                ModelError::Tokenizer(format!(
                    "--out `{}`: cannot rename into place: {e}",
                    out.display()
                ))
            })?;
            report.out = out.clone();
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_tokens(
    files: &[PathBuf],
    opts: &PrepareOptions,
    file: std::fs::File,
) -> Result<PrepareReport> {
    let tok = Gpt2Tokenizer::new()?;
    let total: u64 = files
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = if opts.progress {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::default_bar().template(
        "{spinner} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    ) {
        bar.set_style(style);
    }
    let out_name = opts.out.display().to_string();
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let write_err = |e: std::io::Error| {
        ModelError::Tokenizer(format!("--out `{out_name}`: writing failed: {e}"))
    };
    let mut report = PrepareReport {
        files: files.len(),
        documents: 0,
        text_bytes: 0,
        tokens: 0,
        out: opts.out.clone(),
        out_bytes: 0,
        lossy_files: Vec::new(),
    };
    let mut buf: Vec<u8> = Vec::new();
    for path in files {
        let bytes = std::fs::read(path).map_err(|e| {
            ModelError::Tokenizer(format!("input `{}`: cannot read: {e}", path.display()))
        })?;
        let text = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                report.lossy_files.push(path.clone());
                String::from_utf8_lossy(e.as_bytes()).into_owned()
            }
        };
        report.text_bytes += text.len() as u64;
        bar.set_message(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        let docs: Vec<&str> = match &opts.separator {
            Some(sep) if !sep.is_empty() => text.split(sep.as_str()).collect(),
            _ => vec![text.as_str()],
        };
        for doc in docs {
            if doc.trim().is_empty() {
                bar.inc(doc.len() as u64);
                continue;
            }
            let mut rest = doc;
            while !rest.is_empty() {
                let end = piece_end(rest, PIECE_BYTES);
                let ids = tok.bpe.encode_ordinary(&rest[..end]);
                buf.clear();
                for &t in &ids {
                    // GPT-2 ids are below 50257 < 65536.
                    buf.extend_from_slice(&(t as u16).to_le_bytes());
                }
                w.write_all(&buf).map_err(write_err)?;
                report.tokens += ids.len() as u64;
                bar.inc(end as u64);
                rest = &rest[end..];
            }
            w.write_all(&(GPT2_EOT as u16).to_le_bytes())
                .map_err(write_err)?;
            report.tokens += 1;
            report.documents += 1;
        }
    }
    let file = w.into_inner().map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(write_err)?;
    bar.finish_and_clear();
    if report.tokens == 0 {
        return Err(ModelError::Tokenizer(format!(
            "the inputs hold no text to tokenize ({} files, all empty or blank): nothing written \
             to `{}`",
            files.len(),
            opts.out.display()
        )));
    }
    report.out_bytes = report.tokens * 2;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_cuts_do_not_change_tokens() {
        let tok = Gpt2Tokenizer::new().map_err(|e| e.to_string());
        assert!(tok.is_ok(), "{tok:?}");
        let Ok(tok) = tok else { return };
        let para = "The quick brown fox's den.\n\n  Indented line\nit's 42 o'clock\n'quoted'\n\tTab\nEnd.\n";
        let text: String = para.repeat(200);
        let whole = tok.bpe.encode_ordinary(&text);
        for target in [1, 7, 30, 100, 1000] {
            let mut got = Vec::new();
            let mut rest = text.as_str();
            while !rest.is_empty() {
                let end = piece_end(rest, target);
                got.extend(tok.bpe.encode_ordinary(&rest[..end]));
                rest = &rest[end..];
            }
            assert_eq!(got, whole, "cut near {target} bytes changed the tokens");
        }
        assert_eq!(tok.decode(&whole).ok().as_deref(), Some(text.as_str()));
    }

    #[test]
    fn known_ids() {
        let Ok(tok) = Gpt2Tokenizer::new() else {
            panic!("tokenizer")
        };
        // GPT-2: "Hello" = 15496, " world" = 995.
        assert_eq!(tok.encode("Hello world"), vec![15496, 995]);
    }
}
