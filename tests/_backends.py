"""Backends for the op tests, with the C++ CPU kernels once per CPU capability level.

The C++ kernels are compiled once per x86-64 level (avx512, avx2, default) and run the widest the CPU
supports. Every op test that takes a backend runs "cpp" (the level fastscore chose) and "cpp@<level>" for
each narrower level this CPU can run, so CI on any machine covers the AVX-512, AVX2 and baseline copies.
"""

from __future__ import annotations

import contextlib

import fastscore
from fastscore._backend import supported_cpu_capabilities
from fastscore._backend import use_cpu_capability


def kernel_backends(device: str = "cpu") -> list[str]:
    """The backends that can run on `device` tensors here, cpp once per runnable CPU capability level."""
    names = []
    for name, info in fastscore.backends().items():
        if device not in info["devices"]:
            continue
        names.append(name)
        if name == "cpp":
            names += [f"cpp@{level}" for level in supported_cpu_capabilities() if level != fastscore.cpu_capability()]
    return names


def base(backend: str) -> str:
    """The backend name without its CPU capability: "cpp@avx2" -> "cpp"."""
    return backend.split("@")[0]


@contextlib.contextmanager
def use(backend: str):
    """fastscore.use_backend(base(backend)), with the CPU capability the name asks for.

    The backend is forced in this thread only (use_backend is per thread); the capability is
    process-wide (use_cpu_capability: one setting of the C++ kernels), so while a "cpp@<level>" block
    runs, C++ kernels called from any thread run that level. Results agree across levels up to rounding.
    """
    name, _, level = backend.partition("@")
    with fastscore.use_backend(name), use_cpu_capability(level) if level else contextlib.nullcontext():
        yield
