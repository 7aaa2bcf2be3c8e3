"""Controllable generation end to end on tiny settings: the noise-conditional classifier (training step, checkpoint),
`fastscore train --classifier`, and `fastscore sample --mask` on pc, `--colorize`, `--class` with their errors."""

import os

import numpy as np
import pytest
import torch

from fastscore import cli
from fastscore.model_sampling import Guidance
from fastscore.model_sampling import sample
from fastscore.models import CheckpointError
from fastscore.models import ClassifierMLP
from fastscore.models import NoiseConditionalClassifier
from fastscore.models import load_classifier
from fastscore.models import train_classifier
from fastscore.train import toy_config

pytestmark = pytest.mark.one_thread  # tiny tensors (see conftest.py)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-step demo_tiny score model (3x8x8 RGB) by the command line, its data, and a tiny classifier for it."""
    root = tmp_path_factory.mktemp("controllable")
    rng = np.random.default_rng(0)
    npz = root / "tiny.npz"
    np.savez(npz, images=rng.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = cli.main(
            ["train", "--config", "demo_tiny", "--data", str(npz), "--steps", "2", "--no-samples",
             "--out", str(root / "run"), "--no-progress"]
        )  # fmt: skip
        assert status == 0
        images = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(12) % 3
        train_classifier("demo_tiny", images, labels, root / "clf.pth", steps=2, batch_size=4, width=8,
                         progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "data": str(npz), "ckpt": str(root / "run" / "checkpoint.pth"), "clf": str(root / "clf.pth")}


def run(*argv):
    return cli.main([str(a) for a in argv])


def fails(capsys, *argv, status=1):
    assert run(*argv) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ---- the classifier ---------------------------------------------------------------------------------------------


def test_classifier_loss_decreases_on_a_toy_problem():
    """Two well-separated 2-D Gaussians: the noise-conditional MLP's cross-entropy falls well below log 2."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(256) % 2
    points = torch.randn(256, 2, generator=gen) * 0.3 + (labels[:, None] * 2.0 - 1.0) * torch.tensor([2.0, 0.0])
    config = toy_config(points, name="two")
    model, result = train_classifier(config, points, labels, steps=150, batch_size=64, lr=3e-3, progress=False)
    assert isinstance(model, ClassifierMLP)
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-20:])
    assert last < 0.6 * first and last < 0.45, (first, last)
    with torch.no_grad():  # at a small noise level the classes are told apart
        accuracy = (model(points, 0.05).argmax(1) == labels).float().mean()
    assert accuracy > 0.95


def test_image_classifier_shapes_checkpoint_and_errors(tmp_path):
    net = NoiseConditionalClassifier(channels=3, num_classes=4, width=8)
    x = torch.randn(5, 3, 8, 8)
    assert net(x, 0.5).shape == (5, 4)
    assert net(x, torch.full((5,), 2.0)).shape == (5, 4)
    with pytest.raises(ValueError, match="sigma"):
        net(x, torch.ones(3))
    images, labels = torch.rand(8, 3, 8, 8), torch.arange(8) % 4
    path = tmp_path / "c.pth"
    model, result = train_classifier("demo_tiny", images, labels, path, steps=3, batch_size=4, width=8, progress=False)
    assert result.step == 3 and len(result.losses) == 3
    loaded, meta = load_classifier(path)
    assert meta["num_classes"] == 4 and meta["kind"] == "image"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 0.3), model(x, 0.3))
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a classifier checkpoint"):
        load_classifier(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing.pth")


def test_guided_sampling_pushes_towards_the_class():
    """A score of N(0, I) plus the gradient of a fixed linear classifier: the guided samples move to the
    requested class's side (all samplers run; ALD and PC with one class per sample)."""
    from types import SimpleNamespace

    config = SimpleNamespace(
        model=SimpleNamespace(arch="ScoreMLP", sigma_begin=1.0, sigma_end=0.01, num_classes=5, sigma_dist="geometric"),
        data=SimpleNamespace(dim=2),
        sampling=SimpleNamespace(n_steps_each=20, step_lr=2e-5, denoise=True),
    )

    class Score(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.sigmas = torch.tensor([1.0, 0.5, 0.2, 0.05, 0.01])

        def forward(self, x, labels):
            return -x / (1 + self.sigmas[labels, None] ** 2)

    def classifier(x, sigma):
        return torch.stack([-4 * x[:, 0], 4 * x[:, 0]], dim=1)

    y = torch.tensor([0, 1] * 4)
    for sampler in ("ald", "pc"):
        out = sample(Score(), config, 8, sampler=sampler, sde_steps=20, guide=Guidance(classifier, y, 1.0))
        assert ((out[:, 0] > 0) == (y == 1)).float().mean() >= 0.75, sampler
    out = sample(Score(), config, 8, sampler="ode", guide=Guidance(classifier, 1, 1.0))
    assert (out[:, 0] > 0).all()
    with pytest.raises(ValueError, match="one class for all"):
        sample(Score(), config, 8, sampler="ode", guide=Guidance(classifier, y, 1.0))


# ---- fastscore train --classifier -------------------------------------------------------------------------------


def test_train_classifier_command(tmp_path, capsys):
    out = tmp_path / "clf"
    args = ["train", "--classifier", "--data", "digits", "--steps", "2", "--batch-size", "8", "--out", out,
            "--no-progress", "--threads", "1"]  # fmt: skip
    assert run(*args) == 0
    assert "trained the classifier to step 2" in capsys.readouterr().out
    model, meta = load_classifier(out / "classifier.pth")
    assert meta["num_classes"] == 10 and meta["data"] == "digits" and meta["args"]["channels"] == 1
    assert "--force" in fails(capsys, *args)  # no overwrite
    assert run(*args, "--force") == 0
    capsys.readouterr()
    assert "labels" in fails(capsys, "train", "--classifier", "--data", "moons", "--out", tmp_path / "m")
    assert "--resume" in fails(capsys, "train", "--classifier", "--resume", "--out", out)
    assert "--data digits" in fails(capsys, "train", "--classifier", "--out", tmp_path / "x")


# ---- fastscore sample: inpainting on pc, colorization, classes --------------------------------------------------


def test_sample_pc_inpainting_and_colorization(tiny, tmp_path, capsys):
    common = ["sample", "--checkpoint", tiny["ckpt"], "--data", tiny["data"], "-n", "2", "--sampler", "pc",
              "--sde-steps", "3", "--no-progress"]  # fmt: skip
    assert run(*common, "--mask", "left", "--out", tmp_path / "inpaint.npz") == 0
    assert "(inpainting)" in capsys.readouterr().out
    assert np.load(tmp_path / "inpaint.npz")["samples"].shape == (2, 3, 8, 8)
    assert run(*common, "--colorize", "--out", tmp_path / "color.png") == 0
    assert "(colorization)" in capsys.readouterr().out
    assert os.path.getsize(tmp_path / "color.png") > 0
    assert "--force" in fails(capsys, *common, "--colorize", "--out", tmp_path / "color.png")


def test_sample_class_conditional(tiny, tmp_path, capsys):
    common = ["sample", "--checkpoint", tiny["ckpt"], "-n", "2", "--no-progress", "--classifier", tiny["clf"]]
    assert run(*common, "--class", "2", "--sampler", "pc", "--sde-steps", "3", "--guidance-scale", "2",
               "--out", tmp_path / "c.npz") == 0  # fmt: skip
    assert "(class 2, guidance scale 2)" in capsys.readouterr().out
    assert run(*common, "--class", "1", "--steps-each", "1", "--out", tmp_path / "ald.npz") == 0
    assert np.load(tmp_path / "ald.npz")["samples"].shape == (2, 3, 8, 8)
    capsys.readouterr()
    assert "classes 0 to 2" in fails(capsys, *common, "--class", "3", "--out", tmp_path / "x.npz")


def test_sample_controllable_errors(tiny, tmp_path, capsys):
    base = ["sample", "--checkpoint", tiny["ckpt"], "-n", "2", "--out", tmp_path / "x.npz", "--no-progress"]
    assert "--sampler ald" in fails(capsys, *base, "--sampler", "ode", "--mask", "left")
    assert "--sampler pc" in fails(capsys, *base, "--colorize")
    assert "not both" in fails(capsys, *base, "--sampler", "pc", "--colorize", "--mask", "left")
    assert "--classifier" in fails(capsys, *base, "--class", "1")
    assert "--class as well" in fails(capsys, *base, "--classifier", tiny["clf"])
    assert "--guidance-scale" in fails(capsys, *base, "--guidance-scale", "3")
    assert "--mask or --colorize" in fails(capsys, *base, "--class", "1", "--classifier", tiny["clf"], "--mask", "top")
    with pytest.raises(SystemExit) as exc:  # argparse: status 2, one line
        run(*base, "--class", "-1")
    assert exc.value.code == 2 and "--class" in capsys.readouterr().err
    assert "does not exist" in fails(capsys, *base, "--class", "0", "--classifier", tmp_path / "nope.pth")
    # a 1-channel model: no colour to restore; a classifier of other images
    digits = os.path.join(os.path.dirname(cli.__file__), "checkpoints", "demo_digits.pth")
    dbase = ["sample", "--checkpoint", digits, "-n", "2", "--out", tmp_path / "d.npz", "--no-progress"]
    err = fails(capsys, *dbase, "--sampler", "pc", "--colorize", "--data", "digits")
    assert "3-channel" in err and "1x16x16" in err
    assert "other data" in fails(capsys, *dbase, "--class", "0", "--classifier", tiny["clf"])
