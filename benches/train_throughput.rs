//! Training throughput: `mlm train` against the Python reference step
//! (`benches/reference_train.py`: transformers + torch, as the HF Trainer runs it),
//! same model, batch, block, precision and thread count, in one invocation.
//!
//!     cargo bench --profile dev --bench train_throughput
//!
//! Models (random init, configs written here): DistilBERT-base and a
//! DeBERTa-v3-small shape, with its 128,100-token vocabulary and with BERT's
//! 30,522 (`deberta-v3-small-shape-vocab30522`: the encoder's share), block 128,
//! batch 8; a DistilGPT-2 shape trained as a causal LM (`training.objective =
//! "clm"` against `run_clm`'s step, `--objective clm`), block 128, batch 8; a
//! ModernBERT-base shape at block 512, batch 2 (`MLM_BENCH_MODERNBERT_BATCH`);
//! fp32 and bf16; the corpus is the Python tutorial + FAQ reST. Ours is read from `metrics.jsonl` (one line per
//! step, `log_every = 1`) after the warm-up steps, so start-up, the final
//! evaluation and the checkpoint written at the end are not timed. The two sides
//! take turns (`MLM_BENCH_ROUNDS` runs each, default 2) and the ratio is of the
//! median step times over all of a side's timed steps, so that a spell of load on
//! a shared machine moves neither side alone; the ratio of the means is printed
//! beside it.
//!
//! Knobs: `MLM_BENCH_STEPS` (timed steps per run, default 8), `MLM_BENCH_WARMUP`
//! (untimed steps first, default 2), `MLM_BENCH_ROUNDS`, `MLM_BENCH_MODELS`
//! (`distilbert,deberta,distilgpt2,modernbert`: substrings of the row names),
//! `MLM_BENCH_PRECISIONS` (`fp32,bf16`), `MLM_BENCH_THREADS` (default: all cores),
//! `MLM_BENCH_HEADS` (0: skip the sparse-vs-dense head comparison, run for fp32),
//! `MLM_BIN`, `MLM_PYTHON`. Results also go to `target/bench/train/results.json`.
//! A row whose run fails (a model type this `mlm` does not know, say) is
//! reported with its error beside the table, the other rows still run, and the
//! benchmark exits non-zero naming the failed rows.
#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use common::*;

/// One row of the table: a model shape, its objective, block and batch.
struct Row {
    name: &'static str,
    config: Value,
    /// `"mlm"` or `"clm"`.
    objective: &'static str,
    block: usize,
    batch: usize,
    tokenizer: PathBuf,
}

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

/// DistilGPT-2's shape (`distilgpt2`'s config.json): GPT-2 with 6 layers.
fn distilgpt2() -> Value {
    json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": 50257, "n_embd": 768, "n_layer": 6, "n_head": 12, "n_positions": 1024,
        "n_ctx": 1024, "n_inner": null, "activation_function": "gelu_new", "resid_pdrop": 0.1,
        "embd_pdrop": 0.1, "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "scale_attn_weights": true, "tie_word_embeddings": true, "bos_token_id": 50256, "eos_token_id": 50256
    })
}

/// ModernBERT-base's shape (`answerdotai/ModernBERT-base`'s config.json, HF's
/// `ModernBertConfig` defaults): 22 layers, a GLU feed-forward of 1,152, every
/// third layer global attention, the others a 128-token window, rotary
/// positions (theta 160,000 global, 10,000 local), no biases, no dropout.
fn modernbert_base() -> Value {
    json!({
        "model_type": "modernbert", "architectures": ["ModernBertForMaskedLM"],
        "vocab_size": 50368, "hidden_size": 768, "intermediate_size": 1152, "num_hidden_layers": 22,
        "num_attention_heads": 12, "hidden_activation": "gelu", "max_position_embeddings": 8192,
        "initializer_range": 0.02, "initializer_cutoff_factor": 2.0, "norm_eps": 1e-5, "norm_bias": false,
        "pad_token_id": 50283, "bos_token_id": 50281, "eos_token_id": 50282, "cls_token_id": 50281,
        "sep_token_id": 50282, "global_rope_theta": 160000.0, "local_rope_theta": 10000.0,
        "global_attn_every_n_layers": 3, "local_attention": 128, "attention_bias": false,
        "attention_dropout": 0.0, "embedding_dropout": 0.0, "mlp_bias": false, "mlp_dropout": 0.0,
        "decoder_bias": true, "classifier_activation": "gelu", "classifier_bias": false,
        "classifier_dropout": 0.0, "classifier_pooling": "mean", "sparse_prediction": false,
        "tie_word_embeddings": true
    })
}

/// Every row, in the order they run.
fn rows() -> Result<Vec<Row>> {
    let bert = tokenizer()?;
    let gpt2 = root().join("tests/fixtures/gpt2-tiny/tokenizer.json");
    let mlm = |name, config| Row { name, config, objective: "mlm", block: 128, batch: 8, tokenizer: bert.clone() };
    Ok(vec![
        mlm("distilbert-base", distilbert_base()),
        mlm("deberta-v3-small-shape", deberta_v3_small_shape(128100)),
        mlm("deberta-v3-small-shape-vocab30522", deberta_v3_small_shape(30522)),
        // Byte-level BPE of 512 tokens: the model's 50,257 rows cost what the real
        // model's do, whatever ids the text gives.
        Row { name: "distilgpt2-shape", config: distilgpt2(), objective: "clm", block: 128, batch: 8, tokenizer: gpt2 },
        // BERT's 30,522-token tokenizer within ModernBERT's 50,368 rows. Block 512
        // on 2 cores: a smaller batch.
        Row {
            name: "modernbert-base-shape",
            config: modernbert_base(),
            objective: "mlm",
            block: 512,
            batch: knob("MODERNBERT_BATCH", 2).max(1),
            tokenizer: bert,
        },
    ])
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
    row: &Row,
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
    let (block, batch) = (row.block, row.batch);
    // A causal job names its objective and sets nothing of masking (its head
    // predicts every position but a block's last, in chunks, either way).
    let objective = match row.objective {
        "clm" => r#"objective = "clm""#.to_string(),
        _ => format!("sparse_head = {sparse}"),
    };
    let job = format!(
        r#"# written by benches/train_throughput.rs
[model]
config = {cfg}
tokenizer = {tok}

[data]
files = [{tut}, {faq}]
document_boundary = "blank_line"
block_size = {block}
prepared_dir = {prepared}

[training]
output_dir = {out}
max_steps = {total}
batch_size = {batch}
precision = "{prec}"
device = "cpu"
threads = {threads}
log_every = 1
warmup_steps = 1
{objective}

[eval]
at_start = false
at_epoch_end = false
max_chunks = 8
batch_size = {batch}

[checkpoint]
resume = "none"
save_best = false

[logging]
progress = "never"
"#,
        cfg = toml_path(cfg),
        tok = toml_path(&row.tokenizer),
        tut = toml_path(&docs.join("tutorial/*.rst.txt")),
        faq = toml_path(&docs.join("faq/*.rst.txt")),
        // One store per tokenizer and block (the objective picks the tokenizer).
        prepared = toml_path(&work_dir("train").join(format!("prepared-{}-{block}", row.objective))),
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
    let tokens = (batch * block) as f64;
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

fn run_reference(
    row: &Row,
    dir: &Path,
    cfg: &Path,
    prec: &str,
    warmup: usize,
    steps: usize,
    threads: usize,
) -> Result<Value> {
    let docs = python_docs()?;
    let script = root().join("benches/reference_train.py");
    let mut cmd = Command::new(python());
    cmd.arg(&script)
        .arg("--config")
        .arg(cfg)
        .arg("--tokenizer")
        .arg(&row.tokenizer)
        .args(["--objective", row.objective])
        .arg("--files")
        .arg(docs.join("tutorial/*.rst.txt"))
        .arg(docs.join("faq/*.rst.txt"))
        .args(["--block", &row.block.to_string(), "--batch", &row.batch.to_string()])
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
    let rows = rows()?;
    let names: Vec<&str> = rows.iter().map(|r| r.name).collect();
    let want_models = selected("MODELS", &names);
    anyhow::ensure!(
        !want_models.is_empty(),
        "MLM_BENCH_MODELS selects no row (rows: {}; substrings, comma-separated)",
        names.join(", ")
    );
    let want_prec = selected("PRECISIONS", &["fp32", "bf16"]);
    let load_before = load_average();
    eprintln!(
        "train_throughput: {} ; {warmup} warm-up + {steps} timed steps, {threads} threads; load average {load_before}",
        bin.display()
    );

    let mut results = Vec::new();
    let mut failed: Vec<(String, String)> = Vec::new();
    for row in rows.iter().filter(|r| want_models.contains(&r.name)) {
        let name = row.name;
        let dir = work_dir("train").join(name);
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("config.json");
        std::fs::write(&cfg, serde_json::to_vec_pretty(&row.config)?)?;
        for prec in &want_prec {
            match measure(&bin, row, &dir, &cfg, prec, warmup, steps, threads, rounds) {
                Ok(r) => results.push(r),
                Err(e) => {
                    eprintln!("train_throughput: {name} {prec}: FAILED: {e:#}");
                    failed.push((format!("{name} {prec}"), format!("{e:#}")));
                }
            }
        }
    }

    println!();
    println!(
        "training throughput, CPU, {threads} threads: median step time of {rounds} alternating runs of {steps} steps \
         after {warmup} per side"
    );
    println!(
        "| model | objective | block x batch | precision | ours tokens/s | reference tokens/s | ratio | ratio of means \
         | target | ours data wait |"
    );
    println!("|---|---|---|---|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        let phases = r["ours_phases_s"].as_object();
        let wait = phases
            .and_then(|p| p.get("time_data_s"))
            .and_then(Value::as_f64)
            .map(|d| format!("{:.2}%", 100.0 * d / r["ours_step_s"].as_f64().unwrap()))
            .unwrap_or_else(|| "n/a".into());
        let target = r["target_ratio"].as_f64().map(|t| format!("≥ {t:.1}x")).unwrap_or_else(|| "-".into());
        println!(
            "| {} | {} | {} x {} | {} | {} | {} | {:.2}x | {:.2}x | {target} | {wait} |",
            r["model"].as_str().unwrap(),
            r["objective"].as_str().unwrap(),
            r["block"],
            r["batch"],
            r["precision"].as_str().unwrap(),
            thousands(r["ours_tokens_per_s"].as_f64().unwrap()),
            thousands(r["reference_tokens_per_s"].as_f64().unwrap()),
            r["ratio"].as_f64().unwrap(),
            r["ratio_of_means"].as_f64().unwrap(),
        );
    }
    // Where a side is slower, the phases say where: each side's mean seconds per
    // step in data, forward, backward and optimizer.
    println!();
    println!("per-phase mean seconds per step, ours / reference");
    println!("| model | precision | data | forward | backward | optimizer |");
    println!("|---|---|---:|---:|---:|---:|");
    for r in &results {
        let cell = |phase: &str| {
            let key = format!("time_{phase}_s");
            let ours = r["ours_phases_s"][&key].as_f64();
            let refs: Vec<f64> = r["reference"].as_array().unwrap().iter().filter_map(|x| x[&key].as_f64()).collect();
            let reference = (!refs.is_empty()).then(|| refs.iter().sum::<f64>() / refs.len() as f64);
            let f = |x: Option<f64>| x.map(|x| format!("{x:.3}")).unwrap_or_else(|| "n/a".into());
            format!("{} / {}", f(ours), f(reference))
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r["model"].as_str().unwrap(),
            r["precision"].as_str().unwrap(),
            cell("data"),
            cell("forward"),
            cell("backward"),
            cell("optimizer"),
        );
    }
    // The sparse MLM head against the dense one (HF's: the vocabulary projection
    // at every position), same model and steps: `MLM_BENCH_HEADS=0` skips it. A
    // causal LM predicts every position either way: not compared.
    let mut heads = Vec::new();
    if knob("HEADS", 1) > 0 {
        for r in results.iter().filter(|r| r["precision"] == "fp32" && r["objective"] == "mlm") {
            let name = r["model"].as_str().unwrap();
            let row = rows.iter().find(|row| row.name == name).unwrap();
            let dir = work_dir("train").join(name);
            eprintln!("train_throughput: {name} fp32 with the dense head ...");
            let dense = run_ours(&bin, row, &dir, &dir.join("config.json"), "fp32", warmup, steps, threads, false)
                .with_context(|| format!("{name} fp32, dense head: mlm train"))?;
            let sparse_s = r["ours_step_s"].as_f64().unwrap();
            heads.push(json!({ "model": name, "sparse_step_s": sparse_s, "dense_step_s": dense.step_s }));
        }
    }
    if !heads.is_empty() {
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
    for (row, e) in &failed {
        // The line that says why (the `error:` line of the failed command's log).
        let why = e.lines().find(|l| l.trim_start().starts_with("error")).or(e.lines().next());
        println!("FAILED {row}: {}", why.unwrap_or_default());
    }
    let summary = json!({
        "steps": steps, "warmup": warmup, "threads": threads, "rounds": rounds,
        "load_average_before": load_before, "load_average_after": load_after, "results": results,
        "heads": heads,
        "failed": failed.iter().map(|(row, e)| json!({ "row": row, "error": e })).collect::<Vec<_>>(),
    });
    let path = work_dir("train").join("results.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)?;
    println!("details: {}", path.display());
    if !failed.is_empty() {
        let rows: Vec<&str> = failed.iter().map(|f| f.0.as_str()).collect();
        anyhow::bail!("{} row(s) failed: {} (errors above and in {})", rows.len(), rows.join(", "), path.display());
    }
    Ok(())
}

/// One row at one precision: ours and the reference taking turns, `rounds` runs
/// each; both sides' times, phases and ratio as one JSON object.
#[allow(clippy::too_many_arguments)]
fn measure(
    bin: &Path,
    row: &Row,
    dir: &Path,
    cfg: &Path,
    prec: &str,
    warmup: usize,
    steps: usize,
    threads: usize,
    rounds: usize,
) -> Result<Value> {
    let name = row.name;
    // Ours and the reference take turns, so that a spell of load on this
    // shared machine falls on both sides; each side's time is the median of all
    // its timed steps.
    let (mut ours_runs, mut refs) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        eprintln!("train_throughput: {name} {prec}: mlm train (round {round} of {rounds}) ...");
        ours_runs.push(run_ours(bin, row, dir, cfg, prec, warmup, steps, threads, true).context("mlm train (ours)")?);
        eprintln!("train_throughput: {name} {prec}: reference (round {round} of {rounds}) ...");
        refs.push(run_reference(row, dir, cfg, prec, warmup, steps, threads).context("the reference")?);
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
    let tokens = (row.batch * row.block) as f64;
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
    eprintln!(
        "train_throughput: {name} {prec}: ours {:.0} tokens/s, reference {:.0} tokens/s (medians)",
        tokens / ours_step,
        tokens / ref_step
    );
    Ok(json!({
        "model": name, "objective": row.objective, "block": row.block, "batch": row.batch,
        "precision": prec, "rounds": rounds,
        "ours_tokens_per_s": tokens / ours_step, "ours_step_s": ours_step, "ours_step_times_s": ours_times,
        "ours_phases_s": phases,
        "ours_mfu": ours.mfu,
        "reference_tokens_per_s": tokens / ref_step, "reference_step_s": ref_step,
        "reference_step_times_s": ref_times, "reference": refs,
        "ratio": ref_step / ours_step, "ratio_of_means": mean(&ref_times) / mean(&ours_times),
        "target_ratio": target(name, prec),
    }))
}
