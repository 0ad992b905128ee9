//! Preprocessing throughput: `mlm prepare` against the course's `datasets.map`
//! recipe (`benches/reference_prepare.py`), end to end, on the same ~22 MB corpus.
//!
//!     cargo bench --profile dev --bench prepare_throughput
//!
//! The corpus is every reST source of the Python 3.11 documentation (about 11 MB)
//! concatenated into one text file, written twice (two files, ~22 MB). Each
//! non-empty line is a document on both sides (`document_boundary = "line"`,
//! `datasets`' text loader); block 128, MiniLM's tokenizer. Ours writes a fresh
//! `prepared_dir` each run; the reference uses a fresh `datasets` cache.
//! Tokens/s = tokens tokenized (before the remainder is dropped) / wall time of
//! the whole command (ours) or of load + map + map + split (reference).
//!
//! Knobs: `MLM_BENCH_COPIES` (copies of the docs, default 2), `MLM_BENCH_THREADS`
//! (the reference's `num_proc`, default all cores), `MLM_BIN`, `MLM_PYTHON`.
#[path = "common/mod.rs"]
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use common::*;

const BLOCK: usize = 128;

/// Writes the corpus once (reused while present): `copies` files, each all the
/// docs' `*.rst.txt` in path order.
fn corpus(dir: &Path, copies: usize) -> Result<Vec<PathBuf>> {
    let docs = python_docs()?;
    let mut sources = Vec::new();
    let mut stack = vec![docs];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".rst.txt") {
                sources.push(p);
            }
        }
    }
    sources.sort();
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut files = Vec::new();
    for i in 1..=copies {
        let f = dir.join(format!("python-docs-{i}.txt"));
        if !f.exists() {
            let tmp = f.with_extension("tmp");
            let mut w = std::io::BufWriter::new(
                std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
            );
            for s in &sources {
                w.write_all(&std::fs::read(s)?)?;
                w.write_all(b"\n")?;
            }
            w.flush()?;
            drop(w);
            std::fs::rename(&tmp, &f)?;
        }
        files.push(f);
    }
    Ok(files)
}

fn main() -> Result<()> {
    let copies = knob("COPIES", 2).max(1);
    let threads = knob("THREADS", cores());
    let bin = mlm_bin()?;
    let dir = work_dir("prepare");
    let files = corpus(&dir.join("corpus"), copies)?;
    let bytes: u64 = files.iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum();
    let tok = tokenizer()?;
    let load_before = load_average();
    eprintln!(
        "prepare_throughput: {} files, {:.1} MB; {} ; load average {load_before}",
        files.len(),
        bytes as f64 / 1e6,
        bin.display()
    );

    // A config.json is needed by [model]; prepare only reads the tokenizer.
    let model_cfg = dir.join("config.json");
    std::fs::write(
        &model_cfg,
        r#"{"model_type": "distilbert", "vocab_size": 30522, "dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072}"#,
    )?;
    let prepared = dir.join("prepared");
    let _ = std::fs::remove_dir_all(&prepared);
    let list: Vec<String> = files.iter().map(|f| toml_path(f)).collect();
    let job = format!(
        "# written by benches/prepare_throughput.rs\n[model]\nconfig = {}\ntokenizer = {}\n\n[data]\nfiles = [{}]\ndocument_boundary = \"line\"\nblock_size = {BLOCK}\nprepared_dir = {}\n\n[training]\noutput_dir = {}\n\n[logging]\nprogress = \"never\"\n",
        toml_path(&model_cfg),
        toml_path(&tok),
        list.join(", "),
        toml_path(&prepared),
        toml_path(&dir.join("run")),
    );
    let job_path = dir.join("job.toml");
    std::fs::write(&job_path, job)?;
    eprintln!("prepare_throughput: mlm prepare ...");
    let (ours_s, _) = run_logged(Command::new(&bin).arg("prepare").arg(&job_path), &dir.join("mlm.log"))?;
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(prepared.join("manifest.json")).context("no manifest.json")?)?;
    let ours_tokens = manifest["tokens"].as_f64().context("manifest: no tokens")?;
    let ours_tps = ours_tokens / ours_s;

    eprintln!("prepare_throughput: reference (datasets.map, num_proc {threads}) ...");
    let mut cmd = Command::new(python());
    cmd.arg(root().join("benches/reference_prepare.py"))
        .arg("--files")
        .args(&files)
        .arg("--tokenizer")
        .arg(&tok)
        .args(["--block", &BLOCK.to_string(), "--num-proc", &threads.to_string()]);
    let (_, stdout) = run_logged(&mut cmd, &dir.join("reference.log"))?;
    let reference = last_json(&stdout)?;
    let ref_tps = reference["tokens_per_s"].as_f64().context("reference: no tokens_per_s")?;
    let ref_tokens = reference["tokens"].as_f64().unwrap_or(f64::NAN);

    println!();
    println!("preprocessing throughput, {:.1} MB of text, block {BLOCK}, {} cores", bytes as f64 / 1e6, cores());
    println!("| implementation | tokens | seconds | tokens/s | MB/s |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| mlm prepare | {} | {ours_s:.1} | {} | {:.2} |",
        thousands(ours_tokens),
        thousands(ours_tps),
        bytes as f64 / 1e6 / ours_s
    );
    println!(
        "| {} | {} | {:.1} | {} | {:.2} |",
        reference["impl"].as_str().unwrap_or("reference"),
        thousands(ref_tokens),
        reference["seconds"].as_f64().unwrap_or(f64::NAN),
        thousands(ref_tps),
        reference["mb_per_s"].as_f64().unwrap_or(f64::NAN)
    );
    let ratio = ours_tps / ref_tps;
    println!("ratio {ratio:.1}x (target ≥ 10x); load average before {load_before}, after {}", load_average());
    if (ours_tokens - ref_tokens).abs() > 0.001 * ref_tokens {
        println!("note: the token counts differ by {:.2}%", 100.0 * (ours_tokens - ref_tokens) / ref_tokens);
    }
    let summary = json!({
        "bytes": bytes, "files": files.len(), "ours_seconds": ours_s, "ours_tokens": ours_tokens,
        "ours_tokens_per_s": ours_tps, "reference": reference, "ratio": ratio,
        "load_average_before": load_before, "load_average_after": load_average(),
    });
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)?;
    println!("details: {}", path.display());
    Ok(())
}
