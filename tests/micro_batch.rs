//! `training.micro_batch_size` changes memory, never the run: with dropout off,
//! a batch split into micro-batches gives the losses and weights of the whole
//! batch, and a checkpoint resumes under another micro-batch size (as `"auto"`
//! may choose on another GPU) with the uninterrupted run's losses.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::*;

/// The tiny job without dropout, a checkpoint every 4 steps.
fn job(dir: &Path) -> PathBuf {
    let cfg = write_job(dir, "[checkpoint]\nevery_steps = 4\nkeep_last = 2\n");
    let model = dir.join("tiny-bert.json");
    let text = std::fs::read_to_string(&model).unwrap().replace("_dropout_prob\": 0.1", "_dropout_prob\": 0.0");
    std::fs::write(&model, text).unwrap();
    cfg
}

/// `mlm train` for 8 steps of 8 sequences, every loss logged, plus `extra`.
fn train(cfg: &Path, extra: &[&str]) -> Output {
    let base = ["training.max_steps=8", "training.batch_size=8", "training.log_every=1", "eval.at_start=false"];
    let sets: Vec<&str> = base.iter().flat_map(|s| ["--set", s]).collect();
    let out = run(mlm().arg("train").arg(cfg).args(sets).args(extra));
    assert!(out.status.success());
    out
}

fn assert_same_losses(want: &BTreeMap<u64, f64>, got: &BTreeMap<u64, f64>) {
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>());
    for (step, w) in want {
        let g = got[step];
        assert!((g - w).abs() / w.abs() < 1e-5, "step {step}: loss {g} vs {w} without micro-batches");
    }
}

/// Per-step training losses and final weights by name.
type Run = (BTreeMap<u64, f64>, Vec<(String, Vec<f32>)>);

/// The losses and final weights of the whole-batch run.
fn reference() -> Run {
    let dir = tempfile::tempdir().unwrap();
    train(&job(dir.path()), &[]);
    let out = dir.path().join("out");
    let want = losses(&out);
    assert_eq!(want.len(), 8);
    (want, weights(&out.join("checkpoint-8")))
}

#[test]
fn micro_batches_give_the_losses_of_the_whole_batch() {
    let (want, want_w) = reference();
    for rows in ["2", "4"] {
        let dir = tempfile::tempdir().unwrap();
        train(&job(dir.path()), &["--set", &format!("training.micro_batch_size={rows}")]);
        let out = dir.path().join("out");
        assert_same_losses(&want, &losses(&out));
        let worst = worst_relative_difference(&want_w, &weights(&out.join("checkpoint-8")));
        assert!(worst.0 < 1e-5, "micro-batches of {rows}: largest relative difference {} in {}", worst.0, worst.1);
    }
}

#[test]
fn resume_under_another_micro_batch_size_continues_the_same_losses() {
    let (want, want_w) = reference();
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path());
    let out = dir.path().join("out");
    train(&cfg, &["--set", "training.micro_batch_size=2"]);
    // Back to step 4 under "auto" (on the CPU: the whole batch): not a changed config.
    let resumed = train(
        &cfg,
        &[
            "--resume",
            out.join("checkpoint-4").to_str().unwrap(),
            "--set",
            "checkpoint.overwrite_output_dir=true",
            "--set",
            "training.micro_batch_size=auto",
        ],
    );
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(stderr.contains("resuming from") && !stderr.contains("changed config"), "{stderr}");
    assert!(stderr.contains("training.micro_batch_size = \"auto\" on the CPU: the whole batch of 8"), "{stderr}");
    let records = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let trained = records.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"] == "train");
    // Each step once: the resume dropped the first run's records of steps 5-8,
    // which it redid.
    assert_eq!(trained.filter(|t| *t).count(), 8, "one record per step");
    // Steps 1-4 from the micro-batches of 2, steps 5-8 from the resumed run.
    assert_same_losses(&want, &losses(&out));
    let worst = worst_relative_difference(&want_w, &weights(&out.join("checkpoint-8")));
    assert!(worst.0 < 1e-5, "largest relative difference {} in {}", worst.0, worst.1);
}
