//! The dynamic loss scale of `precision = "fp16"`: `torch.amp.GradScaler`'s.
//!
//! fp16 holds gradients down to ~6e-8 (6e-5 at full precision) and up to
//! 65504. The loss is multiplied by the scale before backward, so that small
//! gradients do not flush to zero; the summed fp32 gradient is divided by it
//! again in the update (folded into the factor [`super::grad_scale`] returns,
//! before clipping). A step whose gradient holds an inf or NaN (the scale was
//! too large) is skipped by the non-finite guard, and the scale is multiplied
//! by `backoff_factor`; after `growth_interval` clean steps in a row it is
//! multiplied by `growth_factor`. The update is libtorch's own
//! `_amp_update_scale_`, the kernel `GradScaler.update` runs, on 0-d device
//! tensors: nothing is read back.
//!
//! The skip decision is the trainer's: the loss and the gradient norm after
//! the gradient sum over the workers, so every worker skips the same steps and
//! keeps the same scale.
use tch::{Device, Kind, Tensor};

use super::host;
use crate::checkpoint::LossScaleState;
use crate::config::LossScaleConfig;

/// The scale and its growth tracker, 0-d tensors on the training device.
pub struct LossScaler {
    /// fp32, as GradScaler's `_scale`.
    scale: Tensor,
    /// int32 clean steps in a row, as GradScaler's `_growth_tracker`.
    growth_tracker: Tensor,
    cfg: LossScaleConfig,
}

impl LossScaler {
    /// At `cfg.init_scale`, or where `saved` left it.
    pub fn new(cfg: LossScaleConfig, device: Device, saved: Option<LossScaleState>) -> Self {
        let start = saved.unwrap_or(LossScaleState { scale: cfg.init_scale, growth_tracker: 0 });
        Self {
            scale: Tensor::full([], start.scale, (Kind::Float, device)),
            growth_tracker: Tensor::full([], start.growth_tracker, (Kind::Int, device)),
            cfg,
        }
    }

    /// The scale (0-d fp32 on the device) the loss is multiplied by before backward.
    pub fn scale(&self) -> &Tensor {
        &self.scale
    }

    /// After a step: `found_inf` (0-d fp32, 1.0 when the step was skipped)
    /// backs the scale off or counts a clean step towards growth.
    pub fn update(&mut self, found_inf: &Tensor) {
        let c = self.cfg;
        tch::no_grad(|| {
            let _ = self.scale.internal_amp_update_scale_(
                &self.growth_tracker,
                found_inf,
                c.growth_factor,
                c.backoff_factor,
                c.growth_interval as i64,
            );
        });
    }

    /// The scale and tracker (one host read: for logging and saving).
    pub fn state(&self) -> LossScaleState {
        let v = host::read_vec(&Tensor::stack(&[&self.scale, &self.growth_tracker.to_kind(Kind::Float)], 0));
        LossScaleState { scale: v[0], growth_tracker: v[1] as i64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backoff on overflow, growth after `growth_interval` clean steps in a
    /// row (an overflow restarts the count), and a restored state continues
    /// where it was saved.
    #[test]
    fn the_scale_backs_off_on_overflow_and_grows_after_clean_steps() {
        let cfg = LossScaleConfig { init_scale: 1024.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 3 };
        let mut s = LossScaler::new(cfg, Device::Cpu, None);
        let mut seen = Vec::new();
        for inf in [1, 0, 0, 0, 0, 1, 0, 0, 0] {
            s.update(&Tensor::from(inf as f32));
            seen.push(s.state().scale);
        }
        assert_eq!(seen, [512.0, 512.0, 512.0, 1024.0, 1024.0, 512.0, 512.0, 512.0, 1024.0]);
        s.update(&Tensor::from(0f32));
        let saved = s.state();
        assert_eq!(saved, LossScaleState { scale: 1024.0, growth_tracker: 1 });
        let mut resumed = LossScaler::new(cfg, Device::Cpu, Some(saved));
        for s in [&mut s, &mut resumed] {
            s.update(&Tensor::from(0f32));
            s.update(&Tensor::from(0f32));
        }
        assert_eq!(resumed.state(), s.state());
        assert_eq!(s.state().scale, 2048.0);
    }
}
