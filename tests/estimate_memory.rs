//! `mlm estimate-memory` against what `mlm train` really holds on the CPU.
//!
//! Each case trains one step of a BERT, DeBERTa or ModernBERT shape large enough for
//! hundreds of MiB of activations, with and without activation checkpointing,
//! and compares the estimated peak of the pass (training state + activations +
//! the transient peak, no margins) with the step's `peak_rss_bytes -
//! startup_rss_bytes` from `metrics.jsonl`: the resident memory the model, the
//! optimizer and the step added to the process.
//!
//! glibc's malloc raises its mmap threshold as large blocks are freed and then
//! keeps freed heap blocks resident, so with its defaults the resident peak
//! grows step after step above what is allocated (docs/memory.md measures it;
//! the CPU margin of the estimate covers it). The trainings here run with
//! `MALLOC_MMAP_THRESHOLD_=131072` (glibc's default threshold, held fixed):
//! blocks from 128 KiB up are mapped and unmapped as libtorch allocates and
//! frees them, and the resident peak is the peak of live tensors.
use std::path::{Path, PathBuf};

use crate::common::*;

fn bert_config() -> serde_json::Value {
    serde_json::json!({"model_type": "bert", "vocab_size": 30522, "hidden_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "intermediate_size": 1024, "max_position_embeddings": 128})
}

fn deberta_config() -> serde_json::Value {
    serde_json::json!({"model_type": "deberta-v2", "vocab_size": 30522, "hidden_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
        "max_position_embeddings": 512, "relative_attention": true, "position_buckets": 256,
        "norm_rel_ebd": "layer_norm", "share_att_key": true, "pos_att_type": "p2c|c2p",
        "position_biased_input": false, "type_vocab_size": 0, "layer_norm_eps": 1e-7})
}

/// ModernBERT-base's layer shape at 4 layers: a window of 64 (32 tokens each
/// side) in the 128-token blocks, global every 3rd layer.
fn modernbert_config() -> serde_json::Value {
    serde_json::json!({"model_type": "modernbert", "vocab_size": 30522, "hidden_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "intermediate_size": 384, "max_position_embeddings": 8192,
        "local_attention": 64, "pad_token_id": 0})
}

/// The job's overrides: the model, one logged step of `batch` sequences of 128
/// tokens, no evaluation before or during training, prepared data shared.
fn sets(dir: &Path, name: &str, precision: &str, batch: usize, checkpointing: bool) -> Vec<String> {
    [
        format!("model.config={:?}", dir.join(format!("{name}.json")).display().to_string()),
        "data.block_size=128".into(),
        format!("data.prepared_dir={:?}", dir.join("prepared").display().to_string()),
        format!(
            "training.output_dir={:?}",
            dir.join(format!("out-{name}-{precision}-{checkpointing}")).display().to_string()
        ),
        format!("training.precision={precision:?}"),
        "training.max_steps=1".into(),
        format!("training.batch_size={batch}"),
        format!("training.activation_checkpointing={checkpointing}"),
        "training.log_every=1".into(),
        "eval.at_start=false".into(),
        "eval.at_epoch_end=false".into(),
        "eval.max_chunks=8".into(),
        "checkpoint.save_best=false".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

fn estimate(cfg: &Path, sets: &[String]) -> serde_json::Value {
    let out = run(mlm().arg("estimate-memory").arg(cfg).args(sets).arg("--json"));
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// `peak_rss_bytes - startup_rss_bytes` of the first step.
fn measured(cfg: &Path, sets: &[String], out: PathBuf) -> u64 {
    let status = run(mlm().arg("train").arg(cfg).args(sets).env("MALLOC_MMAP_THRESHOLD_", "131072")).status;
    assert!(status.success());
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let step: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(step["kind"], "train");
    step["peak_rss_bytes"].as_u64().unwrap() - step["startup_rss_bytes"].as_u64().unwrap()
}

#[test]
fn estimated_peaks_are_within_20_percent_of_measured_cpu_peaks() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    for (name, config) in [("bert", bert_config()), ("deberta", deberta_config()), ("modernbert", modernbert_config())]
    {
        std::fs::write(dir.path().join(format!("{name}.json")), config.to_string()).unwrap();
    }
    let prepared = run(mlm().arg("prepare").arg(&cfg).args(sets(dir.path(), "bert", "fp32", 16, false)));
    assert!(prepared.status.success());
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let mut failures = Vec::new();
    let cases = [
        ("bert", "fp32", 16),
        ("deberta", "fp32", 16),
        ("modernbert", "fp32", 16),
        ("bert", "bf16", 16),
        ("deberta", "bf16", 16),
        ("modernbert", "bf16", 16),
    ];
    for (name, precision, batch) in cases {
        for checkpointing in [false, true] {
            let sets = sets(dir.path(), name, precision, batch, checkpointing);
            let report = estimate(&cfg, &sets);
            assert_eq!(report["target"], "cpu");
            assert_eq!(report["configured"]["rows"].as_u64(), Some(batch as u64));
            let predicted = report["configured"]["peak_bytes"].as_u64().unwrap();
            let out = dir.path().join(format!("out-{name}-{precision}-{checkpointing}"));
            let measured = measured(&cfg, &sets, out);
            let error = (predicted as f64 - measured as f64) / measured as f64;
            let line = format!(
                "{name} {precision} batch {batch} checkpointing {checkpointing}: measured {:.1} MiB, predicted {:.1} MiB ({:+.1}%)",
                mib(measured),
                mib(predicted),
                100.0 * error
            );
            eprintln!("{line}");
            assert!(measured > 250 << 20, "{line}: too little memory to measure against the process's noise");
            if error.abs() > 0.20 {
                failures.push(line);
            }
        }
    }
    assert!(failures.is_empty(), "off by more than 20%:\n{}", failures.join("\n"));
}

/// `mlm estimate-memory configs/wiki.toml` for DeBERTa-v3-large's shape on a
/// card of `gib` GiB, with `sets`.
fn wiki(gib: &str, sets: &[&str]) -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = run(mlm()
        .arg("estimate-memory")
        .arg(root.join("configs/wiki.toml"))
        .arg("--model-config")
        .arg(root.join("configs/models/deberta-v3-large.json"))
        .args(["--gpu-memory", gib, "--json"])
        .args(sets.iter().flat_map(|s| ["--set", s])));
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The Wikipedia job (DeBERTa-v3-large, batch 512, bf16) as configured fits an
/// 80 GB card by the estimate, and a 141 GB card too.
#[test]
fn the_wiki_job_fits_80_and_141_gb_cards_by_the_estimate() {
    for gib in ["80", "141"] {
        let r = wiki(gib, &[]);
        assert_eq!(r["target"], "cuda");
        assert_eq!(r["arch"], "deberta-v2");
        let params = r["parameters"].as_u64().unwrap();
        assert!((430_000_000..440_000_000).contains(&params), "DeBERTa-v3-large has 435M parameters, not {params}");
        assert_eq!(r["configured"]["fits"], true, "{gib} GiB: {}", r["verdict"]);
        assert!(r["verdict"].as_str().unwrap().starts_with("fits:"), "{}", r["verdict"]);
    }
}

/// A whole batch of 512 does not fit 72 GB without checkpointing (it needs
/// 74.6 GiB): the verdict names the micro-batch size that does, and
/// checkpointing; `"auto"` resolves to the largest divisor that fits, more on
/// a larger card.
#[test]
fn a_job_that_does_not_fit_is_told_what_would() {
    let r = wiki("72", &["training.micro_batch_size=512"]);
    assert_eq!(r["configured"]["fits"], false);
    let verdict = r["verdict"].as_str().unwrap();
    let fitting = r["largest_fitting"]["without_checkpointing"].as_u64().unwrap();
    assert!(fitting < 512);
    assert!(verdict.starts_with("does not fit:"), "{verdict}");
    assert!(verdict.contains(&format!("training.micro_batch_size = {fitting}")), "{verdict}");
    assert!(verdict.contains("activation_checkpointing = true with micro_batch_size = 512"), "{verdict}");
    let auto = |gib| wiki(gib, &["training.micro_batch_size=\"auto\""])["configured"]["rows"].as_u64().unwrap();
    assert_eq!(auto("72"), fitting);
    assert!(auto("141") > fitting);
    let ckpt = wiki("72", &["training.micro_batch_size=\"auto\"", "training.activation_checkpointing=true"]);
    assert_eq!(ckpt["configured"]["rows"], 512);
}

#[test]
fn the_table_names_the_state_the_sizes_and_a_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let out = run(mlm().arg("estimate-memory").arg(&cfg).args(["--gpu-memory", "4"]));
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for want in ["fp32 master weights", "AdamW moments", "with activation checkpointing", "largest micro_batch_size"] {
        assert!(text.contains(want), "{want:?} missing from\n{text}");
    }
    // The tiny job's batch of 16: rows 1, 8 and 16.
    let rows: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(["1", "8", "16"].iter().all(|r| rows.contains(r)), "{text}");
    assert!(text.lines().last().unwrap().starts_with("verdict: fits:"), "{text}");
}

#[test]
fn mistakes_are_one_line_naming_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let missing_model = ["--set", "model.config=\"/nonexistent/config.json\""];
    for (args, want) in [
        (vec!["--gpu-memory", "lots"], "--gpu-memory \"lots\" must be a positive number of GiB"),
        (vec!["--gpu-memory", "-3"], "must be a positive number of GiB"),
        (missing_model.to_vec(), "pass --model-config"),
        (vec!["--set", "training.device=\"cpu\"", "--gpu-memory", "80"], "training.device = \"cpu\""),
        (vec!["--set", "training.global_batch_size=48", "--workers", "5"], "is not divisible by 5 workers"),
    ] {
        let out = run(mlm().arg("estimate-memory").arg(&cfg).args(&args));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].contains(want), "{args:?}: {err}");
    }
    let out = run(mlm().arg("estimate-memory").arg(dir.path().join("nope.toml")));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("nope.toml"));
}

#[test]
fn a_global_batch_is_shared_among_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    // training.global_batch_size without a per-worker batch size.
    let text = std::fs::read_to_string(&cfg).unwrap().replacen("batch_size = 16\n", "global_batch_size = 48\n", 1);
    std::fs::write(&cfg, text).unwrap();
    let share = |workers: &str| estimate(&cfg, &["--workers".into(), workers.into()])["configured"]["rows"].as_u64();
    assert_eq!((share("1"), share("4")), (Some(48), Some(12)));
}
