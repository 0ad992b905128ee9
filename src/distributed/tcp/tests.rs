//! The tcp ring with N ranks as threads of one process on loopback.
use std::net::TcpListener;
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
    let out = run_ring(3, Duration::from_secs(30), |mut c| {
        let start = Instant::now();
        if c.rank() == 2 {
            std::thread::sleep(Duration::from_millis(300));
        }
        c.barrier().unwrap();
        start.elapsed()
    });
    for waited in out {
        assert!(waited >= Duration::from_millis(290), "left the barrier after {waited:?}");
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
