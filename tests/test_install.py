"""What a user meets first: fastscore without triton, a light `import fastscore` (fast --help), the package's
help, and a clone named fastscore in the current folder. Each runs in a fresh interpreter."""

import os
import subprocess
import sys
import textwrap

import fastscore


def run_python(code: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_runs_without_triton():
    """triton is an extra: with it unimportable, fastscore imports, the C++ ops run and `fastscore info` and a
    forced triton backend say how to get it."""
    result = run_python(
        """
        import sys
        sys.modules["triton"] = None  # as if not installed: `import triton` raises ModuleNotFoundError
        import torch
        import fastscore
        from fastscore.ops import elu, elu_ref

        x = torch.randn(4, 8, 5, 5)
        torch.testing.assert_close(elu(x), elu_ref(x))
        assert fastscore.backends()["cpp"]["available"]
        assert not fastscore.backends()["triton"]["available"]
        try:
            with fastscore.use_backend("triton"):
                elu(x)
        except fastscore.BackendUnavailableError as exc:
            print("forced:", exc)
        assert "fastscore._triton" not in sys.modules
        from fastscore.cli import main
        assert main(["info"]) == 0
        """
    )
    assert result.returncode == 0, result.stderr
    hint = 'pip install "fastscore[triton]"'
    forced = next(line for line in result.stdout.splitlines() if line.startswith("forced:"))
    assert "triton is not installed" in forced and hint in forced
    info = next(line for line in result.stdout.splitlines() if line.strip().startswith("triton "))
    assert "unavailable" in info and hint in info, result.stdout
    assert "triton not installed" in result.stdout


def test_import_and_cli_help_do_not_import_torch():
    """`fastscore --help` and `fastscore <command> --help` start without torch: the package loads its parts
    on first use."""
    result = run_python(
        """
        import sys
        import fastscore
        import fastscore.cli
        for argv in (["--help"], ["train", "--help"], ["bench", "--help"]):
            try:
                fastscore.cli.main(argv)
            except SystemExit as exc:
                assert exc.code == 0, argv
        print("torch loaded:", "torch" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "usage: fastscore bench" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "torch loaded: False"


def test_public_names_load_on_first_use():
    result = run_python(
        """
        import sys, types
        import fastscore.patch  # the submodule first: fastscore.patch must still be the function
        import fastscore
        assert isinstance(fastscore.patch, types.FunctionType) and fastscore.patch.__module__ == "fastscore.patch"
        from fastscore import BackendUnavailableError, CheckpointError, nn, patch, use_backend
        assert issubclass(CheckpointError, ValueError) and issubclass(BackendUnavailableError, RuntimeError)
        assert patch is fastscore.patch and nn.ConditionalInstanceNorm2dPlus
        assert callable(fastscore.sampling.annealed_langevin) and callable(fastscore.likelihood.log_likelihood)
        with use_backend("ref"):
            pass
        assert {"patch", "use_backend", "nn", "ops", "models", "sampling", "CheckpointError"} <= set(dir(fastscore))
        try:
            fastscore.no_such_name
        except AttributeError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "module 'fastscore' has no attribute 'no_such_name'" in result.stdout
    star = {}
    exec("from fastscore import *", star)
    assert {"patch", "use_backend", "backends", "nn", "ops", "models", "sampling"} <= set(star)


def test_help_is_an_overview():
    """help(fastscore): the overview and the public functions, not pages of inherited exception methods, and no
    pointer to files outside the package."""
    import pydoc

    text = pydoc.render_doc(fastscore, renderer=pydoc.plaintext)
    lines = text.splitlines()
    assert len(lines) < 150, f"help(fastscore) is {len(lines)} lines"
    for name in ("fastscore.patch", "fastscore.sampling", "fastscore.nn", "fastscore.ops", "fastscore info", "README"):
        assert name in text
    assert "Methods inherited from" not in text
    # notes kept outside the repository while the code was written (spelled in pieces: tests/test_docs.py
    # fails on any file of the repository that names them)
    for pointer in ("design/", "reference/", "../" + "shared", "API.md", "ARCHITECTURE" + ".md", "PERFORMANCE" + ".md"):
        assert pointer not in text


def test_a_clone_named_fastscore_in_the_current_folder_is_named(tmp_path):
    """Next to a clone named fastscore (a folder without __init__.py), an editable install's fastscore loses to
    a namespace package of that folder: fastscore's modules and the CLI say so instead of failing on configs."""
    clone = tmp_path / "fastscore"
    (clone / "fastscore").mkdir(parents=True)  # the clone's top level: the package is a folder inside it
    (clone / "README.md").write_text("a clone\n")
    probe = run_python("import fastscore; print(getattr(fastscore, '__file__', None))", cwd=tmp_path)
    real = os.path.dirname(os.path.abspath(fastscore.__file__))
    if probe.stdout.strip() != "None":  # a regular install wins over the folder: nothing to detect
        assert probe.returncode == 0 and probe.stdout.strip().startswith(real), probe.stderr
        return
    result = run_python("import fastscore.models", cwd=tmp_path)
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("ImportError: `import fastscore` found the folder")
    assert str(clone) in error and real in error and "namespace package" in error
    result = subprocess.run(
        [sys.executable, "-m", "fastscore.cli", "info"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("fastscore info: error: `import fastscore` found the folder"), result.stderr
