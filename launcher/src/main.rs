//! `mlm-launch`: prepares the data once, then runs one `mlm train` worker per
//! GPU (or N CPU workers) and manages the group: prefixes and forwards each
//! worker's output, forwards Ctrl-C/SIGTERM/SIGUSR1/SIGUSR2 (killing workers
//! that have not exited `--save-timeout` seconds later), stops every worker
//! when one fails (exiting non-zero with the failing rank and its last lines),
//! and restarts the group up to `--max-restarts` times. Workers that saved a
//! checkpoint on a signal and exited with [`supervise::REQUEUE_EXIT_CODE`]
//! make the launcher exit with it too. Processes only: no tensors, no model code.
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
//!
//! `--selfcheck` ([`selfcheck`]) runs no job of the user's: it checks the
//! node on a tiny job of its own (N ranks against 1, a killed worker,
//! `mlm-comm-check`) with the same supervision and environment.
mod args;
mod selfcheck;
mod supervise;
mod tiny_job;
mod torch_env;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches};

use args::{Args, Nodes, Slot};
use supervise::{describe, Outcome, Signals, Spec};

fn main() {
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match with_torch_env(args, &matches).and_then(run) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("mlm-launch: error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// The flags torch's launcher variables give where the command line did not
/// ([`torch_env`]: Kubernetes operators start one pod per node this way).
fn with_torch_env(mut args: Args, matches: &clap::ArgMatches) -> Result<Args> {
    let given = torch_env::Given::from_matches(matches);
    for line in torch_env::apply(&mut args, given, &|k| std::env::var(k).ok())? {
        eprintln!("mlm-launch: {line}");
    }
    Ok(args)
}

fn run(args: Args) -> Result<i32> {
    let signals = Signals::install()?;
    if args.selfcheck {
        return selfcheck::run(&args, &signals);
    }
    let config = args.config.clone().expect("clap requires CONFIG without --selfcheck");
    let slots = args::plan(&args, args::visible_gpus())?;
    let nodes = Nodes::new(&args, slots.len())?;
    let mlm = args.mlm.clone().unwrap_or_else(find_mlm);
    let grace = Duration::from_secs_f64(args.grace_period.max(0.0));
    let save = Duration::from_secs_f64(args.save_timeout.max(0.0));
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
        prepare.arg("prepare").arg(&config).args(&overrides);
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
        let rendezvous = Rendezvous { addr: args.master_addr.clone(), port, token: token.clone() };
        let specs = slots
            .iter()
            .enumerate()
            .map(|(local, slot)| {
                let mut cmd = worker_command(&mlm, &nodes, local, slot, &rendezvous, cpu_threads);
                cmd.arg("train").arg(&config).args(&overrides);
                Spec { label: format!("rank {}", nodes.rank(local)), command: cmd, log: None }
            })
            .collect();
        let oom = supervise::OomKills::now();
        match supervise::run_group(specs, &signals, grace, save)? {
            Outcome::Success => return Ok(0),
            Outcome::Requeue { signal } => {
                let by = signal.map_or("on a signal".to_string(), |s| format!("on signal {s}"));
                eprintln!(
                    "mlm-launch: {node}the workers saved a checkpoint {by} and stopped; exiting with {} so that the \
                     job is requeued (it resumes from that checkpoint)",
                    supervise::REQUEUE_EXIT_CODE
                );
                return Ok(supervise::REQUEUE_EXIT_CODE);
            }
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

/// Where the workers of one group start meet.
struct Rendezvous {
    addr: String,
    port: u16,
    token: Option<String>,
}

/// `program`, to run as local worker `local` of this node on `slot`, with the
/// environment contract of the module doc; the caller adds its arguments.
fn worker_command(
    program: &Path,
    nodes: &Nodes,
    local: usize,
    slot: &Slot,
    rendezvous: &Rendezvous,
    cpu_threads: usize,
) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("RANK", nodes.rank(local).to_string())
        .env("WORLD_SIZE", nodes.world().to_string())
        .env("LOCAL_RANK", local.to_string())
        .env("LOCAL_WORLD_SIZE", nodes.per_node.to_string())
        .env("GROUP_RANK", nodes.node_rank.to_string())
        .env("MLM_MASTER_ADDR", &rendezvous.addr)
        .env("MLM_MASTER_PORT", rendezvous.port.to_string());
    // torch's variables described the pod to this launcher (`torch_env`), not
    // the worker: the worker's rendezvous is the MLM_MASTER_* above.
    for k in torch_env::POD_VARIABLES {
        cmd.env_remove(k);
    }
    if let Some(token) = &rendezvous.token {
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
    cmd
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
