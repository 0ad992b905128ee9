//! Finding and loading NCCL at run time, the copy libtorch already uses.
//!
//! pip's torch ships NCCL as `nvidia/nccl/lib/libnccl.so.2` and `libtorch_cuda.so`
//! names it as a dependency, so in an `mlm` process it is usually mapped before
//! `main`. Two different NCCLs in one process would fight over the same GPU
//! resources, so the order is:
//!
//! 1. the `libnccl.so.2` already loaded (looked up with `RTLD_NOLOAD`, by soname,
//!    then by the path `/proc/self/maps` shows for any loaded `libnccl`);
//! 2. libtorch's own `nvidia/nccl/lib/libnccl.so.2` (pip's layout, found from the
//!    loaded `libtorch_cpu.so`);
//! 3. `libnccl.so.2`, then `libnccl.so`, through the usual search path
//!    (`LD_LIBRARY_PATH`, the system's NCCL).
//!
//! Only the functions `mlm` calls are bound; the communicator config is the
//! NCCL 2.14 layout (`ncclConfig_v21400`), which every later NCCL accepts.
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};

pub type Comm = *mut c_void;
pub type NcclResult = c_int;

// SUCCESS, IN_PROGRESS, FLOAT32, ...: checked against nccl.h at build time.
include!("abi.rs");

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [c_char; UNIQUE_ID_BYTES],
}

/// `ncclConfig_v21400`: `size`, `magic`, `version`, `blocking`. NCCL reads the
/// fields the advertised version had; the last member fills what was tail
/// padding in 2.14 (`cgaClusterSize` in later layouts) with "undefined".
#[repr(C)]
pub struct Config {
    size: usize,
    magic: u32,
    version: u32,
    blocking: c_int,
    undefined_tail: c_int,
}

impl Config {
    /// A non-blocking communicator: calls return `ncclInProgress` and the
    /// caller polls `ncclCommGetAsyncError`, so a stuck peer cannot hang it.
    pub fn non_blocking() -> Self {
        Self {
            size: std::mem::size_of::<Self>(),
            magic: CONFIG_MAGIC,
            version: 21400,
            blocking: 0,
            undefined_tail: i32::MIN,
        }
    }
}

type GetVersion = unsafe extern "C" fn(*mut c_int) -> NcclResult;
type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> NcclResult;
type CommInitRankConfig = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int, *mut Config) -> NcclResult;
type AllReduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> NcclResult;
type CommGetAsyncError = unsafe extern "C" fn(Comm, *mut NcclResult) -> NcclResult;
type CommOp = unsafe extern "C" fn(Comm) -> NcclResult;
type GetErrorString = unsafe extern "C" fn(NcclResult) -> *const c_char;
type GetLastError = unsafe extern "C" fn(Comm) -> *const c_char;

/// The bound functions of one loaded NCCL.
pub struct Nccl {
    /// Where it was loaded from (the mapped file when known).
    pub path: String,
    /// `ncclGetVersion`, e.g. 22809 for 2.28.9.
    pub version: i32,
    pub get_unique_id: GetUniqueId,
    pub comm_init_rank_config: CommInitRankConfig,
    pub all_reduce: AllReduce,
    pub comm_get_async_error: CommGetAsyncError,
    pub comm_abort: CommOp,
    pub comm_destroy: CommOp,
    pub comm_finalize: Option<CommOp>,
    get_error_string: GetErrorString,
    get_last_error: Option<GetLastError>,
}

// SAFETY: plain function pointers into a library that is never unloaded.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// NCCL's own words for `code`.
    pub fn error_string(&self, code: NcclResult) -> String {
        // SAFETY: NCCL returns a static NUL-terminated string (or null).
        unsafe { c_text((self.get_error_string)(code)) }
    }

    /// The communicator's last error message (NCCL >= 2.13), or "".
    ///
    /// # Safety
    /// `comm` is a live communicator of this library, or null.
    pub unsafe fn last_error(&self, comm: Comm) -> String {
        match self.get_last_error {
            Some(f) => c_text(f(comm)),
            None => String::new(),
        }
    }

    /// "2.28.9".
    pub fn version_string(&self) -> String {
        version_string(self.version)
    }
}

/// `ncclGetVersion`'s code as "major.minor.patch" (codes below 2.9 use 1000s).
pub fn version_string(code: i32) -> String {
    if code >= 10000 {
        format!("{}.{}.{}", code / 10000, code % 10000 / 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code % 1000 / 100, code % 100)
    }
}

unsafe fn c_text(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// The process's NCCL, loaded once; the error says what was tried.
pub fn load() -> Result<&'static Nccl> {
    static LIB: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();
    LIB.get_or_init(|| open(&candidates()).map_err(|e| format!("{e:#}"))).as_ref().map_err(|e| anyhow!("{e}"))
}

/// Where NCCL would come from, in the order tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidate {
    /// Already mapped into this process: a soname or a path from `/proc/self/maps`.
    Loaded(String),
    /// A file or name to load.
    Load(String),
}

/// The lookup order of the module doc, for this process.
pub fn candidates() -> Vec<Candidate> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    candidates_from_maps(&maps)
}

fn candidates_from_maps(maps: &str) -> Vec<Candidate> {
    let mut out = vec![Candidate::Loaded("libnccl.so.2".into())];
    let mapped: Vec<&str> = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).collect();
    for path in &mapped {
        let name = Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("libnccl.so") && !out.contains(&Candidate::Loaded(path.to_string())) {
            out.push(Candidate::Loaded(path.to_string()));
        }
    }
    for path in &mapped {
        if let Some(dir) = pip_nccl_dir(Path::new(path)) {
            let lib = dir.join("libnccl.so.2").display().to_string();
            if !out.contains(&Candidate::Load(lib.clone())) {
                out.push(Candidate::Load(lib));
            }
        }
    }
    out.push(Candidate::Load("libnccl.so.2".into()));
    out.push(Candidate::Load("libnccl.so".into()));
    out
}

/// `site-packages/torch/lib/libtorch_cpu.so` -> `site-packages/nvidia/nccl/lib`.
fn pip_nccl_dir(libtorch: &Path) -> Option<PathBuf> {
    if libtorch.file_name()? != "libtorch_cpu.so" {
        return None;
    }
    let site = libtorch.parent()?.parent()?.parent()?;
    Some(site.join("nvidia/nccl/lib"))
}

fn open(candidates: &[Candidate]) -> Result<Nccl> {
    let mut tried = Vec::new();
    for c in candidates {
        let (name, flags) = match c {
            Candidate::Loaded(n) => (n, libc::RTLD_NOW | libc::RTLD_NOLOAD),
            Candidate::Load(n) => (n, libc::RTLD_NOW | libc::RTLD_GLOBAL),
        };
        if matches!(c, Candidate::Load(_)) && name.contains('/') && !Path::new(name).exists() {
            continue;
        }
        let cname = CString::new(name.as_str()).map_err(|_| anyhow!("NUL in library name {name:?}"))?;
        // SAFETY: dlopen with a valid C string; the handle is never closed.
        let handle = unsafe { libc::dlopen(cname.as_ptr(), flags) };
        if handle.is_null() {
            if matches!(c, Candidate::Load(_)) {
                tried.push(format!("{name} ({})", dl_error()));
            }
            continue;
        }
        // SAFETY: `handle` is a live library handle.
        return unsafe { bind(handle) }.map_err(|e| anyhow!("{name}: {e}"));
    }
    bail!(
        "NCCL not found: nothing named libnccl is loaded and none of these could be opened: {}; \
         install torch with CUDA from pip (it ships nvidia/nccl/lib/libnccl.so.2) or NVIDIA's libnccl2 package, \
         or set distributed.backend = \"tcp\" (all-reduce through host memory, slower)",
        tried.join(", ")
    )
}

fn dl_error() -> String {
    // SAFETY: dlerror returns a thread-local NUL-terminated string or null.
    let e = unsafe { c_text(libc::dlerror()) };
    if e.is_empty() {
        "not found".into()
    } else {
        e
    }
}

unsafe fn sym<T: Copy>(handle: *mut c_void, name: &str) -> Option<T> {
    let cname = CString::new(name).ok()?;
    let p = libc::dlsym(handle, cname.as_ptr());
    // SAFETY (caller): T is the function pointer type of `name`.
    (!p.is_null()).then(|| std::mem::transmute_copy::<*mut c_void, T>(&p))
}

unsafe fn bind(handle: *mut c_void) -> Result<Nccl> {
    let need = |name: &str| -> Result<*mut c_void> {
        sym::<*mut c_void>(handle, name)
            .ok_or_else(|| anyhow!("the library has no {name} (too old an NCCL? need 2.14 or later)"))
    };
    let get_version: GetVersion = std::mem::transmute(need("ncclGetVersion")?);
    let mut version = 0;
    get_version(&mut version);
    let nccl = Nccl {
        path: loaded_path(handle).unwrap_or_default(),
        version,
        get_unique_id: std::mem::transmute::<*mut c_void, GetUniqueId>(need("ncclGetUniqueId")?),
        comm_init_rank_config: std::mem::transmute::<*mut c_void, CommInitRankConfig>(need("ncclCommInitRankConfig")?),
        all_reduce: std::mem::transmute::<*mut c_void, AllReduce>(need("ncclAllReduce")?),
        comm_get_async_error: std::mem::transmute::<*mut c_void, CommGetAsyncError>(need("ncclCommGetAsyncError")?),
        comm_abort: std::mem::transmute::<*mut c_void, CommOp>(need("ncclCommAbort")?),
        comm_destroy: std::mem::transmute::<*mut c_void, CommOp>(need("ncclCommDestroy")?),
        comm_finalize: sym::<CommOp>(handle, "ncclCommFinalize"),
        get_error_string: std::mem::transmute::<*mut c_void, GetErrorString>(need("ncclGetErrorString")?),
        get_last_error: sym::<GetLastError>(handle, "ncclGetLastError"),
    };
    if version < 21400 {
        bail!("NCCL {} is too old: mlm needs 2.14 or later (non-blocking communicators)", version_string(version));
    }
    Ok(nccl)
}

/// The file a handle's library was mapped from (`dlinfo`'s link map).
unsafe fn loaded_path(handle: *mut c_void) -> Option<String> {
    #[repr(C)]
    struct LinkMap {
        l_addr: usize,
        l_name: *const c_char,
    }
    let mut map: *const LinkMap = std::ptr::null();
    const RTLD_DI_LINKMAP: c_int = 2;
    if libc::dlinfo(handle, RTLD_DI_LINKMAP, &mut map as *mut _ as *mut c_void) != 0 || map.is_null() {
        return None;
    }
    let name = c_text((*map).l_name);
    let canonical = std::fs::canonicalize(&name).map(|p| p.display().to_string()).unwrap_or(name);
    Some(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// build.rs holds abi.rs to nccl.h; this holds our `Config` to abi.rs.
    #[test]
    fn config_fields_lie_where_abi_rs_says() {
        let offsets = [
            std::mem::offset_of!(Config, size),
            std::mem::offset_of!(Config, magic),
            std::mem::offset_of!(Config, version),
            std::mem::offset_of!(Config, blocking),
        ];
        assert_eq!(offsets, CONFIG_OFFSETS);
        assert_eq!(std::mem::size_of::<UniqueId>(), UNIQUE_ID_BYTES);
        assert_eq!(Config::non_blocking().magic, CONFIG_MAGIC);
    }

    #[test]
    fn lookup_prefers_the_loaded_copy_then_pips_then_the_search_path() {
        let maps = "\
7f00-7f01 r-xp 00000000 08:01 1 /venv/lib/python3.12/site-packages/torch/lib/libtorch_cpu.so
7f02-7f03 r-xp 00000000 08:01 2 /venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2
7f04-7f05 r--p 00000000 08:01 2 /venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2
7f06-7f07 rw-p 00000000 00:00 0 [heap]
";
        assert_eq!(
            candidates_from_maps(maps),
            vec![
                Candidate::Loaded("libnccl.so.2".into()),
                Candidate::Loaded("/venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2".into()),
                Candidate::Load("/venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2".into()),
                Candidate::Load("libnccl.so.2".into()),
                Candidate::Load("libnccl.so".into()),
            ]
        );
        // Without libtorch or NCCL mapped, only the search path is left.
        assert_eq!(candidates_from_maps("").len(), 3);
    }

    #[test]
    fn versions_read_like_ncclgetversion() {
        assert_eq!(version_string(22809), "2.28.9");
        assert_eq!(version_string(2708), "2.7.8");
        assert_eq!(std::mem::size_of::<Config>(), 24);
    }

    #[test]
    fn missing_everywhere_names_what_was_tried() {
        let e = open(&[Candidate::Loaded("libnccl-none.so.9".into()), Candidate::Load("libnccl-none.so.9".into())])
            .err()
            .expect("no such library")
            .to_string();
        assert!(e.contains("NCCL not found") && e.contains("libnccl-none.so.9"), "{e}");
        assert!(e.contains("distributed.backend = \"tcp\""), "{e}");
    }

    #[test]
    fn the_nccl_of_pips_torch_loads_without_a_symlink() {
        // This machine's venv has torch with CUDA, whose libtorch_cuda.so maps
        // libnccl.so.2 at start-up; a CPU-only torch has none, and that is fine.
        let Ok(nccl) = load() else { return };
        assert!(nccl.version >= 21400, "{}", nccl.version);
        assert!(nccl.path.contains("libnccl.so"), "{}", nccl.path);
        assert_eq!(nccl.error_string(SUCCESS), "no error");
    }
}
