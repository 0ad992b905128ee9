//! What the workers of a data-parallel job exchange during training.
//!
//! The loss of a step is normalised by the masked tokens of the whole step on
//! all workers, so summing the workers' gradients gives exactly the gradient of
//! one process with the summed batch (no division by the world size).
pub mod overlap;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::config::{CommDtype, DistributedConfig};
use crate::distributed::{self, Communicator, Marker, Ready, WorldInfo};
use crate::train::flat::FlatParams;

pub struct GradSync {
    pub comm: Box<dyn Communicator>,
    dtype: CommDtype,
    bucket: i64,
    device: Device,
}

impl GradSync {
    /// Joins the job's workers (a no-op communicator for a single process) and
    /// checks that every worker runs the same job: `job` is the fingerprint of
    /// its config (see [`distributed::init`]).
    pub fn join(cfg: &DistributedConfig, device: Device, job: &str) -> Result<Self> {
        let comm = distributed::init(cfg, device, job)?;
        let mut sync = Self { comm, dtype: cfg.comm_dtype, bucket: cfg.bucket_elems as i64, device };
        sync.check_same_job(job)?;
        Ok(sync)
    }

    /// Around a given communicator (tests).
    #[cfg(test)]
    pub(crate) fn with_comm(comm: Box<dyn Communicator>, dtype: CommDtype, device: Device) -> Self {
        Self { comm, dtype, bucket: 0, device }
    }

    /// Every rank compares its job fingerprint with rank 0's; all fail together
    /// when one differs, rather than train on mixed gradients.
    fn check_same_job(&mut self, job: &str) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let mut theirs = job.as_bytes().to_vec();
        self.comm.broadcast_bytes(0, &mut theirs).context("checking that every worker runs the same config")?;
        let differs = theirs != job.as_bytes();
        let n = self.sum(&[differs as u8 as f64])?[0] as usize;
        let rank = self.rank();
        if differs {
            bail!(
                "rank {rank} runs another config than rank 0 (settings that shape training, or output_dir): every \
                 worker of a job must run the same config file with the same --set overrides"
            );
        }
        if n > 0 {
            bail!("rank {rank}: {n} worker(s) run another config than rank 0; stopping (see their errors)");
        }
        Ok(())
    }

    /// How long later collectives may wait for the other ranks.
    pub fn set_timeout(&mut self, timeout: std::time::Duration) {
        self.comm.set_timeout(timeout);
    }

    /// Rank 0's `value` on every rank.
    pub fn broadcast_string(&mut self, value: &str) -> Result<String> {
        if self.world() == 1 {
            return Ok(value.to_string());
        }
        let mut bytes = value.as_bytes().to_vec();
        self.comm.broadcast_bytes(0, &mut bytes)?;
        String::from_utf8(bytes).context("rank 0 sent a string that is not UTF-8")
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    /// Sums `values` over the workers (exact for integers below 2^24).
    pub fn sum(&mut self, values: &[f64]) -> Result<Vec<f64>> {
        if self.world() == 1 {
            return Ok(values.to_vec());
        }
        let mut t = Tensor::from_slice(&values.iter().map(|&v| v as f32).collect::<Vec<f32>>()).to_device(self.device);
        self.comm.all_reduce_sum(&mut t).context("summing over the workers")?;
        Ok(Vec::<f32>::try_from(t.to_device(Device::Cpu))?.into_iter().map(f64::from).collect())
    }

    /// Sums the flat fp32 gradient over the workers, in place, in buckets and in
    /// the configured communication dtype.
    pub fn sum_grads(&mut self, params: &mut FlatParams) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        for (start, len) in bucket_ranges(0, params.numel(), self.bucket) {
            self.reduce_part(&mut params.grad_range(start, len))?;
        }
        Ok(())
    }

    /// Sums one range of the flat fp32 gradient over the workers, in place, in
    /// the configured communication dtype.
    pub fn reduce_part(&mut self, part: &mut Tensor) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        let wire = self.wire_kind();
        if part.kind() == wire {
            return self.comm.all_reduce_sum(part);
        }
        let mut on_wire = part.to_kind(wire);
        self.comm.all_reduce_sum(&mut on_wire)?;
        tch::no_grad(|| part.copy_(&on_wire));
        Ok(())
    }

    /// Where the backend sums on a device stream of its own (NCCL), what marks
    /// the device work queued so far ([`Communicator::marker`]); `None` for one
    /// worker and for the CPU backends, which sum in order with the caller.
    pub fn marker(&self) -> Option<Marker> {
        if self.world() == 1 {
            return None;
        }
        self.comm.marker()
    }

    /// The dtype the gradient travels in (`distributed.comm_dtype`).
    pub fn wire_kind(&self) -> Kind {
        match self.dtype {
            CommDtype::Fp32 => Kind::Float,
            CommDtype::Bf16 => Kind::BFloat16,
        }
    }

    /// Starts summing `part`, already in [`Self::wire_kind`], over the workers
    /// once the work `after` marks is done ([`Communicator::start_all_reduce_sum`]);
    /// [`Self::finish_parts`] waits for it.
    pub fn start_part(&mut self, part: &mut Tensor, after: Ready) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        self.comm.start_all_reduce_sum(part, after)
    }

    /// Checks the sums in flight without waiting: an error once one has run
    /// past the timeout or failed ([`Communicator::poll_started`]).
    pub fn poll_parts(&mut self) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        self.comm.poll_started()
    }

    /// Waits for the sums [`Self::start_part`] started.
    pub fn finish_parts(&mut self) -> Result<()> {
        if self.world() == 1 {
            return Ok(());
        }
        self.comm.finish_started()
    }

    pub fn barrier(&mut self) -> Result<()> {
        self.comm.barrier()
    }
}

/// `[start, start + len)` cut into pieces of at most `bucket` elements (0: whole).
pub fn bucket_ranges(start: i64, len: i64, bucket: i64) -> impl Iterator<Item = (i64, i64)> {
    let step = if bucket > 0 { bucket } else { len.max(1) };
    (start..start + len).step_by(step as usize).map(move |s| (s, step.min(start + len - s)))
}

/// The device of this worker: under `mpirun`/`srun` with every GPU visible to
/// every rank, rank `local_rank` takes GPU `local_rank`.
pub fn worker_device(device: Device) -> Result<Device> {
    match device {
        Device::Cuda(_) => {
            let (info, _) = WorldInfo::from_env()?;
            let n = tch::Cuda::device_count().max(1) as usize;
            Ok(Device::Cuda(info.local_rank % n))
        }
        d => Ok(d),
    }
}
