//! Metrics as JSON lines (and TensorBoard scalars when asked), and a progress
//! bar when a person is watching.
use crate::config::ProgressMode;
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::Path;

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

/// A progress bar on stderr, drawn only when `mode` is "always", or "auto" with
/// stderr attached to a terminal.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    pub fn new(total: u64, label: &str, mode: ProgressMode) -> Self {
        if !show_progress(mode) {
            return Self(None);
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{prefix} {bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}]")
                .expect("static template"),
        );
        bar.set_prefix(label.to_string());
        Self(Some(bar))
    }

    pub fn set(&self, pos: u64) {
        if let Some(b) = &self.0 {
            b.set_position(pos);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

/// Whether progress bars are drawn under the `logging.progress` mode.
pub fn show_progress(mode: ProgressMode) -> bool {
    match mode {
        ProgressMode::Always => true,
        ProgressMode::Auto => std::io::stderr().is_terminal(),
        ProgressMode::Never => false,
    }
}
