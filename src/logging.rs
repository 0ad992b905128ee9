//! Logs to stderr through `tracing`, and errors as one line each.
use std::cell::Cell;
use std::io::IsTerminal;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

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

/// A user's input as an error line quotes it: as it is (Rust's quoting) when
/// short, else its first 60 characters, an ellipsis and its length, so that a
/// long input never floods the one line.
pub fn excerpt(text: &str) -> String {
    const SHORT: usize = 80;
    let n = text.chars().count();
    if n <= SHORT {
        return format!("{text:?}");
    }
    let head: String = text.chars().take(60).collect();
    format!("{:?} ({n} characters)", format!("{head}…"))
}

/// Whether a panic message is libtorch (or CUDA) failing to allocate memory:
/// tch's infallible wrappers panic where libtorch throws.
pub fn is_out_of_memory(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("can't allocate memory") || m.contains("cannot allocate memory")
}

static PANIC_WAS_OOM: AtomicBool = AtomicBool::new(false);

/// Whether a panic reported by [`quiet_panics`]'s hook was an allocation failure.
pub fn panic_was_out_of_memory() -> bool {
    PANIC_WAS_OOM.load(Ordering::Relaxed)
}

/// What the process is doing, for an out-of-memory error: what ran (" at step
/// 12 (batch 512, micro-batch 64, block 128)") and what to change. The training
/// loop keeps it current; the panic hook reads it.
#[derive(Debug, Clone)]
struct Activity {
    what: String,
    advice: String,
}

static ACTIVITY: Mutex<Option<Activity>> = Mutex::new(None);

/// Said when nothing more precise is known.
const GENERIC_ADVICE: &str = "lower training.micro_batch_size (or set it to \"auto\") or eval.batch_size, set \
    training.activation_checkpointing = true, use a smaller model or data.block_size, or free memory";

/// Records what runs now: `what` follows "out of memory" in the error (" at
/// step 12 (...)"), `advice` says what to change.
pub fn set_activity(what: String, advice: String) {
    if let Ok(mut a) = ACTIVITY.lock() {
        *a = Some(Activity { what, advice });
    }
}

/// Back to the generic out-of-memory advice.
pub fn clear_activity() {
    if let Ok(mut a) = ACTIVITY.lock() {
        *a = None;
    }
}

thread_local! {
    /// Set while [`catch_out_of_memory`] runs: the hook stays silent about an
    /// allocation failure that is expected and handled.
    static CATCHING_OOM: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`; an allocation failure in it (tch panics where libtorch throws) is
/// returned as `Err(what failed to allocate)` instead of ending the process.
/// Other panics go on unwinding. Whatever `f` allocated is dropped by then.
pub fn catch_out_of_memory<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let outer = CATCHING_OOM.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING_OOM.with(|c| c.set(outer));
    result.map_err(|payload| {
        let msg = panic_message(payload.as_ref());
        if !is_out_of_memory(&msg) {
            std::panic::resume_unwind(payload);
        }
        allocation_failure(&msg)
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// The failed allocation in a few words: "DefaultCPUAllocator: can't allocate
/// memory: you tried to allocate N bytes" out of "[enforce fail at
/// alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: ... Error code 12", the
/// first three sentences of CUDA's (what was asked, the GPU's capacity, what was free).
fn allocation_failure(msg: &str) -> String {
    let line = msg.lines().map(str::trim).find(|l| is_out_of_memory(l)).unwrap_or("");
    let what = line.find("DefaultCPUAllocator").map_or(line, |i| &line[i..]);
    let what = what.split(" Error code").next().unwrap_or(what);
    let sentences: Vec<&str> = what.split(". ").take(3).collect();
    sentences.join(". ").trim_end_matches('.').to_string()
}

/// Panics get one line: an allocation failure (a user's too-large batch or
/// model) as an out-of-memory error naming what ran and what to change, and
/// nothing else, whatever RUST_BACKTRACE says (it is no bug, and libtorch's
/// message carries a C++ frame dump); anything else as an internal error to
/// report, after the panic and its backtrace when RUST_BACKTRACE asks for one.
pub fn quiet_panics() {
    let verbose = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = panic_message(info.payload());
        let oom = is_out_of_memory(&msg);
        if oom && CATCHING_OOM.with(Cell::get) {
            return;
        }
        if verbose && !oom {
            default_hook(info);
        }
        if oom {
            PANIC_WAS_OOM.store(true, Ordering::Relaxed);
            // try_lock: a panic while the activity is being written must not wait for itself.
            let activity = ACTIVITY.try_lock().ok().and_then(|a| a.clone());
            let (what, advice) = activity.map_or((String::new(), GENERIC_ADVICE.to_string()), |a| (a.what, a.advice));
            let failed = allocation_failure(&msg);
            let failed = if failed.is_empty() { String::new() } else { format!(": {failed}") };
            eprintln!("error: out of memory{what}{failed}; to fit, {advice}");
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

/// The process's allocator: the system's, except that a failed host
/// allocation ends the process with the same one-line out-of-memory error as a
/// failed libtorch allocation (what ran, what to change) and exit status 1,
/// where Rust would abort with "memory allocation of N bytes failed". Under a
/// tight limit the allocation that fails first may be the data loader's next
/// batch rather than the step's logits; the user's remedy is the same.
/// Nothing is flushed or written after the failure (`_exit`), so no checkpoint
/// is half-written by it.
pub struct ReportingAllocator;

// SAFETY: every call is forwarded to `System` with the same arguments; the
// only addition is what happens when it returns null.
unsafe impl std::alloc::GlobalAlloc for ReportingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        checked(std::alloc::System.alloc(layout), layout.size())
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        checked(std::alloc::System.alloc_zeroed(layout), layout.size())
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        checked(std::alloc::System.realloc(ptr, layout, new_size), new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, layout)
    }
}

fn checked(ptr: *mut u8, size: usize) -> *mut u8 {
    if ptr.is_null() {
        host_allocation_failed(size);
    }
    ptr
}

/// Writes "error: out of memory<what>: a host allocation of N bytes failed; to
/// fit, <advice>" to stderr and exits with status 1, allocating nothing: the
/// activity's strings are written as they are, the number through a stack buffer.
fn host_allocation_failed(size: usize) -> ! {
    fn put(bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            // SAFETY: writes from a live slice to the standard error descriptor.
            let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
            if n <= 0 {
                return;
            }
            rest = &rest[n as usize..];
        }
    }
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = size;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(b"error: out of memory");
    // try_lock: the failing allocation may come from a thread that holds it.
    let activity = ACTIVITY.try_lock();
    let current = activity.as_ref().ok().and_then(|a| a.as_ref());
    if let Some(a) = current {
        put(a.what.as_bytes());
    }
    put(b": a host allocation of ");
    put(&digits[at..]);
    put(b" bytes failed; to fit, ");
    put(current.map_or(GENERIC_ADVICE, |a| a.advice.as_str()).as_bytes());
    put(b"\n");
    // SAFETY: ends the process at once; nothing further is allocated or written.
    unsafe { libc::_exit(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_inputs_are_quoted_as_an_excerpt_with_their_length() {
        assert_eq!(excerpt("a [MASK] b"), "\"a [MASK] b\"");
        let long = "word ".repeat(2000);
        let e = excerpt(&long);
        assert!(e.starts_with("\"word word") && e.ends_with("…\" (10000 characters)"), "{e}");
        assert!(e.len() < 100, "{e}");
        // Characters, not bytes: never a cut inside one.
        assert!(excerpt(&"é".repeat(100)).ends_with("…\" (100 characters)"));
    }

    #[test]
    fn allocation_failures_are_recognised() {
        assert!(is_out_of_memory(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000000000000 bytes. Error code 12"
        ));
        assert!(is_out_of_memory("CUDA out of memory. Tried to allocate 2.00 GiB"));
        assert!(!is_out_of_memory("index out of range in self"));
    }

    #[test]
    fn allocation_failures_are_shortened_to_what_failed() {
        let cpu = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried \
                   to allocate 4000000000 bytes. Error code 12 (Cannot allocate memory)";
        assert_eq!(
            allocation_failure(cpu),
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000000000 bytes"
        );
        let cuda = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.72 GiB of \
                    which 1.06 GiB is free. Including non-PyTorch memory, this process has 138 GiB in use.";
        assert_eq!(
            allocation_failure(cuda),
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.72 GiB of which \
             1.06 GiB is free"
        );
    }

    #[test]
    fn caught_allocation_failures_are_returned_and_other_panics_go_on() {
        let r = catch_out_of_memory(|| -> u32 { panic!("CUDA out of memory. Tried to allocate 2.00 GiB") });
        assert_eq!(r, Err("CUDA out of memory. Tried to allocate 2.00 GiB".to_string()));
        assert_eq!(catch_out_of_memory(|| 7), Ok(7));
        let other = std::panic::catch_unwind(|| catch_out_of_memory(|| -> u32 { panic!("index out of range") }));
        assert!(other.is_err(), "a panic other than an allocation failure is not caught");
        assert!(!CATCHING_OOM.with(Cell::get));
    }

    #[test]
    fn a_failed_host_allocation_is_one_out_of_memory_line_and_status_1() {
        // The failure path ends the process, so it runs in a child: this test
        // binary again, with only this test and the variable set.
        if std::env::var_os("MLM_TEST_HOST_ALLOCATION_FAILS").is_some() {
            set_activity(" at step 3 (batch 8, micro-batch 8, block 64)".into(), "lower it".into());
            host_allocation_failed(262_144);
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "logging::tests::a_failed_host_allocation_is_one_out_of_memory_line_and_status_1"])
            .args(["--nocapture", "--test-threads=1"])
            .env("MLM_TEST_HOST_ALLOCATION_FAILS", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(
                "error: out of memory at step 3 (batch 8, micro-batch 8, block 64): a host allocation of 262144 bytes \
                 failed; to fit, lower it\n"
            ),
            "{stderr}"
        );
    }
}
