// Launchers of the RefineNet CRP pooling CUDA kernels (crp_pool.cu) on raw pointers. Plain C++:
// included by the kernels (nvcc) and by the torch glue (crp_pool_binding.cpp, g++), so the kernels
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

// One call's arguments, as csrc/cpu/crp_pool.cpp's Problem. x, in2 and dst are (N, C, H, W) in one
// layout: NCHW, or NHWC when channels_last. Arithmetic in float64 for double, float32 otherwise.
template <typename T>
struct CrpArgs {
  int64_t N = 0, C = 0, H = 0, W = 0;  // C, H, W >= 1
  bool channels_last = false;
  int mode = 0;               // fastscore::crp::kMax or kAvg (crp_pool_math.h)
  const T* x = nullptr;       // the op's input
  const T* in2 = nullptr;     // grad_out (crp_bwd) or x_t (crp_jvp); unused by crp_fwd
  T* dst = nullptr;           // out, grad_x or out_t
  // crp_bwd only: crp_bwd_workspace_bytes(N, C, H, W, mode) bytes on the current device (max mode:
  // the code of each output's chosen input, one byte per element); may be null when that is 0.
  void* workspace = nullptr;
};

size_t crp_bwd_workspace_bytes(int64_t N, int64_t C, int64_t H, int64_t W, int mode);

// Enqueue the kernels of one direction on `stream` (the current device's); return the first launch error.
template <typename T>
cudaError_t crp_fwd(const CrpArgs<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t crp_bwd(const CrpArgs<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t crp_jvp(const CrpArgs<T>& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastscore
