//! Progress of long work (preparing, training, evaluating): a bar on a
//! terminal, timed lines in batch jobs, nothing when asked.
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{LoggingConfig, ProgressMode};

/// Progress of a long phase (preparing, training, evaluating): a bar on stderr
/// when it is a terminal; in batch jobs (stderr a file: nohup, Slurm) one INFO
/// line every `logging.progress_every_s` instead, which a bar never gives there
/// (0: a line at every update, which tests rely on: no clock decides them).
/// `logging.progress = "never"` shows neither.
pub struct Progress {
    shown: Shown,
    label: String,
    total: u64,
    bytes: bool,
    started: Instant,
    every: Duration,
    last_line: Mutex<Instant>,
    pos: AtomicU64,
}

enum Shown {
    Bar(ProgressBar),
    Lines,
    Off,
}

impl Progress {
    /// Progress over `total` items (steps, batches).
    pub fn new(total: u64, label: &str, logging: &LoggingConfig) -> Self {
        Self::make(total, label, logging, false)
    }

    /// Progress over `total` bytes.
    pub fn bytes(total: u64, label: &str, logging: &LoggingConfig) -> Self {
        Self::make(total, label, logging, true)
    }

    /// Shows nothing (the workers other than rank 0).
    pub fn hidden() -> Self {
        Self::with(Shown::Off, 0, "", false, Duration::ZERO)
    }

    fn make(total: u64, label: &str, logging: &LoggingConfig, bytes: bool) -> Self {
        let every = Duration::from_secs_f64(logging.progress_every_s.max(0.0));
        let shown = match logging.progress {
            ProgressMode::Never => Shown::Off,
            _ if std::io::stderr().is_terminal() => {
                let bar = ProgressBar::new(total);
                let template = if bytes {
                    "{prefix} {bar:40} {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, eta {eta})"
                } else {
                    "{prefix} {bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}]"
                };
                bar.set_style(ProgressStyle::with_template(template).expect("static template"));
                bar.set_prefix(label.to_string());
                Shown::Bar(bar)
            }
            _ => Shown::Lines,
        };
        Self::with(shown, total, label, bytes, every)
    }

    fn with(shown: Shown, total: u64, label: &str, bytes: bool, every: Duration) -> Self {
        let now = Instant::now();
        Self {
            shown,
            label: label.to_string(),
            total,
            bytes,
            started: now,
            every,
            last_line: Mutex::new(now),
            pos: AtomicU64::new(0),
        }
    }

    pub fn set(&self, pos: u64) {
        self.pos.store(pos, Ordering::Relaxed);
        self.show(pos);
    }

    /// Advances by `delta` (from any thread).
    pub fn inc(&self, delta: u64) {
        let pos = self.pos.fetch_add(delta, Ordering::Relaxed) + delta;
        self.show(pos);
    }

    fn show(&self, pos: u64) {
        match &self.shown {
            Shown::Bar(b) => b.set_position(pos),
            Shown::Lines => {
                let mut last = self.last_line.lock().expect("progress lock");
                if last.elapsed() >= self.every {
                    *last = Instant::now();
                    tracing::info!("{}", self.line(pos, self.started.elapsed()));
                }
            }
            Shown::Off => {}
        }
    }

    /// "train: 120/1000 steps (12%), 1m 30s elapsed, about 11m 0s left".
    fn line(&self, pos: u64, elapsed: Duration) -> String {
        let amount =
            |n: u64| if self.bytes { format!("{:.1} MiB", n as f64 / (1 << 20) as f64) } else { n.to_string() };
        let frac = if self.total > 0 { pos as f64 / self.total as f64 } else { 0.0 };
        let left = if frac > 0.0 { Some(elapsed.as_secs_f64() * (1.0 - frac) / frac) } else { None };
        format!(
            "{}: {} of {} ({:.0}%), {} elapsed{}",
            self.label,
            amount(pos),
            amount(self.total),
            100.0 * frac,
            hms(elapsed.as_secs_f64()),
            left.map(|l| format!(", about {} left", hms(l))).unwrap_or_default()
        )
    }

    pub fn finish(&self) {
        if let Shown::Bar(b) = &self.shown {
            b.finish_and_clear();
        }
    }
}

/// "1h 2m 3s", "2m 3s", "3s".
fn hms(secs: f64) -> String {
    let s = secs.round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m {sec}s"),
        (h, m, sec) => format!("{h}h {m}m {sec}s"),
    }
}

/// Whether progress is shown at all under the `logging.progress` mode (a bar
/// or lines: [`Progress`] decides which).
pub fn show_progress(mode: ProgressMode) -> bool {
    mode != ProgressMode::Never
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_say_how_far_how_long_and_how_much_is_left() {
        let p = Progress::with(Shown::Lines, 1000, "train", false, Duration::from_secs(60));
        assert_eq!(p.line(250, Duration::from_secs(90)), "train: 250 of 1000 (25%), 1m 30s elapsed, about 4m 30s left");
        assert_eq!(p.line(0, Duration::from_secs(3)), "train: 0 of 1000 (0%), 3s elapsed");
        let b = Progress::with(Shown::Lines, 4 << 20, "tokenizing", true, Duration::from_secs(60));
        assert_eq!(
            b.line(1 << 20, Duration::from_secs(7200)),
            "tokenizing: 1.0 MiB of 4.0 MiB (25%), 2h 0m 0s elapsed, about 6h 0m 0s left"
        );
        // From several threads, as the tokenizer advances it.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| b.inc(1 << 20));
            }
        });
        assert_eq!(b.pos.load(Ordering::Relaxed), 4 << 20);
    }
}
