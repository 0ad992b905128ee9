//! Collectives through the system MPI, for jobs started by `mpirun` or `srun`.
//! On CPUs it does the all-reduce; on GPUs it only bootstraps NCCL (broadcast of
//! the unique id) and serves bytes and barriers.
//!
//! MPI is loaded at run time ([`ffi`]: `MLM_MPI_LIB`, else `libmpi.so.40`,
//! `libmpi.so.12`, `libmpi.so`), so `mlm` starts without any MPI installed and
//! only a job on the mpi backend needs one. Open MPI and the MPICH ABI (MPICH,
//! Intel MPI, Cray MPICH, MVAPICH) are both understood.
//!
//! MPI is initialised once per process (`MPI_Init_thread`, serialized threading)
//! and finalised when the communicator is dropped; it cannot be initialised again
//! afterwards, so keep one communicator for the life of the process.
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};

use super::tensor::{self, Elem};
use super::watchdog::Watchdog;
use super::Communicator;
use std::time::Duration;

mod ffi;

use ffi::{Library, Mpi, THREAD_SERIALIZED};
pub use ffi::{DEFAULT_NAMES, LIB_ENV};

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// The file and the version string (`MPI_Get_library_version`) of the MPI
/// library the mpi backend would use, without initialising MPI.
pub fn library_info() -> Result<(String, String)> {
    let lib = Library::open()?;
    let version = lib.version()?;
    Ok((lib.path, version))
}

/// The MPI world of this process. MPI calls cannot be interrupted, so each
/// collective runs under a [`Watchdog`] that ends the process when it outlives
/// `distributed.timeout_s` (the launcher then stops the other ranks).
pub struct MpiComm {
    mpi: Box<dyn Mpi>,
    rank: usize,
    size: usize,
    watchdog: Option<Watchdog>,
}

impl MpiComm {
    /// Loads the MPI library, initialises MPI (once per process) and returns
    /// the world communicator.
    pub fn init(timeout: Duration) -> Result<Self> {
        let mpi = Library::open()?.api()?;
        if INITIALISED.swap(true, Ordering::SeqCst) {
            bail!("MPI is initialised once per process and was already used; keep the first communicator");
        }
        if mpi.initialized()? {
            bail!("MPI was already initialised by something else in this process");
        }
        let provided = mpi.init_thread(THREAD_SERIALIZED)?;
        // From here on, dropping `comm` finalises MPI.
        let mut comm = Self { mpi, rank: 0, size: 1, watchdog: None };
        if provided < THREAD_SERIALIZED {
            bail!("the MPI library offers thread level {}; mlm needs at least Serialized", thread_level(provided));
        }
        comm.rank = comm.mpi.rank()?;
        comm.size = comm.mpi.size()?;
        comm.watchdog = Some(Watchdog::exiting(comm.rank, timeout));
        Ok(comm)
    }
}

/// The name of an `MPI_THREAD_*` level.
fn thread_level(level: i32) -> String {
    match level {
        0 => "Single".into(),
        1 => "Funneled".into(),
        2 => "Serialized".into(),
        3 => "Multiple".into(),
        l => format!("{l} (unknown)"),
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The other ranks would wait forever, in a collective this rank never
            // joins or in MPI_Finalize: end the whole job instead.
            self.mpi.abort(1);
        }
        if matches!(self.mpi.finalized(), Ok(false)) {
            let _ = self.mpi.finalize();
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
        let described = format!("MPI all-reduce of {} {:?} ({:.1} MiB)", t.numel(), t.kind(), mib(t));
        let what = move || described;
        let dog = self.watchdog.as_ref().expect("set in init");
        let mpi = &mut self.mpi;
        dog.run(what, || {
            tensor::on_host(t, rank, |host| match elem {
                // SAFETY: a contiguous CPU f32 tensor, not otherwise viewed here.
                Elem::F32 => mpi.sum_f32(unsafe { tensor::f32_slice(host) }),
                Elem::Bf16 => {
                    // Sum in f32, round once (libtorch rounds to nearest even).
                    let mut work = host.to_kind(tch::Kind::Float);
                    // SAFETY: `work` is a fresh contiguous CPU f32 tensor.
                    mpi.sum_f32(unsafe { tensor::f32_slice(&mut work) })?;
                    host.copy_(&work);
                    Ok(())
                }
            })
        })
    }

    fn broadcast_bytes(&mut self, root: usize, data: &mut Vec<u8>) -> Result<()> {
        if root >= self.size {
            bail!("rank {}: broadcast from rank {root} in a job of {} workers", self.rank, self.size);
        }
        let dog = self.watchdog.as_ref().expect("set in init");
        let mpi = &mut self.mpi;
        dog.run(
            || format!("MPI broadcast from rank {root}"),
            || {
                let mut len = data.len() as u64;
                mpi.broadcast_u64(root, &mut len)?;
                data.resize(len as usize, 0);
                mpi.broadcast_bytes(root, data)
            },
        )
    }

    fn barrier(&mut self) -> Result<()> {
        let dog = self.watchdog.as_ref().expect("set in init");
        let mpi = &mut self.mpi;
        dog.run(|| "MPI barrier".into(), || mpi.barrier())
    }

    fn set_timeout(&mut self, timeout: Duration) {
        if let Some(dog) = &mut self.watchdog {
            dog.set_timeout(timeout);
        }
    }

    fn name(&self) -> &'static str {
        "mpi"
    }
}

fn mib(t: &tch::Tensor) -> f64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as f64 / (1u64 << 20) as f64
}

#[cfg(test)]
mod tests;
