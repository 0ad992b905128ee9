//! Real corpora as they come: compressed text (`.gz`, `.zst`, `.bz2`) prepares
//! into the same token store as the plain files, and a Latin-1 file either
//! stops the preparation naming it or, when asked, is read with its invalid
//! bytes replaced or its invalid lines left out, saying how many.
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::common::*;

fn prepare(cfg: &Path, extra: &[&str]) -> std::process::Output {
    let mut sets = Vec::new();
    for s in extra {
        sets.extend(["--set", s]);
    }
    mlm().arg("prepare").arg(cfg).args(sets).output().unwrap()
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("out/data/manifest.json")).unwrap()).unwrap()
}

fn corpus_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = glob::glob(&corpus_glob()).unwrap().flatten().collect();
    v.sort();
    assert!(v.len() >= 3, "the tutorial corpus is missing");
    v
}

#[test]
fn compressed_inputs_prepare_the_same_store_as_plain_ones() {
    let files = corpus_files();
    let plain = tempfile::tempdir().unwrap();
    let cfg = write_job_on(plain.path(), &[corpus_glob()], "");
    let out = prepare(&cfg, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The same files, each compressed with one of the three codecs in turn.
    let packed = tempfile::tempdir().unwrap();
    let inputs = packed.path().join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    for (i, f) in files.iter().enumerate() {
        let text = std::fs::read(f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let (ext, bytes) = match i % 3 {
            0 => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(&text).unwrap();
                ("gz", e.finish().unwrap())
            }
            1 => ("zst", zstd::encode_all(&text[..], 3).unwrap()),
            _ => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
                e.write_all(&text).unwrap();
                ("bz2", e.finish().unwrap())
            }
        };
        std::fs::write(inputs.join(format!("{name}.{ext}")), bytes).unwrap();
    }
    let cfg = write_job_on(packed.path(), &[format!("{}/*", inputs.display())], "");
    let out = prepare(&cfg, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (a, b) = (manifest(plain.path()), manifest(packed.path()));
    for key in ["documents", "tokens", "words", "train_chunks", "test_chunks"] {
        assert_eq!(a[key], b[key], "{key} differs between plain and compressed inputs");
    }
    // Same chunks in the same order: the token files are byte for byte equal.
    for f in ["train.tokens", "test.tokens"] {
        let (x, y) = (plain.path().join("out/data").join(f), packed.path().join("out/data").join(f));
        assert!(std::fs::read(&x).unwrap() == std::fs::read(&y).unwrap(), "{f} differs");
    }
}

#[test]
fn a_latin1_file_stops_preparation_unless_a_policy_is_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let latin1 = dir.path().join("latin1.txt");
    // Three lines with Latin-1 bytes (é, ü, £) among valid ones.
    std::fs::write(&latin1, b"Valid line one.\n\nCaf\xe9 au lait.\n\nMore valid text here.\n\nM\xfcller paid \xa33.\n")
        .unwrap();
    let cfg = write_job_on(dir.path(), &[corpus_glob(), latin1.display().to_string()], "");

    let out = prepare(&cfg, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let line = stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("latin1.txt") && line.contains("line 3") && line.contains("data.invalid_utf8"), "{line}");
    assert!(!dir.path().join("out/data/manifest.json").exists(), "a refused preparation wrote a store");

    let out = prepare(&cfg, &["data.invalid_utf8=replace"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("latin1.txt: 3 invalid UTF-8 sequence(s) replaced with U+FFFD"), "{stderr}");
    let replaced = manifest(dir.path());

    let out = prepare(&cfg, &["data.invalid_utf8=skip"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("latin1.txt: 2 line(s) with invalid UTF-8 left out"), "{stderr}");
    let skipped = manifest(dir.path());
    // The policy is part of the store's identity: the store was made again,
    // two documents shorter.
    assert_ne!(replaced["inputs_key"], skipped["inputs_key"]);
    assert_eq!(replaced["documents"].as_u64().unwrap(), skipped["documents"].as_u64().unwrap() + 2);
}
