//! Link-time settings for libtorch.
//!
//! * An rpath to libtorch's folder, so `mlm`, the tests and installed copies start
//!   without `LD_LIBRARY_PATH`.
//! * `libtorch_cuda.so` forced in when present: it is linked `--as-needed` and no
//!   symbol of ours names it, so without this `tch::Cuda::is_available()` is false
//!   even on a GPU machine.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let dir = PathBuf::from(dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    if dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
