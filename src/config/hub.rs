//! Models named as on the Hugging Face Hub (`model.path = "org/name"`, `mlm
//! eval --model org/name`), found offline in the local hub cache that
//! `transformers` and `huggingface-cli download` fill:
//! `<cache>/models--ORG--NAME/snapshots/<commit>/`, the commit read from
//! `refs/<revision>` (or given as the revision itself). The cache is
//! `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`. A local
//! folder of that name always wins; nothing is downloaded.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The revision used when none is given (`model.revision`).
pub const DEFAULT_REVISION: &str = "main";

/// Where `name` (as written) is: itself when it exists (relative names taken
/// from `base`), else its snapshot in the hub cache for `revision` when
/// `name` is a Hub id. An error names every place looked at and how to fill
/// the cache.
pub fn resolve_model(name: &Path, base: &Path, revision: Option<&str>) -> Result<PathBuf> {
    resolve_model_in(name, base, revision, &hub_cache(|k| std::env::var_os(k).map(PathBuf::from)))
}

/// [`resolve_model`] with the hub cache at `cache`.
fn resolve_model_in(name: &Path, base: &Path, revision: Option<&str>, cache: &Path) -> Result<PathBuf> {
    let local = if name.is_relative() { base.join(name) } else { name.to_path_buf() };
    if local.exists() {
        return Ok(local);
    }
    let Some(id) = hub_id(name) else {
        return Ok(local);
    };
    let revision = revision.unwrap_or(DEFAULT_REVISION);
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let commit = match std::fs::read_to_string(repo.join("refs").join(revision)) {
        Ok(text) => text.trim().to_string(),
        Err(_) if is_commit(revision) => revision.to_string(),
        Err(_) => String::new(),
    };
    let snapshot = repo.join("snapshots").join(&commit);
    if !commit.is_empty() && is_commit(&commit) && snapshot.join("config.json").exists() {
        return Ok(snapshot);
    }
    if !id.contains('/') {
        // A bare name ("bert-base-uncased") is as likely a folder that is
        // missing: the loader's own error names it.
        return Ok(local);
    }
    let looked = if commit.is_empty() {
        format!("{} (no refs/{revision} there)", repo.display())
    } else {
        format!("{} (no config.json there)", snapshot.display())
    };
    bail!(
        "model {:?}: no folder {} and not in the Hugging Face cache: looked in {looked}; on a machine that reaches \
         the Hub run `huggingface-cli download {id}{}` and copy its cache here (HF_HUB_CACHE or HF_HOME say where \
         it is), or give the model's folder",
        name.display(),
        local.display(),
        if revision == DEFAULT_REVISION { String::new() } else { format!(" --revision {revision}") },
    )
}

/// `name` as a Hub id (`org/name` or `name`: letters, digits, `-`, `_`, `.`,
/// at most one `/`), when it is one.
fn hub_id(name: &Path) -> Option<String> {
    let s = name.to_str()?;
    let parts: Vec<&str> = s.split('/').collect();
    let part_ok = |p: &&str| {
        !p.is_empty()
            && *p != "."
            && *p != ".."
            && !p.starts_with('-')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (parts.len() <= 2 && parts.iter().all(part_ok)).then(|| s.to_string())
}

/// The hub cache folder from the environment (`var` reads it).
fn hub_cache(var: impl Fn(&str) -> Option<PathBuf>) -> PathBuf {
    if let Some(p) = var("HF_HUB_CACHE").filter(|p| !p.as_os_str().is_empty()) {
        return p;
    }
    if let Some(home) = var("HF_HOME").filter(|p| !p.as_os_str().is_empty()) {
        return home.join("hub");
    }
    let home = var("HOME").unwrap_or_else(|| PathBuf::from("/"));
    home.join(".cache").join("huggingface").join("hub")
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        for id in ["microsoft/deberta-v3-large", "bert-base-uncased", "org/name.v2", "a_b/c-d"] {
            assert_eq!(hub_id(Path::new(id)).as_deref(), Some(id), "{id}");
        }
        for path in ["./model", "../model", "/abs/model", "a/b/c", "org/", "-x/y", "a b/c", "org//name"] {
            assert_eq!(hub_id(Path::new(path)), None, "{path}");
        }
    }

    /// A cache laid out as the hub writes it: refs/main holds the commit,
    /// the snapshot's files are links to blobs.
    fn fake_cache(root: &Path, id: &str, commit: &str) -> PathBuf {
        let repo = root.join(format!("models--{}", id.replace('/', "--")));
        let snapshot = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();
        std::fs::write(repo.join("blobs/abc123"), "{}").unwrap();
        std::os::unix::fs::symlink("../../blobs/abc123", snapshot.join("config.json")).unwrap();
        snapshot
    }

    #[test]
    fn a_hub_name_resolves_to_its_snapshot_and_a_local_folder_wins() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("hub");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snapshot = fake_cache(&cache, "org/model", commit);
        let base = dir.path().join("jobs");
        std::fs::create_dir_all(&base).unwrap();
        let name = Path::new("org/model");
        assert_eq!(resolve_model_in(name, &base, None, &cache).unwrap(), snapshot);
        assert_eq!(resolve_model_in(name, &base, Some(commit), &cache).unwrap(), snapshot);
        // Another revision that is not there: one line naming where it looked.
        let err = resolve_model_in(name, &base, Some("v2"), &cache).unwrap_err().to_string();
        assert!(err.contains("refs/v2") && err.contains("huggingface-cli download org/model --revision v2"), "{err}");
        let err = resolve_model_in(Path::new("org/other"), &base, None, &cache).unwrap_err().to_string();
        assert!(err.contains("models--org--other") && !err.contains('\n'), "{err}");
        // A bare name missing everywhere is left to the loader's error (a missing folder).
        assert_eq!(resolve_model_in(Path::new("m"), &base, None, &cache).unwrap(), base.join("m"));
        // A folder of that name beside the job wins.
        std::fs::create_dir_all(base.join("org/model")).unwrap();
        assert_eq!(resolve_model_in(name, &base, None, &cache).unwrap(), base.join("org/model"));
        // A path that is no Hub id is left to the loader's own error.
        assert_eq!(resolve_model_in(Path::new("./x/y/z"), &base, None, &cache).unwrap(), base.join("./x/y/z"));
    }

    #[test]
    fn the_cache_is_hf_hub_cache_then_hf_home_then_home() {
        let env = |pairs: &'static [(&str, &str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| PathBuf::from(v))
        };
        assert_eq!(hub_cache(env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h"), ("HOME", "/u")])), Path::new("/c"));
        assert_eq!(hub_cache(env(&[("HF_HOME", "/h"), ("HOME", "/u")])), Path::new("/h/hub"));
        assert_eq!(hub_cache(env(&[("HOME", "/u")])), Path::new("/u/.cache/huggingface/hub"));
    }
}
