"""ncsn / ncsnv2 layers re-expressed in plain PyTorch: the numerics fastscore must reproduce.

This module is the ground truth the fused layers (:mod:`fastscore.nn.layers`) are tested against, the
"eager" baseline of the benches, and what ``fastscore.models.*(config, layers="reference")`` builds.
Everything is written operation by operation as ermongroup/ncsnv2 (``models/normalization.py``,
``models/layers.py``) and ermongroup/ncsn (``models/cond_refinenet_dilated.py``) compute it (described in
docs/numerics.md#normalisation-layers and docs/numerics.md#blocks-and-models), so that with the same weights
the results are **bitwise** those of the originals on CPU:

* the same class names, constructor arguments, attribute names and sub-module registration order
  (hence state_dict keys and order, optimizer parameter indices and init RNG consumption order);
* the quirks: ``normalize1`` registered last in the residual blocks; ``resample='down'`` with a dilation
  does not downsample; ConvMeanPool sums its four phases as ``(((0 + A) + B) + C) + D`` then divides
  by 4; the conditional CRP pools by **average** (count_include_pad) in an attribute named
  ``maxpool``, the unconditional one by max; the MSF sum lives in a buffer of the **default** dtype;
  the conditional residual block with ``resample=None``, no dilation and ``input_dim != output_dim``
  fails (the originals call ``nn.Conv2d(in, out)`` without a kernel size; here a clear TypeError).

Differences from the originals, none of which changes a result: ``act=None`` in a constructor means
the original's default activation (``nn.ELU()`` for residual blocks, ``nn.ReLU()`` for the RefineNet
blocks), instead of one module instance shared through a default argument.

ermongroup/ncsn's blocks are ncsnv2's conditional blocks without ``spec_norm`` (same parameters,
init order and numerics: every ncsn call site passes the conv bias explicitly), so the ncsn model is
built from the classes below. Only its conv helpers have other bias defaults: :func:`ncsnv1_conv3x3`,
:func:`ncsnv1_conv1x1` (``bias=False``) versus ncsnv2's :func:`conv3x3`, :func:`conv1x1` (``bias=True``).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    # normalisation (section "_reference_norms")
    "ConditionalInstanceNorm2dPlus",
    "InstanceNorm2dPlus",
    "ConditionalInstanceNorm2d",
    "ConditionalBatchNorm2d",
    "ConditionalVarianceNorm2d",
    "VarianceNorm2d",
    "ConditionalNoneNorm2d",
    "NoneNorm2d",
    "get_normalization",
    "get_act",
    "build_norm",
    # conv helpers
    "conv3x3",
    "conv1x1",
    "dilated_conv3x3",
    "stride_conv3x3",
    "ncsnv1_conv3x3",
    "ncsnv1_conv1x1",
    "spectral_norm",
    # blocks
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
]

# ==== _reference_norms: ncsnv2 models/normalization.py (docs/numerics.md#normalisation-layers) =======


def _standardised_channel_means(x):
    """muhat (N, C): the per-plane means standardised across channels (unbiased variance), as ncsnv2."""
    means = torch.mean(x, dim=(2, 3))
    m = torch.mean(means, dim=-1, keepdim=True)
    v = torch.var(means, dim=-1, keepdim=True)
    return (means - m) / (torch.sqrt(v + 1e-5))


def _uniform_gamma_embedding(num_features, num_classes, bias):
    """embed (L, 2C) = [gamma ~ U[0, 1) | beta = 0] (or (L, C) gamma only), after the default N(0, 1) fill."""
    if bias:
        embed = nn.Embedding(num_classes, num_features * 2)
        embed.weight.data[:, :num_features].uniform_()
        embed.weight.data[:, num_features:].zero_()
    else:
        embed = nn.Embedding(num_classes, num_features)
        embed.weight.data.uniform_()
    return embed


class ConditionalInstanceNorm2dPlus(nn.Module):
    """Conditional InstanceNorm++: ``gamma_y * (IN(x) + alpha_y * muhat) + beta_y``."""

    def __init__(self, num_features, num_classes, bias=True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.instance_norm = nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
        if bias:
            self.embed = nn.Embedding(num_classes, num_features * 3)
            self.embed.weight.data[:, : 2 * num_features].normal_(1, 0.02)
            self.embed.weight.data[:, 2 * num_features :].zero_()
        else:
            self.embed = nn.Embedding(num_classes, 2 * num_features)
            self.embed.weight.data.normal_(1, 0.02)

    def forward(self, x, y):
        means = _standardised_channel_means(x)
        h = self.instance_norm(x)
        if self.bias:
            gamma, alpha, beta = self.embed(y).chunk(3, dim=-1)
            h = h + means[..., None, None] * alpha[..., None, None]
            return gamma.view(-1, self.num_features, 1, 1) * h + beta.view(-1, self.num_features, 1, 1)
        gamma, alpha = self.embed(y).chunk(2, dim=-1)
        h = h + means[..., None, None] * alpha[..., None, None]
        return gamma.view(-1, self.num_features, 1, 1) * h


class InstanceNorm2dPlus(nn.Module):
    """Unconditional InstanceNorm++ with per-channel ``alpha``, ``gamma``, ``beta``.

    The second positional argument is ``bias``: ncsnv2's networks build their final normaliser as
    ``InstanceNorm2dPlus(ngf, num_classes)``, which therefore has a ``beta``.
    """

    def __init__(self, num_features, bias=True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.instance_norm = nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
        self.alpha = nn.Parameter(torch.zeros(num_features))
        self.gamma = nn.Parameter(torch.zeros(num_features))
        self.alpha.data.normal_(1, 0.02)
        self.gamma.data.normal_(1, 0.02)
        if bias:
            self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        means = _standardised_channel_means(x)
        h = self.instance_norm(x)
        h = h + means[..., None, None] * self.alpha[..., None, None]
        out = self.gamma.view(-1, self.num_features, 1, 1) * h
        if self.bias:
            out = out + self.beta.view(-1, self.num_features, 1, 1)
        return out


class ConditionalInstanceNorm2d(nn.Module):
    """Conditional instance norm ``gamma_y * IN(x) + beta_y``; gamma ~ U[0, 1)."""

    def __init__(self, num_features, num_classes, bias=True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.instance_norm = nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
        self.embed = _uniform_gamma_embedding(num_features, num_classes, bias)

    def forward(self, x, y):
        h = self.instance_norm(x)
        if self.bias:
            gamma, beta = self.embed(y).chunk(2, dim=-1)
            return gamma.view(-1, self.num_features, 1, 1) * h + beta.view(-1, self.num_features, 1, 1)
        return self.embed(y).view(-1, self.num_features, 1, 1) * h


class ConditionalBatchNorm2d(nn.Module):
    """Conditional batch norm ``gamma_y * BN(x) + beta_y`` with running statistics."""

    def __init__(self, num_features, num_classes, bias=True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.bn = nn.BatchNorm2d(num_features, affine=False)
        self.embed = _uniform_gamma_embedding(num_features, num_classes, bias)

    def forward(self, x, y):
        out = self.bn(x)
        if self.bias:
            gamma, beta = self.embed(y).chunk(2, dim=1)
            return gamma.view(-1, self.num_features, 1, 1) * out + beta.view(-1, self.num_features, 1, 1)
        return self.embed(y).view(-1, self.num_features, 1, 1) * out


class ConditionalVarianceNorm2d(nn.Module):
    """``gamma_y * x / sqrt(var^u_hw(x) + 1e-5)``, no centring; ``bias`` ignored."""

    def __init__(self, num_features, num_classes, bias=False):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.embed = nn.Embedding(num_classes, num_features)
        self.embed.weight.data.normal_(1, 0.02)

    def forward(self, x, y):
        vars = torch.var(x, dim=(2, 3), keepdim=True)
        h = x / torch.sqrt(vars + 1e-5)
        return self.embed(y).view(-1, self.num_features, 1, 1) * h


class VarianceNorm2d(nn.Module):
    """``alpha * x / sqrt(var^u_hw(x) + 1e-5)``, no centring; ``bias`` ignored."""

    def __init__(self, num_features, bias=False):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.alpha = nn.Parameter(torch.zeros(num_features))
        self.alpha.data.normal_(1, 0.02)

    def forward(self, x):
        vars = torch.var(x, dim=(2, 3), keepdim=True)
        h = x / torch.sqrt(vars + 1e-5)
        return self.alpha.view(-1, self.num_features, 1, 1) * h


class ConditionalNoneNorm2d(nn.Module):
    """Affine only: ``gamma_y * x + beta_y``."""

    def __init__(self, num_features, num_classes, bias=True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.embed = _uniform_gamma_embedding(num_features, num_classes, bias)

    def forward(self, x, y):
        if self.bias:
            gamma, beta = self.embed(y).chunk(2, dim=-1)
            return gamma.view(-1, self.num_features, 1, 1) * x + beta.view(-1, self.num_features, 1, 1)
        return self.embed(y).view(-1, self.num_features, 1, 1) * x


class NoneNorm2d(nn.Module):
    """Identity."""

    def __init__(self, num_features, bias=True):
        super().__init__()

    def forward(self, x):
        return x


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


class UnknownNormalizationError(ValueError, NotImplementedError):
    """``config.model.normalization`` names no normaliser. A ValueError; also a NotImplementedError,
    which is what ncsnv2 raises, so code written against ncsnv2 keeps catching it."""


def normalization_from_tables(config, conditional: bool, conditional_table: dict, unconditional_table: dict):
    """ncsnv2's lookup of ``config.model.normalization`` in a name -> class table; shared with the fused
    layers (fastscore.nn.normalization), whose tables name their own classes."""
    norm = config.model.normalization
    table = conditional_table if conditional else unconditional_table
    if norm is None and not conditional:
        return None
    if isinstance(norm, str) and norm in table:
        return table[norm]
    kind = "conditional" if conditional else "unconditional"
    choices = ", ".join(repr(k) for k in table) + ("" if conditional else ", None")
    raise UnknownNormalizationError(
        f"config.model.normalization: expected one of {choices} for a {kind} model, got {norm!r}"
    )


def get_normalization(config, conditional=True):
    """ncsnv2's ``get_normalization`` over the reference classes (same names and errors as fastscore.nn's)."""
    return normalization_from_tables(config, conditional, _CONDITIONAL, _UNCONDITIONAL)


def _swish(x):
    return x * torch.sigmoid(x)


def get_act(config):
    """ncsnv2's ``get_act``: ``config.model.nonlinearity`` in elu | relu | lrelu (slope 0.2) | swish."""
    name = config.model.nonlinearity
    key = name.lower() if isinstance(name, str) else name
    if key == "elu":
        return nn.ELU()
    if key == "relu":
        return nn.ReLU()
    if key == "lrelu":
        return nn.LeakyReLU(negative_slope=0.2)
    if key == "swish":
        return _swish
    raise ValueError(f"config.model.nonlinearity: expected one of 'elu', 'relu', 'lrelu', 'swish', got {name!r}")


def build_norm(normalization, act, *args, **kwargs):
    """``normalization(*args, **kwargs)``: a norm that the activation ``act`` follows (the fused layers'
    version of this hook folds an ELU into the norm)."""
    return normalization(*args, **kwargs)


# ==== conv helpers (docs/numerics.md#convolutions-and-resampling) ==================================


def spectral_norm(layer, n_iters=1):
    return torch.nn.utils.spectral_norm(layer, n_power_iterations=n_iters)


def conv1x1(in_planes, out_planes, stride=1, bias=True, spec_norm=False):
    """ncsnv2's 1x1 convolution (bias on by default)."""
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=bias)
    return spectral_norm(conv) if spec_norm else conv


def conv3x3(in_planes, out_planes, stride=1, bias=True, spec_norm=False):
    """ncsnv2's 3x3 convolution, padding 1 (bias on by default)."""
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=bias)
    return spectral_norm(conv) if spec_norm else conv


def stride_conv3x3(in_planes, out_planes, kernel_size, bias=True, spec_norm=False):
    """ncsnv2's strided convolution (unused by the models)."""
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=kernel_size, stride=2, padding=kernel_size // 2, bias=bias)
    return spectral_norm(conv) if spec_norm else conv


def dilated_conv3x3(in_planes, out_planes, dilation, bias=True, spec_norm=False):
    """3x3 convolution with padding = dilation (ncsn and ncsnv2: bias on by default)."""
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=3, padding=dilation, dilation=dilation, bias=bias)
    return spectral_norm(conv) if spec_norm else conv


def ncsnv1_conv3x3(in_planes, out_planes, stride=1, bias=False):
    """ermongroup/ncsn's ``conv3x3``: as ncsnv2's but **without bias** by default."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=bias)


def ncsnv1_conv1x1(in_planes, out_planes, stride=1, bias=False):
    """ermongroup/ncsn's ``conv1x1``: as ncsnv2's but **without bias** by default."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=bias)


# ==== resampling convs (docs/numerics.md#convolutions-and-resampling) ===============================


def mean_pool_2x2(output):
    """2x2 mean pooling as the originals: ``(((0 + A) + B) + C) + D) / 4`` (not avg_pool2d's order)."""
    return (
        sum([output[:, :, ::2, ::2], output[:, :, 1::2, ::2], output[:, :, ::2, 1::2], output[:, :, 1::2, 1::2]]) / 4.0
    )


class ConvMeanPool(nn.Module):
    """Convolution (stride 1, padding k // 2) then 2x2 mean pooling.

    ``adjust_padding=True`` zero-pads one row on top and one column on the left first (7 -> 4); the
    conv then sits at ``conv.1`` of a Sequential.
    """

    def __init__(self, input_dim, output_dim, kernel_size=3, biases=True, adjust_padding=False, spec_norm=False):
        super().__init__()
        conv = nn.Conv2d(input_dim, output_dim, kernel_size, stride=1, padding=kernel_size // 2, bias=biases)
        if spec_norm:
            conv = spectral_norm(conv)
        self.conv = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), conv) if adjust_padding else conv

    def forward(self, inputs):
        return mean_pool_2x2(self.conv(inputs))


class MeanPoolConv(nn.Module):
    """2x2 mean pooling then convolution (unused by the models)."""

    def __init__(self, input_dim, output_dim, kernel_size=3, biases=True, spec_norm=False):
        super().__init__()
        self.conv = nn.Conv2d(input_dim, output_dim, kernel_size, stride=1, padding=kernel_size // 2, bias=biases)
        if spec_norm:
            self.conv = spectral_norm(self.conv)

    def forward(self, inputs):
        return self.conv(mean_pool_2x2(inputs))


class UpsampleConv(nn.Module):
    """Four channel-concatenated copies, PixelShuffle(2), convolution (unused by the models).

    Note: for more than one channel this is not a nearest-neighbour upsampling: output channel c reads
    input channels ``(4c + k) mod C``, k = 0..3, as in the originals.
    """

    def __init__(self, input_dim, output_dim, kernel_size=3, biases=True, spec_norm=False):
        super().__init__()
        self.conv = nn.Conv2d(input_dim, output_dim, kernel_size, stride=1, padding=kernel_size // 2, bias=biases)
        if spec_norm:
            self.conv = spectral_norm(self.conv)
        self.pixelshuffle = nn.PixelShuffle(upscale_factor=2)

    def forward(self, inputs):
        output = torch.cat([inputs, inputs, inputs, inputs], dim=1)
        return self.conv(self.pixelshuffle(output))


# ==== residual blocks (docs/numerics.md#residual-blocks) ============================================


def _no_kernel_size_shortcut(input_dim, output_dim):
    raise TypeError(
        f"ConditionalResidualBlock(resample=None, dilation=None) with input_dim {input_dim} != output_dim "
        f"{output_dim}: the original builds its shortcut as nn.Conv2d(in, out) without a kernel size and fails "
        "here too; no NCSN model builds this block"
    )


def _residual_convs(self, input_dim, output_dim, resample, adjust_padding, dilation, spec_norm, norm, conditional):
    """Registers conv1, normalize2, conv2 and (if needed) shortcut in the originals' order; returns nothing."""
    if resample == "down":
        if dilation is not None:  # dilated "down" blocks do NOT downsample (the originals' quirk)
            self.conv1 = dilated_conv3x3(input_dim, input_dim, dilation=dilation, spec_norm=spec_norm)
            self.normalize2 = norm(input_dim)
            self.conv2 = dilated_conv3x3(input_dim, output_dim, dilation=dilation, spec_norm=spec_norm)
            conv_shortcut = partial(dilated_conv3x3, dilation=dilation, spec_norm=spec_norm)
        else:
            self.conv1 = conv3x3(input_dim, input_dim, spec_norm=spec_norm)
            self.normalize2 = norm(input_dim)
            self.conv2 = type(self)._ConvMeanPool(
                input_dim, output_dim, 3, adjust_padding=adjust_padding, spec_norm=spec_norm
            )
            conv_shortcut = partial(
                type(self)._ConvMeanPool, kernel_size=1, adjust_padding=adjust_padding, spec_norm=spec_norm
            )
    elif resample is None:
        if dilation is not None:
            conv_shortcut = partial(dilated_conv3x3, dilation=dilation, spec_norm=spec_norm)
            self.conv1 = dilated_conv3x3(input_dim, output_dim, dilation=dilation, spec_norm=spec_norm)
            self.normalize2 = norm(output_dim)
            self.conv2 = dilated_conv3x3(output_dim, output_dim, dilation=dilation, spec_norm=spec_norm)
        else:
            conv_shortcut = _no_kernel_size_shortcut if conditional else partial(conv1x1, spec_norm=spec_norm)
            self.conv1 = conv3x3(input_dim, output_dim, spec_norm=spec_norm)
            self.normalize2 = norm(output_dim)
            self.conv2 = conv3x3(output_dim, output_dim, spec_norm=spec_norm)
    else:
        raise ValueError(f"resample: expected None or 'down', got {resample!r}")
    if output_dim != input_dim or resample is not None:
        self.shortcut = conv_shortcut(input_dim, output_dim)


class ConditionalResidualBlock(nn.Module):
    """Pre-activation residual block with conditional norms (ncsn / ncsnv2).

    ``out = shortcut(x) + conv2(act(norm2(conv1(act(norm1(x, y))), y)))``. Registration order:
    conv1, normalize2, conv2, shortcut (if ``input_dim != output_dim`` or ``resample``), normalize1.
    ``act=None`` means ``nn.ELU()``.
    """

    _ConvMeanPool = ConvMeanPool
    _build_norm = staticmethod(build_norm)

    def __init__(
        self,
        input_dim,
        output_dim,
        num_classes,
        resample=None,
        act=None,
        normalization=ConditionalBatchNorm2d,
        adjust_padding=False,
        dilation=None,
        spec_norm=False,
    ):
        super().__init__()
        self.non_linearity = nn.ELU() if act is None else act
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.resample = resample
        self.normalization = normalization
        norm = lambda features: self._build_norm(normalization, self.non_linearity, features, num_classes)
        _residual_convs(self, input_dim, output_dim, resample, adjust_padding, dilation, spec_norm, norm, True)
        self.normalize1 = norm(input_dim)

    def forward(self, x, y):
        output = self.normalize1(x, y)
        output = self.non_linearity(output)
        output = self.conv1(output)
        output = self.normalize2(output, y)
        output = self.non_linearity(output)
        output = self.conv2(output)
        if self.output_dim == self.input_dim and self.resample is None:
            shortcut = x
        else:
            shortcut = self.shortcut(x)
        return shortcut + output


class ResidualBlock(nn.Module):
    """Pre-activation residual block with unconditional norms (ncsnv2).

    As :class:`ConditionalResidualBlock` without labels; the non-dilated, non-resampling shortcut is
    ``conv1x1(in, out)``. ``act=None`` means ``nn.ELU()``.
    """

    _ConvMeanPool = ConvMeanPool
    _build_norm = staticmethod(build_norm)

    def __init__(
        self,
        input_dim,
        output_dim,
        resample=None,
        act=None,
        normalization=nn.InstanceNorm2d,
        adjust_padding=False,
        dilation=None,
        spec_norm=False,
    ):
        super().__init__()
        self.non_linearity = nn.ELU() if act is None else act
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.resample = resample
        self.normalization = normalization
        norm = lambda features: self._build_norm(normalization, self.non_linearity, features)
        _residual_convs(self, input_dim, output_dim, resample, adjust_padding, dilation, spec_norm, norm, False)
        self.normalize1 = norm(input_dim)

    def forward(self, x):
        output = self.normalize1(x)
        output = self.non_linearity(output)
        output = self.conv1(output)
        output = self.normalize2(output)
        output = self.non_linearity(output)
        output = self.conv2(output)
        if self.output_dim == self.input_dim and self.resample is None:
            shortcut = x
        else:
            shortcut = self.shortcut(x)
        return shortcut + output


# ==== RefineNet blocks (docs/numerics.md#refinenet-blocks) ==========================================


class CondRCUBlock(nn.Module):
    """Residual conv units with conditional norms: per block ``x = conv(act(norm(x, y)))`` n_stages times,
    then ``x += residual``. Sub-modules ``'{i}_{j}_norm'``, ``'{i}_{j}_conv'`` (1-based); convs 3x3, no bias.
    ``act=None`` means ``nn.ReLU()``."""

    _build_norm = staticmethod(build_norm)

    def __init__(self, features, n_blocks, n_stages, num_classes, normalizer, act=None, spec_norm=False):
        super().__init__()
        act = nn.ReLU() if act is None else act
        for i in range(n_blocks):
            for j in range(n_stages):
                norm = self._build_norm(normalizer, act, features, num_classes, bias=True)
                setattr(self, f"{i + 1}_{j + 1}_norm", norm)
                conv = conv3x3(features, features, stride=1, bias=False, spec_norm=spec_norm)
                setattr(self, f"{i + 1}_{j + 1}_conv", conv)
        self.stride = 1
        self.n_blocks = n_blocks
        self.n_stages = n_stages
        self.act = act
        self.normalizer = normalizer

    def forward(self, x, y):
        for i in range(self.n_blocks):
            residual = x
            for j in range(self.n_stages):
                x = getattr(self, f"{i + 1}_{j + 1}_norm")(x, y)
                x = self.act(x)
                x = getattr(self, f"{i + 1}_{j + 1}_conv")(x)
            x += residual
        return x


class RCUBlock(nn.Module):
    """Residual conv units without norms: per block ``x = conv(act(x))`` n_stages times, then
    ``x += residual``. Sub-modules ``'{i}_{j}_conv'``; convs 3x3, no bias. ``act=None`` means ``nn.ReLU()``."""

    def __init__(self, features, n_blocks, n_stages, act=None, spec_norm=False):
        super().__init__()
        for i in range(n_blocks):
            for j in range(n_stages):
                conv = conv3x3(features, features, stride=1, bias=False, spec_norm=spec_norm)
                setattr(self, f"{i + 1}_{j + 1}_conv", conv)
        self.stride = 1
        self.n_blocks = n_blocks
        self.n_stages = n_stages
        self.act = nn.ReLU() if act is None else act

    def forward(self, x):
        for i in range(self.n_blocks):
            residual = x
            for j in range(self.n_stages):
                x = self.act(x)
                x = getattr(self, f"{i + 1}_{j + 1}_conv")(x)
            x += residual
        return x


class CondCRPBlock(nn.Module):
    """Chained residual pooling with conditional norms: ``x = act(x)``; per stage
    ``path = conv(pool(norm(path, y)))``, ``x = path + x``. The pool is **AvgPool2d(5, 1, 2)**
    (count_include_pad) stored as ``maxpool``, as in the originals. ``act=None`` means ``nn.ReLU()``."""

    def __init__(self, features, n_stages, num_classes, normalizer, act=None, spec_norm=False):
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.normalizer = normalizer
        for _ in range(n_stages):
            self.norms.append(normalizer(features, num_classes, bias=True))
            self.convs.append(conv3x3(features, features, stride=1, bias=False, spec_norm=spec_norm))
        self.n_stages = n_stages
        self.maxpool = nn.AvgPool2d(kernel_size=5, stride=1, padding=2)
        self.act = nn.ReLU() if act is None else act

    def forward(self, x, y):
        x = self.act(x)
        path = x
        for i in range(self.n_stages):
            path = self.norms[i](path, y)
            path = self.maxpool(path)
            path = self.convs[i](path)
            x = path + x
        return x


class CRPBlock(nn.Module):
    """Chained residual pooling: ``x = act(x)``; per stage ``path = conv(pool(path))``, ``x = path + x``.
    The pool is **MaxPool2d(5, 1, 2)** (``maxpool=True``, what RefineBlock uses) or AvgPool2d(5, 1, 2).
    ``act=None`` means ``nn.ReLU()``."""

    def __init__(self, features, n_stages, act=None, maxpool=True, spec_norm=False):
        super().__init__()
        self.convs = nn.ModuleList()
        for _ in range(n_stages):
            self.convs.append(conv3x3(features, features, stride=1, bias=False, spec_norm=spec_norm))
        self.n_stages = n_stages
        if maxpool:
            self.maxpool = nn.MaxPool2d(kernel_size=5, stride=1, padding=2)
        else:
            self.maxpool = nn.AvgPool2d(kernel_size=5, stride=1, padding=2)
        self.act = nn.ReLU() if act is None else act

    def forward(self, x):
        x = self.act(x)
        path = x
        for i in range(self.n_stages):
            path = self.maxpool(path)
            path = self.convs[i](path)
            x = path + x
        return x


class CondMSFBlock(nn.Module):
    """Multi-resolution fusion with conditional norms: ``sum_i up(conv_i(norm_i(x_i, y)))``, bilinear
    (align_corners) to ``shape``, accumulated into a zero buffer of the **default dtype**
    (docs/numerics.md#the-msf-sum-dtype)."""

    def __init__(self, in_planes, features, num_classes, normalizer, spec_norm=False):
        super().__init__()
        assert isinstance(in_planes, list) or isinstance(in_planes, tuple)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.features = features
        self.normalizer = normalizer
        for planes in in_planes:
            self.convs.append(conv3x3(planes, features, stride=1, bias=True, spec_norm=spec_norm))
            self.norms.append(normalizer(planes, num_classes, bias=True))

    def forward(self, xs, y, shape):
        sums = torch.zeros(xs[0].shape[0], self.features, *shape, device=xs[0].device)
        for i in range(len(self.convs)):
            h = self.norms[i](xs[i], y)
            h = self.convs[i](h)
            h = F.interpolate(h, size=shape, mode="bilinear", align_corners=True)
            sums += h
        return sums


class MSFBlock(nn.Module):
    """Multi-resolution fusion without norms: ``sum_i up(conv_i(x_i))`` into a default-dtype zero buffer."""

    def __init__(self, in_planes, features, spec_norm=False):
        super().__init__()
        assert isinstance(in_planes, list) or isinstance(in_planes, tuple)
        self.convs = nn.ModuleList()
        self.features = features
        for planes in in_planes:
            self.convs.append(conv3x3(planes, features, stride=1, bias=True, spec_norm=spec_norm))

    def forward(self, xs, shape):
        sums = torch.zeros(xs[0].shape[0], self.features, *shape, device=xs[0].device)
        for i in range(len(self.convs)):
            h = self.convs[i](xs[i])
            h = F.interpolate(h, size=shape, mode="bilinear", align_corners=True)
            sums += h
        return sums


class CondRefineBlock(nn.Module):
    """RefineNet block with conditional norms: adapt each input with a CondRCUBlock(2, 2), fuse them
    (CondMSFBlock) when there is more than one, CondCRPBlock(2), output CondRCUBlock (3 blocks if
    ``end`` else 1). Registration order: adapt_convs, output_convs, msf (not if ``start``), crp."""

    _RCU = CondRCUBlock
    _MSF = CondMSFBlock
    _CRP = CondCRPBlock

    def __init__(self, in_planes, features, num_classes, normalizer, act=None, start=False, end=False, spec_norm=False):
        super().__init__()
        assert isinstance(in_planes, tuple) or isinstance(in_planes, list)
        act = nn.ReLU() if act is None else act
        self.n_blocks = n_blocks = len(in_planes)
        self.adapt_convs = nn.ModuleList()
        for i in range(n_blocks):
            self.adapt_convs.append(self._RCU(in_planes[i], 2, 2, num_classes, normalizer, act, spec_norm=spec_norm))
        self.output_convs = self._RCU(features, 3 if end else 1, 2, num_classes, normalizer, act, spec_norm=spec_norm)
        if not start:
            self.msf = self._MSF(in_planes, features, num_classes, normalizer, spec_norm=spec_norm)
        self.crp = self._CRP(features, 2, num_classes, normalizer, act, spec_norm=spec_norm)

    def forward(self, xs, y, output_shape):
        assert isinstance(xs, tuple) or isinstance(xs, list)
        hs = [self.adapt_convs[i](xs[i], y) for i in range(len(xs))]
        h = self.msf(hs, y, output_shape) if self.n_blocks > 1 else hs[0]
        h = self.crp(h, y)
        return self.output_convs(h, y)


class RefineBlock(nn.Module):
    """RefineNet block without norms (ncsnv2's NCSNv2*): as :class:`CondRefineBlock` with RCUBlock,
    MSFBlock and CRPBlock (max pooling unless ``maxpool=False``)."""

    _RCU = RCUBlock
    _MSF = MSFBlock
    _CRP = CRPBlock

    def __init__(self, in_planes, features, act=None, start=False, end=False, maxpool=True, spec_norm=False):
        super().__init__()
        assert isinstance(in_planes, tuple) or isinstance(in_planes, list)
        act = nn.ReLU() if act is None else act
        self.n_blocks = n_blocks = len(in_planes)
        self.adapt_convs = nn.ModuleList()
        for i in range(n_blocks):
            self.adapt_convs.append(self._RCU(in_planes[i], 2, 2, act, spec_norm=spec_norm))
        self.output_convs = self._RCU(features, 3 if end else 1, 2, act, spec_norm=spec_norm)
        if not start:
            self.msf = self._MSF(in_planes, features, spec_norm=spec_norm)
        self.crp = self._CRP(features, 2, act, maxpool=maxpool, spec_norm=spec_norm)

    def forward(self, xs, output_shape):
        assert isinstance(xs, tuple) or isinstance(xs, list)
        hs = [self.adapt_convs[i](xs[i]) for i in range(len(xs))]
        h = self.msf(hs, output_shape) if self.n_blocks > 1 else hs[0]
        h = self.crp(h)
        return self.output_convs(h)
