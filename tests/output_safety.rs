//! Nothing lost, no one let in: what a job may do to an output directory that
//! already holds a run, the lock that keeps two jobs apart, `best/` after a
//! crash, and workers of another job. Real binaries, real signals, real
//! concurrent processes.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Every file under `dir` (but metrics and lock files) with its content.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if name != "metrics.jsonl" && !name.ends_with(".lock") {
                out.insert(e.path().strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

fn train(cfg: &Path, extra: &[&str]) -> std::process::Output {
    run(mlm().arg("train").arg(cfg).args(extra))
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The step of the model in `<out>/best`.
fn best_step(out: &Path) -> u64 {
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best/trainer_state.json")).unwrap()).unwrap();
    s["step"].as_u64().unwrap()
}

/// The step and perplexity of the best `eval` record of a run, over the steps
/// that a checkpoint still exists for or that `best/` ever held.
fn best_eval(out: &Path) -> (u64, f64) {
    eval_records(&out.join("metrics.jsonl"))
        .iter()
        .filter(|r| r["step"].as_u64().unwrap() > 0)
        .map(|r| (r["step"].as_u64().unwrap(), r["perplexity"].as_f64().unwrap()))
        .fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a })
}

/// A job evaluating (and saving) every 2 steps, keeping 3 checkpoints.
fn job_with_evals(dir: &Path) -> PathBuf {
    let cfg = write_job(dir, "[checkpoint]\nkeep_last = 3\n");
    let text =
        std::fs::read_to_string(&cfg).unwrap().replace("[eval]\n", "[eval]\nevery_steps = 2\nat_start = false\n");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

#[test]
fn best_is_brought_up_to_date_when_a_crash_came_between_checkpoint_and_best() {
    // A finished run, then the state a crash leaves between writing the
    // checkpoint of a new best evaluation and copying it into best/: best/
    // holds an older model than the best evaluation's checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let cfg = job_with_evals(dir.path());
    let out = dir.path().join("out");
    assert!(train(&cfg, &["--set", "training.max_steps=8"]).status.success());
    let best = best_step(&out);
    let (step, _) = best_eval(&out);
    assert_eq!(best, step, "best/ is the best evaluation of a clean run");
    let older = format!("checkpoint-{}", mlm::checkpoint::list(&out)[0].0);
    assert_ne!(out.join(&older), out.join(format!("checkpoint-{best}")), "keep_last keeps an older one");
    // best/ rebuilt from the older checkpoint, as it was before the killed update.
    std::fs::remove_dir_all(out.join("best")).unwrap();
    mlm::checkpoint::update_best(&out, &out.join(&older)).unwrap();
    assert_ne!(best_step(&out), best);
    let o = train(&cfg, &["--set", "training.max_steps=10", "--set", "checkpoint.allow_config_change=true"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("best/ brought up to date"), "{}", stderr(&o));
    let (step, _) = best_eval(&out);
    assert_eq!(best_step(&out), step, "best/ holds the best evaluated model");
    mlm::checkpoint::verify(&out.join("best")).unwrap();
}

#[test]
fn best_is_the_best_evaluated_model_after_sigkill_right_after_a_checkpoint() {
    // SIGKILL the moment each new checkpoint appears (before or after best/ is
    // updated: either way), resume, and finish: best/ is the best evaluation.
    let dir = tempfile::tempdir().unwrap();
    let cfg = job_with_evals(dir.path());
    let out = dir.path().join("out");
    let args = ["--set", "training.max_steps=12", "--set", "training.log_every=1"];
    for round in 0..3 {
        let mut child =
            mlm().arg("train").arg(&cfg).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let seen = mlm::checkpoint::list(&out).last().map(|c| c.0).unwrap_or(0);
        let t0 = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if mlm::checkpoint::list(&out).last().is_some_and(|c| c.0 > seen) {
                child.kill().unwrap();
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "round {round}: no checkpoint");
            std::thread::sleep(Duration::from_millis(1));
        }
        child.wait().unwrap();
    }
    let o = train(&cfg, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let (step, _) = best_eval(&out);
    assert_eq!(best_step(&out), step);
    mlm::checkpoint::verify(&out.join("best")).unwrap();
}

#[test]
fn a_fresh_start_into_a_finished_run_is_refused_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let out = dir.path().join("out");
    assert!(train(&cfg, &["--set", "training.max_steps=6"]).status.success());
    let before = snapshot(&out);
    let e = error_line(&train(&cfg, &["--resume", "none", "--set", "training.max_steps=2"]));
    assert!(
        e.contains("holds an earlier run") && e.contains("checkpoint-6/") && e.contains("overwrite_output_dir"),
        "{e}"
    );
    assert!(e.contains("resume it (checkpoint.resume = \"auto\")"), "an intact checkpoint can be resumed: {e}");
    assert!(snapshot(&out) == before, "the finished run was modified");
    // A fresh start elsewhere is fine; an explicit overwrite starts over.
    let o = train(
        &cfg,
        &["--resume", "none", "--set", "training.max_steps=2", "--set", "checkpoint.overwrite_output_dir=true"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("deleting checkpoint-6/"), "{}", stderr(&o));
    let steps: Vec<usize> = mlm::checkpoint::list(&out).into_iter().map(|c| c.0).collect();
    assert_eq!(steps, vec![2]);
    assert_eq!(best_step(&out), 2);
}

#[test]
fn unresumable_checkpoints_are_not_overwritten_by_a_fresh_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let out = dir.path().join("out");
    assert!(train(&cfg, &["--set", "training.max_steps=4"]).status.success());
    std::fs::remove_file(out.join("checkpoint-4/checksums.json")).unwrap();
    let before = snapshot(&out);
    let e = error_line(&train(&cfg, &["--set", "training.max_steps=8"]));
    assert!(e.contains("none of its checkpoints can be resumed") && e.contains("checkpoint-4/"), "{e}");
    // Its advice is only what this job can do: resuming is what it already asked for.
    assert!(!e.contains("resume it") && !e.contains("resume = \"auto\""), "{e}");
    assert!(e.contains("another training.output_dir") && e.contains("overwrite_output_dir = true"), "{e}");
    assert!(snapshot(&out) == before);
}

#[test]
fn resuming_from_an_older_checkpoint_would_overwrite_newer_ones_and_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "[checkpoint]\nevery_steps = 2\nkeep_last = 3\n");
    let out = dir.path().join("out");
    assert!(train(&cfg, &["--set", "training.max_steps=6"]).status.success());
    let before = snapshot(&out);
    let old = out.join("checkpoint-2");
    let e = error_line(&train(&cfg, &["--resume", old.to_str().unwrap(), "--set", "training.max_steps=6"]));
    assert!(e.contains("newer checkpoints") && e.contains("checkpoint-4/"), "{e}");
    assert!(snapshot(&out) == before);
    let e = error_line(&train(&cfg, &["--resume", out.join("best").to_str().unwrap()]));
    assert!(e.contains("is a model folder") && e.contains("model.path"), "{e}");
    assert!(snapshot(&out) == before);
}

#[test]
fn a_second_job_on_the_same_output_dir_fails_at_once_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let out = dir.path().join("out");
    let mut first =
        mlm().arg("train").arg(&cfg).args(["--set", "training.max_steps=400"]).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    // Once the first job trains (its lock is taken before the data is prepared).
    while losses(&out).is_empty() {
        assert!(first.try_wait().unwrap().is_none(), "first job ended early");
        assert!(t0.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(20));
    }
    let t1 = Instant::now();
    let second = train(&cfg, &["--set", "training.max_steps=400"]);
    let e = error_line(&second);
    assert!(e.contains("in use by another mlm job") && e.contains(&format!("PID {}", first.id())), "{e}");
    assert!(t1.elapsed() < Duration::from_secs(30), "not at once: {:?}", t1.elapsed());
    // `mlm prepare` (as mlm-launch runs it) is refused too.
    let e = error_line(&run(mlm().arg("prepare").arg(&cfg)));
    assert!(e.contains("in use by another mlm job"), "{e}");
    // A killed job leaves no stale lock: its resume starts at once.
    first.kill().unwrap();
    first.wait().unwrap();
    let o = train(&cfg, &["--set", "checkpoint.allow_config_change=true", "--set", "training.max_steps=6"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn two_jobs_started_together_on_one_output_dir_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let start = || spawn(mlm().arg("train").arg(&cfg).args(["--set", "training.max_steps=6"]));
    let (a, b) = (start(), start());
    let (a, b) = (a.wait(Duration::from_secs(300), "job a"), b.wait(Duration::from_secs(300), "job b"));
    let oks = [a.status.success(), b.status.success()];
    // Exactly one trains, unless the second started after the first had finished
    // (then it resumed the finished run: also fine, and never mixed).
    if oks == [true, true] {
        let all = format!("{}{}", stderr(&a), stderr(&b));
        assert!(all.contains("resuming from"), "{all}");
    } else {
        assert!(oks.contains(&true), "{}\n{}", stderr(&a), stderr(&b));
        let failed = if oks[0] { &b } else { &a };
        assert!(error_line(failed).contains("in use by another mlm job"));
    }
    let out = dir.path().join("out");
    mlm::checkpoint::verify(&out.join("checkpoint-6")).unwrap();
    mlm::checkpoint::verify(&out.join("best")).unwrap();
    assert_eq!(leftovers(&out), Vec::<String>::new());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A hand-started tcp worker of `cfg` (the variables of docs/cluster.md).
fn worker(cfg: &Path, rank: usize, port: u16, token: Option<&str>, extra: &[&str]) -> Running {
    let mut c = mlm();
    c.arg("train")
        .arg(cfg)
        .args(extra)
        .args(["--set", "distributed.timeout_s=120"])
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", rank.to_string())
        .env("MLM_MASTER_PORT", port.to_string())
        .env("OMP_NUM_THREADS", "1")
        .env_remove("MLM_JOB_TOKEN")
        .env_remove("SLURM_NTASKS")
        .env_remove("OMPI_COMM_WORLD_SIZE");
    if let Some(t) = token {
        c.env("MLM_JOB_TOKEN", t);
    }
    spawn(&mut c)
}

#[test]
fn a_worker_of_another_job_cannot_join_without_a_token() {
    // Two hand-started jobs on one port, no MLM_JOB_TOKEN: job B's rank 1 is
    // refused by job A's rank 0 at once, and A never trains with it.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (cfg_a, cfg_b) = (write_job(a.path(), ""), write_job(b.path(), ""));
    let port = free_port();
    let rank0 = worker(&cfg_a, 0, port, None, &[]);
    let t0 = Instant::now();
    let stranger = worker(&cfg_b, 1, port, None, &[]).wait(Duration::from_secs(60), "job B's rank 1");
    let e = error_line(&stranger);
    assert!(e.contains("belongs to another job"), "{e}");
    // Refused at once, not after job A's distributed.timeout_s of 120 s (the
    // bound leaves a loaded machine half of it to start two processes).
    assert!(t0.elapsed() < Duration::from_secs(60), "the stranger waited {:?}", t0.elapsed());
    // Job A's own rank 1 joins and the job trains.
    let own = worker(&cfg_a, 1, port, None, &[]).wait(Duration::from_secs(300), "job A's rank 1");
    let first = rank0.wait(Duration::from_secs(300), "job A's rank 0");
    assert!(own.status.success() && first.status.success(), "{}\n{}", stderr(&own), stderr(&first));
    assert!(!losses(&a.path().join("out")).is_empty());
}

#[test]
fn workers_with_different_configs_stop_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let port = free_port();
    let a = worker(&cfg, 0, port, Some("same-token"), &[]);
    let b = worker(&cfg, 1, port, Some("same-token"), &["--set", "training.lr=1e-3"]);
    let (a, b) = (a.wait(Duration::from_secs(120), "rank 0"), b.wait(Duration::from_secs(120), "rank 1"));
    assert!(!a.status.success() && !b.status.success());
    assert!(error_line(&b).contains("rank 1 runs another config than rank 0"), "{}", stderr(&b));
    assert!(error_line(&a).contains("run another config"), "{}", stderr(&a));
    assert!(losses(&dir.path().join("out")).is_empty(), "no step was trained");
}

#[test]
fn fill_mask_on_a_model_without_a_head_says_so_and_repeats_itself() {
    let go = |seed: &str| {
        let o = run(mlm()
            .args(["fill-mask", "--device", "cpu", "--seed", seed, "--model"])
            .arg(minilm_dir())
            .arg("Paris is the [MASK] of France."));
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("has no trained MLM head"), "{}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let (a, b, c) = (go("7"), go("7"), go("8"));
    assert_eq!(a, b, "same seed, same answers");
    assert_ne!(a, c, "the head is random: another seed answers otherwise");
    // One page of the corpus: the warning is the point, not the perplexity of a random head.
    let page = corpus_glob().replace("*.rst.txt", "appetite.rst.txt");
    let o = run(mlm().args(["eval", "--device", "cpu", "--model"]).arg(minilm_dir()).arg("--data").arg(page));
    assert!(o.status.success() && stderr(&o).contains("has no trained MLM head"), "{}", stderr(&o));
}

#[test]
fn a_closed_pipe_is_not_a_crash() {
    // `true` exits without reading: every write of mlm meets a closed pipe.
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{:?} fill-mask --device cpu --model {:?} 'A [MASK] test.' | true",
            env!("CARGO_BIN_EXE_mlm"),
            minilm_dir()
        ))
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(!e.contains("panicked") && !e.contains("internal error") && !e.contains("error:"), "{e}");
}

/// A resume that runs more steps than the checkpoint's job (`training.max_steps` shapes a job).
const ALLOW: &str = "checkpoint.allow_config_change=true";

/// `path` as a string for `--set key=<path>` and `--resume`.
fn arg(key: &str, path: &Path) -> String {
    format!("{key}={}", toml::Value::String(path.display().to_string()))
}

/// The `run_id` (and `parent_run_id`) recorded in a JSON file (`run.json`, a trainer state).
fn run_ids(file: &Path) -> (String, Option<String>) {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    (v["run_id"].as_str().unwrap().to_string(), v["parent_run_id"].as_str().map(String::from))
}

#[test]
fn a_lock_file_that_is_a_link_is_refused_and_its_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let outside = dir.path().join("notes.txt");
    std::fs::write(&outside, "not a lock\n").unwrap();
    std::os::unix::fs::symlink(&outside, out.join(".lock")).unwrap();
    let e = error_line(&train(&cfg, &["--set", "training.max_steps=2"]));
    assert!(e.contains(".lock is a symbolic link") && e.contains("notes.txt") && e.contains("delete the link"), "{e}");
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "not a lock\n");
    let names: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, [".lock"], "nothing else was written");
}

#[test]
fn a_run_copied_with_links_never_writes_into_the_source_run() {
    // `cp -as` copies the folders and links every file to the source run's.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let source = dir.path().join("out");
    assert!(train(&cfg, &["--set", "training.max_steps=2"]).status.success());
    let copy = dir.path().join("copy");
    let cp = Command::new("cp").arg("-as").arg(&source).arg(&copy).status().unwrap();
    assert!(cp.success());
    let before = snapshot(&source);
    let metrics = std::fs::read(source.join("metrics.jsonl")).unwrap();
    let lock = std::fs::read(source.join(".lock")).unwrap();
    let into_copy = ["--set", &arg("training.output_dir", &copy), "--set", "training.max_steps=4"].map(String::from);
    let into_copy: Vec<&str> = into_copy.iter().map(String::as_str).collect();
    let e = error_line(&train(&cfg, &into_copy));
    assert!(e.contains("is a symbolic link") && e.contains(&source.display().to_string()), "{e}");
    // Without the copied lock, the next link is refused the same way.
    std::fs::remove_file(copy.join(".lock")).unwrap();
    let e = error_line(&train(&cfg, &into_copy));
    assert!(e.contains("is a symbolic link") && e.contains("delete the link"), "{e}");
    assert_eq!(std::fs::read(source.join("metrics.jsonl")).unwrap(), metrics, "the source's metrics changed");
    assert_eq!(std::fs::read(source.join(".lock")).unwrap(), lock);
    assert!(snapshot(&source) == before, "the source run was modified");
}

#[test]
fn a_metrics_file_that_is_a_link_is_refused_and_the_other_runs_metrics_kept() {
    // A real copy of a finished run whose metrics.jsonl links to the source's.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let source = dir.path().join("out");
    assert!(train(&cfg, &["--set", "training.max_steps=2"]).status.success());
    let copy = dir.path().join("copy");
    assert!(Command::new("cp").arg("-a").arg(&source).arg(&copy).status().unwrap().success());
    std::fs::remove_file(copy.join("metrics.jsonl")).unwrap();
    std::os::unix::fs::symlink(source.join("metrics.jsonl"), copy.join("metrics.jsonl")).unwrap();
    let metrics = std::fs::read(source.join("metrics.jsonl")).unwrap();
    let before = snapshot(&copy);
    let o = train(&cfg, &["--set", &arg("training.output_dir", &copy), "--set", "training.max_steps=4"]);
    let e = error_line(&o);
    assert!(e.contains("metrics.jsonl is a symbolic link") && e.contains("delete the link"), "{e}");
    assert_eq!(std::fs::read(source.join("metrics.jsonl")).unwrap(), metrics);
    assert!(snapshot(&copy) == before, "the refused start wrote into the copy");
}

#[test]
fn a_store_lock_that_is_a_link_is_refused_when_the_store_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let store = dir.path().join("tokens");
    let at_store = arg("data.prepared_dir", &store);
    assert!(run(mlm().arg("prepare").arg(&cfg).args(["--set", &at_store])).status.success());
    let manifest = std::fs::read(store.join("manifest.json")).unwrap();
    let outside = dir.path().join("notes.txt");
    std::fs::write(&outside, "mine\n").unwrap();
    std::fs::remove_file(dir.path().join(".tokens.lock")).unwrap();
    std::os::unix::fs::symlink(&outside, dir.path().join(".tokens.lock")).unwrap();
    // Another block size: the store would be prepared again.
    for cmd in ["prepare", "train"] {
        let o = run(mlm().arg(cmd).arg(&cfg).args(["--set", &at_store, "--set", "data.block_size=32"]));
        let e = error_line(&o);
        assert!(e.contains(".tokens.lock is a symbolic link") && e.contains("notes.txt"), "{cmd}: {e}");
    }
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "mine\n");
    assert_eq!(std::fs::read(store.join("manifest.json")).unwrap(), manifest, "the store was rebuilt");
}

#[test]
fn an_output_folder_and_a_store_folder_that_are_links_still_work() {
    // As on a cluster: both link to scratch space.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(scratch.join("out")).unwrap();
    std::fs::create_dir_all(scratch.join("tokens")).unwrap();
    std::os::unix::fs::symlink(scratch.join("out"), dir.path().join("out")).unwrap();
    std::os::unix::fs::symlink(scratch.join("tokens"), dir.path().join("tokens")).unwrap();
    let at_store = arg("data.prepared_dir", &dir.path().join("tokens"));
    let o = train(&cfg, &["--set", &at_store, "--set", "training.max_steps=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train(&cfg, &["--set", &at_store, "--set", "training.max_steps=4", "--set", ALLOW]);
    assert!(o.status.success() && stderr(&o).contains("resuming from"), "{}", stderr(&o));
    for (link, real) in [("out", "out"), ("tokens", "tokens")] {
        assert!(std::fs::symlink_metadata(dir.path().join(link)).unwrap().file_type().is_symlink(), "{link}");
        assert!(scratch.join(real).is_dir());
    }
    mlm::checkpoint::verify(&scratch.join("out/checkpoint-4")).unwrap();
    assert!(scratch.join("out/run.json").is_file() && scratch.join("tokens/manifest.json").is_file());
    assert!(!losses(&scratch.join("out")).is_empty(), "the metrics are in the scratch folder");
}

#[test]
fn another_runs_checkpoint_is_refused_beside_a_run_and_forks_into_an_empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    // Run A in out/, run B (the same job) in b/.
    let (a, b) = (dir.path().join("out"), dir.path().join("b"));
    assert!(train(&cfg, &["--set", "training.max_steps=2"]).status.success());
    let to_b = arg("training.output_dir", &b);
    assert!(train(&cfg, &["--set", &to_b, "--set", "training.max_steps=4"]).status.success());
    let (id_a, id_b) = (run_ids(&a.join("run.json")).0, run_ids(&b.join("run.json")).0);
    assert_ne!(id_a, id_b);
    assert_eq!(run_ids(&a.join("checkpoint-2/trainer_state.json")).0, id_a);
    let (before_a, before_b) = (snapshot(&a), snapshot(&b));
    let metrics = std::fs::read(a.join("metrics.jsonl")).unwrap();
    // B's checkpoint into A's folder: refused, naming both runs.
    let theirs = b.join("checkpoint-4");
    let o = train(&cfg, &["--resume", theirs.to_str().unwrap(), "--set", "training.max_steps=6", "--set", ALLOW]);
    let e = error_line(&o);
    assert!(
        e.contains(&format!("holds run {id_a}"))
            && e.contains(&format!("checkpoint of run {id_b}"))
            && e.contains("overwrite_output_dir"),
        "{e}"
    );
    assert!(snapshot(&a) == before_a, "best/ or a checkpoint of run A changed");
    assert_eq!(std::fs::read(a.join("metrics.jsonl")).unwrap(), metrics);
    // Into an empty folder: a fork, a new run that records its parent.
    let c = dir.path().join("c");
    let o = train(
        &cfg,
        &[
            "--resume",
            theirs.to_str().unwrap(),
            "--set",
            &arg("training.output_dir", &c),
            "--set",
            "training.max_steps=6",
            "--set",
            ALLOW,
        ],
    );
    assert!(o.status.success() && stderr(&o).contains("resuming from"), "{}", stderr(&o));
    let (id_c, parent) = run_ids(&c.join("run.json"));
    assert!(id_c != id_a && id_c != id_b && parent.as_deref() == Some(id_b.as_str()), "{id_c} {parent:?}");
    assert_eq!(run_ids(&c.join("checkpoint-6/trainer_state.json")), (id_c.clone(), parent));
    assert!(snapshot(&b) == before_b, "the parent run was modified");
    // The fork resumes as itself.
    let o = train(&cfg, &["--set", &arg("training.output_dir", &c), "--set", "training.max_steps=8", "--set", ALLOW]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(run_ids(&c.join("checkpoint-8/trainer_state.json")).0, id_c);
}

#[test]
fn a_running_job_keeps_its_folder_and_its_store_when_its_lock_file_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let out = dir.path().join("out");
    let store = dir.path().join("tokens");
    let at_store = arg("data.prepared_dir", &store);
    let mut first =
        spawn(mlm().arg("train").arg(&cfg).args(["--set", &at_store, "--set", "training.max_steps=100000"]));
    wait_until("the first job training", Duration::from_secs(120), || {
        assert!(!first.exited(), "first job ended early:\n{}", first.stderr_so_far());
        !losses(&out).is_empty()
    });
    let manifest = std::fs::read(store.join("manifest.json")).unwrap();
    std::fs::remove_file(out.join(".lock")).unwrap();
    let e = error_line(&train(&cfg, &["--set", &at_store]));
    assert!(e.contains("in use by another mlm job"), "{e}");
    // A job in another folder whose settings would rebuild the shared store.
    let elsewhere = arg("training.output_dir", &dir.path().join("other"));
    for cmd in ["train", "prepare"] {
        let o = run(mlm().arg(cmd).arg(&cfg).args([
            "--set",
            &at_store,
            "--set",
            &elsewhere,
            "--set",
            "data.block_size=32",
        ]));
        let e = error_line(&o);
        assert!(e.contains("prepared data") && e.contains("in use by another mlm job"), "{cmd}: {e}");
    }
    assert_eq!(std::fs::read(store.join("manifest.json")).unwrap(), manifest, "the store was rebuilt");
    assert!(!first.exited(), "the first job was stopped:\n{}", first.stderr_so_far());
    assert_eq!(leftovers(&out), Vec::<String>::new());
}

#[test]
fn a_complete_store_on_a_read_only_filesystem_is_used() {
    // A read-only bind mount in a mount namespace of the command's own.
    if !Command::new("unshare").args(["-m", "true"]).status().is_ok_and(|s| s.success()) {
        eprintln!("skipped: `unshare -m` is not allowed here (needs root), so no read-only mount can be made");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let shelf = dir.path().join("shelf");
    let at_store = arg("data.prepared_dir", &shelf.join("tokens"));
    assert!(run(mlm().arg("prepare").arg(&cfg).args(["--set", &at_store])).status.success());
    let read_only = |args: &[&str]| {
        let script =
            format!("mount --bind {0} {0} && mount -o remount,ro,bind {0} && exec \"$0\" \"$@\"", shelf.display());
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "sh", "-c", &script]).arg(mlm().get_program()).args(args).arg(&cfg).args(["--set", &at_store]);
        run(&mut cmd)
    };
    // With its lock file (locked read-only), and without one (no lock at all).
    let o = read_only(&["prepare"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_file(shelf.join(".tokens.lock")).unwrap();
    let o = read_only(&["train", "--set", "training.max_steps=1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("is read-only: reading the prepared data"), "{}", stderr(&o));
    assert!(!shelf.join(".tokens.lock").exists());
}

#[test]
fn a_start_that_fails_at_its_tensorboard_folder_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let out = dir.path().join("out");
    assert!(train(&cfg, &["--set", "training.max_steps=2"]).status.success());
    // A record of a later step, as a killed attempt leaves: a resume drops it.
    let mut metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    metrics.push_str("{\"kind\":\"train\",\"step\":9,\"loss\":1.0}\n");
    std::fs::write(out.join("metrics.jsonl"), &metrics).unwrap();
    std::fs::write(out.join("tb"), "a file where TensorBoard's folder goes").unwrap();
    let before = snapshot(&out);
    let o = train(&cfg, &["--set", "training.max_steps=4", "--set", ALLOW, "--set", "logging.tensorboard=true"]);
    let e = error_line(&o);
    assert!(!o.status.success() && e.contains("TensorBoard"), "{e}");
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(), metrics);
    assert!(snapshot(&out) == before, "the output folder changed");
}

#[test]
fn starting_a_finished_run_again_records_each_evaluation_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let metrics = dir.path().join("out/metrics.jsonl");
    let steps = |m: &Path| eval_records(m).iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>();
    assert!(train(&cfg, &["--set", "training.max_steps=2"]).status.success());
    let first = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(steps(&metrics), vec![0, 2]);
    for _ in 0..2 {
        let o = train(&cfg, &["--set", "training.max_steps=2"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(steps(&metrics), vec![0, 2], "{}", std::fs::read_to_string(&metrics).unwrap());
    }
    // The run's records stay those of the run that trained.
    let train_lines = |t: &str| t.lines().filter(|l| l.contains("\"train\"")).map(String::from).collect::<Vec<_>>();
    assert_eq!(train_lines(&std::fs::read_to_string(&metrics).unwrap()), train_lines(&first));
}
