//! Issue #9, end to end: tokens/s and MFU of `fpdt train` on the cpu device
//! for the tiny preset, beside a PyTorch implementation of the same model
//! and step (`benches/e2e_torch.py`) run on the same machine in the same
//! run. Skipped with a message where python3 or torch is absent.
//!
//! Ours runs twice: the default FPDT schedule (P = 2 in-process ranks, 4
//! chunks, offload and checkpointing on) and the plain one (P = 1, one
//! chunk, nothing offloaded, no recompute), which does the same work as
//! PyTorch's step. Medians over the timed steps (the first steps, which
//! include warm-up and the traced step, are dropped). `FPDT_E2E_BIN` and
//! `FPDT_E2E_SCRIPT` point it at a prebuilt fpdt and the script elsewhere
//! (scripts/gpu-check.sh runs it on the GPU machine's CPUs, where PyTorch
//! is installed).

#[path = "../../benches/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;

const SEQ: usize = 2048;
const STEPS: usize = 24;
const DROP: usize = 4;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// The fpdt binary: `FPDT_E2E_BIN` (a prebuilt copy on another machine,
/// as scripts/gpu-check.sh runs this bench), else the one cargo built.
fn fpdt_bin() -> std::path::PathBuf {
    std::env::var_os("FPDT_E2E_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_fpdt").into())
}

/// Runs `fpdt train` with `extra`; (median tokens/s, median MFU).
fn ours(out: &Path, extra: &[&str]) -> Result<(f64, f64), String> {
    let steps = STEPS.to_string();
    let seq = SEQ.to_string();
    let o = Command::new(fpdt_bin())
        .args([
            "train",
            "--device",
            "cpu",
            "--no-progress",
            "--seq-len",
            &seq,
            "--steps",
            &steps,
        ])
        // At S throughout (the default's sequence-length warmup would time
        // mostly 64-token steps).
        .args(["--seq-stages", "none", "--warmup", "1", "--eval-every", "0"])
        .args(["--ckpt-every", "1000"])
        .args(["--trace-step", "0", "--log-every", "0", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .map_err(|e| format!("running fpdt: {e}"))?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))
        .map_err(|e| format!("metrics of {}: {e}", out.display()))?;
    let (mut tps, mut mfu) = (Vec::new(), Vec::new());
    for line in text.lines().skip(DROP) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("metrics line: {e}"))?;
        let get = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(f64::NAN);
        tps.push(get("tokens_per_s"));
        mfu.push(get("mfu"));
    }
    Ok((median(tps), median(mfu)))
}

/// Runs the PyTorch twin; its tokens/s and a description, or why not.
fn torch() -> Result<(f64, String), String> {
    let script = match std::env::var_os("FPDT_E2E_SCRIPT") {
        Some(p) => std::path::PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/e2e_torch.py"),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let o = Command::new("python3")
        .arg(&script)
        .args(["--seq-len", &SEQ.to_string()])
        .args(["--steps", &(STEPS - DROP).to_string()])
        .args(["--threads", &threads.to_string()])
        .output()
        .map_err(|e| format!("python3 not found ({e})"))?;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        if err.contains("No module named 'torch'") {
            return Err("PyTorch is not installed (pip install torch)".into());
        }
        return Err(format!("{}: {}", script.display(), err.trim()));
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .map_err(|e| format!("{}: not one JSON line: {e}", script.display()))?;
    let tps = v
        .get("tokens_per_s")
        .and_then(|x| x.as_f64())
        .ok_or("no tokens_per_s")?;
    Ok((
        tps,
        format!(
            "torch {} on {} threads, {} parameters",
            v.get("torch").and_then(|x| x.as_str()).unwrap_or("?"),
            v.get("threads").and_then(|x| x.as_u64()).unwrap_or(0),
            v.get("params").and_then(|x| x.as_u64()).unwrap_or(0)
        ),
    ))
}

fn main() {
    let dir = std::env::temp_dir().join(format!("fpdt-e2e-{}", std::process::id()));
    let mut rows = Vec::new();
    let mut plain_tps = f64::NAN;
    for (name, extra) in [
        ("fpdt, FPDT (P=2, u=4, offload, ckpt)", &[][..]),
        (
            "fpdt, plain (P=1, u=1, resident, no ckpt)",
            &[
                "--ranks",
                "1",
                "--chunk",
                "2048",
                "--offload",
                "off",
                "--checkpointing",
                "off",
            ][..],
        ),
    ] {
        let out = dir.join(rows.len().to_string());
        match ours(&out, extra) {
            Ok((tps, mfu)) => {
                if !extra.is_empty() {
                    plain_tps = tps;
                }
                rows.push((name.to_string(), tps, format!("{:.1}%", 100.0 * mfu)));
            }
            Err(e) => println!("{name}: failed: {e}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let torch = torch();
    let ref_tps = match &torch {
        Ok((t, what)) => {
            rows.push((format!("PyTorch ({what})"), *t, "-".into()));
            *t
        }
        Err(why) => {
            println!("PyTorch comparison skipped: {why}");
            f64::NAN
        }
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(n, t, m)| {
            vec![
                n.clone(),
                format!("{t:.0}"),
                m.clone(),
                if ref_tps.is_finite() {
                    format!("{:.2}x", t / ref_tps)
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    support::print_table(
        &format!(
            "tiny-llama training step, S = {SEQ}, one sequence per step (medians of {} steps)",
            STEPS - DROP
        ),
        &["run", "tokens/s", "MFU", "vs PyTorch"],
        &table,
    );
    if plain_tps.is_finite() {
        if let Some((_, fpdt_tps, _)) = rows.first() {
            println!(
                "FPDT schedule / plain: {:.2}x (the price of chunking, offload and recompute on this CPU)",
                fpdt_tps / plain_tps
            );
        }
    }
}
