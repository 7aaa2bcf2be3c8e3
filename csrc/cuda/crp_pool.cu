// RefineNet CRP pooling on CUDA (5x5, stride 1, padding 2; max or count_include_pad average):
// forward, backward and forward-mode (jvp), NCHW and channels_last, float64 / float32 / bfloat16 /
// float16 (the last two computed in float32). Pure CUDA on raw pointers; the torch glue is
// crp_pool_binding.cpp.
//
// One block per output tile of TC channels x TH rows x TW columns (NCHW: 1 x 16 x 32 of one plane;
// NHWC: 32 channels x 4 x 4 pixels, so a warp reads 32 adjacent channels). The block stages the tile
// and a 2-pixel halo in shared memory (off-image: the pad value), reduces it separably as the CPU
// kernel does (5 taps along W into shared memory, then 5 rows along H), and writes:
//   pool_kernel<kOutValue>   the max or average (forward; the avg backward / jvp are the same box
//                            filter of grad_out / x_t)
//   pool_kernel<kOutCode>    (max) the code dh * 5 + dw of each output's chosen input, one byte
//   pool_kernel<kOutPick>    (max jvp) x_t at each output's chosen input
// and max_bwd_kernel gathers the max backward: a tile of inputs stages the codes and gradients of
// the outputs around it (2-pixel halo) and sums, per input, those whose code names it. No scatter,
// no atomics: race-free and deterministic. The rules (which input a max window picks, exactly as
// PyTorch's CPU max_pool2d, NaN included) are csrc/include/crp_pool_math.h, shared with the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "crp_pool.cuh"
#include "crp_pool_math.h"

namespace fastscore {
namespace cuda {
namespace {

using namespace fastscore::crp;

constexpr int kThreads = 256;

// Output tiles per layout: TC channels x TH rows x TW columns, and the halo'd input tile around it.
template <bool CL>
struct Tile;
template <>
struct Tile<false> {  // NCHW: a 16 x 32 patch of one plane; rows of 32 + 4 contiguous elements
  static constexpr int TC = 1, TH = 16, TW = 32;
};
template <>
struct Tile<true> {  // NHWC: 4 x 4 pixels of 32 adjacent channels (a warp reads 32 contiguous values)
  static constexpr int TC = 32, TH = 4, TW = 4;
};

enum OutKind : int { kOutValue = 0, kOutCode = 1, kOutPick = 2 };
constexpr uint8_t kNoCode = 255;  // an off-image output: names no input

// Where the tensors are and which tile a block owns. Element (n, c, h, w) sits at
// n * sN + c * sC + h * sH + w * sW (NCHW or NHWC strides).
struct Geo {
  int64_t C, H, W;
  int64_t sN, sC, sH, sW;
  int64_t ctiles, htiles, wtiles;
};

struct TileOrigin {
  int64_t n, c0, h0, w0;
};

template <bool CL>
__device__ __forceinline__ TileOrigin tile_origin(const Geo& g) {
  using TL = Tile<CL>;
  int64_t b = blockIdx.x;
  const int64_t wt = b % g.wtiles;
  b /= g.wtiles;
  const int64_t ht = b % g.htiles;
  b /= g.htiles;
  const int64_t ct = b % g.ctiles;
  return {b / g.ctiles, ct * TL::TC, ht * TL::TH, wt * TL::TW};
}

// Tile-local (channel, row, column) of item t of a [rows][cols][TC] box, channels fastest (threads of
// a warp then touch adjacent addresses in NHWC, adjacent columns in NCHW where TC = 1).
template <int TC>
__device__ __forceinline__ void unflatten(int t, int cols, int& c, int& r, int& col) {
  c = t % TC;
  const int rest = t / TC;
  col = rest % cols;
  r = rest / cols;
}

// Output tile: the window reduction of each output, written as OUTK says.
//   MODE kMax, OUTK kOutValue: dst (T) = max;  kOutCode: dst (uint8) = dh * 5 + dw of the chosen input;
//   kOutPick: dst (T) = t at the chosen input.  MODE kAvg (OUTK kOutValue): dst (T) = sum / 25.
template <int MODE, int OUTK, bool CL, typename T, typename acc_t = typename AccOf<T>::type>
__global__ void __launch_bounds__(kThreads)
    pool_kernel(const T* __restrict__ src,  // (N, C, H, W): the pooled tensor
                const T* __restrict__ t,    // (N, C, H, W): x_t for kOutPick, else unused
                void* __restrict__ dst,     // (N, C, H, W): T, or uint8_t for kOutCode
                Geo g) {
  using TL = Tile<CL>;
  constexpr int TC = TL::TC, TH = TL::TH, TW = TL::TW;
  constexpr int HH = TH + 2 * kPad, HW = TW + 2 * kPad;  // the halo'd input tile
  __shared__ acc_t tile[HH * HW * TC];
  __shared__ acc_t hval[HH * TW * TC];  // horizontal maxima or sums of every halo row
  __shared__ uint8_t htap[HH * TW * TC];  // max: their taps (0..4)
  const TileOrigin o = tile_origin<CL>(g);
  const acc_t pad = MODE == kMax ? neg_inf<acc_t>() : acc_t(0);
  const int64_t nbase = o.n * g.sN;

  for (int i = threadIdx.x; i < HH * HW * TC; i += kThreads) {
    int c, r, col;
    unflatten<TC>(i, HW, c, r, col);
    const int64_t ch = o.c0 + c, h = o.h0 + r - kPad, w = o.w0 + col - kPad;
    const bool in = ch < g.C && h >= 0 && h < g.H && w >= 0 && w < g.W;
    tile[i] = in ? to_acc(src[nbase + ch * g.sC + h * g.sH + w * g.sW]) : pad;
  }
  __syncthreads();

  // Along W: output column col of halo row r reads tile columns col .. col + 4.
  for (int i = threadIdx.x; i < HH * TW * TC; i += kThreads) {
    int c, r, col;
    unflatten<TC>(i, TW, c, r, col);
    const acc_t* p = tile + (r * HW + col) * TC + c;
    const acc_t v0 = p[0], v1 = p[TC], v2 = p[2 * TC], v3 = p[3 * TC], v4 = p[4 * TC];
    if (MODE == kMax) {
      acc_t best, tap;
      argmax5(v0, v1, v2, v3, v4, first_tap<acc_t>(o.w0 + col), best, tap);
      hval[i] = best;
      htap[i] = uint8_t(tap);
    } else {
      hval[i] = pool5<kAvg>(v0, v1, v2, v3, v4);
    }
  }
  __syncthreads();

  // Along H: output row r reads halo rows r .. r + 4.
  for (int i = threadIdx.x; i < TH * TW * TC; i += kThreads) {
    int c, r, col;
    unflatten<TC>(i, TW, c, r, col);
    const int64_t ch = o.c0 + c, h = o.h0 + r, w = o.w0 + col;
    if (ch >= g.C || h >= g.H || w >= g.W) continue;
    const int64_t at = nbase + ch * g.sC + h * g.sH + w * g.sW;
    const int k = (r * TW + col) * TC + c;
    constexpr int R = TW * TC;  // one halo row further down
    if (MODE == kAvg) {
      const acc_t sum = pool5<kAvg>(hval[k], hval[k + R], hval[k + 2 * R], hval[k + 3 * R], hval[k + 4 * R]);
      static_cast<T*>(dst)[at] = from_acc<T>(avg_finish(sum));
      continue;
    }
    acc_t best, dh;
    argmax5(hval[k], hval[k + R], hval[k + 2 * R], hval[k + 3 * R], hval[k + 4 * R], first_tap<acc_t>(h), best, dh);
    const int row = int(dh);
    const int dw = htap[k + row * R];
    if (OUTK == kOutValue) {
      static_cast<T*>(dst)[at] = from_acc<T>(best);
    } else if (OUTK == kOutCode) {
      static_cast<uint8_t*>(dst)[at] = uint8_t(window_code(row, dw));
    } else {
      static_cast<T*>(dst)[at] = t[at + (row - kPad) * g.sH + (dw - kPad) * g.sW];
    }
  }
}

// Input tile: grad_x of max pooling, gather form. Input (i, j) is tap (dh, dw) of output
// (i + 2 - dh, j + 2 - dw), whose gradient it receives when that output's code is dh * 5 + dw; the
// outputs around the tile (2-pixel halo) are staged in shared memory, off-image ones with no code.
template <bool CL, typename T, typename acc_t = typename AccOf<T>::type>
__global__ void __launch_bounds__(kThreads)
    max_bwd_kernel(const uint8_t* __restrict__ code,  // (N, C, H, W): chosen input of each output
                   const T* __restrict__ grad_out,    // (N, C, H, W)
                   T* __restrict__ grad_x,            // (N, C, H, W)
                   Geo g) {
  using TL = Tile<CL>;
  constexpr int TC = TL::TC, TH = TL::TH, TW = TL::TW;
  constexpr int HH = TH + 2 * kPad, HW = TW + 2 * kPad;
  __shared__ acc_t sg[HH * HW * TC];
  __shared__ uint8_t sc[HH * HW * TC];
  const TileOrigin o = tile_origin<CL>(g);
  const int64_t nbase = o.n * g.sN;

  for (int i = threadIdx.x; i < HH * HW * TC; i += kThreads) {
    int c, r, col;
    unflatten<TC>(i, HW, c, r, col);
    const int64_t ch = o.c0 + c, h = o.h0 + r - kPad, w = o.w0 + col - kPad;
    const bool in = ch < g.C && h >= 0 && h < g.H && w >= 0 && w < g.W;
    const int64_t at = nbase + ch * g.sC + h * g.sH + w * g.sW;
    sg[i] = in ? to_acc(grad_out[at]) : acc_t(0);
    sc[i] = in ? code[at] : kNoCode;
  }
  __syncthreads();

  for (int i = threadIdx.x; i < TH * TW * TC; i += kThreads) {
    int c, r, col;
    unflatten<TC>(i, TW, c, r, col);
    const int64_t ch = o.c0 + c, h = o.h0 + r, w = o.w0 + col;
    if (ch >= g.C || h >= g.H || w >= g.W) continue;
    acc_t acc = 0;
#pragma unroll
    for (int dh = 0; dh < kWindow; ++dh) {
#pragma unroll
      for (int dw = 0; dw < kWindow; ++dw) {
        // output (r + 2 - dh, col + 2 - dw) of the tile sits at halo (r + 4 - dh, col + 4 - dw)
        const int k = ((r + 2 * kPad - dh) * HW + (col + 2 * kPad - dw)) * TC + c;
        acc += sc[k] == window_code(dh, dw) ? sg[k] : acc_t(0);
      }
    }
    grad_x[nbase + ch * g.sC + h * g.sH + w * g.sW] = from_acc<T>(acc);
  }
}

// ---- host side ----------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <bool CL, typename T>
Geo geo_of(const CrpArgs<T>& p) {
  using TL = Tile<CL>;
  Geo g;
  g.C = p.C;
  g.H = p.H;
  g.W = p.W;
  g.sN = p.C * p.H * p.W;
  if (CL) {
    g.sC = 1;
    g.sH = p.W * p.C;
    g.sW = p.C;
  } else {
    g.sC = p.H * p.W;
    g.sH = p.W;
    g.sW = 1;
  }
  g.ctiles = ceil_div(p.C, TL::TC);
  g.htiles = ceil_div(p.H, TL::TH);
  g.wtiles = ceil_div(p.W, TL::TW);
  return g;
}

template <bool CL, typename T>
int64_t blocks_of(const CrpArgs<T>& p, const Geo& g) {
  return p.N * g.ctiles * g.htiles * g.wtiles;
}

template <int MODE, int OUTK, bool CL, typename T>
cudaError_t launch_pool(const CrpArgs<T>& p, const T* src, const T* t, void* dst, cudaStream_t stream) {
  const Geo g = geo_of<CL>(p);
  const int64_t blocks = blocks_of<CL>(p, g);
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  pool_kernel<MODE, OUTK, CL, T><<<unsigned(blocks), kThreads, 0, stream>>>(src, t, dst, g);
  return cudaGetLastError();
}

template <bool CL, typename T>
cudaError_t launch_max_bwd(const CrpArgs<T>& p, const uint8_t* code, cudaStream_t stream) {
  const Geo g = geo_of<CL>(p);
  const int64_t blocks = blocks_of<CL>(p, g);
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  max_bwd_kernel<CL, T><<<unsigned(blocks), kThreads, 0, stream>>>(code, p.in2, p.dst, g);
  return cudaGetLastError();
}

// Variadic: template argument lists have commas.
#define FS_CUDA_TRY(...)                        \
  do {                                          \
    const cudaError_t fs_err_ = (__VA_ARGS__);  \
    if (fs_err_ != cudaSuccess) return fs_err_; \
  } while (0)

template <bool CL, typename T>
cudaError_t fwd_layout(const CrpArgs<T>& p, cudaStream_t stream) {
  return p.mode == kMax ? launch_pool<kMax, kOutValue, CL, T>(p, p.x, nullptr, p.dst, stream)
                        : launch_pool<kAvg, kOutValue, CL, T>(p, p.x, nullptr, p.dst, stream);
}

template <bool CL, typename T>
cudaError_t bwd_layout(const CrpArgs<T>& p, cudaStream_t stream) {
  // avg: the box filter of grad_out (symmetric window; zero padding is its own adjoint)
  if (p.mode == kAvg) return launch_pool<kAvg, kOutValue, CL, T>(p, p.in2, nullptr, p.dst, stream);
  if (p.workspace == nullptr) return cudaErrorInvalidValue;
  FS_CUDA_TRY(launch_pool<kMax, kOutCode, CL, T>(p, p.x, nullptr, p.workspace, stream));
  return launch_max_bwd<CL, T>(p, static_cast<const uint8_t*>(p.workspace), stream);
}

template <bool CL, typename T>
cudaError_t jvp_layout(const CrpArgs<T>& p, cudaStream_t stream) {
  return p.mode == kMax ? launch_pool<kMax, kOutPick, CL, T>(p, p.x, p.in2, p.dst, stream)
                        : launch_pool<kAvg, kOutValue, CL, T>(p, p.in2, nullptr, p.dst, stream);
}

}  // namespace

size_t crp_bwd_workspace_bytes(int64_t N, int64_t C, int64_t H, int64_t W, int mode) {
  return mode == kMax ? size_t(N * C * H * W) : size_t(0);
}

template <typename T>
cudaError_t crp_fwd(const CrpArgs<T>& p, cudaStream_t stream) {
  if (p.N * p.C * p.H * p.W == 0) return cudaSuccess;
  return p.channels_last ? fwd_layout<true>(p, stream) : fwd_layout<false>(p, stream);
}

template <typename T>
cudaError_t crp_bwd(const CrpArgs<T>& p, cudaStream_t stream) {
  if (p.N * p.C * p.H * p.W == 0) return cudaSuccess;
  return p.channels_last ? bwd_layout<true>(p, stream) : bwd_layout<false>(p, stream);
}

template <typename T>
cudaError_t crp_jvp(const CrpArgs<T>& p, cudaStream_t stream) {
  if (p.N * p.C * p.H * p.W == 0) return cudaSuccess;
  return p.channels_last ? jvp_layout<true>(p, stream) : jvp_layout<false>(p, stream);
}

#define FS_CRP_INSTANTIATE(T)                                                  \
  template cudaError_t crp_fwd<T>(const CrpArgs<T>&, cudaStream_t);          \
  template cudaError_t crp_bwd<T>(const CrpArgs<T>&, cudaStream_t);          \
  template cudaError_t crp_jvp<T>(const CrpArgs<T>&, cudaStream_t);

FS_CRP_INSTANTIATE(double)
FS_CRP_INSTANTIATE(float)
FS_CRP_INSTANTIATE(__half)
FS_CRP_INSTANTIATE(__nv_bfloat16)
#undef FS_CRP_INSTANTIATE

}  // namespace cuda
}  // namespace fastscore
