//! The tcp ring with N ranks as threads of one process on loopback.
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

use super::*;

/// Starts `world` ranks on threads, runs `f` on each, returns the results by rank.
fn run_ring<T: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(TcpComm) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let token = "test-token".to_string();
    let mut handles = Vec::new();
    let host = {
        let (f, token) = (f.clone(), token.clone());
        std::thread::spawn(move || f(TcpComm::host(listener, world, &token, timeout).unwrap()))
    };
    handles.push(host);
    for rank in 1..world {
        let rdv = Rendezvous { addr: addr.clone(), token: token.clone(), timeout, ranks_per_node: None };
        let f = f.clone();
        handles.push(std::thread::spawn(move || f(TcpComm::connect(rank, world, &rdv).unwrap())));
    }
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Rank r's input: small integers, so every sum is exact in f32 and bf16.
fn input(rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 + rank * 13) % 17) as f32 - 8.0).collect()
}

#[test]
fn ring_all_reduce_sums_exactly_and_identically() {
    for world in [2, 3, 4] {
        for n in [1usize, 7, 1000, 1 << 20] {
            for kind in [Kind::Float, Kind::BFloat16] {
                let out = run_ring(world, Duration::from_secs(30), move |mut c| {
                    let mut t = Tensor::from_slice(&input(c.rank(), n)).to_kind(kind);
                    c.all_reduce_sum(&mut t).unwrap();
                    assert_eq!(t.kind(), kind);
                    Vec::<f32>::try_from(&t.to_kind(Kind::Float)).unwrap()
                });
                let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, n)).collect();
                let want: Vec<f32> = (0..n).map(|i| inputs.iter().map(|x| x[i]).sum()).collect();
                for (r, got) in out.iter().enumerate() {
                    assert!(
                        got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "world {world} n {n} {kind:?} rank {r}: wrong sum"
                    );
                }
            }
        }
    }
}

#[test]
fn ring_all_reduce_is_bitwise_equal_on_all_ranks_when_inexact() {
    for world in [2, 3, 4] {
        for kind in [Kind::Float, Kind::BFloat16] {
            let n = 300_001;
            let out = run_ring(world, Duration::from_secs(30), move |mut c| {
                let mut t = Tensor::randn([n], (Kind::Float, tch::Device::Cpu)).to_kind(kind) * 1e3;
                c.all_reduce_sum(&mut t).unwrap();
                let bits: Vec<u8> = Vec::<u8>::try_from(&t.view_dtype(Kind::Uint8)).unwrap();
                bits
            });
            for r in 1..world {
                assert!(out[r] == out[0], "world {world} {kind:?}: rank {r} differs from rank 0");
            }
        }
    }
}

#[test]
fn bf16_sums_in_f32_and_rounds_once() {
    // 1 + 2^-8 + 2^-8: bf16 partial sums would round 1 + 2^-8 down to 1 twice.
    let out = run_ring(3, Duration::from_secs(30), |mut c| {
        let v = if c.rank() == 0 { 1.0f32 } else { 1.0 / 256.0 };
        let mut t = Tensor::from_slice(&[v; 5]).to_kind(Kind::BFloat16);
        c.all_reduce_sum(&mut t).unwrap();
        Vec::<f32>::try_from(&t.to_kind(Kind::Float)).unwrap()
    });
    let want = 1.0f32 + 2.0 / 256.0;
    let want = bf16_to_f32(f32_to_bf16(want));
    for got in out {
        assert_eq!(got, vec![want; 5]);
    }
}

#[test]
fn broadcast_and_barrier_work_from_any_root() {
    for world in [2, 3, 4] {
        let out = run_ring(world, Duration::from_secs(30), move |mut c| {
            let mut seen = Vec::new();
            for root in 0..world {
                let mut data = if c.rank() == root { format!("from {root}").into_bytes() } else { b"junk".to_vec() };
                c.broadcast_bytes(root, &mut data).unwrap();
                seen.push(String::from_utf8(data).unwrap());
                c.barrier().unwrap();
            }
            // A large payload crosses several socket buffers.
            let mut big = if c.rank() == 1 { vec![7u8; 5 << 20] } else { Vec::new() };
            c.broadcast_bytes(1, &mut big).unwrap();
            assert!(big.len() == 5 << 20 && big.iter().all(|b| *b == 7));
            seen
        });
        for seen in out {
            assert_eq!(seen, (0..world).map(|r| format!("from {r}")).collect::<Vec<_>>());
        }
    }
}

#[test]
fn barrier_waits_for_the_slowest_rank() {
    // When rank 2 entered, shared: each rank's own clock starts when its link
    // is up, at a different moment.
    let entered = Arc::new(std::sync::Mutex::new(None));
    let out = run_ring(3, Duration::from_secs(30), {
        let entered = entered.clone();
        move |mut c| {
            if c.rank() == 2 {
                std::thread::sleep(Duration::from_millis(300));
                *entered.lock().unwrap() = Some(Instant::now());
            }
            c.barrier().unwrap();
            Instant::now()
        }
    });
    let entered = entered.lock().unwrap().unwrap();
    for (r, left) in out.into_iter().enumerate() {
        assert!(left >= entered, "rank {r} left the barrier before rank 2 entered it");
    }
}

#[test]
fn stray_connection_with_wrong_token_is_refused_and_job_completes() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let timeout = Duration::from_secs(20);
    let host = std::thread::spawn(move || {
        let mut c = TcpComm::host(listener, 2, "right", timeout).unwrap();
        let mut t = Tensor::from_slice(&[1.0f32, 2.0]);
        c.all_reduce_sum(&mut t).unwrap();
        Vec::<f32>::try_from(&t).unwrap()
    });
    // A silent connection must not stall the rendezvous.
    let _silent = std::net::TcpStream::connect(&addr).unwrap();
    // A worker of another job arrives (and is answered) before the real rank 1 joins:
    // once every rank has joined, the rendezvous port closes and a later stray sees EOF.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let mut hello = b"MLMR".to_vec();
    put_str(&mut hello, "someone-else");
    hello.extend_from_slice(&1u32.to_le_bytes());
    hello.extend_from_slice(&2u32.to_le_bytes());
    hello.extend_from_slice(&9u16.to_le_bytes());
    s.write_all(&hello).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut status = [0u8; 1];
    s.read_exact(&mut status).expect("the stray is answered at once");
    let why = get_str(&mut s).unwrap();
    assert_eq!(status[0], 1, "the stray is refused");
    assert!(why.contains("belongs to another job"), "{why}");
    let rdv = Rendezvous { addr, token: "right".into(), timeout, ranks_per_node: None };
    let mut c = TcpComm::connect(1, 2, &rdv).unwrap();
    let mut t = Tensor::from_slice(&[10.0f32, 20.0]);
    c.all_reduce_sum(&mut t).unwrap();
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![11.0, 22.0]);
    assert_eq!(host.join().unwrap(), vec![11.0, 22.0]);
}

#[test]
fn dead_peer_makes_the_others_fail_naming_it() {
    for world in [2, 3, 4] {
        let dead = world - 1;
        let timeout = Duration::from_secs(5);
        let out = run_ring(world, timeout, move |mut c| {
            let mut t = Tensor::ones([1000], (Kind::Float, tch::Device::Cpu));
            c.all_reduce_sum(&mut t).unwrap();
            if c.rank() == dead {
                drop(c); // drops its sockets, as a crashed process would
                return None;
            }
            let start = Instant::now();
            let mut t = Tensor::ones([1 << 20], (Kind::Float, tch::Device::Cpu));
            let err = c.all_reduce_sum(&mut t).unwrap_err().to_string();
            // Later calls keep failing instead of hanging.
            assert!(c.barrier().is_err());
            Some((err, start.elapsed()))
        });
        for (r, res) in out.into_iter().enumerate() {
            let Some((err, took)) = res else { continue };
            assert!(took < timeout + Duration::from_secs(2), "world {world} rank {r} took {took:?}");
            assert!(err.starts_with(&format!("rank {r}:")), "world {world}: {err}");
            assert!(err.contains(&format!("rank {dead}")), "world {world} rank {r}: {err}");
        }
    }
}

/// Both neighbours gone: the error names the left one (the rank that died
/// first in a cascade) even when the send to the right fails first.
#[test]
fn a_failed_send_also_names_a_left_neighbour_that_is_gone() {
    for _ in 0..3 {
        let timeout = Duration::from_secs(5);
        let out = run_ring(3, timeout, move |mut c| {
            let mut t = Tensor::ones([1000], (Kind::Float, tch::Device::Cpu));
            c.all_reduce_sum(&mut t).unwrap();
            if c.rank() != 0 {
                return None;
            }
            // Ranks 1 and 2 are dropping their sockets now.
            std::thread::sleep(Duration::from_millis(300));
            let mut t = Tensor::ones([1 << 22], (Kind::Float, tch::Device::Cpu));
            Some(c.all_reduce_sum(&mut t).unwrap_err().to_string())
        });
        let err = out[0].as_ref().unwrap();
        assert!(err.starts_with("rank 0:") && err.contains("rank 2"), "{err}");
    }
}

#[test]
fn silent_peer_times_out_naming_it() {
    let timeout = Duration::from_secs(2);
    let out = run_ring(2, timeout, move |mut c| {
        if c.rank() == 1 {
            // Alive but never calls the collective.
            std::thread::sleep(Duration::from_secs(4));
            return None;
        }
        let start = Instant::now();
        let mut t = Tensor::ones([10], (Kind::Float, tch::Device::Cpu));
        let err = c.all_reduce_sum(&mut t).unwrap_err().to_string();
        Some((err, start.elapsed()))
    });
    let (err, took) = out[0].clone().unwrap();
    assert!(took >= timeout && took < timeout + Duration::from_secs(2), "{took:?}");
    assert!(err.contains("rank 0") && err.contains("rank 1") && err.contains("timeout_s"), "{err}");
}

#[test]
fn mismatched_sizes_fail_instead_of_mixing_data() {
    let out = run_ring(2, Duration::from_secs(5), |mut c| {
        let n = if c.rank() == 0 { 10 } else { 12 };
        let mut t = Tensor::ones([n], (Kind::Float, tch::Device::Cpu));
        c.all_reduce_sum(&mut t).map_err(|e| e.to_string())
    });
    assert!(out.iter().any(|r| matches!(r, Err(e) if e.contains("different sizes"))), "{out:?}");
    assert!(out.iter().all(|r| r.is_err()), "{out:?}");
}

#[test]
fn world_of_one_needs_no_network() {
    let rdv = Rendezvous {
        addr: "unused:1".into(),
        token: String::new(),
        timeout: Duration::from_secs(1),
        ranks_per_node: None,
    };
    let mut c = TcpComm::connect(0, 1, &rdv).unwrap();
    let mut t = Tensor::from_slice(&[3.0f32]);
    c.all_reduce_sum(&mut t).unwrap();
    c.barrier().unwrap();
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![3.0]);
}

#[test]
fn rejects_other_dtypes_and_noncontiguous_tensors() {
    let out = run_ring(2, Duration::from_secs(5), |mut c| {
        let mut i = Tensor::from_slice(&[1i64, 2]);
        let e1 = c.all_reduce_sum(&mut i).unwrap_err().to_string();
        let mut nc = Tensor::ones([4, 4], (Kind::Float, tch::Device::Cpu)).transpose(0, 1);
        let e2 = c.all_reduce_sum(&mut nc).unwrap_err().to_string();
        // The ring is still usable: nothing was sent.
        let mut ok = Tensor::from_slice(&[1.0f32]);
        c.all_reduce_sum(&mut ok).unwrap();
        (e1, e2, Vec::<f32>::try_from(&ok).unwrap())
    });
    for (e1, e2, ok) in out {
        assert!(e1.contains("f32 and bf16"), "{e1}");
        assert!(e2.contains("contiguous"), "{e2}");
        assert_eq!(ok, vec![2.0]);
    }
}

// --- Peers and strays that try to hold a rank past its deadline ---

/// Rank 1 of a 2-rank job played by the test: joins rank 0's rendezvous at
/// `addr` and returns rank 0's ring address and rank 1's ring listener.
fn join_as_rank_1(addr: &str, token: &str) -> (SocketAddr, TcpListener) {
    let ring = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    let mut hello = b"MLMR".to_vec();
    put_str(&mut hello, token);
    hello.extend_from_slice(&1u32.to_le_bytes());
    hello.extend_from_slice(&2u32.to_le_bytes());
    hello.extend_from_slice(&ring.local_addr().unwrap().port().to_le_bytes());
    s.write_all(&hello).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut status = [0u8];
    s.read_exact(&mut status).unwrap();
    let right = get_str(&mut s).unwrap();
    assert_eq!(status[0], 0, "{right}");
    (right.parse().unwrap(), ring)
}

/// The scripted rank 1's ring links: it connects to rank 0's ring as rank 0's
/// left neighbour (`to_0`) and accepts rank 0's connection (`from_0`).
fn link_as_rank_1(rank0_ring: SocketAddr, ring: &TcpListener, token: &str) -> (TcpStream, TcpStream) {
    let mut to_0 = TcpStream::connect(rank0_ring).unwrap();
    let mut hello = b"MLMP".to_vec();
    put_str(&mut hello, token);
    hello.extend_from_slice(&1u32.to_le_bytes());
    to_0.write_all(&hello).unwrap();
    let (mut from_0, _) = ring.accept().unwrap();
    from_0.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut magic = [0u8; 4];
    from_0.read_exact(&mut magic).unwrap();
    assert_eq!(&magic, b"MLMP");
    assert_eq!(get_str(&mut from_0).unwrap(), token);
    from_0.read_exact(&mut [0u8; 4]).unwrap();
    (to_0, from_0)
}

/// The scripted rank 1 links to rank 0 and passes rank 0's barrier.
fn barrier_as_rank_1(rank0_ring: SocketAddr, ring: &TcpListener) {
    let (mut to_0, mut from_0) = link_as_rank_1(rank0_ring, ring, "tok");
    // Rank 0's barrier sends two empty frames and receives two.
    let two = [header(K_BARRIER, 0), header(K_BARRIER, 0)].concat();
    to_0.write_all(&two).unwrap();
    let mut frames = [0u8; 2 * HEADER];
    from_0.read_exact(&mut frames).unwrap();
    assert_eq!(frames[..], two[..]);
}

/// Rank 0 (on a thread) of a 2-rank job whose rank 1 the test plays: runs `f`
/// on rank 0's communicator, returns its handle and rank 1's ring streams.
fn ring_with_scripted_rank_1<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce(TcpComm) -> T + Send + 'static,
) -> (JoinHandle<T>, TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let host = std::thread::spawn(move || f(TcpComm::host(listener, 2, "tok", timeout).unwrap()));
    let (rank0_ring, ring) = join_as_rank_1(&addr, "tok");
    let (to_0, from_0) = link_as_rank_1(rank0_ring, &ring, "tok");
    (host, to_0, from_0)
}

/// A frame header as the ring sends it.
fn header(kind: u8, len: u64) -> Vec<u8> {
    let mut h = vec![kind];
    h.extend_from_slice(&len.to_le_bytes());
    h
}

/// A stray that connects to `addr` (before this returns) and then sends
/// `bytes` one at a time, one every half second, for at most `limit`.
/// The thread returns how long it took the other side to close the
/// connection, or `None` if it never did.
fn trickle(addr: SocketAddr, bytes: Vec<u8>, limit: Duration) -> JoinHandle<Option<Duration>> {
    let s = TcpStream::connect(addr).unwrap();
    std::thread::spawn(move || {
        let start = Instant::now();
        // Paces the trickle, and sees the other side close between bytes.
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        for b in bytes {
            if start.elapsed() > limit {
                return None;
            }
            if (&s).write_all(&[b]).is_err() {
                return Some(start.elapsed());
            }
            match (&s).read(&mut [0u8; 256]) {
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Ok(1..) => {}
                // Closed (end of stream) or reset.
                _ => return Some(start.elapsed()),
            }
        }
        None
    })
}

/// A valid-looking start of a hello with the longest token, that never ends.
fn endless_hello(magic: &[u8; 4]) -> Vec<u8> {
    let mut b = magic.to_vec();
    b.extend_from_slice(&(MAX_STR as u32).to_le_bytes());
    b.resize(b.len() + MAX_STR, b'x');
    b
}

#[test]
fn stray_trickling_to_a_ring_listener_is_dropped_and_the_real_neighbour_joins() {
    // A generous timeout: the ring must form long before it, not at it.
    let timeout = Duration::from_secs(10);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let host = std::thread::spawn(move || {
        let start = Instant::now();
        let mut c = TcpComm::host(listener, 2, "tok", timeout).map_err(|e| e.to_string())?;
        let took = start.elapsed();
        c.barrier().map_err(|e| e.to_string())?;
        Ok::<_, String>(took)
    });
    let (rank0_ring, ring) = join_as_rank_1(&addr, "tok");
    // The stray connects first, and a few silent ones after it.
    let stray = trickle(rank0_ring, endless_hello(b"MLMP"), timeout + Duration::from_secs(8));
    let silent: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(rank0_ring).unwrap()).collect();
    barrier_as_rank_1(rank0_ring, &ring);
    let took = host.join().unwrap().unwrap();
    assert!(took < timeout, "the ring formed after {took:?}");
    let cut = stray.join().unwrap();
    assert!(cut.is_some(), "rank 0 kept the stray's connection open");
    drop(silent);
}

#[test]
fn flood_of_silent_connections_does_not_keep_the_real_neighbour_out() {
    let timeout = Duration::from_secs(10);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let host = std::thread::spawn(move || {
        let start = Instant::now();
        let mut c = TcpComm::host(listener, 2, "tok", timeout).map_err(|e| e.to_string())?;
        let took = start.elapsed();
        c.barrier().map_err(|e| e.to_string())?;
        Ok::<_, String>(took)
    });
    let (rank0_ring, ring) = join_as_rank_1(&addr, "tok");
    // Far more than rank 0 reads at once.
    let silent: Vec<TcpStream> = (0..300).map(|_| TcpStream::connect(rank0_ring).unwrap()).collect();
    barrier_as_rank_1(rank0_ring, &ring);
    let took = host.join().unwrap().unwrap();
    assert!(took < timeout, "the ring formed after {took:?}");
    drop(silent);
}

#[test]
fn ring_listener_held_by_a_trickling_stray_still_fails_within_the_timeout() {
    let timeout = Duration::from_secs(2);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let host = std::thread::spawn(move || {
        let start = Instant::now();
        let err = TcpComm::host(listener, 2, "tok", timeout).err().map(|e| e.to_string());
        (err, start.elapsed())
    });
    // Rank 1 joins the rendezvous but never connects to rank 0's ring.
    let (rank0_ring, _ring) = join_as_rank_1(&addr, "tok");
    let stray = trickle(rank0_ring, endless_hello(b"MLMP"), timeout + Duration::from_secs(8));
    let (err, took) = host.join().unwrap();
    let err = err.expect("rank 0 cannot form a ring without rank 1");
    assert!(took < timeout + Duration::from_secs(5), "rank 0 failed after {took:?}: {err}");
    assert!(err.contains("rank 0: rank 1 did not connect within 2 s (distributed.timeout_s)"), "{err}");
    assert!(stray.join().unwrap().is_some(), "rank 0 kept the stray's connection open");
}

#[test]
fn stray_trickling_to_the_rendezvous_is_dropped_and_the_job_forms() {
    let timeout = Duration::from_secs(10);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let host = std::thread::spawn(move || {
        let start = Instant::now();
        let mut c = TcpComm::host(listener, 2, "tok", timeout).unwrap();
        let took = start.elapsed();
        c.barrier().unwrap();
        took
    });
    let stray = trickle(addr, endless_hello(b"MLMR"), timeout + Duration::from_secs(8));
    let silent: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let rdv = Rendezvous { addr: addr.to_string(), token: "tok".into(), timeout, ranks_per_node: None };
    TcpComm::connect(1, 2, &rdv).unwrap().barrier().unwrap();
    let took = host.join().unwrap();
    assert!(took < timeout, "the ring formed after {took:?}");
    assert!(stray.join().unwrap().is_some(), "rank 0 kept the stray's connection open");
    drop(silent);
}

#[test]
fn rendezvous_held_by_a_trickling_stray_still_fails_within_the_timeout() {
    let timeout = Duration::from_secs(2);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stray = trickle(addr, endless_hello(b"MLMR"), timeout + Duration::from_secs(8));
    let start = Instant::now();
    let err = TcpComm::host(listener, 2, "tok", timeout).err().unwrap().to_string();
    let took = start.elapsed();
    assert!(took < timeout + Duration::from_secs(5), "rank 0 failed after {took:?}: {err}");
    assert!(
        err.contains("rank 0: 1 of 2 ranks joined the rendezvous within 2 s") && err.contains("missing ranks: 1"),
        "{err}"
    );
    assert!(stray.join().unwrap().is_some(), "rank 0 kept the stray's connection open");
}

#[test]
fn rendezvous_answer_trickled_by_a_stray_fails_within_the_timeout() {
    // Not rank 0 at the rendezvous address: it answers one byte every half second.
    let timeout = Duration::from_secs(2);
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap();
    let answer = {
        let mut b = vec![0u8];
        b.extend_from_slice(&(MAX_STR as u32).to_le_bytes());
        b.resize(b.len() + MAX_STR, b'1');
        b
    };
    let stray = std::thread::spawn(move || {
        let (s, _) = fake.accept().unwrap();
        let start = Instant::now();
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        for b in answer {
            if start.elapsed() > timeout + Duration::from_secs(8) || (&s).write_all(&[b]).is_err() {
                return false;
            }
            // Drains the hello; the worker closing its end ends the stray.
            if let Ok(0) = (&s).read(&mut [0u8; 4096]) {
                return true;
            }
        }
        false
    });
    let rdv = Rendezvous { addr: addr.to_string(), token: "tok".into(), timeout, ranks_per_node: None };
    let start = Instant::now();
    let err = TcpComm::connect(1, 2, &rdv).err().unwrap().to_string();
    let took = start.elapsed();
    assert!(took < timeout + Duration::from_secs(5), "rank 1 failed after {took:?}: {err}");
    assert!(err.contains("rank 1: no answer from rank 0's rendezvous") && err.contains("within 2 s"), "{err}");
    assert!(stray.join().unwrap(), "rank 1 kept the connection open");
}

#[test]
fn huge_broadcast_length_is_refused_without_allocating_it() {
    let timeout = Duration::from_secs(2);
    // A header that lies within the limit, then silence: the buffer grows
    // only with the bytes that came.
    let (host, mut to_0, _from_0) = ring_with_scripted_rank_1(timeout, |mut c| {
        let mut data = Vec::new();
        let start = Instant::now();
        let err = c.broadcast_bytes(1, &mut data).unwrap_err().to_string();
        (err, start.elapsed(), data.capacity())
    });
    to_0.write_all(&[header(K_BCAST, 1 << 30), vec![7u8; 10]].concat()).unwrap();
    let (err, took, capacity) = host.join().unwrap();
    assert!(took < timeout + Duration::from_secs(5), "{took:?}: {err}");
    assert!(capacity <= 4 * BCAST_STEP, "rank 0 allocated {capacity} bytes for 10");
    assert!(err.contains("rank 0: rank 1 sent only 10 of") && err.contains("2 s (distributed.timeout_s)"), "{err}");
    // Past the limit: refused at once.
    for len in [u64::MAX, 1 << 40] {
        let (host, mut to_0, _from_0) = ring_with_scripted_rank_1(timeout, |mut c| {
            let mut data = Vec::new();
            (c.broadcast_bytes(1, &mut data).unwrap_err().to_string(), data.capacity())
        });
        to_0.write_all(&header(K_BCAST, len)).unwrap();
        let (err, capacity) = host.join().unwrap();
        assert_eq!(capacity, 0);
        assert!(err.contains(&format!("rank 0: rank 1 announced a broadcast of {len} bytes")), "{err}");
        assert!(err.contains("during a broadcast from rank 1"), "{err}");
    }
}

#[test]
fn neighbour_that_stops_reading_fails_a_large_send_within_the_timeout() {
    let timeout = Duration::from_secs(2);
    let (host, _to_0, from_0) = ring_with_scripted_rank_1(timeout, |mut c| {
        // More than the socket buffers hold.
        let mut data = vec![1u8; 64 << 20];
        let start = Instant::now();
        let err = c.broadcast_bytes(0, &mut data).unwrap_err().to_string();
        (err, start.elapsed())
    });
    // Rank 1 reads a trickle (1 KiB every 100 ms) until rank 0 is done.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            from_0.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let mut buf = [0u8; 1024];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(0) = (&from_0).read(&mut buf) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let (err, took) = host.join().unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    assert!(took < timeout + Duration::from_secs(5), "{took:?}: {err}");
    assert!(
        err.contains("rank 0: rank 1 did not take the data sent to it within 2 s (distributed.timeout_s)"),
        "{err}"
    );
    assert!(err.contains("during a broadcast from rank 0"), "{err}");
}

#[test]
fn collective_trickled_by_the_left_neighbour_fails_within_the_timeout() {
    let timeout = Duration::from_secs(2);
    let (host, to_0, _from_0) = ring_with_scripted_rank_1(timeout, |mut c| {
        let mut data = Vec::new();
        let start = Instant::now();
        let err = c.broadcast_bytes(1, &mut data).unwrap_err().to_string();
        (err, start.elapsed())
    });
    // 100 bytes announced, one sent every half second (for a bounded time).
    let trickler = std::thread::spawn(move || {
        let start = Instant::now();
        (&to_0).write_all(&header(K_BCAST, 100)).unwrap();
        while start.elapsed() < timeout + Duration::from_secs(8) && (&to_0).write_all(&[1]).is_ok() {
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let (err, took) = host.join().unwrap();
    trickler.join().unwrap();
    assert!(took < timeout + Duration::from_secs(5), "{took:?}: {err}");
    assert!(err.contains("rank 0: rank 1 sent only") && err.contains("2 s (distributed.timeout_s)"), "{err}");
}
