"""Achieved memory bandwidth of every fused op on a GPU: the cuda and triton backends, the eager PyTorch
formulation the benches compare with, and a device-to-device copy of the same bytes.

Per op, kind (fwd, fwd+bwd, jvp, in place, ...) and shape (the benches' own, bench/bench_<op>.py):

- bytes: the fewest the op must move through device memory (each input read once, each output written
  once; per-sample and per-channel parameters left out);
- per provider, the median time of a call, measured with CUDA events two ways: "stream", back-to-back
  eager calls (Python and launch overhead show where they are slower than the GPU), and "graph", the same
  calls replayed from a CUDA graph (the kernels alone, where the provider can be captured);
- GB/s = bytes / time, and of_copy = the time of ``dst.copy_(src)`` moving the same bytes (read + written)
  over the provider's: 1.00 runs at the copy's bandwidth, the practical ceiling of a memory-bound op;
- eager/x: how many times faster than the eager formulation (stream timings).

Inputs rotate among enough copies to exceed the L2 cache, so the numbers are device memory's, not the
cache's. Run by bench/gpu_check.sh; ``--device cpu`` (perf_counter timing, no graphs, the cpp backend)
only checks this script on a machine without a GPU. Exit status: 0, 1 if a provider failed, 3 without a
CUDA device (nothing ran).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastscore
from fastscore.ops import counter_randn
from fastscore.ops import crp_pool
from fastscore.ops import elu
from fastscore.ops import langevin_corrector_step_
from fastscore.ops import langevin_step_
from fastscore.ops import sde_update_

try:  # the benches' shapes and eager formulations: from the source tree (bench/ is this file's folder) ...
    import bench_cond_instance_norm as b_cin
    import bench_crp_pool as b_crp
    import bench_elu as b_elu
    import bench_langevin_step as b_lgv
except ImportError:  # pragma: no cover  (... or from the installed package)
    from fastscore._bench import bench_cond_instance_norm as b_cin
    from fastscore._bench import bench_crp_pool as b_crp
    from fastscore._bench import bench_elu as b_elu
    from fastscore._bench import bench_langevin_step as b_lgv

NO_CUDA = 3
ROTATE_BYTES = 128 << 20  # inputs rotate over at least this much: over twice the L2 cache of an H100 or H200
MAX_SETS = 32

# A provider factory: given the index of an input set, a zero-argument callable doing one call on it.
Factory = Callable[[int], Callable[[], object]]


@dataclass
class Case:
    op: str
    kind: str
    label: str
    nbytes: int  # the fewest bytes one call moves (read + written)
    providers: dict[str, Factory]  # "eager", backend names; "copy" is added by the runner


# ---- timing ---------------------------------------------------------------------------------------


class Timer:
    """Median milliseconds per call of fns (cycled), on CUDA with events, on CPU with perf_counter."""

    def __init__(self, device: str, trials: int):
        self.device, self.trials = device, trials

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _elapsed(self, run: Callable[[], None]) -> float:
        if self.device != "cuda":
            start = time.perf_counter()
            run()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def stream(self, fns: list[Callable[[], object]], calls: int) -> float:
        def run():
            for j in range(calls):
                fns[j % len(fns)]()

        for fn in fns:  # warm-up: Triton compiles, the allocator fills, caches settle
            fn()
        run()
        self._sync()
        return statistics.median(self._elapsed(run) for _ in range(self.trials)) / calls

    def graph(self, fns: list[Callable[[], object]], calls: int) -> float | None:
        """Per call, replaying a CUDA graph of `calls` calls (None on CPU)."""
        if self.device != "cuda":
            return None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
            for fn in fns:
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for j in range(calls):
                fns[j % len(fns)]()
        graph.replay()
        self._sync()
        ms = statistics.median(self._elapsed(graph.replay) for _ in range(self.trials)) / calls
        del graph
        return ms


# ---- cases ----------------------------------------------------------------------------------------


def _with(backend: str | None, fn: Callable[[], object]) -> Callable[[], object]:
    if backend is None:
        return fn

    def run():
        with fastscore.use_backend(backend):
            return fn()

    return run


def _fused(backends: list[str], make: Callable[[int, str | None], Callable[[], object]]) -> dict[str, Factory]:
    """{"eager": make(i, None), backend: make(i, backend) under use_backend(backend)} as factories."""
    out: dict[str, Factory] = {"eager": lambda i: make(i, None)}
    for b in backends:
        out[b] = lambda i, b=b: _with(b, make(i, b))
    return out


def _channels_last(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def _esize(dtype=torch.float32) -> int:
    return torch.empty((), dtype=dtype).element_size()


def cin_cases(device, backends, quick) -> list[Case]:
    cases = []
    for k, shape in enumerate(b_cin.SHAPES[:1] if quick else b_cin.SHAPES):
        size = math.prod(shape) * _esize()

        def inputs(i, shape=shape, grad=False):
            x, gamma, alpha, beta = b_cin.make_inputs(shape, device, requires_grad=grad)
            return x, gamma, alpha, beta

        def fwd(i, backend, inputs=inputs):
            args = inputs(i)
            fn = b_cin.ncsnv2_norm_elu if backend is None else b_cin.fastscore_norm_elu

            def call():
                with torch.no_grad():
                    return fn(*args)

            return call

        def fwd_bwd(i, backend, inputs=inputs, shape=shape):
            args = inputs(i, grad=True)
            grad = torch.randn(shape, device=device)
            fn = b_cin.ncsnv2_norm_elu if backend is None else b_cin.fastscore_norm_elu
            return lambda: torch.autograd.grad(fn(*args), args, grad)

        def jvp(i, backend, inputs=inputs):
            x, gamma, alpha, beta = inputs(i)
            v = torch.randn_like(x)
            fn = b_cin.ncsnv2_norm_elu if backend is None else b_cin.fastscore_norm_elu
            return lambda: torch.func.jvp(lambda y: fn(y, gamma, alpha, beta), (x,), (v,))

        label = b_cin_label(shape)
        cases.append(Case("cond_instance_norm", "fwd", label, 2 * size, _fused(backends, fwd)))
        cases.append(Case("cond_instance_norm", "fwd+bwd", label, 5 * size, _fused(backends, fwd_bwd)))
        if k == 0:
            cases.append(Case("cond_instance_norm", "jvp", label, 4 * size, _fused(backends, jvp)))
    return cases


def b_cin_label(shape, layout: str = "nchw") -> str:
    return f"{'x'.join(map(str, shape))} {'NHWC' if layout == 'channels_last' else 'NCHW'}"


def crp_cases(device, backends, quick) -> list[Case]:
    cases = []
    shapes = b_crp.SHAPES[:1] if quick else b_crp.SHAPES
    largest = max(shapes, key=math.prod)
    for shape in shapes:
        size = math.prod(shape) * _esize()
        # NHWC on the largest shape only: the layouts' kernels differ, the shapes' cost is what NCHW shows
        for layout in ("nchw", "channels_last") if shape == largest else ("nchw",):
            for mode in ("max", "avg"):

                def fwd(i, backend, shape=shape, layout=layout, mode=mode):
                    x = b_crp.make_input(shape, layout, device)
                    fn = b_crp.EAGER[mode] if backend is None else (lambda t: crp_pool(t, mode=mode))

                    def call():
                        with torch.no_grad():
                            return fn(x)

                    return call

                def fwd_bwd(i, backend, shape=shape, layout=layout, mode=mode):
                    x = b_crp.make_input(shape, layout, device, requires_grad=True)
                    grad = _channels_last(torch.randn(shape, device=device), layout)
                    fn = b_crp.EAGER[mode] if backend is None else (lambda t: crp_pool(t, mode=mode))
                    return lambda: torch.autograd.grad(fn(x), x, grad)

                def jvp(i, backend, shape=shape, layout=layout, mode=mode):
                    x = b_crp.make_input(shape, layout, device)
                    v = torch.randn_like(x)
                    fn = b_crp.EAGER[mode] if backend is None else (lambda t: crp_pool(t, mode=mode))
                    return lambda: torch.func.jvp(fn, (x,), (v,))

                label = f"{b_cin_label(shape, layout)} {mode}"
                cases.append(Case("crp_pool", "fwd", label, 2 * size, _fused(backends, fwd)))
                if shape == largest:
                    bwd_bytes = (5 if mode == "max" else 4) * size
                    cases.append(Case("crp_pool", "fwd+bwd", label, bwd_bytes, _fused(backends, fwd_bwd)))
                    if layout == "nchw":
                        cases.append(Case("crp_pool", "jvp", label, 4 * size, _fused(backends, jvp)))
    return cases


def elu_cases(device, backends, quick) -> list[Case]:
    cases = []
    shapes = b_elu.SHAPES[:1] if quick else b_elu.SHAPES
    largest = max(shapes, key=math.prod)
    for shape in shapes:
        size = math.prod(shape) * _esize()
        for layout in ("nchw", "channels_last") if shape == largest else ("nchw",):

            def fwd(i, backend, shape=shape, layout=layout):
                x = b_elu.make_input(shape, layout, device)
                fn = b_elu.eager_elu if backend is None else elu

                def call():
                    with torch.no_grad():
                        return fn(x)

                return call

            def in_place(i, backend, shape=shape, layout=layout):
                x = b_elu.make_input(shape, layout, device)
                fn = b_elu.eager_elu_ if backend is None else (lambda t: elu(t, out=t))

                def call():
                    with torch.no_grad():
                        return fn(x)

                return call

            label = b_cin_label(shape, layout)
            cases.append(Case("elu", "fwd", label, 2 * size, _fused(backends, fwd)))
            cases.append(Case("elu", "in place", label, 2 * size, _fused(backends, in_place)))
        if shape == largest:

            def fwd_bwd(i, backend, shape=shape):
                x = b_elu.make_input(shape, "nchw", device).requires_grad_()
                grad = torch.randn(shape, device=device)
                fn = b_elu.eager_elu if backend is None else elu
                return lambda: torch.autograd.grad(fn(x), x, grad)

            def jvp(i, backend, shape=shape):
                x = b_elu.make_input(shape, "nchw", device)
                v = torch.randn_like(x)
                fn = b_elu.eager_elu if backend is None else elu
                return lambda: torch.func.jvp(fn, (x,), (v,))

            label = b_cin_label(shape)
            cases.append(Case("elu", "fwd+bwd", label, 5 * size, _fused(backends, fwd_bwd)))
            cases.append(Case("elu", "jvp", label, 4 * size, _fused(backends, jvp)))
    return cases


def _eager_sde(x, score, a, b, c):
    """score_sde's predictor update (Euler-Maruyama / reverse diffusion): x_mean = a x + b s, x = x_mean + c z."""
    x_mean = a * x + b * score
    return x_mean + c * torch.randn_like(x), x_mean


def _eager_corrector(x, score, snr, alpha):
    """score_sde's LangevinCorrector step (batch-mean norms)."""
    noise = torch.randn_like(x)
    n = x.shape[0]
    grad_norm = torch.norm(score.reshape(n, -1), dim=-1).mean()
    noise_norm = torch.norm(noise.reshape(n, -1), dim=-1).mean()
    step = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
    x_mean = x + step * score
    return x_mean + torch.sqrt(step * 2) * noise, x_mean


def lgv_cases(device, backends, quick) -> list[Case]:
    cases = []
    # the benches' sampler batches, and a large one (4M elements, bench_langevin_step's pytest shape)
    shapes = b_lgv.SHAPES[:1] if quick else list(b_lgv.SHAPES) + [(4096, 1024)]
    step = b_lgv.STEP
    for k, shape in enumerate(shapes):
        size = math.prod(shape) * _esize()
        counter = iter(range(1 << 62))

        def make(i, shape=shape):
            x, grad = b_lgv.make_inputs(shape, device)
            return x, grad

        def generated(i, backend, make=make, counter=counter):
            x, grad = make(i)
            if backend is None:
                return lambda: b_lgv.ncsnv2_step(x, grad, step)
            return lambda: langevin_step_(x, grad, step, seed=b_lgv.SEED, counter=next(counter))

        def given(i, backend, make=make):
            x, grad = make(i)
            noise = torch.randn_like(x)
            if backend is None:
                return lambda: x + step * grad + math.sqrt(2 * step) * noise
            return lambda: langevin_step_(x, grad, step, noise=noise)

        def sde(i, backend, make=make):
            x, grad = make(i)
            x_mean = torch.empty_like(x)
            a, b, c = 1.001, step, math.sqrt(step)
            if backend is None:
                return lambda: _eager_sde(x, grad, a, b, c)
            return lambda: sde_update_(x, grad, x_scale=a, score_scale=b, noise_scale=c, x_mean=x_mean, seed=7)

        def corrector(i, backend, make=make):
            x, grad = make(i)
            x_mean = torch.empty_like(x)
            if backend is None:
                return lambda: _eager_corrector(x, grad, 0.16, 0.99)
            return lambda: langevin_corrector_step_(x, grad, 0.16, alpha=0.99, per_sample=False, x_mean=x_mean, seed=7)

        def randn(i, backend, shape=shape):
            if backend is None:
                return lambda: torch.randn(shape, device=device)
            return lambda: counter_randn(shape, seed=b_lgv.SEED, counter=3, device=device)

        label = "x".join(map(str, shape))
        cases.append(Case("langevin_step_", "generated noise", label, 3 * size, _fused(backends, generated)))
        if k == 0 or shape == shapes[-1]:
            cases.append(Case("langevin_step_", "given noise", label, 4 * size, _fused(backends, given)))
            cases.append(Case("sde_update_", "x_mean", label, 4 * size, _fused(backends, sde)))
            cases.append(Case("langevin_corrector_step_", "batch norms", label, 5 * size, _fused(backends, corrector)))
            cases.append(Case("counter_randn", "vs torch.randn", label, size, _fused(backends, randn)))
    return cases


ALL = {"cond_instance_norm": cin_cases, "crp_pool": crp_cases, "elu": elu_cases, "langevin": lgv_cases}


# ---- runner ---------------------------------------------------------------------------------------


def _copy_factory(nbytes: int, device: str) -> Factory:
    """dst.copy_(src) reading nbytes / 2 and writing nbytes / 2: the same traffic as the case."""
    n = max(1, nbytes // 2 // _esize())

    def make(i):
        src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
        return lambda: dst.copy_(src)

    return make


def _fmt(ms: float | None, nbytes: int, copy_ms: float | None) -> str:
    if ms is None:
        return f"{'-':>10} {'-':>7} {'-':>7}"
    gbs = nbytes / (ms * 1e-3) / 1e9
    frac = f"{copy_ms / ms:.2f}" if copy_ms else "-"
    return f"{ms * 1e3:>10.1f} {gbs:>7.0f} {frac:>7}"


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _warm(cases: list[Case], backends: list[str], device: str) -> int:
    """One call of each fused provider of each case: compiles what a timing run would compile first."""
    failed = 0
    for case in cases:
        for name in backends:
            try:
                case.providers[name](0)()
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as exc:  # report it and go on
                failed += 1
                print(f"FAIL {case.op} {case.kind} {case.label} {name}: {_first_line(exc)}", flush=True)
    print(f"gpu_bandwidth --warm: {len(cases)} cases, {failed} provider failures")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--ops", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--quick", action="store_true", help="the first shape of each bench only")
    parser.add_argument("--trials", type=int, default=10, help="timed repetitions; the median is reported")
    parser.add_argument("--no-graph", action="store_true", help="stream timings only")
    parser.add_argument("--backends", help="comma-separated fused backends (default: cuda,triton; cpu: cpp)")
    parser.add_argument(
        "--warm", action="store_true", help="one call of each fused provider, no timing (fills Triton's cache)"
    )
    args = parser.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if any(o not in ALL for o in ops):
        parser.error(f"--ops: choose from {', '.join(ALL)}")
    device = args.device
    default = "cuda,triton" if device == "cuda" else "cpp"
    backends = [b.strip() for b in (args.backends or default).split(",") if b.strip()]
    cases = [c for op in ops for c in ALL[op](device, backends, args.quick)]
    print(
        f"gpu_bandwidth: {len(cases)} cases of {', '.join(ops)}; providers eager, {', '.join(backends)}, copy",
        flush=True,
    )
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_bandwidth: needs a CUDA device; none is available (nothing ran)", flush=True)
        return NO_CUDA
    if args.warm:
        return _warm(cases, backends, device)

    torch.manual_seed(0)
    timer = Timer(device, args.trials)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", 0) >> 20
        print(
            f"device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory >> 30} GiB, L2 {l2} MiB; "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
        big = 1 << 28  # 1 GiB of float32 read and written: the copy ceiling
        src, dst = torch.randn(big, device=device), torch.empty(big, device=device)
        ms = timer.stream([lambda: dst.copy_(src)], 4)
        print(f"large copy (1 GiB read + 1 GiB written): {2 * big * 4 / (ms * 1e-3) / 1e9:.0f} GB/s")
        del src, dst
    header = (
        f"{'op':<26} {'kind':<16} {'shape':<26} {'MB':>7} {'provider':<8} "
        f"{'stream_us':>10} {'GB/s':>7} {'of_copy':>7} {'graph_us':>10} {'GB/s':>7} {'of_copy':>7} {'eager/x':>7}"
    )
    print(header)
    print("-" * len(header), flush=True)
    failed = 0
    for case in cases:
        sets = max(1, min(MAX_SETS, math.ceil(ROTATE_BYTES / case.nbytes))) if device == "cuda" else 1
        calls = max(8, sets) if device == "cuda" else 2
        providers = {"copy": _copy_factory(case.nbytes, device), **case.providers}
        times: dict[str, tuple[float | None, float | None]] = {}
        for name, factory in providers.items():
            fns, what = None, f"{case.op} {case.kind} {case.label} {name}"
            try:
                fns = [factory(i) for i in range(sets)]
                times[name] = (timer.stream(fns, calls), None)
            except Exception as exc:  # report it and go on with the other providers
                failed += 1
                print(f"FAIL {what}: {_first_line(exc)}", flush=True)
            if name in times and not args.no_graph:
                try:
                    times[name] = (times[name][0], timer.graph(fns, calls))
                except Exception as exc:  # a host sync or copy inside the op: it cannot be captured
                    torch.cuda.synchronize()
                    print(f"note: {what}: no CUDA graph timing: {_first_line(exc)}", flush=True)
            fns = None
            if device == "cuda":
                torch.cuda.empty_cache()
        copy_stream, copy_graph = times.get("copy", (None, None))
        eager_stream = times.get("eager", (None, None))[0]
        first = True
        for name, (s_ms, g_ms) in times.items():
            lead = (
                f"{case.op:<26} {case.kind:<16} {case.label:<26} {case.nbytes / 1e6:>7.1f}"
                if first
                else " " * (26 + 1 + 16 + 1 + 26 + 1 + 7)
            )
            speedup = f"{eager_stream / s_ms:.2f}" if eager_stream and s_ms and name not in ("eager", "copy") else "-"
            print(
                f"{lead} {name:<8} {_fmt(s_ms, case.nbytes, copy_stream)} {_fmt(g_ms, case.nbytes, copy_graph)} "
                f"{speedup:>7}",
                flush=True,
            )
            first = False
    print(
        "MB: the fewest bytes one call moves (read + written). of_copy: a copy of the same bytes' time over the "
        "provider's (1.00 = copy bandwidth). stream: back-to-back eager calls; graph: CUDA graph replays (kernels "
        "alone; '-' where the provider cannot be captured). eager/x: times faster than eager (stream)."
    )
    print(f"gpu_bandwidth: {'FAILED' if failed else 'done'}: {len(cases)} cases, {failed} provider failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
