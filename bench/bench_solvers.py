"""Few-step solvers (fastscore.solvers) against k-diffusion's loops and against the PC sampler.

(a) step cost: one sampler call of STEPS steps on (64, 3, 32, 32) with a free denoiser (two stored outputs,
    alternately: the network is not timed), "eager" = k-diffusion's sampler function on it (the installed
    package's sampling.py, or its transcription: bench/_kdiffusion.py), "fastscore" = fastscore.solvers.solve on
    the same denoiser (score_from_denoiser: its fused update on the model's output), "fastscore_score" = solve on
    a free score network (the same stored outputs read as scores: DPM-Solver++(2M) then takes two passes per
    step; its samples are other numbers, not compared). DPM-Solver++(2M), Heun and Euler ancestral (DDIM,
    eta = 1). "eager" and "fastscore" agree to float32 rounding (Euler ancestral: each its own noise).
(b) equal error: the correlated 3x32x32 Gaussian N(0, Sc (x) Sh (x) Sw) (channel and AR(1) row / column
    correlations, eigenvalues 0.13 to 7.5) under VESDE(0.01, 50), exact score. The error is the relative
    Frobenius error of the samples' covariance, exact for each sampler's law, not a sample estimate: every
    sampler here is linear per eigendirection of the covariance, so a deterministic solver's law follows from
    one run on the sum of the eigenvectors (its gain per direction), and the PC sampler's (reverse diffusion +
    Langevin corrector with the expected-norm step, N = 1000: 2000 evaluations) from its variance recursion
    per direction, checked against the PC sampler's own samples within their standard error. Reported: the
    error of PC at 1000 steps, of DPM-Solver++(2M) (fastscore's and k-diffusion's: the same number) and Heun
    and DDIM at 10-80 steps, the fewest DPM-Solver++ steps at PC's error, and samples per second of both at
    equal error (a batch of 64, the exact score's cost included).

    fastscore bench solvers [--quick]
    pytest bench/bench_solvers.py --benchmark-only
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from fastscore import parameterisation as P
from fastscore import sampling
from fastscore import sde as sde_lib
from fastscore import solvers

try:  # run as part of the installed package (fastscore bench) or by pytest from the source tree
    from fastscore._bench import _harness
    from fastscore._bench import _kdiffusion
except ImportError:  # pragma: no cover
    import _harness
    import _kdiffusion

OP = "solvers"
SHAPE = (64, 3, 32, 32)
STEPS = 20
SEED = 7
PC_STEPS = 1000
DPM_STEPS = (10, 15, 20, 25, 30, 40, 50, 60, 80)


def _sde():
    return sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=PC_STEPS)


# ---- (a) step cost ---------------------------------------------------------------------------------------------


def step_cases(device="cpu", quick=False):
    kd, _, where = _kdiffusion.load()
    sde = _sde()
    gen = torch.Generator().manual_seed(0)
    outputs = [torch.randn(SHAPE, generator=gen).to(device) for _ in range(2)]
    flip = [0]

    def denoiser(x, sigma):  # a free network: two stored outputs, alternately (a solver keeps the previous one)
        flip[0] ^= 1
        return outputs[flip[0]]

    def reset(fn):
        def call():
            flip[0] = 0
            return fn()

        return call

    as_score = P.score_from_denoiser(denoiser, sde)

    def free_score(x, t):  # the stored outputs as a score network's: the score path's update cost alone
        flip[0] ^= 1
        return outputs[flip[0]]

    x_T = (torch.randn(SHAPE, generator=gen) * sde.prior_std).to(device)
    cases = []
    for method, kd_name, schedule in (
        ("dpm", "sample_dpmpp_2m", "exponential"),
        ("heun", "sample_heun", "karras"),
        ("ddim_eta1", "sample_euler_ancestral", "karras"),
    ):
        if quick and method != "dpm":
            continue
        sig = solvers.sigma_schedule(sde, STEPS, schedule=schedule)
        sig32 = sig.float().to(device)
        kw = dict(method="ddim", eta=1.0, seed=SEED) if method == "ddim_eta1" else dict(method=method)
        providers = {
            "eager": reset(
                lambda kd_name=kd_name, sig32=sig32: getattr(kd, kd_name)(denoiser, x_T, sig32, disable=True)
            ),
            "fastscore": reset(lambda kw=kw, sig=sig: solvers.solve(as_score, sde, None, sigmas=sig, x_init=x_T, **kw)),
        }
        if method == "dpm":
            providers["fastscore_score"] = reset(
                lambda sig=sig: solvers.solve(free_score, sde, None, method="dpm", sigmas=sig, x_init=x_T)
            )
        skip = ("copy", "fastscore_score")
        check = (
            _harness.agree_with("eager", what=method, rtol=1e-3, atol=1e-3, skip=skip)
            if method != "ddim_eta1"
            else _finite
        )
        note = f"{STEPS} steps, free denoiser; eager = {where}"
        cases.append(_harness.Case(f"{method} {STEPS} steps 64x3x32x32", providers, check, note, capability_rows=False))
    return cases


def _finite(results):
    for name, out in results.items():
        assert torch.isfinite(out).all(), name


# ---- (b) equal error -------------------------------------------------------------------------------------------


class KroneckerGaussian:
    """N(0, Sc (x) Sh (x) Sw) on (3, 32, 32) and its exact score under an SDE (through the eigenbases)."""

    def __init__(self, sde, rho=0.4, device="cpu"):
        self.sde = sde
        ar = torch.tensor([[rho ** abs(i - j) for j in range(32)] for i in range(32)], dtype=torch.float64)
        sc = torch.tensor([[1.0, 0.3, 0.1], [0.3, 1.0, 0.3], [0.1, 0.3, 1.0]], dtype=torch.float64)
        (lc, Uc), (lh, Uh) = torch.linalg.eigh(sc), torch.linalg.eigh(ar)
        self.Uc, self.Uh = Uc.to(device), Uh.to(device)
        self.lam = (lc[:, None, None] * lh[None, :, None] * lh[None, None, :]).to(device)

    def to_eigen(self, x):
        x = torch.einsum("nchw,cd->ndhw", x, self.Uc.to(x.dtype))
        x = torch.einsum("nchw,hk->nckw", x, self.Uh.to(x.dtype))
        return torch.einsum("nchw,wk->nchk", x, self.Uh.to(x.dtype))

    def from_eigen(self, y):
        y = torch.einsum("ndhw,cd->nchw", y, self.Uc.to(y.dtype))
        y = torch.einsum("nckw,hk->nchw", y, self.Uh.to(y.dtype))
        return torch.einsum("nchk,wk->nchw", y, self.Uh.to(y.dtype))

    def __call__(self, x, t):
        m, n = P.mean_std(self.sde, t)
        scale = 1.0 / (m[:, None, None, None] ** 2 * self.lam + n[:, None, None, None] ** 2)
        return -self.from_eigen(self.to_eigen(x) * scale.to(x.dtype))

    def error(self, variances):
        """Relative Frobenius error of a covariance diagonal in the eigenbasis (the data's: lam)."""
        return ((variances - self.lam).norm() / self.lam.norm()).item()


def deterministic_variances(g: KroneckerGaussian, run) -> torch.Tensor:
    """Per-direction output variances of a deterministic solver: it is linear per eigendirection (mean 0 data),
    so one run from the sum of the eigenvectors gives its gain per direction; the prior is N(0, sigma_max^2)."""
    start = g.from_eigen(torch.ones((1, 3, 32, 32), dtype=torch.float64, device=g.lam.device))
    gain = g.to_eigen(run(start).double())[0]
    return gain**2 * g.sde.prior_std**2


def pc_variances(g: KroneckerGaussian, snr=0.16) -> torch.Tensor:
    """Per-direction output variances of fastscore.sampling.pc_sampler (VE, reverse diffusion + Langevin
    corrector with the expected-norm step, denoised): per time t_i of linspace(1, eps, N), the corrector
    x <- x + e s + sqrt(2 e) z with e = 2 (snr sigma(t_i))^2, then the predictor x <- x + d s + sqrt(d) z with d
    = s_i^2 - s_{i-1}^2 of the discrete sigmas (the last one keeps its mean); s = -x / (lam + sigma(t_i)^2)."""
    sde = g.sde
    eps = sde_lib.sampling_eps(sde)
    ts = torch.linspace(sde.T, eps, sde.N)
    idx = (ts * (sde.N - 1) / sde.T).long().tolist()
    sig = sde.discrete_sigmas.double().tolist()
    std = sde.sigma(ts.double()).tolist()
    lam = g.lam
    V = torch.full_like(lam, sde.prior_std**2)
    for k, (i, s) in enumerate(zip(idx, std)):
        e = 2 * (snr * s) ** 2
        V = (1 - e / (lam + s * s)) ** 2 * V + 2 * e
        d = sig[i] ** 2 - (sig[i - 1] ** 2 if i > 0 else 0.0)
        V = (1 - d / (lam + s * s)) ** 2 * V + (d if k < len(idx) - 1 else 0.0)
    return V


def check_pc_recursion(g: KroneckerGaussian, V: torch.Tensor, n=64, device="cpu"):
    """The PC sampler's own samples agree with the recursion: band-averaged variance ratios (8 bands of 384
    directions, standard error sqrt(2 / (n 384))) within 5 standard errors."""
    x = sampling.pc_sampler(g, g.sde, (n, 3, 32, 32), seed=SEED, device=device)
    emp = g.to_eigen(x.double()).square().mean(0)
    order = torch.argsort(g.lam.flatten())
    got = (emp.flatten() / V.flatten())[order].reshape(8, -1).mean(1)
    bound = 5 * math.sqrt(2 / (n * 384))
    assert (got - 1).abs().max().item() < bound, f"PC samples vs its variance recursion: {got.tolist()}"
    return (got - 1).abs().max().item()


def _time(fn, rounds):
    best = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best.append(time.perf_counter() - start)
    return sorted(best)[len(best) // 2]


def equal_error_report(device="cpu", quick=False):
    """The error table and samples per second at equal error (printed; returned as a dict)."""
    kd, _, where = _kdiffusion.load()
    sde = _sde()
    g = KroneckerGaussian(sde, device=device)
    out = {}
    V_pc = pc_variances(g)
    out["pc_error"] = g.error(V_pc)
    out["pc_check"] = check_pc_recursion(g, V_pc, n=32 if quick else 64, device=device)
    errors = {}
    for method in ("dpm", "heun", "ddim"):
        for steps in DPM_STEPS if method == "dpm" else (20, 40, 80):

            def run(start, method=method, steps=steps):
                return solvers.solve(g, sde, None, method=method, steps=steps, x_init=start)

            errors[(method, steps)] = g.error(deterministic_variances(g, run))
    for steps in (20, 40):
        sig = solvers.sigma_schedule(sde, steps, schedule="exponential")
        den = P.denoiser_from_score(g, sde)

        def run_kd(start, sig=sig, den=den):
            return kd.sample_dpmpp_2m(den, start, sig.to(start.device), disable=True)

        errors[("k-diffusion dpm", steps)] = g.error(deterministic_variances(g, run_kd))
    out["errors"] = errors
    match = next((s for s in DPM_STEPS if errors[("dpm", s)] <= out["pc_error"]), None)
    out["dpm_steps_at_pc_error"] = match
    # samples per second, a batch of 64, float32, the exact score's cost included
    n = 64
    rounds = 1 if quick else 3
    pc_steps = 200 if quick else PC_STEPS  # quick: timed at 200 steps, scaled
    pc_sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=pc_steps)
    g_pc = KroneckerGaussian(pc_sde, device=device)
    t_pc = _time(lambda: sampling.pc_sampler(g_pc, pc_sde, (n, 3, 32, 32), seed=SEED, device=device), rounds)
    t_pc *= PC_STEPS / pc_steps
    t20 = _time(lambda: solvers.solve(g, sde, (n, 3, 32, 32), steps=20, seed=SEED, device=device), rounds)
    out["samples_per_s"] = {"pc1000": n / t_pc, "dpm20": n / t20}
    if match is not None:
        tm = _time(lambda: solvers.solve(g, sde, (n, 3, 32, 32), steps=match, seed=SEED, device=device), rounds)
        out["samples_per_s"][f"dpm{match}"] = n / tm
    lines = [
        f"(b) equal error: 3x32x32 correlated Gaussian, VESDE(0.01, 50), exact score; error = relative Frobenius "
        f"error of the covariance, exact per sampler (k-diffusion: {where})",
        f"  PC sampler, {PC_STEPS} steps (2 evaluations each): {out['pc_error']:.4f}   "
        f"(its samples vs the recursion: max band deviation {out['pc_check']:.4f})",
    ]
    for (method, steps), err in sorted(errors.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        nfe = 2 * steps - 1 if method == "heun" else steps
        lines.append(f"  {method:16s} {steps:3d} steps ({nfe:3d} evaluations): {err:.4f}")
    lines.append(f"  fewest DPM-Solver++(2M) steps at PC-{PC_STEPS}'s error: {match}")
    sps = out["samples_per_s"]
    lines.append("  samples/s (batch 64): " + ", ".join(f"{k} {v:.2f}" for k, v in sps.items()))
    if match is not None:
        ratio = sps[f"dpm{match}"] / sps["pc1000"]
        lines.append(f"  at equal error: DPM-Solver++(2M) {match} steps / PC {PC_STEPS}: {ratio:.1f}x samples/s")
    lines.append(f"  DPM-Solver++(2M) 20 steps / PC {PC_STEPS}: {sps['dpm20'] / sps['pc1000']:.1f}x samples/s")
    print("\n".join(lines), flush=True)
    return out


def cases(quick=False, device="cpu"):
    return step_cases(device, quick)


def run(quick=False, device="cpu", rounds=None, record=True, csv_path=None):
    """`fastscore bench solvers`: the step-cost ratio table, then the equal-error report."""
    rows = _harness.run(
        OP,
        cases(quick, device),
        rounds=rounds or (5 if quick else 15),
        device=device,
        quick=quick,
        record=record,
        csv_path=csv_path,
    )
    print(f"\nper step (ms, {STEPS} steps per call):")
    for row in rows:
        print(f"  {row.case:30s} {row.provider:16s} {row.median_ms / STEPS:8.3f}")
    print()
    equal_error_report(device, quick)
    return rows


# ---- pytest-benchmark: `pytest bench/bench_solvers.py --benchmark-only` -----------------------------------------


@pytest.mark.parametrize("provider", ["eager", "fastscore", "fastscore_score"])
def test_dpm_step_cost(benchmark, provider):
    benchmark.group = f"{OP} dpm++2m {STEPS} steps"
    benchmark(step_cases()[0].providers[provider])


if __name__ == "__main__":  # pragma: no cover
    start = time.perf_counter()
    run(quick=False, record=False)
    print(f"({time.perf_counter() - start:.0f} s)")
