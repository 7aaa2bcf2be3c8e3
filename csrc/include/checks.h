// Argument checks shared by the C++ ops. The Python layer (fastscore/ops/*.py) validates first
// and names the public argument; these are the safety net for direct torch.ops.fastscore_C calls.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace fastscore {

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

}  // namespace fastscore
