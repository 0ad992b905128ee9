//! GPU all-reduce through NCCL, loaded at run time from the copy libtorch
//! already uses ([`library`]; the build needs no CUDA). Collectives on bytes
//! (broadcast, barrier) go through the bootstrap communicator, which also
//! carried the NCCL unique id from rank 0: tcp under `mlm-launch`, MPI under
//! `mpirun`/`srun`, none at world size 1.
//!
//! Ordering with libtorch: tch gives no access to libtorch's current CUDA
//! stream, so NCCL runs on the legacy default stream (the null stream, which is
//! libtorch's default stream unless a caller changes it), and the device is
//! synchronised before each all-reduce, which makes the call correct whatever
//! stream produced the tensor. For data parallelism (one all-reduce of the flat
//! gradient per step) the cost is one pipeline drain.
//!
//! No hang: the communicator is non-blocking. Every call returns at once and
//! is then polled (`ncclCommGetAsyncError`, then the stream) against
//! `distributed.timeout_s`; past it the communicator is aborted
//! (`ncclCommAbort`) and the call fails naming the rank, the collective and its
//! size, so a dead or stopped peer ends the job instead of hanging it.
//!
//! NCCL refuses two ranks of one communicator on the same GPU ("Duplicate GPU
//! detected"): give each rank its own device (`CUDA_VISIBLE_DEVICES`).
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{sys as cu, CudaContext};
use tch::Kind;

use super::Communicator;

pub mod library;

use library::{Comm, Config, Nccl, NcclResult, UniqueId};

/// Fails with an actionable message when NCCL cannot be loaded (see [`library`]).
pub fn check_available() -> Result<()> {
    library::load().map(|_| ())
}

/// One rank of a non-blocking NCCL communicator on one GPU. Every call is
/// polled against `timeout` (`distributed.timeout_s`); past it the communicator
/// is aborted and the call fails naming the rank, the collective and its size.
pub struct NcclComm {
    nccl: &'static Nccl,
    comm: Comm,
    rank: usize,
    world: usize,
    device: usize,
    bootstrap: Box<dyn Communicator>,
    ctx: Arc<CudaContext>,
    timeout: Duration,
    failed: bool,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time;
// `&mut self` serialises the calls and each call binds the CUDA context first.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Makes the communicator on CUDA device `device`: rank 0 creates the
    /// unique id, `bootstrap` broadcasts it.
    pub fn new(mut bootstrap: Box<dyn Communicator>, device: usize, timeout: Duration) -> Result<Self> {
        let (rank, world) = (bootstrap.rank(), bootstrap.world_size());
        let nccl = library::load().map_err(|e| anyhow!("rank {rank}: {e}"))?;
        let ctx =
            CudaContext::new(device).map_err(|e| anyhow!("rank {rank}: cannot open CUDA device {device}: {e:?}"))?;
        let mut id_bytes = Vec::new();
        if rank == 0 {
            let mut id = UniqueId { internal: [0; 128] };
            // SAFETY: `id` is a valid out-pointer.
            let code = unsafe { (nccl.get_unique_id)(&mut id) };
            if code != library::SUCCESS {
                return Err(nccl_error(nccl, rank, "ncclGetUniqueId", code, None));
            }
            id_bytes = id.internal.iter().map(|c| *c as u8).collect();
        }
        bootstrap.broadcast_bytes(0, &mut id_bytes)?;
        let mut id = UniqueId { internal: [0; 128] };
        if id_bytes.len() != id.internal.len() {
            bail!("rank {rank}: got a {}-byte NCCL id from rank 0, expected 128", id_bytes.len());
        }
        for (d, s) in id.internal.iter_mut().zip(&id_bytes) {
            *d = *s as _;
        }
        ctx.bind_to_thread().map_err(|e| anyhow!("rank {rank}: CUDA context: {e:?}"))?;
        let mut comm: Comm = std::ptr::null_mut();
        let mut config = Config::non_blocking();
        // SAFETY: `comm` and `config` are valid pointers; the id is the same on every rank.
        let code = unsafe { (nccl.comm_init_rank_config)(&mut comm, world as i32, id, rank as i32, &mut config) };
        let mut this = Self { nccl, comm, rank, world, device, bootstrap, ctx, timeout, failed: false };
        if code != library::SUCCESS && code != library::IN_PROGRESS {
            this.failed = true;
            return Err(nccl_error(nccl, rank, "ncclCommInitRankConfig", code, None));
        }
        let what = format!("joining the NCCL communicator of {world} ranks");
        this.wait(&what, false)?;
        Ok(this)
    }

    /// Polls until the communicator has no call in progress (and, with
    /// `stream`, the null stream's work is done), an error, or the timeout.
    fn wait(&mut self, what: &str, stream: bool) -> Result<()> {
        let rank = self.rank;
        let deadline = Instant::now() + self.timeout;
        let mut spins = 0u32;
        loop {
            let mut state: NcclResult = library::SUCCESS;
            // SAFETY: `comm` is live; `state` is a valid out-pointer.
            let code = unsafe { (self.nccl.comm_get_async_error)(self.comm, &mut state) };
            if code != library::SUCCESS {
                self.failed = true;
                return Err(nccl_error(self.nccl, rank, "ncclCommGetAsyncError", code, Some(self.comm)));
            }
            if state != library::SUCCESS && state != library::IN_PROGRESS {
                self.failed = true;
                let call = format!("{what}: NCCL");
                return Err(nccl_error(self.nccl, rank, &call, state, Some(self.comm)));
            }
            if state == library::SUCCESS {
                if !stream {
                    return Ok(());
                }
                // SAFETY: the null stream of the bound context.
                match unsafe { cu::cuStreamQuery(std::ptr::null_mut()) } {
                    cu::CUresult::CUDA_SUCCESS => return Ok(()),
                    cu::CUresult::CUDA_ERROR_NOT_READY => {}
                    e => {
                        self.failed = true;
                        bail!("rank {rank}: {what}: CUDA error {e:?} while waiting for it");
                    }
                }
            }
            if Instant::now() >= deadline {
                self.failed = true;
                // SAFETY: aborting a live communicator unblocks its kernels.
                unsafe { (self.nccl.comm_abort)(self.comm) };
                self.comm = std::ptr::null_mut();
                bail!(
                    "rank {rank}: {what} did not finish within {} s (distributed.timeout_s): another rank is stuck, \
                     dead or slower by that much; the communicator was aborted",
                    self.timeout.as_secs()
                );
            }
            spins += 1;
            if spins < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
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
            Kind::Float => library::FLOAT32,
            Kind::BFloat16 => library::BFLOAT16,
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
        let what = format!(
            "all-reduce of {n} {} ({:.1} MiB)",
            if dtype == library::FLOAT32 { "f32" } else { "bf16" },
            (n * t.kind().elt_size_in_bytes()) as f64 / (1 << 20) as f64
        );
        // SAFETY: `ptr` addresses `n` contiguous elements of `dtype` on this
        // communicator's device; in-place all-reduce is allowed by NCCL.
        let code = unsafe { (self.nccl.all_reduce)(ptr, ptr, n, dtype, library::SUM, self.comm, std::ptr::null_mut()) };
        if code != library::SUCCESS && code != library::IN_PROGRESS {
            self.failed = true;
            return Err(nccl_error(self.nccl, rank, &format!("{what}: ncclAllReduce"), code, Some(self.comm)));
        }
        self.wait(&what, true)
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

    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        self.bootstrap.set_timeout(timeout);
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.comm.is_null() {
            return;
        }
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `comm` came from ncclCommInitRankConfig and is released once here.
        unsafe {
            if self.failed {
                (self.nccl.comm_abort)(self.comm);
            } else {
                if let Some(finalize) = self.nccl.comm_finalize {
                    finalize(self.comm);
                    let _ = self.wait("closing the NCCL communicator", false);
                }
                if !self.comm.is_null() {
                    (self.nccl.comm_destroy)(self.comm);
                }
            }
        }
    }
}

/// NCCL's own words for `code` (and the communicator's last error), with a hint.
fn nccl_error(nccl: &Nccl, rank: usize, call: &str, code: NcclResult, comm: Option<Comm>) -> anyhow::Error {
    let mut msg = format!("rank {rank}: {call} failed: {}", nccl.error_string(code));
    if let Some(c) = comm {
        // SAFETY: callers pass the communicator the failed call used.
        let last = unsafe { nccl.last_error(c) };
        if !last.is_empty() {
            msg.push_str(&format!(" ({last})"));
        }
    }
    if code == library::INVALID_USAGE {
        msg.push_str("; if NCCL reported \"Duplicate GPU detected\", two ranks share one GPU: give each its own (CUDA_VISIBLE_DEVICES / mlm-launch --gpus)");
    }
    anyhow!(msg)
}
