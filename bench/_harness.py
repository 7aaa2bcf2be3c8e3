"""Side-by-side timing for fastscore's benches (the method: docs/performance.md).

A bench module (bench/bench_<op>.py) describes Cases: for one input configuration, a set of named
providers (zero-argument callables doing the same work) plus how to check that they agree. The
harness first asserts agreement, then times the providers in the same process, interleaved
(A B C A B C ...), and reports medians and RATIOS: on shared, noisy machines an absolute time is
not stable, a ratio measured in one run is.

Baseline provider names the ratio columns refer to: "eager" (the reference repos' formulation),
"compile" (torch.compile of it) and "copy" (moving the same bytes once into a preallocated tensor:
the floor for memory-bound ops).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

BASELINES = ("eager", "compile", "copy")


@dataclass
class Case:
    """One configuration of one op: providers that do the same work, and an agreement check."""

    name: str
    providers: dict[str, Callable[[], object]]
    # check(results) raises AssertionError if the providers' results (name -> return value of one
    # call) disagree; called once before timing.
    check: Callable[[dict[str, object]], None] | None = None
    note: str = ""
    # elements one call processes (x.numel() for an elementwise or per-element op): the table then shows
    # nanoseconds per element, comparable across shapes, machines and CPU capability levels
    elements: int | None = None
    # time "fastscore" once more per narrower CPU capability level (with_capabilities); off for a case whose
    # check inspects state that every provider call changes (a model's weights after a training step)
    capability_rows: bool = True


def shape_label(shape) -> str:
    """(64, 128, 32, 32) -> "64x128x32x32", as the case names spell shapes."""
    return "x".join(map(str, shape))


def layout_label(layout: str) -> str:
    """The case names' spelling of a bench's layout: "NCHW" or "NHWC" (channels_last)."""
    return "NCHW" if layout == "nchw" else "NHWC"


def agree_with(reference: str, *, what: str, rtol: float = 1e-4, atol: float = 1e-4, skip=("copy",)):
    """A Case.check: every provider's result (a tensor or a sequence of tensors) equals `reference`'s."""

    def check(results: dict[str, object]) -> None:
        want = results[reference]
        want = list(want) if isinstance(want, (tuple, list)) else [want]
        for name, got in results.items():
            if name in skip or name == reference:
                continue
            got = list(got) if isinstance(got, (tuple, list)) else [got]
            assert len(got) == len(want), f"{what}: {name} returned {len(got)} results, {reference} {len(want)}"
            for i, (g, e) in enumerate(zip(got, want)):
                torch.testing.assert_close(
                    g, e, rtol=rtol, atol=atol, msg=lambda m, name=name, i=i: f"{what}: {name}[{i}] vs {reference}: {m}"
                )

    return check


def agree_or_drop(reference: str, droppable, *, what: str, rtol: float = 1e-4, atol: float = 1e-4):
    """A Case.check like :func:`agree_with`, except that a provider named in `droppable` (torch.compile's,
    whose defects are torch's) that disagrees is reported and dropped from the results, which :func:`measure`
    then does not time (not as if it were right); every other provider must agree."""
    agree = agree_with(reference, what=what, rtol=rtol, atol=atol)

    def check(results: dict[str, object]) -> None:
        for name in [n for n in droppable if n in results]:
            try:
                agree({reference: results[reference], name: results[name]})
            except AssertionError as err:
                why = str(err).splitlines()[-1].strip()
                print(f"NOTE: {name}: the {what} disagrees with {reference} ({why}); left out of this case")
                results.pop(name)
        agree(results)

    return check


@dataclass
class Row:
    case: str
    provider: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    ratios: dict[str, float]
    ns_per_element: float | None = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    providers: dict[str, Callable[[], object]], *, rounds: int, warmup: int = 2, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call for each provider, measured A B C A B C ... so drift hits all alike."""
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def at_capability(level: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn, run with the C++ kernels' copy for CPU capability `level`."""
    from fastscore._backend import use_cpu_capability

    def call():
        with use_cpu_capability(level):
            return fn()

    return call


def narrower_capabilities(device: str) -> list[str]:
    """The CPU capability levels below the one fastscore runs that this CPU runs too (none off the CPU)."""
    from fastscore._backend import cpu_capability
    from fastscore._backend import supported_cpu_capabilities

    return [c for c in supported_cpu_capabilities() if c != cpu_capability()] if device == "cpu" else []


def with_capabilities(providers: dict[str, Callable[[], object]], device: str) -> dict[str, Callable[[], object]]:
    """On the CPU, "fastscore" once more per narrower CPU capability level this CPU runs ("fastscore@avx2",
    "fastscore@default"): the C++ kernels' other copies, as a CPU without the wider vectors runs them. A bench
    whose provider owns state (an in-place buffer) brings its own "fastscore@<level>" providers instead."""
    if "fastscore" not in providers:
        return providers
    out = dict(providers)
    for level in narrower_capabilities(device):
        out.setdefault(f"fastscore@{level}", at_capability(level, providers["fastscore"]))
    return out


def _snapshot(result):
    if isinstance(result, torch.Tensor):
        return result.detach().clone()
    if isinstance(result, (tuple, list)):
        return type(result)(_snapshot(r) for r in result)
    return result


def measure(case: Case, *, rounds: int, device: str = "cpu") -> list[Row]:
    """Check agreement, then time. Ratios: baseline time / provider time (> 1 means faster than it),
    except against "copy", where it is provider time / copy time (how far above the floor)."""
    providers = with_capabilities(case.providers, device) if case.capability_rows else case.providers
    if case.check is not None:
        # each result copied as it comes: an in-place provider's result is its own buffer, which a later
        # provider sharing it (the same kernel at another capability level) would overwrite
        results = {name: _snapshot(fn()) for name, fn in providers.items()}
        case.check(results)
        # a check may drop a provider that must not be timed (agree_or_drop: a disagreeing torch.compile)
        providers = {name: fn for name, fn in providers.items() if name in results}
    times = time_interleaved(providers, rounds=rounds, device=device)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for name, ts in times.items():
        ratios = {}
        for base in BASELINES:
            if base in med and base != name:
                ratios[base] = med[name] / med[base] if base == "copy" else med[base] / med[name]
        ns = med[name] * 1e9 / case.elements if case.elements else None
        row = Row(case.name, name, med[name] * 1e3, _quantile(ts, 0.2) * 1e3, _quantile(ts, 0.8) * 1e3, ratios, ns)
        rows.append(row)
    return rows


def format_table(title: str, rows: list[Row]) -> str:
    header = (
        f"{'case':<34} {'provider':<18} {'median ms':>10} {'p20-p80 ms':>17} "
        f"{'eager/x':>8} {'compile/x':>9} {'x/copy':>7} {'ns/elem':>8}"
    )
    lines = [title, header, "-" * len(header)]
    last_case = None
    for r in rows:
        case = r.case if r.case != last_case else ""
        last_case = r.case

        def ratio(key, ratios=r.ratios):
            return f"{ratios[key]:.2f}" if key in ratios else "-"

        ns = f"{r.ns_per_element:.3f}" if r.ns_per_element is not None else "-"
        lines.append(
            f"{case:<34} {r.provider:<18} {r.median_ms:>10.3f} {f'{r.p20_ms:.3f}-{r.p80_ms:.3f}':>17} "
            f"{ratio('eager'):>8} {ratio('compile'):>9} {ratio('copy'):>7} {ns:>8}"
        )
    lines.append(
        "eager/x, compile/x: how many times faster than that baseline; x/copy: times the copy floor; "
        "fastscore@<level>: the C++ kernels' copy for a narrower CPU capability."
    )
    return "\n".join(lines)


# ---- results history ------------------------------------------------------------------------------

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESULTS = "fastscore-bench-results.csv"


def results_path(path: str | None = None) -> str:
    """Where ``fastscore bench`` appends its rows: ``path`` (``--csv``), else ``$FASTSCORE_BENCH_RESULTS``, else
    ./fastscore-bench-results.csv in the current folder.

    Never the shipped history bench/results.csv unless it is named: that file is the maintainers' record
    (``fastscore bench --csv bench/results.csv``), and a user's checkout or installed package stays unchanged.
    """
    path = path or os.environ.get("FASTSCORE_BENCH_RESULTS") or DEFAULT_RESULTS
    return os.path.abspath(path)


def _header(path: str) -> list[str]:
    try:
        with open(path, newline="") as f:
            return next(csv.reader(f), [])
    except (UnicodeDecodeError, csv.Error):
        return ["(not a CSV file)"]


def check_results_file(path: str) -> str:
    """``path`` made absolute if the bench rows can be appended to it; else ValueError saying why (before any
    bench runs). An existing file must be a bench history: one with columns of its own would lose them."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder; name a .csv file")
    if not os.path.isdir(folder):
        raise ValueError(f"folder {folder!r} does not exist")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise ValueError(f"{path!r} is not writable")
        header = _header(path)
        if header and not set(header) <= set(FIELDS):
            shown = ", ".join(header[:4]) + (", ..." if len(header) > 4 else "")
            raise ValueError(f"{path!r} is not a fastscore bench history (its columns: {shown}); name another file")
    elif not os.access(folder, os.W_OK):
        raise ValueError(f"cannot create a file in folder {folder!r}")
    return path


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_BENCH_DIR, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from fastscore._backend import cpu_capability

    return f"{cpu}, {torch.get_num_threads()} threads, fastscore CPU capability {cpu_capability()}"


FIELDS = [
    "timestamp",
    "git_sha",
    "op",
    "case",
    "provider",
    "device",
    "torch",
    "fastscore",
    "quick",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "eager_over",
    "compile_over",
    "over_copy",
    "ns_per_element",
]


def append_results(op: str, rows: list[Row], *, device: str, quick: bool, path: str | None = None) -> str:
    """Append the rows to the CSV history ``path`` (default: :func:`results_path`); returns its absolute path."""
    import fastscore

    path = check_results_file(results_path(path))
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:  # a history written before a column was added: rewrite it once with the new header
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
            header = list(old[0].keys()) if old else []
        if header and header != FIELDS:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS, restval="", extrasaction="ignore")
                writer.writeheader()
                writer.writerows(old)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    sha = _git_sha()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    "timestamp": stamp,
                    "git_sha": sha,
                    "op": op,
                    "case": r.case,
                    "provider": r.provider,
                    "device": device_name(device),
                    "torch": torch.__version__,
                    "fastscore": fastscore.__version__,
                    "quick": int(quick),
                    "median_ms": f"{r.median_ms:.4f}",
                    "p20_ms": f"{r.p20_ms:.4f}",
                    "p80_ms": f"{r.p80_ms:.4f}",
                    "eager_over": f"{r.ratios.get('eager', '')}",
                    "compile_over": f"{r.ratios.get('compile', '')}",
                    "over_copy": f"{r.ratios.get('copy', '')}",
                    "ns_per_element": f"{r.ns_per_element:.4f}" if r.ns_per_element is not None else "",
                }
            )
    return path


def run(
    op: str,
    cases: list[Case],
    *,
    rounds: int,
    device: str,
    quick: bool,
    record: bool = True,
    csv_path: str | None = None,
) -> list[Row]:
    """Measure every case, print one table, append the rows to the results history (``csv_path``, default
    :func:`results_path`) unless not ``record``."""
    rows = []
    for case in cases:
        rows.extend(measure(case, rounds=rounds, device=device))
    title = f"fastscore bench {op} on {device_name(device)} (torch {torch.__version__}; medians of {rounds} rounds)"
    print(format_table(title, rows), flush=True)
    if record:
        print(f"results appended to {append_results(op, rows, device=device, quick=quick, path=csv_path)}")
    return rows
