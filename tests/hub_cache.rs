//! Models by their Hub name, offline: a Hugging Face cache laid out as the hub
//! writes it (refs/main, snapshots of links to blobs) serves `org/name` to the
//! commands and to a job's `model.path`; a name it lacks is one error line.
use std::path::Path;

use crate::common::*;

const ID: &str = "sentence-transformers/all-MiniLM-L6-v2";
const COMMIT: &str = "c9745ed1d9f207416be6d2e6f8de32d1f16199bf";

/// A hub cache under `root` holding the demo model as `ID`.
fn fake_cache(root: &Path) {
    let repo = root.join("models--sentence-transformers--all-MiniLM-L6-v2");
    let snapshot = repo.join("snapshots").join(COMMIT);
    for d in [repo.join("refs"), repo.join("blobs"), snapshot.clone()] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    for (i, f) in ["config.json", "model.safetensors", "tokenizer.json"].into_iter().enumerate() {
        let blob = format!("blob{i:04}");
        std::fs::copy(minilm_dir().join(f), repo.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(f)).unwrap();
    }
}

#[test]
fn a_hub_name_is_found_in_the_local_cache_and_a_missing_one_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    fake_cache(&cache);
    let fill = |model: &str| {
        run(mlm()
            .args(["fill-mask", "--model", model, "--device", "cpu", "Paris is the [MASK] of France."])
            .env("HF_HUB_CACHE", &cache)
            .current_dir(dir.path()))
    };
    let out = fill(ID);
    assert!(out.status.success());
    let lines = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(lines, 5, "the top 5 predictions");

    let out = fill("org/missing");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("models--org--missing") && last.contains("huggingface-cli download org/missing"), "{err}");

    // A job names it too: prepare resolves it (the tokenizer beside the weights).
    let text: String =
        (0..200).map(|i| format!("Line {i} of a small corpus about the capital of France.\n\n")).collect();
    std::fs::write(dir.path().join("corpus.txt"), text).unwrap();
    let cfg = dir.path().join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"{ID}\"\n[data]\nfiles = [\"corpus.txt\"]\nblock_size = 64\n[training]\n\
             output_dir = \"out\"\n[logging]\nprogress = \"never\"\n"
        ),
    )
    .unwrap();
    let out = run(mlm().arg("prepare").arg(&cfg).env("HF_HUB_CACHE", &cache).current_dir(dir.path()));
    assert!(out.status.success());
}
