r"""The forward SDEs of score_sde (docs/numerics.md#forward-sdes): VE, VP and sub-VP.

Each SDE :math:`dx = f(x, t)\,dt + g(t)\,dw` on :math:`t \in [0, T]`, ``T = 1``, with ``N`` discretisation
steps, offers score_sde's methods with its semantics:

- ``sde(x, t) -> (drift, diffusion)``: drift (x's shape) and diffusion :math:`g(t)` of shape (N,);
- ``marginal_prob(x, t) -> (mean, std)``: the perturbation kernel :math:`p_{0t}(x(t) | x(0))`, std (N,);
- ``prior_sampling(shape, generator=None)`` and ``prior_logp(z)`` (per-sample log density, (N,));
- ``discretize(x, t) -> (f, G)``: the discrete update :math:`x_{i+1} = x_i + f + G z` (SMLD for VE, DDPM
  for VP, Euler-Maruyama otherwise);
- ``reverse(score_fn, probability_flow=False)``: the reverse-time SDE (or the probability-flow ODE), an
  object with the same ``sde`` / ``discretize`` methods, built on ``score_fn(x, t)``.

``x`` is (N, ...) -- images (N, C, H, W) or vectors (N, D) -- and ``t`` a float tensor of shape (N,), one
time per sample (a 0-d tensor or a Python float is broadcast to every sample). Per-sample quantities are
returned as (N,) tensors, as in score_sde; they broadcast against x through :func:`batch_view`.

The drift of all three SDEs is linear in x, :math:`f(x, t) = f_a(t)\,x`; the samplers use the scalar
schedules (``drift_coef(t)``, ``diffusion_coef(t)``, the discrete tables) to precompute their per-step
coefficients once instead of evaluating ``sde(x, t)`` on the whole batch every step.

Deviations from score_sde_pytorch's ``sde_lib.py``, fixes of its known bugs
(docs/numerics.md#known-bugs-of-the-originals):

1. ``discretize`` (and the samplers) index the discrete tables on ``t``'s device: score_sde indexes a CPU
   table with device indices, which fails on recent PyTorch (score_sde_pytorch#43, #65).
2. ``prior_logp`` sums over every non-batch dim, so it works for (N, D) vectors as well as images
   (score_sde's VE version sums dims 1-3 and so requires 4-D input).
3. ``reverse(...)`` returns an object that keeps the forward SDE (``.forward``) and forwards attribute
   reads to it (``discrete_sigmas``, ``alphas``, ...); score_sde's dynamic subclass skips the parent's
   ``__init__`` so those attributes are missing on it.
4. ``prior_sampling`` takes an optional ``generator`` (score_sde always draws from torch's global CPU
   generator) and ``device`` / ``dtype``; by default it draws on the CPU in float32, as score_sde does.
5. :class:`subVPSDE` carries the VP discrete tables (``discrete_betas``, ``alphas``) too: score_sde's
   Langevin and ALD correctors read ``sde.alphas`` for sub-VP SDEs, which its subVPSDE lacks (an
   AttributeError there); the value used is VP's :math:`\alpha_i = 1 - \beta_i`.

Everything else follows score_sde: the discrete tables are computed in float32 torch (VE
``discrete_sigmas = exp(linspace(ln sigma_min, ln sigma_max, N))`` ascending; VP ``discrete_betas =
linspace(beta_min / N, beta_max / N, N)``), the discrete index of ``t`` is the truncation
``long(t (N - 1) / T)``, the VE marginal std ignores the :math:`\sigma(0)` offset, and the sub-VP marginal
std is :math:`1 - e^{2\,\mathrm{lmc}}` (no square root: that is the std of the sub-VP kernel).
"""

from __future__ import annotations

import abc
import math
import numbers

import torch
from torch import Tensor

from fastscore import _validate

__all__ = ["SDE", "VESDE", "VPSDE", "subVPSDE", "ReverseSDE", "batch_view", "check_sde", "sampling_eps"]


def batch_view(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample (N,) tensor viewed as (N, 1, ..., 1) so that it broadcasts against x (N, ...)."""
    if v.dim() == 0:
        return v
    return v.reshape((v.shape[0],) + (1,) * (x.dim() - 1))


def _times(t, x: Tensor) -> Tensor:
    """t as a float tensor on x's device of shape (N,) (or 0-d), checked against x's batch size.

    Only metadata is checked: a value check would cost a device sync on every solver evaluation."""
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
    if not isinstance(t, Tensor):
        raise TypeError(f"t: expected a float tensor of shape (N,), got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"t: expected a floating tensor, got {t.dtype}")
    if t.dim() != 0 and tuple(t.shape) != (x.shape[0],):
        raise ValueError(f"t: expected shape ({x.shape[0]},) (one time per sample of x), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"t: expected a tensor on x's device {x.device}, got {t.device}")
    return t


# What an SDE must provide to be integrated (the ODE sampler, the likelihood); the PC sampler also reads
# the discrete schedules of the classes here.
_INTERFACE = ("sde", "marginal_prob", "prior_sampling", "prior_logp", "reverse", "T")


def check_sde(sde, name: str = "sde", *, schedules: bool = False, needs: tuple[str, ...] = _INTERFACE):
    """sde, checked: an instance of this module's SDE classes (required when ``schedules``: the samplers that
    tabulate the discrete sigmas or betas), or any object with the methods ``needs`` (by default the whole
    SDE interface: ``sde``, ``marginal_prob``, ``prior_sampling``, ``prior_logp``, ``reverse``, ``T``; score_sde's
    own SDE classes have it). The one SDE check of every sampler, likelihood and loss."""
    if isinstance(sde, SDE):
        return sde
    if schedules:
        raise TypeError(f"{name}: expected a fastscore.sde VESDE, VPSDE or subVPSDE, got {type(sde).__name__}")
    missing = [attr for attr in needs if not hasattr(sde, attr)]
    if missing:
        raise TypeError(
            f"{name}: expected an SDE (fastscore.sde VESDE, VPSDE, subVPSDE, or an object with "
            f"{', '.join(needs)}), got {type(sde).__name__} without {', '.join(missing)}"
        )
    return sde


def sampling_eps(sde, eps=None) -> float:
    """The last time of a sampler's grid: ``eps`` checked (a number in (0, T)), or the default for the SDE --
    score_sde's run_lib, 1e-5 for VE SDEs and 1e-3 for the others (VP, sub-VP: their scores grow like
    1/sqrt(t) near 0, so integrating closer to 0 costs steps and precision for nothing visible)."""
    if eps is None:
        return 1e-5 if isinstance(sde, VESDE) else 1e-3
    eps = _validate.number(eps, "eps", low=0.0, strict=True)
    if eps >= sde.T:
        raise ValueError(f"eps: expected a time below sde.T = {sde.T}, got {eps}")
    return eps


def _check_x(x, name: str = "x") -> Tensor:
    return _validate.batch(x, name)


class SDE(abc.ABC):
    """Base class: a forward SDE with linear drift :math:`f_a(t) x` and diffusion :math:`g(t)` on [0, T].

    Subclasses define ``drift_coef(t)`` (:math:`f_a`), ``diffusion_coef(t)`` (:math:`g`),
    ``marginal_prob``, ``prior_sampling``, ``prior_logp`` and, where a model-specific discretisation
    exists, ``discretize``. ``N`` is the number of discretisation steps, ``T = 1``.
    """

    T: float = 1.0
    prior_std: float = 1.0  # the prior is N(0, prior_std^2 I)

    def __init__(self, N: int):
        self.N = _validate.integer(N, "N", low=1)
        self._tables: dict[tuple, dict[str, Tensor]] = {}

    # -- schedules (t a tensor or a float; the result has t's shape) -------------------------------------
    @abc.abstractmethod
    def drift_coef(self, t):
        """:math:`f_a(t)` with :math:`f(x, t) = f_a(t)\\,x`."""

    @abc.abstractmethod
    def diffusion_coef(self, t):
        """:math:`g(t)`."""

    # -- score_sde's interface ----------------------------------------------------------------------------
    def sde(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        """(drift (x's shape), diffusion (N,)) of the forward SDE at per-sample times t (N,)."""
        x = _check_x(x)
        t = _times(t, x)
        return batch_view(self.drift_coef(t), x) * x, self.diffusion_coef(t)

    @abc.abstractmethod
    def marginal_prob(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        """(mean (x's shape), std (N,)) of :math:`p_{0t}(x(t) | x(0) = x)`."""

    @abc.abstractmethod
    def prior_sampling(self, shape, generator: torch.Generator | None = None, *, device=None, dtype=None) -> Tensor:
        """A sample of the prior :math:`p_T` of the given shape (N, ...)."""

    @abc.abstractmethod
    def prior_logp(self, z: Tensor) -> Tensor:
        """Per-sample log density (N,) of the prior at z (N, ...), summed over every non-batch dim."""

    def discretize(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        r"""Euler-Maruyama: :math:`f = f(x, t)\,\Delta t`, :math:`G = g(t)\sqrt{\Delta t}`, :math:`\Delta t =
        T / N`; returns (f (x's shape), G (N,))."""
        drift, diffusion = self.sde(x, t)
        dt = self.T / self.N
        return drift * dt, diffusion * math.sqrt(dt)

    def reverse(self, score_fn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (or, with ``probability_flow=True``, the probability-flow ODE) driven by
        ``score_fn(x, t)``: an object with ``sde(x, t)``, ``discretize(x, t)``, ``N``, ``T``."""
        return ReverseSDE(self, score_fn, probability_flow)

    # -- helpers ------------------------------------------------------------------------------------------
    def discrete_index(self, t: Tensor) -> Tensor:
        """score_sde's discrete step index of t: the truncation ``long(t (N - 1) / T)`` (int64, t's shape)."""
        return (t * (self.N - 1) / self.T).long()

    def _table(self, name: str, device) -> Tensor:
        # The float32 tables live on the CPU; copies per device are cached so that discretize indexes a
        # table on t's device (score_sde's device-mismatch bug, score_sde_pytorch#43).
        key = (str(torch.device(device)),)
        per_device = self._tables.setdefault(key, {})
        if name not in per_device:
            per_device[name] = getattr(self, name).to(device)
        return per_device[name]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._args().items())
        return f"{type(self).__name__}({args})"

    def _args(self) -> dict:
        return {"N": self.N}


class VESDE(SDE):
    r"""Variance exploding SDE (SMLD / NCSN): :math:`dx = \sigma(t)\sqrt{2 \ln(\sigma_{max}/\sigma_{min})}\,dw`
    with :math:`\sigma(t) = \sigma_{min} (\sigma_{max}/\sigma_{min})^t`.

    Marginal: mean x, std :math:`\sigma(t)`; prior :math:`N(0, \sigma_{max}^2 I)`. ``discrete_sigmas``
    (float32, ascending, N entries) are the SMLD noise levels; ``discretize`` is the SMLD update
    :math:`f = 0`, :math:`G = \sqrt{\sigma_i^2 - \sigma_{i-1}^2}` with :math:`\sigma_{-1} = 0`.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        sigma_min = _validate.number(sigma_min, "sigma_min", low=0.0, strict=True)
        sigma_max = _validate.number(sigma_max, "sigma_max", low=0.0, strict=True)
        if sigma_max <= sigma_min:
            raise ValueError(f"sigma_max: expected a value above sigma_min={sigma_min}, got {sigma_max}")
        super().__init__(N)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.discrete_sigmas = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), self.N))
        self.prior_std = sigma_max
        self._log_ratio = math.log(sigma_max / sigma_min)

    def _args(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "N": self.N}

    def sigma(self, t):
        r""":math:`\sigma(t) = \sigma_{min} (\sigma_{max}/\sigma_{min})^t` (t a tensor or a float).

        For a tensor, computed as :math:`\sigma_{min} \exp(t \ln(\sigma_{max}/\sigma_{min}))` in float64 and
        rounded once to t's dtype: on the CPU, ATen's ``pow`` leaves the last elements of a tensor (those past
        the last full vector) to a scalar routine whose results differ from its vectorised one in the last bit,
        so a sample's sigma, and then its ODE trajectory and likelihood, would depend on where it sits in its
        batch; ``exp`` is computed alike at every position (docs/distributed.md#what-is-bitwise)."""
        if isinstance(t, Tensor):
            wide = t if t.dtype == torch.float64 else t.to(torch.float64)
            return (torch.exp(wide * self._log_ratio) * self.sigma_min).to(t.dtype)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** float(t)

    def drift_coef(self, t):
        return t * 0.0 if isinstance(t, Tensor) else 0.0

    def diffusion_coef(self, t):
        return self.sigma(t) * math.sqrt(2 * self._log_ratio)

    def sde(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        x = _check_x(x)
        t = _times(t, x)
        return torch.zeros_like(x), self.diffusion_coef(t)

    def marginal_prob(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        x = _check_x(x)
        t = _times(t, x)
        std = self.sigma(t)
        return x, std.expand(x.shape[0]) if std.dim() == 0 else std

    def prior_sampling(self, shape, generator: torch.Generator | None = None, *, device=None, dtype=None) -> Tensor:
        shape = _validate.shape(shape)
        gen_device = generator.device if generator is not None else "cpu"
        z = torch.randn(shape, generator=generator, device=gen_device)
        return (z * self.sigma_max).to(device=device or gen_device, dtype=dtype or z.dtype)

    def prior_logp(self, z: Tensor) -> Tensor:
        z = _check_x(z, "z")
        D = math.prod(z.shape[1:])
        dims = tuple(range(1, z.dim()))
        sq = z.square().sum(dim=dims) if dims else z.square()
        return -D / 2.0 * math.log(2 * math.pi * self.sigma_max**2) - sq / (2 * self.sigma_max**2)

    def discretize(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        x = _check_x(x)
        t = _times(t, x)
        i = self.discrete_index(t)
        sigmas = self._table("discrete_sigmas", t.device)
        sigma = sigmas[i]
        prev = torch.where(i == 0, torch.zeros_like(sigma), sigmas[(i - 1).clamp_min(0)])
        return torch.zeros_like(x), torch.sqrt(sigma**2 - prev**2)


class _LinearBetaSDE(SDE):
    r"""What the VP and sub-VP SDEs share: :math:`\beta(t) = \beta_0 + t (\beta_1 - \beta_0)`, its N
    discrete (float32) values ``discrete_betas`` :math:`\beta_i` and ``alphas`` :math:`1 - \beta_i`, the
    drift :math:`-\tfrac12 \beta(t) x`, the log mean coefficient and the prior :math:`N(0, I)`."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        beta_min = _validate.number(beta_min, "beta_min")
        beta_max = _validate.number(beta_max, "beta_max")
        if beta_min < 0:
            raise ValueError(f"beta_min: expected a non-negative number, got {beta_min}")
        if beta_max < beta_min:
            raise ValueError(f"beta_max: expected a value >= beta_min={beta_min}, got {beta_max}")
        super().__init__(N)
        self.beta_0, self.beta_1 = beta_min, beta_max
        self.discrete_betas = torch.linspace(beta_min / self.N, beta_max / self.N, self.N)
        # Both SDEs use the discrete betas as probabilities: VP's DDPM update and sqrt(alpha_i), and the
        # Langevin / ALD correctors' alpha_i = 1 - beta_i (sub-VP too), which must stay positive.
        if self.discrete_betas.max().item() >= 1.0:
            raise ValueError(f"beta_max: beta_max / N = {self.beta_1 / self.N} must be below 1 (discrete betas)")
        self.alphas = 1.0 - self.discrete_betas

    def _args(self) -> dict:
        return {"beta_min": self.beta_0, "beta_max": self.beta_1, "N": self.N}

    def beta(self, t):
        r""":math:`\beta(t) = \beta_0 + t (\beta_1 - \beta_0)`."""
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def log_mean_coeff(self, t):
        r""":math:`\mathrm{lmc}(t) = -\tfrac14 t^2 (\beta_1 - \beta_0) - \tfrac12 t \beta_0`."""
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def drift_coef(self, t):
        return -0.5 * self.beta(t)

    def prior_sampling(self, shape, generator: torch.Generator | None = None, *, device=None, dtype=None) -> Tensor:
        shape = _validate.shape(shape)
        gen_device = generator.device if generator is not None else "cpu"
        z = torch.randn(shape, generator=generator, device=gen_device)
        return z.to(device=device or gen_device, dtype=dtype or z.dtype)

    def prior_logp(self, z: Tensor) -> Tensor:
        z = _check_x(z, "z")
        D = math.prod(z.shape[1:])
        dims = tuple(range(1, z.dim()))
        sq = z.square().sum(dim=dims) if dims else z.square()
        return -D / 2.0 * math.log(2 * math.pi) - sq / 2.0

    def _marginal(self, x: Tensor, t, std_of_lmc) -> tuple[Tensor, Tensor]:
        x = _check_x(x)
        t = _times(t, x)
        lmc = self.log_mean_coeff(t)
        mean = torch.exp(batch_view(lmc, x)) * x
        std = std_of_lmc(lmc)
        return mean, std.expand(x.shape[0]) if std.dim() == 0 else std


class VPSDE(_LinearBetaSDE):
    r"""Variance preserving SDE (DDPM): :math:`dx = -\tfrac12 \beta(t) x\,dt + \sqrt{\beta(t)}\,dw` with
    :math:`\beta(t) = \beta_0 + t (\beta_1 - \beta_0)`.

    Marginal: with :math:`\mathrm{lmc} = -\tfrac14 t^2 (\beta_1 - \beta_0) - \tfrac12 t \beta_0`, mean
    :math:`e^{\mathrm{lmc}} x`, std :math:`\sqrt{1 - e^{2\,\mathrm{lmc}}}`; prior :math:`N(0, I)`. Discrete
    (float32) tables: ``discrete_betas`` :math:`\beta_i`, ``alphas`` :math:`1 - \beta_i`,
    ``alphas_cumprod``, ``sqrt_alphas_cumprod``, ``sqrt_1m_alphas_cumprod``; ``discretize`` is the DDPM
    update :math:`f = (\sqrt{\alpha_i} - 1) x`, :math:`G = \sqrt{\beta_i}`.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(beta_min, beta_max, N)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_1m_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)

    def diffusion_coef(self, t):
        b = self.beta(t)
        return torch.sqrt(b) if isinstance(b, Tensor) else math.sqrt(b)

    def marginal_prob(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        return self._marginal(x, t, lambda lmc: torch.sqrt(1.0 - torch.exp(2.0 * lmc)))

    def discretize(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        x = _check_x(x)
        t = _times(t, x)
        i = self.discrete_index(t)
        beta = self._table("discrete_betas", t.device)[i]
        alpha = self._table("alphas", t.device)[i]
        f = batch_view(torch.sqrt(alpha), x) * x - x
        return f, torch.sqrt(beta)


class subVPSDE(_LinearBetaSDE):
    r"""Sub-variance-preserving SDE: drift :math:`-\tfrac12 \beta(t) x`, diffusion
    :math:`\sqrt{\beta(t) (1 - e^{-2 \beta_0 t - (\beta_1 - \beta_0) t^2})}`.

    Marginal: mean :math:`e^{\mathrm{lmc}} x`, std :math:`1 - e^{2\,\mathrm{lmc}}` (lmc as for
    :class:`VPSDE`); prior :math:`N(0, I)`; ``discretize`` is the Euler-Maruyama update (score_sde defines
    no discrete model for it).
    """

    def diffusion_coef(self, t):
        expo = -2.0 * self.beta_0 * t - (self.beta_1 - self.beta_0) * t**2
        if isinstance(t, Tensor):
            return torch.sqrt(self.beta(t) * -torch.expm1(expo))
        return math.sqrt(self.beta(t) * -math.expm1(expo))

    def marginal_prob(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        return self._marginal(x, t, lambda lmc: 1.0 - torch.exp(2.0 * lmc))


class ReverseSDE:
    r"""The reverse-time SDE of ``forward`` driven by ``score_fn(x, t)`` (score_sde's ``RSDE``).

    ``sde(x, t)``: drift :math:`f - g^2 s(x, t)\,(\tfrac12` for the probability-flow ODE, else 1), diffusion
    g (zeros for the ODE). ``discretize(x, t)``: :math:`f_{rev} = f - G^2 s\,(\tfrac12` or 1),
    :math:`G_{rev} = G` (0 for the ODE). Attributes not defined here (``discrete_sigmas``, ``alphas``,
    ``marginal_prob``, ...) are read from the forward SDE.
    """

    def __init__(self, forward: SDE, score_fn, probability_flow: bool = False):
        if not callable(score_fn):
            raise TypeError(f"score_fn: expected a callable score_fn(x, t), got {type(score_fn).__name__}")
        if not isinstance(probability_flow, bool):
            raise TypeError(f"probability_flow: expected a bool, got {type(probability_flow).__name__}")
        self.forward, self.score_fn, self.probability_flow = forward, score_fn, probability_flow
        self.N, self.T = forward.N, forward.T

    def __getattr__(self, name):
        # Only reached for names not set on self: the forward SDE's tables and methods.
        if name in ("forward", "score_fn", "probability_flow"):
            raise AttributeError(name)
        return getattr(self.forward, name)

    def sde(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        x = _check_x(x)
        t = _times(t, x)
        drift, diffusion = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        drift = drift - batch_view(diffusion**2 * weight, x) * score
        return drift, torch.zeros_like(diffusion) if self.probability_flow else diffusion

    def discretize(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        x = _check_x(x)
        t = _times(t, x)
        f, G = self.forward.discretize(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        rev_f = f - batch_view(G**2 * weight, x) * self.score_fn(x, t)
        return rev_f, torch.zeros_like(G) if self.probability_flow else G

    def __repr__(self) -> str:
        kind = "probability flow ODE" if self.probability_flow else "reverse SDE"
        return f"ReverseSDE({self.forward!r}, {kind})"
