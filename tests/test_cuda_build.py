"""Every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90.

The CUDA kernels cannot run on a machine without a GPU, but they can be compiled: this keeps them
building wherever nvcc exists (skipped where it does not). The .cu files are pure CUDA (no torch
headers), so no CUDA build of torch is needed.
"""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

# torch's CUDAExtension compiles .cu files with these, so the kernels must build under them too
# (no implicit half / bfloat16 conversions or operators).
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


@pytest.mark.slow
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cuda_source_compiles(cu, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compiled here")
    cmd = [
        nvcc,
        "-std=c++17",
        "-O3",
        "-c",
        str(cu),
        "-o",
        str(tmp_path / f"{cu.stem}.o"),
        "-I",
        str(ROOT / "csrc" / "include"),
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_90,code=sm_90",
        "-Xcompiler",
        "-fPIC",
        *TORCH_NVCC_FLAGS,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, (
        f"nvcc failed on {cu.relative_to(ROOT)} (exit {proc.returncode})\n"
        f"command: {' '.join(cmd)}\n{proc.stderr}{proc.stdout}"
    )


BINDINGS = sorted((ROOT / "csrc" / "cuda").glob("*_binding.cpp"))


@pytest.mark.slow
@pytest.mark.parametrize("binding", BINDINGS, ids=[p.name for p in BINDINGS])
def test_cuda_binding_parses(binding, tmp_path):
    """The torch glue needs a CUDA build of torch to compile; here g++ at least parses it.

    The CPU torch wheel ships c10/cuda's headers but not the one its CMake generates
    (c10/cuda/impl/cuda_cmake_macros.h): a stand-in defining what it defines lets the rest parse.
    """
    import torch.utils.cpp_extension as ext

    gxx, nvcc = shutil.which("g++"), shutil.which("nvcc")
    homes = [ext.CUDA_HOME, nvcc and pathlib.Path(nvcc).resolve().parents[1], "/usr/local/cuda"]
    found = [
        pathlib.Path(h) / "include" for h in homes if h and (pathlib.Path(h) / "include" / "cuda_runtime.h").exists()
    ]
    cuda_include = found[0] if found else pathlib.Path("/nonexistent")
    if gxx is None or not (cuda_include / "cuda_runtime.h").exists():
        pytest.skip("g++ or the CUDA toolkit's headers are missing: the CUDA bindings cannot be parsed here")
    stand_in = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    torch_include = pathlib.Path(ext.include_paths()[0])
    includes = [tmp_path, ROOT / "csrc" / "include", ROOT / "csrc" / "cuda", torch_include]
    includes += [torch_include / "torch" / "csrc" / "api" / "include", cuda_include]
    cmd = [gxx, "-std=c++17", "-fsyntax-only", str(binding), *(f"-I{p}" for p in includes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, f"g++ could not parse {binding.relative_to(ROOT)}\n{proc.stderr[-4000:]}"
