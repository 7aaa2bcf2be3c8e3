r"""Metropolis-adjusted samplers for energy-based models: MALA and HMC (docs/mcmc.md).

An energy network :math:`E(x)` (one energy per sample; its score :math:`s = -\nabla_x E` by one backward pass)
defines :math:`\pi(x) \propto e^{-E(x)}`. Langevin dynamics, ``x + eps s + sqrt(2 eps) z``, samples
:math:`\pi` only as the step goes to zero: at a finite step it has a stationary law of its own (for a
standard normal target, variance :math:`1 / (1 - \epsilon/2)`). A Metropolis-Hastings test after every
proposal makes the chain exact at any step -- it accepts the proposal with probability
:math:`\min(1, \pi(x') q(x|x') / (\pi(x) q(x'|x)))`, else stays -- at the price of the energy at every
proposal, which an energy model has for free:

- :func:`mala`: the Langevin step as the proposal (Roberts & Tweedie 1996);
- :func:`hmc`: ``n_leapfrog`` leapfrog steps of Hamiltonian dynamics with a fresh Gaussian momentum as the
  proposal (Duane et al. 1987; Neal 2011), accepted on the change of the total energy.

Both are per sample: every sample is its own chain, with its own step size (a float, or an (N,) tensor),
its own accept/reject decisions from the counter-based generator (so a sample's chain does not depend on
its batch: ``sample_offset`` names a shard's first sample, as for :mod:`fastscore.sampling`), and, with
``n_warmup`` > 0, its own step size adapted during the warm-up toward ``target_accept`` by dual averaging
(Hoffman & Gelman 2014, Algorithm 5, the rule of Stan and NUTS). Between two network evaluations a step is
two fused kernels (:mod:`fastscore.ops.metropolis`): the proposal (noise made in the kernel), and the
accept step, which replaces the accepted samples' state, score and energy in place.

Iteration k (warm-up iterations first) draws its normals and its uniforms from ``(seed, counter + k)``. The
network is called as ``energy_fn(x)`` with a tensor that requires grad, under ``torch.enable_grad()``, and
must return (N,) energies that depend on each sample alone (no batch statistics: a network in training mode
with batch norm would couple the chains).

The annealed correctors of :mod:`fastscore.sampling` (``corrector="mala"`` or ``"hmc"`` in ``annealed_langevin``
and ``pc_sampler``) run the same iteration (:class:`_Step`), one level or time at a time
(docs/mcmc.md#annealed-correctors).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastscore import _validate
from fastscore._progress import Progress
from fastscore.ops import metropolis as _mh

__all__ = ["MCMCResult", "mala", "hmc", "energy_and_score"]

MALA_TARGET = 0.574  # the optimal acceptance rate of MALA as the dimension grows (Roberts & Rosenthal 1998)
HMC_TARGET = 0.65  # and of HMC (Beskos, Pillai, Roberts, Sanz-Serna & Stuart 2013: 0.651)

# Dual averaging constants (Hoffman & Gelman 2014, section 3.2.1): shrinkage target mu = log(10 eps_0),
# gamma, t_0 and the averaging exponent kappa.
_DA_GAMMA, _DA_T0, _DA_KAPPA = 0.05, 10.0, 0.75


class MCMCResult(NamedTuple):
    """What :func:`mala` and :func:`hmc` return.

    - ``x``: the final state (x's shape, dtype and layout);
    - ``acceptance_rate``: (N,) float64, per sample the fraction of the ``n_steps`` proposals accepted
      (warm-up excluded);
    - ``mean_accept_prob``: (N,) float64, per sample the mean of :math:`\\min(1, \\alpha)` over the same
      proposals (the same expectation as ``acceptance_rate``, with less variance);
    - ``step_size``: (N,) float64, the step sizes the ``n_steps`` sampling iterations used (the adapted
      ones after a warm-up that adapts);
    - ``energy``: (N,) float64, the energies of the final state.
    """

    x: Tensor
    acceptance_rate: Tensor
    mean_accept_prob: Tensor
    step_size: Tensor
    energy: Tensor


# ---- the network ------------------------------------------------------------------------------------------


def energy_and_score(energy_fn, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(E, s)``: the energies ``energy_fn(x)`` as (N,) float64 and the score :math:`s = -\nabla_x \sum_n E_n`
    (x's shape, dtype and layout), by one forward and one backward pass, detached. The gradient is taken with
    respect to a leaf copy of x only (parameters' ``.grad`` are left alone); an energy that does not depend
    on x has score 0."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        e = energy_fn(xg)
        _check_energy(e, x)
        g = torch.autograd.grad(e.sum(), xg, allow_unused=True)[0] if e.requires_grad else None
    if g is None:
        score = torch.zeros_like(x)
    elif 0 in g.stride():  # a broadcast gradient (e.g. of x.sum(1)): not writable in place
        score = g.neg()
    else:
        score = g.neg_()
    return e.detach().to(torch.float64), score.contiguous(memory_format=_validate.memory_format(x))


def _check_energy(e, x: Tensor) -> None:
    if not isinstance(e, Tensor):
        raise TypeError(f"energy_fn: expected it to return a tensor of {x.shape[0]} energies, got {type(e).__name__}")
    if tuple(e.shape) != (x.shape[0],):
        raise ValueError(
            f"energy_fn: returned shape {tuple(e.shape)}, expected ({x.shape[0]},) (one energy per sample)"
        )
    if not e.is_floating_point():
        raise TypeError(f"energy_fn: returned {e.dtype} energies, expected a floating dtype")
    if e.device != x.device:
        raise ValueError(f"energy_fn: returned a tensor on {e.device}, expected x's device {x.device}")


# ---- argument checks --------------------------------------------------------------------------------------


def _steps(step_size, x: Tensor) -> Tensor:
    """The per-sample step sizes as an (N,) float64 tensor on x's device (checked as the ops check them)."""
    v = _mh._step(step_size, x)
    N = x.shape[0]
    if isinstance(v, Tensor):
        return v.to(device=x.device, dtype=torch.float64).expand(N).clone()
    return torch.full((N,), v, dtype=torch.float64, device=x.device)


def _target(v, name: str) -> float:
    v = _validate.number(v, name)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name}: expected a number in (0, 1), got {v:g}")
    return v


def _seed(seed) -> int:
    seed = _validate.seed(seed)
    return int(torch.randint(2**63 - 1, (), dtype=torch.int64).item()) if seed is None else seed


class _Adapter:
    """Per-sample dual averaging of log step sizes toward a target acceptance probability."""

    def __init__(self, steps: Tensor, target: float, x: Tensor):
        self.target = target
        self.mu = torch.log(10 * steps)
        self.h_bar = torch.zeros_like(steps)
        self.log_bar = torch.zeros_like(steps)
        self.m = 0
        # keep every step valid for the kernels: positive in the compute dtype, 2 step finite in it
        acc = _mh.acc_dtype(x.dtype)
        hi = min(torch.finfo(x.dtype).max, torch.finfo(acc).max / 2)
        self.lo, self.hi = math.log(torch.finfo(acc).tiny) + 1.0, math.log(hi) - 1.0

    def update(self, log_alpha: Tensor) -> Tensor:
        """The next step sizes after an iteration whose log acceptance ratios were ``log_alpha``."""
        self.m += 1
        m, w = self.m, 1.0 / (self.m + _DA_T0)
        accept_prob = torch.exp(log_alpha.clamp(max=0.0)).nan_to_num(nan=0.0)
        self.h_bar = (1 - w) * self.h_bar + w * (self.target - accept_prob)
        log_step = (self.mu - math.sqrt(m) / _DA_GAMMA * self.h_bar).clamp(self.lo, self.hi)
        eta = m ** (-_DA_KAPPA)
        self.log_bar = eta * log_step + (1 - eta) * self.log_bar
        return log_step.exp()

    def final(self) -> Tensor:
        return self.log_bar.clamp(self.lo, self.hi).exp()


def _checked(
    energy_fn, x, step_size, n_steps, n_warmup, target_accept, adapt, seed, counter, sample_offset, progress, default
):
    _validate.function(energy_fn, "energy_fn")
    x = _validate.batch(x, "x", non_empty=True)
    steps = _steps(step_size, x)
    n_steps = _validate.integer(n_steps, "n_steps", 0)
    n_warmup = _validate.integer(n_warmup, "n_warmup", 0)
    target = _target(default if target_accept is None else target_accept, "target_accept")
    _validate.flag(adapt, "adapt")
    _validate.flag(progress, "progress")
    seed = _seed(seed)
    counter = _validate.integer(counter, "counter", 0, 1 << 64)
    if counter + n_warmup + n_steps > 1 << 64:
        raise ValueError(f"counter: counter + n_warmup + n_steps = {counter + n_warmup + n_steps} exceeds 2^64")
    _mh._key(seed, counter, sample_offset, x)  # the offset, checked as the ops check it
    return x, steps, n_steps, n_warmup, target, seed, counter


class _Chain:
    """A batch of chains: the state, its score and energy, and the per-step buffers, allocated once.

    ``copy=False`` keeps ``x`` itself as the state (updated in place: the annealed correctors of
    :mod:`fastscore.sampling` share it with the predictor); ``energy_fn=None`` leaves the energy and score to a
    later :meth:`retarget`."""

    def __init__(self, energy_fn, x: Tensor, seed: int, counter: int, sample_offset: int, *, copy: bool = True):
        fmt = _validate.memory_format(x)
        self.x = x.detach().clone(memory_format=fmt) if copy else x
        self.seed, self.counter, self.sample_offset = seed, counter, sample_offset
        N = x.shape[0]
        self.x_prop = torch.empty_like(self.x)
        self.sq = torch.empty(N, dtype=torch.float64, device=x.device)
        self.accepted = torch.empty(N, dtype=torch.bool, device=x.device)
        self.log_alpha = torch.empty(N, dtype=torch.float64, device=x.device)
        self.n_accepted = torch.zeros(N, dtype=torch.float64, device=x.device)
        self.sum_prob = torch.zeros(N, dtype=torch.float64, device=x.device)
        if energy_fn is not None:
            self.retarget(energy_fn, "at the start x")

    def retarget(self, energy_fn, where: str) -> None:
        """Target ``energy_fn`` from the current state: its energy and score evaluated there (one network call).
        The cached ones belong to the previous target (an annealing schedule's previous level, or a state the
        predictor has moved since)."""
        self.energy_fn = energy_fn
        self.energy, self.score = energy_and_score(energy_fn, self.x)
        bad = torch.isnan(self.energy) | _validate.nonfinite_rows(self.score)
        if bool(bad.any()):  # such a chain could never accept a move (its log ratios would all be NaN)
            raise ValueError(
                f"energy_fn: NaN energies or non-finite scores {where}, in sample(s) "
                f"{_validate.some(bad.nonzero()[:, 0].tolist())}"
            )

    def key(self, k: int) -> tuple[int, int, int]:
        return _mh._wrap(self.seed), _mh._wrap(self.counter + k), self.sample_offset

    def evaluate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return energy_and_score(self.energy_fn, x)

    def record(self) -> None:
        self.n_accepted += self.accepted
        self.sum_prob += torch.exp(self.log_alpha.clamp(max=0.0)).nan_to_num(nan=0.0)

    def result(self, n_steps: int, steps: Tensor) -> MCMCResult:
        denom = max(n_steps, 1)
        return MCMCResult(self.x, self.n_accepted / denom, self.sum_prob / denom, steps, self.energy)


class _Step:
    """One Metropolis-Hastings iteration of MALA (``n_leapfrog=1``, no momentum) or HMC on a :class:`_Chain`:
    the proposal pass, the network at the proposal (and at every inner leapfrog step), the accept pass. The one
    implementation :func:`mala`, :func:`hmc` and the annealed correctors of :mod:`fastscore.sampling` run.
    ``step(k, steps)``: iteration k, with the normals and uniforms of ``counter + k``; ``steps`` a float or an
    (N,) float64 tensor (per sample)."""

    def __init__(self, chain: _Chain, kind: str, n_leapfrog: int = 1):
        self.chain, self.kind = chain, kind
        self.n_leapfrog = n_leapfrog if kind == "hmc" else 1  # a MALA proposal is one move, without momentum
        self.p = torch.empty_like(chain.x) if kind == "hmc" else None
        self._steps = self._coef = None

    def __call__(self, k: int, steps) -> None:
        chain, p = self.chain, self.p
        if steps is not self._steps:  # new step sizes (steps are replaced, never changed in place)
            self._steps, self._coef = steps, _mh._step_coef(steps, chain.x, self.kind)
        coef = self._coef
        key = chain.key(k)
        _mh._propose(chain.x, chain.score, coef, *key, chain.x_prop, p, chain.sq)
        e_prop, s_prop = chain.evaluate(chain.x_prop)
        for _ in range(self.n_leapfrog - 1):
            _mh._leapfrog(chain.x_prop, p, s_prop, coef)
            e_prop, s_prop = chain.evaluate(chain.x_prop)
        _mh._accept(
            chain.x,
            chain.score,
            chain.energy,
            chain.x_prop,
            s_prop,
            e_prop,
            p,
            chain.sq,
            coef,
            *key,
            chain.accepted,
            chain.log_alpha,
        )


def _corrector_step(alpha: float, kind: str, x: Tensor, name: str) -> float:
    r"""The step of an annealed corrector (:mod:`fastscore.sampling`) from the Langevin step :math:`\alpha` it
    replaces, checked as the ops check steps (errors name ``name``, the argument it comes from): MALA's step
    is :math:`\alpha` itself (its proposal is the Langevin step); HMC's leapfrog step is
    :math:`h = \sqrt{2\alpha}`, whose first leapfrog step moves x by :math:`h z + \tfrac{h^2}{2} s =
    \sqrt{2\alpha}\, z + \alpha s`, the same Langevin move. An (N,) float64 tensor, as :func:`mala` and
    :func:`hmc` hold their steps (so a level of the annealed MALA corrector is bitwise :func:`mala` with that
    step, the level's energy and the counter of its first iteration)."""
    return _steps(_mh._step(alpha if kind == "mala" else math.sqrt(2.0 * alpha), x, name), x)


def _corrector(kind: str, x: Tensor, seed: int, sample_offset: int, n_leapfrog: int) -> _Step:
    """The MH iteration of an annealed corrector on the state ``x`` itself (updated in place), counter 0
    (iteration k uses the sampler's own step counter k); each level or time sets its target with
    ``step.chain.retarget``."""
    return _Step(_Chain(None, x, seed, 0, sample_offset, copy=False), kind, n_leapfrog)


def _run(chain: _Chain, iteration, steps: Tensor, n_steps, n_warmup, target, adapt, progress, desc) -> MCMCResult:
    adapter = _Adapter(steps, target, chain.x) if (adapt and n_warmup > 0) else None
    bar = Progress(n_warmup + n_steps, desc, enabled=progress)
    try:
        with torch.no_grad():
            for k in range(n_warmup + n_steps):
                iteration(k, steps)
                if k < n_warmup:
                    if adapter is not None:
                        steps = adapter.update(chain.log_alpha)
                        if k == n_warmup - 1:
                            steps = adapter.final()
                else:
                    chain.record()
                bar.update()
    finally:
        bar.close()
    return chain.result(n_steps, steps)


# ---- the samplers -------------------------------------------------------------------------------------------


def mala(
    energy_fn,
    x: Tensor,
    step_size,
    n_steps: int,
    *,
    seed: int | None = None,
    counter: int = 0,
    n_warmup: int = 0,
    target_accept: float | None = None,
    adapt: bool = True,
    sample_offset: int = 0,
    progress: bool = False,
) -> MCMCResult:
    r"""The Metropolis-adjusted Langevin algorithm: ``n_warmup + n_steps`` iterations per sample of

    .. math::
        x' = x + \epsilon s(x) + \sqrt{2\epsilon}\, z, \qquad
        \log\alpha = E(x) - E(x') + \tfrac{|z|^2}{2} - \frac{|x - x' - \epsilon s(x')|^2}{4\epsilon},

    then :math:`x \leftarrow x'` if :math:`\log u \le \log\alpha`, with :math:`s = -\nabla E`. Returns
    :class:`MCMCResult` (final state, per-sample acceptance rates over the ``n_steps`` iterations, the step
    sizes used, the final energies). ``x`` is not modified.

    - ``energy_fn(x) -> (N,)``: the energies (any floating dtype, kept in float64); the score comes from one
      backward pass through it per evaluation (one evaluation per iteration, plus one at the start).
    - ``x``: the (N, ...) start, any floating dtype (the update's arithmetic in float32, float64 for float64),
      contiguous or channels_last.
    - ``step_size`` :math:`\epsilon > 0`: a float or an (N,) tensor (per sample).
    - ``n_warmup``: iterations before the ``n_steps`` recorded ones; with ``adapt`` (default) each sample's
      step is adapted during them toward ``target_accept`` (default 0.574, MALA's optimal rate in high
      dimension) by dual averaging, then frozen (a chain with a fixed step is exact).
    - ``seed`` (None: drawn from torch's default generator), ``sample_offset``: the counter-based generator's
      key, as the Langevin samplers'. Iteration k uses ``counter + k``: to continue a chain (or run the next
      level of an annealing schedule) with fresh noise, call again with ``counter`` advanced by
      ``n_warmup + n_steps`` (the same seed and counter give the same noise). ``progress``: report progress
      on stderr.
    """
    x, steps, n_steps, n_warmup, target, seed, counter = _checked(
        energy_fn,
        x,
        step_size,
        n_steps,
        n_warmup,
        target_accept,
        adapt,
        seed,
        counter,
        sample_offset,
        progress,
        MALA_TARGET,
    )
    chain = _Chain(energy_fn, x, seed, counter, sample_offset)
    iteration = _Step(chain, "mala")
    return _run(chain, iteration, steps, n_steps, n_warmup, target, adapt, progress, "mala")


def hmc(
    energy_fn,
    x: Tensor,
    step_size,
    n_leapfrog: int,
    n_steps: int,
    *,
    seed: int | None = None,
    counter: int = 0,
    n_warmup: int = 0,
    target_accept: float | None = None,
    adapt: bool = True,
    sample_offset: int = 0,
    progress: bool = False,
) -> MCMCResult:
    r"""Hamiltonian Monte Carlo: ``n_warmup + n_steps`` iterations per sample of a fresh momentum
    :math:`p_0 \sim N(0, I)`, ``n_leapfrog`` leapfrog steps of size h (:math:`p \leftarrow p + \tfrac{h}{2}s`,
    :math:`x \leftarrow x + h p`, :math:`p \leftarrow p + \tfrac{h}{2} s`, the inner half kicks merged), and
    the test on the total energy :math:`H = E(x) + |p|^2/2`:
    :math:`\log\alpha = H(x, p_0) - H(x', p_L)`. Returns :class:`MCMCResult`; ``x`` is not modified.

    ``n_leapfrog`` >= 1 score evaluations per iteration (the score at the start of a trajectory is the one
    cached at the current state). ``target_accept`` defaults to 0.65 (HMC's optimal rate in high dimension).
    The other arguments as :func:`mala`'s (``step_size`` is the leapfrog step h).
    """
    n_leapfrog = _validate.integer(n_leapfrog, "n_leapfrog", 1)
    x, steps, n_steps, n_warmup, target, seed, counter = _checked(
        energy_fn,
        x,
        step_size,
        n_steps,
        n_warmup,
        target_accept,
        adapt,
        seed,
        counter,
        sample_offset,
        progress,
        HMC_TARGET,
    )
    chain = _Chain(energy_fn, x, seed, counter, sample_offset)
    iteration = _Step(chain, "hmc", n_leapfrog)
    return _run(chain, iteration, steps, n_steps, n_warmup, target, adapt, progress, "hmc")
