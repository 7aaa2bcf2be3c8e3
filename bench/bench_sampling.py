"""Samplers end to end and their per-step overhead: ncsnv2 / score_sde eager loops vs fastscore.sampling.

(a) step overhead: annealed Langevin with a free score (a stored tensor) on (64, 3, 32, 32), STEPS steps per
    call: "eager" (ncsnv2's loop arithmetic: torch.randn_like noise, new tensors every step), "fastscore"
    (fastscore.sampling.annealed_langevin: in-place fused steps, noise made in the kernel) and "copy" (per step,
    reading x and the score and writing x once into a preallocated tensor: the floor).
(b) end to end: samples/s of annealed Langevin and of the PC sampler (reverse diffusion + Langevin corrector)
    with NCSNv2 (CIFAR-10 config, ngf 32, 32x32): "eager" = reference layers + the eager loops of ncsnv2 /
    score_sde; "fastscore" = fused layers (channels_last) + fastscore's samplers; "compile" and
    "fastscore+compile" the same with the network wrapped in torch.compile. Few steps (the per-step cost is
    what is compared); samples per second printed under the table.

    fastscore bench sampling [--quick]
    pytest bench/bench_sampling.py --benchmark-only
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from fastscore import sampling
from fastscore import sde as sde_lib
from fastscore.model_sampling import time_to_label
from fastscore.models import NCSNv2
from fastscore.models import get_config

try:  # run as part of the installed package (fastscore bench) or by pytest from the source tree
    from fastscore._bench import _harness
except ImportError:  # pragma: no cover
    import _harness

OP = "sampling"
SHAPE = (64, 3, 32, 32)
# The setting: per-call setup (coefficient table, buffers) is amortised as in a real run; at 20
# steps it was 35% of fastscore's time.
STEPS = 1000
STEP_LR = 6.2e-6
SIGMAS = [50.0, 1.0]
BATCH, LEVELS, STEPS_EACH = 8, 2, 2


def ncsnv2_loop(score_fn, x, sigmas, n_steps_each, step_lr, denoise=False):
    """ncsnv2 runners/ncsn_runner.py anneal_Langevin_dynamics (final_only, no diagnostics printed)."""
    for c, sigma in enumerate(sigmas):
        labels = torch.ones(x.shape[0], device=x.device, dtype=torch.long) * c
        step_size = step_lr * (sigma / sigmas[-1]) ** 2
        for _ in range(n_steps_each):
            grad = score_fn(x, labels)
            noise = torch.randn_like(x)
            x = x + step_size * grad + noise * np.sqrt(step_size * 2)
    if denoise:
        labels = torch.ones(x.shape[0], device=x.device, dtype=torch.long) * (len(sigmas) - 1)
        x = x + sigmas[-1] ** 2 * score_fn(x, labels)
    return x


def score_sde_pc_loop(score_fn, sde, shape, snr=0.16, eps=1e-5):
    """score_sde's PC sampler, VE: Langevin corrector (batch-averaged norms), then reverse diffusion."""
    x = sde.prior_sampling(shape)
    ts = torch.linspace(sde.T, eps, sde.N)
    x_mean = x
    for i in range(sde.N):
        t = torch.ones(shape[0]) * ts[i]
        grad = score_fn(x, t)
        noise = torch.randn_like(x)
        grad_norm = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
        noise_norm = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
        step_size = (snr * noise_norm / grad_norm) ** 2 * 2
        x_mean = x + step_size * grad
        x = x_mean + torch.sqrt(step_size * 2) * noise
        f, G = sde.reverse(score_fn).discretize(x, t)
        z = torch.randn_like(x)
        x_mean = x - f
        x = x_mean + G[:, None, None, None] * z
    return x_mean


# ---- (a) step overhead --------------------------------------------------------------------------------


def step_providers(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(SHAPE, generator=gen).to(device)
    grad = (torch.randn(SHAPE, generator=gen) * 10).to(device)
    free = lambda x, labels: grad  # noqa: E731
    src = torch.empty(x0.numel() * 3 // 2, device=device)
    dst = torch.empty_like(src)

    def copy():
        for _ in range(STEPS):
            dst.copy_(src)

    return {
        "eager": lambda: ncsnv2_loop(free, x0, [1.0], STEPS, STEP_LR),
        "fastscore": lambda: sampling.annealed_langevin(
            free, x0, [1.0], n_steps_each=STEPS, step_lr=STEP_LR, denoise=False, seed=1
        ),
        "copy": copy,
    }


def check_steps(results):
    """Both chains move x by step * grad plus N(0, 2 step) noise: check the increments' moments."""
    for name in ("eager", "fastscore"):
        out = results[name]
        assert out.shape == SHAPE and torch.isfinite(out).all(), name
    diff = (results["eager"] - results["fastscore"]).double() / math.sqrt(2 * STEP_LR * STEPS * 2)
    assert abs(diff.mean().item()) < 0.05 and abs(diff.std().item() - 1) < 0.05, "chains' noise differs in law"


# ---- (b) end to end ---------------------------------------------------------------------------------------


def _models(device):
    config = get_config("cifar10")
    config.model.ngf = 32
    torch.manual_seed(0)
    eager = NCSNv2(config, layers="reference").to(device).eval()
    fused = NCSNv2(config, layers="fused").to(device, memory_format=torch.channels_last).eval()
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def end_to_end_cases(device="cpu"):
    eager, fused = _models(device)
    L = eager.config.model.num_classes
    levels = list(range(0, L, L // LEVELS))[:LEVELS]  # a few of the model's noise levels
    sigmas = [float(eager.sigmas[i]) for i in levels]
    label_of = torch.tensor(levels, device=device)
    x0 = torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    x0_cl = x0.contiguous(memory_format=torch.channels_last)

    def net(model):
        def score(x, labels):
            return model(x, label_of[labels])

        return score

    def run_eager_ald():
        with torch.no_grad():
            return ncsnv2_loop(net(eager), x0, sigmas, STEPS_EACH, STEP_LR, denoise=True)

    def run_fused_ald():
        return sampling.annealed_langevin(net(fused), x0_cl, sigmas, n_steps_each=STEPS_EACH, step_lr=STEP_LR, seed=1)

    sde = sde_lib.VESDE(sigma_min=sigmas[-1], sigma_max=sigmas[0], N=LEVELS * STEPS_EACH)

    def t_score(model):
        def score(x, t):
            # score_sde's VE discrete labels (the CLI's mapping), into this bench's levels
            return model(x, label_of[time_to_label(t, sde.T, len(levels))])

        return score

    def run_eager_pc():
        with torch.no_grad():
            return score_sde_pc_loop(t_score(eager), sde, (BATCH, 3, 32, 32))

    def run_fused_pc():
        x_init = (torch.randn(BATCH, 3, 32, 32) * sde.prior_std).contiguous(memory_format=torch.channels_last)
        return sampling.pc_sampler(t_score(fused), sde, None, x_init=x_init.to(device), seed=1, batch_norm_step=True)

    def finite(results):
        for name, out in results.items():
            assert torch.isfinite(out).all(), name

    note = f"batch {BATCH}, {LEVELS * STEPS_EACH} network calls + 1 (ALD denoising) / x2 (PC corrector)"
    # The compiled networks (torch.compile of the reference model in the eager loops; of the fused model in
    # fastscore's samplers): compiled once, on the agreement check's call, before the timing.
    eager_c, fused_c = torch.compile(eager, dynamic=False), torch.compile(fused, dynamic=False)

    def run_compiled_ald():
        with torch.no_grad():
            return ncsnv2_loop(net(eager_c), x0, sigmas, STEPS_EACH, STEP_LR, denoise=True)

    def run_fused_compiled_ald():
        return sampling.annealed_langevin(net(fused_c), x0_cl, sigmas, n_steps_each=STEPS_EACH, step_lr=STEP_LR, seed=1)

    def run_compiled_pc():
        with torch.no_grad():
            return score_sde_pc_loop(t_score(eager_c), sde, (BATCH, 3, 32, 32))

    def run_fused_compiled_pc():
        x_init = (torch.randn(BATCH, 3, 32, 32) * sde.prior_std).contiguous(memory_format=torch.channels_last)
        return sampling.pc_sampler(t_score(fused_c), sde, None, x_init=x_init.to(device), seed=1, batch_norm_step=True)

    ald = {"eager": run_eager_ald, "compile": run_compiled_ald, "fastscore": run_fused_ald}
    pc = {"eager": run_eager_pc, "compile": run_compiled_pc, "fastscore": run_fused_pc}
    ald["fastscore+compile"], pc["fastscore+compile"] = run_fused_compiled_ald, run_fused_compiled_pc
    return [
        _harness.Case(f"annealed langevin NCSNv2 ngf32 b{BATCH}", ald, finite, note),
        _harness.Case(f"pc sampler NCSNv2 ngf32 b{BATCH}", pc, finite, note),
    ]


def cases(quick=False, device="cpu"):
    out = [
        _harness.Case(f"annealed langevin {STEPS} steps, free score, 64x3x32x32", step_providers(device), check_steps)
    ]
    return out + end_to_end_cases(device)


def run(quick=False, device="cpu", rounds=None, record=True, csv_path=None):
    """`fastscore bench sampling`: the ratio table (per-step overhead, then end-to-end samples/s ratios)."""
    rows = _harness.run(
        OP,
        cases(quick, device),
        rounds=rounds or (5 if quick else 15),
        device=device,
        quick=quick,
        record=record,
        csv_path=csv_path,
    )
    print(f"\nsamples per second (batch {BATCH}, {LEVELS * STEPS_EACH} steps):")
    for row in rows:
        if "NCSNv2" in row.case:
            print(f"  {row.case:32s} {row.provider:20s} {BATCH / (row.median_ms / 1e3):8.1f}")
    return rows


# ---- pytest-benchmark: `pytest bench/bench_sampling.py --benchmark-only` ------------------------------------


@pytest.mark.parametrize("provider", ["eager", "fastscore", "copy"])
def test_step_overhead(benchmark, provider):
    benchmark.group = f"{OP} step overhead"
    benchmark(step_providers()[provider])


if __name__ == "__main__":  # pragma: no cover
    start = time.perf_counter()
    run(quick=False)
    print(f"({time.perf_counter() - start:.0f} s)")
