// Arithmetic shared by the CPU (g++) and CUDA (nvcc) kernels of every op. Everything here is
// written so that g++ auto-vectorises it inside `#pragma omp simd` loops: no calls into libm on the
// float path, no branches (selects only), no float->int conversions after a compare (g++ 12 then
// refuses to vectorise for AVX-512).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Always inlined on the host too: these are per-element functions called from hot loops, and a call that g++
// chooses not to inline keeps the loop around it scalar (and compiled for no particular CPU capability).
#if defined(__CUDACC__)
#define FS_HD __host__ __device__ __forceinline__
#else
#define FS_HD inline __attribute__((always_inline))
#endif

namespace fastscore {

FS_HD float bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
#endif
}

FS_HD int32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
#endif
}

// expm1(x) for x <= 0, float, within 1 ulp (checked against float64 expm1 over [-25, 0]).
// x = k ln2 + r with |r| <= ln2/2; expm1(x) = 2^k expm1(r) + (2^k - 1). For k = 0 this is the
// polynomial itself, so tiny |x| keep full relative accuracy (why not exp(x) - 1).
FS_HD float expm1_nonpos(float x) {
  x = x < -17.5f ? -17.5f : x;  // below this expm1 rounds to -1 in float (written so that it is one maxps)
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low bits
  const float t = x * 1.44269504f + shifter;
  const float kf = t - shifter;
  const int32_t k = float_to_bits(t) - float_to_bits(shifter);
  float r = x - kf * 0.693145751953125f;  // ln2 split in a short head (kf * head is exact) ...
  r = r - kf * 1.42860682e-6f;            // ... and the tail
  const float p =
      r * r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720 + r * (1.f / 5040)))))) + r;
  const float two_k = bits_to_float((k + 127) << 23);
  return two_k * p + (two_k - 1.0f);
}

// expm1(x) for x <= 0, double, the same reduction: ln2 in a 32-bit head (k * head exact for |k| < 2^20) and
// a tail, and expm1(r) for |r| <= ln2/2 by its Taylor series to r^13 (the next term is below 2^-56 of the
// result), so that the float64 kernels (gradcheck, float64 models) vectorise too. Device code keeps the
// library's expm1.
FS_HD double expm1_nonpos(double x) {
#if defined(__CUDA_ARCH__)
  return ::expm1(x);
#else
  x = x > -38.0 ? x : -38.0;  // below this expm1 rounds to -1 in double
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52
  const double t = x * 1.4426950408889634 + shifter;
  const double kf = t - shifter;
  int64_t k;
  std::memcpy(&k, &t, sizeof k);
  int64_t s;
  std::memcpy(&s, &shifter, sizeof s);
  k -= s;
  double r = x - kf * 6.93147180369123816490e-01;
  r = r - kf * 1.90821492927058770002e-10;
  double q = 1.0 / 6227020800.0;  // 1/13!
  q = q * r + 1.0 / 479001600.0;
  q = q * r + 1.0 / 39916800.0;
  q = q * r + 1.0 / 3628800.0;
  q = q * r + 1.0 / 362880.0;
  q = q * r + 1.0 / 40320.0;
  q = q * r + 1.0 / 5040.0;
  q = q * r + 1.0 / 720.0;
  q = q * r + 1.0 / 120.0;
  q = q * r + 1.0 / 24.0;
  q = q * r + 1.0 / 6.0;
  q = q * r + 0.5;
  const double p = r * r * q + r;
  const int64_t bits = (k + 1023) << 52;
  double two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return two_k * p + (two_k - 1.0);
#endif
}

// Activations that the norm ops fuse. ELU with alpha = 1, as ncsnv2's nn.ELU(): elu(p) = p for p > 0,
// expm1(p) otherwise; NaN stays NaN (it fails p <= 0). Both sides are computed and one is selected, so that
// g++ vectorises it (expm1_nonpos of a positive p is garbage that the select drops).
enum Act : int { kActNone = 0, kActElu = 1 };

template <typename T>
FS_HD T act_forward(T pre, int act) {
  return act == kActElu ? (pre <= T(0) ? expm1_nonpos(pre) : pre) : pre;
}

// d act / d pre, written from pre: 1 for p > 0, exp(p) = expm1(p) + 1 for p <= 0 (as torch's
// elu_backward, which uses exp(p) at p = 0 too); 1 at NaN (torch's scalar rule).
template <typename T>
FS_HD T act_grad(T pre, int act) {
  return act == kActElu ? (pre <= T(0) ? expm1_nonpos(pre) + T(1) : T(1)) : T(1);
}

}  // namespace fastscore
