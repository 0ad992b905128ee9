//! Our C++ shims over libtorch, for what tch does not bind: every `extern "C"`
//! declaration of mlm's C++ code, and the safe functions the rest of mlm calls.
//!
//! The C++ lies beside this file (`shims.h`, the one header, and a `.cpp` per
//! concern), compiled by `build.rs` into one library against the headers beside
//! libtorch. One error convention: every function returns null on success or
//! the message of the C++ exception it caught, which [`take_message`] reads and
//! frees; results come back through out-pointers.
//!
//! - `torch_extras.cpp`: the float32 matmul precision (`training.tf32`) and
//!   pinned host memory, for `src/device.rs`;
//! - `linear_f32.cpp`: a bf16 `nn.Linear` computed by fp32 GEMMs, an autograd
//!   function of its own, for `src/model/linear_f32.rs`;
//! - `fused_adamw.cpp`: libtorch's fused AdamW, for `src/train/optim/fused.rs`;
//! - `message.cpp`: the messages' allocation and release.
use std::ffi::c_char;

use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn mlm_free_message(message: *mut c_char);
    fn mlm_set_float32_matmul_precision_high(high: i32) -> *mut c_char;
    fn mlm_float32_matmul_precision_high(high: *mut i32) -> *mut c_char;
    fn mlm_pinned_copy(t: *const C_tensor, out: *mut *mut C_tensor) -> *mut c_char;
    fn mlm_peak_allocated_bytes(device: i32, out: *mut i64) -> *mut c_char;
    fn mlm_linear_via_f32(
        x: *const C_tensor,
        weight: *const C_tensor,
        bias: *const C_tensor,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn mlm_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        state_steps: *const *mut C_tensor,
        n: i64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        grad_scale: *const C_tensor,
        found_inf: *const C_tensor,
    ) -> *mut c_char;
}

/// What a shim's C++ exception said (its first line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimError(pub String);

impl std::fmt::Display for ShimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShimError {}

/// The first line of a shim's error message, freed here: the one place a
/// message is released.
///
/// # Safety
/// `message` is non-null, returned by a shim and not yet freed; it is freed by
/// this call.
unsafe fn take_message(message: *mut c_char) -> String {
    // SAFETY: a NUL-terminated string from `mlm_message` (the caller's
    // contract), read, then freed once.
    let text = unsafe {
        let text = std::ffi::CStr::from_ptr(message).to_string_lossy().into_owned();
        mlm_free_message(message);
        text
    };
    crate::logging::first_line(&text)
}

/// A shim's return value: `Ok` for null, else its message.
///
/// # Safety
/// `message` is what a shim returned, not yet freed.
unsafe fn check(message: *mut c_char) -> Result<(), ShimError> {
    if message.is_null() {
        Ok(())
    } else {
        // SAFETY: the caller's contract.
        Err(ShimError(unsafe { take_message(message) }))
    }
}

/// A new tensor returned through a shim's out-pointer.
///
/// # Safety
/// `ptr` is null or a new `at::Tensor` allocated by a shim (as tch allocates
/// its own handles), owned by no one else.
unsafe fn owned(ptr: *mut C_tensor) -> Option<Tensor> {
    // SAFETY: the caller's contract: `from_ptr` takes ownership.
    (!ptr.is_null()).then(|| unsafe { Tensor::from_ptr(ptr) })
}

/// `torch.set_float32_matmul_precision("high")` (`high`: TF32 allowed on
/// CUDA) or `("highest")`: a process-wide setting of libtorch.
pub fn set_float32_matmul_precision_high(high: bool) -> Result<(), ShimError> {
    // SAFETY: a plain integer in, a message or null out.
    unsafe { check(mlm_set_float32_matmul_precision_high(i32::from(high))) }
}

/// Whether libtorch's float32 matmul precision lets fp32 matmuls run as TF32
/// ("high" or "medium").
pub fn float32_matmul_precision_high() -> bool {
    let mut high = 0;
    // SAFETY: a valid out-pointer; reading a field of libtorch's global context.
    let read = unsafe { check(mlm_float32_matmul_precision_high(&mut high)) };
    read.is_ok() && high != 0
}

/// A copy of the CPU tensor `t` in pinned host memory; `None` without CUDA.
pub fn pinned_copy(t: &Tensor) -> Result<Option<Tensor>, ShimError> {
    let mut out = std::ptr::null_mut();
    // SAFETY: a live tch handle and a valid out-pointer, which the shim sets to
    // null or to a new tensor.
    unsafe {
        check(mlm_pinned_copy(t.as_ptr(), &mut out))?;
        Ok(owned(out))
    }
}

/// The most bytes libtorch's caching allocator has had allocated on GPU
/// `device` so far (`torch.cuda.max_memory_allocated`). Call it for a device
/// libtorch has used: elsewhere libtorch throws, and this is that error.
pub fn peak_allocated_bytes(device: usize) -> Result<u64, ShimError> {
    let mut out = -1i64;
    // SAFETY: a plain integer in, a valid out-pointer; a message or null out.
    unsafe { check(mlm_peak_allocated_bytes(device as i32, &mut out))? };
    Ok(out.max(0) as u64)
}

/// `x.linear(weight, bias)` through fp32 GEMMs, differentiable in all three
/// inputs; the result in `x`'s dtype (`linear_f32.cpp`).
pub fn linear_via_f32(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, ShimError> {
    let mut out = std::ptr::null_mut();
    let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
    // SAFETY: live tch handles (bias null when absent) and a valid out-pointer,
    // which the shim sets to a new tensor when it returns null.
    unsafe {
        check(mlm_linear_via_f32(x.as_ptr(), weight.as_ptr(), bias, &mut out))?;
        Ok(owned(out).expect("the linear shim returned no error and no tensor"))
    }
}

/// One call of libtorch's fused AdamW (`at::_fused_adamw_`): entry `i` of the
/// five lists is one group (parameter, gradient, moments, step count), all of
/// one length, updated in place.
pub struct FusedAdamw<'a> {
    pub params: &'a [&'a Tensor],
    pub grads: &'a [&'a Tensor],
    pub exp_avgs: &'a [&'a Tensor],
    pub exp_avg_sqs: &'a [&'a Tensor],
    /// 0-d fp32 step counts (not incremented by the kernel).
    pub steps: &'a [&'a Tensor],
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
    /// Divides the gradients first (0-d fp32).
    pub grad_scale: Option<&'a Tensor>,
    /// Holding 1.0 (0-d fp32), leaves every tensor as it was.
    pub found_inf: Option<&'a Tensor>,
}

/// Runs `call` ([`FusedAdamw`]).
pub fn fused_adamw(call: &FusedAdamw) -> Result<(), ShimError> {
    let n = call.params.len();
    let lists = [call.params, call.grads, call.exp_avgs, call.exp_avg_sqs, call.steps];
    assert!(lists.iter().all(|l| l.len() == n), "fused AdamW: lists of different lengths");
    let [p, g, m, v, s] = lists.map(|l| l.iter().map(|t| t.as_ptr() as *mut C_tensor).collect::<Vec<_>>());
    let opt = |t: Option<&Tensor>| t.map_or(std::ptr::null(), |t| t.as_ptr());
    // SAFETY: every pointer is a live tch tensor borrowed for the call; the shim
    // reads `n` entries of each list and mutates the tensors' data only.
    unsafe {
        check(mlm_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            s.as_ptr(),
            n as i64,
            call.lr,
            call.beta1,
            call.beta2,
            call.weight_decay,
            call.eps,
            opt(call.grad_scale),
            opt(call.found_inf),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// On a GPU the peak covers a tensor just allocated; without one,
    /// libtorch's refusal is an error, not a crash.
    #[test]
    fn the_allocator_peak_is_read_on_a_gpu_and_refused_without_one() {
        if tch::Cuda::is_available() {
            let t = Tensor::zeros([1 << 20], (Kind::Float, Device::Cuda(0)));
            assert!(peak_allocated_bytes(0).unwrap() >= 4 << 20);
            drop(t);
        } else {
            assert!(peak_allocated_bytes(0).is_err());
        }
    }

    #[test]
    fn a_cpp_exception_comes_back_as_its_first_line() {
        let x = Tensor::zeros([2, 3], (Kind::BFloat16, Device::Cpu));
        let w = Tensor::zeros([4, 5], (Kind::BFloat16, Device::Cpu));
        let err = linear_via_f32(&x, &w, None).unwrap_err();
        assert!(!err.0.is_empty() && !err.0.contains('\n'), "{err:?}");
    }
}
