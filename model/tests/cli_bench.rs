//! `fpdt bench overlap` and `fpdt bench memory`, run as the binary at tiny
//! sizes: the tables they print, and the flags they refuse.

use std::process::{Command, Output};

fn fpdt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fpdt"))
        .args(args)
        .output()
        .expect("run fpdt")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The cells of the table's rows after the header and separator lines
/// (lines starting with `|`).
fn table(stdout: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = stdout.lines().filter(|l| l.starts_with('|')).map(|l| {
        l.trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect::<Vec<_>>()
    });
    let header = lines.next().unwrap_or_default();
    let rows = lines.skip(1).collect();
    (header, rows)
}

/// Parses a byte count as `fmt_bytes` writes it (`332 KiB`, `1.86 MiB`).
fn bytes(cell: &str) -> f64 {
    let (num, unit) = cell.split_once(' ').expect("number and unit");
    let v: f64 = num.parse().expect("number");
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => panic!("unit {other}"),
    };
    v * scale
}

#[test]
fn overlap_prints_the_table_with_every_column() {
    let o = fpdt(&[
        "bench", "overlap", "--model", "tiny-gpt", "--chunks", "64", "--reps", "1",
    ]);
    let (stdout, stderr) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{stdout} {stderr}");
    let (header, rows) = table(&stdout);
    assert_eq!(
        header,
        [
            "C (tokens)",
            "S",
            "all resident",
            "offload + prefetch",
            "cost of offload",
            "copies (offload run)",
            "copy time hidden",
            "peak device resident / offload",
        ]
    );
    assert_eq!(rows.len(), 1, "{stdout}");
    let row = &rows[0];
    // u = 4 chunks of 64 tokens.
    assert_eq!(row[0], "64");
    assert_eq!(row[1], "256");
    assert!(row[4].ends_with('%'), "{row:?}");
    // The offload run copied something, and offloading lowered the peak.
    let (copied, _) = row[5].split_once(" in ").expect("copies cell");
    assert!(bytes(copied) > 0.0, "{row:?}");
    let (res, off) = row[7].split_once(" / ").expect("peaks cell");
    assert!(bytes(off) < bytes(res), "{row:?}");
    let hidden: f64 = row[6].trim_end_matches('%').parse().expect("percent");
    assert!((0.0..=100.0).contains(&hidden), "{row:?}");
    // tiny-gpt: 2 layers, hidden 32, 4 heads of 8.
    assert!(
        stdout.contains("2 layers of GPT hidden 32 (head dim 8), P = 1, u = 4 chunks")
            && stdout.contains("median of 1 step each"),
        "{stdout}"
    );
    assert!(stdout.contains("every chunk size ran within the 120 s budget"));
    // Progress went to stderr, not into the table.
    assert!(
        stderr.contains("bench overlap: C = 64 (S = 256)"),
        "{stderr}"
    );
}

#[test]
fn overlap_stops_at_the_budget_and_says_why() {
    // The first size always runs; the next is estimated at (4096/64)^2 times
    // its cost, far past a 1 ms budget.
    let o = fpdt(&[
        "bench",
        "overlap",
        "--model",
        "tiny-gpt",
        "--chunks",
        "64,4096",
        "--reps",
        "1",
        "--budget-secs",
        "0.001",
        "--no-progress",
    ]);
    let (stdout, stderr) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{stdout} {stderr}");
    let (_, rows) = table(&stdout);
    assert_eq!(rows.len(), 1, "{stdout}");
    assert!(stdout.contains("stopped before C = 4096"), "{stdout}");
    assert!(stderr.is_empty(), "--no-progress printed: {stderr}");
}

const TINY_MEMORY: [&str; 13] = [
    "bench",
    "memory",
    "--model",
    "tiny-gpt",
    "--layers",
    "0",
    "--ranks",
    "2",
    "--chunk",
    "64",
    "--seq-lens",
    "128,256,512,1024",
    "--no-progress",
];

#[test]
fn memory_fpdt_peak_grows_slower_than_the_baselines() {
    let o = fpdt(&TINY_MEMORY);
    let stdout = text(&o.stdout);
    assert!(o.status.success(), "{stdout} {}", text(&o.stderr));
    let (header, rows) = table(&stdout);
    assert_eq!(
        header,
        [
            "S",
            "FPDT",
            "FPDT activations",
            "Ulysses",
            "Ulysses activations",
            "ratio"
        ]
    );
    let s: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(s, ["128", "256", "512", "1024"]);
    let fpdt: Vec<f64> = rows.iter().map(|r| bytes(&r[1])).collect();
    let ulysses: Vec<f64> = rows.iter().map(|r| bytes(&r[3])).collect();
    for w in 0..rows.len() - 1 {
        let (df, du) = (fpdt[w + 1] - fpdt[w], ulysses[w + 1] - ulysses[w]);
        assert!(du > 0.0, "the baseline's peak grows with S: {rows:?}");
        assert!(df < du / 4.0, "FPDT grows far slower: {rows:?}");
    }
    // The ratio of activations climbs with S.
    let ratio: Vec<f64> = rows
        .iter()
        .map(|r| r[5].trim_end_matches('x').parse().expect("ratio"))
        .collect();
    assert!(ratio.windows(2).all(|w| w[1] > w[0]), "{ratio:?}");
    assert!(stdout.contains("meta device"), "{stdout}");
}

#[test]
fn memory_on_cpu_measures_what_meta_counts() {
    let mut args = TINY_MEMORY.to_vec();
    args[11] = "128,256";
    let meta = fpdt(&args);
    args.extend(["--device", "cpu"]);
    let cpu = fpdt(&args);
    assert!(meta.status.success() && cpu.status.success());
    let (_, meta_rows) = table(&text(&meta.stdout));
    let (_, cpu_rows) = table(&text(&cpu.stdout));
    assert_eq!(meta_rows.len(), 2);
    assert_eq!(cpu_rows, meta_rows);
    assert!(text(&cpu.stdout).contains("cpu device"));
}

/// Runs a command that must fail on a flag: returns (exit code, stderr).
fn refused(args: &[&str]) -> (i32, String) {
    let o = fpdt(args);
    let stderr = text(&o.stderr);
    assert!(!o.status.success(), "{args:?} ran: {}", text(&o.stdout));
    assert!(
        !text(&o.stdout).contains("| "),
        "{args:?} printed a table anyway"
    );
    (o.status.code().unwrap_or(-1), stderr)
}

#[test]
fn bad_flags_fail_naming_the_flag_the_value_and_the_rule() {
    let cases: [(&[&str], &[&str]); 9] = [
        (&["overlap", "--reps", "0"], &["--reps", "0", "at least 1"]),
        (
            &["overlap", "--budget-secs=-5"],
            &["--budget-secs", "-5", "positive"],
        ),
        (
            &["overlap", "--chunks", "64,0"],
            &["--chunks", "0", "positive"],
        ),
        (
            &["overlap", "--chunks-per-seq", "1"],
            &["--chunks-per-seq", "1", "at least 2"],
        ),
        (
            &["overlap", "--device", "meta"],
            &["--device", "meta", "--device cpu"],
        ),
        (
            &[
                "memory",
                "--model",
                "tiny-gpt",
                "--layers",
                "0",
                "--chunk",
                "64",
                "--seq-lens",
                "100",
            ],
            &["--seq-lens", "100", "multiple of --chunk 64"],
        ),
        (
            &[
                "memory", "--model", "tiny-gpt", "--layers", "0", "--ranks", "3",
            ],
            &["--ranks", "3", "heads (4)"],
        ),
        (
            &["memory", "--model", "tiny-gpt", "--layers", "9"],
            &["--layers", "9", "2 layers"],
        ),
        (
            &["memory", "--device", "cuda"],
            &["--device", "cuda", "--device meta"],
        ),
    ];
    for (args, want) in cases {
        let mut full = vec!["bench"];
        full.extend_from_slice(args);
        let (code, stderr) = refused(&full);
        assert_eq!(code, 1, "{full:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{full:?}: one line: {stderr}");
        for w in want {
            assert!(stderr.contains(w), "{full:?}: {w:?} not in {stderr}");
        }
    }
    // Without a GPU, --device cuda says what is missing (with one it runs).
    if fpdt_runtime::cuda::probe().is_err() {
        let (code, stderr) = refused(&["bench", "overlap", "--device", "cuda"]);
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains("--device") && stderr.contains("--device cpu"),
            "{stderr}"
        );
    }
    let (code, stderr) = refused(&["bench", "overlap", "--precision", "fp8"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--precision") && stderr.contains("fp8"),
        "{stderr}"
    );
    // Values clap cannot parse are refused before anything runs (usage
    // exit code), still naming the flag and the value.
    let (code, stderr) = refused(&["bench", "overlap", "--chunks", "64,abc"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--chunks") && stderr.contains("abc"),
        "{stderr}"
    );
    let (code, stderr) = refused(&["bench", "memory", "--model", "no-such-model"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("--model") && stderr.contains("no-such-model"),
        "{stderr}"
    );
}
