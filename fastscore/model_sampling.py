"""Sampling a trained model as its config says: what ``fastscore sample``, ``fastscore likelihood``, the demo
and the training loop (its snapshot grids and its continuous-time loss) share, in one place.

Given a model, its config (an ncsnv2-style namespace) and its run metadata (the dict ``fastscore train`` keeps
in a checkpoint; of it only ``"loss"`` is read), this module

* maps a continuous time ``t`` to the model's noise label, :func:`time_to_label` (score_sde's rule for the
  discrete NCSN models), and says whether the network takes the time itself instead, :func:`takes_time`;
* builds the VE SDE spanning the model's noise levels, with the score function ``s(x, t)`` that the
  predictor-corrector and ODE samplers, the likelihood and the continuous-time loss call, :func:`sde_for`;
* starts and runs the samplers: annealed Langevin (:func:`annealed_langevin_sample`, which is
  :func:`fastscore.train.sample`; on an energy model also annealed MALA and HMC), inpainting (:func:`inpaint`),
  predictor-corrector and the probability-flow ODE, behind one entry point, :func:`sample`, that returns the
  samples in data space.

Every sample depends only on (seed, its index among the ``n``): :func:`sample` with ``rows`` computes a shard of
a run (the rows it names, bitwise the values those rows have in the whole run), which is how
:mod:`fastscore.distributed` splits a job across processes. For that the network is evaluated on at least
:data:`MIN_ROWS` rows (:func:`batch_invariant`).

The samplers themselves are reached only through their public functions (fastscore.sampling, fastscore.sde).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastscore.data.images import data_transform
from fastscore.data.images import inverse_data_transform
from fastscore.models import get_sigmas
from fastscore.models.configs import field

SAMPLERS = ("ald", "pc", "ode", "dpm", "heun", "ddim", "adaptive", "mala", "hmc")
MCMC_SAMPLERS = ("mala", "hmc")  # annealed MALA / HMC: energy models only (fastscore train --energy)
SOLVERS = ("dpm", "heun", "ddim", "adaptive")  # fastscore.solvers.solve's methods
SOLVER_STEPS = 20  # the few-step solvers' default number of steps

# The predictor-corrector sampler needs about 3 time steps per noise level of a label-conditioned model:
# on the shipped digits model (16 levels) 20 and 32 steps leave salt-and-pepper noise (mean difference of
# neighbouring pixels 0.33 and 0.26, against 0.09 for the data), 40 a visible grain (0.11), 50 and 100 give
# clean digits (0.088, 0.084); the reverse-diffusion predictor alone is the noisy part.
PC_STEPS_PER_LEVEL = 3
PC_SNR = 0.16  # the corrector's signal-to-noise ratio (score_sde's for the VE SDE)
ODE_TOLERANCE = 1e-3  # rtol = atol of the probability-flow ODE sampler
# The network sees at least this many rows (batch_invariant): on the CPU, MKL's matrix product (the ScoreMLP) takes
# another code path for 1 to 3 rows and oneDNN's convolutions (NCSNv2) for 1 row, and their results differ in the
# last bits from a row's result in a larger batch; from 4 rows on, a row's result depends neither on the batch size
# nor on its position (measured on torch 2.13's CPU build, one and two threads).
MIN_ROWS = 4


def pc_default_steps(levels: int) -> int:
    """The predictor-corrector sampler's default number of time steps: 3 per noise level, at least 100."""
    return max(PC_STEPS_PER_LEVEL * levels, 100)


def is_toy(config) -> bool:
    """Is the config's model the toy ScoreMLP (2-D points) rather than an image network?"""
    return field(config, "model.arch", "any", None) == "ScoreMLP"


def batch_invariant(fn, min_rows: int = MIN_ROWS):
    """``fn(x, c)`` (a network or score function of a batch and its labels or times) evaluated on at least
    ``min_rows`` rows: a smaller batch is padded with copies of its last row (in x's memory format) and the
    padding's results are dropped. Then a sample's score does not depend on how many samples share its batch
    (see :data:`MIN_ROWS`): an ODE run, whose batch shrinks as samples finish, and a shard of a run give each
    sample bitwise the values it gets in the whole run. Costs nothing from ``min_rows`` rows on; functional
    (``torch.cat``), so autograd and the divergence products see through it."""

    def call(x: Tensor, c: Tensor) -> Tensor:
        n = x.shape[0]
        if n >= min_rows or n == 0:
            return fn(x, c)
        extra = min_rows - n
        fmt = (
            torch.channels_last
            if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        xp = torch.cat([x, x[-1:].expand(extra, *x.shape[1:])]).contiguous(memory_format=fmt)
        cp = torch.cat([c, c[-1:].expand(extra)])
        return fn(xp, cp)[:n]

    for name in ("conditioning",):  # what takes_time reads from a model
        if hasattr(fn, name):
            setattr(call, name, getattr(fn, name))
    return call


def check_rows(rows, n: int) -> range:
    """``rows`` as a ``range`` of consecutive sample indices within ``[0, n)`` (None: all ``n``); ValueError
    naming ``rows`` otherwise."""
    if rows is None:
        return range(n)
    if not isinstance(rows, range) or rows.step != 1 or not 0 <= rows.start <= rows.stop <= n:
        raise ValueError(f"rows: expected a range of consecutive indices within [0, {n}) (a shard), got {rows!r}")
    return rows


# ---- time <-> noise level ---------------------------------------------------------------------------------------


def time_to_label(t: Tensor, T: float, levels: int) -> Tensor:
    """The noise label, at the VE SDE's time ``t``, of a network trained on ``levels`` discrete noise levels
    (geometric, largest first, spanned by the SDE): the nearest level, ``round((T - t)(L - 1))``, as score_sde
    feeds its discrete NCSN models (exact on the levels' own times), clamped to ``[0, L - 1]``.

    The clamp is right for such a network: it has one entry per level (NCSN's label embedding, NCSNv2's
    ``sigmas[labels]``) and nothing beyond, so the nearest level is the best it can do for a time outside
    ``[0, T]`` (an adaptive ODE step or a caller's time grid overshooting either end), where the unclamped index
    would run past the table (an IndexError) or, negative, wrap round to the other end of it. Inside ``[0, T]``
    the clamp changes no label, so the continuous-time loss, whose times lie in ``[eps, T]``, trains bitwise as
    it did unclamped."""
    return torch.round((T - t) * (levels - 1)).long().clamp_(0, levels - 1)


def takes_time(model, config, meta: dict | None = None) -> bool:
    """Does the network take the SDE's time (a ScoreMLP trained with loss ``"sde"``, which learns
    ``sigma_t * score``) rather than a noise label? The model says so when it can (``ScoreMLP.conditioning``;
    a torch.compile wrapper passes the attribute on), else the run does (its config's architecture and the loss
    in ``meta``)."""
    conditioning = getattr(model, "conditioning", None)
    if conditioning is not None:
        return conditioning == "time"
    return is_toy(config) and (meta or {}).get("loss") == "sde"


def sde_for(model, config, meta: dict | None = None, n_steps: int | None = None):
    """``(score_fn(x, t), sde)`` for the PC / ODE samplers, the likelihood and the continuous-time loss: the VE
    SDE spanning the model's noise levels (``sigma_min, sigma_max = sigma_L, sigma_1``) with ``n_steps`` time
    steps (default :func:`pc_default_steps`). A label-conditioned network gets the nearest level
    (:func:`time_to_label`); a time-conditioned one the time, its output divided by ``sigma_t`` (score_sde's
    ``scale_by_sigma``)."""
    from fastscore.sde import VESDE

    sigmas = get_sigmas(config).cpu()
    levels = len(sigmas)
    sde = VESDE(sigma_min=float(sigmas[-1]), sigma_max=float(sigmas[0]), N=n_steps or pc_default_steps(levels))
    if takes_time(model, config, meta):
        return (lambda x, t: model(x, t) / sde.marginal_prob(x, t)[1][:, None]), sde
    return (lambda x, t: model(x, time_to_label(t, sde.T, levels))), sde


def level_times(sigmas: Tensor) -> Tensor:
    """The time of each noise level for a time-conditioned model: the t whose marginal std is ``sigma_i``,
    ``sigma_t = sigma_L (sigma_1 / sigma_L)^t`` (all 1 for a single level)."""
    span = torch.log(sigmas[0] / sigmas[-1])
    return torch.log(sigmas / sigmas[-1]) / span if float(span) > 0 else torch.ones_like(sigmas)


def _label_score(model, config, meta: dict | None, sigmas: Tensor):
    """``score(x, labels)`` for annealed Langevin: the model itself, or for a time-conditioned one
    (:func:`takes_time`) the time of each level (the time whose marginal std is ``sigma_i``:
    ``sigma_t = sigma_L (sigma_1 / sigma_L)^t``) and the output divided by ``sigma_i``."""
    if not takes_time(model, config, meta):
        return model
    times = level_times(sigmas)

    def score(h, labels):
        return model(h, times[labels].to(h.dtype)) / sigmas[labels, None].to(h.dtype)

    return score


def energy_model(model):
    """The :class:`fastscore.models.EnergyScore` ``model`` is (or wraps: a torch.compile module), or None for a
    score network."""
    from fastscore.models.energy import EnergyScore

    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, EnergyScore) else None


def _label_energy(model, config, meta: dict | None, sigmas: Tensor):
    """``energy(x, labels) -> (N,)`` of an energy model for annealed MALA / HMC, the energy whose score is
    :func:`_label_score`'s: the network's energy, or for a time-conditioned one (which learns
    ``sigma_t * score``) its energy at each level's time divided by ``sigma_i``."""
    net = energy_model(model)
    if not takes_time(model, config, meta):
        return net.energy
    times = level_times(sigmas)

    def energy(h, labels):
        return net.energy(h, times[labels].to(h.dtype)) / sigmas[labels].to(h.dtype)

    return energy


# ---- samples ------------------------------------------------------------------------------------------------------


def _shape(config, n: int) -> tuple[int, ...]:
    if is_toy(config):
        return (n, field(config, "data.dim", "int+"))
    return (n, config.data.channels, config.data.image_size, config.data.image_size)


def _start(config, n: int, seed: int) -> Tensor:
    """ncsnv2's start, from ``seed``: ``U[0, 1)`` images through ``data_transform``, or ``sigma_1 z`` for
    vectors."""
    gen = torch.Generator().manual_seed(seed)
    if is_toy(config):
        return torch.randn(_shape(config, n), generator=gen) * float(get_sigmas(config)[0])
    return data_transform(config, torch.rand(_shape(config, n), generator=gen))


def _to_data(config, x: Tensor) -> Tensor:
    """Samples in data space: images mapped back to [0, 1] (``inverse_data_transform``), toy points as they are."""
    return x if is_toy(config) else inverse_data_transform(config, x)


def langevin_settings(config, n_steps_each: int | None = None, step_lr: float | None = None) -> tuple[int, float]:
    """``(n_steps_each, step_lr)``: the given ones, else ``config.sampling``'s, else ncsnv2's defaults."""
    return (
        n_steps_each or field(config, "sampling.n_steps_each", "int+", 100),
        step_lr or field(config, "sampling.step_lr", "number+", 2e-5),
    )


@torch.no_grad()
def annealed_langevin_sample(
    model,
    config,
    n: int,
    *,
    seed: int = 0,
    n_steps_each: int | None = None,
    step_lr: float | None = None,
    denoise: bool | None = None,
    progress: bool = False,
    init: Tensor | None = None,
    meta: dict | None = None,
    sample_offset: int = 0,
    guide=None,
    corrector: str = "langevin",
) -> Tensor:
    """``n`` samples by ncsnv2's annealed Langevin dynamics (``config.sampling`` unless overridden), on the
    model's device, in data space. Start: ``init``, or ncsnv2's from ``seed`` (:func:`_start`). ``meta``: the
    run's metadata, for :func:`takes_time`. ``sample_offset``: the global index of the first sample (a shard of
    a larger run, whose start ``init`` gives: the rows of the whole run's start). ``guide``: a
    :class:`Guidance` (class-conditional sampling). ``corrector="mala"`` or ``"hmc"``: annealed MALA / HMC
    over the same levels and steps (:func:`fastscore.sampling.annealed_langevin`'s correctors; an energy
    model only, :func:`energy_model`)."""
    from fastscore.sampling import annealed_langevin

    sigmas = get_sigmas(config).cpu()
    n_steps_each, step_lr = langevin_settings(config, n_steps_each, step_lr)
    if denoise is None:
        denoise = field(config, "sampling.denoise", "bool", True)
    device = next(model.parameters()).device
    x = init if init is not None else _start(config, n, seed)
    levels = sigmas.to(device)
    score = batch_invariant(_label_score(model, config, meta, levels))
    if guide is not None:
        score = guide.labels(score, levels)
    mcmc = {}
    if corrector != "langevin":
        if energy_model(model) is None:
            raise ValueError(f"corrector: {corrector!r} needs an energy model (fastscore train --energy)")
        if guide is not None:
            raise ValueError(f"guide: class-conditional sampling runs the Langevin corrector, not {corrector!r}")
        energy = batch_invariant(_label_energy(model, config, meta, levels))
        mcmc = dict(corrector=corrector, energy_fn=energy)
    out = annealed_langevin(
        score, x.to(device), levels, n_steps_each=n_steps_each,
        step_lr=step_lr, denoise=denoise, seed=seed, progress=progress, sample_offset=sample_offset, **mcmc,
    )  # fmt: skip
    return _to_data(config, out)


@torch.no_grad()
def inpaint(
    model,
    config,
    known: Tensor,
    mask: Tensor,
    *,
    seed: int = 0,
    n_steps_each: int | None = None,
    step_lr: float | None = None,
    progress: bool = False,
    rows: range | None = None,
) -> Tensor:
    """The unknown part (``mask == 0``) of the images ``known`` (in the model's input space, after
    ``data_transform``) filled in by ncsnv2's annealed Langevin inpainting (``config.sampling``'s steps unless
    overridden, with the final denoising step), in [0, 1]. ``rows``: only those images of ``known`` (a shard:
    their values in the whole run)."""
    from fastscore.sampling import annealed_langevin_inpainting

    n_steps_each, step_lr = langevin_settings(config, n_steps_each, step_lr)
    rows = check_rows(rows, len(known))
    start = _start(config, len(known), seed)[rows.start : rows.stop]
    if mask.dim() == known.dim() and mask.shape[0] == len(known) and len(known) > 1:
        mask = mask[rows.start : rows.stop]
    known = known[rows.start : rows.stop]
    if not len(rows):
        return _to_data(config, start)
    out = annealed_langevin_inpainting(
        batch_invariant(model), start, known, mask, get_sigmas(config).cpu(), n_steps_each=n_steps_each,
        step_lr=step_lr, denoise=True, seed=seed, progress=progress, sample_offset=rows.start,
    )  # fmt: skip
    return _to_data(config, out)


# ---- class-conditional sampling ------------------------------------------------------------------------------


class Guidance:
    """Classifier guidance for :func:`sample` (score_sde's class-conditional sampling): the score becomes
    ``s + scale * grad_x log softmax(classifier(x, sigma))_y`` (:func:`fastscore.sampling.classifier_guidance`),
    the classifier called with the noise level's std: ``sigmas[label]`` for annealed Langevin, the VE SDE's
    ``sigma_t`` for the PC and ODE samplers. ``classifier(x, sigma)``: logits (a
    :class:`fastscore.models.classifier.NoiseConditionalClassifier`). ``y``: one class for every sample, or an
    int64 (n,) tensor, one per sample (annealed Langevin and PC only: the ODE sampler's batch shrinks as
    samples finish). The classifier is evaluated batch-invariantly too (:func:`batch_invariant`)."""

    def __init__(self, classifier, y, scale: float = 1.0):
        self.classifier, self.y, self.scale = classifier, y, float(scale)

    def rows(self, rows: range) -> Guidance:
        """The guidance of a shard: ``y``'s entries for those rows."""
        if isinstance(self.y, Tensor) and self.y.dim() == 1:
            return Guidance(self.classifier, self.y[rows.start : rows.stop], self.scale)
        return self

    def labels(self, score, sigmas: Tensor):
        from fastscore.sampling import classifier_guidance

        clf = batch_invariant(lambda x, labels: self.classifier(x, sigmas[labels].to(x.dtype)))
        return classifier_guidance(score, clf, self.y, self.scale)

    def times(self, score, sde):
        from fastscore.sampling import classifier_guidance

        clf = batch_invariant(lambda x, t: self.classifier(x, sde.marginal_prob(x, t)[1].to(x.dtype)))
        return classifier_guidance(score, clf, self.y, self.scale)


@torch.no_grad()
def sample(
    model,
    config,
    n: int,
    *,
    sampler: str = "ald",
    meta: dict | None = None,
    seed: int = 0,
    n_steps_each: int | None = None,
    step_lr: float | None = None,
    sde_steps: int | None = None,
    snr: float = PC_SNR,
    steps: int | None = None,
    eta: float | None = None,
    known: Tensor | None = None,
    mask: Tensor | None = None,
    colorize: bool = False,
    guide: Guidance | None = None,
    progress: bool = False,
    rows: range | None = None,
) -> Tensor:
    """``n`` samples of a trained model in data space ([0, 1] for images, points for a toy) by ``sampler``:

    * ``"ald"``: ncsnv2's annealed Langevin dynamics (:func:`annealed_langevin_sample`; ``n_steps_each`` and
      ``step_lr`` default to ``config.sampling``'s); with ``known`` and ``mask``, inpainting (:func:`inpaint`);
    * ``"pc"``: score_sde's predictor-corrector sampler (``sde_steps`` time steps, default
      :func:`pc_default_steps`; corrector ``snr``); with ``known`` and ``mask``, score_sde's PC inpainter
      (:func:`fastscore.sampling.pc_inpaint`); with ``known`` (gray images, 3 channels) and ``colorize``, its
      PC colorizer (:func:`fastscore.sampling.pc_colorize`);
    * ``"ode"``: the probability-flow ODE (rtol = atol = 1e-3);
    * ``"dpm"``, ``"heun"``, ``"ddim"``, ``"adaptive"``: the few-step solvers (:func:`fastscore.solvers.solve`:
      DPM-Solver++(2M), Heun, DDIM, Gotta Go Fast) with ``steps`` steps (default 20; the adaptive solver chooses
      its own); ``eta``: DDIM's noise (default 0, deterministic; 1 is ancestral sampling, the best of them on
      the shipped digits model: docs/solvers.md#sampling-a-trained-model);
    * ``"mala"``, ``"hmc"``: annealed MALA / HMC over the config's noise levels, with annealed Langevin's
      levels, steps per level and step sizes (HMC: 3 leapfrog steps of ``sqrt(2 alpha_i)``; docs/mcmc.md) and
      its final denoising step; an energy model only (``fastscore train --energy``, :func:`energy_model`).

    ``guide``: a :class:`Guidance` (class-conditional sampling with a noise-conditional classifier), for every
    sampler but mala and hmc (not with inpainting or colorization).

    ``meta``: the run's metadata (a checkpoint's), for :func:`takes_time`. All noise comes from ``seed``.

    ``rows`` (a ``range`` within ``[0, n)``): compute only those samples of the ``n`` -- bitwise the rows
    ``rows`` of the whole run's result on the same machine and thread count, since a sample's start and noise
    depend only on (seed, its index) and the network is evaluated batch-invariantly (:func:`batch_invariant`).
    Returns ``len(rows)`` samples. :func:`fastscore.distributed.sample` runs one shard per process and gathers
    them."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler in MCMC_SAMPLERS and energy_model(model) is None:
        raise ValueError(
            f"sampler: {sampler!r} (annealed {sampler.upper()}) needs an energy model, and this is a score network: "
            "train one with fastscore train --energy"
        )
    if sampler in MCMC_SAMPLERS and guide is not None:
        raise ValueError(f"guide: class-conditional sampling does not run with the {sampler} sampler")
    if guide is not None and (mask is not None or colorize):
        raise ValueError("guide: class-conditional sampling does not combine with inpainting or colorization")
    if guide is not None and sampler in ("ode", "adaptive") and isinstance(guide.y, Tensor) and guide.y.dim() == 1:
        raise ValueError(
            f"guide: the {sampler} sampler takes one class for all samples (an int), not one per sample (its "
            "batch shrinks as samples finish)"
        )
    if steps is not None and sampler not in SOLVERS[:3]:
        raise ValueError(f"steps: the number of steps of the few-step solvers {', '.join(SOLVERS[:3])}, not {sampler}")
    if eta is not None and sampler != "ddim":
        raise ValueError(f"eta: the noise of the ddim sampler's steps, not an option of {sampler}")
    if (mask is not None or colorize) and (sampler not in ("ald", "pc") or known is None):
        raise ValueError(
            "inpainting (mask) and colorization run annealed Langevin ('ald', inpainting only) or the "
            "predictor-corrector sampler ('pc') on images (known)"
        )
    if colorize and sampler != "pc":
        raise ValueError("colorize: colorization runs the predictor-corrector sampler (sampler 'pc')")
    if sampler == "pc" and (mask is not None or colorize):
        return _pc_conditional(model, config, meta, known, mask, colorize, seed=seed, sde_steps=sde_steps,
                               snr=snr, progress=progress, rows=rows)  # fmt: skip
    if mask is not None:
        return inpaint(
            model, config, known, mask, seed=seed, n_steps_each=n_steps_each, step_lr=step_lr, progress=progress,
            rows=rows,
        )  # fmt: skip
    rows = check_rows(rows, n)
    if not len(rows):  # an empty shard (more processes than samples)
        return _to_data(config, torch.zeros(_shape(config, 0), device=_device(model)))
    if sampler in ("ald",) + MCMC_SAMPLERS:
        init = None if len(rows) == n else _start(config, n, seed)[rows.start : rows.stop]
        return annealed_langevin_sample(
            model, config, len(rows), seed=seed, n_steps_each=n_steps_each, step_lr=step_lr, progress=progress,
            meta=meta, init=init, sample_offset=rows.start, guide=None if guide is None else guide.rows(rows),
            corrector="langevin" if sampler == "ald" else sampler,
        )  # fmt: skip
    score_fn, sde = sde_for(model, config, meta, sde_steps)
    score_fn = batch_invariant(score_fn)
    if guide is not None:
        score_fn = guide.rows(rows).times(score_fn, sde)
    shape = _shape(config, len(rows))
    if sampler == "pc":
        from fastscore.sampling import pc_sampler

        out = pc_sampler(score_fn, sde, shape, snr=snr, seed=seed, progress=progress, sample_offset=rows.start)
    elif sampler in SOLVERS:
        from fastscore.solvers import solve

        n_steps = None if sampler == "adaptive" else (steps or SOLVER_STEPS)
        extra = {} if eta is None else {"eta": eta}
        out = solve(score_fn, sde, shape, method=sampler, steps=n_steps, seed=seed, progress=progress,
                    sample_offset=rows.start, device=_device(model), **extra)  # fmt: skip
    else:
        from fastscore.sampling import ode_sampler

        out = ode_sampler(
            score_fn, sde, shape, seed=seed, rtol=ODE_TOLERANCE, atol=ODE_TOLERANCE, progress=progress,
            sample_offset=rows.start,
        )  # fmt: skip
    return _to_data(config, out)


def _pc_conditional(model, config, meta, known, mask, colorize, *, seed, sde_steps, snr, progress, rows):
    """score_sde's PC inpainter (``mask``) or colorizer (``colorize``; ``known`` the gray images, 3 channels)
    on the rows ``rows`` of ``known`` (model input space), in data space."""
    from fastscore.sampling import pc_colorize
    from fastscore.sampling import pc_inpaint

    rows = check_rows(rows, len(known))
    if mask is not None and mask.dim() == known.dim() and mask.shape[0] == len(known) and len(known) > 1:
        mask = mask[rows.start : rows.stop]
    part = known[rows.start : rows.stop]
    if not len(rows):
        return _to_data(config, part)
    score_fn, sde = sde_for(model, config, meta, sde_steps)
    score_fn = batch_invariant(score_fn)
    device = _device(model)
    if colorize:
        out = pc_colorize(score_fn, sde, part.to(device), snr=snr, seed=seed, progress=progress,
                          sample_offset=rows.start)  # fmt: skip
    else:
        out = pc_inpaint(score_fn, sde, part.to(device), mask.to(device), snr=snr, seed=seed, progress=progress,
                         sample_offset=rows.start)  # fmt: skip
    return _to_data(config, out)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
