//! The range checks of a parsed config: every value that parses but makes no
//! sense is refused with one line naming its key (`docs/config.md`).
use anyhow::{bail, Result};

use super::Config;

impl Config {
    /// Checks values that parse but make no sense, naming the key.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        match (&m.path, &m.config) {
            (None, None) => {
                bail!("[model]: set `path` (a model directory) or `config` (a config.json for random init)")
            }
            (Some(_), Some(_)) => bail!("[model]: `path` and `config` are exclusive: set one"),
            (None, Some(_)) if m.tokenizer.is_none() => {
                bail!("[model]: `tokenizer` is required when the model starts from `config`")
            }
            _ => {}
        }
        let d = &self.data;
        if d.files.iter().any(|f| f.trim().is_empty()) {
            bail!("data.files has an empty entry: list the text, JSON-lines or Parquet files to train on");
        }
        if d.block_size < 8 || d.block_size > 1 << 20 {
            bail!("data.block_size = {} must be between 8 and 1048576", d.block_size);
        }
        if d.eval_files.iter().any(|f| f.trim().is_empty()) {
            bail!("data.eval_files has an empty entry: list the text, JSON-lines or Parquet files to evaluate on");
        }
        match (d.test_fraction, d.eval_files.is_empty()) {
            (Some(f), false) if f != 0.0 => bail!(
                "data.test_fraction = {f} and data.eval_files are both set: with data.eval_files the held-out set is \
                 those files and nothing of data.files is held out; remove data.test_fraction (or data.eval_files)"
            ),
            (Some(f), true) if !(f > 0.0 && f < 1.0) => bail!(
                "data.test_fraction = {f} must be in (0, 1): the held-out perplexity needs a test split (or set \
                 data.eval_files to evaluate on files of your own)"
            ),
            _ => {}
        }
        let max = super::MAX_TEST_TOKENS;
        // With eval_files nothing of data.files is sampled for test: test_size does nothing.
        if d.eval_files.is_empty() && d.test_size.saturating_mul(d.block_size) > max {
            bail!(
                "data.test_size = {} blocks of data.block_size = {} tokens is more than {max} tokens, which prepare \
                 holds in memory to sample them: lower data.test_size, or set it to 0 to hold out data.test_fraction \
                 of the blocks",
                d.test_size,
                d.block_size
            );
        }
        probability("data.mlm_probability", d.mlm_probability, false)?;
        if d.mlm_probability == 0.0 || d.mlm_probability == 1.0 {
            bail!("data.mlm_probability = {} must be in (0, 1)", d.mlm_probability);
        }
        probability("data.mask_replace_prob", d.mask_replace_prob, true)?;
        probability("data.random_replace_prob", d.random_replace_prob, true)?;
        if d.mask_replace_prob + d.random_replace_prob > 1.0 {
            bail!(
                "data.mask_replace_prob + data.random_replace_prob = {} must be at most 1",
                d.mask_replace_prob + d.random_replace_prob
            );
        }
        if d.text_field.is_empty() {
            bail!("data.text_field is empty: name the JSON field or Parquet column holding the text");
        }
        if d.masker_threads == 0 || d.masker_threads > 256 {
            bail!("data.masker_threads = {} must be between 1 and 256", d.masker_threads);
        }
        if d.prefetch_batches == 0 || d.prefetch_batches > 1024 {
            bail!("data.prefetch_batches = {} must be between 1 and 1024", d.prefetch_batches);
        }
        if d.prepared_dir.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            bail!("data.prepared_dir is empty: leave it out (default <output_dir>/data) or name a folder");
        }
        let t = &self.training;
        if t.output_dir.as_os_str().is_empty() {
            bail!("training.output_dir is empty: name the folder for checkpoints and metrics");
        }
        t.check_batch_keys()?;
        if t.epochs == 0 && t.max_steps == 0 {
            bail!("training.epochs and training.max_steps are both 0: nothing to train");
        }
        non_negative("training.lr", t.lr)?;
        non_negative("training.weight_decay", t.weight_decay)?;
        for (key, beta) in [("training.adam_beta1", t.adam_beta1), ("training.adam_beta2", t.adam_beta2)] {
            if !(0.0..1.0).contains(&beta) {
                bail!("{key} = {beta} must be in [0, 1)");
            }
        }
        if !(t.adam_eps > 0.0 && t.adam_eps.is_finite()) {
            bail!("training.adam_eps = {} must be a finite positive number", t.adam_eps);
        }
        non_negative("training.max_grad_norm", t.max_grad_norm)?;
        non_negative("training.peak_tflops", t.peak_tflops)?;
        probability("training.warmup_ratio", t.warmup_ratio, true)?;
        if t.log_every == 0 {
            bail!("training.log_every must be at least 1");
        }
        let ls = &t.loss_scale;
        if !(ls.init_scale > 0.0 && ls.init_scale.is_finite()) {
            bail!("training.loss_scale.init_scale = {} must be a finite positive number", ls.init_scale);
        }
        if !(ls.growth_factor >= 1.0 && ls.growth_factor.is_finite()) {
            bail!("training.loss_scale.growth_factor = {} must be a finite number >= 1", ls.growth_factor);
        }
        if !(ls.backoff_factor > 0.0 && ls.backoff_factor < 1.0) {
            bail!("training.loss_scale.backoff_factor = {} must be in (0, 1)", ls.backoff_factor);
        }
        if ls.growth_interval == 0 {
            bail!("training.loss_scale.growth_interval must be at least 1");
        }
        if t.max_nonfinite_steps == 0 {
            bail!("training.max_nonfinite_steps must be at least 1");
        }
        if t.threads > 4096 {
            bail!("training.threads = {} is not a thread count (0: libtorch's default)", t.threads);
        }
        if self.eval.batch_size == 0 {
            bail!("eval.batch_size must be at least 1");
        }
        if self.eval.top_k == 0 {
            bail!("eval.top_k must be at least 1");
        }
        non_negative("logging.progress_every_s", self.logging.progress_every_s)?;
        if self.logging.metrics_file.is_empty() {
            bail!("logging.metrics_file is empty: name the JSON-lines file (default metrics.jsonl)");
        }
        non_negative("checkpoint.every_minutes", self.checkpoint.every_minutes)?;
        if self.distributed.timeout_s == 0 {
            bail!("distributed.timeout_s must be at least 1 second");
        }
        Ok(())
    }
}

/// A probability: in [0, 1] (`closed`) or [0, 1).
fn probability(key: &str, p: f64, closed: bool) -> Result<()> {
    let ok = p >= 0.0 && if closed { p <= 1.0 } else { p < 1.0 };
    if !ok {
        bail!("{key} = {p} must be in [0, 1{}", if closed { "]" } else { ")" });
    }
    Ok(())
}

/// A finite number >= 0.
fn non_negative(key: &str, v: f64) -> Result<()> {
    if !(v >= 0.0 && v.is_finite()) {
        bail!("{key} = {v} must be a finite non-negative number");
    }
    Ok(())
}
