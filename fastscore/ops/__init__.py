"""Functional, differentiable, torch.compile-able fused ops.

One module per op; the anatomy of one: docs/architecture.md#the-anatomy-of-an-op.
"""

from fastscore.ops.cond_instance_norm import cond_instance_norm
from fastscore.ops.cond_instance_norm import cond_instance_norm_ref
from fastscore.ops.crp_pool import crp_pool
from fastscore.ops.crp_pool import crp_pool_ref
from fastscore.ops.elu import elu
from fastscore.ops.elu import elu_ref
from fastscore.ops.hutchinson import exact_divergence
from fastscore.ops.hutchinson import hutchinson_divergence
from fastscore.ops.langevin_step import counter_randn
from fastscore.ops.langevin_step import counter_randn_ref
from fastscore.ops.langevin_step import langevin_corrector_step_
from fastscore.ops.langevin_step import langevin_corrector_step_ref
from fastscore.ops.langevin_step import langevin_step_
from fastscore.ops.langevin_step import langevin_step_ref
from fastscore.ops.langevin_step import sde_update_
from fastscore.ops.langevin_step import sde_update_ref
from fastscore.ops.metropolis import counter_uniform_ref
from fastscore.ops.metropolis import hmc_accept_
from fastscore.ops.metropolis import hmc_accept_ref
from fastscore.ops.metropolis import hmc_leapfrog_
from fastscore.ops.metropolis import hmc_leapfrog_ref
from fastscore.ops.metropolis import hmc_momentum
from fastscore.ops.metropolis import hmc_momentum_ref
from fastscore.ops.metropolis import mala_accept_
from fastscore.ops.metropolis import mala_accept_ref
from fastscore.ops.metropolis import mala_propose
from fastscore.ops.metropolis import mala_propose_ref

__all__ = [
    "cond_instance_norm",
    "cond_instance_norm_ref",
    "crp_pool",
    "crp_pool_ref",
    "elu",
    "elu_ref",
    "exact_divergence",
    "hutchinson_divergence",
    "counter_randn",
    "counter_randn_ref",
    "langevin_corrector_step_",
    "langevin_corrector_step_ref",
    "langevin_step_",
    "langevin_step_ref",
    "sde_update_",
    "sde_update_ref",
    "counter_uniform_ref",
    "mala_propose",
    "mala_propose_ref",
    "mala_accept_",
    "mala_accept_ref",
    "hmc_momentum",
    "hmc_momentum_ref",
    "hmc_leapfrog_",
    "hmc_leapfrog_ref",
    "hmc_accept_",
    "hmc_accept_ref",
]
