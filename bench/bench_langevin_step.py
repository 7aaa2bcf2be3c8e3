"""One Langevin step (ncsnv2's sampler inner loop, the score given) on float32: eager vs torch.compile vs fastscore.

Providers: "eager" (ncsnv2's anneal_Langevin_dynamics update, ``noise = torch.randn_like(x) * np.sqrt(step * 2);
x = x + step * grad + noise``), "compile" (torch.compile of that), "fastscore" (langevin_step_ in place with the
noise generated in the kernel), "fastscore_noise" (the same with a given noise tensor: the update's arithmetic
alone), on a GPU also the forced "triton" and "cuda" backends, and "copy" (moving the bytes the step must move --
read x and the score, write x -- with one copy into a preallocated tensor: the floor). The score is a stored
tensor: the network is not timed. Below the table: nanoseconds per generated normal, counter_randn vs
torch.randn. On CPU the random numbers are the Langevin step's hot path (docs/performance.md#the-floors).

    pytest bench/bench_langevin_step.py --benchmark-only     # pytest-benchmark, grouped by case
    fastscore bench langevin_step [--quick]                   # the ratio table
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import pytest
import torch

import fastscore
from fastscore.ops import counter_randn
from fastscore.ops import langevin_step_
from fastscore.ops import langevin_step_ref

try:  # run as part of the installed package (fastscore bench) or by pytest from the source tree
    from fastscore._bench import _harness
except ImportError:  # pragma: no cover
    import _harness

OP = "langevin_step"
SHAPES = [(64, 3, 32, 32), (16, 3, 64, 64), (1280, 2)]  # CIFAR-10 batch, CelebA-64 batch, the toy GMM chain
QUICK_SHAPES = SHAPES[:1]
STEP = 6.2e-6 * 50.0**2  # ncsnv2 CIFAR-10: step_lr * (sigma_i / sigma_L)^2 at sigma_i = 50 sigma_L
SEED = 2024


def ncsnv2_step(x, grad, step_size):
    """ncsnv2 runners/ncsn_runner.py anneal_Langevin_dynamics, the update (after the score call)."""
    noise = torch.randn_like(x) * np.sqrt(step_size * 2)
    x = x + step_size * grad + noise
    return x


def make_inputs(shape, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=gen).to(device)
    grad = (torch.randn(shape, generator=gen) * 10).to(device)
    return x, grad


def _gpu_backends(device):
    if device != "cuda":
        return []
    return [b for b in ("triton", "cuda") if "cuda" in fastscore.backends()[b]["devices"]]


def providers(shape, device="cpu", with_compile=True):
    x, grad = make_inputs(shape, device)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    state = {"fastscore": x.clone(), "fastscore_noise": x.clone()}
    counter = iter(range(1 << 62))
    out = {"eager": lambda: ncsnv2_step(x, grad, STEP)}
    if with_compile:
        compiled = torch.compile(ncsnv2_step, dynamic=False)
        out["compile"] = lambda: compiled(x, grad, STEP)
    # fastscore updates a chain in place, as a sampler does; a new counter per step
    out["fastscore"] = lambda: langevin_step_(state["fastscore"], grad, STEP, seed=SEED, counter=next(counter))
    out["fastscore_noise"] = lambda: langevin_step_(state["fastscore_noise"], grad, STEP, noise=noise)
    for name in _gpu_backends(device):
        state[name] = x.clone()

        def run(name=name):
            with fastscore.use_backend(name):
                return langevin_step_(state[name], grad, STEP, seed=SEED, counter=next(counter))

        out[name] = run
    # read x and grad, write x: 3 |x| bytes moved, as one copy of 1.5 |x| elements
    src = torch.empty(x.numel() * 3 // 2, device=device)
    dst = torch.empty_like(src)
    out["copy"] = lambda: dst.copy_(src)
    return out


def check_step(shape, device="cpu"):
    """A Case.check that verifies the step rather than comparing random draws: the fused update with a given
    noise is ncsnv2's formula with that noise; with in-kernel noise it is the reference's; and the increment
    (x_new - x - step * grad) / sqrt(2 step) of every provider looks standard normal."""
    x, grad = make_inputs(shape, device)

    def check(results):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(device)
        want = x + STEP * grad + noise * np.sqrt(STEP * 2)
        got = langevin_step_(x.clone(), grad, STEP, noise=noise)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"given noise vs ncsnv2: {m}")
        got = langevin_step_(x.clone(), grad, STEP, seed=SEED, counter=3)
        ref = langevin_step_ref(x, grad, STEP, seed=SEED, counter=3)
        torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=lambda m: f"in-kernel noise vs reference: {m}")
        for name, new in (("eager", ncsnv2_step(x, grad, STEP)), ("fastscore", got)):
            z = ((new - x - STEP * grad) / np.sqrt(2 * STEP)).double()
            assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05, f"{name}: increment not N(0, 1)"

    return check


REPEAT = 10  # steps per call in the back-to-back case


def back_to_back(shape, device="cpu", with_compile=True):
    """REPEAT steps per call, as a sampler's loop runs them: the intra-op threads are still awake from the
    previous step (in the interleaved case every provider's first call finds them asleep, and waking a thread
    costs more than half a 64x3x32x32 step on a VM)."""
    single = providers(shape, device, with_compile)

    def repeated(fn):
        def call():
            for _ in range(REPEAT):
                out = fn()
            return out

        return call

    return {name: repeated(fn) for name, fn in single.items()}


def cases(quick=False, device="cpu", with_compile=True):
    out = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        out.append(
            _harness.Case(
                f"step {_harness.shape_label(shape)}",
                providers(shape, device, with_compile),
                check_step(shape, device),
                elements=math.prod(shape),
            )
        )
    shape = SHAPES[0]
    out.append(
        _harness.Case(
            f"{REPEAT} steps back to back {_harness.shape_label(shape)}",
            back_to_back(shape, device, with_compile),
            check_step(shape, device),
            elements=REPEAT * math.prod(shape),
        )
    )
    return out


def ns_per_normal(device="cpu", numel=1 << 22, rounds=15) -> dict[str, float]:
    """Median wall-clock nanoseconds per normal, counter_randn vs torch.randn, each making a fresh tensor of
    `numel` normals (as randn_like does in the eager step)."""
    shape = (numel // 1024, 1024)
    fns = {
        "torch.randn": lambda: torch.randn(shape, device=device),
        "counter_randn": lambda: counter_randn(shape, seed=SEED, counter=1, device=device),
    }
    times = _harness.time_interleaved(fns, rounds=rounds, device=device)
    return {name: statistics.median(ts) / numel * 1e9 for name, ts in times.items()}


def run(quick=False, device="cpu", rounds=None, record=True, csv_path=None):
    """`fastscore bench langevin_step`: the ratio table, then ns per generated normal."""
    rows = _harness.run(
        OP,
        cases(quick, device),
        rounds=rounds or (15 if quick else 30),
        device=device,
        quick=quick,
        record=record,
        csv_path=csv_path,
    )
    threads = torch.get_num_threads()
    for numel, label in ((64 * 3 * 32 * 32, "196608 (a 64x3x32x32 batch)"), (1 << 22, "4M")):
        if quick and numel > 1 << 20:
            continue
        ns = ns_per_normal(device, numel=numel, rounds=15 if quick else 30)
        print(
            f"ns per normal, {label} normals ({device}, {threads} threads, wall clock): "
            + ", ".join(f"{name} {v:.3f}" for name, v in ns.items())
            + f"  (torch.randn / counter_randn = {ns['torch.randn'] / ns['counter_randn']:.1f}x)",
            flush=True,
        )
    return rows


# ---- pytest-benchmark: `pytest bench/bench_langevin_step.py --benchmark-only` --------------------------------

PROVIDERS = ["eager", "compile", "fastscore", "fastscore_noise", "copy"]


@pytest.mark.parametrize("shape", SHAPES, ids=_harness.shape_label)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_langevin_step(benchmark, shape, provider):
    benchmark.group = f"{OP} {_harness.shape_label(shape)}"
    fn = providers(shape, with_compile=provider == "compile")[provider]
    benchmark(fn)


@pytest.mark.parametrize("provider", ["torch.randn", "counter_randn"])
def test_normals(benchmark, provider):
    benchmark.group = f"{OP} 4M normals"
    shape = (4096, 1024)
    fn = {
        "torch.randn": lambda: torch.randn(shape),
        "counter_randn": lambda: counter_randn(shape, seed=SEED, counter=1),
    }[provider]
    benchmark(fn)


if __name__ == "__main__":  # pragma: no cover
    start = time.perf_counter()
    run(quick=False)
    print(f"({time.perf_counter() - start:.0f} s)")
