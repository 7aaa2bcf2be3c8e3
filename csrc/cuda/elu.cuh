// Launchers of the ELU CUDA kernels (elu.cu) on raw pointers. Plain C++: included by the kernels
// (nvcc) and by the torch glue (elu_binding.cpp, g++), so the kernels never see a torch header (the
// CPU torch wheel cannot give nvcc torch's CUDA headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda_dtypes.cuh"

namespace fastscore {
namespace cuda {

// Every pointer is the storage of a dense, non-overlapping tensor of n elements, all with x's
// strides, so index e is the same element in each (the kernels never see the shape). Arithmetic in
// float64 for double, float32 otherwise.
//   elu_fwd:   dst = elu(x)          (dst may be x: in place)
//   elu_scale: dst = v * elu'(x)     (backward with v = grad_out, jvp with v = x_t)
// Enqueue on `stream` (the current device's); return the launch error.
template <typename T>
cudaError_t elu_fwd(const T* x, T* dst, int64_t n, cudaStream_t stream);
template <typename T>
cudaError_t elu_scale(const T* x, const T* v, T* dst, int64_t n, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastscore
