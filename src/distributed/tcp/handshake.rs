//! Accepting connections that must prove they belong to the job, and socket
//! I/O that ends by a deadline.
//!
//! [`Doorman`] reads every new connection without blocking, beside the others,
//! and hands over the first one that sends a complete hello (magic, job token,
//! fixed fields). A connection that sends something else, or no complete hello
//! before its own deadline, is dropped: a stray that connects first and then
//! trickles bytes, says nothing, or opens many connections at once can neither
//! keep the real peer out nor hold the caller past its deadline.
//!
//! [`ByDeadline`] bounds each read and write by the time left to one deadline,
//! not by a fresh timeout per call that a trickle of bytes would keep renewing.
use std::io::{Error, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::MAX_STR;

/// How long one connection may take to send its hello (never past the
/// caller's deadline). A real peer sends it as soon as it has connected.
const HELLO_WITHIN: Duration = Duration::from_secs(10);
/// Connections waiting for their hello at once, beyond the peers expected;
/// past it the one that has waited longest is dropped, so that a flood cannot
/// exhaust file descriptors.
const SPARE_WAITING: usize = 64;
/// The pause between rounds in which no connection made progress.
const IDLE: Duration = Duration::from_millis(5);
/// Magic, then the token's length (u32).
const HEAD: usize = 8;

/// A hello: the job token and the fixed-size fields that follow it.
pub(super) struct Hello {
    pub(super) token: String,
    pub(super) fields: Vec<u8>,
}

/// A connection that sent a complete hello (whatever its token); blocking.
pub(super) struct Knock {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) hello: Hello,
}

/// Accepts connections on a listener until one sends a complete hello.
pub(super) struct Doorman {
    listener: TcpListener,
    magic: &'static [u8; 4],
    fields: usize,
    max_waiting: usize,
    /// "rank 3", for the log.
    who: String,
    /// "rendezvous" or "ring", for the log.
    what: &'static str,
    /// Oldest first.
    waiting: Vec<Waiting>,
}

struct Waiting {
    stream: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
    since: Instant,
    until: Instant,
}

enum Step {
    /// No complete hello yet; `true` if some bytes came.
    Wait(bool),
    Done(Hello),
    Refuse(String),
}

impl Doorman {
    /// Hellos are `magic`, a string (u32 length, at most `MAX_STR` bytes), then
    /// `fields` bytes; up to `peers` real peers may connect at once.
    pub(super) fn new(
        listener: TcpListener,
        magic: &'static [u8; 4],
        fields: usize,
        peers: usize,
        who: String,
        what: &'static str,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let max_waiting = peers + SPARE_WAITING;
        Ok(Self { listener, magic, fields, max_waiting, who, what, waiting: Vec::new() })
    }

    /// The next connection with a complete hello, or `None` once `deadline`
    /// has passed. Connections still waiting stay for the next call; those
    /// left when the doorman is dropped are closed.
    pub(super) fn next(&mut self, deadline: Instant) -> std::io::Result<Option<Knock>> {
        loop {
            let mut busy = false;
            // A bounded number of new ones a round, so that a flood cannot keep
            // this loop from its deadline.
            for _ in 0..SPARE_WAITING {
                let (stream, peer) = match self.listener.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => match accept_failure(&e) {
                        Failure::Connection => continue,
                        Failure::Resources => {
                            // Out of file descriptors: make room, try again next round.
                            if !self.waiting.is_empty() {
                                let old = self.waiting.remove(0);
                                self.log_refusal(old.peer, &format!("room was needed for newer ones ({e})"));
                            }
                            break;
                        }
                        Failure::Listener => return Err(e),
                    },
                };
                busy = true;
                if let Err(e) = stream.set_nonblocking(true) {
                    self.log_refusal(peer, &e.to_string());
                    continue;
                }
                let now = Instant::now();
                let until = deadline.min(now + HELLO_WITHIN);
                self.waiting.push(Waiting { stream, peer, buf: Vec::new(), since: now, until });
                // A real peer's hello usually arrived with its connection.
                if let Some(knock) = self.advance(self.waiting.len() - 1, &mut busy) {
                    return Ok(Some(knock));
                }
                if self.waiting.len() > self.max_waiting {
                    let old = self.waiting.remove(0);
                    let n = self.max_waiting;
                    self.log_refusal(old.peer, &format!("{n} newer connections were waiting for their hello"));
                }
            }
            let mut i = 0;
            while i < self.waiting.len() {
                let before = self.waiting.len();
                if let Some(knock) = self.advance(i, &mut busy) {
                    return Ok(Some(knock));
                }
                if self.waiting.len() == before {
                    i += 1;
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            if !busy {
                std::thread::sleep(IDLE);
            }
        }
    }

    /// Reads what connection `i` has sent; returns it once its hello is
    /// complete, drops it on a bad or late hello.
    fn advance(&mut self, i: usize, busy: &mut bool) -> Option<Knock> {
        let w = &mut self.waiting[i];
        let why = match w.read(self.magic, self.fields) {
            Step::Wait(progress) => {
                *busy |= progress;
                if Instant::now() < w.until {
                    return None;
                }
                format!("no complete hello within {:.1} s", w.since.elapsed().as_secs_f64())
            }
            Step::Done(hello) => {
                let w = self.waiting.remove(i);
                match w.stream.set_nonblocking(false) {
                    Ok(()) => return Some(Knock { stream: w.stream, peer: w.peer, hello }),
                    Err(e) => {
                        self.log_refusal(w.peer, &e.to_string());
                        return None;
                    }
                }
            }
            Step::Refuse(why) => why,
        };
        let w = self.waiting.remove(i);
        self.log_refusal(w.peer, &why);
        None
    }

    fn log_refusal(&self, peer: SocketAddr, why: &str) {
        tracing::warn!("{}: refused a {} connection from {peer}: {why}", self.who, self.what);
    }
}

enum Failure {
    /// One connection failed before it was accepted.
    Connection,
    /// Out of file descriptors or memory, for now.
    Resources,
    /// The listener itself is broken.
    Listener,
}

fn accept_failure(e: &Error) -> Failure {
    match (e.kind(), e.raw_os_error()) {
        (ErrorKind::Interrupted | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset, _) => Failure::Connection,
        (_, Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) => Failure::Resources,
        _ => Failure::Listener,
    }
}

impl Waiting {
    /// Reads no further than the hello: a peer may send its first frames
    /// right behind it.
    fn read(&mut self, magic: &[u8; 4], fields: usize) -> Step {
        let mut progress = false;
        loop {
            let want = if self.buf.len() < HEAD {
                HEAD
            } else {
                HEAD + u32::from_le_bytes(self.buf[4..HEAD].try_into().expect("4 bytes")) as usize + fields
            };
            if self.buf.len() == want {
                let token = match String::from_utf8(self.buf[HEAD..want - fields].to_vec()) {
                    Ok(t) => t,
                    Err(_) => return Step::Refuse("its job token is not UTF-8".into()),
                };
                return Step::Done(Hello { token, fields: self.buf[want - fields..].to_vec() });
            }
            let mut chunk = [0u8; 512];
            let n = (want - self.buf.len()).min(chunk.len());
            match (&self.stream).read(&mut chunk[..n]) {
                Ok(0) => return Step::Refuse("closed before its hello was complete".into()),
                Ok(n) => {
                    progress = true;
                    self.buf.extend_from_slice(&chunk[..n]);
                    let m = self.buf.len().min(4);
                    if self.buf[..m] != magic[..m] {
                        return Step::Refuse("not an mlm worker".into());
                    }
                    if self.buf.len() >= HEAD {
                        let len = u32::from_le_bytes(self.buf[4..HEAD].try_into().expect("4 bytes")) as usize;
                        if len > MAX_STR {
                            return Step::Refuse(format!("announced a job token of {len} bytes (at most {MAX_STR})"));
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Wait(progress),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Step::Refuse(e.to_string()),
            }
        }
    }
}

/// A blocking stream whose reads and writes end by `deadline`, however slowly
/// the peer sends or reads: each call waits at most the time left.
pub(super) struct ByDeadline<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl<'a> ByDeadline<'a> {
    pub(super) fn new(stream: &'a TcpStream, deadline: Instant) -> Self {
        Self { stream, deadline }
    }

    fn time_left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::new(ErrorKind::TimedOut, "timed out"));
        }
        Ok(left)
    }
}

/// A socket timeout reads as `WouldBlock` ("Resource temporarily unavailable").
fn timed_out(e: Error) -> Error {
    match e.kind() {
        ErrorKind::WouldBlock => Error::new(ErrorKind::TimedOut, "timed out"),
        _ => e,
    }
}

impl Read for ByDeadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.time_left()?))?;
        self.stream.read(buf).map_err(timed_out)
    }
}

impl Write for ByDeadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.time_left()?))?;
        self.stream.write(buf).map_err(timed_out)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
