//! The gradient all-reduce overlapped with backward (`distributed.overlap`).
//!
//! The last forward pass of a step runs its backward in stages, head first,
//! then the layers from the top, the embeddings last
//! ([`super::recompute::forward_backward`]). Once a stage's gradients are added
//! to the flat buffer, the parameters that no later stage touches are final:
//! their ranges of the buffer (a layer's weights and its biases and norms, two
//! contiguous ranges since the slots are sorted by name) go to a communication
//! thread that all-reduces them while the main thread runs the stages below.
//! The ranges are disjoint from everything the lower stages write, so nothing
//! waits but the end of the step, for the last ranges.
//!
//! Which stage is a parameter's last is learned on the first step, which sums
//! the whole buffer after backward as without overlap; a gradient that arrives
//! after its range was sent is an error, never a silent race. The schedule is
//! the same for every backend: on the CPU (tcp, MPI) the thread's sends run
//! beside the backward kernels; with NCCL the thread queues each all-reduce on
//! the communicator's own CUDA stream behind an event that the training thread
//! recorded after the stage's kernels, so the sums run on the GPU beside the
//! lower stages' backward (see [`crate::distributed::nccl`]).
use std::sync::mpsc;

use anyhow::{anyhow, bail, Result};
use tch::Tensor;

use super::{bucket_ranges, GradSync};
use crate::distributed::Ready;
use crate::train::flat::FlatParams;

/// How often the communication thread checks the sums in flight.
const POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Where each stage's final gradients lie in the flat buffer.
pub struct Overlap {
    /// Per backward stage: the `(offset, length)` ranges of the flat gradient
    /// that are final once the stage is summed (none until the first step ran).
    stage_ranges: Option<Vec<Vec<(i64, i64)>>>,
    /// Per leaf (a slot, or fused slots): the stage after which it is final.
    last_stage: Vec<usize>,
    /// Elements per all-reduce (0: a stage's ranges whole).
    bucket: i64,
}

impl Overlap {
    pub fn new(bucket_elems: usize) -> Self {
        Self { stage_ranges: None, last_stage: Vec::new(), bucket: bucket_elems as i64 }
    }

    /// Runs `backward`, which hands each stage's gradients (one per leaf,
    /// undefined where the stage does not reach a parameter) to the sink it is
    /// given, sums them into the flat gradient of `params`, and leaves that gradient
    /// summed over the workers of `sync`: range by range during backward once
    /// the schedule is known, else whole afterwards (learning the schedule).
    pub fn run<T>(
        &mut self,
        sync: &mut GradSync,
        params: &mut FlatParams,
        backward: impl FnOnce(&mut dyn FnMut(&[Tensor])) -> T,
    ) -> Result<T> {
        let Some(stage_ranges) = &self.stage_ranges else {
            let mut defined_in: Vec<Vec<usize>> = Vec::new();
            let out = backward(&mut |g: &[Tensor]| {
                defined_in.push((0..g.len()).filter(|&i| g[i].defined()).collect());
                params.accumulate(g);
            });
            self.learn(params, &defined_in);
            sync.sum_grads(params)?;
            return Ok(out);
        };
        // Where the backend sums on a stream of its own (NCCL), each part goes
        // with an event that marks its stage's queued kernels, already in the
        // wire dtype; a converted part is kept here until the sums are done
        // and then copied back. Elsewhere the thread converts and sums at once.
        let marker = sync.marker();
        let streamed = marker.is_some();
        let wire = sync.wire_kind();
        let mut converted: Vec<(Tensor, Tensor)> = Vec::new();
        let mut mark_failed: Option<anyhow::Error> = None;
        let (tx, rx) = mpsc::channel::<(Tensor, Ready)>();
        let last_stage = &self.last_stage;
        std::thread::scope(|scope| {
            let comm = scope.spawn(move || -> Result<()> {
                // After a failure the rest is drained unsent: the error ends the job.
                let mut result = Ok(());
                // While sums are in flight the backend is polled, so that a dead
                // peer ends the step within the timeout even while backward runs.
                loop {
                    let (mut part, after) = match rx.recv_timeout(POLL) {
                        Ok(message) => message,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            if streamed && result.is_ok() {
                                result = sync.poll_parts();
                            }
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    };
                    if result.is_ok() {
                        result = if streamed { sync.start_part(&mut part, after) } else { sync.reduce_part(&mut part) };
                    }
                }
                if streamed && result.is_ok() {
                    result = sync.finish_parts();
                }
                result
            });
            let mut stage = 0usize;
            let mut late: Option<String> = None;
            let out = backward(&mut |g: &[Tensor]| {
                if let Some(i) = (0..g.len()).find(|&i| g[i].defined() && last_stage[i] < stage) {
                    late.get_or_insert_with(|| params.leaves()[i].name.clone());
                }
                params.accumulate(g);
                for &(start, len) in stage_ranges.get(stage).map_or(&[][..], Vec::as_slice) {
                    let part = params.grad_range(start, len);
                    let Some(mark) = &marker else {
                        // A closed channel means the thread stopped on an error, returned below.
                        let _ = tx.send((part, Ready::Now));
                        continue;
                    };
                    let part = if part.kind() == wire {
                        part
                    } else {
                        let on_wire = part.to_kind(wire);
                        converted.push((part, on_wire.shallow_clone()));
                        on_wire
                    };
                    let after = mark().unwrap_or_else(|e| {
                        // Still sent, so that every rank runs the same collectives:
                        // after a device-wide wait instead.
                        if let tch::Device::Cuda(i) = part.device() {
                            tch::Cuda::synchronize(i as i64);
                        }
                        mark_failed.get_or_insert(e);
                        Ready::Now
                    });
                    let _ = tx.send((part, after));
                }
                stage += 1;
            });
            drop(tx);
            let sent = comm.join().map_err(|_| anyhow!("the gradient communication thread panicked"))?;
            if let Some(name) = late {
                bail!(
                    "internal error: the gradient of {name} arrived after its all-reduce started (set \
                     distributed.overlap = false, and please report it)"
                );
            }
            if stage != stage_ranges.len() {
                bail!("internal error: backward ran {stage} stages, the overlap schedule has {}", stage_ranges.len());
            }
            if let Some(e) = mark_failed {
                return Err(e.context("marking a backward stage for its all-reduce"));
            }
            sent?;
            // The sums are done: the parts summed in another dtype go back.
            tch::no_grad(|| {
                for (mut part, on_wire) in converted {
                    part.copy_(&on_wire);
                }
            });
            Ok(out)
        })
    }

    /// Each leaf is final after the last stage that defines its gradient (the
    /// first stage if none does: the first stage zeroes it); the stages' final
    /// leaves become contiguous ranges of at most `bucket` elements.
    fn learn(&mut self, params: &FlatParams, defined_in: &[Vec<usize>]) {
        let mut last_stage = vec![0usize; params.leaves().len()];
        for (stage, defined) in defined_in.iter().enumerate() {
            for &i in defined {
                last_stage[i] = stage;
            }
        }
        let mut stage_ranges: Vec<Vec<(i64, i64)>> = vec![Vec::new(); defined_in.len()];
        for (stage, ranges) in stage_ranges.iter_mut().enumerate() {
            let mut leaves: Vec<(i64, i64)> = (0..params.leaves().len())
                .filter(|&i| last_stage[i] == stage)
                .map(|i| (params.leaves()[i].offset, params.leaves()[i].numel))
                .collect();
            leaves.sort_unstable();
            let mut merged: Vec<(i64, i64)> = Vec::new();
            for (offset, numel) in leaves {
                match merged.last_mut() {
                    Some((start, len)) if *start + *len == offset => *len += numel,
                    _ => merged.push((offset, numel)),
                }
            }
            for (start, len) in merged {
                ranges.extend(bucket_ranges(start, len, self.bucket));
            }
        }
        let sends: usize = stage_ranges.iter().map(Vec::len).sum();
        tracing::info!(
            "gradient all-reduce overlapped with backward: {sends} all-reduces over {} backward stages",
            stage_ranges.len()
        );
        self.last_stage = last_stage;
        self.stage_ranges = Some(stage_ranges);
    }

    /// The elements sent after each stage (for the log and tests).
    pub fn stage_elements(&self) -> Vec<i64> {
        self.stage_ranges.as_ref().map_or_else(Vec::new, |s| s.iter().map(|r| r.iter().map(|x| x.1).sum()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use crate::config::{Backend, CommDtype, DistributedConfig};
    use crate::distributed::{Communicator, Marker};
    use tch::{Device, Kind};

    fn opt() -> FlatParams {
        // Sorted by (no decay, name): a.w [0,6), b.w [6,10), a.b [10,12), b.b [12,14).
        let params = vec![
            ("b.w".to_string(), Tensor::zeros([2, 2], (Kind::Float, Device::Cpu))),
            ("a.w".to_string(), Tensor::zeros([2, 3], (Kind::Float, Device::Cpu))),
            ("a.b".to_string(), Tensor::zeros([2], (Kind::Float, Device::Cpu))),
            ("b.b".to_string(), Tensor::zeros([2], (Kind::Float, Device::Cpu))),
        ];
        FlatParams::new(params, |n| n.ends_with(".b")).unwrap()
    }

    /// Stage 0 reaches b (weight and bias), stage 1 reaches a and b's weight
    /// again (a shared weight, like a tied embedding).
    fn stages(g: f64) -> Vec<Vec<Tensor>> {
        let none = Tensor::new;
        let full = |n: i64| Tensor::full([n], g, (Kind::Float, Device::Cpu));
        vec![vec![none(), full(4), none(), full(2)], vec![full(6), full(4), full(2), none()]]
    }

    fn local() -> GradSync {
        let cfg = DistributedConfig { backend: Backend::Local, ..Default::default() };
        GradSync::join(&cfg, Device::Cpu, "job").unwrap()
    }

    #[test]
    fn a_slot_is_sent_after_its_last_stage_in_contiguous_ranges() {
        let (mut sync, mut o, mut overlap) = (local(), opt(), Overlap::new(0));
        overlap.run(&mut sync, &mut o, |sink| stages(1.0).iter().for_each(|g| sink(g))).unwrap();
        // Stage 0: b.b [12,14) only (b.w comes again in stage 1); stage 1: a.w, b.w, a.b.
        assert_eq!(overlap.stage_ranges.as_ref().unwrap(), &vec![vec![(12, 2)], vec![(0, 12)]]);
        assert_eq!(overlap.stage_elements(), vec![2, 12]);
        let mut small = Overlap::new(5);
        small.learn(&o, &[vec![1, 3], vec![0, 1, 2]]);
        assert_eq!(small.stage_ranges.unwrap()[1], vec![(0, 5), (5, 5), (10, 2)]);
        // The second step runs the overlapped schedule: the same sums.
        o.discard_grads();
        overlap.run(&mut sync, &mut o, |sink| stages(2.0).iter().for_each(|g| sink(g))).unwrap();
        let expect: Vec<f32> = [vec![2.0; 6], vec![4.0; 4], vec![2.0; 2], vec![2.0; 2]].concat();
        assert_eq!(Vec::<f32>::try_from(o.grad()).unwrap(), expect);
    }

    /// Rank 0 of two workers whose other one has the same gradient: a sum
    /// doubles. `streamed`: a backend with a stream of its own, whose started
    /// sums are done only at `finish_started` (NCCL's may run that late).
    struct Doubling {
        streamed: bool,
        /// `poll_started` fails while a sum is pending (a peer died).
        dead_peer: bool,
        pending: Vec<Tensor>,
        /// The dtype of every started sum.
        started: Arc<Mutex<Vec<Kind>>>,
    }

    impl Communicator for Doubling {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
            let _ = t.g_mul_scalar_(2.0);
            Ok(())
        }
        fn broadcast_bytes(&mut self, _: usize, _: &mut Vec<u8>) -> Result<()> {
            Ok(())
        }
        fn barrier(&mut self) -> Result<()> {
            Ok(())
        }
        fn name(&self) -> &'static str {
            "doubling"
        }
        fn set_timeout(&mut self, _: std::time::Duration) {}
        fn marker(&self) -> Option<Marker> {
            self.streamed.then(|| Box::new(|| Ok(Ready::Now)) as Marker)
        }
        fn start_all_reduce_sum(&mut self, t: &mut Tensor, _: Ready) -> Result<()> {
            self.started.lock().unwrap().push(t.kind());
            self.pending.push(t.shallow_clone());
            Ok(())
        }
        fn poll_started(&mut self) -> Result<()> {
            if self.dead_peer && !self.pending.is_empty() {
                bail!("rank 1 died; the communicator was aborted");
            }
            Ok(())
        }
        fn finish_started(&mut self) -> Result<()> {
            for mut t in self.pending.drain(..) {
                let _ = t.g_mul_scalar_(2.0);
            }
            Ok(())
        }
    }

    #[test]
    fn sums_on_a_stream_of_their_own_are_waited_for_and_copied_back() {
        for (streamed, dtype) in
            [(false, CommDtype::Fp32), (true, CommDtype::Fp32), (true, CommDtype::Bf16), (false, CommDtype::Bf16)]
        {
            let started = Arc::new(Mutex::new(Vec::new()));
            let comm = Doubling { streamed, dead_peer: false, pending: Vec::new(), started: started.clone() };
            let mut sync = GradSync::with_comm(Box::new(comm), dtype, Device::Cpu);
            let (mut o, mut overlap) = (opt(), Overlap::new(0));
            // The first step learns the schedule and sums the whole buffer after backward.
            overlap.run(&mut sync, &mut o, |sink| stages(1.0).iter().for_each(|g| sink(g))).unwrap();
            let want = |g: f32| -> Vec<f32> {
                [vec![2.0 * g; 6], vec![4.0 * g; 4], vec![2.0 * g; 2], vec![2.0 * g; 2]].concat()
            };
            assert_eq!(Vec::<f32>::try_from(o.grad()).unwrap(), want(1.0), "{streamed} {dtype:?}");
            assert!(started.lock().unwrap().is_empty());
            o.discard_grads();
            overlap.run(&mut sync, &mut o, |sink| stages(2.0).iter().for_each(|g| sink(g))).unwrap();
            assert_eq!(Vec::<f32>::try_from(o.grad()).unwrap(), want(2.0), "{streamed} {dtype:?}");
            let wire = sync.wire_kind();
            let kinds = started.lock().unwrap().clone();
            // One sum per range (b.b after stage 0, a.w..a.b after stage 1), started in the wire dtype.
            assert_eq!(kinds, if streamed { vec![wire; 2] } else { vec![] }, "{dtype:?}");
        }
    }

    #[test]
    fn sums_in_flight_are_polled_while_backward_runs() {
        let started = Arc::new(Mutex::new(Vec::new()));
        let comm = Doubling { streamed: true, dead_peer: true, pending: Vec::new(), started };
        let mut sync = GradSync::with_comm(Box::new(comm), CommDtype::Fp32, Device::Cpu);
        let (mut o, mut overlap) = (opt(), Overlap::new(0));
        overlap.run(&mut sync, &mut o, |sink| stages(1.0).iter().for_each(|g| sink(g))).unwrap();
        // The lower stage's backward takes longer than a poll: the error of the
        // sum in flight ends the step.
        let slow = |sink: &mut dyn FnMut(&[Tensor])| {
            for (i, g) in stages(1.0).iter().enumerate() {
                if i == 1 {
                    std::thread::sleep(3 * POLL);
                }
                sink(g);
            }
        };
        let e = overlap.run(&mut sync, &mut o, slow).unwrap_err();
        assert!(e.to_string().contains("rank 1 died"), "{e}");
    }

    #[test]
    fn a_gradient_after_its_range_was_sent_is_an_error() {
        let (mut sync, mut o, mut overlap) = (local(), opt(), Overlap::new(0));
        overlap.run(&mut sync, &mut o, |sink| stages(1.0).iter().for_each(|g| sink(g))).unwrap();
        // Now b.b also comes in stage 1, after its range went out in stage 0.
        let mut late = stages(1.0);
        late[1][3] = Tensor::ones([2], (Kind::Float, Device::Cpu));
        let e = overlap.run(&mut sync, &mut o, |sink| late.iter().for_each(|g| sink(g))).unwrap_err();
        assert!(e.to_string().contains("gradient of b.b arrived after its all-reduce started"), "{e}");
    }
}
