// InstanceNorm++ for the CUDA dispatch key: the torch side of cond_instance_norm.cu. Same checks,
// outputs and semantics as csrc/cpu/cond_instance_norm.cpp; the kernels take raw pointers, so this
// file only checks, allocates and maps at::Half / at::BFloat16 onto __half / __nv_bfloat16 (same
// bits). Built only with a CUDA build of torch (setup.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "checks.h"
#include "common_math.h"
#include "cond_instance_norm.cuh"
#include "cond_instance_norm_args.h"

namespace fastscore {
namespace cuda {
namespace {

template <typename A>
CinRows<A> rows_of(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return {};
  return {t->data_ptr<A>(), t->stride(0), t->stride(1)};
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
  const int act_code = cin::check_fwd(x, gamma, alpha, beta, act);
  at::Tensor out = at::empty_like(x);
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_type_of(x)));
  at::Tensor rstd = at::empty_like(mean);
  fwd_into(x, gamma, alpha, beta, eps, act_code, out, mean, rstd);
  return {out, mean, rstd};
}

void cond_instance_norm_fwd_out(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
                                const c10::optional<at::Tensor>& beta, double eps, c10::string_view act,
                                at::Tensor out) {
  // out may be x itself: the map kernel reads then writes each element in one thread.
  const int act_code = cin::check_fwd_out(x, gamma, alpha, beta, act, out);
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_type_of(x)));
  at::Tensor rstd = at::empty_like(mean);
  fwd_into(x, gamma, alpha, beta, eps, act_code, out, mean, rstd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cond_instance_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
    const c10::optional<at::Tensor>& beta, const at::Tensor& mean, const at::Tensor& rstd, double eps,
    c10::string_view act) {
  const int act_code = cin::check_bwd(grad_out, x, gamma, alpha, beta, mean, rstd, act);
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
  const int act_code = cin::check_jvp(x, gamma, alpha, beta, mean, rstd, x_t, gamma_t, alpha_t, beta_t, act);
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
