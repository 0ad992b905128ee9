//! The masked-LM loss, with the vocabulary projection computed only at masked
//! positions (the "sparse head"): with 15% masking that skips 85% of the largest
//! matmul of the model, and the loss and gradients are the same as the dense
//! head's (cross-entropy ignores unmasked positions anyway).
use tch::{Device, Kind, Reduction, Tensor};

use crate::data::loader::Batch;
use crate::model::MaskedLm;

/// A batch moved to the device, with its masked positions found on the host (so
/// the step needs no device-to-host sync to find them).
pub struct DeviceBatch {
    /// `[rows, block]` token ids after masking.
    pub input_ids: Tensor,
    /// `[rows, block]` ones: chunks have no padding.
    pub attention_mask: Tensor,
    /// Flat indices (into `rows * block`) of the positions to predict.
    pub positions: Tensor,
    /// The original token ids at `positions`.
    pub targets: Tensor,
    pub n_masked: usize,
}

impl DeviceBatch {
    pub fn new(b: &Batch, device: Device) -> Self {
        let shape = [b.rows as i64, b.block_size as i64];
        let (positions, targets): (Vec<i64>, Vec<i64>) = b
            .labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l != -100)
            .map(|(i, &l)| (i as i64, l))
            .unzip();
        Self {
            input_ids: Tensor::from_slice(&b.input_ids).view(shape).to_device(device),
            attention_mask: Tensor::ones(shape, (Kind::Int64, device)),
            n_masked: positions.len(),
            positions: Tensor::from_slice(&positions).to_device(device),
            targets: Tensor::from_slice(&targets).to_device(device),
        }
    }
}

/// Sum (not mean) of the cross-entropy over the masked positions, in fp32, so
/// that callers can normalise by the masked tokens of a whole optimizer step.
pub fn masked_lm_loss_sum(model: &MaskedLm, batch: &DeviceBatch, train: bool) -> Tensor {
    let hidden = model.forward_hidden(&batch.input_ids, &batch.attention_mask, train);
    let h = hidden.size()[2];
    let picked = hidden.view([-1, h]).index_select(0, &batch.positions); // [n_masked, h]
    let logits = model.mlm_head(&picked).to_kind(Kind::Float); // [n_masked, vocab]
    logits.cross_entropy_loss::<Tensor>(&batch.targets, None, Reduction::Sum, -100, 0.0)
}
