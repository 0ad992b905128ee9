//! libtorch's fused AdamW kernel (`at::_fused_adamw_`, the kernel behind
//! `torch.optim.AdamW(fused=True)`) through our C++ shim, `src/shims/fused_adamw.cpp`.
//!
//! One launch updates parameters and both moments; on the GPU it reads the
//! step count, the gradient scale and the skip flag from device memory, so a
//! step needs no host sync.
use anyhow::Result;
use tch::Tensor;

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
    let params: Vec<&Tensor> = groups.iter().map(|g| g.param).collect();
    let grads: Vec<&Tensor> = groups.iter().map(|g| g.grad).collect();
    let exp_avgs: Vec<&Tensor> = groups.iter().map(|g| g.exp_avg).collect();
    let exp_avg_sqs: Vec<&Tensor> = groups.iter().map(|g| g.exp_avg_sq).collect();
    let steps: Vec<&Tensor> = groups.iter().map(|g| g.step).collect();
    crate::shims::fused_adamw(&crate::shims::FusedAdamw {
        params: &params,
        grads: &grads,
        exp_avgs: &exp_avgs,
        exp_avg_sqs: &exp_avg_sqs,
        steps: &steps,
        lr: hp.lr,
        beta1: hp.beta1,
        beta2: hp.beta2,
        weight_decay: hp.weight_decay,
        eps: hp.eps,
        grad_scale,
        found_inf,
    })
    .map_err(|e| anyhow::anyhow!("libtorch's fused AdamW failed: {e}"))
}
