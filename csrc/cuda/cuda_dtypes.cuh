// Accumulation types and element conversions shared by fastscore's CUDA kernels. Plain C++ outside nvcc
// (the launcher headers that include it are also read by the torch glue, compiled by g++).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastscore {
namespace cuda {

// Statistics, coefficients and all arithmetic: float64 for double, float32 for float, half, bfloat16.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

#ifdef __CUDACC__
// torch builds .cu files with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__, so every
// conversion is spelled out (round to nearest even, as c10::Half / c10::BFloat16).
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace fastscore
