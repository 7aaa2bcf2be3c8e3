// ELU for the CUDA dispatch key: the torch side of elu.cu. Same checks, outputs and semantics as
// csrc/cpu/elu.cpp; the kernels take raw pointers, so this file only checks, allocates and maps
// at::Half / at::BFloat16 onto __half / __nv_bfloat16 (same bits). Built only with a CUDA build of
// torch (setup.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "checks.h"
#include "elu.cuh"
#include "elu_args.h"

namespace fastscore {
namespace cuda {
namespace {

#define FS_DISPATCH_ELU(x, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (x).scalar_type(), "elu_cuda", __VA_ARGS__)

void fwd_into(const at::Tensor& x, const at::Tensor& dst) {
  const c10::cuda::CUDAGuard guard(x.device());
  FS_DISPATCH_ELU(x, [&] {
    C10_CUDA_CHECK(
        elu_fwd(ptr<scalar_t>(x), ptr<scalar_t>(dst), x.numel(), c10::cuda::getCurrentCUDAStream().stream()));
  });
}

at::Tensor scaled(const at::Tensor& x, const at::Tensor& v) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dst = at::empty_like(x);  // x's strides (x is dense)
  FS_DISPATCH_ELU(x, [&] {
    C10_CUDA_CHECK(elu_scale(ptr<scalar_t>(x), ptr<scalar_t>(v), ptr<scalar_t>(dst), x.numel(),
                             c10::cuda::getCurrentCUDAStream().stream()));
  });
  return dst;
}

// The argument checks (elu::check_fwd, ...) are in csrc/include/elu_args.h, shared with CPU.

at::Tensor elu_fwd_cuda(const at::Tensor& x) {
  elu::check_fwd(x);
  at::Tensor out = at::empty_like(x);
  fwd_into(x, out);
  return out;
}

void elu_fwd_out_cuda(const at::Tensor& x, at::Tensor out) {
  elu::check_fwd_out(x, out);  // out may be x (in place)
  fwd_into(x, out);
}

at::Tensor elu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x) {
  elu::check_bwd(grad_out, x);
  return scaled(x, grad_out);
}

at::Tensor elu_jvp_cuda(const at::Tensor& x, const at::Tensor& x_t) {
  elu::check_jvp(x, x_t);
  return scaled(x, x_t);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastscore_C, CUDA, m) {
  m.impl("elu_fwd", &elu_fwd_cuda);
  m.impl("elu_fwd_out", &elu_fwd_out_cuda);
  m.impl("elu_bwd", &elu_bwd_cuda);
  m.impl("elu_jvp", &elu_jvp_cuda);
}

}  // namespace cuda
}  // namespace fastscore
