"""Few-step solvers (fastscore.solvers) and score parameterisations (fastscore.parameterisation).

- exact-score problems: a correlated Gaussian in 2-D (mean and covariance within sampling error, and the
  solvers' exact output law against the probability-flow ODE's for the convergence order), a correlated
  Gaussian in 3x32x32 (Kronecker covariance), the NCSN toy mixture's weights;
- parity with k-diffusion's samplers on the same denoiser and noise levels (its installed sampling.py when
  k-diffusion is there, else a transcription of its algorithms: bench/_kdiffusion.py), and with diffusers'
  models and schedulers (a randomly initialised tiny UNet2DModel, no download);
- parameterisation round trips, batch invariance, the fused passes per step, argument checks.

Tolerances: for n samples the standard error of mean i is sqrt(cov_ii / n), of covariance entry (i, j)
sqrt((cov_ii cov_jj + cov_ij^2) / n), of a mode weight sqrt(p (1 - p) / n); the bounds are 5 standard
errors plus the solver's own discretisation error at that step count, computed exactly below (the exact
output law of a deterministic solver on a Gaussian) and rounded up.
"""

from __future__ import annotations

import math

import pytest
import torch
from fastscore._bench import _kdiffusion
from fastscore._bench.bench_solvers import KroneckerGaussian  # the bench's equal-error Gaussian

from fastscore import noise as noise_lib
from fastscore import parameterisation as P
from fastscore import sampling
from fastscore import sde as sde_lib
from fastscore import solvers
from fastscore.data import ncsn_toy_mixture
from fastscore.ops import counter_randn
from fastscore.ops.langevin_step import FusedUpdate

pytestmark = pytest.mark.one_thread  # small tensors (conftest.py)

SEED = 1234
MU_2D = torch.tensor([1.0, -0.5])
COV_2D = torch.tensor([[1.0, 0.6], [0.6, 0.5]])
KD_SAMPLING, KD_EXTERNAL, KD_WHERE = _kdiffusion.load()


def make_sde(name: str):
    return {
        "ve": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0),
        "vp": lambda: sde_lib.VPSDE(),
        "subvp": lambda: sde_lib.subVPSDE(),
    }[name]()


class GaussianScore:
    """Exact score of N(mu, cov) under an SDE: N(m mu, m^2 cov + n^2 I) at time t, through cov's eigenbasis (so
    that it is per sample and elementwise up to two small matmuls)."""

    def __init__(self, sde, mu, cov):
        self.sde = sde
        self.mu = mu.double()
        self.lam, self.U = torch.linalg.eigh(cov.double())

    def __call__(self, x, t):
        m, n = P.mean_std(self.sde, t)
        U = self.U.to(x.dtype)
        y = (x - m.to(x.dtype)[:, None] * self.mu.to(x.dtype)) @ U
        y = y / (m[:, None] ** 2 * self.lam + n[:, None] ** 2).to(x.dtype)
        return -(y @ U.T)


def moment_errors(x, mu, cov):
    """(max |mean error| / its standard error, max |covariance error| / its standard error)."""
    x, mu, cov = x.double(), mu.double(), cov.double()
    n = x.shape[0]
    d = cov.diag()
    mean_se = (d / n).sqrt()
    cov_se = ((d[:, None] * d[None, :] + cov**2) / n).sqrt()
    return ((x.mean(0) - mu).abs() / mean_se).max().item(), ((torch.cov(x.T) - cov).abs() / cov_se).max().item()


def exact_law(sde, mu, cov, eps=None):
    """The output law of the probability-flow ODE from the prior N(0, prior_std^2 I) at T to sigma(eps), then the
    denoising (x0 = D(x, sigma(eps))), for data N(mu, cov): in cov's eigenbasis the flow of the scaled state is
    x_hat(sigma) - mu = sqrt((lam + sigma^2) / (lam + sigma_T^2)) (x_hat_T - mu) and D = mu + lam / (lam + sigma^2)
    (x_hat - mu). Returns (c, M): out = c + M x_T."""
    eps = sde_lib.sampling_eps(sde, eps)
    lam, U = torch.linalg.eigh(cov.double())
    s0, se = float(P.sigma_of_t(sde, sde.T)), float(P.sigma_of_t(sde, eps))
    m_T = float(P.mean_std(sde, sde.T)[0])
    G = U @ torch.diag(lam / (lam + se**2) * torch.sqrt((lam + se**2) / (lam + s0**2))) @ U.T
    return mu.double() - G @ mu.double(), G / m_T


def solver_law(score_fn, sde, D, **kw):
    """(c, M) of a deterministic solver, out = c + M x_T: it is affine in its start for an affine score."""
    starts = torch.cat([torch.zeros(1, D), torch.eye(D)]).double()
    out = solvers.solve(score_fn, sde, None, x_init=starts, **kw)
    return out[0], (out[1:] - out[0]).T


def law_errors(sde, mu, cov, **kw):
    """(relative Frobenius error of the output covariance, |mean error|) of a deterministic solver against the
    exact probability-flow law, both from the same prior: the discretisation error alone."""
    c, M = solver_law(GaussianScore(sde, mu, cov), sde, mu.shape[0], **kw)
    c_e, M_e = exact_law(sde, mu, cov)
    cov_s, cov_e = M @ M.T, M_e @ M_e.T
    return ((cov_s - cov_e).norm() / cov_e.norm()).item(), (c - c_e).norm().item()


# ---- noise levels and times --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_name", ["ve", "vp", "subvp"])
def test_mean_std_sigma_and_time_are_the_sdes(sde_name):
    sde = make_sde(sde_name)
    t = torch.linspace(1e-4, 1.0, 50, dtype=torch.float64)
    mean, std = sde.marginal_prob(torch.ones(50, 1, dtype=torch.float64), t)
    m, n = P.mean_std(sde, t)
    torch.testing.assert_close(m, mean[:, 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(n, std, rtol=1e-9, atol=0)
    sigma = P.sigma_of_t(sde, t)
    torch.testing.assert_close(sigma, n / m, rtol=1e-12, atol=0)
    torch.testing.assert_close(P.t_of_sigma(sde, sigma), t, rtol=1e-10, atol=0)
    levels = solvers.sigma_schedule(sde, 10)
    assert levels.dtype == torch.float64 and len(levels) == 11 and levels[-1] == 0
    assert levels[0] == P.sigma_of_t(sde, 1.0) and levels[-2] == P.sigma_of_t(sde, sde_lib.sampling_eps(sde))
    assert bool((levels[1:] < levels[:-1]).all())
    assert len(solvers.sigma_schedule(sde, 10, denoise=False)) == 11


def test_karras_schedule_is_kdiffusions():
    sde = make_sde("ve")
    ours = solvers.sigma_schedule(sde, 12, schedule="karras")
    ref = KD_SAMPLING.get_sigmas_karras(12, float(ours[-2]), float(ours[0]), rho=7.0)
    torch.testing.assert_close(ours.float(), ref, rtol=2e-6, atol=0)


# ---- parameterisations ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sde_name,timesteps", [("ve", "t"), ("ve", "sigma"), ("vp", "t"), ("vp", "ddpm"), ("subvp", "sigma")]
)
def test_parameterisation_round_trips_are_exact(sde_name, timesteps):
    """score -> eps / x0 / denoiser -> score gives the score back to float64 rounding, and each conversion is the
    closed form (eps = -n s, x0 = (x + n^2 s) / m, D(x / m, sigma) = x0)."""
    sde = make_sde(sde_name)
    score = GaussianScore(sde, MU_2D, COV_2D)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, generator=g, dtype=torch.float64) * 3
    t = torch.rand(7, generator=g, dtype=torch.float64) * 0.98 + 0.01
    s = score(x, t)
    m, n = P.mean_std(sde, t)
    times = P._Times(sde, timesteps)
    tau = times.model_time(t)
    eps = P.eps_from_score(score, sde, timesteps=timesteps)
    x0 = P.x0_from_score(score, sde, timesteps=timesteps)
    den = P.denoiser_from_score(score, sde)
    torch.testing.assert_close(eps(x, tau), -n[:, None] * s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x0(x, tau), (x + n[:, None] ** 2 * s) / m[:, None], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        den(x / m[:, None], n / m), (x + n[:, None] ** 2 * s) / m[:, None], rtol=1e-10, atol=1e-12
    )
    for back in (
        P.score_from_eps(eps, sde, timesteps=timesteps),
        P.score_from_x0(x0, sde, timesteps=timesteps),
        P.score_from_denoiser(den, sde),
    ):
        torch.testing.assert_close(back(x, t), s, rtol=1e-9, atol=1e-12)


def test_ddpm_steps_are_the_schedulers():
    """timesteps='ddpm': VPSDE(0.1, 20, 1000) has diffusers' DDPMScheduler alphas_cumprod; a time at a table noise
    level maps to its integer step, in between to the log-sigma interpolation; 'ddpm_int' rounds it."""
    sde = sde_lib.VPSDE()
    betas = torch.linspace(1e-4, 0.02, 1000)
    torch.testing.assert_close(sde.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=0, atol=0)
    table = ((1 - sde.alphas_cumprod.double()) / sde.alphas_cumprod.double()).sqrt()
    steps = torch.tensor([0, 1, 17, 500, 998, 999])
    t = P.t_of_sigma(sde, table[steps])
    frac = P._Times(sde, "ddpm").model_time(t)
    torch.testing.assert_close(frac, steps.double(), rtol=0, atol=1e-6)
    mid = torch.exp((table[10].log() + table[11].log()) / 2)
    assert abs(P._Times(sde, "ddpm").model_time(P.t_of_sigma(sde, mid)).item() - 10.5) < 1e-6
    assert P._Times(sde, "ddpm_int").model_time(t).dtype == torch.int64
    with pytest.raises(ValueError, match="timesteps"):
        P.score_from_eps(lambda x, t: x, make_sde("ve"), timesteps="ddpm")


# ---- parity with k-diffusion ---------------------------------------------------------------------------------------


@pytest.mark.skipif(_kdiffusion.installed() is None, reason="k-diffusion not installed (pip install --no-deps)")
def test_kdiffusion_transcription_is_the_package():
    """The transcription that stands in for k-diffusion when it is missing computes what the package does."""
    sampling_mod, external_mod = _kdiffusion.installed()
    T = _kdiffusion.Transcription
    sde = make_sde("vp")
    den = P.denoiser_from_score(GaussianScore(sde, MU_2D, COV_2D), sde)
    sig = solvers.sigma_schedule(sde, 6, schedule="karras")
    x = torch.randn(5, 2, dtype=torch.float64) * float(sig[0])
    for name in ("sample_dpmpp_2m", "sample_heun", "sample_euler"):
        torch.manual_seed(0)
        a = getattr(sampling_mod, name)(den, x, sig, disable=True)
        torch.manual_seed(0)
        torch.testing.assert_close(getattr(T, name)(den, x, sig), a, rtol=0, atol=1e-13)
    z = [counter_randn((5, 2), seed=3, counter=k, dtype=torch.float64) for k in range(6)]
    a = sampling_mod.sample_euler_ancestral(den, x, sig, disable=True, noise_sampler=lambda s, sn: z.pop(0))
    z = [counter_randn((5, 2), seed=3, counter=k, dtype=torch.float64) for k in range(6)]
    b = T.sample_euler_ancestral(den, x, sig, noise_sampler=lambda s, sn: z.pop(0))
    torch.testing.assert_close(b, a, rtol=0, atol=1e-13)
    eps_model = lambda x, t: torch.sin(x + t[:, None])  # noqa: E731
    acp = sde.alphas_cumprod
    sigma = torch.tensor([0.02, 1.0, 80.0])
    x = torch.randn(3, 2)
    ours = T.DiscreteEpsDDPMDenoiser(eps_model, acp, quantize=False)(x, sigma)
    theirs = external_mod.DiscreteEpsDDPMDenoiser(eps_model, acp, quantize=False)(x, sigma)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


KD_METHODS = [("dpm", "sample_dpmpp_2m"), ("heun", "sample_heun"), ("ddim", "sample_euler")]


@pytest.mark.parametrize("sde_name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("method,kd_name", KD_METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_deterministic_solvers_are_kdiffusions(sde_name, method, kd_name, dtype):
    """The same algorithm on the same denoiser and noise levels gives k-diffusion's result: fastscore's solver on
    the score function, and on the denoiser itself (score_from_denoiser: the fused path on the model's output),
    against k-diffusion's sampler on denoiser_from_score (started from x_T / m(T)). float64: to rounding;
    float32: within the float32 rounding of 10 steps."""
    sde = make_sde(sde_name)
    score = GaussianScore(sde, MU_2D, COV_2D)
    den = P.denoiser_from_score(score, sde)
    sig = solvers.sigma_schedule(sde, 10, schedule="karras")
    x_T = (torch.randn(16, 2, dtype=torch.float64) * sde.prior_std).to(dtype)
    m_T = float(P.mean_std(sde, sde.T)[0])
    ref = getattr(KD_SAMPLING, kd_name)(den, x_T.double() / m_T, sig, disable=True)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for fn in (score, P.score_from_denoiser(den, sde)):
        ours = solvers.solve(fn, sde, None, method=method, sigmas=sig, x_init=x_T)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.double(), ref, **tol)


@pytest.mark.parametrize("sde_name", ["ve", "vp"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_stochastic_ddim_is_kdiffusions_euler_ancestral(sde_name, eta):
    """DDIM with eta > 0 is k-diffusion's Euler ancestral step; with k-diffusion's noise_sampler handing it
    fastscore's counter-based normals of step k (counter = k), the two give the same samples."""
    sde = make_sde(sde_name)
    score = GaussianScore(sde, MU_2D, COV_2D)
    den = P.denoiser_from_score(score, sde)
    sig = solvers.sigma_schedule(sde, 8)
    x_T = torch.randn(12, 2, dtype=torch.float64) * sde.prior_std
    m_T = float(P.mean_std(sde, sde.T)[0])
    draws = iter(range(100))

    def noise_sampler(sigma, sigma_next):
        return counter_randn((12, 2), seed=SEED, counter=next(draws), dtype=torch.float64)

    ref = KD_SAMPLING.sample_euler_ancestral(den, x_T / m_T, sig, disable=True, eta=eta, noise_sampler=noise_sampler)
    for fn in (score, P.score_from_denoiser(den, sde)):
        ours = solvers.solve(fn, sde, None, method="ddim", eta=eta, sigmas=sig, x_init=x_T, seed=SEED)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


# ---- exact-score problems -----------------------------------------------------------------------------------------

# (method, kwargs, steps): the step counts at which the discretisation error of the output covariance (exact,
# test_discretisation_error_shrinks_at_the_methods_order) is at most ~3 % on every SDE.
MOMENT_RUNS = [
    ("dpm", {}, 40),
    ("heun", {}, 40),
    ("ddim", {}, 200),
    ("ddim", {"eta": 1.0}, 300),
]


@pytest.mark.parametrize("sde_name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("method,kwargs,steps", MOMENT_RUNS, ids=["dpm", "heun", "ddim", "ddim_eta1"])
def test_solvers_sample_a_correlated_2d_gaussian(sde_name, method, kwargs, steps):
    """N((1, -0.5), [[1, .6], [.6, .5]]) with its exact score, n = 4000: mean and covariance within 5 standard
    errors plus 3 % of the covariance (the discretisation allowance, in standard errors 0.03 sqrt(n / 2))."""
    n = 4000
    sde = make_sde(sde_name)
    x, info = solvers.solve(
        GaussianScore(sde, MU_2D, COV_2D),
        sde,
        (n, 2),
        method=method,
        steps=steps,
        seed=SEED,
        return_info=True,
        **kwargs,
    )
    assert torch.isfinite(x).all()
    assert info.nfe == (2 * steps - 1 if method == "heun" else steps)
    mean_err, cov_err = moment_errors(x, MU_2D, COV_2D)
    # the VE prior N(0, 20^2) misses the data's mean by mu (the output mean by 0.036, 1.9 standard errors)
    allowance = 0.03 * math.sqrt(n / 2)
    assert mean_err < 5 + allowance, f"mean off by {mean_err:.1f} standard errors: {x.mean(0).tolist()}"
    assert cov_err < 5 + allowance, f"covariance off by {cov_err:.1f} standard errors: {torch.cov(x.double().T)}"


@pytest.mark.parametrize("sde_name", ["ve", "vp", "subvp"])
def test_discretisation_error_shrinks_at_the_methods_order(sde_name):
    """The exact output law of the deterministic solvers (affine in the start: run on 0 and the unit vectors)
    against the probability-flow ODE's: doubling the steps from 20 to 40 and 40 to 80 divides the covariance
    error by about 2 (DDIM, first order) or 4 (Heun, DPM-Solver++(2M), second order). Measured: DDIM 1.9-2.0,
    Heun 4.1-4.6, DPM++ 3.6-4.4; the bounds leave room for the pre-asymptotic range."""
    sde = make_sde(sde_name)
    for method, low in (("ddim", 1.6), ("heun", 3.0), ("dpm", 2.8)):
        errs = [law_errors(sde, MU_2D, COV_2D, method=method, steps=s)[0] for s in (20, 40, 80)]
        assert errs[0] > errs[1] > errs[2], (method, errs)
        ratios = [errs[0] / errs[1], errs[1] / errs[2]]
        assert min(ratios) > low, (method, errs, ratios)
    # and at 20 steps DPM-Solver++(2M) is the most accurate of the three
    at20 = {m: law_errors(sde, MU_2D, COV_2D, method=m, steps=20)[0] for m in ("ddim", "heun", "dpm")}
    assert at20["dpm"] < at20["ddim"] / 3, at20


def test_ncsn_toy_mixture_weights():
    """NCSN's toy 0.8 N((5, 5), I) + 0.2 N((-5, -5), I) under VE noise (sigma 0.01 to 20), exact scores, n = 2000
    from the prior: the fraction near (5, 5) is 0.8 within 5 binomial standard errors sqrt(.16 / n) = 0.009,
    plus 0.01 for the discretisation, for every method; each sample ends within 3.5 of a mode's center."""
    gmm = ncsn_toy_mixture()
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0)

    def score(x, t):
        return gmm.score(x, P.sigma_of_t(sde, t).to(x.dtype))

    n = 2000
    allow = 5 * math.sqrt(0.16 / n) + 0.01
    for method, kwargs, steps in [("dpm", {}, 20), ("heun", {}, 20), ("ddim", {}, 100), ("ddim", {"eta": 1.0}, 200)]:
        x = solvers.solve(score, sde, (n, 2), method=method, steps=steps, seed=SEED, **kwargs)
        frac = (x.sum(1) > 0).double().mean().item()
        assert abs(frac - 0.8) < allow, (method, kwargs, frac)
        dist = torch.minimum((x - 5).norm(dim=1), (x + 5).norm(dim=1))
        assert dist.max().item() < 3.5 + 1.0, (method, dist.max().item())


def test_3x32x32_gaussian_with_20_dpm_steps():
    """The correlated 3x32x32 Gaussian (eigenvalues 0.13 to 7.5): 20 steps of DPM-Solver++(2M) from 128 prior
    draws. In the eigenbasis the variances, averaged over 8 bands of eigenvalues (~384 directions each, so a
    band's mean variance ratio has the standard error sqrt(2 / (128 * 384)) = 0.006), are within 3 % of the
    data's (the exact-law error of 20 steps in 2-D is <= 3 %), and the mean is 0 within 5 standard errors."""
    sde = make_sde("ve")
    g = KroneckerGaussian(sde)
    n = 128
    x = solvers.solve(g, sde, (n, 3, 32, 32), method="dpm", steps=20, seed=SEED)
    y = g.to_eigen(x.double())
    ratio = (y.square().mean(0) / g.lam).flatten()  # the mean is 0: E y^2 = lam
    order = torch.argsort(g.lam.flatten())
    bands = ratio[order].reshape(8, -1).mean(1)
    assert (bands - 1).abs().max().item() < 0.03 + 5 * math.sqrt(2 / (n * 384)), bands.tolist()
    z = y.mean(0) / (g.lam / n).sqrt()
    assert z.abs().mean().item() < 0.8 + 0.1, z.abs().mean().item()  # E|N(0, 1)| = 0.80


@pytest.mark.parametrize("sde_name", ["ve", "vp"])
def test_adaptive_solver_samples_a_high_dimensional_gaussian_and_counts_evaluations(sde_name):
    """Gotta Go Fast's solver on N(0, diag(var)), D = 256, var from 0.25 to 2: per-dimension variances averaged
    over 4 bands of 64 within 5 standard errors (sqrt(2 / (n 64))) plus 3 % (2-D, where rejections are frequent:
    test_adaptive_solver_is_unbiased_in_two_dimensions). The evaluations it reports are its own: 2 per attempted
    step plus the denoising, per sample; tighter tolerances take more."""
    sde = make_sde(sde_name)
    D, n = 256, 96
    var = torch.linspace(0.25, 2.0, D, dtype=torch.float64)

    def score(x, t):
        m, s = P.mean_std(sde, t)
        return -x / (m[:, None] ** 2 * var + s[:, None] ** 2).to(x.dtype)

    calls = []

    def counted(x, t):
        calls.append(x.shape[0])
        return score(x, t)

    x, info = solvers.solve(counted, sde, (n, D), method="adaptive", seed=SEED, return_info=True)
    assert torch.isfinite(x).all()
    assert info.nfe == len(calls)
    assert torch.equal(info.nfe_per_sample, 2 * (info.n_steps + info.n_rejected) + 1)
    assert sum(calls) == int(info.nfe_per_sample.sum())
    bands = (x.double().var(0) / var).reshape(4, -1).mean(1)
    assert (bands - 1).abs().max().item() < 5 * math.sqrt(2 / (n * 64)) + 0.03, bands.tolist()
    tight = solvers.solve(score, sde, (n, D), method="adaptive", rtol=0.01, seed=SEED, return_info=True)[1]
    assert tight.nfe_per_sample.float().mean() > 1.5 * info.nfe_per_sample.float().mean()


@pytest.mark.parametrize("sde_name", ["ve", "vp"])
def test_adaptive_solver_is_unbiased_in_two_dimensions(sde_name):
    """In 2-D, where 40 % of the attempts are rejected, the rejected attempts' noise is kept (the Brownian bridge
    splits it for the retry) rather than redrawn, so the accepted steps are no selection of noise draws: the
    correlated Gaussian's mean and covariance within 5 standard errors plus 3 % (redrawn, the variances came out
    twice the data's)."""
    sde = make_sde(sde_name)
    n = 4000
    x, info = solvers.solve(GaussianScore(sde, MU_2D, COV_2D), sde, (n, 2), method="adaptive", seed=SEED,
                            return_info=True)  # fmt: skip
    assert info.n_rejected.sum() > 0.2 * (info.n_steps + info.n_rejected).sum()  # the case that selected noise
    mean_err, cov_err = moment_errors(x, MU_2D, COV_2D)
    allowance = 0.03 * math.sqrt(n / 2)
    assert mean_err < 5 + allowance, f"mean off by {mean_err:.1f} standard errors: {x.mean(0).tolist()}"
    assert cov_err < 5 + allowance, f"covariance off by {cov_err:.1f} standard errors: {torch.cov(x.double().T)}"


def test_brownian_memory_splits_a_kept_increment_by_the_bridge():
    """A kept increment W over h, taken back in parts q and h - q, sums to W exactly; the first part is
    N(q / h W, q (h - q) / h) (moments over 20000 rows within 5 standard errors); beyond the kept segment the
    increment adds fresh N(0, h') noise."""
    n, h, q = 20000, 0.3, 0.1
    x = torch.zeros(n, 1, dtype=torch.float64)
    mem = solvers._BrownianMemory(x, FusedUpdate(x, seed=SEED), None)
    W = torch.full((n, 1), 0.5, dtype=torch.float64)
    mem.push(torch.arange(n), torch.full((n,), h, dtype=torch.float64), W)
    first = mem.take(None, torch.full((n,), q, dtype=torch.float64), attempt=0)
    second = mem.take(None, torch.full((n,), h - q, dtype=torch.float64), attempt=1)
    torch.testing.assert_close(first + second, W, rtol=0, atol=1e-12)
    assert int(mem.depth.sum()) == 0
    var = q * (h - q) / h
    assert abs(first.mean().item() - q / h * 0.5) < 5 * math.sqrt(var / n)
    assert abs(first.var().item() / var - 1) < 5 * math.sqrt(2 / n)
    later = mem.take(None, torch.full((n,), 0.2, dtype=torch.float64), attempt=2)  # nothing kept: fresh N(0, 0.2)
    assert abs(later.var().item() / 0.2 - 1) < 5 * math.sqrt(2 / n)


# ---- diffusers -------------------------------------------------------------------------------------------------------


def tiny_unet(dtype=torch.float64):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    return unet.to(dtype).eval()


def test_diffusers_unet_wrapped_both_ways():
    """A randomly initialised diffusers UNet2DModel as a DDPM noise predictor (timesteps 0..999, alphas_cumprod of
    VPSDE(0.1, 20, 1000)): as fastscore's score and back it is the UNet again; as a k-diffusion denoiser
    (denoiser_from_score) it is k-diffusion's own DiscreteEpsDDPMDenoiser of the UNet; and fastscore's
    DPM-Solver++(2M) on it (the noise prediction used directly) gives k-diffusion's sample_dpmpp_2m."""
    unet = tiny_unet()
    sde = sde_lib.VPSDE()

    def eps_model(x, tau):
        return unet(x, tau).sample

    score = P.score_from_eps(eps_model, sde, timesteps="ddpm")
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        for tau in (torch.tensor([0.0, 123.25, 999.0], dtype=torch.float64), torch.tensor(500)):
            back = P.eps_from_score(score, sde, timesteps="ddpm")(x, tau)
            torch.testing.assert_close(back, eps_model(x, tau.expand(3).double()), rtol=1e-8, atol=1e-8)
        kd = KD_EXTERNAL.DiscreteEpsDDPMDenoiser(eps_model, sde.alphas_cumprod.double(), quantize=False)
        sigma = torch.tensor([0.05, 2.0, 120.0], dtype=torch.float64)
        ours = P.denoiser_from_score(score, sde)(x, sigma)
        torch.testing.assert_close(ours, kd(x, sigma), rtol=1e-7, atol=1e-7)
        sig = solvers.sigma_schedule(sde, 6)
        x_T = torch.randn(3, 2, 8, 8, dtype=torch.float64)
        ref = KD_SAMPLING.sample_dpmpp_2m(kd, x_T / float(P.mean_std(sde, 1.0)[0]), sig, disable=True)
    got = solvers.solve(score, sde, None, method="dpm", sigmas=sig, x_init=x_T)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # the same model as a plain score function (no fast path) gives the same samples
    plain = solvers.solve(lambda x, t: score(x, t), sde, None, method="dpm", sigmas=sig, x_init=x_T)
    torch.testing.assert_close(plain, got, rtol=1e-9, atol=1e-9)


def test_fastscore_score_with_diffusers_scheduler():
    """fastscore's exact 2-D Gaussian score as a DDPM noise predictor (eps_from_score, integer steps) driven by
    diffusers' DPMSolverMultistepScheduler (DPM-Solver++(2M), 20 steps, its default DDPM betas): the moments
    are the data's within 5 standard errors plus 3 % (n = 4000)."""
    diffusers = pytest.importorskip("diffusers")
    sde = sde_lib.VPSDE()
    eps = P.eps_from_score(GaussianScore(sde, MU_2D, COV_2D), sde, timesteps="ddpm_int")
    scheduler = diffusers.DPMSolverMultistepScheduler()
    scheduler.set_timesteps(20)
    n = 4000
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(SEED))
    for t in scheduler.timesteps:
        x = scheduler.step(eps(x, t), t, x).prev_sample
    mean_err, cov_err = moment_errors(x, MU_2D, COV_2D)
    allowance = 0.03 * math.sqrt(n / 2)
    assert mean_err < 5 + allowance and cov_err < 5 + allowance, (mean_err, cov_err)


# ---- implementation properties ------------------------------------------------------------------------------------


def elementwise_score(sde):
    """N(0.5, 1.5 I) data: an elementwise score, so a sample's result cannot depend on its batch."""

    def score(x, t):
        m, n = P.mean_std(sde, t)
        m, v = m.to(x.dtype)[:, None, None], (m**2 * 1.5 + n**2).to(x.dtype)[:, None, None]
        return -(x - 0.5 * m) / v

    return score


@pytest.mark.parametrize(
    "method,kwargs", [("dpm", {}), ("heun", {}), ("ddim", {"eta": 1.0}), ("adaptive", {})], ids=str
)
def test_a_sample_does_not_depend_on_its_batch(method, kwargs):
    """Samples 2..4 of a batch of 7, bitwise, when drawn alone with sample_offset=2 (the prior and every step's
    noise are the counter-based generator's at the global sample index; the adaptive solver's step sizes are
    per sample)."""
    sde = make_sde("vp")
    score = elementwise_score(sde)
    full = solvers.solve(score, sde, (7, 3, 5), method=method, seed=SEED, **kwargs)
    part = solvers.solve(score, sde, (3, 3, 5), method=method, seed=SEED, sample_offset=2, **kwargs)
    assert torch.equal(full[2:5], part)
    again = solvers.solve(score, sde, (7, 3, 5), method=method, seed=SEED, **kwargs)
    assert torch.equal(full, again)


def test_start_is_the_pc_samplers_prior_and_deterministic_solvers_ignore_the_seed():
    sde = make_sde("ve")
    prior = counter_randn((4, 2), seed=SEED, counter=noise_lib.PRIOR_COUNTER) * sde.prior_std
    score = GaussianScore(sde, MU_2D, COV_2D)
    a = solvers.solve(score, sde, (4, 2), seed=SEED)
    b = solvers.solve(score, sde, None, x_init=prior)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a generator as noise source draws the prior as torch.randn(shape) * prior_std
    gen = solvers.solve(score, sde, (4, 2), noise=torch.Generator().manual_seed(3))
    start = torch.randn(4, 2, generator=torch.Generator().manual_seed(3)) * sde.prior_std
    torch.testing.assert_close(gen, solvers.solve(score, sde, None, x_init=start), rtol=0, atol=0)
    # the stochastic methods draw every step's normals from it too: the same generator state, the same samples
    for kw in (dict(method="ddim", eta=1.0, steps=5), dict(method="adaptive")):
        a, b = (solvers.solve(score, sde, (4, 2), noise=torch.Generator().manual_seed(3), **kw) for _ in "ab")
        assert torch.equal(a, b) and not torch.equal(a, solvers.solve(score, sde, (4, 2), seed=3, **kw))


def profiled_ops(fn):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return {name: names.count(name) for name in set(names)}


@pytest.mark.parametrize(
    "kind,method,passes",
    [
        ("denoiser", "dpm", 1),
        ("x0", "dpm", 1),
        ("score", "dpm", 2),
        ("eps", "dpm", 2),
        ("score", "heun", 2),
        ("denoiser", "heun", 2),
        ("score", "ddim", 1),
        ("score", "ddim_eta", 1),
    ],
)
def test_each_update_is_one_fused_pass(kind, method, passes):
    """Per step, beyond the network call: the fused update (one pass over the state per evaluation; DPM-Solver++(2M)
    on a score or noise model needs a second, which writes the denoised estimate) and filling the time buffer:
    no other op touches the batch, nothing is allocated."""
    sde = make_sde("vp")
    shape = (4, 3, 4, 4)
    outputs = [torch.randn(shape), torch.randn(shape)]
    flip = [0]

    def model(x, t):  # a free network: two stored outputs, alternately
        flip[0] ^= 1
        return outputs[flip[0]]

    fn = {
        "score": model,
        "denoiser": P.score_from_denoiser(model, sde),
        "x0": P.score_from_x0(model, sde),
        "eps": P.score_from_eps(model, sde),
    }[kind]
    x_T = torch.randn(shape)
    kw = dict(method="ddim", eta=1.0, seed=1) if method == "ddim_eta" else dict(method=method)

    def run(steps):
        return profiled_ops(lambda: solvers.solve(fn, sde, None, steps=steps, x_init=x_T, **kw))

    few, many = run(6), run(12)
    per_step = {k: (many.get(k, 0) - few.get(k, 0)) / 6 for k in set(few) | set(many)}
    per_step = {k: v for k, v in per_step.items() if v}
    # setup builds one view of the coefficient table per update (slice / expand / as_strided): not per-step work
    work = {k: v for k, v in per_step.items() if k not in ("aten::slice", "aten::expand", "aten::as_strided")}
    evals = 2 if method == "heun" else 1
    assert work == {"fastscore_C::langevin_step_update": passes, "aten::fill_": evals}, per_step


def test_score_functions_that_reuse_or_alias_memory():
    sde = make_sde("ve")
    buf = torch.empty(4, 2)

    def reuses(x, t):
        return torch.mul(x, -1 / 400, out=buf)  # the same memory at every call

    with pytest.raises(ValueError, match="score_fn: returned the memory of its previous output"):
        solvers.solve(reuses, sde, (4, 2), method="heun", steps=4, seed=0)
    # a score that returns (a view of) the state itself is copied before the state changes
    half = solvers.solve(lambda x, t: x, sde, (4, 2), method="heun", steps=4, seed=0)
    ref = solvers.solve(lambda x, t: x.clone(), sde, (4, 2), method="heun", steps=4, seed=0)
    torch.testing.assert_close(half, ref, rtol=0, atol=0)


def test_denoise_false_ends_at_eps_in_the_sdes_state():
    """Without the final step to sigma = 0 the result is the state at time eps, in the SDE's space whichever
    parameterisation the model has (a denoiser steps the scaled state x / m and is scaled back)."""
    sde = make_sde("vp")
    score = GaussianScore(sde, MU_2D, COV_2D)
    x_T = torch.randn(6, 2, dtype=torch.float64)
    plain = solvers.solve(score, sde, None, steps=10, denoise=False, x_init=x_T)
    via = solvers.solve(P.score_from_denoiser(P.denoiser_from_score(score, sde), sde), sde, None, steps=10,
                        denoise=False, x_init=x_T)  # fmt: skip
    torch.testing.assert_close(via, plain, rtol=1e-10, atol=1e-10)
    final = solvers.solve(score, sde, None, steps=10, x_init=x_T)
    t = torch.full((6,), 1e-3, dtype=torch.float64)
    m, n = P.mean_std(sde, t)
    # the denoised result is not the state at eps, and the state's denoising is close to it
    assert not torch.allclose(final, plain)
    torch.testing.assert_close(final, (plain + n[:, None] ** 2 * score(plain, t)) / m[:, None], rtol=0.05, atol=0.05)


def test_argument_errors():
    sde = make_sde("ve")
    score = GaussianScore(sde, MU_2D, COV_2D)
    with pytest.raises(TypeError, match="score_fn"):
        solvers.solve(None, sde, (2, 2))
    with pytest.raises(TypeError, match="sde"):
        solvers.solve(score, object(), (2, 2))
    with pytest.raises(ValueError, match="method"):
        solvers.solve(score, sde, (2, 2), method="euler")
    with pytest.raises(TypeError, match="method"):
        solvers.solve(score, sde, (2, 2), method=1)
    with pytest.raises(ValueError, match="steps"):
        solvers.solve(score, sde, (2, 2), method="adaptive", steps=10)
    with pytest.raises(ValueError, match="steps"):
        solvers.solve(score, sde, (2, 2), steps=0)
    with pytest.raises(TypeError, match="steps"):
        solvers.solve(score, sde, (2, 2), steps=2.5)
    with pytest.raises(ValueError, match="eta"):
        solvers.solve(score, sde, (2, 2), method="heun", eta=1.0)
    with pytest.raises(ValueError, match="eta"):
        solvers.solve(score, sde, (2, 2), method="ddim", eta=-1.0)
    with pytest.raises(ValueError, match="schedule"):
        solvers.solve(score, sde, (2, 2), schedule="cosine")
    with pytest.raises(ValueError, match="sigmas"):
        solvers.solve(score, sde, (2, 2), sigmas=[1.0, 2.0])
    with pytest.raises(ValueError, match="sigmas"):
        solvers.solve(score, sde, (2, 2), sigmas=[40.0, 1.0, 0.0])  # above sigma(T) = 20
    with pytest.raises(ValueError, match="sigmas"):
        solvers.solve(score, sde, (2, 2), sigmas=[10.0, 0.001, 0.0])  # below sigma(0) = 0.01
    with pytest.raises(ValueError, match="steps"):
        solvers.solve(score, sde, (2, 2), sigmas=[10.0, 1.0, 0.0], steps=2)
    with pytest.raises(ValueError, match="atol"):
        solvers.solve(score, sde, (2, 2), method="adaptive", rtol=0.0, atol=0.0)
    with pytest.raises(ValueError, match="shape"):
        solvers.solve(score, sde, (2,))
    with pytest.raises(ValueError, match="score_fn"):
        solvers.solve(lambda x, t: x[:, :1], sde, (2, 2))
    with pytest.raises(TypeError, match="score_fn"):
        solvers.solve(lambda x, t: x.double(), sde, (2, 2))
    with pytest.raises(TypeError, match="eps_fn"):
        P.score_from_eps(3, sde)
    with pytest.raises(ValueError, match="timesteps"):
        P.score_from_eps(score, sde, timesteps="steps")
    with pytest.raises(ValueError, match="eps_fn"):
        solvers.solve(P.score_from_eps(lambda x, t: x[:1], sde), sde, (2, 2))
    with pytest.raises(ValueError, match="max_steps"):
        solvers.solve(score, sde, (2, 2), method="adaptive", max_steps=0)
    with pytest.raises(RuntimeError, match="max_steps"):
        solvers.solve(score, sde, (2, 2), method="adaptive", max_steps=3)


def test_adaptive_stops_on_a_non_finite_score():
    sde = make_sde("ve")

    def bad(x, t):
        out = -x / (1 + P.sigma_of_t(sde, t).to(x.dtype)[:, None] ** 2)
        out[1] = float("nan")
        return out

    with pytest.raises(RuntimeError, match=r"NaN or Inf .* sample\(s\) \[1\]"):
        solvers.solve(bad, sde, (3, 2), method="adaptive", seed=0)


def test_progress_reports_on_stderr(capsys):
    sde = make_sde("vp")
    solvers.solve(elementwise_score(sde), sde, (2, 1, 3), steps=5, seed=0, progress=True)
    assert "solve dpm" in capsys.readouterr().err
    solvers.solve(elementwise_score(sde), sde, (2, 1, 3), method="adaptive", seed=0, progress=True)
    assert "solve adaptive" in capsys.readouterr().err


def test_pc_sampler_accepts_converted_models():
    """The converted models are plain score functions for every other sampler too."""
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0, N=50)
    den = P.denoiser_from_score(GaussianScore(sde, MU_2D, COV_2D), sde)
    x = sampling.pc_sampler(P.score_from_denoiser(den, sde), sde, (8, 2), seed=0)
    y = sampling.pc_sampler(GaussianScore(sde, MU_2D, COV_2D), sde, (8, 2), seed=0)
    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


# ---- `fastscore bench sampling`'s equal-error measure on digits (bench/bench_sampling.py, part (c)) ----------------


def test_frechet_distance_of_known_gaussians():
    from fastscore._bench import bench_sampling as bench

    eye = torch.eye(3, dtype=torch.float64)
    mean = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    assert bench.frechet((mean, eye), (mean, eye)) == pytest.approx(0.0, abs=1e-12)
    assert bench.frechet((mean, eye), (torch.zeros(3, dtype=torch.float64), eye)) == pytest.approx(9.0)
    # N(0, a^2 I) vs N(0, b^2 I) in d dims: d (a - b)^2; non-commuting covariances: symmetric in its arguments
    assert bench.frechet((mean, 4 * eye), (mean, eye)) == pytest.approx(3.0)
    a = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=torch.float64)
    b = torch.tensor([[1.0, -0.4, 0.1], [-0.4, 2.0, 0.0], [0.1, 0.0, 1.5]], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    assert bench.frechet((zero, a), (zero, b)) == pytest.approx(bench.frechet((zero, b), (zero, a)), rel=1e-9)
    assert bench.frechet((zero, a), (zero, b)) > 0


def test_digit_features_tell_noisy_samples_from_digits():
    """The training digits are at distance ~0 of themselves, a subset of them near it, within a few bootstrap
    stds; the same subset with noise left in a sixth of the images (what the probability-flow ODE leaves on the
    shipped model) is far outside that noise."""
    from fastscore._bench import bench_sampling as bench

    from fastscore.data.images import load_digits

    features = bench.DigitFeatures()
    data = load_digits(16)
    assert features.distance_of(features(data)) == pytest.approx(0.0, abs=1e-9)
    gen = torch.Generator().manual_seed(0)
    subset = data[torch.randperm(len(data), generator=gen)[:64]]
    clean = features(subset)
    noise = features.bootstrap_std(clean, rounds=50)
    assert 0 < features.distance_of(clean) < 5 * noise
    noisy = subset.clone()
    noisy[:11] = (noisy[:11] + 0.5 * torch.randn(noisy[:11].shape, generator=gen)).clamp(0, 1)
    assert features.distance_of(features(noisy)) > features.distance_of(clean) + 5 * noise


def test_bench_sampling_equal_error_runs_quick(capsys):
    """`fastscore bench sampling --quick`'s part (c) end to end on the shipped digits model: every sampler's
    distance, each solver's match (or none) against the PC sampler's bound, samples per second of each timed
    one, nothing recorded without ``record``."""
    from fastscore._bench import bench_sampling as bench

    out = bench.digits_equal_error(quick=True, record=False)
    q = bench.QUICK_DIGITS
    pc = f"pc{q['pc_steps']}"
    expected = {pc} | {f"{label}{steps}" for (label, _, _), tried in q["solver_steps"].items() for steps in tried}
    assert set(out["errors"]) == expected and all(math.isfinite(e) and e >= 0 for e in out["errors"].values())
    assert out["evaluations"][pc] == 2 * q["pc_steps"] and out["evaluations"]["heun5"] == 9
    assert out["bound"] == pytest.approx(out["errors"][pc] + 2 * out["noise"]) and out["noise"] > 0
    assert set(out["matches"]) == {"dpm", "heun", "ddim", "ancestral"}
    for label, name in out["matches"].items():
        assert name is None or (name.startswith(label) and out["errors"][name] <= out["bound"])
    assert pc in out["samples_per_s"] and all(v > 0 for v in out["samples_per_s"].values())
    assert {row.case for row in out["rows"]} == {"digits equal error NCSNv2 b8"}
    text = capsys.readouterr().out
    assert "(c) equal error on digits" in text and "results appended" not in text
