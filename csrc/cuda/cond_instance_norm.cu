// InstanceNorm++ on CUDA: forward, backward and forward-mode (jvp), NCHW and channels_last,
// float64 / float32 / bfloat16 / float16 (the last two accumulate in float32). Pure CUDA on raw
// pointers; the torch glue is cond_instance_norm_binding.cpp.
//
// The same three steps as the CPU kernel (csrc/cpu/cond_instance_norm.cpp), one launch each:
//   sums     per-plane partial sums over chunks of H*W       plane_sums_nchw_kernel / plane_sums_nhwc_kernel
//   finish   per-sample coefficients (needs all channels)    fwd_finish_kernel / bwd_finish_kernel / jvp_finish_kernel
//   map      one elementwise pass                            map_kernel
// (forward: moments; backward: G1, G2; jvp: T1, T2). Backward and jvp first rebuild the forward
// coefficients from the saved mean / rstd (fwd_finish_kernel without sums). The formulas are in
// csrc/include/cond_instance_norm_math.h, shared with the CPU kernel.
//
// A plane may be split over several blocks of the sums kernel so that small batches still fill the
// GPU; each block writes its partial sums to the workspace and the finish kernel adds them in a
// fixed order, so results do not depend on scheduling (no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "cond_instance_norm.cuh"
#include "cond_instance_norm_math.h"

namespace fastscore {
namespace cuda {
namespace {

using namespace fastscore::cin;

constexpr int kWarp = 32;
constexpr int kSumThreads = 256;     // most threads of an NCHW sums block
constexpr int kTileC = 32;           // NHWC sums block: one warp across 32 adjacent channels (coalesced) ...
constexpr int kTileRows = 8;         // ... times 8 warps down the rows
constexpr int kFinishThreads = 256;  // most threads of a per-sample finish block
constexpr int kMapThreads = 256;
constexpr int kMaxVec = 8;  // 16 bytes of half / bfloat16: NCHW chunks are multiples of it
// Each float accumulator adds at most this many terms before flushing into double, so the sums of
// a 256x256 plane keep float64-like accuracy (the CPU kernel blocks its sums the same way).
constexpr int kFlush = 64;
// Split planes until the sums kernel has about this many blocks per SM, but give each block at
// least kMinChunk elements so the block reduction stays a small part of its work.
constexpr int kSumBlocksPerSm = 8;
constexpr int64_t kMinChunk = 4096;
constexpr int kMapBlocksPerSm = 32;  // grid-stride cap for the map kernel

template <typename T>
constexpr int kVec = 16 / int(sizeof(T));  // elements in one 16-byte load

enum SumKind : int { kMoments = 0, kGrad = 1, kTangent = 2 };
enum MapKind : int { kFwd = 0, kBwd = 1, kJvp = 2 };

// ---- device helpers -----------------------------------------------------------------------------

// VEC adjacent elements moved as one load / store (16 bytes when VEC = kVec<T>).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

template <typename A>
__device__ __forceinline__ A row_at(const CinRows<A>& r, int64_t n, int64_t c) {
  return r.ptr != nullptr ? r.ptr[n * r.s0 + c * r.s1] : A(0);
}

template <typename R>
__device__ __forceinline__ R warp_sum(R v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sums K values over the whole block (a multiple of 32 threads) and hands every thread the totals.
// Every thread must call it. It syncs before touching shared memory, so a kernel may call it again.
template <int K, typename R>
__device__ __forceinline__ void block_sum(R (&v)[K]) {
  __shared__ R warp_totals[K][kWarp];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid % kWarp, warp = tid / kWarp;
  const int warps = blockDim.x * blockDim.y / kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) warp_totals[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const R t = warp_sum(lane < warps ? warp_totals[k][lane] : R(0));
      if (lane == 0) warp_totals[k][0] = t;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_totals[k][0];
}

// ---- step 1: per-plane sums ---------------------------------------------------------------------

// What one plane's summands need: the shift K (kMoments: the plane's first element, as on the CPU),
// or the plane's mean and forward coefficients (kGrad, kTangent).
template <typename acc_t>
struct PlaneConst {
  acc_t k, a, b;
};

template <int KIND, int ACT, typename T, typename acc_t>
__device__ __forceinline__ PlaneConst<acc_t> plane_const(const T* first, const acc_t* mean, const acc_t* a,
                                                         const acc_t* b, int64_t nc) {
  if constexpr (KIND == kMoments) return {to_acc(*first), acc_t(0), acc_t(0)};
  if constexpr (KIND == kGrad && ACT != kActNone) return {mean[nc], a[nc], b[nc]};
  return {mean[nc], acc_t(0), acc_t(0)};
}

// The two summands of one element; v1 is x, v2 is grad_out (kGrad) or x_t (kTangent).
template <int KIND, int ACT, typename acc_t>
__device__ __forceinline__ void plane_terms(acc_t v1, acc_t v2, const PlaneConst<acc_t>& k, acc_t& t1, acc_t& t2) {
  if constexpr (KIND == kMoments) {
    const acc_t d = v1 - k.k;
    t1 = d;
    t2 = d * d;
  } else if constexpr (KIND == kGrad) {
    const acc_t xc = v1 - k.k;
    const acc_t g = bwd_pre_grad(v2, xc, k.a, k.b, ACT);
    t1 = g;
    t2 = g * xc;
  } else {
    t1 = v2;
    t2 = (v1 - k.k) * v2;
  }
}

// NCHW: block (blockIdx.x = n * C + c, blockIdx.y = chunk of the plane); threads stride the
// contiguous plane VEC elements at a time.
template <int KIND, int ACT, int VEC, typename T, typename acc_t = typename AccOf<T>::type>
__global__ void __launch_bounds__(kSumThreads)
    plane_sums_nchw_kernel(const T* __restrict__ x,        // (N, C, H, W), NCHW
                           const T* __restrict__ in2,      // like x: grad_out (kGrad) or x_t (kTangent); else null
                           const acc_t* __restrict__ mean,  // (N, C): kGrad, kTangent
                           const acc_t* __restrict__ a,     // (N, C): kGrad with an activation
                           const acc_t* __restrict__ b,     // (N, C): likewise
                           int64_t HW, int64_t chunk,
                           double* __restrict__ partial) {  // (splits, N * C, 2)
  const int64_t nc = blockIdx.x;
  const int64_t plane = nc * HW;
  const PlaneConst<acc_t> k = plane_const<KIND, ACT>(x + plane, mean, a, b, nc);
  const int64_t begin = int64_t(blockIdx.y) * chunk;
  const int64_t end = begin + chunk < HW ? begin + chunk : HW;
  const int64_t step = int64_t(blockDim.x) * VEC;
  double d1 = 0, d2 = 0;
  for (int64_t r0 = begin; r0 < end; r0 += step * kFlush) {
    const int64_t r1 = r0 + step * kFlush < end ? r0 + step * kFlush : end;
    // One accumulator pair per lane: independent add chains, and each adds at most kFlush terms.
    acc_t s1[VEC], s2[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) s1[j] = s2[j] = acc_t(0);
    // A 32-bit trip count (<= kFlush; 64-bit division is a called subroutine, whose call spills) and
    // pointer steps keep the unrolled loop's registers low.
    const int64_t i0 = r0 + int64_t(threadIdx.x) * VEC;
    const int count = i0 < r1 ? int(unsigned(r1 - i0 + step - 1) / unsigned(step)) : 0;
    const T* px = x + plane + i0;
    const T* py = KIND != kMoments ? in2 + plane + i0 : px;
#pragma unroll 4
    for (int t = 0; t < count; ++t, px += step, py += step) {
      const Pack<T, VEC> p1 = load_pack<VEC>(px);
      Pack<T, VEC> p2 = p1;
      if constexpr (KIND != kMoments) p2 = load_pack<VEC>(py);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc_t t1, t2;
        plane_terms<KIND, ACT>(to_acc(p1.v[j]), to_acc(p2.v[j]), k, t1, t2);
        s1[j] += t1;
        s2[j] += t2;
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      d1 += double(s1[j]);
      d2 += double(s2[j]);
    }
  }
  double v[2] = {d1, d2};
  block_sum<2>(v);
  if (threadIdx.x == 0) {
    double* dst = partial + (int64_t(blockIdx.y) * gridDim.x + nc) * 2;
    dst[0] = v[0];
    dst[1] = v[1];
  }
}

// NHWC: block (blockIdx.x = n * tiles + tile of kTileC channels, blockIdx.y = chunk of the rows).
// threadIdx.x runs along the channels so each warp reads a contiguous piece of a row;
// threadIdx.y strides the rows; the kTileRows partial sums of a channel meet in shared memory.
template <int KIND, int ACT, typename T, typename acc_t = typename AccOf<T>::type>
__global__ void __launch_bounds__(kTileC* kTileRows)
    plane_sums_nhwc_kernel(const T* __restrict__ x,        // (N, C, H, W), NHWC
                           const T* __restrict__ in2,      // like x: grad_out (kGrad) or x_t (kTangent); else null
                           const acc_t* __restrict__ mean,  // (N, C): kGrad, kTangent
                           const acc_t* __restrict__ a,     // (N, C): kGrad with an activation
                           const acc_t* __restrict__ b,     // (N, C): likewise
                           int64_t C, int64_t HW, int64_t chunk,
                           double* __restrict__ partial) {  // (splits, N * C, 2)
  __shared__ double rows_sum[2][kTileRows][kTileC];
  // 32-bit: a 64-bit division is a called subroutine, whose call spills.
  const unsigned tiles = unsigned((C + kTileC - 1) / kTileC);
  const int64_t n = blockIdx.x / tiles;
  const int64_t c = int64_t(blockIdx.x % tiles) * kTileC + threadIdx.x;
  double d1 = 0, d2 = 0;
  if (c < C) {
    const int64_t nc = n * C + c;
    const int64_t first = n * C * HW + c;  // channel c of the sample's first row
    const PlaneConst<acc_t> k = plane_const<KIND, ACT>(x + first, mean, a, b, nc);
    const int64_t begin = int64_t(blockIdx.y) * chunk;
    const int64_t end = begin + chunk < HW ? begin + chunk : HW;
    const int64_t row_step = kTileRows * C;
    for (int64_t r0 = begin; r0 < end; r0 += kTileRows * kFlush) {
      const int64_t r1 = r0 + kTileRows * kFlush < end ? r0 + kTileRows * kFlush : end;
      acc_t s1 = 0, s2 = 0;
      // A 32-bit trip count (<= kFlush) and pointer steps rather than 64-bit indices: with those, and with
      // `#pragma unroll`, ptxas spilled a few bytes here.
      const int64_t r = r0 + threadIdx.y;
      const int count = r < r1 ? int((r1 - r + kTileRows - 1) / kTileRows) : 0;
      const T* px = x + first + r * C;
      const T* py = KIND != kMoments ? in2 + first + r * C : px;
      int t = 0;
      // B rows loaded before their arithmetic, for more bytes in flight per thread (double: 2, as 4 spilled).
      constexpr int B = sizeof(T) == 8 ? 2 : 4;
      for (; t + B <= count; t += B, px += B * row_step, py += B * row_step) {
        acc_t v1[B], v2[B];
#pragma unroll
        for (int u = 0; u < B; ++u) {
          v1[u] = to_acc(px[u * row_step]);
          v2[u] = v1[u];
          if constexpr (KIND != kMoments) v2[u] = to_acc(py[u * row_step]);
        }
#pragma unroll
        for (int u = 0; u < B; ++u) {
          acc_t t1, t2;
          plane_terms<KIND, ACT>(v1[u], v2[u], k, t1, t2);
          s1 += t1;
          s2 += t2;
        }
      }
      for (; t < count; ++t, px += row_step, py += row_step) {
        const acc_t v1 = to_acc(*px);
        acc_t v2 = v1;
        if constexpr (KIND != kMoments) v2 = to_acc(*py);
        acc_t t1, t2;
        plane_terms<KIND, ACT>(v1, v2, k, t1, t2);
        s1 += t1;
        s2 += t2;
      }
      d1 += double(s1);
      d2 += double(s2);
    }
  }
  rows_sum[0][threadIdx.y][threadIdx.x] = d1;
  rows_sum[1][threadIdx.y][threadIdx.x] = d2;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    double t1 = 0, t2 = 0;
#pragma unroll
    for (int r = 0; r < kTileRows; ++r) {
      t1 += rows_sum[0][r][threadIdx.x];
      t2 += rows_sum[1][r][threadIdx.x];
    }
    const int64_t NC = int64_t(gridDim.x / tiles) * C;
    double* dst = partial + (int64_t(blockIdx.y) * NC + n * C + c) * 2;
    dst[0] = t1;
    dst[1] = t2;
  }
}

// ---- step 2: per-sample coefficients (block per sample, threads stride the channels) ------------

// The sums of plane nc over all chunks, always added in chunk order.
__device__ __forceinline__ void plane_total(const double* partial, int64_t splits, int64_t NC, int64_t nc,
                                            double& S1, double& S2) {
  S1 = S2 = 0;
  for (int64_t k = 0; k < splits; ++k) {
    S1 += partial[(k * NC + nc) * 2];
    S2 += partial[(k * NC + nc) * 2 + 1];
  }
}

// FROM_SUMS (forward): finishes mean / rstd from the shifted sums first; otherwise (backward, jvp)
// reads the saved ones. Either way then m, s, muhat and the forward coefficients a, b.
template <bool FROM_SUMS, typename T, typename acc_t = typename AccOf<T>::type>
__global__ void __launch_bounds__(kFinishThreads)
    fwd_finish_kernel(const T* __restrict__ x,               // (N, C, H, W), NCHW or NHWC: shifts (FROM_SUMS)
                      const double* __restrict__ partial,    // (splits, N * C, 2) shifted sums (FROM_SUMS)
                      int64_t splits, int64_t C, int64_t HW, bool channels_last, acc_t eps,
                      CinRows<acc_t> gamma,                  // (N, C), any strides
                      CinRows<acc_t> alpha,                  // (N, C), any strides; may be absent
                      CinRows<acc_t> beta,                   // (N, C), any strides; may be absent
                      acc_t* __restrict__ mean,              // (N, C): written when FROM_SUMS, else read
                      acc_t* __restrict__ rstd,              // (N, C): likewise
                      acc_t* __restrict__ muhat,             // (N, C)
                      acc_t* __restrict__ a,                 // (N, C)
                      acc_t* __restrict__ b,                 // (N, C)
                      acc_t* __restrict__ m,                 // (N,)
                      acc_t* __restrict__ s) {               // (N,)
  const int64_t n = blockIdx.x, o = n * C;
  acc_t sum[1] = {0};
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    if constexpr (FROM_SUMS) {
      double S1, S2, mu, r;
      plane_total(partial, splits, int64_t(gridDim.x) * C, o + c, S1, S2);
      const double K = double(to_acc(x[o * HW + (channels_last ? c : c * HW)]));
      moments_from_shifted_sums<double>(K, S1, S2, double(HW), double(eps), mu, r);
      // Stored in acc_t and used as stored, so backward rebuilds exactly these coefficients.
      mean[o + c] = acc_t(mu);
      rstd[o + c] = acc_t(r);
    }
    sum[0] += mean[o + c];
  }
  acc_t mm = 0, ss = 0;
  if (alpha.ptr != nullptr) {  // block-uniform: the block reductions are reached by all threads or none
    block_sum<1>(sum);
    mm = sum[0] / acc_t(C);
    acc_t sq[1] = {0};
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) sq[0] += (mean[o + c] - mm) * (mean[o + c] - mm);
    block_sum<1>(sq);
    ss = channel_mean_s(sq[0], C, eps);
  }
  if (threadIdx.x == 0) {
    m[n] = mm;
    s[n] = ss;
  }
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t mu = (mean[o + c] - mm) * ss;
    muhat[o + c] = mu;
    fwd_coef(rstd[o + c], mu, row_at(gamma, n, c), row_at(alpha, n, c), row_at(beta, n, c), a[o + c], b[o + c]);
  }
}

// Parameter gradients and the grad_x coefficients A, B, D from G1, G2.
template <typename acc_t>
__global__ void __launch_bounds__(kFinishThreads)
    bwd_finish_kernel(const double* __restrict__ partial,  // (splits, N * C, 2): G1, G2
                      int64_t splits, int64_t C, int64_t HW,
                      const acc_t* __restrict__ rstd,      // (N, C)
                      const acc_t* __restrict__ muhat,     // (N, C)
                      const acc_t* __restrict__ s,         // (N,)
                      CinRows<acc_t> gamma,                // (N, C), any strides
                      CinRows<acc_t> alpha,                // (N, C), any strides; may be absent
                      acc_t* __restrict__ grad_gamma,      // (N, C)
                      acc_t* __restrict__ grad_alpha,      // (N, C); null when alpha is absent
                      acc_t* __restrict__ grad_beta,       // (N, C); null when beta is absent
                      acc_t* __restrict__ A,               // (N, C)
                      acc_t* __restrict__ B,               // (N, C)
                      acc_t* __restrict__ D) {             // (N, C)
  const int64_t n = blockIdx.x, o = n * C, NC = int64_t(gridDim.x) * C;
  const bool has_alpha = alpha.ptr != nullptr;
  acc_t sums[2] = {0, 0};  // sum_c dmuhat, sum_c dmuhat * muhat
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    double S1, S2;
    plane_total(partial, splits, NC, o + c, S1, S2);
    acc_t dg, da, db, dmu;
    bwd_param_grads(acc_t(S1), acc_t(S2), rstd[o + c], muhat[o + c], row_at(gamma, n, c), row_at(alpha, n, c), dg,
                    da, db, dmu);
    grad_gamma[o + c] = dg;
    if (grad_alpha != nullptr) grad_alpha[o + c] = da;
    if (grad_beta != nullptr) grad_beta[o + c] = db;
    sums[0] += dmu;
    sums[1] += dmu * muhat[o + c];
  }
  if (has_alpha) block_sum<2>(sums);
  const acc_t inv_hw = acc_t(1) / acc_t(HW);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    // G1, G2 and dmuhat again rather than a scratch array: the same adds in the same order.
    double S1, S2;
    plane_total(partial, splits, NC, o + c, S1, S2);
    const acc_t G1 = acc_t(S1), G2 = acc_t(S2), gamma_c = row_at(gamma, n, c);
    acc_t dg, da, db, dmu;
    bwd_param_grads(G1, G2, rstd[o + c], muhat[o + c], gamma_c, row_at(alpha, n, c), dg, da, db, dmu);
    const acc_t dmean = has_alpha ? bwd_dmean(dmu, muhat[o + c], s[n], sums[0] / acc_t(C), sums[1], C) : acc_t(0);
    bwd_dx_coef(G1, G2, rstd[o + c], gamma_c, dmean, inv_hw, A[o + c], B[o + c], D[o + c]);
  }
}

// The output tangent's coefficients P, Q, R from T1, T2 (absent x_t: no sums, plane tangents 0).
template <typename acc_t>
__device__ __forceinline__ void plane_tangents(const double* partial, int64_t splits, int64_t NC, int64_t nc,
                                               acc_t rstd, acc_t inv_hw, acc_t& dmean, acc_t& drstd) {
  dmean = drstd = acc_t(0);
  if (partial == nullptr) return;
  double S1, S2;
  plane_total(partial, splits, NC, nc, S1, S2);
  jvp_plane_tangents(acc_t(S1), acc_t(S2), rstd, inv_hw, dmean, drstd);
}

template <typename acc_t>
__global__ void __launch_bounds__(kFinishThreads)
    jvp_finish_kernel(const double* __restrict__ partial,  // (splits, N * C, 2): T1, T2; null when x_t is absent
                      int64_t splits, int64_t C, int64_t HW,
                      const acc_t* __restrict__ mean,      // (N, C)
                      const acc_t* __restrict__ rstd,      // (N, C)
                      const acc_t* __restrict__ muhat,     // (N, C)
                      const acc_t* __restrict__ m,         // (N,)
                      const acc_t* __restrict__ s,         // (N,)
                      CinRows<acc_t> gamma,                // (N, C), any strides
                      CinRows<acc_t> alpha,                // (N, C), any strides; may be absent
                      CinRows<acc_t> gamma_t,              // (N, C), any strides; may be absent
                      CinRows<acc_t> alpha_t,              // (N, C), any strides; may be absent
                      CinRows<acc_t> beta_t,               // (N, C), any strides; may be absent
                      acc_t* __restrict__ P,               // (N, C)
                      acc_t* __restrict__ Q,               // (N, C)
                      acc_t* __restrict__ R) {             // (N, C)
  const int64_t n = blockIdx.x, o = n * C, NC = int64_t(gridDim.x) * C;
  const bool has_alpha = alpha.ptr != nullptr;
  const acc_t inv_hw = acc_t(1) / acc_t(HW);
  const acc_t mn = m[n], sn = s[n];
  acc_t dm = 0, ds = 0;
  if (has_alpha) {
    acc_t acc[1] = {0};
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      acc_t dmean, drstd;
      plane_tangents(partial, splits, NC, o + c, rstd[o + c], inv_hw, dmean, drstd);
      acc[0] += dmean;
    }
    block_sum<1>(acc);
    dm = acc[0] / acc_t(C);
    acc_t cov[1] = {0};
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      acc_t dmean, drstd;
      plane_tangents(partial, splits, NC, o + c, rstd[o + c], inv_hw, dmean, drstd);
      cov[0] += (mean[o + c] - mn) * (dmean - dm);
    }
    block_sum<1>(cov);
    ds = channel_mean_ds(cov[0], sn, C);
  }
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t dmean, drstd;
    plane_tangents(partial, splits, NC, o + c, rstd[o + c], inv_hw, dmean, drstd);
    const acc_t dmuhat = has_alpha ? (dmean - dm) * sn + (mean[o + c] - mn) * ds : acc_t(0);
    jvp_coef(rstd[o + c], drstd, muhat[o + c], dmuhat, dmean, row_at(gamma, n, c), row_at(alpha, n, c),
             row_at(gamma_t, n, c), row_at(alpha_t, n, c), row_at(beta_t, n, c), P[o + c], Q[o + c], R[o + c]);
  }
}

// ---- step 3: the elementwise pass ---------------------------------------------------------------

template <typename acc_t>
struct ChannelCoef {
  acc_t mean, a, b, k1, k2, k3;
};

template <int DIR, typename acc_t, typename index_t>
__device__ __forceinline__ ChannelCoef<acc_t> channel_coef(index_t nc, const acc_t* __restrict__ mean,
                                                           const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                                                           const acc_t* __restrict__ k1, const acc_t* __restrict__ k2,
                                                           const acc_t* __restrict__ k3) {
  if constexpr (DIR == kFwd) return {mean[nc], a[nc], b[nc], acc_t(0), acc_t(0), acc_t(0)};
  return {mean[nc], a[nc], b[nc], k1[nc], k2[nc], k3[nc]};
}

// v1 is x, v2 is grad_out (kBwd) or x_t (kJvp, 0 when absent).
template <int DIR, int ACT, typename acc_t>
__device__ __forceinline__ acc_t map_value(acc_t v1, acc_t v2, const ChannelCoef<acc_t>& k) {
  const acc_t xc = v1 - k.mean;
  if constexpr (DIR == kFwd) return fwd_element(xc, k.a, k.b, ACT);
  if constexpr (DIR == kBwd) return bwd_element(v2, xc, k.a, k.b, k.k1, k.k2, k.k3, ACT);
  return jvp_element(v2, xc, k.a, k.b, k.k1, k.k2, k.k3, ACT);
}

// Grid-stride over VEC-element packs of the flat tensor. VEC divides H*W (NCHW) or C (NHWC), so a
// pack never straddles a plane (NCHW: one channel per pack) or a row (NHWC: VEC adjacent channels).
// index_t is uint32_t whenever the tensor has < 2^31 elements, so the (n, c) divisions are 32-bit;
// uint64_t otherwise.
// x and dst carry no __restrict__: fwd_out may run in place (each element is read, then written,
// by the same thread).
template <int DIR, int ACT, bool CL, int VEC, typename index_t, typename T, typename acc_t = typename AccOf<T>::type>
__global__ void __launch_bounds__(kMapThreads)
    map_kernel(const T* x,                      // (N, C, H, W), NCHW or NHWC (CL)
               const T* in2,                    // like x: grad_out (kBwd), x_t (kJvp; null when absent), unused (kFwd)
               const acc_t* __restrict__ mean,  // (N, C)
               const acc_t* __restrict__ a,     // (N, C) forward coefficients: pre = a * (x - mean) + b
               const acc_t* __restrict__ b,     // (N, C)
               const acc_t* __restrict__ k1,    // (N, C): A (kBwd) or P (kJvp); unused (kFwd)
               const acc_t* __restrict__ k2,    // (N, C): B or Q
               const acc_t* __restrict__ k3,    // (N, C): D or R
               T* dst,                          // like x: out, grad_x or out_t; may be x (kFwd)
               index_t packs, index_t C, index_t HW) {
  const index_t stride = index_t(gridDim.x) * blockDim.x;
  for (index_t v = index_t(blockIdx.x) * blockDim.x + threadIdx.x; v < packs; v += stride) {
    const index_t i = v * VEC;
    const Pack<T, VEC> p1 = load_pack<VEC>(x + i);
    acc_t v2[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) v2[j] = acc_t(0);
    if (DIR != kFwd && in2 != nullptr) {
      const Pack<T, VEC> p2 = load_pack<VEC>(in2 + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v2[j] = to_acc(p2.v[j]);
    }
    Pack<T, VEC> res;
    if constexpr (!CL) {
      const ChannelCoef<acc_t> k = channel_coef<DIR>(i / HW, mean, a, b, k1, k2, k3);
#pragma unroll
      for (int j = 0; j < VEC; ++j) res.v[j] = from_acc<T>(map_value<DIR, ACT>(to_acc(p1.v[j]), v2[j], k));
    } else {
      const index_t row = i / C;
      const index_t nc = (row / HW) * C + (i - row * C);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const ChannelCoef<acc_t> k = channel_coef<DIR>(index_t(nc + j), mean, a, b, k1, k2, k3);
        res.v[j] = from_acc<T>(map_value<DIR, ACT>(to_acc(p1.v[j]), v2[j], k));
      }
    }
    store_pack<VEC>(dst + i, res);
  }
}

// ---- host side ----------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
    return 108;  // an A100's count; the next launch reports the error anyway
  return sms;
}

// How the sums kernels cut the planes: `splits` chunks of `chunk` elements (NCHW) or rows (NHWC).
// NCHW chunks are multiples of kMaxVec so no pack straddles two chunks, whatever VEC the launch picks.
struct SumPlan {
  int64_t splits = 1, chunk = 1;
};

SumPlan plan_sums(int64_t N, int64_t C, int64_t HW, bool channels_last) {
  const int64_t blocks = channels_last ? N * ceil_div(C, kTileC) : N * C;
  const int64_t min_chunk = channels_last ? kMinChunk / kTileC : kMinChunk;
  int64_t splits = std::min(ceil_div(int64_t(kSumBlocksPerSm) * sm_count(), blocks), ceil_div(HW, min_chunk));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535));  // gridDim.y
  SumPlan plan;
  plan.chunk = ceil_div(HW, splits);
  if (!channels_last) plan.chunk = ceil_div(plan.chunk, kMaxVec) * kMaxVec;
  plan.splits = ceil_div(HW, plan.chunk);
  return plan;
}

template <typename acc_t>
struct Work {
  double* partial = nullptr;                           // (splits, N * C, 2)
  acc_t *a = nullptr, *b = nullptr, *muhat = nullptr;  // (N, C)
  acc_t *k1 = nullptr, *k2 = nullptr, *k3 = nullptr;   // (N, C): A, B, D (backward) or P, Q, R (jvp)
  acc_t *m = nullptr, *s = nullptr;                    // (N,)
};

// Carves the workspace at `base` (null: only measures it); returns its size in bytes.
template <typename acc_t>
size_t carve(char* base, int64_t N, int64_t C, const SumPlan& plan, Work<acc_t>& w) {
  size_t off = 0;
  auto take = [&](size_t bytes) {
    void* p = base != nullptr ? base + off : nullptr;
    off += (bytes + 255) / 256 * 256;
    return p;
  };
  w.partial = static_cast<double*>(take(sizeof(double) * size_t(plan.splits * N * C * 2)));
  for (acc_t** p : {&w.a, &w.b, &w.muhat, &w.k1, &w.k2, &w.k3}) *p = static_cast<acc_t*>(take(sizeof(acc_t) * N * C));
  for (acc_t** p : {&w.m, &w.s}) *p = static_cast<acc_t*>(take(sizeof(acc_t) * N));
  return off;
}

template <typename T, typename acc_t = typename AccOf<T>::type>
Work<acc_t> work_of(const CinArgs<T>& p, const SumPlan& plan) {
  Work<acc_t> w;
  carve(static_cast<char*>(p.workspace), p.N, p.C, plan, w);
  return w;
}

int finish_threads(int64_t C) {
  return int(std::min<int64_t>(kFinishThreads, std::max<int64_t>(kWarp, ceil_div(C, kWarp) * kWarp)));
}

template <int KIND, int ACT, typename T, typename acc_t = typename AccOf<T>::type>
cudaError_t launch_sums(const CinArgs<T>& p, const T* in2, const SumPlan& plan, const Work<acc_t>& w,
                        cudaStream_t stream) {
  if (p.channels_last) {
    const dim3 grid(unsigned(p.N * ceil_div(p.C, kTileC)), unsigned(plan.splits));
    plane_sums_nhwc_kernel<KIND, ACT, T><<<grid, dim3(kTileC, kTileRows), 0, stream>>>(
        p.x, in2, p.mean, w.a, w.b, p.C, p.HW, plan.chunk, w.partial);
    return cudaGetLastError();
  }
  constexpr int V = kVec<T>;
  const bool vec = p.HW % V == 0 && aligned16(p.x) && aligned16(in2);
  // Enough threads for about four packs each, so tiny planes do not leave most of a block idle.
  const int64_t packs = ceil_div(plan.chunk, vec ? V : 1);
  const int threads = int(std::min<int64_t>(kSumThreads, std::max<int64_t>(kWarp, ceil_div(packs, 4 * kWarp) * kWarp)));
  const dim3 grid(unsigned(p.N * p.C), unsigned(plan.splits));
  if (vec)
    plane_sums_nchw_kernel<KIND, ACT, V, T>
        <<<grid, threads, 0, stream>>>(p.x, in2, p.mean, w.a, w.b, p.HW, plan.chunk, w.partial);
  else
    plane_sums_nchw_kernel<KIND, ACT, 1, T>
        <<<grid, threads, 0, stream>>>(p.x, in2, p.mean, w.a, w.b, p.HW, plan.chunk, w.partial);
  return cudaGetLastError();
}

template <bool FROM_SUMS, typename T, typename acc_t = typename AccOf<T>::type>
cudaError_t launch_fwd_finish(const CinArgs<T>& p, const SumPlan& plan, const Work<acc_t>& w, cudaStream_t stream) {
  fwd_finish_kernel<FROM_SUMS, T><<<unsigned(p.N), finish_threads(p.C), 0, stream>>>(
      p.x, w.partial, plan.splits, p.C, p.HW, p.channels_last, p.eps, p.gamma, p.alpha, p.beta, p.mean, p.rstd,
      w.muhat, w.a, w.b, w.m, w.s);
  return cudaGetLastError();
}

template <int DIR, int ACT, bool CL, int VEC, typename index_t, typename T, typename acc_t>
cudaError_t launch_map_as(const CinArgs<T>& p, const T* in2, const Work<acc_t>& w, T* dst, cudaStream_t stream) {
  const int64_t packs = p.N * p.C * p.HW / VEC;
  const int64_t blocks = std::min<int64_t>(ceil_div(packs, kMapThreads), int64_t(kMapBlocksPerSm) * sm_count());
  map_kernel<DIR, ACT, CL, VEC, index_t, T><<<unsigned(blocks), kMapThreads, 0, stream>>>(
      p.x, in2, p.mean, w.a, w.b, w.k1, w.k2, w.k3, dst, index_t(packs), index_t(p.C), index_t(p.HW));
  return cudaGetLastError();
}

template <int DIR, int ACT, bool CL, typename index_t, typename T, typename acc_t>
cudaError_t launch_map_layout(const CinArgs<T>& p, const T* in2, const Work<acc_t>& w, T* dst, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const bool vec = (CL ? p.C : p.HW) % V == 0 && aligned16(p.x) && aligned16(in2) && aligned16(dst);
  return vec ? launch_map_as<DIR, ACT, CL, V, index_t>(p, in2, w, dst, stream)
             : launch_map_as<DIR, ACT, CL, 1, index_t>(p, in2, w, dst, stream);
}

template <int DIR, int ACT, typename T, typename acc_t>
cudaError_t launch_map(const CinArgs<T>& p, const T* in2, const Work<acc_t>& w, T* dst, cudaStream_t stream) {
  if (p.N * p.C * p.HW <= INT_MAX)
    return p.channels_last ? launch_map_layout<DIR, ACT, true, uint32_t>(p, in2, w, dst, stream)
                           : launch_map_layout<DIR, ACT, false, uint32_t>(p, in2, w, dst, stream);
  return p.channels_last ? launch_map_layout<DIR, ACT, true, uint64_t>(p, in2, w, dst, stream)
                         : launch_map_layout<DIR, ACT, false, uint64_t>(p, in2, w, dst, stream);
}

template <int DIR, typename T, typename acc_t>
cudaError_t launch_map_act(const CinArgs<T>& p, const T* in2, const Work<acc_t>& w, T* dst, cudaStream_t stream) {
  return p.act == kActElu ? launch_map<DIR, kActElu>(p, in2, w, dst, stream)
                          : launch_map<DIR, kActNone>(p, in2, w, dst, stream);
}

// Variadic: template argument lists have commas.
#define FS_CUDA_TRY(...)                        \
  do {                                          \
    const cudaError_t fs_err_ = (__VA_ARGS__);  \
    if (fs_err_ != cudaSuccess) return fs_err_; \
  } while (0)

}  // namespace

template <typename T>
size_t cin_workspace_bytes(int64_t N, int64_t C, int64_t HW, bool channels_last) {
  if (N * C == 0) return 0;
  Work<typename AccOf<T>::type> w;
  return carve(nullptr, N, C, plan_sums(N, C, HW, channels_last), w);
}

template <typename T>
cudaError_t cin_fwd(const CinArgs<T>& p, cudaStream_t stream) {
  if (p.N * p.C == 0) return cudaSuccess;
  const SumPlan plan = plan_sums(p.N, p.C, p.HW, p.channels_last);
  const auto w = work_of(p, plan);
  FS_CUDA_TRY(launch_sums<kMoments, kActNone>(p, static_cast<const T*>(nullptr), plan, w, stream));
  FS_CUDA_TRY(launch_fwd_finish<true>(p, plan, w, stream));
  return launch_map_act<kFwd>(p, static_cast<const T*>(nullptr), w, p.out, stream);
}

template <typename T>
cudaError_t cin_bwd(const CinArgs<T>& p, cudaStream_t stream) {
  if (p.N * p.C == 0) return cudaSuccess;
  const SumPlan plan = plan_sums(p.N, p.C, p.HW, p.channels_last);
  const auto w = work_of(p, plan);
  FS_CUDA_TRY(launch_fwd_finish<false>(p, plan, w, stream));
  FS_CUDA_TRY(p.act == kActElu ? launch_sums<kGrad, kActElu>(p, p.grad_out, plan, w, stream)
                               : launch_sums<kGrad, kActNone>(p, p.grad_out, plan, w, stream));
  bwd_finish_kernel<<<unsigned(p.N), finish_threads(p.C), 0, stream>>>(
      w.partial, plan.splits, p.C, p.HW, p.rstd, w.muhat, w.s, p.gamma, p.alpha, p.grad_gamma, p.grad_alpha,
      p.grad_beta, w.k1, w.k2, w.k3);
  FS_CUDA_TRY(cudaGetLastError());
  return launch_map_act<kBwd>(p, p.grad_out, w, p.grad_x, stream);
}

template <typename T>
cudaError_t cin_jvp(const CinArgs<T>& p, cudaStream_t stream) {
  if (p.N * p.C == 0) return cudaSuccess;
  const SumPlan plan = plan_sums(p.N, p.C, p.HW, p.channels_last);
  const auto w = work_of(p, plan);
  FS_CUDA_TRY(launch_fwd_finish<false>(p, plan, w, stream));
  // Without x_t the plane tangents are zero: no sums to take.
  if (p.x_t != nullptr) FS_CUDA_TRY(launch_sums<kTangent, kActNone>(p, p.x_t, plan, w, stream));
  jvp_finish_kernel<<<unsigned(p.N), finish_threads(p.C), 0, stream>>>(
      p.x_t != nullptr ? w.partial : nullptr, plan.splits, p.C, p.HW, p.mean, p.rstd, w.muhat, w.m, w.s, p.gamma,
      p.alpha, p.gamma_t, p.alpha_t, p.beta_t, w.k1, w.k2, w.k3);
  FS_CUDA_TRY(cudaGetLastError());
  return launch_map_act<kJvp>(p, p.x_t, w, p.out_t, stream);
}

#define FS_CIN_INSTANTIATE(T)                                            \
  template size_t cin_workspace_bytes<T>(int64_t, int64_t, int64_t, bool); \
  template cudaError_t cin_fwd<T>(const CinArgs<T>&, cudaStream_t);        \
  template cudaError_t cin_bwd<T>(const CinArgs<T>&, cudaStream_t);        \
  template cudaError_t cin_jvp<T>(const CinArgs<T>&, cudaStream_t);

FS_CIN_INSTANTIATE(double)
FS_CIN_INSTANTIATE(float)
FS_CIN_INSTANTIATE(__half)
FS_CIN_INSTANTIATE(__nv_bfloat16)
#undef FS_CIN_INSTANTIATE

}  // namespace cuda
}  // namespace fastscore
