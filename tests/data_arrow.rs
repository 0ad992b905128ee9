//! End-to-end: Hugging Face `datasets` folders, written by the `datasets`
//! package itself (`save_to_disk`: Arrow IPC stream shards beside
//! `state.json`; a `DatasetDict` with train and validation splits), prepare as
//! the same documents in JSON lines do.
use std::path::Path;
use std::process::Command;

use crate::common::*;

/// Writes, with `datasets`: `wiki/` (one split of `n` documents in 3 shards,
/// with an `id` column beside `text`) and `dict/` (train: the first `n - 40`,
/// validation: the last 40), and `wiki.jsonl` with the same `n` documents.
fn write_datasets(dir: &Path, n: usize) {
    let script = r#"
import json, sys, glob
from datasets import Dataset, DatasetDict
out, n = sys.argv[1], int(sys.argv[2])
paras = []
for f in sorted(glob.glob(sys.argv[3])):
    paras += [p.strip() for p in open(f, encoding="utf-8").read().split("\n\n") if len(p.strip()) >= 40]
docs = paras[:n]
assert len(docs) == n, len(docs)
Dataset.from_dict({"id": list(range(n)), "text": docs}).save_to_disk(out + "/wiki", num_shards=3)
DatasetDict({
    "train": Dataset.from_dict({"text": docs[:-40]}),
    "validation": Dataset.from_dict({"text": docs[-40:]}),
}).save_to_disk(out + "/dict")
with open(out + "/wiki.jsonl", "w", encoding="utf-8") as f:
    for d in docs:
        f.write(json.dumps({"text": d}) + "\n")
"#;
    let out = Command::new(python())
        .args(["-c", script, dir.to_str().unwrap(), &n.to_string(), &corpus_glob()])
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HOME", dir.join("hf-home"))
        .output()
        .unwrap();
    assert!(out.status.success(), "datasets:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn prepare(dir: &Path, name: &str, files: &[String]) -> (std::process::Output, serde_json::Value) {
    let job = dir.join(name);
    std::fs::create_dir_all(&job).unwrap();
    let cfg = write_job_on(&job, files, "");
    let out = run(mlm().arg("prepare").arg(&cfg));
    let manifest = std::fs::read_to_string(job.join("out/data/manifest.json"))
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap_or(serde_json::Value::Null);
    (out, manifest)
}

#[test]
fn datasets_folders_prepare_as_their_documents() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_datasets(d, 300);
    let path = |p: &str| d.join(p).to_string_lossy().into_owned();
    let shards: Vec<_> = glob::glob(&path("wiki/data-*.arrow")).unwrap().collect();
    assert_eq!(shards.len(), 3, "datasets wrote {shards:?}");

    let (out, jsonl) = prepare(d, "jsonl", &[path("wiki.jsonl")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The save_to_disk folder: its three stream shards, in order, the text column.
    let (out, arrow) = prepare(d, "arrow", &[path("wiki")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(arrow["sources"].as_array().unwrap().len(), 3);
    for key in ["documents", "tokens", "words", "train_chunks", "test_chunks"] {
        assert_eq!(arrow[key], jsonl[key], "{key}: arrow {} vs jsonl {}", arrow[key], jsonl[key]);
    }
    assert_eq!(arrow["documents"], 300);
    // The shards by glob: the same.
    let (out, glob) = prepare(d, "glob", &[path("wiki/data-*.arrow")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(glob["tokens"], jsonl["tokens"]);

    // A DatasetDict folder reads its train split; a split's folder that split.
    let (out, dict) = prepare(d, "dict", &[path("dict")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dict["documents"], 260);
    let (out, validation) = prepare(d, "validation", &[path("dict/validation")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(validation["documents"], 40);

    // A folder that is no dataset, and a missing text column, are one line each.
    std::fs::create_dir_all(d.join("plain")).unwrap();
    let (out, _) = prepare(d, "plain", &[path("plain")]);
    let e = error_line(&out);
    assert!(e.contains("plain is a folder") && e.contains("state.json"), "{e}");
    let job = d.join("column");
    std::fs::create_dir_all(&job).unwrap();
    let cfg = write_job_on(&job, &[path("wiki")], "");
    let e = error_line(&run(mlm().arg("prepare").arg(&cfg).args(["--set", "data.text_field=body"])));
    assert!(e.contains("data-00000-of-00003.arrow: no column \"body\" (columns: id, text)"), "{e}");
}
