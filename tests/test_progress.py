"""Progress reports: whole lines with an ETA (no carriage returns) when stderr is not a terminal; tqdm's bar on
a terminal. Time is simulated (no timing assertions)."""

import io

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


def test_a_terminal_gets_tqdms_bar():
    stream = Terminal()
    bar = Progress(50, "pc sampler", stream=stream)
    assert bar.mode == "tqdm"
    for _ in range(50):
        bar.update(postfix="loss 0.5")
    bar.write("a message")
    bar.close()
    text = stream.getvalue()
    assert "a message\n" in text and "pc sampler" in text and "50/50" in text and "loss 0.5" in text
    assert bar.n == 50


def test_samplers_write_no_carriage_returns_to_a_pipe(capsys):
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
