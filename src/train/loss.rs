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
    /// `None`: training and evaluation blocks have no padding (known on the
    /// host, so attention runs without a mask and may use flash attention).
    pub attention_mask: Option<Tensor>,
    /// Flat indices (into `rows * block`) of the positions to predict.
    pub positions: Tensor,
    /// The original token ids at `positions`.
    pub targets: Tensor,
    pub n_masked: usize,
}

impl DeviceBatch {
    /// Ids, masked positions and their targets travel as one int64 buffer: one
    /// upload per pass, from pinned memory without blocking on a GPU
    /// ([`upload`]), then views of it.
    pub fn new(b: &Batch, device: Device) -> Self {
        let cells = b.rows * b.block_size;
        let n_masked = b.labels.iter().filter(|&&l| l != -100).count();
        let mut host: Vec<i64> = Vec::with_capacity(cells + 2 * n_masked);
        host.extend_from_slice(&b.input_ids);
        host.extend(b.labels.iter().enumerate().filter(|(_, &l)| l != -100).map(|(i, _)| i as i64));
        host.extend(b.labels.iter().filter(|&&l| l != -100));
        let all = upload(Tensor::from_slice(&host), device);
        let (cells, masked) = (cells as i64, n_masked as i64);
        Self {
            input_ids: all.narrow(0, 0, cells).view([b.rows as i64, b.block_size as i64]),
            attention_mask: None,
            n_masked,
            positions: all.narrow(0, cells, masked),
            targets: all.narrow(0, cells + masked, masked),
        }
    }
}

/// `host` (a CPU tensor) on `device`. On a GPU it is copied to pinned memory
/// and uploaded without blocking the host (libtorch's pinned allocator keeps
/// the buffer until the copy has run); if pinning fails, a blocking upload.
pub fn upload(host: Tensor, device: Device) -> Tensor {
    if !device.is_cuda() {
        return host;
    }
    match crate::device::pinned(&host) {
        Some(pinned) => pinned.to_device_(device, host.kind(), true, false),
        None => host.to_device(device),
    }
}

/// Sum (not mean) of the cross-entropy over the masked positions, in fp32, so
/// that callers can normalise by the masked tokens of a whole optimizer step.
/// `sparse`: project to the vocabulary only at masked positions; otherwise at
/// every position, as Hugging Face's models do (same loss, more work).
pub fn masked_lm_loss_sum(model: &MaskedLm, batch: &DeviceBatch, train: bool, sparse: bool) -> Tensor {
    let hidden = model.forward_hidden(&batch.input_ids, batch.attention_mask.as_ref(), train);
    head_loss_sum(model, &hidden, batch, sparse)
}

/// The MLM head and the loss sum of [`masked_lm_loss_sum`] on the encoder's
/// output `hidden` [rows, block, h].
pub fn head_loss_sum(model: &MaskedLm, hidden: &Tensor, batch: &DeviceBatch, sparse: bool) -> Tensor {
    let h = hidden.size()[2];
    if sparse {
        let picked = hidden.view([-1, h]).index_select(0, &batch.positions); // [n_masked, h]
        let logits = model.mlm_head(&picked).to_kind(Kind::Float); // [n_masked, vocab]
        logits.cross_entropy_loss::<Tensor>(&batch.targets, None, Reduction::Sum, -100, 0.0)
    } else {
        // Every position projected, as Hugging Face's models do; the loss at the
        // masked ones (what cross-entropy with labels of -100 elsewhere sums).
        let logits = model.mlm_head(hidden).to_kind(Kind::Float); // [rows, block, vocab]
        let v = logits.size()[2];
        let picked = logits.view([-1, v]).index_select(0, &batch.positions);
        picked.cross_entropy_loss::<Tensor>(&batch.targets, None, Reduction::Sum, -100, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_model() -> MaskedLm {
        tch::manual_seed(3);
        let cfg = serde_json::json!({
            "model_type": "bert", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 48, "max_position_embeddings": 64,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        });
        MaskedLm::from_config_json(cfg, Device::Cpu).unwrap()
    }

    fn batch() -> Batch {
        let (rows, block) = (3, 16);
        let input_ids: Vec<i64> = (0..rows * block).map(|i| (i * 37 % 290 + 5) as i64).collect();
        let labels: Vec<i64> =
            (0..rows * block).map(|i| if i % 5 == 1 { ((i * 11) % 290) as i64 } else { -100 }).collect();
        let n_masked = labels.iter().filter(|&&l| l != -100).count();
        let max_token = input_ids.iter().chain(&labels).copied().max().unwrap_or(0).max(0) as u32;
        Batch { input_ids, labels, rows, block_size: block, chunk_ids: vec![0, 1, 2], n_masked, max_token }
    }

    fn loss_and_grads(model: &MaskedLm, sparse: bool) -> (f64, Vec<(String, Tensor)>) {
        let db = DeviceBatch::new(&batch(), Device::Cpu);
        let loss = masked_lm_loss_sum(model, &db, true, sparse);
        loss.backward();
        let mut grads: Vec<(String, Tensor)> =
            model.vs.variables().into_iter().map(|(n, v)| (n, v.grad().copy())).collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, v) in model.vs.variables() {
            let mut g = v.grad();
            let _ = g.zero_();
        }
        (loss.double_value(&[]), grads)
    }

    #[test]
    fn sparse_head_gives_the_dense_loss_and_gradients() {
        let model = tiny_model();
        let (ls, gs) = loss_and_grads(&model, true);
        let (ld, gd) = loss_and_grads(&model, false);
        assert!((ls - ld).abs() / ld.abs() < 1e-5, "loss {ls} vs {ld}");
        for ((n, a), (_, b)) in gs.iter().zip(&gd) {
            let diff = (a - b).abs().max().double_value(&[]);
            // key.bias has a true gradient of 0 (softmax cancels it): compare
            // against a floor, not against its rounding noise.
            let scale = b.abs().max().double_value(&[]).max(1e-4);
            assert!(diff / scale < 1e-5, "{n}: {diff} vs scale {scale}");
        }
    }

    #[test]
    fn a_device_batch_holds_the_ids_positions_and_targets_of_its_batch() {
        let b = batch();
        let db = DeviceBatch::new(&b, Device::Cpu);
        assert_eq!(db.input_ids.size(), [3, 16]);
        assert_eq!(Vec::<i64>::try_from(db.input_ids.reshape([-1])).unwrap(), b.input_ids);
        let masked: Vec<(i64, i64)> =
            b.labels.iter().enumerate().filter(|(_, &l)| l != -100).map(|(i, &l)| (i as i64, l)).collect();
        assert_eq!(db.n_masked, masked.len());
        assert_eq!(Vec::<i64>::try_from(&db.positions).unwrap(), masked.iter().map(|m| m.0).collect::<Vec<_>>());
        assert_eq!(Vec::<i64>::try_from(&db.targets).unwrap(), masked.iter().map(|m| m.1).collect::<Vec<_>>());
    }
}
