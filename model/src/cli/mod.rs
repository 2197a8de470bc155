//! The `fpdt` command line: `train`, `prepare`, `plan`, `info`, `bench`.
//!
//! The binary (`src/bin/fpdt.rs`) only calls [`main`]; everything is here
//! so that the parsing and the checks are testable as a library.

mod bench;
mod info;
mod plan;
mod train;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::ModelError;
use crate::tokenizer::{prepare, PrepareOptions};

pub use bench::{BenchArgs, BenchCommand, MemoryArgs, OverlapArgs};
pub use plan::PlanArgs;
pub use train::{TrainArgs, TrainPlan};

/// Exit code of a run that failed on bad input or a fault.
pub const EXIT_ERROR: u8 = 1;
/// Exit code of a command line clap refused (as clap itself uses).
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a command whose implementation is not built yet.
pub const EXIT_NOT_BUILT: u8 = 3;

/// fpdt: train LLMs on ultra-long sequences with the Fully Pipelined
/// Distributed Transformer.
#[derive(Debug, Parser)]
#[command(name = "fpdt", version, about, long_about = None)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model (with no flags: a tiny Llama on the built-in passkey
    /// retrieval task).
    Train(Box<TrainArgs>),
    /// Tokenize text files (GPT-2 BPE) into a u16 token file.
    Prepare(PrepareArgs),
    /// Plan a run on the meta device: memory, step time, largest sequence.
    Plan(Box<PlanArgs>),
    /// Devices, NUMA topology, the host arena, NCCL.
    Info(InfoArgs),
    /// Benchmarks that print tables: `overlap` (offload cost and copy time
    /// hidden, cpu) and `memory` (peak device memory, FPDT vs Ulysses).
    Bench(Box<BenchArgs>),
}

/// `fpdt prepare`.
#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// Text files or directories (their files, recursively) to tokenize.
    #[arg(required = true, value_name = "TEXT")]
    pub inputs: Vec<PathBuf>,
    /// The token file to write (u16 little-endian, an EOT after each document).
    #[arg(long, short, value_name = "FILE")]
    pub out: PathBuf,
    /// Split each input into documents at this string (e.g. `<|endoftext|>`);
    /// by default each file is one document.
    #[arg(long, value_name = "STRING")]
    pub separator: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// `fpdt info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Size of the probe host arena whose pinning and NUMA binding are
    /// reported (e.g. 64M, 1G).
    #[arg(long, default_value = "64M", value_parser = parse_bytes_arg, value_name = "BYTES")]
    pub arena: usize,
}

/// Parses a byte count: a number with an optional K/M/G/T suffix (binary).
pub fn parse_bytes(s: &str) -> Option<usize> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let (n, suf) = t.split_at(i);
            let m: u64 = match suf.to_ascii_lowercase().trim_end_matches(['b', 'i']) {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                _ => return None,
            };
            (n.trim(), m)
        }
        None => (t, 1),
    };
    let v: f64 = num.parse().ok()?;
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    Some((v * mult as f64) as usize)
}

fn parse_bytes_arg(s: &str) -> Result<usize, String> {
    parse_bytes(s).ok_or_else(|| format!("`{s}` is not a byte count (e.g. 4096, 512M, 64G)"))
}

/// Runs the command line `args` (the first is the program name); returns
/// the process's exit code. Errors are printed as one line on stderr.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The process's own command line.
pub fn main() -> ExitCode {
    quiet_on_closed_stdout();
    run(std::env::args_os())
}

/// `fpdt train | head` closes stdout early; `println!` then panics with
/// "failed printing to stdout: Broken pipe". Exit quietly instead, with the
/// status a shell gives a process killed by SIGPIPE (128 + 13), as C tools
/// do; every other panic keeps the default report.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// An error as one line (its sources joined with `: `).
pub fn one_line(e: &ModelError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s.replace('\n', " ")
}

fn dispatch(cli: Cli) -> Result<ExitCode, ModelError> {
    match cli.command {
        Command::Prepare(a) => {
            let report = prepare(&PrepareOptions {
                inputs: a.inputs,
                out: a.out,
                separator: a.separator,
                progress: !a.no_progress,
            })?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Info(a) => {
            print!("{}", info::report(a.arena));
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(a) => train::train(&a),
        Command::Plan(a) => plan::plan(&a),
        Command::Bench(a) => bench::bench(&a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("64M"), Some(64 << 20));
        assert_eq!(parse_bytes("1.5G"), Some(3 << 29));
        assert_eq!(parse_bytes("80GiB"), Some(80 << 30));
        assert_eq!(parse_bytes("2x"), None);
        assert_eq!(parse_bytes("-1"), None);
    }
}
