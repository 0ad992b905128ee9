//! `[checkpoint]`: what is written and kept, where a job resumes from, and
//! the signals that make it save and stop.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `checkpoint.resume`: where a job continues from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Resume {
    /// The newest valid checkpoint of `output_dir` (a fresh start when there is none).
    #[default]
    Auto,
    /// Always a fresh start.
    None,
    /// This checkpoint folder.
    Path(PathBuf),
}

impl Resume {
    /// As written in TOML: `"auto"`, `"none"` or the quoted path.
    pub fn as_toml(&self) -> String {
        match self {
            Resume::Auto => "\"auto\"".into(),
            Resume::None => "\"none\"".into(),
            Resume::Path(p) => format!("{:?}", p.display().to_string()),
        }
    }
}

impl Serialize for Resume {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Resume::Auto => s.serialize_str("auto"),
            Resume::None => s.serialize_str("none"),
            Resume::Path(p) => s.serialize_str(&p.to_string_lossy()),
        }
    }
}

impl<'de> Deserialize<'de> for Resume {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "auto" => Resume::Auto,
            "none" => Resume::None,
            "" => {
                return Err(serde::de::Error::custom(
                    "checkpoint.resume is empty: use \"auto\", \"none\" or a checkpoint folder",
                ))
            }
            path => Resume::Path(PathBuf::from(path)),
        })
    }
}

/// `[checkpoint]`: what is written and kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save every this many optimizer steps (0: only at epoch ends and the end).
    pub every_steps: usize,
    /// Also save when this many minutes have passed since the last save, by
    /// rank 0's clock, at a step every worker agrees on (0: off).
    pub every_minutes: f64,
    /// Signals on which every worker finishes its step, rank 0 saves, and the
    /// job exits with the requeue status (`train::preempt`); empty: none.
    pub save_signals: Vec<SaveSignal>,
    /// Step checkpoints kept (`best/` is kept apart from these).
    pub keep_last: usize,
    /// Keep the lowest-perplexity model in `best/`.
    pub save_best: bool,
    /// "auto": continue from the newest valid checkpoint of `output_dir` (a fresh
    /// start when there is none); "none": always start fresh; or a checkpoint path.
    pub resume: Resume,
    /// Resume even when settings that shape the job changed since the checkpoint.
    pub allow_config_change: bool,
    /// Let a fresh start delete an earlier run's checkpoints and `best/` in
    /// `output_dir` (and a resume delete checkpoints newer than its own); without
    /// it such a start is refused.
    pub overwrite_output_dir: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every_steps: 0,
            every_minutes: 0.0,
            save_signals: vec![SaveSignal::Term, SaveSignal::Usr1],
            keep_last: 1,
            save_best: true,
            resume: Resume::Auto,
            allow_config_change: false,
            overwrite_output_dir: false,
        }
    }
}

/// A signal in `checkpoint.save_signals`, by its name (`"SIGUSR1"`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum SaveSignal {
    #[serde(rename = "SIGTERM")]
    Term,
    #[serde(rename = "SIGUSR1")]
    Usr1,
    #[serde(rename = "SIGUSR2")]
    Usr2,
    #[serde(rename = "SIGINT")]
    Int,
}

impl SaveSignal {
    pub const ALL: [SaveSignal; 4] = [SaveSignal::Term, SaveSignal::Usr1, SaveSignal::Usr2, SaveSignal::Int];

    pub fn number(self) -> i32 {
        match self {
            SaveSignal::Term => libc::SIGTERM,
            SaveSignal::Usr1 => libc::SIGUSR1,
            SaveSignal::Usr2 => libc::SIGUSR2,
            SaveSignal::Int => libc::SIGINT,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SaveSignal::Term => "SIGTERM",
            SaveSignal::Usr1 => "SIGUSR1",
            SaveSignal::Usr2 => "SIGUSR2",
            SaveSignal::Int => "SIGINT",
        }
    }
}
