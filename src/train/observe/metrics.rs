//! Metrics as JSON lines (and TensorBoard scalars when asked), and a progress
//! bar when a person is watching.
use crate::config::{LoggingConfig, ProgressMode};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::tensorboard::{self, EventWriter};

/// Appends one JSON object per line to the metrics file, and each record's
/// numbers to a TensorBoard event file when `logging.tensorboard` is on.
pub struct Metrics {
    /// `None` on workers other than rank 0, which write nothing.
    file: Option<File>,
    tensorboard: Option<EventWriter>,
}

impl Metrics {
    /// `tensorboard`: the folder of the event files, or `None`.
    pub fn open(path: &Path, tensorboard: Option<&Path>) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open metrics file {}", path.display()))?;
        let tensorboard = tensorboard.map(EventWriter::create).transpose()?;
        Ok(Self { file: Some(file), tensorboard })
    }

    pub fn disabled() -> Self {
        Self { file: None, tensorboard: None }
    }

    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        if let Some(tb) = &mut self.tensorboard {
            let step = record["step"].as_i64().unwrap_or(0);
            tb.scalars(step, &tensorboard::scalars_of(record))?;
        }
        match &mut self.file {
            Some(f) => writeln!(f, "{record}").context("cannot write metrics"),
            None => Ok(()),
        }
    }
}

/// What a resumed run keeps of its metrics file: the records up to the step
/// it resumes at (those of a killed attempt's later steps, which are redone,
/// are dropped, so each step has one record).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct History {
    /// The run's first evaluation (step, perplexity), usually at step 0.
    pub first_eval: Option<(u64, f64)>,
    /// An evaluation of the resumed step is already recorded.
    pub eval_at_resume: bool,
}

impl History {
    /// Rewrites `path` (atomically) without the records after step `step`.
    pub fn keep_until(path: &Path, step: u64) -> Result<Self> {
        // Only a regular file is read: a device (say /dev/full) never ends, and
        // its write errors come when the run writes its first record.
        if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
            return Ok(Self::default()); // no metrics yet
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut kept = String::with_capacity(text.len());
        let mut history = Self::default();
        let mut dropped = 0usize;
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                dropped += 1; // a line cut by a crash
                continue;
            };
            let at = v["step"].as_u64().unwrap_or(0);
            if at > step {
                dropped += 1;
                continue;
            }
            if v["kind"] == "eval" {
                if history.first_eval.is_none() {
                    history.first_eval = v["perplexity"].as_f64().map(|p| (at, p));
                }
                history.eval_at_resume |= at == step;
            }
            kept.push_str(line);
            kept.push('\n');
        }
        if dropped > 0 {
            let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
            std::fs::write(&tmp, kept)
                .and_then(|_| std::fs::rename(&tmp, path))
                .with_context(|| format!("cannot rewrite {}", path.display()))?;
            tracing::info!(
                "{}: dropped {dropped} record(s) after step {step} (redone from the checkpoint)",
                path.display()
            );
        }
        Ok(history)
    }
}

/// This process's resident memory now and at its peak so far (`VmRSS` and
/// `VmHWM` of /proc/self/status), in bytes; `None` where there is no such file.
pub fn resident_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        Some(line[key.len()..].split_whitespace().next()?.parse::<u64>().ok()? * 1024)
    };
    Some((kib("VmRSS:")?, kib("VmHWM:")?))
}

/// Memory in use on the GPU (total - free, as `nvidia-smi` reports it): this
/// process's CUDA context and what libtorch's caching allocator holds (it keeps
/// its largest reserve until released), plus any other process's share.
pub fn gpu_memory_used() -> Option<u64> {
    if !matches!(crate::device::CudaProbe::get().driver_init, Some(Ok(()))) {
        return None;
    }
    let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
    Some(total.saturating_sub(free) as u64)
}

/// Progress of a long phase (preparing, training, evaluating): a bar on stderr
/// when it is a terminal; in batch jobs (stderr a file: nohup, Slurm) one INFO
/// line every `logging.progress_every_s` instead, which a bar never gives there.
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
            _ if every.is_zero() => Shown::Off,
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
    fn a_resume_keeps_each_step_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let lines = [
            r#"{"kind":"eval","step":0,"perplexity":900.0}"#,
            r#"{"kind":"train","step":2,"loss":5.0}"#,
            r#"{"kind":"eval","step":4,"perplexity":300.0}"#,
            r#"{"kind":"train","step":4,"loss":4.0}"#,
            r#"{"kind":"train","step":6,"loss":3.0}"#,
            r#"{"kind":"train","st"#,
        ];
        std::fs::write(&p, lines.join("\n")).unwrap();
        let h = History::keep_until(&p, 4).unwrap();
        assert_eq!(h, History { first_eval: Some((0, 900.0)), eval_at_resume: true });
        assert_eq!(std::fs::read_to_string(&p).unwrap(), lines[..4].join("\n") + "\n");
        assert!(!History::keep_until(&p, 2).unwrap().eval_at_resume);
        assert_eq!(History::keep_until(&dir.path().join("none"), 3).unwrap(), History::default());
        // A device is left alone (reading /dev/full or /dev/zero would never end).
        assert_eq!(History::keep_until(Path::new("/dev/zero"), 3).unwrap(), History::default());
    }

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
