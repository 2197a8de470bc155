//! `fpdt train` and `fpdt plan`: each bad input is one line naming the
//! thing and what to do, with a non-zero exit, and good input gets past
//! the checks into training.

use std::path::Path;
use std::process::{Command, Output};

use fpdt_model::checkpoint::{self, config_fields, tensors_from_flat, TrainState};
use fpdt_model::ModelConfig;

mod common;
use common::TempDir;

fn fpdt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fpdt"))
        .args(args)
        .output()
        .expect("run fpdt")
}

/// Runs `args`, expects exit `code` and a one-line stderr containing all of `want`.
fn fails(args: &[&str], code: i32, want: &[&str]) -> String {
    let o = fpdt(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
    if code == 1 {
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.starts_with("error: "), "{err}");
    }
    for w in want {
        assert!(err.contains(w), "{args:?}: `{w}` missing from {err}");
    }
    err
}

fn write_u16(p: &Path, toks: impl IntoIterator<Item = u16>) {
    let b: Vec<u8> = toks.into_iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(p, b).expect("write");
}

#[test]
fn bad_token_files() {
    let d = TempDir::new("data");
    let out = d.s("run");
    let base = ["train", "--seq-len", "64", "--out", &out];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |extra: &[&str], want: &[&str]| {
        let a = with(extra);
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        fails(&a, 1, want);
    };
    run(
        &["--data", &d.s("missing.bin")],
        &["missing.bin", "not found", "fpdt prepare"],
    );
    std::fs::write(d.0.join("odd.bin"), [1u8, 2, 3]).expect("write");
    run(&["--data", &d.s("odd.bin")], &["odd.bin", "truncated"]);
    std::fs::write(d.0.join("empty.bin"), []).expect("write");
    run(&["--data", &d.s("empty.bin")], &["empty.bin", "empty"]);
    // tiny-llama's vocabulary is 96.
    write_u16(
        &d.0.join("big.bin"),
        (0..500).map(|i| if i == 300 { 96 } else { i % 90 }),
    );
    run(
        &["--data", &d.s("big.bin")],
        &[
            "big.bin",
            "token id 96",
            "token 300",
            "byte offset 600",
            "vocabulary of 96",
        ],
    );
    write_u16(&d.0.join("small.bin"), (0..40).map(|i| i % 90));
    run(
        &["--data", &d.s("small.bin")],
        &["small.bin", "--seq-len 64"],
    );
    // Good data trains.
    write_u16(&d.0.join("ok.bin"), (0..5000).map(|i| (i % 90) as u16));
    let a = with(&[
        "--data",
        &d.s("ok.bin"),
        "--steps",
        "1",
        "--warmup",
        "0",
        "--eval-batches",
        "1",
        "--no-progress",
    ]);
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let o = fpdt(&a);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let so = String::from_utf8_lossy(&o.stdout);
    assert!(so.contains("5000 tokens"), "{so}");
}

#[test]
fn bad_flags_name_the_flag() {
    let d = TempDir::new("flags");
    let out = d.s("run");
    let t = |extra: &[&str], want: &[&str]| {
        let mut a = vec!["train", "--out", out.as_str()];
        a.extend_from_slice(extra);
        fails(&a, 1, want);
    };
    t(&["--ranks", "0"], &["--ranks"]);
    t(&["--ranks", "3"], &["--chunk", "--ranks 3"]);
    t(
        &["--seq-len", "1000", "--chunk", "300"],
        &["--chunk", "300", "divide"],
    );
    t(&["--steps", "0"], &["--steps"]);
    t(&["--lr=-1"], &["--lr"]);
    t(&["--lr", "0"], &["--lr", "positive"]);
    t(&["--lr", "1e-3", "--min-lr", "1e-2"], &["--min-lr"]);
    t(&["--steps", "10", "--warmup", "20"], &["--warmup"]);
    t(&["--clip", "NaN"], &["--clip"]);
    t(&["--grad-accum", "0"], &["--grad-accum"]);
    t(&["--beta2", "1"], &["--beta2"]);
    // Without a GPU, --device cuda says what is missing (with one it runs).
    if fpdt_runtime::cuda::probe().is_err() {
        t(&["--device", "cuda"], &["--device", "cuda", "--device cpu"]);
    }
    t(
        &["--model", "no-such-model"],
        &["--model", "unknown preset"],
    );
    t(
        &["--model", &d.s("nope.json")],
        &["--model", "nope.json", "not found"],
    );
    t(&["--seq-len", "8"], &["--seq-len", "passkey"]);
    t(&["--val-data", &d.s("v.bin")], &["--val-data", "--data"]);
    t(
        &["--passkey-answers", "0"],
        &["--passkey-answers", "at least 1"],
    );
    // The sequence-length warmup.
    t(&["--seq-stages", "64"], &["--seq-stages", "S:STEPS"]);
    t(&["--seq-stages", "64:x"], &["--seq-stages", "step count"]);
    t(
        &["--seq-stages", "sixty:10"],
        &["--seq-stages", "sequence length"],
    );
    t(&["--seq-stages", "64:0"], &["--seq-stages", "0 steps"]);
    t(
        &["--seq-stages", "2048:10"],
        &["--seq-stages", "shorter than --seq-len 2048"],
    );
    t(
        &["--seq-stages", "60:10"],
        &["--seq-stages", "multiple of 8"],
    );
    // 4-digit keys answered 8 times need 48 tokens.
    t(&["--seq-stages", "40:10"], &["--seq-stages", "at least 48"]);
    t(
        &["--steps", "100", "--seq-stages", "64:60,256:40"],
        &["--seq-stages", "100 steps", "leaving none"],
    );
    // Heads (4 in tiny-llama) not divisible by P.
    t(
        &["--ranks", "8", "--seq-len", "2048"],
        &["--ranks", "heads (4)"],
    );
    fails(
        &["plan", "--gpus", "3", "--seq-len", "3072"],
        1,
        &["--gpus", "heads (32)"],
    );
    // clap's own checks: exit 2, the flag named.
    fails(&["train", "--steps", "many"], 2, &["--steps"]);
    fails(&["train", "--offload", "maybe"], 2, &["--offload"]);
    fails(&["train", "--lr-schedule", "step"], 2, &["--lr-schedule"]);
    fails(&["train", "--token-width", "u8"], 2, &["--token-width"]);
    fails(&["train", "--host-memory", "lots"], 2, &["--host-memory"]);
    fails(&["plan", "--gpus", "0"], 1, &["--gpus"]);
    fails(
        &["plan", "--seq-len", "1000", "--chunk", "300"],
        1,
        &["--chunk"],
    );
    fails(&["plan", "--pcie-gbps", "0"], 1, &["--pcie-gbps"]);
}

#[test]
fn unwritable_out_and_a_checkpoint_from_another_config() {
    let d = TempDir::new("ckpt");
    fails(
        &["train", "--out", "/proc/fpdt-run"],
        1,
        &["/proc/fpdt-run", "not writable", "--out"],
    );
    // A checkpoint written for tiny-gpt, resumed as tiny-llama.
    let gpt = ModelConfig::preset("tiny-gpt").expect("preset");
    let layout = gpt.layout();
    let w = vec![0.5f32; layout.len()];
    let tensors = tensors_from_flat(&layout, &w, "").expect("tensors");
    let run = d.0.join("old");
    checkpoint::save(
        &run,
        &TrainState::new(7, config_fields(&gpt)),
        &tensors,
        &[],
        1,
    )
    .expect("save");
    let out = d.s("new");
    let run_s = run.to_string_lossy().into_owned();
    let err = fails(
        &["train", "--out", &out, "--resume", &run_s],
        1,
        &["from another config", "old", "resume with the same model"],
    );
    assert!(err.contains(" = "), "names a field: {err}");
    fails(
        &["train", "--out", &out, "--resume", &d.s("none")],
        1,
        &["none", "not found", "--resume"],
    );
    // The matching config passes the check; a checkpoint without
    // optimizer state is refused by name when training resumes.
    let o = fpdt(&[
        "train",
        "--model",
        "tiny-gpt",
        "--out",
        &out,
        "--resume",
        &run_s,
        "--steps",
        "8",
        "--warmup",
        "1",
        "--no-progress",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("old"), "{err}");
}

/// Under a launcher: a world of one trains as usual; a larger world is
/// refused in one line naming the variables and what to run instead (not
/// every process training its own copy into one --out); a broken launcher
/// environment names the missing variable.
#[test]
fn launcher_environments() {
    let d = TempDir::new("launcher");
    let run = |env: &[(&str, &str)], out: &str| -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fpdt"));
        for v in [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "SLURM_PROCID",
            "SLURM_NTASKS",
        ] {
            c.env_remove(v);
        }
        c.args([
            "train",
            "--device",
            "cpu",
            "--no-progress",
            "--seq-len",
            "64",
            "--chunk",
            "16",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--eval-batches",
            "1",
            "--out",
        ])
        .arg(d.s(out))
        .envs(env.iter().copied())
        .output()
        .expect("run fpdt")
    };
    let refused = |env: &[(&str, &str)], want: &[&str]| {
        let o = run(env, "refused");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{env:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{env:?}: one line: {err}");
        for w in want {
            assert!(err.contains(w), "{env:?}: `{w}` missing from {err}");
        }
        assert!(!d.0.join("refused").exists(), "{env:?}: wrote its --out");
    };
    refused(
        &[("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")],
        &["RANK=1", "WORLD_SIZE=4", "--ranks 4"],
    );
    refused(
        &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")],
        &["SLURM_PROCID=0", "SLURM_NTASKS=2", "--ranks 2"],
    );
    refused(&[("RANK", "0")], &["WORLD_SIZE", "torchrun"]);
    refused(&[("RANK", "zero"), ("WORLD_SIZE", "1")], &["RANK", "zero"]);
    let o = run(&[("RANK", "0"), ("WORLD_SIZE", "1")], "single");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("done: 2 steps"));
}
