//! `mlm-launch`: prepares the data once, then runs the `mlm train` worker and
//! manages it: forwards its output, forwards Ctrl-C/SIGTERM, and exits with its
//! status. Processes only: no tensors, no model code here.
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "mlm-launch", version, about = "Launch an mlm training job")]
struct Args {
    /// The job's TOML config.
    config: PathBuf,
    /// Override a config key: section.key=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Device of the worker: auto (GPU when visible), cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// The `mlm` binary (default: next to this launcher, then PATH).
    #[arg(long)]
    mlm: Option<PathBuf>,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("mlm-launch: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if !["auto", "cpu", "cuda"].contains(&args.device.as_str()) {
        bail!("--device {:?}: expected auto, cpu or cuda", args.device);
    }
    let mlm = args.mlm.clone().unwrap_or_else(find_mlm);
    let mut overrides: Vec<String> = args.set.iter().flat_map(|s| ["--set".to_string(), s.clone()]).collect();
    if args.device != "auto" {
        overrides.extend(["--set".into(), format!("training.device={}", args.device)]);
    }
    // Prepare once before any worker starts, so workers only read the store.
    let status = supervise(Command::new(&mlm).arg("prepare").arg(&args.config).args(&overrides), &mlm)?;
    check("prepare", status)?;
    let mut worker = Command::new(&mlm);
    worker
        .arg("train")
        .arg(&args.config)
        .args(&overrides)
        .env("RANK", "0")
        .env("LOCAL_RANK", "0")
        .env("WORLD_SIZE", "1");
    let status = supervise(&mut worker, &mlm)?;
    check("worker rank 0", status)
}

/// Runs `cmd` to completion, forwarding SIGINT and SIGTERM to it.
fn supervise(cmd: &mut Command, mlm: &Path) -> Result<ExitStatus> {
    let signal = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_usize(sig, signal.clone(), sig as usize)?;
    }
    let mut child = cmd.spawn().with_context(|| format!("cannot start {}", mlm.display()))?;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let sig = signal.swap(0, Ordering::SeqCst);
        if sig != 0 {
            // SAFETY: kill(2) on our own child's pid with a valid signal number.
            unsafe { libc::kill(child.id() as i32, sig as i32) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn check(what: &str, status: ExitStatus) -> Result<()> {
    if status.success() {
        return Ok(());
    }
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => bail!("{what} exited with status {c}"),
        (_, Some(s)) => bail!("{what} was killed by signal {s}"),
        _ => bail!("{what} failed"),
    }
}

/// `mlm` next to this executable, else from PATH.
fn find_mlm() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("mlm")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("mlm"))
}
