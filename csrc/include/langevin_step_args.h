// Argument checks and memory layout of the langevin_step ops, shared by the CPU kernels
// (csrc/cpu/langevin_step.cpp) and the CUDA glue (csrc/cuda/langevin_step_binding.cpp), so both
// devices accept and reject the same calls with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include "checks.h"

namespace fastscore {
namespace lgv {

// A sample's layout (checks.h): (N, ...) contiguous, or (N, C, H, W) channels_last.
using Layout = SampleLayout;

// mask / known: (1 or N, ...) in x's layout; returns the sample stride (0 when shared).
inline int64_t check_broadcast_rows(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == x.dim() && (t.size(0) == 1 || t.size(0) == x.size(0)) &&
                        t.sizes().slice(1) == x.sizes().slice(1),
                    name, ": expected shape (1 or N, ", x.sizes().slice(1), "), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(), ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(), ", got ", t.device());
  const bool ok = x.is_contiguous() ? t.is_contiguous() : t.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK_VALUE(ok, name, ": expected the memory layout of x");
  return t.size(0) == 1 ? 0 : t.numel() / t.size(0);
}

struct UpdateShape {
  Layout l;
  int64_t mask_sn = 0, known_sn = 0;  // sample strides of mask / known (0: shared by all samples)
};

// Every check of langevin_step_update: the tensors laid out as x, coef (N, 3) in the accumulation
// dtype, mask and known together, and no overlap that the in-place update would get wrong.
inline UpdateShape check_update(const at::Tensor& x, const at::Tensor& score, const at::Tensor& coef,
                                const c10::optional<at::Tensor>& noise, int64_t sample_offset,
                                const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& known,
                                const c10::optional<at::Tensor>& x_mean) {
  UpdateShape s;
  s.l = sample_layout_of(x, "x");
  check_like(score, x, "score");
  if (noise.has_value()) check_like(*noise, x, "noise");
  if (x_mean.has_value()) check_like(*x_mean, x, "x_mean");
  check_coef(coef, x, s.l.N);
  TORCH_CHECK_VALUE(mask.has_value() == known.has_value(), "mask and known: expected both or neither");
  check_sample_offset(sample_offset);
  if (mask.has_value()) {
    s.mask_sn = check_broadcast_rows(*mask, x, "mask");
    s.known_sn = check_broadcast_rows(*known, x, "known");
  }
  // Every element is read and then written at the same index; only a partial overlap would go wrong.
  for (const at::Tensor* t : {&score, noise ? &*noise : nullptr, mask ? &*mask : nullptr, known ? &*known : nullptr}) {
    if (t != nullptr && !t->is_same(x)) at::assert_no_partial_overlap(x, *t);
  }
  if (x_mean.has_value()) at::assert_no_overlap(*x_mean, x);
  return s;
}

// langevin_step_norms: score (N, ...), noise (when given) laid out as score, out (N, P, 2) float64 contiguous
// with P >= 1, on score's device and apart from both inputs.
inline Layout check_norms(const at::Tensor& score, const c10::optional<at::Tensor>& noise, int64_t sample_offset,
                          const at::Tensor& out) {
  const Layout l = sample_layout_of(score, "score");
  if (noise.has_value()) check_like(*noise, score, "noise");
  check_sample_offset(sample_offset);
  TORCH_CHECK_VALUE(out.dim() == 3 && out.size(0) == l.N && out.size(1) >= 1 && out.size(2) == 2,
                    "out: expected an (", l.N, ", P, 2) tensor with P >= 1, got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == at::kDouble, "out: expected dtype float64, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == score.device(), "out: expected device ", score.device(), ", got ", out.device());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out: expected a contiguous tensor");
  at::assert_no_overlap(out, score);
  if (noise.has_value()) at::assert_no_overlap(out, *noise);
  return l;
}

// langevin_step_randn: out (N, ...) contiguous.
inline Layout check_randn(const at::Tensor& out, int64_t sample_offset) {
  const Layout l = sample_layout_of(out, "out");
  TORCH_CHECK_VALUE(out.is_contiguous(), "out: expected a contiguous tensor");
  check_sample_offset(sample_offset);
  return l;
}

}  // namespace lgv
}  // namespace fastscore
