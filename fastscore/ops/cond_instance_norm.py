"""InstanceNorm++: conditional instance normalisation with mean reinjection, optionally fused with ELU.

The normalisation of ncsnv2's ``ConditionalInstanceNorm2dPlus`` / ``InstanceNorm2dPlus`` (and, without
``alpha``, of ``ConditionalInstanceNorm2d``), in one statistics pass and one apply pass.

This file reads top to bottom:
1. ``cond_instance_norm_ref``: the pure-PyTorch ground truth;
2. the custom ops ``fastscore::cond_instance_norm_{fwd,fwd_out,bwd,jvp}`` and the implementations
   each backend provides for them (ref, cpp, triton, cuda; chosen per call by fastscore._backend);
3. the autograd Functions (backward; forward-mode jvp; double backward through the reference);
4. the public ``cond_instance_norm``, which validates its arguments and picks the Function.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastscore import _backend
from fastscore import _validate

OP = "cond_instance_norm"
_ACTS = {None: "none", "none": "none", "elu": "elu"}

# ---- 1. reference ---------------------------------------------------------------------------------


def cond_instance_norm_ref(
    x: Tensor,
    gamma: Tensor,
    alpha: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    eps: float = 1e-5,
    act: str | None = None,
) -> Tensor:
    r"""InstanceNorm++ in plain PyTorch, as ncsnv2 computes it (docs/numerics.md#instancenorm).

    Shapes: ``x`` (N, C, H, W); ``gamma``, ``alpha``, ``beta`` (N, C) (conditional: rows already
    gathered by label) or (C,) (unconditional). Returns (N, C, H, W).

    Per sample n and channel c, with :math:`\mu_{nc}` and :math:`\sigma^2_{nc}` the mean and the
    **biased** variance of ``x[n, c]`` over H and W:

    .. math::
        \hat h = \frac{x - \mu_{nc}}{\sqrt{\sigma^2_{nc} + \epsilon}}, \qquad
        \hat\mu_{nc} = \frac{\mu_{nc} - \operatorname{mean}_c \mu_{nc}}
                            {\sqrt{\operatorname{var}^{u}_c \mu_{nc} + \epsilon}}, \qquad
        \mathrm{out} = \mathrm{act}\big(\gamma (\hat h + \alpha \hat\mu) + \beta\big)

    where :math:`\operatorname{var}^u_c` is the **unbiased** variance across the C channel means
    (torch.var's default, so C must be at least 2 when ``alpha`` is given). Without ``alpha`` the
    :math:`\alpha\hat\mu` term is absent (plain conditional instance norm); without ``beta`` it is 0.
    ``act`` is None or ``"elu"`` (alpha = 1).

    Dtypes, as :func:`cond_instance_norm`: **the result has x's dtype**, whatever the parameters' dtypes.
    Computed in the dtype ``x`` and the parameters promote to (torch's rule: float32 ``x`` with float64
    parameters is computed in float64), then rounded to ``x``'s dtype. To get torch's promoted dtype instead
    (what ncsnv2's layers return), promote ``x`` first, as fastscore.nn's layers do.
    """

    def per_channel(p: Tensor) -> Tensor:  # (N, C) or (C,) -> broadcastable against (N, C, H, W)
        return p[..., None, None]

    out_dtype = x.dtype
    compute = x.dtype
    for p in (gamma, alpha, beta):
        if p is not None and p.dtype != compute:
            compute = torch.promote_types(compute, p.dtype)
    x = x.to(compute)
    mean = x.mean(dim=(2, 3))
    var = x.var(dim=(2, 3), unbiased=False)
    h = (x - per_channel(mean)) / torch.sqrt(per_channel(var) + eps)
    if alpha is not None:
        muhat = (mean - mean.mean(dim=1, keepdim=True)) / torch.sqrt(mean.var(dim=1, keepdim=True) + eps)
        h = h + per_channel(muhat * alpha)
    out = per_channel(gamma) * h
    if beta is not None:
        out = out + per_channel(beta)
    if act == "elu":
        out = F.elu(out)
    return out.to(out_dtype)


# ---- 2. custom ops and their implementations ------------------------------------------------------
# Arguments as the kernels take them: x (N, C, H, W), contiguous or channels_last, any float dtype;
# gamma / alpha / beta (N, C) in the accumulation dtype (float32, or float64 for float64 x), any
# strides (an unconditional (C,) parameter arrives as a stride-0 expand); alpha / beta may be None;
# act "none" | "elu". mean / rstd: (N, C) per-plane statistics in the accumulation dtype.


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and parameters are kept in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like_x(t: Tensor, x: Tensor) -> Tensor:
    return t.contiguous(memory_format=_validate.memory_format(x))


def _fwd_ref(x, gamma, alpha, beta, eps, act):
    xa = x.to(acc_dtype(x.dtype))
    mean = xa.mean(dim=(2, 3))
    rstd = torch.rsqrt(xa.var(dim=(2, 3), unbiased=False) + eps)
    out = cond_instance_norm_ref(xa, gamma, alpha, beta, eps=eps, act=act)
    return _like_x(out.to(x.dtype), x), mean, rstd


def _fwd_out_ref(x, gamma, alpha, beta, eps, act, out):
    out.copy_(_fwd_ref(x, gamma, alpha, beta, eps, act)[0])


def _present(*tensors):
    return [t for t in tensors if t is not None]


def _ref_of_present(x, alpha, beta, eps, act):
    """cond_instance_norm_ref as a function of (x, gamma, [alpha], [beta]) in the accumulation dtype."""

    def f(xa, gamma, *rest):
        rest = list(rest)
        a = rest.pop(0) if alpha is not None else None
        b = rest.pop(0) if beta is not None else None
        return cond_instance_norm_ref(xa.to(gamma.dtype), gamma, a, b, eps=eps, act=act).to(x.dtype)

    return f


def _bwd_ref(grad_out, x, gamma, alpha, beta, mean, rstd, eps, act):
    _, vjp = torch.func.vjp(_ref_of_present(x, alpha, beta, eps, act), x, gamma, *_present(alpha, beta))
    # Autograd may hand back views of grad_out (e.g. a parameter's gradient when H * W = 1); a
    # custom op's outputs must not alias its inputs.
    grads = [g.clone() for g in vjp(grad_out)]
    grad_x, grad_gamma = grads[0], grads[1]
    grad_alpha = grads[2] if alpha is not None else gamma.new_empty(0)
    grad_beta = grads[-1] if beta is not None else gamma.new_empty(0)  # a second empty: outputs may not alias
    return _like_x(grad_x, x), grad_gamma, grad_alpha, grad_beta


def _jvp_ref(x, gamma, alpha, beta, mean, rstd, x_t, gamma_t, alpha_t, beta_t, eps, act):
    def tangent(t, p):
        return torch.zeros_like(p) if t is None else t

    primals = (x, gamma, *_present(alpha, beta))
    tangents = (tangent(x_t, x), tangent(gamma_t, gamma))
    tangents += tuple(tangent(t, p) for t, p in ((alpha_t, alpha), (beta_t, beta)) if p is not None)
    _, out_t = torch.func.jvp(_ref_of_present(x, alpha, beta, eps, act), primals, tangents)
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
        return _Impl(
            ops.cond_instance_norm_fwd,
            ops.cond_instance_norm_fwd_out,
            ops.cond_instance_norm_bwd,
            ops.cond_instance_norm_jvp,
        )
    from fastscore._triton import cond_instance_norm as kernels

    return _Impl(kernels.fwd, kernels.fwd_out, kernels.bwd, kernels.jvp)


def _impl_for(x: Tensor) -> _Impl:  # chosen once per (forced backend, device type): see _backend.chosen_impl
    return _backend.chosen_impl(OP, x.device, _impl, cpp_op="cond_instance_norm_fwd", cuda_order=PREFERRED_CUDA)


# Order on CUDA tensors, from bench/bench_cond_instance_norm.py (not yet measured on a GPU here:
# the Triton kernel tiles both layouts; the CUDA kernel is the fallback).
PREFERRED_CUDA = ("triton", "cuda")


@torch.library.custom_op("fastscore::cond_instance_norm_fwd", mutates_args=())
def _fwd_op(
    x: Tensor, gamma: Tensor, alpha: Tensor | None, beta: Tensor | None, eps: float, act: str
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_impl_for(x).fwd(x, gamma, alpha, beta, eps, act))


@_fwd_op.register_fake
def _(x, gamma, alpha, beta, eps, act):
    stats = x.new_empty(x.shape[:2], dtype=acc_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("fastscore::cond_instance_norm_fwd_out", mutates_args=("out",))
def _fwd_out_op(
    x: Tensor, gamma: Tensor, alpha: Tensor | None, beta: Tensor | None, eps: float, act: str, out: Tensor
) -> None:
    _impl_for(x).fwd_out(x, gamma, alpha, beta, eps, act, out)


@_fwd_out_op.register_fake
def _(x, gamma, alpha, beta, eps, act, out):
    return None


@torch.library.custom_op("fastscore::cond_instance_norm_bwd", mutates_args=())
def _bwd_op(
    grad_out: Tensor,
    x: Tensor,
    gamma: Tensor,
    alpha: Tensor | None,
    beta: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    eps: float,
    act: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_impl_for(x).bwd(grad_out, x, gamma, alpha, beta, mean, rstd, eps, act))


@_bwd_op.register_fake
def _(grad_out, x, gamma, alpha, beta, mean, rstd, eps, act):
    def grad_of(p):
        return torch.empty_like(mean) if p is not None else mean.new_empty(0)

    return torch.empty_like(x), torch.empty_like(mean), grad_of(alpha), grad_of(beta)


@torch.library.custom_op("fastscore::cond_instance_norm_jvp", mutates_args=())
def _jvp_op(
    x: Tensor,
    gamma: Tensor,
    alpha: Tensor | None,
    beta: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    x_t: Tensor | None,
    gamma_t: Tensor | None,
    alpha_t: Tensor | None,
    beta_t: Tensor | None,
    eps: float,
    act: str,
) -> Tensor:
    return _impl_for(x).jvp(x, gamma, alpha, beta, mean, rstd, x_t, gamma_t, alpha_t, beta_t, eps, act)


@_jvp_op.register_fake
def _(x, gamma, alpha, beta, mean, rstd, x_t, gamma_t, alpha_t, beta_t, eps, act):
    return torch.empty_like(x)


# ---- 3. autograd ----------------------------------------------------------------------------------


class _CondInstanceNormFn(torch.autograd.Function):
    """Forward and backward on the fused kernels; used under torch.compile (which rejects a custom jvp)."""

    @staticmethod
    def forward(x, gamma, alpha, beta, eps, act):
        return torch.ops.fastscore.cond_instance_norm_fwd(x, gamma, alpha, beta, eps, act)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gamma, alpha, beta, eps, act = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, gamma, alpha, beta, mean, rstd)
        ctx.save_for_forward(x, gamma, alpha, beta, mean, rstd)
        ctx.eps, ctx.act = eps, act

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        x, gamma, alpha, beta, mean, rstd = ctx.saved_tensors
        grad_out = _like_x(grad_out, x)
        if torch.is_grad_enabled():
            # create_graph=True (sliced score matching, Hutchinson HVPs, jvp(grad(f))): the gradient
            # must itself be differentiable, so differentiate the reference, exactly.
            _, vjp = torch.func.vjp(_ref_of_present(x, alpha, beta, ctx.eps, ctx.act), x, gamma, *_present(alpha, beta))
            grads = list(vjp(grad_out))
            grad_x, grad_gamma = grads[0], grads[1]
            grad_alpha = grads[2] if alpha is not None else None
            grad_beta = grads[-1] if beta is not None else None
        else:
            grad_x, grad_gamma, grad_alpha, grad_beta = torch.ops.fastscore.cond_instance_norm_bwd(
                grad_out, x, gamma, alpha, beta, mean, rstd, ctx.eps, ctx.act
            )
            grad_alpha = grad_alpha if alpha is not None else None
            grad_beta = grad_beta if beta is not None else None
        return grad_x, grad_gamma, grad_alpha, grad_beta, None, None


class _CondInstanceNormFnJvp(_CondInstanceNormFn):
    """Adds forward-mode AD on the fused jvp kernel (eager only: see the public function), and runs the
    backward under the use_backend override of the forward: autograd may run it on another thread."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _CondInstanceNormFn.setup_context(ctx, inputs, output)
        ctx.backend = _backend.override()

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        with _backend.forcing(ctx.backend):
            return _CondInstanceNormFn.backward(ctx, grad_out, _grad_mean, _grad_rstd)

    @staticmethod
    def jvp(ctx, x_t, gamma_t, alpha_t, beta_t, _eps_t, _act_t):
        x, gamma, alpha, beta, mean, rstd = ctx.saved_tensors
        x_t = None if x_t is None else _like_x(x_t, x)
        out_t = torch.ops.fastscore.cond_instance_norm_jvp(
            x, gamma, alpha, beta, mean, rstd, x_t, gamma_t, alpha_t, beta_t, ctx.eps, ctx.act
        )
        return out_t, None, None


# ---- 4. public function ---------------------------------------------------------------------------


def cond_instance_norm(
    x: Tensor,
    gamma: Tensor,
    alpha: Tensor | None = None,
    beta: Tensor | None = None,
    *,
    eps: float = 1e-5,
    act: str | None = None,
    out: Tensor | None = None,
) -> Tensor:
    r"""InstanceNorm++ (ncsnv2), fused: ``act(gamma * (xhat + alpha * muhat) + beta)``.

    Equation and shapes as :func:`cond_instance_norm_ref`: ``x`` (N, C, H, W) in float16, bfloat16,
    float32 or float64, contiguous or channels_last (other strides are copied first); ``gamma``,
    ``alpha``, ``beta`` (N, C) (conditional: rows gathered by label) or (C,) (unconditional), any
    float dtype on x's device. ``alpha=None`` drops the mean reinjection (plain conditional instance
    norm); ``beta=None`` drops the shift; ``act`` is None or ``"elu"``.

    Numerics: statistics and arithmetic in float32 (float64 for float64 ``x``); the result has
    ``x``'s dtype and memory layout, whatever the parameters' dtypes (float32 ``x`` with float64 parameters
    gives float32, as :func:`cond_instance_norm_ref` does; promote ``x`` first for torch's promoted dtype, as
    the layers in fastscore.nn do to match ncsnv2). Differentiable in forward and reverse mode, twice.
    NaN or inf in a plane makes that plane's output NaN (with ``alpha``, the whole sample's, since
    every channel sees the channel means), as in the original; inputs are not scanned for them.

    ``out``: write the result into this preallocated tensor (same shape, dtype and layout as ``x``;
    may be ``x`` itself) instead of a new one. Not differentiable; inference only: in grad mode, an ``out``
    that requires grad is refused (torch refuses to overwrite such a tensor too). ``eps`` > 0 must be
    finite in the compute dtype.
    """
    act_name = _ACTS.get(act) if isinstance(act, str) or act is None else None
    if act_name is None:
        wrong_kind = TypeError if act is not None and not isinstance(act, str) else ValueError
        raise wrong_kind(f"act: expected None or 'elu', got {act!r}")
    _validate.image(x, "x")
    N, C = x.shape[:2]
    if not isinstance(eps, (float, int)) or isinstance(eps, bool):
        raise TypeError(f"eps: expected a positive number, got {eps!r}")
    if not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    if not eps <= torch.finfo(acc_dtype(x.dtype)).max:  # inf, or a value the kernels' compute dtype rounds to inf
        raise ValueError(
            f"eps: expected a positive number finite in {str(acc_dtype(x.dtype)).removeprefix('torch.')} (the dtype "
            f"x's statistics are computed in), got {eps!r}"
        )
    params = {"gamma": gamma, "alpha": alpha, "beta": beta}
    for name, p in params.items():
        if p is not None or name == "gamma":
            _validate.channel_param(p, name, x)
    if alpha is not None and C < 2:
        raise ValueError(
            f"alpha: mean reinjection needs at least 2 channels (the variance across channel means divides "
            f"by C - 1), got x of shape {tuple(x.shape)}"
        )
    x = _validate.supported_layout(x)
    acc = acc_dtype(x.dtype)
    g, a, b = (None if p is None else p.to(acc).expand(N, C) for p in (gamma, alpha, beta))
    eps = float(eps)

    if out is not None:
        _validate.output(out, x, "out")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, g, a, b)):
            raise ValueError("out: writing into a preallocated tensor is not differentiable; use torch.no_grad()")
        if x.numel():
            fwd_out = (
                _impl_for(x).fwd_out if _backend.eager_inference() else torch.ops.fastscore.cond_instance_norm_fwd_out
            )
            fwd_out(x, g, a, b, eps, act_name, out)
        return out
    if x.numel() == 0:
        return torch.empty_like(x)
    path = _backend.op_path(x, g, a, b)
    if path == "kernel":
        return _impl_for(x).fwd(x, g, a, b, eps, act_name)[0]
    if path == "reference":
        return cond_instance_norm_ref(x.to(acc), g, a, b, eps=eps, act=act_name).to(x.dtype)
    fn = _CondInstanceNormFn if path == "function" else _CondInstanceNormFnJvp
    return fn.apply(x, g, a, b, eps, act_name)[0]
