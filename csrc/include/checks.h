// Argument checks shared by the C++ ops. The Python layer (fastscore/ops/*.py) validates first
// and names the public argument; these are the safety net for direct torch.ops.fastscore_C calls.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace fastscore {

// The accumulation (statistics, coefficients, sums) dtype: float64 for double, float32 for float, half and
// bfloat16.
inline at::ScalarType acc_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// NCHW-contiguous or NHWC-contiguous (channels_last): the two layouts the kernels read directly.
inline bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline void check_image(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 4, name, ": expected a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), name, ": expected a floating-point tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), name,
                    ": expected a contiguous or channels_last tensor");
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, ": expected shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(), ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(is_channels_last(t) == is_channels_last(x) &&
                        (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)),
                    name, ": expected the memory layout of x (contiguous or channels_last like x)");
}

// An (N, C) row-parameter in the accumulation dtype; any strides (stride 0 for expanded (C,)).
inline void check_rows(const at::Tensor& p, const char* name, int64_t N, int64_t C, at::ScalarType dtype,
                       const at::Device& device) {
  TORCH_CHECK_VALUE(p.dim() == 2 && p.size(0) == N && p.size(1) == C, name, ": expected shape (", N, ", ", C,
                    "), got ", p.sizes());
  TORCH_CHECK_TYPE(p.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", p.scalar_type());
  TORCH_CHECK_VALUE(p.device() == device, name, ": expected device ", device, ", got ", p.device());
}

inline void check_optional_rows(const c10::optional<at::Tensor>& p, const char* name, int64_t N, int64_t C,
                                at::ScalarType dtype, const at::Device& device) {
  if (p.has_value()) check_rows(*p, name, N, C, dtype, device);
}

// Any shape, dense and non-overlapping (the elementwise kernels walk the storage in memory order).
inline void check_dense_float(const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), name, ": expected a floating-point tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.is_non_overlapping_and_dense(), name, ": expected a dense, non-overlapping tensor");
}

// t is laid out as x: same shape, dtype, device, and the same strides on every dimension of size
// above 1 (so element e of the flat storage is the same element of both).
inline void check_same_strides(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, ": expected shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(), ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected device ", x.device(), ", got ", t.device());
  bool same = true;
  for (int64_t d = 0; d < x.dim(); ++d) same = same && (x.size(d) <= 1 || t.stride(d) == x.stride(d));
  TORCH_CHECK_VALUE(same, name, ": expected the memory layout (strides) of x");
}

// Where logical element i of a sample (the per-sample ops: langevin_step, metropolis) sits within it: row
// r = i / L at r * row_stride, element i % L of the row at (i % L) * es. Contiguous (N, ...): L = D, es = 1.
// channels_last (N, C, H, W): a row per channel, L = H * W, row_stride = 1, es = C. A sample's D elements
// fill [n D, (n + 1) D) of the storage in both layouts.
struct SampleLayout {
  int64_t N = 0, D = 0, L = 1, row_stride = 1, es = 1;
};

inline SampleLayout sample_layout_of(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() >= 1, name, ": expected a tensor of shape (N, ...), got a 0-d tensor");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), name, ": expected a floating-point tensor, got ",
                   x.scalar_type());
  SampleLayout l;
  l.N = x.size(0);
  l.D = x.size(0) ? x.numel() / x.size(0) : 0;
  if (x.is_contiguous()) {
    l.L = std::max<int64_t>(l.D, 1);
    l.row_stride = l.L;
    return l;
  }
  TORCH_CHECK_VALUE(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast), name,
                    ": expected a contiguous or channels_last tensor");
  l.L = x.size(2) * x.size(3);
  l.row_stride = 1;
  l.es = x.size(1);
  return l;
}

// coef: the per-sample step coefficients, (N, 3) in x's accumulation dtype with unit column stride (a row
// shared by every sample arrives as a stride-0 expand).
inline void check_coef(const at::Tensor& coef, const at::Tensor& x, int64_t N) {
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == N && coef.size(1) == 3 && coef.stride(1) == 1,
                    "coef: expected an (", N, ", 3) tensor with unit column stride, got ", coef.sizes());
  TORCH_CHECK_TYPE(coef.scalar_type() == acc_type_of(x), "coef: expected dtype ", acc_type_of(x), ", got ",
                   coef.scalar_type());
  TORCH_CHECK_VALUE(coef.device() == x.device(), "coef: expected device ", x.device(), ", got ", coef.device());
}

// The index of the first sample in the counter-based noise streams.
inline void check_sample_offset(int64_t sample_offset) {
  TORCH_CHECK_VALUE(sample_offset >= 0, "sample_offset: expected a non-negative integer, got ", sample_offset);
}

}  // namespace fastscore
