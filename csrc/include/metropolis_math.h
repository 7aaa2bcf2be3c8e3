// Per-element and per-sample arithmetic of the metropolis ops (MALA and HMC steps), shared by
// csrc/cpu/metropolis.cpp (g++) and csrc/cuda/metropolis.cu (nvcc), so the CPU tests exercise what the GPU
// runs. kernels/metropolis.py (Triton) and the references in fastscore/ops/metropolis.py repeat it operation
// for operation: every backend computes the same bits (the normals are langevin_step_math.h's).
//
// ---- per element, in the compute type T (float for half / bfloat16 / float, double for double) --------
//   MALA proposal   x' = (x + a s) + c z                     a = eps, c = sqrt(2 eps), z the normal
//   HMC start       p = z + b s,  x' = x + c p               b = h / 2, c = h; x' uses p rounded to storage
//   leapfrog        p = p + a s,  x = x + c p                a = c = h; x uses p rounded to storage
//   MALA reverse    r = (x - x') - a s'                      squared in double
//   HMC last kick   k = p + b s'                             squared in double
// Each operation is one IEEE rounding, never contracted into an FMA (fp-contract=off on the CPU, __f*_rn /
// __d*_rn on the device, enable_fp_fusion=False in Triton, one tensor op at a time in PyTorch).
//
// ---- per sample, in double ------------------------------------------------------------------------
// A sum of squares over a sample's D elements (logical, row-major order) is taken in pieces of kPiece
// elements: piece j holds elements [j kPiece, (j + 1) kPiece), summed by the halving tree
//     q[k] += q[k + h]   for k < h,  h = W / 2, W / 4, ..., 1   (W a power of two >= the piece's length,
//                                                              the slots past it zero: they add exact zeros)
// and the pieces are added left to right: t = ((s_0 + s_1) + s_2) + ... Then
//     MALA   log alpha = ((E - E') + 0.5 |z|^2) - |r|^2 / (2 (c c))
//     HMC    log alpha = ((E - E') + 0.5 |p0|^2) - 0.5 |k|^2
// and the sample is accepted iff log u <= log alpha (so a NaN log alpha is rejected), with u the uniform of
// the sample's global index g = sample_offset + n: the first two words (w0, w1) of the Philox4x32-10 block
// (lo(g), hi(g) | 2^31, counter_lo, counter_hi) under the seed, u = ((w0 << 21 | w1 >> 11) + 1) 2^-53 in
// (0, 1]. The normals use blocks e / 4 < 2^62, so these blocks (>= 2^63) are a stream of their own.
#pragma once

#include <cmath>
#include <cstdint>

#include "common_math.h"
#include "langevin_step_math.h"

namespace fastscore {
namespace mh {

constexpr int64_t kPiece = 1024;  // elements per piece of a per-sample sum (a power of two)

using lgv::fadd;
using lgv::fmul;
using lgv::PhiloxKey;

FS_HD double ddiv(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

// ---- per element --------------------------------------------------------------------------------------

template <typename T>
FS_HD T mala_proposal(T x, T s, T z, T a, T c) {
  return fadd(fadd(x, fmul(a, s)), fmul(c, z));
}

template <typename T>
FS_HD T kick(T p, T s, T b) {  // p + b s: the HMC momentum (p = z) and every kick
  return fadd(p, fmul(b, s));
}

template <typename T>
FS_HD T drift(T x, T p, T c) {  // x + c p
  return fadd(x, fmul(c, p));
}

template <typename T>
FS_HD T mala_reverse(T x, T xp, T sp, T a) {  // (x - x') - a s'
  return fadd(fadd(x, -xp), -fmul(a, sp));
}

FS_HD double square(double v) { return fmul(v, v); }

// ---- per sample ---------------------------------------------------------------------------------------

FS_HD double mala_log_alpha(double e, double ep, double sq, double rsum, double c) {
  const double t = fadd(fadd(e, -ep), fmul(0.5, sq));
  return fadd(t, -ddiv(rsum, fmul(2.0, fmul(c, c))));
}

FS_HD double hmc_log_alpha(double e, double ep, double sq, double ksum) {
  return fadd(fadd(fadd(e, -ep), fmul(0.5, sq)), -fmul(0.5, ksum));
}

constexpr uint64_t kUniformBlock = uint64_t(1) << 63;  // sample g's uniform: Philox block 2^63 + g

// The uniform in (0, 1] from the first two words of a Philox block.
FS_HD double uniform_of_words(uint32_t w0, uint32_t w1) {
  const uint64_t u53 = (uint64_t(w0) << 21) | uint64_t(w1 >> 11);
  return double(u53 + 1) * 0x1p-53;  // exact: u53 + 1 <= 2^53
}

// The uniform in (0, 1] of global sample index g (< 2^63) under (seed, counter).
FS_HD double uniform(uint64_t g, const PhiloxKey& key) {
  const uint64_t b = kUniformBlock + g;
  uint32_t w0 = uint32_t(b), w1 = uint32_t(b >> 32), w2 = key.c2, w3 = key.c3;
  lgv::philox4x32_10(w0, w1, w2, w3, key.k0, key.k1);
  return uniform_of_words(w0, w1);
}

// log u <= log alpha, with log u <= 0 (u <= 1): a non-negative log alpha accepts without the logarithm, a
// NaN one is rejected.
FS_HD bool accept(double log_alpha, double u) {
#if defined(__CUDA_ARCH__)
  return log_alpha >= 0.0 || ::log(u) <= log_alpha;
#else
  return log_alpha >= 0.0 || std::log(u) <= log_alpha;
#endif
}

}  // namespace mh
}  // namespace fastscore
