"""``fastscore demo``: the main job on the bundled default, in three parts (:func:`run`).

1. Digits: a grid of samples of the small NCSNv2 checkpoint shipped in the package
   (fastscore/checkpoints/demo_digits.pth), by annealed Langevin with its config's settings, and a grid of
   the same model in 20 network evaluations by a few-step solver (fastscore.solvers; :data:`FEW_STEP`).
2. The NCSN toy: Langevin vs annealed Langevin on ncsn's 0.8 / 0.2 Gaussian mixture with exact scores, and
   the mixture weights each recovers.
3. Speed: fastscore's fused Langevin step and NCSNv2 forward against ncsnv2's formulation (the reference
   layers), medians of interleaved rounds, in words (:func:`speed_words`).

The command line (fastscore.cli) checks the output folder and turns errors into one line; this module does
the work and prints the report.
"""

from __future__ import annotations

import os

CHECKPOINT = "demo_digits.pth"
# The demo samples the shipped checkpoint with the sampling settings of its config (the bundled demo_digits.yml,
# which the checkpoint carries: 10 Langevin steps per level at step_lr 5e-5); --quick takes 3 steps per level.
QUICK_STEPS_EACH = 3
# The few-step grid: stochastic DDIM with eta = 1 (ancestral sampling), 20 steps of one evaluation each. On this
# model it is the solver that reaches the PC sampler's 1000-step error in the fewest evaluations (`fastscore bench
# sampling`, docs/solvers.md#sampling-a-trained-model); the deterministic solvers (DPM-Solver++(2M), Heun, DDIM
# eta = 0) follow the probability-flow ODE of the model's imperfect score, which leaves some samples noisy at any
# number of steps.
FEW_STEP = {"method": "ddim", "eta": 1.0, "steps": 20}
QUICK_FEW_STEPS = 10
FEW_STEP_NAME = "ancestral DDIM (eta 1)"
OUTPUTS = ("demo_digits.png", "demo_digits_20evals.png", "ncsn_toy.png")  # the images run() writes into its folder


def shipped_checkpoint() -> str:
    """The path of the small NCSNv2 digits checkpoint shipped in the package (fastscore/checkpoints/)."""
    from importlib import resources

    return str(resources.files("fastscore") / "checkpoints" / CHECKPOINT)


def speed_words(seconds: float, ref_seconds: float) -> str:
    """How fastscore's time compares with the reference's, in words: '1.90x faster', '1.04x slower' (the demo's
    speed lines and ``fastscore sample --reference``)."""
    if not seconds > 0 or not ref_seconds > 0:
        return "not timed (a time of zero)"
    ratio = ref_seconds / seconds
    if round(ratio, 2) == 1.0:
        return "as fast (1.00x)"
    return f"{ratio:.2f}x faster" if ratio > 1 else f"{1 / ratio:.2f}x slower"


def median_times(fns: dict, rounds: int) -> dict:
    """Median seconds per call of each function, timed interleaved (A B A B ...) after one warm-up call each,
    so that the machine's drift hits every provider alike."""
    import statistics
    import time

    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def digits(out_dir: str, quick: bool) -> tuple[str, str]:
    """(1): samples of the shipped checkpoint, by annealed Langevin and in 20 evaluations (:data:`FEW_STEP`),
    as two grids in ``out_dir``; returns their paths."""
    import time

    import torch

    from fastscore.data.images import save_image_grid
    from fastscore.model_sampling import annealed_langevin_sample
    from fastscore.train import model_from_checkpoint

    path = shipped_checkpoint()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the shipped checkpoint {path!r} is missing: reinstall fastscore")
    model, config, meta = model_from_checkpoint(path)
    model = model.to(memory_format=torch.channels_last)
    n, steps_each = (16, QUICK_STEPS_EACH) if quick else (64, config.sampling.n_steps_each)
    start = time.perf_counter()
    images = annealed_langevin_sample(model, config, n, seed=0, n_steps_each=steps_each, progress=not quick)
    seconds = time.perf_counter() - start
    target = os.path.join(out_dir, "demo_digits.png")
    save_image_grid(target, images, nrow=8)  # enlarged to at least 512 pixels: 4x for 8 columns of 16x16
    levels = config.model.num_classes
    print(f"(1) digits: {n} samples of NCSNv2 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"trained {meta.get('step', '?')} steps on scikit-learn's digits), annealed Langevin {levels} levels x "
          f"{steps_each} steps, in {seconds:.1f} s -> {target}")  # fmt: skip
    # --quick: one row of 8 in 10 steps; at such small batches a network call costs about the same whatever the
    # batch, so the calls set the time: 10 add a fifth to the 49 of --quick's annealed Langevin (20: two fifths)
    fast_target = few_step_digits(out_dir, model, config, meta, 8 if quick else n, levels * steps_each + 1,
                                  QUICK_FEW_STEPS if quick else FEW_STEP["steps"])  # fmt: skip
    return target, fast_target


def few_step_digits(out_dir: str, model, config, meta: dict, n: int, ald_evals: int, steps: int = 20) -> str:
    """(1), second grid: ``n`` samples of the same model by :data:`FEW_STEP`'s solver in ``steps`` steps (as many
    evaluations), from seed 0, in ``out_dir``; returns its path. ``ald_evals``: the annealed-Langevin run's
    evaluations, for the line (which compares evaluations, not the two runs' times: they are not interleaved,
    and on a shared machine the load changes between them)."""
    import time

    from fastscore.data.images import inverse_data_transform
    from fastscore.data.images import save_image_grid
    from fastscore.model_sampling import batch_invariant
    from fastscore.model_sampling import sde_for
    from fastscore.solvers import solve

    score, sde = sde_for(model, config, meta)  # the VE SDE spanning the model's noise levels, nearest level's label
    shape = (n, config.data.channels, config.data.image_size, config.data.image_size)
    start = time.perf_counter()
    x, info = solve(batch_invariant(score), sde, shape, seed=0, return_info=True, **{**FEW_STEP, "steps": steps})
    seconds = time.perf_counter() - start
    target = os.path.join(out_dir, "demo_digits_20evals.png")
    save_image_grid(target, inverse_data_transform(config, x), nrow=8)
    print(f"    the same model in {info.nfe} evaluations ({FEW_STEP_NAME}, {steps} steps), "
          f"{ald_evals / info.nfe:.1f}x fewer than annealed Langevin's {ald_evals}: {n} samples in {seconds:.1f} s "
          f"-> {target}")  # fmt: skip
    return target


def toy(out_dir: str, quick: bool) -> str:
    """(2): ncsn's toy experiment, a scatter plot of the data and both samplers' chains in ``out_dir``; returns
    its path."""
    import math

    import torch

    from fastscore.data.images import scatter_panels
    from fastscore.data.toy import ncsn_toy_mixture
    from fastscore.sampling import annealed_langevin
    from fastscore.sampling import langevin

    mix = ncsn_toy_mixture()
    n = 1280
    start = torch.rand(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 16 - 8
    # ncsn's toy: plain Langevin on the exact data score, lr 0.1 -> step lr/2, 1000 steps; annealed: 10 levels
    # from 20 down to 1, 100 steps each at lr 0.1 (sigma / sigma_L)^2. The score at level sigma is that of the
    # mixture whose components have std sigma (ncsn's GMMDistAnneal), i.e. the data convolved with
    # N(0, sigma^2 - 1).
    plain = langevin(lambda x: mix.score(x), start, step_size=0.05, n_steps=1000, seed=1)
    sigmas = torch.exp(torch.linspace(math.log(20.0), 0.0, 10, dtype=torch.float64))
    extra = (sigmas**2 - 1).clamp_min(0).sqrt()
    annealed = annealed_langevin(
        lambda x, labels: mix.score(x, extra[labels]), start, sigmas, n_steps_each=100, step_lr=0.05, denoise=False,
        seed=2,
    )  # fmt: skip
    truth = mix.sample(n, seed=3)

    def weights(x):
        near = float(((x - torch.tensor([5.0, 5.0], dtype=x.dtype)).norm(dim=1) < (x + 5).norm(dim=1)).double().mean())
        return near, 1 - near

    target = os.path.join(out_dir, "ncsn_toy.png")
    titles = [f"data: {weights(truth)[0]:.2f} / {weights(truth)[1]:.2f}",
              f"Langevin: {weights(plain)[0]:.2f} / {weights(plain)[1]:.2f}",
              f"annealed Langevin: {weights(annealed)[0]:.2f} / {weights(annealed)[1]:.2f}"]  # fmt: skip
    scatter_panels(target, [truth, plain, annealed], titles=titles,
                   colors=[(90, 90, 90), (214, 39, 40), (31, 119, 180)])  # fmt: skip
    w_plain, w_ann = weights(plain), weights(annealed)
    print("(2) NCSN toy: 0.8 N((5,5), I) + 0.2 N((-5,-5), I), exact scores, 1280 chains from U[-8, 8]^2")
    print(f"    recovered weights: Langevin {w_plain[0]:.3f} / {w_plain[1]:.3f}, annealed Langevin "
          f"{w_ann[0]:.3f} / {w_ann[1]:.3f} (true 0.8 / 0.2) -> {target}")  # fmt: skip
    return target


def speed(quick: bool) -> None:
    """(3): the fused vs reference speed of one Langevin step and one NCSNv2 forward, printed."""
    import torch

    from fastscore.models import get_config
    from fastscore.models import get_model
    from fastscore.ops import langevin_step_

    rounds = 3 if quick else 7
    # (a) one Langevin step on a CIFAR-10-sized batch: ncsnv2's eager update vs the fused in-place kernel.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=gen)
    g = torch.randn(64, 3, 32, 32, generator=gen)
    step = 1.5e-3

    def eager():
        noise = torch.randn_like(x)
        return x + step * g + noise * (2 * step) ** 0.5

    def fused():
        return langevin_step_(x, g, step, seed=0, counter=0)

    t = median_times({"eager": eager, "fused": fused}, rounds)
    print(f"(3) speed, median of {rounds} interleaved rounds, {torch.get_num_threads()} threads:")
    print(f"    one Langevin step (64x3x32x32): ncsnv2 eager {t['eager'] * 1e3:.2f} ms, fastscore "
          f"{t['fused'] * 1e3:.2f} ms: fastscore is {speed_words(t['fused'], t['eager'])}")  # fmt: skip
    # (b) one forward of the demo's NCSNv2 at its sampling batch: reference layers vs fused ones.
    config = get_config("demo_digits")
    torch.manual_seed(0)
    reference = get_model(config, layers="reference").eval()
    fast = get_model(config).eval()
    fast.load_state_dict(reference.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    batch = 16 if quick else 64
    xs = torch.rand(batch, 1, 16, 16, generator=gen)
    xs_cl = xs.contiguous(memory_format=torch.channels_last)
    labels = torch.zeros(batch, dtype=torch.long)
    with torch.no_grad():
        t = median_times({"eager": lambda: reference(xs, labels), "fused": lambda: fast(xs_cl, labels)}, rounds)
    print(f"    one NCSNv2 forward (ngf 32, {batch}x1x16x16): ncsnv2 layers {t['eager'] * 1e3:.1f} ms, fastscore "
          f"{t['fused'] * 1e3:.1f} ms: fastscore is {speed_words(t['fused'], t['eager'])}")  # fmt: skip


def run(out_dir: str, quick: bool = False) -> None:
    """The whole demo: (1), (2) and (3), the images written into ``out_dir`` (which must exist). ``quick``:
    fewer samples, steps and rounds (seconds, for CI). A missing shipped checkpoint is a FileNotFoundError."""
    digits(out_dir, quick)
    toy(out_dir, quick)
    speed(quick)
