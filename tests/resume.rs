//! Exact resume and crash safety: a job killed with SIGKILL and resumed gives the
//! uninterrupted job's per-step losses and final weights bit for bit, and kills
//! during checkpoint writes never leave the job without a valid checkpoint.
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn last_step(out: &Path) -> u64 {
    losses(out).keys().max().copied().unwrap_or(0)
}

fn start(cfg: &Path, extra: &[&str]) -> Child {
    mlm().arg("train").arg(cfg).args(extra).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

/// Kills `child` with SIGKILL `after` the job has logged step `step`.
fn kill_at(mut child: Child, out: &Path, step: u64, after: Duration) {
    let t0 = Instant::now();
    while last_step(out) < step {
        assert!(child.try_wait().unwrap().is_none(), "job ended before step {step}");
        assert!(t0.elapsed() < Duration::from_secs(120), "job too slow to reach step {step}");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(after);
    child.kill().unwrap();
    child.wait().unwrap();
}

fn job(dir: &Path) -> std::path::PathBuf {
    write_job(dir, "[checkpoint]\nevery_steps = 4\nkeep_last = 2\n")
}

/// Steps per epoch of the tiny job at batch size 32.
fn steps_per_epoch(dir: &Path) -> usize {
    let cfg = job(dir);
    let ok = run(mlm().arg("prepare").arg(&cfg)).status.success();
    assert!(ok);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/data/manifest.json")).unwrap()).unwrap();
    m["train_chunks"].as_u64().unwrap() as usize / 32
}

#[test]
fn resume_reproduces_uninterrupted_losses() {
    let probe = tempfile::tempdir().unwrap();
    let spe = steps_per_epoch(probe.path());
    let total = spe + spe / 2; // crosses one epoch boundary
    let args = [
        "--set".to_string(),
        format!("training.max_steps={total}"),
        "--set".into(),
        "training.batch_size=32".into(),
        "--set".into(),
        "training.log_every=1".into(),
        "--set".into(),
        "eval.at_start=false".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let reference = tempfile::tempdir().unwrap();
    let cfg = job(reference.path());
    assert!(run(mlm().arg("train").arg(&cfg).args(&args)).status.success());
    let want = losses(&reference.path().join("out"));
    assert_eq!(want.len(), total);
    let want_w = std::fs::read(reference.path().join(format!("out/checkpoint-{total}/model.safetensors"))).unwrap();

    // inside the first epoch, just after the boundary, and late in the second epoch
    for kill in [spe / 3, spe + 1, spe + spe / 3] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = job(dir.path());
        let out = dir.path().join("out");
        kill_at(start(&cfg, &args), &out, kill as u64, Duration::ZERO);
        let resumed = run(mlm().arg("train").arg(&cfg).args(&args));
        assert!(resumed.status.success());
        assert!(String::from_utf8_lossy(&resumed.stderr).contains("resuming from"), "kill at {kill}");
        let got = losses(&out);
        for (step, loss) in &want {
            assert_eq!(got.get(step).map(|l| l.to_bits()), Some(loss.to_bits()), "step {step} after a kill at {kill}");
        }
        let got_w = std::fs::read(out.join(format!("checkpoint-{total}/model.safetensors"))).unwrap();
        assert!(got_w == want_w, "final weights differ after a kill at {kill}");
    }
}

#[test]
fn kills_during_checkpoint_writes_leave_a_valid_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "[checkpoint]\nevery_steps = 1\nkeep_last = 3\n");
    let out = dir.path().join("out");
    let args = ["--set", "training.max_steps=100000", "--set", "eval.at_start=false", "--set", "eval.every_steps=3"];
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut interrupted_writes = 0;
    for round in 0..20 {
        let child = start(&cfg, &args);
        // wait for progress beyond what is on disk, then kill at a random moment
        let before = last_step(&out);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        kill_at(child, &out, before + 1, Duration::from_millis(rng % 120));
        let leftovers = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .count();
        interrupted_writes += leftovers.min(1);
        // Every finished checkpoint verifies, and so does best/ when present.
        let ckpts: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("checkpoint-"))
            .collect();
        assert!(!ckpts.is_empty(), "round {round}: no checkpoint");
        for c in &ckpts {
            mlm::checkpoint::verify(c).unwrap_or_else(|e| panic!("round {round}: {e:#}"));
        }
        if out.join("best").exists() {
            mlm::checkpoint::verify(&out.join("best")).unwrap();
        }
    }
    eprintln!("{interrupted_writes} of 20 kills interrupted a checkpoint write");
    // The job still resumes and finishes from whatever the kills left.
    let fin = run(mlm().arg("train").arg(&cfg).args(["--set", "eval.at_start=false"]).args([
        "--set",
        &format!("training.max_steps={}", last_step(&out) + 2),
        "--set",
        "checkpoint.allow_config_change=true",
    ]));
    assert!(fin.status.success());
}

#[test]
fn changed_config_refuses_to_resume_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    assert!(run(mlm().arg("train").arg(&cfg).args(["--set", "training.max_steps=4"])).status.success());
    let out = run(mlm().arg("train").arg(&cfg).args(["--set", "training.max_steps=4", "--set", "training.lr=0.1"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("training.lr") && err.contains("allow_config_change"), "{err}");
    // A fresh start over the finished run needs an explicit overwrite (issue 12:
    // `--resume none` alone would destroy the earlier run).
    let args = ["--set", "training.max_steps=4", "--set", "training.lr=0.1", "--resume", "none"];
    let refused = run(mlm().arg("train").arg(&cfg).args(args));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("overwrite_output_dir"));
    let fresh = run(mlm().arg("train").arg(&cfg).args(args).args(["--set", "checkpoint.overwrite_output_dir=true"]));
    assert!(fresh.status.success());
}

/// A checkpoint written by main before the flat parameter buffer became a
/// type of its own (tests/fixtures/resume-d53fc4a: a tiny BERT with dropout,
/// fp32, stopped at step 3 of 6) resumes here to the losses that run logged
/// for steps 4-6: the saved layout of weights and moments is unchanged.
/// The store key holds the inputs' absolute paths, so the job runs where it
/// was written: one fixed folder, held under a lock against a parallel run.
#[test]
fn a_checkpoint_from_before_the_flat_params_type_resumes_to_its_losses() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resume-d53fc4a");
    let dir = Path::new("/tmp/mlm-resume-fixture-d53fc4a");
    let lock = std::fs::File::create("/tmp/mlm-resume-fixture-d53fc4a.lock").unwrap();
    // SAFETY: flock on a descriptor this function owns; released when it closes.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) }, 0);
    let _ = std::fs::remove_dir_all(dir);
    let ckpt = dir.join("out/checkpoint-3");
    std::fs::create_dir_all(&ckpt).unwrap();
    for f in ["config.json", "tokenizer.json", "corpus.txt", "job.toml"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    for entry in std::fs::read_dir(fixture.join("checkpoint-3")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), ckpt.join(entry.file_name())).unwrap();
    }
    let out = run(mlm().arg("train").arg("job.toml").current_dir(dir));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from out/checkpoint-3"));
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("losses.json")).unwrap()).unwrap();
    let got = losses(&dir.join("out"));
    let _ = std::fs::remove_dir_all(dir);
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), [4, 5, 6]);
    for (step, loss) in got {
        let old = want["losses"][step.to_string()].as_f64().unwrap();
        // Bit-identical on the machine that wrote it; other CPUs may round differently.
        assert!((loss - old).abs() <= 1e-5 * old.abs(), "step {step}: {loss} here, {old} before");
    }
}

/// DistilBERT's query, key and value weights are not adjacent by name
/// (`k_lin`, `out_lin`, `q_lin`, `v_lin`); the flat buffer groups them, and its
/// moments are saved in the by-name layout and converted back: a run continued
/// from a checkpoint gives the uninterrupted run's losses bit for bit.
#[test]
fn a_regrouped_flat_layout_resumes_to_the_same_losses() {
    let distilbert = |dir: &Path| {
        let p = dir.join("tiny-distilbert.json");
        std::fs::write(
            &p,
            r#"{"model_type": "distilbert", "architectures": ["DistilBertForMaskedLM"], "vocab_size": 30522,
                "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": 128,
                "dropout": 0.1, "attention_dropout": 0.1, "activation": "gelu", "pad_token_id": 0}"#,
        )
        .unwrap();
        let cfg = write_job(dir, "[checkpoint]\nevery_steps = 4\nkeep_last = 3\n");
        (cfg, format!("model.config={:?}", p.display().to_string()))
    };
    let common = ["training.max_steps=8", "training.log_every=1", "eval.at_start=false"];
    let sets = |model: &str| -> Vec<String> {
        [model].iter().copied().chain(common).flat_map(|s| ["--set".to_string(), s.to_string()]).collect()
    };
    let reference = tempfile::tempdir().unwrap();
    let (cfg, model) = distilbert(reference.path());
    let out = run(mlm().arg("train").arg(&cfg).args(sets(&model)));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("6 of 6 query/key/value projections fused"));
    let want = losses(&reference.path().join("out"));
    assert_eq!(want.len(), 8);

    let fork = tempfile::tempdir().unwrap();
    // The same model config: the fork's own copy would count as a config change.
    let (cfg, _) = distilbert(fork.path());
    let from = reference.path().join("out/checkpoint-4");
    let resumed = run(mlm().arg("train").arg(&cfg).args(sets(&model)).arg("--resume").arg(&from));
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let got = losses(&fork.path().join("out"));
    for step in 5..=8u64 {
        assert_eq!(got.get(&step).map(|l| l.to_bits()), want.get(&step).map(|l| l.to_bits()), "step {step}");
    }
}
