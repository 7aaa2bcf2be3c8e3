"""fastscore.likelihood and the probability-flow ODE sampler on Gaussian data with the analytic score.

For data N(mu, Sigma) the marginals of all three SDEs stay Gaussian, p_t = N(m_t mu, m_t^2 Sigma + s_t^2 I)
with (m_t, s_t) from sde.marginal_prob, a family the SDE's Fokker-Planck equation preserves (for VE it
starts at N(mu, Sigma + sigma_min^2 I)). With its exact score the probability-flow ODE maps p_eps onto p_T,
so log_likelihood(x) must equal log p_eps(x) (up to the solver's tolerance, the prior's mismatch with p_T,
~1e-4 nats per dim here, and the probes' noise), and ode_sampler must turn prior samples into N(mu, Sigma).
"""

import math

import pytest
import torch

from fastscore.likelihood import bits_per_dim
from fastscore.likelihood import dequantization_offset
from fastscore.likelihood import log_likelihood
from fastscore.ode import NonFiniteError
from fastscore.ode import ode_sampler
from fastscore.ops import counter_randn
from fastscore.sde import VESDE
from fastscore.sde import VPSDE
from fastscore.sde import subVPSDE

F64 = torch.float64
D = 4
SDES = {"VE": VESDE, "VP": VPSDE, "subVP": subVPSDE}


class Gaussian:
    """N(mu, Q diag(lam) Q^T) with a rotated (non-diagonal) covariance, so Hutchinson probes have variance."""

    def __init__(self):
        gen = torch.Generator().manual_seed(7)
        self.Q, _ = torch.linalg.qr(torch.randn(D, D, dtype=F64, generator=gen))
        self.lam = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=F64)
        self.mu = torch.tensor([1.0, -0.5, 0.3, 0.0], dtype=F64)
        self.cov = self.Q @ torch.diag(self.lam) @ self.Q.T

    def sample(self, n, seed=0):
        z = torch.randn(n, D, dtype=F64, generator=torch.Generator().manual_seed(seed))
        return self.mu + (z * self.lam.sqrt()) @ self.Q.T

    def _m_var(self, sde, t):
        m, s = sde.marginal_prob(torch.ones(t.shape[0], 1, dtype=t.dtype), t)
        m = m[:, 0]
        return m, m[:, None] ** 2 * self.lam.to(t.dtype) + s[:, None] ** 2  # eigen-variances (N, D)

    def score_fn(self, sde):
        def score(x, t):
            m, var = self._m_var(sde, t)
            Q, mu = self.Q.to(x.dtype), self.mu.to(x.dtype)
            return -(((x - m[:, None] * mu) @ Q) / var) @ Q.T

        return score

    def logpdf(self, sde, x, t):
        m, var = self._m_var(sde, torch.full((x.shape[0],), t, dtype=F64))
        r = (x - m[:, None] * self.mu) @ self.Q
        return -0.5 * (r**2 / var).sum(1) - 0.5 * torch.log(2 * math.pi * var).sum(1)


G = Gaussian()


def budgeted(score_fn, budget=60):
    """score_fn that raises AssertionError on call number budget + 1; .calls counts the calls."""

    def fn(x, t):
        fn.calls += 1
        if fn.calls > budget:
            raise AssertionError(f"the solver kept calling score_fn ({budget} calls) instead of stopping")
        return score_fn(x, t)

    fn.calls = 0
    return fn


@pytest.mark.parametrize("name", list(SDES))
def test_exact_trace_matches_analytic_density(name):
    sde = SDES[name]()
    x = G.sample(48)
    logp, info = log_likelihood(G.score_fn(sde), sde, x, probe="exact", return_info=True)
    want = G.logpdf(sde, x, 1e-5)
    err = logp - want
    assert abs(err.mean().item()) / D < 0.01, f"{name}: mean error {err.mean().item() / D:.2e} nats/dim"
    assert err.abs().max().item() / D < 0.04, f"{name}: worst sample {err.abs().max().item() / D:.2e} nats/dim"
    # and the data density itself (p_eps differs from p_0 by ~sigma(eps)^2 only)
    assert abs((logp - G.logpdf(sde, x, 0.0)).mean().item()) / D < 0.01
    assert torch.all(info.stderr == 0) and info.nfe > 10 and info.z.shape == x.shape
    torch.testing.assert_close(info.prior_logp + info.delta_logp, logp)
    assert logp.dtype == F64 and logp.shape == (48,)


@pytest.mark.parametrize("name", list(SDES))
def test_hutchinson_matches_analytic_density_within_its_error_bar(name):
    sde = SDES[name]()
    x = G.sample(256, seed=1)
    logp, info = log_likelihood(
        G.score_fn(sde), sde, x, n_probes=8, probe="rademacher", seed=11, mode="reverse", return_info=True
    )
    err = logp - G.logpdf(sde, x, 1e-5)
    stderr_of_mean = info.stderr.square().sum().sqrt().item() / x.shape[0]
    assert torch.all(info.stderr > 0) and torch.isfinite(info.stderr).all()
    assert abs(err.mean().item()) / D < 0.01, f"{name}: mean error {err.mean().item() / D:.2e} nats/dim"
    assert abs(err.mean().item()) < 4 * stderr_of_mean + 1e-3, (err.mean().item(), stderr_of_mean)
    assert info.logp_per_probe.shape == (256, 8)
    # the reported error bar is the spread the per-sample errors actually have
    ratio = err.std().item() / info.stderr.mean().item()
    assert 0.6 < ratio < 1.6, ratio


def test_forward_and_reverse_products_agree_and_gaussian_probes():
    sde = VPSDE()
    x = G.sample(8, seed=2)
    a = log_likelihood(G.score_fn(sde), sde, x, n_probes=2, seed=5, mode="reverse")
    b = log_likelihood(G.score_fn(sde), sde, x, n_probes=2, seed=5, mode="forward")
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-7)
    c, info = log_likelihood(G.score_fn(sde), sde, x, probe="gaussian", seed=5, mode="reverse", return_info=True)
    assert torch.isfinite(c).all() and torch.isnan(info.stderr).all()  # one probe: no spread to measure
    assert abs((c - G.logpdf(sde, x, 1e-5)).mean().item()) < 3.0


def test_a_samples_likelihood_does_not_depend_on_its_batch():
    sde = VESDE()
    x = G.sample(6, seed=3)
    batch = log_likelihood(G.score_fn(sde), sde, x, seed=9, mode="reverse")
    first = log_likelihood(G.score_fn(sde), sde, x[:2], seed=9, mode="reverse")
    torch.testing.assert_close(first, batch[:2], rtol=1e-9, atol=1e-9)
    joint = log_likelihood(G.score_fn(sde), sde, x, seed=9, mode="reverse", per_sample=False, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(joint, batch, rtol=0, atol=0.05)


def test_float32_data_and_score():
    sde = VPSDE()
    x = G.sample(16, seed=4)
    logp = log_likelihood(G.score_fn(sde), sde, x.float(), probe="exact")
    assert logp.dtype == F64
    assert abs((logp - G.logpdf(sde, x, 1e-5)).mean().item()) / D < 0.01


def test_bits_per_dim():
    logp = torch.tensor([-100.0, -50.0], dtype=F64)
    x = torch.zeros(2, 3, 4, 4)
    assert dequantization_offset(0.0, 1.0) == 8.0 and dequantization_offset(-1.0, 1.0) == 7.0
    want = -logp / (48 * math.log(2)) + 7.0
    torch.testing.assert_close(bits_per_dim(logp, x, offset=7.0), want)
    torch.testing.assert_close(bits_per_dim(logp, (3, 4, 4), 7.0), want)
    with pytest.raises(TypeError):
        bits_per_dim(logp, x)  # the offset is required: it depends on the data's range
    with pytest.raises(ValueError, match="x"):
        bits_per_dim(logp, torch.zeros(3, 4), offset=8.0)
    with pytest.raises(ValueError, match="offset"):
        bits_per_dim(logp, x, offset=math.inf)
    with pytest.raises(ValueError, match="high"):
        dequantization_offset(1.0, 0.0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(score_fn=None), TypeError, "score_fn"),
        (dict(sde="VP"), TypeError, "sde"),
        (dict(x=[[1.0]]), TypeError, "x"),
        (dict(x=torch.ones(3, 2, dtype=torch.int64)), TypeError, "x"),
        (dict(x=torch.ones(3)), ValueError, "x"),
        (dict(probe="normal"), ValueError, "probe"),
        (dict(n_probes=0), ValueError, "n_probes"),
        (dict(eps=1.0), ValueError, "eps"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(rtol=-1.0), ValueError, "rtol"),
        (dict(method="dopri8"), ValueError, "method"),
        (dict(per_sample="yes"), TypeError, "per_sample"),
        (dict(score_fn=lambda x, t: -x[:, :1]), ValueError, "score_fn"),  # would broadcast
        (dict(score_fn=lambda x, t: -x.float()), TypeError, "score_fn"),
        (dict(x=torch.tensor([[0.0, 1.0, math.nan, 0.0]], dtype=F64)), ValueError, r"x: expected finite"),
        (dict(x=torch.tensor([[0.0, 1.0, 0.0, 0.0], [math.inf] * 4], dtype=F64)), ValueError, r"sample\(s\) \[1\]"),
    ],
)
def test_log_likelihood_bad_arguments(kwargs, error, match):
    sde = VPSDE()
    x = G.sample(3)
    before = x.clone()
    args = dict(score_fn=budgeted(G.score_fn(sde)), sde=sde, x=x)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        log_likelihood(args.pop("score_fn"), args.pop("sde"), args.pop("x"), **args)
    assert torch.equal(x, before)


# ---- ode_sampler -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SDES))
def test_ode_sampler_gaussian_mean_and_covariance(name):
    sde = SDES[name]()
    n = 2000
    samples, info = ode_sampler(G.score_fn(sde), sde, (n, D), dtype=F64, seed=0, return_info=True)
    assert samples.shape == (n, D) and samples.dtype == F64
    # whiten with the data's covariance: N(0, I) if the sampler is right
    w = ((samples - G.mu) @ G.Q) / G.lam.sqrt()
    assert (w.mean(0).abs() < 4 / math.sqrt(n)).all(), w.mean(0)
    assert ((torch.cov(w.T) - torch.eye(D, dtype=F64)).abs() < 4 * math.sqrt(2 / n)).all(), torch.cov(w.T)
    assert info.nfe == int(info.nfe_per_sample.max()) and info.sample_evals <= info.nfe * n


def test_ode_sampler_seed_denoise_and_start():
    sde = VESDE()
    score = G.score_fn(sde)
    a = ode_sampler(score, sde, (5, D), seed=3, rtol=1e-4, atol=1e-4)
    b = ode_sampler(score, sde, (5, D), seed=3, rtol=1e-4, atol=1e-4)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    from fastscore import sampling  # the public name forwards here

    assert torch.equal(sampling.ode_sampler(score, sde, (5, D), seed=3, rtol=1e-4, atol=1e-4), a)
    # denoise: one reverse-diffusion step at eps keeping its mean; for VE x + sigma_0^2 s(x, eps)
    start = counter_randn((5, D), seed=3, counter=1 << 62, dtype=F64) * sde.prior_std  # the PC sampler's prior
    plain, info = ode_sampler(score, sde, (5, D), x_init=start, dtype=F64, rtol=1e-4, atol=1e-4, return_info=True)
    den, info_d = ode_sampler(
        score, sde, (5, D), x_init=start, dtype=F64, rtol=1e-4, atol=1e-4, denoise=True, return_info=True
    )
    t = torch.full((5,), 1e-3, dtype=F64)
    want = plain + sde.discrete_sigmas[0].double() ** 2 * score(plain, t)
    torch.testing.assert_close(den, want, rtol=1e-6, atol=1e-6)
    assert info_d.nfe == info.nfe + 1
    torch.testing.assert_close(plain.float(), a, rtol=1e-4, atol=1e-4)
    # a sample's start does not depend on its batch: the last three of a, alone
    tail = ode_sampler(score, sde, (3, D), seed=3, sample_offset=2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tail, a[2:], rtol=1e-6, atol=1e-6)
    joint = ode_sampler(score, sde, (5, D), x_init=start, dtype=F64, rtol=1e-4, atol=1e-4, per_sample=False)
    torch.testing.assert_close(joint, plain, rtol=0, atol=5e-3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(score_fn=1), TypeError, "score_fn"),
        (dict(sde=None), TypeError, "sde"),
        (dict(eps=2.0), ValueError, "eps"),
        (dict(method="euler"), ValueError, "method"),
        (dict(denoise=1), TypeError, "denoise"),
        (dict(dtype=torch.int32), TypeError, "dtype"),
        (dict(x_init=torch.ones(3, D)), ValueError, "x_init"),
        (dict(seed="a"), TypeError, "seed"),
        (dict(atol=-1), ValueError, "atol"),
        (dict(score_fn=lambda x, t: -x[:, :1]), ValueError, "score_fn"),  # would broadcast
        (dict(x_init=torch.full((2, D), math.nan)), ValueError, "x_init: expected finite"),
        (dict(noise=1.5), TypeError, "noise"),
    ],
)
def test_ode_sampler_bad_arguments(kwargs, error, match):
    sde = VPSDE()
    args = dict(score_fn=budgeted(G.score_fn(sde)), sde=sde)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ode_sampler(args.pop("score_fn"), args.pop("sde"), (2, D), **args)


def test_ode_sampler_prior_from_a_generator():
    """noise=generator: the start is score_sde's prior_sampling draw, torch.randn(shape) times the prior std."""
    sde = VESDE()
    score = G.score_fn(sde)
    got = ode_sampler(score, sde, (3, D), rtol=1e-4, atol=1e-4, noise=torch.Generator().manual_seed(4))
    start = torch.randn((3, D), generator=torch.Generator().manual_seed(4)) * sde.prior_std
    want = ode_sampler(score, sde, (3, D), rtol=1e-4, atol=1e-4, x_init=start)
    assert torch.equal(got, want)
    state = torch.get_rng_state()
    ode_sampler(score, sde, (3, D), rtol=1e-4, atol=1e-4, noise=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state)  # no seed drawn from torch's generator


def test_every_sampler_and_estimator_checks_the_score_the_same_way():
    """A score of the wrong shape (here (N, 1) for (N, D) data, which would broadcast) is the same error,
    with the same message, from every sampler and from the likelihood."""
    from fastscore import sampling

    sde = VPSDE(N=25)
    x = G.sample(3).float()
    wrong_t = lambda x, t: -x[:, :1]  # noqa: E731
    calls = {
        "pc_sampler": lambda: sampling.pc_sampler(wrong_t, sde, (3, D), seed=0),
        "ode_sampler": lambda: ode_sampler(wrong_t, sde, (3, D), seed=0),
        "log_likelihood": lambda: log_likelihood(wrong_t, sde, x, seed=0),
        "langevin": lambda: sampling.langevin(lambda x: -x[:, :1], x, step_size=0.1, n_steps=2, seed=0),
        "annealed_langevin": lambda: sampling.annealed_langevin(wrong_t, x, [1.0], n_steps_each=2, step_lr=0.1),
        "annealed_langevin_inpainting": lambda: sampling.annealed_langevin_inpainting(wrong_t, x, x, x > 0, [1.0]),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == f"score_fn: returned shape (3, 1), expected x's shape (3, {D})", name


# ---- non-finite values stop the solver within a step ---------------------------------------------------------
# The solver used to loop forever on these (t became NaN and the minimum-step test never fired): the score
# functions are budgeted, so a solver that does not stop fails the test quickly instead of hanging it.


def test_nan_score_stops_ode_sampler_within_one_step():
    sde = VPSDE()
    score = budgeted(lambda x, t: x * math.nan)
    with pytest.raises(
        NonFiniteError, match=r"score_fn: returned NaN or Inf at t = \[1.0, 1.0\] for sample\(s\) \[0, 1\]"
    ):
        ode_sampler(score, sde, (2, D), seed=0)
    assert score.calls <= 2  # the initial evaluations, before any step

    def late(x, t):  # sample 1's score turns NaN once t < 0.5
        out = -x / 2
        return torch.where((t < 0.5)[:, None] & (torch.arange(x.shape[0])[:, None] == 1), math.nan, out)

    score = budgeted(late, budget=2000)
    with pytest.raises(NonFiniteError, match="score_fn: returned NaN or Inf") as info:
        ode_sampler(score, sde, (2, D), seed=0, per_sample=False, rtol=1e-3, atol=1e-3)
    assert info.value.samples == [1] and 0.0 < info.value.t[0] < 0.5


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_and_divergence_stop_log_likelihood(bad):
    sde = VESDE()
    x = G.sample(3)
    x[1, 2] = bad
    score = budgeted(G.score_fn(sde))
    with pytest.raises(ValueError, match=r"x: expected finite values, got NaN or Inf in sample\(s\) \[1\]"):
        log_likelihood(score, sde, x, seed=0)
    assert score.calls == 0
    # score_fn finite, its Jacobian not: sqrt(|x|) at x = 0
    score = budgeted(lambda x, t: -torch.sqrt(x.abs()))
    with pytest.raises(NonFiniteError, match="log_likelihood: the divergence estimate became NaN or Inf"):
        log_likelihood(score, sde, torch.zeros(2, D, dtype=F64), seed=0)
    assert score.calls <= 2
    score = budgeted(lambda x, t: G.score_fn(sde)(x, t) * (bad if float(t.min()) < 0.5 else 1.0), budget=5000)
    with pytest.raises(NonFiniteError, match=r"score_fn: returned NaN or Inf at t = .* \(log_likelihood\)"):
        log_likelihood(score, sde, G.sample(2), seed=0, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mode, n_probes", [("reverse", 3), ("forward", 1)])
def test_one_network_evaluation_per_right_hand_side(mode, n_probes):
    sde = VPSDE()
    score = G.score_fn(sde)
    calls = []

    def counted(x, t):
        calls.append(x.shape[0])
        return score(x, t)

    x = G.sample(5, seed=6)
    _, info = log_likelihood(counted, sde, x, n_probes=n_probes, seed=1, mode=mode, rtol=1e-4, return_info=True)
    assert len(calls) == info.nfe  # score_sde evaluates the network twice per right-hand side
    assert sum(calls) == info.sample_evals == int(info.nfe_per_sample.sum())


@pytest.mark.parametrize("name", list(SDES))
def test_probability_flow_drift_equals_the_reverse_sde(name):
    from fastscore.ode import probability_flow_drift as _pf_drift

    sde = SDES[name]()
    x, t = G.sample(5, seed=8), torch.rand(5, dtype=F64) * 0.9 + 0.05
    want = sde.reverse(G.score_fn(sde), probability_flow=True).sde(x, t)[0]
    torch.testing.assert_close(_pf_drift(sde, G.score_fn(sde), t, x)(x), want)

    class Opaque:  # an SDE without the linear-drift schedules goes through reverse()
        T = sde.T

        def reverse(self, score_fn, probability_flow=False):
            return sde.reverse(score_fn, probability_flow)

    torch.testing.assert_close(_pf_drift(Opaque(), G.score_fn(sde), t, x)(x), want)
