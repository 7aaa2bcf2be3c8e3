"""Fused NCSN / NCSNv2 blocks: drop-in for ncsnv2's ``models/layers.py`` (and ncsn's blocks).

Each class has the name, constructor arguments, attribute names, sub-module registration order, state_dict
keys and init RNG consumption of its twin in :mod:`fastscore.nn.reference` (it subclasses it: the
construction code is shared, only ``forward`` and the choice of normaliser differ), so checkpoints and
optimizer states of the originals load unchanged. What is fused, and why it does not change results
beyond floating-point rounding:

* **norm -> ELU.** In the residual blocks, the conditional RCU blocks and the models' final
  ``normalizer -> act``, an InstanceNorm++ / conditional instance norm (the fastscore.nn classes) followed
  by ``nn.ELU(alpha=1)`` runs as one call of the norm built with ``act="elu"`` (one statistics pass and
  one apply pass, no separate ELU pass). Any other norm or activation runs as norm, then act.
* **ELU without a norm** (the RCU and CRP blocks' activations, a norm that cannot carry the ELU):
  a plain ``nn.ELU(alpha=1)`` runs on :func:`fastscore.ops.elu` (the norms' vectorised expm1 instead of
  torch's per-element Sleef call; within 1 ulp of expm1 in float32), in place where the block owns the
  tensor (see below). Any other activation runs as itself.
* **CRP pooling** (5x5, stride 1, padding 2: max in CRPBlock, count_include_pad average in CondCRPBlock)
  runs on :func:`fastscore.ops.crp_pool`.
* **Residual adds and sums in place** where the tensor written is a fresh intermediate no backward
  formula reads (a convolution's or an interpolation's output, a running sum): ``shortcut(x) + o``,
  the CRP and MSF accumulations, the 2x2 mean pool's four-phase sum (kept in the originals' order
  ``((A + B) + C) + D``, then ``/ 4``, so it is bitwise the original's). An add whose result dtype would
  differ from the written tensor's (mixed dtypes under autocast) stays out of place.
* **ELU in place** on a convolution's output inside RCUBlock: in eager inference on the fused op's
  ``out=`` (nothing else holds that output); otherwise as ``F.elu(inplace=True)`` (the convolution's
  backward does not read its output, and ELU's backward reads its result: one saved tensor, not two).
* **2x2 mean pooling** (ConvMeanPool, MeanPoolConv) sums its four phases into one buffer, and its
  backward hands ``grad / 4`` to each phase in one pass instead of autograd's four zero-filled
  full-size slice gradients (bitwise the same gradient; see :func:`mean_pool_2x2`).
* **MSF** skips the bilinear resize when the input already has the output size (an exact identity with
  align_corners=True) and sums into its first term instead of a zero buffer. Deviation, documented: the
  sum has the activations' dtype, where the originals allocate it in the *default* dtype (which breaks
  ``.double()`` / ``.half()`` / bfloat16 models: docs/numerics.md#the-msf-sum-dtype). In float32 nothing changes.

Memory layout: nothing here converts layouts; given channels_last activations every block returns
channels_last (the convolutions, the norms, the pooling and the in-place adds all keep it).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastscore import _backend
from fastscore.nn import normalization as _norms
from fastscore.nn import reference as _ref
from fastscore.nn.reference import get_act
from fastscore.ops.crp_pool import crp_pool
from fastscore.ops.elu import elu as _fused_elu

get_normalization = _norms.get_normalization

__all__ = [
    "ConvMeanPool",
    "MeanPoolConv",
    "UpsampleConv",
    "ConditionalResidualBlock",
    "ResidualBlock",
    "CondRCUBlock",
    "RCUBlock",
    "CondCRPBlock",
    "CRPBlock",
    "CondMSFBlock",
    "MSFBlock",
    "CondRefineBlock",
    "RefineBlock",
    "get_normalization",
    "get_act",
    "build_norm",
    "norm_act",
    "apply_act",
    "apply_act_",
    "is_plain_elu",
]

# The normalisers that can apply the ELU that follows them (the `act="elu"` of fastscore.nn).
FUSABLE_NORMS = (_norms.ConditionalInstanceNorm2dPlus, _norms.InstanceNorm2dPlus, _norms.ConditionalInstanceNorm2d)


# ---- norm -> act -----------------------------------------------------------------------------------


def is_plain_elu(act) -> bool:
    """True for ``nn.ELU`` with alpha 1 (what ncsn / ncsnv2 use): the activation the norms can fuse."""
    return isinstance(act, nn.ELU) and float(act.alpha) == 1.0


def build_norm(normalization, act, *args, **kwargs):
    """``normalization(*args, **kwargs)``, built with ``act="elu"`` when it can apply ``act`` itself."""
    if isinstance(normalization, type) and issubclass(normalization, FUSABLE_NORMS) and is_plain_elu(act):
        return normalization(*args, act="elu", **kwargs)
    return normalization(*args, **kwargs)


def apply_act(act, x: Tensor) -> Tensor:
    """``act(x)``, on the fused :func:`fastscore.ops.elu` when ``act`` is a plain ELU; x is not modified."""
    return _fused_elu(x) if is_plain_elu(act) else act(x)


def apply_act_(act, x: Tensor) -> Tensor:
    """``act(x)`` where the caller owns ``x`` and no backward formula reads it (a convolution's output):
    written into ``x``. In eager inference, the fused ELU in place; otherwise (autograd, forward-mode AD,
    torch.func transforms, torch.compile) ``F.elu(inplace=True)``: its backward reads its result, so one
    tensor is kept for backward where the fused op's would need ``x`` as well (measured: no slower for a
    training step), and it has forward-mode formulas. Compiled, Inductor runs it as its own in-place kernel
    after the convolution (an extern kernel it cannot fuse into); the fused ELU out of place there measured
    no faster for the compiled NCSNv2 forward (0.99-1.04x, AVX-512 and AVX2, 1 and 2 threads)."""
    if not is_plain_elu(act):
        return act(x)
    if _backend.eager_inference(x):
        return _fused_elu(x, out=x)
    return F.elu(x, inplace=True)


def norm_act(norm: nn.Module, act, x: Tensor, *y: Tensor) -> Tensor:
    """``act(norm(x, *y))``: one call when the norm carries the ELU (``norm.act == "elu"``); otherwise a
    plain ELU after the norm runs on the fused op (out of place: a norm may hand back its input)."""
    if getattr(norm, "act", None) == "elu":
        if not is_plain_elu(act):
            raise RuntimeError(
                f"{type(norm).__name__} applies an ELU itself (act='elu') but the block's activation is {act!r}; "
                "rebuild the block (or fastscore.patch the model again) after changing its activation"
            )
        return norm(x, *y)
    return apply_act(act, norm(x, *y))


# ---- in-place helpers --------------------------------------------------------------------------------


def _add_into(acc: Tensor, other: Tensor) -> Tensor:
    """``acc + other``, written into ``acc`` (a fresh intermediate) when that changes nothing but the memory."""
    # promote_types, not result_type: the same for tensors of one shape, and torch.compile traces it
    if acc.shape == other.shape and torch.promote_types(acc.dtype, other.dtype) == acc.dtype:
        return acc.add_(other)
    return other + acc


def _mean_pool_2x2_forward(output: Tensor) -> Tensor:
    out = output[:, :, ::2, ::2] + output[:, :, 1::2, ::2]
    out += output[:, :, ::2, 1::2]
    out += output[:, :, 1::2, 1::2]
    return out.div_(4.0)


class _MeanPool2x2(torch.autograd.Function):
    """Forward in the originals' order; backward ``grad / 4`` to each of the four phases in one pass.

    Autograd through the four strided slices would zero-fill a full-size gradient per slice and add
    them up (4 fills, 4 scatters, 3 adds); the gradient is the same bitwise: every input element
    receives exactly ``grad / 4`` (a division by a power of two), here as a nearest 2x upsampling.
    Inductor does no better with the slices: it differentiates them into one kernel that computes every
    gradient element with integer divisions and masked scalar loads (about 4x the time of this backward
    under torch.compile, measured on a 16x64x32x32 conv output), so compiled training uses this Function
    too (without the custom jvp, which torch.compile rejects: :class:`_MeanPool2x2Jvp` adds it).
    The backward is made of differentiable ops (double backward works).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(output):
        return _mean_pool_2x2_forward(output)

    @staticmethod
    def setup_context(ctx, inputs, result):
        pass

    @staticmethod
    def backward(ctx, grad):
        return F.interpolate(grad / 4.0, scale_factor=2, mode="nearest")


class _MeanPool2x2Jvp(_MeanPool2x2):
    """:class:`_MeanPool2x2` with its jvp (the pooling itself), for eager autograd and forward-mode AD."""

    @staticmethod
    def jvp(ctx, tangent):
        return _mean_pool_2x2_forward(tangent)


def mean_pool_2x2(output: Tensor) -> Tensor:
    """2x2 mean pooling, bitwise the originals' ``(((A + B) + C) + D) / 4``, with one allocation.

    Like the originals it needs even H and W (an odd size fails on the mismatched phase shapes).
    When a gradient is wanted the backward is one pass (:class:`_MeanPool2x2`), eager and compiled, by
    :func:`fastscore._backend.op_path`'s rule; compiling under a torch.func transform, the plain ops.
    """
    even = output.shape[-2] % 2 == 0 and output.shape[-1] % 2 == 0
    if not (even and output.requires_grad and torch.is_grad_enabled()):
        return _mean_pool_2x2_forward(output)
    path = _backend.op_path(output)
    if path == "function":
        return _MeanPool2x2.apply(output)
    if path == "function_jvp":
        return _MeanPool2x2Jvp.apply(output)
    return _mean_pool_2x2_forward(output)


def _is(value, expected) -> bool:
    return value == expected or value == (expected, expected)


def crp_pool_mode(pool: nn.Module) -> str | None:
    """The crp_pool mode ("max" / "avg") if ``pool`` is the RefineNet 5x5 stride-1 pad-2 pooling, else None."""
    if type(pool) not in (nn.MaxPool2d, nn.AvgPool2d):
        return None
    if not (_is(pool.kernel_size, 5) and _is(pool.stride, 1) and _is(pool.padding, 2)) or pool.ceil_mode:
        return None
    if type(pool) is nn.MaxPool2d:
        return "max" if _is(pool.dilation, 1) and not pool.return_indices else None
    return "avg" if pool.count_include_pad and pool.divisor_override is None else None


def _pool(pool: nn.Module, x: Tensor) -> Tensor:
    mode = crp_pool_mode(pool)
    return pool(x) if mode is None else crp_pool(x, mode=mode)


def _rcu_names(n_blocks: int, n_stages: int, with_norm: bool) -> tuple:
    return tuple(
        tuple((f"{i + 1}_{j + 1}_norm" if with_norm else None, f"{i + 1}_{j + 1}_conv") for j in range(n_stages))
        for i in range(n_blocks)
    )


# ---- resampling convs --------------------------------------------------------------------------------


class ConvMeanPool(_ref.ConvMeanPool):
    """Convolution then 2x2 mean pooling (bitwise the original's sum order, one allocation)."""

    def forward(self, inputs):
        return mean_pool_2x2(self.conv(inputs))


class MeanPoolConv(_ref.MeanPoolConv):
    """2x2 mean pooling then convolution."""

    def forward(self, inputs):
        return self.conv(mean_pool_2x2(inputs))


class UpsampleConv(_ref.UpsampleConv):
    """Four copies, PixelShuffle(2), convolution: as the original (unused by the models)."""


# ---- residual blocks ------------------------------------------------------------------------------------


class ConditionalResidualBlock(_ref.ConditionalResidualBlock):
    """Residual block with conditional norms; norm -> ELU fused, shortcut added in place."""

    _ConvMeanPool = ConvMeanPool
    _build_norm = staticmethod(build_norm)

    def forward(self, x, y):
        h = self.conv1(norm_act(self.normalize1, self.non_linearity, x, y))
        h = self.conv2(norm_act(self.normalize2, self.non_linearity, h, y))
        if self.output_dim == self.input_dim and self.resample is None:
            return _add_into(h, x)
        return _add_into(h, self.shortcut(x))


class ResidualBlock(_ref.ResidualBlock):
    """Residual block with unconditional norms; norm -> ELU fused, shortcut added in place."""

    _ConvMeanPool = ConvMeanPool
    _build_norm = staticmethod(build_norm)

    def forward(self, x):
        h = self.conv1(norm_act(self.normalize1, self.non_linearity, x))
        h = self.conv2(norm_act(self.normalize2, self.non_linearity, h))
        if self.output_dim == self.input_dim and self.resample is None:
            return _add_into(h, x)
        return _add_into(h, self.shortcut(x))


# ---- RefineNet blocks ---------------------------------------------------------------------------------


class CondRCUBlock(_ref.CondRCUBlock):
    """Residual conv units with conditional norms; norm -> ELU fused."""

    _build_norm = staticmethod(build_norm)

    def forward(self, x, y):
        for stages in _rcu_names(self.n_blocks, self.n_stages, True):
            residual = x
            for norm, conv in stages:
                x = getattr(self, conv)(norm_act(getattr(self, norm), self.act, x, y))
            x += residual
        return x


class RCUBlock(_ref.RCUBlock):
    """Residual conv units without norms; a plain ELU runs on the fused op, and in every stage after the
    first in place on the previous convolution's output (the first stage's input is the residual)."""

    def forward(self, x):
        for stages in _rcu_names(self.n_blocks, self.n_stages, False):
            residual = x
            for j, (_, conv) in enumerate(stages):
                x = apply_act_(self.act, x) if j > 0 else apply_act(self.act, x)
                x = getattr(self, conv)(x)
            x += residual
        return x


class CondCRPBlock(_ref.CondCRPBlock):
    """Chained residual pooling with conditional norms; average pooling on crp_pool, sums in place."""

    def forward(self, x, y):
        inputs = x
        x = apply_act(self.act, x)
        path = x
        for i in range(self.n_stages):
            path = self.convs[i](_pool(self.maxpool, self.norms[i](path, y)))
            # x is ours to overwrite once it is a running sum, or (without autograd) the act's fresh output.
            x = _add_into(x, path) if i > 0 or (not torch.is_grad_enabled() and x is not inputs) else path + x
        return x


class CRPBlock(_ref.CRPBlock):
    """Chained residual pooling; max (or average) pooling on crp_pool, sums in place."""

    def forward(self, x):
        inputs = x
        x = apply_act(self.act, x)
        path = x
        for i in range(self.n_stages):
            path = self.convs[i](_pool(self.maxpool, path))
            x = _add_into(x, path) if i > 0 or (not torch.is_grad_enabled() and x is not inputs) else path + x
        return x


def _resize(h: Tensor, shape) -> Tensor:
    if tuple(h.shape[2:]) == tuple(shape):  # bilinear with align_corners=True to the same size: identity
        return h
    return F.interpolate(h, size=shape, mode="bilinear", align_corners=True)


def _check_msf_inputs(block, xs) -> None:
    if len(xs) < len(block.convs):
        raise ValueError(f"xs: {type(block).__name__} fuses {len(block.convs)} inputs, got {len(xs)}")


def _fuse(terms, shape) -> Tensor:
    sums = None
    for h in terms:
        h = _resize(h, shape)
        sums = h if sums is None else _add_into(sums, h)
    if sums is None:
        raise ValueError("MSF block without inputs")
    return sums


class CondMSFBlock(_ref.CondMSFBlock):
    """Multi-resolution fusion with conditional norms; sums in the activations' dtype (see the module doc)."""

    def forward(self, xs, y, shape):
        _check_msf_inputs(self, xs)
        return _fuse((conv(norm(x, y)) for conv, norm, x in zip(self.convs, self.norms, xs)), shape)


class MSFBlock(_ref.MSFBlock):
    """Multi-resolution fusion; sums in the activations' dtype (see the module doc)."""

    def forward(self, xs, shape):
        _check_msf_inputs(self, xs)
        return _fuse((conv(x) for conv, x in zip(self.convs, xs)), shape)


class CondRefineBlock(_ref.CondRefineBlock):
    """RefineNet block with conditional norms, built from the fused RCU / MSF / CRP blocks."""

    _RCU = CondRCUBlock
    _MSF = CondMSFBlock
    _CRP = CondCRPBlock


class RefineBlock(_ref.RefineBlock):
    """RefineNet block without norms, built from the fused RCU / MSF / CRP blocks."""

    _RCU = RCUBlock
    _MSF = MSFBlock
    _CRP = CRPBlock
