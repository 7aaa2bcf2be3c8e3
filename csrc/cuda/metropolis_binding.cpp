// MALA / HMC steps for the CUDA dispatch key: the torch side of metropolis.cu. Same checks
// (csrc/include/metropolis_args.h) and semantics as csrc/cpu/metropolis.cpp; the kernels take raw pointers, so
// this file only checks, allocates the per-piece workspace and maps at::Half / at::BFloat16 onto __half /
// __nv_bfloat16 (same bits). Built only with a CUDA build of torch (setup.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "checks.h"
#include "metropolis.cuh"
#include "metropolis_args.h"

namespace fastscore {
namespace cuda {
namespace {

using namespace fastscore::mh;

#define FS_DISPATCH_MH(t, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (t).scalar_type(), "metropolis_cuda", __VA_ARGS__)

MhShape shape_of(const Layout& l, const at::Tensor& coef) {
  TORCH_CHECK_VALUE(l.N < (int64_t(1) << 31), "x: at most 2^31 - 1 samples per call on CUDA, got ", l.N);
  TORCH_CHECK_VALUE(pieces(l) <= 65535, "x: at most 65535 * 1024 elements per sample on CUDA, got ", l.D);
  MhShape s;
  s.N = l.N;
  s.D = l.D;
  s.L = l.L;
  s.row_stride = l.row_stride;
  s.es = l.es;
  s.P = pieces(l);
  s.coef_stride = coef.stride(0);
  return s;
}

void metropolis_propose(const at::Tensor& x, const at::Tensor& score, const at::Tensor& coef, int64_t seed,
                        int64_t counter, int64_t sample_offset, at::Tensor x_out, c10::optional<at::Tensor> p_out,
                        at::Tensor sq_out) {
  const Layout l = check_propose(x, score, coef, sample_offset, x_out, p_out, sq_out);
  if (l.N == 0) return;
  if (l.D == 0) {
    sq_out.zero_();
    return;
  }
  const MhShape s = shape_of(l, coef);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // With one piece per sample the pieces' sums are the samples'.
  at::Tensor partial = s.P == 1 ? sq_out : at::empty({s.N, s.P}, sq_out.options());
  FS_DISPATCH_MH(x, [&] {
    using T = cuda_t<scalar_t>;
    using acc_t = typename AccOf<T>::type;
    C10_CUDA_CHECK(mh_propose<T>(s, ptr<scalar_t>(x), ptr<scalar_t>(score), coef.data_ptr<acc_t>(),
                                 ptr<scalar_t>(x_out), p_out.has_value() ? ptr<scalar_t>(*p_out) : nullptr,
                                 partial.data_ptr<double>(), uint64_t(seed), uint64_t(counter),
                                 uint64_t(sample_offset) * uint64_t(l.D), stream));
  });
  if (s.P > 1) C10_CUDA_CHECK(mh_pieces(partial.data_ptr<double>(), s.N, s.P, sq_out.data_ptr<double>(), stream));
}

void metropolis_leapfrog(at::Tensor x, at::Tensor p, const at::Tensor& score, const at::Tensor& coef) {
  const Layout l = check_leapfrog(x, p, score, coef);
  if (l.N == 0 || l.D == 0) return;
  const MhShape s = shape_of(l, coef);
  const c10::cuda::CUDAGuard guard(x.device());
  FS_DISPATCH_MH(x, [&] {
    using T = cuda_t<scalar_t>;
    using acc_t = typename AccOf<T>::type;
    C10_CUDA_CHECK(mh_leapfrog<T>(s, ptr<scalar_t>(x), ptr<scalar_t>(p), ptr<scalar_t>(score),
                                  coef.data_ptr<acc_t>(), c10::cuda::getCurrentCUDAStream().stream()));
  });
}

void metropolis_accept(at::Tensor x, at::Tensor score, at::Tensor energy, const at::Tensor& x_prop,
                       const at::Tensor& score_prop, const at::Tensor& energy_prop, const c10::optional<at::Tensor>& p,
                       const at::Tensor& sq, const at::Tensor& coef, int64_t seed, int64_t counter,
                       int64_t sample_offset, at::Tensor accepted, at::Tensor log_alpha) {
  const Layout l = check_accept(x, score, energy, x_prop, score_prop, energy_prop, p, sq, coef, sample_offset,
                                accepted, log_alpha);
  if (l.N == 0) return;
  const MhShape s = shape_of(l, coef);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor partial = at::empty({s.N, std::max<int64_t>(s.P, 1)}, energy.options());
  FS_DISPATCH_MH(x, [&] {
    using T = cuda_t<scalar_t>;
    using acc_t = typename AccOf<T>::type;
    C10_CUDA_CHECK(mh_accept<T>(s, ptr<scalar_t>(x), ptr<scalar_t>(score), energy.data_ptr<double>(),
                                ptr<scalar_t>(x_prop), ptr<scalar_t>(score_prop), energy_prop.data_ptr<double>(),
                                ptr<scalar_t>(p), sq.data_ptr<double>(), coef.data_ptr<acc_t>(),
                                partial.data_ptr<double>(), accepted.data_ptr<bool>(), log_alpha.data_ptr<double>(),
                                uint64_t(seed), uint64_t(counter), uint64_t(sample_offset),
                                c10::cuda::getCurrentCUDAStream().stream()));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastscore_C, CUDA, m) {
  m.impl("metropolis_propose", &metropolis_propose);
  m.impl("metropolis_leapfrog", &metropolis_leapfrog);
  m.impl("metropolis_accept", &metropolis_accept);
}

}  // namespace cuda
}  // namespace fastscore
