// Langevin / SDE sampler updates for the CUDA dispatch key: the torch side of langevin_step.cu. Same
// checks and semantics as csrc/cpu/langevin_step.cpp; the kernels take raw pointers, so this file only
// checks, allocates and maps at::Half / at::BFloat16 onto __half / __nv_bfloat16 (same bits). Built only
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
#include "langevin_step.cuh"

namespace fastscore {
namespace cuda {
namespace {

#define FS_DISPATCH_LGV(t, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (t).scalar_type(), "langevin_step_cuda", __VA_ARGS__)

at::ScalarType acc_type_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

struct Layout {
  int64_t N = 0, D = 0, L = 1, row_stride = 1, es = 1;
};

// (N, ...) contiguous, or (N, C, H, W) channels_last: where logical element i of a sample sits.
Layout layout_of(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() >= 1, name, ": expected a tensor of shape (N, ...), got a 0-d tensor");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), name, ": expected a floating-point tensor, got ",
                   x.scalar_type());
  Layout l;
  l.N = x.size(0);
  l.D = x.size(0) ? x.numel() / x.size(0) : 0;
  if (x.is_contiguous()) {
    l.L = std::max<int64_t>(l.D, 1);
    l.row_stride = l.L;
    return l;
  }
  TORCH_CHECK_VALUE(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast), name,
                    ": expected a contiguous or channels_last tensor");
  l.L = x.size(2) * x.size(3);
  l.row_stride = 1;
  l.es = x.size(1);
  return l;
}

void check_same_layout(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, ": expected shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(), ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(), ", got ", t.device());
  const bool ok = x.is_contiguous() ? t.is_contiguous() : t.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK_VALUE(ok, name, ": expected the memory layout of x");
}

int64_t check_broadcast_rows(const at::Tensor& t, const at::Tensor& x, const char* name) {
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

void langevin_step_update(at::Tensor x, const at::Tensor& score, const at::Tensor& coef,
                          const c10::optional<at::Tensor>& noise, int64_t seed, int64_t counter, int64_t sample_offset,
                          const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& known,
                          c10::optional<at::Tensor> x_mean) {
  const Layout l = layout_of(x, "x");
  check_same_layout(score, x, "score");
  if (noise.has_value()) check_same_layout(*noise, x, "noise");
  if (x_mean.has_value()) check_same_layout(*x_mean, x, "x_mean");
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == l.N && coef.size(1) == 3 && coef.stride(1) == 1,
                    "coef: expected an (", l.N, ", 3) tensor with unit column stride, got ", coef.sizes());
  TORCH_CHECK_TYPE(coef.scalar_type() == acc_type_of(x), "coef: expected dtype ", acc_type_of(x), ", got ",
                   coef.scalar_type());
  TORCH_CHECK_VALUE(coef.device() == x.device(), "coef: expected device ", x.device(), ", got ", coef.device());
  TORCH_CHECK_VALUE(mask.has_value() == known.has_value(), "mask and known: expected both or neither");
  TORCH_CHECK_VALUE(sample_offset >= 0, "sample_offset: expected a non-negative integer, got ", sample_offset);
  int64_t mask_sn = 0, known_sn = 0;
  if (mask.has_value()) {
    mask_sn = check_broadcast_rows(*mask, x, "mask");
    known_sn = check_broadcast_rows(*known, x, "known");
  }
  for (const at::Tensor* t : {&score, noise ? &*noise : nullptr, mask ? &*mask : nullptr, known ? &*known : nullptr}) {
    if (t != nullptr && !t->is_same(x)) at::assert_no_partial_overlap(x, *t);
  }
  if (x_mean.has_value()) at::assert_no_overlap(*x_mean, x);
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

at::Tensor langevin_step_norms(const at::Tensor& score, const c10::optional<at::Tensor>& noise, int64_t seed,
                               int64_t counter, int64_t sample_offset) {
  const Layout l = layout_of(score, "score");
  if (noise.has_value()) check_same_layout(*noise, score, "noise");
  TORCH_CHECK_VALUE(sample_offset >= 0, "sample_offset: expected a non-negative integer, got ", sample_offset);
  TORCH_CHECK_VALUE(l.N <= 65535, "score: at most 65535 samples per call on CUDA, got ", l.N);
  if (score.numel() == 0) return at::zeros({l.N, 2}, score.options().dtype(at::kDouble));
  const c10::cuda::CUDAGuard guard(score.device());
  at::Tensor partial = at::empty({l.N, lgv_norm_pieces(l.D), 2}, score.options().dtype(acc_type_of(score)));
  FS_DISPATCH_LGV(score, [&] {
    using acc_t = typename LgvArgs<cuda_t<scalar_t>>::acc_t;
    C10_CUDA_CHECK(lgv_norms(ptr<scalar_t>(score), ptr<scalar_t>(noise), l.N, l.D, uint64_t(seed), uint64_t(counter),
                             uint64_t(sample_offset) * uint64_t(l.D), partial.data_ptr<acc_t>(),
                             c10::cuda::getCurrentCUDAStream().stream()));
  });
  return partial.to(at::kDouble).sum(1);  // pieces added in a fixed order
}

void langevin_step_randn(at::Tensor out, int64_t seed, int64_t counter, int64_t sample_offset) {
  const Layout l = layout_of(out, "out");
  TORCH_CHECK_VALUE(out.is_contiguous(), "out: expected a contiguous tensor");
  TORCH_CHECK_VALUE(sample_offset >= 0, "sample_offset: expected a non-negative integer, got ", sample_offset);
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
