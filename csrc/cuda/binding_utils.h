// Shared by the torch glue of the CUDA kernels (*_binding.cpp): the kernels take raw pointers to
// __half / __nv_bfloat16, which have the same bits as at::Half / at::BFloat16.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastscore {
namespace cuda {

template <typename S>
struct CudaType {
  using type = S;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename S>
using cuda_t = typename CudaType<S>::type;

template <typename S>
cuda_t<S>* ptr(const at::Tensor& t) {
  return reinterpret_cast<cuda_t<S>*>(t.data_ptr<S>());
}

// An absent optional tensor is a null pointer (the kernels read it as "not given").
template <typename S>
const cuda_t<S>* ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? ptr<S>(*t) : nullptr;
}

}  // namespace cuda
}  // namespace fastscore
