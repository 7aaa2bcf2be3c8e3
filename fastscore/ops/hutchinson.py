r"""Hutchinson divergence: ``fn(x)`` and an unbiased per-sample estimate of ``div_x fn(x)`` from one evaluation.

.. math::
    \operatorname{div} f(x) = \operatorname{tr} \nabla_x f(x) = \mathbb{E}_v\big[v^\top \nabla_x f(x)\, v\big],
    \qquad \mathbb{E}[v v^\top] = I

(Hutchinson; Skilling). Sliced score matching and the probability-flow likelihood are built on it. The
products :math:`v^\top J v` come from either

* reverse mode (``mode="reverse"``): one forward pass that records the graph, then one vector-Jacobian
  product :math:`v^\top J` per probe (``autograd.grad`` of ``(f(x) v).sum()``, the graph kept between
  probes); or
* forward mode (``mode="forward"``): one forward pass on dual tensors per probe, carrying the tangent
  :math:`J v` alongside the value (``torch.autograd.forward_ad``), no graph recorded. fastscore's fused
  layers have fused jvp kernels, so this pass stays fused; stock PyTorch's forward-mode rule for a
  convolution also convolves a zero weight tangent, which this engine skips.

``mode="auto"`` takes reverse mode: on fastscore's fused NCSNv2 it measured level with forward mode for one
probe and faster for several, and faster on small networks (numbers at ``_auto_mode``). Against score_sde's
estimator on ncsnv2's layers (bench/bench_hutchinson.py) the gain is the fused layers' forward and backward
kernels and channels_last convolutions.

Either way ``fx`` comes from the same pass as the products (no separate forward). Probes are drawn from the
counter-based Philox generator of :func:`fastscore.ops.counter_randn` keyed by ``(seed, counter, element
index)``: a sample's probes do not depend on the batch it is in. Rademacher probes are the signs of those
normals.

Reading order: probes -> references (:func:`hutchinson_divergence_ref`, score_sde's estimator, and
:func:`exact_divergence`) -> the two product engines -> the public :func:`hutchinson_divergence`. There is
no custom kernel here: the work is the network's own forward/jvp/backward, which the fused layers supply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

from fastscore import _validate
from fastscore.ops.langevin_step import counter_randn

__all__ = [
    "hutchinson_divergence",
    "hutchinson_divergence_ref",
    "exact_divergence",
    "make_probes",
    "probe_products",
]

PROBES = ("rademacher", "gaussian")
MODES = ("auto", "forward", "reverse")


# ---- argument checks shared with fastscore.losses ---------------------------------------------------------


def _check_x(x, name: str = "x") -> Tensor:
    return _validate.batch(x, name, min_dim=2, non_empty=True)


# ---- 1. probes ------------------------------------------------------------------------------------------


def make_probes(
    x: Tensor,
    n_probes: int = 1,
    probe: str = "rademacher",
    *,
    seed: int | None = None,
    counter: int = 0,
    sample_offset: int = 0,
) -> Tensor:
    """Probes (n_probes, N, *x.shape[1:]) in x's dtype and device with E[v v^T] = I per sample.

    Sample n's probes are ``counter_randn((N, n_probes, *x.shape[1:]), seed, counter, sample_offset)[n]``
    (Gaussian) or their signs (Rademacher, +1 at an exact 0): keyed by the sample's global index
    ``sample_offset + n``, so they do not depend on the batch the sample is in. ``seed=None`` draws a seed
    from torch's default generator.
    """
    _check_x(x)
    n_probes = _validate.integer(n_probes, "n_probes", low=1)
    _validate.choice(probe, "probe", PROBES)
    z = counter_randn(
        (x.shape[0], n_probes, *x.shape[1:]), seed=seed, counter=counter, sample_offset=sample_offset, device=x.device
    )
    if probe == "rademacher":
        z = torch.where(z >= 0, 1.0, -1.0)
    return z.transpose(0, 1).to(x.dtype).contiguous()


def _check_probes(probes, x: Tensor) -> Tensor:
    """Explicit probes: x's shape (one probe) or (P, *x.shape); returned as (P, *x.shape)."""
    _validate.tensor(probes, "probes")
    if probes.shape == x.shape:
        probes = probes.unsqueeze(0)
    if probes.dim() != x.dim() + 1 or probes.shape[1:] != x.shape or probes.shape[0] < 1:
        raise ValueError(
            f"probes: expected shape {tuple(x.shape)} or (P, {', '.join(map(str, x.shape))}), got {tuple(probes.shape)}"
        )
    _validate.same_device(probes, "probes", x)
    return probes.to(x.dtype)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two (N, ...) tensors: (N,)."""
    return (a * b).reshape(a.shape[0], -1).sum(dim=-1)


# ---- 2. references --------------------------------------------------------------------------------------


def hutchinson_divergence_ref(fn, x: Tensor, probes: Tensor) -> tuple[Tensor, Tensor]:
    r"""score_sde's estimator (``likelihood.get_div_fn``): per probe :math:`v`, with gradients enabled,
    :math:`u = \sum f(x) \odot v`, :math:`g = \nabla_x u` (``autograd.grad``), :math:`\hat d = \sum g \odot v`.

    ``probes`` is x's shape or (P, *x.shape); the estimate is averaged over the P probes, each with its own
    forward and backward pass, as score_sde would be called P times. Returns ``(fx, div)`` detached: ``fx``
    (x's shape) from the first probe's forward pass and ``div`` (N,).
    """
    _validate.function(fn, "fn")
    _check_x(x)
    probes = _check_probes(probes, x)
    fx, total = None, None
    for v in probes:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            out = fn(xg)
            _validate.check_score(out, x, "fn", exact=False)
            fn_eps = torch.sum(out * v)
            grad = torch.autograd.grad(fn_eps, xg)[0]
        d = torch.sum((grad * v).reshape(x.shape[0], -1), dim=-1)
        fx = out.detach() if fx is None else fx
        total = d if total is None else total + d
    return fx, total / probes.shape[0]


def exact_divergence(fn, x: Tensor, *, create_graph: bool = False, _fn_name: str = "fn") -> tuple[Tensor, Tensor]:
    r"""``(fx, div)`` with the exact trace :math:`\sum_i \partial f_i / \partial x_i` per sample.

    One forward pass and D vector-Jacobian products (D = elements per sample), one per basis vector
    :math:`e_i` (the Jacobian is not materialised): for small D, and as the ground truth for the
    estimators. ``fn`` must act on samples independently (the usual batch semantics). With
    ``create_graph=True`` both results stay differentiable (exact score matching).
    """
    _validate.function(fn, _fn_name)
    _check_x(x)
    D = x[0].numel()
    with torch.enable_grad():
        xg = x if (x.requires_grad and create_graph) else x.detach().requires_grad_(True)
        out = fn(xg)
        _validate.check_score(out, x, _fn_name, exact=False)
        flat = out.reshape(x.shape[0], D)
        div = torch.zeros(x.shape[0], dtype=out.dtype, device=x.device)
        for i in range(D):
            # grad of sum_n f_i(x_n) w.r.t. x is, per sample, row i of that sample's Jacobian.
            (g,) = torch.autograd.grad(flat[:, i].sum(), xg, retain_graph=True, create_graph=create_graph)
            div = div + g.reshape(x.shape[0], D)[:, i]
    if not create_graph:
        return out.detach(), div.detach()
    return out, div


# ---- 3. the product engines -------------------------------------------------------------------------------


def _reverse_products(fn, x: Tensor, probes: Tensor, create_graph: bool, fn_name: str) -> tuple[Tensor, Tensor]:
    """One recorded forward, then v^T J per probe: (fx, (P, N) products)."""
    P = probes.shape[0]
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        out = fn(xg)
        _validate.check_score(out, x, fn_name, exact=False)
        prods = []
        for p in range(P):
            (g,) = torch.autograd.grad(
                out,
                xg,
                grad_outputs=_like(probes[p], out),
                retain_graph=create_graph or p < P - 1,
                create_graph=create_graph,
            )
            prods.append(_dot(g, probes[p]))
    return out, torch.stack(prods)


def _like(v: Tensor, x: Tensor) -> Tensor:
    """v in x's memory layout: a tangent (or cotangent) in another layout than its primal makes every
    convolution convert it (and reorder its weight) on each call."""
    return v.contiguous(memory_format=_validate.memory_format(x)) if x.dim() == 4 else v


def _has_tangent(t) -> bool:
    return isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None


class _TangentOnlyInputs(TorchFunctionMode):
    """Forward-mode AD of convolutions and linear layers whose weights carry no tangent: two products, not three.

    Stock PyTorch (checked on 2.13) differentiates ``conv(x, W, b)`` as ``conv(x_t, W) + conv(x, W_t)`` and,
    when ``W`` has no tangent, fills ``W_t`` with zeros and runs the second convolution anyway: three
    convolutions and an add per layer instead of two. Here, for a dual input and plain weights, the value is
    ``conv(x, W, b)`` and the tangent ``conv(x_t, W)`` (bias-free: it is linear in x), bitwise what the
    stock rule computes for the value and the same tangent up to the dropped ``+ 0``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR_IN_INPUT and args and _has_tangent(args[0]):
            params = list(args[1:]) + list(kwargs.values())
            if not any(_has_tangent(p) for p in params):
                primal, tangent = forward_ad.unpack_dual(args[0])
                value = func(primal, *args[1:], **kwargs)
                rest = list(args[1:])
                if len(rest) >= 2:
                    rest[1] = None  # the bias
                tangent_kwargs = {**kwargs, "bias": None} if "bias" in kwargs else kwargs
                return forward_ad.make_dual(value, func(tangent, *rest, **tangent_kwargs))
        return func(*args, **kwargs)


_LINEAR_IN_INPUT = (F.conv1d, F.conv2d, F.conv3d, F.linear)


def _forward_products(fn, x: Tensor, probes: Tensor, fn_name: str) -> tuple[Tensor, Tensor]:
    """One dual (value, tangent) pass per probe, no graph: (fx from the first pass, (P, N) products)."""
    fx, prods = None, []
    with torch.no_grad(), forward_ad.dual_level(), _TangentOnlyInputs():
        for v in probes:
            v = _like(v, x)
            out = fn(forward_ad.make_dual(x.detach(), v))
            _validate.check_score(out, x, fn_name, exact=False)
            primal, tangent = forward_ad.unpack_dual(out)
            if tangent is None:
                # fn's output does not depend on x, or it left forward-mode AD (e.g. through .detach()).
                tangent = torch.zeros_like(primal)
            fx = primal if fx is None else fx
            prods.append(_dot(tangent, v))
    return fx, torch.stack(prods)


def _auto_mode(create_graph: bool) -> str:
    # Measured (bench/bench_hutchinson.py; 2 shared CPU cores, 1 thread, torch 2.13): NCSNv2 ngf 32, 32x32,
    # batch 16, one probe: reverse 824 ms, forward (dual tensors, fused jvp kernels, the conv rule above)
    # 878 ms, a plain fused forward 389 ms; both engines are ~70% convolutions, one extra convolution per
    # layer either way (the tangent's, or the input gradient's). Two probes: reverse 1361 ms (one forward,
    # two backwards) vs forward 2038 ms (two dual passes). A toy ScoreMLP (batch 128 / 4096): reverse
    # 0.83 / 24 ms vs forward 1.8 / 29 ms (per-op overhead of dual tensors). So reverse is the default;
    # forward mode stays available for its memory: it records no graph and keeps no activations.
    del create_graph  # a differentiable result needs reverse mode anyway
    return "reverse"


def probe_products(
    fn, x: Tensor, probes: Tensor, *, mode: str = "auto", create_graph: bool = False, _fn_name: str = "fn"
):
    """``(fx, vjv)``: ``fn(x)`` and the per-probe, per-sample products ``v_p^T J(x_n) v_p`` (P, N).

    The engine under :func:`hutchinson_divergence` and the sliced score-matching losses, for explicit
    probes (P, *x.shape) or x's shape. With ``create_graph=True`` (reverse mode only) both results stay
    differentiable w.r.t. the parameters fn closes over (and x, when x requires grad). ``_fn_name`` names
    fn in error messages (the losses call it score_fn).
    """
    _validate.function(fn, _fn_name)
    _check_x(x)
    probes = _check_probes(probes, x)
    _validate.choice(mode, "mode", MODES)
    if mode == "auto":
        mode = _auto_mode(create_graph)
    if mode == "forward":
        if create_graph:
            raise ValueError("mode: 'forward' cannot keep a graph (create_graph=True); use 'reverse' or 'auto'")
        return _forward_products(fn, x, probes, _fn_name)
    fx, prods = _reverse_products(fn, x, probes, create_graph, _fn_name)
    if not create_graph:
        return fx.detach(), prods.detach()
    return fx, prods


# ---- 4. public function ---------------------------------------------------------------------------------


def hutchinson_divergence(
    fn,
    x: Tensor,
    *,
    n_probes: int = 1,
    probe: str = "rademacher",
    seed: int | None = None,
    mode: str = "auto",
    create_graph: bool = False,
    probes: Tensor | None = None,
    counter: int = 0,
    sample_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    r"""``(fx, div)``: ``fx = fn(x)`` and an unbiased estimate of :math:`\operatorname{div}_x f(x)` per sample (N,).

    :math:`\hat d_n = \frac1P \sum_p v_{p,n}^\top \nabla_x f(x_n)\, v_{p,n}` over ``n_probes = P`` probes,
    Rademacher (±1; lowest variance for a given Jacobian) or Gaussian, from the counter-based generator
    keyed by ``(seed, counter, sample_offset + n)`` (see :func:`make_probes`), or ``probes`` given
    explicitly (x's shape, or (P, *x.shape)). ``fx`` comes from the same network evaluation as the
    products.

    ``fn`` maps (N, ...) to (N, ...) of the same shape and treats samples independently; extra arguments go
    through a closure, e.g. ``lambda h: model(h, labels)``. ``mode``: ``"forward"`` (dual tensors: P passes
    carrying ``Jv``, no graph, no stored activations: the low-memory choice), ``"reverse"`` (one recorded
    forward, P vector-Jacobian products; score_sde's estimator, evaluated once), or ``"auto"`` (reverse: it
    measured as fast as forward mode for one probe through fastscore's fused NCSNv2 and faster for several
    probes and for small networks; see ``_auto_mode``). ``create_graph=True`` keeps both results
    differentiable (training objectives such as sliced score matching; reverse mode); otherwise they are
    detached.
    """
    _validate.function(fn, "fn")
    _check_x(x)
    _validate.flag(create_graph, "create_graph")
    if probes is None:
        probes = make_probes(x, n_probes, probe, seed=seed, counter=counter, sample_offset=sample_offset)
    fx, prods = probe_products(fn, x, probes, mode=mode, create_graph=create_graph)
    return fx, prods.mean(dim=0)
