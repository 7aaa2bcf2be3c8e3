// Argument checks of the cond_instance_norm ops, shared by the CPU kernels
// (csrc/cpu/cond_instance_norm.cpp) and the CUDA glue (csrc/cuda/cond_instance_norm_binding.cpp), so
// both devices accept and reject the same calls with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <string>

#include "checks.h"
#include "common_math.h"

namespace fastscore {
namespace cin {

inline int parse_act(c10::string_view act) {
  if (act == "none") return kActNone;
  if (act == "elu") return kActElu;
  TORCH_CHECK_VALUE(false, "act: expected 'none' or 'elu', got '", std::string(act), "'");
  return kActNone;
}

// x (N, C, H, W) contiguous or channels_last with H * W > 0; gamma, alpha, beta (N, C) rows in the
// accumulation dtype on x's device; alpha (mean reinjection) needs C >= 2.
inline void check_inputs(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
                         const c10::optional<at::Tensor>& beta) {
  check_image(x, "x");
  const auto acc = acc_type_of(x);
  check_rows(gamma, "gamma", x.size(0), x.size(1), acc, x.device());
  check_optional_rows(alpha, "alpha", x.size(0), x.size(1), acc, x.device());
  check_optional_rows(beta, "beta", x.size(0), x.size(1), acc, x.device());
  TORCH_CHECK_VALUE(!alpha.has_value() || x.size(1) > 1,
                    "x: mean reinjection (alpha) needs at least 2 channels (the variance across channel means "
                    "divides by C - 1), got C = 1");
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) > 0, "x: H * W must be positive");
}

// The saved statistics: (N, C) contiguous in the accumulation dtype.
inline void check_stats(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd) {
  check_rows(mean, "mean", x.size(0), x.size(1), acc_type_of(x), x.device());
  check_rows(rstd, "rstd", x.size(0), x.size(1), acc_type_of(x), x.device());
  TORCH_CHECK_VALUE(mean.is_contiguous() && rstd.is_contiguous(), "mean, rstd: expected contiguous tensors");
}

// Every check of each op, in the order both devices run them; each returns the activation's code.

// cond_instance_norm_fwd
inline int check_fwd(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
                     const c10::optional<at::Tensor>& beta, c10::string_view act) {
  check_inputs(x, gamma, alpha, beta);
  return parse_act(act);
}

// cond_instance_norm_fwd_out: out laid out as x. out may be x itself (in place): every kernel reads
// an element's value before it writes that element, at the same index. A partial overlap would read
// already-normalised values.
inline int check_fwd_out(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
                         const c10::optional<at::Tensor>& beta, c10::string_view act, const at::Tensor& out) {
  check_inputs(x, gamma, alpha, beta);
  check_like(out, x, "out");
  if (!out.is_same(x)) at::assert_no_partial_overlap(out, x);
  return parse_act(act);
}

// cond_instance_norm_bwd
inline int check_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gamma,
                     const c10::optional<at::Tensor>& alpha, const c10::optional<at::Tensor>& beta,
                     const at::Tensor& mean, const at::Tensor& rstd, c10::string_view act) {
  check_inputs(x, gamma, alpha, beta);
  check_like(grad_out, x, "grad_out");
  check_stats(x, mean, rstd);
  return parse_act(act);
}

// cond_instance_norm_jvp: x_t laid out as x; gamma_t, alpha_t, beta_t (N, C) rows like gamma.
inline int check_jvp(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
                     const c10::optional<at::Tensor>& beta, const at::Tensor& mean, const at::Tensor& rstd,
                     const c10::optional<at::Tensor>& x_t, const c10::optional<at::Tensor>& gamma_t,
                     const c10::optional<at::Tensor>& alpha_t, const c10::optional<at::Tensor>& beta_t,
                     c10::string_view act) {
  check_inputs(x, gamma, alpha, beta);
  check_stats(x, mean, rstd);
  if (x_t.has_value()) check_like(*x_t, x, "x_t");
  const auto acc = acc_type_of(x);
  check_optional_rows(gamma_t, "gamma_t", x.size(0), x.size(1), acc, x.device());
  check_optional_rows(alpha_t, "alpha_t", x.size(0), x.size(1), acc, x.device());
  check_optional_rows(beta_t, "beta_t", x.size(0), x.size(1), acc, x.device());
  return parse_act(act);
}

}  // namespace cin
}  // namespace fastscore
