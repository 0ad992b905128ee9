//! GPU all-reduce through NCCL, loaded at run time from the copy libtorch
//! already uses ([`library`]; the build needs no CUDA). Collectives on bytes
//! (broadcast, barrier) go through the bootstrap communicator, which also
//! carried the NCCL unique id from rank 0: tcp under `mlm-launch`, MPI under
//! `mpirun`/`srun`, none at world size 1.
//!
//! Ordering with libtorch: tch gives no access to libtorch's current CUDA
//! stream, which is the legacy default stream (the null stream) unless a caller
//! changes it, and `mlm` never does. Two ways in:
//!
//! - [`Communicator::all_reduce_sum`] records an event on the null stream
//!   (the work that produced the tensor), makes the communicator's own stream
//!   wait for it, sums there and waits on the host for the sum's end event,
//!   against the timeout: no device-wide synchronise, and the host waits for
//!   the sum and what it depends on only. Everything but the overlapped
//!   gradient sum uses it (a handful of small sums per step at most: the
//!   step's loss and masked-token count, gradients when overlap is off).
//! - The overlapped gradient sum ([`crate::train::ddp::overlap`]) runs on a stream of
//!   the communicator's own, created non-blocking so that it never waits for the
//!   null stream implicitly. The training thread records a CUDA event on the
//!   null stream once a backward stage's gradients are queued
//!   ([`Communicator::marker`]); the communication thread makes the own stream
//!   wait for that event and queues the all-reduce there
//!   ([`Communicator::start_all_reduce_sum`]), so the sum of the upper layers'
//!   gradients runs on the GPU while the lower layers' backward kernels do.
//!   An event recorded after each sum dates it: while backward still runs,
//!   the communication thread polls them ([`Communicator::poll_started`]), so
//!   a sum stuck past the timeout (a dead peer) aborts the communicator even
//!   while the training thread waits on the device;
//!   [`Communicator::finish_started`] polls the last one against the timeout,
//!   and any error with sums in flight aborts the communicator and waits for
//!   the own stream before returning. The training thread queues the optimizer
//!   only after that, so no event is needed on the way back. The flat gradient
//!   lives for the whole run and a part in another dtype is kept alive by the
//!   caller until then, so libtorch's caching allocator never hands the
//!   memory of a tensor in flight to another kernel.
//!
//! No hang: the communicator is non-blocking. Every call returns at once and
//! is then polled (`ncclCommGetAsyncError`, then the stream) against
//! `distributed.timeout_s`; past it the communicator is aborted
//! (`ncclCommAbort`) and the call fails naming the rank, the collective and its
//! size, so a dead or stopped peer ends the job instead of hanging it.
//!
//! NCCL refuses two ranks of one communicator on the same GPU ("Duplicate GPU
//! detected"): give each rank its own device (`CUDA_VISIBLE_DEVICES`).
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{sys as cu, CudaContext};
use tch::Kind;

use super::{Communicator, Mark, Marker, Ready};

pub mod library;

use library::{Comm, Config, Nccl, NcclResult, UniqueId};

/// A warning when `NCCL_COMM_BLOCKING` (given as `value`) makes communicators
/// blocking: it overrides the non-blocking config this backend asks for, so a
/// call on a dead peer blocks inside NCCL and `distributed.timeout_s` cannot
/// end it.
pub fn blocking_warning(value: Option<&str>) -> Option<String> {
    let v = value?.trim();
    (!v.is_empty() && v != "0").then(|| {
        format!(
            "NCCL_COMM_BLOCKING={v} in the environment makes NCCL's calls blocking: distributed.timeout_s cannot stop \
             a collective on a dead or stuck peer, and the job may hang until its time limit; unset it"
        )
    })
}

/// Fails with an actionable message when NCCL cannot be loaded (see [`library`]).
pub fn check_available() -> Result<()> {
    library::load().map(|_| ())
}

/// A CUDA event of one context, destroyed on drop (also from another thread:
/// CUDA releases an event that a stream still waits for once the wait is over).
pub struct Event {
    event: cu::CUevent,
    ctx: Arc<CudaContext>,
}

// SAFETY: a CUDA event may be used from any thread that binds its context;
// every use here binds it first.
unsafe impl Send for Event {}

impl Event {
    /// Records an event on `stream` of `ctx` (null: the legacy default stream,
    /// libtorch's): it completes once the work queued there so far is done.
    fn record(ctx: &Arc<CudaContext>, stream: cu::CUstream) -> Result<Self> {
        ctx.bind_to_thread().map_err(|e| anyhow!("CUDA context: {e:?}"))?;
        let mut event: cu::CUevent = std::ptr::null_mut();
        let flags = cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: `event` is a valid out-pointer; the context is bound.
        cuda_check(unsafe { cu::cuEventCreate(&mut event, flags) }, "cuEventCreate")?;
        let this = Self { event, ctx: ctx.clone() };
        // SAFETY: a live event and a stream of the bound context.
        cuda_check(unsafe { cu::cuEventRecord(this.event, stream) }, "cuEventRecord")?;
        Ok(this)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: created by cuEventCreate, destroyed once here.
        unsafe { cu::cuEventDestroy_v2(self.event) };
    }
}

fn cuda_check(code: cu::CUresult, call: &str) -> Result<()> {
    match code {
        cu::CUresult::CUDA_SUCCESS => Ok(()),
        e => bail!("{call} failed: CUDA error {e:?}"),
    }
}

/// What [`NcclComm::wait`] waits for besides NCCL's own state.
#[derive(Clone, Copy)]
enum Until {
    /// The call was taken (a non-blocking communicator may still be queueing it).
    Queued,
    /// The event is complete.
    Event(cu::CUevent),
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
    /// The stream of the overlapped sums (created on first use, non-blocking).
    stream: cu::CUstream,
    /// The sums started on `stream` and not yet seen done: an event recorded
    /// after each, when it started, its elements.
    in_flight: VecDeque<(Event, Instant, usize)>,
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
        if let Some(warning) = blocking_warning(std::env::var("NCCL_COMM_BLOCKING").ok().as_deref()) {
            tracing::warn!("rank {rank}: {warning}");
        }
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
        let mut this = Self {
            nccl,
            comm,
            rank,
            world,
            device,
            bootstrap,
            ctx,
            timeout,
            failed: false,
            stream: std::ptr::null_mut(),
            in_flight: VecDeque::new(),
        };
        if code != library::SUCCESS && code != library::IN_PROGRESS {
            this.failed = true;
            return Err(nccl_error(nccl, rank, "ncclCommInitRankConfig", code, None));
        }
        let what = format!("joining the NCCL communicator of {world} ranks");
        this.wait(&what, Until::Queued)?;
        Ok(this)
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| anyhow!("rank {}: CUDA context: {e:?}", self.rank))
    }

    /// Checks `t` for an in-place all-reduce -> NCCL's dtype, its elements and
    /// the call's description for errors.
    fn describe(&self, t: &tch::Tensor) -> Result<(std::ffi::c_int, usize, String)> {
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
        let what = format!(
            "all-reduce of {n} {} ({:.1} MiB)",
            if dtype == library::FLOAT32 { "f32" } else { "bf16" },
            (n * t.kind().elt_size_in_bytes()) as f64 / (1 << 20) as f64
        );
        Ok((dtype, n, what))
    }

    /// Queues the in-place all-reduce of `t` (`n` elements of `dtype`) on
    /// `stream` and waits until NCCL has taken the call (not until it is done).
    fn enqueue(
        &mut self,
        send: &tch::Tensor,
        t: &tch::Tensor,
        dtype: std::ffi::c_int,
        n: usize,
        what: &str,
        stream: cu::CUstream,
    ) -> Result<()> {
        let (src, dst) = (send.data_ptr(), t.data_ptr());
        // SAFETY: `src` and `dst` address `n` contiguous elements of `dtype`
        // on this communicator's device ([`Self::describe`], the same for
        // both); they are the same (in place) or distinct tensors; `stream` is
        // null or this communicator's own.
        let code = unsafe { (self.nccl.all_reduce)(src, dst, n, dtype, library::SUM, self.comm, stream.cast()) };
        if code != library::SUCCESS && code != library::IN_PROGRESS {
            self.failed = true;
            return Err(nccl_error(self.nccl, self.rank, &format!("{what}: ncclAllReduce"), code, Some(self.comm)));
        }
        self.wait(what, Until::Queued)
    }

    /// [`Communicator::start_all_reduce_sum`]: the own stream waits for
    /// `after`, then sums `t` (or `send` into `t`); an event after it dates the sum.
    fn start(&mut self, send: Option<&tch::Tensor>, t: &tch::Tensor, after: Ready) -> Result<()> {
        let (dtype, n, what) = self.describe(t)?;
        if let Some(send) = send {
            let (send_dtype, send_n, _) = self.describe(send)?;
            if (send_dtype, send_n) != (dtype, n) {
                bail!("rank {}: an out-of-place all-reduce needs two tensors of one size and dtype", self.rank);
            }
        }
        if n == 0 {
            return Ok(());
        }
        self.bind()?;
        let rank = self.rank;
        if self.stream.is_null() {
            let flags = cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
            // SAFETY: a valid out-pointer; the context is bound.
            let code = unsafe { cu::cuStreamCreate(&mut self.stream, flags) };
            cuda_check(code, "cuStreamCreate").map_err(|e| anyhow!("rank {rank}: {e}"))?;
        }
        let after = match after {
            Ready::Now => None,
            Ready::After(mark) => Some(
                mark.downcast::<Event>().ok_or_else(|| anyhow!("rank {rank}: {what}: a mark of another backend"))?,
            ),
        };
        if let Some(event) = &after {
            // SAFETY: a live event and stream of the bound context.
            let code = unsafe { cu::cuStreamWaitEvent(self.stream, event.event, 0) };
            cuda_check(code, "cuStreamWaitEvent").map_err(|e| anyhow!("rank {rank}: {what}: {e}"))?;
        }
        drop(after); // the wait is queued: CUDA keeps the event until it is over
        self.enqueue(send.unwrap_or(t), t, dtype, n, &what, self.stream)?;
        let done = Event::record(&self.ctx, self.stream).map_err(|e| anyhow!("rank {rank}: {what}: {e}"))?;
        self.in_flight.push_back((done, Instant::now(), n));
        Ok(())
    }

    /// [`Communicator::poll_started`]: NCCL's state, then the oldest sums.
    fn check_in_flight(&mut self) -> Result<()> {
        let rank = self.rank;
        if self.in_flight.is_empty() {
            return Ok(());
        }
        if self.failed {
            bail!("rank {rank}: an earlier NCCL call failed");
        }
        self.bind()?;
        self.in_progress("an all-reduce overlapped with backward")?;
        while let Some((event, since, elems)) = self.in_flight.front() {
            // SAFETY: a live event of the bound context.
            match unsafe { cu::cuEventQuery(event.event) } {
                cu::CUresult::CUDA_SUCCESS => {
                    self.in_flight.pop_front();
                }
                cu::CUresult::CUDA_ERROR_NOT_READY if since.elapsed() < self.timeout => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => bail!(
                    "rank {rank}: an all-reduce of {elems} gradient elements overlapped with backward did not \
                     finish within {} s (distributed.timeout_s): another rank is stuck, dead or slower by that \
                     much; the communicator was aborted",
                    self.timeout.as_secs()
                ),
                e => bail!("rank {rank}: CUDA error {e:?} while waiting for an overlapped all-reduce"),
            }
        }
        Ok(())
    }

    /// [`Communicator::finish_started`]: waits for the last sum's event.
    fn finish(&mut self) -> Result<()> {
        let rank = self.rank;
        if self.failed {
            bail!("rank {rank}: an earlier NCCL call failed");
        }
        self.bind()?;
        let (count, elems) = (self.in_flight.len(), self.in_flight.iter().map(|f| f.2).sum::<usize>());
        let last = self.in_flight.back().map(|f| f.0.event).expect("not empty");
        let what = format!("{count} all-reduces of {elems} gradient elements overlapped with backward");
        self.wait(&what, Until::Event(last))?;
        self.in_flight.clear();
        Ok(())
    }

    /// After an error with sums in flight: aborts the communicator (its kernels
    /// stop) and waits for the own stream, so that no sum writes into memory
    /// its caller frees once the error returns.
    fn abandon_started(&mut self) {
        self.failed = true;
        let _ = self.bind();
        if !self.comm.is_null() {
            // SAFETY: aborting a live communicator unblocks its kernels; it is
            // not used again (`comm` null).
            unsafe { (self.nccl.comm_abort)(self.comm) };
            self.comm = std::ptr::null_mut();
        }
        if !self.stream.is_null() {
            // SAFETY: the own stream of the bound context.
            unsafe { cu::cuStreamSynchronize(self.stream) };
        }
        self.in_flight.clear();
    }

    /// Whether the communicator still has a call in progress (non-blocking
    /// NCCL); its error, naming `what`, when one failed.
    fn in_progress(&mut self, what: &str) -> Result<bool> {
        let rank = self.rank;
        let mut state: NcclResult = library::SUCCESS;
        // SAFETY: `comm` is live; `state` is a valid out-pointer.
        let code = unsafe { (self.nccl.comm_get_async_error)(self.comm, &mut state) };
        if code != library::SUCCESS {
            self.failed = true;
            return Err(nccl_error(self.nccl, rank, "ncclCommGetAsyncError", code, Some(self.comm)));
        }
        if state != library::SUCCESS && state != library::IN_PROGRESS {
            self.failed = true;
            return Err(nccl_error(self.nccl, rank, &format!("{what}: NCCL"), state, Some(self.comm)));
        }
        Ok(state == library::IN_PROGRESS)
    }

    /// `result`, after [`Self::abandon_started`] when it is an error.
    fn or_abandon(&mut self, result: Result<()>) -> Result<()> {
        if result.is_err() {
            self.abandon_started();
        }
        result
    }

    /// Polls until the communicator has no call in progress and `until` holds,
    /// an error, or the timeout.
    fn wait(&mut self, what: &str, until: Until) -> Result<()> {
        let rank = self.rank;
        let deadline = Instant::now() + self.timeout;
        let mut spins = 0u32;
        loop {
            if !self.in_progress(what)? {
                // SAFETY: a live event of the bound context.
                let done = match until {
                    Until::Queued => return Ok(()),
                    Until::Event(event) => unsafe { cu::cuEventQuery(event) },
                };
                match done {
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
        let (_, n, what) = self.describe(t)?;
        if n == 0 {
            return Ok(());
        }
        self.bind()?;
        let rank = self.rank;
        let result = Event::record(&self.ctx, std::ptr::null_mut())
            .map_err(|e| anyhow!("rank {rank}: {what}: {e}"))
            .and_then(|after| self.start(None, t, Ready::After(Mark::new(after))))
            .and_then(|()| {
                let done = self.in_flight.back().map(|f| f.0.event).expect("start queued the sum");
                self.wait(&what, Until::Event(done))
            });
        if result.is_ok() {
            self.in_flight.clear();
        }
        self.or_abandon(result)
    }

    fn marker(&self) -> Option<Marker> {
        let (ctx, rank) = (self.ctx.clone(), self.rank);
        Some(Box::new(move || {
            let event = Event::record(&ctx, std::ptr::null_mut()).map_err(|e| anyhow!("rank {rank}: {e}"))?;
            Ok(Ready::After(Mark::new(event)))
        }))
    }

    fn start_all_reduce_sum(&mut self, t: &mut tch::Tensor, after: Ready) -> Result<()> {
        let result = self.start(None, t, after);
        self.or_abandon(result)
    }

    fn start_all_reduce_sum_into(&mut self, send: &tch::Tensor, recv: &mut tch::Tensor, after: Ready) -> Result<()> {
        let result = self.start(Some(send), recv, after);
        self.or_abandon(result)
    }

    fn poll_started(&mut self) -> Result<()> {
        let result = self.check_in_flight();
        self.or_abandon(result)
    }

    fn finish_started(&mut self) -> Result<()> {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        let result = self.finish();
        self.or_abandon(result)
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
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `comm` came from ncclCommInitRankConfig and `stream` from
        // cuStreamCreate; each is released once here (`comm` is null once aborted).
        unsafe {
            if self.failed && !self.comm.is_null() {
                (self.nccl.comm_abort)(self.comm);
            } else if !self.comm.is_null() {
                if let Some(finalize) = self.nccl.comm_finalize {
                    finalize(self.comm);
                    let _ = self.wait("closing the NCCL communicator", Until::Queued);
                }
                if !self.comm.is_null() {
                    (self.nccl.comm_destroy)(self.comm);
                }
            }
            if !self.stream.is_null() {
                cu::cuStreamDestroy_v2(self.stream);
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
