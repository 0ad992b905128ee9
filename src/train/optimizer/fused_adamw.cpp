// libtorch's fused AdamW (`at::_fused_adamw_`, what `torch.optim.AdamW(fused=True)`
// runs) for src/train/optimizer/fused.rs: tch binds no op that returns nothing.
// Tensors come as tch's handles (`torch::Tensor*`); a C++ exception never crosses
// into Rust: it comes back as a malloc'd message the caller frees.
#include "../../shim_message.h"

#include <ATen/ops/_fused_adamw.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <vector>

namespace {

std::vector<at::Tensor> list(at::Tensor* const* tensors, int64_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int64_t i = 0; i < n; i++) v.push_back(*tensors[i]);
  return v;
}

std::optional<at::Tensor> maybe(const at::Tensor* t) {
  return t == nullptr ? std::nullopt : std::optional<at::Tensor>(*t);
}

}  // namespace

// One AdamW step over `n` tensors of each list (amsgrad and maximize off).
// `grad_scale` (nullable) divides the gradients first; `found_inf` (nullable)
// holding 1.0 makes the call a no-op. The step counts are not incremented.
// Returns null, or the error message (free it with `mlm_free_message`).
extern "C" char* mlm_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads, at::Tensor* const* exp_avgs,
                                 at::Tensor* const* exp_avg_sqs, at::Tensor* const* state_steps, int64_t n, double lr,
                                 double beta1, double beta2, double weight_decay, double eps,
                                 const at::Tensor* grad_scale, const at::Tensor* found_inf) {
  try {
    at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n), {},
                      list(state_steps, n), lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                      /*maximize=*/false, maybe(grad_scale), maybe(found_inf));
    return nullptr;
  } catch (const c10::Error& e) {
    return mlm_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return mlm_message(e.what());
  } catch (...) {
    return mlm_message("unknown C++ exception in at::_fused_adamw_");
  }
}

extern "C" void mlm_free_message(char* m) { std::free(m); }
