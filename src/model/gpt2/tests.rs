//! GPT-2: the cached decode against the full forward, padding, refusals,
//! initialisation and the `Conv1D` product's gradients.
use tch::Device;

use super::*;
use crate::model::MaskedLm;

fn config(extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "model_type": "gpt2", "vocab_size": 50, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 16,
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn tiny(extra: serde_json::Value) -> MaskedLm {
    MaskedLm::from_config_json(config(extra), Device::Cpu).unwrap()
}

/// Perturbs biases and LayerNorms (0 and 1 at initialisation) so that a test sees them.
fn perturb(model: &MaskedLm) {
    tch::no_grad(|| {
        for (i, (_, mut t)) in model.vs.variables().into_iter().enumerate() {
            let noise = (Tensor::arange(t.numel() as i64, (Kind::Float, Device::Cpu)) * (0.7 + i as f64)).sin() * 0.1;
            let _ = t.g_add_(&noise.view(t.size().as_slice()));
        }
    });
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
}

#[test]
fn decoding_with_the_cache_gives_the_full_forward_logits() {
    for extra in [serde_json::json!({}), serde_json::json!({"scale_attn_weights": false, "n_inner": 24})] {
        let model = tiny(extra);
        perturb(&model);
        // 14 tokens: the cache's buffers (10 positions after the 5-token
        // prompt) grow once, after the 10th.
        let ids: Vec<i64> = (0..28).map(|i| (i * 7 + 3) % 50).collect();
        let ids = Tensor::from_slice(&ids).view([2, 14]);
        let full = tch::no_grad(|| model.logits(&ids, None, false));
        let mut cache = KvCache::default();
        let mut steps = vec![model.decode_logits(&ids.narrow(1, 0, 5), &mut cache).unwrap()];
        let capacity = |c: &KvCache| c.layers[0].as_ref().map(|(k, _)| k.size()[2]);
        assert_eq!(capacity(&cache), Some(10));
        for i in 5..14 {
            steps.push(model.decode_logits(&ids.narrow(1, i, 1), &mut cache).unwrap());
        }
        assert_eq!(cache.len, 14);
        assert_eq!(capacity(&cache), Some(22));
        assert!(cache.layers.iter().all(|l| l.as_ref().is_some_and(|(k, _)| k.size() == [2, 2, 22, 8])));
        let diff = max_diff(&Tensor::cat(&steps, 1), &full);
        assert!(diff < 1e-5, "cached decode vs full forward: {diff:.3e}");
        // Past the positions: refused, naming them.
        let err = model.decode_logits(&ids, &mut cache).unwrap_err().to_string();
        assert!(err.contains("16 positions"), "{err}");
    }
}

#[test]
fn padding_on_the_right_leaves_the_tokens_before_it_unchanged() {
    let model = tiny(serde_json::json!({}));
    perturb(&model);
    let ids = Tensor::from_slice(&[3i64, 17, 9, 44, 1, 8, 30, 2, 0, 0]).view([2, 5]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0]).view([2, 5]);
    let padded = tch::no_grad(|| model.logits(&ids, Some(&mask), false));
    let alone = tch::no_grad(|| model.logits(&ids.narrow(0, 1, 1).narrow(1, 0, 3), None, false));
    assert!(max_diff(&padded.narrow(0, 1, 1).narrow(1, 0, 3), &alone) < 1e-5);
    let ones = Tensor::ones([2, 5], (Kind::Int64, Device::Cpu));
    let unmasked = tch::no_grad(|| model.logits(&ids, None, false));
    assert!(max_diff(&tch::no_grad(|| model.logits(&ids, Some(&ones), false)), &unmasked) < 1e-6);
    // A later token changes nothing before it (causality).
    let other = ids.copy();
    let _ = other.get(0).get(4).fill_(33);
    let changed = tch::no_grad(|| model.logits(&other, None, false));
    assert_eq!(max_diff(&changed.narrow(1, 0, 4), &unmasked.narrow(1, 0, 4)), 0.0);
    assert!(max_diff(&changed.narrow(1, 4, 1), &unmasked.narrow(1, 4, 1)) > 0.0);
}

#[test]
fn unsupported_keys_are_refused_by_name() {
    for (extra, key) in [
        (serde_json::json!({"add_cross_attention": true}), "add_cross_attention"),
        (serde_json::json!({"scale_attn_by_inverse_layer_idx": true}), "scale_attn_by_inverse_layer_idx"),
        (serde_json::json!({"reorder_and_upcast_attn": true}), "reorder_and_upcast_attn"),
        (serde_json::json!({"tie_word_embeddings": false}), "tie_word_embeddings"),
        (serde_json::json!({"n_embd": 18, "n_head": 4}), "n_head"),
        (serde_json::json!({"activation_function": "swish"}), "activation_function"),
        (serde_json::json!({"n_layer": 0}), "n_layer"),
        (serde_json::json!({"n_positions": -3}), "n_positions"),
        (serde_json::json!({"attn_pdrop": 1.5}), "attn_pdrop"),
        (serde_json::json!({"layer_norm_epsilon": 0.0}), "layer_norm_epsilon"),
    ] {
        let err = format!("{:#}", MaskedLm::from_config_json(config(extra.clone()), Device::Cpu).err().unwrap());
        assert!(err.contains(key), "{extra}: {err}");
        let err = format!("{:#}", ModelShape::from_config(&config(extra.clone())).unwrap_err());
        assert!(err.contains(key), "estimate-memory, {extra}: {err}");
    }
}

#[test]
fn bert_names_of_the_sizes_are_read_as_gpt2s() {
    let c = serde_json::json!({"model_type": "gpt2", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 3,
        "num_attention_heads": 2, "max_position_embeddings": 12});
    let model = MaskedLm::from_config_json(c.clone(), Device::Cpu).unwrap();
    assert_eq!((model.hidden_size(), model.num_layers(), model.max_positions()), (16, 3, 12));
    assert_eq!(ModelShape::from_config(&c).unwrap().heads, 2);
    let err = format!(
        "{:#}",
        MaskedLm::from_config_json(config(serde_json::json!({"hidden_size": 24})), Device::Cpu).err().unwrap()
    );
    assert!(err.contains("hidden_size = 24 and n_embd = 16"), "{err}");
}

#[test]
fn initialisation_follows_transformers_with_the_scaled_residual_projections() {
    let model = tiny(serde_json::json!({"n_layer": 8, "n_embd": 64, "n_head": 4}));
    let vars = model.vs.variables();
    let std = |name: &str| f64::try_from(vars[name].std(true)).unwrap();
    for name in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.3.attn.c_attn.weight"] {
        assert!((std(name) - 0.02).abs() < 0.003, "{name}: {}", std(name));
    }
    // 0.02 / sqrt(2 x 8 layers)
    for name in ["transformer.h.3.attn.c_proj.weight", "transformer.h.3.mlp.c_proj.weight"] {
        assert!((std(name) - 0.005).abs() < 0.001, "{name}: {}", std(name));
    }
    assert_eq!(vars["transformer.h.3.mlp.c_fc.weight"].size(), [64, 256], "Conv1D weights are [in, out]");
    assert_eq!(f64::try_from(vars["transformer.h.0.attn.c_attn.bias"].abs().sum(Kind::Float)).unwrap(), 0.0);
    assert_eq!(f64::try_from(vars["transformer.ln_f.weight"].mean(Kind::Float)).unwrap(), 1.0);
    assert!(!vars.contains_key("lm_head.weight"), "the head is tied to wte");
    assert_eq!(model.arch.objective(), Objective::Clm);
    let line = model.attention_kernel_line(Device::Cpu, Kind::Float, 8);
    assert!(line.starts_with("attention: ") && line.contains("causal"), "{line}");
}

/// The bf16 product through fp32 GEMMs on the transposed `[in, out]` weight
/// gives the gradients of the upcast computation.
#[test]
fn conv1d_through_fp32_gemms_has_the_gradients_of_the_upcast_product() {
    let wave = |shape: &[i64], seed: f64| {
        (Tensor::arange(shape.iter().product::<i64>(), (Kind::Float, Device::Cpu)) * seed).sin().view(shape)
    };
    let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
        let x = wave(&[3, 5, 16], 0.37).to_kind(Kind::BFloat16).set_requires_grad(true);
        let w = wave(&[16, 24], 0.91).to_kind(Kind::BFloat16).set_requires_grad(true);
        let b = wave(&[24], 1.53).to_kind(Kind::BFloat16).set_requires_grad(true);
        let out = f(&x, &w, &b).to_kind(Kind::Float);
        (&out * wave(&out.size(), 0.11)).sum(Kind::Float).backward();
        [out, x.grad(), w.grad(), b.grad()].map(|t| t.to_kind(Kind::Float))
    };
    let ours = run(&|x, w, b| linear_f32::linear_via_f32(x, &w.tr(), Some(b)));
    let upcast = run(&|x, w, b| {
        (x.to_kind(Kind::Float).matmul(&w.to_kind(Kind::Float)) + b.to_kind(Kind::Float)).to_kind(Kind::BFloat16)
    });
    for (i, (o, r)) in ours.iter().zip(&upcast).enumerate() {
        assert_eq!(o.size(), r.size());
        let scale = r.abs().max().double_value(&[]).max(1.0);
        assert!(max_diff(o, r) <= scale / 128.0, "tensor {i}: {:.3e}", max_diff(o, r));
    }
}

#[test]
fn bf16_copy_runs_forward_and_training_close_to_fp32() {
    let model = tiny(serde_json::json!({}));
    perturb(&model);
    let bf16 = model.to_kind_copy(Kind::BFloat16).unwrap();
    let ids = Tensor::from_slice(&[3i64, 17, 9, 44, 1, 8, 30, 2, 0, 0]).view([2, 5]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0]).view([2, 5]);
    for mask in [None, Some(&mask)] {
        let full = tch::no_grad(|| model.logits(&ids, mask, false));
        let half = tch::no_grad(|| bf16.logits(&ids, mask, false));
        assert_eq!(half.kind(), Kind::BFloat16);
        assert!(max_diff(&half, &full) < 0.05, "{:.3e}", max_diff(&half, &full));
        // Training (dropout, the scores written out on the CPU) runs too.
        let loss = bf16.logits(&ids, mask, true).to_kind(Kind::Float).sum(Kind::Float);
        loss.backward();
    }
}
