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

/// Logits the sparse head computes at once, at most: 2^26 fp32 values
/// (256 MiB). A causal LM predicts every position (65k tokens x 50,257 words
/// would be 13 GB of logits), so the head runs over the predicted positions in
/// chunks of `HEAD_CHUNK_LOGITS / vocab` rows, each chunk's logits freed before
/// the next ([`head_backward`] in training, [`head_loss_sum`] in evaluation).
pub const HEAD_CHUNK_LOGITS: i64 = 1 << 26;

/// Whether the sparse head of `batch` computes its logits in one chunk (the
/// plain backward may then run it whole); the dense head always does.
pub fn head_fits_at_once(model: &MaskedLm, batch: &DeviceBatch, sparse: bool) -> bool {
    !sparse || batch.n_masked as i64 * model.vocab_size() <= HEAD_CHUNK_LOGITS
}

/// The predicted positions of `batch` as (start, length) chunks of at most
/// `limit / vocab` rows (at least one row each).
pub fn head_chunks(n_positions: i64, vocab: i64, limit: i64) -> Vec<(i64, i64)> {
    let rows = (limit / vocab.max(1)).max(1);
    (0..n_positions).step_by(rows as usize).map(|start| (start, rows.min(n_positions - start))).collect()
}

/// The loss sum of one chunk of the sparse head: positions `start..start+len`.
fn chunk_loss_sum(model: &MaskedLm, flat_hidden: &Tensor, batch: &DeviceBatch, (start, len): (i64, i64)) -> Tensor {
    let picked = flat_hidden.index_select(0, &batch.positions.narrow(0, start, len)); // [len, h]
    let logits = model.mlm_head(&picked).to_kind(Kind::Float); // [len, vocab]
    logits.cross_entropy_loss::<Tensor>(&batch.targets.narrow(0, start, len), None, Reduction::Sum, -100, 0.0)
}

/// The head's loss (divided by `divisor`, then multiplied by `loss_scale`
/// for backward) and its backward, a chunk of positions at a time
/// ([`HEAD_CHUNK_LOGITS`]): returns the unscaled loss (detached), the
/// gradient with respect to `top` (the encoder's output, a leaf), and hands
/// the parameters' gradients (`params` order, undefined where the head does
/// not reach) to `sink` once, summed over the chunks.
#[allow(clippy::too_many_arguments)]
pub fn head_backward(
    model: &MaskedLm,
    top: &Tensor,
    batch: &DeviceBatch,
    divisor: f64,
    loss_scale: Option<&Tensor>,
    params: &[Tensor],
    limit: i64,
    sink: &mut impl FnMut(&[Tensor]),
) -> (Tensor, Tensor) {
    let h = top.size()[2];
    let flat = top.view([-1, h]);
    let mut loss = Tensor::zeros([], (Kind::Float, top.device()));
    let mut g_top: Option<Tensor> = None;
    let mut g_params: Option<Vec<Tensor>> = None;
    for chunk in head_chunks(batch.n_masked as i64, model.vocab_size(), limit) {
        let l = chunk_loss_sum(model, &flat, batch, chunk) / divisor;
        let scaled = loss_scale.map(|s| &l * s);
        let mut wrt: Vec<&Tensor> = params.iter().collect();
        wrt.push(top);
        let mut grads = Tensor::run_backward(&[scaled.as_ref().unwrap_or(&l)], &wrt, false, false);
        let g = grads.pop().expect("the gradient of top");
        g_top = Some(match g_top {
            Some(acc) => acc + g,
            None => g,
        });
        g_params = Some(match g_params {
            None => grads,
            Some(acc) => acc.into_iter().zip(grads).map(|(a, b)| sum_defined(a, b)).collect(),
        });
        loss += l.detach();
    }
    if let Some(g) = &g_params {
        sink(g);
    }
    (loss, g_top.unwrap_or_else(|| top.zeros_like()))
}

/// `a + b`, either of which may be undefined (not reached by backward).
fn sum_defined(a: Tensor, b: Tensor) -> Tensor {
    match (a.defined(), b.defined()) {
        (true, true) => a + b,
        (true, false) => a,
        _ => b,
    }
}

/// The MLM head and the loss sum of [`masked_lm_loss_sum`] on the encoder's
/// output `hidden` [rows, block, h]. The sparse head runs a chunk of
/// positions at a time ([`HEAD_CHUNK_LOGITS`]): without autograd (evaluation)
/// each chunk's logits are freed before the next.
pub fn head_loss_sum(model: &MaskedLm, hidden: &Tensor, batch: &DeviceBatch, sparse: bool) -> Tensor {
    let h = hidden.size()[2];
    if sparse {
        let flat = hidden.view([-1, h]);
        let chunks = head_chunks(batch.n_masked as i64, model.vocab_size(), HEAD_CHUNK_LOGITS);
        let mut sums = chunks.into_iter().map(|c| chunk_loss_sum(model, &flat, batch, c));
        let first = sums.next().unwrap_or_else(|| Tensor::zeros([], (Kind::Float, hidden.device())));
        sums.fold(first, |acc, l| acc + l)
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

    /// `head_backward` with chunks of `limit / vocab` rows: loss, gradient of
    /// the encoder output, and the parameters' gradients (summed once).
    fn chunked(model: &MaskedLm, limit: i64) -> (f64, Tensor, Vec<Tensor>, usize) {
        let db = DeviceBatch::new(&batch(), Device::Cpu);
        let params: Vec<Tensor> = model.vs.trainable_variables();
        let top = tch::no_grad(|| model.forward_hidden(&db.input_ids, None, false)).set_requires_grad(true);
        let (mut sunk, mut calls) = (Vec::new(), 0);
        let (loss, g_top) = head_backward(model, &top, &db, 4.0, None, &params, limit, &mut |g: &[Tensor]| {
            calls += 1;
            sunk = g.iter().map(|t| if t.defined() { t.copy() } else { Tensor::new() }).collect();
        });
        (loss.double_value(&[]), g_top, sunk, calls)
    }

    #[test]
    fn the_head_in_chunks_gives_the_whole_head_loss_and_gradients() {
        let model = tiny_model();
        let n = batch().n_masked as i64;
        // 300 words: one row per chunk, then 4 rows, then the whole head.
        let (l1, g1, p1, c1) = chunked(&model, 300);
        let (l4, g4, p4, _) = chunked(&model, 1200);
        let (lw, gw, pw, _) = chunked(&model, n * 300);
        assert_eq!(head_chunks(n, 300, 300).len(), n as usize);
        assert_eq!(head_chunks(n, 300, n * 300).len(), 1);
        assert_eq!(c1, 1, "the head's gradients go to the sink once, whatever the chunks");
        for (l, g, p) in [(l1, &g1, &p1), (l4, &g4, &p4)] {
            assert!((l - lw).abs() / lw.abs() < 1e-6, "loss {l} vs {lw}");
            let d = (g - &gw).abs().max().double_value(&[]);
            assert!(d <= 1e-6 * gw.abs().max().double_value(&[]).max(1e-6), "top gradient off by {d}");
            for (a, b) in p.iter().zip(&pw) {
                assert_eq!(a.defined(), b.defined());
                if a.defined() {
                    let d = (a - b).abs().max().double_value(&[]);
                    assert!(d <= 1e-5 * b.abs().max().double_value(&[]).max(1e-6), "parameter gradient off by {d}");
                }
            }
        }
        assert!(pw.iter().any(|t| t.defined()), "the head reaches some parameters");
        let whole = tch::no_grad(|| masked_lm_loss_sum(&model, &DeviceBatch::new(&batch(), Device::Cpu), false, true));
        assert!((lw - whole.double_value(&[]) / 4.0).abs() < 1e-4, "{lw} vs {whole:?}");
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
