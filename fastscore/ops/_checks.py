"""Argument checks shared by the public ops: each error names the argument and says what was expected.

They run before anything is computed or modified, and only look at metadata (shape, dtype, device,
strides), so they cost no device sync and trace under torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(t, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


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


def output(out, x: Tensor, name: str = "out") -> Tensor:
    """A preallocated result: same shape, dtype, device and memory layout as x."""
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
    return out
