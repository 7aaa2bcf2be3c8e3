// Helpers for the C++ CPU kernels (csrc/cpu/*.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "common_math.h"

#define FS_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fastscore {
namespace cpu {

// ---- CPU capabilities: one build, the widest vectors each CPU has ----------------------------------
// Hot loops are compiled once per x86-64 level and one copy runs, chosen at load time:
//   avx512   x86-64-v4 (AVX-512 F/BW/CD/DQ/VL)
//   avx2     x86-64-v3 (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE)
//   default  baseline x86-64 (SSE2)
// (ATen's words for the same levels.) fastscore/_backend.py picks the widest level that both the CPU
// and ATen's own capability allow; FASTSCORE_CPU_CAPABILITY forces a narrower one, and the tests switch
// between them at run time to check every copy.
//
// A kernel hands its hot loop to dispatch_capability as a generic lambda marked FS_VECTOR_BODY:
//   dispatch_capability([&](auto cap) FS_VECTOR_BODY { ...loops... });
// The lambda is inlined into one wrapper per level, each compiled with that level's target, so its loops
// (and every FS_ALWAYS_INLINE function they call) are vectorised for that level. `cap` is a
// CapabilityTag: code that needs intrinsics branches on it with `if constexpr`. The loops are plain C++
// written without branches (selects only) so that g++ vectorises them at every level: with AVX-512's
// masked operations g++ if-converts almost anything, without them only straight-line code
// (tests/test_vectorisation.py compiles each kernel per level and fails if a marked loop is not vectorised).
enum class Capability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

template <Capability C>
using CapabilityTag = std::integral_constant<Capability, C>;

// The level the kernels run now, and its control (torch.ops.fastscore_C.cpu_capability /
// set_cpu_capability / supported_cpu_capabilities; csrc/cpu/cpu_capability.cpp).
Capability cpu_capability();
std::string cpu_capability_name();
void set_cpu_capability(const std::string& name);
std::vector<std::string> supported_cpu_capabilities();

#define FS_VECTOR_BODY __attribute__((always_inline))

// The vectorisation check (tests/test_vectorisation.py) compiles a kernel with -DFS_SINGLE_CAPABILITY=<level>
// and the matching -march, so that every message of the compiler's report is about that level's code.
#if defined(FS_SINGLE_CAPABILITY)
template <typename Body>
void dispatch_capability(const Body& body) {
  body(CapabilityTag<Capability(FS_SINGLE_CAPABILITY)>{});
}
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FS_CPU_CAPABILITIES 1
template <typename Body>
__attribute__((target("arch=x86-64-v4"))) void run_avx512(const Body& body) {
  body(CapabilityTag<Capability::kAvx512>{});
}
template <typename Body>
__attribute__((target("arch=x86-64-v3"))) void run_avx2(const Body& body) {
  body(CapabilityTag<Capability::kAvx2>{});
}
template <typename Body>
void run_default(const Body& body) {
  body(CapabilityTag<Capability::kDefault>{});
}
template <typename Body>
void dispatch_capability(const Body& body) {
  switch (cpu_capability()) {
    case Capability::kAvx512:
      run_avx512(body);
      return;
    case Capability::kAvx2:
      run_avx2(body);
      return;
    default:
      run_default(body);
  }
}
#else  // other compilers and architectures: the default build only
template <typename Body>
void dispatch_capability(const Body& body) {
  body(CapabilityTag<Capability::kDefault>{});
}
#endif


// ---- loads and stores between the storage type and the compute type -------------------------------
// widen(v): float16 / bfloat16 -> float, float and double unchanged; narrow<T>(v): back, rounding to nearest
// even, NaN kept, bit-exact with c10's conversions. Written as integer and float selects so that g++
// vectorises them at every level (c10::Half / c10::BFloat16's own conversions branch, which keeps a loop
// scalar: ~35x a copy instead of ~1.5x). Every hot loop reads and writes through these.

FS_ALWAYS_INLINE uint32_t fbits(float f) { return uint32_t(float_to_bits(f)); }
FS_ALWAYS_INLINE float bitsf(uint32_t u) { return bits_to_float(int32_t(u)); }

FS_ALWAYS_INLINE float widen(float v) { return v; }
FS_ALWAYS_INLINE double widen(double v) { return v; }
FS_ALWAYS_INLINE float widen(c10::BFloat16 v) { return bitsf(uint32_t(v.x) << 16); }

// IEEE half -> float by exponent rebiasing (F. Giesen's branch-free conversion, as selects): exponent and
// mantissa moved into float position and scaled by 2^(127 - 15), exact for normal and subnormal halves;
// inf / NaN (exponent 31) get the float's all-ones exponent.
FS_ALWAYS_INLINE float widen(c10::Half v) {
  const uint32_t h = v.x;
  const uint32_t em = h & 0x7fffu;
  uint32_t bits = fbits(bitsf(em << 13) * 0x1p112f);
  bits = em >= 0x7c00u ? (bits | 0x7f800000u) : bits;
  return bitsf(bits | ((h & 0x8000u) << 16));
}

template <typename T>
FS_ALWAYS_INLINE T narrow(at::opmath_type<T> v) {  // float, double
  return v;
}

template <>
FS_ALWAYS_INLINE c10::BFloat16 narrow<c10::BFloat16>(float f) {
  const uint32_t u = fbits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(uint16_t(f != f ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}

template <>
FS_ALWAYS_INLINE c10::Half narrow<c10::Half>(float f) {
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

// A value of one of these types as another: widen (storage -> compute type), narrow (compute -> storage) or
// nothing; for code generic in its direction (row movers).
template <typename To, typename From>
FS_ALWAYS_INLINE To convert_value(From v) {
  if constexpr (std::is_same<To, From>::value) return v;
  else if constexpr (std::is_same<To, at::opmath_type<From>>::value) return widen(v);
  else return narrow<To>(v);
}

// An empty tensor with x's sizes and strides (x dense) for a kernel's output. Large ones come from
// fastscore's CPU output cache (csrc/cpu/output_cache.cpp): a reused buffer has its pages mapped already,
// where fresh memory costs a page fault and the OS's clearing of every page on first touch.
at::Tensor fresh_output_like(const at::Tensor& x);

// The cache's controls (torch.ops.fastscore_C.output_cache_*): release the free buffers; and
// [bytes in use, bytes cached, cap in bytes].
void output_cache_empty();
std::vector<int64_t> output_cache_stats();

// Runs the three steps of a per-sample normalisation:
//   reduce(n, c0, c1): per-channel sums over H*W for channels [c0, c1) of sample n,
//   finish(n):         per-sample coefficients from those sums (needs all channels of n),
//   map(n, c0, c1):    the elementwise pass.
// reduce and map are the hot loops: they run in the CPU capability's copy, so pass them as FS_VECTOR_BODY
// lambdas.
// With at least as many samples as threads, each thread takes whole samples and runs the three
// steps back to back, so the map re-reads a sample that is still in its cache (one pass over
// memory instead of two). With fewer samples (N = 1, say) the steps run as three parallel phases
// over (sample, channel block) items so every thread has work.
template <typename Reduce, typename Finish, typename Map>
void run_sample_pipeline(int64_t N, int64_t C, int64_t HW, Reduce&& reduce_step, Finish&& finish, Map&& map_step) {
  auto reduce = [&](int64_t n, int64_t c0, int64_t c1) {
    dispatch_capability([&](auto) FS_VECTOR_BODY { reduce_step(n, c0, c1); });
  };
  auto map = [&](int64_t n, int64_t c0, int64_t c1) {
    dispatch_capability([&](auto) FS_VECTOR_BODY { map_step(n, c0, c1); });
  };
  const int64_t threads = at::get_num_threads();
  if (N >= threads || C == 1) {
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        reduce(n, 0, C);
        finish(n);
        map(n, 0, C);
      }
    });
    return;
  }
  // Channel blocks: enough items for ~4 per thread, in multiples of 16 channels (vector lanes
  // for the channels_last loops), and not so small that per-item overhead dominates tiny planes.
  const int64_t want_blocks = std::max<int64_t>(1, (4 * threads + N - 1) / N);
  int64_t block = std::max<int64_t>(1, (C + want_blocks - 1) / want_blocks);
  block = std::min<int64_t>(C, ((block + 15) / 16) * 16);
  if (HW < 64) block = C;
  const int64_t blocks = (C + block - 1) / block;
  auto over_items = [&](auto&& step) {
    at::parallel_for(0, N * blocks, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / blocks, c0 = (i % blocks) * block;
        step(n, c0, std::min(C, c0 + block));
      }
    });
  };
  over_items(reduce);
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) finish(n);
  });
  over_items(map);
}

}  // namespace cpu
}  // namespace fastscore
