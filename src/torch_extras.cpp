// What tch does not bind, for src/device.rs: libtorch's float32 matmul
// precision (`torch.set_float32_matmul_precision`: "highest" keeps fp32 matmuls
// in fp32, "high" lets CUDA run them as TF32 on tensor cores), and pinning a
// host tensor without the device argument that torch 2.x deprecates.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>

#include <exception>

// Sets the precision: 1 for "high" (TF32 allowed), 0 for "highest".
// Returns 0, or -1 when libtorch refused.
extern "C" int mlm_set_float32_matmul_precision_high(int high) {
  try {
    at::globalContext().setFloat32MatmulPrecision(high ? "high" : "highest");
    return 0;
  } catch (const std::exception&) {
    return -1;
  }
}

// 1 when fp32 matmuls may run as TF32 ("high" or "medium"), else 0.
extern "C" int mlm_float32_matmul_precision_high() {
  return at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST ? 1 : 0;
}

// A copy of the CPU tensor `t` in pinned (page-locked) host memory, as a new
// tch handle; null without CUDA or when pinning fails.
extern "C" at::Tensor* mlm_pinned_copy(const at::Tensor* t) {
  try {
    if (!at::globalContext().hasCUDA()) return nullptr;
    return new at::Tensor(t->pin_memory());
  } catch (const std::exception&) {
    return nullptr;
  }
}
