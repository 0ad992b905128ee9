//! Bad input gets one clear line naming the problem, a non-zero exit, no panic,
//! and leaves nothing half-written.
mod common;
use std::path::Path;

use common::*;

/// Runs `mlm <args>` expecting failure; returns the error line.
fn fails(args: &[&str], cfg: &Path) -> String {
    let out = run(mlm().args(args).arg(cfg).args(["--set", "logging.progress=never"]));
    assert!(!out.status.success(), "expected a failure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    errors[0].to_string()
}

/// No leftovers of an interrupted write in `out`.
fn no_partial_files(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".tmp-") && !name.contains(".old-"), "leftover {name}");
        }
    }
}

fn job_with_files(dir: &Path, files: &str) -> std::path::PathBuf {
    let cfg = write_job(dir, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let start = text.find("files = [").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    std::fs::write(&cfg, format!("{}files = [{files}]{}", &text[..start], &text[end..])).unwrap();
    cfg
}

#[test]
fn missing_input_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job_with_files(dir.path(), "\"/no/such/corpus.txt\"");
    let e = fails(&["prepare"], &cfg);
    assert!(e.contains("/no/such/corpus.txt"), "{e}");
    assert!(!dir.path().join("out/data").exists());
}

#[test]
fn empty_corpus_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.txt"), "\n\n   \n").unwrap();
    let cfg = job_with_files(dir.path(), &format!("{:?}", dir.path().join("empty.txt")));
    let e = fails(&["prepare"], &cfg);
    assert!(e.contains("empty.txt") && e.to_lowercase().contains("no text"), "{e}");
    assert!(!dir.path().join("out/data").exists());
}

#[test]
fn corpus_shorter_than_one_block_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("short.txt"), "A short text.\n").unwrap();
    let cfg = job_with_files(dir.path(), &format!("{:?}", dir.path().join("short.txt")));
    let e = fails(&["prepare"], &cfg);
    assert!(e.contains("block_size"), "{e}");
}

#[test]
fn unknown_config_key_is_named_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("lr = 2e-3", "lr = 2e-3\nlearnig_rate = 1");
    std::fs::write(&cfg, &text).unwrap();
    let line = text.lines().position(|l| l.starts_with("learnig_rate")).unwrap() + 1;
    let e = fails(&["train"], &cfg);
    assert!(e.contains("learnig_rate") && e.contains(&format!("line {line}")), "{e}");
}

#[test]
fn wrong_value_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let e = fails(&["train", "--set", "training.batch_size=\"eight\""], &cfg);
    assert!(e.contains("batch_size") || e.contains("invalid type"), "{e}");
}

#[test]
fn tokenizer_larger_than_model_vocabulary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let model = dir.path().join("tiny-bert.json");
    let text = std::fs::read_to_string(&model).unwrap().replace("30522", "1000");
    std::fs::write(&model, text).unwrap();
    let e = fails(&["train"], &cfg);
    assert!(e.contains("30522") && e.contains("1000") && e.contains("tokenizer"), "{e}");
    assert!(!dir.path().join("out/data").exists());
}

#[test]
fn non_utf8_input_is_named_and_prepared_data_survives() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let good = std::fs::read_to_string("/usr/share/doc/python3.11/html/_sources/tutorial/classes.rst.txt").unwrap();
    std::fs::write(&corpus, &good).unwrap();
    let cfg = job_with_files(dir.path(), &format!("{:?}", corpus));
    assert!(run(mlm().arg("prepare").arg(&cfg)).status.success());
    let manifest = std::fs::read(dir.path().join("out/data/manifest.json")).unwrap();

    let mut bad = good.into_bytes();
    bad.extend_from_slice(b"\nLatin-1 text: caf\xe9\n");
    std::fs::write(&corpus, &bad).unwrap();
    let e = fails(&["prepare"], &cfg);
    assert!(e.contains("corpus.txt") && e.contains("UTF-8"), "{e}");
    // the earlier prepared store is untouched
    assert_eq!(std::fs::read(dir.path().join("out/data/manifest.json")).unwrap(), manifest);
    no_partial_files(&dir.path().join("out"));
}

#[test]
fn missing_model_directory_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let start = text.find("config = ").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    std::fs::write(&cfg, format!("{}path = \"/no/such/model\"{}", &text[..start], &text[end..])).unwrap();
    let e = fails(&["train"], &cfg);
    assert!(e.contains("/no/such/model"), "{e}");
}

#[test]
fn fill_mask_without_mask_token_is_refused() {
    let out = run(mlm().args(["fill-mask", "--model"]).arg(minilm_dir()).arg("No mask here."));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[MASK]") && !stderr.contains("panicked"), "{stderr}");
}
