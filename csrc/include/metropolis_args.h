// Argument checks and memory layout of the metropolis ops, shared by the CPU kernels
// (csrc/cpu/metropolis.cpp) and the CUDA glue (csrc/cuda/metropolis_binding.cpp), so both devices accept and
// reject the same calls with the same messages. The Python layer (fastscore/ops/metropolis.py) validates
// first and names the public arguments; these are the safety net for direct torch.ops.fastscore_C calls.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <initializer_list>

#include "checks.h"

namespace fastscore {
namespace mh {

// A sample's layout (checks.h): (N, ...) contiguous, or (N, C, H, W) channels_last.
using Layout = SampleLayout;

// The 1024-element pieces a sample is split into for the per-sample sums (kPiece of metropolis_math.h).
inline int64_t pieces(const Layout& l) { return (l.D + 1023) / 1024; }

// A per-sample vector: (N,) contiguous of `dtype` on x's device.
inline void check_vector(const at::Tensor& t, const at::Tensor& x, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0), name, ": expected shape (", x.size(0), "), got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// Tensors an op writes must not share memory with anything it reads (or writes through another argument).
inline void check_apart(std::initializer_list<const at::Tensor*> written, std::initializer_list<const at::Tensor*> all) {
  for (const at::Tensor* w : written) {
    if (w == nullptr) continue;
    for (const at::Tensor* t : all) {
      if (t != nullptr && t != w) at::assert_no_overlap(*w, *t);
    }
  }
}

// metropolis_propose: x, score, x_out (and p_out) laid out as x; coef (N, 3); sq_out (N,) float64.
inline Layout check_propose(const at::Tensor& x, const at::Tensor& score, const at::Tensor& coef,
                            int64_t sample_offset, const at::Tensor& x_out, const c10::optional<at::Tensor>& p_out,
                            const at::Tensor& sq_out) {
  const Layout l = sample_layout_of(x, "x");
  check_like(score, x, "score");
  check_like(x_out, x, "x_out");
  if (p_out.has_value()) check_like(*p_out, x, "p_out");
  check_coef(coef, x, l.N);
  check_vector(sq_out, x, "sq_out", at::kDouble);
  check_sample_offset(sample_offset);
  const at::Tensor* p = p_out.has_value() ? &*p_out : nullptr;
  check_apart({&x_out, p, &sq_out}, {&x, &score, &coef, &x_out, p, &sq_out});
  return l;
}

// metropolis_leapfrog: x, p (both updated), score laid out as x; coef (N, 3).
inline Layout check_leapfrog(const at::Tensor& x, const at::Tensor& p, const at::Tensor& score,
                             const at::Tensor& coef) {
  const Layout l = sample_layout_of(x, "x");
  check_like(p, x, "p");
  check_like(score, x, "score");
  check_coef(coef, x, l.N);
  check_apart({&x, &p}, {&x, &p, &score, &coef});
  return l;
}

// metropolis_accept: x, score (updated), x_prop, score_prop (and p) laid out as x; energies, sq, log_alpha (N,)
// float64; accepted (N,) bool; coef (N, 3).
inline Layout check_accept(const at::Tensor& x, const at::Tensor& score, const at::Tensor& energy,
                           const at::Tensor& x_prop, const at::Tensor& score_prop, const at::Tensor& energy_prop,
                           const c10::optional<at::Tensor>& p, const at::Tensor& sq, const at::Tensor& coef,
                           int64_t sample_offset, const at::Tensor& accepted, const at::Tensor& log_alpha) {
  const Layout l = sample_layout_of(x, "x");
  check_like(score, x, "score");
  check_like(x_prop, x, "x_prop");
  check_like(score_prop, x, "score_prop");
  if (p.has_value()) check_like(*p, x, "p");
  check_vector(energy, x, "energy", at::kDouble);
  check_vector(energy_prop, x, "energy_prop", at::kDouble);
  check_vector(sq, x, "sq", at::kDouble);
  check_vector(accepted, x, "accepted", at::kBool);
  check_vector(log_alpha, x, "log_alpha", at::kDouble);
  check_coef(coef, x, l.N);
  check_sample_offset(sample_offset);
  TORCH_CHECK_VALUE(sample_offset <= INT64_MAX - l.N, "sample_offset: the sample index exceeds 2^63");
  const at::Tensor* pp = p.has_value() ? &*p : nullptr;
  check_apart({&x, &score, &energy, &accepted, &log_alpha},
              {&x, &score, &energy, &x_prop, &score_prop, &energy_prop, pp, &sq, &coef, &accepted, &log_alpha});
  return l;
}

}  // namespace mh
}  // namespace fastscore
