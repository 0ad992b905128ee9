//! Link-time settings for libtorch, and our C++ shim over it.
//!
//! * An rpath to libtorch's folder, so `mlm`, the tests and installed copies start
//!   without `LD_LIBRARY_PATH`.
//! * `libtorch_cuda.so` forced in when present: it is linked `--as-needed` and no
//!   symbol of ours names it, so without this `tch::Cuda::is_available()` is false
//!   even on a GPU machine.
//! * `src/train/optimizer/fused_adamw.cpp` (libtorch's fused AdamW, which tch does
//!   not bind) compiled against the headers beside that folder (`<lib>/../include`,
//!   both in a pip torch and in a libtorch archive; `LIBTORCH_INCLUDE` as torch-sys
//!   reads it otherwise) with torch-sys's C++ ABI setting; with it
//!   `src/torch_extras.cpp` (the float32 matmul precision, `training.tf32`, and
//!   pinned host memory for uploads) and `src/model/linear_f32.cpp` (a bf16
//!   `nn.Linear` computed by fp32 GEMMs, an autograd function of its own).
use std::path::PathBuf;

const SHIM: &str = "src/train/optimizer/fused_adamw.cpp";
/// `torch.set_float32_matmul_precision` (`training.tf32`) and pinning (src/device.rs).
const PRECISION: &str = "src/torch_extras.cpp";
/// bf16 `nn.Linear` through fp32 GEMMs on CPUs without bf16 instructions (src/model/linear_f32.rs).
const LINEAR_F32: &str = "src/model/linear_f32.cpp";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={SHIM}");
    println!("cargo:rerun-if-changed={PRECISION}");
    println!("cargo:rerun-if-changed={LINEAR_F32}");
    println!("cargo:rerun-if-changed=src/shim_message.h");
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let dir = PathBuf::from(dir);
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
        .file(SHIM)
        .file(PRECISION)
        .file(LINEAR_F32)
        .compile("mlm_fused_adamw");
}
