"""The CPU kernels' output cache (csrc/cpu/output_cache.cpp): large outputs reuse freed buffers.

A reused buffer must behave as fresh memory from PyTorch's allocator would: correct values (no stale
data shows through), the caller's strides, resizable storage, freed to the cache when the tensor dies,
visible to the profiler's memory accounting; the cap and fastscore.empty_cache() bound what it keeps.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile

import fastscore
from fastscore._backend import cache_stats
from fastscore.ops import cond_instance_norm
from fastscore.ops import cond_instance_norm_ref
from fastscore.ops import elu

pytestmark = pytest.mark.skipif(not fastscore.backends()["cpp"]["available"], reason="needs fastscore._C")

BIG = (4, 64, 64, 64)  # 4 MiB of float32: the smallest size the cache serves


def _params(x, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, C = x.shape[:2]
    return [1 + 0.1 * torch.randn(N, C, generator=g) for _ in range(3)]


def test_a_freed_output_is_reused_and_holds_only_the_new_values():
    fastscore.empty_cache()
    x1, x2 = torch.randn(BIG), torch.randn(BIG) * 3 + 1
    y = cond_instance_norm(x1, *_params(x1), act="elu")
    ptr = y.data_ptr()
    before = cache_stats()
    assert before["in_use"] >= y.nbytes
    del y
    after = cache_stats()
    assert after["cached"] >= before["cached"] + x1.nbytes and after["in_use"] == before["in_use"] - x1.nbytes
    y2 = cond_instance_norm(x2, *_params(x2, 1), act="elu")
    assert y2.data_ptr() == ptr  # the same buffer, handed out again
    torch.testing.assert_close(y2, cond_instance_norm_ref(x2, *_params(x2, 1), act="elu"), rtol=1e-5, atol=1e-5)


def test_outputs_keep_the_input_layout_and_small_ones_bypass_the_cache():
    x = torch.randn(BIG).contiguous(memory_format=torch.channels_last)
    y = cond_instance_norm(x, *_params(x))
    assert y.stride() == x.stride()
    strided = torch.randn(64, 64, 64, 4).permute(3, 1, 2, 0)  # dense, an unusual order: elu keeps x's strides
    z = elu(strided)
    assert z.stride() == strided.stride()
    torch.testing.assert_close(z, torch.nn.functional.elu(strided))
    in_use = cache_stats()["in_use"]
    small = elu(torch.randn(8, 8))
    assert cache_stats()["in_use"] == in_use and small.shape == (8, 8)


def test_cached_storage_resizes_and_survives_its_producer():
    x = torch.randn(BIG)
    y = elu(x)
    want = torch.nn.functional.elu(x)
    y.resize_(2 * x.numel())  # a cached buffer's storage grows like any other
    torch.testing.assert_close(y[: x.numel()].view(BIG), want)
    y[x.numel() :] = 1.0
    assert (y[x.numel() :] == 1.0).all()


def test_the_profiler_sees_cached_allocations():
    x = torch.randn(BIG)
    elu(x)  # warm: the buffer comes from the cache below
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = elu(x)
        del y
    assert any(e.cpu_memory_usage >= x.nbytes for e in prof.events())  # reported by the cache, not torch


def test_empty_cache_releases_free_buffers_only():
    x = torch.randn(BIG)
    kept = elu(x)
    del kept  # now cached
    held = elu(x)
    elu(x)  # a second buffer, freed at once
    assert cache_stats()["cached"] >= x.nbytes
    fastscore.empty_cache()
    assert cache_stats()["cached"] == 0
    torch.testing.assert_close(held, torch.nn.functional.elu(x))  # the live buffer is untouched


def _run(code, **env):
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


PROBE = """
import torch, fastscore
from fastscore._backend import cache_stats
from fastscore.ops import elu
x = torch.randn(4, 64, 64, 64)
ys = [elu(x) for _ in range(3)]
del ys
print(cache_stats()["cached"], cache_stats()["cap"])
"""


def test_the_cap_bounds_what_is_kept():
    off = _run(PROBE, FASTSCORE_CPU_CACHE_MB="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["0", "0"]
    one = _run(PROBE, FASTSCORE_CPU_CACHE_MB="5")  # room for one 4 MiB buffer of the three
    assert one.returncode == 0, one.stderr
    assert one.stdout.split() == [str(4 << 20), str(5 << 20)]


def test_a_malformed_cap_names_the_variable():
    bad = _run(PROBE, FASTSCORE_CPU_CACHE_MB="lots")
    assert bad.returncode != 0
    assert "FASTSCORE_CPU_CACHE_MB: expected a non-negative whole number of MiB, got 'lots'" in bad.stderr


def test_a_cap_whose_byte_count_overflows_is_refused():
    """2^44 MiB is 2^64 bytes: wrapped, it turned the cache off; larger values lifted the cap silently."""
    largest = (2**63 - 1) >> 20  # MiB: the byte count must fit the int64 cache_stats reports
    for mb in (str(2**44), str(largest + 1), "99999999999999999999"):
        bad = _run(PROBE, FASTSCORE_CPU_CACHE_MB=mb)
        assert bad.returncode != 0, f"{mb} MiB was accepted: {bad.stdout}"
        assert f"FASTSCORE_CPU_CACHE_MB: '{mb}' MiB overflows a 64-bit byte count" in bad.stderr, bad.stderr
    ok = _run(PROBE, FASTSCORE_CPU_CACHE_MB=str(largest))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split()[1] == str(largest << 20)


def test_a_forked_child_uses_the_cache_it_inherits():
    """A forked child (multiprocessing, DataLoader workers) works on its own copy of the cache."""
    x = torch.randn(BIG)
    cached = elu(x)
    del cached  # the parent holds a free buffer when it forks
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one thread (OpenMP's pool does not survive fork), the inherited cache
        try:
            torch.set_num_threads(1)
            os.write(write, repr(float(elu(x).sum())).encode())
        finally:
            os._exit(0)
    os.close(write)
    got = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    assert float(got) == pytest.approx(float(torch.nn.functional.elu(x).sum()), rel=1e-5)
