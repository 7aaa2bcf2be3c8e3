"""Philox4x32-10 and Box-Muller in pure PyTorch: the counter-based normal generator of the Langevin kernels,
bit for bit (csrc/include/langevin_step_math.h is the arithmetic; fastscore.ops.langevin_step.counter_randn_ref
lays the normals out over a batch).

Integer arithmetic on uint32 words is emulated in int64 tensors (values kept in [0, 2^32)); float arithmetic
in float32, one rounding per tensor operation, in exactly the order of the C++ header.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_H = float.fromhex  # the constants are exact float32 values, spelled as in the C++ header
_ATANH_R = [_H(h) for h in ("0x1.30ab7p-2", "0x1.996b86p-2", "0x1.55556cp-1")]  # 2 atanh(s) = 2 s + s^3 R(s^2)
_LN2_LO, _LN2_HI = _H("-0x1.bd0106p-13"), _H("0x1.63p-1")
_SIN_P = [_H(h) for h in ("0x1.507834p+5", "-0x1.32d2ccp+6", "0x1.466bc6p+6", "-0x1.4abbcep+5", "0x1.921fb6p+2")]
_COS_P = [_H(h) for h in ("-0x1.a6d1f2p+4", "0x1.e1f506p+5", "-0x1.55d3c8p+6", "0x1.03c1f0p+6", "-0x1.3bd3ccp+4")]


def _mulhilo32(m: int, c: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product m * c, with every intermediate below 2^49."""
    t_hi = (c >> 16) * m  # m * c = t_hi * 2^16 + t_lo
    t_lo = (c & 0xFFFF) * m
    hi = (t_hi + (t_lo >> 16)) >> 16
    lo = (((t_hi & 0xFFFF) << 16) + t_lo) & MASK32
    return hi, lo


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int) -> tuple[Tensor, ...]:
    """Philox4x32-10 (Salmon et al. 2011) of the counter words (int64 tensors holding uint32 values) under
    the key (k0, k1). Returns the four output words, as int64 tensors in [0, 2^32)."""
    for _ in range(10):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _horner(coefs: list[float], t: Tensor) -> Tensor:
    y = torch.full_like(t, coefs[0])
    for c in coefs[1:]:
        y = y * t + c
    return y


def _log_unit(u: Tensor) -> Tensor:
    """ln u for float32 u in [2^-32, 1]: log_unit of the header (2 atanh((m - 1) / (m + 1)) + k ln 2)."""
    bits = u.view(torch.int32)
    k = (bits >> 23) - 127
    mbits = (bits & 0x007FFFFF) | 0x3F800000
    high = mbits > 0x3FB504F3
    mbits = torch.where(high, mbits - 0x00800000, mbits)
    k = torch.where(high, k + 1, k)
    m = mbits.view(torch.float32)
    s = (m - 1.0) / (m + 1.0)
    w = s * s
    fk = k.to(torch.float32)
    y = (s * w) * _horner(_ATANH_R, w) + fk * _LN2_LO
    y = (s + s) + y
    return y + fk * _LN2_HI


def _sincos_turns(v: Tensor) -> tuple[Tensor, Tensor]:
    """(sin, cos) of 2 pi v / 2^24 for integers v in [0, 2^24): sincos_turns of the header."""
    q = (v + (1 << 21)) >> 22
    t = (v - (q << 22)).to(torch.float32) * 2.0**-24
    p = t * t
    st = _horner(_SIN_P, p) * t
    ct = _horner(_COS_P, p) * p + 1.0
    swap = (q & 1) != 0
    cc, ss = torch.where(swap, st, ct), torch.where(swap, ct, st)
    c = torch.where(((q + 1) & 2) != 0, -cc, cc)
    s = torch.where((q & 2) != 0, -ss, ss)
    return s, c


def box_muller(wa: Tensor, wb: Tensor) -> tuple[Tensor, Tensor]:
    u1 = (wa >> 1).to(torch.float32) * 2.0**-31 + 2.0**-32  # (0, 1]
    # A correctly rounded float32 sqrt: torch.sqrt on CPU float32 is not (about 1 in 140 results differs);
    # the float64 root rounded once to float32 is (53 >= 2 * 24 + 2 bits: the double rounding is innocuous).
    r = torch.sqrt(_log_unit(u1).to(torch.float64) * -2.0).to(torch.float32)
    s, c = _sincos_turns(wb >> 8)
    return r * c, r * s
