"""Every Python block of README.md runs as written: each in a fresh interpreter, from an empty folder."""

import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "README.md")


def python_blocks() -> list[tuple[int, str]]:
    """(line number, source) of every ```python block of the README."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)
    ]


def _param(line: int, source: str):
    marks = [pytest.mark.compile, pytest.mark.slow] if "torch.compile" in source else []
    return pytest.param(source, id=f"README.md:{line}", marks=marks)


def test_readme_has_python_blocks():
    sources = [source for _, source in python_blocks()]
    assert len(sources) >= 3 and any("fastscore.patch(" in s for s in sources), "README.md's Python blocks moved"


@pytest.mark.parametrize("source", [_param(line, source) for line, source in python_blocks()])
def test_readme_python_block_runs_as_written(source, tmp_path):
    result = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"the block failed:\n{source}\n{result.stderr[-3000:]}"
