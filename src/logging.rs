//! Logs to stderr through `tracing`, and errors as one line each.
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Human-readable logs on stderr; `RUST_LOG` filters (default: info on the
/// first worker, warnings only on the others, whose progress is the same).
pub fn init() {
    let default = if worker_rank() > 0 { "warn" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// This process's rank as set by mlm-launch, mpirun or srun (0 when alone).
fn worker_rank() -> usize {
    ["RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(0)
}

/// An error and its causes on one line. libtorch's messages carry a C++ stack
/// trace after their first line: only that first line is kept.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        let first = msg.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").to_string();
        if !parts.iter().any(|p| p.contains(&first)) {
            parts.push(first);
        }
    }
    parts.join(": ")
}

/// Panics are bugs, not user errors: report them in one line without a backtrace
/// unless RUST_BACKTRACE asks for one.
pub fn quiet_panics() {
    if std::env::var_os("RUST_BACKTRACE").is_some() {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let first = msg.lines().next().unwrap_or("");
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("error: internal error{at}: {first} (please report it)");
    }));
}
