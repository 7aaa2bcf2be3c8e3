"""ELU with alpha = 1 (``nn.ELU()``), the activation of NCSN / NCSNv2's RefineNet blocks.

Where a norm precedes it, the norm applies the ELU itself (``cond_instance_norm(..., act="elu")``);
the RCU and CRP blocks of NCSNv2 apply it to a convolution's output or to the block input, 44 times
per forward at ngf=32. torch's CPU ELU evaluates Sleef's expm1 on every element and costs ~4x a copy
of the same bytes; this op runs the vectorised polynomial of csrc/include/common_math.h (the one the
fused norms use) and can write in place.

This file reads top to bottom:
1. ``elu_ref``: the pure-PyTorch ground truth;
2. the custom ops ``fastscore::elu_{fwd,fwd_out,bwd,jvp}`` and the implementations each backend
   provides for them (ref, cpp, triton, cuda; chosen per call by fastscore._backend);
3. the autograd Functions (backward; forward-mode jvp; double backward through the reference);
4. the public ``elu``, which validates its arguments and picks the Function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastscore import _backend
from fastscore import _validate

OP = "elu"

# ---- 1. reference ---------------------------------------------------------------------------------


def elu_ref(x: Tensor) -> Tensor:
    r"""ELU with alpha = 1 in plain PyTorch, as ncsn / ncsnv2's ``nn.ELU()``.

    Shapes: ``x`` any shape -> the same shape, elementwise:

    .. math::
        \mathrm{elu}(x) = \begin{cases} x & x > 0 \\ e^x - 1 & x \le 0 \end{cases}
        \qquad
        \frac{d\,\mathrm{elu}}{dx} = \begin{cases} 1 & x > 0 \\ e^x & x \le 0 \end{cases}

    NaN stays NaN; the fused kernels give it the derivative 1 (torch's CPU ``elu_backward`` gives 1 on its
    scalar path and NaN on its vectorised one).
    """
    return F.elu(x)


# ---- 2. custom ops and their implementations ------------------------------------------------------
# Arguments as the kernels take them: x of any shape, dense and non-overlapping (contiguous,
# channels_last, any permutation of dimensions), any float dtype; out, grad_out and x_t with x's
# shape, dtype and strides. Every result has x's shape, dtype and strides: the kernels run over the
# flat storage in memory order. out may be x itself (in place). Backward and jvp take the
# derivative from x, so nothing but x is saved.


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: ordered by stride, each dimension's stride is the product of the
    sizes of the dimensions below it, so the numel elements fill one range of memory (any layout)."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return True  # the common layouts, without the Python loop
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(t: Tensor, x: Tensor) -> bool:
    """t has x's shape and strides on every dimension of size above 1 (element e of the storage is the
    same element of both, when x is dense)."""
    return t.shape == x.shape and all(s <= 1 or a == b for s, a, b in zip(x.shape, t.stride(), x.stride()))


def _like_x(t: Tensor, x: Tensor) -> Tensor:
    """t (x's shape) with x's strides: itself if it has them already, else copied into them."""
    if same_layout(t, x):
        return t
    return torch.empty_like(x).copy_(t)  # empty_like keeps a dense x's strides


def _ref_in_acc(x: Tensor):
    """elu_ref as a function of x, computed in the accumulation dtype, returned in x's dtype."""
    acc = acc_dtype(x.dtype)
    return lambda xx: elu_ref(xx.to(acc)).to(x.dtype)


def _fwd_ref(x):
    return _like_x(_ref_in_acc(x)(x), x)


def _fwd_out_ref(x, out):
    out.copy_(_fwd_ref(x))


def _bwd_ref(grad_out, x):
    _, vjp = torch.func.vjp(_ref_in_acc(x), x)
    return _like_x(vjp(grad_out)[0], x)


def _jvp_ref(x, x_t):
    _, out_t = torch.func.jvp(_ref_in_acc(x), (x,), (x_t,))
    return _like_x(out_t, x)


class _Impl(NamedTuple):
    fwd: object
    fwd_out: object
    bwd: object
    jvp: object


def _impl(backend: str) -> _Impl:
    if backend == "ref":
        return _Impl(_fwd_ref, _fwd_out_ref, _bwd_ref, _jvp_ref)
    if backend in ("cpp", "cuda"):  # one C++ op; the dispatcher routes CPU / CUDA tensors
        ops = torch.ops.fastscore_C
        return _Impl(ops.elu_fwd, ops.elu_fwd_out, ops.elu_bwd, ops.elu_jvp)
    from fastscore._triton import elu as kernels

    return _Impl(kernels.fwd, kernels.fwd_out, kernels.bwd, kernels.jvp)


# Order on CUDA tensors (not yet measured on a GPU here: both kernels are one flat, memory-bound pass;
# the CUDA kernel has no launch-time specialisation to pay for).
PREFERRED_CUDA = ("cuda", "triton")


def _impl_for(x: Tensor) -> _Impl:  # chosen once per (forced backend, device type): see _backend.chosen_impl
    return _backend.chosen_impl(OP, x.device, _impl, cpp_op="elu_fwd", cuda_order=PREFERRED_CUDA)


@torch.library.custom_op("fastscore::elu_fwd", mutates_args=())
def _fwd_op(x: Tensor) -> Tensor:
    return _impl_for(x).fwd(x)


@_fwd_op.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("fastscore::elu_fwd_out", mutates_args=("out",))
def _fwd_out_op(x: Tensor, out: Tensor) -> None:
    _impl_for(x).fwd_out(x, out)


@_fwd_out_op.register_fake
def _(x, out):
    return None


@torch.library.custom_op("fastscore::elu_bwd", mutates_args=())
def _bwd_op(grad_out: Tensor, x: Tensor) -> Tensor:
    return _impl_for(x).bwd(grad_out, x)


@_bwd_op.register_fake
def _(grad_out, x):
    return torch.empty_like(x)


@torch.library.custom_op("fastscore::elu_jvp", mutates_args=())
def _jvp_op(x: Tensor, x_t: Tensor) -> Tensor:
    return _impl_for(x).jvp(x, x_t)


@_jvp_op.register_fake
def _(x, x_t):
    return torch.empty_like(x)


# ---- 3. autograd ----------------------------------------------------------------------------------


class _EluFn(torch.autograd.Function):
    """Forward and backward on the fused kernels; used under torch.compile (which rejects a custom jvp)."""

    @staticmethod
    def forward(x):
        return torch.ops.fastscore.elu_fwd(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_out = _like_x(grad_out, x)
        if torch.is_grad_enabled():
            # create_graph=True (sliced score matching, Hutchinson HVPs, jvp(grad(f))): the gradient
            # must itself be differentiable, so differentiate the reference, exactly.
            _, vjp = torch.func.vjp(_ref_in_acc(x), x)
            return vjp(grad_out)[0]
        return torch.ops.fastscore.elu_bwd(grad_out, x)


class _EluFnJvp(_EluFn):
    """Adds forward-mode AD on the fused jvp kernel (eager only: see the public function), and runs the
    backward under the use_backend override of the forward: autograd may run it on another thread."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _EluFn.setup_context(ctx, inputs, output)
        ctx.backend = _backend.override()

    @staticmethod
    def backward(ctx, grad_out):
        with _backend.forcing(ctx.backend):
            return _EluFn.backward(ctx, grad_out)

    @staticmethod
    def jvp(ctx, x_t):
        (x,) = ctx.saved_tensors
        x_t = torch.zeros_like(x) if x_t is None else _like_x(x_t, x)
        return torch.ops.fastscore.elu_jvp(x, x_t)


# ---- 4. public function ---------------------------------------------------------------------------


def _check_out(out, x: Tensor) -> Tensor:
    _validate.tensor(out, "out")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(
            f"out: expected shape {tuple(x.shape)} and dtype {x.dtype} (as x), got {tuple(out.shape)} {out.dtype}"
        )
    _validate.same_device(out, "out", x)
    return _validate.overwritable(out, "out")


def _forward_mode_active(x: Tensor) -> bool:
    """Is x (possibly) carrying a tangent: a torch.func transform, or a dual tensor of torch.autograd.forward_ad?"""
    if torch.compiler.is_compiling():  # dynamo sees its own transforms here; compiled out= is inference
        return False
    if _backend.under_functorch_transform():
        return True
    if torch.autograd.forward_ad._current_level < 0:
        return False
    return torch.autograd.forward_ad.unpack_dual(x).tangent is not None


def elu(x: Tensor, *, out: Tensor | None = None) -> Tensor:
    r"""ELU with alpha = 1 (``nn.ELU()``), fused: ``x`` for ``x > 0``, ``expm1(x)`` otherwise.

    Equation as :func:`elu_ref`: ``x`` of any shape in float16, bfloat16, float32 or float64. A dense,
    non-overlapping ``x`` (contiguous, channels_last, any permutation) is processed in its own memory
    order and the result has its strides; other strides are copied first (the result is then
    contiguous). Arithmetic in float32 (float64 for float64 ``x``), within 1 ulp of expm1 before
    rounding to ``x``'s dtype. Differentiable in forward and reverse mode, twice; the derivative is
    taken from ``x`` (1 for ``x > 0``, ``exp(x)`` otherwise, as torch's ELU backward).

    ``out``: write the result into this preallocated tensor (``x``'s shape, dtype and device; any
    layout, ``x``'s is fastest) instead of a new one. ``out=x`` is the in-place ELU. Not
    differentiable; inference only (an error when ``x`` or ``out`` requires grad under grad mode, ``x``
    carries a forward-mode tangent, or a torch.func transform is active).
    """
    _validate.floating(_validate.tensor(x, "x"), "x")
    if out is not None:
        _check_out(out, x)
        if torch.is_grad_enabled() and x.requires_grad:
            raise ValueError("out: writing into a preallocated tensor is not differentiable; use torch.no_grad()")
        if _forward_mode_active(x):  # the mutating op has no forward-mode formula: its tangent would be lost
            raise ValueError(
                "out: writing into a preallocated tensor is not differentiable (forward-mode AD or a torch.func "
                "transform is active); call elu(x) without out="
            )
        if x.numel() == 0:
            return out
        src = x if is_dense(x) else x.contiguous()
        # The kernels write out in src's memory order; any other out (a strided x written in place
        # included) gets a fresh result copied in.
        direct = same_layout(out, src) and is_dense(out)
        if _backend.eager_inference():
            impl = _impl_for(src)
            if direct:
                impl.fwd_out(src, out)
            else:
                out.copy_(impl.fwd(src))
        elif direct:
            torch.ops.fastscore.elu_fwd_out(src, out)
        else:
            out.copy_(torch.ops.fastscore.elu_fwd(src))
        return out
    if x.numel() == 0:
        return torch.empty_like(x)
    if not is_dense(x):
        x = x.contiguous()
    path = _backend.op_path(x)
    if path == "kernel":
        return _impl_for(x).fwd(x)
    if path == "reference":
        return _ref_in_acc(x)(x)
    return (_EluFn if path == "function" else _EluFnJvp).apply(x)
