// The shims' error messages (shims.h): allocated here by `mlm_message`, freed
// here by `mlm_free_message`, which Rust calls once per message.
#include "shims.h"

#include <cstdlib>
#include <cstring>

namespace {

// What a failure says when its message cannot be allocated; never freed.
char out_of_memory[] = "out of memory (the error's message could not be allocated)";

}  // namespace

extern "C" char* mlm_message(const char* what) {
  char* m = static_cast<char*>(std::malloc(std::strlen(what) + 1));
  if (m == nullptr) return out_of_memory;
  std::strcpy(m, what);
  return m;
}

extern "C" void mlm_free_message(char* message) {
  if (message != out_of_memory) std::free(message);
}
