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

use super::loss::{head_loss_sum, DeviceBatch};
use crate::model::{DropoutSeeds, LayerInputs, MaskedLm};

/// Forward and backward of `batch` with the loss divided by `divisor`; the
/// parameter gradients (one per tensor of `params`, undefined where a stage
/// does not use a parameter) are handed to `sink` stage by stage, to be summed.
/// Returns the divided loss (0-d, detached).
pub fn forward_backward(
    model: &MaskedLm,
    batch: &DeviceBatch,
    divisor: f64,
    sparse: bool,
    params: &[Tensor],
    mut sink: impl FnMut(&[Tensor]),
) -> Tensor {
    let layers = model.num_layers();
    let dropout = DropoutSeeds::draw(true);

    // 1. Embeddings with their graph; the layers keep only their inputs.
    dropout.before(0);
    let (x0, inputs) = model.embed(&batch.input_ids, &batch.attention_mask, true);
    let mut xs: Vec<Tensor> = Vec::with_capacity(layers + 1);
    xs.push(x0.detach());
    tch::no_grad(|| {
        for i in 0..layers {
            dropout.before(i + 1);
            let y = model.layer(i, &xs[i], &inputs, true);
            xs.push(y);
        }
    });

    // 2. Head and loss.
    let top = xs.pop().expect("at least the embeddings").set_requires_grad(true);
    let loss = head_loss_sum(model, &top, batch, sparse) / divisor;
    let mut g_x = backward_into(&loss, params, &[&top], &mut sink).remove(0);
    drop(top);

    // 3. The layers again, last to first. Inputs every layer shares that need
    // a gradient (DeBERTa's relative embeddings) become leaves of their own.
    let shared = inputs.rel_embeddings.as_ref().filter(|t| t.requires_grad());
    let shared_leaf = shared.map(|t| t.detach().set_requires_grad(true));
    let leaf_inputs = LayerInputs {
        mask: inputs.mask.as_ref().map(Tensor::shallow_clone),
        rel_embeddings: match &shared_leaf {
            Some(l) => Some(l.shallow_clone()),
            None => inputs.rel_embeddings.as_ref().map(Tensor::shallow_clone),
        },
        rel_pos: inputs.rel_pos.as_ref().map(Tensor::shallow_clone),
    };
    let mut g_shared: Option<Tensor> = None;
    for i in (0..layers).rev() {
        let x = xs.pop().expect("one input per layer").set_requires_grad(true);
        dropout.before(i + 1);
        let y = model.layer(i, &x, &leaf_inputs, true);
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
    loss.detach()
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
