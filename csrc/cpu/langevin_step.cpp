// Langevin / SDE sampler updates on CPU with counter-based Gaussian noise generated in the kernel:
//   langevin_step_update   x_mean = a x + b score, x = x_mean + c z (+ mask), per-sample (a, b, c)
//   langevin_step_norms    per-sample partial sums of score^2 and z^2 (the corrector's step-size pass)
//   langevin_step_randn    the noise itself (fastscore.ops.counter_randn)
// float64 / float32 / bfloat16 / float16, contiguous (N, ...) or channels_last (N, C, H, W).
//
// The noise of global element e is fixed by csrc/include/langevin_step_math.h (Philox4x32-10 +
// Box-Muller, float32). Elements are walked in their logical (row-major) order in chunks of kChunk:
// one chunk's normals are generated into an L1 buffer -- Philox words for all its blocks (AVX-512, AVX2 or
// SSE2 intrinsics by CPU capability: g++ does not turn the 32x32->64 multiplies into pmuludq by itself),
// then Box-Muller over the word pairs (one auto-vectorised loop) -- and consumed by the update loop. Each
// element's noise depends on e only, so results do not depend on the number of threads, on how the range
// is split, or on the CPU capability.
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

#include "checks.h"
#include "counter_noise_cpu.h"
#include "cpu_kernel_utils.h"
#include "langevin_step_args.h"
#include "langevin_step_math.h"

namespace fastscore {
namespace cpu {
namespace {

using namespace fastscore::lgv;

using namespace fastscore::cpu::cnoise;  // the chunked noise: kChunk, run_tasks, philox_words, NoiseBuffer

constexpr int64_t kTask = 4 * kChunk;  // elements per task handed to a thread

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
// MEAN also writes x_mean, MASK applies the mask (template flags, not null checks in the loop: a loop with
// conditional stores stays scalar for float16 / bfloat16).
template <bool STRIDED, bool GIVEN, bool MEAN, bool MASK, typename scalar_t>
FS_ALWAYS_INLINE void update_segment(const UpdateArgs<scalar_t>& p, int64_t n, int64_t base, int64_t len,
                                     const float* __restrict z) {
  using acc_t = typename UpdateArgs<scalar_t>::acc_t;
  const int64_t es = STRIDED ? p.es : 1;
  const acc_t* cf = p.coef + n * p.coef_stride;
  const acc_t a = cf[0], b = cf[1], c = cf[2];
  scalar_t* __restrict x = p.x + base;
  const scalar_t* __restrict g = p.score + base;
  const scalar_t* __restrict nz = GIVEN ? p.noise + base : nullptr;
  const int64_t within = base - n * p.D;
  scalar_t* __restrict xm = MEAN ? p.x_mean + base : nullptr;
  const scalar_t* __restrict m = MASK ? p.mask + n * p.mask_sn + within : nullptr;
  const scalar_t* __restrict kn = MASK ? p.known + n * p.known_sn + within : nullptr;
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const acc_t zk = GIVEN ? widen(nz[k * es]) : acc_t(z[k]);
    const acc_t mean = update_mean(widen(x[k * es]), widen(g[k * es]), a, b);
    if constexpr (MEAN) xm[k * es] = narrow<scalar_t>(mean);
    acc_t v = update_noise(mean, zk, c);
    if constexpr (MASK) v = apply_mask(v, widen(m[k * es]), widen(kn[k * es]));
    x[k * es] = narrow<scalar_t>(v);
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
    const acc_t zk = GIVEN ? widen(nz[k]) : acc_t(z[k]);
    x[k] = narrow<scalar_t>(update_noise(update_mean(widen(x[k]), widen(g[k]), ca[k], cb[k]), zk, cc[k]));
  }
}

constexpr int64_t kShortRow = 64;  // below this many elements per sample, update_short_rows

// Logical elements [j0, j1) of the whole batch (j = n * D + i), in row segments.
template <bool STRIDED, bool GIVEN, bool MEAN, bool MASK, typename scalar_t>
FS_ALWAYS_INLINE void update_range_impl(const UpdateArgs<scalar_t>& p, int64_t j0, int64_t j1, const float* z) {
  if (!STRIDED && !MEAN && !MASK && p.L < kShortRow) {
    update_short_rows<GIVEN>(p, j0, j1, z);
    return;
  }
  const int64_t rows_per_sample = p.D / p.L;
  // Divide once, then walk: row `row` of sample n, starting at element k of the row.
  const int64_t r0 = j0 / p.L;
  int64_t n = r0 / rows_per_sample, row = r0 - n * rows_per_sample, k = j0 - r0 * p.L;
  for (int64_t j = j0; j < j1;) {
    const int64_t len = std::min(j1 - j, p.L - k);
    update_segment<STRIDED, GIVEN, MEAN, MASK>(p, n, n * p.D + row * p.row_stride + k * (STRIDED ? p.es : 1), len,
                                               GIVEN ? nullptr : z + (j - j0));
    j += len;
    k = 0;
    if (++row == rows_per_sample) {
      row = 0;
      ++n;
    }
  }
}

// f(std::bool_constant<v>{}): a run-time flag as a template argument.
template <typename F>
FS_ALWAYS_INLINE void with_flag(bool v, const F& f) {
  if (v) f(std::true_type{});
  else f(std::false_type{});
}

template <typename scalar_t>
FS_ALWAYS_INLINE void update_range(const UpdateArgs<scalar_t>& p, int64_t j0, int64_t j1, const float* z) {
  with_flag(p.es != 1, [&](auto strided) FS_VECTOR_BODY {
    with_flag(p.noise != nullptr, [&](auto given) FS_VECTOR_BODY {
      with_flag(p.x_mean != nullptr, [&](auto mean) FS_VECTOR_BODY {
        with_flag(p.mask != nullptr, [&](auto mask) FS_VECTOR_BODY {
          update_range_impl<strided(), given(), mean(), mask()>(p, j0, j1, z);
        });
      });
    });
  });
}

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
    dispatch_capability([&](auto cap) FS_VECTOR_BODY {
      const int64_t begin = task * kTask, end = std::min(total, begin + kTask);
      const bool prefetch = !p.noise && p.es == 1;  // contiguous: memory order = logical order
      if (prefetch) prefetch_chunk(p, begin, std::min(end, begin + kChunk));
      for (int64_t j0 = begin; j0 < end; j0 += kChunk) {
        const int64_t j1 = std::min(end, j0 + kChunk);
        if (prefetch && j1 < end) prefetch_chunk(p, j1, std::min(end, j1 + kChunk));  // the next chunk's
        const float* z = p.noise ? nullptr : buf.fill(cap, p.e_base + uint64_t(j0), j1 - j0, p.key);
        update_range(p, j0, j1, z);
      }
    });
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
  for (int64_t k = 0; k < len; ++k) s += acc_t(widen(v[k])) * acc_t(widen(v[k]));
  return double(s);
}

FS_ALWAYS_INLINE double sum_squares(const float* v, int64_t len) { return sum_squares_impl<float>(v, len); }
FS_ALWAYS_INLINE double sum_squares(const double* v, int64_t len) { return sum_squares_impl<double>(v, len); }
FS_ALWAYS_INLINE double sum_squares(const at::Half* v, int64_t len) { return sum_squares_impl<float>(v, len); }
FS_ALWAYS_INLINE double sum_squares(const at::BFloat16* v, int64_t len) { return sum_squares_impl<float>(v, len); }
FS_ALWAYS_INLINE double sum_squares_f64(const float* v, int64_t len) { return sum_squares_impl<double>(v, len); }

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
      dispatch_capability([&](auto cap) FS_VECTOR_BODY {
        const int64_t n = t / pieces, i1 = std::min(l.D, (t - n * pieces + 1) * piece);
        double sg = 0, sz = 0;
        for (int64_t i0 = std::min(l.D, (t - n * pieces) * piece); i0 < i1; i0 += kChunk) {
          const int64_t len = std::min(kChunk, i1 - i0);
          const int64_t off = n * l.D + i0;
          sg += sum_squares(g + off, len);
          if (nz != nullptr) {
            sz += sum_squares(nz + off, len);
          } else {
            const float* z = buf.fill(cap, e_base + uint64_t(off), len, key);
            sz += std::is_same<scalar_t, double>::value ? sum_squares_f64(z, len) : sum_squares(z, len);
          }
        }
        o[2 * t] = sg;
        o[2 * t + 1] = sz;
      });
    });
  });
}

template <typename scalar_t>
FS_ALWAYS_INLINE void store_normals(const float* __restrict z, int64_t len, scalar_t* __restrict out) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) out[k] = narrow<scalar_t>(at::opmath_type<scalar_t>(z[k]));
}

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
      dispatch_capability([&](auto cap) FS_VECTOR_BODY {
        const int64_t end = std::min(total, (task + 1) * kTask);
        for (int64_t j0 = task * kTask; j0 < end; j0 += kChunk) {
          const int64_t len = std::min(kChunk, end - j0);
          store_normals(buf.fill(cap, e_base + uint64_t(j0), len, key), len, o + j0);
        }
      });
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
