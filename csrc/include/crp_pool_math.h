// RefineNet CRP pooling arithmetic (5x5 window, stride 1, padding 2), shared by csrc/cpu/crp_pool.cpp
// and csrc/cuda/crp_pool.cu, so the CPU tests exercise the rules the GPU runs.
//
// A window is scanned as five taps along W, then five rows along H (separable): out = reduce over
// rows dh of (reduce over taps dw of x[h - 2 + dh, w - 2 + dw]). Taps off the image hold the pad
// value: -inf for max (never taken, see below), 0 for the sum (avg divides by 25 whatever the count:
// count_include_pad, as F.avg_pool2d's default).
//
// Which input a max output comes from (its gradient goes there, its tangent comes from there) is the
// position PyTorch's CPU max_pool2d picks: it scans the window in row-major order from the window's
// first in-image position with best = -inf and takes a value when `v > best || isnan(v)`. So ties
// keep the earliest position, a NaN wins and a later NaN wins over it, and a window of -inf reports
// its first in-image position. The same scan along W and then along the row maxima along H gives
// exactly that position: the first row holding the maximum, and in it the first column (with NaN:
// the last row holding a NaN, and in it the last NaN), so the separable form routes like PyTorch.
// Positions are carried as small integers in the arithmetic type (no float -> int conversions: g++
// then vectorises every loop here).
#pragma once

#include "common_math.h"

namespace fastscore {
namespace crp {

enum Mode : int { kMax = 0, kAvg = 1 };

constexpr int kWindow = 5;  // taps per direction
constexpr int kPad = 2;     // = kWindow / 2: output (h, w) sees rows h - 2 .. h + 2, columns w - 2 .. w + 2

template <typename T>
FS_HD T neg_inf() {
  return T(-INFINITY);
}

// PyTorch's max_pool2d update rule: take v over the current best when v is larger or NaN. Bitwise
// `|` rather than `||`: no branch, so the compare stays a vector mask.
template <typename T>
FS_HD bool max_takes(T v, T best) {
  return (v > best) | (v != v);
}

template <typename T>
FS_HD T max_combine(T v, T best) {
  return max_takes(v, best) ? v : best;
}

// The value of one 5-tap reduction (taps in scan order). Max: NaN if any tap is NaN, else the maximum.
// (A sequential chain: g++ 12 does not vectorise the tree ((0, 1), (2, 3)), 4 of these selects.)
template <int MODE, typename T>
FS_HD T pool5(T v0, T v1, T v2, T v3, T v4) {
  if (MODE == kMax) {
    T b = v0;
    b = max_combine(v1, b);
    b = max_combine(v2, b);
    b = max_combine(v3, b);
    return max_combine(v4, b);
  }
  return (((v0 + v1) + v2) + v3) + v4;
}

// Average from the 5x5 sum: always / 25 (count_include_pad).
template <typename T>
FS_HD T avg_finish(T sum) {
  return sum / T(kWindow * kWindow);
}

template <typename T>
FS_HD void max_step(T v, T t, T& best, T& tap) {
  const bool take = max_takes(v, best);
  best = take ? v : best;
  tap = take ? t : tap;
}

// The 5-tap scan with position: `tap` (0..4) is the tap PyTorch's rule picks. Off-image taps hold
// -inf and are never taken; `first` is the first in-image tap (max(0, 2 - i) for a window centred on
// index i), reported when every in-image tap is -inf.
template <typename T>
FS_HD void argmax5(T v0, T v1, T v2, T v3, T v4, T first, T& best, T& tap) {
  best = neg_inf<T>();
  tap = first;
  max_step(v0, T(0), best, tap);
  max_step(v1, T(1), best, tap);
  max_step(v2, T(2), best, tap);
  max_step(v3, T(3), best, tap);
  max_step(v4, T(4), best, tap);
}

// argmax5 that carries, instead of the tap, the value q_tap of a second set of taps (forward mode: the
// tangent at the chosen position); q_first when no tap is taken. The same as pick5(tap, q0, ..., q4) after
// argmax5, without comparing taps afterwards (which g++ jump-threads into branches it cannot vectorise).
template <typename T>
FS_HD void argmax5_pick(T v0, T v1, T v2, T v3, T v4, T q0, T q1, T q2, T q3, T q4, T q_first, T& picked) {
  T best = neg_inf<T>();
  picked = q_first;
  max_step(v0, q0, best, picked);
  max_step(v1, q1, best, picked);
  max_step(v2, q2, best, picked);
  max_step(v3, q3, best, picked);
  max_step(v4, q4, best, picked);
}

// The first in-image tap of a window centred on index i (i >= 0).
template <typename T>
FS_HD T first_tap(int64_t i) {
  return T(i < kPad ? kPad - i : 0);
}

// v_tap for tap in 0..4 (forward-mode: the tangent at the chosen position). Selects only, so a NaN
// or inf in an unchosen tap does not leak.
template <typename T>
FS_HD T pick5(T tap, T v0, T v1, T v2, T v3, T v4) {
  T r = v0;
  r = tap == T(1) ? v1 : r;
  r = tap == T(2) ? v2 : r;
  r = tap == T(3) ? v3 : r;
  return tap == T(4) ? v4 : r;
}

// Max backward, gather form (each input sums what is routed to it; no scatter, no race): g_t is the
// gradient of the output whose tap t sits on this input, t_t that output's chosen tap. Only the
// outputs that chose this input contribute; selects, so an unrouted inf or NaN does not leak.
template <typename T>
FS_HD T routed5(T t0, T t1, T t2, T t3, T t4, T g0, T g1, T g2, T g3, T g4) {
  T acc = t0 == T(0) ? g0 : T(0);
  acc += t1 == T(1) ? g1 : T(0);
  acc += t2 == T(2) ? g2 : T(0);
  acc += t3 == T(3) ? g3 : T(0);
  acc += t4 == T(4) ? g4 : T(0);
  return acc;
}

// A chosen window position as one code, dh * 5 + dw (0..24), for kernels that store it.
FS_HD int window_code(int dh, int dw) { return dh * kWindow + dw; }

}  // namespace crp
}  // namespace fastscore
