//! `mlm-launch --selfcheck` on 2 CPU ranks (tcp), with the real `mlm` and
//! `mlm-comm-check` built beside the launcher (`cargo build --workspace
//! --bins`): it passes, and with its test hook `--selfcheck-break` (the
//! 2-rank jobs train with another seed) the loss checks fail and it exits 1.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const LAUNCH: &str = env!("CARGO_BIN_EXE_mlm-launch");

/// The two selfchecks run one at a time: each already keeps 2 cores busy.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `mlm` beside the launcher, where the launcher looks for it.
fn mlm_beside_the_launcher() -> PathBuf {
    let mlm = Path::new(LAUNCH).with_file_name("mlm");
    for bin in ["mlm", "mlm-comm-check"] {
        let p = mlm.with_file_name(bin);
        assert!(p.is_file(), "{} not built: run `cargo build --workspace --bins`", p.display());
    }
    mlm
}

/// Runs `mlm-launch args`, draining its output while it runs; kills it and
/// fails after `limit`.
fn launch(args: &[&str], limit: Duration) -> (ExitStatus, String, String) {
    let mut child = Command::new(LAUNCH)
        .args(args)
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("MLM_JOB_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            r.read_to_string(&mut s).unwrap();
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            let (out, err) = (out.join().unwrap(), err.join().unwrap());
            panic!("mlm-launch {args:?} still running after {limit:?}:\n{out}\n{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, out.join().unwrap(), err.join().unwrap())
}

/// The selfcheck's line of check `name`.
fn line<'a>(stdout: &'a str, name: &str) -> &'a str {
    let prefix = format!("mlm-launch selfcheck: {name}: ");
    stdout.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {name:?} line in:\n{stdout}"))
}

/// The temporary directory the header line names.
fn work_dir(stdout: &str) -> PathBuf {
    let header = stdout.lines().next().unwrap_or_default();
    let dir = header.rsplit(" in ").next().unwrap_or_default();
    PathBuf::from(dir.split(" (kept").next().unwrap())
}

#[test]
fn selfcheck_on_two_cpu_ranks_passes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    mlm_beside_the_launcher();
    let (status, stdout, stderr) =
        launch(&["--nproc", "2", "--device", "cpu", "--selfcheck"], Duration::from_secs(300));
    eprintln!("{stdout}\n{stderr}");
    assert!(status.success(), "{stdout}\n{stderr}");
    let verdict = stdout.lines().last().unwrap_or_default();
    assert!(verdict.starts_with("mlm-launch selfcheck: PASS (2 ranks, cpu): "), "{verdict}");
    for check in [
        "reference",
        "losses, fp32 communication, overlap on",
        "losses, fp32 communication, overlap off",
        "losses, bf16 communication, overlap on",
        "losses, bf16 communication, overlap off",
        "dead peer",
        "all-reduce",
    ] {
        assert!(line(&stdout, check).contains(": ok: "), "{check}: {stdout}");
    }
    // The peer noticed the dead rank by itself, and the supervision named it.
    let dead = line(&stdout, "dead peer");
    assert!(dead.contains("rank 1 was SIGKILLed") && dead.contains("\"rank 1 was killed by signal 9 (SIGKILL)\""));
    assert!(line(&stdout, "all-reduce").contains("(tcp)"), "{stdout}");
    let dir = work_dir(&stdout);
    assert!(dir.starts_with(std::env::temp_dir()), "{}", dir.display());
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

/// The test hook `--selfcheck-break` trains the 2-rank jobs with another
/// seed: the losses cannot match, while the other checks still pass.
#[test]
fn selfcheck_fails_when_the_ranks_train_another_job() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    mlm_beside_the_launcher();
    let (status, stdout, stderr) = launch(
        &["--nproc", "2", "--device", "cpu", "--selfcheck", "--selfcheck-break", "--keep"],
        Duration::from_secs(300),
    );
    eprintln!("{stdout}\n{stderr}");
    assert_eq!(status.code(), Some(1), "{stdout}\n{stderr}");
    let verdict = stdout.lines().last().unwrap_or_default();
    assert!(verdict.starts_with("mlm-launch selfcheck: FAIL (2 ranks, cpu): losses fp32 overlap on "), "{verdict}");
    for overlap in ["on", "off"] {
        let l = line(&stdout, &format!("losses, fp32 communication, overlap {overlap}"));
        assert!(l.contains(": FAIL: ") && l.contains("tolerance 1e-5"), "{l}");
    }
    assert!(line(&stdout, "dead peer").contains(": ok: "), "{stdout}");
    assert!(line(&stdout, "all-reduce").contains(": ok: "), "{stdout}");
    // --keep leaves the jobs and their logs for a look.
    let dir = work_dir(&stdout);
    assert!(dir.join("losses-fp32-overlap-on.log").is_file(), "{}", dir.display());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn selfcheck_refuses_a_config_and_several_nodes_in_one_line() {
    for (args, want) in [
        (&["--selfcheck", "job.toml"][..], "--selfcheck runs its own tiny jobs and takes no CONFIG (got job.toml)"),
        (&["--selfcheck", "--nnodes", "2"][..], "--selfcheck checks one node"),
        (&["--selfcheck", "--set", "training.lr=1"][..], "--selfcheck takes no --set"),
    ] {
        let (status, _, stderr) = launch(args, Duration::from_secs(30));
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("mlm-launch: error: ") && stderr.contains(want), "{args:?}: {stderr}");
    }
}
