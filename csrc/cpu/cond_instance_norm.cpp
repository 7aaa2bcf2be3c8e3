// InstanceNorm++ on CPU: forward, backward and forward-mode (jvp), NCHW and channels_last,
// float64 / float32 / bfloat16 / float16 (the last two accumulate in float32).
//
// Every direction is the same three-step pipeline per sample (cpu_kernel_utils.h):
//   reduce   per-plane sums over H*W        (forward: moments; backward: G1, G2; jvp: T1, T2)
//   finish   per-sample coefficients        (the cross-channel "++" term needs all channels)
//   map      one elementwise pass           (out, grad_x or the output tangent)
// The formulas are in csrc/include/cond_instance_norm_math.h, shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cond_instance_norm_args.h"
#include "cond_instance_norm_math.h"
#include "cpu_kernel_utils.h"

namespace fastscore {
namespace cpu {
namespace {

using namespace fastscore::cin;

// Sums are accumulated in the compute type over blocks of this many elements and then in double,
// so a 256x256 plane keeps float64-like accuracy in the moments at float32 vector speed.
constexpr int64_t kBlock = 512;

// One (N, C) parameter, read with its strides (a (C,) parameter arrives expanded with stride 0).
template <typename T>
struct Rows {
  const T* ptr = nullptr;
  int64_t s0 = 0, s1 = 0;
  FS_ALWAYS_INLINE T at(int64_t n, int64_t c) const { return ptr ? ptr[n * s0 + c * s1] : T(0); }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

template <typename T>
Rows<T> rows_of(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? rows_of<T>(*t) : Rows<T>{};
}

// Everything a kernel reads and writes. x, out, grad_out, grad_x, x_t, out_t: the (N, C, H, W)
// activations, all in one layout (NCHW, or NHWC when channels_last), sample n at offset n*C*HW.
// mean, rstd, a, b, muhat and the per-direction scratch: (N, C) contiguous, accumulation type.
template <typename scalar_t>
struct Problem {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t N = 0, C = 0, HW = 0;
  bool channels_last = false;
  bool has_alpha = false;
  int act = kActNone;
  acc_t eps = 0;
  const scalar_t* x = nullptr;
  Rows<acc_t> gamma, alpha, beta;
  acc_t* mean = nullptr;   // (N, C)
  acc_t* rstd = nullptr;   // (N, C)
  acc_t* a = nullptr;      // (N, C) forward coefficients: pre = a * (x - mean) + b
  acc_t* b = nullptr;      // (N, C)
  acc_t* muhat = nullptr;  // (N, C) standardised channel means (0 without alpha)
  acc_t* s = nullptr;      // (N,)   1/sqrt(var_c(mean) + eps) (0 without alpha)
  acc_t* m = nullptr;      // (N,)   mean_c(mean)
  // forward
  scalar_t* out = nullptr;
  // backward
  const scalar_t* grad_out = nullptr;
  scalar_t* grad_x = nullptr;
  acc_t* sum1 = nullptr;  // (N, C) G1 (backward) or T1 (jvp)
  acc_t* sum2 = nullptr;  // (N, C) G2 (backward) or T2 (jvp)
  acc_t* k1 = nullptr;    // (N, C) A (backward) or P (jvp)
  acc_t* k2 = nullptr;    // (N, C) B or Q
  acc_t* k3 = nullptr;    // (N, C) D or R
  acc_t* grad_gamma = nullptr;
  acc_t* grad_alpha = nullptr;
  acc_t* grad_beta = nullptr;
  // jvp
  const scalar_t* x_t = nullptr;
  Rows<acc_t> gamma_t, alpha_t, beta_t;
  scalar_t* out_t = nullptr;

  int64_t offset(int64_t n) const { return n * C * HW; }
};

// ---- the two generic loops every direction is made of -----------------------------------------

// Per-channel sums sum1 = sum_hw f1(i), sum2 = sum_hw f2(i) for channels [c0, c1) of sample n,
// where `terms(c, i, t1, t2)` yields the two summands for element i (a flat offset) of channel c.
template <typename scalar_t, typename Terms>
FS_ALWAYS_INLINE void reduce_channels(const Problem<scalar_t>& p, int64_t n, int64_t c0, int64_t c1,
                                      double* out1, double* out2, Terms&& terms) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  const int64_t base = p.offset(n);
  if (!p.channels_last) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t plane = base + c * p.HW;
      double s1 = 0, s2 = 0;
      for (int64_t i0 = 0; i0 < p.HW; i0 += kBlock) {
        const int64_t i1 = std::min(p.HW, i0 + kBlock);
        acc_t b1 = 0, b2 = 0;
#pragma omp simd reduction(+ : b1, b2)
        for (int64_t i = i0; i < i1; ++i) {
          acc_t t1, t2;
          terms(c, plane + i, t1, t2);
          b1 += t1;
          b2 += t2;
        }
        s1 += b1;
        s2 += b2;
      }
      out1[c - c0] = s1;
      out2[c - c0] = s2;
    }
    return;
  }
  // channels_last: walk the rows of the sample, channels in vector lanes.
  const int64_t cn = c1 - c0;
  std::vector<acc_t> blk(2 * cn);
  acc_t* b1 = blk.data();
  acc_t* b2 = b1 + cn;
  for (int64_t j = 0; j < cn; ++j) out1[j] = out2[j] = 0;
  for (int64_t r0 = 0; r0 < p.HW; r0 += kBlock) {
    const int64_t r1 = std::min(p.HW, r0 + kBlock);
    for (int64_t j = 0; j < cn; ++j) b1[j] = b2[j] = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t row = base + r * p.C + c0;
#pragma omp simd
      for (int64_t j = 0; j < cn; ++j) {
        acc_t t1, t2;
        terms(c0 + j, row + j, t1, t2);
        b1[j] += t1;
        b2[j] += t2;
      }
    }
    for (int64_t j = 0; j < cn; ++j) {
      out1[j] += b1[j];
      out2[j] += b2[j];
    }
  }
}

// dst[i] = value(c, i) for every element i of channels [c0, c1) of sample n.
template <typename scalar_t, typename Value>
FS_ALWAYS_INLINE void map_channels(const Problem<scalar_t>& p, int64_t n, int64_t c0, int64_t c1, scalar_t* dst,
                                   Value&& value) {
  const int64_t base = p.offset(n);
  if (!p.channels_last) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t plane = base + c * p.HW;
#pragma omp simd
      for (int64_t i = plane; i < plane + p.HW; ++i) dst[i] = narrow<scalar_t>(value(c, i));
    }
    return;
  }
  for (int64_t r = 0; r < p.HW; ++r) {
    const int64_t row = base + r * p.C;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) dst[row + c] = narrow<scalar_t>(value(c, row + c));
  }
}

// ---- hot loops, one entry point per (direction, step, dtype), run in the CPU capability's copy ----

template <typename scalar_t>
FS_ALWAYS_INLINE void fwd_reduce_impl(const Problem<scalar_t>& p, int64_t n, int64_t c0, int64_t c1) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  const int64_t cn = c1 - c0;
  std::vector<double> sums(2 * cn);
  std::vector<acc_t> shift(cn);
  // The shift K is the plane's first element (channels_last: the first row).
  for (int64_t c = c0; c < c1; ++c)
    shift[c - c0] = widen(p.x[p.offset(n) + (p.channels_last ? c : c * p.HW)]);
  const acc_t* K = shift.data();
  const scalar_t* x = p.x;
  reduce_channels(p, n, c0, c1, sums.data(), sums.data() + cn, [&](int64_t c, int64_t i, acc_t& t1, acc_t& t2) {
    const acc_t d = widen(x[i]) - K[c - c0];
    t1 = d;
    t2 = d * d;
  });
  for (int64_t c = c0; c < c1; ++c) {
    double mean, rstd;
    moments_from_shifted_sums<double>(double(K[c - c0]), sums[c - c0], sums[cn + c - c0], double(p.HW), double(p.eps),
                                      mean, rstd);
    p.mean[n * p.C + c] = acc_t(mean);
    p.rstd[n * p.C + c] = acc_t(rstd);
  }
}

template <int ACT, typename scalar_t>
FS_ALWAYS_INLINE void fwd_map_impl(const Problem<scalar_t>& p, int64_t n, int64_t c0, int64_t c1) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  const acc_t* mean = p.mean + n * p.C;
  const acc_t* a = p.a + n * p.C;
  const acc_t* b = p.b + n * p.C;
  const scalar_t* x = p.x;
  map_channels(p, n, c0, c1, p.out,
               [&](int64_t c, int64_t i) { return fwd_element(widen(x[i]) - mean[c], a[c], b[c], ACT); });
}

template <int ACT, typename scalar_t>
FS_ALWAYS_INLINE void bwd_reduce_impl(const Problem<scalar_t>& p, int64_t n, int64_t c0, int64_t c1) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  const int64_t cn = c1 - c0;
  std::vector<double> sums(2 * cn);
  const acc_t* mean = p.mean + n * p.C;
  const acc_t* a = p.a + n * p.C;
  const acc_t* b = p.b + n * p.C;
  const scalar_t* x = p.x;
  const scalar_t* go = p.grad_out;
  reduce_channels(p, n, c0, c1, sums.data(), sums.data() + cn, [&](int64_t c, int64_t i, acc_t& t1, acc_t& t2) {
    const acc_t xc = widen(x[i]) - mean[c];
    const acc_t g = bwd_pre_grad(widen(go[i]), xc, a[c], b[c], ACT);
    t1 = g;
    t2 = g * xc;
  });
  for (int64_t c = c0; c < c1; ++c) {
    p.sum1[n * p.C + c] = acc_t(sums[c - c0]);
    p.sum2[n * p.C + c] = acc_t(sums[cn + c - c0]);
  }
}

template <int ACT, typename scalar_t>
FS_ALWAYS_INLINE void bwd_map_impl(const Problem<scalar_t>& p, int64_t n, int64_t c0, int64_t c1) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  const int64_t o = n * p.C;
  const acc_t *mean = p.mean + o, *a = p.a + o, *b = p.b + o, *A = p.k1 + o, *B = p.k2 + o, *D = p.k3 + o;
  const scalar_t* x = p.x;
  const scalar_t* go = p.grad_out;
  map_channels(p, n, c0, c1, p.grad_x, [&](int64_t c, int64_t i) {
    return bwd_element(widen(go[i]), widen(x[i]) - mean[c], a[c], b[c], A[c], B[c], D[c], ACT);
  });
}

template <typename scalar_t>
FS_ALWAYS_INLINE void jvp_reduce_impl(const Problem<scalar_t>& p, int64_t n, int64_t c0, int64_t c1) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  const int64_t cn = c1 - c0;
  std::vector<double> sums(2 * cn);
  const acc_t* mean = p.mean + n * p.C;
  const scalar_t* x = p.x;
  const scalar_t* xt = p.x_t;
  reduce_channels(p, n, c0, c1, sums.data(), sums.data() + cn, [&](int64_t c, int64_t i, acc_t& t1, acc_t& t2) {
    const acc_t v = widen(xt[i]);
    t1 = v;
    t2 = (widen(x[i]) - mean[c]) * v;
  });
  for (int64_t c = c0; c < c1; ++c) {
    p.sum1[n * p.C + c] = acc_t(sums[c - c0]);
    p.sum2[n * p.C + c] = acc_t(sums[cn + c - c0]);
  }
}

template <int ACT, bool HAS_XT, typename scalar_t>
FS_ALWAYS_INLINE void jvp_map_impl(const Problem<scalar_t>& p, int64_t n, int64_t c0, int64_t c1) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  const int64_t o = n * p.C;
  const acc_t *mean = p.mean + o, *a = p.a + o, *b = p.b + o, *P = p.k1 + o, *Q = p.k2 + o, *R = p.k3 + o;
  const scalar_t* x = p.x;
  const scalar_t* xt = p.x_t;
  map_channels(p, n, c0, c1, p.out_t, [&](int64_t c, int64_t i) {
    const acc_t v = HAS_XT ? widen(xt[i]) : acc_t(0);
    return jvp_element(v, widen(x[i]) - mean[c], a[c], b[c], P[c], Q[c], R[c], ACT);
  });
}

template <typename scalar_t>
FS_ALWAYS_INLINE void fwd_reduce(const Problem<scalar_t>& p, int64_t n, int64_t c0, int64_t c1) {
  fwd_reduce_impl(p, n, c0, c1);
}

template <typename scalar_t>
FS_ALWAYS_INLINE void fwd_map(const Problem<scalar_t>& p, int64_t n, int64_t c0, int64_t c1) {
  if (p.act == kActElu) fwd_map_impl<kActElu>(p, n, c0, c1);
  else fwd_map_impl<kActNone>(p, n, c0, c1);
}

template <typename scalar_t>
FS_ALWAYS_INLINE void bwd_reduce(const Problem<scalar_t>& p, int64_t n, int64_t c0, int64_t c1) {
  if (p.act == kActElu) bwd_reduce_impl<kActElu>(p, n, c0, c1);
  else bwd_reduce_impl<kActNone>(p, n, c0, c1);
}

template <typename scalar_t>
FS_ALWAYS_INLINE void bwd_map(const Problem<scalar_t>& p, int64_t n, int64_t c0, int64_t c1) {
  if (p.act == kActElu) bwd_map_impl<kActElu>(p, n, c0, c1);
  else bwd_map_impl<kActNone>(p, n, c0, c1);
}

template <typename scalar_t>
FS_ALWAYS_INLINE void jvp_reduce(const Problem<scalar_t>& p, int64_t n, int64_t c0, int64_t c1) {
  jvp_reduce_impl(p, n, c0, c1);
}

template <typename scalar_t>
FS_ALWAYS_INLINE void jvp_map(const Problem<scalar_t>& p, int64_t n, int64_t c0, int64_t c1) {
  if (p.x_t != nullptr) {
    if (p.act == kActElu) jvp_map_impl<kActElu, true>(p, n, c0, c1);
    else jvp_map_impl<kActNone, true>(p, n, c0, c1);
  } else {
    if (p.act == kActElu) jvp_map_impl<kActElu, false>(p, n, c0, c1);
    else jvp_map_impl<kActNone, false>(p, n, c0, c1);
  }
}

// ---- per-sample coefficient steps (O(C) work, not hot) -----------------------------------------

template <typename scalar_t>
void fwd_finish(const Problem<scalar_t>& p, int64_t n) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  const int64_t o = n * p.C;
  acc_t m = 0, s = 0;
  if (p.has_alpha) channel_mean_moments(p.mean + o, p.C, p.eps, m, s);
  p.m[n] = m;
  p.s[n] = s;
  for (int64_t c = 0; c < p.C; ++c) {
    const acc_t muhat = (p.mean[o + c] - m) * s;
    p.muhat[o + c] = muhat;
    fwd_coef(p.rstd[o + c], muhat, p.gamma.at(n, c), p.alpha.at(n, c), p.beta.at(n, c), p.a[o + c], p.b[o + c]);
  }
}

template <typename scalar_t>
void bwd_finish(const Problem<scalar_t>& p, int64_t n) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  const int64_t o = n * p.C;
  const acc_t inv_hw = acc_t(1) / acc_t(p.HW);
  std::vector<acc_t> dmuhat(p.C);
  acc_t sum_d = 0, sum_dm = 0;
  for (int64_t c = 0; c < p.C; ++c) {
    acc_t dg, da, db;
    bwd_param_grads(p.sum1[o + c], p.sum2[o + c], p.rstd[o + c], p.muhat[o + c], p.gamma.at(n, c),
                    p.alpha.at(n, c), dg, da, db, dmuhat[c]);
    p.grad_gamma[o + c] = dg;
    if (p.grad_alpha) p.grad_alpha[o + c] = da;
    if (p.grad_beta) p.grad_beta[o + c] = db;
    sum_d += dmuhat[c];
    sum_dm += dmuhat[c] * p.muhat[o + c];
  }
  for (int64_t c = 0; c < p.C; ++c) {
    const acc_t dmean =
        p.has_alpha ? bwd_dmean(dmuhat[c], p.muhat[o + c], p.s[n], sum_d / acc_t(p.C), sum_dm, p.C) : acc_t(0);
    bwd_dx_coef(p.sum1[o + c], p.sum2[o + c], p.rstd[o + c], p.gamma.at(n, c), dmean, inv_hw, p.k1[o + c],
                p.k2[o + c], p.k3[o + c]);
  }
}

template <typename scalar_t>
void jvp_finish(const Problem<scalar_t>& p, int64_t n) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  const int64_t o = n * p.C;
  const acc_t inv_hw = acc_t(1) / acc_t(p.HW);
  std::vector<acc_t> dmean(p.C), drstd(p.C);
  for (int64_t c = 0; c < p.C; ++c) {
    if (p.x_t) jvp_plane_tangents(p.sum1[o + c], p.sum2[o + c], p.rstd[o + c], inv_hw, dmean[c], drstd[c]);
    else dmean[c] = drstd[c] = 0;
  }
  acc_t dm = 0, ds = 0;
  if (p.has_alpha) jvp_channel_mean_tangents(p.mean + o, dmean.data(), p.C, p.m[n], p.s[n], dm, ds);
  for (int64_t c = 0; c < p.C; ++c) {
    const acc_t dmuhat = p.has_alpha ? (dmean[c] - dm) * p.s[n] + (p.mean[o + c] - p.m[n]) * ds : acc_t(0);
    jvp_coef(p.rstd[o + c], drstd[c], p.muhat[o + c], dmuhat, dmean[c], p.gamma.at(n, c), p.alpha.at(n, c),
             p.gamma_t.at(n, c), p.alpha_t.at(n, c), p.beta_t.at(n, c), p.k1[o + c], p.k2[o + c], p.k3[o + c]);
  }
}

// ---- op entry points -------------------------------------------------------------------------

// The argument checks (cin::check_fwd, ...) are in csrc/include/cond_instance_norm_args.h, shared with CUDA.

// Fills the shape, inputs and (N, C) workspace common to all directions.
template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
                               const c10::optional<at::Tensor>& beta, double eps, int act, const at::Tensor& mean,
                               const at::Tensor& rstd, at::Tensor& work) {
  using acc_t = typename Problem<scalar_t>::acc_t;
  Problem<scalar_t> p;
  p.N = x.size(0);
  p.C = x.size(1);
  p.HW = x.size(2) * x.size(3);
  p.channels_last = is_channels_last(x);
  p.has_alpha = alpha.has_value();
  p.act = act;
  p.eps = acc_t(eps);
  p.x = x.data_ptr<scalar_t>();
  p.gamma = rows_of<acc_t>(gamma);
  p.alpha = rows_of<acc_t>(alpha);
  p.beta = rows_of<acc_t>(beta);
  p.mean = mean.data_ptr<acc_t>();
  p.rstd = rstd.data_ptr<acc_t>();
  // workspace: a, b, muhat, sum1, sum2, k1, k2, k3 (each N*C), m, s (each N)
  const int64_t NC = p.N * p.C;
  work = at::empty({8 * NC + 2 * p.N}, mean.options());
  acc_t* w = work.data_ptr<acc_t>();
  p.a = w;
  p.b = w + NC;
  p.muhat = w + 2 * NC;
  p.sum1 = w + 3 * NC;
  p.sum2 = w + 4 * NC;
  p.k1 = w + 5 * NC;
  p.k2 = w + 6 * NC;
  p.k3 = w + 7 * NC;
  p.m = w + 8 * NC;
  p.s = w + 8 * NC + p.N;
  return p;
}

#define FS_DISPATCH_CIN(x, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (x).scalar_type(), "cond_instance_norm", __VA_ARGS__)

void fwd_into(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
              const c10::optional<at::Tensor>& beta, double eps, int act, at::Tensor& out, at::Tensor& mean,
              at::Tensor& rstd) {
  at::Tensor work;
  FS_DISPATCH_CIN(x, [&] {
    auto p = make_problem<scalar_t>(x, gamma, alpha, beta, eps, act, mean, rstd, work);
    p.out = out.data_ptr<scalar_t>();
    run_sample_pipeline(
        p.N, p.C, p.HW, [&](int64_t n, int64_t c0, int64_t c1) FS_VECTOR_BODY { fwd_reduce(p, n, c0, c1); },
        [&](int64_t n) { fwd_finish(p, n); },
        [&](int64_t n, int64_t c0, int64_t c1) FS_VECTOR_BODY { fwd_map(p, n, c0, c1); });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cond_instance_norm_fwd(const at::Tensor& x, const at::Tensor& gamma,
                                                                      const c10::optional<at::Tensor>& alpha,
                                                                      const c10::optional<at::Tensor>& beta,
                                                                      double eps, c10::string_view act) {
  const int act_code = cin::check_fwd(x, gamma, alpha, beta, act);
  at::Tensor out = fresh_output_like(x);
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_type_of(x)));
  at::Tensor rstd = at::empty_like(mean);
  fwd_into(x, gamma, alpha, beta, eps, act_code, out, mean, rstd);
  return {out, mean, rstd};
}

void cond_instance_norm_fwd_out(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
                                const c10::optional<at::Tensor>& beta, double eps, c10::string_view act,
                                at::Tensor out) {
  // out may be x itself (in place): every element is read by the reduce and then read and written
  // by the map at the same index.
  const int act_code = cin::check_fwd_out(x, gamma, alpha, beta, act, out);
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(acc_type_of(x)));
  at::Tensor rstd = at::empty_like(mean);
  fwd_into(x, gamma, alpha, beta, eps, act_code, out, mean, rstd);
}

// The forward coefficients (a, b, muhat, m, s) from saved statistics, for backward and jvp.
template <typename scalar_t>
void recompute_fwd_coefficients(const Problem<scalar_t>& p) {
  at::parallel_for(0, p.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) fwd_finish(p, n);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cond_instance_norm_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
    const c10::optional<at::Tensor>& beta, const at::Tensor& mean, const at::Tensor& rstd, double eps,
    c10::string_view act) {
  const int act_code = cin::check_bwd(grad_out, x, gamma, alpha, beta, mean, rstd, act);
  at::Tensor grad_x = fresh_output_like(x);
  at::Tensor grad_gamma = at::empty_like(mean);
  at::Tensor grad_alpha = alpha.has_value() ? at::empty_like(mean) : at::empty({0}, mean.options());
  at::Tensor grad_beta = beta.has_value() ? at::empty_like(mean) : at::empty({0}, mean.options());
  at::Tensor work;
  FS_DISPATCH_CIN(x, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto p = make_problem<scalar_t>(x, gamma, alpha, beta, eps, act_code, mean, rstd, work);
    p.grad_out = grad_out.data_ptr<scalar_t>();
    p.grad_x = grad_x.data_ptr<scalar_t>();
    p.grad_gamma = grad_gamma.data_ptr<acc_t>();
    p.grad_alpha = alpha.has_value() ? grad_alpha.data_ptr<acc_t>() : nullptr;
    p.grad_beta = beta.has_value() ? grad_beta.data_ptr<acc_t>() : nullptr;
    recompute_fwd_coefficients(p);
    run_sample_pipeline(
        p.N, p.C, p.HW, [&](int64_t n, int64_t c0, int64_t c1) FS_VECTOR_BODY { bwd_reduce(p, n, c0, c1); },
        [&](int64_t n) { bwd_finish(p, n); },
        [&](int64_t n, int64_t c0, int64_t c1) FS_VECTOR_BODY { bwd_map(p, n, c0, c1); });
  });
  return {grad_x, grad_gamma, grad_alpha, grad_beta};
}

at::Tensor cond_instance_norm_jvp(const at::Tensor& x, const at::Tensor& gamma, const c10::optional<at::Tensor>& alpha,
                                  const c10::optional<at::Tensor>& beta, const at::Tensor& mean,
                                  const at::Tensor& rstd, const c10::optional<at::Tensor>& x_t,
                                  const c10::optional<at::Tensor>& gamma_t, const c10::optional<at::Tensor>& alpha_t,
                                  const c10::optional<at::Tensor>& beta_t, double eps, c10::string_view act) {
  const int act_code = cin::check_jvp(x, gamma, alpha, beta, mean, rstd, x_t, gamma_t, alpha_t, beta_t, act);
  at::Tensor out_t = fresh_output_like(x);
  at::Tensor work;
  FS_DISPATCH_CIN(x, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto p = make_problem<scalar_t>(x, gamma, alpha, beta, eps, act_code, mean, rstd, work);
    p.x_t = x_t.has_value() ? x_t->data_ptr<scalar_t>() : nullptr;
    p.gamma_t = rows_of<acc_t>(gamma_t);
    p.alpha_t = rows_of<acc_t>(alpha_t);
    p.beta_t = rows_of<acc_t>(beta_t);
    p.out_t = out_t.data_ptr<scalar_t>();
    recompute_fwd_coefficients(p);
    auto reduce = [&](int64_t n, int64_t c0, int64_t c1) FS_VECTOR_BODY {
      if (p.x_t) jvp_reduce(p, n, c0, c1);
    };
    run_sample_pipeline(
        p.N, p.C, p.HW, reduce, [&](int64_t n) { jvp_finish(p, n); },
        [&](int64_t n, int64_t c0, int64_t c1) FS_VECTOR_BODY { jvp_map(p, n, c0, c1); });
  });
  return out_t;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastscore_C, CPU, m) {
  m.impl("cond_instance_norm_fwd", &cond_instance_norm_fwd);
  m.impl("cond_instance_norm_fwd_out", &cond_instance_norm_fwd_out);
  m.impl("cond_instance_norm_bwd", &cond_instance_norm_bwd);
  m.impl("cond_instance_norm_jvp", &cond_instance_norm_jvp);
}

}  // namespace cpu
}  // namespace fastscore
