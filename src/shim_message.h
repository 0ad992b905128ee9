// Error messages of our C++ shims (src/train/optimizer/fused_adamw.cpp,
// src/model/linear_f32.cpp): a C++ exception never crosses into Rust; it comes
// back as a malloc'd copy of its message, which Rust reads and frees with
// `mlm_free_message` (src/device.rs, `take_shim_message`).
#pragma once

#include <cstdlib>
#include <cstring>

// A malloc'd copy of `what`, or null when allocation fails.
inline char* mlm_message(const char* what) {
  char* m = static_cast<char*>(std::malloc(std::strlen(what) + 1));
  if (m != nullptr) std::strcpy(m, what);
  return m;
}
