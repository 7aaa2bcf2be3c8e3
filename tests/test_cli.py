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
    print(_harness.format_table("t", rows))
    out = capsys.readouterr().out
    assert "eager/x" in out and "ns/elem" in out


def test_bench_agreement_check_catches_a_wrong_provider():
    from fastscore._bench import _harness
    from fastscore._bench import bench_cond_instance_norm as bench

    providers = bench.forward_providers((2, 8, 4, 4), with_compile=False)
    good = providers["fastscore"]
    providers["fastscore"] = lambda: good() + 1e-2
    with pytest.raises(AssertionError, match="forward: fastscore"):
        _harness.measure(_harness.Case("broken", providers, _harness.agree_with("eager", what="forward")), rounds=1)
