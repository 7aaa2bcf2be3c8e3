"""Hutchinson divergence of a score network: fastscore's estimator vs score_sde's reverse-mode estimator.

Case: ncsnv2's NCSNv2 (CIFAR-10 config, ngf 32), 32x32 RGB, batch 16, one Rademacher probe per sample
(and two in the full run). Each provider returns ``(fx, div)``: the network output and the per-sample
divergence estimate, for the same probes.

Providers:
* "eager": score_sde's estimator (``likelihood.get_div_fn``: forward with gradients on, gradient of
  ``(f(x) * v).sum()``, one forward + backward per probe), on the reference layers (ncsnv2's numerics);
* "fastscore": :func:`fastscore.ops.hutchinson_divergence` with the default mode on fused layers,
  channels_last end to end;
* "fastscore_fwd" / "fastscore_rev": the forward-mode (dual tensors) and reverse-mode engines, for the
  choice of default (reverse: see fastscore/ops/hutchinson.py ``_auto_mode``);
* "forward" / "eager_forward": a plain forward pass without autograd on the fused / reference layers: the
  floor a one-evaluation estimator approaches.

No torch.compile baseline: score_sde's estimator calls ``autograd.grad`` inside the function, which
torch.compile cannot trace in one graph, and compiling the model takes minutes on 2 cores.

    pytest bench/bench_hutchinson.py --benchmark-only    # pytest-benchmark, grouped by case
    fastscore bench hutchinson [--quick]                  # the ratio table, then the ratios against a forward
"""

from __future__ import annotations

import time

import pytest
import torch

from fastscore.models import NCSNv2
from fastscore.models import get_config
from fastscore.ops import hutchinson_divergence
from fastscore.ops.hutchinson import hutchinson_divergence_ref
from fastscore.ops.hutchinson import make_probes

try:  # run as part of the installed package (fastscore bench) or by pytest from the source tree
    from fastscore._bench import _harness
except ImportError:  # pragma: no cover
    import _harness

OP = "hutchinson"
BATCH, SIZE, NGF = 16, 32, 32
CASES = [1, 2]  # probes per sample
QUICK_CASES = CASES[:1]
SEED = 1234


def _label(n_probes) -> str:
    return f"NCSNv2 ngf{NGF} {SIZE}x{SIZE} b{BATCH} P{n_probes}"


def build(device="cpu"):
    """(reference model, fused channels_last model with the same weights, x, labels); weights frozen."""
    config = get_config("cifar10")
    config.model.ngf = NGF
    torch.manual_seed(0)
    ref = NCSNv2(config, layers="reference").to(device).eval()
    fused = NCSNv2(config, layers="fused")
    fused.load_state_dict(ref.state_dict())
    fused = fused.to(device, memory_format=torch.channels_last).eval()
    for p in [*ref.parameters(), *fused.parameters()]:
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, config.data.channels, SIZE, SIZE, generator=gen).to(device)
    y = torch.randint(0, config.model.num_classes, (BATCH,), generator=gen).to(device)
    return ref, fused, x, y


def providers(n_probes, device="cpu", names=None):
    ref, fused, x, y = build(device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    probes = make_probes(x, n_probes, "rademacher", seed=SEED)
    f_ref = lambda h: ref(h, y)
    f_fused = lambda h: fused(h, y)

    def plain(fn, inp):
        def call():
            with torch.no_grad():
                return fn(inp)

        return call

    out = {
        "eager": lambda: hutchinson_divergence_ref(f_ref, x, probes),
        "fastscore": lambda: hutchinson_divergence(f_fused, x_cl, probes=probes),
        "fastscore_fwd": lambda: hutchinson_divergence(f_fused, x_cl, probes=probes, mode="forward"),
        "fastscore_rev": lambda: hutchinson_divergence(f_fused, x_cl, probes=probes, mode="reverse"),
        "forward": plain(f_fused, x_cl),
        "eager_forward": plain(f_ref, x),
    }
    return {k: v for k, v in out.items() if names is None or k in names}


def check(results):
    """Every estimator returns the reference's fx and divergence (float32 rounding through ~60 layers)."""
    want_fx, want_div = results["eager"]
    scale = want_div.abs().max()
    for name, got in results.items():
        fx = got[0] if isinstance(got, tuple) else got
        torch.testing.assert_close(
            fx, want_fx, rtol=1e-3, atol=1e-3 * float(want_fx.abs().max()), msg=lambda m, n=name: f"{n} fx: {m}"
        )
        if isinstance(got, tuple):
            err = float((got[1] - want_div).abs().max() / scale)
            assert err < 1e-3, f"{name}: divergence differs from score_sde's estimator by {err:.2e} (relative)"


def cases(quick=False, device="cpu"):
    return [_harness.Case(_label(p), providers(p, device), check) for p in (QUICK_CASES if quick else CASES)]


def run(quick=False, device="cpu", rounds=None, record=True, csv_path=None):
    """`fastscore bench hutchinson`: the ratio table, then each estimator's time over a plain forward."""
    rows = _harness.run(
        OP,
        cases(quick, device),
        rounds=rounds or (5 if quick else 10),
        device=device,
        quick=quick,
        record=record,
        csv_path=csv_path,
    )
    by_case: dict[str, dict[str, float]] = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.provider] = r.median_ms
    for case, med in by_case.items():
        print(
            f"{case}: eager / fastscore = {med['eager'] / med['fastscore']:.2f}x; "
            f"over a fused forward: fastscore {med['fastscore'] / med['forward']:.2f}, "
            f"forward-mode {med['fastscore_fwd'] / med['forward']:.2f}, "
            f"reverse-mode {med['fastscore_rev'] / med['forward']:.2f}; "
            f"eager over an eager forward {med['eager'] / med['eager_forward']:.2f} "
            f"({torch.get_num_threads()} threads)",
            flush=True,
        )
    return rows


# ---- pytest-benchmark: `pytest bench/bench_hutchinson.py --benchmark-only` ---------------------------------

PROVIDERS = ["eager", "fastscore", "fastscore_fwd", "fastscore_rev", "forward", "eager_forward"]


@pytest.mark.parametrize("n_probes", CASES, ids=_label)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_hutchinson(benchmark, n_probes, provider):
    benchmark.group = f"{OP} {_label(n_probes)}"
    benchmark(providers(n_probes, names=[provider])[provider])


if __name__ == "__main__":  # pragma: no cover
    start = time.perf_counter()
    run(quick=False)
    print(f"({time.perf_counter() - start:.0f} s)")
