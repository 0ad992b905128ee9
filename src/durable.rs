//! Folders that a crash never leaves half-written: the one atomic swap used by
//! checkpoints, `best/` and the prepared token store, the clean-up after an
//! interrupted swap, and file checksums.
//!
//! A folder `dir` is built in the hidden sibling `.<name>.tmp-<pid>`, fsynced,
//! and swapped in by two renames (the old content goes to `.<name>.old-<pid>`
//! for the moment between them). [`recover`] finishes or undoes an interrupted
//! swap; it must run only while the caller holds the lock of the folder's
//! owner (see [`crate::lock`]), so it never touches another live writer's files.
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Builds `dir` through `fill(tmp)` in a sibling temporary folder, fsyncs it and
/// swaps it in: the old content of `dir` stays intact until the new one is
/// complete and synced, and a failure of `fill` leaves no temporary behind.
/// Refuses to replace a `dir` that is a file (or anything but a folder).
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = parent_of(dir);
    fs::create_dir_all(&parent).with_context(|| format!("cannot create {}", parent.display()))?;
    if let Ok(meta) = fs::symlink_metadata(dir) {
        if !meta.is_dir() {
            bail!("{} exists and is not a folder: it will not be replaced", dir.display());
        }
    }
    let name = name_of(dir)?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}"));
    let old = parent.join(format!(".{name}.old-{pid}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    if let Err(e) = fill(&tmp).and_then(|_| sync_tree(&tmp)) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let _ = fs::remove_dir_all(&old);
        if let Err(e) = fs::rename(dir, &old) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e).with_context(|| format!("cannot move aside {}", dir.display()));
        }
    }
    if let Err(e) = fs::rename(&tmp, dir) {
        let _ = fs::rename(&old, dir);
        let _ = fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()));
    }
    sync_dir(&parent)?;
    if old.exists() {
        if let Err(e) = fs::remove_dir_all(&old) {
            tracing::warn!("cannot remove the replaced {}: {e}", old.display());
        }
    }
    Ok(())
}

/// Cleans up interrupted swaps of the folders in `parent` whose names `owns`
/// accepts: a folder moved aside but not yet replaced is put back, unfinished
/// temporary folders are removed. Also removes the visible `<name>.tmp-<pid>`
/// and `<name>.old-<pid>` folders that earlier versions left. Call it only
/// while holding the lock that covers those folders.
pub fn recover(parent: &Path, owns: impl Fn(&str) -> bool) -> Result<()> {
    let Ok(entries) = fs::read_dir(parent) else { return Ok(()) };
    let mut leftovers: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    leftovers.sort();
    for p in leftovers {
        let file_name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let hidden = file_name.strip_prefix('.');
        let rest = hidden.unwrap_or(&file_name);
        if let Some((target, pid)) = rest.rsplit_once(".old-") {
            if !owns(target) || !is_pid(pid) {
                continue;
            }
            let dest = parent.join(target);
            if dest.exists() {
                fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
            } else {
                tracing::warn!("restoring {} interrupted while being replaced", dest.display());
                fs::rename(&p, &dest).with_context(|| format!("cannot restore {}", dest.display()))?;
            }
        } else if let Some((target, pid)) = rest.rsplit_once(".tmp-") {
            if owns(target) && is_pid(pid) && p.is_dir() {
                tracing::info!("removing unfinished {}", p.display());
                fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
            }
        }
    }
    Ok(())
}

fn is_pid(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `dir`'s parent, `.` for a bare name.
pub fn parent_of(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn name_of(dir: &Path) -> Result<String> {
    Ok(dir.file_name().with_context(|| format!("{} has no folder name", dir.display()))?.to_string_lossy().into_owned())
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(serde_json::to_string_pretty(value)?.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Hex SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", h.finalize()))
}

/// fsync of a folder's entry list.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync folder {}", dir.display()))
}

/// fsync of every file directly in `dir`, then of `dir` itself.
fn sync_tree(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_file() {
            File::open(&p).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", p.display()))?;
        }
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn swap_replaces_the_folder_and_leaves_nothing_beside_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        write_dir_atomically(&dir, |t| Ok(fs::write(t.join("a"), "1")?)).unwrap();
        write_dir_atomically(&dir, |t| Ok(fs::write(t.join("b"), "2")?)).unwrap();
        assert_eq!(names(&dir), vec!["b"]);
        assert_eq!(names(tmp.path()), vec!["d"]);
    }

    #[test]
    fn failed_fill_keeps_the_old_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        write_dir_atomically(&dir, |t| Ok(fs::write(t.join("a"), "1")?)).unwrap();
        assert!(write_dir_atomically(&dir, |_| bail!("no")).is_err());
        assert_eq!(names(&dir), vec!["a"]);
        assert_eq!(names(tmp.path()), vec!["d"]);
    }

    #[test]
    fn a_file_in_the_way_is_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("notes.txt");
        fs::write(&f, "mine").unwrap();
        let e = write_dir_atomically(&f, |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("notes.txt") && e.contains("not a folder"), "{e}");
        assert_eq!(fs::read_to_string(&f).unwrap(), "mine");
        assert_eq!(names(tmp.path()), vec!["notes.txt"]);
    }

    #[test]
    fn recover_restores_a_moved_aside_folder_and_removes_temporaries() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path();
        for d in [".best.old-12", ".checkpoint-4.tmp-9", "data.tmp-77", ".data.old-5", "data", "keep.tmp-x"] {
            fs::create_dir(p.join(d)).unwrap();
        }
        recover(p, |name| name == "best" || name.starts_with("checkpoint-") || name == "data").unwrap();
        assert_eq!(names(p), vec!["best", "data", "keep.tmp-x"]);
    }
}
