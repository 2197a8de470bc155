//! `fpdt prepare` and `fpdt info`, run as the binary.

use std::process::{Command, Output};

use fpdt_model::data::{TokenDataset, TokenWidth};
use fpdt_model::tokenizer::{Gpt2Tokenizer, GPT2_EOT, GPT2_VOCAB};

mod common;
use common::TempDir;

fn fpdt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fpdt"))
        .args(args)
        .output()
        .expect("run fpdt")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn prepare_writes_u16_tokens_with_an_eot_after_each_document() {
    let d = TempDir::new("prep");
    let corpus = d.0.join("corpus");
    std::fs::create_dir_all(corpus.join("sub")).expect("mkdir");
    let a = "First document.\nIt has two lines.\n";
    let b = "Second one: ünïcödé and numbers 12345.";
    let c = "Third<|endoftext|>Fourth";
    std::fs::write(corpus.join("a.txt"), a).expect("write");
    std::fs::write(corpus.join("sub/b.txt"), b).expect("write");
    let c_path = d.0.join("c.txt");
    std::fs::write(&c_path, c).expect("write");
    let out = d.0.join("tok/train.bin");
    let o = fpdt(&[
        "prepare",
        corpus.to_str().expect("utf8"),
        c_path.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
        "--separator",
        "<|endoftext|>",
        "--no-progress",
    ]);
    let stdout = text(&o.stdout);
    assert!(o.status.success(), "{stdout} {}", text(&o.stderr));

    let tok = Gpt2Tokenizer::new().expect("tokenizer");
    let mut want = Vec::new();
    for doc in [a, b, "Third", "Fourth"] {
        want.extend(tok.encode(doc));
        want.push(GPT2_EOT);
    }
    let bytes = std::fs::read(&out).expect("read output");
    assert_eq!(bytes.len(), want.len() * 2);
    let ds = TokenDataset::open(
        std::slice::from_ref(&out),
        Some(TokenWidth::U16),
        GPT2_VOCAB,
    )
    .expect("open");
    assert_eq!(ds.tokens(0..ds.len()), want);
    assert!(
        stdout.contains(&format!("wrote {} tokens", want.len()))
            && stdout.contains("4 documents from 3 files")
            && stdout.contains(&format!("{} bytes", bytes.len()))
            && stdout.contains("train.bin"),
        "{stdout}"
    );
    // Nothing else was left beside it.
    let names: Vec<_> = std::fs::read_dir(d.0.join("tok"))
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn prepare_bad_input_is_one_line_and_writes_nothing() {
    let d = TempDir::new("prepbad");
    let out = d.0.join("out.bin");
    let o = fpdt(&[
        "prepare",
        d.0.join("missing.txt").to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
    ]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("missing.txt") && err.contains("not found"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!out.exists());

    // Only blank text: an error, and no output file.
    let blank = d.0.join("blank.txt");
    std::fs::write(&blank, "  \n\n").expect("write");
    let o = fpdt(&[
        "prepare",
        blank.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("no text"), "{}", text(&o.stderr));
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(&d.0).expect("ls").count(),
        1,
        "no temp file left"
    );

    // An unwritable output location.
    let o = fpdt(&[
        "prepare",
        blank.to_str().expect("utf8"),
        "--out",
        "/proc/fpdt/x.bin",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains("--out") && err.contains("/proc/fpdt/x.bin"),
        "{err}"
    );

    // A missing required flag is clap's usage error.
    let o = fpdt(&["prepare", blank.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("--out"));
}

#[test]
fn info_reports_devices_numa_arena_and_nccl() {
    let o = Command::new(env!("CARGO_BIN_EXE_fpdt"))
        .arg("info")
        .env("FPDT_NCCL_LIB", "/nonexistent/libnccl.so.2")
        .output()
        .expect("run");
    let s = text(&o.stdout);
    assert!(o.status.success(), "{s} {}", text(&o.stderr));
    for want in [
        "cpu:",
        "logical cpus",
        "numa:",
        "node 0",
        "the host arena would use node",
        "host arena of 64.0 MiB",
        "nccl:",
        "/nonexistent/libnccl.so.2",
    ] {
        assert!(s.contains(want), "`{want}` missing from:\n{s}");
    }
    assert!(s.contains("pinned") || s.contains("NOT pinned"), "{s}");
    // The GPU line says what the driver sees, or why there is none.
    match fpdt_runtime::cuda::probe() {
        Ok(g) if !g.is_empty() => assert!(s.contains(&format!("cuda0: {}", g[0].name)), "{s}"),
        Ok(_) => assert!(s.contains("sees no GPU"), "{s}"),
        Err(e) => {
            let e = e.to_string();
            let why = e.strip_prefix("cuda: ").unwrap_or(&e);
            assert!(s.contains(&format!("cuda: unavailable: {why}")), "{s}")
        }
    }
}
