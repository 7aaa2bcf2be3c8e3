r"""Energy-based score models: a network that returns one energy per sample, used as a score model.

A score model parameterised as an energy, :math:`s_\theta(x) = -\nabla_x E_\theta(x)`, is a conservative
field (the gradient of a function), and the energy itself gives the Metropolis-Hastings corrections of
:mod:`fastscore.mcmc`. Training is unchanged: :class:`EnergyScore` is a score model, ``model(x, *cond)``
returns the score, differentiable with respect to the parameters (and to ``x`` when ``x`` requires grad), so
denoising and sliced score matching (:mod:`fastscore.losses`) train it as they train any score network --
each loss evaluation then differentiates through a gradient (a double backward).

- :class:`EnergyScore` wraps any energy network ``energy_net(x, *cond) -> (N,)`` (noise-conditional when
  called with labels, as :func:`fastscore.losses.anneal_dsm` calls score models);
- :class:`EnergyHead` turns a score-shaped network (output of x's shape: :class:`~fastscore.models.NCSNv2`,
  :class:`~fastscore.models.ScoreMLP`, ...) into an energy network, and :func:`as_energy` does both, so the
  bundled architectures train as energies:

  .. math::
      E(x, c) = \tfrac12 \| x - f(x, c) \|^2 \quad (\text{form="residual"}), \qquad
      E(x, c) = -\tfrac12 \langle x, f(x, c) \rangle \quad (\text{form="inner"})

  with f the network exactly as it is (NCSNv2 and a ScoreMLP built with ``sigmas`` divide their output by
  :math:`\sigma_y` themselves). The residual form is the auto-encoder energy listed (as "AE based Energy",
  :math:`\tfrac12\|x - f(x)\|^2`) in the energy-parameterised diffusion model of Du et al. 2023, "Reduce,
  Reuse, Recycle: Compositional Generation with Energy-Based Diffusion Models and MCMC" (code:
  github.com/yilundu/reduce_reuse_recycle, ``composable_diffusion/unet.py``, ``Energy_UNetModel_full``, which
  also lists :math:`\tfrac12\|f(x)\|^2`); Salimans & Ho 2021, "Should EBMs model the energy or the score?",
  compare such constrained (energy) models with unconstrained score models of the same structure. On the
  moons data the residual and inner forms of a 3-layer ScoreMLP trained by annealed DSM sample as well as
  the score ScoreMLP (tests/test_energy.py). For :math:`f = 0` the residual energy is
  :math:`\tfrac12|x|^2`, the standard normal's.

The energy of a sample must depend on that sample alone (per-sample normalisation, no batch statistics):
the score is one backward pass of the batch's summed energy.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from fastscore import _validate

__all__ = ["EnergyScore", "EnergyHead", "as_energy", "FORMS"]

FORMS = ("residual", "inner")


def _check_energy(e, x: Tensor, name: str) -> Tensor:
    if not isinstance(e, Tensor):
        raise TypeError(f"{name}: expected it to return a tensor of {x.shape[0]} energies, got {type(e).__name__}")
    if tuple(e.shape) != (x.shape[0],):
        raise ValueError(f"{name}: returned shape {tuple(e.shape)}, expected ({x.shape[0]},) (one energy per sample)")
    if not e.is_floating_point():
        raise TypeError(f"{name}: returned {e.dtype} energies, expected a floating dtype")
    return e


class EnergyScore(nn.Module):
    r"""A score model from an energy network: ``model(x, *cond)`` is :math:`-\nabla_x E(x, *cond)`.

    ``energy_net(x, *cond) -> (N,)``: an ``nn.Module`` (registered as ``energy_net``, so its parameters are
    this module's) or any callable. ``cond``: what the network takes after x (noise-level labels, times).

    - ``forward(x, *cond)`` / :meth:`energy_and_score`: the score by one backward pass of the summed energies.
      In grad mode (training) it is computed with ``create_graph=True``: differentiable with respect to the
      parameters, and to ``x`` itself when ``x`` requires grad (sliced score matching, Hutchinson
      divergences), else with respect to a leaf copy of x. Without grad mode (``torch.no_grad()``, as the
      samplers call score models) grad mode is switched on for the one backward pass and the score returned
      detached. Either way the score has x's shape and dtype and ``.grad`` of the parameters is left alone.
    - :meth:`energy`: the energies alone (N,), as the network returns them.
    """

    def __init__(self, energy_net):
        super().__init__()
        _validate.function(energy_net, "energy_net")
        if isinstance(energy_net, nn.Module):
            self.energy_net = energy_net
        else:
            self._energy_fn = energy_net

    def _net(self):
        return self.energy_net if "energy_net" in self._modules else self._energy_fn

    def energy(self, x: Tensor, *cond) -> Tensor:
        """The energies (N,) of x (N, ...) (under the caller's grad mode)."""
        _validate.batch(x, "x")
        return _check_energy(self._net()(x, *cond), x, "energy_net")

    def energy_and_score(self, x: Tensor, *cond, create_graph: bool | None = None) -> tuple[Tensor, Tensor]:
        r"""``(E, s)``: the energies (N,) and the score :math:`s = -\nabla_x \sum_n E_n` (x's shape and dtype).
        ``create_graph`` (default: whether grad mode is on) keeps both differentiable; without it both are
        returned detached."""
        _validate.batch(x, "x")
        if create_graph is None:
            create_graph = torch.is_grad_enabled()
        _validate.flag(create_graph, "create_graph")
        if create_graph and not torch.is_grad_enabled():
            raise ValueError("create_graph: True needs grad mode (it is off: torch.no_grad() or inference mode)")
        with torch.enable_grad():
            xg = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
            e = _check_energy(self._net()(xg, *cond), x, "energy_net")
            g = None
            if e.requires_grad:
                (g,) = torch.autograd.grad(e.sum(), xg, create_graph=create_graph, allow_unused=True)
        if g is None:  # the energy does not depend on x
            g = torch.zeros_like(x)
        if create_graph:
            return e, -g
        return e.detach(), -g.detach()

    def forward(self, x: Tensor, *cond) -> Tensor:
        return self.energy_and_score(x, *cond)[1]


class EnergyHead(nn.Module):
    r"""An energy network from a network f whose output has x's shape (a score network):

    ``form="residual"`` (default): :math:`E(x, c) = \tfrac12 \|x - f(x, c)\|^2`;
    ``form="inner"``: :math:`E(x, c) = -\tfrac12 \langle x, f(x, c) \rangle`; summed over every non-batch
    dimension, computed in f's output dtype. f is registered as ``net`` and called as it is, so a network that
    divides its output by :math:`\sigma_y` (NCSNv2, ScoreMLP with ``sigmas``) keeps doing so. See the module
    docstring for where the forms come from.
    """

    def __init__(self, net, *, form: str = "residual"):
        super().__init__()
        _validate.function(net, "net")
        self.form = _validate.choice(form, "form", FORMS)
        if isinstance(net, nn.Module):
            self.net = net
        else:
            self._net_fn = net

    def extra_repr(self) -> str:
        return f"form={self.form!r}"

    def forward(self, x: Tensor, *cond) -> Tensor:
        net = self.net if "net" in self._modules else self._net_fn
        f = net(x, *cond)
        if not isinstance(f, Tensor) or f.shape != x.shape:
            got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"net: returned {got}, expected x's shape {tuple(x.shape)} (a score-shaped output)")
        if self.form == "residual":
            return 0.5 * (x - f).square().flatten(1).sum(1)
        return -0.5 * (x * f).flatten(1).sum(1)


def as_energy(net, *, form: str = "residual") -> EnergyScore:
    """A score-shaped network (NCSN, NCSNv2, ScoreMLP, ...) as an energy-based score model:
    ``EnergyScore(EnergyHead(net, form=form))``. Train it with the usual losses; sample it with the usual
    samplers, or with :func:`fastscore.mcmc.mala` / :func:`fastscore.mcmc.hmc` on its ``energy``."""
    return EnergyScore(EnergyHead(net, form=form))
