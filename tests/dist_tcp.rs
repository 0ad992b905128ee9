//! The tcp backend across real processes: `mlm-comm-check` workers started the
//! way mlm-launch starts them (RANK, WORLD_SIZE, MLM_MASTER_PORT, MLM_JOB_TOKEN).
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CHECK: &str = env!("CARGO_BIN_EXE_mlm-comm-check");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn_ranks(world: usize, args: &[&str]) -> Vec<Child> {
    let port = free_port().to_string();
    (0..world)
        .map(|rank| {
            Command::new(CHECK)
                .args(args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MLM_MASTER_ADDR", "127.0.0.1")
                .env("MLM_MASTER_PORT", &port)
                .env("MLM_JOB_TOKEN", "dist-tcp-test")
                .env("OMP_NUM_THREADS", "1")
                // ranks other than 0 log warnings only by default; this test
                // waits for every rank's info line
                .env("RUST_LOG", "info")
                .env_remove("OMPI_COMM_WORLD_SIZE")
                .env_remove("PMI_SIZE")
                .env_remove("SLURM_NTASKS")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[test]
fn comm_check_passes_over_tcp_in_three_processes() {
    for dtype in ["f32", "bf16"] {
        let children = spawn_ranks(3, &["--elems", "100003", "--dtype", dtype, "--iters", "2", "--timeout", "30"]);
        let mut hashes = Vec::new();
        for (rank, c) in children.into_iter().enumerate() {
            let out = c.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "rank {rank}: {stderr}");
            let lines = json_lines(&out.stdout);
            assert_eq!(lines.len(), 1, "{lines:?}");
            let v = &lines[0];
            assert_eq!(v["backend"], "tcp");
            assert_eq!(v["rank"], rank);
            assert_eq!(v["world_size"], 3);
            assert_eq!(v["exact_sum"], true);
            assert_eq!(v["exact_overlapped_sum"], true);
            assert_eq!(v["identical_on_all_ranks"], true);
            hashes.push(v["result_hash"].as_str().unwrap().to_string());
        }
        assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    }
}

#[test]
fn killed_process_makes_the_others_fail_naming_it() {
    let timeout = 10;
    let mut children = spawn_ranks(3, &["--elems", "1000", "--iters", "100000000", "--timeout", "60"]);
    // If an assertion fails below, no endless rank may outlive the test.
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let _reaper = Reaper(pids);
    // Collect stderr as it comes; the ring is up once every rank logged its backend.
    let logs: Vec<Arc<Mutex<String>>> = children
        .iter_mut()
        .map(|c| {
            let log = Arc::new(Mutex::new(String::new()));
            let (mut from, to) = (c.stderr.take().unwrap(), log.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    to.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
            log
        })
        .collect();
    let start = Instant::now();
    while !logs.iter().all(|l| l.lock().unwrap().contains("world_size=3")) {
        assert!(start.elapsed() < Duration::from_secs(60), "the ring did not form");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    children[1].kill().unwrap();
    let start = Instant::now();
    for (rank, c) in children.into_iter().enumerate() {
        if rank == 1 {
            continue;
        }
        let mut c = c;
        let status = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break st;
            }
            assert!(start.elapsed() < Duration::from_secs(timeout), "rank {rank} hangs");
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(100));
        let stderr = logs[rank].lock().unwrap().clone();
        assert!(!status.success());
        assert!(stderr.contains(&format!("rank {rank}:")) && stderr.contains("rank 1"), "rank {rank}: {stderr}");
    }
}

#[test]
fn missing_rendezvous_port_names_the_variable() {
    let out = Command::new(CHECK)
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env_remove("MLM_MASTER_PORT")
        .env_remove("OMPI_COMM_WORLD_SIZE")
        .env_remove("PMI_SIZE")
        .env_remove("SLURM_NTASKS")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("rank 1") && stderr.contains("MLM_MASTER_PORT"), "{stderr}");
}

#[test]
fn nccl_on_cpu_or_without_library_fails_clearly() {
    let out = Command::new(CHECK).args(["--backend", "nccl"]).env_remove("WORLD_SIZE").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("needs a CUDA device"), "{stderr}");
}

/// SIGKILLs the given processes when dropped (on success they are gone already).
struct Reaper(Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).stderr(Stdio::null()).status();
        }
    }
}

#[test]
fn a_stopped_rank_makes_the_others_fail_within_the_timeout() {
    let start = Instant::now();
    let mut ranks = spawn_ranks(2, &["--elems", "1000", "--timeout", "3", "--stop-rank", "1"]);
    let stopped = ranks.pop().unwrap();
    let out = ranks.pop().unwrap().wait_with_output().unwrap();
    let took = start.elapsed();
    // SAFETY: kill only signals the stopped child, which is then reaped.
    unsafe { libc::kill(stopped.id() as i32, libc::SIGKILL) };
    let _ = stopped.wait_with_output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(took < Duration::from_secs(20), "took {took:?}: {stderr}");
    assert!(stderr.contains("rank 0:") && stderr.contains("rank 1"), "{stderr}");
    assert!(stderr.contains("during an all-reduce of 1000 Float"), "{stderr}");
    assert!(stderr.contains("3 s (distributed.timeout_s)"), "{stderr}");
}
