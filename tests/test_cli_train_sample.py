"""Training, sampling, likelihood and the demo, end to end on tiny settings; data loaders; the CLI's error contract."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastscore import cli
from fastscore import demo
from fastscore.data.images import DataError
from fastscore.data.images import load_dataset
from fastscore.data.images import save_image_grid
from fastscore.data.images import write_png
from fastscore.models import CheckpointError
from fastscore.models import get_model
from fastscore.models import load_checkpoint
from fastscore.train import EMAHelper
from fastscore.train import TrainError
from fastscore.train import export_checkpoint
from fastscore.train import train

pytestmark = pytest.mark.one_thread  # tiny tensors (see conftest.py)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    """20 random 8x8 RGB images (demo_tiny's input size) as an .npz of uint8 (N, H, W, C)."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, size=(20, 8, 8, 3), dtype=np.uint8))
    return str(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_npz):
    """A 3-step demo_tiny training run by the command line (checkpoint + exported sampling checkpoint)."""
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = cli.main(
            ["train", "--config", "demo_tiny", "--data", tiny_npz, "--steps", "3", "--snapshot-freq", "2",
             "--set", "training.snapshot_sampling=true", "--out", str(out / "run"), "--export", str(out / "small.pth"),
             "--no-progress"]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    return out


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fastscore.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def assert_one_line_error(result, status, message):
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def main_in_process(capsys, *args):
    """cli.main in this process (an uncaught exception fails the test, as a traceback would): (status, out, err)."""
    try:
        status = cli.main(list(args))
    except SystemExit as exc:  # argparse: --help and usage errors
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---- data -------------------------------------------------------------------------------------------------


def test_digits_are_rescaled_to_the_model_size_in_unit_range():
    pytest.importorskip("sklearn")
    x = load_dataset("digits", 16, 1)
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    rgb = load_dataset("digits", 8, 3, limit=5)
    assert rgb.shape == (5, 3, 8, 8)
    assert torch.equal(rgb[:, 0], rgb[:, 2])  # grey repeated into three channels


def test_npz_layouts_and_dtypes_give_the_same_images(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", images=images)
    np.savez(tmp_path / "nchw.npz", x=images.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    a = load_dataset(tmp_path / "nhwc.npz", 6, 3)
    b = load_dataset(tmp_path / "nchw.npz", 6, 3)
    assert a.shape == (4, 3, 6, 6)
    torch.testing.assert_close(a, b)
    assert torch.equal(a[0, :, 0, 0], torch.tensor(images[0, 0, 0] / 255.0, dtype=torch.float32))


def test_image_folder_loads_what_write_png_wrote(tmp_path):
    pytest.importorskip("PIL")
    images = torch.rand(3, 1, 5, 5)
    for i in range(3):
        save_image_grid(tmp_path / f"{i}.png", images[i : i + 1], padding=0, scale=1)
    (tmp_path / "notes.txt").write_text("not an image")
    loaded = load_dataset(tmp_path, 5, 1)
    assert loaded.shape == (3, 1, 5, 5)
    # 8-bit quantisation is the only difference
    assert float((loaded - images).abs().max()) <= 0.5 / 255 + 1e-6


def test_write_png_is_read_back_exactly_by_pillow(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(2).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    grey = rgb[..., 0].copy()
    write_png(tmp_path / "rgb.png", rgb)
    write_png(tmp_path / "grey.png", grey)
    with pil.open(tmp_path / "rgb.png") as im:
        assert np.array_equal(np.asarray(im), rgb)
    with pil.open(tmp_path / "grey.png") as im:
        assert np.array_equal(np.asarray(im), grey)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: str(p / "missing"), "no data set"),
        (lambda p: (p / "a.txt").write_text("x") and str(p / "a.txt"), "expected an .npz or .npy"),
        (lambda p: np.savez(p / "f.npz", images=np.full((2, 4, 4), 2.0)) or str(p / "f.npz"), "must lie in [0, 1]"),
        (lambda p: np.savez(p / "k.npz", a=np.zeros((2, 4, 4)), b=np.zeros(3)) or str(p / "k.npz"), "no array named"),
        (lambda p: np.savez(p / "s.npz", images=np.zeros((2, 4))) or str(p / "s.npz"), "expected images of shape"),
    ],
)
def test_bad_data_raises_one_clear_error(tmp_path, make, message):
    with pytest.raises(DataError, match=None) as info:
        load_dataset(make(tmp_path), 4, 1)
    assert message in str(info.value)


# ---- EMA, training, checkpoints ---------------------------------------------------------------------------


def test_ema_follows_ncsnv2_rule():
    net = torch.nn.Linear(3, 2)
    ema = EMAHelper(mu=0.9)
    ema.register(net)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.state_dict()["weight"], 0.1 * net.weight + 0.9 * start["weight"], rtol=0, atol=0)
    twin = ema.ema_copy(net)
    assert torch.equal(twin.weight, ema.state_dict()["weight"]) and not torch.equal(twin.weight, net.weight)


def _train_tiny(data, out, **kwargs):
    kwargs = {"batch_size": 8, "snapshot_freq": 3, "progress": False, "snapshot_samples": 4, **kwargs}
    return train("demo_tiny", data, out, **kwargs)


def test_resume_continues_bitwise(tmp_path):
    """Stopping at step 3 (mid-epoch, with a sample grid written) and resuming to 7 gives the weights, EMA
    and optimizer state of one run to 7, bitwise; the data order crosses an epoch boundary on the way."""
    data = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    straight = _train_tiny(data, tmp_path / "a", steps=7, seed=5)
    _train_tiny(data, tmp_path / "b", steps=3, seed=5)
    resumed = _train_tiny(data, tmp_path / "b", steps=7, resume=True)
    assert resumed.losses == straight.losses[3:]
    a = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    assert a[2:4] == b[2:4] == [2, 7]  # (epoch, step): 20 examples in batches of 8, 8, 4: 3 per epoch
    for i in (0, 4):
        assert a[i].keys() == b[i].keys()
        for key in a[i]:
            assert torch.equal(a[i][key], b[i][key]), key
    for p, q in zip(a[1]["state"].values(), b[1]["state"].values()):
        assert all(torch.equal(p[k], q[k]) for k in p)
    assert os.path.isfile(tmp_path / "b" / "samples_3.png") and os.path.isfile(tmp_path / "b" / "samples_6.png")


def test_resume_refuses_a_finished_or_different_run(tmp_path):
    data = torch.rand(8, 3, 8, 8)
    _train_tiny(data, tmp_path, steps=2)
    with pytest.raises(TrainError, match="already at step 2"):
        _train_tiny(data, tmp_path, steps=2, resume=True)
    with pytest.raises(TrainError, match="started with loss dsm, not ssm"):
        _train_tiny(data, tmp_path, steps=4, resume=True, loss="ssm")


def test_checkpoint_is_ncsnv2_layout_and_loads_with_ema(tmp_path):
    data = torch.rand(8, 3, 8, 8)
    result = _train_tiny(data, tmp_path, steps=2)
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert isinstance(ckpt, list) and isinstance(ckpt[0], dict) and isinstance(ckpt[4], dict)
    model = load_checkpoint(result.checkpoint, get_model("demo_tiny"))
    for name, param in model.named_parameters():
        assert torch.equal(param, ckpt[4][name])  # EMA weights by default
    raw = load_checkpoint(result.checkpoint, get_model("demo_tiny"), ema=False)
    assert any(not torch.equal(p, ckpt[4][n]) for n, p in raw.named_parameters())
    size = export_checkpoint(result.checkpoint, tmp_path / "small.pth")
    assert size < os.path.getsize(result.checkpoint) / 3
    small = load_checkpoint(tmp_path / "small.pth", get_model("demo_tiny"))
    for name, param in small.named_parameters():  # float16 rounds to within 2^-11 relative, 2^-25 below 2^-14
        torch.testing.assert_close(param, ckpt[4][name], rtol=2**-11, atol=2**-25)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "small.pth", get_model("demo_digits"))


def test_training_lowers_the_toy_loss():
    from fastscore.data.toy import toy_sample
    from fastscore.train import toy_config

    data = toy_sample("gmm", 2000, seed=0)
    config = toy_config(data, name="gmm")
    config.training.snapshot_freq = 1000
    result = train(config, data, os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fs-toy-{os.getpid()}"), steps=200,
                   progress=False)  # fmt: skip
    first, last = np.mean(result.losses[:20]), np.mean(result.losses[-20:])
    assert last < 0.8 * first, (first, last)


# ---- the command line ---------------------------------------------------------------------------------------


def test_train_command_writes_checkpoint_samples_and_export(tiny_run):
    run = tiny_run / "run"
    assert sorted(os.listdir(run)) == ["checkpoint.pth", "samples_2.png", "samples_3.png"]
    assert os.path.getsize(tiny_run / "small.pth") < os.path.getsize(run / "checkpoint.pth")


@pytest.mark.parametrize("sampler", ["ald", "pc", "ode"])
def test_sample_command_writes_npz(tiny_run, tmp_path, sampler, capsys):
    out = tmp_path / "s.npz"
    args = ["sample", "--checkpoint", str(tiny_run / "small.pth"), "--sampler", sampler, "--n", "3", "--seed", "1",
            "--steps-each", "1", "--sde-steps", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    samples = np.load(out)["samples"]
    assert samples.shape == (3, 3, 8, 8) and np.isfinite(samples).all()
    assert samples.min() >= 0 and samples.max() <= 1
    assert f"sampled 3 with {sampler}" in capsys.readouterr().out
    # the same seed gives the same samples
    again = tmp_path / "again.npz"
    assert cli.main(args[:-2] + [str(again), "--no-progress"]) == 0
    assert np.array_equal(np.load(again)["samples"], samples)


def test_sample_inpainting_and_reference_ratio(tiny_run, tiny_npz, tmp_path, capsys):
    out = tmp_path / "inpainted.png"
    args = ["sample", "--checkpoint", str(tiny_run / "run" / "checkpoint.pth"), "--n", "2", "--steps-each", "1",
            "--mask", "left", "--data", tiny_npz, "--reference", "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "(inpainting)" in text and re.search(r"fastscore is (\d+\.\d\dx (faster|slower)|as fast)", text), text
    assert out.read_bytes().startswith(b"\x89PNG")


def test_likelihood_prints_bits_per_dim_with_error_bar(tiny_run, tiny_npz, capsys):
    args = ["likelihood", "--checkpoint", str(tiny_run / "small.pth"), "--data", tiny_npz, "--n", "2", "--tol", "1e-2",
            "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    line = capsys.readouterr().out.strip()
    mean, _, err = line.split()[:3]
    assert np.isfinite(float(mean)) and float(err) >= 0 and "bits/dim" in line


def test_demo_quick_writes_its_images(tmp_path, capsys):
    assert os.path.isfile(demo.shipped_checkpoint())
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert demo.OUTPUTS == ("demo_digits.png", "demo_digits_20evals.png", "ncsn_toy.png")
    for name in demo.OUTPUTS:
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    # the few-step grid: one row of 8 digits in 10 evaluations (--quick; the demo's 20), a PNG that decodes to its
    # grid: 8 tiles of 16 + 2 pixels and the border, enlarged 4x (to at least 512 pixels wide)
    assert (
        "the same model in 10 evaluations (ancestral DDIM (eta 1), 10 steps), 4.9x fewer than annealed Langevin's 49"
        in text
    )
    pil = pytest.importorskip("PIL.Image")
    with pil.open(tmp_path / "demo_digits_20evals.png") as im:
        grid = np.asarray(im)
    assert grid.shape == (4 * 20, 4 * (8 * 18 + 2)), grid.shape
    tiles = [grid[4 * 2 : 4 * 18, 4 * (2 + 18 * i) : 4 * (18 + 18 * i)] for i in range(8)]
    assert all(0 < tile.mean() < 255 and tile.std() > 10 for tile in tiles)  # drawn digits: neither blank nor flat
    assert "annealed Langevin 0.7" in text or "annealed Langevin 0.8" in text  # the 0.8 / 0.2 weights recovered
    assert "one Langevin step" in text and "one NCSNv2 forward" in text
    speed_lines = [line for line in text.splitlines() if line.lstrip().startswith(("one Langevin", "one NCSNv2"))]
    assert all(line.endswith(("faster", "slower", "(1.00x)")) for line in speed_lines), speed_lines  # in words


def test_refuses_to_overwrite_and_leaves_the_file_alone(tiny_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    out.write_bytes(b"precious")
    status, _, err = main_in_process(capsys, "sample", "--checkpoint", str(tiny_run / "small.pth"), "--out", str(out))
    assert status == 1 and "exists; pass --force" in err
    assert out.read_bytes() == b"precious"
    before = (tiny_run / "run" / "checkpoint.pth").read_bytes()
    status, _, err = main_in_process(capsys, "train", "--config", "demo_tiny", "--data", "digits", "--out",
                                     str(tiny_run / "run"))  # fmt: skip
    assert status == 1 and "exists; pass --resume to continue it or --force" in err
    assert (tiny_run / "run" / "checkpoint.pth").read_bytes() == before
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "ncsn_toy.png").write_bytes(b"mine")
    status, _, err = main_in_process(capsys, "demo", "--quick", "--out", str(tmp_path / "demo"))
    assert status == 1 and "ncsn_toy.png' exists" in err
    assert os.listdir(tmp_path / "demo") == ["ncsn_toy.png"]


@pytest.mark.parametrize(
    "args,status,message",
    [
        (["train", "--config", "demo_tiny"], 2, "the following arguments are required: --data"),
        (["train", "--config", "demo_tiny", "--data", "x", "--steps", "0"], 2, "--steps: expected a positive integer"),
        (["train", "--config", "no_such_config", "--data", "digits"], 1, "unknown config 'no_such_config'"),
        (["train", "--config", "demo_tiny", "--data", "/no/such/dir"], 1, "no data set '/no/such/dir'"),
        (["train", "--data", "digits", "--resume", "--out", "/no/such/run"], 1, "--resume: no checkpoint"),
        (["train", "--data", "digits", "--set", "oops"], 1, "--set 'oops': expected section.key=value"),
        (["sample", "--checkpoint", "/no/such.pth", "--out", "x.png"], 1, "does not exist"),
        (["sample", "--checkpoint", "c.pth", "--out", "x.jpg"], 1, "expected a .png or .npz file"),
        (["sample", "--checkpoint", "c.pth", "--out", "x.png", "--sampler", "ddpm"], 2, "invalid choice: 'ddpm'"),
        (["sample", "--checkpoint", "c.pth", "--out", "/no/dir/x.png"], 1, "does not exist"),
        (["likelihood", "--checkpoint", "/no/such.pth", "--data", "digits"], 1, "does not exist"),
        (["demo", "--threads", "0"], 2, "--threads: expected a positive integer"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line(tmp_path, monkeypatch, capsys, args, status, message):
    monkeypatch.chdir(tmp_path)
    got, _, err = main_in_process(capsys, *args)
    lines = err.strip().splitlines()
    assert got == status and len(lines) == 1 and message in lines[0], err
    assert os.listdir(tmp_path) == []  # nothing written


def test_a_bad_argument_in_a_real_process_prints_no_traceback(tmp_path):
    assert_one_line_error(run_cli("train", "--config", "demo_tiny", "--data", "nope", cwd=tmp_path), 1, "no data set")
    assert_one_line_error(run_cli("sample", "--n", "-1", cwd=tmp_path), 2, "--n: expected a positive integer")


def test_checkpoint_of_another_architecture_is_a_clear_error(tiny_run, tmp_path, capsys):
    status, _, err = main_in_process(capsys, "sample", "--checkpoint", str(tiny_run / "small.pth"), "--config",
                                     "demo_digits", "--out", str(tmp_path / "x.png"))  # fmt: skip
    assert status == 1 and len(err.strip().splitlines()) == 1 and "does not fit NCSNv2" in err
    assert not (tmp_path / "x.png").exists()


def test_every_new_command_has_help(capsys):
    for command in ("train", "sample", "likelihood", "demo"):
        status, out, _ = main_in_process(capsys, command, "--help")
        assert status == 0 and f"usage: fastscore {command}" in out


def test_masks_named_and_from_files(tmp_path):
    left = cli._mask("left", (1, 3, 4, 4))
    assert left.shape == (1, 3, 4, 4) and left[..., :2].eq(1).all() and left[..., 2:].eq(0).all()
    centre = cli._mask("center", (1, 1, 8, 8))
    assert centre.sum() == 64 - 16 and centre[0, 0, 3, 3] == 0
    np.save(tmp_path / "m.npy", np.eye(4))
    assert torch.equal(cli._mask(str(tmp_path / "m.npy"), (1, 2, 4, 4))[0, 1], torch.eye(4))
    with pytest.raises(cli.CommandError, match="does not fit images"):
        cli._mask(str(tmp_path / "m.npy"), (1, 1, 5, 5))
    with pytest.raises(cli.CommandError, match="expected one of left"):
        cli._mask("diagonal", (1, 1, 4, 4))


def test_train_command_resumes_and_refuses_a_new_config(tiny_npz, tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--data", tiny_npz, "--out", out, "--no-progress"]
    assert cli.main(base + ["--config", "demo_tiny", "--steps", "2"]) == 0
    assert cli.main(base + ["--steps", "3", "--resume"]) == 0
    assert "trained to step 3" in capsys.readouterr().out
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)[3] == 3
    status, _, err = main_in_process(capsys, *base, "--steps", "4", "--resume", "--config", "demo_tiny")
    assert status == 1 and "leave out --config" in err


def test_toy_data_trains_a_score_mlp_and_samples_points(tmp_path, capsys):
    out = str(tmp_path / "toy")
    assert cli.main(["train", "--data", "moons", "--steps", "5", "--out", out, "--no-progress"]) == 0
    ckpt = os.path.join(out, "checkpoint.pth")
    assert cli.main(["sample", "--checkpoint", ckpt, "--n", "10", "--steps-each", "1", "--out",
                     str(tmp_path / "p.npz"), "--no-progress"]) == 0  # fmt: skip
    points = np.load(tmp_path / "p.npz")["samples"]
    assert points.shape == (10, 2) and np.isfinite(points).all()


@pytest.mark.parametrize("loss", ["ssm", "sde"])
def test_other_losses_train_an_image_model(tmp_path, loss):
    data = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    result = _train_tiny(data, tmp_path, steps=2, loss=loss, snapshot_samples=0)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert torch.load(result.checkpoint, weights_only=True)[1]["fastscore"]["loss"] == loss


# ---- outputs: writable before the work, written atomically, write errors as one line ------------------------


def _only_files(folder):
    return sorted(os.listdir(folder))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_before_any_work(tiny_run, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        status, out, err = main_in_process(capsys, "sample", "--checkpoint", str(tiny_run / "small.pth"), "--n", "2",
                                           "--out", str(locked / "s.npz"), "--no-progress")  # fmt: skip
        assert status == 1 and len(err.strip().splitlines()) == 1, err
        assert "cannot write in folder" in err and "locked" in err and "sampled" not in out
        status, _, err = main_in_process(capsys, "train", "--data", "moons", "--steps", "1", "--out",
                                         str(locked / "run"), "--no-progress")  # fmt: skip
        assert status == 1 and len(err.strip().splitlines()) == 1 and "cannot write in folder" in err, err
        assert err.startswith("fastscore train: error:")  # refused before loading data or training
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_a_folder_at_the_output_path_is_refused_even_with_force(tiny_run, tmp_path, capsys):
    folder = tmp_path / "grid.png"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    status, out, err = main_in_process(capsys, "sample", "--checkpoint", str(tiny_run / "small.pth"), "--n", "2",
                                       "--out", str(folder), "--force", "--no-progress")  # fmt: skip
    assert status == 1 and len(err.strip().splitlines()) == 1 and "is a folder" in err, err
    assert "sampled" not in out and _only_files(folder) == ["mine.txt"]
    status, _, err = main_in_process(capsys, "train", "--data", "moons", "--steps", "1", "--out", str(tmp_path / "r"),
                                     "--export", str(folder), "--force", "--no-progress")  # fmt: skip
    assert status == 1 and "--export" in err and "is a folder" in err, err
    assert not (tmp_path / "r").exists()


def test_a_failed_write_is_one_line_and_leaves_no_partial_file(tiny_run, tmp_path, capsys, monkeypatch):
    """A full disk at write time (simulated: fsync fails with ENOSPC): one line, exit 1, the file that was
    there before is intact, and no temporary file is left."""
    import errno

    out = tmp_path / "s.npz"
    out.write_bytes(b"earlier samples")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    status, text, err = main_in_process(capsys, "sample", "--checkpoint", str(tiny_run / "small.pth"), "--n", "2",
                                        "--steps-each", "1", "--out", str(out), "--force", "--no-progress")  # fmt: skip
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "s.npz" in err and "Traceback" not in err
    assert "sampled 2" in text  # the failure came at write time
    assert out.read_bytes() == b"earlier samples" and _only_files(tmp_path) == ["s.npz"]
    # a training run whose checkpoint write fails: one line, no torn checkpoint or temporary file
    run = tmp_path / "run"
    status, _, err = main_in_process(capsys, "train", "--data", "moons", "--steps", "2", "--out", str(run),
                                     "--no-progress")  # fmt: skip
    lines = err.strip().splitlines()
    assert status == 1 and lines[-1].startswith("fastscore train: error: writing") and "Traceback" not in err, err
    assert "No space left on device" in lines[-1] and all(line.startswith("train: ") for line in lines[:-1]), err
    assert not run.exists()  # the run wrote nothing: its folder is gone again


# ---- run folders: stale temporary files, one run at a time ---------------------------------------------------


def _dead_pid(tmp_path, write=None):
    """The pid of a process that has exited (killed with SIGKILL after writing ``write`` with its own pid)."""
    code = "import os, signal\n"
    if write:
        code += f"open({str(write)!r} + str(os.getpid()), 'wb').write(b'half a checkpoint')\n"
    code += "os.kill(os.getpid(), signal.SIGKILL)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path)
    assert proc.returncode == -9
    return proc


def test_a_new_run_removes_the_temporary_files_of_killed_runs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _dead_pid(tmp_path, write=run / "checkpoint.pth.tmp")  # killed mid-write, as kill -9 leaves it
    stale = [n for n in os.listdir(run) if n.startswith("checkpoint.pth.tmp")]
    assert len(stale) == 1
    live = run / f"checkpoint.pth.tmp{os.getppid()}"  # a live process's write in progress: kept
    live.write_bytes(b"")
    (run / "notes.txt.tmp1").write_text("not ours")  # not a file a run writes: kept
    (run / "samples_3.png.tmp999999999").write_bytes(b"")  # no such process: removed
    data = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    _train_tiny(data, run, steps=1, snapshot_samples=0)
    assert _only_files(run) == sorted(["checkpoint.pth", live.name, "notes.txt.tmp1"])


def test_a_second_run_into_a_locked_folder_fails_at_once(tmp_path, capsys):
    import fcntl

    from fastscore.train import LOCK_NAME

    run = tmp_path / "run"
    run.mkdir()
    with open(run / LOCK_NAME, "w") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        status, _, err = main_in_process(capsys, "train", "--data", "moons", "--steps", "2", "--out", str(run),
                                         "--no-progress")  # fmt: skip
        assert status == 1 and len(err.strip().splitlines()) == 1, err
        assert f"run folder {str(run)!r} is in use by another fastscore train" in err
        assert not (run / "checkpoint.pth").exists()
        data = torch.rand(8, 3, 8, 8)
        with pytest.raises(TrainError, match="in use by another fastscore train"):
            _train_tiny(data, run, steps=1, snapshot_samples=0)
    assert cli.main(["train", "--data", "moons", "--steps", "2", "--out", str(run), "--no-progress",
                     "--no-samples"]) == 0  # fmt: skip
    assert _only_files(run) == ["checkpoint.pth"]  # the lock file goes with the run


# ---- checkpoints as ncsnv2 reads them ----------------------------------------------------------------------


class Ncsnv2EMAHelper:
    """ermongroup/ncsnv2 models/ema.py's EMAHelper, the parts its runner uses to load and apply a checkpoint."""

    def __init__(self, mu=0.999):
        self.mu = mu
        self.shadow = {}

    def register(self, module):
        if isinstance(module, torch.nn.DataParallel):
            module = module.module
        for name, param in module.named_parameters():
            if param.requires_grad:
                self.shadow[name] = param.data.clone()

    def ema(self, module):
        if isinstance(module, torch.nn.DataParallel):
            module = module.module
        for name, param in module.named_parameters():
            if param.requires_grad:
                param.data.copy_(self.shadow[name].data)

    def load_state_dict(self, state_dict):
        self.shadow = state_dict


def ncsnv2_sample_load(path, config):
    """ncsnv2's NCSNRunner.sample(): the model it samples with, loaded from a checkpoint file."""
    states = torch.load(path, map_location="cpu")
    score = get_model(config, layers="reference")
    score = torch.nn.DataParallel(score)
    score.load_state_dict(states[0], strict=True)
    if config.model.ema:
        ema_helper = Ncsnv2EMAHelper(mu=config.model.ema_rate)
        ema_helper.register(score)
        ema_helper.load_state_dict(states[-1])
        ema_helper.ema(score)
    return score


def ncsnv2_resume_load(path, config):
    """ncsnv2's NCSNRunner.train() with resume_training: model, optimizer, epoch, step and EMA."""
    from fastscore.train import get_optimizer

    score = torch.nn.DataParallel(get_model(config, layers="reference"))
    optimizer = get_optimizer(config, score.parameters())
    ema_helper = Ncsnv2EMAHelper(mu=config.model.ema_rate)
    ema_helper.register(score)
    states = torch.load(path)
    score.load_state_dict(states[0])
    states[1]["param_groups"][0]["eps"] = config.optim.eps
    optimizer.load_state_dict(states[1])
    start_epoch, step = states[2], states[3]
    if config.model.ema:
        ema_helper.load_state_dict(states[4])
    return score, optimizer, start_epoch, step, ema_helper


@pytest.mark.parametrize("ema", [True, False])
def test_ncsnv2_runner_loads_a_fastscore_checkpoint(tmp_path, ema):
    from fastscore.models import get_config

    config = get_config("demo_tiny")
    config.model.ema = ema
    data = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    result = train(config, data, tmp_path, steps=2, batch_size=4, progress=False, snapshot_samples=0)
    states = torch.load(result.checkpoint)
    assert len(states) == (5 if ema else 4) and states[2:4] == [0, 2]
    mine = load_checkpoint(result.checkpoint, get_model(config))  # EMA weights when there are any
    sampled = ncsnv2_sample_load(result.checkpoint, config)
    for (name, p), (_, q) in zip(sampled.module.state_dict().items(), mine.state_dict().items()):
        assert torch.equal(p, q), name
    score, optimizer, epoch, step, helper = ncsnv2_resume_load(result.checkpoint, config)
    assert (epoch, step) == (0, 2) and list(optimizer.state_dict()) == ["state", "param_groups"]
    raw = load_checkpoint(result.checkpoint, get_model(config), ema=False)
    for (name, p), (_, q) in zip(score.module.state_dict().items(), raw.state_dict().items()):
        assert torch.equal(p, q), name
    if ema:
        assert helper.shadow.keys() == dict(score.module.named_parameters()).keys()
    # the exported sampling checkpoint is read by ncsnv2's sampler too, with the same weights
    export_checkpoint(result.checkpoint, tmp_path / "small.pth")
    small = ncsnv2_sample_load(tmp_path / "small.pth", config)
    for (name, p), (_, q) in zip(small.module.state_dict().items(), mine.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=2**-11, atol=2**-25, msg=name)


def test_resume_from_an_older_fastscore_checkpoint_layout(tmp_path):
    """Checkpoints of the earlier layout (unprefixed keys, fastscore's dict as a sixth entry, no checksums)
    still resume, bitwise as the current layout does."""
    from fastscore.train import checkpoint_meta

    data = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    _train_tiny(data, tmp_path / "new", steps=3, seed=5, snapshot_samples=0)
    states = torch.load(tmp_path / "new" / "checkpoint.pth", weights_only=True)
    meta = checkpoint_meta(states)
    meta.pop("checksum")
    meta["format"] = "fastscore-train-1"
    optimizer = {k: v for k, v in states[1].items() if k != "fastscore"}
    old = [{k[len("module.") :]: v for k, v in states[0].items()}, optimizer, states[2], states[3], states[4], meta]
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "checkpoint.pth")
    a = _train_tiny(data, tmp_path / "new", steps=5, resume=True, snapshot_samples=0)
    b = _train_tiny(data, tmp_path / "old", steps=5, resume=True, snapshot_samples=0)
    assert a.losses == b.losses
    x = torch.load(tmp_path / "new" / "checkpoint.pth", weights_only=True)
    y = torch.load(tmp_path / "old" / "checkpoint.pth", weights_only=True)
    for key in x[0]:
        assert torch.equal(x[0][key], y[0][key]), key


# ---- --set, seeds and sizes: one-line errors before any work ----------------------------------------------------


def test_set_works_on_the_toy_configs(tmp_path, capsys):
    out = tmp_path / "toy"
    status, _, err = main_in_process(capsys, "train", "--data", "moons", "--set", "model.ema_rate=0.995", "--set",
                                     "optim.lr=1e-3", "--steps", "2", "--out", str(out), "--no-progress")  # fmt: skip
    assert status == 0, err
    meta = torch.load(out / "checkpoint.pth", weights_only=True)[1]["fastscore"]
    assert meta["config"]["model"]["ema_rate"] == 0.995 and meta["config"]["optim"]["lr"] == 1e-3


@pytest.fixture(scope="module")
def huge_yml(tmp_path_factory):
    """A saved config whose model needs about 400 TB."""
    import yaml

    from fastscore.models import get_config
    from fastscore.models import namespace2dict

    config = namespace2dict(get_config("demo_tiny"))
    config["model"]["ngf"] = 96_000  # 1.7e13 parameters: 400 TB with gradients, Adam's moments and the EMA
    path = tmp_path_factory.mktemp("cfg") / "huge.yml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(
    "args,status,message",
    [
        (["--data", "moons", "--set", "model.ema_rate=abc"], 1, "config.model.ema_rate: expected a number in [0, 1]"),
        (["--data", "moons", "--set", "model.ema_rate=1.5"], 1, "config.model.ema_rate: expected a number in [0, 1]"),
        (["--config", "demo_tiny", "--data", "x", "--set", "model.normalization=Bogus"], 1,
         "config.model.normalization: expected one of"),
        (["--config", "demo_tiny", "--data", "x", "--set", "model.nonlinearity=tanh"], 1,
         "config.model.nonlinearity: expected one of"),
        (["--data", "moons", "--seed", "18446744073709551616"], 2, "--seed: expected an integer from 0 to"),
        (["--data", "moons", "--seed", "-1"], 2, "--seed: expected an integer from 0 to"),
        (["--config", "demo_tiny", "--data", "x", "--set", "model.ngf=100000000"], 1, "needs at least"),
        (["--config", "demo_tiny", "--data", "x", "--set", "model.ngf=100000000000"], 1, "far too large"),
        (["--data", "moons", "--set", "model.hidden=100000000000"], 1, "far too large"),
        (["--config", "demo_tiny", "--data", "x", "--set", "training.batch_size=10000000000"], 1, "needs at least"),
        (["--data", "moons", "--set", "model.ema_rat=0.9"], 1, "no field model.ema_rat (did you mean model.ema_rate?)"),
        (["--data", "moons", "--set", "model.colour=1"], 1, "no field model.colour"),
        (["--data", "moons", "--set", "colour.x=1"], 1, "the config has no section 'colour'"),
        (["--config", "demo_tiny", "--data", "x", "--set", "training.n_epochs=many"], 1,
         "config.training.n_epochs holds a number"),
        (["--config", "demo_tiny", "--data", "x", "--set", "data.image_size=0"], 1, "config.data.image_size: expected"),
    ],
)  # fmt: skip
def test_bad_config_settings_and_seeds_are_one_line_errors_before_any_work(tmp_path, monkeypatch, capsys, args,
                                                                           status, message):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    got, _, err = main_in_process(capsys, "train", *args, "--steps", "1", "--out", "run", "--no-progress")
    lines = err.strip().splitlines()
    assert got == status and len(lines) == 1 and message in lines[0], err
    assert os.listdir(tmp_path) == []  # refused before the run folder or anything else was made


def test_a_saved_config_asking_for_400_tb_is_refused_before_any_work(huge_yml, tiny_run, tmp_path, capsys):
    status, _, err = main_in_process(capsys, "train", "--config", huge_yml, "--data", "x", "--out",
                                     str(tmp_path / "a"), "--no-progress")  # fmt: skip
    assert status == 1 and len(err.strip().splitlines()) == 1 and "needs at least 401 TB of memory" in err, err
    # a checkpoint whose saved config asks for it: sampling and resuming refuse it before building the model
    states = torch.load(tiny_run / "run" / "checkpoint.pth", weights_only=True)
    states[1]["fastscore"]["config"]["model"]["ngf"] = 96_000
    (tmp_path / "b").mkdir()
    torch.save(states, tmp_path / "b" / "checkpoint.pth")
    status, _, err = main_in_process(capsys, "sample", "--checkpoint", str(tmp_path / "b" / "checkpoint.pth"),
                                     "--out", str(tmp_path / "s.npz"), "--no-progress")  # fmt: skip
    assert status == 1 and len(err.strip().splitlines()) == 1 and "needs at least" in err, err
    status, _, err = main_in_process(capsys, "train", "--data", "x", "--resume", "--out", str(tmp_path / "b"),
                                     "--no-progress")  # fmt: skip
    assert status == 1 and len(err.strip().splitlines()) == 1 and "needs at least" in err, err
    assert sorted(os.listdir(tmp_path)) == ["b"] and os.listdir(tmp_path / "b") == ["checkpoint.pth"]


def test_sample_compile_gives_the_eager_samples(tiny_run, tmp_path, capsys):
    """--compile: the network runs as one compiled graph; the samples are the eager ones to rounding."""
    paths = {}
    for compiled in (False, True):
        paths[compiled] = tmp_path / f"s{int(compiled)}.npz"
        args = ["sample", "--checkpoint", str(tiny_run / "small.pth"), "--n", "3", "--seed", "1", "--steps-each", "1",
                "--out", str(paths[compiled]), "--no-progress"] + (["--compile"] if compiled else [])  # fmt: skip
        assert cli.main(args) == 0
    eager, compiled = (np.load(paths[c])["samples"] for c in (False, True))
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=1e-4)


# ---- a newcomer's defaults and messages ------------------------------------------------------------------------


def _png_size(path):
    data = open(path, "rb").read(24)
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # width, height


def test_the_shipped_checkpoint_carries_the_bundled_config():
    """One truth for the shipped model: the config inside demo_digits.pth is the bundled demo_digits.yml (what
    `fastscore sample` and the demo read from the checkpoint, and what the README's command trains with)."""
    from fastscore.models import get_config
    from fastscore.models import namespace2dict
    from fastscore.train import checkpoint_meta
    from fastscore.train import read_checkpoint

    ckpt = read_checkpoint(demo.shipped_checkpoint())
    meta = checkpoint_meta(ckpt)
    embedded, bundled = meta["config"], namespace2dict(get_config("demo_digits"))
    for path in ("training.batch_size", "training.n_iters", "training.snapshot_freq", "training.anneal_power",
                 "sampling.n_steps_each", "sampling.step_lr", "sampling.denoise", "sampling.ckpt_id",
                 "model.sigma_begin", "model.sigma_end", "model.num_classes", "model.ema_rate", "model.ngf",
                 "optim.lr"):  # fmt: skip
        section, key = path.split(".")
        assert embedded[section][key] == bundled[section][key], path
    assert embedded == bundled
    # the file's own counters agree: trained to n_iters, in epochs of ceil(1797 / batch_size) steps
    epoch, step = ckpt[2], ckpt[3]
    per_epoch = -(-1797 // bundled["training"]["batch_size"])
    assert step == meta["step"] == bundled["training"]["n_iters"] and epoch == (step - 1) // per_epoch


def test_ema_warmup_is_diffusers_schedule_and_on_only_for_the_toys():
    from fastscore.data.toy import toy_sample
    from fastscore.models import get_config
    from fastscore.models.configs import field
    from fastscore.train import toy_config

    ema = EMAHelper(mu=0.999, warmup=True)
    assert [ema.decay(t) for t in (0, 1, 10, 90)] == [0.0, 2 / 11, 11 / 20, 91 / 100]
    assert ema.decay(100_000) == 0.999 and EMAHelper(mu=0.999).decay(1) == 0.999
    net = torch.nn.Linear(3, 2)
    ema.register(net)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, step=1)  # the first update copies the weights
    assert torch.equal(ema.state_dict()["weight"], net.weight)
    start = ema.state_dict()["weight"].clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net, step=2)
    torch.testing.assert_close(ema.state_dict()["weight"], (1 - 2 / 11) * net.weight + 2 / 11 * start, rtol=0, atol=0)
    assert field(toy_config(toy_sample("moons", 100, seed=0)), "model.ema_warmup", "bool") is True
    for name in ("demo_digits", "cifar10", "celeba"):  # ncsnv2's constant rate
        assert field(get_config(name), "model.ema_warmup", "bool", False) is False


def test_toy_training_samples_the_data_after_300_steps(tmp_path, capsys):
    """moons with the toy config's EMA rate 0.999: after 300 steps the EMA model samples where the data is
    (without the warm-up 0.999^300 = 74% of its weights were still the random initial ones, and its samples lay
    around (3, -5), 5 away from any data point); the run writes a scatter plot of the data and the samples, and
    `sample --out x.png` draws one too."""
    run = tmp_path / "moons"
    status, _, err = main_in_process(capsys, "train", "--data", "moons", "--steps", "300", "--snapshot-freq", "300",
                                     "--out", str(run), "--no-progress")  # fmt: skip
    assert status == 0, err
    assert _only_files(run) == ["checkpoint.pth", "samples_300.png"]
    width, height = _png_size(run / "samples_300.png")
    assert width > height > 300  # two panels side by side
    out = tmp_path / "s.npz"
    assert cli.main(["sample", "--checkpoint", str(run / "checkpoint.pth"), "--n", "500", "--out", str(out),
                     "--no-progress"]) == 0  # fmt: skip
    from fastscore.data.toy import toy_sample

    points = torch.from_numpy(np.load(out)["samples"]).double()
    data = toy_sample("moons", 2000, seed=1).double()
    nearest = torch.cdist(points, data).min(dim=1).values
    assert float(nearest.median()) < 0.25 and float((nearest < 0.5).double().mean()) > 0.9, nearest.median()
    png = tmp_path / "moons.png"
    assert cli.main(["sample", "--checkpoint", str(run / "checkpoint.pth"), "--n", "200", "--out", str(png),
                     "--no-progress"]) == 0  # fmt: skip
    assert _png_size(png)[0] > 300


def test_sample_grids_follow_snapshot_sampling_and_no_samples(tiny_npz, tmp_path, capsys):
    base = ["train", "--config", "demo_tiny", "--data", tiny_npz, "--steps", "2", "--no-progress"]
    status, out, err = main_in_process(capsys, *base, "--out", str(tmp_path / "a"))  # demo_tiny says false
    assert status == 0, err
    assert _only_files(tmp_path / "a") == ["checkpoint.pth"] and "training.snapshot_sampling is false" in out
    status, out, err = main_in_process(capsys, *base, "--out", str(tmp_path / "b"), "--set",
                                       "training.snapshot_sampling=true")  # fmt: skip
    assert status == 0 and _only_files(tmp_path / "b") == ["checkpoint.pth", "samples_2.png"], err
    assert _png_size(tmp_path / "b" / "samples_2.png")[0] >= 512  # 36 samples of 8x8, enlarged
    status, out, err = main_in_process(capsys, "train", "--data", "moons", "--steps", "2", "--no-progress",
                                       "--no-samples", "--out", str(tmp_path / "c"))  # fmt: skip
    assert status == 0 and _only_files(tmp_path / "c") == ["checkpoint.pth"] and "samples" not in out, err


def test_too_few_sampler_steps_warn_on_one_line(tiny_run, tmp_path, capsys):
    ckpt = str(tiny_run / "small.pth")
    base = ["sample", "--checkpoint", ckpt, "--n", "2", "--no-progress", "--force", "--out", str(tmp_path / "s.npz")]
    status, _, err = main_in_process(capsys, *base, "--sampler", "pc", "--sde-steps", "2")
    lines = err.strip().splitlines()
    assert status == 0 and len(lines) == 1 and lines[0].startswith("fastscore sample: warning: --sde-steps 2"), err
    assert "leave out --sde-steps" in lines[0]
    status, _, err = main_in_process(capsys, *base, "--steps-each", "1", "--step-lr", "1e-6")
    assert (
        status == 0 and "warning: 1 Langevin step(s) per noise level" in err and len(err.strip().splitlines()) == 1
    ), err
    for quiet in (["--sampler", "pc", "--sde-steps", "12"], ["--steps-each", "2"], []):  # 3 per level; the config's
        status, _, err = main_in_process(capsys, *base, *quiet)
        assert status == 0 and err == "", (quiet, err)


def test_time_to_label_is_the_nearest_level_and_stays_in_the_table():
    """One map from the SDE's time to a discrete model's label, shared by the PC / ODE samplers, the likelihood
    and the continuous-time loss: exact on the levels' own times, nearest between them, clamped outside [0, T]."""
    from fastscore.model_sampling import time_to_label

    levels, T = 5, 1.0
    on_levels = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    assert time_to_label(on_levels, T, levels).tolist() == [0, 1, 2, 3, 4]
    assert time_to_label(torch.tensor([0.9, 0.6, 0.1]), T, levels).tolist() == [0, 2, 4]
    assert time_to_label(torch.tensor([1.5, -0.5]), T, levels).tolist() == [0, 4]  # past either end


def test_the_sample_command_offers_what_the_sampling_module_runs():
    """The parser spells out the samplers and the PC default (building it imports no torch): they must agree."""
    from fastscore import model_sampling

    assert cli.SAMPLERS == model_sampling.SAMPLERS
    args = cli.build_parser().parse_args(["sample", "--checkpoint", "c.pth", "--out", "o.png"])
    assert args.snr == model_sampling.PC_SNR


def test_speed_ratio_in_words():
    assert demo.speed_words(1.0, 1.9) == "1.90x faster"
    assert demo.speed_words(1.04, 1.0) == "1.04x slower"
    assert demo.speed_words(1.0, 1.001) == "as fast (1.00x)"


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--data", "nosuchdata"], "--data 'nosuchdata': no such data set, file or folder; expected digits, "
                                            "gmm, moons"),
        (["train", "--config", "demo_tiny", "--data", "moons"], "2-D toy data trains the ScoreMLP"),
    ],
)  # fmt: skip
def test_train_says_what_is_wrong_with_the_data(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    status, _, err = main_in_process(capsys, *args, "--no-progress")
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1 and message in lines[0], err
    assert "--config" not in lines[0] or "ScoreMLP" in lines[0]
    assert os.listdir(tmp_path) == []


def test_likelihood_says_the_data_does_not_fit_the_model(tiny_run, tmp_path, capsys):
    status, _, err = main_in_process(capsys, "likelihood", "--checkpoint", str(tiny_run / "small.pth"), "--data",
                                     "moons", "--no-progress")  # fmt: skip
    lines = err.strip().splitlines()
    assert status == 1 and len(lines) == 1, err
    assert "--data moons is 2-D toy data, and the checkpoint's model is NCSNv2, which takes 3x8x8 images" in lines[0]
    assert "train" not in lines[0]
    toy = tmp_path / "toy"
    assert cli.main(["train", "--data", "moons", "--steps", "1", "--no-samples", "--out", str(toy),
                     "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    status, _, err = main_in_process(capsys, "likelihood", "--checkpoint", str(toy / "checkpoint.pth"), "--data",
                                     "digits", "--no-progress")  # fmt: skip
    assert status == 1 and "--data 'digits' is images, and the checkpoint's model is ScoreMLP, which takes 2-D " \
        "points" in err, err  # fmt: skip


def test_resume_reads_the_data_from_the_run(tiny_npz, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["train", "--config", "demo_tiny", "--data", tiny_npz, "--out", out, "--steps", "2",
                     "--no-progress"]) == 0  # fmt: skip
    status, text, err = main_in_process(capsys, "train", "--resume", "--out", out, "--steps", "3", "--no-progress")
    assert status == 0 and "trained to step 3" in text and f"from {tiny_npz!r}" in err, err
    # a toy run started with --seed 7 resumes on the same points without --seed or --data: bitwise one run
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    base = ["train", "--data", "moons", "--seed", "7", "--no-samples", "--no-progress", "--snapshot-freq", "2"]
    assert cli.main(base + ["--out", a, "--steps", "4"]) == 0
    assert cli.main(base + ["--out", b, "--steps", "2"]) == 0
    assert cli.main(["train", "--resume", "--out", b, "--steps", "4", "--no-progress", "--no-samples"]) == 0
    x, y = (torch.load(os.path.join(p, "checkpoint.pth"), weights_only=True) for p in (a, b))
    assert all(torch.equal(x[0][k], y[0][k]) for k in x[0])
    # what cannot be resumed says why
    status, _, err = main_in_process(capsys, "train", "--resume", "--no-progress")
    assert status == 1 and "--resume: pass --out, the folder of the run to continue" in err, err
    data = torch.rand(8, 3, 8, 8)
    _train_tiny(data, tmp_path / "api", steps=1, snapshot_samples=0)  # from Python: the data is a tensor
    status, _, err = main_in_process(capsys, "train", "--resume", "--out", str(tmp_path / "api"), "--steps", "2")
    assert status == 1 and "does not record its data" in err and "pass --data" in err, err
    status, _, err = main_in_process(capsys, "train", "--no-progress")
    assert status == 2 and "the following arguments are required: --data" in err, err


def test_image_grids_are_enlarged_to_at_least_512_pixels(tmp_path):
    from fastscore.data.images import grid_scale

    save_image_grid(tmp_path / "a.png", torch.rand(16, 1, 16, 16))  # 4 x 4 of 16x16: 74 pixels, 7x
    assert _png_size(tmp_path / "a.png") == (518, 518)
    save_image_grid(tmp_path / "b.png", torch.rand(16, 1, 16, 16), scale=2)  # the caller's scale is kept
    assert _png_size(tmp_path / "b.png") == (148, 148)
    save_image_grid(tmp_path / "c.png", torch.rand(4, 3, 300, 300))  # already wide: as is
    assert _png_size(tmp_path / "c.png") == (606, 606)
    assert grid_scale(146) == 4 and grid_scale(1) == 32


def test_sample_bf16_runs_where_the_cpu_computes_bf16_and_is_refused_elsewhere(tiny_run, tmp_path, capsys):
    """--bf16: bfloat16 autocast around the network, samples close to float32's; refused on CPUs without it."""
    paths = {bf16: tmp_path / f"s{int(bf16)}.npz" for bf16 in (False, True)}
    base = ["sample", "--checkpoint", str(tiny_run / "small.pth"), "--n", "3", "--seed", "1", "--steps-each", "1",
            "--no-progress"]  # fmt: skip
    assert cli.main(base + ["--out", str(paths[False])]) == 0
    status, _, err = main_in_process(capsys, *base, "--out", str(paths[True]), "--bf16")
    if not cli.native_bf16():
        assert status == 1 and "--bf16" in err and len(err.strip().splitlines()) == 1
        assert not paths[True].exists()
        return
    assert status == 0, err
    f32, bf16 = (np.load(paths[b])["samples"] for b in (False, True))
    assert np.isfinite(bf16).all() and not np.array_equal(bf16, f32)  # the network really ran in bfloat16
    np.testing.assert_allclose(bf16, f32, rtol=0, atol=0.05)  # bfloat16 keeps 8 bits: ~1% of the score


def test_a_toy_trained_on_the_sde_loss_draws_snapshots_and_ald_samples(tmp_path, capsys):
    """A time-conditioned ScoreMLP (--loss sde) under annealed Langevin: level i is the VE time whose std is
    sigma_i, the network's output divided by it (it was a TypeError on the integer labels)."""
    run = tmp_path / "sde"
    status, _, err = main_in_process(capsys, "train", "--data", "moons", "--loss", "sde", "--steps", "3", "--out",
                                     str(run), "--no-progress")  # fmt: skip
    assert status == 0 and _only_files(run) == ["checkpoint.pth", "samples_3.png"], err
    out = tmp_path / "s.npz"
    status, _, err = main_in_process(capsys, "sample", "--checkpoint", str(run / "checkpoint.pth"), "--n", "8",
                                     "--steps-each", "2", "--out", str(out), "--no-progress")  # fmt: skip
    assert status == 0, err
    points = np.load(out)["samples"]
    assert points.shape == (8, 2) and np.isfinite(points).all()


def test_few_step_solvers_sample_from_the_command_line(tiny_run, tmp_path, capsys):
    """--sampler dpm|heun|ddim|adaptive runs fastscore.solvers.solve on the checkpoint's SDE; --steps is
    theirs (the adaptive one chooses its own), and a --steps for another sampler is refused in one line."""
    import numpy as np

    ckpt = str(tiny_run / "small.pth")
    for sampler in ("dpm", "heun", "ddim", "adaptive"):
        out = tmp_path / f"{sampler}.npz"
        steps = [] if sampler == "adaptive" else ["--steps", "4"]
        status, stdout, err = main_in_process(capsys, "sample", "--checkpoint", ckpt, "--n", "2", "--sampler",
                                              sampler, *steps, "--no-progress", "--out", str(out))  # fmt: skip
        assert status == 0 and f"sampled 2 with {sampler}" in stdout, err
        with np.load(out) as f:
            samples = next(iter(f.values()))
        assert samples.shape[0] == 2 and np.isfinite(samples).all()
    status, _, err = main_in_process(capsys, "sample", "--checkpoint", ckpt, "--n", "2", "--sampler", "pc",
                                     "--steps", "4", "--out", str(tmp_path / "x.npz"))  # fmt: skip
    assert status != 0 and err.strip().splitlines()[-1].startswith("fastscore sample: error: --steps:"), err


def test_eta_samples_ancestral_ddim_from_the_command_line(tiny_run, tmp_path, capsys):
    """--eta sets DDIM's noise: the samples of fastscore.model_sampling.sample with that eta (the command line
    runs it); eta 1 differs from the deterministic default; --eta for another sampler and a
    negative --eta are refused in one line, writing nothing."""
    import numpy as np

    from fastscore.model_sampling import sample
    from fastscore.train import model_from_checkpoint

    ckpt = str(tiny_run / "small.pth")
    runs = {}
    for eta in (None, "1"):
        out = tmp_path / f"eta{eta}.npz"
        flag = [] if eta is None else ["--eta", eta]
        status, _, err = main_in_process(capsys, "sample", "--checkpoint", ckpt, "--n", "3", "--sampler", "ddim",
                                         "--steps", "4", *flag, "--no-progress", "--out", str(out))  # fmt: skip
        assert status == 0, err
        with np.load(out) as f:
            runs[eta] = f["samples"]
    model, config, meta = model_from_checkpoint(ckpt)
    direct = sample(model, config, 3, sampler="ddim", meta=meta, steps=4, eta=1.0)
    np.testing.assert_allclose(runs["1"], direct.float().numpy(), atol=1e-5)  # up to the run's thread count
    assert not np.array_equal(runs["1"], runs[None])
    for bad, words in ((["--sampler", "pc", "--eta", "1"], "--eta: "), (["--sampler", "ddim", "--eta", "-1"], "--eta")):
        out = tmp_path / "bad.npz"
        status, _, err = main_in_process(capsys, "sample", "--checkpoint", ckpt, "--n", "2", *bad, "--out", str(out))
        assert status != 0 and words in err.strip().splitlines()[-1] and not out.exists(), err
