//! Evaluating on files of one's own (`data.eval_files`, as `run_mlm`'s
//! `--validation_file`): the held-out set is those files' blocks, the run's
//! perplexity is taken on them, and two workers report the perplexity of one.
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

const FAQ: &str = "/usr/share/doc/python3.11/html/_sources/faq";

/// The tiny job on the tutorial, evaluated on two FAQ pages (one as JSON lines,
/// one as text: any input format), without dropout, for 2 steps.
fn job(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(format!("{FAQ}/extending.rst.txt")).unwrap();
    let lines: Vec<String> = text
        .split("\n\n")
        .filter(|p| !p.trim().is_empty())
        .map(|p| serde_json::json!({ "text": p }).to_string())
        .collect();
    std::fs::write(dir.join("valid.jsonl"), lines.join("\n")).unwrap();
    std::fs::copy(format!("{FAQ}/gui.rst.txt"), dir.join("valid.txt")).unwrap();
    let cfg = write_job(dir, "");
    without_dropout(dir);
    let eval = format!("eval_files = [{:?}, {:?}]", dir.join("valid.jsonl"), dir.join("valid.txt"));
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("test_fraction = 0.05", &eval)
        .replace("max_steps = 30", "max_steps = 2")
        .replace("max_chunks = 64", "max_chunks = 0");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("out/data/manifest.json")).unwrap()).unwrap()
}

#[test]
fn perplexity_is_taken_on_the_eval_files_alike_on_one_and_two_workers() {
    let single = tempfile::tempdir().unwrap();
    let cfg = job(single.path());
    let out = run(mlm().arg("train").arg(&cfg).args(["--set", "training.batch_size=16"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let m = manifest(single.path());
    let (test, eval) = (m["test_chunks"].as_u64().unwrap(), &m["eval"]);
    // Every block of the eval files is a test block, and only those: the
    // tutorial's blocks all train.
    assert_eq!(test, eval["tokens"].as_u64().unwrap() / 64, "{m}");
    assert_eq!(m["train_chunks"].as_u64().unwrap(), m["tokens"].as_u64().unwrap() / 64, "{m}");
    assert_eq!(eval["sources"].as_array().unwrap().len(), 2, "{m}");
    let evaluated = format!("evaluated {test} held-out blocks of data.eval_files");
    assert_eq!(stderr.lines().filter(|l| l.contains(&evaluated)).count(), 2, "{stderr}");
    let one = eval_records(&single.path().join("out/metrics.jsonl"));
    assert_eq!(one.len(), 2, "before training and at the end: {one:?}");

    let launched = tempfile::tempdir().unwrap();
    let cfg = job(launched.path());
    let mut two = Command::new(launcher());
    two.args(["--nproc", "2", "--device", "cpu", "--mlm"]).arg(env!("CARGO_BIN_EXE_mlm"));
    let out = run(two.arg(&cfg).args(["--set", "training.batch_size=8"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let two = eval_records(&launched.path().join("out/metrics.jsonl"));
    assert_eq!(two.len(), 2, "{two:?}");
    for (a, b) in one.iter().zip(&two) {
        assert_eq!((a["step"].clone(), a["eval_tokens"].clone()), (b["step"].clone(), b["eval_tokens"].clone()));
        let (p, q) = (a["perplexity"].as_f64().unwrap(), b["perplexity"].as_f64().unwrap());
        // Before training the same model scores the same masks (the sum of the
        // workers' shares); after 2 steps the weights agree to float tolerance.
        assert!((p - q).abs() / p < 1e-5, "step {}: 1 worker {p}, 2 workers {q}", a["step"]);
    }
}

#[test]
fn eval_files_with_a_test_fraction_are_refused_naming_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path());
    let out = mlm().arg("prepare").arg(&cfg).args(["--set", "data.test_fraction=0.1"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let line = stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("data.test_fraction = 0.1 and data.eval_files are both set"), "{line}");
    // An eval file that is also trained on is named.
    let tutorial = format!("/usr/share/doc/python3.11/html/_sources/tutorial/{}", "classes.rst.txt");
    let out =
        mlm().arg("prepare").arg(&cfg).args(["--set", &format!("data.eval_files=[{tutorial:?}]")]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let line = stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("data.eval_files") && line.contains("classes.rst.txt is also in data.files"), "{line}");
    assert!(!dir.path().join("out/data").exists(), "a refused preparation wrote a store");
}
