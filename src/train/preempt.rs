//! Never losing more than a few minutes: wall-clock checkpoints
//! (`checkpoint.every_minutes`) and a checkpoint on a signal
//! (`checkpoint.save_signals`: Slurm's SIGTERM at a time limit or preemption,
//! the `--signal` of the user's choice), after which the job exits with
//! [`REQUEUE_EXIT_CODE`].
//!
//! The workers must save the same step, or their collectives would no longer
//! pair up. So no worker acts on its own signal or clock: each step, every
//! worker says what it asks for ([`Asks`]: "stop", when a signal came; "save",
//! rank 0 only, when `every_minutes` have passed by its clock), the asks are
//! summed over the workers with the step's loss (no collective of their own),
//! and every worker acts on the sum at the same step boundary: one asking is
//! enough. The sums are read where reading costs nothing: every step on the
//! CPU and for a single process, at log steps on a GPU (where a read waits for
//! the device, `optim::host`); a signal or a due save is then acted on at
//! most `training.log_every` steps late.
//!
//! A signal handler only sets a flag: the step under way finishes, rank 0
//! saves (crash-safely, as every checkpoint), the workers meet at a barrier
//! and exit with [`REQUEUE_EXIT_CODE`]. More signals while that happens
//! change nothing (the flag is already set); a SIGKILL in the middle of the
//! save leaves the previous checkpoint as it was (`checkpoint::save`).
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::config::{CheckpointConfig, SaveSignal};

/// The exit status of a job that saved a checkpoint on a signal and stopped:
/// sysexits.h's `EX_TEMPFAIL` ("try again later"). `mlm-launch` passes it on;
/// a batch script requeues the job on it, or a site lists it in Slurm's
/// `RequeueExit` (docs/cluster.md).
pub const REQUEUE_EXIT_CODE: i32 = 75;

/// The job saved a checkpoint on a signal and stops (exit [`REQUEUE_EXIT_CODE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preempted {
    /// The step saved.
    pub step: usize,
    /// What this worker received (another worker's signal when `None`).
    pub signal: Option<&'static str>,
}

impl std::fmt::Display for Preempted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = self.signal.unwrap_or("a signal to another worker");
        write!(
            f,
            "stopped by {why} once step {} was saved; exit status {REQUEUE_EXIT_CODE} asks for a requeue, and \
             checkpoint.resume = \"auto\" continues from that step",
            self.step
        )
    }
}

impl std::error::Error for Preempted {}

/// What one worker asks of all at a step boundary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Asks {
    /// Save and stop (a signal came).
    pub stop: bool,
    /// Save (`every_minutes` have passed since the last save).
    pub save: bool,
}

impl Asks {
    /// As numbers to sum over the workers.
    pub fn values(self) -> [f64; 2] {
        [self.stop as u8 as f64, self.save as u8 as f64]
    }

    /// What the workers agreed on from the sums of their [`Self::values`]:
    /// one asking is enough.
    pub fn from_sums(stop: f64, save: f64) -> Self {
        Self { stop: stop >= 0.5, save: save >= 0.5 }
    }
}

/// The signals and the clock of one worker.
pub struct Watch {
    /// The last signal received (its number), 0 for none.
    received: Arc<AtomicUsize>,
    signals: Vec<SaveSignal>,
    handlers: Vec<signal_hook::SigId>,
    /// `every_minutes` (rank 0 only: the other clocks are not asked).
    every: Option<Duration>,
    last_save: Instant,
}

impl Watch {
    /// The watch of worker `rank`; no handler is installed before [`Self::arm`].
    pub fn new(cfg: &CheckpointConfig, rank: usize, now: Instant) -> Self {
        let every = (rank == 0 && cfg.every_minutes > 0.0).then(|| Duration::from_secs_f64(cfg.every_minutes * 60.0));
        Self {
            received: Arc::new(AtomicUsize::new(0)),
            signals: cfg.save_signals.clone(),
            handlers: Vec::new(),
            every,
            last_save: now,
        }
    }

    /// Installs the handlers of `checkpoint.save_signals`: from here on those
    /// signals only set a flag. Called when training starts: before that (the
    /// model loading, the data preparing) they end the process as usual, with
    /// nothing to save.
    pub fn arm(&mut self) -> Result<()> {
        for s in &self.signals {
            let id = signal_hook::flag::register_usize(s.number(), self.received.clone(), s.number() as usize)
                .with_context(|| format!("cannot install a handler for {} (checkpoint.save_signals)", s.name()))?;
            self.handlers.push(id);
        }
        Ok(())
    }

    /// The signal received, if any.
    pub fn signal(&self) -> Option<&'static str> {
        match self.received.load(Ordering::SeqCst) {
            0 => None,
            n => Some(SaveSignal::ALL.iter().find(|s| s.number() as usize == n).map_or("a signal", |s| s.name())),
        }
    }

    /// What this worker asks for `now`.
    pub fn asks(&self, now: Instant) -> Asks {
        Asks {
            stop: self.received.load(Ordering::SeqCst) != 0,
            save: self.every.is_some_and(|every| now.saturating_duration_since(self.last_save) >= every),
        }
    }

    /// A checkpoint was written `now`: the wall clock starts again.
    pub fn saved(&mut self, now: Instant) {
        self.last_save = now;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        for id in self.handlers.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(minutes: f64, signals: &[SaveSignal]) -> CheckpointConfig {
        CheckpointConfig { every_minutes: minutes, save_signals: signals.to_vec(), ..Default::default() }
    }

    #[test]
    fn one_worker_asking_is_enough_and_none_asking_is_nothing() {
        let none = Asks::default();
        assert_eq!(Asks::from_sums(none.values()[0], none.values()[1]), none);
        // Four workers: only rank 2 got the signal, only rank 0's clock ran out.
        let asks =
            [Asks { stop: false, save: true }, Asks::default(), Asks { stop: true, save: false }, Asks::default()];
        let sums = asks.iter().map(|a| a.values()).fold([0.0; 2], |s, v| [s[0] + v[0], s[1] + v[1]]);
        assert_eq!(Asks::from_sums(sums[0], sums[1]), Asks { stop: true, save: true });
        assert_eq!(Asks::from_sums(0.0, 3.0), Asks { stop: false, save: true });
    }

    #[test]
    fn only_rank_0_asks_for_a_timed_save_and_the_clock_restarts_at_each_save() {
        let t0 = Instant::now();
        let cfg = config(0.5, &[]);
        let (mut rank0, rank1) = (Watch::new(&cfg, 0, t0), Watch::new(&cfg, 1, t0));
        assert_eq!(rank0.asks(t0 + Duration::from_secs(29)), Asks::default());
        assert_eq!(rank0.asks(t0 + Duration::from_secs(30)), Asks { stop: false, save: true });
        assert_eq!(rank1.asks(t0 + Duration::from_secs(3600)), Asks::default());
        rank0.saved(t0 + Duration::from_secs(40));
        assert_eq!(rank0.asks(t0 + Duration::from_secs(69)), Asks::default());
        assert!(rank0.asks(t0 + Duration::from_secs(70)).save);
        // Off: never.
        let off = Watch::new(&config(0.0, &[]), 0, t0);
        assert_eq!(off.asks(t0 + Duration::from_secs(1 << 30)), Asks::default());
    }

    #[test]
    fn a_caught_signal_asks_to_stop_and_further_ones_change_nothing() {
        let cfg = config(0.0, &[SaveSignal::Usr2]);
        let mut w = Watch::new(&cfg, 1, Instant::now());
        w.arm().unwrap();
        assert_eq!((w.signal(), w.asks(Instant::now()).stop), (None, false));
        for _ in 0..3 {
            // SAFETY: raise(3) of a signal this process now handles.
            assert_eq!(unsafe { libc::raise(libc::SIGUSR2) }, 0);
        }
        assert_eq!((w.signal(), w.asks(Instant::now()).stop), (Some("SIGUSR2"), true));
        let p = Preempted { step: 7, signal: w.signal() };
        assert!(p.to_string().starts_with("stopped by SIGUSR2 once step 7 was saved; exit status 75"), "{p}");
    }
}
