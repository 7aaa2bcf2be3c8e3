"""The command line: info, bench, and the error contract (one line, non-zero, no traceback)."""

import csv
import math
import subprocess
import sys

import pytest

from fastscore import cli


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastscore.cli", *args], capture_output=True, text=True, timeout=300)


def test_info_lists_versions_and_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fastscore 0.1.0" in out and "torch" in out
    for name in ("ref", "cpp", "triton", "cuda"):
        assert f"  {name}" in out


@pytest.mark.parametrize(
    "args,status,message",
    [
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        (["bench", "--rounds", "0"], 2, "--rounds: expected a positive integer"),
        (["bench", "--device", "tpu"], 2, "--device: invalid choice"),
        (["bench", "no_such_op", "--no-record"], 1, "no bench named 'no_such_op'"),
        (["bench", "elu", "--csv", "r.csv", "--no-record"], 1, "--csv and --no-record contradict each other"),
        (["bench", "elu", "--csv", "/no/such/folder/r.csv"], 1, "--csv '/no/such/folder/r.csv': folder"),
        (["bench", "elu", "--csv", "/"], 1, "--csv '/': '/' is a folder"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line(args, status, message):
    result = run_cli(*args)
    assert result.returncode == status
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_every_command_has_help():
    for args in (["--help"], ["info", "--help"], ["bench", "--help"]):
        result = run_cli(*args)
        assert result.returncode == 0 and "usage: fastscore" in result.stdout


def test_bench_names_include_each_op():
    assert "cond_instance_norm" in cli.bench_names()


def test_bench_harness_checks_agreement_then_reports_ratios(tmp_path, capsys):
    """The harness on a tiny case (no torch.compile): agreement checked, table printed, CSV appended."""
    from fastscore._bench import _harness
    from fastscore._bench import bench_cond_instance_norm as bench

    import fastscore
    from fastscore._backend import supported_cpu_capabilities

    shape = (2, 8, 4, 4)
    providers = bench.forward_providers(shape, with_compile=False)
    case = _harness.Case("fwd tiny", providers, _harness.agree_with("eager", what="fwd"), elements=math.prod(shape))
    rows = _harness.measure(case, rounds=3)
    # the C++ kernels once more per narrower CPU capability level this machine runs
    levels = {f"fastscore@{c}" for c in supported_cpu_capabilities() if c != fastscore.cpu_capability()}
    assert {r.provider for r in rows} == {"eager", "fastscore", "fastscore_out", "copy"} | levels
    fused = next(r for r in rows if r.provider == "fastscore")
    assert fused.median_ms > 0 and set(fused.ratios) == {"eager", "copy"}
    assert fused.ns_per_element == pytest.approx(fused.median_ms * 1e6 / math.prod(shape))
    # a history written before the ns_per_element column existed is rewritten with it, rows kept
    old = tmp_path / "r.csv"
    old_fields = [f for f in _harness.FIELDS if f != "ns_per_element"]
    old.write_text(",".join(old_fields) + "\n" + ",".join("1" for _ in old_fields) + "\n")
    path = _harness.append_results("cond_instance_norm", rows, device="cpu", quick=True, path=str(old))
    with open(path) as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == _harness.FIELDS and written[0]["ns_per_element"] == "" and written[0]["op"] == "1"
    assert [r["provider"] for r in written[1:]] == [r.provider for r in rows]
    # a new history: created with its header, in the file the bench's run names
    new = tmp_path / "new.csv"
    again = _harness.run("cond_instance_norm", [case], rounds=1, device="cpu", quick=True, csv_path=str(new))
    with open(new) as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == _harness.FIELDS and [r["provider"] for r in written] == [r.provider for r in again]
    print(_harness.format_table("t", rows))
    out = capsys.readouterr().out
    assert "eager/x" in out and "ns/elem" in out


def test_compile_bench_drops_a_compiled_provider_that_disagrees_and_reports_the_speedup(capsys):
    """A compiled provider whose forward disagrees with eager's (torch's defect) is reported and not timed;
    the eager fastscore provider must agree; the summary compares the fastest layouts of both compiled sides."""
    import torch
    from fastscore._bench import _harness
    from fastscore._bench import bench_compile

    x = torch.ones(3)
    names = ("eager", "fastscore", *bench_compile.COMPILED)
    providers = {name: (lambda: x.clone()) for name in names}
    providers["compile"] = lambda: torch.full((3,), float("nan"))
    check = _harness.agree_or_drop("eager", bench_compile.COMPILED, what="forward")
    case = _harness.Case("fwd m", providers, check, capability_rows=False)
    assert [row.provider for row in _harness.measure(case, rounds=1)] == [n for n in names if n != "compile"]
    assert "NOTE: compile: the forward disagrees with eager" in capsys.readouterr().out
    providers["fastscore"] = lambda: x + 1
    with pytest.raises(AssertionError, match="fastscore"):
        _harness.measure(case, rounds=1)

    def row(provider, ms):
        return _harness.Row("fwd m", provider, ms, ms, ms, {})

    rows = [row("eager", 9.0), row("compile cl", 6.0), row("fastscore+compile", 5.5), row("fastscore+compile cl", 5.0)]
    assert bench_compile.compiled_speedups(rows) == [("fwd m", 1.2, "fastscore+compile cl", "compile cl")]
    assert bench_compile.compiled_speedups(rows[2:]) == []  # no compiled original agreed: no ratio


def test_bench_writes_its_csv_to_the_current_folder_unless_told(tmp_path, monkeypatch):
    """`fastscore bench` never appends to the shipped history bench/results.csv by default (a user's checkout
    stays clean): ./fastscore-bench-results.csv, or the file --csv names; --no-record writes none."""
    import types

    from fastscore._bench import _harness

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTSCORE_BENCH_RESULTS", raising=False)
    default = tmp_path / "fastscore-bench-results.csv"
    assert _harness.results_path() == str(default)
    assert _harness.results_path("sub/r.csv") == str(tmp_path / "sub" / "r.csv")
    monkeypatch.setenv("FASTSCORE_BENCH_RESULTS", str(tmp_path / "env.csv"))
    assert _harness.results_path() == str(tmp_path / "env.csv")
    monkeypatch.delenv("FASTSCORE_BENCH_RESULTS")

    calls = []  # a stand-in bench: what `fastscore bench` passes on
    fake = types.ModuleType("fastscore._bench.bench_fake")
    fake.run = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "fastscore._bench.bench_fake", fake)
    monkeypatch.setattr(cli, "bench_names", lambda: ["fake"])
    assert cli.main(["bench", "fake"]) == 0
    assert cli.main(["bench", "fake", "--csv", "mine.csv"]) == 0
    assert cli.main(["bench", "fake", "--no-record"]) == 0
    assert [(c["record"], c["csv_path"]) for c in calls] == [
        (True, str(default)),
        (True, str(tmp_path / "mine.csv")),
        (False, None),
    ]


def test_bench_refuses_a_csv_that_is_not_a_bench_history(tmp_path, capsys):
    """Appending would rewrite a foreign CSV with the bench's columns: refused before any bench runs."""
    from fastscore._bench import _harness

    other = tmp_path / "data.csv"
    other.write_text("name,value\na,1\n")
    assert cli.main(["bench", "elu", "--csv", str(other)]) == 1
    assert "is not a fastscore bench history (its columns: name, value)" in capsys.readouterr().err
    assert other.read_text() == "name,value\na,1\n"
    with pytest.raises(ValueError, match="not a fastscore bench history"):
        _harness.append_results("elu", [], device="cpu", quick=True, path=str(other))


def test_bench_agreement_check_catches_a_wrong_provider():
    from fastscore._bench import _harness
    from fastscore._bench import bench_cond_instance_norm as bench

    providers = bench.forward_providers((2, 8, 4, 4), with_compile=False)
    good = providers["fastscore"]
    providers["fastscore"] = lambda: good() + 1e-2
    with pytest.raises(AssertionError, match="forward: fastscore"):
        _harness.measure(_harness.Case("broken", providers, _harness.agree_with("eager", what="forward")), rounds=1)


def test_info_into_a_closed_pipe_ends_quietly():
    """`fastscore info | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "fastscore.cli", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away with output still to come
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()
