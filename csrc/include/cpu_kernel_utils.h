// Helpers for the C++ CPU kernels (csrc/cpu/*.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

// Hot loops are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and the best one is
// picked at load time, so one build runs everywhere and still uses the widest vectors. The loops
// themselves are plain C++ that g++ vectorises; functions called from a cloned entry point must be
// FS_ALWAYS_INLINE so that their loops are compiled for the clone's target.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FS_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FS_TARGET_CLONES
#endif
#define FS_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fastscore {
namespace cpu {

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
// With at least as many samples as threads, each thread takes whole samples and runs the three
// steps back to back, so the map re-reads a sample that is still in its cache (one pass over
// memory instead of two). With fewer samples (N = 1, say) the steps run as three parallel phases
// over (sample, channel block) items so every thread has work.
template <typename Reduce, typename Finish, typename Map>
void run_sample_pipeline(int64_t N, int64_t C, int64_t HW, Reduce&& reduce, Finish&& finish, Map&& map) {
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
