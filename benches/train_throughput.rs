//! Training throughput: `mlm train` against the Python reference step
//! (`benches/reference_train.py`: transformers + torch, as the HF Trainer runs it),
//! same model, batch, block, precision and thread count, in one invocation.
//!
//!     cargo bench --profile dev --bench train_throughput
//!
//! Models (random init, configs written here): DistilBERT-base and a
//! DeBERTa-v3-small shape, with its 128,100-token vocabulary and with BERT's
//! 30,522 (`deberta-v3-small-shape-vocab30522`: the encoder's share); fp32 and bf16; block 128, batch 8; the corpus is the
//! Python tutorial + FAQ reST. Ours is read from `metrics.jsonl` (one line per
//! step, `log_every = 1`) after the warm-up steps, so start-up, the final
//! evaluation and the checkpoint written at the end are not timed. The two sides
//! take turns (`MLM_BENCH_ROUNDS` runs each, default 2) and the ratio is of the
//! median step times over all of a side's timed steps, so that a spell of load on
//! a shared machine moves neither side alone; the ratio of the means is printed
//! beside it.
//!
//! Knobs: `MLM_BENCH_STEPS` (timed steps per run, default 8), `MLM_BENCH_WARMUP`
//! (untimed steps first, default 2), `MLM_BENCH_ROUNDS`, `MLM_BENCH_MODELS` (`distilbert,deberta`),
//! `MLM_BENCH_PRECISIONS` (`fp32,bf16`), `MLM_BENCH_THREADS` (default: all cores),
//! `MLM_BENCH_HEADS` (0: skip the sparse-vs-dense head comparison, run for fp32),
//! `MLM_BIN`, `MLM_PYTHON`. Results also go to `target/bench/train/results.json`.
#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use common::*;

const BLOCK: usize = 128;
const BATCH: usize = 8;

fn distilbert_base() -> Value {
    json!({
        "model_type": "distilbert", "architectures": ["DistilBertForMaskedLM"],
        "vocab_size": 30522, "dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072,
        "max_position_embeddings": 512, "activation": "gelu", "dropout": 0.1, "attention_dropout": 0.1,
        "initializer_range": 0.02, "pad_token_id": 0, "sinusoidal_pos_embds": false
    })
}

/// DeBERTa-v3-small's shape with a vocabulary of `vocab_size` rows: the real
/// 128,100, or BERT's 30,522, where the encoder dominates the step.
fn deberta_v3_small_shape(vocab_size: usize) -> Value {
    json!({
        "model_type": "deberta-v2", "architectures": ["DebertaV2ForMaskedLM"],
        "vocab_size": vocab_size, "hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12,
        "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 0,
        "initializer_range": 0.02, "layer_norm_eps": 1e-7, "relative_attention": true,
        "max_relative_positions": -1, "position_buckets": 256, "pos_att_type": ["p2c", "c2p"],
        "share_att_key": true, "norm_rel_ebd": "layer_norm", "position_biased_input": false,
        "pad_token_id": 0
    })
}

/// Target ratio (ours / reference) from the project card, where there is one.
fn target(model: &str, precision: &str) -> Option<f64> {
    match (model, precision) {
        ("distilbert-base", "bf16") | ("deberta-v3-small-shape" | "deberta-v3-small-shape-vocab30522", _) => Some(1.5),
        _ => None,
    }
}

struct Ours {
    /// Each timed step's time.
    step_times: Vec<f64>,
    step_s: f64,
    /// Mean of each `time_*_s` field the metrics carry (absent on older builds).
    phases: Vec<(String, f64)>,
    mfu: Option<f64>,
}

/// Runs `mlm train` and reads its per-step metrics after `warmup` steps.
#[allow(clippy::too_many_arguments)]
fn run_ours(
    bin: &Path,
    dir: &Path,
    cfg: &Path,
    prec: &str,
    warmup: usize,
    steps: usize,
    threads: usize,
    sparse: bool,
) -> Result<Ours> {
    let docs = python_docs()?;
    let out = dir.join("run");
    let _ = std::fs::remove_dir_all(&out); // never resume an earlier run
    let job = format!(
        r#"# written by benches/train_throughput.rs
[model]
config = {cfg}
tokenizer = {tok}

[data]
files = [{tut}, {faq}]
document_boundary = "blank_line"
block_size = {BLOCK}
prepared_dir = {prepared}

[training]
output_dir = {out}
max_steps = {total}
batch_size = {BATCH}
precision = "{prec}"
device = "cpu"
threads = {threads}
log_every = 1
warmup_steps = 1
sparse_head = {sparse}

[eval]
at_start = false
at_epoch_end = false
max_chunks = 8
batch_size = 8

[checkpoint]
resume = "none"
save_best = false

[logging]
progress = "never"
"#,
        cfg = toml_path(cfg),
        tok = toml_path(&tokenizer()?),
        tut = toml_path(&docs.join("tutorial/*.rst.txt")),
        faq = toml_path(&docs.join("faq/*.rst.txt")),
        prepared = toml_path(&work_dir("train").join("prepared")),
        out = toml_path(&out),
        total = warmup + steps,
    );
    let head = if sparse { "sparse" } else { "dense" };
    let job_path = dir.join(format!("job-{prec}-{head}.toml"));
    std::fs::write(&job_path, job)?;
    run_logged(Command::new(bin).arg("train").arg(&job_path), &dir.join(format!("mlm-{prec}-{head}.log")))?;

    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).context("no metrics.jsonl")?;
    let rows: Vec<Value> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "train" && v["step"].as_u64().is_some_and(|s| s as usize > warmup))
        .collect();
    anyhow::ensure!(!rows.is_empty(), "no timed train step in {}", out.join("metrics.jsonl").display());
    let tokens = (BATCH * BLOCK) as f64;
    // `step_s` where the metrics carry it, else from the step's tokens/s.
    let step_time =
        |v: &Value| v["step_s"].as_f64().unwrap_or_else(|| tokens / v["tokens_per_s"].as_f64().unwrap_or(f64::NAN));
    let step_times: Vec<f64> = rows.iter().map(step_time).collect();
    let step_s = step_times.iter().sum::<f64>() / rows.len() as f64;
    let mut phases = Vec::new();
    if let Some(obj) = rows[0].as_object() {
        for k in obj.keys().filter(|k| k.starts_with("time_") && k.ends_with("_s")) {
            let vals: Vec<f64> = rows.iter().filter_map(|v| v[k].as_f64()).collect();
            if !vals.is_empty() {
                phases.push((k.clone(), vals.iter().sum::<f64>() / vals.len() as f64));
            }
        }
    }
    let mfus: Vec<f64> = rows.iter().filter_map(|v| v["mfu"].as_f64()).collect();
    let mfu = (!mfus.is_empty()).then(|| mfus.iter().sum::<f64>() / mfus.len() as f64);
    Ok(Ours { step_times, step_s, phases, mfu })
}

fn run_reference(dir: &Path, cfg: &Path, prec: &str, warmup: usize, steps: usize, threads: usize) -> Result<Value> {
    let docs = python_docs()?;
    let script = root().join("benches/reference_train.py");
    let mut cmd = Command::new(python());
    cmd.arg(&script)
        .arg("--config")
        .arg(cfg)
        .arg("--tokenizer")
        .arg(tokenizer()?)
        .arg("--files")
        .arg(docs.join("tutorial/*.rst.txt"))
        .arg(docs.join("faq/*.rst.txt"))
        .args(["--block", &BLOCK.to_string(), "--batch", &BATCH.to_string()])
        .args(["--steps", &steps.to_string(), "--warmup", &warmup.to_string()])
        .args(["--precision", prec, "--device", "cpu", "--threads", &threads.to_string()]);
    let (_, stdout) = run_logged(&mut cmd, &dir.join(format!("reference-{prec}.log")))?;
    last_json(&stdout)
}

/// The middle value of `x` (the mean of the two middle ones for an even count).
fn median(x: &[f64]) -> f64 {
    let mut v = x.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    let steps = knob("STEPS", 8).max(1);
    let warmup = knob("WARMUP", 2);
    let threads = knob("THREADS", cores());
    let rounds = knob("ROUNDS", 2).max(1);
    let bin = mlm_bin()?;
    let models: [(&str, Value); 3] = [
        ("distilbert-base", distilbert_base()),
        ("deberta-v3-small-shape", deberta_v3_small_shape(128100)),
        ("deberta-v3-small-shape-vocab30522", deberta_v3_small_shape(30522)),
    ];
    let names: Vec<&str> = models.iter().map(|m| m.0).collect();
    let want_models = selected("MODELS", &names);
    let want_prec = selected("PRECISIONS", &["fp32", "bf16"]);
    let load_before = load_average();
    eprintln!(
        "train_throughput: {} ; block {BLOCK}, batch {BATCH}, {warmup} warm-up + {steps} timed steps, {threads} threads; load average {load_before}",
        bin.display()
    );

    let mut results = Vec::new();
    for (name, config) in models.iter().filter(|m| want_models.contains(&m.0)) {
        let dir = work_dir("train").join(name);
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("config.json");
        std::fs::write(&cfg, serde_json::to_vec_pretty(config)?)?;
        for prec in &want_prec {
            // Ours and the reference take turns, so that a spell of load on this
            // shared machine falls on both sides; each side's time is the median
            // of all its timed steps.
            let (mut ours_runs, mut refs) = (Vec::new(), Vec::new());
            for round in 1..=rounds {
                eprintln!("train_throughput: {name} {prec}: mlm train (round {round} of {rounds}) ...");
                ours_runs.push(run_ours(&bin, &dir, &cfg, prec, warmup, steps, threads, true)?);
                eprintln!("train_throughput: {name} {prec}: reference (round {round} of {rounds}) ...");
                refs.push(run_reference(&dir, &cfg, prec, warmup, steps, threads)?);
            }
            let ours_times: Vec<f64> = ours_runs.iter().flat_map(|o| o.step_times.iter().copied()).collect();
            let ref_times = refs
                .iter()
                .map(|r| match r["step_times_s"].as_array() {
                    Some(t) => Ok(t.iter().filter_map(Value::as_f64).collect::<Vec<f64>>()),
                    None => r["step_s"].as_f64().map(|s| vec![s]).context("reference: no step_s"),
                })
                .collect::<Result<Vec<_>>>()?
                .concat();
            let tokens = (BATCH * BLOCK) as f64;
            let (ours_step, ref_step) = (median(&ours_times), median(&ref_times));
            let ours = &ours_runs[0];
            let phases: serde_json::Map<String, Value> = ours
                .phases
                .iter()
                .map(|(k, _)| {
                    let all: Vec<f64> =
                        ours_runs.iter().flat_map(|o| o.phases.iter().filter(|p| &p.0 == k).map(|p| p.1)).collect();
                    (k.clone(), json!(all.iter().sum::<f64>() / all.len() as f64))
                })
                .collect();
            let mean = |t: &[f64]| t.iter().sum::<f64>() / t.len() as f64;
            results.push(json!({
                "model": name, "precision": prec, "rounds": rounds,
                "ours_tokens_per_s": tokens / ours_step, "ours_step_s": ours_step, "ours_step_times_s": ours_times,
                "ours_phases_s": phases,
                "ours_mfu": ours.mfu,
                "reference_tokens_per_s": tokens / ref_step, "reference_step_s": ref_step,
                "reference_step_times_s": ref_times, "reference": refs,
                "ratio": ref_step / ours_step, "ratio_of_means": mean(&ref_times) / mean(&ours_times),
                "target_ratio": target(name, prec),
            }));
            eprintln!(
                "train_throughput: {name} {prec}: ours {:.0} tokens/s, reference {:.0} tokens/s (medians)",
                tokens / ours_step,
                tokens / ref_step
            );
        }
    }

    println!();
    println!(
        "training throughput, CPU, {threads} threads, block {BLOCK} x batch {BATCH}: median step time of {rounds} \
         alternating runs of {steps} steps after {warmup} per side"
    );
    println!(
        "| model | precision | ours tokens/s | reference tokens/s | ratio | ratio of means | target | ours data wait |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        let phases = r["ours_phases_s"].as_object();
        let wait = phases
            .and_then(|p| p.get("time_data_s"))
            .and_then(Value::as_f64)
            .map(|d| format!("{:.2}%", 100.0 * d / r["ours_step_s"].as_f64().unwrap()))
            .unwrap_or_else(|| "n/a".into());
        let target = r["target_ratio"].as_f64().map(|t| format!("≥ {t:.1}x")).unwrap_or_else(|| "-".into());
        println!(
            "| {} | {} | {} | {} | {:.2}x | {:.2}x | {target} | {wait} |",
            r["model"].as_str().unwrap(),
            r["precision"].as_str().unwrap(),
            thousands(r["ours_tokens_per_s"].as_f64().unwrap()),
            thousands(r["reference_tokens_per_s"].as_f64().unwrap()),
            r["ratio"].as_f64().unwrap(),
            r["ratio_of_means"].as_f64().unwrap(),
        );
    }
    // The sparse MLM head against the dense one (HF's: the vocabulary projection
    // at every position), same model and steps: `MLM_BENCH_HEADS=0` skips it.
    let mut heads = Vec::new();
    if knob("HEADS", 1) > 0 {
        for r in results.iter().filter(|r| r["precision"] == "fp32") {
            let name = r["model"].as_str().unwrap();
            let dir = work_dir("train").join(name);
            eprintln!("train_throughput: {name} fp32 with the dense head ...");
            let dense = run_ours(&bin, &dir, &dir.join("config.json"), "fp32", warmup, steps, threads, false)?;
            let sparse_s = r["ours_step_s"].as_f64().unwrap();
            heads.push(json!({ "model": name, "sparse_step_s": sparse_s, "dense_step_s": dense.step_s }));
        }
        println!();
        println!("sparse vs dense MLM head (fp32, mlm only): step time");
        println!("| model | sparse s/step | dense s/step | dense / sparse |");
        println!("|---|---:|---:|---:|");
        for h in &heads {
            let (s, d) = (h["sparse_step_s"].as_f64().unwrap(), h["dense_step_s"].as_f64().unwrap());
            println!("| {} | {s:.2} | {d:.2} | {:.2}x |", h["model"].as_str().unwrap(), d / s);
        }
    }
    let load_after = load_average();
    println!("load average before {load_before}, after {load_after}");
    let summary = json!({
        "block": BLOCK, "batch": BATCH, "steps": steps, "warmup": warmup, "threads": threads, "rounds": rounds,
        "load_average_before": load_before, "load_average_after": load_after, "results": results,
        "heads": heads,
    });
    let path = work_dir("train").join("results.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)?;
    println!("details: {}", path.display());
    Ok(())
}
