"""Triton kernels, one module per op (installed as fastscore._triton; see fastscore/_backend.py)."""
