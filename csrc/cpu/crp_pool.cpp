// RefineNet CRP pooling on CPU (5x5, stride 1, padding 2; max or count_include_pad average):
// forward, backward and forward-mode (jvp), NCHW and channels_last, float64 / float32 / bfloat16 /
// float16 (the last two computed in float32).
//
// Separable: every output is a 5-tap reduction along W of five rows, then a 5-tap reduction along H
// of those row results (csrc/include/crp_pool_math.h has the per-element rules, shared with CUDA).
// Work items are planes (NCHW) or (sample, channel block) pairs (NHWC), one thread each, so no two
// threads ever write the same element. An item streams its rows through small per-thread buffers:
//
//   row buffer    one input row converted to the arithmetic type, with 2 pad columns on each side
//   ring of 5     the horizontal results of the last five rows (all an output row needs)
//
// and every pass is a plain loop over the `lanes` of a row, W * L of them: L = 1 in NCHW (lanes are
// the columns), L = the block's channels in NHWC (lanes are (column, channel) pairs, channels
// fastest). A horizontal tap is then the row shifted by k * L lanes and a vertical tap another row,
// so both directions are contiguous, unit-stride loads that g++ vectorises, in either layout. The
// passes over scratch run over the lanes rounded up to whole vectors (kVecLanes): a scalar remainder
// of these select-heavy loops compiles to branches and cost more than the vector part at W = 32.
// The extra lanes compute junk that is never stored (and, in the backward, sums to zero).
//
// Max backward is a gather in the same separable form: the gradient of a row's horizontal maxima is
// the sum of the output gradients whose vertical tap chose that row; an input's gradient is the sum
// of those whose horizontal tap chose its column. No scatter, so vectorised and race-free.
//
// Small NCHW planes (NCSN's CRP maps are 8x8 .. 32x32) would leave rows of one or two vectors, where
// loop overhead costs more than the arithmetic. Those run in "plane mode": the whole plane sits in
// a buffer with rows S = W + 2 lanes apart (the two lanes after a row's W pad both that row's right
// and the next row's left side), so each pass is ONE loop over the plane's H * S lanes, horizontal
// taps at lane offsets -2 .. 2 and vertical taps at -2S .. 2S. The arithmetic is the same.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu_kernel_utils.h"
#include "crp_pool_args.h"
#include "crp_pool_math.h"

namespace fastscore {
namespace cpu {
namespace {

using namespace fastscore::crp;

// The rows of one work item inside an (N, C, H, W) tensor of the op's layout.
struct Item {
  int64_t base;  // element offset of row 0, column 0, lane 0
  int64_t row;   // elements between rows: W (NCHW) or W * C (NHWC)
  int64_t px;    // elements between columns: 1 (NCHW) or C (NHWC)
  int64_t L;     // lanes per column: 1 (NCHW) or this block's channels (NHWC)
};

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kVecLanes = 16;  // float lanes of an AVX-512 vector (two vectors of double)

// Lanes of a row rounded up to whole vectors: the trip count of every pass over scratch rows.
int64_t vec_lanes(int64_t lanes) { return cdiv(lanes, kVecLanes) * kVecLanes; }

// Plane-mode buffers (NCHW planes, see the top): image (r, c) at lane kPlaneBase(S) + r * S + c,
// S = W + 2, with two pad rows above and below; passes run over the H * S lanes rounded up to
// vectors (HV), so a buffer holds HV + 4S + 8 lanes (taps of the last lane stay inside).
struct PlaneDims {
  int64_t H, W, S, base, HS, HV, P;
};

PlaneDims plane_dims(int64_t H, int64_t W) {
  const int64_t S = W + 2, HS = H * S, HV = vec_lanes(HS);
  return {H, W, S, 2 * S + 2, HS, HV, HV + 4 * S + 8};
}

// Plane mode for NCHW rows this short or less, and planes whose buffers stay in L1 / L2.
constexpr int64_t kPlaneMaxW = 64;
constexpr int64_t kPlaneMaxLanes = 8192;

struct Geometry {
  int64_t N = 0, C = 0, H = 0, W = 0;
  bool channels_last = false;
  bool planes = false;  // NCHW plane mode
  int64_t block = 1;   // lanes per column of an item: 1 (NCHW) or channels per block (NHWC)
  int64_t blocks = 1;  // items per sample: C (NCHW) or ceil(C / block) (NHWC)

  int64_t items() const { return N * blocks; }

  Item item(int64_t i) const {
    if (!channels_last) return {i * H * W, W, 1, 1};
    const int64_t n = i / blocks, c0 = (i % blocks) * block;
    return {n * H * W * C + c0, W * C, C, std::min(block, C - c0)};
  }

  // Elements of per-thread scratch an item needs (the max backward's buffers, the most of any).
  int64_t scratch() const {
    if (planes) return 7 * plane_dims(H, W).P;
    const int64_t RV = vec_lanes(W * block), PV = RV + 4 * block;
    return 8 * PV + 20 * RV;
  }
};


// NHWC rows hold W * block lanes: at most ~2048 (8 KiB of float per row, so the rings stay in L2),
// in multiples of 16 channels (a vector of float), and enough blocks that every thread has work.
constexpr int64_t kRowLanes = 2048;

Geometry geometry_of(const at::Tensor& x) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.channels_last = is_channels_last(x);
  if (!g.channels_last) {
    g.block = 1;
    g.blocks = g.C;
    g.planes = g.W <= kPlaneMaxW && (g.H + 4) * (g.W + 2) <= kPlaneMaxLanes;
    return g;
  }
  int64_t block = g.C;
  if (g.C * g.W > kRowLanes) block = std::max<int64_t>(16, kRowLanes / g.W / 16 * 16);
  const int64_t want = cdiv(2 * at::get_num_threads(), std::max<int64_t>(g.N, 1));
  if (cdiv(g.C, block) < want) block = std::max<int64_t>(16, cdiv(cdiv(g.C, want), 16) * 16);
  g.block = std::min(block, g.C);
  g.blocks = cdiv(g.C, g.block);
  return g;
}

// ---- row movement ---------------------------------------------------------------------------------

// W runs of L elements, converted: dst[w * dst_step + l] = src[w * src_step + l]; one contiguous run when
// both steps are L.
template <typename From, typename To>
FS_ALWAYS_INLINE void move_runs(const From* __restrict__ src, int64_t src_step, To* __restrict__ dst,
                                int64_t dst_step, int64_t W, int64_t L) {
  if (src_step == L && dst_step == L) {
    const int64_t n = W * L;
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) dst[e] = convert_value<To>(src[e]);
    return;
  }
  for (int64_t w = 0; w < W; ++w) {
    const From* s = src + w * src_step;
    To* d = dst + w * dst_step;
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) d[l] = convert_value<To>(s[l]);
  }
}

// One row of an item into lanes (dst[w * L + l] = src[w * px + l]) and back: one contiguous run when the
// item's lanes are all of a row's channels, or in NCHW.
template <typename scalar_t, typename acc_t>
FS_ALWAYS_INLINE void load_row(const scalar_t* __restrict__ src, const Item& it, int64_t W, acc_t* __restrict__ dst) {
  move_runs(src, it.px, dst, it.L, W, it.L);
}

template <typename scalar_t, typename acc_t>
FS_ALWAYS_INLINE void store_row(const acc_t* __restrict__ src, const Item& it, int64_t W, scalar_t* __restrict__ dst) {
  move_runs(src, it.L, dst, it.px, W, it.L);
}

template <typename acc_t>
FS_ALWAYS_INLINE void fill(acc_t* p, int64_t n, acc_t v) {
  for (int64_t e = 0; e < n; ++e) p[e] = v;
}

// ---- the two directions of the separable window ---------------------------------------------------

// out[e] = pool5(p[e], p[e + L], ..., p[e + 4L]): the horizontal taps of lane e of a padded row
// (lane e of the row proper sits at p[e + 2L]).
template <int MODE, typename acc_t>
FS_ALWAYS_INLINE void horizontal(const acc_t* __restrict__ p, int64_t L, int64_t RV, acc_t* __restrict__ out) {
  const acc_t *p0 = p, *p1 = p + L, *p2 = p + 2 * L, *p3 = p + 3 * L, *p4 = p + 4 * L;
#pragma omp simd
  for (int64_t e = 0; e < RV; ++e) out[e] = pool5<MODE>(p0[e], p1[e], p2[e], p3[e], p4[e]);
}

// The vertical taps of lane e: rows r[0..4] (off-image rows point at a row of the pad value).
template <int MODE, typename acc_t>
FS_ALWAYS_INLINE void vertical(const acc_t* const* r, int64_t RV, acc_t* __restrict__ out) {
  const acc_t *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3], *r4 = r[4];
  if (MODE == kMax) {
#pragma omp simd
    for (int64_t e = 0; e < RV; ++e) out[e] = pool5<kMax>(r0[e], r1[e], r2[e], r3[e], r4[e]);
  } else {
#pragma omp simd
    for (int64_t e = 0; e < RV; ++e) out[e] = avg_finish(pool5<kAvg>(r0[e], r1[e], r2[e], r3[e], r4[e]));
  }
}

// The horizontal maxima and their taps over RV lanes. The scan starts every lane at tap 0; pads are
// -inf and never taken, so a lane whose in-image taps are all -inf keeps tap 0, and the only lanes
// where that is off the image are columns 0 and 1, whose first in-image taps are 2 and 1: fixed up
// after the loop (max(tap, first) changes nothing where a value was taken, always at tap >= first).
template <typename acc_t>
FS_ALWAYS_INLINE void horizontal_argmax(const acc_t* __restrict__ p, int64_t L, int64_t RL, int64_t RV,
                                        acc_t* __restrict__ best, acc_t* __restrict__ tap) {
  const acc_t *p0 = p, *p1 = p + L, *p2 = p + 2 * L, *p3 = p + 3 * L, *p4 = p + 4 * L;
#pragma omp simd
  for (int64_t e = 0; e < RV; ++e) {
    acc_t b, t;
    argmax5(p0[e], p1[e], p2[e], p3[e], p4[e], acc_t(0), b, t);
    best[e] = b;
    tap[e] = t;
  }
  for (int64_t e = 0; e < std::min(2 * L, RL); ++e) tap[e] = std::max(tap[e], first_tap<acc_t>(e / L));
}

// The five rows output row h reduces, in tap order; rows off the image are `pad_row`.
template <typename acc_t>
FS_ALWAYS_INLINE void window_rows(acc_t* ring, int64_t stride, int64_t h, int64_t H, const acc_t* pad_row,
                                  const acc_t** rows) {
  for (int64_t dh = 0; dh < kWindow; ++dh) {
    const int64_t r = h - kPad + dh;
    rows[dh] = (r >= 0 && r < H) ? ring + (r % kWindow) * stride : pad_row;
  }
}

// ---- one item, per direction --------------------------------------------------------------------
// Per item: L lanes per column, RL = W * L lanes per row, RV = RL rounded up to whole vectors (the
// trip count of the scratch passes), PV = RV + 4L the stride of padded rows (2L pad lanes in front,
// then the row, then pads to the end, so tap k of lane e < RV is p[e + k L] < PV).

// dst = pool(src) for one item (forward; also the avg backward and jvp, which are the same box filter
// of grad_out or x_t). Row i's horizontal result enters the ring at step i; output row i - 2 leaves.
template <int MODE, typename scalar_t, typename acc_t>
FS_ALWAYS_INLINE void pool_item(const scalar_t* src, scalar_t* dst, const Item& it, int64_t H, int64_t W, acc_t* s) {
  const int64_t L = it.L, RL = W * L, RV = vec_lanes(RL), PV = RV + 4 * L;
  const acc_t pad = MODE == kMax ? neg_inf<acc_t>() : acc_t(0);
  acc_t* xrow = s;                 // PV: padded input row
  acc_t* ring = xrow + PV;         // 5 x RV: horizontal results of the last five rows
  acc_t* pad_row = ring + 5 * RV;  // RV: the pad value (rows off the image)
  acc_t* out = pad_row + RV;       // RV: one output row
  fill(xrow, 2 * L, pad);
  fill(xrow + 2 * L + RL, PV - 2 * L - RL, pad);
  fill(pad_row, RV, pad);
  const acc_t* rows[kWindow];
  for (int64_t i = 0; i < H + kPad; ++i) {
    if (i < H) {
      load_row(src + it.base + i * it.row, it, W, xrow + 2 * L);
      horizontal<MODE>(xrow, L, RV, ring + (i % kWindow) * RV);
    }
    const int64_t h = i - kPad;
    if (h >= 0) {
      window_rows(ring, RV, h, H, pad_row, rows);
      vertical<MODE>(rows, RV, out);
      store_row(out, it, W, dst + it.base + h * it.row);
    }
  }
}

// grad_x for one item, max mode. Step i: row i's horizontal argmax enters; output row h = i - 2 gets
// its vertical tap (needs rows h - 2 .. h + 2); input row r = i - 4 gets its gradient (needs the
// vertical taps and grad_out of output rows r - 2 .. r + 2). Rings of five suffice for all three.
// Junk lanes (RL .. RV, pads) of the routed horizontal gradient are zero: grad_out rows are zero
// there, and off-image output rows have tap `never`; so junk taps route nothing.
template <typename scalar_t, typename acc_t>
FS_ALWAYS_INLINE void max_bwd_item(const scalar_t* x, const scalar_t* grad_out, scalar_t* grad_x, const Item& it,
                                   int64_t H, int64_t W, acc_t* s) {
  const int64_t L = it.L, RL = W * L, RV = vec_lanes(RL), PV = RV + 4 * L;
  const acc_t never = acc_t(-1);      // a tap no output chose
  acc_t* xrow = s;                    // PV: padded input row (-inf pads)
  acc_t* hbest = xrow + PV;           // 5 x RV: horizontal maxima
  acc_t* htap = hbest + 5 * RV;       // 5 x PV: their taps, from lane 2L of each padded row
  acc_t* vtap = htap + 5 * PV;        // 5 x RV: vertical taps of output rows
  acc_t* grow = vtap + 5 * RV;        // 5 x RV: grad_out rows (zero past RL)
  acc_t* ninf_row = grow + 5 * RV;    // RV: -inf
  acc_t* never_row = ninf_row + RV;   // RV: `never` (taps and gradients of off-image output rows)
  acc_t* ghor = never_row + RV;       // PV: gradient of one row's horizontal maxima, zero pads
  acc_t* gin = ghor + PV;             // RV: one row of grad_x
  fill(xrow, 2 * L, neg_inf<acc_t>());
  fill(xrow + 2 * L + RL, PV - 2 * L - RL, neg_inf<acc_t>());
  fill(htap, 5 * PV, never);
  fill(grow, 5 * RV, acc_t(0));
  fill(ninf_row, RV, neg_inf<acc_t>());
  fill(never_row, RV, never);
  fill(ghor, PV, acc_t(0));
  const acc_t* rows[kWindow];
  const acc_t* taps[kWindow];
  const acc_t* grads[kWindow];
  for (int64_t i = 0; i < H + 2 * kPad; ++i) {
    if (i < H) {
      load_row(x + it.base + i * it.row, it, W, xrow + 2 * L);
      horizontal_argmax(xrow, L, RL, RV, hbest + (i % kWindow) * RV, htap + (i % kWindow) * PV + 2 * L);
    }
    const int64_t h = i - kPad;
    if (h >= 0 && h < H) {
      window_rows(hbest, RV, h, H, ninf_row, rows);
      const acc_t first = first_tap<acc_t>(h);
      acc_t* vt = vtap + (h % kWindow) * RV;
      const acc_t *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3], *r4 = rows[4];
#pragma omp simd
      for (int64_t e = 0; e < RV; ++e) {
        acc_t b, t;
        argmax5(r0[e], r1[e], r2[e], r3[e], r4[e], first, b, t);  // (the maximum itself is not needed)
        vt[e] = t;
      }
      load_row(grad_out + it.base + h * it.row, it, W, grow + (h % kWindow) * RV);
    }
    const int64_t r = i - 2 * kPad;
    if (r >= 0) {
      // Output row r + 2 - t reaches input row r through its vertical tap t.
      for (int64_t t = 0; t < kWindow; ++t) {
        const int64_t ho = r + kPad - t;
        const bool on = ho >= 0 && ho < H;
        taps[t] = on ? vtap + (ho % kWindow) * RV : never_row;
        grads[t] = on ? grow + (ho % kWindow) * RV : never_row;
      }
      const acc_t *t0 = taps[0], *t1 = taps[1], *t2 = taps[2], *t3 = taps[3], *t4 = taps[4];
      const acc_t *g0 = grads[0], *g1 = grads[1], *g2 = grads[2], *g3 = grads[3], *g4 = grads[4];
      acc_t* gh = ghor + 2 * L;
#pragma omp simd
      for (int64_t e = 0; e < RV; ++e)
        gh[e] = routed5(t0[e], t1[e], t2[e], t3[e], t4[e], g0[e], g1[e], g2[e], g3[e], g4[e]);
      // Output column w reaches input column w - 2 + t through its horizontal tap t, i.e. input lane e
      // is reached from lane e + (2 - t) L, at offset (4 - t) L in the padded rows.
      const acc_t* ht = htap + (r % kWindow) * PV;
      const acc_t *k0 = ht + 4 * L, *k1 = ht + 3 * L, *k2 = ht + 2 * L, *k3 = ht + L, *k4 = ht;
      const acc_t *q0 = ghor + 4 * L, *q1 = ghor + 3 * L, *q2 = ghor + 2 * L, *q3 = ghor + L, *q4 = ghor;
#pragma omp simd
      for (int64_t e = 0; e < RV; ++e)
        gin[e] = routed5(k0[e], k1[e], k2[e], k3[e], k4[e], q0[e], q1[e], q2[e], q3[e], q4[e]);
      store_row(gin, it, W, grad_x + it.base + r * it.row);
    }
  }
}

// out_t for one item, max mode: the tangent at each output's chosen input. Step i: row i's horizontal
// argmax picks its tangents into the ring; output row i - 2 picks among those rows.
template <typename scalar_t, typename acc_t>
FS_ALWAYS_INLINE void max_jvp_item(const scalar_t* x, const scalar_t* x_t, scalar_t* out_t, const Item& it,
                                   int64_t H, int64_t W, acc_t* s) {
  const int64_t L = it.L, RL = W * L, RV = vec_lanes(RL), PV = RV + 4 * L;
  acc_t* xrow = s;                // PV: padded input row (-inf pads)
  acc_t* trow = xrow + PV;        // PV: padded tangent row (pads are never chosen)
  acc_t* hbest = trow + PV;       // 5 x RV: horizontal maxima
  acc_t* hpick = hbest + 5 * RV;  // 5 x RV: tangents at their positions
  acc_t* htap = hpick + 5 * RV;   // RV: taps of the current row
  acc_t* ninf_row = htap + RV;    // RV: -inf
  acc_t* out = ninf_row + RV;     // RV: one row of out_t
  fill(xrow, 2 * L, neg_inf<acc_t>());
  fill(xrow + 2 * L + RL, PV - 2 * L - RL, neg_inf<acc_t>());
  fill(trow, 2 * L, acc_t(0));
  fill(trow + 2 * L + RL, PV - 2 * L - RL, acc_t(0));
  fill(ninf_row, RV, neg_inf<acc_t>());
  const acc_t* rows[kWindow];
  const acc_t* picks[kWindow];
  for (int64_t i = 0; i < H + kPad; ++i) {
    if (i < H) {
      load_row(x + it.base + i * it.row, it, W, xrow + 2 * L);
      load_row(x_t + it.base + i * it.row, it, W, trow + 2 * L);
      acc_t* hp = hpick + (i % kWindow) * RV;
      horizontal_argmax(xrow, L, RL, RV, hbest + (i % kWindow) * RV, htap);
      const acc_t *p0 = trow, *p1 = trow + L, *p2 = trow + 2 * L, *p3 = trow + 3 * L, *p4 = trow + 4 * L;
#pragma omp simd
      for (int64_t e = 0; e < RV; ++e) hp[e] = pick5(htap[e], p0[e], p1[e], p2[e], p3[e], p4[e]);
    }
    const int64_t h = i - kPad;
    if (h >= 0) {
      window_rows(hbest, RV, h, H, ninf_row, rows);
      window_rows(hpick, RV, h, H, ninf_row, picks);  // an off-image row is never picked
      const acc_t *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3], *r4 = rows[4];
      const acc_t *p0 = picks[0], *p1 = picks[1], *p2 = picks[2], *p3 = picks[3], *p4 = picks[4];
      const acc_t* pf = picks[h < kPad ? kPad - h : 0];  // the first in-image row (first_tap)
#pragma omp simd
      for (int64_t e = 0; e < RV; ++e)
        argmax5_pick(r0[e], r1[e], r2[e], r3[e], r4[e], p0[e], p1[e], p2[e], p3[e], p4[e], pf[e], out[e]);
      store_row(out, it, W, out_t + it.base + h * it.row);
    }
  }
}

// ---- one NCHW plane, plane mode -------------------------------------------------------------------
// Buffers are PlaneDims::P lanes. The pad lanes (gap columns, pad rows) are written once per thread by
// plane_scratch_init and never touched by the passes, which write data rows and junk lanes only:
// junk lanes (gap columns, lanes HS .. HV) hold values no stored lane depends on, and where a pass
// overwrites pad lanes with junk it restores them.

template <typename scalar_t, typename acc_t>
FS_ALWAYS_INLINE void plane_load(const scalar_t* __restrict__ src, const PlaneDims& d, acc_t* __restrict__ buf) {
  for (int64_t r = 0; r < d.H; ++r) {
    const scalar_t* s = src + r * d.W;
    acc_t* b = buf + d.base + r * d.S;
#pragma omp simd
    for (int64_t c = 0; c < d.W; ++c) b[c] = widen(s[c]);
  }
}

template <typename scalar_t, typename acc_t>
FS_ALWAYS_INLINE void plane_store(const acc_t* __restrict__ buf, const PlaneDims& d, scalar_t* __restrict__ dst) {
  for (int64_t r = 0; r < d.H; ++r) {
    const acc_t* b = buf + r * d.S;
    scalar_t* o = dst + r * d.W;
#pragma omp simd
    for (int64_t c = 0; c < d.W; ++c) o[c] = narrow<scalar_t>(b[c]);
  }
}

// Buffers of `count` planes: the first `padded` get the pad value `pad`, the rest `other`.
template <typename acc_t>
FS_ALWAYS_INLINE void plane_scratch_init(acc_t* s, const PlaneDims& d, int64_t count, int64_t padded, acc_t pad,
                                         acc_t other) {
  fill(s, padded * d.P, pad);
  fill(s + padded * d.P, (count - padded) * d.P, other);
}

// The horizontal argmax of a loaded plane (lanes relative to base) with the first-tap fix-up of
// columns 0 and 1 (as horizontal_argmax), and the -inf of the pad rows below restored.
template <typename acc_t>
FS_ALWAYS_INLINE void plane_horizontal_argmax(const acc_t* __restrict__ xb, const PlaneDims& d,
                                              acc_t* __restrict__ hb, acc_t* __restrict__ ht) {
#pragma omp simd
  for (int64_t e = 0; e < d.HV; ++e) {
    acc_t b, t;
    argmax5(xb[e - 2], xb[e - 1], xb[e], xb[e + 1], xb[e + 2], acc_t(0), b, t);
    hb[e] = b;
    ht[e] = t;
  }
  fill(hb + d.HS, d.HV - d.HS, neg_inf<acc_t>());
  for (int64_t r = 0; r < d.H; ++r) {
    ht[r * d.S] = std::max(ht[r * d.S], acc_t(2));
    ht[r * d.S + 1] = std::max(ht[r * d.S + 1], acc_t(1));  // (W = 1: a gap lane, harmless)
  }
}

// The vertical taps of every output lane: one scan from tap 0, then the first in-image tap (2 in row
// 0, 1 in row 1) as the fix-up of plane_horizontal_argmax (pad rows are -inf, never taken).
template <typename acc_t>
FS_ALWAYS_INLINE void plane_vertical_taps(const acc_t* __restrict__ hb, const PlaneDims& d, acc_t* __restrict__ vt) {
  const int64_t S = d.S;
  const acc_t *r0 = hb - 2 * S, *r1 = hb - S, *r2 = hb, *r3 = hb + S, *r4 = hb + 2 * S;
#pragma omp simd
  for (int64_t e = 0; e < d.HV; ++e) {
    acc_t b, t;
    argmax5(r0[e], r1[e], r2[e], r3[e], r4[e], acc_t(0), b, t);
    vt[e] = t;
  }
  for (int64_t e = 0; e < std::min(2 * S, d.HV); ++e) vt[e] = std::max(vt[e], first_tap<acc_t>(e / S));
}

// dst = pool(src) for one plane. Scratch: X (pad), HB (pad), O.
template <int MODE, typename scalar_t, typename acc_t>
FS_ALWAYS_INLINE void plane_pool(const scalar_t* src, scalar_t* dst, const PlaneDims& d, acc_t* s) {
  const acc_t pad = MODE == kMax ? neg_inf<acc_t>() : acc_t(0);
  acc_t* xb = s + d.base;            // input plane
  acc_t* hb = s + d.P + d.base;      // horizontal results (pad rows above and below)
  acc_t* out = s + 2 * d.P;          // output plane, rows S apart from lane 0
  plane_load(src, d, s);
#pragma omp simd
  for (int64_t e = 0; e < d.HV; ++e) hb[e] = pool5<MODE>(xb[e - 2], xb[e - 1], xb[e], xb[e + 1], xb[e + 2]);
  fill(hb + d.HS, d.HV - d.HS, pad);
  const int64_t S = d.S;
  const acc_t *r0 = hb - 2 * S, *r1 = hb - S, *r2 = hb, *r3 = hb + S, *r4 = hb + 2 * S;
  if (MODE == kMax) {
#pragma omp simd
    for (int64_t e = 0; e < d.HV; ++e) out[e] = pool5<kMax>(r0[e], r1[e], r2[e], r3[e], r4[e]);
  } else {
#pragma omp simd
    for (int64_t e = 0; e < d.HV; ++e) out[e] = avg_finish(pool5<kAvg>(r0[e], r1[e], r2[e], r3[e], r4[e]));
  }
  plane_store(out, d, dst);
}

// grad_x of one plane, max mode (the gather of max_bwd_item, over whole planes). Scratch: X (-inf),
// HB (-inf), HT, VT, G (0), GH (0), GI. G is zero off the data lanes (pads, gaps, junk), so junk taps
// route nothing and GH is zero there too.
template <typename scalar_t, typename acc_t>
FS_ALWAYS_INLINE void plane_max_bwd(const scalar_t* x, const scalar_t* grad_out, scalar_t* grad_x,
                                    const PlaneDims& d, acc_t* s) {
  acc_t* xb = s + d.base;
  acc_t* hb = s + d.P + d.base;
  acc_t* ht = s + 2 * d.P + d.base;
  acc_t* vt = s + 3 * d.P + d.base;
  acc_t* gb = s + 4 * d.P + d.base;
  acc_t* gh = s + 5 * d.P + d.base;
  acc_t* gin = s + 6 * d.P;
  const int64_t S = d.S;
  plane_load(x, d, s);
  plane_horizontal_argmax(xb, d, hb, ht);
  plane_vertical_taps(hb, d, vt);
  plane_load(grad_out, d, s + 4 * d.P);
  // Output row r + 2 - t reaches input row r through its vertical tap t (lane offset (2 - t) S).
  {
    const acc_t *t0 = vt + 2 * S, *t1 = vt + S, *t2 = vt, *t3 = vt - S, *t4 = vt - 2 * S;
    const acc_t *g0 = gb + 2 * S, *g1 = gb + S, *g2 = gb, *g3 = gb - S, *g4 = gb - 2 * S;
#pragma omp simd
    for (int64_t e = 0; e < d.HV; ++e)
      gh[e] = routed5(t0[e], t1[e], t2[e], t3[e], t4[e], g0[e], g1[e], g2[e], g3[e], g4[e]);
  }
  // Output column w reaches input column w - 2 + t through its horizontal tap t (offset 2 - t).
  {
    const acc_t *k0 = ht + 2, *k1 = ht + 1, *k2 = ht, *k3 = ht - 1, *k4 = ht - 2;
    const acc_t *q0 = gh + 2, *q1 = gh + 1, *q2 = gh, *q3 = gh - 1, *q4 = gh - 2;
#pragma omp simd
    for (int64_t e = 0; e < d.HV; ++e)
      gin[e] = routed5(k0[e], k1[e], k2[e], k3[e], k4[e], q0[e], q1[e], q2[e], q3[e], q4[e]);
  }
  plane_store(gin, d, grad_x);
}

// out_t of one plane, max mode. Scratch: X (-inf), T (0), HB (-inf), HT, HP, VT, O.
template <typename scalar_t, typename acc_t>
FS_ALWAYS_INLINE void plane_max_jvp(const scalar_t* x, const scalar_t* x_t, scalar_t* out_t, const PlaneDims& d,
                                    acc_t* s) {
  acc_t* xb = s + d.base;
  acc_t* tb = s + d.P + d.base;
  acc_t* hb = s + 2 * d.P + d.base;
  acc_t* ht = s + 3 * d.P + d.base;
  acc_t* hp = s + 4 * d.P + d.base;
  acc_t* vt = s + 5 * d.P + d.base;
  acc_t* out = s + 6 * d.P;
  const int64_t S = d.S;
  plane_load(x, d, s);
  plane_load(x_t, d, s + d.P);
  plane_horizontal_argmax(xb, d, hb, ht);
#pragma omp simd
  for (int64_t e = 0; e < d.HV; ++e) hp[e] = pick5(ht[e], tb[e - 2], tb[e - 1], tb[e], tb[e + 1], tb[e + 2]);
  plane_vertical_taps(hb, d, vt);
  const acc_t *p0 = hp - 2 * S, *p1 = hp - S, *p2 = hp, *p3 = hp + S, *p4 = hp + 2 * S;
#pragma omp simd
  for (int64_t e = 0; e < d.HV; ++e) out[e] = pick5(vt[e], p0[e], p1[e], p2[e], p3[e], p4[e]);
  plane_store(out, d, out_t);
}

// ---- hot loops, one entry point per (direction, dtype), run in the CPU capability's copy ---------

// What one call reads and writes: src and dst (N, C, H, W) in the geometry's layout; in2 likewise.
template <typename scalar_t>
struct Problem {
  using acc_t = at::opmath_type<scalar_t>;
  Geometry g;
  int mode = kMax;
  const scalar_t* src = nullptr;  // the pooled tensor: x (forward, max backward / jvp), grad_out or x_t (avg)
  const scalar_t* in2 = nullptr;  // grad_out (max backward) or x_t (max jvp)
  scalar_t* dst = nullptr;        // out, grad_x or out_t
};

// Each entry runs items [i0, i1) with the thread's scratch s; plane mode sets up its pads first.
template <typename scalar_t>
FS_ALWAYS_INLINE void pool_items(const Problem<scalar_t>& p, int64_t i0, int64_t i1,
                                 at::opmath_type<scalar_t>* s) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.g.planes) {
    const PlaneDims d = plane_dims(p.g.H, p.g.W);
    const int64_t HW = p.g.H * p.g.W;
    if (p.mode == kMax) {
      plane_scratch_init(s, d, 3, 2, neg_inf<acc_t>(), acc_t(0));
      for (int64_t i = i0; i < i1; ++i) plane_pool<kMax>(p.src + i * HW, p.dst + i * HW, d, s);
    } else {
      plane_scratch_init(s, d, 3, 2, acc_t(0), acc_t(0));
      for (int64_t i = i0; i < i1; ++i) plane_pool<kAvg>(p.src + i * HW, p.dst + i * HW, d, s);
    }
    return;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const Item it = p.g.item(i);
    if (p.mode == kMax) pool_item<kMax>(p.src, p.dst, it, p.g.H, p.g.W, s);
    else pool_item<kAvg>(p.src, p.dst, it, p.g.H, p.g.W, s);
  }
}

template <typename scalar_t>
FS_ALWAYS_INLINE void max_bwd_items(const Problem<scalar_t>& p, int64_t i0, int64_t i1,
                                    at::opmath_type<scalar_t>* s) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.g.planes) {
    const PlaneDims d = plane_dims(p.g.H, p.g.W);
    const int64_t HW = p.g.H * p.g.W;
    plane_scratch_init(s, d, 7, 2, neg_inf<acc_t>(), acc_t(0));
    for (int64_t i = i0; i < i1; ++i) plane_max_bwd(p.src + i * HW, p.in2 + i * HW, p.dst + i * HW, d, s);
    return;
  }
  for (int64_t i = i0; i < i1; ++i) max_bwd_item(p.src, p.in2, p.dst, p.g.item(i), p.g.H, p.g.W, s);
}

template <typename scalar_t>
FS_ALWAYS_INLINE void max_jvp_items(const Problem<scalar_t>& p, int64_t i0, int64_t i1,
                                    at::opmath_type<scalar_t>* s) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.g.planes) {
    const PlaneDims d = plane_dims(p.g.H, p.g.W);
    const int64_t HW = p.g.H * p.g.W;
    plane_scratch_init(s, d, 7, 1, neg_inf<acc_t>(), acc_t(0));
    fill(s + 2 * d.P, d.P, neg_inf<acc_t>());  // HB
    for (int64_t i = i0; i < i1; ++i) plane_max_jvp(p.src + i * HW, p.in2 + i * HW, p.dst + i * HW, d, s);
    return;
  }
  for (int64_t i = i0; i < i1; ++i) max_jvp_item(p.src, p.in2, p.dst, p.g.item(i), p.g.H, p.g.W, s);
}

enum Direction : int { kPool = 0, kMaxBwd = 1, kMaxJvp = 2 };

// Items in parallel, whole items per thread (each writes only its own plane / channel block), with
// one scratch buffer per thread. Small tensors run on one thread.
template <typename scalar_t>
void run(const Problem<scalar_t>& p, int direction) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t per_item = std::max<int64_t>(1, p.g.H * p.g.W * p.g.block);
  const int64_t grain = std::max<int64_t>(1, 16384 / per_item);
  const int64_t scratch = p.g.scratch();
  at::parallel_for(0, p.g.items(), grain, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> buf(scratch);
    dispatch_capability([&](auto) FS_VECTOR_BODY {
      if (direction == kPool) pool_items(p, i0, i1, buf.data());
      else if (direction == kMaxBwd) max_bwd_items(p, i0, i1, buf.data());
      else max_jvp_items(p, i0, i1, buf.data());
    });
  });
}

// ---- op entry points -------------------------------------------------------------------------
// The argument checks (crp::check_fwd, ...) are in csrc/include/crp_pool_args.h, shared with CUDA.

#define FS_DISPATCH_CRP(x, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (x).scalar_type(), "crp_pool", __VA_ARGS__)

// dst = the op of one direction; src, in2, dst all in x's layout (checked by the callers).
void launch(const at::Tensor& x, const at::Tensor& src, const at::Tensor* in2, const at::Tensor& dst, int mode,
            int direction) {
  if (x.numel() == 0) return;
  const Geometry g = geometry_of(x);
  FS_DISPATCH_CRP(x, [&] {
    Problem<scalar_t> p;
    p.g = g;
    p.mode = mode;
    p.src = src.data_ptr<scalar_t>();
    p.in2 = in2 != nullptr ? in2->data_ptr<scalar_t>() : nullptr;
    p.dst = dst.data_ptr<scalar_t>();
    run(p, direction);
  });
}

at::Tensor crp_pool_fwd(const at::Tensor& x, c10::string_view mode) {
  const int m = crp::check_fwd(x, mode);
  at::Tensor out = fresh_output_like(x);
  launch(x, x, nullptr, out, m, kPool);
  return out;
}

// The avg backward is the same box filter of grad_out (its window is symmetric, and zero padding
// is its own adjoint); the max backward routes each output's gradient to its chosen input.
at::Tensor crp_pool_bwd(const at::Tensor& grad_out, const at::Tensor& x, c10::string_view mode) {
  const int m = crp::check_bwd(grad_out, x, mode);
  at::Tensor grad_x = fresh_output_like(x);
  if (m == kAvg) launch(x, grad_out, nullptr, grad_x, m, kPool);
  else launch(x, x, &grad_out, grad_x, m, kMaxBwd);
  return grad_x;
}

// avg: the box filter of x_t; max: x_t at each output's chosen input.
at::Tensor crp_pool_jvp(const at::Tensor& x, const at::Tensor& x_t, c10::string_view mode) {
  const int m = crp::check_jvp(x, x_t, mode);
  at::Tensor out_t = fresh_output_like(x);
  if (m == kAvg) launch(x, x_t, nullptr, out_t, m, kPool);
  else launch(x, x, &x_t, out_t, m, kMaxJvp);
  return out_t;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastscore_C, CPU, m) {
  m.impl("crp_pool_fwd", &crp_pool_fwd);
  m.impl("crp_pool_bwd", &crp_pool_bwd);
  m.impl("crp_pool_jvp", &crp_pool_jvp);
}

}  // namespace cpu
}  // namespace fastscore
