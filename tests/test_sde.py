"""fastscore.sde against score_sde's formulas (docs/numerics.md#forward-sdes) and the SDEs' own calculus."""

import math

import pytest
import torch

from fastscore import sde as sde_lib


def all_sdes(N=50):
    return [sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=N), sde_lib.VPSDE(N=N), sde_lib.subVPSDE(N=N)]


def test_score_sde_formulas():
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64)
    ve, vp, svp = all_sdes()
    sigma = 0.01 * (50 / 0.01) ** t
    drift, g = ve.sde(x, t)
    assert torch.equal(drift, torch.zeros_like(x))
    torch.testing.assert_close(g, sigma * math.sqrt(2 * (math.log(50) - math.log(0.01))))
    mean, std = ve.marginal_prob(x, t)
    torch.testing.assert_close(mean, x)
    torch.testing.assert_close(std, sigma)
    beta = 0.1 + t * 19.9
    lmc = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    for s in (vp, svp):
        drift, g = s.sde(x, t)
        torch.testing.assert_close(drift, -0.5 * beta[:, None, None, None] * x)
        mean, std = s.marginal_prob(x, t)
        torch.testing.assert_close(mean, torch.exp(lmc)[:, None, None, None] * x)
    torch.testing.assert_close(vp.sde(x, t)[1], torch.sqrt(beta))
    torch.testing.assert_close(svp.sde(x, t)[1], torch.sqrt(beta * (1 - torch.exp(-2 * 0.1 * t - 19.9 * t**2))))
    torch.testing.assert_close(vp.marginal_prob(x, t)[1], torch.sqrt(1 - torch.exp(2 * lmc)))
    torch.testing.assert_close(svp.marginal_prob(x, t)[1], 1 - torch.exp(2 * lmc))


def test_discrete_tables_and_discretize():
    ve, vp, _ = all_sdes(N=1000)
    assert ve.discrete_sigmas.dtype == torch.float32 and ve.discrete_sigmas[0] < ve.discrete_sigmas[-1]
    torch.testing.assert_close(
        ve.discrete_sigmas.double(),
        torch.exp(torch.linspace(math.log(0.01), math.log(50), 1000, dtype=torch.float64)),
        rtol=1e-6,
        atol=0,
    )
    torch.testing.assert_close(vp.discrete_betas, torch.linspace(0.1 / 1000, 20 / 1000, 1000))
    x = torch.randn(4, 3)
    t = torch.tensor([1.0, 0.5, 1e-5, 0.0])
    i = (t * 999).long()
    f, G = ve.discretize(x, t)
    prev = torch.where(i == 0, torch.zeros(4), ve.discrete_sigmas[(i - 1).clamp_min(0)])
    assert torch.equal(f, torch.zeros_like(x))
    torch.testing.assert_close(G, torch.sqrt(ve.discrete_sigmas[i] ** 2 - prev**2))
    f, G = vp.discretize(x, t)
    torch.testing.assert_close(f, torch.sqrt(vp.alphas[i])[:, None] * x - x)
    torch.testing.assert_close(G, torch.sqrt(vp.discrete_betas[i]))
    svp = sde_lib.subVPSDE(N=1000)  # Euler-Maruyama discretisation
    f, G = svp.discretize(x, t)
    drift, g = svp.sde(x, t)
    torch.testing.assert_close(f, drift / 1000)
    torch.testing.assert_close(G, g * math.sqrt(1 / 1000))


@pytest.mark.parametrize("index", range(3))
def test_marginals_solve_the_moment_odes(index):
    """d mean_coef / dt = f_a mean_coef and d var / dt = 2 f_a var + g^2 (central differences, float64)."""
    s = all_sdes()[index]
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-5
    one = torch.ones(19, 1, dtype=torch.float64)

    def moments(tt):
        mean, std = s.marginal_prob(one, tt)
        return mean[:, 0], std**2

    (m_hi, v_hi), (m_lo, v_lo), (m, v) = moments(t + h), moments(t - h), moments(t)
    fa = torch.as_tensor(s.drift_coef(t), dtype=torch.float64)
    g = s.diffusion_coef(t)
    torch.testing.assert_close((m_hi - m_lo) / (2 * h), fa * m, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close((v_hi - v_lo) / (2 * h), 2 * fa * v + g**2, rtol=1e-5, atol=1e-6)


def test_prior_sampling_and_logp():
    for s in all_sdes():
        z = s.prior_sampling((4000, 2), generator=torch.Generator().manual_seed(0))
        assert z.shape == (4000, 2) and z.dtype == torch.float32
        assert abs(z.std().item() / s.prior_std - 1) < 0.05
        zz = torch.randn(3, 2, 2, 2, dtype=torch.float64)
        ref = torch.distributions.Normal(0.0, s.prior_std).log_prob(zz).sum((1, 2, 3))
        torch.testing.assert_close(s.prior_logp(zz), ref)
        torch.testing.assert_close(s.prior_logp(zz.reshape(3, 8)), ref)  # vectors too (score_sde: 4-D only)
    a = sde_lib.VPSDE().prior_sampling((2, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert a.dtype == torch.float64


def test_reverse_sde_and_probability_flow():
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    for s in all_sdes():
        score_fn = lambda x, t: -2.0 * x  # noqa: E731
        drift, g = s.sde(x, t)
        rdrift, rg = s.reverse(score_fn).sde(x, t)
        torch.testing.assert_close(rdrift, drift - g[:, None] ** 2 * (-2.0 * x))
        torch.testing.assert_close(rg, g)
        pdrift, pg = s.reverse(score_fn, probability_flow=True).sde(x, t)
        torch.testing.assert_close(pdrift, drift - 0.5 * g[:, None] ** 2 * (-2.0 * x))
        assert torch.equal(pg, torch.zeros_like(g))
        f, G = s.discretize(x, t)
        rf, rG = s.reverse(score_fn).discretize(x, t)
        torch.testing.assert_close(rf, f - G[:, None] ** 2 * (-2.0 * x))
        rev = s.reverse(score_fn)
        assert rev.N == s.N and rev.T == 1.0 and rev.marginal_prob is not None
    assert sde_lib.VESDE().reverse(lambda x, t: x).discrete_sigmas.shape == (1000,)  # forwarded to the SDE


@pytest.mark.parametrize(
    "name,call",
    [
        ("N", lambda: sde_lib.VESDE(N=0)),
        ("sigma_max", lambda: sde_lib.VESDE(sigma_min=1.0, sigma_max=0.5)),
        ("sigma_min", lambda: sde_lib.VESDE(sigma_min=-1.0)),
        ("beta_max", lambda: sde_lib.VPSDE(beta_min=1.0, beta_max=0.5)),
        ("beta_max", lambda: sde_lib.VPSDE(N=10)),
        ("beta_max", lambda: sde_lib.subVPSDE(N=10)),  # beta_max / N >= 1: 1 - beta_i (the correctors' alpha) <= 0
        ("beta_max", lambda: sde_lib.subVPSDE(beta_min=0.1, beta_max=20.0, N=20)),  # exactly 1
        ("t", lambda: sde_lib.VPSDE().sde(torch.ones(3, 2), torch.ones(2))),
        ("t", lambda: sde_lib.VPSDE().marginal_prob(torch.ones(3, 2), torch.ones(3, dtype=torch.long))),
        ("x", lambda: sde_lib.VESDE().discretize([1.0], torch.ones(1))),
        ("shape", lambda: sde_lib.VESDE().prior_sampling((-1, 2))),
        ("score_fn", lambda: sde_lib.VESDE().reverse(3)),
    ],
)
def test_bad_arguments_name_the_argument(name, call):
    with pytest.raises((TypeError, ValueError), match=name):
        call()
