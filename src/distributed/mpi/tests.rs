//! Finding and loading the MPI library (MPI itself is exercised under a real
//! `mpirun` by `tests/dist_mpi.rs` and `tests/mpi_runtime.rs`).
use std::ffi::{OsStr, OsString};

use super::ffi::{candidates, Library, DEFAULT_NAMES};

fn names(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

#[test]
fn lookup_tries_open_mpi_then_mpich_then_unversioned_unless_mlm_mpi_lib_is_set() {
    assert_eq!(candidates(None), names(&["libmpi.so.40", "libmpi.so.12", "libmpi.so"]));
    assert_eq!(candidates(Some(OsStr::new(""))), names(&DEFAULT_NAMES));
    // An explicit library is the only one tried: falling back to another MPI
    // than the one that started the job would fail later, and less clearly.
    assert_eq!(candidates(Some(OsStr::new("/opt/mpi/lib/libmpi.so"))), names(&["/opt/mpi/lib/libmpi.so"]));
}

#[test]
fn missing_mlm_mpi_lib_is_named_in_the_error() {
    let path = "/nonexistent/mlm-test/libmpi.so.40";
    let e = Library::open_first(&candidates(Some(OsStr::new(path))), true).err().unwrap().to_string();
    assert!(e.contains(&format!("MLM_MPI_LIB={path} cannot be loaded")), "{e}");
    assert!(e.contains("No such file"), "{e}");
    assert!(e.contains("distributed.backend = \"tcp\""), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn no_mpi_found_lists_every_name_tried_and_what_to_do() {
    let tried = names(&["libmlm-no-such-mpi.so.40", "libmlm-no-such-mpi.so.12"]);
    let e = Library::open_first(&tried, false).err().unwrap().to_string();
    assert!(e.contains("tried libmlm-no-such-mpi.so.40, libmlm-no-such-mpi.so.12"), "{e}");
    assert!(e.contains("install Open MPI") && e.contains("MLM_MPI_LIB"), "{e}");
    assert!(e.contains("distributed.backend = \"tcp\""), "{e}");
}

#[test]
fn a_library_that_is_not_mpi_is_refused_by_name() {
    let e = Library::open_first(&names(&["libc.so.6"]), true).err().unwrap().to_string();
    assert!(e.contains("does not export MPI_Init_thread"), "{e}");
    assert!(e.contains("MLM_MPI_LIB=libc.so.6"), "{e}");
}

#[test]
fn installed_mpi_loads_and_reports_its_version_without_init() {
    let lib = match Library::open_first(&candidates(None), false) {
        Ok(lib) => lib,
        Err(e) => return eprintln!("no MPI installed, nothing to check: {e}"),
    };
    assert!(lib.path.starts_with('/'), "the loader's file, not the name tried: {}", lib.path);
    let version = lib.version().unwrap();
    assert!(!version.is_empty() && !version.contains('\0'), "{version:?}");
    if lib.path.contains("libmpi.so.40") {
        assert!(lib.is_open_mpi(), "{}", lib.path);
        assert!(version.contains("Open MPI"), "{version}");
    }
    // Every function and handle resolves; nothing is initialised.
    let mpi = lib.api().unwrap();
    assert!(!mpi.initialized().unwrap());
}
