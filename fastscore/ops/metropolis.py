r"""Metropolis-adjusted Langevin (MALA) and Hamiltonian Monte Carlo (HMC) steps for energy-based score models.

A score model written as an energy, :math:`s(x) = -\nabla_x E(x)`, defines a density :math:`\pi \propto e^{-E}`,
and a Metropolis-Hastings test makes a Langevin or leapfrog proposal exact for it (docs/mcmc.md). Per step
and per sample the sampler proposes, evaluates the energy and its score at the proposal (the network: one
forward and one backward pass), then accepts or rejects. This op is everything but the network, in fused
passes, on every backend (ref, cpp, triton, cuda):

- :func:`mala_propose`: :math:`x' = x + \epsilon s + \sqrt{2\epsilon} z` with z the counter-based normals of
  ``(seed, counter)`` (exactly :func:`fastscore.ops.langevin_step_ref`'s update), and per sample
  :math:`|z|^2` (:math:`-\log q(x'|x) = |z|^2/2` + const);
- :func:`mala_accept_`: per sample the reverse-move term :math:`|x - x' - \epsilon s'|^2 / (2 c^2)`
  (:math:`c = \sqrt{2\epsilon}`), :math:`\log\alpha = E(x) - E(x') + |z|^2/2 - |x - x' - \epsilon s'|^2/(2c^2)`,
  a uniform u per sample, and for the accepted samples (:math:`\log u \le \log\alpha`) x, the cached score
  and the energy replaced in place by the proposal's;
- :func:`hmc_momentum`: the momentum draw :math:`p_0 = z`, its half kick and the first drift,
  :math:`p = z + (h/2) s`, :math:`x' = x + h p`, and per sample :math:`|p_0|^2`;
- :func:`hmc_leapfrog_`: the inner leapfrog steps, in place: :math:`p \leftarrow p + h s`,
  :math:`x \leftarrow x + h p`;
- :func:`hmc_accept_`: the last half kick folded into the kinetic energy,
  :math:`\log\alpha = E(x) - E(x') + |p_0|^2/2 - |p + (h/2) s'|^2/2`, then the same test and replacement.

Randomness. The normals are :func:`fastscore.ops.counter_randn`'s (Philox4x32-10 keyed by the seed, element
``(sample_offset + n) D + i`` at ``counter``). The uniform of sample n at ``counter`` comes from the Philox
block ``2^63 + sample_offset + n`` under the same key and counter (:func:`counter_uniform_ref`): the normals
only ever use blocks below 2^62, so the uniforms are a separate stream that never reuses a normal's bits,
whatever the counters. Everything a sample gets depends on ``(seed, counter, sample_offset + n)`` only: not
on the batch, the threads or the backend.

Sums. Every per-sample sum of squares (:math:`|z|^2`, the reverse-move and kinetic terms) is taken in
float64 over the sample's elements in logical (row-major) order, in pieces of :data:`PIECE` elements: a
piece is summed by a halving tree (slot k += slot k + h for h = 512, 256, ..., 1, zero padded), the pieces
left to right. Each square is of a value computed in the compute dtype (float32 for float16 / bfloat16 /
float32, float64 for float64), and no multiply-add is contracted, so every backend computes the same bits:
proposals, log-acceptance ratios and decisions are bitwise the same on every backend and CPU capability
level, and a sample's do not depend on the batch it is in. (The one library function is ``log u`` in float64:
a decision could differ between backends only if log u and log alpha agreed to the last bit.)

Shapes, dtypes, layouts: x, score, the proposal and p are (N, ...) tensors of one dtype (float16, bfloat16,
float32, float64) and one layout (contiguous, or channels_last (N, C, H, W)); energies and the sums are (N,)
float64 tensors; step sizes a float or an (N,) tensor (one per sample). These are sampler steps: not
differentiable, and inputs that require grad in grad mode are refused (run them under ``torch.no_grad()``).

This file reads top to bottom: 1. the references (``*_ref``, pure PyTorch, the ground truth); 2. the custom
ops ``fastscore::metropolis_{propose,leapfrog,accept}`` and each backend's implementation of them; 3. the
public functions, which validate every argument before anything is written.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastscore import _backend
from fastscore import _validate
from fastscore.ops._philox import philox4x32_10
from fastscore.ops.langevin_step import counter_randn_ref

OP = "metropolis"
PIECE = 1024  # elements per piece of a per-sample sum (a power of two: the halving tree's width)
_U64 = 1 << 64
_MASK32 = 0xFFFFFFFF
_UNIFORM_BLOCK = 1 << 63  # Philox block of sample g's uniform: 2^63 + g (normals use blocks below 2^62)

__all__ = [
    "PIECE",
    "Proposal",
    "HMCStart",
    "Decision",
    "Accepted",
    "counter_uniform_ref",
    "sum_squares_ref",
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


class Proposal(NamedTuple):
    """A MALA proposal: the proposed state (x's shape, dtype, layout) and per sample :math:`|z|^2` (N,) float64."""

    x: Tensor
    z_sq: Tensor


class HMCStart(NamedTuple):
    """The start of an HMC trajectory: the state after the first drift, the momentum after the first kick
    (both x's shape, dtype, layout), and per sample :math:`|p_0|^2` (N,) float64 of the drawn momentum."""

    x: Tensor
    p: Tensor
    p_sq: Tensor


class Decision(NamedTuple):
    """What an accept step decided, per sample: ``accepted`` (N,) bool and ``log_alpha`` (N,) float64, the
    log of the Metropolis-Hastings ratio (the acceptance probability is ``min(1, exp(log_alpha))``)."""

    accepted: Tensor
    log_alpha: Tensor


class Accepted(NamedTuple):
    """The references' accept step: the new state, score and energy (the proposal's where accepted, the
    current ones elsewhere; new tensors), and the decision."""

    x: Tensor
    score: Tensor
    energy: Tensor
    accepted: Tensor
    log_alpha: Tensor


# ---- 1. references ------------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of the per-element arithmetic: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _view(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape((x.shape[0],) + (1,) * (x.dim() - 1))


def _rows(t: Tensor) -> Tensor:
    """(N, D) with each sample's elements in logical (row-major) order, whatever t's memory layout."""
    return t.reshape(t.shape[0], -1)


def sum_squares_ref(v: Tensor) -> Tensor:
    """Per-sample sums of squares (N,) float64 of v (N, ...), in the kernels' order: the squares (of v in
    its own dtype, squared in float64) in logical order, pieces of :data:`PIECE` summed by the halving tree
    (zero padded), the pieces added left to right."""
    q = _rows(v).to(torch.float64).square()
    N, D = q.shape
    P = -(-D // PIECE)
    if P == 0:
        return torch.zeros(N, dtype=torch.float64, device=v.device)
    width = PIECE if P > 1 else 1 << max(0, (D - 1).bit_length())  # zero padding beyond D adds exact zeros
    q = torch.nn.functional.pad(q, (0, P * width - D)).reshape(N, P, width)
    while q.shape[2] > 1:
        h = q.shape[2] // 2
        q = q[:, :, :h] + q[:, :, h:]
    total = q[:, 0, 0]
    for p in range(1, P):
        total = total + q[:, p, 0]
    return total


def counter_uniform_ref(n: int, *, seed: int, counter: int = 0, sample_offset: int = 0, device="cpu") -> Tensor:
    r"""The accept steps' uniforms (n,) float64 in (0, 1]: sample n's is drawn from the Philox4x32-10 block
    :math:`2^{63} + \text{sample\_offset} + n` under key ``seed`` and counter ``counter`` (the normals of
    :func:`fastscore.ops.counter_randn` use blocks below :math:`2^{62}`: the streams never meet), from its
    first two words: :math:`u = (\lfloor w_0 2^{21} + w_1 / 2^{11} \rfloor + 1)\, 2^{-53}` (53 bits)."""
    n = _validate.integer(n, "n", 0)
    seed = _validate.seed(seed)
    if seed is None:
        raise TypeError("seed: expected an integer, got None (counter_uniform_ref draws no seed)")
    counter = _validate.integer(counter, "counter", 0, _U64)
    sample_offset = _validate.integer(sample_offset, "sample_offset", 0, 1 << 63)
    if sample_offset + n > 1 << 63:
        raise ValueError(f"sample_offset: the sample index sample_offset + n = {sample_offset + n} exceeds 2^63")
    g = torch.arange(sample_offset, sample_offset + n, dtype=torch.int64)
    w0, w1, _, _ = philox4x32_10(
        g & _MASK32,
        (g >> 32) | (_UNIFORM_BLOCK >> 32),
        torch.full_like(g, counter & _MASK32),
        torch.full_like(g, counter >> 32),
        seed & _MASK32,
        seed >> 32,
    )
    u53 = (w0 << 21) | (w1 >> 11)
    return ((u53 + 1).to(torch.float64) * 2.0**-53).to(device)


def _step_coef(step_size, x: Tensor, what: str) -> Tensor:
    """(N, 3) rows in the compute dtype: MALA (eps, 0, sqrt(2 eps)); HMC (h, h / 2, h). A Python step is
    turned into coefficients in float64 and rounded once; a tensor step is rounded to the compute dtype
    first (as fastscore.ops.langevin_step_'s coefficients)."""
    acc = acc_dtype(x.dtype)
    N = x.shape[0]
    if isinstance(step_size, Tensor):
        s = step_size.detach().to(device=x.device, dtype=acc).expand(N)
        cols = (s, torch.zeros_like(s), torch.sqrt(2 * s)) if what == "mala" else (s, s / 2, s)
        return torch.stack(cols, dim=1)
    h = float(step_size)
    if torch.compiler.is_compiling():
        return torch.tensor([_row(h, what)], dtype=acc, device=x.device).expand(N, 3)
    key = (h, what, N, acc, x.device)
    rows = _coef_rows.get(key)
    if rows is None:  # a sampler repeats a few step sizes: the rows are made once (a tensor costs ~5 us)
        if len(_coef_rows) >= 64:
            _coef_rows.clear()
        rows = _coef_rows[key] = torch.tensor([_row(h, what)], dtype=acc, device=x.device).expand(N, 3)
    return rows


_coef_rows: dict[tuple, Tensor] = {}


def _row(h: float, what: str) -> tuple[float, float, float]:
    return (h, 0.0, math.sqrt(2 * h)) if what == "mala" else (h, h / 2, h)


def _normals(x: Tensor, seed: int, counter: int, sample_offset: int) -> Tensor:
    return counter_randn_ref(x.shape, seed=seed, counter=counter, sample_offset=sample_offset, device=x.device)


def mala_propose_ref(x: Tensor, score: Tensor, step_size, *, seed: int, counter: int = 0, sample_offset: int = 0):
    r"""The MALA proposal in plain PyTorch: returns :class:`Proposal` ``(x_prop, z_sq)``.

    .. math::
        x' = (x + \epsilon s) + c z, \quad c = \sqrt{2\epsilon}, \qquad |z|^2 = \textstyle\sum_i z_i^2

    with z = ``counter_randn_ref(x.shape, seed, counter, sample_offset)`` (float32 normals), the update in the
    compute dtype rounded once to x's dtype -- exactly ``langevin_step_ref(x, score, step_size, seed=seed,
    counter=counter, sample_offset=sample_offset)`` -- and :math:`|z|^2` by :func:`sum_squares_ref`.
    ``step_size`` :math:`\epsilon > 0`: a float or an (N,) tensor."""
    acc = acc_dtype(x.dtype)
    coef = _step_coef(step_size, x, "mala")
    z = _normals(x, seed, counter, sample_offset)
    a, c = _view(coef[:, 0], x), _view(coef[:, 2], x)
    prop = (x.to(acc) + a * score.to(acc)) + c * z.to(acc)
    return Proposal(prop.to(x.dtype), sum_squares_ref(z))


def hmc_momentum_ref(x: Tensor, score: Tensor, step_size, *, seed: int, counter: int = 0, sample_offset: int = 0):
    r"""The start of an HMC trajectory in plain PyTorch: returns :class:`HMCStart` ``(x_prop, p, p_sq)``.

    .. math::
        p_0 = z, \qquad p = p_0 + \tfrac{h}{2} s, \qquad x' = x + h p, \qquad |p_0|^2 = \textstyle\sum_i z_i^2

    (unit mass), z the counter-based normals as in :func:`mala_propose_ref`, p computed in the compute dtype
    and rounded to x's dtype, the drift using the rounded p (as the next leapfrog step reads it)."""
    acc = acc_dtype(x.dtype)
    coef = _step_coef(step_size, x, "hmc")
    z = _normals(x, seed, counter, sample_offset)
    b, c = _view(coef[:, 1], x), _view(coef[:, 2], x)
    p = (z.to(acc) + b * score.to(acc)).to(x.dtype)
    prop = x.to(acc) + c * p.to(acc)
    return HMCStart(prop.to(x.dtype), p, sum_squares_ref(z))


def hmc_leapfrog_ref(x: Tensor, p: Tensor, score: Tensor, step_size) -> tuple[Tensor, Tensor]:
    r"""An inner leapfrog step in plain PyTorch (new tensors): :math:`p \leftarrow p + h s(x)`, then
    :math:`x \leftarrow x + h p` with the rounded p. Returns ``(x, p)``."""
    acc = acc_dtype(x.dtype)
    coef = _step_coef(step_size, x, "hmc")
    a, c = _view(coef[:, 0], x), _view(coef[:, 2], x)
    p_new = (p.to(acc) + a * score.to(acc)).to(x.dtype)
    return (x.to(acc) + c * p_new.to(acc)).to(x.dtype), p_new


def _decide(x, score, energy, x_prop, score_prop, energy_prop, log_alpha, seed, counter, sample_offset) -> Accepted:
    u = counter_uniform_ref(x.shape[0], seed=seed, counter=counter, sample_offset=sample_offset, device=x.device)
    accepted = torch.log(u) <= log_alpha  # u in (0, 1]: P(accept) = min(1, alpha); NaN is never accepted
    keep = _view(accepted, x)
    return Accepted(
        torch.where(keep, x_prop, x),
        torch.where(keep, score_prop, score),
        torch.where(accepted, energy_prop, energy),
        accepted,
        log_alpha,
    )


def mala_accept_ref(
    x: Tensor,
    score: Tensor,
    energy: Tensor,
    x_prop: Tensor,
    score_prop: Tensor,
    energy_prop: Tensor,
    z_sq: Tensor,
    step_size,
    *,
    seed: int,
    counter: int = 0,
    sample_offset: int = 0,
) -> Accepted:
    r"""MALA's Metropolis-Hastings step in plain PyTorch; nothing is modified, returns :class:`Accepted`.

    .. math::
        r = (x - x') - \epsilon s', \qquad
        \log\alpha = \big((E - E') + \tfrac12 |z|^2\big) - \frac{|r|^2}{2 c^2}, \qquad
        \text{accept} \iff \log u \le \log\alpha

    r per element in the compute dtype, :math:`|r|^2` by :func:`sum_squares_ref`, the rest in float64 in this
    order, with :math:`\epsilon`, :math:`c = \sqrt{2\epsilon}` the proposal's coefficients (the Gaussian
    proposal's normalising constants cancel) and u :func:`counter_uniform_ref`'s. Energies and ``z_sq``:
    (N,) float64."""
    acc = acc_dtype(x.dtype)
    coef = _step_coef(step_size, x, "mala")
    a = _view(coef[:, 0], x)
    r = (x.to(acc) - x_prop.to(acc)) - a * score_prop.to(acc)
    c = coef[:, 2].to(torch.float64)
    log_alpha = ((energy - energy_prop) + 0.5 * z_sq) - sum_squares_ref(r) / (2.0 * (c * c))
    return _decide(x, score, energy, x_prop, score_prop, energy_prop, log_alpha, seed, counter, sample_offset)


def hmc_accept_ref(
    x: Tensor,
    score: Tensor,
    energy: Tensor,
    x_prop: Tensor,
    score_prop: Tensor,
    energy_prop: Tensor,
    p: Tensor,
    p_sq: Tensor,
    step_size,
    *,
    seed: int,
    counter: int = 0,
    sample_offset: int = 0,
) -> Accepted:
    r"""HMC's Metropolis step in plain PyTorch; nothing is modified, returns :class:`Accepted`.

    .. math::
        k = p + \tfrac{h}{2} s', \qquad
        \log\alpha = \big((E - E') + \tfrac12 |p_0|^2\big) - \tfrac12 |k|^2

    (the total energy :math:`H = E + |p|^2/2` before minus after the trajectory; the final half kick k is
    not stored), k per element in the compute dtype, :math:`|k|^2` by :func:`sum_squares_ref`, the test as
    :func:`mala_accept_ref`'s."""
    acc = acc_dtype(x.dtype)
    coef = _step_coef(step_size, x, "hmc")
    k = p.to(acc) + _view(coef[:, 1], x) * score_prop.to(acc)
    log_alpha = ((energy - energy_prop) + 0.5 * p_sq) - 0.5 * sum_squares_ref(k)
    return _decide(x, score, energy, x_prop, score_prop, energy_prop, log_alpha, seed, counter, sample_offset)


# ---- 2. custom ops and their implementations ---------------------------------------------------------------
# The kernels' contract (torch.ops.fastscore_C.metropolis_*, csrc/fastscore.cpp): x, score, x_out, p, x_prop,
# score_prop (N, ...) in one layout (contiguous or channels_last) and dtype; coef (N, 3) in the compute dtype
# with unit column stride (rows (a, b, c): MALA (eps, 0, sqrt(2 eps)), HMC (h, h / 2, h)); energies, sums
# and log_alpha (N,) float64 contiguous; accepted (N,) bool; seed and counter the 64-bit words as int64.
#   propose(x, score, coef, seed, counter, sample_offset, x_out, p_out, sq_out):
#       p_out None: x_out = (x + a s) + c z; else p_out = z + b s, x_out = x + c p_out; sq_out = sum z^2
#   leapfrog(x, p, score, coef): p = p + a s; x = x + c p
#   accept(x, score, energy, x_prop, score_prop, energy_prop, p, sq, coef, seed, counter, sample_offset,
#          accepted, log_alpha): p None (MALA): r = (x - x') - a s', la = ((E - E') + sq / 2) - |r|^2 / (2 c^2);
#          p given (HMC): k = p + b s', la = ((E - E') + sq / 2) - |k|^2 / 2; accept iff log u <= la, and then
#          x, score, energy <- x_prop, score_prop, energy_prop.


def _unwrap(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


def _wrap(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def _propose_ref_impl(x, score, coef, seed, counter, sample_offset, x_out, p_out, sq_out) -> None:
    acc = acc_dtype(x.dtype)
    z = _normals(x, _unwrap(seed), _unwrap(counter), sample_offset)
    a, b, c = (_view(coef[:, k], x) for k in range(3))
    if p_out is None:
        x_out.copy_(((x.to(acc) + a * score.to(acc)) + c * z.to(acc)).to(x.dtype))
    else:
        p_out.copy_((z.to(acc) + b * score.to(acc)).to(x.dtype))
        x_out.copy_((x.to(acc) + c * p_out.to(acc)).to(x.dtype))
    sq_out.copy_(sum_squares_ref(z))


def _leapfrog_ref_impl(x, p, score, coef) -> None:
    acc = acc_dtype(x.dtype)
    p.copy_((p.to(acc) + _view(coef[:, 0], x) * score.to(acc)).to(x.dtype))
    x.copy_((x.to(acc) + _view(coef[:, 2], x) * p.to(acc)).to(x.dtype))


def _accept_ref_impl(
    x, score, energy, x_prop, score_prop, energy_prop, p, sq, coef, seed, counter, sample_offset, accepted, log_alpha
) -> None:
    acc = acc_dtype(x.dtype)
    if p is None:
        r = (x.to(acc) - x_prop.to(acc)) - _view(coef[:, 0], x) * score_prop.to(acc)
        c = coef[:, 2].to(torch.float64)
        la = ((energy - energy_prop) + 0.5 * sq) - sum_squares_ref(r) / (2.0 * (c * c))
    else:
        k = p.to(acc) + _view(coef[:, 1], x) * score_prop.to(acc)
        la = ((energy - energy_prop) + 0.5 * sq) - 0.5 * sum_squares_ref(k)
    new = _decide(x, score, energy, x_prop, score_prop, energy_prop, la, _unwrap(seed), _unwrap(counter), sample_offset)
    x.copy_(new.x)
    score.copy_(new.score)
    energy.copy_(new.energy)
    accepted.copy_(new.accepted)
    log_alpha.copy_(la)


class _Impl(NamedTuple):
    propose: object
    leapfrog: object
    accept: object


def _impl(backend: str) -> _Impl:
    if backend == "ref":
        return _Impl(_propose_ref_impl, _leapfrog_ref_impl, _accept_ref_impl)
    if backend in ("cpp", "cuda"):  # one C++ op per function; the dispatcher routes CPU / CUDA tensors
        ops = torch.ops.fastscore_C
        return _Impl(ops.metropolis_propose.default, ops.metropolis_leapfrog.default, ops.metropolis_accept.default)
    from fastscore._triton import metropolis as kernels

    return _Impl(kernels.propose, kernels.leapfrog, kernels.accept)


# Order on CUDA tensors (not measured on a GPU yet; both are memory-bound with the noise made in registers).
PREFERRED_CUDA = ("cuda", "triton")


def _impl_for(t: Tensor) -> _Impl:
    return _backend.chosen_impl(OP, t.device, _impl, cpp_op="metropolis_propose", cuda_order=PREFERRED_CUDA)


@torch.library.custom_op("fastscore::metropolis_propose", mutates_args=("x_out", "p_out", "sq_out"))
def _propose_op(
    x: Tensor,
    score: Tensor,
    coef: Tensor,
    seed: int,
    counter: int,
    sample_offset: int,
    x_out: Tensor,
    p_out: Tensor | None,
    sq_out: Tensor,
) -> None:
    _impl_for(x).propose(x, score, coef, seed, counter, sample_offset, x_out, p_out, sq_out)


@_propose_op.register_fake
def _(x, score, coef, seed, counter, sample_offset, x_out, p_out, sq_out):
    return None


@torch.library.custom_op("fastscore::metropolis_leapfrog", mutates_args=("x", "p"))
def _leapfrog_op(x: Tensor, p: Tensor, score: Tensor, coef: Tensor) -> None:
    _impl_for(x).leapfrog(x, p, score, coef)


@_leapfrog_op.register_fake
def _(x, p, score, coef):
    return None


@torch.library.custom_op("fastscore::metropolis_accept", mutates_args=("x", "score", "energy", "accepted", "log_alpha"))
def _accept_op(
    x: Tensor,
    score: Tensor,
    energy: Tensor,
    x_prop: Tensor,
    score_prop: Tensor,
    energy_prop: Tensor,
    p: Tensor | None,
    sq: Tensor,
    coef: Tensor,
    seed: int,
    counter: int,
    sample_offset: int,
    accepted: Tensor,
    log_alpha: Tensor,
) -> None:
    _impl_for(x).accept(
        x,
        score,
        energy,
        x_prop,
        score_prop,
        energy_prop,
        p,
        sq,
        coef,
        seed,
        counter,
        sample_offset,
        accepted,
        log_alpha,
    )


@_accept_op.register_fake
def _(x, score, energy, x_prop, score_prop, energy_prop, p, sq, coef, seed, counter, sample_offset, accepted, la):
    return None


# Eagerly the public functions call the chosen implementation directly (the custom-op wrapper costs tens of
# microseconds per call); under torch.compile they go through the custom ops, which the compiler traces.


def _propose(*args) -> None:
    if torch.compiler.is_compiling():
        torch.ops.fastscore.metropolis_propose(*args)
    else:
        _impl_for(args[0]).propose(*args)


def _leapfrog(*args) -> None:
    if torch.compiler.is_compiling():
        torch.ops.fastscore.metropolis_leapfrog(*args)
    else:
        _impl_for(args[0]).leapfrog(*args)


def _accept(*args) -> None:
    if torch.compiler.is_compiling():
        torch.ops.fastscore.metropolis_accept(*args)
    else:
        _impl_for(args[0]).accept(*args)


# ---- 3. public functions -------------------------------------------------------------------------------------


def _key(seed, counter, sample_offset, x: Tensor) -> tuple[int, int, int]:
    """(seed, counter, sample_offset) checked, seed and counter wrapped to the int64 words the kernels take."""
    seed = _validate.seed(seed)
    if seed is None:
        raise TypeError(
            "seed: expected an integer, got None (a step's proposal and its acceptance must share one seed: "
            "the samplers in fastscore.mcmc draw it once per chain)"
        )
    counter = _validate.integer(counter, "counter", 0, _U64)
    sample_offset = _validate.integer(sample_offset, "sample_offset", 0, 1 << 63)
    N, D = x.shape[0], math.prod(x.shape[1:])
    if (sample_offset + N) * D > _U64 or sample_offset + N > 1 << 63:
        raise ValueError(
            f"sample_offset: the global element index (sample_offset + N) * D = {(sample_offset + N) * D} "
            "exceeds 2^64 (or the sample index exceeds 2^63)"
        )
    return _wrap(seed), _wrap(counter), sample_offset


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _step(v, x: Tensor, name: str = "step_size") -> object:
    """A positive step: a float, or an (N,) (or 0-d) float tensor on x's device; finite in x's dtype, with
    2 step finite in the compute dtype (MALA's noise scale is sqrt(2 step))."""
    N = x.shape[0]
    low, high, why = _step_range(x.dtype, name)
    if isinstance(v, Tensor):
        _validate.floating(v, name)
        if v.shape not in ((N,), ()):
            raise ValueError(
                f"{name}: expected a float or a tensor of shape ({N},) (one per sample), got shape {tuple(v.shape)}"
            )
        _validate.same_device(v, name, x)
        if _validate.values_checkable():
            w = v.detach().to(torch.float64)
            if not bool(((w >= low) & (w <= high)).all()):  # NaN fails both
                raise ValueError(
                    f"{name}: expected positive finite values in [{low:.6g}, {high:.6g}] ({why}), got "
                    f"{_validate.some(v.tolist())}"
                )
        return v.detach()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a float or a tensor of shape ({N},), got {type(v).__name__}")
    v = float(v)
    if not low <= v <= high:  # NaN fails both
        raise ValueError(f"{name}: expected a positive finite number in [{low:.6g}, {high:.6g}] ({why}), got {v}")
    return v


def _step_range(dtype: torch.dtype, name: str) -> tuple[float, float, str]:
    """The steps the kernels take for x of ``dtype``: from the smallest normal number of the compute dtype (a
    smaller step rounds to 0 or loses its precision there) to the largest with the step finite in x's dtype
    and 2 step in the compute dtype (MALA's noise scale is sqrt(2 step))."""
    acc = acc_dtype(dtype)
    high = min(torch.finfo(dtype).max, torch.finfo(acc).max / 2)
    why = (
        f"{name} must be a normal number in {_dtype_name(acc)}, the update's dtype, finite in "
        f"{_dtype_name(dtype)}, x's dtype, with 2 * {name} finite in {_dtype_name(acc)}"
    )
    return torch.finfo(acc).tiny, high, why


def _per_sample(t, name: str, x: Tensor, *, out: bool = False, dtype=torch.float64) -> Tensor:
    """An (N,) contiguous tensor of ``dtype`` on x's device (written to when ``out``)."""
    _validate.tensor(t, name)
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != (x.shape[0],):
        raise ValueError(f"{name}: expected shape ({x.shape[0]},) (one value per sample), got {tuple(t.shape)}")
    _validate.same_device(t, name, x)
    if not t.is_contiguous():
        if out:
            raise ValueError(f"{name}: expected a contiguous tensor (it is written in place)")
        t = t.contiguous()
    if out:
        _validate.overwritable(t, name)
    return t


def _state(x, name: str = "x") -> torch.memory_format:
    """x checked as a state the ops read in place (contiguous or channels_last); its memory format."""
    return _validate.updatable(x, name)


def _distinct(pairs) -> None:
    """Refuse an output that shares memory with an input it must not overwrite while reading. (Skipped while
    torch.compile traces, which cannot read storage pointers; the kernels' own overlap checks still run.)"""
    if torch.compiler.is_compiling():
        return
    for (a, a_name), (b, b_name) in pairs:
        if a is None or b is None or not a.numel() or not b.numel():
            continue
        pa, pb = a.data_ptr(), b.data_ptr()  # dense tensors: [ptr, ptr + numel * itemsize)
        if pa < pb + b.numel() * b.element_size() and pb < pa + a.numel() * a.element_size():
            raise ValueError(f"{a_name}: expected a tensor that does not share memory with {b_name}")


def _new_like(x: Tensor, fmt: torch.memory_format, given, name: str) -> Tensor:
    if given is None:
        return torch.empty_like(x, memory_format=fmt)
    return _validate.output(given, x, name)


def mala_propose(
    x: Tensor,
    score: Tensor,
    step_size,
    *,
    seed: int,
    counter: int = 0,
    sample_offset: int = 0,
    out: Tensor | None = None,
    z_sq: Tensor | None = None,
) -> Proposal:
    r"""The MALA proposal in one fused pass: :math:`x' = x + \epsilon s + \sqrt{2\epsilon}\, z` and per sample
    :math:`|z|^2`; returns :class:`Proposal` ``(x_prop, z_sq)``. x is not modified.

    - ``x``, ``score``: (N, ...) of one dtype (float16, bfloat16, float32, float64; arithmetic in float32,
      float64 for float64); x contiguous or channels_last, a score in another layout is copied into x's.
    - ``step_size`` :math:`\epsilon > 0`: a float or an (N,) tensor (one step per sample).
    - z: :func:`fastscore.ops.counter_randn` of ``(seed, counter)`` at global sample ``sample_offset + n``
      (``seed`` an integer in [0, 2^64): give the accept step the same one). x' is bitwise
      ``langevin_step_ref(x, score, step_size, seed=seed, counter=counter, sample_offset=sample_offset)``.
    - ``out``, ``z_sq``: optional preallocated results (x's shape, dtype and layout; (N,) float64), so a
      sampler's loop allocates nothing.

    :math:`|z|^2 = -2 \log q(x'|x)` + const feeds :func:`mala_accept_`. See the module docstring for the
    order of the sums (the same bits on every backend). Not differentiable (run under ``torch.no_grad()``).
    """
    fmt = _state(x)
    score = _validate.like(score, "score", x, fmt)
    _validate.no_grad_needed("mala_propose", x, score)
    step_size = _step(step_size, x)
    key = _key(seed, counter, sample_offset, x)
    out = _new_like(x, fmt, out, "out")
    z_sq = torch.empty(x.shape[0], dtype=torch.float64, device=x.device) if z_sq is None else z_sq
    z_sq = _per_sample(z_sq, "z_sq", x, out=True)
    _distinct([((out, "out"), (x, "x")), ((out, "out"), (score, "score"))])
    if x.shape[0]:
        _propose(x, score, _step_coef(step_size, x, "mala"), *key, out, None, z_sq)
    return Proposal(out, z_sq)


def hmc_momentum(
    x: Tensor,
    score: Tensor,
    step_size,
    *,
    seed: int,
    counter: int = 0,
    sample_offset: int = 0,
    out: Tensor | None = None,
    p: Tensor | None = None,
    p_sq: Tensor | None = None,
) -> HMCStart:
    r"""The start of an HMC trajectory in one fused pass: the momentum :math:`p_0 = z` (unit mass; z as in
    :func:`mala_propose`), its half kick :math:`p = p_0 + (h/2) s` and the first drift :math:`x' = x + h p`,
    and per sample :math:`|p_0|^2`; returns :class:`HMCStart` ``(x_prop, p, p_sq)``. x is not modified.

    ``step_size`` h > 0 (a float or an (N,) tensor); ``out``, ``p`` (x's shape, dtype, layout) and ``p_sq``
    ((N,) float64): optional preallocated results. Then call :func:`hmc_leapfrog_` once per further leapfrog
    step (after the score at the current x'), and :func:`hmc_accept_`. Arguments as :func:`mala_propose`."""
    fmt = _state(x)
    score = _validate.like(score, "score", x, fmt)
    _validate.no_grad_needed("hmc_momentum", x, score)
    step_size = _step(step_size, x)
    key = _key(seed, counter, sample_offset, x)
    out = _new_like(x, fmt, out, "out")
    p = _new_like(x, fmt, p, "p")
    p_sq = torch.empty(x.shape[0], dtype=torch.float64, device=x.device) if p_sq is None else p_sq
    p_sq = _per_sample(p_sq, "p_sq", x, out=True)
    _distinct(
        [
            ((out, "out"), (x, "x")),
            ((out, "out"), (score, "score")),
            ((p, "p"), (x, "x")),
            ((p, "p"), (score, "score")),
            ((p, "p"), (out, "out")),
        ]
    )
    if x.shape[0]:
        _propose(x, score, _step_coef(step_size, x, "hmc"), *key, out, p, p_sq)
    return HMCStart(out, p, p_sq)


def hmc_leapfrog_(x: Tensor, p: Tensor, score: Tensor, step_size) -> Tensor:
    r"""An inner leapfrog step in place, in one fused pass: :math:`p \leftarrow p + h s`,
    :math:`x \leftarrow x + h p` (s the score at the current x); returns x.

    ``x``, ``p`` (updated in place; one dtype and layout, contiguous or channels_last), ``score`` (x's shape and
    dtype; copied into x's layout when in another one), ``step_size`` h > 0: a float or an (N,) tensor.
    An HMC trajectory of L steps is :func:`hmc_momentum`, then L - 1 of these, then :func:`hmc_accept_`."""
    fmt = _state(x)
    _validate.output(p, x, "p")  # updated in place: x's dtype, shape, device and layout, never copied
    score = _validate.like(score, "score", x, fmt)
    _validate.no_grad_needed("hmc_leapfrog_", x, p, score)
    _validate.overwritable(x, "x")
    step_size = _step(step_size, x)
    _distinct([((p, "p"), (x, "x")), ((p, "p"), (score, "score")), ((x, "x"), (score, "score"))])
    if x.numel():
        _leapfrog(x, p, score, _step_coef(step_size, x, "hmc"))
    return x


def _accept_args(x, score, energy, x_prop, score_prop, energy_prop, what: str):
    fmt = _state(x)
    _validate.output(score, x, "score")  # updated in place: x's dtype, shape, device and layout, never copied
    x_prop = _validate.like(x_prop, "x_prop", x, fmt)
    score_prop = _validate.like(score_prop, "score_prop", x, fmt)
    energy = _per_sample(energy, "energy", x, out=True)
    energy_prop = _per_sample(energy_prop, "energy_prop", x)
    _validate.no_grad_needed(what, x, score, x_prop, score_prop)
    _validate.overwritable(x, "x")
    _distinct(
        [
            ((x_prop, "x_prop"), (x, "x")),
            ((score_prop, "score_prop"), (score, "score")),
            ((score, "score"), (x, "x")),
            ((energy_prop, "energy_prop"), (energy, "energy")),
        ]
    )
    return x_prop, score_prop, energy, energy_prop


def _decision_outputs(x: Tensor, accepted, log_alpha) -> tuple[Tensor, Tensor]:
    N = x.shape[0]
    accepted = torch.empty(N, dtype=torch.bool, device=x.device) if accepted is None else accepted
    log_alpha = torch.empty(N, dtype=torch.float64, device=x.device) if log_alpha is None else log_alpha
    return (
        _per_sample(accepted, "accepted", x, out=True, dtype=torch.bool),
        _per_sample(log_alpha, "log_alpha", x, out=True),
    )


def mala_accept_(
    x: Tensor,
    score: Tensor,
    energy: Tensor,
    x_prop: Tensor,
    score_prop: Tensor,
    energy_prop: Tensor,
    z_sq: Tensor,
    step_size,
    *,
    seed: int,
    counter: int = 0,
    sample_offset: int = 0,
    accepted: Tensor | None = None,
    log_alpha: Tensor | None = None,
) -> Decision:
    r"""MALA's Metropolis-Hastings test in one fused call; the accepted samples' x, score and energy are
    replaced in place by the proposal's. Returns :class:`Decision` ``(accepted, log_alpha)``.

    .. math::
        \log\alpha = E(x) - E(x') + \tfrac12 |z|^2 - \frac{|x - x' - \epsilon s(x')|^2}{4\epsilon}, \qquad
        \text{accept} \iff \log u \le \log\alpha

    (:math:`4\epsilon` is :math:`2c^2` with the proposal's rounded :math:`c = \sqrt{2\epsilon}`).
    ``x``, ``score`` (the chain's state and its cached score, updated in place: one dtype and layout,
    contiguous or channels_last), ``energy`` ((N,) float64, updated in place); ``x_prop``, ``score_prop``,
    ``energy_prop``: the proposal from :func:`mala_propose` and the network's energy and score there;
    ``z_sq``: the proposal's :math:`|z|^2`; ``step_size`` the proposal's; ``seed``, ``counter``,
    ``sample_offset`` the proposal's too (the uniforms are a stream of their own: see
    :func:`counter_uniform_ref`). ``accepted`` ((N,) bool), ``log_alpha`` ((N,) float64): optional
    preallocated results. A NaN log-ratio (a NaN or infinite energy at the proposal) is rejected.
    """
    x_prop, score_prop, energy, energy_prop = _accept_args(
        x, score, energy, x_prop, score_prop, energy_prop, "mala_accept_"
    )
    z_sq = _per_sample(z_sq, "z_sq", x)
    step_size = _step(step_size, x)
    key = _key(seed, counter, sample_offset, x)
    accepted, log_alpha = _decision_outputs(x, accepted, log_alpha)
    if x.shape[0]:
        coef = _step_coef(step_size, x, "mala")
        _accept(x, score, energy, x_prop, score_prop, energy_prop, None, z_sq, coef, *key, accepted, log_alpha)
    return Decision(accepted, log_alpha)


def hmc_accept_(
    x: Tensor,
    score: Tensor,
    energy: Tensor,
    x_prop: Tensor,
    score_prop: Tensor,
    energy_prop: Tensor,
    p: Tensor,
    p_sq: Tensor,
    step_size,
    *,
    seed: int,
    counter: int = 0,
    sample_offset: int = 0,
    accepted: Tensor | None = None,
    log_alpha: Tensor | None = None,
) -> Decision:
    r"""HMC's Metropolis test in one fused call, with the trajectory's last half kick folded in; the accepted
    samples' x, score and energy are replaced in place by the proposal's. Returns :class:`Decision`.

    .. math::
        \log\alpha = \big(E(x) + \tfrac12|p_0|^2\big) - \big(E(x') + \tfrac12 |p + \tfrac{h}{2} s(x')|^2\big)

    ``p``: the momentum after the trajectory's last full step (:func:`hmc_momentum` /
    :func:`hmc_leapfrog_`), ``p_sq``: :func:`hmc_momentum`'s :math:`|p_0|^2`; the rest as
    :func:`mala_accept_` (``seed``, ``counter``, ``sample_offset`` and ``step_size`` of the trajectory)."""
    x_prop, score_prop, energy, energy_prop = _accept_args(
        x, score, energy, x_prop, score_prop, energy_prop, "hmc_accept_"
    )
    p = _validate.like(p, "p", x, _state(x))
    _validate.no_grad_needed("hmc_accept_", p)
    p_sq = _per_sample(p_sq, "p_sq", x)
    step_size = _step(step_size, x)
    key = _key(seed, counter, sample_offset, x)
    accepted, log_alpha = _decision_outputs(x, accepted, log_alpha)
    if x.shape[0]:
        coef = _step_coef(step_size, x, "hmc")
        _accept(x, score, energy, x_prop, score_prop, energy_prop, p, p_sq, coef, *key, accepted, log_alpha)
    return Decision(accepted, log_alpha)
