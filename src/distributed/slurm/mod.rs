//! The tasks of one `srun` step joining each other without MPI: the tcp
//! rendezvous found from Slurm's variables alone.
//!
//! | what | from | override |
//! |---|---|---|
//! | rank, world size, local rank | `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` (else `SLURM_NTASKS`), `SLURM_LOCALID` | |
//! | rank 0's host | the first host of `SLURM_STEP_NODELIST` (else `SLURM_JOB_NODELIST`, `SLURM_NODELIST`): `scontrol show hostnames`, else [`HostList`] | `MLM_MASTER_ADDR` |
//! | port | [`derived_port`]: 10000 + 10 × (`SLURM_JOB_ID` mod 2000) + `SLURM_STEP_ID` mod 10 | `MLM_MASTER_PORT` |
//! | job token | [`super::job_token`] of the job, `SLURM_JOB_ID`, `SLURM_STEP_ID`, host and port | `MLM_JOB_TOKEN` |
//!
//! Rank 0 runs on the first host of the step (Slurm places task 0 there unless
//! `--distribution=arbitrary`; rank 0 checks `SLURMD_NODENAME`). With the host
//! taken from the node list, rank 0 listens on every interface: a node name
//! that resolves to a loopback address on its own node (Debian's `127.0.1.1`
//! line in `/etc/hosts`) still lets the other nodes in.
use std::io::Read;
use std::net::ToSocketAddrs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::{job_token, tcp, TcpComm, WorldInfo};

pub mod hostlist;
pub use hostlist::HostList;

/// Where a step's node list is, in order of preference.
pub const NODELIST_VARS: [&str; 3] = ["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"];
/// The derived ports: `PORT_BASE .. PORT_BASE + 20000`, below Linux's ephemeral
/// ports (32768 and up), so an outgoing connection never holds one.
pub const PORT_BASE: u16 = 10000;
/// `scontrol` answers at once; past this it is stuck (on a missing config it
/// retries for a minute) and the node list is parsed here instead.
const SCONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// The step id of an `srun` task (`SLURM_STEPID` is its older name).
pub fn step_id(get: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    get("SLURM_STEP_ID").or_else(|| get("SLURM_STEPID"))
}

/// The rendezvous port of a step: each job a block of 10 ports, each step one
/// of them, so that consecutive jobs sharing a node, and up to 10 concurrent
/// steps of one job, use different ports. Jobs whose ids differ by a multiple of
/// 2000 share ports: when two of them share a node, set `MLM_MASTER_PORT`.
pub fn derived_port(job_id: u64, step_id: u64) -> u16 {
    PORT_BASE + (10 * (job_id % 2000) + step_id % 10) as u16
}

/// Where and how the tasks of a step meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meeting {
    /// Rank 0's host, as the other ranks reach it.
    pub host: String,
    pub port: u16,
    pub token: String,
    /// The host came from the node list (not `MLM_MASTER_ADDR`): rank 0 listens
    /// on every interface.
    pub listen_everywhere: bool,
    /// Where host and port came from, for error messages.
    pub origin: String,
}

impl Meeting {
    /// `host:port`, an IPv6 address in brackets.
    pub fn addr(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The meeting of this step from its variables; `first_host(var, list)` reads a
/// node list ([`first_host`] outside tests).
pub fn meeting(
    get: &dyn Fn(&str) -> Option<String>,
    world: WorldInfo,
    job: &str,
    first_host: &dyn Fn(&str, &str) -> Result<String>,
) -> Result<Meeting> {
    let rank = world.rank;
    let id = |k: &str, v: Option<String>| -> Result<Option<(String, u64)>> {
        let Some(v) = v else { return Ok(None) };
        match v.trim().parse::<u64>() {
            Ok(n) => Ok(Some((v, n))),
            Err(_) => bail!("rank {rank}: {k}={v:?} is not a Slurm id (a non-negative integer)"),
        }
    };
    let job_id = id("SLURM_JOB_ID", get("SLURM_JOB_ID"))?;
    let step = id("SLURM_STEP_ID", step_id(get))?;
    let (host, listen_everywhere, host_origin) = match get("MLM_MASTER_ADDR").filter(|a| !a.trim().is_empty()) {
        Some(a) => (a.trim().to_string(), false, "MLM_MASTER_ADDR".to_string()),
        None => {
            let (var, list) = NODELIST_VARS
                .iter()
                .find_map(|k| get(k).filter(|v| !v.trim().is_empty()).map(|v| (*k, v)))
                .ok_or_else(|| {
                    anyhow!(
                        "rank {rank}: none of {} is set, so the tasks cannot find rank 0's host; set MLM_MASTER_ADDR",
                        NODELIST_VARS.join(", ")
                    )
                })?;
            let host = first_host(var, &list).with_context(|| format!("rank {rank}"))?;
            (host, true, format!("the first host of {var}={list:?}"))
        }
    };
    let (port, port_origin) = match get("MLM_MASTER_PORT").filter(|p| !p.trim().is_empty()) {
        Some(p) => match p.trim().parse::<u16>() {
            Ok(n) if n > 0 => (n, "MLM_MASTER_PORT".to_string()),
            _ => bail!("rank {rank}: MLM_MASTER_PORT={p:?} is not a port number (1-65535)"),
        },
        None => {
            let (Some((j, job_n)), Some((s, step_n))) = (&job_id, &step) else {
                bail!(
                    "rank {rank}: SLURM_JOB_ID and SLURM_STEP_ID are needed to derive the rendezvous port; \
                     set MLM_MASTER_PORT"
                );
            };
            let port = derived_port(*job_n, *step_n);
            (port, format!("port {port} from SLURM_JOB_ID={j} and SLURM_STEP_ID={s}"))
        }
    };
    if rank == 0 && listen_everywhere {
        if let Some(me) = get("SLURMD_NODENAME").filter(|n| !n.is_empty() && *n != host) {
            bail!(
                "rank 0 runs on {me} (SLURMD_NODENAME) but the other ranks look for it on {host}, {host_origin}; \
                 let srun place task 0 on the first node (no --distribution=arbitrary) or set MLM_MASTER_ADDR to \
                 rank 0's host"
            );
        }
    }
    let origin = if listen_everywhere || port_origin != "MLM_MASTER_PORT" {
        format!("{host_origin}, {port_origin}; MLM_MASTER_ADDR and MLM_MASTER_PORT override them")
    } else {
        format!("{host_origin}, {port_origin}")
    };
    // Two steps never join each other, even of one job with one config.
    let ids = format!(
        "slurm job {} step {}",
        job_id.map(|(v, _)| v).unwrap_or_default(),
        step.map(|(v, _)| v).unwrap_or_default()
    );
    let mut meeting = Meeting { host, port, token: String::new(), listen_everywhere, origin };
    meeting.token = job_token(get("MLM_JOB_TOKEN").as_deref(), &format!("{job}\0{ids}"), &meeting.addr());
    Ok(meeting)
}

/// The tcp ring of an `srun` step, from its variables.
pub fn tcp_from_env(world: WorldInfo, timeout: Duration, job: &str) -> Result<TcpComm> {
    let get = |k: &str| std::env::var(k).ok();
    let m = meeting(&get, world, job, &first_host)?;
    let addr = m.addr();
    let listen = if world.rank == 0 && m.listen_everywhere { unspecified(&addr) } else { addr.clone() };
    if world.rank == 0 {
        tracing::info!(rendezvous = %addr, listen = %listen, world_size = world.world_size, "slurm: tasks meet over tcp");
    }
    let ranks_per_node = tasks_per_node(&get, world.world_size);
    let rdv = tcp::Rendezvous { addr: listen, token: m.token.clone(), timeout, ranks_per_node };
    TcpComm::connect(world.rank, world.world_size, &rdv)
        .with_context(|| format!("srun tasks meet at {addr} ({})", m.origin))
}

/// Tasks per node when srun placed the same number on every node of several
/// (`SLURM_STEP_TASKS_PER_NODE` = "8(x2)"; block distribution, Slurm's
/// default), so that errors can name a peer's node; `None` otherwise.
pub fn tasks_per_node(get: &dyn Fn(&str) -> Option<String>, world: usize) -> Option<usize> {
    let v = get("SLURM_STEP_TASKS_PER_NODE").or_else(|| get("SLURM_TASKS_PER_NODE"))?;
    let v = v.trim();
    let n: usize = match v.split_once("(x") {
        Some((n, rest)) if rest.ends_with(')') && !rest.contains(',') && !n.contains(',') => n.parse().ok()?,
        None if !v.contains(',') => v.parse().ok()?,
        _ => return None, // nodes with different task counts
    };
    let block = get("SLURM_DISTRIBUTION").is_none_or(|d| d.starts_with("block"));
    (n > 0 && world > n && world.is_multiple_of(n) && block).then_some(n)
}

/// Every interface, of the address family `addr` resolves to here.
fn unspecified(addr: &str) -> String {
    let port = addr.rsplit(':').next().unwrap_or("0");
    match addr.to_socket_addrs().ok().and_then(|mut a| a.next()) {
        Some(a) if a.is_ipv6() => format!("[::]:{port}"),
        _ => format!("0.0.0.0:{port}"),
    }
}

/// The first host of a node list, as `scontrol show hostnames` says, else as
/// [`HostList`] parses it (no `scontrol`, or no Slurm config to run it with).
/// `var` names the variable in the error.
pub fn first_host(var: &str, list: &str) -> Result<String> {
    if let Some(host) = scontrol_first_host(list) {
        return Ok(host);
    }
    HostList::parse(list).map(|l| l.first()).map_err(|why| anyhow!("{var}={list:?} is not a Slurm host list ({why})"))
}

/// `scontrol show hostnames LIST`'s first line, when scontrol runs, succeeds
/// within [`SCONTROL_TIMEOUT`] and prints a host name (it exits 0 and prints
/// nothing, or a fragment, for a list it cannot read).
fn scontrol_first_host(list: &str) -> Option<String> {
    let mut child = Command::new("scontrol")
        .args(["show", "hostnames", list])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + SCONTROL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                tracing::warn!(
                    "scontrol show hostnames did not answer within {SCONTROL_TIMEOUT:?}; parsing {list:?} here"
                );
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let text = reader.join().ok()?;
    let first = text.lines().next()?.trim();
    let plausible =
        !first.is_empty() && !first.contains(|c: char| c == '[' || c == ']' || c == ',' || c.is_whitespace());
    (status?.success() && plausible).then(|| first.to_string())
}

#[cfg(test)]
mod tests;
