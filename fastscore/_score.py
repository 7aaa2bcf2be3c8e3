"""The check every sampler and estimator applies to what a score function returns.

A score function must return a tensor of exactly its input's shape, dtype and device: a score of another
shape would broadcast silently in the samplers' and solvers' arithmetic (``lambda x, t: -x[:, :1]`` gives a
plausible-looking but wrong likelihood), and another dtype or device would be converted silently on every
step. The samplers (fastscore.sampling), the probability-flow ODE sampler (fastscore.ode) and the
likelihood (fastscore.likelihood) all call :func:`check_score`, so the same mistake gives the same error
everywhere. Only metadata is read: no device synchronisation, and it works on tensors that carry autograd
history or forward-mode tangents.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_score", "checked_score_fn"]


def check_score(out, x: Tensor) -> Tensor:
    """``out`` (what ``score_fn`` returned for ``x``) checked to be a tensor of x's shape, dtype and device;
    returns it unchanged. TypeError for a non-tensor or another dtype / device, ValueError for another
    shape; every message names ``score_fn``."""
    if not isinstance(out, Tensor):
        raise TypeError(f"score_fn: expected it to return a tensor, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"score_fn: returned shape {tuple(out.shape)}, expected x's shape {tuple(x.shape)}")
    if out.dtype != x.dtype or out.device != x.device:
        raise TypeError(f"score_fn: returned {out.dtype} on {out.device}, expected x's dtype {x.dtype} on {x.device}")
    return out


def checked_score_fn(score_fn):
    """``score_fn(x, t)`` wrapped so that every output goes through :func:`check_score`."""

    def checked(x, t):
        return check_score(score_fn(x, t), x)

    return checked
