"""InstanceNorm++ + ELU (ncsnv2's norm -> act chain) on float32: eager vs torch.compile vs fastscore.

Providers: "eager" (ncsnv2's ConditionalInstanceNorm2dPlus forward followed by nn.ELU, as the
residual blocks run it), "compile" (torch.compile of that), "fastscore" (the fused op on the
selected backend: cpp on CPU), "fastscore_out" (writing into a preallocated output: no page faults),
on a GPU also the forced "triton" and "cuda" backends, and "copy" (x into a preallocated tensor:
the floor). Forward runs under no_grad; forward+backward returns the gradients of every input.

    pytest bench/bench_cond_instance_norm.py --benchmark-only     # pytest-benchmark, grouped by case
    fastscore bench cond_instance_norm [--quick]                   # the ratio table
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastscore
from fastscore.ops import cond_instance_norm

try:  # run as part of the installed package (fastscore bench) or by pytest from the source tree
    from fastscore._bench import _harness
except ImportError:  # pragma: no cover
    import _harness

OP = "cond_instance_norm"
SHAPES = [(64, 128, 32, 32), (128, 64, 16, 16), (16, 256, 8, 8)]
QUICK_SHAPES = SHAPES[:1]


def ncsnv2_norm_elu(x, gamma, alpha, beta):
    """ncsnv2 models/normalization.py ConditionalInstanceNorm2dPlus.forward (rows gathered), then ELU."""
    C = x.shape[1]
    means = torch.mean(x, dim=(2, 3))
    m = torch.mean(means, dim=-1, keepdim=True)
    v = torch.var(means, dim=-1, keepdim=True)
    means = (means - m) / torch.sqrt(v + 1e-5)
    h = F.instance_norm(x, eps=1e-5)
    h = h + means[..., None, None] * alpha[..., None, None]
    out = gamma.view(-1, C, 1, 1) * h + beta.view(-1, C, 1, 1)
    return F.elu(out)


def fastscore_norm_elu(x, gamma, alpha, beta):
    return cond_instance_norm(x, gamma, alpha, beta, act="elu")


def make_inputs(shape, device="cpu", dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    N, C = shape[:2]
    x = (torch.randn(shape, generator=gen) * 2 + torch.randn(N, C, 1, 1, generator=gen)).to(device, dtype)
    gamma = 1 + 0.02 * torch.randn(N, C, generator=gen)
    alpha = 1 + 0.02 * torch.randn(N, C, generator=gen)
    beta = 0.1 * torch.randn(N, C, generator=gen)
    params = [p.to(device, dtype) for p in (gamma, alpha, beta)]
    if requires_grad:
        x.requires_grad_()
        for p in params:
            p.requires_grad_()
    return x, *params


def _gpu_backends(device):
    if device != "cuda":
        return []
    return [b for b in ("triton", "cuda") if "cuda" in fastscore.backends()[b]["devices"]]


def _with_backend(name, fn):
    def run(*args):
        with fastscore.use_backend(name):
            return fn(*args)

    return run


def forward_providers(shape, device="cpu", with_compile=True):
    x, gamma, alpha, beta = make_inputs(shape, device)
    out = torch.empty_like(x)
    dst = torch.empty_like(x)

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn(x, gamma, alpha, beta)

        return call

    providers = {"eager": no_grad(ncsnv2_norm_elu)}
    if with_compile:
        providers["compile"] = no_grad(torch.compile(ncsnv2_norm_elu, dynamic=False))
    providers["fastscore"] = no_grad(fastscore_norm_elu)
    providers["fastscore_out"] = lambda: cond_instance_norm(x, gamma, alpha, beta, act="elu", out=out)
    for name in _gpu_backends(device):
        providers[name] = no_grad(_with_backend(name, fastscore_norm_elu))
    providers["copy"] = lambda: dst.copy_(x)
    return providers


def forward_backward_providers(shape, device="cpu", with_compile=True):
    inputs = make_inputs(shape, device, requires_grad=True)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(*inputs), inputs, grad)

    providers = {"eager": fwd_bwd(ncsnv2_norm_elu)}
    if with_compile:
        providers["compile"] = fwd_bwd(torch.compile(ncsnv2_norm_elu, dynamic=False))
    providers["fastscore"] = fwd_bwd(fastscore_norm_elu)
    for name in _gpu_backends(device):
        providers[name] = fwd_bwd(_with_backend(name, fastscore_norm_elu))
    return providers


def cases(quick=False, device="cpu", with_compile=True):
    out = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        out.append(
            _harness.Case(
                f"fwd {_harness.shape_label(shape)}",
                forward_providers(shape, device, with_compile),
                _harness.agree_with("eager", what="forward"),
                elements=math.prod(shape),
            )
        )
        out.append(
            _harness.Case(
                f"fwd+bwd {_harness.shape_label(shape)}",
                forward_backward_providers(shape, device, with_compile),
                _harness.agree_with("eager", what="gradients", rtol=1e-3, atol=1e-3),
                elements=math.prod(shape),
            )
        )
    return out


def run(quick=False, device="cpu", rounds=None, record=True, csv_path=None):
    """`fastscore bench cond_instance_norm`: the ratio table (and a row per provider in the results CSV)."""
    return _harness.run(
        OP,
        cases(quick, device),
        rounds=rounds or (7 if quick else 15),
        device=device,
        quick=quick,
        record=record,
        csv_path=csv_path,
    )


# ---- pytest-benchmark: `pytest bench/bench_cond_instance_norm.py --benchmark-only` ---------------

FWD_PROVIDERS = ["eager", "compile", "fastscore", "fastscore_out", "copy"]
BWD_PROVIDERS = ["eager", "compile", "fastscore"]


@pytest.mark.parametrize("shape", SHAPES, ids=_harness.shape_label)
@pytest.mark.parametrize("provider", FWD_PROVIDERS)
def test_forward(benchmark, shape, provider):
    benchmark.group = f"{OP} fwd {_harness.shape_label(shape)}"
    fn = forward_providers(shape, with_compile=provider == "compile")[provider]
    benchmark(fn)


@pytest.mark.parametrize("shape", SHAPES, ids=_harness.shape_label)
@pytest.mark.parametrize("provider", BWD_PROVIDERS)
def test_forward_backward(benchmark, shape, provider):
    benchmark.group = f"{OP} fwd+bwd {_harness.shape_label(shape)}"
    fn = forward_backward_providers(shape, with_compile=provider == "compile")[provider]
    benchmark(fn)
