//! Data-parallel training with the real binaries: 2 CPU workers through
//! `mlm-launch` (tcp ring) and through `mpirun` (MPI) give the parameters of one
//! process with twice the batch; a killed worker stops the group, and a restarted
//! group resumes to the uninterrupted job's result.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

/// `mlm-launch --nproc 2 --device cpu --mlm <mlm>`: the job's file and flags follow.
fn two_cpu_workers() -> Command {
    let mut c = Command::new(launcher());
    c.args(["--nproc", "2", "--device", "cpu", "--mlm"]).arg(env!("CARGO_BIN_EXE_mlm"));
    c
}

/// A tiny job without dropout (dropout masks are per worker, as in any
/// data-parallel framework), fp32, `steps` steps, no evaluation before.
fn job(dir: &Path, steps: usize) -> PathBuf {
    comparable_job(dir, steps)
}

fn mpirun() -> Option<PathBuf> {
    let out = Command::new("sh").args(["-c", "command -v mpirun"]).output().ok()?;
    out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

#[test]
fn two_workers_equal_one_worker_with_twice_the_batch() {
    const STEPS: usize = 20;
    let single = tempfile::tempdir().unwrap();
    let cfg = job(single.path(), STEPS);
    assert!(run(mlm().arg("train").arg(&cfg).args(["--set", "training.batch_size=16"])).status.success());
    let reference = weights(&single.path().join(format!("out/checkpoint-{STEPS}")));

    let launched = tempfile::tempdir().unwrap();
    let cfg = job(launched.path(), STEPS);
    let out = run(two_cpu_workers().arg(&cfg).args(["--set", "training.batch_size=8"]));
    assert!(out.status.success());
    let (worst, name) =
        worst_relative_difference(&reference, &weights(&launched.path().join(format!("out/checkpoint-{STEPS}"))));
    eprintln!("mlm-launch --nproc 2: largest relative difference {worst:.2e} ({name})");
    assert!(worst < 1e-5, "mlm-launch: {worst} in {name}");

    let Some(mpirun) = mpirun() else {
        // A test need, not the product's: make test runs without it (scripts/setup.sh).
        return eprintln!(
            "SKIPPED under mpirun: mpirun not found (`make setup-test` installs openmpi-bin where it may)"
        );
    };
    let under_mpi = tempfile::tempdir().unwrap();
    let cfg = job(under_mpi.path(), STEPS);
    // mpirun does not run `prepare` first: rank 0 prepares while the other waits.
    let out = run(Command::new(mpirun)
        .args(["--oversubscribe", "-np", "2"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg(env!("CARGO_BIN_EXE_mlm"))
        .arg("train")
        .arg(&cfg)
        .args(["--set", "training.batch_size=8"]));
    assert!(out.status.success());
    let (worst, name) =
        worst_relative_difference(&reference, &weights(&under_mpi.path().join(format!("out/checkpoint-{STEPS}"))));
    eprintln!("mpirun -np 2: largest relative difference {worst:.2e} ({name})");
    assert!(worst < 1e-5, "mpirun: {worst} in {name}");
}

/// 2 workers on tcp with the all-reduce overlapped with backward (layer by
/// layer, in small buckets; with and without activation checkpointing) end
/// with the parameters of the plain all-reduce after backward.
#[test]
fn overlapped_all_reduce_equals_the_plain_one() {
    const STEPS: usize = 8;
    let launch = |extra: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = job(dir.path(), STEPS);
        let out = run(two_cpu_workers()
            .arg(&cfg)
            .args(["--set", "training.batch_size=8", "--set", "training.micro_batch_size=4"])
            .args(extra.iter().flat_map(|e| ["--set", e])));
        assert!(out.status.success());
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        (weights(&dir.path().join(format!("out/checkpoint-{STEPS}"))), log)
    };
    let (plain, log) = launch(&["distributed.overlap=false"]);
    assert!(!log.contains("overlapped with backward"), "{log}");
    for extra in [
        &["distributed.bucket_elems=5000"][..],
        &["distributed.bucket_elems=5000", "training.activation_checkpointing=true"][..],
    ] {
        let (overlapped, log) = launch(extra);
        assert!(log.contains("gradient all-reduce overlapped with backward"), "{log}");
        let (worst, name) = worst_relative_difference(&plain, &overlapped);
        eprintln!("overlap {extra:?}: largest relative difference {worst:.2e} ({name})");
        assert!(worst < 1e-5, "{extra:?}: {worst} in {name}");
    }
}

/// The `loss_scale` of each logged step of the run writing `out`.
fn loss_scales(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss_scale"].as_f64().unwrap_or_else(|| panic!("no loss_scale in {v}")))
        .collect()
}

/// fp16 on 2 tcp workers: the overflow check is made on the gradient summed
/// over the workers, so both skip the same steps, and the loss scale moves
/// as that of one process with twice the batch (an initial scale that
/// overflows, so that it backs off, and grows again after 2 clean steps).
/// Each worker's fp16 gradients are those of its half of the batch, whose
/// largest element may pass 65504 at a scale where the whole batch's does not
/// (as under DDP): the 7 steps are ones where both overflow or neither does
/// (at step 8 the two workers overflow at 2^18 and one process does not).
#[test]
fn two_fp16_workers_skip_the_steps_one_worker_skips() {
    const STEPS: usize = 7;
    let fp16 = [
        "training.precision=fp16",
        "training.loss_scale.init_scale=4194304.0",
        "training.loss_scale.growth_interval=2",
        "training.log_every=1",
    ];
    let sets = |batch: &'static str| std::iter::once(batch).chain(fp16).flat_map(|s| ["--set", s]).collect::<Vec<_>>();
    let single = tempfile::tempdir().unwrap();
    let cfg = job(single.path(), STEPS);
    assert!(run(mlm().arg("train").arg(&cfg).args(sets("training.batch_size=16"))).status.success());
    let launched = tempfile::tempdir().unwrap();
    let cfg = job(launched.path(), STEPS);
    assert!(run(two_cpu_workers().arg(&cfg).args(sets("training.batch_size=8"))).status.success());
    let (one, two) = (loss_scales(&single.path().join("out")), loss_scales(&launched.path().join("out")));
    eprintln!("loss scale, 1 worker: {one:?}\n2 workers: {two:?}");
    assert!(one.windows(2).any(|w| w[1] < w[0]) && one.windows(2).any(|w| w[1] > w[0]), "{one:?}");
    assert_eq!(one, two, "the loss scale of 2 workers");
    let at = |d: &tempfile::TempDir| weights(&d.path().join(format!("out/checkpoint-{STEPS}")));
    let (worst, name) = worst_relative_difference(&at(&single), &at(&launched));
    eprintln!("fp16, 2 workers: largest relative difference {worst:.2e} ({name})");
}

/// The pids of the `mlm train` workers of a launcher.
fn workers(launcher_pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep").args(["-P", &launcher_pid.to_string(), "-f", "mlm train"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The settings of the killed-worker runs and of their uninterrupted reference.
const KILL_JOB_SETS: [&str; 6] =
    ["--set", "training.batch_size=8", "--set", "training.log_every=1", "--set", "checkpoint.every_steps=4"];

/// Runs a 2-worker job, SIGKILLs one worker once step `at` is logged, and
/// returns (exit success, seconds from the kill to the launcher's exit, stderr).
fn launch_and_kill(dir: &Path, cfg: &Path, extra: &[&str], at: u64) -> (bool, f64, String) {
    let child = spawn(two_cpu_workers().args(extra).arg(cfg).args(KILL_JOB_SETS));
    wait_for_step(&dir.join("out"), at, Duration::from_secs(180));
    let victims = workers(child.id());
    assert_eq!(victims.len(), 2, "two workers expected, found {victims:?}");
    // SIGKILL rank 1 (its rank is in its environment).
    let rank_of = |pid: u32| {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        env.split(|&b| b == 0).find_map(|kv| kv.strip_prefix(b"RANK=").map(|r| String::from_utf8_lossy(r).into_owned()))
    };
    let victim = *victims.iter().find(|&&p| rank_of(p).as_deref() == Some("1")).expect("rank 1 worker");
    let killed = Instant::now();
    Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap();
    let output = child.wait(Duration::from_secs(300), "mlm-launch");
    let secs = killed.elapsed().as_secs_f64();
    (output.status.success(), secs, String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn killed_worker_stops_the_group_and_a_restart_resumes_exactly() {
    const STEPS: usize = 24;
    let whole = tempfile::tempdir().unwrap();
    let cfg = job(whole.path(), STEPS);
    let out = run(two_cpu_workers().arg(&cfg).args(KILL_JOB_SETS));
    assert!(out.status.success());
    let want = losses(&whole.path().join("out"));

    // Without restarts: every worker ends, the launcher fails naming the rank.
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), STEPS);
    let (ok, secs, stderr) = launch_and_kill(dir.path(), &cfg, &[], 6);
    assert!(!ok, "the launcher must fail");
    // Far below distributed.timeout_s (300 s): the failure stopped the group,
    // not a timeout; the margin is for a loaded machine.
    assert!(secs < 60.0, "the group took {secs:.1}s to stop");
    assert!(stderr.contains("rank 1"), "{stderr}");
    // The launcher stops and reaps its workers before it exits: none may be
    // left now (a worker that outlived it would end on its own soon after, so
    // waiting here would hide the orphan).
    let left = Command::new("pgrep").args(["-af", &cfg.display().to_string()]).output().unwrap().stdout;
    let left = String::from_utf8_lossy(&left);
    assert!(left.trim().is_empty(), "orphan workers left:\n{left}");

    // With one restart the job resumes from its checkpoint and finishes with the
    // uninterrupted job's losses.
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), STEPS);
    let (ok, _, stderr) = launch_and_kill(dir.path(), &cfg, &["--max-restarts", "1"], 10);
    assert!(ok, "{stderr}");
    let got = losses(&dir.path().join("out"));
    assert_eq!(got.get(&(STEPS as u64)), want.get(&(STEPS as u64)), "final loss differs");
    for (step, loss) in &want {
        assert_eq!(got.get(step), Some(loss), "step {step}");
    }
}

#[test]
fn gpu_workers_without_a_usable_gpu_fail_saying_why() {
    if tch::Cuda::is_available() {
        return; // a GPU machine: the job would run
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), 2);
    let out = Command::new(launcher())
        .args(["--gpus", "2", "--mlm"])
        .arg(env!("CARGO_BIN_EXE_mlm"))
        .arg(&cfg)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--gpus 2 trained without a GPU:\n{stderr}");
    // Without an NVIDIA driver the launcher refuses before any work
    // (bad_input::gpu_workers_without_a_gpu_are_refused_before_any_work);
    // with a driver but no usable GPU each worker says why.
    assert!(stderr.contains("no GPU is visible here") || stderr.contains("training.device = cuda but "), "{stderr}");
    assert!(!stderr.contains("step 1"), "a worker trained: {stderr}");
}
