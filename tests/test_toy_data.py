"""Toy distributions: exact scores and log densities, samples, argument checks."""

import math

import pytest
import torch

from fastscore.data import TOY_DATASETS
from fastscore.data import GaussianMixture
from fastscore.data import ncsn_toy_mixture
from fastscore.data import toy_sample


def test_score_is_the_gradient_of_log_prob_for_every_sigma():
    gmm = GaussianMixture([[1.0, 0.0], [-2.0, 1.0], [0.0, 3.0]], [0.5, 1.0, 0.8], [0.2, 0.5, 0.3])
    x = torch.randn(7, 2, dtype=torch.float64) * 2
    for sigma in (0.0, 0.7, torch.linspace(0.1, 3.0, 7, dtype=torch.float64)):
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(gmm.log_prob(xr, sigma).sum(), xr)
        torch.testing.assert_close(gmm.score(x, sigma), grad)


def test_log_prob_is_the_convolved_mixture_density():
    gmm = ncsn_toy_mixture()
    x = torch.randn(6, 2, dtype=torch.float64) * 4
    for sigma in (0.0, 2.0):
        v = 1.0 + sigma**2
        comps = [
            torch.distributions.MultivariateNormal(
                torch.tensor(m, dtype=torch.float64), v * torch.eye(2, dtype=torch.float64)
            )
            for m in ([5.0, 5.0], [-5.0, -5.0])
        ]
        ref = torch.logsumexp(
            torch.stack([math.log(0.8) + comps[0].log_prob(x), math.log(0.2) + comps[1].log_prob(x)]), 0
        )
        torch.testing.assert_close(gmm.log_prob(x, sigma), ref)
    # Integrates to one (grid over [-12, 12]^2).
    g = torch.linspace(-12, 12, 481, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    mass = gmm.log_prob(grid).exp().sum().item() * (g[1] - g[0]).item() ** 2
    assert abs(mass - 1) < 1e-3


def test_samples_follow_the_weights_and_are_reproducible():
    gmm = ncsn_toy_mixture()
    a, b = gmm.sample(4000, seed=3), gmm.sample(4000, seed=3)
    assert torch.equal(a, b) and a.dtype == torch.float32
    frac = (a.sum(1) > 0).float().mean().item()
    assert abs(frac - 0.8) < 5 * math.sqrt(0.16 / 4000)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_sample(name):
    x = toy_sample(name, 500, seed=1)
    assert x.shape == (500, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, toy_sample(name, 500, seed=1))
    assert not torch.equal(x, toy_sample(name, 500, seed=2))
    assert 0.1 < x.std().item() < 10
    assert toy_sample(name, 0, seed=1).shape == (0, 2)


@pytest.mark.parametrize(
    "name,call",
    [
        ("name", lambda: toy_sample("spirals", 10)),
        ("n", lambda: toy_sample("moons", -1)),
        ("seed", lambda: toy_sample("moons", 3, seed=-2)),
        ("means", lambda: GaussianMixture([1.0, 2.0], 1.0, [1.0])),
        ("stds", lambda: GaussianMixture([[0.0, 0.0]], [-1.0], [1.0])),
        ("weights", lambda: GaussianMixture([[0.0, 0.0]], 1.0, [-1.0])),
        ("x", lambda: ncsn_toy_mixture().score(torch.ones(3, 3))),
        ("sigma", lambda: ncsn_toy_mixture().score(torch.ones(3, 2), torch.ones(2))),
    ],
)
def test_bad_arguments_name_the_argument(name, call):
    with pytest.raises((TypeError, ValueError), match=name):
        call()
