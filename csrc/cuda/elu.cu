// ELU (alpha = 1) on CUDA: forward (in place when dst is x), and v * elu'(x) for the backward and
// the jvp, float64 / float32 / bfloat16 / float16 (the last two computed in float32). Pure CUDA on
// raw pointers; the torch glue is elu_binding.cpp.
//
// Elementwise over the flat storage (every tensor has x's strides, so any layout is one range):
// a grid-stride loop in which each thread handles kUnroll elements per step, kThreads apart, so a
// warp's loads are contiguous and coalesced. The per-element rules are csrc/include/common_math.h's
// act_forward / act_grad, the arithmetic the CPU kernels and the fused norms run, with the forward
// keeping NaN as torch's ELU does (act_forward drops it through its min / max).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common_math.h"
#include "elu.cuh"

namespace fastscore {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride beyond this: plenty to fill any current GPU

// elu(p) = p for p > 0 (and NaN), expm1(p) otherwise.
template <typename A>
__device__ __forceinline__ A elu_value(A p) {
  return p <= A(0) ? act_forward(p, kActElu) : p;
}

// elu'(p) = 1 for p > 0, exp(p) otherwise, 1 at NaN (as the CPU kernel: act_grad).
template <typename A>
__device__ __forceinline__ A elu_grad(A p) {
  return act_grad(p, kActElu);
}

template <typename T, typename acc_t = typename AccOf<T>::type>
__global__ void __launch_bounds__(kThreads) elu_fwd_kernel(const T* x,  // (n,) x's storage
                                                           T* dst,      // (n,) x's strides; may be x
                                                           int64_t n) {
  const int64_t step = int64_t(gridDim.x) * kThreads * kUnroll;
  for (int64_t base = int64_t(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < n; base += step) {
    acc_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll independent requests in flight
      const int64_t e = base + int64_t(u) * kThreads;
      v[u] = e < n ? to_acc(x[e]) : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = base + int64_t(u) * kThreads;
      if (e < n) dst[e] = from_acc<T>(elu_value(v[u]));
    }
  }
}

template <typename T, typename acc_t = typename AccOf<T>::type>
__global__ void __launch_bounds__(kThreads) elu_scale_kernel(const T* __restrict__ x,  // (n,) x's storage
                                                             const T* __restrict__ v,  // (n,) grad_out or x_t
                                                             T* __restrict__ dst,      // (n,) grad_x or out_t
                                                             int64_t n) {
  const int64_t step = int64_t(gridDim.x) * kThreads * kUnroll;
  for (int64_t base = int64_t(blockIdx.x) * kThreads * kUnroll + threadIdx.x; base < n; base += step) {
    acc_t xs[kUnroll], vs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = base + int64_t(u) * kThreads;
      xs[u] = e < n ? to_acc(x[e]) : acc_t(0);
      vs[u] = e < n ? to_acc(v[e]) : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t e = base + int64_t(u) * kThreads;
      if (e < n) dst[e] = from_acc<T>(vs[u] * elu_grad(xs[u]));
    }
  }
}

unsigned blocks_for(int64_t n) {
  const int64_t per_block = int64_t(kThreads) * kUnroll;
  return unsigned(std::min<int64_t>((n + per_block - 1) / per_block, kMaxBlocks));
}

}  // namespace

template <typename T>
cudaError_t elu_fwd(const T* x, T* dst, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  elu_fwd_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(x, dst, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t elu_scale(const T* x, const T* v, T* dst, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  elu_scale_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(x, v, dst, n);
  return cudaGetLastError();
}

#define FS_ELU_INSTANTIATE(T)                                                \
  template cudaError_t elu_fwd<T>(const T*, T*, int64_t, cudaStream_t);      \
  template cudaError_t elu_scale<T>(const T*, const T*, T*, int64_t, cudaStream_t);

FS_ELU_INSTANTIATE(double)
FS_ELU_INSTANTIATE(float)
FS_ELU_INSTANTIATE(__half)
FS_ELU_INSTANTIATE(__nv_bfloat16)
#undef FS_ELU_INSTANTIATE

}  // namespace cuda
}  // namespace fastscore
