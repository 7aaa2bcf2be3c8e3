// Launchers of the Langevin / SDE update CUDA kernels (langevin_step.cu) on raw pointers. Plain C++:
// included by the kernels (nvcc) and by the torch glue (langevin_step_binding.cpp, g++), so the kernels
// never see a torch header (the CPU torch wheel cannot give nvcc torch's CUDA headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda_dtypes.cuh"

namespace fastscore {
namespace cuda {

// One call, as csrc/cpu/langevin_step.cpp's UpdateArgs. x, score, noise, x_mean: (N, ...) in one layout,
// sample n at n * D; logical element i of a sample sits at (i / L) * row_stride + (i % L) * es within it
// (contiguous: L = D, es = 1; channels_last (N, C, H, W): L = H * W, row_stride = 1, es = C).
// mask / known: x's layout, sample stride 0 (shared by all samples) or D. coef: (N, 3) rows (a, b, c).
// The noise of logical element (n, i) is the normal of global element e_base + n * D + i under
// (seed, counter) (csrc/include/langevin_step_math.h), unless `noise` is given.
template <typename T>
struct LgvArgs {
  using acc_t = typename AccOf<T>::type;
  int64_t N = 0, D = 0, L = 1, row_stride = 1, es = 1;
  T* x = nullptr;
  const T* score = nullptr;
  const T* noise = nullptr;  // null: generate
  const acc_t* coef = nullptr;
  int64_t coef_stride = 3;
  const T* mask = nullptr;  // null: no mask (then known is ignored)
  const T* known = nullptr;
  int64_t mask_sn = 0, known_sn = 0;
  T* x_mean = nullptr;  // null: not kept
  uint64_t seed = 0, counter = 0, e_base = 0;
};

// x_mean = a x + b score, x = x_mean + c z, then x = mask known + (1 - mask) x.
template <typename T>
cudaError_t lgv_update(const LgvArgs<T>& p, cudaStream_t stream);

// out (N, pieces, 2) float64: per sample and piece of ceil(D / pieces) memory positions, the sums of score^2
// and z^2 (summed in the compute type). pieces and N at most 65535.
template <typename T>
cudaError_t lgv_norms(const T* score, const T* noise, int64_t N, int64_t D, int64_t pieces, uint64_t seed,
                      uint64_t counter, uint64_t e_base, double* out, cudaStream_t stream);

// out[j] = the normal of global element e_base + j, for j < total (out contiguous).
template <typename T>
cudaError_t lgv_randn(T* out, int64_t total, uint64_t seed, uint64_t counter, uint64_t e_base, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastscore
