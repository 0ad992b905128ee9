//! Never losing more than a few minutes: a job signalled mid-epoch saves the
//! step it is at and exits with the requeue status, and `resume = "auto"` then
//! gives the uninterrupted job's losses bit for bit; signals during that save
//! break nothing; the workers of a job save and stop at the same step, whichever
//! of them got the signal or ran out of `every_minutes`; `mlm-launch` passes the
//! signal on and exits 75 itself.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::*;

const STEPS: usize = 12;
/// Where the signal comes: after this step has been logged.
const SIGNAL_AFTER: u64 = 3;
const REQUEUE: i32 = mlm::train::preempt::REQUEUE_EXIT_CODE;

fn args() -> Vec<String> {
    [format!("training.max_steps={STEPS}"), "training.log_every=1".into(), "eval.at_start=false".into()]
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
}

/// The uninterrupted job's losses and final weights, made once per test process.
fn reference() -> &'static (BTreeMap<u64, f64>, Vec<u8>) {
    static REFERENCE: OnceLock<(BTreeMap<u64, f64>, Vec<u8>)> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let dir = process_dir("preempt-reference");
        let cfg = write_job(&dir, "");
        assert!(run(mlm().arg("train").arg(&cfg).args(args())).status.success());
        let out = dir.join("out");
        let w = std::fs::read(out.join(format!("checkpoint-{STEPS}/model.safetensors"))).unwrap();
        (losses(&out), w)
    })
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child of this test.
    unsafe { libc::kill(pid as i32, sig) };
}

/// The newest checkpoint of `out`, checked: it verifies, was saved mid-epoch
/// after the signal and before the end, and no half-written folder is left.
fn saved_checkpoint(out: &Path) -> (usize, PathBuf) {
    let (step, dir) = mlm::checkpoint::list(out).pop().expect("no checkpoint");
    mlm::checkpoint::verify(&dir).unwrap();
    assert!(step as u64 >= SIGNAL_AFTER && step < STEPS, "saved step {step}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap()).unwrap();
    assert!(state["step_in_epoch"].as_u64().unwrap() > 0, "not mid-epoch: {state}");
    assert_eq!(leftovers(out), Vec::<String>::new());
    (step, dir)
}

/// Resumes the job in `dir` and holds its losses and weights to the reference.
fn resumes_to_the_reference(dir: &Path, cfg: &Path, saved: usize) {
    let resumed = run(mlm().arg("train").arg(cfg).args(args()));
    assert!(resumed.status.success());
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(stderr.contains(&format!("resuming from {}", dir.join(format!("out/checkpoint-{saved}")).display())));
    let (want, want_w) = reference();
    let got = losses(&dir.join("out"));
    assert_eq!(got.len(), STEPS);
    for (step, loss) in want {
        assert_eq!(got.get(step).map(|l| l.to_bits()), Some(loss.to_bits()), "step {step}");
    }
    let w = std::fs::read(dir.join(format!("out/checkpoint-{STEPS}/model.safetensors"))).unwrap();
    assert!(&w == want_w, "final weights differ");
}

#[test]
fn a_job_signalled_mid_epoch_saves_exits_75_and_resumes_to_the_uninterrupted_losses() {
    reference();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let out = dir.path().join("out");
    let job = spawn(mlm().arg("train").arg(&cfg).args(args()));
    wait_for_step(&out, SIGNAL_AFTER, Duration::from_secs(120));
    signal(job.id(), libc::SIGUSR1);
    let o = job.wait(Duration::from_secs(120), "the signalled job");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(REQUEUE), "{stderr}");
    let (step, _) = saved_checkpoint(&out);
    assert!(stderr.contains(&format!("stopped by SIGUSR1 once step {step} was saved")), "{stderr}");
    resumes_to_the_reference(dir.path(), &cfg, step);
}

#[test]
fn signals_during_the_save_leave_a_valid_checkpoint() {
    // SIGTERM, then a signal every millisecond (SIGTERM and SIGUSR1 in turn)
    // until the job has exited: many land while it saves.
    reference();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let out = dir.path().join("out");
    let mut job = spawn(mlm().arg("train").arg(&cfg).args(args()));
    wait_for_step(&out, SIGNAL_AFTER, Duration::from_secs(120));
    let (mut sent, deadline) = (0, Instant::now() + Duration::from_secs(120));
    // The storm's pace, not a wait on a condition: one signal a millisecond
    // until the job exits (`job.wait` below bounds a job that never does).
    while !job.exited() && Instant::now() < deadline {
        signal(job.id(), if sent % 2 == 0 { libc::SIGTERM } else { libc::SIGUSR1 });
        sent += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    let o = job.wait(Duration::from_secs(10), "the signalled job");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(REQUEUE), "{sent} signals: {stderr}");
    let (step, _) = saved_checkpoint(&out);
    resumes_to_the_reference(dir.path(), &cfg, step);
}

/// Hand-started tcp worker `rank` of 2 (the variables of docs/cluster.md).
fn worker(cfg: &Path, rank: usize, port: u16, extra: &[&str]) -> Running {
    let mut c = mlm();
    c.arg("train")
        .arg(cfg)
        .args(args())
        .args(extra)
        .args(["--set", "distributed.timeout_s=30"])
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", rank.to_string())
        .env("MLM_MASTER_PORT", port.to_string())
        .env("MLM_JOB_TOKEN", "preempt-test")
        .env("OMP_NUM_THREADS", "1")
        .env_remove("SLURM_NTASKS")
        .env_remove("OMPI_COMM_WORLD_SIZE");
    spawn(&mut c)
}

#[test]
fn two_workers_save_at_rank_0s_minutes_and_stop_together_on_one_workers_signal() {
    // Rank 0 asks for a save at every step (every_minutes: 60 µs), rank 1
    // never; then only rank 1 gets SIGUSR1. A worker saving or stopping alone
    // would leave the other in a collective the first never joins.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "[checkpoint]\nkeep_last = 100\n");
    let out = dir.path().join("out");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let rank0 = worker(&cfg, 0, port, &["--set", "checkpoint.every_minutes=0.000001"]);
    let rank1 = worker(&cfg, 1, port, &["--set", "checkpoint.every_minutes=0"]);
    wait_for_step(&out, SIGNAL_AFTER, Duration::from_secs(120));
    signal(rank1.id(), libc::SIGUSR1);
    let (o0, o1) = (rank0.wait(Duration::from_secs(120), "rank 0"), rank1.wait(Duration::from_secs(120), "rank 1"));
    let (e0, e1) = (String::from_utf8_lossy(&o0.stderr), String::from_utf8_lossy(&o1.stderr));
    assert_eq!((o0.status.code(), o1.status.code()), (Some(REQUEUE), Some(REQUEUE)), "{e0}\n{e1}");
    let (step, _) = saved_checkpoint(&out);
    assert!(e0.contains(&format!("stopped by a signal to another worker once step {step} was saved")), "{e0}");
    assert!(e1.contains(&format!("stopped by SIGUSR1 once step {step} was saved")), "{e1}");
    // Rank 0's clock alone: a checkpoint at every step up to the stop.
    let steps: Vec<usize> = mlm::checkpoint::list(&out).into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, (1..=step).collect::<Vec<_>>());
}

/// `mlm-launch` with 2 CPU workers on the job `cfg`.
fn launch(cfg: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(launcher());
    c.args(["--nproc", "2", "--device", "cpu", "--mlm"]).arg(env!("CARGO_BIN_EXE_mlm")).arg(cfg).args(args());
    c.env_remove("MLM_JOB_TOKEN").env_remove("SLURM_NTASKS").env_remove("OMPI_COMM_WORLD_SIZE");
    c
}

#[test]
fn a_launched_job_signalled_mid_epoch_exits_75_and_resumes_to_the_uninterrupted_losses() {
    // SIGUSR1 to mlm-launch (as `--signal=USR1@300` or the batch script's trap
    // sends it): the launcher passes it on, the workers save one step, every
    // exit status is 75, and a restarted group continues bit for bit.
    let reference = tempfile::tempdir().unwrap();
    let cfg = write_job(reference.path(), "");
    assert!(run(&mut launch(&cfg)).status.success());
    let want = losses(&reference.path().join("out"));
    assert_eq!(want.len(), STEPS);

    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let out = dir.path().join("out");
    let job = spawn(&mut launch(&cfg));
    wait_for_step(&out, SIGNAL_AFTER, Duration::from_secs(120));
    signal(job.id(), libc::SIGUSR1);
    let o = job.wait(Duration::from_secs(120), "the signalled launcher");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(REQUEUE), "{stderr}");
    assert!(stderr.contains("exiting with 75 so that the job is requeued"), "{stderr}");
    let (step, _) = saved_checkpoint(&out);
    let resumed = run(&mut launch(&cfg));
    assert!(resumed.status.success());
    let resumed_from = format!("resuming from {}", out.join(format!("checkpoint-{step}")).display());
    assert!(String::from_utf8_lossy(&resumed.stderr).contains(&resumed_from));
    let got = losses(&out);
    for (s, loss) in &want {
        assert_eq!(got.get(s).map(|l| l.to_bits()), Some(loss.to_bits()), "step {s}");
    }
}
