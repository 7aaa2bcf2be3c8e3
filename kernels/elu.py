"""ELU with alpha = 1 (fastscore.ops.elu) in Triton: forward, forward into a given tensor, backward, jvp.

The contract (argument shapes, dtypes, strides, return conventions) is section 2 of fastscore/ops/elu.py.
The op is elementwise and every tensor it touches has x's strides, with x dense and non-overlapping, so
each kernel is one flat pass over the numel elements of the storage in memory order (any layout): the
launchers view each tensor as its storage range (``_flat``). The per-element rules are the fused norms'
(``_act`` of kernels/cond_instance_norm.py, imported so that both ELUs round alike; the derivative is
written here so that NaN gets 1, as in the C++ kernels):

    _elu_kernel     dst = elu(x)                        (forward; dst may be x: in place)
    _elu_scale_kernel dst = v * elu'(x)                 (backward with v = grad_out, jvp with v = x_t)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cond_instance_norm import _act

_ACT_ELU = 1

# ---- kernels ----------------------------------------------------------------------------------------------------


@triton.jit
def _elu_kernel(
    x_ptr,  # (numel,) x's storage, in memory order
    dst_ptr,  # (numel,) out's storage, x's strides; may be x_ptr itself
    numel,
    IS_F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One BLOCK of elements: elu in float32 (float64 for float64), rounded to x's dtype. Grid: cdiv(numel, BLOCK)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    acc = x.to(tl.float64) if IS_F64 else x.to(tl.float32)
    tl.store(dst_ptr + offs, _act(acc, _ACT_ELU, IS_F64).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _elu_scale_kernel(
    x_ptr,  # (numel,) x's storage
    v_ptr,  # (numel,) grad_out (backward) or x_t (jvp), x's strides
    dst_ptr,  # (numel,) grad_x or out_t, x's strides
    numel,
    IS_F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dst = v * elu'(x), elu'(x) = 1 for x > 0, exp(x) otherwise (1 at NaN). Grid: cdiv(numel, BLOCK)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    acc = x.to(tl.float64) if IS_F64 else x.to(tl.float32)
    neg = acc <= 0  # NaN is not: its derivative is 1, as the C++ kernels' act_grad
    d = v.to(acc.dtype) * tl.where(neg, tl.exp(tl.where(neg, acc, 0.0)), 1.0)
    tl.store(dst_ptr + offs, d.to(dst_ptr.dtype.element_ty), mask=mask)


# ---- launchers --------------------------------------------------------------------------------------------------

_BLOCK = 4096  # elements per program: 16 per thread at 8 warps
# Triton's interpreter (CPU tensors, TRITON_INTERPRET=1: how CI checks these kernels) costs per program, not
# per element: there, blocks as large as the tensor allows.
_INTERPRETER_BLOCK = 65536


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The storage range of a dense, non-overlapping t as a 1-D view (memory order)."""
    return t.as_strided((t.numel(),), (1,))


def _same_layout(t: torch.Tensor, x: torch.Tensor) -> bool:
    return t.shape == x.shape and all(s <= 1 or a == b for s, a, b in zip(x.shape, t.stride(), x.stride()))


def _with_strides_of(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t itself if it has x's strides (the kernels walk both in x's memory order), else a copy that does."""
    return t if _same_layout(t, x) else torch.empty_like(x).copy_(t)


def _launch(kernel, x: torch.Tensor, *tensors: torch.Tensor) -> None:
    n = x.numel()
    if n == 0:
        return
    block = min(_INTERPRETER_BLOCK if x.device.type == "cpu" else _BLOCK, triton.next_power_of_2(n))
    num_warps = 8 if block >= 4096 else 4 if block >= 512 else 1
    grid = (triton.cdiv(n, block),)
    kernel[grid](
        *(_flat(t) for t in (x, *tensors)), n, IS_F64=x.dtype == torch.float64, BLOCK=block, num_warps=num_warps
    )


def fwd(x: torch.Tensor) -> torch.Tensor:
    """out (x's shape, dtype and strides) = elu(x)."""
    out = torch.empty_like(x)
    _launch(_elu_kernel, x, out)
    return out


def fwd_out(x: torch.Tensor, out: torch.Tensor) -> None:
    """fwd into the preallocated ``out`` (x's shape and dtype; may be x itself)."""
    if _same_layout(out, x):  # x is dense, so out is too: the same storage order
        _launch(_elu_kernel, x, out)
    else:
        out.copy_(fwd(x))


def bwd(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad_x (x's shape, dtype and strides) for grad_out (x's shape)."""
    grad_x = torch.empty_like(x)
    _launch(_elu_scale_kernel, x, _with_strides_of(grad_out, x), grad_x)
    return grad_x


def jvp(x: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """out_t (x's shape, dtype and strides) for the tangent x_t (x's shape)."""
    out_t = torch.empty_like(x)
    _launch(_elu_scale_kernel, x, _with_strides_of(x_t, x), out_t)
    return out_t
