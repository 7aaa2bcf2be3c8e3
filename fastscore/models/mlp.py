"""A toy score network for low-dimensional data: :class:`ScoreMLP`, forward ``(x, labels_or_t)``.

The unconditional default is ermongroup/ncsn's toy network (``runners/toy_runner.py``: D -> 128 ->
Softplus -> 128 -> Softplus -> D, trained with sliced score matching on the 2-D mixture). Conditioning on
the noise level, for annealed DSM / SSM and score-SDE training, comes in three forms:

* ``n_classes=L``: integer labels (N,) index a learned per-level embedding that is added to every hidden
  pre-activation (the toy analogue of NCSN's conditional normalisation, where the level enters only
  through per-label parameters).
* ``sigmas=(L,)``: ncsnv2's trick (docs/numerics.md#input-scaling-and-the-noise-level): the output is
  divided by ``sigmas[labels]``, so the network only has to learn ``sigma * score``, whose scale is the same
  at every level. Combine it with ``n_classes`` for a network that both sees the level and is rescaled by it
  (ncsnv2's own NCSNv2 is unconditional and only rescales).
* ``time_embedding=True``: a float ``t`` (N,) in [0, 1] enters through fixed sinusoidal features of ``t`` at
  log-spaced frequencies, followed by a learned linear map added to every hidden pre-activation. For a
  score-SDE model, dividing the output by the marginal std (score_sde's ``scale_by_sigma``) is left to the
  caller: ``score_fn = lambda x, t: net(x, t) / sde.marginal_prob(x, t)[1][:, None]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastscore import _validate

__all__ = ["ScoreMLP"]

_ACTS = {"softplus": F.softplus, "elu": F.elu, "relu": F.relu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}


def _positive_int(v, name: str) -> int:
    return _validate.integer(v, name, low=1)


class ScoreMLP(nn.Module):
    """Toy score network ``s(x, labels_or_t)`` on (N, D) inputs; see the module docstring for conditioning.

    Args:
        dim: data dimension D.
        hidden: width of the hidden layers (128 as ncsn's toy network).
        n_layers: number of hidden layers (2 as ncsn's toy network).
        n_classes: number of noise levels L for integer-label conditioning (learned per-level embedding).
        sigmas: (L,) noise levels; when given, the output is divided by ``sigmas[labels]`` (ncsnv2). Stored
            as a float32 buffer named ``sigmas``.
        time_embedding: condition on a float time ``t`` (N,) (score SDEs). Exclusive with labels.
        n_frequencies: sinusoidal features per sin/cos for the time embedding.
        act: ``"softplus"`` (ncsn's toy default), ``"elu"``, ``"relu"``, ``"silu"``/``"swish"``, ``"tanh"``.

    ``forward(x, labels_or_t=None)``: ``x`` (N, D) float; ``labels_or_t`` an int64 (N,) tensor of level
    indices (index 0 = largest sigma) for a label-conditioned network, a float (N,) tensor of times for a
    time-conditioned one, or ``None`` for an unconditional one. Returns (N, D).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        n_layers: int = 2,
        *,
        n_classes: int | None = None,
        sigmas=None,
        time_embedding: bool = False,
        n_frequencies: int = 16,
        act: str = "softplus",
    ):
        super().__init__()
        self.dim = _positive_int(dim, "dim")
        self.hidden = _positive_int(hidden, "hidden")
        self.n_layers = _positive_int(n_layers, "n_layers")
        _validate.choice(act, "act", tuple(_ACTS))
        self.act_name = act
        self._act = _ACTS[act]
        if sigmas is not None:
            # an explicit device: under a default-device context (e.g. counting parameters on "meta") the
            # levels stay real numbers that can be checked
            device = sigmas.device if isinstance(sigmas, Tensor) else "cpu"
            sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=device).detach().clone()
            if sigmas.dim() != 1 or sigmas.numel() < 1 or not bool((sigmas > 0).all()):
                raise ValueError(f"sigmas: expected a 1-D sequence of positive noise levels, got {tuple(sigmas.shape)}")
            if n_classes is not None and _positive_int(n_classes, "n_classes") != sigmas.numel():
                raise ValueError(f"n_classes: {n_classes} does not match len(sigmas) = {sigmas.numel()}")
        if n_classes is not None:
            _positive_int(n_classes, "n_classes")
        if time_embedding and (n_classes is not None or sigmas is not None):
            raise ValueError("time_embedding: condition on labels (n_classes/sigmas) or on time, not both")
        self.n_classes = n_classes
        self.time_embedding = bool(time_embedding)

        sizes = [self.dim] + [self.hidden] * self.n_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(self.hidden, self.dim)
        # One embedding row per level holds the additive shift of every hidden layer (n_layers * hidden).
        self.embed = nn.Embedding(n_classes, self.n_layers * self.hidden) if n_classes is not None else None
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)
        if sigmas is not None:
            self.register_buffer("sigmas", sigmas)
        else:
            self.sigmas = None
        if self.time_embedding:
            n_frequencies = _positive_int(n_frequencies, "n_frequencies")
            # Frequencies 1 .. 1000 (log-spaced) resolve t in [1e-5, 1] from coarse to fine.
            freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), n_frequencies))
            self.register_buffer("freqs", freqs)
            self.time_proj = nn.Linear(2 * n_frequencies, self.n_layers * self.hidden)
        else:
            self.freqs = None
            self.time_proj = None

    @property
    def conditioning(self) -> str:
        if self.time_embedding:
            return "time"
        if self.embed is not None or self.sigmas is not None:
            return "labels"
        return "none"

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, n_layers={self.n_layers}, conditioning={self.conditioning!r}, "
            f"act={self.act_name!r}"
        )

    def _shifts(self, x: Tensor, cond) -> tuple[Tensor | None, Tensor | None]:
        """(per-layer additive shifts (N, n_layers * hidden) or None, per-sample divisor (N, 1) or None)."""
        N = x.shape[0]
        kind = self.conditioning
        if kind == "none":
            if cond is not None:
                raise ValueError(
                    "labels_or_t: this ScoreMLP is unconditional; pass None (or build it with "
                    "n_classes/sigmas/time_embedding)"
                )
            return None, None
        want = "int64 noise-level indices" if kind == "labels" else "float times"
        if not isinstance(cond, Tensor):
            raise TypeError(f"labels_or_t: expected a ({N},) tensor of {want}, got {type(cond).__name__}")
        if cond.dim() != 1 or cond.shape[0] != N:
            raise ValueError(f"labels_or_t: expected a ({N},) tensor of {want}, got shape {tuple(cond.shape)}")
        if cond.device != x.device:
            raise ValueError(f"labels_or_t: expected a tensor on x's device {x.device}, got {cond.device}")
        if kind == "labels":
            if cond.dtype not in (torch.int64, torch.int32):
                raise TypeError(
                    f"labels_or_t: this ScoreMLP is conditioned on noise-level labels; expected int64, got {cond.dtype}"
                )
            shift = self.embed(cond) if self.embed is not None else None
            div = self.sigmas[cond].to(x.dtype).unsqueeze(1) if self.sigmas is not None else None
            return shift, div
        if not cond.is_floating_point():
            raise TypeError(
                f"labels_or_t: this ScoreMLP is conditioned on time; expected float times, got {cond.dtype}"
            )
        arg = cond.to(x.dtype).unsqueeze(1) * self.freqs.to(x.dtype)
        return self.time_proj(torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)), None

    def forward(self, x: Tensor, labels_or_t: Tensor | None = None) -> Tensor:
        _validate.floating(_validate.tensor(x, "x"), "x")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x: expected a float (N, {self.dim}) tensor, got shape {tuple(x.shape)}")
        shift, div = self._shifts(x, labels_or_t)
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if shift is not None:
                h = h + shift[:, i * self.hidden : (i + 1) * self.hidden]
            h = self._act(h)
        out = self.out(h)
        return out / div if div is not None else out
