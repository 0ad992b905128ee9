//! `mlm-launch`: prepares the data once, then runs one `mlm train` worker per
//! GPU (or N CPU workers) and manages the group: prefixes and forwards each
//! worker's output, forwards Ctrl-C/SIGTERM, stops every worker when one fails
//! (exiting non-zero with the failing rank and its last lines), and restarts the
//! group up to `--max-restarts` times. Processes only: no tensors, no model code.
//!
//! Several nodes: one launcher per node with torchrun's `--nnodes`,
//! `--node-rank`, `--master-addr` and `--master-port`. Node 0 prepares the data
//! (on a filesystem every node sees) and hosts rank 0's rendezvous; a worker
//! that fails on any node breaks the ring, so every node's workers stop, and
//! each launcher restarts its group (same port) while restarts remain.
//!
//! Environment of each worker (the contract with `mlm::distributed`): `RANK`
//! (node_rank * workers per node + local rank), `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `GROUP_RANK` (the node), `MLM_MASTER_ADDR`,
//! `MLM_MASTER_PORT` and, on one node, `MLM_JOB_TOKEN` (random per job; with
//! several nodes the workers derive one from the job unless the user exports
//! it), and `CUDA_VISIBLE_DEVICES` (its one GPU) for GPU workers.
mod args;
mod supervise;

use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use args::{Args, Nodes, Slot};
use supervise::{describe, Outcome, Signals, Spec};

fn main() {
    match run(Args::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("mlm-launch: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(args: Args) -> Result<i32> {
    let signals = Signals::install()?;
    let slots = args::plan(&args, args::visible_gpus())?;
    let nodes = Nodes::new(&args, slots.len())?;
    let mlm = args.mlm.clone().unwrap_or_else(find_mlm);
    let grace = Duration::from_secs_f64(args.grace_period.max(0.0));
    let mut overrides: Vec<String> = args.set.iter().flat_map(|s| ["--set".to_string(), s.clone()]).collect();
    // Each worker gets the device its slot was planned for: a GPU worker that
    // finds no usable GPU fails naming the cause instead of training on the CPU.
    let device = if slots[0] == Slot::Cpu { "cpu" } else { "cuda" };
    overrides.extend(["--set".into(), format!("training.device={device}")]);
    let node = if nodes.multi() { format!("node {}: ", nodes.node_rank) } else { String::new() };

    // Prepare once before any worker starts, so workers only read the store.
    // With several nodes node 0 prepares; the others' workers wait for rank 0.
    if nodes.node_rank == 0 {
        let mut prepare = Command::new(&mlm);
        prepare.arg("prepare").arg(&args.config).args(&overrides);
        let (status, signal) = supervise::run_one(prepare, "prepare", &signals)?;
        if let Some(signal) = signal {
            eprintln!(
                "mlm-launch: {node}stopped by signal {signal} while preparing the data; `mlm prepare` was told and \
                 has exited"
            );
            return Ok(128 + signal);
        }
        if !status.success() {
            bail!("{node}`{} prepare` {}", mlm.display(), describe(&status));
        }
    } else {
        eprintln!("mlm-launch: {node}node 0 prepares the data; these workers wait for it at the rendezvous");
    }

    let world = nodes.world();
    let token = job_token(&nodes)?;
    let cpu_threads = cpu_threads_per_worker(slots.len());
    let first = nodes.rank(0);
    let ranks = format!("rank{} {}", if slots.len() > 1 { "s" } else { "" }, span(first, first + slots.len() - 1));
    let where_ = match &slots[0] {
        Slot::Cpu => format!("{} CPU worker(s), {ranks} of {world}", slots.len()),
        Slot::Gpu(_) => {
            let ids: Vec<&str> = slots.iter().map(|s| if let Slot::Gpu(g) = s { g.as_str() } else { "" }).collect();
            format!("{} GPU worker(s) on CUDA_VISIBLE_DEVICES {}, {ranks} of {world}", slots.len(), ids.join(","))
        }
    };
    for attempt in 0..=args.max_restarts {
        let port = match args.master_port {
            Some(p) => p,
            None if nodes.multi() => args::DEFAULT_MULTI_NODE_PORT,
            None => free_port(&args.master_addr)?,
        };
        eprintln!("mlm-launch: {node}starting {where_}; rendezvous {}:{port}", args.master_addr);
        let specs = slots
            .iter()
            .enumerate()
            .map(|(local, slot)| {
                let rank = nodes.rank(local);
                let mut cmd = Command::new(&mlm);
                cmd.arg("train")
                    .arg(&args.config)
                    .args(&overrides)
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("LOCAL_RANK", local.to_string())
                    .env("LOCAL_WORLD_SIZE", nodes.per_node.to_string())
                    .env("GROUP_RANK", nodes.node_rank.to_string())
                    .env("MLM_MASTER_ADDR", &args.master_addr)
                    .env("MLM_MASTER_PORT", port.to_string());
                if let Some(token) = &token {
                    cmd.env("MLM_JOB_TOKEN", token);
                }
                match slot {
                    Slot::Gpu(g) => {
                        cmd.env("CUDA_VISIBLE_DEVICES", g);
                    }
                    Slot::Cpu => {
                        if std::env::var_os("OMP_NUM_THREADS").is_none() {
                            cmd.env("OMP_NUM_THREADS", cpu_threads.to_string());
                        }
                    }
                }
                Spec { label: format!("rank {rank}"), command: cmd }
            })
            .collect();
        let oom = supervise::OomKills::now();
        match supervise::run_group(specs, &signals, grace)? {
            Outcome::Success => return Ok(0),
            Outcome::Interrupted { signal } => {
                eprintln!("mlm-launch: {node}stopped by signal {signal}; the workers were told and have exited");
                return Ok(128 + signal);
            }
            Outcome::Failed { local, status, tail } => {
                let rank = nodes.rank(local);
                let mut msg = format!("{node}rank {rank} {}", describe(&status));
                if std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL) {
                    msg.push_str(&format!(" {}", oom.verdict()));
                } else if let Some(cause) = supervise::error_line(&tail) {
                    msg.push_str(&format!(": {cause}"));
                }
                msg.push_str("; the other workers were stopped");
                if !tail.is_empty() {
                    msg.push_str(&format!("\nlast lines of rank {rank}:"));
                    for l in &tail {
                        msg.push_str(&format!("\n  {l}"));
                    }
                }
                if attempt < args.max_restarts {
                    eprintln!("mlm-launch: {msg}");
                    eprintln!("mlm-launch: {node}restarting (attempt {}/{})", attempt + 1, args.max_restarts);
                    continue;
                }
                bail!(msg);
            }
        }
    }
    unreachable!("the loop returns")
}

/// "3" or "2-5".
fn span(first: usize, last: usize) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// A port nobody listens on now (rank 0 binds it moments later).
fn free_port(addr: &str) -> Result<u16> {
    let l = std::net::TcpListener::bind((addr, 0))
        .with_context(|| format!("cannot open a port on {addr} for the rendezvous (--master-addr)"))?;
    Ok(l.local_addr()?.port())
}

/// The job token to give the workers. On one node: 128 random bits, hex, so
/// workers of another job cannot join this one. With several nodes the
/// launchers cannot agree on a random one: `MLM_JOB_TOKEN` when the user
/// exports the same value on every node, else none, and the workers derive one
/// from their config, output directory, rendezvous address and world size.
fn job_token(nodes: &Nodes) -> Result<Option<String>> {
    if nodes.multi() {
        return Ok(None); // an exported MLM_JOB_TOKEN reaches the workers as it is
    }
    random_token().map(Some)
}

fn random_token() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom for the job token")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Cores shared out among CPU workers, unless OMP_NUM_THREADS says otherwise.
fn cpu_threads_per_worker(world: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / world).max(1)
}

/// `mlm` next to this executable, else from PATH.
fn find_mlm() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("mlm")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("mlm"))
}
