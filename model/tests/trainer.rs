//! `fpdt train` end to end, through the binary: a resumed run continues
//! bit-for-bit, every step writes a metrics line, the loss curve and the
//! trace are written, non-finite steps are skipped and too many in a row
//! stop the run with the last good checkpoint intact, token files train,
//! and Hugging Face weights go out and come back in.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use fpdt_model::checkpoint::{self, config_fields, flat_from_tensors};
use fpdt_model::{hf, ModelConfig};
use serde_json::Value;

mod common;
use common::TempDir;

/// A short run of tiny-llama on the passkey task: S = 64 over P = 2 ranks
/// in 4 chunks, offload and checkpointing on (the default schedule).
const SMALL: &[&str] = &[
    "train",
    // The cpu device even where a GPU is found (where `auto` adds a note
    // on stderr, which some tests count lines of).
    "--device",
    "cpu",
    "--no-progress",
    "--seq-len",
    "64",
    "--chunk",
    "16",
    "--warmup",
    "1",
    "--eval-batches",
    "2",
    "--log-every",
    "1",
];

fn fpdt(extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fpdt"))
        .args(SMALL)
        .args(extra)
        .output()
        .expect("run fpdt")
}

fn ok(extra: &[&str]) -> String {
    let o = fpdt(extra);
    assert!(
        o.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn metrics(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("metrics file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn f(v: &Value, key: &str) -> f64 {
    v.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("`{key}` in {v}"))
}

/// The metrics lines `a` and `b` agree bit for bit in `keys`.
fn same_bits(a: &[Value], b: &[&Value], keys: &[&str]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        for &key in keys {
            assert_eq!(
                f(x, key).to_bits(),
                f(y, key).to_bits(),
                "{key} at step {}",
                f(x, "step")
            );
        }
    }
}

fn master_weights(dir: &Path) -> Vec<f32> {
    let cfg = ModelConfig::preset("tiny-llama").expect("preset");
    let ck = checkpoint::load(dir, &config_fields(&cfg)).expect("checkpoint loads");
    flat_from_tensors(&cfg.layout(), &ck.weights, "", "weights").expect("weights")
}

#[test]
fn a_resumed_run_continues_bit_for_bit() {
    let d = TempDir::new("resume");
    let (a, b) = (d.s("a"), d.s("b"));
    ok(&["--steps", "6", "--ckpt-every", "3", "--out", &a]);
    let half = d.0.join("a/step-00000003");
    assert!(half.is_dir(), "a checkpoint at step 3");
    let out = ok(&[
        "--steps",
        "6",
        "--ckpt-every",
        "3",
        "--out",
        &b,
        "--resume",
        &half.to_string_lossy(),
    ]);
    assert!(
        out.contains("resumed from") && out.contains("step 3"),
        "{out}"
    );
    let ma = metrics(&d.0.join("a/metrics.jsonl"));
    let mb = metrics(&d.0.join("b/metrics.jsonl"));
    assert_eq!(ma.len(), 6);
    let after: Vec<&Value> = mb.iter().filter(|v| f(v, "step") > 3.0).collect();
    assert_eq!(after.len(), 3, "steps 4..=6 in the resumed run: {mb:?}");
    same_bits(
        &ma[3..],
        &after,
        &["step", "loss", "grad_norm", "lr", "accuracy", "tokens"],
    );
    let wa = master_weights(&d.0.join("a/step-00000006"));
    let wb = master_weights(&d.0.join("b/step-00000006"));
    assert_eq!(wa.len(), wb.len());
    assert!(
        wa.iter().zip(&wb).all(|(x, y)| x.to_bits() == y.to_bits()),
        "final weights equal bit for bit"
    );
    // And the run really trained: the weights moved from step 3.
    let w3 = master_weights(&half);
    assert!(w3.iter().zip(&wa).any(|(x, y)| x != y));
}

#[test]
fn the_sequence_length_warmup_switches_and_resumes_bit_for_bit() {
    let d = TempDir::new("stages");
    let (a, b) = (d.s("a"), d.s("b"));
    // S = 128 in 8 chunks of 16; the first 4 steps at 64 tokens.
    let run = |out: &str, extra: &[&str]| {
        let mut args: Vec<&str> = SMALL
            .iter()
            .map(|&a| if a == "64" { "128" } else { a })
            .collect();
        args.extend_from_slice(&[
            "--seq-stages",
            "64:4",
            "--steps",
            "7",
            "--keep",
            "5",
            "--ckpt-every",
            "3",
            "--eval-every",
            "0",
            "--out",
            out,
        ]);
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_fpdt"))
            .args(&args)
            .output()
            .expect("run fpdt");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let so = run(&a, &[]);
    assert!(
        so.contains("sequence-length warmup: S = 64 for steps 1-4, then S = 128"),
        "{so}"
    );
    assert!(so.contains("-- S = 64 tokens from step 1"), "{so}");
    assert!(so.contains("-- S = 128 tokens from step 5"), "{so}");
    let ma = metrics(&d.0.join("a/metrics.jsonl"));
    assert_eq!(ma.len(), 7);
    let mut tokens = 0.0;
    for v in &ma {
        let want = if f(v, "step") <= 4.0 { 64.0 } else { 128.0 };
        assert_eq!(f(v, "seq_len"), want, "{v}");
        tokens += want;
        assert_eq!(f(v, "tokens"), tokens, "{v}");
    }
    // Resumed inside the warmup (step 3), the run crosses the boundary as
    // the first did.
    let so = run(
        &b,
        &["--resume", &d.0.join("a/step-00000003").to_string_lossy()],
    );
    assert!(so.contains("-- S = 64 tokens from step 4"), "{so}");
    assert!(so.contains("-- S = 128 tokens from step 5"), "{so}");
    let mb = metrics(&d.0.join("b/metrics.jsonl"));
    let after: Vec<&Value> = mb.iter().filter(|v| f(v, "step") > 3.0).collect();
    assert_eq!(after.len(), 4, "{mb:?}");
    same_bits(
        &ma[3..],
        &after,
        &["step", "seq_len", "loss", "grad_norm", "lr", "tokens"],
    );
    let wa = master_weights(&d.0.join("a/step-00000006"));
    let wb = master_weights(&d.0.join("b/step-00000006"));
    assert!(
        wa.iter().zip(&wb).all(|(x, y)| x.to_bits() == y.to_bits()),
        "weights at step 6 equal bit for bit"
    );
}

#[test]
fn metrics_lines_loss_curve_and_trace_are_written() {
    let d = TempDir::new("outputs");
    let out = d.s("run");
    let so = ok(&["--steps", "5", "--eval-every", "2", "--out", &out]);
    let m = metrics(&d.0.join("run/metrics.jsonl"));
    assert_eq!(m.len(), 5);
    let mut tokens = 0.0;
    for (i, v) in m.iter().enumerate() {
        assert_eq!(f(v, "step") as usize, i + 1);
        assert!(f(v, "loss").is_finite() && f(v, "loss") > 0.0);
        assert!(f(v, "tokens") > tokens, "tokens grow: {v}");
        tokens = f(v, "tokens");
        assert!(f(v, "tokens_per_s") > 0.0 && f(v, "mfu") > 0.0);
        assert!(f(v, "device_peak") > 0.0 && f(v, "host_peak") > 0.0);
        assert_eq!(v.get("skipped"), Some(&Value::Bool(false)));
        let has_eval = !v.get("eval").is_none_or(Value::is_null);
        assert_eq!(has_eval, i + 1 == 2 || i + 1 == 4 || i + 1 == 5, "{v}");
    }
    assert_eq!(tokens, 5.0 * 64.0);
    let png = std::fs::read(d.0.join("run/loss.png")).expect("loss.png");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000);
    let trace: Value = serde_json::from_str(
        &std::fs::read_to_string(d.0.join("run/trace.json")).expect("trace.json"),
    )
    .expect("trace is JSON");
    let events = trace
        .get("traceEvents")
        .and_then(Value::as_array)
        .or_else(|| trace.as_array())
        .expect("trace events");
    assert!(events.len() > 10, "one step records its kernels and copies");
    assert!(so.contains("loss curve:") && so.contains("trace of one step:"));
}

#[test]
fn non_finite_steps_are_skipped_and_too_many_stop_with_the_last_checkpoint() {
    let d = TempDir::new("nan");
    let one = d.s("one");
    let so = ok(&["--steps", "4", "--inject-nan-steps", "2", "--out", &one]);
    assert!(so.contains("1 steps skipped"), "{so}");
    let m = metrics(&d.0.join("one/metrics.jsonl"));
    let skipped: Vec<bool> = m
        .iter()
        .map(|v| v.get("skipped") == Some(&Value::Bool(true)))
        .collect();
    assert_eq!(skipped, [false, true, false, false]);
    // The skipped step consumed no AdamW step: the final checkpoint says 3.
    let cfg = ModelConfig::preset("tiny-llama").expect("preset");
    let ck = checkpoint::load(&d.0.join("one/step-00000004"), &config_fields(&cfg)).expect("ck");
    assert_eq!(
        ck.state.extra.get("adam_steps").and_then(Value::as_u64),
        Some(3)
    );

    let many = d.s("many");
    let o = fpdt(&[
        "--steps",
        "8",
        "--ckpt-every",
        "2",
        "--inject-nan-steps",
        "3,4,5",
        "--max-bad-steps",
        "3",
        "--out",
        &many,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("step 5") && err.contains("--max-bad-steps 3"),
        "{err}"
    );
    assert!(err.contains("step-00000002"), "names the last good: {err}");
    let last = checkpoint::latest(&d.0.join("many"))
        .expect("latest")
        .expect("a checkpoint");
    assert!(last.ends_with("step-00000002"), "{}", last.display());
    let w = master_weights(&last);
    assert!(w.iter().all(|x| x.is_finite()));
}

#[test]
fn token_files_train_and_report_validation() {
    let d = TempDir::new("tokens");
    // A pattern a bigram learns: the next token is the current one plus 7.
    let toks: Vec<u8> = (0..20_000u32)
        .flat_map(|i| (((i * 7) % 90) as u16).to_le_bytes())
        .collect();
    std::fs::write(d.0.join("pat.bin"), toks).expect("write");
    let out = d.s("run");
    let so = ok(&[
        "--data",
        &d.s("pat.bin"),
        "--steps",
        "30",
        "--lr",
        "1e-2",
        "--min-lr",
        "1e-3",
        "--eval-every",
        "10",
        "--out",
        &out,
    ]);
    assert!(
        so.contains("token data") && so.contains("20000 tokens"),
        "{so}"
    );
    let m = metrics(&d.0.join("run/metrics.jsonl"));
    let evals: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|v| v.get("eval").filter(|e| !e.is_null()))
        .map(|e| (f(e, "loss"), f(e, "accuracy")))
        .collect();
    assert_eq!(evals.len(), 3);
    let uniform = (96f64).ln();
    let (first, last) = (f(&m[0], "loss"), evals[2].0);
    assert!((first - uniform).abs() < 0.5, "starts near ln 96: {first}");
    assert!(last < uniform - 1.0, "validation loss fell: {evals:?}");
    assert!(evals[2].1 > 0.5, "most next tokens right: {evals:?}");
}

#[test]
fn hugging_face_weights_go_out_and_come_back() {
    let d = TempDir::new("hf");
    let (run, exported) = (d.s("run"), d.s("hf"));
    ok(&["--steps", "3", "--out", &run, "--export-hf", &exported]);
    let h = hf::load(&d.0.join("hf")).expect("export loads");
    let w = master_weights(&d.0.join("run/step-00000003"));
    assert_eq!(h.params.len(), w.len());
    assert!(h
        .params
        .iter()
        .zip(&w)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    // Continue from it: the first loss of the new run is the exported
    // model's, not a fresh initialisation's.
    let (again, fresh) = (d.s("again"), d.s("fresh"));
    let so = ok(&["--steps", "2", "--out", &again, "--init-from", &exported]);
    assert!(so.contains("weights from"), "{so}");
    ok(&["--steps", "2", "--out", &fresh]);
    let l_again = f(&metrics(&d.0.join("again/metrics.jsonl"))[0], "loss");
    let l_fresh = f(&metrics(&d.0.join("fresh/metrics.jsonl"))[0], "loss");
    assert_ne!(l_again.to_bits(), l_fresh.to_bits());
    let o = fpdt(&[
        "--steps",
        "2",
        "--out",
        &again,
        "--init-from",
        &exported,
        "--resume",
        &d.s("run/step-00000003"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("--init-from") && err.contains("--resume"),
        "{err}"
    );
}

#[test]
fn a_closed_stdout_ends_the_run_quietly() {
    let d = TempDir::new("pipe");
    let out = d.s("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fpdt"))
        .args(SMALL)
        .args(["--steps", "4", "--out", &out])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fpdt");
    // Like `fpdt train | head -0`: the reader goes away at once.
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "no panic report: {err}");
}
