// Langevin / SDE sampler updates on CUDA with the noise generated in the kernel (Philox4x32-10 +
// Box-Muller from csrc/include/langevin_step_math.h, shared with the CPU kernel: the same bits).
// Pure CUDA on raw pointers; the torch glue is langevin_step_binding.cpp.
//
//   update_kernel   a thread per Philox block: the 4 normals of global elements 4b .. 4b + 3 and the
//                   update of those of them that belong to this tensor (grid-stride over blocks)
//   norms_kernel    a block per (piece of a sample, sample): sums of score^2 and z^2 -> partial sums,
//                   added in a fixed order by the caller (deterministic, no atomics)
//   randn_kernel    a thread per Philox block, as update_kernel
// The header's float functions use __fmul_rn / __fadd_rn on the device, so nvcc never contracts them
// into FMAs (which would change the bits the other backends compute).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "langevin_step.cuh"
#include "langevin_step_math.h"

namespace fastscore {
namespace cuda {
namespace {

using namespace fastscore::lgv;

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kBlocksPerSm = 8;   // grid-stride cap for the elementwise kernels

// float -> T for the noise itself (randn): float64 exactly, the rest rounded to nearest even.
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return from_acc<T>(typename AccOf<T>::type(v));
}

// ---- update ---------------------------------------------------------------------------------------------

template <bool GIVEN, bool GENERAL, typename T, typename acc_t = typename AccOf<T>::type>
__global__ void __launch_bounds__(kThreads) update_kernel(const LgvArgs<T> p, uint64_t first_block, uint64_t blocks) {
  const PhiloxKey key = philox_key(p.seed, p.counter);
  const uint64_t total = uint64_t(p.N) * uint64_t(p.D);
  for (uint64_t t = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < blocks; t += uint64_t(gridDim.x) * blockDim.x) {
    const uint64_t b = first_block + t;
    float z4[4] = {0.f, 0.f, 0.f, 0.f};
    if (!GIVEN) normals4(b, key, z4[0], z4[1], z4[2], z4[3]);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint64_t j = 4 * b + uint64_t(k) - p.e_base;  // wraps past `total` for elements before the tensor
      if (j >= total) continue;
      const int64_t n = int64_t(j / uint64_t(p.D)), i = int64_t(j) - n * p.D;
      const int64_t r = i / p.L;
      const int64_t within = r * p.row_stride + (i - r * p.L) * p.es;
      const int64_t off = n * p.D + within;
      const acc_t* cf = p.coef + n * p.coef_stride;
      const acc_t z = GIVEN ? to_acc(p.noise[off]) : acc_t(z4[k]);
      const acc_t mean = update_mean(to_acc(p.x[off]), to_acc(p.score[off]), cf[0], cf[1]);
      acc_t v = update_noise(mean, z, cf[2]);
      if (GENERAL) {
        if (p.x_mean != nullptr) p.x_mean[off] = from_acc<T>(mean);
        if (p.mask != nullptr)
          v = apply_mask(v, to_acc(p.mask[n * p.mask_sn + within]), to_acc(p.known[n * p.known_sn + within]));
      }
      p.x[off] = from_acc<T>(v);
    }
  }
}

// ---- norms ------------------------------------------------------------------------------------------------

template <typename R>
__device__ __forceinline__ R warp_sum(R v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sums in the compute type (float64 for double), stored as float64.
template <bool GIVEN, typename T, typename acc_t = typename AccOf<T>::type>
__global__ void __launch_bounds__(kThreads) norms_kernel(const T* __restrict__ score, const T* __restrict__ noise,
                                                         int64_t D, int64_t pieces, int64_t piece, uint64_t seed,
                                                         uint64_t counter, uint64_t e_base, double* __restrict__ out) {
  __shared__ acc_t totals[2][kThreads / kWarp];
  const int64_t p = blockIdx.x, n = blockIdx.y;
  const PhiloxKey key = philox_key(seed, counter);
  const int64_t i0 = min(D, p * piece), i1 = min(D, i0 + piece);
  acc_t sg = 0, sz = 0;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const acc_t g = to_acc(score[n * D + i]);
    const acc_t z = GIVEN ? to_acc(noise[n * D + i]) : acc_t(normal_at(e_base + uint64_t(n * D + i), key));
    sg += g * g;
    sz += z * z;
  }
  sg = warp_sum(sg);
  sz = warp_sum(sz);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) {
    totals[0][warp] = sg;
    totals[1][warp] = sz;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarp;
    sg = warp_sum(lane < warps ? totals[0][lane] : acc_t(0));
    sz = warp_sum(lane < warps ? totals[1][lane] : acc_t(0));
    if (lane == 0) {
      out[2 * (n * pieces + p)] = double(sg);
      out[2 * (n * pieces + p) + 1] = double(sz);
    }
  }
}

// ---- randn -----------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads)
    randn_kernel(T* __restrict__ out, uint64_t total, uint64_t seed, uint64_t counter, uint64_t e_base,
                 uint64_t first_block, uint64_t blocks) {
  const PhiloxKey key = philox_key(seed, counter);
  for (uint64_t t = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < blocks; t += uint64_t(gridDim.x) * blockDim.x) {
    const uint64_t b = first_block + t;
    float z4[4];
    normals4(b, key, z4[0], z4[1], z4[2], z4[3]);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint64_t j = 4 * b + uint64_t(k) - e_base;
      if (j < total) out[j] = from_float<T>(z4[k]);
    }
  }
}

// ---- host side -------------------------------------------------------------------------------------------

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
    return 108;  // an A100's count; the next launch reports the error anyway
  return sms;
}

// The Philox blocks covering global elements [e_base, e_base + total), and a grid for one thread each.
struct BlockRange {
  uint64_t first = 0, count = 0;
  unsigned grid = 1;
};

BlockRange block_range(uint64_t e_base, uint64_t total) {
  BlockRange r;
  r.first = e_base >> 2;
  r.count = ((e_base + total - 1) >> 2) - r.first + 1;
  const uint64_t want = (r.count + kThreads - 1) / kThreads;
  r.grid = unsigned(std::min<uint64_t>(want, uint64_t(kBlocksPerSm) * sm_count() * 8));
  return r;
}

}  // namespace

template <typename T>
cudaError_t lgv_update(const LgvArgs<T>& p, cudaStream_t stream) {
  const uint64_t total = uint64_t(p.N) * uint64_t(p.D);
  if (total == 0) return cudaSuccess;
  const BlockRange r = block_range(p.e_base, total);
  const bool given = p.noise != nullptr, general = p.x_mean != nullptr || p.mask != nullptr;
  if (given)
    general ? update_kernel<true, true><<<r.grid, kThreads, 0, stream>>>(p, r.first, r.count)
            : update_kernel<true, false><<<r.grid, kThreads, 0, stream>>>(p, r.first, r.count);
  else
    general ? update_kernel<false, true><<<r.grid, kThreads, 0, stream>>>(p, r.first, r.count)
            : update_kernel<false, false><<<r.grid, kThreads, 0, stream>>>(p, r.first, r.count);
  return cudaGetLastError();
}

template <typename T>
cudaError_t lgv_norms(const T* score, const T* noise, int64_t N, int64_t D, int64_t pieces, uint64_t seed,
                      uint64_t counter, uint64_t e_base, double* out, cudaStream_t stream) {
  if (N == 0 || pieces == 0) return cudaSuccess;
  const int64_t piece = std::max<int64_t>(1, (D + pieces - 1) / pieces);
  const dim3 grid{unsigned(pieces), unsigned(N)};  // both <= 65535, checked by the caller
  if (noise != nullptr)
    norms_kernel<true><<<grid, kThreads, 0, stream>>>(score, noise, D, pieces, piece, seed, counter, e_base, out);
  else
    norms_kernel<false><<<grid, kThreads, 0, stream>>>(score, noise, D, pieces, piece, seed, counter, e_base, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t lgv_randn(T* out, int64_t total, uint64_t seed, uint64_t counter, uint64_t e_base, cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  const BlockRange r = block_range(e_base, uint64_t(total));
  randn_kernel<<<r.grid, kThreads, 0, stream>>>(out, uint64_t(total), seed, counter, e_base, r.first, r.count);
  return cudaGetLastError();
}

#define FS_LGV_INSTANTIATE(T)                                                                                    \
  template cudaError_t lgv_update<T>(const LgvArgs<T>&, cudaStream_t);                                           \
  template cudaError_t lgv_norms<T>(const T*, const T*, int64_t, int64_t, int64_t, uint64_t, uint64_t, uint64_t, \
                                    double*, cudaStream_t);                                                     \
  template cudaError_t lgv_randn<T>(T*, int64_t, uint64_t, uint64_t, uint64_t, cudaStream_t);

FS_LGV_INSTANTIATE(double)
FS_LGV_INSTANTIATE(float)
FS_LGV_INSTANTIATE(__half)
FS_LGV_INSTANTIATE(__nv_bfloat16)
#undef FS_LGV_INSTANTIATE

}  // namespace cuda
}  // namespace fastscore
