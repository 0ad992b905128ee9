//! Link-time settings for libtorch, and our C++ shims over it.
//!
//! * An rpath to libtorch's folder, so `mlm`, the tests and installed copies start
//!   without `LD_LIBRARY_PATH`; and a stop when that folder is not the torch of
//!   `$MLM_PYTHON` (scripts/env.sh): torch-sys asks Python once and keeps its
//!   answer after `MLM_VENV` names another environment.
//! * `libtorch_cuda.so` forced in when present: it is linked `--as-needed` and no
//!   symbol of ours names it, so without this `tch::Cuda::is_available()` is false
//!   even on a GPU machine.
//! * Our C++ shims over libtorch (`src/shims/*.cpp`, one header `shims.h`; what
//!   tch does not bind: libtorch's fused AdamW, a bf16 `nn.Linear` through fp32
//!   GEMMs, the float32 matmul precision, pinned host memory), compiled into one
//!   library against the headers beside that folder (`<lib>/../include`, both in
//!   a pip torch and in a libtorch archive; `LIBTORCH_INCLUDE` as torch-sys reads
//!   it otherwise) with torch-sys's C++ ABI setting. `src/shims/mod.rs` binds them.
use std::path::{Path, PathBuf};

#[allow(dead_code)]
mod nccl_abi {
    include!("src/distributed/nccl/abi.rs");
}

/// The C++ shims (src/shims/mod.rs binds them), and their one header.
const SHIMS: [&str; 4] =
    ["src/shims/message.cpp", "src/shims/torch_extras.cpp", "src/shims/linear_f32.cpp", "src/shims/fused_adamw.cpp"];
const SHIMS_HEADER: &str = "src/shims/shims.h";
/// The NCCL bindings' values against the `nccl.h` beside libtorch (src/distributed/nccl/abi.rs).
const NCCL_ABI: &str = "src/distributed/nccl/abi_check.cpp";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for file in SHIMS.into_iter().chain([SHIMS_HEADER]) {
        println!("cargo:rerun-if-changed={file}");
    }
    println!("cargo:rerun-if-changed={NCCL_ABI}");
    println!("cargo:rerun-if-changed=src/distributed/nccl/abi.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=MLM_PYTHON");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let dir = PathBuf::from(dir);
    check_same_torch(&dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    if dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    let include = match std::env::var("LIBTORCH_INCLUDE") {
        Ok(root) => PathBuf::from(root).join("include"),
        Err(_) => dir.join("..").join("include"),
    };
    // torch 2.x wheels and archives are built with the C++11 ABI (torch-sys's default too).
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .opt_level(2)
        .warnings(false)
        .include(&include)
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .files(SHIMS)
        .compile("mlm_shims");
    check_nccl_abi(&dir);
}

/// Stops the build when `torch_lib` (torch-sys's libtorch) is not the torch of
/// `$MLM_PYTHON`: torch-sys runs again only when one of its own variables
/// changes, so after `MLM_VENV`/`MLM_PYTHON` name another environment it would
/// link (and set the rpath to) the torch of the old one, or one since deleted.
fn check_same_torch(torch_lib: &Path) {
    let Ok(python) = std::env::var("MLM_PYTHON") else {
        return;
    };
    // Found, not imported: a CUDA torch takes seconds to import.
    let find = "import importlib.util as u, os; print(os.path.join(u.find_spec('torch').submodule_search_locations[0], 'lib'))";
    let Ok(out) = std::process::Command::new(&python).args(["-c", find]).output() else {
        return;
    };
    if !out.status.success() {
        return;
    }
    let wanted = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    if !same(&wanted, torch_lib) {
        eprintln!(
            "error: tch was built against the libtorch in {} but MLM_PYTHON ({python}) has torch in {}: \
             run `cargo clean -p torch-sys` (with this CARGO_TARGET_DIR) and build again",
            torch_lib.display(),
            wanted.display()
        );
        std::process::exit(1);
    }
}

/// Compiles `NCCL_ABI` (static_asserts only, nothing linked) against pip's
/// `nvidia/nccl/include/nccl.h` beside libtorch, when that header is there (a
/// CUDA build of torch): a binding that disagrees with the NCCL users run fails
/// the build. nccl.h includes `cuda_runtime.h` for `cudaStream_t` alone, and
/// the wheels' runtime headers need nvcc's: a two-line stand-in gives it.
fn check_nccl_abi(torch_lib: &Path) {
    let nccl = torch_lib.join("..").join("..").join("nvidia").join("nccl").join("include");
    if !nccl.join("nccl.h").exists() {
        return;
    }
    let stub = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("nccl_abi_stub");
    std::fs::create_dir_all(&stub).expect("creating the NCCL check's include folder");
    // driver_types.h's definition; CUDART_VERSION stays undefined, so nccl.h
    // skips the bf16/fp8 headers.
    std::fs::write(stub.join("cuda_runtime.h"), "#pragma once\ntypedef struct CUstream_st* cudaStream_t;\n")
        .and_then(|_| std::fs::write(stub.join("cuda_fp16.h"), "#pragma once\n"))
        .expect("writing the NCCL check's cuda_runtime.h");
    use nccl_abi::*;
    let values = [
        ("SUCCESS", SUCCESS.to_string()),
        ("INVALID_USAGE", INVALID_USAGE.to_string()),
        ("IN_PROGRESS", IN_PROGRESS.to_string()),
        ("FLOAT32", FLOAT32.to_string()),
        ("BFLOAT16", BFLOAT16.to_string()),
        ("SUM", SUM.to_string()),
        ("UNIQUE_ID_BYTES", UNIQUE_ID_BYTES.to_string()),
        ("CONFIG_MAGIC", format!("{CONFIG_MAGIC:#x}u")),
        ("CONFIG_OFFSET_SIZE", CONFIG_OFFSETS[0].to_string()),
        ("CONFIG_OFFSET_MAGIC", CONFIG_OFFSETS[1].to_string()),
        ("CONFIG_OFFSET_VERSION", CONFIG_OFFSETS[2].to_string()),
        ("CONFIG_OFFSET_BLOCKING", CONFIG_OFFSETS[3].to_string()),
    ];
    let mut build = cc::Build::new();
    build.cpp(true).std("c++17").warnings(false).cargo_metadata(false).include(&nccl).include(&stub).file(NCCL_ABI);
    for (name, value) in &values {
        build.define(&format!("MLM_NCCL_{name}"), value.as_str());
    }
    // Objects only: the check is that they compile.
    build.compile_intermediates();
}
