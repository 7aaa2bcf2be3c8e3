// Counter-based Gaussian noise and the Langevin / SDE sampler update, shared by
// csrc/cpu/langevin_step.cpp and csrc/cuda/langevin_step.cu, so the CPU tests exercise the arithmetic
// the GPU runs. kernels/langevin_step.py (Triton) and counter_randn_ref in
// fastscore/ops/langevin_step.py (pure PyTorch) repeat it operation for operation.
//
// ---- the noise: which normal sits at which element ----------------------------------------------
// A tensor of shape (N, ...) with D elements per sample gives its element (n, i) -- i the row-major
// (logical) index within the sample, whatever the memory layout -- the global index
//     e = (sample_offset + n) * D + i                                     (64 bits)
// Its normal is word e % 4 of one Philox4x32-10 block (Salmon et al., SC'11; as cuRAND and
// PyTorch's CUDA generator):
//     key     = (seed_lo, seed_hi)                                  the 64-bit seed's 32-bit halves
//     counter = (block_lo, block_hi, counter_lo, counter_hi)        block = e / 4; the 64-bit `counter`
//     (w0, w1, w2, w3) = philox4x32_10(counter, key)
// and Box-Muller turns (w0, w1) into the normals of e % 4 = 0, 1 and (w2, w3) into those of 2, 3:
//     u1 = float(w0 >> 1) * 2^-31 + 2^-32            in (0, 1], never 0; 31 bits, so |z| <= 6.66
//     v  = w1 >> 8                                   u2 = v * 2^-24 in [0, 1) (24 bits, exact)
//     r  = sqrt(-2 ln u1),  z0 = r cos(2 pi u2),  z1 = r sin(2 pi u2)
// So a sample's noise depends on (seed, counter, sample_offset + n) only: not on the batch size,
// the batch it shares or the process drawing it, and a shard names its samples with sample_offset.
//
// ---- the float path: the same bits on every backend ---------------------------------------------
// Everything after the integer words is float32, one IEEE-rounded operation at a time (multiplies,
// adds, one division, one square root), never contracted into an FMA: csrc/cpu/langevin_step.cpp is
// compiled with fp-contract=off, device code spells __fmul_rn / __fadd_rn / __fdiv_rn / __fsqrt_rn,
// Triton launches with enable_fp_fusion=False and uses div_rn / sqrt_rn, and the PyTorch reference
// does one tensor operation per step. Integer -> float conversions are exact (|v| < 2^24) or round to
// nearest even (w0 >> 1); ln, cos and sin are our own (no library call, and libraries differ):
//   ln u1    log_unit: u1 = m 2^k, m in [sqrt(1/2), sqrt(2)) from the bits (integer compare and
//            select), ln m = 2 atanh(s), s = (m - 1) / (m + 1), by a degree-2 minimax polynomial in
//            s^2, plus k ln 2 in two parts. Max error 1.6 ulp over every float in [2^-32, 1].
//   cos, sin sincos_turns: the quarter turn q = round(4 u2) and the remainder t = u2 - q/4 in
//            [-1/8, 1/8) come exactly from the 24-bit integer v; Taylor polynomials in t of
//            sin(2 pi t) (to t^9) and cos(2 pi t) (to t^10), truncation below 3e-9 relative; then a
//            rotation by q quarter turns (swap and sign selects). Max error 1.72 ulp (sin) and
//            1.24 ulp (cos) over all 2^22 remainders.
//   sqrt     correctly rounded.
// (Errors checked exhaustively against float64.) Constants are hex float literals, the exact float32
// values, which the Python mirrors read with float.fromhex. No branches (selects only) and no
// float -> int conversion after a compare, so g++ vectorises a loop over these, a lane per pair.
#pragma once

#include <cmath>
#include <cstdint>

#include "common_math.h"

namespace fastscore {
namespace lgv {

// ---- Philox4x32-10 ------------------------------------------------------------------------------

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

FS_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * uint64_t(b)) >> 32);
#endif
}

// The Philox4x32-10 bijection of the counter (c0, c1, c2, c3) under the key (k0, k1), in place.
FS_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__CUDACC__)
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;  // the bump after the last round is never used
    k1 += kPhiloxW1;
  }
}

// The key and the fixed half of the counter of one call: seed and counter as 64-bit integers.
struct PhiloxKey {
  uint32_t k0 = 0, k1 = 0;  // seed_lo, seed_hi
  uint32_t c2 = 0, c3 = 0;  // counter_lo, counter_hi
};

FS_HD PhiloxKey philox_key(uint64_t seed, uint64_t counter) {
  PhiloxKey k;
  k.k0 = uint32_t(seed);
  k.k1 = uint32_t(seed >> 32);
  k.c2 = uint32_t(counter);
  k.c3 = uint32_t(counter >> 32);
  return k;
}

// ---- operations that are never contracted into an FMA, and IEEE division ---------------------------

FS_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FS_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

FS_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

FS_HD double fmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

FS_HD double fadd(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// Correctly rounded square root: every backend has one (x86 vsqrtps, __fsqrt_rn, Triton's sqrt_rn,
// torch.sqrt). g++ vectorises it (the vector square root) because the build sets -fno-math-errno.
FS_HD float fsqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// ---- ln, cos, sin ----------------------------------------------------------------------------------

// ln u for u in [2^-32, 1] (any positive normal float), within 1.6 ulp (every float of the range checked):
// u = m 2^k with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s) = 2 s + s^3 R(s^2), s = (m - 1) / (m + 1) in
// [-0.172, 0.172], R a degree-2 minimax polynomial (relative error 8e-9), plus k ln 2 in two parts.
FS_HD float log_unit(float u) {
  const int32_t bits = float_to_bits(u);
  int32_t k = (bits >> 23) - 127;
  int32_t mbits = (bits & 0x007FFFFF) | 0x3F800000;  // m in [1, 2)
  const bool high = mbits > 0x3FB504F3;              // m > sqrt(2): use m / 2 and k + 1
  mbits = high ? mbits - 0x00800000 : mbits;
  k = high ? k + 1 : k;
  const float m = bits_to_float(mbits);
  const float s = fdiv(fadd(m, -1.0f), fadd(m, 1.0f));  // m - 1 is exact (Sterbenz)
  const float w = fmul(s, s);
  float r = fadd(fmul(w, 0x1.30ab7p-2f), 0x1.996b86p-2f);
  r = fadd(fmul(r, w), 0x1.55556cp-1f);
  const float fk = float(k);
  float y = fadd(fmul(fmul(s, w), r), fmul(fk, -0x1.bd0106p-13f));  // ln 2 = 0x1.63p-1 - 2.1219444e-4:
  y = fadd(fadd(s, s), y);                                           // k times the head is exact
  return fadd(y, fmul(fk, 0x1.63p-1f));
}

// cos(2 pi v / 2^24) and sin(2 pi v / 2^24) for an integer v in [0, 2^24).
FS_HD void sincos_turns(int32_t v, float& s, float& c) {
  const int32_t q = (v + (1 << 21)) >> 22;                   // nearest quarter turn, 0..4
  const float t = fmul(float(v - (q << 22)), 0x1p-24f);  // remainder in turns, [-1/8, 1/8), exact
  const float p = fmul(t, t);
  float sp = 0x1.507834p+5f;  // (2 pi)^9 / 9!
  sp = fadd(fmul(sp, p), -0x1.32d2ccp+6f);
  sp = fadd(fmul(sp, p), 0x1.466bc6p+6f);
  sp = fadd(fmul(sp, p), -0x1.4abbcep+5f);
  sp = fadd(fmul(sp, p), 0x1.921fb6p+2f);
  const float st = fmul(sp, t);  // sin(2 pi t)
  float cp = -0x1.a6d1f2p+4f;  // -(2 pi)^10 / 10!
  cp = fadd(fmul(cp, p), 0x1.e1f506p+5f);
  cp = fadd(fmul(cp, p), -0x1.55d3c8p+6f);
  cp = fadd(fmul(cp, p), 0x1.03c1f0p+6f);
  cp = fadd(fmul(cp, p), -0x1.3bd3ccp+4f);
  const float ct = fadd(fmul(cp, p), 1.0f);  // cos(2 pi t)
  // Rotate by q quarter turns: (cos, sin) = (c, s), (-s, c), (-c, -s), (s, -c) for q mod 4 = 0..3.
  const bool swap = (q & 1) != 0;
  const float cc = swap ? st : ct;
  const float ss = swap ? ct : st;
  c = ((q + 1) & 2) != 0 ? -cc : cc;
  s = (q & 2) != 0 ? -ss : ss;
}

// Box-Muller on two Philox words: (z0, z1) = r (cos, sin)(2 pi u2), r = sqrt(-2 ln u1).
FS_HD float box_muller_r2(uint32_t wa) {  // r^2 = -2 ln u1, u1 in (0, 1]
  const float u1 = fadd(fmul(float(int32_t(wa >> 1)), 0x1p-31f), 0x1p-32f);
  return fmul(log_unit(u1), -2.0f);
}

FS_HD void box_muller_finish(uint32_t wb, float r, float& z0, float& z1) {
  float s, c;
  sincos_turns(int32_t(wb >> 8), s, c);
  z0 = fmul(r, c);
  z1 = fmul(r, s);
}

FS_HD void box_muller(uint32_t wa, uint32_t wb, float& z0, float& z1) {
  box_muller_finish(wb, fsqrt(box_muller_r2(wa)), z0, z1);
}

// The four normals of Philox block `block` (global elements 4 * block .. 4 * block + 3).
FS_HD void normals4(uint64_t block, const PhiloxKey& key, float& z0, float& z1, float& z2, float& z3) {
  uint32_t w0 = uint32_t(block), w1 = uint32_t(block >> 32), w2 = key.c2, w3 = key.c3;
  philox4x32_10(w0, w1, w2, w3, key.k0, key.k1);
  box_muller(w0, w1, z0, z1);
  box_muller(w2, w3, z2, z3);
}

// The normal of global element e alone (4x the Philox work of normals4 per normal: for GPU threads
// that own one element).
FS_HD float normal_at(uint64_t e, const PhiloxKey& key) {
  uint32_t w0 = uint32_t(e >> 2), w1 = uint32_t(e >> 34), w2 = key.c2, w3 = key.c3;
  philox4x32_10(w0, w1, w2, w3, key.k0, key.k1);
  const bool second = (e & 2) != 0;
  float z0, z1;
  box_muller(second ? w2 : w0, second ? w3 : w1, z0, z1);
  return (e & 1) != 0 ? z1 : z0;
}

// ---- the sampler update ----------------------------------------------------------------------------
// Per sample coefficients (a, b, c): x_mean = a x + b g, x = x_mean + c z, then with a mask m,
// x = m k + (1 - m) x. Langevin: (1, step, sqrt(2 step)). Evaluated left to right in the compute
// type T (float32 for half / bfloat16 / float32, double for double), as the reference does.

template <typename T>
FS_HD T update_mean(T x, T g, T a, T b) {
  return fadd(fmul(a, x), fmul(b, g));
}

template <typename T>
FS_HD T update_noise(T x_mean, T z, T c) {
  return fadd(x_mean, fmul(c, z));
}

template <typename T>
FS_HD T apply_mask(T x, T m, T k) {
  return fadd(fmul(m, k), fmul(fadd(T(1), -m), x));
}

}  // namespace lgv
}  // namespace fastscore
