"""MALA and HMC steps (fastscore.ops.metropolis) in Triton: the proposal, the leapfrog step and the accept step.

The contract (argument shapes, dtypes, conventions) is section 2 of fastscore/ops/metropolis.py; the arithmetic
and the order of every sum is csrc/include/metropolis_math.h, repeated here operation for operation (the
normals are langevin_step's generator, imported from kernels/langevin_step.py), so every result is the same
bits as the C++ kernels' and the PyTorch reference's. Every launch passes enable_fp_fusion=False: a multiply
followed by an add stays two roundings.

    propose    x' = (x + a s) + c z, or p = z + b s, x' = x + c p;   program per (sample, piece): the piece's
               sum of z^2 by the halving tree -> partials (N, P)
    pieces     per sample, the pieces' partials left to right        program per sample
    leapfrog   p = p + a s, x = x + c p                              program per (sample, block)
    accept     1. per piece the sum of r^2 (MALA) or k^2 (HMC)       program per (sample, piece) -> partials
               2. per sample the sum, log alpha, the uniform, the decision, the energy
                                                                     program per sample
               3. x, score <- x_prop, score_prop where accepted      program per (sample, block)

A piece is PIECE = 1024 logical elements of a sample; a program sums it in a block of the next power of two
at least its length (a wider block's extra levels add exact zeros: the same tree). Activations are (N, ...)
with sample n at n * D; logical element i at (i // L) * row_stride + (i % L) * es within its sample.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .langevin_step import _INTERPRET
from .langevin_step import _cast
from .langevin_step import _i64
from .langevin_step import _key
from .langevin_step import _launch_options
from .langevin_step import _layout
from .langevin_step import _normal_at
from .langevin_step import _philox
from .langevin_step import _words

PIECE = 1024  # fastscore.ops.metropolis.PIECE, csrc/include/metropolis_math.h's kPiece
_COPY_BLOCK = 4096 if _INTERPRET else 1024
_WARPS = 4


@triton.jit
def _tree_sum(q, WIDTH: tl.constexpr, LEVELS: tl.constexpr):
    """The halving tree of q (WIDTH = 2^LEVELS float64 values): q[k] += q[k + h] for h = WIDTH / 2, ..., 1."""
    for level in tl.static_range(LEVELS):
        q = tl.sum(tl.reshape(q, (2, WIDTH >> (level + 1))), axis=0)  # row 0 + row 1: one add per slot
    return tl.sum(q, axis=0)  # the one value left


@triton.jit
def _logical_offsets(n, i, D, L, row_stride, es):
    r = i // L
    return n * D + r * row_stride + (i - r * L) * es


@triton.jit(do_not_specialize=["k0", "k1", "c2", "c3", "e_base"])
def _propose_kernel(
    x_ptr,  # (N, ...) read
    score_ptr,  # (N, ...) x's layout and dtype
    coef_ptr,  # (N, 3) rows (a, b, c), compute dtype, row stride coef_stride
    xout_ptr,  # (N, ...) out
    pout_ptr,  # (N, ...) out when HMC, else a placeholder
    part_ptr,  # (N, P) float64 out: per piece the sum of z^2
    D,
    L,
    row_stride,
    es,
    coef_stride,
    P,
    k0,
    k1,
    c2,
    c3,
    e_base,  # sample_offset * D (a 64-bit pattern)
    HMC: tl.constexpr,
    WIDTH: tl.constexpr,  # a power of two >= the piece's length
    LEVELS: tl.constexpr,  # log2(WIDTH)
):
    n = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1).to(tl.int64)
    i = piece * WIDTH + tl.arange(0, WIDTH)
    valid = i < D
    off = _logical_offsets(n, i, D, L, row_stride, es)
    acc_ty = coef_ptr.dtype.element_ty
    a = tl.load(coef_ptr + n * coef_stride)
    b = tl.load(coef_ptr + n * coef_stride + 1)
    c = tl.load(coef_ptr + n * coef_stride + 2)
    x = tl.load(x_ptr + off, mask=valid, other=0.0).to(acc_ty)
    s = tl.load(score_ptr + off, mask=valid, other=0.0).to(acc_ty)
    u0, u1, u2, u3 = _key(k0, k1, c2, c3)
    e = e_base.to(tl.int64).to(tl.uint64, bitcast=True) + (n * D + i).to(tl.uint64)
    z32 = _normal_at(e, u0, u1, u2, u3)
    z = z32.to(acc_ty)
    if HMC:
        p = _cast(z + b * s, pout_ptr.dtype.element_ty)
        tl.store(pout_ptr + off, p, mask=valid)
        out = x + c * p.to(acc_ty)
    else:
        out = (x + a * s) + c * z
    tl.store(xout_ptr + off, _cast(out, xout_ptr.dtype.element_ty), mask=valid)
    z64 = z32.to(tl.float64)
    q = tl.where(valid, z64 * z64, 0.0)
    tl.store(part_ptr + n * P + piece, _tree_sum(q, WIDTH, LEVELS))


@triton.jit
def _pieces_kernel(part_ptr, out_ptr, P):
    """out[n] = the pieces' partials of sample n added left to right. Grid: (N,)."""
    n = tl.program_id(0).to(tl.int64)
    t = tl.load(part_ptr + n * P)
    for j in range(1, P):
        t = t + tl.load(part_ptr + n * P + j)
    tl.store(out_ptr + n, t)


@triton.jit
def _leapfrog_kernel(x_ptr, p_ptr, score_ptr, coef_ptr, D, coef_stride, BLOCK: tl.constexpr):
    """p = p + a s, x = x + c p over BLOCK memory positions of sample n. Grid: (N, cdiv(D, BLOCK))."""
    n = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < D
    off = n * D + i
    acc_ty = coef_ptr.dtype.element_ty
    a = tl.load(coef_ptr + n * coef_stride)
    c = tl.load(coef_ptr + n * coef_stride + 2)
    p = tl.load(p_ptr + off, mask=valid, other=0.0).to(acc_ty)
    s = tl.load(score_ptr + off, mask=valid, other=0.0).to(acc_ty)
    x = tl.load(x_ptr + off, mask=valid, other=0.0).to(acc_ty)
    p_new = _cast(p + a * s, p_ptr.dtype.element_ty)
    tl.store(p_ptr + off, p_new, mask=valid)
    tl.store(x_ptr + off, _cast(x + c * p_new.to(acc_ty), x_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _terms_kernel(
    x_ptr,
    xprop_ptr,
    sprop_ptr,
    p_ptr,  # (N, ...) when HMC, else a placeholder
    coef_ptr,
    part_ptr,  # (N, P) float64 out
    D,
    L,
    row_stride,
    es,
    coef_stride,
    P,
    HMC: tl.constexpr,
    WIDTH: tl.constexpr,
    LEVELS: tl.constexpr,
):
    """Per piece, the sum of r^2 = ((x - x') - a s')^2 (MALA) or k^2 = (p + b s')^2 (HMC). Grid: (N, P)."""
    n = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1).to(tl.int64)
    i = piece * WIDTH + tl.arange(0, WIDTH)
    valid = i < D
    off = _logical_offsets(n, i, D, L, row_stride, es)
    acc_ty = coef_ptr.dtype.element_ty
    sp = tl.load(sprop_ptr + off, mask=valid, other=0.0).to(acc_ty)
    if HMC:
        b = tl.load(coef_ptr + n * coef_stride + 1)
        v = tl.load(p_ptr + off, mask=valid, other=0.0).to(acc_ty) + b * sp
    else:
        a = tl.load(coef_ptr + n * coef_stride)
        x = tl.load(x_ptr + off, mask=valid, other=0.0).to(acc_ty)
        xp = tl.load(xprop_ptr + off, mask=valid, other=0.0).to(acc_ty)
        v = (x - xp) - a * sp
    v64 = v.to(tl.float64)
    q = tl.where(valid, v64 * v64, 0.0)
    tl.store(part_ptr + n * P + piece, _tree_sum(q, WIDTH, LEVELS))


@triton.jit(do_not_specialize=["k0", "k1", "c2", "c3", "sample_offset"])
def _decide_kernel(
    part_ptr,  # (N, P) float64
    energy_ptr,  # (N,) float64, updated
    eprop_ptr,  # (N,) float64
    sq_ptr,  # (N,) float64: |z|^2 or |p0|^2
    coef_ptr,
    acc_ptr,  # (N,) bool out
    la_ptr,  # (N,) float64 out
    P,
    coef_stride,
    k0,
    k1,
    c2,
    c3,
    sample_offset,
    HMC: tl.constexpr,
):
    """Per sample: the sum, log alpha, the uniform, the decision; the energy replaced where accepted. Grid: (N,)."""
    n = tl.program_id(0).to(tl.int64)
    t = tl.load(part_ptr + n * P)
    for j in range(1, P):
        t = t + tl.load(part_ptr + n * P + j)
    e = tl.load(energy_ptr + n)
    ep = tl.load(eprop_ptr + n)
    head = (e - ep) + 0.5 * tl.load(sq_ptr + n)
    if HMC:
        la = head - 0.5 * t
    else:
        c = tl.load(coef_ptr + n * coef_stride + 2).to(tl.float64)
        la = head - t / (2.0 * (c * c))  # float64 division is IEEE (div.rn.f64) on every target
    # The uniform of global sample g: Philox block (lo(g), hi(g) | 2^31) at the call's counter.
    g = (sample_offset.to(tl.int64) + n).to(tl.uint64, bitcast=True)
    u0, u1, u2, u3 = _key(k0, k1, c2, c3)
    w0, w1, _, _ = _philox(g.to(tl.uint32), (g >> 32).to(tl.uint32) | 0x80000000, u2, u3, u0, u1)
    u53 = (w0.to(tl.uint64) << 21) | (w1 >> 11).to(tl.uint64)
    u = (u53 + 1).to(tl.float64) * 1.1102230246251565e-16  # 2^-53
    yes = tl.log(u) <= la
    tl.store(la_ptr + n, la)
    tl.store(acc_ptr + n, yes)
    tl.store(energy_ptr + n, tl.where(yes, ep, e))


@triton.jit
def _copy_kernel(x_ptr, score_ptr, xprop_ptr, sprop_ptr, acc_ptr, D, BLOCK: tl.constexpr):
    """x[n], score[n] <- x_prop[n], score_prop[n] where accepted[n], over BLOCK memory positions."""
    n = tl.program_id(0).to(tl.int64)
    end = tl.where(tl.load(acc_ptr + n) != 0, D, 0)  # a rejected sample moves nothing
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    move = i < end
    off = n * D + i
    tl.store(x_ptr + off, tl.load(xprop_ptr + off, mask=move), mask=move)
    tl.store(score_ptr + off, tl.load(sprop_ptr + off, mask=move), mask=move)


# ---- launchers (the custom ops' contract) -------------------------------------------------------------------


def _width(D: int) -> tuple[int, int, int]:
    """(pieces P, block width, log2 of it): one block per piece, as narrow as the pieces allow."""
    P = -(-D // PIECE)
    width = PIECE if P > 1 else 1 << max(0, (D - 1).bit_length())
    return P, width, width.bit_length() - 1


def _warps(width: int) -> int:
    return max(1, min(_WARPS, width // 32))


def propose(x, score, coef, seed: int, counter: int, sample_offset: int, x_out, p_out, sq_out) -> None:
    """Without p_out: x_out = (x + a s) + c z; with it: p_out = z + b s, x_out = x + c p_out; sq_out = sum z^2."""
    N, D, L, row_stride, es = _layout(x, "x")
    if N == 0:
        return
    if D == 0:
        sq_out.zero_()
        return
    P, width, levels = _width(D)
    partials = sq_out.view(N, 1) if P == 1 else torch.empty((N, P), dtype=torch.float64, device=x.device)
    k0, k1, c2, c3 = _words(seed, counter)
    _propose_kernel[(N, P)](
        x,
        score,
        coef,
        x_out,
        p_out if p_out is not None else x_out,
        partials,
        D,
        L,
        row_stride,
        es,
        coef.stride(0),
        P,
        k0,
        k1,
        c2,
        c3,
        _i64(sample_offset * D),
        HMC=p_out is not None,
        WIDTH=width,
        LEVELS=levels,
        num_warps=_warps(width),
        **_launch_options(),
    )
    if P > 1:
        _pieces_kernel[(N,)](partials, sq_out, P, num_warps=1)


def leapfrog(x, p, score, coef) -> None:
    """p = p + a s, x = x + c p, in place."""
    N, D, *_ = _layout(x, "x")
    if N == 0 or D == 0:
        return
    _leapfrog_kernel[(N, triton.cdiv(D, _COPY_BLOCK))](
        x, p, score, coef, D, coef.stride(0), BLOCK=_COPY_BLOCK, num_warps=_WARPS, **_launch_options()
    )


def accept(
    x,
    score,
    energy,
    x_prop,
    score_prop,
    energy_prop,
    p,
    sq,
    coef,
    seed: int,
    counter: int,
    sample_offset: int,
    accepted,
    log_alpha,
) -> None:
    """The accept step: log alpha per sample, the decision, and x, score, energy replaced where accepted."""
    N, D, L, row_stride, es = _layout(x, "x")
    if N == 0:
        return
    P, width, levels = _width(D)
    hmc = p is not None
    if D == 0:
        partials = torch.zeros((N, 1), dtype=torch.float64, device=x.device)
        P = 1
    else:
        partials = torch.empty((N, P), dtype=torch.float64, device=x.device)
        _terms_kernel[(N, P)](
            x,
            x_prop,
            score_prop,
            p if hmc else x,
            coef,
            partials,
            D,
            L,
            row_stride,
            es,
            coef.stride(0),
            P,
            HMC=hmc,
            WIDTH=width,
            LEVELS=levels,
            num_warps=_warps(width),
            **_launch_options(),
        )
    k0, k1, c2, c3 = _words(seed, counter)
    _decide_kernel[(N,)](
        partials,
        energy,
        energy_prop,
        sq,
        coef,
        accepted,
        log_alpha,
        P,
        coef.stride(0),
        k0,
        k1,
        c2,
        c3,
        sample_offset,
        HMC=hmc,
        num_warps=1,
        **_launch_options(),
    )
    if D:
        _copy_kernel[(N, triton.cdiv(D, _COPY_BLOCK))](
            x, score, x_prop, score_prop, accepted, D, BLOCK=_COPY_BLOCK, num_warps=_WARPS
        )
