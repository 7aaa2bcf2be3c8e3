r"""Samplers: (annealed) Langevin dynamics of ncsn / ncsnv2 and the predictor-corrector sampler of score_sde.

Every sampler runs the network, then one fused in-place update of fastscore.ops.langevin_step (the noise is
made inside the kernel by a counter-based generator), so between two network evaluations nothing is
allocated, no chain of eager ops runs and nothing waits for the device:

- the state, the labels / times fed to the network and every per-step coefficient are set up once: the
  step sizes of all levels or time steps are precomputed as rows of a small table on the device, so a step
  passes a view of a row to the kernel;
- the noise of update k of sample n is ``counter_randn`` of ``(seed, counter=k)`` at global sample index
  ``sample_offset + n``: the same seed gives bitwise the same samples, and a sample does not depend on the
  batch it shares (run a shard with ``sample_offset`` set to its first sample's index);
- score_sde's batch-averaged Langevin corrector step (``batch_norm_step=True``) needs the norms of the score
  and of the noise: one fused reduction pass (into preallocated buffers), the step size computed into
  preallocated buffers, then the update pass.

``seed=None`` draws a seed from torch's default CPU generator (``torch.manual_seed`` then fixes it).
``progress=True`` reports progress on stderr with an ETA (tqdm's bar on a terminal; whole
lines, no carriage returns, when stderr is a file or a pipe). Each sampler returns
the final batch, or ``(final, intermediates)`` with ``return_intermediates=True`` (CPU copies of the
state after every ``intermediate_every``-th step; ncsn's variant records the state before each update).
The input ``x`` is never modified. Score functions are called under ``torch.no_grad()``; what they return
must have x's shape, dtype and device (anything else is an error naming ``score_fn``, as in
:func:`ode_sampler` and :func:`fastscore.likelihood.log_likelihood`).

Outside noise. Every sampler takes ``noise=``: ``None`` (the default: the counter-based generator above), a
``torch.Generator``, or a callable ``noise(shape, dtype, device) -> Tensor`` returning standard normals. With
a generator every normal is drawn as the original repositories draw it, ``torch.randn_like(x,
generator=noise)`` (the state's shape, dtype and memory layout), in the originals' order (below), so a run
started from the same state and seed reproduces a sample grid the originals made with ``torch.randn``:
pass ``torch.default_generator`` after ``torch.manual_seed(s)`` for their global generator, or a
generator on the state's device (one on another device is drawn there and copied). The drawn tensor is
handed to the same fused update (the kernels take a given noise tensor), so the arithmetic is unchanged;
each step then costs the draw (a ``normal_`` into a buffer allocated once, or the callable's own tensor).
Batch independence and ``sample_offset`` are properties of the counter-based generator only. Draw order
(which matters when the score function draws from the same generator): ncsnv2's sampler and score_sde's
correctors and reverse-diffusion / ancestral predictors draw after the score; ncsn's sampler
(``variant="ncsn"``), both inpainting samplers and score_sde's Euler-Maruyama predictor draw before it;
score_sde's PC sampler draws its prior first.

Metropolis-adjusted correctors. :func:`annealed_langevin` and :func:`pc_sampler` also take
``corrector="mala"`` or ``"hmc"`` with ``energy_fn``, an energy model's noise-conditional energy: each Langevin
update becomes an iteration of :func:`fastscore.mcmc.mala` / :func:`~fastscore.mcmc.hmc` (the same fused
passes) targeting the current level, at the Langevin corrector's step (docs/mcmc.md#annealed-correctors).

Conventions of the original code, and where fastscore differs:

- :func:`annealed_langevin`: ncsnv2's rules: level i step :math:`\alpha_i = \epsilon (\sigma_i/\sigma_L)^2`,
  ``x <- x + alpha_i s + sqrt(2 alpha_i) z``, then the Tweedie denoising ``x + sigma_L^2 s(x, L-1)``.
  ``variant="ncsn"`` follows ncsn (v1): no denoising by default and intermediates recorded *before* each
  update. The draw order of ncsn (noise before the score) versus ncsnv2 (after) only matters for a stateful
  generator (``noise=``): with the counter-based one the noise of a step is a function of its counter, so
  both orders give the same numbers. Step sizes are computed in float64 and rounded once to the compute
  dtype. The noise levels must not increase.
- :func:`pc_sampler`: score_sde's order (corrector steps, then the predictor, per time step) on the grid
  ``linspace(T, eps, N)`` (float32, as score_sde) with score_sde's truncated discrete indices; returns the
  last predictor's ``x_mean`` when ``denoise`` (with predictor ``none`` that is the noisy x, as in
  score_sde). The Langevin corrector's default step does not depend on the state (see :func:`pc_sampler`:
  score_sde's step size with the norms replaced by their expected values), so it samples the right
  distribution and a sample does not depend on its batch; ``batch_norm_step=True`` uses score_sde's batch
  means of the norms (one step for the whole batch, so a sample then depends on its batch). The prior is
  drawn from the counter-based generator (score_sde: torch's CPU generator, which
  ``noise=torch.default_generator`` reproduces), so that it too is reproducible per sample. Coefficients
  are computed once in float64 from the float32 tables (score_sde computes them every step in float32):
  results agree with score_sde's to float32 rounding.
- :func:`annealed_langevin_inpainting`: a general ``mask`` (1 on known entries) instead of the left half of
  3-channel images; ``variant="ncsnv2"`` (default) re-draws the perturbed known part every step and writes
  it before the update, ``variant="ncsn"`` draws it once per level and re-imposes it after every update.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastscore import _validate
from fastscore import mcmc as _mcmc
from fastscore import noise as noise_lib
from fastscore import sde as sde_lib
from fastscore._progress import Progress
from fastscore._validate import check_score
from fastscore.mcmc import hmc
from fastscore.mcmc import mala
from fastscore.ode import ode_sampler
from fastscore.ops.langevin_step import FusedUpdate
from fastscore.ops.langevin_step import step_limit
from fastscore.solvers import METHODS as SOLVERS
from fastscore.solvers import SolverInfo
from fastscore.solvers import sigma_schedule
from fastscore.solvers import solve

__all__ = [
    "langevin",
    "annealed_langevin",
    "annealed_langevin_inpainting",
    "pc_sampler",
    "pc_inpaint",
    "pc_colorize",
    "classifier_guidance",
    "solve",
    "mala",
    "hmc",
    "sigma_schedule",
    "SolverInfo",
    "SOLVERS",
    "ode_sampler",
    "PREDICTORS",
    "CORRECTORS",
    "MCMC_CORRECTORS",
]

PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral", "none")
CORRECTORS = ("langevin", "ald", "none")
# The Metropolis-adjusted correctors of an energy model (fastscore.mcmc; docs/mcmc.md), in annealed_langevin and
# pc_sampler: they need the energy (energy_fn), not only its score.
MCMC_CORRECTORS = ("mala", "hmc")
ALD_CORRECTORS = ("langevin",) + MCMC_CORRECTORS
N_LEAPFROG = 3  # the HMC corrector's default leapfrog steps per iteration
VARIANTS = ("ncsnv2", "ncsn")

# ---- argument checks (metadata only; each error names the argument) ---------------------------------------


def _state(x) -> Tensor:
    return _validate.batch(x, "x", min_dim=2, non_empty=True)


def _count(v, name: str, *, low: int = 1) -> int:
    return _validate.integer(v, name, low)


def _sigma_list(sigmas) -> list[float]:
    """The noise levels as Python floats (one host read at set-up), checked 1-D, positive, finite and not
    increasing (level i's step is ``step_lr (sigma_i / sigma_L)^2``: the annealing runs from the largest
    level down to the smallest, which is the last)."""
    values = _validate.float_list(sigmas, "sigmas")
    if not values:
        raise ValueError("sigmas: expected at least one noise level")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"sigmas: expected positive finite noise levels, got {values}")
    rises = [i for i in range(1, len(values)) if values[i] > values[i - 1]]
    if rises:
        i = rises[0]
        raise ValueError(
            f"sigmas: expected noise levels that do not increase (largest first, as ncsn / ncsnv2), got "
            f"sigmas[{i - 1}] = {values[i - 1]} < sigmas[{i}] = {values[i]}"
        )
    return values


def _intermediate_every(v) -> int:
    return _count(v, "intermediate_every")


def _mcmc_settings(corrector: str, energy_fn, n_leapfrog, return_acceptance, noise, cond: str) -> int:
    """The Metropolis-adjusted correctors' arguments, checked (``cond``: what energy_fn takes after x); the
    number of leapfrog steps."""
    n_leapfrog = _count(n_leapfrog, "n_leapfrog")
    _validate.flag(return_acceptance, "return_acceptance")
    if energy_fn is not None:
        _validate.function(energy_fn, "energy_fn")
    if corrector in MCMC_CORRECTORS:
        if energy_fn is None:
            raise ValueError(
                f"energy_fn: the {corrector!r} corrector needs the energy: pass energy_fn(x, {cond}) -> (N,) "
                "energies (the score is -grad_x E; fastscore.models.EnergyScore.energy)"
            )
        if noise is not None:
            raise ValueError(
                f"noise: the {corrector!r} corrector draws its proposals and decisions from the counter-based "
                "generator: leave noise=None"
            )
    else:
        if energy_fn is not None:
            raise ValueError(f"energy_fn: only the 'mala' and 'hmc' correctors use it, not {corrector!r}")
        if return_acceptance:
            raise ValueError(
                f"return_acceptance: acceptance rates come from the 'mala' and 'hmc' correctors, not {corrector!r}"
            )
    return n_leapfrog


def _with_acceptance(result, rates: Tensor | None):
    """A sampler's result, with the acceptance rates appended when asked for."""
    if rates is None:
        return result
    return (*result, rates) if isinstance(result, tuple) else (result, rates)


# ---- the loop's pieces -----------------------------------------------------------------------------------


def _progress_bar(total: int, enabled: bool, desc: str) -> Progress:
    """The samplers' progress report (fastscore._progress: tqdm's bar on a terminal, whole lines
    with an ETA elsewhere)."""
    return Progress(total, desc, enabled=enabled)


class _Chain:
    """The state of a chain and what its steps share: the fused update, the score checks, the recording."""

    def __init__(self, x: Tensor, seed, sample_offset: int, record: bool, every: int, given=None):
        self.x = x
        self.N = x.shape[0]
        # Outside noise (noise=): the normals of a step are drawn into z (allocated once) and handed to the
        # same fused update; None: the kernels generate them from (seed, counter).
        self.update = FusedUpdate(x, seed=seed, sample_offset=sample_offset, noise_given=given is not None)
        self.fmt, self.acc = self.update.layout, self.update.compute_dtype
        self.counter = 0
        self.score_buf: Tensor | None = None
        self.outside = given
        self.z_buf = torch.empty_like(x, memory_format=self.fmt) if given is not None else None
        self.z: Tensor | None = None
        self.record, self.every, self.steps_done = record, every, 0
        self.intermediates: list[Tensor] = []

    def rows(self, table: list[list[float]]) -> list[Tensor]:
        """Per-step coefficient rows (a, b, c) as (N, 3) stride-0 views of one device table."""
        t = torch.tensor(table, dtype=self.acc, device=self.x.device).reshape(-1, 3)
        return [t[i : i + 1].expand(self.N, 3) for i in range(t.shape[0])]

    def score(self, out) -> Tensor:
        """The network's output checked against x (metadata only); copied into a reused buffer when its
        layout is not x's."""
        x = self.x
        check_score(out, x)
        if out.requires_grad:
            out = out.detach()
        if not out.is_contiguous(memory_format=self.fmt):
            if self.score_buf is None:
                self.score_buf = torch.empty_like(x, memory_format=self.fmt)
            out = self.score_buf.copy_(out)
        return out

    def draw(self) -> None:
        """With outside noise: draw the next update's normals now (for the originals that draw before the
        score). Nothing to do with the counter-based generator."""
        if self.outside is not None and self.z is None:
            self.z = self.outside.fill(self.z_buf)

    def noise(self) -> Tensor | None:
        """The next update's outside normals (drawn now unless :meth:`draw` did), or None."""
        self.draw()
        z, self.z = self.z, None
        return z

    def step(self, score: Tensor, coef: Tensor, *, mask=None, known=None, x_mean=None, z=None) -> None:
        z = self.noise() if z is None else z
        self.update(score, coef, self.counter, noise=z, mask=mask, known=known, x_mean=x_mean)
        self.counter += 1

    def snapshot(self) -> None:
        if self.record and self.steps_done % self.every == 0:
            self.intermediates.append(self.x.detach().to("cpu", copy=True))

    def stepped(self) -> None:
        self.steps_done += 1

    def result(self, out: Tensor):
        return (out, self.intermediates) if self.record else out


def _start(x: Tensor) -> Tensor:
    """The chain's state: a copy of x in a layout the kernels update in place (x itself is not modified)."""
    fmt = (
        torch.channels_last
        if (x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))
        else torch.contiguous_format
    )
    return x.detach().clone(memory_format=fmt)


def _langevin_row(step: float) -> list[float]:
    return [1.0, step, math.sqrt(2.0 * step)]


# ---- Langevin dynamics --------------------------------------------------------------------------------------


def langevin(
    score_fn,
    x: Tensor,
    *,
    step_size,
    n_steps: int,
    seed: int | None = None,
    noise=None,
    progress: bool = False,
    return_intermediates: bool = False,
    intermediate_every: int = 1,
    sample_offset: int = 0,
):
    r"""Langevin dynamics :math:`x \leftarrow x + \epsilon\, s(x) + \sqrt{2\epsilon}\, z` for ``n_steps`` steps.

    ``score_fn(x) -> score`` (x's shape); ``x`` (N, ...) the initial batch (not modified); ``step_size``
    :math:`\epsilon \ge 0`: a float, or an (N,) tensor (one step per sample). ncsn's toy
    ``langevin_dynamics(lr)`` is ``step_size = lr / 2``. ``noise``: where z comes from: ``None`` (the
    counter-based generator keyed by ``seed``), a ``torch.Generator`` (z drawn after the score as
    ``torch.randn_like(x, generator=noise)``, as ncsn's toy loop does) or a callable ``noise(shape, dtype,
    device) -> Tensor`` (see the module docstring). Returns the final batch.
    """
    _validate.function(score_fn, "score_fn")
    x = _state(x)
    n_steps = _count(n_steps, "n_steps", low=0)
    N = x.shape[0]
    if isinstance(step_size, Tensor):
        _validate.floating(step_size, "step_size")
        if step_size.shape not in ((N,), ()):
            raise ValueError(f"step_size: expected a float or a tensor of shape ({N},), got {tuple(step_size.shape)}")
        steps = step_size.detach().to("cpu", torch.float64).expand(N)
        if not bool((steps >= 0).all()) or not bool(torch.isfinite(steps).all()):
            raise ValueError("step_size: expected non-negative finite values")
        values = steps.tolist()
    else:
        values = [_validate.number(step_size, "step_size", low=0.0)]
    limit, why = step_limit(x)  # the fused update's own bound: a larger step overflows the update
    if not all(v <= limit for v in values):
        raise ValueError(f"step_size: {why}; got {max(values)!r}")
    table = [_langevin_row(v) for v in values]
    _validate.flag(progress, "progress")
    _validate.flag(return_intermediates, "return_intermediates")
    every = _intermediate_every(intermediate_every)
    given = noise_lib.source(noise)
    seed, sample_offset = noise_lib.chain_key(seed, sample_offset, x.shape, given)
    with torch.no_grad():
        chain = _Chain(_start(x), seed, sample_offset, return_intermediates, every, given)
        coef = torch.tensor(table, dtype=chain.acc, device=x.device).expand(N, 3)
        bar = _progress_bar(n_steps, progress, "langevin")
        try:
            for _ in range(n_steps):
                chain.step(chain.score(score_fn(chain.x)), coef)
                chain.stepped()
                chain.snapshot()
                bar.update()
        finally:
            bar.close()
    return chain.result(chain.x)


def annealed_langevin(
    score_fn,
    x: Tensor,
    sigmas,
    *,
    n_steps_each: int,
    step_lr: float,
    denoise: bool | None = None,
    seed: int | None = None,
    noise=None,
    variant: str = "ncsnv2",
    progress: bool = False,
    return_intermediates: bool = False,
    intermediate_every: int = 1,
    sample_offset: int = 0,
    corrector: str = "langevin",
    energy_fn=None,
    n_leapfrog: int = N_LEAPFROG,
    return_acceptance: bool = False,
):
    r"""Annealed Langevin dynamics of ncsn / ncsnv2 (ncsn's and ncsnv2's ``anneal_Langevin_dynamics``).

    ``score_fn(x, labels)`` with ``labels`` an int64 (N,) tensor of level indices (0 = largest sigma);
    ``sigmas`` (L,) noise levels from the largest to the smallest (tensor or sequence; increasing levels
    are refused: the step rule scales by the last level); for level i, ``n_steps_each`` steps of
    :math:`x \leftarrow x + \alpha_i s + \sqrt{2\alpha_i}\, z` with
    :math:`\alpha_i = \text{step\_lr}\,(\sigma_i/\sigma_L)^2`; then, when ``denoise`` (default: True for
    ``variant="ncsnv2"``, False for ``"ncsn"``), :math:`x \leftarrow x + \sigma_L^2 s(x, L-1)` (one more
    network call). ``variant="ncsn"`` records intermediates before each update, as ncsn. ``noise``: where z
    comes from: ``None`` (the counter-based generator keyed by ``seed``), a ``torch.Generator`` or a
    callable ``noise(shape, dtype, device) -> Tensor`` (module docstring); with a generator z is drawn as
    ``torch.randn_like(x, generator=noise)`` after the score (ncsnv2) or before it (``variant="ncsn"``), so
    the originals' loops run with ``torch.manual_seed(s)`` are reproduced by ``noise=torch.default_generator``
    after the same ``torch.manual_seed(s)`` and the same start. Returns the final batch.

    Annealed MALA / HMC (docs/mcmc.md#annealed-correctors): ``corrector="mala"`` or ``"hmc"`` replaces each
    Langevin update by a Metropolis-adjusted iteration targeting the level's perturbed density
    :math:`\propto e^{-E(x, i)}`, with ``energy_fn(x, labels) -> (N,)`` the noise-conditional energy (its score
    :math:`-\nabla_x E` by one backward pass, as :mod:`fastscore.mcmc`; ``score_fn`` is then only called for
    the final denoising). MALA steps :math:`\alpha_i`; HMC takes ``n_leapfrog`` leapfrog steps of
    :math:`h_i = \sqrt{2\alpha_i}` (one leapfrog step of h moves as the Langevin step of :math:`\alpha_i`),
    so ``n_leapfrog`` network calls per iteration. Each level starts with one more call (the energy and score
    of the current state under the level's energy). Iteration k of the whole run (level i, step j:
    ``k = i n_steps_each + j``) draws from counter k, so levels never share noise and samples stay
    batch-independent and bitwise reproducible. ``return_acceptance=True`` appends the (L, N) float64
    per-level, per-sample acceptance rates to the result. ``noise`` must be None.
    """
    _validate.function(score_fn, "score_fn")
    x = _state(x)
    corrector = _validate.choice(corrector, "corrector", ALD_CORRECTORS)
    n_leapfrog = _mcmc_settings(corrector, energy_fn, n_leapfrog, return_acceptance, noise, "labels")
    sig = _sigma_list(sigmas)
    n_steps_each = _count(n_steps_each, "n_steps_each", low=0)
    step_lr = _validate.number(step_lr, "step_lr", low=0.0)
    variant = _validate.choice(variant, "variant", VARIANTS)
    denoise = (variant == "ncsnv2") if denoise is None else _validate.flag(denoise, "denoise")
    _validate.flag(progress, "progress")
    _validate.flag(return_intermediates, "return_intermediates")
    every = _intermediate_every(intermediate_every)
    given = noise_lib.source(noise)
    seed, sample_offset = noise_lib.chain_key(seed, sample_offset, x.shape, given)
    L = len(sig)
    if corrector != "langevin":
        return _annealed_mcmc(
            score_fn, energy_fn, x, sig, n_steps_each, step_lr, denoise, seed, sample_offset, corrector, n_leapfrog,
            variant == "ncsn", progress, return_intermediates, every, return_acceptance,
        )  # fmt: skip
    with torch.no_grad():
        chain = _Chain(_start(x), seed, sample_offset, return_intermediates, every, given)
        rows = chain.rows([_langevin_row(step_lr * (s / sig[-1]) ** 2) for s in sig])
        labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        record_before = variant == "ncsn"
        bar = _progress_bar(L * n_steps_each, progress, "annealed langevin")
        try:
            for level in range(L):
                labels.fill_(level)
                for _ in range(n_steps_each):
                    if record_before:
                        chain.snapshot()
                        chain.draw()  # ncsn draws the noise before the score
                    chain.step(chain.score(score_fn(chain.x, labels)), rows[level])
                    chain.stepped()
                    if not record_before:
                        chain.snapshot()
                    bar.update()
            if denoise:
                labels.fill_(L - 1)
                chain.x.add_(chain.score(score_fn(chain.x, labels)), alpha=sig[-1] ** 2)
                if return_intermediates:
                    chain.intermediates.append(chain.x.detach().to("cpu", copy=True))
        finally:
            bar.close()
    return chain.result(chain.x)


def _annealed_mcmc(
    score_fn, energy_fn, x, sig, n_steps_each, step_lr, denoise, seed, sample_offset, kind, n_leapfrog,
    record_before, progress, record, every, return_acceptance,
):  # fmt: skip
    """:func:`annealed_langevin` with the MALA or HMC corrector (arguments checked)."""
    L, N = len(sig), x.shape[0]
    with torch.no_grad():
        chain = _Chain(_start(x), seed, sample_offset, record, every)
        state = chain.x
        steps = [_mcmc._corrector_step(step_lr * (s / sig[-1]) ** 2, kind, state, "step_lr") for s in sig]
        step = _mcmc._corrector(kind, state, seed, sample_offset, n_leapfrog)
        labels = torch.empty(N, dtype=torch.int64, device=x.device)
        rates = torch.zeros(L, N, dtype=torch.float64, device=x.device)

        def level_energy(h: Tensor) -> Tensor:
            return energy_fn(h, labels)

        bar = _progress_bar(L * n_steps_each, progress, f"annealed {kind}")
        try:
            for level in range(L):
                labels.fill_(level)
                if n_steps_each:  # the cached energy and score are the previous level's
                    step.chain.retarget(level_energy, f"at the start of level {level}")
                for j in range(n_steps_each):
                    if record_before:
                        chain.snapshot()
                    step(level * n_steps_each + j, steps[level])
                    rates[level] += step.chain.accepted
                    chain.stepped()
                    if not record_before:
                        chain.snapshot()
                    bar.update()
            if denoise:
                labels.fill_(L - 1)
                state.add_(chain.score(score_fn(state, labels)), alpha=sig[-1] ** 2)
                if record:
                    chain.intermediates.append(state.detach().to("cpu", copy=True))
        finally:
            bar.close()
    rates /= max(n_steps_each, 1)
    return _with_acceptance(chain.result(state), rates if return_acceptance else None)


def annealed_langevin_inpainting(
    score_fn,
    x: Tensor,
    known: Tensor,
    mask: Tensor,
    sigmas,
    *,
    n_steps_each: int = 100,
    step_lr: float = 8e-6,
    denoise: bool = False,
    seed: int | None = None,
    noise=None,
    variant: str = "ncsnv2",
    progress: bool = False,
    return_intermediates: bool = False,
    intermediate_every: int = 1,
    sample_offset: int = 0,
):
    r"""Annealed Langevin inpainting (ncsn's and ncsnv2's ``anneal_Langevin_dynamics_inpainting``): fills
    the entries where ``mask`` is 0, keeping the ``known`` ones (``mask`` 1).

    ``known``, ``mask``: broadcastable to x (e.g. (1, C, H, W) or (N, C, H, W)); mask values in [0, 1]. At
    level i the known part is replaced by its perturbed version :math:`k + \sigma_i z`: re-drawn before
    every step (``variant="ncsnv2"``) or drawn once per level and re-imposed after every update
    (``variant="ncsn"``). Steps as :func:`annealed_langevin` (the same ``sigmas`` rule). ``denoise=True``
    adds the Tweedie step :math:`x + \sigma_L^2 s(x, L-1)` and then restores the clean known part (neither
    reference denoises). ``noise``: as :func:`annealed_langevin`; with outside noise each step draws, as
    both originals do, the perturbation of the known part first (one normal per entry where ``mask`` is not
    0, in x's row-major order: for the originals' left-half mask exactly their ``torch.randn_like`` of the
    known half), then the update's noise, then calls the score. Returns the final batch.
    """
    _validate.function(score_fn, "score_fn")
    x = _state(x)
    full = []
    for t, name in ((known, "known"), (mask, "mask")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor broadcastable to x, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on x's device {x.device}, got {t.device}")
        try:
            full.append(torch.broadcast_to(t, x.shape))
        except RuntimeError:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not broadcast to x's {tuple(x.shape)}") from None
    if mask.dtype != torch.bool:
        _validate.floating(mask, "mask")
        if not bool(((mask >= 0) & (mask <= 1)).all()):
            raise ValueError("mask: expected a bool tensor or values in [0, 1]")
    sig = _sigma_list(sigmas)
    n_steps_each = _count(n_steps_each, "n_steps_each", low=0)
    step_lr = _validate.number(step_lr, "step_lr", low=0.0)
    variant = _validate.choice(variant, "variant", VARIANTS)
    _validate.flag(denoise, "denoise")
    _validate.flag(progress, "progress")
    _validate.flag(return_intermediates, "return_intermediates")
    every = _intermediate_every(intermediate_every)
    given = noise_lib.source(noise)
    seed, sample_offset = noise_lib.chain_key(seed, sample_offset, x.shape, given)
    L = len(sig)
    with torch.no_grad():
        chain = _Chain(_start(x), seed, sample_offset, return_intermediates, every, given)
        state = chain.x
        known_x = full[0].to(x.dtype).contiguous(memory_format=chain.fmt)
        mask_x = full[1].to(x.dtype).contiguous(memory_format=chain.fmt)
        perturbed = torch.empty_like(state)  # k + sigma_i z, rewritten in place
        level_sigma = torch.tensor(sig, dtype=x.dtype, device=x.device)
        rows = chain.rows([_langevin_row(step_lr * (s / sig[-1]) ** 2) for s in sig])
        labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        known_draws = 0
        if given is not None:
            # The originals draw normals for the known entries only (randn_like of the known half): one per
            # entry where mask != 0, in x's row-major order, scattered into a zero image.
            known_index = (full[1] != 0).reshape(-1).nonzero().squeeze(1)
            known_flat = torch.zeros(x.numel(), dtype=x.dtype, device=x.device)

        def draw_perturbed_known(level: int) -> None:
            nonlocal known_draws
            if given is None:
                chain.update.randn_into(perturbed, noise_lib.KNOWN_COUNTER + known_draws)
            else:
                z = given.draw((known_index.numel(),), x.dtype, x.device)
                perturbed.copy_(known_flat.index_copy_(0, known_index, z).view(x.shape))
            known_draws += 1
            perturbed.mul_(level_sigma[level]).add_(known_x)
            state.lerp_(perturbed, mask_x)  # x <- mask k + (1 - mask) x

        bar = _progress_bar(L * n_steps_each, progress, "annealed langevin inpainting")
        try:
            for level in range(L):
                labels.fill_(level)
                if variant == "ncsn":
                    draw_perturbed_known(level)
                for _ in range(n_steps_each):
                    if variant == "ncsnv2":
                        draw_perturbed_known(level)
                    chain.draw()  # both originals draw the update's noise before the score
                    score = chain.score(score_fn(state, labels))
                    if variant == "ncsn":
                        chain.step(score, rows[level], mask=mask_x, known=perturbed)
                    else:
                        chain.step(score, rows[level])
                    chain.stepped()
                    chain.snapshot()
                    bar.update()
            if denoise:
                labels.fill_(L - 1)
                state.add_(chain.score(score_fn(state, labels)), alpha=sig[-1] ** 2)
                state.lerp_(known_x, mask_x)
        finally:
            bar.close()
    return chain.result(state)


# ---- predictor-corrector ---------------------------------------------------------------------------------


def _time_grid(sde, eps: float) -> tuple[list[float], list[int]]:
    """score_sde's grid ``linspace(T, eps, N)`` in float32 and its truncated indices ``long(t (N-1) / T)``."""
    ts = torch.linspace(sde.T, eps, sde.N)
    idx = (ts * (sde.N - 1) / sde.T).long()
    return ts.tolist(), idx.tolist()


def _predictor_table(sde, predictor: str, ts: list[float], idx: list[int], probability_flow: bool) -> list[list[float]]:
    """Rows (a, b, c) of the predictor update x_mean = a x + b s, x = x_mean + c z (sde_update_'s table)."""
    N = sde.N
    w = 0.5 if probability_flow else 1.0
    noise = 0.0 if probability_flow else 1.0
    t64 = torch.tensor(ts, dtype=torch.float64)
    rows = []
    if predictor == "euler_maruyama" or (predictor == "reverse_diffusion" and isinstance(sde, sde_lib.subVPSDE)):
        # Euler-Maruyama on the reverse SDE with dt = -1/N (and subVP's base discretize, the same update).
        fa = sde.drift_coef(t64)
        g = sde.diffusion_coef(t64)
        fa = fa if isinstance(fa, Tensor) else torch.full_like(t64, fa)
        for f_i, g_i in zip(fa.tolist(), g.tolist()):
            rows.append([1.0 - f_i / N, w * g_i * g_i / N, noise * g_i / math.sqrt(N)])
        return rows
    if isinstance(sde, sde_lib.VESDE):
        sig = sde.discrete_sigmas.tolist()
        for i in idx:
            s2 = sig[i] ** 2
            p2 = sig[i - 1] ** 2 if i > 0 else 0.0
            if predictor == "reverse_diffusion":
                rows.append([1.0, w * (s2 - p2), noise * math.sqrt(s2 - p2)])
            else:  # ancestral
                rows.append([1.0, s2 - p2, math.sqrt(p2 * (s2 - p2) / s2)])
        return rows
    betas = sde.discrete_betas.tolist()
    alphas = sde.alphas.tolist()
    for i in idx:
        b = betas[i]
        if predictor == "reverse_diffusion":
            rows.append([2.0 - math.sqrt(alphas[i]), w * b, noise * math.sqrt(b)])
        else:  # ancestral, VP
            r = 1.0 / math.sqrt(1.0 - b)
            rows.append([r, b * r, math.sqrt(b)])
    return rows


def _corrector_alpha(sde, idx: list[int]) -> list[float]:
    """score_sde's alpha_i of the correctors: 1 - beta_i for VP and sub-VP, 1 for VE."""
    if isinstance(sde, sde_lib.VESDE):
        return [1.0] * len(idx)
    alphas = sde.alphas.tolist()
    return [alphas[i] for i in idx]


def _expected_norm_steps(sde, ts: list[float], alphas: list[float], snr: float) -> list[float]:
    r"""The default Langevin corrector step at each time: score_sde's step size with the norms replaced by
    their expected values, :math:`\epsilon_i = 2 \alpha_i (\mathrm{snr}\, s(t_i))^2`.

    score_sde's ``LangevinCorrector`` takes :math:`\epsilon = 2 \alpha_i (\mathrm{snr}\, \|z\| / \|g\|)^2`
    from the current noise z and score g. Computed per sample, that step depends on the state, and Langevin
    dynamics without a Metropolis correction then samples a tilted law: with :math:`\epsilon(x) \propto
    1/\|g(x)\|^2` the small-step stationary density is :math:`p(x) \|g(x)\|^2`, whose variance is
    :math:`(D + 2)/D` times the target's for a Gaussian in D dims (score_sde avoids most of it by averaging
    the norms over the batch, which makes each sample depend on its batch). Replace both norms by their
    expectations instead: :math:`E\|z\|^2 = D`; at time t the perturbation kernel is
    :math:`p_{0t}(x_t | x_0) = N(m(t) x_0, s(t)^2 I)`, so for data whose spread is small next to
    :math:`s(t)` the marginal is :math:`p_t \approx N(m(t) \mu, s(t)^2 I)` and :math:`E\|g\|^2 =
    E\|\nabla \log p_t\|^2 = D / s(t)^2` (the Fisher information of the kernel). Then
    :math:`E\|z\|^2 / E\|g\|^2 = s(t)^2`, the marginal variance of the kernel, and

    .. math::
        \epsilon_i = 2 \alpha_i (\mathrm{snr}\, s(t_i))^2, \qquad
        \text{VE: } \alpha_i = 1,\ s = \sigma(t); \quad
        \text{VP: } \alpha_i = 1 - \beta_i,\ s^2 = 1 - e^{2\,\mathrm{lmc}(t)}; \quad
        \text{sub-VP: } \alpha_i = 1 - \beta_i,\ s = 1 - e^{2\,\mathrm{lmc}(t)}

    (s from ``sde.marginal_prob``). For any data, :math:`E\|g\|^2 \le D / s^2` (the Fisher information of
    :math:`m x_0 + s z` is at most that of the Gaussian :math:`s z`; for Gaussian data of covariance
    :math:`\Sigma` it is :math:`\mathrm{tr}((m^2 \Sigma + s^2 I)^{-1})`): the step is never larger than the
    one the real data's expected norms would give. The step depends on t only, so the chain
    samples the target without bias from the step rule and every sample is independent of its batch. It is
    the step of score_sde's ``AnnealedLangevinDynamics`` corrector (``ald``), in score_sde's order of
    evaluation."""
    _, std = sde.marginal_prob(torch.zeros(len(ts), 1, dtype=torch.float64), torch.tensor(ts, dtype=torch.float64))
    return [(snr * s) ** 2 * 2.0 * a for s, a in zip(std.tolist(), alphas)]


class _BatchNormSteps:
    """score_sde's Langevin corrector step size, eps = 2 alpha_i (snr mean_b |z_b| / mean_b |g_b|)^2 (one step
    for the whole batch, from the batch means of the per-sample norms), computed from the op's fused norms
    into preallocated buffers."""

    def __init__(self, chain: _Chain, snr: float, alphas: list[float]):
        dev, N = chain.x.device, chain.N
        self.scale = torch.tensor([snr * snr * 2.0 * a for a in alphas], dtype=torch.float64, device=dev)
        self.coef = torch.ones(N, 3, dtype=chain.acc, device=dev)
        self.eps = torch.empty(N, dtype=torch.float64, device=dev)
        self.root = torch.empty(N, dtype=torch.float64, device=dev)
        self.partials = chain.update.norm_partials()  # (N, P, 2): per piece of a sample, |g|^2 and |z|^2
        self.sums = torch.empty(N, 2, dtype=torch.float64, device=dev)
        self.norm_sums = torch.empty(2, dtype=torch.float64, device=dev)
        self.ratio = torch.empty(1, dtype=torch.float64, device=dev)

    def __call__(self, chain: _Chain, score: Tensor, step: int, z: Tensor | None) -> Tensor:
        chain.update.norms_into(score, chain.counter, self.partials, noise=z)
        sums = torch.sum(self.partials, dim=1, out=self.sums)  # (N, 2): |g|^2, |z|^2
        # The ratio of the batch means of the norms is the ratio of their sums (torch.mean would allocate).
        sums.sqrt_()
        torch.sum(sums, dim=0, out=self.norm_sums)
        torch.div(self.norm_sums[1:], self.norm_sums[:1], out=self.ratio)
        self.ratio.square_()
        self.eps.copy_(self.ratio.expand_as(self.eps))
        self.eps.mul_(self.scale[step])
        torch.add(self.eps, self.eps, out=self.root)
        self.root.sqrt_()
        self.coef[:, 1].copy_(self.eps)
        self.coef[:, 2].copy_(self.root)
        return self.coef


def pc_sampler(
    score_fn,
    sde,
    shape,
    *,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    denoise: bool = True,
    seed: int | None = None,
    noise=None,
    eps: float | None = None,
    probability_flow: bool = False,
    batch_norm_step: bool = False,
    x_init: Tensor | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    return_intermediates: bool = False,
    intermediate_every: int = 1,
    sample_offset: int = 0,
    energy_fn=None,
    n_leapfrog: int = N_LEAPFROG,
    return_acceptance: bool = False,
):
    r"""score_sde's predictor-corrector sampler (score_sde's ``get_pc_sampler``).

    ``score_fn(x, t)`` with ``t`` a float (N,) tensor of times; ``sde`` a :class:`fastscore.sde.VESDE`,
    :class:`~fastscore.sde.VPSDE` or :class:`~fastscore.sde.subVPSDE` (its ``N`` is the number of time
    steps); ``shape`` (N, ...) of the batch. From the prior (or ``x_init``), for each ``t`` of
    ``linspace(T, eps, N)``: ``n_corrector_steps`` corrector steps, then one predictor step.

    - ``predictor``: ``euler_maruyama``, ``reverse_diffusion``, ``ancestral`` (VE and VP only, as score_sde)
      or ``none``; ``probability_flow=True`` makes the first two deterministic steps of the probability
      flow ODE.
    - ``corrector``: ``langevin``, ``ald`` or ``none``. Both Langevin correctors step
      :math:`x \leftarrow x + \epsilon g + \sqrt{2\epsilon} z` with score_sde's :math:`\alpha_i` (1 for VE,
      :math:`1 - \beta_i` for VP and sub-VP). ``ald`` (score_sde's ``AnnealedLangevinDynamics``, the ncsn
      rule): :math:`\epsilon_i = 2\alpha_i(\mathrm{snr}\, s(t_i))^2` with :math:`s(t)` the perturbation std
      at t (``sde.marginal_prob``). ``langevin``, by default, takes the same step: score_sde's
      ``LangevinCorrector`` rule :math:`\epsilon = 2\alpha_i(\mathrm{snr}\,\|z\|/\|g\|)^2` with the norms of
      the noise and the score replaced by their expected values, :math:`E\|z\|^2 / E\|g\|^2 = s(t)^2` for
      data of small spread (derivation: ``_expected_norm_steps``). The step does not depend on the state,
      so the chain samples the right distribution in every dimension and each sample is independent of
      its batch. ``batch_norm_step=True`` uses score_sde's rule itself, with the batch means of the
      per-sample norms (one step for the whole batch: score_sde's results, but a sample depends on the
      batch it is in). A step computed from each sample's own norms is not offered: a state-dependent step
      without a Metropolis correction samples a distorted law (for a Gaussian in D dims, variances
      inflated by about (D + 2) / D).
    - ``eps``: the last time (default: :func:`fastscore.sde.sampling_eps`, 1e-5 for VE, 1e-3 otherwise, as
      score_sde's configs);
      ``denoise``: return the last predictor's mean.
    - ``x_init``: an initial batch (not modified) instead of the prior draw, which is otherwise made from
      ``seed`` with the counter-based generator on ``device`` in ``dtype``.
    - ``noise``: where the normals come from: ``None`` (the counter-based generator keyed by ``seed``), a
      ``torch.Generator`` or a callable ``noise(shape, dtype, device) -> Tensor`` (module docstring). With
      a generator the prior is ``torch.randn(shape, generator=noise)`` times the prior std, then every
      corrector and predictor step draws ``torch.randn_like(x, generator=noise)`` in score_sde's order
      (after the score, except the Euler-Maruyama predictor, which draws before it; the probability-flow
      predictors draw too and multiply the draw by 0, as score_sde's).
    - ``corrector="mala"`` or ``"hmc"`` (docs/mcmc.md#annealed-correctors): Metropolis-adjusted corrector
      iterations targeting :math:`p_t \propto e^{-E(x, t)}`, with ``energy_fn(x, t) -> (N,)`` the
      time-conditional energy (score :math:`-\nabla_x E` by one backward pass; ``score_fn`` still drives the
      predictor). The step is the ``ald`` / default Langevin corrector's,
      :math:`\epsilon_i = 2\alpha_i(\mathrm{snr}\, s(t_i))^2`: MALA's step :math:`\epsilon_i`, HMC's
      ``n_leapfrog`` leapfrog steps of :math:`h_i = \sqrt{2\epsilon_i}`. The Metropolis test makes each
      iteration exact for :math:`p_{t_i}` whatever the step, so ``snr`` only trades acceptance against
      distance moved. Each time step with corrector iterations costs one more network call (the energy and
      score of the state the predictor left); corrector iterations and predictor steps share the step
      counter, so no two of them draw the same noise. ``return_acceptance=True`` appends the (N_t, N) float64
      per-time, per-sample acceptance rates to the result. ``noise`` must be None; ``batch_norm_step`` is the
      ``langevin`` corrector's.
    """
    settings = _pc_settings(
        score_fn, sde, predictor, corrector, snr, n_corrector_steps, denoise, probability_flow, batch_norm_step,
        progress, return_intermediates, intermediate_every, eps, correctors=CORRECTORS + MCMC_CORRECTORS,
    )  # fmt: skip
    settings["n_leapfrog"] = _mcmc_settings(settings["corrector"], energy_fn, n_leapfrog, return_acceptance, noise, "t")
    if settings["corrector"] in MCMC_CORRECTORS and batch_norm_step:
        raise ValueError("batch_norm_step: score_sde's batch-averaged step is the 'langevin' corrector's")
    settings["energy_fn"], settings["return_acceptance"] = energy_fn, return_acceptance
    if x_init is not None:
        x0 = _validate.batch(x_init, "x_init", min_dim=2, non_empty=True)
        shape = tuple(x0.shape)
    else:
        shape = _validate.shape(shape)
        if len(shape) < 2 or math.prod(shape) == 0:
            raise ValueError(f"shape: expected a non-empty (N, ...) shape with at least 2 dims, got {shape}")
        _validate.float_dtype(dtype)
    given = noise_lib.source(noise)
    seed, sample_offset = noise_lib.chain_key(seed, sample_offset, shape, given)
    with torch.no_grad():
        if x_init is not None:
            x = _start(x0)
        else:
            x = noise_lib.prior(
                sde, shape, seed=seed, sample_offset=sample_offset, given=given, dtype=dtype, device=device
            )
        chain = _Chain(x, seed, sample_offset, return_intermediates, settings["every"], given)
        return _pc_run(score_fn, sde, chain, settings, "pc sampler")


def _pc_settings(
    score_fn, sde, predictor, corrector, snr, n_corrector_steps, denoise, probability_flow, batch_norm_step,
    progress, return_intermediates, intermediate_every, eps, *, correctors=CORRECTORS,
) -> dict:  # fmt: skip
    """The PC samplers' shared arguments, checked (``correctors``: the ones the sampler offers)."""
    _validate.function(score_fn, "score_fn")
    sde = sde_lib.check_sde(sde, schedules=True)
    predictor = _validate.choice(predictor, "predictor", PREDICTORS)
    corrector = _validate.choice(corrector, "corrector", correctors)
    snr = _validate.number(snr, "snr", low=0.0)
    n_corrector_steps = _count(n_corrector_steps, "n_corrector_steps", low=0)
    for v, name in ((denoise, "denoise"), (probability_flow, "probability_flow"), (batch_norm_step, "batch_norm_step")):
        _validate.flag(v, name)
    _validate.flag(progress, "progress")
    _validate.flag(return_intermediates, "return_intermediates")
    every = _intermediate_every(intermediate_every)
    if predictor == "ancestral" and not isinstance(sde, (sde_lib.VESDE, sde_lib.VPSDE)):
        raise ValueError(f"predictor: 'ancestral' is defined for VESDE and VPSDE only, got {type(sde).__name__}")
    if predictor == "ancestral" and probability_flow:
        raise ValueError("probability_flow: the ancestral predictor has no probability-flow form")
    eps = sde_lib.sampling_eps(sde, eps)
    return dict(
        predictor=predictor, corrector=corrector, snr=snr, n_corrector_steps=n_corrector_steps, denoise=denoise,
        probability_flow=probability_flow, batch_norm_step=batch_norm_step, progress=progress, every=every, eps=eps,
    )  # fmt: skip


class _Replacement:
    r"""score_sde's conditioning of the PC sampler on known entries (its ``pc_inpainter`` / ``pc_colorizer``):
    after every corrector and predictor update, the entries where ``mask`` is 1 are replaced by the data
    diffused to the current time, :math:`m(t)\,d + s(t)\,z` with fresh normals z (drawn after the update's
    own, in score_sde's order; from the counter stream ``KNOWN_COUNTER + j`` for draw j). The replacement
    is the fused update's mask path: one pass per update."""

    def __init__(self, chain: _Chain, sde, data: Tensor, mask: Tensor):
        self.chain, self.sde = chain, sde
        self.data = data.contiguous(memory_format=chain.fmt)
        self.mask = mask.to(chain.x.dtype).contiguous(memory_format=chain.fmt)
        self.known = torch.empty_like(chain.x)
        self.draws = 0

    def mean_std(self, t: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = self.sde.marginal_prob(self.data, t)
        return mean, std.to(self.data.dtype).reshape((-1,) + (1,) * (self.data.dim() - 1))

    def perturbed(self, t: Tensor) -> Tensor:
        """The known entries' values at time t for the next update (fresh noise)."""
        mean, std = self.mean_std(t)
        chain = self.chain
        if chain.outside is None:
            chain.update.randn_into(self.known, noise_lib.KNOWN_COUNTER + self.draws)
        else:
            chain.draw()  # score_sde draws the update's noise first, then the data's
            z = chain.outside.fill(self.known)
            if z is not self.known:
                self.known.copy_(z)
        self.draws += 1
        return self.known.mul_(std).add_(mean)


def _pc_run(score_fn, sde, chain: _Chain, cfg: dict, desc: str, replace: _Replacement | None = None):
    """The PC loop of :func:`pc_sampler` (and, with ``replace``, of :func:`pc_inpaint` / :func:`pc_colorize`)
    from the chain's state; under torch.no_grad()."""
    x = chain.x
    predictor, corrector = cfg["predictor"], cfg["corrector"]
    ts, idx = _time_grid(sde, cfg["eps"])
    N = chain.N
    t_buf = torch.empty(N, dtype=x.dtype if x.dtype == torch.float64 else torch.float32, device=x.device)
    pred_rows = (
        chain.rows(_predictor_table(sde, predictor, ts, idx, cfg["probability_flow"])) if predictor != "none" else []
    )
    batch_steps = corrector == "langevin" and cfg["batch_norm_step"]
    mcmc_step = None
    if corrector in MCMC_CORRECTORS:
        energy_fn = cfg["energy_fn"]
        alphas = _expected_norm_steps(sde, ts, _corrector_alpha(sde, idx), cfg["snr"])
        mc_steps = [_mcmc._corrector_step(e, corrector, x, "snr") for e in alphas]
        mcmc_step = _mcmc._corrector(corrector, x, chain.update.seed, chain.update.sample_offset, cfg["n_leapfrog"])
        rates = torch.zeros(len(ts), N, dtype=torch.float64, device=x.device)

        def time_energy(h: Tensor) -> Tensor:
            return energy_fn(h, t_buf)

    elif corrector != "none":
        alphas = _corrector_alpha(sde, idx)
        if batch_steps:
            corr_steps = _BatchNormSteps(chain, cfg["snr"], alphas)
        else:
            corr_rows = chain.rows([_langevin_row(e) for e in _expected_norm_steps(sde, ts, alphas, cfg["snr"])])
    n_corr = 0 if corrector == "none" else cfg["n_corrector_steps"]
    x_mean = torch.empty_like(x) if cfg["denoise"] and predictor != "none" else None
    mask = replace.mask if replace is not None else None

    def known() -> Tensor | None:
        return replace.perturbed(t_buf) if replace is not None else None

    bar = _progress_bar(len(ts), cfg["progress"], desc)
    try:
        for i, t in enumerate(ts):
            t_buf.fill_(t)
            if mcmc_step is not None and n_corr:  # the cached energy and score are of another time and state
                mcmc_step.chain.retarget(time_energy, f"at time {t:g}")
            for _ in range(n_corr):
                if mcmc_step is not None:
                    mcmc_step(chain.counter, mc_steps[i])
                    chain.counter += 1
                    rates[i] += mcmc_step.chain.accepted
                    continue
                score = chain.score(score_fn(x, t_buf))
                if batch_steps:
                    chain.draw()  # the update's normals, then the known part's (score_sde's order)
                    k = known()
                    z = chain.noise()
                    chain.step(score, corr_steps(chain, score, i, z), z=z, mask=mask, known=k)
                else:
                    k = known()
                    chain.step(score, corr_rows[i], mask=mask, known=k)
            if predictor != "none":
                if predictor == "euler_maruyama":
                    chain.draw()  # score_sde's Euler-Maruyama predictor draws its noise before the score
                score = chain.score(score_fn(x, t_buf))
                last = i == len(ts) - 1
                k = known()
                chain.step(score, pred_rows[i], x_mean=x_mean if last else None, mask=mask, known=k)
            chain.stepped()
            chain.snapshot()
            bar.update()
    finally:
        bar.close()
    if x_mean is not None and replace is not None:
        # The known entries of the denoised result: the data's mean at the last time (score_sde writes the
        # noisy state, not its mean, into the unknown entries here: the denoised output keeps the mean).
        x_mean.lerp_(replace.mean_std(t_buf)[0], replace.mask)
    result = chain.result(x_mean if x_mean is not None else x)
    if not cfg.get("return_acceptance"):
        return result
    return _with_acceptance(result, rates / max(n_corr, 1))


# ---- controllable generation (score_sde's inpainting, colorization; classifier guidance) --------------------


def _condition(t, name: str, x: Tensor) -> Tensor:
    _validate.tensor(t, name)
    if t.dtype != torch.bool:
        _validate.floating(t, name)
    _validate.same_device(t, name, x)
    try:
        return torch.broadcast_to(t, x.shape)
    except RuntimeError:
        raise ValueError(f"{name}: shape {tuple(t.shape)} does not broadcast to {tuple(x.shape)}") from None


def pc_inpaint(
    score_fn,
    sde,
    known: Tensor,
    mask: Tensor,
    *,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    denoise: bool = True,
    seed: int | None = None,
    noise=None,
    eps: float | None = None,
    probability_flow: bool = False,
    batch_norm_step: bool = False,
    progress: bool = False,
    return_intermediates: bool = False,
    intermediate_every: int = 1,
    sample_offset: int = 0,
):
    r"""score_sde's predictor-corrector inpainter (``get_pc_inpainter``): samples the entries where ``mask``
    is 0 given ``known`` (N, ...) on the entries where it is 1.

    The start is ``known`` on the mask and the prior draw elsewhere; then the PC loop of :func:`pc_sampler`
    (the same arguments and defaults), and after every corrector and predictor update the masked entries
    are replaced by the data diffused to the current time, :math:`m(t)\,k + s(t)\,z` (``sde.marginal_prob``;
    fresh normals each time). ``mask``: broadcastable to ``known`` (e.g. (1, 1, H, W)), 1 (or True) on the
    known entries, values in [0, 1]. Returns the batch (the last predictor's mean when ``denoise``, with the
    known entries at the data's mean at the last time).

    Replacing the known part by a diffused copy of it is an approximation of sampling the conditional
    :math:`p(x_u \mid x_k)`: it is exact when the unknown entries are independent of the known ones, and
    otherwise the unknown entries only see the known ones through the noisy replacement (score_sde's paper
    says the same; docs/numerics.md#controllable-generation measures how far it is for a correlated
    Gaussian). Difference from score_sde: its denoised output puts the noisy state, not the predictor's mean,
    in the unknown entries (it recombines ``x`` instead of ``x_mean``); here the mean is kept, as in
    :func:`pc_sampler`. With ``denoise=False`` and ``noise=`` a generator the result is score_sde's, draw for
    draw (the prior, then per update the update's normals, then the known part's).
    """
    settings = _pc_settings(
        score_fn, sde, predictor, corrector, snr, n_corrector_steps, denoise, probability_flow, batch_norm_step,
        progress, return_intermediates, intermediate_every, eps,
    )  # fmt: skip
    known = _validate.batch(known, "known", min_dim=2, non_empty=True)
    mask_full = _condition(mask, "mask", known)
    if mask.dtype != torch.bool and not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ValueError("mask: expected a bool tensor or values in [0, 1]")
    given = noise_lib.source(noise)
    shape = tuple(known.shape)
    seed, sample_offset = noise_lib.chain_key(seed, sample_offset, shape, given)
    with torch.no_grad():
        m = mask_full.to(known.dtype)
        prior = noise_lib.prior(
            sde, shape, seed=seed, sample_offset=sample_offset, given=given, dtype=known.dtype, device=known.device
        )
        x = _start(known * m + prior * (1 - m))
        chain = _Chain(x, seed, sample_offset, return_intermediates, settings["every"], given)
        replace = _Replacement(chain, sde, known.detach(), m)
        return _pc_run(score_fn, sde, chain, settings, "pc inpainting", replace)


# score_sde's pc_colorizer: an orthonormal change of colour coordinates whose first axis is the gray level,
# (r + g + b) / sqrt(3); the other two span the colour. Written here from its exact entries (score_sde stores
# them rounded to float32).
_COLOR_BASIS = torch.tensor(
    [
        [1 / math.sqrt(3), -2 / math.sqrt(6), 0.0],
        [1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)],
        [1 / math.sqrt(3), 1 / math.sqrt(6), -1 / math.sqrt(2)],
    ],
    dtype=torch.float64,
)


def _decouple(x: Tensor) -> Tensor:
    return torch.einsum("bihw,ij->bjhw", x, _COLOR_BASIS.to(x.device, x.dtype))


def _couple(y: Tensor) -> Tensor:
    return torch.einsum("bjhw,ij->bihw", y, _COLOR_BASIS.to(y.device, y.dtype))


def pc_colorize(
    score_fn,
    sde,
    gray: Tensor,
    *,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    denoise: bool = True,
    seed: int | None = None,
    eps: float | None = None,
    probability_flow: bool = False,
    progress: bool = False,
    sample_offset: int = 0,
):
    r"""score_sde's predictor-corrector colorizer (``get_pc_colorizer``): colour images whose gray level is
    ``gray``.

    ``gray``: (N, 3, H, W) with the gray level in all three channels (score_sde's convention; an
    (N, 1, H, W) tensor is repeated). In the orthonormal colour coordinates :math:`y = M^\top x` whose
    first axis is the gray level, :math:`(r + g + b)/\sqrt3`, the gray channel is held fixed (replaced by
    its diffused value after every update, as :func:`pc_inpaint` does) while the other two are sampled. The
    chain runs in those coordinates: since M is orthonormal, the score there is :math:`M^\top s(M y)` and
    the isotropic noise is unchanged, so this is score_sde's algorithm with the replacement done by the
    fused update. Arguments and the denoised output as :func:`pc_inpaint`; returns (N, 3, H, W).
    """
    _validate.function(score_fn, "score_fn")
    gray = _validate.batch(gray, "gray", min_dim=4, non_empty=True)
    if gray.dim() != 4 or gray.shape[1] not in (1, 3):
        raise ValueError(f"gray: expected an (N, 3, H, W) or (N, 1, H, W) tensor, got shape {tuple(gray.shape)}")
    if gray.shape[1] == 1:
        gray = gray.expand(-1, 3, -1, -1)

    def decoupled_score(y: Tensor, t: Tensor) -> Tensor:
        x = _couple(y)
        return _decouple(_validate.check_score(score_fn(x, t), x))

    mask = torch.zeros(1, 3, 1, 1, dtype=gray.dtype, device=gray.device)
    mask[:, 0] = 1
    with torch.no_grad():
        data = _decouple(gray.detach())
    y = pc_inpaint(
        decoupled_score, sde, data, mask, predictor=predictor, corrector=corrector, snr=snr,
        n_corrector_steps=n_corrector_steps, denoise=denoise, seed=seed, eps=eps, probability_flow=probability_flow,
        progress=progress, sample_offset=sample_offset,
    )  # fmt: skip
    return _couple(y)


def classifier_guidance(score_fn, classifier_fn, y, scale: float = 1.0):
    r"""A score function of the class-conditional law: :math:`s(x, t) + \text{scale}\,\nabla_x \log
    \mathrm{softmax}(c(x, t))_y` (score_sde's class-conditional sampling with a noise-conditional
    classifier), usable by every sampler here (``score_fn(x, t)``, or ``(x, labels)``: the classifier is
    called with the same second argument).

    ``classifier_fn(x, t)``: logits (N, K). ``y``: the class per sample, an int64 (N,) tensor (or one int for
    all). The gradient takes one backward pass through the classifier per evaluation (autograd on, whatever
    the caller's grad mode); the score network runs without autograd. ``scale`` 1 samples
    :math:`p_t(x \mid y)`; larger values sharpen the class (at the cost of diversity).
    """
    _validate.function(score_fn, "score_fn")
    _validate.function(classifier_fn, "classifier_fn")
    scale = _validate.number(scale, "scale", low=0.0)
    if not isinstance(y, Tensor):
        _validate.integer(y, "y")
    elif y.dtype not in (torch.int64, torch.int32) or y.dim() != 1:
        raise (TypeError if y.dtype not in (torch.int64, torch.int32) else ValueError)(
            f"y: expected an int64 (N,) tensor of classes, got {y.dtype} of shape {tuple(y.shape)}"
        )

    def guided(x: Tensor, t) -> Tensor:
        labels = y if isinstance(y, Tensor) else torch.full((x.shape[0],), y, dtype=torch.int64, device=x.device)
        if labels.shape[0] != x.shape[0]:
            raise ValueError(f"y: expected {x.shape[0]} classes (one per sample of x), got {labels.shape[0]}")
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = classifier_fn(xg, t)
            if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"classifier_fn: expected logits of shape ({x.shape[0]}, K), got {got}")
            chosen = torch.log_softmax(logits, dim=1).gather(1, labels.to(logits.device).long()[:, None]).sum()
            (grad,) = torch.autograd.grad(chosen, xg)
        with torch.no_grad():
            s = score_fn(x, t)
            return s + scale * grad.to(s.dtype)

    return guided
