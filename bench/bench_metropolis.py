"""One MALA step without the network (and one HMC trajectory of one leapfrog step): eager vs torch.compile vs fastscore.

A Metropolis-adjusted step is: the proposal, the network's energy and score at it, the accept/reject test and
the update of the accepted samples. Everything but the network is timed: the proposal's score and energy are
stored tensors, the energy -inf, so that every proposal is accepted -- the most work the fused accept pass can
have (it copies the accepted samples' state and score; the eager step replaces every sample with
``torch.where`` whatever the decisions). Each call first resets the chain's (N,) energies, so every step is
the same step (negligible next to the (N, ...) passes).

Providers: "eager" (the step as an eager PyTorch program: ``torch.randn_like`` noise, the proposal, the
reverse-move and forward terms as per-sample sums, ``torch.rand`` uniforms, ``torch.where`` replacements),
"compile" (torch.compile of that), "fastscore" (``mala_propose`` into preallocated buffers and
``mala_accept_`` in place: two fused passes, the noise and the uniforms made in the kernels; on the CPU also
once per narrower CPU capability level), on a GPU the forced "triton" and "cuda" backends, and "copy"
(moving the bytes the step must move -- read x and the score, write the proposal; read x, the proposal and
its score -- with one copy: the floor).

    pytest bench/bench_metropolis.py --benchmark-only     # pytest-benchmark, grouped by case
    fastscore bench metropolis [--quick]                   # the ratio table (ns per element, per level)
"""

from __future__ import annotations

import math
import time

import pytest
import torch

import fastscore
from fastscore.ops import metropolis as mh

try:  # run as part of the installed package (fastscore bench) or by pytest from the source tree
    from fastscore._bench import _harness
except ImportError:  # pragma: no cover
    import _harness

OP = "metropolis"
# a CIFAR-10 batch, the 100-D Gaussian of the tests, the 2-D toy chains
SHAPES = [(64, 3, 32, 32), (512, 100), (4096, 2)]
QUICK_SHAPES = SHAPES[:1]
STEP = 0.3
SEED = 2024


def _view(v, x):
    return v.reshape((-1,) + (1,) * (x.dim() - 1))


def eager_mala_step(x, score, energy, score_prop_fn, step):
    """The MALA step as eager PyTorch, in place on (x, score, energy); ``score_prop_fn(x_prop) -> (score, energy)``
    stands for the network. Returns the decisions."""
    z = torch.randn_like(x)
    c = math.sqrt(2 * step)
    x_prop = x + step * score + c * z
    score_prop, energy_prop = score_prop_fn(x_prop)
    r = x - x_prop - step * score_prop
    log_alpha = (
        energy
        - energy_prop
        + 0.5 * z.double().square().flatten(1).sum(1)
        - r.double().square().flatten(1).sum(1) / (2 * c * c)
    )
    accepted = torch.rand(x.shape[0], dtype=torch.float64, device=x.device).log() <= log_alpha
    keep = _view(accepted, x)
    x.copy_(torch.where(keep, x_prop, x))
    score.copy_(torch.where(keep, score_prop, score))
    energy.copy_(torch.where(accepted, energy_prop, energy))
    return accepted


def eager_hmc_step(x, score, energy, score_prop_fn, step):
    """One HMC iteration with one leapfrog step, as eager PyTorch, in place on (x, score, energy)."""
    p0 = torch.randn_like(x)
    p = p0 + step / 2 * score
    x_prop = x + step * p
    score_prop, energy_prop = score_prop_fn(x_prop)
    k = p + step / 2 * score_prop
    log_alpha = (
        energy
        - energy_prop
        + 0.5 * p0.double().square().flatten(1).sum(1)
        - 0.5 * k.double().square().flatten(1).sum(1)
    )
    accepted = torch.rand(x.shape[0], dtype=torch.float64, device=x.device).log() <= log_alpha
    keep = _view(accepted, x)
    x.copy_(torch.where(keep, x_prop, x))
    score.copy_(torch.where(keep, score_prop, score))
    energy.copy_(torch.where(accepted, energy_prop, energy))
    return accepted


def make_state(shape, device="cpu"):
    """A standard normal batch with its score and energy, and the stored 'network output' at a proposal: a score,
    and the energy -inf (every proposal accepted)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    x_prop = torch.randn(shape, generator=g).to(device)
    energy = 0.5 * x.double().flatten(1).square().sum(1)
    return x, -x, energy, -x_prop, torch.full_like(energy, -math.inf)


class _Fused:
    """A chain stepped by the fused op: buffers allocated once, a new counter per step."""

    def __init__(self, shape, kind, device, backend=None):
        self.x, self.score, self.energy, self.score_prop, self.energy_prop = make_state(shape, device)
        self.energy0 = self.energy.clone()
        N = shape[0]
        self.kind, self.backend = kind, backend
        self.out = torch.empty_like(self.x)
        self.p = torch.empty_like(self.x)
        self.sq = torch.empty(N, dtype=torch.float64, device=device)
        self.accepted = torch.empty(N, dtype=torch.bool, device=device)
        self.log_alpha = torch.empty(N, dtype=torch.float64, device=device)
        self.counter = 0

    def step(self):
        kw = dict(seed=SEED, counter=self.counter)
        self.counter += 1
        self.energy.copy_(self.energy0)
        if self.kind == "mala":
            mh.mala_propose(self.x, self.score, STEP, out=self.out, z_sq=self.sq, **kw)
            return mh.mala_accept_(
                self.x,
                self.score,
                self.energy,
                self.out,
                self.score_prop,
                self.energy_prop,
                self.sq,
                STEP,
                accepted=self.accepted,
                log_alpha=self.log_alpha,
                **kw,
            ).accepted
        mh.hmc_momentum(self.x, self.score, STEP, out=self.out, p=self.p, p_sq=self.sq, **kw)
        return mh.hmc_accept_(
            self.x,
            self.score,
            self.energy,
            self.out,
            self.score_prop,
            self.energy_prop,
            self.p,
            self.sq,
            STEP,
            accepted=self.accepted,
            log_alpha=self.log_alpha,
            **kw,
        ).accepted

    def __call__(self):
        if self.backend is None:
            return self.step()
        with fastscore.use_backend(self.backend):
            return self.step()


def _gpu_backends(device):
    if device != "cuda":
        return []
    return [b for b in ("triton", "cuda") if "cuda" in fastscore.backends()[b]["devices"]]


def providers(shape, kind="mala", device="cpu", with_compile=True):
    eager_step = eager_mala_step if kind == "mala" else eager_hmc_step

    def eager_provider(step_fn):
        x, score, energy, score_prop, energy_prop = make_state(shape, device)
        energy0 = energy.clone()

        def call():
            energy.copy_(energy0)
            return step_fn(x, score, energy, lambda x_prop: (score_prop, energy_prop), STEP)

        return call

    out = {"eager": eager_provider(eager_step)}
    if with_compile:
        out["compile"] = eager_provider(torch.compile(eager_step, dynamic=False))
    fused = _Fused(shape, kind, device)
    out["fastscore"] = fused
    # the narrower CPU capability levels, each on a chain of its own (an in-place provider owns its state)
    for level in _harness.narrower_capabilities(device):
        out[f"fastscore@{level}"] = _harness.at_capability(level, _Fused(shape, kind, device))
    for name in _gpu_backends(device):
        out[name] = _Fused(shape, kind, device, backend=name)
    numel = math.prod(shape)
    src = torch.empty(3 * numel, device=device)  # 6 |x| of traffic: one copy of 3 |x| elements
    dst = torch.empty_like(src)
    out["copy"] = lambda: dst.copy_(src)
    return out


def check_step(shape, kind="mala", device="cpu"):
    """A Case.check that verifies the step instead of comparing random draws: on the standard normal (its score and
    energy at the actual proposal) the fused step equals the reference bitwise, and the eager program's log
    acceptance ratio with the fused step's noise is the fused one's; every timed provider accepted every
    proposal (the stored energy is -inf)."""

    def check(results):
        x, score, energy, _, _ = make_state(shape, device)
        kw = dict(seed=SEED, counter=99)
        if kind == "mala":
            prop = mh.mala_propose(x, score, STEP, **kw)
            sp, ep = -prop.x, 0.5 * prop.x.double().flatten(1).square().sum(1)
            want = mh.mala_accept_ref(x, score, energy, prop.x, sp, ep, prop.z_sq, STEP, **kw)
            got = mh.mala_accept_(x.clone(), score.clone(), energy.clone(), prop.x, sp, ep, prop.z_sq, STEP, **kw)
            z = fastscore.ops.counter_randn(shape, **kw, device=device)
            c = math.sqrt(2 * STEP)
            r = x - (x + STEP * score + c * z) - STEP * sp
            eager_la = (
                energy
                - ep
                + 0.5 * z.double().square().flatten(1).sum(1)
                - r.double().square().flatten(1).sum(1) / (2 * c * c)
            )
        else:
            start = mh.hmc_momentum(x, score, STEP, **kw)
            sp, ep = -start.x, 0.5 * start.x.double().flatten(1).square().sum(1)
            want = mh.hmc_accept_ref(x, score, energy, start.x, sp, ep, start.p, start.p_sq, STEP, **kw)
            got = mh.hmc_accept_(
                x.clone(), score.clone(), energy.clone(), start.x, sp, ep, start.p, start.p_sq, STEP, **kw
            )
            z = fastscore.ops.counter_randn(shape, **kw, device=device)
            k = z + STEP / 2 * score + STEP / 2 * sp
            eager_la = (
                energy - ep + 0.5 * z.double().square().flatten(1).sum(1) - 0.5 * k.double().square().flatten(1).sum(1)
            )
        assert torch.equal(got.log_alpha, want.log_alpha) and torch.equal(got.accepted, want.accepted), "fused vs ref"
        torch.testing.assert_close(got.log_alpha, eager_la, rtol=1e-4, atol=1e-3 * math.prod(shape[1:]) ** 0.5)
        for name, accepted in results.items():
            if name != "copy":
                assert bool(accepted.all()), f"{name}: a proposal of energy -inf was rejected"

    return check


REPEAT = 10  # steps per call in the back-to-back cases


def back_to_back(shape, kind="mala", device="cpu", with_compile=True):
    """REPEAT steps per call, as a sampler's loop runs them: the intra-op threads are still awake from the
    previous step (in the interleaved single-step case every provider's first call finds them asleep, and
    waking a thread costs a large share of a small step on a VM)."""

    def repeated(fn):
        def call():
            for _ in range(REPEAT):
                out = fn()
            return out

        return call

    return {name: repeated(fn) for name, fn in providers(shape, kind, device, with_compile).items()}


def cases(quick=False, device="cpu", with_compile=True):
    out = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        out.append(
            _harness.Case(
                f"mala step {_harness.shape_label(shape)}",
                providers(shape, "mala", device, with_compile),
                check_step(shape, "mala", device),
                elements=math.prod(shape),
                capability_rows=False,  # providers() brings its own fastscore@<level> chains
            )
        )
        out.append(
            _harness.Case(
                f"{REPEAT} mala steps back to back {_harness.shape_label(shape)}",
                back_to_back(shape, "mala", device, with_compile),
                check_step(shape, "mala", device),
                elements=REPEAT * math.prod(shape),
                capability_rows=False,
            )
        )
    if not quick:
        shape = SHAPES[0]
        out.append(
            _harness.Case(
                f"hmc step (1 leapfrog) {_harness.shape_label(shape)}",
                providers(shape, "hmc", device, with_compile),
                check_step(shape, "hmc", device),
                elements=math.prod(shape),
                capability_rows=False,
            )
        )
    return out


def run(quick=False, device="cpu", rounds=None, record=True, csv_path=None, with_compile=True):
    """`fastscore bench metropolis`: the ratio table (eager / fastscore is the speed-up of the fused step)."""
    return _harness.run(
        OP,
        cases(quick, device, with_compile),
        rounds=rounds or (15 if quick else 30),
        device=device,
        quick=quick,
        record=record,
        csv_path=csv_path,
    )


# ---- pytest-benchmark: `pytest bench/bench_metropolis.py --benchmark-only` ----------------------------------

PROVIDERS = ["eager", "compile", "fastscore", "copy"]


@pytest.mark.parametrize("shape", SHAPES, ids=_harness.shape_label)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_mala_step(benchmark, shape, provider):
    benchmark.group = f"{OP} mala {_harness.shape_label(shape)}"
    fn = providers(shape, "mala", with_compile=provider == "compile")[provider]
    benchmark(fn)


if __name__ == "__main__":  # pragma: no cover
    start = time.perf_counter()
    run(quick=False)
    print(f"({time.perf_counter() - start:.0f} s)")
