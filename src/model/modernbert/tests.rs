//! ModernBERT's unit tests: config forms, refusals, the window band, init.
use super::*;

fn config(extra: serde_json::Value) -> ModernBertConfig {
    let mut c = serde_json::json!({"num_hidden_layers": 4});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    read(&c).unwrap()
}

#[test]
fn both_config_forms_give_the_same_pattern_and_bases() {
    let hub = config(serde_json::json!({"global_attn_every_n_layers": 2, "global_rope_theta": 1000.0,
        "local_rope_theta": 50.0}));
    let v5 = config(serde_json::json!({
        "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}}));
    assert_eq!(hub.layer_kinds().unwrap(), [false, true, false, true]);
    assert_eq!(v5.layer_kinds().unwrap(), hub.layer_kinds().unwrap());
    assert_eq!(hub.rope_thetas().unwrap(), [1000.0, 50.0]);
    assert_eq!(v5.rope_thetas().unwrap(), [1000.0, 50.0]);
    // Defaults: every third layer global, HF's bases.
    let plain = config(serde_json::json!({}));
    assert_eq!(plain.layer_kinds().unwrap(), [false, true, true, false]);
    assert_eq!(plain.rope_thetas().unwrap(), [GLOBAL_THETA, LOCAL_THETA]);
}

#[test]
fn keys_it_does_not_compute_are_refused_by_name() {
    for (extra, key) in [
        (serde_json::json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}), "rope_scaling"),
        (serde_json::json!({"rope_parameters": {"full_attention": {"rope_type": "yarn"}}}), "rope_type"),
        (serde_json::json!({"layer_types": ["full_attention"]}), "layer_types"),
        (serde_json::json!({"layer_types": ["full_attention", "chunked", "x", "y"]}), "layer_types"),
        (serde_json::json!({"head_dim": 32}), "head_dim"),
        (serde_json::json!({"hidden_activation": "swish"}), "hidden_activation"),
        (serde_json::json!({"global_attn_every_n_layers": 0}), "global_attn_every_n_layers"),
        (serde_json::json!({"mlp_dropout": 1.5}), "mlp_dropout"),
    ] {
        let err = format!("{:#}", config(extra.clone()).validate().unwrap_err());
        assert!(err.contains(key), "{extra}: {err}");
    }
}

/// HF's `_init_weights`: normal truncated at 2 stds, std 0.02 in, 0.02 /
/// sqrt(2 layers) out (a truncated normal's std is 0.88 of its parameter).
#[test]
fn random_init_follows_transformers_std_rules() {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let c = config(serde_json::json!({"vocab_size": 4000, "hidden_size": 64, "num_attention_heads": 4,
        "intermediate_size": 96, "num_hidden_layers": 8, "pad_token_id": 0}));
    ModernBertForMaskedLM::new(&vs.root(), c).unwrap();
    let vars = vs.variables();
    let truncated = 0.8796; // std of normal(0, 1) truncated to [-2, 2]
    for (name, std) in [
        ("model.embeddings.tok_embeddings.weight", 0.02),
        ("model.layers.3.attn.Wqkv.weight", 0.02),
        ("model.layers.3.mlp.Wi.weight", 0.02),
        ("model.layers.3.attn.Wo.weight", 0.005),
        ("model.layers.3.mlp.Wo.weight", 0.005),
        ("head.dense.weight", 0.005),
    ] {
        let t = &vars[name];
        let (got, max) = (t.std(true).double_value(&[]), t.abs().max().double_value(&[]));
        assert!((got / (std * truncated) - 1.0).abs() < 0.05, "{name}: std {got}");
        assert!(max <= 2.0 * std + 1e-7 && max > 1.9 * std, "{name}: max {max}");
    }
    assert_eq!(vars["model.final_norm.weight"].sum(Kind::Float).double_value(&[]), 64.0);
    assert_eq!(vars["decoder.bias"].abs().sum(Kind::Float).double_value(&[]), 0.0);
    assert!(
        !vars.contains_key("model.layers.0.attn_norm.weight") && vars.contains_key("model.layers.1.attn_norm.weight")
    );
    assert!(!vars.contains_key("model.final_norm.bias") && !vars.contains_key("model.layers.0.attn.Wqkv.bias"));
}

#[test]
fn the_window_is_a_band_of_half_the_local_attention_on_each_side() {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let c = config(serde_json::json!({"vocab_size": 20, "hidden_size": 8, "num_attention_heads": 2,
        "intermediate_size": 8, "local_attention": 4, "pad_token_id": 0}));
    let m = ModernBertForMaskedLM::new(&vs.root(), c).unwrap();
    let band = m.window_mask(5, None, Kind::Float, tch::Device::Cpu).unwrap();
    let seen: Vec<i64> =
        Vec::try_from(band.eq(0.0).to_kind(Kind::Int64).sum_dim_intlist(-1, false, Kind::Int64).view([-1])).unwrap();
    assert_eq!(seen, [3, 4, 5, 4, 3], "|i - j| <= 2");
    assert!(m.window_mask(3, None, Kind::Float, tch::Device::Cpu).is_none(), "a window over the whole block");
}
