"""RefineNet CRP pooling (5x5, stride 1, padding 2) on float32: eager vs torch.compile vs fastscore.

Providers: "eager" (``F.max_pool2d(x, 5, 1, 2)`` / ``F.avg_pool2d(x, 5, 1, 2)``, as ncsnv2's
``nn.MaxPool2d`` / ``nn.AvgPool2d`` run them in CRPBlock / CondCRPBlock), "compile" (torch.compile of
that), "fastscore" (the fused op on the selected backend: cpp on CPU), on a GPU also the forced "triton"
and "cuda" backends, and "copy" (the same bytes moved by ``Tensor.copy_`` into preallocated tensors: the
floor; forward: x once, forward+backward: x and grad_out once each). Cases: forward (under no_grad) and
forward+backward (returns the gradient of x), both modes, NCHW and channels_last.

    pytest bench/bench_crp_pool.py --benchmark-only     # pytest-benchmark, grouped by case
    fastscore bench crp_pool [--quick]                   # the ratio table
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastscore
from fastscore.ops import crp_pool

try:  # run as part of the installed package (fastscore bench) or by pytest from the source tree
    from fastscore._bench import _harness
except ImportError:  # pragma: no cover
    import _harness

OP = "crp_pool"
# NCSNv2 (ngf=32) at 32x32 with batch 16: the first RefineBlocks' CRP inputs; a wider, deeper one; and a
# large batch of wide activations.
SHAPES = [(16, 32, 32, 32), (16, 64, 16, 16), (64, 128, 32, 32)]
QUICK_SHAPES = SHAPES[:1]
MODES = ("max", "avg")
LAYOUTS = ("nchw", "channels_last")


def eager_max_pool(x):
    """ncsnv2's CRPBlock (maxpool=True) pooling, as nn.MaxPool2d(5, 1, 2) runs it."""
    return F.max_pool2d(x, kernel_size=5, stride=1, padding=2)


def eager_avg_pool(x):
    """ncsn / ncsnv2 CondCRPBlock pooling, as nn.AvgPool2d(5, 1, 2) runs it (count_include_pad)."""
    return F.avg_pool2d(x, kernel_size=5, stride=1, padding=2)


EAGER = {"max": eager_max_pool, "avg": eager_avg_pool}


def make_input(shape, layout, device="cpu", requires_grad=False):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def _gpu_backends(device):
    if device != "cuda":
        return []
    return [b for b in ("triton", "cuda") if "cuda" in fastscore.backends()[b]["devices"]]


def _fastscore(mode, backend=None):
    def run(x):
        if backend is None:
            return crp_pool(x, mode=mode)
        with fastscore.use_backend(backend):
            return crp_pool(x, mode=mode)

    return run


def _compiled(mode):
    # Every case compiles the same function again (shape, layout, grad mode: 12 graphs per mode in the full
    # run), past dynamo's default limit of 8 recompiles, beyond which it silently runs eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(EAGER[mode], dynamic=False)


def forward_providers(shape, layout, mode, device="cpu", with_compile=True):
    x = make_input(shape, layout, device)
    dst = torch.empty_like(x)

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn(x)

        return call

    providers = {"eager": no_grad(EAGER[mode])}
    if with_compile:
        providers["compile"] = no_grad(_compiled(mode))
    providers["fastscore"] = no_grad(_fastscore(mode))
    for name in _gpu_backends(device):
        providers[name] = no_grad(_fastscore(mode, name))
    providers["copy"] = lambda: dst.copy_(x)
    return providers


def forward_backward_providers(shape, layout, mode, device="cpu", with_compile=True):
    x = make_input(shape, layout, device, requires_grad=True)
    grad = make_input(shape, layout, device).mul_(0.5)
    dst, dst2 = torch.empty_like(x), torch.empty_like(x)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(x), x, grad)

    providers = {"eager": fwd_bwd(EAGER[mode])}
    if with_compile:
        providers["compile"] = fwd_bwd(_compiled(mode))
    providers["fastscore"] = fwd_bwd(_fastscore(mode))
    for name in _gpu_backends(device):
        providers[name] = fwd_bwd(_fastscore(mode, name))

    def copy():
        with torch.no_grad():
            dst.copy_(x)
            return dst2.copy_(grad)

    providers["copy"] = copy
    return providers


def cases(quick=False, device="cpu", with_compile=True):
    out = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        for layout in LAYOUTS:
            for mode in MODES:
                out.append(
                    _harness.Case(
                        f"{mode} fwd {_harness.shape_label(shape)} {_harness.layout_label(layout)}",
                        forward_providers(shape, layout, mode, device, with_compile),
                        _harness.agree_with("eager", what=f"{mode} forward", rtol=1e-5, atol=1e-5),
                        elements=math.prod(shape),
                    )
                )
                out.append(
                    _harness.Case(
                        f"{mode} fwd+bwd {_harness.shape_label(shape)} {_harness.layout_label(layout)}",
                        forward_backward_providers(shape, layout, mode, device, with_compile),
                        _harness.agree_with("eager", what=f"{mode} gradients", rtol=1e-4, atol=1e-5),
                        elements=math.prod(shape),
                    )
                )
    return out


def run(quick=False, device="cpu", rounds=None, record=True, csv_path=None):
    """`fastscore bench crp_pool`: the ratio table (and a row per provider in the results CSV)."""
    return _harness.run(
        OP,
        cases(quick, device),
        rounds=rounds or (7 if quick else 15),
        device=device,
        quick=quick,
        record=record,
        csv_path=csv_path,
    )


# ---- pytest-benchmark: `pytest bench/bench_crp_pool.py --benchmark-only` ------------------------------

FWD_PROVIDERS = ["eager", "compile", "fastscore", "copy"]
BWD_PROVIDERS = ["eager", "compile", "fastscore", "copy"]


@pytest.mark.parametrize("shape", SHAPES, ids=_harness.shape_label)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", FWD_PROVIDERS)
def test_forward(benchmark, shape, layout, mode, provider):
    benchmark.group = f"{OP} {mode} fwd {_harness.shape_label(shape)} {_harness.layout_label(layout)}"
    fn = forward_providers(shape, layout, mode, with_compile=provider == "compile")[provider]
    benchmark(fn)


@pytest.mark.parametrize("shape", SHAPES, ids=_harness.shape_label)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", BWD_PROVIDERS)
def test_forward_backward(benchmark, shape, layout, mode, provider):
    benchmark.group = f"{OP} {mode} fwd+bwd {_harness.shape_label(shape)} {_harness.layout_label(layout)}"
    fn = forward_backward_providers(shape, layout, mode, with_compile=provider == "compile")[provider]
    benchmark(fn)
