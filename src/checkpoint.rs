//! Checkpoints in Hugging Face's layout, written so that a crash never damages
//! what was already on disk.
//!
//! `<output_dir>/checkpoint-<step>/` holds `config.json`, `model.safetensors`,
//! `tokenizer.json`, `optimizer.safetensors` (AdamW moments), `trainer_state.json`
//! and `checksums.json`. Each is built in a hidden temporary folder, fsynced and
//! renamed into place; `best/` is swapped the same way; pruning never deletes the
//! newest checkpoint.
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::MaskedLm;
use crate::train::optimizer::FlatAdamW;

/// Version of the trainer-state format.
pub const STATE_FORMAT: u32 = 1;

/// Everything besides tensors that a resumed job needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub format_version: u32,
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch in progress (0-based) and batches of it already consumed.
    pub epoch: usize,
    pub batch_in_epoch: usize,
    pub best_perplexity: Option<f64>,
    pub best_step: Option<usize>,
    pub seed: u64,
    /// Training tokens consumed so far.
    pub tokens_seen: u64,
    /// Optimizer steps skipped for a non-finite loss or gradient.
    pub nonfinite_skipped: usize,
    /// Hash of the settings that shape the run, and the settings themselves (to
    /// name what changed when a resume is refused).
    pub config_hash: String,
    pub config: serde_json::Value,
}

/// Writes `checkpoint-<step>` under `out` and returns its path.
pub fn save(out: &Path, model: &MaskedLm, tokenizer: &Path, opt: &FlatAdamW, state: &TrainerState) -> Result<PathBuf> {
    let final_dir = out.join(format!("checkpoint-{}", state.step));
    write_dir_atomically(&final_dir, |tmp| {
        model.save_dir(tmp)?;
        fs::copy(tokenizer, tmp.join("tokenizer.json"))
            .with_context(|| format!("cannot copy {}", tokenizer.display()))?;
        let step = tch::Tensor::from(opt.step);
        tch::Tensor::write_safetensors(
            &[("exp_avg", &opt.exp_avg), ("exp_avg_sq", &opt.exp_avg_sq), ("step", &step)],
            tmp.join("optimizer.safetensors"),
        )
        .context("cannot write optimizer.safetensors")?;
        write_json(&tmp.join("trainer_state.json"), state)?;
        write_checksums(tmp)
    })?;
    Ok(final_dir)
}

/// Replaces `<out>/best` with the model files of `checkpoint`.
pub fn update_best(out: &Path, checkpoint: &Path) -> Result<()> {
    write_dir_atomically(&out.join("best"), |tmp| {
        for f in ["config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"] {
            fs::copy(checkpoint.join(f), tmp.join(f))
                .with_context(|| format!("cannot copy {}", checkpoint.join(f).display()))?;
        }
        write_checksums(tmp)
    })
}

/// Step checkpoints under `out`, oldest first.
pub fn list(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Deletes all but the newest `keep_last` step checkpoints (at least one is kept).
pub fn prune(out: &Path, keep_last: usize) -> Result<()> {
    let all = list(out);
    let n_drop = all.len().saturating_sub(keep_last.max(1));
    for (_, dir) in all.into_iter().take(n_drop) {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot remove old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

/// Cleans up after a crash in the middle of a write: a `best/` moved aside but
/// not yet replaced is put back, and unfinished temporary folders are removed.
pub fn recover(out: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(out) else { return Ok(()) };
    let mut leftovers: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    leftovers.sort();
    for p in leftovers {
        let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix('.') else { continue };
        if let Some((target, _pid)) = rest.rsplit_once(".old-") {
            let dest = out.join(target);
            if dest.exists() {
                fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
            } else {
                tracing::warn!("restoring {} interrupted while being replaced", dest.display());
                fs::rename(&p, &dest).with_context(|| format!("cannot restore {}", dest.display()))?;
            }
        } else if rest.contains(".tmp-") && p.is_dir() {
            tracing::info!("removing unfinished {}", p.display());
            fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    Ok(())
}

/// Builds a folder through `fill(tmp)` next to `dir`, then swaps it in; the old
/// content of `dir` stays intact until the new one is complete and synced.
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir.parent().context("checkpoint path has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create output directory {}", parent.display()))?;
    let name = dir.file_name().context("checkpoint path has no name")?.to_string_lossy().into_owned();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = fill(&tmp).and_then(|_| sync_dir_tree(&tmp));
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        fs::rename(dir, &old).with_context(|| format!("cannot move aside {}", dir.display()))?;
    }
    fs::rename(&tmp, dir).with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    File::open(parent).and_then(|f| f.sync_all()).ok();
    if old.exists() {
        fs::remove_dir_all(&old).ok();
    }
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(serde_json::to_string_pretty(value)?.as_bytes())?;
    Ok(())
}

/// Writes `checksums.json`: sha256 of every other file of the folder.
fn write_checksums(dir: &Path) -> Result<()> {
    let mut sums = std::collections::BTreeMap::new();
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_file() {
            sums.insert(p.file_name().unwrap().to_string_lossy().into_owned(), sha256_file(&p)?);
        }
    }
    write_json(&dir.join("checksums.json"), &sums)
}

/// Whether every file listed in `dir/checksums.json` is present and intact.
pub fn verify(dir: &Path) -> Result<()> {
    let text = fs::read_to_string(dir.join("checksums.json"))
        .with_context(|| format!("{}: no checksums.json", dir.display()))?;
    let sums: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&text).with_context(|| format!("{}: bad checksums.json", dir.display()))?;
    for (file, want) in sums {
        let got = sha256_file(&dir.join(&file))?;
        anyhow::ensure!(got == want, "{}: {file} does not match its checksum", dir.display());
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

fn sync_dir_tree(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_file() {
            File::open(&p)?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}
