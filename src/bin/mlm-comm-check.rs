//! `mlm-comm-check`: checks a cluster set-up without a model or data. Every
//! rank joins the job exactly as `mlm train` would (`mlm::distributed::init`), sums a
//! known tensor, checks the sum (also the overlapped way, on NCCL's own stream
//! after an event, in place and out of place), broadcasts a message from rank 0, meets at a
//! barrier, times `--iters` all-reduces, and prints one JSON line per rank.
//! Exits non-zero on any mismatch or communication error.
//!
//! ```text
//! mpirun -np 2 mlm-comm-check --elems 25000000
//! srun --ntasks=8 --gpus-per-task=1 mlm-comm-check --device cuda
//! RANK=0 WORLD_SIZE=2 MLM_MASTER_PORT=29500 mlm-comm-check &   # and RANK=1 ...
//! mpirun -np 2 mlm-comm-check --timeout 10 --stop-rank 1          # must fail in ~10 s
//! ```
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use mlm::config::{Backend, CommDtype, DistributedConfig};
use tch::{Device, Kind, Tensor};

#[derive(Parser, Debug)]
#[command(
    name = "mlm-comm-check",
    version,
    about = "Check that the workers of a job can talk: all-reduce, broadcast, barrier"
)]
struct Args {
    /// auto, local, tcp, mpi or nccl (as distributed.backend).
    #[arg(long, default_value = "auto")]
    backend: String,
    /// cpu or cuda (cuda: device LOCAL_RANK of the visible ones).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Elements of the all-reduced tensor.
    #[arg(long, default_value_t = 1 << 20)]
    elems: usize,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Timed all-reduces after the checks.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Seconds to wait for peers (distributed.timeout_s).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Check the hang protection: this rank stops itself (SIGSTOP) before the
    /// first all-reduce; the others must fail within --timeout naming the
    /// collective, and the launcher must stop the job.
    #[arg(long, value_name = "RANK")]
    stop_rank: Option<usize>,
}

fn main() {
    mlm::logging::init();
    mlm::logging::quiet_panics();
    let args = Args::parse();
    match std::panic::catch_unwind(|| run(args)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("mlm-comm-check: error: {}", mlm::logging::one_line(&e));
            std::process::exit(1);
        }
        Err(_) if mlm::logging::panic_was_out_of_memory() => std::process::exit(1),
        Err(_) => std::process::exit(101),
    }
}

/// Upper bounds of the flags: 2^31 elements is 8 GiB of f32 per rank.
const MAX_ELEMS: usize = 1 << 31;
const MAX_ITERS: usize = 1_000_000_000;
const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;

fn run(args: Args) -> Result<()> {
    if args.elems == 0 || args.elems > MAX_ELEMS {
        bail!("--elems {} must be between 1 and {MAX_ELEMS}", args.elems);
    }
    if args.iters == 0 || args.iters > MAX_ITERS {
        bail!("--iters {} must be between 1 and {MAX_ITERS}", args.iters);
    }
    if args.timeout == 0 || args.timeout > MAX_TIMEOUT_S {
        bail!("--timeout {} must be between 1 and {MAX_TIMEOUT_S} seconds", args.timeout);
    }
    let backend: Backend = serde_json::from_value(serde_json::Value::String(args.backend.clone()))
        .map_err(|_| anyhow::anyhow!("--backend {:?}: expected auto, local, tcp, mpi or nccl", args.backend))?;
    let (comm_dtype, kind) = match args.dtype.as_str() {
        "f32" => (CommDtype::Fp32, Kind::Float),
        "bf16" => (CommDtype::Bf16, Kind::BFloat16),
        d => bail!("--dtype {d:?}: expected f32 or bf16"),
    };
    let (world, _) = mlm::distributed::WorldInfo::from_env()?;
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(world.local_rank % (tch::Cuda::device_count().max(1) as usize)),
        d => bail!("--device {d:?}: expected cpu or cuda"),
    };
    let cfg = DistributedConfig { backend, comm_dtype, timeout_s: args.timeout, ..Default::default() };
    let job = format!("mlm-comm-check elems={} dtype={}", args.elems, args.dtype);
    let mut comm = mlm::distributed::init(&cfg, device, &job)?;
    let (rank, size) = (comm.rank(), comm.world_size());

    if args.stop_rank == Some(rank) {
        eprintln!("mlm-comm-check: rank {rank} stops itself (--stop-rank); the others should time out");
        // SAFETY: raise only sends a signal to this process.
        unsafe { libc::raise(libc::SIGSTOP) };
    }

    // 1. Exact check: rank r holds (r + 1) * (i % 7 + 1); the sum is small integers.
    let n = args.elems;
    let pattern = (Tensor::arange(n as i64, (Kind::Int64, Device::Cpu)).remainder(7) + 1).to_kind(Kind::Float);
    let mut t = (&pattern * (rank as f64 + 1.0)).to_kind(kind).to_device(device);
    comm.all_reduce_sum(&mut t)?;
    let factor = (size * (size + 1) / 2) as f64;
    let want = (&pattern * factor).to_kind(kind).to_kind(Kind::Float);
    let got = t.to_device(Device::Cpu).to_kind(Kind::Float);
    let exact = n == 0 || got.equal(&want);

    // 1b. The overlapped gradient sum's way (`start_all_reduce_sum` after a
    // mark, then `finish_started`): on NCCL a stream of its own that waits for
    // an event. The tensor is written by device work queued just before the
    // mark, behind a long matmul on a GPU, so a sum that did not wait for it
    // would add zeros.
    // (The upload first: a blocking upload would wait for the matmuls itself.)
    let src = (&pattern * (rank as f64 + 1.0)).to_kind(kind).to_device(device);
    let s = Tensor::zeros([n as i64], (kind, device));
    let mut s = written_late(&src, s, device);
    let after = mark(comm.as_ref())?;
    comm.start_all_reduce_sum(&mut s, after)?;
    comm.finish_started()?;
    let overlapped_exact = n == 0 || s.to_device(Device::Cpu).to_kind(Kind::Float).equal(&want);

    // 1c. The same out of place, into a fresh tensor: at world size 1 an
    // in-place NCCL sum launches nothing, while this one copies on NCCL's
    // stream, so on one GPU too it adds what the slow producer wrote only if
    // that stream waited for the mark.
    let send = written_late(&src, Tensor::zeros([n as i64], (kind, device)), device);
    let mut recv = Tensor::zeros([n as i64], (kind, device));
    let after = mark(comm.as_ref())?;
    comm.start_all_reduce_sum_into(&send, &mut recv, after)?;
    comm.finish_started()?;
    let out_of_place_exact = n == 0
        || (recv.to_device(Device::Cpu).to_kind(Kind::Float).equal(&want)
            && send.to_device(Device::Cpu).equal(&src.to_device(Device::Cpu)));

    // 2. Same bits everywhere: sum random values, compare a hash from rank 0.
    let mut r = Tensor::randn([n as i64], (Kind::Float, Device::Cpu)).to_kind(kind).to_device(device);
    comm.all_reduce_sum(&mut r)?;
    let hash = fnv1a(&Vec::<u8>::try_from(&r.to_device(Device::Cpu).flatten(0, -1).view_dtype(Kind::Uint8))?);
    let mut root_hash = hash.to_le_bytes().to_vec();
    comm.broadcast_bytes(0, &mut root_hash)?;
    let identical = root_hash == hash.to_le_bytes();

    // 3. Broadcast and barrier.
    let mut msg = if rank == 0 { format!("hello from rank 0 of {size}").into_bytes() } else { Vec::new() };
    comm.broadcast_bytes(0, &mut msg)?;
    let broadcast_ok = msg == format!("hello from rank 0 of {size}").into_bytes();
    comm.barrier()?;

    // 4. Timing.
    let start = Instant::now();
    for _ in 0..args.iters {
        comm.all_reduce_sum(&mut t)?;
    }
    let secs = start.elapsed().as_secs_f64() / args.iters.max(1) as f64;
    let bytes = (n * t.kind().elt_size_in_bytes()) as f64;
    let ok = exact && overlapped_exact && out_of_place_exact && identical && broadcast_ok;
    let line = serde_json::json!({
        "rank": rank,
        "world_size": size,
        "backend": comm.name(),
        "device": format!("{device:?}"),
        "dtype": args.dtype,
        "elems": n,
        "exact_sum": exact,
        "exact_overlapped_sum": overlapped_exact,
        "exact_out_of_place_sum": out_of_place_exact,
        "identical_on_all_ranks": identical,
        "broadcast": broadcast_ok,
        "result_hash": format!("{hash:016x}"),
        "seconds_per_all_reduce": secs,
        // Algorithm bandwidth (tensor bytes / time) and NCCL-style bus bandwidth.
        "algbw_mb_s": bytes / secs / 1e6,
        "busbw_mb_s": bytes / secs / 1e6 * 2.0 * (size as f64 - 1.0) / size as f64,
        "ok": ok,
    });
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        // A closed pipe loses only this report; the collectives below still run.
        let _ = writeln!(out, "{line}").and_then(|_| out.flush());
    }
    comm.barrier()?;
    if !ok {
        bail!(
            "rank {rank}: check failed: exact sum {exact}, exact overlapped sum {overlapped_exact}, exact \
             out-of-place sum {out_of_place_exact}, identical on all ranks {identical}, broadcast {broadcast_ok}"
        );
    }
    Ok(())
}

/// `dst` given the values of `src` by a copy queued behind a slow producer.
fn written_late(src: &Tensor, mut dst: Tensor, device: Device) -> Tensor {
    slow_producer(device);
    tch::no_grad(|| dst.copy_(src));
    dst
}

/// Marks the device work queued so far, for a collective on its own stream.
fn mark(comm: &dyn mlm::distributed::Communicator) -> Result<mlm::distributed::Ready> {
    match comm.marker() {
        Some(mark) => mark(),
        None => Ok(mlm::distributed::Ready::Now),
    }
}

/// Queues a long run of matmuls on a GPU (about a few ms), so that work
/// queued next finishes late: a collective that did not wait for it reads
/// what was there before.
fn slow_producer(device: Device) {
    if device.is_cuda() {
        let m = Tensor::randn([2048, 2048], (Kind::Float, device));
        let _ = (0..8).fold(m.shallow_clone(), |acc, _| acc.matmul(&m) / 2048.0);
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}
