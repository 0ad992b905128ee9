//! Steps with a non-finite loss or gradient: skipped on the device, counted on
//! the device, reported at log steps and saves.
//!
//! Deciding on the host whether to skip would wait for the whole step's
//! kernels every step. Instead the skip flag is a device tensor the AdamW
//! kernel obeys, and the counters below follow it on the device; [`settle`]
//! reads them (one host read) when the trainer logs or saves, warns, and stops
//! the job once `training.max_nonfinite_steps` steps in a row were skipped.
//! So that stop comes at the first log step (or save) at or after the step
//! that reached the limit: up to `log_every - 1` more steps are run, and
//! skipped, before it.
//!
//! [`settle`]: NonFiniteGuard::settle
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::{grad_scale, host, AdamW};
use crate::train::flat::FlatParams;

/// 1.0 when `loss + grad_norm` is NaN or infinite, else 0.0 (0-d fp32, on their device).
pub fn skip_flag(loss: &Tensor, grad_norm: &Tensor) -> Tensor {
    (loss + grad_norm).isfinite().logical_not().to_kind(Kind::Float)
}

/// Skipped steps since the last [`NonFiniteGuard::settle`], as 0-d fp32 device tensors.
pub struct NonFiniteGuard {
    skipped: Tensor,
    /// Skipped steps in a row up to the latest step.
    in_a_row: Tensor,
    /// The longest run of skipped steps seen since the last settle.
    longest: Tensor,
    /// The step of the last settle.
    since: usize,
}

impl NonFiniteGuard {
    pub fn new(device: Device, step: usize) -> Self {
        let zero = || Tensor::zeros([], (Kind::Float, device));
        Self { skipped: zero(), in_a_row: zero(), longest: zero(), since: step }
    }

    /// Clipping, the skip decision and the AdamW update of one step, without a
    /// host read; returns the gradient norm before clipping. The accumulated
    /// gradient is a sum still to be divided by `divisor` when given
    /// ([`grad_scale`]).
    pub fn step(
        &mut self,
        params: &mut FlatParams,
        adamw: &mut AdamW,
        divisor: Option<&Tensor>,
        loss: &Tensor,
        lr: f64,
        max_grad_norm: f64,
    ) -> Result<Tensor> {
        let (grad_norm, scale) = grad_scale(params.grad_norm(), divisor, max_grad_norm);
        let skip = skip_flag(loss, &grad_norm);
        adamw.step(params, lr, scale.as_ref(), &skip)?;
        self.observe(&skip);
        Ok(grad_norm)
    }

    /// Counts one step's skip flag.
    fn observe(&mut self, skip: &Tensor) {
        tch::no_grad(|| {
            let _ = self.skipped.g_add_(skip);
            let _ = self.in_a_row.g_add_scalar_(1.0).g_mul_(skip);
            let longest = self.longest.maximum(&self.in_a_row);
            self.longest.copy_(&longest);
        });
    }

    /// Reads the counters (one host read), adds the skipped steps to `skipped_total`,
    /// warns when there were any since the last settle, and fails once a run
    /// of `limit` skipped steps in a row was reached. `step`: the steps done.
    pub fn settle(&mut self, step: usize, skipped_total: &mut usize, limit: usize) -> Result<()> {
        let counts = host::read_vec(&Tensor::stack(&[&self.skipped, &self.in_a_row, &self.longest], 0));
        let (skipped, in_a_row, longest) = (counts[0] as usize, counts[1] as usize, counts[2] as usize);
        let since = std::mem::replace(&mut self.since, step);
        tch::no_grad(|| {
            let _ = self.skipped.zero_();
            self.longest.copy_(&self.in_a_row);
        });
        if skipped == 0 {
            return Ok(());
        }
        *skipped_total += skipped;
        tracing::warn!(
            "steps {}..={step}: {skipped} skipped for a non-finite loss or gradient ({in_a_row} in a row at step \
             {step}, {} in all)",
            since + 1,
            *skipped_total
        );
        if longest >= limit {
            bail!(
                "{limit} steps in a row had a non-finite loss or gradient (training.max_nonfinite_steps; {longest} \
                 in a row by step {step}): lower training.lr, check the data, or use precision = \"fp32\"; the \
                 last checkpoint is intact"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optimizer::{AdamWParams, Kernel};

    fn opt(kernel: Kernel) -> (FlatParams, AdamW) {
        tch::manual_seed(7);
        let hp = AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let w = Tensor::randn([100, 10], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([10], (Kind::Float, Device::Cpu));
        let params = FlatParams::new(vec![("w".into(), w), ("b".into(), b)], |n| n == "b").unwrap();
        let adamw = AdamW::new(&params, hp).with_kernel(kernel);
        (params, adamw)
    }

    /// The step path of the trainer reads nothing back between log steps: the
    /// counter sees every read of [`host`], so a read added to
    /// `NonFiniteGuard::step`, `grad_scale` or `AdamW::step` fails
    /// this test; a settle is one read.
    #[test]
    fn steps_between_log_steps_read_nothing_back() {
        let (mut params, mut adamw) = opt(Kernel::Torch);
        let mut guard = NonFiniteGuard::new(Device::Cpu, 0);
        let before = host::reads();
        let divisor = Tensor::from(3.0f32);
        for i in 0..10 {
            let loss = Tensor::from(if i % 4 == 3 { f32::NAN } else { 2.5f32 });
            let g = Tensor::randn([params.numel()], (Kind::Float, Device::Cpu));
            params.grad_mut().copy_(&g);
            let divisor = (i % 2 == 0).then_some(&divisor);
            let _ = guard.step(&mut params, &mut adamw, divisor, &loss, 1e-3, 1.0).unwrap();
        }
        assert_eq!(host::reads() - before, 0, "the optimizer step read a device tensor on the host");
        let mut total = 0;
        guard.settle(10, &mut total, 5).unwrap();
        assert_eq!(host::reads() - before, 1);
        assert_eq!(total, 2);
        assert_eq!(adamw.steps(), 8);
    }

    /// A NaN gradient or an infinite loss skips the update and is counted; the
    /// job stops at the settle after `limit` skips in a row, even when a
    /// finite step followed before that settle.
    #[test]
    fn non_finite_steps_are_skipped_counted_and_stop_the_job() {
        for kernel in [Kernel::Rust, Kernel::Torch] {
            let mut opt = opt(kernel);
            let mut guard = NonFiniteGuard::new(Device::Cpu, 0);
            let mut total = 0;
            let run = |(params, adamw): &mut (FlatParams, AdamW), guard: &mut NonFiniteGuard, loss: f32, nan: bool| {
                let g = Tensor::randn([params.numel()], (Kind::Float, Device::Cpu));
                let g = if nan { g.index_fill(0, &Tensor::from_slice(&[3i64]), f64::NAN) } else { g };
                params.grad_mut().copy_(&g);
                let _ = guard.step(params, adamw, None, &Tensor::from(loss), 1e-3, 1.0).unwrap();
            };
            run(&mut opt, &mut guard, 1.0, false);
            let master = opt.0.master().copy();
            run(&mut opt, &mut guard, 1.0, true);
            run(&mut opt, &mut guard, f32::INFINITY, false);
            assert!(opt.0.master().equal(&master), "{kernel:?}");
            assert_eq!(opt.1.steps(), 1, "{kernel:?}");
            guard.settle(3, &mut total, 3).unwrap();
            assert_eq!(total, 2, "{kernel:?}");
            // Three in a row (the run crosses a settle), then a finite step before the next settle.
            run(&mut opt, &mut guard, 1.0, true);
            run(&mut opt, &mut guard, 1.0, false);
            let err = guard.settle(5, &mut total, 3).unwrap_err().to_string();
            assert!(err.contains("3 steps in a row") && err.contains("by step 5"), "{err}");
            assert_eq!(total, 3, "{kernel:?}");
            assert_eq!(opt.1.steps(), 2, "{kernel:?}");
        }
    }
}
