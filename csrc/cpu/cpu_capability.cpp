// Which copy of the hot loops runs (csrc/include/cpu_kernel_utils.h): the CPU's x86-64 level, read once
// at load time, and the level currently chosen. The policy (ATen's capability, FASTSCORE_CPU_CAPABILITY)
// lives in fastscore/_backend.py; this file only knows what the CPU can run and refuses anything more.
#include <torch/library.h>

#include <atomic>
#include <string>
#include <vector>

#include "cpu_kernel_utils.h"

namespace fastscore {
namespace cpu {
namespace {

const char* name_of(Capability c) {
  switch (c) {
    case Capability::kAvx512:
      return "avx512";
    case Capability::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

// The widest level this build has a copy for and this CPU can run.
Capability widest_supported() {
#if defined(FS_CPU_CAPABILITIES)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return Capability::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return Capability::kAvx2;
#endif
  return Capability::kDefault;
}

const Capability kWidest = widest_supported();

// Read on every kernel call, written only by set_cpu_capability (tests, fastscore's import): relaxed is
// enough, a kernel running while the level changes finishes with whichever copy it started.
std::atomic<int> g_capability{int(kWidest)};

}  // namespace

Capability cpu_capability() { return Capability(g_capability.load(std::memory_order_relaxed)); }

std::string cpu_capability_name() { return name_of(cpu_capability()); }

std::vector<std::string> supported_cpu_capabilities() {
  std::vector<std::string> names;
  for (int c = int(kWidest); c >= 0; --c) names.push_back(name_of(Capability(c)));
  return names;
}

void set_cpu_capability(const std::string& name) {
  for (int c = int(kWidest); c >= 0; --c) {
    if (name == name_of(Capability(c))) {
      g_capability.store(c, std::memory_order_relaxed);
      return;
    }
  }
  std::string supported;
  for (const auto& s : supported_cpu_capabilities()) supported += (supported.empty() ? "" : ", ") + s;
  const bool known = name == "avx512" || name == "avx2" || name == "default";
  TORCH_CHECK_VALUE(false, "CPU capability ", name, ": ",
                    known ? "this CPU (or this build) cannot run it" : "unknown (expected avx512, avx2 or default)",
                    "; supported here: ", supported);
}

}  // namespace cpu
}  // namespace fastscore
