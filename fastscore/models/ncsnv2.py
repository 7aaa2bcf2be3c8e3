"""ncsnv2's RefineNet score networks (``models/ncsnv2.py``): NCSNv2, NCSNv2Deeper, NCSNv2Deepest.

One model-building code path for both layer sets: ``layers="fused"`` (default) builds from
:mod:`fastscore.nn.layers`, ``layers="reference"`` from :mod:`fastscore.nn.reference` (the originals'
numerics, the benches' "eager" baseline). Either way the module tree, attribute names, registration order,
state_dict keys (``sigmas`` buffer included) and the init RNG sequence are ncsnv2's, so ncsnv2 checkpoints
load strictly (see :func:`fastscore.models.load_checkpoint`) and ``torch.manual_seed(s)`` gives the same
initial weights as the original.

Skeleton (docs/numerics.md#model-skeletons): ``begin_conv`` 3x3 -> residual stages -> RefineBlocks from
the coarsest stage to the finest -> ``normalizer`` -> ``act`` -> ``end_conv`` 3x3. The NCSNv2* networks are
unconditional: the label only selects ``sigmas[y]``, and the output is divided by it. Input scaling:
``2x - 1`` unless ``config.data.logit_transform`` or ``config.data.rescaled``.

Channels-last: the fused models run whatever layout they are given end to end. The fastest CPU path is
channels_last throughout: ``model.to(memory_format=torch.channels_last)`` (the conv weights, so no
convolution reorders its weight on every call; checkpoints load into it unchanged) and a channels_last
input (``x.contiguous(memory_format=torch.channels_last)``). The output then is channels_last too
(``.view(B, -1)`` on it needs a ``.contiguous()`` or ``.reshape`` first).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from fastscore.models.configs import ConfigError
from fastscore.models.configs import field
from fastscore.models.configs import get_config
from fastscore.models.configs import get_sigmas

__all__ = ["NCSNv2", "NCSNv2Deeper", "NCSNv2Deepest", "layer_namespace", "LAYERS"]

LAYERS = ("fused", "reference")


def layer_namespace(layers: str):
    """The module the blocks come from: fastscore.nn.layers ("fused") or fastscore.nn.reference."""
    if layers == "fused":
        from fastscore.nn import layers as namespace
    elif layers == "reference":
        from fastscore.nn import reference as namespace
    else:
        raise ValueError(f"layers: expected one of {', '.join(map(repr, LAYERS))}, got {layers!r}")
    return namespace


def _check_inputs(model: nn.Module, x, y) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a (N, C, H, W) tensor, got {shape}")
    if x.shape[1] != model.begin_conv.in_channels:
        raise ValueError(
            f"x: expected {model.begin_conv.in_channels} channels (config.data.channels), got shape {tuple(x.shape)}"
        )
    if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32) or tuple(y.shape) != (x.shape[0],):
        got = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"y: expected an int64 tensor of noise-level indices of shape ({x.shape[0]},), got {got}")


class _RefineNet(nn.Module):
    """The RefineNet skeleton shared by every model; subclasses give the stage tables.

    ``_RES``: residual stages in order, ``(name, in_mult, out_mult, resample, dilation)`` (multiples of
    ngf; each stage is [block(in -> out, resample), block(out -> out)] at the same dilation).
    ``_REFINE``: refine blocks in registration order, ``(name, in_mults, out_mult, start, end)``.
    ``_CHAIN``: execution order, ``(refine name, skip stage name)``, coarsest first.
    """

    _RES: tuple = ()
    _REFINE: tuple = ()
    _CHAIN: tuple = ()
    _CONDITIONAL = False
    _DIVIDE_BY_SIGMA = True
    # fastscore.patch may fold the ELU after `normalizer` into it: forward goes through layers.norm_act.
    _fastscore_norm_act = True

    def _build_stages(self, ns, act, spec_norm: bool) -> None:
        ngf, L, norm = self.ngf, self.num_classes, self.norm
        image_size = self._image_size
        for name, cin, cout, resample, dilation in self._RES:
            # ncsn / ncsnv2 pass adjust_padding=True to res4's first block at image_size 28 (a dilated block:
            # it has no effect there).
            extra = {"adjust_padding": image_size == 28} if name == "res4" else {}
            blocks = []
            for first in (True, False):
                kwargs = dict(resample=resample if first else None, act=act, normalization=norm)
                if dilation is not None:
                    kwargs["dilation"] = dilation
                if first:
                    kwargs.update(extra)
                c_in, c_out = (cin * ngf, cout * ngf) if first else (cout * ngf, cout * ngf)
                if self._CONDITIONAL:
                    blocks.append(ns.ConditionalResidualBlock(c_in, c_out, L, spec_norm=spec_norm, **kwargs))
                else:
                    blocks.append(ns.ResidualBlock(c_in, c_out, **kwargs))
            setattr(self, name, nn.ModuleList(blocks))
        for name, in_mults, out_mult, start, end in self._REFINE:
            planes = [m * ngf for m in in_mults]
            if self._CONDITIONAL:
                block = ns.CondRefineBlock(
                    planes, out_mult * ngf, L, norm, act=act, start=start, end=end, spec_norm=spec_norm
                )
            else:
                block = ns.RefineBlock(planes, out_mult * ngf, act=act, start=start, end=end)
            setattr(self, name, block)

    def _compute_cond_module(self, module, x, *y):
        for m in module:
            x = m(x, *y)
        return x

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Score of ``x`` (N, C, H, W) at noise levels ``y`` (N,) int64: (N, C, H, W)."""
        from fastscore.nn.layers import norm_act

        _check_inputs(self, x, y)
        h = 2 * x - 1.0 if not self.logit_transform and not self.rescaled else x
        cond = (y,) if self._CONDITIONAL else ()
        output = self.begin_conv(h)
        layers = {}
        for name, *_ in self._RES:
            output = layers[name] = self._compute_cond_module(getattr(self, name), output, *cond)
        ref = None
        for refine, skip in self._CHAIN:
            inputs = [layers[skip]] if ref is None else [layers[skip], ref]
            ref = getattr(self, refine)(inputs, *cond, layers[skip].shape[2:])
        output = self.end_conv(norm_act(self.normalizer, self.act, ref, *cond))
        if self._DIVIDE_BY_SIGMA:
            used_sigmas = self.sigmas[y].view(x.shape[0], *([1] * len(x.shape[1:])))
            output = output / used_sigmas
        return output


def _common_fields(self, config, who: str) -> None:
    self._image_size = field(config, "data.image_size", "int+", who=who)
    field(config, "data.channels", "int+", who=who)
    self.logit_transform = field(config, "data.logit_transform", "bool", False, who=who)
    self.rescaled = field(config, "data.rescaled", "bool", False, who=who)


def _as_config(config):
    if isinstance(config, (dict, str)):
        return get_config(config)
    if config is None:
        raise ConfigError("config: expected a config namespace (fastscore.models.get_config), got None")
    return config


class _NCSNv2Base(_RefineNet):
    """ncsnv2's unconditional, sigma-dividing networks (NCSNv2, NCSNv2Deeper, NCSNv2Deepest)."""

    def __init__(self, config, *, layers: str = "fused"):
        super().__init__()
        ns = layer_namespace(layers)
        config = _as_config(config)
        who = type(self).__name__
        _common_fields(self, config, who)
        field(config, "model.normalization", "any", who=who)
        field(config, "model.nonlinearity", "str", who=who)
        self.layers = layers
        self.norm = ns.get_normalization(config, conditional=False)
        self.ngf = ngf = field(config, "model.ngf", "int+", who=who)
        self.num_classes = field(config, "model.num_classes", "int+", who=who)
        self.act = act = ns.get_act(config)
        self.register_buffer("sigmas", get_sigmas(config))
        self.config = config

        channels = config.data.channels
        self.begin_conv = nn.Conv2d(channels, ngf, 3, stride=1, padding=1)
        # Quirk kept: num_classes lands in the unconditional norm's second argument
        # (docs/numerics.md#the-final-normaliser-quirk).
        self.normalizer = ns.build_norm(self.norm, act, ngf, self.num_classes)
        self.end_conv = nn.Conv2d(ngf, channels, 3, stride=1, padding=1)
        self._build_stages(ns, act, spec_norm=False)

    def extra_repr(self) -> str:
        return f"layers={self.layers!r}"


class NCSNv2(_NCSNv2Base):
    """ncsnv2 ``NCSNv2`` (CIFAR-10, CelebA; 29,694,083 parameters at ngf 128): 4 residual stages (res3 and
    res4 dilated 2 and 4, so only res2 halves the resolution), 4 refine blocks.

    ``NCSNv2(config, *, layers="fused"|"reference")``; forward ``(x, y)`` -> ``f(x) / sigmas[y]``.
    """

    _RES = (
        ("res1", 1, 1, None, None),
        ("res2", 1, 2, "down", None),
        ("res3", 2, 2, "down", 2),
        ("res4", 2, 2, "down", 4),
    )
    _REFINE = (
        ("refine1", (2,), 2, True, False),
        ("refine2", (2, 2), 2, False, False),
        ("refine3", (2, 2), 1, False, False),
        ("refine4", (1, 1), 1, False, True),
    )
    _CHAIN = (("refine1", "res4"), ("refine2", "res3"), ("refine3", "res2"), ("refine4", "res1"))


class NCSNv2Deeper(_NCSNv2Base):
    """ncsnv2 ``NCSNv2Deeper`` (LSUN church 64, bedroom / tower 128): 5 residual stages (res2 and res3 halve
    the resolution; res4, res5 dilated), 5 refine blocks."""

    _RES = (
        ("res1", 1, 1, None, None),
        ("res2", 1, 2, "down", None),
        ("res3", 2, 2, "down", None),
        ("res4", 2, 4, "down", 2),
        ("res5", 4, 4, "down", 4),
    )
    _REFINE = (
        ("refine1", (4,), 4, True, False),
        ("refine2", (4, 4), 2, False, False),
        ("refine3", (2, 2), 2, False, False),
        ("refine4", (2, 2), 1, False, False),
        ("refine5", (1, 1), 1, False, True),
    )
    _CHAIN = (
        ("refine1", "res5"),
        ("refine2", "res4"),
        ("refine3", "res3"),
        ("refine4", "res2"),
        ("refine5", "res1"),
    )


class NCSNv2Deepest(_NCSNv2Base):
    """ncsnv2 ``NCSNv2Deepest`` (FFHQ 256): NCSNv2Deeper plus ``res31`` (a third halving) and ``refine31``
    (registered after refine3, run before it)."""

    _RES = (
        ("res1", 1, 1, None, None),
        ("res2", 1, 2, "down", None),
        ("res3", 2, 2, "down", None),
        ("res31", 2, 2, "down", None),
        ("res4", 2, 4, "down", 2),
        ("res5", 4, 4, "down", 4),
    )
    _REFINE = (
        ("refine1", (4,), 4, True, False),
        ("refine2", (4, 4), 2, False, False),
        ("refine3", (2, 2), 2, False, False),
        ("refine31", (2, 2), 2, False, False),
        ("refine4", (2, 2), 1, False, False),
        ("refine5", (1, 1), 1, False, True),
    )
    _CHAIN = (
        ("refine1", "res5"),
        ("refine2", "res4"),
        ("refine31", "res31"),
        ("refine3", "res3"),
        ("refine4", "res2"),
        ("refine5", "res1"),
    )
