//! Checkpoints: round trip, config checks, and crashes during a save (a
//! failure injected at each stage, and a child process killed mid-save)
//! leaving the previous checkpoint loadable.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fpdt_model::checkpoint::{
    self, config_fields, flat_from_tensors, tensors_from_flat, SaveStage, Tensor, TrainState,
    LATEST_FILE, MODEL_FILE,
};
use fpdt_model::data::DataPosition;
use fpdt_model::{ModelConfig, ModelError};

mod common;
use common::TempDir;

fn cfg() -> ModelConfig {
    ModelConfig::preset("tiny-llama").expect("preset")
}

/// A checkpoint whose every value is `step` (plus the element index in
/// the weights), so a torn mix of two saves would show.
fn contents(step: u64) -> (TrainState, Vec<Tensor>, Vec<Tensor>) {
    let c = cfg();
    let layout = c.layout();
    let w: Vec<f32> = (0..layout.len())
        .map(|i| step as f32 + i as f32 * 1e-3)
        .collect();
    let m = vec![step as f32 * 0.5; layout.len()];
    let mut opt = tensors_from_flat(&layout, &w, "master.").expect("master");
    opt.extend(tensors_from_flat(&layout, &m, "exp_avg.").expect("m"));
    let mut st = TrainState::new(step, config_fields(&c));
    st.tokens_seen = step * 1000;
    st.data = Some(DataPosition {
        seed: 1,
        seq_len: 64,
        tokens: 5000,
        epoch: step / 3,
        cursor: step % 3,
        epoch_rng: 0xDEAD_BEEF ^ step,
    });
    st.rng.insert("passkey".into(), 77 + step);
    (
        st,
        tensors_from_flat(&layout, &w, "").expect("weights"),
        opt,
    )
}

fn assert_is_step(dir: &Path, step: u64) {
    let c = cfg();
    let ck = checkpoint::load(dir, &config_fields(&c)).expect("load");
    let (st, w, opt) = contents(step);
    assert_eq!(ck.state, st);
    let layout = c.layout();
    assert_eq!(
        flat_from_tensors(&layout, &ck.weights, "", "weights").expect("flat"),
        flat_from_tensors(&layout, &w, "", "weights").expect("flat")
    );
    let mut want = opt;
    want.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(ck.optimizer, want);
}

#[test]
fn round_trip_keep_and_damage() {
    let d = TempDir::new("rt");
    for step in [10, 20, 30] {
        let (st, w, o) = contents(step);
        let dir = checkpoint::save(&d.0, &st, &w, &o, 2).expect("save");
        assert!(dir.ends_with(checkpoint::step_dir_name(step)));
        assert_is_step(&d.0, step);
    }
    // The run directory resolves to the latest; a step directory to itself.
    assert_is_step(&d.0.join("step-00000020"), 20);
    assert!(
        !d.0.join("step-00000010").exists(),
        "pruned to the newest 2"
    );
    let names: Vec<String> = std::fs::read_dir(&d.0)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.starts_with(".tmp")), "{names:?}");

    // Saving the same step again keeps the old one until pruned.
    let (st, w, o) = contents(30);
    let again = checkpoint::save(&d.0, &st, &w, &o, 2).expect("save");
    assert!(again.ends_with("step-00000030-1"));
    assert_is_step(&d.0, 30);

    // A damaged weights file is a one-line error naming it.
    let f = again.join(MODEL_FILE);
    let bytes = std::fs::read(&f).expect("read");
    std::fs::write(&f, &bytes[..bytes.len() / 2]).expect("truncate");
    let e = checkpoint::load(&d.0, &config_fields(&cfg()))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains(MODEL_FILE) && e.contains("damaged"), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn a_checkpoint_from_another_config_names_the_field() {
    let d = TempDir::new("cfg");
    let (st, w, o) = contents(5);
    checkpoint::save(&d.0, &st, &w, &o, 2).expect("save");
    let mut other = cfg();
    other.hidden = 64;
    let e = checkpoint::load(&d.0, &config_fields(&other))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("from another config") && e.contains("hidden = 32 there, 64 in this run"),
        "{e}"
    );
    // Weights of another layout: the missing tensor is named.
    let e = flat_from_tensors(&other.layout(), &w, "", "model.safetensors")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("shape") || e.contains("missing"), "{e}");
    // No checkpoint at all.
    let empty = TempDir::new("none");
    let e = checkpoint::load(&empty.0, &config_fields(&cfg()))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("holds no checkpoint"), "{e}");
}

#[test]
fn a_failure_at_any_stage_leaves_the_previous_checkpoint() {
    let stages = [
        SaveStage::ModelWritten,
        SaveStage::FilesSynced,
        SaveStage::Renamed,
        SaveStage::PointerSynced,
    ];
    for (i, stop) in stages.into_iter().enumerate() {
        let d = TempDir::new(&format!("fail{i}"));
        let (st, w, o) = contents(1);
        checkpoint::save(&d.0, &st, &w, &o, 2).expect("first save");
        let (st2, w2, o2) = contents(2);
        let r = checkpoint::save_with_hook(&d.0, &st2, &w2, &o2, 2, &mut |s| {
            if s == stop {
                Err(ModelError::Checkpoint(format!("injected failure at {s:?}")))
            } else {
                Ok(())
            }
        });
        assert!(r.is_err(), "{stop:?}");
        assert_is_step(&d.0, 1);
        // The next save succeeds and clears the leftovers.
        let (st3, w3, o3) = contents(3);
        checkpoint::save(&d.0, &st3, &w3, &o3, 2).expect("third save");
        assert_is_step(&d.0, 3);
        let leftovers: Vec<String> = std::fs::read_dir(&d.0)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{stop:?}: {leftovers:?}");
    }
}

const CHILD_DIR: &str = "FPDT_CKPT_CHILD_DIR";
const CHILD_STAGE: &str = "FPDT_CKPT_CHILD_STAGE";

/// Run by the test below as a child process: saves step 1, then starts
/// saving step 2 and stops dead (sleeps) at the named stage, for the parent
/// to kill. Without the environment variables it checks nothing and
/// returns.
#[test]
fn child_writer() {
    let (Ok(dir), Ok(stage)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_STAGE)) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let (st, w, o) = contents(1);
    checkpoint::save(&dir, &st, &w, &o, 2).expect("first save");
    let (st2, w2, o2) = contents(2);
    let _ = checkpoint::save_with_hook(&dir, &st2, &w2, &o2, 2, &mut |s| {
        if format!("{s:?}") == stage {
            println!("PAUSED {s:?}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            std::thread::sleep(std::time::Duration::from_secs(120));
        }
        Ok(())
    });
}

#[test]
fn killing_the_writer_mid_save_leaves_the_previous_checkpoint_loadable() {
    let exe = std::env::current_exe().expect("test binary");
    for stage in [
        "ModelWritten",
        "FilesSynced",
        "Renamed",
        "PointerSynced",
        "Done",
    ] {
        let d = TempDir::new(&format!("kill-{stage}"));
        let mut child = Command::new(&exe)
            .args(["child_writer", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, &d.0)
            .env(CHILD_STAGE, stage)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let out = child.stdout.take().expect("stdout");
        let mut paused = false;
        for line in BufReader::new(out).lines() {
            let line = line.expect("line");
            if line.contains("PAUSED") {
                paused = true;
                break;
            }
        }
        assert!(paused, "the child reached {stage}");
        child.kill().expect("kill");
        let _ = child.wait();
        // Until the pointer is renamed, the previous checkpoint; after, the new.
        let expect = if stage == "Done" { 2 } else { 1 };
        assert_is_step(&d.0, expect);
        let latest = std::fs::read_to_string(d.0.join(LATEST_FILE)).expect("latest");
        assert_eq!(latest.trim(), checkpoint::step_dir_name(expect));
        let mut f: BTreeMap<String, String> = config_fields(&cfg());
        f.insert("layers".into(), "3".into());
        assert!(checkpoint::load(&d.0, &f).is_err());
    }
}
