//! Weight files on disk and the mapping between Hugging Face checkpoint names and
//! our parameter names, by the name map of the model's spec (`ArchSpec::names`,
//! at the end of each model file).
//!
//! Our VarStore names are exactly the names `save_pretrained` writes for the MLM
//! class (`bert.*` + `cls.predictions.*`, `distilbert.*` + `vocab_*`, `roberta.*` +
//! `lm_head.*`, `deberta.*` + `cls.predictions.*`), so saving is a plain dump.
//! GPT-2's are `transformer.*`, its head tied to `transformer.wte.weight`.
//! DeBERTa-v3 checkpoints keep their head as `lm_predictions.lm_head.*` (HF's
//! `legacy: false` layout): the same parameters, mapped onto `cls.predictions.*`. Loading accepts what real checkpoints contain besides those:
//! base-model names without the prefix (`embeddings.*` from a `BertModel`), the
//! old LayerNorm names `gamma`/`beta`, the tied decoder weight (ignored: it is the
//! word embedding matrix), `cls.predictions.decoder.bias` (an alias of
//! `cls.predictions.bias`) and the `position_ids` / `token_type_ids` buffers that
//! older versions of transformers saved.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, View};
use tch::{nn::VarStore, Device, Kind, Tensor};

use super::spec::{Arch, NameMap};
use super::torch_pickle;

/// What [`load_into`] did with the checkpoint's names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Our parameters the checkpoint lacks: they keep their fresh initialisation.
    pub missing: Vec<String>,
    /// Checkpoint names that are not part of the model (e.g. `pooler.dense.weight`).
    pub unexpected: Vec<String>,
}

/// Where a checkpoint name goes in the model.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// One of our parameters.
    Param(String),
    /// An alias of a parameter, used only when the file lacks the parameter itself.
    Alias(String),
    /// Tied to the word embeddings, or a non-persistent buffer: nothing to load.
    Ignore,
    /// Not part of this model (e.g. `pooler.*`, `cls.seq_relationship.*`).
    Unexpected,
}

/// Where checkpoint name `name` goes, by the name rules `names`, in the model
/// whose parameter names are `ours`.
fn target(names: &NameMap, name: &str, ours: &HashSet<String>) -> Target {
    let name = legacy_layer_norm_name(name);
    let prefixed = format!("{}.{}", names.prefix, name);
    for candidate in [name.as_str(), prefixed.as_str()] {
        if ours.contains(candidate) {
            return Target::Param(candidate.to_string());
        }
        if let Some((_, to)) = names.aliases.iter().find(|(from, _)| *from == candidate) {
            return Target::Alias(to.to_string());
        }
        if names.ignored.iter().any(|rule| ignores(rule, candidate)) {
            return Target::Ignore;
        }
    }
    Target::Unexpected
}

/// Whether the `ignored` entry `rule` covers `name`: equal, or for a rule
/// `*suffix`, ending with `suffix` (a buffer every layer has).
fn ignores(rule: &str, name: &str) -> bool {
    match rule.strip_prefix('*') {
        Some(suffix) => name.ends_with(suffix),
        None => rule == name,
    }
}

/// TF-era checkpoints call LayerNorm parameters `gamma` and `beta`.
fn legacy_layer_norm_name(name: &str) -> String {
    if let Some(stem) = name.strip_suffix(".gamma") {
        format!("{stem}.weight")
    } else if let Some(stem) = name.strip_suffix(".beta") {
        format!("{stem}.bias")
    } else {
        name.to_string()
    }
}

/// Reads the weights of a model directory: `model.safetensors`, else the shards
/// listed in `model.safetensors.index.json`, else `pytorch_model.bin`.
/// Returns the file read (for messages) and its tensors, on the CPU.
pub fn read_dir(dir: &Path) -> Result<(PathBuf, Vec<(String, Tensor)>)> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok((single.clone(), read_safetensors(&single)?));
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
        let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
            bail!("{}: no \"weight_map\" object", index.display());
        };
        let shards: std::collections::BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let mut tensors = Vec::new();
        for shard in shards {
            tensors.extend(read_safetensors(&dir.join(shard))?);
        }
        return Ok((index, tensors));
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.is_file() {
        return Ok((bin.clone(), torch_pickle::read_state_dict(&bin)?));
    }
    bail!("{}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin", dir.display())
}

fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))
}

/// Refuses a parameter holding NaN or infinity: such a model cannot be
/// trained or evaluated, and the damage is the file's, not a later step's.
fn check_finite(tensor: &Tensor, name: &str, file: &Path) -> Result<()> {
    if !tensor.is_floating_point() {
        return Ok(());
    }
    let bad = tch::no_grad(|| tensor.isfinite().logical_not().sum(tch::Kind::Int64).int64_value(&[]));
    if bad > 0 {
        bail!(
            "{}: parameter {name} holds {bad} NaN or infinite value(s): the model is damaged; use another checkpoint \
             or model",
            file.display()
        );
    }
    Ok(())
}

/// Copies the checkpoint `tensors` (read from `file`) into `vs`. Parameters the
/// checkpoint lacks keep their values and are listed as missing.
pub fn load_into(vs: &VarStore, arch: Arch, tensors: Vec<(String, Tensor)>, file: &Path) -> Result<LoadReport> {
    let vars = vs.variables();
    let ours: HashSet<String> = vars.keys().cloned().collect();
    let names = &arch.spec().names;
    let mut params: HashMap<String, (String, Tensor)> = HashMap::new();
    let mut aliases: HashMap<String, (String, Tensor)> = HashMap::new();
    let mut unexpected = Vec::new();
    for (name, tensor) in tensors {
        let to = target(names, &name, &ours);
        if matches!(to, Target::Param(_) | Target::Alias(_)) {
            check_finite(&tensor, &name, file)?;
        }
        match to {
            Target::Param(to) => drop(params.insert(to, (name, tensor))),
            Target::Alias(to) => drop(aliases.insert(to, (name, tensor))),
            Target::Ignore => {}
            Target::Unexpected => unexpected.push(name),
        }
    }
    for (to, found) in aliases {
        params.entry(to).or_insert(found);
    }
    let mut missing = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for (name, var) in &vars {
            let Some((file_name, src)) = params.get(name) else {
                missing.push(name.clone());
                continue;
            };
            if src.size() != var.size() {
                bail!(
                    "{}: parameter {file_name} has shape {:?} in the file but the model (config.json) expects {:?}",
                    file.display(),
                    src.size(),
                    var.size()
                );
            }
            let mut var = var.shallow_clone();
            var.f_copy_(src).with_context(|| format!("{}: copying {file_name}", file.display()))?;
        }
        Ok(())
    })?;
    missing.sort();
    unexpected.sort();
    Ok(LoadReport { missing, unexpected })
}

/// One tensor's bytes, ready for `safetensors::serialize_to_file`.
struct F32Bytes {
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &F32Bytes {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes every variable of `vs` to `path` as contiguous fp32 safetensors with the
/// `{"format": "pt"}` metadata that `save_pretrained` writes.
pub fn write_safetensors(vs: &VarStore, path: &Path) -> Result<()> {
    let tensors: BTreeMap<String, F32Bytes> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| {
            let t = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
            let numel = t.numel();
            let mut data = vec![0u8; numel * 4];
            t.copy_data_u8(&mut data, numel);
            let shape = t.size().iter().map(|&d| d as usize).collect();
            (name, F32Bytes { shape, data })
        })
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors.iter().map(|(n, b)| (n.as_str(), b)), Some(metadata), path)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(names: &[&str]) -> HashSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn base_model_and_legacy_names_map_to_mlm_parameters() {
        let ours = ours(&["bert.embeddings.LayerNorm.weight", "cls.predictions.bias"]);
        let map = &crate::model::bert::SPEC.names;
        let p = |s: &str| Target::Param(s.to_string());
        assert_eq!(target(map, "embeddings.LayerNorm.gamma", &ours), p("bert.embeddings.LayerNorm.weight"));
        assert_eq!(target(map, "bert.embeddings.LayerNorm.weight", &ours), p("bert.embeddings.LayerNorm.weight"));
        assert_eq!(target(map, "cls.predictions.decoder.weight", &ours), Target::Ignore);
        assert_eq!(target(map, "embeddings.position_ids", &ours), Target::Ignore);
        assert_eq!(
            target(map, "cls.predictions.decoder.bias", &ours),
            Target::Alias("cls.predictions.bias".to_string())
        );
        assert_eq!(target(map, "pooler.dense.weight", &ours), Target::Unexpected);
    }

    #[test]
    fn deberta_v3_head_layout_maps_to_the_default_layout() {
        let ours = ours(&["cls.predictions.bias", "cls.predictions.transform.dense.weight"]);
        let map = &crate::model::deberta::SPEC.names;
        let a = |s: &str| Target::Alias(s.to_string());
        assert_eq!(target(map, "lm_predictions.lm_head.bias", &ours), a("cls.predictions.bias"));
        assert_eq!(
            target(map, "lm_predictions.lm_head.dense.weight", &ours),
            a("cls.predictions.transform.dense.weight")
        );
        assert_eq!(target(map, "mask_predictions.classifier.weight", &ours), Target::Unexpected);
        assert_eq!(target(map, "deberta.embeddings.position_embeddings.weight", &ours), Target::Ignore);
    }

    /// The Hub's `gpt2` file: a `GPT2Model` state dict, without the
    /// `transformer.` prefix, with each layer's old mask buffers.
    #[test]
    fn gpt2_hub_names_map_and_per_layer_buffers_are_ignored() {
        let ours = ours(&["transformer.h.0.attn.c_attn.bias", "transformer.wte.weight"]);
        let map = &crate::model::gpt2::SPEC.names;
        let p = |s: &str| Target::Param(s.to_string());
        assert_eq!(target(map, "h.0.attn.c_attn.bias", &ours), p("transformer.h.0.attn.c_attn.bias"));
        assert_eq!(target(map, "wte.weight", &ours), p("transformer.wte.weight"));
        for ignored in ["h.11.attn.bias", "h.3.attn.masked_bias", "transformer.h.0.attn.bias", "lm_head.weight"] {
            assert_eq!(target(map, ignored, &ours), Target::Ignore, "{ignored}");
        }
        assert_eq!(target(map, "h.0.attn.c_attn.weight", &ours), Target::Unexpected);
        assert_eq!(target(map, "h.0.crossattention.bias", &ours), Target::Unexpected);
    }
}
