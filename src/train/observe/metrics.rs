//! Metrics as JSON lines (and TensorBoard scalars when asked), and the
//! process's memory for them. (Progress bars and lines: [`crate::progress`].)
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::tensorboard::{self, EventWriter};

/// Appends one JSON object per line to the metrics file, and each record's
/// numbers to a TensorBoard event file when `logging.tensorboard` is on.
pub struct Metrics {
    /// `None` on workers other than rank 0, which write nothing.
    file: Option<File>,
    tensorboard: Option<EventWriter>,
}

impl Metrics {
    /// `tensorboard`: the writer of this run's event file, or `None`. The
    /// metrics file is appended to, never through a symbolic link (refused,
    /// naming it).
    pub fn open(path: &Path, tensorboard: Option<EventWriter>) -> Result<Self> {
        let file = crate::durable::open_run_file(path, OpenOptions::new().create(true).append(true))
            .with_context(|| format!("cannot open metrics file {}", path.display()))?;
        Ok(Self { file: Some(file), tensorboard })
    }

    /// Writes each record's numbers to `tensorboard` too, from now on.
    pub fn set_tensorboard(&mut self, tensorboard: Option<EventWriter>) {
        self.tensorboard = tensorboard;
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
    /// The step whose evaluation the file already records (the resumed step's,
    /// then each one written): a step's evaluation is recorded once, also when a
    /// finished run is started again and evaluates its last step again.
    pub recorded_eval: Option<u64>,
}

impl History {
    /// Rewrites `path` (atomically) without the records after step `step`.
    /// A symbolic link there is refused: its target is another run's file.
    pub fn keep_until(path: &Path, step: u64) -> Result<Self> {
        crate::durable::refuse_link(path)?;
        // Only a regular file is read: a device (say /dev/full) never ends, and
        // its write errors come when the run writes its first record.
        if !std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
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
                if at == step {
                    history.recorded_eval = Some(step);
                }
            }
            kept.push_str(line);
            kept.push('\n');
        }
        if dropped > 0 {
            crate::durable::write_file_atomically(path, kept.as_bytes())
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
        assert_eq!(h, History { first_eval: Some((0, 900.0)), recorded_eval: Some(4) });
        assert_eq!(std::fs::read_to_string(&p).unwrap(), lines[..4].join("\n") + "\n");
        assert_eq!(History::keep_until(&p, 2).unwrap().recorded_eval, None);
        assert_eq!(History::keep_until(&dir.path().join("none"), 3).unwrap(), History::default());
        // A device is left alone (reading /dev/full or /dev/zero would never end).
        assert_eq!(History::keep_until(Path::new("/dev/zero"), 3).unwrap(), History::default());
    }

    #[test]
    fn a_metrics_file_that_is_a_link_is_neither_appended_to_nor_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source.jsonl");
        let lines = "{\"kind\":\"train\",\"step\":2}\n{\"kind\":\"train\",\"step\":4}\n";
        std::fs::write(&source, lines).unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::os::unix::fs::symlink(&source, &p).unwrap();
        for e in [History::keep_until(&p, 2).unwrap_err(), Metrics::open(&p, None).err().unwrap()] {
            let e = crate::logging::one_line(&e);
            assert!(e.contains("metrics.jsonl is a symbolic link") && !e.contains('\n'), "{e}");
        }
        assert_eq!(std::fs::read_to_string(&source).unwrap(), lines);
    }
}
