"""Model configurations as the original repos read them: nested attribute namespaces from .yml files.

``get_config(name_or_path)`` returns what ncsn / ncsnv2's ``main.py`` builds with ``dict2namespace``
(an ``argparse.Namespace`` per mapping), from a bundled config or from any .yml file, so the original
config files work unchanged. Bundled (``fastscore/configs/*.yml``, see ``config_names()``):

* ermongroup/ncsnv2: ``cifar10``, ``celeba`` (NCSNv2), ``church``, ``bedroom``, ``tower`` (NCSNv2Deeper),
  ``ffhq`` (NCSNv2Deepest), ``ncsn_original`` (NCSNv2 with ncsn's noise levels);
* ermongroup/ncsn ``anneal.yml`` (CondRefineNetDilated = ``fastscore.models.NCSN``): ``mnist`` (the active
  variant), ``ncsn_cifar10``, ``ncsn_celeba`` (its commented-out variants);
* fastscore's small ones: ``demo_digits`` (NCSNv2, 16x16x1, ngf 32, 10 levels) and ``demo_tiny`` (8x8x3,
  ngf 8, 4 levels: for tests).

The model classes read the fields they need through :func:`field`, so a missing or malformed field
raises a :class:`ConfigError` (a ValueError) that names it, e.g. ``config.model.ngf``.
"""

from __future__ import annotations

import argparse
import math
import os
from importlib import resources

import numpy as np
import torch
import yaml

__all__ = [
    "ConfigError",
    "get_config",
    "config_names",
    "dict2namespace",
    "namespace2dict",
    "get_sigmas",
    "field",
    "check_config",
    "check_field",
    "FIELDS",
]


class ConfigError(ValueError):
    """A configuration is unknown, unreadable, or lacks / mistypes a field a model needs."""


# ---- namespaces -----------------------------------------------------------------------------------------


def dict2namespace(config: dict) -> argparse.Namespace:
    """Nested mappings -> nested ``argparse.Namespace`` (as ncsn / ncsnv2's main.py)."""
    namespace = argparse.Namespace()
    for key, value in config.items():
        setattr(namespace, key, dict2namespace(value) if isinstance(value, dict) else value)
    return namespace


def namespace2dict(config) -> dict:
    """The inverse of :func:`dict2namespace` (e.g. to save a config back to .yml)."""
    return {k: namespace2dict(v) if isinstance(v, argparse.Namespace) else v for k, v in vars(config).items()}


def _configs_dir():
    return resources.files("fastscore") / "configs"


def config_names() -> list[str]:
    """Names of the bundled configs (``fastscore/configs/<name>.yml``)."""
    return sorted(p.name[: -len(".yml")] for p in _configs_dir().iterdir() if p.name.endswith(".yml"))


def get_config(name_or_path) -> argparse.Namespace:
    """A bundled config by name (``"cifar10"``, ``"mnist"``, ``"demo_digits"``, ...) or a .yml file by path,
    as a nested ``argparse.Namespace``. A namespace or dict is accepted too (a dict is converted).

    Raises :class:`ConfigError` (a ValueError) naming the config for an unknown name (listing the bundled
    ones), a missing or unparsable file, or a file whose top level is not a mapping.
    """
    if isinstance(name_or_path, argparse.Namespace):
        return name_or_path
    if isinstance(name_or_path, dict):
        return dict2namespace(name_or_path)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ConfigError(
            f"config: expected a bundled config name, a path to a .yml file, a dict or a namespace, "
            f"got {type(name_or_path).__name__}"
        )
    text_name = os.fspath(name_or_path)
    names = config_names()
    if text_name in names:
        source = _configs_dir() / f"{text_name}.yml"
        label = f"bundled config {text_name!r}"
    elif os.path.splitext(text_name)[1] in (".yml", ".yaml") or os.sep in text_name or os.path.exists(text_name):
        source = text_name
        label = f"config file {text_name!r}"
        if not os.path.isfile(text_name):
            raise ConfigError(f"{label} does not exist (bundled configs: {', '.join(names)})")
    else:
        raise ConfigError(f"unknown config {text_name!r}: expected one of {', '.join(names)}, or a path to a .yml file")
    try:
        with open(source, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"{label}: expected a mapping of sections (training, data, model, ...), got {type(data).__name__}"
        )
    return dict2namespace(data)


# ---- reading fields -------------------------------------------------------------------------------------

_MISSING = object()


def _lookup(config, path: str):
    node = config
    for part in path.split("."):
        node = node.get(part, _MISSING) if isinstance(node, dict) else getattr(node, part, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def field(config, path: str, kind: str, default=_MISSING, *, who: str = "the model"):
    """``config.<path>`` checked to be of ``kind``; ``default`` when absent (else ConfigError naming it).

    kind: ``"int+"`` a positive integer, ``"number+"`` a positive finite number, ``"bool"``, ``"str"``,
    ``"any"``.
    """
    value = _lookup(config, path)
    if value is _MISSING:
        if default is not _MISSING:
            return default
        raise ConfigError(f"config.{path}: missing ({who} needs it)")
    if not _KINDS[kind][0](value):
        raise ConfigError(f"config.{path}: expected {_KINDS[kind][1]}, got {value!r}")
    return value


_KINDS = {
    "int+": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "number+": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
        "a positive number",
    ),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "any": (lambda v: True, "anything"),
}


# ---- checking a whole config -------------------------------------------------------------------------

_NORMALIZATIONS = ("NoneNorm", "InstanceNorm++", "InstanceNorm", "BatchNorm", "VarianceNorm", None)
_NONLINEARITIES = ("elu", "relu", "lrelu", "swish")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The fields fastscore reads (path -> (test, what it expects)). Other fields of the originals' configs
# (n_epochs, num_workers, fid, ...) are kept as they are and not checked.
FIELDS = {
    "training.batch_size": ("int+", None),
    "training.n_iters": ("int+", None),
    "training.snapshot_freq": ("int+", None),
    "training.anneal_power": (_is_number, "a finite number"),
    "training.snapshot_sampling": ("bool", None),
    "sampling.batch_size": ("int+", None),
    "sampling.n_steps_each": ("int+", None),
    "sampling.step_lr": ("number+", None),
    "sampling.denoise": ("bool", None),
    "data.dataset": ("str", None),
    "data.image_size": ("int+", None),
    "data.channels": ("int+", None),
    "data.dim": ("int+", None),
    "data.logit_transform": ("bool", None),
    "data.rescaled": ("bool", None),
    "data.uniform_dequantization": ("bool", None),
    "data.gaussian_dequantization": ("bool", None),
    "model.arch": ("str", None),
    "model.ngf": ("int+", None),
    "model.num_classes": ("int+", None),
    "model.sigma_begin": ("number+", None),
    "model.sigma_end": ("number+", None),
    "model.sigma_dist": (lambda v: v in ("geometric", "uniform"), "'geometric' or 'uniform'"),
    "model.normalization": (
        lambda v: v in _NORMALIZATIONS,
        "one of " + ", ".join(repr(n) for n in _NORMALIZATIONS),
    ),
    "model.nonlinearity": (
        lambda v: isinstance(v, str) and v.lower() in _NONLINEARITIES,
        "one of " + ", ".join(repr(n) for n in _NONLINEARITIES),
    ),
    "model.spec_norm": ("bool", None),
    "model.ema": ("bool", None),
    "model.ema_rate": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "model.ema_warmup": ("bool", None),
    "model.hidden": ("int+", None),
    "model.n_layers": ("int+", None),
    "optim.optimizer": (lambda v: v in ("Adam", "RMSProp", "SGD"), "'Adam', 'RMSProp' or 'SGD'"),
    "optim.lr": ("number+", None),
    "optim.eps": ("number+", None),
    "optim.weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "optim.beta1": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optim.amsgrad": ("bool", None),
}


def check_field(path: str, value) -> None:
    """:class:`ConfigError` naming ``config.<path>`` if ``value`` is not what fastscore expects there (a
    field fastscore does not read is not checked)."""
    if path not in FIELDS:
        return
    test, expected = FIELDS[path]
    if isinstance(test, str):
        test, expected = _KINDS[test]
    if not test(value):
        raise ConfigError(f"config.{path}: expected {expected}, got {value!r}")


def check_config(config) -> None:
    """Check every field fastscore reads that ``config`` sets (types, ranges, names); :class:`ConfigError`
    naming the first bad one. Absent fields are left to the code that needs them."""
    for path in FIELDS:
        value = _lookup(config, path)
        if value is _MISSING:
            continue
        check_field(path, value)


# ---- noise levels -----------------------------------------------------------------------------------------


def get_sigmas(config) -> torch.Tensor:
    """The noise levels sigma_1 > ... > sigma_L as ncsnv2's ``get_sigmas``: a float32 tensor (L,).

    ``config.model.sigma_dist`` ``"geometric"`` (the default when absent, as ermongroup/ncsn):
    ``exp(linspace(log sigma_begin, log sigma_end, L))``; ``"uniform"``: ``linspace(sigma_begin,
    sigma_end, L)``; computed in float64 NumPy then rounded to float32, bitwise as ncsnv2. On
    ``config.device`` when the config has one (as ncsnv2), else on the default device.
    """
    begin = field(config, "model.sigma_begin", "number+", who="get_sigmas")
    end = field(config, "model.sigma_end", "number+", who="get_sigmas")
    levels = field(config, "model.num_classes", "int+", who="get_sigmas")
    dist = field(config, "model.sigma_dist", "any", "geometric")
    if dist == "geometric":
        values = np.exp(np.linspace(np.log(begin), np.log(end), levels))
    elif dist == "uniform":
        values = np.linspace(begin, end, levels)
    else:
        raise ConfigError(f"config.model.sigma_dist: expected 'geometric' or 'uniform', got {dist!r}")
    sigmas = torch.tensor(values).float()
    device = _lookup(config, "device")
    return sigmas if device is _MISSING or device is None else sigmas.to(device)
