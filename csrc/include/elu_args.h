// Argument checks of the elu ops, shared by the CPU kernels (csrc/cpu/elu.cpp) and the CUDA glue
// (csrc/cuda/elu_binding.cpp), so both devices accept and reject the same calls with the same messages.
//
// The op is elementwise: x is any dense, non-overlapping floating-point tensor, and every other tensor
// has x's strides, so element e of the flat storage is the same element of each.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "checks.h"

namespace fastscore {
namespace elu {

// elu_fwd
inline void check_fwd(const at::Tensor& x) { check_dense_float(x, "x"); }

// elu_fwd_out. out may be x (or another view of exactly x's memory): every kernel reads each element
// before it writes it at the same index. A partial overlap would read elements already overwritten.
inline void check_fwd_out(const at::Tensor& x, const at::Tensor& out) {
  check_dense_float(x, "x");
  check_same_strides(out, x, "out");
  if (!out.is_same(x)) at::assert_no_partial_overlap(out, x);
}

// elu_bwd
inline void check_bwd(const at::Tensor& grad_out, const at::Tensor& x) {
  check_dense_float(x, "x");
  check_same_strides(grad_out, x, "grad_out");
}

// elu_jvp
inline void check_jvp(const at::Tensor& x, const at::Tensor& x_t) {
  check_dense_float(x, "x");
  check_same_strides(x_t, x, "x_t");
}

}  // namespace elu
}  // namespace fastscore
