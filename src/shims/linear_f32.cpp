// A bf16 `nn.Linear` whose three GEMMs (forward, input gradient, weight
// gradient) run in libtorch's fp32 kernels, for src/model/linear_f32.rs: on a CPU
// without bf16 instructions libtorch's bf16 GEMM is an emulation several times
// slower than its fp32 one (a [1024, 768] x [768, 3072] product: 86 ms against
// 19 ms for upcast + fp32 GEMM + round, 2 threads, torch 2.11).
//
// The arithmetic is a bf16 GEMM's: bf16 -> fp32 is exact, the products are
// accumulated in fp32 and the result is rounded to bf16 once, as libtorch's and
// oneDNN's bf16 kernels do; only the order of the sums differs. The op saves the
// bf16 input and weight (what a bf16 `linear` saves), not fp32 copies, so the
// activation memory is a bf16 linear's; the fp32 copies live inside one call.
#include "shims.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LinearViaF32 : public torch::autograd::Function<LinearViaF32> {
  // x [..., in], weight [out, in], bias [out] or none -> [..., out] in x's dtype.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
    TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "linear: the input is ", x.scalar_type(),
                ", the weight ", weight.scalar_type());
    ctx->save_for_backward({x, weight});
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["has_bias"] = has_bias;
    if (has_bias) ctx->saved_data["bias_kind"] = static_cast<int64_t>(bias->scalar_type());
    const auto kind = x.scalar_type();
    auto out = at::linear(x.to(at::kFloat), weight.to(at::kFloat),
                          has_bias ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt);
    return out.to(kind);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& weight = saved[1];
    const auto kind = x.scalar_type();
    const int64_t in = weight.size(1);
    const int64_t out = weight.size(0);
    const auto grad = grads[0].reshape({-1, out}).to(at::kFloat);
    at::Tensor grad_x, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      grad_x = grad.mm(weight.to(at::kFloat)).to(kind).view(x.sizes());
    }
    if (ctx->needs_input_grad(1)) {
      grad_weight = grad.t().mm(x.reshape({-1, in}).to(at::kFloat)).to(weight.scalar_type());
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      grad_bias = grad.sum(0).to(static_cast<at::ScalarType>(ctx->saved_data["bias_kind"].toInt()));
    }
    return {grad_x, grad_weight, grad_bias};
  }
};

}  // namespace

extern "C" char* mlm_linear_via_f32(const at::Tensor* x, const at::Tensor* weight, const at::Tensor* bias,
                                   at::Tensor** out) {
  *out = nullptr;
  return mlm::guard("an unknown C++ exception", [&] {
    auto b = bias == nullptr ? std::nullopt : std::optional<at::Tensor>(*bias);
    *out = new at::Tensor(LinearViaF32::apply(*x, *weight, b));
  });
}
