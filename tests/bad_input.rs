//! Bad input gets one clear line naming the problem and a non-zero exit, never a
//! panic, and never touches what a job already wrote: every case runs against an
//! output directory holding a finished checkpoint, `best/` and prepared data, and
//! checks afterwards that all of it is byte for byte as before.
mod common;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;

/// An output directory of a finished 4-step job (made once per test run).
fn trained_output() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bad-input-fixture");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = write_job(&dir, "");
        let ok = run(mlm().arg("train").arg(&cfg).args(["--set", "training.max_steps=4"])).status.success();
        assert!(ok, "fixture job failed");
        dir.join("out")
    })
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// Every file under `dir` with its content.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_name() != "metrics.jsonl" {
                out.insert(e.path().strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

/// A job directory whose output holds the finished job; returns (dir, config).
fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    copy_tree(trained_output(), &dir.path().join("out"));
    (dir, cfg)
}

/// Runs `mlm <args> <cfg> <after>`, expecting one error line that contains every
/// string of `expect`, and the output directory unchanged.
fn fails(dir: &Path, args: &[&str], cfg: &Path, after: &[&str], expect: &[&str]) {
    let out_dir = dir.join("out");
    let before = snapshot(&out_dir);
    let out = run(mlm().args(args).arg(cfg).args(after).args(["--set", "logging.progress=never"]));
    assert!(!out.status.success(), "expected a failure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    for e in expect {
        assert!(errors[0].contains(e), "{:?} lacks {e:?}", errors[0]);
    }
    let after_snap = snapshot(&out_dir);
    assert_eq!(before.keys().collect::<Vec<_>>(), after_snap.keys().collect::<Vec<_>>(), "files changed");
    assert!(before == after_snap, "existing files were modified");
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn set_files(cfg: &Path, files: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let start = text.find("files = [").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    std::fs::write(cfg, format!("{}files = [{files}]{}", &text[..start], &text[end..])).unwrap();
}

#[test]
fn missing_input_file_is_named() {
    let (dir, cfg) = setup();
    set_files(&cfg, "\"/no/such/corpus.txt\"");
    fails(dir.path(), &["prepare"], &cfg, &[], &["/no/such/corpus.txt"]);
}

#[test]
fn input_path_that_is_a_directory_is_named() {
    let (dir, cfg) = setup();
    set_files(&cfg, &format!("{:?}", dir.path()));
    fails(dir.path(), &["train"], &cfg, &[], &[&dir.path().display().to_string()]);
}

#[test]
fn empty_corpus_is_refused() {
    let (dir, cfg) = setup();
    std::fs::write(dir.path().join("empty.txt"), "\n\n   \n").unwrap();
    set_files(&cfg, &format!("{:?}", dir.path().join("empty.txt")));
    fails(dir.path(), &["prepare"], &cfg, &[], &["empty.txt", "no text"]);
}

#[test]
fn corpus_shorter_than_one_block_is_refused() {
    let (dir, cfg) = setup();
    std::fs::write(dir.path().join("short.txt"), "A short text.\n").unwrap();
    set_files(&cfg, &format!("{:?}", dir.path().join("short.txt")));
    fails(dir.path(), &["prepare"], &cfg, &[], &["block_size"]);
}

#[test]
fn non_utf8_input_is_named_with_its_offset() {
    let (dir, cfg) = setup();
    let corpus = dir.path().join("latin1.txt");
    std::fs::write(&corpus, b"Some text, then Latin-1: caf\xe9 and more.\n").unwrap();
    set_files(&cfg, &format!("{corpus:?}"));
    fails(dir.path(), &["prepare"], &cfg, &[], &["latin1.txt", "UTF-8", "offset 28"]);
}

#[test]
fn malformed_jsonl_line_is_named() {
    let (dir, cfg) = setup();
    let corpus = dir.path().join("docs.jsonl");
    std::fs::write(&corpus, "{\"text\": \"fine\"}\n{\"text\": unquoted}\n").unwrap();
    set_files(&cfg, &format!("{corpus:?}"));
    fails(dir.path(), &["prepare"], &cfg, &[], &["docs.jsonl", "2"]);
}

#[test]
fn malformed_toml_names_line_and_column() {
    let (dir, cfg) = setup();
    edit(&cfg, "lr = 2e-3", "lr = = 2e-3");
    fails(dir.path(), &["train"], &cfg, &[], &["job.toml", "line"]);
}

#[test]
fn missing_config_file_is_named() {
    let (dir, _) = setup();
    fails(dir.path(), &["train"], &dir.path().join("nope.toml"), &[], &["nope.toml"]);
}

#[test]
fn unknown_config_key_is_named_with_its_line() {
    let (dir, cfg) = setup();
    edit(&cfg, "lr = 2e-3", "lr = 2e-3\nlearnig_rate = 1");
    let line = std::fs::read_to_string(&cfg).unwrap().lines().position(|l| l.starts_with("learnig_rate")).unwrap() + 1;
    fails(dir.path(), &["train"], &cfg, &[], &["learnig_rate", &format!("line {line}")]);
}

#[test]
fn wrong_value_type_is_named() {
    let (dir, cfg) = setup();
    fails(dir.path(), &["train"], &cfg, &["--set", "training.batch_size=\"eight\""], &["batch_size"]);
}

#[test]
fn zero_batch_size_is_refused() {
    let (dir, cfg) = setup();
    fails(dir.path(), &["train"], &cfg, &["--set", "training.batch_size=0"], &["training.batch_size"]);
}

#[test]
fn out_of_range_values_are_refused() {
    let (dir, cfg) = setup();
    fails(dir.path(), &["train"], &cfg, &["--set", "data.test_fraction=1.5"], &["data.test_fraction"]);
    fails(dir.path(), &["train"], &cfg, &["--set", "data.mlm_probability=0"], &["data.mlm_probability"]);
}

#[test]
fn malformed_override_is_named() {
    let (dir, cfg) = setup();
    fails(dir.path(), &["train"], &cfg, &["--set", "training.lr"], &["training.lr", "section.key=value"]);
}

#[test]
fn tokenizer_larger_than_model_vocabulary_is_refused() {
    let (dir, cfg) = setup();
    edit(&dir.path().join("tiny-bert.json"), "30522", "1000");
    fails(dir.path(), &["train"], &cfg, &[], &["30522", "1000", "tokenizer"]);
}

#[test]
fn block_size_above_model_positions_is_refused() {
    let (dir, cfg) = setup();
    fails(dir.path(), &["train"], &cfg, &["--set", "data.block_size=512"], &["block_size", "512", "128"]);
}

#[test]
fn unsupported_model_type_is_named() {
    let (dir, cfg) = setup();
    edit(&dir.path().join("tiny-bert.json"), "\"model_type\": \"bert\"", "\"model_type\": \"gpt2\"");
    edit(&dir.path().join("tiny-bert.json"), "BertForMaskedLM", "GPT2LMHeadModel");
    fails(dir.path(), &["train"], &cfg, &[], &["gpt2"]);
}

#[test]
fn missing_model_directory_is_named() {
    let (dir, cfg) = setup();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let start = text.find("config = ").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    std::fs::write(&cfg, format!("{}path = \"/no/such/model\"{}", &text[..start], &text[end..])).unwrap();
    fails(dir.path(), &["train"], &cfg, &[], &["/no/such/model"]);
}

#[test]
fn corrupt_safetensors_is_named() {
    let (dir, cfg) = setup();
    let model = dir.path().join("broken-model");
    copy_tree(&trained_output().join("best"), &model);
    let f = model.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let start = text.find("config = ").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    std::fs::write(&cfg, format!("{}path = {:?}{}", &text[..start], model, &text[end..])).unwrap();
    fails(dir.path(), &["train"], &cfg, &[], &["model.safetensors"]);
}

#[test]
fn output_directory_that_cannot_be_created_is_named() {
    let (dir, cfg) = setup();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "not a directory").unwrap();
    fails(
        dir.path(),
        &["train"],
        &cfg,
        &["--set", &format!("training.output_dir={:?}", blocker.join("out"))],
        &["a-file"],
    );
}

#[test]
fn full_disk_while_writing_metrics_is_reported() {
    // metrics.jsonl pointing at /dev/full: every write fails with ENOSPC.
    let (dir, cfg) = setup();
    let out = dir.path().join("out");
    std::fs::remove_file(out.join("metrics.jsonl")).ok();
    std::os::unix::fs::symlink("/dev/full", out.join("metrics.jsonl")).unwrap();
    fails(
        dir.path(),
        &["train"],
        &cfg,
        &["--set", "training.max_steps=8", "--set", "checkpoint.allow_config_change=true"],
        &["metrics"],
    );
}

#[test]
fn resume_from_a_directory_that_is_not_a_checkpoint_is_refused() {
    let (dir, cfg) = setup();
    fails(dir.path(), &["train"], &cfg, &["--resume", "/tmp"], &["checkpoint.resume", "/tmp"]);
}

#[test]
fn fill_mask_without_mask_token_is_refused() {
    let out = run(mlm().args(["fill-mask", "--model"]).arg(minilm_dir()).arg("No mask here."));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[MASK]") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn diverging_training_stops_after_non_finite_steps_and_saves_nothing() {
    // lr 1e30 blows the weights up after one step: every later step has a
    // non-finite loss, is skipped, and after 5 in a row the job stops; the
    // existing checkpoints stay as they were and no NaN weights are written.
    let (dir, cfg) = setup();
    fails(
        dir.path(),
        &["train"],
        &cfg,
        &[
            "--set",
            "training.lr=1e30",
            "--set",
            "training.max_steps=40",
            "--set",
            "checkpoint.allow_config_change=true",
        ],
        &["non-finite", "5 steps in a row"],
    );
}
