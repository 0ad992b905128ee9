//! The MPI library, opened at run time with `dlopen`, so that `mlm` neither
//! links MPI nor needs one unless a job uses the mpi backend.
//!
//! Two ABIs cover the MPI libraries in use:
//! - Open MPI (`libmpi.so.40`): a handle is the address of an object the library
//!   exports (`MPI_COMM_WORLD` is `&ompi_mpi_comm_world`), `MPI_IN_PLACE` is 1.
//! - MPICH and its derivatives, Intel MPI, Cray MPICH, MVAPICH (`libmpi.so.12`):
//!   a handle is an `int` fixed in `mpi.h`, `MPI_IN_PLACE` is -1.
//!
//! The library is told apart by whether it exports `ompi_mpi_comm_world`.
use std::ffi::{c_char, c_int, c_void, CStr, CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use anyhow::{bail, Result};

/// The environment variable naming the MPI library to load, as a path or a file
/// name the dynamic loader finds; when set, nothing else is tried.
pub const LIB_ENV: &str = "MLM_MPI_LIB";

/// The names tried, in order, when `MLM_MPI_LIB` is not set: Open MPI 3/4/5,
/// then the MPICH ABI (MPICH, Intel MPI, Cray MPICH, MVAPICH), then whatever a
/// development package links as `libmpi.so`.
pub const DEFAULT_NAMES: [&str; 3] = ["libmpi.so.40", "libmpi.so.12", "libmpi.so"];

/// `MPI_THREAD_SERIALIZED`, 2 in both ABIs (the MPI standard orders the levels
/// SINGLE < FUNNELED < SERIALIZED < MULTIPLE).
pub const THREAD_SERIALIZED: c_int = 2;

/// Elements per MPI call: MPI counts are C ints.
const MAX_COUNT: usize = 1 << 30;

/// Room for `MPI_Get_library_version`: `MPI_MAX_LIBRARY_VERSION_STRING` is 256
/// in Open MPI and 8192 in MPICH.
const VERSION_LEN: usize = 8192;

/// What `MLM_MPI_LIB` (`explicit`) or else [`DEFAULT_NAMES`] says to try, in order.
pub fn candidates(explicit: Option<&OsStr>) -> Vec<OsString> {
    match explicit.filter(|v| !v.is_empty()) {
        Some(v) => vec![v.to_os_string()],
        None => DEFAULT_NAMES.iter().map(OsString::from).collect(),
    }
}

/// An opened MPI library. It is never closed: MPI's plugins and exit handlers
/// keep pointing into it, and MPI cannot be initialised twice anyway.
pub struct Library {
    dl: *mut c_void,
    /// The file the loader opened, e.g. `/usr/lib/x86_64-linux-gnu/libmpi.so.40`.
    pub path: String,
}

impl Library {
    /// Opens the library `MLM_MPI_LIB` names, else the first of [`DEFAULT_NAMES`]
    /// that loads.
    pub fn open() -> Result<Self> {
        let explicit = std::env::var_os(LIB_ENV).filter(|v| !v.is_empty());
        Self::open_first(&candidates(explicit.as_deref()), explicit.is_some())
    }

    /// Opens the first of `names` that loads and exports the MPI functions.
    /// `explicit`: the one name came from `MLM_MPI_LIB`.
    pub fn open_first(names: &[OsString], explicit: bool) -> Result<Self> {
        let mut failures = Vec::new();
        for name in names {
            match Self::open_one(name) {
                Ok(lib) => return Ok(lib),
                Err(e) => failures.push(e.to_string()),
            }
        }
        let tried: Vec<String> = names.iter().map(|n| n.to_string_lossy().into_owned()).collect();
        let why = failures.join("; ");
        if explicit {
            bail!(
                "{LIB_ENV}={} cannot be loaded as the MPI library ({why}); point {LIB_ENV} at the libmpi.so of the MPI \
                 that starts the job (e.g. /usr/lib/x86_64-linux-gnu/libmpi.so.40), or unset it to try {} in turn; \
                 or set distributed.backend = \"tcp\", which needs no MPI",
                tried.join(", "),
                DEFAULT_NAMES.join(", ")
            );
        }
        bail!(
            "the mpi backend found no MPI library (tried {}: {why}); install Open MPI (Debian: openmpi-bin) or load \
             your site's MPI module, or set {LIB_ENV} to the path of its libmpi.so; \
             or set distributed.backend = \"tcp\", which needs no MPI",
            tried.join(", ")
        )
    }

    fn open_one(name: &OsStr) -> Result<Self> {
        let Ok(c_name) = CString::new(name.as_bytes()) else {
            bail!("{}: a library name cannot hold a NUL byte", name.to_string_lossy());
        };
        // RTLD_GLOBAL: Open MPI's plugins (mca_*.so), which it dlopens itself,
        // resolve their MPI symbols in the global scope.
        // SAFETY: dlopen runs the library's constructors, as linking it would.
        let dl = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if dl.is_null() {
            bail!("{}", dlerror().unwrap_or_else(|| format!("{}: dlopen failed", name.to_string_lossy())));
        }
        let mut lib = Library { dl, path: name.to_string_lossy().into_owned() };
        let init = lib.symbol(c"MPI_Init_thread")?;
        lib.path = loaded_from(init).unwrap_or(lib.path);
        Ok(lib)
    }

    /// The address of `name`, or an error naming the library and the symbol.
    fn symbol(&self, name: &CStr) -> Result<*mut c_void> {
        // SAFETY: `dl` is a live handle; dlsym only looks the name up.
        let p = unsafe { libc::dlsym(self.dl, name.as_ptr()) };
        if p.is_null() {
            bail!(
                "{} does not export {}; it is not an MPI library, or not a complete one",
                self.path,
                name.to_string_lossy()
            );
        }
        Ok(p)
    }

    /// The function `name` as the function pointer type `F`.
    ///
    /// # Safety
    /// `F` must be an `extern "C"` function pointer type matching the C
    /// declaration of `name` in this library's ABI.
    unsafe fn function<F: Copy>(&self, name: &CStr) -> Result<F> {
        assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
        let p = self.symbol(name)?;
        Ok(std::mem::transmute_copy::<*mut c_void, F>(&p))
    }

    /// Whether this is Open MPI (else the MPICH ABI is assumed).
    pub fn is_open_mpi(&self) -> bool {
        self.symbol(c"ompi_mpi_comm_world").is_ok()
    }

    /// The MPI functions and predefined handles of this library.
    pub fn api(&self) -> Result<Box<dyn Mpi>> {
        if self.is_open_mpi() {
            let handle = |name: &CStr| self.symbol(name).map(Ptr);
            let handles = Handles {
                world: handle(c"ompi_mpi_comm_world")?,
                float: handle(c"ompi_mpi_float")?,
                byte: handle(c"ompi_mpi_byte")?,
                uint64: handle(c"ompi_mpi_uint64_t")?,
                sum: handle(c"ompi_mpi_op_sum")?,
                in_place: Ptr(std::ptr::without_provenance_mut(1)),
            };
            // SAFETY: Open MPI's handle types are pointers, as `Ptr` is.
            Ok(Box::new(unsafe { Api::load(self, handles)? }))
        } else {
            // The values of MPICH's mpi.h (src/include/mpi.h.in and its configure
            // values), which Intel MPI, Cray MPICH and MVAPICH share (the MPICH ABI
            // Compatibility Initiative). MPI_UINT64_T is 0x4c00083e; 0x4c00083a is
            // MPI_INT64_T.
            let handles = Handles {
                world: 0x4400_0000,
                float: 0x4c00_040a,
                byte: 0x4c00_010d,
                uint64: 0x4c00_083e,
                sum: 0x5800_0003,
                in_place: Ptr(std::ptr::without_provenance_mut(usize::MAX)), // (void *) -1
            };
            // SAFETY: MPICH's handle types are `int`.
            Ok(Box::new(unsafe { Api::<c_int>::load(self, handles)? }))
        }
    }

    /// `MPI_Get_library_version`, which MPI allows before `MPI_Init`.
    pub fn version(&self) -> Result<String> {
        // SAFETY: the C declaration is `int MPI_Get_library_version(char *, int *)`.
        let f: unsafe extern "C" fn(*mut c_char, *mut c_int) -> c_int =
            unsafe { self.function(c"MPI_Get_library_version")? };
        let mut buf = vec![0u8; VERSION_LEN];
        let mut len: c_int = 0;
        // SAFETY: `buf` has room for the longest version string of either ABI.
        check("MPI_Get_library_version", unsafe { f(buf.as_mut_ptr().cast(), &mut len) })?;
        buf.truncate((len.max(0) as usize).min(VERSION_LEN));
        let text = String::from_utf8_lossy(&buf);
        Ok(text.trim_matches(|c: char| c == '\0' || c.is_whitespace()).to_string())
    }
}

/// The path of the shared object that holds `addr`.
fn loaded_from(addr: *mut c_void) -> Option<String> {
    // SAFETY: Dl_info is plain data; dladdr fills it and returns 0 on failure.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr set dli_fname to a NUL-terminated string owned by the loader.
    Some(unsafe { CStr::from_ptr(info.dli_fname) }.to_string_lossy().into_owned())
}

/// The loader's message for the last failed dl* call of this thread.
fn dlerror() -> Option<String> {
    // SAFETY: dlerror returns null or a NUL-terminated string, valid until the next dl* call.
    let e = unsafe { libc::dlerror() };
    (!e.is_null()).then(|| unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned())
}

/// An error for a failed MPI call. MPI's default error handler aborts the job
/// before returning an error, so this is rare.
fn check(call: &str, rc: c_int) -> Result<()> {
    if rc != 0 {
        bail!("{call} failed with MPI error code {rc}");
    }
    Ok(())
}

/// The MPI calls mlm makes, on `MPI_COMM_WORLD`. Apart from the first three,
/// they are for an initialised, not yet finalised MPI.
pub trait Mpi: Send {
    fn initialized(&self) -> Result<bool>;
    fn finalized(&self) -> Result<bool>;
    /// `MPI_Init_thread(NULL, NULL, required, &provided)`; returns `provided`.
    fn init_thread(&self, required: c_int) -> Result<c_int>;
    fn finalize(&self) -> Result<()>;
    fn rank(&self) -> Result<usize>;
    fn size(&self) -> Result<usize>;
    /// In-place sum over all ranks.
    fn sum_f32(&self, data: &mut [f32]) -> Result<()>;
    fn broadcast_u64(&self, root: usize, value: &mut u64) -> Result<()>;
    fn broadcast_bytes(&self, root: usize, data: &mut [u8]) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Ends every process of the job; does not return when MPI works.
    fn abort(&self, code: c_int);
}

/// An Open MPI handle: the address of a predefined object.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Ptr(*mut c_void);

// SAFETY: the objects are Open MPI's globals, valid for the life of the process.
unsafe impl Send for Ptr {}

/// The predefined handles mlm uses, in the ABI's handle type `H`.
struct Handles<H> {
    world: H,
    float: H,
    byte: H,
    uint64: H,
    sum: H,
    in_place: Ptr,
}

/// The MPI functions with handles of type `H`.
struct Api<H> {
    h: Handles<H>,
    init_thread: unsafe extern "C" fn(*mut c_int, *mut *mut *mut c_char, c_int, *mut c_int) -> c_int,
    initialized: unsafe extern "C" fn(*mut c_int) -> c_int,
    finalized: unsafe extern "C" fn(*mut c_int) -> c_int,
    finalize: unsafe extern "C" fn() -> c_int,
    comm_rank: unsafe extern "C" fn(H, *mut c_int) -> c_int,
    comm_size: unsafe extern "C" fn(H, *mut c_int) -> c_int,
    allreduce: unsafe extern "C" fn(*const c_void, *mut c_void, c_int, H, H, H) -> c_int,
    bcast: unsafe extern "C" fn(*mut c_void, c_int, H, c_int, H) -> c_int,
    barrier: unsafe extern "C" fn(H) -> c_int,
    abort: unsafe extern "C" fn(H, c_int) -> c_int,
}

impl<H: Copy + Send + 'static> Api<H> {
    /// # Safety
    /// `H` must be passed like the library's `MPI_Comm`, `MPI_Datatype` and `MPI_Op`.
    unsafe fn load(lib: &Library, h: Handles<H>) -> Result<Self> {
        Ok(Self {
            h,
            init_thread: lib.function(c"MPI_Init_thread")?,
            initialized: lib.function(c"MPI_Initialized")?,
            finalized: lib.function(c"MPI_Finalized")?,
            finalize: lib.function(c"MPI_Finalize")?,
            comm_rank: lib.function(c"MPI_Comm_rank")?,
            comm_size: lib.function(c"MPI_Comm_size")?,
            allreduce: lib.function(c"MPI_Allreduce")?,
            bcast: lib.function(c"MPI_Bcast")?,
            barrier: lib.function(c"MPI_Barrier")?,
            abort: lib.function(c"MPI_Abort")?,
        })
    }

    fn bcast(&self, root: usize, data: *mut c_void, count: usize, dtype: H) -> Result<()> {
        // SAFETY: the callers pass a live buffer of `count` elements of `dtype`.
        let rc = unsafe { (self.bcast)(data, count as c_int, dtype, root as c_int, self.h.world) };
        check("MPI_Bcast", rc)
    }
}

impl<H: Copy + Send + 'static> Mpi for Api<H> {
    fn initialized(&self) -> Result<bool> {
        let mut flag = 0;
        // SAFETY: allowed at any time.
        check("MPI_Initialized", unsafe { (self.initialized)(&mut flag) })?;
        Ok(flag != 0)
    }

    fn finalized(&self) -> Result<bool> {
        let mut flag = 0;
        // SAFETY: allowed at any time.
        check("MPI_Finalized", unsafe { (self.finalized)(&mut flag) })?;
        Ok(flag != 0)
    }

    fn init_thread(&self, required: c_int) -> Result<c_int> {
        let mut provided = 0;
        // SAFETY: null argc/argv are allowed since MPI-2.
        let rc = unsafe { (self.init_thread)(std::ptr::null_mut(), std::ptr::null_mut(), required, &mut provided) };
        check("MPI_Init_thread", rc)?;
        Ok(provided)
    }

    fn finalize(&self) -> Result<()> {
        // SAFETY: the caller checked that MPI is initialised and not finalised.
        check("MPI_Finalize", unsafe { (self.finalize)() })
    }

    fn rank(&self) -> Result<usize> {
        let mut r = 0;
        // SAFETY: MPI is initialised (trait contract).
        check("MPI_Comm_rank", unsafe { (self.comm_rank)(self.h.world, &mut r) })?;
        Ok(r as usize)
    }

    fn size(&self) -> Result<usize> {
        let mut n = 0;
        // SAFETY: MPI is initialised (trait contract).
        check("MPI_Comm_size", unsafe { (self.comm_size)(self.h.world, &mut n) })?;
        Ok(n as usize)
    }

    fn sum_f32(&self, data: &mut [f32]) -> Result<()> {
        for piece in data.chunks_mut(MAX_COUNT) {
            let (h, n) = (&self.h, piece.len() as c_int);
            // SAFETY: `piece` is a live f32 buffer of `n` elements, summed in place.
            let rc = unsafe { (self.allreduce)(h.in_place.0, piece.as_mut_ptr().cast(), n, h.float, h.sum, h.world) };
            check("MPI_Allreduce", rc)?;
        }
        Ok(())
    }

    fn broadcast_u64(&self, root: usize, value: &mut u64) -> Result<()> {
        self.bcast(root, (value as *mut u64).cast(), 1, self.h.uint64)
    }

    fn broadcast_bytes(&self, root: usize, data: &mut [u8]) -> Result<()> {
        for piece in data.chunks_mut(MAX_COUNT) {
            self.bcast(root, piece.as_mut_ptr().cast(), piece.len(), self.h.byte)?;
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        // SAFETY: MPI is initialised (trait contract).
        check("MPI_Barrier", unsafe { (self.barrier)(self.h.world) })
    }

    fn abort(&self, code: c_int) {
        // SAFETY: MPI is initialised (trait contract).
        unsafe { (self.abort)(self.h.world, code) };
    }
}
