"""k-diffusion's samplers for the solver tests and bench: the installed package's own code when it is there,
else a transcription of its published algorithms.

k-diffusion (pip name ``k-diffusion``, module ``k_diffusion``) is a test-only comparison and is not in
fastscore's ``test`` extra: its requirements include torch and torchvision, so ``pip install k-diffusion``
would bring a second torch build, and its package ``__init__`` imports its training code (torchvision,
kornia, ...). Install it without its requirements (``pip install --no-deps k-diffusion``, plus ``scipy``,
``tqdm``): :func:`load` then loads ``k_diffusion/sampling.py`` and ``k_diffusion/external.py`` as files, in a
private package whose ``utils`` is the one helper they use (``append_dims``), with ``torchdiffeq`` and
``torchsde`` (imported at the top of sampling.py, used by samplers not compared here) stubbed when missing.
The package is found with ``importlib.util.find_spec``, which does not run its ``__init__``.

Without k-diffusion, :class:`Transcription` stands in: ``get_sigmas_karras``, ``get_ancestral_step``,
``to_d``, ``sample_euler``, ``sample_euler_ancestral``, ``sample_heun``, ``sample_dpmpp_2m`` and
``DiscreteEpsDDPMDenoiser``, written from k-diffusion 0.1.1's algorithms (Karras et al. 2022, Algorithm 1
and 2 without churn; Lu et al. 2022, DPM-Solver++(2M)) with its order of operations, and checked against
the real module whenever it is installed (tests/test_solvers.py).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import torch

_PACKAGE = "_fastscore_kdiffusion"
_loaded: dict[str, object] = {}


def append_dims(x, target_dims):
    """k_diffusion.utils.append_dims: x with singleton dims appended up to target_dims dims."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _exec(name: str, path: pathlib.Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def installed() -> tuple[types.ModuleType, types.ModuleType] | None:
    """(sampling, external) of the installed k-diffusion, loaded as files; None when it is not installed."""
    if "modules" in _loaded:
        return _loaded["modules"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        _loaded["modules"] = None
        return None
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    package = _stub(_PACKAGE, __path__=[str(folder)])
    sys.modules[_PACKAGE] = package
    sys.modules[f"{_PACKAGE}.utils"] = package.utils = _stub(f"{_PACKAGE}.utils", append_dims=append_dims)
    stubbed = []
    for name, attrs in (("torchdiffeq", {"odeint": None}), ("torchsde", {"BrownianTree": None})):
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = _stub(name, **attrs)
            stubbed.append(name)
    try:
        sampling = _exec(f"{_PACKAGE}.sampling", folder / "sampling.py")
        package.sampling = sampling
        external = _exec(f"{_PACKAGE}.external", folder / "external.py")
    finally:
        for name in stubbed:
            del sys.modules[name]
    _loaded["modules"] = (sampling, external)
    return _loaded["modules"]


# ---- the transcription ----------------------------------------------------------------------------------------


class Transcription:
    """k-diffusion 0.1.1's sampler functions used here, with their signatures and arithmetic."""

    @staticmethod
    def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
        ramp = torch.linspace(0, 1, n)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (hi + ramp * (lo - hi)) ** rho
        return torch.cat([sigmas, sigmas.new_zeros([1])]).to(device)

    @staticmethod
    def to_d(x, sigma, denoised):
        return (x - denoised) / append_dims(sigma, x.ndim)

    @staticmethod
    def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
        if not eta:
            return sigma_to, 0.0
        up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
        return (sigma_to**2 - up**2) ** 0.5, up

    @classmethod
    def sample_euler(cls, model, x, sigmas, extra_args=None, callback=None, disable=None):
        ones = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            torch.randn_like(x)  # drawn every step for the churn, which is off here (k-diffusion draws it too)
            denoised = model(x, sigmas[i] * ones)
            x = x + cls.to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        return x

    @classmethod
    def sample_euler_ancestral(cls, model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                               s_noise=1.0, noise_sampler=None):  # fmt: skip
        noise_sampler = (lambda s, s_next: torch.randn_like(x)) if noise_sampler is None else noise_sampler
        ones = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * ones)
            down, up = cls.get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
            x = x + cls.to_d(x, sigmas[i], denoised) * (down - sigmas[i])
            if sigmas[i + 1] > 0:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * up
        return x

    @classmethod
    def sample_heun(cls, model, x, sigmas, extra_args=None, callback=None, disable=None):
        ones = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            torch.randn_like(x)  # the churn's draw, as k-diffusion
            denoised = model(x, sigmas[i] * ones)
            d = cls.to_d(x, sigmas[i], denoised)
            dt = sigmas[i + 1] - sigmas[i]
            if sigmas[i + 1] == 0:
                x = x + d * dt
            else:
                x_2 = x + d * dt
                d_2 = cls.to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * ones))
                x = x + (d + d_2) / 2 * dt
        return x

    @staticmethod
    def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
        ones = x.new_ones([x.shape[0]])
        old = None
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * ones)
            t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
            h = t_next - t
            if old is None or sigmas[i + 1] == 0:
                x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised
            else:
                r = (t - (-sigmas[i - 1].log())) / h
                mixed = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
                x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * mixed
            old = denoised
        return x

    class DiscreteEpsDDPMDenoiser(torch.nn.Module):
        """k-diffusion's wrapper of a discrete DDPM eps model: D(x, sigma) = x - sigma eps(x / sqrt(sigma^2 + 1),
        t(sigma)), t(sigma) the fractional step (log-sigma interpolation in the table of the alphas_cumprod)."""

        def __init__(self, model, alphas_cumprod, quantize):
            super().__init__()
            self.inner_model, self.quantize = model, quantize
            self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
            self.log_sigmas = self.sigmas.log()

        def sigma_to_t(self, sigma):
            log_sigma = sigma.log()
            dists = log_sigma - self.log_sigmas[:, None]
            if self.quantize:
                return dists.abs().argmin(dim=0).view(sigma.shape)
            low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
            lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
            w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
            return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

        def forward(self, x, sigma):
            c_out = append_dims(-sigma, x.ndim)
            c_in = append_dims(1 / (sigma**2 + 1) ** 0.5, x.ndim)
            return x + self.inner_model(x * c_in, self.sigma_to_t(sigma)) * c_out


def load() -> tuple[object, object, str]:
    """(sampling, external, where): k-diffusion's modules (``where`` = "k-diffusion <version>") or the
    transcription (``where`` = "transcription")."""
    modules = installed()
    if modules is None:
        return Transcription, Transcription, "transcription"
    try:
        from importlib.metadata import version

        where = f"k-diffusion {version('k-diffusion')}"
    except Exception:  # noqa: BLE001  (metadata missing: still the package's files)
        where = "k-diffusion"
    return modules[0], modules[1], where


__all__ = ["load", "installed", "Transcription", "append_dims"]
