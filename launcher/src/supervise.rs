//! Runs a group of worker processes: prefixes and forwards their output,
//! forwards SIGINT/SIGTERM, and stops the whole group when one worker fails.
//!
//! Every worker is the leader of its own process group (signals reach its
//! children too, and a Ctrl-C on the terminal reaches only the launcher, which
//! forwards it once) and gets `PR_SET_PDEATHSIG = SIGKILL`, so that a launcher
//! killed with SIGKILL leaves no orphan behind.
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Lines of a failed worker shown in the launcher's error.
pub const TAIL_LINES: usize = 20;

/// SIGINT/SIGTERM received by the launcher (0: none yet).
#[derive(Clone)]
pub struct Signals(Arc<AtomicUsize>);

impl Signals {
    pub fn install() -> Result<Self> {
        let flag = Arc::new(AtomicUsize::new(0));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
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
}

/// One process to run.
pub struct Spec {
    pub label: String,
    pub command: Command,
}

struct Running {
    label: String,
    child: Child,
    status: Option<ExitStatus>,
    tail: Arc<Mutex<VecDeque<String>>>,
    forwarders: Vec<JoinHandle<()>>,
}

/// Runs the processes of `specs` until all exit, stopping all on the first
/// failure or on a signal. `grace` separates SIGTERM from SIGKILL.
pub fn run_group(specs: Vec<Spec>, signals: &Signals, grace: Duration) -> Result<Outcome> {
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
    let mut failed: Option<usize> = None;
    let mut interrupted: Option<i32> = None;
    let mut kill_at: Option<Instant> = None;
    loop {
        if let Some(sig) = signals.take() {
            interrupted.get_or_insert(sig);
            for p in procs.iter().filter(|p| p.status.is_none()) {
                signal_group(&p.child, sig);
            }
            kill_at.get_or_insert(Instant::now() + grace);
        }
        for (local, p) in procs.iter_mut().enumerate() {
            if p.status.is_none() {
                if let Some(st) = p.child.try_wait()? {
                    p.status = Some(st);
                    if !st.success() && failed.is_none() && interrupted.is_none() {
                        failed = Some(local);
                    }
                }
            }
        }
        if failed.is_some() && kill_at.is_none() {
            for p in procs.iter().filter(|p| p.status.is_none()) {
                signal_group(&p.child, libc::SIGTERM);
            }
            kill_at = Some(Instant::now() + grace);
        }
        if procs.iter().all(|p| p.status.is_some()) {
            break;
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            for p in procs.iter().filter(|p| p.status.is_none()) {
                eprintln!("mlm-launch: {} did not stop within {:.0?}; killing it", p.label, grace);
                signal_group(&p.child, libc::SIGKILL);
            }
            kill_at = Some(Instant::now() + Duration::from_secs(3600));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in &mut procs {
        // The group is dead; its children too, so the pipes close. Never wait long.
        finish_forwarders(&mut p.forwarders, Duration::from_secs(2));
    }
    if let Some(signal) = interrupted {
        return Ok(Outcome::Interrupted { signal });
    }
    if let Some(local) = failed {
        let p = &procs[local];
        let tail = p.tail.lock().expect("tail lock").iter().cloned().collect();
        return Ok(Outcome::Failed { local, status: p.status.expect("exited"), tail });
    }
    Ok(Outcome::Success)
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
    let program = spec.command.get_program().to_string_lossy().into_owned();
    let mut child = spec.command.spawn().with_context(|| format!("cannot start {program} for {}", spec.label))?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let prefix = format!("[{}] ", spec.label);
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let forwarders = vec![forward(out, prefix.clone(), tail.clone(), false), forward(err, prefix, tail.clone(), true)];
    Ok(Running { label: spec.label, child, status: None, tail, forwarders })
}

/// Copies `from` line by line to our stdout or stderr with `prefix`, keeping
/// the last [`TAIL_LINES`] lines.
fn forward(
    from: impl Read + Send + 'static,
    prefix: String,
    tail: Arc<Mutex<VecDeque<String>>>,
    to_stderr: bool,
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
            let _ = if to_stderr {
                std::io::stderr().lock().write_all(text.as_bytes())
            } else {
                std::io::stdout().lock().write_all(text.as_bytes())
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
        libc::SIGKILL => "SIGKILL; out of memory?",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        _ => "signal",
    }
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
