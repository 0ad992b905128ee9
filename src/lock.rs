//! Locks on the folders a job writes, so that two jobs never mix their files.
//!
//! A lock is `flock(2)` on a small file: the kernel drops it when its holder
//! exits, however it exits, so a killed job never leaves a stale lock behind
//! and its resume starts at once. An exclusive holder writes its PID into the
//! file so that the job it blocks can name it. A lock file that is a symbolic
//! link is refused, never opened through (its target would be locked and
//! truncated). `docs/checkpoints.md` lists the locks and who takes them.
//!
//! A lock is only as good as its file: a lock taken on a file that was then
//! deleted or replaced locks nothing that others see. So a taker checks, once
//! it holds the lock, that the path still names the file it locked (and tries
//! again otherwise); the output folder is also locked through the folder
//! itself, which deleting `.lock` does not release, and the holder checks its
//! file at every save ([`Lock::check`]; what guards the folder where the
//! filesystem cannot lock a folder, as NFS). A reader of a token store on a read-only filesystem,
//! where no lock file can be made and nobody can rebuild the store, reads it
//! without a lock ([`Lock::shared`]).
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct Lock {
    /// `None`: a shared lock on a read-only filesystem, where no lock file
    /// exists (nobody can write there either).
    file: Option<File>,
    path: PathBuf,
    /// The locked folder itself (the output folder's lock), where the
    /// filesystem locks folders.
    _dir: Option<File>,
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub enum Busy {
    /// Another process holds it; its PID when it wrote one.
    Held(Option<u32>),
}

/// How often a lock file that keeps being replaced under a taker is tried.
const ATTEMPTS: usize = 10;

impl Lock {
    /// Takes `path` exclusively without waiting (creating the file), and writes
    /// this process's PID into it.
    pub fn exclusive(path: &Path) -> Result<std::result::Result<Self, Busy>> {
        let Some(mut file) = take(path, libc::LOCK_EX, false)? else {
            let mut file = open(path)?;
            return Ok(Err(Busy::Held(holder(&mut file))));
        };
        write_pid(&mut file);
        Ok(Ok(Self { file: Some(file), path: path.to_path_buf(), _dir: None }))
    }

    /// Takes `path` shared without waiting: several shared holders may read
    /// together while no exclusive holder writes. Where the lock file cannot
    /// be made because its folder is read-only (a complete store on a
    /// read-only filesystem), an existing one is locked read-only, and without
    /// one the lock is empty ([`Lock::is_held`] false): nobody can rebuild
    /// what is there.
    pub fn shared(path: &Path) -> Result<std::result::Result<Self, Busy>> {
        match take(path, libc::LOCK_SH, true) {
            Ok(Some(file)) => Ok(Ok(Self { file: Some(file), path: path.to_path_buf(), _dir: None })),
            Ok(None) => {
                let mut file = open(path)?;
                Ok(Err(Busy::Held(holder(&mut file))))
            }
            Err(e) if read_only(&e) && !path.exists() => {
                Ok(Ok(Self { file: None, path: path.to_path_buf(), _dir: None }))
            }
            Err(e) => Err(e),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a lock is held (false for a reader on a read-only filesystem).
    pub fn is_held(&self) -> bool {
        self.file.is_some()
    }

    /// Checks that the lock still guards its path: that the path names the
    /// file this holder locked. A lock file deleted under a running job is made
    /// again and locked (so that a later job is refused); one that another job
    /// has made and locked meanwhile means two jobs now write here: an error
    /// naming it, so that this job stops before writing more.
    pub fn check(&mut self) -> Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        if same_file(file, &self.path) {
            return Ok(());
        }
        match Lock::exclusive(&self.path)? {
            Ok(mut new) => {
                tracing::warn!("{} was deleted or replaced while this job ran: locked again", self.path.display());
                self.file = new.file.take();
                Ok(())
            }
            Err(busy) => bail!(
                "{} was deleted while this job ran and another job ({}) has taken it since: stopping so that the \
                 two jobs' files do not mix; let one job run in this folder",
                self.path.display(),
                busy.holder()
            ),
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some(file) = &self.file {
            // SAFETY: the descriptor is open for as long as `self.file` lives.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        }
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
    let lock_file = out.join(".lock");
    // The folder first: deleting `.lock` does not release it.
    let dir = match lock_dir(out)? {
        Ok(dir) => dir,
        Err(()) => {
            let held = std::fs::read_to_string(&lock_file).ok().and_then(|s| s.trim().parse().ok());
            return Err(in_use(out, &Busy::Held(held)));
        }
    };
    match Lock::exclusive(&lock_file)? {
        Ok(mut l) => {
            l._dir = dir;
            Ok(l)
        }
        Err(busy) => Err(in_use(out, &busy)),
    }
}

fn in_use(out: &Path, busy: &Busy) -> anyhow::Error {
    anyhow::anyhow!(
        "training.output_dir {} is in use by another mlm job ({}): wait for it to end, or choose another \
         training.output_dir",
        out.display(),
        busy.holder()
    )
}

/// Locks the folder `dir` itself, exclusively, without waiting: `Ok(None)`
/// where its filesystem cannot lock a folder (NFS locks only files open for
/// writing), `Err(())` when another process holds it.
fn lock_dir(dir: &Path) -> Result<std::result::Result<Option<File>, ()>> {
    let file = File::open(dir).with_context(|| format!("cannot open output directory {}", dir.display()))?;
    loop {
        // SAFETY: a valid open descriptor; flock has no memory effects.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Ok(Some(file)));
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(Err(())),
            Some(libc::EINTR) => continue,
            _ => return Ok(Ok(None)),
        }
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

/// Opens `path` (for reading only, when `read_only_ok` and its folder is
/// read-only) and locks it with `op` without waiting: `None` when another
/// holder blocks it. Once locked, the path must still name the locked file (a
/// lock on a file deleted or replaced meanwhile guards nothing): else again.
fn take(path: &Path, op: libc::c_int, read_only_ok: bool) -> Result<Option<File>> {
    for _ in 0..ATTEMPTS {
        let file = match open(path) {
            Ok(f) => f,
            Err(e) if read_only_ok && read_only(&e) => {
                let mut o = OpenOptions::new();
                o.read(true).custom_flags(libc::O_NOFOLLOW);
                o.open(path).map_err(|_| e)?
            }
            Err(e) => return Err(e),
        };
        if !try_flock(&file, op).with_context(|| format!("cannot lock {}", path.display()))? {
            return Ok(None);
        }
        if same_file(&file, path) {
            return Ok(Some(file));
        }
    }
    bail!("cannot lock {}: the file keeps being deleted or replaced by another process", path.display())
}

/// Whether `path` (not followed) names the open `file`.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether `e` says that a file could not be made for lack of write access
/// (a read-only filesystem or folder).
fn read_only(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| matches!(io.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)))
}

fn write_pid(file: &mut File) {
    file.set_len(0).and_then(|_| file.seek(SeekFrom::Start(0))).ok();
    let _ = writeln!(file, "{}", std::process::id());
    let _ = file.flush();
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
    fn deleting_the_lock_file_under_its_holder_lets_no_second_job_in() {
        let tmp = tempfile::tempdir().unwrap();
        let mut held = lock_output_dir(tmp.path()).unwrap();
        std::fs::remove_file(tmp.path().join(".lock")).unwrap();
        let e = lock_output_dir(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("in use by another mlm job"), "{e}");
        // The holder makes its file again at its next check, and holds it.
        held.check().unwrap();
        assert!(Lock::exclusive(&tmp.path().join(".lock")).unwrap().is_err());
        // A file that another holder made and locked meanwhile: two jobs, told.
        std::fs::remove_file(tmp.path().join(".lock")).unwrap();
        let _other = Lock::exclusive(&tmp.path().join(".lock")).unwrap().unwrap();
        let e = held.check().unwrap_err().to_string();
        assert!(e.contains(".lock was deleted while this job ran") && e.contains("PID"), "{e}");
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
