r"""2-D toy distributions for score models, with exact scores and log densities where they exist.

* :class:`GaussianMixture`: isotropic Gaussian components; ``log_prob`` and ``score`` are exact, also for
  the mixture convolved with :math:`N(0, \sigma^2 I)` (each component's variance becomes
  :math:`s_k^2 + \sigma^2`), which is the perturbed density a noise-conditional score model learns.
* :func:`ncsn_toy_mixture`: the NCSN paper's toy, :math:`0.8\,N((5, 5), I) + 0.2\,N((-5, -5), I)`
  (docs/numerics.md#the-toy-experiment). ncsn's own ``GMMDistAnneal`` gives its components std
  :math:`\sigma` instead of :math:`\sqrt{1 + \sigma^2}`; ``score(x, sigma)`` here is the exact one.
* :func:`toy_sample`: samples of ``gmm`` (that mixture), ``moons``, ``swissroll``, ``checkerboard`` and
  ``rings``, the usual 2-D benchmarks, made with torch alone (no scikit-learn).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fastscore import _validate

__all__ = ["GaussianMixture", "ncsn_toy_mixture", "toy_sample", "TOY_DATASETS"]

TOY_DATASETS = ("gmm", "moons", "swissroll", "checkerboard", "rings")


def _generator(seed) -> torch.Generator | None:
    seed = _validate.seed(seed)  # fastscore's one rule for seeds: None or an integer in [0, 2^64), numpy's too
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n: expected a non-negative integer, got {n!r}")
    return int(n)


class GaussianMixture:
    r""":math:`p(x) = \sum_k w_k\, N(x; \mu_k, s_k^2 I)` in D dimensions.

    ``means`` (K, D); ``stds`` (K,) or a number (isotropic components); ``weights`` (K,) non-negative,
    normalised here. Parameters are kept in float64; results have the dtype of ``x``.
    """

    def __init__(self, means, stds, weights):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means: expected shape (K, D), got {tuple(means.shape)}")
        K = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64)
        stds = stds.expand(K).clone() if stds.dim() == 0 else stds
        if stds.shape != (K,) or not bool((stds > 0).all()):
            raise ValueError(f"stds: expected {K} positive values (one per component), got {stds.tolist()}")
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or not bool((weights >= 0).all()) or not float(weights.sum()) > 0:
            raise ValueError(f"weights: expected {K} non-negative values with a positive sum, got {weights.tolist()}")
        if not all(bool(torch.isfinite(t).all()) for t in (means, stds, weights)):
            raise ValueError("means, stds, weights: expected finite values")
        self.means, self.stds, self.weights = means, stds, weights / weights.sum()
        self.dim = means.shape[1]

    def sample(self, n: int, seed: int | None = None) -> Tensor:
        """n samples (n, D) float32; ``seed`` makes them reproducible (else torch's default generator)."""
        n = _count(n)
        g = _generator(seed)
        k = torch.multinomial(self.weights, n, replacement=True, generator=g) if n else torch.zeros(0, dtype=torch.long)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=g)
        return (self.means[k] + self.stds[k, None] * z).to(torch.float32)

    def _component_terms(self, x: Tensor, sigma) -> tuple[Tensor, Tensor, Tensor]:
        """(log w_k N(x; mu_k, v_k I) (N, K), x - mu_k (N, K, D), v_k (1 or N, K)) with v_k = s_k^2 + sigma^2."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x: expected a floating tensor of shape (N, {self.dim}), got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x: expected shape (N, {self.dim}), got {tuple(x.shape)}")
        dev, dt = x.device, x.dtype
        if isinstance(sigma, Tensor):
            if sigma.shape not in ((), (x.shape[0],)):
                raise ValueError(
                    f"sigma: expected a number or a tensor of shape ({x.shape[0]},), got {tuple(sigma.shape)}"
                )
            sig2 = sigma.to(dev, dt).reshape(-1, 1) ** 2
        else:
            if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not sigma >= 0:
                raise ValueError(f"sigma: expected a non-negative number, got {sigma!r}")
            sig2 = torch.full((1, 1), float(sigma) ** 2, dtype=dt, device=dev)
        v = self.stds.to(dev, dt) ** 2 + sig2  # (1 or N, K): broadcast, never expanded (slow elementwise paths)
        diff = x[:, None, :] - self.means.to(dev, dt)  # (N, K, D)
        log_comp = (
            self.weights.to(dev, dt).log()
            - 0.5 * self.dim * torch.log(2 * math.pi * v)
            - diff.square().sum(-1) / (2 * v)
        )
        return log_comp, diff, v

    def log_prob(self, x: Tensor, sigma=0.0) -> Tensor:
        r"""Exact :math:`\log p_\sigma(x)` (N,) of the mixture convolved with :math:`N(0, \sigma^2 I)`;
        ``sigma`` a number or an (N,) tensor."""
        log_comp, _, _ = self._component_terms(x, sigma)
        return torch.logsumexp(log_comp, dim=1)

    def score(self, x: Tensor, sigma=0.0) -> Tensor:
        r"""Exact :math:`\nabla_x \log p_\sigma(x)` (N, D): :math:`\sum_k r_k(x) (\mu_k - x) / (s_k^2 +
        \sigma^2)` with the responsibilities :math:`r_k`; ``sigma`` a number or an (N,) tensor."""
        log_comp, diff, v = self._component_terms(x, sigma)
        resp = torch.softmax(log_comp, dim=1)
        return -(resp[:, :, None] * diff / v[:, :, None]).sum(1)


def ncsn_toy_mixture() -> GaussianMixture:
    """The NCSN paper's toy: 0.8 N((5, 5), I) + 0.2 N((-5, -5), I)."""
    return GaussianMixture([[5.0, 5.0], [-5.0, -5.0]], 1.0, [0.8, 0.2])


def _moons(n: int, g) -> Tensor:
    n_out = n // 2
    theta = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    outer = torch.stack([theta.cos(), theta.sin()], 1)
    inner = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], 1)
    x = torch.where((torch.arange(n) < n_out)[:, None], outer, inner)
    return x + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)


def _swissroll(n: int, g) -> Tensor:
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    x = torch.stack([t * t.cos(), t * t.sin()], 1) / 5.0
    return x + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)


def _checkerboard(n: int, g) -> Tensor:
    x1 = 4 * torch.rand(n, generator=g, dtype=torch.float64) - 2
    row = torch.randint(0, 2, (n,), generator=g).to(torch.float64)
    x2 = torch.rand(n, generator=g, dtype=torch.float64) - 2 * row + torch.floor(x1) % 2
    return 2 * torch.stack([x1, x2], 1)


def _rings(n: int, g) -> Tensor:
    ring = torch.randint(0, 4, (n,), generator=g).to(torch.float64)
    theta = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    radius = (ring + 1) * 0.75
    x = radius[:, None] * torch.stack([theta.cos(), theta.sin()], 1)
    return x + 0.08 * torch.randn(n, 2, generator=g, dtype=torch.float64)


def toy_sample(name: str, n: int, seed: int | None = None) -> Tensor:
    """n samples (n, 2) float32 of a toy data set: one of :data:`TOY_DATASETS` (``gmm`` is
    :func:`ncsn_toy_mixture`). ``seed`` makes them reproducible (else torch's default generator)."""
    if name not in TOY_DATASETS:
        raise ValueError(f"name: expected one of {', '.join(TOY_DATASETS)}, got {name!r}")
    n = _count(n)
    if name == "gmm":
        return ncsn_toy_mixture().sample(n, seed=seed)
    g = _generator(seed)
    make = {"moons": _moons, "swissroll": _swissroll, "checkerboard": _checkerboard, "rings": _rings}[name]
    return make(n, g).to(torch.float32)
