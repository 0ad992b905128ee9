//! Held-out perplexity: exp of the mean cross-entropy over every masked token of
//! the test split, with masks drawn once (so the number is deterministic). This is
//! not HF Trainer's number, which is exp of the mean of per-batch mean losses with
//! masks drawn anew at each evaluation; with equal-size batches the two agree up to
//! the masking noise.
use serde::Serialize;
use tch::{Device, Kind};

use super::loss::{masked_lm_loss_sum, DeviceBatch};
use crate::data::loader::Batch;
use crate::model::MaskedLm;
use crate::progress::Progress;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct EvalResult {
    /// Mean cross-entropy per masked token (nats).
    pub loss: f64,
    pub perplexity: f64,
    /// Masked tokens scored.
    pub tokens: usize,
    /// Sum of the cross-entropy over those tokens (to combine workers' shares).
    pub loss_sum: f64,
}

impl EvalResult {
    pub fn from_sums(loss_sum: f64, tokens: usize) -> Self {
        let loss = if tokens > 0 { loss_sum / tokens as f64 } else { f64::NAN };
        Self { loss, perplexity: loss.exp(), tokens, loss_sum }
    }
}

/// Scores `batches` (fixed masks) with `model` in eval mode, advancing
/// `progress` by one per batch scored.
pub fn evaluate(model: &MaskedLm, batches: &[Batch], device: Device, progress: &Progress) -> EvalResult {
    let mut sum = 0f64;
    let mut tokens = 0usize;
    tch::no_grad(|| {
        for b in batches {
            let db = DeviceBatch::new(b, device);
            if db.n_masked > 0 {
                sum += masked_lm_loss_sum(model, &db, false, true).to_kind(Kind::Double).double_value(&[]);
                tokens += db.n_masked;
            }
            // Counted once scored, so a line reports work done (and the first
            // one never races the progress's own start).
            progress.inc(1);
        }
    });
    EvalResult::from_sums(sum, tokens)
}
