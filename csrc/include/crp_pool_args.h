// Argument checks of the crp_pool ops, shared by the CPU kernels (csrc/cpu/crp_pool.cpp) and the CUDA
// glue (csrc/cuda/crp_pool_binding.cpp), so both devices accept and reject the same calls with the same
// messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "checks.h"
#include "crp_pool_math.h"

namespace fastscore {
namespace crp {

inline int parse_mode(c10::string_view mode) {
  if (mode == "max") return kMax;
  if (mode == "avg") return kAvg;
  TORCH_CHECK_VALUE(false, "mode: expected 'max' or 'avg', got '", std::string(mode), "'");
  return kMax;
}

// Every check of each op: x (N, C, H, W) contiguous or channels_last, the other tensor laid out as x.
// Each returns the mode's code.

// crp_pool_fwd
inline int check_fwd(const at::Tensor& x, c10::string_view mode) {
  check_image(x, "x");
  return parse_mode(mode);
}

// crp_pool_bwd
inline int check_bwd(const at::Tensor& grad_out, const at::Tensor& x, c10::string_view mode) {
  check_image(x, "x");
  check_like(grad_out, x, "grad_out");
  return parse_mode(mode);
}

// crp_pool_jvp
inline int check_jvp(const at::Tensor& x, const at::Tensor& x_t, c10::string_view mode) {
  check_image(x, "x");
  check_like(x_t, x, "x_t");
  return parse_mode(mode);
}

}  // namespace crp
}  // namespace fastscore
