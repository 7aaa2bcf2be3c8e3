"""Training score networks as ncsnv2's runner does, resumable bitwise: :func:`train`.

One loop for the image models (NCSN / NCSNv2 family, from a config) and the toy :class:`ScoreMLP` on 2-D
data. Per step, as ermongroup/ncsnv2's ``NCSNRunner.train``: ``data_transform``, the loss, ``zero_grad``,
``backward``, the optimizer step (Adam / RMSProp / SGD from ``config.optim``), then the EMA update
(ncsnv2's ``EMAHelper``: ``s <- (1 - mu) p + mu s``; no warm-up, as ncsnv2, unless the config sets
``model.ema_warmup: true``, as the toys' configs do: then diffusers' ``mu_t = min(mu, (1 + t) / (10 + t))``,
see :class:`EMAHelper`). Losses (fastscore.losses):

* ``"dsm"`` (default): annealed denoising score matching, ``anneal_power`` from ``config.training``;
* ``"ssm"``: annealed sliced score matching (ncsn's ``anneal_sliced_score_estimation_vr``);
* ``"sde"``: continuous-time DSM on the VE SDE with ``sigma_min/max = sigma_end/begin`` (score_sde); an
  NCSNv2 network gets the time as score_sde feeds a discrete-label model, ``round((T - t)(L - 1))``.

``energy="residual"`` or ``"inner"`` trains the network as an energy instead
(:func:`fastscore.models.as_energy`: the score is ``-grad_x E`` with ``E = |x - f(x, y)|^2 / 2`` or
``-<x, f(x, y)> / 2``), with the same losses (each differentiates through the gradient);
the checkpoint records the form (``"energy"``), so :func:`model_from_checkpoint` rebuilds the energy model
and the Metropolis-adjusted samplers can run on it (docs/mcmc.md).

Checkpoints are exactly ncsnv2's list: ``[model_state, optimizer_state, epoch, step]`` plus the EMA shadow
when EMA is on, model keys with the ``module.`` prefix of ncsnv2's DataParallel wrapper, EMA keys without
it (as ncsnv2's EMAHelper keeps them), so ncsnv2's runner resumes and samples them and
:func:`fastscore.models.load_checkpoint` reads them. What resuming needs beyond that (the random generators'
states, the data order of the current epoch and the position in it, the config, the data set's name) and
sha256 checksums of every tensor travel in a dict under the key ``"fastscore"`` of the optimizer state,
which ncsnv2 passes to ``Optimizer.load_state_dict`` and that ignores (see fastscore.models.checkpoints for
why there). Every file is written to a temporary name, flushed and renamed into place, so an interrupted
run never leaves a torn checkpoint; temporary files of a killed run are removed by the next run in that
folder, and a run folder is locked while a run writes it (a second run into it fails at once). Resuming
from step k and stopping at n gives bitwise the weights of one uninterrupted run to n (same machine, thread
count and backend).

Randomness: the data order comes from one ``torch.Generator`` (seeded ``seed``), the loss's noise levels
and noise from another (seeded ``seed + 1``); the model's initial weights from ``torch.manual_seed(seed)``.
Snapshot sample grids use the samplers' own counter-based noise, so they change nothing in training.

Several processes (``torchrun``; a torch.distributed process group of P > 1 processes initialised, e.g. by
:func:`fastscore.distributed.init`): DistributedDataParallel on the same global batch. Every rank draws the
whole batch (the data order, the transforms' and the loss's random draws: the generators above, in the same
order, so all ranks hold the same generator states) and runs the network on its rows of it only,
``shard_range(B)`` (without overlap); its loss is the sum of its rows' losses times ``P / B``, so the gradient
DDP averages is the gradient of the batch mean, and the loss reported is the batch mean (summed over the
ranks). Weights, optimizer, EMA and the resume state are the same on every rank (the single-process run's, to
float rounding: the network's sums over the batch are split), rank 0 alone writes the checkpoints (ncsnv2's
layout, atomically) and the sample grids (drawn in shards: docs/distributed.md). Resuming works with any
number of processes: the resume state (data order, position, generators) is the global one.
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field

import torch
import torch.nn as nn
from torch import Tensor

from fastscore import distributed
from fastscore._progress import Progress
from fastscore.data.images import data_transform
from fastscore.data.images import remove_stale_temps
from fastscore.data.images import save_image_grid
from fastscore.data.images import save_scatter
from fastscore.data.images import temp_name
from fastscore.models import ConfigError
from fastscore.models import get_config
from fastscore.models import get_model
from fastscore.models import get_sigmas
from fastscore.models import namespace2dict
from fastscore.models.checkpoints import META_KEY
from fastscore.models.checkpoints import CheckpointError
from fastscore.models.checkpoints import checksums
from fastscore.models.checkpoints import fastscore_meta
from fastscore.models.checkpoints import read_torch_file
from fastscore.models.checkpoints import verify_checksums
from fastscore.models.configs import check_config
from fastscore.models.configs import dict2namespace
from fastscore.models.configs import field

try:
    import fcntl
except ImportError:  # not POSIX: run folders are not locked
    fcntl = None

__all__ = [
    "EMAHelper",
    "TrainError",
    "TrainResult",
    "LOSSES",
    "train",
    "build_model",
    "model_parameters",
    "training_memory",
    "run_folder",
    "check_memory",
    "check_seed",
    "toy_config",
    "get_optimizer",
    "save_checkpoint",
    "read_checkpoint",
    "checkpoint_meta",
    "export_checkpoint",
    "model_from_checkpoint",
    "sample",
]

LOSSES = ("dsm", "ssm", "sde")
CHECKPOINT_NAME = "checkpoint.pth"
LOCK_NAME = ".fastscore-train.lock"
SEED_MAX = 2**63 - 1
_FORMAT = "fastscore-train-2"


class TrainError(ValueError):
    """Training cannot start or resume: bad settings, data that does not fit the model, an unusable checkpoint."""


# ---- EMA (ncsnv2 models/ema.py) -------------------------------------------------------------------------------


class EMAHelper:
    """ncsnv2's ``EMAHelper(mu)``: a shadow copy of every trainable parameter, keyed by its (un-prefixed) name.

    ``update``: ``shadow <- (1 - mu) * param + mu * shadow`` (ncsnv2's arithmetic order). Without warm-up
    (ncsnv2's rule, the default) ``mu`` is constant, so after ``n`` updates the initial weights still carry
    ``mu**n`` of the average: with ``mu = 0.999`` train for many thousand steps or lower ``model.ema_rate``.

    ``warmup=True`` (``model.ema_warmup`` in a config) uses diffusers' EMA warm-up instead: the ``t``-th
    update (``t`` = 0, 1, ... updates made before it) uses ``mu_t = min(mu, (1 + t) / (10 + t))``, and the
    first (``t = 0``) copies the weights (``mu_0 = 0``); so early on the average spans about ``(10 + t) / 9``
    steps (12 at step 100) and the random initial weights are forgotten. ``update(module,
    step)`` takes ``t`` from the training step (``t = step - 1`` for the update after step ``step``), so a
    resumed run continues the schedule. ``state_dict()`` is the shadow dict itself, which is what ncsnv2
    writes as the fifth checkpoint entry.
    """

    def __init__(self, mu: float = 0.999, *, warmup: bool = False):
        self.mu = float(mu)
        self.warmup = bool(warmup)
        self.updates = 0
        self.shadow: dict[str, Tensor] = {}

    def decay(self, t: int) -> float:
        """The rate of the ``t``-th update (``t`` updates before it): ``mu``, or with warm-up
        ``min(mu, (1 + t) / (10 + t))`` and 0 for ``t = 0`` (diffusers' ``EMAModel.get_decay``)."""
        if not self.warmup:
            return self.mu
        if t <= 0:
            return 0.0
        return min(self.mu, (1 + t) / (10 + t))

    @staticmethod
    def _named(module: nn.Module):
        module = module.module if isinstance(module, nn.DataParallel) else module
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def register(self, module: nn.Module) -> None:
        for name, param in self._named(module):
            self.shadow[name] = param.data.clone()

    @torch.no_grad()
    def update(self, module: nn.Module, step: int | None = None) -> None:
        """One EMA update; ``step``: the training step just taken (1-based), which sets the warm-up's ``t =
        step - 1``; without it, the number of updates this helper has made."""
        t = self.updates if step is None else int(step) - 1
        mu = self.decay(t)
        for name, param in self._named(module):
            self.shadow[name] = (1.0 - mu) * param.data + mu * self.shadow[name]
        self.updates = t + 1

    @torch.no_grad()
    def ema(self, module: nn.Module) -> None:
        """Copy the averaged weights into ``module``."""
        for name, param in self._named(module):
            param.data.copy_(self.shadow[name])

    def ema_copy(self, module: nn.Module) -> nn.Module:
        """A copy of ``module`` holding the averaged weights (``module`` is unchanged)."""
        twin = copy.deepcopy(module)
        self.ema(twin)
        return twin

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}


# ---- models, optimizers, configs ----------------------------------------------------------------------------


def toy_config(data: Tensor, *, name: str = "toy") -> object:
    """A config for the toy ScoreMLP on (N, D) data: 10 geometric noise levels from the data's largest
    pairwise distance (ncsnv2's technique 1: sigma_1 about the largest distance between two training points)
    down to 1% of its per-coordinate standard deviation."""
    sub = data[:2000].double()
    sigma_begin = float(torch.cdist(sub, sub).max())
    sigma_end = 0.01 * float(data.double().std(dim=0).mean())
    return dict2namespace(
        {
            "training": {"batch_size": 128, "n_iters": 5001, "snapshot_freq": 1000, "anneal_power": 2},
            "sampling": {"batch_size": 1280, "n_steps_each": 100, "step_lr": 0.00002, "denoise": True},
            "data": {"dataset": name, "dim": int(data.shape[1])},
            "model": {
                "arch": "ScoreMLP",
                "hidden": 128,
                "n_layers": 2,
                "sigma_begin": round(sigma_begin, 4),
                "sigma_end": round(sigma_end, 6),
                "num_classes": 10,
                "sigma_dist": "geometric",
                "ema": True,
                "ema_rate": 0.999,
                "ema_warmup": True,
            },
            "optim": {
                "optimizer": "Adam",
                "lr": 0.001,
                "weight_decay": 0.0,
                "beta1": 0.9,
                "amsgrad": False,
                "eps": 1e-8,
            },
        }
    )


def _energy_form(energy) -> str | None:
    """``energy``: None (a score network) or one of the energy heads' forms; :class:`TrainError` otherwise."""
    from fastscore.models.energy import FORMS

    if energy is not None and energy not in FORMS:
        raise TrainError(f"energy: expected None or one of {', '.join(FORMS)}, got {energy!r}")
    return energy


def _as_energy(net: nn.Module, energy: str | None) -> nn.Module:
    """The network, as an energy model when ``energy`` names a form; what takes_time reads is passed on."""
    if energy is None:
        return net
    from fastscore.models.energy import as_energy

    model = as_energy(net, form=energy)
    conditioning = getattr(net, "conditioning", None)
    if conditioning is not None:  # fastscore.model_sampling.takes_time reads it from the model it samples
        model.conditioning = conditioning
    return model


def _build(config, loss: str, layers: str) -> nn.Module:
    if field(config, "model.arch", "any", None) == "ScoreMLP":
        from fastscore.models.mlp import ScoreMLP

        dim = field(config, "data.dim", "int+", who="ScoreMLP")
        hidden = field(config, "model.hidden", "int+", 128, who="ScoreMLP")
        n_layers = field(config, "model.n_layers", "int+", 2, who="ScoreMLP")
        if loss == "sde":
            return ScoreMLP(dim, hidden, n_layers, time_embedding=True)
        with torch.device("cpu"):  # also when counting on the meta device (model_parameters)
            sigmas = get_sigmas(config).cpu()
        return ScoreMLP(dim, hidden, n_layers, n_classes=len(sigmas), sigmas=sigmas)
    return get_model(config, layers=layers)


def model_parameters(config, *, loss: str = "dsm", layers: str = "fused") -> int:
    """The number of parameters of the network ``config`` describes, counted without allocating it (built on
    PyTorch's meta device; the random generators are left as they were). Checks ``config`` first
    (:func:`fastscore.models.configs.check_config`); :class:`ConfigError` for a config that cannot be built."""
    config = get_config(config)
    check_config(config)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = _build(config, loss, layers)
    except (RuntimeError, OverflowError) as exc:  # e.g. a size whose byte count overflows 64 bits
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config: the model it describes cannot be built: it is far too large ({reason})") from None
    return sum(p.numel() for p in model.parameters())


def human_bytes(n: float) -> str:
    """``n`` bytes as a short text: ``'1.2 GB'``."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB", "EB"):
        if n < 1000 or unit == "EB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} EB"


def _memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes of memory ``device`` has, how to say so), or (None, ...) when unknown."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory, f"GPU {device} has"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    except (ValueError, OSError, AttributeError):
        return None, ""


def _size_fields(config) -> str:
    if _is_toy(config):
        return "model.hidden, model.n_layers or training.batch_size"
    return "model.ngf, data.image_size or training.batch_size"


def training_memory(config, *, loss: str = "dsm", batch_size: int | None = None) -> tuple[int, int]:
    """``(parameters, bytes)``: a low estimate of the memory a training run of ``config`` needs: float32
    weights, gradients, the optimizer's moments, the EMA shadow and a checkpoint copy (from the parameter
    count, :func:`model_parameters`) plus a batch's inputs and a fraction of the activations backward keeps
    (per example ``channels * S^2`` and ``8 ngf S^2`` floats for an image model). Meant to refuse a config
    that cannot possibly run before anything is allocated, not to predict the peak."""
    config = get_config(config)
    params = model_parameters(config, loss=loss)
    batch_size = batch_size or field(config, "training.batch_size", "int+", who="training")
    name = field(config, "optim.optimizer", "any", "Adam")
    moments = (3 if field(config, "optim.amsgrad", "any", False) else 2) if name == "Adam" else 1
    ema = 1 if field(config, "model.ema", "any", False) else 0
    state = 4 * params * (3 + moments + ema)  # weights, gradients, checkpoint copy, moments, EMA
    if _is_toy(config):
        dim = field(config, "data.dim", "int+", who="ScoreMLP")
        hidden = field(config, "model.hidden", "int+", 128, who="ScoreMLP")
        n_layers = field(config, "model.n_layers", "int+", 2, who="ScoreMLP")
        per_example = 4 * (4 * dim + 2 * hidden * n_layers)
    else:
        size = field(config, "data.image_size", "int+", who="training")
        channels = field(config, "data.channels", "int+", who="training")
        ngf = field(config, "model.ngf", "int+", who="training")
        per_example = 4 * size * size * (4 * channels + 8 * ngf)
    return params, state + batch_size * per_example


def check_memory(config, *, loss: str = "dsm", batch_size: int | None = None, device="cpu", training=True) -> int:
    """:class:`ConfigError` when ``config`` needs more memory than ``device`` has (training: see
    :func:`training_memory`; else the float32 weights alone); returns the parameter count."""
    device = torch.device(device)
    if training:
        params, need = training_memory(config, loss=loss, batch_size=batch_size)
        what = "to train"
    else:
        params = model_parameters(config, loss=loss)
        need, what = 4 * params, "for its weights"
    have, where = _memory(device)
    if have is not None and need > have:
        raise ConfigError(
            f"config: the model ({params:.3g} parameters) needs at least {human_bytes(need)} of memory {what}, "
            f"and {where} {human_bytes(have)}: lower {_size_fields(config)}"
        )
    return params


def build_model(config, *, loss: str = "dsm", layers: str = "fused", energy: str | None = None) -> nn.Module:
    """The network ``config`` describes: an image model by :func:`fastscore.models.get_model`, or, for
    ``model.arch: ScoreMLP``, a :class:`fastscore.models.mlp.ScoreMLP` conditioned on the noise level
    (labels and division by sigma; time for ``loss="sde"``). ``energy`` (``"residual"`` or ``"inner"``): that
    network as an energy model, :func:`fastscore.models.as_energy` (its parameters are the network's, under
    ``energy_net.net.``).

    The config is checked first (:func:`fastscore.models.configs.check_config`) and the model counted
    without allocating it: a config whose weights alone exceed this machine's memory raises
    :class:`ConfigError` instead of exhausting it."""
    energy = _energy_form(energy)
    config = get_config(config)
    check_memory(config, loss=loss, training=False)
    return _as_energy(_build(config, loss, layers), energy)


def get_optimizer(config, parameters) -> torch.optim.Optimizer:
    """ncsnv2's ``get_optimizer``: Adam (betas (beta1, 0.999), amsgrad, eps), RMSProp or SGD (momentum 0.9)."""
    name = field(config, "optim.optimizer", "str", "Adam", who="the optimizer")
    lr = field(config, "optim.lr", "number+", who="the optimizer")
    wd = field(config, "optim.weight_decay", "any", 0.0)
    if name == "Adam":
        beta1 = field(config, "optim.beta1", "any", 0.9)
        amsgrad = field(config, "optim.amsgrad", "bool", False)
        eps = field(config, "optim.eps", "number+", 1e-8)
        return torch.optim.Adam(parameters, lr=lr, weight_decay=wd, betas=(beta1, 0.999), amsgrad=amsgrad, eps=eps)
    if name == "RMSProp":
        return torch.optim.RMSprop(parameters, lr=lr, weight_decay=wd)
    if name == "SGD":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    raise ConfigError(f"config.optim.optimizer: expected Adam, RMSProp or SGD, got {name!r}")


def _is_toy(config) -> bool:
    return field(config, "model.arch", "any", None) == "ScoreMLP"


def _check_data(config, data: Tensor) -> None:
    if not isinstance(data, Tensor) or not data.is_floating_point():
        raise TrainError(f"data: expected a float tensor, got {type(data).__name__}")
    if data.shape[0] < 1:
        raise TrainError("data: holds no examples")
    if _is_toy(config):
        dim = field(config, "data.dim", "int+", who="ScoreMLP")
        if data.dim() != 2 or data.shape[1] != dim:
            raise TrainError(f"data: the ScoreMLP config expects (N, {dim}) vectors, got shape {tuple(data.shape)}")
        return
    size = field(config, "data.image_size", "int+", who="training")
    channels = field(config, "data.channels", "int+", who="training")
    if data.dim() != 4 or tuple(data.shape[1:]) != (channels, size, size):
        raise TrainError(
            f"data: the config's model takes ({channels}, {size}, {size}) images, got examples of shape "
            f"{tuple(data.shape[1:])}"
        )


# ---- checkpoints ---------------------------------------------------------------------------------------------


def atomic_save(obj, path) -> None:
    """``torch.save`` to a temporary file in the destination's folder (:func:`fastscore.data.images.temp_name`),
    flushed to disk, then ``os.replace`` onto ``path``: a reader sees the old file or the new one, never a torn
    one. A failed write (a full disk, ...) raises ``OSError`` and leaves no temporary file; one that a killed
    process left is removed by the next run in that folder."""
    path = os.fspath(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _plain_state(state: dict) -> dict:
    # channels_last weights are saved contiguous: the file then loads into either memory format unchanged.
    return {k: v.contiguous() if isinstance(v, Tensor) else v for k, v in state.items()}


def _prefixed(state: Mapping) -> dict:
    """ncsnv2 saves ``nn.DataParallel(model).state_dict()``: every key carries ``module.``."""
    return {f"module.{k}": v for k, v in state.items()}


def _unprefixed(state: Mapping) -> dict:
    keys = list(state)
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _with_meta(states: list, meta: dict) -> list:
    """``states`` with fastscore's dict (``meta`` plus the checksums of every tensor) under the key
    ``"fastscore"`` of the optimizer state, ``states[1]``: the one place in ncsnv2's layout that ncsnv2
    reads without looking at unknown keys (its runner resumes with ``optimizer.load_state_dict(states[1])``,
    which reads only ``state`` and ``param_groups``; it samples from ``states[0]`` and ``states[-1]``). An
    extra list entry would become ncsnv2's ``states[-1]``, where it expects the EMA, and a sidecar file
    could be separated from its checkpoint; see fastscore.models.checkpoints."""
    meta = dict(meta)
    meta["checksum"] = checksums(states, resume=meta.get("resume"))
    states = list(states)
    states[1] = {**states[1], META_KEY: meta}
    return states


def save_checkpoint(path, model, optimizer, ema, epoch: int, step: int, extra: dict) -> None:
    """ncsnv2's list layout, exactly: ``[model_state (module.-prefixed), optimizer_state, epoch, step]`` plus
    the EMA shadow when ``ema``; fastscore's resume state ``extra`` and the tensors' checksums go inside the
    optimizer state (:func:`_with_meta`). Written atomically (:func:`atomic_save`)."""
    states = [_prefixed(_plain_state(model.state_dict())), optimizer.state_dict(), epoch, step]
    if ema is not None:
        states.append(_plain_state(ema.state_dict()))
    atomic_save(_with_meta(states, extra), path)


def read_checkpoint(path, *, verify: bool = True) -> list:
    """The raw checkpoint list (ncsnv2 layout) with tensors on the CPU, its checksums verified (``verify``).
    ``FileNotFoundError`` for a missing file, :class:`CheckpointError` for an unreadable or corrupt one."""
    ckpt = read_torch_file(path)
    if verify:
        verify_checksums(ckpt, f"checkpoint {os.fspath(path)!r}")
    return ckpt


def checkpoint_meta(ckpt) -> dict | None:
    """fastscore's dict in a checkpoint list (config, data, loss, resume state, checksums, ...), or None for
    a foreign file. Reads both fastscore layouts (the dict in the optimizer state, or an older sixth entry)."""
    return fastscore_meta(ckpt)


def export_checkpoint(src, dst, *, half: bool = True) -> int:
    """A small sampling checkpoint from a training one: the EMA weights (when there are any) as the model
    state, float16 parameters (``half``; buffers such as ``sigmas`` stay float32), no optimizer state.
    Still ncsnv2's list layout (the EMA entry, when there is one, holds the same tensors as the model state,
    stored once), so :func:`fastscore.models.load_checkpoint` and ncsnv2's sampler read it. Returns its size
    in bytes."""
    ckpt = read_checkpoint(src)
    meta = checkpoint_meta(ckpt)
    if meta is None:
        raise TrainError(f"checkpoint {os.fspath(src)!r} was not written by fastscore train")
    state = _unprefixed(ckpt[0])
    shadow = ckpt[4] if len(ckpt) >= 5 and isinstance(ckpt[4], Mapping) else None
    if shadow:
        state.update(shadow)
    params = set(shadow) if shadow else set()
    if half:
        state = {k: v.half() if k in params and v.is_floating_point() else v for k, v in state.items()}
    keep = {k: meta[k] for k in ("config", "arch", "data", "loss", "energy", "seed", "step") if k in meta}
    keep["format"] = _FORMAT
    keep["exported"] = {"ema": bool(params), "half": half}
    states = [_prefixed(state), {}, ckpt[2], ckpt[3]]
    if params:
        states.append({k: state[k] for k in shadow})
    atomic_save(_with_meta(states, keep), dst)
    return os.path.getsize(dst)


def model_from_checkpoint(path, *, config=None, ema: bool = True, layers: str = "fused"):
    """``(model, config, meta)`` from a checkpoint: the config saved in it by ``fastscore train`` (or
    ``config`` for the original repos' files), weights by :func:`fastscore.models.load_checkpoint` (EMA by
    default; checksums verified); an energy model (:func:`fastscore.models.as_energy`) when the run trained
    one (``meta["energy"]``). Raises :class:`TrainError` for a missing config, ``CheckpointError`` for
    an unreadable, corrupt or misfit file and ``ConfigError`` for a config that cannot be built here."""
    from fastscore.models import load_into

    ckpt = read_torch_file(path)
    meta = checkpoint_meta(ckpt) or {}
    if config is None:
        if "config" not in meta:
            raise TrainError(
                f"checkpoint {os.fspath(path)!r} carries no config (not written by fastscore train): pass its config"
            )
        config = dict2namespace(meta["config"])
    else:
        config = get_config(config)
    model = build_model(config, loss=meta.get("loss", "dsm"), layers=layers, energy=meta.get("energy"))
    load_into(ckpt, model, ema=ema, where=f"checkpoint {os.fspath(path)!r}")
    model.eval()
    return model, config, meta


# ---- the run folder ---------------------------------------------------------------------------------------------

_HELD: dict[str, int] = {}  # run folders this process holds the lock of -> the holding thread
_HELD_GUARD = threading.Lock()


def _missing_folders(path: str) -> list[str]:
    """The folders ``os.makedirs(path)`` would create, outermost first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing[::-1]


def _lock(out_dir: str) -> int | None:
    """An exclusive ``flock`` on ``out_dir/LOCK_NAME`` (the fd), or TrainError at once if another process holds it."""
    if fcntl is None:
        return None
    path = os.path.join(out_dir, LOCK_NAME)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TrainError(f"run folder {out_dir!r}: cannot create its lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise TrainError(
                f"run folder {out_dir!r} is in use by another fastscore train{who}: wait for it to finish or "
                "choose another --out"
            ) from None
        # The previous holder unlinks the file before releasing it: a lock on an unlinked file is no lock.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


@contextlib.contextmanager
def run_folder(out_dir):
    """Hold the run folder ``out_dir`` for a training run: create it (with its parents) if needed, lock it
    (an exclusive ``flock`` on ``out_dir/.fastscore-train.lock``; another process's run into the same folder
    fails at once with :class:`TrainError` naming it) and remove the temporary files a killed run left
    (``checkpoint.pth.tmp<pid>``, ``samples_<step>.png.tmp<pid>`` of dead processes). On the way out the lock
    file is removed, and so are the folders it created if the run wrote nothing into them. Re-entrant in
    the thread that holds it."""
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TrainError(f"run folder {out_dir!r} is a file, not a folder")
    key = os.path.realpath(out_dir)
    with _HELD_GUARD:
        mine = _HELD.get(key) == threading.get_ident()
    if mine:
        yield out_dir
        return
    created = _missing_folders(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise TrainError(f"run folder {out_dir!r} cannot be created ({exc.strerror})") from None
    fd = None
    try:
        fd = _lock(out_dir)
        key = os.path.realpath(out_dir)
        with _HELD_GUARD:
            _HELD[key] = threading.get_ident()
        try:
            remove_stale_temps(out_dir, lambda name: name == CHECKPOINT_NAME or _is_sample_grid(name))
            yield out_dir
        finally:
            with _HELD_GUARD:
                _HELD.pop(key, None)
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out_dir, LOCK_NAME))
            os.close(fd)
        for folder in reversed(created):  # only empty ones: a failed start leaves nothing behind
            try:
                os.rmdir(folder)
            except OSError:
                break


def _is_sample_grid(name: str) -> bool:
    return name.startswith("samples_") and name.endswith(".png") and name[len("samples_") : -len(".png")].isdigit()


# ---- sampling a model ---------------------------------------------------------------------------------------


def sample(
    model: nn.Module,
    config,
    n: int,
    *,
    seed: int = 0,
    n_steps_each: int | None = None,
    step_lr: float | None = None,
    denoise: bool | None = None,
    progress: bool = False,
    init: Tensor | None = None,
) -> Tensor:
    """``n`` samples by ncsnv2's annealed Langevin dynamics (``config.sampling`` unless overridden), images
    mapped back to [0, 1] (``inverse_data_transform``). Start: ``U[0, 1)`` images through ``data_transform``
    (ncsnv2), or ``sigma_1 z`` for vectors; both from ``seed``. The snapshot grids' sampler; it is
    :func:`fastscore.model_sampling.annealed_langevin_sample`, which also holds the other samplers."""
    from fastscore.model_sampling import annealed_langevin_sample

    return annealed_langevin_sample(
        model, config, n, seed=seed, n_steps_each=n_steps_each, step_lr=step_lr, denoise=denoise, progress=progress,
        init=init,
    )  # fmt: skip


# ---- progress -------------------------------------------------------------------------------------------------


class _Progress:
    """The training loop's progress (fastscore._progress: tqdm's bar on a terminal; whole
    lines with the loss, the rate and an ETA when stderr is a file or a pipe)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = Progress(total, "train", initial=initial, unit="step", enabled=enabled)

    def update(self, loss: float) -> None:
        self.bar.update(1, postfix=f"loss {loss:.4g}")

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


# ---- the loop --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    checkpoint: str
    step: int
    loss: float
    seconds: float
    samples: list[str] = dc_field(default_factory=list)
    losses: list[float] = dc_field(default_factory=list)


def _loss_fn(loss: str, model: nn.Module, config, sigmas: Tensor, gen: torch.Generator, reduction: str = "mean"):
    from fastscore import losses

    anneal_power = float(field(config, "training.anneal_power", "any", 2.0))
    if loss == "dsm":
        return lambda x: losses.anneal_dsm(model, x, sigmas, None, anneal_power, generator=gen, reduction=reduction)
    if loss == "ssm":
        return lambda x: losses.anneal_sliced_score_matching(model, x, sigmas, generator=gen, reduction=reduction)
    from fastscore.model_sampling import sde_for

    # The VE SDE spanning the levels, one time step per level; the network gets the nearest level's label, or
    # the time (the toy MLP, which learns sigma_t * score: dividing by sigma_t is the caller's, score_sde's
    # scale_by_sigma).
    score_fn, sde = sde_for(model, config, {"loss": loss}, n_steps=len(sigmas))
    return lambda x: losses.sde_dsm(score_fn, sde, x, generator=gen, reduction=reduction)


class _RankRows:
    """The network as the loss sees it on one rank of a data-parallel run: called with the whole batch (and
    its labels or times), it runs the (DDP-wrapped) network on this rank's rows ``rows`` only and returns zeros
    in the other rows, which the rank's loss leaves out. A rank without rows (a batch smaller than the number
    of processes) runs the network on one row and keeps its output in ``idle``, to add 0 times it to the loss:
    DDP needs every rank to take part in every backward."""

    def __init__(self, net: nn.Module, module: nn.Module):
        self.net = net
        self.conditioning = getattr(module, "conditioning", None)  # what model_sampling.takes_time reads
        self.rows = range(0)
        self.idle: Tensor | None = None

    def __call__(self, x: Tensor, c: Tensor) -> Tensor:
        lo, hi = self.rows.start, self.rows.stop
        if hi > lo:
            self.idle = None
            out = self.net(x[lo:hi], c[lo:hi])
        else:
            self.idle = self.net(x[:1], c[:1])
            out = self.idle[:0]
        rest = tuple(x.shape[1:])
        return torch.cat([out.new_zeros((lo, *rest)), out, out.new_zeros((x.shape[0] - hi, *rest))])

    def loss(self, per_sample: Tensor, size: int) -> Tensor:
        """This rank's share of the batch mean: its rows' losses summed, times ``size / B`` (DDP averages
        the ranks' gradients), plus 0 times the idle output."""
        value = per_sample[self.rows.start : self.rows.stop].sum() * (size / per_sample.shape[0])
        if self.idle is not None:
            value = value + 0.0 * self.idle.sum()
        return value


def _batch_norms(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def train(
    config,
    data: Tensor,
    out_dir,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    resume: bool = False,
    loss: str | None = None,
    snapshot_freq: int | None = None,
    snapshot_samples: int | None = None,
    snapshot_steps_each: int | None = None,
    data_name: str = "tensor",
    progress: bool = True,
    channels_last: bool | None = None,
    device: str | torch.device = "cpu",
    energy: str | None = None,
) -> TrainResult:
    """Train the network ``config`` describes on ``data`` (N, C, H, W) images in [0, 1] (or (N, D) vectors
    for a ScoreMLP config) until step ``steps`` (default ``config.training.n_iters``), writing
    ``out_dir/checkpoint.pth`` at every snapshot (``snapshot_freq``, default ``config.training.snapshot_freq``)
    and at the end, plus ``out_dir/samples_<step>.png``: a grid of ``snapshot_samples`` EMA samples for
    image models, a scatter plot of the data and ``snapshot_samples`` EMA samples for the toys, with
    ``snapshot_steps_each`` Langevin steps per level. Default: as the config's ``training.snapshot_sampling``
    says (ncsnv2's switch; on when absent, as in the toys' configs), 36 images or 500 points, 5 steps per
    level for images and the config's ``sampling.n_steps_each`` for the toys; ``snapshot_samples=0``: none.
    The grids use the samplers' own counter-based noise: drawing them or not changes no weight.

    ``resume=True`` continues from ``out_dir/checkpoint.pth``: weights, optimizer, EMA, step, data order
    and generators as they were, so the result is bitwise that of one run; the checkpoint's config, loss,
    batch size and seed are used and must not contradict the ones given. ``channels_last`` (default: on
    for image models on the CPU, where it is the fastest layout) changes no result beyond rounding.
    ``energy`` (``"residual"`` or ``"inner"``): train the network as an energy model (module docstring);
    recorded in the checkpoint, and on ``resume`` taken from it (a contradicting one is refused).

    ``out_dir`` is held for the run (:func:`run_folder`): created if needed, locked against a second run
    into it (:class:`TrainError` at once), cleared of the temporary files of a killed run. The config is
    checked and its memory estimated (:func:`check_memory`) before anything is allocated.

    In a torch.distributed process group of several processes (``torchrun``), every rank calls this with the
    same arguments and the run is data-parallel (module docstring): rank 0 holds ``out_dir`` and writes the
    checkpoints and grids, every rank returns the same :class:`TrainResult` (``losses``: the batch means). To
    resume, every rank must be able to read ``out_dir/checkpoint.pth`` (one node, or a shared filesystem).
    """
    if loss is not None and loss not in LOSSES:
        raise TrainError(f"loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
    energy = _energy_form(energy)
    seed = check_seed(seed)
    w = distributed.world()
    # rank 0 alone holds (and writes into) the run folder; the other ranks only read a checkpoint to resume
    with run_folder(out_dir) if w is None or w.main else contextlib.nullcontext():
        return _train(
            config, data, os.fspath(out_dir), steps=steps, batch_size=batch_size, seed=seed, resume=resume,
            loss=loss, snapshot_freq=snapshot_freq, snapshot_samples=snapshot_samples,
            snapshot_steps_each=snapshot_steps_each, data_name=data_name, progress=progress,
            channels_last=channels_last, device=device, energy=energy,
        )  # fmt: skip


def check_seed(seed) -> int:
    """``seed`` as an int in [0, 2**63 - 1] (what every generator fastscore seeds accepts, ``seed + 1``
    included); :class:`TrainError` naming it otherwise."""
    try:
        value = operator.index(seed)
    except TypeError:
        raise TrainError(f"seed: expected an integer in [0, {SEED_MAX}], got {seed!r}") from None
    if isinstance(seed, bool) or not 0 <= value <= SEED_MAX:
        raise TrainError(f"seed: expected an integer in [0, {SEED_MAX}], got {seed!r}")
    return value


TOY_SNAPSHOT_POINTS = 500
IMAGE_SNAPSHOT_SAMPLES = 36


def _snapshot_sampling(config, samples: int | None, steps_each: int | None) -> tuple[int, int | None]:
    """(how many samples each snapshot draws, Langevin steps per level): ``samples`` when given (0: none),
    else per the config's ``training.snapshot_sampling`` (ncsnv2's switch; on when absent, as in the toys'
    configs): 36 images or 500 toy points. Steps: ``steps_each`` when given, else 5 for images (a quick
    look) and the config's ``sampling.n_steps_each`` for the toys (their network costs nothing)."""
    if samples is None:
        wanted = field(config, "training.snapshot_sampling", "bool", True)
        samples = (TOY_SNAPSHOT_POINTS if _is_toy(config) else IMAGE_SNAPSHOT_SAMPLES) if wanted else 0
    if steps_each is None:
        steps_each = None if _is_toy(config) else 5
    return samples, steps_each


def _train(
    config, data, out_dir, *, steps, batch_size, seed, resume, loss, snapshot_freq, snapshot_samples,
    snapshot_steps_each, data_name, progress, channels_last, device, energy,
) -> TrainResult:  # fmt: skip
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    w = distributed.world()
    main = w is None or w.main
    device = torch.device(device)
    if w is not None and w.device.type == "cuda" and device.type == "cuda":
        device = w.device  # each rank on its own GPU
    ckpt = None
    if resume:
        ckpt = read_checkpoint(path)
        meta = checkpoint_meta(ckpt)
        if meta is None or "resume" not in meta:
            raise TrainError(f"{path!r} has no resume state (not a training checkpoint of fastscore train)")
        config = dict2namespace(meta["config"])
        for name, given, saved in (("loss", loss, meta["loss"]), ("batch size", batch_size, meta["batch_size"])):
            if given is not None and given != saved:
                raise TrainError(f"--resume: the run in {out_dir!r} was started with {name} {saved}, not {given}")
        saved = meta.get("energy")
        if energy is not None and energy != saved:
            was = f"as an energy ({saved})" if saved else "as a score model"
            raise TrainError(f"--resume: the run in {out_dir!r} trains the network {was}, not as an energy ({energy})")
        loss, batch_size, seed, energy = meta["loss"], meta["batch_size"], meta["seed"], saved
    else:
        config = get_config(config)
        loss = loss or "dsm"
    _check_data(config, data)
    steps = steps or field(config, "training.n_iters", "int+", who="training")
    batch_size = batch_size or field(config, "training.batch_size", "int+", who="training")
    snapshot_freq = snapshot_freq or field(config, "training.snapshot_freq", "int+", 1000)
    if channels_last is None:
        channels_last = device.type == "cpu" and not _is_toy(config)
    check_memory(config, loss=loss, batch_size=batch_size, device=device)

    torch.manual_seed(seed)
    model = build_model(config, loss=loss, energy=energy).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = get_optimizer(config, model.parameters())
    use_ema = field(config, "model.ema", "bool", False)
    warmup = field(config, "model.ema_warmup", "bool", False)
    ema = EMAHelper(mu=field(config, "model.ema_rate", "any", 0.999), warmup=warmup) if use_ema else None
    if ema is not None:
        ema.register(model)
    sigmas = get_sigmas(config).to(device)
    data_gen = torch.Generator().manual_seed(seed)
    loss_gen = torch.Generator(device=device).manual_seed(seed + 1)
    epoch, step, position = 0, 0, 0
    order = None
    if ckpt is not None:
        model.load_state_dict(_unprefixed(ckpt[0]))
        optimizer.load_state_dict(ckpt[1])  # ignores the "fastscore" entry
        epoch, step = int(ckpt[2]), int(ckpt[3])
        if ema is not None:
            if len(ckpt) < 5 or not isinstance(ckpt[4], Mapping):
                raise CheckpointError(f"checkpoint {path!r}: the run uses EMA but the file holds no EMA shadow")
            ema.load_state_dict(ckpt[4])
        state = meta["resume"]
        order, position = state["order"], int(state["position"])
        data_gen.set_state(state["data_rng"])
        loss_gen.set_state(state["loss_rng"])
        torch.set_rng_state(state["torch_rng"])
        if step >= steps:
            raise TrainError(f"--resume: the run in {out_dir!r} is already at step {step} (asked for {steps})")

    if w is None:
        objective = _loss_fn(loss, model, config, sigmas, loss_gen)
    else:
        from torch.nn.parallel import DistributedDataParallel

        model_ddp = model
        norms = _batch_norms(model)
        if norms and device.type != "cuda":
            raise TrainError(
                f"config.model.normalization: the model normalises with batch statistics ({len(norms)} BatchNorm "
                f"layers, e.g. {norms[0]}), which data-parallel training on CPUs cannot share between the processes "
                "(torch's SyncBatchNorm needs GPUs): train it in one process, or on GPUs"
            )
        if norms:  # the statistics of the whole batch, as in one process
            model_ddp = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(model_ddp, device_ids=[device] if device.type == "cuda" else None)
        rank_rows = _RankRows(net, model)
        per_sample = _loss_fn(loss, rank_rows, config, sigmas, loss_gen, reduction="none")
    n = data.shape[0]
    meta_common = {
        "format": _FORMAT,
        "config": namespace2dict(config),
        "arch": type(model.energy_net.net if energy else model).__name__,
        "data": data_name,
        "loss": loss,
        "seed": seed,
        "batch_size": batch_size,
    }
    if energy:  # only then: a score model's checkpoint is as it was
        meta_common["energy"] = energy

    def extra():
        return {
            **meta_common,
            "step": step,
            "resume": {
                "order": order,
                "position": position,
                "data_rng": data_gen.get_state(),
                "loss_rng": loss_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
            },
        }

    n_samples, steps_each = _snapshot_sampling(config, snapshot_samples, snapshot_steps_each)
    result = TrainResult(checkpoint=path, step=step, loss=math.nan, seconds=0.0)
    bar = _Progress(steps, step, progress and main)
    start = time.perf_counter()
    model.train()
    try:
        while step < steps:
            if order is None or position >= n:
                if order is not None:
                    epoch += 1
                order, position = torch.randperm(n, generator=data_gen), 0
            index = order[position : position + batch_size]
            position += len(index)
            x = data_transform(config, data[index], generator=loss_gen).to(device)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            step += 1
            if w is None:
                value = objective(x)
            else:
                rank_rows.rows = distributed.shard_range(x.shape[0], w.rank, w.size)
                losses_b = per_sample(x)
                value = rank_rows.loss(losses_b, w.size)
            optimizer.zero_grad()
            with distributed.communication(f"step {step}"):  # DDP all-reduces the gradients in backward
                value.backward()
            optimizer.step()
            if ema is not None:
                ema.update(model, step)
            if w is None:
                result.loss = float(value.detach())
            else:  # the batch mean: every rank's rows summed
                rows = rank_rows.rows
                mine = losses_b.detach()[rows.start : rows.stop].sum()
                result.loss = float(distributed.all_reduce(mine, "sum", what=f"step {step}") / x.shape[0])
                distributed.fail_point(f"step-{step}")
            if not math.isfinite(result.loss):
                raise TrainError(f"the loss is {result.loss} at step {step}: lower optim.lr or check the data")
            result.losses.append(result.loss)
            bar.update(result.loss)
            if step % snapshot_freq == 0 or step == steps:
                if main:
                    save_checkpoint(path, model, optimizer, ema, epoch, step, extra())
                if n_samples:
                    grid = os.path.join(out_dir, f"samples_{step}.png")
                    twin = ema.ema_copy(model) if ema is not None else model
                    twin.eval()
                    # in shards across the ranks when there are several: the same grid
                    drawn = distributed.sample(twin, config, n_samples, seed=seed, n_steps_each=steps_each)
                    model.train()
                    if main and _is_toy(config):  # 2-D points: the data (spread over the set) and the samples
                        what = "EMA samples" if ema is not None else "samples"
                        shown = data[torch.linspace(0, n - 1, min(n, n_samples)).long()]
                        save_scatter(grid, drawn, data=shown, titles=[f"data ({data_name})", f"{what}, step {step}"])
                    elif main:
                        save_image_grid(grid, drawn)
                    result.samples.append(grid)
                bar.write(f"step {step}: loss {result.loss:.4g}, checkpoint {path}")
    finally:
        bar.close()
    result.step = step
    result.seconds = time.perf_counter() - start
    return result
