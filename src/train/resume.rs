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
//! - `resume = <path>` must name a step checkpoint; from another directory it
//!   counts as a fresh start for this one; from this one, newer checkpoints than
//!   it are refused unless `overwrite_output_dir` (which deletes them).
//! - A resume whose shaping settings or prepared data changed is refused unless
//!   `checkpoint.allow_config_change = true`.
//!
//! Every check runs before anything is written, so a refused start leaves the
//! output directory and the prepared data exactly as they were.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::checkpoint::{self, TrainerState};
use crate::config::{Config, Resume};

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
}

impl StartPoint {
    /// The prepared data key the resumed run was trained on, when it recorded one.
    pub fn data_key(&self) -> Option<&str> {
        self.checkpoint.as_ref().and_then(|(_, s)| s.data_key.as_deref())
    }
}

/// Whether [`plan`] may delete what `overwrite_output_dir` allows, or only checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// Check only (`mlm prepare`, workers other than rank 0).
    Check,
    /// Check, then delete what `overwrite_output_dir` discards (rank 0 of
    /// `mlm train`, holding the output directory's lock).
    Apply,
}

/// Decides where the job starts and enforces the rules of the module doc;
/// `world` is the number of workers (`None` where it is unknown: the global
/// batch is then not compared).
pub fn plan(cfg: &Config, world: Option<usize>, apply: Apply) -> Result<StartPoint> {
    let out = &cfg.training.output_dir;
    let overwrite = cfg.checkpoint.overwrite_output_dir;
    let existing = checkpoint::list(out);
    let chosen = match &cfg.checkpoint.resume {
        Resume::None => None,
        Resume::Auto => newest_valid(&existing),
        Resume::Path(path) => Some(explicit(path)?),
    };
    let Some(dir) = chosen else {
        // A fresh start: only into a directory without another run's results.
        let results = results_in(out, &existing, None);
        if !results.is_empty() {
            if !overwrite {
                let why = match (&cfg.checkpoint.resume, existing.is_empty()) {
                    (Resume::Auto, false) => "none of its checkpoints can be resumed (see the warnings above), and a \
                                              fresh start would overwrite them"
                        .to_string(),
                    (Resume::Auto, true) => "a fresh start would overwrite it".to_string(),
                    (r, _) => format!("checkpoint.resume = {} would start fresh and overwrite it", r.as_toml()),
                };
                bail!(
                    "training.output_dir {} holds an earlier run ({}): {why}; resume it (checkpoint.resume = \"auto\"), \
                     choose another training.output_dir, or set checkpoint.overwrite_output_dir = true to delete it",
                    out.display(),
                    list_names(&results)
                );
            }
            discard(out, &results, apply)?;
            // The earlier run's curves too, so the new ones do not continue them.
            for f in [out.join(&cfg.logging.metrics_file), out.join("curves.png")] {
                if apply == Apply::Apply && f.is_file() {
                    std::fs::remove_file(&f).with_context(|| format!("cannot delete {}", f.display()))?;
                }
            }
        }
        return Ok(StartPoint::default());
    };
    let state = checked_state(&dir, cfg, world)?;
    let inside = same_dir(dir.parent().unwrap_or(Path::new("")), out);
    let later = results_in(out, &existing, Some(state.step)).into_iter().filter(|p| *p != dir);
    let in_the_way: Vec<PathBuf> = if inside {
        // Only newer, valid checkpoints: damaged ones are replaced as the run passes them.
        later.filter(|p| p.file_name().is_some_and(|n| n != "best") && checkpoint::verify(p).is_ok()).collect()
    } else {
        later.collect()
    };
    if !in_the_way.is_empty() {
        if !overwrite {
            let whose = if inside { "newer checkpoints of this run" } else { "another run" };
            bail!(
                "training.output_dir {} holds {whose} ({}) that resuming from {} would overwrite; resume the newest \
                 (checkpoint.resume = \"auto\"), choose another training.output_dir, or set \
                 checkpoint.overwrite_output_dir = true to delete them",
                out.display(),
                list_names(&in_the_way),
                dir.display()
            );
        }
        discard(out, &in_the_way, apply)?;
    }
    Ok(StartPoint { checkpoint: Some((dir, state)) })
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

/// Deletes what `overwrite_output_dir` discards, with a line saying so.
fn discard(out: &Path, paths: &[PathBuf], apply: Apply) -> Result<()> {
    if apply == Apply::Check {
        return Ok(());
    }
    tracing::warn!("checkpoint.overwrite_output_dir = true: deleting {} from {}", list_names(paths), out.display());
    for p in paths {
        std::fs::remove_dir_all(p).with_context(|| format!("cannot delete {}", p.display()))?;
    }
    Ok(())
}

fn list_names(paths: &[PathBuf]) -> String {
    let names: Vec<String> =
        paths.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned() + "/").collect();
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
mod tests {
    use super::*;

    #[test]
    fn changed_keys_are_named_with_both_values() {
        let a = serde_json::json!({"training": {"lr": 1e-4, "seed": 1}, "data": {"block_size": 128}});
        let b = serde_json::json!({"training": {"lr": 3e-5, "seed": 1}, "data": {"block_size": 128}});
        assert_eq!(differing_keys(&a, &b), vec!["training.lr (0.0001 -> 0.00003)".to_string()]);
    }

    /// The hash a checkpoint records for `c` on `world` workers.
    fn hash(c: &Config, world: usize) -> String {
        config_hash(&shaping_config(c, Some(c.training.batch_shape(world).unwrap().global())))
    }

    #[test]
    fn throughput_knobs_do_not_shape_the_job() {
        let mut c = Config::from_toml("[model]\npath = \"m\"\n").unwrap();
        let (h, job) = (hash(&c, 1), job_hash(&c));
        c.training.threads = 7;
        c.data.masker_threads = 5;
        c.training.micro_batch_size = crate::config::MicroBatchSize::Auto;
        assert_eq!((hash(&c, 1), job_hash(&c)), (h.clone(), job.clone()));
        c.training.micro_batch_size = crate::config::MicroBatchSize::Rows(2);
        assert_eq!((hash(&c, 1), job_hash(&c)), (h.clone(), job.clone()));
        c.training.lr = 1.0;
        assert_ne!(hash(&c, 1), h);
        assert_ne!(job_hash(&c), job);
    }

    #[test]
    fn the_global_batch_shapes_the_job_and_its_split_does_not() {
        let c = Config::from_toml("[model]\npath = \"m\"\n[training]\nglobal_batch_size = 16\n").unwrap();
        let h = hash(&c, 1);
        assert_eq!(hash(&c, 2), h);
        assert_eq!(hash(&c, 16), h);
        let mut split = c.clone();
        split.training.batch_size = Some(2);
        assert_eq!(hash(&split, 4), h, "4 workers x 2 x accumulation 2");
        split.training.global_batch_size = None;
        split.training.grad_accum_steps = Some(4);
        assert_eq!(hash(&split, 2), h, "2 workers x 2 x 4, without global_batch_size");
        assert_ne!(hash(&split, 1), h, "1 worker x 2 x 4 is another global batch");
        // What the workers agree on before they meet is the config as written.
        assert_ne!(job_hash(&split), job_hash(&c));
    }

    /// A checkpoint of `cfg` on `world` workers in `dir` (its trainer state only).
    fn checkpoint_of(dir: &Path, cfg: &Config, world: usize) -> PathBuf {
        let ckpt = dir.join("checkpoint-3");
        std::fs::create_dir_all(&ckpt).unwrap();
        let shaping = shaping_config(cfg, Some(cfg.training.batch_shape(world).unwrap().global()));
        let state = TrainerState {
            format_version: checkpoint::STATE_FORMAT,
            step: 3,
            config_hash: config_hash(&shaping),
            config: shaping,
            ..Default::default()
        };
        std::fs::write(ckpt.join("trainer_state.json"), serde_json::to_string(&state).unwrap()).unwrap();
        ckpt
    }

    #[test]
    fn a_changed_global_batch_is_refused_naming_it_and_a_changed_world_size_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Config::from_toml("[model]\npath = \"m\"\n[training]\nglobal_batch_size = 8\n").unwrap();
        let ckpt = checkpoint_of(tmp.path(), &c, 2);
        for world in [1, 2, 4, 8] {
            checked_state(&ckpt, &c, Some(world)).unwrap_or_else(|e| panic!("{world} workers: {e}"));
        }
        let mut other = c.clone();
        other.training.global_batch_size = Some(16);
        let e = checked_state(&ckpt, &other, Some(2)).unwrap_err().to_string();
        assert!(e.contains("training.global_batch_size (8 -> 16)") && e.contains("allow_config_change"), "{e}");
        // `mlm prepare` does not know the world size: it leaves the batch to `mlm train`.
        checked_state(&ckpt, &other, None).unwrap();
        // Per-worker keys: another world size is another global batch, and the
        // error says how to keep it.
        let mut per_worker = c.clone();
        (per_worker.training.global_batch_size, per_worker.training.batch_size) = (None, Some(4));
        checked_state(&ckpt, &per_worker, Some(2)).unwrap();
        let e = checked_state(&ckpt, &per_worker, Some(4)).unwrap_err().to_string();
        assert!(
            e.contains("training.global_batch_size (8 -> 16)") && e.contains("set training.global_batch_size"),
            "{e}"
        );
        other.checkpoint.allow_config_change = true;
        checked_state(&ckpt, &other, Some(2)).unwrap();
    }

    #[test]
    fn a_format_1_checkpoint_resumes_on_its_world_size_with_its_global_batch() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Config::from_toml("[model]\npath = \"m\"\n[training]\nbatch_size = 4\ngrad_accum_steps = 2\n").unwrap();
        let ckpt = tmp.path().join("checkpoint-3");
        std::fs::create_dir_all(&ckpt).unwrap();
        // As format 1 wrote it: the per-worker keys in the config, the position in batches.
        let mut config = written_shaping(&c);
        config["training"]["batch_size"] = 4.into();
        config["training"]["grad_accum_steps"] = 2.into();
        let old = serde_json::json!({
            "format_version": 1, "step": 3, "epoch": 0, "batch_in_epoch": 6, "best_perplexity": null,
            "best_step": null, "seed": 42, "tokens_seen": 0, "nonfinite_skipped": 0, "config_hash": "x",
            "config": config,
        });
        std::fs::write(ckpt.join("trainer_state.json"), old.to_string()).unwrap();
        let s = checked_state(&ckpt, &c, Some(2)).unwrap();
        assert_eq!(s.position.step_in_epoch, 3);
        let mut g = c.clone();
        (g.training.global_batch_size, g.training.batch_size, g.training.grad_accum_steps) = (Some(16), None, None);
        checked_state(&ckpt, &g, Some(2)).unwrap();
        let e = checked_state(&ckpt, &g, Some(1)).unwrap_err().to_string();
        assert!(e.contains("training.global_batch_size (8 -> 16)"), "{e}");
    }

    #[test]
    fn a_fresh_start_into_a_used_directory_is_refused_and_overwrite_deletes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir_all(out.join("checkpoint-200")).unwrap();
        std::fs::create_dir_all(out.join("best")).unwrap();
        let mut c = Config::from_toml("[model]\npath = \"m\"\n[checkpoint]\nresume = \"none\"\n").unwrap();
        c.training.output_dir = out.clone();
        let e = plan(&c, Some(1), Apply::Apply).unwrap_err().to_string();
        assert!(e.contains("checkpoint-200/") && e.contains("overwrite_output_dir"), "{e}");
        assert!(out.join("checkpoint-200").exists() && out.join("best").exists());
        c.checkpoint.overwrite_output_dir = true;
        plan(&c, Some(1), Apply::Check).unwrap();
        assert!(out.join("checkpoint-200").exists(), "a check deletes nothing");
        assert!(plan(&c, Some(1), Apply::Apply).unwrap().checkpoint.is_none());
        assert!(!out.join("checkpoint-200").exists() && !out.join("best").exists());
    }
}
