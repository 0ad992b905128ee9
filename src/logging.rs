//! Logs to stderr through `tracing`, and errors as one line each.
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Human-readable logs on stderr; `RUST_LOG` filters (default: info on the
/// first worker, warnings only on the others, whose progress is the same).
pub fn init() {
    let default = if worker_rank() > 0 { "warn" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
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
        let first = first_line(&cause.to_string());
        if !parts.iter().any(|p| p.contains(&first)) {
            parts.push(first);
        }
    }
    parts.join(": ")
}

/// The first non-empty line of a message (libtorch appends a C++ stack trace).
pub fn first_line(msg: &str) -> String {
    msg.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").to_string()
}

/// Whether a panic message is libtorch (or CUDA) failing to allocate memory:
/// tch's infallible wrappers panic where libtorch throws.
pub fn is_out_of_memory(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("can't allocate memory") || m.contains("cannot allocate memory")
}

static PANIC_WAS_OOM: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a panic reported by [`quiet_panics`]'s hook was an allocation failure.
pub fn panic_was_out_of_memory() -> bool {
    PANIC_WAS_OOM.load(std::sync::atomic::Ordering::Relaxed)
}

/// Panics get one line, and a backtrace only when RUST_BACKTRACE asks for one:
/// an allocation failure (a user's too-large batch or model) as an out-of-memory
/// error with what to change, anything else as an internal error to report.
pub fn quiet_panics() {
    let verbose = std::env::var_os("RUST_BACKTRACE").is_some();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if verbose {
            default_hook(info);
        }
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if is_out_of_memory(&msg) {
            PANIC_WAS_OOM.store(true, std::sync::atomic::Ordering::Relaxed);
            let line = msg.lines().map(str::trim).find(|l| is_out_of_memory(l)).unwrap_or("");
            // "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: ..." -> "DefaultCPUAllocator: ..."
            let what = line.find("DefaultCPUAllocator").map_or(line, |i| &line[i..]);
            let what = what.split(" Error code").next().unwrap_or(what);
            eprintln!(
                "error: out of memory ({}): lower training.batch_size or eval.batch_size (raise \
                 training.grad_accum_steps to keep the same batch), use a smaller model or block_size, or free memory",
                what.trim_end_matches('.')
            );
            return;
        }
        if verbose {
            return;
        }
        let first = first_line(&msg);
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("error: internal error{at}: {first} (please report it)");
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_failures_are_recognised() {
        assert!(is_out_of_memory(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000000000000 bytes. Error code 12"
        ));
        assert!(is_out_of_memory("CUDA out of memory. Tried to allocate 2.00 GiB"));
        assert!(!is_out_of_memory("index out of range in self"));
    }
}
