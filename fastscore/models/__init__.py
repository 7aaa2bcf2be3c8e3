"""Score networks with the originals' configs and checkpoints: NCSN (ermongroup/ncsn) and NCSNv2 (ermongroup/ncsnv2).

* :class:`NCSN` (ncsn's ``CondRefineNetDilated`` = ncsnv2's ``NCSN``), :class:`NCSNdeeper`,
  :class:`NCSNv2`, :class:`NCSNv2Deeper`, :class:`NCSNv2Deepest`: ``Model(config, *, layers="fused")``,
  forward ``(x, labels)``. ``layers="reference"`` builds the same network from plain-PyTorch layers with
  the originals' exact numerics (for comparisons and as input to :func:`fastscore.patch`).
* :func:`get_model` picks the class for a config as ncsnv2's ``get_model`` does (by dataset; ncsn
  configs give :class:`NCSN`; ``model.arch`` overrides).
* :func:`get_config`, :func:`config_names`, :func:`get_sigmas`: bundled configs and noise levels.
* :func:`load_checkpoint`: loads the originals' checkpoint files into a model.
* :class:`EnergyScore`, :class:`EnergyHead`, :func:`as_energy`: energy-based score models (the score as
  minus the gradient of an energy; any of these networks as an energy), for :mod:`fastscore.mcmc`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from fastscore import _namespace  # noqa: F401  (refuses a folder in fastscore's place, before configs are read)
from fastscore.models.checkpoints import CheckpointError
from fastscore.models.checkpoints import read_torch_file
from fastscore.models.checkpoints import verify_checksums
from fastscore.models.classifier import ClassifierMLP
from fastscore.models.classifier import NoiseConditionalClassifier
from fastscore.models.classifier import load_classifier
from fastscore.models.classifier import train_classifier
from fastscore.models.configs import ConfigError
from fastscore.models.configs import config_names
from fastscore.models.configs import dict2namespace
from fastscore.models.configs import field
from fastscore.models.configs import get_config
from fastscore.models.configs import get_sigmas
from fastscore.models.configs import namespace2dict
from fastscore.models.energy import EnergyHead
from fastscore.models.energy import EnergyScore
from fastscore.models.energy import as_energy
from fastscore.models.mlp import ScoreMLP
from fastscore.models.ncsn import NCSN
from fastscore.models.ncsn import CondRefineNetDilated
from fastscore.models.ncsn import NCSNdeeper
from fastscore.models.ncsnv2 import NCSNv2
from fastscore.models.ncsnv2 import NCSNv2Deeper
from fastscore.models.ncsnv2 import NCSNv2Deepest

__all__ = [
    "NCSN",
    "CondRefineNetDilated",
    "NCSNdeeper",
    "NCSNv2",
    "NCSNv2Deeper",
    "NCSNv2Deepest",
    "ScoreMLP",
    "NoiseConditionalClassifier",
    "ClassifierMLP",
    "train_classifier",
    "load_classifier",
    "EnergyScore",
    "EnergyHead",
    "as_energy",
    "get_model",
    "get_config",
    "config_names",
    "get_sigmas",
    "load_checkpoint",
    "CheckpointError",
    "ConfigError",
    "dict2namespace",
    "namespace2dict",
]

ARCHS = {cls.__name__: cls for cls in (NCSN, NCSNdeeper, NCSNv2, NCSNv2Deeper, NCSNv2Deepest)}
_BY_DATASET = {"CIFAR10": NCSNv2, "CELEBA": NCSNv2, "LSUN": NCSNv2Deeper, "FFHQ": NCSNv2Deepest}


def get_model(config, *, layers: str = "fused") -> nn.Module:
    """The network a config trains, as the original runners choose it.

    ``config.model.arch`` (a fastscore addition: one of NCSN, NCSNdeeper, NCSNv2, NCSNv2Deeper,
    NCSNv2Deepest) wins; otherwise an ermongroup/ncsn config (no ``model.normalization``) gives
    :class:`NCSN`, and an ncsnv2 config is mapped by ``data.dataset`` as ncsnv2's ``get_model``: CIFAR10,
    CELEBA -> NCSNv2; LSUN -> NCSNv2Deeper; FFHQ -> NCSNv2Deepest. ``config`` may be a bundled name or a path.
    """
    config = get_config(config)
    arch = field(config, "model.arch", "any", None)
    if arch is not None:
        if arch not in ARCHS:
            raise ConfigError(f"config.model.arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
        return ARCHS[arch](config, layers=layers)
    if field(config, "model.normalization", "any", _ABSENT) is _ABSENT:
        return NCSN(config, layers=layers)
    dataset = field(config, "data.dataset", "str", who="get_model")
    if dataset not in _BY_DATASET:
        raise ConfigError(
            f"config.data.dataset: no model for {dataset!r} (ncsnv2 maps {', '.join(_BY_DATASET)}); "
            f"set config.model.arch to one of {', '.join(ARCHS)}"
        )
    return _BY_DATASET[dataset](config, layers=layers)


_ABSENT = object()


# ---- checkpoints -----------------------------------------------------------------------------------------


def _strip_module(state: Mapping) -> dict:
    """Drop the ``module.`` prefix nn.DataParallel adds to every key (all keys or none)."""
    keys = list(state)
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _split(ckpt, where: str, target: nn.Module):
    """(model state, EMA shadow {name: tensor} or None, layout name) of any supported layout."""
    if isinstance(ckpt, (list, tuple)):
        if not ckpt or not _is_state_dict(ckpt[0]):
            raise CheckpointError(
                f"{where}: a list checkpoint must start with the model's state_dict "
                "(ncsn: [model, optimizer]; ncsnv2: [model, optimizer, epoch, step, (ema)])"
            )
        shadow = ckpt[4] if len(ckpt) >= 5 and isinstance(ckpt[4], Mapping) else None
        if shadow is not None and not _is_state_dict(shadow):
            raise CheckpointError(f"{where}: entry 4 (the ncsnv2 EMA shadow) is not a mapping of names to tensors")
        layout = "ncsnv2 [model, optimizer, epoch, step, ema]" if len(ckpt) >= 4 else "ncsn [model, optimizer]"
        return ckpt[0], shadow, layout
    if isinstance(ckpt, Mapping) and "model" in ckpt and _is_state_dict(ckpt["model"]):
        shadow = None
        ema = ckpt.get("ema")
        if isinstance(ema, Mapping) and isinstance(ema.get("shadow_params"), (list, tuple)):
            # score_sde: a list in model.parameters() order (trainable parameters only).
            names = [n for n, p in target.named_parameters() if p.requires_grad]
            params = ema["shadow_params"]
            if len(params) != len(names):
                raise CheckpointError(
                    f"{where}: its EMA holds {len(params)} parameters, the model has {len(names)} trainable ones"
                )
            shadow = dict(zip(names, params))
        return ckpt["model"], shadow, "score_sde {'model', 'ema', ...}"
    if _is_state_dict(ckpt):
        return ckpt, None, "state_dict"
    raise CheckpointError(
        f"{where}: not a checkpoint layout fastscore knows (a state_dict; ncsn's [model, optimizer]; ncsnv2's "
        f"[model, optimizer, epoch, step, (ema)]; score_sde's {{'model', 'ema', ...}}), got {type(ckpt).__name__}"
    )


def _listed(items, limit=8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _mismatch_report(state: Mapping, own: Mapping, *, what: str, missing_ok: bool = False) -> list[str]:
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing and not missing_ok:
        problems.append(f"{len(missing)} {what} keys missing from the checkpoint ({_listed(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected {what} keys ({_listed(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} {what} shape mismatches ({_listed(shapes)})")
    return problems


def load_checkpoint(path, model: nn.Module, ema: bool = True, *, map_location="cpu", weights_only: bool = True):
    """Load an ncsn / ncsnv2 (or score_sde, or plain state_dict) checkpoint file into ``model``; returns it.

    Layouts (docs/numerics.md#checkpoints), recognised automatically: a state_dict; ncsn's
    ``[model_state, optimizer_state]``; ncsnv2's ``[model_state, optimizer_state, epoch, step, (ema_shadow)]``
    whose EMA shadow is a dict keyed by un-prefixed parameter names; score_sde's ``{'model', 'ema':
    {'shadow_params': [...]}, ...}``. The ``module.`` prefix nn.DataParallel adds is removed; ``model`` may
    itself be wrapped in DataParallel.

    ``ema=True`` (default): where the checkpoint has an EMA shadow, the parameters it covers take the EMA
    values (what ncsnv2 samples with); buffers (e.g. ``sigmas``) come from the model state. ``ema=False``:
    the raw training weights.

    Every key, shape and EMA entry is checked before anything is copied: a checkpoint of another
    architecture or config raises :class:`CheckpointError` (a ValueError) naming the file and listing
    the missing keys, unexpected keys and shape mismatches, and the model is left unchanged. So does a
    file that is not a readable checkpoint (truncated, a text file, a folder) and one written by
    ``fastscore train`` whose tensors no longer match the sha256 checksums written with them (checked for
    the parts loaded: the model state, and the EMA shadow when ``ema``); a missing file raises
    ``FileNotFoundError``. ``weights_only=True`` (default) unpickles tensors and plain containers only
    (torch.load's safe mode).
    """
    where = f"checkpoint {os.fspath(path)!r}"
    ckpt = read_torch_file(path, map_location=map_location, weights_only=weights_only)
    return load_into(ckpt, model, ema=ema, where=where)


def load_into(ckpt, model: nn.Module, ema: bool = True, *, where: str = "checkpoint"):
    """:func:`load_checkpoint` for a checkpoint object already read from ``where`` (checksums, layout and
    fit checked the same way); returns ``model``."""
    target = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
    state, shadow, layout = _split(ckpt, where, target)
    verify_checksums(ckpt, where, parts=("model", "ema") if ema and shadow is not None else ("model",))
    state = _strip_module(state)
    own = target.state_dict()
    problems = _mismatch_report(state, own, what="state_dict")
    if ema and shadow is not None:
        shadow = _strip_module(shadow)
        params = dict(target.named_parameters())
        problems += _mismatch_report(shadow, params, what="EMA", missing_ok=True)
    if problems:
        raise CheckpointError(
            f"{where} ({layout}) does not fit {type(target).__name__}: " + "; ".join(problems) + ". Is it a checkpoint "
            "of another architecture or config (model class, ngf, num_classes, image_size, channels)?"
        )
    merged = dict(state)
    if ema and shadow is not None:
        merged.update(shadow)
    target.load_state_dict(merged, strict=True)
    return model
