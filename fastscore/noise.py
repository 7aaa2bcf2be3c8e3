r"""The noise the samplers draw: the counter-based generator, its reserved streams, and caller-given sources.

Every normal a fastscore sampler uses is, by default, :func:`fastscore.ops.counter_randn`'s: element i of
global sample n under a key (seed, counter) -- Philox4x32-10, the same bits on every backend, and a sample's
noise independent of the batch it is drawn in. A sampler's update k uses ``counter = k``; the draws that are
not updates use counters far above any step count, so they never meet an update's noise:

- :data:`PRIOR_COUNTER` (2^62): the prior draw :math:`x_T` (:func:`prior`), shared by the PC and ODE
  samplers, so one seed starts both from the same batch;
- :data:`KNOWN_COUNTER` (2^62 + 2^61) + j: draw j of the perturbed known data in the inpainting samplers.

A caller may give the normals instead (the samplers' ``noise=``): a ``torch.Generator``, drawn exactly as
the original repositories draw (``torch.randn_like(x, generator=...)``), or a callable
``noise(shape, dtype, device) -> Tensor``: :class:`NoiseSource`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastscore import _validate
from fastscore.ops.langevin_step import counter_randn
from fastscore.ops.langevin_step import noise_key

__all__ = ["PRIOR_COUNTER", "KNOWN_COUNTER", "NoiseSource", "source", "chain_key", "prior", "counter_randn"]

PRIOR_COUNTER = 1 << 62
KNOWN_COUNTER = 1 << 62 | 1 << 61


class NoiseSource:
    """Standard normals from a source the caller gives (``noise=``) instead of the counter-based generator:
    a ``torch.Generator``, drawn as ``torch.randn_like(x, generator=...)`` draws, or a callable
    ``noise(shape, dtype, device) -> Tensor``."""

    def __init__(self, source):
        if isinstance(source, torch.Generator):
            self.gen, self.fn = source, None
        elif callable(source):
            self.gen, self.fn = None, source
        else:
            raise TypeError(
                "noise: expected None, a torch.Generator or a callable noise(shape, dtype, device) -> Tensor, "
                f"got {type(source).__name__}"
            )

    def _call(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        z = self.fn(shape, dtype, device)
        if not isinstance(z, Tensor):
            raise TypeError(f"noise: expected the callable to return a tensor, got {type(z).__name__}")
        if tuple(z.shape) != shape or z.dtype != dtype or z.device != device:
            raise ValueError(
                f"noise: the callable returned shape {tuple(z.shape)}, {z.dtype} on {z.device}; expected shape "
                f"{shape}, {dtype} on {device}"
            )
        return z.detach()

    def fill(self, buf: Tensor) -> Tensor:
        """Fresh normals of buf's shape, dtype, device and layout: buf refilled (a generator: exactly
        ``torch.randn_like(buf, generator=...)``), or the callable's tensor (copied into buf when its layout
        is not buf's)."""
        if self.gen is not None:
            if self.gen.device == buf.device:
                return buf.normal_(generator=self.gen)
            return buf.copy_(torch.randn_like(buf, device=self.gen.device, generator=self.gen))
        z = self._call(tuple(buf.shape), buf.dtype, buf.device)
        return z if z.stride() == buf.stride() else buf.copy_(z)

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        """A new tensor of normals (contiguous), as ``torch.randn(shape, generator=...)`` draws them."""
        device = torch.device(device if device is not None else "cpu")
        if self.gen is not None:
            return torch.randn(shape, generator=self.gen, dtype=dtype, device=self.gen.device).to(device)
        return self._call(tuple(shape), dtype, device)


def source(noise) -> NoiseSource | None:
    """A sampler's ``noise=`` argument: None (the counter-based generator) or a :class:`NoiseSource`."""
    return None if noise is None else NoiseSource(noise)


def chain_key(seed, sample_offset, shape, given: NoiseSource | None = None) -> tuple[int, int]:
    """(seed, sample_offset) of a chain of the given batch shape, checked as the ops check them; a seed is
    drawn from torch's default generator when None, unless the noise comes from ``given`` (then the seed is
    unused, and drawing it would move torch's default generator: it is 0)."""
    N, D = shape[0], math.prod(shape[1:])
    seed, _, sample_offset = noise_key(seed, 0, sample_offset, N, D, draw=given is None)
    return seed, sample_offset


def prior(sde, shape, *, seed, sample_offset: int = 0, given: NoiseSource | None = None, dtype, device) -> Tensor:
    """The prior draw :math:`x_T`: ``sde.prior_std`` times standard normals of ``shape`` in ``dtype`` on
    ``device`` -- :func:`counter_randn` of ``(seed, PRIOR_COUNTER)`` at global sample index ``sample_offset + n``
    (``seed=None`` draws one), or ``given``'s draw (score_sde's ``prior_sampling`` draws
    ``torch.randn(shape)`` from its generator)."""
    shape = _validate.shape(shape)
    if given is not None:
        return given.draw(shape, dtype, device) * sde.prior_std  # not in place: the tensor may be the caller's
    device = device if device is not None else "cpu"
    z = counter_randn(shape, seed=seed, counter=PRIOR_COUNTER, sample_offset=sample_offset, dtype=dtype, device=device)
    return z.mul_(sde.prior_std)
