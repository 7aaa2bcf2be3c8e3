// MALA and HMC steps on CPU (the metropolis op; the arithmetic and the order of every sum:
// csrc/include/metropolis_math.h):
//   metropolis_propose    MALA: x' = (x + a s) + c z; HMC: p = z + b s, x' = x + c p; per sample |z|^2
//   metropolis_leapfrog   p = p + a s, x = x + c p, in place
//   metropolis_accept     per sample |r|^2 (MALA) or |k|^2 (HMC), log alpha, the uniform, the decision, and the
//                         accepted samples' x, score, energy replaced by the proposal's
// float64 / float32 / bfloat16 / float16, contiguous (N, ...) or channels_last (N, C, H, W).
//
// A sample's elements are walked in logical (row-major) order in pieces of kPiece (= the noise chunk): the
// proposal generates a piece's normals into an L1 buffer (csrc/include/counter_noise_cpu.h; for short samples,
// the normals of several whole samples at once), updates the piece's elements and sums its squares by the
// halving tree; the accept step squares a piece's r or k into a buffer and sums it the same way. Every
// result depends on the sample's own elements only, in a fixed order: not on the batch, the threads, or the
// CPU capability level (the tree's adds are the same at every vector width).
//
// fp-contract=off for this whole file (before any include, so every inlined function agrees): the
// generator's float path and the update's roundings are the exact sequence the other backends compute.
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "counter_noise_cpu.h"
#include "cpu_kernel_utils.h"
#include "metropolis_args.h"
#include "metropolis_math.h"

namespace fastscore {
namespace cpu {
namespace {

using namespace fastscore::mh;
using cnoise::kChunk;
using cnoise::NoiseBuffer;
using cnoise::run_tasks;

static_assert(kPiece == kChunk, "a piece's normals are one noise chunk");
constexpr int64_t kTask = 4 * kChunk;  // about this many elements per task handed to a thread

// f(std::bool_constant<v>{}): a run-time flag as a template argument.
template <typename F>
FS_ALWAYS_INLINE void with_flag(bool v, const F& f) {
  if (v) f(std::true_type{});
  else f(std::false_type{});
}

// ---- the sums -----------------------------------------------------------------------------------------------

// q[k] = z[k]^2 in double (exact for a float z).
FS_ALWAYS_INLINE void squares(const float* __restrict z, int64_t len, double* __restrict q) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) q[k] = square(double(z[k]));
}

// The halving tree of q[0 .. len) (len <= kPiece; q has room for kPiece): zero padded to the next power of
// two W, then q[k] += q[k + h] for h = W / 2, ..., 1. Returns the sum. The levels down to 8 slots are vector
// loops; the last three, spelled out, are the same adds: (q0 + q4) + (q2 + q6) and (q1 + q5) + (q3 + q7).
FS_ALWAYS_INLINE double tree_sum(double* __restrict q, int64_t len) {
  if (len <= 1) return len == 1 ? q[0] : 0.0;
  const int levels = 64 - __builtin_clzll(uint64_t(len - 1));  // W = 2^levels >= len
  std::fill(q + len, q + (int64_t(1) << levels), 0.0);
  for (int level = levels - 1; level >= 3; --level) {
    const int64_t h = int64_t(1) << level;
#pragma omp simd
    for (int64_t k = 0; k < h; ++k) q[k] += q[k + h];
  }
  if (levels == 1) return q[0] + q[1];
  if (levels == 2) return (q[0] + q[2]) + (q[1] + q[3]);
  return ((q[0] + q[4]) + (q[2] + q[6])) + ((q[1] + q[5]) + (q[3] + q[7]));
}

// Per sample, its pieces' sums added left to right.
FS_ALWAYS_INLINE void add_pieces(const double* partial, int64_t N, int64_t P, double* out) {
  for (int64_t n = 0; n < N; ++n) {
    double t = partial[n * P];
    for (int64_t j = 1; j < P; ++j) t = t + partial[n * P + j];
    out[n] = t;
  }
}

// Logical elements [i0, i0 + len) of sample n as row segments: seg(memory offset of the segment's first
// element, its length, its position within [0, len)).
template <bool STRIDED, typename Seg>
FS_ALWAYS_INLINE void for_segments(const Layout& l, int64_t n, int64_t i0, int64_t len, const Seg& seg) {
  if (!STRIDED) {
    seg(n * l.D + i0, len, int64_t(0));
    return;
  }
  int64_t r = i0 / l.L, k = i0 - r * l.L;
  for (int64_t j = 0; j < len;) {
    const int64_t m = std::min(len - j, l.L - k);
    seg(n * l.D + r * l.row_stride + k * l.es, m, j);
    j += m;
    k = 0;
    ++r;
  }
}

// ---- propose ------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct ProposeArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Layout l;
  const scalar_t* x = nullptr;
  const scalar_t* score = nullptr;
  scalar_t* x_out = nullptr;
  scalar_t* p_out = nullptr;  // null: MALA
  const acc_t* coef = nullptr;
  int64_t coef_stride = 3;
  PhiloxKey key;
  uint64_t e_base = 0;  // sample_offset * D
};

// One row segment of sample n: len elements from memory offset `off`, stride ES; z its normals.
template <bool HMC, bool STRIDED, typename scalar_t>
FS_ALWAYS_INLINE void propose_segment(const ProposeArgs<scalar_t>& p, int64_t n, int64_t off, int64_t len,
                                      const float* __restrict z) {
  using acc_t = typename ProposeArgs<scalar_t>::acc_t;
  const int64_t es = STRIDED ? p.l.es : 1;
  const acc_t* cf = p.coef + n * p.coef_stride;
  const acc_t a = cf[0], b = cf[1], c = cf[2];
  const scalar_t* __restrict x = p.x + off;
  const scalar_t* __restrict s = p.score + off;
  scalar_t* __restrict xo = p.x_out + off;
  scalar_t* __restrict po = HMC ? p.p_out + off : nullptr;
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const acc_t zk = acc_t(z[k]);
    if constexpr (HMC) {
      po[k * es] = narrow<scalar_t>(kick(zk, acc_t(widen(s[k * es])), b));
      xo[k * es] = narrow<scalar_t>(drift(acc_t(widen(x[k * es])), acc_t(widen(po[k * es])), c));
    } else {
      xo[k * es] = narrow<scalar_t>(mala_proposal(acc_t(widen(x[k * es])), acc_t(widen(s[k * es])), zk, a, c));
    }
  }
}

struct ProposeBuffers {
  NoiseBuffer noise;
  alignas(64) double q[kPiece];
};

// Chunks [c0, c1): a chunk is spc whole samples (P == 1) or piece c % P of sample c / P. sums[n P + piece]
// receives each piece's sum of z^2.
template <bool HMC, bool STRIDED, typename Cap, typename scalar_t>
FS_ALWAYS_INLINE void propose_chunks(Cap cap, const ProposeArgs<scalar_t>& p, int64_t P, int64_t spc, int64_t c0,
                                     int64_t c1, ProposeBuffers& buf, double* sums) {
  const Layout& l = p.l;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n0 = P == 1 ? c * spc : c / P, piece = P == 1 ? 0 : c - n0 * P;
    const int64_t count = P == 1 ? std::min(spc, l.N - n0) : 1;
    const int64_t i0 = piece * kPiece, len = std::min(kPiece, l.D - i0);
    const float* z = buf.noise.fill(cap, p.e_base + uint64_t(n0 * l.D + i0), count * len, p.key);
    for (int64_t j = 0; j < count; ++j) {
      const int64_t n = n0 + j;
      const float* zn = z + j * len;
      for_segments<STRIDED>(l, n, i0, len, [&](int64_t off, int64_t m, int64_t at) FS_VECTOR_BODY {
        propose_segment<HMC, STRIDED>(p, n, off, m, zn + at);
      });
      squares(zn, len, buf.q);
      sums[n * P + piece] = tree_sum(buf.q, len);
    }
  }
}

template <bool HMC, bool STRIDED, typename scalar_t>
void run_propose(const ProposeArgs<scalar_t>& p, double* sq_out) {
  const Layout& l = p.l;
  const int64_t P = pieces(l);
  // A chunk of noise: whole samples when one piece holds a sample (spc of them), else one piece of a sample.
  const int64_t spc = P == 1 ? std::max<int64_t>(1, kChunk / l.D) : 1;
  const int64_t chunks = P == 1 ? (l.N + spc - 1) / spc : l.N * P;
  const int64_t per_task = std::max<int64_t>(1, kTask / (P == 1 ? spc * l.D : kPiece));
  std::vector<double> partial(P > 1 ? size_t(l.N * P) : 0);
  double* sums = P > 1 ? partial.data() : sq_out;  // the pieces' sums; with one piece, the samples'
  run_tasks<ProposeBuffers>((chunks + per_task - 1) / per_task, [&](int64_t task, ProposeBuffers& buf) {
    dispatch_capability([&](auto cap) FS_VECTOR_BODY {
      propose_chunks<HMC, STRIDED>(cap, p, P, spc, task * per_task, std::min(chunks, (task + 1) * per_task), buf,
                                   sums);
    });
  });
  if (P > 1) add_pieces(partial.data(), l.N, P, sq_out);
}

// ---- leapfrog -----------------------------------------------------------------------------------------------

template <typename scalar_t>
FS_ALWAYS_INLINE void leapfrog_segment(scalar_t* __restrict x, scalar_t* __restrict pm, const scalar_t* __restrict s,
                                       int64_t len, at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> c) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    pm[k] = narrow<scalar_t>(kick(acc_t(widen(pm[k])), acc_t(widen(s[k])), a));
    x[k] = narrow<scalar_t>(drift(acc_t(widen(x[k])), acc_t(widen(pm[k])), c));
  }
}

// Memory positions [j0, j1) of the batch (every tensor has x's layout), cut at sample boundaries.
template <typename scalar_t>
FS_ALWAYS_INLINE void leapfrog_range(scalar_t* x, scalar_t* pm, const scalar_t* s, const at::opmath_type<scalar_t>* cf,
                                     int64_t cs, int64_t D, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1;) {
    const int64_t n = j / D, len = std::min(j1, (n + 1) * D) - j;
    leapfrog_segment(x + j, pm + j, s + j, len, cf[n * cs], cf[n * cs + 2]);
    j += len;
  }
}

// ---- accept -------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct AcceptArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Layout l;
  scalar_t* x = nullptr;
  scalar_t* score = nullptr;
  double* energy = nullptr;
  const scalar_t* x_prop = nullptr;
  const scalar_t* score_prop = nullptr;
  const double* energy_prop = nullptr;
  const scalar_t* p = nullptr;  // null: MALA
  const double* sq = nullptr;
  const acc_t* coef = nullptr;
  int64_t coef_stride = 3;
  bool* accepted = nullptr;
  double* log_alpha = nullptr;
  PhiloxKey key;
  uint64_t sample_offset = 0;
};

// q[at + k] = the square of r (MALA) or k (HMC) of the segment's elements, in double.
template <bool HMC, bool STRIDED, typename scalar_t>
FS_ALWAYS_INLINE void term_segment(const AcceptArgs<scalar_t>& p, int64_t n, int64_t off, int64_t len,
                                   double* __restrict q) {
  using acc_t = typename AcceptArgs<scalar_t>::acc_t;
  const int64_t es = STRIDED ? p.l.es : 1;
  const acc_t* cf = p.coef + n * p.coef_stride;
  const acc_t a = cf[0], b = cf[1];
  const scalar_t* __restrict x = p.x + off;
  const scalar_t* __restrict xp = p.x_prop + off;
  const scalar_t* __restrict sp = p.score_prop + off;
  const scalar_t* __restrict pm = HMC ? p.p + off : nullptr;
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    acc_t v;
    if constexpr (HMC) v = kick(acc_t(widen(pm[k * es])), acc_t(widen(sp[k * es])), b);
    else v = mala_reverse(acc_t(widen(x[k * es])), acc_t(widen(xp[k * es])), acc_t(widen(sp[k * es])), a);
    q[k] = square(double(v));
  }
}

template <bool HMC, bool STRIDED, typename scalar_t>
FS_ALWAYS_INLINE double piece_sum(const AcceptArgs<scalar_t>& p, int64_t n, int64_t piece, double* q) {
  const int64_t i0 = piece * kPiece, len = std::min(kPiece, p.l.D - i0);
  for_segments<STRIDED>(p.l, n, i0, len, [&](int64_t off, int64_t m, int64_t at) FS_VECTOR_BODY {
    term_segment<HMC, STRIDED>(p, n, off, m, q + at);
  });
  return tree_sum(q, len);
}

// Sample n's log alpha from its sum, the decision against its uniform u, and the per-sample outputs; returns
// the decision.
template <bool HMC, typename scalar_t>
FS_ALWAYS_INLINE bool decide(const AcceptArgs<scalar_t>& p, int64_t n, double total, double u) {
  const double la = HMC ? hmc_log_alpha(p.energy[n], p.energy_prop[n], p.sq[n], total)
                        : mala_log_alpha(p.energy[n], p.energy_prop[n], p.sq[n], total,
                                         double(p.coef[n * p.coef_stride + 2]));
  const bool yes = accept(la, u);
  p.log_alpha[n] = la;
  p.accepted[n] = yes;
  if (yes) p.energy[n] = p.energy_prop[n];
  return yes;
}

// x[n], score[n] <- x_prop[n], score_prop[n] over memory positions [m0, m0 + len) of sample n. (A loop, not
// memcpy: most calls move a short sample, where a library call costs more than the copy.)
// The elements are moved as their bits (float16 / bfloat16 are structs over a uint16_t, whose copy g++ does
// not vectorise).
template <typename scalar_t>
FS_ALWAYS_INLINE void copy_rows(const AcceptArgs<scalar_t>& p, int64_t n, int64_t m0, int64_t len) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 2, uint16_t,
                                    std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>>;
  static_assert(sizeof(bits_t) == sizeof(scalar_t), "a storage type of 2, 4 or 8 bytes");
  const int64_t off = n * p.l.D + m0;
  bits_t* __restrict x = reinterpret_cast<bits_t*>(p.x + off);
  bits_t* __restrict s = reinterpret_cast<bits_t*>(p.score + off);
  const bits_t* __restrict xp = reinterpret_cast<const bits_t*>(p.x_prop + off);
  const bits_t* __restrict sp = reinterpret_cast<const bits_t*>(p.score_prop + off);
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    x[k] = xp[k];
    s[k] = sp[k];
  }
}

// Items [i0, i1) of the (sample, piece) grid: the accepted samples' pieces copied.
template <typename scalar_t>
FS_ALWAYS_INLINE void copy_pieces(const AcceptArgs<scalar_t>& p, int64_t P, int64_t i0, int64_t i1) {
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t n = item / P, m0 = (item - n * P) * kPiece;
    if (p.accepted[n]) copy_rows(p, n, m0, std::min(kPiece, p.l.D - m0));
  }
}

constexpr int64_t kUniforms = 256;  // uniforms made at once: the Philox words of as many consecutive blocks

struct SumBuffer {
  alignas(64) double q[kPiece];
  alignas(64) uint32_t wa[2 * kUniforms];
  alignas(64) uint32_t wb[2 * kUniforms];
};

// Samples [n0, n1), each in one piece (D <= kPiece): its sum, the decision, and the copy while in cache. The
// uniforms of up to kUniforms consecutive samples come from one vectorised Philox pass over their blocks.
template <bool HMC, bool STRIDED, typename Cap, typename scalar_t>
FS_ALWAYS_INLINE void accept_samples(Cap cap, const AcceptArgs<scalar_t>& p, int64_t n0, int64_t n1,
                                     SumBuffer& buf) {
  for (int64_t m0 = n0; m0 < n1; m0 += kUniforms) {
    const int64_t m1 = std::min(n1, m0 + kUniforms);
    cnoise::philox_words(cap, kUniformBlock + p.sample_offset + uint64_t(m0), (m1 - m0 + 7) / 8 * 8, p.key, buf.wa,
                         buf.wb);  // wa[2k], wb[2k]: words 0 and 1 of sample m0 + k's block
    for (int64_t n = m0; n < m1; ++n) {
      const double total = p.l.D > 0 ? piece_sum<HMC, STRIDED>(p, n, 0, buf.q) : 0.0;
      const double u = uniform_of_words(buf.wa[2 * (n - m0)], buf.wb[2 * (n - m0)]);
      if (decide<HMC>(p, n, total, u)) copy_rows(p, n, 0, p.l.D);
    }
  }
}

template <bool HMC, bool STRIDED, typename scalar_t>
void run_accept(const AcceptArgs<scalar_t>& p) {
  const Layout& l = p.l;
  const int64_t P = pieces(l);
  if (P <= 1) {
    // A sample fits one piece: reduce, decide and copy it in one go, while its elements are in cache.
    const int64_t per_task = std::max<int64_t>(1, kTask / std::max<int64_t>(l.D, 1));
    run_tasks<SumBuffer>((l.N + per_task - 1) / per_task, [&](int64_t task, SumBuffer& buf) {
      dispatch_capability([&](auto cap) FS_VECTOR_BODY {
        accept_samples<HMC, STRIDED>(cap, p, task * per_task, std::min(l.N, (task + 1) * per_task), buf);
      });
    });
    return;
  }
  // Several pieces per sample: the pieces' sums in parallel, the decisions, then the copies in parallel.
  std::vector<double> partial(size_t(l.N * P)), total(size_t(l.N));
  run_tasks<SumBuffer>(l.N * P, [&](int64_t item, SumBuffer& buf) {
    dispatch_capability([&](auto) FS_VECTOR_BODY {
      const int64_t n = item / P;
      partial[size_t(item)] = piece_sum<HMC, STRIDED>(p, n, item - n * P, buf.q);
    });
  });
  add_pieces(partial.data(), l.N, P, total.data());
  for (int64_t n = 0; n < l.N; ++n) decide<HMC>(p, n, total[size_t(n)], uniform(p.sample_offset + uint64_t(n), p.key));
  at::parallel_for(0, l.N * P, 1, [&](int64_t i0, int64_t i1) {
    dispatch_capability([&](auto) FS_VECTOR_BODY { copy_pieces(p, P, i0, i1); });
  });
}

// ---- op entry points ----------------------------------------------------------------------------------------

#define FS_DISPATCH_MH(t, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (t).scalar_type(), "metropolis", __VA_ARGS__)

void metropolis_propose(const at::Tensor& x, const at::Tensor& score, const at::Tensor& coef, int64_t seed,
                        int64_t counter, int64_t sample_offset, at::Tensor x_out, c10::optional<at::Tensor> p_out,
                        at::Tensor sq_out) {
  const Layout l = check_propose(x, score, coef, sample_offset, x_out, p_out, sq_out);
  if (l.N == 0) return;
  if (l.D == 0) {
    sq_out.zero_();
    return;
  }
  FS_DISPATCH_MH(x, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ProposeArgs<scalar_t> p;
    p.l = l;
    p.x = x.data_ptr<scalar_t>();
    p.score = score.data_ptr<scalar_t>();
    p.x_out = x_out.data_ptr<scalar_t>();
    p.p_out = p_out.has_value() ? p_out->data_ptr<scalar_t>() : nullptr;
    p.coef = coef.data_ptr<acc_t>();
    p.coef_stride = coef.stride(0);
    p.key = lgv::philox_key(uint64_t(seed), uint64_t(counter));
    p.e_base = uint64_t(sample_offset) * uint64_t(l.D);
    double* sq = sq_out.data_ptr<double>();
    with_flag(p.p_out != nullptr, [&](auto hmc) {
      with_flag(l.es != 1, [&](auto strided) { run_propose<hmc(), strided()>(p, sq); });
    });
  });
}

void metropolis_leapfrog(at::Tensor x, at::Tensor p, const at::Tensor& score, const at::Tensor& coef) {
  const Layout l = check_leapfrog(x, p, score, coef);
  if (l.N == 0 || l.D == 0) return;
  FS_DISPATCH_MH(x, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* xd = x.data_ptr<scalar_t>();
    scalar_t* pd = p.data_ptr<scalar_t>();
    const scalar_t* sd = score.data_ptr<scalar_t>();
    const acc_t* cf = coef.data_ptr<acc_t>();
    const int64_t cs = coef.stride(0), total = l.N * l.D;
    // Memory order (every tensor has x's layout): tasks of kTask elements, cut at sample boundaries inside.
    run_tasks<char>((total + kTask - 1) / kTask, [&](int64_t task, char&) {
      dispatch_capability([&](auto) FS_VECTOR_BODY {
        leapfrog_range(xd, pd, sd, cf, cs, l.D, task * kTask, std::min(total, (task + 1) * kTask));
      });
    });
  });
}

void metropolis_accept(at::Tensor x, at::Tensor score, at::Tensor energy, const at::Tensor& x_prop,
                       const at::Tensor& score_prop, const at::Tensor& energy_prop, const c10::optional<at::Tensor>& p,
                       const at::Tensor& sq, const at::Tensor& coef, int64_t seed, int64_t counter,
                       int64_t sample_offset, at::Tensor accepted, at::Tensor log_alpha) {
  const Layout l = check_accept(x, score, energy, x_prop, score_prop, energy_prop, p, sq, coef, sample_offset,
                                accepted, log_alpha);
  if (l.N == 0) return;
  FS_DISPATCH_MH(x, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AcceptArgs<scalar_t> a;
    a.l = l;
    a.x = x.data_ptr<scalar_t>();
    a.score = score.data_ptr<scalar_t>();
    a.energy = energy.data_ptr<double>();
    a.x_prop = x_prop.data_ptr<scalar_t>();
    a.score_prop = score_prop.data_ptr<scalar_t>();
    a.energy_prop = energy_prop.data_ptr<double>();
    a.p = p.has_value() ? p->data_ptr<scalar_t>() : nullptr;
    a.sq = sq.data_ptr<double>();
    a.coef = coef.data_ptr<acc_t>();
    a.coef_stride = coef.stride(0);
    a.accepted = accepted.data_ptr<bool>();
    a.log_alpha = log_alpha.data_ptr<double>();
    a.key = lgv::philox_key(uint64_t(seed), uint64_t(counter));
    a.sample_offset = uint64_t(sample_offset);
    with_flag(a.p != nullptr, [&](auto hmc) {
      with_flag(l.es != 1, [&](auto strided) { run_accept<hmc(), strided()>(a); });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastscore_C, CPU, m) {
  m.impl("metropolis_propose", &metropolis_propose);
  m.impl("metropolis_leapfrog", &metropolis_leapfrog);
  m.impl("metropolis_accept", &metropolis_accept);
}

}  // namespace cpu
}  // namespace fastscore
