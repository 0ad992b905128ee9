//! The sending half of a rank: a thread writes frames to the right neighbour,
//! so that a rank sends and receives at once (the ring never deadlocks on full
//! socket buffers). Each frame carries the deadline of its collective: a
//! neighbour that stops reading, or reads a trickle, fails the send by then.
use std::net::TcpStream;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use std::io::{ErrorKind, Write};

use super::handshake::ByDeadline;
use super::{HEADER, POLL};

struct Frame {
    bytes: Vec<u8>,
    deadline: Instant,
    /// `distributed.timeout_s`, for the error.
    timeout: Duration,
}

#[derive(Default)]
struct State {
    written: u64,
    error: Option<String>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wrote: Condvar,
}

pub(super) struct Writer {
    tx: Option<mpsc::Sender<Frame>>,
    /// Written frames, to reuse their buffers.
    pool: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
    queued: u64,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    /// `right_rank` names the neighbour in errors ("rank 1 (node 1)").
    pub(super) fn spawn(stream: TcpStream, rank: usize, right_rank: String) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Frame>();
        let (pool_tx, pool) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let state = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("mlm-tcp-send-{rank}"))
            .spawn(move || {
                for frame in rx {
                    let sent = ByDeadline::new(&stream, frame.deadline).write_all(&frame.bytes);
                    let mut st = state.state.lock().expect("writer lock");
                    match sent {
                        Ok(()) => st.written += 1,
                        Err(e) => {
                            st.error = Some(match e.kind() {
                                ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
                                    "{right_rank} did not take the data sent to it within {} s \
                                     (distributed.timeout_s): it stopped reading",
                                    frame.timeout.as_secs()
                                ),
                                _ => format!("cannot send to {right_rank} (it exited or crashed): {e}"),
                            });
                            state.wrote.notify_all();
                            // Dropping the stream tells the neighbour at once.
                            return;
                        }
                    }
                    drop(st);
                    state.wrote.notify_all();
                    let _ = pool_tx.send(frame.bytes);
                }
            })
            .map_err(|e| anyhow!("rank {rank}: cannot start the tcp sender thread: {e}"))?;
        Ok(Self { tx: Some(tx), pool, shared, queued: 0, handle: Some(handle) })
    }

    pub(super) fn error(&self) -> Option<String> {
        self.shared.state.lock().expect("writer lock").error.clone()
    }

    /// Queues one frame, to be written by `deadline`.
    pub(super) fn send(
        &mut self,
        kind: u8,
        payload: &[u8],
        deadline: Instant,
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        if let Some(e) = self.error() {
            return Err(e);
        }
        let mut bytes = self.pool.try_recv().unwrap_or_default();
        bytes.clear();
        bytes.reserve(HEADER + payload.len());
        bytes.push(kind);
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(payload);
        let tx = self.tx.as_ref().expect("writer open");
        tx.send(Frame { bytes, deadline, timeout })
            .map_err(|_| self.error().unwrap_or_else(|| "the sending thread stopped".into()))?;
        self.queued += 1;
        Ok(())
    }

    /// Waits until every queued frame is written, or one has failed (each
    /// fails by its deadline), so that a collective ends with its sends and
    /// the queue never outgrows one collective.
    pub(super) fn drain(&self) -> std::result::Result<(), String> {
        let mut st = self.shared.state.lock().expect("writer lock");
        loop {
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            if st.written == self.queued {
                return Ok(());
            }
            if self.handle.as_ref().is_none_or(|h| h.is_finished()) {
                return Err("the sending thread stopped".into());
            }
            st = self.shared.wrote.wait_timeout(st, POLL).expect("writer lock").0;
        }
    }

    /// Closes the queue; with `wait`, joins the thread once it has written
    /// what is queued (by the frames' deadlines at the latest).
    pub(super) fn finish(mut self, wait: bool) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            if wait {
                let _ = h.join();
            }
        }
    }
}
