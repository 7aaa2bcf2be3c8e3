"""fastscore.mcmc: MALA and HMC against exact answers.

- A standard normal, E = |x|^2 / 2, in 2-D and 100-D at large steps: unadjusted Langevin's stationary variance
  is 1 / (1 - eps / 2) (1.82 at eps = 0.9); MALA and HMC give 1 within sampling error. Their acceptance rates
  against the expectation E[min(1, alpha)] at stationarity, computed independently (float64 Monte Carlo of
  the proposal), and MALA's collapse in high dimension at a fixed step (Roberts & Rosenthal's d^(-1/3)
  scaling); dual-averaging warm-up reaches the target rate and MALA's optimal step in 100-D.
- The NCSN toy mixture 0.8 N((5, 5), I) + 0.2 N((-5, -5), I) with its exact energy: MALA and HMC run through
  a schedule of noise levels recover the 0.8 / 0.2 weights; plain MALA from a uniform start does not.
- Every chain is its own: a sample's chain is bitwise the same alone (sample_offset) and in a batch, with its
  own step size; a run continued with ``counter`` is the run done at once; seeds.
- Arguments: every bad one named, nothing modified.

Tolerances are sampling-error formulas (5 standard errors) with fixed seeds.
"""

import math

import pytest
import torch

from fastscore import mcmc
from fastscore import sampling
from fastscore import sde as sde_lib
from fastscore.data.toy import ncsn_toy_mixture
from fastscore.ops import langevin_step_

pytestmark = pytest.mark.one_thread


def gauss_energy(x):
    return 0.5 * x.flatten(1).double().square().sum(1)


def var_and_se(x: torch.Tensor) -> tuple[float, float]:
    """The variance of a zero-mean target from the samples (mean of x^2) and its standard error for independent
    N(0, 1) draws, sqrt(2 / n)."""
    v = x.double().square().mean().item()
    return v, math.sqrt(2.0 / x.numel())


def mala_expected_accept(d: int, h: float, n: int = 400_000) -> tuple[float, float]:
    """E[min(1, alpha)] of MALA at stationarity on N(0, I_d), by float64 Monte Carlo (mean, standard error)."""
    g = torch.Generator().manual_seed(12345)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    xp = x - h * x + math.sqrt(2 * h) * z
    rev = x - xp + h * xp
    la = 0.5 * (x * x).sum(1) - 0.5 * (xp * xp).sum(1) + 0.5 * (z * z).sum(1) - (rev * rev).sum(1) / (4 * h)
    a = la.clamp(max=0).exp()
    return a.mean().item(), a.std().item() / math.sqrt(n)


def hmc_expected_accept(d: int, h: float, L: int, n: int = 400_000) -> tuple[float, float]:
    """E[min(1, exp(H0 - H1))] of HMC with L leapfrog steps at stationarity on N(0, I_d) (mean, standard error)."""
    g = torch.Generator().manual_seed(54321)
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    p = torch.randn(n, d, generator=g, dtype=torch.float64)
    h0 = 0.5 * (q * q).sum(1) + 0.5 * (p * p).sum(1)
    p = p - h / 2 * q
    for i in range(L):
        q = q + h * p
        p = p - (h if i < L - 1 else h / 2) * q
    a = (h0 - 0.5 * (q * q).sum(1) - 0.5 * (p * p).sum(1)).clamp(max=0).exp()
    return a.mean().item(), a.std().item() / math.sqrt(n)


def ula(x0: torch.Tensor, h: float, n_steps: int, seed: int) -> torch.Tensor:
    """Unadjusted Langevin on the standard normal (score -x), the fused step."""
    x = x0.clone()
    with torch.no_grad():
        for k in range(n_steps):
            langevin_step_(x, -x, h, seed=seed, counter=k)
    return x


def assert_rate(rates: torch.Tensor, want: float, want_se: float, what: str) -> None:
    """The mean of per-chain rates (independent chains) against an expectation, within 5 combined errors."""
    se = math.sqrt(rates.var().item() / rates.numel() + want_se**2)
    got = rates.mean().item()
    assert abs(got - want) < 5 * se, f"{what}: {got:.4f} vs expected {want:.4f} (5 se = {5 * se:.4f})"


# ---- the standard normal ------------------------------------------------------------------------------------


def test_2d_standard_normal_at_step_0_9_ula_is_biased_mala_and_hmc_are_exact():
    N, D, h = 4096, 2, 0.9
    x0 = torch.zeros(N, D)  # off the typical set: the chains must get there
    v_ula, se = var_and_se(ula(x0, h, 100, seed=1))
    assert abs(v_ula - 1 / (1 - h / 2)) < 5 * se * 1.82, f"ULA variance {v_ula}, theory {1 / (1 - h / 2)}"
    assert v_ula - 1 > 20 * se, "ULA's bias should be far outside sampling error"

    r = mcmc.mala(gauss_energy, x0, h, 200, seed=2, n_warmup=50, adapt=False)
    v, se = var_and_se(r.x)
    assert abs(v - 1) < 5 * se, f"MALA variance {v} (5 se = {5 * se:.4f})"
    assert abs(r.x.double().mean().item()) < 5 / math.sqrt(N * D)
    want, want_se = mala_expected_accept(D, h)
    assert_rate(r.acceptance_rate, want, want_se, "MALA acceptance rate")
    assert_rate(r.mean_accept_prob, want, want_se, "MALA mean acceptance probability")
    assert torch.equal(r.step_size, torch.full((N,), h, dtype=torch.float64)), "no adaptation asked"
    torch.testing.assert_close(r.energy, gauss_energy(r.x), rtol=0, atol=0)

    r = mcmc.hmc(gauss_energy, x0, h, 2, 100, seed=3, n_warmup=20, adapt=False)
    v, se = var_and_se(r.x)
    assert abs(v - 1) < 5 * se, f"HMC variance {v} (5 se = {5 * se:.4f})"
    want, want_se = hmc_expected_accept(D, h, 2)
    assert_rate(r.acceptance_rate, want, want_se, "HMC acceptance rate")
    assert want > mala_expected_accept(D, h)[0], "HMC's proposals are accepted more often than MALA's here"


def test_100d_standard_normal_mala_collapses_at_a_fixed_large_step_and_adapts():
    """At a fixed step MALA's acceptance falls with the dimension (the step must shrink as d^(-1/3)): 0.71 in
    2-D, 0.0033 in 100-D at eps = 0.9. Started at the target, the chain stays exact (variance 1, where ULA's
    is 1.82). Adapted during warm-up toward 0.574 it reaches that rate at eps near 0.28, and samples exactly
    from a start far from the target."""
    N, D = 512, 100
    x0 = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
    r = mcmc.mala(gauss_energy, x0, 0.9, 60, seed=4)
    want, want_se = mala_expected_accept(D, 0.9, n=100_000)
    assert want < 0.01
    assert_rate(r.mean_accept_prob, want, want_se, "MALA acceptance probability in 100-D at 0.9")
    v, se = var_and_se(r.x)
    assert abs(v - 1) < 5 * se, f"MALA variance {v}"

    r = mcmc.mala(gauss_energy, torch.zeros(N, D), 0.9, 100, seed=5, n_warmup=150)
    v, se = var_and_se(r.x)
    assert abs(v - 1) < 5 * se, f"adapted MALA variance {v} (5 se = {5 * se:.4f})"
    assert 0.2 < r.step_size.median().item() < 0.4, f"adapted steps {r.step_size.median().item()}"
    assert r.step_size.min() > 0.1 and r.step_size.max() < 0.6, "every chain's own step near the optimum"
    assert abs(r.acceptance_rate.mean().item() - mcmc.MALA_TARGET) < 0.08, r.acceptance_rate.mean()
    # the adapted step's acceptance at stationarity, independently
    h = r.step_size.median().item()
    want, want_se = mala_expected_accept(D, h, n=100_000)
    near = (r.step_size - h).abs() < 0.02
    assert_rate(r.mean_accept_prob[near], want, want_se + 0.02, "MALA acceptance at the adapted step")
    v_ula, _ = var_and_se(ula(torch.zeros(N, D), h, 100, seed=6))
    assert v_ula - 1 > 10 * se, f"ULA at the adapted step {h:.3f} is still biased: {v_ula}"


def test_100d_standard_normal_hmc_is_exact_at_step_0_9():
    N, D, h, L = 512, 100, 0.9, 3
    r = mcmc.hmc(gauss_energy, torch.zeros(N, D), h, L, 60, seed=7, n_warmup=30, adapt=False)
    v, se = var_and_se(r.x)
    assert abs(v - 1) < 5 * se, f"HMC variance {v} (5 se = {5 * se:.4f})"
    # the acceptance expectation holds at stationarity: from a start drawn from the target (three leapfrog
    # steps of 0.9 turn the state by nearly pi, so the variance itself relaxes slowly from a bad start)
    x0 = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    r = mcmc.hmc(gauss_energy, x0, h, L, 40, seed=17)
    want, want_se = hmc_expected_accept(D, h, L, n=100_000)
    assert_rate(r.acceptance_rate, want, want_se, "HMC acceptance rate in 100-D")
    r = mcmc.hmc(gauss_energy, torch.zeros(N, D), h, L, 60, seed=8, n_warmup=100)
    assert abs(r.acceptance_rate.mean().item() - mcmc.HMC_TARGET) < 0.08, r.acceptance_rate.mean()
    v, se = var_and_se(r.x)
    assert abs(v - 1) < 5 * se, f"adapted HMC variance {v}"


def test_image_shaped_float64_and_channels_last_states():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(256, 2, 3, 3, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    r = mcmc.mala(gauss_energy, x0, 0.5, 40, seed=9)
    assert r.x.dtype == torch.float64 and r.x.is_contiguous(memory_format=torch.channels_last)
    v, se = var_and_se(r.x)
    assert abs(v - 1) < 5 * se
    flat = mcmc.mala(gauss_energy, x0.contiguous(), 0.5, 40, seed=9)
    assert torch.equal(flat.x, r.x), "the layout does not change a chain"
    assert torch.equal(flat.acceptance_rate, r.acceptance_rate)


# ---- the toy mixture ------------------------------------------------------------------------------------------


def mode_fraction(x: torch.Tensor) -> float:
    """The fraction of samples on the (5, 5) side."""
    return (x.sum(1) > 0).double().mean().item()


@pytest.mark.parametrize("sampler", ["mala", "hmc"])
def test_ncsn_toy_mixture_weights_are_recovered_through_noise_levels(sampler):
    """With the exact energies of the mixture convolved with N(0, sigma^2 I), levels 10 -> 0: at large sigma the
    two modes are one, the chains spread over both in proportion to their weights, and the proportion is
    frozen as they separate: 0.8 / 0.2 within sampling error (5 se = 0.045 for 2000 chains, plus the mass
    the freezing level puts on the wrong side, below 0.01). Without the levels (plain MALA from a uniform
    start on [-8, 8]^2) the chains keep the start's split, about 0.5: gradients and local moves do not see
    the weights."""
    gmm = ncsn_toy_mixture()
    N = 2000
    x = torch.rand(N, 2, generator=torch.Generator().manual_seed(0)) * 16 - 8
    counter = 0
    for sigma in (10.0, 5.0, 3.0, 2.0, 0.0):
        energy = lambda x, s=sigma: -gmm.log_prob(x, s)  # noqa: E731
        if sampler == "mala":
            r = mcmc.mala(energy, x, 0.5 * (1 + sigma**2), 30, seed=11, counter=counter)
            counter += 30
        else:
            r = mcmc.hmc(energy, x, 0.6 * math.sqrt(1 + sigma**2), 3, 15, seed=11, counter=counter)
            counter += 15
        x = r.x
        assert r.acceptance_rate.mean() > 0.5, f"sigma {sigma}: acceptance {r.acceptance_rate.mean()}"
    se = math.sqrt(0.8 * 0.2 / N)
    frac = mode_fraction(x)
    assert abs(frac - 0.8) < 5 * se + 0.01, f"{sampler}: fraction in the 0.8 mode {frac}"
    inside = x[x.sum(1) > 0].double()
    assert (inside.mean(0) - 5).abs().max() < 5 / math.sqrt(inside.shape[0]) + 0.02, inside.mean(0)
    if sampler == "mala":
        plain = mcmc.mala(
            lambda x: -gmm.log_prob(x),
            torch.rand(N, 2, generator=torch.Generator().manual_seed(0)) * 16 - 8,
            0.5,
            60,
            seed=12,
        )
        assert abs(mode_fraction(plain.x) - 0.5) < 0.06, f"plain MALA fraction {mode_fraction(plain.x)}"


# ---- chains are per sample -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mala", "hmc"])
def test_a_sample_chain_is_the_same_alone_and_in_a_batch_with_its_own_step(kind):
    N, D = 9, 4
    x0 = torch.randn(N, D, generator=torch.Generator().manual_seed(2))
    steps = torch.linspace(0.2, 1.2, N, dtype=torch.float64)

    def run(x, st, offset):
        if kind == "mala":
            return mcmc.mala(gauss_energy, x, st, 25, seed=13, n_warmup=10, sample_offset=offset)
        return mcmc.hmc(gauss_energy, x, st, 2, 25, seed=13, n_warmup=10, sample_offset=offset)

    batch = run(x0, steps, 100)
    for k in (0, 4, N - 1):
        one = run(x0[k : k + 1], steps[k].item(), 100 + k)
        assert torch.equal(one.x[0], batch.x[k]), f"sample {k}: state"
        assert torch.equal(one.step_size[0], batch.step_size[k]), f"sample {k}: adapted step"
        assert torch.equal(one.acceptance_rate[0], batch.acceptance_rate[k]), f"sample {k}: acceptance"
    assert batch.step_size.unique().numel() == N, "each chain adapts its own step"


def test_continuing_with_counter_is_running_at_once_and_seeds_decide_the_noise():
    x0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(3))
    whole = mcmc.mala(gauss_energy, x0, 0.7, 30, seed=14)
    first = mcmc.mala(gauss_energy, x0, 0.7, 12, seed=14)
    rest = mcmc.mala(gauss_energy, first.x, 0.7, 18, seed=14, counter=12)
    assert torch.equal(rest.x, whole.x)
    torch.testing.assert_close(first.acceptance_rate * 12 + rest.acceptance_rate * 18, whole.acceptance_rate * 30)
    again = mcmc.mala(gauss_energy, x0, 0.7, 30, seed=14)
    assert torch.equal(again.x, whole.x), "the same seed, the same chain"
    assert not torch.equal(mcmc.mala(gauss_energy, x0, 0.7, 30, seed=15).x, whole.x)
    torch.manual_seed(4)
    a = mcmc.hmc(gauss_energy, x0, 0.5, 2, 5)
    torch.manual_seed(4)
    b = mcmc.hmc(gauss_energy, x0, 0.5, 2, 5)
    assert torch.equal(a.x, b.x), "seed=None draws from torch's generator"


def test_x_is_not_modified_and_the_network_sees_a_leaf_that_requires_grad():
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
    before = x0.clone()
    seen = []

    def energy(x):
        seen.append((x.requires_grad, x.is_leaf, torch.is_grad_enabled()))
        return gauss_energy(x)

    r = mcmc.hmc(energy, x0, 0.5, 3, 4, seed=1)
    assert torch.equal(x0, before)
    assert all(seen) and len(seen) == 1 + 4 * 3, "one evaluation at the start, n_leapfrog per iteration"
    assert not r.x.requires_grad and r.x.data_ptr() != x0.data_ptr()


def test_progress_reports_on_stderr(capsys):
    mcmc.mala(gauss_energy, torch.zeros(4, 2), 0.5, 3, seed=1, progress=True)
    assert "mala" in capsys.readouterr().err


def test_energy_and_score_is_minus_the_gradient():
    x = torch.randn(5, 3, dtype=torch.float64)
    A = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    e, s = mcmc.energy_and_score(lambda x: 0.5 * (A * x * x).sum(1), x)
    torch.testing.assert_close(s, -A * x, rtol=0, atol=1e-15)
    torch.testing.assert_close(e, 0.5 * (A * x * x).sum(1), rtol=0, atol=0)
    e, s = mcmc.energy_and_score(lambda x: x.new_ones(x.shape[0]), x)  # independent of x: score 0
    assert torch.equal(s, torch.zeros_like(x))
    e, s = mcmc.energy_and_score(lambda x: x.sum(1), x)  # autograd's gradient is a broadcast of ones
    assert torch.equal(s, -torch.ones_like(x))


# ---- bad input -------------------------------------------------------------------------------------------


def _call(kind, **kw):
    args = dict(energy_fn=gauss_energy, x=torch.zeros(4, 2), step_size=0.5, n_steps=2)
    args.update(kw)
    if kind == "mala":
        return mcmc.mala(args.pop("energy_fn"), args.pop("x"), args.pop("step_size"), args.pop("n_steps"), **args)
    n_leapfrog = args.pop("n_leapfrog", 2)
    return mcmc.hmc(
        args.pop("energy_fn"), args.pop("x"), args.pop("step_size"), n_leapfrog, args.pop("n_steps"), **args
    )


BAD = {
    "energy_fn not callable": (dict(energy_fn=3), TypeError, "energy_fn: expected a callable"),
    "x not a tensor": (dict(x=[[0.0, 0.0]]), TypeError, "x: expected a torch.Tensor"),
    "x integer": (dict(x=torch.zeros(4, 2, dtype=torch.long)), TypeError, "x: expected float16"),
    "x empty": (dict(x=torch.zeros(0, 2)), ValueError, "x: expected a non-empty batch"),
    "step negative": (dict(step_size=-0.5), ValueError, "step_size: expected a positive"),
    "step string": (dict(step_size="0.5"), TypeError, "step_size: expected a float"),
    "step tensor shape": (dict(step_size=torch.ones(3)), ValueError, r"step_size: .*shape \(4,\)"),
    "step tensor zero": (dict(step_size=torch.tensor([0.5, 0.0, 0.5, 0.5])), ValueError, "step_size: expected"),
    "n_steps negative": (dict(n_steps=-1), ValueError, "n_steps: expected an integer >= 0"),
    "n_steps float": (dict(n_steps=2.0), TypeError, "n_steps: expected an integer"),
    "n_warmup negative": (dict(n_warmup=-3), ValueError, "n_warmup: expected an integer >= 0"),
    "target above 1": (dict(target_accept=1.5), ValueError, r"target_accept: expected a number in \(0, 1\)"),
    "target string": (dict(target_accept="high"), TypeError, "target_accept: expected a number"),
    "adapt not a bool": (dict(adapt=1), TypeError, "adapt: expected a bool"),
    "progress not a bool": (dict(progress="yes"), TypeError, "progress: expected a bool"),
    "seed float": (dict(seed=1.5), TypeError, "seed: expected an integer"),
    "seed negative": (dict(seed=-1), ValueError, "seed: expected an integer in"),
    "counter negative": (dict(counter=-1), ValueError, "counter: expected an integer in"),
    "counter overflow": (dict(counter=2**64 - 1), ValueError, "counter: counter \\+ n_warmup \\+ n_steps"),
    "sample_offset negative": (dict(sample_offset=-1), ValueError, "sample_offset: expected"),
    "energy shape": (dict(energy_fn=lambda x: x.sum()), ValueError, r"energy_fn: returned shape \(\), expected"),
    "energy not a tensor": (dict(energy_fn=lambda x: 1.0), TypeError, "energy_fn: expected it to return a tensor"),
    "energy integer": (dict(energy_fn=lambda x: x.sum(1).long()), TypeError, "energy_fn: returned torch.int64"),
    "energy NaN at the start": (
        dict(energy_fn=lambda x: gauss_energy(x) * torch.tensor([1.0, math.nan, 1.0, 1.0], dtype=torch.float64)),
        ValueError,
        r"energy_fn: NaN energies or non-finite scores at the start x, in sample\(s\) \[1\]",
    ),
}


@pytest.mark.parametrize("kind", ["mala", "hmc"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_name_the_argument(kind, case):
    kw, exc, message = BAD[case]
    x = kw.get("x", torch.zeros(4, 2))
    before = x.clone() if isinstance(x, torch.Tensor) else None
    with pytest.raises(exc, match=message):
        _call(kind, **{**kw, "x": x})
    if before is not None:
        assert torch.equal(x, before)


def test_hmc_n_leapfrog_is_checked():
    with pytest.raises(ValueError, match="n_leapfrog: expected an integer >= 1"):
        _call("hmc", n_leapfrog=0)
    with pytest.raises(TypeError, match="n_leapfrog: expected an integer"):
        _call("hmc", n_leapfrog=1.0)


# ---- annealed MALA / HMC as correctors of fastscore.sampling ---------------------------------------------------

TOY_SIGMAS = torch.exp(torch.linspace(math.log(20.0), 0.0, 10))  # NCSN's toy levels, 20 -> 1


def toy_energy(x, labels):
    """The exact noise-conditional energy of NCSN's toy mixture at level ``labels`` (annealed_langevin's)."""
    return -ncsn_toy_mixture().log_prob(x, TOY_SIGMAS[labels])


def toy_score(x, labels):
    return ncsn_toy_mixture().score(x, TOY_SIGMAS[labels])


def toy_start(n: int) -> torch.Tensor:
    return torch.rand(n, 2, generator=torch.Generator().manual_seed(0)) * 16 - 8


@pytest.mark.parametrize("corrector", ["mala", "hmc"])
def test_annealed_langevin_with_mala_and_hmc_correctors_recovers_the_toy_weights(corrector):
    """NCSN's toy from U[-8, 8]^2 through the levels 20 -> 1 with the exact perturbed energies: the 0.8 / 0.2
    weights within 5 binomial standard errors plus 0.01 (the mass the freezing level leaves on the wrong
    side), at a step ten times the Langevin test's (step_lr 0.5): the Metropolis test keeps it exact."""
    N = 2000
    x, rates = sampling.annealed_langevin(
        toy_score, toy_start(N), TOY_SIGMAS, n_steps_each=20, step_lr=0.5, denoise=False, seed=21,
        corrector=corrector, energy_fn=toy_energy, n_leapfrog=2, return_acceptance=True,
    )  # fmt: skip
    frac = mode_fraction(x)
    assert abs(frac - 0.8) < 5 * math.sqrt(0.8 * 0.2 / N) + 0.01, f"{corrector}: fraction in the 0.8 mode {frac}"
    assert rates.shape == (len(TOY_SIGMAS), N) and rates.dtype == torch.float64
    assert bool((rates.mean(1) > 0.7).all()), f"{corrector}: acceptance per level {rates.mean(1).tolist()}"
    # the last level samples the mixture perturbed by N(0, I): N(mode, 2 I) near each mode
    dist = torch.minimum((x - 5).norm(dim=1), (x + 5).norm(dim=1))
    assert abs(dist.mean().item() - math.sqrt(math.pi)) < 0.1, dist.mean()


def test_pc_sampler_with_the_mala_corrector_recovers_the_toy_weights_on_a_ve_sde():
    N = 1000
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0, N=30)
    gmm = ncsn_toy_mixture()

    def std(x, t):
        return sde.marginal_prob(x, t)[1]

    for corrector in ("mala", "hmc"):
        x, rates = sampling.pc_sampler(
            lambda x, t: gmm.score(x, std(x, t)), sde, (N, 2), corrector=corrector, snr=0.5, n_corrector_steps=2,
            energy_fn=lambda x, t: -gmm.log_prob(x, std(x, t)), seed=22, return_acceptance=True,
        )  # fmt: skip
        frac = mode_fraction(x)
        assert abs(frac - 0.8) < 5 * math.sqrt(0.8 * 0.2 / N) + 0.01, f"{corrector}: fraction {frac}"
        assert rates.shape == (sde.N, N)
        assert rates.mean() > 0.8, f"{corrector}: acceptance {rates.mean()}"
        assert x.isfinite().all()


@pytest.mark.parametrize("corrector", ["mala", "hmc"])
def test_a_level_of_the_annealed_corrector_is_mcmc_with_the_counter_of_its_first_iteration(corrector):
    """The corrector runs fastscore.mcmc's iteration: annealed over L levels it is bitwise L calls of mala /
    hmc, level i with the level's energy, the step step_lr (sigma_i / sigma_L)^2 (HMC: h = sqrt(2 that)) and
    counter i n_steps_each, so no two levels draw the same noise."""
    x0, n_each, lr = toy_start(64), 4, 0.3
    got, rates = sampling.annealed_langevin(
        toy_score, x0, TOY_SIGMAS, n_steps_each=n_each, step_lr=lr, denoise=False, seed=23, corrector=corrector,
        energy_fn=toy_energy, n_leapfrog=2, return_acceptance=True,
    )  # fmt: skip
    x = x0
    for level in range(len(TOY_SIGMAS)):
        alpha = lr * (TOY_SIGMAS[level].item() / TOY_SIGMAS[-1].item()) ** 2
        labels = torch.full((x.shape[0],), level)
        energy = lambda h, labels=labels: toy_energy(h, labels)  # noqa: E731
        if corrector == "mala":
            r = mcmc.mala(energy, x, alpha, n_each, seed=23, counter=level * n_each)
        else:
            r = mcmc.hmc(energy, x, math.sqrt(2 * alpha), 2, n_each, seed=23, counter=level * n_each)
        assert torch.equal(r.acceptance_rate, rates[level]), f"level {level}"
        x = r.x
    assert torch.equal(got, x)


def test_annealed_correctors_are_batch_invariant_and_reproducible():
    x0 = toy_start(12)
    kw = dict(n_steps_each=3, step_lr=0.3, seed=24, energy_fn=toy_energy)
    for corrector in ("mala", "hmc"):
        batch = sampling.annealed_langevin(toy_score, x0, TOY_SIGMAS, corrector=corrector, sample_offset=40, **kw)
        again = sampling.annealed_langevin(toy_score, x0, TOY_SIGMAS, corrector=corrector, sample_offset=40, **kw)
        assert torch.equal(batch, again), "the same seed, the same samples"
        for k in (0, 7, 11):
            one = sampling.annealed_langevin(
                toy_score, x0[k : k + 1], TOY_SIGMAS, corrector=corrector, sample_offset=40 + k, **kw
            )
            assert torch.equal(one[0], batch[k]), f"{corrector}: sample {k}"
        other = sampling.annealed_langevin(toy_score, x0, TOY_SIGMAS, corrector=corrector, **{**kw, "seed": 25})
        assert not torch.equal(other, batch)
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0, N=5)
    gmm = ncsn_toy_mixture()
    pkw = dict(corrector="hmc", n_corrector_steps=2, seed=26, snr=0.3)
    pkw["energy_fn"] = lambda x, t: -gmm.log_prob(x, sde.marginal_prob(x, t)[1])
    score = lambda x, t: gmm.score(x, sde.marginal_prob(x, t)[1])  # noqa: E731
    prior = sampling.pc_sampler(score, sde, (6, 2), seed=26, corrector="none", predictor="none", denoise=False)
    batch = sampling.pc_sampler(score, sde, (6, 2), x_init=prior, **pkw)
    for k in (0, 5):
        one = sampling.pc_sampler(score, sde, (1, 2), x_init=prior[k : k + 1], sample_offset=k, **pkw)
        assert torch.equal(one[0], batch[k]), f"pc: sample {k}"


def test_annealed_corrector_results_with_intermediates_and_the_default_corrector():
    x0 = toy_start(8)
    kw = dict(n_steps_each=2, step_lr=0.3, seed=27)
    x, inter, rates = sampling.annealed_langevin(
        toy_score, x0, TOY_SIGMAS, corrector="mala", energy_fn=toy_energy, return_intermediates=True,
        return_acceptance=True, **kw,
    )  # fmt: skip
    assert len(inter) == len(TOY_SIGMAS) * 2 + 1 and rates.shape == (len(TOY_SIGMAS), 8)
    assert torch.equal(inter[-1], x), "the denoised result is the last intermediate"
    before = x0.clone()
    sampling.annealed_langevin(toy_score, x0, TOY_SIGMAS, corrector="hmc", energy_fn=toy_energy, **kw)
    assert torch.equal(x0, before), "x is not modified"
    default = sampling.annealed_langevin(toy_score, x0, TOY_SIGMAS, **kw)
    assert torch.equal(default, sampling.annealed_langevin(toy_score, x0, TOY_SIGMAS, corrector="langevin", **kw))


def _ald(**kw):
    args = dict(n_steps_each=1, step_lr=0.1, seed=1, corrector="mala", energy_fn=toy_energy)
    args.update(kw)
    return sampling.annealed_langevin(toy_score, toy_start(4), TOY_SIGMAS, **args)


def _pc(**kw):
    gmm = ncsn_toy_mixture()
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0, N=3)
    args = dict(corrector="mala", seed=1, energy_fn=lambda x, t: -gmm.log_prob(x, sde.marginal_prob(x, t)[1]))
    args.update(kw)
    return sampling.pc_sampler(lambda x, t: -x, sde, (4, 2), **args)


CORRECTOR_BAD = {
    "no energy_fn": (dict(energy_fn=None), ValueError, "energy_fn: the 'mala' corrector needs the energy"),
    "energy_fn not callable": (dict(energy_fn=3), TypeError, "energy_fn: expected a callable"),
    "energy_fn without an mcmc corrector": (
        dict(corrector="langevin"),
        ValueError,
        "energy_fn: only the 'mala' and 'hmc' correctors use it",
    ),
    "acceptance without an mcmc corrector": (
        dict(corrector="langevin", energy_fn=None, return_acceptance=True),
        ValueError,
        "return_acceptance: acceptance rates come from",
    ),
    "return_acceptance not a bool": (dict(return_acceptance=1), TypeError, "return_acceptance: expected a bool"),
    "outside noise": (dict(noise=torch.Generator()), ValueError, "noise: the 'mala' corrector draws"),
    "n_leapfrog zero": (dict(corrector="hmc", n_leapfrog=0), ValueError, "n_leapfrog: expected an integer >= 1"),
    "n_leapfrog float": (dict(corrector="hmc", n_leapfrog=2.0), TypeError, "n_leapfrog: expected an integer"),
    "energy shape": (
        dict(energy_fn=lambda x, c: x.sum()),
        ValueError,
        r"energy_fn: returned shape \(\), expected \(4,\)",
    ),
    "energy NaN": (
        dict(energy_fn=lambda x, c: x.sum(1) * math.nan),
        ValueError,
        r"energy_fn: NaN energies or non-finite scores at the start of level 0, in sample\(s\) \[0, 1, 2, 3\]",
    ),
}


@pytest.mark.parametrize("case", list(CORRECTOR_BAD))
def test_annealed_langevin_corrector_arguments_are_checked(case):
    kw, exc, message = CORRECTOR_BAD[case]
    with pytest.raises(exc, match=message):
        _ald(**kw)


def test_annealed_corrector_names_and_steps_are_checked():
    with pytest.raises(ValueError, match="corrector: expected one of 'langevin', 'mala', 'hmc', got 'ald'"):
        _ald(corrector="ald")
    with pytest.raises(TypeError, match="corrector: expected one of"):
        _ald(corrector=None)
    with pytest.raises(ValueError, match="step_lr: expected a positive finite number"):
        _ald(step_lr=0.0)
    with pytest.raises(ValueError, match="corrector: expected one of 'langevin', 'ald', 'none', 'mala', 'hmc'"):
        _pc(corrector="metropolis")
    with pytest.raises(ValueError, match="energy_fn: the 'hmc' corrector needs the energy: pass energy_fn\\(x, t\\)"):
        _pc(corrector="hmc", energy_fn=None)
    with pytest.raises(ValueError, match="batch_norm_step: score_sde's batch-averaged step"):
        _pc(batch_norm_step=True)
    with pytest.raises(ValueError, match="snr: expected a positive finite number"):
        _pc(snr=0.0)
    with pytest.raises(ValueError, match="energy_fn: only the 'mala' and 'hmc' correctors use it, not 'ald'"):
        _pc(corrector="ald")
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0, N=3)
    with pytest.raises(ValueError, match="corrector: expected one of 'langevin', 'ald', 'none', got 'mala'"):
        sampling.pc_inpaint(lambda x, t: -x, sde, torch.zeros(2, 2), torch.ones(1, 2), corrector="mala")
