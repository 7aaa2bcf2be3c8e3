"""Benchmarks, one module per op (installed as fastscore._bench; run by `pytest bench/` and `fastscore bench`)."""
