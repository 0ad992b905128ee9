//! libtorch's fused AdamW kernel (`at::_fused_adamw_`, the kernel behind
//! `torch.optim.AdamW(fused=True)`) through our C++ shim, `fused_adamw.cpp`.
//!
//! One launch updates parameters and both moments; on the GPU it reads the
//! step count, the gradient scale and the skip flag from device memory, so a
//! step needs no host sync.
use std::ffi::c_char;

use anyhow::{bail, Result};
use tch::Tensor;

extern "C" {
    fn mlm_fused_adamw(
        params: *const *mut torch_sys::C_tensor,
        grads: *const *mut torch_sys::C_tensor,
        exp_avgs: *const *mut torch_sys::C_tensor,
        exp_avg_sqs: *const *mut torch_sys::C_tensor,
        state_steps: *const *mut torch_sys::C_tensor,
        n: i64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        grad_scale: *const torch_sys::C_tensor,
        found_inf: *const torch_sys::C_tensor,
    ) -> *mut c_char;
}

/// One group of same-length fp32 tensors on one device, updated in place.
pub struct Group<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
    /// Updates applied before this one plus one, a 0-d fp32 tensor on the
    /// group's device (the kernel does not increment it).
    pub step: &'a Tensor,
}

/// The hyper-parameters of one call (`weight_decay` for all its groups).
#[derive(Debug, Clone, Copy)]
pub struct Hyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// `torch._fused_adamw_(groups..., grad_scale=, found_inf=)`: the gradients are
/// first divided by `grad_scale` (0-d fp32, written back); `found_inf` (0-d
/// fp32) holding 1.0 leaves every tensor as it was.
pub fn adamw(groups: &[Group], hp: Hyper, grad_scale: Option<&Tensor>, found_inf: Option<&Tensor>) -> Result<()> {
    let ptrs = |f: &dyn Fn(&Group<'_>) -> *const torch_sys::C_tensor| -> Vec<*mut torch_sys::C_tensor> {
        groups.iter().map(|g| f(g) as *mut torch_sys::C_tensor).collect()
    };
    let (p, g, m, v, s) = (
        ptrs(&|g| g.param.as_ptr()),
        ptrs(&|g| g.grad.as_ptr()),
        ptrs(&|g| g.exp_avg.as_ptr()),
        ptrs(&|g| g.exp_avg_sq.as_ptr()),
        ptrs(&|g| g.step.as_ptr()),
    );
    let opt = |t: Option<&Tensor>| t.map_or(std::ptr::null(), |t| t.as_ptr());
    // SAFETY: every pointer is a live tch tensor borrowed for the call; the shim
    // reads `n` entries of each list, mutates the tensors' data only, and
    // catches every C++ exception.
    let err = unsafe {
        mlm_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            groups.len() as i64,
            hp.lr,
            hp.beta1,
            hp.beta2,
            hp.weight_decay,
            hp.eps,
            opt(grad_scale),
            opt(found_inf),
        )
    };
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a message from the shim, not freed before.
    bail!("libtorch's fused AdamW failed: {}", unsafe { crate::device::take_shim_message(err) })
}
