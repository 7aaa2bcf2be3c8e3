"""Refuse to run under a ``fastscore`` that is not this package (no torch here: the CLI imports it first).

A folder named ``fastscore`` without an ``__init__.py`` -- a clone of the repository, whose top level is not
the package (that is ``fastscore/fastscore``) -- in the folder of ``python script.py``, the current folder
of ``python -c`` / ``-m``, or anywhere else on ``sys.path``, is imported as a namespace package when fastscore was
installed in editable mode (setuptools' editable finder comes after the path search). Python then takes
that folder for ``fastscore``, runs no code of ours for it, and finds the real submodules
(``fastscore.models``, ...) through the editable finder: the bundled configs and checkpoint, looked up
under the wrong folder, are "missing". This module checks when it loads (fastscore._backend and
fastscore.models import it first, so every op, layer, model and sampler does) and raises an ImportError
that says so; the CLI calls :func:`check` too.
"""

from __future__ import annotations

import os
import sys


def check() -> None:
    """Raise ImportError if ``sys.modules["fastscore"]`` is a namespace package instead of this package."""
    package = sys.modules.get("fastscore")
    if package is None or getattr(package, "__file__", None) is not None:
        return
    found = list(getattr(package, "__path__", None) or [])
    where = ", ".join(repr(p) for p in found) or "a namespace package"
    real = os.path.dirname(os.path.abspath(__file__))
    raise ImportError(
        f"`import fastscore` found the folder {where}, which is not the fastscore package (a folder named "
        "fastscore without __init__.py, e.g. a clone of the repository in the current folder or the script's, "
        f"so Python made it a namespace package); the package is {real!r}. Run from another folder (or rename "
        "the folder in the way) so that `import fastscore` finds the package."
    )


check()
