//! Two "nodes" on loopback: two `mlm-launch --nnodes 2 --node-rank {0,1}`
//! processes, one CPU worker each, train the run of one process with twice the
//! batch; a worker killed on node 1 stops node 0 naming node and rank, and with
//! `--max-restarts 1` both nodes restart and finish the uninterrupted run.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::*;

const STEPS: usize = 20;

/// A tiny fp32 job without dropout and without a first evaluation.
fn job(dir: &Path) -> PathBuf {
    comparable_job(dir, STEPS)
}

const SETS: [&str; 6] =
    ["--set", "training.log_every=1", "--set", "checkpoint.every_steps=4", "--set", "training.batch_size=8"];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One node's launcher, 1 CPU worker, rendezvous on `port`.
fn node(cfg: &Path, node_rank: usize, port: u16, extra: &[&str]) -> Running {
    spawn(
        Command::new(launcher())
            .args(["--nnodes", "2", "--node-rank", &node_rank.to_string(), "--nproc", "1", "--device", "cpu"])
            .args(["--master-addr", "127.0.0.1", "--master-port", &port.to_string(), "--mlm"])
            .arg(env!("CARGO_BIN_EXE_mlm"))
            .args(extra)
            .arg(cfg)
            .args(SETS),
    )
}

/// The per-step losses of one process with the summed batch (16), run once
/// for the tests of this file.
fn single_process_losses() -> &'static BTreeMap<u64, f64> {
    static LOSSES: OnceLock<BTreeMap<u64, f64>> = OnceLock::new();
    LOSSES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = job(dir.path());
        let out = run(mlm().arg("train").arg(&cfg).args(SETS).args(["--set", "training.batch_size=16"]));
        assert!(out.status.success());
        let l = losses(&dir.path().join("out"));
        assert_eq!(l.len(), STEPS, "one loss per step expected: {l:?}");
        l
    })
}

fn assert_close(want: &BTreeMap<u64, f64>, got: &BTreeMap<u64, f64>, what: &str) {
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>(), "{what}: steps differ");
    let worst = want.iter().map(|(s, w)| ((got[s] - w) / w).abs()).fold(0.0, f64::max);
    eprintln!("{what}: largest relative loss difference over {} steps {worst:.2e}", want.len());
    assert!(worst < 1e-5, "{what}: {worst:.2e}\nwant {want:?}\ngot {got:?}");
}

/// The pid of the `mlm train` worker of a launcher.
fn worker_of(launcher_pid: u32) -> Option<u32> {
    let out = Command::new("pgrep").args(["-P", &launcher_pid.to_string(), "-f", "mlm train"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| l.trim().parse().ok())
}

#[test]
fn two_nodes_on_loopback_equal_one_process_with_twice_the_batch() {
    let want = single_process_losses();
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path());
    let port = free_port();
    // Node 1 may start first: its worker waits at the rendezvous for node 0.
    let mut n1 = node(&cfg, 1, port, &[]);
    n1.wait_for_stderr("node 1: starting 1 CPU worker(s)", Duration::from_secs(120));
    let n0 = node(&cfg, 0, port, &[]);
    let (o0, o1) = (n0.wait(Duration::from_secs(300), "node 0"), n1.wait(Duration::from_secs(300), "node 1"));
    let (e0, e1) = (String::from_utf8_lossy(&o0.stderr), String::from_utf8_lossy(&o1.stderr));
    assert!(o0.status.success() && o1.status.success(), "node 0:\n{e0}\nnode 1:\n{e1}");
    assert!(e0.contains("node 0: starting 1 CPU worker(s), rank 0 of 2"), "{e0}");
    assert!(e1.contains("node 1: starting 1 CPU worker(s), rank 1 of 2"), "{e1}");
    assert!(e1.contains("node 0 prepares the data"), "{e1}");
    assert_close(want, &losses(&dir.path().join("out")), "mlm-launch --nnodes 2");
}

#[test]
fn a_node_with_another_nproc_is_refused_by_name_and_every_node_stops() {
    // Node 1 starts 2 workers where node 0 counts 1 per node (world 4 against
    // 2), with the default job token. Rank 0 refuses it naming the mismatch,
    // and both nodes stop at once rather than after distributed.timeout_s.
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path());
    let port = free_port().to_string();
    let start = |node_rank: &str, nproc: &str| {
        spawn(
            Command::new(launcher())
                .args(["--nnodes", "2", "--node-rank", node_rank, "--nproc", nproc, "--device", "cpu"])
                .args(["--master-addr", "127.0.0.1", "--master-port", &port, "--mlm"])
                .arg(env!("CARGO_BIN_EXE_mlm"))
                .arg(&cfg)
                .args(SETS)
                .args(["--set", "distributed.timeout_s=600"])
                .env_remove("MLM_JOB_TOKEN"),
        )
    };
    let n1 = start("1", "2");
    let n0 = start("0", "1");
    let o0 = n0.wait(Duration::from_secs(300), "node 0 (it must not wait for the rendezvous timeout)");
    let o1 = n1.wait(Duration::from_secs(300), "node 1 (it must not wait for the rendezvous timeout)");
    let (e0, e1) = (String::from_utf8_lossy(&o0.stderr), String::from_utf8_lossy(&o1.stderr));
    assert!(!o0.status.success() && !o1.status.success(), "both nodes must fail:\n{e0}\n{e1}");
    let headline = e0.lines().find(|l| l.starts_with("mlm-launch: error:")).unwrap_or_else(|| panic!("{e0}"));
    assert!(headline.contains("says WORLD_SIZE=4 but rank 0 has 2") && headline.contains("--nproc"), "{headline}");
    // Node 1's refused worker says why (its sibling may stop first, seeing rank 0 gone).
    assert!(e1.contains("rank 0 refused to join: rank") && e1.contains("says WORLD_SIZE=4 but rank 0 has 2"), "{e1}");
    assert!(!e0.contains("another job") && !e1.contains("another job"), "{e0}\n{e1}");
}

#[test]
fn a_worker_killed_on_node_1_stops_node_0_and_restarts_resume_on_both() {
    // Without restarts: node 0 stops long before the timeout, naming node 1 and rank 1.
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path());
    let port = free_port();
    let n0 = node(&cfg, 0, port, &[]);
    let n1 = node(&cfg, 1, port, &[]);
    wait_for_step(&dir.path().join("out"), 6, Duration::from_secs(180));
    let victim = worker_of(n1.id()).expect("node 1's worker");
    let killed = Instant::now();
    Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap();
    let o0 = n0.wait(Duration::from_secs(60), "node 0");
    let secs = killed.elapsed().as_secs_f64();
    let o1 = n1.wait(Duration::from_secs(60), "node 1");
    let (e0, e1) = (String::from_utf8_lossy(&o0.stderr), String::from_utf8_lossy(&o1.stderr));
    assert!(!o0.status.success() && !o1.status.success(), "both nodes must fail:\n{e0}\n{e1}");
    eprintln!("node 0 stopped {secs:.2} s after the kill");
    // Far below distributed.timeout_s (300 s): node 1's failure reached node 0,
    // not a timeout; the margin is for a loaded machine.
    assert!(secs < 60.0, "node 0 took {secs:.1} s to stop");
    let headline = e0.lines().find(|l| l.starts_with("mlm-launch: error:")).unwrap_or_else(|| panic!("{e0}"));
    assert!(headline.contains("rank 1 (node 1)"), "node 0 must name node 1 and rank 1: {headline}");
    let headline = e1.lines().find(|l| l.starts_with("mlm-launch: error:")).unwrap_or_else(|| panic!("{e1}"));
    assert!(headline.contains("node 1: rank 1 was killed by signal 9"), "{headline}");

    // With one restart on each node: both restart and the job finishes with
    // the losses of one process with the summed batch.
    let want = single_process_losses();
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path());
    let port = free_port();
    let n0 = node(&cfg, 0, port, &["--max-restarts", "1"]);
    let n1 = node(&cfg, 1, port, &["--max-restarts", "1"]);
    let out = dir.path().join("out");
    wait_for_step(&out, 10, Duration::from_secs(180));
    let victim = worker_of(n1.id()).expect("node 1's worker");
    Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap();
    let (o0, o1) = (n0.wait(Duration::from_secs(300), "node 0"), n1.wait(Duration::from_secs(300), "node 1"));
    let (e0, e1) = (String::from_utf8_lossy(&o0.stderr), String::from_utf8_lossy(&o1.stderr));
    assert!(o0.status.success() && o1.status.success(), "node 0:\n{e0}\nnode 1:\n{e1}");
    assert!(e0.contains("restarting (attempt 1/1)") && e1.contains("restarting (attempt 1/1)"), "{e0}\n{e1}");
    assert_close(want, &losses(&out), "restarted on both nodes");
}

/// torch's variables of a process, without any of mlm's (as a Kubernetes
/// operator starts a container).
fn torch_env(cmd: &mut Command, vars: &[(&str, String)]) {
    for k in ["MLM_MASTER_ADDR", "MLM_MASTER_PORT", "MLM_JOB_TOKEN", "RANK", "WORLD_SIZE", "LOCAL_RANK"] {
        cmd.env_remove(k);
    }
    cmd.envs(vars.iter().map(|(k, v)| (*k, v.as_str())));
}

/// One process per GPU (here per CPU worker), started by the environment
/// alone as a PyTorchJob with one process per pod starts it: `MASTER_ADDR`,
/// `MASTER_PORT`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`.
#[test]
fn a_process_per_worker_started_by_torch_variables_equals_one_process() {
    let want = single_process_losses();
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path());
    let port = free_port().to_string();
    let workers: Vec<Running> = (0..2)
        .map(|rank| {
            let mut cmd = mlm();
            cmd.arg("train").arg(&cfg).args(SETS).args(["--set", "training.device=cpu"]);
            let vars = [
                ("MASTER_ADDR", "127.0.0.1".to_string()),
                ("MASTER_PORT", port.clone()),
                ("RANK", rank.to_string()),
                ("WORLD_SIZE", "2".to_string()),
                ("LOCAL_RANK", rank.to_string()),
                ("LOCAL_WORLD_SIZE", "2".to_string()),
            ];
            torch_env(&mut cmd, &vars);
            spawn(&mut cmd)
        })
        .collect();
    for (rank, w) in workers.into_iter().enumerate() {
        let o = w.wait(Duration::from_secs(300), &format!("rank {rank}"));
        assert!(o.status.success(), "rank {rank}:\n{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_close(want, &losses(&dir.path().join("out")), "2 processes from torch's variables");
}

/// One pod per node with a launcher inside, as Kubeflow starts it: node 0's
/// pod is described by `PET_NNODES`/`PET_NODE_RANK`/`PET_NPROC_PER_NODE`
/// (TrainJob), node 1's by `RANK`/`WORLD_SIZE` counting pods (PyTorchJob);
/// `mlm-launch` reads them as its flags, with no flag given.
#[test]
fn pods_started_by_torch_variables_run_mlm_launch_as_nodes() {
    let want = single_process_losses();
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path());
    let port = free_port().to_string();
    let pod = |vars: &[(&str, String)]| {
        let mut cmd = Command::new(launcher());
        cmd.arg(&cfg).args(SETS);
        let rdv = [("MASTER_ADDR", "127.0.0.1".to_string()), ("MASTER_PORT", port.clone())];
        torch_env(&mut cmd, &[rdv.as_slice(), vars].concat());
        spawn(&mut cmd)
    };
    let n0 = pod(&[
        ("PET_NNODES", "2".into()),
        ("PET_NODE_RANK", "0".into()),
        ("PET_NPROC_PER_NODE", "1".into()),
        // A process count in WORLD_SIZE must not count as nodes beside PET_*.
        ("WORLD_SIZE", "2".into()),
        ("RANK", "0".into()),
    ]);
    let n1 = pod(&[("WORLD_SIZE", "2".into()), ("RANK", "1".into())]);
    let (o0, o1) = (n0.wait(Duration::from_secs(300), "pod 0"), n1.wait(Duration::from_secs(300), "pod 1"));
    let (e0, e1) = (String::from_utf8_lossy(&o0.stderr), String::from_utf8_lossy(&o1.stderr));
    assert!(o0.status.success() && o1.status.success(), "pod 0:\n{e0}\npod 1:\n{e1}");
    assert!(e0.contains("--nnodes 2 (PET_NNODES)") && e0.contains("--nproc 1 (PET_NPROC_PER_NODE)"), "{e0}");
    assert!(e1.contains("--nnodes 2 (WORLD_SIZE)") && e1.contains("--node-rank 1 (RANK)"), "{e1}");
    assert!(e1.contains("node 1: starting 1 CPU worker(s), rank 1 of 2"), "{e1}");
    assert_close(want, &losses(&dir.path().join("out")), "2 pods from torch's variables");
}

/// Two network namespaces joined by a veth pair, each a "host" with its own
/// address (192.0.2.1 and 192.0.2.2, TEST-NET-1: nothing outside them sees
/// them), and a host name for node 0 in each one's `/etc/hosts`
/// (`ip netns exec` mounts `/etc/netns/<name>/hosts` over it). Removed on drop.
struct TwoHosts {
    ns: [String; 2],
}

impl TwoHosts {
    const NODE0: &'static str = "192.0.2.1";
    const NODE0_NAME: &'static str = "mlm-node0.test";

    /// `None` (with the reason) where namespaces cannot be made: not root, no `ip`.
    fn new() -> Result<Self, String> {
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}{n}", std::process::id() % 100_000);
        let hosts = TwoHosts { ns: [format!("mlm-{id}-a"), format!("mlm-{id}-b")] };
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
            }
        };
        let (a, b) = (&hosts.ns[0], &hosts.ns[1]);
        let (va, vb) = (format!("mv{id}a"), format!("mv{id}b"));
        ip(&["netns", "add", a])?;
        ip(&["netns", "add", b])?;
        ip(&["link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns", b])?;
        for (ns, dev, addr) in [(a, &va, Self::NODE0), (b, &vb, "192.0.2.2")] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            let etc = Path::new("/etc/netns").join(ns);
            std::fs::create_dir_all(&etc).map_err(|e| format!("{}: {e}", etc.display()))?;
            let line = format!("127.0.0.1 localhost\n{} {}\n", Self::NODE0, Self::NODE0_NAME);
            std::fs::write(etc.join("hosts"), line).map_err(|e| format!("{}: {e}", etc.display()))?;
        }
        Ok(hosts)
    }

    /// `mlm-launch` as node `rank` (1 CPU worker) inside its namespace.
    fn node(&self, rank: usize, cfg: &Path, master: &str, port: u16) -> Running {
        spawn(
            Command::new("ip")
                .args(["netns", "exec", &self.ns[rank]])
                .arg(launcher())
                .args(["--nnodes", "2", "--node-rank", &rank.to_string(), "--nproc", "1", "--device", "cpu"])
                .args(["--master-addr", master, "--master-port", &port.to_string()])
                .arg(cfg)
                .args(SETS),
        )
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
    }
}

/// Two nodes on two hosts, not one loopback: each node in its own network
/// namespace with its own address, `--master-addr` node 0's address as node 1
/// reaches it, then node 0's host name; both equal one process with the
/// summed batch. Skipped, saying why, where namespaces cannot be made.
#[test]
fn two_nodes_in_two_network_namespaces_equal_one_process() {
    let hosts = match TwoHosts::new() {
        Ok(h) => h,
        Err(why) => {
            eprintln!("SKIPPED two_nodes_in_two_network_namespaces: cannot make network namespaces here ({why})");
            return;
        }
    };
    let want = single_process_losses();
    for master in [TwoHosts::NODE0, TwoHosts::NODE0_NAME] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = job(dir.path());
        // Any port: nothing else lives in these namespaces.
        let n1 = hosts.node(1, &cfg, master, 29500);
        let n0 = hosts.node(0, &cfg, master, 29500);
        let (o0, o1) = (n0.wait(Duration::from_secs(300), "node 0"), n1.wait(Duration::from_secs(300), "node 1"));
        let (e0, e1) = (String::from_utf8_lossy(&o0.stderr), String::from_utf8_lossy(&o1.stderr));
        assert!(o0.status.success() && o1.status.success(), "--master-addr {master}\nnode 0:\n{e0}\nnode 1:\n{e1}");
        assert!(e1.contains(&format!("rendezvous {master}:29500")), "{e1}");
        assert_close(want, &losses(&dir.path().join("out")), &format!("two hosts, --master-addr {master}"));
    }
}
