// The CPU side of the counter-based normal generator (csrc/include/langevin_step_math.h), for the kernels
// that make their noise in L1-sized chunks: the Philox words of a run of blocks with the widest integer
// vectors of the CPU capability (AVX-512, AVX2 or SSE2 intrinsics: g++ does not turn the 32x32->64
// multiplies into pmuludq by itself), Box-Muller over the word pairs (one auto-vectorised loop), a chunk
// buffer, and the task loop that hands chunks to the intra-op threads. Each normal depends on its global
// element index only, so results never depend on the threads, the chunking or the capability level.
//
// Used by csrc/cpu/langevin_step.cpp and csrc/cpu/metropolis.cpp (one copy of the generator's CPU code).
// A file that includes this header must compile its float path with fp-contract=off (before any include),
// as csrc/cpu/langevin_step.cpp and csrc/cpu/metropolis.cpp do: Box-Muller's roundings are part of the bits.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FS_CNOISE_X86 1
#endif

#include "cpu_kernel_utils.h"
#include "langevin_step_math.h"

namespace fastscore {
namespace cpu {
namespace cnoise {

using lgv::box_muller;
using lgv::kPhiloxM0;
using lgv::kPhiloxM1;
using lgv::kPhiloxW0;
using lgv::kPhiloxW1;
using lgv::philox4x32_10;
using lgv::PhiloxKey;

constexpr int64_t kChunk = 1024;                   // elements per noise chunk (4 KiB of normals)
constexpr int64_t kBlocks = (kChunk + 3) / 4 + 8;  // Philox blocks covering an unaligned chunk, rounded up to 8

// fn(task, buffer) for every task in [0, tasks), on the intra-op threads, handing the tasks out one at a
// time: the calling thread starts at once and a thread that wakes late (an idle OpenMP worker takes tens of
// microseconds to wake on a VM, a large share of a 100 us step) simply takes fewer tasks. Every element's
// result depends on its index only, so who computes what never changes the bits.
template <typename Buffer, typename Fn>
inline void run_tasks(int64_t tasks, Fn&& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1 || at::in_parallel_region()) {
    Buffer buf;
    for (int64_t t = 0; t < tasks; ++t) fn(t, buf);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Buffer buf;
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < tasks;
         t = next.fetch_add(1, std::memory_order_relaxed))
      fn(t, buf);
  });
}

// ---- Philox words of blocks [b0, b0 + nb): wa[2k] = w0, wa[2k + 1] = w2, wb[2k] = w1, wb[2k + 1] = w3 of
// block b0 + k, so that Box-Muller pair p reads (wa[p], wb[p]) and gives the normals of elements 2p, 2p + 1
// of the blocks' range. nb is a multiple of 8 (callers round up; the extra words are never read).

#if defined(FS_CNOISE_X86)
// One block per 64-bit lane: vpmuludq multiplies the low 32 bits of each lane into the full 64-bit
// product, so a Philox round is two multiplies, two shifts and two 3-way XORs per 8 blocks. The upper
// halves of the lanes carry junk that no multiply or final store reads. Four vectors in flight hide
// the multiply latency.
__attribute__((target("avx512f"))) inline void philox_avx512(uint64_t b0, int64_t nb, const PhiloxKey& key, uint32_t* wa,
                                                      uint32_t* wb) {
  constexpr int U = 4;
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t k = 0; k < nb; k += 8 * U) {
    const int u_end = int(std::min<int64_t>(U, (nb - k) / 8));
    __m512i x0[U], x1[U], x2[U], x3[U];
    for (int u = 0; u < U; ++u) {
      const __m512i b = _mm512_add_epi64(_mm512_set1_epi64(int64_t(b0 + uint64_t(k + 8 * u))), lane);
      x0[u] = b;
      x1[u] = _mm512_srli_epi64(b, 32);
      x2[u] = _mm512_set1_epi64(key.c2);
      x3[u] = _mm512_set1_epi64(key.c3);
    }
    uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const __m512i ka = _mm512_set1_epi64(k0), kb = _mm512_set1_epi64(k1);
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const __m512i p0 = _mm512_mul_epu32(x0[u], m0), p1 = _mm512_mul_epu32(x2[u], m1);
        x0[u] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), x1[u], ka, 0x96);  // hi1 ^ c1 ^ k0
        x2[u] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), x3[u], kb, 0x96);  // hi0 ^ c3 ^ k1
        x1[u] = p1;                                                                       // lo1
        x3[u] = p0;                                                                       // lo0
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int u = 0; u < u_end; ++u) {
      _mm512_storeu_si512(wa + 2 * (k + 8 * u), _mm512_mask_blend_epi32(0xAAAA, x0[u], _mm512_slli_epi64(x2[u], 32)));
      _mm512_storeu_si512(wb + 2 * (k + 8 * u), _mm512_mask_blend_epi32(0xAAAA, x1[u], _mm512_slli_epi64(x3[u], 32)));
    }
  }
}

__attribute__((target("avx2"))) inline void philox_avx2(uint64_t b0, int64_t nb, const PhiloxKey& key, uint32_t* wa,
                                                 uint32_t* wb) {
  constexpr int U = 4;
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  for (int64_t k = 0; k < nb; k += 4 * U) {
    const int u_end = int(std::min<int64_t>(U, (nb - k) / 4));
    __m256i x0[U], x1[U], x2[U], x3[U];
    for (int u = 0; u < U; ++u) {
      const __m256i b = _mm256_add_epi64(_mm256_set1_epi64x(int64_t(b0 + uint64_t(k + 4 * u))), lane);
      x0[u] = b;
      x1[u] = _mm256_srli_epi64(b, 32);
      x2[u] = _mm256_set1_epi64x(key.c2);
      x3[u] = _mm256_set1_epi64x(key.c3);
    }
    uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const __m256i ka = _mm256_set1_epi64x(k0), kb = _mm256_set1_epi64x(k1);
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const __m256i p0 = _mm256_mul_epu32(x0[u], m0), p1 = _mm256_mul_epu32(x2[u], m1);
        x0[u] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), x1[u]), ka);
        x2[u] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), x3[u]), kb);
        x1[u] = p1;
        x3[u] = p0;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int u = 0; u < u_end; ++u) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(wa + 2 * (k + 4 * u)),
                          _mm256_blend_epi32(x0[u], _mm256_slli_epi64(x2[u], 32), 0xAA));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(wb + 2 * (k + 4 * u)),
                          _mm256_blend_epi32(x1[u], _mm256_slli_epi64(x3[u], 32), 0xAA));
    }
  }
}

// SSE2 (every x86-64): two blocks per vector; no blend instruction, so the words are merged with and / or.
inline void philox_sse2(uint64_t b0, int64_t nb, const PhiloxKey& key, uint32_t* wa, uint32_t* wb) {
  constexpr int U = 4;
  const __m128i m0 = _mm_set1_epi64x(kPhiloxM0), m1 = _mm_set1_epi64x(kPhiloxM1);
  const __m128i lane = _mm_set_epi64x(1, 0);
  const __m128i low = _mm_set1_epi64x(0xffffffffLL);
  for (int64_t k = 0; k < nb; k += 2 * U) {
    const int u_end = int(std::min<int64_t>(U, (nb - k) / 2));
    __m128i x0[U], x1[U], x2[U], x3[U];
    for (int u = 0; u < U; ++u) {
      const __m128i b = _mm_add_epi64(_mm_set1_epi64x(int64_t(b0 + uint64_t(k + 2 * u))), lane);
      x0[u] = b;
      x1[u] = _mm_srli_epi64(b, 32);
      x2[u] = _mm_set1_epi64x(key.c2);
      x3[u] = _mm_set1_epi64x(key.c3);
    }
    uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const __m128i ka = _mm_set1_epi64x(k0), kb = _mm_set1_epi64x(k1);
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const __m128i p0 = _mm_mul_epu32(x0[u], m0), p1 = _mm_mul_epu32(x2[u], m1);
        x0[u] = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi64(p1, 32), x1[u]), ka);
        x2[u] = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi64(p0, 32), x3[u]), kb);
        x1[u] = p1;
        x3[u] = p0;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int u = 0; u < u_end; ++u) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(wa + 2 * (k + 2 * u)),
                       _mm_or_si128(_mm_and_si128(x0[u], low), _mm_slli_epi64(x2[u], 32)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(wb + 2 * (k + 2 * u)),
                       _mm_or_si128(_mm_and_si128(x1[u], low), _mm_slli_epi64(x3[u], 32)));
    }
  }
}
#endif

// The words of blocks [b0, b0 + nb) with the widest vectors of the capability `cap`.
template <typename Cap>
FS_ALWAYS_INLINE void philox_words(Cap cap, uint64_t b0, int64_t nb, const PhiloxKey& key, uint32_t* wa,
                                   uint32_t* wb) {
#if defined(FS_CNOISE_X86)
  if constexpr (decltype(cap)::value == Capability::kAvx512) philox_avx512(b0, nb, key, wa, wb);
  else if constexpr (decltype(cap)::value == Capability::kAvx2) philox_avx2(b0, nb, key, wa, wb);
  else philox_sse2(b0, nb, key, wa, wb);
#else
  for (int64_t k = 0; k < nb; ++k) {
    const uint64_t b = b0 + uint64_t(k);
    uint32_t w0 = uint32_t(b), w1 = uint32_t(b >> 32), w2 = key.c2, w3 = key.c3;
    philox4x32_10(w0, w1, w2, w3, key.k0, key.k1);
    wa[2 * k] = w0;
    wa[2 * k + 1] = w2;
    wb[2 * k] = w1;
    wb[2 * k + 1] = w3;
  }
#endif
}

// z[2p], z[2p + 1] = Box-Muller of (wa[p], wb[p]) for p < pairs. (-fno-math-errno lets g++ use the vector
// square root, which is correctly rounded like every backend's.)
FS_ALWAYS_INLINE void box_muller_pairs(const uint32_t* __restrict wa, const uint32_t* __restrict wb, int64_t pairs,
                                       float* __restrict z) {
#pragma omp simd
  for (int64_t p = 0; p < pairs; ++p) {
    float z0, z1;
    box_muller(wa[p], wb[p], z0, z1);
    z[2 * p] = z0;
    z[2 * p + 1] = z1;
  }
}

// A chunk's noise: the normals of global elements e0 .. e0 + len - 1 (len <= kChunk), at the returned
// pointer (inside `buf`).
struct NoiseBuffer {
  alignas(64) uint32_t wa[2 * kBlocks];
  alignas(64) uint32_t wb[2 * kBlocks];
  alignas(64) float z[4 * kBlocks];

  template <typename Cap>
  FS_ALWAYS_INLINE const float* fill(Cap cap, uint64_t e0, int64_t len, const PhiloxKey& key) {
    const uint64_t b0 = e0 >> 2;
    const int64_t skip = int64_t(e0 & 3);
    const int64_t nb = ((skip + len + 3) / 4 + 7) / 8 * 8;  // a multiple of 8 blocks (the widest Philox step)
    philox_words(cap, b0, nb, key, wa, wb);
    box_muller_pairs(wa, wb, (skip + len + 1) / 2, z);
    return z + skip;
  }
};

}  // namespace cnoise
}  // namespace cpu
}  // namespace fastscore
