// Langevin / SDE sampler updates on CPU with counter-based Gaussian noise generated in the kernel:
//   langevin_step_update   x_mean = a x + b score, x = x_mean + c z (+ mask), per-sample (a, b, c)
//   langevin_step_norms    per-sample partial sums of score^2 and z^2 (the corrector's step-size pass)
//   langevin_step_randn    the noise itself (fastscore.ops.counter_randn)
// float64 / float32 / bfloat16 / float16, contiguous (N, ...) or channels_last (N, C, H, W).
//
// The noise of global element e is fixed by csrc/include/langevin_step_math.h (Philox4x32-10 +
// Box-Muller, float32). Elements are walked in their logical (row-major) order in chunks of kChunk:
// one chunk's normals are generated into an L1 buffer -- Philox words for all its blocks (AVX-512 /
// AVX2 intrinsics where the CPU has them: g++ does not turn the 32x32->64 multiplies into vpmuludq
// by itself), then Box-Muller over the word pairs (auto-vectorised, target clones, around a vector
// sqrt by hand) -- and consumed by the update loop. Each element's noise depends on e only, so results
// do not depend on the number of threads or on how the range is split.
//
// fp-contract=off for this whole file (before any include, so every inlined function agrees): the
// generator's float path must be the exact sequence of roundings the other backends compute.
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FS_LGV_X86 1
#endif

#include "checks.h"
#include "cpu_kernel_utils.h"
#include "langevin_step_args.h"
#include "langevin_step_math.h"

namespace fastscore {
namespace cpu {
namespace {

using namespace fastscore::lgv;

constexpr int64_t kChunk = 1024;                   // elements per noise chunk (4 KiB of normals)
constexpr int64_t kBlocks = (kChunk + 3) / 4 + 8;  // Philox blocks covering an unaligned chunk, rounded up to 8
constexpr int64_t kTask = 4 * kChunk;              // elements per task handed to a thread

// ---- work distribution -------------------------------------------------------------------------------

// fn(task, buffer) for every task in [0, tasks), on the intra-op threads, handing the tasks out one at a
// time: the calling thread starts at once and a thread that wakes late (an idle OpenMP worker takes tens of
// microseconds to wake on a VM, a large share of a 100 us step) simply takes fewer tasks. Every element's
// result depends on its index only, so who computes what never changes the bits.
template <typename Buffer, typename Fn>
void run_tasks(int64_t tasks, Fn&& fn) {
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

void philox_portable(uint64_t b0, int64_t nb, const PhiloxKey& key, uint32_t* wa, uint32_t* wb) {
  for (int64_t k = 0; k < nb; ++k) {
    const uint64_t b = b0 + uint64_t(k);
    uint32_t w0 = uint32_t(b), w1 = uint32_t(b >> 32), w2 = key.c2, w3 = key.c3;
    philox4x32_10(w0, w1, w2, w3, key.k0, key.k1);
    wa[2 * k] = w0;
    wa[2 * k + 1] = w2;
    wb[2 * k] = w1;
    wb[2 * k + 1] = w3;
  }
}

#if defined(FS_LGV_X86)
// One block per 64-bit lane: vpmuludq multiplies the low 32 bits of each lane into the full 64-bit
// product, so a Philox round is two multiplies, two shifts and two 3-way XORs per 8 blocks. The upper
// halves of the lanes carry junk that no multiply or final store reads. Four vectors in flight hide
// the multiply latency.
__attribute__((target("avx512f"))) void philox_avx512(uint64_t b0, int64_t nb, const PhiloxKey& key, uint32_t* wa,
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

__attribute__((target("avx2"))) void philox_avx2(uint64_t b0, int64_t nb, const PhiloxKey& key, uint32_t* wa,
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
#endif

using PhiloxFn = void (*)(uint64_t, int64_t, const PhiloxKey&, uint32_t*, uint32_t*);

PhiloxFn pick_philox() {
#if defined(FS_LGV_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return philox_avx512;
  if (__builtin_cpu_supports("avx2")) return philox_avx2;
#endif
  return philox_portable;
}

const PhiloxFn philox_words = pick_philox();

// r2[p] <- sqrt(r2[p]) for p < n (n rounded up to 16; the buffer has room): the one step of Box-Muller that
// g++ will not vectorise by itself (a library sqrt may set errno), so by hand where the CPU allows.
void sqrt_portable(float* r2, int64_t n) {
  for (int64_t p = 0; p < n; ++p) r2[p] = fsqrt(r2[p]);
}

#if defined(FS_LGV_X86)
__attribute__((target("avx512f"))) void sqrt_avx512(float* r2, int64_t n) {
  for (int64_t p = 0; p < n; p += 16) _mm512_store_ps(r2 + p, _mm512_sqrt_ps(_mm512_load_ps(r2 + p)));
}

__attribute__((target("avx"))) void sqrt_avx(float* r2, int64_t n) {
  for (int64_t p = 0; p < n; p += 8) _mm256_store_ps(r2 + p, _mm256_sqrt_ps(_mm256_load_ps(r2 + p)));
}
#endif

using SqrtFn = void (*)(float*, int64_t);

SqrtFn pick_sqrt() {
#if defined(FS_LGV_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return sqrt_avx512;
  if (__builtin_cpu_supports("avx")) return sqrt_avx;
#endif
  return sqrt_portable;
}

const SqrtFn sqrt_inplace = pick_sqrt();

// z[2p], z[2p + 1] = Box-Muller of (wa[p], wb[p]) for p < pairs: r^2, then r, then the rotation.
FS_TARGET_CLONES void box_muller_r2s(const uint32_t* __restrict wa, int64_t pairs, float* __restrict r2) {
#pragma omp simd
  for (int64_t p = 0; p < pairs; ++p) r2[p] = box_muller_r2(wa[p]);
}

FS_TARGET_CLONES void box_muller_finishes(const uint32_t* __restrict wb, const float* __restrict r, int64_t pairs,
                                          float* __restrict z) {
#pragma omp simd
  for (int64_t p = 0; p < pairs; ++p) {
    float z0, z1;
    box_muller_finish(wb[p], r[p], z0, z1);
    z[2 * p] = z0;
    z[2 * p + 1] = z1;
  }
}

// A chunk's noise: the normals of global elements e0 .. e0 + len - 1 (len <= kChunk), at the returned
// pointer (inside `buf`).
struct NoiseBuffer {
  alignas(64) uint32_t wa[2 * kBlocks];
  alignas(64) uint32_t wb[2 * kBlocks];
  alignas(64) float r[2 * kBlocks];
  alignas(64) float z[4 * kBlocks];

  const float* fill(uint64_t e0, int64_t len, const PhiloxKey& key) {
    const uint64_t b0 = e0 >> 2;
    const int64_t skip = int64_t(e0 & 3);
    const int64_t nb = ((skip + len + 3) / 4 + 7) / 8 * 8;  // 2 nb pairs, a multiple of 16
    const int64_t pairs = (skip + len + 1) / 2, pairs16 = (pairs + 15) / 16 * 16;  // pairs16 <= 2 nb
    philox_words(b0, nb, key, wa, wb);
    box_muller_r2s(wa, pairs16, r);
    sqrt_inplace(r, pairs16);
    box_muller_finishes(wb, r, pairs, z);
    return z + skip;
  }
};

// ---- the update -------------------------------------------------------------------------------------

// x, score, noise, x_mean: (N, ...) in one layout; sample n at offset n * D. Logical element i of a
// sample is element k of row r = i / L at memory offset r * row_stride + k * ES: contiguous, one row
// per sample (L = D); channels_last (N, C, H, W), a row per channel (L = H * W, row_stride 1,
// ES = C). mask / known: x's layout, sample stride 0 (shared) or D. coef: (N, 3) rows (a, b, c).
template <typename scalar_t>
struct UpdateArgs {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t N = 0, D = 0, L = 0, row_stride = 0, es = 1;
  scalar_t* x = nullptr;
  const scalar_t* score = nullptr;
  const scalar_t* noise = nullptr;  // null: generate
  const acc_t* coef = nullptr;
  int64_t coef_stride = 3;
  const scalar_t* mask = nullptr;  // null: no mask
  const scalar_t* known = nullptr;
  int64_t mask_sn = 0, known_sn = 0;
  scalar_t* x_mean = nullptr;  // null: not kept
  PhiloxKey key;
  uint64_t e_base = 0;  // sample_offset * D
};

// One row segment: logical elements k = 0 .. len - 1 at memory offsets base + k * ES of sample n.
// GENERAL adds x_mean and the mask (null pointers are loop-invariant: g++ unswitches them).
template <bool STRIDED, bool GIVEN, bool GENERAL, typename scalar_t>
FS_ALWAYS_INLINE void update_segment(const UpdateArgs<scalar_t>& p, int64_t n, int64_t base, int64_t len,
                                     const float* __restrict z) {
  using acc_t = typename UpdateArgs<scalar_t>::acc_t;
  const int64_t es = STRIDED ? p.es : 1;
  const acc_t* cf = p.coef + n * p.coef_stride;
  const acc_t a = cf[0], b = cf[1], c = cf[2];
  scalar_t* __restrict x = p.x + base;
  const scalar_t* __restrict g = p.score + base;
  const scalar_t* __restrict nz = GIVEN ? p.noise + base : nullptr;
  if (!GENERAL) {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      const acc_t zk = GIVEN ? acc_t(nz[k * es]) : acc_t(z[k]);
      x[k * es] = scalar_t(update_noise(update_mean(acc_t(x[k * es]), acc_t(g[k * es]), a, b), zk, c));
    }
    return;
  }
  const int64_t within = base - n * p.D;
  scalar_t* __restrict xm = p.x_mean ? p.x_mean + base : nullptr;
  const scalar_t* __restrict m = p.mask ? p.mask + n * p.mask_sn + within : nullptr;
  const scalar_t* __restrict kn = p.mask ? p.known + n * p.known_sn + within : nullptr;
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const acc_t zk = GIVEN ? acc_t(nz[k * es]) : acc_t(z[k]);
    const acc_t mean = update_mean(acc_t(x[k * es]), acc_t(g[k * es]), a, b);
    if (xm) xm[k * es] = scalar_t(mean);
    acc_t v = update_noise(mean, zk, c);
    if (m) v = apply_mask(v, acc_t(m[k * es]), acc_t(kn[k * es]));
    x[k * es] = scalar_t(v);
  }
}

// Contiguous, no mask, short samples (the toy 2-D chains): a segment per sample would cost more than its
// elements, so the per-sample coefficients are spread over the chunk first and one loop does the update.
template <bool GIVEN, typename scalar_t>
FS_ALWAYS_INLINE void update_short_rows(const UpdateArgs<scalar_t>& p, int64_t j0, int64_t j1,
                                        const float* __restrict z) {
  using acc_t = typename UpdateArgs<scalar_t>::acc_t;
  alignas(64) acc_t ca[kChunk], cb[kChunk], cc[kChunk];
  // One division per chunk (a 64-bit division costs more than a short sample's update).
  for (int64_t n = j0 / p.D, j = j0; j < j1; ++n) {
    const int64_t len = std::min(j1, (n + 1) * p.D) - j;
    const acc_t* cf = p.coef + n * p.coef_stride;
    for (int64_t k = j - j0; k < j - j0 + len; ++k) {
      ca[k] = cf[0];
      cb[k] = cf[1];
      cc[k] = cf[2];
    }
    j += len;
  }
  scalar_t* __restrict x = p.x + j0;
  const scalar_t* __restrict g = p.score + j0;
  const scalar_t* __restrict nz = GIVEN ? p.noise + j0 : nullptr;
#pragma omp simd
  for (int64_t k = 0; k < j1 - j0; ++k) {
    const acc_t zk = GIVEN ? acc_t(nz[k]) : acc_t(z[k]);
    x[k] = scalar_t(update_noise(update_mean(acc_t(x[k]), acc_t(g[k]), ca[k], cb[k]), zk, cc[k]));
  }
}

constexpr int64_t kShortRow = 64;  // below this many elements per sample, update_short_rows

// Logical elements [j0, j1) of the whole batch (j = n * D + i), in row segments.
template <bool STRIDED, bool GIVEN, bool GENERAL, typename scalar_t>
FS_ALWAYS_INLINE void update_range_impl(const UpdateArgs<scalar_t>& p, int64_t j0, int64_t j1, const float* z) {
  if (!STRIDED && !GENERAL && p.L < kShortRow) {
    update_short_rows<GIVEN>(p, j0, j1, z);
    return;
  }
  const int64_t rows_per_sample = p.D / p.L;
  // Divide once, then walk: row `row` of sample n, starting at element k of the row.
  const int64_t r0 = j0 / p.L;
  int64_t n = r0 / rows_per_sample, row = r0 - n * rows_per_sample, k = j0 - r0 * p.L;
  for (int64_t j = j0; j < j1;) {
    const int64_t len = std::min(j1 - j, p.L - k);
    update_segment<STRIDED, GIVEN, GENERAL>(p, n, n * p.D + row * p.row_stride + k * (STRIDED ? p.es : 1), len,
                                            GIVEN ? nullptr : z + (j - j0));
    j += len;
    k = 0;
    if (++row == rows_per_sample) {
      row = 0;
      ++n;
    }
  }
}

#define FS_LGV_UPDATE_ENTRY(scalar_t)                                                                         \
  FS_TARGET_CLONES void update_range(const UpdateArgs<scalar_t>& p, int64_t j0, int64_t j1, const float* z) { \
    const bool general = p.x_mean != nullptr || p.mask != nullptr;                                            \
    const bool given = p.noise != nullptr;                                                                    \
    if (p.es != 1) {                                                                                          \
      if (given) general ? update_range_impl<true, true, true>(p, j0, j1, z)                                  \
                         : update_range_impl<true, true, false>(p, j0, j1, z);                                \
      else general ? update_range_impl<true, false, true>(p, j0, j1, z)                                       \
                   : update_range_impl<true, false, false>(p, j0, j1, z);                                     \
    } else {                                                                                                  \
      if (given) general ? update_range_impl<false, true, true>(p, j0, j1, z)                                 \
                         : update_range_impl<false, true, false>(p, j0, j1, z);                               \
      else general ? update_range_impl<false, false, true>(p, j0, j1, z)                                      \
                   : update_range_impl<false, false, false>(p, j0, j1, z);                                    \
    }                                                                                                         \
  }
FS_LGV_UPDATE_ENTRY(float)
FS_LGV_UPDATE_ENTRY(double)
FS_LGV_UPDATE_ENTRY(at::Half)
FS_LGV_UPDATE_ENTRY(at::BFloat16)
#undef FS_LGV_UPDATE_ENTRY

// In a sampler the score net runs between two steps, so x and the score arrive cold (L3 or DRAM). The noise
// generation does no memory traffic of its own: asking for the next chunk's x and score while generating
// this chunk's noise overlaps the two, where the hardware prefetchers would only start at the first load.
template <typename scalar_t>
FS_ALWAYS_INLINE void prefetch_chunk(const UpdateArgs<scalar_t>& p, int64_t j0, int64_t j1) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(scalar_t));
  for (int64_t j = j0; j < j1; j += kLine) {
    __builtin_prefetch(p.x + j, 1);
    __builtin_prefetch(p.score + j, 0);
  }
}

template <typename scalar_t>
void run_update(const UpdateArgs<scalar_t>& p) {
  const int64_t total = p.N * p.D;
  run_tasks<NoiseBuffer>((total + kTask - 1) / kTask, [&](int64_t task, NoiseBuffer& buf) {
    const int64_t begin = task * kTask, end = std::min(total, begin + kTask);
    const bool prefetch = !p.noise && p.es == 1;  // contiguous: memory order = logical order
    if (prefetch) prefetch_chunk(p, begin, std::min(end, begin + kChunk));
    for (int64_t j0 = begin; j0 < end; j0 += kChunk) {
      const int64_t j1 = std::min(end, j0 + kChunk);
      if (prefetch && j1 < end) prefetch_chunk(p, j1, std::min(end, j1 + kChunk));  // the next chunk's
      const float* z = p.noise ? nullptr : buf.fill(p.e_base + uint64_t(j0), j1 - j0, p.key);
      update_range(p, j0, j1, z);
    }
  });
}

// ---- per-sample sums of squares ------------------------------------------------------------------------

// Sums over a piece of kChunk elements in the compute type, then in double across pieces in a fixed
// order: deterministic whatever the threads, and float64-like accuracy for large samples.
// acc_t: the compute type of the call (float64 for float64 tensors, so generated float32 normals are squared
// and summed in double there too).
template <typename acc_t, typename T>
FS_ALWAYS_INLINE double sum_squares_impl(const T* __restrict v, int64_t len) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < len; ++k) s += acc_t(v[k]) * acc_t(v[k]);
  return double(s);
}

FS_TARGET_CLONES double sum_squares(const float* v, int64_t len) { return sum_squares_impl<float>(v, len); }
FS_TARGET_CLONES double sum_squares(const double* v, int64_t len) { return sum_squares_impl<double>(v, len); }
FS_TARGET_CLONES double sum_squares(const at::Half* v, int64_t len) { return sum_squares_impl<float>(v, len); }
FS_TARGET_CLONES double sum_squares(const at::BFloat16* v, int64_t len) { return sum_squares_impl<float>(v, len); }
FS_TARGET_CLONES double sum_squares_f64(const float* v, int64_t len) { return sum_squares_impl<double>(v, len); }

// ---- op entry points -----------------------------------------------------------------------------------

#define FS_DISPATCH_LGV(t, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (t).scalar_type(), "langevin_step", __VA_ARGS__)

void langevin_step_update(at::Tensor x, const at::Tensor& score, const at::Tensor& coef,
                          const c10::optional<at::Tensor>& noise, int64_t seed, int64_t counter, int64_t sample_offset,
                          const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& known,
                          c10::optional<at::Tensor> x_mean) {
  const UpdateShape shape = check_update(x, score, coef, noise, sample_offset, mask, known, x_mean);
  const Layout& l = shape.l;
  const int64_t mask_sn = shape.mask_sn, known_sn = shape.known_sn;
  if (x.numel() == 0) return;
  FS_DISPATCH_LGV(x, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    UpdateArgs<scalar_t> p;
    p.N = l.N;
    p.D = l.D;
    p.L = l.L;
    p.row_stride = l.row_stride;
    p.es = l.es;
    p.x = x.data_ptr<scalar_t>();
    p.score = score.data_ptr<scalar_t>();
    p.noise = noise.has_value() ? noise->data_ptr<scalar_t>() : nullptr;
    p.coef = coef.data_ptr<acc_t>();
    p.coef_stride = coef.stride(0);
    p.mask = mask.has_value() ? mask->data_ptr<scalar_t>() : nullptr;
    p.known = known.has_value() ? known->data_ptr<scalar_t>() : nullptr;
    p.mask_sn = mask_sn;
    p.known_sn = known_sn;
    p.x_mean = x_mean.has_value() ? x_mean->data_ptr<scalar_t>() : nullptr;
    p.key = philox_key(uint64_t(seed), uint64_t(counter));
    p.e_base = uint64_t(sample_offset) * uint64_t(l.D);
    run_update(p);
  });
}

// out (N, P, 2) float64: per sample and piece of ceil(D / P) memory positions, the sums of score^2 and z^2
// (z = noise, or the normal of element index m at memory position m). One task per piece, in noise chunks.
void langevin_step_norms(const at::Tensor& score, const c10::optional<at::Tensor>& noise, int64_t seed,
                         int64_t counter, int64_t sample_offset, at::Tensor out) {
  const Layout l = check_norms(score, noise, sample_offset, out);
  const int64_t pieces = out.size(1);
  const int64_t piece = std::max<int64_t>(1, (l.D + pieces - 1) / pieces);
  double* o = out.data_ptr<double>();
  const PhiloxKey key = philox_key(uint64_t(seed), uint64_t(counter));
  const uint64_t e_base = uint64_t(sample_offset) * uint64_t(l.D);
  FS_DISPATCH_LGV(score, [&] {
    const scalar_t* g = score.data_ptr<scalar_t>();
    const scalar_t* nz = noise.has_value() ? noise->data_ptr<scalar_t>() : nullptr;
    run_tasks<NoiseBuffer>(l.N * pieces, [&](int64_t t, NoiseBuffer& buf) {
      const int64_t n = t / pieces, i1 = std::min(l.D, (t - n * pieces + 1) * piece);
      double sg = 0, sz = 0;
      for (int64_t i0 = std::min(l.D, (t - n * pieces) * piece); i0 < i1; i0 += kChunk) {
        const int64_t len = std::min(kChunk, i1 - i0);
        const int64_t off = n * l.D + i0;
        sg += sum_squares(g + off, len);
        if (nz != nullptr) {
          sz += sum_squares(nz + off, len);
        } else {
          const float* z = buf.fill(e_base + uint64_t(off), len, key);
          sz += std::is_same<scalar_t, double>::value ? sum_squares_f64(z, len) : sum_squares(z, len);
        }
      }
      o[2 * t] = sg;
      o[2 * t + 1] = sz;
    });
  });
}

template <typename scalar_t>
FS_ALWAYS_INLINE void store_impl(const float* __restrict z, int64_t len, scalar_t* __restrict out) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) out[k] = scalar_t(z[k]);
}
FS_TARGET_CLONES void store_normals(const float* z, int64_t len, float* out) { store_impl(z, len, out); }
FS_TARGET_CLONES void store_normals(const float* z, int64_t len, double* out) { store_impl(z, len, out); }
FS_TARGET_CLONES void store_normals(const float* z, int64_t len, at::Half* out) { store_impl(z, len, out); }
FS_TARGET_CLONES void store_normals(const float* z, int64_t len, at::BFloat16* out) { store_impl(z, len, out); }

// out (N, ...) contiguous: out[n, i] = the normal of global element (sample_offset + n) * D + i.
void langevin_step_randn(at::Tensor out, int64_t seed, int64_t counter, int64_t sample_offset) {
  const Layout l = check_randn(out, sample_offset);
  if (out.numel() == 0) return;
  const PhiloxKey key = philox_key(uint64_t(seed), uint64_t(counter));
  const uint64_t e_base = uint64_t(sample_offset) * uint64_t(l.D);
  FS_DISPATCH_LGV(out, [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t total = out.numel();
    run_tasks<NoiseBuffer>((total + kTask - 1) / kTask, [&](int64_t task, NoiseBuffer& buf) {
      const int64_t end = std::min(total, (task + 1) * kTask);
      for (int64_t j0 = task * kTask; j0 < end; j0 += kChunk) {
        const int64_t len = std::min(kChunk, end - j0);
        store_normals(buf.fill(e_base + uint64_t(j0), len, key), len, o + j0);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastscore_C, CPU, m) {
  m.impl("langevin_step_update", &langevin_step_update);
  m.impl("langevin_step_norms", &langevin_step_norms);
  m.impl("langevin_step_randn", &langevin_step_randn);
}

}  // namespace cpu
}  // namespace fastscore
