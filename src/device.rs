//! The device a command runs on, as the user asked for it, and why CUDA is not
//! usable when it is not (for errors, the `auto` warning and `mlm doctor`).
use std::sync::OnceLock;

use anyhow::{bail, Result};
use tch::Device;

use crate::config::DeviceChoice;

/// Picks the device named by `choice`; `key` is where the user set it
/// (`training.device`, `--device`), named in the error when it cannot be had.
/// `auto` takes the GPU when libtorch can use one, and says in one warning line
/// why not when a GPU seems to be there but cannot be used.
pub fn select_device(choice: DeviceChoice, key: &str) -> Result<Device> {
    Ok(match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
        DeviceChoice::Cuda => bail!("{key} = cuda but {}", CudaProbe::get().why_not()),
        DeviceChoice::Auto if tch::Cuda::is_available() => Device::Cuda(0),
        DeviceChoice::Auto => {
            let probe = CudaProbe::get();
            if probe.gpu_expected() {
                tracing::warn!("{key} = auto: training on the CPU because {}", probe.why_not());
            }
            Device::Cpu
        }
    })
}

/// A copy of the CPU tensor `host` in pinned host memory, for a non-blocking
/// upload; `None` without CUDA or when pinning fails.
pub fn pinned(host: &tch::Tensor) -> Option<tch::Tensor> {
    crate::shims::pinned_copy(host).ok().flatten()
}

/// Lets libtorch run fp32 matmuls as TF32 on CUDA tensor cores (`on`), or
/// keeps them in full fp32: `torch.set_float32_matmul_precision("high")` or
/// `("highest")`. A process-wide setting; the training job sets it on CUDA
/// devices only (`training.tf32`).
pub fn set_tf32(on: bool) -> Result<()> {
    crate::shims::set_float32_matmul_precision_high(on)
        .map_err(|e| anyhow::anyhow!("libtorch refused to set the float32 matmul precision: {e}"))
}

/// Whether fp32 matmuls may run as TF32 (libtorch's current setting).
pub fn tf32() -> bool {
    crate::shims::float32_matmul_precision_high()
}

/// glibc's `mallopt` values of [`keep_freed_host_memory`]: blocks up to 1 GiB come
/// from the heap (glibc before 2.35 takes at most 32 MiB, tried next), and up to
/// 2 GiB of freed heap stay mapped.
const KEEP_MMAP_THRESHOLDS: [(i32, &str); 2] = [(1 << 30, "1 GiB"), (32 << 20, "32 MiB")];
const KEEP_TRIM_THRESHOLD: i32 = i32::MAX;

/// Makes glibc's malloc keep the memory libtorch frees on the CPU for its next
/// tensors instead of returning it to the kernel: libtorch's CPU allocator caches
/// nothing, and with glibc's defaults every tensor above the (rising) mmap
/// threshold is mapped afresh and faulted in page by page. A training step of the
/// DeBERTa-v3-small shape (vocabulary 30,522, batch 8 x 128, fp32, 2 threads)
/// took 1.61-1.64 s with the memory kept against 1.68-1.69 s (3 runs each); the
/// resident peak is that of the live tensors plus what the heap keeps
/// (docs/memory.md). A no-op, named in the returned line, when the environment
/// configures glibc's malloc itself (`MALLOC_*_`, `GLIBC_TUNABLES=glibc.malloc.*`),
/// e.g. `MALLOC_MMAP_THRESHOLD_=131072` for a memory-tight job, or preloads
/// another allocator (`LD_PRELOAD` naming a `*malloc*` library).
pub fn keep_freed_host_memory() -> String {
    if let Some(var) = malloc_configured(|k| std::env::var(k).ok()) {
        return format!("host memory: the allocator as {var} in the environment configures it");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (threshold, named) in KEEP_MMAP_THRESHOLDS {
        // SAFETY: mallopt only sets glibc's allocator parameters, under its own lock.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, threshold) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD) == 1
        };
        if ok {
            return format!("host memory: freed tensors' memory kept for reuse (malloc mmap threshold {named})");
        }
    }
    "host memory: the system allocator's defaults".into()
}

/// The CUDA caching allocator's setting `mlm` starts with when the environment
/// sets none: expandable segments, since the sparse head's `[masked, vocab]`
/// tensors change size every step and would otherwise fragment the cache into
/// blocks of every size. Read by libtorch when it first allocates on a GPU.
pub const CUDA_ALLOC_CONF: (&str, &str) = ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True");

/// Sets [`CUDA_ALLOC_CONF`] unless `PYTORCH_CUDA_ALLOC_CONF` or
/// `PYTORCH_ALLOC_CONF` (torch >= 2.9's name) is set; call first in `main`,
/// before any thread starts.
pub fn default_cuda_allocator() {
    let line = match cuda_alloc_conf_to_set(|k| std::env::var_os(k).is_some()) {
        Some((key, value)) => {
            // The first call in main: no other thread reads the environment yet.
            std::env::set_var(key, value);
            format!("{key}={value} (mlm's default; set {key} to choose another)")
        }
        None => ["PYTORCH_ALLOC_CONF", CUDA_ALLOC_CONF.0]
            .into_iter()
            .find_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v} (from the environment)")))
            .unwrap_or_default(),
    };
    let _ = ALLOCATOR_LINE.set(line);
}

static ALLOCATOR_LINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The CUDA allocator's setting, as [`default_cuda_allocator`] found or made it (`mlm doctor`).
pub fn cuda_allocator_line() -> &'static str {
    ALLOCATOR_LINE.get().map_or("libtorch's defaults (default_cuda_allocator was not called)", |s| s.as_str())
}

/// What [`default_cuda_allocator`] sets, given which variables are set.
fn cuda_alloc_conf_to_set(is_set: impl Fn(&str) -> bool) -> Option<(&'static str, &'static str)> {
    (!is_set("PYTORCH_ALLOC_CONF") && !is_set(CUDA_ALLOC_CONF.0)).then_some(CUDA_ALLOC_CONF)
}

/// The environment variable that configures glibc's malloc or replaces it, if one does.
fn malloc_configured(var: impl Fn(&str) -> Option<String>) -> Option<&'static str> {
    const OWN: [&str; 6] = [
        "MALLOC_MMAP_THRESHOLD_",
        "MALLOC_TRIM_THRESHOLD_",
        "MALLOC_TOP_PAD_",
        "MALLOC_MMAP_MAX_",
        "MALLOC_ARENA_MAX",
        "MALLOC_ARENA_TEST",
    ];
    if let Some(k) = OWN.into_iter().find(|k| var(k).is_some()) {
        return Some(k);
    }
    if var("LD_PRELOAD").is_some_and(|p| p.contains("malloc")) {
        return Some("LD_PRELOAD");
    }
    var("GLIBC_TUNABLES").filter(|t| t.contains("glibc.malloc.")).map(|_| "GLIBC_TUNABLES")
}

/// What this process can learn about CUDA without libtorch's help: the driver
/// (`libcuda.so.1`, through cudarc), its version and devices, and the CUDA
/// runtime libtorch was built with.
#[derive(Debug, Clone, Default)]
pub struct CudaProbe {
    /// `cuInit`'s outcome: `None` when no driver library could be loaded.
    pub driver_init: Option<std::result::Result<(), String>>,
    /// `cuDriverGetVersion`, e.g. 13000 for CUDA 13.0.
    pub driver_version: Option<i32>,
    /// Name and total memory (bytes) of each visible GPU.
    pub devices: Vec<(String, usize)>,
    /// `cudaRuntimeGetVersion` of the runtime libtorch loaded; `None` for a CPU-only libtorch.
    pub runtime_version: Option<i32>,
}

impl CudaProbe {
    /// Probed once per process.
    pub fn get() -> &'static CudaProbe {
        static PROBE: OnceLock<CudaProbe> = OnceLock::new();
        PROBE.get_or_init(Self::probe)
    }

    fn probe() -> Self {
        let mut p = CudaProbe { runtime_version: runtime_version(), ..Default::default() };
        // SAFETY: only tries to open the driver library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return p;
        }
        use cudarc::driver::result;
        p.driver_init = Some(result::init().map_err(|e| format!("{e:?}")));
        let mut v = 0;
        // SAFETY: valid out-pointer; callable before cuInit.
        if unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) } == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            p.driver_version = Some(v);
        }
        if matches!(p.driver_init, Some(Ok(()))) {
            let n = result::device::get_count().unwrap_or(0);
            for i in 0..n {
                let Ok(dev) = result::device::get(i) else { continue };
                let name = result::device::get_name(dev).unwrap_or_else(|_| format!("GPU {i}"));
                // SAFETY: `dev` is a valid device handle.
                let mem = unsafe { result::device::total_mem(dev) }.unwrap_or(0);
                p.devices.push((name, mem));
            }
        }
        p
    }

    /// Whether the machine looks like it has a GPU (a driver that loads).
    pub fn gpu_expected(&self) -> bool {
        self.driver_init.is_some()
    }

    /// One clause saying why libtorch cannot use CUDA here.
    pub fn why_not(&self) -> String {
        explain(self, std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref())
    }
}

fn explain(p: &CudaProbe, visible: Option<&str>) -> String {
    let hidden = match visible {
        Some(v) if v.trim().is_empty() || v.trim() == "-1" => format!(" (CUDA_VISIBLE_DEVICES={v:?} hides every GPU)"),
        _ => String::new(),
    };
    let Some(init) = &p.driver_init else {
        return format!("no NVIDIA driver was found (libcuda.so.1 cannot be loaded; check nvidia-smi){hidden}");
    };
    if let Err(e) = init {
        return format!("the NVIDIA driver failed to initialise (cuInit: {e}; check nvidia-smi and dmesg){hidden}");
    }
    if p.devices.is_empty() {
        return format!("the NVIDIA driver sees no GPU{hidden}");
    }
    let Some(runtime) = p.runtime_version else {
        return "libtorch is a CPU-only build (no CUDA runtime loaded): point LIBTORCH (or the venv's torch) \
                at a torch built with CUDA"
            .to_string();
    };
    match p.driver_version {
        Some(d) if d / 1000 < runtime / 1000 => format!(
            "the driver is too old: it supports CUDA {} but libtorch uses CUDA {}; update the NVIDIA driver \
             or install a torch built for CUDA {}",
            cuda_version(d),
            cuda_version(runtime),
            d / 1000
        ),
        _ => format!(
            "CUDA failed to initialise in libtorch (driver CUDA {}, runtime CUDA {})",
            p.driver_version.map_or("unknown".into(), cuda_version),
            cuda_version(runtime)
        ),
    }
}

/// 13000 -> "13.0".
pub fn cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, v % 1000 / 10)
}

/// `cudaRuntimeGetVersion` of the CUDA runtime libtorch loaded, if any.
fn runtime_version() -> Option<i32> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let path = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.rsplit('/').next().is_some_and(|n| n.starts_with("libcudart.so")))?;
    let cpath = std::ffi::CString::new(path).ok()?;
    // SAFETY: looks up an already loaded library (RTLD_NOLOAD) and one symbol of
    // known signature; the handle is never closed.
    unsafe {
        let h = libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if h.is_null() {
            return None;
        }
        let f = libc::dlsym(h, c"cudaRuntimeGetVersion".as_ptr());
        if f.is_null() {
            return None;
        }
        let f: unsafe extern "C" fn(*mut i32) -> i32 = std::mem::transmute(f);
        let mut v = 0;
        (f(&mut v) == 0).then_some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allocator_default_yields_to_either_variable_the_user_set() {
        assert_eq!(cuda_alloc_conf_to_set(|_| false), Some(CUDA_ALLOC_CONF));
        assert_eq!(cuda_alloc_conf_to_set(|k| k == "PYTORCH_ALLOC_CONF"), None);
        assert_eq!(cuda_alloc_conf_to_set(|k| k == "PYTORCH_CUDA_ALLOC_CONF"), None);
    }

    #[test]
    fn the_environments_malloc_settings_win() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(malloc_configured(env(&[])), None);
        assert_eq!(malloc_configured(env(&[("MALLOC_MMAP_THRESHOLD_", "131072")])), Some("MALLOC_MMAP_THRESHOLD_"));
        assert_eq!(malloc_configured(env(&[("MALLOC_ARENA_MAX", "2")])), Some("MALLOC_ARENA_MAX"));
        let tunables = env(&[("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2:glibc.malloc.trim_threshold=0")]);
        assert_eq!(malloc_configured(tunables), Some("GLIBC_TUNABLES"));
        assert_eq!(malloc_configured(env(&[("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2")])), None);
        let jemalloc = env(&[("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")]);
        assert_eq!(malloc_configured(jemalloc), Some("LD_PRELOAD"));
        assert_eq!(malloc_configured(env(&[("LD_PRELOAD", "libfakeroot.so")])), None);
    }

    /// Minor page faults of this thread so far.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn minor_faults() -> i64 {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
        u.ru_minflt
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_host_memory_is_reused_without_page_faults() {
        if malloc_configured(|k| std::env::var(k).ok()).is_some() {
            return;
        }
        let line = keep_freed_host_memory();
        assert!(line.contains("kept for reuse"), "{line}");
        // 16 MiB written, freed and asked for again (libtorch's CPU tensors come
        // from the same malloc): after the first round the pages come back from
        // the heap, already mapped. glibc's defaults map and fault in all three.
        let round = || {
            let v = std::hint::black_box(vec![1u8; 16 << 20]);
            assert_eq!(v[(16 << 20) - 1], 1);
        };
        round();
        let before = minor_faults();
        round();
        round();
        let faults = minor_faults() - before;
        assert!(faults < 1024, "{faults} page faults for two 16 MiB blocks freed before (4,096 pages each)");
    }

    #[test]
    fn a_missing_gpu_is_blamed_on_the_setting_that_asked_for_it() {
        if tch::Cuda::is_available() {
            return;
        }
        let e = select_device(DeviceChoice::Cuda, "--device").unwrap_err().to_string();
        assert!(e.starts_with("--device = cuda but "), "{e}");
        assert_eq!(select_device(DeviceChoice::Cpu, "--device").unwrap(), Device::Cpu);
        assert_eq!(select_device(DeviceChoice::Auto, "--device").unwrap(), Device::Cpu);
    }

    #[test]
    fn why_cuda_is_unusable_names_the_cause() {
        let none = CudaProbe::default();
        assert!(explain(&none, None).contains("no NVIDIA driver"));
        assert!(explain(&none, Some("")).contains("CUDA_VISIBLE_DEVICES"));
        let failed = CudaProbe { driver_init: Some(Err("CUDA_ERROR_UNKNOWN".into())), ..Default::default() };
        assert!(explain(&failed, None).contains("failed to initialise (cuInit: CUDA_ERROR_UNKNOWN"));
        let no_gpu = CudaProbe { driver_init: Some(Ok(())), driver_version: Some(13000), ..Default::default() };
        assert!(explain(&no_gpu, None).contains("sees no GPU"));
        let gpu = vec![("NVIDIA H200".to_string(), 141 << 30)];
        let old = CudaProbe {
            driver_init: Some(Ok(())),
            driver_version: Some(12040),
            devices: gpu.clone(),
            runtime_version: Some(13000),
        };
        let e = explain(&old, None);
        assert!(e.contains("driver is too old") && e.contains("CUDA 12.4") && e.contains("CUDA 13.0"), "{e}");
        let cpu_torch = CudaProbe { runtime_version: None, ..old.clone() };
        assert!(explain(&cpu_torch, None).contains("CPU-only build"));
    }

    #[test]
    fn the_runtime_libtorch_loaded_is_found() {
        // This machine's venv has torch with CUDA 13 (libcudart.so.13 is mapped
        // even without a GPU); a CPU-only torch maps none.
        if let Some(v) = runtime_version() {
            assert!(v >= 11000, "{v}");
        }
    }

    #[test]
    fn tf32_is_set_and_read_back() {
        // A process-wide libtorch setting: changed in a child (this test binary
        // again, this test only), never under the other tests.
        if std::env::var_os("MLM_TEST_TF32").is_some() {
            assert!(!super::tf32(), "libtorch's default is full fp32");
            super::set_tf32(true).unwrap();
            assert!(super::tf32());
            super::set_tf32(false).unwrap();
            assert!(!super::tf32());
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "device::tests::tf32_is_set_and_read_back", "--test-threads=1"])
            .env("MLM_TEST_TF32", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stdout.contains("1 passed"), "{stdout}{stderr}");
    }

    #[test]
    fn without_cuda_nothing_is_pinned() {
        let t = tch::Tensor::from_slice(&[1i64, 2, 3]);
        match super::pinned(&t) {
            None => assert!(!tch::Cuda::is_available()),
            Some(p) => assert_eq!(Vec::<i64>::try_from(&p).unwrap(), [1, 2, 3]),
        }
    }
}
