//! Preprocessing throughput: `mlm prepare` against the course's `datasets.map`
//! recipe (`benches/reference_prepare.py`), end to end, on the same ~22 MB corpus,
//! for three tokenizer families: WordPiece (MiniLM's BERT file), Unigram with
//! Metaspace (DeBERTa-v3-like) and byte-level BPE (RoBERTa-like), the last two
//! trained by `benches/train_tokenizers.py` (no model hub here).
//!
//!     cargo bench --profile dev --bench prepare_throughput
//!
//! Each family runs three times: `mlm prepare` (its exact fast path), `mlm
//! prepare` through `tokenizers` alone (the same file with its post-processor
//! wrapped in a one-step `Sequence`, which encodes the same ids but is a shape no
//! fast path claims: the slow path, as before the fast paths), and the reference.
//!
//! The corpus is every reST source of the Python 3.11 documentation (about 11 MB)
//! concatenated into one text file, written twice (two files, ~22 MB). Each
//! non-empty line is a document on both sides (`document_boundary = "line"`,
//! `datasets`' text loader); block 128. Ours writes a fresh
//! `prepared_dir` each run; the reference uses a fresh `datasets` cache.
//! Tokens/s = tokens tokenized (before the remainder is dropped) / wall time of
//! the whole command (ours) or of load + map + map + split (reference).
//!
//! Knobs: `MLM_BENCH_COPIES` (copies of the docs, default 2), `MLM_BENCH_THREADS`
//! (the reference's `num_proc`, default all cores), `MLM_BENCH_FAMILIES` (a
//! comma-separated subset of `wordpiece,unigram,bpe`), `MLM_BENCH_SLOW` (0: skip
//! the slow-path runs), `MLM_BIN`, `MLM_PYTHON`.
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

/// One `mlm prepare` run: seconds and tokens (from the manifest).
fn prepare(bin: &Path, dir: &Path, files: &[PathBuf], tok: &Path, name: &str) -> Result<(f64, f64)> {
    // A config.json is needed by [model]; prepare only reads the tokenizer.
    let model_cfg = dir.join("config.json");
    std::fs::write(
        &model_cfg,
        r#"{"model_type": "distilbert", "vocab_size": 30522, "dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072}"#,
    )?;
    let prepared = dir.join(format!("prepared-{name}"));
    let _ = std::fs::remove_dir_all(&prepared);
    let list: Vec<String> = files.iter().map(|f| toml_path(f)).collect();
    let job = format!(
        "# written by benches/prepare_throughput.rs\n[model]\nconfig = {}\ntokenizer = {}\n\n[data]\nfiles = [{}]\ndocument_boundary = \"line\"\nblock_size = {BLOCK}\nprepared_dir = {}\n\n[training]\noutput_dir = {}\n\n[logging]\nprogress = \"never\"\n",
        toml_path(&model_cfg),
        toml_path(tok),
        list.join(", "),
        toml_path(&prepared),
        toml_path(&dir.join("run")),
    );
    let job_path = dir.join(format!("job-{name}.toml"));
    std::fs::write(&job_path, job)?;
    eprintln!("prepare_throughput: mlm prepare ({name}) ...");
    let (seconds, _) =
        run_logged(Command::new(bin).arg("prepare").arg(&job_path), &dir.join(format!("mlm-{name}.log")))?;
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(prepared.join("manifest.json")).context("no manifest.json")?)?;
    let tokens = manifest["tokens"].as_f64().context("manifest: no tokens")?;
    let _ = std::fs::remove_dir_all(&prepared);
    Ok((seconds, tokens))
}

/// `tok` with its post-processor wrapped in a one-step `Sequence`: the same
/// encoding, but no fast path takes it.
fn slow_variant(tok: &Path, out: &Path) -> Result<PathBuf> {
    let mut v: Value = serde_json::from_slice(&std::fs::read(tok)?)?;
    v["post_processor"] = json!({"type": "Sequence", "processors": [v["post_processor"].take()]});
    std::fs::create_dir_all(out)?;
    let p = out.join("tokenizer.json");
    std::fs::write(&p, serde_json::to_vec(&v)?)?;
    Ok(p)
}

/// The reference's JSON summary for `tok`.
fn reference(dir: &Path, files: &[PathBuf], tok: &Path, name: &str, threads: usize) -> Result<Value> {
    eprintln!("prepare_throughput: reference ({name}, datasets.map, num_proc {threads}) ...");
    let mut cmd = Command::new(python());
    cmd.arg(root().join("benches/reference_prepare.py")).arg("--files").args(files).arg("--tokenizer").arg(tok).args([
        "--block",
        &BLOCK.to_string(),
        "--num-proc",
        &threads.to_string(),
    ]);
    let (_, stdout) = run_logged(&mut cmd, &dir.join(format!("reference-{name}.log")))?;
    last_json(&stdout)
}

/// The trained DeBERTa-v3-like and RoBERTa-like files (trained once).
fn trained(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name).join("tokenizer.json");
    if !p.exists() {
        eprintln!("prepare_throughput: training the test tokenizers ...");
        let mut cmd = Command::new(python());
        cmd.arg(root().join("benches/train_tokenizers.py")).arg(dir);
        run_logged(&mut cmd, &dir.with_extension("log"))?;
    }
    Ok(p)
}

fn main() -> Result<()> {
    let copies = knob("COPIES", 2).max(1);
    let threads = knob("THREADS", cores());
    let slow = knob("SLOW", 1) != 0;
    let wanted = std::env::var("MLM_BENCH_FAMILIES").unwrap_or_else(|_| "wordpiece,unigram,bpe".into());
    let bin = mlm_bin()?;
    let dir = work_dir("prepare");
    let files = corpus(&dir.join("corpus"), copies)?;
    let bytes: u64 = files.iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum();
    let trained_dir = dir.join("tokenizers");
    let families = [
        ("wordpiece", "WordPiece (BERT: MiniLM's file)", tokenizer()?),
        ("unigram", "Unigram + Metaspace (DeBERTa-v3-like)", trained(&trained_dir, "deberta-v3-like")?),
        ("bpe", "byte-level BPE (RoBERTa-like)", trained(&trained_dir, "roberta-like")?),
    ];
    let load_before = load_average();
    eprintln!(
        "prepare_throughput: {} files, {:.1} MB; {} ; load average {load_before}",
        files.len(),
        bytes as f64 / 1e6,
        bin.display()
    );
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    for (name, label, tok) in families.iter().filter(|(n, _, _)| wanted.split(',').any(|w| w.trim() == *n)) {
        let (ours_s, ours_tokens) = prepare(&bin, &dir, &files, tok, name)?;
        let slow_run = match slow {
            true => {
                let slow_tok = slow_variant(tok, &dir.join(format!("slow-{name}")))?;
                Some(prepare(&bin, &dir, &files, &slow_tok, &format!("{name}-slow"))?)
            }
            false => None,
        };
        let r = reference(&dir, &files, tok, name, threads)?;
        let ref_tps = r["tokens_per_s"].as_f64().context("reference: no tokens_per_s")?;
        let ref_tokens = r["tokens"].as_f64().unwrap_or(f64::NAN);
        let ours_tps = ours_tokens / ours_s;
        let slow_tps = slow_run.map(|(s, t)| t / s);
        let mut notes = Vec::new();
        if (ours_tokens - ref_tokens).abs() > 0.001 * ref_tokens {
            notes.push(format!("token counts differ by {:.2}%", 100.0 * (ours_tokens - ref_tokens) / ref_tokens));
        }
        if let Some((_, t)) = slow_run.filter(|(_, t)| *t != ours_tokens) {
            notes.push(format!("the slow path made {t} tokens"));
        }
        rows.push(format!(
            "| {label} | {} | {} | {} | {} | {:.1}x | {} | {} |",
            thousands(ours_tokens),
            thousands(ours_tps),
            slow_tps.map_or("-".into(), thousands),
            thousands(ref_tps),
            ours_tps / ref_tps,
            slow_tps.map_or("-".into(), |s| format!("{:.1}x", s / ref_tps)),
            notes.join("; ")
        ));
        summary.push(json!({
            "family": name, "tokenizer": tok, "ours_seconds": ours_s, "ours_tokens": ours_tokens,
            "ours_tokens_per_s": ours_tps, "slow_path": slow_run.map(|(s, t)| json!({"seconds": s, "tokens": t})),
            "reference": r, "ratio": ours_tps / ref_tps, "slow_ratio": slow_tps.map(|s| s / ref_tps),
        }));
    }
    println!();
    println!(
        "preprocessing throughput, {:.1} MB of text, block {BLOCK}, {} cores, reference num_proc {threads}",
        bytes as f64 / 1e6,
        cores()
    );
    println!(
        "| tokenizer | tokens | mlm prepare tokens/s | slow path (`tokenizers` only) tokens/s | datasets.map tokens/s | ratio | slow-path ratio | notes |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for r in &rows {
        println!("{r}");
    }
    println!("load average before {load_before}, after {}", load_average());
    let path = dir.join("results.json");
    let summary = json!({
        "bytes": bytes, "files": files.len(), "families": summary,
        "load_average_before": load_before, "load_average_after": load_average(),
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)?;
    println!("details: {}", path.display());
    Ok(())
}
