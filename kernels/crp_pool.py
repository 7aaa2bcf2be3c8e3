"""RefineNet CRP pooling (fastscore.ops.crp_pool) in Triton: forward, backward and forward-mode (jvp).

The contract (argument shapes, dtypes, return conventions) is section 2 of fastscore/ops/crp_pool.py; the
per-element rules (PyTorch's choice of input within a max window, the /25 of the average) are those of
csrc/include/crp_pool_math.h, which the C++ CPU and CUDA kernels share.

Every kernel works on a 2-D tile [BLOCK_R, BLOCK_W] of one sample: BLOCK_R of its (channel, image row)
pairs by BLOCK_W columns, addressed as ``n * stride_n + c * stride_c + h * stride_h + w * stride_w``. The
pairs are ordered h fastest for NCHW (a tile is a band of image rows; loads coalesce along W, stride 1) and
c fastest for NHWC (a tile is a band of channels; loads coalesce along the rows, stride_c = 1), so one
kernel serves both layouts; Triton specialises the stride equal to 1. The 25 taps of each window are 25
masked loads of shifted tiles (they hit the cache: a tile's rows and its neighbours' read the same
lines); off-image taps load the pad value.

    _crp_pool_kernel            out = max or average of each window; or (max) the code dh * 5 + dw of the
                                input PyTorch's max_pool2d picks, or the tangent x_t at that input
    _crp_pool_max_bwd_kernel    grad_x, gather form: each input sums the gradients of the (at most 25)
                                outputs whose code names it. No scatter, no atomics, no race.

Backward: max runs _crp_pool_kernel for the codes (int8, x's layout), then the gather; avg is the same
box filter of grad_out (the window is symmetric and zero padding is its own adjoint). jvp: max gathers x_t
at each output's chosen input in one pass; avg is the box filter of x_t.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

_MODES = {"max": 0, "avg": 1}
_OUT_VALUE, _OUT_CODE, _OUT_PICK = 0, 1, 2

# ---- kernels ----------------------------------------------------------------------------------------------------


@triton.jit
def _rows(pid_r, C, H, CL: tl.constexpr, BLOCK_R: tl.constexpr):
    """Channel and image row of each tile row: rows are a sample's (c, h) pairs, h fastest (NCHW, so tile rows
    are adjacent image rows) or c fastest (NHWC, so tile rows are adjacent channels: the contiguous axis)."""
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    if CL:
        c = offs_r % C
        h = offs_r // C
    else:
        c = offs_r // H
        h = offs_r % H
    return c, h, offs_r < C * H


@triton.jit
def _crp_pool_kernel(
    src_ptr,  # (N, C, H, W) the pooled tensor: x, or grad_out / x_t for the avg box filter
    t_ptr,  # (N, C, H, W) x_t when OUT == 2 (max jvp), else a placeholder (never read)
    dst_ptr,  # (N, C, H, W) out: the result (OUT 0, 2) or the int8 codes (OUT 1), src's strides
    C,
    H,
    W,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    MODE: tl.constexpr,  # 0 max, 1 avg
    OUT: tl.constexpr,  # 0 the pooled value, 1 (max) the code of the chosen input, 2 (max) x_t there
    CL: tl.constexpr,  # channels_last: order of the tile rows (see _rows)
    IS_F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    r"""The 5x5 window (stride 1, padding 2) of each output of a [BLOCK_R, BLOCK_W] tile of (c, h) rows by columns.

    max: the window is scanned in row-major order from best = -inf, taking a value when ``v > best`` or v is
    NaN (PyTorch's CPU max_pool2d rule): ties keep the first position, a later NaN wins over an earlier one,
    and a window of -inf reports its first in-image position (the initial code). Off-image taps load -inf
    and are never taken. avg: the sum of the in-image taps / 25 (count_include_pad).
    Grid: (N, cdiv(C * H, BLOCK_R), cdiv(W, BLOCK_W)).

    References: csrc/include/crp_pool_math.h (max_takes, argmax5, avg_finish).
    """
    acc_ty = tl.float64 if IS_F64 else tl.float32
    n = tl.program_id(0).to(tl.int64)
    c, h, mask_r = _rows(tl.program_id(1), C, H, CL, BLOCK_R)
    offs_w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = mask_r[:, None] & (offs_w < W)[None, :]
    base = n * stride_n + c.to(tl.int64) * stride_c  # [BLOCK_R]
    if MODE == 0:
        best = tl.full([BLOCK_R, BLOCK_W], float("-inf"), acc_ty)
        code = (tl.maximum(2 - h, 0) * 5)[:, None] + tl.maximum(2 - offs_w, 0)[None, :]  # first in-image tap
    else:
        total = tl.zeros([BLOCK_R, BLOCK_W], dtype=acc_ty)
    for dh in tl.static_range(5):
        i = h - 2 + dh
        row = base + i.to(tl.int64) * stride_h
        row_ok = mask_r & (i >= 0) & (i < H)
        for dw in tl.static_range(5):
            j = offs_w - 2 + dw
            ok = row_ok[:, None] & ((j >= 0) & (j < W))[None, :]
            ptrs = src_ptr + row[:, None] + (j * stride_w)[None, :]
            if MODE == 0:
                v = tl.load(ptrs, mask=ok, other=float("-inf")).to(acc_ty)
                take = (v > best) | (v != v)
                best = tl.where(take, v, best)
                code = tl.where(take, dh * 5 + dw, code)
            else:
                total += tl.load(ptrs, mask=ok, other=0.0).to(acc_ty)
    offs = (base + h.to(tl.int64) * stride_h)[:, None] + (offs_w * stride_w)[None, :]
    if MODE == 1:
        tl.store(dst_ptr + offs, (total / 25.0).to(dst_ptr.dtype.element_ty), mask=mask)
    elif OUT == 0:
        tl.store(dst_ptr + offs, best.to(dst_ptr.dtype.element_ty), mask=mask)
    elif OUT == 1:
        tl.store(dst_ptr + offs, code.to(tl.int8), mask=mask)
    else:
        di = code // 5 - 2
        dj = code % 5 - 2
        picked = tl.load(t_ptr + offs + di * stride_h + dj * stride_w, mask=mask, other=0.0)
        tl.store(dst_ptr + offs, picked.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _crp_pool_max_bwd_kernel(
    code_ptr,  # (N, C, H, W) int8: the code dh * 5 + dw of each output's chosen input, x's strides
    grad_out_ptr,  # (N, C, H, W) x's strides
    grad_x_ptr,  # (N, C, H, W) out, x's strides
    C,
    H,
    W,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    CL: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """grad_x of max pooling for a [BLOCK_R, BLOCK_W] tile of inputs, gather form.

    Input (i, j) is tap (dh, dw) of output (i + 2 - dh, j + 2 - dw); it receives that output's gradient when
    the output's code is dh * 5 + dw. Summed over the 25 taps in a fixed order (no atomics: deterministic).
    Grid: (N, cdiv(C * H, BLOCK_R), cdiv(W, BLOCK_W)).

    References: csrc/include/crp_pool_math.h (routed5).
    """
    acc_ty = tl.float64 if IS_F64 else tl.float32
    n = tl.program_id(0).to(tl.int64)
    c, i, mask_r = _rows(tl.program_id(1), C, H, CL, BLOCK_R)
    offs_w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    base = n * stride_n + c.to(tl.int64) * stride_c
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=acc_ty)
    for dh in tl.static_range(5):
        ho = i + 2 - dh
        row = base + ho.to(tl.int64) * stride_h
        row_ok = mask_r & (ho >= 0) & (ho < H)
        for dw in tl.static_range(5):
            wo = offs_w + 2 - dw
            ok = row_ok[:, None] & ((wo >= 0) & (wo < W))[None, :]
            offs = row[:, None] + (wo * stride_w)[None, :]
            code = tl.load(code_ptr + offs, mask=ok, other=-1)
            g = tl.load(grad_out_ptr + offs, mask=ok, other=0.0).to(acc_ty)
            acc += tl.where(code == dh * 5 + dw, g, 0.0)
    mask = mask_r[:, None] & (offs_w < W)[None, :]
    offs = (base + i.to(tl.int64) * stride_h)[:, None] + (offs_w * stride_w)[None, :]
    tl.store(grad_x_ptr + offs, acc.to(grad_x_ptr.dtype.element_ty), mask=mask)


# ---- launchers --------------------------------------------------------------------------------------------------


class _Geometry(NamedTuple):
    N: int
    C: int
    H: int
    W: int
    strides: tuple[int, int, int, int]
    channels_last: bool
    BLOCK_R: int  # tiles: [BLOCK_R (c, h) rows, BLOCK_W columns]
    BLOCK_W: int
    num_warps: int


_TILE = 2048  # outputs per tile: 16 per thread at 4 warps
# Triton's interpreter (CPU tensors, TRITON_INTERPRET=1: how CI checks these kernels) costs per operation of
# a program, not per element: there, tiles as large as the tensor allows, so few programs run.
_INTERPRETER_TILE = 16384


def _geometry(x: torch.Tensor) -> _Geometry:
    N, C, H, W = x.shape
    if x.is_contiguous():
        channels_last = False
    elif x.is_contiguous(memory_format=torch.channels_last):
        channels_last = True
    else:
        raise ValueError("x: expected a contiguous or channels_last tensor")
    r2, w2 = triton.next_power_of_2(C * H), triton.next_power_of_2(W)
    tile = _INTERPRETER_TILE if x.device.type == "cpu" else _TILE
    if channels_last:  # contiguous along C, the fastest part of a row index: up to 64 rows per column
        block_r = min(r2, 64 if tile == _TILE else tile)
        block_w = min(w2, max(tile // block_r, 1))
    else:  # contiguous along W: whole image rows, and as many of them as fill the tile
        block_w = min(w2, 256)
        block_r = min(r2, max(tile // block_w, 1))
    tile = block_r * block_w
    num_warps = 4 if tile >= 512 else (2 if tile >= 128 else 1)
    return _Geometry(N, C, H, W, tuple(x.stride()), channels_last, block_r, block_w, num_warps)


def _grid(geo: _Geometry):
    return (geo.N, triton.cdiv(geo.C * geo.H, geo.BLOCK_R), triton.cdiv(geo.W, geo.BLOCK_W))


def _mode_code(mode: str) -> int:
    if mode not in _MODES:
        raise ValueError(f"mode: expected 'max' or 'avg', got {mode!r}")
    return _MODES[mode]


def _with_strides_of(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t itself if it has x's strides (the kernels address both with x's), else a copy that does."""
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


def _pool(src, t, dst, geo: _Geometry, mode: int, out: int) -> None:
    _crp_pool_kernel[_grid(geo)](
        src,
        t if t is not None else src,
        dst,
        geo.C,
        geo.H,
        geo.W,
        *geo.strides,
        MODE=mode,
        OUT=out,
        CL=geo.channels_last,
        IS_F64=src.dtype == torch.float64,
        BLOCK_R=geo.BLOCK_R,
        BLOCK_W=geo.BLOCK_W,
        num_warps=geo.num_warps,
    )


def fwd(x: torch.Tensor, mode: str) -> torch.Tensor:
    """out (x's shape, dtype and layout): the max or average (/ 25) of each 5x5 window."""
    code = _mode_code(mode)
    out = torch.empty_like(x)
    if x.numel():
        _pool(x, None, out, _geometry(x), code, _OUT_VALUE)
    return out


def bwd(grad_out: torch.Tensor, x: torch.Tensor, mode: str) -> torch.Tensor:
    """grad_x (x's shape, dtype and layout) for grad_out (x's shape)."""
    code = _mode_code(mode)
    grad_x = torch.empty_like(x)
    if not x.numel():
        return grad_x
    geo = _geometry(x)
    grad_out = _with_strides_of(grad_out, x)
    if code == _MODES["avg"]:
        _pool(grad_out, None, grad_x, geo, code, _OUT_VALUE)
        return grad_x
    codes = torch.empty_like(x, dtype=torch.int8)
    _pool(x, None, codes, geo, code, _OUT_CODE)
    _crp_pool_max_bwd_kernel[_grid(geo)](
        codes,
        grad_out,
        grad_x,
        geo.C,
        geo.H,
        geo.W,
        *geo.strides,
        CL=geo.channels_last,
        IS_F64=x.dtype == torch.float64,
        BLOCK_R=geo.BLOCK_R,
        BLOCK_W=geo.BLOCK_W,
        num_warps=geo.num_warps,
    )
    return grad_x


def jvp(x: torch.Tensor, x_t: torch.Tensor, mode: str) -> torch.Tensor:
    """out_t (x's shape, dtype and layout) for the tangent x_t (x's shape)."""
    code = _mode_code(mode)
    out_t = torch.empty_like(x)
    if not x.numel():
        return out_t
    geo = _geometry(x)
    x_t = _with_strides_of(x_t, x)
    if code == _MODES["avg"]:
        _pool(x_t, None, out_t, geo, code, _OUT_VALUE)
    else:
        _pool(x, x_t, out_t, geo, code, _OUT_PICK)
    return out_t
