//! `mlm doctor`: what this machine offers a training job, in the habit of
//! `accelerate env` and `python -m torch.utils.collect_env`. Runs anywhere (no
//! GPU, no MPI, no NCCL): each line says what was found or why not.
use crate::device::{cuda_version, CudaProbe};
use crate::distributed::nccl::library as nccl;

/// The report, one `key: value` line each.
pub fn report() -> Vec<(String, String)> {
    let mut r: Vec<(String, String)> = Vec::new();
    let mut add = |k: &str, v: String| r.push((k.to_string(), v));
    add("mlm", env!("CARGO_PKG_VERSION").to_string());
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let torch_lib = mapped(&maps, "libtorch_cpu.so");
    add(
        "libtorch",
        match &torch_lib {
            Some(p) => format!("{} ({})", torch_version(p).unwrap_or_else(|| "version unknown".into()), parent(p)),
            None => "not found in this process".into(),
        },
    );
    let probe = CudaProbe::get();
    add(
        "libtorch CUDA runtime",
        probe.runtime_version.map_or("none (a CPU-only libtorch)".into(), |v| format!("CUDA {}", cuda_version(v))),
    );
    add(
        "NVIDIA driver",
        match (&probe.driver_init, probe.driver_version) {
            (None, _) => "not found (libcuda.so.1 cannot be loaded)".into(),
            (Some(Err(e)), _) => format!("loaded, but cuInit failed: {e}"),
            (Some(Ok(())), v) => format!("supports CUDA {}", v.map_or("unknown".into(), cuda_version)),
        },
    );
    if probe.devices.is_empty() {
        add("GPUs", "none visible".into());
    }
    for (i, (name, mem)) in probe.devices.iter().enumerate() {
        add(&format!("GPU {i}"), format!("{name}, {:.1} GiB", *mem as f64 / (1u64 << 30) as f64));
    }
    add(
        "CUDA in libtorch",
        if tch::Cuda::is_available() {
            format!("usable: {} device(s), cuDNN {}", tch::Cuda::device_count(), tch::Cuda::cudnn_is_available())
        } else {
            format!("not usable: {}", probe.why_not())
        },
    );
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        add("CUDA_VISIBLE_DEVICES", v);
    }
    add(
        "NCCL",
        match nccl::load() {
            Ok(n) => format!("{} from {}", n.version_string(), n.path),
            Err(e) => format!("not loadable: {e}"),
        },
    );
    let blocking = crate::distributed::nccl::blocking_warning(std::env::var("NCCL_COMM_BLOCKING").ok().as_deref());
    if let Some(warning) = blocking {
        add("NCCL_COMM_BLOCKING", format!("warning: {warning}"));
    }
    add("CUDA allocator", crate::device::cuda_allocator_line().to_string());
    add(
        "MPI",
        match crate::distributed::mpi::library_info() {
            Ok((path, version)) => format!("{version} from {path}"),
            Err(e) => format!("not loadable (needed only for mpirun/srun with the mpi backend): {e}"),
        },
    );
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    add("CPU", cpu_model(&cpu).unwrap_or_else(|| std::env::consts::ARCH.into()));
    add("CPU features", cpu_features(&cpu));
    add(
        "threads",
        format!(
            "{} available, libtorch uses {}{}",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            tch::get_num_threads(),
            std::env::var("OMP_NUM_THREADS").map_or(String::new(), |v| format!(" (OMP_NUM_THREADS={v})"))
        ),
    );
    r
}

fn mapped(maps: &str, name: &str) -> Option<String> {
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with(&format!("/{name}")))
        .map(String::from)
}

fn parent(p: &str) -> String {
    std::path::Path::new(p).parent().map_or(p.to_string(), |d| d.display().to_string())
}

/// pip's layout: `site-packages/torch/lib/libtorch_cpu.so` beside
/// `site-packages/torch/version.py` (`__version__ = '2.11.0+cu130'`); a
/// libtorch zip has `build-version` one folder up.
fn torch_version(libtorch_cpu: &str) -> Option<String> {
    let torch = std::path::Path::new(libtorch_cpu).parent()?.parent()?;
    if let Ok(v) = std::fs::read_to_string(torch.join("version.py")) {
        let line = v.lines().find(|l| l.starts_with("__version__"))?;
        return Some(line.split(['\'', '"']).nth(1)?.to_string());
    }
    std::fs::read_to_string(torch.join("build-version")).ok().map(|v| v.trim().to_string())
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    let line = cpuinfo.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// The vector and matrix features libtorch's CPU kernels use.
fn cpu_features(cpuinfo: &str) -> String {
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map_or(Vec::new(), |(_, f)| f.split_whitespace().collect());
    let wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"];
    let have: Vec<&str> = wanted.iter().copied().filter(|w| flags.contains(w)).collect();
    let bf16 = if have.contains(&"amx_bf16") || have.contains(&"avx512_bf16") {
        "bf16 in hardware"
    } else {
        "no bf16 instructions (bf16 GEMMs run as fp32 GEMMs: fp32 training is faster here)"
    };
    if have.is_empty() {
        format!("none of {}; {bf16}", wanted.join(", "))
    } else {
        format!("{}; {bf16}", have.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_runs_without_gpu_or_mpi_and_names_each_part() {
        let r = report();
        let keys: Vec<&str> = r.iter().map(|(k, _)| k.as_str()).collect();
        for k in ["mlm", "libtorch", "libtorch CUDA runtime", "NVIDIA driver", "CUDA in libtorch", "NCCL", "MPI", "CPU"]
        {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        assert!(r.iter().all(|(_, v)| !v.is_empty()));
    }

    #[test]
    fn a_blocking_nccl_is_warned_about() {
        use crate::distributed::nccl::blocking_warning;
        assert!(blocking_warning(Some("1")).unwrap().contains("distributed.timeout_s"));
        assert_eq!(blocking_warning(Some("0")), None);
        assert_eq!(blocking_warning(None), None);
    }

    #[test]
    fn cpu_features_say_whether_bf16_is_native() {
        let info = "model name\t: Some CPU\nflags\t\t: fpu avx2 fma avx512f avx512_bf16\n";
        assert_eq!(cpu_model(info).as_deref(), Some("Some CPU"));
        assert_eq!(cpu_features(info), "avx2 fma avx512f avx512_bf16; bf16 in hardware");
        assert!(cpu_features("flags : fpu sse2\n").contains("bf16 GEMMs run as fp32 GEMMs"));
    }
}
