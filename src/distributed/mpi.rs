//! Collectives through the system MPI (the `mpi` crate over Open MPI), for jobs
//! started by `mpirun` or `srun`. On CPUs it does the all-reduce; on GPUs it only
//! bootstraps NCCL (broadcast of the unique id) and serves bytes and barriers.
//!
//! MPI is initialised once per process (`MPI_Init_thread`, serialized threading)
//! and finalised when the communicator is dropped; it cannot be initialised again
//! afterwards, so keep one communicator for the life of the process.
use std::sync::atomic::{AtomicBool, Ordering};

use ::mpi::collective::SystemOperation;
use ::mpi::environment::Universe;
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};
use ::mpi::Threading;
use anyhow::{bail, Result};

use super::tensor::{self, Elem};
use super::Communicator;

/// Elements per MPI call: MPI counts are C ints.
const MAX_COUNT: usize = 1 << 30;

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// The MPI world of this process.
pub struct MpiComm {
    // Field order: the communicator goes before the universe finalises MPI.
    world: SimpleCommunicator,
    _universe: Universe,
    rank: usize,
    size: usize,
    scratch: Vec<f32>,
}

// SAFETY: MPI is initialised with `Threading::Serialized` (checked in `init`), so
// any one thread may call it at a time; `&mut self` on every call serialises them.
unsafe impl Send for MpiComm {}

impl MpiComm {
    /// Initialises MPI (once per process) and returns the world communicator.
    pub fn init() -> Result<Self> {
        if INITIALISED.swap(true, Ordering::SeqCst) {
            bail!("MPI is initialised once per process and was already used; keep the first communicator");
        }
        let Some((universe, threading)) = ::mpi::initialize_with_threading(Threading::Serialized) else {
            bail!("MPI was already initialised by something else in this process");
        };
        if !matches!(threading, Threading::Serialized | Threading::Multiple) {
            bail!("the MPI library offers thread level {threading:?}; mlm needs at least Serialized");
        }
        let world = universe.world();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        Ok(Self { world, _universe: universe, rank, size, scratch: Vec::new() })
    }

    fn sum_f32(&mut self, data: &mut [f32]) {
        self.scratch.resize(data.len().min(MAX_COUNT), 0.0);
        for piece in data.chunks_mut(MAX_COUNT) {
            let out = &mut self.scratch[..piece.len()];
            self.world.all_reduce_into(&*piece, out, SystemOperation::sum());
            piece.copy_from_slice(out);
        }
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&mut self, t: &mut tch::Tensor) -> Result<()> {
        let elem = Elem::of(t, self.rank)?;
        let rank = self.rank;
        tensor::on_host(t, rank, |host| {
            match elem {
                Elem::F32 => {
                    // SAFETY: a contiguous CPU f32 tensor, not otherwise viewed here.
                    let data = unsafe { tensor::f32_slice(host) };
                    self.sum_f32(data);
                }
                Elem::Bf16 => {
                    // Sum in f32, round once (libtorch rounds to nearest even).
                    let mut work = host.to_kind(tch::Kind::Float);
                    // SAFETY: `work` is a fresh contiguous CPU f32 tensor.
                    self.sum_f32(unsafe { tensor::f32_slice(&mut work) });
                    host.copy_(&work);
                }
            }
            Ok(())
        })
    }

    fn broadcast_bytes(&mut self, root: usize, data: &mut Vec<u8>) -> Result<()> {
        if root >= self.size {
            bail!("rank {}: broadcast from rank {root} in a job of {} workers", self.rank, self.size);
        }
        let from = self.world.process_at_rank(root as i32);
        let mut len = data.len() as u64;
        from.broadcast_into(&mut len);
        data.resize(len as usize, 0);
        for piece in data.chunks_mut(MAX_COUNT) {
            from.broadcast_into(piece);
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn name(&self) -> &'static str {
        "mpi"
    }
}

/// The MPI library a job under `mpirun` would use: (path, version).
pub fn library_info() -> Result<(String, String)> {
    bail!("linked at build time (libmpi.so.40)")
}
