// fastscore._C: a Python module with no Python entry points. Importing it runs the static
// TORCH_LIBRARY initialisers below and in csrc/cpu, csrc/cuda, which register the kernels with the
// PyTorch dispatcher as torch.ops.fastscore_C.*; the dispatcher (not pybind) routes by device, so
// torch.compile and torch.library see every kernel. Import torch before importing this module.
#include <Python.h>
#include <torch/library.h>

#include "cpu_kernel_utils.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Schemas, one block per op. The kernels for each dispatch key live in csrc/cpu/<op>.cpp and
// csrc/cuda/<op>_binding.cpp; the differentiable Python API is in fastscore/ops/<op>.py.
TORCH_LIBRARY(fastscore_C, m) {
  // InstanceNorm++ (conditional instance norm with optional mean reinjection and fused ELU).
  // Parameters are (N, C) views in the accumulation dtype; mean/rstd are the per-plane statistics.
  m.def(
      "cond_instance_norm_fwd(Tensor x, Tensor gamma, Tensor? alpha, Tensor? beta, float eps, str act)"
      " -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "cond_instance_norm_fwd_out(Tensor x, Tensor gamma, Tensor? alpha, Tensor? beta, float eps, str act,"
      " Tensor(a!) out) -> ()");
  m.def(
      "cond_instance_norm_bwd(Tensor grad_out, Tensor x, Tensor gamma, Tensor? alpha, Tensor? beta, Tensor mean,"
      " Tensor rstd, float eps, str act) -> (Tensor grad_x, Tensor grad_gamma, Tensor grad_alpha, Tensor grad_beta)");
  m.def(
      "cond_instance_norm_jvp(Tensor x, Tensor gamma, Tensor? alpha, Tensor? beta, Tensor mean, Tensor rstd,"
      " Tensor? x_t, Tensor? gamma_t, Tensor? alpha_t, Tensor? beta_t, float eps, str act) -> Tensor");

  // RefineNet CRP pooling: 5x5, stride 1, padding 2; mode "max" or "avg" (count_include_pad).
  // Outputs have x's shape, dtype and layout. Backward and jvp recompute the window maxima from x.
  m.def("crp_pool_fwd(Tensor x, str mode) -> Tensor");
  m.def("crp_pool_bwd(Tensor grad_out, Tensor x, str mode) -> Tensor");
  m.def("crp_pool_jvp(Tensor x, Tensor x_t, str mode) -> Tensor");

  // Langevin / SDE sampler updates with counter-based Gaussian noise (Philox4x32-10 in the kernel; layout
  // in csrc/include/langevin_step_math.h). coef (N, 3) rows (a, b, c) in the accumulation dtype:
  // x_mean = a x + b score, x = x_mean + c z, then x = mask known + (1 - mask) x; z = noise if given, else
  // generated from (seed, counter, (sample_offset + n) * D + i). seed and counter are 64-bit patterns
  // (unsigned values passed wrapped). norms: out (N, P, 2) float64, contiguous, P >= 1: per sample n and piece p
  // (memory positions [p L, (p + 1) L) of the sample, L = ceil(D / P)), the sums of score^2 and z^2, where the
  // generated z at memory position m is the normal of element index m. The caller adds the pieces (its
  // buffers, so a sampler's corrector allocates nothing per step).
  m.def(
      "langevin_step_update(Tensor(a!) x, Tensor score, Tensor coef, Tensor? noise, int seed, int counter,"
      " int sample_offset, Tensor? mask, Tensor? known, Tensor(b!)? x_mean) -> ()");
  m.def(
      "langevin_step_norms(Tensor score, Tensor? noise, int seed, int counter, int sample_offset,"
      " Tensor(a!) out) -> ()");
  m.def("langevin_step_randn(Tensor(a!) out, int seed, int counter, int sample_offset) -> ()");

  // MALA / HMC steps (csrc/include/metropolis_math.h; fastscore/ops/metropolis.py). x, score, x_out, p_out, p,
  // x_prop, score_prop: (N, ...) in one layout (contiguous or channels_last) and dtype; coef (N, 3) rows
  // (a, b, c) in the accumulation dtype (MALA (eps, 0, sqrt(2 eps)), HMC (h, h / 2, h)); energies, sq, sq_out,
  // log_alpha (N,) float64; accepted (N,) bool; seed and counter 64-bit patterns, as langevin_step's.
  // propose: without p_out x_out = (x + a score) + c z, with it p_out = z + b score, x_out = x + c p_out;
  // sq_out = per-sample sum of z^2. leapfrog: p = p + a score, x = x + c p. accept: per sample log_alpha =
  // ((energy - energy_prop) + sq / 2) - |(x - x_prop) - a score_prop|^2 / (2 c^2) (p absent) or - |p + b
  // score_prop|^2 / 2 (p given); accepted = log u <= log_alpha, u the sample's uniform; then x, score, energy
  // take x_prop, score_prop, energy_prop where accepted.
  m.def(
      "metropolis_propose(Tensor x, Tensor score, Tensor coef, int seed, int counter, int sample_offset,"
      " Tensor(a!) x_out, Tensor(b!)? p_out, Tensor(c!) sq_out) -> ()");
  m.def("metropolis_leapfrog(Tensor(a!) x, Tensor(b!) p, Tensor score, Tensor coef) -> ()");
  m.def(
      "metropolis_accept(Tensor(a!) x, Tensor(b!) score, Tensor(c!) energy, Tensor x_prop, Tensor score_prop,"
      " Tensor energy_prop, Tensor? p, Tensor sq, Tensor coef, int seed, int counter, int sample_offset,"
      " Tensor(d!) accepted, Tensor(e!) log_alpha) -> ()");

  // ELU (alpha = 1), elementwise over the flat storage: x dense and non-overlapping (any layout);
  // out, grad_out, x_t and every result have x's shape, dtype and strides. out may be x (in place).
  // Backward and jvp take the derivative from x.
  m.def("elu_fwd(Tensor x) -> Tensor");
  m.def("elu_fwd_out(Tensor x, Tensor(a!) out) -> ()");
  m.def("elu_bwd(Tensor grad_out, Tensor x) -> Tensor");
  m.def("elu_jvp(Tensor x, Tensor x_t) -> Tensor");

  // The CPU kernels' output cache (csrc/cpu/output_cache.cpp), device-independent: release the cached free
  // buffers; [bytes in use, bytes cached, cap in bytes].
  m.def("output_cache_empty() -> ()", &fastscore::cpu::output_cache_empty);
  m.def("output_cache_stats() -> int[]", &fastscore::cpu::output_cache_stats);

  // Which copy of the CPU kernels' hot loops runs (csrc/include/cpu_kernel_utils.h): "avx512", "avx2" or
  // "default"; the levels this CPU and build can run, widest first; and the switch, which refuses a level
  // the CPU cannot run.
  m.def("cpu_capability() -> str", [] { return fastscore::cpu::cpu_capability_name(); });
  m.def("supported_cpu_capabilities() -> str[]", [] { return fastscore::cpu::supported_cpu_capabilities(); });
  m.def("set_cpu_capability(str name) -> ()",
        [](c10::string_view name) { fastscore::cpu::set_cpu_capability(std::string(name)); });
}
