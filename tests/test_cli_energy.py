"""`fastscore train --energy` and `fastscore sample --sampler mala|hmc`, end to end on the moons; their errors.

One energy ScoreMLP is trained for 200 steps (the residual head, E = |x - f(x, y)|^2 / 2) and sampled by annealed
MALA and HMC over its noise levels with a short schedule (20 steps per level, step_lr 1e-4): the samples lie on
the moons (median distance to the nearest data point below 0.3, where the noise-level-1 start is about 1 away).
"""

import numpy as np
import pytest
import torch

from fastscore import cli
from fastscore import model_sampling
from fastscore.data.toy import toy_sample
from fastscore.models import EnergyScore
from fastscore.train import TrainError
from fastscore.train import checkpoint_meta
from fastscore.train import model_from_checkpoint
from fastscore.train import read_checkpoint
from fastscore.train import toy_config
from fastscore.train import train

pytestmark = pytest.mark.one_thread


def main_in_process(capsys, *args):
    try:
        status = cli.main(list(args))
    except SystemExit as exc:  # argparse: usage errors
        status = exc.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line(err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def energy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("energy") / "run"
    status = cli.main(["train", "--data", "moons", "--energy", "--steps", "200", "--snapshot-freq", "200",
                       "--batch-size", "64", "--no-samples", "--out", str(out), "--export",
                       str(out.parent / "small.pth"), "--no-progress"])  # fmt: skip
    assert status == 0
    return out


@pytest.fixture(scope="module")
def score_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("score") / "run"
    assert cli.main(["train", "--data", "moons", "--steps", "2", "--no-samples", "--out", str(out),
                     "--no-progress"]) == 0  # fmt: skip
    return out


def test_train_energy_records_the_form_and_the_checkpoint_rebuilds_the_energy_model(energy_run):
    meta = checkpoint_meta(read_checkpoint(energy_run / "checkpoint.pth"))
    assert meta["energy"] == "residual" and meta["arch"] == "ScoreMLP"
    model, _, meta = model_from_checkpoint(energy_run / "checkpoint.pth")
    assert isinstance(model, EnergyScore) and model.energy_net.form == "residual"
    x = torch.randn(5, 2)
    labels = torch.zeros(5, dtype=torch.long)
    e = model.energy(x, labels)
    assert e.shape == (5,) and e.isfinite().all()
    small, _, meta = model_from_checkpoint(energy_run.parent / "small.pth")
    assert isinstance(small, EnergyScore) and meta["energy"] == "residual", "--export keeps the energy form"


def test_a_shard_of_an_annealed_mala_run_is_bitwise_its_rows(energy_run):
    model, config, meta = model_from_checkpoint(energy_run / "checkpoint.pth")
    kw = dict(meta=meta, seed=5, n_steps_each=3, step_lr=1e-4)
    for sampler in ("mala", "hmc"):
        whole = model_sampling.sample(model, config, 9, sampler=sampler, **kw)
        part = model_sampling.sample(model, config, 9, sampler=sampler, rows=range(2, 5), **kw)
        assert torch.equal(part, whole[2:5]), sampler
    with pytest.raises(ValueError, match="sampler: 'mala' \\(annealed MALA\\) needs an energy model"):
        model_sampling.sample(model.energy_net.net, config, 4, sampler="mala", **kw)


@pytest.mark.parametrize("sampler", ["mala", "hmc"])
def test_sample_mala_and_hmc_from_an_energy_checkpoint(energy_run, tmp_path, capsys, sampler):
    out = tmp_path / f"{sampler}.npz"
    status, stdout, err = main_in_process(
        capsys, "sample", "--checkpoint", str(energy_run / "checkpoint.pth"), "--sampler", sampler, "--n", "100",
        "--steps-each", "20", "--step-lr", "1e-4", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert status == 0, err
    assert f"sampled 100 with {sampler}" in stdout and "warning" not in err
    points = torch.from_numpy(np.load(out)["samples"]).double()
    assert points.shape == (100, 2) and points.isfinite().all()
    nearest = torch.cdist(points, toy_sample("moons", 2000, seed=1).double()).min(dim=1).values
    assert float(nearest.median()) < 0.3 and float((nearest < 0.5).double().mean()) > 0.8, nearest.median()
    # the same seed, the same samples; no overwrite without --force
    status, _, err = main_in_process(
        capsys, "sample", "--checkpoint", str(energy_run / "checkpoint.pth"), "--sampler", sampler, "--n", "100",
        "--steps-each", "20", "--step-lr", "1e-4", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert status == 1 and "--force" in err
    again = tmp_path / "again.npz"
    assert cli.main(["sample", "--checkpoint", str(energy_run / "checkpoint.pth"), "--sampler", sampler, "--n",
                     "100", "--steps-each", "20", "--step-lr", "1e-4", "--out", str(again),
                     "--no-progress"]) == 0  # fmt: skip
    assert np.array_equal(np.load(again)["samples"], np.load(out)["samples"])


def test_sample_mala_on_a_score_checkpoint_is_a_one_line_error(score_run, tmp_path, capsys):
    for sampler, name in (("mala", "MALA"), ("hmc", "HMC")):
        status, _, err = main_in_process(capsys, "sample", "--checkpoint", str(score_run / "checkpoint.pth"),
                                         "--sampler", sampler, "--out", str(tmp_path / "s.npz"))  # fmt: skip
        assert status == 1
        assert_one_line(err, f"--sampler {sampler}: annealed {name} needs an energy model")
    assert not (tmp_path / "s.npz").exists()


def test_energy_flags_are_checked(score_run, tmp_path, capsys):
    status, _, err = main_in_process(capsys, "train", "--data", "moons", "--energy", "quadratic", "--out",
                                     str(tmp_path / "r"))  # fmt: skip
    assert status == 2 and "--energy: invalid choice: 'quadratic'" in err
    status, _, err = main_in_process(capsys, "train", "--classifier", "--energy", "--out", str(tmp_path / "c"))
    assert status == 1
    assert_one_line(err, "--energy: trains the score model as an energy; --classifier trains a classifier")
    status, _, err = main_in_process(capsys, "train", "--resume", "--energy", "--steps", "4", "--out",
                                     str(score_run), "--no-progress")  # fmt: skip
    assert status == 1
    assert_one_line(err, "trains the network as a score model; --resume continues it so (leave out --energy)")
    status, _, err = main_in_process(capsys, "sample", "--checkpoint", str(score_run / "checkpoint.pth"), "--sampler",
                                     "mala", "--class", "0", "--classifier", "c.pth", "--out",
                                     str(tmp_path / "s.npz"))  # fmt: skip
    assert status == 1
    assert_one_line(err, "--class: class-conditional sampling does not run with --sampler mala")
    for flag in ("--compile", "--bf16"):
        status, _, err = main_in_process(capsys, "sample", "--checkpoint", str(score_run / "checkpoint.pth"),
                                         "--sampler", "hmc", flag, "--out", str(tmp_path / "s.npz"))  # fmt: skip
        assert status == 1
        assert_one_line(err, f"{flag}: applies to the score's forward pass, not to --sampler hmc's energy")


def test_train_energy_argument_is_checked(tmp_path):
    data = toy_sample("moons", 64, seed=0)
    with pytest.raises(TrainError, match="energy: expected None or one of residual, inner, got 'quadratic'"):
        train(toy_config(data), data, tmp_path / "r", steps=1, energy="quadratic", progress=False)
    train(toy_config(data), data, tmp_path / "s", steps=1, snapshot_samples=0, progress=False)
    with pytest.raises(TrainError, match="trains the network as a score model, not as an energy"):
        train(None, data, tmp_path / "s", steps=2, resume=True, energy="inner", progress=False)
