"""Functional, differentiable, torch.compile-able fused ops. One module per op (see ARCHITECTURE.md)."""

from fastscore.ops.cond_instance_norm import cond_instance_norm
from fastscore.ops.cond_instance_norm import cond_instance_norm_ref
from fastscore.ops.crp_pool import crp_pool
from fastscore.ops.crp_pool import crp_pool_ref

__all__ = [
    "cond_instance_norm",
    "cond_instance_norm_ref",
    "crp_pool",
    "crp_pool_ref",
]
