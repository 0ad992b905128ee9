//! Causal language modelling with the real binaries on a small GPT-2 (the
//! byte-level BPE tokenizer of `tests/fixtures/gpt2-tiny`, trained on the
//! tutorial corpus): a job learns and continues its prompts; micro-batches,
//! gradient accumulation, activation checkpointing and 2 workers give the
//! plain run's losses and weights; a killed job resumes bit for bit, and on
//! another number of workers with the same losses; `mlm eval` and
//! `mlm generate` read its checkpoints, and greedy generation equals
//! `transformers`' `generate(do_sample=False)` token for token.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tiny").join(name)
}

/// A causal job on the tiny GPT-2 (dropout 0.1 unless `dropout` is false),
/// block 64, 16 sequences a step, every loss logged; `extra` is appended.
fn clm_job(dir: &Path, dropout: bool, extra: &str) -> PathBuf {
    let mut model: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("config.json")).unwrap()).unwrap();
    if !dropout {
        for key in ["resid_pdrop", "embd_pdrop", "attn_pdrop"] {
            model[key] = 0.0.into();
        }
    }
    let model_path = dir.join("gpt2.json");
    std::fs::write(&model_path, model.to_string()).unwrap();
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[model]
config = "{model}"
tokenizer = "{tok}"

[data]
files = ["{files}"]
block_size = 64
test_fraction = 0.05

[training]
output_dir = "{out}"
max_steps = 8
batch_size = 16
lr = 2e-3
warmup_steps = 2
log_every = 1
threads = 1

[eval]
at_start = false
batch_size = 32
max_chunks = 32

[logging]
progress = "never"

{extra}
"#,
            model = model_path.display(),
            tok = fixture("tokenizer.json").display(),
            files = corpus_glob(),
            out = dir.join("out").display(),
        ),
    )
    .unwrap();
    cfg
}

/// [`worst_relative_difference`] with the key third of each `c_attn.bias`
/// left out: its true gradient is 0 (softmax cancels it), so Adam turns the
/// rounding noise in its place into steps that depend on the summation order
/// (BERT's `attention.self.key.bias`, which that function skips).
fn worst_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f64, String) {
    let without_key_bias = |w: &[(String, Vec<f32>)]| -> Vec<(String, Vec<f32>)> {
        w.iter()
            .map(|(n, v)| match n.ends_with("attn.c_attn.bias") {
                true => (n.clone(), [&v[..v.len() / 3], &v[2 * v.len() / 3..]].concat()),
                false => (n.clone(), v.clone()),
            })
            .collect()
    };
    worst_relative_difference(&without_key_bias(a), &without_key_bias(b))
}

fn train(cfg: &Path, extra: &[&str]) -> Output {
    let sets: Vec<&str> = extra.iter().flat_map(|s| ["--set", s]).collect();
    let out = run(mlm().arg("train").arg(cfg).args(sets));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn assert_close_losses(want: &BTreeMap<u64, f64>, got: &BTreeMap<u64, f64>, tol: f64, what: &str) {
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>(), "{what}");
    for (step, w) in want {
        let g = got[step];
        assert!((g - w).abs() / w.abs() < tol, "{what}: step {step} loss {g} vs {w}");
    }
}

/// The tokens `transformers` generates greedily from `prompt` with the model in `dir`.
fn hf_greedy(dir: &Path, prompt: &str, new: usize) -> Vec<u32> {
    let script = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
d, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = PreTrainedTokenizerFast(tokenizer_file=d + "/tokenizer.json")
model = AutoModelForCausalLM.from_pretrained(d).eval()
ids = torch.tensor([tok.encode(prompt)])
out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                     pad_token_id=model.config.eos_token_id)
print(json.dumps(out[0, ids.shape[1]:].tolist()))
"#;
    let out = run(Command::new(python()).args(["-c", script]).arg(dir).arg(prompt).arg(new.to_string()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_causal_job_learns_continues_its_prompts_and_its_checkpoint_generates_as_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = clm_job(dir.path(), true, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("at_start = false\n", "at_start = true\nprompts = [\"The Python\"]\nmax_new_tokens = 12\n");
    std::fs::write(&cfg, text.replace("progress = \"never\"", "progress = \"never\"\ntensorboard = true")).unwrap();
    let out = train(&cfg, &["training.max_steps=30", "training.log_every=5"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("generate before training: The Python  ->"), "{log}");
    assert!(log.contains("generate after training: The Python  ->"), "{log}");
    assert!(log.contains("predicted tokens"), "{log}");
    let out_dir = dir.path().join("out");
    let evals = eval_records(&out_dir.join("metrics.jsonl"));
    let (first, last) =
        (evals[0]["perplexity"].as_f64().unwrap(), evals.last().unwrap()["perplexity"].as_f64().unwrap());
    assert!(last < first / 2.0, "perplexity {first} -> {last}");
    // Every held-out position but each block's last is predicted.
    assert_eq!(evals[0]["eval_tokens"].as_u64().unwrap() % 63, 0, "{:?}", evals[0]);
    assert!(std::fs::read_dir(out_dir.join("tb")).unwrap().count() > 0, "TensorBoard events are written");

    let ckpt = out_dir.join("checkpoint-30");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["architectures"][0], "GPT2LMHeadModel");

    // `mlm eval` scores the checkpoint on the corpus: every position but the last of each block.
    let e = run(mlm()
        .args(["eval", "--device", "cpu", "--block-size", "64", "--model"])
        .arg(&ckpt)
        .args(["--data", &corpus_glob()]));
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let r: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    assert_eq!(r["predicted_tokens"].as_u64().unwrap(), r["chunks"].as_u64().unwrap() * 63, "{r}");
    assert!(r["perplexity"].as_f64().unwrap() < first, "{r}");

    // Greedy generation: the logged continuation, and transformers' tokens.
    let g = run(mlm()
        .args(["generate", "--device", "cpu", "--max-new-tokens", "12", "--model"])
        .arg(&ckpt)
        .arg("The Python"));
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let ours: serde_json::Value = serde_json::from_slice(&g.stdout).unwrap();
    let logged = log.lines().find_map(|l| l.split("generate after training: The Python  ->  ").nth(1)).unwrap();
    assert_eq!(ours["continuation"].as_str().unwrap().trim_end(), logged.trim_end());
    let tokens: Vec<u32> = serde_json::from_value(ours["tokens"].clone()).unwrap();
    assert_eq!(tokens, hf_greedy(&ckpt, "The Python", 12));

    // Sampling follows its seed.
    let sample = |seed: &str| {
        let o = run(mlm()
            .args(["generate", "--device", "cpu", "--top-k", "20", "--top-p", "0.9", "--temperature", "0.8"])
            .args(["--seed", seed, "--model"])
            .arg(&ckpt)
            .arg("The Python"));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    };
    assert_eq!(sample("1"), sample("1"));
}

#[test]
fn causal_micro_batches_accumulation_checkpointing_and_two_workers_give_the_plain_run() {
    let plain = tempfile::tempdir().unwrap();
    train(&clm_job(plain.path(), false, ""), &[]);
    let want = losses(&plain.path().join("out"));
    assert_eq!(want.len(), 8);
    let want_w = weights(&plain.path().join("out/checkpoint-8"));
    let variants: [(&str, Vec<&str>); 3] = [
        ("micro-batches of 4", vec!["training.micro_batch_size=4"]),
        ("2 accumulated batches of 8", vec!["training.batch_size=8", "training.grad_accum_steps=2"]),
        ("activation checkpointing", vec!["training.activation_checkpointing=true"]),
    ];
    for (what, sets) in variants {
        let dir = tempfile::tempdir().unwrap();
        train(&clm_job(dir.path(), false, ""), &sets);
        assert_close_losses(&want, &losses(&dir.path().join("out")), 1e-5, what);
        let (worst, name) = worst_difference(&want_w, &weights(&dir.path().join("out/checkpoint-8")));
        assert!(worst < 1e-5, "{what}: {worst} in {name}");
    }
    // 2 workers of 8 sequences: one process with the summed batch.
    let dir = tempfile::tempdir().unwrap();
    let cfg = clm_job(dir.path(), false, "");
    let out = run(Command::new(launcher())
        .args(["--nproc", "2", "--device", "cpu", "--mlm"])
        .arg(env!("CARGO_BIN_EXE_mlm"))
        .arg(&cfg)
        .args(["--set", "training.batch_size=8"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_close_losses(&want, &losses(&dir.path().join("out")), 1e-5, "2 workers");
    let (worst, name) = worst_difference(&want_w, &weights(&dir.path().join("out/checkpoint-8")));
    assert!(worst < 1e-5, "2 workers: {worst} in {name}");
}

#[test]
fn a_causal_bf16_job_tracks_the_fp32_one() {
    let fp32 = tempfile::tempdir().unwrap();
    train(&clm_job(fp32.path(), false, ""), &[]);
    let bf16 = tempfile::tempdir().unwrap();
    train(&clm_job(bf16.path(), false, ""), &["training.precision=\"bf16\""]);
    assert_close_losses(&losses(&fp32.path().join("out")), &losses(&bf16.path().join("out")), 3e-2, "bf16");
}

/// Kills `child` once the job in `out` has logged step `step`.
fn kill_at(mut child: std::process::Child, out: &Path, step: u64) {
    wait_until(&format!("step {step}"), Duration::from_secs(300), || {
        assert!(child.try_wait().unwrap().is_none(), "the job ended before step {step}");
        losses(out).keys().max().is_some_and(|&s| s >= step)
    });
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_killed_causal_job_resumes_bit_for_bit_and_on_another_world_size() {
    let ckpt = "[checkpoint]\nevery_steps = 3\nkeep_last = 4\n";
    let reference = tempfile::tempdir().unwrap();
    train(&clm_job(reference.path(), true, ckpt), &[]);
    let want = losses(&reference.path().join("out"));
    let want_w = std::fs::read(reference.path().join("out/checkpoint-8/model.safetensors")).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cfg = clm_job(dir.path(), true, ckpt);
    let out = dir.path().join("out");
    let child = mlm().arg("train").arg(&cfg).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    kill_at(child, &out, 4);
    let resumed = train(&cfg, &[]);
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("resuming from"));
    let got = losses(&out);
    for (step, loss) in &want {
        assert_eq!(got.get(step).map(|l| l.to_bits()), Some(loss.to_bits()), "step {step}");
    }
    assert!(std::fs::read(out.join("checkpoint-8/model.safetensors")).unwrap() == want_w, "final weights differ");

    // Without dropout, the step-3 checkpoint of a 1-process job continues on 2
    // workers (same global batch) with the uninterrupted losses.
    // (The same config file: its model and data paths are part of the job.)
    let single = tempfile::tempdir().unwrap();
    let cfg = clm_job(single.path(), false, ckpt);
    train(&cfg, &[]);
    let want = losses(&single.path().join("out"));
    let two = tempfile::tempdir().unwrap();
    let from = single.path().join("out/checkpoint-3");
    let t0 = Instant::now();
    let o = run(Command::new(launcher())
        .args(["--nproc", "2", "--device", "cpu", "--mlm"])
        .arg(env!("CARGO_BIN_EXE_mlm"))
        .arg(&cfg)
        .args(["--set", "training.global_batch_size=16", "--set", "training.batch_size=8"])
        .args(["--set", &format!("checkpoint.resume={}", toml::Value::String(from.display().to_string()))])
        .args([
            "--set",
            &format!("training.output_dir={}", toml::Value::String(two.path().join("out").display().to_string())),
        ]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eprintln!("elastic continuation: {:.1} s", t0.elapsed().as_secs_f64());
    let got = losses(&two.path().join("out"));
    let later: BTreeMap<u64, f64> = want.iter().filter(|(s, _)| **s > 3).map(|(s, l)| (*s, *l)).collect();
    assert_close_losses(&later, &got, 1e-5, "resumed on 2 workers");
}

#[test]
fn causal_settings_a_model_cannot_train_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = clm_job(dir.path(), false, "");
    let fails = |sets: &[&str]| {
        let args: Vec<&str> = sets.iter().flat_map(|s| ["--set", *s]).collect();
        error_line(&run(mlm().arg("train").arg(&cfg).args(args)))
    };
    let e = fails(&["training.objective=\"mlm\""]);
    assert!(e.contains("training.objective") && e.contains("\"mlm\"") && e.contains("gpt2"), "{e}");
    let e = fails(&["eval.fill_mask=[\"a <mask>\"]"]);
    assert!(e.contains("eval.fill_mask") && e.contains("eval.prompts"), "{e}");
    let e = fails(&["data.separator=\"<|nope|>\""]);
    assert!(e.contains("data.separator") && e.contains("<|nope|>"), "{e}");
    let e = fails(&["eval.prompts=[\"A prompt\"]", "eval.max_new_tokens=126"]);
    assert!(e.contains("eval.prompts") && e.contains("eval.max_new_tokens = 126") && e.contains("128"), "{e}");
    let e = fails(&["eval.prompts=[\"\"]"]);
    assert!(e.contains("eval.prompts") && e.contains("0 tokens"), "{e}");
    let e = fails(&["training.objective=\"causal\""]);
    assert!(e.contains("objective") && e.contains("causal"), "{e}");
    // A masked LM cannot be trained causally.
    let bert = tempfile::tempdir().unwrap();
    let cfg = write_job(bert.path(), "");
    let e = error_line(&run(mlm().arg("train").arg(&cfg).args(["--set", "training.objective=\"clm\""])));
    assert!(e.contains("training.objective") && e.contains("\"clm\"") && e.contains("bert"), "{e}");
    // An encoder cannot generate.
    let e = error_line(&run(mlm().args(["generate", "--device", "cpu", "--model"]).arg(minilm_dir()).arg("Hello")));
    assert!(e.contains("cannot generate"), "{e}");
}

#[test]
fn a_separator_follows_every_document() {
    let plain = tempfile::tempdir().unwrap();
    let sep = tempfile::tempdir().unwrap();
    let manifest = |dir: &Path, extra: &[&str]| -> serde_json::Value {
        let cfg = clm_job(dir, false, "");
        let sets: Vec<&str> = extra.iter().flat_map(|s| ["--set", *s]).collect();
        let o = run(mlm().arg("prepare").arg(&cfg).args(sets));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/data/manifest.json")).unwrap()).unwrap()
    };
    let a = manifest(plain.path(), &[]);
    let b = manifest(sep.path(), &["data.separator=\"<|endoftext|>\""]);
    assert_ne!(a["inputs_key"], b["inputs_key"], "the separator is part of the store's identity");
    let n = |m: &serde_json::Value, key: &str| m[key].as_u64().unwrap();
    assert!(n(&a, "documents") > 10);
    assert_eq!(n(&b, "tokens"), n(&a, "tokens") + n(&a, "documents"), "one separator per document");
}
