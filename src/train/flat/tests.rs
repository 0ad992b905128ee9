//! The training step with fused query/key/value projections
//! ([`super::compute_model`]) gives the flat gradient of the separate ones.
use tch::{Device, Kind, Tensor};

use super::{compute_model, Precision};
use crate::data::Batch;
use crate::model::MaskedLm;
use crate::train::loss::{masked_lm_loss_sum, DeviceBatch};
use crate::train::optimizer::{ordered_params, AdamWParams, FlatAdamW};

fn config(model_type: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "model_type": model_type, "vocab_size": 60, "hidden_size": 16, "dim": 16,
        "num_hidden_layers": 2, "n_layers": 2, "num_attention_heads": 2, "n_heads": 2,
        "intermediate_size": 24, "hidden_dim": 24, "max_position_embeddings": 16,
    });
    for (k, v) in extra.as_object().expect("object") {
        c[k] = v.clone();
    }
    c
}

fn batch() -> Batch {
    let (rows, block) = (3, 10);
    let input_ids: Vec<i64> = (0..rows * block).map(|i| (i * 37 % 50 + 5) as i64).collect();
    let labels: Vec<i64> = (0..rows * block).map(|i| if i % 4 == 1 { ((i * 11) % 55) as i64 } else { -100 }).collect();
    let n_masked = labels.iter().filter(|&&l| l != -100).count();
    Batch { input_ids, labels, rows, block_size: block, chunk_ids: vec![0, 1, 2], n_masked, max_token: 59 }
}

/// The flat fp32 gradient of one batch, the loss, and how many leaves the
/// step differentiates, for a model with the weights of `init`, with the
/// projections fused (through the trainer's `compute_model`) or not.
fn flat_gradient(init: &MaskedLm, precision: Precision, fuse: bool) -> (Tensor, f64, usize, usize) {
    // Not the global seed: tests in other threads draw from it.
    let mut master = MaskedLm::from_config_json(init.config_json.clone(), Device::Cpu).unwrap();
    master.vs.copy(&init.vs).unwrap();
    let params = master.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    let hp = AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let mut opt = FlatAdamW::new(params, MaskedLm::no_decay, hp).unwrap();
    let (compute, tensors) = if fuse {
        compute_model(&mut master, &mut opt, precision).unwrap()
    } else {
        assert_eq!(precision, Precision::Fp32);
        (None, ordered_params(&master.vs, &opt.slots).unwrap().into_iter().map(|(_, t)| t).collect())
    };
    let model = compute.as_ref().unwrap_or(&master);
    let db = DeviceBatch::new(&batch(), Device::Cpu);
    let loss = masked_lm_loss_sum(model, &db, false, true);
    let grads = Tensor::run_backward(&[&loss], &tensors, false, false);
    opt.accumulate_grads(&grads);
    let loss = loss.to_kind(Kind::Double).double_value(&[]);
    (opt.grad.copy(), loss, opt.leaves.len(), opt.slots.len())
}

fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    (a - b).abs().max().double_value(&[]) / scale
}

#[test]
fn fused_projections_give_the_separate_ones_gradients() {
    let deberta = serde_json::json!({
        "relative_attention": true, "position_buckets": 4, "share_att_key": true,
        "pos_att_type": "p2c|c2p", "norm_rel_ebd": "layer_norm", "position_biased_input": false,
    });
    let mut own_keys = deberta.clone();
    own_keys["share_att_key"] = false.into();
    // (model, leaves fewer per layer: a fused pair of projections 2 (weights, biases), a triple 4)
    for (name, config, fused_per_layer) in [
        ("bert", config("bert", serde_json::json!({})), 4),
        ("roberta", config("roberta", serde_json::json!({"pad_token_id": 1})), 4),
        // k_lin, out_lin, q_lin, v_lin: q_lin + v_lin fused.
        ("distilbert", config("distilbert", serde_json::json!({})), 2),
        // DeBERTa-v3: key_proj, query_proj, value_proj; its relative positions
        // go through the fused key and query rows.
        ("deberta-v3", config("deberta-v2", deberta.clone()), 4),
        // key_proj, pos_key_proj, pos_query_proj, query_proj, value_proj.
        ("deberta-v2 own position keys", config("deberta-v2", own_keys.clone()), 2),
    ] {
        let init = MaskedLm::from_config_json(config, Device::Cpu).unwrap();
        let (separate, loss_sep, leaves_sep, slots) = flat_gradient(&init, Precision::Fp32, false);
        let (fused, loss_fused, leaves, _) = flat_gradient(&init, Precision::Fp32, true);
        assert_eq!(leaves_sep, slots, "{name}");
        assert_eq!(leaves, slots - 2 * fused_per_layer, "{name}: leaves after fusing");
        assert!((loss_sep - loss_fused).abs() / loss_sep.abs() < 1e-5, "{name}: loss {loss_sep} vs {loss_fused}");
        let diff = relative_difference(&fused, &separate);
        assert!(diff < 1e-5, "{name}: fused gradient differs by {diff}");

        // bf16: fused over the shadow buffer, close to the fp32 gradient.
        let (bf16, _, leaves, _) = flat_gradient(&init, Precision::Bf16, true);
        assert_eq!(leaves, slots - 2 * fused_per_layer, "{name} bf16: leaves after fusing");
        let diff = relative_difference(&bf16, &separate);
        assert!(diff < 0.1, "{name} bf16: gradient differs by {diff}");
    }
}
