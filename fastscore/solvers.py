r"""Few-step solvers for score SDEs: DDIM, Heun, DPM-Solver++(2M) and an adaptive SDE solver, on the fused
sampler update.

The PC sampler takes one step per time of the SDE's grid (1000-2000 network evaluations for images); these
solvers get comparable samples from 10-50. One function runs them all, :func:`solve` (what ``fastscore
sample --sampler ddim|heun|dpm|adaptive --steps N`` calls):

- ``"ddim"``: DDIM (Song et al. 2021); with ``eta=0`` the first-order solver of the probability-flow ODE
  (Euler in sigma), with ``eta > 0`` stochastic (``eta=1``: ancestral sampling, DDPM's posterior step);
  k-diffusion's ``sample_euler`` / ``sample_euler_ancestral``;
- ``"heun"``: Heun's second-order method on the probability-flow ODE in sigma (Karras et al. 2022, their
  Algorithm 1 without churn; k-diffusion's ``sample_heun``): two evaluations per step, one for the last;
- ``"dpm"``: DPM-Solver++(2M) (Lu et al. 2022), the second-order multistep exponential integrator on the
  denoised estimate (k-diffusion's ``sample_dpmpp_2m``): one evaluation per step;
- ``"adaptive"``: the adaptive-step SDE solver of Jolicoeur-Martineau et al. (2021, "Gotta Go Fast"):
  Euler-Maruyama and stochastic improved Euler on the reverse SDE with the same noise, the difference
  controlling each sample's step (mixed tolerance ``atol`` / ``rtol`` against the current and previous
  Euler-Maruyama states, scaled L2 norm, safety 0.9, exponent 0.9), the improved-Euler state kept, a
  rejected step's Brownian increment kept for its retry (split by the Brownian bridge) rather than redrawn;
  it reports its number of evaluations (``return_info=True``).

Every fixed-step solver works in sigma form, k-diffusion's and DPM-Solver's: every SDE here perturbs the
data as :math:`x_t = m(t) x_0 + n(t) z`, so the scaled state :math:`\hat x = x / m` is the data plus noise
of level :math:`\sigma = n / m` (a VE SDE: :math:`m = 1`), whose probability-flow ODE is
:math:`d\hat x / d\sigma = (\hat x - D(\hat x, \sigma)) / \sigma` with the denoiser :math:`D = \hat x +
\sigma^2 m\, s(x, t)` (fastscore.parameterisation). The solvers step through noise levels
:math:`\sigma_0 > \dots > \sigma_K` (:func:`sigma_schedule`: Karras et al.'s :math:`\rho = 7` schedule
or levels uniform in :math:`\log\sigma`, between :math:`\sigma(T)` and :math:`\sigma(\epsilon)`, then 0, so
that the last step returns the denoised estimate) and call the score function at the times :math:`t(\sigma_k)`. The
updates (docs/solvers.md#the-updates) are those of k-diffusion, written for the SDE's own state
:math:`x = m \hat x` (the network's input, so that no pass rescales it):

- each update is a linear combination of the state, the current evaluation, one earlier evaluation (or
  denoised estimate) and the counter-based noise, computed by one fused pass of
  :class:`fastscore.ops.langevin_step.FusedUpdate` (``x <- a x + b s + c z`` with z the counter-based
  normals or a given tensor: the earlier evaluation). The coefficient rows of every step are computed
  once, in float64, into one table on the device;
- DDIM and Heun: one pass per evaluation. DPM-Solver++(2M): one pass per step for models that predict
  the data (:func:`fastscore.parameterisation.score_from_denoiser`, ``score_from_x0``), whose previous
  output is the previous denoised estimate; for score and noise-prediction models the denoised estimate
  is a combination of the state and the output, so the step takes two passes (the new state into the
  buffer of the previous estimate, then the current estimate in place of the old state; two buffers
  trade roles), still without allocating;
- stochastic steps use the counter-based noise of ``(seed, counter=k)`` at the global sample index
  ``sample_offset + n``, and the prior is the PC / ODE samplers' (``counter=2^62``): a sample does not
  depend on the batch it is drawn in, and one seed starts every sampler from the same batch.

Score functions: ``score_fn(x, t)`` with t a float (N,) tensor, as every fastscore sampler; the objects of
``fastscore.parameterisation.score_from_eps / _x0 / _denoiser`` (diffusers and k-diffusion models) are
recognised and their model's output is used directly. What the function returns must have x's shape,
dtype and device; the solvers keep one earlier output, so a function must not return the same memory at
two calls (a ValueError naming it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastscore import _validate
from fastscore import noise as noise_lib
from fastscore import parameterisation as param
from fastscore import sde as sde_lib
from fastscore._progress import Progress
from fastscore.ode import NonFiniteError
from fastscore.ops.langevin_step import FusedUpdate

__all__ = ["solve", "sigma_schedule", "SolverInfo", "METHODS", "SCHEDULES"]

METHODS = ("ddim", "heun", "dpm", "adaptive")
SCHEDULES = ("karras", "exponential", "time")
DEFAULT_STEPS = 20
# Each method's default noise levels: Karras et al.'s for their Heun method and for DDIM; uniform in log sigma (in
# DPM-Solver's lambda) for DPM-Solver++, whose error on exact-score Gaussians it halves at 10-40 steps
# (docs/solvers.md#the-sigma-form).
DEFAULT_SCHEDULE = {"ddim": "karras", "heun": "karras", "dpm": "exponential"}


@dataclass
class SolverInfo:
    """What ``solve(..., return_info=True)`` returns next to the samples.

    ``nfe``: calls of the score function on the batch (for ``adaptive``, on the samples still running, plus
    one for the denoising); ``nfe_per_sample`` (N,): the evaluations each sample took part in; ``sigmas``:
    the noise levels of a fixed-step solver (float64, with the final 0 when it denoises; empty for
    ``adaptive``); ``n_steps`` / ``n_rejected`` (N,): accepted and rejected steps per sample."""

    method: str
    nfe: int
    nfe_per_sample: Tensor
    sigmas: Tensor
    n_steps: Tensor
    n_rejected: Tensor


# ---- noise levels ----------------------------------------------------------------------------------------------


def sigma_schedule(sde, steps: int, *, schedule: str = "karras", rho: float = 7.0, eps=None, denoise: bool = True):
    r"""The noise levels of a ``steps``-step solver (float64, CPU): from :math:`\sigma(T)` down to
    :math:`\sigma(\epsilon)` (:func:`fastscore.parameterisation.sigma_of_t`), then 0 when ``denoise`` (the
    last step returns the denoised estimate; k-diffusion's ``append_zero``). ``steps`` levels before the 0
    (``steps + 1`` without it), so ``steps`` steps either way.

    - ``"karras"``: :math:`\sigma_i = (\sigma_{max}^{1/\rho} + \tfrac{i}{n-1} (\sigma_{min}^{1/\rho} -
      \sigma_{max}^{1/\rho}))^\rho` (Karras et al. 2022, k-diffusion's ``get_sigmas_karras``);
    - ``"exponential"``: uniform in :math:`\log\sigma` (uniform in DPM-Solver's :math:`\lambda`);
    - ``"time"``: uniform in the SDE's time, ``linspace(T, eps, n)`` (score_sde's grid).

    ``eps``: the last time (default :func:`fastscore.sde.sampling_eps`)."""
    sde = sde_lib.check_sde(sde, schedules=True)
    steps = _validate.integer(steps, "steps", 1)
    schedule = _validate.choice(schedule, "schedule", SCHEDULES)
    rho = _validate.number(rho, "rho", low=0.0, strict=True)
    _validate.flag(denoise, "denoise")
    eps = sde_lib.sampling_eps(sde, eps)
    n = steps if denoise else steps + 1
    s_max = float(param.sigma_of_t(sde, sde.T))
    s_min = float(param.sigma_of_t(sde, eps))
    if not s_max > s_min > 0:
        raise ValueError(f"sde: expected noise levels sigma(T) > sigma(eps) > 0, got {s_max} and {s_min}")
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    if schedule == "karras":
        lo, hi = s_min ** (1.0 / rho), s_max ** (1.0 / rho)
        sigmas = (hi + ramp * (lo - hi)) ** rho
    elif schedule == "exponential":
        sigmas = torch.exp(math.log(s_max) + ramp * (math.log(s_min) - math.log(s_max)))
    else:
        sigmas = param.sigma_of_t(sde, torch.linspace(sde.T, eps, n, dtype=torch.float64))
    sigmas[-1] = s_min  # the ends exactly (the rho-th powers round)
    sigmas[0] = s_max
    if denoise:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas


def _check_sigmas(sigmas, sde) -> list[float]:
    """User noise levels: 1-D, at least two, finite, decreasing, positive but for a final 0, within the SDE's."""
    values = _validate.float_list(sigmas, "sigmas")
    if len(values) < 2:
        raise ValueError(f"sigmas: expected at least two noise levels (one step), got {values}")
    if not all(math.isfinite(s) for s in values):
        raise ValueError(f"sigmas: expected finite noise levels, got {_validate.some(values)}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas: expected strictly decreasing noise levels, got {_validate.some(values)}")
    if values[-1] < 0 or (len(values) > 1 and values[-2] <= 0):
        raise ValueError(f"sigmas: expected positive noise levels (the last may be 0), got {_validate.some(values)}")
    s_max = float(param.sigma_of_t(sde, sde.T))
    s_zero = float(param.sigma_of_t(sde, 0.0))
    if values[0] > s_max * (1 + 1e-9):
        raise ValueError(f"sigmas: the first level {values[0]} exceeds the SDE's sigma(T) = {s_max}")
    lowest = values[-1] if values[-1] > 0 else values[-2]
    if lowest < s_zero * (1 - 1e-9):
        raise ValueError(f"sigmas: the level {lowest} is below the SDE's sigma(0) = {s_zero} (no time maps to it)")
    return values


# ---- the model as the solvers read it ----------------------------------------------------------------------------


def _same_memory(a: Tensor, b: Tensor) -> bool:
    sa, sb = a.untyped_storage(), b.untyped_storage()
    return sa.nbytes() > 0 and sa.data_ptr() == sb.data_ptr()


class _Model:
    r"""The network as the fixed-step solvers call it, at noise level index j: its output y_j and how the
    denoised estimate reads from it. ``form == "residual"`` (score, noise prediction): :math:`(\hat x - D) /
    \sigma = w_j y_j`; ``form == "data"`` (x0 prediction, denoiser): :math:`D = y_j`. ``scale[j]`` is the
    state's scale :math:`\mu_j` (the state is :math:`\mu_j \hat x`): m(t_j) when the network takes the SDE's
    state, 1 for a denoiser (which takes :math:`\hat x`)."""

    def __init__(self, score_fn, sde, sigmas: list[float], x: Tensor, fmt, bar: Progress):
        fast = isinstance(score_fn, param._FromModel) and score_fn.sde is sde
        self.kind = score_fn.kind if fast else "score"
        self.fn = score_fn.fn if fast else score_fn
        self.arg = score_fn.arg if fast else "score_fn"
        self.form = "data" if self.kind in ("x0", "denoiser") else "residual"
        levels = [s for s in sigmas if s > 0]
        t = param.t_of_sigma(sde, torch.tensor(levels, dtype=torch.float64))
        m, n = param.mean_std(sde, t)
        self.t = t.tolist()
        ms, ns = m.tolist(), n.tolist()
        self.m_first, self.m_last = ms[0], ms[-1]
        tail = [1.0] * (len(sigmas) - len(levels))  # sigma = 0 is t = 0: m = 1
        self.scale = [1.0] * len(sigmas) if self.kind == "denoiser" else ms + tail
        if self.kind == "score":  # (x_hat - D) / sigma = -(n^2 / m) s / sigma
            self.w = [-(nj * nj) / (mj * sj) for mj, nj, sj in zip(ms, ns, levels)]
        else:
            self.w = [1.0] * len(levels)
        if self.kind == "score":
            times = t
        elif self.kind == "denoiser":
            times = torch.tensor(levels, dtype=torch.float64)
        else:
            times = score_fn.times.model_time(t)
        time_dtype = torch.int64 if times.dtype == torch.int64 else (
            torch.float64 if x.dtype == torch.float64 else torch.float32
        )  # fmt: skip
        self.times = times.tolist()
        self.time_buf = torch.empty(x.shape[0], dtype=time_dtype, device=x.device)
        self.fmt, self.bar = fmt, bar
        self.spare: list[Tensor | None] = [None, None]
        self.toggle = 0
        self.states: list[Tensor] = []
        self.count = 0

    def __call__(self, u: Tensor, j: int, keep: Tensor | None = None) -> Tensor:
        """The network's output at the state u and level j, checked; ``keep``: an earlier output still
        needed, which the new one must not overwrite."""
        self.time_buf.fill_(self.times[j])
        out = _validate.check_score(self.fn(u, self.time_buf), u, self.arg)
        if out.requires_grad:
            out = out.detach()
        if keep is not None and _same_memory(out, keep):
            raise ValueError(
                f"{self.arg}: returned the memory of its previous output; the solver keeps that output for the next "
                "update, so each call must return a new tensor (e.g. return out.clone())"
            )
        if not out.is_contiguous(memory_format=self.fmt) or any(_same_memory(out, s) for s in self.states):
            # another layout, or the solver's own state (updated in place): a copy into a reused buffer
            if self.spare[self.toggle] is None:
                self.spare[self.toggle] = torch.empty_like(u, memory_format=self.fmt)
            out = self.spare[self.toggle].copy_(out)
            self.toggle ^= 1
        self.count += 1
        self.bar.update()
        return out


def _ancestral(s: float, s_next: float, eta: float) -> tuple[float, float]:
    """k-diffusion's get_ancestral_step: (sigma_down, sigma_up) of a step from s to s_next."""
    if eta == 0 or s_next == 0:
        return s_next, 0.0
    up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    return math.sqrt(s_next**2 - up**2), up


def _euler_row(model: _Model, sig: list[float], k: int, s_down: float, s_up: float) -> list[float]:
    r"""(a, b, c) of :math:`\hat x \leftarrow \hat x + (\sigma_d - \sigma_k) d_k + \sigma_{up} z` on the state
    :math:`\mu \hat x` (DDIM, Euler, Euler ancestral)."""
    mu, mu_next = model.scale[k], model.scale[k + 1]
    if model.form == "residual":
        return [mu_next / mu, mu_next * (s_down - sig[k]) * model.w[k], mu_next * s_up]
    A = s_down / sig[k]
    return [mu_next * A / mu, mu_next * (1.0 - A), mu_next * s_up]


def _table(rows: list[list[float]], x: Tensor, acc: torch.dtype) -> list[Tensor]:
    """Per-update coefficient rows as (N, 3) stride-0 views of one device table (computed once)."""
    if not rows:
        return []
    t = torch.tensor(rows, dtype=acc, device=x.device).reshape(-1, 3)
    return [t[i : i + 1].expand(x.shape[0], 3) for i in range(t.shape[0])]


class _Noise:
    """The normals of the stochastic steps: the counter-based generator (drawn inside the fused update), or
    a caller's source drawn into a buffer allocated once."""

    def __init__(self, x: Tensor, given: noise_lib.NoiseSource | None):
        self.given = given
        self.buf = torch.empty_like(x) if given is not None else None

    def __call__(self) -> Tensor | None:
        return self.given.fill(self.buf) if self.given is not None else None


# ---- the fixed-step solvers ------------------------------------------------------------------------------------


def _ddim(model: _Model, x: Tensor, sig: list[float], eta: float, key, given) -> Tensor:
    K = len(sig) - 1
    steps = [_ancestral(sig[k], sig[k + 1], eta) for k in range(K)]
    rows = _table([_euler_row(model, sig, k, *steps[k]) for k in range(K)], x, _acc(x))
    stochastic = any(up > 0 for _, up in steps)
    update = FusedUpdate(x, seed=key[0], sample_offset=key[1], noise_given=not stochastic or given is not None)
    noise = _Noise(x, given) if stochastic else None
    for k in range(K):
        y = model(x, k)
        if steps[k][1] > 0:
            update(y, rows[k], k, noise=noise())
        else:
            update(y, rows[k], k, noise=y)  # c = 0: the noise operand is only read (the same memory as y)
    return x


def _heun(model: _Model, x: Tensor, sig: list[float]) -> Tensor:
    K = len(sig) - 1
    first, second = [], []
    for k in range(K):
        s, s_next = sig[k], sig[k + 1]
        first.append(_euler_row(model, sig, k, s_next, 0.0))
        if s_next == 0:
            second.append([1.0, 0.0, 0.0])
            continue
        mu_next, delta = model.scale[k + 1], s_next - s
        if model.form == "residual":  # x_hat' + delta / 2 (d' - d_k), d = w y
            second.append([1.0, mu_next * delta * model.w[k + 1] / 2, -mu_next * delta * model.w[k] / 2])
        else:  # x_hat' + delta / (2 sigma') (D_k - D'): d_k = (x_hat' - D_k) / sigma', d' = (x_hat' - D') / sigma'
            c = mu_next * delta / (2 * s_next)
            second.append([1.0, -c, c])
    rows1, rows2 = _table(first, x, _acc(x)), _table(second, x, _acc(x))
    update = FusedUpdate(x, seed=0, noise_given=True)
    for k in range(K):
        y = model(x, k)
        update(y, rows1[k], k, noise=y)  # Euler (DDIM) to sigma_{k+1}
        if sig[k + 1] == 0:
            break
        y2 = model(x, k + 1, keep=y)
        update(y2, rows2[k], k, noise=y)  # the trapezoidal correction, with the first evaluation as operand
    return x


def _dpm_coefficients(sig: list[float], k: int) -> tuple[float, float, float]:
    r"""(A, B, C) of DPM-Solver++(2M): :math:`\hat x_{k+1} = A \hat x_k + B D_k + C D_{k-1}` (k-diffusion's
    sample_dpmpp_2m: first order at the first step and at the step to sigma = 0)."""
    s, s_next = sig[k], sig[k + 1]
    if s_next == 0:
        return 0.0, 1.0, 0.0
    h = math.log(s / s_next)
    A = math.exp(-h)
    one_minus = -math.expm1(-h)
    if k == 0:
        return A, one_minus, 0.0
    r = math.log(sig[k - 1] / s) / h
    return A, one_minus * (1 + 1 / (2 * r)), -one_minus / (2 * r)


def _dpm(model: _Model, x: Tensor, sig: list[float]) -> Tensor:
    K = len(sig) - 1
    coef = [_dpm_coefficients(sig, k) for k in range(K)]
    acc = _acc(x)
    if model.form == "data":  # D_k = y_k: one pass, the previous output as the extra operand
        rows = []
        for k, (A, B, C) in enumerate(coef):
            mu, mu_next = model.scale[k], model.scale[k + 1]
            rows.append([mu_next * A / mu, mu_next * B, mu_next * C])
        rows = _table(rows, x, acc)
        update = FusedUpdate(x, seed=0, noise_given=True)
        prev = None
        for k in range(K):
            y = model(x, k, keep=prev)
            update(y, rows[k], k, noise=prev if coef[k][2] != 0 else y)
            prev = y
        return x
    # Residual form: D_k = x_hat_k - sigma_k w_k y_k needs the state, which the update overwrites. When the next
    # step uses D_k: pass 1 writes the new state into the buffer of D_{k-1} (its old content times C), pass 2
    # turns the old state into D_k in place; the buffers then trade roles.
    single, first, second, need = [], [], [], []
    for k, (A, B, C) in enumerate(coef):
        mu, mu_next, sw = model.scale[k], model.scale[k + 1], sig[k] * model.w[k]
        need.append(k + 1 < K and coef[k + 1][2] != 0)
        single.append([mu_next * (A + B) / mu, -mu_next * B * sw, mu_next * C])
        first.append([mu_next * C, -mu_next * B * sw, mu_next * (A + B) / mu])
        second.append([1.0 / mu, -sw, 0.0])
    single, first, second = _table(single, x, acc), _table(first, x, acc), _table(second, x, acc)
    bufs = [x, torch.zeros_like(x)]  # zeros: the first pass 1 reads its buffer (times C = 0)
    model.states = bufs
    updates = [FusedUpdate(b, seed=0, noise_given=True) for b in bufs]
    cur = 0
    for k in range(K):
        y = model(bufs[cur], k)
        if need[k]:
            updates[1 - cur](y, first[k], k, noise=bufs[cur])  # the other buffer <- x_{k+1}
            updates[cur](y, second[k], k, noise=y)  # this buffer <- D_k
            cur = 1 - cur
        else:
            updates[cur](y, single[k], k, noise=bufs[1 - cur] if coef[k][2] != 0 else y)
    return bufs[cur]


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---- the adaptive SDE solver -------------------------------------------------------------------------------------


def _exp_log_power(base: Tensor, exponent: float) -> Tensor:
    """base ** exponent as exp(exponent log base): ATen's pow rounds the elements past its last full vector
    differently, so a sample's step would depend on its position in the batch; exp and log do not."""
    return torch.exp(exponent * torch.log(base))


class _TimeProgress:
    """Progress in thousandths of [eps, T], advanced to the least advanced sample."""

    def __init__(self, enabled: bool, T: float, eps: float):
        self.T, self.span = T, T - eps
        self.bar = Progress(1000, "solve adaptive", unit="\u2030", enabled=enabled, rate=False) if enabled else None

    def __call__(self, t: Tensor) -> None:
        if self.bar is not None:
            done = ((self.T - t.max().item()) / self.span) if t.numel() else 1.0
            self.bar.update(max(0, int(min(1.0, done) * 1000) - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Counters of the adaptive solver's Brownian-bridge normals: above every attempt's own counter (attempt j draws
# counter j) and below the prior's (2^62); attempt j's k-th bridge draw is BRIDGE_COUNTER + j * BRIDGE_DRAWS + k.
BRIDGE_COUNTER = 1 << 61
BRIDGE_DRAWS = 1 << 20


class _BrownianMemory:
    r"""The adaptive solver's Brownian increments with memory of rejected ones (rejection sampling with memory,
    Rackauckas & Nie 2017): a rejected attempt's increment :math:`W` over its step :math:`h` is kept, not
    redrawn, so the accepted noise is no selection of draws. Per sample, a stack of the future's known
    increments (length in time, increment), the earliest on top. A step of length h takes whole segments from
    the top while they fit, splits the next one by the Brownian bridge (the part over q of a segment (L, W) is
    :math:`N(\tfrac{q}{L} W, \tfrac{q (L - q)}{L})`, the rest stays on top) and draws a fresh
    :math:`N(0, h')` for what the stack does not cover; a rejected attempt pushes its (h, increment) back."""

    def __init__(self, x: Tensor, gen: FusedUpdate, given):
        N = x.shape[0]
        self.length = torch.zeros(N, 0, dtype=torch.float64, device=x.device)
        self.incr = x.new_zeros((N, 0) + tuple(x.shape[1:]))
        self.depth = torch.zeros(N, dtype=torch.int64, device=x.device)
        self.z = torch.empty_like(x)
        self.gen, self.given = gen, given

    def _normals(self, counter: int) -> Tensor:
        return self.given.fill(self.z) if self.given is not None else self.gen.randn_into(self.z, counter)

    def _view(self, v: Tensor) -> Tensor:
        return v.to(self.incr.dtype).reshape((v.shape[0],) + (1,) * (self.incr.dim() - 2))

    def take(self, rows: Tensor | None, h: Tensor, attempt: int) -> Tensor:
        """The increments over the next step h (float64, one per row) of the samples ``rows`` (all if None)."""
        rows = torch.arange(h.shape[0], device=h.device) if rows is None else rows
        need = h.clone()
        fresh = self._normals(attempt).index_select(0, rows)  # drawn every attempt (a caller's source: one draw)
        out = torch.zeros_like(fresh)
        for k in range(BRIDGE_DRAWS):
            active = ((need > 0) & (self.depth.index_select(0, rows) > 0)).nonzero()[:, 0]
            if active.numel() == 0:
                break
            r = rows.index_select(0, active)
            top = self.depth.index_select(0, r) - 1
            L, W, q = self.length[r, top], self.incr[r, top], need.index_select(0, active)
            whole = L <= q
            frac = torch.where(whole, torch.ones_like(q), q / L)
            sd = torch.where(whole, torch.zeros_like(q), torch.sqrt((q * (L - q)).clamp_min(0.0) / L))
            z = self._normals(BRIDGE_COUNTER + attempt * BRIDGE_DRAWS + k).index_select(0, r)
            part = W * self._view(frac) + z * self._view(sd)
            out.index_add_(0, active, part)
            need.index_copy_(0, active, torch.where(whole, q - L, torch.zeros_like(q)))
            self.length[r, top] = torch.where(whole, torch.zeros_like(L), L - q)
            self.incr[r, top] = W - part
            self.depth.index_add_(0, r, -whole.long())
        return out.add_(fresh * self._view(need.sqrt()))

    def push(self, rows: Tensor, h: Tensor, increments: Tensor) -> None:
        """Keep the increments of rejected attempts (rows: global sample indices) for their retries."""
        if rows.numel() == 0:
            return
        d = self.depth.index_select(0, rows)
        grow = int(d.max()) + 1 - self.length.shape[1]
        if grow > 0:
            self.length = torch.cat([self.length, self.length.new_zeros(self.length.shape[0], grow)], 1)
            self.incr = torch.cat([self.incr, self.incr.new_zeros((self.incr.shape[0], grow) + self.incr.shape[2:])], 1)
        self.length[rows, d] = h
        self.incr[rows, d] = increments
        self.depth.index_add_(0, rows, torch.ones_like(rows))


def _adaptive(score_fn, sde, x: Tensor, eps: float, opts: dict, key, given, progress: bool, denoise: bool):
    N = x.shape[0]
    dev = x.device
    t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dims = tuple(range(1, x.dim()))
    D = x[0].numel()
    rtol, atol, safety, exponent = opts["rtol"], opts["atol"], opts["safety"], opts["exponent"]
    t = torch.full((N,), float(sde.T), dtype=torch.float64, device=dev)
    h = torch.full((N,), min(opts["h_init"], sde.T - eps), dtype=torch.float64, device=dev)
    x_prev = x.clone()
    evals = torch.zeros(N, dtype=torch.int64, device=dev)
    accepted = torch.zeros(N, dtype=torch.int64, device=dev)
    rejected = torch.zeros(N, dtype=torch.int64, device=dev)
    bad = torch.zeros(N, dtype=torch.bool, device=dev)
    gen = FusedUpdate(x, seed=key[0], sample_offset=key[1], noise_given=given is not None)
    brownian = _BrownianMemory(x, gen, given)
    nfe = 0
    bar = _TimeProgress(progress, float(sde.T), eps)

    def view(v: Tensor, like: Tensor) -> Tensor:
        return v.to(like.dtype).reshape((like.shape[0],) + (1,) * (like.dim() - 1))

    def score(xs: Tensor, ts: Tensor) -> Tensor:
        out = _validate.check_score(score_fn(xs, ts.to(t_dtype)), xs)
        return out.detach() if out.requires_grad else out

    def terms(xs: Tensor, ts: Tensor, hs: Tensor, dw: Tensor):
        """K = h (-f_a(t) x + g(t)^2 s(x, t)) + g(t) dW, dW ~ N(0, h): the reverse SDE's Euler-Maruyama increment."""
        s = score(xs, ts)
        f = torch.as_tensor(sde.drift_coef(ts), dtype=torch.float64, device=dev).expand(ts.shape)
        g = torch.as_tensor(sde.diffusion_coef(ts), dtype=torch.float64, device=dev).expand(ts.shape)
        k = xs * view(-f * hs, xs)
        k.add_(s * view(g * g * hs, xs))
        return k.add_(dw * view(g, xs))

    try:
        for attempt in range(opts["max_steps"] + 1):
            running = (t - eps) > 1e-6  # GGF's stopping rule |t - eps| > 1e-6
            n_running, n_bad = torch.stack([running.sum(), bad.sum()]).tolist()
            if n_bad:
                rows = bad.nonzero()[:, 0].tolist()
                raise NonFiniteError(
                    f"solve: the adaptive solver's error estimate became NaN or Inf (score_fn returned NaN or Inf, or "
                    f"the state overflowed) at t = {_validate.some(t[rows].tolist())} for sample(s) "
                    f"{_validate.some(rows)}",
                    rows,
                    t[rows].tolist(),
                )
            bar(t)
            if n_running == 0:
                break
            if attempt == opts["max_steps"]:
                raise RuntimeError(
                    f"solve: the adaptive solver did not reach t = eps within max_steps = {opts['max_steps']} step "
                    f"attempts ({n_running} sample(s) left at t = {_validate.some(t[running].tolist())}); loosen "
                    "rtol / atol or raise max_steps"
                )
            idx = None if n_running == N else running.nonzero()[:, 0]

            def rows_of(v: Tensor, idx=idx) -> Tensor:
                return v if idx is None else v.index_select(0, idx)

            xa, pa = rows_of(x), rows_of(x_prev)
            ta, ha = rows_of(t), rows_of(h)
            dw = brownian.take(idx, ha, attempt)
            k1 = terms(xa, ta, ha, dw)
            x_em = xa + k1  # Euler-Maruyama
            t_next = ta - ha
            k2 = terms(x_em, t_next, ha, dw)
            err = k2.sub_(k1).mul_(0.5)  # (K2 - K1) / 2
            x_new = x_em + err  # x + (K1 + K2) / 2: stochastic improved Euler
            scale = torch.maximum(pa.abs(), x_em.abs()).mul_(rtol).clamp_min_(atol)
            norm = err.div_(scale).square_().sum(dim=dims).to(torch.float64).div_(D).sqrt_()
            ok = norm <= 1.0
            okv = ok.reshape((ok.shape[0],) + (1,) * (x.dim() - 1))
            x_out = torch.where(okv, x_new, xa)
            prev_out = torch.where(okv, x_em, pa)
            t_out = torch.where(ok, t_next, ta)
            h_max = (t_out - eps).clamp_min(0.0)
            h_out = torch.minimum(h_max, safety * ha * _exp_log_power(norm, -exponent))
            finite = torch.isfinite(norm)
            rejected_rows = (~ok).nonzero()[:, 0]
            brownian.push(rejected_rows if idx is None else idx.index_select(0, rejected_rows),
                          ha.index_select(0, rejected_rows), dw.index_select(0, rejected_rows))  # fmt: skip
            if idx is None:
                x, x_prev, t, h = x_out, prev_out, t_out, h_out
                evals += 2
                accepted += ok
                rejected += ~ok
                bad |= ~finite
            else:
                x.index_copy_(0, idx, x_out)
                x_prev.index_copy_(0, idx, prev_out)
                t.index_copy_(0, idx, t_out)
                h.index_copy_(0, idx, h_out)
                evals.index_add_(0, idx, torch.full_like(idx, 2))
                accepted.index_add_(0, idx, ok.long())
                rejected.index_add_(0, idx, (~ok).long())
                bad.index_copy_(0, idx, ~finite)
            nfe += 2
    finally:
        bar.close()
    if denoise:  # Tweedie at each sample's final time: x0 = (x + n^2 s) / m
        m, n = param.mean_std(sde, t)
        x = (x + score(x, t) * view(n * n, x)) * view(1.0 / m, x)
        nfe += 1
        evals += 1
    info = SolverInfo("adaptive", nfe, evals, torch.empty(0, dtype=torch.float64), accepted, rejected)
    return x, info


# ---- the public function -------------------------------------------------------------------------------------------


def _start(x: Tensor) -> Tensor:
    """A copy of x in a layout the fused update writes in place (contiguous, or channels_last if x is)."""
    return x.detach().clone(memory_format=_validate.memory_format(x))


def solve(
    score_fn,
    sde,
    shape,
    *,
    method: str = "dpm",
    steps: int | None = None,
    eta: float = 0.0,
    schedule: str | None = None,
    rho: float = 7.0,
    sigmas=None,
    eps: float | None = None,
    denoise: bool = True,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.01,
    safety: float = 0.9,
    exponent: float = 0.9,
    max_steps: int = 10_000,
    seed: int | None = None,
    noise=None,
    x_init: Tensor | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    sample_offset: int = 0,
    progress: bool = False,
    return_info: bool = False,
):
    r"""Samples of ``sde``'s data distribution with a few-step solver (module docstring).

    ``score_fn(x, t)``: the score at the SDE's state x (N, ...) and times t (a float (N,) tensor), or a
    model converted by ``fastscore.parameterisation.score_from_eps / score_from_x0 / score_from_denoiser``
    (used directly); ``sde``: a :class:`~fastscore.sde.VESDE`, :class:`~fastscore.sde.VPSDE` or
    :class:`~fastscore.sde.subVPSDE`; ``shape``: (N, ...) of the batch.

    - ``method``: ``"dpm"`` (DPM-Solver++(2M), the default), ``"heun"``, ``"ddim"`` or ``"adaptive"``.
    - ``steps``: the number of steps of a fixed-step method (default 20): as many evaluations for ``dpm``
      and ``ddim``, ``2 steps - 1`` for ``heun`` (its last step, to sigma = 0, is an Euler step); not for
      ``adaptive``, which picks its own (``rtol``, ``atol``).
    - ``schedule``, ``rho``: the noise levels (:func:`sigma_schedule`: ``"karras"`` (``rho=7``),
      ``"exponential"`` (uniform in log sigma) or ``"time"``; by default ``"exponential"`` for ``dpm``, as
      DPM-Solver, and ``"karras"`` for ``heun`` and ``ddim``), between :math:`\sigma(T)` and
      :math:`\sigma(\epsilon)`, ``eps`` the last time (default :func:`fastscore.sde.sampling_eps`); or
      ``sigmas``: the noise levels themselves (decreasing, within the SDE's range; a final 0 makes the
      last step return the denoised estimate). ``denoise`` (default): end with the step to sigma = 0,
      which returns the denoised estimate :math:`E[x_0 | x_\epsilon]` (Tweedie; for ``adaptive`` one more
      evaluation); ``False``:
      return the state at time ``eps``.
    - ``eta`` (``ddim`` only): 0 is deterministic DDIM; ``eta > 0`` adds :math:`\sigma_{up} z` per step,
      :math:`\sigma_{up} = \min(\sigma_{k+1}, \eta \sqrt{\sigma_{k+1}^2 (\sigma_k^2 - \sigma_{k+1}^2) /
      \sigma_k^2})`, stepping deterministically to :math:`\sigma_d = \sqrt{\sigma_{k+1}^2 - \sigma_{up}^2}`
      (``eta=1``: ancestral sampling, DDPM's posterior; k-diffusion's ``sample_euler_ancestral``).
    - ``adaptive``: ``rtol``, ``atol`` (the mixed tolerance :math:`\max(atol, rtol \max(|x'|, |x'_{prev}|))`
      of Gotta Go Fast, where ``atol = 0.0078`` is 1/128 of data in [-1, 1]: scale it with the data),
      ``h_init`` (the first step in time), ``safety``, ``exponent`` (the step factor
      :math:`\mathrm{safety}\, E^{-\mathrm{exponent}}`), ``max_steps`` (attempted steps before a
      RuntimeError). Each sample has its own time and step; finished samples leave the batch.
    - ``seed``, ``sample_offset``, ``noise``: the prior (``sde.prior_std`` times the counter-based normals
      of ``(seed, counter=2^62)``, as :func:`fastscore.sampling.pc_sampler` and the ODE sampler draw it) and
      the noise of step k (``counter=k``) at global sample index ``sample_offset + n``; ``noise=`` a
      ``torch.Generator`` or a callable ``noise(shape, dtype, device)`` draws them instead
      (fastscore.sampling's module docstring). ``x_init``: a start (not modified) at the first noise level,
      in the SDE's state space, instead of the prior draw (``device``, ``dtype``: the prior's); give one
      when ``sigmas`` starts below :math:`\sigma(T)` (the prior is the law at T).
    - ``progress``: report on stderr; ``return_info``: also return a :class:`SolverInfo` (``nfe``).

    Returns the batch (N, ...) in ``dtype`` (x_init's), or ``(samples, SolverInfo)``. Runs without autograd.
    """
    _validate.function(score_fn, "score_fn")
    sde = sde_lib.check_sde(sde, schedules=True)
    method = _validate.choice(method, "method", METHODS)
    eta = _validate.number(eta, "eta", low=0.0)
    for v, name in ((denoise, "denoise"), (progress, "progress"), (return_info, "return_info")):
        _validate.flag(v, name)
    eps = sde_lib.sampling_eps(sde, eps)
    if eta != 0 and method != "ddim":
        raise ValueError(f"eta: only method 'ddim' takes eta > 0 (stochastic DDIM), got eta={eta} with {method!r}")
    if method == "adaptive":
        for v, name in ((steps, "steps"), (sigmas, "sigmas")):
            if v is not None:
                raise ValueError(f"{name}: the adaptive solver picks its own steps (set rtol / atol), got {name}={v!r}")
        opts = dict(
            rtol=_validate.number(rtol, "rtol", low=0.0),
            atol=_validate.number(atol, "atol", low=0.0),
            h_init=_validate.number(h_init, "h_init", low=0.0, strict=True),
            safety=_validate.number(safety, "safety", low=0.0, strict=True),
            exponent=_validate.number(exponent, "exponent", low=0.0, strict=True),
            max_steps=_validate.integer(max_steps, "max_steps", 1),
        )
        if opts["rtol"] == 0 and opts["atol"] == 0:
            raise ValueError("atol: rtol and atol cannot both be 0 (the error is divided by the tolerance)")
        sig = None
    elif sigmas is not None:
        if steps is not None:
            raise ValueError("steps: give steps or sigmas, not both (sigmas sets the steps)")
        sig = _check_sigmas(sigmas, sde)
    else:
        steps = DEFAULT_STEPS if steps is None else steps
        if schedule is None:
            schedule = DEFAULT_SCHEDULE[method]
        sig = sigma_schedule(sde, steps, schedule=schedule, rho=rho, eps=eps, denoise=denoise).tolist()
    if x_init is not None:
        x0 = _validate.batch(x_init, "x_init", min_dim=2, non_empty=True)
        shape = tuple(x0.shape)
    else:
        shape = _validate.shape(shape)
        if len(shape) < 2 or math.prod(shape) == 0:
            raise ValueError(f"shape: expected a non-empty (N, ...) shape with at least 2 dims, got {shape}")
        _validate.float_dtype(dtype)
    given = noise_lib.source(noise)
    stochastic = method == "adaptive" or eta > 0
    if x_init is None or stochastic:
        seed, sample_offset = noise_lib.chain_key(seed, sample_offset, shape, given)
    else:
        seed, sample_offset = 0, _validate.integer(sample_offset, "sample_offset", 0)
    key = (seed, sample_offset)

    with torch.no_grad():
        if x_init is not None:
            x = _start(x0)
        else:
            x = noise_lib.prior(
                sde, shape, seed=seed, sample_offset=sample_offset, given=given, dtype=dtype, device=device
            )
            x = _start(x) if given is not None else x
        if method == "adaptive":
            out, info = _adaptive(score_fn, sde, x, eps, opts, key, given, progress, denoise)
            return (out, info) if return_info else out
        fmt = _validate.updatable(x)
        K = len(sig) - 1
        total = 2 * K - (1 if sig[-1] == 0 else 0) if method == "heun" else K
        bar = Progress(total, f"solve {method}", unit="eval", enabled=progress)
        try:
            model = _Model(score_fn, sde, sig, x, fmt, bar)
            hat = model.kind == "denoiser"  # a denoiser takes (and the solver then steps) x_hat = x / m
            if hat and model.m_first != 1.0:
                x.mul_(1.0 / model.m_first)
            model.states = [x]
            if method == "ddim":
                out = _ddim(model, x, sig, eta, key, given)
            elif method == "heun":
                out = _heun(model, x, sig)
            else:
                out = _dpm(model, x, sig)
            if hat and sig[-1] != 0 and model.m_last != 1.0:
                out.mul_(model.m_last)  # not denoised: back to the SDE's state x = m x_hat
        finally:
            bar.close()
    if not return_info:
        return out
    n = torch.full((shape[0],), model.count, dtype=torch.int64)
    info = SolverInfo(method, model.count, n, torch.tensor(sig, dtype=torch.float64), torch.full_like(n, K),
                      torch.zeros_like(n))  # fmt: skip
    return out, info
