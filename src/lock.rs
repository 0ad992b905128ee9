//! Locks on the folders a job writes, so that two jobs never mix their files.
//!
//! A lock is `flock(2)` on a small file: the kernel drops it when its holder
//! exits, however it exits, so a killed job never leaves a stale lock behind
//! and its resume starts at once. An exclusive holder writes its PID into the
//! file so that the job it blocks can name it. A lock file that is a symbolic
//! link is refused, never opened through (its target would be locked and
//! truncated). `docs/checkpoints.md` lists the locks and who takes them.
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct Lock {
    file: File,
    path: PathBuf,
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub enum Busy {
    /// Another process holds it; its PID when it wrote one.
    Held(Option<u32>),
}

impl Lock {
    /// Takes `path` exclusively without waiting (creating the file), and writes
    /// this process's PID into it.
    pub fn exclusive(path: &Path) -> Result<std::result::Result<Self, Busy>> {
        let mut file = open(path)?;
        if !try_flock(&file, libc::LOCK_EX)? {
            return Ok(Err(Busy::Held(holder(&mut file))));
        }
        file.set_len(0).and_then(|_| file.seek(SeekFrom::Start(0))).ok();
        let _ = writeln!(file, "{}", std::process::id());
        let _ = file.flush();
        Ok(Ok(Self { file, path: path.to_path_buf() }))
    }

    /// Takes `path` shared without waiting: several shared holders may read
    /// together while no exclusive holder writes.
    pub fn shared(path: &Path) -> Result<std::result::Result<Self, Busy>> {
        let mut file = open(path)?;
        if !try_flock(&file, libc::LOCK_SH)? {
            return Ok(Err(Busy::Held(holder(&mut file))));
        }
        Ok(Ok(Self { file, path: path.to_path_buf() }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: the descriptor is open for as long as `self.file` lives.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl Busy {
    /// "PID 1234" or "another process".
    pub fn holder(&self) -> String {
        match self {
            Busy::Held(Some(pid)) => format!("PID {pid}"),
            Busy::Held(None) => "another process".into(),
        }
    }
}

/// The lock of a job's output directory, held by the job's writing process
/// (rank 0) from its start to its end.
pub fn lock_output_dir(out: &Path) -> Result<Lock> {
    if crate::durable::is_link(out) && !out.is_dir() {
        let target = std::fs::read_link(out).unwrap_or_default();
        bail!(
            "training.output_dir {} is a symbolic link to {}, which is not a folder: create that folder, or set \
             training.output_dir to a folder",
            out.display(),
            target.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create output directory {}", out.display()))?;
    match Lock::exclusive(&out.join(".lock"))? {
        Ok(l) => Ok(l),
        Err(busy) => bail!(
            "training.output_dir {} is in use by another mlm job ({}): wait for it to end, or choose another \
             training.output_dir",
            out.display(),
            busy.holder()
        ),
    }
}

/// The lock file of a prepared token store `dir`: `.<name>.lock` beside it.
pub fn store_lock_path(dir: &Path) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
    crate::durable::parent_of(dir).join(format!(".{name}.lock"))
}

fn open(path: &Path) -> Result<File> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
    }
    crate::durable::open_run_file(path, OpenOptions::new().read(true).write(true).create(true).truncate(false))
}

/// `flock(op | LOCK_NB)`: true when taken, false when another holder blocks it.
fn try_flock(file: &File, op: libc::c_int) -> Result<bool> {
    loop {
        // SAFETY: a valid open descriptor; flock has no memory effects.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e).context("cannot lock"),
        }
    }
}

fn holder(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_exclusive_holder_is_refused_with_the_first_ones_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x.lock");
        let first = Lock::exclusive(&p).unwrap().unwrap();
        match Lock::exclusive(&p).unwrap() {
            Err(b) => assert_eq!(b.holder(), format!("PID {}", std::process::id())),
            Ok(_) => panic!("taken twice"),
        }
        assert!(Lock::shared(&p).unwrap().is_err());
        drop(first);
        assert!(Lock::exclusive(&p).unwrap().is_ok());
    }

    #[test]
    fn shared_holders_coexist_and_block_writers() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x.lock");
        let a = Lock::shared(&p).unwrap().unwrap();
        let b = Lock::shared(&p).unwrap().unwrap();
        assert!(Lock::exclusive(&p).unwrap().is_err());
        drop((a, b));
        assert!(Lock::exclusive(&p).unwrap().is_ok());
    }

    #[test]
    fn output_dir_lock_names_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let _held = lock_output_dir(tmp.path()).unwrap();
        let e = lock_output_dir(tmp.path()).unwrap_err().to_string();
        assert!(e.contains(&tmp.path().display().to_string()) && e.contains("PID"), "{e}");
    }

    #[test]
    fn a_lock_file_that_is_a_link_is_refused_and_its_target_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("notes.txt");
        std::fs::write(&outside, "mine").unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::os::unix::fs::symlink(&outside, out.join(".lock")).unwrap();
        let e = format!("{:#}", lock_output_dir(&out).unwrap_err());
        assert!(e.contains(".lock is a symbolic link") && !e.contains('\n'), "{e}");
        assert!(Lock::shared(&out.join(".lock")).is_err());
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "mine");
    }

    #[test]
    fn an_output_dir_that_is_a_link_to_a_folder_is_locked_inside_it() {
        let tmp = tempfile::tempdir().unwrap();
        let scratch = tmp.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let out = tmp.path().join("out");
        std::os::unix::fs::symlink(&scratch, &out).unwrap();
        drop(lock_output_dir(&out).unwrap());
        assert!(scratch.join(".lock").is_file());
        std::fs::remove_dir_all(&scratch).unwrap();
        let e = lock_output_dir(&tmp.path().join("out")).unwrap_err().to_string();
        assert!(e.contains("is a symbolic link to") && e.contains("not a folder"), "{e}");
    }
}
