//! CPU collectives over a ring of TCP connections: the counterpart of NCCL for
//! `mlm-launch --device cpu` jobs and tests.
//!
//! Set-up: rank 0 listens at the rendezvous (`MLM_MASTER_ADDR:MLM_MASTER_PORT`);
//! every other rank opens its own ring listener, connects to the rendezvous and
//! sends the job token, its rank and its listener's port. Once all ranks have
//! joined, rank 0 tells each rank the address of its right neighbour (rank + 1);
//! each rank connects to it (again with the token) and accepts its left
//! neighbour. A connection with a wrong token is logged and refused, so a stray
//! process (or a worker of another job) cannot join.
//!
//! All-reduce is the bandwidth-optimal ring: a reduce-scatter (chunk `c` is summed
//! in ring order starting at rank `c`, in f32, and ends complete on rank `c - 1`),
//! then an all-gather that passes the finished chunks on unchanged, so every rank
//! ends with the same bits. bf16 tensors are summed in f32 (partial sums travel
//! as f32) and rounded once by the chunk's owner; the all-gather sends bf16.
//! Chunks travel in segments of [`SEGMENT_ELEMS`], each forwarded as soon as it
//! is reduced, and a writer thread sends while the caller's thread receives.
//!
//! Every frame carries its collective and length, so ranks that disagree on the
//! operation or the tensor size fail with an error instead of mixing data; a
//! broadcast's buffer grows with the bytes that arrive, not with the length a
//! header claims. A rank that fails sends an abort frame naming the cause to its
//! right neighbour, which passes it on, so every rank reports the rank that died.
//!
//! Nothing waits past a deadline, however a peer or a stray trickles bytes,
//! stops reading or says nothing: joining (rendezvous, connects, accepts and
//! hellos) ends `timeout` after it began, and each collective `timeout` after
//! its call, its sends included (a collective returns once its frames are
//! written).
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::tensor::{self, bf16_to_f32, f32_to_bf16, Elem};
use super::Communicator;

/// Elements per frame of the all-reduce (1 MiB of f32).
pub const SEGMENT_ELEMS: usize = 1 << 18;
/// How often a blocked receive checks the writer and the deadline.
const POLL: Duration = Duration::from_millis(100);
const MAX_STR: usize = 4096;
/// The largest broadcast a rank accepts (a header claiming more is refused).
const MAX_BCAST: usize = 1 << 32;
/// A broadcast is received in steps of this many bytes.
const BCAST_STEP: usize = 4 << 20;
/// How long a failing rank tries to pass the abort frame on.
const ABORT_WITHIN: Duration = Duration::from_secs(10);

const K_REDUCE: u8 = 1;
const K_GATHER: u8 = 2;
const K_BCAST: u8 = 3;
const K_BARRIER: u8 = 4;
const K_ABORT: u8 = 5;
const HEADER: usize = 9;

fn kind_name(k: u8) -> &'static str {
    match k {
        K_REDUCE | K_GATHER => "all_reduce_sum",
        K_BCAST => "broadcast_bytes",
        K_BARRIER => "barrier",
        K_ABORT => "abort",
        _ => "unknown",
    }
}

/// Where and how the ranks meet.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    /// `host:port` where rank 0 listens.
    pub addr: String,
    /// Secret shared by the ranks of one job (`MLM_JOB_TOKEN`).
    pub token: String,
    /// How long to wait for peers (`distributed.timeout_s`).
    pub timeout: Duration,
    /// Workers per node when the job spans several nodes of equal size
    /// (`LOCAL_WORLD_SIZE` from `mlm-launch --nnodes`), so that errors name
    /// the node of a peer: "rank 5 (node 1)".
    pub ranks_per_node: Option<usize>,
}

/// "rank 5 (node 1)" in a multi-node job, "rank 5" otherwise.
pub fn peer_name(rank: usize, ranks_per_node: Option<usize>) -> String {
    match ranks_per_node {
        Some(n) if n > 0 => format!("rank {rank} (node {})", rank / n),
        _ => format!("rank {rank}"),
    }
}

/// One rank of a tcp ring.
pub struct TcpComm {
    rank: usize,
    world: usize,
    ranks_per_node: Option<usize>,
    timeout: Duration,
    /// The end of the collective in progress.
    deadline: Instant,
    /// Receives from rank - 1; `None` at world size 1.
    left: Option<TcpStream>,
    writer: Option<Writer>,
    /// The first error: every later call returns it.
    failed: Option<String>,
    tmp_f32: Vec<f32>,
    tmp_u16: Vec<u16>,
}

impl TcpComm {
    /// Joins the ring: rank 0 listens at `rdv.addr`, the others connect to it.
    pub fn connect(rank: usize, world: usize, rdv: &Rendezvous) -> Result<Self> {
        if world == 0 || rank >= world {
            bail!("rank {rank}: not below the world size {world}");
        }
        if world == 1 {
            return Ok(Self::single(rdv.timeout));
        }
        if rank == 0 {
            let addrs: Vec<SocketAddr> = rdv
                .addr
                .to_socket_addrs()
                .map_err(|e| {
                    anyhow!("rank 0: cannot resolve the rendezvous address {} (MLM_MASTER_ADDR): {e}", rdv.addr)
                })?
                .collect();
            let listener = TcpListener::bind(&addrs[..])
                .map_err(|e| anyhow!("rank 0: cannot listen at {} (MLM_MASTER_ADDR:MLM_MASTER_PORT): {e}", rdv.addr))?;
            return Self::host_with(listener, world, &rdv.token, rdv.timeout, rdv.ranks_per_node);
        }
        Self::join(rank, world, rdv)
    }

    /// Rank 0 on an already bound rendezvous listener (tests bind port 0).
    pub fn host(listener: TcpListener, world: usize, token: &str, timeout: Duration) -> Result<Self> {
        Self::host_with(listener, world, token, timeout, None)
    }

    fn host_with(
        listener: TcpListener,
        world: usize,
        token: &str,
        timeout: Duration,
        ranks_per_node: Option<usize>,
    ) -> Result<Self> {
        if world == 1 {
            return Ok(Self::single(timeout));
        }
        let deadline = Instant::now() + timeout;
        let here = listener.local_addr()?;
        let ring =
            TcpListener::bind((here.ip(), 0)).map_err(|e| anyhow!("rank 0: cannot open the ring listener: {e}"))?;
        let ring_port = ring.local_addr()?.port();
        let mut joined = gather_hellos(listener, world, token, deadline, timeout)?;
        // Ring addresses as each rank's predecessor can reach them.
        let mut addr: Vec<SocketAddr> = vec![SocketAddr::new(here.ip(), ring_port); world];
        for (r, j) in joined.iter().enumerate().skip(1) {
            let j = j.as_ref().expect("all joined");
            addr[r] = SocketAddr::new(j.peer.ip(), j.port);
        }
        if here.ip().is_unspecified() {
            let last = joined[world - 1].as_ref().expect("all joined");
            addr[0] = SocketAddr::new(last.stream.local_addr()?.ip(), ring_port);
        }
        for (r, j) in joined.iter_mut().enumerate().skip(1) {
            let j = j.as_mut().expect("all joined");
            let right = addr[(r + 1) % world].to_string();
            let mut msg = vec![0u8];
            put_str(&mut msg, &right);
            ByDeadline::new(&j.stream, deadline)
                .write_all(&msg)
                .map_err(|e| anyhow!("rank 0: cannot answer rank {r} at the rendezvous: {e}"))?;
        }
        drop(joined);
        Self::link(0, world, addr[1], ring, token, deadline, timeout, ranks_per_node)
    }

    /// Ranks 1..world: connect to the rendezvous, learn the right neighbour.
    fn join(rank: usize, world: usize, rdv: &Rendezvous) -> Result<Self> {
        let deadline = Instant::now() + rdv.timeout;
        let master = connect_retry(&rdv.addr, deadline).map_err(|e| {
            anyhow!(
                "rank {rank}: cannot reach rank 0's rendezvous at {} (MLM_MASTER_ADDR:MLM_MASTER_PORT) within {} s: {e}",
                rdv.addr,
                rdv.timeout.as_secs()
            )
        })?;
        let me = master.local_addr()?;
        let ring =
            TcpListener::bind((me.ip(), 0)).map_err(|e| anyhow!("rank {rank}: cannot open the ring listener: {e}"))?;
        let mut hello = b"MLMR".to_vec();
        put_str(&mut hello, &rdv.token);
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world as u32).to_le_bytes());
        hello.extend_from_slice(&ring.local_addr()?.port().to_le_bytes());
        let mut to_master = ByDeadline::new(&master, deadline);
        to_master.write_all(&hello).map_err(|e| {
            anyhow!(
                "rank {rank}: cannot send to rank 0's rendezvous at {} within {} s: {e}",
                rdv.addr,
                rdv.timeout.as_secs()
            )
        })?;
        // Rank 0 answers once every rank has joined.
        let answer = (|| -> std::io::Result<(u8, String)> {
            let mut status = [0u8];
            to_master.read_exact(&mut status)?;
            Ok((status[0], get_str(&mut to_master)?))
        })();
        let (status, text) = answer.map_err(|e| {
            anyhow!(
                "rank {rank}: no answer from rank 0's rendezvous at {} within {} s ({e}); did every rank start, with the same MLM_JOB_TOKEN?",
                rdv.addr,
                rdv.timeout.as_secs()
            )
        })?;
        if status != 0 {
            bail!("rank {rank}: rank 0 refused to join: {text}");
        }
        let right: SocketAddr =
            text.parse().map_err(|_| anyhow!("rank {rank}: bad neighbour address {text:?} from rank 0"))?;
        drop(master);
        Self::link(rank, world, right, ring, &rdv.token, deadline, rdv.timeout, rdv.ranks_per_node)
    }

    /// Connects to the right neighbour and accepts the left one.
    #[allow(clippy::too_many_arguments)]
    fn link(
        rank: usize,
        world: usize,
        right_addr: SocketAddr,
        ring: TcpListener,
        token: &str,
        deadline: Instant,
        timeout: Duration,
        ranks_per_node: Option<usize>,
    ) -> Result<Self> {
        let right_rank = peer_name((rank + 1) % world, ranks_per_node);
        let left_rank = (rank + world - 1) % world;
        let right = connect_retry(&right_addr.to_string(), deadline)
            .map_err(|e| anyhow!("rank {rank}: cannot connect to {right_rank} at {right_addr}: {e}"))?;
        let mut hello = b"MLMP".to_vec();
        put_str(&mut hello, token);
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        ByDeadline::new(&right, deadline)
            .write_all(&hello)
            .map_err(|e| anyhow!("rank {rank}: cannot send to {right_rank} within {} s: {e}", timeout.as_secs()))?;
        // After the token: the sender's rank (u32).
        let mut door = Doorman::new(ring, b"MLMP", 4, 1, format!("rank {rank}"), "ring")
            .map_err(|e| anyhow!("rank {rank}: cannot use the ring listener: {e}"))?;
        let left = loop {
            let knock = door.next(deadline).map_err(|e| anyhow!("rank {rank}: the ring listener failed: {e}"))?;
            let Some(Knock { stream, peer, hello }) = knock else {
                bail!(
                    "rank {rank}: {} did not connect within {} s (distributed.timeout_s)",
                    peer_name(left_rank, ranks_per_node),
                    timeout.as_secs()
                );
            };
            let r = u32::from_le_bytes(hello.fields[..4].try_into().expect("4 bytes"));
            if hello.token != token {
                tracing::warn!("rank {rank}: refused a ring connection from {peer}: wrong job token");
            } else if r as usize != left_rank {
                tracing::warn!(
                    "rank {rank}: refused a ring connection from {peer} claiming rank {r} (expected rank {left_rank})"
                );
            } else {
                break stream;
            }
        };
        // Closes the connections still waiting.
        drop(door);
        left.set_read_timeout(Some(POLL))?;
        left.set_nodelay(true)?;
        right.set_nodelay(true)?;
        Ok(Self {
            rank,
            world,
            ranks_per_node,
            timeout,
            deadline,
            left: Some(left),
            writer: Some(Writer::spawn(right, rank, right_rank)?),
            failed: None,
            tmp_f32: Vec::new(),
            tmp_u16: Vec::new(),
        })
    }

    fn single(timeout: Duration) -> Self {
        Self {
            rank: 0,
            world: 1,
            ranks_per_node: None,
            timeout,
            deadline: Instant::now(),
            left: None,
            writer: None,
            failed: None,
            tmp_f32: Vec::new(),
            tmp_u16: Vec::new(),
        }
    }

    fn left_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// The left neighbour as errors name it: "rank 4", or "rank 4 (node 1)".
    fn left_name(&self) -> String {
        peer_name(self.left_rank(), self.ranks_per_node)
    }

    /// Runs one collective by its deadline, its sends written included; on
    /// error poisons the ring and tells the right neighbour.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if let Some(e) = &self.failed {
            bail!("{e} (an earlier collective failed)");
        }
        self.deadline = Instant::now() + self.timeout;
        let out = f(self).and_then(|v| {
            let drained = self.writer.as_ref().expect("world > 1").drain();
            drained.map(|_| v).map_err(|e| self.send_failed(&e))
        });
        if let Err(e) = &out {
            let msg = format!("{e:#}");
            self.failed = Some(msg.clone());
            if let Some(w) = &mut self.writer {
                let _ = w.send(K_ABORT, msg.as_bytes(), Instant::now() + ABORT_WITHIN, ABORT_WITHIN);
            }
            if let Some(l) = &self.left {
                let _ = l.shutdown(Shutdown::Read);
            }
        }
        out
    }

    fn send(&mut self, kind: u8, bytes: &[u8]) -> Result<()> {
        let sent = self.writer.as_mut().expect("world > 1").send(kind, bytes, self.deadline, self.timeout);
        sent.map_err(|e| self.send_failed(&e))
    }

    /// The error of a failed send to the right neighbour, with what the left
    /// one says if it has gone too. A failure travels round the ring both
    /// ways: the right neighbour may have stopped only because the rank that
    /// died is this one's left neighbour, whose closed connection (or abort
    /// message) names the cause.
    fn send_failed(&mut self, send_error: &str) -> anyhow::Error {
        let rank = self.rank;
        let left_name = self.left_name();
        let Some(stream) = self.left.as_mut() else { return anyhow!("rank {rank}: {send_error}") };
        // Waits at most the read timeout (POLL) for the left's end or abort;
        // an abort frame is only looked at (it came in one write).
        let mut head = vec![0u8; HEADER + MAX_STR];
        let left = match stream.peek(&mut head) {
            Ok(0) => Some(format!("{left_name} closed the connection too (it exited or crashed)")),
            Ok(n) if n > HEADER && head[0] == K_ABORT => {
                let len = u64::from_le_bytes(head[1..HEADER].try_into().expect("8 bytes")) as usize;
                let text = &head[HEADER..n.min(HEADER + len)];
                Some(format!("{left_name} stopped too, because {}", String::from_utf8_lossy(text)))
            }
            _ => None,
        };
        match left {
            Some(left) => anyhow!("rank {rank}: {send_error}; {left}"),
            None => anyhow!("rank {rank}: {send_error}"),
        }
    }

    /// Reads one frame's header; fails on an abort or a different collective.
    fn recv_header(&mut self, kind: u8) -> Result<usize> {
        let mut h = [0u8; HEADER];
        self.read_full(&mut h)?;
        let len = u64::from_le_bytes(h[1..].try_into().expect("8 bytes")) as usize;
        if h[0] == K_ABORT {
            let mut text = vec![0u8; len.min(MAX_STR)];
            self.read_full(&mut text)?;
            bail!("rank {}: stopping because {}", self.rank, String::from_utf8_lossy(&text));
        }
        if h[0] != kind {
            bail!(
                "rank {}: expected {} but {} sent {}: the ranks called different collectives",
                self.rank,
                kind_name(kind),
                self.left_name(),
                kind_name(h[0])
            );
        }
        Ok(len)
    }

    /// Receives a frame of exactly `buf.len()` bytes.
    fn recv_exact(&mut self, kind: u8, buf: &mut [u8]) -> Result<()> {
        let len = self.recv_header(kind)?;
        if len != buf.len() {
            bail!(
                "rank {}: {} sent {len} bytes of {} where {} were expected: the ranks passed tensors of different sizes or dtypes",
                self.rank,
                self.left_name(),
                kind_name(kind),
                buf.len()
            );
        }
        self.read_full(buf)
    }

    /// Reads `buf.len()` bytes from the left neighbour by the collective's
    /// deadline, checking the writer's health while it waits.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<()> {
        let (rank, left_rank, secs) = (self.rank, self.left_name(), self.timeout.as_secs());
        let stream = self.left.as_mut().expect("world > 1");
        let writer = self.writer.as_ref().expect("world > 1");
        let mut done = 0;
        while done < buf.len() {
            // Checked after every read too: a trickle of bytes must not extend it.
            if Instant::now() >= self.deadline {
                if done == 0 {
                    bail!(
                        "rank {rank}: no data from {left_rank} within {secs} s (distributed.timeout_s); is it alive?"
                    );
                }
                bail!(
                    "rank {rank}: {left_rank} sent only {done} of {} bytes within {secs} s (distributed.timeout_s); \
                     is it stuck, or the link that slow?",
                    buf.len()
                );
            }
            match stream.read(&mut buf[done..]) {
                Ok(0) => bail!("rank {rank}: {left_rank} closed the connection (it exited or crashed)"),
                Ok(n) => done += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                    if let Some(err) = writer.error() {
                        return Err(self.send_failed(&err));
                    }
                }
                Err(e) => bail!("rank {rank}: connection from {left_rank} failed: {e}"),
            }
        }
        Ok(())
    }

    /// The ring all-reduce on f32 values; `gather_bf16` rounds the sums to bf16
    /// and sends bf16 in the all-gather.
    fn ring_all_reduce(&mut self, work: &mut [f32], gather_bf16: bool) -> Result<()> {
        let (n, w, r) = (work.len(), self.world, self.rank);
        let chunk = |c: usize| (c * n / w)..((c + 1) * n / w);
        let segments = |c: usize| {
            let range = chunk(c);
            (range.start..range.end).step_by(SEGMENT_ELEMS).map(move |s| s..(s + SEGMENT_ELEMS).min(range.end))
        };
        let mut tmp = std::mem::take(&mut self.tmp_f32);
        let mut tmp16 = std::mem::take(&mut self.tmp_u16);
        let result = (|| -> Result<()> {
            for seg in segments(r) {
                self.send(K_REDUCE, as_bytes(&work[seg]))?;
            }
            // Reduce-scatter: step s receives chunk r - s - 1, adds this rank's values.
            for s in 0..w - 1 {
                let c = (r + 2 * w - s - 1) % w;
                for seg in segments(c) {
                    tmp.resize(seg.len(), 0.0);
                    self.recv_exact(K_REDUCE, as_bytes_mut(&mut tmp))?;
                    let mine = &mut work[seg];
                    for (m, t) in mine.iter_mut().zip(&tmp) {
                        *m += *t;
                    }
                    if s < w - 2 {
                        self.send(K_REDUCE, as_bytes(mine))?;
                    } else if gather_bf16 {
                        // This rank owns chunk c: round once, send bf16.
                        tmp16.clear();
                        tmp16.extend(mine.iter_mut().map(|m| {
                            let b = f32_to_bf16(*m);
                            *m = bf16_to_f32(b);
                            b
                        }));
                        self.send(K_GATHER, as_bytes(&tmp16))?;
                    } else {
                        self.send(K_GATHER, as_bytes(mine))?;
                    }
                }
            }
            // All-gather: step s receives finished chunk r - s and passes it on.
            for s in 0..w - 1 {
                let c = (r + w - s) % w;
                for seg in segments(c) {
                    let len = seg.len();
                    if gather_bf16 {
                        tmp16.resize(len, 0);
                        self.recv_exact(K_GATHER, as_bytes_mut(&mut tmp16))?;
                        for (m, b) in work[seg].iter_mut().zip(&tmp16) {
                            *m = bf16_to_f32(*b);
                        }
                        if s < w - 2 {
                            self.send(K_GATHER, as_bytes(&tmp16))?;
                        }
                    } else {
                        self.recv_exact(K_GATHER, as_bytes_mut(&mut work[seg.clone()]))?;
                        if s < w - 2 {
                            self.send(K_GATHER, as_bytes(&work[seg]))?;
                        }
                    }
                }
            }
            Ok(())
        })();
        self.tmp_f32 = tmp;
        self.tmp_u16 = tmp16;
        result
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, t: &mut tch::Tensor) -> Result<()> {
        let elem = Elem::of(t, self.rank)?;
        if self.world == 1 {
            return Ok(());
        }
        let rank = self.rank;
        let what = format!(
            "an all-reduce of {} {:?} ({:.1} MiB)",
            t.numel(),
            t.kind(),
            (t.numel() * t.kind().elt_size_in_bytes()) as f64 / (1u64 << 20) as f64
        );
        let result = tensor::on_host(t, rank, |host| {
            self.guarded(|me| match elem {
                Elem::F32 => {
                    // SAFETY: `host` is a contiguous CPU f32 tensor not otherwise viewed here.
                    let data = unsafe { tensor::f32_slice(host) };
                    me.ring_all_reduce(data, false)
                }
                Elem::Bf16 => {
                    // libtorch converts (vectorised); the sums come back already
                    // rounded to bf16 values, so the final conversion is exact.
                    let mut work = host.to_kind(tch::Kind::Float);
                    // SAFETY: `work` is a fresh contiguous CPU f32 tensor.
                    me.ring_all_reduce(unsafe { tensor::f32_slice(&mut work) }, true)?;
                    host.copy_(&work);
                    Ok(())
                }
            })
        });
        result.map_err(|e| anyhow!("{e} (during {what})"))
    }

    fn broadcast_bytes(&mut self, root: usize, data: &mut Vec<u8>) -> Result<()> {
        if root >= self.world {
            bail!("rank {}: broadcast from rank {root} in a job of {} workers", self.rank, self.world);
        }
        if self.world == 1 {
            return Ok(());
        }
        self.guarded(|me| {
            if me.rank == root {
                return me.send(K_BCAST, data);
            }
            let len = me.recv_header(K_BCAST)?;
            if len > MAX_BCAST {
                bail!(
                    "rank {}: {} announced a broadcast of {len} bytes, more than the {MAX_BCAST} a rank accepts: \
                     is it an mlm worker of another version?",
                    me.rank,
                    me.left_name()
                );
            }
            // Grows with the bytes that arrive, not with what the header claims.
            data.clear();
            while data.len() < len {
                let from = data.len();
                data.resize(from + (len - from).min(BCAST_STEP), 0);
                me.read_full(&mut data[from..])?;
            }
            if (me.rank + 1) % me.world != root {
                me.send(K_BCAST, data)?;
            }
            Ok(())
        })
        .map_err(|e| anyhow!("{e} (during a broadcast from rank {root})"))
    }

    fn barrier(&mut self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        // Two laps of an empty frame: the first proves every rank arrived, the
        // second releases them.
        self.guarded(|me| {
            if me.rank == 0 {
                me.send(K_BARRIER, &[])?;
                me.recv_exact(K_BARRIER, &mut [])?;
                me.send(K_BARRIER, &[])
            } else {
                me.recv_exact(K_BARRIER, &mut [])?;
                me.send(K_BARRIER, &[])?;
                me.recv_exact(K_BARRIER, &mut [])?;
                if me.rank + 1 < me.world {
                    me.send(K_BARRIER, &[])?;
                }
                Ok(())
            }
        })
        .map_err(|e| anyhow!("{e} (during a barrier)"))
    }

    fn name(&self) -> &'static str {
        "tcp"
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }
}

impl Drop for TcpComm {
    fn drop(&mut self) {
        if let Some(w) = self.writer.take() {
            // Let the last frames reach the neighbour, unless the ring is broken.
            w.finish(self.failed.is_none());
        }
    }
}

/// Plain-old-data element types sent as raw little-endian bytes.
trait Pod: Copy {}
impl Pod for f32 {}
impl Pod for u16 {}

fn as_bytes<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: f32/u16 have no padding and every byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn as_bytes_mut<T: Pod>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: every byte pattern is a valid f32/u16, and the length is exact.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

mod handshake;
mod rendezvous;
mod writer;
use handshake::{ByDeadline, Doorman, Knock};
use rendezvous::{connect_retry, gather_hellos, get_str, put_str};
use writer::Writer;

#[cfg(test)]
mod tests;
