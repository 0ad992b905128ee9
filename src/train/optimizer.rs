//! AdamW over one flat fp32 buffer.
//!
//! tch has no way to save its optimizers' state and its optimizers step one
//! tensor at a time. Here every trainable parameter of the fp32 master model is
//! re-pointed (`set_data`) at a slice of one contiguous buffer, decayed parameters
//! first, so a step is a handful of whole-buffer kernels and the moments are plain
//! tensors we save and load. Semantics follow `torch.optim.AdamW`.
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::config::TrainingConfig;

/// One trainable parameter's place in the flat buffers.
#[derive(Debug, Clone)]
pub struct Slot {
    pub name: String,
    pub offset: i64,
    pub numel: i64,
    pub shape: Vec<i64>,
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
    /// Elements `[0, n_decay)` get weight decay, the rest (biases, LayerNorm) do not.
    pub n_decay: i64,
    pub master: Tensor,
    pub grad: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Optimizer steps taken (for bias correction).
    pub step: i64,
    pub hp: AdamWParams,
    /// Flat bf16 compute copy of `master` (bf16 training): the compute model's
    /// parameters are views of it, and each step rewrites it from the master.
    shadow: Option<Tensor>,
    /// The gradient buffer holds nothing yet for the coming step: the first
    /// micro-batch overwrites it instead of adding.
    grad_fresh: bool,
    /// Clipping scale the fused CPU step applies to the gradient.
    pending_scale: f32,
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
        Ok(Self {
            slots,
            n_decay,
            grad: master.zeros_like(),
            exp_avg: master.zeros_like(),
            exp_avg_sq: master.zeros_like(),
            master,
            step: 0,
            hp,
            shadow: None,
            grad_fresh: true,
            pending_scale: 1.0,
        })
    }

    /// Continues from saved moments and step count.
    pub fn restore(&mut self, exp_avg: &Tensor, exp_avg_sq: &Tensor, step: i64) {
        tch::no_grad(|| {
            self.exp_avg.copy_(exp_avg);
            self.exp_avg_sq.copy_(exp_avg_sq);
        });
        self.step = step;
    }

    pub fn numel(&self) -> i64 {
        self.master.numel() as i64
    }

    /// Adds one micro-batch's gradients (one per slot, in slot order; any
    /// dtype; undefined for a parameter the loss did not reach) into the flat
    /// fp32 gradient. The first micro-batch of a step overwrites it.
    pub fn accumulate_grads(&mut self, grads: &[Tensor]) {
        assert_eq!(grads.len(), self.slots.len(), "one gradient per parameter");
        tch::no_grad(|| {
            for (g, s) in grads.iter().zip(&self.slots) {
                let mut dst = self.grad.narrow(0, s.offset, s.numel);
                if !g.defined() {
                    if self.grad_fresh {
                        let _ = dst.zero_();
                    }
                    continue;
                }
                let src = g.reshape([-1]);
                if self.grad_fresh {
                    dst.copy_(&src);
                } else {
                    let _ = dst.g_add_(&src.to_kind(Kind::Float));
                }
            }
        });
        self.grad_fresh = false;
    }

    /// Scales the gradient so its global L2 norm is at most `max_norm` (0: off)
    /// and returns the norm before clipping as a 0-d tensor. On the CPU the
    /// scale is applied inside the fused AdamW pass instead of a pass of its own.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Tensor {
        let norm = self.grad.norm();
        if max_norm > 0.0 {
            let coef = (Tensor::from(max_norm).to_device(norm.device()) / (&norm + 1e-6)).clamp_max(1.0);
            if self.master.device() == Device::Cpu {
                self.pending_scale = coef.double_value(&[]) as f32;
            } else {
                let _ = self.grad.g_mul_(&coef);
            }
        }
        norm
    }

    /// Drops the accumulated gradient without updating anything.
    pub fn discard_grads(&mut self) {
        self.grad_fresh = true;
        self.pending_scale = 1.0;
    }

    /// One AdamW step with learning rate `lr`; the gradient is consumed.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        if self.master.device() == Device::Cpu {
            self.step_fused_cpu(lr);
        } else {
            self.step_tensors(lr);
            if let Some(shadow) = &mut self.shadow {
                tch::no_grad(|| shadow.copy_(&self.master));
            }
        }
        self.grad_fresh = true;
        self.pending_scale = 1.0;
    }

    /// AdamW as whole-buffer tensor kernels (GPU).
    fn step_tensors(&mut self, lr: f64) {
        let hp = self.hp;
        let t = self.step as f64;
        tch::no_grad(|| {
            if hp.weight_decay != 0.0 && self.n_decay > 0 {
                let _ = self.master.narrow(0, 0, self.n_decay).g_mul_scalar_(1.0 - lr * hp.weight_decay);
            }
            let _ = self.exp_avg.lerp_(&self.grad, 1.0 - hp.beta1);
            let _ = self.exp_avg_sq.g_mul_scalar_(hp.beta2);
            let _ = self.exp_avg_sq.addcmul_(&self.grad, &self.grad.g_mul_scalar(1.0 - hp.beta2));
            let bc1 = 1.0 - hp.beta1.powf(t);
            let bc2 = 1.0 - hp.beta2.powf(t);
            let denom = (self.exp_avg_sq.sqrt() / bc2.sqrt()).g_add_scalar_(hp.eps);
            let _ = self.master.addcdiv_(&(&self.exp_avg * (-lr / bc1)), &denom);
        });
    }

    /// AdamW in one pass over the four flat buffers, split across threads (what
    /// torch's fused CPU AdamW does): gradient scale, decoupled decay, moments,
    /// update, read and written once per element.
    fn step_fused_cpu(&mut self, lr: f64) {
        let n = self.numel() as usize;
        let hp = self.hp;
        let t = self.step as f64;
        let step = mlm_kernels::adamw::Step {
            step_size: (lr / (1.0 - hp.beta1.powf(t))) as f32,
            beta1: hp.beta1 as f32,
            beta2: hp.beta2 as f32,
            eps: hp.eps as f32,
            bc2_sqrt: (1.0 - hp.beta2.powf(t)).sqrt() as f32,
            decay: (1.0 - lr * hp.weight_decay) as f32,
            grad_scale: self.pending_scale,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Our flat AdamW must equal torch.optim.AdamW; these numbers are from
    /// torch 2.11 (lr 0.1, betas (0.9, 0.999), eps 1e-8, wd 0.1, two steps with
    /// grads [0.5, -1.0] then [0.25, 2.0] on p = [1.0, 2.0], the second entry
    /// without decay).
    #[test]
    fn adamw_matches_torch_reference() {
        let p1 = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let p2 = Tensor::from_slice(&[2.0f32]).set_requires_grad(true);
        let hp = AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let mut opt =
            FlatAdamW::new(vec![("w".into(), p1.shallow_clone()), ("b".into(), p2.shallow_clone())], |n| n == "b", hp)
                .unwrap();
        for g in [[0.5f32, -1.0], [0.25, 2.0]] {
            opt.grad.copy_(&Tensor::from_slice(&g));
            opt.step(0.1);
        }
        let got: Vec<f32> = Vec::try_from(&opt.master).unwrap();
        // torch: p = [0.7878821, 2.0633895] (decay on "w" only).
        assert!((got[0] - 0.787_882_1).abs() < 1e-5, "{got:?}");
        assert!((got[1] - 2.063_389_5).abs() < 1e-5, "{got:?}");
        // the parameters are views of the master buffer
        assert!((f64::try_from(&p1).unwrap() - got[0] as f64).abs() < 1e-7);
    }

    #[test]
    fn fused_cpu_step_equals_the_tensor_step() {
        tch::manual_seed(0);
        let hp = AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let w = Tensor::randn([1000, 70], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([70], (Kind::Float, Device::Cpu));
        let make = || FlatAdamW::new(vec![("w".into(), w.copy()), ("b".into(), b.copy())], |n| n == "b", hp).unwrap();
        let (mut fused, mut plain) = (make(), make());
        for _ in 0..3 {
            let g = Tensor::randn([fused.numel()], (Kind::Float, Device::Cpu));
            fused.grad.copy_(&g);
            fused.pending_scale = 0.5;
            fused.step += 1;
            fused.step_fused_cpu(1e-2);
            plain.grad.copy_(&(&g * 0.5));
            plain.step += 1;
            plain.step_tensors(1e-2);
        }
        let diff = (&fused.master - &plain.master).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
        let diff = (&fused.exp_avg_sq - &plain.exp_avg_sq).abs().max().double_value(&[]);
        assert!(diff < 1e-7, "{diff}");
    }

    #[test]
    fn bf16_compute_copy_is_rewritten_by_each_step_as_torch_rounds_it() {
        tch::manual_seed(1);
        let hp = AdamWParams { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
        let w = Tensor::randn([300, 70], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([70], (Kind::Float, Device::Cpu));
        let mut opt = FlatAdamW::new(vec![("w".into(), w.copy()), ("b".into(), b.copy())], |n| n == "b", hp).unwrap();
        // The compute copy, in slot order ("w" decays, so it comes first).
        let compute: Vec<(String, Tensor)> =
            vec![("w".into(), w.to_kind(Kind::BFloat16)), ("b".into(), b.to_kind(Kind::BFloat16))];
        opt.attach_shadow(&compute, Kind::BFloat16);
        for _ in 0..2 {
            let g = Tensor::randn([opt.numel()], (Kind::Float, Device::Cpu)) * 1e-3;
            opt.accumulate_grads(&[g.narrow(0, 0, 21000), g.narrow(0, 21000, 70)]);
            opt.step(0.5);
        }
        for ((_, p), master) in compute.iter().zip(opt.named_master()) {
            let want = master.1.to_kind(Kind::BFloat16);
            assert_eq!(p.size(), want.size());
            assert!(p.equal(&want), "compute copy differs from torch's rounding of the master");
        }
    }
}
