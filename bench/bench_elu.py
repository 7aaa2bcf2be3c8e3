"""ELU (alpha = 1) on float32: eager vs torch.compile vs fastscore, out of place and in place.

Providers: "eager" (``F.elu(x)``, as ncsnv2's ``nn.ELU()`` runs it in the RefineNet RCU / CRP blocks; in
place: ``F.elu(x, inplace=True)``), "compile" (torch.compile of that), "fastscore" (:func:`fastscore.ops.elu`
on the selected backend: cpp on CPU; in place: ``elu(x, out=x)``), on a GPU also the forced "triton" and
"cuda" backends, and "copy" (``Tensor.copy_`` of the same bytes into a preallocated tensor: the floor).
The out-of-place providers allocate their result on every call, as the blocks do. In place, each
provider owns a buffer it rewrites on every call (ELU of ELU keeps a mix of signs, so the work per call
does not change); the agreement check runs on the first call, when every buffer held x.

    pytest bench/bench_elu.py --benchmark-only     # pytest-benchmark, grouped by case
    fastscore bench elu [--quick]                   # the ratio table
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastscore
from fastscore.ops.elu import elu

try:  # run as part of the installed package (fastscore bench) or by pytest from the source tree
    from fastscore._bench import _harness
except ImportError:  # pragma: no cover
    import _harness

OP = "elu"
# NCSNv2 (ngf=32) at 32x32 with batch 16: the RefineBlocks' RCU / CRP activations; a large batch of wide ones.
SHAPES = [(16, 32, 32, 32), (64, 128, 32, 32)]
QUICK_SHAPES = SHAPES[:1]
LAYOUTS = ("nchw", "channels_last")
KINDS = ("fwd", "in place")


def eager_elu(x):
    """ncsnv2's nn.ELU() (alpha = 1)."""
    return F.elu(x)


def eager_elu_(x):
    """nn.ELU(inplace=True): the in-place form."""
    return F.elu(x, inplace=True)


def make_input(shape, layout, device="cpu"):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _gpu_backends(device):
    if device != "cuda":
        return []
    return [b for b in ("triton", "cuda") if "cuda" in fastscore.backends()[b]["devices"]]


def _compiled(fn):
    # Every case compiles again (shape, layout: 4 graphs per function in the full run), near dynamo's default
    # recompile limit of 8, beyond which it silently runs eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=False)


def _on(backend, fn):
    def run(*args, **kwargs):
        if backend is None:
            return fn(*args, **kwargs)
        with fastscore.use_backend(backend):
            return fn(*args, **kwargs)

    return run


def forward_providers(shape, layout, device="cpu", with_compile=True):
    x = make_input(shape, layout, device)
    dst = torch.empty_like(x)

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn(x)

        return call

    providers = {"eager": no_grad(eager_elu)}
    if with_compile:
        providers["compile"] = no_grad(_compiled(eager_elu))
    providers["fastscore"] = no_grad(elu)
    for name in _gpu_backends(device):
        providers[name] = no_grad(_on(name, elu))
    providers["copy"] = lambda: dst.copy_(x)
    return providers


def in_place_providers(shape, layout, device="cpu", with_compile=True):
    x = make_input(shape, layout, device)
    dst = torch.empty_like(x)

    def owning(fn):
        buf = x.clone()

        def call():
            with torch.no_grad():
                return fn(buf)

        return call

    providers = {"eager": owning(eager_elu_)}
    if with_compile:
        providers["compile"] = owning(_compiled(eager_elu_))
    providers["fastscore"] = owning(lambda t: elu(t, out=t))
    for level in _harness.narrower_capabilities(device):  # each level rewrites a buffer of its own
        providers[f"fastscore@{level}"] = _harness.at_capability(level, owning(lambda t: elu(t, out=t)))
    for name in _gpu_backends(device):
        providers[name] = owning(_on(name, lambda t: elu(t, out=t)))
    providers["copy"] = lambda: dst.copy_(x)
    return providers


_PROVIDERS = {"fwd": forward_providers, "in place": in_place_providers}


def cases(quick=False, device="cpu", with_compile=True):
    out = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        for layout in LAYOUTS:
            for kind in KINDS:
                out.append(
                    _harness.Case(
                        f"{kind} {_harness.shape_label(shape)} {_harness.layout_label(layout)}",
                        _PROVIDERS[kind](shape, layout, device, with_compile),
                        _harness.agree_with("eager", what=f"elu {kind}", rtol=1e-5, atol=1e-6),
                        elements=math.prod(shape),
                    )
                )
    return out


def run(quick=False, device="cpu", rounds=None, record=True, csv_path=None):
    """`fastscore bench elu`: the ratio table (and a row per provider in the results CSV)."""
    return _harness.run(
        OP,
        cases(quick, device),
        rounds=rounds or (9 if quick else 21),
        device=device,
        quick=quick,
        record=record,
        csv_path=csv_path,
    )


# ---- pytest-benchmark: `pytest bench/bench_elu.py --benchmark-only` ----------------------------------------

PROVIDERS = ["eager", "compile", "fastscore", "copy"]


@pytest.mark.parametrize("shape", SHAPES, ids=_harness.shape_label)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_elu(benchmark, shape, layout, kind, provider):
    benchmark.group = f"{OP} {kind} {_harness.shape_label(shape)} {_harness.layout_label(layout)}"
    fn = _PROVIDERS[kind](shape, layout, with_compile=provider == "compile")[provider]
    benchmark(fn)
