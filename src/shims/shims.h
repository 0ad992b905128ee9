// mlm's C++ shims over libtorch: what tch does not bind. Compiled by build.rs
// into one library (against the headers beside libtorch) and bound by
// src/shims/mod.rs, which gives the rest of mlm safe functions.
//
// One convention for every function: it returns null on success, or the
// error's message, which Rust reads and frees with `mlm_free_message` (one
// place: `take_message` in src/shims/mod.rs). Results come back through
// out-pointers. A C++ exception never crosses into Rust: `mlm::guard` turns it
// into the message. Tensors come as tch's handles (`at::Tensor*`); a new
// tensor is returned as `new at::Tensor(...)`, allocated as tch allocates its
// own handles, and Rust owns it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <exception>

extern "C" {

// message.cpp: a malloc'd copy of `what` (a static "out of memory" message
// when malloc fails, which `mlm_free_message` leaves alone), and its free.
char* mlm_message(const char* what);
void mlm_free_message(char* message);

// torch_extras.cpp: libtorch's float32 matmul precision
// (`torch.set_float32_matmul_precision`: 1 for "high", TF32 allowed on CUDA;
// 0 for "highest") and pinned host memory.
char* mlm_set_float32_matmul_precision_high(int high);
// `*high` = 1 when fp32 matmuls may run as TF32 ("high" or "medium"), else 0.
char* mlm_float32_matmul_precision_high(int* high);
// `*out` = a copy of the CPU tensor `t` in pinned (page-locked) host memory,
// or null without CUDA.
char* mlm_pinned_copy(const at::Tensor* t, at::Tensor** out);
// `*out` = the most bytes libtorch's caching allocator has had allocated on
// accelerator `device` (`torch.cuda.max_memory_allocated`).
char* mlm_peak_allocated_bytes(int device, int64_t* out);

// linear_f32.cpp: `*out` = `x.linear(weight, bias)` through fp32 GEMMs,
// differentiable; `bias` may be null.
char* mlm_linear_via_f32(const at::Tensor* x, const at::Tensor* weight, const at::Tensor* bias, at::Tensor** out);

// fused_adamw.cpp: one AdamW step (`at::_fused_adamw_`, amsgrad and maximize
// off) over `n` tensors of each list. `grad_scale` (nullable) divides the
// gradients first; `found_inf` (nullable) holding 1.0 makes the call a no-op.
// The step counts are not incremented.
char* mlm_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads, at::Tensor* const* exp_avgs,
                      at::Tensor* const* exp_avg_sqs, at::Tensor* const* state_steps, int64_t n, double lr,
                      double beta1, double beta2, double weight_decay, double eps, const at::Tensor* grad_scale,
                      const at::Tensor* found_inf);

}  // extern "C"

namespace mlm {

// Runs `body`: null when it returns, the message of what it throws otherwise
// (`unknown` for an exception that is not a `std::exception`).
template <class Body>
char* guard(const char* unknown, Body&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return mlm_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return mlm_message(e.what());
  } catch (...) {
    return mlm_message(unknown);
  }
}

}  // namespace mlm
