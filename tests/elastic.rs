//! Elastic resume with the real binaries: a checkpoint of a 2-worker job at a
//! global batch of 8 continues on 1 and on 4 workers (same global batch) with
//! the uninterrupted 2-worker job's per-step losses, while a changed global
//! batch is refused naming `training.global_batch_size`.
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

const STEPS: u64 = 6;
const CHECKPOINT: u64 = 3;

/// The tiny job at `training.global_batch_size = 8` (no per-worker batch
/// size), fp32, a checkpoint every 3 steps; without dropout unless `dropout`
/// (a split of the batch otherwise draws other dropout masks).
fn job(dir: &Path, dropout: bool) -> PathBuf {
    let cfg = write_job(dir, "");
    if !dropout {
        without_dropout(dir);
    }
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_steps = 30", &format!("max_steps = {STEPS}\nglobal_batch_size = 8"))
        .replacen("batch_size = 16\n", "", 1)
        .replace("log_every = 5", "log_every = 1")
        .replace("[eval]\n", "[eval]\nat_start = false\n");
    assert!(!text.contains("batch_size = 16"), "the per-worker batch size is left to the global batch");
    std::fs::write(&cfg, text + &format!("[checkpoint]\nevery_steps = {CHECKPOINT}\nkeep_last = 2\n")).unwrap();
    cfg
}

/// `checkpoint.resume` of the step-3 checkpoint of a job run in `dir`, and
/// `training.output_dir` in `into`: a continuation runs the same config file
/// (its model and data paths are part of the job) into a folder of its own.
fn continue_from(dir: &Path, into: &Path) -> [String; 2] {
    let ckpt = dir.join(format!("out/checkpoint-{CHECKPOINT}"));
    [
        format!("checkpoint.resume={}", toml::Value::String(ckpt.display().to_string())),
        format!("training.output_dir={}", toml::Value::String(into.join("out").display().to_string())),
    ]
}

/// `mlm train cfg --set extra...` on `workers` CPU workers (a plain process for one).
fn train(cfg: &Path, workers: usize, extra: &[String]) -> std::process::Output {
    let mut cmd = if workers == 1 {
        let mut c = mlm();
        c.arg("train");
        c
    } else {
        let mut c = Command::new(launcher());
        c.args(["--nproc", &workers.to_string(), "--device", "cpu", "--mlm"]).arg(env!("CARGO_BIN_EXE_mlm"));
        c
    };
    cmd.arg(cfg);
    for e in extra {
        cmd.args(["--set", e]);
    }
    run(&mut cmd)
}

#[test]
fn a_checkpoint_resumes_on_another_world_size_with_the_same_losses() {
    let reference = tempfile::tempdir().unwrap();
    let cfg = job(reference.path(), false);
    let out = train(&cfg, 2, &[]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("global batch 8 = 2 workers x batch 4 x accumulation 1"), "{stderr}");
    let want = losses(&reference.path().join("out"));
    assert_eq!(want.keys().copied().collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>());

    // 1 worker x batch 8; 4 workers x batch 1 x accumulation 2.
    for (workers, extra) in [(1, None), (4, Some("training.batch_size=1"))] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = continue_from(reference.path(), dir.path()).to_vec();
        args.extend(extra.map(String::from));
        let out = train(&cfg, workers, &args);
        assert!(out.status.success(), "{workers} workers");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("step {CHECKPOINT}, epoch 0, step {CHECKPOINT} of the epoch")), "{stderr}");
        let got = losses(&dir.path().join("out"));
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), (CHECKPOINT + 1..=STEPS).collect::<Vec<_>>());
        for (step, loss) in &got {
            let w = want[step];
            eprintln!("{workers} workers, step {step}: {loss} (2 workers: {w})");
            assert!((loss - w).abs() <= 1e-5 * w.abs(), "{workers} workers, step {step}: {loss} vs {w}");
        }
    }

    // Another global batch is another job: refused, naming the key and both values.
    let dir = tempfile::tempdir().unwrap();
    let mut args = continue_from(reference.path(), dir.path()).to_vec();
    args.push("training.global_batch_size=16".into());
    let out = train(&cfg, 1, &args);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("training.global_batch_size (8 -> 16)") && stderr.contains("allow_config_change"),
        "{stderr}"
    );
}

#[test]
fn with_dropout_a_checkpoint_resumes_on_its_world_size_exactly() {
    // Each worker draws its own dropout masks, a pure function of the seed, the
    // step and its rows' place in the step: a continuation draws them again.
    let reference = tempfile::tempdir().unwrap();
    let cfg = job(reference.path(), true);
    assert!(train(&cfg, 2, &[]).status.success());
    let want = losses(&reference.path().join("out"));
    let dir = tempfile::tempdir().unwrap();
    assert!(train(&cfg, 2, &continue_from(reference.path(), dir.path())).status.success());
    let got = losses(&dir.path().join("out"));
    assert_eq!(got.len() as u64, STEPS - CHECKPOINT);
    for (step, loss) in &got {
        assert_eq!(loss.to_bits(), want[step].to_bits(), "step {step}: {loss} vs {}", want[step]);
    }
}
