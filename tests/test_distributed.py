"""fastscore on torch.distributed: sharding, gathering, DDP training, failures; torchrun on localhost with gloo.

In-process tests check the pieces (a shard of a run is bitwise those rows of the whole run; the helpers are plain
runs without a process group). The torchrun tests start 2 processes of one thread each (``OMP_NUM_THREADS=1``, so
they fit 2 cores) and compare them with a one-process run on one thread: sampling (ald, pc, ode) and likelihoods
bitwise, training within float tolerance; a 2-"node" run on localhost; a rank that fails or hangs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from fastscore import cli
from fastscore import distributed
from fastscore.model_sampling import batch_invariant
from fastscore.model_sampling import sample as sample_rows
from fastscore.model_sampling import sde_for
from fastscore.train import model_from_checkpoint

pytestmark = pytest.mark.one_thread  # tiny tensors, and bitwise comparisons need one thread count throughout

TIMEOUT = 300  # a torchrun job of these tests takes 5 to 15 s on 2 cores; a hang fails the test, not CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTSCORE_DIST_TIMEOUT="120")
    env.pop("FASTSCORE_TEST_FAIL", None)
    env.update(extra)
    return env


def torchrun(*args, cwd, nproc: int = 2, env=None, timeout: float = TIMEOUT, module: bool = True):
    """``torchrun --standalone --nproc_per_node nproc -m fastscore ARGS`` (or a script), as a subprocess."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    target = ["-m", "fastscore"] if module else []
    return subprocess.run(
        launcher + target + [str(a) for a in args],
        cwd=cwd,
        env=env or worker_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def one_process(capsys, *args):
    """The command line in this process on one thread (the torchrun workers' thread count)."""
    status = cli.main([str(a) for a in args] + ["--threads", "1", "--no-progress"])
    out = capsys.readouterr()
    assert status == 0, out.err
    return out.out


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    """A toy ScoreMLP trained 200 steps on moons (a second, one thread)."""
    out = tmp_path_factory.mktemp("moons")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = cli.main(["train", "--data", "moons", "--steps", "200", "--out", str(out / "run"), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    return str(out / "run" / "checkpoint.pth")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """demo_tiny (the smallest NCSNv2, 8x8 RGB) trained 2 steps on random images: (checkpoint, data .npz)."""
    out = tmp_path_factory.mktemp("tiny")
    data = out / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.integers(0, 256, size=(20, 8, 8, 3), dtype=np.uint8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = cli.main(
            ["train", "--config", "demo_tiny", "--data", str(data), "--steps", "2", "--out", str(out / "run"),
             "--no-progress"]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    return str(out / "run" / "checkpoint.pth"), str(data)


# ---- in one process ---------------------------------------------------------------------------------------------


def test_python_m_fastscore_is_the_command_line(tmp_path):
    command = [sys.executable, "-m", "fastscore", "sample", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "usage: fastscore sample" in result.stdout and "-n N, --n N" in result.stdout


def test_shard_range_splits_without_overlap_in_rank_order():
    for n in (0, 1, 5, 37, 64):
        for size in (1, 2, 3, 8):
            shards = [distributed.shard_range(n, r, size) for r in range(size)]
            assert [i for s in shards for i in s] == list(range(n))  # covers [0, n) once, in rank order
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
            assert sorted(map(len, shards), reverse=True) == list(map(len, shards))  # the first ranks the longer
    assert distributed.shard_range(10) == range(10)  # no process group: everything
    with pytest.raises(ValueError, match="^rank: "):
        distributed.shard_range(10, 2, 2)
    with pytest.raises(ValueError, match="^size: "):
        distributed.shard_range(10, 0, 0)
    with pytest.raises(TypeError, match="^n: "):
        distributed.shard_range(2.5, 0, 1)
    with pytest.raises(ValueError, match="^rank, size: give both"):
        distributed.shard_range(10, 1)


def test_without_a_process_group_the_helpers_are_plain_runs(moons):
    assert distributed.world() is None and not distributed.launched()
    assert distributed.init() is None  # not started by torchrun: nothing to join
    t = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather(t) is t
    assert distributed.all_reduce(3, "max") == 3 and distributed.first_error(None) is None
    model, config, meta = model_from_checkpoint(moons)
    want = sample_rows(model, config, 9, sampler="pc", meta=meta, seed=3)
    assert torch.equal(distributed.sample(model, config, 9, sampler="pc", meta=meta, seed=3), want)


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan"])
def test_a_bad_timeout_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, value)
    with pytest.raises(distributed.DistributedError, match=f"^{distributed.TIMEOUT_ENV}: expected a positive number"):
        distributed.timeout_seconds()


def shards(n: int, size: int):
    return [distributed.shard_range(n, r, size) for r in range(size)]


@pytest.mark.parametrize("sampler", ["ald", "pc", "ode"])
def test_a_shard_is_bitwise_those_rows_of_the_whole_run(moons, sampler):
    """What makes sharding exact: each sample depends only on (seed, its index), and the network sees no batch
    smaller than 4 rows (uneven shards, a 1-sample shard and an empty one included)."""
    model, config, meta = model_from_checkpoint(moons)
    kw = dict(sampler=sampler, meta=meta, seed=5, n_steps_each=3)
    whole = sample_rows(model, config, 23, **kw)
    for size in (2, 3):
        parts = [sample_rows(model, config, 23, rows=rows, **kw) for rows in shards(23, size)]
        assert torch.equal(torch.cat(parts), whole), (sampler, size)
    for rows in (range(22, 23), range(7, 7)):
        assert torch.equal(sample_rows(model, config, 23, rows=rows, **kw), whole[rows.start : rows.stop])
    with pytest.raises(ValueError, match="^rows: expected a range"):
        sample_rows(model, config, 23, rows=range(20, 30), **kw)


def test_image_model_shards_and_inpainting_shards_are_bitwise(tiny):
    model, config, meta = model_from_checkpoint(tiny[0])
    model = model.to(memory_format=torch.channels_last)  # as `fastscore sample` runs it
    for sampler in ("ald", "pc"):
        kw = dict(sampler=sampler, meta=meta, seed=1, n_steps_each=2, sde_steps=12)
        whole = sample_rows(model, config, 9, **kw)
        assert torch.equal(torch.cat([sample_rows(model, config, 9, rows=r, **kw) for r in shards(9, 2)]), whole)
    known = torch.rand(9, 3, 8, 8) * 2 - 1
    mask = torch.zeros(1, 3, 8, 8)
    mask[..., :4] = 1
    kw = dict(known=known, mask=mask, seed=2, n_steps_each=2)
    whole = sample_rows(model, config, 9, **kw)
    assert torch.equal(torch.cat([sample_rows(model, config, 9, rows=r, **kw) for r in shards(9, 3)]), whole)


def test_likelihood_of_a_shard_is_bitwise_its_rows(moons):
    from fastscore.likelihood import log_likelihood

    model, config, meta = model_from_checkpoint(moons)
    score, sde = sde_for(model, config, meta)
    score = batch_invariant(score)
    x = torch.randn(13, 2)
    kw = dict(n_probes=2, seed=4, rtol=1e-3, atol=1e-3)
    whole = log_likelihood(score, sde, x, **kw)
    parts = [log_likelihood(score, sde, x[r.start : r.stop], sample_offset=r.start, **kw) for r in shards(13, 2)]
    assert torch.equal(torch.cat(parts), whole)


def test_batch_invariant_gives_small_batches_the_rows_of_larger_ones(moons):
    model, config, meta = model_from_checkpoint(moons)
    x, labels = torch.randn(16, 2), torch.randint(0, 10, (16,))
    padded = batch_invariant(model)
    with torch.no_grad():
        whole = model(x, labels)
        for k in (1, 2, 3):
            assert torch.equal(padded(x[:k], labels[:k]), whole[:k])
        assert padded(x[:0], labels[:0]).shape == (0, 2)


def test_ve_sigma_does_not_depend_on_the_position_in_the_batch():
    """A sample's sigma(t) is the same whatever the length of the tensor it sits in (ATen's pow gave the
    elements past the last full vector another rounding)."""
    from fastscore.sde import VESDE

    sde = VESDE(0.01, 50.0)
    for dtype in (torch.float32, torch.float64):
        t = torch.rand(100, dtype=dtype)
        whole = sde.sigma(t)
        assert whole.dtype == dtype
        assert all(torch.equal(sde.sigma(t[k : k + 37]), whole[k : k + 37]) for k in range(0, 63, 5))
        assert all(torch.equal(sde.sigma(t[:k]), whole[:k]) for k in range(1, 100))
        torch.testing.assert_close(whole, 0.01 * (50 / 0.01) ** t)


def test_likelihood_out_is_an_npz_and_not_overwritten(moons, tmp_path, capsys):
    args = ["likelihood", "--checkpoint", moons, "--data", "moons", "-n", "4", "--no-progress"]
    assert cli.main(args + ["--out", str(tmp_path / "bpd.png")]) == 1
    assert "--out " in capsys.readouterr().err and not (tmp_path / "bpd.png").exists()
    (tmp_path / "bpd.npz").write_bytes(b"keep")
    assert cli.main(args + ["--out", str(tmp_path / "bpd.npz")]) == 1
    assert "exists; pass --force to overwrite it" in capsys.readouterr().err
    assert (tmp_path / "bpd.npz").read_bytes() == b"keep"


def test_commands_that_run_in_one_process_refuse_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "fastscore demo: error: runs in one process; torchrun starts several for train, sample, likelihood only"
    )
    assert not (tmp_path / "demo").exists()


# ---- torchrun: 2 processes, gloo, localhost -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ald", "pc", "ode"])
def test_torchrun_sampling_is_bitwise_the_one_process_result(moons, tmp_path, capsys, sampler):
    args = ["sample", "--checkpoint", moons, "--sampler", sampler, "-n", "37", "--seed", "3", "--steps-each", "4",
            "--sde-steps", "60"]  # fmt: skip
    one_process(capsys, *args, "--out", tmp_path / "one.npz")
    result = ok(torchrun(*args, "--out", tmp_path / "two.npz", "--no-progress", cwd=tmp_path))
    assert f"sampled 37 with {sampler} on 2 processes" in result.stdout and "wrote" in result.stdout
    one, two = np.load(tmp_path / "one.npz")["samples"], np.load(tmp_path / "two.npz")["samples"]
    assert two.shape == (37, 2) and np.array_equal(one, two)  # 19 + 18 samples, bitwise
    assert result.stderr.count("warning: 4 Langevin step(s)") == (1 if sampler == "ald" else 0)  # rank 0 only


@pytest.mark.slow
def test_two_nodes_on_localhost_sample_bitwise(tiny, tmp_path, capsys):
    """`--nnodes 2` with a c10d rendezvous on 127.0.0.1: two torchrun agents of one process each."""
    checkpoint, _ = tiny
    args = ["sample", "--checkpoint", checkpoint, "--sampler", "ald", "-n", "6", "--seed", "2", "--steps-each", "2"]
    one_process(capsys, *args, "--out", tmp_path / "one.npz")
    port = free_port()
    agents = []
    for node in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"fastscore-{port}",
                   "--rdzv-conf", f"is_host={1 - node}", "-m", "fastscore", *args, "--out", str(tmp_path / "two.npz"),
                   "--no-progress"]  # fmt: skip
        agents.append(
            subprocess.Popen(command, cwd=tmp_path, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    outs = [a.communicate(timeout=TIMEOUT) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs
    assert b"sampled 6 with ald on 2 processes" in b"".join(o[0] for o in outs)
    assert np.array_equal(np.load(tmp_path / "one.npz")["samples"], np.load(tmp_path / "two.npz")["samples"])


@pytest.mark.slow
def test_torchrun_likelihood_equals_one_process(moons, tmp_path, capsys):
    args = ["likelihood", "--checkpoint", moons, "--data", "moons", "-n", "21", "--probes", "2", "--seed", "1"]
    line = one_process(capsys, *args, "--out", tmp_path / "one.npz").splitlines()[0]
    result = ok(torchrun(*args, "--out", tmp_path / "two.npz", "--no-progress", cwd=tmp_path))
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    for key in ("bits_per_dim", "log_likelihood"):
        assert one[key].shape == (21,) and np.array_equal(one[key], two[key])
    head = line.split(" (standard error")[0]  # the mean and its error bar; then the time, which varies
    assert result.stdout.startswith(head) and "on 2 processes" in result.stdout
    assert line.split(", ")[-1] == result.stdout.splitlines()[0].split(", ")[-1]  # the same score evaluations


def check_same_run(one_dir, two_dir, rtol=1e-5, atol=1e-7):
    """Two training checkpoints equal to float tolerance (weights, EMA, optimizer moments), with the same
    step, epoch and resume state (data order, position, generators)."""
    one = torch.load(os.path.join(one_dir, "checkpoint.pth"), weights_only=False)
    two = torch.load(os.path.join(two_dir, "checkpoint.pth"), weights_only=False)
    assert one[2:4] == two[2:4]
    for a, b in ((one[0], two[0]), (one[4], two[4])):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
    for p, q in zip(one[1]["state"].values(), two[1]["state"].values()):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(p[key], q[key], rtol=rtol, atol=atol)
    ra, rb = one[1]["fastscore"]["resume"], two[1]["fastscore"]["resume"]
    assert ra["position"] == rb["position"] and torch.equal(ra["order"], rb["order"])
    for key in ("data_rng", "loss_rng", "torch_rng"):
        assert torch.equal(ra[key], rb[key]), key


@pytest.mark.slow
def test_torchrun_training_equals_one_process_within_tolerance(tmp_path, capsys):
    """DDP on 2 processes with the global batch of the one-process run: the same weights, EMA, optimizer state
    and resume state to float rounding; rank 0 alone writes the checkpoint and the snapshot grids."""
    args = ["train", "--data", "moons", "--steps", "6", "--batch-size", "14", "--snapshot-freq", "3", "--seed", "1"]
    out = one_process(capsys, *args, "--out", tmp_path / "one")
    result = ok(torchrun(*args, "--out", tmp_path / "two", "--no-progress", cwd=tmp_path))
    assert "(2 processes)" in result.stderr and result.stdout.count("trained to step 6") == 1
    losses = [float(text.split("final loss ")[1].split(";")[0]) for text in (out, result.stdout)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    check_same_run(tmp_path / "one", tmp_path / "two")
    assert sorted(os.listdir(tmp_path / "two")) == ["checkpoint.pth", "samples_3.png", "samples_6.png"]


API_SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
from fastscore import distributed
from fastscore.data.toy import toy_sample
from fastscore.models import get_config
from fastscore.train import TrainError, model_from_checkpoint, toy_config, train

world = distributed.init()
out, checkpoint = sys.argv[1], sys.argv[2]
res = {"world": None if world is None else [world.rank, world.size]}
data = toy_sample("moons", 300, seed=0).float()
config = toy_config(data, name="moons")
for loss in ("dsm", "ssm", "sde"):
    run = train(config, data, os.path.join(out, loss), steps=3, batch_size=10, loss=loss, progress=False,
                snapshot_samples=0)
    res[loss] = run.losses
# a batch of one example: rank 1 has no rows and still takes part in every step
res["batch1"] = train(config, data, os.path.join(out, "batch1"), steps=2, batch_size=1, progress=False,
                      snapshot_samples=0).losses
images = torch.rand(13, 3, 8, 8)
res["image"] = train("demo_tiny", images, os.path.join(out, "image"), steps=3, batch_size=5, progress=False,
                     snapshot_samples=0).losses
bn = get_config("demo_tiny")
bn.model.normalization = "BatchNorm"
try:
    res["batchnorm"] = train(bn, images, os.path.join(out, "bn"), steps=1, batch_size=4, progress=False,
                             snapshot_samples=0).losses
except TrainError as exc:
    res["batchnorm"] = str(exc)
model, cfg, meta = model_from_checkpoint(checkpoint)
for sampler in ("ald", "pc", "ode"):
    for n in (1, 5):  # one sample: rank 1's shard is empty
        got = distributed.sample(model, cfg, n, sampler=sampler, meta=meta, seed=7, n_steps_each=3)
        if got is not None:
            res[f"{sampler}{n}"] = got.tolist()
from fastscore.model_sampling import sde_for
score, sde = sde_for(model, cfg, meta)
got = distributed.log_likelihood(score, sde, data[:7], seed=2, rtol=1e-3, atol=1e-3, return_info=True)
if got is not None:
    logp, info = got
    res["logp"], res["nfe"], res["z"] = logp.tolist(), info.nfe, info.z.tolist()
mine = torch.full((world.rank if world else 0, 2), float(world.rank if world else 0))
got = distributed.gather(mine)
if got is not None:
    res["gather"] = got.tolist()
if world is None or world.main:
    json.dump(res, open(os.path.join(out, "result.json"), "w"))
"""


@pytest.mark.slow
def test_python_api_under_torchrun_equals_one_process(moons, tmp_path):
    """fastscore.distributed for a script of one's own: training (every loss, an image model, a rank without
    rows) equal to float tolerance, sampling and likelihoods bitwise, uneven and empty shards gathered."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(API_SCRIPT))
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    ok(subprocess.run([sys.executable, str(script), str(tmp_path / "one"), moons], env=worker_env(),
                      capture_output=True, text=True, timeout=TIMEOUT))  # fmt: skip
    ok(torchrun(script, tmp_path / "two", moons, cwd=tmp_path, module=False))
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert one["world"] is None and two["world"] == [0, 2]
    for key in ("dsm", "ssm", "sde", "batch1", "image"):
        np.testing.assert_allclose(two[key], one[key], rtol=2e-6, err_msg=key)
    assert one["batchnorm"] != two["batchnorm"] and "torch's SyncBatchNorm needs GPUs" in two["batchnorm"]
    for key in ("ald1", "ald5", "pc1", "pc5", "ode1", "ode5", "logp", "nfe", "z"):
        assert one[key] == two[key], key  # bitwise (JSON keeps every bit of a float)
    assert two["gather"] == [[1.0, 1.0]] and one["gather"] == []  # rank 0's empty shard, then rank 1's row


SHUTDOWN_SCRIPT = """
import os, sys
import torch
from fastscore import distributed

def gloo_threads():  # this process's threads that gloo started (Linux names them)
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n)

w = distributed.init()
running = gloo_threads()
import torch._dynamo  # what building a fastscore model or torch.compile imports, after the group exists
distributed.gather(torch.ones(1 + w.rank, 2))
distributed.shutdown()
with open(os.path.join(sys.argv[1], f"rank{w.rank}.txt"), "w") as f:  # a file each: the ranks share stdout
    f.write(f"gloo threads while joined {len(running)}, after shutdown {gloo_threads()}")
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the thread names from Linux's /proc")
def test_shutdown_frees_the_process_group_so_nothing_races_the_exit(tmp_path):
    """distributed.shutdown leaves no gloo thread behind, even when torch._dynamo is first imported after the
    group exists (it keeps references to the group when imported then); a thread left over outlives the work
    and, destroyed during the interpreter's teardown, aborted a finished rank now and then."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(SHUTDOWN_SCRIPT))
    ok(torchrun(script, tmp_path, cwd=tmp_path, module=False))
    for rank in (0, 1):
        line = (tmp_path / f"rank{rank}.txt").read_text()
        assert "after shutdown []" in line and "while joined 0" not in line, f"rank {rank}: {line}"


# ---- failures ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_failing_rank_stops_the_job_naming_the_rank(moons, tmp_path):
    start = time.monotonic()
    result = torchrun("sample", "--checkpoint", moons, "-n", "8", "--steps-each", "1", "--out", tmp_path / "s.npz",
                      "--no-progress", cwd=tmp_path, env=worker_env(FASTSCORE_TEST_FAIL="1:sample"))  # fmt: skip
    assert result.returncode != 0 and time.monotonic() - start < 90
    assert "fastscore sample: error: rank 1 of 2: failing on purpose at sample" in result.stderr
    assert "[rank1]: Traceback" not in result.stderr and "[rank0]: Traceback" not in result.stderr  # one line each
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.slow
def test_a_hanging_rank_fails_the_job_within_the_timeout(moons, tmp_path):
    start = time.monotonic()
    env = worker_env(FASTSCORE_TEST_FAIL="1:sample:hang", FASTSCORE_DIST_TIMEOUT="4")
    result = torchrun("sample", "--checkpoint", moons, "-n", "8", "--steps-each", "1", "--out", tmp_path / "s.npz",
                      "--no-progress", cwd=tmp_path, env=env)  # fmt: skip
    assert result.returncode != 0 and time.monotonic() - start < 90
    assert "fastscore sample: error: rank 0 of 2: gathering the samples failed" in result.stderr
    assert "did not answer within 4 s (FASTSCORE_DIST_TIMEOUT)" in result.stderr
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.slow
def test_training_resumes_from_the_last_checkpoint_after_a_rank_died(tmp_path, capsys):
    """Rank 1 dies at step 3 of a 2-process run: the job fails, the checkpoint of step 2 stands, and resuming it
    in one process continues the same run (the one-process run to step 4, to float tolerance)."""
    args = ["train", "--data", "moons", "--steps", "4", "--batch-size", "12", "--snapshot-freq", "2", "--no-samples"]
    result = torchrun(*args, "--out", tmp_path / "two", "--no-progress", cwd=tmp_path,
                      env=worker_env(FASTSCORE_TEST_FAIL="1:step-3"))  # fmt: skip
    assert result.returncode != 0 and "rank 1 of 2: failing on purpose at step-3" in result.stderr
    assert torch.load(tmp_path / "two" / "checkpoint.pth", weights_only=False)[3] == 2
    one_process(capsys, *args[:5], "--no-samples", "--resume", "--out", tmp_path / "two")
    one_process(capsys, *args, "--out", tmp_path / "one")
    check_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_a_refusal_stops_every_rank_with_one_message(moons, tmp_path):
    (tmp_path / "s.npz").write_bytes(b"keep")
    result = torchrun("sample", "--checkpoint", moons, "-n", "4", "--out", tmp_path / "s.npz", cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("fastscore sample: error")]
    out = str(tmp_path / "s.npz")
    assert errors == [f"fastscore sample: error: --out {out!r} exists; pass --force to overwrite it"]
    assert (tmp_path / "s.npz").read_bytes() == b"keep"
