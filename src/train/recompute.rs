//! Activation checkpointing (`training.activation_checkpointing`): forward and
//! backward of one micro-batch keeping only each encoder layer's input instead
//! of everything autograd would save inside the layers, and running each layer
//! again during backward. About one extra forward pass of compute for memory
//! that no longer grows with the work inside a layer (attention scores,
//! feed-forward activations): what `torch.utils.checkpoint` does per layer in
//! Hugging Face's `gradient_checkpointing_enable()`.
//!
//! tch cannot define autograd functions, so the pieces are chained by hand:
//!
//! 1. embeddings with autograd; the layers without (`no_grad`), keeping each
//!    layer's input `x_i`;
//! 2. the head and loss on `x_L` made a leaf: backward gives the head's
//!    gradients and `g_L = dloss/dx_L`;
//! 3. for i = L-1 .. 0: layer i again on `x_i` made a leaf, backward of
//!    `sum(layer_i(x_i) * g_{i+1})` gives layer i's gradients and `g_i` (and
//!    the gradient of inputs all layers share, DeBERTa's relative embeddings);
//! 4. backward of `sum(x_0 * g_0)` (plus the shared inputs' terms) through the
//!    embeddings.
//!
//! Dropout draws the same masks the second time ([`crate::model::DropoutSeeds`]),
//! so the gradients are those of the plain path (to float rounding: sums are
//! taken in another order).
use tch::{Kind, Tensor};

use super::loss::{head_backward, head_loss_sum, DeviceBatch, HEAD_CHUNK_LOGITS};
use crate::model::{DropoutSeeds, MaskedLm};

/// Forward and backward of `batch` with the loss divided by `divisor`; the
/// parameter gradients (one per tensor of `params`, undefined where a stage
/// does not use a parameter) are handed to `sink` stage by stage, to be summed:
/// the head's first, then each layer's from the top, the embeddings' last.
/// With `recompute` the layers run again during backward (activation
/// checkpointing); without, each layer keeps its graph and only the backward
/// is staged, so that the gradients of the upper layers are complete while the
/// lower ones still run (what the overlapped all-reduce needs, [`super::ddp::overlap`]).
/// With `loss_scale` (fp16) the gradients are those of the loss times it.
/// Returns the divided loss (0-d, detached, not scaled).
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    model: &MaskedLm,
    batch: &DeviceBatch,
    divisor: f64,
    loss_scale: Option<&Tensor>,
    sparse: bool,
    params: &[Tensor],
    recompute: bool,
    mut sink: impl FnMut(&[Tensor]),
) -> Tensor {
    let layers = model.num_layers();
    let dropout = DropoutSeeds::draw(true);

    // 1. Embeddings with their graph. Inputs every layer shares that need a
    // gradient (DeBERTa's relative embeddings) become leaves of their own.
    dropout.before(0);
    let (x0, inputs) = model.embed(&batch.input_ids, batch.attention_mask.as_ref(), true);
    let shared = inputs.rel_embeddings.as_ref().filter(|t| t.requires_grad());
    let shared_leaf = shared.map(|t| t.detach().set_requires_grad(true));
    let mut leaf_inputs = inputs.shallow_clone();
    if let Some(l) = &shared_leaf {
        leaf_inputs.rel_embeddings = Some(l.shallow_clone());
    }
    // Each layer's input as a leaf; without recompute also its output, with
    // the layer's graph. With recompute the layers run without autograd.
    let mut xs: Vec<Tensor> = Vec::with_capacity(layers + 1);
    let mut ys: Vec<Tensor> = Vec::with_capacity(if recompute { 0 } else { layers });
    xs.push(x0.detach().set_requires_grad(!recompute));
    for i in 0..layers {
        dropout.before(i + 1);
        if recompute {
            let y = tch::no_grad(|| model.layer(i, &xs[i], &inputs, true));
            xs.push(y);
        } else {
            let y = model.layer(i, &xs[i], &leaf_inputs, true);
            xs.push(y.detach().set_requires_grad(true));
            ys.push(y);
        }
    }

    // 2. Head and loss.
    let top = xs.pop().expect("at least the embeddings").set_requires_grad(true);
    let (loss, mut g_x) = if sparse {
        // A chunk of predicted positions at a time: a causal LM's logits never whole.
        head_backward(model, &top, batch, divisor, loss_scale, params, HEAD_CHUNK_LOGITS, &mut sink)
    } else {
        let loss = head_loss_sum(model, &top, batch, false) / divisor;
        let scaled = loss_scale.map(|s| &loss * s);
        let g = backward_into(scaled.as_ref().unwrap_or(&loss), params, &[&top], &mut sink).remove(0);
        (loss.detach(), g)
    };
    drop(top);

    // 3. The layers, last to first (run again with recompute).
    let mut g_shared: Option<Tensor> = None;
    for i in (0..layers).rev() {
        let x = xs.pop().expect("one input per layer").set_requires_grad(true);
        let y = if recompute {
            dropout.before(i + 1);
            model.layer(i, &x, &leaf_inputs, true)
        } else {
            ys.pop().expect("one output per layer")
        };
        let root = (y * &g_x).sum(Kind::Float);
        let mut wrt: Vec<&Tensor> = vec![&x];
        if let Some(l) = &shared_leaf {
            wrt.push(l);
        }
        let mut g = backward_into(&root, params, &wrt, &mut sink);
        g_x = g.remove(0);
        if shared_leaf.is_some() {
            let gs = g.remove(0);
            if gs.defined() {
                g_shared = Some(match g_shared {
                    Some(acc) => acc + gs,
                    None => gs,
                });
            }
        }
    }

    // 4. The embeddings (and the shared inputs' own graph).
    let mut root = (&x0 * &g_x).sum(Kind::Float);
    if let (Some(s), Some(g)) = (shared, &g_shared) {
        root = root + (s * g).sum(Kind::Float);
    }
    backward_into(&root, params, &[], &mut sink);
    loss
}

/// Backward of `root` with respect to `params` (handed to `sink`) and `extra`
/// (returned, in order).
fn backward_into(root: &Tensor, params: &[Tensor], extra: &[&Tensor], sink: &mut impl FnMut(&[Tensor])) -> Vec<Tensor> {
    let mut wrt: Vec<&Tensor> = params.iter().collect();
    wrt.extend_from_slice(extra);
    let mut grads = Tensor::run_backward(&[root], &wrt, false, false);
    let rest = grads.split_off(params.len());
    sink(&grads);
    rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::loader::Batch;
    use crate::train::loss::masked_lm_loss_sum;
    use tch::Device;

    fn model(model_type: &str, extra: serde_json::Value) -> MaskedLm {
        tch::manual_seed(11);
        let mut config = serde_json::json!({
            "model_type": model_type, "vocab_size": 120, "hidden_size": 32, "dim": 32,
            "num_hidden_layers": 3, "n_layers": 3, "num_attention_heads": 4, "n_heads": 4,
            "intermediate_size": 40, "hidden_dim": 40, "max_position_embeddings": 40,
            // Without dropout: libtorch's generator is global and other tests
            // draw from it concurrently (tests/activation_checkpointing.rs checks
            // the dropout replay in a process of its own).
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "dropout": 0.0, "attention_dropout": 0.0,
        });
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        MaskedLm::from_config_json(config, Device::Cpu).unwrap()
    }

    fn batch() -> Batch {
        let (rows, block) = (3, 24);
        let input_ids: Vec<i64> = (0..rows * block).map(|i| (i * 37 % 110 + 5) as i64).collect();
        let labels: Vec<i64> =
            (0..rows * block).map(|i| if i % 4 == 1 { ((i * 11) % 110 + 5) as i64 } else { -100 }).collect();
        let n_masked = labels.iter().filter(|&&l| l != -100).count();
        Batch { input_ids, labels, rows, block_size: block, chunk_ids: vec![0, 1, 2], n_masked, max_token: 119 }
    }

    /// (loss, one gradient per parameter) of the plain path (`None`) or the
    /// staged one, recomputing or not.
    fn run(model: &MaskedLm, db: &DeviceBatch, staged: Option<bool>) -> (f64, Vec<Tensor>) {
        let params: Vec<Tensor> = model.vs.trainable_variables();
        let divisor = db.n_masked as f64;
        tch::manual_seed(5);
        let Some(recompute) = staged else {
            let loss = masked_lm_loss_sum(model, db, true, true) / divisor;
            let grads = Tensor::run_backward(&[&loss], &params, false, false);
            return (loss.double_value(&[]), grads);
        };
        let mut sum: Vec<Option<Tensor>> = params.iter().map(|_| None).collect();
        let loss = forward_backward(model, db, divisor, None, true, &params, recompute, |g| {
            for (acc, g) in sum.iter_mut().zip(g) {
                if g.defined() {
                    *acc = Some(match acc.take() {
                        Some(a) => a + g,
                        None => g.copy(),
                    });
                }
            }
        });
        let grads = sum.into_iter().zip(&params).map(|(g, p)| g.unwrap_or_else(|| p.zeros_like())).collect();
        (loss.double_value(&[]), grads)
    }

    #[test]
    fn staged_and_recomputed_layers_give_the_plain_gradients_for_every_architecture_padded_or_not() {
        let deberta = serde_json::json!({
            "relative_attention": true, "position_buckets": 8, "max_relative_positions": 40,
            "share_att_key": true, "pos_att_type": "p2c|c2p", "norm_rel_ebd": "layer_norm",
            "position_biased_input": false,
        });
        let cases = [
            ("bert", serde_json::json!({})),
            ("distilbert", serde_json::json!({})),
            ("roberta", serde_json::json!({"pad_token_id": 1})),
            // Global and sliding-window layers, the window shorter than the block.
            (
                "modernbert",
                serde_json::json!({"pad_token_id": 0, "global_attn_every_n_layers": 2, "local_attention": 8}),
            ),
            ("deberta-v2", deberta.clone()),
            // deberta-v2-xlarge's convolution after the first layer.
            ("deberta-v2", {
                let mut conv = deberta;
                conv["conv_kernel_size"] = 3.into();
                conv["conv_act"] = "gelu".into();
                conv
            }),
            // A decoder: causal attention, the padding on top of causality.
            (
                "gpt2",
                serde_json::json!({"n_embd": 32, "n_layer": 3, "n_head": 4, "n_inner": 40, "n_positions": 40,
                    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
            ),
        ];
        for (model_type, extra) in cases {
            let m = model(model_type, extra);
            let mut db = DeviceBatch::new(&batch(), Device::Cpu);
            for padded in [false, true] {
                if padded {
                    // The last row is half padding.
                    let mask = Tensor::ones(db.input_ids.size(), (tch::Kind::Int64, Device::Cpu));
                    let _ = mask.get(2).narrow(0, 12, 12).fill_(0);
                    db.attention_mask = Some(mask);
                }
                let (l0, g0) = run(&m, &db, None);
                for recompute in [false, true] {
                    let (l1, g1) = run(&m, &db, Some(recompute));
                    assert!((l0 - l1).abs() <= 1e-6 * l0.abs(), "{model_type}: loss {l0} vs {l1}");
                    let names: Vec<String> = m.vs.variables().into_keys().collect();
                    let mut nonzero = 0;
                    for (i, (a, b)) in g0.iter().zip(&g1).enumerate() {
                        let a = if a.defined() { a.shallow_clone() } else { b.zeros_like() };
                        let scale = a.abs().max().double_value(&[]).max(1e-6);
                        let diff = (&a - b).abs().max().double_value(&[]);
                        // Relative to the parameter's own gradient, with an absolute floor for
                        // gradients that are rounding noise around 0 (attention key biases).
                        assert!(
                            diff <= 1e-5 * scale + 1e-7,
                            "{model_type} padded={padded} recompute={recompute} param {i}: {diff} vs {scale}"
                        );
                        nonzero += usize::from(scale > 1e-6);
                    }
                    assert!(nonzero * 10 >= g0.len() * 8, "{model_type}: only {nonzero} of {} gradients", names.len());
                }
            }
        }
    }
}
