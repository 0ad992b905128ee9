//! Folders that a crash never leaves half-written: the one atomic swap used by
//! checkpoints, `best/` and the prepared token store, the clean-up after an
//! interrupted swap, and file checksums.
//!
//! Nothing here follows a symbolic link out of the folder it writes: every file
//! `mlm` writes inside an output folder or a token store is opened through
//! [`open_run_file`] (`O_NOFOLLOW`), a link where a run file or folder should be
//! is refused ([`refuse_link`]), and deleting removes a link itself, never its
//! target ([`remove_tree`]). The output folder or store folder itself may be a
//! link (to scratch space): only what is inside it is checked.
//!
//! A folder `dir` is built in the hidden sibling `.<name>.tmp-<pid>`, fsynced,
//! and swapped in by two renames (the old content goes to `.<name>.old-<pid>`
//! for the moment between them). [`recover`] finishes or undoes an interrupted
//! swap; it must run only while the caller holds the lock of the folder's
//! owner (see [`crate::lock`]), so it never touches another live writer's files.
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
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
    refuse_link(dir)?;
    let exists = match fs::symlink_metadata(dir) {
        Ok(meta) if !meta.is_dir() => bail!("{} exists and is not a folder: it will not be replaced", dir.display()),
        Ok(_) => true,
        Err(_) => false,
    };
    let name = name_of(dir)?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}"));
    let old = parent.join(format!(".{name}.old-{pid}"));
    // Our own hidden names: whatever is there (a leftover, or a link) goes,
    // a link without its target.
    remove_tree(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    if let Err(e) = fill(&tmp).and_then(|_| sync_tree(&tmp)) {
        let _ = remove_tree(&tmp);
        return Err(e);
    }
    if exists {
        let _ = remove_tree(&old);
        if let Err(e) = fs::rename(dir, &old) {
            let _ = remove_tree(&tmp);
            return Err(e).with_context(|| format!("cannot move aside {}", dir.display()));
        }
    }
    if let Err(e) = fs::rename(&tmp, dir) {
        if exists {
            let _ = fs::rename(&old, dir);
        }
        let _ = remove_tree(&tmp);
        return Err(e).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()));
    }
    sync_dir(&parent)?;
    if exists {
        if let Err(e) = remove_tree(&old) {
            tracing::warn!("cannot remove the replaced {}: {e}", old.display());
        }
    }
    Ok(())
}

/// Cleans up interrupted swaps and deletions of the folders in `parent` whose
/// names `owns` accepts: a folder moved aside but not yet replaced is put back,
/// unfinished temporary folders and half-deleted ones are removed. Also removes the visible `<name>.tmp-<pid>`
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
        let split = [".old-", ".tmp-", ".del-"].into_iter().find_map(|s| rest.rsplit_once(s).map(|(t, p)| (s, t, p)));
        let Some((suffix, target, pid)) = split else { continue };
        let moved_aside = suffix == ".old-";
        if !owns(target) || !is_pid(pid) {
            continue;
        }
        if writer_alive(pid) {
            // Another live process of ours made it (a job let in beside this
            // one): its write in progress is not a leftover.
            tracing::warn!("leaving {}: PID {pid}, which is writing it, is still running", p.display());
            continue;
        }
        let Ok(meta) = fs::symlink_metadata(&p) else { continue };
        if meta.file_type().is_symlink() {
            // Never a folder of ours: the link goes, its target stays.
            tracing::warn!("removing {}, a symbolic link where mlm keeps its temporary folders", p.display());
            fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        } else if !meta.is_dir() {
            continue;
        } else if moved_aside {
            let dest = parent.join(target);
            if fs::symlink_metadata(&dest).is_ok() {
                fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
            } else {
                tracing::warn!("restoring {} interrupted while being replaced", dest.display());
                fs::rename(&p, &dest).with_context(|| format!("cannot restore {}", dest.display()))?;
            }
        } else {
            tracing::info!("removing unfinished {}", p.display());
            fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    Ok(())
}

fn is_pid(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `pid` is another live process running the same program as this
/// one (`/proc/<pid>/exe`: the same file, or the same path where the program
/// was replaced since): a temporary folder named after it may be a write in
/// progress. A PID reused by an unrelated program is not.
fn writer_alive(pid: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    if pid == std::process::id().to_string() {
        return false;
    }
    let exe = |p: &str| format!("/proc/{p}/exe");
    let path = |p: &str| {
        let link = fs::read_link(exe(p)).ok()?.to_string_lossy().into_owned();
        Some(link.trim_end_matches(" (deleted)").to_string())
    };
    let file = |p: &str| fs::metadata(exe(p)).ok().map(|m| (m.dev(), m.ino()));
    let same_path = matches!((path(pid), path("self")), (Some(a), Some(b)) if a == b);
    let same_file = matches!((file(pid), file("self")), (Some(a), Some(b)) if a == b);
    same_path || same_file
}

/// Deletes the folder `dir` in one step as others see it: renamed to the
/// hidden `.<name>.del-<pid>`, then removed, so that a crash never leaves a
/// half-deleted folder under its name ([`recover`] removes the rest). A link
/// there is removed itself, never its target.
pub fn remove_dir_atomically(dir: &Path) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Ok(m) if m.is_dir() => {}
        _ => return remove_tree(dir).with_context(|| format!("cannot remove {}", dir.display())),
    }
    let doomed = parent_of(dir).join(format!(".{}.del-{}", name_of(dir)?, std::process::id()));
    remove_tree(&doomed).with_context(|| format!("cannot remove {}", doomed.display()))?;
    fs::rename(dir, &doomed).with_context(|| format!("cannot remove {}", dir.display()))?;
    fs::remove_dir_all(&doomed).with_context(|| format!("cannot remove {}", doomed.display()))
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

/// Opens `path`, a file that `mlm` writes inside an output folder or a token
/// store, as `options` say, without following a symbolic link in its last
/// component (`O_NOFOLLOW`): a link there is refused in one line naming it
/// ([`link_error`]), so nothing is ever written, truncated or appended through
/// it. The folders above `path` may be links.
pub fn open_run_file(path: &Path, options: &OpenOptions) -> Result<File> {
    let mut options = options.clone();
    options.custom_flags(libc::O_NOFOLLOW);
    match options.open(path) {
        Ok(f) => Ok(f),
        Err(_) if is_link(path) => Err(link_error(path)),
        Err(e) => Err(e).with_context(|| format!("cannot open {} for writing", path.display())),
    }
}

/// [`open_run_file`] to write `path` from the start: created, or truncated.
pub fn create_run_file(path: &Path) -> Result<File> {
    open_run_file(path, OpenOptions::new().write(true).create(true).truncate(true))
}

/// Writes `bytes` to the run file `path` ([`create_run_file`]).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    create_run_file(path)?.write_all(bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Replaces the run file `path` with `bytes` atomically: written and synced
/// in the hidden sibling `.<name>.tmp-<pid>`, then renamed over it. A link at
/// `path` is refused, not replaced.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    refuse_link(path)?;
    let parent = parent_of(path);
    let tmp = parent.join(format!(".{}.tmp-{}", name_of(path)?, std::process::id()));
    remove_tree(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    let written = open_run_file(&tmp, OpenOptions::new().write(true).create_new(true)).and_then(|mut f| {
        f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("cannot write {}", tmp.display()))
    });
    if let Err(e) = written.and_then(|_| {
        fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    }) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(&parent)
}

/// Copies the file `from` (read as it is, through links) to the run file `to`.
pub fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let mut src = File::open(from).with_context(|| format!("cannot copy {}", from.display()))?;
    let mut dst = create_run_file(to)?;
    std::io::copy(&mut src, &mut dst).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Writes `value` as pretty JSON to the run file `path`.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_file(path, serde_json::to_string_pretty(value)?.as_bytes())
}

/// Whether `path` itself is a symbolic link.
pub fn is_link(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Refuses `path` when it is a symbolic link: a file or folder that `mlm`
/// writes into, replaces or deletes must be its own, not a link out of the
/// folder. Nothing there (or missing) is fine.
pub fn refuse_link(path: &Path) -> Result<()> {
    if is_link(path) {
        return Err(link_error(path));
    }
    Ok(())
}

/// The one-line refusal of a link where a run file or folder should be.
pub fn link_error(path: &Path) -> anyhow::Error {
    let target = fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_else(|_| "?".into());
    anyhow::anyhow!(
        "{} is a symbolic link (to {target}), not a file of this run: mlm never writes through a link inside an \
         output folder or token store; delete the link (its target stays as it is) or use another folder (the \
         output or store folder itself may be a link)",
        path.display()
    )
}

/// Deletes `path` without following a link: a folder with its content, a file,
/// or a link itself (never its target). Nothing there is fine.
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
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
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_file() {
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
        for d in [
            ".best.old-12",
            ".checkpoint-4.tmp-9",
            ".checkpoint-2.del-9",
            "data.tmp-77",
            ".data.old-5",
            "data",
            "keep.tmp-x",
        ] {
            fs::create_dir(p.join(d)).unwrap();
        }
        recover(p, |name| name == "best" || name.starts_with("checkpoint-") || name == "data").unwrap();
        assert_eq!(names(p), vec!["best", "data", "keep.tmp-x"]);
    }

    /// Not a test: the live process of this program that the next one needs.
    #[test]
    #[ignore]
    fn helper_lives_until_its_stdin_closes() {
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    }

    #[test]
    fn recover_leaves_the_folders_of_another_live_writer() {
        use std::process::{Command, Stdio};
        let mut other = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "durable::tests::helper_lives_until_its_stdin_closes"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path();
        let live = format!(".checkpoint-4.tmp-{}", other.id());
        let own = format!(".checkpoint-6.tmp-{}", std::process::id());
        for d in [live.as_str(), own.as_str(), "checkpoint-2"] {
            fs::create_dir(p.join(d)).unwrap();
        }
        recover(p, |name| name.starts_with("checkpoint-")).unwrap();
        drop(other.stdin.take());
        other.wait().unwrap();
        assert_eq!(names(p), vec![live.clone(), "checkpoint-2".to_string()]);
        // Once that writer is gone, its folder is a leftover.
        recover(p, |name| name.starts_with("checkpoint-")).unwrap();
        assert_eq!(names(p), vec!["checkpoint-2"]);
    }

    #[test]
    fn a_link_where_a_run_file_should_be_is_refused_and_its_target_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside.txt");
        fs::write(&outside, "precious").unwrap();
        let run = tmp.path().join("run");
        fs::create_dir(&run).unwrap();
        let link = run.join("metrics.jsonl");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let append = OpenOptions::new().append(true).create(true).clone();
        for e in [
            create_run_file(&link).unwrap_err(),
            open_run_file(&link, &append).unwrap_err(),
            write_file_atomically(&link, b"x").unwrap_err(),
            write_json(&link, &1).unwrap_err(),
        ] {
            let e = e.to_string();
            assert!(e.contains("metrics.jsonl is a symbolic link") && e.contains("outside.txt"), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        assert_eq!(fs::read_to_string(&outside).unwrap(), "precious");
        // A folder that is a link is not replaced either, and its target keeps its files.
        let dir_link = run.join("checkpoint-4");
        std::os::unix::fs::symlink(tmp.path(), &dir_link).unwrap();
        let e = write_dir_atomically(&dir_link, |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("checkpoint-4 is a symbolic link"), "{e}");
        // Deleting removes the link, never its target.
        remove_tree(&dir_link).unwrap();
        remove_tree(&link).unwrap();
        assert_eq!(names(&run), Vec::<String>::new());
        assert_eq!(fs::read_to_string(&outside).unwrap(), "precious");
    }

    #[test]
    fn a_file_is_replaced_atomically_and_a_linked_parent_folder_is_fine() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("scratch");
        fs::create_dir(&real).unwrap();
        let out = tmp.path().join("out");
        std::os::unix::fs::symlink(&real, &out).unwrap();
        write_file_atomically(&out.join("run.json"), b"1").unwrap();
        write_file_atomically(&out.join("run.json"), b"2").unwrap();
        assert_eq!(fs::read_to_string(real.join("run.json")).unwrap(), "2");
        write_dir_atomically(&out.join("best"), |t| write_file(&t.join("a"), b"x")).unwrap();
        assert_eq!(names(&real), vec!["best", "run.json"]);
    }

    #[test]
    fn recover_removes_a_link_in_place_of_a_temporary_folder_but_not_its_target() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("elsewhere");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), "x").unwrap();
        let out = tmp.path().join("out");
        fs::create_dir(&out).unwrap();
        std::os::unix::fs::symlink(&target, out.join(".best.old-7")).unwrap();
        std::os::unix::fs::symlink(&target, out.join(".checkpoint-2.tmp-7")).unwrap();
        recover(&out, |n| n == "best" || n.starts_with("checkpoint-")).unwrap();
        assert_eq!(names(&out), Vec::<String>::new());
        assert_eq!(names(&target), vec!["keep"]);
    }
}
