//! `training.activation_checkpointing` changes memory, never the run: each layer
//! run again in backward draws the dropout masks it drew in forward, so a job
//! with it gives the losses and weights of the same job without it, dropout on,
//! for BERT and for DeBERTa (whose relative embeddings every layer shares).
use std::path::Path;

use crate::common::*;

const TINY_DEBERTA: &str = r#"{"model_type": "deberta-v2", "vocab_size": 30522, "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
    "max_position_embeddings": 128, "type_vocab_size": 0, "hidden_act": "gelu", "layer_norm_eps": 1e-7,
    "relative_attention": true, "max_relative_positions": -1, "position_buckets": 16,
    "norm_rel_ebd": "layer_norm", "share_att_key": true, "pos_att_type": "p2c|c2p",
    "position_biased_input": false, "pad_token_id": 0, "initializer_range": 0.02,
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}"#;

/// Per-step losses and final weights of 6 steps of the tiny job, with dropout.
fn train(dir: &Path, model: Option<&str>, checkpointing: bool) -> Run {
    let cfg = write_job(dir, "");
    if let Some(json) = model {
        std::fs::write(dir.join("tiny-bert.json"), json).unwrap();
    }
    let sets = [
        "training.max_steps=6".to_string(),
        "training.log_every=1".into(),
        "eval.at_start=false".into(),
        format!("training.activation_checkpointing={checkpointing}"),
    ];
    let out = run(mlm().arg("train").arg(&cfg).args(sets.iter().flat_map(|s| ["--set", s.as_str()])));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = dir.join("out");
    (losses(&out), weights(&out.join("checkpoint-6")))
}

type Run = (std::collections::BTreeMap<u64, f64>, Vec<(String, Vec<f32>)>);

fn same_run(model: Option<&str>, name: &str) {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (plain, plain_w) = train(a.path(), model, false);
    let (recomputed, recomputed_w) = train(b.path(), model, true);
    assert_eq!(plain.len(), 6, "{name}: {plain:?}");
    for (step, want) in &plain {
        let got = recomputed[step];
        assert!((got - want).abs() <= 1e-5 * want.abs(), "{name} step {step}: loss {got} vs {want}");
    }
    let (worst, param) = worst_relative_difference(&plain_w, &recomputed_w);
    eprintln!("{name}: largest relative weight difference {worst:.2e} ({param})");
    assert!(worst < 1e-4, "{name}: {worst} in {param}");
}

#[test]
fn checkpointed_bert_trains_like_the_plain_one_with_dropout() {
    same_run(None, "bert");
}

#[test]
fn checkpointed_deberta_trains_like_the_plain_one_with_dropout() {
    same_run(Some(TINY_DEBERTA), "deberta");
}
