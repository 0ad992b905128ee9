//! MPI is loaded at run time: the binaries do not link it, `MLM_MPI_LIB` picks
//! the library a job uses, and a library that cannot be loaded stops every rank
//! with its name (under a real `mpirun -np 2`; skipped when mpirun is absent).
use std::process::{Command, Output};

const MLM: &str = env!("CARGO_BIN_EXE_mlm");
const CHECK: &str = env!("CARGO_BIN_EXE_mlm-comm-check");

/// `mpirun -np 2 mlm-comm-check ARGS` with `MLM_MPI_LIB=lib`.
fn comm_check_under_mpirun(lib: &str, args: &[&str]) -> Option<Output> {
    if Command::new("mpirun").arg("--version").output().is_err() {
        eprintln!("mpirun not found: skipping");
        return None;
    }
    let out = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe"])
        .arg(CHECK)
        .args(args)
        .env("MLM_MPI_LIB", lib)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OMP_NUM_THREADS", "1")
        .env_remove("WORLD_SIZE")
        .env_remove("MLM_MASTER_PORT")
        .output()
        .unwrap();
    Some(out)
}

#[test]
fn binaries_do_not_link_mpi() {
    for bin in [MLM, CHECK] {
        let Ok(out) = Command::new("ldd").arg(bin).output() else {
            return eprintln!("ldd not found: skipping");
        };
        let libs = String::from_utf8_lossy(&out.stdout);
        let mpi: Vec<&str> = libs
            .lines()
            .filter(|l| ["libmpi", "libopen-rte", "libopen-pal", "libhwloc", "libevent"].iter().any(|m| l.contains(m)))
            .collect();
        assert!(mpi.is_empty(), "{bin} links MPI at load time:\n{}", mpi.join("\n"));
    }
}

#[test]
fn mlm_mpi_lib_chooses_the_library_of_the_job() {
    let Ok((path, version)) = mlm::distributed::mpi::library_info() else {
        return eprintln!("no MPI library found: skipping");
    };
    eprintln!("MPI: {path}: {version}");
    let Some(out) = comm_check_under_mpirun(&path, &["--elems", "1000", "--iters", "1"]) else { return };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().filter(|l| l.contains("\"backend\":\"mpi\"") && l.contains("\"ok\":true")).count(), 2);
}

#[test]
fn unloadable_mlm_mpi_lib_stops_every_rank_naming_it() {
    let lib = "/nonexistent/mlm-test/libmpi.so.40";
    let Some(out) = comm_check_under_mpirun(lib, &["--elems", "10"]) else { return };
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for rank in [0, 1] {
        assert!(stderr.contains(&format!("rank {rank}: MLM_MPI_LIB={lib} cannot be loaded")), "{stderr}");
    }
    assert!(stderr.contains("distributed.backend = \"tcp\""), "{stderr}");
}
