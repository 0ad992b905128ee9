//! Communication between the workers of one job.
//!
//! One small trait, [`Communicator`] (sum all-reduce of a tensor, broadcast of
//! bytes, barrier), with a backend per transport:
//!
//! | backend | when `auto` picks it | tensors |
//! |---|---|---|
//! | [`local`] | one process | any (no-op) |
//! | [`tcp`]   | CPU workers of `mlm-launch` (`WORLD_SIZE` > 1) or of `srun` without MPI ([`slurm`]) | CPU (CUDA is copied through the host) |
//! | [`mpi`]   | CPU workers of `mpirun` or `srun --mpi=pmix` | CPU (CUDA is copied through the host) |
//! | [`nccl`]  | CUDA device; its id over the tcp rendezvous (`mlm-launch`, `srun`) or MPI (`mpirun`, `srun --mpi=pmix`) | CUDA |
//!
//! Who started the process ([`Launcher`], from [`WorldInfo::from_env`]), first
//! match wins:
//!
//! | variables | launcher |
//! |---|---|
//! | `MLM_MASTER_PORT` with `RANK`, `WORLD_SIZE` (a launcher inside a batch job inherits `SLURM_*`) | `Env` (`Single` if 1) |
//! | `OMPI_COMM_WORLD_*` (mpirun), `PMI_RANK`/`PMI_SIZE` (MPICH) | `Mpi` |
//! | `srun` task: `SLURM_PROCID`, `SLURM_STEP_ID`, more than one task, with `PMIX_RANK`/`PMI_RANK` | `Mpi` |
//! | the same without PMI | `Slurm` (tcp rendezvous from `SLURM_*`, see [`slurm`]) |
//! | `SLURM_PROCID` and `SLURM_NTASKS` > 1 outside a step | `Mpi` |
//! | `RANK`, `WORLD_SIZE` > 1 | `Env` |
//!
//! The environment contract with `mlm-launch` (see `docs/cluster.md`): `RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MLM_MASTER_ADDR` (default `127.0.0.1`),
//! `MLM_MASTER_PORT` and `MLM_JOB_TOKEN`. The NCCL unique id is not passed by
//! the launcher (it cannot link NCCL): rank 0 makes it and broadcasts it over the
//! bootstrap communicator (tcp under `mlm-launch` and `srun`, MPI under `mpirun`
//! and `srun --mpi=pmix`).
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::config::{Backend, DistributedConfig};

pub mod local;
pub mod mpi;
pub mod nccl;
pub mod slurm;
pub mod tcp;
pub(crate) mod tensor;
pub mod watchdog;

pub use local::LocalComm;
pub use tcp::TcpComm;

/// Collective operations over the workers of one job.
///
/// Every rank must call the same operations in the same order with tensors of
/// the same size and dtype; a backend reports a mismatch where it can see one.
/// After an error the communicator is unusable: the job should stop.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// In-place sum over all ranks of a contiguous tensor (f32 or bf16; CPU for
    /// tcp/mpi, CUDA for nccl). Every rank ends with the same bits.
    fn all_reduce_sum(&mut self, t: &mut tch::Tensor) -> Result<()>;
    /// Replaces `data` on every rank by `data` of rank `root`.
    fn broadcast_bytes(&mut self, root: usize, data: &mut Vec<u8>) -> Result<()>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<()>;
    /// The backend's name: "local", "tcp", "mpi" or "nccl".
    fn name(&self) -> &'static str;
    /// How long later calls may wait for the other ranks before failing
    /// (`distributed.timeout_s`; longer while rank 0 prepares the data).
    fn set_timeout(&mut self, timeout: Duration);

    /// Where collectives run on a device stream of their own (NCCL), what marks
    /// the device work a thread has queued so far, for
    /// [`Self::start_all_reduce_sum`]; `None` where they run in order with the
    /// caller (the default: every CPU backend).
    fn marker(&self) -> Option<Marker> {
        None
    }

    /// Starts the in-place sum of `t` once the work `after` marks is done and
    /// may return before it is: [`Self::finish_started`] waits for every sum
    /// started. `t` must stay alive and untouched until then. The default sums
    /// at once.
    fn start_all_reduce_sum(&mut self, t: &mut tch::Tensor, after: Ready) -> Result<()> {
        drop(after);
        self.all_reduce_sum(t)
    }

    /// [`Self::start_all_reduce_sum`] out of place: the sum of every rank's
    /// `send` lands in `recv` (same size and dtype), `send` unchanged. On
    /// NCCL at world size 1 this is a copy on the communicator's stream, so
    /// it proves that stream waits for `after` (an in-place sum of one rank
    /// launches nothing). The default copies, then sums in place.
    fn start_all_reduce_sum_into(&mut self, send: &tch::Tensor, recv: &mut tch::Tensor, after: Ready) -> Result<()> {
        tch::no_grad(|| recv.copy_(send));
        self.start_all_reduce_sum(recv, after)
    }

    /// Returns once every sum [`Self::start_all_reduce_sum`] started is done
    /// (against the timeout, like every call).
    fn finish_started(&mut self) -> Result<()> {
        Ok(())
    }

    /// Checks the started sums without waiting for them: fails (and stops
    /// them) once one has failed or run past the timeout since it started.
    fn poll_started(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A point in the device work that one thread has queued, after which a
/// collective on a stream of its own may start, or nothing to wait for.
pub enum Ready {
    /// The work is done, or the collective runs in order with it.
    Now,
    /// After the work a backend's [`Communicator::marker`] marked.
    After(Mark),
}

/// A backend's own mark of device work (NCCL: a CUDA event on the caller's
/// stream), opaque to everything but that backend.
pub struct Mark(Box<dyn std::any::Any + Send>);

impl Mark {
    pub fn new<T: std::any::Any + Send>(mark: T) -> Self {
        Self(Box::new(mark))
    }

    /// The backend's mark, when it is a `T`.
    pub fn downcast<T: std::any::Any>(self) -> Option<T> {
        self.0.downcast::<T>().ok().map(|b| *b)
    }
}

/// Marks the device work queued so far by the calling thread
/// ([`Communicator::marker`]); any thread may call it.
pub type Marker = Box<dyn Fn() -> Result<Ready> + Send + Sync>;

/// Where this process stands in the job, read from the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorldInfo {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the workers of this node: the CUDA device index to use when
    /// the node's GPUs are all visible (mpirun/srun without per-task devices).
    pub local_rank: usize,
}

/// Who started this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// `mpirun` (Open MPI or MPICH/PMI), or `srun` with PMI (`--mpi=pmix`).
    Mpi,
    /// `srun` with more than one task and no PMI: the tasks meet over tcp.
    Slurm,
    /// `mlm-launch` (or anything setting `WORLD_SIZE` > 1).
    Env,
    /// A single process.
    Single,
}

impl WorldInfo {
    /// A single process.
    pub fn single() -> Self {
        Self { rank: 0, world_size: 1, local_rank: 0 }
    }

    /// Reads rank, world size and local rank from the variables of `mpirun`
    /// (Open MPI's `OMPI_COMM_WORLD_*`, MPICH's `PMI_*`), `srun` (`SLURM_*`) or
    /// `mlm-launch` (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`), and says which
    /// launcher it found (the order: see the module doc). Nothing is initialised.
    pub fn from_env() -> Result<(Self, Launcher)> {
        Self::from_vars(&|k| std::env::var(k).ok())
    }

    fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<(Self, Launcher)> {
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| anyhow::anyhow!("environment variable {k}={v:?} is not a non-negative integer")),
            }
        };
        let triple = |r: &str, w: &str, l: &str| -> Result<Option<WorldInfo>> {
            let Some(world_size) = num(w)? else { return Ok(None) };
            let rank = num(r)?.with_context(|| format!("{w} is set but {r} is not"))?;
            let local_rank = num(l)?.unwrap_or(0);
            if world_size == 0 || rank >= world_size {
                bail!("{r}={rank} is not below {w}={world_size}");
            }
            Ok(Some(WorldInfo { rank, world_size, local_rank }))
        };
        // mlm-launch's variables win: a launcher started inside a batch job
        // inherits the job's SLURM_* variables, which describe the launcher.
        // So do torch's (`MASTER_PORT` beside `RANK`/`WORLD_SIZE`: a process
        // per GPU started by a Kubernetes operator or torchrun).
        if get("MLM_MASTER_PORT").is_some() || get("MASTER_PORT").is_some() {
            if let Some(w) = triple("RANK", "WORLD_SIZE", "LOCAL_RANK")? {
                return Ok(if w.world_size > 1 { (w, Launcher::Env) } else { (WorldInfo::single(), Launcher::Single) });
            }
        }
        if let Some(w) = triple("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")? {
            return Ok((w, Launcher::Mpi));
        }
        if let Some(w) = triple("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")? {
            return Ok((w, Launcher::Mpi));
        }
        // A task of an srun step knows its step's size. The batch script itself
        // (no step id) is one process whatever the job's SLURM_NTASKS: it is
        // no MPI task (mpirun's own variables are read above), see
        // [`batch_script_note`].
        if get("SLURM_PROCID").is_some() && slurm::step_id(get).is_some() {
            let tasks = if get("SLURM_STEP_NUM_TASKS").is_some() { "SLURM_STEP_NUM_TASKS" } else { "SLURM_NTASKS" };
            if num(tasks)?.unwrap_or(0) > 1 {
                if let Some(w) = triple("SLURM_PROCID", tasks, "SLURM_LOCALID")? {
                    let pmi = get("PMIX_RANK").is_some() || get("PMI_RANK").is_some();
                    return Ok((w, if pmi { Launcher::Mpi } else { Launcher::Slurm }));
                }
            }
        }
        if let Some(w) = triple("RANK", "WORLD_SIZE", "LOCAL_RANK")? {
            if w.world_size > 1 {
                return Ok((w, Launcher::Env));
            }
        }
        Ok((WorldInfo::single(), Launcher::Single))
    }
}

/// One line for a process that is a Slurm batch script of a job of several
/// tasks (`SLURM_NTASKS` > 1, no step id, no launcher's variables): it trains
/// alone, and says how the job's tasks would join.
pub fn batch_script_note(get: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let tasks: usize = get("SLURM_NTASKS")?.trim().parse().ok()?;
    let alone = matches!(WorldInfo::from_vars(get), Ok((_, Launcher::Single)));
    (alone && tasks > 1 && get("SLURM_PROCID").is_some() && slurm::step_id(get).is_none()).then(|| {
        format!(
            "this is the Slurm batch script, one process, not the job's {tasks} tasks (SLURM_NTASKS={tasks}): it \
             trains alone; to train on every task start it with `srun mlm train ...` (or mlm-launch)"
        )
    })
}

/// The backend `auto` resolves to for this launcher and device.
pub fn resolve_backend(requested: Backend, launcher: Launcher, device: tch::Device) -> Backend {
    match requested {
        Backend::Auto => match (launcher, device.is_cuda()) {
            (Launcher::Single, _) => Backend::Local,
            (Launcher::Mpi, false) => Backend::Mpi,
            (Launcher::Env | Launcher::Slurm, false) => Backend::Tcp,
            (_, true) => Backend::Nccl,
        },
        b => b,
    }
}

/// Connects this worker to its peers with the configured backend (`auto`: see
/// the module doc). Blocks until every rank has joined, or fails after
/// `timeout_s` with an error naming this rank. `job` identifies the job (its
/// config and output directory): without `MLM_JOB_TOKEN`, the tcp job token is
/// derived from it, so workers of another job on the same port are refused.
pub fn init(cfg: &DistributedConfig, device: tch::Device, job: &str) -> Result<Box<dyn Communicator>> {
    let (world, launcher) = WorldInfo::from_env()?;
    if let Some(note) = batch_script_note(&|k| std::env::var(k).ok()) {
        tracing::warn!("{note}");
    }
    let backend = resolve_backend(cfg.backend, launcher, device);
    let timeout = Duration::from_secs(cfg.timeout_s.max(1));
    let rank = world.rank;
    let comm: Box<dyn Communicator> = match backend {
        Backend::Auto => unreachable!("resolved above"),
        Backend::Local => {
            if world.world_size > 1 {
                bail!(
                    "rank {rank}: distributed.backend = \"local\" but the job has {} workers; use auto, tcp, mpi or nccl",
                    world.world_size
                );
            }
            Box::new(LocalComm)
        }
        Backend::Tcp => Box::new(tcp_bootstrap(launcher, world, timeout, job)?),
        Backend::Mpi => Box::new(mpi_from_env(rank, timeout)?),
        Backend::Nccl => {
            let tch::Device::Cuda(index) = device else {
                bail!("rank {rank}: distributed.backend = \"nccl\" needs a CUDA device (training.device)");
            };
            // Fail on a missing libnccl before any peer waits on us.
            nccl::check_available().with_context(|| format!("rank {rank}"))?;
            let bootstrap: Box<dyn Communicator> = match launcher {
                Launcher::Mpi => Box::new(mpi_from_env(rank, timeout)?),
                Launcher::Env | Launcher::Slurm => Box::new(tcp_bootstrap(launcher, world, timeout, job)?),
                Launcher::Single => Box::new(LocalComm),
            };
            Box::new(nccl::NcclComm::new(bootstrap, index, timeout)?)
        }
    };
    tracing::info!(rank = comm.rank(), world_size = comm.world_size(), backend = comm.name(), "distributed");
    Ok(comm)
}

/// MPI's world, after checking that an `srun` task can join it.
fn mpi_from_env(rank: usize, timeout: Duration) -> Result<mpi::MpiComm> {
    check_srun_has_pmi(&|k| std::env::var(k).ok(), rank)?;
    mpi::MpiComm::init(timeout).with_context(|| format!("rank {rank}"))
}

/// Open MPI joins `srun` tasks into one job only through Slurm's PMIx plugin
/// (`srun --mpi=pmix`); without it every task would abort inside `MPI_Init` with
/// a page about rebuilding Slurm. Say what to do instead (`auto` never gets
/// here: it joins such tasks over tcp).
fn check_srun_has_pmi(get: &dyn Fn(&str) -> Option<String>, rank: usize) -> Result<()> {
    let from_srun = get("SLURM_PROCID").is_some() && slurm::step_id(get).is_some();
    let has_pmi = ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"].iter().any(|k| get(k).is_some());
    if from_srun && !has_pmi {
        bail!(
            "rank {rank}: started by srun without PMI (no PMIX_RANK), so MPI cannot join the tasks into one job; \
             run `srun --mpi=pmix ...` (see `srun --mpi=list`), set MpiDefault=pmix in slurm.conf, or leave \
             distributed.backend = \"auto\" to join the tasks over tcp without MPI"
        );
    }
    Ok(())
}

/// The tcp ring (a backend, or NCCL's bootstrap): from `SLURM_*` under `srun`
/// without MPI, else from `mlm-launch`'s variables.
fn tcp_bootstrap(launcher: Launcher, world: WorldInfo, timeout: Duration, job: &str) -> Result<TcpComm> {
    match launcher {
        Launcher::Slurm => slurm::tcp_from_env(world, timeout, job),
        _ => tcp_from_env(world, timeout, job),
    }
}

/// The tcp ring from `mlm-launch`'s variables, or torch's.
fn tcp_from_env(world: WorldInfo, timeout: Duration, job: &str) -> Result<TcpComm> {
    let rank = world.rank;
    let get = |k: &str| std::env::var(k).ok();
    let (addr, port) = rendezvous_from(&get, rank)?;
    let addr = format!("{addr}:{port}");
    let token = job_token(std::env::var("MLM_JOB_TOKEN").ok().as_deref(), job, &addr);
    let ranks_per_node = ranks_per_node(&get, world.world_size);
    let rdv = tcp::Rendezvous { addr, token, timeout, ranks_per_node };
    TcpComm::connect(rank, world.world_size, &rdv)
}

/// Rank 0's rendezvous host and port: `MLM_MASTER_ADDR`/`MLM_MASTER_PORT`
/// (mlm-launch's), else torch's `MASTER_ADDR`/`MASTER_PORT` (a Kubernetes
/// operator's or torchrun's); the host defaults to 127.0.0.1. Ours win where
/// both are set; a different value of torch's is one warning line.
fn rendezvous_from(get: &dyn Fn(&str) -> Option<String>, rank: usize) -> Result<(String, u16)> {
    let pick = |ours: &str, torch: &str| -> Option<(String, String)> {
        let val = |k: &str| get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        match (val(ours), val(torch)) {
            (Some(o), Some(t)) => {
                if o != t {
                    tracing::warn!("rank {rank}: {ours}={o} wins over {torch}={t}");
                }
                Some((ours.to_string(), o))
            }
            (Some(o), None) => Some((ours.to_string(), o)),
            (None, Some(t)) => Some((torch.to_string(), t)),
            (None, None) => None,
        }
    };
    let addr = pick("MLM_MASTER_ADDR", "MASTER_ADDR").map_or_else(|| "127.0.0.1".to_string(), |(_, v)| v);
    let Some((key, port)) = pick("MLM_MASTER_PORT", "MASTER_PORT") else {
        bail!(
            "rank {rank}: neither MLM_MASTER_PORT nor MASTER_PORT is set (the tcp rendezvous port; mlm-launch sets it)"
        );
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| anyhow::anyhow!("rank {rank}: {key}={port:?} is not a port number (1-65535)"))?;
    Ok((addr, port))
}

/// Workers per node of a job that spans several nodes of equal size
/// (`LOCAL_WORLD_SIZE`, set by `mlm-launch`), so that errors can name a peer's
/// node; `None` on one node or when unknown.
fn ranks_per_node(get: &dyn Fn(&str) -> Option<String>, world: usize) -> Option<usize> {
    let n: usize = get("LOCAL_WORLD_SIZE")?.trim().parse().ok()?;
    (n > 0 && world > n && world.is_multiple_of(n)).then_some(n)
}

/// The token every rank of a tcp job presents: `MLM_JOB_TOKEN` when set
/// (mlm-launch sets a random one per job); otherwise derived from the job
/// itself and its rendezvous address, so that hand-started workers of two jobs
/// never join each other's. Not its size: a node started with another
/// `--nproc` or `--nnodes` is this job, misconfigured, and rank 0 refuses it
/// by that name at once (see `tcp::rendezvous`). Never empty.
pub fn job_token(given: Option<&str>, job: &str, addr: &str) -> String {
    use sha2::{Digest, Sha256};
    match given.map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) => t.to_string(),
        None => format!("{:x}", Sha256::digest(format!("mlm-job\0{job}\0{addr}").as_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_token_is_never_empty_and_differs_per_job() {
        let a = job_token(None, "config-a", "127.0.0.1:29500");
        assert_eq!(a.len(), 64);
        assert_eq!(a, job_token(Some(""), "config-a", "127.0.0.1:29500"));
        assert_ne!(a, job_token(None, "config-b", "127.0.0.1:29500"));
        assert_ne!(a, job_token(None, "config-a", "127.0.0.1:29501"));
        assert_eq!(job_token(Some("abc"), "config-a", "x"), "abc");
    }

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| m.get(k).cloned()
    }

    #[test]
    fn world_info_prefers_mpi_then_slurm_then_launcher() {
        let (w, l) = WorldInfo::from_vars(&vars(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("RANK", "0"),
            ("WORLD_SIZE", "4"),
        ]))
        .unwrap();
        assert_eq!((w, l), (WorldInfo { rank: 1, world_size: 2, local_rank: 1 }, Launcher::Mpi));
        let (w, l) = WorldInfo::from_vars(&vars(&[
            ("SLURM_NTASKS", "8"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
            ("PMIX_RANK", "5"),
        ]))
        .unwrap();
        assert_eq!((w, l), (WorldInfo { rank: 5, world_size: 8, local_rank: 1 }, Launcher::Mpi));
        // A one-task allocation is not a distributed job.
        let (_, l) = WorldInfo::from_vars(&vars(&[("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0")])).unwrap();
        assert_eq!(l, Launcher::Single);
        let (w, l) = WorldInfo::from_vars(&vars(&[("RANK", "2"), ("WORLD_SIZE", "3"), ("LOCAL_RANK", "2")])).unwrap();
        assert_eq!((w, l), (WorldInfo { rank: 2, world_size: 3, local_rank: 2 }, Launcher::Env));
        // Workers of mlm-launch inside an sbatch allocation.
        let (w, l) = WorldInfo::from_vars(&vars(&[
            ("SLURM_NTASKS", "4"),
            ("SLURM_PROCID", "0"),
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MLM_MASTER_PORT", "1234"),
        ]))
        .unwrap();
        assert_eq!((w.rank, l), (1, Launcher::Env));
        let (_, l) = WorldInfo::from_vars(&vars(&[("RANK", "0"), ("WORLD_SIZE", "1")])).unwrap();
        assert_eq!(l, Launcher::Single);
    }

    #[test]
    fn srun_without_pmi_meets_over_tcp_and_with_pmi_over_mpi() {
        let srun = [
            ("SLURM_JOB_ID", "77"),
            ("SLURM_STEP_ID", "1"),
            ("SLURM_PROCID", "9"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_STEP_NUM_TASKS", "12"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_NODELIST", "gpu[07-08]"),
        ];
        let (w, l) = WorldInfo::from_vars(&vars(&srun)).unwrap();
        assert_eq!((w, l), (WorldInfo { rank: 9, world_size: 12, local_rank: 1 }, Launcher::Slurm));
        assert_eq!(resolve_backend(Backend::Auto, l, tch::Device::Cpu), Backend::Tcp);
        assert_eq!(resolve_backend(Backend::Auto, l, tch::Device::Cuda(1)), Backend::Nccl);
        let parse = |_: &str, list: &str| Ok(slurm::HostList::parse(list).unwrap().first());
        let m = slurm::meeting(&vars(&srun), w, "job", &parse).unwrap();
        assert_eq!(m.addr(), "gpu07:10771");
        // The older SLURM_STEPID, and SLURM_NTASKS without SLURM_STEP_NUM_TASKS.
        let old = [("SLURM_STEPID", "0"), ("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")];
        assert_eq!(WorldInfo::from_vars(&vars(&old)).unwrap().1, Launcher::Slurm);
        // srun --mpi=pmix (or pmi2): MPI as before.
        for pmi in ["PMIX_RANK", "PMI_RANK"] {
            let with_pmi = [srun.as_slice(), &[(pmi, "9")]].concat();
            let (w, l) = WorldInfo::from_vars(&vars(&with_pmi)).unwrap();
            assert_eq!((w.rank, w.world_size, l), (9, 12, Launcher::Mpi), "{pmi}");
            assert_eq!(resolve_backend(Backend::Auto, l, tch::Device::Cpu), Backend::Mpi);
        }
        // The batch script of a job of several tasks (no step id): one
        // process, never an MPI rank, and it says so.
        let script = [("SLURM_JOB_ID", "77"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0")];
        let (w, l) = WorldInfo::from_vars(&vars(&script)).unwrap();
        assert_eq!((w, l), (WorldInfo::single(), Launcher::Single));
        let note = batch_script_note(&vars(&script)).expect("a note");
        assert!(note.contains("batch script") && note.contains("SLURM_NTASKS=2") && note.contains("srun"), "{note}");
        assert_eq!(batch_script_note(&vars(&srun)), None);
        // A one-task step is one process.
        let one = [("SLURM_STEP_ID", "0"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_STEP_NUM_TASKS", "1")];
        assert_eq!(WorldInfo::from_vars(&vars(&one)).unwrap().1, Launcher::Single);
        // mlm-launch's workers inside an srun step: the launcher's variables win.
        let launched = [srun.as_slice(), &[("MLM_MASTER_PORT", "29500"), ("RANK", "3"), ("WORLD_SIZE", "16")]].concat();
        let (w, l) = WorldInfo::from_vars(&vars(&launched)).unwrap();
        assert_eq!((w.rank, w.world_size, l), (3, 16, Launcher::Env));
        let alone = [srun.as_slice(), &[("MLM_MASTER_PORT", "29500"), ("RANK", "0"), ("WORLD_SIZE", "1")]].concat();
        assert_eq!(WorldInfo::from_vars(&vars(&alone)).unwrap(), (WorldInfo::single(), Launcher::Single));
        // MLM_MASTER_PORT alone only overrides the port of the srun meeting.
        let port = [srun.as_slice(), &[("MLM_MASTER_PORT", "29500")]].concat();
        assert_eq!(WorldInfo::from_vars(&vars(&port)).unwrap().1, Launcher::Slurm);
        let e = WorldInfo::from_vars(&vars(&[srun.as_slice(), &[("SLURM_PROCID", "12")]].concat())).unwrap_err();
        assert!(e.to_string().contains("SLURM_PROCID=12 is not below SLURM_STEP_NUM_TASKS=12"), "{e}");
    }

    #[test]
    fn torch_variables_start_a_worker_per_gpu() {
        // A process per GPU, as a Kubernetes operator (or torchrun) starts it,
        // inside an allocation whose SLURM_* describe something else.
        let torch = [
            ("MASTER_ADDR", "job-master-0"),
            ("MASTER_PORT", "23456"),
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_PROCID", "0"),
        ];
        let (w, l) = WorldInfo::from_vars(&vars(&torch)).unwrap();
        assert_eq!((w, l), (WorldInfo { rank: 5, world_size: 8, local_rank: 1 }, Launcher::Env));
        assert_eq!(rendezvous_from(&vars(&torch), 5).unwrap(), ("job-master-0".to_string(), 23456));
        // Ours win where both are set.
        let both = [torch.as_slice(), &[("MLM_MASTER_ADDR", "10.0.0.1"), ("MLM_MASTER_PORT", "29500")]].concat();
        assert_eq!(rendezvous_from(&vars(&both), 5).unwrap(), ("10.0.0.1".to_string(), 29500));
        let e = rendezvous_from(&vars(&[("MASTER_PORT", "http")]), 2).unwrap_err().to_string();
        assert!(e.contains("rank 2: MASTER_PORT=\"http\" is not a port number"), "{e}");
        let e = rendezvous_from(&vars(&[]), 2).unwrap_err().to_string();
        assert!(e.contains("neither MLM_MASTER_PORT nor MASTER_PORT"), "{e}");
    }

    #[test]
    fn world_info_errors_name_the_variable() {
        let e = WorldInfo::from_vars(&vars(&[("RANK", "3"), ("WORLD_SIZE", "2")])).unwrap_err().to_string();
        assert!(e.contains("RANK=3") && e.contains("WORLD_SIZE=2"), "{e}");
        let e = WorldInfo::from_vars(&vars(&[("WORLD_SIZE", "x")])).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE"), "{e}");
        let e = WorldInfo::from_vars(&vars(&[("WORLD_SIZE", "2")])).unwrap_err().to_string();
        assert!(e.contains("RANK is not"), "{e}");
    }

    #[test]
    fn peers_are_named_with_their_node_in_multi_node_jobs() {
        assert_eq!(ranks_per_node(&vars(&[("LOCAL_WORLD_SIZE", "2")]), 4), Some(2));
        assert_eq!(ranks_per_node(&vars(&[("LOCAL_WORLD_SIZE", "2")]), 2), None);
        assert_eq!(ranks_per_node(&vars(&[("LOCAL_WORLD_SIZE", "3")]), 4), None);
        assert_eq!(ranks_per_node(&vars(&[]), 4), None);
        assert_eq!(tcp::peer_name(5, Some(2)), "rank 5 (node 2)");
        assert_eq!(tcp::peer_name(5, None), "rank 5");
    }

    #[test]
    fn srun_without_pmi_is_refused_before_mpi_init() {
        let srun = [("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("SLURM_STEP_ID", "0")];
        let e = check_srun_has_pmi(&vars(&srun), 1).unwrap_err().to_string();
        assert!(e.contains("rank 1") && e.contains("--mpi=pmix"), "{e}");
        let with_pmix = [srun.as_slice(), &[("PMIX_RANK", "1")]].concat();
        assert!(check_srun_has_pmi(&vars(&with_pmix), 1).is_ok());
        // mpirun inside an sbatch allocation: the batch step's SLURM_* are inherited.
        let mpirun = [srun.as_slice(), &[("OMPI_COMM_WORLD_RANK", "1")]].concat();
        assert!(check_srun_has_pmi(&vars(&mpirun), 1).is_ok());
        assert!(check_srun_has_pmi(&vars(&[("OMPI_COMM_WORLD_RANK", "0")]), 0).is_ok());
    }

    #[test]
    fn auto_backend_follows_launcher_and_device() {
        let cpu = tch::Device::Cpu;
        let gpu = tch::Device::Cuda(0);
        assert_eq!(resolve_backend(Backend::Auto, Launcher::Single, gpu), Backend::Local);
        assert_eq!(resolve_backend(Backend::Auto, Launcher::Env, cpu), Backend::Tcp);
        assert_eq!(resolve_backend(Backend::Auto, Launcher::Env, gpu), Backend::Nccl);
        assert_eq!(resolve_backend(Backend::Auto, Launcher::Mpi, cpu), Backend::Mpi);
        assert_eq!(resolve_backend(Backend::Auto, Launcher::Mpi, gpu), Backend::Nccl);
        assert_eq!(resolve_backend(Backend::Auto, Launcher::Slurm, cpu), Backend::Tcp);
        assert_eq!(resolve_backend(Backend::Auto, Launcher::Slurm, gpu), Backend::Nccl);
        assert_eq!(resolve_backend(Backend::Mpi, Launcher::Slurm, cpu), Backend::Mpi);
        assert_eq!(resolve_backend(Backend::Tcp, Launcher::Mpi, gpu), Backend::Tcp);
    }

    #[test]
    fn nccl_without_library_fails_clearly() {
        if nccl::check_available().is_ok() {
            return; // a machine with NCCL: nothing to check here
        }
        let e = nccl::check_available().unwrap_err().to_string();
        assert!(e.contains("NCCL not found"), "{e}");
    }
}
