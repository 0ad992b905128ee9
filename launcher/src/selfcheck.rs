//! `mlm-launch --selfcheck`: the acceptance a node with several GPUs needs
//! before its first real job, in a minute or two on a tiny model it writes
//! itself (no network, no model download). Multi-rank NCCL, the overlapped
//! all-reduce across GPUs and bf16 communication can only be tried on such a
//! node, so this is where they are tried:
//!
//! 1. losses: N ranks against 1 rank with the summed batch, with
//!    `distributed.overlap` on and off and `distributed.comm_dtype` fp32 and
//!    bf16; the per-step training losses and gradient norms must agree
//!    (fp32: 1e-5 relative, bf16: [`BF16_TOLERANCE`], see [`BF16_WHY`]).
//! 2. dead peer: one worker is SIGKILLed once step 2 is logged; the others
//!    must stop by themselves within `distributed.timeout_s` + a margin, and
//!    the supervision names the killed rank.
//! 3. all-reduce: `mlm-comm-check` on N ranks, its per-rank JSON lines.
//!
//! Each check prints one line as it finishes; the last line is the verdict
//! (`mlm-launch selfcheck: PASS ...` or `FAIL ...`), exit status 0 or 1.
//! Everything runs under the launcher's own supervision and environment
//! contract ([`crate::worker_command`], [`supervise::watch_group`]); the jobs,
//! logs and metrics live in a temporary directory kept with `--keep`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::args::{self, Args, Nodes, Slot};
use crate::supervise::{self, describe, error_line, Exit, Outcome, Policy, Signals, Spec};
use crate::tiny_job::{self, Knobs, Logged, TinyJob};
use crate::{cpu_threads_per_worker, find_mlm, free_port, random_token, worker_command, Rendezvous};

/// Optimizer steps of each compared job.
pub const STEPS: usize = 6;
/// Blocks per rank per step; the 1-rank reference takes N times as many.
pub const BATCH: usize = 2;
/// fp32 communication: the N-rank job adds the same numbers in another order.
const FP32_TOLERANCE: f64 = 1e-5;
/// bf16 communication: see [`BF16_WHY`].
const BF16_TOLERANCE: f64 = 1e-2;
const BF16_WHY: &str = "bf16 communication rounds every summed gradient element to 8 significant bits (2^-9 = \
                        2e-3 relative; NCCL rounds at each of its N-1 ring steps): on 2 CPU ranks it moved the \
                        gradient norm by 1.6e-4 and the losses by 5e-6, so 1e-2 leaves room for 8 GPUs' roundings, \
                        while a lost or doubled rank's gradient moves the gradient norm by 1/N or more";
/// The dead-peer job: rank N-1 is killed once this step is logged, and the
/// others must stop within `distributed.timeout_s` + the margin.
const KILL_AFTER_STEP: u64 = 2;
const KILL_TIMEOUT_S: u64 = 10;
const KILL_MARGIN: Duration = Duration::from_secs(10);
/// `distributed.timeout_s` of the other jobs, and a deadline for any one job.
pub const TIMEOUT_S: u64 = 60;
const JOB_DEADLINE: Duration = Duration::from_secs(300);

/// Runs the selfcheck; returns the exit status (0 PASS, 1 FAIL, 128 + signal).
pub fn run(args: &Args, signals: &Signals) -> Result<i32> {
    refuse_job_flags(args)?;
    let slots = args::plan(args, args::visible_gpus())?;
    let mlm = args.mlm.clone().unwrap_or_else(find_mlm);
    let device = if slots[0] == Slot::Cpu { "cpu" } else { "cuda" };
    let tmp =
        tempfile::Builder::new().prefix("mlm-selfcheck-").tempdir().context("cannot create a temporary directory")?;
    let n = slots.len();
    say(format!(
        "mlm-launch selfcheck: {n} rank{} ({device}) against 1 rank with the summed batch, on a tiny BERT in {}{}",
        if n > 1 { "s" } else { "" },
        tmp.path().display(),
        if args.keep { " (kept: --keep)" } else { "" }
    ));
    let check = Selfcheck {
        job: TinyJob::write(tmp.path(), n, device)?,
        comm_check: comm_check_beside(&mlm),
        mlm,
        slots,
        device,
        args,
        signals,
        grace: Duration::from_secs_f64(args.grace_period.max(0.0)),
    };
    let result = check.all();
    if args.keep {
        let _kept = tmp.keep(); // the header line said where
    }
    match result {
        Ok(pass) => Ok(if pass { 0 } else { 1 }),
        Err(e) => match e.downcast_ref::<Interrupted>() {
            Some(Interrupted(signal)) => {
                eprintln!("mlm-launch: selfcheck stopped by signal {signal}; the workers were told and have exited");
                Ok(128 + signal)
            }
            // Still one verdict line, e.g. when `mlm` cannot be started.
            None => {
                say(format!("mlm-launch selfcheck: FAIL ({n} rank{}, {device}): {e:#}", if n > 1 { "s" } else { "" }));
                Ok(1)
            }
        },
    }
}

/// The flags of a real job have no meaning here: one line says which.
fn refuse_job_flags(args: &Args) -> Result<()> {
    if let Some(config) = &args.config {
        bail!(
            "--selfcheck runs its own tiny jobs and takes no CONFIG (got {}); give it only the device flags, e.g. \
             `mlm-launch --gpus 4 --selfcheck`",
            config.display()
        );
    }
    if !args.set.is_empty() {
        bail!("--selfcheck takes no --set (got {}): its jobs are fixed so that they compare", args.set.join(" "));
    }
    if args.nnodes > 1 || args.node_rank > 0 {
        bail!(
            "--selfcheck checks one node (got --nnodes {} --node-rank {}): run `mlm-launch --gpus N --selfcheck` on \
             each node",
            args.nnodes,
            args.node_rank
        );
    }
    if args.max_restarts > 0 {
        bail!("--selfcheck takes no --max-restarts: a failure is what it reports");
    }
    Ok(())
}

/// `mlm-comm-check` beside `mlm`, like `mlm` beside the launcher; else PATH's.
fn comm_check_beside(mlm: &Path) -> PathBuf {
    match mlm.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join("mlm-comm-check"),
        _ => PathBuf::from("mlm-comm-check"),
    }
}

/// A signal stopped the selfcheck (the workers were told).
#[derive(Debug)]
struct Interrupted(i32);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped by signal {}", self.0)
    }
}

impl std::error::Error for Interrupted {}

struct Selfcheck<'a> {
    job: TinyJob,
    mlm: PathBuf,
    comm_check: PathBuf,
    slots: Vec<Slot>,
    device: &'static str,
    args: &'a Args,
    signals: &'a Signals,
    grace: Duration,
}

/// A finished group.
struct Ran {
    outcome: Outcome,
    exits: Vec<Exit>,
    /// Killed at [`JOB_DEADLINE`].
    timed_out: bool,
    log: PathBuf,
}

impl Ran {
    fn ok(&self) -> bool {
        matches!(self.outcome, Outcome::Success) && !self.timed_out
    }

    /// Why it failed, in a few words, and where its log is.
    fn failure(&self) -> String {
        let why = match &self.outcome {
            _ if self.timed_out => format!("did not finish within {} s and was killed", JOB_DEADLINE.as_secs()),
            Outcome::Failed { local, status, tail } => match error_line(tail) {
                Some(cause) => format!("rank {local} {}: {cause}", describe(status)),
                None => format!("rank {local} {}", describe(status)),
            },
            _ => "failed".into(),
        };
        format!("{why} (log: {})", self.log.display())
    }
}

/// One finished check: whether it passed and its part of the verdict.
struct Verdict {
    ok: bool,
    summary: String,
}

impl Selfcheck<'_> {
    /// Every check in turn; true when all pass.
    fn all(&self) -> Result<bool> {
        let n = self.slots.len();
        let mut verdicts = Vec::new();
        // The jobs share one token store, prepared once, as the launcher does.
        let config = self.job.write_job("reference", &Knobs { batch: BATCH * n, ..Knobs::compared() })?;
        let prepare =
            self.group("prepare", &self.slots[..1], &self.mlm, &["prepare".into(), config], Duration::ZERO, |_| {})?;
        if prepare.ok() {
            verdicts.extend(self.losses()?);
            verdicts.push(self.dead_peer()?);
        } else {
            // The training checks need the data; the all-reduce does not.
            let line = format!("`mlm prepare` {}", prepare.failure());
            verdicts.push(self.report("prepare", false, line, Some("prepare failed: no training check ran".into())));
        }
        verdicts.push(self.all_reduce()?);
        let pass = verdicts.iter().all(|v| v.ok);
        let parts: Vec<&str> =
            verdicts.iter().filter(|v| (pass || !v.ok) && !v.summary.is_empty()).map(|v| v.summary.as_str()).collect();
        let note = if n == 1 { "; 1 rank: nothing multi-rank was tried (--gpus N or --nproc N)" } else { "" };
        say(format!(
            "mlm-launch selfcheck: {} ({n} rank{}, {}): {}{note}",
            if pass { "PASS" } else { "FAIL" },
            if n > 1 { "s" } else { "" },
            self.device,
            parts.join("; ")
        ));
        Ok(pass)
    }

    /// Prints a check's line; returns its verdict, which shows `summary`
    /// (when it has one) in the last line.
    fn report(&self, name: &str, ok: bool, line: String, summary: Option<String>) -> Verdict {
        say(format!("mlm-launch selfcheck: {name}: {} {line}", if ok { "ok:" } else { "FAIL:" }));
        let summary = summary.unwrap_or_else(|| if ok { String::new() } else { format!("{name} failed") });
        Verdict { ok, summary }
    }

    /// Runs `program argv` on `slots` with the launcher's environment
    /// contract, its output in `<dir>/<name>.log`. `hold` as in [`Policy`];
    /// `watch` is called at every poll with the workers' pids.
    fn group(
        &self,
        name: &str,
        slots: &[Slot],
        program: &Path,
        argv: &[String],
        hold: Duration,
        mut watch: impl FnMut(&[Option<u32>]),
    ) -> Result<Ran> {
        let nodes = Nodes { nnodes: 1, node_rank: 0, per_node: slots.len() };
        let port = match self.args.master_port {
            Some(p) => p,
            None => free_port(&self.args.master_addr)?,
        };
        let rendezvous = Rendezvous { addr: self.args.master_addr.clone(), port, token: Some(random_token()?) };
        let threads = cpu_threads_per_worker(slots.len());
        let log = self.job.dir.join(format!("{name}.log"));
        let specs = slots
            .iter()
            .enumerate()
            .map(|(local, slot)| {
                let mut command = worker_command(program, &nodes, local, slot, &rendezvous, threads);
                command.args(argv);
                Spec { label: format!("rank {local}"), command, log: Some(log.clone()) }
            })
            .collect();
        let start = Instant::now();
        let mut timed_out = false;
        let policy = Policy { grace: self.grace, save: self.grace, hold };
        let (outcome, exits) = supervise::watch_group(specs, self.signals, policy, |pids| {
            watch(pids);
            if !timed_out && start.elapsed() > JOB_DEADLINE {
                timed_out = true;
                for &pid in pids.iter().flatten() {
                    kill(-(pid as i32), libc::SIGKILL);
                }
            }
        })?;
        if let Outcome::Interrupted { signal } = outcome {
            return Err(Interrupted(signal).into());
        }
        Ok(Ran { outcome, exits, timed_out, log })
    }

    /// `mlm train` of the job `name` on `slots`.
    fn train(&self, name: &str, slots: &[Slot], knobs: &Knobs) -> Result<Ran> {
        let config = self.job.write_job(name, knobs)?;
        self.group(name, slots, &self.mlm, &["train".into(), config], Duration::ZERO, |_| {})
    }

    /// Check 1: the 1-rank reference, then the N-rank jobs against it.
    fn losses(&self) -> Result<Vec<Verdict>> {
        let n = self.slots.len();
        let reference = Knobs { batch: BATCH * n, ..Knobs::compared() };
        let ran = self.train("reference", &self.slots[..1], &reference)?;
        let want = tiny_job::logged(&self.job.out("reference"));
        let reference_ok = ran.ok() && want.len() == STEPS;
        let line = if reference_ok {
            let (first, last) = (want.values().next().expect("steps"), want.values().last().expect("steps"));
            format!("1 rank, batch {}, {STEPS} steps, loss {:.4} -> {:.4}", BATCH * n, first.loss, last.loss)
        } else if ran.ok() {
            format!("logged {} of {STEPS} steps (log: {})", want.len(), ran.log.display())
        } else {
            ran.failure()
        };
        let mut verdicts = vec![self.report("reference", reference_ok, line, None)];
        if !reference_ok {
            return Ok(verdicts);
        }
        if n == 1 {
            verdicts.push(self.report("losses", true, "skipped: one rank has nothing to compare".into(), None));
            return Ok(verdicts);
        }
        for bf16 in [false, true] {
            for overlap in [true, false] {
                let comm = if bf16 { "bf16" } else { "fp32" };
                let on = if overlap { "on" } else { "off" };
                let knobs = Knobs {
                    overlap,
                    bf16_comm: bf16,
                    seed: if self.args.selfcheck_break { 43 } else { 42 },
                    ..Knobs::compared()
                };
                let name = format!("losses-{comm}-overlap-{on}");
                let ran = self.train(&name, &self.slots, &knobs)?;
                let what = format!("losses, {comm} communication, overlap {on}");
                verdicts.push(self.compare(&what, &ran, &name, &want, bf16, overlap));
            }
        }
        Ok(verdicts)
    }

    /// The N-rank job `name` against the reference's steps `want`: the loss
    /// and the gradient norm (a lost, doubled or stale gradient shows there
    /// at once; Adam's update hides a gradient's scale from the loss).
    fn compare(
        &self,
        what: &str,
        ran: &Ran,
        name: &str,
        want: &BTreeMap<u64, Logged>,
        bf16: bool,
        overlap: bool,
    ) -> Verdict {
        let n = self.slots.len();
        // "losses fp32 overlap on" for the verdict.
        let short = what.replace(" communication", "").replace(',', "");
        if !ran.ok() {
            return self.report(what, false, ran.failure(), Some(format!("{short}: the {n}-rank job failed")));
        }
        let got = tiny_job::logged(&self.job.out(name));
        if got.keys().ne(want.keys()) {
            let line = format!("the {n}-rank job logged steps {:?}, the reference {:?}", got.keys(), want.keys());
            return self.report(what, false, line, Some(format!("{short}: steps differ")));
        }
        // The log says whether the sums really overlapped backward.
        let log = std::fs::read_to_string(&ran.log).unwrap_or_default();
        let overlapped = log.contains("overlapped with backward");
        if n > 1 && overlapped != overlap {
            let line = format!(
                "distributed.overlap = {overlap} but the log {} the overlapped all-reduce ({})",
                if overlapped { "shows" } else { "does not show" },
                ran.log.display()
            );
            return self.report(what, false, line, Some(format!("{short}: the log disagrees")));
        }
        let tolerance = if bf16 { BF16_TOLERANCE } else { FP32_TOLERANCE };
        let worst = |of: fn(&Logged) -> f64| {
            want.iter()
                .map(|(step, w)| (*step, relative(of(&got[step]), of(w)), of(&got[step]), of(w)))
                .fold((0, -1.0, 0.0, 0.0), |a, b| if b.1 > a.1 || b.1.is_nan() { b } else { a })
        };
        let (loss, norm) = (worst(|l| l.loss), worst(|l| l.grad_norm));
        let ok = loss.1 <= tolerance && norm.1 <= tolerance;
        let show = |(step, d, g, w): (u64, f64, f64, f64)| format!("{d:.1e} at step {step} ({g:.6} vs {w:.6})");
        // Why bf16's tolerance is what it is, said once (its first line).
        let why = if bf16 && overlap { format!("; {BF16_WHY}") } else { String::new() };
        let line = format!(
            "{n} ranks against 1 over {STEPS} steps, largest relative difference of the loss {}, of the gradient \
             norm {} (tolerance {tolerance:.0e}{why})",
            show(loss),
            show(norm)
        );
        let over = if ok { String::new() } else { format!(" > {tolerance:.0e}") };
        let summary = format!("{short} {:.1e}{over}", loss.1.max(norm.1));
        self.report(what, ok, line, Some(summary))
    }

    /// Check 2: rank N-1 is SIGKILLed once step [`KILL_AFTER_STEP`] is
    /// logged; the others must stop by themselves within the timeout and the
    /// margin, and the supervision must name the killed rank.
    fn dead_peer(&self) -> Result<Verdict> {
        let n = self.slots.len();
        let what = "dead peer";
        if n == 1 {
            return Ok(self.report(
                what,
                true,
                "skipped: one rank has no peer".into(),
                Some("dead peer skipped".into()),
            ));
        }
        let victim = n - 1;
        let knobs = Knobs { steps: 100_000, timeout_s: KILL_TIMEOUT_S, ..Knobs::compared() };
        let config = self.job.write_job("dead-peer", &knobs)?;
        let out = self.job.out("dead-peer");
        let limit = Duration::from_secs(KILL_TIMEOUT_S) + KILL_MARGIN;
        let mut killed: Option<Instant> = None;
        let ran = self.group("dead-peer", &self.slots, &self.mlm, &["train".into(), config], limit, |pids| {
            if killed.is_none() && tiny_job::last_step(&out) >= KILL_AFTER_STEP {
                if let Some(pid) = pids[victim] {
                    kill(pid as i32, libc::SIGKILL);
                    killed = Some(Instant::now());
                }
            }
        })?;
        let Some(killed) = killed else {
            let line = format!("training never reached step {KILL_AFTER_STEP}: {}", ran.failure());
            return Ok(self.report(what, false, line, Some("dead peer: training did not start".into())));
        };
        let named = match &ran.outcome {
            Outcome::Failed { local, status, .. } => format!("rank {local} {}", describe(status)),
            _ => "no failed rank".into(),
        };
        let names_victim = matches!(&ran.outcome, Outcome::Failed { local, status, .. }
            if *local == victim && std::os::unix::process::ExitStatusExt::signal(status) == Some(libc::SIGKILL));
        let others: Vec<(usize, &Exit)> = ran.exits.iter().enumerate().filter(|(r, _)| *r != victim).collect();
        let slowest = others.iter().map(|(_, e)| e.at.saturating_duration_since(killed)).max().unwrap_or_default();
        let stuck: Vec<String> = others.iter().filter(|(_, e)| e.signalled).map(|(r, _)| format!("rank {r}")).collect();
        let cause = others.iter().find_map(|(_, e)| error_line(&e.tail)).unwrap_or("no error line");
        let ok = names_victim && stuck.is_empty() && !ran.timed_out;
        let line = if !stuck.is_empty() {
            format!(
                "rank {victim} was SIGKILLed after step {KILL_AFTER_STEP}; {} did not stop by itself within {} s \
                 (distributed.timeout_s {KILL_TIMEOUT_S} + {} s) and had to be stopped (log: {})",
                stuck.join(", "),
                limit.as_secs(),
                KILL_MARGIN.as_secs(),
                ran.log.display()
            )
        } else {
            format!(
                "rank {victim} was SIGKILLed after step {KILL_AFTER_STEP}; the other rank{} stopped by {} within \
                 {:.1} s (limit {} s = distributed.timeout_s {KILL_TIMEOUT_S} + {} s), saying \"{cause}\"; the \
                 launcher names \"{named}\"{}",
                if others.len() > 1 { "s" } else { "" },
                if others.len() > 1 { "themselves" } else { "itself" },
                slowest.as_secs_f64(),
                limit.as_secs(),
                KILL_MARGIN.as_secs(),
                if names_victim { String::new() } else { format!(", not rank {victim}") }
            )
        };
        let summary = match ok {
            true => format!("dead peer: the others stopped in {:.1} s", slowest.as_secs_f64()),
            false if !stuck.is_empty() => {
                format!("dead peer: {} did not stop within {} s", stuck.join(", "), limit.as_secs())
            }
            false => format!("dead peer: the launcher named {named}"),
        };
        Ok(self.report(what, ok, line, Some(summary)))
    }

    /// Check 3: `mlm-comm-check` on every rank; its JSON lines.
    fn all_reduce(&self) -> Result<Verdict> {
        let n = self.slots.len();
        let what = "all-reduce";
        let (elems, iters) = if self.device == "cuda" { (1usize << 26, 20) } else { (1usize << 22, 5) };
        let argv: Vec<String> = [
            "--backend",
            "auto",
            "--device",
            self.device,
            "--elems",
            &elems.to_string(),
            "--iters",
            &iters.to_string(),
            "--timeout",
            &TIMEOUT_S.to_string(),
        ]
        .map(String::from)
        .into();
        let ran = match self.group("comm-check", &self.slots, &self.comm_check, &argv, Duration::ZERO, |_| {}) {
            Ok(ran) => ran,
            Err(e) if e.downcast_ref::<Interrupted>().is_some() => return Err(e),
            Err(e) => {
                let line = format!("{e:#} (mlm-comm-check is built and installed with mlm)");
                return Ok(self.report(what, false, line, Some("all-reduce: mlm-comm-check did not start".into())));
            }
        };
        let lines = tiny_job::json_lines(&std::fs::read_to_string(&ran.log).unwrap_or_default());
        let okay = lines.iter().filter(|l| l["ok"] == true).count();
        let busbw = lines.iter().filter_map(|l| l["busbw_mb_s"].as_f64()).fold(f64::INFINITY, f64::min);
        let secs = lines.iter().filter_map(|l| l["seconds_per_all_reduce"].as_f64()).fold(0.0, f64::max);
        let backend = lines.first().and_then(|l| l["backend"].as_str()).unwrap_or("?").to_string();
        let ok = ran.ok() && okay == n && lines.len() == n;
        let mib = (elems * 4) >> 20;
        let line = if ok {
            format!(
                "mlm-comm-check on {n} rank{} ({backend}): exact sums, same bits on every rank, broadcast and \
                 barrier ok; {mib} MiB f32 all-reduce in {secs:.4} s, bus bandwidth {busbw:.0} MB/s (slowest rank)",
                if n > 1 { "s" } else { "" }
            )
        } else if ran.ok() {
            format!("{okay} of {n} ranks report ok (log: {})", ran.log.display())
        } else {
            format!("mlm-comm-check {}", ran.failure())
        };
        let summary = match ok {
            true if n > 1 => format!("all-reduce {busbw:.0} MB/s ({backend})"),
            true => format!("all-reduce ok ({backend})"),
            false => "all-reduce failed".into(),
        };
        Ok(self.report(what, ok, line, Some(summary)))
    }
}

/// Prints a line on stdout; a closed stdout (`| head`) loses the line, not
/// the run, which still ends with its exit status.
fn say(line: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// |got - want| / |want|.
fn relative(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(1e-12)
}

/// kill(2): a pid, or a process group when negative.
fn kill(pid: i32, signal: i32) {
    // SAFETY: kill(2) on a worker this launcher started and has not reaped.
    unsafe {
        libc::kill(pid, signal);
    }
}
