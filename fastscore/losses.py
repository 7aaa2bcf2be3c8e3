"""Score-matching losses of ermongroup/ncsn, ermongroup/ncsnv2 and score_sde (docs/numerics.md#losses).

Conventions: ``x`` is (N, ...) (images (N, C, H, W) or vectors (N, D)); ``anneal_*`` call
``score_fn(x, labels)`` with int64 labels (N,) indexing ``sigmas`` (index 0 = largest sigma);
:func:`sde_dsm` calls ``score_fn(x, t)`` with float times (N,) and expects the score (score_sde's
``get_score_fn`` semantics: any scaling of the network output is already inside ``score_fn``);
:func:`sliced_score_matching` and :func:`exact_score_matching` call ``score_fn(x)``.

Every loss returns the batch mean, or the per-sample losses (N,) with ``reduction="none"``. Random draws
(labels, noise, projections, times) come from torch's generator, the default one or ``generator``, in the
originals' order, so ``torch.manual_seed(s)`` reproduces the original functions' draws bitwise; see each
function for the order. Sliced and exact score matching differentiate through ``score_fn`` twice (the
loss's parameter gradients involve the Jacobian of the score): fastscore's layers support that (their
backward is differentiable), and :func:`fastscore.ops.hutchinson_divergence` does the Jacobian products.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastscore import _validate
from fastscore.ops.hutchinson import exact_divergence
from fastscore.ops.hutchinson import probe_products
from fastscore.sde import check_sde

__all__ = ["anneal_dsm", "sliced_score_matching", "anneal_sliced_score_matching", "exact_score_matching", "sde_dsm"]

_REDUCTIONS = ("mean", "none")
_TARGETS = ("ncsnv2", "ncsn")


# ---- argument checks ------------------------------------------------------------------------------------


def _check_x(x) -> Tensor:
    return _validate.batch(x, "x", min_dim=2, non_empty=True)


def _check_reduction(reduction) -> None:
    _validate.choice(reduction, "reduction", _REDUCTIONS)


def _check_generator(generator, x: Tensor) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")


def _check_particles(n_particles) -> int:
    return _validate.integer(n_particles, "n_particles", low=1)


def _check_sigmas(sigmas, x: Tensor) -> Tensor:
    if not isinstance(sigmas, Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"sigmas: expected a 1-D tensor of noise levels, got {type(sigmas).__name__}") from None
    _validate.floating(sigmas, "sigmas")
    if sigmas.dim() != 1 or sigmas.numel() < 1:
        raise ValueError(
            f"sigmas: expected a non-empty 1-D float tensor of noise levels, got {sigmas.dtype} of shape "
            f"{tuple(sigmas.shape)}"
        )
    return sigmas.to(x.device)


def _labels(labels, sigmas: Tensor, x: Tensor, generator) -> Tensor:
    N, L = x.shape[0], sigmas.shape[0]
    if labels is None:
        return torch.randint(0, L, (N,), device=x.device, generator=generator)
    _validate.tensor(labels, "labels")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels: expected an int64 tensor of noise-level indices, got {labels.dtype}")
    if labels.shape != (N,):
        raise ValueError(f"labels: expected shape ({N},) (one noise-level index per sample), got {tuple(labels.shape)}")
    if labels.device != x.device:
        raise ValueError(f"labels: expected a tensor on x's device {x.device}, got {labels.device}")
    if torch.compiler.is_compiling():  # reading values would break the graph; indexing sigmas still raises
        return labels.long()
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= L:
        raise ValueError(f"labels: expected indices in [0, {L}) (len(sigmas)), got values in [{lo}, {hi}]")
    return labels.long()


def _randn(x: Tensor, generator, shape=None) -> Tensor:
    if generator is None and shape is None:
        return torch.randn_like(x)
    return torch.randn(x.shape if shape is None else shape, dtype=x.dtype, device=x.device, generator=generator)


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1) broadcasting against x."""
    return v.view(x.shape[0], *([1] * (x.dim() - 1)))


def _per_sample_values(v, N: int, x: Tensor) -> Tensor:
    """An SDE coefficient as (N,): a tensor (N,) (score_sde's convention) or a scalar (expanded)."""
    v = torch.as_tensor(v, device=x.device)
    return v.expand(N) if v.dim() == 0 else v.reshape(N)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    return loss.mean(dim=0) if reduction == "mean" else loss


# ---- denoising score matching ---------------------------------------------------------------------------


def anneal_dsm(
    score_fn,
    x: Tensor,
    sigmas,
    labels: Tensor | None = None,
    anneal_power: float = 2.0,
    *,
    target: str = "ncsnv2",
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    hook=None,
) -> Tensor:
    r"""Annealed denoising score matching (ncsnv2 ``anneal_dsm_score_estimation``; ncsn's with ``target="ncsn"``).

    .. math::
        \tilde x = x + \sigma_y z, \quad
        \ell_b = \tfrac12 \big\| s(\tilde x, y) + \tfrac{1}{\sigma_y^2}(\tilde x - x) \big\|^2 \sigma_y^{p}

    with ``p = anneal_power``. ``labels`` (N,) int64 default to ``randint(0, len(sigmas), (N,))`` drawn here;
    then ``z = randn_like(x)`` (ncsnv2's order: labels, then noise), unless ``noise`` (x's shape: the
    standard-normal ``z``) is given. ``target="ncsnv2"`` builds the target from the drawn noise,
    ``-n / sigma^2`` with ``n = sigma z``; ``target="ncsn"`` from the difference ``x_tilde - x`` as
    ermongroup/ncsn does (equal in exact arithmetic; differs by rounding:
    docs/numerics.md#denoising-score-matching). Arithmetic in the originals' order, so with the same draws
    the loss equals the original's bitwise on CPU.

    ``hook(per_sample_loss, labels)`` is called as ncsnv2's ``hook``. Returns the batch mean, or the
    per-sample losses (N,) with ``reduction="none"``.
    """
    _validate.function(score_fn, "score_fn")
    _check_x(x)
    _check_reduction(reduction)
    _check_generator(generator, x)
    _validate.choice(target, "target", _TARGETS)
    _validate.number(anneal_power, "anneal_power")
    if hook is not None and not callable(hook):
        raise TypeError(f"hook: expected a callable (loss, labels) or None, got {type(hook).__name__}")
    sigmas = _check_sigmas(sigmas, x)
    labels = _labels(labels, sigmas, x, generator)
    if noise is None:
        noise = _randn(x, generator)
    elif _validate.tensor(noise, "noise").shape != x.shape:
        raise ValueError(f"noise: expected a tensor of x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")

    used_sigmas = _per_sample(sigmas[labels], x)
    noise = noise * used_sigmas
    perturbed = x + noise
    if target == "ncsnv2":
        tgt = -1 / (used_sigmas**2) * noise
    else:
        tgt = -1 / (used_sigmas**2) * (perturbed - x)
    scores = score_fn(perturbed, labels)
    _validate.check_score(scores, x, "score_fn", exact=False)
    # reshape where the originals write view: a channels_last score cannot be viewed flat.
    tgt = tgt.reshape(tgt.shape[0], -1)
    scores = scores.reshape(scores.shape[0], -1)
    loss = 1 / 2.0 * ((scores - tgt) ** 2).sum(dim=-1) * used_sigmas.reshape(-1) ** anneal_power
    if hook is not None:
        hook(loss, labels)
    return _reduce(loss, reduction)


def sde_dsm(
    score_fn,
    sde,
    x: Tensor,
    *,
    likelihood_weighting: bool = False,
    reduce_mean: bool = True,
    eps: float = 1e-5,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Continuous-time denoising score matching (score_sde ``get_sde_loss_fn``).

    ``t = U[0, 1) (T - eps) + eps`` (N,), then ``z ~ N(0, I)`` (score_sde's order), ``(mean, std) =
    sde.marginal_prob(x, t)``, ``x_t = mean + std z``, ``s = score_fn(x_t, t)``:

    * default: :math:`\ell_b = R[(s\,\sigma_t + z)^2]`;
    * ``likelihood_weighting=True``: :math:`\ell_b = R[(s + z/\sigma_t)^2]\, g(t)^2` with ``g`` from
      ``sde.sde(0, t)`` (the weighting that makes the loss a bound on the negative log-likelihood);

    where ``R`` is the mean over non-batch dimensions when ``reduce_mean`` (score_sde's default), else
    half the sum (the 1/2 appears only then, as in score_sde). ``sde`` needs ``marginal_prob(x, t)``,
    ``sde(x, t)`` and ``T`` (fastscore.sde's VESDE, VPSDE, subVPSDE, or score_sde's own).
    """
    _validate.function(score_fn, "score_fn")
    _check_x(x)
    _check_reduction(reduction)
    _check_generator(generator, x)
    check_sde(sde, needs=("marginal_prob", "sde", "T"))
    eps = _validate.number(eps, "eps", low=0.0)
    if eps >= float(sde.T):
        raise ValueError(f"eps: expected a number in [0, sde.T) = [0, {sde.T}), got {eps!r}")
    N = x.shape[0]
    t = torch.rand(N, device=x.device, generator=generator) * (sde.T - eps) + eps
    if x.dtype != torch.float32:
        t = t.to(x.dtype)
    z = _randn(x, generator)
    mean, std = sde.marginal_prob(x, t)
    std_b = _per_sample(_per_sample_values(std, N, x), x)
    perturbed = mean + std_b * z
    score = score_fn(perturbed, t)
    _validate.check_score(score, x, "score_fn", exact=False)
    if not likelihood_weighting:
        losses = torch.square(score * std_b + z)
    else:
        losses = torch.square(score + z / std_b)
    losses = losses.reshape(N, -1)
    losses = torch.mean(losses, dim=-1) if reduce_mean else 0.5 * torch.sum(losses, dim=-1)
    if likelihood_weighting:
        g = sde.sde(torch.zeros_like(x), t)[1]
        losses = losses * _per_sample_values(g, N, x) ** 2
    return _reduce(losses, reduction)


# ---- sliced and exact score matching ----------------------------------------------------------------------


def _projections(x: Tensor, n_particles: int, generator, *, normalise: bool) -> Tensor:
    """(P, N, ...) Gaussian projections drawn as ncsn draws them for its (P*N, ...) duplicated batch."""
    v = _randn(x, generator, shape=(n_particles * x.shape[0], *x.shape[1:]))
    if normalise:
        flat = v.reshape(v.shape[0], -1)
        v = (flat / torch.norm(flat, dim=-1, keepdim=True)).reshape(v.shape)
    return v.reshape(n_particles, *x.shape)


def _ssm_terms(fn, x: Tensor, v: Tensor, *, variance_reduction: bool) -> tuple[Tensor, Tensor]:
    """Per-sample (loss1, loss2) (N,), averaged over the P projections in v (P, N, ...)."""
    s, vjv = probe_products(fn, x, v, mode="reverse", create_graph=True, _fn_name="score_fn")
    flat = s.reshape(x.shape[0], -1)
    if variance_reduction:
        loss1 = torch.sum(flat * flat, dim=-1) / 2.0
    else:
        sv = (flat.unsqueeze(0) * v.reshape(v.shape[0], x.shape[0], -1)).sum(dim=-1)
        loss1 = (sv**2 * 0.5).mean(dim=0)
    return loss1, vjv.mean(dim=0)


def sliced_score_matching(
    score_fn,
    x: Tensor,
    *,
    n_particles: int = 1,
    variance_reduction: bool = False,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    return_terms: bool = False,
):
    r"""Sliced score matching (ncsn ``sliced_score_estimation`` / ``sliced_score_estimation_vr``).

    With projections :math:`v_1..v_P` per sample (``P = n_particles``) and :math:`s = s(x)`:

    * plain: :math:`v` Gaussian normalised to unit norm, :math:`\ell = \frac1P\sum_p \tfrac12 (v_p^\top s)^2
      + v_p^\top \nabla_x s\, v_p` (an estimate of the Hyvarinen objective divided by D);
    * ``variance_reduction=True`` (SSM-VR): :math:`v` standard Gaussian, the first term replaced by its
      expectation :math:`\tfrac12\|s\|^2`, so :math:`\ell` estimates Hyvarinen's objective itself.

    Draws: ``randn`` of shape (P*N, ...) reshaped particle-major, as ncsn draws for its duplicated batch.
    ``score_fn`` is evaluated once on ``x`` (ncsn evaluates the P-fold duplicated batch; the values are
    the same), the P Jacobian-vector products come from :func:`fastscore.ops.hutchinson_divergence`'s
    machinery with a differentiable graph. Unlike ncsn's plain version (last dimension only:
    docs/numerics.md#sliced-score-matching), every non-batch dimension is one vector, so images work; for
    (N, D) inputs the two agree.
    ``return_terms=True`` returns ``(loss, loss1, loss2)`` as ncsn does.
    """
    _validate.function(score_fn, "score_fn")
    _check_x(x)
    _check_reduction(reduction)
    _check_generator(generator, x)
    P = _check_particles(n_particles)
    v = _projections(x, P, generator, normalise=not variance_reduction)
    loss1, loss2 = _ssm_terms(score_fn, x, v, variance_reduction=bool(variance_reduction))
    loss = loss1 + loss2
    if return_terms:
        return _reduce(loss, reduction), _reduce(loss1, reduction), _reduce(loss2, reduction)
    return _reduce(loss, reduction)


def anneal_sliced_score_matching(
    score_fn,
    x: Tensor,
    sigmas,
    labels: Tensor | None = None,
    n_particles: int = 1,
    *,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Annealed SSM-VR (ncsn ``anneal_sliced_score_estimation_vr``).

    Draws: ``labels`` (when None, ``randint(0, len(sigmas), (N,))``), then ``z`` for
    :math:`\tilde x = x + \sigma_y z`, then Gaussian projections (P*N, ...) (ncsn's comment says Rademacher;
    its code, and this, draw Gaussian). Per sample, :math:`\ell = \sigma_y^2 \cdot \frac1P\sum_p
    (\tfrac12\|s(\tilde x, y)\|^2 + v_p^\top \nabla_x s\, v_p)` (the perturbation is not a target).
    """
    _validate.function(score_fn, "score_fn")
    _check_x(x)
    _check_reduction(reduction)
    _check_generator(generator, x)
    P = _check_particles(n_particles)
    sigmas = _check_sigmas(sigmas, x)
    labels = _labels(labels, sigmas, x, generator)
    used_sigmas = _per_sample(sigmas[labels], x)
    perturbed = x + _randn(x, generator) * used_sigmas
    v = _projections(x, P, generator, normalise=False)
    loss1, loss2 = _ssm_terms(lambda h: score_fn(h, labels), perturbed, v, variance_reduction=True)
    loss = (loss1 + loss2) * (used_sigmas.reshape(-1) ** 2)
    return _reduce(loss, reduction)


def exact_score_matching(score_fn, x: Tensor, *, reduction: str = "mean") -> Tensor:
    r"""Hyvarinen's score matching objective with the exact trace:
    :math:`\ell = \tfrac12\|s(x)\|^2 + \operatorname{tr}\nabla_x s(x)`.

    The trace takes D backward passes (D = number of elements per sample), each differentiable; meant for
    small D (toy data) and as the ground truth for the sliced estimators.
    """
    _validate.function(score_fn, "score_fn")
    _check_x(x)
    _check_reduction(reduction)
    s, div = exact_divergence(score_fn, x, create_graph=True, _fn_name="score_fn")
    flat = s.reshape(x.shape[0], -1)
    loss = torch.sum(flat * flat, dim=-1) / 2.0 + div
    return _reduce(loss, reduction)
