//! A deadline for blocking collectives that cannot be interrupted (MPI's): a
//! thread watches the call in flight and, when it outlives `distributed.timeout_s`,
//! prints one error line naming the rank, the collective and its size, and ends
//! the process with a non-zero status. `mpirun` / `srun --kill-on-bad-exit=1` /
//! `mlm-launch` then stop the other ranks, the stuck one included, instead of
//! everyone waiting until the wall-time limit.
//!
//! (tcp polls its sockets against the same deadline and NCCL's non-blocking
//! communicator is polled and aborted; neither needs this thread.)
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What happens when a call outlives its deadline: by default, print the
/// message and exit with status 1.
pub type OnExpiry = Box<dyn Fn(&str) + Send + Sync>;

#[derive(Default)]
struct State {
    /// The call in flight and its deadline.
    armed: Option<(String, Instant)>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

pub struct Watchdog {
    shared: Arc<Shared>,
    rank: usize,
    timeout: Duration,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// A watchdog that prints the message and exits with status 1.
    pub fn exiting(rank: usize, timeout: Duration) -> Self {
        Self::new(
            rank,
            timeout,
            Box::new(|msg| {
                eprintln!("error: {msg}");
                // Not `exit`: atexit handlers could block on the stuck library.
                // SAFETY: _exit ends the process at once.
                unsafe { libc::_exit(1) }
            }),
        )
    }

    pub fn new(rank: usize, timeout: Duration, on_expiry: OnExpiry) -> Self {
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), wake: Condvar::new() });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("watchdog-{rank}"))
                .spawn(move || watch(&shared, &on_expiry))
                .expect("spawning the collective watchdog")
        };
        Self { shared, rank, timeout, thread: Some(thread) }
    }

    /// The deadline of later calls.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs `f` (one collective, described by `what`) under the deadline.
    pub fn run<T>(&self, what: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
        let msg = format!(
            "rank {}: {} did not finish within {} s (distributed.timeout_s): another rank is stuck, dead or slower \
             by that much; exiting so that the launcher stops the job",
            self.rank,
            what(),
            self.timeout.as_secs()
        );
        self.arm(Some((msg, Instant::now() + self.timeout)));
        let out = f();
        self.arm(None);
        out
    }

    fn arm(&self, armed: Option<(String, Instant)>) {
        let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        s.armed = armed;
        self.shared.wake.notify_all();
    }
}

fn watch(shared: &Shared, on_expiry: &OnExpiry) {
    let mut s = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if s.stop {
            return;
        }
        match &s.armed {
            None => s = shared.wake.wait(s).unwrap_or_else(|p| p.into_inner()),
            Some((msg, deadline)) => {
                let now = Instant::now();
                if now >= *deadline {
                    let msg = msg.clone();
                    s.armed = None;
                    drop(s);
                    on_expiry(&msg);
                    s = shared.state.lock().unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                let wait = *deadline - now;
                s = shared.wake.wait_timeout(s, wait).unwrap_or_else(|p| p.into_inner()).0;
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        {
            let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            s.stop = true;
            self.shared.wake.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counting(rank: usize, timeout: Duration) -> (Watchdog, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (Watchdog::new(rank, timeout, Box::new(move |m| s.lock().unwrap().push(m.to_string()))), seen)
    }

    #[test]
    fn a_call_past_its_deadline_is_named_once() {
        let (dog, seen) = counting(3, Duration::from_millis(100));
        dog.run(|| "all-reduce of 1000 f32 (0.0 MiB)".into(), || std::thread::sleep(Duration::from_millis(400)));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(seen[0].starts_with("rank 3: all-reduce of 1000 f32"), "{}", seen[0]);
        assert!(seen[0].contains("distributed.timeout_s"), "{}", seen[0]);
    }

    #[test]
    fn calls_within_the_deadline_are_left_alone() {
        let (mut dog, seen) = counting(0, Duration::from_millis(300));
        let calls = AtomicUsize::new(0);
        for _ in 0..20 {
            dog.run(|| "barrier".into(), || calls.fetch_add(1, Ordering::SeqCst));
        }
        // Idle time between calls does not count.
        std::thread::sleep(Duration::from_millis(500));
        dog.set_timeout(Duration::from_secs(5));
        dog.run(|| "broadcast".into(), || std::thread::sleep(Duration::from_millis(400)));
        assert_eq!(calls.load(Ordering::SeqCst), 20);
        assert!(seen.lock().unwrap().is_empty(), "{:?}", seen.lock().unwrap());
    }
}
