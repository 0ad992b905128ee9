//! Checkpoints in Hugging Face's layout, written so that a crash never damages
//! what was already on disk, and read back by the same module.
//!
//! `<output_dir>/checkpoint-<step>/` holds `config.json`, `model.safetensors`,
//! `tokenizer.json`, `optimizer.safetensors` (AdamW moments), `trainer_state.json`
//! and `checksums.json`. Each is built in a hidden temporary folder, fsynced and
//! renamed into place ([`crate::durable`]); `best/` is swapped the same way;
//! pruning never deletes the newest checkpoint, and deletes each old one in
//! one step (renamed aside first), so a crash never leaves a half-deleted one.
//! Which checkpoint a job resumes from is policy, and lives in `train::resume`.
//!
//! Every run has an identity ([`RunIdentity`]): a random id made at its fresh
//! start, written in `<output_dir>/run.json` and in each checkpoint's
//! `trainer_state.json`, so that a start can tell its own run's checkpoints
//! from another run's. Nothing here writes through a symbolic link
//! ([`crate::durable::open_run_file`]).
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::data::loader::Position;
use crate::durable::{self, write_json};
use crate::model::MaskedLm;

pub use crate::durable::sha256_file;

/// Version of the trainer-state format. 2: the position counts optimizer steps
/// of the epoch (`step_in_epoch`), whatever the number of workers; 1 counted
/// each worker's loader batches (`batch_in_epoch`), still read.
pub const STATE_FORMAT: u32 = 2;

pub const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const CHECKSUMS_FILE: &str = "checksums.json";
/// The run identity of an output folder.
pub const RUN_FILE: &str = "run.json";
/// Names of the optimizer tensors in `optimizer.safetensors`.
const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const STEP: &str = "step";
/// The model files that `best/` holds.
const MODEL_FILES: [&str; 4] = ["config.json", "model.safetensors", "tokenizer.json", STATE_FILE];

/// Everything besides tensors that a resumed job needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub format_version: u32,
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch in progress and batches of it already consumed (flat in the JSON).
    #[serde(flatten)]
    pub position: Position,
    pub best_perplexity: Option<f64>,
    pub best_step: Option<usize>,
    pub seed: u64,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// Optimizer steps skipped for a non-finite loss or gradient (in fp16,
    /// overflows of the loss scale included).
    pub nonfinite_skipped: usize,
    /// fp16's dynamic loss scale after the last step (`GradScaler`'s state).
    /// Absent in fp32 and bf16, and in states written before fp16 existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScaleState>,
    /// Hash of the settings that shape the run, and the settings themselves (to
    /// name what changed when a resume is refused).
    pub config_hash: String,
    pub config: serde_json::Value,
    /// The prepared data's `inputs_key` (its inputs and data settings): a resume
    /// on other data is refused. Absent in states written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_key: Option<String>,
    /// The run that wrote this state ([`RunIdentity`]), and the run it was
    /// forked from. Absent in states written before runs had ids: such a
    /// checkpoint resumes into its own folder as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_run_id: Option<String>,
    /// Where the position's epochs are counted from: the epoch and step
    /// [`EpochOrigin`] names, in epochs of its `steps_per_epoch` steps. Ties
    /// `epoch` and `step_in_epoch` to `step`, so that a state whose fields
    /// contradict each other is refused. Absent in states written before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_origin: Option<EpochOrigin>,
}

/// Since optimizer step `step`, which began epoch `epoch`, every epoch has
/// `steps_per_epoch` steps (0 and 0 for a run whose data and global batch never
/// changed; a resume with `checkpoint.allow_config_change` onto another epoch
/// length moves it to the start of the epoch it resumes in).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EpochOrigin {
    pub step: usize,
    pub epoch: usize,
    pub steps_per_epoch: usize,
}

impl EpochOrigin {
    /// The step that `position` is reached at, when it lies at or after this
    /// origin (the end of an epoch may be recorded as its last step count or as
    /// the next epoch's step 0: both give the same step).
    pub fn step_of(&self, position: Position) -> Option<usize> {
        let epochs = position.epoch.checked_sub(self.epoch)?;
        epochs.checked_mul(self.steps_per_epoch)?.checked_add(self.step)?.checked_add(position.step_in_epoch)
    }
}

/// The dynamic loss scale of fp16 training, as `GradScaler.state_dict()`
/// keeps it: the scale and the clean steps in a row since it last changed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaleState {
    pub scale: f64,
    pub growth_tracker: i64,
}

/// Who a run is: `<output_dir>/run.json`. A fresh start makes a new id; a
/// resume of the folder's own checkpoint keeps it; a start from another run's
/// checkpoint into an empty folder is a fork, a new run that records its parent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunIdentity {
    pub run_id: String,
    /// The run whose checkpoint this one started from (a fork), when it had an id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_run_id: Option<String>,
    /// The checkpoint a fork started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<PathBuf>,
}

impl RunIdentity {
    /// A new run with a random id.
    pub fn new_run() -> Self {
        Self { run_id: new_run_id(), parent_run_id: None, forked_from: None }
    }

    /// A new run started from `checkpoint` of the run `parent` (a fork).
    pub fn fork(parent: Option<String>, checkpoint: &Path) -> Self {
        Self { run_id: new_run_id(), parent_run_id: parent, forked_from: Some(checkpoint.to_path_buf()) }
    }
}

/// 16 random hex digits (the kernel's random source; the clock and the PID
/// where it fails).
fn new_run_id() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        bytes = (t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 40)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The identity recorded in `<out>/run.json`, `None` where there is none (a new
/// folder, or one written before runs had ids). A link there is refused.
pub fn read_run(out: &Path) -> Result<Option<RunIdentity>> {
    let path = out.join(RUN_FILE);
    durable::refuse_link(&path)?;
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let run: RunIdentity = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a run identity this mlm can read: restore it, or choose another training.output_dir",
            path.display()
        )
    })?;
    Ok(Some(run))
}

/// Writes `<out>/run.json` atomically (never through a link).
pub fn write_run(out: &Path, run: &RunIdentity) -> Result<()> {
    durable::write_file_atomically(&out.join(RUN_FILE), serde_json::to_string_pretty(run)?.as_bytes())
}

/// AdamW's state as saved: first and second moments over the flat parameter
/// buffer, and the number of updates applied.
#[derive(Debug)]
pub struct OptimizerState {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub step: i64,
}

/// Writes `checkpoint-<step>` under `out` and returns its path.
pub fn save(
    out: &Path,
    model: &MaskedLm,
    tokenizer_json: &[u8],
    opt: &OptimizerState,
    state: &TrainerState,
) -> Result<PathBuf> {
    let final_dir = out.join(format!("checkpoint-{}", state.step));
    durable::write_dir_atomically(&final_dir, |tmp| {
        model.save_dir(tmp)?;
        durable::write_file(&tmp.join("tokenizer.json"), tokenizer_json)?;
        let step = Tensor::from(opt.step);
        Tensor::write_safetensors(
            &[(EXP_AVG, &opt.exp_avg), (EXP_AVG_SQ, &opt.exp_avg_sq), (STEP, &step)],
            tmp.join(OPTIMIZER_FILE),
        )
        .with_context(|| format!("cannot write {OPTIMIZER_FILE}"))?;
        write_json(&tmp.join(STATE_FILE), state)?;
        write_checksums(tmp)
    })?;
    Ok(final_dir)
}

/// Reads `trainer_state.json` of a checkpoint (or of `best/`), in the current
/// format (a format-1 state is converted: [`position_of_format_1`]).
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    // A fresh start in the same folder needs both keys: resume = "none" alone
    // is refused there (the folder holds a run).
    let fresh = "start a new training.output_dir, or start over in this one with checkpoint.resume = \"none\" and \
                 checkpoint.overwrite_output_dir = true (which deletes its run)";
    let not_ours =
        || format!("{}: not a trainer state this mlm can resume (another version wrote it?); {fresh}", path.display());
    let mut json: serde_json::Value = serde_json::from_str(&text).with_context(not_ours)?;
    match json.get("format_version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(STATE_FORMAT) => {}
        Some(1) => position_of_format_1(&mut json).with_context(not_ours)?,
        v => bail!(
            "{}: format version {} (this mlm reads {STATE_FORMAT} and 1); {fresh}",
            path.display(),
            v.map_or("none".into(), |v| v.to_string())
        ),
    }
    serde_json::from_value(json).with_context(not_ours)
}

/// A format-1 state counted the loader batches of each worker (`batch_in_epoch`),
/// `grad_accum_steps` per step (its own config says how many): the steps of
/// the epoch are their quotient.
fn position_of_format_1(state: &mut serde_json::Value) -> Result<()> {
    let accum = state["config"]["training"]["grad_accum_steps"].as_u64().unwrap_or(1).max(1);
    let obj = state.as_object_mut().context("not an object")?;
    let batches = obj.remove("batch_in_epoch").and_then(|b| b.as_u64()).context("no batch_in_epoch")?;
    obj.insert("step_in_epoch".into(), (batches / accum).into());
    obj.insert("format_version".into(), STATE_FORMAT.into());
    Ok(())
}

/// What a checkpoint gives a resumed job besides its (already checked)
/// trainer state, in one call: the weights, loaded into `master`, and the
/// optimizer's moments and step count for its trainable parameters.
pub fn load(dir: &Path, master: &MaskedLm) -> Result<OptimizerState> {
    let (file, tensors) = crate::model::weights::read_dir(dir)?;
    let report = crate::model::weights::load_into(&master.vs, master.arch, tensors, &file)?;
    if !report.missing.is_empty() {
        bail!("{}: checkpoint lacks {}", dir.display(), report.missing.join(", "));
    }
    let trainable: i64 = master.vs.variables().values().filter(|t| t.requires_grad()).map(|t| t.numel() as i64).sum();
    load_optimizer(dir, trainable)
}

/// AdamW's moments and step count saved beside the model; `numel` is the size
/// of the model's flat parameter buffer.
pub fn load_optimizer(dir: &Path, numel: i64) -> Result<OptimizerState> {
    let path = dir.join(OPTIMIZER_FILE);
    let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), crate::logging::first_line(&e.to_string())))?
        .into_iter()
        .collect();
    let get = |name: &str| -> Result<Tensor> {
        let t = tensors.get(name).with_context(|| format!("{}: no tensor {name}", path.display()))?;
        Ok(t.shallow_clone())
    };
    let (m, v, step) = (get(EXP_AVG)?, get(EXP_AVG_SQ)?, get(STEP)?);
    if m.numel() as i64 != numel || v.numel() as i64 != numel {
        bail!("{}: moments of {} elements, the model has {numel}", path.display(), m.numel());
    }
    if step.numel() != 1 {
        bail!("{}: `{STEP}` is not a single number", path.display());
    }
    let step = step.int64_value(&[]);
    if step < 0 {
        bail!("{}: negative step count {step}", path.display());
    }
    Ok(OptimizerState { exp_avg: m, exp_avg_sq: v, step })
}

/// Whether `dir` is a step checkpoint (not `best/` or an exported model): it
/// has the optimizer state and the trainer state a resume needs.
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join(OPTIMIZER_FILE).is_file() && dir.join(STATE_FILE).is_file()
}

/// Replaces `<out>/best` with the model files of `checkpoint`.
pub fn update_best(out: &Path, checkpoint: &Path) -> Result<()> {
    durable::write_dir_atomically(&out.join("best"), |tmp| {
        for f in MODEL_FILES {
            durable::copy_file(&checkpoint.join(f), &tmp.join(f))?;
        }
        write_checksums(tmp)
    })
}

/// The step of the model in `<out>/best`, when it is there and intact.
pub fn best_step(out: &Path) -> Option<usize> {
    let best = out.join("best");
    verify(&best).ok()?;
    load_state(&best).ok().map(|s| s.step)
}

/// Step checkpoints under `out`, oldest first: real folders only (a link
/// named like a checkpoint is no checkpoint of this run; a start refuses it).
pub fn list(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.file_type().ok()?.is_dir().then_some(())?;
            Some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// After saving the checkpoint of step `current`: deletes all but the newest
/// `keep_last` of this run's checkpoints up to `current` (at least `current`
/// itself is kept). Checkpoints of later steps can only be damaged ones that
/// the resume skipped (a lock keeps other jobs out, and a fresh start refuses a
/// used directory): they are removed too, as the run has now passed them.
/// Only checkpoints this run wrote are deleted ([`written_by`]): any other
/// folder named like one (a user's, another run's, an incomplete one) is left
/// as it is and named once in a warning.
pub fn prune(out: &Path, keep_last: usize, current: usize, run_id: Option<&str>) -> Result<()> {
    let (ours, others): (Vec<_>, Vec<_>) = list(out).into_iter().partition(|(s, d)| written_by(d, *s, run_id));
    warn_left(&others);
    let (past, future): (Vec<_>, Vec<_>) = ours.into_iter().partition(|(s, _)| *s <= current);
    let n_drop = past.len().saturating_sub(keep_last.max(1));
    for (step, dir) in past.into_iter().take(n_drop).chain(future) {
        if step > current {
            tracing::warn!("removing {}, a damaged checkpoint from before the resume", dir.display());
        }
        durable::remove_dir_atomically(&dir)
            .with_context(|| format!("cannot remove old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

/// Whether `dir`, named `checkpoint-<step>`, is a checkpoint that the run
/// `run_id` wrote: complete (optimizer state, trainer state and checksums),
/// its trainer state of that step and of that run (or, written before runs
/// had ids, of none: the folder's own run resumed from it).
fn written_by(dir: &Path, step: usize, run_id: Option<&str>) -> bool {
    if !is_checkpoint(dir) || !dir.join(CHECKSUMS_FILE).is_file() {
        return false;
    }
    match load_state(dir) {
        Ok(s) => s.step == step && (s.run_id.is_none() || s.run_id.as_deref() == run_id),
        Err(_) => false,
    }
}

/// Warns, once per folder and process, of folders named like checkpoints
/// that pruning leaves because this run did not write them.
fn warn_left(others: &[(usize, PathBuf)]) {
    static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    let new: Vec<&PathBuf> = others.iter().map(|(_, d)| d).filter(|d| !warned.contains(d)).collect();
    if new.is_empty() {
        return;
    }
    let names: Vec<String> = new.iter().map(|d| d.display().to_string()).collect();
    tracing::warn!(
        "not pruning {}: named like checkpoints, but not complete checkpoints of this run (another run's, or \
         someone's files); move them out of the output folder if they are not needed",
        names.join(", ")
    );
    warned.extend(new.into_iter().cloned());
}

/// Cleans up after a crash in the middle of a write in `out`: a checkpoint or
/// `best/` moved aside but not yet replaced is put back, unfinished temporary
/// folders are removed. Only under the output directory's lock.
pub fn recover(out: &Path) -> Result<()> {
    durable::recover(out, |name| name == "best" || name.starts_with("checkpoint-"))
}

/// Writes `checksums.json`: sha256 of every other file of the folder.
fn write_checksums(dir: &Path) -> Result<()> {
    let mut sums = BTreeMap::new();
    for e in fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_file() {
            sums.insert(p.file_name().unwrap_or_default().to_string_lossy().into_owned(), sha256_file(&p)?);
        }
    }
    write_json(&dir.join(CHECKSUMS_FILE), &sums)
}

/// Whether every file listed in `dir/checksums.json` is present and intact.
pub fn verify(dir: &Path) -> Result<()> {
    let text = fs::read_to_string(dir.join(CHECKSUMS_FILE))
        .with_context(|| format!("{}: no {CHECKSUMS_FILE}", dir.display()))?;
    let sums: BTreeMap<String, String> =
        serde_json::from_str(&text).with_context(|| format!("{}: bad {CHECKSUMS_FILE}", dir.display()))?;
    for (file, want) in sums {
        let got = sha256_file(&dir.join(&file))?;
        anyhow::ensure!(got == want, "{}: {file} does not match its checksum", dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "0123456789abcdef";

    /// Checkpoints of the run `RUN` (their files as far as pruning reads them).
    fn touch_checkpoints(out: &Path, steps: &[usize]) {
        touch_run_checkpoints(out, steps, Some(RUN));
    }

    fn touch_run_checkpoints(out: &Path, steps: &[usize], run: Option<&str>) {
        for s in steps {
            let dir = out.join(format!("checkpoint-{s}"));
            fs::create_dir_all(&dir).unwrap();
            let state = TrainerState {
                format_version: STATE_FORMAT,
                step: *s,
                run_id: run.map(String::from),
                ..Default::default()
            };
            write_json(&dir.join(STATE_FILE), &state).unwrap();
            fs::write(dir.join(OPTIMIZER_FILE), "").unwrap();
            write_checksums(&dir).unwrap();
        }
    }

    fn steps(out: &Path) -> Vec<usize> {
        list(out).into_iter().map(|(s, _)| s).collect()
    }

    #[test]
    fn prune_keeps_the_newest_up_to_the_current_step_and_drops_later_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        touch_checkpoints(tmp.path(), &[10, 20, 30, 200]);
        prune(tmp.path(), 2, 30, Some(RUN)).unwrap();
        assert_eq!(steps(tmp.path()), vec![20, 30]);
        prune(tmp.path(), 0, 30, Some(RUN)).unwrap();
        assert_eq!(steps(tmp.path()), vec![30]);
    }

    #[test]
    fn prune_deletes_only_checkpoints_this_run_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        touch_checkpoints(out, &[20, 30, 40]);
        // A user's folder, another run's checkpoint, a half-made one, one whose
        // state names another step, and one from before run ids (this folder's).
        fs::create_dir_all(out.join("checkpoint-1")).unwrap();
        fs::write(out.join("checkpoint-1/notes.txt"), "mine").unwrap();
        touch_run_checkpoints(out, &[2], Some("fedcba9876543210"));
        touch_checkpoints(out, &[3]);
        fs::remove_file(out.join(format!("checkpoint-3/{CHECKSUMS_FILE}"))).unwrap();
        touch_checkpoints(out, &[4]);
        fs::rename(out.join("checkpoint-4"), out.join("checkpoint-5")).unwrap();
        touch_run_checkpoints(out, &[10], None);
        prune(out, 1, 40, Some(RUN)).unwrap();
        assert_eq!(steps(out), vec![1, 2, 3, 5, 40]);
        assert_eq!(fs::read_to_string(out.join("checkpoint-1/notes.txt")).unwrap(), "mine");
    }

    #[test]
    fn a_format_1_state_is_read_with_its_position_in_steps() {
        let tmp = tempfile::tempdir().unwrap();
        let old = serde_json::json!({
            "format_version": 1, "step": 14, "epoch": 1, "batch_in_epoch": 12, "best_perplexity": null,
            "best_step": null, "seed": 42, "tokens_seen": 100, "nonfinite_skipped": 0, "config_hash": "abc",
            "config": {"training": {"batch_size": 8, "grad_accum_steps": 3}},
        });
        fs::write(tmp.path().join(STATE_FILE), old.to_string()).unwrap();
        let s = load_state(tmp.path()).unwrap();
        assert_eq!((s.format_version, s.step, s.position), (STATE_FORMAT, 14, Position { epoch: 1, step_in_epoch: 4 }));
        let saved = serde_json::to_value(&s).unwrap();
        assert!(saved.get("batch_in_epoch").is_none() && saved["step_in_epoch"] == 4, "{saved}");
        fs::write(tmp.path().join(STATE_FILE), r#"{"format_version": 7}"#).unwrap();
        let e = load_state(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("format version 7 (this mlm reads 2 and 1)"), "{e}");
        // A fresh start in the run's folder is refused without overwrite_output_dir.
        assert!(e.contains("checkpoint.resume = \"none\" and checkpoint.overwrite_output_dir = true"), "{e}");
    }

    #[test]
    fn a_file_named_like_a_checkpoint_is_not_one() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("checkpoint-5"), "x").unwrap();
        assert!(list(tmp.path()).is_empty());
    }

    #[test]
    fn a_link_named_like_a_checkpoint_is_not_listed_nor_pruned_through() {
        let tmp = tempfile::tempdir().unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        touch_checkpoints(&elsewhere, &[1]);
        let out = tmp.path().join("out");
        touch_checkpoints(&out, &[2, 3]);
        std::os::unix::fs::symlink(elsewhere.join("checkpoint-1"), out.join("checkpoint-1")).unwrap();
        assert_eq!(steps(&out), vec![2, 3]);
        prune(&out, 1, 3, Some(RUN)).unwrap();
        assert_eq!(steps(&out), vec![3]);
        assert!(elsewhere.join("checkpoint-1").is_dir(), "the link's target is kept");
    }

    #[test]
    fn the_run_identity_round_trips_and_old_states_have_none() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(read_run(tmp.path()).unwrap(), None);
        let a = RunIdentity::new_run();
        let b = RunIdentity::fork(Some(a.run_id.clone()), Path::new("x/checkpoint-3"));
        assert_eq!(a.run_id.len(), 16);
        assert_ne!(a.run_id, b.run_id);
        write_run(tmp.path(), &b).unwrap();
        assert_eq!(read_run(tmp.path()).unwrap(), Some(b));
        fs::write(
            tmp.path().join(STATE_FILE),
            r#"{"format_version": 2, "step": 1, "epoch": 0, "step_in_epoch": 1,
            "best_perplexity": null, "best_step": null, "seed": 1, "tokens_seen": 0, "nonfinite_skipped": 0,
            "config_hash": "h", "config": {}}"#,
        )
        .unwrap();
        let s = load_state(tmp.path()).unwrap();
        assert_eq!((s.run_id, s.parent_run_id), (None, None));
        let other = tmp.path().join("other.json");
        fs::write(&other, "{}").unwrap();
        fs::remove_file(tmp.path().join(RUN_FILE)).unwrap();
        std::os::unix::fs::symlink(&other, tmp.path().join(RUN_FILE)).unwrap();
        let e = read_run(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("run.json is a symbolic link"), "{e}");
    }
}
