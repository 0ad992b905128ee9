//! Joining a tcp job: the rendezvous at rank 0 (hello frames with the job token,
//! refusing strangers) and the small helpers that connect and frame strings.
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::handshake::{ByDeadline, Doorman, Knock};
use super::MAX_STR;

pub(super) struct Joined {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) port: u16,
}

/// Rank 0: waits until ranks 1..world have said hello with the right token.
/// Connections are read side by side ([`Doorman`]), so a stray that trickles
/// bytes or says nothing neither keeps the ranks out nor outlasts `deadline`;
/// any still waiting are closed on return.
pub(super) fn gather_hellos(
    listener: TcpListener,
    world: usize,
    token: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<Option<Joined>>> {
    // After the token: rank (u32), world size (u32), ring listener's port (u16).
    let mut door = Doorman::new(listener, b"MLMR", 10, world - 1, "rank 0".into(), "rendezvous")
        .map_err(|e| anyhow!("rank 0: cannot use the rendezvous listener: {e}"))?;
    let mut joined: Vec<Option<Joined>> = (0..world).map(|_| None).collect();
    let mut count = 1;
    while count < world {
        let knock = door.next(deadline).map_err(|e| anyhow!("rank 0: the rendezvous listener failed: {e}"))?;
        let Some(Knock { stream, peer, hello: h }) = knock else {
            let missing: Vec<String> = (1..world).filter(|r| joined[*r].is_none()).map(|r| r.to_string()).collect();
            bail!(
                "rank 0: {count} of {world} ranks joined the rendezvous within {} s (distributed.timeout_s); missing ranks: {}",
                timeout.as_secs(),
                missing.join(", ")
            );
        };
        let field = |i: usize| u32::from_le_bytes(h.fields[i..i + 4].try_into().expect("4 bytes"));
        let (rank, their_world) = (field(0), field(4));
        let port = u16::from_le_bytes(h.fields[8..10].try_into().expect("2 bytes"));
        if h.token != token {
            tracing::warn!("rank 0: refused a rendezvous connection from {peer} (rank {rank}): another job's token");
            // Tell the stranger at once rather than let it wait for its timeout.
            refuse(
                &stream,
                deadline,
                "this port belongs to another job (its job token differs: another MLM_JOB_TOKEN, or another config \
                 or output_dir than rank 0's); check MLM_MASTER_PORT and that every rank runs the same config",
            );
            continue;
        }
        // The job's own workers from here on (the token matched): a mismatch
        // stops the job, and everyone who joined hears why at once.
        if their_world as usize != world {
            let why = format!(
                "rank {rank} says WORLD_SIZE={their_world} but rank 0 has {world}: every node must start the same \
                 number of workers (mlm-launch --nproc) and count the same nodes (--nnodes)"
            );
            refuse_all(&stream, &joined, deadline, &why);
            bail!("rank 0: {why}");
        }
        let r = rank as usize;
        if r == 0 || r >= world || joined[r].is_some() {
            let why = format!(
                "rank {r} joined twice or is out of range (world size {world}): check each node's \
                 --node-rank, --nproc and --nnodes (RANK and WORLD_SIZE)"
            );
            refuse_all(&stream, &joined, deadline, &why);
            bail!("rank 0: {why}");
        }
        joined[r] = Some(Joined { stream, peer, port });
        count += 1;
    }
    Ok(joined)
}

/// Refuses `stream` and every rank that has joined so far with `why`: the
/// job cannot start, and none of them waits for its timeout to learn it.
fn refuse_all(stream: &TcpStream, joined: &[Option<Joined>], deadline: Instant, why: &str) {
    refuse(stream, deadline, why);
    for j in joined.iter().flatten() {
        refuse(&j.stream, deadline, why);
    }
}

/// Answers a refused worker (a short message: it never waits for the reader).
fn refuse(stream: &TcpStream, deadline: Instant, why: &str) {
    let mut msg = vec![1u8];
    put_str(&mut msg, why);
    let _ = ByDeadline::new(stream, deadline).write_all(&msg);
}

pub(super) fn connect_retry(addr: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    loop {
        let err = match addr.to_socket_addrs() {
            Ok(addrs) => {
                let mut last = std::io::Error::new(ErrorKind::NotFound, "no address");
                for a in addrs {
                    match TcpStream::connect_timeout(&a, remaining(deadline).max(Duration::from_millis(10))) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = e,
                    }
                }
                last
            }
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(err);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(super) fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

pub(super) fn put_str(buf: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_STR)];
    buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
    buf.extend_from_slice(b);
}

pub(super) fn get_str(s: &mut impl Read) -> std::io::Result<String> {
    let mut n = [0u8; 4];
    s.read_exact(&mut n)?;
    let n = u32::from_le_bytes(n) as usize;
    if n > MAX_STR {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "string too long"));
    }
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|_| std::io::Error::new(ErrorKind::InvalidData, "not UTF-8"))
}
