// MALA and HMC steps on CUDA (the metropolis op), with the arithmetic of csrc/include/metropolis_math.h and the
// normals of langevin_step_math.h, shared with the CPU kernels: the same bits. Pure CUDA on raw pointers; the
// torch glue is metropolis_binding.cpp.
//
//   propose_kernel   a block per (sample, piece of 1024 elements): the normals (one Philox block per element),
//                    the proposal (and momentum), and the piece's sum of z^2 by the halving tree in shared
//                    memory -> partial (N, P)
//   pieces_kernel    a thread per sample: its pieces' partials left to right
//   leapfrog_kernel  grid-stride over elements: p = p + a s, x = x + c p
//   terms_kernel     a block per (sample, piece): the sum of r^2 (MALA) or k^2 (HMC) -> partial (N, P)
//   decide_kernel    a thread per sample: the sum, log alpha, the uniform, the decision, the energy
//   copy_kernel      grid-stride over elements: x, score <- x_prop, score_prop where accepted
// The header's float functions use __fmul_rn / __fadd_rn / __dmul_rn / __dadd_rn / __ddiv_rn on the device, so
// nvcc never contracts them into FMAs (which would change the bits the other backends compute).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "metropolis.cuh"
#include "metropolis_math.h"

namespace fastscore {
namespace cuda {
namespace {

using namespace fastscore::mh;

constexpr int kThreads = 256;
constexpr int kPerThread = int(kPiece) / kThreads;  // elements of a piece per thread
constexpr int kBlocksPerSm = 8;

static_assert(kPiece % kThreads == 0, "a piece is a whole number of elements per thread");

__device__ __forceinline__ int64_t logical_offset(const MhShape& s, int64_t n, int64_t i) {
  const int64_t r = i / s.L;
  return n * s.D + r * s.row_stride + (i - r * s.L) * s.es;
}

// The halving tree of q[0 .. kPiece) (zero padded past the piece: exact zeros, the same tree as the narrower
// one over the next power of two) by the block; returns the sum in thread 0.
__device__ __forceinline__ double block_tree_sum(double* q) {
#pragma unroll
  for (int h = int(kPiece) / 2; h >= 1; h >>= 1) {
    __syncthreads();
    for (int k = threadIdx.x; k < h; k += kThreads) q[k] = fadd(q[k], q[k + h]);
  }
  __syncthreads();
  return q[0];
}

// ---- propose --------------------------------------------------------------------------------------------

template <bool HMC, typename T, typename acc_t = typename AccOf<T>::type>
__global__ void __launch_bounds__(kThreads)
    propose_kernel(const MhShape s, const T* __restrict__ x, const T* __restrict__ score, const acc_t* __restrict__ coef,
                   T* __restrict__ x_out, T* __restrict__ p_out, double* __restrict__ partial, uint64_t seed,
                   uint64_t counter, uint64_t e_base) {
  __shared__ double q[kPiece];
  const int64_t n = blockIdx.x, piece = blockIdx.y;
  const PhiloxKey key = lgv::philox_key(seed, counter);
  const acc_t* cf = coef + n * s.coef_stride;
  const acc_t a = cf[0], b = cf[1], c = cf[2];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int k = threadIdx.x + j * kThreads;
    const int64_t i = piece * kPiece + k;
    double sq = 0.0;
    if (i < s.D) {
      const int64_t off = logical_offset(s, n, i);
      const float z32 = lgv::normal_at(e_base + uint64_t(n * s.D + i), key);
      const acc_t z = acc_t(z32);
      if (HMC) {
        const T pk = from_acc<T>(kick(z, to_acc(score[off]), b));
        p_out[off] = pk;
        x_out[off] = from_acc<T>(drift(to_acc(x[off]), to_acc(pk), c));
      } else {
        x_out[off] = from_acc<T>(mala_proposal(to_acc(x[off]), to_acc(score[off]), z, a, c));
      }
      sq = square(double(z32));
    }
    q[k] = sq;
  }
  const double total = block_tree_sum(q);
  if (threadIdx.x == 0) partial[n * s.P + piece] = total;
}

__global__ void pieces_kernel(const double* __restrict__ partial, int64_t N, int64_t P, double* __restrict__ out) {
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    double t = partial[n * P];
    for (int64_t j = 1; j < P; ++j) t = fadd(t, partial[n * P + j]);
    out[n] = t;
  }
}

// ---- leapfrog -------------------------------------------------------------------------------------------

template <typename T, typename acc_t = typename AccOf<T>::type>
__global__ void __launch_bounds__(kThreads)
    leapfrog_kernel(const MhShape s, T* __restrict__ x, T* __restrict__ p, const T* __restrict__ score,
                    const acc_t* __restrict__ coef) {
  const int64_t total = s.N * s.D;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < total; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = j / s.D;
    const acc_t* cf = coef + n * s.coef_stride;
    const T pk = from_acc<T>(kick(to_acc(p[j]), to_acc(score[j]), cf[0]));
    p[j] = pk;
    x[j] = from_acc<T>(drift(to_acc(x[j]), to_acc(pk), cf[2]));
  }
}

// ---- accept ---------------------------------------------------------------------------------------------

template <bool HMC, typename T, typename acc_t = typename AccOf<T>::type>
__global__ void __launch_bounds__(kThreads)
    terms_kernel(const MhShape s, const T* __restrict__ x, const T* __restrict__ x_prop, const T* __restrict__ score_prop,
                 const T* __restrict__ p, const acc_t* __restrict__ coef, double* __restrict__ partial) {
  __shared__ double q[kPiece];
  const int64_t n = blockIdx.x, piece = blockIdx.y;
  const acc_t* cf = coef + n * s.coef_stride;
  const acc_t a = cf[0], b = cf[1];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int k = threadIdx.x + j * kThreads;
    const int64_t i = piece * kPiece + k;
    double sq = 0.0;
    if (i < s.D) {
      const int64_t off = logical_offset(s, n, i);
      const acc_t v = HMC ? kick(to_acc(p[off]), to_acc(score_prop[off]), b)
                          : mala_reverse(to_acc(x[off]), to_acc(x_prop[off]), to_acc(score_prop[off]), a);
      sq = square(double(v));
    }
    q[k] = sq;
  }
  const double total = block_tree_sum(q);
  if (threadIdx.x == 0) partial[n * s.P + piece] = total;
}

template <bool HMC, typename acc_t>
__global__ void decide_kernel(const MhShape s, const double* __restrict__ partial, double* __restrict__ energy,
                              const double* __restrict__ energy_prop, const double* __restrict__ sq,
                              const acc_t* __restrict__ coef, bool* __restrict__ accepted,
                              double* __restrict__ log_alpha, uint64_t seed, uint64_t counter,
                              uint64_t sample_offset) {
  const PhiloxKey key = lgv::philox_key(seed, counter);
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < s.N; n += int64_t(gridDim.x) * blockDim.x) {
    double t = 0.0;
    if (s.P > 0) {
      t = partial[n * s.P];
      for (int64_t j = 1; j < s.P; ++j) t = fadd(t, partial[n * s.P + j]);
    }
    const double la = HMC ? hmc_log_alpha(energy[n], energy_prop[n], sq[n], t)
                          : mala_log_alpha(energy[n], energy_prop[n], sq[n], t, double(coef[n * s.coef_stride + 2]));
    const bool yes = accept(la, uniform(sample_offset + uint64_t(n), key));
    log_alpha[n] = la;
    accepted[n] = yes;
    if (yes) energy[n] = energy_prop[n];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    copy_kernel(const MhShape s, T* __restrict__ x, T* __restrict__ score, const T* __restrict__ x_prop,
                const T* __restrict__ score_prop, const bool* __restrict__ accepted) {
  const int64_t total = s.N * s.D;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < total; j += int64_t(gridDim.x) * blockDim.x) {
    if (accepted[j / s.D]) {
      x[j] = x_prop[j];
      score[j] = score_prop[j];
    }
  }
}

// ---- host side ------------------------------------------------------------------------------------------

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
    return 108;  // an A100's count; the next launch reports the error anyway
  return sms;
}

unsigned grid_for(int64_t items) {
  const int64_t want = (items + kThreads - 1) / kThreads;
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(want, int64_t(kBlocksPerSm) * sm_count() * 8)));
}

}  // namespace

template <typename T>
cudaError_t mh_propose(const MhShape& s, const T* x, const T* score, const typename AccOf<T>::type* coef, T* x_out,
                       T* p_out, double* partial, uint64_t seed, uint64_t counter, uint64_t e_base,
                       cudaStream_t stream) {
  if (s.N == 0 || s.P == 0) return cudaSuccess;
  const dim3 grid{unsigned(s.N), unsigned(s.P)};  // N < 2^31, P <= 65535: checked by the caller
  if (p_out != nullptr)
    propose_kernel<true><<<grid, kThreads, 0, stream>>>(s, x, score, coef, x_out, p_out, partial, seed, counter, e_base);
  else
    propose_kernel<false><<<grid, kThreads, 0, stream>>>(s, x, score, coef, x_out, p_out, partial, seed, counter,
                                                         e_base);
  return cudaGetLastError();
}

cudaError_t mh_pieces(const double* partial, int64_t N, int64_t P, double* out, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  pieces_kernel<<<grid_for(N), kThreads, 0, stream>>>(partial, N, P, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t mh_leapfrog(const MhShape& s, T* x, T* p, const T* score, const typename AccOf<T>::type* coef,
                        cudaStream_t stream) {
  if (s.N * s.D == 0) return cudaSuccess;
  leapfrog_kernel<<<grid_for(s.N * s.D), kThreads, 0, stream>>>(s, x, p, score, coef);
  return cudaGetLastError();
}

template <typename T>
cudaError_t mh_accept(const MhShape& s, T* x, T* score, double* energy, const T* x_prop, const T* score_prop,
                      const double* energy_prop, const T* p, const double* sq, const typename AccOf<T>::type* coef,
                      double* partial, bool* accepted, double* log_alpha, uint64_t seed, uint64_t counter,
                      uint64_t sample_offset, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  if (s.N == 0) return cudaSuccess;
  if (s.P > 0) {
    const dim3 grid{unsigned(s.N), unsigned(s.P)};
    if (p != nullptr)
      terms_kernel<true><<<grid, kThreads, 0, stream>>>(s, x, x_prop, score_prop, p, coef, partial);
    else
      terms_kernel<false><<<grid, kThreads, 0, stream>>>(s, x, x_prop, score_prop, p, coef, partial);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p != nullptr)
    decide_kernel<true, acc_t><<<grid_for(s.N), kThreads, 0, stream>>>(s, partial, energy, energy_prop, sq, coef,
                                                                        accepted, log_alpha, seed, counter,
                                                                        sample_offset);
  else
    decide_kernel<false, acc_t><<<grid_for(s.N), kThreads, 0, stream>>>(s, partial, energy, energy_prop, sq, coef,
                                                                         accepted, log_alpha, seed, counter,
                                                                         sample_offset);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || s.N * s.D == 0) return err;
  copy_kernel<<<grid_for(s.N * s.D), kThreads, 0, stream>>>(s, x, score, x_prop, score_prop, accepted);
  return cudaGetLastError();
}

#define FS_MH_INSTANTIATE(T)                                                                                       \
  template cudaError_t mh_propose<T>(const MhShape&, const T*, const T*, const typename AccOf<T>::type*, T*, T*,  \
                                     double*, uint64_t, uint64_t, uint64_t, cudaStream_t);                         \
  template cudaError_t mh_leapfrog<T>(const MhShape&, T*, T*, const T*, const typename AccOf<T>::type*,           \
                                      cudaStream_t);                                                               \
  template cudaError_t mh_accept<T>(const MhShape&, T*, T*, double*, const T*, const T*, const double*, const T*, \
                                    const double*, const typename AccOf<T>::type*, double*, bool*, double*,        \
                                    uint64_t, uint64_t, uint64_t, cudaStream_t);

FS_MH_INSTANTIATE(double)
FS_MH_INSTANTIATE(float)
FS_MH_INSTANTIATE(__half)
FS_MH_INSTANTIATE(__nv_bfloat16)
#undef FS_MH_INSTANTIATE

}  // namespace cuda
}  // namespace fastscore
