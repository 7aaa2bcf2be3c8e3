"""Progress reports: whole lines with an ETA (no carriage returns) when stderr is not a terminal; a line redrawn
in place, with an ETA, on a terminal without tqdm. Time is simulated (no timing assertions)."""

import io
import sys

import pytest
import torch

from fastscore import sampling
from fastscore._progress import Progress
from fastscore._progress import format_seconds


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_a_line_every_tenth_or_10_seconds_with_an_eta():
    stream, clock = io.StringIO(), Clock()
    bar = Progress(1000, "annealed langevin", stream=stream, clock=clock)
    for _ in range(1000):
        clock.now += 1 / 64  # 15.6 s in all: a line at each tenth (more than a second apart)
        bar.update(1, postfix="loss 0.5")
    bar.close()
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 10, lines
    assert lines[0].startswith("annealed langevin: 100/1000 (10%), 1.6s elapsed, ETA 14.1s (64 step/s)"), lines[0]
    assert lines[0].endswith("loss 0.5") and lines[-1].startswith("annealed langevin: 1000/1000 (100%)")
    # a slow run (resumed at step 500): a line every 10 s between the tenths, and the last one at close
    stream, clock = io.StringIO(), Clock()
    bar = Progress(1000, "train", initial=500, stream=stream, clock=clock)
    for _ in range(30):
        clock.now += 1.0
        bar.update(1)
    for _ in range(5):
        clock.now += 0.125
        bar.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[0] == "train: 510/1000 (51%), 10.0s elapsed, ETA 8:10 (1 s/step)", lines
    bar.close()
    assert len(stream.getvalue().splitlines()) == 4
    assert stream.getvalue().splitlines()[-1].startswith("train: 535/1000 (54%)")


def test_a_terminal_without_tqdm_gets_one_line_redrawn(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    stream, clock = Terminal(), Clock()
    bar = Progress(50, "pc sampler", stream=stream, clock=clock)
    for _ in range(50):
        clock.now += 1.0
        bar.update()
    bar.write("a message")
    bar.close()
    text = stream.getvalue()
    assert text.count("\n") == 2 and "\ra message\n" in text.replace("\033[K", "")
    assert "pc sampler: 50/50 (100%), 50.0s elapsed, ETA 0.0s (1 s/step)" in text and "pc sampler: 10/50" in text


def test_samplers_write_no_carriage_returns_to_a_pipe(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    x0 = torch.rand(2, 2)
    sampling.annealed_langevin(lambda x, y: -x, x0, [2.0, 1.0], n_steps_each=300, step_lr=0.01, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and err.strip().splitlines()[-1].startswith("annealed langevin: 600/600 (100%)"), err


def test_disabled_reports_nothing_and_times_read_well():
    stream = io.StringIO()
    bar = Progress(10, "x", stream=stream, enabled=False)
    bar.update(10)
    bar.write("hidden")
    bar.close()
    assert stream.getvalue() == ""
    assert [format_seconds(s) for s in (4.25, 75.3, 3700)] == ["4.2s", "1:15", "1:01:40"]
    assert format_seconds(float("nan")) == "?"


@pytest.mark.parametrize("enabled", [True, False])
def test_training_progress_goes_through_the_same_lines(tmp_path, capsys, enabled):
    from fastscore.data.toy import toy_sample
    from fastscore.train import toy_config
    from fastscore.train import train

    data = toy_sample("moons", 200, seed=0)
    train(toy_config(data), data, tmp_path, steps=3, progress=enabled, snapshot_samples=0)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert ("train: 3/3 (100%)" in err) is enabled and ("step 3: loss" in err) is enabled
