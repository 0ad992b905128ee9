//! The Slurm batch scripts of `docs/cluster.md`, run as written: a one-node Slurm
//! on this machine (`scripts/slurm/start-local.sh`: munged, slurmctld, slurmd),
//! each CPU script submitted with `sbatch --wait` for 2 tasks that train to the
//! end and write the best checkpoint: plain `srun` joins them over tcp from the
//! `SLURM_*` variables, `srun --mpi=pmix` into one MPI job.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use crate::common::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The `sh` block that follows `<!-- sbatch: NAME -->` in `docs/cluster.md`.
fn docs_script(name: &str) -> String {
    let doc = std::fs::read_to_string(repo().join("docs/cluster.md")).unwrap();
    let marker = format!("<!-- sbatch: {name} -->\n```sh\n");
    let start =
        doc.find(&marker).unwrap_or_else(|| panic!("docs/cluster.md has no `{}`", marker.trim())) + marker.len();
    let len = doc[start..].find("\n```").expect("unterminated sh block in docs/cluster.md");
    format!("{}\n", &doc[start..start + len])
}

fn installed(bin: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {bin}")]).output().is_ok_and(|o| o.status.success())
}

/// A local Slurm, stopped (jobs cancelled, daemons ended) when dropped.
struct LocalSlurm {
    state: tempfile::TempDir,
}

impl LocalSlurm {
    fn start() -> Self {
        let state = tempfile::tempdir().unwrap();
        // Free ports, so that a second test run or a system Slurm can coexist.
        let listeners: Vec<_> = (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let ports: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().port().to_string()).collect();
        drop(listeners);
        let out = run(Command::new(repo().join("scripts/slurm/start-local.sh"))
            .arg(state.path())
            .env("MLM_SLURM_CTLD_PORT", &ports[0])
            .env("MLM_SLURM_SLURMD_PORT", &ports[1]));
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        assert!(out.status.success(), "scripts/slurm/start-local.sh failed (logs above)");
        Self { state }
    }

    fn conf(&self) -> PathBuf {
        self.state.path().join("slurm.conf")
    }

    fn logs(&self) -> String {
        ["slurmctld.log", "slurmd.log"]
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(self.state.path().join("log").join(f)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
                format!("--- {f}:\n{}\n", tail.join("\n"))
            })
            .collect()
    }
}

impl Drop for LocalSlurm {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/slurm/stop-local.sh")).arg(self.state.path()).status();
    }
}

/// The tiny job, `steps` steps without dropout, evaluated (and `best/` written)
/// at its last step.
fn job(dir: &Path, steps: usize) -> PathBuf {
    let cfg = write_job(dir, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_steps = 30", &format!("max_steps = {steps}"))
        .replace("[eval]\n", &format!("[eval]\nat_start = false\nevery_steps = {steps}\n"));
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// Every batch script of the docs.
const SCRIPTS: [&str; 6] = ["gpu", "gpu-launch", "gpu-mpi", "gpu-requeue", "cpu", "cpu-mpi"];

/// One local Slurm at a time: each node claims every core of this machine.
static SLURM: Mutex<()> = Mutex::new(());

/// Submits the docs' script `name` (its `--job-name` is `job_name`) for the
/// tiny job with `sbatch --wait`, `env` added to the job's environment;
/// returns the job's log and its directory.
fn submit(slurm: &LocalSlurm, name: &str, job_name: &str, env: &[(&str, &str)]) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), 10);
    let script = dir.path().join(format!("{name}.sbatch"));
    std::fs::write(&script, docs_script(name)).unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_mlm")).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());

    let t0 = Instant::now();
    // --time caps a hung job (Slurm kills it), so `--wait` cannot wait forever.
    let out = run(Command::new("sbatch")
        .args(["--parsable", "--wait", "--time=4"])
        .arg(&script)
        .arg(&cfg)
        .current_dir(dir.path())
        .env("SLURM_CONF", slurm.conf())
        .env("PATH", path)
        .envs(env.iter().copied()));
    let job_id = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or("").to_string();
    let log_file = dir.path().join(format!("{job_name}-{job_id}.out"));
    let log = std::fs::read_to_string(&log_file).unwrap_or_default();
    eprintln!("--- {} ({:.1}s):\n{log}", log_file.display(), t0.elapsed().as_secs_f64());
    assert!(out.status.success(), "the batch job failed ({:?})\n{}", out.status, slurm.logs());
    (log, dir)
}

/// The lines task `task` printed (`srun --label` prefixes them with its id).
fn task_lines(log: &str, task: usize) -> Vec<&str> {
    let prefix = format!("{task}: ");
    log.lines().filter(|l| l.trim_start().starts_with(&prefix)).collect()
}

#[test]
fn docs_cpu_batch_script_trains_two_tcp_ranks_under_slurm_without_mpi() {
    if !installed("slurmctld") {
        eprintln!("SKIPPED: slurmctld is not installed (`make setup-test` installs slurmctld slurmd slurm-client munge where it may)");
        return;
    }
    // All batch scripts of the docs are at least valid bash.
    for name in SCRIPTS {
        let ok = Command::new("bash").args(["-n", "-c", &docs_script(name)]).status().unwrap().success();
        assert!(ok, "the {name} batch script of docs/cluster.md does not parse");
    }
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    let slurm = LocalSlurm::start();

    // Our reading of host lists agrees with Slurm's own.
    for list in ["node[01-03,07],gpu5", "n[1-2]r[3-4],a", "x[8-10]", "x[008-10]", "n[1-2][3-4]", " a , b", "vm"] {
        let out = Command::new("scontrol")
            .args(["show", "hostnames", list])
            .env("SLURM_CONF", slurm.conf())
            .output()
            .unwrap();
        let slurms: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
        let ours: Vec<String> = mlm::distributed::slurm::HostList::parse(list).unwrap().hosts().collect();
        assert_eq!(ours, slurms, "host list {list:?}");
    }

    // No MPI at all: a job that tried to load it would fail. RUST_LOG: every
    // rank logs how it joined (by default only rank 0 logs below warnings).
    let env = [("MLM_MPI_LIB", "/nonexistent/libmpi.so"), ("RUST_LOG", "info")];
    let (log, dir) = submit(&slurm, "cpu", "mlm-cpu", &env);
    for task in 0..2 {
        let lines = task_lines(&log, task);
        assert!(
            lines.iter().any(|l| l.contains("world_size=2") && l.contains("backend=\"tcp\"")),
            "task {task} did not join a 2-rank tcp job"
        );
    }
    assert!(log.contains("slurm: tasks meet over tcp"), "rank 0 did not say where the tasks meet");
    assert!(!log.contains("backend=\"mpi\""), "an mpi backend under plain srun");
    assert!(dir.path().join("out/best/model.safetensors").is_file(), "no best checkpoint");
    drop(slurm);
}

#[test]
fn docs_cpu_batch_script_trains_two_mpi_ranks_under_slurm() {
    if !installed("slurmctld") {
        eprintln!("SKIPPED: slurmctld is not installed (`make setup-test` installs slurmctld slurmd slurm-client munge where it may)");
        return;
    }
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    let slurm = LocalSlurm::start();
    let (log, dir) = submit(&slurm, "cpu-mpi", "mlm-cpu-mpi", &[]);
    // Both ranks ran and joined one 2-rank MPI job.
    assert!(log.contains("world_size=2") && log.contains("backend=\"mpi\""), "no 2-rank mpi job in the output");
    assert!(!task_lines(&log, 1).is_empty(), "rank 1 printed nothing");
    assert!(dir.path().join("out/best/model.safetensors").is_file(), "no best checkpoint");
    drop(slurm);
}
