//! AdamW over one flat fp32 buffer.
//!
//! tch has no way to save its optimizers' state and its optimizers step one
//! tensor at a time. Here every trainable parameter of the fp32 master model is
//! re-pointed (`set_data`) at a slice of one contiguous buffer, decayed parameters
//! first, so a step is a handful of whole-buffer kernels and the moments are plain
//! tensors we save and load. Semantics follow `torch.optim.AdamW`.
//!
//! A step takes no host sync: the clipping factor, the skip flag of a step with
//! a non-finite loss or gradient, and the step count (for bias correction) stay
//! 0-d tensors on the device, as in `torch.optim.AdamW(fused=True)` under a
//! `GradScaler`. On a GPU the update is libtorch's fused kernel
//! ([`fused::adamw`], one launch per decay group) and the bf16 compute copy is
//! rewritten from the master by one copy; on the CPU it is our one-pass kernel
//! (`mlm_kernels::adamw`), which writes the bf16 copy in the same pass and
//! measured faster than libtorch's (docs/benchmarks.md).
mod fused;
#[cfg(test)]
mod tests;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::config::TrainingConfig;
use crate::train::host;

/// One trainable parameter's place in the flat buffers.
#[derive(Debug, Clone)]
pub struct Slot {
    pub name: String,
    pub offset: i64,
    pub numel: i64,
    pub shape: Vec<i64>,
}

/// A tensor the training step differentiates: one slot, or adjacent slots
/// fused into one tensor (a layer's query, key and value weights:
/// [`crate::model::MaskedLm::fuse_qkv`]); one gradient each.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The slot's name, or the first fused slot's name with a `+N` suffix.
    pub name: String,
    pub offset: i64,
    pub numel: i64,
}

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

/// The fp32 master weights, their gradients and AdamW's moments, all flat.
pub struct FlatAdamW {
    pub slots: Vec<Slot>,
    /// The gradients' units, in offset order: the slots, some fused.
    pub leaves: Vec<Leaf>,
    /// Elements `[0, n_decay)` get weight decay, the rest (biases, LayerNorm) do not.
    pub n_decay: i64,
    pub master: Tensor,
    pub grad: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Updates applied (skipped steps not counted), for bias correction: a 0-d
    /// fp32 tensor on the buffers' device (torch's `state_steps`, exact up to
    /// 2^24 steps), so that a step need not read it; [`Self::steps`] does.
    step: Tensor,
    pub hp: AdamWParams,
    /// Flat bf16 compute copy of `master` (bf16 training): the compute model's
    /// parameters are views of it, and each step rewrites it from the master.
    shadow: Option<Tensor>,
    /// The gradient buffer holds nothing yet for the coming step: the first
    /// micro-batch overwrites it instead of adding.
    grad_fresh: bool,
    /// The factor the coming update multiplies the gradient by: the clipping
    /// factor `min(1, max_norm / (norm + 1e-6))`, over the divisor if any; a
    /// 0-d fp32 tensor on the device (none: 1).
    clip: Option<Tensor>,
    /// What the accumulated gradient is still to be divided by (the step's
    /// masked tokens over all workers, summed with it): a 0-d fp32 tensor on
    /// the device, applied by the update, not by a pass of its own.
    divisor: Option<Tensor>,
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

impl FlatAdamW {
    /// Builds the flat buffers from `(name, parameter)` pairs and re-points each
    /// parameter at its slice of the master buffer. `no_decay(name)` selects the
    /// parameters without weight decay.
    pub fn new(params: Vec<(String, Tensor)>, no_decay: impl Fn(&str) -> bool, hp: AdamWParams) -> Result<Self> {
        let mut params = params;
        params.sort_by(|a, b| (no_decay(&a.0), &a.0).cmp(&(no_decay(&b.0), &b.0)));
        let total: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
        let Some((_, first)) = params.first() else { bail!("the model has no trainable parameters") };
        let device = first.device();
        let master = Tensor::zeros([total], (Kind::Float, device));
        let mut slots = Vec::with_capacity(params.len());
        let mut offset = 0i64;
        let mut n_decay = 0i64;
        for (name, mut p) in params {
            let numel = p.numel() as i64;
            let shape = p.size();
            let mut view = master.narrow(0, offset, numel).view(shape.as_slice());
            tch::no_grad(|| view.copy_(&p.to_kind(Kind::Float)));
            p.set_data(&view);
            if !no_decay(&name) {
                n_decay = offset + numel;
            }
            slots.push(Slot { name, offset, numel, shape });
            offset += numel;
        }
        let leaves = slots.iter().map(|s| Leaf { name: s.name.clone(), offset: s.offset, numel: s.numel }).collect();
        Ok(Self {
            slots,
            leaves,
            n_decay,
            grad: master.zeros_like(),
            exp_avg: master.zeros_like(),
            exp_avg_sq: master.zeros_like(),
            step: Tensor::zeros([], (Kind::Float, device)),
            master,
            hp,
            shadow: None,
            grad_fresh: true,
            clip: None,
            divisor: None,
            kernel: Kernel::for_device(device),
        })
    }

    /// Updates with `kernel` instead of the device's faster one (`Rust`: CPU only).
    pub fn with_kernel(mut self, kernel: Kernel) -> Self {
        assert!(kernel == Kernel::Torch || self.master.device() == Device::Cpu, "the Rust AdamW kernel is CPU-only");
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

    pub fn numel(&self) -> i64 {
        self.master.numel() as i64
    }

    /// Makes the leaves that exactly cover `(offset, numel)` one leaf (their
    /// tensors fused into one the step differentiates).
    pub fn fuse_leaves(&mut self, (offset, numel): (i64, i64)) -> Result<()> {
        let Some(first) = self.leaves.iter().position(|l| l.offset == offset) else {
            bail!("internal error: no parameter starts at element {offset} of the flat buffer");
        };
        let mut last = first;
        let mut end = offset + self.leaves[first].numel;
        while end < offset + numel && last + 1 < self.leaves.len() {
            last += 1;
            end += self.leaves[last].numel;
        }
        if end != offset + numel {
            bail!("internal error: elements {offset}..{} of the flat buffer are not whole parameters", offset + numel);
        }
        let name = format!("{}+{}", self.leaves[first].name, last - first);
        self.leaves.splice(first..=last, [Leaf { name, offset, numel }]);
        Ok(())
    }

    /// Adds one micro-batch's gradients (one per leaf, in leaf order; any
    /// dtype; undefined for a parameter the loss did not reach) into the flat
    /// fp32 gradient. The first micro-batch of a step overwrites it.
    ///
    /// Adjacent leaves are handled together: a run of defined gradients is one
    /// `cat` into its range of the buffer (plus one add when accumulating), a
    /// run of undefined ones one fill, so a whole-model backward costs a few
    /// kernels, not one copy per parameter (200-390 launches on a GPU).
    pub fn accumulate_grads(&mut self, grads: &[Tensor]) {
        assert_eq!(grads.len(), self.leaves.len(), "one gradient per leaf");
        let fresh = self.grad_fresh;
        tch::no_grad(|| {
            let mut i = 0;
            while i < grads.len() {
                let defined = grads[i].defined();
                let mut j = i + 1;
                while j < grads.len() && grads[j].defined() == defined {
                    j += 1;
                }
                let (start, end) = (self.leaves[i].offset, self.leaves[j - 1].offset + self.leaves[j - 1].numel);
                let mut dst = self.grad.narrow(0, start, end - start);
                if !defined {
                    if fresh {
                        let _ = dst.zero_();
                    }
                } else {
                    let flat: Vec<Tensor> = grads[i..j].iter().map(|g| g.reshape([-1])).collect();
                    if fresh && flat.iter().all(|g| g.kind() == dst.kind()) {
                        let _ = Tensor::cat_out(&dst, &flat, 0);
                    } else if fresh {
                        // bf16 gradients: one cat in their dtype, then one
                        // converting copy (`cat_out` across dtypes falls back
                        // to a copy kernel per gradient on CUDA).
                        dst.copy_(&Tensor::cat(&flat, 0));
                    } else {
                        let _ = dst.g_add_(&Tensor::cat(&flat, 0).to_kind(Kind::Float));
                    }
                }
                i = j;
            }
        });
        self.grad_fresh = false;
    }

    /// The accumulated gradient is a sum still to be divided by `divisor` (a
    /// 0-d fp32 tensor on the buffers' device): the clipping norm and the
    /// coming update see the gradient divided by it. Call before
    /// [`Self::clip_grad_norm`].
    pub fn divide_grads_by(&mut self, divisor: Tensor) {
        self.divisor = Some(divisor);
    }

    /// Makes the coming step scale the gradient (divided by the divisor, if
    /// any) so its global L2 norm is at most `max_norm` (0: off), and returns
    /// the norm before clipping as a 0-d tensor. Nothing is read on the host:
    /// the factor stays on the device and the update applies it in its own
    /// pass over the gradient.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Tensor {
        let mut norm = self.grad.norm();
        if let Some(d) = &self.divisor {
            norm = norm / d;
        }
        let clip = (max_norm > 0.0).then(|| (norm.full_like(max_norm) / (&norm + 1e-6)).clamp_max(1.0));
        self.clip = match (clip, &self.divisor) {
            (Some(c), Some(d)) => Some(c / d),
            (None, Some(d)) => Some(d.reciprocal()),
            (c, None) => c,
        };
        norm
    }

    /// Drops the accumulated gradient without updating anything.
    pub fn discard_grads(&mut self) {
        self.grad_fresh = true;
        self.clip = None;
        self.divisor = None;
    }

    /// One AdamW step with learning rate `lr`, unless `skip` (a 0-d fp32 tensor
    /// on the device: 1.0 or 0.0) is set: then master, moments, shadow and the
    /// step count stay as they were. Either way the gradient is consumed.
    pub fn step(&mut self, lr: f64, skip: &Tensor) -> Result<()> {
        let done = match self.kernel {
            Kernel::Rust => {
                self.step_rust(lr, skip);
                Ok(())
            }
            Kernel::Torch => self.step_torch(lr, skip),
        };
        self.discard_grads();
        done
    }

    /// libtorch's fused AdamW, once per decay group, then the shadow copy. As
    /// `torch.optim.AdamW(fused=True)` does: the step count is incremented
    /// before and the skip flag subtracted after. The kernel divides the
    /// gradient by its `grad_scale`: the reciprocal of the clipping factor.
    fn step_torch(&mut self, lr: f64, skip: &Tensor) -> Result<()> {
        let hp = self.hp;
        let n = self.numel();
        tch::no_grad(|| {
            let _ = self.step.g_add_scalar_(1.0);
            let scale = self.clip.as_ref().map(Tensor::reciprocal);
            for (start, len, weight_decay) in
                [(0, self.n_decay, hp.weight_decay), (self.n_decay, n - self.n_decay, 0.0)]
            {
                if len == 0 {
                    continue;
                }
                let part = |t: &Tensor| t.narrow(0, start, len);
                let (p, g, m, v) = (part(&self.master), part(&self.grad), part(&self.exp_avg), part(&self.exp_avg_sq));
                let group = fused::Group { param: &p, grad: &g, exp_avg: &m, exp_avg_sq: &v, step: &self.step };
                let hyper = fused::Hyper { lr, beta1: hp.beta1, beta2: hp.beta2, weight_decay, eps: hp.eps };
                fused::adamw(&[group], hyper, scale.as_ref(), Some(skip))?;
            }
            let _ = self.step.g_sub_(skip);
            if let Some(shadow) = &mut self.shadow {
                // A skipped step left the master as it was: the copy changes nothing.
                shadow.copy_(&self.master);
            }
            Ok(())
        })
    }

    /// AdamW in one pass over the four flat buffers, split across threads (what
    /// torch's fused CPU AdamW does): gradient scale, decoupled decay, moments,
    /// update and the bf16 shadow, read and written once per element. Its
    /// scalars are read from CPU memory (no device to wait for).
    fn step_rust(&mut self, lr: f64, skip: &Tensor) {
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
            grad_scale: self.clip.as_ref().map_or(1.0, |c| host::cpu_value(c) as f32),
        };
        for b in [&self.master, &self.grad, &self.exp_avg, &self.exp_avg_sq] {
            assert!(b.kind() == Kind::Float && b.is_contiguous() && b.numel() == n, "flat fp32 buffers");
        }
        if let Some(sh) = &self.shadow {
            assert!(sh.kind() == Kind::BFloat16 && sh.is_contiguous() && sh.numel() == n, "flat bf16 shadow");
        }
        // SAFETY: four (five with the shadow) distinct, contiguous CPU buffers of n
        // elements owned by self; nothing else reads or writes them during this call.
        let buffers = unsafe {
            mlm_kernels::adamw::Buffers {
                param: std::slice::from_raw_parts_mut(self.master.data_ptr() as *mut f32, n),
                grad: std::slice::from_raw_parts(self.grad.data_ptr() as *const f32, n),
                exp_avg: std::slice::from_raw_parts_mut(self.exp_avg.data_ptr() as *mut f32, n),
                exp_avg_sq: std::slice::from_raw_parts_mut(self.exp_avg_sq.data_ptr() as *mut f32, n),
                shadow: self.shadow.as_ref().map(|sh| std::slice::from_raw_parts_mut(sh.data_ptr() as *mut u16, n)),
            }
        };
        mlm_kernels::adamw::step(&step, self.n_decay as usize, buffers);
    }

    /// Makes `params` (a lower-precision compute copy with the slots' names, in
    /// slot order) views of one flat buffer of `kind` that every step rewrites
    /// from the master weights, rounded (on the CPU in the AdamW pass itself).
    pub fn attach_shadow(&mut self, params: &[(String, Tensor)], kind: Kind) {
        assert_eq!(params.len(), self.slots.len(), "one compute parameter per slot");
        let shadow = self.master.to_kind(kind);
        for ((name, p), s) in params.iter().zip(&self.slots) {
            assert_eq!(name, &s.name, "compute parameters in slot order");
            let mut p = p.shallow_clone();
            p.set_data(&shadow.narrow(0, s.offset, s.numel).view(s.shape.as_slice()));
        }
        self.shadow = Some(shadow);
    }

    /// The flat buffer the running model's parameters are views of: the bf16
    /// shadow if any, else the master.
    pub fn compute_buffer(&self) -> &Tensor {
        self.shadow.as_ref().unwrap_or(&self.master)
    }

    /// The master view of every parameter, by name (for saving).
    pub fn named_master(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .map(|s| (s.name.clone(), self.master.narrow(0, s.offset, s.numel).view(s.shape.as_slice())))
            .collect()
    }
}

/// Trainable parameters of a var store in the flat buffers' order (by name).
pub fn ordered_params(vs: &tch::nn::VarStore, slots: &[Slot]) -> Result<Vec<(String, Tensor)>> {
    let vars = vs.variables();
    slots
        .iter()
        .map(|s| match vars.get(&s.name) {
            Some(t) => Ok((s.name.clone(), t.shallow_clone())),
            None => bail!("parameter {} missing from the compute model", s.name),
        })
        .collect()
}
