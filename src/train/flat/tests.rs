//! The flat buffers: gradients land in their slots whatever their dtype, and
//! the training step with fused query/key/value projections
//! ([`FlatParams::compute_model`]) gives the flat gradient of the separate ones.
use tch::{Device, Kind, Tensor};

use super::{ordered_params, FlatParams, Precision};
use crate::data::Batch;
use crate::model::MaskedLm;
use crate::train::loss::{masked_lm_loss_sum, DeviceBatch};

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
    let groups = master.qkv_groups();
    let mut flat = FlatParams::with_groups(params, MaskedLm::no_decay, &groups).unwrap();
    let (compute, tensors) = if fuse {
        flat.compute_model(&mut master, precision).unwrap()
    } else {
        assert_eq!(precision, Precision::Fp32);
        (None, ordered_params(&master.vs, flat.slots()).unwrap().into_iter().map(|(_, t)| t).collect())
    };
    let model = compute.as_ref().unwrap_or(&master);
    let db = DeviceBatch::new(&batch(), Device::Cpu);
    let loss = masked_lm_loss_sum(model, &db, false, true);
    let grads = Tensor::run_backward(&[&loss], &tensors, false, false);
    flat.accumulate(&grads);
    let loss = loss.to_kind(Kind::Double).double_value(&[]);
    (flat.grad().copy(), loss, flat.leaves().len(), flat.slots().len())
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
    // (model, leaves fewer per layer: a fused triple of projections 4 (weights, biases))
    for (name, config, fused_per_layer) in [
        ("bert", config("bert", serde_json::json!({})), 4),
        ("roberta", config("roberta", serde_json::json!({"pad_token_id": 1})), 4),
        // k_lin, out_lin, q_lin, v_lin by name: the declared group puts
        // k_lin, q_lin, v_lin together.
        ("distilbert", config("distilbert", serde_json::json!({})), 4),
        // DeBERTa-v3: key_proj, query_proj, value_proj; its relative positions
        // go through the fused key and query rows.
        ("deberta-v3", config("deberta-v2", deberta.clone()), 4),
        // key_proj, pos_key_proj, pos_query_proj, query_proj, value_proj by name.
        ("deberta-v2 own position keys", config("deberta-v2", own_keys.clone()), 4),
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

/// Four parameters of the given shapes, all zero.
fn zeros(shapes: &[&[i64]]) -> FlatParams {
    let params = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("p{i}"), Tensor::zeros(*s, (Kind::Float, Device::Cpu))))
        .collect();
    FlatParams::new(params, |_| false).unwrap()
}

/// Gradients land in their slots whatever their dtype, undefined ones are
/// zero on the first micro-batch and left alone after, and later micro-batches add.
#[test]
fn accumulated_gradients_land_in_their_slots() {
    let shapes: [&[i64]; 4] = [&[2, 2], &[3], &[1, 2], &[2]];
    let mut flat = zeros(&shapes);
    let _ = flat.grad_mut().fill_(7.0);
    let g = |s: &[i64], v: f64, kind: Kind| Tensor::full(s, v, (kind, Device::Cpu));
    // p0 bf16, p1 undefined, p2 and p3 fp32 (one run of two).
    let first = [
        g(shapes[0], 1.5, Kind::BFloat16),
        Tensor::new(),
        g(shapes[2], 2.0, Kind::Float),
        g(shapes[3], 3.0, Kind::Float),
    ];
    flat.accumulate(&first);
    assert_eq!(Vec::<f32>::try_from(flat.grad()).unwrap(), [1.5, 1.5, 1.5, 1.5, 0.0, 0.0, 0.0, 2.0, 2.0, 3.0, 3.0]);
    let second = [Tensor::new(), g(shapes[1], 1.0, Kind::BFloat16), g(shapes[2], 1.0, Kind::BFloat16), Tensor::new()];
    flat.accumulate(&second);
    assert_eq!(Vec::<f32>::try_from(flat.grad()).unwrap(), [1.5, 1.5, 1.5, 1.5, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0]);
}

/// A run of bf16 gradients (the bf16 compute copy's) lands exactly, mixed
/// with fp32 ones in one run too.
#[test]
fn a_run_of_bf16_gradients_lands_exactly() {
    let shapes: [&[i64]; 3] = [&[2, 2], &[3], &[2]];
    let mut flat = zeros(&shapes);
    let grads: Vec<Tensor> =
        shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16)).collect();
    let want = Tensor::cat(&grads.iter().map(|g| g.reshape([-1]).to_kind(Kind::Float)).collect::<Vec<_>>(), 0);
    flat.accumulate(&grads);
    assert!(flat.grad().equal(&want));
    let mut mixed = grads.iter().map(|g| g.shallow_clone()).collect::<Vec<_>>();
    mixed[1] = mixed[1].to_kind(Kind::Float);
    flat.discard_grads();
    flat.accumulate(&mixed);
    assert!(flat.grad().equal(&want));
}

/// The parameters are views of the master: the layout is decayed first, then
/// by name, and the master by name gives each parameter back.
#[test]
fn parameters_are_views_of_the_master_in_the_saved_layout() {
    let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
    let b = Tensor::from_slice(&[5.0f32, 6.0]);
    let a = Tensor::from_slice(&[7.0f32]);
    let params = vec![("w.bias".into(), b.shallow_clone()), ("w".into(), w.shallow_clone()), ("a".into(), a.copy())];
    let flat = FlatParams::new(params, |n| n.ends_with("bias")).unwrap();
    let names: Vec<&str> = flat.slots().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "w", "w.bias"]);
    assert_eq!(flat.n_decay(), 5);
    assert_eq!(Vec::<f32>::try_from(flat.master()).unwrap(), [7.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let _ = flat.master().shallow_clone().g_mul_scalar_(2.0);
    assert_eq!(Vec::<f32>::try_from(&w.reshape([-1])).unwrap(), [2.0, 4.0, 6.0, 8.0]);
    let named = flat.named_master();
    assert_eq!(named[2].0, "w.bias");
    assert_eq!(Vec::<f32>::try_from(&named[2].1).unwrap(), [10.0, 12.0]);
}

/// Declared groups lie back to back in the buffers, at their first member's
/// place, and tensors in the buffers' layout convert to the saved layout
/// (decayed first, then by name) and back.
#[test]
fn groups_lie_together_and_moments_keep_the_saved_layout() {
    let t = |v: &[f32]| Tensor::from_slice(v);
    let names = ["k", "out", "q", "v", "k.bias", "q.bias", "v.bias", "out.bias"];
    let params = || -> Vec<(String, Tensor)> {
        names.iter().enumerate().map(|(i, n)| (n.to_string(), t(&[i as f32; 2]))).collect()
    };
    let groups = vec![
        vec!["q".to_string(), "k".into(), "v".into()],
        vec!["q.bias".to_string(), "k.bias".into(), "v.bias".into()],
        // A group with a frozen member is left where names put it.
        vec!["out".to_string(), "frozen".into()],
    ];
    let flat = FlatParams::with_groups(params(), |n| n.ends_with("bias"), &groups).unwrap();
    let order: Vec<&str> = flat.slots().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(order, ["k", "q", "v", "out", "k.bias", "q.bias", "v.bias", "out.bias"]);
    assert_eq!(flat.n_decay(), 8);
    // The saved layout is the ungrouped one, whatever the groups.
    let plain = FlatParams::new(params(), |n| n.ends_with("bias")).unwrap();
    let saved = flat.to_saved_layout(flat.master());
    assert!(saved.equal(plain.master()), "{saved:?} vs {:?}", plain.master());
    assert!(flat.from_saved_layout(&saved).equal(flat.master()));
    assert!(!saved.equal(flat.master()), "the grouped layout differs, or this test proves nothing");
    // Without a move, the conversion is the tensor itself.
    assert_eq!(plain.to_saved_layout(plain.master()).data_ptr(), plain.master().data_ptr());
}
