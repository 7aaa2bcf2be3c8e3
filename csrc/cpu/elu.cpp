// ELU (alpha = 1) on CPU: forward, forward into a given tensor (in place when it is x), backward
// and forward-mode (jvp), float64 / float32 / bfloat16 / float16 (the last two computed in float32).
//
// The op is elementwise, so every kernel walks the flat storage of a dense, non-overlapping x in
// memory order, whatever its layout (NCHW, channels_last, any permutation): the other tensors have
// x's strides (checked), so element e of each sits at the same offset. One loop per chunk of the
// range, `#pragma omp simd` over the per-element rules of csrc/include/common_math.h
// (act_forward / act_grad: a polynomial expm1 without libm calls, so g++ vectorises it), compiled
// per CPU capability (dispatch_capability); half types are converted by bit manipulation in the same loops (widen / narrow).
// torch's own ELU calls Sleef's expm1 on every element (positive ones included) and costs ~4x a copy
// of the same bytes single-threaded; the float32 loops run at ~1.4-1.6x. float64 runs ATen's ELU
// (see use_aten).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "common_math.h"
#include "cpu_kernel_utils.h"
#include "elu_args.h"

namespace fastscore {
namespace cpu {
namespace {

// elu(p) = p for p > 0, expm1(p) otherwise; NaN kept, as torch's ELU (common_math.h).
template <typename acc_t>
FS_ALWAYS_INLINE acc_t elu_value(acc_t p) {
  return act_forward(p, kActElu);
}

// Each function runs one chunk [e0, e1) of the flat range. Pointers are x's storage order: x,
// grad_out, x_t and dst all have x's strides, so index e is the same element in each.
// dst may be x itself (elu_fwd_out in place): every element is read, then written at its own index.
template <typename scalar_t>
FS_ALWAYS_INLINE void fwd_chunk(const scalar_t* x, scalar_t* dst, int64_t e0, int64_t e1) {
#pragma omp simd
  for (int64_t e = e0; e < e1; ++e) dst[e] = narrow<scalar_t>(elu_value(widen(x[e])));
}

// d elu / d x = 1 for x > 0, exp(x) = expm1(x) + 1 otherwise (act_grad); 1 at NaN. torch's CPU
// elu_backward itself gives 1 at NaN on its scalar path and NaN on its vector path, so no choice
// matches it everywhere; 1 is act_grad's (the fused norms') and torch's scalar rule.
template <typename acc_t>
FS_ALWAYS_INLINE acc_t elu_grad(acc_t p) {
  return act_grad(p, kActElu);
}

template <typename scalar_t>
FS_ALWAYS_INLINE void scale_chunk(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v,
                                  scalar_t* __restrict__ dst, int64_t e0, int64_t e1) {
#pragma omp simd
  for (int64_t e = e0; e < e1; ++e) dst[e] = narrow<scalar_t>(widen(v[e]) * elu_grad(widen(x[e])));
}

// Chunks of at least this many elements per thread (~64 KiB of float32: below that, waking the
// second thread costs more than it saves).
constexpr int64_t kGrain = 16384;

// float, bfloat16, float16 run the kernels above (only these are instantiated). float64 runs ATen's own
// ELU: float64 is for checking (gradcheck), where torch's own numerics are the point.
#define FS_DISPATCH_ELU(x, ...)                                      \
  AT_DISPATCH_SWITCH((x).scalar_type(), "elu",                       \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)       \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

bool use_aten(const at::Tensor& x) { return x.scalar_type() == at::kDouble; }

void fwd_into(const at::Tensor& x, const at::Tensor& dst) {
  const int64_t n = x.numel();
  if (n == 0) return;
  if (use_aten(x)) {
    if (dst.is_same(x)) at::elu_(const_cast<at::Tensor&>(dst));
    else at::elu_out(const_cast<at::Tensor&>(dst), x);
    return;
  }
  FS_DISPATCH_ELU(x, [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* pd = dst.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t e0, int64_t e1) {
      dispatch_capability([&](auto) FS_VECTOR_BODY { fwd_chunk(px, pd, e0, e1); });
    });
  });
}

at::Tensor scaled(const at::Tensor& x, const at::Tensor& v) {
  at::Tensor dst = fresh_output_like(x);  // x's strides (x is dense)
  const int64_t n = x.numel();
  if (n == 0) return dst;
  if (use_aten(x)) {  // v * elu'(x), from x (is_result = false)
    at::elu_backward_out(dst, v, 1.0, 1.0, 1.0, false, x);
    return dst;
  }
  FS_DISPATCH_ELU(x, [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pv = v.data_ptr<scalar_t>();
    scalar_t* pd = dst.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t e0, int64_t e1) {
      dispatch_capability([&](auto) FS_VECTOR_BODY { scale_chunk(px, pv, pd, e0, e1); });
    });
  });
  return dst;
}

// The argument checks (elu::check_fwd, ...) are in csrc/include/elu_args.h, shared with CUDA.

at::Tensor elu_fwd(const at::Tensor& x) {
  elu::check_fwd(x);
  at::Tensor out = fresh_output_like(x);
  fwd_into(x, out);
  return out;
}

void elu_fwd_out(const at::Tensor& x, at::Tensor out) {
  elu::check_fwd_out(x, out);  // out may be x (in place)
  fwd_into(x, out);
}

at::Tensor elu_bwd(const at::Tensor& grad_out, const at::Tensor& x) {
  elu::check_bwd(grad_out, x);
  return scaled(x, grad_out);
}

at::Tensor elu_jvp(const at::Tensor& x, const at::Tensor& x_t) {
  elu::check_jvp(x, x_t);
  return scaled(x, x_t);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastscore_C, CPU, m) {
  m.impl("elu_fwd", &elu_fwd);
  m.impl("elu_fwd_out", &elu_fwd_out);
  m.impl("elu_bwd", &elu_bwd);
  m.impl("elu_jvp", &elu_jvp);
}

}  // namespace cpu
}  // namespace fastscore
