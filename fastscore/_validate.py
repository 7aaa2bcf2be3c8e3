"""Argument validation for every public function: one module, one rule.

The rule, everywhere in fastscore:

- **TypeError**: the argument is the wrong kind of thing -- the wrong Python type (a string, a bool or a
  tensor where a number goes, a number where a tensor goes, something that is not callable) or a tensor of
  the wrong dtype;
- **ValueError**: the right kind of thing with a value that is not allowed -- out of range, not finite, the
  wrong shape, device or memory layout, a string that is not one of the options, or a value inconsistent
  with another argument.

Every message starts with the argument's name: ``"step_size: expected ..., got ..."``. The checks run before
anything is computed or modified, and look only at metadata (shape, dtype, device, strides) unless their
docstring says otherwise, so they cost no device sync and trace under torch.compile.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(t, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def integer(v, name: str, low: int = 0, high: int | None = None) -> int:
    """v as a Python int in [low, high) (no upper bound when high is None), else an error naming it.

    An int or a numpy integer (anything with ``__index__``) is accepted; a bool, a float or a tensor is a
    TypeError, a value out of range a ValueError.
    """
    if isinstance(v, (bool, Tensor)):
        raise TypeError(f"{name}: expected an integer, got {type(v).__name__}")
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(v).__name__}") from None
    if high is None and v < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {v}")
    if high is not None and not low <= v < high:
        raise ValueError(f"{name}: expected an integer in [{low}, {high}), got {v}")
    return v


def number(v, name: str, *, low: float | None = None, strict: bool = False, allow_inf: bool = False) -> float:
    """v as a Python float: finite (or +-inf when allow_inf), and >= low (> low when strict) when low is given.

    An int, a float or a numpy scalar is accepted; a bool, a string or a tensor is a TypeError."""
    if isinstance(v, (bool, Tensor)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    v = float(v)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    if low is not None and (v <= low if strict else v < low):
        raise ValueError(f"{name}: expected a number {'>' if strict else '>='} {low:g}, got {v:g}")
    return v


def flag(v, name: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return v


def choice(v, name: str, options) -> str:
    """One of the string options: a non-string is a TypeError, another string a ValueError."""
    listed = ", ".join(map(repr, options))
    if not isinstance(v, str):
        raise TypeError(f"{name}: expected one of {listed}, got {type(v).__name__}")
    if v not in options:
        raise ValueError(f"{name}: expected one of {listed}, got {v!r}")
    return v


def function(fn, name: str):
    if not callable(fn):
        raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")
    return fn


def shape(v, name: str = "shape") -> tuple[int, ...]:
    """A shape (N, ...) as a tuple of ints (an int is a 1-D shape); sizes >= 0."""
    if isinstance(v, (bool, Tensor)):
        raise TypeError(f"{name}: expected a sequence of integers, got {type(v).__name__}")
    if isinstance(v, numbers.Integral):
        v = (v,)
    try:
        v = tuple(operator.index(s) for s in v)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of integers, got {v!r}") from None
    if len(v) < 1 or any(s < 0 for s in v):
        raise ValueError(f"{name}: expected (N, ...) with non-negative sizes, got {v}")
    return v


def float_list(v, name: str) -> list[float]:
    """A 1-D tensor or sequence of numbers as Python floats (one host read, at set-up)."""
    if isinstance(v, Tensor):
        floating(v, name)
        if v.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor of noise levels, got shape {tuple(v.shape)}")
        return v.detach().to("cpu", torch.float64).tolist()
    try:
        return [float(s) for s in v]
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a 1-D tensor or sequence of numbers, got {type(v).__name__}") from None


def float_dtype(dtype, name: str = "dtype") -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {dtype}")
    return dtype


def batch(x, name: str = "x", *, min_dim: int = 1, non_empty: bool = False) -> Tensor:
    """A floating tensor of shape (N, ...) with at least min_dim dims (and elements, when non_empty)."""
    floating(tensor(x, name), name)
    if x.dim() < min_dim:
        raise ValueError(
            f"{name}: expected a tensor of shape (N, ...) with at least {min_dim} dims, got shape {tuple(x.shape)}"
        )
    if non_empty and x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {tuple(x.shape)}")
    return x


SEED_END = 1 << 64  # seeds (and counters) are 64-bit words: [0, 2^64)


def seed(v, name: str = "seed") -> int | None:
    """The one rule for seeds everywhere (fused ops, references, samplers, estimators): None, or an integer
    in [0, 2^64) -- an int or a numpy integer, returned as a Python int. Bools, floats and tensors are a
    TypeError, integers out of range a ValueError."""
    return None if v is None else integer(v, name, 0, SEED_END)


def floating(t: Tensor, name: str) -> Tensor:
    float_dtype(t.dtype, name)
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
    if out.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (as x), got {out.dtype}")
    if out.shape != x.shape:
        raise ValueError(f"{name}: expected shape {tuple(x.shape)} (as x), got {tuple(out.shape)}")
    same_device(out, name, x)
    fmt = memory_format(x)
    if not out.is_contiguous(memory_format=fmt):
        layout = "channels_last" if fmt == torch.channels_last else "contiguous"
        raise ValueError(f"{name}: expected a {layout} tensor (the layout of x)")
    return overwritable(out, name)


def values_checkable() -> bool:
    """May a check read tensor values (a device sync)? Not while torch.compile traces."""
    return not torch.compiler.is_compiling()


def updatable(x, name: str = "x") -> torch.memory_format:
    """A floating (N, ...) tensor an op updates in place, so never copies: contiguous or channels_last;
    returns its memory format."""
    batch(x, name)
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    raise ValueError(
        f"{name}: expected a contiguous or channels_last tensor (it is updated in place, so it is never "
        f"copied), got strides {tuple(x.stride())} for shape {tuple(x.shape)}"
    )


def like(t, name: str, x: Tensor, fmt: torch.memory_format) -> Tensor:
    """t checked to be x's shape, dtype and device, in x's layout ``fmt`` (a copy when it is not)."""
    floating(tensor(t, name), name)
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (as x), got {t.dtype}")
    if t.shape != x.shape:
        raise ValueError(f"{name}: expected shape {tuple(x.shape)} (as x), got {tuple(t.shape)}")
    same_device(t, name, x)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def no_grad_needed(op: str, *tensors) -> None:
    """Refuse inputs that require grad in grad mode for an op that is not differentiable (a sampler update)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(
            f"{op} is a sampler update and is not differentiable, but an input requires grad: call it under "
            "torch.no_grad()"
        )


def other_output(out, x: Tensor, name: str) -> Tensor | None:
    """An optional second output beside x (updated in place): as :func:`output`, and not x itself."""
    if out is None:
        return None
    output(out, x, name)
    if out.data_ptr() == x.data_ptr() and x.numel():
        raise ValueError(f"{name}: expected a tensor other than x (x is updated in place)")
    return out


# ---- what a score function returns -----------------------------------------------------------------------
# A score function must return a tensor of exactly its input's shape, dtype and device: a score of another
# shape would broadcast silently in the samplers' and solvers' arithmetic (``lambda x, t: -x[:, :1]`` gives a
# plausible-looking but wrong likelihood), and another dtype or device would be converted silently on every
# step. Every sampler, solver, estimator and loss checks it here, so the same mistake gives the same error
# everywhere. Metadata only: it works on tensors that carry autograd history or forward-mode tangents.


def check_score(out, x: Tensor, name: str = "score_fn", *, exact: bool = True) -> Tensor:
    """``out`` (what the function ``name`` returned for ``x``) checked to be a tensor of x's shape -- and, when
    ``exact``, of x's dtype and device; returns it unchanged."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{name}: expected it to return a tensor, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{name}: returned shape {tuple(out.shape)}, expected x's shape {tuple(x.shape)}")
    if exact and out.dtype != x.dtype:
        raise TypeError(f"{name}: returned {out.dtype}, expected x's dtype {x.dtype}")
    if exact and out.device != x.device:
        raise ValueError(f"{name}: returned a tensor on {out.device}, expected x's device {x.device}")
    return out


def checked_score_fn(score_fn):
    """``score_fn(x, t)`` wrapped so that every output goes through :func:`check_score`."""

    def checked(x, t):
        return check_score(score_fn(x, t), x)

    return checked


# ---- value checks (these read the tensor: one device sync) ------------------------------------------------


def some(values: list, limit: int = 10) -> str:
    """The first ``limit`` values of a list, for a message ("[3, 7, ...]")."""
    return f"{values[:limit]}{' ...' if len(values) > limit else ''}"


def nonfinite_rows(v: Tensor) -> Tensor:
    """(B,) bool: the rows (samples) of v (B, ...) holding a NaN or Inf."""
    return ~torch.isfinite(v.detach().reshape(v.shape[0], -1)).all(dim=1)


def finite(x: Tensor, name: str) -> Tensor:
    """x, checked to hold no NaN or Inf (a ValueError naming the samples that do)."""
    bad = nonfinite_rows(x)
    if bool(bad.any()):
        raise ValueError(
            f"{name}: expected finite values, got NaN or Inf in sample(s) {some(bad.nonzero()[:, 0].tolist())}"
        )
    return x
