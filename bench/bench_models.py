"""Whole score networks: ncsnv2's formulation (eager), torch.compile of it, and fastscore's fused layers.

Cases, at 32x32 RGB, batch 16: NCSNv2 (CIFAR-10 config, 232 noise levels) with ngf 32 and 64, and the
conditional NCSN (ncsn's CondRefineNetDilated, 10 levels) with ngf 32.
(a) "fwd": one forward pass without autograd (what the samplers repeat thousands of times);
(b) "train": one training step as ncsnv2 runs it: draw labels and noise (anneal_dsm), the DSM loss,
    backward, Adam (lr 1e-4).

Providers: "eager" (``layers="reference"``: ncsnv2's layer code re-expressed, the numerics of the
originals), "compile" (torch.compile of that model; for training, of the loss function), "fastscore"
(``layers="fused"``, channels_last input and ``model.to(memory_format=torch.channels_last)``, so that
no convolution reorders its weight on every call). All start from the same weights (one state_dict loaded into
each). Agreement: forward outputs within float32 tolerance; training: the losses, and the parameters
after one Adam step (Adam's first step moves each weight by about lr * sign(gradient), so a gradient
within rounding of zero may flip a step: at most 0.1% of the weights may differ, by at most 2 lr).

    pytest bench/bench_models.py --benchmark-only    # pytest-benchmark, grouped by case
    fastscore bench models [--quick]                  # the ratio table, then where the fused forward's time goes

``run`` prints the table and then a torch.profiler summary of the fused forward (top ops by self CPU
time). torch.compile takes minutes per model on 2 cores: ``--quick`` (NCSNv2 ngf 32 only) compiles two graphs.

Known: with torch 2.13 on CPU, torch.compile (Inductor; not aot_eager) of the conditional NCSN's training
step returns the right loss but zero gradients for 154 of its 173 parameters (every block compiled alone is
right). The agreement check catches it; that case is then timed without the "compile" provider.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from fastscore.models import NCSN
from fastscore.models import NCSNv2
from fastscore.models import get_config
from fastscore.models import get_sigmas

try:  # run as part of the installed package (fastscore bench) or by pytest from the source tree
    from fastscore._bench import _harness
except ImportError:  # pragma: no cover
    import _harness

OP = "models"
BATCH, SIZE = 16, 32
LR = 1e-4
CASES = [("NCSNv2", 32), ("NCSNv2", 64), ("NCSN", 32)]
QUICK_CASES = CASES[:1]


def _label(case) -> str:
    arch, ngf = case
    return f"{arch} ngf{ngf} {SIZE}x{SIZE} b{BATCH}"


def make_config(arch: str, ngf: int):
    config = get_config("cifar10" if arch == "NCSNv2" else "ncsn_cifar10")
    config.model.ngf = ngf
    return config


def build(arch: str, ngf: int, layers: str, state=None):
    cls = NCSNv2 if arch == "NCSNv2" else NCSN
    torch.manual_seed(0)
    model = cls(make_config(arch, ngf), layers=layers)
    if state is not None:
        model.load_state_dict(state)
    return model


def make_inputs(config, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, config.data.channels, SIZE, SIZE, generator=gen).to(device)
    y = torch.randint(0, config.model.num_classes, (BATCH,), generator=gen).to(device)
    return x, y


def draw(samples, sigmas, gen):
    """ncsnv2 ``anneal_dsm_score_estimation``'s random draws, in its order: labels, then noise."""
    labels = torch.randint(0, len(sigmas), (samples.shape[0],), generator=gen).to(samples.device)
    noise = torch.randn(samples.shape, generator=gen).to(samples.device)
    if _channels_last(samples):
        noise = noise.contiguous(memory_format=torch.channels_last)
    return labels, noise


def dsm_loss(scorenet, samples, sigmas, labels, noise, anneal_power=2.0):
    """ncsnv2 ``anneal_dsm_score_estimation`` after its draws (the part torch.compile compiles).

    ``reshape`` where ncsnv2 writes ``view`` (identical on its contiguous tensors; a channels_last score
    cannot be viewed flat).
    """
    used_sigmas = sigmas[labels].view(samples.shape[0], *([1] * len(samples.shape[1:])))
    noise = noise * used_sigmas
    perturbed_samples = samples + noise
    target = -1 / (used_sigmas**2) * noise
    scores = scorenet(perturbed_samples, labels)
    target = target.reshape(target.shape[0], -1)
    scores = scores.reshape(scores.shape[0], -1)
    loss = 1 / 2.0 * ((scores - target) ** 2).sum(dim=-1) * used_sigmas.squeeze() ** anneal_power
    return loss.mean(dim=0)


def _channels_last(x) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _sigmas(model, config):
    return model.sigmas if hasattr(model, "sigmas") else get_sigmas(config)


# ---- (a) forward ------------------------------------------------------------------------------------


def forward_providers(case, device="cpu", with_compile=True, names=None):
    arch, ngf = case
    eager = build(arch, ngf, "reference").to(device).eval()
    state = eager.state_dict()
    x, y = make_inputs(eager.config, device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    wanted = set(names or ("eager", "compile", "fastscore"))
    providers = {}

    def no_grad(model, inp):
        def call():
            with torch.no_grad():
                return model(inp, y)

        return call

    if "eager" in wanted:
        providers["eager"] = no_grad(eager, x)
    if with_compile and "compile" in wanted:
        providers["compile"] = no_grad(torch.compile(copy.deepcopy(eager), dynamic=False), x)
    if "fastscore" in wanted:
        fused = build(arch, ngf, "fused", state).to(device, memory_format=torch.channels_last).eval()
        providers["fastscore"] = no_grad(fused, x_cl)
    return providers


# ---- (b) training step --------------------------------------------------------------------------------


def _train_step(model, loss_fn, optimizer, x, sigmas):
    gen = torch.Generator()

    def step():
        gen.manual_seed(1)  # the same labels and noise at every call, for every provider
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, sigmas, *draw(x, sigmas, gen))
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def train_providers(case, device="cpu", with_compile=True, names=None):
    arch, ngf = case
    base = build(arch, ngf, "reference")
    state = base.state_dict()
    config = base.config
    x, _ = make_inputs(config, device)
    wanted = set(names or ("eager", "compile", "fastscore"))
    providers, models = {}, {}

    def add(name, layers, loss_fn, inp):
        model = build(arch, ngf, layers, state).to(device).train()
        if _channels_last(inp):  # channels_last end to end: the conv weights too (no per-call weight reorder)
            model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
        models[name] = model
        providers[name] = _train_step(model, loss_fn, optimizer, inp, _sigmas(model, config).to(device))

    if "eager" in wanted:
        add("eager", "reference", dsm_loss, x)
    if with_compile and "compile" in wanted:
        add("compile", "reference", torch.compile(dsm_loss, dynamic=False), x)
    if "fastscore" in wanted:
        add("fastscore", "fused", dsm_loss, x.contiguous(memory_format=torch.channels_last))
    return providers, models


def _disagreement(name, loss, want_loss, params, ref_params) -> str | None:
    """Why provider ``name``'s first training step differs from eager's, or None."""
    tol = 1e-4 * max(1.0, want_loss.abs().item())
    if (loss - want_loss).abs().item() > tol:
        return f"loss {loss.item()} vs eager {want_loss.item()}"
    moved = total = 0
    for key, p in params:
        diff = (p.detach() - ref_params[key].detach()).abs()
        if diff.max().item() > 2.05 * LR:
            return f"{key} differs by {diff.max().item():.3e} after one Adam step"
        moved += int((diff > 1e-6).sum())
        total += diff.numel()
    if moved > 1e-3 * total:
        return f"{moved} of {total} weights differ from eager's after one Adam step"
    return None


def _train_check(models):
    """Losses and updated weights agree with eager's. fastscore must agree; a disagreeing compiled provider
    is reported and dropped from the timing (torch 2.13's Inductor computes zero gradients for 154 of the
    173 parameters of the conditional NCSN, see the module docstring), not timed as if it were right."""

    def check(results):
        want_loss = results["eager"]
        ref_params = dict(models["eager"].named_parameters())
        for name, loss in list(results.items()):
            if name == "eager":
                continue
            why = _disagreement(name, loss, want_loss, models[name].named_parameters(), ref_params)
            if why is None:
                continue
            assert "compile" in name, f"train: {name}: {why}"
            print(f"NOTE: {name}: the training step disagrees with eager ({why}); left out of this case")
            results.pop(name)  # measure() times what the check left

    return check


# ---- the table -----------------------------------------------------------------------------------------


def cases(quick=False, device="cpu", with_compile=True):
    out = []
    for case in QUICK_CASES if quick else CASES:
        out.append(
            _harness.Case(
                f"fwd {_label(case)}",
                forward_providers(case, device, with_compile),
                _harness.agree_or_drop("eager", ("compile",), what="forward", rtol=1e-4, atol=1e-3),
            )
        )
        providers, models = train_providers(case, device, with_compile)
        out.append(_harness.Case(f"train {_label(case)}", providers, _train_check(models), capability_rows=False))
    return out


def profile_fused_forward(case=QUICK_CASES[0], device="cpu", row_limit=12) -> str:
    """torch.profiler table of one fused forward (channels_last input): where its time goes."""
    provider = forward_providers(case, device, with_compile=False, names=("fastscore",))["fastscore"]
    for _ in range(2):
        provider()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        provider()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


def _load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"load average {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min) on {os.cpu_count()} CPUs"
    except OSError:  # pragma: no cover
        return "load average unknown"


def run(quick=False, device="cpu", rounds=None, record=True, csv_path=None):
    """`fastscore bench models`: the ratio table, then a profile of the fused forward."""
    print(f"machine: {_load()} before the run", flush=True)
    rows = _harness.run(
        OP,
        cases(quick, device),
        rounds=rounds or (5 if quick else 9),
        device=device,
        quick=quick,
        record=record,
        csv_path=csv_path,
    )
    print(f"machine: {_load()} after the run")
    print(f"\nwhere the time goes in the fused forward ({_label(QUICK_CASES[0])}, channels_last, no grad):")
    print(profile_fused_forward(device=device), flush=True)
    return rows


# ---- pytest-benchmark: `pytest bench/bench_models.py --benchmark-only` ------------------------------

PROVIDERS = ["eager", "compile", "fastscore"]


@pytest.mark.parametrize("case", CASES, ids=_label)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_forward(benchmark, case, provider):
    benchmark.group = f"{OP} fwd {_label(case)}"
    fn = forward_providers(case, with_compile=provider == "compile", names=(provider,))[provider]
    benchmark(fn)


@pytest.mark.parametrize("case", CASES, ids=_label)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, case, provider):
    benchmark.group = f"{OP} train {_label(case)}"
    providers, _ = train_providers(case, with_compile=provider == "compile", names=(provider,))
    benchmark(providers[provider])
