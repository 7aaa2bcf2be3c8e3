// Langevin / SDE sampler updates for the CUDA dispatch key: the torch side of langevin_step.cu. Same
// checks and semantics as csrc/cpu/langevin_step.cpp; the kernels take raw pointers, so this file only
// checks and maps at::Half / at::BFloat16 onto __half / __nv_bfloat16 (same bits). Built only
// with a CUDA build of torch (setup.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "binding_utils.h"
#include "checks.h"
#include "langevin_step_args.h"
#include "langevin_step.cuh"

namespace fastscore {
namespace cuda {
namespace {

using namespace fastscore::lgv;

#define FS_DISPATCH_LGV(t, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (t).scalar_type(), "langevin_step_cuda", __VA_ARGS__)

void langevin_step_update(at::Tensor x, const at::Tensor& score, const at::Tensor& coef,
                          const c10::optional<at::Tensor>& noise, int64_t seed, int64_t counter, int64_t sample_offset,
                          const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& known,
                          c10::optional<at::Tensor> x_mean) {
  const UpdateShape shape = check_update(x, score, coef, noise, sample_offset, mask, known, x_mean);
  const Layout& l = shape.l;
  const int64_t mask_sn = shape.mask_sn, known_sn = shape.known_sn;
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  FS_DISPATCH_LGV(x, [&] {
    using T = cuda_t<scalar_t>;
    using acc_t = typename LgvArgs<T>::acc_t;
    LgvArgs<T> p;
    p.N = l.N;
    p.D = l.D;
    p.L = l.L;
    p.row_stride = l.row_stride;
    p.es = l.es;
    p.x = ptr<scalar_t>(x);
    p.score = ptr<scalar_t>(score);
    p.noise = ptr<scalar_t>(noise);
    p.coef = coef.data_ptr<acc_t>();
    p.coef_stride = coef.stride(0);
    p.mask = ptr<scalar_t>(mask);
    p.known = ptr<scalar_t>(known);
    p.mask_sn = mask_sn;
    p.known_sn = known_sn;
    p.x_mean = x_mean.has_value() ? ptr<scalar_t>(*x_mean) : nullptr;
    p.seed = uint64_t(seed);
    p.counter = uint64_t(counter);
    p.e_base = uint64_t(sample_offset) * uint64_t(l.D);
    C10_CUDA_CHECK(lgv_update(p, c10::cuda::getCurrentCUDAStream().stream()));
  });
}

void langevin_step_norms(const at::Tensor& score, const c10::optional<at::Tensor>& noise, int64_t seed, int64_t counter,
                         int64_t sample_offset, at::Tensor out) {
  const Layout l = check_norms(score, noise, sample_offset, out);
  TORCH_CHECK_VALUE(l.N <= 65535, "score: at most 65535 samples per call on CUDA, got ", l.N);
  TORCH_CHECK_VALUE(out.size(1) <= 65535, "out: at most 65535 pieces per sample on CUDA, got ", out.size(1));
  if (l.N == 0) return;
  const c10::cuda::CUDAGuard guard(score.device());
  FS_DISPATCH_LGV(score, [&] {
    C10_CUDA_CHECK(lgv_norms(ptr<scalar_t>(score), ptr<scalar_t>(noise), l.N, l.D, out.size(1), uint64_t(seed),
                             uint64_t(counter), uint64_t(sample_offset) * uint64_t(l.D), out.data_ptr<double>(),
                             c10::cuda::getCurrentCUDAStream().stream()));
  });
}

void langevin_step_randn(at::Tensor out, int64_t seed, int64_t counter, int64_t sample_offset) {
  const Layout l = check_randn(out, sample_offset);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  FS_DISPATCH_LGV(out, [&] {
    C10_CUDA_CHECK(lgv_randn(ptr<scalar_t>(out), out.numel(), uint64_t(seed), uint64_t(counter),
                             uint64_t(sample_offset) * uint64_t(l.D), c10::cuda::getCurrentCUDAStream().stream()));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastscore_C, CUDA, m) {
  m.impl("langevin_step_update", &langevin_step_update);
  m.impl("langevin_step_norms", &langevin_step_norms);
  m.impl("langevin_step_randn", &langevin_step_randn);
}

}  // namespace cuda
}  // namespace fastscore
