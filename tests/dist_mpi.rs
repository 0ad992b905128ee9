//! The MPI backend under a real `mpirun -np 2` (skipped when mpirun is absent).
use std::process::Command;

const CHECK: &str = env!("CARGO_BIN_EXE_mlm-comm-check");

fn mpirun(np: usize, args: &[&str]) -> Option<std::process::Output> {
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("mpirun not found: skipping");
        return None;
    }
    let out = Command::new("mpirun")
        .args(["-np", &np.to_string(), "--oversubscribe"])
        .arg(CHECK)
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // Containers often forbid the cross-memory-attach single copy.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OMP_NUM_THREADS", "1")
        .env_remove("WORLD_SIZE")
        .env_remove("MLM_MASTER_PORT")
        .output()
        .unwrap();
    Some(out)
}

#[test]
fn comm_check_passes_under_mpirun() {
    for dtype in ["f32", "bf16"] {
        let Some(out) = mpirun(2, &["--elems", "100003", "--dtype", dtype, "--iters", "2"]) else { return };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        let lines: Vec<serde_json::Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        assert_eq!(lines.len(), 2, "{stdout}");
        let mut ranks: Vec<u64> = lines.iter().map(|v| v["rank"].as_u64().unwrap()).collect();
        ranks.sort();
        assert_eq!(ranks, vec![0, 1]);
        for v in &lines {
            assert_eq!(v["backend"], "mpi", "{v}");
            assert_eq!(v["world_size"], 2);
            assert_eq!(v["exact_sum"], true, "{v}");
            assert_eq!(v["exact_overlapped_sum"], true, "{v}");
            assert_eq!(v["identical_on_all_ranks"], true, "{v}");
            assert_eq!(v["broadcast"], true, "{v}");
        }
        assert_eq!(lines[0]["result_hash"], lines[1]["result_hash"]);
    }
}

#[test]
fn tcp_backend_can_be_forced_under_mpirun_too() {
    // Under mpirun `auto` picks mpi; an explicit tcp needs the launcher's variables.
    let Some(out) = mpirun(2, &["--backend", "tcp", "--elems", "10"]) else { return };
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MLM_MASTER_PORT"), "{stderr}");
}

#[test]
fn a_stopped_rank_ends_the_mpi_job_within_the_timeout() {
    let start = std::time::Instant::now();
    let Some(out) = mpirun(2, &["--elems", "1000", "--timeout", "3", "--stop-rank", "1"]) else { return };
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(took < std::time::Duration::from_secs(30), "took {took:?}: {stderr}");
    assert!(stderr.contains("rank 0: MPI all-reduce of 1000 Float"), "{stderr}");
    assert!(stderr.contains("did not finish within 3 s (distributed.timeout_s)"), "{stderr}");
}
