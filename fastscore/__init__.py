"""fastscore: fast layers, samplers and likelihoods for score-based generative models (NCSN, NCSNv2, score SDEs).

Existing NCSN / NCSNv2 code runs faster without changing its numerics: drop-in layers with ermongroup/ncsnv2's
constructor arguments, state_dict keys and results, built on fused kernels (C++ on CPU tensors, CUDA and Triton
on GPUs) with a pure-PyTorch reference next to each; samplers, losses and likelihoods on top of them.

    import fastscore
    model = fastscore.patch(score).eval()  # score: your ncsn / ncsnv2 model, weights loaded; now fused
    x = fastscore.sampling.annealed_langevin(model, x0, model.sigmas, n_steps_each=5, step_lr=6.2e-6, seed=0)

Main entry points:
    fastscore.patch(model)  swap an ncsn / ncsnv2 model's layers for the fused ones, in place
    fastscore.nn            the drop-in layers (ConditionalInstanceNorm2dPlus, CondRefineBlock, ...)
    fastscore.ops           the fused functional ops (cond_instance_norm, crp_pool, elu, langevin_step_, ...),
                            each with its reference <op>_ref; differentiable, torch.compile-able
    fastscore.sampling      langevin, annealed_langevin(_inpainting), pc_sampler, pc_inpaint, pc_colorize,
                            classifier_guidance, ode_sampler, solve (DDIM, Heun, DPM-Solver++(2M), adaptive)
    fastscore.solvers       the few-step solvers; fastscore.parameterisation: eps / x0 / denoiser <-> score
    fastscore.mcmc          mala, hmc: Metropolis-adjusted samplers for energy models (models.EnergyScore)
    fastscore.ode           solve_ivp (adaptive Runge-Kutta on tensors, per sample), ode_sampler
    fastscore.noise         the counter-based normals every sampler draws, and caller-given noise sources
    fastscore.likelihood    log_likelihood, bits_per_dim (the probability-flow ODE)
    fastscore.losses        anneal_dsm, (anneal_)sliced_score_matching, sde_dsm; fastscore.sde: VESDE, VPSDE
    fastscore.models        NCSN, NCSNv2 (+Deeper, Deepest), ScoreMLP, get_model, get_config, load_checkpoint
    fastscore.train         the training loop behind `fastscore train`
    fastscore.distributed   torchrun / torch.distributed: shard sampling and likelihoods, gather on rank 0

Backends: an op runs C++ kernels on CPU tensors and CUDA or Triton kernels on CUDA tensors, else its
reference. fastscore.backends() says which can run here and why not; ``with fastscore.use_backend("ref"):``
(or FASTSCORE_BACKEND=ref) forces one; fastscore.cpu_capability(), fastscore.empty_cache().
Errors: fastscore.BackendUnavailableError (a forced backend cannot run), fastscore.CheckpointError (a
ValueError: an unreadable, corrupt or misfit checkpoint).

Command line: fastscore info (versions and backends, and how to get a missing one), demo, train, sample,
likelihood, bench; fastscore --help.

Documentation: the README (README.md in the source, the project description on the package index) and the
docstrings, e.g. help(fastscore.sampling.annealed_langevin).

The names above load on first use (``import fastscore`` itself imports no torch, so the command line starts fast).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> (module, attribute): loaded on first access, then kept in the module's namespace
_FROM = {
    "backends": ("fastscore._backend", "backends"),
    "cpu_capability": ("fastscore._backend", "cpu_capability"),
    "empty_cache": ("fastscore._backend", "empty_cache"),
    "use_backend": ("fastscore._backend", "use_backend"),
    "BackendUnavailableError": ("fastscore._backend", "BackendUnavailableError"),
    "CheckpointError": ("fastscore.models", "CheckpointError"),
    "patch": ("fastscore.patch", "patch"),
}
_SUBMODULES = (
    "nn",
    "ops",
    "models",
    "sampling",
    "mcmc",
    "solvers",
    "parameterisation",
    "ode",
    "noise",
    "likelihood",
    "losses",
    "sde",
    "train",
    "data",
    "distributed",
)

# The exception classes are public too (above), but not listed here: pydoc would print their inherited methods.
__all__ = [
    "__version__",
    "backends",
    "cpu_capability",
    "empty_cache",
    "use_backend",
    "patch",
    "nn",
    "ops",
    "models",
    "sampling",
    "mcmc",
    "solvers",
    "parameterisation",
    "ode",
    "noise",
    "likelihood",
    "losses",
    "sde",
]

if TYPE_CHECKING:
    from fastscore import data  # noqa: F401  (not in __all__)
    from fastscore import distributed  # noqa: F401  (not in __all__)
    from fastscore import likelihood
    from fastscore import losses
    from fastscore import mcmc
    from fastscore import models
    from fastscore import nn
    from fastscore import noise
    from fastscore import ode
    from fastscore import ops
    from fastscore import parameterisation
    from fastscore import sampling
    from fastscore import sde
    from fastscore import solvers
    from fastscore import train  # noqa: F401  (not in __all__)
    from fastscore._backend import BackendUnavailableError  # noqa: F401  (not in __all__)
    from fastscore._backend import backends
    from fastscore._backend import cpu_capability
    from fastscore._backend import empty_cache
    from fastscore._backend import use_backend
    from fastscore.models import CheckpointError  # noqa: F401  (not in __all__)
    from fastscore.patch import patch


def __getattr__(name: str):
    if name in _FROM:
        module, attribute = _FROM[name]
        value = getattr(importlib.import_module(module), attribute)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FROM) | set(_SUBMODULES))


class _Package(types.ModuleType):
    """fastscore's module type. Importing the submodule fastscore.patch binds it as the package's attribute
    ``patch``, which is the function fastscore.patch.patch: it stays the function."""

    def __setattr__(self, name, value):
        if name == "patch" and isinstance(value, types.ModuleType):
            value = value.patch
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
