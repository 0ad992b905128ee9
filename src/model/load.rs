//! Loading the model a job or a command names, and the checks between a model
//! and its tokenizer.
use std::path::Path;

use anyhow::{bail, Result};
use tch::Device;

use super::{MaskedLm, Objective};
use crate::config::Config;
use crate::data::tokenizer::TextTokenizer;

/// A model and whether its MLM head starts fresh (random), not trained.
pub struct Loaded {
    pub model: MaskedLm,
    /// The checkpoint lacked weights (an encoder without its MLM head), or the
    /// model is random-init: the "before" perplexity measures a random head.
    pub fresh_head: bool,
}

/// Loads the model named by `[model]`, reporting what the checkpoint lacked.
pub fn load_model(cfg: &Config, device: Device) -> Result<Loaded> {
    // Weights a checkpoint lacks (a fresh MLM head) and random-init models are
    // drawn from the job's seed: every worker of a job starts from the same
    // weights, and a rerun from the same ones.
    tch::manual_seed(cfg.training.seed as i64);
    if let Some(dir) = &cfg.model.path {
        let (model, report) = MaskedLm::load_dir(dir, device)?;
        if !report.missing.is_empty() {
            tracing::warn!(
                "{}: initialised fresh from training.seed = {} (not in the checkpoint): {}",
                dir.display(),
                cfg.training.seed,
                report.missing.join(", ")
            );
        }
        if !report.unexpected.is_empty() {
            tracing::warn!("{}: ignored (not part of the model): {}", dir.display(), report.unexpected.join(", "));
        }
        Ok(Loaded { fresh_head: !report.missing.is_empty(), model })
    } else {
        let path = cfg.model.config.as_ref().expect("validated: path or config");
        Ok(Loaded { model: MaskedLm::from_config_file(path, device)?, fresh_head: true })
    }
}

/// A model directory for `eval` and `fill-mask`. Weights it lacks (the MLM head
/// of an encoder-only checkpoint such as a sentence-embedding model) are drawn
/// from `seed`, so a rerun gives the same answers, and a warning says that the
/// answers come from an untrained head.
pub fn load_for_inference(dir: &Path, device: Device, seed: u64) -> Result<MaskedLm> {
    tch::manual_seed(seed as i64);
    let (model, report) = MaskedLm::load_dir(dir, device)?;
    if !report.missing.is_empty() {
        tracing::warn!(
            "{} has no trained MLM head ({} missing): initialised at random from --seed {seed}, so its \
             predictions are those of an untrained head; train it first (mlm train with model.path = this folder)",
            dir.display(),
            report.missing.join(", ")
        );
    }
    Ok(model)
}

/// Refuses a tokenizer whose ids do not fit the model's embedding table.
pub fn check_vocab(tok: &TextTokenizer, model: &MaskedLm) -> Result<()> {
    if tok.vocab_size as i64 > model.vocab_size() {
        bail!(
            "tokenizer {} has {} tokens but the model's vocabulary has {}: use the model's own tokenizer",
            tok.path.display(),
            tok.vocab_size,
            model.vocab_size()
        );
    }
    Ok(())
}

/// The job's objective: `training.objective`, or the model's own when unset;
/// an objective the model cannot train is refused naming both, and so are the
/// `[data]`/`[eval]` keys of the other objective. `eval.prompts` are checked
/// against the tokenizer and the model's positions here, before training,
/// not at the end of it.
pub fn objective(cfg: &Config, model: &MaskedLm, tok: &TextTokenizer) -> Result<Objective> {
    let own = model.arch.objective();
    let objective = cfg.training.objective.unwrap_or(own);
    if objective != own {
        bail!(
            "training.objective = {:?}, but model_type {:?} is trained with {:?} ({}): set training.objective = {:?} \
             or choose another model",
            objective.name(),
            model.arch.model_type(),
            own.name(),
            match own {
                Objective::Mlm => "an encoder with a masked-LM head",
                Objective::Clm => "a decoder predicting the next token",
            },
            own.name()
        );
    }
    match objective {
        Objective::Clm => {
            if !cfg.eval.fill_mask.is_empty() {
                bail!("eval.fill_mask needs a masked LM; this job is causal (clm): use eval.prompts");
            }
            if cfg.data.whole_word_mask {
                bail!("data.whole_word_mask = true needs a masked LM; this job is causal (clm), nothing is masked");
            }
            let new = cfg.eval.max_new_tokens;
            if !cfg.eval.prompts.is_empty() && new == 0 {
                bail!("eval.max_new_tokens = 0: eval.prompts need at least 1 new token");
            }
            for p in &cfg.eval.prompts {
                let n = tok.encode_document(p)?.len();
                if n == 0 || (n + new) as i64 > model.max_positions() {
                    bail!(
                        "eval.prompts entry {} is {n} tokens: it needs 1 to {} so that eval.max_new_tokens = {new} \
                         more fit the model's {} positions",
                        crate::logging::excerpt(p),
                        (model.max_positions() - new as i64).max(0),
                        model.max_positions()
                    );
                }
            }
        }
        Objective::Mlm => {
            if !cfg.eval.prompts.is_empty() {
                bail!("eval.prompts needs a causal LM (clm); this job is masked (mlm): use eval.fill_mask");
            }
        }
    }
    Ok(objective)
}
