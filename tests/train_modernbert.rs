//! The training features on a small ModernBERT (global and sliding-window
//! layers, the window shorter than the 64-token blocks) with the real
//! binaries: activation checkpointing with dropout gives the plain run, bf16
//! trains, micro-batches give the whole batch, exact resume, and two
//! data-parallel workers give one worker with twice the batch (CamemBERT too).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::*;

/// A tiny ModernBERT on the tutorial job's 30522-token tokenizer ([PAD] = 0):
/// 3 layers, the first and third global, a window of 16 (8 tokens each side).
const TINY_MODERNBERT: &str = r#"{"model_type": "modernbert", "architectures": ["ModernBertForMaskedLM"],
    "vocab_size": 30522, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_attention_heads": 4, "max_position_embeddings": 128, "local_attention": 16,
    "global_attn_every_n_layers": 2, "pad_token_id": 0, "cls_token_id": 101, "sep_token_id": 102,
    "embedding_dropout": 0.1, "mlp_dropout": 0.1, "attention_dropout": 0.1}"#;

/// A tiny CamemBERT on the same tokenizer.
const TINY_CAMEMBERT: &str = r#"{"model_type": "camembert", "architectures": ["CamembertForMaskedLM"],
    "vocab_size": 30522, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 128, "max_position_embeddings": 130, "type_vocab_size": 1, "pad_token_id": 0,
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}"#;

/// The tiny tutorial job on `model` (a `config.json`'s text), with dropout or
/// without, a checkpoint every 4 steps.
fn job(dir: &Path, model: &str, dropout: bool) -> PathBuf {
    let cfg = write_job(dir, "[checkpoint]\nevery_steps = 4\nkeep_last = 2\n");
    let model = if dropout { model.to_string() } else { model.replace("dropout\": 0.1", "dropout\": 0.0") };
    std::fs::write(dir.join("tiny-bert.json"), model).unwrap();
    cfg
}

/// `mlm train` for 8 steps, every loss logged, no evaluation before, plus `extra` sets.
fn train(cfg: &Path, batch: usize, extra: &[&str]) -> Output {
    let batch = format!("training.batch_size={batch}");
    let base = ["training.max_steps=8", "training.log_every=1", "eval.at_start=false", batch.as_str()];
    let sets: Vec<&str> = base.iter().chain(extra).flat_map(|s| ["--set", *s]).collect();
    let out = run(mlm().arg("train").arg(cfg).args(sets));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

type Run = (BTreeMap<u64, f64>, Vec<(String, Vec<f32>)>);

fn result(dir: &Path) -> Run {
    let out = dir.join("out");
    (losses(&out), weights(&out.join("checkpoint-8")))
}

fn assert_same(name: &str, want: &Run, got: &Run, loss_tol: f64, weight_tol: f64) {
    assert_eq!(want.0.len(), 8, "{name}: {:?}", want.0);
    assert_eq!(want.0.keys().collect::<Vec<_>>(), got.0.keys().collect::<Vec<_>>(), "{name}");
    for (step, w) in &want.0 {
        let g = got.0[step];
        assert!((g - w).abs() <= loss_tol * w.abs(), "{name} step {step}: loss {g} vs {w}");
    }
    let (worst, param) = worst_relative_difference(&want.1, &got.1);
    eprintln!("{name}: largest relative weight difference {worst:.2e} ({param})");
    assert!(worst <= weight_tol, "{name}: {worst} in {param}");
}

#[test]
fn modernbert_checkpointed_layers_train_like_the_plain_ones_with_dropout() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(&job(a.path(), TINY_MODERNBERT, true), 8, &[]);
    train(&job(b.path(), TINY_MODERNBERT, true), 8, &["training.activation_checkpointing=true"]);
    assert_same("checkpointing", &result(a.path()), &result(b.path()), 1e-5, 1e-4);
}

#[test]
fn modernbert_micro_batches_give_the_whole_batch() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(&job(a.path(), TINY_MODERNBERT, false), 8, &[]);
    train(&job(b.path(), TINY_MODERNBERT, false), 8, &["training.micro_batch_size=2"]);
    assert_same("micro-batches of 2", &result(a.path()), &result(b.path()), 1e-5, 1e-5);
}

/// bf16 (the fp32 master and a bf16 compute copy) follows the fp32 run's losses.
#[test]
fn modernbert_trains_in_bf16() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train(&job(a.path(), TINY_MODERNBERT, false), 8, &[]);
    train(&job(b.path(), TINY_MODERNBERT, false), 8, &["training.precision=\"bf16\""]);
    let (fp32, bf16) = (losses(&a.path().join("out")), losses(&b.path().join("out")));
    assert_eq!(bf16.len(), 8);
    for (step, want) in &fp32 {
        let got = bf16[step];
        assert!(got.is_finite() && (got - want).abs() < 0.05 * want, "step {step}: bf16 {got} vs fp32 {want}");
    }
}

/// Resumed from its step-4 checkpoint, a job with dropout redoes steps 5-8
/// with the same losses and weights, bit for bit.
#[test]
fn modernbert_resume_reproduces_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), TINY_MODERNBERT, true);
    let out = dir.path().join("out");
    train(&cfg, 8, &[]);
    let want = losses(&out);
    assert_eq!(want.len(), 8);
    let want_w = std::fs::read(out.join("checkpoint-8/model.safetensors")).unwrap();
    let checkpoint = out.join("checkpoint-4");
    let again = run(mlm()
        .arg("train")
        .arg(&cfg)
        .args(["--resume", checkpoint.to_str().unwrap(), "--set", "checkpoint.overwrite_output_dir=true"])
        .args(["--set", "training.max_steps=8", "--set", "training.log_every=1"])
        .args(["--set", "eval.at_start=false", "--set", "training.batch_size=8"]));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success() && stderr.contains("resuming from"), "{stderr}");
    let got = losses(&out);
    for (step, loss) in &want {
        assert_eq!(got.get(step).map(|l| l.to_bits()), Some(loss.to_bits()), "step {step}");
    }
    assert!(std::fs::read(out.join("checkpoint-8/model.safetensors")).unwrap() == want_w, "final weights differ");
}

/// `mlm-launch --nproc 2` with batches of 4 ends with the weights of one
/// process with batches of 8, for ModernBERT and CamemBERT.
#[test]
fn modernbert_and_camembert_two_workers_equal_one_worker_with_twice_the_batch() {
    for (name, model) in [("modernbert", TINY_MODERNBERT), ("camembert", TINY_CAMEMBERT)] {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        train(&job(a.path(), model, false), 8, &[]);
        let cfg = job(b.path(), model, false);
        let mut launch = Command::new(launcher());
        launch.args(["--nproc", "2", "--device", "cpu", "--mlm"]).arg(env!("CARGO_BIN_EXE_mlm")).arg(&cfg);
        for s in ["training.max_steps=8", "training.log_every=1", "eval.at_start=false", "training.batch_size=4"] {
            launch.args(["--set", s]);
        }
        let out = run(&mut launch);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        assert_same(name, &result(a.path()), &result(b.path()), 1e-5, 1e-5);
    }
}
