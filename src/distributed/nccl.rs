//! GPU all-reduce through NCCL, loaded at run time by `cudarc` (the build needs
//! no CUDA). Collectives on bytes (broadcast, barrier) go through the bootstrap
//! communicator, which also carried the NCCL unique id from rank 0: tcp under
//! `mlm-launch`, MPI under `mpirun`/`srun`, none at world size 1.
//!
//! Ordering with libtorch: tch gives no access to libtorch's current CUDA
//! stream, so NCCL runs on the legacy default stream (the null stream, which is
//! libtorch's default stream unless a caller changes it), and the device is
//! synchronised before and after each all-reduce. The first sync makes the call
//! correct whatever stream produced the tensor; the second makes errors surface
//! in this call and the result safe for any stream. For data parallelism (one
//! all-reduce of the flat gradient per step) the cost is one pipeline drain.
//!
//! NCCL refuses two ranks of one communicator on the same GPU ("Duplicate GPU
//! detected"): give each rank its own device (`CUDA_VISIBLE_DEVICES`).
use std::ffi::CStr;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use cudarc::driver::CudaContext;
use cudarc::nccl::{result as nccl, sys};
use tch::Kind;

use super::Communicator;

/// Fails with an actionable message when `libnccl.so` cannot be loaded.
pub fn check_available() -> Result<()> {
    // SAFETY: only tries to open the library.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    let hint = match find_libnccl() {
        Some(p) => format!(
            "found {p}, which is not under a name the loader tries: `mkdir -p ~/.cache/mlm/nccl && ln -sf {p} ~/.cache/mlm/nccl/libnccl.so` \
             and `export LD_LIBRARY_PATH=$HOME/.cache/mlm/nccl:$LD_LIBRARY_PATH`"
        ),
        None => "install NCCL (e.g. `pip install nvidia-nccl-cu13` or NVIDIA's libnccl2) and put the folder holding libnccl.so on LD_LIBRARY_PATH"
            .to_string(),
    };
    bail!(
        "libnccl.so not found; the nccl backend loads NCCL at run time: {hint}; \
         or set distributed.backend = \"mpi\" or \"tcp\" (all-reduce through host memory, slower)"
    )
}

/// A `libnccl.so.2` next to the loaded libtorch (pip's `nvidia/nccl/lib`) or
/// in the usual system folders.
fn find_libnccl() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
        if path.contains("libnccl.so") {
            candidates.push(path.into());
        }
        if path.ends_with("libtorch_cpu.so") {
            // site-packages/torch/lib/libtorch_cpu.so -> site-packages/nvidia/nccl/lib
            let p = std::path::Path::new(path);
            if let Some(site) = p.parent().and_then(|d| d.parent()).and_then(|d| d.parent()) {
                candidates.push(site.join("nvidia/nccl/lib/libnccl.so.2"));
            }
        }
    }
    candidates.push("/usr/lib/x86_64-linux-gnu/libnccl.so.2".into());
    candidates.push("/usr/local/cuda/lib64/libnccl.so.2".into());
    candidates.into_iter().find(|p| p.exists()).map(|p| p.display().to_string())
}

/// One rank of an NCCL communicator on one GPU.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    device: usize,
    bootstrap: Box<dyn Communicator>,
    ctx: Arc<CudaContext>,
    failed: bool,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time;
// `&mut self` serialises the calls and each call binds the CUDA context first.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Makes the communicator on CUDA device `device`: rank 0 creates the
    /// unique id, `bootstrap` broadcasts it.
    pub fn new(mut bootstrap: Box<dyn Communicator>, device: usize) -> Result<Self> {
        let (rank, world) = (bootstrap.rank(), bootstrap.world_size());
        check_available().map_err(|e| anyhow!("rank {rank}: {e}"))?;
        let ctx =
            CudaContext::new(device).map_err(|e| anyhow!("rank {rank}: cannot open CUDA device {device}: {e:?}"))?;
        let mut id_bytes = Vec::new();
        if rank == 0 {
            let id = nccl::get_uniqueid().map_err(|e| nccl_error(rank, "ncclGetUniqueId", e.0, None))?;
            id_bytes = id.internal.iter().map(|c| *c as u8).collect();
        }
        bootstrap.broadcast_bytes(0, &mut id_bytes)?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        if id_bytes.len() != id.internal.len() {
            bail!("rank {rank}: got a {}-byte NCCL id from rank 0, expected 128", id_bytes.len());
        }
        for (d, s) in id.internal.iter_mut().zip(&id_bytes) {
            *d = *s as _;
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id is the same on every rank.
        unsafe { nccl::comm_init_rank(&mut comm, world as i32, id, rank as i32) }
            .map_err(|e| nccl_error(rank, "ncclCommInitRank", e.0, None))?;
        Ok(Self { comm, rank, world, device, bootstrap, ctx, failed: false })
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, t: &mut tch::Tensor) -> Result<()> {
        let rank = self.rank;
        if self.failed {
            bail!("rank {rank}: an earlier NCCL call failed");
        }
        let dtype = match t.kind() {
            Kind::Float => sys::ncclDataType_t::ncclFloat32,
            Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
            k => bail!("rank {rank}: all_reduce_sum supports f32 and bf16 tensors, got {k:?}"),
        };
        if t.device() != tch::Device::Cuda(self.device) {
            bail!("rank {rank}: the nccl backend reduces tensors on cuda:{}, got one on {:?}", self.device, t.device());
        }
        if !t.is_contiguous() {
            bail!("rank {rank}: all_reduce_sum needs a contiguous tensor");
        }
        let n = t.numel();
        if n == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(|e| anyhow!("rank {rank}: CUDA context: {e:?}"))?;
        tch::Cuda::synchronize(self.device as i64);
        let ptr = t.data_ptr();
        // SAFETY: `ptr` addresses `n` contiguous elements of `dtype` on this
        // communicator's device; in-place all-reduce is allowed by NCCL.
        let res =
            unsafe { nccl::all_reduce(ptr, ptr, n, dtype, sys::ncclRedOp_t::ncclSum, self.comm, std::ptr::null_mut()) };
        if let Err(e) = res {
            self.failed = true;
            return Err(nccl_error(rank, "ncclAllReduce", e.0, Some(self.comm)));
        }
        tch::Cuda::synchronize(self.device as i64);
        Ok(())
    }

    fn broadcast_bytes(&mut self, root: usize, data: &mut Vec<u8>) -> Result<()> {
        self.bootstrap.broadcast_bytes(root, data)
    }

    fn barrier(&mut self) -> Result<()> {
        self.bootstrap.barrier()
    }

    fn name(&self) -> &'static str {
        "nccl"
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `comm` came from ncclCommInitRank and is released once here.
        unsafe {
            let _ = if self.failed { nccl::comm_abort(self.comm) } else { nccl::comm_destroy(self.comm) };
        }
    }
}

/// NCCL's own words for `code` (and the communicator's last error), with a hint.
fn nccl_error(rank: usize, call: &str, code: sys::ncclResult_t, comm: Option<sys::ncclComm_t>) -> anyhow::Error {
    // SAFETY: NCCL returns static NUL-terminated strings (or null).
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let mut msg = format!("rank {rank}: {call} failed: {}", text(unsafe { sys::ncclGetErrorString(code) }));
    if let Some(c) = comm {
        let last = text(unsafe { sys::ncclGetLastError(c) });
        if !last.is_empty() {
            msg.push_str(&format!(" ({last})"));
        }
    }
    if code == sys::ncclResult_t::ncclInvalidUsage {
        msg.push_str("; if NCCL reported \"Duplicate GPU detected\", two ranks share one GPU: give each its own (CUDA_VISIBLE_DEVICES / mlm-launch --gpus)");
    }
    anyhow!(msg)
}
