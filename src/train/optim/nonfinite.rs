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
//! In fp16 the loss scale ([`LossScaler`]) decides: an overflowed step is
//! skipped and counted as any other, and the scale backs off; such steps
//! count towards the stop only once the scale is 1 or less, where the
//! gradient was not scaled up and the overflow is the run's, not the scale's.
//!
//! [`settle`]: NonFiniteGuard::settle
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::loss_scale::LossScaler;
use super::{grad_scale, host, AdamW};
use crate::train::flat::FlatParams;

/// 1.0 when `loss + grad_norm` is NaN or infinite, else 0.0 (0-d fp32, on their device).
pub fn skip_flag(loss: &Tensor, grad_norm: &Tensor) -> Tensor {
    (loss + grad_norm).isfinite().logical_not().to_kind(Kind::Float)
}

/// What one optimizer step leaves for the log: 0-d device tensors.
pub struct Stepped {
    /// The gradient norm before clipping (of the unscaled gradient in fp16).
    pub grad_norm: Tensor,
    /// 1.0 when the update was skipped, else 0.0 (fp32).
    pub skip: Tensor,
}

/// Skipped steps since the last [`NonFiniteGuard::settle`], as 0-d fp32 device tensors.
pub struct NonFiniteGuard {
    skipped: Tensor,
    /// Skipped steps in a row up to the latest step (in fp16: at a loss scale <= 1).
    in_a_row: Tensor,
    /// The longest run of skipped steps seen since the last settle.
    longest: Tensor,
    /// The step of the last settle.
    since: usize,
    /// fp16: the steps are scaled ([`LossScaler`]), and overflows expected.
    scaled: bool,
}

impl NonFiniteGuard {
    /// Counting from `step`; `scaled`: the steps run with a [`LossScaler`].
    pub fn new(device: Device, step: usize, scaled: bool) -> Self {
        let zero = || Tensor::zeros([], (Kind::Float, device));
        Self { skipped: zero(), in_a_row: zero(), longest: zero(), since: step, scaled }
    }

    /// Clipping, the skip decision and the AdamW update of one step, without a
    /// host read. The accumulated gradient is a sum still to be divided by
    /// `divisor` when given ([`grad_scale`]), and by the loss scale of
    /// `scaler` (fp16), which the step's skip flag then updates.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        params: &mut FlatParams,
        adamw: &mut AdamW,
        divisor: Option<&Tensor>,
        loss: &Tensor,
        lr: f64,
        max_grad_norm: f64,
        scaler: Option<&mut LossScaler>,
    ) -> Result<Stepped> {
        let unscale = match (divisor, scaler.as_ref().map(|s| s.scale())) {
            (Some(d), Some(s)) => Some(d * s),
            (None, Some(s)) => Some(s.shallow_clone()),
            (d, None) => d.map(Tensor::shallow_clone),
        };
        let (grad_norm, scale) = grad_scale(params.grad_norm(), unscale.as_ref(), max_grad_norm);
        let skip = skip_flag(loss, &grad_norm);
        adamw.step(params, lr, scale.as_ref(), &skip)?;
        let counted = match scaler {
            Some(scaler) => {
                let counted = &skip * scaler.scale().le(1.0).to_kind(Kind::Float);
                scaler.update(&skip);
                counted
            }
            None => skip.shallow_clone(),
        };
        self.observe(&skip, &counted);
        Ok(Stepped { grad_norm, skip })
    }

    /// Counts one step's skip flag; `counted`: the skip counts towards the stop.
    fn observe(&mut self, skip: &Tensor, counted: &Tensor) {
        tch::no_grad(|| {
            let _ = self.skipped.g_add_(skip);
            let _ = self.in_a_row.g_add_scalar_(1.0).g_mul_(counted);
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
        if self.scaled && longest == 0 {
            // GradScaler's routine: the scale grew too large and backed off.
            tracing::info!(
                "steps {}..={step}: {skipped} skipped for an fp16 overflow, the loss scale backed off ({} in all)",
                since + 1,
                *skipped_total
            );
            return Ok(());
        }
        tracing::warn!(
            "steps {}..={step}: {skipped} skipped for a non-finite loss or gradient ({in_a_row} in a row at step \
             {step}, {} in all)",
            since + 1,
            *skipped_total
        );
        if longest >= limit && self.scaled {
            bail!(
                "{limit} steps in a row had a non-finite loss or gradient at an fp16 loss scale of 1 or less \
                 (training.max_nonfinite_steps; {longest} in a row by step {step}): the model overflows fp16 \
                 whatever the scale; use precision = \"bf16\" where the device has it, or \"fp32\", or lower \
                 training.lr; the last checkpoint is intact"
            );
        }
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
    use crate::train::optim::{AdamWParams, Kernel};

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
        let mut guard = NonFiniteGuard::new(Device::Cpu, 0, false);
        let before = host::reads();
        let divisor = Tensor::from(3.0f32);
        for i in 0..10 {
            let loss = Tensor::from(if i % 4 == 3 { f32::NAN } else { 2.5f32 });
            let g = Tensor::randn([params.numel()], (Kind::Float, Device::Cpu));
            params.grad_mut().copy_(&g);
            let divisor = (i % 2 == 0).then_some(&divisor);
            let _ = guard.step(&mut params, &mut adamw, divisor, &loss, 1e-3, 1.0, None).unwrap();
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
            let mut guard = NonFiniteGuard::new(Device::Cpu, 0, false);
            let mut total = 0;
            let run = |(params, adamw): &mut (FlatParams, AdamW), guard: &mut NonFiniteGuard, loss: f32, nan: bool| {
                let g = Tensor::randn([params.numel()], (Kind::Float, Device::Cpu));
                let g = if nan { g.index_fill(0, &Tensor::from_slice(&[3i64]), f64::NAN) } else { g };
                params.grad_mut().copy_(&g);
                let _ = guard.step(params, adamw, None, &Tensor::from(loss), 1e-3, 1.0, None).unwrap();
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

    /// fp16: overflowed steps are skipped and counted, the scale backs off
    /// (without a host read), and they count towards the stop only from a
    /// scale of 1 or less.
    #[test]
    fn fp16_overflows_count_towards_the_stop_only_at_a_scale_of_one_or_less() {
        use crate::config::LossScaleConfig;
        use crate::train::optim::loss_scale::LossScaler;
        let (mut params, mut adamw) = opt(Kernel::Rust);
        let cfg = LossScaleConfig { init_scale: 4.0, ..LossScaleConfig::default() };
        let mut scaler = LossScaler::new(cfg, Device::Cpu, None);
        let mut guard = NonFiniteGuard::new(Device::Cpu, 0, true);
        let mut total = 0;
        let before = host::reads();
        let mut overflow = |params: &mut FlatParams, adamw: &mut AdamW, guard: &mut NonFiniteGuard| {
            let _ = params.grad_mut().fill_(f64::INFINITY);
            let loss = Tensor::from(2.5f32);
            let _ = guard.step(params, adamw, None, &loss, 1e-3, 1.0, Some(&mut scaler)).unwrap();
        };
        // At scales 4 and 2: skipped, not counted towards the limit of 2.
        overflow(&mut params, &mut adamw, &mut guard);
        overflow(&mut params, &mut adamw, &mut guard);
        assert_eq!(host::reads(), before, "an fp16 step read a device tensor on the host");
        guard.settle(2, &mut total, 2).unwrap();
        assert_eq!(total, 2);
        // At scales 1 and 0.5: counted, and the job stops.
        overflow(&mut params, &mut adamw, &mut guard);
        overflow(&mut params, &mut adamw, &mut guard);
        let err = guard.settle(4, &mut total, 2).unwrap_err().to_string();
        assert!(err.contains("loss scale of 1 or less") && err.contains("2 in a row by step 4"), "{err}");
        assert_eq!((total, adamw.steps()), (4, 0));
        assert_eq!(scaler.state().scale, 0.25);
    }
}
