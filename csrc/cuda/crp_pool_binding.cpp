// RefineNet CRP pooling for the CUDA dispatch key: the torch side of crp_pool.cu. Same checks,
// outputs and semantics as csrc/cpu/crp_pool.cpp; the kernels take raw pointers, so this file only
// checks, allocates and maps at::Half / at::BFloat16 onto __half / __nv_bfloat16 (same bits).
// Built only with a CUDA build of torch (setup.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "checks.h"
#include "crp_pool.cuh"
#include "crp_pool_args.h"
#include "crp_pool_math.h"

namespace fastscore {
namespace cuda {
namespace {

template <typename S>
CrpArgs<cuda_t<S>> make_args(const at::Tensor& x, int mode) {
  CrpArgs<cuda_t<S>> p;
  p.N = x.size(0);
  p.C = x.size(1);
  p.H = x.size(2);
  p.W = x.size(3);
  p.channels_last = is_channels_last(x);
  p.mode = mode;
  p.x = ptr<S>(x);
  return p;
}

#define FS_DISPATCH_CRP(x, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (x).scalar_type(), "crp_pool_cuda", __VA_ARGS__)

at::Tensor crp_pool_fwd(const at::Tensor& x, c10::string_view mode) {
  const int m = crp::check_fwd(x, mode);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  FS_DISPATCH_CRP(x, [&] {
    auto p = make_args<scalar_t>(x, m);
    p.dst = ptr<scalar_t>(out);
    C10_CUDA_CHECK(crp_fwd(p, c10::cuda::getCurrentCUDAStream().stream()));
  });
  return out;
}

at::Tensor crp_pool_bwd(const at::Tensor& grad_out, const at::Tensor& x, c10::string_view mode) {
  const int m = crp::check_bwd(grad_out, x, mode);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  const auto bytes = crp_bwd_workspace_bytes(x.size(0), x.size(1), x.size(2), x.size(3), m);
  at::Tensor work = at::empty({int64_t(bytes)}, x.options().dtype(at::kByte));
  FS_DISPATCH_CRP(x, [&] {
    auto p = make_args<scalar_t>(x, m);
    p.in2 = ptr<scalar_t>(grad_out);
    p.dst = ptr<scalar_t>(grad_x);
    p.workspace = bytes > 0 ? work.data_ptr() : nullptr;
    C10_CUDA_CHECK(crp_bwd(p, c10::cuda::getCurrentCUDAStream().stream()));
  });
  return grad_x;
}

at::Tensor crp_pool_jvp(const at::Tensor& x, const at::Tensor& x_t, c10::string_view mode) {
  const int m = crp::check_jvp(x, x_t, mode);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out_t = at::empty_like(x);
  FS_DISPATCH_CRP(x, [&] {
    auto p = make_args<scalar_t>(x, m);
    p.in2 = ptr<scalar_t>(x_t);
    p.dst = ptr<scalar_t>(out_t);
    C10_CUDA_CHECK(crp_jvp(p, c10::cuda::getCurrentCUDAStream().stream()));
  });
  return out_t;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastscore_C, CUDA, m) {
  m.impl("crp_pool_fwd", &crp_pool_fwd);
  m.impl("crp_pool_bwd", &crp_pool_bwd);
  m.impl("crp_pool_jvp", &crp_pool_jvp);
}

}  // namespace cuda
}  // namespace fastscore
