// libtorch's float32 matmul precision (`torch.set_float32_matmul_precision`),
// which tch does not bind, for src/device.rs: "highest" keeps fp32 matmuls in
// fp32, "high" lets CUDA run them as TF32 on tensor cores.
#include <ATen/Context.h>

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
