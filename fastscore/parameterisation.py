r"""Score parameterisations: noise (epsilon) prediction, clean-data (x0) prediction and sigma-conditioned
denoisers, seen as fastscore's score functions, and fastscore's score functions seen as each of them.

fastscore's samplers take a score function ``score_fn(x, t)`` (score_sde's convention): ``x`` (N, ...) the
state of the SDE at times ``t`` (a float (N,) tensor in [0, T]) and the result :math:`\nabla_x \log p_t(x)`.
Every SDE here (:mod:`fastscore.sde`) perturbs the data as :math:`x_t = m(t)\, x_0 + n(t)\, z`, with
:math:`m` the mean coefficient and :math:`n` the std of ``sde.marginal_prob``. So, with Tweedie's formula,
one network output determines the others, at the same ``x`` and ``t`` (docs/solvers.md#parameterisations):

.. math::
    \hat\epsilon = -n\, s, \qquad \hat x_0 = \frac{x + n^2 s}{m}, \qquad
    D(\hat x, \sigma) = \hat x + \sigma^2\, m\, s(m \hat x, t) = \hat x_0, \quad
    \sigma = n / m, \ \hat x = x / m.

- :func:`score_from_eps` / :func:`eps_from_score`: a noise-prediction model ``eps_fn(x, tau)`` (DDPM,
  diffusers' ``UNet2DModel`` with ``prediction_type="epsilon"``);
- :func:`score_from_x0` / :func:`x0_from_score`: a model ``x0_fn(x, tau)`` that predicts the clean data;
- :func:`score_from_denoiser` / :func:`denoiser_from_score`: k-diffusion's (and EDM's) denoiser
  ``denoiser(x_hat, sigma)``, called on the *scaled* state :math:`\hat x = x / m` (the variance-exploding
  view of any of these SDEs: :math:`\hat x = x_0 + \sigma z`) with the per-sample noise level
  :math:`\sigma = n / m` (an (N,) tensor), returning the denoised estimate of :math:`x_0`.

``tau`` is what the model takes as its time input, set by ``timesteps``:

- ``"t"``: the SDE's own time t in [0, T] (score_sde's continuous models, DPM-Solver's continuous time);
- ``"sigma"``: the noise level :math:`\sigma(t) = n / m` (score_sde's continuous VE models, NCSN-style
  conditioning on sigma);
- ``"ddpm"``: the training step of a discrete DDPM with N steps (diffusers' ``timestep``), for a
  :class:`~fastscore.sde.VPSDE`: its float32 ``alphas_cumprod`` :math:`\bar\alpha_i` are the DDPM's (a
  ``VPSDE(beta_min=0.1, beta_max=20, N=1000)`` has exactly the ``alphas_cumprod`` of diffusers'
  ``DDPMScheduler()``: betas ``linspace(1e-4, 0.02, 1000)``), and a time t is the fractional step
  :math:`\tau` whose noise level equals t's: :math:`\log\sigma` interpolated linearly between the table's
  :math:`\sigma_i = \sqrt{(1 - \bar\alpha_i) / \bar\alpha_i}` (clamped to [0, N - 1]), k-diffusion's
  ``DiscreteEpsDDPMDenoiser`` convention. For a VP SDE :math:`m^2 + n^2 = 1`, so equal noise levels mean
  equal :math:`(m, n)`: the model sees exactly the inputs of its training step;
- ``"ddpm_int"``: the same step rounded to the nearest integer (an int64 tensor), for models that take
  integer steps only; the score then uses the requested time's std (k-diffusion's ``quantize=True``).

The converted functions are plain callables: the samplers of fastscore, k-diffusion and diffusers call
them. fastscore's few-step solvers (:func:`fastscore.solvers.solve`) recognise the objects
``score_from_*`` returns and use the model's own output in their fused updates, without converting it
to a score first (one pass less per step, and DPM-Solver++(2M) on a denoiser or x0 model in one pass).

Round trips are exact up to rounding: ``score_from_eps(eps_from_score(s, sde, timesteps=ts), sde,
timesteps=ts)`` returns ``s``'s values, for ``"t"``, ``"sigma"`` and ``"ddpm"``; ``"ddpm_int"`` changes the
time input (the rounding), exactly at the table's own noise levels.

The time conversions are public too: :func:`mean_std` (:math:`m(t), n(t)`), :func:`sigma_of_t` and its
inverse :func:`t_of_sigma` (VE: :math:`\sigma(t) = \sigma_{min} (\sigma_{max} / \sigma_{min})^t`; VP:
:math:`\sigma^2 = e^{-2\,\mathrm{lmc}(t)} - 1`; sub-VP: :math:`\sigma = 1/m - m`), all in float64.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fastscore import _validate
from fastscore import sde as sde_lib

__all__ = [
    "TIMESTEPS",
    "mean_std",
    "sigma_of_t",
    "t_of_sigma",
    "score_from_eps",
    "score_from_x0",
    "score_from_denoiser",
    "eps_from_score",
    "x0_from_score",
    "denoiser_from_score",
]

TIMESTEPS = ("t", "sigma", "ddpm", "ddpm_int")


# ---- noise levels and times (float64) ----------------------------------------------------------------------


def _sde(sde, name: str = "sde"):
    return sde_lib.check_sde(sde, name, schedules=True)


def _f64(v, name: str) -> Tensor:
    """v (a number or a tensor) as a float64 tensor on its device."""
    if isinstance(v, Tensor):
        if not (v.is_floating_point() or v.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)):
            raise TypeError(f"{name}: expected a real tensor, got {v.dtype}")
        return v.detach().to(torch.float64)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a number or a tensor, got {type(v).__name__}")
    return torch.tensor(float(v), dtype=torch.float64)


def _lmc(sde, t: Tensor) -> Tensor:
    return sde.log_mean_coeff(t)


def mean_std(sde, t) -> tuple[Tensor, Tensor]:
    r"""(m(t), n(t)) in float64: the mean coefficient and the std of the SDE's perturbation kernel
    :math:`p_{0t}(x_t | x_0) = N(m x_0, n^2 I)` (those of ``sde.marginal_prob``, computed in float64 with
    ``expm1`` where it matters). ``t``: a number or a tensor (any shape)."""
    sde = _sde(sde)
    t = _f64(t, "t")
    if isinstance(sde, sde_lib.VESDE):
        return torch.ones_like(t), sde.sigma(t)
    lmc = _lmc(sde, t)
    m = torch.exp(lmc)
    if isinstance(sde, sde_lib.VPSDE):
        return m, torch.sqrt(-torch.expm1(2.0 * lmc))
    return m, -torch.expm1(2.0 * lmc)  # sub-VP: n = 1 - m^2


def sigma_of_t(sde, t) -> Tensor:
    r"""The noise level :math:`\sigma(t) = n(t) / m(t)` of the scaled state :math:`x / m` (float64)."""
    sde = _sde(sde)
    t = _f64(t, "t")
    if isinstance(sde, sde_lib.VESDE):
        return sde.sigma(t)
    lmc = _lmc(sde, t)
    if isinstance(sde, sde_lib.VPSDE):
        return torch.sqrt(torch.expm1(-2.0 * lmc))
    m = torch.exp(lmc)
    return -torch.expm1(2.0 * lmc) / m


def t_of_sigma(sde, sigma) -> Tensor:
    r"""The time t whose noise level :math:`\sigma(t)` is ``sigma`` (float64): the inverse of
    :func:`sigma_of_t`. VE: :math:`\ln(\sigma/\sigma_{min}) / \ln(\sigma_{max}/\sigma_{min})`; VP and sub-VP
    solve :math:`\tfrac12 (\beta_1 - \beta_0) t^2 + \beta_0 t = L` with :math:`L = \ln(1 + \sigma^2)` (VP) or
    :math:`-2 \ln m`, :math:`m = 2 / (\sigma + \sqrt{\sigma^2 + 4})` (sub-VP)."""
    sde = _sde(sde)
    sigma = _f64(sigma, "sigma")
    if isinstance(sde, sde_lib.VESDE):
        return torch.log(sigma / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)
    if isinstance(sde, sde_lib.VPSDE):
        L = torch.log1p(sigma * sigma)
    else:
        L = 2.0 * torch.log((sigma + torch.sqrt(sigma * sigma + 4.0)) / 2.0)
    b0, db = sde.beta_0, sde.beta_1 - sde.beta_0
    # the root of db/2 t^2 + b0 t - L = 0, in the form without cancellation
    return 2.0 * L / (b0 + torch.sqrt(b0 * b0 + 2.0 * db * L))


class _DDPMTable:
    r"""A discrete DDPM's noise levels :math:`\sigma_i = \sqrt{(1 - \bar\alpha_i)/\bar\alpha_i}` (ascending) and
    the fractional step of a noise level (log-linear interpolation, k-diffusion's ``DiscreteSchedule``)."""

    def __init__(self, sde):
        acp = sde.alphas_cumprod.to(torch.float64)
        self.log_sigmas = 0.5 * torch.log((1.0 - acp) / acp)
        self._per_device: dict[str, Tensor] = {}

    def logs(self, device) -> Tensor:
        key = str(device)
        if key not in self._per_device:
            self._per_device[key] = self.log_sigmas.to(device)
        return self._per_device[key]

    def step_of_sigma(self, sigma: Tensor) -> Tensor:
        """The fractional step (float64) of the noise levels ``sigma`` (float64)."""
        logs = self.logs(sigma.device)
        v = torch.log(sigma)
        low = (torch.searchsorted(logs, v.contiguous(), right=True) - 1).clamp(0, logs.shape[0] - 2)
        lo, hi = logs[low], logs[low + 1]
        w = ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
        return low.to(torch.float64) + w

    def sigma_of_step(self, step: Tensor) -> Tensor:
        """The noise level (float64) of the (fractional) steps ``step``."""
        logs = self.logs(step.device)
        step = step.to(torch.float64).clamp(0.0, float(logs.shape[0] - 1))
        low, high = step.floor().long(), step.ceil().long()
        w = step - low.to(torch.float64)
        return torch.exp((1.0 - w) * logs[low] + w * logs[high])


class _Times:
    """The conversion between the SDE's times t and a model's time input under one ``timesteps`` convention."""

    def __init__(self, sde, timesteps: str):
        self.sde = sde
        self.timesteps = _validate.choice(timesteps, "timesteps", TIMESTEPS)
        self.table = None
        if self.timesteps in ("ddpm", "ddpm_int"):
            if not isinstance(sde, sde_lib.VPSDE):
                raise ValueError(
                    f"timesteps: {self.timesteps!r} (a discrete DDPM's steps) needs a VPSDE, whose alphas_cumprod "
                    f"are the DDPM's, got {type(sde).__name__}"
                )
            self.table = _DDPMTable(sde)

    def model_time(self, t64: Tensor) -> Tensor:
        """The model's time input (float64, or int64 for ``ddpm_int``) at the SDE times ``t64`` (float64)."""
        if self.timesteps == "t":
            return t64
        sigma = sigma_of_t(self.sde, t64)
        if self.timesteps == "sigma":
            return sigma
        step = self.table.step_of_sigma(sigma)
        return torch.round(step).long() if self.timesteps == "ddpm_int" else step

    def sde_time(self, tau: Tensor) -> Tensor:
        """The SDE time (float64) of the model's time input ``tau``."""
        tau = tau.to(torch.float64)
        if self.timesteps == "t":
            return tau
        sigma = tau if self.timesteps == "sigma" else self.table.sigma_of_step(tau)
        return t_of_sigma(self.sde, sigma)

    def cast(self, model_time: Tensor, x: Tensor) -> Tensor:
        """A model time input as the model is given it: int64 steps, else x's dtype (float32 for half
        precision x, as the samplers give t)."""
        if model_time.dtype == torch.int64:
            return model_time
        return model_time.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _per_sample(v, x: Tensor, name: str) -> Tensor:
    """A time input as an (N,) float64 tensor on x's device: a number, a 0-d tensor or an (N,) tensor."""
    v = _f64(v, name)
    N = x.shape[0]
    if v.dim() == 0:
        v = v.expand(N)
    elif tuple(v.shape) != (N,):
        raise ValueError(
            f"{name}: expected a number or a tensor of shape ({N},) (one per sample), got {tuple(v.shape)}"
        )
    return v.to(x.device)


def _view(v: Tensor, x: Tensor) -> Tensor:
    """An (N,) float64 tensor as (N, 1, ..., 1) in x's dtype, to broadcast against x."""
    return v.to(x.dtype).reshape((x.shape[0],) + (1,) * (x.dim() - 1))


# ---- models of another parameterisation as score functions ---------------------------------------------------


class _FromModel:
    """A model of another parameterisation seen as a score function ``score_fn(x, t)``. Attributes: ``fn`` (the
    model), ``sde``, ``kind`` (``"eps"``, ``"x0"`` or ``"denoiser"``) and ``timesteps``."""

    kind = ""
    arg = ""

    def __init__(self, fn, sde, timesteps: str):
        self.fn = _validate.function(fn, self.arg)
        self.sde = _sde(sde)
        self.timesteps = timesteps
        self.times = _Times(self.sde, timesteps) if self.kind != "denoiser" else None

    def _check_x(self, x) -> Tensor:
        return _validate.batch(x, "x", non_empty=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fn!r}, {self.sde!r}, timesteps={self.timesteps!r})"


class EpsScore(_FromModel):
    r"""``score_fn(x, t) = -eps_fn(x, tau(t)) / n(t)``: a noise-prediction model as a score function."""

    kind, arg = "eps", "eps_fn"

    def __call__(self, x: Tensor, t) -> Tensor:
        x = self._check_x(x)
        t64 = _per_sample(t, x, "t")
        _, n = mean_std(self.sde, t64)
        eps = _validate.check_score(self.fn(x, self.times.cast(self.times.model_time(t64), x)), x, self.arg)
        return eps * _view(-1.0 / n, x)


class X0Score(_FromModel):
    r"""``score_fn(x, t) = (m(t) x0_fn(x, tau(t)) - x) / n(t)^2``: a clean-data model as a score function."""

    kind, arg = "x0", "x0_fn"

    def __call__(self, x: Tensor, t) -> Tensor:
        x = self._check_x(x)
        t64 = _per_sample(t, x, "t")
        m, n = mean_std(self.sde, t64)
        x0 = _validate.check_score(self.fn(x, self.times.cast(self.times.model_time(t64), x)), x, self.arg)
        return (x0 * _view(m, x) - x) * _view(1.0 / (n * n), x)


class DenoiserScore(_FromModel):
    r"""``score_fn(x, t) = (m D(x / m, sigma) - x) / n^2`` with :math:`\sigma = n / m`: a k-diffusion denoiser
    as a score function."""

    kind, arg = "denoiser", "denoiser_fn"

    def __init__(self, fn, sde):
        super().__init__(fn, sde, "sigma")

    def __call__(self, x: Tensor, t) -> Tensor:
        x = self._check_x(x)
        t64 = _per_sample(t, x, "t")
        m, n = mean_std(self.sde, t64)
        sigma = (n / m).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        x_hat = x if isinstance(self.sde, sde_lib.VESDE) else x * _view(1.0 / m, x)
        d = _validate.check_score(self.fn(x_hat, sigma), x, self.arg)
        return (d * _view(m, x) - x) * _view(1.0 / (n * n), x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fn!r}, {self.sde!r})"


def score_from_eps(eps_fn, sde, *, timesteps: str = "t") -> EpsScore:
    r"""A noise-prediction model ``eps_fn(x, tau)`` as fastscore's score function ``score_fn(x, t)``:
    :math:`s = -\hat\epsilon / n(t)`. ``x`` is the SDE's state (for a VP SDE, the DDPM's :math:`x_t =
    \sqrt{\bar\alpha}\, x_0 + \sqrt{1 - \bar\alpha}\, \epsilon`); ``tau`` the model's time input under
    ``timesteps`` (module docstring). A diffusers ``UNet2DModel`` trained as DDPM: ``score_from_eps(lambda x,
    tau: unet(x, tau).sample, VPSDE(), timesteps="ddpm")``."""
    return EpsScore(eps_fn, sde, timesteps)


def score_from_x0(x0_fn, sde, *, timesteps: str = "t") -> X0Score:
    r"""A clean-data model ``x0_fn(x, tau)`` (it returns the estimate of :math:`x_0`) as a score function:
    :math:`s = (m \hat x_0 - x) / n^2`; ``x``, ``tau`` as :func:`score_from_eps`."""
    return X0Score(x0_fn, sde, timesteps)


def score_from_denoiser(denoiser_fn, sde) -> DenoiserScore:
    r"""A k-diffusion denoiser ``denoiser_fn(x_hat, sigma)`` as a score function: :math:`s = (m D(x/m,
    \sigma) - x) / n^2`, :math:`\sigma = n / m` (an (N,) tensor in x's dtype, float32 for half precision).
    For a VE SDE :math:`m = 1`: :math:`s = (D(x, \sigma) - x) / \sigma^2`."""
    return DenoiserScore(denoiser_fn, sde)


# ---- score functions as models of another parameterisation ---------------------------------------------------


class _FromScore:
    def __init__(self, score_fn, sde, timesteps: str):
        self.score_fn = _validate.function(score_fn, "score_fn")
        self.sde = _sde(sde)
        self.timesteps = timesteps
        self.times = _Times(self.sde, timesteps)

    def _score(self, x: Tensor, t64: Tensor) -> Tensor:
        t = t64.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        return _validate.check_score(self.score_fn(x, t), x)

    def _sde_time(self, x: Tensor, tau) -> Tensor:
        return self.times.sde_time(_per_sample(tau, x, "tau"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.score_fn!r}, {self.sde!r}, timesteps={self.timesteps!r})"


class ScoreEps(_FromScore):
    r"""``eps_fn(x, tau) = -n(t) score_fn(x, t)``, t the SDE time of ``tau``."""

    def __call__(self, x: Tensor, tau) -> Tensor:
        x = _validate.batch(x, "x")
        t64 = self._sde_time(x, tau)
        _, n = mean_std(self.sde, t64)
        return self._score(x, t64) * _view(-n, x)


class ScoreX0(_FromScore):
    r"""``x0_fn(x, tau) = (x + n(t)^2 score_fn(x, t)) / m(t)``, t the SDE time of ``tau``."""

    def __call__(self, x: Tensor, tau) -> Tensor:
        x = _validate.batch(x, "x")
        t64 = self._sde_time(x, tau)
        m, n = mean_std(self.sde, t64)
        return (x + self._score(x, t64) * _view(n * n, x)) * _view(1.0 / m, x)


class ScoreDenoiser(_FromScore):
    r"""``denoiser(x_hat, sigma) = x_hat + (n^2 / m) score_fn(m x_hat, t)``, t the time of ``sigma``."""

    def __init__(self, score_fn, sde):
        super().__init__(score_fn, sde, "sigma")

    def __call__(self, x_hat: Tensor, sigma) -> Tensor:
        x_hat = _validate.batch(x_hat, "x_hat")
        t64 = t_of_sigma(self.sde, _per_sample(sigma, x_hat, "sigma"))
        m, n = mean_std(self.sde, t64)
        x = x_hat if isinstance(self.sde, sde_lib.VESDE) else x_hat * _view(m, x_hat)
        return x_hat + self._score(x, t64) * _view(n * n / m, x_hat)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.score_fn!r}, {self.sde!r})"


def eps_from_score(score_fn, sde, *, timesteps: str = "t") -> ScoreEps:
    r"""fastscore's score function as a noise-prediction model ``eps_fn(x, tau) = -n(t)\, s(x, t)``: what a
    DDPM / diffusers sampling loop calls in place of its UNet (``timesteps="ddpm"`` or ``"ddpm_int"`` with a
    VPSDE whose ``alphas_cumprod`` are the scheduler's). ``tau``: a number, a 0-d tensor (diffusers' loops
    pass one timestep for the batch) or an (N,) tensor."""
    return ScoreEps(score_fn, sde, timesteps)


def x0_from_score(score_fn, sde, *, timesteps: str = "t") -> ScoreX0:
    r"""fastscore's score function as a clean-data model ``x0_fn(x, tau) = (x + n^2 s(x, t)) / m``
    (Tweedie's formula)."""
    return ScoreX0(score_fn, sde, timesteps)


def denoiser_from_score(score_fn, sde) -> ScoreDenoiser:
    r"""fastscore's score function as a k-diffusion denoiser ``denoiser(x_hat, sigma)`` :math:`= \hat x +
    \sigma^2 m\, s(m \hat x, t(\sigma))` on the scaled state :math:`\hat x = x / m`: what k-diffusion's
    samplers (``sample_dpmpp_2m(denoiser, x, sigmas)``, ...) call. Start them from :math:`x_T / m(T)` (for VE,
    :math:`x_T`) with noise levels ``sigma`` in the SDE's range (``fastscore.solvers.sigma_schedule``); their
    result is the estimate of :math:`x_0` (no scaling back needed when the schedule ends at 0)."""
    return ScoreDenoiser(score_fn, sde)
