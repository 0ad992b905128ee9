//! End-to-end: the real `mlm` binary prepares and trains on Parquet files in the
//! schema of Hugging Face's Wikipedia dump (`id, url, title, text`, all strings),
//! with token and whole-word masking.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray};

use crate::common::*;

/// Paragraphs of the Python tutorial, one document each (blank-line separated,
/// at least 40 characters), in file order.
fn tutorial_paragraphs() -> Vec<String> {
    let mut files: Vec<PathBuf> = glob::glob(&corpus_glob()).unwrap().map(|p| p.unwrap()).collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap();
        docs.extend(text.split("\n\n").map(str::trim).filter(|p| p.len() >= 40).map(str::to_string));
    }
    docs
}

/// Writes `docs` as a Wikipedia-style Parquet file; `text` names the text column.
fn write_wiki_parquet(path: &Path, docs: &[String], text: &str) {
    let col = |f: &dyn Fn(usize) -> String| -> ArrayRef {
        Arc::new(StringArray::from((0..docs.len()).map(f).collect::<Vec<_>>()))
    };
    let batch = RecordBatch::try_from_iter([
        ("id", col(&|i| (1000 + i).to_string())),
        ("url", col(&|i| format!("https://en.wikipedia.org/wiki?curid={}", 1000 + i))),
        ("title", col(&|i| format!("Paragraph {i}"))),
        (text, col(&|i| docs[i].clone())),
    ])
    .unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .set_max_row_group_row_count(Some(100))
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// Two Parquet shards of 200 tutorial paragraphs each, and a job over them by glob.
fn wiki_job(dir: &Path, extra: &str) -> (PathBuf, usize) {
    let docs = tutorial_paragraphs();
    assert!(docs.len() >= 400, "{} paragraphs", docs.len());
    write_wiki_parquet(&dir.join("train-00000-of-00002.parquet"), &docs[..200], "text");
    write_wiki_parquet(&dir.join("train-00001-of-00002.parquet"), &docs[200..400], "text");
    let pattern = dir.join("train-*.parquet").to_string_lossy().into_owned();
    (write_job_on(dir, &[pattern], extra), 400)
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("out/data/manifest.json")).unwrap()).unwrap()
}

#[test]
fn parquet_shards_prepare_and_train_a_tiny_bert() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, n_docs) = wiki_job(dir.path(), "");
    let out = run(mlm().arg("prepare").arg(&cfg));
    assert!(out.status.success());
    let m = manifest(dir.path());
    assert_eq!(m["documents"], n_docs);
    assert_eq!(m["sources"].as_array().unwrap().len(), 2);
    let tokens = m["tokens"].as_u64().unwrap();
    let words = m["words"].as_u64().unwrap();
    assert!(tokens > 64 * 100 && words < tokens && words > tokens / 2, "{tokens} tokens, {words} words");
    let chunks = tokens / 64;
    // Each chunk is a test chunk with probability 0.05 (a hash of the split
    // seed and the chunk): within 5 standard deviations, at least one.
    let test = m["test_chunks"].as_u64().unwrap();
    assert_eq!(m["train_chunks"].as_u64().unwrap(), chunks - test);
    let sd = (chunks as f64 * 0.05 * 0.95).sqrt();
    assert!(test >= 1 && (test as f64 - chunks as f64 * 0.05).abs() < 5.0 * sd, "{test} test chunks of {chunks}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("{} train and {test} test chunks", chunks - test)), "{stdout}");
    for f in ["train.tokens", "train.words", "test.tokens", "test.words"] {
        assert!(dir.path().join("out/data").join(f).is_file(), "{f}");
    }

    let out = run(mlm().arg("train").arg(&cfg).args(["--set", "training.max_steps=10"]));
    assert!(out.status.success());
    let ckpt = dir.path().join("out/checkpoint-10");
    for f in ["config.json", "model.safetensors", "trainer_state.json"] {
        assert!(ckpt.join(f).is_file(), "checkpoint-10/{f}");
    }
    // Training reused the prepared store.
    assert_eq!(manifest(dir.path()), m);
}

#[test]
fn whole_word_masking_trains_on_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = wiki_job(dir.path(), "");
    assert!(run(mlm().arg("prepare").arg(&cfg)).status.success());
    let m = manifest(dir.path());
    let wwm = ["--set", "data.whole_word_mask=true", "--set", "training.max_steps=10"];
    let out = run(mlm().arg("train").arg(&cfg).args(wwm));
    assert!(out.status.success());
    assert!(dir.path().join("out/checkpoint-10/model.safetensors").is_file());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("perplexity after"), "{stdout}");
    // Word marks are always stored: switching whole-word masking on does not
    // prepare the data again.
    assert_eq!(manifest(dir.path()), m);
}

#[test]
fn missing_text_column_is_one_error_line_naming_the_file_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let docs = tutorial_paragraphs();
    let file = dir.path().join("wiki.parquet");
    write_wiki_parquet(&file, &docs[..50], "body");
    let cfg = write_job_on(dir.path(), &[file.to_string_lossy().into_owned()], "");
    let out = run(mlm().arg("prepare").arg(&cfg));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let want = format!("{}: no column \"text\" (columns: id, url, title, body); set data.text_field", file.display());
    assert!(errors[0].contains(&want), "{}", errors[0]);
    assert!(!dir.path().join("out/data").exists());

    // With data.text_field naming the column, the same file prepares.
    let out = run(mlm().arg("prepare").arg(&cfg).args(["--set", "data.text_field=\"body\""]));
    assert!(out.status.success());
}
