"""Backend selection: forcing, availability reports, automatic fallback (fastscore/_backend.py)."""

import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import fastscore
from fastscore import _backend
from fastscore.ops import cond_instance_norm

CPU = torch.device("cpu")


def _select():
    return _backend.select("cond_instance_norm", CPU, cpp_op="cond_instance_norm_fwd")


def test_backends_reports_every_backend_with_reasons():
    report = fastscore.backends()
    assert list(report) == ["ref", "cpp", "triton", "cuda"]
    assert report["ref"]["available"] and "cpu" in report["ref"]["devices"]
    for name, info in report.items():
        assert set(info) - {"cpu_capability"} == {"available", "devices", "reason"}
        assert info["available"] == bool(info["devices"])
        if not info["available"]:
            assert info["reason"], f"{name} is unavailable without saying why"
    if not torch.cuda.is_available():
        assert not report["cuda"]["available"]


def test_use_backend_forces_and_restores():
    assert _select() == "cpp"
    with fastscore.use_backend("ref"):
        assert _select() == "ref"
        with fastscore.use_backend("cpp"):
            assert _select() == "cpp"
        assert _select() == "ref"
    assert _select() == "cpp"


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("FASTSCORE_BACKEND", "ref")
    assert _select() == "ref"
    monkeypatch.setenv("FASTSCORE_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTSCORE_BACKEND: expected one of ref, cpp, triton, cuda, got 'fast'"):
        _select()


def test_unknown_backend_name_is_a_clear_error():
    with pytest.raises(ValueError, match="name: expected one of"):
        with fastscore.use_backend("mkl"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_forced_backend_that_cannot_run_says_why_and_how():
    x = torch.randn(2, 3, 4, 4)
    with (
        fastscore.use_backend("cuda"),
        pytest.raises(fastscore.BackendUnavailableError, match="cuda backend runs on CUDA"),
    ):
        cond_instance_norm(x, torch.ones(3))


def test_forced_triton_without_interpreter_says_how(monkeypatch):
    monkeypatch.setattr(_backend, "_triton_interpreting", lambda: False)
    monkeypatch.setattr(_backend, "_chosen", {})  # ops choose afresh under the patched probe (chosen_impl)
    if torch.cuda.is_available():
        pytest.skip("with a GPU the message concerns CPU tensors only")
    with fastscore.use_backend("triton"), pytest.raises(fastscore.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        cond_instance_norm(torch.randn(2, 3, 4, 4), torch.ones(3))


def test_automatic_fallback_warns_once_and_keeps_results(monkeypatch):
    x = torch.randn(3, 5, 6, 6)
    gamma, alpha, beta = torch.rand(5) + 0.5, torch.rand(5), torch.randn(5)
    fused = cond_instance_norm(x, gamma, alpha, beta, act="elu")
    real_status = _backend._status
    monkeypatch.setattr(
        _backend, "_status", lambda b, d, op=None: "pretend it is missing" if b == "cpp" else real_status(b, d, op)
    )
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "_chosen", {})  # ops choose afresh under the patched probe (chosen_impl)
    with pytest.warns(UserWarning, match="uses the reference implementation .*cpp: pretend it is missing"):
        fallback = cond_instance_norm(x, gamma, alpha, beta, act="elu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cond_instance_norm(x, gamma, alpha, beta, act="elu")
    torch.testing.assert_close(fallback, fused, rtol=1e-5, atol=1e-5)


def test_each_op_chooses_once_per_forced_backend_and_device_type(monkeypatch):
    """select() costs 5 to 10 us, as much as a small kernel: an op keeps its choice (_backend.chosen_impl)."""
    calls = []
    select = _backend.select

    def spy(op, device, **kwargs):
        calls.append((op, _backend.forced_backend(), device.type))
        return select(op, device, **kwargs)

    monkeypatch.setattr(_backend, "select", spy)
    monkeypatch.setattr(_backend, "_chosen", {})
    x, gamma = torch.randn(2, 3, 4, 4), torch.ones(3)

    def run_all():
        fastscore.ops.elu(x)
        fastscore.ops.crp_pool(x)
        cond_instance_norm(x, gamma)

    for _ in range(3):
        run_all()
    with fastscore.use_backend("ref"):
        run_all()
        run_all()
    run_all()
    ops = ["elu", "crp_pool", "cond_instance_norm"]
    assert calls == [(op, None, "cpu") for op in ops] + [(op, "ref", "cpu") for op in ops]
    # a forced backend that cannot run is not kept: every call fails, saying why
    del calls[:]
    with fastscore.use_backend("cuda"):
        for _ in range(2):
            with pytest.raises(fastscore.BackendUnavailableError, match="cuda backend runs on CUDA"):
                fastscore.ops.elu(x)
    assert calls == [("elu", "cuda", "cpu")] * 2
    # FASTSCORE_BACKEND is a forced backend too; clear_chosen() forgets every choice
    del calls[:]
    monkeypatch.setenv("FASTSCORE_BACKEND", "cpp")
    fastscore.ops.elu(x)
    fastscore.ops.elu(x)
    monkeypatch.delenv("FASTSCORE_BACKEND")
    fastscore.ops.elu(x)
    _backend.clear_chosen()
    fastscore.ops.elu(x)
    assert calls == [("elu", "cpp", "cpu"), ("elu", None, "cpu")]
    assert list(_backend._chosen) == [("elu", None, "cpu")]


def test_functorch_interpreter_probe_is_pinned():
    """The public ops read torch._C._functorch.peek_interpreter_stack (private) to pick a path."""
    assert not _backend.under_functorch_transform()
    seen = []
    torch.func.jvp(
        lambda t: seen.append(_backend.under_functorch_transform()) or t * 2, (torch.ones(2),), (torch.ones(2),)
    )
    assert seen == [True]


def test_eager_inference_only_when_nothing_records_the_op():
    import torch.autograd.forward_ad as fwAD

    x, w = torch.ones(2), torch.ones(2, requires_grad=True)
    assert _backend.eager_inference(x, None)
    assert not _backend.eager_inference(x, w)  # autograd must record it
    with torch.no_grad():
        assert _backend.eager_inference(x, w)
    with fwAD.dual_level():  # tangents ride on the tensors: the op must see them
        assert not _backend.eager_inference(x)
    seen = []
    torch.func.jvp(lambda t: seen.append(_backend.eager_inference(t)) or t * 2, (x,), (x,))
    assert seen == [False]
    assert not torch.compile(lambda t: t + _backend.eager_inference(t), fullgraph=True)(x).ne(x).any()


def test_inference_fast_path_equals_the_autograd_path():
    x, g, a, b = torch.randn(2, 4, 3, 5), torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        fast = cond_instance_norm(x, g, a, b, act="elu")
    slow = cond_instance_norm(x, g.requires_grad_(), a, b, act="elu")
    assert slow.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)


# ---- CPU capability: which copy of the C++ kernels' hot loops runs ------------------------------------------


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def _widest_level_from_cpuinfo() -> str:
    """Read independently of fastscore (and of g++'s resolver): the x86-64 level the CPU's flags allow."""
    flags = _cpu_flags()
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}  # abm: lzcnt
    v4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    if v3 <= flags and v4 <= flags:
        return "avx512"
    return "avx2" if v3 <= flags else "default"


@pytest.mark.skipif(
    not (sys.platform == "linux" and os.uname().machine == "x86_64"), reason="x86-64 levels, read from /proc/cpuinfo"
)
def test_kernels_run_the_widest_copy_the_cpu_supports():
    if os.environ.get("FASTSCORE_CPU_CAPABILITY") or os.environ.get("ATEN_CPU_CAPABILITY"):
        pytest.skip("a capability is forced by the environment")
    widest = _widest_level_from_cpuinfo()
    assert _backend.supported_cpu_capabilities()[0] == widest
    assert fastscore.cpu_capability() == widest, (
        f"the C++ kernels run the {fastscore.cpu_capability()} copy on a CPU that supports {widest}"
    )
    assert fastscore.backends()["cpp"]["cpu_capability"] == widest
    assert _backend.supported_cpu_capabilities()[-1] == "default"


def test_use_cpu_capability_switches_and_restores():
    before = fastscore.cpu_capability()
    for level in _backend.supported_cpu_capabilities():
        with _backend.use_cpu_capability(level):
            assert fastscore.cpu_capability() == level
        assert fastscore.cpu_capability() == before
    with pytest.raises(ValueError, match="name: expected one of avx512, avx2, default"):
        with _backend.use_cpu_capability("sse"):
            pass
    assert fastscore.cpu_capability() == before


def test_a_level_the_cpu_cannot_run_is_refused():
    unsupported = [c for c in _backend.CPU_CAPABILITIES if c not in _backend.supported_cpu_capabilities()]
    with pytest.raises(ValueError, match="unknown"):
        torch.ops.fastscore_C.set_cpu_capability("avx1024")
    if not unsupported:
        pytest.skip("this CPU runs every level: nothing wider to refuse")
    with pytest.raises(ValueError, match="cannot run it"):
        torch.ops.fastscore_C.set_cpu_capability(unsupported[0])
    with pytest.raises(ValueError, match="cannot run"):
        with _backend.use_cpu_capability(unsupported[0]):
            pass


def _in_fresh_process(code: str, **env):
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)


@pytest.mark.slow
def test_environment_variable_forces_a_narrower_copy_and_refuses_bad_values():
    code = "import fastscore; print(fastscore.cpu_capability())"
    for level in _backend.supported_cpu_capabilities():
        done = _in_fresh_process(code, FASTSCORE_CPU_CAPABILITY=level)
        assert done.returncode == 0 and done.stdout.split() == [level], done.stderr
    done = _in_fresh_process(code, FASTSCORE_CPU_CAPABILITY="avx1024")
    assert done.returncode != 0 and "FASTSCORE_CPU_CAPABILITY: expected one of avx512, avx2, default" in done.stderr
    unsupported = [c for c in _backend.CPU_CAPABILITIES if c not in _backend.supported_cpu_capabilities()]
    if unsupported:
        done = _in_fresh_process(code, FASTSCORE_CPU_CAPABILITY=unsupported[0])
        assert done.returncode != 0 and "this CPU cannot run it" in done.stderr
    # ATen's own capability, lowered by ATEN_CPU_CAPABILITY, lowers fastscore's too
    done = _in_fresh_process(code, ATEN_CPU_CAPABILITY="default")
    assert done.returncode == 0 and done.stdout.split() == ["default"], done.stderr


@pytest.mark.slow
def test_info_names_the_capability_of_every_kernel_and_a_bad_setting_is_one_line():
    done = _in_fresh_process("import sys; from fastscore.cli import main; sys.exit(main(['info']))")
    assert done.returncode == 0, done.stderr
    level = fastscore.cpu_capability()
    for op in _backend.cpp_kernels():
        assert any(line.split() == [op, level] for line in done.stdout.splitlines()), f"info does not show {op}"
    assert f"cpp kernels: CPU capability {level}" in done.stdout
    done = _in_fresh_process(
        "import sys; from fastscore.cli import main; sys.exit(main(['info']))", FASTSCORE_CPU_CAPABILITY="sse9"
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "fastscore info: error: FASTSCORE_CPU_CAPABILITY: expected one of avx512, avx2, default, got 'sse9'"
    ]


def test_a_lowered_aten_capability_compiles_into_an_inductor_cache_of_its_own(monkeypatch):
    # Inductor's cache does not key its C++ kernels on ATEN_CPU_CAPABILITY: sharing it across capabilities
    # serves an AVX-512 build to AVX2-generated code (NaN) or the reverse (a corrupted heap)
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from fastscore import cli

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert _backend.separate_inductor_cache() is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "AVX2")
    folder = os.path.join(default_cache_dir(), "aten-avx2")
    assert _backend.separate_inductor_cache() == folder
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == folder
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/chosen")  # the user's own choice is kept
    assert _backend.separate_inductor_cache() is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/chosen"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    cli._compiled(torch.nn.Identity(), True)  # `fastscore sample --compile` takes its own cache too
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == folder


# ---- use_backend is per thread; FASTSCORE_BACKEND and the CPU capability are process-wide -----------------


def _in_thread(fn):
    """fn() run on a new thread; its result, or the exception it raised, re-raised here."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _joined(thread, result):
    thread.join(timeout=60)
    assert not thread.is_alive()
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_use_backend_in_one_thread_leaves_other_threads_alone():
    x = torch.randn(2, 3, 4, 4)
    gamma = torch.rand(3) + 0.5
    barrier = threading.Barrier(2, timeout=30)

    def forcing(name):
        def body():
            with fastscore.use_backend(name):
                barrier.wait()  # both threads are inside their blocks...
                seen = _backend.forced_backend()
                barrier.wait()  # ...until both have looked
            return seen

        return body

    def plain():
        barrier.wait()
        seen = _select()
        out = cond_instance_norm(x, gamma)  # a CPU op while the other thread forces cuda
        barrier.wait()
        return seen, out

    threads = [_in_thread(forcing("cuda")), _in_thread(plain)]
    assert _joined(*threads[0]) == "cuda"
    seen, out = _joined(*threads[1])
    assert seen == "cpp"
    torch.testing.assert_close(out, fastscore.ops.cond_instance_norm_ref(x, gamma), rtol=1e-5, atol=1e-5)

    # two overrides at once: each thread sees its own, and the main thread none
    threads = [_in_thread(forcing("ref")), _in_thread(forcing("cpp"))]
    assert [_joined(*t) for t in threads] == ["ref", "cpp"]
    assert _select() == "cpp" and _backend.override() is None


def test_the_environment_variable_is_process_wide_and_use_backend_overrides_it_per_thread(monkeypatch):
    monkeypatch.setenv("FASTSCORE_BACKEND", "ref")
    barrier = threading.Barrier(2, timeout=30)

    def overriding():
        with fastscore.use_backend("cpp"):
            barrier.wait()
            seen = _select()
            barrier.wait()
        return seen

    def plain():
        barrier.wait()
        seen = _select()
        barrier.wait()
        return seen

    threads = [_in_thread(overriding), _in_thread(plain)]
    assert [_joined(*t) for t in threads] == ["cpp", "ref"]


def test_backward_uses_the_backend_of_its_forward_on_any_thread(monkeypatch):
    """Autograd runs CUDA backward passes on its own threads: they must choose as the forward did."""
    chosen = []
    select = _backend.select

    def spy(op, device, **kwargs):
        chosen.append(select(op, device, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(_backend, "select", spy)
    monkeypatch.setattr(_backend, "_chosen", {})  # every choice made in this test goes through the spy
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with fastscore.use_backend("ref"):
        y = fastscore.ops.elu(x)
        assert chosen == ["ref"]
        # the backward on another thread, which has no override of its own, while this one still has it
        (grad,) = _joined(*_in_thread(lambda: torch.autograd.grad(y.sum(), x)))
    # The backward found the forward's choice, kept under the forced "ref": one without the override would
    # have looked up ("elu", None, "cpu") and asked select, which answers "cpp" here.
    assert chosen == ["ref"]
    assert list(_backend._chosen) == [("elu", "ref", "cpu")]
    torch.testing.assert_close(grad, torch.where(x > 0, 1.0, x.detach().exp()))


def test_cpu_capability_blocks_overlapping_across_threads_restore_the_level_before_them():
    """The level is process-wide (one C++ setting): blocks in two threads that open and close out of
    order leave the level of the newest open block, and the one from before them at the end."""
    before = fastscore.cpu_capability()
    others = [c for c in _backend.supported_cpu_capabilities() if c != before]
    if not others:
        pytest.skip("this CPU runs a single level")
    a_level, b_level = others[0], others[-1] if len(others) > 1 else before
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with _backend.use_cpu_capability(a_level):
            a_in.set()
            assert b_in.wait(timeout=30)
        a_out.set()

    def b():
        assert a_in.wait(timeout=30)
        with _backend.use_cpu_capability(b_level):
            b_in.set()
            assert a_out.wait(timeout=30)
            return fastscore.cpu_capability()  # a's block, opened first, closed first

    threads = [_in_thread(a), _in_thread(b)]
    _joined(*threads[0])
    assert _joined(*threads[1]) == b_level
    assert fastscore.cpu_capability() == before
