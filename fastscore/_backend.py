"""Which implementations exist here, and which one an op uses.

Every op in fastscore/ops has up to four implementations that must agree:
  ref     pure PyTorch (always available; the ground truth)
  cpp     C++ CPU kernels in fastscore._C (csrc/cpu)
  triton  Triton kernels in fastscore._triton (kernels/): CUDA tensors, or CPU tensors in Triton's
          interpreter (TRITON_INTERPRET=1, only when forced: that is how CI checks them)
  cuda    CUDA C++ kernels in fastscore._C (csrc/cuda), when built with a CUDA torch

Choice, per call: a backend forced by ``use_backend(...)`` (in this thread) or ``FASTSCORE_BACKEND``
(process-wide) is used or the call fails saying how to get it; otherwise CPU tensors use cpp, CUDA
tensors the op's preferred order (from its benchmark), and if none of those can run, ref with a
one-time warning. The choice never changes results beyond floating-point rounding.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from fastscore import _namespace  # noqa: F401  (every op and layer loads this: refuses a folder in fastscore's place)

BACKENDS = ("ref", "cpp", "triton", "cuda")
_REBUILD = "rebuild it from the source tree with `pip install --no-build-isolation -e .`"


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op here."""


class SettingError(ValueError):
    """A fastscore environment variable (FASTSCORE_*) holds a value fastscore cannot use."""


# ---- what exists ---------------------------------------------------------------------------------


@functools.cache
def _cpp_import_error() -> str | None:
    try:
        from fastscore import _C  # noqa: F401  (registers torch.ops.fastscore_C.*; torch is imported first)
    except ImportError as exc:
        return f"fastscore._C could not be imported ({exc}); {_REBUILD}"
    _choose_cpu_capability()
    return None


# ---- which copy of the C++ CPU kernels' hot loops runs -----------------------------------------------
# The kernels are compiled once per x86-64 level (csrc/include/cpu_kernel_utils.h); one runs. Chosen when
# fastscore._C loads: the widest level the CPU supports, lowered to ATen's own CPU capability (so
# ATEN_CPU_CAPABILITY lowers both), or the level FASTSCORE_CPU_CAPABILITY names, which may not be wider
# than the CPU supports.

CPU_CAPABILITIES = ("avx512", "avx2", "default")  # ATen's names, widest first


def _choose_cpu_capability() -> None:
    supported = list(torch.ops.fastscore_C.supported_cpu_capabilities())
    forced = os.environ.get("FASTSCORE_CPU_CAPABILITY", "").strip().lower()
    if forced:
        if forced not in CPU_CAPABILITIES:
            raise SettingError(
                f"FASTSCORE_CPU_CAPABILITY: expected one of {', '.join(CPU_CAPABILITIES)}, got {forced!r}"
            )
        if forced not in supported:
            raise SettingError(
                f"FASTSCORE_CPU_CAPABILITY={forced}: this CPU cannot run it (it supports {', '.join(supported)}); "
                "unset the variable or name one of those"
            )
        choice = forced
    else:
        # ATen's level ("avx512", "avx2", "default" on x86-64) where this CPU can run it: it is ATen's own
        # view of the CPU, lowered by ATEN_CPU_CAPABILITY; otherwise (wider, or another architecture's) ours
        aten = torch.backends.cpu.get_cpu_capability().lower()
        aten = {"no avx": "default"}.get(aten, aten)  # torch before 2.9 names its x86-64 baseline "NO AVX"
        choice = aten if aten in supported else supported[0]
    torch.ops.fastscore_C.set_cpu_capability(choice)


def cpu_capability() -> str:
    """The x86-64 level whose copy of the C++ CPU kernels runs: ``"avx512"``, ``"avx2"`` or ``"default"``.

    The widest the CPU supports (and ATen's own CPU capability allows) unless ``FASTSCORE_CPU_CAPABILITY``
    names a narrower one. ``"default"`` without fastscore._C or off x86-64.
    """
    if _cpp_import_error() is not None:
        return "default"
    return torch.ops.fastscore_C.cpu_capability()


def separate_inductor_cache() -> str | None:
    """Give a process that lowers ATen's CPU capability an Inductor cache of its own; returns the folder set.

    torch.compile's on-disk cache (torch 2.13) does not key the C++ kernels it builds on
    ``ATEN_CPU_CAPABILITY``: on one machine, a kernel generated for AVX2 is served the build made for AVX-512
    (or the reverse) and returns garbage (NaN around every convolution, or a corrupted heap). So a run with
    ``ATEN_CPU_CAPABILITY`` set and no ``TORCHINDUCTOR_CACHE_DIR`` of its own compiles into
    ``<Inductor's default folder>/aten-<capability>``. Does nothing (returns None) otherwise. fastscore's
    commands that compile (``bench``, ``sample --compile``) call it first.
    """
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if not capability or os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = os.path.join(default_cache_dir(), f"aten-{capability}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


def supported_cpu_capabilities() -> list[str]:
    """The levels this CPU (and this build) can run, widest first."""
    if _cpp_import_error() is not None:
        return ["default"]
    return list(torch.ops.fastscore_C.supported_cpu_capabilities())


def cpp_kernels() -> list[str]:
    """The C++ CPU kernels in fastscore._C (op names without the namespace); each runs cpu_capability()'s copy."""
    if _cpp_import_error() is not None:
        return []
    names = (n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastscore_C::"))
    return sorted(n.split("::")[1] for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU"))


_capability_lock = threading.Lock()
_capability_blocks: list[tuple[object, str]] = []  # the use_cpu_capability blocks open now, oldest first
_capability_before: list[str] = []  # the level before the first of them was entered


@contextlib.contextmanager
def use_cpu_capability(name: str):
    """Run the C++ CPU kernels' copy for level `name` inside the block (for tests and benches).

    **Process-wide, unlike use_backend**: the level is one setting of fastscore._C (a C++ global, set by
    ``fastscore_C::set_cpu_capability`` and read by every kernel call in every thread), so while the block
    runs, C++ CPU kernels called from *any* thread run level `name`. Results do not depend on the level
    beyond floating-point rounding. Blocks may nest and overlap across threads: the level is that of the
    most recently entered block still open, and the level from before the first block comes back when the
    last one closes. A level the CPU cannot run raises ValueError.
    """
    if name not in CPU_CAPABILITIES:
        raise ValueError(f"name: expected one of {', '.join(CPU_CAPABILITIES)}, got {name!r}")
    if name not in supported_cpu_capabilities():
        raise ValueError(f"name: this CPU cannot run {name} (it supports {', '.join(supported_cpu_capabilities())})")
    block = (object(), name)
    with _capability_lock:
        if not _capability_blocks:
            _capability_before[:] = [cpu_capability()]
        _capability_blocks.append(block)
        torch.ops.fastscore_C.set_cpu_capability(name)
    try:
        yield
    finally:
        with _capability_lock:
            _capability_blocks.remove(block)
            level = _capability_blocks[-1][1] if _capability_blocks else _capability_before[0]
            torch.ops.fastscore_C.set_cpu_capability(level)


def _has_kernel(cpp_op: str, dispatch_key: str) -> bool:
    return _cpp_import_error() is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fastscore_C::{cpp_op}", dispatch_key
    )


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


# How to get triton, where it is missing: an extra of fastscore (about 1 GB; a CPU user never needs it).
TRITON_HINT = 'pip install "fastscore[triton]", or use a CUDA build of torch, which brings its own'


def _status(backend: str, device_type: str, cpp_op: str | None = None) -> str | None:
    """None if `backend` can run on `device_type` here (for the op whose C++ kernel is `cpp_op`), else why not."""
    if backend == "ref":
        return None
    if backend == "cpp":
        if device_type != "cpu":
            return "the cpp backend runs on CPU tensors only"
        if _cpp_import_error():
            return _cpp_import_error()
        if cpp_op is not None and not _has_kernel(cpp_op, "CPU"):
            return f"fastscore._C has no CPU kernel {cpp_op!r}; {_REBUILD}"
        return None
    if backend == "triton":
        if not _triton_installed():
            return f"triton is not installed: {TRITON_HINT}"
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device"
        if device_type == "cpu":
            if _triton_interpreting():
                return None
            return (
                "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing fastscore"
            )
        return f"Triton does not run on {device_type} tensors"
    if backend == "cuda":
        if device_type != "cuda":
            return "the cuda backend runs on CUDA tensors only"
        if torch.version.cuda is None:
            return "the installed torch is a CPU build"
        if not torch.cuda.is_available():
            return "no CUDA device"
        if _cpp_import_error():
            return _cpp_import_error()
        probe = cpp_op or "cond_instance_norm_fwd"
        if not _has_kernel(probe, "CUDA"):
            return f"fastscore._C was built without CUDA kernels; rebuild with FASTSCORE_CUDA=1 ({_REBUILD})"
        return None
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def backends() -> dict:
    """Per backend: whether it can run here, on which device types, and if not, why.

    Returns ``{name: {"available": bool, "devices": [...], "reason": str}}``; where cpp is available, its entry
    also names the ``cpu_capability`` its kernels run (see cpu_capability()).
    """
    present = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {}
    for name in BACKENDS:
        devices = [device for device in present if _status(name, device) is None]
        if name == "triton" and devices == ["cpu"]:
            reason = "interpreter only (TRITON_INTERPRET=1, no CUDA device): correct but slow, for testing"
        elif devices:
            reason = ""
        elif name == "triton":
            reasons = dict.fromkeys((_status(name, "cuda"), _status(name, "cpu")))  # once where both say the same
            reason = "; ".join(reasons)
        else:  # the reason on the backend's own device
            reason = _status(name, "cpu" if name == "cpp" else "cuda") or ""
        report[name] = {"available": bool(devices), "devices": devices, "reason": reason}
    if report["cpp"]["available"]:
        report["cpp"]["cpu_capability"] = cpu_capability()
    return report


def empty_cache() -> None:
    """Release the free buffers of the CPU kernels' output cache to the OS.

    The C++ CPU kernels take outputs of 4 MiB and more from a cache that keeps freed buffers (up to
    ``FASTSCORE_CPU_CACHE_MB``, default 1024; 0 turns it off) for the next output of the same size, so a loop
    does not pay the OS's page clearing on every call (csrc/cpu/output_cache.cpp). Buffers still in use
    are not affected. Like ``torch.cuda.empty_cache``, it frees memory, not tensors.
    """
    if _cpp_import_error() is None:
        torch.ops.fastscore_C.output_cache_empty()


def cache_stats() -> dict:
    """The CPU output cache: ``{"in_use": bytes, "cached": bytes, "cap": bytes}`` (zeros without fastscore._C)."""
    if _cpp_import_error() is not None:
        return {"in_use": 0, "cached": 0, "cap": 0}
    in_use, cached, cap = torch.ops.fastscore_C.output_cache_stats()
    return {"in_use": in_use, "cached": cached, "cap": cap}


# ---- what is chosen ------------------------------------------------------------------------------

# use_backend's choice lives in a context variable: each thread (and each asyncio task) has its own, so
# a block in one thread does not change which backend another thread's ops use. FASTSCORE_BACKEND is
# read from the environment: process-wide. Autograd may run a backward on its own worker threads (one
# per CUDA device), which do not see the forward's context: the ops' autograd Functions record the
# override in force at the forward (override()) and run their backward under it (forcing()).
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastscore_use_backend", default=None)
_warned: set[tuple[str, str]] = set()


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what}: expected one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def override() -> str | None:
    """The backend the innermost use_backend block of this thread (context) forces, or None."""
    return _override.get()


class forcing:
    """Context manager: run the block with this thread's use_backend override set to `name` (None: no
    override), the previous one restored after. For backward passes: ``forcing(override())`` recorded at
    the forward makes the backward choose as the forward did, on whichever thread autograd runs it."""

    __slots__ = ("name", "token")

    def __init__(self, name: str | None):
        self.name, self.token = name, None

    def __enter__(self):
        if _override.get() != self.name:
            self.token = _override.set(self.name)

    def __exit__(self, *exc):
        if self.token is not None:
            _override.reset(self.token)
            self.token = None


def forced_backend() -> str | None:
    """The backend forced by this thread's innermost use_backend block or else by FASTSCORE_BACKEND, or None."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get("FASTSCORE_BACKEND", "").strip()
    return _check_name(env, "FASTSCORE_BACKEND") if env else None


@contextlib.contextmanager
def use_backend(name: str):
    """Force every fastscore op that runs inside the block, in this thread, to use backend `name` (ref, cpp,
    triton or cuda).

    Per thread: the choice is a context variable (contextvars), so other threads, and asyncio tasks
    other than the one that entered the block, keep their own choice (``FASTSCORE_BACKEND``, the
    process-wide setting, or the default). A thread started inside the block starts without it (as
    ``threading.Thread`` does with every context variable) unless it runs in a copy of this context
    (``contextvars.copy_context().run``). In eager mode the backward of an op run inside the block uses
    the same backend, whichever thread autograd runs it on. Blocks nest; the innermost wins. An op whose
    forced backend cannot run raises BackendUnavailableError saying why and how to get it.
    """
    _check_name(name, "name")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def select(op: str, device: torch.device, *, cpp_op: str, cuda_order: tuple[str, ...] = ("cuda", "triton")) -> str:
    """The backend op `op` uses for tensors on `device` (see the module docstring)."""
    forced = forced_backend()
    if forced is not None:
        why = _status(forced, device.type, cpp_op)
        if why is not None:
            raise BackendUnavailableError(
                f"backend {forced!r} is forced (use_backend / FASTSCORE_BACKEND) but cannot run {op} on "
                f"{device.type} tensors: {why}"
            )
        return forced
    order = ("cpp",) if device.type == "cpu" else cuda_order if device.type == "cuda" else ()
    reasons = []
    for name in order:
        why = _status(name, device.type, cpp_op)
        if why is None:
            return name
        reasons.append(f"{name}: {why}")
    key = (op, device.type)
    if key not in _warned:
        _warned.add(key)
        detail = "; ".join(reasons) or f"no fused backend for {device.type} tensors"
        warnings.warn(f"fastscore: {op} on {device.type} uses the reference implementation ({detail})", stacklevel=3)
    return "ref"


# ---- the chosen implementation, cached per op --------------------------------------------------------
# select() costs 5 to 10 us a call (the forced backend, then _status's probes of what is built and
# installed): as much as a small kernel, and an op runs thousands of times in a sampler and dozens of times
# per network forward. Its answer depends only on the op, the forced backend and the device type, since
# what is built and installed does not change within a process. So each op makes the choice once per
# (op, forced backend, device type) and keeps the implementation its factory makes of it; a forced backend
# that cannot run is not kept (it raises on every call). Code that changes what select() would answer
# (tests pretending a backend is missing by patching _status, _triton_interpreting or select) must start
# from an empty cache and leave the old one after: ``monkeypatch.setattr(_backend, "_chosen", {})``, or
# clear_chosen().
_chosen: dict[tuple[str, str | None, str], object] = {}
_T = TypeVar("_T")


def chosen_impl(
    op: str,
    device: torch.device,
    factory: Callable[[str], _T],
    *,
    cpp_op: str,
    cuda_order: tuple[str, ...] = ("cuda", "triton"),
) -> _T:
    """``factory(select(op, device, cpp_op=..., cuda_order=...))``, made once per (op, forced backend,
    device type) and cached (see above): an op's implementation for tensors on `device`.

    `factory` is the op's ``_impl(backend)``, which returns what the op calls for that backend; one factory
    per op name. `cpp_op` and `cuda_order` are select()'s, read when the choice is made.
    """
    key = (op, forced_backend(), device.type)
    impl = _chosen.get(key)
    if impl is None:
        impl = factory(select(op, device, cpp_op=cpp_op, cuda_order=cuda_order))
        _chosen[key] = impl
    return impl


def clear_chosen() -> None:
    """Forget every op's cached choice (chosen_impl): the next call of each op chooses again."""
    _chosen.clear()


# ---- which path a public op takes ------------------------------------------------------------------


def under_functorch_transform() -> bool:
    """Is a torch.func transform (jvp, vmap, grad) active? Private torch API, pinned by the op tests.

    ``isinstance``, not ``is None``: torch.compile wraps the interpreter (or None) in an object that is never
    ``None``, so ``is None`` would send every compiled op to its reference; its isinstance sees the value."""
    return not isinstance(torch._C._functorch.peek_interpreter_stack(), type(None))


def op_path(*tensors) -> str:
    """How an op's public function runs its forward, one rule for every op (the tensors it differentiates):

    ``"kernel"``       eager inference (:func:`eager_inference`): the chosen backend's kernel, called directly;
    ``"reference"``    compiling under a torch.func transform: the pure-PyTorch reference, which the transform
                       differentiates (a compiled jvp through an autograd.Function gives zero tangents);
    ``"function"``     compiling otherwise: the op's autograd.Function without its custom jvp (torch.compile
                       rejects one), around the custom ops, which Inductor schedules as opaque calls;
    ``"function_jvp"`` eager with autograd or forward-mode AD: the Function with the fused jvp kernel.
    """
    if eager_inference(*tensors):
        return "kernel"
    if torch.compiler.is_compiling():
        return "reference" if under_functorch_transform() else "function"
    return "function_jvp"


def eager_inference(*tensors) -> bool:
    """True when an op may call its kernels directly: eager, and nothing to differentiate or trace.

    The custom op and autograd.Function layers exist for autograd, forward-mode AD and torch.compile;
    outside them they only cost time (about 150 us per call against a few us for the kernel call,
    which dominates small layers and sampling loops). Forward-mode AD through
    torch.autograd.forward_ad keeps tangents on the tensors themselves, hence the level check.
    """
    if torch.compiler.is_compiling() or under_functorch_transform():
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
