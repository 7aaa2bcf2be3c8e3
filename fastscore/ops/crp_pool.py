"""RefineNet CRP pooling: the 5x5, stride 1, padding 2 max or average pooling of the CRP blocks.

ncsnv2's ``CRPBlock`` (``maxpool=True``, NCSNv2's RefineBlocks) runs ``nn.MaxPool2d(5, 1, 2)``;
ncsn's and ncsnv2's ``CondCRPBlock`` run ``nn.AvgPool2d(5, 1, 2)`` (count_include_pad, so every
window divides by 25), although their attribute is called ``maxpool``. On CPU the max pooling alone
took ~30% of NCSNv2's forward time.

This file reads top to bottom:
1. ``crp_pool_ref``: the pure-PyTorch ground truth;
2. the custom ops ``fastscore::crp_pool_{fwd,bwd,jvp}`` and the implementations each backend provides
   for them (ref, cpp, triton, cuda; chosen per call by fastscore._backend);
3. the autograd Functions (backward; forward-mode jvp; double backward through the reference);
4. the public ``crp_pool``, which validates its arguments and picks the Function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastscore import _backend
from fastscore import _validate

OP = "crp_pool"
MODES = ("max", "avg")
KERNEL, STRIDE, PADDING = 5, 1, 2

# ---- 1. reference ---------------------------------------------------------------------------------


def _check_mode(mode) -> str:
    return _validate.choice(mode, "mode", MODES)


def crp_pool_ref(x: Tensor, *, mode: str = "max") -> Tensor:
    r"""RefineNet CRP pooling in plain PyTorch, as ncsn / ncsnv2 compute it.

    Shapes: ``x`` (N, C, H, W) -> (N, C, H, W) (5x5 window, stride 1, padding 2 keep H and W).
    With :math:`\mathcal{W}(h, w) = \{(i, j) : |i - h| \le 2, |j - w| \le 2, 0 \le i < H, 0 \le j < W\}`
    the in-image part of the window centred on (h, w):

    .. math::
        \mathrm{max:}\quad \mathrm{out}_{nchw} = \max_{(i, j) \in \mathcal{W}(h, w)} x_{ncij}
        \qquad\qquad
        \mathrm{avg:}\quad \mathrm{out}_{nchw} = \frac{1}{25} \sum_{(i, j) \in \mathcal{W}(h, w)} x_{ncij}

    ``"max"`` is ``F.max_pool2d(x, 5, stride=1, padding=2)`` (ncsnv2 ``CRPBlock``): a NaN in the window
    makes the output NaN, and the gradient of each output goes to one input of its window, the one
    PyTorch's CPU kernel picks (the first maximum in row-major window order; the last NaN if any).
    ``"avg"`` is ``F.avg_pool2d(x, 5, stride=1, padding=2)`` with count_include_pad: the divisor is
    25 even where the window hangs over the border (ncsn / ncsnv2 ``CondCRPBlock``).
    """
    if _check_mode(mode) == "max":
        return F.max_pool2d(x, KERNEL, stride=STRIDE, padding=PADDING)
    return F.avg_pool2d(x, KERNEL, stride=STRIDE, padding=PADDING)


# ---- 2. custom ops and their implementations ------------------------------------------------------
# Arguments as the kernels take them: x (N, C, H, W), contiguous or channels_last, any float dtype;
# grad_out and x_t in x's shape, dtype and layout; mode "max" | "avg". Every result has x's shape,
# dtype and layout. Backward and jvp recompute each window's chosen input from x (nothing is saved
# but x), so the ops need neither the output nor an index tensor.


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like_x(t: Tensor, x: Tensor) -> Tensor:
    return t.contiguous(memory_format=_validate.memory_format(x))


def _ref_in_acc(x: Tensor, mode: str):
    """crp_pool_ref as a function of x, computed in the accumulation dtype, returned in x's dtype."""
    acc = acc_dtype(x.dtype)
    return lambda xx: crp_pool_ref(xx.to(acc), mode=mode).to(x.dtype)


def _fwd_ref(x, mode):
    return _like_x(_ref_in_acc(x, mode)(x), x)


def _bwd_ref(grad_out, x, mode):
    _, vjp = torch.func.vjp(_ref_in_acc(x, mode), x)
    return _like_x(vjp(grad_out)[0], x)


def _jvp_ref(x, x_t, mode):
    _, out_t = torch.func.jvp(_ref_in_acc(x, mode), (x,), (x_t,))
    return _like_x(out_t, x)


class _Impl(NamedTuple):
    fwd: object
    bwd: object
    jvp: object


def _impl(backend: str) -> _Impl:
    if backend == "ref":
        return _Impl(_fwd_ref, _bwd_ref, _jvp_ref)
    if backend in ("cpp", "cuda"):  # one C++ op; the dispatcher routes CPU / CUDA tensors
        ops = torch.ops.fastscore_C
        return _Impl(ops.crp_pool_fwd, ops.crp_pool_bwd, ops.crp_pool_jvp)
    from fastscore._triton import crp_pool as kernels

    return _Impl(kernels.fwd, kernels.bwd, kernels.jvp)


# Order on CUDA tensors, from bench/bench_crp_pool.py (not yet measured on a GPU here: the CUDA
# kernel reduces separably in shared memory; the Triton kernel reads the 25 taps from cache).
PREFERRED_CUDA = ("cuda", "triton")


def _impl_for(x: Tensor) -> _Impl:  # chosen once per (forced backend, device type): see _backend.chosen_impl
    return _backend.chosen_impl(OP, x.device, _impl, cpp_op="crp_pool_fwd", cuda_order=PREFERRED_CUDA)


@torch.library.custom_op("fastscore::crp_pool_fwd", mutates_args=())
def _fwd_op(x: Tensor, mode: str) -> Tensor:
    return _impl_for(x).fwd(x, mode)


@_fwd_op.register_fake
def _(x, mode):
    return torch.empty_like(x)


@torch.library.custom_op("fastscore::crp_pool_bwd", mutates_args=())
def _bwd_op(grad_out: Tensor, x: Tensor, mode: str) -> Tensor:
    return _impl_for(x).bwd(grad_out, x, mode)


@_bwd_op.register_fake
def _(grad_out, x, mode):
    return torch.empty_like(x)


@torch.library.custom_op("fastscore::crp_pool_jvp", mutates_args=())
def _jvp_op(x: Tensor, x_t: Tensor, mode: str) -> Tensor:
    return _impl_for(x).jvp(x, x_t, mode)


@_jvp_op.register_fake
def _(x, x_t, mode):
    return torch.empty_like(x)


# ---- 3. autograd ----------------------------------------------------------------------------------


class _CrpPoolFn(torch.autograd.Function):
    """Forward and backward on the fused kernels; used under torch.compile (which rejects a custom jvp)."""

    @staticmethod
    def forward(x, mode):
        return torch.ops.fastscore.crp_pool_fwd(x, mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mode = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.mode = mode

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_out = _like_x(grad_out, x)
        if torch.is_grad_enabled():
            # create_graph=True (sliced score matching, Hutchinson HVPs, jvp(grad(f))): the gradient
            # must itself be differentiable, so differentiate the reference, exactly. It routes max
            # gradients to the same inputs as the kernels.
            _, vjp = torch.func.vjp(_ref_in_acc(x, ctx.mode), x)
            return vjp(grad_out)[0], None
        return torch.ops.fastscore.crp_pool_bwd(grad_out, x, ctx.mode), None


class _CrpPoolFnJvp(_CrpPoolFn):
    """Adds forward-mode AD on the fused jvp kernel (eager only: see the public function), and runs the
    backward under the use_backend override of the forward: autograd may run it on another thread."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _CrpPoolFn.setup_context(ctx, inputs, output)
        ctx.backend = _backend.override()

    @staticmethod
    def backward(ctx, grad_out):
        with _backend.forcing(ctx.backend):
            return _CrpPoolFn.backward(ctx, grad_out)

    @staticmethod
    def jvp(ctx, x_t, _mode_t):
        (x,) = ctx.saved_tensors
        x_t = torch.zeros_like(x) if x_t is None else _like_x(x_t, x)
        return torch.ops.fastscore.crp_pool_jvp(x, x_t, ctx.mode)


# ---- 4. public function ---------------------------------------------------------------------------


def crp_pool(x: Tensor, *, mode: str = "max") -> Tensor:
    r"""RefineNet CRP pooling, fused: 5x5 window, stride 1, padding 2, ``mode`` ``"max"`` or ``"avg"``.

    Equation and shapes as :func:`crp_pool_ref`: ``x`` (N, C, H, W) in float16, bfloat16, float32 or
    float64, contiguous or channels_last (other strides are copied first); the result has ``x``'s
    shape, dtype and memory layout. ``"max"`` is ``nn.MaxPool2d(5, 1, 2)`` (ncsnv2 ``CRPBlock``),
    ``"avg"`` is ``nn.AvgPool2d(5, 1, 2)`` (count_include_pad: always / 25; ncsn / ncsnv2
    ``CondCRPBlock``).

    Numerics: max is exact; the average sums in float32 (float64 for float64 ``x``). Max gradients
    and tangents follow PyTorch's choice of input within each window exactly (ties: the first in
    row-major order; NaN: the last NaN). Differentiable in forward and reverse mode, twice.
    """
    _check_mode(mode)
    _validate.image(x, "x")
    x = _validate.supported_layout(x)
    if x.numel() == 0:
        return torch.empty_like(x)
    path = _backend.op_path(x)
    if path == "kernel":
        return _impl_for(x).fwd(x, mode)
    if path == "reference":
        return _ref_in_acc(x, mode)(x)
    return (_CrpPoolFn if path == "function" else _CrpPoolFnJvp).apply(x, mode)
