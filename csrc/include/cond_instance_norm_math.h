// InstanceNorm++ arithmetic, shared by csrc/cpu/cond_instance_norm.cpp and
// csrc/cuda/cond_instance_norm.cu, so the CPU tests exercise the formulas the GPU runs.
//
// Notation (docs/numerics.md#instancenorm): per sample n and channel c, over the H*W plane,
//   mean = mean_hw x, rstd = 1/sqrt(var^b_hw x + eps), xc = x - mean (x centred), xhat = xc * rstd.
// The "++" term standardises the channel means of one sample:
//   m = mean_c mean, s = 1/sqrt(var^u_c mean + eps), muhat = (mean - m) * s.
// Forward: pre = gamma * (xhat + muhat * alpha) + beta, out = act(pre); written per channel as
//   pre = a * xc + b, a = gamma * rstd, b = gamma * muhat * alpha + beta.
// (Centring first, rather than a * x + b', avoids cancellation when |mean| >> std.)
// A missing alpha or beta is 0; without alpha the cross-channel term is skipped (muhat = 0).
#pragma once

#include "common_math.h"

namespace fastscore {
namespace cin {

// ---- forward ---------------------------------------------------------------------------------

// Per-plane moments from shifted sums S1 = sum(x - K), S2 = sum((x - K)^2) over hw elements,
// K being one element of the plane: the shift keeps S2/hw - (S1/hw)^2 free of cancellation.
template <typename T>
FS_HD void moments_from_shifted_sums(T K, T S1, T S2, T hw, T eps, T& mean, T& rstd) {
  const T d = S1 / hw;
  T var = S2 / hw - d * d;
  var = var > T(0) ? var : T(0);
  mean = K + d;
  rstd = T(1) / sqrt(var + eps);
}

// s from sq = sum_c (mean - m)^2; apart from channel_mean_moments so that a parallel reduction (the
// CUDA kernel's) finishes with the same formula.
template <typename T>
FS_HD T channel_mean_s(T sq, int64_t C, T eps) {
  return T(1) / sqrt(sq / T(C - 1) + eps);  // unbiased over channels, as torch.var
}

// Cross-channel standardisation of one sample's channel means (the "++" term): returns m and s.
template <typename T>
FS_HD void channel_mean_moments(const T* mean, int64_t C, T eps, T& m, T& s) {
  T acc = 0;
  for (int64_t c = 0; c < C; ++c) acc += mean[c];
  m = acc / T(C);
  T sq = 0;
  for (int64_t c = 0; c < C; ++c) sq += (mean[c] - m) * (mean[c] - m);
  s = channel_mean_s(sq, C, eps);
}

template <typename T>
FS_HD void fwd_coef(T rstd, T muhat, T gamma, T alpha, T beta, T& a, T& b) {
  a = gamma * rstd;
  b = gamma * (muhat * alpha) + beta;
}

template <typename T>
FS_HD T fwd_element(T xc, T a, T b, int act) {
  return act_forward(a * xc + b, act);
}

// ---- backward --------------------------------------------------------------------------------
// With g = dL/dpre = grad_out * act'(pre), per plane G1 = sum_hw g and G2 = sum_hw g * xc:
//   dbeta = G1, dgamma = rstd * G2 + muhat * alpha * G1, dalpha = gamma * muhat * G1,
//   dmuhat = alpha * gamma * G1,
//   dmean = s * (dmuhat - mean_c dmuhat - muhat * sum_c(dmuhat * muhat) / (C - 1))
//   dx = A * g + B * xc + D, A = gamma * rstd, B = -gamma * rstd^3 * G2 / hw,
//                            D = (dmean - gamma * rstd * G1) / hw.
// (dmean is derived in docs/numerics.md#gradients-of-instancenorm.)

template <typename T>
FS_HD T bwd_pre_grad(T grad_out, T xc, T a, T b, int act) {
  return act == kActNone ? grad_out : grad_out * act_grad(a * xc + b, act);
}

template <typename T>
FS_HD void bwd_param_grads(T G1, T G2, T rstd, T muhat, T gamma, T alpha, T& dgamma, T& dalpha, T& dbeta,
                           T& dmuhat) {
  dbeta = G1;
  dgamma = rstd * G2 + muhat * alpha * G1;
  dalpha = gamma * muhat * G1;
  dmuhat = alpha * gamma * G1;
}

template <typename T>
FS_HD T bwd_dmean(T dmuhat, T muhat, T s, T mean_dmuhat, T sum_dmuhat_muhat, int64_t C) {
  return s * (dmuhat - mean_dmuhat - muhat * sum_dmuhat_muhat / T(C - 1));
}

template <typename T>
FS_HD void bwd_dx_coef(T G1, T G2, T rstd, T gamma, T dmean, T inv_hw, T& A, T& B, T& D) {
  A = gamma * rstd;
  B = -(gamma * rstd * rstd * rstd * G2) * inv_hw;
  D = (dmean - gamma * rstd * G1) * inv_hw;
}

template <typename T>
FS_HD T bwd_element(T grad_out, T xc, T a, T b, T A, T B, T D, int act) {
  return A * bwd_pre_grad(grad_out, xc, a, b, act) + B * xc + D;
}

// ---- forward-mode (jvp) ----------------------------------------------------------------------
// Tangents x_t, gamma_t, alpha_t, beta_t (missing = 0). Per plane T1 = sum_hw x_t, T2 = sum_hw xc*x_t:
//   dmean = T1 / hw, drstd = -rstd^3 * T2 / hw,
//   dm = mean_c dmean, ds = -s^3 / 2 * dv, dv = 2 / (C - 1) * sum_c (mean - m)(dmean - dm),
//   dmuhat = (dmean - dm) * s + (mean - m) * ds,
//   dpre = P * x_t + Q * xc + R, P = gamma * rstd, Q = gamma_t * rstd + gamma * drstd,
//   R = gamma_t * muhat * alpha + gamma * (dmuhat * alpha + muhat * alpha_t - dmean * rstd) + beta_t,
//   out_t = act'(pre) * dpre.

template <typename T>
FS_HD void jvp_plane_tangents(T T1, T T2, T rstd, T inv_hw, T& dmean, T& drstd) {
  dmean = T1 * inv_hw;
  drstd = -(rstd * rstd * rstd * T2) * inv_hw;
}

// ds from cov = sum_c (mean - m)(dmean - dm); apart for the same reason as channel_mean_s.
template <typename T>
FS_HD T channel_mean_ds(T cov, T s, int64_t C) {
  const T dv = T(2) * cov / T(C - 1);
  return -T(0.5) * s * s * s * dv;
}

// dm and ds for one sample, from its channel means and their tangents.
template <typename T>
FS_HD void jvp_channel_mean_tangents(const T* mean, const T* dmean, int64_t C, T m, T s, T& dm, T& ds) {
  T acc = 0;
  for (int64_t c = 0; c < C; ++c) acc += dmean[c];
  dm = acc / T(C);
  T cov = 0;
  for (int64_t c = 0; c < C; ++c) cov += (mean[c] - m) * (dmean[c] - dm);
  ds = channel_mean_ds(cov, s, C);
}

template <typename T>
FS_HD void jvp_coef(T rstd, T drstd, T muhat, T dmuhat, T dmean, T gamma, T alpha, T gamma_t, T alpha_t, T beta_t,
                    T& P, T& Q, T& R) {
  P = gamma * rstd;
  Q = gamma_t * rstd + gamma * drstd;
  R = gamma_t * (muhat * alpha) + gamma * (dmuhat * alpha + muhat * alpha_t - dmean * rstd) + beta_t;
}

template <typename T>
FS_HD T jvp_element(T x_t, T xc, T a, T b, T P, T Q, T R, int act) {
  const T dpre = P * x_t + Q * xc + R;
  return act == kActNone ? dpre : act_grad(a * xc + b, act) * dpre;
}

}  // namespace cin
}  // namespace fastscore
