//! mlm-launch against fake workers: `--mlm` points at a shell script written by
//! each test, which records its environment and then behaves as told.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const LAUNCH: &str = env!("CARGO_BIN_EXE_mlm-launch");

/// A fake `mlm`: `prepare` logs and exits 0; `train` records its pid,
/// environment and arguments (per rank and attempt), prints a line to stdout
/// and one to stderr, then runs `behaviour`.
fn fake_mlm(dir: &Path, behaviour: &str) -> PathBuf {
    let script = format!(
        r#"#!/bin/bash
cmd=$1; shift
dir="{dir}"
if [ "$cmd" = prepare ]; then echo "prepare $*" >> "$dir/prepare.log"; exit 0; fi
attempt=$(ls "$dir" | grep -c "^pid\.$RANK\.")
echo $$ > "$dir/pid.$RANK.$attempt"
env | grep -E '^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|MLM_MASTER_ADDR|MLM_MASTER_PORT|MLM_JOB_TOKEN|CUDA_VISIBLE_DEVICES)=' | sort > "$dir/env.$RANK.$attempt"
echo "$*" > "$dir/args.$RANK.$attempt"
echo "hello from $RANK"
echo "complaint from $RANK" >&2
{behaviour}
"#,
        dir = dir.display()
    );
    let path = dir.join("mlm");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn launch(dir: &Path, mlm: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(LAUNCH);
    cmd.arg("--mlm").arg(mlm).arg(dir.join("job.toml")).args(args);
    cmd.env_remove("CUDA_VISIBLE_DEVICES").env_remove("MLM_JOB_TOKEN");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn run_timed(mut cmd: Command, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let child = cmd.spawn().unwrap();
    let out = wait_limit(child, limit);
    (out, start.elapsed())
}

/// Reads `from` to its end on a thread of its own.
fn drain<R: Read + Send + 'static>(from: Option<R>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut from) = from {
            let _ = from.read_to_end(&mut buf);
        }
        buf
    })
}

/// Waits for `child`, reading its output while it runs (a full pipe would
/// stall it); kills it and fails after `limit`.
fn wait_limit(mut child: Child, limit: Duration) -> Output {
    let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            let (_, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
            panic!("mlm-launch still running after {limit:?}:\n{}", text(&stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Gone, or a zombie nobody reaped.
fn is_dead(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
    }
}

fn wait_for(what: impl Fn() -> bool, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if what() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn output_is_prefixed_per_rank_and_env_is_set_per_rank() {
    let dir = tempfile::tempdir().unwrap();
    let mlm = fake_mlm(dir.path(), "exit 0");
    let (out, _) = run_timed(
        launch(dir.path(), &mlm, &["--nproc", "3", "--device", "cpu", "--set", "training.lr=1e-4"]),
        Duration::from_secs(30),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    for r in 0..3 {
        assert!(stdout.contains(&format!("[rank {r}] hello from {r}\n")), "{stdout}");
        assert!(stderr.contains(&format!("[rank {r}] complaint from {r}\n")), "{stderr}");
    }
    // prepare ran once, before the workers, with the same overrides.
    let prepare = read(dir.path(), "prepare.log");
    assert_eq!(prepare.lines().count(), 1, "{prepare}");
    assert!(prepare.contains("--set training.lr=1e-4"), "{prepare}");
    let envs: Vec<String> = (0..3).map(|r| read(dir.path(), &format!("env.{r}.0"))).collect();
    let var = |env: &str, k: &str| {
        env.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).map(str::to_string).unwrap_or_default()
    };
    for (r, env) in envs.iter().enumerate() {
        assert_eq!(var(env, "RANK"), r.to_string());
        assert_eq!(var(env, "LOCAL_RANK"), r.to_string());
        assert_eq!(var(env, "WORLD_SIZE"), "3");
        assert_eq!(var(env, "MLM_MASTER_ADDR"), "127.0.0.1");
        assert_eq!(var(env, "MLM_MASTER_PORT"), var(&envs[0], "MLM_MASTER_PORT"));
        assert_eq!(var(env, "MLM_JOB_TOKEN"), var(&envs[0], "MLM_JOB_TOKEN"));
        let args = read(dir.path(), &format!("args.{r}.0"));
        assert!(args.contains("--set training.lr=1e-4 --set training.device=cpu"), "{args}");
    }
    assert!(var(&envs[0], "MLM_MASTER_PORT").parse::<u16>().unwrap() > 0);
    let token = var(&envs[0], "MLM_JOB_TOKEN");
    assert!(token.len() == 32 && token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");
}

#[test]
fn a_second_node_numbers_its_workers_after_the_first_and_leaves_prepare_to_node_0() {
    let dir = tempfile::tempdir().unwrap();
    let mlm = fake_mlm(dir.path(), "exit 0");
    let (out, _) = run_timed(
        launch(
            dir.path(),
            &mlm,
            &["--nnodes", "3", "--node-rank", "1", "--nproc", "2", "--device", "cpu", "--master-addr", "10.0.0.5"],
        ),
        Duration::from_secs(30),
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("node 1: node 0 prepares the data"), "{stderr}");
    assert!(read(dir.path(), "prepare.log").is_empty(), "node 1 must not prepare");
    let var = |env: &str, k: &str| {
        env.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).map(str::to_string).unwrap_or_default()
    };
    for (local, rank) in [(0, 2), (1, 3)] {
        let env = read(dir.path(), &format!("env.{rank}.0"));
        assert_eq!(var(&env, "RANK"), rank.to_string(), "{env}");
        assert_eq!(var(&env, "LOCAL_RANK"), local.to_string());
        assert_eq!(var(&env, "LOCAL_WORLD_SIZE"), "2");
        assert_eq!(var(&env, "GROUP_RANK"), "1");
        assert_eq!(var(&env, "WORLD_SIZE"), "6");
        assert_eq!(var(&env, "MLM_MASTER_ADDR"), "10.0.0.5");
        // Every node must agree on the port: torchrun's default, not a random one.
        assert_eq!(var(&env, "MLM_MASTER_PORT"), "29500");
        // Launchers cannot agree on a random token: the workers derive one.
        assert_eq!(var(&env, "MLM_JOB_TOKEN"), "");
    }
    // A token exported on every node reaches the workers unchanged.
    let dir = tempfile::tempdir().unwrap();
    let mlm = fake_mlm(dir.path(), "exit 0");
    let mut cmd = launch(dir.path(), &mlm, &["--nnodes", "2", "--node-rank", "1", "--device", "cpu"]);
    cmd.env("MLM_JOB_TOKEN", "shared-secret").args(["--master-port", "4242"]);
    let (out, _) = run_timed(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let env = read(dir.path(), "env.1.0");
    assert!(env.contains("MLM_JOB_TOKEN=shared-secret\n") && env.contains("MLM_MASTER_PORT=4242\n"), "{env}");

    let out = launch(dir.path(), &mlm, &["--nnodes", "2", "--node-rank", "2"]).output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--node-rank 2 is not below --nnodes 2"), "{}", text(&out.stderr));
}

#[test]
fn gpu_workers_each_see_one_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let mlm = fake_mlm(dir.path(), "exit 0");
    let mut cmd = launch(dir.path(), &mlm, &["--gpus", "0,2"]);
    cmd.env("CUDA_VISIBLE_DEVICES", "5,6,7");
    let (out, _) = run_timed(cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(read(dir.path(), "env.0.0").contains("CUDA_VISIBLE_DEVICES=5\n"));
    assert!(read(dir.path(), "env.1.0").contains("CUDA_VISIBLE_DEVICES=7\n"));
    assert!(read(dir.path(), "env.1.0").contains("WORLD_SIZE=2\n"));
    // A GPU worker must use its GPU or fail; it never falls back to the CPU.
    assert!(read(dir.path(), "args.0.0").contains("training.device=cuda"), "{}", read(dir.path(), "args.0.0"));
}

#[test]
fn failing_worker_stops_the_others_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mlm =
        fake_mlm(dir.path(), r#"if [ "$RANK" = 1 ]; then sleep 0.5; echo "rank one gives up"; exit 3; fi; sleep 60"#);
    let (out, took) =
        run_timed(launch(dir.path(), &mlm, &["--nproc", "3", "--device", "cpu"]), Duration::from_secs(30));
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(stderr.contains("rank 1 exited with status 3"), "{stderr}");
    // The tail merges the worker's stdout and stderr, in arrival order.
    let tail = stderr.split("last lines of rank 1:\n").nth(1).unwrap_or_else(|| panic!("no tail: {stderr}"));
    for line in ["  hello from 1", "  complaint from 1", "  rank one gives up"] {
        assert!(tail.lines().any(|l| l == line), "{line:?} not in the tail: {stderr}");
    }
    for r in [0, 2] {
        assert!(is_dead(&read(dir.path(), &format!("pid.{r}.0"))), "rank {r} survived");
    }
}

#[test]
fn worker_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let mlm = fake_mlm(
        dir.path(),
        r#"if [ "$RANK" = 0 ]; then while [ ! -e "$dir/ready.1" ]; do sleep 0.05; done; exit 1; fi; trap '' TERM; touch "$dir/ready.1"; while true; do sleep 0.1; done"#,
    );
    let (out, took) = run_timed(
        launch(dir.path(), &mlm, &["--nproc", "2", "--device", "cpu", "--grace-period", "1"]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(text(&out.stderr).contains("did not stop within"), "{}", text(&out.stderr));
    assert!(is_dead(&read(dir.path(), "pid.1.0")));
}

#[test]
fn sigkilled_worker_stops_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let mlm = fake_mlm(dir.path(), r#"if [ "$RANK" = 0 ]; then sleep 0.5; kill -9 $$; fi; sleep 60"#);
    let (out, took) =
        run_timed(launch(dir.path(), &mlm, &["--nproc", "2", "--device", "cpu"]), Duration::from_secs(30));
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(stderr.contains("rank 0 was killed by signal 9"), "{stderr}");
    assert!(is_dead(&read(dir.path(), "pid.1.0")));
}

#[test]
fn max_restarts_reruns_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    // Rank 1 fails on the first attempt only.
    let mlm = fake_mlm(dir.path(), r#"if [ "$RANK" = 1 ] && [ "$attempt" = 0 ]; then exit 2; fi; sleep 0.2; exit 0"#);
    let (out, _) = run_timed(
        launch(dir.path(), &mlm, &["--nproc", "2", "--device", "cpu", "--max-restarts", "1"]),
        Duration::from_secs(30),
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("rank 1 exited with status 2"), "{stderr}");
    assert!(stderr.contains("restarting (attempt 1/1)"), "{stderr}");
    for r in 0..2 {
        assert!(dir.path().join(format!("pid.{r}.1")).exists(), "rank {r} was not restarted");
    }
    assert_eq!(read(dir.path(), "prepare.log").lines().count(), 1);

    // Without restarts left, the failure is final.
    let dir = tempfile::tempdir().unwrap();
    let mlm = fake_mlm(dir.path(), r#"if [ "$RANK" = 1 ]; then exit 2; fi; exit 0"#);
    let (out, _) = run_timed(
        launch(dir.path(), &mlm, &["--nproc", "2", "--device", "cpu", "--max-restarts", "1"]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(dir.path().join("pid.1.1").exists() && !dir.path().join("pid.1.2").exists());
}

#[test]
fn sigterm_is_forwarded_to_every_worker() {
    let dir = tempfile::tempdir().unwrap();
    let mlm = fake_mlm(
        dir.path(),
        r#"trap 'echo got TERM > "$dir/term.$RANK"; exit 0' TERM; touch "$dir/ready.$RANK"; while true; do sleep 0.05; done"#,
    );
    let child = launch(dir.path(), &mlm, &["--nproc", "2", "--device", "cpu"]).spawn().unwrap();
    // Each worker has set its trap.
    assert!(wait_for(|| (0..2).all(|r| dir.path().join(format!("ready.{r}")).exists()), Duration::from_secs(10)));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait_limit(child, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(128 + 15), "{}", text(&out.stderr));
    for r in 0..2 {
        assert_eq!(read(dir.path(), &format!("term.{r}")), "got TERM\n");
    }
}

#[test]
fn sigkilled_launcher_leaves_no_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let mlm = fake_mlm(dir.path(), "sleep 60");
    let mut child = launch(dir.path(), &mlm, &["--nproc", "2", "--device", "cpu"]).spawn().unwrap();
    assert!(wait_for(|| (0..2).all(|r| dir.path().join(format!("env.{r}.0")).exists()), Duration::from_secs(10)));
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    for r in 0..2 {
        let pid = read(dir.path(), &format!("pid.{r}.0"));
        assert!(wait_for(|| is_dead(&pid), Duration::from_secs(5)), "rank {r} (pid {pid}) outlived the launcher");
    }
}

#[test]
fn missing_mlm_binary_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = run_timed(
        launch(dir.path(), &dir.path().join("nope"), &["--nproc", "2", "--device", "cpu"]),
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cannot start"), "{}", text(&out.stderr));
}

#[test]
fn a_signal_during_the_prepare_step_exits_with_its_number() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "#!/bin/bash\nif [ \"$1\" = prepare ]; then touch {:?}/preparing; while true; do sleep 0.05; done; fi\nexit 0\n",
        dir.path()
    );
    let mlm = dir.path().join("mlm");
    std::fs::write(&mlm, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&mlm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let child = launch(dir.path(), &mlm, &["--nproc", "2", "--device", "cpu"]).spawn().unwrap();
    assert!(wait_for(|| dir.path().join("preparing").exists(), Duration::from_secs(10)));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait_limit(child, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(128 + 15), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("while preparing the data"), "{}", text(&out.stderr));
}

#[test]
fn workers_that_save_on_sigusr1_make_the_launcher_exit_with_the_requeue_status() {
    // Each worker saves on SIGUSR1 (here: writes a file) and exits 75, as
    // `mlm train` does with checkpoint.save_signals.
    let dir = tempfile::tempdir().unwrap();
    let mlm = fake_mlm(
        dir.path(),
        r#"trap 'echo saved > "$dir/saved.$RANK"; exit 75' USR1; touch "$dir/ready.$RANK"; while true; do sleep 0.05; done"#,
    );
    let child = launch(dir.path(), &mlm, &["--nproc", "2", "--device", "cpu"]).spawn().unwrap();
    assert!(wait_for(|| (0..2).all(|r| dir.path().join(format!("ready.{r}")).exists()), Duration::from_secs(10)));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let out = wait_limit(child, Duration::from_secs(30));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("saved a checkpoint on signal 10"), "{stderr}");
    for r in 0..2 {
        assert_eq!(read(dir.path(), &format!("saved.{r}")), "saved\n");
    }
}

#[test]
fn a_worker_that_does_not_answer_a_save_signal_is_killed_after_the_save_timeout() {
    // Rank 0 saves and exits 75; rank 1 ignores SIGUSR1 and would run forever.
    let dir = tempfile::tempdir().unwrap();
    let mlm = fake_mlm(
        dir.path(),
        r#"if [ "$RANK" = 0 ]; then trap 'exit 75' USR1; else trap '' USR1; fi; touch "$dir/ready.$RANK"; while true; do sleep 0.05; done"#,
    );
    let child = launch(dir.path(), &mlm, &["--nproc", "2", "--device", "cpu", "--save-timeout", "1"]).spawn().unwrap();
    assert!(wait_for(|| (0..2).all(|r| dir.path().join(format!("ready.{r}")).exists()), Duration::from_secs(10)));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let out = wait_limit(child, Duration::from_secs(30));
    let stderr = text(&out.stderr);
    // Not every worker saved and stopped: no requeue status, the signal's.
    assert_eq!(out.status.code(), Some(128 + libc::SIGUSR1), "{stderr}");
    assert!(stderr.contains("rank 1 did not stop within 1s; killing it"), "{stderr}");
    assert!(is_dead(&read(dir.path(), "pid.1.0")));
}
