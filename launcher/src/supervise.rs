//! Runs a group of worker processes: prefixes and forwards their output,
//! forwards SIGINT/SIGTERM/SIGUSR1/SIGUSR2, and stops the whole group when one
//! worker fails. Workers that exit with [`REQUEUE_EXIT_CODE`] saved a
//! checkpoint on a signal and stopped: no failure, the group ends as requeued.
//!
//! Every worker is the leader of its own process group (signals reach its
//! children too, and a Ctrl-C on the terminal reaches only the launcher, which
//! forwards it once) and gets `PR_SET_PDEATHSIG = SIGKILL`, so that a launcher
//! killed with SIGKILL leaves no orphan behind.
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Lines of a failed worker shown in the launcher's error.
pub const TAIL_LINES: usize = 20;

/// The status of a worker that saved a checkpoint on a signal and stopped,
/// asking for the job to be requeued: `mlm`'s `train::preempt::REQUEUE_EXIT_CODE`
/// (sysexits.h's `EX_TEMPFAIL`), passed on as the launcher's own.
pub const REQUEUE_EXIT_CODE: i32 = 75;

/// The signals the launcher passes on to its workers: every one that
/// `checkpoint.save_signals` may name, so that none of them ends the launcher.
pub const FORWARDED: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2];

/// A signal of [`FORWARDED`] received by the launcher (0: none yet).
#[derive(Clone)]
pub struct Signals(Arc<AtomicUsize>);

impl Signals {
    pub fn install() -> Result<Self> {
        let flag = Arc::new(AtomicUsize::new(0));
        for sig in FORWARDED {
            signal_hook::flag::register_usize(sig, flag.clone(), sig as usize)?;
        }
        Ok(Self(flag))
    }

    /// The signal received since the last call, if any.
    fn take(&self) -> Option<i32> {
        match self.0.swap(0, Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }
}

/// How a group run ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every worker exited with status 0.
    Success,
    /// A worker (`local`: its index in the specs) failed first; the others
    /// were stopped.
    Failed { local: usize, status: ExitStatus, tail: Vec<String> },
    /// The launcher got a signal and passed it on; the workers are gone.
    Interrupted { signal: i32 },
    /// Every worker exited with [`REQUEUE_EXIT_CODE`]: rank 0 saved a
    /// checkpoint on a signal (`signal`: the launcher's, if it got one).
    Requeue { signal: Option<i32> },
}

/// One process to run.
pub struct Spec {
    pub label: String,
    pub command: Command,
    /// A file that takes the worker's prefixed lines instead of the
    /// launcher's stdout and stderr (the selfcheck keeps its jobs' logs).
    pub log: Option<PathBuf>,
}

/// How a group is supervised.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Between SIGTERM and SIGKILL when stopping workers.
    pub grace: Duration,
    /// Between a passed-on signal (or a first worker leaving with
    /// [`REQUEUE_EXIT_CODE`]) and SIGKILL: the time the workers have to
    /// finish their step and save.
    pub save: Duration,
    /// After the first failure, how long the other workers may take to exit
    /// by themselves before they are stopped. Zero for jobs; the selfcheck
    /// waits, to see that workers notice a dead peer on their own.
    pub hold: Duration,
}

/// How one worker of a finished group exited.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    pub at: Instant,
    /// The launcher had signalled it (stopping the group) before it exited.
    pub signalled: bool,
    /// Its last [`TAIL_LINES`] lines.
    pub tail: Vec<String>,
}

struct Running {
    label: String,
    child: Child,
    status: Option<(ExitStatus, Instant)>,
    signalled: bool,
    tail: Arc<Mutex<VecDeque<String>>>,
    forwarders: Vec<JoinHandle<()>>,
}

/// Runs the processes of `specs` until all exit, stopping all on the first
/// failure or on a signal. `grace` separates SIGTERM from SIGKILL, `save` a
/// passed-on signal from SIGKILL.
pub fn run_group(specs: Vec<Spec>, signals: &Signals, grace: Duration, save: Duration) -> Result<Outcome> {
    Ok(watch_group(specs, signals, Policy { grace, save, hold: Duration::ZERO }, |_| {})?.0)
}

/// [`run_group`] under `policy`, calling `tick` at every poll (every 20 ms)
/// with each worker's pid while it runs (`None` once it has exited); returns
/// how each worker exited too.
pub fn watch_group(
    specs: Vec<Spec>,
    signals: &Signals,
    policy: Policy,
    mut tick: impl FnMut(&[Option<u32>]),
) -> Result<(Outcome, Vec<Exit>)> {
    let grace = policy.grace;
    let mut procs: Vec<Running> = Vec::new();
    for spec in specs {
        match spawn(spec) {
            Ok(p) => procs.push(p),
            Err(e) => {
                stop_all(&mut procs, grace);
                return Err(e);
            }
        }
    }
    let mut failed: Option<(usize, Instant)> = None;
    let mut interrupted: Option<i32> = None;
    let mut kill_at: Option<(Instant, Duration)> = None;
    loop {
        if let Some(sig) = signals.take() {
            interrupted.get_or_insert(sig);
            for p in procs.iter_mut().filter(|p| p.status.is_none()) {
                signal_group(&p.child, sig);
                p.signalled = true;
            }
            kill_at.get_or_insert((Instant::now() + policy.save, policy.save));
        }
        // Of the workers found dead in one poll, name one a signal killed: the
        // others' errors usually follow from its death (a closed connection).
        let mut first: Option<(usize, bool)> = None;
        for (local, p) in procs.iter_mut().enumerate() {
            if p.status.is_none() {
                if let Some(st) = p.child.try_wait()? {
                    p.status = Some((st, Instant::now()));
                    if st.code() == Some(REQUEUE_EXIT_CODE) {
                        // The others agreed to stop at the same step: they follow.
                        kill_at.get_or_insert((Instant::now() + policy.save, policy.save));
                        continue;
                    }
                    let by_signal = st.signal().is_some();
                    if !st.success() && first.is_none_or(|(_, s)| by_signal && !s) {
                        first = Some((local, by_signal));
                    }
                }
            }
        }
        if failed.is_none() && interrupted.is_none() {
            failed = first.map(|(local, _)| (local, Instant::now()));
        }
        if let Some((_, at)) = failed {
            if kill_at.is_none() && Instant::now() >= at + policy.hold {
                for p in procs.iter_mut().filter(|p| p.status.is_none()) {
                    signal_group(&p.child, libc::SIGTERM);
                    p.signalled = true;
                }
                kill_at = Some((Instant::now() + grace, grace));
            }
        }
        if procs.iter().all(|p| p.status.is_some()) {
            break;
        }
        if let Some((at, bound)) = kill_at.filter(|(t, _)| Instant::now() >= *t) {
            for p in procs.iter_mut().filter(|p| p.status.is_none()) {
                eprintln!("mlm-launch: {} did not stop within {bound:.0?}; killing it", p.label);
                signal_group(&p.child, libc::SIGKILL);
                p.signalled = true;
            }
            kill_at = Some((at + Duration::from_secs(3600), bound));
        }
        let pids: Vec<Option<u32>> = procs.iter().map(|p| p.status.is_none().then(|| p.child.id())).collect();
        tick(&pids);
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in &mut procs {
        // The group is dead; its children too, so the pipes close. Never wait long.
        finish_forwarders(&mut p.forwarders, Duration::from_secs(2));
    }
    let exits: Vec<Exit> = procs
        .iter()
        .map(|p| {
            let (status, at) = p.status.expect("exited");
            let tail = p.tail.lock().expect("tail lock").iter().cloned().collect();
            Exit { status, at, signalled: p.signalled, tail }
        })
        .collect();
    let requeue = exits.iter().all(|e| e.status.code() == Some(REQUEUE_EXIT_CODE));
    let outcome = match (interrupted, failed) {
        _ if requeue => Outcome::Requeue { signal: interrupted },
        (Some(signal), _) => Outcome::Interrupted { signal },
        (None, Some((local, _))) => {
            Outcome::Failed { local, status: exits[local].status, tail: exits[local].tail.clone() }
        }
        (None, None) => Outcome::Success,
    };
    Ok((outcome, exits))
}

/// Where a worker's lines go.
#[derive(Clone)]
enum Sink {
    Stdout,
    Stderr,
    File(Arc<Mutex<std::fs::File>>),
}

fn spawn(mut spec: Spec) -> Result<Running> {
    let parent = std::process::id() as libc::pid_t;
    spec.command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    // SAFETY: prctl, getppid and _exit are async-signal-safe.
    unsafe {
        spec.command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (out_sink, err_sink) = match &spec.log {
        None => (Sink::Stdout, Sink::Stderr),
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {} for the output of {}", path.display(), spec.label))?;
            let file = Sink::File(Arc::new(Mutex::new(file)));
            (file.clone(), file)
        }
    };
    let program = spec.command.get_program().to_string_lossy().into_owned();
    let mut child = spec.command.spawn().with_context(|| format!("cannot start {program} for {}", spec.label))?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let prefix = format!("[{}] ", spec.label);
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let forwarders =
        vec![forward(out, prefix.clone(), tail.clone(), out_sink), forward(err, prefix, tail.clone(), err_sink)];
    Ok(Running { label: spec.label, child, status: None, signalled: false, tail, forwarders })
}

/// Copies `from` line by line to `sink` with `prefix`, keeping the last
/// [`TAIL_LINES`] lines.
fn forward(
    from: impl Read + Send + 'static,
    prefix: String,
    tail: Arc<Mutex<VecDeque<String>>>,
    sink: Sink,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\n', '\r']);
            let text = format!("{prefix}{line}\n");
            let _ = match &sink {
                Sink::Stdout => std::io::stdout().lock().write_all(text.as_bytes()),
                Sink::Stderr => std::io::stderr().lock().write_all(text.as_bytes()),
                Sink::File(f) => f.lock().expect("log lock").write_all(text.as_bytes()),
            };
            let mut t = tail.lock().expect("tail lock");
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line.to_string());
        }
    })
}

fn finish_forwarders(handles: &mut Vec<JoinHandle<()>>, within: Duration) {
    let until = Instant::now() + within;
    while handles.iter().any(|h| !h.is_finished()) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    for h in handles.drain(..) {
        if h.is_finished() {
            let _ = h.join();
        }
    }
}

/// Signals the worker's whole process group (it leads its own group).
fn signal_group(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a process group we created.
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), sig);
    }
}

/// Stops already started processes after a failed spawn.
fn stop_all(procs: &mut [Running], grace: Duration) {
    for p in procs.iter() {
        signal_group(&p.child, libc::SIGTERM);
    }
    let until = Instant::now() + grace;
    for p in procs.iter_mut() {
        while p.child.try_wait().ok().flatten().is_none() {
            if Instant::now() >= until {
                signal_group(&p.child, libc::SIGKILL);
                let _ = p.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The error a worker reported last (`mlm` prints one `error: ...` line), if
/// it printed one: the cause, where the other lines are context.
pub fn error_line(tail: &[String]) -> Option<&str> {
    tail.iter().rev().find_map(|l| l.strip_prefix("error: ")).map(str::trim)
}

/// "exited with status 3" / "was killed by signal 9 (SIGKILL)".
pub fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (_, Some(s)) => format!("was killed by signal {s} ({})", signal_name(s)),
        _ => "failed".into(),
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        _ => "signal",
    }
}

/// The kernel's out-of-memory kills in this process's memory cgroup (the
/// workers inherit it): `oom_kill` of cgroup v2's `memory.events` or v1's
/// `memory.oom_control`, read before a group starts and after a worker dies
/// of SIGKILL, so the launcher can say whether the OOM killer did it.
pub struct OomKills {
    file: Option<PathBuf>,
    before: Option<u64>,
}

impl OomKills {
    pub fn now() -> Self {
        let file = oom_counter_file(&std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default());
        let before = file.as_deref().and_then(read_oom_kills);
        Self { file, before }
    }

    /// Why a worker got SIGKILL, as far as the cgroup's counter tells.
    pub fn verdict(&self) -> String {
        let after = self.file.as_deref().and_then(read_oom_kills);
        match (&self.file, self.before, after) {
            (Some(f), Some(b), Some(a)) if a > b => format!(
                "by the kernel's out-of-memory killer (oom_kill {b} -> {a} in {}): lower training.micro_batch_size \
                 or the batch, or give the job more memory",
                f.display()
            ),
            (Some(f), Some(_), Some(_)) => format!(
                "not by the out-of-memory killer (no new oom_kill in {}): by a person, the scheduler (a time or \
                 memory limit?) or another process",
                f.display()
            ),
            _ => "by a person, the scheduler or the kernel's out-of-memory killer (no readable cgroup memory \
                  counter tells which)"
                .into(),
        }
    }
}

/// The first readable OOM counter file of this process's memory cgroup.
fn oom_counter_file(proc_cgroup: &str) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            // cgroup v2, mounted at /sys/fs/cgroup (unified) or beside v1.
            for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                candidates.push(Path::new(root).join(path).join("memory.events"));
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(Path::new("/sys/fs/cgroup/memory").join(path).join("memory.oom_control"));
        }
    }
    // In a container the cgroup's own folder is often mounted as the root.
    candidates.push(PathBuf::from("/sys/fs/cgroup/memory.events"));
    candidates.push(PathBuf::from("/sys/fs/cgroup/memory/memory.oom_control"));
    candidates.into_iter().find(|f| read_oom_kills(f).is_some())
}

fn read_oom_kills(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok())
}

/// Runs one process in the foreground (no prefix), forwarding signals; returns
/// its status and the last signal the launcher received and passed on.
pub fn run_one(mut cmd: Command, what: &str, signals: &Signals) -> Result<(ExitStatus, Option<i32>)> {
    let parent = std::process::id() as libc::pid_t;
    cmd.process_group(0);
    // SAFETY: as in `spawn`.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().with_context(|| format!("cannot start {program} for {what}"))?;
    let mut received = None;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((status, received.or_else(|| signals.take())));
        }
        if let Some(sig) = signals.take() {
            signal_group(&child, sig);
            received = Some(sig);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(label: &str, script: &str, log: &Path) -> Spec {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        Spec { label: label.into(), command, log: Some(log.to_path_buf()) }
    }

    #[test]
    fn the_killed_worker_is_named_before_the_peer_that_saw_it_die() {
        // Rank 0 reads a fifo until rank 1, which holds its write end, is
        // SIGKILLed: rank 0 then fails within a moment, mostly before the next
        // poll, which must still name rank 1. With a hold, rank 0 exits by
        // itself before anyone stops it.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let log = dir.path().join("log");
        let f = fifo.display();
        let specs = vec![
            sh("rank 0", &format!("cat '{f}' > /dev/null; echo 'error: rank 1 closed the connection'; exit 1"), &log),
            sh("rank 1", &format!("exec 3> '{f}'; sleep 0.2; kill -9 $$"), &log),
        ];
        let signals = Signals(Arc::new(AtomicUsize::new(0)));
        let policy =
            Policy { grace: Duration::from_secs(5), save: Duration::from_secs(5), hold: Duration::from_secs(10) };
        let (outcome, exits) = watch_group(specs, &signals, policy, |_| {}).unwrap();
        match outcome {
            Outcome::Failed { local, status, .. } => {
                assert_eq!((local, status.signal()), (1, Some(libc::SIGKILL)), "{outcome:?}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(exits[0].status.code(), Some(1));
        assert!(!exits[0].signalled, "rank 0 was stopped instead of exiting by itself");
        assert_eq!(error_line(&exits[0].tail), Some("rank 1 closed the connection"));
        assert!(std::fs::read_to_string(&log).unwrap().contains("[rank 0] error: rank 1 closed the connection\n"));
    }

    #[test]
    fn the_oom_counter_is_found_for_cgroup_v1_and_v2_paths() {
        // Whatever this machine has, the lookup never panics, and a file it
        // returns holds an oom_kill count.
        let here = oom_counter_file(&std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default());
        if let Some(f) = here {
            assert!(read_oom_kills(&f).is_some(), "{}", f.display());
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory.events");
        std::fs::write(&f, "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n").unwrap();
        assert_eq!(read_oom_kills(&f), Some(2));
        let unknown = OomKills { file: None, before: None };
        assert!(unknown.verdict().contains("no readable cgroup memory counter"));
        let counted = OomKills { file: Some(f.clone()), before: Some(1) };
        assert!(counted.verdict().contains("out-of-memory killer (oom_kill 1 -> 2"), "{}", counted.verdict());
        let same = OomKills { file: Some(f), before: Some(2) };
        assert!(same.verdict().starts_with("not by the out-of-memory killer"), "{}", same.verdict());
    }
}
