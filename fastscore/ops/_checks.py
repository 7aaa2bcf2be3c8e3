"""Argument checks shared by the public ops: each error names the argument and says what was expected.

They run before anything is computed or modified, and only look at metadata (shape, dtype, device,
strides), so they cost no device sync and trace under torch.compile.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(t, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def integer(v, name: str, low: int, high: int) -> int:
    """v as a Python int in [low, high), else a clear error naming it.

    An int or a numpy integer (anything with ``__index__``) is accepted; a bool, a float or a tensor is a
    TypeError, a value out of range a ValueError.
    """
    if isinstance(v, (bool, Tensor)):
        raise TypeError(f"{name}: expected an integer, got {type(v).__name__}")
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(v).__name__}") from None
    if not low <= v < high:
        raise ValueError(f"{name}: expected an integer in [{low}, {high}), got {v}")
    return v


SEED_END = 1 << 64  # seeds (and counters) are 64-bit words: [0, 2^64)


def seed(v, name: str = "seed") -> int | None:
    """The one rule for seeds everywhere (fused ops, references, samplers, estimators): None, or an integer
    in [0, 2^64) -- an int or a numpy integer, returned as a Python int. Bools, floats and tensors are a
    TypeError, integers out of range a ValueError."""
    return None if v is None else integer(v, name, 0, SEED_END)


def floating(t: Tensor, name: str) -> Tensor:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def image(x, name: str = "x") -> Tensor:
    """A floating (N, C, H, W) tensor with C >= 1 and H * W >= 1."""
    floating(tensor(x, name), name)
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] < 1 or x.shape[2] * x.shape[3] < 1:
        raise ValueError(f"{name}: expected C >= 1 and H * W >= 1, got shape {tuple(x.shape)}")
    return x


def same_device(t: Tensor, name: str, x: Tensor, x_name: str = "x") -> None:
    if t.device != x.device:
        raise ValueError(f"{name}: expected a tensor on {x_name}'s device {x.device}, got {t.device}")


def channel_param(p, name: str, x: Tensor) -> Tensor:
    """A per-channel parameter: (C,) (unconditional) or (N, C) (conditional: rows gathered by label)."""
    floating(tensor(p, name), name)
    N, C = x.shape[:2]
    if tuple(p.shape) not in ((C,), (N, C)):
        raise ValueError(
            f"{name}: expected shape ({C},) or ({N}, {C}) for x of shape {tuple(x.shape)}, got {tuple(p.shape)}"
        )
    same_device(p, name, x)
    return p


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last if x is laid out so (and not also plain contiguous), else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def supported_layout(x: Tensor) -> Tensor:
    """x itself if it is contiguous or channels_last (the layouts the kernels read), else a contiguous copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def overwritable(out: Tensor, name: str) -> Tensor:
    """A tensor an op may write into behind autograd's back: not one that requires grad while grad mode is on.

    Torch refuses the same (an in-place write to a leaf that requires grad, or ``out=`` with an argument
    that requires grad, in grad mode); under ``torch.no_grad()`` both are allowed, as they are in torch.
    """
    if out.requires_grad and torch.is_grad_enabled():
        kind = "a leaf tensor" if out.is_leaf else "a tensor"
        raise ValueError(
            f"{name}: {kind} that requires grad cannot be overwritten while grad mode is on (autograd would not "
            "see the write; torch refuses it too): call under torch.no_grad(), or pass a tensor that does not "
            "require grad"
        )
    return out


def output(out, x: Tensor, name: str = "out") -> Tensor:
    """A preallocated result: same shape, dtype, device and memory layout as x, that may be overwritten."""
    tensor(out, name)
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(
            f"{name}: expected shape {tuple(x.shape)} and dtype {x.dtype} (as x), got {tuple(out.shape)} {out.dtype}"
        )
    same_device(out, name, x)
    fmt = memory_format(x)
    if not out.is_contiguous(memory_format=fmt):
        layout = "channels_last" if fmt == torch.channels_last else "contiguous"
        raise ValueError(f"{name}: expected a {layout} tensor (the layout of x)")
    return overwritable(out, name)
