"""Backend selection: forcing, availability reports, automatic fallback (fastscore/_backend.py)."""

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
        assert set(info) == {"available", "devices", "reason"}
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
    with pytest.warns(UserWarning, match="uses the reference implementation .*cpp: pretend it is missing"):
        fallback = cond_instance_norm(x, gamma, alpha, beta, act="elu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cond_instance_norm(x, gamma, alpha, beta, act="elu")
    torch.testing.assert_close(fallback, fused, rtol=1e-5, atol=1e-5)


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
