"""``fastscore.patch(model)``: swap the NCSN / NCSNv2 layers of an existing model for fastscore's, in place.

Works on models built by the original repos (ermongroup/ncsn, ermongroup/ncsnv2), by
:mod:`fastscore.nn.reference` (``fastscore.models.*(config, layers="reference")``) or by anything else
whose modules carry the originals' class names and attributes: modules are matched by **class name and
structure**, never by import path, so the original packages need not be importable.

How a module is replaced: its class is switched to the fastscore class of the same name (same attribute
names, so every sub-module, Parameter, buffer, hook and the module object itself stay where they are);
state_dict keys and order, parameter registration order (hence optimizer state and EMA lists) and the
module's identity do not change, so an optimizer built before patching keeps working. Only ``forward``
changes (see :mod:`fastscore.nn.layers` for what is fused); results agree with the original's to
floating-point rounding.

What is recognised (by name, then checked for the expected attributes and shapes):

* norms: ConditionalInstanceNorm2dPlus, InstanceNorm2dPlus (the one-argument ncsnv2 kind),
  ConditionalInstanceNorm2d -> the fused fastscore.nn classes. A norm that a patched residual block, a
  patched conditional RCU block or a fastscore model applies right before its ELU(alpha=1) gets that ELU
  folded in (``act="elu"``); elsewhere (CRP, MSF, the final normaliser of an original model, whose
  forward still applies its own activation) it is fused without the activation.
* blocks: ConditionalResidualBlock, ResidualBlock, CondRCUBlock, RCUBlock, CondCRPBlock, CRPBlock,
  CondMSFBlock, MSFBlock, CondRefineBlock, RefineBlock, ConvMeanPool, MeanPoolConv, UpsampleConv.
* kept as they are (known, no faster twin): the other ncsnv2 norms, the model classes themselves, and
  every torch.nn module (convolutions, pools, activations, containers).

Anything else, and any module whose name matches but whose structure does not, is left alone and listed
in ``model.fastscore_unpatched`` (``"qualified.name: Class (reason)"``), with one warning per call.
``model.fastscore_patched`` lists ``"qualified.name: OriginalClass -> fastscore class"``. Patching again
is a no-op. Patch before ``torch.compile``-ing or wrapping the model for distributed training.

Copies made from the model's class: ncsnv2's ``EMAHelper.ema_copy`` rebuilds the model as
``type(model)(model.config)`` and loads its state_dict into the new instance, which would bring back the
original layers. So the patched root model's class is switched too, to a subclass of its original class
(same ``__name__``, ``__qualname__`` and ``__module__``; ``isinstance`` against the original still holds)
whose ``__init__`` runs the original one and then patches the new instance: such copies are patched as
well. Pickling (``torch.save(model)``, ``copy.deepcopy``) stores the original class and re-applies the
subclass on loading, so files need no fastscore-made class to be importable. A root that is a torch or
fastscore class is left as it is (``fastscore.models`` classes build fused layers already).
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings

import torch
import torch.nn as nn

from fastscore.nn import layers as _layers
from fastscore.nn import normalization as _norms

__all__ = ["patch"]

_RCU_NORM = re.compile(r"^\d+_\d+_norm$")


# ---- structure checks: None if the module looks like the original class, else why not ---------------


def _ints(m, *names):
    for name in names:
        value = getattr(m, name, None)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"attribute {name!r} is not an int"
    return None


def _modules(m, *names):
    for name in names:
        if not isinstance(getattr(m, name, None), nn.Module):
            return f"no sub-module {name!r}"
    return None


def _callables(m, *names):
    for name in names:
        if not callable(getattr(m, name, None)):
            return f"attribute {name!r} is not callable"
    return None


def _first(*reasons):
    return next((r for r in reasons if r is not None), None)


def _forward_arity(m) -> int:
    params = list(inspect.signature(type(m).forward).parameters.values())[1:]
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def _check_embedding_norm(m, widths):
    why = _first(_ints(m, "num_features"), _modules(m, "embed"))
    if why:
        return why
    if not isinstance(m.embed, nn.Embedding):
        return "embed is not an nn.Embedding"
    width = widths[bool(getattr(m, "bias", True))] * m.num_features
    if m.embed.weight.dim() != 2 or m.embed.weight.shape[1] != width:
        return f"embed.weight has shape {tuple(m.embed.weight.shape)}, expected (num_classes, {width})"
    if _forward_arity(m) != 2:
        return "forward does not take (x, y)"
    return None


def _check_cond_in_plus(m):
    return _check_embedding_norm(m, {True: 3, False: 2})


def _check_cond_in(m):
    return _check_embedding_norm(m, {True: 2, False: 1})


def _check_in_plus(m):
    why = _ints(m, "num_features")
    if why:
        return why
    names = ("alpha", "gamma", "beta") if getattr(m, "bias", True) else ("alpha", "gamma")
    for name in names:
        p = getattr(m, name, None)
        if not isinstance(p, nn.Parameter) or tuple(p.shape) != (m.num_features,):
            return f"no ({m.num_features},) parameter {name!r}"
    if _forward_arity(m) != 1:
        return "forward does not take (x) alone (ncsn's baseline variant takes (x, y)): no fused twin"
    return None


def _check_residual(m):
    why = _first(
        _modules(m, "conv1", "conv2", "normalize1", "normalize2"),
        _ints(m, "input_dim", "output_dim"),
        _callables(m, "non_linearity"),
    )
    if why:
        return why
    if m.resample not in (None, "down"):
        return f"resample is {m.resample!r}"
    needs_shortcut = m.input_dim != m.output_dim or m.resample is not None
    if needs_shortcut and not isinstance(getattr(m, "shortcut", None), nn.Module):
        return "no shortcut module"
    return None


def _check_rcu(conditional):
    def check(m):
        why = _first(_ints(m, "n_blocks", "n_stages"), _callables(m, "act"))
        if why:
            return why
        kinds = ("norm", "conv") if conditional else ("conv",)
        names = [f"{i + 1}_{j + 1}_{k}" for i in range(m.n_blocks) for j in range(m.n_stages) for k in kinds]
        return _modules(m, *names)

    return check


def _check_crp(conditional):
    def check(m):
        why = _first(_ints(m, "n_stages"), _modules(m, "maxpool"), _callables(m, "act"))
        if why:
            return why
        lists = ("convs", "norms") if conditional else ("convs",)
        for name in lists:
            value = getattr(m, name, None)
            if not isinstance(value, nn.ModuleList) or len(value) < m.n_stages:
                return f"{name} is not a ModuleList of n_stages modules"
        return None

    return check


def _check_msf(conditional):
    def check(m):
        why = _ints(m, "features")
        if why:
            return why
        convs = getattr(m, "convs", None)
        if not isinstance(convs, nn.ModuleList):
            return "convs is not a ModuleList"
        if conditional:
            norms = getattr(m, "norms", None)
            if not isinstance(norms, nn.ModuleList) or len(norms) != len(convs):
                return "norms is not a ModuleList as long as convs"
        return None

    return check


def _check_refine(m):
    why = _first(_ints(m, "n_blocks"), _modules(m, "adapt_convs", "output_convs", "crp"))
    if why:
        return why
    if m.n_blocks > 1 and not isinstance(getattr(m, "msf", None), nn.Module):
        return "several inputs but no msf module"
    return None


def _check_conv(*names):
    return lambda m: _modules(m, "conv", *names)


# name -> (fastscore class, structure check)
_NORMS = {
    "ConditionalInstanceNorm2dPlus": (_norms.ConditionalInstanceNorm2dPlus, _check_cond_in_plus),
    "InstanceNorm2dPlus": (_norms.InstanceNorm2dPlus, _check_in_plus),
    "ConditionalInstanceNorm2d": (_norms.ConditionalInstanceNorm2d, _check_cond_in),
}
_BLOCKS = {
    "ConditionalResidualBlock": (_layers.ConditionalResidualBlock, _check_residual),
    "ResidualBlock": (_layers.ResidualBlock, _check_residual),
    "CondRCUBlock": (_layers.CondRCUBlock, _check_rcu(True)),
    "RCUBlock": (_layers.RCUBlock, _check_rcu(False)),
    "CondCRPBlock": (_layers.CondCRPBlock, _check_crp(True)),
    "CRPBlock": (_layers.CRPBlock, _check_crp(False)),
    "CondMSFBlock": (_layers.CondMSFBlock, _check_msf(True)),
    "MSFBlock": (_layers.MSFBlock, _check_msf(False)),
    "CondRefineBlock": (_layers.CondRefineBlock, _check_refine),
    "RefineBlock": (_layers.RefineBlock, _check_refine),
    "ConvMeanPool": (_layers.ConvMeanPool, _check_conv()),
    "MeanPoolConv": (_layers.MeanPoolConv, _check_conv()),
    "UpsampleConv": (_layers.UpsampleConv, _check_conv("pixelshuffle")),
}
# Known to the originals but with nothing faster to swap in: left alone, not reported.
_KEPT = {
    "ConditionalBatchNorm2d",
    "ConditionalVarianceNorm2d",
    "VarianceNorm2d",
    "ConditionalNoneNorm2d",
    "NoneNorm2d",
    "NCSN",
    "NCSNdeeper",
    "NCSNv2",
    "NCSNv2Deeper",
    "NCSNv2Deepest",
    "CondRefineNetDilated",
    "CondRefineNetDeeperDilated",
    "RefineNetDilated",
}
_FUSED = tuple(cls for cls, _ in (*_NORMS.values(), *_BLOCKS.values()))


def _is_library_module(m: nn.Module) -> bool:
    module = type(m).__module__ or ""
    return module == "torch" or module.startswith(("torch.", "fastscore."))


def _qualified(cls) -> str:
    public = "fastscore.nn" if cls.__module__.startswith("fastscore.nn") else cls.__module__
    return f"{public}.{cls.__name__}"


def _folds_act(parent: nn.Module, attr: str) -> bool:
    """Does ``parent`` (already patched or fastscore's) apply its ELU right after the norm at ``attr``?"""
    if isinstance(parent, (_layers.ConditionalResidualBlock, _layers.ResidualBlock)):
        return attr in ("normalize1", "normalize2") and _layers.is_plain_elu(parent.non_linearity)
    if isinstance(parent, _layers.CondRCUBlock):
        return bool(_RCU_NORM.match(attr)) and _layers.is_plain_elu(parent.act)
    if getattr(type(parent), "_fastscore_norm_act", False):
        return attr == "normalizer" and _layers.is_plain_elu(getattr(parent, "act", None))
    return False


def _patch_one(module, name, parent, attr, patched, unpatched) -> None:
    cls_name = type(module).__name__
    if isinstance(module, _FUSED):
        return  # fastscore's already
    if cls_name in _NORMS or cls_name in _BLOCKS:
        fused, check = _NORMS.get(cls_name) or _BLOCKS[cls_name]
        why = check(module)
        if why is not None:
            unpatched.append(f"{name}: {cls_name} (named like the original but {why})")
            return
        if cls_name in _NORMS:
            act = "elu" if parent is not None and _folds_act(parent, attr) else None
            module.__class__ = fused
            module.act = act
            suffix = "(act='elu')" if act else ""
        else:
            module.__class__ = fused
            suffix = ""
        patched.append(f"{name}: {cls_name} -> {_qualified(fused)}{suffix}")
        return
    if parent is None or cls_name in _KEPT or _is_library_module(module):
        return
    if attr == "module" and isinstance(parent, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return  # the model a patched wrapper holds: the root, in effect
    unpatched.append(f"{name}: {cls_name} (not an NCSN / NCSNv2 layer fastscore knows)")


def _walk(module, prefix, parent, attr, patched, unpatched, seen) -> None:
    if id(module) in seen:
        return
    seen.add(id(module))
    _patch_one(module, prefix or "(root)", parent, attr, patched, unpatched)
    # Children after their parent: whether a norm may fold the ELU depends on the parent having been patched.
    for child_attr, child in module.named_children():
        _walk(child, f"{prefix}.{child_attr}" if prefix else child_attr, module, child_attr, patched, unpatched, seen)


# ---- the root model's class: copies built from type(model) are patched too ---------------------------------

_PATCHING: dict[type, type] = {}  # original class -> its self-patching subclass


def _patching_class(cls: type) -> type:
    """The subclass of ``cls`` whose instances patch themselves on construction (one per class, cached)."""
    if cls in _PATCHING:
        return _PATCHING[cls]
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        with warnings.catch_warnings():
            # the patch() call that made this class already reported what it leaves alone
            warnings.simplefilter("ignore")
            patch(self)

    def __reduce_ex__(self, protocol):
        # Pickle as the original class (importable wherever the model's code is), re-patched on loading.
        func, args, *rest = cls.__reduce_ex__(self, protocol)
        return (_new_patched, (cls,), *rest)

    namespace = {
        "__init__": __init__,
        "__reduce_ex__": __reduce_ex__,
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "_fastscore_patching_of": cls,
    }
    sub = type(cls)(cls.__name__, (cls,), namespace)
    _PATCHING[cls] = sub
    return sub


def _new_patched(cls: type):
    """Unpickling: an empty instance of ``cls``'s self-patching subclass (its state is set next)."""
    sub = _patching_class(cls)
    return sub.__new__(sub)


def _patch_root_class(model: nn.Module) -> None:
    root = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
    cls = type(root)
    if "_fastscore_patching_of" in cls.__dict__ or isinstance(root, _FUSED) or _is_library_module(root):
        return
    root.__class__ = _patching_class(cls)


def patch(model: nn.Module, *, channels_last: bool = False) -> nn.Module:
    """Replace, in place, every NCSN / NCSNv2 layer of ``model`` with fastscore's fused equivalent.

    Parameters, buffers, state_dict keys and order and the module objects themselves are kept (each
    module's class is switched), so optimizers, EMA helpers and checkpoints keep working; the root model's
    class becomes a self-patching subclass of its own, so ``type(model)(config)`` (ncsnv2's
    ``EMAHelper.ema_copy``) builds a patched model too. Sets
    ``model.fastscore_patched`` (what was replaced) and ``model.fastscore_unpatched`` (unknown modules,
    left alone; one warning lists them). Returns ``model``; patching again changes nothing.

    ``channels_last=True`` also stores the model's 4-D weights in channels_last memory format
    (``model.to(memory_format=torch.channels_last)``), the layout oneDNN's CPU convolutions run fastest in.
    Every convolution then returns channels_last, every fused op keeps that layout, and so does the model's
    output; inputs of either layout work. Convolutions in this layout sum in another order, so results
    differ from the contiguous model's by float32 rounding (opt-in for that reason). Eager and under
    ``torch.compile``.
    """
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last: expected a bool, got {type(channels_last).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("model: a TorchScript module cannot be patched; patch the eager model before scripting it")
    patched: list[str] = []
    unpatched: list[str] = []
    _walk(model, "", None, None, patched, unpatched, set())
    _patch_root_class(model)
    previous = model.__dict__.get("fastscore_patched")
    model.fastscore_patched = (list(previous) if isinstance(previous, list) else []) + patched
    model.fastscore_unpatched = unpatched
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if unpatched:
        shown = "; ".join(unpatched[:5]) + (f"; ... ({len(unpatched) - 5} more)" if len(unpatched) > 5 else "")
        warnings.warn(
            f"fastscore.patch left {len(unpatched)} module(s) as they are (see model.fastscore_unpatched): {shown}",
            stacklevel=2,
        )
    return model
