// InstanceNorm++ for the CUDA dispatch key: the torch side of cond_instance_norm.cu. Same checks,
// outputs and semantics as csrc/cpu/cond_instance_norm.cpp; the kernels take raw pointers, so this
// file only checks, allocates and maps at::Half / at::BFloat16 onto __half / __nv_bfloat16 (same
// bits). Built only with a CUDA build of torch (setup.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "checks.h"
#include "common_math.h"
#include "cond_instance_norm.cuh"

namespace fastscore {
namespace cuda {
namespace {

template <typename A>
CinRows<A> rows_of(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return {};
  return {t->data_ptr<A>(), t->stride(0), t->stride(1)};
}

int parse_act(c10::string_view act) {
  if (act == "none") return kActNone;
  if (act == "elu") return kActElu;
  TORCH_CHECK_VALUE(false, "act: expected 'none' or 'elu', got '", std::string(act), "'");
  return kActNone;
}

at::ScalarType acc_type_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
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

void check_stats(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd) {
  check_rows(mean, "mean", x.size(0), x.size(1), acc_type_of(x), x.device());
  check_rows(rstd, "rstd", x.size(0), x.size(1), acc_type_of(x), x.device());
  TORCH_CHECK_VALUE(mean.is_contiguous() && rstd.is_contiguous(), "mean, rstd: expected contiguous tensors");
}

// The fields every direction shares, plus a workspace (kept alive by `work`) on x's device.
template <typename S>
CinArgs<cuda_t<S>> make_args(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
                             const c10::optional<at::Tensor>& beta, double eps, int act, const at::Tensor& mean,
                             const at::Tensor& rstd, at::Tensor& work) {
  using T = cuda_t<S>;
  using acc_t = typename CinArgs<T>::acc_t;
  CinArgs<T> p;
  p.N = x.size(0);
  p.C = x.size(1);
  p.HW = x.size(2) * x.size(3);
  p.channels_last = is_channels_last(x);
  p.act = act;
  p.eps = acc_t(eps);
  p.x = ptr<S>(x);
  p.gamma = rows_of<acc_t>(gamma);
  p.alpha = rows_of<acc_t>(alpha);
  p.beta = rows_of<acc_t>(beta);
  p.mean = mean.data_ptr<acc_t>();
  p.rstd = rstd.data_ptr<acc_t>();
  const auto bytes = cin_workspace_bytes<T>(p.N, p.C, p.HW, p.channels_last);
  work = at::empty({int64_t(bytes)}, x.options().dtype(at::kByte));
  p.workspace = work.data_ptr();
  return p;
}

#define FS_DISPATCH_CIN(x, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (x).scalar_type(), "cond_instance_norm_cuda", __VA_ARGS__)

void fwd_into(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
              const c10::optional<at::Tensor>& beta, double eps, int act, const at::Tensor& out,
              const at::Tensor& mean, const at::Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor work;
  FS_DISPATCH_CIN(x, [&] {
    auto p = make_args<scalar_t>(x, gamma, alpha, beta, eps, act, mean, rstd, work);
    p.out = ptr<scalar_t>(out);
    C10_CUDA_CHECK(cin_fwd(p, c10::cuda::getCurrentCUDAStream().stream()));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cond_instance_norm_fwd(const at::Tensor& x, const at::Tensor& gamma,
                                                                      const c10::optional<at::Tensor>& alpha,
                                                                      const c10::optional<at::Tensor>& beta,
                                                                      double eps, c10::string_view act) {
  check_inputs(x, gamma, alpha, beta);
  const int act_code = parse_act(act);
  at::Tensor out = at::empty_like(x);
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_type_of(x)));
  at::Tensor rstd = at::empty_like(mean);
  fwd_into(x, gamma, alpha, beta, eps, act_code, out, mean, rstd);
  return {out, mean, rstd};
}

void cond_instance_norm_fwd_out(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
                                const c10::optional<at::Tensor>& beta, double eps, c10::string_view act,
                                at::Tensor out) {
  check_inputs(x, gamma, alpha, beta);
  check_like(out, x, "out");
  // out may be x itself: the map kernel reads then writes each element in one thread. A partial
  // overlap would read already-normalised values.
  if (!out.is_same(x)) at::assert_no_partial_overlap(out, x);
  const int act_code = parse_act(act);
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_type_of(x)));
  at::Tensor rstd = at::empty_like(mean);
  fwd_into(x, gamma, alpha, beta, eps, act_code, out, mean, rstd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cond_instance_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
    const c10::optional<at::Tensor>& beta, const at::Tensor& mean, const at::Tensor& rstd, double eps,
    c10::string_view act) {
  check_inputs(x, gamma, alpha, beta);
  check_like(grad_out, x, "grad_out");
  check_stats(x, mean, rstd);
  const int act_code = parse_act(act);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_gamma = at::empty_like(mean);
  at::Tensor grad_alpha = alpha.has_value() ? at::empty_like(mean) : at::empty({0}, mean.options());
  at::Tensor grad_beta = beta.has_value() ? at::empty_like(mean) : at::empty({0}, mean.options());
  at::Tensor work;
  FS_DISPATCH_CIN(x, [&] {
    using acc_t = typename CinArgs<cuda_t<scalar_t>>::acc_t;
    auto p = make_args<scalar_t>(x, gamma, alpha, beta, eps, act_code, mean, rstd, work);
    p.grad_out = ptr<scalar_t>(grad_out);
    p.grad_x = ptr<scalar_t>(grad_x);
    p.grad_gamma = grad_gamma.data_ptr<acc_t>();
    p.grad_alpha = alpha.has_value() ? grad_alpha.data_ptr<acc_t>() : nullptr;
    p.grad_beta = beta.has_value() ? grad_beta.data_ptr<acc_t>() : nullptr;
    C10_CUDA_CHECK(cin_bwd(p, c10::cuda::getCurrentCUDAStream().stream()));
  });
  return {grad_x, grad_gamma, grad_alpha, grad_beta};
}

at::Tensor cond_instance_norm_jvp(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
                                  const c10::optional<at::Tensor>& beta, const at::Tensor& mean,
                                  const at::Tensor& rstd, const c10::optional<at::Tensor>& x_t,
                                  const c10::optional<at::Tensor>& gamma_t, const c10::optional<at::Tensor>& alpha_t,
                                  const c10::optional<at::Tensor>& beta_t, double eps, c10::string_view act) {
  check_inputs(x, gamma, alpha, beta);
  check_stats(x, mean, rstd);
  if (x_t.has_value()) check_like(*x_t, x, "x_t");
  const auto acc = acc_type_of(x);
  check_optional_rows(gamma_t, "gamma_t", x.size(0), x.size(1), acc, x.device());
  check_optional_rows(alpha_t, "alpha_t", x.size(0), x.size(1), acc, x.device());
  check_optional_rows(beta_t, "beta_t", x.size(0), x.size(1), acc, x.device());
  const int act_code = parse_act(act);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out_t = at::empty_like(x);
  at::Tensor work;
  FS_DISPATCH_CIN(x, [&] {
    using acc_t = typename CinArgs<cuda_t<scalar_t>>::acc_t;
    auto p = make_args<scalar_t>(x, gamma, alpha, beta, eps, act_code, mean, rstd, work);
    p.x_t = ptr<scalar_t>(x_t);
    p.gamma_t = rows_of<acc_t>(gamma_t);
    p.alpha_t = rows_of<acc_t>(alpha_t);
    p.beta_t = rows_of<acc_t>(beta_t);
    p.out_t = ptr<scalar_t>(out_t);
    C10_CUDA_CHECK(cin_jvp(p, c10::cuda::getCurrentCUDAStream().stream()));
  });
  return out_t;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastscore_C, CUDA, m) {
  m.impl("cond_instance_norm_fwd", &cond_instance_norm_fwd);
  m.impl("cond_instance_norm_fwd_out", &cond_instance_norm_fwd_out);
  m.impl("cond_instance_norm_bwd", &cond_instance_norm_bwd);
  m.impl("cond_instance_norm_jvp", &cond_instance_norm_jvp);
}

}  // namespace cuda
}  // namespace fastscore
