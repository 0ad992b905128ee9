// What tch does not bind, for src/device.rs: libtorch's float32 matmul
// precision (`torch.set_float32_matmul_precision`: "highest" keeps fp32 matmuls
// in fp32, "high" lets CUDA run them as TF32 on tensor cores), and pinning a
// host tensor without the device argument that torch 2.x deprecates.
#include "shims.h"

#include <ATen/Context.h>
#include <ATen/DeviceAccelerator.h>

extern "C" char* mlm_set_float32_matmul_precision_high(int high) {
  return mlm::guard("unknown C++ exception setting the float32 matmul precision",
                    [&] { at::globalContext().setFloat32MatmulPrecision(high ? "high" : "highest"); });
}

extern "C" char* mlm_float32_matmul_precision_high(int* high) {
  return mlm::guard("unknown C++ exception reading the float32 matmul precision", [&] {
    *high = at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST ? 1 : 0;
  });
}

extern "C" char* mlm_peak_allocated_bytes(int device, int64_t* out) {
  *out = -1;
  return mlm::guard("unknown C++ exception reading the device allocator's statistics", [&] {
    const auto stats = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    *out = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  });
}

extern "C" char* mlm_pinned_copy(const at::Tensor* t, at::Tensor** out) {
  *out = nullptr;
  return mlm::guard("unknown C++ exception pinning host memory", [&] {
    if (at::globalContext().hasCUDA()) *out = new at::Tensor(t->pin_memory());
  });
}
