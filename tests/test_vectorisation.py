"""Every hot loop of the C++ CPU kernels is vectorised at every CPU capability level.

The kernels are compiled once per x86-64 level (avx512 = x86-64-v4, avx2 = x86-64-v3, default = x86-64;
csrc/include/cpu_kernel_utils.h) and rely on g++'s auto-vectoriser. A loop that vectorises for AVX-512 can
silently stay scalar for AVX2 or SSE2 (a branch g++ cannot if-convert without masked operations, a library
call, a float -> int conversion it cannot widen), which costs those CPUs 3-10x. So this test compiles each
kernel file the way setup.py does (csrc/cxx_flags.txt) once per level, with -DFS_SINGLE_CAPABILITY so that
only that level's copy is compiled, and reads g++'s vectorisation report: every loop under a
``#pragma omp simd`` must be reported vectorised, in every template instantiation, at every level.

Run as a script to print the report: ``python tests/test_vectorisation.py [file.cpp ...]``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every kernel file with a hot loop (cond_instance_norm reaches dispatch_capability through the shared
# run_sample_pipeline, so the pragma, not the call, is what marks a kernel file).
CPU_SOURCES = sorted(p for p in (ROOT / "csrc" / "cpu").glob("*.cpp") if "#pragma omp simd" in p.read_text())
LEVELS = {"avx512": ("x86-64-v4", 2), "avx2": ("x86-64-v3", 1), "default": ("x86-64", 0)}

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or os.uname().machine != "x86_64",
    reason="the capability levels are x86-64 levels compiled by g++",
)


def cxx_flags() -> list[str]:
    lines = (ROOT / "csrc" / "cxx_flags.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def loops(path: Path) -> list[tuple[int, int, bool]]:
    """(first line, last line, hot) of every `for` loop of a source file. A hot loop is one under a
    `#pragma omp simd`; its first line is the pragma's. The last line is the `;` of a one-statement body or
    the brace matching the loop's first `{`."""
    lines = path.read_text().splitlines()
    found = []
    for j, line in enumerate(lines):
        if not re.match(r"\s*for \(", line):
            continue
        i = j - 1
        while i >= 0 and lines[i].strip().startswith("#pragma"):
            i -= 1
        hot = any(lines[k].strip().startswith("#pragma omp simd") for k in range(i + 1, j))
        depth, k, opened = 0, j, False
        while True:
            for ch in lines[k]:
                depth += ch == "{"
                depth -= ch == "}"
                opened = opened or ch == "{"
            if (opened and depth <= 0) or (not opened and lines[k].rstrip().endswith(";")):
                break
            k += 1
        found.append(((i + 2) if hot else (j + 1), k + 1, hot))
    return found


def hot_loops(source: Path) -> dict[int, tuple[int, str]]:
    """First line -> (last line, text of the `for`) of each hot loop."""
    lines = source.read_text().splitlines()
    out = {}
    for first, last, hot in loops(source):
        if hot:
            j = next(k for k in range(first - 1, last) if re.match(r"\s*for \(", lines[k]))
            out[first] = (last, lines[j].strip())
    return out


def scalar_lines(path: Path) -> set[int]:
    """Lines where g++ may report a loop it leaves scalar: those of loops not marked hot (outer loops, O(C)
    coefficient loops; g++ reports a loop at one of its statements) outside every hot loop, and the calls of
    at::parallel_for and of the dtype dispatch macros (whose lambda's loops are reported there)."""
    all_loops = loops(path)
    hot = set()
    scalar = set()
    for first, last, is_hot in all_loops:
        (hot if is_hot else scalar).update(range(first, last + 1))
    lines = path.read_text().splitlines()
    calls = ("parallel_for(", "_DISPATCH")  # a lambda argument's loops are reported at the call (macro) line
    return (scalar - hot) | {i + 1 for i, line in enumerate(lines) if any(c in line for c in calls)}


@cache
def include_flags() -> tuple[str, ...]:
    from torch.utils.cpp_extension import include_paths

    paths = [str(ROOT / "csrc" / "include"), *include_paths(), sysconfig.get_paths()["include"]]
    return tuple(f"-I{p}" for p in paths)


MESSAGE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):\d+: (?P<kind>optimized|missed): (?P<text>.*)$")


def compile_report(source: Path, level: str) -> list[tuple[str, re.Match]]:
    """g++'s vectorisation messages for `source` compiled for `level` only, each with the function it is in."""
    arch, code = LEVELS[level]
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "vect"
        cmd = [
            "g++",
            *cxx_flags(),
            f"-march={arch}",
            f"-DFS_SINGLE_CAPABILITY={code}",
            *include_flags(),
            "-c",
            str(source),
            "-o",
            os.devnull,
            f"-fdump-tree-vect-optimized-missed={dump}",
            # Epilogue loops (the last few iterations, tried again with narrower vectors) are reported at their
            # loop's location too, and may stay scalar: leave them out.
            "--param=vect-epilogues-nomask=0",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, f"{source.name} at {level} does not compile:\n{done.stderr[-3000:]}"
        function, messages = "", []
        with open(dump) as f:
            for line in f:
                if line.startswith(";; Function "):
                    function = line
                elif m := MESSAGE.match(line):
                    messages.append((function, m))
    return messages


def failures(source: Path, level: str) -> list[str]:
    """What is wrong with the hot loops of `source` at `level`; empty when all vectorise.

    g++ reports a loop at the location of one of its statements, which may be a line of a function or lambda
    inlined into it (from the kernel file or from csrc/include): an outer loop can be reported at a line of
    the hot loop inside it, a hot loop at a line of the lambda it calls. So a report of a loop left scalar
    counts as a failure unless it points at the lines of a loop not marked hot (an outer loop, say; see
    scalar_lines), or the same function also has a loop vectorised at that line (the hot loop inside the
    outer loop reported there). And there must be at least as many vectorised loops as hot loops.
    """
    ours = {source.resolve(): source, **{p.resolve(): p for p in (ROOT / "csrc" / "include").glob("*.h")}}
    allowed = {path: scalar_lines(path) for path in ours}
    text = {path: path.read_text().splitlines() for path in ours}
    # a report anywhere in a hot loop's lines (the pragma's included: g++ puts the loop it makes to combine
    # a reduction's lanes there) is about that loop
    unit = {
        (source.resolve(), line): first
        for first, (last, _) in hot_loops(source).items()
        for line in range(first, last + 1)
    }
    vectorised, scalar = set(), set()
    for function, m in compile_report(source, level):
        path, line = (ROOT / m["file"]).resolve(), int(m["line"])
        if path not in ours:
            continue
        key = (function, path, unit.get((path, line), line))
        if m["kind"] == "optimized" and m["text"].startswith("loop vectorized"):
            vectorised.add(key)
        elif m["kind"] == "missed" and m["text"].startswith("couldn't vectorize loop") and line not in allowed[path]:
            scalar.add(key)
    problems = {
        f"{ours[path].name}:{line} ({text[path][line - 1].strip()[:70]}): a loop is not vectorised"
        for function, path, line in scalar - vectorised
    }
    hot = len(hot_loops(source))
    lines_vectorised = len({(path, line) for _, path, line in vectorised})
    if lines_vectorised < hot:
        problems.add(f"{source.name}: loops vectorised at {lines_vectorised} places, fewer than its {hot} hot loops")
    return sorted(problems)


@cache
def all_failures() -> dict[tuple[str, str], list[str]]:
    jobs = [(source, level) for source in CPU_SOURCES for level in LEVELS]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda job: failures(*job), jobs))
    return {(source.name, level): result for (source, level), result in zip(jobs, results)}


def test_every_kernel_file_has_hot_loops():
    assert CPU_SOURCES, "no csrc/cpu/*.cpp uses dispatch_capability"
    for source in CPU_SOURCES:
        assert hot_loops(source), f"{source.name} dispatches by capability but marks no loop #pragma omp simd"


@pytest.mark.slow
@pytest.mark.parametrize("level", list(LEVELS))
@pytest.mark.parametrize("source", [p.name for p in CPU_SOURCES])
def test_hot_loops_vectorise(source, level):
    missed = all_failures()[(source, level)]
    assert not missed, f"hot loops g++ does not vectorise at {level}:\n" + "\n".join(missed)


if __name__ == "__main__":
    chosen = [ROOT / "csrc" / "cpu" / name for name in sys.argv[1:]] or CPU_SOURCES
    for source in chosen:
        for level in LEVELS:
            problems = failures(source, level)
            print(f"{source.name} at {level}: " + ("all hot loops vectorised" if not problems else ""))
            for problem in problems:
                print(f"    {problem}")
