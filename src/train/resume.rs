//! Resuming: which checkpoint, whether the job is still the same job, and the
//! state to continue from. The data position is restored by arithmetic (epoch,
//! batch in epoch), never by replaying batches.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tch::Tensor;

use crate::checkpoint::{self, TrainerState, STATE_FORMAT};
use crate::config::Config;

/// Settings that shape the trained weights: a resumed job must match them.
/// Throughput knobs (threads, prefetch, logging, device) may change freely.
pub fn shaping_config(cfg: &Config) -> Value {
    let mut v = serde_json::json!({ "model": cfg.model, "data": cfg.data, "training": cfg.training });
    for (section, key) in [
        ("data", "masker_threads"),
        ("data", "prefetch_batches"),
        ("training", "threads"),
        ("training", "log_every"),
        ("training", "device"),
        ("training", "output_dir"),
    ] {
        v[section].as_object_mut().expect("sections are objects").remove(key);
    }
    v
}

/// Hash of [`shaping_config`].
pub fn config_hash(cfg: &Config) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(shaping_config(cfg).to_string().as_bytes()))
}

/// The checkpoint to resume from, as `checkpoint.resume` says: "none", "auto"
/// (the newest checkpoint whose checksums verify; broken ones are skipped with a
/// warning) or a checkpoint directory.
pub fn find(cfg: &Config) -> Result<Option<PathBuf>> {
    let out = &cfg.training.output_dir;
    match cfg.checkpoint.resume.as_str() {
        "none" => Ok(None),
        "auto" => {
            for (_, dir) in checkpoint::list(out).into_iter().rev() {
                match checkpoint::verify(&dir) {
                    Ok(()) => return Ok(Some(dir)),
                    Err(e) => tracing::warn!("skipping damaged checkpoint: {}", crate::logging::one_line(&e)),
                }
            }
            Ok(None)
        }
        path => {
            let dir = PathBuf::from(path);
            checkpoint::verify(&dir).with_context(|| format!("checkpoint.resume = {path:?} cannot be resumed"))?;
            Ok(Some(dir))
        }
    }
}

/// Reads and checks `trainer_state.json` of `dir` against the current job.
pub fn load_state(dir: &Path, cfg: &Config) -> Result<TrainerState> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let fresh = "start a new training.output_dir or set checkpoint.resume = \"none\"";
    let state: TrainerState = serde_json::from_str(&text).with_context(|| {
        format!("{}: not a trainer state this mlm can resume (another version wrote it?); {fresh}", path.display())
    })?;
    if state.format_version != STATE_FORMAT {
        bail!(
            "{}: format version {} (this mlm reads {STATE_FORMAT}); {fresh}",
            path.display(),
            state.format_version
        );
    }
    let changes = differing_keys(&state.config, &shaping_config(cfg));
    if !changes.is_empty() && !cfg.checkpoint.allow_config_change {
        bail!(
            "cannot resume from {}: the job's config changed ({}); restore it, start a new output_dir, \
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

/// AdamW's moments and step count saved beside the model.
pub fn load_moments(dir: &Path, numel: i64) -> Result<(Tensor, Tensor, i64)> {
    let path = dir.join("optimizer.safetensors");
    let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        .into_iter()
        .collect();
    let get = |name: &str| -> Result<Tensor> {
        let t = tensors.get(name).with_context(|| format!("{}: no tensor {name}", path.display()))?;
        Ok(t.shallow_clone())
    };
    let (m, v, step) = (get("exp_avg")?, get("exp_avg_sq")?, get("step")?);
    if m.numel() as i64 != numel || v.numel() as i64 != numel {
        bail!("{}: moments of {} elements, the model has {numel}", path.display(), m.numel());
    }
    Ok((m, v, step.int64_value(&[])))
}

/// `section.key (old -> new)` for every leaf that differs.
fn differing_keys(old: &Value, new: &Value) -> Vec<String> {
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

    #[test]
    fn throughput_knobs_do_not_shape_the_job() {
        let mut c = Config::from_toml("[model]\npath = \"m\"\n").unwrap();
        let h = config_hash(&c);
        c.training.threads = 7;
        c.data.masker_threads = 5;
        assert_eq!(config_hash(&c), h);
        c.training.lr = 1.0;
        assert_ne!(config_hash(&c), h);
    }
}
