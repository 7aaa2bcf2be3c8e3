// ELU (alpha = 1) on CPU: forward, forward into a given tensor (in place when it is x), backward
// and forward-mode (jvp), float64 / float32 / bfloat16 / float16 (the last two computed in float32).
//
// The op is elementwise, so every kernel walks the flat storage of a dense, non-overlapping x in
// memory order, whatever its layout (NCHW, channels_last, any permutation): the other tensors have
// x's strides (checked), so element e of each sits at the same offset. One loop per chunk of the
// range, `#pragma omp simd` over the per-element rules of csrc/include/common_math.h
// (act_forward / act_grad: a polynomial expm1 without libm calls, so g++ vectorises it), compiled
// per target (FS_TARGET_CLONES); half types are converted by bit manipulation in the same loops (Io).
// torch's own ELU calls Sleef's expm1 on every element (positive ones included) and costs ~4x a copy
// of the same bytes single-threaded; the float32 loops run at ~1.4-1.6x. float64 runs ATen's ELU
// (see use_aten).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "common_math.h"
#include "cpu_kernel_utils.h"

namespace fastscore {
namespace cpu {
namespace {

// elu(p) = p for p > 0, expm1(p) otherwise. act_forward computes max(p, 0) + expm1(min(p, 0)),
// which maps NaN to 0 (both selects drop it); the outer select keeps NaN, as torch's ELU does.
template <typename acc_t>
FS_ALWAYS_INLINE acc_t elu_value(acc_t p) {
  return p <= acc_t(0) ? act_forward(p, kActElu) : p;
}

// Loads and stores between the storage type and float, written as integer and float selects so
// that g++ vectorises them (c10::Half / c10::BFloat16's own conversions keep these loops scalar:
// ~35x a copy instead of ~1.5x). Bit-exact with c10's: round to nearest even, NaN kept.
template <typename T>
struct Io {  // float (and double, which runs on ATen: see use_aten)
  static FS_ALWAYS_INLINE T load(T v) { return v; }
  static FS_ALWAYS_INLINE T store(T v) { return v; }
};

FS_ALWAYS_INLINE uint32_t fbits(float f) { return uint32_t(float_to_bits(f)); }
FS_ALWAYS_INLINE float bitsf(uint32_t u) { return bits_to_float(int32_t(u)); }

template <>
struct Io<c10::BFloat16> {
  static FS_ALWAYS_INLINE float load(c10::BFloat16 v) { return bitsf(uint32_t(v.x) << 16); }
  static FS_ALWAYS_INLINE c10::BFloat16 store(float f) {
    const uint32_t u = fbits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return c10::BFloat16(uint16_t(f != f ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
  }
};

// IEEE half <-> float by exponent rebiasing (F. Giesen's branch-free conversions, as selects).
template <>
struct Io<c10::Half> {
  static FS_ALWAYS_INLINE float load(c10::Half v) {
    const uint32_t h = v.x;
    const uint32_t em = h & 0x7fffu;
    // exponent and mantissa moved into float position, scaled by 2^(127 - 15): exact for normal and
    // subnormal halves; inf / NaN (exponent 31) get the float's all-ones exponent
    uint32_t bits = fbits(bitsf(em << 13) * 0x1p112f);
    bits = em >= 0x7c00u ? (bits | 0x7f800000u) : bits;
    return bitsf(bits | ((h & 0x8000u) << 16));
  }
  static FS_ALWAYS_INLINE c10::Half store(float f) {
    const uint32_t all = fbits(f);
    const uint32_t sign = all & 0x80000000u;
    const uint32_t u = all ^ sign;
    // too large for a half: inf, or NaN (quiet)
    const uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
    // below the smallest normal half (2^-14): the float adder rounds the mantissa to nearest even
    constexpr uint32_t kDenormMagic = ((127 - 15) + (23 - 10) + 1) << 23;
    const uint32_t denorm = fbits(bitsf(u) + bitsf(kDenormMagic)) - kDenormMagic;
    // normal: rebias the exponent and round to nearest even on the 13 dropped bits
    const uint32_t normal = (u + (uint32_t(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
    const uint32_t o = u >= (uint32_t(127 + 16) << 23) ? big : (u < (113u << 23) ? denorm : normal);
    return c10::Half(uint16_t(o | (sign >> 16)), c10::Half::from_bits());
  }
};

// Each function runs one chunk [e0, e1) of the flat range. Pointers are x's storage order: x,
// grad_out, x_t and dst all have x's strides, so index e is the same element in each.
// dst may be x itself (elu_fwd_out in place): every element is read, then written at its own index.
template <typename scalar_t>
FS_TARGET_CLONES void fwd_chunk(const scalar_t* x, scalar_t* dst, int64_t e0, int64_t e1) {
  using io = Io<scalar_t>;
#pragma omp simd
  for (int64_t e = e0; e < e1; ++e) dst[e] = io::store(elu_value(io::load(x[e])));
}

// d elu / d x = 1 for x > 0, exp(x) = expm1(x) + 1 otherwise (act_grad); 1 at NaN. torch's CPU
// elu_backward itself gives 1 at NaN on its scalar path and NaN on its vector path, so no choice
// matches it everywhere; 1 is act_grad's (the fused norms') and torch's scalar rule.
template <typename acc_t>
FS_ALWAYS_INLINE acc_t elu_grad(acc_t p) {
  return act_grad(p, kActElu);
}

template <typename scalar_t>
FS_TARGET_CLONES void scale_chunk(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v,
                                  scalar_t* __restrict__ dst, int64_t e0, int64_t e1) {
  using io = Io<scalar_t>;
#pragma omp simd
  for (int64_t e = e0; e < e1; ++e) dst[e] = io::store(io::load(v[e]) * elu_grad(io::load(x[e])));
}

// Chunks of at least this many elements per thread (~64 KiB of float32: below that, waking the
// second thread costs more than it saves).
constexpr int64_t kGrain = 16384;

// float, bfloat16, float16 run the kernels above. float64 runs ATen's own ELU: its vectorised
// double expm1 (Sleef) beats the per-element libm call that common_math.h's float64 path makes
// (~3x here), and float64 is for checking (gradcheck), where torch's own numerics are the point.
#define FS_DISPATCH_ELU(x, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (x).scalar_type(), "elu", __VA_ARGS__)

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
    at::parallel_for(0, n, kGrain, [&](int64_t e0, int64_t e1) { fwd_chunk(px, pd, e0, e1); });
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
    at::parallel_for(0, n, kGrain, [&](int64_t e0, int64_t e1) { scale_chunk(px, pv, pd, e0, e1); });
  });
  return dst;
}

at::Tensor elu_fwd(const at::Tensor& x) {
  check_dense_float(x, "x");
  at::Tensor out = fresh_output_like(x);
  fwd_into(x, out);
  return out;
}

void elu_fwd_out(const at::Tensor& x, at::Tensor out) {
  check_dense_float(x, "x");
  check_same_strides(out, x, "out");
  // out may be x (or another view of exactly x's memory): each element is read before it is
  // written at the same index. A partial overlap would read elements already overwritten.
  if (!out.is_same(x)) at::assert_no_partial_overlap(out, x);
  fwd_into(x, out);
}

at::Tensor elu_bwd(const at::Tensor& grad_out, const at::Tensor& x) {
  check_dense_float(x, "x");
  check_same_strides(grad_out, x, "grad_out");
  return scaled(x, grad_out);
}

at::Tensor elu_jvp(const at::Tensor& x, const at::Tensor& x_t) {
  check_dense_float(x, "x");
  check_same_strides(x_t, x, "x_t");
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
