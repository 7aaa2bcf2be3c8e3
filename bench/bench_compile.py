"""fastscore with torch.compile: the original model, compiled, patched, and both, in one run.

A PyTorch 2 user's first speed-up is ``torch.compile(model)``; fastscore's layers must beat it and compose
with it. For ncsnv2's NCSNv2 (CIFAR-10 config, ngf 32, batch 16, 32x32; ``--quick``) and ncsn's conditional
NCSN (ngf 32), each built from the original layers (``layers="reference"``, the originals' code):

  eager                    the original model
  compile                  torch.compile(original)
  compile cl               torch.compile(original in channels_last): the compiled original's best layout
  fastscore                fastscore.patch(original), run eagerly
  fastscore+compile        torch.compile(fastscore.patch(original))
  fastscore+compile cl     torch.compile(fastscore.patch(original, channels_last=True))

Cases: (a) "fwd": one forward without autograd (what the samplers repeat); (b) "train": one DSM training
step as ncsnv2 runs it (labels and noise drawn, the loss, backward, Adam); the compiled providers compile
the loss function (forward and backward through AOT autograd), the optimizer step runs eagerly in all.
The compile time of each compiled provider (its first call) is printed under the table, then, per case, how
many times faster the best compiled fastscore layout is than the best compiled original (compiled and fused
over compiled alone). A compiled provider whose result disagrees with eager's is reported and left out of
the timing, not timed as if it were right (tests/test_compile.py is what holds fastscore's compiled graphs
equal to eager); the eager fastscore provider must agree. Known with torch 2.13 on CPU: Inductor's
contiguous training step of NCSNv2 moves 7% of the weights unlike eager. To time what an AVX2-only CPU gets
on an AVX-512 one, set ``FASTSCORE_CPU_CAPABILITY=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``:
`fastscore bench` then compiles into an Inductor cache of its own (Inductor's cache does not key its C++
kernels on ATen's capability and would serve the AVX-512 builds: NaN; see
``fastscore._backend.separate_inductor_cache``). Compiling takes minutes on 2 cores (six graphs per case):
``--quick`` runs NCSNv2 only.

    fastscore bench compile [--quick]
"""

from __future__ import annotations

import copy
import time

import torch

import fastscore

try:  # run as part of the installed package (fastscore bench) or by pytest from the source tree
    from fastscore._bench import _harness
    from fastscore._bench import bench_models as _models
except ImportError:  # pragma: no cover
    import _harness
    import bench_models as _models

OP = "compile"
CASES = [("NCSNv2", 32), ("NCSN", 32)]
QUICK_CASES = CASES[:1]
COMPILED_ORIGINAL = ("compile", "compile cl")
COMPILED_FASTSCORE = ("fastscore+compile", "fastscore+compile cl")
COMPILED = COMPILED_ORIGINAL + COMPILED_FASTSCORE

_compile_seconds: dict[str, float] = {}


def _first_call_timed(label: str, fn):
    """fn, with the time of its first call (torch.compile's compilation) recorded under label."""
    done = False

    def call():
        nonlocal done
        if done:
            return fn()
        start = time.perf_counter()
        out = fn()
        _compile_seconds[label] = time.perf_counter() - start
        done = True
        return out

    return call


def _variant(original, name: str):
    """A copy of the original model for provider `name` (weights shared by value, not by object)."""
    model = copy.deepcopy(original)
    if name.startswith("fastscore"):
        fastscore.patch(model, channels_last=name.endswith(" cl"))
    elif name.endswith(" cl"):
        model.to(memory_format=torch.channels_last)
    return model


def forward_providers(case):
    arch, ngf = case
    original = _models.build(arch, ngf, "reference").eval()
    x, y = _models.make_inputs(original.config)
    providers = {}
    for name in ("eager", "compile", "compile cl", "fastscore", "fastscore+compile", "fastscore+compile cl"):
        model = _variant(original, name)
        if name in COMPILED:
            model = torch.compile(model, dynamic=False)

        def call(model=model):
            with torch.no_grad():
                return model(x, y).contiguous()

        providers[name] = _first_call_timed(f"fwd {_models._label(case)} {name}", call) if name in COMPILED else call
    return providers


def train_providers(case):
    arch, ngf = case
    original = _models.build(arch, ngf, "reference").train()
    config = original.config
    x, _ = _models.make_inputs(config)
    sigmas = _models._sigmas(original, config)
    providers, models = {}, {}
    for name in ("eager", "compile", "compile cl", "fastscore", "fastscore+compile", "fastscore+compile cl"):
        model = _variant(original, name)
        loss_fn = torch.compile(_models.dsm_loss, dynamic=False) if name in COMPILED else _models.dsm_loss
        optimizer = torch.optim.Adam(model.parameters(), lr=_models.LR, betas=(0.9, 0.999), eps=1e-8)
        inp = x.contiguous(memory_format=torch.channels_last) if name.endswith(" cl") else x
        step = _models._train_step(model, loss_fn, optimizer, inp, sigmas)
        models[name] = model
        providers[name] = _first_call_timed(f"train {_models._label(case)} {name}", step) if name in COMPILED else step
    return providers, models


def cases(quick=False, device="cpu"):
    if device != "cpu":
        raise ValueError("device: the compile bench measures CPU compilation (Inductor's C++ code); use cpu")
    out = []
    for case in QUICK_CASES if quick else CASES:
        out.append(
            _harness.Case(
                f"fwd {_models._label(case)}",
                forward_providers(case),
                _harness.agree_or_drop("eager", COMPILED, what="forward", rtol=1e-4, atol=1e-3),
                capability_rows=False,
            )
        )
        providers, models = train_providers(case)
        check = _models._train_check(models)
        out.append(_harness.Case(f"train {_models._label(case)}", providers, check, capability_rows=False))
    return out


def run(quick=False, device="cpu", rounds=None, record=True, csv_path=None):
    """`fastscore bench compile`: the ratio table, then each compiled provider's compile time."""
    _compile_seconds.clear()
    rows = _harness.run(OP, cases(quick, device), rounds=rounds or (5 if quick else 7), device=device, quick=quick,
                        record=record, csv_path=csv_path)  # fmt: skip
    print("\ncompile time (first call, seconds):")
    for label, seconds in _compile_seconds.items():
        print(f"  {label:50s} {seconds:7.1f}")
    print("\ncompiled fastscore over compiled original (each at its fastest layout; > 1: fastscore faster):")
    for case, ratio, fused, original in compiled_speedups(rows):
        print(f"  {case:32s} {ratio:5.2f}x   {fused} over {original}")
    return rows


def compiled_speedups(rows):
    """Per case: (case, best compiled original's median / best compiled fastscore's, their provider names).
    A case whose compiled originals all disagreed with eager (and were dropped) has no row."""
    out = []
    for case in dict.fromkeys(row.case for row in rows):
        median = {row.provider: row.median_ms for row in rows if row.case == case}
        original = min((n for n in COMPILED_ORIGINAL if n in median), key=median.get, default=None)
        fused = min((n for n in COMPILED_FASTSCORE if n in median), key=median.get, default=None)
        if original and fused:
            out.append((case, median[original] / median[fused], fused, original))
    return out
