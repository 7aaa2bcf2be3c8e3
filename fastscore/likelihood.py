r"""Exact likelihood of data under the probability-flow ODE of a score SDE (score_sde's ``likelihood.py``), and
bits per dimension.

The probability-flow ODE :math:`dx/dt = \tilde f(x, t) = f(x, t) - \tfrac12 g(t)^2 s(x, t)` maps the data at
``t = eps`` to a latent :math:`z = x(T)` under the prior, and by the instantaneous change of variables

.. math::
    \log p_\epsilon(x) = \log p_T(z) + \int_\epsilon^T \operatorname{div}_x \tilde f(x(t), t)\,dt .

The ODE state per sample is ``[x (D values), one running integral of the divergence per probe]``, integrated
from ``eps`` to ``T`` with fastscore's adaptive Runge-Kutta (fastscore.ode.solve_ivp: scipy's RK45 on the
tensors' device, per-sample error control, finished samples leave the batch). Each right-hand side
evaluates the network ONCE for both the drift and the divergence estimate
(:func:`fastscore.ops.hutchinson.probe_products`: forward-mode dual passes, or one recorded forward and a
vector-Jacobian product per probe), where score_sde evaluates it twice and copies through NumPy.

The divergence is Hutchinson's estimate :math:`v^\top \nabla_x \tilde f\, v` with probes drawn ONCE per call
and kept along the whole trajectory (as score_sde: the ODE must be a fixed smooth function for the adaptive
solver), from the counter-based generator keyed by ``(seed, sample index)``, so a sample's probes -- and
its log-likelihood -- do not depend on the batch it is in. With ``n_probes = P > 1`` each probe's integral
is carried separately: the result is their mean and the standard error over probes is the error bar
(``return_info=True``). ``probe="exact"`` uses the exact trace (D vector-Jacobian products per evaluation:
small D only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastscore import _validate
from fastscore import sde as sde_lib
from fastscore.ode import NonFiniteWatch
from fastscore.ode import integrate_probability_flow
from fastscore.ode import probability_flow_drift
from fastscore.ops.hutchinson import exact_divergence
from fastscore.ops.hutchinson import make_probes
from fastscore.ops.hutchinson import probe_products

__all__ = ["log_likelihood", "LikelihoodInfo", "bits_per_dim", "dequantization_offset"]

PROBES = ("rademacher", "gaussian", "exact")


@dataclass
class LikelihoodInfo:
    """What ``log_likelihood(..., return_info=True)`` returns next to the log-likelihoods (all per sample).

    ``stderr`` (N,): standard error of the log-likelihood over the probes (std over the P per-probe results
    / sqrt(P)); 0 with ``probe="exact"``, NaN with a single probe (no spread to measure: use ``n_probes >=
    2`` for an error bar). ``logp_per_probe`` (N, P): the per-probe results. ``prior_logp`` (N,) and
    ``delta_logp`` (N,): the two terms of the log-likelihood. ``z``: the latent x(T), x's shape. ``nfe``:
    right-hand-side evaluations (network evaluations; score_sde's ``nfev``), ``nfe_per_sample`` (N,),
    ``sample_evals``: single-sample evaluations done (the work)."""

    stderr: Tensor
    logp_per_probe: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    z: Tensor
    nfe: int
    nfe_per_sample: Tensor
    sample_evals: int


def log_likelihood(
    score_fn,
    sde,
    x: Tensor,
    *,
    n_probes: int = 1,
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-5,
    seed: int | None = None,
    method: str = "RK45",
    per_sample: bool = True,
    mode: str = "auto",
    state_dtype: torch.dtype = torch.float64,
    progress: bool = False,
    return_info: bool = False,
    sample_offset: int = 0,
):
    r"""Log-likelihood in nats of each sample of ``x`` (N, ...) under the probability-flow ODE of ``sde``
    driven by ``score_fn(x, t)`` (see the module docstring); returns a float64 tensor (N,).

    ``x`` is in the model's data range (score_sde's scaler applied). ``probe``: ``"rademacher"`` (default, as
    score_sde), ``"gaussian"`` or ``"exact"`` (the exact trace, D products per evaluation); ``n_probes`` probes
    (ignored for ``"exact"``), drawn from the counter-based generator with ``seed`` (``None``: a seed from
    torch's default generator). ``rtol``/``atol``/``method``: the adaptive Runge-Kutta's (scipy's meaning);
    ``per_sample=False`` gives score_sde's joint error control over the batch. ``eps``: the start time
    (score_sde's 1e-5). ``mode``: how the divergence products are taken (``"auto"``, ``"forward"``,
    ``"reverse"``: :func:`fastscore.ops.hutchinson.probe_products`). ``score_fn`` sees x in x's dtype and t
    (B,) in x's dtype, for the B samples still being integrated; the state is integrated in ``state_dtype``.

    ``score_fn`` must return x's shape, dtype and device (else an error naming it, as every sampler). ``x``
    must be finite (ValueError); a NaN or Inf that appears during the integration stops it within that
    step with a :class:`fastscore.ode.NonFiniteError` (a RuntimeError) saying whether ``score_fn``'s output
    or the divergence estimate held it, at which times, for which samples.

    With ``return_info=True`` returns ``(logp, LikelihoodInfo)``: nfe and the probes' standard error.
    Convert to bits per dimension with :func:`bits_per_dim`.

    ``sample_offset``: the global index of ``x``'s first sample, which keys its probes (a shard of a larger
    batch gets the probes, hence the results, those samples get in the whole batch; see
    :mod:`fastscore.distributed`).
    """
    _validate.function(score_fn, "score_fn")
    sde = sde_lib.check_sde(sde)
    _validate.batch(x, "x", min_dim=2, non_empty=True)
    _validate.finite(x, "x")
    probe = _validate.choice(probe, "probe", PROBES)
    n_probes = _validate.integer(n_probes, "n_probes", low=1)
    eps = sde_lib.sampling_eps(sde, eps)
    _validate.seed(seed)
    sample_offset = _validate.integer(sample_offset, "sample_offset", 0)
    for name, v in (("per_sample", per_sample), ("progress", progress), ("return_info", return_info)):
        _validate.flag(v, name)
    _validate.float_dtype(state_dtype, "state_dtype")

    N, shape, dtype = x.shape[0], tuple(x.shape[1:]), x.dtype
    D = math.prod(shape)
    exact = probe == "exact"
    P = 1 if exact else int(n_probes)
    # (P, N, ...) probes for the whole batch, drawn once; each evaluation gathers the active samples' rows.
    probes = None if exact else make_probes(x.detach(), P, probe, seed=seed, sample_offset=sample_offset)
    watch = NonFiniteWatch(N, x.device)

    def rhs(t: Tensor, y: Tensor, index: Tensor) -> Tensor:
        B = y.shape[0]
        xs = y[:, :D].reshape((B,) + shape).to(dtype)
        drift = probability_flow_drift(sde, watch.score_fn(score_fn, index), t.to(dtype), xs)

        if exact:
            fx, div = exact_divergence(drift, xs)
            div = div[:, None]
        else:
            fx, div = probe_products(drift, xs, probes[:, index], mode=mode)
            div = div.t()
        watch.note("divergence", div, index)
        return torch.cat([fx.detach().reshape(B, D).to(y.dtype), div.detach().to(y.dtype)], dim=1)

    start = torch.cat([x.detach().reshape(N, D).to(state_dtype), x.new_zeros((N, P), dtype=state_dtype)], dim=1)
    res = integrate_probability_flow(
        rhs,
        (eps, sde.T),
        start,
        watch,
        "log_likelihood",
        rtol=rtol,
        atol=atol,
        method=method,
        per_sample=per_sample,
        progress=progress,
    )
    z = res.y[:, :D].reshape(x.shape)
    delta = res.y[:, D:]  # (N, P)
    prior = sde.prior_logp(z).to(torch.float64)
    per_probe = prior[:, None] + delta.to(torch.float64)
    logp = per_probe.mean(dim=1)
    if not return_info:
        return logp
    if exact:
        stderr = torch.zeros_like(logp)
    elif P == 1:
        stderr = torch.full_like(logp, math.nan)
    else:
        stderr = per_probe.std(dim=1) / math.sqrt(P)
    info = LikelihoodInfo(
        stderr=stderr,
        logp_per_probe=per_probe,
        prior_logp=prior,
        delta_logp=delta.to(torch.float64).mean(dim=1),
        z=z.to(dtype),
        nfe=res.nfe,
        nfe_per_sample=res.nfe_per_sample,
        sample_evals=res.sample_evals,
    )
    return logp, info


def dequantization_offset(low: float = 0.0, high: float = 1.0, n_bits: int = 8) -> float:
    r"""The bits-per-dimension offset for data with ``2**n_bits`` levels mapped onto ``[low, high]``:
    :math:`n_{bits} - \log_2(high - low)`.

    A density on ``[low, high]`` assigns a dequantisation bin of width :math:`(high - low) / 2^{n_{bits}}`
    the probability :math:`p \cdot` width, so the discrete log-likelihood in bits per dimension is
    ``-log2 p / D + offset``. score_sde's ``offset = 7 - inverse_scaler(-1)``: 8 for data in [0, 1]
    (``centered=False``), 7 for data in [-1, 1] (``centered=True``)."""
    low = _validate.number(low, "low")
    high = _validate.number(high, "high")
    if high <= low:
        raise ValueError(f"high: expected a value above low={low}, got {high}")
    n_bits = _validate.integer(n_bits, "n_bits", low=1)
    return n_bits - math.log2(high - low)


def bits_per_dim(logp: Tensor, x, offset: float) -> Tensor:
    r"""Bits per dimension ``-logp / (D ln 2) + offset`` (score_sde's formula) for log-likelihoods ``logp``
    (N,) in nats of samples of ``x`` (the data batch (N, ...), or its per-sample shape, giving D).

    ``offset`` must be given: it converts a density on the model's data range into the probability of the
    256 integer levels the data came from, :func:`dequantization_offset` -- 8 for data scaled to [0, 1], 7
    for [-1, 1] (score_sde: ``7 - inverse_scaler(-1)``). It is meaningful for uniformly dequantised data
    (score_sde evaluates on ``(U + 255 x) / 256``); on the raw quantised values the density is unbounded and
    the result can be negative. ``offset=0`` gives plain bits per dimension of the continuous density.
    """
    if not isinstance(logp, Tensor) or not logp.is_floating_point() or logp.dim() != 1:
        raise TypeError(f"logp: expected a floating tensor of shape (N,), got {logp!r:.60}")
    if isinstance(x, Tensor):
        if x.dim() < 2 or x.shape[0] != logp.shape[0]:
            raise ValueError(
                f"x: expected the data batch ({logp.shape[0]}, ...) matching logp, got shape {tuple(x.shape)}"
            )
        D = x[0].numel()
    else:
        try:
            D = math.prod(int(s) for s in x)
        except TypeError:
            raise TypeError(f"x: expected the data batch or its per-sample shape, got {type(x).__name__}") from None
    if D < 1:
        raise ValueError("x: expected at least one dimension per sample")
    offset = _validate.number(offset, "offset")
    return -logp / (D * math.log(2.0)) + offset
