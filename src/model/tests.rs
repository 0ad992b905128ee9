//! `MaskedLm` over every architecture, and the registry.
use super::*;

fn tiny(model_type: &str) -> MaskedLm {
    let config = serde_json::json!({
        "model_type": model_type, "vocab_size": 50, "hidden_size": 16, "dim": 16,
        "num_hidden_layers": 1, "n_layers": 1, "num_attention_heads": 2, "n_heads": 2,
        "intermediate_size": 24, "hidden_dim": 24, "max_position_embeddings": 12,
    });
    MaskedLm::from_config_json(config, Device::Cpu).unwrap()
}

#[test]
fn no_mask_gives_what_an_all_ones_mask_gives_and_attention_says_its_kernel() {
    let deberta = serde_json::json!({
        "model_type": "deberta-v2", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 12,
        "relative_attention": true, "position_buckets": 4, "pos_att_type": ["p2c", "c2p"],
        "position_biased_input": false,
    });
    let models =
        [tiny("bert"), tiny("distilbert"), tiny("roberta"), MaskedLm::from_config_json(deberta, Device::Cpu).unwrap()];
    let ids = Tensor::from_slice(&[2i64, 7, 9, 3, 4, 5, 6, 8]).view([2, 4]);
    let ones = Tensor::ones([2, 4], (Kind::Int64, Device::Cpu));
    for model in &models {
        let with = model.logits(&ids, Some(&ones), false);
        let without = model.logits(&ids, None, false);
        let diff = (with - without).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{}: {diff}", model.config_json["model_type"]);
        let line = model.attention_kernel_line(Device::Cpu, Kind::Float, 4);
        assert!(line.starts_with("attention: ") && !line.contains("none (no kernel"), "{line}");
    }
    assert!(models[0].attention_kernel_line(Device::Cpu, Kind::Float, 4).contains("no mask"));
    let modernbert = serde_json::json!({"model_type": "modernbert", "vocab_size": 50, "hidden_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24, "pad_token_id": 0,
        "local_attention": 2});
    let modernbert = MaskedLm::from_config_json(modernbert, Device::Cpu).unwrap();
    let with = modernbert.logits(&ids, Some(&ones), false);
    assert!((with - modernbert.logits(&ids, None, false)).abs().max().double_value(&[]) < 1e-6);
    assert!(modernbert.attention_kernel_line(Device::Cpu, Kind::Float, 4).contains("band bias"));
    let deberta = models[3].attention_kernel_line(Device::Cpu, Kind::Float, 4);
    assert!(deberta.contains("relative-position bias") && deberta.contains("scores written out"), "{deberta}");
}

#[test]
fn bf16_copies_run_forward_and_stay_close_to_fp32() {
    for model_type in ["bert", "distilbert"] {
        let model = tiny(model_type);
        let bf16 = model.to_kind_copy(Kind::BFloat16).unwrap();
        let ids = Tensor::from_slice(&[2i64, 7, 9, 3, 4, 0, 0, 0]).view([2, 4]);
        let mask = ids.ne(0).to_kind(Kind::Int64);
        let _ = mask.get(0).fill_(1);
        let full = model.logits(&ids, Some(&mask), false);
        let half = bf16.logits(&ids, Some(&mask), false);
        assert_eq!(half.kind(), Kind::BFloat16);
        assert_eq!(half.size(), [2, 4, 50]);
        let diff = (half.to_kind(Kind::Float) - full).abs().max().double_value(&[]);
        assert!(diff < 0.05, "{model_type}: bf16 vs fp32 max abs diff {diff}");
        // Training mode (dropout) also runs in bf16.
        let _ = bf16.logits(&ids, Some(&mask), true).sum(Kind::Float).double_value(&[]);
    }
}

#[test]
fn random_init_follows_transformers() {
    let model = tiny("bert");
    let vars = model.vs.variables();
    let word = &vars["bert.embeddings.word_embeddings.weight"];
    assert_eq!(word.get(0).abs().sum(Kind::Float).double_value(&[]), 0.0, "padding row is zero");
    let std = f64::try_from(word.narrow(0, 1, 49).std(true)).unwrap();
    assert!((std - 0.02).abs() < 0.004, "word embedding std {std}");
    assert_eq!(f64::try_from(vars["cls.predictions.bias"].abs().sum(Kind::Float)).unwrap(), 0.0);
    assert_eq!(f64::try_from(vars["bert.embeddings.LayerNorm.weight"].mean(Kind::Float)).unwrap(), 1.0);
}

#[test]
fn unsupported_model_type_is_named() {
    let err = MaskedLm::from_config_json(serde_json::json!({"model_type": "t5"}), Device::Cpu).err().unwrap();
    assert!(err.to_string().contains("t5"), "{err}");
}

#[test]
fn no_decay_covers_biases_and_layer_norms() {
    assert!(MaskedLm::no_decay("cls.predictions.bias"));
    assert!(MaskedLm::no_decay("bert.encoder.layer.0.output.LayerNorm.weight"));
    assert!(MaskedLm::no_decay("distilbert.transformer.layer.0.sa_layer_norm.weight"));
    assert!(MaskedLm::no_decay("vocab_layer_norm.weight"));
    assert!(!MaskedLm::no_decay("bert.encoder.layer.0.attention.self.query.weight"));
    assert!(!MaskedLm::no_decay("bert.embeddings.word_embeddings.weight"));
    assert!(MaskedLm::no_decay("lm_head.bias"));
    assert!(MaskedLm::no_decay("lm_head.layer_norm.weight"));
    assert!(MaskedLm::no_decay("roberta.embeddings.LayerNorm.weight"));
    // ModernBERT's norms, as HF's Trainer (`norm`, `*_norm` modules).
    for name in [
        "model.embeddings.norm.weight",
        "model.layers.1.attn_norm.weight",
        "model.layers.0.mlp_norm.weight",
        "model.final_norm.weight",
        "head.norm.weight",
        "decoder.bias",
    ] {
        assert!(MaskedLm::no_decay(name), "{name}");
    }
    for name in ["model.layers.0.attn.Wqkv.weight", "model.layers.0.mlp.Wi.weight", "head.dense.weight"] {
        assert!(!MaskedLm::no_decay(name), "{name}");
    }
    assert!(MaskedLm::no_decay("deberta.encoder.LayerNorm.weight"));
    assert!(MaskedLm::no_decay("cls.predictions.transform.LayerNorm.bias"));
    assert!(MaskedLm::no_decay("deberta.encoder.layer.0.attention.self.pos_key_proj.bias"));
    assert!(!MaskedLm::no_decay("deberta.encoder.rel_embeddings.weight"));
    assert!(!MaskedLm::no_decay("deberta.encoder.layer.0.attention.self.query_proj.weight"));
    for ln in ["transformer.h.0.ln_1.weight", "transformer.h.11.ln_2.weight", "transformer.ln_f.weight"] {
        assert!(MaskedLm::no_decay(ln), "{ln}");
    }
    assert!(MaskedLm::no_decay("transformer.h.0.attn.c_attn.bias"));
    assert!(!MaskedLm::no_decay("transformer.h.0.attn.c_attn.weight"));
    assert!(!MaskedLm::no_decay("transformer.h.0.mlp.c_fc.weight"));
    assert!(!MaskedLm::no_decay("transformer.wpe.weight"));
}

fn tiny_deberta(extra: serde_json::Value) -> Result<MaskedLm> {
    let mut config = serde_json::json!({
        "model_type": "deberta-v2", "vocab_size": 50, "hidden_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24,
        "max_position_embeddings": 12, "relative_attention": true, "position_buckets": 4,
        "share_att_key": true, "pos_att_type": "p2c|c2p", "norm_rel_ebd": "layer_norm",
        "position_biased_input": false,
    });
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    MaskedLm::from_config_json(config, Device::Cpu)
}

#[test]
fn new_architectures_run_in_bf16_too() {
    for model in [tiny("roberta"), tiny_deberta(serde_json::json!({})).unwrap()] {
        let bf16 = model.to_kind_copy(Kind::BFloat16).unwrap();
        let ids = Tensor::from_slice(&[0i64, 7, 9, 2, 0, 5, 2, 1]).view([2, 4]);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 0]).view([2, 4]);
        let full = model.logits(&ids, Some(&mask), false);
        let half = bf16.logits(&ids, Some(&mask), true);
        assert_eq!(half.kind(), Kind::BFloat16);
        assert_eq!(full.size(), [2, 4, 50]);
        let diff = (bf16.logits(&ids, Some(&mask), false).to_kind(Kind::Float) - full).abs().max().double_value(&[]);
        assert!(diff < 0.05, "{:?}: bf16 vs fp32 {diff}", model.arch);
    }
}

#[test]
fn unsupported_deberta_options_are_refused_naming_the_key() {
    for (extra, key) in [
        (serde_json::json!({"conv_kernel_size": 4}), "conv_kernel_size"),
        (serde_json::json!({"conv_kernel_size": 3, "conv_act": "swish"}), "conv_act"),
        (serde_json::json!({"conv_kernel_size": 3, "conv_groups": 3}), "conv_groups"),
        (serde_json::json!({"attention_head_size": 4}), "attention_head_size"),
        (serde_json::json!({"pos_att_type": ["c2p", "p2p"]}), "pos_att_type"),
        (serde_json::json!({"norm_rel_ebd": "layer_norm|scale"}), "norm_rel_ebd"),
        (serde_json::json!({"hidden_act": "swish"}), "swish"),
        (serde_json::json!({"legacy": false, "embedding_size": 8}), "embedding_size"),
    ] {
        let err = format!("{:#}", tiny_deberta(extra.clone()).err().expect("refused"));
        assert!(err.contains(key) && err.contains("not supported"), "{extra}: {err}");
    }
    // attention_head_size equal to hidden_size / heads is what we compute.
    tiny_deberta(serde_json::json!({"attention_head_size": 8})).unwrap();
}

#[test]
fn bert_and_roberta_as_decoders_are_refused() {
    for (model_type, key) in [("roberta", "is_decoder"), ("bert", "is_decoder"), ("bert", "add_cross_attention")] {
        let mut config = serde_json::json!({"model_type": model_type, "vocab_size": 50, "hidden_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24,
            "max_position_embeddings": 12});
        config[key] = true.into();
        let err = format!("{:#}", MaskedLm::from_config_json(config, Device::Cpu).err().unwrap());
        assert!(err.contains("is_decoder / add_cross_attention"), "{model_type}: {err}");
    }
}

#[test]
fn xlm_roberta_and_camembert_are_roberta_saved_under_their_own_class() {
    for (model_type, class) in [("xlm-roberta", "XLMRobertaForMaskedLM"), ("camembert", "CamembertForMaskedLM")] {
        let model = tiny(model_type);
        assert_eq!(model.arch.model_type(), model_type);
        assert!(model.vs.variables().contains_key("lm_head.layer_norm.weight"));
        assert!(model.vs.variables().contains_key("roberta.embeddings.word_embeddings.weight"));
        assert_eq!(model.max_positions(), 10, "12 positions less pad_token_id 1 + 1");
        let dir = tempfile::tempdir().unwrap();
        model.save_dir(dir.path()).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(config["model_type"], model_type);
        assert_eq!(config["architectures"][0], class);
    }
}

/// The count from `config.json` alone equals the built model's, for every
/// architecture and the DeBERTa options that add or drop parameters.
#[test]
fn parameters_match_the_built_model() {
    let base = serde_json::json!({
        "vocab_size": 97, "hidden_size": 24, "dim": 24, "num_hidden_layers": 2, "n_layers": 2,
        "num_attention_heads": 4, "n_heads": 4, "intermediate_size": 40, "hidden_dim": 40,
        "max_position_embeddings": 30, "n_embd": 24, "n_layer": 2, "n_head": 4, "n_positions": 30,
    });
    let deberta = |extra: serde_json::Value| {
        let mut c = serde_json::json!({"model_type": "deberta-v2", "relative_attention": true,
            "position_buckets": 8, "pos_att_type": "p2c|c2p", "norm_rel_ebd": "layer_norm",
            "share_att_key": true, "position_biased_input": false, "type_vocab_size": 0});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    // Every architecture with its defaults, then the options that add or drop parameters.
    // (ModernBERT's default pad_token_id, 50283, lies outside the small vocabulary.)
    let mut cases: Vec<_> = ARCHITECTURES
        .iter()
        .map(|spec| serde_json::json!({"model_type": spec.model_type, "pad_token_id": 0}))
        .collect();
    cases.extend([
        serde_json::json!({"model_type": "modernbert", "pad_token_id": 0, "norm_bias": true, "attention_bias": true,
            "mlp_bias": true, "classifier_bias": true, "decoder_bias": false}),
        serde_json::json!({"model_type": "roberta", "type_vocab_size": 1}),
        serde_json::json!({"model_type": "gpt2", "n_inner": 40}),
        deberta(serde_json::json!({})),
        deberta(serde_json::json!({"share_att_key": false})),
        deberta(serde_json::json!({"share_att_key": false, "pos_att_type": ["c2p"], "norm_rel_ebd": "none"})),
        deberta(serde_json::json!({"relative_attention": false, "position_biased_input": true})),
        deberta(serde_json::json!({"embedding_size": 16, "type_vocab_size": 2})),
        deberta(serde_json::json!({"conv_kernel_size": 3, "conv_act": "gelu"})),
        deberta(serde_json::json!({"conv_kernel_size": 5, "conv_groups": 4})),
    ]);
    for extra in cases {
        let mut c = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        let shape = ModelShape::from_config(&c).unwrap();
        assert_eq!(shape.model_type, c["model_type"], "{c}");
        let model = MaskedLm::from_config_json(c.clone(), Device::Cpu).unwrap();
        assert_eq!(shape.parameters, model.num_parameters() as u64, "{c}");
        let vars = model.vs.variables();
        let word = vars.iter().find(|(n, _)| {
            n.ends_with("word_embeddings.weight") || n.ends_with("tok_embeddings.weight") || n.ends_with(".wte.weight")
        });
        let word = word.unwrap().1.numel();
        assert_eq!(shape.word_embedding_parameters, word as u64, "{c}");
    }
}

/// Building draws from libtorch's global generator, which the other tests'
/// threads draw from too: the check runs alone, in a child process.
#[test]
fn one_seed_gives_the_same_weights_on_every_device_and_copies_draw_nothing() {
    if std::env::var_os("MLM_SEEDED_BUILD_CHILD").is_none() {
        let name = "model::tests::one_seed_gives_the_same_weights_on_every_device_and_copies_draw_nothing";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads", "1", "--nocapture"])
            .env("MLM_SEEDED_BUILD_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        return;
    }
    let deberta = serde_json::json!({
        "model_type": "deberta-v2", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 12,
        "relative_attention": true, "position_buckets": 4, "pos_att_type": "p2c|c2p",
        "position_biased_input": false,
    });
    let bert = tiny("bert").config_json;
    // On a GPU machine the build moves to the GPU: CUDA's generator must draw nothing.
    let device = Device::cuda_if_available();
    for config in [bert, deberta] {
        tch::manual_seed(7);
        let direct = MaskedLm::build_on_cpu(config.clone()).unwrap();
        tch::manual_seed(7);
        let moved = MaskedLm::from_config_json(config.clone(), device).unwrap();
        assert_eq!(moved.vs.device(), device);
        let direct_vars = direct.vs.variables();
        for (name, t) in moved.vs.variables() {
            let d = &direct_vars[&name];
            assert!(t.to_device(Device::Cpu).equal(d), "{}: {name} differs on {device:?}", config["model_type"]);
        }
        // A copy in another dtype is built without draws: the generator
        // is where the master's build left it.
        let after_build = Tensor::randn([8], (Kind::Float, Device::Cpu));
        tch::manual_seed(7);
        let master = MaskedLm::from_config_json(config.clone(), Device::Cpu).unwrap();
        let copy = master.to_kind_copy(Kind::BFloat16).unwrap();
        let after_copy = Tensor::randn([8], (Kind::Float, Device::Cpu));
        assert!(after_build.equal(&after_copy), "to_kind_copy drew from the generator");
        let master_vars = master.vs.variables();
        for (name, t) in copy.vs.variables() {
            assert_eq!(t.kind(), Kind::BFloat16);
            assert!(t.equal(&master_vars[&name].to_kind(Kind::BFloat16)), "{name} is not the master's");
        }
    }
}

#[test]
fn every_architecture_is_found_by_model_type_and_by_class() {
    for spec in ARCHITECTURES {
        let by_type = Arch::from_config(&serde_json::json!({"model_type": spec.model_type})).unwrap();
        assert_eq!(by_type.mlm_class(), spec.mlm_class);
        let by_class = Arch::from_config(&serde_json::json!({"architectures": [spec.mlm_class]})).unwrap();
        assert_eq!(by_class, by_type, "{}", spec.mlm_class);
    }
    let err = Arch::from_config(&serde_json::json!({"architectures": ["T5ForConditionalGeneration"]})).unwrap_err();
    assert!(
        err.to_string().contains("bert, distilbert, roberta, xlm-roberta, camembert, deberta-v2, modernbert, gpt2"),
        "{err}"
    );
}

#[test]
fn configs_the_model_refuses_are_refused() {
    let c = serde_json::json!({"model_type": "deberta-v2", "conv_kernel_size": 2});
    let err = ModelShape::from_config(&c).unwrap_err().to_string();
    assert!(err.contains("conv_kernel_size"), "{err}");
    let c = serde_json::json!({"model_type": "bert", "hidden_size": 10, "num_attention_heads": 4});
    assert!(ModelShape::from_config(&c).is_err());
}
