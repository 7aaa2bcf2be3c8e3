"""Builds fastscore._C: the C++ CPU kernels always, the CUDA kernels when asked or possible.

Switches (environment):
  FASTSCORE_CUDA=1   build csrc/cuda as well (needs a CUDA build of torch and nvcc);
  FASTSCORE_CUDA=0   never build CUDA; unset: build it when torch has CUDA and nvcc is found.
  FASTSCORE_DEBUG=1  -O0 -g instead of -O3.
Nothing here touches the network: torch must already be installed
(pip install --no-build-isolation -e .).
"""

import glob
import os
import shutil

import torch
from setuptools import find_packages
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension
from torch.utils.cpp_extension import CppExtension
from torch.utils.cpp_extension import CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("FASTSCORE_CUDA", "").strip()
    if flag == "0":
        return False
    has_toolchain = torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME") is not None
    )
    if flag == "1":
        if torch.version.cuda is None:
            raise RuntimeError(
                "FASTSCORE_CUDA=1 but the installed torch is a CPU build; install a CUDA build of torch "
                "(or unset FASTSCORE_CUDA to build the CPU kernels only)"
            )
        return True
    return has_toolchain


def cxx_flags() -> list[str]:
    """The g++ flags of every C++ source (csrc/cxx_flags.txt, shared with tests/test_vectorisation.py)."""
    with open(os.path.join(ROOT, "csrc", "cxx_flags.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extension():
    debug = os.environ.get("FASTSCORE_DEBUG") == "1"
    flags = cxx_flags()
    opt = ["-O0", "-g"] if debug else []
    cxx = [f for f in flags if not (debug and f.startswith("-O"))] + opt + ["-DPy_LIMITED_API=0x03090000"]
    sources = _rel(
        [os.path.join(ROOT, "csrc", "fastscore.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    common = dict(
        name="fastscore._C",
        include_dirs=include_dirs,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if _want_cuda():
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*_binding.cpp")))
        nvcc = (opt or ["-O3"]) + ["-std=c++17", "-lineinfo"]
        return CUDAExtension(
            sources=sources,
            extra_compile_args={"cxx": cxx + ["-DFASTSCORE_WITH_CUDA"], "nvcc": nvcc},
            **common,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)


setup(
    packages=find_packages(include=["fastscore", "fastscore.*"]) + ["fastscore._triton", "fastscore._bench"],
    # Triton kernels live in kernels/ and the benches in bench/ (one stem per op in each), shipped
    # inside the package so `fastscore bench` and the triton backend work from a wheel too.
    package_dir={"fastscore._triton": "kernels", "fastscore._bench": "bench"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
