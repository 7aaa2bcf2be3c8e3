"""Drop-in replacements for the normalisation layers of ncsnv2 (``models/normalization.py``).

Every class here has the constructor arguments, attribute and parameter names, parameter registration
order (hence state_dict keys and order), init distributions and init RNG consumption order of its
ncsnv2 namesake, so a checkpoint of the original loads strictly and ``torch.manual_seed(s)`` followed by
construction gives bitwise the same initial weights. The numerics are those of
docs/numerics.md#normalisation-layers; the InstanceNorm++ family (and ``ConditionalInstanceNorm2d``) runs
on the fused op :func:`fastscore.ops.cond_instance_norm` (one statistics pass, one apply pass, optionally
fused with the ELU that follows the norm in ncsnv2's residual blocks); the other classes are plain
PyTorch, written as ncsnv2 writes them, so they agree with it bitwise.

Notation: ``x`` (N, C, H, W); ``y`` (N,) int64 noise-level indices in ``[0, num_classes)``;
``mu[n, c]`` / ``var[n, c]`` the mean / **biased** variance of ``x[n, c]`` over H, W;
``xhat = (x - mu) / sqrt(var + 1e-5)`` (instance norm);
``muhat = (mu - mean_c mu) / sqrt(var^u_c mu + 1e-5)`` (the channel means standardised across channels,
**unbiased** variance); per-channel parameters broadcast over H, W.

Conditional classes take ``forward(x, y)`` and check, before anything runs, that ``x`` is a floating
4-D tensor with ``num_features`` channels, that ``y`` is an int64 (or int32) tensor of shape (N,), and,
on CPU tensors, that every label lies in ``[0, num_classes)`` (on CUDA that check would cost a device
sync per layer; the embedding's own device-side assert covers it there). Unconditional classes take
``forward(x)`` and check ``x`` the same way.

Quirk kept on purpose (ncsnv2's unconditional networks build their final normaliser as
``norm(ngf, num_classes)``): the second positional argument of the unconditional classes is ``bias``,
so ``InstanceNorm2dPlus(ngf, num_classes)`` gets a ``beta``; ``get_normalization`` returns
``nn.InstanceNorm2d`` / ``nn.BatchNorm2d`` themselves, which then get ``eps = num_classes``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from fastscore import _validate
from fastscore.nn import reference as _ref
from fastscore.nn.reference import UnknownNormalizationError
from fastscore.nn.reference import normalization_from_tables
from fastscore.ops.cond_instance_norm import cond_instance_norm

__all__ = [
    "UnknownNormalizationError",
    "ConditionalInstanceNorm2dPlus",
    "InstanceNorm2dPlus",
    "ConditionalInstanceNorm2d",
    "ConditionalBatchNorm2d",
    "ConditionalVarianceNorm2d",
    "VarianceNorm2d",
    "ConditionalNoneNorm2d",
    "NoneNorm2d",
    "get_normalization",
]

_EPS = 1e-5
_ACTS = (None, "elu")
_LABEL_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding accepts as indices


# ---- argument checks (metadata only, except the CPU label range) ----------------------------------


def _check_act(act) -> str | None:
    if not (act is None or (isinstance(act, str) and act in _ACTS)):
        raise ValueError(f"act: expected None or 'elu' (the activation fused after the norm), got {act!r}")
    return act


def _check_x(x, num_features: int, *, min_channels: int = 1) -> None:
    _validate.image(x, "x")
    if x.shape[1] != num_features:
        raise ValueError(f"x: expected {num_features} channels (num_features), got shape {tuple(x.shape)}")
    if num_features < min_channels:
        raise ValueError(
            f"x: InstanceNorm++ needs at least {min_channels} channels (the variance across channel means "
            f"divides by C - 1; ncsnv2 returns NaN here), got shape {tuple(x.shape)}"
        )


def _check_y(y, x: Tensor, num_classes: int) -> None:
    if not isinstance(y, Tensor):
        raise TypeError(f"y: expected a torch.Tensor of noise-level indices, got {type(y).__name__}")
    if y.dtype not in _LABEL_DTYPES:
        raise TypeError(f"y: expected an int64 (or int32) tensor of noise-level indices, got {y.dtype}")
    if tuple(y.shape) != (x.shape[0],):
        raise ValueError(
            f"y: expected shape ({x.shape[0]},) (one label per sample of x {tuple(x.shape)}), got {tuple(y.shape)}"
        )
    # CPU only: on CUDA, bool() of a device tensor syncs every layer (the embedding asserts on device).
    # Skipped while compiling, where it would break the graph (the embedding still raises on CPU).
    if y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(y)
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"y: labels must lie in [0, {num_classes}) (num_classes), got values in [{int(lo)}, {int(hi)}]"
            )


def _promoted(x: Tensor, weight: Tensor) -> Tensor:
    """x in the dtype ncsnv2's output would have (x's dtype promoted with the parameters')."""
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return x if x.dtype == dtype else x.to(dtype)


def _per_channel(p: Tensor, num_features: int) -> Tensor:
    return p.view(-1, num_features, 1, 1)


# ---- InstanceNorm++ and conditional instance norm (fused) -----------------------------------------


class ConditionalInstanceNorm2dPlus(_ref.ConditionalInstanceNorm2dPlus):
    r"""Conditional InstanceNorm++ (ncsnv2 ``ConditionalInstanceNorm2dPlus``), fused.

    .. math::
        \mathrm{out} = \mathrm{act}\big(\gamma_y \odot (\hat x + \alpha_y \odot \hat\mu) + \beta_y\big)

    with :math:`\hat x` the instance norm of ``x`` (biased variance, eps 1e-5) and :math:`\hat\mu` the
    per-sample standardised channel means (unbiased variance across channels, eps 1e-5).
    ``embed = nn.Embedding(num_classes, 3 * num_features)`` holds the rows ``[gamma | alpha | beta]``
    (``bias=False``: ``(num_classes, 2 * num_features)``, ``[gamma | alpha]``, no shift).
    Init: the embedding's default N(0, 1) fill, then gamma and alpha columns N(1, 0.02), beta zero.

    Fused: the statistics, the mean reinjection, the affine and (``act="elu"``) the ELU that follows
    the norm in ncsnv2's residual blocks run in one op (:func:`fastscore.ops.cond_instance_norm`); the
    embedding rows are gathered once and passed as strided views, without copies.

    Args:
        num_features: C. num_classes: L, the number of noise levels. bias: learn a shift beta.
        act: keyword-only; ``None`` (default, ncsnv2's behaviour: the norm alone) or ``"elu"`` to
            return ``F.elu(norm(x, y))``, saving a pass over the activations. Not in the state_dict.

    ``self.instance_norm`` (a parameter-free ``nn.InstanceNorm2d``) is kept so the module tree matches
    ncsnv2's; the fused op does its work, so hooks registered on it do not fire.
    """

    def __init__(self, num_features, num_classes, bias=True, *, act=None):
        act = _check_act(act)  # before anything is built (or drawn from the RNG)
        super().__init__(num_features, num_classes, bias)  # ncsnv2's parameters, init and RNG order
        self.act = act

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_x(x, self.num_features, min_channels=2)
        _check_y(y, x, self.embed.num_embeddings)
        if self.bias:
            gamma, alpha, beta = self.embed(y).chunk(3, dim=-1)
        else:
            gamma, alpha = self.embed(y).chunk(2, dim=-1)
            beta = None
        return cond_instance_norm(_promoted(x, self.embed.weight), gamma, alpha, beta, eps=_EPS, act=self.act)

    def extra_repr(self) -> str:
        return f"{self.num_features}, bias={self.bias}" + (f", act={self.act!r}" if self.act else "")


class InstanceNorm2dPlus(_ref.InstanceNorm2dPlus):
    r"""Unconditional InstanceNorm++ (ncsnv2 ``InstanceNorm2dPlus``), fused.

    .. math::
        \mathrm{out} = \mathrm{act}\big(\gamma \odot (\hat x + \alpha \odot \hat\mu) + \beta\big)

    with per-channel parameters registered in ncsnv2's order ``alpha``, ``gamma``, ``beta`` (each (C,);
    ``beta`` only if ``bias`` is truthy). Init: alpha then gamma ~ N(1, 0.02), beta zero.

    Fused: statistics, mean reinjection, affine and the optional ELU in one op
    (:func:`fastscore.ops.cond_instance_norm`, unconditional (C,) parameters).

    ``bias`` is stored as given: ncsnv2's unconditional networks build their final normaliser as
    ``InstanceNorm2dPlus(ngf, num_classes)``, which lands in ``bias`` and so creates ``beta``.
    ``act`` (keyword-only): ``None`` (default, ncsnv2's behaviour) or ``"elu"`` to fuse the ELU that
    follows the norm. ``self.instance_norm`` is kept for the module tree only (see
    :class:`ConditionalInstanceNorm2dPlus`).
    """

    def __init__(self, num_features, bias=True, *, act=None):
        act = _check_act(act)
        super().__init__(num_features, bias)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.num_features, min_channels=2)
        beta = self.beta if self.bias else None
        return cond_instance_norm(_promoted(x, self.gamma), self.gamma, self.alpha, beta, eps=_EPS, act=self.act)

    def extra_repr(self) -> str:
        return f"{self.num_features}, bias={self.bias}" + (f", act={self.act!r}" if self.act else "")


class ConditionalInstanceNorm2d(_ref.ConditionalInstanceNorm2d):
    r"""Conditional instance norm (ncsnv2 ``ConditionalInstanceNorm2d``), fused.

    .. math:: \mathrm{out} = \mathrm{act}(\gamma_y \odot \hat x + \beta_y)

    ``embed = nn.Embedding(num_classes, 2 * num_features)`` with rows ``[gamma | beta]``
    (``bias=False``: ``(num_classes, num_features)``, gamma only). Init: the default N(0, 1) fill, then
    gamma ~ **U[0, 1)** (ncsnv2's comment says N(1, 0.02); its code draws uniform), beta zero.

    Fused: statistics, affine and the optional ELU in one op (:func:`fastscore.ops.cond_instance_norm`
    without ``alpha``). ``act`` (keyword-only): ``None`` (default, ncsnv2's behaviour) or ``"elu"``.
    ``self.instance_norm`` is kept for the module tree only.
    """

    def __init__(self, num_features, num_classes, bias=True, *, act=None):
        act = _check_act(act)
        super().__init__(num_features, num_classes, bias)
        self.act = act

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_x(x, self.num_features)
        _check_y(y, x, self.embed.num_embeddings)
        if self.bias:
            gamma, beta = self.embed(y).chunk(2, dim=-1)
        else:
            gamma, beta = self.embed(y), None
        return cond_instance_norm(_promoted(x, self.embed.weight), gamma, None, beta, eps=_EPS, act=self.act)

    def extra_repr(self) -> str:
        return f"{self.num_features}, bias={self.bias}" + (f", act={self.act!r}" if self.act else "")


# ---- plain PyTorch, as ncsnv2 (the reference classes' parameters and init; inputs checked) ---------------------------


class ConditionalBatchNorm2d(_ref.ConditionalBatchNorm2d):
    r"""Conditional batch norm (ncsnv2 ``ConditionalBatchNorm2d``), plain PyTorch.

    .. math:: \mathrm{out} = \gamma_y \odot \mathrm{BN}(x) + \beta_y

    ``bn = nn.BatchNorm2d(num_features, affine=False)`` (eps 1e-5, momentum 0.1, running statistics:
    train mode normalises with the batch statistics and updates them, eval mode uses them).
    ``embed`` as :class:`ConditionalInstanceNorm2d` (gamma ~ U[0, 1), beta zero). Nothing fused.
    """

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_x(x, self.num_features)
        _check_y(y, x, self.embed.num_embeddings)
        out = self.bn(x)
        if self.bias:
            gamma, beta = self.embed(y).chunk(2, dim=1)
            return _per_channel(gamma, self.num_features) * out + _per_channel(beta, self.num_features)
        return _per_channel(self.embed(y), self.num_features) * out


class ConditionalVarianceNorm2d(_ref.ConditionalVarianceNorm2d):
    r"""Conditional variance norm (ncsnv2 ``ConditionalVarianceNorm2d``), plain PyTorch.

    .. math:: \mathrm{out} = \gamma_y \odot x / \sqrt{\operatorname{var}^u_{h,w}(x) + 10^{-5}}

    No centring; the variance over H, W is **unbiased**. ``embed = nn.Embedding(num_classes,
    num_features)``, init N(1, 0.02) after the default fill. ``bias`` is stored and ignored, as in
    ncsnv2. Nothing fused.
    """

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_x(x, self.num_features)
        _check_y(y, x, self.embed.num_embeddings)
        h = x / torch.sqrt(torch.var(x, dim=(2, 3), keepdim=True) + _EPS)
        return _per_channel(self.embed(y), self.num_features) * h


class VarianceNorm2d(_ref.VarianceNorm2d):
    r"""Variance norm (ncsnv2 ``VarianceNorm2d``), plain PyTorch.

    .. math:: \mathrm{out} = \alpha \odot x / \sqrt{\operatorname{var}^u_{h,w}(x) + 10^{-5}}

    No centring, unbiased variance over H, W. Parameter ``alpha`` (C,) ~ N(1, 0.02). ``bias`` is
    stored and ignored. Nothing fused.
    """

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.num_features)
        h = x / torch.sqrt(torch.var(x, dim=(2, 3), keepdim=True) + _EPS)
        return _per_channel(self.alpha, self.num_features) * h


class ConditionalNoneNorm2d(_ref.ConditionalNoneNorm2d):
    r"""Conditional affine map without normalisation (ncsnv2 ``ConditionalNoneNorm2d``), plain PyTorch.

    .. math:: \mathrm{out} = \gamma_y \odot x + \beta_y

    ``embed`` as :class:`ConditionalInstanceNorm2d` (gamma ~ U[0, 1), beta zero). Nothing fused.
    """

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_x(x, self.num_features)
        _check_y(y, x, self.embed.num_embeddings)
        if self.bias:
            gamma, beta = self.embed(y).chunk(2, dim=-1)
            return _per_channel(gamma, self.num_features) * x + _per_channel(beta, self.num_features)
        return _per_channel(self.embed(y), self.num_features) * x


class NoneNorm2d(_ref.NoneNorm2d):
    r"""Identity (ncsnv2 ``NoneNorm2d``): :math:`\mathrm{out} = x`. No parameters; ``bias`` is ignored.

    Returns ``x`` itself, as ncsnv2 does, after checking it has ``num_features`` channels.
    """

    def __init__(self, num_features, bias=True):
        super().__init__(num_features, bias)
        self.num_features = num_features  # for the channel check (the original keeps nothing)

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.num_features)
        return x


# ---- factory ------------------------------------------------------------------------------------------


_CONDITIONAL = {
    "NoneNorm": ConditionalNoneNorm2d,
    "InstanceNorm++": ConditionalInstanceNorm2dPlus,
    "InstanceNorm": ConditionalInstanceNorm2d,
    "BatchNorm": ConditionalBatchNorm2d,
    "VarianceNorm": ConditionalVarianceNorm2d,
}
_UNCONDITIONAL = {
    "BatchNorm": nn.BatchNorm2d,
    "InstanceNorm": nn.InstanceNorm2d,
    "InstanceNorm++": InstanceNorm2dPlus,
    "VarianceNorm": VarianceNorm2d,
    "NoneNorm": NoneNorm2d,
}


def get_normalization(config, conditional=True):
    """The normaliser class named by ``config.model.normalization``, as ncsnv2's ``get_normalization``.

    conditional: ``NoneNorm`` -> :class:`ConditionalNoneNorm2d`, ``InstanceNorm++`` ->
    :class:`ConditionalInstanceNorm2dPlus`, ``InstanceNorm`` -> :class:`ConditionalInstanceNorm2d`,
    ``BatchNorm`` -> :class:`ConditionalBatchNorm2d`, ``VarianceNorm`` -> :class:`ConditionalVarianceNorm2d`.
    unconditional: ``BatchNorm`` -> ``nn.BatchNorm2d``, ``InstanceNorm`` -> ``nn.InstanceNorm2d``,
    ``InstanceNorm++`` -> :class:`InstanceNorm2dPlus`, ``VarianceNorm`` -> :class:`VarianceNorm2d`,
    ``NoneNorm`` -> :class:`NoneNorm2d`, ``None`` -> ``None``.

    Any other value raises :class:`UnknownNormalizationError` (a ValueError, and a NotImplementedError
    like ncsnv2's). The torch classes are returned as such, so ncsnv2's final-normaliser call
    ``norm(ngf, num_classes)`` gives them ``eps = num_classes``, as in the original.
    """
    return normalization_from_tables(config, conditional, _CONDITIONAL, _UNCONDITIONAL)
