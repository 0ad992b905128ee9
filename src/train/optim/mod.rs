//! AdamW over the flat parameter buffers ([`FlatParams`]).
//!
//! tch has no way to save its optimizers' state and its optimizers step one
//! tensor at a time. [`AdamW`] holds only what the optimizer adds: the two
//! moments (flat fp32 tensors in the parameters' layout, which checkpoints
//! save as they are), the step count and the hyper-parameters. A step is a
//! handful of whole-buffer kernels. Semantics follow `torch.optim.AdamW`.
//!
//! A step takes no host sync: the gradient's scale (clipping factor over the
//! divisor: [`grad_scale`]), the skip flag of a step with a non-finite loss or
//! gradient, and the step count (for bias correction) stay 0-d tensors on the
//! device, as in `torch.optim.AdamW(fused=True)` under a `GradScaler`. On a
//! GPU the update is libtorch's fused kernel ([`fused::adamw`], one launch per
//! decay group) and the bf16 compute copy is rewritten from the master by one
//! copy; on the CPU it is our one-pass kernel (`mlm_kernels::adamw`), which
//! writes the bf16 copy in the same pass and measured faster than libtorch's
//! (docs/benchmarks.md).
mod fused;
pub mod host;
pub mod loss_scale;
pub mod nonfinite;
pub mod schedule;
#[cfg(test)]
mod tests;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::config::TrainingConfig;
use crate::train::flat::FlatParams;

/// AdamW hyper-parameters (the learning rate comes per step from the schedule).
#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl From<&TrainingConfig> for AdamWParams {
    fn from(t: &TrainingConfig) -> Self {
        Self { beta1: t.adam_beta1, beta2: t.adam_beta2, eps: t.adam_eps, weight_decay: t.weight_decay }
    }
}

/// AdamW's state over a [`FlatParams`]: the moments and the step count.
pub struct AdamW {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Updates applied (skipped steps not counted), for bias correction: a 0-d
    /// fp32 tensor on the buffers' device (torch's `state_steps`, exact up to
    /// 2^24 steps), so that a step need not read it; [`Self::steps`] does.
    step: Tensor,
    hp: AdamWParams,
    kernel: Kernel,
}

/// Which kernel updates the buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// `mlm_kernels::adamw`: CPU only, writes the bf16 shadow in the same pass.
    Rust,
    /// libtorch's `_fused_adamw_` through our shim (any device), then a shadow copy.
    Torch,
}

impl Kernel {
    /// The faster kernel on `device`.
    pub fn for_device(device: Device) -> Self {
        if device == Device::Cpu {
            Kernel::Rust
        } else {
            Kernel::Torch
        }
    }
}

impl AdamW {
    /// Zero moments for `params`, updated by the device's faster kernel.
    pub fn new(params: &FlatParams, hp: AdamWParams) -> Self {
        let master = params.master();
        Self {
            exp_avg: master.zeros_like(),
            exp_avg_sq: master.zeros_like(),
            step: Tensor::zeros([], (Kind::Float, master.device())),
            hp,
            kernel: Kernel::for_device(master.device()),
        }
    }

    /// Updates with `kernel` instead of the device's faster one (`Rust`: CPU only).
    pub fn with_kernel(mut self, kernel: Kernel) -> Self {
        assert!(kernel == Kernel::Torch || self.exp_avg.device() == Device::Cpu, "the Rust AdamW kernel is CPU-only");
        self.kernel = kernel;
        self
    }

    /// Continues from saved moments and step count.
    pub fn restore(&mut self, exp_avg: &Tensor, exp_avg_sq: &Tensor, step: i64) {
        tch::no_grad(|| {
            self.exp_avg.copy_(exp_avg);
            self.exp_avg_sq.copy_(exp_avg_sq);
            let _ = self.step.fill_(step as f64);
        });
    }

    /// Updates applied so far (a host read: for saving).
    pub fn steps(&self) -> i64 {
        host::read_f64(&self.step) as i64
    }

    /// The first and second moments, flat in the parameters' layout (for saving).
    pub fn moments(&self) -> (&Tensor, &Tensor) {
        (&self.exp_avg, &self.exp_avg_sq)
    }

    pub fn numel(&self) -> i64 {
        self.exp_avg.numel() as i64
    }

    /// One AdamW step of `params` with learning rate `lr` on the accumulated
    /// gradient times `grad_scale` (a 0-d fp32 device tensor: [`grad_scale`];
    /// none: 1), unless `skip` (a 0-d fp32 tensor on the device: 1.0 or 0.0)
    /// is set: then master, moments, shadow and the step count stay as they
    /// were. Either way the gradient is consumed.
    pub fn step(&mut self, params: &mut FlatParams, lr: f64, grad_scale: Option<&Tensor>, skip: &Tensor) -> Result<()> {
        assert_eq!(params.numel(), self.numel(), "moments of another model");
        let done = match self.kernel {
            Kernel::Rust => {
                self.step_rust(params, lr, grad_scale, skip);
                Ok(())
            }
            Kernel::Torch => self.step_torch(params, lr, grad_scale, skip),
        };
        params.discard_grads();
        done
    }

    /// libtorch's fused AdamW, once per decay group, then the shadow copy. As
    /// `torch.optim.AdamW(fused=True)` does: the step count is incremented
    /// before and the skip flag subtracted after. The kernel divides the
    /// gradient by its `grad_scale`: the reciprocal of the clipping factor.
    fn step_torch(
        &mut self,
        params: &mut FlatParams,
        lr: f64,
        grad_scale: Option<&Tensor>,
        skip: &Tensor,
    ) -> Result<()> {
        let hp = self.hp;
        let n = self.numel();
        let b = params.update_buffers();
        tch::no_grad(|| {
            let _ = self.step.g_add_scalar_(1.0);
            let scale = grad_scale.map(Tensor::reciprocal);
            for (start, len, weight_decay) in [(0, b.n_decay, hp.weight_decay), (b.n_decay, n - b.n_decay, 0.0)] {
                if len == 0 {
                    continue;
                }
                let part = |t: &Tensor| t.narrow(0, start, len);
                let (p, g, m, v) = (part(b.master), part(b.grad), part(&self.exp_avg), part(&self.exp_avg_sq));
                let group = fused::Group { param: &p, grad: &g, exp_avg: &m, exp_avg_sq: &v, step: &self.step };
                let hyper = fused::Hyper { lr, beta1: hp.beta1, beta2: hp.beta2, weight_decay, eps: hp.eps };
                fused::adamw(&[group], hyper, scale.as_ref(), Some(skip))?;
            }
            let _ = self.step.g_sub_(skip);
            if let Some(shadow) = b.shadow {
                // A skipped step left the master as it was: the copy changes nothing.
                shadow.copy_(b.master);
            }
            Ok(())
        })
    }

    /// AdamW in one pass over the four flat buffers, split across threads (what
    /// torch's fused CPU AdamW does): gradient scale, decoupled decay, moments,
    /// update and the bf16 shadow (an fp16 one by a copy after), read and written once per element. Its
    /// scalars are read from CPU memory (no device to wait for).
    fn step_rust(&mut self, params: &mut FlatParams, lr: f64, grad_scale: Option<&Tensor>, skip: &Tensor) {
        if host::cpu_value(skip) != 0.0 {
            return;
        }
        let _ = tch::no_grad(|| self.step.g_add_scalar_(1.0));
        let n = self.numel() as usize;
        let hp = self.hp;
        let t = host::cpu_value(&self.step);
        let step = mlm_kernels::adamw::Step {
            step_size: (lr / (1.0 - hp.beta1.powf(t))) as f32,
            beta1: hp.beta1 as f32,
            beta2: hp.beta2 as f32,
            one_minus_beta1: (1.0 - hp.beta1) as f32,
            one_minus_beta2: (1.0 - hp.beta2) as f32,
            eps: hp.eps as f32,
            bc2_sqrt: (1.0 - hp.beta2.powf(t)).sqrt() as f32,
            decay: (1.0 - lr * hp.weight_decay) as f32,
            grad_scale: grad_scale.map_or(1.0, |c| host::cpu_value(c) as f32),
        };
        let b = params.update_buffers();
        for t in [&*b.master, b.grad, &self.exp_avg, &self.exp_avg_sq] {
            assert!(t.kind() == Kind::Float && t.is_contiguous() && t.numel() == n, "flat fp32 buffers");
        }
        // The kernel writes a bf16 shadow in its pass; an fp16 one is copied after.
        let (bf16, other) = match b.shadow {
            Some(sh) if sh.kind() == Kind::BFloat16 => (Some(sh), None),
            sh => (None, sh),
        };
        if let Some(sh) = &bf16 {
            assert!(sh.is_contiguous() && sh.numel() == n, "flat bf16 shadow");
        }
        // SAFETY: four (five with the shadow) distinct, contiguous CPU buffers of
        // n elements, owned by `params` and self; nothing else reads or writes
        // them during this call.
        let buffers = unsafe {
            mlm_kernels::adamw::Buffers {
                param: std::slice::from_raw_parts_mut(b.master.data_ptr() as *mut f32, n),
                grad: std::slice::from_raw_parts(b.grad.data_ptr() as *const f32, n),
                exp_avg: std::slice::from_raw_parts_mut(self.exp_avg.data_ptr() as *mut f32, n),
                exp_avg_sq: std::slice::from_raw_parts_mut(self.exp_avg_sq.data_ptr() as *mut f32, n),
                shadow: bf16.map(|sh| std::slice::from_raw_parts_mut(sh.data_ptr() as *mut u16, n)),
            }
        };
        mlm_kernels::adamw::step(&step, b.n_decay as usize, buffers);
        if let Some(sh) = other {
            tch::no_grad(|| sh.copy_(b.master));
        }
    }
}

/// The factor an update multiplies the accumulated gradient by, and the
/// gradient norm to report: the gradient is a sum still to be divided by
/// `divisor` (a 0-d fp32 device tensor: the step's masked tokens over all
/// workers) when given; `norm_of_sum` is its L2 norm
/// ([`FlatParams::grad_norm`]). Clipping to `max_norm` (0: off) applies to the
/// divided gradient: factor `min(1, max_norm / (norm + 1e-6))`, over the
/// divisor. No host read: both are 0-d tensors on the device, and the factor
/// is applied by the update in its own pass over the gradient.
pub fn grad_scale(norm_of_sum: Tensor, divisor: Option<&Tensor>, max_norm: f64) -> (Tensor, Option<Tensor>) {
    let norm = match divisor {
        Some(d) => norm_of_sum / d,
        None => norm_of_sum,
    };
    let clip = (max_norm > 0.0).then(|| (norm.full_like(max_norm) / (&norm + 1e-6)).clamp_max(1.0));
    let scale = match (clip, divisor) {
        (Some(c), Some(d)) => Some(c / d),
        (None, Some(d)) => Some(d.reciprocal()),
        (c, None) => c,
    };
    (norm, scale)
}
