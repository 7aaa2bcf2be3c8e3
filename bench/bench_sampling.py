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
(c) equal error on digits: the shipped digits model (NCSNv2, fastscore/checkpoints/demo_digits.pth, the demo's)
    sampled by the PC sampler at 1000 steps (2000 evaluations) and by the few-step solvers (DPM-Solver++(2M),
    Heun, DDIM and ancestral DDIM, eta = 1) at 5-40 steps, each sampler on the same DIGITS_N priors. No exact
    score exists for digits, so the error is a distance between sample sets: the Frechet distance (Gaussians
    fitted to both sets) in a fixed feature space, the coordinates on the top FEATURES principal components of
    scikit-learn's digits (16x16, as the model was trained) plus the norm of what those components leave out
    (noise left in an image lands there), of the samples against the 1797 training digits. Its sampling noise
    is the bootstrap std of PC's distance (resampling its samples); a solver reaches PC's error at the fewest
    evaluations whose distance is within 2 of those stds of PC's. Samples per second of each solver at that
    point (one that does not reach it: at its closest), timed interleaved on the same batch (PC timed at
    PC_TIMED_STEPS steps and scaled to 1000: its per-step cost is constant), and their ratio to PC's; recorded
    as op "sampling", case "digits equal error NCSNv2 b<batch>". The demo's annealed Langevin is measured too.
    Results: docs/solvers.md#sampling-a-trained-model.

    fastscore bench sampling [--quick]
    pytest bench/bench_sampling.py --benchmark-only
"""

from __future__ import annotations

import math
import statistics
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


# ---- (c) equal error on digits ------------------------------------------------------------------------------------

DIGITS_SEED = 3
DIGITS_N = 32  # samples per sampler (the batch); the PC sampler's 2000 evaluations of them are most of the run
PC_DIGITS_STEPS = 1000
PC_TIMED_STEPS = 10
FEATURES = 8
BOOTSTRAP = 200
# (label, method, eta) -> the steps tried (Heun: 2 steps - 1 evaluations); "ancestral" is DDIM with eta = 1
SOLVER_STEPS = {
    ("dpm", "dpm", 0.0): (10, 20, 40),
    ("heun", "heun", 0.0): (5, 10, 20),
    ("ddim", "ddim", 0.0): (10, 20, 40),
    ("ancestral", "ddim", 1.0): (10, 20, 40),
}
QUICK_DIGITS = dict(n=8, pc_steps=10, solver_steps={key: steps[:1] for key, steps in SOLVER_STEPS.items()})


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return features.mean(0), torch.cov(features.T)


def frechet(a, b) -> float:
    """The Frechet distance between Gaussians (mean, covariance): |m1 - m2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2),
    the square root through symmetric eigendecompositions (float64)."""
    (m1, c1), (m2, c2) = a, b
    w, v = torch.linalg.eigh(c1)
    root = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root @ c2 @ root).clamp_min(0).sqrt().sum()
    return float((m1 - m2).square().sum() + c1.trace() + c2.trace() - 2 * cross)


class DigitFeatures:
    """The fixed feature space of (c): an image's coordinates on the top ``k`` principal components of the
    training digits (16x16, scikit-learn's 1797), and the norm of the rest (residual noise lands there, which
    the top components of digit strokes hardly see). ``distance(images)``: the Frechet distance of the images'
    features to the training digits'."""

    def __init__(self, k: int = FEATURES):
        from fastscore.data.images import load_digits

        data = load_digits(16).reshape(-1, 256).double()
        self.mean = data.mean(0)
        self.basis = torch.linalg.svd(data - self.mean, full_matrices=False)[2][:k].T
        self.reference = gaussian_stats(self(data))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().cpu().reshape(images.shape[0], -1).double() - self.mean
        coords = x @ self.basis
        return torch.cat([coords, (x - coords @ self.basis.T).norm(dim=1, keepdim=True)], 1)

    def distance_of(self, features: torch.Tensor) -> float:
        return frechet(gaussian_stats(features), self.reference)

    def bootstrap_std(self, features: torch.Tensor, rounds: int = BOOTSTRAP, seed: int = 0) -> float:
        """The sampling noise of a distance: its std over resamples (with replacement) of the sample set."""
        gen = torch.Generator().manual_seed(seed)
        n = features.shape[0]
        values = [self.distance_of(features[torch.randint(n, (n,), generator=gen)]) for _ in range(rounds)]
        return statistics.stdev(values)


def digits_model(device="cpu"):
    """The demo's shipped NCSNv2 digits model: (model, config, meta), fused layers, channels_last."""
    from fastscore import demo
    from fastscore.train import model_from_checkpoint

    model, config, meta = model_from_checkpoint(demo.shipped_checkpoint())
    return model.to(device, memory_format=torch.channels_last).eval(), config, meta


def digits_samplers(model, config, meta, n, pc_steps, solver_steps, ald=False):
    """name -> (label, evaluations per sample, a call returning n samples in [0, 1]): the PC sampler at
    ``pc_steps`` (what ``fastscore sample --sampler pc --sde-steps`` runs) and each solver at each of its steps
    (``--sampler dpm|heun|ddim``; ancestral DDIM through fastscore.solvers.solve with eta = 1), all from the
    same priors (seed DIGITS_SEED); ``ald``: also the demo's annealed Langevin (its config's settings)."""
    from fastscore import model_sampling
    from fastscore.data.images import inverse_data_transform
    from fastscore.solvers import solve

    out = {
        f"pc{pc_steps}": ("pc", 2 * pc_steps, lambda: model_sampling.sample(
            model, config, n, sampler="pc", sde_steps=pc_steps, meta=meta, seed=DIGITS_SEED)),
    }  # fmt: skip
    if ald:
        steps_each = model_sampling.langevin_settings(config)[0]
        evals = config.model.num_classes * steps_each + 1  # + the denoising step
        out["ald"] = ("ald", evals, lambda: model_sampling.sample(model, config, n, meta=meta, seed=DIGITS_SEED))
    score, sde = model_sampling.sde_for(model, config, meta)
    score = model_sampling.batch_invariant(score)
    shape = (n, config.data.channels, config.data.image_size, config.data.image_size)
    device = next(model.parameters()).device
    for (label, method, eta), steps_list in solver_steps.items():
        for steps in steps_list:

            def call(method=method, eta=eta, steps=steps):
                x = solve(score, sde, shape, method=method, eta=eta, steps=steps, seed=DIGITS_SEED, device=device)
                return inverse_data_transform(config, x)

            out[f"{label}{steps}"] = (label, 2 * steps - 1 if method == "heun" else steps, call)
    return out


def digits_equal_error(quick=False, device="cpu", rounds=None, record=True, csv_path=None):
    """(c): the error of every sampler, the fewest evaluations at which each solver reaches the PC sampler's
    error, and samples per second there (printed, recorded; returned as a dict)."""
    n, pc_steps, solver_steps = (
        (QUICK_DIGITS["n"], QUICK_DIGITS["pc_steps"], QUICK_DIGITS["solver_steps"])
        if quick
        else (DIGITS_N, PC_DIGITS_STEPS, SOLVER_STEPS)
    )
    features = DigitFeatures()
    model, config, meta = digits_model(device)
    samplers = digits_samplers(model, config, meta, n, pc_steps, solver_steps, ald=not quick)
    pc = f"pc{pc_steps}"
    errors, seconds = {}, {}
    print(f"\n(c) equal error on digits, {n} samples per sampler (distance, seconds of the run):", flush=True)
    with torch.no_grad():  # the network's first call at this batch (oneDNN's setup) out of the timed runs
        model(torch.zeros(n, config.data.channels, config.data.image_size, config.data.image_size, device=device),
              torch.zeros(n, dtype=torch.long, device=device))  # fmt: skip
    for name, (_, _, call) in sorted(samplers.items(), key=lambda kv: kv[0] == pc):  # PC, the long run, last
        start = time.perf_counter()
        feats = features(call())
        seconds[name] = time.perf_counter() - start
        errors[name] = features.distance_of(feats)
        if name == pc:
            noise = features.bootstrap_std(feats, rounds=50 if quick else BOOTSTRAP)
        print(f"  {name}: {errors[name]:.3f} ({seconds[name]:.1f} s)", flush=True)
    bound = errors[pc] + 2 * noise
    matches = {}
    for label in dict.fromkeys(key[0] for key in solver_steps):
        tried = sorted((evals, name) for name, (lab, evals, _) in samplers.items() if lab == label)
        matches[label] = next((name for evals, name in tried if errors[name] <= bound), None)
    # samples per second, timed interleaved: PC at PC_TIMED_STEPS steps (scaled to pc_steps) and each solver at
    # its match (or, not reached, at its most accurate try)
    timed_steps = min(PC_TIMED_STEPS, pc_steps)
    pc_timed = digits_samplers(model, config, meta, n, timed_steps, {})[f"pc{timed_steps}"][2]
    providers = {pc: pc_timed}
    for label, name in matches.items():
        if name is None:
            name = min((name for name, (lab, _, _) in samplers.items() if lab == label), key=errors.get)
        providers[name] = samplers[name][2]
    rounds = rounds or (1 if quick else 2)
    times = _harness.time_interleaved(providers, rounds=rounds, warmup=0, device=device)
    times[pc] = [t * pc_steps / timed_steps for t in times[pc]]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    case = f"digits equal error NCSNv2 b{n}"
    rows = [
        _harness.Row(
            case, name, med[name] * 1e3, _harness._quantile(ts, 0.2) * 1e3, _harness._quantile(ts, 0.8) * 1e3, {}
        )  # fmt: skip
        for name, ts in times.items()
    ]
    lines = [
        f"(c) equal error on digits: the shipped NCSNv2 digits model, {n} samples per sampler, the same priors; "
        f"error = Frechet distance to the 1797 training digits in the top-{FEATURES} principal components + "
        f"residual norm; on {_harness.device_name(device)}",
        f"  {'sampler':14s} {'evaluations':>11s} {'distance':>9s} {'run s':>7s}",
    ]
    for name, (_, evals, _) in sorted(samplers.items(), key=lambda kv: (kv[1][0], kv[1][1])):
        lines.append(f"  {name:14s} {evals:11d} {errors[name]:9.3f} {seconds[name]:7.1f}")
    lines.append(f"  {pc}'s distance {errors[pc]:.3f}, its sampling noise (bootstrap std) {noise:.3f}: a solver "
                 f"reaches it at a distance <= {bound:.3f}")  # fmt: skip
    sps = {name: n / t for name, t in med.items()}
    for label, name in matches.items():
        shown = name or next(p for p in providers if samplers[p][0] == label)
        ratio = sps[shown] / sps[pc]
        if name is None:
            tried = ", ".join(str(evals) for evals in sorted(e for lab, e, _ in samplers.values() if lab == label))
            lines.append(f"  {label}: not within {pc}'s error at {tried} evaluations; at its closest ({shown}) "
                         f"{sps[shown]:.2f} samples/s, {ratio:.1f}x {pc}'s {sps[pc]:.3f}")  # fmt: skip
        else:
            lines.append(f"  {label}: {pc}'s error at {samplers[name][1]} evaluations ({name}): {sps[name]:.2f} "
                         f"samples/s, {ratio:.1f}x {pc}'s {sps[pc]:.3f}")  # fmt: skip
    lines.append(f"  (samples/s: medians of {rounds} interleaved rounds, batch {n}; {pc} timed at {timed_steps} steps, "
                 "scaled)")  # fmt: skip
    print("\n".join(lines), flush=True)
    if record:
        print(f"results appended to {_harness.append_results(OP, rows, device=device, quick=quick, path=csv_path)}")
    return {"errors": errors, "noise": noise, "bound": bound, "matches": matches, "samples_per_s": sps,
            "evaluations": {name: evals for name, (_, evals, _) in samplers.items()}, "rows": rows}  # fmt: skip


def cases(quick=False, device="cpu"):
    out = [
        _harness.Case(f"annealed langevin {STEPS} steps, free score, 64x3x32x32", step_providers(device), check_steps)
    ]
    return out + end_to_end_cases(device)


def run(quick=False, device="cpu", rounds=None, record=True, csv_path=None):
    """`fastscore bench sampling`: the ratio table (per-step overhead, then end-to-end samples/s ratios), then the
    equal-error comparison on digits (c)."""
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
    return rows + digits_equal_error(quick, device, None, record, csv_path)["rows"]


# ---- pytest-benchmark: `pytest bench/bench_sampling.py --benchmark-only` ------------------------------------


@pytest.mark.parametrize("provider", ["eager", "fastscore", "copy"])
def test_step_overhead(benchmark, provider):
    benchmark.group = f"{OP} step overhead"
    benchmark(step_providers()[provider])


if __name__ == "__main__":  # pragma: no cover
    start = time.perf_counter()
    run(quick=False)
    print(f"({time.perf_counter() - start:.0f} s)")
