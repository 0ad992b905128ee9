// libtorch's fused AdamW (`at::_fused_adamw_`, what `torch.optim.AdamW(fused=True)`
// runs) for src/train/optim/fused.rs: tch binds no op that returns nothing.
#include "shims.h"

#include <ATen/ops/_fused_adamw.h>

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

extern "C" char* mlm_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads, at::Tensor* const* exp_avgs,
                                 at::Tensor* const* exp_avg_sqs, at::Tensor* const* state_steps, int64_t n, double lr,
                                 double beta1, double beta2, double weight_decay, double eps,
                                 const at::Tensor* grad_scale, const at::Tensor* found_inf) {
  return mlm::guard("unknown C++ exception in at::_fused_adamw_", [&] {
    at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n), {},
                      list(state_steps, n), lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                      /*maximize=*/false, maybe(grad_scale), maybe(found_inf));
  });
}
