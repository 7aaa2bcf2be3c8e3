"""Test setup shared by every test file.

Without a CUDA device, Triton kernels are proven against the reference in Triton's interpreter,
which must be switched on before triton (and fastscore) are imported: hence here, at collection.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_isolate(monkeypatch):
    """Every test starts from the same RNG state and with no backend forced by the environment."""
    torch.manual_seed(0)
    monkeypatch.delenv("FASTSCORE_BACKEND", raising=False)
    yield


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Files marked ``pytestmark = pytest.mark.one_thread`` run each test on one torch thread, restored after.

    Their tensors are tiny: OpenMP's fork and join per op costs more than the op, and on a shared 2-core
    machine a thread waiting for a descheduled partner costs a time slice. Bitwise comparisons between two
    runs also need one thread count throughout."""
    if request.node.get_closest_marker("one_thread") is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
