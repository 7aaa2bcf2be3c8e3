// Launchers of the InstanceNorm++ CUDA kernels (cond_instance_norm.cu) on raw pointers. Plain C++:
// included by the kernels (nvcc) and by the torch glue (cond_instance_norm_binding.cpp, g++), so the
// kernels never see a torch header (the CPU torch wheel cannot give nvcc torch's CUDA headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda_dtypes.cuh"

namespace fastscore {
namespace cuda {

// One (N, C) parameter read through its strides (an unconditional (C,) parameter arrives expanded,
// s0 = 0). A null ptr is an absent parameter and reads as 0.
template <typename A>
struct CinRows {
  const A* ptr = nullptr;
  int64_t s0 = 0, s1 = 0;
};

// One call's arguments, as csrc/cpu/cond_instance_norm.cpp's Problem. The activations x, out,
// grad_out, grad_x, x_t, out_t are (N, C, H, W) in one layout: NCHW, or NHWC when channels_last;
// sample n starts at n * C * HW either way. Each launcher reads only the fields of its direction.
template <typename T>
struct CinArgs {
  using acc_t = typename AccOf<T>::type;
  int64_t N = 0, C = 0, HW = 0;  // HW = H * W > 0; alpha needs C >= 2 (checked by the caller)
  bool channels_last = false;
  int act = 0;  // fastscore::kActNone or kActElu (common_math.h)
  acc_t eps = 0;
  const T* x = nullptr;
  CinRows<acc_t> gamma, alpha, beta;  // alpha, beta may be absent
  acc_t* mean = nullptr;              // (N, C) contiguous: written by fwd, read by bwd and jvp
  acc_t* rstd = nullptr;              // (N, C) contiguous: likewise
  // forward
  T* out = nullptr;  // may be x itself (in place)
  // backward
  const T* grad_out = nullptr;
  T* grad_x = nullptr;
  acc_t* grad_gamma = nullptr;  // (N, C) contiguous
  acc_t* grad_alpha = nullptr;  // (N, C) contiguous; null when alpha is absent
  acc_t* grad_beta = nullptr;   // (N, C) contiguous; null when beta is absent
  // forward-mode; every tangent may be absent (zero)
  const T* x_t = nullptr;
  CinRows<acc_t> gamma_t, alpha_t, beta_t;
  T* out_t = nullptr;
  // scratch of cin_workspace_bytes<T>(N, C, HW, channels_last) bytes, 256-byte aligned, on the
  // current device; its size depends on that device's SM count, so ask under the same device.
  void* workspace = nullptr;
};

template <typename T>
size_t cin_workspace_bytes(int64_t N, int64_t C, int64_t HW, bool channels_last);

// Enqueue the kernels of one direction on `stream` (the current device's); return the first launch error.
template <typename T>
cudaError_t cin_fwd(const CinArgs<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t cin_bwd(const CinArgs<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t cin_jvp(const CinArgs<T>& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastscore
