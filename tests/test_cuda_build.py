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
