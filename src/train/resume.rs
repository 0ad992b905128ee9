//! Resuming, as policy: which checkpoint a job continues from, whether it is
//! still the same job, and what a start may do to an output directory that
//! already holds a run. Reading and writing checkpoints is `crate::checkpoint`'s.
//!
//! The rules (`docs/checkpoints.md`):
//! - `resume = "auto"` continues from the newest checkpoint whose checksums
//!   verify (damaged ones are skipped with a warning).
//! - A fresh start (`resume = "none"`, or `"auto"` with nothing resumable) into a
//!   directory holding checkpoints or `best/` is refused, unless
//!   `checkpoint.overwrite_output_dir = true`, which deletes them first.
//! - `resume = <path>` must name a step checkpoint. A checkpoint of the folder's
//!   own run (same run id in `run.json` and its `trainer_state.json`, or one in
//!   the folder that predates run ids) continues that run: newer checkpoints
//!   than it are refused unless `overwrite_output_dir` (which deletes them).
//!   A checkpoint of another run is a fork: into a folder without checkpoints
//!   or `best/` it starts a new run that records its parent; into a folder
//!   holding a run it is refused, unless `overwrite_output_dir` (which deletes
//!   that run first).
//! - A resume whose shaping settings or prepared data changed is refused unless
//!   `checkpoint.allow_config_change = true`.
//! - A symbolic link where the run writes a file or folder (`run.json`, the
//!   metrics, `curves.png`, `tb/`, `best/`, a `checkpoint-N`, the store's lock)
//!   is refused; the output folder itself may be a link.
//!
//! Every check runs before anything is written, so a refused start leaves the
//! output directory and the prepared data exactly as they were: [`plan`] only
//! lists what `overwrite_output_dir` deletes ([`StartPoint::discard`]), and the
//! trainer deletes it once its whole setup has succeeded.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::checkpoint::{self, RunIdentity, TrainerState};
use crate::config::{Config, Resume};
use crate::data::loader::Position;
use crate::durable;

/// The settings that shape the trained weights, as the job wrote them.
/// Throughput and memory knobs (threads, prefetch, logging, device, the
/// micro-batch size: `"auto"` may choose another on another GPU, activation
/// checkpointing) may change freely.
fn written_shaping(cfg: &Config) -> Value {
    let mut v = serde_json::json!({ "model": cfg.model, "data": cfg.data, "training": cfg.training });
    for (section, key) in [
        ("data", "masker_threads"),
        ("data", "prefetch_batches"),
        // Part of the prepared data's key, which a resume checks on its own.
        ("data", "invalid_utf8"),
        ("training", "threads"),
        ("training", "micro_batch_size"),
        ("training", "log_every"),
        ("training", "device"),
        ("training", "output_dir"),
        ("training", "activation_checkpointing"),
        ("training", "tf32"),
        ("training", "peak_tflops"),
    ] {
        v[section].as_object_mut().expect("sections are objects").remove(key);
    }
    v
}

/// The batch keys of `[training]`: replaced by the global batch in [`shaping_config`].
const BATCH_KEYS: [&str; 3] = ["batch_size", "grad_accum_steps", "global_batch_size"];

/// Settings that shape the trained weights: a resumed job must match them. The
/// batch is the global batch `global` only (`training.global_batch_size`), not
/// how the workers split it, so a job resumes on another world size; `None`
/// leaves the batch out (`mlm prepare`, which does not know the world size).
pub fn shaping_config(cfg: &Config, global: Option<usize>) -> Value {
    let mut v = written_shaping(cfg);
    let training = v["training"].as_object_mut().expect("sections are objects");
    for key in BATCH_KEYS {
        training.remove(key);
    }
    if let Some(g) = global {
        training.insert("global_batch_size".into(), g.into());
    }
    v
}

/// Hash of a [`shaping_config`] (recorded in checkpoints).
pub fn config_hash(shaping: &Value) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(shaping.to_string().as_bytes()))
}

/// Hash of the shaping settings as written, batch keys included: known before
/// the workers meet, and the same on every worker of one job (same config,
/// same world size), so the workers derive their job token from it.
pub fn job_hash(cfg: &Config) -> String {
    config_hash(&written_shaping(cfg))
}

/// Where a job starts.
#[derive(Debug, Default)]
pub struct StartPoint {
    /// The checkpoint to continue from, with its (checked) trainer state.
    pub checkpoint: Option<(PathBuf, TrainerState)>,
    /// The run this job continues or begins ([`plan`]'s; `None` on workers
    /// other than rank 0, which write no run files).
    pub run: Option<RunIdentity>,
    /// What `overwrite_output_dir` deletes before this start writes anything
    /// (with [`Apply::Apply`]): the earlier run's or newer checkpoints, and
    /// with a discarded run its metrics, curves, `tb/` and `run.json`.
    pub discard: Vec<PathBuf>,
}

impl StartPoint {
    /// The prepared data key the resumed run was trained on, when it recorded one.
    pub fn data_key(&self) -> Option<&str> {
        self.checkpoint.as_ref().and_then(|(_, s)| s.data_key.as_deref())
    }

    /// Deletes what `overwrite_output_dir` discards ([`StartPoint::discard`]),
    /// with a line saying so.
    pub fn discard_earlier(&self, out: &Path) -> Result<()> {
        if self.discard.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            "checkpoint.overwrite_output_dir = true: deleting {} from {}",
            list_names(&self.discard),
            out.display()
        );
        for p in &self.discard {
            durable::remove_dir_atomically(p).with_context(|| format!("cannot delete {}", p.display()))?;
        }
        Ok(())
    }
}

/// Whether [`plan`] lists what `overwrite_output_dir` deletes, or only checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// Check only (`mlm prepare`, workers other than rank 0).
    Check,
    /// Check, and list in [`StartPoint::discard`] what `overwrite_output_dir`
    /// discards, for rank 0 of `mlm train` (holding the output directory's
    /// lock) to delete.
    Apply,
}

/// Decides where the job starts and enforces the rules of the module doc;
/// `world` is the number of workers (`None` where it is unknown: the global
/// batch is then not compared).
pub fn plan(cfg: &Config, world: Option<usize>, apply: Apply) -> Result<StartPoint> {
    let out = &cfg.training.output_dir;
    let overwrite = cfg.checkpoint.overwrite_output_dir;
    refuse_links(cfg)?;
    let folder = checkpoint::read_run(out)?;
    let existing = checkpoint::list(out);
    let chosen = match &cfg.checkpoint.resume {
        Resume::None => None,
        Resume::Auto => newest_valid(&existing),
        Resume::Path(path) => Some(explicit(path)?),
    };
    let Some(dir) = chosen else {
        // A fresh start: only into a directory without another run's results.
        let results = results_in(out, &existing, None);
        let mut discard = Vec::new();
        if !results.is_empty() || overwrite {
            if !overwrite {
                let why = match (&cfg.checkpoint.resume, existing.is_empty()) {
                    (Resume::Auto, false) => "none of its checkpoints can be resumed (see the warnings above), and a \
                                              fresh start would overwrite them"
                        .to_string(),
                    (Resume::Auto, true) => {
                        "it has no checkpoint to resume, and a fresh start would overwrite it".into()
                    }
                    (r, _) => format!("checkpoint.resume = {} would start fresh and overwrite it", r.as_toml()),
                };
                // Resuming is advice only where a checkpoint can be resumed
                // (resume = "none" beside an intact one), never to a job that
                // already asked for it and found none.
                let resumable = !matches!(cfg.checkpoint.resume, Resume::Auto) && newest_valid(&existing).is_some();
                let resume = if resumable { "resume it (checkpoint.resume = \"auto\"), " } else { "" };
                bail!(
                    "training.output_dir {} holds an earlier run ({}): {why}; {resume}choose another \
                     training.output_dir, or set checkpoint.overwrite_output_dir = true to delete it",
                    out.display(),
                    list_names(&results)
                );
            }
            discard = discard_run(cfg, &results, apply);
        }
        return Ok(StartPoint { checkpoint: None, run: Some(RunIdentity::new_run()), discard });
    };
    let state = checked_state(&dir, cfg, world)?;
    let inside = same_dir(dir.parent().unwrap_or(Path::new("")), out);
    let folder_id = folder.as_ref().map(|r| r.run_id.clone()).or_else(|| recorded_run_id(out, &existing));
    let same_run = match (&folder_id, &state.run_id) {
        (Some(f), Some(c)) => f == c,
        // A checkpoint from before run ids, or a folder without one: the
        // folder's own checkpoints are its run's.
        _ => inside,
    };
    if !same_run {
        return fork(cfg, dir, state, folder, folder_id, &existing, apply);
    }
    // Only newer, valid checkpoints are in the way: damaged ones are replaced
    // as the run passes them, and best/ is this run's.
    let in_the_way: Vec<PathBuf> = results_in(out, &existing, Some(state.step))
        .into_iter()
        .filter(|p| *p != dir && p.file_name().is_some_and(|n| n != "best") && checkpoint::verify(p).is_ok())
        .collect();
    let mut discard = Vec::new();
    if !in_the_way.is_empty() {
        if !overwrite {
            bail!(
                "training.output_dir {} holds newer checkpoints of this run ({}) that resuming from {} would \
                 overwrite; resume the newest (checkpoint.resume = \"auto\"), choose another training.output_dir, or \
                 set checkpoint.overwrite_output_dir = true to delete them",
                out.display(),
                list_names(&in_the_way),
                dir.display()
            );
        }
        if apply == Apply::Apply {
            discard = in_the_way;
        }
    }
    let run = folder.unwrap_or_else(|| RunIdentity {
        run_id: state.run_id.clone().or(folder_id).unwrap_or_else(|| RunIdentity::new_run().run_id),
        parent_run_id: state.parent_run_id.clone(),
        forked_from: None,
    });
    Ok(StartPoint { checkpoint: Some((dir, state)), run: Some(run), discard })
}

/// A start from `dir`, a checkpoint of another run than the folder's: a fork,
/// refused where the folder holds a run (unless `overwrite_output_dir`, which
/// deletes that run first).
fn fork(
    cfg: &Config,
    dir: PathBuf,
    state: TrainerState,
    folder: Option<RunIdentity>,
    folder_id: Option<String>,
    existing: &[(usize, PathBuf)],
    apply: Apply,
) -> Result<StartPoint> {
    let out = &cfg.training.output_dir;
    let results: Vec<PathBuf> = results_in(out, existing, None).into_iter().filter(|p| *p != dir).collect();
    let mut discard = Vec::new();
    let restarted = if results.is_empty() {
        // The same fork started again after an attempt that saved nothing.
        folder.filter(|r| r.forked_from.as_deref().is_some_and(|f| same_dir(f, &dir)))
    } else if !cfg.checkpoint.overwrite_output_dir {
        bail!(
            "training.output_dir {} holds {} ({}) and {} is a checkpoint of {}: resuming it there would mix two \
             runs' checkpoints, best/ and metrics; resume it into a new or empty training.output_dir (a fork that \
             records its parent), or set checkpoint.overwrite_output_dir = true to delete the folder's run first",
            out.display(),
            run_name(folder_id.as_deref()),
            list_names(&results),
            dir.display(),
            run_name(state.run_id.as_deref())
        );
    } else {
        discard = discard_run(cfg, &results, apply);
        None
    };
    let from = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
    let run = restarted.unwrap_or_else(|| RunIdentity::fork(state.run_id.clone(), &from));
    Ok(StartPoint { checkpoint: Some((dir, state)), run: Some(run), discard })
}

/// "run 3f2a..." or, for one from before run ids, "a run without an id".
fn run_name(id: Option<&str>) -> String {
    id.map_or("a run without an id (older mlm)".into(), |i| format!("run {i}"))
}

/// The run id that the folder's checkpoints (newest first) or `best/` record,
/// for a folder without `run.json`.
fn recorded_run_id(out: &Path, existing: &[(usize, PathBuf)]) -> Option<String> {
    let dirs = existing.iter().rev().map(|(_, d)| d.clone()).chain([out.join("best")]);
    dirs.filter_map(|d| checkpoint::load_state(&d).ok()?.run_id).next()
}

/// Writes `<output_dir>/run.json` for the start [`plan`] chose (rank 0, once
/// every check has passed and the data is ready), with a line naming the run.
pub fn record_run(out: &Path, start: &StartPoint) -> Result<()> {
    let Some(run) = &start.run else { return Ok(()) };
    checkpoint::write_run(out, run)?;
    match &run.forked_from {
        Some(from) => tracing::info!(
            "run {}: a fork of {} from {}",
            run.run_id,
            run_name(run.parent_run_id.as_deref()),
            from.display()
        ),
        None => tracing::info!("run {}", run.run_id),
    }
    Ok(())
}

/// Refuses a start where a file or folder the run writes, replaces or deletes
/// is a symbolic link (it would write through it, out of the folder): checked
/// before anything is written. The output and store folders may be links.
fn refuse_links(cfg: &Config) -> Result<()> {
    let out = &cfg.training.output_dir;
    let mut paths: Vec<PathBuf> = [checkpoint::RUN_FILE, cfg.logging.metrics_file.as_str(), "curves.png", "best"]
        .iter()
        .map(|f| out.join(f))
        .collect();
    if cfg.logging.tensorboard {
        paths.push(out.join("tb"));
    }
    let entries = std::fs::read_dir(out).into_iter().flatten().flatten();
    paths.extend(entries.filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-")).map(|e| e.path()));
    paths.push(crate::lock::store_lock_path(&crate::data::prepare::store_dir(cfg)?));
    paths.iter().try_for_each(|p| durable::refuse_link(p))
}

/// The newest checkpoint whose checksums verify; broken ones are skipped with a warning.
fn newest_valid(existing: &[(usize, PathBuf)]) -> Option<PathBuf> {
    for (_, dir) in existing.iter().rev() {
        match checkpoint::verify(dir) {
            Ok(()) => return Some(dir.clone()),
            Err(e) => tracing::warn!("skipping damaged checkpoint: {}", crate::logging::one_line(&e)),
        }
    }
    None
}

/// `checkpoint.resume = <path>`: an intact step checkpoint.
fn explicit(path: &Path) -> Result<PathBuf> {
    let key = format!("checkpoint.resume = {:?}", path.display().to_string());
    if !path.is_dir() {
        bail!("{key}: no such checkpoint folder");
    }
    if !checkpoint::is_checkpoint(path) {
        if path.join("config.json").is_file() {
            bail!(
                "{key} is a model folder (such as best/), not a step checkpoint: it has no optimizer state to \
                 resume; name a checkpoint-<step> folder, or start from its weights with model.path = that folder \
                 and checkpoint.resume = \"none\""
            );
        }
        bail!("{key} is not a checkpoint folder (no trainer_state.json and optimizer.safetensors): name a checkpoint-<step> folder");
    }
    checkpoint::verify(path).with_context(|| format!("{key} cannot be resumed"))?;
    Ok(path.to_path_buf())
}

/// The trainer state of `dir`, checked against the current job of `world`
/// workers: same format, same shaping settings (unless allowed), and
/// self-consistent.
pub fn checked_state(dir: &Path, cfg: &Config, world: Option<usize>) -> Result<TrainerState> {
    let mut state = checkpoint::load_state(dir)?;
    let named = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("checkpoint-"))
        .and_then(|s| s.parse::<usize>().ok());
    if let Some(step) = named {
        if step != state.step {
            bail!(
                "{}: trainer_state.json says step {} but the folder is checkpoint-{step}: the checkpoint is damaged; \
                 resume another one (checkpoint.resume) or delete it",
                dir.display(),
                state.step
            );
        }
    }
    if state.best_step.is_some_and(|b| b > state.step) || state.nonfinite_skipped > state.step {
        bail!(
            "{}/trainer_state.json is inconsistent (best_step or skipped steps after its step {})",
            dir.display(),
            state.step
        );
    }
    if state.best_perplexity.is_some_and(|p| !(p.is_finite() && p >= 1.0)) {
        bail!("{}/trainer_state.json: best_perplexity {:?} is not a perplexity", dir.display(), state.best_perplexity);
    }
    let global = match world {
        Some(w) => Some(cfg.training.batch_shape(w)?.global()),
        None => None,
    };
    global_batch_of_old_state(&mut state.config, world);
    if global.is_none() {
        state.config["training"].as_object_mut().map(|t| t.remove("global_batch_size"));
    }
    let changes = differing_keys(&state.config, &shaping_config(cfg, global));
    if !changes.is_empty() && !cfg.checkpoint.allow_config_change {
        let batch = changes.iter().any(|c| c.starts_with("training.global_batch_size"));
        let hint = if batch && cfg.training.global_batch_size.is_none() {
            "; the global batch is workers x training.batch_size x training.grad_accum_steps: to resume on another \
             number of workers, set training.global_batch_size to the checkpoint's"
        } else {
            ""
        };
        bail!(
            "cannot resume from {}: the job's config changed ({}){hint}; restore it, start a new output_dir, \
             or set checkpoint.allow_config_change = true",
            dir.display(),
            changes.join("; ")
        );
    }
    if !changes.is_empty() {
        tracing::warn!("resuming with a changed config: {}", changes.join("; "));
    }
    Ok(state)
}

/// A state written before global batches (format 1) recorded `batch_size` and
/// `grad_accum_steps`, not its world size: its global batch is taken to be
/// theirs times this job's `world` (that format resumed on one world size only).
fn global_batch_of_old_state(config: &mut Value, world: Option<usize>) {
    let Some(training) = config.get_mut("training").and_then(Value::as_object_mut) else { return };
    if training.contains_key("global_batch_size") || !training.contains_key("batch_size") {
        return;
    }
    let num = |k: &str| training.get(k).and_then(Value::as_u64).unwrap_or(1);
    let per_worker = num("batch_size") * num("grad_accum_steps");
    training.remove("batch_size");
    training.remove("grad_accum_steps");
    if let Some(w) = world {
        training.insert("global_batch_size".into(), (per_worker * w as u64).into());
    }
}

/// The checks a resumed state needs once the data is known: its position must
/// lie within an epoch of `steps_per_epoch` steps, and the optimizer's update
/// count must match the steps taken.
pub fn check_position(dir: &Path, state: &TrainerState, steps_per_epoch: usize, optimizer_steps: i64) -> Result<()> {
    if state.position.step_in_epoch > steps_per_epoch {
        bail!(
            "{}/trainer_state.json: step {} of an epoch of {steps_per_epoch} steps: the checkpoint does not \
             belong to this data; resume another one or start a new training.output_dir",
            dir.display(),
            state.position.step_in_epoch
        );
    }
    let applied = state.step - state.nonfinite_skipped;
    if optimizer_steps as usize != applied {
        bail!(
            "{}: the optimizer state has {optimizer_steps} updates but trainer_state.json says {applied} \
             (step {} less {} skipped): the checkpoint is damaged; resume another one or delete it",
            dir.display(),
            state.step,
            state.nonfinite_skipped
        );
    }
    Ok(())
}

/// Refuses a state whose epoch, step of the epoch and step contradict each
/// other (an edited `epoch` would train on another epoch's order), and gives
/// the origin this job counts its epochs from: the saved one, or, when the
/// epoch length is now `steps_per_epoch` (another global batch or data, allowed
/// by `checkpoint.allow_config_change`) or the state predates origins, the
/// start of the epoch it resumes in. The position counts optimizer steps, so
/// the rule is the same on any number of workers and micro-batches.
pub fn check_epoch(dir: &Path, state: &TrainerState, steps_per_epoch: usize) -> Result<checkpoint::EpochOrigin> {
    let file = dir.join(checkpoint::STATE_FILE);
    let (step, Position { epoch, step_in_epoch }) = (state.step, state.position);
    let Some(before) = step.checked_sub(step_in_epoch).filter(|b| *b >= epoch) else {
        bail!(
            "{}: epoch {epoch} and step_in_epoch {step_in_epoch} contradict step {step} (every epoch takes at \
             least one step): the state was edited or is damaged; resume another checkpoint or delete this one",
            file.display()
        );
    };
    if let Some(o) = state.epoch_origin {
        let consistent =
            o.steps_per_epoch > 0 && step_in_epoch <= o.steps_per_epoch && o.step_of(state.position) == Some(step);
        if !consistent {
            bail!(
                "{}: epoch {epoch} and step_in_epoch {step_in_epoch} contradict step {step} (epochs of {} steps \
                 from step {}, epoch {}: epoch_origin): the state was edited or is damaged; resume another \
                 checkpoint or delete this one",
                file.display(),
                o.steps_per_epoch,
                o.step,
                o.epoch
            );
        }
        if o.steps_per_epoch == steps_per_epoch {
            return Ok(o);
        }
    }
    Ok(checkpoint::EpochOrigin { step: before, epoch, steps_per_epoch })
}

/// Makes `best/` hold the best evaluated model that a checkpoint exists for:
/// a job killed after writing the checkpoint of a new best evaluation but
/// before updating `best/` left an older model there.
pub fn complete_best(out: &Path, state: &TrainerState) -> Result<()> {
    let Some(step) = state.best_step else { return Ok(()) };
    if checkpoint::best_step(out) == Some(step) {
        return Ok(());
    }
    let dir = out.join(format!("checkpoint-{step}"));
    if checkpoint::verify(&dir).is_ok() {
        checkpoint::update_best(out, &dir)?;
        tracing::info!(
            "best/ brought up to date from {} (the best evaluation; the previous run stopped before copying it)",
            dir.display()
        );
    } else {
        tracing::warn!(
            "best/ does not hold the model of step {step} (the best evaluation so far) and {} is gone: it will be \
             replaced at the next better evaluation",
            dir.display()
        );
    }
    Ok(())
}

/// An earlier run's results in `out`: its checkpoints (those after `after` when
/// given) and `best/` (when its model is after `after`, or when `after` is none).
fn results_in(out: &Path, existing: &[(usize, PathBuf)], after: Option<usize>) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        existing.iter().filter(|(s, _)| after.is_none_or(|a| *s > a)).map(|(_, p)| p.clone()).collect();
    let best = out.join("best");
    if best.exists() {
        let later = match after {
            None => true,
            Some(a) => checkpoint::best_step(out).is_none_or(|s| s > a),
        };
        if later {
            v.push(best);
        }
    }
    v
}

/// What discarding the folder's run for `overwrite_output_dir` deletes (with
/// [`Apply::Apply`]): its `results`, and those of its metrics, curves,
/// TensorBoard events and identity that exist, so that the new run's do not
/// continue them.
fn discard_run(cfg: &Config, results: &[PathBuf], apply: Apply) -> Vec<PathBuf> {
    if apply == Apply::Check {
        return Vec::new();
    }
    let out = &cfg.training.output_dir;
    let logs = [cfg.logging.metrics_file.as_str(), "curves.png", "tb", checkpoint::RUN_FILE].map(|f| out.join(f));
    let logs = logs.into_iter().filter(|p| std::fs::symlink_metadata(p).is_ok());
    results.iter().cloned().chain(logs).collect()
}

fn list_names(paths: &[PathBuf]) -> String {
    let name = |p: &PathBuf| {
        let n = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if p.is_dir() {
            n + "/"
        } else {
            n
        }
    };
    let names: Vec<String> = paths.iter().map(name).collect();
    if names.len() > 4 {
        format!("{}, ... ({} in all)", names[..3].join(", "), names.len())
    } else {
        names.join(", ")
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// `section.key (old -> new)` for every leaf that differs.
pub fn differing_keys(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

fn walk(prefix: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                walk(&p, a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null), out);
            }
        }
        (a, b) if a != b => out.push(format!("{prefix} ({a} -> {b})")),
        _ => {}
    }
}

#[cfg(test)]
mod tests;
