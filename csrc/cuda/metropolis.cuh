// Launchers of the MALA / HMC CUDA kernels (metropolis.cu) on raw pointers. Plain C++: included by the kernels
// (nvcc) and by the torch glue (metropolis_binding.cpp, g++), so the kernels never see a torch header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda_dtypes.cuh"

namespace fastscore {
namespace cuda {

// The shape of one call, as csrc/cpu/metropolis.cpp's: (N, ...) tensors in one layout, sample n at n * D;
// logical element i at (i / L) * row_stride + (i % L) * es within its sample (contiguous: L = D, es = 1;
// channels_last (N, C, H, W): L = H * W, row_stride = 1, es = C). coef: (N, 3) rows (a, b, c) in the compute
// type, row stride coef_stride. P = ceil(D / 1024) pieces per sample (csrc/include/metropolis_math.h).
struct MhShape {
  int64_t N = 0, D = 0, L = 1, row_stride = 1, es = 1, P = 0, coef_stride = 3;
};

// MALA (p_out null): x_out = (x + a s) + c z; HMC: p_out = z + b s, x_out = x + c p_out. partial (N, P): per
// piece the sum of z^2 (the halving tree), z the normal of global element e_base + n D + i under (seed, counter).
template <typename T>
cudaError_t mh_propose(const MhShape& s, const T* x, const T* score, const typename AccOf<T>::type* coef, T* x_out,
                       T* p_out, double* partial, uint64_t seed, uint64_t counter, uint64_t e_base,
                       cudaStream_t stream);

// out[n] = partial[n, 0] + partial[n, 1] + ... left to right.
cudaError_t mh_pieces(const double* partial, int64_t N, int64_t P, double* out, cudaStream_t stream);

// p = p + a s, x = x + c p (memory order; every tensor has x's layout).
template <typename T>
cudaError_t mh_leapfrog(const MhShape& s, T* x, T* p, const T* score, const typename AccOf<T>::type* coef,
                        cudaStream_t stream);

// The accept step: partial (N, P) workspace; p null for MALA. Writes accepted, log_alpha, energy (where
// accepted), then x, score <- x_prop, score_prop where accepted.
template <typename T>
cudaError_t mh_accept(const MhShape& s, T* x, T* score, double* energy, const T* x_prop, const T* score_prop,
                      const double* energy_prop, const T* p, const double* sq, const typename AccOf<T>::type* coef,
                      double* partial, bool* accepted, double* log_alpha, uint64_t seed, uint64_t counter,
                      uint64_t sample_offset, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastscore
