//! Logs that tell the truth: a resumed run says where it resumed and compares
//! against the run's first evaluation, its metrics keep each step once (a
//! crashed attempt's redone steps are dropped), and a fresh MLM head's
//! "before" perplexity is labelled as such.
use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;

fn records(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (kind, step) -> how many records.
fn counts(out: &Path) -> BTreeMap<(String, u64), usize> {
    let mut m = BTreeMap::new();
    for r in records(out) {
        *m.entry((r["kind"].as_str().unwrap().to_string(), r["step"].as_u64().unwrap())).or_insert(0) += 1;
    }
    m
}

#[test]
fn a_resumed_run_says_where_it_resumed_and_records_each_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let sets = [
        "--set",
        "training.max_steps=8",
        "--set",
        "training.log_every=1",
        "--set",
        "checkpoint.every_steps=4",
        "--set",
        "eval.every_steps=4",
        "--set",
        "checkpoint.keep_last=3",
    ];
    let out = run(mlm().arg("train").arg(&cfg).args(sets));
    assert!(out.status.success());
    let o = dir.path().join("out");
    let whole = counts(&o);
    // A crash after step 8 was logged but before its checkpoint was complete:
    // the newest checkpoint is step 4, and metrics.jsonl holds steps 5..8.
    std::fs::remove_dir_all(o.join("checkpoint-8")).unwrap();
    let out = run(mlm().arg("train").arg(&cfg).args(sets).args(["--resume", "auto"]));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stderr.contains("resumed at step 4 (held-out perplexity "), "{stderr}");
    assert!(stderr.contains("dropped 5 record(s) after step 4"), "{stderr}");
    assert!(stderr.contains(" before training, ") && stderr.contains(" after step 8 ("), "{stderr}");
    assert!(!stderr.contains("held-out perplexity before training: "), "a resume is not 'before training': {stderr}");
    assert!(stdout.contains("perplexity at step 0 (the run's first evaluation): "), "{stdout}");
    assert!(stdout.contains("perplexity at step 4 (resumed): "), "{stdout}");
    // Each step once, as in the uninterrupted run.
    assert_eq!(counts(&o), whole);
    assert!(whole.values().all(|&n| n == 1), "{whole:?}");
}

#[test]
fn a_fresh_mlm_head_is_named_beside_the_before_perplexity() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let model_line = text.lines().find(|l| l.starts_with("config = ")).unwrap().to_string();
    std::fs::write(&cfg, text.replace(&model_line, &format!("path = {:?}", minilm_dir()))).unwrap();
    let out = run(mlm().arg("train").arg(&cfg).args(["--set", "training.max_steps=2", "--set", "eval.max_chunks=8"]));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("(a fresh MLM head: this measures a random head)"), "{stderr}");
    assert!(stderr.contains("the first model had a fresh MLM head"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("perplexity before: "), "no summary");
}

#[test]
fn the_held_out_set_is_capped_and_the_last_step_is_saved_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let out = run(mlm().arg("train").arg(&cfg).args([
        "--set",
        "data.test_fraction=0.5",
        "--set",
        "data.test_size=3",
        "--set",
        "eval.max_chunks=0",
        "--set",
        "training.max_steps=4",
        "--set",
        "checkpoint.every_steps=2",
        "--set",
        "eval.every_steps=2",
    ]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let o = dir.path().join("out");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o.join("data/manifest.json")).unwrap()).unwrap();
    // Half the blocks would be test blocks; the cap keeps three and trains on the rest.
    assert_eq!(manifest["test_chunks"], 3, "{manifest}");
    assert!(manifest["train_chunks"].as_u64().unwrap() > 100, "{manifest}");
    let evaluations: Vec<&str> = stderr.lines().filter(|l| l.contains("evaluated ")).collect();
    // Before training, at step 2 and at the end (step 4).
    assert_eq!(evaluations.len(), 3, "{stderr}");
    assert!(evaluations.iter().all(|l| l.contains("evaluated 3 held-out blocks")), "{evaluations:?}");
    let saves = |step: &str| stderr.lines().filter(|l| l.contains("saved ") && l.ends_with(step)).count();
    assert_eq!(saves("checkpoint-2"), 1, "{stderr}");
    assert_eq!(saves("checkpoint-4"), 1, "the last step is saved once: {stderr}");
    assert_eq!(counts(&o).get(&("eval".to_string(), 4)), Some(&1), "{:?}", counts(&o));
}
