"""Langevin / SDE sampler updates (fastscore.ops.langevin_step) in Triton, noise generated in the kernel.

The contract (argument shapes, dtypes, conventions) is section 3 of fastscore/ops/langevin_step.py; the
generator -- Philox4x32-10 keyed by (seed, counter), indexed by the global element index
e = (sample_offset + n) * D + i, Box-Muller in float32 with the header's own ln and sincos -- is
csrc/include/langevin_step_math.h, repeated here operation for operation, so the noise is the same bits
as the C++ kernels' and the PyTorch reference's. Every launch passes enable_fp_fusion=False: a multiply
followed by an add must stay two roundings (an FMA would change the bits).

    update   x_mean = a x + b score, x = x_mean + c z (+ mask)   program per (sample, block of elements)
    norms    per-sample sums of score^2 and z^2                  program per (sample, piece): partial sums
    randn    the noise itself                                    program per block of a flat tensor

Each program owns a block of logical elements i of one sample and computes its own Philox block per
element (e // 4; four lanes share a block, and compute it four times: cheap next to the memory traffic on
a GPU, and it keeps every lane independent). Activations are (N, ...) with sample n at n * D; logical
element i sits at memory offset (i // L) * row_stride + (i % L) * es within its sample: contiguous
(L = D, es = 1) or channels_last (N, C, H, W) (L = H * W, row_stride = 1, es = C).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_H = float.fromhex  # exact float32 values, as the header's hex literals
_R0 = tl.constexpr(_H("0x1.30ab7p-2"))  # 2 atanh(s) = 2 s + s^3 (R2 + R1 w + R0 w^2), w = s^2
_R1 = tl.constexpr(_H("0x1.996b86p-2"))
_R2 = tl.constexpr(_H("0x1.55556cp-1"))
_LN2_LO = tl.constexpr(_H("-0x1.bd0106p-13"))
_LN2_HI = tl.constexpr(_H("0x1.63p-1"))
_S9 = tl.constexpr(_H("0x1.507834p+5"))
_S7 = tl.constexpr(_H("-0x1.32d2ccp+6"))
_S5 = tl.constexpr(_H("0x1.466bc6p+6"))
_S3 = tl.constexpr(_H("-0x1.4abbcep+5"))
_S1 = tl.constexpr(_H("0x1.921fb6p+2"))
_C10 = tl.constexpr(_H("-0x1.a6d1f2p+4"))
_C8 = tl.constexpr(_H("0x1.e1f506p+5"))
_C6 = tl.constexpr(_H("-0x1.55d3c8p+6"))
_C4 = tl.constexpr(_H("0x1.03c1f0p+6"))
_C2 = tl.constexpr(_H("-0x1.3bd3ccp+4"))

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter runs a program's block as NumPy arrays: bigger blocks, fewer Python-level programs.
_BLOCK = 4096 if _INTERPRET else 1024
NORM_PIECE = _BLOCK  # elements per program of the norms pass (the split fastscore.ops chooses)
_WARPS = 4

# ---- the generator (csrc/include/langevin_step_math.h) ----------------------------------------------------


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of the uint32 counter words (c0, c1, c2, c3) under the uint32 key (k0, k1)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _log_unit(u):
    # ln u for float32 u in [2^-32, 1]: log_unit of the header (2 atanh((m - 1) / (m + 1)) + k ln 2).
    bits = u.to(tl.int32, bitcast=True)
    k = (bits >> 23) - 127
    mbits = (bits & 0x007FFFFF) | 0x3F800000
    high = mbits > 0x3FB504F3
    mbits = tl.where(high, mbits - 0x00800000, mbits)
    k = tl.where(high, k + 1, k)
    m = mbits.to(tl.float32, bitcast=True)
    s = tl.div_rn(m - 1.0, m + 1.0)  # plain `/` is a 2-ulp approximation on NVIDIA GPUs
    w = s * s
    r = w * _R0 + _R1
    r = r * w + _R2
    fk = k.to(tl.float32)
    y = (s * w) * r + fk * _LN2_LO
    y = (s + s) + y
    return y + fk * _LN2_HI


@triton.jit
def _sincos_turns(v):
    # (sin, cos) of 2 pi v / 2^24 for int32 v in [0, 2^24): sincos_turns of the header.
    q = (v + (1 << 21)) >> 22
    t = (v - (q << 22)).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
    p = t * t
    sp = p * _S9 + _S7
    sp = sp * p + _S5
    sp = sp * p + _S3
    sp = sp * p + _S1
    st = sp * t
    cp = p * _C10 + _C8
    cp = cp * p + _C6
    cp = cp * p + _C4
    cp = cp * p + _C2
    ct = cp * p + 1.0
    swap = (q & 1) != 0
    cc = tl.where(swap, st, ct)
    ss = tl.where(swap, ct, st)
    c = tl.where(((q + 1) & 2) != 0, -cc, cc)
    s = tl.where((q & 2) != 0, -ss, ss)
    return s, c


@triton.jit
def _normal_at(e, k0, k1, c2, c3):
    """The float32 normal of global element e (uint64 tensor) under key (k0, k1) and counter words (c2, c3)."""
    block = e >> 2
    w0, w1, w2, w3 = _philox(block.to(tl.uint32), (block >> 32).to(tl.uint32), c2, c3, k0, k1)
    second = (e & 2) != 0
    wa = tl.where(second, w2, w0)
    wb = tl.where(second, w3, w1)
    u1 = (wa >> 1).to(tl.int32).to(tl.float32) * 4.656612873077393e-10 + 2.3283064365386963e-10  # 2^-31, 2^-32
    r = tl.sqrt_rn(_log_unit(u1) * -2.0)  # correctly rounded (tl.sqrt is approximate on GPUs)
    s, c = _sincos_turns((wb >> 8).to(tl.int32))
    return tl.where((e & 1) != 0, r * s, r * c)


@triton.jit
def _cast(v, dtype: tl.constexpr):
    # Into the storage dtype, rounding to nearest even. bfloat16 by hand, as c10::BFloat16 does it (the
    # interpreter's own float32 -> bfloat16 conversion does not round to nearest even).
    if dtype == tl.bfloat16:
        v = v.to(tl.float32)
        bits = v.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)
        out = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(dtype)
    return out


@triton.jit
def _key(k0, k1, c2, c3):
    # The four 32-bit words arrive as int32 (bit patterns): reinterpret as uint32.
    return (
        k0.to(tl.uint32, bitcast=True),
        k1.to(tl.uint32, bitcast=True),
        c2.to(tl.uint32, bitcast=True),
        c3.to(tl.uint32, bitcast=True),
    )


# ---- kernels --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["k0", "k1", "c2", "c3", "e_base"])
def _langevin_step_update_kernel(
    x_ptr,  # (N, ...) updated in place
    score_ptr,  # (N, ...) x's layout and dtype
    noise_ptr,  # (N, ...) x's layout and dtype, or a placeholder when not HAS_NOISE
    coef_ptr,  # (N, 3) rows (a, b, c), compute dtype, row stride coef_stride
    mask_ptr,  # (1 or N, ...) x's layout and dtype, or a placeholder when not HAS_MASK
    known_ptr,  # likewise
    xmean_ptr,  # (N, ...) out, or a placeholder when not HAS_XMEAN
    D,
    L,
    row_stride,
    es,
    coef_stride,
    mask_sn,  # 0 (one mask shared by every sample) or D
    known_sn,
    k0,
    k1,
    c2,
    c3,
    e_base,  # sample_offset * D (a 64-bit pattern)
    HAS_NOISE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_XMEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r"""x_mean = a x + b score, x = x_mean + c z, then x = m k + (1 - m) x, for BLOCK logical elements of
    sample n; z = noise or the counter-based normal of e = e_base + n D + i. Grid: (N, cdiv(D, BLOCK))."""
    n = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = i < D
    r = i // L
    within = r * row_stride + (i - r * L) * es
    off = n * D + within
    acc_ty = coef_ptr.dtype.element_ty
    a = tl.load(coef_ptr + n * coef_stride)
    b = tl.load(coef_ptr + n * coef_stride + 1)
    c = tl.load(coef_ptr + n * coef_stride + 2)
    x = tl.load(x_ptr + off, mask=valid, other=0.0).to(acc_ty)
    g = tl.load(score_ptr + off, mask=valid, other=0.0).to(acc_ty)
    if HAS_NOISE:
        z = tl.load(noise_ptr + off, mask=valid, other=0.0).to(acc_ty)
    else:
        u0, u1, u2, u3 = _key(k0, k1, c2, c3)
        e = e_base.to(tl.int64).to(tl.uint64, bitcast=True) + (n * D + i).to(tl.uint64)
        z = _normal_at(e, u0, u1, u2, u3).to(acc_ty)
    mean = a * x + b * g
    if HAS_XMEAN:
        tl.store(xmean_ptr + off, _cast(mean, xmean_ptr.dtype.element_ty), mask=valid)
    out = mean + c * z
    if HAS_MASK:
        m = tl.load(mask_ptr + n * mask_sn + within, mask=valid, other=0.0).to(acc_ty)
        kn = tl.load(known_ptr + n * known_sn + within, mask=valid, other=0.0).to(acc_ty)
        out = m * kn + (1.0 - m) * out
    tl.store(x_ptr + off, _cast(out, x_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["k0", "k1", "c2", "c3", "e_base"])
def _langevin_step_norms_kernel(
    score_ptr,  # (N, ...) any supported layout: read in memory order
    noise_ptr,  # (N, ...) or a placeholder when not HAS_NOISE
    out_ptr,  # (N, P, 2) float64: per piece of a sample, the sums of score^2 and z^2
    D,
    P,
    PIECE,  # ceil(D / P) memory positions per piece
    k0,
    k1,
    c2,
    c3,
    e_base,
    HAS_NOISE: tl.constexpr,
    ACC_F64: tl.constexpr,  # sum in float64 (float64 score), else float32
    BLOCK: tl.constexpr,
):
    """Sums of squares over piece p of sample n, in BLOCK steps (memory order: a sum of squares does not care
    which element is which). Grid: (N, P)."""
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    lo = tl.minimum(p * PIECE, D)
    hi = tl.minimum(lo + PIECE, D)
    sg = tl.zeros((BLOCK,), dtype=acc_ty)
    sz = tl.zeros((BLOCK,), dtype=acc_ty)
    if not HAS_NOISE:
        u0, u1, u2, u3 = _key(k0, k1, c2, c3)
    for start in range(lo, hi, BLOCK):
        i = start + tl.arange(0, BLOCK)
        valid = i < hi
        g = tl.load(score_ptr + n * D + i, mask=valid, other=0.0).to(acc_ty)
        if HAS_NOISE:
            z = tl.load(noise_ptr + n * D + i, mask=valid, other=0.0).to(acc_ty)
        else:
            e = e_base.to(tl.int64).to(tl.uint64, bitcast=True) + (n * D + i).to(tl.uint64)
            z = tl.where(valid, _normal_at(e, u0, u1, u2, u3), 0.0).to(acc_ty)
        sg += g * g
        sz += z * z
    base = (n * P + p) * 2
    tl.store(out_ptr + base, tl.sum(sg, axis=0).to(tl.float64))
    tl.store(out_ptr + base + 1, tl.sum(sz, axis=0).to(tl.float64))


@triton.jit(do_not_specialize=["k0", "k1", "c2", "c3", "e_base"])
def _langevin_step_randn_kernel(
    out_ptr,  # (total,) contiguous, any float dtype
    total,
    k0,
    k1,
    c2,
    c3,
    e_base,
    BLOCK: tl.constexpr,
):
    """out[j] = the normal of global element e_base + j. Grid: (cdiv(total, BLOCK),)."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = j < total
    u0, u1, u2, u3 = _key(k0, k1, c2, c3)
    z = _normal_at(e_base.to(tl.int64).to(tl.uint64, bitcast=True) + j.to(tl.uint64), u0, u1, u2, u3)
    tl.store(out_ptr + j, _cast(z, out_ptr.dtype.element_ty), mask=valid)


# ---- launchers (the custom ops' contract) -------------------------------------------------------------------


def _i32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


def _words(seed: int, counter: int) -> tuple[int, int, int, int]:
    """(seed_lo, seed_hi, counter_lo, counter_hi) as int32 bit patterns."""
    return _i32(seed), _i32(seed >> 32), _i32(counter), _i32(counter >> 32)


def _i64(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= (1 << 63) else v


def _layout(t: torch.Tensor, name: str):
    """(N, D, L, row_stride, es) of a contiguous or channels_last tensor (see the module docstring)."""
    N = t.shape[0]
    D = t[0].numel() if N else 0
    if t.is_contiguous():
        return N, D, max(D, 1), max(D, 1), 1
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return N, D, t.shape[2] * t.shape[3], 1, t.shape[1]
    raise ValueError(f"{name}: expected a contiguous or channels_last tensor")


def _launch_options() -> dict:
    return {} if _INTERPRET else {"enable_fp_fusion": False}


def update(x, score, coef, noise, seed: int, counter: int, sample_offset: int, mask, known, x_mean) -> None:
    """x_mean = a x + b score, x = x_mean + c z (+ mask), in place; coef (N, 3) rows (a, b, c)."""
    N, D, L, row_stride, es = _layout(x, "x")
    if x.numel() == 0:
        return
    k0, k1, c2, c3 = _words(seed, counter)
    _langevin_step_update_kernel[(N, triton.cdiv(D, _BLOCK))](
        x,
        score,
        noise if noise is not None else x,
        coef,
        mask if mask is not None else x,
        known if known is not None else x,
        x_mean if x_mean is not None else x,
        D,
        L,
        row_stride,
        es,
        coef.stride(0),
        0 if mask is None or mask.shape[0] == 1 else D,
        0 if known is None or known.shape[0] == 1 else D,
        k0,
        k1,
        c2,
        c3,
        _i64(sample_offset * D),
        HAS_NOISE=noise is not None,
        HAS_MASK=mask is not None,
        HAS_XMEAN=x_mean is not None,
        BLOCK=_BLOCK,
        num_warps=_WARPS,
        **_launch_options(),
    )


def norms(score, noise, seed: int, counter: int, sample_offset: int, out) -> None:
    """out (N, P, 2) float64 <- per sample and piece of ceil(D / P) memory positions, the sums of score^2 and
    of z^2."""
    N, D, *_ = _layout(score, "score")
    if out.dim() != 3 or out.shape[0] != N or out.shape[1] < 1 or out.shape[2] != 2:
        raise ValueError(f"out: expected an ({N}, P, 2) tensor with P >= 1, got {tuple(out.shape)}")
    if out.dtype != torch.float64 or not out.is_contiguous() or out.device != score.device:
        raise ValueError(f"out: expected a contiguous float64 tensor on {score.device}")
    if N == 0:
        return
    P = out.shape[1]
    k0, k1, c2, c3 = _words(seed, counter)
    _langevin_step_norms_kernel[(N, P)](
        score,
        noise if noise is not None else score,
        out,
        D,
        P,
        max(1, triton.cdiv(D, P)),
        k0,
        k1,
        c2,
        c3,
        _i64(sample_offset * D),
        HAS_NOISE=noise is not None,
        ACC_F64=score.dtype == torch.float64,
        BLOCK=_BLOCK,
        num_warps=_WARPS,
        **_launch_options(),
    )


def randn(out, seed: int, counter: int, sample_offset: int) -> None:
    """Fill the contiguous (N, ...) out with the counter-based normals of its elements."""
    if not out.is_contiguous():
        raise ValueError("out: expected a contiguous tensor")
    if out.numel() == 0:
        return
    D = out[0].numel()
    k0, k1, c2, c3 = _words(seed, counter)
    _langevin_step_randn_kernel[(triton.cdiv(out.numel(), _BLOCK),)](
        out,
        out.numel(),
        k0,
        k1,
        c2,
        c3,
        _i64(sample_offset * D),
        BLOCK=_BLOCK,
        num_warps=_WARPS,
        **_launch_options(),
    )
