//! Joining a tcp job: the rendezvous at rank 0 (hello frames with the job token,
//! refusing strangers) and the small helpers that connect and frame strings.
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use super::MAX_STR;

pub(super) struct Joined {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) port: u16,
}

pub(super) struct Hello {
    pub(super) token: String,
    pub(super) rank: u32,
    pub(super) world: u32,
    pub(super) port: u16,
}

/// Rank 0: waits until ranks 1..world have said hello with the right token.
pub(super) fn gather_hellos(
    listener: TcpListener,
    world: usize,
    token: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<Option<Joined>>> {
    let (tx, rx) = mpsc::channel::<(TcpStream, SocketAddr, std::io::Result<Hello>)>();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    listener.set_nonblocking(true)?;
    let acceptor = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, peer)) => {
                        let tx = tx.clone();
                        // One thread per connection: a silent stray cannot stall the others.
                        std::thread::spawn(move || {
                            let mut s = s;
                            let hello = read_hello(&mut s);
                            let _ = tx.send((s, peer, hello));
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
    };
    let mut joined: Vec<Option<Joined>> = (0..world).map(|_| None).collect();
    let mut count = 1;
    let result = loop {
        if count == world {
            break Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((mut stream, peer, hello)) = rx.recv_timeout(left) else {
            let missing: Vec<String> = (1..world).filter(|r| joined[*r].is_none()).map(|r| r.to_string()).collect();
            break Err(anyhow!(
                "rank 0: {count} of {world} ranks joined the rendezvous within {} s (distributed.timeout_s); missing ranks: {}",
                timeout.as_secs(),
                missing.join(", ")
            ));
        };
        let h = match hello {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("rank 0: refused a rendezvous connection from {peer}: {e}");
                continue;
            }
        };
        let refuse = |stream: &mut TcpStream, why: &str| {
            let mut msg = vec![1u8];
            put_str(&mut msg, why);
            let _ = stream.write_all(&msg);
        };
        if h.token != token {
            tracing::warn!(
                "rank 0: refused a rendezvous connection from {peer} (rank {}): another job's token",
                h.rank
            );
            // Tell the stranger at once rather than let it wait for its timeout.
            refuse(
                &mut stream,
                "this port belongs to another job (its job token differs: another MLM_JOB_TOKEN, or another config \
                 or output_dir than rank 0's); check MLM_MASTER_PORT and that every rank runs the same config",
            );
            continue;
        }
        if h.world as usize != world {
            let why = format!("rank {} says WORLD_SIZE={} but rank 0 has {world}", h.rank, h.world);
            refuse(&mut stream, &why);
            break Err(anyhow!("rank 0: {why}"));
        }
        let r = h.rank as usize;
        if r == 0 || r >= world || joined[r].is_some() {
            let why = format!("rank {r} joined twice or is out of range (world size {world})");
            refuse(&mut stream, &why);
            break Err(anyhow!("rank 0: {why}"));
        }
        stream.set_nonblocking(false)?;
        joined[r] = Some(Joined { stream, peer, port: h.port });
        count += 1;
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = acceptor.join();
    result.map(|_| joined)
}

pub(super) fn read_hello(s: &mut TcpStream) -> std::io::Result<Hello> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut magic = [0u8; 4];
    s.read_exact(&mut magic)?;
    if &magic != b"MLMR" {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "not an mlm worker"));
    }
    let token = get_str(s)?;
    let mut b = [0u8; 10];
    s.read_exact(&mut b)?;
    Ok(Hello {
        token,
        rank: u32::from_le_bytes(b[0..4].try_into().expect("4")),
        world: u32::from_le_bytes(b[4..8].try_into().expect("4")),
        port: u16::from_le_bytes(b[8..10].try_into().expect("2")),
    })
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
