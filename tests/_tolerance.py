"""Comparison against a float64 reference with a tolerance earned by the dtype.

tolerance = max(floor, 2 x the error plain PyTorch makes in that dtype against float64), as in
mamba's tests: a fused kernel may be as inexact as PyTorch itself (twice), never more.
"""

import torch

FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(got, ref64, plain, *, what: str, dtype=None, floor_scale: float = 1.0):
    """got (fused, in `dtype`) vs ref64 (float64 reference); plain = the same reference run in `dtype`."""
    dtype = dtype or got.dtype
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(ref64).all(), f"{what}: the reference itself is not finite"
    scale = max(1.0, ref64.abs().max().item()) * floor_scale
    tol = max(FLOOR[dtype] * scale, 2 * max_abs_err(plain, ref64))
    err = (got.double() - ref64).abs()
    if not (err.max().item() <= tol):
        worst = torch.nonzero(err == err.max())[0].tolist()
        raise AssertionError(
            f"{what}: max |fused - float64 reference| = {err.max().item():.3e} at {worst} "
            f"(fused {got.double().flatten()[err.flatten().argmax()].item():.6g}, "
            f"reference {ref64.flatten()[err.flatten().argmax()].item():.6g}) exceeds tolerance {tol:.3e} "
            f"(plain PyTorch {dtype} error {max_abs_err(plain, ref64):.3e})"
        )
